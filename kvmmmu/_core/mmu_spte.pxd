# The shadow MMU's SPTE writers and the split-SPTE protocol (mmu_spte.pyx):
# mmu.c's __set_spte / __update_clear_spte_fast / __update_clear_spte_slow /
# __get_spte_lockless and the mmu_spte_* helpers built on them.  Other Cython
# modules do
#
#     from kvmmmu._core.mmu_spte cimport mmu_spte_set, mmu_spte_get_lockless
#
# and call them on `&arena.a` inside `with nogil:` (pt_arena.pxd re-exports
# them for older consumers).
#
# Concurrency contract (the kernel's): every writer below requires mmu_lock
# held for write (one writer at a time; callers serialize that).  Only
# _get_spte_lockless / mmu_spte_get_lockless / _get_spte_naive_split may run
# concurrently with a writer, between walk_shadow_page_lockless_begin/end
# (mmu_lockless.pxd).
from libc.stdint cimport uint32_t, int32_t, uint64_t, int64_t

from kvmmmu._core.types cimport sptep_t
from kvmmmu._core.spte cimport (
    spte_fmt_t, is_writable_pte, spte_ad_enabled, is_access_track_spte, spte_needs_atomic_update,
)
from kvmmmu._core.pt_arena_defs cimport (
    PT_ERA_V6_12, PT_EV_READ64, PT_EV_READ_LOW, PT_EV_READ_HIGH, PT_EV_RMB, PT_EV_READ_COUNT,
    kvm_mmu_page, pt_ad_out, pt_arena_t, pt_sptep_ptr, sptep_to_sp, pt_smp_rmb, pt_read_once64,
    pt_read_low, pt_read_high, pt_read_once_s32,
)


# -- The four low-level accessors ---------------------------------------------
# 64-bit hosts: one 64-bit access each.  32-bit hosts (CONFIG_X86_32 PAE):
# union split_spte, spte_low at the lower address holding every bit that
# decides presence; see mmu_spte.pyx for the ordering of each.

# __set_spte: install a value over a non-present SPTE.
cdef void _set_spte(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil
# __update_clear_spte_fast: replace an SPTE nobody else can change.
cdef void _update_clear_spte_fast(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil
# __update_clear_spte_slow: replace an SPTE the CPU or a lockless writer may
# change meanwhile; returns the value actually replaced.
cdef uint64_t _update_clear_spte_slow(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil
# count_spte_clear: 32-bit, after a non-present value was written, bump the
# page's clear_spte_count so lockless readers retry.
cdef void count_spte_clear(pt_arena_t *a, sptep_t sptep, uint64_t spte) noexcept nogil


# -- The lockless reader (inline) ----------------------------------------------
# Kept inline on purpose, unlike the writers: it is the per-element body of
# the nogil batch reads (PtArena.get_sptes_lockless, the torture readers and,
# later, every lockless walk).  Out of line it cost +10% per batch-read
# element (2.94 -> 3.25 ns, 64-bit host) and -40% torture read throughput
# (600 -> 350 M reads/s).  _log (the access log of PtArena.start_access_log,
# one NULL test when off) stays inline with it: an out-of-line append made a
# 4-SPTE nogil walk 5.8 -> 6.7 ns (64-bit) and 16 -> 20 ns (32-bit).

cdef inline void _log(pt_arena_t *a, uint64_t ev, uint64_t val) noexcept nogil:
    # Pointer and length are read once: a reader on another thread may log
    # at the same time (the log is for one thread, but must never overflow).
    cdef uint64_t *log = a.log
    cdef uint64_t n = a.log_len
    if log != NULL and n < a.log_cap:
        log[2 * n] = ev
        log[2 * n + 1] = val
        a.log_len = n + 1

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


# -- Predicates of the kernel era chosen per arena -----------------------------

# v5.18..v6.12 spte_has_volatile_bits (caller checked presence).
cdef bint spte_has_volatile_bits_v6_12(const spte_fmt_t *f, uint64_t spte) noexcept nogil

cdef inline bint is_accessed_spte_v6_12(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """Pre-v6.13 is_accessed_spte: the A bit if A/D enabled, else not access-tracked."""
    return ((spte & f.accessed_mask) != 0 if spte_ad_enabled(spte)
            else not is_access_track_spte(f, spte))

cdef inline bint is_dirty_spte_v6_12(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """Pre-v6.13 is_dirty_spte: the D bit if A/D enabled, else W."""
    return (spte & f.dirty_mask) != 0 if spte_ad_enabled(spte) else is_writable_pte(spte)

cdef inline bint _needs_atomic_update(const pt_arena_t *a, uint64_t spte) noexcept nogil:
    """Must the old value be replaced with xchg (bits others may set)?"""
    return (spte_has_volatile_bits_v6_12(&a.fmt, spte) if a.era == PT_ERA_V6_12
            else spte_needs_atomic_update(&a.fmt, spte))

cdef inline bint _spte_writable_invariants_ok(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """check_spte_writable_invariants: MMU-writable => Host-writable, W => MMU-writable."""
    return ((spte & f.host_writable_mask) != 0 if spte & f.mmu_writable_mask
            else not is_writable_pte(spte))


# -- The MMU-level helpers (mmu.c) ---------------------------------------------

# kvm->stat.pages[level - 1] += count (a level outside 4K..1G counts a WARN).
cdef void kvm_update_page_stats(pt_arena_t *a, int level, int64_t count) noexcept nogil
# Non-present -> present (or -> MMIO); WARNs if the old value is present.
cdef void mmu_spte_set(pt_arena_t *a, sptep_t sptep, uint64_t new_spte) noexcept nogil
# Change the state bits of a present SPTE (same PFN); returns "flush".  v6.12
# reports lost A/D in `ad` (may be NULL).
cdef bint mmu_spte_update(pt_arena_t *a, sptep_t sptep, uint64_t new_spte,
                          pt_ad_out *ad) noexcept nogil
# Zap a leaf SPTE, returning the old one; page stats drop if it was present;
# v6.12 reports its A/D in `ad` (may be NULL).
cdef uint64_t mmu_spte_clear_track_bits(pt_arena_t *a, sptep_t sptep, pt_ad_out *ad) noexcept nogil
# Clear an upper-level or MMIO SPTE; nothing to track (32-bit: still counted).
cdef void mmu_spte_clear_no_track(pt_arena_t *a, sptep_t sptep) noexcept nogil

cdef inline uint64_t mmu_spte_get_lockless(pt_arena_t *a, sptep_t sptep) noexcept nogil:
    return _get_spte_lockless(a, sptep, NULL)
