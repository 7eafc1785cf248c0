"""Yielding in the TDP MMU's long loops (tdp_mmu_iter_cond_resched).

Each loop (leaf zap, root zap, write-protect / clear-dirty ranges, eager
split, huge page recovery) runs on two identical guests, one with
``resched_every = 0`` (never yield) and one with a step budget of 1, 7 or
512: every leaf, the page statistics, ``tdp_mmu_pages`` and the result must
be equal, and equal to the dict model of test_tdp_mmu_core where it has the
operation.  For the leaf zap a Python replica of the loop over the same
C iterator (``TdpIter.cond_resched``) predicts the yields and which of them
owe a TLB flush, so "flush before a yield with pending zaps" is checked
exactly.  Aging and ``clear_dirty_log`` never yield (as in the kernel).
A run with a budget of 1 on every loop goes in a child with a timeout: a
yield that made no forward progress would spin forever.
"""
import os

import numpy as np
import pytest
from _probe import assert_no_crash
from test_tdp_mmu_core import HOST, Model, Setup, _check

from kvmmmu._core.spte import PT_WRITABLE_MASK
from kvmmmu._core.tdp_iter import TdpIter, kvm_tdp_mmu_get_walk

SPAN = 1 << 20                      # the guest's gfns (4 GiB)
EVERY = [1, 7, 512]


def mappings():
    """(gfn, level) faults of the guest, in order: a 1G leaf, 2M leaves,
    full and sparse 4K tables, 4K pages inside a 1G region of tables."""
    rng = np.random.default_rng(11)
    out = [(1 << 18, 3)]
    out += [(f << 9, 2) for f in range(0, 96, 3)]
    out += [((1 << 9) + i, 1) for i in range(512)]
    out += [(int(g), 1) for g in np.unique(rng.integers(2 << 9, 96 << 9, 3000))
            if (g >> 9) % 3]
    out += [(int(g), 1) for g in np.unique(rng.integers(3 << 18, 4 << 18, 2000))]
    out += [(int(g) << 9, 2) for g in np.unique(rng.integers(3 << 9, 4 << 9, 100))]
    return out


def guest():
    s = Setup(4)
    m = Model()
    for g, lvl in mappings():
        s.map([g], [HOST + g], lvl, write=True)
        m.map(g, lvl, HOST + g)
    return s, m


def snapshot(s):
    sptes, levels = kvm_tdp_mmu_get_walk(s.a, s.root, np.arange(SPAN, dtype=np.uint64))
    return sptes, levels, dict(s.a.page_stats), s.t.tdp_mmu_pages, s.t.warnings()


def same(a, b):
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert a[2:] == b[2:]


def probe_of(m):
    keys = sorted(b for (_, b) in m.leaves)
    rng = np.random.default_rng(3)
    return np.array(keys[::7] + [int(x) for x in rng.integers(0, SPAN, 400)], np.uint64)


def run(op, s):
    """One loop on guest `s`: its result (after a grace period)."""
    D = s.fmt.masks()["dirty_mask"]
    if op == "zap_leafs":
        r = s.t.zap_leafs(s.root, 0x345, (3 << 18) + 0x9876)
    elif op == "zap_root":
        r = s.t.zap_root(s.root)
    elif op == "wrprot":
        r = s.t.clear_bit_range(s.root, 5, SPAN - 5, PT_WRITABLE_MASK)
    elif op == "wrprot_2m":
        r = s.t.clear_bit_range(s.root, 0, SPAN, PT_WRITABLE_MASK, min_level=2)
    elif op == "clear_dirty":
        r = s.t.clear_bit_range(s.root, 0x100, SPAN, D)
    elif op == "split":
        r = s.t.split_huge_pages(s.root, 0x1000, SPAN, 1, s.pc, s.hc)
    elif op == "split_2m":
        r = s.t.split_huge_pages(s.root, 0, SPAN, 2, s.pc, s.hc)
    elif op == "recover":
        ml = recover_levels()
        r = s.t.recover_huge_pages(s.root, 0, SPAN, ml)
    else:
        raise AssertionError(op)
    s.a.rcu_barrier()
    return r


def model_op(op, m):
    if op == "zap_leafs":
        m.zap(0x345, (3 << 18) + 0x9876)
    elif op == "zap_root":
        m.zap(0, 1 << 45)
    elif op == "split":
        m.split(0x1000, SPAN, 1)
    elif op == "split_2m":
        m.split(0, SPAN, 2)
    elif op == "recover":
        ml = recover_levels()
        return m.recover(0, SPAN, ml)


def recover_levels():
    """Max mapping level per 2M frame: 1G regions 0 and 3 stay tables (their
    first frame allows 2M), frames 5..8 allow 4K only."""
    ml = np.full(SPAN >> 9, 3, np.int8)
    ml[0] = ml[3 << 9] = 2
    ml[5:9] = 1
    return ml


OPS = ["zap_leafs", "zap_root", "wrprot", "wrprot_2m", "clear_dirty", "split", "split_2m",
       "recover"]


@pytest.fixture(scope="module")
def reference():
    """op -> (result, snapshot) with no yields."""
    out = {}
    for op in OPS:
        s, m = guest()
        assert s.t.resched_every == 0
        r = run(op, s)
        assert s.t.nr_yields == 0 and s.t.nr_yield_flushes == 0
        want = model_op(op, m)
        if want is not None:
            assert r == want
        _check(s, m, probe_of(m))
        out[op] = (r, snapshot(s))
    return out


@pytest.mark.parametrize("every", EVERY)
@pytest.mark.parametrize("op", OPS)
def test_a_loop_that_yields_ends_where_the_loop_that_never_yields_does(op, every, reference):
    s, m = guest()
    s.t.resched_every = every
    r = run(op, s)
    if op == "zap_leafs":
        # a flush done at a yield is no longer owed at the end
        assert (r or s.t.nr_yield_flushes > 0) == reference[op][0]
    else:
        assert r == reference[op][0]
    same(snapshot(s), reference[op][1])
    model_op(op, m)
    _check(s, m, probe_of(m))
    if op != "split_2m" or every == 1:          # split_2m visits 5 entries
        assert s.t.nr_yields > 0, "a loop over thousands of entries never yielded"
    if every == 1 and op != "split_2m":          # split_2m walks the 1G entries only
        assert s.t.nr_yields > 100


def _replica_zap_leafs(s, start, end, every, flush=False):
    """tdp_mmu_zap_leafs in Python over the same C iterator and yield rule,
    on the tables before the zap (a zapped leaf is not descended into, nor
    is a present one, so the walk is the same): (yields, flushes before a
    yield, flush owed at the end)."""
    it = TdpIter(s.a, s.root, start, end, resched_every=every)
    present = s.fmt.is_shadow_present_pte_array
    yields = flushes = 0
    for _, lvl, _, spte in it:
        if it.cond_resched():
            yields += 1
            flushes += flush
            flush = False
            continue
        if present(np.array([spte], np.uint64))[0] and (lvl == 1 or (spte >> 7) & 1):
            flush = True
    return yields, flushes, flush


@pytest.mark.parametrize("every", [1, 3, 7, 64, 512, 5000])
@pytest.mark.parametrize("rng_", [(0x345, (3 << 18) + 0x9876), (0, 1 << 10), (0x2000, 0x2001),
                                  (5 << 18, 6 << 18)])
def test_zap_leafs_flushes_before_each_yield_that_owes_a_flush(every, rng_):
    start, end = rng_
    s, _ = guest()
    want = _replica_zap_leafs(s, start, end, every)
    s.t.resched_every = every
    y0, f0 = s.t.nr_yields, s.t.nr_yield_flushes
    owed = s.t.zap_leafs(s.root, start, end)
    assert (s.t.nr_yields - y0, s.t.nr_yield_flushes - f0, owed) == want


def test_a_flush_the_caller_already_owes_is_done_at_the_first_yield():
    s = Setup(4)
    s.map([0x1000], [HOST + 0x1000], 1)
    s.t.resched_every = 2
    # [0x1001, 0x1200) holds no leaf: only the owed flush can be done, once
    assert not s.t.zap_leafs(s.root, 0x1001, 0x1200, flush=True)
    assert s.t.nr_yields > 0 and s.t.nr_yield_flushes == 1


def test_zap_leafs_with_one_leaf_flushes_once_at_the_next_yield():
    s = Setup(4)
    s.map([0x700], [HOST + 0x700], 1, write=True)
    s.map(np.arange(0x1000, 0x1200, dtype=np.uint64),
          np.arange(0x1000, 0x1200, dtype=np.uint64) + HOST, 1)
    s.t.resched_every = 1
    assert not s.t.zap_leafs(s.root, 0x600, 0x800)       # flushed at a later yield: none owed
    assert s.t.nr_yield_flushes == 1 and s.t.nr_yields > 1
    assert s.a.page_stats["pages_4k"] == 512


def test_recovery_flushes_before_yielding_only_when_it_replaced_something():
    s, m = guest()
    s.t.resched_every = 1
    ml = np.full(SPAN >> 9, 3, np.int8)
    n = s.t.recover_huge_pages(s.root, 0, SPAN, ml)
    assert n == m.recover(0, SPAN, ml) > 1
    assert 0 < s.t.nr_yield_flushes <= n < s.t.nr_yields
    s2, _ = guest()
    s2.t.resched_every = 1
    assert s2.t.recover_huge_pages(s2.root, 0, SPAN, np.full(SPAN >> 9, 1, np.int8)) == 0
    assert s2.t.nr_yields > 0 and s2.t.nr_yield_flushes == 0


def test_aging_and_the_masked_clear_never_yield():
    s, _ = guest()
    s.t.resched_every = 1
    assert s.t.age_gfn_range(s.root, 0, SPAN)
    s.t.clear_dirty_log(s.root, 0, np.full(SPAN // 64, ~np.uint64(0), np.uint64))
    assert s.t.nr_yields == 0


def test_resched_every_is_validated_and_left_unchanged_on_bad_input():
    s = Setup(4)
    s.t.resched_every = 9
    for bad, exc in ((-1, ValueError), (1.5, TypeError), ("3", TypeError), (1 << 63, ValueError)):
        with pytest.raises(exc, match="resched_every"):
            s.t.resched_every = bad
    assert s.t.resched_every == 9
    s.t.resched_every = np.int64(0)
    assert s.t.resched_every == 0


def test_every_loop_ends_with_a_budget_of_one_step():
    """In a child with a timeout: a yield without forward progress loops
    forever, here it must end."""
    here = os.path.dirname(__file__)
    assert_no_crash(f"""
        import sys
        sys.path[:0] = {[here, os.path.dirname(here)]!r}
        import test_tdp_yield as t
        for op in t.OPS:
            s, _ = t.guest()
            s.t.resched_every = 1
            t.run(op, s)
            assert s.t.nr_yields > 0, op
    """, timeout=300, allow_raise=False)
