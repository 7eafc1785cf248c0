"""Probe campaign for kvmmmu._core.spte (see _attacks.py)."""
from _attacks import make_test

_MUTATE = ("_mutate(lambda s: SpteFormat.legacy().spte_to_pfn_array(s), "
           "np.arange(1 << 16, dtype=np.uint64))")
SPECIFIC = {
    # an input rewritten by another thread while the nogil loop reads it
    "mutated_during_batch": [
        "globals().__setitem__('_mutate', lambda f, a: __import__('threading').Thread("
        "target=lambda: [a.__setitem__(slice(None), np.uint64(i)) for i in range(200)]).start()"
        " or [f(a) for _ in range(200)])",
        _MUTATE],
    "out_overlap": ["SpteFormat.legacy().spte_to_pfn_array(np.arange(8, dtype=np.uint64), "
                    "out=np.arange(8, dtype=np.uint64))",
                    "(lambda s: SpteFormat.legacy().spte_to_pfn_array(s, out=s))"
                    "(np.arange(8, dtype=np.uint64))"],
}

test_probe = make_test("kvmmmu._core.spte", SPECIFIC)
