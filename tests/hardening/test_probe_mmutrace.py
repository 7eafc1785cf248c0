"""Probe campaign for kvmmmu.mmutrace (see _attacks.py)."""
from _attacks import make_test

test_probe = make_test("kvmmmu.mmutrace")
