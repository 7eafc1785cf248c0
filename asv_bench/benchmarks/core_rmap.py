"""rmap chains (pte_list_desc) of the Cython core.

These benchmarks depend only on kvmmmu._core.rmap.

Two shapes, both one million mappings (so a ``time_*`` result in ms is also
ns per operation):

* ``"1M x 1"``: 1M gfns with one mapping each -- every list is the inline
  single entry, the common case for guest RAM (8 bytes per gfn, the head word).
* ``"10k x 100"``: 10k gfns with 100 mappings each -- chains of 8 descriptors
  (10.32 bytes per mapping), e.g. a page shared by many shadow pages.

Mappings are added in one random order and removed in another
(``np.random.default_rng(1234)``).  ``benchmarks/compare_rmap.py`` times the
same workload against a plain C loop over the same structure.

Conventions (see /work/shared/STYLE.md, "asv benchmarks"): ``setup`` builds the
inputs (memoized per process) and a fresh pool/cache/slot, and warms the
allocator, so the timed body is only the operation.  Operations that change
the rmaps set ``number = 1`` so that asv re-runs ``setup`` before each sample.
``time_*``/``peakmem_*`` twins share a setup; scalar-vs-batch twins show what
the batch API gains; ``Threads`` shows how the nogil batch loops scale.
"""
import threading

import numpy as np

from kvmmmu._core import rmap

SCENARIOS = {"1M x 1": (1_000_000, 1), "10k x 100": (10_000, 100)}
BASE_GFN = 0x100000

#: Scalar benchmarks do this many operations (a Python loop over 1M calls
#: would dominate the suite's runtime without telling more).
SCALAR_OPS = 100_000

_inputs = {}


def inputs(name):
    """(add_gfns, add_sptes, rm_gfns, rm_sptes), read-only, memoized."""
    if name not in _inputs:
        n_gfns, per = SCENARIOS[name]
        rng = np.random.default_rng(1234)
        n = n_gfns * per
        gfns = BASE_GFN + np.repeat(np.arange(n_gfns, dtype=np.uint64), per)
        k = np.arange(n, dtype=np.uint64)
        sptes = ((np.uint64(0x200000) + k // np.uint64(512)) << np.uint64(12)) | \
            ((k % np.uint64(512)) << np.uint64(3))
        a, r = rng.permutation(n), rng.permutation(n)
        arrays = (gfns[a], sptes[a], gfns[r], sptes[r])
        for x in arrays:
            x.flags.writeable = False
        _inputs[name] = arrays
    return _inputs[name]


def fresh(name, populated):
    n_gfns, _ = SCENARIOS[name]
    pool = rmap.PteListDescPool()
    cache = rmap.PteListDescCache(pool)
    slot = rmap.RmapSlot(BASE_GFN, n_gfns, pool)
    if populated:
        g, s, _, _ = inputs(name)
        rmap.rmap_add_batch(cache, slot, g, s)
    return pool, cache, slot


class AddBatch:
    """rmap_add_batch: one nogil call for all 1M (gfn, sptep) pairs."""
    params = list(SCENARIOS)
    param_names = ["shape"]
    number = 1
    repeat = 5
    timeout = 120

    def setup(self, name):
        self.g, self.s, _, _ = inputs(name)
        self.out = np.zeros(len(self.g), np.uint32)
        # Warm the pool: populate and drain once, so chunks exist.
        self.pool, self.cache, self.slot = fresh(name, populated=True)
        _, _, rg, rs = inputs(name)
        rmap.rmap_remove_batch(self.slot, rg, rs)

    def time_add(self, name):
        rmap.rmap_add_batch(self.cache, self.slot, self.g, self.s, out=self.out)

    def peakmem_add(self, name):
        rmap.rmap_add_batch(self.cache, self.slot, self.g, self.s, out=self.out)


class RemoveBatch:
    """rmap_remove_batch over the populated slot, another random order."""
    params = list(SCENARIOS)
    param_names = ["shape"]
    number = 1
    repeat = 5
    timeout = 120

    def setup(self, name):
        _, _, self.g, self.s = inputs(name)
        self.pool, self.cache, self.slot = fresh(name, populated=True)

    def time_remove(self, name):
        rmap.rmap_remove_batch(self.slot, self.g, self.s)


class CountBatch:
    """rmap_count_batch: O(1) counts (head word, or head descriptor counts)."""
    params = list(SCENARIOS)
    param_names = ["shape"]

    def setup(self, name):
        _, _, self.g, _ = inputs(name)
        self.pool, self.cache, self.slot = fresh(name, populated=True)
        self.out = np.zeros(len(self.g), np.uint32)

    def time_count(self, name):
        rmap.rmap_count_batch(self.slot, self.g, out=self.out)


class Scalar:
    """One Python call per operation, SCALAR_OPS operations (compare with the
    batch classes per operation: divide by SCALAR_OPS, not 1M)."""
    params = list(SCENARIOS)
    param_names = ["shape"]
    number = 1
    repeat = 5
    timeout = 120

    def setup(self, name):
        g, s, rg, rs = inputs(name)
        self.add_pairs = list(zip(g[:SCALAR_OPS].tolist(), s[:SCALAR_OPS].tolist()))
        keep = set(self.add_pairs)
        self.rm_pairs = [p for p in zip(rg.tolist(), rs.tolist()) if p in keep]
        self.pool, self.cache, self.slot = fresh(name, populated=False)
        self.populated = fresh(name, populated=False)
        pool, cache, slot = self.populated
        for i in range(0, SCALAR_OPS, 40):
            cache.topup(40)
            for gfn, sptep in self.add_pairs[i:i + 40]:
                rmap.rmap_add(cache, slot, gfn, sptep)

    def time_add(self, name):
        add, topup, cache, slot, pairs = rmap.rmap_add, self.cache.topup, self.cache, self.slot, self.add_pairs
        for i in range(0, SCALAR_OPS, 40):
            topup(40)                       # the fault's topup, once per 40 adds
            for gfn, sptep in pairs[i:i + 40]:
                add(cache, slot, gfn, sptep)

    def time_remove(self, name):
        remove, (_, _, slot) = rmap.rmap_remove, self.populated
        for gfn, sptep in self.rm_pairs:
            remove(slot, gfn, sptep)


class Memory:
    """Bytes per mapping: 4K-level heads plus live descriptors (the kernel's
    figures: 8 at one mapping per gfn, 8 + ceil(100/14)*128/100 = 10.32 at 100)."""
    params = list(SCENARIOS)
    param_names = ["shape"]
    unit = "bytes"

    def setup(self, name):
        self.pool, self.cache, self.slot = fresh(name, populated=True)

    def track_bytes_per_mapping(self, name):
        n = len(inputs(name)[0])
        live = self.pool.nr_active - self.cache.nobjs
        return (self.slot.rmap[0].nbytes + live * rmap.SIZEOF_PTE_LIST_DESC) / n


class Threads:
    """rmap_add_batch then rmap_remove_batch, one slot and one vCPU cache per
    thread, one shared descriptor pool (the kmem cache): how the nogil loops
    scale.  Each thread handles the whole 1M-mapping shape."""
    params = (list(SCENARIOS), [1, 2])
    param_names = ["shape", "threads"]
    number = 1
    repeat = 3
    timeout = 180

    def setup(self, name, threads):
        self.g, self.s, self.rg, self.rs = inputs(name)
        n_gfns, _ = SCENARIOS[name]
        self.pool = rmap.PteListDescPool()
        self.work = [(rmap.PteListDescCache(self.pool), rmap.RmapSlot(BASE_GFN, n_gfns, self.pool))
                     for _ in range(threads)]

    def _run(self, cache, slot):
        rmap.rmap_add_batch(cache, slot, self.g, self.s)
        rmap.rmap_remove_batch(slot, self.rg, self.rs)

    def time_add_remove(self, name, threads):
        ts = [threading.Thread(target=self._run, args=w) for w in self.work]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
