"""The shadow MMU's SPTE writers and split SPTEs (Linux v6.18
``arch/x86/kvm/mmu/mmu.c``: ``__set_spte``, ``__update_clear_spte_fast``,
``__update_clear_spte_slow``, ``__get_spte_lockless``, ``count_spte_clear``
and the ``mmu_spte_*`` helpers; ``spte.h`` for the pre-v6.13 predicates).

Every SPTE store of the shadow MMU goes through here, on a ``pt_arena_t``
(pt_arena_defs.pxd).  Two host widths:

* 64-bit hosts store and load an SPTE with one 64-bit access.
* 32-bit (CONFIG_X86_32 PAE) hosts see ``union split_spte``: ``spte_low`` at
  the lower address holds every bit that decides presence (bit 11, P/RWX,
  A/D).  A writer orders the halves so that a lockless reader never sees a
  present low half paired with a stale high half, and bumps the page's
  ``clear_spte_count`` whenever it writes a non-present value; the lockless
  reader rereads until the low half and the count are both unchanged.

Kernel eras: ``a.era`` selects v6.18 (flush only when MMU-writable is lost,
no host A/D at zap) or v6.12 (flush on lost A/D too, A/D reported through
``pt_ad_out``).  WARN_ON_ONCE sites are counted in ``a.warn``; PtArena's
Python wrappers turn them into warnings.  KVMMMU_DEBUG builds also check each
store MMU_WARN_ON-style (``a.debug_warn``).

Contract: every writer requires mmu_lock held for write; readers
(``_get_spte_lockless``) may run on other threads at the same time.  The
reader itself is ``cdef inline`` in mmu_spte.pxd (the body of every batch
read; see the note there); the writers are here.  The
access log (``a.log``, PtArena.start_access_log) records each half-access
and barrier in program order, so tests can check the orderings.
"""
from libc.stdint cimport uint32_t, int32_t, uint64_t, int64_t

from kvmmmu._core.types cimport sptep_t
from kvmmmu._core.spte cimport (
    spte_fmt_t, is_shadow_present_pte, is_writable_pte, spte_ad_enabled, spte_to_pfn,
    is_mmu_writable_spte, is_access_track_spte, is_ept_ve_possible,
)
from kvmmmu._core.pt_arena_defs cimport (
    KVMMMU_DEBUG, PT_ROLE_LEVEL_MASK, KVM_NR_PAGE_SIZES, kvm_mmu_page, pt_smp_wmb, pt_smp_rmb,
    pt_read_once64, pt_write_once64, pt_xchg64, pt_read_low, pt_read_high, pt_write_low,
    pt_write_high, pt_xchg_low, pt_read_once_s32, pt_write_once_s32, PT_PAGE_SPT, PT_ERA_V6_18,
    PT_ERA_V6_12, PT_AD_ACCESSED, PT_AD_DIRTY, PT_WARN_SET_PRESENT, PT_WARN_UPDATE_NONPRESENT,
    PT_WARN_WRITABLE_INVARIANT, PT_WARN_UPDATE_PFN, PT_WARN_EPT_VE, PT_WARN_BAD_LEVEL,
    PT_DBG_WRITE_NOT_LIVE, PT_DBG_WRONG_LEVEL, PT_EV_WRITE64, PT_EV_XCHG64, PT_EV_READ64,
    PT_EV_WRITE_LOW, PT_EV_WRITE_HIGH, PT_EV_XCHG_LOW, PT_EV_READ_LOW, PT_EV_READ_HIGH, PT_EV_WMB,
    PT_EV_RMB, PT_EV_READ_COUNT, PT_EV_INC_COUNT, pt_slot_meta, pt_ad_out, pt_arena_t,
    pt_table_index, pt_sptep_ptr, pt_slot, pt_sp_ptr, sptep_to_sp,
)


# ---------------------------------------------------------------------------
# The low-level SPTE writers (the reader, __get_spte_lockless, is inline in
# mmu_spte.pxd).
# ---------------------------------------------------------------------------

cdef inline void _prove_ve(pt_arena_t *a, uint64_t spte) noexcept nogil:
    if a.prove_mmu and is_ept_ve_possible(&a.fmt, spte):
        a.warn[PT_WARN_EPT_VE] += 1

cdef void count_spte_clear(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil:
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

cdef void _set_spte(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil:
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

cdef void _update_clear_spte_fast(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil:
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

cdef uint64_t _update_clear_spte_slow(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil:
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

# ---------------------------------------------------------------------------
# The MMU-level helpers (mmu.c), for the kernel era chosen per arena.
# ---------------------------------------------------------------------------

cdef bint spte_has_volatile_bits_v6_12(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """v5.18..v6.12 spte_has_volatile_bits (caller checked presence)."""
    if (not is_writable_pte(spte)) and is_mmu_writable_spte(f, spte):
        return True
    if is_access_track_spte(f, spte):
        return True
    if spte_ad_enabled(spte):
        if (spte & f.accessed_mask) == 0 or (is_writable_pte(spte) and (spte & f.dirty_mask) == 0):
            return True
    return False

cdef void kvm_update_page_stats(pt_arena_t *a, int level, int64_t count) noexcept nogil:
    if 1 <= level <= KVM_NR_PAGE_SIZES:
        a.pages[level - 1] += count
    else:
        a.warn[PT_WARN_BAD_LEVEL] += 1

# The helpers read the old value with one 64-bit load where a 32-bit kernel
# does a plain (two-instruction) `*sptep`: only mmu_lock holders change the
# high half, so both see the same value.  Like the kernel (WRITE_ONCE), a
# new table is published by a plain store of the link: on x86 (TSO) its
# contents are visible first; the model is x86-only (pt_arena_defs.h).

cdef void mmu_spte_set(pt_arena_t *a, sptep_t sptep, uint64_t new_spte) noexcept nogil:
    """Non-present -> present (or -> MMIO).  WARNs if the old value is present."""
    if is_shadow_present_pte(pt_read_once64(pt_sptep_ptr(a, sptep))):
        a.warn[PT_WARN_SET_PRESENT] += 1
    _set_spte(a, sptep, new_spte)

cdef bint mmu_spte_update(pt_arena_t *a, sptep_t sptep, uint64_t new_spte,
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

cdef uint64_t mmu_spte_clear_track_bits(pt_arena_t *a, sptep_t sptep,
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

cdef void mmu_spte_clear_no_track(pt_arena_t *a, sptep_t sptep) noexcept nogil:
    """Clear an upper-level or MMIO SPTE; nothing to track (32-bit: still counted)."""
    _update_clear_spte_fast(a, sptep, a.fmt.nonpresent_value)
