"""kvmmmu._core.rmap: pte_list_desc chains, rmap heads, the rmap lock, batch API.

Facts checked here come from ../shared/reference/rmap.md (Linux v6.18 mmu.c).
The hypothesis state machine runs every operation against a dict-of-sets model
and calls :func:`rmap.audit` (the structural invariants) after every step.
"""
import os
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cimport_consumer import build_consumer

from kvmmmu._core import rmap, rmap_torture
from kvmmmu._core.rmap import (
    GfnOutOfSlotError, InvalidLevelError, InvalidSptepError, KvmNoMemoryError, ParentPtes,
    PteListDescCache, PteListDescPool, RmapAuditError, RmapDataCorruptionError, RmapLockError,
    RmapSlot, audit, gfn_to_rmap, pte_list_add, pte_list_count, pte_list_remove, rmap_add,
    rmap_add_batch, rmap_count, rmap_count_batch, rmap_iter, rmap_remove, rmap_remove_batch,
)

EXT = rmap.PTE_LIST_EXT


def sptep(n):
    """The n-th distinct SPTE address: table pfn 0x1000 + n // 512, index n % 512."""
    return ((0x1000 + n // 512) << 12) | ((n % 512) << 3)


def sptep_array(start, n):
    i = np.arange(start, start + n, dtype=np.uint64)
    return ((np.uint64(0x1000) + i // np.uint64(512)) << np.uint64(12)) | ((i % np.uint64(512)) << np.uint64(3))


@pytest.fixture
def vm():
    pool = PteListDescPool()
    cache = PteListDescCache(pool)
    cache.topup()
    slot = RmapSlot(0x1ff, 0x403, pool)     # neither end 2M-aligned
    return pool, cache, slot


def state(pool, cache, slot):
    """Everything a failed call must leave untouched."""
    return slot.snapshot(), pool.stats(), cache.nobjs


def descs(slot, gfn, level=1):
    """The chain of one head from the slot snapshot: [(spte_count, tail_count, sptes)]."""
    idx = rmap.gfn_to_index(gfn, slot.base_gfn, level)
    for lv, i, word, ch in slot.snapshot():
        if lv == level and i == idx:
            return word, [(c, t, s) for _, c, t, s in ch]
    return 0, []


# --------------------------------------------------------------------------- layout and constants

def test_layout_and_constants():
    assert rmap.SIZEOF_PTE_LIST_DESC == 128
    assert rmap.SIZEOF_PTE_LIST_DESC % 64 == 0
    assert EXT == 14
    assert rmap.KVM_RMAP_MANY == 1 and rmap.KVM_RMAP_LOCKED == 2
    assert rmap.KVM_NR_PAGE_SIZES == 3 and rmap.KVM_MAX_HUGEPAGE_LEVEL == 3
    assert rmap.RMAP_RECYCLE_THRESHOLD == 1000
    assert rmap.PTE_LIST_DESC_CACHE_MIN == 1 + 5 + 8
    assert rmap.KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE == 40
    assert rmap.RMAP_LOG_SIZE == 11


def test_slot_geometry_is_the_kernels():
    pool = PteListDescPool()
    slot = RmapSlot(0x201, 0x400, pool)           # rmap.md section 6 example
    assert slot.lpages == (0x400, 3, 1)
    assert [a.shape for a in slot.rmap] == [(0x400,), (3,), (1,)]
    assert all(a.dtype == np.uint64 and not a.flags.writeable for a in slot.rmap)
    assert rmap.kvm_mmu_slot_lpages(0x201, 0x400, 2) == 3
    assert rmap.gfn_to_index(0x201, 0x201, 2) == 0      # the partial first frame
    assert rmap.gfn_to_index(0x400, 0x201, 2) == 1
    assert rmap.gfn_to_index(0x600, 0x201, 2) == 2
    assert slot.index_to_gfn(1, 2) == 0x400
    assert slot.nbytes == 8 * (0x400 + 3 + 1)
    big = RmapSlot(0, 1 << 20, pool)                 # 4 GiB
    assert big.lpages == (1 << 20, 1 << 11, 4)
    with pytest.raises(ValueError):
        RmapSlot(0, 0, pool)
    with pytest.raises(ValueError):
        RmapSlot(rmap.MAX_GFN - 1, 2, pool)


def test_gfn_to_rmap_names_the_right_word(vm):
    pool, cache, slot = vm
    head = gfn_to_rmap(0x400, 2, slot)
    assert head == slot.gfn_to_rmap(0x5ff, 2)            # same 2M frame
    assert head != gfn_to_rmap(0x3ff, 2, slot)
    pte_list_add(cache, sptep(1), head)
    assert slot.rmap[1][2] == sptep(1)                   # frame 0x400 >> 9 = 2 (base 0x1ff is in frame 0)
    assert rmap_count(slot, 0x401, 2) == 1
    assert rmap_count(slot, 0x401, 1) == 0


# --------------------------------------------------------------------------- list shapes

def test_add_builds_the_kernels_chain(vm):
    pool, cache, slot = vm
    gfn = 0x300
    expect = []
    for n in range(3 * EXT + 2):
        assert rmap_add(cache, slot, gfn, sptep(n)) == n     # count before the add
        expect.append(sptep(n))
    word, ch = descs(slot, gfn)
    assert word & rmap.KVM_RMAP_MANY
    # Newest descriptor first; every tail full; tail_count = 14 * descriptors after.
    assert [(c, t) for c, t, _ in ch] == [(2, 42), (14, 28), (14, 14), (14, 0)]
    assert ch[0][2][:2] == (sptep(42), sptep(43)) and set(ch[0][2][2:]) == {0}
    assert ch[-1][2] == tuple(sptep(i) for i in range(14))
    # Walk order: head slots, then each tail in chain order.
    walk = list(rmap_iter(gfn_to_rmap(gfn, 1, slot)))
    assert walk == expect[42:] + expect[28:42] + expect[14:28] + expect[0:14]
    assert rmap_count(slot, gfn) == len(expect) == pool.max_mmu_rmap_size + 1
    audit(slot)


def test_single_entry_forms(vm):
    pool, cache, slot = vm
    head = gfn_to_rmap(0x300, 1, slot)
    assert pte_list_add(cache, sptep(7), head) == 0
    assert head.val == sptep(7) and head.is_single and pool.nr_active == cache.nobjs
    before = cache.nobjs
    assert pte_list_add(cache, sptep(8), head) == 1          # second entry: a descriptor
    assert cache.nobjs == before - 1 and head.val & 1 and not head.is_single
    pte_list_remove(sptep(8), head)
    # One entry left in a descriptor: removal never converts back to the inline form.
    assert head.val & 1 and pte_list_count(head) == 1 and list(head) == [sptep(7)]
    pte_list_remove(sptep(7), head)
    assert head.val == 0 and pte_list_count(head) == 0
    audit(slot)


def test_remove_fills_the_hole_from_the_head_and_frees_an_empty_head(vm):
    pool, cache, slot = vm
    gfn = 0x250
    for n in range(EXT + 1):                                 # one full tail + head with 1
        rmap_add(cache, slot, gfn, sptep(n))
    _, ch = descs(slot, gfn)
    assert [(c, t) for c, t, _ in ch] == [(1, 14), (14, 0)]
    active = pool.nr_active
    rmap_remove(slot, gfn, sptep(3))                         # hole in the tail
    word, ch = descs(slot, gfn)
    # The head's only entry (sptep(14)) moved into slot 3; the empty head was freed
    # and the full tail became the head, its tail_count still right.
    assert [(c, t) for c, t, _ in ch] == [(14, 0)]
    assert ch[0][2][3] == sptep(14)
    assert pool.nr_active == active - 1
    rmap_remove(slot, gfn, sptep(0))                         # hole in the (now) head
    _, ch = descs(slot, gfn)
    assert ch[0][2][0] == sptep(13) and ch[0][2][13] == 0 and ch[0][0] == 13
    audit(slot)


def test_remove_absent_is_data_corruption_and_changes_nothing(vm):
    pool, cache, slot = vm
    for n in range(20):
        rmap_add(cache, slot, 0x300, sptep(n))
    rmap_add(cache, slot, 0x301, sptep(100))
    before = state(pool, cache, slot)
    for gfn, s in [(0x300, sptep(99)), (0x301, sptep(101)), (0x302, sptep(1))]:
        with pytest.raises(RmapDataCorruptionError):
            rmap_remove(slot, gfn, s)
    after = state(pool, cache, slot)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1]["nr_bugs"] == 3 and pool.vm_bugged


# --------------------------------------------------------------------------- memory caches and the pool

def test_topup_semantics_and_no_allocation_inside_the_fault():
    pool = PteListDescPool(capacity=100, descs_per_chunk=16)
    cache = PteListDescCache(pool, capacity=40)
    slot = RmapSlot(0, 64, pool)
    cache.topup(14)
    assert cache.nobjs == 40 and pool.nr_active == 40 and pool.nr_chunks == 3
    cache.topup(14)                                          # enough cached: no-op
    assert pool.nr_active == 40
    cache.free()
    assert cache.nobjs == 0 and pool.nr_active == 0 and pool.nr_free == 40
    # Inside a fault only the cache is used: an empty cache fails, nothing changes.
    rmap_add(cache, slot, 1, sptep(1))                       # inline: needs no descriptor
    before = state(pool, cache, slot)
    with pytest.raises(KvmNoMemoryError):
        rmap_add(cache, slot, 1, sptep(2))
    assert state(pool, cache, slot) == before


def test_pool_capacity_and_fault_injection():
    pool = PteListDescPool(capacity=50)
    cache = PteListDescCache(pool)
    cache.topup()
    other = PteListDescCache(pool)
    with pytest.raises(KvmNoMemoryError):
        other.topup(14)                                      # only 10 left
    assert other.nobjs == 10 and pool.nr_active == 50        # kept what it got
    other.free()
    pool.fail_after(3)
    with pytest.raises(KvmNoMemoryError):
        other.topup(5)
    assert other.nobjs == 3 and pool.nr_alloc_failures >= 2
    pool.fail_after(None)
    other.topup(5)
    assert other.nobjs == 10
    pool.capacity = None
    other.topup(40)
    assert other.nobjs == 40 and pool.capacity is None
    with pytest.raises(ValueError):
        other.topup(41)
    with pytest.raises(ValueError):
        pool.fail_after(-1)


def test_cache_of_another_pool_is_rejected(vm):
    pool, cache, slot = vm
    foreign = PteListDescCache(PteListDescPool())
    with pytest.raises(ValueError):
        rmap_add(foreign, slot, 0x300, sptep(1))
    with pytest.raises(ValueError):
        rmap_add_batch(foreign, slot, np.array([0x300], np.uint64), np.array([sptep(1)], np.uint64))


def test_descriptors_return_to_the_pool_when_owners_die():
    pool = PteListDescPool()
    cache = PteListDescCache(pool)
    cache.topup()
    slot = RmapSlot(0, 16, pool)
    parents = ParentPtes(pool)
    for n in range(100):
        rmap_add(cache, slot, n % 3, sptep(n))
        parents.add(cache, sptep(1000 + n))
    assert pool.nr_active > 20
    del slot, parents, cache
    assert pool.nr_active == 0


def test_descriptors_never_move_and_are_zeroed():
    pool = PteListDescPool(descs_per_chunk=4)
    cache = PteListDescCache(pool)
    cache.topup()
    slot = RmapSlot(0, 4, pool)
    for n in range(EXT + 1):
        rmap_add(cache, slot, 0, sptep(n))
    word_before = int(slot.rmap[0][0])
    tail_before = descs(slot, 0)[1][1]
    for _ in range(20):                                      # many more chunks
        PteListDescCache(pool).topup(40)
    assert int(slot.rmap[0][0]) == word_before and descs(slot, 0)[1][1] == tail_before
    # A recycled descriptor comes back zero-filled.
    for n in range(EXT + 1):
        rmap_remove(slot, 0, sptep(n))
    for n in range(2):
        rmap_add(cache, slot, 0, sptep(n))
    _, ch = descs(slot, 0)
    assert ch[0][2][2:] == (0,) * 12 and ch[0][1] == 0
    audit(slot)


# --------------------------------------------------------------------------- stats, recycling, zap

def test_max_rmap_size_is_the_pre_add_high_water_mark(vm):
    pool, cache, slot = vm
    for n in range(30):
        rmap_add(cache, slot, 0x300, sptep(n))
    assert pool.max_mmu_rmap_size == 29
    for n in range(30):
        rmap_remove(slot, 0x300, sptep(n))
    rmap_add(cache, slot, 0x301, sptep(0))
    assert pool.max_mmu_rmap_size == 29                      # never reset


def test_recycling_above_the_threshold():
    pool = PteListDescPool()
    cache = PteListDescCache(pool)
    slot = RmapSlot(0, 8, pool)
    zapped = []
    for n in range(1001):
        cache.topup()
        assert rmap_add(cache, slot, 3, sptep(n), zap=zapped.append) == n
    assert rmap_count(slot, 3) == 1001 and not zapped
    cache.topup()
    # The add that finds 1001 entries inserts the 1002nd, then zaps the whole list.
    assert rmap_add(cache, slot, 3, sptep(5000), zap=zapped.append) == 1001
    assert rmap_count(slot, 3) == 0 and sorted(zapped) == sorted([sptep(n) for n in range(1001)] + [sptep(5000)])
    assert pool.max_mmu_rmap_size == 1001
    assert pool.nr_active == cache.nobjs
    # The batch form does the same and reports the zapped entries afterwards.
    zapped.clear()
    gfns = np.full(1003, 5, np.uint64)
    counts = rmap_add_batch(cache, slot, gfns, sptep_array(10000, 1003), zap=zapped.append)
    assert counts[1001] == 1001 and counts[1002] == 0 and len(zapped) == 1002
    assert rmap_count(slot, 5) == 1
    audit(slot)


def test_zap_all_with_a_per_entry_callback(vm):
    pool, cache, slot = vm
    head = gfn_to_rmap(0x300, 1, slot)
    assert rmap.kvm_zap_all_rmap_sptes(head) is False
    for n in range(33):
        pte_list_add(cache, sptep(n), head)
    seen = []

    def zap(s):
        assert head.is_locked                    # called with the rmap lock held
        seen.append(s)
    assert rmap.kvm_zap_all_rmap_sptes(head, zap) is True
    assert seen == [sptep(n) for n in list(range(28, 33)) + list(range(14, 28)) + list(range(14))]
    assert head.val == 0 and pool.nr_active == cache.nobjs
    # A failing callback: every entry still visited, list still emptied, error re-raised.
    for n in range(20):
        pte_list_add(cache, sptep(n), head)
    calls = []

    def bad(s):
        calls.append(s)
        raise KeyError(s)
    with pytest.raises(KeyError):
        rmap.kvm_zap_all_rmap_sptes(head, bad)
    assert len(calls) == 20 and head.val == 0 and not head.is_locked
    # A callback that touches the locked rmap raises instead of deadlocking.
    pte_list_add(cache, sptep(1), head)
    with pytest.raises(RmapLockError):
        rmap.kvm_zap_all_rmap_sptes(head, lambda s: pte_list_add(cache, sptep(2), head))
    assert head.val == 0 and not head.is_locked
    audit(slot)


def test_iterator_detects_modification(vm):
    pool, cache, slot = vm
    head = gfn_to_rmap(0x300, 1, slot)
    for n in range(20):
        pte_list_add(cache, sptep(n), head)
    it = rmap_iter(head)
    next(it)
    pte_list_remove(sptep(0), head)
    with pytest.raises(RuntimeError):
        next(it)
    assert head.first() == list(head)[0]
    assert sptep(5) in head and sptep(0) not in head


def test_mmu_rmaps_stat_uses_ffs(vm):
    pool, cache, slot = vm
    counts = {0x300: 1, 0x301: 3, 0x302: 6, 0x303: 8, 0x304: 600}
    n = 0
    for gfn, c in counts.items():
        for _ in range(c):
            cache.topup()
            rmap_add(cache, slot, gfn, sptep(n))
            n += 1
    hist = rmap.mmu_rmaps_stat(slot)
    assert hist.shape == (3, 11)
    # ffs: 1 -> 1, 3 -> 1, 6 -> 2, 8 -> 4, 600 (0b1001011000) -> 4; empty heads -> 0
    assert hist[0].tolist() == [0x403 - 5, 2, 1, 0, 2, 0, 0, 0, 0, 0, 0]
    assert hist[1, 0] == slot.lpages[1] and hist[2, 0] == 1
    text = rmap.format_mmu_rmaps_stat(hist)
    assert text.startswith("Rmap_Count:\t0\t1\t2-3\t4-7\t") and text.endswith("\t\n")
    assert "Level=4K:\t" in text and "512-1023\t\n" in text


# --------------------------------------------------------------------------- parent_ptes

def test_parent_ptes_single_entry_vs_list():
    pool = PteListDescPool()
    cache = PteListDescCache(pool)
    cache.topup()
    sp = ParentPtes(pool)
    assert sp.add(cache, None) == 0 and sp.add(cache, 0) == 0 and sp.val == 0   # a root
    sp.add(cache, sptep(1))
    assert sp.is_single and sp.val == sptep(1) and pool.nr_active == cache.nobjs
    sp.add(cache, sptep(2))
    assert not sp.is_single and len(sp) == 2
    sp.remove(sptep(1))
    assert list(sp) == [sptep(2)]
    with pytest.raises(RmapDataCorruptionError):
        sp.remove(sptep(1))
    # kvm_mmu_unlink_parents: repeatedly take the first parent and drop it.
    for n in range(3, 40):
        sp.add(cache, sptep(n))
    dropped = []
    while (p := sp.first()) is not None:
        sp.remove(p)
        dropped.append(p)
    assert sorted(dropped) == sorted([sptep(2)] + [sptep(n) for n in range(3, 40)])
    assert sp.val == 0
    audit(sp)


# --------------------------------------------------------------------------- batch == scalar

def logical(slot):
    """Snapshot without addresses: comparable across pools."""
    return tuple((lv, i, bool(w & 1), tuple((c, t, s) for _, c, t, s in ch))
                 for lv, i, w, ch in slot.snapshot())


def test_batch_matches_scalar():
    rng = np.random.default_rng(7)
    n = 3000
    gfns = rng.integers(0x1ff, 0x1ff + 0x403, n).astype(np.uint64)
    gfns[:500] = 0x300                                       # one long chain too
    sptes = sptep_array(0, n)
    pools = [PteListDescPool(), PteListDescPool()]
    caches = [PteListDescCache(p) for p in pools]
    slots = [RmapSlot(0x1ff, 0x403, p) for p in pools]
    for level in (1, 2, 3):
        counts = rmap_add_batch(caches[0], slots[0], gfns, sptes + np.uint64(level << 40), level=level)
        scalar = []
        for g, s in zip(gfns.tolist(), (sptes + np.uint64(level << 40)).tolist()):
            caches[1].topup(1)
            scalar.append(rmap_add(caches[1], slots[1], g, s, level=level))
        assert counts.tolist() == scalar
        assert logical(slots[0]) == logical(slots[1])
        assert rmap_count_batch(slots[0], gfns, level).tolist() == [
            rmap_count(slots[1], g, level) for g in gfns.tolist()]
    # Levels 2 and 3 have 4 and 1 heads: lists passed RMAP_RECYCLE_THRESHOLD and
    # were recycled (identically, as checked above); remove what is left.
    present = {int(x) for lv, _, w, ch in slots[0].snapshot()
               for x in ([w] if not w & 1 else [e for _, c, _, es in ch for e in es[:c]])}
    order = rng.permutation(n)
    for level in (1, 2, 3):
        keep = np.array([int(s) + (level << 40) in present for s in sptes[order]])
        g_l, s_l = gfns[order][keep], sptes[order][keep] + np.uint64(level << 40)
        rmap_remove_batch(slots[0], g_l, s_l, level=level)
        for g, s in zip(g_l.tolist(), s_l.tolist()):
            rmap_remove(slots[1], g, s, level=level)
        assert logical(slots[0]) == logical(slots[1])
        audit(slots[0])
    assert slots[0].snapshot() == () and pools[0].nr_active == caches[0].nobjs
    assert pools[0].max_mmu_rmap_size == pools[1].max_mmu_rmap_size


def test_batch_out_of_memory_reports_progress():
    pool = PteListDescPool(capacity=5)
    cache = PteListDescCache(pool, capacity=5)
    slot = RmapSlot(0, 16, pool)
    gfns = np.zeros(200, np.uint64)
    with pytest.raises(KvmNoMemoryError) as e:
        rmap_add_batch(cache, slot, gfns, sptep_array(0, 200))
    # 5 descriptors of 14 entries: the 71st add needs a sixth.
    assert e.value.done == 70
    assert rmap_count(slot, 0) == 70 and pool.nr_active == 5 and cache.nobjs == 0
    audit(slot)


def test_batch_remove_stops_at_an_absent_entry(vm):
    pool, cache, slot = vm
    gfns = np.array([0x300, 0x300, 0x301, 0x302], np.uint64)
    sptes = sptep_array(0, 4)
    rmap_add_batch(cache, slot, gfns, sptes)
    bad_sptes = sptes.copy()
    bad_sptes[2] = sptep(77)
    with pytest.raises(RmapDataCorruptionError) as e:
        rmap_remove_batch(slot, gfns, bad_sptes)
    assert e.value.index == 2
    assert rmap_count(slot, 0x300) == 0 and rmap_count(slot, 0x301) == 1 and rmap_count(slot, 0x302) == 1
    audit(slot)


# --------------------------------------------------------------------------- bad input

G = GfnOutOfSlotError
L = InvalidLevelError
S = InvalidSptepError
BAD_CALLS = {
    "gfn below slot": (G, lambda c, s: rmap_add(c, s, 0x1fe, sptep(1))),
    "gfn above slot": (G, lambda c, s: rmap_add(c, s, 0x1ff + 0x403, sptep(1))),
    "remove gfn outside": (G, lambda c, s: rmap_remove(s, 0x1000, sptep(1))),
    "count gfn outside": (G, lambda c, s: rmap_count(s, 0, 1)),
    "gfn_to_rmap outside": (G, lambda c, s: gfn_to_rmap(0x1000, 1, s)),
    "negative gfn": (OverflowError, lambda c, s: rmap_add(c, s, -1, sptep(1))),
    "level 0": (L, lambda c, s: rmap_add(c, s, 0x300, sptep(1), level=0)),
    "level 4": (L, lambda c, s: rmap_add(c, s, 0x300, sptep(1), level=4)),
    "remove level 4": (L, lambda c, s: rmap_remove(s, 0x300, sptep(1), level=4)),
    "gfn_to_rmap level 0": (L, lambda c, s: gfn_to_rmap(0x300, 0, s)),
    "sptep 0": (S, lambda c, s: rmap_add(c, s, 0x300, 0)),
    "sptep unaligned": (S, lambda c, s: rmap_add(c, s, 0x300, 0x1004)),
    "batch gfn outside (last)": (G, lambda c, s: rmap_add_batch(
        c, s, np.array([0x300, 0x301, 0x2000], np.uint64), sptep_array(50, 3))),
    "batch gfn just below slot": (G, lambda c, s: rmap_add_batch(
        c, s, np.array([0x300, 0x1fe], np.uint64), sptep_array(50, 2))),
    "batch gfn one past the end": (G, lambda c, s: rmap_add_batch(
        c, s, np.array([0x1ff + 0x403, 0x300], np.uint64), sptep_array(50, 2))),
    "batch gfn 2**63": (G, lambda c, s: rmap_add_batch(
        c, s, np.array([0x300, 1 << 63], np.uint64), sptep_array(50, 2))),
    "batch gfn 2**64-1": (G, lambda c, s: rmap_add_batch(
        c, s, np.array([0x300, (1 << 64) - 1], np.uint64), sptep_array(50, 2))),
    "batch remove gfn outside": (G, lambda c, s: rmap_remove_batch(
        s, np.array([0x300, 0x10], np.uint64), sptep_array(0, 2))),
    "batch count gfn outside": (G, lambda c, s: rmap_count_batch(s, np.array([0x300, 0x10], np.uint64))),
    "batch sptep unaligned": (S, lambda c, s: rmap_add_batch(
        c, s, np.array([0x300, 0x301], np.uint64), np.array([sptep(60), 0x1001], np.uint64))),
    "batch sptep 0": (S, lambda c, s: rmap_add_batch(
        c, s, np.array([0x300], np.uint64), np.array([0], np.uint64))),
    "batch level 4": (L, lambda c, s: rmap_add_batch(
        c, s, np.array([0x300], np.uint64), sptep_array(60, 1), level=4)),
    "batch level 0 remove": (L, lambda c, s: rmap_remove_batch(
        s, np.array([0x300], np.uint64), sptep_array(0, 1), level=0)),
    "batch int64 gfns": (TypeError, lambda c, s: rmap_add_batch(
        c, s, np.array([0x300], np.int64), sptep_array(60, 1))),
    "batch int64 sptes": (TypeError, lambda c, s: rmap_remove_batch(
        s, np.array([0x300], np.uint64), np.array([sptep(0)], np.int64))),
    "batch uint32 gfns": (TypeError, lambda c, s: rmap_add_batch(
        c, s, np.array([0x300], np.uint32), sptep_array(60, 1))),
    "batch float gfns": (TypeError, lambda c, s: rmap_count_batch(s, np.array([0x300], np.float64))),
    "batch list": (TypeError, lambda c, s: rmap_add_batch(c, s, [0x300], [sptep(60)])),
    "batch 2-d": (ValueError, lambda c, s: rmap_add_batch(
        c, s, np.full((1, 1), 0x300, np.uint64), sptep_array(60, 1).reshape(1, 1))),
    "batch strided": (ValueError, lambda c, s: rmap_add_batch(
        c, s, np.full(4, 0x300, np.uint64)[::2], sptep_array(60, 4)[::2])),
    "batch length mismatch": (ValueError, lambda c, s: rmap_add_batch(
        c, s, np.full(2, 0x300, np.uint64), sptep_array(60, 3))),
    "batch out dtype": (TypeError, lambda c, s: rmap_add_batch(
        c, s, np.full(1, 0x300, np.uint64), sptep_array(60, 1), out=np.zeros(1, np.int64))),
    "batch out shape": (ValueError, lambda c, s: rmap_count_batch(
        s, np.full(2, 0x300, np.uint64), out=np.zeros(3, np.uint32))),
}


def test_batch_accepts_the_slot_edges(vm):
    pool, cache, slot = vm
    edges = np.array([0x1ff, 0x1ff + 0x403 - 1], np.uint64)
    rmap_add_batch(cache, slot, edges, sptep_array(70, 2))
    assert rmap_count_batch(slot, edges).tolist() == [1, 1]
    audit(slot)


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_raises_and_changes_nothing(vm, name):
    pool, cache, slot = vm
    rng = np.random.default_rng(1)
    gfns = rng.integers(0x1ff, 0x1ff + 0x403, 400).astype(np.uint64)
    gfns[:40] = 0x300
    for level in (1, 2, 3):
        rmap_add_batch(cache, slot, gfns, sptep_array(1000 * level, 400), level=level)
    cache.topup()
    before = state(pool, cache, slot)
    expected, call = BAD_CALLS[name]
    with pytest.raises(expected):
        call(cache, slot)
    assert state(pool, cache, slot) == before
    audit(slot)


def test_audit_catches_broken_invariants(vm):
    pool, cache, slot = vm
    for n in range(20):
        rmap_add(cache, slot, 0x300, sptep(n))
    head = gfn_to_rmap(0x300, 1, slot)
    good = head.val
    other = gfn_to_rmap(0x301, 1, slot)
    cases = [
        (head, good | 2, "lock bit set"),
        (head, 0x1000 | 1, "not a descriptor of this pool"),
        (head, 0x1004, "not a valid sptep"),
        (other, good, "reachable twice"),                    # one chain under two heads
        (other, sptep(3), "appears twice"),                  # an SPTE in two rmaps
    ]
    try:
        for h, bad, what in cases:
            rmap_torture.debug_store_head(h, bad)
            with pytest.raises(RmapAuditError, match=what):
                audit(slot)
            if what == "appears twice":
                audit(slot, unique=False)
            rmap_torture.debug_store_head(h, good if h is head else 0)
    finally:                                # never leave a corrupt slot to the GC
        rmap_torture.debug_store_head(head, good)
        rmap_torture.debug_store_head(other, 0)
    audit(slot)
    # Corrupt descriptor contents, one rule at a time.
    word, ch = descs(slot, 0x300)
    assert [(c, t) for c, t, _ in ch] == [(6, 14), (14, 0)]
    pokes = [
        (1, "spte_count", 13, 0, "tail descriptor not full"),
        (0, "spte_count", 0, 0, "head spte_count=0"),
        (0, "spte_count", 15, 0, "outside 1..14"),
        (0, "tail_count", 13, 0, "tail_count=13, expected 14"),
        (1, "tail_count", 14, 0, "tail_count=14, expected 0"),
        (0, "sptes", 0, 2, "is not a valid sptep"),                  # hole in the dense prefix
        (0, "sptes", sptep(7), 9, "beyond spte_count"),              # garbage past the count
        (1, "sptes", sptep(19), 3, "appears twice"),                 # duplicate in one list
    ]
    for k, field, value, index, what in pokes:
        old = rmap_torture.debug_poke_desc(head, k, field, value, index)
        try:
            with pytest.raises(RmapAuditError, match=what):
                audit(slot)
        finally:
            rmap_torture.debug_poke_desc(head, k, field, old, index)
    audit(slot)


# --------------------------------------------------------------------------- rmap lock

def test_lock_protocol_single_thread(vm):
    pool, cache, slot = vm
    head = gfn_to_rmap(0x300, 1, slot)
    # An empty head is never locked.
    with rmap.kvm_rmap_lock_readonly(head) as lk:
        assert lk.val == 0 and not lk.locked and not head.is_locked
    for n in range(20):
        pte_list_add(cache, sptep(n), head)
    word = head.val
    with rmap.kvm_rmap_lock_readonly(head) as lk:
        assert lk.locked and head.is_locked and head.val == word | rmap.KVM_RMAP_LOCKED
        assert rmap.kvm_rmap_get(head) == word and lk.count == 20
        assert sorted(lk.sptes().tolist()) == sorted(sptep(n) for n in range(20))
        with pytest.raises(RmapLockError, match="read-only"):
            lk.add(cache, sptep(99))
        with pytest.raises(RmapLockError, match="read-only"):
            lk.remove(sptep(1))
        # Python calls on a head this thread holds raise instead of spinning forever.
        with pytest.raises(RmapLockError):
            pte_list_add(cache, sptep(99), head)
        with pytest.raises(RmapLockError):
            rmap_remove(slot, 0x300, sptep(1))
        with pytest.raises(RmapLockError):
            rmap_add_batch(cache, slot, np.array([0x301], np.uint64), sptep_array(99, 1))
        assert head.val == word | rmap.KVM_RMAP_LOCKED
    assert head.val == word
    # A chain changed under a read-only lock is caught at unlock (the kernel WARNs).
    lk = rmap.kvm_rmap_lock_readonly(head)
    rmap_torture.debug_store_head(head, sptep(5) | rmap.KVM_RMAP_LOCKED)
    with pytest.raises(RmapLockError, match="changed"):
        lk.unlock()
    assert head.val == word                                  # old value written back
    with pytest.raises(RmapLockError):
        lk.unlock()
    # Writers change the chain in place and publish with the unlock.
    with rmap.kvm_rmap_lock(head) as lk:
        assert lk.add(cache, sptep(50)) == 20
        lk.remove(sptep(0))
        assert head.val & rmap.KVM_RMAP_LOCKED
    assert not head.is_locked and pte_list_count(head) == 20
    assert sptep(50) in head and sptep(0) not in head
    audit(slot)


def test_python_threads_wait_for_a_held_lock(vm):
    """A Python thread holding a writer lock makes another thread's call wait
    (spinning without the GIL), not fail and not deadlock."""
    import time
    pool, cache, slot = vm
    head = gfn_to_rmap(0x300, 1, slot)
    for n in range(3):
        pte_list_add(cache, sptep(n), head)
    other_cache = PteListDescCache(pool)
    other_cache.topup()
    locked, order = threading.Event(), []

    def holder():
        with rmap.kvm_rmap_lock(head) as lk:
            lk.add(cache, sptep(10))
            locked.set()
            time.sleep(0.05)
            order.append("holder done")

    def waiter():
        locked.wait()
        n = pte_list_add(other_cache, sptep(11), head)      # blocks until the unlock
        order.append(("waiter", n))
    run_threads((holder, ()), (waiter, ()))
    assert order == ["holder done", ("waiter", 4)]
    assert pte_list_count(head) == 5 and not rmap._held_locks
    audit(slot)


def run_threads(*targets):
    results = [None] * len(targets)

    def wrap(i, fn, args):
        results[i] = fn(*args)
    threads = [threading.Thread(target=wrap, args=(i, fn, args)) for i, (fn, args) in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a lock-test thread hung"
    return results


def test_readonly_walker_never_sees_a_half_updated_chain():
    """A writer holds the lock across a multi-step update (k removals, a pause,
    k re-adds) while a reader walks under kvm_rmap_lock_readonly on another
    thread (both without the GIL).  Every walk must see the published state."""
    pool = PteListDescPool()
    bench = rmap_torture.LockStress(pool, n_entries=40)
    cache = PteListDescCache(pool)
    reader, windows = run_threads((bench.run_reader, (True,)),
                                  (bench.run_writer, (cache, 1000, 5, 200_000)))
    assert reader["bad_walks"] == 0, reader
    assert reader["unlock_errors"] == 0
    # The handshake: in `windows` updates the reader was spinning on the lock
    # while the chain was half-updated (then walked right after the unlock).
    assert windows >= 900, (windows, reader)
    assert reader["contended"] > 0, f"the reader never met the held lock: {reader}"
    assert pte_list_count(bench.head) == 40
    audit(bench.head)


def test_unlocked_walker_does_see_half_updated_chains():
    """Control for the test above: the same walker without the lock reads the
    chain while the writer is mid-update, and must notice."""
    pool = PteListDescPool()
    bench = rmap_torture.LockStress(pool, n_entries=40)
    cache = PteListDescCache(pool)
    reader, windows = run_threads((bench.run_reader, (False,)),
                                  (bench.run_writer, (cache, 100, 5, 200_000, True)))
    assert windows > 0, "the reader never walked during an update window"
    assert reader["bad_walks"] >= windows, (reader, windows)
    audit(bench.head)


def test_concurrent_writers_are_serialized_by_the_bit_lock():
    pool = PteListDescPool()
    seed_cache = PteListDescCache(pool)
    seed_cache.topup()
    head = ParentPtes(pool)
    head.add(seed_cache, sptep(0))           # non-empty: empty heads are not locked
    head.add(seed_cache, sptep(1))           # (the kernel relies on mmu_lock there)
    caches = [PteListDescCache(pool) for _ in range(2)]
    fails = run_threads((rmap_torture.concurrent_writer, (caches[0], head, 0x10_0000_0000, 100, 300)),
                        (rmap_torture.concurrent_writer, (caches[1], head, 0x20_0000_0000, 100, 300)))
    assert fails == [0, 0]
    assert sorted(head) == [sptep(0), sptep(1)]
    summary = audit(head)
    assert pool.nr_active == summary["descriptors"] + sum(c.nobjs for c in caches) + seed_cache.nobjs


# --------------------------------------------------------------------------- model-based (hypothesis)

BASE, NPAGES = 0x1ff, 0x403
GFNS = st.one_of(st.sampled_from([BASE, BASE + 1, 0x200, 0x3ff, 0x400, 0x401, BASE + NPAGES - 1]),
                 st.integers(BASE, BASE + NPAGES - 1))
LEVELS = st.integers(1, 3)


class RmapMachine(RuleBasedStateMachine):
    """rmap operations vs a dict-of-sets model; audit() after every step."""

    def __init__(self):
        super().__init__()
        self.pool = PteListDescPool(descs_per_chunk=8)
        self.cache = PteListDescCache(self.pool)
        self.slot = RmapSlot(BASE, NPAGES, self.pool)
        self.parents = [ParentPtes(self.pool), ParentPtes(self.pool)]
        self.model = {}                  # (level, index) -> set of sptep
        self.pmodel = [set(), set()]
        self.next = 1

    def key(self, gfn, level):
        return level, rmap.gfn_to_index(gfn, BASE, level)

    def fresh(self):
        self.next += 1
        return sptep(self.next)

    def entries(self):
        return sorted((k, s) for k, v in self.model.items() for s in v)

    @rule(gfn=GFNS, level=LEVELS, k=st.integers(1, 32))
    def add(self, gfn, level, k):
        for _ in range(k):
            self.cache.topup()
            s = self.fresh()
            bucket = self.model.setdefault(self.key(gfn, level), set())
            assert rmap_add(self.cache, self.slot, gfn, s, level=level) == len(bucket)
            bucket.add(s)

    @rule(gfn=GFNS, level=LEVELS, k=st.integers(1, 40), data=st.data())
    def add_batch(self, gfn, level, k, data):
        gfns = np.array([data.draw(st.sampled_from([gfn, gfn + 1 if gfn + 1 < BASE + NPAGES else gfn]))
                         for _ in range(k)], np.uint64)
        sptes = np.array([self.fresh() for _ in range(k)], np.uint64)
        expect = []
        for g, s in zip(gfns.tolist(), sptes.tolist()):
            bucket = self.model.setdefault(self.key(g, level), set())
            expect.append(len(bucket))
            bucket.add(s)
        assert rmap_add_batch(self.cache, self.slot, gfns, sptes, level=level).tolist() == expect

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data(), k=st.integers(1, 20))
    def remove(self, data, k):
        for _ in range(k):
            pairs = self.entries()
            if not pairs:
                break
            (level, index), s = data.draw(st.sampled_from(pairs))
            gfn = self.slot.index_to_gfn(index, level)
            rmap_remove(self.slot, max(gfn, BASE), s, level=level)
            self.model[(level, index)].discard(s)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def remove_batch(self, data):
        pairs = data.draw(st.lists(st.sampled_from(self.entries()), min_size=1, max_size=30, unique=True))
        by_level = {}
        for (level, index), s in pairs:
            by_level.setdefault(level, []).append((max(self.slot.index_to_gfn(index, level), BASE), s))
        for level, items in by_level.items():
            rmap_remove_batch(self.slot, np.array([g for g, _ in items], np.uint64),
                              np.array([s for _, s in items], np.uint64), level=level)
            for g, s in items:
                self.model[self.key(g, level)].discard(s)

    @rule(gfn=GFNS, level=LEVELS)
    def remove_absent(self, gfn, level):
        before = self.slot.snapshot()
        with pytest.raises(RmapDataCorruptionError):
            rmap_remove(self.slot, gfn, self.fresh(), level=level)
        assert self.slot.snapshot() == before

    @rule(gfn=GFNS, level=LEVELS)
    def zap_all(self, gfn, level):
        seen = []
        had = rmap.kvm_zap_all_rmap_sptes(gfn_to_rmap(gfn, level, self.slot), seen.append)
        bucket = self.model.get(self.key(gfn, level), set())
        assert had == bool(bucket) and sorted(seen) == sorted(bucket)
        bucket.clear()

    @rule(gfn=GFNS, level=LEVELS)
    def starved_cache(self, gfn, level):
        """An add that needs a descriptor with an empty cache and a dry pool."""
        self.cache.free()
        self.pool.fail_after(0)
        try:
            with pytest.raises(KvmNoMemoryError):
                self.cache.topup(1)
            bucket = self.model.get(self.key(gfn, level), set())
            before = self.slot.snapshot()
            word, ch = descs(self.slot, gfn, level)
            needs_desc = (word != 0 and not word & 1) or bool(ch and ch[0][0] == EXT)
            s = self.fresh()
            if needs_desc:
                with pytest.raises(KvmNoMemoryError):
                    rmap_add(self.cache, self.slot, gfn, s, level=level)
                assert self.slot.snapshot() == before
            else:
                assert rmap_add(self.cache, self.slot, gfn, s, level=level) == len(bucket)
                self.model.setdefault(self.key(gfn, level), set()).add(s)
        finally:
            self.pool.fail_after(None)

    @rule(i=st.integers(0, 1), k=st.integers(1, 20))
    def parent_add(self, i, k):
        for _ in range(k):
            self.cache.topup()
            s = self.fresh()
            assert self.parents[i].add(self.cache, s) == len(self.pmodel[i])
            self.pmodel[i].add(s)

    @precondition(lambda self: any(self.pmodel))
    @rule(data=st.data())
    def parent_remove(self, data):
        i = data.draw(st.sampled_from([j for j in (0, 1) if self.pmodel[j]]))
        s = data.draw(st.sampled_from(sorted(self.pmodel[i])))
        self.parents[i].remove(s)
        self.pmodel[i].discard(s)

    @rule(gfn=GFNS, level=LEVELS)
    def readonly_lock_refuses_changes(self, gfn, level):
        head = gfn_to_rmap(gfn, level, self.slot)
        before = self.slot.snapshot()
        with rmap.kvm_rmap_lock_readonly(head) as lk:
            assert sorted(lk.sptes().tolist()) == sorted(self.model.get(self.key(gfn, level), ()))
            with pytest.raises(RmapLockError):
                lk.add(self.cache, self.fresh())
        assert self.slot.snapshot() == before

    @invariant()
    def matches_model_and_invariants_hold(self):
        summary = audit([self.slot] + self.parents)
        nonempty = {k for k, v in self.model.items() if v}
        got = {(lv, i) for lv, i, _, _ in self.slot.snapshot()}
        assert got == nonempty
        for (level, index), bucket in self.model.items():
            head = gfn_to_rmap(max(self.slot.index_to_gfn(index, level), BASE), level, self.slot)
            assert pte_list_count(head) == len(bucket)
            assert sorted(head.to_array().tolist()) == sorted(bucket)
        for p, m in zip(self.parents, self.pmodel):
            assert len(p) == len(m) and set(p) == m
        assert summary["entries"] == sum(map(len, self.model.values())) + sum(map(len, self.pmodel))
        # No descriptor leaks: every live one is in a chain or in the vCPU cache.
        assert self.pool.nr_active == summary["descriptors"] + self.cache.nobjs


TestRmapMachine = RmapMachine.TestCase
TestRmapMachine.settings = settings(max_examples=int(os.environ.get("KVMMMU_RMAP_EXAMPLES", "100")),
                                    stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


def test_random_differential_against_model():
    """A long numpy-driven sequence (beyond what hypothesis explores): 20k
    mixed ops on a small slot, model compared and audit run every 2k ops."""
    rng = np.random.default_rng(2024)
    pool = PteListDescPool(descs_per_chunk=32)
    cache = PteListDescCache(pool)
    slot = RmapSlot(0x10, 40, pool)
    model = {}
    nxt = 0
    for step in range(20000):
        gfn = int(rng.integers(0x10, 0x10 + 40))
        level = int(rng.integers(1, 4))
        key = (level, rmap.gfn_to_index(gfn, 0x10, level))
        bucket = model.setdefault(key, [])
        if bucket and rng.random() < 0.45:
            s = bucket.pop(int(rng.integers(len(bucket))))
            rmap_remove(slot, gfn, s, level=level)
        else:
            cache.topup()
            nxt += 1
            assert rmap_add(cache, slot, gfn, sptep(nxt), level=level) == len(bucket)
            bucket.append(sptep(nxt))
        if step % 2000 == 1999:
            summary = audit(slot)
            assert summary["entries"] == sum(map(len, model.values()))
            assert pool.nr_active == summary["descriptors"] + cache.nobjs
            for (lv, idx), b in model.items():
                g = max(slot.index_to_gfn(idx, lv), 0x10)
                assert sorted(gfn_to_rmap(g, lv, slot)) == sorted(b)


# --------------------------------------------------------------------------- rmap.pxd is a contract

CONSUMER = textwrap.dedent("""
    # cython: language_level=3
    from libc.stdint cimport uint64_t
    from kvmmmu._core.memcache cimport kvm_mmu_memory_cache
    from kvmmmu._core.rmap cimport (PteListDescCache, ParentPtes, pte_list_desc_pool,
                                    kvm_rmap_head, pte_list_add, pte_list_remove, pte_list_count,
                                    rmap_iterator, rmap_get_first, rmap_get_next,
                                    kvm_rmap_lock_readonly, kvm_rmap_unlock_readonly)

    def fill(PteListDescCache cache, ParentPtes parents, uint64_t n):
        cdef pte_list_desc_pool *kvm = &cache.pool.c
        cdef kvm_mmu_memory_cache *mc = &cache.mc
        cdef kvm_rmap_head *head = parents.head
        cdef uint64_t i, s, v, total = 0
        cdef rmap_iterator it
        with nogil:
            for i in range(1, n + 1):
                pte_list_add(kvm, mc, i * 8, head)
            pte_list_remove(kvm, 8, head)
            v = kvm_rmap_lock_readonly(head)
            s = rmap_get_first(head, &it)
            while s != 0:
                total += s
                s = rmap_get_next(&it)
            kvm_rmap_unlock_readonly(head, v)
        return pte_list_count(head), total
""")


def test_rmap_pxd_can_be_cimported(tmp_path):
    try:
        rmap_consumer = build_consumer(tmp_path, "rmap_consumer", CONSUMER)
        pool = PteListDescPool()
        cache = PteListDescCache(pool)
        cache.topup()
        parents = ParentPtes(pool)
        count, total = rmap_consumer.fill(cache, parents, 30)
        assert count == 29 and total == sum(8 * i for i in range(2, 31))
        assert sorted(parents) == [8 * i for i in range(2, 31)]
        audit(parents)
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
