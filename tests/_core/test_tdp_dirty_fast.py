"""clear_dirty_log's per-table loops against a brute force over the leaves.

The batch form walks once per 4K table, not once per 64-gfn word, and a
full word takes a vectorized path (one pass of reductions, then either
nothing to write, 64 plain stores when no SPTE may be changed by anyone
else, or the per-entry loop with the atomic clear where
spte_needs_atomic_update says so).  Whatever the path, the result must be
the kernel's loop: for each set bit whose gfn has a present 4K leaf, the
bit is reported and `dbit` cleared in that leaf; nothing else changes.
"""
import numpy as np
import pytest
from test_tdp_mmu_core import HOST, Setup

from kvmmmu._core.spte import PT_WRITABLE_MASK, SpteFormat
from kvmmmu._core.tdp_iter import kvm_tdp_mmu_get_walk

SPAN = 1 << 15


def guest(ad_bits=True):
    """4K tables in every state: full and dirty, holes, clean words, words
    write-protected by dirty logging (MMU-writable without W: the atomic
    clear), read-only words, a 2M leaf and unmapped regions."""
    s = Setup(4, SpteFormat.ept(ad_bits=ad_bits))
    rng = np.random.default_rng(7)
    g = np.arange(0, 1 << 14, dtype=np.uint64)
    s.map(g, g + HOST, 1, write=True)
    ro = np.arange(1 << 14, (1 << 14) + 2048, dtype=np.uint64)
    s.map(ro, ro + HOST, 1, write=False)
    s.map([(1 << 14) + 4096], [HOST + (1 << 14) + 4096], 2, write=True)
    sparse = np.unique(rng.integers(20 << 10, SPAN, 3000)).astype(np.uint64)
    s.map(sparse, sparse + HOST, 1, write=True)
    for start in rng.integers(0, 1 << 14, 40):
        s.t.zap_leafs(s.root, int(start), int(start) + int(rng.integers(1, 70)))
    D = s.fmt.masks()["dirty_mask"]
    if D:
        s.t.clear_bit_range(s.root, 0x800, 0x1000, D)                   # clean words
    s.t.clear_bit_range(s.root, 0x1400, 0x1c40, PT_WRITABLE_MASK)      # W off, MMU-W kept
    return s


def brute(s, mask, dbit):
    """(found words, SPTEs after) the kernel's loop gives."""
    g = np.arange(len(mask) * 64, dtype=np.uint64)
    sptes, levels = kvm_tdp_mmu_get_walk(s.a, s.root, g)
    present = s.fmt.is_shadow_present_pte_array(sptes) & (levels == 1)
    bits = ((mask[:, None] >> np.arange(64, dtype=np.uint64)[None, :]) & np.uint64(1)).ravel() == 1
    hit = present & bits
    after = np.where(hit, sptes & ~np.uint64(dbit), sptes)
    found = (hit.reshape(-1, 64).astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(
        axis=1, dtype=np.uint64)
    return found, after


@pytest.mark.parametrize("ad_bits,wrprot", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("masks", ["full", "random", "mixed"])
def test_clear_dirty_log_is_the_kernels_loop_on_every_path(ad_bits, wrprot, masks):
    s = guest(ad_bits)
    words = SPAN // 64
    rng = np.random.default_rng(1)
    if masks == "full":
        mask = np.full(words, ~np.uint64(0), np.uint64)
    elif masks == "random":
        mask = rng.integers(0, 2**63, words, dtype=np.uint64) * np.uint64(2) + \
            rng.integers(0, 2, words, dtype=np.uint64)
    else:
        mask = np.where(rng.integers(0, 3, words) == 0, np.uint64(0),
                        np.where(rng.integers(0, 2, words) == 0, ~np.uint64(0),
                                 rng.integers(0, 2**63, words, dtype=np.uint64)))
    dbit = PT_WRITABLE_MASK if wrprot else s.fmt.masks()["dirty_mask"]
    want_found, want_after = brute(s, mask, dbit)
    stats = dict(s.a.page_stats)
    found = s.t.clear_dirty_log(s.root, 0, mask, wrprot=wrprot)
    assert (found == want_found).all()
    got_after, _ = kvm_tdp_mmu_get_walk(s.a, s.root, np.arange(words * 64, dtype=np.uint64))
    bad = np.flatnonzero(got_after != want_after)
    assert bad.size == 0, [hex(int(x)) for x in bad[:5]]
    assert s.a.page_stats == stats and s.t.warnings() == {}
    if masks == "full":
        assert int(np.bitwise_count(found).sum()) > 10000


def test_a_word_offset_from_the_table_and_a_base_inside_a_table():
    s = guest()
    D = s.fmt.masks()["dirty_mask"]
    mask = np.full(3, ~np.uint64(0), np.uint64)
    base = 0x2000 + 3 * 64                     # the 4th word of a table, 3 words on
    want_found, _ = brute(s, np.concatenate([np.zeros(base // 64, np.uint64), mask]), D)
    assert (s.t.clear_dirty_log(s.root, base, mask) == want_found[base // 64:]).all()


def test_words_across_1g_regions_a_1g_leaf_and_empty_regions():
    """The batch keeps the 2M-level table of the current 1G region between
    words: crossing into a region with other tables, a 1G leaf, or nothing
    must each be walked again."""
    s = Setup(4)
    G = 1 << 18
    a = np.arange(G - 1024, G + 1024, dtype=np.uint64)              # both sides of a 1G border
    s.map(a, a + HOST, 1, write=True)
    s.map([2 * G], [HOST + 2 * G], 3, write=True)                   # a 1G leaf
    b = np.arange(4 * G, 4 * G + 700, dtype=np.uint64)              # after an empty 1G region
    s.map(b, b + HOST, 1, write=True)
    base = G - 1024
    words = (4 * G + 1024 - base) // 64
    rng = np.random.default_rng(2)
    mask = np.where(rng.integers(0, 4, words) == 0, rng.integers(0, 2**63, words, dtype=np.uint64),
                    ~np.uint64(0)).astype(np.uint64)
    D = s.fmt.masks()["dirty_mask"]
    g = np.arange(base, base + words * 64, dtype=np.uint64)
    before, levels = kvm_tdp_mmu_get_walk(s.a, s.root, g)
    bits = ((mask[:, None] >> np.arange(64, dtype=np.uint64)[None, :]) & np.uint64(1)).ravel() == 1
    hit = s.fmt.is_shadow_present_pte_array(before) & (levels == 1) & bits
    want = (hit.reshape(-1, 64).astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(
        axis=1, dtype=np.uint64)
    found = s.t.clear_dirty_log(s.root, base, mask)
    assert (found == want).all() and int(np.bitwise_count(found).sum()) > 2000
    after, _ = kvm_tdp_mmu_get_walk(s.a, s.root, g)
    assert (after == np.where(hit, before & ~np.uint64(D), before)).all()
