"""``kvm->stat`` and ``vcpu->stat`` with the kernel's names, and a reader for
the live kernel's binary statistics (``KVM_GET_STATS_FD``) that returns the
same dict shape.

The names, kinds and order are those of the v6.18 descriptor tables
(``KVM_GENERIC_VM_STATS`` + ``kvm_vm_stats_desc`` and
``KVM_GENERIC_VCPU_STATS`` + ``kvm_vcpu_stats_desc`` in x86.c and
kvm_host.h); shadow-page.md §4 says when each counter changes.  Kinds:

* ``cumulative`` (STATS_DESC_COUNTER): only grows;
* ``instant`` (STATS_DESC_ICOUNTER / IBOOLEAN): a current value;
* ``peak`` (STATS_DESC_PCOUNTER): the largest value seen;
* ``log_hist``: a logarithmic histogram (32 buckets) - read as a list.

Model side: :class:`KvmStats` keeps the values in one ``uint64`` numpy array
(``data``) with attribute access (``vm.stat.mmu_cache_miss += 1``) and
:meth:`KvmStats.as_dict`.  A few VM counters are already counted by the core
objects that own the event - ``pages_4k/2m/1g`` and the two
``remote_tlb_flush`` counters by :class:`~kvmmmu._core.pt_arena.PtArena`,
``max_mmu_rmap_size`` by :class:`~kvmmmu._core.rmap.PteListDescPool` - and
:class:`VmStat` reads those through (there is one source of truth).

Live side: :func:`read_stats_fd` (:func:`kvmmmu.live.stats.read_stats`)
parses the binary file (``struct kvm_stats_header``, ``struct
kvm_stats_desc`` + name, data block) and returns ``{name: int}`` (``{name: list}`` for histograms), exactly the
shape of :meth:`KvmStats.as_dict`; :func:`read_stats_descriptors` also gives
kinds, units, exponents and offsets.  :func:`compare_stats` lines a model
dict up against a live one.

Invariants: cumulative counters never decrease; a peak counter is at least
every value it was offered; instant counters are never negative (the arrays
are unsigned, so an underflow shows as a huge value, and :meth:`KvmStats.audit`
reports it).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from kvmmmu._core._checks import int_arg

from kvmmmu.live import _uapi
from kvmmmu.live.stats import read_stats as read_stats_fd, read_stats_descriptors, read_stats_of

__all__ = [
    "KVM_STATS_NAME_SIZE", "KVM_STATS_TYPE_NAMES", "KVM_STATS_UNIT_NAMES",
    "VM_STATS_DESC", "VCPU_STATS_DESC", "HALT_POLL_HIST_COUNT", "VCPU_PF_COUNTERS",
    "StatDesc", "KvmStats", "VmStat", "VcpuStat",
    "read_stats_descriptors", "read_stats_fd", "read_live_vm_stats", "read_live_vcpu_stats",
    "compare_stats",
]

KVM_STATS_NAME_SIZE = 48
#: KVM_STATS_TYPE_* (flags bits 3:0) and KVM_STATS_UNIT_* (flags bits 7:4)
KVM_STATS_TYPE_NAMES = _uapi.KVM_STATS_TYPES
KVM_STATS_UNIT_NAMES = _uapi.KVM_STATS_UNITS
#: HALT_POLL_HIST_COUNT: buckets of the halt-poll histograms
HALT_POLL_HIST_COUNT = 32


class StatDesc(tuple):
    """``(name, kind, size, unit)`` of one statistic."""
    __slots__ = ()

    def __new__(cls, name, kind, size=1, unit="none"):
        return super().__new__(cls, (name, kind, size, unit))

    name = property(lambda s: s[0])
    kind = property(lambda s: s[1])
    size = property(lambda s: s[2])
    unit = property(lambda s: s[3])


def _c(name):
    return StatDesc(name, "cumulative")


def _i(name, unit="none"):
    return StatDesc(name, "instant", 1, unit)


def _p(name):
    return StatDesc(name, "peak")


#: ``kvm_vm_stats_desc`` (v6.18), generic part first.
VM_STATS_DESC = (
    _c("remote_tlb_flush"), _c("remote_tlb_flush_requests"),
    _c("mmu_shadow_zapped"), _c("mmu_pte_write"), _c("mmu_pde_zapped"), _c("mmu_flooded"),
    _c("mmu_recycled"), _c("mmu_cache_miss"),
    _i("mmu_unsync"), _i("pages_4k"), _i("pages_2m"), _i("pages_1g"), _i("nx_lpage_splits"),
    _p("max_mmu_rmap_size"), _p("max_mmu_page_hash_collisions"),
)

#: ``kvm_vcpu_stats_desc`` (v6.18), generic part first.
VCPU_STATS_DESC = (
    _c("halt_successful_poll"), _c("halt_attempted_poll"), _c("halt_poll_invalid"),
    _c("halt_wakeup"),
    StatDesc("halt_poll_success_ns", "cumulative", 1, "seconds"),
    StatDesc("halt_poll_fail_ns", "cumulative", 1, "seconds"),
    StatDesc("halt_wait_ns", "cumulative", 1, "seconds"),
    StatDesc("halt_poll_success_hist", "log_hist", HALT_POLL_HIST_COUNT, "seconds"),
    StatDesc("halt_poll_fail_hist", "log_hist", HALT_POLL_HIST_COUNT, "seconds"),
    StatDesc("halt_wait_hist", "log_hist", HALT_POLL_HIST_COUNT, "seconds"),
    _i("blocking", "boolean"),
    _c("pf_taken"), _c("pf_fixed"), _c("pf_emulate"), _c("pf_spurious"), _c("pf_fast"),
    _c("pf_mmio_spte_created"), _c("pf_guest"), _c("tlb_flush"), _c("invlpg"),
    _c("exits"), _c("io_exits"), _c("mmio_exits"), _c("signal_exits"), _c("irq_window_exits"),
    _c("nmi_window_exits"), _c("l1d_flush"), _c("halt_exits"), _c("request_irq_exits"),
    _c("irq_exits"), _c("host_state_reload"), _c("fpu_reload"), _c("insn_emulation"),
    _c("insn_emulation_fail"), _c("hypercalls"), _c("irq_injections"), _c("nmi_injections"),
    _c("req_event"), _c("nested_run"), _c("directed_yield_attempted"),
    _c("directed_yield_successful"), _c("preemption_reported"), _c("preemption_other"),
    _i("guest_mode", "boolean"), _c("notify_window_exits"),
)


class KvmStats:
    """A statistics block: one ``uint64`` array laid out like the kernel's
    binary data block (each statistic at its offset, histograms inline).

    Read and write counters as attributes; histograms are ``uint64`` views.
    A counter holds an integer in [0, 2**64) (``operator.index``: a float
    is a TypeError, not truncated; out of range is a ValueError naming the
    statistic, the block unchanged).  Not shared between threads: a block
    belongs to its VM or vCPU, which serialise their writers.
    """

    def __init__(self, descs: Iterable[StatDesc]):
        descs = tuple(descs)
        for d in descs:
            if not isinstance(d, StatDesc):
                raise TypeError(f"descs must be StatDesc, not {type(d).__name__}")
        object.__setattr__(self, "descs", descs)
        off, offsets = 0, {}
        for d in self.descs:
            offsets[d.name] = (off, d.size)
            off += d.size
        object.__setattr__(self, "_off", offsets)
        object.__setattr__(self, "data", np.zeros(off, dtype=np.uint64))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.descs)

    def kind(self, name) -> str:
        for d in self.descs:
            if d.name == name:
                return d.kind
        raise AttributeError(f"no statistic {name!r}")

    def __getattr__(self, name):
        if name.startswith("_"):         # a half-built instance has no _off
            raise AttributeError(name)
        try:
            o, n = self._off[name]
        except KeyError:
            raise AttributeError(name) from None
        return int(self.data[o]) if n == 1 else self.data[o:o + n]

    def __setattr__(self, name, value):
        if name not in self._off:
            raise AttributeError(f"no statistic {name!r}")
        o, n = self._off[name]
        if n != 1:
            raise AttributeError(f"{name} is a histogram; write its buckets")
        try:
            value = int_arg(name, value)
        except ValueError:
            raise ValueError(f"{name} would become negative or overflow ({value})") from None
        self.data[o] = value

    def peak(self, name, value) -> None:
        """Raise a peak counter to ``value`` if that is larger."""
        if name not in self._off:
            raise AttributeError(f"no statistic {name!r}")
        if self.kind(name) != "peak":
            raise ValueError(f"{name} is not a peak counter")
        value = int_arg("value", value)
        o, _ = self._off[name]
        if value > self.data[o]:
            self.data[o] = value

    def refresh(self) -> None:
        """Pull the counters other objects own (no-op here)."""

    def as_dict(self) -> dict:
        """``{name: int}``, histograms as lists: the shape of :func:`read_stats_fd`."""
        self.refresh()
        out = {}
        for d in self.descs:
            o, n = self._off[d.name]
            out[d.name] = int(self.data[o]) if n == 1 else [int(x) for x in self.data[o:o + n]]
        return out

    def audit(self) -> list[str]:
        bad = []
        self.refresh()
        for d in self.descs:
            o, n = self._off[d.name]
            if d.kind == "instant" and (self.data[o:o + n] >= np.uint64(1 << 63)).any():
                bad.append(f"stat {d.name} underflowed ({int(self.data[o])})")
        return bad

    def __repr__(self):
        nz = {k: v for k, v in self.as_dict().items() if v and not isinstance(v, list)}
        return f"{type(self).__name__}({nz})"


class VmStat(KvmStats):
    """``kvm->stat``.  ``pages_*`` and the remote TLB flush counters are read
    from the VM's page-table arena, ``max_mmu_rmap_size`` from its rmap pool
    (they are counted where the event happens)."""

    def __init__(self, arena=None, pool=None):
        super().__init__(VM_STATS_DESC)
        object.__setattr__(self, "_arena", arena)
        object.__setattr__(self, "_pool", pool)

    def refresh(self) -> None:
        a, p = self._arena, self._pool
        if a is not None:
            ps = a.page_stats
            st = a.stats()
            for k in ("pages_4k", "pages_2m", "pages_1g"):
                self.data[self._off[k][0]] = ps[k]
            for k in ("remote_tlb_flush", "remote_tlb_flush_requests"):
                self.data[self._off[k][0]] = st[k]
        if p is not None:
            self.data[self._off["max_mmu_rmap_size"][0]] = p.max_mmu_rmap_size

    def __getattr__(self, name):
        if name in ("pages_4k", "pages_2m", "pages_1g", "remote_tlb_flush",
                    "remote_tlb_flush_requests", "max_mmu_rmap_size"):
            self.refresh()
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in ("pages_4k", "pages_2m", "pages_1g", "remote_tlb_flush",
                    "remote_tlb_flush_requests", "max_mmu_rmap_size") and \
                (self._arena is not None or self._pool is not None):
            raise AttributeError(f"{name} is counted by the arena / rmap pool; "
                                 f"use PtArena.kvm_update_page_stats / kvm_flush_remote_tlbs")
        super().__setattr__(name, value)


#: The fault entry's counters, in the order of :attr:`VcpuStat.pf`.
VCPU_PF_COUNTERS = ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast",
                    "pf_mmio_spte_created")
_PF_INDEX = {n: i for i, n in enumerate(VCPU_PF_COUNTERS)}


class VcpuStat(KvmStats):
    """``vcpu->stat``.

    The fault counters (:data:`VCPU_PF_COUNTERS`) are kept as Python ints in
    the list :attr:`pf` (the scalar fault path bumps ``stat.pf[i] += 1``,
    far cheaper than a numpy element); attribute reads and writes go to the
    list, and :meth:`refresh` (``as_dict``, ``audit``) copies it into
    :attr:`data`."""

    def __init__(self):
        super().__init__(VCPU_STATS_DESC)
        object.__setattr__(self, "pf", [0] * len(VCPU_PF_COUNTERS))
        object.__setattr__(self, "_pf_off", tuple(self._off[n][0] for n in VCPU_PF_COUNTERS))

    def refresh(self) -> None:
        data = self.data
        for o, v in zip(self._pf_off, self.pf):
            data[o] = v

    def __getattr__(self, name):
        i = _PF_INDEX.get(name)
        if i is not None:
            return self.pf[i]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)         # checked, stored in data
        i = _PF_INDEX.get(name)
        if i is not None:
            self.pf[i] = int(self.data[self._pf_off[i]])


# ==================================================================================
# The live kernel's binary stats
# ==================================================================================

def read_live_vm_stats(vm) -> dict:
    """Stats of a live VM (a :class:`kvmmmu.live.Vm` or a VM file descriptor)."""
    return read_stats_of(getattr(vm, "fd", vm))


def read_live_vcpu_stats(vcpu) -> dict:
    """Stats of a live vCPU (a :class:`kvmmmu.live.Vcpu` or a vCPU file descriptor)."""
    return read_stats_of(getattr(vcpu, "fd", vcpu))


def compare_stats(model: Mapping, live: Mapping) -> dict:
    """Line up a model stats dict and a live one.

    Returns ``{"only_model": [...], "only_live": [...], "differ": {name: (model, live)}}``.
    ``only_live`` lists the kernel's extra (vendor or newer) statistics.
    """
    only_model = sorted(set(model) - set(live))
    only_live = sorted(set(live) - set(model))
    differ = {k: (model[k], live[k]) for k in model if k in live and model[k] != live[k]}
    return dict(only_model=only_model, only_live=only_live, differ=differ)
