# The C layout of the page-table arena, cimport only (no .pyx): constants,
# struct kvm_mmu_page at the kernel's x86-64 v6.18 layout, the per-vCPU
# lockless-walk state and the READ_ONCE / WRITE_ONCE / barrier primitives of
# pt_arena_defs.h; the arena's own state (pt_arena_t, slot metadata, the
# PT_* enums) and its handle arithmetic.  pt_arena.pxd re-exports every name, so
#
#     from kvmmmu._core.pt_arena cimport kvm_mmu_page, pt_read_once64
#
# keeps working; new code may cimport from here directly.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t

from kvmmmu._core.types cimport sptep_t, sptep_table_pfn, spte_index
from kvmmmu._core.spte cimport spte_fmt_t, spte_to_pfn

cdef extern from "pt_arena_defs.h" nogil:
    const int KVMMMU_DEBUG      # 1 in KVMMMU_DEBUG_CYTHON builds, else 0
    const int PT_POISON_BYTE
    const uint64_t PT_POISON
    const int OUTSIDE_GUEST_MODE
    const int IN_GUEST_MODE
    const int EXITING_GUEST_MODE
    const int READING_SHADOW_PAGE_TABLES
    const uint32_t PT_ROLE_LEVEL_MASK
    const uint32_t PT_ROLE_INVALID
    const int KVM_NR_PAGE_SIZES

    # Layout and the kernel's field widths: pt_arena_defs.h.
    ctypedef struct kvm_mmu_page:
        uint64_t link_next
        uint64_t link_prev
        uint64_t hash_next
        uint64_t hash_pprev
        uint8_t tdp_mmu_page
        uint8_t unsync
        uint8_t mmu_valid_gen
        uint8_t tdp_mmu_scheduled_root_to_zap
        uint8_t nx_huge_page_disallowed
        uint32_t role
        uint64_t gfn
        uint64_t spt
        uint64_t shadowed_translation
        int32_t root_count
        int32_t tdp_mmu_root_count
        uint8_t has_mapped_host_mmio
        uint32_t unsync_children
        int32_t write_flooding_count
        uint64_t external_spt
        uint64_t parent_ptes
        uint64_t ptep
        uint64_t unsync_child_bitmap[8]
        uint64_t nx_link_next
        uint64_t nx_link_prev
        uint64_t rcu_next
        int32_t clear_spte_count
        uint64_t rcu_gp

    ctypedef struct kvm_vcpu_lockless:
        uint64_t mode               # (walk_seq << 2) | vcpu->mode
        uint64_t rcu_gp             # rcu_read_lock() snapshot, 0 = not reading
        uint32_t rcu_nesting
        uint32_t tdp_mmu_active     # is_tdp_mmu_active(vcpu)
        uint32_t irqs_disabled      # local_irq_disable() during a shadow walk
        uint64_t nr_walks

    void pt_smp_wmb()
    void pt_smp_rmb()
    void pt_smp_mb()
    void pt_cpu_relax()
    void pt_yield()
    uint64_t pt_read_once64(const uint64_t *p)
    uint64_t pt_load_acquire64(const uint64_t *p)
    void pt_write_once64(uint64_t *p, uint64_t v)
    void pt_store_release64(uint64_t *p, uint64_t v)
    void pt_store_mb64(uint64_t *p, uint64_t v)
    uint64_t pt_xchg64(uint64_t *p, uint64_t v)
    bint pt_try_cmpxchg64(uint64_t *p, uint64_t *old, uint64_t v)
    uint64_t pt_fetch_add64(uint64_t *p, uint64_t v)
    uint32_t pt_read_low(const uint64_t *p)
    uint32_t pt_read_high(const uint64_t *p)
    void pt_write_low(uint64_t *p, uint32_t v)
    void pt_write_high(uint64_t *p, uint32_t v)
    uint32_t pt_xchg_low(uint64_t *p, uint32_t v)
    uint32_t pt_read_once_u32(const uint32_t *p)
    void pt_write_once_u32(uint32_t *p, uint32_t v)
    int32_t pt_read_once_s32(const int32_t *p)
    void pt_write_once_s32(int32_t *p, int32_t v)
    uint64_t pt_now_ns()
    # The shared side: a spinlock and relaxed atomic counters.
    void pt_spin_lock(uint32_t *l)
    void pt_spin_unlock(uint32_t *l)
    void pt_atomic_add_s64(int64_t *p, int64_t v)
    void pt_atomic_add_u64(uint64_t *p, uint64_t v)
    void pt_atomic_inc_u32(uint32_t *p)


cdef enum:
    # Threads that may hold the arena's shared side at once (each one is an
    # RCU reader with its own slot in pt_arena_t.shared_rcu).
    PT_NR_SHARED = 64
    # Page slots (tables and shadowed-translation pages share one pool).
    PT_PAGE_FREE = 1        # poisoned, on the FIFO free list
    PT_PAGE_CACHED = 2      # in mmu_shadow_page_cache: all SHADOW_NONPRESENT_VALUE
    PT_PAGE_SPT = 3         # the spt of a live (or RCU-pending) header
    PT_PAGE_INFO = 4        # the shadowed_translation of a live header
    PT_PAGE_CACHED_INFO = 5 # in mmu_shadowed_info_cache: zeroed
    # Header slots.
    PT_SP_FREE = 1
    PT_SP_CACHED = 2
    PT_SP_IN_USE = 3
    PT_SP_RCU_PENDING = 4   # unlinked TDP MMU page waiting for a grace period
    # Memory cache kinds (the vCPU's mmu_*_cache fields).
    PT_CACHE_SHADOW_PAGE = 0    # mmu_shadow_page_cache: filled with SHADOW_NONPRESENT_VALUE
    PT_CACHE_PAGE_HEADER = 1    # mmu_page_header_cache: zeroed headers
    PT_CACHE_SHADOWED_INFO = 2  # mmu_shadowed_info_cache: (zeroed) pages
    # Kernel behaviour the helpers follow.
    PT_ERA_V6_18 = 0        # v6.13+: flush only on lost MMU-writable, no host A/D at zap
    PT_ERA_V6_12 = 1        # up to v6.12: flush on lost A/D too, A/D pushed to the host page
    # A/D state handed to the host page (PT_ERA_V6_12 only).
    PT_AD_ACCESSED = 1      # kvm_set_pfn_accessed(pfn)
    PT_AD_DIRTY = 2         # kvm_set_pfn_dirty(pfn)
    # WARN_ON_ONCE sites, counted (the Python wrappers turn them into warnings).
    PT_WARN_SET_PRESENT = 0         # mmu_spte_set over a shadow-present SPTE
    PT_WARN_UPDATE_NONPRESENT = 1   # mmu_spte_update to a non-present value
    PT_WARN_WRITABLE_INVARIANT = 2  # check_spte_writable_invariants(new)
    PT_WARN_UPDATE_PFN = 3          # old not present after the update, or PFN changed
    PT_WARN_EPT_VE = 4              # KVM_MMU_WARN_ON(is_ept_ve_possible()) (prove_mmu)
    PT_WARN_COMMIT_ZAP = 5          # freeing an sp that is not invalid or still a root
    PT_WARN_BAD_LEVEL = 6           # page stats for a level outside 4K..1G (model only)
    PT_NR_WARN = 7
    # MMU_WARN_ON sites, counted only in KVMMMU_DEBUG builds.
    PT_DBG_FREE_NOT_EMPTY = 0       # kvm_mmu_free_shadow_page: a present SPTE left (shadow MMU)
    PT_DBG_FREE_PARENTS = 1         # freeing an sp with parent_ptes or unsync children
    PT_DBG_WRITE_NOT_LIVE = 2       # SPTE write into a page that is not a live table
    PT_DBG_WRONG_LEVEL = 3          # a huge (PS) SPTE written into a level-1 table
    PT_NR_DBG = 4
    # SPTE access log events (PtArena.start_access_log), in program order.
    PT_EV_WRITE64 = 1       # WRITE_ONCE(*sptep)
    PT_EV_XCHG64 = 2        # xchg(sptep), value = new
    PT_EV_READ64 = 3        # READ_ONCE(*sptep)
    PT_EV_WRITE_LOW = 4     # WRITE_ONCE(ssptep->spte_low)
    PT_EV_WRITE_HIGH = 5    # ssptep->spte_high = ...
    PT_EV_XCHG_LOW = 6      # xchg(&ssptep->spte_low), value = new
    PT_EV_READ_LOW = 7
    PT_EV_READ_HIGH = 8
    PT_EV_WMB = 9           # smp_wmb()
    PT_EV_RMB = 10          # smp_rmb()
    PT_EV_READ_COUNT = 11   # sp->clear_spte_count read
    PT_EV_INC_COUNT = 12    # sp->clear_spte_count++, value = new count


ctypedef struct pt_slot_meta:
    # Per-slot bookkeeping kept beside the chunk (the kernel's struct page).
    uint32_t table_sp       # page slot: the sp that owns this page (page->private)
    uint32_t table_next     # page slot: FIFO free-list link (table index + 1)
    uint32_t sp_next        # header slot: FIFO free-list link (sp handle)
    uint8_t table_state     # PT_PAGE_*
    uint8_t sp_state        # PT_SP_*
    uint16_t _pad


ctypedef struct pt_pool:
    # A memcache pool: `arena` is the pt_arena_t, `kind` a PT_CACHE_*.
    void *arena
    int kind


ctypedef struct pt_ad_out:
    # What the helper would have told the host page (PT_ERA_V6_12).
    uint32_t flags          # PT_AD_* bits
    uint64_t pfn


ctypedef struct pt_arena_t:
    # Geometry.  Chunk c holds tables_per_chunk pages, then as many headers,
    # then as many pt_slot_meta; chunk_base[c] never moves once published.
    uint64_t base_pfn           # pfn of table 0 (never 0)
    uint64_t tables_per_chunk   # power of two
    uint64_t chunk_shift
    uint64_t chunk_mask
    uint64_t hdr_off            # byte offset of the headers in a chunk
    uint64_t meta_off           # byte offset of the slot metadata in a chunk
    uint64_t max_chunks
    uint64_t n_chunks           # published with release after chunk_base[]
    uint8_t **chunk_base        # [max_chunks], 4 KiB aligned
    # Page pool: tables and shadowed-translation pages.
    uint64_t tables_hw          # page slots ever handed out (0..tables_hw-1)
    uint64_t table_free_head    # FIFO of freed pages (table index + 1)
    uint64_t table_free_tail
    uint64_t n_free_tables
    # Header pool.
    uint64_t headers_hw
    uint64_t sp_free_head
    uint64_t sp_free_tail
    uint64_t n_free_sps
    # State counts (the auditor recomputes them).
    uint64_t n_cached_tables    # both page caches
    uint64_t n_spt
    uint64_t n_info
    uint64_t n_cached_sps
    uint64_t n_sps
    uint64_t n_rcu_pending
    # SPTE semantics.
    spte_fmt_t fmt
    bint host_64bit             # False: union split_spte, clear_spte_count
    int era                     # PT_ERA_*
    bint prove_mmu              # CONFIG_KVM_PROVE_MMU checks
    int64_t pages[3]            # kvm->stat.pages[level - 1]
    # Lockless walks.
    kvm_vcpu_lockless *vcpus
    int nr_vcpus
    uint64_t rcu_gp_seq         # starts at 1; readers snapshot it
    uint64_t rcu_gp_target      # the grace period being waited for
    bint rcu_gp_in_progress
    uint64_t rcu_completed      # last completed grace period
    uint64_t rcu_head           # FIFO of RCU-pending sps (sp handles)
    uint64_t rcu_tail
    # Statistics (writer side).
    uint64_t remote_tlb_flush_requests
    uint64_t remote_tlb_flush
    uint64_t flush_ipis_waited  # vCPUs a flush had to wait for
    uint64_t rcu_gps            # grace periods completed
    uint64_t nr_set             # __set_spte
    uint64_t nr_update_fast     # __update_clear_spte_fast
    uint64_t nr_update_slow     # __update_clear_spte_slow
    uint64_t nr_count_spte_clear  # clear_spte_count increments
    uint64_t nr_sps_freed
    uint64_t lockless_retries   # 32-bit rereads of get_sptes_lockless (atomic add)
    uint32_t warn[7]            # PT_NR_WARN
    uint32_t debug_warn[4]      # PT_NR_DBG (KVMMMU_DEBUG builds only)
    pt_pool pools[3]
    kvm_mmu_page no_sp          # stands in for a page without an owner
    # SPTE access log: (event, value) pairs, off when NULL (single writer).
    uint64_t *log
    uint64_t log_len
    uint64_t log_cap
    # The shared side (mmu_lock held for read: TDP MMU faults of several
    # threads at once, kvmmmu/_core/tdp_mmu.pyx).  Writers of the pools (the
    # page allocator: topup, free) take pool_lock; call_rcu and the RCU steps
    # that can run beside shared holders (rcu_poll) take rcu_lock, always
    # before pool_lock.  Counters the shared side moves (n_cached_*, n_spt,
    # n_sps, n_rcu_pending, pages[], nr_sps_freed) are changed atomically.
    uint32_t pool_lock
    uint32_t rcu_lock
    # rcu_read_lock() of each shared holder: the grace-period sequence it
    # saw, 0 when the slot is unused (the vCPU readers' rcu_gp, for threads).
    uint64_t shared_rcu[PT_NR_SHARED]
    # kvm->arch.gfn_direct_bits (TDX: the shared bit as a gfn bit, else 0):
    # added to the gfn when a direct (non-mirror) TDP root is indexed.
    uint64_t gfn_direct_bits


# ---------------------------------------------------------------------------
# Address arithmetic (no checks: callers validated the handle once).
# ---------------------------------------------------------------------------

cdef inline uint64_t pt_table_index(const pt_arena_t *a, sptep_t sptep) noexcept nogil:
    """Table index of the page holding `sptep`."""
    return sptep_table_pfn(sptep) - a.base_pfn

cdef inline uint64_t *pt_table_ptr(const pt_arena_t *a, uint64_t tidx) noexcept nogil:
    return (<uint64_t *>a.chunk_base[tidx >> a.chunk_shift]) + ((tidx & a.chunk_mask) << 9)

cdef inline uint64_t *pt_sptep_ptr(const pt_arena_t *a, sptep_t sptep) noexcept nogil:
    return pt_table_ptr(a, pt_table_index(a, sptep)) + spte_index(sptep)

cdef inline pt_slot_meta *pt_slot(const pt_arena_t *a, uint64_t idx) noexcept nogil:
    return (<pt_slot_meta *>(a.chunk_base[idx >> a.chunk_shift] + a.meta_off)) + (idx & a.chunk_mask)

cdef inline kvm_mmu_page *pt_sp_ptr(const pt_arena_t *a, uint64_t sp) noexcept nogil:
    """Header of sp handle `sp` (!= 0)."""
    cdef uint64_t idx = sp - 1
    return (<kvm_mmu_page *>(a.chunk_base[idx >> a.chunk_shift] + a.hdr_off)) + (idx & a.chunk_mask)

cdef inline bint pt_sptep_in_arena(const pt_arena_t *a, sptep_t sptep) noexcept nogil:
    """8-byte aligned and on a page the arena has handed out at least once."""
    cdef uint64_t pfn = sptep_table_pfn(sptep)
    return ((sptep & 7) == 0 and pfn >= a.base_pfn and
            pfn - a.base_pfn < pt_read_once64(&a.tables_hw))

cdef inline uint64_t pt_page_sp(const pt_arena_t *a, uint64_t pfn) noexcept nogil:
    """sp handle recorded for page `pfn` (0: none); page->private."""
    return pt_read_once_u32(&pt_slot(a, pfn - a.base_pfn).table_sp)

cdef inline kvm_mmu_page *sptep_to_sp(pt_arena_t *a, sptep_t sptep) noexcept nogil:
    """The header of the table holding `sptep` (kernel: sptep_to_sp)."""
    cdef uint64_t sp = pt_page_sp(a, sptep_table_pfn(sptep))
    return pt_sp_ptr(a, sp) if sp != 0 else &a.no_sp

cdef inline uint64_t spte_to_child_sp(const pt_arena_t *a, uint64_t spte) noexcept nogil:
    """sp handle of the table a non-leaf SPTE points to, 0 if outside the arena."""
    cdef uint64_t pfn = spte_to_pfn(spte)
    if pfn < a.base_pfn or pfn - a.base_pfn >= pt_read_once64(&a.tables_hw):
        return 0
    return pt_page_sp(a, pfn)
