#!/usr/bin/env python3
"""kvmmmu._core.rmap against a plain C loop over the same structure.

Builds a small C baseline on the fly (cc -O3, loaded with ctypes): the same
rmap heads (a calloc'd uint64 array), the same 128-byte ``pte_list_desc``
(``rmap_defs.h``), a chunked descriptor pool with a free list, and the
kernel's add / remove algorithms in a bare loop, once with the v6.15 bit lock
(cmpxchg-acquire + release store, as the kernel and kvmmmu do) and once
without (the pre-v6.15 code under mmu_lock).  Then times kvmmmu's batch calls
(one nogil loop) and scalar calls (one Python call per operation) on the same
(gfn, sptep) pairs, added in one random order and removed in another.

Scenarios (the issue's): 1M gfns x 1 mapping, 10k gfns x 100 mappings.

Prints ns per operation, ratios to the C loops, and bytes per mapping (rmap
heads of the 4K level plus live descriptors; all levels in brackets).

    python benchmarks/compare_rmap.py [--repeat 5] [--scalar-ops 200000]
"""
import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kvmmmu._core import rmap  # noqa: E402

CORE = os.path.join(os.path.dirname(HERE), "kvmmmu", "_core")

BASELINE_C = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "rmap_defs.h"

/* Plain C reference: the kernel's pte_list_add / pte_list_remove on one
 * array of heads, descriptors from a chunked pool with a LIFO free list. */

struct pool {
	struct pte_list_desc **chunks;
	size_t nr_chunks, cap, used, per_chunk;
	struct pte_list_desc *free_list;
	long active;
};

static struct pte_list_desc *pool_alloc(struct pool *p)
{
	struct pte_list_desc *d;
	if (p->free_list) {
		d = p->free_list;
		p->free_list = d->more;
	} else {
		if (!p->nr_chunks || p->used == p->per_chunk) {
			if (p->nr_chunks == p->cap) {
				p->cap = p->cap ? 2 * p->cap : 16;
				p->chunks = realloc(p->chunks, p->cap * sizeof(*p->chunks));
			}
			p->chunks[p->nr_chunks++] = aligned_alloc(64, p->per_chunk * sizeof(*d));
			p->used = 0;
		}
		d = &p->chunks[p->nr_chunks - 1][p->used++];
	}
	memset(d, 0, sizeof(*d));
	p->active++;
	return d;
}

static void pool_free(struct pool *p, struct pte_list_desc *d)
{
	d->more = p->free_list;
	p->free_list = d;
	p->active--;
}

static inline uint64_t lock_head(uint64_t *h, int locked)
{
	uint64_t old = __atomic_load_n(h, __ATOMIC_RELAXED);
	if (!locked || !old)
		return old;
	for (;;) {
		while (old & KVM_RMAP_LOCKED) {
			__builtin_ia32_pause();
			old = __atomic_load_n(h, __ATOMIC_RELAXED);
		}
		if (!old)
			return 0;
		if (__atomic_compare_exchange_n(h, &old, old | KVM_RMAP_LOCKED, 0,
						__ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
			return old;
	}
}

static inline void unlock_head(uint64_t *h, uint64_t v, int locked)
{
	if (locked)
		__atomic_store_n(h, v, __ATOMIC_RELEASE);
	else
		*h = v;
}

static void add_one(struct pool *p, uint64_t *h, uint64_t spte, int locked)
{
	uint64_t v = lock_head(h, locked);
	struct pte_list_desc *d, *n;
	if (!v) {
		v = spte;
	} else if (!(v & KVM_RMAP_MANY)) {
		d = pool_alloc(p);
		d->sptes[0] = v;
		d->sptes[1] = spte;
		d->spte_count = 2;
		v = (uint64_t)(uintptr_t)d | KVM_RMAP_MANY;
	} else {
		d = (struct pte_list_desc *)(uintptr_t)(v & ~KVM_RMAP_FLAGS);
		if (d->spte_count == PTE_LIST_EXT) {
			n = pool_alloc(p);
			n->more = d;
			n->tail_count = d->tail_count + d->spte_count;
			d = n;
			v = (uint64_t)(uintptr_t)d | KVM_RMAP_MANY;
		}
		d->sptes[d->spte_count++] = spte;
	}
	unlock_head(h, v, locked);
}

static int remove_one(struct pool *p, uint64_t *h, uint64_t spte, int locked)
{
	uint64_t v = lock_head(h, locked);
	struct pte_list_desc *d, *head;
	int i, j;
	if (!(v & KVM_RMAP_MANY)) {
		if (v != spte) {
			unlock_head(h, v, locked);
			return -1;
		}
		unlock_head(h, 0, locked);
		return 0;
	}
	head = (struct pte_list_desc *)(uintptr_t)(v & ~KVM_RMAP_FLAGS);
	for (d = head; d; d = d->more) {
		for (i = 0; i < (int)d->spte_count; i++) {
			if (d->sptes[i] != spte)
				continue;
			j = head->spte_count - 1;
			d->sptes[i] = head->sptes[j];
			head->sptes[j] = 0;
			if (--head->spte_count == 0) {
				v = head->more ? ((uint64_t)(uintptr_t)head->more | KVM_RMAP_MANY) : 0;
				pool_free(p, head);
			}
			unlock_head(h, v, locked);
			return 0;
		}
	}
	unlock_head(h, v, locked);
	return -1;
}

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* out[0] = add ns, out[1] = remove ns, out[2] = descriptors live after adds,
 * out[3] = failed removes (must be 0). */
void baseline(const uint64_t *add_gfns, const uint64_t *add_sptes,
	      const uint64_t *rm_gfns, const uint64_t *rm_sptes, long n,
	      uint64_t base_gfn, long nheads, int locked, double *out)
{
	struct pool p = { .per_chunk = 512 };
	uint64_t *heads = calloc(nheads, sizeof(uint64_t));
	long i, bad = 0;
	double t0, t1, t2;

	/* Fault the heads in before timing, as the kvmmmu side does: page
	 * faults on fresh memory are host noise, not rmap cost. */
	memset(heads, 0, nheads * sizeof(uint64_t));

	t0 = now_ns();
	for (i = 0; i < n; i++)
		add_one(&p, &heads[add_gfns[i] - base_gfn], add_sptes[i], locked);
	t1 = now_ns();
	out[2] = p.active;
	for (i = 0; i < n; i++)
		bad += remove_one(&p, &heads[rm_gfns[i] - base_gfn], rm_sptes[i], locked) != 0;
	t2 = now_ns();
	out[0] = t1 - t0;
	out[1] = t2 - t1;
	out[3] = bad;
	for (i = 0; i < (long)p.nr_chunks; i++)
		free(p.chunks[i]);
	free(p.chunks);
	free(heads);
}
"""


def build_baseline(tmp):
    src = os.path.join(tmp, "rmap_baseline.c")
    lib = os.path.join(tmp, "rmap_baseline.so")
    with open(src, "w") as f:
        f.write(BASELINE_C)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O3", "-std=gnu11", "-fPIC", "-shared", "-I", CORE, src, "-o", lib], check=True)
    so = ctypes.CDLL(lib)
    p = ctypes.c_void_p
    so.baseline.argtypes = [p, p, p, p, ctypes.c_long, ctypes.c_uint64, ctypes.c_long, ctypes.c_int, p]
    so.baseline.restype = None
    return so


def scenario(n_gfns, per_gfn, seed=1234):
    """(gfn, sptep) pairs in a random add order and another random remove order."""
    rng = np.random.default_rng(seed)
    base_gfn = 0x100000
    n = n_gfns * per_gfn
    gfns = base_gfn + np.repeat(np.arange(n_gfns, dtype=np.uint64), per_gfn)
    k = np.arange(n, dtype=np.uint64)
    sptes = ((np.uint64(0x200000) + k // np.uint64(512)) << np.uint64(12)) | ((k % np.uint64(512)) << np.uint64(3))
    a = rng.permutation(n)
    r = rng.permutation(n)
    return base_gfn, (gfns[a].copy(), sptes[a].copy()), (gfns[r].copy(), sptes[r].copy())


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def time_baseline(so, base_gfn, n_gfns, add, rm, locked, repeat):
    out = np.zeros(4)
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        so.baseline(ptr(add[0]), ptr(add[1]), ptr(rm[0]), ptr(rm[1]), len(add[0]), base_gfn,
                    n_gfns, locked, ptr(out))
        assert out[3] == 0, "baseline failed to remove"
        best = [min(best[0], out[0]), min(best[1], out[1])]
    n = len(add[0])
    return best[0] / n, best[1] / n, out[2]


def time_batch(base_gfn, n_gfns, add, rm, repeat):
    best = [float("inf"), float("inf")]
    mem = None
    counts = np.empty(len(add[0]), np.uint32)
    first = np.unique(add[0], return_index=True)[1]
    warm = (add[0][first].copy(), add[1][first].copy())
    for _ in range(repeat):
        pool = rmap.PteListDescPool()
        cache = rmap.PteListDescCache(pool)
        slot = rmap.RmapSlot(base_gfn, n_gfns, pool)
        # Fault the heads in before timing, as the C loop does: first-touch
        # page faults are host noise, not rmap cost.  One entry per gfn, so
        # no descriptor is allocated (their layout stays that of a fresh pool).
        rmap.rmap_add_batch(cache, slot, warm[0], warm[1])
        rmap.rmap_remove_batch(slot, warm[0], warm[1])
        t0 = time.perf_counter_ns()
        rmap.rmap_add_batch(cache, slot, add[0], add[1], out=counts)
        t1 = time.perf_counter_ns()
        live = pool.nr_active - cache.nobjs
        mem = (slot.rmap[0].nbytes + live * rmap.SIZEOF_PTE_LIST_DESC, slot.nbytes + live * rmap.SIZEOF_PTE_LIST_DESC)
        t2 = time.perf_counter_ns()
        rmap.rmap_remove_batch(slot, rm[0], rm[1])
        t3 = time.perf_counter_ns()
        assert pool.nr_active == cache.nobjs
        best = [min(best[0], t1 - t0), min(best[1], t3 - t2)]
    n = len(add[0])
    return best[0] / n, best[1] / n, mem


def time_scalar(base_gfn, n_gfns, add, rm, ops):
    """Python loop, one rmap_add / rmap_remove call per operation (a fault
    would top the cache up; here once per 40 adds, enough for 40 adds).
    Also times rmap_count over the same random gfns once they are populated:
    one Python call plus one random head read, the floor for any scalar call
    on a structure this size."""
    ops = min(ops, len(add[0]))
    pool = rmap.PteListDescPool()
    cache = rmap.PteListDescCache(pool)
    slot = rmap.RmapSlot(base_gfn, n_gfns, pool)
    g_add, s_add = add[0][:ops].tolist(), add[1][:ops].tolist()
    keep = set(zip(g_add, s_add))
    pairs_rm = [(g, s) for g, s in zip(rm[0].tolist(), rm[1].tolist()) if (g, s) in keep]
    add_fn, rm_fn, count_fn, topup = rmap.rmap_add, rmap.rmap_remove, rmap.rmap_count, cache.topup
    t0 = time.perf_counter_ns()
    for i in range(0, ops, 40):
        topup(40)
        for g, s in zip(g_add[i:i + 40], s_add[i:i + 40]):
            add_fn(cache, slot, g, s)
    t1 = time.perf_counter_ns()
    for g, s in pairs_rm:
        count_fn(slot, g)
    t2 = time.perf_counter_ns()
    for g, s in pairs_rm:
        rm_fn(slot, g, s)
    t3 = time.perf_counter_ns()
    return (t1 - t0) / ops, (t3 - t2) / ops, (t2 - t1) / ops


def time_scalar_hot(ops):
    """Scalar add + remove on 4096 gfns (32 KiB of heads, cache-resident):
    the call overhead without memory latency."""
    pool = rmap.PteListDescPool()
    cache = rmap.PteListDescCache(pool)
    slot = rmap.RmapSlot(0, 4096, pool)
    gfns = [i % 4096 for i in range(ops)]
    sptes = [8 * (i + 1) for i in range(ops)]
    add_fn, rm_fn = rmap.rmap_add, rmap.rmap_remove
    best_add = best_rm = float("inf")
    for _ in range(3):
        t_add = t_rm = 0
        for i in range(0, ops, 4096):        # one mapping per gfn at a time
            g_i, s_i = gfns[i:i + 4096], sptes[i:i + 4096]
            t0 = time.perf_counter_ns()
            for g, s in zip(g_i, s_i):
                add_fn(cache, slot, g, s)
            t1 = time.perf_counter_ns()
            for g, s in zip(g_i, s_i):
                rm_fn(slot, g, s)
            t2 = time.perf_counter_ns()
            t_add += t1 - t0
            t_rm += t2 - t1
        best_add, best_rm = min(best_add, t_add), min(best_rm, t_rm)
    return best_add / ops, best_rm / ops


def python_call_cost(ops):
    """A no-op Python function called with the same arguments: the cost the
    issue calls 'one Python call'."""
    def noop(cache, slot, g, s):
        return 0
    gfns = list(range(ops))
    sptes = [8 * (i + 1) for i in range(ops)]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        for g, s in zip(gfns, sptes):
            noop(None, None, g, s)
        best = min(best, time.perf_counter_ns() - t0)
    return best / ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scalar-ops", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        so = build_baseline(tmp)
        call = python_call_cost(args.scalar_ops)
        hot_add, hot_rm = time_scalar_hot(args.scalar_ops)
        print(f"one Python call (no-op def, 4 args, same loop): {call:.0f} ns")
        print(f"scalar, cache-hot heads (4096 gfns): rmap_add {hot_add:.0f} ns, rmap_remove {hot_rm:.0f} ns"
              f"  ({hot_add / call:.2f} / {hot_rm / call:.2f} Python calls)")
        for n_gfns, per in ((1_000_000, 1), (10_000, 100)):
            base, add, rm = scenario(n_gfns, per)
            n = len(add[0])
            c_add, c_rm, c_desc = time_baseline(so, base, n_gfns, add, rm, 1, args.repeat)
            p_add, p_rm, _ = time_baseline(so, base, n_gfns, add, rm, 0, args.repeat)
            b_add, b_rm, (mem4k, memall) = time_batch(base, n_gfns, add, rm, args.repeat)
            s_add, s_rm, s_count = time_scalar(base, n_gfns, add, rm, args.scalar_ops)
            c_mem = n_gfns * 8 + c_desc * 128
            print(f"\n{n_gfns} gfns x {per} mapping(s) = {n} mappings, random add order, random remove order")
            print(f"  {'':28s} {'add ns/op':>10s} {'remove ns/op':>13s}")
            print(f"  {'C loop, bit lock (v6.15+)':28s} {c_add:10.1f} {c_rm:13.1f}")
            print(f"  {'C loop, no lock (pre-6.15)':28s} {p_add:10.1f} {p_rm:13.1f}")
            print(f"  {'kvmmmu batch (nogil)':28s} {b_add:10.1f} {b_rm:13.1f}"
                  f"   x{b_add / c_add:.2f} / x{b_rm / c_rm:.2f} of the locked C loop")
            print(f"  {'kvmmmu scalar (Python loop)':28s} {s_add:10.1f} {s_rm:13.1f}"
                  f"   floor: rmap_count on the same gfns {s_count:.1f}")
            print(f"  bytes per mapping: {mem4k / n:.2f} (4K heads + descriptors; all levels {memall / n:.2f});"
                  f" C loop {c_mem / n:.2f}")


if __name__ == "__main__":
    main()
