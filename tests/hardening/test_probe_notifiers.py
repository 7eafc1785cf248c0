"""Probe campaign for kvmmmu.notifiers (see _attacks.py)."""
from _attacks import make_test

XFAIL = {
    'half_built': "owner vm: half-built MmuInvalidateState.audit raises AttributeError",
    'wrong_types': "owner vm: MmuInvalidateState(None) raises AttributeError ('warn_sink')",
    'reinit': "owner vm: MmuInvalidateState.__init__(None) raises AttributeError ('warn_sink')",
    'threads': "owner vm: MmuInvalidateState.kvm_mmu_invalidate_begin without mmu_lock raises a bare RuntimeError",
}

test_probe = make_test("kvmmmu.notifiers", xfail=XFAIL)
