"""The VM layer: memslots, memory attributes, MMU notifiers, host memory.

These benchmarks depend on kvmmmu.vm, kvmmmu.memslots, kvmmmu.memattrs,
kvmmmu.notifiers and kvmmmu.host (and, through them, the rmap and
page-table-arena cores).  The target size is a 64 GiB guest (16M gfns).

* ``CreateMemslot``: ``KVM_SET_USER_MEMORY_REGION`` CREATE of one slot of 1 GiB
  or 64 GiB on a shadow-MMU VM (rmaps, lpage_info and write-tracking arrays
  allocated at creation) and on a TDP-MMU VM (lpage_info only).  DELETE, MOVE
  and the dirty-logging toggle (FLAGS_ONLY, bitmap allocation) of the same slot.
* ``CreatePrivateMemslot``: CREATE of a 64 GiB slot on a software-protected VM
  whose attributes are fragmented, i.e. the MIXED scan of every 2M/1G frame.
* ``SetMemoryAttributes``: convert 32 GiB of a 64 GiB slot to private.
* ``NotifierInvalidate``: one ``invalidate_range_start/end`` pair over 2 MiB,
  1 GiB or 64 GiB of hva, hitting 1 or 64 memslots (dispatch, range
  accounting, generation of the gfn ranges; the MMU hooks are the no-op base).
* ``HostEvents``: host events over large populated THP ranges that drive the
  notifiers: munmap of 64 GiB, aging of 64 GiB, THP split and page migration
  of 1 GiB.
* ``MaxMappingLevel``: ``kvm_mmu_max_mapping_level`` for all 16M gfns of a
  64 GiB THP-backed slot in one batch call, and 100k scalar calls.
* ``FaultinPfn``: 10k scalar ``kvm_mmu_faultin_pfn`` calls (the fault path's
  Python part: memslot lookup, notifier pre-checks, hva_to_pfn) on a 1 GiB
  THP-backed slot, and 10k ``is_page_fault_stale`` checks.

Operations that change the VM set ``number = 1`` (``setup`` runs before each
sample and builds a fresh VM, untimed).
"""
import numpy as np

from kvmmmu import memslots as M
from kvmmmu import mmu as MMU
from kvmmmu.host import HostConfig
from kvmmmu.vm import VM

GiB = 1 << 30
MiB = 1 << 20
SIZES = {"1GiB": GiB, "64GiB": 64 * GiB}


class CreateMemslot:
    params = (["shadow", "tdp_mmu"], ["1GiB", "64GiB"])
    param_names = ["mmu", "size"]
    number = 1
    repeat = (3, 10, 20.0)

    def setup(self, mmu, size):
        self.size = SIZES[size]
        self.vm = VM(mmu)
        self.hva = self.vm.host.mmap(self.size, thp=True)
        self.vm2 = VM(mmu)
        self.vm2.set_user_memory_region(0, 0, 0, self.size, self.hva)

    def time_create(self, mmu, size):
        self.vm.set_user_memory_region(0, 0, 0, self.size, self.hva)

    def peakmem_create(self, mmu, size):
        self.vm.set_user_memory_region(0, 0, 0, self.size, self.hva)

    def time_delete(self, mmu, size):
        self.vm2.set_user_memory_region(0, 0, 0, 0, 0)

    def time_move(self, mmu, size):
        self.vm2.set_user_memory_region(0, 0, 128 * GiB, self.size, self.hva)

    def time_enable_dirty_logging(self, mmu, size):
        self.vm2.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 0, self.size, self.hva)


class CreatePrivateMemslot:
    number = 1
    repeat = (3, 10, 20.0)

    def setup(self):
        rng = np.random.default_rng(1234)
        self.vm = VM("tdp_mmu", vm_type="sw_protected")
        for g in np.sort(rng.integers(0, 16 << 20, 1000)):
            self.vm.set_memory_attributes(int(g) << 12, 4096 * int(rng.integers(1, 600)), 8)
        self.hva = self.vm.host.mmap(64 * GiB)

    def time_create_64GiB_fragmented_attrs(self):
        self.vm.set_user_memory_region(0, 0, 0, 64 * GiB, self.hva)


class SetMemoryAttributes:
    number = 1
    repeat = (3, 10, 20.0)

    def setup(self):
        self.vm = VM("tdp_mmu", vm_type="sw_protected")
        self.vm.set_user_memory_region(0, 0, 0, 64 * GiB, self.vm.host.mmap(64 * GiB))

    def time_private_32GiB(self):
        self.vm.set_memory_attributes(7 << 12, 32 * GiB, 8)


class NotifierInvalidate:
    params = (["2MiB", "1GiB", "64GiB"], [1, 64])
    param_names = ["range", "memslots"]

    def setup(self, rng, nslots):
        self.vm = VM("tdp_mmu")
        self.hva = self.vm.host.mmap(64 * GiB, thp=True)
        per = 64 * GiB // nslots
        for i in range(nslots):
            self.vm.set_user_memory_region(i, 0, i * per, per, self.hva + i * per)
        self.len = {"2MiB": 2 * MiB, "1GiB": GiB, "64GiB": 64 * GiB}[rng]

    def time_invalidate_start_end(self, rng, nslots):
        mm = self.vm.host
        mm.invalidate_end(mm.invalidate_begin(self.hva, self.hva + self.len))


class HostEvents:
    number = 1
    repeat = (2, 5, 30.0)
    timeout = 300

    def setup(self):
        self.vm = VM("tdp_mmu")
        self.hva = self.vm.host.mmap(64 * GiB, thp=True)
        self.vm.set_user_memory_region(0, 0, 0, 64 * GiB, self.hva)
        self.vm.host.populate(self.hva, 64 * GiB)

    def time_munmap_64GiB(self):
        self.vm.host.munmap(self.hva, 64 * GiB)

    def time_age_64GiB(self):
        self.vm.host.age(self.hva, 64 * GiB)

    def time_split_thp_1GiB(self):
        self.vm.host.split_huge_pmd(self.hva, GiB)

    def time_migrate_1GiB(self):
        self.vm.host.migrate_pages(self.hva, GiB)


class MaxMappingLevel:
    def setup(self):
        self.vm = VM("tdp_mmu", host=HostConfig(tdp="ept"))
        self.vm.host.mmap(64 * GiB, thp=True, populate=False)
        hva = self.vm.host.vmas[0].start
        self.vm.set_user_memory_region(0, 0, 0, 64 * GiB, hva)
        self.vm.host.populate(hva, 64 * GiB)
        self.slot = self.vm.memslots[0].id_to_memslot(0)
        self.gfns = np.arange(16 << 20, dtype=np.uint64)
        rng = np.random.default_rng(1234)
        self.sample = [int(x) for x in rng.integers(0, 16 << 20, 100_000)]

    def time_batch_16M_gfns(self):
        MMU.kvm_mmu_max_mapping_level_array(self.vm, self.slot, self.gfns)

    def time_scalar_100k_gfns(self):
        f, vm, s = MMU.kvm_mmu_max_mapping_level, self.vm, self.slot
        for g in self.sample:
            f(vm, s, g)


class FaultinPfn:
    def setup(self):
        self.vm = VM("tdp_mmu", host=HostConfig(tdp="ept"))
        self.slot = self.vm.add_memory(0, GiB, thp=True, populate=True)
        self.vcpu = self.vm.vcpus[0]
        rng = np.random.default_rng(1234)
        self.sample = [int(x) for x in rng.integers(0, GiB >> 12, 10_000)]

    def time_faultin_pfn_10k(self):
        f, v = self.vm.kvm_mmu_faultin_pfn, self.vcpu
        for g in self.sample:
            f(v, g, write=True)

    def time_is_page_fault_stale_10k(self):
        vm, s = self.vm, self.slot
        f, seq = vm.is_page_fault_stale, vm.notifier.mmu_invalidate_seq
        with vm.mmu_lock.write():
            for g in self.sample:
                f(seq, g, s)
