"""Workloads shaped like the kernel's own MMU selftests
(tools/testing/selftests/kvm: ``dirty_log_perf_test``, ``access_tracking_perf_test``,
``memslot_perf_test``, ``mmu_stress_test``, ``kvm_page_table_test``), run on the model,
plus CR3-switching processes on shadow paging and a TD's life on the mirrored TDP MMU.

A workload builds a VM (any MMU flavour: ``"tdp_mmu"``, ``"tdp"`` - TDP on the shadow
MMU, ``kvm.tdp_mmu=N`` -, or ``"shadow"`` paging), drives it the way the selftest's host
and guest code do, and returns a :class:`Report`: the selftest's own figures (populate
time, per-iteration dirty time, get/clear dirty log time, ...) next to the model's counts
(faults by kind, SPTEs by level, shadow pages, rmap descriptors, bytes per structure),
with a timeline sampled at every phase end.

    from kvmmmu import workloads as W
    rep = W.run("dirty_log", mmu="tdp_mmu", vcpus=2, vcpu_mib=64, iterations=3)
    print(rep.text())
    rep.summary["check_dirty_log_exact"]  # every iteration reported exactly what was written

**The guest CPU.**  A guest access is what the hardware does with it
(:class:`GuestCpu`): the CPU walks the tables the MMU built (the TDP root for the TDP
flavours, the shadow root for shadow paging); if the last SPTE is a present leaf that
allows the access, there is no exit and the CPU sets the SPTE's Accessed bit (and Dirty
for a write) unless the SPTE is A/D-disabled; otherwise the vCPU exits with the error code
the hardware reports (an EPT violation / NPF for TDP - the gpa -, a #PF with CR2 for
shadow paging - the gva -) into ``kvm_mmu_page_fault``, re-enters (``vcpu_enter_guest``)
and retries.  Every KVM_RUN starts with an entry.  On the TDP MMU the batch entry
``TdpMmu.guest_access`` does the same in nogil C passes unless a stream is recorded;
``batch=False`` keeps its scalar reference.  A workload's reads and writes go in one
call, in the guest loop's order, with per-access write flags.

**Streams.**  ``run(..., stream=PATH)`` records what the vCPUs and the VMM did as a
vCPU input stream (docs/STREAM.md: memslots, entries, faults with their error codes, CR3
loads, dirty-log ioctls, a ``mark`` per timeline sample) that ``kvmmmu.replay`` runs to
the same statistics.  Host events (munmap, THP split, aging) have no stream event: the
workloads that use them refuse to record (:class:`WorkloadParamError` on ``stream``).

**Host memory** is populated when a slot is created (a VMM that uses MAP_POPULATE), so
guest faults never wait for the host's own page faults; ``backing="anonymous_thp"``
backs the slots with transparent huge pages.

Invariants a run checks (``check=True``, the default): ``VM.audit()`` after every
phase; the dirty-log loop's bitmaps equal the pages the guest wrote in that iteration;
the idle-page count of access tracking equals the pages not re-accessed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kvmmmu import replay as _replay
from kvmmmu._core import spte as S
from kvmmmu._core.defs import PAGE_SHIFT, PAGE_SIZE, RET_PF_EMULATE, RET_PF_NAMES
from kvmmmu._core.pt_arena import HEADER_DTYPE
from kvmmmu._core.rmap import SIZEOF_PTE_LIST_DESC
from kvmmmu.guest_tables import GuestPageTables
from kvmmmu.host import MmuNotifyEvent
from kvmmmu.memslots import (KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
                             KVM_MEM_LOG_DIRTY_PAGES)
from kvmmmu.mmu import mark_page_dirty_in_slot, tdp_hardware_error_code
from kvmmmu.paging import (PFERR_FETCH_MASK, PFERR_PRESENT_MASK, PFERR_RSVD_MASK,
                           PFERR_USER_MASK, PFERR_WRITE_MASK)

__all__ = ["WORKLOADS", "Workload", "Param", "Report", "WorkloadParamError", "WorkloadError",
           "GuestCpu", "run", "run_cell"]

MiB = 1 << 20
PAGES_PER_2M = 512
#: faults one access may take before the run gives up (a fault that never
#: makes progress is a model bug or a guest #PF the workload did not expect)
MAX_FAULTS_PER_ACCESS = 4
#: the fault counters of ``vcpu->stat`` a report shows, in this order
FAULT_KINDS = ("pf_taken", "pf_fixed", "pf_fast", "pf_spurious", "pf_emulate",
               "pf_mmio_spte_created", "pf_guest")
#: the structures a report measures (bytes), in this order
MEM_KINDS = ("spt", "shadowed_info", "sp_headers", "rcu_pending", "rmap_desc", "memslot_meta",
             "dirty_bitmap")
SIZEOF_KVM_MMU_PAGE = HEADER_DTYPE.itemsize
MMUS = ("tdp_mmu", "tdp", "shadow")
#: where the guest page tables of the paging workloads live (a slot of their own)
TABLES_GPA = 1 << 40


class WorkloadParamError(ValueError):
    """A bad workload name, parameter or value; ``.param`` names it."""

    def __init__(self, param: str, msg: str):
        super().__init__(f"{param}: {msg}")
        self.param = param


class WorkloadError(RuntimeError):
    """The model refused what the workload drove (a fault that never resolves,
    a negative errno from a fault, a dirty log that disagrees with the
    guest's writes)."""


# ---------------------------------------------------------------------------
# Parameters and the registry
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One workload parameter: its type (int, float, bool or str), default,
    help text, and the allowed values (``choices``) or range (``lo``..``hi``)."""
    name: str
    type: type
    default: object
    help: str
    choices: tuple | None = None
    lo: float | None = None
    hi: float | None = None

    def check(self, value):
        """`value` converted to :attr:`type` (ints for a float parameter), or
        :class:`WorkloadParamError` naming the parameter."""
        t = self.type
        if t is float and type(value) is int:
            value = float(value)
        if type(value) is not t:
            raise WorkloadParamError(self.name, f"expected {t.__name__}, got "
                                                f"{type(value).__name__} {value!r}")
        if self.choices is not None and value not in self.choices:
            raise WorkloadParamError(self.name, f"{value!r} is not one of {self.choices}")
        if self.lo is not None and value < self.lo:
            raise WorkloadParamError(self.name, f"{value!r} is below {self.lo}")
        if self.hi is not None and value > self.hi:
            raise WorkloadParamError(self.name, f"{value!r} is above {self.hi}")
        return value


@dataclass(frozen=True)
class Workload:
    """A registered workload: ``run(**params)`` builds and drives a VM."""
    name: str
    doc: str
    params: dict
    mmus: tuple
    fn: Callable = field(repr=False)
    streamable: bool = True

    @property
    def summary_line(self) -> str:
        return self.doc.strip().splitlines()[0]


WORKLOADS: dict[str, Workload] = {}

_COMMON = (
    Param("vcpus", int, 1, "vCPUs, each with its own region of guest memory (selftest -v)",
          lo=1, hi=64),
    Param("vcpu_mib", int, 64, "MiB of guest memory per vCPU (selftest -b)", lo=1, hi=1 << 22),
    Param("backing", str, "anonymous", "host backing of guest memory (selftest -s)",
          choices=("anonymous", "anonymous_thp")),
    Param("host", str, "ept", "the host's TDP hardware (EPT or NPT; shadow paging uses the "
                              "legacy SPTE format either way)", choices=("ept", "npt")),
    Param("ad_bits", bool, True, "hardware Accessed/Dirty bits in the TDP tables "
                                 "(kvm_intel.enable_ept_ad_bits)"),
    Param("eager_page_split", bool, True, "kvm.eager_page_split: split huge SPTEs when dirty "
                                          "logging is enabled (or cleared, with manual protect)"),
    Param("nx_huge_pages", bool, False, "kvm.nx_huge_pages: the iTLB-multihit mitigation"),
)


def workload(name: str, *, mmus=MMUS, params=(), streamable=True, common=None):
    """Register a workload function ``fn(g: Guest, p: dict) -> None``; its
    docstring is the workload's doc.  It takes the :data:`_COMMON` parameters
    (or those named in `common`) and its own `params`."""
    def deco(fn):
        base = _COMMON if common is None else tuple(q for q in _COMMON if q.name in common)
        ps = {q.name: q for q in (*base, *params)}
        WORKLOADS[name] = Workload(name, fn.__doc__ or name, ps, tuple(mmus), fn, streamable)
        return fn
    return deco


def _params(wl: Workload, given: dict) -> dict:
    out = {}
    for k in given:
        if k not in wl.params:
            raise WorkloadParamError(k, f"workload {wl.name!r} has no parameter {k!r} "
                                        f"(it has: {', '.join(wl.params)})")
    for name, q in wl.params.items():
        out[name] = q.check(given[name]) if name in given else q.default
    return out


# ---------------------------------------------------------------------------
# The guest CPU: what the hardware does with an access
# ---------------------------------------------------------------------------

_LARGE = S.PT_PAGE_SIZE_MASK
_W = S.PT_WRITABLE_MASK
_USER = S.PT_USER_MASK


class GuestCpu:
    """The hardware side of guest accesses for one VM (see the module docstring).

    ``access(vcpu, addrs, write=False, exec=False)`` takes page addresses - gpas on
    the TDP flavours, gvas on shadow paging - in order and returns how many exits
    they took.  ``record`` (a list) receives the stream events (``page_fault``,
    ``entry``) the scalar path produced.

    On the TDP MMU, unless a stream is recorded, the accesses go to
    ``TdpMmu.guest_access`` (its nogil batch, or with ``batch=False`` its
    scalar reference); otherwise this class's loop does the same steps and
    records them."""

    def __init__(self, vm, *, batch: bool = True, record: list | None = None):
        self.vm = vm
        self.fmt = vm.fmt
        m = self.fmt.masks()
        self.ept = bool(m["is_ept"])
        self.acc_mask, self.dirty_mask = int(m["accessed_mask"]), int(m["dirty_mask"])
        self.record = record
        self.tdp_mmu = vm.tdp_mmu_enabled
        self.shadow = not vm.tdp_enabled
        #: the TDP MMU's own guest_access (batch or its scalar reference) unless
        #: a stream is recorded: the loop here writes every exit as an event
        self.tdp_access = self.tdp_mmu and record is None
        self.batch = bool(batch)
        #: PML (EPT): a D bit the CPU sets logs the gfn; the model flushes the
        #: log at once (the TDP flavours only: gva != gpa on shadow paging)
        self.pml = bool(vm.cpu_dirty_log_size) and not self.shadow
        self.exits = 0

    # -- the walk the CPU does --------------------------------------------------------
    def _last_spte(self, vcpu, addr: int) -> tuple[int, int, int]:
        """``(sptep, spte, level)`` of the last entry on `addr`'s path, sptep 0
        when there is no root or the walk stopped above a table."""
        vm = self.vm
        if self.tdp_mmu:
            root = vm.mmu_backend.vcpu_root.get(vcpu.index)
            if root is None:
                return 0, 0, 0
            a = vm.arena
            sp, level = root.sp, root.role.level
            gfn = (addr >> PAGE_SHIFT) | vm.gfn_direct_bits
            while True:
                sptep = a.sp_sptep(sp, (gfn >> (9 * (level - 1))) & 511)
                spte = a.mmu_spte_get_lockless(sptep)
                if level == 1 or spte & _LARGE or not S.is_shadow_present_pte(spte):
                    return sptep, spte, level
                sp = a.spte_to_child_sp(spte)
                level -= 1
        walk = vm.mmu_backend.shadow_walk(vcpu, addr)
        if not walk:
            return 0, 0, 0
        sp, idx, spte = walk[-1]
        return sp.pa | (idx << 3), spte, sp.level

    def _allowed(self, spte: int, level: int, write: bool, exec: bool, user: bool) -> bool:
        fmt = self.fmt
        if not S.is_shadow_present_pte(spte) or not (level == 1 or spte & _LARGE):
            return False
        if fmt.is_access_track_spte(spte) or fmt.is_mmio_spte(spte):
            return False
        if write and not spte & _W:
            return False
        if exec and not fmt.is_executable_pte(spte):
            return False
        if self.ept and not spte & 1:                     # EPT read permission
            return False
        if user and self.shadow and not spte & _USER:
            return False
        return True

    def _error_code(self, vcpu, spte: int, level: int, write: bool, exec: bool) -> int:
        if not self.shadow:
            return tdp_hardware_error_code(self.fmt, self.ept, spte, level, write=write,
                                           exec=exec)
        # a #PF from the shadow tables: P for a protection fault on a present
        # leaf (RSVD with it for an MMIO SPTE), W, U at CPL 3, I/D for a fetch
        ec = (PFERR_WRITE_MASK if write else 0) | (PFERR_FETCH_MASK if exec else 0)
        if vcpu.cpu.cpl == 3:
            ec |= PFERR_USER_MASK
        if spte and self.fmt.is_mmio_spte(spte):
            ec |= PFERR_RSVD_MASK | PFERR_PRESENT_MASK
        elif S.is_shadow_present_pte(spte) and (level == 1 or spte & _LARGE):
            ec |= PFERR_PRESENT_MASK
        return ec

    # -- KVM_RUN ------------------------------------------------------------------------
    def enter(self, vcpu) -> None:
        """``vcpu_enter_guest``: service the requests, load the root."""
        if self.record is not None:
            self.record.append({"kind": "entry", "vcpu": vcpu.vcpu_id})
        r = vcpu.vcpu_enter_guest() if hasattr(vcpu, "vcpu_enter_guest") else None
        if r is not None and r < 0:
            raise WorkloadError(f"vCPU {vcpu.vcpu_id}: the root load failed ({r})")

    def access(self, vcpu, addrs, *, write=False, exec: bool = False) -> int:
        """The guest touches every page address of `addrs` (uint64), in order,
        starting with a VM entry; `write`: all writes (True), all reads, or a
        bool array saying which are writes.  Returns the exits (faults) taken."""
        addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
        if isinstance(write, np.ndarray):
            write = np.ascontiguousarray(write, dtype=bool)
            if write.shape != addrs.shape:
                raise ValueError(f"write has {write.shape[0]} flags, addrs {addrs.shape[0]}")
        self.enter(vcpu)
        if not addrs.size:
            return 0
        if self.tdp_access:
            n = int(self.vm.mmu_backend.guest_access(
                vcpu, addrs >> np.uint64(PAGE_SHIFT), write=write, exec=exec,
                batch=self.batch, max_faults=MAX_FAULTS_PER_ACCESS).sum(dtype=np.int64))
            self.exits += n
            return n
        writes = write.tolist() if isinstance(write, np.ndarray) else [bool(write)] * addrs.size
        return self._access_scalar(vcpu, addrs.tolist(), writes, exec)

    def _access_scalar(self, vcpu, addrs: list, writes: list, exec: bool) -> int:
        a = self.vm.arena
        user = vcpu.cpu.cpl == 3
        rec = self.record
        fault = vcpu.kvm_mmu_page_fault
        exits = 0
        for addr, write in zip(addrs, writes):
            hw_bits = self.acc_mask | (self.dirty_mask if write else 0)
            last = None
            for tries in range(MAX_FAULTS_PER_ACCESS + 1):
                sptep, spte, level = self._last_spte(vcpu, addr)
                if sptep and self._allowed(spte, level, write, exec, user):
                    if (spte & hw_bits) != hw_bits and S.spte_ad_enabled(spte):
                        ok, _ = a.try_cmpxchg64(sptep, spte, spte | hw_bits)
                        if not ok:
                            continue                    # changed meanwhile: walk again
                        if self.pml and write and not spte & self.dirty_mask:
                            gfn = addr >> PAGE_SHIFT
                            mark_page_dirty_in_slot(self.vm, vcpu.gfn_to_memslot(gfn), gfn)
                    break
                if tries == MAX_FAULTS_PER_ACCESS:
                    raise WorkloadError(f"vCPU {vcpu.vcpu_id}: the access to {addr:#x} still "
                                        f"faults after {tries} faults (last {last})")
                ec = self._error_code(vcpu, spte, level, write, exec)
                if rec is not None:
                    rec.append({"kind": "page_fault", "vcpu": vcpu.vcpu_id, "addr": addr,
                                "error_code": ec})
                r = fault(addr, ec)
                exits += 1
                last = RET_PF_NAMES.get(r, r)
                if r < 0:
                    raise WorkloadError(f"vCPU {vcpu.vcpu_id}: the fault on {addr:#x} "
                                        f"failed with {r}")
                self.enter(vcpu)
                if r == RET_PF_EMULATE:
                    break                               # the instruction was emulated
        self.exits += exits
        return exits


# ---------------------------------------------------------------------------
# The harness: a VM built like a stream's init line, a clock, a timeline
# ---------------------------------------------------------------------------

class Guest:
    """The VM a workload drives, built from a stream ``init`` line (so that a
    recorded run and its replay start from the same state), with its
    :class:`GuestCpu`, the phase clock and the timeline sampler."""

    def __init__(self, mmu: str, p: dict, *, seed: int, record: bool, batch: bool,
                 progress=None, check: bool = True):
        #: audit the VM after each phase (``audit``) and fail on a failed check
        self.check = check
        self.mmu = mmu
        self.rng = np.random.default_rng(seed)
        self.progress = progress
        self.events: list | None = [] if record else None
        self.init = {
            "kind": "init", "version": 1, "mmu": mmu,
            "params": {"eager_page_split": p["eager_page_split"],
                       "nx_huge_pages": p["nx_huge_pages"]},
            "host": {"tdp": p.get("host", "ept"), "ad_bits": p.get("ad_bits", True)},
            "guest_model": {}, "memslots": [], "memory": [], "vcpus": [],
        }
        self.thp = p.get("backing") == "anonymous_thp"
        self.vm = None
        self.cpu = None
        self._batch = batch
        self.phases: list[dict] = []
        self.timeline: list[dict] = []
        self.summary: dict = {}
        self.checks: dict = {}

    # -- set-up (before start: part of the init line) ----------------------------------
    def add_slot(self, slot: int, gpa: int, size: int, *, thp: bool | None = None,
                 flags: int = 0) -> None:
        self.init["memslots"].append({"slot": slot, "as_id": 0, "gpa": gpa, "size": size,
                                      "flags": flags, "thp": self.thp if thp is None else thp,
                                      "populate": True})

    def adopt(self, vm) -> None:
        """Drive a VM built elsewhere (one a stream's init line cannot
        describe, e.g. a TD): no stream, the scalar guest CPU."""
        self.vm = vm
        self.vcpus = vm.vcpus
        self.cpu = GuestCpu(vm, batch=False, record=None)
        self.buffers = {s.id: (s.userspace_addr, s.npages << PAGE_SHIFT) for s in vm.memslots[0]}

    def start(self, nr_vcpus: int, *, manual_protect: int = 0) -> None:
        """Build the VM (``replay.build_vm``) with `nr_vcpus` vCPUs in their
        reset state; `manual_protect`: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags."""
        if manual_protect:
            self.init["manual_dirty_log_protect"] = manual_protect
        fresh = _fresh_regs()
        self.init["vcpus"] = [{"id": i, **fresh} for i in range(nr_vcpus)]
        self.vm = _replay.build_vm(self.init)
        self.cpu = GuestCpu(self.vm, batch=self._batch, record=self.events)
        self.vcpus = self.vm.vcpus
        #: slot id -> (hva, bytes): the VMM's host buffer of each slot, kept
        #: across deletes so a slot can be re-created on the same memory
        self.buffers = {s.id: (s.userspace_addr, s.npages << PAGE_SHIFT)
                        for s in self.vm.memslots[0]}

    def boot_paging(self, tables: dict, others=()) -> None:
        """After the VMM wrote guest page tables (``tables``: vCPU id -> its
        GuestPageTables; `others`: tables no vCPU starts on), load each
        vCPU's registers as KVM_SET_SREGS would (long mode, CPL 3, its
        tables), and put every table page and the registers in the init
        line."""
        vm = self.vm
        regions = []
        for t in {id(t): t for t in (*tables.values(), *others)}.values():
            regions.append((t.table_gpa, t.tables_used))
        for gpa, n in regions:
            data = vm.read_guest(gpa, n * PAGE_SIZE)
            for i in range(n):
                page = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                if page.count(0) != PAGE_SIZE:
                    end = len(page.rstrip(b"\0"))
                    self.init["memory"].append({"gpa": gpa + i * PAGE_SIZE,
                                                "hex": page[:end].hex()})
        for regs in self.init["vcpus"]:
            t = tables[regs["id"]]
            regs.update(long_mode_regs(int(t.cr3)))
            _replay.set_sregs(vm.vcpus[regs["id"]], regs)

    # -- the VMM's ioctls, recorded -------------------------------------------------------
    def _ev(self, **ev) -> None:
        if self.events is not None:
            self.events.append(ev)

    def set_memslot(self, slot: int, gpa: int, size: int, flags: int, *, thp=None) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` for an existing host buffer (a move,
        new flags, a delete with size 0, a re-creation of a deleted slot)."""
        buf = self.buffers.get(slot)
        if buf is None or size > buf[1]:
            raise WorkloadError(f"slot {slot} has no host buffer of {size} bytes")
        thp = self.thp if thp is None else thp
        self._ev(kind="memslot", slot=slot, as_id=0, gpa=gpa, size=size, flags=flags, thp=thp)
        self.vm.set_user_memory_region(slot, flags, gpa, size, buf[0] if size else 0)

    def get_dirty_log(self, slot: int) -> np.ndarray:
        self._ev(kind="get_dirty_log", slot=slot)
        return self.vm.get_dirty_log(slot)

    def clear_dirty_log(self, slot: int, npages: int, bitmap: np.ndarray) -> None:
        bitmap = np.ascontiguousarray(bitmap, dtype=np.uint64)
        self._ev(kind="clear_dirty_log", slot=slot, first_page=0, num_pages=npages,
                 hex=bitmap.astype("<u8").tobytes().hex())
        self.vm.clear_dirty_log(slot, 0, npages, bitmap)

    # -- clock and samples ----------------------------------------------------------------
    def phase(self, name: str, fn: Callable[[], dict | None], *, sample: bool = True) -> dict:
        """Run `fn`, time it, record ``{"name", "seconds", **counts}`` and a
        timeline sample (and a stream ``mark``)."""
        t0 = time.perf_counter()
        counts = fn() or {}
        dt = time.perf_counter() - t0
        ph = {"name": name, "seconds": dt, **counts}
        self.phases.append(ph)
        if sample:
            self.sample(name)
        return ph

    def sample(self, phase: str) -> None:
        self._ev(kind="mark", label=phase)
        self.timeline.append({"step": len(self.timeline), "phase": phase,
                              "mem": mem_by_structure(self.vm),
                              "faults": faults_by_kind(self.vm)})

    def tick(self, desc: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(desc, done, total)

    def audit(self) -> None:
        """``VM.audit()`` (raises on the first broken invariant), when checking."""
        if self.check:
            self.vm.audit()


def _fresh_regs() -> dict:
    """A new vCPU's registers (``kvm_vcpu_reset`` as the model has them)."""
    from kvmmmu.paging import CpuState
    c = CpuState.nonpaging()
    return {"cr0": c.cr0, "cr3": c.cr3, "cr4": c.cr4, "efer": c.efer, "rflags": c.rflags,
            "cpl": c.cpl}


def long_mode_regs(cr3: int) -> dict:
    """4-level long mode with NX and WP, CPL 3 (a guest process)."""
    from kvmmmu import paging as pg
    return {"cr0": pg.X86_CR0_PE | pg.X86_CR0_PG | pg.X86_CR0_WP,
            "cr3": cr3, "cr4": pg.X86_CR4_PAE,
            "efer": pg.EFER_LME | pg.EFER_LMA | pg.EFER_NX, "rflags": 2, "cpl": 3}


def faults_by_kind(vm) -> dict:
    """The fault counters summed over the vCPUs (cumulative)."""
    out = dict.fromkeys(FAULT_KINDS, 0)
    for v in vm.vcpus:
        d = v.stat.as_dict()
        for k in FAULT_KINDS:
            out[k] += int(d[k])
    return out


def mem_by_structure(vm) -> dict:
    """Bytes in use per MMU structure: the SPTE pages of the live MMU pages
    (``spt``), the shadowed-translation pages of indirect shadow pages
    (``shadowed_info``), their ``struct kvm_mmu_page`` headers, the pages and
    headers of zapped TDP MMU pages still waiting for their RCU grace period
    (``rcu_pending``), ``pte_list_desc`` rmap descriptors, the memslots' arch
    metadata (rmap heads, lpage_info, write tracking) and dirty bitmaps."""
    st = vm.arena.stats()
    meta = dirty = 0
    for slots in vm.memslots:
        for s in slots:
            meta += s.arch.nbytes
            if s.dirty_bitmap is not None:
                dirty += s.dirty_bitmap.nbytes
    pending = int(st["rcu_pending"])
    return {"spt": (int(st["spt_tables"]) - pending) * PAGE_SIZE,
            "shadowed_info": int(st["info_tables"]) * PAGE_SIZE,
            "sp_headers": int(st["sps"]) * SIZEOF_KVM_MMU_PAGE,
            "rcu_pending": pending * (PAGE_SIZE + SIZEOF_KVM_MMU_PAGE),
            "rmap_desc": rmap_descs(vm) * SIZEOF_PTE_LIST_DESC,
            "memslot_meta": int(meta), "dirty_bitmap": int(dirty)}


def rmap_descs(vm) -> int:
    """``pte_list_desc`` objects in rmap and parent-pte chains: those the pool
    handed out minus those still in the vCPUs' topup caches."""
    cached = sum(int(v.mmu_pte_list_desc_cache.nobjs) for v in vm.vcpus)
    return int(vm.rmap_pool.nr_active) - cached


def mmu_counts(vm) -> dict:
    """The end-of-run MMU counts of a report: SPTEs by level, shadow/TDP pages,
    rmap descriptors, and the VM statistics that count zaps and flushes."""
    st = vm.stat.as_dict()
    a = vm.arena.stats()
    return {"pages_4k": int(st["pages_4k"]), "pages_2m": int(st["pages_2m"]),
            "pages_1g": int(st["pages_1g"]), "mmu_pages": int(a["sps"]),
            "rmap_descs": rmap_descs(vm),
            "max_mmu_rmap_size": int(st["max_mmu_rmap_size"]),
            "mmu_shadow_zapped": int(st["mmu_shadow_zapped"]),
            "mmu_cache_miss": int(st["mmu_cache_miss"]),
            "mmu_unsync": int(st["mmu_unsync"]),
            "remote_tlb_flush": int(st["remote_tlb_flush"]),
            "tlb_flush": sum(int(v.stat.as_dict()["tlb_flush"]) for v in vm.vcpus)}


def end_counts(vm) -> dict:
    """A report's closing counts: faults by kind, :func:`mmu_counts` and the
    bytes per structure (``mem_*``)."""
    return {**faults_by_kind(vm), **mmu_counts(vm),
            **{"mem_" + k: v for k, v in mem_by_structure(vm).items()}}


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------

@dataclass
class Report:
    """What a workload measured (see the module docstring and ``to_dict``)."""
    workload: str
    mmu: str
    seed: int
    params: dict
    phases: list
    timeline: list
    summary: dict
    stream: str | None = None

    def to_dict(self) -> dict:
        return {"workload": self.workload, "mmu": self.mmu, "seed": self.seed,
                "params": dict(self.params), "phases": self.phases,
                "timeline": self.timeline, "summary": self.summary}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def text(self) -> str:
        """The selftest-style report: the parameters, each phase's time and
        counts, then the model's counts."""
        p = self.params
        lines = [f"{self.workload} on mmu={self.mmu} (seed {self.seed})",
                 "  params: " + ", ".join(f"{k}={v}" for k, v in p.items())]
        for ph in self.phases:
            counts = ", ".join(_fmt_count(k, v) for k, v in ph.items()
                               if k not in ("name", "seconds"))
            lines.append(f"  {ph['name']:<28s} {ph['seconds']:9.6f} s"
                         + (f"   {counts}" if counts else ""))
        s = self.summary
        lines.append("  faults:  " + ", ".join(f"{k} {s[k]:,}" for k in FAULT_KINDS))
        lines.append("  SPTEs:   " + ", ".join(f"{k} {s[k]:,}" for k in
                                                ("pages_4k", "pages_2m", "pages_1g"))
                     + f"; MMU pages {s['mmu_pages']:,}, rmap descriptors {s['rmap_descs']:,}")
        lines.append("  memory:  " + ", ".join(f"{k} {_human(s['mem_' + k])}"
                                                for k in MEM_KINDS))
        for k, v in s.items():
            if k.startswith("check_"):
                lines.append(f"  {k[6:]}: {'ok' if v else 'FAILED'}")
        return "\n".join(lines)


def _fmt_count(k, v) -> str:
    if isinstance(v, bool):
        return f"{k} {'yes' if v else 'NO'}"
    return f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"


def _human(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

def run(name: str, *, mmu: str = "tdp_mmu", seed: int = 0, progress=None, stream=None,
        batch: bool = True, check: bool = True, **params) -> Report:
    """Run workload `name` on a fresh VM with MMU flavour `mmu`.

    Parameters
    ----------
    name : a key of :data:`WORKLOADS`
    mmu : "tdp_mmu", "tdp" or "shadow"
    seed : int; the same seed gives the same counts
    progress : None or callable(desc, done, total)
    stream : None or a path: record the vCPU input stream there (docs/STREAM.md)
    batch : use the TDP MMU's batch access path where it exists
    check : audit the VM after every phase and check the workload's record
    **params : the workload's parameters (``WORKLOADS[name].params``)
    """
    wl = WORKLOADS.get(name)
    if wl is None:
        raise WorkloadParamError("workload", f"unknown workload {name!r} "
                                             f"(one of: {', '.join(WORKLOADS)})")
    if mmu not in wl.mmus:
        raise WorkloadParamError("mmu", f"{name} runs on {', '.join(wl.mmus)}, not {mmu!r}")
    if type(seed) is not int or not 0 <= seed < 1 << 64:
        raise WorkloadParamError("seed", f"expected an int in 0..2**64-1, got {seed!r}")
    p = _params(wl, params)
    if stream is not None and not wl.streamable:
        raise WorkloadParamError("stream", f"{name} drives host events, which a stream "
                                           f"cannot record")
    g = Guest(mmu, p, seed=seed, record=stream is not None, batch=batch, progress=progress,
              check=check)
    wl.fn(g, p)
    # the end state, unless the workload recorded it before a teardown
    for k, v in end_counts(g.vm).items():
        g.summary.setdefault(k, v)
    g.summary["exits"] = g.cpu.exits
    for k, v in g.checks.items():
        g.summary["check_" + k] = bool(v)
    g.audit()
    if check:
        bad = [k for k, v in g.checks.items() if not v]
        if bad:
            raise WorkloadError(f"{name}: check(s) failed: {', '.join(bad)}")
    if stream is not None:
        _replay.write_stream(g.init, g.events, stream)
    return Report(name, mmu, seed, p, g.phases, g.timeline, g.summary,
                  None if stream is None else str(stream))


def run_cell(cell: dict) -> dict:
    """One sweep cell: ``{"workload", "mmu", "seed", **params}`` -> the report's
    summary (a flat dict).  A top-level function, so Dask workers can import it."""
    cell = dict(cell)
    try:
        name = cell.pop("workload")
    except KeyError:
        raise WorkloadParamError("workload", "the cell names no workload") from None
    mmu = cell.pop("mmu", "tdp_mmu")
    seed = cell.pop("seed", 0)
    return run(name, mmu=mmu, seed=seed, **cell).summary


# ---------------------------------------------------------------------------
# Building blocks shared by the workloads
# ---------------------------------------------------------------------------

def _regions(g: Guest, p: dict, *, slots: int = 1, flags: int = 0):
    """Lay out the vCPUs' memory (vCPU i owns ``[i * size, (i+1) * size)``) in
    `slots` equal memslots; on shadow paging also an identity-mapped set of
    guest page tables (4 KiB guest pages) in a slot of their own.  Returns
    the slot list ``[(id, gpa, npages)]``."""
    size = p["vcpu_mib"] * MiB
    total = size * p["vcpus"]
    if total % slots or (total // slots) % (2 * MiB):
        if slots == 1:
            raise WorkloadParamError("vcpu_mib", f"{total // MiB} MiB of guest memory is not "
                                                 f"a whole number of 2 MiB frames")
        raise WorkloadParamError("slots", f"{total // MiB} MiB does not split into {slots} "
                                          f"slots of whole 2 MiB frames")
    per = total // slots
    out = []
    for i in range(slots):
        g.add_slot(i, i * per, per, flags=flags)
        out.append((i, i * per, per >> PAGE_SHIFT))
    if g.mmu == "shadow":
        npt = total >> 21                                   # one PT page per 2 MiB
        table_pages = npt + (npt >> 9) + (npt >> 18) + 8
        g.add_slot(slots, TABLES_GPA, ((table_pages * PAGE_SIZE + 2 * MiB - 1) // (2 * MiB))
                   * 2 * MiB, thp=False)
    return out


def _start(g: Guest, p: dict, **kw) -> None:
    g.start(p["vcpus"], **kw)
    if g.mmu == "shadow":
        t = GuestPageTables(g.vm, TABLES_GPA, _table_slot_pages(g))
        total = p["vcpu_mib"] * MiB * p["vcpus"]
        t.map(0, 0, total)                                  # gva == gpa, user, writable
        g.boot_paging({i: t for i in range(p["vcpus"])})


def _table_slot_pages(g: Guest) -> int:
    return g.init["memslots"][-1]["size"] >> PAGE_SHIFT


def _vcpu_pages(p: dict, i: int) -> np.ndarray:
    n = (p["vcpu_mib"] * MiB) >> PAGE_SHIFT
    return (np.arange(n, dtype=np.uint64) + np.uint64(i * n)) << np.uint64(PAGE_SHIFT)


def _touch_all(g: Guest, p: dict, desc: str, order: Callable[[int], np.ndarray], *,
               write=True) -> int:
    """Every vCPU touches its pages in ``order(i)``; returns the exits."""
    exits = 0
    for i, v in enumerate(g.vcpus):
        exits += g.cpu.access(v, order(i), write=write)
        g.tick(desc, i + 1, len(g.vcpus))
    return exits


# ---------------------------------------------------------------------------
# The workloads
# ---------------------------------------------------------------------------

@workload("first_touch", params=(
    Param("pattern", str, "sequential", "the order a vCPU touches its pages in",
          choices=("sequential", "random", "strided")),
    Param("stride", int, 512, "pages between consecutive touches of the strided pattern",
          lo=1, hi=1 << 30),
    Param("write", bool, True, "write (else read) each page"),
))
def _first_touch(g: Guest, p: dict) -> None:
    """Populate guest memory by touching every page once (kvm_page_table_test).

    Each vCPU touches each page of its region once, sequentially, in a random
    order, or strided (page 0, s, 2s, ..., then 1, 1+s, ...).  With 4 KiB backing
    every page faults once; with THP backing the first touch of each 2 MiB frame
    maps it (a 2 MiB SPTE) and the rest of the frame does not fault."""
    _regions(g, p)
    _start(g, p)

    def order(i):
        pages = _vcpu_pages(p, i)
        if p["pattern"] == "random":
            return g.rng.permutation(pages)
        if p["pattern"] == "strided":
            s = p["stride"]
            idx = np.concatenate([np.arange(o, pages.size, s) for o in range(min(s, pages.size))])
            return pages[idx]
        return pages

    g.phase("populate", lambda: {"exits": _touch_all(g, p, "populate", order, write=p["write"])})
    g.audit()
    g.summary["populate_s"] = g.phases[-1]["seconds"]


@workload("working_set", params=(
    Param("accesses", int, 100_000, "accesses per vCPU", lo=1, hi=1 << 32),
    Param("hot_fraction", float, 0.1, "the fraction of a vCPU's pages that is hot",
          lo=0.0, hi=1.0),
    Param("hot_share", float, 0.9, "the fraction of accesses that go to the hot pages",
          lo=0.0, hi=1.0),
    Param("write_fraction", float, 0.3, "the fraction of accesses that are writes",
          lo=0.0, hi=1.0),
))
def _working_set(g: Guest, p: dict) -> None:
    """Random accesses over a working set with a hot fraction.

    Each vCPU makes `accesses` accesses to its pages: with probability
    `hot_share` to a uniformly chosen hot page (the first `hot_fraction` of a
    random permutation of its pages), else to a cold one; each access is a write
    with probability `write_fraction`.  Faults happen on the first touch of a
    page (of a 2 MiB frame with THP backing); the report counts the distinct
    pages touched."""
    _regions(g, p)
    _start(g, p)
    touched = 0

    def go():
        nonlocal touched
        exits = 0
        for i, v in enumerate(g.vcpus):
            pages = g.rng.permutation(_vcpu_pages(p, i))
            nhot = max(1, int(round(pages.size * p["hot_fraction"])))
            hot, cold = pages[:nhot], pages[nhot:] if nhot < pages.size else pages[:nhot]
            n = p["accesses"]
            is_hot = g.rng.random(n) < p["hot_share"]
            seq = np.where(is_hot, hot[g.rng.integers(0, hot.size, n)],
                           cold[g.rng.integers(0, cold.size, n)])
            writes = g.rng.random(n) < p["write_fraction"]
            touched += int(np.unique(seq).size)
            exits += g.cpu.access(v, seq, write=writes)
            g.tick("working set", i + 1, len(g.vcpus))
        return {"exits": exits}

    g.phase("run", go)
    g.audit()
    g.summary["distinct_pages"] = touched
    g.summary["run_s"] = g.phases[-1]["seconds"]


@workload("dirty_log", params=(
    Param("iterations", int, 2, "dirty-logging iterations after the populate pass (-i)",
          lo=1, hi=1 << 20),
    Param("slots", int, 1, "memslots the guest memory is split into (-x)", lo=1, hi=512),
    Param("manual_protect", bool, False, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (-g off): "
                                         "get the log, then clear it explicitly"),
    Param("initially_set", bool, False, "KVM_DIRTY_LOG_INITIALLY_SET with manual protect: "
                                        "no write protection when logging starts"),
    Param("write_percent", int, 100, "percent of pages each iteration writes (-w); the "
                                     "rest are read", lo=0, hi=100),
    Param("random_access", bool, False, "touch the pages in a random order (-a)"),
))
def _dirty_log(g: Guest, p: dict) -> None:
    """The dirty_log_perf_test loop: populate, enable logging, N dirty passes.

    Populate: every vCPU writes each page of its region.  Enable dirty logging on
    every slot (KVM_MEM_LOG_DIRTY_PAGES: eager split and write protection, or with
    manual protect + INITIALLY_SET nothing until the first clear).  Then
    `iterations` times: every vCPU writes `write_percent` of its pages (reads the
    rest), then KVM_GET_DIRTY_LOG per slot and, with manual protect,
    KVM_CLEAR_DIRTY_LOG of the whole slot.  Finally disable logging.  Each
    iteration's bitmaps must be exactly the pages written (plus, with
    INITIALLY_SET, every page the first time)."""
    if p["initially_set"] and not p["manual_protect"]:
        raise WorkloadParamError("initially_set", "needs manual_protect")
    slots = _regions(g, p, slots=p["slots"])
    manual = (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
              (KVM_DIRTY_LOG_INITIALLY_SET if p["initially_set"] else 0)) \
        if p["manual_protect"] else 0
    _start(g, p, manual_protect=manual)
    npages_vcpu = (p["vcpu_mib"] * MiB) >> PAGE_SHIFT

    def order(i):
        pages = _vcpu_pages(p, i)
        return g.rng.permutation(pages) if p["random_access"] else pages

    g.phase("populate", lambda: {"exits": _touch_all(g, p, "populate", order)})
    g.audit()

    def set_logging(on: bool):
        for sid, gpa, n in slots:
            g.set_memslot(sid, gpa, n << PAGE_SHIFT, KVM_MEM_LOG_DIRTY_PAGES if on else 0)

    g.phase("enable dirty logging", lambda: set_logging(True))
    g.audit()
    total = npages_vcpu * p["vcpus"]
    exact = True
    dirty_s, get_s, clear_s = [], [], []
    for it in range(1, p["iterations"] + 1):
        written = np.zeros(total, bool)

        def dirty():
            exits = 0
            for i, v in enumerate(g.vcpus):
                pages = order(i)
                w = g.rng.random(pages.size) * 100 < p["write_percent"]
                exits += g.cpu.access(v, pages, write=w)      # in the guest loop's order
                written[(pages[w] >> np.uint64(PAGE_SHIFT)).astype(np.int64)] = True
                g.tick(f"iteration {it}", i + 1, len(g.vcpus))
            return {"exits": exits, "pages_written": int(written.sum())}

        dirty_s.append(g.phase(f"iteration {it}: dirty memory", dirty, sample=False)["seconds"])
        logs = {}
        got = np.zeros(total, bool)

        def get():
            n = 0
            for sid, gpa, npg in slots:
                bm = g.get_dirty_log(sid)
                logs[sid] = bm
                bits = np.unpackbits(bm.view(np.uint8), bitorder="little")[:npg].astype(bool)
                got[gpa >> PAGE_SHIFT:(gpa >> PAGE_SHIFT) + npg] = bits
                n += int(bits.sum())
            return {"dirty_pages": n}

        get_s.append(g.phase(f"iteration {it}: get dirty log", get,
                             sample=not manual)["seconds"])
        if manual:
            def clear():
                for sid, gpa, npg in slots:
                    g.clear_dirty_log(sid, npg, logs[sid])
            clear_s.append(g.phase(f"iteration {it}: clear dirty log", clear)["seconds"])
        expect = written.copy()
        if it == 1 and p["initially_set"]:
            expect[:] = True
        ok = bool(np.array_equal(got, expect))
        g.phases[-1 if not manual else -2]["exact"] = ok
        exact &= ok
        g.audit()
    g.phase("disable dirty logging", lambda: set_logging(False))
    g.audit()
    g.checks["dirty_log_exact"] = exact
    s = g.summary
    s["populate_s"] = g.phases[0]["seconds"]
    s["enable_logging_s"] = g.phases[1]["seconds"]
    s["dirty_s"] = float(np.mean(dirty_s))
    s["get_dirty_log_s"] = float(np.mean(get_s))
    s["clear_dirty_log_s"] = float(np.mean(clear_s)) if clear_s else 0.0
    s["disable_logging_s"] = g.phases[-1]["seconds"]
    s["dirty_pages"] = int(sum(ph.get("dirty_pages", 0) for ph in g.phases))


def _folios(g: Guest, slots) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The host folios backing the slots as arrays ``(hva, pages, first page
    index)``: a 2 MiB THP is one folio, every other page one on its own
    (page_idle works on folios: the first page read of a folio answers for
    all of it)."""
    host = g.vm.host
    hvas, sizes, firsts = [], [], []
    for sid, gpa, npg in slots:
        off = np.arange(npg, dtype=np.uint64)
        hva = np.uint64(g.buffers[sid][0]) + (off << np.uint64(PAGE_SHIFT))
        head = off % np.uint64(PAGES_PER_2M) == 0
        huge = np.repeat(host.host_pfn_mapping_level_array(hva[head]) >= 2,
                         PAGES_PER_2M)[:npg]
        keep = head | ~huge                     # a THP's head page, or any 4K page
        hvas.append(hva[keep])
        sizes.append(np.where(huge[keep], PAGES_PER_2M, 1))
        firsts.append(off[keep] + np.uint64(gpa >> PAGE_SHIFT))
    return np.concatenate(hvas), np.concatenate(sizes), np.concatenate(firsts)


@workload("access_tracking", streamable=False, params=(
    Param("iterations", int, 2, "mark-idle / access / count rounds after populating", lo=1,
          hi=1 << 20),
    Param("access", str, "read", "how the vCPUs re-access memory", choices=("read", "write")),
    Param("reaccess_percent", int, 100, "percent of its pages each vCPU re-accesses per round",
          lo=0, hi=100),
))
def _access_tracking(g: Guest, p: dict) -> None:
    """The access_tracking_perf_test loop: populate, then mark idle, access, count idle.

    Populate: every vCPU writes its pages.  Then `iterations` times: mark all guest
    memory idle (the page_idle bitmap: the host ages every folio without a TLB flush,
    ``clear_young``, so KVM clears the SPTEs' Accessed bits - or, without A/D bits,
    access-tracks them), every vCPU re-accesses `reaccess_percent` of its pages
    (a random subset), then read the idle bits back folio by folio (aging again:
    a folio is young if the host or KVM saw an access).  The idle count must be the
    pages of the folios nobody re-accessed."""
    slots = _regions(g, p)
    _start(g, p)
    g.phase("populate", lambda: {"exits": _touch_all(g, p, "populate", _pages_of(p))})
    g.audit()
    folios = _folios(g, slots)
    host = g.vm.host
    exact = True
    mark_s, access_s, count_s = [], [], []
    total = ((p["vcpu_mib"] * MiB) >> PAGE_SHIFT) * p["vcpus"]
    for it in range(1, p["iterations"] + 1):
        def mark():
            for sid, gpa, npg in slots:
                host.age(g.buffers[sid][0], npg << PAGE_SHIFT, flush=False)
        mark_s.append(g.phase(f"iteration {it}: mark idle", mark, sample=False)["seconds"])
        touched = np.zeros(total, bool)

        def access():
            exits = 0
            for i, v in enumerate(g.vcpus):
                pages = _vcpu_pages(p, i)
                pages = pages[g.rng.random(pages.size) * 100 < p["reaccess_percent"]]
                exits += g.cpu.access(v, pages, write=p["access"] == "write")
                touched[(pages >> np.uint64(PAGE_SHIFT)).astype(np.int64)] = True
                g.tick(f"iteration {it}", i + 1, len(g.vcpus))
            return {"exits": exits, "pages_accessed": int(touched.sum())}
        access_s.append(g.phase(f"iteration {it}: access", access, sample=False)["seconds"])
        expect = 0

        def count():
            nonlocal expect
            idle = 0
            hva, npages, first = folios
            for a, n in zip(hva.tolist(), npages.tolist()):
                if not host.age(a, n << PAGE_SHIFT, flush=False):
                    idle += n
            # a folio is young if any of its pages was re-accessed (the folios
            # cover the pages in order, so each one's sum runs to the next's start)
            seen = np.add.reduceat(touched.astype(np.int64), first.astype(np.int64))
            expect += int(npages[seen == 0].sum())
            return {"idle_pages": idle}
        ph = g.phase(f"iteration {it}: count idle", count)
        count_s.append(ph["seconds"])
        ph["exact"] = ph["idle_pages"] == expect
        exact &= ph["exact"]
        g.audit()
    g.checks["idle_count_exact"] = exact
    s = g.summary
    s["populate_s"] = g.phases[0]["seconds"]
    s["mark_idle_s"] = float(np.mean(mark_s))
    s["access_s"] = float(np.mean(access_s))
    s["count_idle_s"] = float(np.mean(count_s))
    s["idle_pages"] = int(sum(ph.get("idle_pages", 0) for ph in g.phases))


def _pages_of(p: dict):
    return lambda i: _vcpu_pages(p, i)


@workload("memslot_churn", params=(
    Param("slots", int, 4, "memslots the guest memory is split into", lo=2, hi=512),
    Param("iterations", int, 4, "memslot changes (one slot each, round robin)", lo=1,
          hi=1 << 20),
    Param("mode", str, "delete", "what happens to the slot: deleted and re-created, moved "
                                 "to a spare range and back, or dirty logging toggled",
          choices=("delete", "move", "dirty_log")),
))
def _memslot_churn(g: Guest, p: dict) -> None:
    """memslot_perf_test-like churn: change one memslot per iteration, re-touch the rest.

    Populate every slot, then per iteration: undo the previous iteration's change
    (re-create the deleted slot on its old host memory, move the moved slot back,
    or turn its dirty logging off), apply the change to the next slot (delete it;
    move it above guest memory; turn dirty logging on), and every vCPU writes every
    page of the slots at their home addresses (a slot that is gone or moved is not
    touched).  The report times the memslot ioctls and counts the refaults the zaps
    caused (a default VM has KVM_X86_QUIRK_SLOT_ZAP_ALL: deleting or moving a slot
    zaps everything)."""
    slots = _regions(g, p, slots=p["slots"])
    _start(g, p)
    g.phase("populate", lambda: {"exits": _touch_all(g, p, "populate", _pages_of(p))})
    g.audit()
    total_bytes = p["vcpu_mib"] * MiB * p["vcpus"]
    per = slots[0][2] << PAGE_SHIFT
    away = None
    op_s, touch_s = [], []

    def change(k, undo):
        sid, gpa, npg = slots[k]
        if p["mode"] == "delete":
            g.set_memslot(sid, gpa, per if undo else 0, 0)
        elif p["mode"] == "move":
            g.set_memslot(sid, gpa if undo else total_bytes + k * per, per, 0)
        else:
            g.set_memslot(sid, gpa, per, 0 if undo else KVM_MEM_LOG_DIRTY_PAGES)

    for it in range(1, p["iterations"] + 1):
        k = (it - 1) % len(slots)

        def op():
            nonlocal away
            if away is not None:
                change(away, True)
            change(k, False)
            away = k
        op_s.append(g.phase(f"iteration {it}: memslot change", op, sample=False)["seconds"])
        gone = (slots[k][1] >> PAGE_SHIFT, (slots[k][1] >> PAGE_SHIFT) + slots[k][2])

        def touch():
            if p["mode"] == "dirty_log":
                return {"exits": _touch_all(g, p, f"iteration {it}", _pages_of(p))}

            def order(i):
                pages = _vcpu_pages(p, i)
                pfn = pages >> np.uint64(PAGE_SHIFT)
                return pages[(pfn < np.uint64(gone[0])) | (pfn >= np.uint64(gone[1]))]
            return {"exits": _touch_all(g, p, f"iteration {it}", order)}
        touch_s.append(g.phase(f"iteration {it}: touch", touch)["seconds"])
        g.audit()
    if away is not None:
        g.phase("restore", lambda: change(away, True))
    s = g.summary
    s["populate_s"] = g.phases[0]["seconds"]
    s["memslot_change_s"] = float(np.mean(op_s))
    s["touch_s"] = float(np.mean(touch_s))


@workload("host_invalidation", streamable=False, params=(
    Param("event", str, "numa_scan", "the host event: munmap and a fresh mapping in its "
                                     "place, a THP split, a NUMA-balancing scan "
                                     "(change_prot_numa: a PROTECTION_VMA invalidation of "
                                     "the range), or page migration",
          choices=("munmap", "thp_split", "numa_scan", "migrate")),
    Param("iterations", int, 3, "storms, each followed by a full re-touch", lo=1, hi=1 << 20),
    Param("chunks", int, 8, "chunks hit per storm (distinct, chosen at random)", lo=1,
          hi=1 << 30),
    Param("chunk_pages", int, 512, "pages per chunk (a multiple of 512 for thp_split)",
          lo=1, hi=1 << 30),
))
def _host_invalidation(g: Guest, p: dict) -> None:
    """Host invalidations under a running guest (mmu_stress_test-like).

    Populate, then per iteration: hit `chunks` random chunks of guest memory (of the
    first memslot's host buffer) with the host event (each one an MMU-notifier invalidation: KVM zaps the SPTEs of the
    range), then every vCPU writes all its pages again: the zapped pages refault
    (a THP split zaps the 2 MiB SPTEs; the refaults map 4 KiB pages)."""
    if p["event"] == "thp_split" and (p["backing"] != "anonymous_thp" or
                                      p["chunk_pages"] % PAGES_PER_2M):
        raise WorkloadParamError("event", "thp_split needs backing='anonymous_thp' and "
                                          "chunk_pages a multiple of 512")
    slots = _regions(g, p)
    _start(g, p)
    g.phase("populate", lambda: {"exits": _touch_all(g, p, "populate", _pages_of(p))})
    g.audit()
    npg = slots[0][2]
    nchunks = npg // p["chunk_pages"]
    if p["chunks"] > nchunks:
        raise WorkloadParamError("chunks", f"guest memory has only {nchunks} chunks of "
                                           f"{p['chunk_pages']} pages")
    host = g.vm.host
    hva0 = g.buffers[0][0]
    size = p["chunk_pages"] << PAGE_SHIFT
    storm_s, touch_s = [], []
    for it in range(1, p["iterations"] + 1):
        picks = np.sort(g.rng.choice(nchunks, p["chunks"], replace=False))

        def storm():
            for c in picks.tolist():
                hva = hva0 + c * size
                ev = p["event"]
                if ev == "munmap":
                    host.munmap(hva, size)
                    host.mmap(size, hva=hva, thp=g.thp, populate=True)
                elif ev == "thp_split":
                    host.split_huge_pmd(hva, size)
                elif ev == "numa_scan":
                    # the PTEs become PROT_NONE hinting entries and come back on the
                    # next host access: to KVM, one PROTECTION_VMA invalidation
                    with host.invalidation(hva, hva + size,
                                           MmuNotifyEvent.MMU_NOTIFY_PROTECTION_VMA):
                        pass
                else:
                    host.migrate_pages(hva, size)
            return {"pages_hit": int(picks.size * p["chunk_pages"])}
        storm_s.append(g.phase(f"iteration {it}: {p['event']}", storm, sample=False)["seconds"])
        touch_s.append(g.phase(f"iteration {it}: touch", lambda: {
            "exits": _touch_all(g, p, f"iteration {it}", _pages_of(p))})["seconds"])
        g.audit()
    s = g.summary
    s["populate_s"] = g.phases[0]["seconds"]
    s["storm_s"] = float(np.mean(storm_s))
    s["touch_s"] = float(np.mean(touch_s))


@workload("cr3_switch", mmus=("shadow",), common=("vcpus", "backing", "host", "ad_bits",
                                                  "eager_page_split", "nx_huge_pages"),
          params=(
    Param("processes", int, 16, "guest processes, each with its own page tables", lo=1,
          hi=1 << 16),
    Param("process_pages", int, 64, "private pages of each process", lo=1, hi=1 << 20),
    Param("shared_pages", int, 64, "pages every process maps (a shared library, the "
                                   "kernel's own data)", lo=0, hi=1 << 20),
    Param("rounds", int, 4, "times every process is scheduled", lo=1, hi=1 << 20),
    Param("pages_per_round", int, 32, "pages a process touches each time it runs", lo=1,
          hi=1 << 20),
    Param("touch", str, "random", "each time a process runs it touches `pages_per_round` "
                                  "random pages of its own, or all of them in order",
          choices=("random", "all")),
    Param("write_fraction", float, 0.5, "the fraction of touches that are writes",
          lo=0.0, hi=1.0),
))
def _cr3_switch(g: Guest, p: dict) -> None:
    """Many guest processes switching CR3 on shadow paging.

    Each process has its own 4-level page tables mapping `process_pages` private
    pages at gva 4 MiB and the `shared_pages` every process maps at gva 1 GiB.  The
    processes run round robin on the vCPUs (`rounds` times): a MOV to CR3
    (``kvm_mmu_new_pgd``: a cached previous root, or a new one), a VM entry, then
    `pages_per_round` random touches of its pages.  The report shows what shadow
    paging costs: shadow pages (and those recycled at the MMU page limit), rmap
    descriptors (a shared page has one SPTE per process), root switches and TLB
    flushes."""
    P, X, S_ = p["processes"], p["process_pages"], p["shared_pages"]
    data_pages = P * X + S_
    data_bytes = -(-(data_pages << PAGE_SHIFT) // (2 * MiB)) * 2 * MiB
    per_proc = 4 + -(-X // 512) + (-(-S_ // 512) if S_ else 0)
    table_bytes = -(-(P * per_proc << PAGE_SHIFT) // (2 * MiB)) * 2 * MiB
    g.add_slot(0, 0, data_bytes)
    g.add_slot(1, TABLES_GPA, table_bytes, thp=False)
    g.start(p["vcpus"])
    priv_gva, shared_gva = 4 * MiB, 1 << 30
    tables = []
    for q in range(P):
        t = GuestPageTables(g.vm, TABLES_GPA + q * per_proc * PAGE_SIZE, per_proc)
        t.map(priv_gva, (q * X) << PAGE_SHIFT, X << PAGE_SHIFT)
        if S_:
            t.map(shared_gva, (P * X) << PAGE_SHIFT, S_ << PAGE_SHIFT)
        tables.append(t)
    g.boot_paging({i: tables[i % P] for i in range(p["vcpus"])}, tables)
    gvas = np.concatenate([priv_gva + (np.arange(X, dtype=np.uint64) << np.uint64(PAGE_SHIFT)),
                           shared_gva + (np.arange(S_, dtype=np.uint64) << np.uint64(PAGE_SHIFT))])
    switches = 0

    def go():
        nonlocal switches
        exits = 0
        steps = p["rounds"] * P
        for r in range(p["rounds"]):
            for q in range(P):
                v = g.vcpus[q % len(g.vcpus)]
                cr3 = int(tables[q].cr3)
                if v.cpu.cr3 != cr3:
                    g._ev(kind="set_cr", vcpu=v.vcpu_id, cr=3, value=cr3)
                    v.kvm_set_cr3(cr3)
                    switches += 1
                pick = gvas if p["touch"] == "all" else \
                    gvas[g.rng.integers(0, gvas.size, p["pages_per_round"])]
                w = g.rng.random(pick.size) < p["write_fraction"]
                exits += g.cpu.access(v, pick, write=w)
                g.tick("processes", r * P + q + 1, steps)
        return {"exits": exits, "cr3_switches": switches}

    g.phase("run", go)
    g.audit()
    st = g.vm.stat.as_dict()
    g.summary.update(cr3_switches=switches, mmu_recycled=int(st["mmu_recycled"]),
                     run_s=g.phases[-1]["seconds"])


@workload("td_private", mmus=("tdp_mmu",), streamable=False,
          common=("vcpus", "vcpu_mib", "eager_page_split", "nx_huge_pages"), params=(
    Param("era", str, "v6.18", "the TDX code generation: v6.18 (pfn hooks, the initial image "
                               "premapped) or genB (SPTE hooks, PAGE.ADD in the fault)",
          choices=("v6.18", "genB")),
    Param("image_pages", int, 16, "pages of the initial image (KVM_TDX_INIT_MEM_REGION)",
          lo=0, hi=1 << 20),
    Param("iterations", int, 2, "conversion rounds after the populate pass", lo=0, hi=1 << 20),
    Param("convert_percent", int, 25, "percent of each vCPU's pages converted to shared and "
                                      "back per round", lo=0, hi=100),
))
def _td_private(g: Guest, p: dict) -> None:
    """A TD's life on the mirrored TDP MMU: image, private faults, conversions, teardown.

    A TDX VM (``vm_type="tdx"``) with guest_memfd memory, all of it private:
    KVM_TDX_INIT_VM and INIT_VCPU, the initial image (`image_pages` pages through
    KVM_TDX_INIT_MEM_REGION), FINALIZE; every vCPU then touches each private page
    of its region (an EPT violation: the mirror root's fault, SEPT.ADD for a missing
    table, PAGE.AUG for the leaf).  Each round converts `convert_percent` random pages
    of every vCPU to shared (KVM_SET_MEMORY_ATTRIBUTES: BLOCK, TRACK, REMOVE and
    WBINVD per private leaf), touches them through the shared alias (the direct
    root), converts them back and touches them again.  The teardown follows the
    kernel's order.  The report counts the SEAMCALLs by name next to the faults."""
    from collections import Counter
    from kvmmmu.host import HostConfig
    from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
    from kvmmmu.tdx_module import TdxModule
    from kvmmmu.vm import VM, KvmParams
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", tdx_era=p["era"],
            params=KvmParams(eager_page_split=p["eager_page_split"],
                             nx_huge_pages=p["nx_huge_pages"]),
            nr_vcpus=p["vcpus"], tdx_module=TdxModule(era=p["era"]))
    g.adopt(vm)
    t = vm.tdx
    size = p["vcpu_mib"] * MiB * p["vcpus"]
    npg = (p["vcpu_mib"] * MiB) >> PAGE_SHIFT
    if p["image_pages"] > npg:
        raise WorkloadParamError("image_pages", f"the image ({p['image_pages']} pages) does not "
                                                f"fit vCPU 0's {npg} pages")

    def check(r, what):
        if r:
            raise WorkloadError(f"{what} failed with {r}")

    def setup():
        vm.add_memory(0, size, guest_memfd=True)
        g.buffers = {s.id: (s.userspace_addr, s.npages << PAGE_SHIFT) for s in vm.memslots[0]}
        vm.set_memory_attributes(0, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        check(t.init_vm(), "KVM_TDX_INIT_VM")
        for v in g.vcpus:
            check(t.init_vcpu(v), "KVM_TDX_INIT_VCPU")
        if p["image_pages"]:
            src = vm.host.mmap(p["image_pages"] << PAGE_SHIFT, populate=True)
            r, _ = t.init_mem_region(g.vcpus[0], 0, p["image_pages"], src)
            check(r, "KVM_TDX_INIT_MEM_REGION")
        check(t.finalize_vm(), "KVM_TDX_FINALIZE_VM")
        return {"nr_premapped": t.nr_premapped}
    g.phase("init, image, finalize", setup)
    shared_bit = vm.gfn_direct_bits << PAGE_SHIFT

    def touch(desc, pages_of, shared):
        exits = 0
        for i, v in enumerate(g.vcpus):
            check(v.vcpu_enter_guest() or 0, "the VM entry")
            t.vcpu_enter(v)
            for gpa in pages_of(i).tolist():
                t.vcpu_exit(v)                          # the EPT violation exit
                r = t.handle_ept_violation(v, gpa | shared_bit if shared else gpa, write=True)
                if r < 0:
                    raise WorkloadError(f"vCPU {v.vcpu_id}: the EPT violation at {gpa:#x} "
                                        f"failed with {r}")
                exits += 1
                check(v.vcpu_enter_guest() or 0, "the VM entry")
                t.vcpu_enter(v)
            t.vcpu_exit(v)
            g.tick(desc, i + 1, len(g.vcpus))
        g.cpu.exits += exits
        return {"exits": exits}

    image_end = p["image_pages"] << PAGE_SHIFT
    g.phase("touch private", lambda: touch(
        "private", lambda i: (lambda a: a[a >= image_end])(_vcpu_pages(p, i)), False))
    g.audit()
    for it in range(1, p["iterations"] + 1):
        picks = [np.sort(g.rng.choice(_vcpu_pages(p, i), npg * p["convert_percent"] // 100,
                                      replace=False)) for i in range(p["vcpus"])]

        def convert(attrs):
            for pages in picks:
                for gpa in pages.tolist():
                    vm.set_memory_attributes(gpa, PAGE_SIZE, attrs)
            return {"pages": int(sum(x.size for x in picks))}
        g.phase(f"iteration {it}: to shared", lambda: convert(0), sample=False)
        g.phase(f"iteration {it}: touch shared", lambda: touch(f"iteration {it}",
                                                                lambda i: picks[i], True))
        g.phase(f"iteration {it}: to private", lambda: convert(KVM_MEMORY_ATTRIBUTE_PRIVATE),
                sample=False)
        g.phase(f"iteration {it}: touch private", lambda: touch(f"iteration {it}",
                                                                 lambda i: picks[i], False))
        g.audit()
    g.summary.update(end_counts(vm))                # the TD as it runs, not torn down
    g.summary["nr_premapped"] = t.nr_premapped
    g.phase("teardown", lambda: {"r": t.destroy_vm()})
    g.checks["teardown_clean"] = g.phases[-1]["r"] == 0 and not vm.bugged
    calls = Counter(c.name.removeprefix("tdh_") for c in t.module.calls)
    g.summary.update({"seamcall_" + k: n for k, n in sorted(calls.items())})
    g.summary["seamcalls"] = sum(calls.values())
