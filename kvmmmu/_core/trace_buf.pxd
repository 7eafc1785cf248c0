# The trace-record contract of the core (see trace_buf_defs.h): any nogil loop
# of kvmmmu._core may record kvmmmu tracepoints without the GIL and without
# importing kvmmmu.mmutrace.
#
#   cdef trace_buf_t tb
#   trace_buf_init(&tb)
#   with nogil:
#       if trace_on(TP_KVM_MMU_SET_SPTE):
#           trace_push(&tb, TP_KVM_MMU_SET_SPTE, 4, v)
#   trace_drain(&tb)      # under the GIL: to mmutrace's sink; frees the records
#
# Invariants: a trace_buf_t is owned by one call of one thread; n <= cap <=
# TRACE_BUF_CAP; records are drained in push order; after trace_drain the
# buffer is empty and owns no memory, even when the sink raised.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef extern from "trace_buf_defs.h" nogil:
    enum:
        TP_KVM_MMU_PAGETABLE_WALK
        TP_KVM_MMU_PAGING_ELEMENT
        TP_KVM_MMU_SET_ACCESSED_BIT
        TP_KVM_MMU_SET_DIRTY_BIT
        TP_KVM_MMU_WALKER_ERROR
        TP_KVM_MMU_GET_PAGE
        TP_KVM_MMU_SYNC_PAGE
        TP_KVM_MMU_UNSYNC_PAGE
        TP_KVM_MMU_PREPARE_ZAP_PAGE
        TP_KVM_MMU_SET_SPTE
        TP_KVM_MMU_SPTE_REQUESTED
        TP_KVM_TDP_MMU_SPTE_CHANGED
        TP_KVM_MMU_SPLIT_HUGE_PAGE
        TP_FAST_PAGE_FAULT
        TP_MARK_MMIO_SPTE
        TP_HANDLE_MMIO_PAGE_FAULT
        TP_CHECK_MMIO_SPTE
        TP_KVM_MMU_ZAP_ALL_FAST
        TP_NR
        TRACE_NR_VALS
        TRACE_BUF_CAP

    ctypedef struct trace_rec_t:
        uint32_t event
        uint32_t nvals
        uint64_t v[8]

    ctypedef struct trace_buf_t:
        trace_rec_t *recs
        uint32_t n
        uint32_t cap
        uint64_t dropped

# The switches, one byte per event id; written only by set_enabled() (under
# the GIL, from mmutrace), read by nogil code.
cdef uint8_t tp_on[32]

cdef inline bint trace_on(int event) noexcept nogil:
    return tp_on[event] != 0

cdef void trace_buf_init(trace_buf_t *t) noexcept nogil
cdef int trace_push(trace_buf_t *t, int event, int nvals, const uint64_t *v) noexcept nogil
cdef int trace_drain(trace_buf_t *t) except -1
