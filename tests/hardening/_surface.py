"""The public surface the hardening suite attacks, and the child-side runner.

``MODULES`` names each public module, the helper that owns it, and the setup
source that builds well-formed instances of its classes (the fuzzer also
attacks half-built ones, made with ``Cls.__new__(Cls)``).  :func:`batch_source`
turns a list of call lines into one probe: the child runs each call, records
every exception that is neither one of kvmmmu's own classes nor one of the
allowed built-in families, and reports them; a fatal signal or a hang is seen
by the parent through tests/_probe.py, with the call that was running printed
on stderr first (the reproducer).
"""
from __future__ import annotations

import importlib
import inspect

# module: (owner helper, setup source defining objects named o_<Class>)
_VM_SETUP = """
from kvmmmu.vm import VM
_vm = VM("tdp_mmu"); _vms = VM("shadow")
o_VM = _vm; o_PtArena = _vm.arena; o_SpteFormat = _vm.fmt; o_HostMm = _vm.host
o_HostConfig = _vm.host_config; o_MemoryAttributes = _vm.mem_attrs; o_MmuLock = _vm.mmu_lock
o_KvmMmuNotifier = _vm.mmu_notifier; o_MmuInvalidateState = _vm.notifier
o_KvmParams = _vm.params; o_PteListDescPool = _vm.rmap_pool; o_VmStat = _vm.stat
o_KvmMemslots = _vm.memslots[0]
"""
MODULES = {
    "kvmmmu._core.spte": ("spte", ""),
    "kvmmmu._core.role": ("spte", "o_KvmMmuPageRole = KvmMmuPageRole(0x3704)\n"),
    "kvmmmu._core.defs": ("spte", ""),
    "kvmmmu._core.rmap": ("rmap", """
import numpy as np
o_PteListDescPool = PteListDescPool(); o_PteListDescCache = PteListDescCache(o_PteListDescPool)
o_PteListDescCache.topup(40); o_RmapSlot = RmapSlot(0, 1024, o_PteListDescPool)
rmap_add_batch(o_PteListDescCache, o_RmapSlot, np.arange(16, dtype=np.uint64),
               (np.arange(16, dtype=np.uint64) + 1) * 8 + (1 << 40))
"""),
    "kvmmmu._core.pt_arena": ("arena", """
from kvmmmu._core.spte import SpteFormat
o_PtArena = PtArena(SpteFormat.legacy(), nr_vcpus=2)
o_MmuMemoryCache = MmuMemoryCache(o_PtArena, "shadow_page")
o_MmuMemoryCache.topup(5)
"""),
    "kvmmmu._core.tdp_iter": ("tdp", """
from kvmmmu._core.pt_arena import PtArena, MmuMemoryCache
from kvmmmu._core.spte import SpteFormat
_a = PtArena(SpteFormat.ept(), nr_vcpus=1)
_pc = MmuMemoryCache(_a, "shadow_page"); _pc.topup(2)
_hc = MmuMemoryCache(_a, "page_header"); _hc.topup(2)
_root = _a.alloc_sp(_pc, _hc, role=0x3784, gfn=0, tdp_mmu_page=True)
o_TdpIter = TdpIter(_a, _root, 0, 1 << 20)
"""),
    "kvmmmu._core.tdp_mmu": ("tdp", """
from kvmmmu._core.pt_arena import PtArena, MmuMemoryCache
from kvmmmu._core.spte import SpteFormat
_a = PtArena(SpteFormat.ept(), nr_vcpus=1)
_pc = MmuMemoryCache(_a, "shadow_page"); _pc.topup(2)
_hc = MmuMemoryCache(_a, "page_header"); _hc.topup(2)
_root = _a.alloc_sp(_pc, _hc, role=0x3784, gfn=0, tdp_mmu_page=True)
o_TdpMmuCore = TdpMmuCore(_a)
o_TdpMmuCore.map(_root, np.arange(64, dtype=np.uint64), np.arange(64, dtype=np.uint64) + 4096,
                 1, _pc, _hc)
"""),
    "kvmmmu._core.guest_walk": ("walk", """
import numpy as np
o_GuestMemory = GuestMemory(np.zeros(0x4000, np.uint8))
"""),
    "kvmmmu.paging": ("walk", """
import numpy as np
o_GuestMemory = GuestMemory(np.zeros(0x4000, np.uint8))
o_CpuState = CpuState.long_mode(cr3=0x1000)
"""),
    "kvmmmu.mmutrace": ("walk", ""),
    "kvmmmu.host": ("host", _VM_SETUP),
    "kvmmmu.stats": ("host", _VM_SETUP),
    "kvmmmu.memslots": ("vm", _VM_SETUP),
    "kvmmmu.memattrs": ("vm", _VM_SETUP),
    "kvmmmu.notifiers": ("vm", _VM_SETUP),
    "kvmmmu.vm": ("vm", _VM_SETUP),
    "kvmmmu.tdp_mmu": ("tdp", """
from kvmmmu.vm import VM
from kvmmmu.host import HostConfig
_vm = VM("tdp_mmu", host=HostConfig(tdp="ept"))
_vm.add_memory(0, 4 << 20, thp=True, populate=True)
o_TdpMmu = _vm.register_mmu(TdpMmu(_vm))
o_TdpRoot = o_TdpMmu.kvm_mmu_load(_vm.vcpus[0])
o_TdpMmu.page_fault(_vm.vcpus[0], 5, write=True)
"""),
    "kvmmmu.live": ("harden", """
import os
if os.access("/dev/kvm", os.R_OK | os.W_OK):
    o_Kvm = Kvm(); o_Vm = o_Kvm.create_vm()
"""),
}

# Calls the fuzzer leaves alone, with why: they act on the machine, not on
# the model (tracefs instances are system-wide; KVM_RUN on random guest code
# may never exit), or they are documented to block (waiting for a lock the
# same thread holds is a deadlock in the kernel too).
SKIP = {
    "kvmmmu.live": {"TraceInstance", "Vcpu.run", "Vcpu.run_until_stop", "Vm.add_memory"},
    "kvmmmu.mmutrace": {"read_trace"},
}

# Built-in exception families a bad argument may produce; kvmmmu's own
# exception classes are always allowed, and so is an AttributeError raised
# by a pure-Python kvmmmu frame (a wrong-typed argument under duck typing;
# see _python_attribute_error in the child).
ALLOWED = ("TypeError", "ValueError", "OverflowError", "KeyError", "IndexError", "OSError")

# Argument values, as source (evaluated in the child).
VALUES = [
    "0", "1", "-1", "7", "0x1000", "2**63", "2**64", "-2**63 - 1", "2**200",
    "0.5", "float('nan')", "float('inf')", "True", "None", "''", "'tdp_mmu'", "'shadow'",
    "'ept'", "b'\\x00'", "[]", "[1, 2]", "()", "{}", "object()",
    "np.zeros(4, np.uint64)", "np.arange(8, dtype=np.uint64)", "np.zeros(4, np.float64)",
    "np.zeros((2, 2), np.uint64)", "np.arange(16, dtype=np.uint64)[::2]",
    "_ro(np.arange(4, dtype=np.uint64))", "np.zeros(0, np.uint64)", "np.zeros(3, np.int32)",
    "np.uint64(5)", "np.int64(-1)", "np.zeros(0x2000, np.uint8)",
]


def public_names(obj):
    names = getattr(obj, "__all__", None)
    if names is None:
        names = [n for n in dir(obj) if not n.startswith("_")]
    return list(names)


def is_extension_type(cls):
    """A class compiled by Cython: its half-built instances (``__new__``
    without ``__init__``) and re-``__init__``-ed ones hold C state that must
    be guarded.  A pure-Python class is outside that part of the contract:
    its half-built instance raises AttributeError, as any Python object does,
    and cannot reach C memory."""
    import sys
    f = getattr(sys.modules.get(cls.__module__), "__file__", "") or ""
    return f.endswith((".so", ".pyd"))


def targets(modname):
    """(callable source, owner class or None) for every public callable of
    the module, its classes, their instances and half-built instances."""
    mod = importlib.import_module(modname)
    skip = SKIP.get(modname, set())
    out = []
    for n in public_names(mod):
        o = getattr(mod, n, None)
        if n in skip or o is None or not callable(o):
            continue
        if inspect.isclass(o):
            if issubclass(o, BaseException) or not o.__module__.startswith("kvmmmu"):
                continue
            out.append(n)
            for m in public_names(o):
                if f"{n}.{m}" in skip:
                    continue
                if not any(m in vars(k) and k.__module__.startswith("kvmmmu") for k in o.__mro__):
                    continue        # inherited from int, Enum, object: not ours
                attr = inspect.getattr_static(o, m, None)
                if attr is None or isinstance(attr, property) or not callable(getattr(o, m, None)):
                    continue
                if isinstance(attr, (staticmethod, classmethod)):
                    out.append(f"{n}.{m}")
                else:
                    out.append(f"_obj({n!r}).{m}")
                    if is_extension_type(o):
                        out.append(f"_half({n}).{m}")
        elif getattr(o, "__module__", "") and not inspect.ismodule(o):
            out.append(n)
    return out


_HEAD = r"""
import faulthandler, gc, sys, json, numpy as np
from %(mod)s import *
import %(mod)s as _M
%(setup)s
def _ro(a):
    a.setflags(write=False); return a
def _obj(name):
    o = globals().get("o_" + name)
    if o is None:
        raise _Skip
    return o
def _half(cls):
    return cls.__new__(cls)
class _Skip(Exception):
    pass
_ALLOWED = tuple(getattr(__builtins__, n, None) or __import__("builtins").__dict__[n] for n in %(allowed)r)
_bad = []
def _python_attribute_error(e):
    # Duck typing: an argument of the wrong type reaching pure-Python kvmmmu
    # code fails the first attribute lookup on it.  No C is involved and
    # nothing has changed, so it is allowed; raised from compiled code it
    # is not (there it would mean a half-built object was used).
    if type(e) is not AttributeError:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    f = tb.tb_frame.f_code.co_filename
    return f.endswith(".py") and "/kvmmmu/" in f and "/_core/" not in f
def _call(src, thunk):
    sys.stderr.write("@@CALL " + src + "\n"); sys.stderr.flush()
    faulthandler.dump_traceback_later(%(per_call)s, exit=True)
    try:
        thunk()
    except _Skip:
        pass
    except BaseException as e:
        t = type(e)
        if not (t.__module__.startswith("kvmmmu") or isinstance(e, _ALLOWED)
                or _python_attribute_error(e)):
            _bad.append((src, t.__module__ + "." + t.__qualname__, str(e)[:200]))
    finally:
        faulthandler.cancel_dump_traceback_later()
"""


def batch_source(modname, calls, per_call=20):
    """One probe running `calls` (source lines) against `modname`."""
    owner, setup = MODULES[modname]
    lines = [_HEAD % dict(mod=modname, setup=setup, allowed=ALLOWED, per_call=per_call)]
    for c in calls:
        lines.append(f"_call({c!r}, lambda: {c})")
    lines.append("gc.collect()")
    lines.append("assert not _bad, 'disallowed exceptions: ' + json.dumps(_bad, indent=1)")
    return "\n".join(lines)


def last_call(stderr):
    """The call the child was running when it died (the reproducer)."""
    calls = [ln[len("@@CALL "):] for ln in stderr.splitlines() if ln.startswith("@@CALL ")]
    return calls[-1] if calls else None
