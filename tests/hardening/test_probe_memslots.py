"""Probe campaign for kvmmmu.memslots (see _attacks.py)."""
from _attacks import make_test

XFAIL = {
    'half_built': "owner vm: half-built KvmMemorySlot.copy raises AttributeError ('id')",
    'wrong_types': "owner vm: half-built GuestMemfd.unbind(None) raises AttributeError",
    'reinit': "owner vm: MmuInvalidateState.__init__(None) raises AttributeError ('warn_sink')",
    'threads': "owner vm: MmuInvalidateState.kvm_mmu_invalidate_begin without mmu_lock raises a bare RuntimeError",
}

test_probe = make_test("kvmmmu.memslots", xfail=XFAIL)
