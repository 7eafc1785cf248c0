"""Probe campaign for kvmmmu._core.pt_arena (see _attacks.py)."""
from _attacks import make_test

test_probe = make_test("kvmmmu._core.pt_arena")
