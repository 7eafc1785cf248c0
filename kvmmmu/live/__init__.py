"""Check the model against the kernel you are running: a small /dev/kvm driver.

``kvmmmu.live`` drives the host's KVM from Python, with nothing but ioctls:

* :class:`~kvmmmu.live.kvm.Kvm`, :class:`~kvmmmu.live.kvm.Vm`,
  :class:`~kvmmmu.live.kvm.Vcpu`: create a VM, memslots (numpy arrays over
  the guest memory), a vCPU; registers, CPUID, ``KVM_RUN``; the VM and vCPU
  binary stats (:mod:`kvmmmu.live.stats`);
* :mod:`kvmmmu.live.x86`: GDT/IDT/TSS, segment and control registers for
  each paging mode (:func:`~kvmmmu.live.x86.setup_guest`), and a handful of
  hand-assembled instructions;
* :class:`~kvmmmu.live.tracefs.TraceInstance`: the kernel's ``kvmmmu``
  tracepoints recorded in a private tracefs instance for the duration of a
  run, then switched off, cleared and removed;
* :func:`host_guest_model`: the :class:`kvmmmu.paging.GuestCpuModel` of a
  vCPU, from the CPUID it was given, and :func:`kvm_params` for the kvm
  module parameters (``tdp_mmu``, ``nx_huge_pages``, ...).

Typical use (root needed for tracefs)::

    from kvmmmu import live
    with live.Kvm() as kvm, kvm.create_vm() as vm, live.TraceInstance() as tr:
        ram = vm.add_memory(0, 4 << 20)
        ...                                   # page tables, code
        cpu = vm.create_vcpu()
        cpu.set_cpuid(kvm.supported_cpuid())
        state = live.setup_guest(cpu, "4level", cr3=0x1000, rip=0x10000, rsp=0x8000)
        cpu.run_until_stop()
    print(tr.lines())                         # the kernel's walker events

:func:`problem` says why this cannot work here (no /dev/kvm, no tracefs).

The shadow-MMU scenario guests and their recorder are submodules (imported on
demand): :mod:`kvmmmu.live.scenarios` describes small long-mode guests as
data, :mod:`kvmmmu.live.record` runs them with the ``kvmmmu`` and ``kvm``
tracepoints on and derives the vCPU input stream the model replays
(``python -m kvmmmu.live.record --out tests/data/shadow_scenarios``).
"""
from __future__ import annotations

import os
from pathlib import Path

from kvmmmu.live.kvm import Kvm, KvmClosedError, KvmError, Vcpu, Vm
from kvmmmu.live.stats import read_stats
from kvmmmu.live.tracefs import TRACEFS, TraceInstance, mount_tracefs, tracefs_problem
from kvmmmu.live.x86 import MODES, asm, asm64, setup_guest, write_tables

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "KvmClosedError", "TraceInstance", "TRACEFS", "read_stats",
           "MODES", "asm", "asm64", "setup_guest", "write_tables", "problem", "kvm_problem",
           "tracefs_problem", "mount_tracefs", "kvm_params", "host_guest_model"]

KVM_PARAMS = Path("/sys/module/kvm/parameters")


def kvm_problem(path="/dev/kvm") -> str | None:
    """Why /dev/kvm cannot be used, or None."""
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable"
    try:
        Kvm(path).close()
    except OSError as e:
        return f"{path}: {e}"
    return None


def problem(tracing=True) -> str | None:
    """Why a live comparison cannot run here (None if it can)."""
    return kvm_problem() or (tracefs_problem() if tracing else None)


def kvm_params(path=KVM_PARAMS) -> dict[str, str]:
    """The kvm module parameters (``/sys/module/kvm/parameters``) as strings."""
    out = {}
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.iterdir()):
            try:
                out[f.name] = f.read_text().strip()
            except OSError:
                pass
    return out


def host_guest_model(vcpu: Vcpu):
    """The :class:`kvmmmu.paging.GuestCpuModel` of `vcpu`'s effective CPUID."""
    from kvmmmu.paging import GuestCpuModel
    if not isinstance(vcpu, Vcpu):
        raise TypeError(f"vcpu must be a live Vcpu, not {type(vcpu).__name__}")
    entries = vcpu.get_cpuid()
    return GuestCpuModel.from_cpuid([(fn, idx, a, b, c, d) for fn, idx, _, a, b, c, d in entries])
