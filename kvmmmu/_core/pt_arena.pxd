# See pt_arena.pyx for details.
#
# The page-table arena: every SPTE page (struct kvm_mmu_page's spt) and every
# header (struct kvm_mmu_page) of one VM, the 32-bit host's split-SPTE
# protocol, the MMU-level SPTE helpers of mmu.c, and the two lockless walk
# protocols (shadow MMU: vcpu->mode + flush IPI; TDP MMU: RCU).  Other Cython
# modules do
#
#     from kvmmmu._core.pt_arena cimport PtArena, pt_arena_t, mmu_spte_set
#
# and call the inline helpers on `&arena.a` inside `with nogil:`.
#
# Handles (all 64-bit, 0 means NULL, as kernel pointers):
#   sp     header index + 1                        (struct kvm_mmu_page *)
#   pfn    base_pfn + table index                  (u64 *spt, shadowed_translation)
#   sptep  (pfn << 12) | (index << 3), types.pxd   (u64 *sptep)
#
# Concurrency contract (the kernel's): functions that change SPTEs, headers
# or the pools require mmu_lock held for write, i.e. one writer at a time;
# kvmmmu callers serialize that themselves.  Lockless readers may run on any
# number of other threads: _get_spte_lockless / mmu_spte_get_lockless between
# walk_shadow_page_lockless_begin/end (or kvm_tdp_mmu_walk_lockless_begin/end).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t

from kvmmmu._core.types cimport sptep_t, make_sptep, sptep_table_pfn, spte_index
from kvmmmu._core.memcache cimport kvm_mmu_memory_cache
from kvmmmu._core.spte cimport (
    SpteFormat, spte_fmt_t, is_shadow_present_pte, is_writable_pte, spte_ad_enabled,
    spte_to_pfn, is_mmu_writable_spte, is_access_track_spte, spte_needs_atomic_update,
    is_ept_ve_possible,
)

cdef extern from "pt_arena_defs.h" nogil:
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
        uint32_t link_prev
        uint32_t link_next
        uint32_t hash_next
        uint32_t hash_pprev
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
        uint32_t nx_link_prev
        uint32_t nx_link_next
        int32_t clear_spte_count
        uint32_t rcu_next
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


cdef enum:
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
    pt_pool pools[3]
    kvm_mmu_page no_sp          # stands in for a page without an owner
    # SPTE access log: (event, value) pairs, off when NULL (single writer).
    uint64_t *log
    uint64_t log_len
    uint64_t log_cap


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


# ---------------------------------------------------------------------------
# The four low-level SPTE accessors (mmu.c: __set_spte, __update_clear_spte_fast,
# __update_clear_spte_slow, __get_spte_lockless).  64-bit hosts: one 64-bit
# access.  32-bit hosts: union split_spte, spte_low at the lower address and
# holding every bit that decides presence (bit 11, P/RWX, A/D).
# ---------------------------------------------------------------------------

cdef inline void _log(pt_arena_t *a, uint64_t ev, uint64_t val) noexcept nogil:
    if a.log != NULL and a.log_len < a.log_cap:
        a.log[2 * a.log_len] = ev
        a.log[2 * a.log_len + 1] = val
        a.log_len += 1

cdef inline void _prove_ve(pt_arena_t *a, uint64_t spte) noexcept nogil:
    if a.prove_mmu and is_ept_ve_possible(&a.fmt, spte):
        a.warn[PT_WARN_EPT_VE] += 1

cdef inline void count_spte_clear(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil:
    """32-bit: a non-present value was written; tell lockless readers.

    Only the page's count changes (one per page, not per SPTE), after a write
    barrier so both halves are visible first.  Writers hold mmu_lock, so a
    plain increment suffices; readers load it with READ_ONCE.
    """
    cdef kvm_mmu_page *sp
    if is_shadow_present_pte(spte):
        return
    sp = sptep_to_sp(a, sptep)
    pt_smp_wmb()
    _log(a, PT_EV_WMB, 0)
    pt_write_once_s32(&sp.clear_spte_count,
                      <int32_t>(<uint32_t>pt_read_once_s32(&sp.clear_spte_count) + 1u))
    _log(a, PT_EV_INC_COUNT, <uint32_t>sp.clear_spte_count)
    a.nr_count_spte_clear += 1

cdef inline void _set_spte(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil:
    """__set_spte: install a value over a non-present SPTE.

    32-bit: high half, smp_wmb, low half.  The entry turns present only with
    the low store, when its PFN-high and NX bits are already in place.
    """
    cdef uint64_t *p = pt_sptep_ptr(a, sptep)
    a.nr_set += 1
    if a.host_64bit:
        _prove_ve(a, spte)
        pt_write_once64(p, spte)
        _log(a, PT_EV_WRITE64, spte)
        return
    pt_write_high(p, <uint32_t>(spte >> 32))
    _log(a, PT_EV_WRITE_HIGH, spte >> 32)
    pt_smp_wmb()
    _log(a, PT_EV_WMB, 0)
    pt_write_low(p, <uint32_t>spte)
    _log(a, PT_EV_WRITE_LOW, <uint32_t>spte)

cdef inline void _update_clear_spte_fast(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil:
    """__update_clear_spte_fast: no one else can change this SPTE.

    32-bit: low half first (withdrawing presence before the high half
    changes), smp_wmb, high half, then count_spte_clear.
    """
    cdef uint64_t *p = pt_sptep_ptr(a, sptep)
    a.nr_update_fast += 1
    if a.host_64bit:
        _prove_ve(a, spte)
        pt_write_once64(p, spte)
        _log(a, PT_EV_WRITE64, spte)
        return
    pt_write_low(p, <uint32_t>spte)
    _log(a, PT_EV_WRITE_LOW, <uint32_t>spte)
    pt_smp_wmb()
    _log(a, PT_EV_WMB, 0)
    pt_write_high(p, <uint32_t>(spte >> 32))
    _log(a, PT_EV_WRITE_HIGH, spte >> 32)
    count_spte_clear(a, sptep, spte)

cdef inline uint64_t _update_clear_spte_slow(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil:
    """__update_clear_spte_slow: the CPU or a lockless writer may change the
    SPTE meanwhile; returns the value actually replaced.

    32-bit: xchg of the low half (it holds every bit anyone else may set, and
    orders the high-half store after it), then the high half is read and
    rewritten, then count_spte_clear.
    """
    cdef uint64_t *p = pt_sptep_ptr(a, sptep)
    cdef uint32_t lo, hi
    cdef uint64_t old
    a.nr_update_slow += 1
    if a.host_64bit:
        _prove_ve(a, spte)
        old = pt_xchg64(p, spte)
        _log(a, PT_EV_XCHG64, spte)
        return old
    lo = pt_xchg_low(p, <uint32_t>spte)
    _log(a, PT_EV_XCHG_LOW, <uint32_t>spte)
    hi = pt_read_high(p)
    _log(a, PT_EV_READ_HIGH, hi)
    pt_write_high(p, <uint32_t>(spte >> 32))
    _log(a, PT_EV_WRITE_HIGH, spte >> 32)
    count_spte_clear(a, sptep, spte)
    return (<uint64_t>hi << 32) | lo

cdef inline uint64_t _get_spte_lockless(pt_arena_t *a, sptep_t sptep, uint64_t *retries) noexcept nogil:
    """__get_spte_lockless; `retries` (may be NULL) counts rereads.

    32-bit: read the page's clear_spte_count, low, high (smp_rmb between
    each), and start again if the low half or the count changed.  A
    present -> non-present change mid-read is harmless (a non-present
    SPTE's high half means nothing); KVM changes a present SPTE's target
    only through non-present, which bumps the count, so an unchanged count
    rules out pairing halves of two different translations.
    """
    cdef uint64_t *p = pt_sptep_ptr(a, sptep)
    cdef kvm_mmu_page *sp
    cdef int32_t count
    cdef uint32_t lo, hi, lo2
    cdef int32_t count2
    cdef uint64_t v
    if a.host_64bit:
        v = pt_read_once64(p)
        _log(a, PT_EV_READ64, v)
        return v
    sp = sptep_to_sp(a, sptep)
    while True:
        count = pt_read_once_s32(&sp.clear_spte_count)
        _log(a, PT_EV_READ_COUNT, <uint32_t>count)
        pt_smp_rmb()
        _log(a, PT_EV_RMB, 0)
        lo = pt_read_low(p)
        _log(a, PT_EV_READ_LOW, lo)
        pt_smp_rmb()
        _log(a, PT_EV_RMB, 0)
        hi = pt_read_high(p)
        _log(a, PT_EV_READ_HIGH, hi)
        pt_smp_rmb()
        _log(a, PT_EV_RMB, 0)
        lo2 = pt_read_low(p)
        _log(a, PT_EV_READ_LOW, lo2)
        if lo == lo2:
            count2 = pt_read_once_s32(&sp.clear_spte_count)
            _log(a, PT_EV_READ_COUNT, <uint32_t>count2)
            if count == count2:
                return (<uint64_t>hi << 32) | lo
        if retries != NULL:
            retries[0] += 1

cdef inline uint64_t _get_spte_naive_split(const uint64_t *p) noexcept nogil:
    """What __get_spte_lockless guards against: the two halves read once,
    low then high, with no recheck.  Used only to show that it tears."""
    cdef uint32_t lo = pt_read_low(p)
    cdef uint32_t hi = pt_read_high(p)
    return (<uint64_t>hi << 32) | lo


# ---------------------------------------------------------------------------
# The MMU-level helpers (mmu.c), for the kernel era chosen per arena.
# ---------------------------------------------------------------------------

cdef inline bint spte_has_volatile_bits_v6_12(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """v5.18..v6.12 spte_has_volatile_bits (caller checked presence)."""
    if (not is_writable_pte(spte)) and is_mmu_writable_spte(f, spte):
        return True
    if is_access_track_spte(f, spte):
        return True
    if spte_ad_enabled(spte):
        if (spte & f.accessed_mask) == 0 or (is_writable_pte(spte) and (spte & f.dirty_mask) == 0):
            return True
    return False

cdef inline bint is_accessed_spte_v6_12(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """Pre-v6.13 is_accessed_spte: the A bit if A/D enabled, else not access-tracked."""
    if spte_ad_enabled(spte):
        return (spte & f.accessed_mask) != 0
    return not is_access_track_spte(f, spte)

cdef inline bint is_dirty_spte_v6_12(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """Pre-v6.13 is_dirty_spte: the D bit if A/D enabled, else W."""
    if spte_ad_enabled(spte):
        return (spte & f.dirty_mask) != 0
    return is_writable_pte(spte)

cdef inline bint _needs_atomic_update(const pt_arena_t *a, uint64_t spte) noexcept nogil:
    if a.era == PT_ERA_V6_12:
        return spte_has_volatile_bits_v6_12(&a.fmt, spte)
    return spte_needs_atomic_update(&a.fmt, spte)

cdef inline bint _spte_writable_invariants_ok(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """check_spte_writable_invariants: MMU-writable => Host-writable, W => MMU-writable."""
    if spte & f.mmu_writable_mask:
        return (spte & f.host_writable_mask) != 0
    return not is_writable_pte(spte)

cdef inline void kvm_update_page_stats(pt_arena_t *a, int level, int64_t count) noexcept nogil:
    if 1 <= level <= KVM_NR_PAGE_SIZES:
        a.pages[level - 1] += count
    else:
        a.warn[PT_WARN_BAD_LEVEL] += 1

# The helpers read the old value with one 64-bit load where a 32-bit kernel
# does a plain (two-instruction) `*sptep`: only mmu_lock holders change the
# high half, so both see the same value.  Like the kernel (WRITE_ONCE), a
# new table is published by a plain store of the link: on x86 (TSO) its
# contents are visible first; the model is x86-only (pt_arena_defs.h).

cdef inline void mmu_spte_set(pt_arena_t *a, sptep_t sptep, uint64_t new_spte) noexcept nogil:
    """Non-present -> present (or -> MMIO).  WARNs if the old value is present."""
    if is_shadow_present_pte(pt_read_once64(pt_sptep_ptr(a, sptep))):
        a.warn[PT_WARN_SET_PRESENT] += 1
    _set_spte(a, sptep, new_spte)

cdef inline bint mmu_spte_update(pt_arena_t *a, sptep_t sptep, uint64_t new_spte,
                                 pt_ad_out *ad) noexcept nogil:
    """Change the state bits of a present SPTE (same PFN).  Returns "flush".

    Old not present: mmu_spte_set, no flush.  Otherwise a plain store unless
    the old value has bits others may set (then xchg, and the flush decision
    uses the value really replaced).  v6.18: flush iff MMU-writable went from
    set to clear.  v6.12: flush iff old MMU-writable and new not hardware-
    writable, or A or D was lost (and `ad` reports the lost A/D).
    """
    cdef const spte_fmt_t *f = &a.fmt
    cdef uint64_t old_spte = pt_read_once64(pt_sptep_ptr(a, sptep))
    cdef bint flush
    if ad != NULL:
        ad.flags = 0
        ad.pfn = 0
    if not is_shadow_present_pte(new_spte):
        a.warn[PT_WARN_UPDATE_NONPRESENT] += 1
    if not _spte_writable_invariants_ok(f, new_spte):
        a.warn[PT_WARN_WRITABLE_INVARIANT] += 1
    if not is_shadow_present_pte(old_spte):
        mmu_spte_set(a, sptep, new_spte)
        return False
    if not _needs_atomic_update(a, old_spte):
        _update_clear_spte_fast(a, sptep, new_spte)
    else:
        old_spte = _update_clear_spte_slow(a, sptep, new_spte)
    if a.era == PT_ERA_V6_18:
        if not is_shadow_present_pte(old_spte) or spte_to_pfn(old_spte) != spte_to_pfn(new_spte):
            a.warn[PT_WARN_UPDATE_PFN] += 1
        return is_mmu_writable_spte(f, old_spte) and not is_mmu_writable_spte(f, new_spte)
    # PT_ERA_V6_12: mmu_spte_update_no_track, then the flush / A/D rules.
    if spte_to_pfn(old_spte) != spte_to_pfn(new_spte):
        a.warn[PT_WARN_UPDATE_PFN] += 1
    if not is_shadow_present_pte(old_spte):
        return False
    flush = is_mmu_writable_spte(f, old_spte) and not is_writable_pte(new_spte)
    if is_accessed_spte_v6_12(f, old_spte) and not is_accessed_spte_v6_12(f, new_spte):
        flush = True
        if ad != NULL:
            ad.flags |= PT_AD_ACCESSED
    if is_dirty_spte_v6_12(f, old_spte) and not is_dirty_spte_v6_12(f, new_spte):
        flush = True
        if ad != NULL:
            ad.flags |= PT_AD_DIRTY
    if ad != NULL and ad.flags:
        ad.pfn = spte_to_pfn(old_spte)
    return flush

cdef inline uint64_t mmu_spte_clear_track_bits(pt_arena_t *a, sptep_t sptep,
                                              pt_ad_out *ad) noexcept nogil:
    """Zap a leaf SPTE without losing its state; returns the old SPTE.

    The page-count statistic of the table's level drops by one when the old
    value was present.  v6.12 also reports A/D of the old SPTE in `ad` (the
    kernel's kvm_set_pfn_accessed / kvm_set_pfn_dirty); v6.13+ kernels
    no longer touch the host page here.
    """
    cdef const spte_fmt_t *f = &a.fmt
    cdef uint64_t old_spte = pt_read_once64(pt_sptep_ptr(a, sptep))
    cdef int level = <int>(sptep_to_sp(a, sptep).role & PT_ROLE_LEVEL_MASK)
    if ad != NULL:
        ad.flags = 0
        ad.pfn = 0
    if not is_shadow_present_pte(old_spte) or not _needs_atomic_update(a, old_spte):
        _update_clear_spte_fast(a, sptep, f.nonpresent_value)
    else:
        old_spte = _update_clear_spte_slow(a, sptep, f.nonpresent_value)
    if not is_shadow_present_pte(old_spte):
        return old_spte
    kvm_update_page_stats(a, level, -1)
    if a.era == PT_ERA_V6_12 and ad != NULL:
        if is_accessed_spte_v6_12(f, old_spte):
            ad.flags |= PT_AD_ACCESSED
        if is_dirty_spte_v6_12(f, old_spte):
            ad.flags |= PT_AD_DIRTY
        ad.pfn = spte_to_pfn(old_spte)
    return old_spte

cdef inline void mmu_spte_clear_no_track(pt_arena_t *a, sptep_t sptep) noexcept nogil:
    """Clear an upper-level or MMIO SPTE; nothing to track (32-bit: still counted)."""
    _update_clear_spte_fast(a, sptep, a.fmt.nonpresent_value)

cdef inline uint64_t mmu_spte_get_lockless(pt_arena_t *a, sptep_t sptep) noexcept nogil:
    return _get_spte_lockless(a, sptep, NULL)


# ---------------------------------------------------------------------------
# Lockless walk protocols.
# ---------------------------------------------------------------------------

cdef inline void kvm_tdp_mmu_walk_lockless_begin(pt_arena_t *a, int vcpu) noexcept nogil:
    """rcu_read_lock(): publish the grace-period sequence seen, then a full
    barrier so no SPTE load of the walk is performed before it is visible."""
    cdef kvm_vcpu_lockless *v = &a.vcpus[vcpu]
    if v.rcu_nesting == 0:
        pt_write_once64(&v.rcu_gp, pt_load_acquire64(&a.rcu_gp_seq))
        pt_smp_mb()
    v.rcu_nesting += 1

cdef inline void kvm_tdp_mmu_walk_lockless_end(pt_arena_t *a, int vcpu) noexcept nogil:
    """rcu_read_unlock(): release, so every SPTE load completes first."""
    cdef kvm_vcpu_lockless *v = &a.vcpus[vcpu]
    v.rcu_nesting -= 1
    if v.rcu_nesting == 0:
        pt_store_release64(&v.rcu_gp, 0)

cdef inline void walk_shadow_page_lockless_begin(pt_arena_t *a, int vcpu) noexcept nogil:
    """Shadow MMU: local_irq_disable(), then smp_store_mb(mode, READING)."""
    cdef kvm_vcpu_lockless *v = &a.vcpus[vcpu]
    if v.tdp_mmu_active:
        kvm_tdp_mmu_walk_lockless_begin(a, vcpu)
        return
    v.irqs_disabled = 1
    pt_store_mb64(&v.mode, (pt_read_once64(&v.mode) & ~(<uint64_t>3)) | READING_SHADOW_PAGE_TABLES)

cdef inline void walk_shadow_page_lockless_end(pt_arena_t *a, int vcpu) noexcept nogil:
    """Shadow MMU: smp_store_release(mode, OUTSIDE), then local_irq_enable()
    (a pending flush IPI is acknowledged at this point: the walk sequence
    in the mode word moves on)."""
    cdef kvm_vcpu_lockless *v = &a.vcpus[vcpu]
    cdef uint64_t w
    if v.tdp_mmu_active:
        kvm_tdp_mmu_walk_lockless_end(a, vcpu)
        return
    w = pt_read_once64(&v.mode)
    pt_store_release64(&v.mode, (((w >> 2) + 1) << 2) | OUTSIDE_GUEST_MODE)
    v.irqs_disabled = 0
    v.nr_walks += 1


# ---------------------------------------------------------------------------
# Pools, allocation, freeing, grace periods (pt_arena.pyx).  All require the
# writer side (mmu_lock) except where noted.
# ---------------------------------------------------------------------------

# memcache.pxd pool callbacks: one page or header from the arena's free lists
# or unused slots of existing chunks (never grows: growth needs the GIL).
cdef int pt_pool_alloc(void *pool, uint64_t *obj) noexcept nogil
cdef void pt_pool_free(void *pool, uint64_t obj) noexcept nogil

# kvm_mmu_alloc_shadow_page / tdp_mmu_alloc_sp: a header and a page from the
# caches (and a shadowed_translation page if info_cache is not NULL).
# 0, or -12 (-ENOMEM) with nothing taken if a cache is empty.
cdef int pt_alloc_sp(pt_arena_t *a, kvm_mmu_memory_cache *page_cache,
                     kvm_mmu_memory_cache *header_cache,
                     kvm_mmu_memory_cache *info_cache, uint64_t *sp) noexcept nogil
# kvm_mmu_free_shadow_page / tdp_mmu_free_sp: poison and free at once.  Only
# safe when no lockless walker can reach the page (after a flush or a grace
# period, or at teardown).
cdef void pt_free_sp(pt_arena_t *a, uint64_t sp) noexcept nogil
# kvm_flush_remote_tlbs (KVM_REQ_TLB_FLUSH carries KVM_REQUEST_WAIT): returns
# how many vCPUs it had to wait for.
cdef int kvm_flush_remote_tlbs(pt_arena_t *a) noexcept nogil
# kvm_mmu_commit_zap_page: flush (waiting out every shadow-MMU walker), then free.
cdef void kvm_mmu_commit_zap_page(pt_arena_t *a, const uint64_t *sps, Py_ssize_t n) noexcept nogil
# call_rcu(&sp->rcu_head, tdp_mmu_free_sp_rcu_callback).
cdef void call_rcu_free_sp(pt_arena_t *a, uint64_t sp) noexcept nogil
# One non-blocking step of the model's RCU: start a grace period if callbacks
# wait, finish it if every reader that predates it has left; returns the
# number of sps freed.
cdef int64_t rcu_poll(pt_arena_t *a) noexcept nogil
# synchronize_rcu(): wait for a full grace period, then run due callbacks.
cdef void synchronize_rcu(pt_arena_t *a) noexcept nogil
# rcu_barrier(): wait until every pending callback has run.
cdef void rcu_barrier(pt_arena_t *a) noexcept nogil


cdef class PtArena:
    cdef pt_arena_t a
    cdef readonly SpteFormat fmt
    cdef tuple _chunks           # numpy uint8 buffer per chunk (owns the memory)
    cdef tuple _table_views      # (tables_per_chunk, 512) uint64 view per chunk
    cdef tuple _header_views     # (tables_per_chunk,) HEADER_DTYPE view per chunk
    cdef tuple _meta_views       # (tables_per_chunk,) META_DTYPE view per chunk
    cdef void *_vcpus_raw       # malloc'd, unaligned base of a.vcpus
    cdef list _walk_owner       # thread ident inside a Python-level walk, per vCPU
    cdef object _host_ad        # default host accessed/dirty callback
    cdef public object warn_sink  # kvmmmu.warn.WarnSink (or None): where WARNs are reported too
    cdef uint64_t _dir_bytes
    cdef int _check_sptep(self, sptep_t sptep) except -1
    cdef int _check_sp(self, uint64_t sp, bint allow_pending) except -1
    cdef int _grow_for(self, uint64_t tables, uint64_t headers) except -1
    cdef int _warn_since(self, uint32_t *before) except -1
    cdef uint64_t _available(self, int kind)
    cdef int _vcpu(self, int vcpu) except -1
    cdef _report_ad(self, pt_ad_out *ad, host_ad)


cdef class MmuMemoryCache:
    cdef kvm_mmu_memory_cache mc
    cdef readonly PtArena arena
    cdef readonly int kind
