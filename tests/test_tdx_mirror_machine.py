"""A TD under random operations, in both code generations (issue 13, "How it is
checked"): private and shared faults from two vCPUs, private<->shared
conversions, kvm_zap_gfn_range, fast zap, host page migration (an MMU-notifier
invalidation of shared memory), guest_memfd hole punches, memslot deletion and re-creation, vCPUs entering
and leaving the TD, BUSY injected at any SEAMCALL, INIT_MEM_REGION and FINALIZE,
and at the end the teardown.

After every step:

* ``vm.audit()`` is clean - it runs ``TdpMmu.audit_mirror`` (every present
  mirror leaf has the identical mapping in the module's S-EPT and vice versa,
  M1/M2; no shared-EPT leaf maps private memory and no mirror leaf shared
  memory) and ``KvmTdx.audit`` with the module's own audit;
* a brute-force model written here agrees: the private gfns mapped in the
  mirror root are exactly those faulted privately (or added to the image),
  still private, and not zapped since; the shared gfns mapped in the direct
  root likewise; each private leaf maps its guest_memfd page, each shared leaf
  the host page of its hva;
* the VM is never bugged: every BUSY ends in the kernel's retry.
"""
import errno as E

import numpy as np
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

from kvmmmu import mmu as _mmu
from kvmmmu._core.defs import RET_PF_FIXED, RET_PF_SPURIOUS
from kvmmmu.host import HostConfig
from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmmmu.vm import VM

SHARED = 1 << 47
SIZE = (1 << 30) + (2 << 20)              # 1 GiB + 2 MiB: two 1G subtrees
# a few gfns over two 2M frames of the first 1G and the first frame of the second
GFNS = [0, 1, 2, 3, 511, 512, 513, 1023, 0x40000, 0x40001, 0x40002, 0x401ff]
WRAPPERS = ["tdh_mem_sept_add", "tdh_mem_page_aug", "tdh_mem_page_add", "tdh_mem_range_block",
            "tdh_mem_track", "tdh_mem_page_remove", "tdh_mr_finalize"]
SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck))


class TdMachine(RuleBasedStateMachine):
    era = "v6.18"

    @initialize(image=st.lists(st.sampled_from(GFNS[::2]), max_size=3, unique=True),
                finalize=st.sampled_from([True, True, True, False]))
    def setup(self, image, finalize):
        vm = self.vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", nr_vcpus=2,
                          tdx_era=self.era)
        t = self.t = vm.tdx
        assert t.init_vm() == 0
        for v in vm.vcpus:
            assert t.init_vcpu(v) == 0
        self.src = vm.host.mmap(1 << 12, populate=True)
        self._add_slot()
        self.private = set(GFNS[::2])
        for g in self.private:
            vm.set_memory_attributes(g << 12, 1 << 12, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        self.mapped_priv, self.mapped_shared = set(), set()
        self.finalized = False
        self.dead = False
        self.steps = 0
        for g in image:                        # KVM_TDX_INIT_MEM_REGION, then FINALIZE
            r, region = t.init_mem_region(vm.vcpus[0], g << 12, 1, self.src)
            assert r == 0 and region["nr_pages"] == 0
            self.mapped_priv.add(g)
        if finalize:
            assert t.finalize_vm() == 0
            self.finalized = True

    def _add_slot(self):
        self.slot = self.vm.add_memory(0, SIZE, guest_memfd=True, slot=0)
        self.have_slot = True

    def _reload(self, v):
        assert v.kvm_mmu_reload() == 0

    @staticmethod
    def _pick(data, likely):
        """A gfn, mostly one of `likely` (the faults that map), sometimes any
        (the mismatches: a memory-fault exit)."""
        if likely and data.draw(st.integers(0, 3), label="likely"):
            return data.draw(st.sampled_from(sorted(likely)), label="gfn")
        return data.draw(st.sampled_from(GFNS), label="gfn")

    def _busy_once(self, data):
        if data.draw(st.booleans(), label="inject"):
            self.t.module.clear_injections()
            self.t.module.inject_busy(name=data.draw(st.sampled_from(WRAPPERS), label="at"),
                                      times=1)

    # ------------------------------------------------------------ before FINALIZE
    @precondition(lambda self: not self.finalized and not self.dead and self.have_slot)
    @rule(data=st.data())
    def add_image_page(self, data):
        cand = sorted(self.private - self.mapped_priv)
        if not cand:
            return
        g = data.draw(st.sampled_from(cand), label="gfn")
        self._busy_once(data)
        v = self.vm.vcpus[data.draw(st.integers(0, 1), label="vcpu")]
        r, region = self.t.init_mem_region(v, g << 12, 1, self.src)
        if r == -E.EBUSY:                      # v6.18: PAGE.ADD's BUSY goes to userspace
            r, region = self.t.init_mem_region(v, region["gpa"], region["nr_pages"],
                                               region["source_addr"])
        assert r == 0 and region["nr_pages"] == 0
        self.mapped_priv.add(g)

    @precondition(lambda self: not self.finalized and not self.dead)
    @rule(data=st.data())
    def finalize(self, data):
        self._busy_once(data)
        r = self.t.finalize_vm()
        if r == -E.EBUSY:
            r = self.t.finalize_vm()
        assert r == 0
        self.finalized = True

    # ------------------------------------------------------------ running TD
    @precondition(lambda self: self.finalized and not self.dead and self.have_slot)
    @rule(data=st.data(), vi=st.integers(0, 1))
    def private_fault(self, data, vi):
        g = self._pick(data, self.private)
        v = self.vm.vcpus[vi]
        self._reload(v)
        self._busy_once(data)
        r = self.t.handle_ept_violation(v, g << 12)
        if g in self.private:
            assert r in (RET_PF_FIXED, RET_PF_SPURIOUS), r
            self.mapped_priv.add(g)
        else:
            assert r == -E.EFAULT and v.last_fault.memory_fault_exit

    @precondition(lambda self: self.finalized and not self.dead and self.have_slot)
    @rule(data=st.data(), vi=st.integers(0, 1), write=st.booleans())
    def shared_fault(self, data, vi, write):
        g = self._pick(data, set(GFNS) - self.private)
        v = self.vm.vcpus[vi]
        self._reload(v)
        self.vm.host.populate(self.slot.userspace_addr + (g << 12), 1 << 12)
        r = self.t.handle_ept_violation(v, SHARED | g << 12, write=write)
        if g in self.private:
            assert r == -E.EFAULT
        else:
            assert r in (RET_PF_FIXED, RET_PF_SPURIOUS), r
            self.mapped_shared.add(g)

    @precondition(lambda self: not self.dead and self.have_slot)
    @rule(data=st.data(), i=st.integers(0, len(GFNS) - 1), n=st.integers(1, 3),
          to_private=st.booleans())
    def convert(self, data, i, n, to_private):
        gs = GFNS[i:i + n]
        self._busy_once(data)
        for g in gs:
            self.vm.set_memory_attributes(g << 12, 1 << 12,
                                          KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0)
        if to_private:
            self.private |= set(gs)
            self.mapped_shared -= set(gs)
        else:
            self.private -= set(gs)
            self.mapped_priv -= set(gs)

    @precondition(lambda self: not self.dead)
    @rule(data=st.data(), i=st.integers(0, len(GFNS) - 1), n=st.integers(1, 512))
    def zap_gfn_range(self, data, i, n):
        start = GFNS[i]
        self._busy_once(data)
        _mmu.kvm_zap_gfn_range(self.vm, start, start + n)      # every valid root, mirror too
        gone = {g for g in GFNS if start <= g < start + n}
        self.mapped_priv -= gone
        self.mapped_shared -= gone

    @precondition(lambda self: not self.dead)
    @rule()
    def fast_zap(self):
        _mmu.kvm_mmu_zap_all_fast(self.vm)                      # the mirror root stays
        self.mapped_shared.clear()

    @precondition(lambda self: not self.dead and self.have_slot)
    @rule(i=st.integers(0, len(GFNS) - 1))
    def migrate_host_page(self, i):
        g = GFNS[i]
        hva = self.slot.userspace_addr + (g << 12)
        self.vm.host.populate(hva, 1 << 12)
        self.vm.host.migrate_pages(hva, 1 << 12)                # SHARED filter: no SEAMCALL
        self.mapped_shared.discard(g)

    @precondition(lambda self: not self.dead and self.have_slot)
    @rule(data=st.data(), i=st.integers(0, len(GFNS) - 1))
    def punch_hole(self, data, i):
        g = GFNS[i]
        self._busy_once(data)
        self.slot.gmem.punch_hole(g << 12, 1 << 12)             # PRIVATE filter, then free
        self.mapped_priv.discard(g)

    @precondition(lambda self: not self.dead and self.finalized)
    @rule(vi=st.integers(0, 1), enter=st.booleans())
    def run_vcpu(self, vi, enter):
        v = self.vm.vcpus[vi]
        if enter:
            self.t.vcpu_enter(v)
        else:
            self.t.vcpu_exit(v)

    @precondition(lambda self: not self.dead)
    @rule(data=st.data())
    def delete_and_readd_slot(self, data):
        if self.have_slot:
            self._busy_once(data)
            self.vm.delete_memslot(0)
            self.have_slot = False
            self.mapped_priv.clear()
            self.mapped_shared.clear()
        else:
            self._add_slot()

    @precondition(lambda self: not self.dead and self.finalized and self.steps >= 15)
    @rule()
    def destroy_td(self):
        t, vm = self.t, self.vm
        t.module.clear_injections()
        assert t.destroy_vm() == 0
        assert vm.mmu_backend.roots == [] and vm.mmu_backend.core.tdp_mmu_pages == 0
        assert not vm.warn_sink.warnings and not vm.bugged
        assert not t.pins
        assert not any(o == t.tdr_pfn for o, _ in t.module.pamt_snapshot().values())
        self.dead = True

    @precondition(lambda self: self.dead)
    @rule()
    def after_teardown(self):
        # (the machine goes on drawing steps; a torn-down TD stays torn down)
        assert self.vm.mmu_backend.roots == [] and not self.t.pins

    # ------------------------------------------------------------ checks
    @invariant()
    def consistent(self):
        self.steps += 1
        vm = self.vm
        assert not vm.bugged, vm.bugged
        if self.dead:
            return
        assert vm.audit(raise_=False) == []
        mmu = vm.mmu_backend
        leaves = {}
        for r in mmu.roots:
            if r.invalid:
                continue
            d = mmu.core.dump(r.sp)
            d = d[d["leaf"]]
            leaves[r.is_mirror] = dict(zip(d["gfn"].tolist(), d["spte"].tolist()))
        priv, shared = leaves.get(True, {}), leaves.get(False, {})
        assert set(priv) == self.mapped_priv, (sorted(priv), sorted(self.mapped_priv))
        assert set(shared) == self.mapped_shared, (sorted(shared), sorted(self.mapped_shared))
        pfn = lambda s: (s >> 12) & ((1 << 40) - 1)             # noqa: E731
        for g, s in priv.items():
            assert pfn(s) == self.slot.gmem.get_pfn(self.slot, g)
        if shared:
            gs = np.array(sorted(shared), np.uint64)
            host, _ = vm.host.hva_to_pfn_array(np.uint64(self.slot.userspace_addr) +
                                               (gs << np.uint64(12)))
            assert [pfn(shared[g]) for g in gs.tolist()] == host.tolist()


class TdMachineGenB(TdMachine):
    era = "genB"


def test_td_machine_v618():
    run_state_machine_as_test(TdMachine, settings=SETTINGS)


def test_td_machine_genb():
    run_state_machine_as_test(TdMachineGenB, settings=SETTINGS)
