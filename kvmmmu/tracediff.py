"""Compare a kernel ``kvmmmu`` trace with the model's, event by event.

The kernel's lines come from tracefs (``task-pid [cpu] flags ts: event:
payload``; the prefix is stripped with :func:`kvmmmu.mmutrace.split_trace_line`),
the model's from :func:`kvmmmu.replay.run_stream` (``event: payload``).  Both
are parsed field by field with the kernel's print formats
(tests/data/tracefs_kvmmmu/*.format, :mod:`kvmmmu.mmutrace`), the values
that depend on the host rather than on what the guest and KVM did are
masked, and the first difference is reported (:func:`diff_traces`).

What is masked, per event (``*``: the value is dropped; ``~HEX``: the SPTE
value with its pfn bits cleared, printed in hex; everything not listed is
compared as printed):

==========================  ==================================================
event                       masked (why)
==========================  ==================================================
kvm_mmu_set_spte            ``spte``: pfn bits (``SPTE_BASE_ADDR_MASK``,
                            bits 51:12) of a shadow-present SPTE - the host
                            page; the r/w/x/u letters and every other bit
                            stay, and so do the pfn bits below the page size
                            of a huge leaf (level >= 2 with bit 7: they are 0
                            on every host, a misaligned huge SPTE shows).  ``at`` (sptep, the SPTE's physical
                            address): the table page is a host page, so
                            only the offset in it stays (``*080``: index
                            16 of its table).
kvm_mmu_spte_requested      ``pfn``: ``*`` - the host pfn; at level >= 2 the
                            printed value is the aligned pfn | the gfn's
                            offset in the huge page, and that offset stays
                            (``*1``); an error/noslot pfn (bits 63:52 set,
                            e.g. KVM_PFN_NOSLOT for MMIO) stays, it is not
                            host memory.
kvm_tdp_mmu_spte_changed    ``old_spte``, ``new_spte``: pfn bits of a
                            shadow-present SPTE (a leaf's host page, a
                            non-leaf's host table page; a huge leaf keeps
                            the bits below its size); MMIO generation bits
                            of an MMIO SPTE (needs ``fmt``).
kvm_mmu_split_huge_page     ``spte``: pfn bits above the huge page's size.
fast_page_fault             ``sptep``: ``*`` (``%p``: a host address, hashed
                            by tracefs); ``old``/``new``: pfn bits.
mark_mmio_spte              ``sptep``: ``*``; ``gen``: ``*`` (the memslot
                            generation counts the VMM's and KVM's private
                            memslot updates - KVM_SET_TSS_ADDR, the APIC
                            access page - which a stream does not replay).
check_mmio_spte             ``spte``: MMIO generation bits cleared;
                            ``kvm_gen``, ``spte-gen``: ``*`` (as above);
                            ``valid`` stays.
kvm_mmu_get_page,           nothing: ``sp gen`` is ``kvm->arch.mmu_valid_gen``
kvm_mmu_sync_page,          (per VM, starts at 0), gfn, role bits, root
kvm_mmu_unsync_page,        count and sync state are what the MMU decided.
kvm_mmu_prepare_zap_page
kvm_mmu_pagetable_walk,     nothing: guest addresses, guest PTEs, error
kvm_mmu_paging_element,     codes (the guest's own memory).
kvm_mmu_set_accessed_bit,
kvm_mmu_set_dirty_bit,
kvm_mmu_walker_error,
handle_mmio_page_fault
kvm_mmu_zap_all_fast        nothing (the generation and the used-page count).
==========================  ==================================================

``mask_mmio_gen=False`` keeps the generations.  A shadow-present SPTE is
one with ``SPTE_MMU_PRESENT_MASK`` (bit 11, 64-bit hosts); a non-present
SPTE (``SHADOW_NONPRESENT_VALUE``, FROZEN_SPTE) carries no pfn and is kept.

Selection: :data:`DEFAULT_EVENTS` are the events the shadow-MMU issue
compares (``kvm_mmu_get_page`` with gfn, role and new/existing;
``kvm_mmu_set_spte``; ``kvm_mmu_prepare_zap_page``; unsync/sync;
``kvm_mmu_spte_requested``; the walker events); ``events="all"`` keeps
every kvmmmu event; other lines (non-kvmmmu events, comments) are dropped.

Statistics: :func:`stat_deltas` and :func:`diff_stats` compare the deltas
between consecutive snapshots (the :func:`kvmmmu.replay.snapshot_stats`
shape; the live side reads the same names with KVM_GET_STATS_FD);
:func:`recorded_stat_deltas` reads a live recording's deltas since its
start (tests/data/shadow_scenarios/*.stats.json), which
:func:`diff_stat_deltas` / :func:`diff_stat_files` compare with a replay's
snapshots counted from ``ReplayResult.baseline``.  Only the MMU's
statistics are compared by default (:data:`MMU_VM_STATS`,
:data:`MMU_VCPU_STATS`): exits, halt polling and emulation counts are not
the MMU model's.

Threads: everything here is a pure function of its arguments.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from kvmmmu import mmutrace as _tp
from kvmmmu._core import spte as _spte

__all__ = [
    "DEFAULT_EVENTS", "WALKER_EVENTS", "MMU_VM_STATS", "MMU_VCPU_STATS",
    "TraceParseError", "TraceLine", "FirstDivergence", "StatDifference",
    "parse_payload", "normalize", "normalize_trace", "diff_traces",
    "stat_deltas", "recorded_stat_deltas", "diff_stat_deltas", "diff_stats", "load_stats", "diff_stat_files", "main",
]

SPTE_BASE_ADDR_MASK = _spte.SPTE_BASE_ADDR_MASK
SPTE_MMU_PRESENT_MASK = _spte.SPTE_MMU_PRESENT_MASK
MMIO_SPTE_GEN_BITS = _spte.MMIO_SPTE_GEN_LOW_MASK | _spte.MMIO_SPTE_GEN_HIGH_MASK
#: KVM_PFN_ERR_MASK | KVM_PFN_NOSLOT: a pfn with these bits is no host page
_PFN_ERR_NOSLOT_MASK = 0xFFF << 52

WALKER_EVENTS = ("kvm_mmu_pagetable_walk", "kvm_mmu_paging_element", "kvm_mmu_set_accessed_bit",
                 "kvm_mmu_set_dirty_bit", "kvm_mmu_walker_error")
#: the MMU events compared by default
DEFAULT_EVENTS = ("kvm_mmu_get_page", "kvm_mmu_set_spte", "kvm_mmu_prepare_zap_page",
                  "kvm_mmu_unsync_page", "kvm_mmu_sync_page", "kvm_mmu_spte_requested") \
    + WALKER_EVENTS

#: the VM statistics compared by default (the MMU's; kvm_vm_stats_desc names)
MMU_VM_STATS = ("remote_tlb_flush", "remote_tlb_flush_requests", "mmu_shadow_zapped",
                "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_recycled", "mmu_cache_miss",
                "mmu_unsync", "pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits",
                "max_mmu_rmap_size", "max_mmu_page_hash_collisions")
#: the vCPU statistics compared by default
MMU_VCPU_STATS = ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast",
                  "pf_mmio_spte_created", "tlb_flush", "invlpg")


class TraceParseError(ValueError):
    """A selected kvmmmu line whose payload does not have its event's format."""

    def __init__(self, source: str, lineno: int, line: str, msg: str):
        super().__init__(f"{source} line {lineno}: {msg}: {line!r}")
        self.source, self.lineno, self.line = source, lineno, line


# ---------------------------------------------------------------------------
# Payload formats: the kernel's TP_printk, read back
# ---------------------------------------------------------------------------

_H = r"[0-9a-f]+"
_SP = (rf"sp gen (?P<gen>\d+) gfn (?P<gfn>{_H}) l(?P<level>\d+) (?P<gpte_size>\d+)-byte "
       rf"q(?P<quadrant>\d+)(?P<direct> direct)? (?P<access>[-w][-u][-x])(?P<invalid> invalid)? "
       rf"(?P<nxe>!?)nxe (?P<ad>!?)ad root (?P<root_count>\d+) (?P<sync>sync|unsync)")
# __print_flags output: flag names joined by "|", leftover bits as 0x%lx, or nothing
_FLAG = "(?:" + "|".join(sorted((re.escape(n) for _, n in _tp.PFERR_FLAGS), key=len, reverse=True)) \
    + r"|0x[0-9a-f]+)"
_FLAGS = rf"(?:{_FLAG}(?:\|{_FLAG})*)?"

_PAYLOAD_RE = {name: re.compile(rx + r"\Z") for name, rx in {
    "kvm_mmu_pagetable_walk": rf"addr (?P<addr>{_H}) pferr (?P<pferr>{_H}) (?P<pferr_flags>{_FLAGS})",
    "kvm_mmu_paging_element": rf"pte (?P<pte>{_H}) level (?P<level>\d+)",
    "kvm_mmu_set_accessed_bit": rf"gpa (?P<gpa>{_H})",
    "kvm_mmu_set_dirty_bit": rf"gpa (?P<gpa>{_H})",
    "kvm_mmu_walker_error": rf"pferr (?P<pferr>{_H}) (?P<pferr_flags>{_FLAGS})",
    "kvm_mmu_get_page": _SP + r" (?P<created>new|existing)",
    "kvm_mmu_sync_page": _SP,
    "kvm_mmu_unsync_page": _SP,
    "kvm_mmu_prepare_zap_page": _SP,
    "kvm_mmu_set_spte": (rf"gfn (?P<gfn>{_H}) spte (?P<spte>{_H}) \((?P<r>[r-])(?P<w>[w-])"
                         rf"(?P<x>[x-])(?P<u>[u-]?)\) level (?P<level>\d+) at (?P<sptep>{_H})"),
    "kvm_mmu_spte_requested": rf"gfn (?P<gfn>{_H}) pfn (?P<pfn>{_H}) level (?P<level>\d+)",
    "kvm_tdp_mmu_spte_changed": (rf"as id (?P<as_id>\d+) gfn (?P<gfn>{_H}) level (?P<level>\d+) "
                                 rf"old_spte (?P<old_spte>{_H}) new_spte (?P<new_spte>{_H})"),
    "kvm_mmu_split_huge_page": (rf"gfn (?P<gfn>{_H}) spte (?P<spte>{_H}) level (?P<level>-?\d+) "
                                rf"errno (?P<errno>-?\d+)"),
    "fast_page_fault": (rf"vcpu (?P<vcpu_id>-?\d+) gva (?P<gva>{_H}) error_code "
                        rf"(?P<error_code>{_FLAGS}) sptep (?P<sptep>\S+) old 0x(?P<old_spte>{_H}) "
                        rf"new (?P<new_spte>{_H}) spurious (?P<spurious>[01]) fixed (?P<fixed>[01])"),
    "mark_mmio_spte": (rf"sptep:(?P<sptep>\S+) gfn (?P<gfn>{_H}) access (?P<access>{_H}) "
                       rf"gen (?P<gen>{_H})"),
    "handle_mmio_page_fault": rf"addr:(?P<addr>{_H}) gfn (?P<gfn>{_H}) access (?P<access>{_H})",
    "check_mmio_spte": (rf"spte (?P<spte>{_H}) kvm_gen (?P<kvm_gen>{_H}) spte-gen "
                        rf"(?P<spte_gen>{_H}) valid (?P<valid>[01])"),
    "kvm_mmu_zap_all_fast": rf"kvm-mmu-valid-gen (?P<mmu_valid_gen>\d+) used_pages (?P<mmu_used_pages>{_H})",
}.items()}
if set(_PAYLOAD_RE) != {ev.name for ev in _tp.EVENTS}:      # pragma: no cover (a new event)
    raise ImportError("tracediff does not know the payload format of every kvmmmu event")

#: per event, how each masked field is treated: "drop", "spte" (pfn bits of a
#: present SPTE; MMIO generation of an MMIO SPTE), "pfn", "gen", "mmio_spte"
_MASKS = {
    "kvm_mmu_set_spte": {"spte": "spte", "sptep": "pa"},
    "kvm_mmu_spte_requested": {"pfn": "pfn"},
    "kvm_tdp_mmu_spte_changed": {"old_spte": "spte", "new_spte": "spte"},
    "kvm_mmu_split_huge_page": {"spte": "spte"},
    "fast_page_fault": {"sptep": "drop", "old_spte": "spte", "new_spte": "spte"},
    "mark_mmio_spte": {"sptep": "drop", "gen": "gen"},
    "check_mmio_spte": {"spte": "mmio_spte", "kvm_gen": "gen", "spte_gen": "gen"},
}


def parse_payload(event: str, text: str) -> dict[str, str] | None:
    """The printed fields of one payload, in print order (``{name: text}``;
    an absent optional part such as `` direct`` is ``""``), or None when
    `text` does not have `event`'s format.  Raises UnknownEventError for a
    name that is not a kvmmmu event."""
    rx = _PAYLOAD_RE.get(event)
    if rx is None:
        _tp.get_event(event)                       # raises UnknownEventError
    m = rx.match(text)
    if m is None:
        return None
    return {k: (v if v is not None else "") for k, v in m.groupdict().items()}


#: PT_PAGE_SIZE_MASK: a huge leaf (level >= 2) in both SPTE formats
_LARGE = 1 << 7


def _mask_value(how: str, text: str, fmt, mask_mmio_gen: bool, level: int = 1) -> str:
    if how == "drop":
        return "*"
    if how == "pa":                                 # the table page goes, the offset stays
        return f"*{int(text, 16) & 0xfff:03x}"
    if how == "gen":
        return "*" if mask_mmio_gen else text
    v = int(text, 16)
    if how == "pfn":
        if v & _PFN_ERR_NOSLOT_MASK:
            return text
        # the aligned host pfn | the gfn's offset in the huge page: the offset stays
        low = v & ((1 << (9 * (level - 1))) - 1) if level >= 2 else 0
        return f"*{low:x}" if level >= 2 else "*"
    if how == "mmio_spte":
        return f"~{v & ~MMIO_SPTE_GEN_BITS:x}" if mask_mmio_gen else text
    # an SPTE value
    if v & SPTE_MMU_PRESENT_MASK:
        mask = SPTE_BASE_ADDR_MASK
        if level >= 2 and v & _LARGE:
            # a huge leaf maps an aligned host range: the pfn bits below the
            # huge page size are 0 on every host, so they stay
            mask &= ~((1 << (12 + 9 * (level - 1))) - 1)
        return f"~{v & ~mask:x}"
    if mask_mmio_gen and fmt is not None and fmt.is_mmio_spte(v):
        return f"~{v & ~MMIO_SPTE_GEN_BITS:x}"
    return text


@dataclass(frozen=True)
class TraceLine:
    """One selected, normalised trace line.

    Attributes
    ----------
    event : str
    text : str
        The normalised payload (masked values replaced in place).
    fields : dict
        The normalised printed fields, ``{name: text}``, in print order.
    raw : str
        The payload as it was printed.
    lineno : int
        1-based line number in the source.
    """
    event: str
    text: str
    fields: dict
    raw: str
    lineno: int

    @property
    def line(self) -> str:
        return f"{self.event}: {self.text}"


def normalize(event: str, text: str, *, fmt=None, mask_mmio_gen: bool = True,
              lineno: int = 0, source: str = "trace") -> TraceLine:
    """Parse and mask one payload (see the table in the module docstring).

    Parameters
    ----------
    fmt : kvmmmu._core.spte.SpteFormat, optional
        The SPTE format of the traced VM; only needed to recognise MMIO SPTEs
        inside ``kvm_tdp_mmu_spte_changed`` values.

    Raises
    ------
    TraceParseError
        `text` does not have `event`'s print format.
    """
    fields = parse_payload(event, text)
    if fields is None:
        raise TraceParseError(source, lineno, f"{event}: {text}",
                              f"not the print format of {event}")
    masks = _MASKS.get(event)
    out = text
    if masks:
        level = int(fields["level"]) if "level" in fields else 1
        rx = _PAYLOAD_RE[event]
        m = rx.match(text)
        pieces, at = [], 0
        for name in rx.groupindex:
            how = masks.get(name)
            if how is None:
                continue
            new = _mask_value(how, fields[name], fmt, mask_mmio_gen, level)
            fields[name] = new
            s, e = m.span(name)
            pieces.append(text[at:s] + new)
            at = e
        out = "".join(pieces) + text[at:]
    return TraceLine(event, out, fields, text, lineno)


def _event_set(events) -> frozenset | None:
    if events is None:
        return frozenset(DEFAULT_EVENTS)
    if isinstance(events, str):
        if events == "all":
            return None
        events = (events,)
    names = frozenset(events)
    for n in names:
        _tp.get_event(n)                           # UnknownEventError for a typo
    return names


def _split(item, source, lineno):
    if isinstance(item, tuple) and len(item) == 2:
        return item
    if not isinstance(item, str):
        raise TypeError(f"{source} line {lineno}: a trace line must be a str or an "
                        f"(event, text) pair, not {type(item).__name__}")
    return _tp.split_trace_line(item)


def normalize_trace(lines: Iterable, *, events=None, fmt=None, mask_mmio_gen: bool = True,
                    source: str = "trace") -> list[TraceLine]:
    """Select and normalise a trace.

    Parameters
    ----------
    lines : iterable of str or (event, text)
        tracefs lines (with or without the task/pid/cpu/flags/timestamp
        prefix), ``"event: payload"`` lines, or pairs as
        :func:`kvmmmu.mmutrace.read_trace` returns.  Comment lines, blank
        lines and events that are not kvmmmu events are skipped.
    events : None, "all" or iterable of str
        None: :data:`DEFAULT_EVENTS`.
    """
    sel = _event_set(events)
    known = {ev.name for ev in _tp.EVENTS}
    out = []
    for i, item in enumerate(lines, start=1):
        pair = _split(item, source, i)
        if pair is None:
            continue
        ev, text = pair
        if ev not in known or (sel is not None and ev not in sel):
            continue
        out.append(normalize(ev, text, fmt=fmt, mask_mmio_gen=mask_mmio_gen, lineno=i,
                             source=source))
    return out


# ---------------------------------------------------------------------------
# The first divergence
# ---------------------------------------------------------------------------

@dataclass
class FirstDivergence:
    """Where two normalised traces first differ.

    Attributes
    ----------
    index : int
        Position in the selected, normalised sequences (0-based).
    kernel, model : TraceLine or None
        The lines at `index` (None: that trace ended there).
    field : str
        ``"event"`` (different events), the name of the first printed field
        that differs (e.g. ``"gfn"``, ``"spte"``, ``"created"``), or
        ``"end"`` (one trace is longer).
    kernel_value, model_value : str or None
        That field's normalised text on each side.
    before : list of str
        Up to `context` equal lines before `index`.
    kernel_after, model_after : list of str
        Up to `context` lines after `index` on each side.
    """
    index: int
    kernel: TraceLine | None
    model: TraceLine | None
    field: str
    kernel_value: str | None
    model_value: str | None
    before: list = field(default_factory=list)
    kernel_after: list = field(default_factory=list)
    model_after: list = field(default_factory=list)

    def __str__(self):
        k = self.kernel.line if self.kernel else "<end of trace>"
        m = self.model.line if self.model else "<end of trace>"
        kl = f" (kernel line {self.kernel.lineno})" if self.kernel else ""
        ml = f" (model line {self.model.lineno})" if self.model else ""
        out = [f"first divergence at event {self.index}, field {self.field!r}: "
               f"kernel {self.kernel_value!r} vs model {self.model_value!r}"]
        out += ["    " + ln for ln in self.before]
        out += [f"  - kernel{kl}: {k}", f"  + model{ml}:  {m}"]
        out += ["  - " + ln for ln in self.kernel_after]
        out += ["  + " + ln for ln in self.model_after]
        return "\n".join(out)


def _first_field(a: TraceLine, b: TraceLine) -> tuple[str, str | None, str | None]:
    if a.event != b.event:
        return "event", a.event, b.event
    for name, va in a.fields.items():
        if b.fields.get(name) != va:
            return name, va, b.fields.get(name)
    return "text", a.text, b.text                  # pragma: no cover (fields cover the text)


def diff_traces(kernel_lines: Iterable, model_lines: Iterable, *, events=None, fmt=None,
                mask_mmio_gen: bool = True, context: int = 3) -> FirstDivergence | None:
    """Normalise both traces (:func:`normalize_trace`) and return None if
    they are equal, else the :class:`FirstDivergence`.

    Raises
    ------
    TraceParseError
        A selected line that does not have its event's format.
    """
    if not isinstance(context, int) or isinstance(context, bool) or context < 0:
        raise ValueError(f"context must be a non-negative int, not {context!r}")
    kw = dict(events=events, fmt=fmt, mask_mmio_gen=mask_mmio_gen)
    k = normalize_trace(kernel_lines, source="kernel", **kw)
    m = normalize_trace(model_lines, source="model", **kw)
    n = min(len(k), len(m))
    i = next((j for j in range(n) if k[j].line != m[j].line), None)
    if i is None:
        if len(k) == len(m):
            return None
        i = n
    a = k[i] if i < len(k) else None
    b = m[i] if i < len(m) else None
    if a is None or b is None:
        fld, va, vb = "end", a.line if a else None, b.line if b else None
    else:
        fld, va, vb = _first_field(a, b)
    return FirstDivergence(
        i, a, b, fld, va, vb,
        before=[t.line for t in k[max(0, i - context):i]],
        kernel_after=[t.line for t in k[i + 1:i + 1 + context]],
        model_after=[t.line for t in m[i + 1:i + 1 + context]])


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StatDifference:
    """One statistic whose delta differs between kernel and model.

    ``label`` is the snapshot the delta ends at (the delta runs from the
    snapshot before it); ``scope`` is ``"vm"`` or ``"vcpu N"``; a missing
    snapshot or vCPU shows as ``name`` ``"<label>"`` / ``"<vcpu>"``."""
    label: str
    scope: str
    name: str
    kernel: object
    model: object


def load_stats(path) -> list[dict] | dict:
    """A stats file: the snapshot list ``python -m kvmmmu.replay --stats``
    writes (its baseline first, ``"event": -1``), or a live recording's
    ``{"marks", "end"}`` deltas (:func:`recorded_stat_deltas`)."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, (list, dict)):
        raise ValueError(f"{path}: a stats file holds a JSON array of snapshots or a "
                         f"recording's {{'marks', 'end'}} object")
    return data


def _as_deltas(data) -> list[dict]:
    """Cumulative deltas since the start of a stats file's contents."""
    if isinstance(data, dict):
        return recorded_stat_deltas(data)
    if not data or data[0].get("event") != -1:
        raise ValueError("a snapshot list compared with a recording needs its baseline first "
                         "(python -m kvmmmu.replay --stats writes it)")
    return stat_deltas(data[1:], baseline=data[0])


def diff_stat_files(kernel, model) -> list[StatDifference]:
    """Compare two :func:`load_stats` results: two snapshot lists by their
    consecutive deltas (:func:`diff_stats`), else the cumulative deltas
    since the start (a recording's, a snapshot list's from its baseline)."""
    if isinstance(kernel, list) and isinstance(model, list):
        return diff_stats(kernel, model)
    return diff_stat_deltas(_as_deltas(kernel), _as_deltas(model))


def _vcpus(snap) -> dict:
    return {int(k): v for k, v in snap.get("vcpus", {}).items()}


def _delta(after: dict, before: dict, names) -> dict:
    out = {}
    for n in names:
        if n in after and n in before and isinstance(after[n], int) and isinstance(before[n], int):
            out[n] = after[n] - before[n]
    return out


def stat_deltas(snapshots: list[dict], *, baseline: dict | None = None, vm_names=MMU_VM_STATS,
                vcpu_names=MMU_VCPU_STATS) -> list[dict]:
    """Statistic deltas ``[{"label", "vm": {name: delta}, "vcpus": {id:
    {name: delta}}}]`` of a list of snapshots (the
    :func:`kvmmmu.replay.snapshot_stats` shape).

    Without `baseline`: one entry per snapshot after the first, the change
    since the snapshot before it (the first is the baseline).  With
    `baseline` (e.g. ``ReplayResult.baseline``, taken before the first
    event): one entry per snapshot, the change since `baseline` - the shape
    of :func:`recorded_stat_deltas`.  Names missing on either side, and
    histograms, are left out."""
    pairs = [(baseline, s) for s in snapshots] if baseline is not None else \
        list(zip(snapshots, snapshots[1:]))
    out = []
    for prev, cur in pairs:
        pv, cv = _vcpus(prev), _vcpus(cur)
        out.append({"label": cur.get("label"),
                    "vm": _delta(cur.get("vm", {}), prev.get("vm", {}), vm_names),
                    "vcpus": {i: _delta(cv[i], pv[i], vcpu_names) for i in cv if i in pv}})
    return out


def recorded_stat_deltas(obj, *, vm_names=MMU_VM_STATS, vcpu_names=MMU_VCPU_STATS) -> list[dict]:
    """The deltas a live recording stores (``<name>.stats.json`` of
    tests/data/shadow_scenarios, written by ``kvmmmu.live.record``): the
    change since just before the first run, at each mark and at the end,
    non-zero values only, as ``{"marks": [{"label", "vm": {...}, "vcpu0":
    {...}}, ...], "end": {"vm": {...}, "vcpu0": {...}}}``.

    Returns the :func:`stat_deltas` shape (labels of the marks, then
    ``"end"``), a missing MMU statistic meaning 0.  `obj` is the parsed
    JSON or a path."""
    if not isinstance(obj, dict):
        with open(obj, encoding="utf-8") as fh:
            obj = json.load(fh)
    if set(obj) - {"marks", "end"} or not isinstance(obj.get("marks", []), list):
        raise ValueError("a recorded stats object has 'marks' (a list) and 'end'")
    out = []
    for entry, label in [(m, m.get("label")) for m in obj.get("marks", [])] + \
            ([(obj["end"], "end")] if "end" in obj else []):
        d = {"label": label, "vm": {n: int(entry.get("vm", {}).get(n, 0)) for n in vm_names},
             "vcpus": {}}
        for k, v in entry.items():
            if k.startswith("vcpu"):
                d["vcpus"][int(k[4:])] = {n: int(v.get(n, 0)) for n in vcpu_names}
        out.append(d)
    return out


def diff_stat_deltas(kernel: list[dict], model: list[dict], *, vm_names=MMU_VM_STATS,
                     vcpu_names=MMU_VCPU_STATS) -> list[StatDifference]:
    """Compare two delta lists (:func:`stat_deltas` / :func:`recorded_stat_deltas`
    shape) taken at the same labels.  Returns every difference (empty:
    equal); a statistic missing on either side is not compared."""
    kl, ml = [d.get("label") for d in kernel], [d.get("label") for d in model]
    if kl != ml:
        return [StatDifference("", "", "<label>", kl, ml)]
    diffs = []
    for a, b in zip(kernel, model):
        for n in vm_names:
            if n in a["vm"] and n in b["vm"] and a["vm"][n] != b["vm"][n]:
                diffs.append(StatDifference(a["label"], "vm", n, a["vm"][n], b["vm"][n]))
        for i in sorted(set(a["vcpus"]) | set(b["vcpus"])):
            if i not in a["vcpus"] or i not in b["vcpus"]:
                diffs.append(StatDifference(a["label"], f"vcpu {i}", "<vcpu>",
                                            i in a["vcpus"], i in b["vcpus"]))
                continue
            x, y = a["vcpus"][i], b["vcpus"][i]
            for n in vcpu_names:
                if n in x and n in y and x[n] != y[n]:
                    diffs.append(StatDifference(a["label"], f"vcpu {i}", n, x[n], y[n]))
    return diffs


def diff_stats(kernel: list[dict], model: list[dict], *, vm_names=MMU_VM_STATS,
               vcpu_names=MMU_VCPU_STATS) -> list[StatDifference]:
    """Compare the consecutive deltas (:func:`stat_deltas`) of two snapshot
    lists taken at the same marks.  Returns every difference (empty: equal)."""
    kw = dict(vm_names=vm_names, vcpu_names=vcpu_names)
    if [s.get("label") for s in kernel] != [s.get("label") for s in model]:
        return [StatDifference("", "", "<label>", [s.get("label") for s in kernel],
                               [s.get("label") for s in model])]
    return diff_stat_deltas(stat_deltas(kernel, **kw), stat_deltas(model, **kw), **kw)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _read_lines(path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read().splitlines()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmmmu.tracediff",
                                 description="Report the first divergence between a kernel "
                                             "kvmmmu trace and the model's (host values masked).")
    ap.add_argument("kernel_trace")
    ap.add_argument("model_trace")
    ap.add_argument("--all", action="store_true", help="compare every kvmmmu event")
    ap.add_argument("--events", metavar="E1,E2", help="compare these events")
    ap.add_argument("--context", type=int, default=3)
    ap.add_argument("--keep-mmio-gen", action="store_true",
                    help="compare MMIO generations too")
    ap.add_argument("--stats", nargs=2, metavar=("KERNEL_STATS", "MODEL_STATS"),
                    help="also compare the stat deltas of two snapshot files")
    a = ap.parse_args(argv)
    events = "all" if a.all else (a.events.split(",") if a.events else None)
    try:
        d = diff_traces(_read_lines(a.kernel_trace), _read_lines(a.model_trace), events=events,
                        mask_mmio_gen=not a.keep_mmio_gen, context=a.context)
        sd = diff_stat_files(load_stats(a.stats[0]), load_stats(a.stats[1])) if a.stats else []
    except (OSError, ValueError, _tp.UnknownEventError) as e:
        print(f"tracediff: {e}", file=sys.stderr)
        return 2
    if d is None:
        print("traces agree")
    else:
        print(d)
    for s in sd:
        print(f"stat {s.scope} {s.name} at {s.label!r}: kernel delta {s.kernel}, model {s.model}")
    return 0 if d is None and not sd else 1


if __name__ == "__main__":                          # pragma: no cover
    sys.exit(main())
