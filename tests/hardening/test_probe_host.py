"""Probe campaign for kvmmmu.host (see _attacks.py)."""
from _attacks import make_test

XFAIL = {
    'half_built': "owner host: half-built HostPhysMem/HostMm/Vma methods raise AttributeError",
    'wrong_types': "owner host: half-built HostPhysMem.alloc_huge(None) etc. raise AttributeError",
    'reinit': "owner host: (vm) MmuInvalidateState.__init__(None) raises AttributeError ('warn_sink')",
    'threads': "owner host: (vm) MmuInvalidateState.kvm_mmu_invalidate_begin raises a bare RuntimeError, not a kvmmmu error",
}

test_probe = make_test("kvmmmu.host", xfail=XFAIL)
