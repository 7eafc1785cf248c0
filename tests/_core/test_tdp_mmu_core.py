"""The C half of the TDP MMU against a brute-force model.

The model is a dict of leaves {(level, first gfn): pfn} with the kernel's
rules for a fault at a goal level (split a huge leaf in the way and find the
target present: spurious; replace a table by a huge leaf; install into an
empty entry), for leaf zaps (every leaf whose range meets the zap range)
and for a root zap.  After every step the tables must translate every
probed gfn as the model does, the arena's page statistics must equal the
model's leaf counts, ``tdp_mmu_pages`` must equal the tables reachable from
the root, and no entry may be left FROZEN."""
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from kvmmmu._core.tdp_mmu import TdpMmuCore

from kvmmmu._core.pt_arena import MmuMemoryCache, PtArena
from kvmmmu._core.role import KvmMmuPageRole
from kvmmmu._core.spte import SpteFormat
from kvmmmu._core.tdp_iter import TdpIter, kvm_tdp_mmu_get_walk

RET_PF_FIXED, RET_PF_SPURIOUS = 5, 6
SPAN = 1 << 21                      # gfns the machine plays in (8 GiB): 1G pages fit
HOST = 1 << 24                      # the host maps gfn g at pfn HOST + g (1G aligned)


def pages(level):
    return 1 << (9 * (level - 1))


class Setup:
    def __init__(self, root_level=4, fmt=None):
        self.fmt = fmt or SpteFormat.ept()
        self.a = PtArena(self.fmt, nr_vcpus=1)
        self.pc = MmuMemoryCache(self.a, "shadow_page")
        self.hc = MmuMemoryCache(self.a, "page_header")
        self.pc.topup(1)
        self.hc.topup(1)
        role = KvmMmuPageRole(level=root_level, direct=1, access=7,
                              ad_disabled=int(not self.fmt.masks()["ad_enabled"])).word
        self.root = self.a.alloc_sp(self.pc, self.hc, role=role, gfn=0, tdp_mmu_page=True)
        self.t = TdpMmuCore(self.a)

    def map(self, gfns, pfns, level, **kw):
        return self.t.map(self.root, np.asarray(gfns, np.uint64), np.asarray(pfns, np.uint64),
                          level, self.pc, self.hc, **kw)


class Model:
    def __init__(self):
        self.leaves = {}            # (level, base gfn) -> base pfn

    def covering(self, gfn):
        for lvl in (1, 2, 3):
            base = gfn & ~(pages(lvl) - 1)
            if (lvl, base) in self.leaves:
                return lvl, base, self.leaves[(lvl, base)]
        return None

    def map(self, gfn, level, pfn):
        c = self.covering(gfn)
        if c is not None and c[0] >= level:
            lvl, base, hpfn = c
            while lvl > level:      # split one level at a time, as the walk does
                del self.leaves[(lvl, base)]
                for i in range(512):
                    self.leaves[(lvl - 1, base + i * pages(lvl - 1))] = hpfn + i * pages(lvl - 1)
                lvl -= 1
                base = gfn & ~(pages(lvl) - 1)
                hpfn = self.leaves[(lvl, base)]
            return RET_PF_SPURIOUS
        for key in [k for k in self.leaves if gfn <= k[1] < gfn + pages(level)]:
            del self.leaves[key]    # a table replaced by a huge leaf
        self.leaves[(level, gfn)] = pfn
        return RET_PF_FIXED

    def split(self, start, end, target):
        while True:
            big = [k for k in self.leaves
                   if k[0] > target and k[1] < end and k[1] + pages(k[0]) > start]
            if not big:
                return
            for lvl, base in big:
                hpfn = self.leaves.pop((lvl, base))
                for i in range(512):
                    self.leaves[(lvl - 1, base + i * pages(lvl - 1))] = hpfn + i * pages(lvl - 1)

    def recover(self, base, npages, max_level):
        def below(b, lvl):
            return [k for k in self.leaves if b <= k[1] < b + pages(lvl) and k[0] < lvl]

        def merge(b, lvl):
            if b < base or b + pages(lvl) > base + npages or max_level[(b - base) >> 9] < lvl:
                return False
            if (lvl, b) in self.leaves or any(k[0] > lvl and k[1] <= b < k[1] + pages(k[0])
                                              for k in self.leaves):
                return False
            keys = below(b, lvl)
            if not keys:
                return False
            first = min(keys, key=lambda k: k[1])
            pfn = self.leaves[first] - (first[1] - b)
            for k in keys:
                del self.leaves[k]
            self.leaves[(lvl, b)] = pfn
            return True

        n = 0
        for b1 in range(base & ~(pages(3) - 1), base + npages, pages(3)):
            if merge(b1, 3):
                n += 1
                continue
            for b2 in range(b1, b1 + pages(3), pages(2)):
                if b2 < base + npages and merge(b2, 2):
                    n += 1
        return n

    def zap(self, start, end):
        for key in [k for k in self.leaves if k[1] < end and k[1] + pages(k[0]) > start]:
            del self.leaves[key]

    def translate(self, gfn):
        c = self.covering(gfn)
        return None if c is None else (c[0], c[2] + gfn - c[1])


def _check(s, model, probe):
    sptes, levels = kvm_tdp_mmu_get_walk(s.a, s.root, probe)
    present = s.fmt.is_shadow_present_pte_array(sptes)
    pfn = s.fmt.spte_to_pfn_array(sptes)
    for i, g in enumerate(probe.tolist()):
        want = model.translate(g)
        if want is None:
            assert not present[i], (hex(g), int(levels[i]))   # the walk ends on a hole
        else:
            lvl, p = want
            assert present[i] and levels[i] == lvl, (hex(g), int(levels[i]), lvl)
            assert int(pfn[i]) + (g & (pages(lvl) - 1)) == p, hex(g)
    counts = {f"pages_{n}": sum(1 for (lvl, _) in model.leaves if lvl == k)
              for k, n in ((1, "4k"), (2, "2m"), (3, "1g"))}
    assert s.a.page_stats == counts
    tables, frozen = 0, s.fmt.masks()["frozen_spte"]
    for g, lvl, _, spte in TdpIter(s.a, s.root, 0, SPAN):
        if lvl > 1 and s.fmt.is_shadow_present_pte_array(np.array([spte], np.uint64))[0] \
                and not (spte >> 7) & 1:
            tables += 1
        assert spte != frozen
    assert s.t.tdp_mmu_pages == tables
    assert s.t.warnings() == {}


class TdpMachine(RuleBasedStateMachine):
    @initialize(root_level=st.sampled_from([4, 5]))
    def setup(self, root_level):
        self.s = Setup(root_level)
        self.model = Model()
        self.rng = np.random.default_rng(0)

    @rule(level=st.sampled_from([1, 1, 2, 2, 3]), gfn=st.integers(0, SPAN - 1),
          n=st.integers(1, 40))
    def map(self, level, gfn, n):
        # A fault maps what the host maps: the pfn follows from the gfn (a
        # leaf changing pfn without a zap first is the kernel's BUG()).
        gfns = [((gfn + k * pages(level) * 3) % SPAN) & ~(pages(level) - 1) for k in range(n)]
        gfns = list(dict.fromkeys(gfns))
        pfns = [HOST + g for g in gfns]
        got = self.s.map(gfns, pfns, level)
        want = [self.model.map(g, level, p) for g, p in zip(gfns, pfns)]
        assert got.tolist() == want

    @rule(start=st.integers(0, SPAN), width=st.integers(1, 1 << 19))
    def zap_leafs(self, start, width):
        had = any(k[1] < start + width and k[1] + pages(k[0]) > start for k in self.model.leaves)
        assert self.s.t.zap_leafs(self.s.root, start, start + width) == had
        self.model.zap(start, start + width)

    @rule(start=st.integers(0, SPAN), width=st.integers(1, 1 << 19), to=st.sampled_from([1, 2]))
    def split(self, start, width, to):
        target = to
        before = sum(1 for k in self.model.leaves
                     if k[0] > target and k[1] < start + width and k[1] + pages(k[0]) > start)
        n = self.s.t.split_huge_pages(self.s.root, start, start + width, target, self.s.pc, self.s.hc)
        self.model.split(start, start + width, target)
        assert (n > 0) == (before > 0)

    @rule(frame=st.integers(0, SPAN >> 9), frames=st.integers(1, 1024), data=st.data())
    def recover(self, frame, frames, data):
        if self.model.leaves and data.draw(st.booleans()):       # aim at mapped memory
            frame = max(0, (data.draw(st.sampled_from(sorted(self.model.leaves)))[1] >> 9)
                        - data.draw(st.integers(0, 600)))
        base, npages = frame << 9, frames << 9
        ml = np.array(data.draw(st.lists(st.sampled_from([1, 2, 3]), min_size=frames,
                                         max_size=frames)), np.int8)
        got = self.s.t.recover_huge_pages(self.s.root, base, npages, ml)
        self.s.a.rcu_barrier()
        assert got == self.model.recover(base, npages, ml)

    @rule()
    def zap_root(self):
        self.s.t.zap_root(self.s.root)
        self.s.a.rcu_barrier()
        self.model.zap(0, 1 << 45)

    @invariant()
    def same_translations(self):
        keys = [b for (_, b) in self.model.leaves]
        probe = np.array(keys[:50] + [int(x) for x in self.rng.integers(0, SPAN, 60)]
                         + [b + pages(l) - 1 for (l, b) in list(self.model.leaves)[:20]],
                         np.uint64)
        _check(self.s, self.model, probe)


TestTdpMachine = TdpMachine.TestCase
TestTdpMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def test_a_root_zap_frees_every_table_after_a_grace_period():
    s = Setup(4)
    g = np.arange(0, 1 << 14, dtype=np.uint64)
    s.map(g, g + (1 << 20), 1)
    s.map(np.arange(1 << 16, 1 << 18, 512, dtype=np.uint64),
          np.arange(1 << 16, 1 << 18, 512, dtype=np.uint64) + (1 << 22), 2)
    in_use = int((s.a.sp_states() == 3).sum())
    assert s.t.tdp_mmu_pages == in_use - 1 > 30         # every table but the root
    s.t.zap_root(s.root)
    assert s.t.tdp_mmu_pages == 0 and s.a.page_stats == {"pages_4k": 0, "pages_2m": 0,
                                                            "pages_1g": 0}
    assert int((s.a.sp_states() == 4).sum()) == in_use - 1     # RCU pending until a grace period
    s.a.rcu_barrier()
    assert int((s.a.sp_states() == 3).sum()) == 1
    s.a.audit()                         # raises PtArenaAuditError if anything is off


def test_a_huge_leaf_in_the_way_is_split_in_place_with_make_small_spte():
    s = Setup(4)
    assert s.map([0x200], [0x40200], 2).tolist() == [RET_PF_FIXED]
    huge = int(kvm_tdp_mmu_get_walk(s.a, s.root, np.array([0x200], np.uint64))[0][0])
    assert s.map([0x234], [0x40234], 1).tolist() == [RET_PF_SPURIOUS]
    sptes, levels = kvm_tdp_mmu_get_walk(s.a, s.root, np.arange(0x200, 0x400, dtype=np.uint64))
    assert set(levels.tolist()) == {1}
    assert sptes.tolist() == [s.fmt.make_small_spte(huge, 1, i) for i in range(512)]
    assert s.a.page_stats == {"pages_4k": 512, "pages_2m": 0, "pages_1g": 0}
    assert s.t.tdp_mmu_pages == 3


def test_map_refuses_bad_input_before_changing_anything():
    s = Setup(4)
    before = (s.a.page_stats, s.t.tdp_mmu_pages)
    with pytest.raises(ValueError, match="aligned"):
        s.map([1], [0x1000], 2)
    with pytest.raises(ValueError, match="goal_level"):
        s.map([0], [0x1000], 4)
    with pytest.raises(ValueError, match="pfns has"):
        s.map([0, 1], [0x1000], 1)
    with pytest.raises(ValueError, match="root"):
        s.t.map(12345, np.zeros(1, np.uint64), np.zeros(1, np.uint64), 1, s.pc, s.hc)
    with pytest.raises(TypeError):
        s.t.map(s.root, np.zeros(1), np.zeros(1, np.uint64), 1, s.pc, s.hc)
    with pytest.raises(ValueError, match="cache"):
        s.t.map(s.root, np.zeros(1, np.uint64), np.zeros(1, np.uint64), 1, s.hc, s.pc)
    assert (s.a.page_stats, s.t.tdp_mmu_pages) == before


# ---------------------------------------------------------------------------
# aging and dirty logging
# ---------------------------------------------------------------------------

def _leaf(s, g):
    sptes, levels = kvm_tdp_mmu_get_walk(s.a, s.root, np.array([g], np.uint64))
    return int(sptes[0]), int(levels[0])


@pytest.mark.parametrize("ad_bits", [True, False])
def test_aging_clears_accessed_or_access_tracks_and_test_age_changes_nothing(ad_bits):
    s = Setup(4, SpteFormat.ept(ad_bits=ad_bits))
    g = np.arange(0x100, 0x140, dtype=np.uint64)
    s.map(g, g + HOST, 1)
    s.map([0x400], [HOST + 0x400], 2)
    before = [_leaf(s, x)[0] for x in range(0x100, 0x140)]
    assert all(s.fmt.is_accessed_spte(x) for x in before)
    assert s.t.age_gfn_range(s.root, 0x120, 0x200, test_only=True)
    assert [_leaf(s, x)[0] for x in range(0x100, 0x140)] == before      # test only: unchanged
    assert not s.t.age_gfn_range(s.root, 0x200, 0x400)                    # a hole: not young
    assert s.t.age_gfn_range(s.root, 0x120, 0x401)
    for x in range(0x100, 0x140):
        spte = _leaf(s, x)[0]
        aged = 0x120 <= x
        assert s.fmt.is_accessed_spte(spte) == (not aged), hex(x)
        if aged and not ad_bits:
            assert s.fmt.is_access_track_spte(spte)
        elif aged:
            assert spte == before[x - 0x100] & ~s.fmt.masks()["accessed_mask"]
    assert not s.fmt.is_accessed_spte(_leaf(s, 0x400)[0])
    assert not s.t.age_gfn_range(s.root, 0x120, 0x401, test_only=True)
    assert s.a.page_stats == {"pages_4k": 64, "pages_2m": 1, "pages_1g": 0}
    assert s.t.warnings() == {}


def test_write_protect_and_clear_dirty_ranges():
    s = Setup(4)
    g = np.arange(0, 0x400, dtype=np.uint64)
    s.map(g, g + HOST, 1, write=True)
    s.map([0x800], [HOST + 0x800], 2, write=True)
    W = 1 << 1
    D = s.fmt.masks()["dirty_mask"]
    # wrprot at 2M and above leaves the 4K leaves alone (the PML huge-page case)
    assert s.t.clear_bit_range(s.root, 0, 0x1000, W, min_level=2)
    assert all(_leaf(s, x)[0] & W for x in (0, 0x3ff))
    huge = _leaf(s, 0x800)[0]
    assert not huge & W and s.fmt.is_mmu_writable_spte(huge)      # MMU-writable stays
    # clear D over a sub-range: exactly those leaves lose it
    assert s.t.clear_bit_range(s.root, 0x10, 0x20, D)
    for x in range(0x40):
        assert bool(_leaf(s, x)[0] & D) == (not 0x10 <= x < 0x20), hex(x)
    assert not s.t.clear_bit_range(s.root, 0x10, 0x20, D)         # nothing left to clear
    with pytest.raises(ValueError, match="bit"):
        s.t.clear_bit_range(s.root, 0, 1, 1 << 5)
    assert s.t.warnings() == {}


def test_clear_dirty_log_bitmap_against_the_leaves():
    s = Setup(4)
    rng = np.random.default_rng(5)
    mapped = np.unique(rng.integers(0, 1 << 12, 1500)).astype(np.uint64)
    s.map(mapped, mapped + HOST, 1, write=True)
    s.map([1 << 13], [HOST + (1 << 13)], 2, write=True)              # a huge leaf: left alone
    words = (1 << 14) // 64 + 8
    mask = rng.integers(0, 2**63, words, dtype=np.uint64) | rng.integers(0, 2, words, dtype=np.uint64)
    D = s.fmt.masks()["dirty_mask"]
    before = {int(x): _leaf(s, x) for x in range(0, words * 64, 7)}
    found = s.t.clear_dirty_log(s.root, 0, mask)
    is4k = set(mapped.tolist())
    for w in range(words):
        want = 0
        for b in range(64):
            if int(mask[w]) >> b & 1 and (64 * w + b) in is4k:
                want |= 1 << b
        assert int(found[w]) == want, w
    for x, (spte, lvl) in before.items():
        now, lvl2 = _leaf(s, x)
        hit = int(mask[x // 64]) >> (x % 64) & 1 and x in is4k
        assert lvl2 == lvl and now == (spte & ~D if hit else spte), hex(x)
    with pytest.raises(ValueError, match="multiple of 64"):
        s.t.clear_dirty_log(s.root, 3, mask)


def test_map_grows_the_arena_whenever_the_pool_runs_dry():
    """Many small map calls on an arena of small chunks: calls that start
    with the pool empty grow it and go on (a first pass without progress is
    not a failure)."""
    s = Setup(4)
    s.a = PtArena(s.fmt, nr_vcpus=1, tables_per_chunk=64)
    s.pc = MmuMemoryCache(s.a, "shadow_page")
    s.hc = MmuMemoryCache(s.a, "page_header")
    s.pc.topup(1)
    s.hc.topup(1)
    s.root = s.a.alloc_sp(s.pc, s.hc, role=KvmMmuPageRole(level=4, direct=1, access=7).word,
                          gfn=0, tdp_mmu_page=True)
    s.t = TdpMmuCore(s.a)
    for k in range(300):
        g = k * 512                                   # a new 4K table for each
        assert s.map([g], [HOST + g], 1).tolist() == [RET_PF_FIXED]
    assert s.a.page_stats["pages_4k"] == 300 and s.t.tdp_mmu_pages == 300 + 2
    assert s.t.warnings() == {}
