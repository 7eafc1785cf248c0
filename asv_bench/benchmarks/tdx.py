"""The mirrored TDP MMU of a TD (kvmmmu/tdp_mmu.py mirror roots, kvmmmu/tdx.py,
kvmmmu/tdx_module.py) against a plain TDP root, in the same run.

* ``PrivateFaults.time_td_private``: ``FAULTS`` private EPT violations on fresh
  gfns of a RUNNABLE TD (``vcpu.kvm_mmu_page_fault`` with PFERR_PRIVATE_ACCESS:
  faultin from guest_memfd, the mirror walk, SEPT.ADD for a new table and
  PAGE.AUG per leaf through the TDX-module model).
  ``time_plain_tdp``: the same number of write faults on a default VM's TDP
  root (host pages populated).  ``time_td_shared``: shared faults of the TD
  (its direct root, indexed with the shared bit).  Faults per second:
  ``FAULTS`` over the time.
* ``PrivateFaults.time_td_private_batch`` / ``time_plain_tdp_batch``: the same
  gfns in one ``TdpMmu.map_memory`` call (``private=True`` on the TD).
* ``Convert1G.time_convert("td")``: ``KVM_SET_MEMORY_ATTRIBUTES`` of 1 GiB
  private -> shared with all 262144 pages mapped in the mirror root (per
  page RANGE.BLOCK, TRACK, PAGE.REMOVE, PHYMEM.PAGE.WBINVD).
  ``time_convert("plain")``: the same ioctl on a SW-protected VM (a plain
  TDP root, no mirror) with the 1 GiB mapped shared, converted to private:
  its 262144 4K leaves are zapped with the SHARED filter - the same ioctl
  and the same leaves on a root without a mirror.

``number = 1``: ``setup`` builds fresh VMs before each sample.
"""
import numpy as np

from kvmmmu.host import HostConfig
from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmmmu.mmu import PFERR_GUEST_FINAL_MASK, PFERR_PRIVATE_ACCESS, PFERR_WRITE_MASK
from kvmmmu.tdx_module import TdxModule
from kvmmmu.vm import VM

GiB = 1 << 30
FAULTS = 4096
PRIV = PFERR_WRITE_MASK | PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS
SHARED = 1 << 47


def td(size=GiB, private=GiB, era="v6.18"):
    """A RUNNABLE TD with one vCPU, `size` bytes of guest_memfd memory at gpa
    0, the first `private` bytes private (a 1-page image, then FINALIZE)."""
    # (a short call log: a GiB of pages makes a million SEAMCALLs)
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", tdx_era=era,
            tdx_module=TdxModule(era=era, log_limit=64))
    t = vm.tdx
    assert t.init_vm() == 0 and t.init_vcpu(vm.vcpus[0]) == 0
    vm.add_memory(0, size, guest_memfd=True)
    vm.set_memory_attributes(0, private, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    src = vm.host.mmap(1 << 12, populate=True)
    assert t.init_mem_region(vm.vcpus[0], 0, 1, src)[0] == 0
    assert t.finalize_vm() == 0
    assert vm.vcpus[0].kvm_mmu_reload() == 0
    return vm


def plain(size=GiB, vm_type="default"):
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type=vm_type)
    vm.add_memory(0, size, populate=True, thp=False, guest_memfd=vm_type != "default")
    assert vm.vcpus[0].kvm_mmu_reload() == 0
    return vm


class PrivateFaults:
    number = 1
    repeat = 5
    timeout = 300

    def setup(self):
        self.td = td()
        self.plain = plain()
        # gfns 7 apart: a new 4K table every 73 faults, as a guest touching
        # memory here and there makes them
        self.gfns = (np.arange(1, FAULTS + 1, dtype=np.uint64) * np.uint64(7)) % np.uint64(1 << 18)
        self.gfns[self.gfns == 0] = 1
        self.gfns = np.unique(self.gfns)

    def time_td_private(self):
        v = self.td.vcpus[0]
        for g in self.gfns.tolist():
            v.kvm_mmu_page_fault(g << 12, PRIV)

    def time_plain_tdp(self):
        v = self.plain.vcpus[0]
        for g in self.gfns.tolist():
            v.kvm_mmu_page_fault(g << 12, PFERR_WRITE_MASK)

    def time_td_private_batch(self):
        self.td.mmu_backend.map_memory(self.td.vcpus[0], self.gfns, private=True)

    def time_plain_tdp_batch(self):
        # the same entry point; 4K leaves, as the TD's (4K host pages)
        self.plain.mmu_backend.map_memory(self.plain.vcpus[0], self.gfns, write=True)


class SharedFaults:
    number = 1
    repeat = 5
    timeout = 300

    def setup(self):
        self.td = td(private=1 << 21)                   # all but the first 2 MiB shared
        slot = self.td.memslots[0].id_to_memslot(0)
        self.td.host.populate(slot.userspace_addr, GiB)
        self.gfns = np.arange(512, 512 + FAULTS, dtype=np.uint64)

    def time_td_shared(self):
        v = self.td.vcpus[0]
        for g in self.gfns.tolist():
            v.kvm_mmu_page_fault(SHARED | g << 12, PFERR_WRITE_MASK | PFERR_GUEST_FINAL_MASK)


class Convert1G:
    """One side per parameter, so each sample builds only the VM it times."""
    number = 1
    repeat = 2
    timeout = 600
    params = ["td", "plain"]
    param_names = ["root"]

    def setup(self, root):
        gfns = np.arange(1 << 9, (1 << 18) + (1 << 9), dtype=np.uint64)
        if root == "td":
            self.vm = td(size=GiB + (2 << 20), private=GiB + (2 << 20))
            self.vm.mmu_backend.map_memory(self.vm.vcpus[0], gfns, private=True)
        else:
            self.vm = plain(size=GiB + (2 << 20), vm_type="sw_protected")
            self.vm.mmu_backend.map_memory(self.vm.vcpus[0], gfns)

    def time_convert(self, root):
        # the TD: private -> shared; the plain root: shared -> private (the
        # same ioctl zapping the same 262144 4K leaves, without a mirror)
        self.vm.set_memory_attributes(2 << 20, GiB, 0 if root == "td" else
                                      KVM_MEMORY_ATTRIBUTE_PRIVATE)
