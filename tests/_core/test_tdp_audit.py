"""The C audit of the TDP invariants (kvmmmu._core.tdp_audit, TdpMmu.audit).

A VM with the TDP MMU is faulted in (2M and 4K leaves, an NX-split table on
the possible-NX list) and audits clean; then each violation is planted
through the arena's writable views (tables, set_sp) or the roots list, and
the audit must report it, with TdpMmu.audit's message.
"""
import os

import numpy as np
import pytest

from kvmmmu._core.spte import PT_WRITABLE_MASK
from kvmmmu._core.tdp_audit import PROBLEM_KINDS, tdp_audit
from kvmmmu._core.tdp_iter import TdpIter
from kvmmmu.host import HostConfig
from kvmmmu.tdp_mmu import TdpMmu
from kvmmmu.vm import VM, KvmParams

MiB = 1 << 20


def vm_():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), nr_vcpus=1,
            params=KvmParams(nx_huge_pages=True))
    vm.add_memory(0, 64 * MiB, slot=0, thp=True, populate=True)
    t = vm.register_mmu(TdpMmu(vm))
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    for g in range(0, 4096, 512):
        t.page_fault(v, g, write=True)                  # 2M leaves
    t.page_fault(v, 0x1000, exec=True)                  # NX: 4K, its table on the list
    for g in range(0x1200, 0x1280):
        t.page_fault(v, g, write=True, exec=True)
    assert t.core.nx_lpage_splits >= 1
    assert t.audit() == []
    return vm, t


def entries(vm, t, lo, hi):
    """(gfn, level, sptep, spte) of every entry under the root in [lo, hi)."""
    return list(TdpIter(vm.arena, t.roots[0].sp, lo, hi))


def poke(vm, sptep, value):
    """Write an SPTE behind the MMU's back (a writable table view)."""
    a = vm.arena
    a.table(a.table_index(sptep >> 12))[(sptep >> 3) & 511] = np.uint64(value)


def present(vm, spte):
    return bool(vm.fmt.is_shadow_present_pte_array(np.array([spte], np.uint64))[0])


def leaf_at(vm, t, gfn, level):
    for g, lvl, sptep, spte in entries(vm, t, gfn, gfn + 1):
        if lvl == level:
            return sptep, spte
    raise AssertionError


def has(bad, text):
    return any(text in b for b in bad)


def test_a_clean_vm_audits_clean_and_counts_every_leaf():
    vm, t = vm_()
    slots = [s for sp in vm.memslots for s in sp]
    counts, problems = tdp_audit(vm.arena, np.array([t.roots[0].sp], np.uint64),
                                 np.array([s.base_gfn for s in slots], np.uint64),
                                 np.array([s.npages for s in slots], np.uint64),
                                 np.full(len(slots), 3, np.int8), np.zeros(len(slots), np.int8),
                                 np.array(t.core.possible_nx_huge_pages(), np.uint64))
    st = vm.arena.page_stats
    assert len(problems) == 0 and counts["problems"] == 0
    assert counts["leaves"][1] == st["pages_4k"] > 0 and counts["leaves"][2] == st["pages_2m"] > 0
    assert counts["tables"] == t.core.tdp_mmu_pages


def test_a_frozen_spte_is_reported():
    vm, t = vm_()
    sptep, _ = leaf_at(vm, t, 0x1000, 1)
    poke(vm, sptep, vm.fmt.masks()["frozen_spte"])
    assert has(t.audit(), "FROZEN SPTE left at gfn 0x1000 level 1")


def test_a_link_to_no_table_and_a_second_parent_are_reported():
    vm, t = vm_()
    # the 4K table of 0x1000 linked a second time, from the empty 2M entry at 0x1400
    _, spte_pd = leaf_at(vm, t, 0x1000, 2)
    hole, old = leaf_at(vm, t, 0x1400, 2)
    assert not present(vm, old)
    poke(vm, hole, spte_pd)
    bad = t.audit()
    assert has(bad, "linked a second time at gfn 0x1400 level 2"), bad
    # a non-leaf SPTE pointing outside the arena's tables
    poke(vm, hole, (spte_pd & ~((1 << 52) - 4096)) | (0x1234 << 12))
    bad = t.audit()
    assert has(bad, "at gfn 0x1400 level 2 points to no live table"), bad
    poke(vm, hole, old)
    assert t.audit() == []


def test_a_header_disagreeing_with_its_parent_is_reported():
    vm, t = vm_()
    _, spte_pd = leaf_at(vm, t, 0x1000, 2)
    pfn = (spte_pd >> 12) & ((1 << 40) - 1)
    live = (np.flatnonzero(vm.arena.sp_states() == 3) + 1).tolist()
    sp = next(s for s in live if vm.arena.get_sp(s)["spt"] == pfn)
    vm.arena.set_sp(sp, gfn=0x2000)
    assert has(t.audit(), "its header's level, gfn or ptep disagree")


def test_a_leaf_outside_the_slots_given_and_above_their_level_are_reported():
    vm, t = vm_()
    assert leaf_at(vm, t, 0, 2)[1] >> 7 & 1                 # a 2M leaf of slot 0
    _, problems = tdp_audit(vm.arena, np.array([t.roots[0].sp], np.uint64),
                                 np.array([0], np.uint64), np.array([4096], np.uint64),
                                 np.array([1], np.int8), np.array([0], np.int8))
    kinds = {PROBLEM_KINDS[k] for k in problems["kind"].tolist()}
    assert "level" in kinds                                 # 2M leaves, slot allows 4K only
    assert "no_slot" in kinds                               # the 4K/2M leaves past 4096 gfns
    bad = problems[problems["kind"] == 5]
    assert set(bad["level"].tolist()) == {2}


def test_the_slot_alignment_limits_the_level_through_TdpMmu_audit():
    vm, t = vm_()
    s = vm.memslots[0].id_to_memslot(0)
    s.userspace_addr += 4096 * 3                            # gfn and hva no longer co-aligned
    try:
        bad = t.audit()
        assert has(bad, "above its memslot's max level 1"), bad
    finally:
        s.userspace_addr -= 4096 * 3
    assert t.audit() == []


def test_a_leaf_breaking_the_writable_invariants_is_reported():
    vm, t = vm_()
    sptep, spte = leaf_at(vm, t, 0x1210, 1)
    assert spte & PT_WRITABLE_MASK
    poke(vm, sptep, spte & ~vm.fmt.masks()["mmu_writable_mask"])
    assert has(t.audit(), "at gfn 0x1210 level 1 breaks the writable invariants")


def test_an_nx_listed_table_that_is_no_longer_linked_is_reported():
    vm, t = vm_()
    listed = t.core.possible_nx_huge_pages()[0]
    h = vm.arena.get_sp(listed)
    poke(vm, h["ptep"], 0 if not vm.fmt.masks().get("nonpresent_value") else
         vm.fmt.masks()["nonpresent_value"])
    bad = t.audit()
    assert has(bad, f"sp {listed} on the possible NX list is not a flagged TDP table"), bad
    assert has(bad, "tdp_mmu_pages")                         # the table count broke too


def test_root_refcount_and_a_bad_root_are_reported():
    vm, t = vm_()
    t.roots[0].refcount = 0
    assert has(t.audit(), "refcount 0")
    t.roots[0].refcount = 2
    _, problems = tdp_audit(vm.arena, np.array([t.roots[0].sp, 9999], np.uint64),
                            np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                            np.zeros(0, np.int8), np.zeros(0, np.int8))
    assert "bad_root" in {PROBLEM_KINDS[k] for k in problems["kind"].tolist()}


def test_bad_arguments_raise_and_the_problem_list_is_capped():
    vm, t = vm_()
    root = np.array([t.roots[0].sp], np.uint64)
    with pytest.raises(ValueError, match="slot_npages"):
        tdp_audit(vm.arena, root, np.zeros(2, np.uint64), np.zeros(1, np.uint64),
                  np.zeros(2, np.int8), np.zeros(2, np.int8))
    with pytest.raises(TypeError):
        tdp_audit(vm.arena, root, np.zeros(1, np.uint64), np.zeros(1, np.uint64),
                  np.zeros(1, np.int16), np.zeros(1, np.int8))
    counts, problems = tdp_audit(vm.arena, root, np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                                 np.zeros(0, np.int8), np.zeros(0, np.int8), max_problems=3)
    assert len(problems) == 3 and counts["problems"] > 3       # no slot: every leaf


def test_a_planted_cycle_is_reported_not_followed():
    """A 2M-level entry linking the root's own table: the walk enters each
    table once, so it reports the second link and ends (in a child with a
    timeout: following the link would never end)."""
    from _probe import assert_no_crash
    here = os.path.dirname(__file__)
    r = assert_no_crash(f"""
        import sys
        sys.path[:0] = {[here, os.path.dirname(here)]!r}
        import numpy as np
        import test_tdp_audit as T
        vm, t = T.vm_()
        hole, old = T.leaf_at(vm, t, 0x1400, 2)
        root_pfn = vm.arena.get_sp(t.roots[0].sp)["spt"]
        _, spte_pd = T.leaf_at(vm, t, 0x1000, 2)
        T.poke(vm, hole, (spte_pd & ~(((1 << 40) - 1) << 12)) | (root_pfn << 12))
        bad = t.audit()
        assert T.has(bad, "linked a second time at gfn 0x1400 level 2"), bad
        print("REPORTED")
    """, timeout=120, allow_raise=False)
    assert "REPORTED" in r.stdout


def test_a_leaf_planted_outside_every_memslot_is_reported_by_TdpMmu_audit():
    vm, t = vm_()
    _, huge = leaf_at(vm, t, 0, 2)
    assert huge >> 7 & 1
    hole, old = leaf_at(vm, t, 0x10000, 2)                  # 256 MiB: no memslot
    assert not present(vm, old)
    poke(vm, hole, huge)
    bad = t.audit()
    assert has(bad, "at gfn 0x10000 level 2 outside every memslot"), bad
    assert has(bad, "page stats")                           # no handle_changed_spte either
