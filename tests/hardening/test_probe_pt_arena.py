"""Probe campaign for kvmmmu._core.pt_arena (see _attacks.py)."""
from _attacks import make_test

XFAIL = {
    'wrong_types': "owner arena: PtArena.chunk_headers(1.5) crashes or hangs the interpreter",
}

test_probe = make_test("kvmmmu._core.pt_arena", xfail=XFAIL)
