"""Drive the model like a vCPU: the JSON-lines input stream, and its runner.

A *stream* (documented field by field in docs/STREAM.md) is what a vCPU
and its VMM do that the MMU sees: VM entries, page faults, the emulator's
translations and stores, INVLPG, control-register loads, memslot changes,
dirty-log calls, plus ``mark`` lines where the statistics are sampled.
Line 1 is the initial state (``"kind": "init"``); every other line is one
event.  :func:`run_stream` runs a stream on a :class:`~kvmmmu.vm.VM` and
returns the ``kvmmmu`` trace lines the model printed (the kernel's print
format) and its statistics, so that a stream derived from a live guest
can be compared with the kernel's own trace (:mod:`kvmmmu.tracediff`).

Each event is one call into the model, the call the kernel makes for it:

=================  ===========================================================
kind               model call (kernel path)
=================  ===========================================================
entry              ``vcpu.vcpu_enter_guest()`` (vcpu_enter_guest: requests,
                   then kvm_mmu_reload); ``"reload_only": true``:
                   ``vcpu.kvm_mmu_reload()`` alone
page_fault         ``vcpu.kvm_mmu_page_fault(addr, error_code)``
translate          ``vcpu.walk_addr(gva, access)`` (the emulator's
                   gva_to_gpa: FNAME(walk_addr) with the A/D write-back and
                   the table pages dirtied)
write track=true   ``vcpu.kvm_page_track_write(gpa, data)``
                   (emulator_write_phys: kvm_vcpu_write_guest, then
                   kvm_page_track_write)
write track=false  ``vcpu.kvm_vcpu_write_guest(gpa, data)`` (KVM writes guest
                   memory without page tracking, e.g. an exception frame
                   pushed during event delivery); with ``"vmm": true``
                   ``vm.write_guest(gpa, data)`` (the VMM's own mapping)
invlpg             ``vcpu.kvm_mmu_invlpg(gva)``
set_cr / set_efer  ``vcpu.kvm_set_cr0/3/4(value)`` / ``vcpu.kvm_set_efer``
set_cpl            ``vcpu.set_cpl(cpl)``
memslot            ``vm.add_memory`` / ``vm.set_user_memory_region`` /
                   ``vm.delete_memslot`` (KVM_SET_USER_MEMORY_REGION2)
get_dirty_log      ``vm.get_dirty_log(as_id << 16 | slot)``
clear_dirty_log    ``vm.clear_dirty_log(as_id << 16 | slot, first, n, bitmap)``
mark               a statistics snapshot (no call)
=================  ===========================================================

Validation: :func:`parse_stream` checks every line before anything runs
(JSON syntax, kinds, required/unknown fields, JSON types, integer ranges,
lowercase even-length hex, vCPU ids declared in ``init``, slots that exist
at that point of the stream, memory contents inside the initial memslots)
and raises a :class:`StreamError` subclass naming the line number and the
field.  :func:`run_stream` raises :class:`StreamRunError` (line number,
event, the model's exception as ``__cause__``) when the model refuses an
event; a CR/EFER load the kernel answers with #GP is not an error: its
result is the :class:`~kvmmmu.vm.CrLoadError` and nothing changed, as for
the guest.

Threads: a :class:`Stream` is immutable after parsing and may be shared.
:func:`run_stream` captures the process-wide ``kvmmmu`` tracepoints while
it runs (:func:`kvmmmu.mmutrace.capture`): run one stream at a time per
process, and do not emit unrelated events from other threads meanwhile
(they would be captured too).  The VM it runs on is used from the calling
thread only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from kvmmmu import memslots as M
from kvmmmu import mmutrace as _tp
from kvmmmu import paging as _pg
from kvmmmu.host import HostConfig
from kvmmmu.vm import VM, CrLoadError, KvmParams

__all__ = [
    "STREAM_VERSION", "EVENT_FIELDS", "Stream", "ReplayResult",
    "StreamError", "StreamSyntaxError", "StreamFieldError", "StreamValueError", "StreamRunError",
    "parse_stream", "build_vm", "run_stream", "write_stream", "snapshot_stats", "main",
]

STREAM_VERSION = 1
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
_PAGE = 4096


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class StreamError(ValueError):
    """A stream line the parser refuses; nothing was run.

    Attributes
    ----------
    lineno : int
        1-based line number in the stream.
    field : str or None
        The offending field (``"memslots[1].size"``), None for the whole line.
    """

    def __init__(self, lineno: int, field: str | None, msg: str):
        where = f"line {lineno}" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {msg}")
        self.lineno, self.field, self.msg = lineno, field, msg


class StreamSyntaxError(StreamError):
    """The line is not one JSON object (or is blank, or repeats a key)."""


class StreamFieldError(StreamError):
    """Unknown kind, missing or unknown field, or a field of the wrong JSON type."""


class StreamValueError(StreamError):
    """A field of the right type with a value the stream does not allow (range,
    hex syntax, an undeclared vCPU, a slot that does not exist there...)."""


class StreamRunError(RuntimeError):
    """The model refused an event (``__cause__`` is its exception).

    Attributes
    ----------
    lineno : int
    event : dict
    result : ReplayResult
        What ran before the failing event (lines, stats, results so far).
    """

    def __init__(self, lineno: int, event: dict, result: "ReplayResult", cause: BaseException):
        super().__init__(f"line {lineno} ({event.get('kind')}): the model refused the event: "
                         f"{type(cause).__name__}: {cause}")
        self.lineno, self.event, self.result = lineno, event, result


# ---------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------
# Field kinds: "u64"/"u32"/"u16"/"cpl"/"cr"/"slot"/"as_id"/"vcpu" integers,
# "bool", "hex", "str", and the init's nested ones.

_INT_RANGES = {
    "u64": (0, _U64), "u32": (0, _U32), "cpl": (0, 3), "cr": (0, 4),
    "slot": (0, M.KVM_USER_MEM_SLOTS - 1), "as_id": (0, 1), "vcpu": (0, _U32),
    "version": (0, _U32),
}

#: required and optional fields of every event kind (besides ``kind``)
EVENT_FIELDS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "entry": ({"vcpu": "vcpu"}, {"reload_only": "bool"}),
    "page_fault": ({"vcpu": "vcpu", "addr": "u64", "error_code": "u64"}, {}),
    "translate": ({"vcpu": "vcpu", "gva": "u64", "access": "u64"}, {}),
    "write": ({"vcpu": "vcpu", "gpa": "u64", "hex": "hex", "track": "bool"}, {"vmm": "bool"}),
    "invlpg": ({"vcpu": "vcpu", "gva": "u64"}, {}),
    "set_cr": ({"vcpu": "vcpu", "cr": "cr", "value": "u64"}, {}),
    "set_efer": ({"vcpu": "vcpu", "value": "u64"}, {}),
    "set_cpl": ({"vcpu": "vcpu", "cpl": "cpl"}, {}),
    "memslot": ({"slot": "slot", "as_id": "as_id", "gpa": "u64", "size": "u64", "flags": "u32",
                 "thp": "bool"}, {"fresh": "bool", "populate": "bool"}),
    "get_dirty_log": ({"slot": "slot"}, {"as_id": "as_id"}),
    "clear_dirty_log": ({"slot": "slot", "first_page": "u64", "num_pages": "u32", "hex": "hex"},
                        {"as_id": "as_id"}),
    "mark": ({"label": "str"}, {}),
}

_INIT_FIELDS = ({"version": "version", "mmu": "str", "params": "dict", "guest_model": "dict",
                 "memslots": "list", "memory": "list", "vcpus": "list"},
                {"host": "dict", "manual_dirty_log_protect": "u32", "cpuid": "list"})
_MEMSLOT_FIELDS = ({"slot": "slot", "as_id": "as_id", "gpa": "u64", "size": "u64",
                    "flags": "u32", "thp": "bool"}, {"populate": "bool"})
_MEMORY_FIELDS = ({"gpa": "u64", "hex": "hex"}, {"as_id": "as_id"})
_VCPU_FIELDS = ({"id": "vcpu", "cr0": "u64", "cr3": "u64", "cr4": "u64", "efer": "u64",
                 "rflags": "u64", "cpl": "cpl"}, {"pkru": "u32"})

_MMUS = ("tdp_mmu", "tdp", "shadow")
#: memslot flags a stream may use (no guest_memfd: its file is not part of a stream)
_STREAM_SLOT_FLAGS = M.KVM_MEM_LOG_DIRTY_PAGES | M.KVM_MEM_READONLY
_HEX_RE = re.compile(r"(?:[0-9a-f]{2})*\Z")
#: the JSON kinds of the schema other than integers: Python type, name in messages
_JSON_TYPES = {"bool": (bool, "a boolean"), "str": (str, "a string"), "hex": (str, "a hex string"),
               "dict": (dict, "an object"), "list": (list, "an array")}


def _dataclass_schema(cls) -> dict[str, str]:
    """Field name -> "bool"/"int"/"str"/"str|None" of a dataclass (KvmParams,
    GuestCpuModel, HostConfig): what a stream may set."""
    out = {}
    for f in dataclasses.fields(cls):
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out[f.name] = t.replace(" ", "")
    return out


_PARAMS_SCHEMA = _dataclass_schema(KvmParams)
_MODEL_SCHEMA = _dataclass_schema(_pg.GuestCpuModel)
_HOST_SCHEMA = _dataclass_schema(HostConfig)


def _type_name(v) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


class _Checker:
    """Checks one line's object; every error names ``lineno`` and the field path."""

    def __init__(self, lineno: int):
        self.lineno = lineno

    def fields(self, obj: dict, schema, path: str = "") -> None:
        required, optional = schema
        for name in required:
            if name not in obj:
                raise StreamFieldError(self.lineno, path + name, "missing field")
        for name in obj:
            if name not in required and name not in optional and not (path == "" and name == "kind"):
                raise StreamFieldError(self.lineno, path + name, "unknown field")
        for name, v in obj.items():
            kind = required.get(name) or optional.get(name)
            if kind is not None:
                self.value(v, kind, path + name)

    def value(self, v, kind: str, field: str):
        if kind in _INT_RANGES:
            if type(v) is not int:
                raise StreamFieldError(self.lineno, field, f"must be an integer, not {_type_name(v)}")
            lo, hi = _INT_RANGES[kind]
            if not lo <= v <= hi:
                raise StreamValueError(self.lineno, field, f"{v} is outside {lo}..{hi:#x}")
        elif kind in _JSON_TYPES:
            want, what = _JSON_TYPES[kind]
            if type(v) is not want:
                raise StreamFieldError(self.lineno, field, f"must be {what}, not {_type_name(v)}")
            if kind == "hex" and not _HEX_RE.match(v):
                raise StreamValueError(self.lineno, field, "must be lowercase hex digits, two per byte")
        else:                                           # pragma: no cover (schema bug)
            raise AssertionError(kind)

    def dataclass_fields(self, obj: dict, schema: dict[str, str], path: str) -> None:
        """A params / guest_model / host object: any subset of the dataclass's
        fields, each of its type (an int field takes no boolean)."""
        for name, v in obj.items():
            t = schema.get(name)
            if t is None:
                raise StreamFieldError(self.lineno, f"{path}.{name}", "unknown field")
            ok = ((t == "bool" and type(v) is bool) or (t == "int" and type(v) is int) or
                  (t == "str" and type(v) is str) or (t == "str|None" and (v is None or type(v) is str)))
            if not ok:
                raise StreamFieldError(self.lineno, f"{path}.{name}",
                                       f"must be of type {t}, not {_type_name(v)}")


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _load_line(lineno: int, line: str) -> dict:
    if not isinstance(line, str):
        raise StreamSyntaxError(lineno, None, f"a line must be a str, not {type(line).__name__}")
    text = line.rstrip("\r\n")
    if not text.strip():
        raise StreamSyntaxError(lineno, None, "blank line")
    try:
        obj = _DECODER.decode(text)
    except ValueError as e:
        raise StreamSyntaxError(lineno, None, f"not valid JSON: {e}") from None
    if type(obj) is not dict:
        raise StreamSyntaxError(lineno, None, f"must be a JSON object, not {_type_name(obj)}")
    if "kind" not in obj:
        raise StreamFieldError(lineno, "kind", "missing field")
    if type(obj["kind"]) is not str:
        raise StreamFieldError(lineno, "kind", f"must be a string, not {_type_name(obj['kind'])}")
    return obj


def _check_init(obj: dict) -> dict:
    """Validate line 1; return the (as_id, slot) -> (gpa, size) map of its memslots."""
    c = _Checker(1)
    if obj["kind"] != "init":
        raise StreamFieldError(1, "kind", f"line 1 must be the 'init' line, not {obj['kind']!r}")
    c.fields(obj, _INIT_FIELDS)
    if obj["version"] != STREAM_VERSION:
        raise StreamValueError(1, "version", f"version {obj['version']} is not {STREAM_VERSION}")
    if obj["mmu"] not in _MMUS:
        raise StreamValueError(1, "mmu", f"{obj['mmu']!r} is not one of {', '.join(_MMUS)}")
    c.dataclass_fields(obj["params"], _PARAMS_SCHEMA, "params")
    c.dataclass_fields(obj["guest_model"], _MODEL_SCHEMA, "guest_model")
    if "cpuid" in obj:
        if obj["guest_model"]:
            raise StreamValueError(1, "cpuid", "give the guest CPU as 'cpuid' or as 'guest_model', "
                                               "not both")
        for i, e in enumerate(obj["cpuid"]):
            if type(e) is not list or len(e) != 6:
                raise StreamFieldError(1, f"cpuid[{i}]", "must be an array of 6 integers "
                                                         "[function, index, eax, ebx, ecx, edx]")
            for j, x in enumerate(e):
                c.value(x, "u32", f"cpuid[{i}][{j}]")
    c.dataclass_fields(obj.get("host", {}), _HOST_SCHEMA, "host")
    try:
        _guest_model(obj)
    except (ValueError, TypeError) as e:
        raise StreamValueError(1, "cpuid" if "cpuid" in obj else "guest_model", str(e)) from None
    for path, cls, d in (("params", KvmParams, obj["params"]),
                         ("guest_model", _pg.GuestCpuModel, obj["guest_model"]),
                         ("host", HostConfig, obj.get("host", {}))):
        try:
            cls(**d)
        except (ValueError, TypeError) as e:
            raise StreamValueError(1, path, str(e)) from None
    slots: dict[tuple[int, int], tuple[int, int]] = {}
    for i, s in enumerate(obj["memslots"]):
        p = f"memslots[{i}]"
        if type(s) is not dict:
            raise StreamFieldError(1, p, f"must be an object, not {_type_name(s)}")
        c.fields(s, _MEMSLOT_FIELDS, p + ".")
        _check_slot_geometry(1, s, p + ".")
        if s["size"] == 0:
            raise StreamValueError(1, p + ".size", "an initial memslot cannot be empty")
        key = (s["as_id"], s["slot"])
        if key in slots:
            raise StreamValueError(1, p + ".slot", f"slot {key[1]} of as_id {key[0]} appears twice")
        for (a, _), (g, n) in slots.items():
            if a == s["as_id"] and s["gpa"] < g + n and g < s["gpa"] + s["size"]:
                raise StreamValueError(1, p + ".gpa", "overlaps an earlier memslot")
        slots[key] = (s["gpa"], s["size"])
    for i, m in enumerate(obj["memory"]):
        p = f"memory[{i}]"
        if type(m) is not dict:
            raise StreamFieldError(1, p, f"must be an object, not {_type_name(m)}")
        c.fields(m, _MEMORY_FIELDS, p + ".")
        n = len(m["hex"]) // 2
        if n == 0:
            raise StreamValueError(1, p + ".hex", "no bytes")
        if not _inside_slots(slots, m.get("as_id", 0), m["gpa"], n):
            raise StreamValueError(1, p + ".gpa",
                                   f"[{m['gpa']:#x}, {m['gpa'] + n:#x}) is not inside the memslots")
    ids = set()
    for i, v in enumerate(obj["vcpus"]):
        p = f"vcpus[{i}]"
        if type(v) is not dict:
            raise StreamFieldError(1, p, f"must be an object, not {_type_name(v)}")
        c.fields(v, _VCPU_FIELDS, p + ".")
        if v["id"] in ids:
            raise StreamValueError(1, p + ".id", f"vCPU {v['id']} appears twice")
        ids.add(v["id"])
    if not ids:
        raise StreamValueError(1, "vcpus", "a stream needs at least one vCPU")
    return slots


def _guest_model(init: dict) -> "_pg.GuestCpuModel":
    """The init line's guest CPU model: from ``cpuid`` entries (as
    KVM_SET_CPUID2 gets them) when given, else from ``guest_model``."""
    if "cpuid" in init:
        return _pg.GuestCpuModel.from_cpuid([tuple(e) for e in init["cpuid"]])
    return _pg.GuestCpuModel(**init["guest_model"])


def _check_slot_geometry(lineno, s, p):
    if s["gpa"] % _PAGE:
        raise StreamValueError(lineno, p + "gpa", f"{s['gpa']:#x} is not page aligned")
    if s["size"] % _PAGE:
        raise StreamValueError(lineno, p + "size", f"{s['size']:#x} is not a multiple of 4096")
    if s["gpa"] + s["size"] > 1 << 52:
        raise StreamValueError(lineno, p + "size", "the slot ends above 2^52")
    if s["flags"] & ~_STREAM_SLOT_FLAGS:
        raise StreamValueError(lineno, p + "flags",
                               f"{s['flags']:#x}: only KVM_MEM_LOG_DIRTY_PAGES (1) and "
                               f"KVM_MEM_READONLY (2)")


def _inside_slots(slots, as_id, gpa, n) -> bool:
    g, end = gpa, gpa + n
    while g < end:
        for (a, _), (base, size) in slots.items():
            if a == as_id and base <= g < base + size:
                g = base + size
                break
        else:
            return False
    return True


def _check_event(lineno: int, obj: dict, vcpu_ids: set, slots: dict) -> None:
    kind = obj["kind"]
    schema = EVENT_FIELDS.get(kind)
    if schema is None:
        raise StreamFieldError(lineno, "kind", f"unknown kind {kind!r}" +
                               (" (only line 1 is 'init')" if kind == "init" else ""))
    c = _Checker(lineno)
    c.fields(obj, schema)
    if "vcpu" in obj and obj["vcpu"] not in vcpu_ids:
        raise StreamValueError(lineno, "vcpu", f"vCPU {obj['vcpu']} is not in the init line")
    if kind == "translate" and obj["access"] & ~_pg.ACCESS_ALLOWED:
        raise StreamValueError(lineno, "access", f"{obj['access']:#x}: only PFERR W, U, F, P and "
                                                 f"IMPLICIT_ACCESS bits")
    elif kind == "set_cr" and obj["cr"] not in (0, 3, 4):
        raise StreamValueError(lineno, "cr", f"cr{obj['cr']}: only 0, 3 and 4")
    elif kind == "write":
        if not obj["hex"]:
            raise StreamValueError(lineno, "hex", "no bytes")
        if obj.get("vmm") and obj["track"]:
            raise StreamValueError(lineno, "vmm", "a VMM write does not go through page tracking")
    elif kind == "memslot":
        _check_slot_geometry(lineno, obj, "")
        key = (obj["as_id"], obj["slot"])
        if obj["size"] == 0:
            if key not in slots:
                raise StreamValueError(lineno, "slot", f"deletes slot {key[1]} of as_id {key[0]}, "
                                                       f"which does not exist here")
            del slots[key]
        else:
            slots[key] = (obj["gpa"], obj["size"])
    elif kind in ("get_dirty_log", "clear_dirty_log"):
        key = (obj.get("as_id", 0), obj["slot"])
        if key not in slots:
            raise StreamValueError(lineno, "slot", f"slot {key[1]} of as_id {key[0]} does not "
                                                   f"exist here")
        if kind == "clear_dirty_log":
            need = (obj["num_pages"] + 63) // 64 * 8
            if len(obj["hex"]) // 2 != need:
                raise StreamValueError(lineno, "hex", f"the bitmap of {obj['num_pages']} pages is "
                                                      f"{need} bytes, not {len(obj['hex']) // 2}")
    elif kind == "mark" and not obj["label"]:
        raise StreamValueError(lineno, "label", "empty label")


@dataclasses.dataclass(frozen=True)
class Stream:
    """A parsed, validated stream.

    Attributes
    ----------
    init : dict
        Line 1 as given.
    events : tuple of dict
        Lines 2.. as given (event ``i`` is on line ``i + 2``).
    """
    init: dict
    events: tuple

    def lineno(self, i: int) -> int:
        """The stream line number of event ``i``."""
        return i + 2


def _read_lines(lines_or_path) -> list[str]:
    if isinstance(lines_or_path, (str, os.PathLike)):
        with open(lines_or_path, encoding="utf-8") as fh:
            return fh.read().splitlines()
    if isinstance(lines_or_path, (bytes, bytearray)) or isinstance(lines_or_path, dict):
        raise TypeError(f"lines_or_path must be a path or an iterable of str lines, not "
                        f"{type(lines_or_path).__name__}")
    try:
        it = iter(lines_or_path)
    except TypeError:
        raise TypeError(f"lines_or_path must be a path or an iterable of str lines, not "
                        f"{type(lines_or_path).__name__}") from None
    return list(it)


def parse_stream(lines_or_path) -> Stream:
    """Read and validate a stream (a path, or an iterable of lines).

    Every line is checked before this returns (see the module docstring and
    docs/STREAM.md for the rules); the first bad line raises.

    Raises
    ------
    StreamSyntaxError, StreamFieldError, StreamValueError
        With ``.lineno`` and ``.field``.
    TypeError
        `lines_or_path` is neither a path nor an iterable of lines.
    """
    if isinstance(lines_or_path, Stream):
        return lines_or_path
    lines = _read_lines(lines_or_path)
    if not lines:
        raise StreamSyntaxError(1, None, "empty stream: line 1 must be the 'init' line")
    init = _load_line(1, lines[0])
    slots = _check_init(init)
    vcpu_ids = {v["id"] for v in init["vcpus"]}
    events = []
    for i, line in enumerate(lines[1:], start=2):
        obj = _load_line(i, line)
        _check_event(i, obj, vcpu_ids, slots)
        events.append(obj)
    return Stream(init, tuple(events))


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def write_stream(init: dict, events: Iterable[dict], path) -> Stream:
    """Validate ``init`` and ``events`` exactly as :func:`parse_stream` would
    read them, then write them as JSON lines to `path`.  Nothing is written
    if a line is bad.  Returns the :class:`Stream`."""
    lines = [_dumps(init)] + [_dumps(e) for e in events]
    stream = parse_stream(lines)
    tmp = Path(f"{os.fspath(path)}.tmp{os.getpid()}")
    tmp.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    os.replace(tmp, path)
    return stream


# ---------------------------------------------------------------------------
# Building the VM
# ---------------------------------------------------------------------------

def set_sregs(vcpu, regs: dict) -> None:
    """``KVM_SET_SREGS`` (+ RFLAGS) as the MMU sees it (``__set_sregs``): the
    registers at once, PAE PDPTEs loaded from memory; when CR0, CR3, CR4,
    EFER or the PDPTEs changed (``mmu_reset_needed``),
    ``kvm_mmu_reset_context`` and a KVM_REQ_TLB_FLUSH_GUEST request (which
    the first entry services: ``stat.tlb_flush``, and on shadow paging a
    sync of the roots)."""
    cpu = _pg.CpuState(cr0=regs["cr0"], cr3=regs["cr3"], cr4=regs["cr4"], efer=regs["efer"],
                       rflags=regs["rflags"], cpl=regs["cpl"], pkru=regs.get("pkru", 0))
    cpu.check(vcpu.guest_model)
    pdptrs = None
    if cpu.cr0 & _pg.X86_CR0_PG and cpu.cr4 & _pg.X86_CR4_PAE and not cpu.efer & _pg.EFER_LMA:
        pdptrs = _pg.load_pdptrs(vcpu.vm.guest_memory(vcpu.as_id), cpu.cr3, vcpu.guest_model)
    old = vcpu.cpu
    reset = (old.cr0, old.cr3, old.cr4, old.efer) != (cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer) or \
        (pdptrs is not None and pdptrs != vcpu.pdptrs)
    vcpu.cpu = cpu
    vcpu.pdptrs = pdptrs
    if reset:
        vcpu.kvm_mmu_reset_context()
        vcpu.kvm_make_request("KVM_REQ_TLB_FLUSH_GUEST")


def build_vm(init: dict, *, vm: VM | None = None) -> VM:
    """The VM of an ``init`` line: the MMU flavour, host (``HostConfig``) and
    module parameters (``KvmParams``), the vCPUs with their guest CPU model
    and registers, the memslots (``VM.add_memory`` with ``thp``) and the
    memory contents (``vm.write_guest``: not dirty-logged).

    With `vm` given, that VM (with its own backend, e.g. the shadow MMU) is
    set up instead: its ``mmu`` and the params the stream names must agree
    with ``init``, and it must have no memslots yet; missing vCPUs are
    created.

    Raises StreamValueError (line 1) for a state the model refuses
    (registers KVM_SET_SREGS would reject, PDPTEs that do not load).
    """
    init = parse_stream([_dumps(init)]).init if not isinstance(init, Stream) else init.init
    params = KvmParams(**init["params"])
    if vm is None:
        host = HostConfig(**init["host"]) if "host" in init else HostConfig()
        try:
            vm = VM(init["mmu"], host=host, params=params, nr_vcpus=0)
        except ValueError as e:
            raise StreamValueError(1, "mmu", str(e)) from None
    else:
        if not isinstance(vm, VM):
            raise TypeError(f"vm must be a VM, not {type(vm).__name__}")
        if vm.mmu != init["mmu"]:
            raise StreamValueError(1, "mmu", f"the VM given has mmu={vm.mmu!r}")
        for name, v in init["params"].items():
            if getattr(vm.params, name) != v and not (name == "tdp_mmu"):
                raise StreamValueError(1, f"params.{name}",
                                       f"the VM given has {name}={getattr(vm.params, name)!r}")
        if any(len(s) for s in vm.memslots):
            raise ValueError("the VM given already has memslots")
    if init.get("manual_dirty_log_protect"):
        try:
            vm.enable_manual_dirty_log_protect(init["manual_dirty_log_protect"])
        except M.DirtyLogError as e:
            raise StreamValueError(1, "manual_dirty_log_protect", str(e)) from None
    for i, s in enumerate(init["memslots"]):
        try:
            vm.add_memory(s["gpa"], s["size"], slot=s["slot"], as_id=s["as_id"], flags=s["flags"],
                          thp=s["thp"], populate=bool(s.get("populate")))
        except (ValueError, OSError) as e:
            raise StreamValueError(1, f"memslots[{i}]", f"{type(e).__name__}: {e}") from None
    for m in init["memory"]:
        vm.write_guest(m["gpa"], bytes.fromhex(m["hex"]), m.get("as_id", 0))
    model = _guest_model(init)
    by_id = {v.vcpu_id: v for v in vm.vcpus}
    for i, regs in enumerate(init["vcpus"]):
        vcpu = by_id.get(regs["id"]) or vm.create_vcpu(regs["id"])
        try:
            if vcpu.guest_model != model:
                vcpu.set_guest_model(model)
            set_sregs(vcpu, regs)
        except (_pg.PagingError, CrLoadError) as e:
            raise StreamValueError(1, f"vcpus[{i}]", str(e)) from None
    return vm


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

def snapshot_stats(vm: VM, label: str, index: int | None = None) -> dict:
    """``{"label", "event", "vm": {name: value}, "vcpus": {id: {name: value}}}``:
    the VM's and every vCPU's statistics with the kernel's binary-stats
    names (histograms as lists)."""
    return {"label": label, "event": index, "vm": vm.stat.as_dict(),
            "vcpus": {v.vcpu_id: v.stat.as_dict() for v in vm.vcpus}}


@dataclasses.dataclass
class ReplayResult:
    """What :func:`run_stream` returns.

    Attributes
    ----------
    lines : list of str
        The model's ``kvmmmu`` trace lines, ``"event_name: payload"``.
    stats : list of dict
        One :func:`snapshot_stats` per ``mark`` event and a last one
        labelled ``"end"``.
    vm : VM
    results : list
        Per event, in order: ``page_fault`` the RET_PF_* code (or -errno);
        ``translate`` the gpa, or the :class:`~kvmmmu.paging.PageFault` the
        walk raised; ``get_dirty_log`` the bitmap (uint64 array); a
        refused CR/EFER load its :class:`~kvmmmu.vm.CrLoadError`; ``memslot``
        the KvmMrChange made; else None.
    stream : Stream
    baseline : dict
        A :func:`snapshot_stats` taken after the init line, before the
        first event (label ``"start"``, event -1): the zero point of
        ``tracediff.stat_deltas(res.stats, baseline=res.baseline)``.
    """
    lines: list
    stats: list
    vm: Any
    results: list
    stream: Stream
    baseline: dict = None


class _SlotMemory:
    """The runner's record of the host memory behind each memslot: its hva,
    size, read-only-ness and THP backing, kept after a delete so that a slot
    re-created with the same id, size and backing gets the same memory back
    (its contents survive, as when a VMM re-adds its buffer)."""

    def __init__(self, init: dict):
        self.thp = {(s["as_id"], s["slot"]): s["thp"] for s in init["memslots"]}
        self.retired: dict = {}

    def apply(self, vm: VM, ev: dict):
        as_id, sid = ev["as_id"], ev["slot"]
        key = (as_id, sid)
        packed = (as_id << 16) | sid
        old = vm.memslots[as_id].id_to_memslot(sid) if as_id < vm.nr_memslot_as_ids else None
        if ev["size"] == 0:
            r = vm.set_user_memory_region(packed, 0, 0, 0, 0)
            if old is not None:
                self.retired[key] = (old.userspace_addr, old.npages << 12,
                                     bool(old.flags & M.KVM_MEM_READONLY), self.thp.pop(key, None))
            return r
        if old is not None:
            # a flags change or a move of an existing slot: the same host memory
            if self.thp.get(key, ev["thp"]) != ev["thp"]:
                raise ValueError(f"slot {sid} of as_id {as_id} exists with thp={self.thp[key]}; "
                                 f"an existing slot's backing cannot change")
            return vm.set_user_memory_region(packed, ev["flags"], ev["gpa"], ev["size"],
                                             old.userspace_addr)
        ro = bool(ev["flags"] & M.KVM_MEM_READONLY)
        prev = self.retired.get(key)
        if prev is not None and not ev.get("fresh") and prev[1:] == (ev["size"], ro, ev["thp"]) \
                and vm.host.find_vma(prev[0]) is not None:
            r = vm.set_user_memory_region(packed, ev["flags"], ev["gpa"], ev["size"], prev[0])
            if ev.get("populate") and not ro:
                vm.host.populate(prev[0], ev["size"], write=True)
        else:
            vm.add_memory(ev["gpa"], ev["size"], slot=sid, as_id=as_id, flags=ev["flags"],
                          thp=ev["thp"], populate=bool(ev.get("populate")))
            r = M.KvmMrChange.KVM_MR_CREATE
        self.retired.pop(key, None)
        self.thp[key] = ev["thp"]
        return r


def _run_event(vm: VM, vcpus: dict, ev: dict, slots: _SlotMemory):
    kind = ev["kind"]
    if kind == "entry":
        if ev.get("reload_only"):
            return vcpus[ev["vcpu"]].kvm_mmu_reload()
        return vcpus[ev["vcpu"]].vcpu_enter_guest()
    if kind == "page_fault":
        return vcpus[ev["vcpu"]].kvm_mmu_page_fault(ev["addr"], ev["error_code"])
    if kind == "translate":
        w = vcpus[ev["vcpu"]].walk_addr(ev["gva"], ev["access"])
        return w.fault if w.fault is not None else w.gpa
    if kind == "write":
        data = bytes.fromhex(ev["hex"])
        v = vcpus[ev["vcpu"]]
        if ev["track"]:
            return v.kvm_page_track_write(ev["gpa"], data)
        if ev.get("vmm"):
            return vm.write_guest(ev["gpa"], data, v.as_id)
        return v.kvm_vcpu_write_guest(ev["gpa"], data)
    if kind == "invlpg":
        return vcpus[ev["vcpu"]].kvm_mmu_invlpg(ev["gva"])
    if kind in ("set_cr", "set_efer"):
        v = vcpus[ev["vcpu"]]
        f = v.kvm_set_efer if kind == "set_efer" else \
            {0: v.kvm_set_cr0, 3: v.kvm_set_cr3, 4: v.kvm_set_cr4}[ev["cr"]]
        try:
            return f(ev["value"])
        except CrLoadError as e:                    # the guest's #GP: nothing changed
            return e
    if kind == "set_cpl":
        return vcpus[ev["vcpu"]].set_cpl(ev["cpl"])
    if kind == "memslot":
        return slots.apply(vm, ev)
    if kind == "get_dirty_log":
        return vm.get_dirty_log((ev.get("as_id", 0) << 16) | ev["slot"])
    if kind == "clear_dirty_log":
        bitmap = np.frombuffer(bytes.fromhex(ev["hex"]), dtype="<u8").astype(np.uint64)
        return vm.clear_dirty_log((ev.get("as_id", 0) << 16) | ev["slot"], ev["first_page"],
                                  ev["num_pages"], bitmap)
    raise AssertionError(kind)                      # pragma: no cover (parse_stream checked)


def run_stream(lines_or_path, *, vm: VM | None = None, events=None,
               trace_capacity: int = 1 << 22, audit: bool = False) -> ReplayResult:
    """Parse (all of it, first) and run a stream; return a :class:`ReplayResult`.

    Parameters
    ----------
    lines_or_path : path, iterable of str, or Stream
    vm : VM, optional
        Run on this VM (set up by :func:`build_vm` from the init line)
        instead of a new one.
    events : iterable of str, optional
        The kvmmmu events to capture (default: all of them).
    trace_capacity : int
        Records the capture keeps; a run that emits more raises
        :class:`StreamRunError` rather than return a truncated trace.
    audit : bool
        Run ``vm.audit()`` after the init line and after every event; the
        first violation stops the run (:class:`StreamRunError` whose cause is
        the :class:`~kvmmmu.vm.VmAuditError`).

    Raises
    ------
    StreamError
        A bad line (nothing ran).
    StreamRunError
        The model refused an event; the VM keeps the state the events before
        it left, ``.result`` holds what they produced.
    """
    stream = parse_stream(lines_or_path)
    names = tuple(events) if events is not None else ()
    for n in names:
        _tp.get_event(n)                            # UnknownEventError before anything runs
    vm = build_vm(stream.init, vm=vm)
    if audit:
        vm.audit()
    vcpus = {v.vcpu_id: v for v in vm.vcpus}
    result = ReplayResult([], [], vm, [], stream, snapshot_stats(vm, "start", -1))
    slots = _SlotMemory(stream.init)
    with _tp.capture(*names, capacity=trace_capacity) as ring:
        i = -1
        try:
            for i, ev in enumerate(stream.events):
                if ev["kind"] == "mark":
                    result.results.append(None)
                    result.stats.append(snapshot_stats(vm, ev["label"], i))
                    continue
                result.results.append(_run_event(vm, vcpus, ev, slots))
                if audit:
                    vm.audit()
                if ring.dropped:
                    raise OverflowError(f"more than trace_capacity={trace_capacity} trace records")
        except Exception as e:
            result.lines = ring.lines()
            raise StreamRunError(stream.lineno(i), stream.events[i], result, e) from e
        result.lines = ring.lines()
    result.stats.append(snapshot_stats(vm, "end", len(stream.events)))
    return result


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _stats_json(stats: list) -> str:
    return json.dumps([{**s, "vcpus": {str(k): v for k, v in s["vcpus"].items()}} for s in stats],
                      indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmmmu.replay",
                                 description="Run a vCPU input stream (docs/STREAM.md) on the model "
                                             "and print its kvmmmu trace lines.")
    ap.add_argument("stream", help="the JSON-lines stream")
    ap.add_argument("--trace", metavar="OUT", help="write the trace lines here (default: stdout)")
    ap.add_argument("--stats", metavar="OUT", help="write the stats snapshots here as JSON (the "
                                                   "baseline before the first event first)")
    ap.add_argument("--events", metavar="E1,E2", help="capture only these kvmmmu events")
    ap.add_argument("--audit", action="store_true", help="VM.audit() after every event")
    a = ap.parse_args(argv)
    try:
        res = run_stream(a.stream, events=a.events.split(",") if a.events else None,
                         audit=a.audit)
    except (StreamError, StreamRunError, OSError, _tp.UnknownEventError) as e:
        print(f"{a.stream}: {e}", file=sys.stderr)
        return 2
    text = "".join(ln + "\n" for ln in res.lines)
    if a.trace:
        Path(a.trace).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if a.stats:
        Path(a.stats).write_text(_stats_json([res.baseline] + res.stats) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":                          # pragma: no cover
    sys.exit(main())
