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
# The helpers below are what a call site of tdp_mmu.pyx calls (one line
# each).  Zero cost when off: a helper tests the event's switch (trace_on: a
# byte load, marked unlikely) and does nothing else; the record is built by
# an out-of-line function of tdp_trace.pyx (so the hot path around a call
# site keeps its size and the compiler keeps inlining it).
#
# Where records go: the calling thread's buffer (a thread-local trace_buf_t
# in tdp_trace.pyx), so the C paths need no extra argument and two threads
# never share a buffer.  TdpMmuCore drains it to mmutrace when a method ends
# (tdp_trace_flush, under the GIL).  Records pushed by C code running
# outside a TdpMmuCore method wait for that thread's next method.
#
# Values are pushed in the event's field order (kvmmmu.mmutrace); signed
# fields as the two's complement u64 of the value (mmutrace sign-extends);
# fields the kernel stores in narrower types are truncated as its
# TP_fast_assign would.
from libc.stdint cimport uint64_t
from libc.stddef cimport size_t

from kvmmmu._core.types cimport sptep_t
from kvmmmu._core.pt_arena_defs cimport pt_arena_t
from kvmmmu._core.spte cimport spte_fmt_t
from kvmmmu._core.tdp_iter cimport tdp_iter
from kvmmmu._core.trace_buf cimport (
    trace_on, tp_on,
    TP_KVM_MMU_GET_PAGE, TP_KVM_MMU_PREPARE_ZAP_PAGE, TP_KVM_MMU_SET_SPTE,
    TP_KVM_MMU_SPTE_REQUESTED, TP_KVM_TDP_MMU_SPTE_CHANGED, TP_KVM_MMU_SPLIT_HUGE_PAGE,
    TP_FAST_PAGE_FAULT, TP_MARK_MMIO_SPTE,
)

cdef extern from *:
    """
    #include <string.h>
    #include "trace_buf_defs.h"
    #define kvmmmu_tdp_unlikely(x) __builtin_expect(!!(x), 0)
    /* mark_mmio_spte and kvm_mmu_set_spte as bytes of the little-endian
       switch word tp_on[8..15]: one load tests both */
    _Static_assert(TP_KVM_MMU_SET_SPTE >= 8 && TP_KVM_MMU_SET_SPTE < 16 &&
                   TP_MARK_MMIO_SPTE >= 8 && TP_MARK_MMIO_SPTE < 16 &&
                   __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "tp_on word layout");
    #define KVMMMU_TDP_MAP_TARGET_EVENTS \
        ((0xffULL << (8 * (TP_KVM_MMU_SET_SPTE - 8))) | (0xffULL << (8 * (TP_MARK_MMIO_SPTE - 8))))
    """
    bint kvmmmu_tdp_unlikely(bint x) nogil
    void *memcpy(void *dst, const void *src, size_t n) nogil
    const uint64_t KVMMMU_TDP_MAP_TARGET_EVENTS


cdef inline bint tdp_trace_on_any8(uint64_t byte_mask) noexcept nogil:
    """Is any event with a byte in `byte_mask` of tp_on[8..15] on?"""
    cdef uint64_t w
    memcpy(&w, &tp_on[8], 8)
    return (w & byte_mask) != 0


# --- out of line (tdp_trace.pyx) ---------------------------------------------

cdef int tdp_trace_flush() except -1
cdef uint64_t tdp_trace_pending() noexcept nogil
cdef void tdp_trace_rec_spte_changed(int as_id, uint64_t gfn, int level, uint64_t old_spte,
                                     uint64_t new_spte) noexcept nogil
cdef void tdp_trace_rec_masked_clear(pt_arena_t *a, uint64_t root, uint64_t gfn,
                                     uint64_t cleared, uint64_t dbit) noexcept nogil
cdef void tdp_trace_rec_sp(pt_arena_t *a, uint64_t sp, int event) noexcept nogil
cdef void tdp_trace_rec_spte_requested(uint64_t gfn, uint64_t pfn, int goal_level,
                                       bint noslot) noexcept nogil
cdef void tdp_trace_rec_split_huge_page(uint64_t gfn, uint64_t huge_spte, int level,
                                        int ret) noexcept nogil
cdef void tdp_trace_rec_map_target(pt_arena_t *a, const spte_fmt_t *f, sptep_t sptep,
                                   uint64_t gfn, int level, uint64_t new_spte) noexcept nogil
cdef void tdp_trace_rec_fast_page_fault(pt_arena_t *a, const spte_fmt_t *f, uint64_t root,
                                        uint64_t gfn, bint write, bint exec, int ret,
                                        uint64_t spte, int vcpu_id, uint64_t addr,
                                        uint64_t error_code, bint have_error_code) noexcept nogil


# --- the call sites' helpers -------------------------------------------------

cdef inline void tdp_trace_spte_changed(int as_id, uint64_t gfn, int level, uint64_t old_spte,
                                        uint64_t new_spte) noexcept nogil:
    """trace_kvm_tdp_mmu_spte_changed(as_id, gfn, level, old_spte, new_spte)."""
    if kvmmmu_tdp_unlikely(trace_on(TP_KVM_TDP_MMU_SPTE_CHANGED)):
        tdp_trace_rec_spte_changed(as_id, gfn, level, old_spte, new_spte)


cdef inline bint tdp_trace_changed_on() noexcept nogil:
    """The kvm_tdp_mmu_spte_changed switch, for a tight loop to read once
    (into a register) and pass to tdp_trace_iter_changed."""
    return trace_on(TP_KVM_TDP_MMU_SPTE_CHANGED)


cdef inline bint tdp_trace_map_events_on() noexcept nogil:
    """Is any event a fresh leaf of the map path emits on (spte_requested,
    spte_changed, set_spte, mark_mmio_spte)?  The batch map's untraced
    shortcut for fresh leaves is taken only when none is."""
    return (trace_on(TP_KVM_MMU_SPTE_REQUESTED) or trace_on(TP_KVM_TDP_MMU_SPTE_CHANGED) or
            trace_on(TP_KVM_MMU_SET_SPTE) or trace_on(TP_MARK_MMIO_SPTE))


cdef inline void tdp_trace_iter_changed(bint on, const tdp_iter *it,
                                        uint64_t new_spte) noexcept nogil:
    """trace_kvm_tdp_mmu_spte_changed at an iterator whose old_spte was
    replaced, if `on` (tdp_trace_changed_on() read before the loop)."""
    if kvmmmu_tdp_unlikely(on):
        tdp_trace_rec_spte_changed(it.as_id, it.gfn, it.level, it.old_spte, new_spte)


cdef inline void tdp_trace_masked_clear(pt_arena_t *a, uint64_t root, uint64_t gfn,
                                        uint64_t cleared, uint64_t dbit) noexcept nogil:
    """After clear_dirty_pt_masked's loop over [gfn, gfn + 64): its
    trace_kvm_tdp_mmu_spte_changed for each 4K leaf whose `dbit` it cleared
    (bit i of `cleared`: gfn + i), old = the SPTE now | dbit, new = the SPTE
    now (the loop only ever clears dbit, with mmu_lock held for write).  The
    loop itself only ORs a bit into a register, so it costs nothing when off."""
    if kvmmmu_tdp_unlikely(cleared != 0 and trace_on(TP_KVM_TDP_MMU_SPTE_CHANGED)):
        tdp_trace_rec_masked_clear(a, root, gfn, cleared, dbit)


cdef inline void tdp_trace_get_page(pt_arena_t *a, uint64_t sp) noexcept nogil:
    """trace_kvm_mmu_get_page(sp, true), as tdp_mmu_init_sp emits it (the
    header already holds the role and gfn)."""
    if kvmmmu_tdp_unlikely(trace_on(TP_KVM_MMU_GET_PAGE)):
        tdp_trace_rec_sp(a, sp, TP_KVM_MMU_GET_PAGE)


cdef inline void tdp_trace_prepare_zap_page(pt_arena_t *a, uint64_t sp) noexcept nogil:
    """trace_kvm_mmu_prepare_zap_page(sp), first thing in handle_removed_pt."""
    if kvmmmu_tdp_unlikely(trace_on(TP_KVM_MMU_PREPARE_ZAP_PAGE)):
        tdp_trace_rec_sp(a, sp, TP_KVM_MMU_PREPARE_ZAP_PAGE)


cdef inline void tdp_trace_spte_requested(uint64_t gfn, uint64_t pfn, int goal_level,
                                          bint noslot) noexcept nogil:
    """trace_kvm_mmu_spte_requested(fault): `pfn` aligned to the goal level
    (KVM_PFN_NOSLOT printed for a fault without a memslot)."""
    if kvmmmu_tdp_unlikely(trace_on(TP_KVM_MMU_SPTE_REQUESTED)):
        tdp_trace_rec_spte_requested(gfn, pfn, goal_level, noslot)


cdef inline void tdp_trace_split_huge_page(uint64_t gfn, uint64_t huge_spte, int level,
                                           int ret) noexcept nogil:
    """trace_kvm_mmu_split_huge_page(gfn, huge_spte, level, ret)."""
    if kvmmmu_tdp_unlikely(trace_on(TP_KVM_MMU_SPLIT_HUGE_PAGE)):
        tdp_trace_rec_split_huge_page(gfn, huge_spte, level, ret)


cdef inline int tdp_trace_map_target(pt_arena_t *a, const spte_fmt_t *f, sptep_t sptep,
                                     uint64_t gfn, int level, uint64_t new_spte,
                                     int ret) noexcept nogil:
    """The end of tdp_mmu_map_handle_target_level once the SPTE is in place
    (set, or already equal): trace_mark_mmio_spte for an MMIO SPTE, else
    trace_kvm_mmu_set_spte, which reads the SPTE back from the table.
    Returns `ret` (so a return statement can trace on its way out)."""
    if kvmmmu_tdp_unlikely(tdp_trace_on_any8(KVMMMU_TDP_MAP_TARGET_EVENTS)):
        tdp_trace_rec_map_target(a, f, sptep, gfn, level, new_spte)
    return ret


cdef inline void tdp_trace_fast_page_fault(pt_arena_t *a, const spte_fmt_t *f, uint64_t root,
                                           uint64_t gfn, bint write, bint exec, int ret,
                                           uint64_t spte, int vcpu_id, uint64_t addr,
                                           uint64_t error_code, bint have_error_code) noexcept nogil:
    """trace_fast_page_fault(vcpu, fault, sptep, &spte, ret) after a TDP fast
    page fault returned `ret` with `spte` the last value it read (see
    tdp_trace.pyx for when it is emitted and what it prints)."""
    if kvmmmu_tdp_unlikely(trace_on(TP_FAST_PAGE_FAULT)):
        tdp_trace_rec_fast_page_fault(a, f, root, gfn, write, exec, ret, spte, vcpu_id, addr,
                                      error_code, have_error_code)
