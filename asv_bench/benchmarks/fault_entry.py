"""The scalar fault entry: one ``kvm_mmu_page_fault`` from Python, faultin
included (kvmmmu.mmu -> kvmmmu.tdp_mmu -> one C call).

The issue's target is at most 3 us median for a fresh 4K fault.  Each
``time_*`` method runs ``FAULTS`` faults, so the per-fault cost is the
sample / FAULTS.  The cases:

* ``fresh_4k``: a write to a gfn with no SPTE yet (host pages populated, a
  4K host mapping): faultin, hugepage_adjust, the map;
* ``spurious``: a write reported present to a writable leaf (a stale TLB):
  fast_page_fault finds it already allowed;
* ``fast_fixed``: a write to a leaf dirty logging write-protected:
  fast_page_fault restores W with one cmpxchg and marks the gfn dirty;
* ``mmio_noslot``: a gfn outside every memslot with MMIO caching off (this
  host's setting): emulated, with the vCPU's MMIO cache filled;
* ``mmio_rsvd``: the reserved-bit fault on an MMIO SPTE of the current
  memslot generation (MMIO caching on): answered before any page fault is
  taken.

``setup`` builds a fresh VM before every sample (``number = 1``): each
sample faults gfns that have not been faulted yet.
"""
from kvmmmu.host import HostConfig
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES
from kvmmmu.vm import VM, KvmParams

FAULTS = 4096
MiB = 1 << 20
P, W, RSVD = 1, 2, 8
HOLE = (1 << 30) >> 12             # a gfn range with no memslot


class ScalarFault:
    """``vcpu.kvm_mmu_page_fault(gpa, error_code)`` on a TDP-MMU VM."""
    number = 1
    repeat = 7
    timeout = 120
    params = ["fresh_4k", "spurious", "fast_fixed", "mmio_noslot", "mmio_rsvd"]
    param_names = ["case"]

    def setup(self, case):
        caching = case == "mmio_rsvd"
        vm = VM("tdp_mmu", host=HostConfig(tdp="ept"),
                params=KvmParams(mmio_caching=caching, eager_page_split=False))
        vm.add_memory(0, FAULTS * 4096, slot=0, populate=True)
        v = vm.vcpus[0]
        v.kvm_mmu_reload()
        pf = v.kvm_mmu_page_fault
        if case in ("spurious", "fast_fixed"):
            for g in range(FAULTS):
                pf(g << 12, W)
        if case == "fast_fixed":
            slot = vm.memslots[0].id_to_memslot(0)
            vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, FAULTS * 4096,
                                      slot.userspace_addr)
            vm.get_dirty_log(0)
        if case == "mmio_rsvd":
            for g in range(HOLE, HOLE + FAULTS):
                pf(g << 12, W)
        self.vm, self.v, self.pf = vm, v, pf
        self.gpas = [(g + (HOLE if case.startswith("mmio") else 0)) << 12 for g in range(FAULTS)]
        self.ec = {"fresh_4k": W, "spurious": W | P, "fast_fixed": W | P, "mmio_noslot": W,
                   "mmio_rsvd": RSVD}[case]

    def time_kvm_mmu_page_fault(self, case):
        pf, ec = self.pf, self.ec
        for gpa in self.gpas:
            pf(gpa, ec)

    def peakmem_kvm_mmu_page_fault(self, case):
        self.time_kvm_mmu_page_fault(case)
