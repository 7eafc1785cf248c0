# See pt_arena.pyx for details.
#
# The page-table arena: every SPTE page (struct kvm_mmu_page's spt) and every
# header (struct kvm_mmu_page) of one VM.  Split by kernel concept:
#   pt_arena_defs.pxd  layout, constants, handle arithmetic, memory ordering
#   pt_pool            page and header pools, allocation and freeing
#   mmu_spte           SPTE writers (mmu_spte_*) and the 32-bit split SPTEs
#   mmu_lockless       remote TLB flush, RCU and the lockless-walk protocols
#                      (shadow MMU: vcpu->mode + flush IPI; TDP MMU: RCU)
#   pt_audit           the arena auditor
# Other Cython modules do
#
#     from kvmmmu._core.pt_arena cimport PtArena, pt_arena_t
#     from kvmmmu._core.mmu_spte cimport mmu_spte_set
#
# and call the helpers on `&arena.a` inside `with nogil:` (this file still
# re-exports the helpers of those modules, see the end).
#
# Handles (all 64-bit, 0 means NULL, as kernel pointers):
#   sp     header index + 1                        (struct kvm_mmu_page *)
#   pfn    base_pfn + table index                  (u64 *spt, shadowed_translation)
#   sptep  (pfn << 12) | (index << 3), types.pxd   (u64 *sptep)
#
# Concurrency contract (the kernel's): functions that change SPTEs or headers
# require mmu_lock held for write, i.e. one writer at a time (kvmmmu callers
# serialize that themselves), except the TDP MMU's shared side (mmu_lock held
# for read: several threads, cmpxchg only, pt_shared_rcu_lock around each
# walk).  The pools (pool_lock), call_rcu / rcu_poll (rcu_lock) and the
# counters the shared side moves (atomic adds) are safe on several threads.
# Lockless readers may run on any number of other threads: _get_spte_lockless
# / mmu_spte_get_lockless between walk_shadow_page_lockless_begin/end (or
# kvm_tdp_mmu_walk_lockless_begin/end).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t

from kvmmmu._core.types cimport sptep_t, make_sptep, sptep_table_pfn, spte_index
from kvmmmu._core.memcache cimport kvm_mmu_memory_cache
from kvmmmu._core.spte cimport SpteFormat, spte_fmt_t, is_ept_ve_possible

# Layout, constants and memory-ordering primitives: pt_arena_defs.pxd.
from kvmmmu._core.pt_arena_defs cimport (
    KVMMMU_DEBUG, PT_POISON_BYTE, PT_POISON, OUTSIDE_GUEST_MODE, IN_GUEST_MODE,
    EXITING_GUEST_MODE, READING_SHADOW_PAGE_TABLES, PT_ROLE_LEVEL_MASK, PT_ROLE_INVALID,
    KVM_NR_PAGE_SIZES, kvm_mmu_page, kvm_vcpu_lockless, pt_smp_wmb, pt_smp_rmb, pt_smp_mb,
    pt_cpu_relax, pt_yield, pt_read_once64, pt_load_acquire64, pt_write_once64,
    pt_store_release64, pt_store_mb64, pt_xchg64, pt_try_cmpxchg64, pt_fetch_add64, pt_read_low,
    pt_read_high, pt_write_low, pt_write_high, pt_xchg_low, pt_read_once_u32, pt_write_once_u32,
    pt_read_once_s32, pt_write_once_s32, pt_now_ns, pt_spin_lock, pt_spin_unlock,
    pt_atomic_add_s64, pt_atomic_add_u64, pt_atomic_inc_u32,
)

# The arena state, slot enums and handle arithmetic: pt_arena_defs.pxd.
from kvmmmu._core.pt_arena_defs cimport (
    PT_PAGE_FREE, PT_PAGE_CACHED, PT_PAGE_SPT, PT_PAGE_INFO, PT_PAGE_CACHED_INFO, PT_SP_FREE,
    PT_SP_CACHED, PT_SP_IN_USE, PT_SP_RCU_PENDING, PT_CACHE_SHADOW_PAGE, PT_CACHE_PAGE_HEADER,
    PT_CACHE_SHADOWED_INFO, PT_ERA_V6_18, PT_ERA_V6_12, PT_AD_ACCESSED, PT_AD_DIRTY,
    PT_WARN_SET_PRESENT, PT_WARN_UPDATE_NONPRESENT, PT_WARN_WRITABLE_INVARIANT,
    PT_WARN_UPDATE_PFN, PT_WARN_EPT_VE, PT_WARN_COMMIT_ZAP, PT_WARN_BAD_LEVEL, PT_NR_WARN,
    PT_DBG_FREE_NOT_EMPTY, PT_DBG_FREE_PARENTS, PT_DBG_WRITE_NOT_LIVE, PT_DBG_WRONG_LEVEL,
    PT_NR_DBG, PT_EV_WRITE64, PT_EV_XCHG64, PT_EV_READ64, PT_EV_WRITE_LOW, PT_EV_WRITE_HIGH,
    PT_EV_XCHG_LOW, PT_EV_READ_LOW, PT_EV_READ_HIGH, PT_EV_WMB, PT_EV_RMB, PT_EV_READ_COUNT,
    PT_EV_INC_COUNT, PT_NR_SHARED, pt_slot_meta, pt_pool, pt_ad_out, pt_arena_t, pt_table_index, pt_table_ptr,
    pt_sptep_ptr, pt_slot, pt_sp_ptr, pt_sptep_in_arena, pt_page_sp, sptep_to_sp,
    spte_to_child_sp,
)


# Declared in their own modules, re-exported here for consumers that cimport
# everything from pt_arena: pools, allocation, freeing (pt_pool.pyx); the
# SPTE writers and split SPTEs (mmu_spte.pyx); grace periods, remote TLB
# flushes and the lockless-walk reader halves (mmu_lockless.pyx).
from kvmmmu._core.pt_pool cimport pt_pool_alloc, pt_pool_free, pt_alloc_sp, pt_free_sp
from kvmmmu._core.mmu_spte cimport (
    _set_spte, _update_clear_spte_fast, _update_clear_spte_slow, _get_spte_lockless,
    _get_spte_naive_split, count_spte_clear, spte_has_volatile_bits_v6_12,
    is_accessed_spte_v6_12, is_dirty_spte_v6_12, _needs_atomic_update,
    _spte_writable_invariants_ok, kvm_update_page_stats, mmu_spte_set, mmu_spte_update,
    mmu_spte_clear_track_bits, mmu_spte_clear_no_track, mmu_spte_get_lockless,
)
from kvmmmu._core.mmu_lockless cimport (
    kvm_flush_remote_tlbs, kvm_mmu_commit_zap_page, call_rcu_free_sp, rcu_poll,
    synchronize_rcu, rcu_barrier, kvm_tdp_mmu_walk_lockless_begin,
    kvm_tdp_mmu_walk_lockless_end, walk_shadow_page_lockless_begin,
    walk_shadow_page_lockless_end,
)


cdef class PtArena:
    cdef pt_arena_t a
    cdef readonly SpteFormat fmt
    cdef list _chunks           # numpy uint8 buffer per chunk (owns the memory)
    cdef list _table_views      # (tables_per_chunk, 512) uint64 view per chunk
    cdef list _header_views     # (tables_per_chunk,) HEADER_DTYPE view per chunk
    cdef list _meta_views       # (tables_per_chunk,) META_DTYPE view per chunk
    cdef void *_vcpus_raw       # malloc'd, unaligned base of a.vcpus
    cdef list _walk_owner       # thread ident inside a Python-level walk, per vCPU
    cdef list _walk_token       # weakref to the walking thread's token (dies with the thread)
    cdef object _tls            # threading.local holding each walking thread's token
    cdef int _readers           # Python-level nogil reader batches in flight (GIL-protected)
    cdef object _busy           # what a nogil writer section of another thread is doing, or None
    cdef int _shared            # holders of the shared side (mmu_lock for read; GIL-protected)
    cdef uint64_t _shared_slots # bit i: shared_rcu[i] belongs to a holder
    cdef object _grow_lock      # threading.Lock: one arena growth at a time
    cdef uint32_t _debug_seen[4]  # debug_warn values already reported to warn_sink
    cdef object _host_ad        # default host accessed/dirty callback
    cdef public object warn_sink  # kvmmmu.warn.WarnSink (or None): where WARNs are reported too
    cdef uint64_t _dir_bytes
    cdef int _check_sptep(self, sptep_t sptep) except -1
    cdef int _check_sp(self, uint64_t sp, bint allow_pending) except -1
    cdef int _grow_for(self, uint64_t tables, uint64_t headers) except -1
    cdef int _grow_locked(self, uint64_t tables, uint64_t headers) except -1
    cdef int _warn_since(self, uint32_t *before) except -1
    cdef uint64_t _available(self, int kind)
    cdef int _vcpu(self, int vcpu) except -1
    cdef int _writer(self, str what) except -1
    cdef int _no_exclusive(self, str what) except -1
    cdef int _shared_enter(self, str what) except -1
    cdef void _shared_leave(self, int slot)
    cdef int _check_walker(self, int vcpu, str what) except -1
    cdef int _flush_bounded(self, object deadline, str what) except -1
    cdef int _rcu_wait(self, object deadline, str what) except -1
    cdef _report_ad(self, pt_ad_out *ad, host_ad)


cdef class MmuMemoryCache:
    cdef kvm_mmu_memory_cache mc
    cdef readonly PtArena arena
    cdef readonly int kind
    cdef object _user           # what is using the cache without the GIL, or None
    cdef int _ready(self, str what) except -1
    cdef int _claim(self, str what) except -1
    cdef void _release(self)
