"""The per-event Python cost of the common fault path, layer by layer.

Each ``time_*`` method runs ``N`` events, so the per-event cost is the
sample / N.  ``setup`` builds a fresh VM before every sample (``number =
1``): every sample touches gfns and host pages that were not touched yet.

* ``ScalarFaultin``: ``kvmmmu.mmu.faultin_pfn`` on a ready
  :class:`~kvmmmu.mmu.KvmPageFault` (gfn and slot set): ``present`` (a
  populated host page: GUP fast), ``first_read`` (a never-touched page of
  private memory: the zero page), ``first_write`` (a never-touched page:
  a new host page);
* ``VcpuWalk``: the scalar guest walk of a ring-3 4-level guest from
  Python, ``vcpu.walk_mmu.walk_addr`` (the fault path's form) and
  ``vcpu.walk_addr`` (the emulator's form, which also marks the tables its
  A/D writes dirtied);
* ``ShadowScalarFault``: one ``vcpu.kvm_mmu_page_fault(gva, PFERR_USER)``
  on a fresh gva of that guest (``shadow``: walk, faultin, fetch, set_spte,
  prefetch; the issue's target is at most 8 us), and the direct fault of
  ``mmu="tdp"`` on a populated fresh gpa (``direct``).
"""
from kvmmmu import paging as P
from kvmmmu.guest_tables import GuestPageTables
from kvmmmu.mmu import KvmPageFault, faultin_pfn
from kvmmmu.vm import VM

N = 4096
MiB = 1 << 20
TABLES = 4 * MiB                   # the guest's tables live in [0, 4 MiB); data above
DATA = 64 * MiB


def ring3_guest(mmu="shadow"):
    """A long-mode ring-3 guest whose 4-level tables map gva [0, DATA) onto
    gpa [TABLES, TABLES + DATA) with user-writable 4K pages."""
    vm = VM(mmu)
    vm.add_memory(0, TABLES + DATA, slot=0)
    gpt = GuestPageTables(vm, 0, TABLES // 4096)
    gpt.map(0, TABLES, DATA)
    v = vm.vcpus[0]
    gpt.enter_long_mode(v)
    return vm, v


def _gvas():
    # every 4th page: N fresh 4K pages spread over the data, never 8 in one
    # prefetch group
    return [(k * 4) << 12 for k in range(N)]


class ScalarFaultin:
    number = 1
    repeat = 7
    params = ["present", "first_read", "first_write"]
    param_names = ["case"]

    def setup(self, case):
        vm = VM("shadow")
        slot = vm.add_memory(0, N * 4096, slot=0, populate=case == "present")
        self.v = vm.vcpus[0]
        ec = P.PFERR_WRITE_MASK if case == "first_write" else 0
        self.faults = []
        for g in range(N):
            f = KvmPageFault(g << 12, ec, is_tdp=False)
            f.gfn, f.slot = g, slot
            self.faults.append(f)

    def time_faultin_pfn(self, case):
        v = self.v
        for f in self.faults:
            faultin_pfn(v, f)


class VcpuWalk:
    number = 1
    repeat = 7

    def setup(self):
        self.vm, self.v = ring3_guest()
        self.gvas = _gvas()

    def time_walk_mmu_walk_addr(self):
        walk = self.v.walk_mmu.walk_addr
        for g in self.gvas:
            walk(g, P.PFERR_USER_MASK)

    def time_vcpu_walk_addr(self):
        walk = self.v.walk_addr
        for g in self.gvas:
            walk(g, P.PFERR_USER_MASK)


class ShadowScalarFault:
    number = 1
    repeat = 7
    timeout = 120
    params = ["shadow", "direct"]
    param_names = ["mmu"]

    def setup(self, mmu):
        if mmu == "shadow":
            self.vm, v = ring3_guest()
            self.addrs, self.ec = _gvas(), P.PFERR_USER_MASK
        else:
            self.vm = VM("tdp")
            self.vm.add_memory(0, DATA, slot=0, populate=True)
            v = self.vm.vcpus[0]
            self.addrs, self.ec = _gvas(), P.PFERR_WRITE_MASK
        v.vcpu_enter_guest()
        self.pf = v.kvm_mmu_page_fault

    def time_kvm_mmu_page_fault(self, mmu):
        pf, ec = self.pf, self.ec
        for a in self.addrs:
            pf(a, ec)
