# The TDP MMU's kvmmmu tracepoints, recorded from its nogil C paths
# (tdp_mmu.pyx) in the kernel's order and with the kernel's values:
#
#   kvm_mmu_spte_requested     kvm_tdp_mmu_map, once the goal level is known
#   kvm_mmu_get_page           tdp_mmu_init_sp: every new table (always "new")
#   kvm_tdp_mmu_spte_changed   handle_changed_spte (old != new), aging, and
#                              the masked clear of KVM_CLEAR_DIRTY_LOG
#   kvm_mmu_prepare_zap_page   handle_removed_pt, before its entries go
#   kvm_mmu_split_huge_page    tdp_mmu_split_huge_page, after the link
#                              (errno 0 or -EBUSY)
#   kvm_mmu_set_spte           tdp_mmu_map_handle_target_level: the leaf
#   mark_mmio_spte               ... or the MMIO SPTE it installed
#   fast_page_fault            mmu.c's fast_page_fault over a TDP root, once
#                              page_fault_can_be_fast let it walk
#
# Where records go: the calling thread's buffer (kvmmmu_tdp_trace_buf, a
# thread-local trace_buf_t), so the C paths need no extra argument and two
# threads never share a buffer.  TdpMmuCore drains it to mmutrace when a
# method ends (tdp_trace_flush, under the GIL).  Code running outside a
# TdpMmuCore method may push records too; the next method of that thread
# drains them.
#
# Zero cost when off: each helper first tests the event's switch
# (trace_on: one byte load); nothing else runs unless the event is on.
#
# Values are pushed in the event's field order (kvmmmu.mmutrace); signed
# fields as the two's complement u64 of the value (mmutrace sign-extends);
# fields the kernel stores in narrower types are truncated as its
# TP_fast_assign would.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

from kvmmmu._core.types cimport sptep_t
from kvmmmu._core.pt_arena_defs cimport pt_arena_t, kvm_mmu_page, pt_sp_ptr, pt_sptep_ptr
from kvmmmu._core.spte cimport (
    spte_fmt_t, PG_LEVEL_4K, SPTE_LEVEL_BITS, ACC_ALL, PT_PRESENT_MASK,
    is_executable_pte, is_mmio_spte, get_mmio_spte_generation,
)
from kvmmmu._core.tdp_iter cimport tdp_iter, tdp_iter_start, tdp_iter_next, kvm_tdp_mmu_read_spte
from kvmmmu._core.trace_buf cimport (
    trace_buf_t, trace_on, trace_push, trace_drain,
    TP_KVM_MMU_GET_PAGE, TP_KVM_MMU_PREPARE_ZAP_PAGE, TP_KVM_MMU_SET_SPTE,
    TP_KVM_MMU_SPTE_REQUESTED, TP_KVM_TDP_MMU_SPTE_CHANGED, TP_KVM_MMU_SPLIT_HUGE_PAGE,
    TP_FAST_PAGE_FAULT, TP_MARK_MMIO_SPTE,
)

cdef extern from *:
    """
    #include "trace_buf_defs.h"
    /* zero-initialised: an empty buffer that owns no memory (trace_buf_init) */
    static __thread trace_buf_t kvmmmu_tdp_trace_buf;
    """
    trace_buf_t kvmmmu_tdp_trace_buf

# KVM_PFN_NOSLOT: the pfn of a fault without a memslot (include/linux/kvm_host.h)
cdef enum:
    TDP_TRACE_PFN_NOSLOT_SHIFT = 63
    _TDP_PFERR_PRESENT = 1 << 0
    _TDP_PFERR_WRITE = 1 << 1
    _TDP_PFERR_FETCH = 1 << 4


cdef inline int tdp_trace_flush() except -1:
    """Hand this thread's records to mmutrace (under the GIL); a no-op, with
    no Python code run, when there are none."""
    if kvmmmu_tdp_trace_buf.n or kvmmmu_tdp_trace_buf.dropped:
        trace_drain(&kvmmmu_tdp_trace_buf)
    return 0


cdef inline uint64_t tdp_trace_pending() noexcept nogil:
    """Records waiting in this thread's buffer (tests and asserts)."""
    return kvmmmu_tdp_trace_buf.n


# --- handle_changed_spte, aging, KVM_CLEAR_DIRTY_LOG ------------------------

cdef inline void tdp_trace_spte_changed(int as_id, uint64_t gfn, int level, uint64_t old_spte,
                                        uint64_t new_spte) noexcept nogil:
    """trace_kvm_tdp_mmu_spte_changed(as_id, gfn, level, old_spte, new_spte)."""
    cdef uint64_t v[5]
    if trace_on(TP_KVM_TDP_MMU_SPTE_CHANGED):
        v[0] = gfn
        v[1] = old_spte
        v[2] = new_spte
        v[3] = <uint8_t>level
        v[4] = <uint8_t>as_id
        trace_push(&kvmmmu_tdp_trace_buf, TP_KVM_TDP_MMU_SPTE_CHANGED, 5, v)


cdef inline void tdp_trace_iter_changed(const tdp_iter *it, uint64_t new_spte) noexcept nogil:
    """trace_kvm_tdp_mmu_spte_changed at an iterator whose old_spte was replaced."""
    tdp_trace_spte_changed(it.as_id, it.gfn, it.level, it.old_spte, new_spte)


# --- shadow-page events (KVM_MMU_PAGE_ASSIGN) -------------------------------

cdef inline void _tdp_trace_sp(pt_arena_t *a, uint64_t sp, int event, int nvals) noexcept nogil:
    # The kernel's sp->root_count shares a union with tdp_mmu_root_count.
    cdef kvm_mmu_page *h = pt_sp_ptr(a, sp)
    cdef uint64_t v[6]
    v[0] = h.mmu_valid_gen
    v[1] = h.gfn
    v[2] = h.role
    v[3] = <uint32_t>(h.tdp_mmu_root_count if h.tdp_mmu_page else h.root_count)
    v[4] = h.unsync != 0
    v[5] = 1                                    # kvm_mmu_get_page: created
    trace_push(&kvmmmu_tdp_trace_buf, event, nvals, v)


cdef inline void tdp_trace_get_page(pt_arena_t *a, uint64_t sp) noexcept nogil:
    """trace_kvm_mmu_get_page(sp, true), as tdp_mmu_init_sp emits it (the
    header already holds the role and gfn)."""
    if trace_on(TP_KVM_MMU_GET_PAGE):
        _tdp_trace_sp(a, sp, TP_KVM_MMU_GET_PAGE, 6)


cdef inline void tdp_trace_prepare_zap_page(pt_arena_t *a, uint64_t sp) noexcept nogil:
    """trace_kvm_mmu_prepare_zap_page(sp), first thing in handle_removed_pt."""
    if trace_on(TP_KVM_MMU_PREPARE_ZAP_PAGE):
        _tdp_trace_sp(a, sp, TP_KVM_MMU_PREPARE_ZAP_PAGE, 5)


# --- the fault path ----------------------------------------------------------

cdef inline void tdp_trace_spte_requested(uint64_t gfn, uint64_t pfn, int goal_level,
                                          bint noslot) noexcept nogil:
    """trace_kvm_mmu_spte_requested(fault): the pfn of the gfn itself (the
    goal-aligned pfn plus the gfn's offset in the goal page); KVM_PFN_NOSLOT
    for a fault without a memslot."""
    cdef uint64_t v[3]
    if trace_on(TP_KVM_MMU_SPTE_REQUESTED):
        if noslot:
            pfn = (<uint64_t>1) << TDP_TRACE_PFN_NOSLOT_SHIFT
        v[0] = gfn
        v[1] = pfn | (gfn & (((<uint64_t>1) << ((goal_level - 1) * SPTE_LEVEL_BITS)) - 1))
        v[2] = <uint8_t>goal_level
        trace_push(&kvmmmu_tdp_trace_buf, TP_KVM_MMU_SPTE_REQUESTED, 3, v)


cdef inline void tdp_trace_split_huge_page(uint64_t gfn, uint64_t huge_spte, int level,
                                           int ret) noexcept nogil:
    """trace_kvm_mmu_split_huge_page(gfn, huge_spte, level, ret)."""
    cdef uint64_t v[4]
    if trace_on(TP_KVM_MMU_SPLIT_HUGE_PAGE):
        v[0] = gfn
        v[1] = huge_spte
        v[2] = <uint64_t><int64_t>level
        v[3] = <uint64_t><int64_t>ret
        trace_push(&kvmmmu_tdp_trace_buf, TP_KVM_MMU_SPLIT_HUGE_PAGE, 4, v)


cdef inline int tdp_trace_map_target(pt_arena_t *a, const spte_fmt_t *f, sptep_t sptep,
                                     uint64_t gfn, int level, uint64_t new_spte,
                                     int ret) noexcept nogil:
    """The end of tdp_mmu_map_handle_target_level once the SPTE is in place
    (set, or already equal): trace_mark_mmio_spte for an MMIO SPTE, else
    trace_kvm_mmu_set_spte, which reads the SPTE back from the table.
    Returns `ret` (so a return statement can trace on its way out)."""
    cdef uint64_t v[7]
    cdef uint64_t spte
    if not (trace_on(TP_MARK_MMIO_SPTE) or trace_on(TP_KVM_MMU_SET_SPTE)):
        return ret
    if is_mmio_spte(f, new_spte):
        if trace_on(TP_MARK_MMIO_SPTE):
            v[0] = sptep
            v[1] = gfn
            v[2] = <uint32_t>(new_spte & ACC_ALL)
            v[3] = <uint32_t>get_mmio_spte_generation(new_spte)
            trace_push(&kvmmmu_tdp_trace_buf, TP_MARK_MMIO_SPTE, 4, v)
    elif trace_on(TP_KVM_MMU_SET_SPTE):
        spte = kvm_tdp_mmu_read_spte(a, sptep)
        v[0] = gfn
        v[1] = spte
        v[2] = sptep
        v[3] = <uint8_t>level
        v[4] = f.present_mask != 0 or (spte & PT_PRESENT_MASK) != 0
        v[5] = is_executable_pte(f, spte)
        v[6] = <uint64_t><int64_t>((1 if spte & f.user_mask else 0) if f.user_mask else -1)
        trace_push(&kvmmmu_tdp_trace_buf, TP_KVM_MMU_SET_SPTE, 7, v)
    return ret


# --- fast_page_fault (mmu.c) -------------------------------------------------

cdef inline void tdp_trace_fast_page_fault(pt_arena_t *a, const spte_fmt_t *f, uint64_t root,
                                           uint64_t gfn, bint write, bint exec, int ret,
                                           uint64_t spte, int vcpu_id, uint64_t addr,
                                           uint64_t error_code, bint have_error_code) noexcept nogil:
    """trace_fast_page_fault(vcpu, fault, sptep, &spte, ret) after a TDP fast
    page fault returned `ret` with `spte` the last value it read.

    Not emitted when page_fault_can_be_fast refused the fault, judged as
    the model's fast path does, on the SPTE the walk ends at: an MMIO SPTE
    is a reserved-bit fault (never fast); otherwise the fault is "present"
    when that SPTE grants the CPU any access, and may be fast if it is a
    write (present) or if KVM runs without A/D bits (not present).

    sptep: the last entry on the gfn's path (walked again: the model's fast
    path does not hand it out); new: that entry's value now.  error_code,
    unless the caller passed the VM exit's: PFERR_PRESENT as judged above,
    PFERR_WRITE / PFERR_FETCH for a write / fetch."""
    cdef tdp_iter it
    cdef sptep_t sptep = 0
    cdef uint64_t v[7]
    cdef bint present
    if not trace_on(TP_FAST_PAGE_FAULT) or is_mmio_spte(f, spte):
        return
    present = (spte & (7 if f.is_ept else PT_PRESENT_MASK)) != 0
    if not (write if present else not f.ad_enabled):
        return
    tdp_iter_start(&it, a, root, PG_LEVEL_4K, gfn, 0)
    while it.valid and it.gfn <= gfn:
        sptep = it.sptep
        tdp_iter_next(&it, a)
    if not have_error_code:
        error_code = ((_TDP_PFERR_PRESENT if present else 0) | (_TDP_PFERR_WRITE if write else 0) |
                      (_TDP_PFERR_FETCH if exec else 0))
    v[0] = <uint64_t><int64_t>vcpu_id
    v[1] = addr
    v[2] = error_code
    v[3] = sptep
    v[4] = spte
    v[5] = kvm_tdp_mmu_read_spte(a, sptep) if sptep else 0
    v[6] = <uint64_t><int64_t>ret
    trace_push(&kvmmmu_tdp_trace_buf, TP_FAST_PAGE_FAULT, 7, v)
