"""The KVM side of TDX (kvmmmu/tdx.py) with the mirror MMU, both code generations.

* the life cycle (INIT_VM, INIT_VCPU, INIT_MEM_REGION, FINALIZE, faults,
  conversions, teardown) issues the SEAMCALLs of mirror-tdx.md §5, §7 in order,
  per era: v6.18 premaps the initial image (the mirror leaf before the S-EPT
  leaf, counted in nr_premapped, PAGE.ADD from the populate callback), Gen B
  issues PAGE.ADD inside set_external_spte;
* TDX_OPERAND_BUSY injected at each SEAMCALL ends in the kernel's result: a
  retried fault for SEPT.ADD/AUG, -EBUSY to the caller for PAGE.ADD during
  INIT_MEM_REGION (which resumes) and MR.FINALIZE, one forced retry with every
  vCPU kept out for BLOCK/TRACK/REMOVE (M15), a bugged VM when that retry is
  BUSY too;
* the failure policy: non-BUSY errors bug the VM; free_external_spt before the
  HKID release is a KVM bug; removing a private leaf after it as well;
* v6.18 pins each mapped private page once.
"""
import errno as E

import numpy as np
import pytest

from kvmmmu._core.defs import RET_PF_FIXED
from kvmmmu.host import HostConfig
from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmmmu.tdx import TD_STATE_RUNNABLE, KvmTdx
from kvmmmu.tdx_module import TdxModule
from kvmmmu.vm import VM

GB = 1 << 30
SHARED = 1 << 47
ERAS = ("v6.18", "genB")


def short(calls):
    return [c.name.removeprefix("tdh_").removeprefix("mem_") for c in calls]


def make_td(era, *, nr_vcpus=2, image=4, finalize=True, private=64 << 20):
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", nr_vcpus=nr_vcpus, tdx_era=era)
    t = vm.tdx
    assert t.init_vm() == 0
    for v in vm.vcpus:
        assert t.init_vcpu(v) == 0
    slot = vm.add_memory(0, GB, guest_memfd=True)
    vm.set_memory_attributes(0, private, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    src = vm.host.mmap(max(image, 1) << 12, populate=True)
    if image:
        r, region = t.init_mem_region(vm.vcpus[0], 0, image, src)
        assert r == 0 and region["nr_pages"] == 0
    if finalize:
        assert t.finalize_vm() == 0
    return vm, t, slot, src


def mirror_leaves(vm):
    mmu = vm.mmu_backend
    root = next(r for r in mmu.roots if r.is_mirror and not r.invalid)
    d = mmu.core.dump(root.sp)
    return sorted(int(g) for g in d["gfn"][d["leaf"]])


# --------------------------------------------------------------------------- life cycle

@pytest.mark.parametrize("era", ERAS)
def test_init_vm_sets_the_shared_bit_and_refuses_a_second_time(era):
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", tdx_era=era)
    t = vm.tdx
    assert isinstance(t, KvmTdx) and t.era == era and t.hkid is None
    assert t.init_vm(gpaw=52) == -E.EINVAL              # a 4-level TDP MMU here
    assert t.init_vm() == 0 and vm.gfn_direct_bits == 1 << 35 and t.hkid is not None
    assert t.init_vm() == -E.EINVAL
    with pytest.raises(ValueError):
        t.init_vm(gpaw=50)
    with pytest.raises(ValueError):
        VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", tdx_era="genC")


@pytest.mark.parametrize("era", ERAS)
def test_the_initial_image_per_code_generation(era):
    vm, t, slot, src = make_td(era, image=0, finalize=False)
    v = vm.vcpus[0]
    n0 = len(t.module.calls)
    r, region = t.init_mem_region(v, 0x10000, 3, src)
    assert (r, region["nr_pages"], region["gpa"]) == (0, 0, 0x13000)
    names = short(t.module.calls[n0:])
    # tables top-down, then one PAGE.ADD per page, no AUG before FINALIZE (M10)
    assert names == ["sept_add"] * 3 + ["page_add"] * 3
    adds = [c for c in t.module.calls[n0:] if c.name == "tdh_mem_page_add"]
    assert [c.args[0] for c in adds] == [0x10000, 0x11000, 0x12000]
    assert [c.args[1] for c in adds] == [slot.gmem.get_pfn(slot, g) for g in (0x10, 0x11, 0x12)]
    assert t.nr_premapped == 0 and mirror_leaves(vm) == [0x10, 0x11, 0x12]
    if era == "v6.18":
        assert sorted(t.pins) == sorted(c.args[1] for c in adds)
    else:
        assert not t.pins
    assert vm.audit(raise_=False) == []
    assert t.finalize_vm() == 0 and t.state == TD_STATE_RUNNABLE and t.pre_fault_allowed
    # after FINALIZE: no more initial image; faults AUG
    assert t.init_mem_region(v, 0x20000, 1, src)[0] == -E.EINVAL
    n1 = len(t.module.calls)
    assert t.handle_ept_violation(v, 0x13000) == RET_PF_FIXED
    assert short(t.module.calls[n1:]) == ["page_aug"]
    assert vm.audit(raise_=False) == []


def test_v618_premapped_pages_block_finalize_and_zap_without_seamcalls():
    """v6.18: a private fault before FINALIZE (as kvm_tdp_map_page makes it)
    leaves a premapped mirror leaf with no S-EPT leaf; FINALIZE is refused
    while one is counted; zapping it finds no S-EPT leaf (BLOCK:
    TDX_EPT_ENTRY_STATE_INCORRECT) and only drops the count."""
    vm, t, slot, src = make_td("v6.18", image=0, finalize=False)
    v = vm.vcpus[0]
    assert v.kvm_mmu_reload() == 0
    r, level = vm.mmu_backend.kvm_tdp_map_page(v, 0x5000, (1 << 32) | (1 << 49))
    assert (r, level) == (0, 1) and t.nr_premapped == 1
    assert (0, 0x5000) not in t.module.sept_snapshot(t.td)     # the S-EPT leaf is not there
    assert vm.audit(raise_=False) == []                        # ... and that is legal here
    assert t.finalize_vm() == -E.EINVAL
    n0 = len(t.module.calls)
    vm.set_memory_attributes(0x5000, 0x1000, 0)                # private -> shared: zap
    assert short(t.module.calls[n0:]) == ["range_block"]
    assert t.module.calls[-1].status_name.startswith("TDX_EPT_ENTRY_STATE_INCORRECT")
    assert t.nr_premapped == 0 and not t.pins and not vm.bugged
    assert t.finalize_vm() == 0
    assert vm.audit(raise_=False) == []


@pytest.mark.parametrize("era", ERAS)
def test_a_conversion_removes_block_track_remove_wbinvd(era):
    vm, t, slot, src = make_td(era)
    v = vm.vcpus[0]
    assert t.vcpu_enter(vm.vcpus[1])                           # vCPU 1 runs in the TD
    assert t.handle_ept_violation(v, 0x400000) == RET_PF_FIXED
    pfn = slot.gmem.get_pfn(slot, 0x400)
    n0 = len(t.module.calls)
    vm.set_memory_attributes(0x400000, 0x1000, 0)
    names = short(t.module.calls[n0:])
    # TRACK, then vCPU 1 kicked out of guest mode (its td_exit), then REMOVE (M7)
    assert names == ["range_block", "track", "td_exit", "page_remove", "phymem_page_wbinvd_hkid"]
    assert t.module.calls[-1].args[-1] == pfn
    assert t.module.vcpus_in_guest(t.td) == ()                 # TRACK kicked vCPU 1 out
    assert 0x400 not in mirror_leaves(vm) and not vm.bugged
    if era == "v6.18":
        assert pfn not in t.pins
    assert vm.audit(raise_=False) == []


@pytest.mark.parametrize("era", ERAS)
def test_teardown_order(era):
    """mirror-tdx.md §7.4: private leaves go while the HKID is assigned
    (guest_memfd release), then KEY.FREEID, then the S-EPT pages are
    reclaimed bottom-up, the TDR last; SEPT.REMOVE never (M8)."""
    vm, t, slot, src = make_td(era)
    v = vm.vcpus[0]
    for gpa in (0x400000, 0x600000, 0x2000000):
        assert t.handle_ept_violation(v, gpa) == RET_PF_FIXED
    n0 = len(t.module.calls)
    assert t.destroy_vm() == 0
    names = short(t.module.calls[n0:])
    free = names.index("mng_key_freeid")
    assert set(names[:free]) == {"range_block", "track", "page_remove", "phymem_page_wbinvd_hkid"}
    assert names[:free].count("page_remove") == 4 + 3          # the image and the faults
    assert set(names[free + 1:]) == {"phymem_page_reclaim"}
    assert "sept_remove" not in names
    reclaimed = [c.args[0] for c in t.module.calls[n0:] if c.name == "tdh_phymem_page_reclaim"]
    assert reclaimed[-1] == t.tdr_pfn
    assert t.module.pamt_snapshot() == {}                       # every page went back
    assert vm.mmu_backend.roots == [] and not vm.bugged and not vm.warn_sink.warnings
    assert not t.pins and t.td is None
    assert vm.audit(raise_=False) == []                       # a torn-down TD audits clean


# --------------------------------------------------------------------------- BUSY everywhere

@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("at", ["tdh_mem_sept_add", "tdh_mem_page_aug"])
def test_busy_on_the_map_side_retries_the_fault_locally(era, at):
    vm, t, slot, src = make_td(era)
    t.module.inject_busy(name=at, times=1)
    n0 = len(t.module.calls)
    assert t.handle_ept_violation(vm.vcpus[0], 0x2000000) == RET_PF_FIXED
    got = [(c.name, c.status_name.startswith("TDX_OPERAND_BUSY")) for c in t.module.calls[n0:]]
    assert (at, True) in got and not vm.bugged
    assert 0x2000 in mirror_leaves(vm) and vm.audit(raise_=False) == []


@pytest.mark.parametrize("era", ERAS)
def test_busy_page_add_during_the_image_returns_ebusy_and_resumes(era):
    vm, t, slot, src = make_td(era, image=0, finalize=False)
    v = vm.vcpus[0]
    t.module.inject_busy(name="tdh_mem_page_add", times=1)
    r, region = t.init_mem_region(v, 0x10000, 3, src)
    if era == "v6.18":          # the populate callback's PAGE.ADD: -EBUSY to userspace
        assert r == -E.EBUSY and region["nr_pages"] == 3
        r, region = t.init_mem_region(v, region["gpa"], region["nr_pages"], region["source_addr"])
    # Gen B: the BUSY is inside the fault: kvm_tdp_mmu_map_private_pfn retries
    assert r == 0 and region["nr_pages"] == 0
    assert t.nr_premapped == 0 and mirror_leaves(vm) == [0x10, 0x11, 0x12]
    assert t.finalize_vm() == 0 and vm.audit(raise_=False) == []


def test_busy_finalize_goes_to_the_caller():
    vm, t, slot, src = make_td("v6.18", finalize=False)
    t.module.inject_busy(name="tdh_mr_finalize", times=1)
    assert t.finalize_vm() == -E.EBUSY and t.state != TD_STATE_RUNNABLE
    assert t.finalize_vm() == 0


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("at", ["tdh_mem_range_block", "tdh_mem_track", "tdh_mem_page_remove"])
def test_busy_on_the_removal_side_gets_one_forced_retry(era, at):
    vm, t, slot, src = make_td(era)
    v = vm.vcpus[0]
    assert t.handle_ept_violation(v, 0x400000) == RET_PF_FIXED
    seen = []
    real_kick = t.kick_all

    def kick():                         # the retry runs with every vCPU kept out (M15)
        seen.append(t.wait_for_sept_zap)
        real_kick()
    t.kick_all = kick
    assert t.vcpu_enter(vm.vcpus[1])
    t.module.inject_busy(name=at, times=1)
    n0 = len(t.module.calls)
    vm.set_memory_attributes(0x400000, 0x1000, 0)
    names = [c.name for c in t.module.calls[n0:]]
    assert names.count(at) == 2 and not vm.bugged
    assert True in seen and not t.wait_for_sept_zap
    assert 0x400 not in mirror_leaves(vm) and vm.audit(raise_=False) == []


@pytest.mark.parametrize("era", ERAS)
def test_busy_twice_on_removal_bugs_the_vm(era):
    vm, t, slot, src = make_td(era)
    assert t.handle_ept_violation(vm.vcpus[0], 0x400000) == RET_PF_FIXED
    t.module.inject_busy(name="tdh_mem_page_remove", times=2)
    vm.set_memory_attributes(0x400000, 0x1000, 0)
    assert vm.bugged


def test_a_contending_vcpu_is_kicked_out_by_the_forced_retry():
    """§8.3: a vCPU in guest mode holding the S-EPT lock makes REMOVE BUSY;
    KVM's retry with every vCPU out of guest mode succeeds."""
    vm, t, slot, src = make_td("v6.18")
    assert t.handle_ept_violation(vm.vcpus[0], 0x400000) == RET_PF_FIXED
    assert t.vcpu_enter(vm.vcpus[1])
    t.module.contend(t.td, t.tdvpr[vm.vcpus[1].index], lock="sept")
    vm.set_memory_attributes(0x400000, 0x1000, 0)
    busy = [c for c in t.module.calls if c.status_name.startswith("TDX_OPERAND_BUSY")]
    assert busy and not vm.bugged and vm.audit(raise_=False) == []


# --------------------------------------------------------------------------- failure policy

@pytest.mark.parametrize("era", ERAS)
def test_free_external_spt_with_the_hkid_assigned_is_a_bug_and_removal_after_it_too(era):
    vm, t, slot, src = make_td(era)
    assert t.free_external_spt(0, 1, 0x1234) == -E.EIO and vm.bugged
    vm2, t2, _, _ = make_td(era)
    assert t2.release_hkid() == 0
    r = t2.remove_external_spte(0, 1, 0x5000)
    assert (r == -E.EIO if era == "v6.18" else r is None) and vm2.bugged


@pytest.mark.parametrize("era", ERAS)
def test_a_pending_private_violation_kills_the_vm_and_a_shared_fetch_is_a_bug(era):
    vm, t, slot, src = make_td(era)
    assert t.handle_ept_violation(vm.vcpus[0], 0x400000, pending=True) == -E.EIO and vm.bugged
    vm2, t2, slot2, _ = make_td(era)
    assert t2.handle_ept_violation(vm2.vcpus[0], SHARED | 0x8000000, exec=True) == -E.EIO
    assert vm2.bugged


@pytest.mark.parametrize("era", ERAS)
def test_shared_faults_use_the_direct_root(era):
    vm, t, slot, src = make_td(era)
    vm.host.populate(slot.userspace_addr + 0x8000000, 0x1000)
    n0 = len(t.module.calls)
    assert t.handle_ept_violation(vm.vcpus[0], SHARED | 0x8000000, write=True) == RET_PF_FIXED
    assert len(t.module.calls) == n0                            # no SEAMCALL for shared memory
    _, lv = vm.mmu_backend.translate(vm.vcpus[0], np.array([0x8000], np.uint64))
    assert lv.tolist() == [1]
    assert t.handle_ept_violation(vm.vcpus[0], 0x8000000) == -E.EFAULT   # shared gfn, private access
    assert vm.vcpus[0].last_fault.memory_fault_exit


def test_a_module_of_another_era_is_refused():
    with pytest.raises(ValueError, match="era"):
        VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", tdx_era="genB",
           tdx_module=TdxModule(era="v6.18"))
    with pytest.raises(TypeError):
        KvmTdx(None, module=object())


@pytest.mark.parametrize("era", ERAS)
def test_punching_a_hole_in_guest_memfd_removes_the_private_pages_first(era):
    """fallocate(PUNCH_HOLE) on a TD's guest_memfd (mirror-tdx.md §6): the
    private leaves of the range leave the mirror and the S-EPT (BLOCK, TRACK,
    REMOVE, WBINVD per page) before the pages go back to the host; other
    pages stay mapped."""
    vm, t, slot, src = make_td(era)
    v = vm.vcpus[0]
    for gpa in (0x400000, 0x401000, 0x402000):
        assert t.handle_ept_violation(v, gpa) == RET_PF_FIXED
    pfns = [slot.gmem.get_pfn(slot, g) for g in (0x400, 0x401)]
    n0 = len(t.module.calls)
    kernel0 = vm.host.phys.nr_kernel
    assert slot.gmem.punch_hole(0x400000, 0x2000) == 2
    removed = [c.args[-1] for c in t.module.calls[n0:] if c.name == "tdh_phymem_page_wbinvd_hkid"]
    assert removed == pfns and vm.host.phys.nr_kernel == kernel0 - 2
    assert 0x400 not in mirror_leaves(vm) and 0x402 in mirror_leaves(vm)
    assert not vm.bugged and vm.audit(raise_=False) == []
    # the hole refaults to a new page
    assert t.handle_ept_violation(v, 0x400000) == RET_PF_FIXED
    assert vm.audit(raise_=False) == []
