"""Probe campaign for kvmmmu._core.tdp_mmu (see _attacks.py)."""
from _attacks import make_test

SPECIFIC = {
    # the input arrays rewritten by another thread while the nogil map reads them
    "mutated_during_batch": [
        "globals().__setitem__('_g', np.arange(1 << 12, dtype=np.uint64))",
        "__import__('threading').Thread(target=lambda: [_g.__setitem__(slice(None), "
        "np.uint64((1 << 63) + i)) for i in range(300)]).start() or "
        "[o_TdpMmuCore.map(_root, _g, _g + 4096, 1, _pc, _hc) for _ in range(30)]",
        "_a.audit()"],
    # a zap and a map from two threads at once: one of them is refused, nothing breaks
    "two_writers": [
        "[__import__('threading').Thread(target=lambda: [o_TdpMmuCore.zap_root(_root) "
        "for _ in range(50)]).start(), [o_TdpMmuCore.map(_root, np.arange(1 << 10, dtype="
        "np.uint64), np.arange(1 << 10, dtype=np.uint64), 1, _pc, _hc) for _ in range(50)]]",
        "__import__('time').sleep(1)", "_a.rcu_barrier()", "_a.audit()"],
    # the root freed under the core: refused by name
    "freed_root": ["o_TdpMmuCore.zap_root(_root)", "_a.rcu_barrier()",
                   "_a.kvm_mmu_free_shadow_page(_root)",
                   "o_TdpMmuCore.zap_leafs(_root, 0, 10)"],
}

test_probe = make_test("kvmmmu._core.tdp_mmu", SPECIFIC)
