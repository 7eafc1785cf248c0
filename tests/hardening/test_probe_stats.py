"""Probe campaign for kvmmmu.stats (see _attacks.py)."""
from _attacks import make_test

XFAIL = {
    'half_built': "owner host: half-built KvmStats.as_dict recurses (RecursionError)",
    'wrong_types': "owner host: KvmStats('x') raises AttributeError ('size')",
    'reinit': "owner host: (vm) MmuInvalidateState.__init__(None) raises AttributeError ('warn_sink')",
    'threads': "owner host: (vm) MmuInvalidateState.kvm_mmu_invalidate_begin raises a bare RuntimeError",
}

test_probe = make_test("kvmmmu.stats", xfail=XFAIL)
