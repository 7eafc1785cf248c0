"""Hypothesis state machines over the shadow MMU: faults, emulated and
direct guest page-table writes, CR3 switches, INVLPG, fast zaps, page
budget changes, host invalidations and dirty logging, with VM.audit()
(the shadow invariants: rmap <-> leaf bijection, parent_ptes, unsync
bitmaps and counts, hash uniqueness, write tracking, S1-S9) after every
step.  A second machine does the same for mmu="tdp" (direct pages)."""
import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmmmu._core.guest_walk import PFERR_FETCH_MASK as F_, PFERR_PRESENT_MASK as P_, \
    PFERR_USER_MASK as U_, PFERR_WRITE_MASK as W_
from kvmmmu.host import HostConfig
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES
from kvmmmu.vm import VM

from test_shadow_mmu import (
    A, D, MiB, P, U, W, GuestTables, long_mode, shadow_vm,
)

GVAS = [0x400000 + k * 0x1000 for k in range(6)] + [0x600000, 0x40000000, 0x40001000]
ACCESS = [U_, U_ | W_, W_, U_ | F_, P_ | U_ | W_, 0]


class ShadowMachine(RuleBasedStateMachine):
    @initialize(host64=st.booleans())
    def setup(self, host64):
        self.vm = shadow_vm() if host64 else _shadow_vm_32bit_host()
        vm = self.vm
        g = self.g = GuestTables(vm)
        self.cr3s = [g.alloc() for _ in range(2)]
        for c in self.cr3s:
            for k, gva in enumerate(GVAS):
                g.map(c, gva, 0x1000000 + k * 0x1000)
        # writable aliases of the page tables (unsync through a guest store)
        self.tables = list(range(0x1000, g.next, 0x1000))
        for c in self.cr3s:
            for k, t in enumerate(self.tables):
                g.map(c, 0x80000000 + k * 0x1000, t, leaf=P | W | U | A | D)
        self.v = long_mode(vm, self.cr3s[0])

    @invariant()
    def audited(self):
        if hasattr(self, "vm"):
            assert self.vm.audit(raise_=False) == []

    @rule(i=st.integers(0, len(GVAS) - 1), acc=st.sampled_from(ACCESS))
    def fault(self, i, acc):
        self.v.vcpu_enter_guest()
        self.v.kvm_mmu_page_fault(GVAS[i], acc)

    @rule(k=st.integers(0, 20), acc=st.sampled_from([U_, U_ | W_]))
    def fault_alias(self, k, acc):
        self.v.vcpu_enter_guest()
        self.v.kvm_mmu_page_fault(0x80000000 + (k % len(self.tables)) * 0x1000, acc)

    @rule(k=st.integers(0, 20), idx=st.integers(0, 511), clear=st.booleans(),
          n=st.sampled_from([1, 4, 8]))
    def emulated_write(self, k, idx, clear, n):
        t = self.tables[k % len(self.tables)]
        gpa = t + 8 * idx
        val = 0 if clear else int.from_bytes(self.vm.read_guest(gpa, 8), "little")
        self.v.kvm_page_track_write(gpa, val.to_bytes(8, "little")[:n])

    @rule(k=st.integers(0, 20), idx=st.integers(0, 7))
    def guest_store_clears_pte(self, k, idx):
        # a store through a writable mapping: no exit, no tracking
        t = self.tables[k % len(self.tables)]
        self.vm.write_guest(t + 8 * idx, bytes(8))

    @rule(i=st.integers(0, len(GVAS) - 1))
    def invlpg(self, i):
        self.v.kvm_mmu_invlpg(GVAS[i])

    @rule(c=st.integers(0, 1))
    def cr3(self, c):
        self.v.kvm_set_cr3(self.cr3s[c])
        self.v.vcpu_enter_guest()

    @rule()
    def fast_zap(self):
        self.vm.kvm_mmu_zap_all_fast()

    @rule(n=st.integers(8, 64))
    def budget(self, n):
        self.vm.kvm_mmu_change_mmu_pages(n)

    @rule()
    def host_invalidation(self):
        s = self.vm.memslots[0].id_to_memslot(0)
        self.vm.kvm_zap_gfn_range(0x1000, 0x1004)
        self.vm.host.age(s.userspace_addr, 32 * MiB)

    @rule(on=st.booleans())
    def dirty_log(self, on):
        s = self.vm.memslots[0].id_to_memslot(0)
        self.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES if on else 0, 0,
                                       s.npages << 12, s.userspace_addr)
        if on:
            self.vm.get_dirty_log(0)

    @rule()
    def reset_context(self):
        self.v.kvm_mmu_reset_context()
        self.v.vcpu_enter_guest()


def _shadow_vm_32bit_host():
    from kvmmmu.vm import KvmParams
    vm = VM("shadow", host=HostConfig(tdp=None, host_64bit=False, maxphyaddr=36, smm=False,
                                      gbpages=False, la57=False),
            params=KvmParams(tdp_mmu=False, nx_huge_pages=False))
    vm.add_memory(0, 32 * MiB)
    return vm


TestShadowMachine = ShadowMachine.TestCase
TestShadowMachine.settings = settings(max_examples=25, stateful_step_count=30, deadline=None,
                                      suppress_health_check=list(HealthCheck))


class TdpMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.vm = VM("tdp", host=HostConfig(tdp="ept"))
        self.vm.add_memory(0, 16 * MiB, thp=True)
        self.v = self.vm.vcpus[0]
        self.v.vcpu_enter_guest()

    @invariant()
    def audited(self):
        if hasattr(self, "vm"):
            assert self.vm.audit(raise_=False) == []

    @rule(gfn=st.integers(0, 0x1FFF), acc=st.sampled_from([0, W_, F_, P_ | W_]))
    def fault(self, gfn, acc):
        self.v.vcpu_enter_guest()
        self.v.kvm_mmu_page_fault(gfn << 12, acc | (U_ if not acc & (W_ | F_) else 0))

    @rule(gfn=st.integers(0x4000, 0x4010))
    def mmio(self, gfn):
        self.v.vcpu_enter_guest()
        self.v.kvm_mmu_page_fault(gfn << 12, W_)

    @rule()
    def fast_zap(self):
        self.vm.kvm_mmu_zap_all_fast()

    @rule(n=st.integers(0, 0x1FFF))
    def zap_range(self, n):
        self.vm.kvm_zap_gfn_range(n, n + 64)

    @rule(on=st.booleans())
    def dirty_log(self, on):
        s = self.vm.memslots[0].id_to_memslot(0)
        self.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES if on else 0, 0,
                                       s.npages << 12, s.userspace_addr)
        if on:
            self.vm.get_dirty_log(0)

    @rule()
    def age(self):
        s = self.vm.memslots[0].id_to_memslot(0)
        self.vm.host.age(s.userspace_addr, 16 * MiB)

    @rule()
    def split_thp(self):
        s = self.vm.memslots[0].id_to_memslot(0)
        self.vm.host.split_huge_pmd(s.userspace_addr, 2 * MiB)

    @rule(n=st.integers(8, 64))
    def budget(self, n):
        self.vm.kvm_mmu_change_mmu_pages(n)


TestTdpMachine = TdpMachine.TestCase
TestTdpMachine.settings = settings(max_examples=25, stateful_step_count=30, deadline=None,
                                   suppress_health_check=list(HealthCheck))
