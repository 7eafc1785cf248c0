"""The shadow MMU's fault path (issue 12, "Speed"): one shadow-paging fault
from Python with its guest walk (target: at most 8 us median), the batch
path over a guest's own 4-level tables, and rmap memory per mapping.

Scalar cases, ``vcpu.kvm_mmu_page_fault(gva, error_code)`` on a ring-3
long-mode guest whose tables map 4K user pages (host pages populated, so
faultin finds them), each ``time_*`` running ``FAULTS`` faults (per-fault
cost = sample / FAULTS), on the C path (``ShadowMmu.c_fast_path``, the
default) and on the Python reference path:

* ``fresh_existing``: a fresh 4K gva whose level-1 shadow page exists (the
  C fetch does the whole step);
* ``fresh_new_pages``: a fresh 4K gva in a guest table not shadowed yet (a
  new level-1 shadow page: the Python path makes it);
* ``spurious``: a gva already mapped (RET_PF_SPURIOUS).

``BatchFault``: ``ShadowMmu.page_fault_batch`` over 1M first touches in
random order of a 4 GiB guest (ns per fault = sample / 2**20), next to the
bare C baseline of the same size (``BareRadixMap.shadow_fault``).
``track_rmap_bytes_per_mapping``: the pte_list_desc bytes in use per leaf
SPTE after the batch (the kernel: 8-byte heads, 128-byte descriptors of 14).
"""
import numpy as np

from kvmmmu import paging as P
from kvmmmu._core.tdp_bench import BareRadixMap
from kvmmmu.guest_tables import GuestPageTables
from kvmmmu.shadow_mmu import ShadowMmu
from kvmmmu.vm import VM

MiB, GiB = 1 << 20, 1 << 30
TABLES = 16 * MiB
FAULTS = 2048
U = P.PFERR_USER_MASK


def _guest(size, populate=True):
    vm = VM("shadow")
    vm.add_memory(0, TABLES + size, slot=0, thp=False, populate=populate)
    gpt = GuestPageTables(vm, 0, TABLES // 4096)
    gpt.map(0, TABLES, size)
    v = vm.vcpus[0]
    gpt.enter_long_mode(v)
    v.vcpu_enter_guest()
    return vm, v, gpt


class ScalarShadowFault:
    """One shadow fault with its guest walk, from Python."""
    number = 1
    repeat = 7
    timeout = 300
    params = (["fresh_existing", "fresh_new_pages", "spurious"], ["c", "python"])
    param_names = ["case", "path"]

    def setup(self, case, path):
        self.old = ShadowMmu.c_fast_path
        ShadowMmu.c_fast_path = path == "c"
        pages = FAULTS * 512 if case == "fresh_new_pages" else FAULTS
        vm, v, _ = _guest(max(pages * 4096, 2 * MiB))
        if case == "fresh_new_pages":
            gvas = [k << 21 for k in range(FAULTS)]          # one guest table each
        else:
            pf = v.kvm_mmu_page_fault
            for k in range(0, FAULTS, 512):                  # the shadow tables exist
                pf(k << 12, U)
            gvas = [k << 12 for k in range(FAULTS) if k % 512]
            if case == "spurious":
                for g in gvas:
                    pf(g, U)
        self.vm, self.v, self.gvas = vm, v, gvas

    def teardown(self, case, path):
        ShadowMmu.c_fast_path = self.old

    def time_faults(self, case, path):
        pf = self.v.kvm_mmu_page_fault
        for g in self.gvas:
            pf(g, U)


class BatchFault:
    """1M first touches of a 4 GiB guest through its own 4-level tables."""
    number = 1
    repeat = 3
    timeout = 900
    GIB = 4

    def setup(self):
        n = self.GIB << 18
        self.gvas = np.arange(n, dtype=np.uint64) << np.uint64(12)
        np.random.default_rng(1).shuffle(self.gvas)
        self.vm, self.v, self.gpt = _guest(self.GIB * GiB)

    def time_page_fault_batch(self):
        self.vm.mmu_backend.page_fault_batch(self.v, self.gvas, U)

    def time_bare_c_baseline(self):
        BareRadixMap().shadow_fault(self.gpt._q, self.gpt.cr3, self.gvas)

    def track_rmap_bytes_per_mapping(self):
        self.vm.mmu_backend.page_fault_batch(self.v, self.gvas, U)
        st = self.vm.stat.as_dict()
        leaves = st["pages_4k"] + st["pages_2m"] + st["pages_1g"]
        # the 8-byte head of every mapped gfn plus the descriptors in use
        return (8 * leaves + self.vm.rmap_pool.active_bytes) / max(leaves, 1)
    track_rmap_bytes_per_mapping.unit = "bytes"
