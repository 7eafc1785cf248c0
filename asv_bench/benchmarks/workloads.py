"""Workloads end to end (issue 14, ``kvmmmu.workloads``): what a user waits for.

* ``DirtyLog``: the dirty_log_perf_test loop (populate + 3 passes, get-log
  after each) on the TDP MMU, 1 GiB over 2 vCPUs, 4K and THP backing; the
  guest CPU's batch path (``TdpMmu.guest_access``) against its scalar
  reference (``batch=False``: one Python step per walk and per exit);
* ``PerMmu``: the same first-touch workload on each MMU flavour (64 MiB):
  the cost of a guest page faulted in, per MMU;
* ``SweepCell``: one tiny cell in-process (the floor of a sweep's per-cell cost).

``benchmarks/compare_workloads.py`` prints the 64 GiB figure and the Dask
overhead per cell next to their in-process baselines.
"""
from kvmmmu import workloads as W

MiB = 1 << 20


def dirty_log(backing, batch, vcpu_mib=512, iterations=3):
    return W.run("dirty_log", mmu="tdp_mmu", vcpus=2, vcpu_mib=vcpu_mib, iterations=iterations,
                 backing=backing, batch=batch, check=False)


class DirtyLog:
    params = (["anonymous", "anonymous_thp"], [True, False])
    param_names = ["backing", "batch"]
    number = 1
    repeat = 3
    timeout = 600

    def time_dirty_log_1g(self, backing, batch):
        dirty_log(backing, batch)

    def track_ns_per_dirty_write(self, backing, batch):
        rep = dirty_log(backing, batch)
        passes = [ph["seconds"] for ph in rep.phases if ph["name"].endswith("dirty memory")]
        return 1e9 * sum(passes) / (len(passes) * 2 * (512 * MiB >> 12))
    track_ns_per_dirty_write.unit = "ns"


class PerMmu:
    params = ["tdp_mmu", "tdp", "shadow"]
    param_names = ["mmu"]
    number = 1
    repeat = 3

    def track_us_per_page_first_touch(self, mmu):
        rep = W.run("first_touch", mmu=mmu, vcpu_mib=64, check=False)
        return 1e6 * rep.summary["populate_s"] / (64 * MiB >> 12)
    track_us_per_page_first_touch.unit = "us"


class SweepCell:
    def time_run_cell_tiny(self):
        W.run_cell({"workload": "first_touch", "mmu": "tdp_mmu", "seed": 0, "vcpu_mib": 2})
