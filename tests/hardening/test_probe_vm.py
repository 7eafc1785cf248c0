"""Probe campaign for kvmmmu.vm (see _attacks.py)."""
from _attacks import make_test

XFAIL = {
    'half_built': "owner vm: half-built VM.audit raises AttributeError ('host_config')",
    'wrong_types': "owner vm: half-built VM.audit(None) raises AttributeError",
    'reinit': "owner vm: MmuInvalidateState.__init__(None) raises AttributeError ('warn_sink')",
    'threads': "owner vm: MmuInvalidateState.kvm_mmu_invalidate_begin without mmu_lock raises a bare RuntimeError",
}

test_probe = make_test("kvmmmu.vm", xfail=XFAIL)
