"""Probe campaign for kvmmmu._core.tdp_iter (see _attacks.py)."""
from _attacks import make_test

SPECIFIC = {
    # the gfn array rewritten by another thread while the nogil walk reads it
    "mutated_during_batch": [
        "globals().__setitem__('_g', np.zeros(1 << 16, np.uint64))",
        "__import__('threading').Thread(target=lambda: [_g.__setitem__(slice(None), "
        "np.uint64((1 << 63) + i)) for i in range(300)]).start() or "
        "[kvm_tdp_mmu_get_walk(_a, _root, _g) for _ in range(100)]"],
    # the root freed under an iterator: it reads poison and stops, never follows it
    "root_freed_under_iterator": [
        "globals().__setitem__('_it', TdpIter(_a, _root, 0, 1 << 27))",
        "next(_it)",
        "_a.kvm_mmu_free_shadow_page(_root)",
        "list(_it)"],
}

test_probe = make_test("kvmmmu._core.tdp_iter", SPECIFIC)
