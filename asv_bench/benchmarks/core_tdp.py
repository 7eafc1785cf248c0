"""The TDP MMU's C core (kvmmmu._core.tdp_mmu, tdp_iter) and its baseline.

These benchmarks depend only on kvmmmu._core (pt_arena, role, spte, tdp_iter,
tdp_mmu, tdp_bench), except ``ScalarFault``, which drives ``TdpMmu`` on a VM.

The sizes are the issue's: a 64 GiB guest is 2^24 4K pages (32834 tables,
137 MiB of arena) or 2^15 2M pages; 2^20 and 2^22 pages show whether the
cost per operation (map, walk, dirty round) stays flat.  ``BareRadixMap`` (kvmmmu._core.tdp_bench) is the bare C
radix-tree map of the same gfns the issue compares with ("within 3x");
``SpteFormat.clear_dirty_array`` over the same SPTEs is the dirty-log
baseline ("within 2x").  ``benchmarks/compare_tdp.py`` prints the ratios.

Conventions (see /work/shared/STYLE.md, "asv benchmarks"): ``setup`` builds a
fresh arena (operations that change the tables set ``number = 1``, so asv
runs ``setup`` before every sample) or reuses a memoized populated one;
``time_*``/``peakmem_*`` twins share a setup; the baselines are ``time_bare_*``
/ ``time_clear_dirty_array`` twins in the same class.  Guest gfn g is backed
by host pfn 2^24 + g.
"""
import numpy as np

from kvmmmu._core.pt_arena import MmuMemoryCache, PtArena
from kvmmmu._core.role import KvmMmuPageRole
from kvmmmu._core.spte import SpteFormat
from kvmmmu._core.tdp_bench import BareRadixMap
from kvmmmu._core.tdp_iter import kvm_tdp_mmu_get_walk
from kvmmmu._core.tdp_mmu import TdpMmuCore

HOST = 1 << 24
PAGES = [1 << 20, 1 << 22, 1 << 24]     # 4, 16 and 64 GiB of guest: is the cost per op flat?
BIG = 1 << 24
PFN_MASK = ((1 << 52) - 1) & ~0xfff
WALK_N = 1 << 20
SCALAR_OPS = 4096


class Tdp:
    """An EPT arena, its caches, a 4-level TDP root and the core."""

    def __init__(self):
        self.fmt = SpteFormat.ept()
        self.a = PtArena(self.fmt, nr_vcpus=1, max_tables=1 << 17)
        self.pc = MmuMemoryCache(self.a, "shadow_page")
        self.hc = MmuMemoryCache(self.a, "page_header")
        self.pc.topup(1)
        self.hc.topup(1)
        role = KvmMmuPageRole(level=4, direct=1, access=7, ad_disabled=0).word
        self.root = self.a.alloc_sp(self.pc, self.hc, role=role, gfn=0, tdp_mmu_page=True)
        self.t = TdpMmuCore(self.a)

    def map(self, gfns, level):
        return self.t.map(self.root, gfns, gfns + np.uint64(HOST), level, self.pc, self.hc,
                          write=True)

    def redirty(self):
        """Set D in every present 4K leaf (what the CPU does on a write)."""
        d = np.uint64(self.fmt.masks()["dirty_mask"])
        states = self.a.table_states()
        tpc = self.a.tables_per_chunk
        base = np.uint64(self.a.base_pfn)
        for c in range(self.a.n_chunks):
            rows = np.flatnonzero(states[c * tpc:(c + 1) * tpc] == 3)
            if rows.size:
                view = self.a.chunk_tables(c)
                tab = view[rows]
                pres = self.fmt.is_shadow_present_pte_array(tab.ravel()).reshape(tab.shape)
                leaf = pres & (((tab & np.uint64(PFN_MASK)) >> np.uint64(12)) < base) & \
                    ((tab & np.uint64(0x80)) == 0)
                view[rows] = np.where(leaf, tab | d, tab)


_GFNS = {}


def gfns_for(pages, level):
    key = (pages, level)
    if key not in _GFNS:
        g = np.arange(0, pages, 1 << (9 * (level - 1)), dtype=np.uint64)
        g.flags.writeable = False
        _GFNS[key] = (g, g + np.uint64(HOST))
    return _GFNS[key]


_POPULATED = {}


def populated(level, pages=BIG):
    """(tdp, bare) holding a guest of `pages` 4K pages at `level`.  Memoized
    (one size at a time: the previous ones are dropped)."""
    key = (level, pages)
    if key not in _POPULATED:
        for k in [k for k in _POPULATED if k[1] != pages]:
            del _POPULATED[k]
        g, p = gfns_for(pages, level)
        tdp = Tdp()
        tdp.map(g, level)
        s, _ = kvm_tdp_mmu_get_walk(tdp.a, tdp.root, g[:1])
        bare = BareRadixMap(leaf_bits=int(s[0]) & ~PFN_MASK & ~0x80)
        bare.map(g, p, level)
        _POPULATED[key] = (tdp, bare)
    return _POPULATED[key]


class Map:
    """TdpMmuCore.map of every gfn of the guest at 4K or 2M, one call, into a
    fresh root; BareRadixMap.map of the same gfns as the baseline."""
    params = ([1, 2], PAGES)
    param_names = ["level", "pages"]
    number = 1
    repeat = 3
    timeout = 300

    def setup(self, level, pages):
        self.g, self.p = gfns_for(pages, level)
        self.tdp = Tdp()
        self.bare = BareRadixMap()

    def time_map(self, level, pages):
        self.tdp.map(self.g, level)

    def peakmem_map(self, level, pages):
        self.tdp.map(self.g, level)

    def time_bare_map(self, level, pages):
        self.bare.map(self.g, self.p, level)

    def peakmem_bare_map(self, level, pages):
        self.bare.map(self.g, self.p, level)


class GetWalk:
    """kvm_tdp_mmu_get_walk of 1M random gfns of the guest (4K or 2M leaves),
    against BareRadixMap.walk."""
    params = ([1, 2], PAGES)
    param_names = ["level", "pages"]
    timeout = 300

    def setup(self, level, pages):
        self.tdp, self.bare = populated(level, pages)
        self.probe = np.random.default_rng(1234).integers(0, pages, WALK_N).astype(np.uint64)
        self.os = np.empty(WALK_N, np.uint64)
        self.ol = np.empty(WALK_N, np.int8)

    def time_get_walk(self, level, pages):
        kvm_tdp_mmu_get_walk(self.tdp.a, self.tdp.root, self.probe, out_spte=self.os,
                             out_level=self.ol)

    def peakmem_get_walk(self, level, pages):
        kvm_tdp_mmu_get_walk(self.tdp.a, self.tdp.root, self.probe)

    def time_bare_walk(self, level, pages):
        self.bare.walk(self.probe, out_spte=self.os, out_level=self.ol)


class ClearDirtyLog:
    """One dirty-log round over the guest's 4K leaves, all dirty:
    clear_dirty_log of a full bitmap plus the collect (popcount of the bitmap
    it returns), clear_bit_range of D over the range, and the baseline
    SpteFormat.clear_dirty_array over an array of the same SPTEs."""
    params = PAGES
    param_names = ["pages"]
    number = 1
    repeat = 5
    timeout = 300

    def setup(self, pages):
        self.tdp, _ = populated(1, pages)
        self.tdp.redirty()
        self.full = np.full(pages // 64, ~np.uint64(0), np.uint64)
        self.out = np.empty_like(self.full)
        cache = ClearDirtyLog.__dict__.get("_sptes", {})
        if pages not in cache:
            cache = {pages: kvm_tdp_mmu_get_walk(self.tdp.a, self.tdp.root,
                                                 np.arange(pages, dtype=np.uint64))[0]}
            ClearDirtyLog._sptes = cache
        self.work = cache[pages].copy()
        self.d = self.tdp.fmt.masks()["dirty_mask"]

    def time_clear_dirty_log(self, pages):
        self.tdp.t.clear_dirty_log(self.tdp.root, 0, self.full, out=self.out)
        int(np.bitwise_count(self.out).sum())

    def peakmem_clear_dirty_log(self, pages):
        self.tdp.t.clear_dirty_log(self.tdp.root, 0, self.full, out=self.out)

    def time_clear_bit_range(self, pages):
        self.tdp.t.clear_bit_range(self.tdp.root, 0, pages, self.d)

    def time_clear_dirty_array(self, pages):
        self.tdp.fmt.clear_dirty_array(self.work)


class Split:
    """Eager split of 64 GiB of 2M leaves to 4K (split_huge_pages): the
    kernel reports ~1.5 s for 96 GiB."""
    number = 1
    repeat = 3
    timeout = 300

    def setup(self):
        self.tdp = Tdp()
        self.tdp.map(gfns_for(BIG, 2)[0], 2)

    def time_split(self):
        self.tdp.t.split_huge_pages(self.tdp.root, 0, BIG, 1, self.tdp.pc, self.tdp.hc)

    def peakmem_split(self):
        self.tdp.t.split_huge_pages(self.tdp.root, 0, BIG, 1, self.tdp.pc, self.tdp.hc)


class ScalarMapOne:
    """4096 TdpMmuCore.map_one calls from Python on fresh 4K gfns (caches
    topped up before each, untimed work included: one topup per call)."""
    number = 1
    repeat = 5

    def setup(self):
        self.tdp = Tdp()

    def time_map_one(self):
        t = self.tdp
        one, root, pc, hc = t.t.map_one, t.root, t.pc, t.hc
        for g in range(SCALAR_OPS):
            pc.topup(5)
            hc.topup(5)
            one(root, g, HOST + g, 1, pc, hc, write=True)

    def peakmem_map_one(self):
        self.time_map_one()


class ScalarFault:
    """4096 TdpMmu.page_fault calls from Python (faultin included), one per
    fresh 4K gfn of a non-THP memslot of a VM; the issue's target is <= 3 us
    per fault."""
    number = 1
    repeat = 5
    timeout = 120

    def setup(self):
        from kvmmmu.host import HostConfig
        from kvmmmu.tdp_mmu import TdpMmu
        from kvmmmu.vm import VM
        self.vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), nr_vcpus=1)
        self.vm.add_memory(0, SCALAR_OPS * 4096, slot=0, thp=False, populate=True)
        self.t = self.vm.register_mmu(TdpMmu(self.vm))
        self.v = self.vm.vcpus[0]
        self.t.kvm_mmu_load(self.v)

    def time_page_fault(self):
        pf, v = self.t.page_fault, self.v
        for g in range(SCALAR_OPS):
            pf(v, g, write=True)

    def peakmem_page_fault(self):
        self.time_page_fault()


class Audit:
    """tdp_audit (the C walk behind TdpMmu.audit) over the 64 GiB guest at
    4K: every invariant, one memslot covering it."""
    timeout = 300

    def setup(self):
        from kvmmmu._core.tdp_audit import tdp_audit
        self.audit = tdp_audit
        self.tdp, _ = populated(1)
        self.slots = (np.zeros(1, np.uint64), np.full(1, BIG, np.uint64), np.full(1, 3, np.int8),
                      np.zeros(1, np.int8))
        self.roots = np.array([self.tdp.root], np.uint64)

    def time_tdp_audit(self):
        self.audit(self.tdp.a, self.roots, *self.slots)
