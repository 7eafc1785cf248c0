"""The records of the TDP MMU's tracepoints (the helpers and the list of
events are in ``tdp_trace.pxd``): built out of line, so that a call site in
``tdp_mmu.pyx`` costs its switch test when the event is off, and pushed onto
the calling thread's trace buffer, which :func:`tdp_trace_flush` (called by
every ``TdpMmuCore`` method on its way out, under the GIL) hands to
:mod:`kvmmmu.mmutrace`.

Thread-safety: the buffer is thread-local (``__thread``); a thread only
ever touches its own, and drains it itself.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

from kvmmmu._core.types cimport sptep_t
from kvmmmu._core.pt_arena_defs cimport pt_arena_t, kvm_mmu_page, pt_sp_ptr
from kvmmmu._core.spte cimport (
    spte_fmt_t, PG_LEVEL_4K, SPTE_LEVEL_BITS, ACC_ALL, PT_PRESENT_MASK,
    is_executable_pte, is_mmio_spte, get_mmio_spte_generation,
)
from kvmmmu._core.tdp_iter cimport (tdp_iter, tdp_iter_start, tdp_iter_next, kvm_tdp_mmu_read_spte,
    kvm_gfn_root_bits)
from kvmmmu._core.trace_buf cimport (
    trace_buf_t, trace_on, trace_push, trace_drain,
    TP_KVM_MMU_SET_SPTE, TP_KVM_MMU_SPTE_REQUESTED, TP_KVM_TDP_MMU_SPTE_CHANGED,
    TP_KVM_MMU_SPLIT_HUGE_PAGE, TP_FAST_PAGE_FAULT, TP_MARK_MMIO_SPTE, TP_KVM_MMU_GET_PAGE,
)

cdef extern from *:
    int __builtin_ctzll(unsigned long long x) nogil

cdef extern from *:
    """
    #include "trace_buf_defs.h"
    /* zero-initialised: an empty buffer that owns no memory (trace_buf_init) */
    static __thread trace_buf_t kvmmmu_tdp_trace_buf;
    """
    trace_buf_t kvmmmu_tdp_trace_buf

cdef enum:
    _PFN_NOSLOT_SHIFT = 63          # KVM_PFN_NOSLOT = 1 << 63 (include/linux/kvm_host.h)
    _PFERR_PRESENT = 1 << 0
    _PFERR_WRITE = 1 << 1
    _PFERR_FETCH = 1 << 4


cdef int tdp_trace_flush() except -1:
    """Hand this thread's records to mmutrace; a no-op, with no Python code
    run, when there are none."""
    if kvmmmu_tdp_trace_buf.n or kvmmmu_tdp_trace_buf.dropped:
        trace_drain(&kvmmmu_tdp_trace_buf)
    return 0


cdef uint64_t tdp_trace_pending() noexcept nogil:
    return kvmmmu_tdp_trace_buf.n


def pending():
    """Records waiting in the calling thread's buffer (0 between methods)."""
    return tdp_trace_pending()


cdef inline void _rec(int event, int n, uint64_t v0, uint64_t v1, uint64_t v2, uint64_t v3,
                      uint64_t v4, uint64_t v5, uint64_t v6) noexcept nogil:
    cdef uint64_t v[7]
    v[0] = v0
    v[1] = v1
    v[2] = v2
    v[3] = v3
    v[4] = v4
    v[5] = v5
    v[6] = v6
    trace_push(&kvmmmu_tdp_trace_buf, event, n, v)  # -1 (no memory) is counted as dropped


cdef void tdp_trace_rec_spte_changed(int as_id, uint64_t gfn, int level, uint64_t old_spte,
                                     uint64_t new_spte) noexcept nogil:
    _rec(TP_KVM_TDP_MMU_SPTE_CHANGED, 5, gfn, old_spte, new_spte, <uint8_t>level, <uint8_t>as_id,
         0, 0)


cdef void tdp_trace_rec_masked_clear(pt_arena_t *a, uint64_t root, uint64_t gfn,
                                     uint64_t cleared, uint64_t dbit) noexcept nogil:
    """The walk again over the 4K leaves the masked clear changed, in gfn
    order (the order the loop changed them)."""
    cdef tdp_iter it
    cdef uint64_t bit
    tdp_iter_start(&it, a, root, PG_LEVEL_4K, gfn + <uint64_t>__builtin_ctzll(cleared), kvm_gfn_root_bits(a, root))
    while it.valid and it.gfn < gfn + 64 and cleared:
        if it.level == PG_LEVEL_4K:
            bit = (<uint64_t>1) << (it.gfn - gfn)
            if cleared & bit:
                cleared &= ~bit
                tdp_trace_rec_spte_changed(it.as_id, it.gfn, it.level, it.old_spte | dbit,
                                           it.old_spte)
        tdp_iter_next(&it, a)


cdef void tdp_trace_rec_sp(pt_arena_t *a, uint64_t sp, int event) noexcept nogil:
    """KVM_MMU_PAGE_ASSIGN(sp) (+ created = true for kvm_mmu_get_page); the
    kernel's sp->root_count shares a union with tdp_mmu_root_count."""
    cdef kvm_mmu_page *h = pt_sp_ptr(a, sp)
    _rec(event, 6 if event == TP_KVM_MMU_GET_PAGE else 5, h.mmu_valid_gen, h.gfn, h.role,
         <uint32_t>(h.tdp_mmu_root_count if h.tdp_mmu_page else h.root_count), h.unsync != 0,
         1, 0)


cdef void tdp_trace_rec_spte_requested(uint64_t gfn, uint64_t pfn, int goal_level,
                                       bint noslot) noexcept nogil:
    """The pfn of the gfn itself: the goal-aligned pfn plus the gfn's offset
    in the goal page (KVM_PFN_NOSLOT plus that offset without a memslot)."""
    if noslot:
        pfn = (<uint64_t>1) << _PFN_NOSLOT_SHIFT
    _rec(TP_KVM_MMU_SPTE_REQUESTED, 3, gfn,
         pfn | (gfn & (((<uint64_t>1) << ((goal_level - 1) * SPTE_LEVEL_BITS)) - 1)),
         <uint8_t>goal_level, 0, 0, 0, 0)


cdef void tdp_trace_rec_split_huge_page(uint64_t gfn, uint64_t huge_spte, int level,
                                        int ret) noexcept nogil:
    _rec(TP_KVM_MMU_SPLIT_HUGE_PAGE, 4, gfn, huge_spte, <uint64_t><int64_t>level,
         <uint64_t><int64_t>ret, 0, 0, 0)


cdef void tdp_trace_rec_map_target(pt_arena_t *a, const spte_fmt_t *f, sptep_t sptep,
                                   uint64_t gfn, int level, uint64_t new_spte) noexcept nogil:
    """mark_mmio_spte: access = spte & ACC_ALL (the raw low bits, as the
    kernel's TP_fast_assign takes them), gen = the SPTE's MMIO generation.
    kvm_mmu_set_spte: the SPTE read back at sptep; r = shadow_present_mask
    || spte & PT_PRESENT_MASK, x = is_executable_pte, u = -1 without a
    shadow_user_mask."""
    cdef uint64_t spte
    if is_mmio_spte(f, new_spte):
        if trace_on(TP_MARK_MMIO_SPTE):
            _rec(TP_MARK_MMIO_SPTE, 4, sptep, gfn, <uint32_t>(new_spte & ACC_ALL),
                 <uint32_t>get_mmio_spte_generation(new_spte), 0, 0, 0)
    elif trace_on(TP_KVM_MMU_SET_SPTE):
        spte = kvm_tdp_mmu_read_spte(a, sptep)
        _rec(TP_KVM_MMU_SET_SPTE, 7, gfn, spte, sptep, <uint8_t>level,
             f.present_mask != 0 or (spte & PT_PRESENT_MASK) != 0, is_executable_pte(f, spte),
             <uint64_t><int64_t>((1 if spte & f.user_mask else 0) if f.user_mask else -1))


cdef void tdp_trace_rec_fast_page_fault(pt_arena_t *a, const spte_fmt_t *f, uint64_t root,
                                        uint64_t gfn, bint write, bint exec, int ret,
                                        uint64_t spte, int vcpu_id, uint64_t addr,
                                        uint64_t error_code, bint have_error_code) noexcept nogil:
    """Not emitted when page_fault_can_be_fast refused the fault, judged as
    the model's fast path does, on the SPTE the walk ends at: an MMIO SPTE
    is a reserved-bit fault (never fast); otherwise the fault is "present"
    when that SPTE grants the CPU any access, and may be fast if it is a
    write (present) or if KVM runs without A/D bits (not present).

    sptep: the last entry on the gfn's path (walked again: the model's fast
    path does not hand it out); old: `spte`; new: that entry's value now.
    error_code, unless the caller passed the VM exit's: PFERR_PRESENT as
    judged above, PFERR_WRITE / PFERR_FETCH for a write / a fetch."""
    cdef tdp_iter it
    cdef sptep_t sptep = 0
    cdef bint present
    if is_mmio_spte(f, spte):
        return
    present = (spte & (7 if f.is_ept else PT_PRESENT_MASK)) != 0
    if not (write if present else not f.ad_enabled):
        return
    tdp_iter_start(&it, a, root, PG_LEVEL_4K, gfn, kvm_gfn_root_bits(a, root))
    while it.valid and it.gfn <= gfn:
        sptep = it.sptep
        tdp_iter_next(&it, a)
    if not have_error_code:
        error_code = ((_PFERR_PRESENT if present else 0) | (_PFERR_WRITE if write else 0) |
                      (_PFERR_FETCH if exec else 0))
    _rec(TP_FAST_PAGE_FAULT, 7, <uint64_t><int64_t>vcpu_id, addr, error_code, sptep, spte,
         kvm_tdp_mmu_read_spte(a, sptep) if sptep else 0, <uint64_t><int64_t>ret)
