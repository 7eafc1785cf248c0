"""The bare C radix-tree map (the TDP MMU's speed baseline) translates as
the TDP MMU does: the same gfns mapped to the same pfns at the same levels
give, through ``BareRadixMap.walk`` and ``kvm_tdp_mmu_get_walk``, the same
leaf SPTEs (with the TDP MMU's leaf bits) at the same levels, and holes at
the same levels."""
import numpy as np
import pytest
from kvmmmu._core.tdp_bench import BareRadixMap

from kvmmmu._core.pt_arena import MmuMemoryCache, PtArena
from kvmmmu._core.role import KvmMmuPageRole
from kvmmmu._core.spte import SpteFormat
from kvmmmu._core.tdp_iter import kvm_tdp_mmu_get_walk
from kvmmmu._core.tdp_mmu import TdpMmuCore

PFN_MASK = ((1 << 52) - 1) & ~0xfff
HOST = 1 << 24


def _tdp():
    fmt = SpteFormat.ept()
    a = PtArena(fmt, nr_vcpus=1)
    pc, hc = MmuMemoryCache(a, "shadow_page"), MmuMemoryCache(a, "page_header")
    pc.topup(1)
    hc.topup(1)
    role = KvmMmuPageRole(level=4, direct=1, access=7, ad_disabled=0).word
    root = a.alloc_sp(pc, hc, role=role, gfn=0, tdp_mmu_page=True)
    return fmt, a, root, TdpMmuCore(a), pc, hc


def _inputs(rng):
    """Disjoint 1G-aligned regions: random 4K gfns in the first, random 2M
    frames in the second, 1G pages in the third (some far up the 2**36 space)."""
    g4 = np.unique(rng.integers(0, 1 << 18, 3000)).astype(np.uint64)
    g2 = (np.uint64(1 << 18) + (np.unique(rng.integers(0, 512, 200)).astype(np.uint64) << np.uint64(9)))
    g1 = np.array([2 << 18, 5 << 18, (1 << 36) - (1 << 18)], np.uint64)
    return {1: g4, 2: g2, 3: g1}


def test_same_translations_as_the_tdp_mmu():
    fmt, a, root, t, pc, hc = _tdp()
    rng = np.random.default_rng(7)
    per_level = _inputs(rng)
    for level, g in per_level.items():
        assert (t.map(root, g, g + np.uint64(HOST), level, pc, hc, write=True) == 5).all()
    probe = np.concatenate(list(per_level.values()) + [
        rng.integers(0, 3 << 18, 20000).astype(np.uint64),          # hits and holes
        rng.integers(0, 1 << 36, 2000).astype(np.uint64),
        np.array([0, (1 << 36) - 1, (5 << 18) + 12345], np.uint64)])
    t_spte, t_level = kvm_tdp_mmu_get_walk(a, root, probe)
    leaf = int(t_spte[0])
    b = BareRadixMap(leaf_bits=leaf & ~PFN_MASK & ~0x80)
    for level, g in per_level.items():
        b.map(g, g + np.uint64(HOST), level)
    b_spte, b_level = b.walk(probe)
    present = fmt.is_shadow_present_pte_array(t_spte)
    assert present.sum() > 5000 and (~present).sum() > 1000
    np.testing.assert_array_equal(b_level, t_level)
    np.testing.assert_array_equal(b_spte[present], t_spte[present])
    assert (b_spte[~present] == 0).all()
    # the translation itself: pfn of the leaf plus the offset inside it
    lvl = b_level[present].astype(np.uint64)
    off = probe[present] & ((np.uint64(1) << (np.uint64(9) * (lvl - np.uint64(1)))) - np.uint64(1))
    np.testing.assert_array_equal((b_spte[present] & np.uint64(PFN_MASK)) >> np.uint64(12),
                                  probe[present] - off + np.uint64(HOST))
    # tables: the TDP MMU's non-root tables plus its root
    assert b.n_tables == t.tdp_mmu_pages + 1
    assert b.nbytes >= b.n_tables * 4096


def test_replacing_leaves_and_tables():
    b = BareRadixMap()
    b.map(np.array([512], np.uint64), np.array([1024], np.uint64), 2)
    s, lv = b.walk(np.array([512, 513, 1023, 1024], np.uint64))
    assert lv.tolist() == [2, 2, 2, 2] and s[3] == 0      # 1024: the next 2M entry, empty
    assert s[0] == s[1] == (1024 << 12) | 0xb77 | 0x80
    b.map(np.array([513], np.uint64), np.array([7], np.uint64), 1)     # the huge leaf goes
    s, lv = b.walk(np.array([512, 513], np.uint64))
    assert lv.tolist() == [1, 1] and s[0] == 0 and s[1] == (7 << 12) | 0xb77
    b.map(np.array([512], np.uint64), np.array([2048], np.uint64), 2)  # the table goes
    s, lv = b.walk(np.array([513], np.uint64))
    assert lv[0] == 2 and s[0] == (2048 << 12) | 0xb77 | 0x80


@pytest.mark.parametrize("call, exc, word", [
    (lambda b: b.map(np.array([1], np.uint64), np.array([0], np.uint64), 2), ValueError, "aligned"),
    (lambda b: b.map(np.array([1 << 36], np.uint64), np.array([0], np.uint64), 1), ValueError, "2\\*\\*36"),
    (lambda b: b.map(np.array([1], np.uint64), np.array([1 << 40], np.uint64), 1), ValueError, "2\\*\\*40"),
    (lambda b: b.map(np.array([1], np.uint64), np.array([1], np.uint64), 4), ValueError, "level"),
    (lambda b: b.map(np.array([1], np.int64), np.array([1], np.uint64), 1), TypeError, "gfns"),
    (lambda b: b.map(np.array([1, 2], np.uint64), np.array([1], np.uint64), 1), ValueError, "pfns"),
    (lambda b: b.walk(np.array([1 << 36], np.uint64)), ValueError, "gfns"),
    (lambda b: b.walk([1]), TypeError, "gfns"),
    (lambda b: BareRadixMap(leaf_bits=0x80), ValueError, "leaf_bits"),
    (lambda b: BareRadixMap(leaf_bits=1 << 12), ValueError, "leaf_bits"),
])
def test_bad_input_leaves_the_map_unchanged(call, exc, word):
    b = BareRadixMap()
    b.map(np.array([3], np.uint64), np.array([9], np.uint64), 1)
    before = b.n_tables
    with pytest.raises(exc, match=word):
        call(b)
    s, lv = b.walk(np.array([3, 1], np.uint64))
    assert b.n_tables == before and s[0] == (9 << 12) | 0xb77 and s[1] == 0 and lv.tolist() == [1, 1]


def test_uninitialised_map_raises():
    from kvmmmu.errors import ObjectInitError
    b = BareRadixMap.__new__(BareRadixMap)
    with pytest.raises(ObjectInitError):
        b.walk(np.array([1], np.uint64))
