"""Probe campaign for kvmmmu._core.defs (see _attacks.py)."""
from _attacks import make_test

test_probe = make_test("kvmmmu._core.defs")
