"""Probe campaign for kvmmmu.mmutrace (see _attacks.py)."""
from _attacks import make_test

XFAIL = {
    'half_built': "owner walk: half-built Event.emit raises AttributeError ('enabled')",
    'wrong_types': "owner walk: Event.check(None) raises AttributeError ('keys')",
}

test_probe = make_test("kvmmmu.mmutrace", xfail=XFAIL)
