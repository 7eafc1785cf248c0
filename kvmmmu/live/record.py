"""Record the scenario guests on /dev/kvm and derive the vCPU input streams.

``python -m kvmmmu.live.record --out tests/data/shadow_scenarios [NAME ...]``
runs each scenario of :mod:`kvmmmu.live.scenarios` on the host's KVM with
every ``kvmmmu`` tracepoint and the ``kvm`` tracepoints listed in
:data:`KVM_EVENTS` enabled in a private tracefs instance, reads the VM and
vCPU binary stats at the start, at each ``mark`` step and at the end, and
writes per scenario:

``<name>.trace``        the recorded events as ``event: text`` lines (the
                        tracefs context prefix stripped), userspace steps as
                        ``tracing_mark_write: kvmmmu_live {json}`` lines
``<name>.fields``       the same records printed with the ``fields`` option
``<name>.stats.json``   stats deltas from the start, per mark and at the end
``<name>.stream.jsonl`` the derived vCPU input stream (``docs/STREAM.md``)
``<name>.sources.jsonl`` per stream line, where it was derived from

The stream is derived from the trace alone plus the scenario's initial state
(:func:`derive_stream`): it can be re-derived from a stored ``.trace`` where
there is no /dev/kvm.  How each event is derived is in :func:`derive_stream`
and tests/data/shadow_scenarios/README.md.
"""
from __future__ import annotations

import argparse
import ctypes as C
import fcntl
import json
import mmap
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kvmmmu import mmutrace
from kvmmmu.live import _uapi as U
from kvmmmu.live import x86
from kvmmmu.live.tracefs import TraceInstance
from kvmmmu.live.scenarios import RFLAGS, STOP_GPA, STOP_GVA

__all__ = ["KVM_EVENTS", "MARK_PREFIX", "ScenarioTrace", "Recording", "record", "derive_stream",
           "DeriveError", "derive_sources", "stream_init", "mmu_lines", "mask_line", "save", "load_trace",
           "load_stream", "main"]

#: kvm:* events enabled next to every kvmmmu event (those this kernel has).
KVM_EVENTS = ("kvm_page_fault", "kvm_exit", "kvm_entry", "kvm_cr", "kvm_emulate_insn", "kvm_mmio",
              "kvm_pio", "kvm_fast_mmio", "kvm_inj_exception", "kvm_userspace_exit",
              "kvm_unmap_hva_range", "kvm_invlpga")
#: Text of the trace_marker lines the recorder writes for each userspace step.
MARK_PREFIX = "kvmmmu_live "
MARK_EVENT = "tracing_mark_write"

# ioctls not in _uapi
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168


class kvm_enable_cap(C.Structure):
    _fields_ = [("cap", C.c_uint32), ("flags", C.c_uint32), ("args", C.c_uint64 * 4),
                ("pad", C.c_uint8 * 64)]


class kvm_dirty_log(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("padding1", C.c_uint32), ("dirty_bitmap", C.c_uint64)]


class kvm_clear_dirty_log(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("num_pages", C.c_uint32), ("first_page", C.c_uint64),
                ("dirty_bitmap", C.c_uint64)]


class kvm_run_io(C.Structure):
    _fields_ = [("direction", C.c_uint8), ("size", C.c_uint8), ("port", C.c_uint16),
                ("count", C.c_uint32), ("data_offset", C.c_uint64)]


class kvm_run_mmio(C.Structure):
    _fields_ = [("phys_addr", C.c_uint64), ("data", C.c_uint8 * 8), ("len", C.c_uint32),
                ("is_write", C.c_uint8)]


assert C.sizeof(kvm_enable_cap) == 104
KVM_ENABLE_CAP = U._iow(0xA3, C.sizeof(kvm_enable_cap))
KVM_GET_DIRTY_LOG = U._iow(0x42, C.sizeof(kvm_dirty_log))
KVM_CLEAR_DIRTY_LOG = U._iowr(0xC0, C.sizeof(kvm_clear_dirty_log))
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
HPAGE = 2 << 20

#: vCPU stats that depend on timing, not on the MMU: left out of the deltas.
_NOISY = re.compile(r"^(halt_|blocking$|preemption_|directed_yield|host_state_reload$|"
                    r"fpu_reload$|signal_exits$|irq_exits$|req_event$|exits$)")


class DeriveError(ValueError):
    """The trace holds something the stream derivation does not understand."""


class ScenarioTrace(TraceInstance):
    """A private tracefs instance with every kvmmmu event plus the kvm:*
    events of :data:`KVM_EVENTS` that exist here, recorded for the calling
    thread only (``set_event_pid`` with its thread id: the vCPU runs in it,
    the memslot and dirty-log ioctls too); :meth:`marker` writes a userspace
    step into the instance buffer (``trace_marker``)."""

    def __init__(self, *, buffer_size_kb=8192):
        super().__init__(None, buffer_size_kb=buffer_size_kb)
        kvm_dir = self.tracefs / "events" / "kvm"
        self.kvm_events = [e for e in KVM_EVENTS if (kvm_dir / e).is_dir()]

    def _set_events(self, on):
        if on:
            # only this thread (it runs the vCPU and makes every ioctl):
            # other VMs on the machine (tests running at the same time) emit
            # the same events into every instance
            self._write("set_event_pid", str(threading.get_native_id()))
        super()._set_events(on)
        for ev in self.kvm_events:
            self._write(f"events/kvm/{ev}/enable", "1" if on else "0")

    def marker(self, payload: dict):
        self._write("trace_marker", MARK_PREFIX + json.dumps(payload, sort_keys=True))

    def _read_all(self, fields):
        if fields:
            self._write("options/fields", "1")
        try:
            return mmutrace.read_trace(self.path / "trace", only_kvmmmu=False)
        finally:
            if fields:
                self._write("options/fields", "0")

    def __exit__(self, *exc):
        try:
            self._set_events(False)
            self._lines = self._read_all(False)
            self._fields = self._read_all(True)
        finally:
            self._remove()


# ---------------------------------------------------------------------------
# Running a scenario
# ---------------------------------------------------------------------------

class _HostSlot:
    """Host memory of one memslot: an anonymous mapping, 2 MiB aligned with
    MADV_HUGEPAGE for THP-backed slots, MADV_NOHUGEPAGE otherwise."""

    def __init__(self, size, thp):
        import numpy as np
        self.map = mmap.mmap(-1, size + HPAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = C.addressof(C.c_char.from_buffer(self.map))
        self.offset = (-base) % HPAGE
        self.hva = base + self.offset
        libc = C.CDLL(None, use_errno=True)
        if libc.madvise(C.c_void_p(self.hva), C.c_size_t(size),
                        MADV_HUGEPAGE if thp else MADV_NOHUGEPAGE) != 0:
            raise OSError(C.get_errno(), "madvise failed")
        self.array = np.frombuffer(self.map, dtype=np.uint8, count=size, offset=self.offset)
        self.size = size

    def close(self):
        self.array = None
        try:
            self.map.close()
        except BufferError:
            pass


def _ioctl(fd, req, arg, what):
    try:
        return fcntl.ioctl(fd, req, arg)
    except OSError as e:
        raise OSError(e.errno, f"{what}: {os.strerror(e.errno)}") from None


def _set_memslot(vm, ms, hslot):
    region = U.kvm_userspace_memory_region(ms.slot, ms.flags, ms.gpa, ms.size,
                                           hslot.hva if hslot else 0)
    _ioctl(vm.fd, U.KVM_SET_USER_MEMORY_REGION, bytes(region), "KVM_SET_USER_MEMORY_REGION")


def _set_cpl(cpu, cpl):
    """Load the segment registers of `cpl` (CR0/CR3/CR4/EFER untouched)."""
    s = cpu.get_sregs()
    if (s.cs.selector & 3) == cpl:
        return
    user = cpl == 3
    s.cs = x86._seg(x86.SEL_UCODE64 if user else x86.SEL_CODE64, code=True, long_mode=True, dpl=cpl)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, x86._seg(x86.SEL_UDATA if user else x86.SEL_DATA, code=False,
                                  long_mode=True, dpl=cpl))
    cpu.set_sregs(s)


def _stats(vm, cpu):
    out = {"vm": vm.stats(), "vcpu0": cpu.stats()}
    return {k: {n: v for n, v in d.items() if not isinstance(v, list) and not _NOISY.match(n)}
            for k, d in out.items()}


def _delta(now, base):
    return {k: {n: v - base[k][n] for n, v in d.items() if v != base[k][n]} for k, d in now.items()}


@dataclass
class Recording:
    """What :func:`record` returns for one scenario."""
    name: str
    lines: list          # [(event, text)]
    fields: list         # [(event, fields text)]
    stats: dict          # {"marks": [{"label", "vm", "vcpu0"}], "end": {"vm", "vcpu0"}}
    init: dict           # the stream's first line
    stream: list         # derived stream lines (dicts), init first
    sources: list        # per stream line: where it comes from (derive_sources)
    exits: list          # KVM_RUN exits per run step, for the report


def stream_init(scn, guest_model, params) -> dict:
    """The stream's ``init`` line for scenario `scn`."""
    from dataclasses import asdict
    return {
        "kind": "init", "version": 1, "mmu": "shadow",
        "params": params,
        "guest_model": asdict(guest_model),
        "manual_dirty_log_protect": scn.manual_dirty_log_protect,
        # the recorder copies each slot's image over the whole slot before the
        # VM starts (_record): every host page is there, written
        "memslots": [dict(ms.to_json(), populate=True) if ms.slot in scn.image else ms.to_json()
                     for ms in scn.memslots],
        "memory": [{"gpa": gpa, "hex": data.hex()} for gpa, data in scn.initial_memory()],
        "vcpus": [dict(id=0, **_initial_regs(scn))],
    }


def _initial_regs(scn):
    from kvmmmu import paging as P
    cr0 = P.X86_CR0_PE | (1 << 4) | P.X86_CR0_PG | P.X86_CR0_WP
    cr4 = P.X86_CR4_PAE | P.X86_CR4_PSE
    efer = P.EFER_LME | P.EFER_LMA | P.EFER_NX
    first = next(s for s in scn.steps if s.op == "run")
    return dict(cr0=cr0, cr3=scn.cr3, cr4=cr4, efer=efer, rflags=RFLAGS, cpl=first.args["cpl"])


def host_params():
    """The kvm module parameters the model takes, from /sys/module/kvm."""
    from kvmmmu.live import kvm_params
    p = kvm_params()
    yn = lambda k: p.get(k, "N") == "Y"
    return {"mmio_caching": yn("mmio_caching"), "eager_page_split": yn("eager_page_split"),
            "nx_huge_pages": yn("nx_huge_pages"), "tdp_mmu": yn("tdp_mmu")}


_RECORDING = threading.Lock()


def record(scn) -> Recording:
    """Run scenario `scn` on /dev/kvm with tracing on; derive its stream.

    One recording at a time per process (a concurrent call raises
    RuntimeError); the thread that calls it runs the vCPU and is the one
    traced."""
    from kvmmmu.live.scenarios import Scenario
    if not isinstance(scn, Scenario):
        raise TypeError(f"scn must be a kvmmmu.live.scenarios.Scenario, not {type(scn).__name__}")
    if not _RECORDING.acquire(blocking=False):
        raise RuntimeError("another scenario is being recorded in this process")
    try:
        return _record(scn)
    finally:
        _RECORDING.release()


def _record(scn) -> Recording:
    from kvmmmu import live
    from kvmmmu.live.scenarios import STACK
    hslots = {}
    exits = []
    try:
        with live.Kvm() as kvm, kvm.create_vm() as vm:
            vm.set_tss_addr(0x7FFBD000)
            if scn.manual_dirty_log_protect:
                cap = kvm_enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0)
                cap.args[0] = scn.manual_dirty_log_protect
                _ioctl(vm.fd, KVM_ENABLE_CAP, bytes(cap), "KVM_ENABLE_CAP")
            for ms in scn.memslots:
                hs = hslots[ms.slot] = _HostSlot(ms.size, ms.thp)
                img = scn.image.get(ms.slot)
                if img is not None:
                    hs.array[:] = memoryview(img)     # populates every host page
                _set_memslot(vm, ms, hs)
            cpu = vm.create_vcpu()
            cpu.set_cpuid(kvm.supported_cpuid())
            init = stream_init(scn, live.host_guest_model(cpu), host_params())
            first = next(s for s in scn.steps if s.op == "run")
            x86.setup_guest(cpu, "4level", cr3=scn.cr3, rip=first.args["rip"], rsp=STACK,
                            cpl=first.args["cpl"])
            cpu.set_regs(rflags=init["vcpus"][0]["rflags"])
            base = _stats(vm, cpu)
            marks = []
            with ScenarioTrace() as tr:
                for step in scn.steps:
                    exits += _do_step(tr, vm, cpu, step, hslots, scn, marks, base)
                end = _delta(_stats(vm, cpu), base)
            # events off and the instance gone before the VM is torn down
            lines, fields = tr.read(), tr.read_fields()
    finally:
        for hs in hslots.values():
            hs.close()
    lines = [(e, t) for e, t in lines if _keep(e, t)]
    fields = [(e, t) for e, t in fields if _keep(e, t)]
    stats = {"marks": marks, "end": end}
    return Recording(scn.name, lines, fields, stats, init, derive_stream(init, lines),
                     derive_sources(init, lines), exits)


def _keep(event, text):
    # An mmu-notifier invalidation outside the guest's memory says nothing
    # about the MMU (the notifier fires for every munmap of this process).
    return event != "kvm_unmap_hva_range"


def _do_step(tr, vm, cpu, step, hslots, scn, marks, base):
    a = step.args
    if step.op == "run":
        stores = list(scn.native_stores.get(a["rip"], ())) + list(a.get("stores", ()))
        tr.marker({"op": "run", "rip": a["rip"], "cpl": a["cpl"], "regs": a.get("regs", {}),
                   "stores": [{"gva": gva, "gpa": gpa, "hex": data.hex()}
                              for gva, gpa, data in stores]})
        _set_cpl(cpu, a["cpl"])
        cpu.set_regs(rip=a["rip"], **a.get("regs", {}))
        got = []
        for _ in range(16):
            reason = cpu.run()
            got.append(cpu.exit_name)
            if reason == U.KVM_EXIT_MMIO:
                mm = kvm_run_mmio.from_buffer_copy(cpu.exit_data(C.sizeof(kvm_run_mmio)))
                tr.marker({"op": "mmio_exit", "gpa": mm.phys_addr, "len": mm.len,
                           "write": bool(mm.is_write)})
                if mm.is_write and mm.phys_addr == STOP_GPA:
                    break                  # the ring-3 stop
                continue                   # a read completes with zeros
            break
        want = "MMIO" if a["cpl"] == 3 and not a.get("to_ring0") else "HLT"
        if got[-1] != want:
            regs = cpu.get_regs()
            raise RuntimeError(f"{scn.name}: run at {a['rip']:#x} stopped with {got} at "
                               f"rip {regs.rip:#x}, expected {want}")
        if a.get("readback"):
            # what the kernel wrote without a trace of the values (an exception
            # frame): read from guest memory after the run
            mem = []
            for gpa, n in a["readback"]:
                ms = next(m for m in scn.memslots if m.gpa <= gpa < m.gpa + m.size)
                data = bytes(hslots[ms.slot].array[gpa - ms.gpa:gpa - ms.gpa + n])
                mem.append({"gpa": gpa, "hex": data.hex()})
            tr.marker({"op": "readback", "mem": mem})
        return [got]
    if step.op == "memslot":
        ms = a["memslot"]
        tr.marker({"op": "memslot", **ms.to_json(),
                   "memory": [{"gpa": g, "hex": d.hex()} for g, d in a.get("fill", {}).items()]})
        old = hslots.pop(ms.slot, None)
        hs = None
        if ms.size:
            hs = hslots[ms.slot] = _HostSlot(ms.size, ms.thp)
            for gpa, data in a.get("fill", {}).items():
                hs.array[gpa - ms.gpa:gpa - ms.gpa + len(data)] = memoryview(data)
        _set_memslot(vm, ms, hs)
        if old is not None:
            old.close()
        return []
    if step.op == "get_dirty_log":
        ms = next(m for m in scn.memslots if m.slot == a["slot"])
        buf = C.create_string_buffer(((ms.size >> 12) + 63) // 64 * 8)
        log = kvm_dirty_log(a["slot"], 0, C.addressof(buf))
        tr.marker({"op": "get_dirty_log", "slot": a["slot"]})
        _ioctl(vm.fd, KVM_GET_DIRTY_LOG, bytes(log), "KVM_GET_DIRTY_LOG")
        tr.marker({"op": "dirty_log_result", "slot": a["slot"], "hex": buf.raw.hex()})
        return []
    if step.op == "clear_dirty_log":
        bm = C.create_string_buffer(a["bitmap"], len(a["bitmap"]))
        clr = kvm_clear_dirty_log(a["slot"], a["num_pages"], a["first_page"], C.addressof(bm))
        tr.marker({"op": "clear_dirty_log", "slot": a["slot"], "first_page": a["first_page"],
                   "num_pages": a["num_pages"], "hex": a["bitmap"].hex()})
        _ioctl(vm.fd, KVM_CLEAR_DIRTY_LOG, bytes(clr), "KVM_CLEAR_DIRTY_LOG")
        return []
    if step.op == "mark":
        tr.marker({"op": "mark", "label": a["label"]})
        marks.append({"label": a["label"], **_delta(_stats(vm, cpu), base)})
        return []
    raise ValueError(f"unknown step op {step.op!r}")


# ---------------------------------------------------------------------------
# Deriving the stream from the trace
# ---------------------------------------------------------------------------

WALKER = ("kvm_mmu_pagetable_walk", "kvm_mmu_paging_element", "kvm_mmu_set_accessed_bit",
          "kvm_mmu_set_dirty_bit", "kvm_mmu_walker_error")


_WALK_RE = re.compile(r"^addr ([0-9a-f]+) pferr ([0-9a-f]+)")
_ELEM_RE = re.compile(r"^pte ([0-9a-f]+) level (\d+)")
_INSN_RE = re.compile(r"^([0-9a-f]+):([0-9a-f]+):([0-9a-f ]+) \((\w+)\)( failed)?$")
PFERR_FETCH = 0x10
_PFN_MASK = ((1 << 52) - 1) & ~0xFFF


@dataclass
class _Walk:
    addr: int
    pferr: int
    lines: list
    gpa: int | None          # the translation (None: the walk failed)


@dataclass
class _Insn:
    """What the stream needs from one emulated instruction: its data
    accesses (in order) and its effect."""
    rip: int
    data: list               # ["r" | "w"] one per memory operand
    effect: tuple | None     # ("store", reg, size) ("cr", n, reg) ("invlpg", reg) ("mov", reg, imm)
    #                          ("wrmsr",)


#: ``mov reg, imm64`` (REX.W B8+r) opcode byte -> register
_MOVABS = {0xB8: "rax", 0xB9: "rcx", 0xBA: "rdx", 0xBB: "rbx"}
MSR_EFER = 0xC0000080


def _decode(rip, code: bytes) -> _Insn:
    """The few instructions the scenarios run through the emulator."""
    if len(code) == 10 and code[0] == 0x48 and code[1] in _MOVABS:
        return _Insn(rip, [], ("mov", _MOVABS[code[1]], int.from_bytes(code[2:], "little")))
    table = {
        b"\x48\x8b\x00": (["r"], None),                      # mov rax, [rax]
        b"\x48\x89\x03": (["w"], ("store", "rax", 8)),       # mov [rbx], rax
        b"\x88\x03": (["w"], ("store", "rax", 1)),            # mov [rbx], al
        b"\x66\x89\x03": (["w"], ("store", "rax", 2)),        # mov [rbx], ax
        b"\x0f\x22\xd8": ([], ("cr", 3, "rax")),
        b"\x0f\x22\xc0": ([], ("cr", 0, "rax")),
        b"\x0f\x22\xe0": ([], ("cr", 4, "rax")),
        b"\x0f\x01\x38": ([], ("invlpg", "rax")),
        b"\x0f\x30": ([], ("wrmsr",)),                      # wrmsr (EFER only)
        b"\xf4": ([], None),                                 # hlt
    }
    if code not in table:
        raise DeriveError(f"emulated instruction {code.hex(' ')} at {rip:#x} is not one the "
                          "derivation knows")
    data, effect = table[code]
    return _Insn(rip, list(data), effect)


def _walk_gpa(addr, elems):
    """The gpa a successful walk of `addr` ends at (from its last element)."""
    pte, level = elems[-1]
    size = 1 << (12 + 9 * (level - 1))
    return (pte & _PFN_MASK & ~(size - 1)) | (addr & (size - 1))


def _tokens(lines):
    """Group walker lines into _Walk tokens; other lines pass through."""
    out = []
    cur = None
    for ev, text in lines:
        if ev == "kvm_mmu_pagetable_walk":
            if cur is not None:
                _finish_walk(cur)
            m = _WALK_RE.match(text)
            cur = _Walk(int(m.group(1), 16), int(m.group(2), 16), [f"{ev}: {text}"], None)
            out.append(cur)
            continue
        if ev in WALKER[1:] and cur is not None:
            cur.lines.append(f"{ev}: {text}")
            continue
        if cur is not None:
            _finish_walk(cur)
            cur = None
        out.append((ev, text))
    if cur is not None:
        _finish_walk(cur)
    return out


def _finish_walk(w):
    if any(l.startswith("kvm_mmu_walker_error") for l in w.lines):
        return
    elems = [tuple(int(x, 16) if i == 0 else int(x) for i, x in enumerate(_ELEM_RE.match(
        l.split(": ", 1)[1]).groups())) for l in w.lines if l.startswith("kvm_mmu_paging_element")]
    w.gpa = _walk_gpa(w.addr, elems)


def _check_derive_args(init, lines):
    if not isinstance(init, dict) or init.get("kind") != "init":
        raise TypeError("init must be the stream's init line (a dict with kind 'init')")
    for key in ("memslots", "vcpus"):
        if key not in init:
            raise ValueError(f"init has no {key!r}")
    lines = list(lines)
    for i, item in enumerate(lines):
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise TypeError(f"lines[{i}] must be an (event, text) pair of str, not {item!r}")
    return lines


def _derive(init: dict, lines) -> list:
    """The vCPU input stream of a recorded scenario (init line first), each
    event with its ``source``.

    `lines` are the recorded ``(event, text)`` pairs, userspace steps
    included as ``tracing_mark_write`` markers.  kvm_pvm emits neither
    ``kvm_exit``/``kvm_entry`` nor ``kvm_page_fault``, so:

    * a walk (``kvm_mmu_pagetable_walk`` and its elements) is an emulator
      translation when it is the instruction fetch of the emulated
      instruction that follows it (access has F, address = the
      instruction's RIP), or a data access of the instruction just emulated
      (one per memory operand of the decoded instruction), or happens at CPL 0
      (all ring-0 code is emulated here); any other walk is a page fault from
      guest execution, with the walk's address and its access as error code;
    * an emulated store gives a ``write`` (``track``: true) at the gpa its
      data walk ended at, of the stored register (whose value the trace shows
      when a ``mov reg, imm64`` was emulated before it, else the value the run
      step preset: ``source`` says which); an MMIO store (no memslot) is no
      write; ``mov crN, rax`` gives ``set_cr``, ``invlpg [rax]`` ``invlpg``,
      ``wrmsr`` to EFER (ecx, eax, edx from emulated ``mov reg, imm64``)
      ``set_efer``;
    * ``entry`` is emitted at each run step (``KVM_RUN``: requests serviced,
      then the root reloaded) and before each page fault not already preceded
      by one; after each instruction emulated at CPL 0 it is
      ``{"kind": "entry", "reload_only": true}``: kvm_pvm's ring-0 emulation
      loop reloads an invalid root between instructions (a new root's
      ``kvm_mmu_get_page`` follows a ``mov cr3`` at once) but leaves pending
      requests (KVM_REQ_MMU_SYNC after a ``mov cr3`` of the same value: the
      ``kvm_mmu_sync_page`` only shows at the next ``KVM_RUN``);
    * memslot changes, dirty-log calls, CPL changes and marks come from the
      recorder's markers;
    * ``kvm_inj_exception`` (an exception kvm_pvm delivers itself): an
      ``entry``, ``set_cpl`` 0 (the handlers are ring 0), then each walk of
      the delivery (IDT gate, TSS.RSP0, six 8-byte frame pushes, the CS
      descriptor) is a ``translate``, each push a ``write`` with ``track``
      false whose bytes the recorder read back from guest memory after the
      run (``readback`` marker);
    * the stores ring-3 code makes natively (KVM sees none) come from the
      scenario (listed in the run marker) as ``write`` with ``track`` false:
      each right after its own write fault, or, if it did not fault, before
      the fault of the run's final stop store.
    """
    lines = _check_derive_args(init, lines)
    out = [dict(init)]
    cpl = init["vcpus"][0]["cpl"]
    slots = {m["slot"]: (m["gpa"], m["size"]) for m in init["memslots"]}
    regs = {}
    pending = None           # the _Insn being emulated (data walks left)
    need_entry = False
    reentered = False        # KVM_RUN again after an MMIO read exit
    stores = []              # native ring-3 stores of the current run not emitted yet
    delivering = False       # an exception is being delivered (IDT, TSS, stack, GDT)
    toks = _tokens(lines)
    readbacks = []           # (token index, {gpa: byte}) of each readback marker
    for k, tok in enumerate(toks):
        if (isinstance(tok, tuple) and tok[0] == MARK_EVENT and tok[1].startswith(MARK_PREFIX)):
            m = json.loads(tok[1][len(MARK_PREFIX):])
            if m["op"] == "readback":
                mem = {}
                for r in m["mem"]:
                    for i, b in enumerate(bytes.fromhex(r["hex"])):
                        mem[r["gpa"] + i] = b
                readbacks.append((k, mem))

    def readback(k, gpa, n):
        for at, mem in readbacks:
            if at > k:
                if all(gpa + i in mem for i in range(n)):
                    return bytes(mem[gpa + i] for i in range(n))
                break
        raise DeriveError(f"no readback of the {n} bytes at {gpa:#x} the kernel wrote")

    def emit_stores(n):
        for st in stores[:n]:
            emit({"kind": "write", "vcpu": 0, "gpa": st["gpa"], "hex": st["hex"], "track": False,
                  "vmm": True, "source": "scenario:native-store"})
        del stores[:n]

    def emit(ev):
        out.append(ev)

    def entry(source):
        nonlocal need_entry, reentered
        if reentered:
            source = "marker:mmio_exit"
            reentered = False
        if cpl == 0 and source == "derived:after-emulation":
            # kvm_pvm's ring-0 emulation loop: the root is reloaded between
            # instructions, pending requests wait for the next KVM_RUN
            emit({"kind": "entry", "vcpu": 0, "reload_only": True, "source": source})
        elif out[-1].get("kind") != "entry" or out[-1].get("reload_only"):
            emit({"kind": "entry", "vcpu": 0, "source": source})
        need_entry = False

    def in_slot(gpa):
        return any(lo <= gpa < lo + n for lo, n in slots.values())

    def finish(insn):
        nonlocal need_entry
        eff = insn.effect
        if eff is None or eff[0] == "store":
            pass
        elif eff[0] == "mov":
            regs[eff[1]] = (eff[2], "trace:kvm_emulate_insn")
        elif eff[0] == "cr":
            if eff[2] not in regs:
                raise DeriveError(f"mov cr{eff[1]} at {insn.rip:#x}: {eff[2]} unknown")
            emit({"kind": "set_cr", "vcpu": 0, "cr": eff[1], "value": regs[eff[2]][0],
                  "source": "trace:kvm_emulate_insn"})
        elif eff[0] == "invlpg":
            if eff[1] not in regs:
                raise DeriveError(f"invlpg at {insn.rip:#x}: {eff[1]} unknown")
            emit({"kind": "invlpg", "vcpu": 0, "gva": regs[eff[1]][0],
                  "source": "trace:kvm_emulate_insn"})
        elif eff[0] == "wrmsr":
            if any(r not in regs for r in ("rcx", "rax", "rdx")):
                raise DeriveError(f"wrmsr at {insn.rip:#x}: ecx/eax/edx unknown")
            if regs["rcx"][0] & 0xFFFFFFFF != MSR_EFER:
                raise DeriveError(f"wrmsr at {insn.rip:#x} to MSR {regs['rcx'][0]:#x}, not EFER")
            value = (regs["rdx"][0] & 0xFFFFFFFF) << 32 | regs["rax"][0] & 0xFFFFFFFF
            emit({"kind": "set_efer", "vcpu": 0, "value": value, "source": "trace:kvm_emulate_insn"})
        need_entry = True

    for k, tok in enumerate(toks):
        if isinstance(tok, _Walk):
            nxt = toks[k + 1] if k + 1 < len(toks) else None
            if pending is not None and pending.data and not tok.pferr & PFERR_FETCH:
                kind = pending.data.pop(0)
                emit({"kind": "translate", "vcpu": 0, "gva": tok.addr, "access": tok.pferr,
                      "source": "trace:kvm_mmu_pagetable_walk"})
                if kind == "w" and tok.gpa is not None and in_slot(tok.gpa):
                    _, reg, size = pending.effect
                    if reg not in regs:
                        raise DeriveError(f"store at {pending.rip:#x}: {reg} unknown")
                    val, src = regs[reg]
                    emit({"kind": "write", "vcpu": 0, "gpa": tok.gpa,
                          "hex": (val & ((1 << 8 * size) - 1)).to_bytes(size, "little").hex(),
                          "track": True, "source": src})
                if not pending.data:
                    finish(pending)
                    pending = None
                continue
            if pending is not None:
                finish(pending)
                pending = None
            fetch_of_next = (isinstance(nxt, tuple) and nxt[0] == "kvm_emulate_insn"
                             and tok.pferr & PFERR_FETCH
                             and int(_INSN_RE.match(nxt[1]).group(2), 16) == tok.addr)
            if need_entry:
                entry("derived:after-emulation")
            if delivering and not fetch_of_next:
                # event delivery: IDT gate, TSS.RSP0, the frame pushes, the
                # CS descriptor; a push is a write without page tracking
                emit({"kind": "translate", "vcpu": 0, "gva": tok.addr, "access": tok.pferr,
                      "source": "trace:kvm_mmu_pagetable_walk"})
                if tok.pferr & 2 and tok.gpa is not None:
                    emit({"kind": "write", "vcpu": 0, "gpa": tok.gpa,
                          "hex": readback(k, tok.gpa, 8).hex(), "track": False,
                          "source": "scenario:readback"})
                continue
            delivering = False
            if fetch_of_next or cpl == 0:
                if cpl == 0 and not fetch_of_next:
                    raise DeriveError(f"a ring-0 walk of {tok.addr:#x} that is neither an "
                                      "instruction fetch nor a data access")
                emit({"kind": "translate", "vcpu": 0, "gva": tok.addr, "access": tok.pferr,
                      "source": "trace:kvm_mmu_pagetable_walk"})
            else:
                entry("derived:before-fault")
                # native stores: those before a faulting store (program order)
                # happened before its fault, the faulting one right after it;
                # all of them before the stop store's fault
                page = tok.addr >> 12
                hit = next((i for i, st in enumerate(stores) if st["gva"] >> 12 == page
                            and tok.pferr & 2), None)
                if page == STOP_GVA >> 12:
                    emit_stores(len(stores))
                elif hit is not None:
                    emit_stores(hit)
                emit({"kind": "page_fault", "vcpu": 0, "addr": tok.addr, "error_code": tok.pferr,
                      "source": "trace:kvm_mmu_pagetable_walk"})
                if hit is not None and page != STOP_GVA >> 12:
                    emit_stores(1)
            continue
        ev, text = tok
        if ev == "kvm_emulate_insn":
            if pending is not None:
                finish(pending)
            m = _INSN_RE.match(text)
            if m is None or m.group(5):
                raise DeriveError(f"emulation failed or unreadable: {text}")
            pending = _decode(int(m.group(2), 16), bytes.fromhex(m.group(3)))
            if not pending.data:
                finish(pending)
                pending = None
            continue
        if pending is not None and ev != MARK_EVENT:
            # an emulated access that did not walk (e.g. an MMIO store to a
            # gva the MMIO cache knows): nothing for the stream
            finish(pending)
            pending = None
        if ev == MARK_EVENT and text.startswith(MARK_PREFIX):
            if pending is not None:
                finish(pending)
                pending = None
            m = json.loads(text[len(MARK_PREFIX):])
            op = m.pop("op")
            src = f"marker:{op}"
            if stores:
                raise DeriveError(f"native stores {stores} were not placed before {op}")
            if op == "run":
                stores = list(m.get("stores", ()))
                if m["cpl"] != cpl:
                    cpl = m["cpl"]
                    emit({"kind": "set_cpl", "vcpu": 0, "cpl": cpl, "source": src})
                regs = {r: (v, "scenario:run-regs") for r, v in m["regs"].items()}
                need_entry = False
                emit({"kind": "entry", "vcpu": 0, "source": src})
            elif op == "memslot":
                ev2 = {"kind": "memslot", **{k2: m[k2] for k2 in
                                             ("slot", "as_id", "gpa", "size", "flags", "thp")}}
                if m["size"]:
                    ev2["fresh"] = True         # the recorder gives it new host memory
                ev2["source"] = src
                emit(ev2)
                for fill in m.get("memory", ()):
                    # what the VMM wrote into the new host memory before adding it
                    emit({"kind": "write", "vcpu": 0, "gpa": fill["gpa"], "hex": fill["hex"],
                          "track": False, "vmm": True, "source": src})
                if m["size"]:
                    slots[m["slot"]] = (m["gpa"], m["size"])
                else:
                    slots.pop(m["slot"], None)
            elif op == "get_dirty_log":
                emit({"kind": "get_dirty_log", "slot": m["slot"], "source": src})
            elif op == "clear_dirty_log":
                emit({"kind": "clear_dirty_log", "slot": m["slot"], "first_page": m["first_page"],
                      "num_pages": m["num_pages"], "hex": m["hex"], "source": src})
            elif op == "mark":
                emit({"kind": "mark", "label": m["label"], "source": src})
            elif op == "readback":
                pass
            elif op == "mmio_exit":
                # the recorder completes an MMIO read and runs the vCPU again
                # (a full entry); the ring-3 stop store ends the run step
                reentered = not m["write"]
                need_entry = need_entry or reentered
            elif op == "dirty_log_result":
                last = out[-1]
                if last.get("kind") != "get_dirty_log" or last["slot"] != m["slot"]:
                    raise DeriveError("a dirty_log_result marker not after its get_dirty_log")
                last["result_hex"] = m["hex"]
            else:
                raise DeriveError(f"unknown marker {op!r}")
            continue
        if ev == "kvm_inj_exception":
            # kvm_pvm delivers the exception itself before re-entering: the
            # requests of that entry are serviced first, then the delivery
            # (to a ring-0 handler in these scenarios)
            entry("derived:event-delivery")
            delivering = True
            if cpl != 0:
                cpl = 0
                emit({"kind": "set_cpl", "vcpu": 0, "cpl": 0, "source": "trace:kvm_inj_exception"})
            continue
        if ev in ("kvm_page_fault", "kvm_exit", "kvm_entry", "kvm_cr"):
            raise DeriveError(f"{ev} in the trace: the derivation is written for kvm_pvm, "
                              "whose scenarios emit none (no exits traced, no exceptions)")
    if pending is not None:
        finish(pending)
    return out


#: what :func:`derive_stream` moves out of the stream into the sources
_SIDE_FIELDS = ("source", "result_hex")


def derive_stream(init: dict, lines) -> list:
    """The vCPU input stream of a recorded scenario, init line first: only the
    fields docs/STREAM.md defines (plus ``reload_only`` on some entries).  How
    each event was derived: :func:`derive_sources`; the rules:
    :func:`_derive`."""
    return [{k: v for k, v in ev.items() if k not in _SIDE_FIELDS} for ev in _derive(init, lines)]


def derive_sources(init: dict, lines) -> list:
    """Per line of :func:`derive_stream`'s stream, where it comes from:
    ``{"line": n (1-based), "kind", "source"}`` (``trace:<event>``,
    ``marker:<op>``, ``derived:<rule>``, ``scenario:<what>``) and, for a
    ``get_dirty_log``, ``result_hex``: the bitmap the kernel returned."""
    out = []
    for n, ev in enumerate(_derive(init, lines), 1):
        side = {k: ev[k] for k in _SIDE_FIELDS if k in ev}
        out.append({"line": n, "kind": ev["kind"], "source": side.get("source", "scenario:init"),
                    **({"result_hex": side["result_hex"]} if "result_hex" in side else {})})
    return out


def mmu_lines(lines):
    """The kvmmmu events of `lines` as ``"event: text"``."""
    return [f"{e}: {t}" for e, t in lines if e in mmutrace._BY_NAME]


_SET_SPTE_RE = re.compile(r"^(gfn \S+ spte )([0-9a-f]+)( .* at )([0-9a-f]+)$")
_PFN_RE = re.compile(r"pfn [0-9a-f]+")


def mask_line(line: str) -> str:
    """`line` without what depends on the host: the pfn bits of SPTE values,
    sptep addresses and pfns."""
    ev, _, text = line.partition(": ")
    if ev == "kvm_mmu_set_spte":
        m = _SET_SPTE_RE.match(text)
        if m:
            spte = int(m.group(2), 16) & ~_PFN_MASK
            text = f"{m.group(1)}{spte:x}/pfn{m.group(3)}*"
    elif ev in ("kvm_mmu_spte_requested",):
        text = _PFN_RE.sub("pfn *", text)
    elif ev in ("fast_page_fault", "kvm_tdp_mmu_spte_changed", "kvm_mmu_split_huge_page"):
        text = re.sub(r"(sptep|spte|old_spte|new_spte) [0-9a-fx]+", r"\1 *", text)
    return f"{ev}: {text}"


def main(argv=None):
    from kvmmmu.live import scenarios
    ap = argparse.ArgumentParser(prog="python -m kvmmmu.live.record", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--print", action="store_true")
    ns = ap.parse_args(argv)
    t_all = time.perf_counter()
    for name in ns.names or list(scenarios.SCENARIOS):
        t0 = time.perf_counter()
        rec = record(scenarios.get(name))
        if ns.out is not None:
            save(rec, ns.out)
        if ns.print:
            for e, t in rec.lines:
                print(f"{e}: {t}")
            print(json.dumps(rec.stats, indent=1))
            for ev in rec.stream[1:]:
                print(json.dumps(ev))
        print(f"{name}: {len(rec.lines)} events, {len(rec.stream) - 1} stream events, "
              f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    print(f"all: {time.perf_counter() - t_all:.2f} s", file=sys.stderr)


def save(rec: Recording, out: Path):
    """Write `rec` as ``out/<name>.{trace,fields,stats.json,stream.jsonl}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{rec.name}.trace").write_text("".join(f"{e}: {t}\n" for e, t in rec.lines))
    (out / f"{rec.name}.fields").write_text("".join(f"{e}: {t}\n" for e, t in rec.fields))
    (out / f"{rec.name}.stats.json").write_text(json.dumps(rec.stats, indent=1, sort_keys=True) + "\n")
    (out / f"{rec.name}.stream.jsonl").write_text(
        "".join(json.dumps(ev, separators=(",", ":")) + "\n" for ev in rec.stream))
    (out / f"{rec.name}.sources.jsonl").write_text(
        "".join(json.dumps(ev, separators=(",", ":")) + "\n" for ev in rec.sources))


def load_trace(path) -> list:
    """A stored ``.trace`` (or ``.fields``) file as ``(event, text)`` pairs."""
    out = []
    for line in Path(path).read_text().splitlines():
        ev, sep, text = line.partition(": ")
        if not sep:
            raise ValueError(f"{path}: not an 'event: text' line: {line!r}")
        out.append((ev, text))
    return out


def load_stream(path) -> list:
    """A stored ``.stream.jsonl`` as a list of dicts."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


if __name__ == "__main__":
    main()
