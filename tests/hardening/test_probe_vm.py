"""Probe campaign for kvmmmu.vm (see _attacks.py)."""
from _attacks import make_test

test_probe = make_test("kvmmmu.vm")
