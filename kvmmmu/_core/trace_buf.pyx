"""Trace records from nogil code: the core's side of :mod:`kvmmmu.mmutrace`.

The C contract is in ``trace_buf.pxd`` / ``trace_buf_defs.h``: a loop owns a
``trace_buf_t`` for one call, tests ``trace_on(TP_...)`` (one byte load),
appends fixed-width records with ``trace_push`` without the GIL, and drains
the buffer under the GIL with ``trace_drain``, which hands every record to the
sink :mod:`kvmmmu.mmutrace` registered (:func:`set_sink`) and empties the
buffer.  The core never imports :mod:`kvmmmu.mmutrace`; mmutrace imports this
module, registers its sink and drives the switches (:func:`set_enabled`).

Bounds: a buffer holds at most :data:`TRACE_BUF_CAP` records; more (or a
record that cannot be stored because ``realloc`` failed) are dropped and
counted (:func:`dropped`).  ``trace_push`` returns -1 only when memory ran
out, so a caller may fail the operation the way it chooses.

Thread-safety: the switches are written only under the GIL and read as
plain bytes by nogil code (a walk racing with ``enable`` sees the old or the
new value, as a kernel tracepoint does).  Buffers are per call, so threads
never share one; the sink is called under the GIL, in push order, after the
buffer was emptied, so a sink that runs another traced operation gets a
buffer of its own and nothing is emitted twice.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset

import numpy as np

from kvmmmu._core._checks import int_arg as _int_arg, readonly as _readonly

globals().update(TRACE_BUF_CAP=TRACE_BUF_CAP, TRACE_NR_VALS=TRACE_NR_VALS, NR_TP=TP_NR)

#: Event name -> id, for every kvmmmu tracepoint a core loop may record.
TP_IDS = {
    "kvm_mmu_pagetable_walk": TP_KVM_MMU_PAGETABLE_WALK,
    "kvm_mmu_paging_element": TP_KVM_MMU_PAGING_ELEMENT,
    "kvm_mmu_set_accessed_bit": TP_KVM_MMU_SET_ACCESSED_BIT,
    "kvm_mmu_set_dirty_bit": TP_KVM_MMU_SET_DIRTY_BIT,
    "kvm_mmu_walker_error": TP_KVM_MMU_WALKER_ERROR,
    "kvm_mmu_get_page": TP_KVM_MMU_GET_PAGE,
    "kvm_mmu_sync_page": TP_KVM_MMU_SYNC_PAGE,
    "kvm_mmu_unsync_page": TP_KVM_MMU_UNSYNC_PAGE,
    "kvm_mmu_prepare_zap_page": TP_KVM_MMU_PREPARE_ZAP_PAGE,
    "kvm_mmu_set_spte": TP_KVM_MMU_SET_SPTE,
    "kvm_mmu_spte_requested": TP_KVM_MMU_SPTE_REQUESTED,
    "kvm_tdp_mmu_spte_changed": TP_KVM_TDP_MMU_SPTE_CHANGED,
    "kvm_mmu_split_huge_page": TP_KVM_MMU_SPLIT_HUGE_PAGE,
    "fast_page_fault": TP_FAST_PAGE_FAULT,
    "mark_mmio_spte": TP_MARK_MMIO_SPTE,
    "handle_mmio_page_fault": TP_HANDLE_MMIO_PAGE_FAULT,
    "check_mmio_spte": TP_CHECK_MMIO_SPTE,
    "kvm_mmu_zap_all_fast": TP_KVM_MMU_ZAP_ALL_FAST,
}
assert sorted(TP_IDS.values()) == list(range(TP_NR)), "TP ids are 0..TP_NR-1"
assert TP_NR <= sizeof(tp_on), "tp_on has a byte per event"

memset(tp_on, 0, sizeof(tp_on))
cdef uint8_t[::1] _on_view = <uint8_t[:TP_NR]> tp_on
#: ``uint8[NR_TP]``, read-only (and not re-flippable): 1 where the event is on.
ENABLED = _readonly(np.asarray(_on_view))

cdef object _sink = None
cdef uint64_t _dropped = 0


def set_enabled(event, on):
    """Switch event id `event` on or off for core loops (mmutrace's job)."""
    cdef int ev = _int_arg("event", event, 0, TP_NR - 1)
    if not isinstance(on, (bool, int)):
        raise TypeError(f"on must be a bool, not {type(on).__name__}")
    tp_on[ev] = 1 if on else 0


def set_sink(sink):
    """Register the callable that receives drained records as
    ``sink(event_id, values)`` (values: a tuple of ints); None discards them.
    Returns the previous sink."""
    global _sink
    if sink is not None and not callable(sink):
        raise TypeError(f"sink must be callable or None, not {type(sink).__name__}")
    old, _sink = _sink, sink
    return old


def dropped():
    """Records dropped so far, process-wide (buffer cap reached, or no memory)."""
    return _dropped


cdef void trace_buf_init(trace_buf_t *t) noexcept nogil:
    t.recs = NULL
    t.n = 0
    t.cap = 0
    t.dropped = 0


cdef int trace_push(trace_buf_t *t, int event, int nvals, const uint64_t *v) noexcept nogil:
    """Append one record (the caller tested trace_on).  0: stored, or
    dropped at the cap (counted); -1: dropped because realloc failed."""
    cdef uint32_t cap
    cdef trace_rec_t *recs
    cdef trace_rec_t *r
    if nvals < 0 or nvals > TRACE_NR_VALS:
        t.dropped += 1
        return 0
    if t.n == t.cap:
        if t.cap >= TRACE_BUF_CAP:
            t.dropped += 1
            return 0
        cap = t.cap * 2 if t.cap else 64
        if cap > TRACE_BUF_CAP:
            cap = TRACE_BUF_CAP
        recs = <trace_rec_t *>realloc(t.recs, cap * sizeof(trace_rec_t))
        if recs == NULL:
            t.dropped += 1
            return -1
        t.recs = recs
        t.cap = cap
    r = &t.recs[t.n]
    r.event = <uint32_t>event
    r.nvals = <uint32_t>nvals
    memcpy(r.v, v, nvals * sizeof(uint64_t))
    t.n += 1
    return 0


cdef int trace_drain(trace_buf_t *t) except -1:
    """Hand the records to the sink in push order, and empty `t` (also
    when the sink raises; the exception propagates after the buffer is freed)."""
    global _dropped
    cdef trace_rec_t *recs = t.recs
    cdef uint32_t n = t.n, i
    _dropped += t.dropped
    trace_buf_init(t)                 # empty before any Python runs
    sink = _sink
    try:
        if sink is not None:
            for i in range(n):
                if recs[i].event < TP_NR:
                    sink(recs[i].event, tuple(recs[i].v[j] for j in range(recs[i].nvals)))
    finally:
        free(recs)
    return 0


def push_records(event, values, repeat=1):
    """Record `repeat` copies of one event through a fresh buffer and drain
    it, exactly as a core loop does (the switch is tested first).  For tests
    of the contract and for Python callers that want the same path.

    Returns the number of records dropped by this call."""
    cdef int ev = _int_arg("event", event, 0, TP_NR - 1)
    cdef Py_ssize_t rep = _int_arg("repeat", repeat, 0, 1 << 24), k
    vals = [_int_arg("values", x) for x in values]
    if len(vals) > TRACE_NR_VALS:
        raise ValueError(f"values has {len(vals)} items; a record holds {TRACE_NR_VALS}")
    cdef uint64_t v[8]
    cdef int nv = len(vals), i
    for i in range(nv):
        v[i] = vals[i]
    cdef trace_buf_t tb
    trace_buf_init(&tb)
    with nogil:
        for k in range(rep):
            if trace_on(ev) and trace_push(&tb, ev, nv, v) < 0:
                break
    d = tb.dropped
    trace_drain(&tb)
    return d


#: ``kvm_mmu_trace_pferr_flags``: (mask, name) in the order the format lists them.
PFERR_FLAGS = (
    (1 << 0, "P"),
    (1 << 1, "W"),
    (1 << 2, "U"),
    (1 << 5, "PK"),
    (1 << 6, "SS"),
    (1 << 15, "SGX"),
    (1 << 3, "RSVD"),
    (1 << 4, "F"),
)


def print_flags(value: int, delim: str = "|", flags=PFERR_FLAGS) -> str:
    """``__print_flags`` as the kernel's ``trace_print_flags_seq`` prints it.

    Walks `flags` in order while bits remain; a flag is printed (and its
    bits cleared) when all bits of its mask are set.  Remaining unknown bits
    are printed as ``0x%lx``, preceded by `delim` if a name came before.
    ``0`` prints as the empty string.

    Examples
    --------
    >>> print_flags(0x7)
    'P|W|U'
    >>> print_flags(0x1 | 1 << 32)
    'P|0x100000000'
    >>> print_flags(0)
    ''
    """
    out = []
    for mask, name in flags:
        if not value:
            break
        if value & mask == mask:
            value &= ~mask
            out.append(name)
    text = delim.join(out)
    if value:
        text += (delim if out else "") + f"0x{value:x}"
    return text
