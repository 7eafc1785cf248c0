#!/usr/bin/env python3
"""The cost of running a sweep on Dask against the in-process loop.

Figures (issue 14, "How it is checked": the overhead of the Dask path per cell):

* N trivial cells (``kvmmmu.sweep.null_cell``: no work, so the whole wall time
  is the sweep machinery): in-process, and on a running LocalCluster of one
  worker (one thread; no parallelism to hide the overhead) and of two
  workers, through an open ``distributed.Client`` and by address (which adds
  a connect and a close per run); per cell = wall / N.  The first Dask run
  of a cluster is shown apart (cold: the workers import kvmmmu and the cell
  function);
* a tiny real grid (``dirty_log`` at 2 MiB per vCPU, one iteration, three
  MMUs x a few parameters) the same ways, with the overhead per cell as
  (wall - sum of cell_s) / N for the in-process and the one-worker runs;
* ``scheduler="local"`` end to end (start a two-worker LocalCluster, run, close
  it): what a CLI ``sweep`` pays once per call.

Prints, never asserts.  Check that the Dask frame equals the in-process one
(wall-time columns dropped) on every run.

    python benchmarks/compare_sweep.py [--cells 20] [--repeat 3]
"""
import argparse
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from kvmmmu import sweep as SW  # noqa: E402


def _no_wall(df):
    return df.drop(columns=[c for c in df.columns if c.endswith("_s")])


def _timed(cells, scheduler, cell_fn, **kw):
    t0 = time.perf_counter()
    df = SW.run(cells, scheduler=scheduler, cell_fn=cell_fn, **kw)
    return time.perf_counter() - t0, df


def _row(label, n, runs, overhead):
    walls = [w for w, _ in runs]
    best = min(walls)
    line = (f"  {label:<38} {best * 1e3:9.1f} ms  (median {statistics.median(walls) * 1e3:8.1f})"
            f"  {best / n * 1e3:7.3f} ms/cell")
    if overhead:
        # wall minus the cells' own work (cell_s, measured where they ran), per cell
        ov = min(w - float(df["cell_s"].sum()) for w, df in runs)
        line += f"  overhead {ov / n * 1e3:7.3f} ms/cell"
    print(line)


def bench(label, cells, cell_fn, clusters, repeat):
    """`clusters`: (name, address, client, one_worker)."""
    n = len(cells)
    print(f"\n{label}: {n} cells")
    runs = [_timed(cells, "inprocess", cell_fn) for _ in range(repeat)]
    ref = runs[-1][1]
    print(f"  the cells' own work (sum of cell_s, in-process): "
          f"{ref['cell_s'].sum() * 1e3:.1f} ms")
    _row("in-process", n, runs, True)
    for name, address, client, one in clusters:
        for how, sched in (("open Client", client), ("address", address)):
            runs = [_timed(cells, sched, cell_fn) for _ in range(repeat)]
            same = all(_no_wall(df).equals(_no_wall(ref)) for _, df in runs)
            _row(f"dask {name}, {how}", n, runs, one)
            if not same:
                print("    !! the Dask frame differs from the in-process one")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=20, help="trivial cells (default 20)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; best shown")
    args = ap.parse_args(argv)

    from distributed import LocalCluster

    def start(n):
        t0 = time.perf_counter()
        c = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                         dashboard_address=":0", silence_logs=logging.ERROR)
        return c, time.perf_counter() - t0

    logging.getLogger("distributed").setLevel(logging.ERROR)
    c1, s1 = start(1)
    c2, s2 = start(2)
    print(f"LocalCluster start: 1 worker {s1:.2f} s, 2 workers {s2:.2f} s "
          f"({os.cpu_count()} CPUs)")
    from distributed import Client
    k1, k2 = Client(c1), Client(c2)
    t0 = time.perf_counter()
    Client(c1.scheduler_address).close()
    print(f"connect + close a Client by address: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    try:
        trivial = [{"workload": "null", "mmu": "tdp_mmu", "seed": i} for i in range(args.cells)]
        for name, k in (("1 worker", k1), ("2 workers", k2)):
            w, _ = _timed(trivial, k, SW.null_cell)
            print(f"cold first Dask run, {name}: {w * 1e3:.1f} ms for {len(trivial)} "
                  "trivial cells")
        clusters = [("1 worker x 1 thread", c1.scheduler_address, k1, True),
                    ("2 workers x 1 thread", c2.scheduler_address, k2, False)]
        bench("trivial cells (null_cell)", trivial, SW.null_cell, clusters, args.repeat)
        big = [{"workload": "null", "mmu": "tdp_mmu", "seed": i} for i in range(10 * args.cells)]
        bench("trivial cells x10", big, SW.null_cell, clusters, args.repeat)

        from kvmmmu.workloads import run_cell
        grid = SW.Grid(["dirty_log"], ["tdp_mmu", "tdp", "shadow"],
                       {"vcpu_mib": [2, 4], "iterations": [1], "eager_page_split": [True, False],
                        "vcpus": [1, 2]}, seed=1)
        for k in (k1, k2):
            _timed(grid.cells(), k, run_cell)       # the workers import the workloads
        bench("tiny real grid (dirty_log, 2-4 MiB/vCPU, 1 iteration)", grid.cells(), run_cell,
              clusters, args.repeat)
    finally:
        k1.close()
        k2.close()
        c1.close()
        c2.close()

    walls = []
    for _ in range(max(1, args.repeat - 1)):
        w, df = _timed(trivial, "local", SW.null_cell, n_workers=2)
        walls.append(w)
    print(f"\nscheduler='local' end to end (start 2 workers, {len(trivial)} trivial cells, "
          f"close): best {min(walls):.2f} s, median {statistics.median(walls):.2f} s")


if __name__ == "__main__":
    main()
