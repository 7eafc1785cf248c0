"""kvmmmu tracepoints: the kernel's ``TRACE_SYSTEM kvmmmu`` events, in Python.

Every event of ``/sys/kernel/tracing/events/kvmmmu/`` (Linux v6.18) is an
:class:`Event` with the kernel's name, the kernel's fields (name, C type,
offset, size, signedness, exactly as the tracefs ``format`` file lists
them) and a renderer that produces the text ``/sys/kernel/tracing/trace``
shows after ``"<event>: "``.  A kvmmmu run can therefore be diffed line by
line against a live kernel trace (see :func:`read_trace`).

Emitting
--------
Events are off by default.  Call sites guard the emit with one attribute
test, so a disabled event costs one attribute load and a branch::

    from kvmmmu import mmutrace as _tp

    if _tp.kvm_mmu_get_page.enabled:
        _tp.kvm_mmu_get_page.emit(mmu_valid_gen=gen, gfn=gfn, role=role.word,
                                  root_count=0, unsync=False, created=True)

:meth:`Event.emit` checks ``enabled`` itself too, so an unguarded call is
still correct, only slower.  Field values are validated when the event is
enabled: missing or unknown field names raise :class:`TraceFieldError`,
values that do not fit the C type raise :class:`TraceValueError`.  As in the
kernel's ``TP_fast_assign``, derived fields are computed by the caller
(:func:`kvm_mmu_set_spte_fields` does it for ``kvm_mmu_set_spte``).

Cython call sites read the same switches through :data:`ENABLED`, a
read-only ``uint8`` array indexed by :attr:`Event.id`::

    from libc.stdint cimport uint8_t
    from kvmmmu import mmutrace
    cdef const uint8_t[::1] tp_enabled = mmutrace.ENABLED
    cdef int TP_SET_SPTE = mmutrace.kvm_mmu_set_spte.id
    ...
    if tp_enabled[TP_SET_SPTE]:      # a byte load; no Python call when off
        ...                           # record fields, emit after the nogil loop

Only :func:`enable`/:func:`disable` (and friends) change the switches; they
keep :data:`ENABLED` and ``Event.enabled`` in step.  Event ids are stable
(the order of :data:`EVENTS`; new events are only ever appended).

Receiving
---------
Subscribers are callables that receive a :class:`TraceRecord` (event name,
field dict, rendered text) for every emitted event, in emission order.
:class:`RingBuffer` is a ready-made subscriber with a fixed capacity.

Printing rules taken from the kernel
------------------------------------
* ``%llx``/``%x``: lower-case hex, no prefix.  ``%#llx``: ``0x`` prefix,
  also for zero (the kernel's vsprintf prints ``0x0``, unlike glibc).
* ``__print_flags(value, "|", ...)`` (:func:`print_flags`): names of the
  flags whose mask is fully set, in table order, joined by ``"|"``; bits
  left over are appended as ``0x%lx`` (after a ``"|"`` when a name was
  printed); a value of 0 prints nothing.
* ``%p`` (:func:`format_pointer`): tracefs hashes ``%p`` unless the
  instance's ``hash-ptr`` option is off (default on), except for NULL.  We
  print what the kernel prints for ``%px``: the raw value as 16 zero-padded
  lower-case hex digits without ``0x``.  That equals the live text for NULL,
  and for every value when ``hash-ptr`` is off; a hashed live value cannot
  be reproduced.  (kvmmmu's SPTE "pointers" are the model's host physical
  addresses of SPTEs, see kvmmmu/_core/types.pxd.)
"""
from __future__ import annotations

import re
from collections import deque
from contextlib import contextmanager
from operator import index as _index
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np

from kvmmmu._core import trace_buf as _tb
from kvmmmu._core.role import role_trace_text

__all__ = [
    "TRACE_SYSTEM", "TRACEFS", "Field", "Event", "TraceRecord", "RingBuffer",
    "TraceError", "UnknownEventError", "TraceFieldError", "TraceValueError",
    "EVENTS", "NR_EVENTS", "ENABLED", "PFERR_FLAGS", "RET_PF_FIXED", "RET_PF_SPURIOUS",
    "get_event", "enable", "disable", "enable_all", "disable_all", "is_enabled",
    "enabled_events", "subscribe", "unsubscribe", "capture",
    "print_flags", "format_pointer", "kvm_mmu_set_spte_fields",
    "split_trace_line", "read_trace",
]

TRACE_SYSTEM = "kvmmmu"
TRACEFS = Path("/sys/kernel/tracing")

#: ``fast_page_fault`` prints ``spurious``/``fixed`` as ``ret == 6``/``ret == 5``.
from kvmmmu._core.defs import RET_PF_FIXED, RET_PF_SPURIOUS  # noqa: E402

# ``kvm_mmu_trace_pferr_flags`` and ``__print_flags`` live in the core (the walker's
# PageFault prints with them); re-exported here.
from kvmmmu._core.trace_buf import PFERR_FLAGS, print_flags  # noqa: E402,F401


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class TraceError(Exception):
    """Base class of the errors raised by this module."""


class UnknownEventError(TraceError, LookupError):
    """An event name that is not a kvmmmu event."""


class TraceFieldError(TraceError, TypeError):
    """Missing or unknown field names, or a non-integer value."""


class TraceValueError(TraceError, ValueError):
    """A field value that does not fit the field's C type."""


# ---------------------------------------------------------------------------
# Fields and events
# ---------------------------------------------------------------------------

class Field(NamedTuple):
    """One event field as the tracefs ``format`` file describes it.

    Attributes
    ----------
    name : str
    ctype : str
        C type as spelled in the format file (``"__u64"``, ``"u64 *"``, ...).
    offset : int
        Byte offset in the kernel's record (after the 8-byte common header).
    size : int
        Size in bytes.
    signed : bool
    """

    name: str
    ctype: str
    offset: int
    size: int
    signed: bool

    @property
    def bounds(self) -> tuple[int, int]:
        """Smallest and largest value of the C type (0, 1 for ``bool``)."""
        if self.ctype == "bool":
            return 0, 1
        bits = 8 * self.size
        if self.signed:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1

    def check(self, value, event: str):
        """Return `value` as the Python value stored for this field.

        ``bool`` fields take True/False/0/1 and store a bool; integer
        fields store an int in the C type's range.

        Raises
        ------
        TraceFieldError
            `value` is not an integer (or bool).
        TraceValueError
            `value` does not fit the C type; nothing is truncated.
        """
        return _check_value(self.name, self.ctype, *self.bounds, self.ctype == "bool", value, event)


def _check_value(name, ctype, lo, hi, is_bool, value, event):
    try:
        v = _index(value)
    except TypeError:
        raise TraceFieldError(f"{event}.{name} ({ctype}) must be an integer, "
                              f"not {type(value).__name__}") from None
    if not lo <= v <= hi:
        raise TraceValueError(f"{event}.{name}={value!r} does not fit {ctype} ({lo}..{hi})")
    return bool(v) if is_bool else v


def _np_type(f: Field):
    if f.ctype == "bool":
        return np.bool_
    return np.dtype(f"{'i' if f.signed else 'u'}{f.size}")


class Event:
    """One kvmmmu tracepoint.

    Attributes
    ----------
    name : str
        Event name, as in ``events/kvmmmu/<name>``.
    id : int
        Index into :data:`EVENTS` and :data:`ENABLED` (stable).
    fields : tuple of Field
        The event's own fields in format-file order (no ``common_*`` fields).
    enabled : bool
        Whether :meth:`emit` records anything.  Read it at call sites;
        change it only through :func:`enable`/:func:`disable`.
    dtype : numpy.dtype
        Structured dtype of the kernel's raw record: every field at its
        format-file offset, itemsize = the C struct size (the 8-byte common
        header is left as padding).
    """

    __slots__ = ("name", "id", "fields", "enabled", "dtype", "_render", "_names", "_checks",
                 "_names_in_order", "_signed_at")

    def __init__(self, name: str, id: int, fields: Iterable[tuple], render: Callable[[Mapping], str]):
        self.name = name
        self.id = id
        self.fields = tuple(Field(*f) for f in fields)
        self.enabled = False
        self._render = render
        self._names = frozenset(f.name for f in self.fields)
        self._checks = tuple((f.name, f.ctype, *f.bounds, f.ctype == "bool") for f in self.fields)
        align = max([4] + [f.size for f in self.fields])
        end = max(f.offset + f.size for f in self.fields)
        self.dtype = np.dtype({
            "names": [f.name for f in self.fields],
            "formats": [_np_type(f) for f in self.fields],
            "offsets": [f.offset for f in self.fields],
            "itemsize": -(-end // align) * align,
        })

    def __repr__(self):
        return f"<kvmmmu event {self.name} id={self.id} {'on' if self.enabled else 'off'}>"

    def check(self, values: Mapping) -> dict:
        """Validate `values` (field name -> value) and return them in field order.

        Raises
        ------
        TraceFieldError
            Missing or unknown field names, or a non-integer value.
        TraceValueError
            A value does not fit its field.
        """
        if values.keys() != self._names:
            missing = [f.name for f in self.fields if f.name not in values]
            unknown = sorted(k for k in values if k not in self._names)
            parts = []
            if missing:
                parts.append("missing field(s) " + ", ".join(missing))
            if unknown:
                parts.append("unknown field(s) " + ", ".join(unknown))
            raise TraceFieldError(f"{self.name}: " + "; ".join(parts))
        out = {}
        for name, ctype, lo, hi, is_bool in self._checks:
            v = values[name]
            if type(v) is int and lo <= v <= hi and not is_bool:
                out[name] = v                       # the common case, inline
            else:
                out[name] = _check_value(name, ctype, lo, hi, is_bool, v, self.name)
        return out

    def render(self, values: Mapping) -> str:
        """The tracefs text for validated `values` (what follows ``"<name>: "``)."""
        return self._render(values)

    def format(self, **values) -> str:
        """Validate `values` and render them; does not emit."""
        return self._render(self.check(values))

    def emit(self, **values) -> None:
        """Record one event with the given field values, if enabled.

        Every subscriber is called with one :class:`TraceRecord`.  Does
        nothing (and checks nothing) when the event is disabled.

        Raises
        ------
        TraceFieldError, TraceValueError
            Bad field names or values (only when enabled).
        """
        if not self.enabled:
            return
        rec = TraceRecord(self, self.check(values))
        for sink in _sinks:
            sink(rec)

    def emit_array(self, records: np.ndarray) -> None:
        """Emit one event per row of a structured array (batch call sites).

        Parameters
        ----------
        records : numpy.ndarray
            1-d structured array with (at least) this event's field names,
            e.g. of :attr:`dtype`; extra fields are an error.
        """
        if not self.enabled:
            return
        names = records.dtype.names or ()
        for row in records:
            self.emit(**{n: row[n].item() for n in names})


# ---------------------------------------------------------------------------
# Printing helpers (the kernel's rules)
# ---------------------------------------------------------------------------

def format_pointer(value: int) -> str:
    """``%p`` as tracefs prints it when not hashed (``%px``): 16 hex digits.

    With the default ``hash-ptr`` trace option the live kernel prints a
    hashed value instead for every non-NULL pointer; that cannot be
    reproduced here.
    """
    return f"{value:016x}"


# ---------------------------------------------------------------------------
# Renderers: one per TP_printk
# ---------------------------------------------------------------------------

def _sp_text(v: Mapping) -> str:
    return role_trace_text(v["role"], v["mmu_valid_gen"], v["gfn"], v["root_count"], v["unsync"])


def _r_pagetable_walk(v):
    return f"addr {v['addr']:x} pferr {v['pferr']:x} {print_flags(v['pferr'])}"


def _r_paging_element(v):
    return f"pte {v['pte']:x} level {v['level']}"


def _r_gpa(v):
    return f"gpa {v['gpa']:x}"


def _r_walker_error(v):
    return f"pferr {v['pferr']:x} {print_flags(v['pferr'])}"


def _r_get_page(v):
    return f"{_sp_text(v)} {'new' if v['created'] else 'existing'}"


def _r_set_spte(v):
    u = v["u"]
    return (f"gfn {v['gfn']:x} spte {v['spte']:x} ("
            f"{'r' if v['r'] else '-'}{'w' if v['spte'] & 2 else '-'}{'x' if v['x'] else '-'}"
            f"{'' if u == -1 else ('u' if u else '-')}) level {v['level']} at {v['sptep']:x}")


def _r_spte_requested(v):
    return f"gfn {v['gfn']:x} pfn {v['pfn']:x} level {v['level']}"


def _r_tdp_spte_changed(v):
    return (f"as id {v['as_id']} gfn {v['gfn']:x} level {v['level']} "
            f"old_spte {v['old_spte']:x} new_spte {v['new_spte']:x}")


def _r_split_huge_page(v):
    return f"gfn {v['gfn']:x} spte {v['spte']:x} level {v['level']} errno {v['errno']}"


def _r_fast_page_fault(v):
    return (f"vcpu {v['vcpu_id']} gva {v['cr2_or_gpa']:x} error_code {print_flags(v['error_code'])} "
            f"sptep {format_pointer(v['sptep'])} old 0x{v['old_spte']:x} new {v['new_spte']:x} "
            f"spurious {int(v['ret'] == RET_PF_SPURIOUS)} fixed {int(v['ret'] == RET_PF_FIXED)}")


def _r_mark_mmio_spte(v):
    return f"sptep:{format_pointer(v['sptep'])} gfn {v['gfn']:x} access {v['access']:x} gen {v['gen']:x}"


def _r_handle_mmio_page_fault(v):
    return f"addr:{v['addr']:x} gfn {v['gfn']:x} access {v['access']:x}"


def _r_check_mmio_spte(v):
    return (f"spte {v['spte']:x} kvm_gen {v['kvm_gen']:x} spte-gen {v['spte_gen']:x} "
            f"valid {int(v['kvm_gen'] == v['spte_gen'])}")


def _r_zap_all_fast(v):
    return f"kvm-mmu-valid-gen {v['mmu_valid_gen']} used_pages {v['mmu_used_pages']:x}"


# ---------------------------------------------------------------------------
# The events.  Fields: (name, C type, offset, size, signed), copied from the
# v6.18 tracefs format files (tests/data/tracefs_kvmmmu/ holds them).
# ---------------------------------------------------------------------------

_SP_FIELDS = (
    ("mmu_valid_gen", "__u8", 8, 1, False),
    ("gfn", "__u64", 16, 8, False),
    ("role", "__u32", 24, 4, False),
    ("root_count", "__u32", 28, 4, False),
    ("unsync", "bool", 32, 1, False),
)

_EVENT_TABLE = (
    ("kvm_mmu_pagetable_walk", (
        ("addr", "__u64", 8, 8, False),
        ("pferr", "__u32", 16, 4, False),
    ), _r_pagetable_walk),
    ("kvm_mmu_paging_element", (
        ("pte", "__u64", 8, 8, False),
        ("level", "__u32", 16, 4, False),
    ), _r_paging_element),
    ("kvm_mmu_set_accessed_bit", (
        ("gpa", "__u64", 8, 8, False),
    ), _r_gpa),
    ("kvm_mmu_set_dirty_bit", (
        ("gpa", "__u64", 8, 8, False),
    ), _r_gpa),
    ("kvm_mmu_walker_error", (
        ("pferr", "__u32", 8, 4, False),
    ), _r_walker_error),
    ("kvm_mmu_get_page", _SP_FIELDS + (
        ("created", "bool", 33, 1, False),
    ), _r_get_page),
    ("kvm_mmu_sync_page", _SP_FIELDS, _sp_text),
    ("kvm_mmu_unsync_page", _SP_FIELDS, _sp_text),
    ("kvm_mmu_prepare_zap_page", _SP_FIELDS, _sp_text),
    ("kvm_mmu_set_spte", (
        ("gfn", "u64", 8, 8, False),
        ("spte", "u64", 16, 8, False),
        ("sptep", "u64", 24, 8, False),
        ("level", "u8", 32, 1, False),
        ("r", "bool", 33, 1, False),
        ("x", "bool", 34, 1, False),
        ("u", "signed char", 35, 1, True),
    ), _r_set_spte),
    ("kvm_mmu_spte_requested", (
        ("gfn", "u64", 8, 8, False),
        ("pfn", "u64", 16, 8, False),
        ("level", "u8", 24, 1, False),
    ), _r_spte_requested),
    ("kvm_tdp_mmu_spte_changed", (
        ("gfn", "u64", 8, 8, False),
        ("old_spte", "u64", 16, 8, False),
        ("new_spte", "u64", 24, 8, False),
        ("level", "u8", 32, 1, False),
        ("as_id", "u8", 33, 1, False),
    ), _r_tdp_spte_changed),
    ("kvm_mmu_split_huge_page", (
        ("gfn", "u64", 8, 8, False),
        ("spte", "u64", 16, 8, False),
        ("level", "int", 24, 4, True),
        ("errno", "int", 28, 4, True),
    ), _r_split_huge_page),
    ("fast_page_fault", (
        ("vcpu_id", "int", 8, 4, True),
        ("cr2_or_gpa", "gpa_t", 16, 8, False),
        ("error_code", "u64", 24, 8, False),
        ("sptep", "u64 *", 32, 8, False),
        ("old_spte", "u64", 40, 8, False),
        ("new_spte", "u64", 48, 8, False),
        ("ret", "int", 56, 4, True),
    ), _r_fast_page_fault),
    ("mark_mmio_spte", (
        ("sptep", "void *", 8, 8, False),
        ("gfn", "gfn_t", 16, 8, False),
        ("access", "unsigned", 24, 4, False),
        ("gen", "unsigned int", 28, 4, False),
    ), _r_mark_mmio_spte),
    ("handle_mmio_page_fault", (
        ("addr", "u64", 8, 8, False),
        ("gfn", "gfn_t", 16, 8, False),
        ("access", "unsigned", 24, 4, False),
    ), _r_handle_mmio_page_fault),
    ("check_mmio_spte", (
        ("kvm_gen", "unsigned int", 8, 4, False),
        ("spte_gen", "unsigned int", 12, 4, False),
        ("spte", "u64", 16, 8, False),
    ), _r_check_mmio_spte),
    ("kvm_mmu_zap_all_fast", (
        ("mmu_valid_gen", "__u8", 8, 1, False),
        ("mmu_used_pages", "unsigned int", 12, 4, False),
    ), _r_zap_all_fast),
)

#: All events, indexed by :attr:`Event.id`.
EVENTS: tuple[Event, ...] = tuple(Event(name, i, fields, render)
                                  for i, (name, fields, render) in enumerate(_EVENT_TABLE))
NR_EVENTS = len(EVENTS)
_BY_NAME = {ev.name: ev for ev in EVENTS}

kvm_mmu_pagetable_walk = _BY_NAME["kvm_mmu_pagetable_walk"]
kvm_mmu_paging_element = _BY_NAME["kvm_mmu_paging_element"]
kvm_mmu_set_accessed_bit = _BY_NAME["kvm_mmu_set_accessed_bit"]
kvm_mmu_set_dirty_bit = _BY_NAME["kvm_mmu_set_dirty_bit"]
kvm_mmu_walker_error = _BY_NAME["kvm_mmu_walker_error"]
kvm_mmu_get_page = _BY_NAME["kvm_mmu_get_page"]
kvm_mmu_sync_page = _BY_NAME["kvm_mmu_sync_page"]
kvm_mmu_unsync_page = _BY_NAME["kvm_mmu_unsync_page"]
kvm_mmu_prepare_zap_page = _BY_NAME["kvm_mmu_prepare_zap_page"]
kvm_mmu_set_spte = _BY_NAME["kvm_mmu_set_spte"]
kvm_mmu_spte_requested = _BY_NAME["kvm_mmu_spte_requested"]
kvm_tdp_mmu_spte_changed = _BY_NAME["kvm_tdp_mmu_spte_changed"]
kvm_mmu_split_huge_page = _BY_NAME["kvm_mmu_split_huge_page"]
fast_page_fault = _BY_NAME["fast_page_fault"]
mark_mmio_spte = _BY_NAME["mark_mmio_spte"]
handle_mmio_page_fault = _BY_NAME["handle_mmio_page_fault"]
check_mmio_spte = _BY_NAME["check_mmio_spte"]
kvm_mmu_zap_all_fast = _BY_NAME["kvm_mmu_zap_all_fast"]

__all__ += [ev.name for ev in EVENTS]

# The C-readable switches live in the core (kvmmmu._core.trace_buf, so that
# nogil loops test them without importing this module).  Only this module
# writes them, through trace_buf.set_enabled; the ids are this module's.
for _ev in EVENTS:
    if _tb.TP_IDS.get(_ev.name, _ev.id) != _ev.id:
        raise ImportError(f"trace_buf gives {_ev.name} id {_tb.TP_IDS[_ev.name]}, mmutrace {_ev.id}")
if set(_tb.TP_IDS) - set(_BY_NAME) or _tb.NR_TP != NR_EVENTS:
    raise ImportError("trace_buf and mmutrace disagree on the kvmmmu events")
#: ``uint8[NR_EVENTS]``, read-only (not re-flippable): 1 where the event with
#: that id is enabled.  The same bytes the core's ``trace_on()`` reads.
ENABLED = _tb.ENABLED


def _emit_core_record(event_id: int, values: tuple) -> None:
    """The trace_buf sink: one record of a core loop, values in the event's
    field order, emitted like any other (subscribers see no difference).
    A signed field arrives as the u64 two's complement of its value."""
    ev = EVENTS[event_id]
    if ev._signed_at:
        values = list(values)
        for i in ev._signed_at:
            if i < len(values) and values[i] >> 63:
                values[i] -= 1 << 64
    ev.emit(**dict(zip(ev._names_in_order, values)))


for _ev in EVENTS:
    _ev._names_in_order = tuple(f.name for f in _ev.fields)
    _ev._signed_at = tuple(i for i, f in enumerate(_ev.fields) if f.signed)
_tb.set_sink(_emit_core_record)


def get_event(name: str | Event) -> Event:
    """The :class:`Event` called `name` (an Event is returned as is).

    Raises
    ------
    UnknownEventError
        `name` is not a kvmmmu event.
    """
    if isinstance(name, Event):
        return name
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise UnknownEventError(f"no kvmmmu event {name!r}") from None


def _set(names, on: bool) -> None:
    evs = [get_event(n) for n in names]   # all names are checked before any change
    for ev in evs:
        ev.enabled = on
        _tb.set_enabled(ev.id, on)


def enable(*names: str | Event) -> None:
    """Enable the named events (``echo 1 > events/kvmmmu/<name>/enable``)."""
    if not names:
        raise TypeError("enable() needs at least one event name; use enable_all()")
    _set(names, True)


def disable(*names: str | Event) -> None:
    """Disable the named events."""
    if not names:
        raise TypeError("disable() needs at least one event name; use disable_all()")
    _set(names, False)


def enable_all() -> None:
    """Enable every kvmmmu event (``echo 1 > events/kvmmmu/enable``)."""
    _set(EVENTS, True)


def disable_all() -> None:
    """Disable every kvmmmu event."""
    _set(EVENTS, False)


def is_enabled(name: str | Event) -> bool:
    return get_event(name).enabled


def enabled_events() -> list[str]:
    """Names of the enabled events, in id order."""
    return [ev.name for ev in EVENTS if ev.enabled]


# ---------------------------------------------------------------------------
# Records and subscribers
# ---------------------------------------------------------------------------

class TraceRecord:
    """One emitted event, as passed to subscribers.

    Attributes
    ----------
    event : str
        Event name.
    fields : dict
        Validated field values in format-file order (ints; bools for
        ``bool`` fields).  Do not modify.
    text : str
        The tracefs text after ``"<event>: "`` (rendered on first access).
    line : str
        ``"<event>: <text>"``, the comparable tail of a live trace line.
    """

    __slots__ = ("_ev", "fields", "_text")

    def __init__(self, event: Event, fields: dict):
        self._ev = event
        self.fields = fields
        self._text = None

    @property
    def event(self) -> str:
        return self._ev.name

    @property
    def id(self) -> int:
        return self._ev.id

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self._ev.render(self.fields)
        return self._text

    @property
    def line(self) -> str:
        return f"{self._ev.name}: {self.text}"

    def __repr__(self):
        return f"TraceRecord({self.line!r})"


Subscriber = Callable[[TraceRecord], object]
_sinks: tuple[Subscriber, ...] = ()


def subscribe(sink: Subscriber) -> Subscriber:
    """Add `sink`; it is called with every emitted :class:`TraceRecord`.

    Returns `sink`, so ``ring = subscribe(RingBuffer(1024))`` works.  A sink
    subscribed twice is called twice.
    """
    global _sinks
    if not callable(sink):
        raise TypeError(f"subscriber must be callable, not {type(sink).__name__}")
    _sinks = _sinks + (sink,)
    return sink


def unsubscribe(sink: Subscriber) -> None:
    """Remove one subscription of `sink`.

    Raises
    ------
    ValueError
        `sink` is not subscribed.
    """
    global _sinks
    lst = list(_sinks)
    lst.remove(sink)
    _sinks = tuple(lst)


class RingBuffer:
    """A subscriber that keeps the last `capacity` records.

    When full, each new record overwrites the oldest one and ``dropped``
    counts the overwritten records (like a tracefs buffer in overwrite mode).

    Parameters
    ----------
    capacity : int
        Maximum number of records kept (> 0).

    Attributes
    ----------
    capacity : int
    dropped : int
        Records overwritten since creation or the last :meth:`clear`.
    """

    def __init__(self, capacity: int = 4096):
        capacity = _index(capacity)
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.dropped = 0
        self._buf: deque[TraceRecord] = deque(maxlen=capacity)

    def __call__(self, record: TraceRecord) -> None:
        if len(self._buf) == self.capacity:
            self.dropped += 1
        self._buf.append(record)

    def __len__(self) -> int:
        return len(self._buf)

    def __iter__(self) -> Iterator[TraceRecord]:
        return iter(list(self._buf))

    def records(self) -> list[TraceRecord]:
        """The kept records, oldest first."""
        return list(self._buf)

    def lines(self) -> list[str]:
        """The kept records as ``"<event>: <text>"`` lines, oldest first."""
        return [r.line for r in self._buf]

    def clear(self) -> None:
        """Drop all records and reset ``dropped``."""
        self._buf.clear()
        self.dropped = 0


@contextmanager
def capture(*names: str | Event, capacity: int = 65536) -> Iterator[RingBuffer]:
    """Enable events and collect them in a fresh :class:`RingBuffer`.

    With no names, every event is enabled.  On exit the subscription is
    removed and the previous enabled state is restored.

    Examples
    --------
    >>> with capture("kvm_mmu_zap_all_fast") as ring:
    ...     kvm_mmu_zap_all_fast.emit(mmu_valid_gen=1, mmu_used_pages=0x20)
    >>> ring.lines()
    ['kvm_mmu_zap_all_fast: kvm-mmu-valid-gen 1 used_pages 20']
    """
    evs = [get_event(n) for n in names] if names else list(EVENTS)
    saved = ENABLED.copy()
    ring = subscribe(RingBuffer(capacity))
    try:
        _set(evs, True)
        yield ring
    finally:
        unsubscribe(ring)
        for ev in EVENTS:
            ev.enabled = bool(saved[ev.id])
            _tb.set_enabled(ev.id, ev.enabled)


# ---------------------------------------------------------------------------
# Call-site helpers
# ---------------------------------------------------------------------------

def kvm_mmu_set_spte_fields(level: int, gfn: int, spte: int, sptep: int, *,
                            present_mask: int, user_mask: int, x_mask: int,
                            nx_mask: int) -> dict:
    """Field values of ``kvm_mmu_set_spte``, computed as its TP_fast_assign does.

    Parameters
    ----------
    level, gfn, spte : int
        The new SPTE, the gfn it maps and its level.
    sptep : int
        Where the SPTE lives (the kernel records the physical address of
        the SPTE; kvmmmu passes its ``sptep``, the SPTE's host physical
        address in the model, see kvmmmu/_core/types.pxd).
    present_mask, user_mask, x_mask, nx_mask : int
        The VM's ``shadow_present_mask``, ``shadow_user_mask``,
        ``shadow_x_mask`` and ``shadow_nx_mask``.

    Returns
    -------
    dict
        ``gfn, spte, sptep, level`` plus ``r = present_mask != 0 or spte bit 0``,
        ``x = is_executable_pte(spte)`` and ``u = -1`` without a user mask,
        else whether the user bit is set.
    """
    return dict(
        gfn=gfn, spte=spte, sptep=sptep, level=level,
        r=bool(present_mask) or bool(spte & 1),
        x=(spte & (x_mask | nx_mask)) == x_mask,
        u=(int(bool(spte & user_mask)) if user_mask else -1),
    )


# ---------------------------------------------------------------------------
# Live kernel traces
# ---------------------------------------------------------------------------

# "<comm>-<pid> [(<tgid>)] [<cpu>] [<irq flags>] <timestamp>: <event>: <text>",
# as trace_print_context() lays it out (the tgid column with record-tgid, the
# flags column with irq-info).  <comm> may itself contain '-' and spaces.
_CONTEXT_RE = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<flags>[^\s:\[\]]{4,5})\s+)?(?P<ts>\d+(?:\.\d+)?):\s"
    r"(?P<event>\w+): (?P<text>.*)$")
# With the context-info option off only "<event>: <text>" is printed.
_BARE_RE = re.compile(r"^(?P<event>\w+): (?P<text>.*)$")


def split_trace_line(line: str) -> tuple[str, str] | None:
    """Split a line of ``/sys/kernel/tracing/trace`` into ``(event, text)``.

    The task/pid/cpu/flags/timestamp prefix is removed; the text keeps any
    trailing spaces (some events end in one), only the newline goes.  Comment
    lines (``#``) and lines that are not events give None.

    Examples
    --------
    >>> split_trace_line("  qemu-system-x86-1234  [002] d..1.  85.012345: "
    ...                  "kvm_mmu_walker_error: pferr 0 \\n")
    ('kvm_mmu_walker_error', 'pferr 0 ')
    """
    if not isinstance(line, str):
        raise TypeError(f"line must be a str, not {type(line).__name__}")
    line = line.rstrip("\r\n")
    if not line or line.lstrip().startswith("#"):
        return None
    m = _CONTEXT_RE.match(line) or _BARE_RE.match(line)
    if m is None:
        return None
    return m.group("event"), m.group("text")


def read_trace(path: str | Path | None = None, *, only_kvmmmu: bool = True) -> list[tuple[str, str]]:
    """Read a tracefs ``trace`` file (or a saved copy) as ``(event, text)`` pairs.

    Parameters
    ----------
    path : path-like, optional
        Default ``/sys/kernel/tracing/trace``; use
        ``/sys/kernel/tracing/instances/<name>/trace`` for an instance.
    only_kvmmmu : bool
        Keep only events that exist in :data:`EVENTS` (default True).

    Returns
    -------
    list of (str, str)
        In file order; compare with ``[(r.event, r.text) for r in ring]``.
    """
    p = Path(path) if path is not None else TRACEFS / "trace"
    out = []
    with open(p, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            item = split_trace_line(line)
            if item is not None and (not only_kvmmmu or item[0] in _BY_NAME):
                out.append(item)
    return out
