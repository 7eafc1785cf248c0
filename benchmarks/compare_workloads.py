#!/usr/bin/env python3
"""Issue 14's speed figures, each next to a baseline measured in the same run:

* the 64 GiB dirty-log workload on the TDP MMU end to end (dirty_log_perf_test:
  populate + 3 passes, 4 vCPUs, 4K and THP backing), per phase, against the same
  workload through the guest CPU's scalar reference on a 1/64 slice (1 GiB), scaled
  per page;
* the Dask path's overhead per sweep cell against in-process: the same grid of
  tiny cells run in-process and on a two-worker LocalCluster (``kvmmmu.sweep``).

Prints, never asserts.

    python benchmarks/compare_workloads.py [--quick]     # --quick: 4 GiB, fewer cells
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvmmmu import workloads as W  # noqa: E402

MiB = 1 << 20


def dirty_log(gib, backing, batch):
    t0 = time.perf_counter()
    rep = W.run("dirty_log", mmu="tdp_mmu", vcpus=4, vcpu_mib=gib * 1024 // 4, iterations=3,
                backing=backing, batch=batch, check=False)
    return time.perf_counter() - t0, rep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    gib = 4 if a.quick else 64
    pages = gib << 18
    print(f"dirty_log on the TDP MMU, {gib} GiB, 4 vCPUs, populate + 3 passes")
    for backing in ("anonymous", "anonymous_thp"):
        total, rep = dirty_log(gib, backing, True)
        ph = {p["name"]: p["seconds"] for p in rep.phases}
        dirty = [v for k, v in ph.items() if k.endswith("dirty memory")]
        get = [v for k, v in ph.items() if k.endswith("get dirty log")]
        base_gib = max(1, gib // 64)
        base_total, base = dirty_log(base_gib, backing, False)
        base_dirty = [p["seconds"] for p in base.phases if p["name"].endswith("dirty memory")]
        ns = 1e9 * sum(dirty) / (3 * pages)
        ns_base = 1e9 * sum(base_dirty) / (3 * (base_gib << 18))
        print(f"  {backing:14s} end to end {total:6.1f} s   populate {ph['populate']:.2f} s, "
              f"enable logging {ph['enable dirty logging']:.2f} s, "
              f"dirty pass {sum(dirty) / 3:.2f} s, get log {sum(get) / 3:.2f} s")
        print(f"  {'':14s} per dirty write {ns:6.0f} ns (batch) vs {ns_base:6.0f} ns "
              f"(scalar reference, {base_gib} GiB): x{ns_base / ns:.0f}; "
              f"faults {rep.summary['pf_taken']:,}, exact={rep.summary['check_dirty_log_exact']}")
    try:
        from kvmmmu import sweep as SW
    except ImportError:
        print("sweep: kvmmmu[sweep] not installed")
        return 0
    n = 12 if a.quick else 40
    grid = SW.Grid(workloads=["first_touch"], mmus=["tdp_mmu"],
                   params={"vcpu_mib": [2], "backing": ["anonymous", "anonymous_thp"]},
                   repeat=n // 2)
    SW.run(grid.cells()[:2], scheduler="inprocess")    # warm this process's imports
    t0 = time.perf_counter()
    df_in = SW.run(grid, scheduler="inprocess")
    t_in = time.perf_counter() - t0
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        SW.run(grid, scheduler=client)                 # warm the workers' imports
        t0 = time.perf_counter()
        df_dask = SW.run(grid, scheduler=client)
        t_dask = time.perf_counter() - t0
    cols = [c for c in df_in.columns if not c.endswith("_s")]
    same = df_in[cols].equals(df_dask[cols])
    cell = df_in["cell_s"].mean()
    print(f"sweep of {len(df_in)} tiny cells (mean cell {1e3 * cell:.1f} ms of work): "
          f"in-process {1e3 * t_in / len(df_in):.1f} ms/cell, Dask 2 workers "
          f"{1e3 * t_dask / len(df_in):.1f} ms/cell (overhead per cell: "
          f"{1e3 * (2 * t_dask - t_in) / len(df_in):+.1f} ms of worker time); same frame: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
