"""Probe campaign for kvmmmu.paging (see _attacks.py)."""
from _attacks import make_test

XFAIL = {
    'half_built': "owner walk: CpuState.check(0) raises AttributeError ('smep')",
    'wrong_types': "owner walk: CpuState.check(None) raises AttributeError ('smep')",
}

test_probe = make_test("kvmmmu.paging", xfail=XFAIL)
