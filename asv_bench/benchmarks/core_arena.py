"""The page-table arena of the Cython core.

These benchmarks depend only on kvmmmu._core.pt_arena.

The arena is built for a 64 GiB guest mapped with 4 KiB pages: 32768 leaf
tables (16M SPTEs, 128 MiB), the size the core is tuned for; 64 tables
(32K SPTEs) keeps everything in cache and shows per-call overhead.  Both host
modes are measured: 64-bit hosts read an SPTE with one load, 32-bit hosts
with the clear_spte_count retry protocol of split SPTEs.

Conventions (see /work/shared/STYLE.md, "asv benchmarks"):

* ``setup`` builds the arena from ``np.random.default_rng(1234)`` and warms
  the operation once; built arenas are memoized per process.
* ``time_<op>`` / ``peakmem_<op>`` twins share one setup; scalar-vs-batch
  twins show what the batch API gains; ``BatchReadThreads`` shows how the
  nogil batch read scales with threads; ``track_bytes_per_table`` records
  the arena's memory per table (target: within 1.05 x of 4 KiB + header).
* Lockless reads under a concurrent writer (torn counts, retry rate) are
  measured by ``benchmarks/lockless_reads.py``, which needs the
  lockless_torture module.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvmmmu._core import pt_arena
from kvmmmu._core.spte import SpteFormat

#: Leaf tables: 64 (in cache) and 32768 (a 64 GiB guest with 4 KiB pages).
N_TABLES = [64, 32768]
#: Host word size: 32 (split SPTEs) or 64.
HOSTS = [32, 64]
#: Host pfns are drawn below this: 1 TiB of host memory.
PFN_RANGE = 1 << 28

_ARENAS = {}


def make_arena(host, n_tables):
    """(arena, sps, spteps): `n_tables` level-1 tables full of present leaf
    SPTEs, and every SPTE location in table order.  Memoized."""
    key = (host, n_tables)
    if key in _ARENAS:
        return _ARENAS[key]
    rng = np.random.default_rng(1234)
    fmt = SpteFormat.legacy(host_64bit=host == 64)
    a = pt_arena.PtArena(fmt, max_tables=max(1 << 16, 2 * n_tables))
    pc = pt_arena.MmuMemoryCache(a, "shadow_page")
    hc = pt_arena.MmuMemoryCache(a, "page_header")
    sps = []
    for _ in range(n_tables):
        pc.topup(1)
        hc.topup(1)
        sps.append(a.alloc_sp(pc, hc, role=1))
    pfns = rng.integers(0, PFN_RANGE, size=512, dtype=np.uint64)
    leaves = fmt.make_spte_array(pfns, level=1, pte_access=7)
    for sp in sps:
        a.spt(sp)[:] = leaves                  # setup only: no reader is running
    spteps = np.array([a.sp_sptep(sp, 0) for sp in sps], dtype=np.uint64)
    spteps = (spteps[:, None] + (np.arange(512, dtype=np.uint64) << np.uint64(3))[None, :]).ravel()
    _ARENAS[key] = (a, sps, spteps)
    return _ARENAS[key]


_ORDERS = {}


def spteps_in_order(host, n_tables, order):
    """Every SPTE location: in table order (a walk, a zap) or shuffled (an
    rmap-driven visit).  Memoized."""
    key = (host, n_tables, order)
    if key not in _ORDERS:
        spteps = make_arena(host, n_tables)[2]
        if order == "random":
            spteps = spteps.copy()
            np.random.default_rng(1234).shuffle(spteps)
        _ORDERS[key] = spteps
    return _ORDERS[key]


class BatchRead:
    """get_sptes_lockless over every SPTE of the arena."""
    params = (HOSTS, N_TABLES, ["sequential", "random"])
    param_names = ["host", "n_tables", "order"]
    timeout = 300

    def setup(self, host, n_tables, order):
        self.a = make_arena(host, n_tables)[0]
        self.spteps = spteps_in_order(host, n_tables, order)
        self.out = np.empty_like(self.spteps)
        self.a.get_sptes_lockless(self.spteps, self.out)

    def time_get_sptes_lockless(self, host, n_tables, order):
        self.a.get_sptes_lockless(self.spteps, self.out)

    def time_get_sptes_lockless_in_walk(self, host, n_tables, order):
        self.a.get_sptes_lockless(self.spteps, self.out, vcpu=0)

    def peakmem_get_sptes_lockless(self, host, n_tables, order):
        self.a.get_sptes_lockless(self.spteps)


class ScalarVsBatch:
    """4096 SPTE reads: one Python call each vs one batch call."""
    params = HOSTS
    param_names = ["host"]

    def setup(self, host):
        self.a = make_arena(host, 64)[0]
        self.spteps = spteps_in_order(host, 64, "random")[:4096].copy()
        self.list = [int(s) for s in self.spteps]

    def time_scalar(self, host):
        get = self.a.mmu_spte_get_lockless
        for s in self.list:
            get(s)

    def time_batch(self, host):
        self.a.get_sptes_lockless(self.spteps)


class BatchReadThreads:
    """The nogil batch read on 1 or 2 threads, each over half of the SPTEs
    of the 64 GiB arena (pandas gil.py pattern)."""
    params = (HOSTS, [1, 2])
    param_names = ["host", "threads"]

    timeout = 300

    def setup(self, host, threads):
        self.a, _, spteps = make_arena(host, 32768)
        self.parts = np.array_split(spteps, 2)
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.threads = threads

    def teardown(self, host, threads):
        self.pool.shutdown()

    def time_read(self, host, threads):
        if self.threads == 1:
            for p in self.parts:
                self.a.get_sptes_lockless(p)
        else:
            list(self.pool.map(self.a.get_sptes_lockless, self.parts))


class HelperCycle:
    """One leaf's life through the scalar helpers: set, write-protect
    (update), zap (clear_track_bits), for 512 SPTEs of one table."""
    params = HOSTS
    param_names = ["host"]
    number = 1

    def setup(self, host):
        fmt = SpteFormat.legacy(host_64bit=host == 64)
        self.a = pt_arena.PtArena(fmt, tables_per_chunk=8, max_tables=64)
        pc = pt_arena.MmuMemoryCache(self.a, "shadow_page")
        hc = pt_arena.MmuMemoryCache(self.a, "page_header")
        pc.topup(1)
        hc.topup(1)
        sp = self.a.alloc_sp(pc, hc, role=1)
        self.spteps = [self.a.sp_sptep(sp, i) for i in range(512)]
        self.leaf = fmt.make_spte(level=1, pte_access=7, pfn=0x1234)[0]
        self.ro = self.leaf & ~(2 | fmt.shadow_mmu_writable_mask)

    def time_set_update_clear(self, host):
        a, leaf, ro = self.a, self.leaf, self.ro
        for s in self.spteps:
            a.mmu_spte_set(s, leaf)
            a.mmu_spte_update(s, ro)
            a.mmu_spte_clear_track_bits(s)


class AllocZap:
    """Allocate 256 tables through the memory caches and free them: through
    kvm_mmu_commit_zap_page (flush, then free) or call_rcu + rcu_barrier."""
    params = (HOSTS, ["commit_zap", "rcu"])
    param_names = ["host", "free"]
    number = 1

    def setup(self, host, free):
        if free == "rcu" and host == 32:
            raise NotImplementedError("the TDP MMU (RCU frees) needs a 64-bit host")
        fmt = SpteFormat.legacy(host_64bit=host == 64)
        self.a = pt_arena.PtArena(fmt, tables_per_chunk=512, max_tables=1024)
        self.pc = pt_arena.MmuMemoryCache(self.a, "shadow_page")
        self.hc = pt_arena.MmuMemoryCache(self.a, "page_header")
        self._cycle(free)                      # warm: chunks exist, pages are on the free list

    def _cycle(self, free):
        a, pc, hc = self.a, self.pc, self.hc
        sps = []
        for _ in range(256):
            pc.topup(1)
            hc.topup(1)
            sps.append(a.alloc_sp(pc, hc, role=1 | pt_arena.PT_ROLE_INVALID))
        if free == "rcu":
            for sp in sps:
                a.call_rcu_free_sp(sp)
            a.rcu_barrier()
        else:
            a.kvm_mmu_commit_zap_page(sps)

    def time_alloc_free(self, host, free):
        self._cycle(free)

    def peakmem_alloc_free(self, host, free):
        self._cycle(free)


class ArenaMemory:
    """Memory of an arena holding `n_tables` tables."""
    params = N_TABLES
    param_names = ["n_tables"]
    timeout = 300

    def track_bytes_per_table(self, n_tables):
        a = pt_arena.PtArena(SpteFormat.legacy())
        a.grow(max(1, n_tables // a.tables_per_chunk))
        return a.bytes_per_table
    track_bytes_per_table.unit = "bytes"

    def peakmem_build(self, n_tables):
        make_arena(64, n_tables)
