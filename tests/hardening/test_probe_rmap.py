"""Probe campaign for kvmmmu._core.rmap (see _attacks.py)."""
from _attacks import make_test

SPECIFIC = {
    # gfns rewritten by another thread during rmap_add_batch; the slot audits after
    "mutated_during_batch": [
        "globals().__setitem__('_g', np.arange(512, dtype=np.uint64) + np.uint64(100))",
        "__import__('threading').Thread(target=lambda: [_g.__setitem__(slice(None), "
        "np.uint64(i % 2000)) for i in range(300)]).start()",
        "[rmap_add_batch(o_PteListDescCache, o_RmapSlot, _g, (np.arange(512, dtype=np.uint64)"
        " + 1) * 8 + (1 << 41)) for _ in range(3)]",
        "audit(o_RmapSlot)"],
    "view_flipped_writable": ["o_RmapSlot.rmap[0].setflags(write=True)", "audit(o_RmapSlot)"],
}

test_probe = make_test("kvmmmu._core.rmap", SPECIFIC)
