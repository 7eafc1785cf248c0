"""pt_arena is split by kernel concept (issue 9 item 4): each helper has one
compiled home, and pt_arena.pxd holds declarations, not their bodies.

The SPTE writers and split SPTEs live in mmu_spte, which exports them as C
functions (``__pyx_capi__``) that pt_arena and lockless_torture call; only
the lockless reader and one-expression predicates stay ``cdef inline`` in
mmu_spte.pxd.  The lockless-walk reader halves are inline in
mmu_lockless.pxd (both .pxd files say why).
"""
import pathlib
import re

import kvmmmu._core.mmu_lockless as mmu_lockless
import kvmmmu._core.mmu_spte as mmu_spte

CORE = pathlib.Path(mmu_spte.__file__).resolve().parent

WRITERS = {
    "_set_spte", "_update_clear_spte_fast", "_update_clear_spte_slow", "count_spte_clear",
    "spte_has_volatile_bits_v6_12", "kvm_update_page_stats", "mmu_spte_set",
    "mmu_spte_update", "mmu_spte_clear_track_bits", "mmu_spte_clear_no_track",
}
WALK = {
    "walk_shadow_page_lockless_begin", "walk_shadow_page_lockless_end",
    "kvm_tdp_mmu_walk_lockless_begin", "kvm_tdp_mmu_walk_lockless_end",
}
# Inline on purpose (mmu_spte.pxd says why).
INLINE = {
    "_log", "_get_spte_lockless", "_get_spte_naive_split", "is_accessed_spte_v6_12",
    "is_dirty_spte_v6_12", "_needs_atomic_update", "_spte_writable_invariants_ok",
    "mmu_spte_get_lockless",
}


def _pxd_functions(name):
    """{function: is_inline} of the cdef functions a .pxd declares or defines."""
    text = (CORE / name).read_text()
    return {m.group(2): bool(m.group(1))
            for m in re.finditer(r"^cdef (inline )?[\w ]+?\**\b(\w+)\(", text, re.M)}


def test_writers_compiled_once_in_mmu_spte():
    assert WRITERS <= set(mmu_spte.__pyx_capi__)
    declared = _pxd_functions("mmu_spte.pxd")
    assert {f for f in WRITERS if declared.get(f) is False} == WRITERS
    assert {f for f in INLINE if declared.get(f)} == INLINE
    assert not mmu_spte.__pyx_capi__.keys() & INLINE


def test_walk_helpers_live_in_mmu_lockless():
    declared = _pxd_functions("mmu_lockless.pxd")
    assert {f for f in WALK if declared.get(f)} == WALK
    assert "kvm_flush_remote_tlbs" in mmu_lockless.__pyx_capi__


def test_pt_arena_pxd_defines_no_moved_helper():
    defined = _pxd_functions("pt_arena.pxd")
    assert not defined.keys() & (WRITERS | WALK | INLINE)
