"""Probe campaign for kvmmmu.notifiers (see _attacks.py)."""
from _attacks import make_test

test_probe = make_test("kvmmmu.notifiers")
