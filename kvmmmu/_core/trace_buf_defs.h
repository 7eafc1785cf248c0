/*
 * kvmmmu: trace records from nogil code (the C side of kvmmmu.mmutrace).
 *
 * A loop of the core that may emit kvmmmu tracepoints owns a trace_buf_t for
 * the length of one call (so two threads never share one), tests the event's
 * switch with trace_on(), appends fixed-width records with trace_push(), and,
 * back under the GIL, hands the buffer to trace_drain(), which passes the
 * records to the sink mmutrace registered and empties the buffer.
 *
 * Event ids are the kvmmmu event ids of kvmmmu.mmutrace (the order of its
 * EVENTS); mmutrace checks at import that the names agree.
 */
#ifndef KVMMMU_TRACE_BUF_DEFS_H
#define KVMMMU_TRACE_BUF_DEFS_H

#include <stdint.h>
#include <stddef.h>

enum {
    TP_KVM_MMU_PAGETABLE_WALK = 0,
    TP_KVM_MMU_PAGING_ELEMENT = 1,
    TP_KVM_MMU_SET_ACCESSED_BIT = 2,
    TP_KVM_MMU_SET_DIRTY_BIT = 3,
    TP_KVM_MMU_WALKER_ERROR = 4,
    TP_KVM_MMU_GET_PAGE = 5,
    TP_KVM_MMU_SYNC_PAGE = 6,
    TP_KVM_MMU_UNSYNC_PAGE = 7,
    TP_KVM_MMU_PREPARE_ZAP_PAGE = 8,
    TP_KVM_MMU_SET_SPTE = 9,
    TP_KVM_MMU_SPTE_REQUESTED = 10,
    TP_KVM_TDP_MMU_SPTE_CHANGED = 11,
    TP_KVM_MMU_SPLIT_HUGE_PAGE = 12,
    TP_FAST_PAGE_FAULT = 13,
    TP_MARK_MMIO_SPTE = 14,
    TP_HANDLE_MMIO_PAGE_FAULT = 15,
    TP_CHECK_MMIO_SPTE = 16,
    TP_KVM_MMU_ZAP_ALL_FAST = 17,
    TP_NR = 18,
};

#define TRACE_NR_VALS  8            /* u64 payload words per record (7 for kvm_mmu_set_spte, fast_page_fault) */
#define TRACE_BUF_CAP  65536        /* records per buffer; more are dropped */

typedef struct {
    uint32_t event;                 /* TP_* */
    uint32_t nvals;                 /* payload words used */
    uint64_t v[TRACE_NR_VALS];      /* the event's raw values, event-defined order */
} trace_rec_t;

_Static_assert(sizeof(trace_rec_t) == 72, "trace_rec_t is 72 bytes");

typedef struct {
    trace_rec_t *recs;              /* malloc'd, grows by doubling up to TRACE_BUF_CAP */
    uint32_t n;
    uint32_t cap;
    uint64_t dropped;               /* records refused at the cap or on ENOMEM */
} trace_buf_t;

#endif /* KVMMMU_TRACE_BUF_DEFS_H */
