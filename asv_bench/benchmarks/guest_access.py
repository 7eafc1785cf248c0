"""The guest touching memory on a TDP MMU VM: ``TdpMmu.guest_access``,
``batch=True`` (the core's nogil loop, exits it cannot fix through the
scalar fault path) against ``batch=False`` (one Python step per walk and
per exit).  Each ``time_*`` method runs one access per page of the VM's
memory, so the per-access cost is the sample / ``pages``.  ``setup``
builds a fresh VM before every sample (``number = 1``).

* ``dirty_log_write``: 1 GiB of THP-backed memory mapped, then dirty
  logging turned on with eager page split: every write takes one fast page
  fault (W set again on an MMU-writable 4K leaf, the page marked dirty);
* ``hit``: the same memory mapped and written once: reads that never exit
  (the CPU's Accessed bit only);
* ``first_touch_4k``: 256 MiB of populated 4K-backed memory never mapped:
  every read takes one slow fault (the batch maps a present 4K host page in
  its C pass; the scalar path only tops the caches up).

Run outside asv with ``python asv_bench/benchmarks/guest_access.py`` (from
the worktree root, with the worktree on PYTHONPATH): prints µs per access.
"""
import numpy as np

from kvmmmu.host import HostConfig
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES
from kvmmmu.vm import VM, KvmParams

GiB = 1 << 30
MiB = 1 << 20
SIZES = {"dirty_log_write": GiB, "hit": GiB, "first_touch_4k": 256 * MiB}


def build(case):
    """(tdp, vcpu, gfns, write) of a fresh VM ready for `case`."""
    size = SIZES[case]
    thp = case != "first_touch_4k"
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), params=KvmParams(eager_page_split=True))
    slot = vm.add_memory(0, size, slot=0, thp=thp, populate=True)
    v = vm.vcpus[0]
    v.kvm_mmu_reload()
    t = vm.mmu_backend
    gfns = np.arange(size >> 12, dtype=np.uint64)
    if thp:
        t.guest_access(v, gfns, write=True)            # map (2M leaves), dirty
    if case == "dirty_log_write":
        vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, size, slot.userspace_addr)
        vm.get_dirty_log(0)
    return t, v, gfns, case == "dirty_log_write"


class GuestAccess:
    number = 1
    repeat = 5
    timeout = 600
    params = (["dirty_log_write", "hit", "first_touch_4k"], ["batch", "scalar"])
    param_names = ["case", "mode"]

    def setup(self, case, mode):
        self.t, self.v, self.gfns, self.write = build(case)
        self.batch = mode == "batch"
        self.pages = self.gfns.shape[0]

    def time_guest_access(self, case, mode):
        self.t.guest_access(self.v, self.gfns, write=self.write, batch=self.batch)


if __name__ == "__main__":
    import time
    for case in SIZES:
        for mode in ("batch", "scalar"):
            t, v, g, w = build(case)
            t0 = time.perf_counter()
            f = t.guest_access(v, g, write=w, batch=mode == "batch")
            dt = time.perf_counter() - t0
            print(f"{case:16s} {mode:6s} {g.shape[0]:7d} accesses, {int(f.sum()):7d} exits: "
                  f"{dt / g.shape[0] * 1e6:8.3f} us/access")
