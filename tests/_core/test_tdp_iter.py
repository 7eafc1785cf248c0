"""tdp_iter: the C iterator against a brute-force pre-order walk of the same
tables, the kernel's layout of struct tdp_iter (and the live BTF), yields,
gfn_bits, and a batch get_walk against per-gfn descents."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmmu._core.pt_arena import MmuMemoryCache, PtArena
from kvmmmu._core.role import KvmMmuPageRole
from kvmmmu._core.spte import SpteFormat
from kvmmmu._core.tdp_iter import TdpIter, kvm_tdp_mmu_get_walk, tdp_iter_layout

BTF = "/sys/kernel/btf/vmlinux"


def pages(level):
    return 1 << (9 * (level - 1))


class Tree:
    """A TDP paging structure built through the arena's public API, and the
    dict of what it maps (gfn of the leaf's first page -> (level, pfn))."""

    def __init__(self, root_level=4, smm=0):
        self.fmt = SpteFormat.ept()
        self.a = PtArena(self.fmt, nr_vcpus=1)
        self.pc = MmuMemoryCache(self.a, "shadow_page")
        self.hc = MmuMemoryCache(self.a, "page_header")
        self.leaves = {}
        self.root = self._alloc(root_level, 0, smm)
        self.root_level = root_level
        self.smm = smm

    def _alloc(self, level, gfn, smm=0):
        self.pc.topup(1)
        self.hc.topup(1)
        role = KvmMmuPageRole(level=level, direct=1, access=7, smm=smm).word
        return self.a.alloc_sp(self.pc, self.hc, role=role, gfn=gfn, tdp_mmu_page=True)

    def _child(self, sp, level, g):
        """The sp linked at `g`'s entry of `sp` (level `level`), made if absent."""
        sptep = self.a.sp_sptep(sp, (g >> (9 * (level - 1))) & 511)
        spte = self.a.mmu_spte_get_lockless(sptep)
        if self._present(spte):
            return self.a.spte_to_child_sp(spte)
        child = self._alloc(level - 1, g & ~(pages(level) - 1))
        self.a.mmu_spte_set(sptep, self.fmt.make_nonleaf_spte(self.a.sp_pa(child)))
        return child

    def _present(self, spte):
        return bool(self.fmt.is_shadow_present_pte_array(np.array([spte], np.uint64))[0])

    def map(self, gfn, level, pfn, bits=0):
        """Map `gfn` (aligned down for `level`) at `level` in the half
        `bits` selects, unless a huge leaf above or anything at the target
        entry is in the way (then do nothing and return False)."""
        gfn &= ~(pages(level) - 1)
        g = gfn | bits
        sp, lvl = self.root, self.root_level
        while lvl > level:
            spte = self.a.mmu_spte_get_lockless(self.a.sp_sptep(sp, (g >> (9 * (lvl - 1))) & 511))
            if self._present(spte) and (spte >> 7) & 1:      # a huge leaf is in the way
                return False
            sp = self._child(sp, lvl, g)
            lvl -= 1
        sptep = self.a.sp_sptep(sp, (g >> (9 * (level - 1))) & 511)
        if self._present(self.a.mmu_spte_get_lockless(sptep)):
            return False
        spte, _ = self.fmt.make_spte(level=level, pte_access=7, pfn=pfn & ~(pages(level) - 1))
        self.a.mmu_spte_set(sptep, spte)
        self.leaves[gfn] = (level, pfn, spte)
        return True

    def brute(self, start, end, min_level=1, bits=0):
        """What for_each_tdp_pte_min_level visits, by recursion over the
        tables: in the index space of ``gfn | bits``, every entry whose range
        reaches past ``start | bits`` and begins below ``end | bits``, in
        pre-order, entering present non-leaf entries above `min_level`; each
        reported with its gfn without `bits`."""
        out = []
        lo, hi = start | bits, end | bits

        def visit(sp, level, base):
            table = self.a.spt(sp)
            for idx in range(512):
                g = base + idx * pages(level)
                if g + pages(level) <= lo or g >= hi:
                    continue
                spte = int(table[idx])
                out.append((g & ~bits, level, self.a.sp_sptep(sp, idx), spte))
                if level > min_level and self._present(spte) and not (spte >> 7) & 1:
                    visit(self.a.spte_to_child_sp(spte), level - 1, g)

        visit(self.root, self.root_level, 0)
        return out


def _random_tree(rng, n=60, root_level=4, span=1 << 22, bits=0):
    t = Tree(root_level)
    for _ in range(n):
        level = int(rng.choice([1, 1, 1, 2, 2, 3]))
        gfn = int(rng.integers(0, span))
        t.map(gfn, level, int(rng.integers(1, 1 << 30)), bits)
    return t


# ---------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------

KERNEL_LAYOUT = {          # v6.18 x86-64, from the BTF of this machine's kernel
    "next_last_level_gfn": (0, 8), "yielded_gfn": (8, 8), "pt_path": (16, 40),
    "sptep": (56, 8), "gfn": (64, 8), "gfn_bits": (72, 8), "root_level": (80, 4),
    "min_level": (84, 4), "level": (88, 4), "as_id": (92, 4), "old_spte": (96, 8),
    "valid": (104, 1), "yielded": (105, 1), "sizeof": 112,
}


def test_struct_tdp_iter_has_the_kernel_layout():
    assert tdp_iter_layout() == KERNEL_LAYOUT


@pytest.mark.skipif(not os.access(BTF, os.R_OK), reason="no kernel BTF")
def test_struct_tdp_iter_matches_the_running_kernel():
    from kvmmmu.live.btf import Btf, BtfError
    with open(BTF, "rb") as f:
        btf = Btf(f.read())
    try:
        members = btf.struct_layout("tdp_iter")
    except BtfError:
        pytest.skip("this kernel's BTF has no struct tdp_iter (KVM not built in)")
    ours = tdp_iter_layout()
    assert {m.name: (m.offset, m.size) for m in members} == \
        {k: v for k, v in ours.items() if k != "sizeof"}


# ---------------------------------------------------------------------------
# the walk
# ---------------------------------------------------------------------------

def test_empty_root_visits_every_entry_of_the_root_in_range():
    t = Tree(4)
    got = list(TdpIter(t.a, t.root, 0, 1 << 36))
    assert [(g, lvl) for g, lvl, _, _ in got] == [(i << 27, 4) for i in range(512)]
    assert all(s == t.a.sp_sptep(t.root, i) for i, (_, _, s, _) in enumerate(got))


def test_worked_example_one_4k_and_one_2m_mapping():
    t = Tree(4)
    assert t.map(0x12345, 1, 0x999) and t.map(0x200, 2, 0x400)
    got = [(hex(g), lvl) for g, lvl, _, _ in TdpIter(t.a, t.root, 0x200, 0x12346)]
    # root entry 0 (gfns 0..2^27) -> L3 entry 0 -> L2 entries 1 (2 MiB leaf at 0x200)
    # ... up to L2 entry 0x91 (0x12200), a table: its L1 entries up to 0x12345.
    assert got[:3] == [("0x0", 4), ("0x0", 3), ("0x200", 2)]
    assert got[3:5] == [("0x400", 2), ("0x600", 2)]
    assert ("0x12200", 2) in got and got[-1] == ("0x12345", 1)
    l1 = [g for g, lvl in got if lvl == 1]
    assert l1 == [hex(g) for g in range(0x12200, 0x12346)]
    assert got == [(hex(g), lvl) for g, lvl, _, _ in t.brute(0x200, 0x12346)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lo=st.integers(0, 1 << 22), width=st.integers(1, 1 << 21),
       min_level=st.integers(1, 4), root_level=st.sampled_from([4, 5]))
def test_iterator_equals_the_brute_force_preorder(seed, lo, width, min_level, root_level):
    t = _random_tree(np.random.default_rng(seed), root_level=root_level)
    got = list(TdpIter(t.a, t.root, lo, lo + width, min_level=min_level))
    assert got == t.brute(lo, lo + width, min_level)


def test_gfn_bits_index_the_alias_half_and_stay_out_of_gfn():
    bits = 1 << 26                      # an alias bit inside a level-4 root's reach
    t = Tree(4)
    assert t.map(0x1234, 1, 0x77, bits=bits)
    it = TdpIter(t.a, t.root, 0x1000, 0x2000, gfn_bits=bits)
    got = list(it)
    assert got and all(g < bits for g, _, _, _ in got)
    assert next(x for x in got if x[1] == 1 and x[0] == 0x1234)[3] == t.leaves[0x1234][2]
    assert got == t.brute(0x1000, 0x2000, 1, bits)
    # without the bit the same range reads the other half: nothing mapped there
    plain = list(TdpIter(t.a, t.root, 0x1000, 0x2000))
    assert plain == t.brute(0x1000, 0x2000) and all(lvl >= 3 for _, lvl, _, _ in plain)


def test_a_yield_restarts_from_the_root_at_next_last_level_gfn():
    t = _random_tree(np.random.default_rng(7), n=200, span=1 << 20)
    end = 1 << 20
    it = TdpIter(t.a, t.root, 0, end, resched_every=50)
    segments = [(0, [])]                # (restart gfn, entries handled after it)
    for e in it:
        if it.cond_resched():
            segments.append((it.next_last_level_gfn, []))
            continue                    # the kernel's loops `continue` right after a yield
        segments[-1][1].append(e)
    assert it.nr_yields == len(segments) - 1 > 3
    # After each yield the walk goes back to the root and down to the
    # restart gfn: exactly what a fresh walk from there visits, in order.
    for g, seen in segments:
        assert seen == t.brute(g, end)[:len(seen)], hex(g)
        assert seen[0][1] == t.root_level
    # and nothing is lost: the last segment runs to the end of the range
    assert segments[-1][1] == t.brute(segments[-1][0], end)


def test_no_yield_without_forward_progress():
    t = Tree(4)
    it = TdpIter(t.a, t.root, 0, 1 << 36, resched_every=1)
    next(it)
    it.cond_resched()                   # a step counted, budget now spent
    assert not it.cond_resched()        # next_last_level_gfn == yielded_gfn: no progress yet
    next(it)                            # one step sideways: progress
    assert it.cond_resched() and it.yielded
    assert not it.cond_resched()        # never twice in a row


def test_a_freed_or_foreign_table_is_never_entered():
    t = Tree(4)
    t.map(0x5000, 1, 0x10)
    # Point the root's entry 0 at a pfn outside the arena: the walk must not descend.
    sptep = t.a.sp_sptep(t.root, 0)
    t.a.mmu_spte_clear_no_track(sptep)
    t.a.mmu_spte_set(sptep, t.fmt.make_nonleaf_spte(1 << 40))
    got = list(TdpIter(t.a, t.root, 0, 1 << 27))
    assert got == [(0, 4, sptep, t.a.mmu_spte_get_lockless(sptep))]


def test_bad_arguments_raise_and_name_them():
    t = Tree(4)
    with pytest.raises(TypeError, match="start"):
        TdpIter(t.a, t.root, 1.5, 10)
    with pytest.raises(ValueError, match="root"):
        TdpIter(t.a, 0, 0, 10)
    with pytest.raises(ValueError, match="root"):
        TdpIter(t.a, 10**6, 0, 10)
    with pytest.raises(ValueError, match="min_level"):
        TdpIter(t.a, t.root, 0, 10, min_level=5)
    with pytest.raises(ValueError, match="gfn_bits"):
        TdpIter(t.a, t.root, 0, 10, gfn_bits=3)
    with pytest.raises(ValueError, match="reaches gfn_bits"):
        TdpIter(t.a, t.root, 1 << 20, (1 << 20) + 1, gfn_bits=1 << 20)
    with pytest.raises(ValueError, match="beyond"):
        TdpIter(t.a, t.root, 1 << 36, 1 << 37)
    with pytest.raises(ValueError, match="resched_every"):
        TdpIter(t.a, t.root, 0, 10, resched_every=-1)


def test_smm_root_walks_as_id_1():
    t = Tree(4, smm=1)
    it = TdpIter(t.a, t.root, 0, 1)
    next(it)
    assert it.as_id == 1 and it.root_level == 4 and it.pt_path[3] == t.a.sp_sptep(t.root, 0)


# ---------------------------------------------------------------------------
# batch get_walk
# ---------------------------------------------------------------------------

def test_get_walk_equals_a_descent_per_gfn():
    rng = np.random.default_rng(3)
    t = _random_tree(rng, n=300, span=1 << 21)
    gfns = np.concatenate([np.array(sorted(t.leaves), np.uint64),
                           rng.integers(0, 1 << 21, 500).astype(np.uint64)])
    sptes, levels = kvm_tdp_mmu_get_walk(t.a, t.root, gfns)
    for g, s, lvl in zip(gfns.tolist(), sptes.tolist(), levels.tolist()):
        path = [e for e in t.brute(g, g + 1)]
        last = path[-1]                 # the deepest entry on g's path
        assert (s, lvl) == (last[3], last[1])
        covering = [base for base, (l2, _, _) in t.leaves.items() if base <= g < base + pages(l2)]
        if covering:
            assert lvl == t.leaves[covering[0]][0]


def test_get_walk_refuses_gfns_beyond_the_root_and_copies_its_input():
    t = Tree(4)
    with pytest.raises(ValueError, match=r"gfns\[1\]"):
        kvm_tdp_mmu_get_walk(t.a, t.root, np.array([0, 1 << 36], np.uint64))
    with pytest.raises(TypeError):
        kvm_tdp_mmu_get_walk(t.a, t.root, np.array([0.5]))
    g = np.arange(4, dtype=np.uint64)
    with pytest.raises(ValueError):
        kvm_tdp_mmu_get_walk(t.a, t.root, g, out_spte=g)            # overlap
