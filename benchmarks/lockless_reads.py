#!/usr/bin/env python
"""Lockless SPTE reads on real threads: torn values, throughput, retries, memory.

Runs kvmmmu._core.lockless_torture for both host modes and prints:

* torn values over `--reads` (default 1e8) lockless reads per run, with a
  writer cycling the same SPTEs present -> non-present -> present, and the
  same count for the naive two-half read on a 32-bit host;
* lockless read throughput in both modes, with and without the writer, and
  the retry rate of the 32-bit protocol under that contention;
* use-after-free counts of the walk-vs-zapper torture with and without the
  protocol (shadow MMU flush wait, TDP MMU RCU);
* arena bytes per table against the 1.05 x (4 KiB + header) target.

Usage: python benchmarks/lockless_reads.py [--reads N] [--walks N]
"""
import argparse
import os
import platform
import sys
import time

from kvmmmu._core.lockless_torture import lockless_walk_torture, spte_torture
from kvmmmu._core.pt_arena import HEADER_DTYPE, PtArena
from kvmmmu._core.spte import SpteFormat


def fmt_rate(x):
    return f"{x / 1e6:8.1f} M/s"


def reads_section(n_reads):
    print(f"\n== lockless reads: {n_reads:.0e} reads per run, 1 writer + 1 reader thread ==")
    print(f"{'host':>5} {'read':>8} {'sptes':>5} {'writer':>6} {'torn':>8} {'np-mix':>8} "
          f"{'retries':>9} {'retry rate':>10} {'throughput':>12} {'writes':>10}")
    rows = []
    for host_64bit in (False, True):
        a = PtArena(SpteFormat.legacy(host_64bit=host_64bit))
        runs = [("lockless", 1, True), ("lockless", 4, True), ("lockless", 4, False)]
        if not host_64bit:
            runs.append(("naive", 1, True))
        for read, n_sptes, writer in runs:
            r = spte_torture(a, n_reads, read=read, n_sptes=n_sptes,
                             n_tables=min(2, n_sptes), writer=writer)
            rows.append(r)
            print(f"{'64' if host_64bit else '32':>5} {read:>8} {n_sptes:>5} "
                  f"{'yes' if writer else 'no':>6} {r['torn']:>8} {r['nonpresent_mixes']:>8} "
                  f"{r['retries']:>9} {r['retry_rate']:>10.2e} "
                  f"{fmt_rate(r['reads_per_second']):>12} {r['writes']:>10}")
            assert r["writer_errors"] == 0
        a.audit()
    bad = [r for r in rows if r["read"] == "lockless" and r["torn"]]
    print("protocol reads torn:", sum(r["torn"] for r in bad), "(must be 0)")
    return not bad


def walks_section(n_walks):
    print(f"\n== lockless walks vs a zapper: {n_walks:.0e} walks per run ==")
    print(f"{'host':>5} {'scheme':>7} {'protocol':>9} {'uaf':>8} {'uaf walks':>9} {'zaps':>8} "
          f"{'IPIs waited':>11} {'GPs':>7} {'walks/s':>12}")
    ok = True
    for host_64bit, scheme in ((False, "shadow"), (True, "shadow"), (True, "tdp")):
        a = PtArena(SpteFormat.ept() if host_64bit else SpteFormat.legacy(host_64bit=False),
                    nr_vcpus=2)
        for protect in (True, False):
            r = lockless_walk_torture(a, n_walks, scheme=scheme, protect=protect)
            print(f"{'64' if host_64bit else '32':>5} {scheme:>7} {'yes' if protect else 'NO':>9} "
                  f"{r['uaf']:>8} {r['uaf_walks']:>9} {r['zaps']:>8} {r['flush_ipis_waited']:>11} "
                  f"{r['rcu_gps']:>7} {fmt_rate(r['walks'] / r['seconds']):>12}")
            ok &= not (protect and r["uaf"])
        a.audit()
    return ok


def memory_section():
    target = 4096 + HEADER_DTYPE.itemsize
    print(f"\n== arena memory per table (target <= 1.05 x {target} = {1.05 * target:.0f} B) ==")
    print(f"{'tables':>8} {'chunks':>7} {'bytes/table':>12} {'x (4 KiB + header)':>19}")
    ok = True
    for chunks in (1, 8, 64):           # 64 chunks = 32768 tables: a 64 GiB guest's leaf tables
        a = PtArena(SpteFormat.legacy())
        a.grow(chunks)
        ratio = a.bytes_per_table / target
        ok &= ratio <= 1.05
        print(f"{a.capacity:>8} {a.n_chunks:>7} {a.bytes_per_table:>12.1f} {ratio:>19.4f}")
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reads", type=float, default=1e8)
    p.add_argument("--walks", type=float, default=1e6)
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    print(f"kvmmmu lockless reads benchmark: {platform.processor() or platform.machine()}, "
          f"CPUs usable: {cpus}, Python {platform.python_version()}")
    t0 = time.perf_counter()
    ok = reads_section(int(args.reads))
    ok &= walks_section(int(args.walks))
    ok &= memory_section()
    print(f"\ndone in {time.perf_counter() - t0:.1f} s: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
