#!/usr/bin/env python3
"""Threads scaling of the TDP MMU's read-lock map path (issue 11).

In the kernel, TDP MMU faults hold ``mmu_lock`` for read, so the vCPUs of one
VM map in parallel.  ``TdpMmuCore.map`` is that path: it takes the arena's
shared side and runs without the GIL, each thread with its own vCPU's
caches.  This script maps one guest through one root with 1 and 2 threads
(this box has 2 cores, shared with others: the figures are noisy, best of N):

* **disjoint**: the gfns are cut in one contiguous half per thread (two
  vCPUs faulting different memory: scaling);
* **same gfns**: every thread maps the whole set, thread t starting at
  offset t/N of it (two vCPUs faulting the same memory: each gfn is mapped
  once and found present the other times; contention on the tables);

and prints the wall time per gfn mapped, the speedup against 1 thread, and,
with ``--before PATH`` (a kvmmmu tree built before the shared side existed,
e.g. the parent commit's work tree), the single-thread map of that tree
measured in a subprocess of the same run.  A bare C radix map of the same
gfns (``BareRadixMap``) is the floor.  Prints, never asserts.

    python benchmarks/compare_tdp_threads.py [--quick] [--repeat 5] [--before ../main]
"""
import argparse
import os
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# --tree PATH (the worker mode of --before): import kvmmmu from that tree
TREE = sys.argv[sys.argv.index("--tree") + 1] if "--tree" in sys.argv else os.path.dirname(HERE)
sys.path.insert(0, os.path.abspath(TREE))

from kvmmmu._core.pt_arena import MmuMemoryCache, PtArena  # noqa: E402
from kvmmmu._core.role import KvmMmuPageRole  # noqa: E402
from kvmmmu._core.spte import SpteFormat  # noqa: E402
from kvmmmu._core.tdp_bench import BareRadixMap  # noqa: E402
from kvmmmu._core.tdp_mmu import TdpMmuCore  # noqa: E402

HOST = 1 << 24                      # gfn g is backed by pfn HOST + g


class Guest:
    """An arena with room for `n` gfns at `level`, one root, a cache pair
    per vCPU thread."""

    def __init__(self, n, level, nthreads):
        fmt = SpteFormat.ept()
        tables = (n >> (9 * level)) + (n >> 18) + 64
        self.a = PtArena(fmt, nr_vcpus=nthreads, max_tables=-(-2 * tables // 512) * 512)
        self.caches = [(MmuMemoryCache(self.a, "shadow_page"), MmuMemoryCache(self.a, "page_header"))
                       for _ in range(nthreads)]
        pc, hc = self.caches[0]
        pc.topup(1)
        hc.topup(1)
        role = KvmMmuPageRole(level=4, direct=1, access=7, ad_disabled=0).word
        self.root = self.a.alloc_sp(pc, hc, role=role, gfn=0, tdp_mmu_page=True)
        self.t = TdpMmuCore(self.a)
        # grow up front so the timed maps do not (growth takes the GIL)
        more = -(-tables // self.a.tables_per_chunk) - self.a.n_chunks
        if more > 0:
            self.a.grow(more)


def run(n, level, nthreads, mode, warm):
    """Wall-clock ns of mapping `n` gfns at `level` with `nthreads` threads
    (`warm`: the tables were mapped, zapped and freed once before, so no
    first-touch page fault of the host is timed)."""
    gfns = np.arange(n, dtype=np.uint64) << np.uint64(9 * (level - 1))
    g = Guest(n << (9 * (level - 1)), level, nthreads)
    if warm:
        pc, hc = g.caches[0]
        g.t.map(g.root, gfns, gfns + np.uint64(HOST), level, pc, hc, write=True)
        g.t.zap_root(g.root)
        g.a.rcu_barrier()
    if mode == "disjoint":
        parts = np.array_split(gfns, nthreads)
    else:
        parts = [np.roll(gfns, -(k * n) // nthreads) for k in range(nthreads)]
    parts = [(p, p + np.uint64(HOST)) for p in parts]
    barrier = threading.Barrier(nthreads + 1)
    errors, retries = [], [0] * nthreads

    def body(k):
        pc, hc = g.caches[k]
        gg, pp = parts[k]
        barrier.wait()
        try:
            r = g.t.map(g.root, gg, pp, level, pc, hc, write=True)
            while (r == 1).any():                     # RET_PF_RETRY: a lost race, fault again
                retry = r == 1
                retries[k] += int(retry.sum())
                gg, pp = gg[retry], pp[retry]
                r = g.t.map(g.root, gg, pp, level, pc, hc, write=True)
            if not np.isin(r, (5, 6)).all():       # FIXED or SPURIOUS
                errors.append(f"thread {k}: codes {np.unique(r)}")
        except Exception as e:                       # noqa: BLE001 - printed
            errors.append(repr(e))

    ths = [threading.Thread(target=body, args=(k,)) for k in range(nthreads)]
    for th in ths:
        th.start()
    barrier.wait()
    t0 = time.perf_counter_ns()
    for th in ths:
        th.join()
    dt = time.perf_counter_ns() - t0
    if errors:
        raise RuntimeError("; ".join(errors))
    assert g.a.page_stats[("pages_4k", "pages_2m", "pages_1g")[level - 1]] == n
    return dt


def best(fn, repeat):
    return min(fn() for _ in range(repeat))


def bare(n, level, repeat, warm):
    gfns = np.arange(n, dtype=np.uint64) << np.uint64(9 * (level - 1))

    def once():
        b = BareRadixMap()
        if warm:                    # its tables cannot be reused: touch the memory first
            BareRadixMap().map(gfns, gfns + np.uint64(HOST), level)
        t0 = time.perf_counter_ns()
        b.map(gfns, gfns + np.uint64(HOST), level)
        return time.perf_counter_ns() - t0
    return best(once, repeat)


def one_thread_in(tree, n, level, repeat, warm):
    """The 1-thread disjoint figure of `tree`'s kvmmmu, measured by this
    script in a fresh interpreter (the same code path for both trees; a
    long-lived process measures differently)."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--tree", os.path.abspath(tree),
                        "--worker", str(n), str(level), str(repeat), "1" if warm else "0"],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": os.path.abspath(tree)})
    if r.returncode:
        return None, (r.stderr.strip().splitlines() or ["failed"])[-1]
    return int(r.stdout.split()[-1]), None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--repeat", type=int, default=5, help="best of N per figure")
    ap.add_argument("--threads", type=int, default=2, help="most threads (default 2: the box's cores)")
    ap.add_argument("--cold", action="store_true",
                    help="time the first touch of the arena's memory too (default: warm)")
    ap.add_argument("--before", metavar="PATH",
                    help="a kvmmmu tree before the change: its 1-thread map, same run")
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=4, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import kvmmmu
        assert os.path.abspath(kvmmmu.__file__).startswith(os.path.abspath(TREE)), kvmmmu.__file__
        n, level, repeat, warm = args.worker
        print(best(lambda: run(n, level, 1, "disjoint", bool(warm)), repeat))
        return
    n4k = 1 << (20 if args.quick else 22)
    n2m = 1 << (11 if args.quick else 17)
    print(f"TDP MMU map under mmu_lock for read: threads scaling (best of {args.repeat}; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"{'cold arena' if args.cold else 'warm arena: tables mapped, zapped and freed once before'})")
    for level, n in ((1, n4k), (2, n2m)):
        size = n << (9 * (level - 1))
        print(f"\n{'4K' if level == 1 else '2M'} leaves: {n} gfns = {size * 4096 >> 30} GiB, one root")
        b = bare(n, level, args.repeat, not args.cold)
        print(f"  BareRadixMap.map (1 thread, floor)       {b / n:7.1f} ns/gfn")
        if args.before:
            ns, err = one_thread_in(args.before, n, level, args.repeat, not args.cold)
            now, err2 = one_thread_in(TREE, n, level, args.repeat, not args.cold)
            if ns is None or now is None:
                print(f"  before (--before {args.before}): {err or err2}")
            else:
                print(f"  1 thread, fresh interpreter: before {ns / n:5.1f} ns/gfn, after "
                      f"{now / n:5.1f} ns/gfn: x{now / ns:.2f}")
        one = {}
        for mode in ("disjoint", "same gfns"):
            for k in range(1, args.threads + 1):
                dt = best(lambda: run(n, level, k, mode, not args.cold), args.repeat)
                if k == 1:
                    one[mode] = dt
                gfns_mapped = n if mode == "disjoint" else n * k
                extra = ""
                print(f"  {mode:9s} {k} thread{'s' if k > 1 else ' '}  {dt / n:7.1f} ns per distinct gfn"
                      f"  ({dt / gfns_mapped:6.1f} ns per map call entry)  "
                      f"speedup x{one[mode] / dt:.2f} vs 1 thread  x{dt / b:.2f} of bare{extra}")


if __name__ == "__main__":
    main()
