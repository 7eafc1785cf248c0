"""Probe campaign for kvmmmu.tdp_mmu (see _attacks.py)."""
from _attacks import make_test

test_probe = make_test("kvmmmu.tdp_mmu")
