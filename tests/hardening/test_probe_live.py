"""Probe campaign for kvmmmu.live (see _attacks.py)."""
from _attacks import make_test

test_probe = make_test("kvmmmu.live")
