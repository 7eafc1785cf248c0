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

# Layout, constants and memory-ordering primitives: pt_arena_defs.pxd.
from kvmmmu._core.pt_arena_defs cimport (
    KVMMMU_DEBUG, PT_POISON_BYTE, PT_POISON, OUTSIDE_GUEST_MODE, IN_GUEST_MODE,
    EXITING_GUEST_MODE, READING_SHADOW_PAGE_TABLES, PT_ROLE_LEVEL_MASK, PT_ROLE_INVALID,
    KVM_NR_PAGE_SIZES, kvm_mmu_page, kvm_vcpu_lockless, pt_smp_wmb, pt_smp_rmb, pt_smp_mb,
    pt_cpu_relax, pt_yield, pt_read_once64, pt_load_acquire64, pt_write_once64,
    pt_store_release64, pt_store_mb64, pt_xchg64, pt_try_cmpxchg64, pt_fetch_add64, pt_read_low,
    pt_read_high, pt_write_low, pt_write_high, pt_xchg_low, pt_read_once_u32, pt_write_once_u32,
    pt_read_once_s32, pt_write_once_s32, pt_now_ns,
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
    PT_EV_INC_COUNT, pt_slot_meta, pt_pool, pt_ad_out, pt_arena_t, pt_table_index, pt_table_ptr,
    pt_sptep_ptr, pt_slot, pt_sp_ptr, pt_sptep_in_arena, pt_page_sp, sptep_to_sp,
    spte_to_child_sp,
)


# ---------------------------------------------------------------------------
# The four low-level SPTE accessors (mmu.c: __set_spte, __update_clear_spte_fast,
# __update_clear_spte_slow, __get_spte_lockless).  64-bit hosts: one 64-bit
# access.  32-bit hosts: union split_spte, spte_low at the lower address and
# holding every bit that decides presence (bit 11, P/RWX, A/D).
# ---------------------------------------------------------------------------

cdef inline void _log(pt_arena_t *a, uint64_t ev, uint64_t val) noexcept nogil:
    # Pointer and length are read once: a reader on another thread may log
    # at the same time (the log is for one thread, but must never overflow).
    cdef uint64_t *log = a.log
    cdef uint64_t n = a.log_len
    if log != NULL and n < a.log_cap:
        log[2 * n] = ev
        log[2 * n + 1] = val
        a.log_len = n + 1

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

cdef inline void _debug_check_write(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil:
    """MMU_WARN_ON-style checks of an SPTE store (KVMMMU_DEBUG builds only):
    the page must be a live table, and a PS (huge) SPTE never goes into a
    level-1 table."""
    cdef pt_slot_meta *m = pt_slot(a, pt_table_index(a, sptep))
    if m.table_state != PT_PAGE_SPT:
        a.debug_warn[PT_DBG_WRITE_NOT_LIVE] += 1
    elif (is_shadow_present_pte(spte) and (spte & (<uint64_t>1 << 7)) and m.table_sp != 0 and
          (pt_sp_ptr(a, m.table_sp).role & PT_ROLE_LEVEL_MASK) == 1):
        a.debug_warn[PT_DBG_WRONG_LEVEL] += 1

cdef inline void _set_spte(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil:
    """__set_spte: install a value over a non-present SPTE.

    32-bit: high half, smp_wmb, low half.  The entry turns present only with
    the low store, when its PFN-high and NX bits are already in place.
    """
    cdef uint64_t *p = pt_sptep_ptr(a, sptep)
    if KVMMMU_DEBUG:
        _debug_check_write(a, sptep, spte)
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
    if KVMMMU_DEBUG:
        _debug_check_write(a, sptep, spte)
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
    if KVMMMU_DEBUG:
        _debug_check_write(a, sptep, spte)
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


# Pools, allocation, freeing (pt_pool.pyx) and grace periods / remote TLB
# flushes (mmu_lockless.pyx): declared there, re-exported here.
from kvmmmu._core.pt_pool cimport pt_pool_alloc, pt_pool_free, pt_alloc_sp, pt_free_sp
from kvmmmu._core.mmu_lockless cimport (
    kvm_flush_remote_tlbs, kvm_mmu_commit_zap_page, call_rcu_free_sp, rcu_poll,
    synchronize_rcu, rcu_barrier,
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
    cdef uint32_t _debug_seen[4]  # debug_warn values already reported to warn_sink
    cdef object _host_ad        # default host accessed/dirty callback
    cdef public object warn_sink  # kvmmmu.warn.WarnSink (or None): where WARNs are reported too
    cdef uint64_t _dir_bytes
    cdef int _check_sptep(self, sptep_t sptep) except -1
    cdef int _check_sp(self, uint64_t sp, bint allow_pending) except -1
    cdef int _grow_for(self, uint64_t tables, uint64_t headers) except -1
    cdef int _warn_since(self, uint32_t *before) except -1
    cdef uint64_t _available(self, int kind)
    cdef int _vcpu(self, int vcpu) except -1
    cdef int _writer(self, str what) except -1
    cdef int _check_walker(self, int vcpu, str what) except -1
    cdef int _flush_bounded(self, object deadline, str what) except -1
    cdef int _rcu_wait(self, object deadline, str what) except -1
    cdef _report_ad(self, pt_ad_out *ad, host_ad)


cdef class MmuMemoryCache:
    cdef kvm_mmu_memory_cache mc
    cdef readonly PtArena arena
    cdef readonly int kind
    cdef int _ready(self, str what) except -1
