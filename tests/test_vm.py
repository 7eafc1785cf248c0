"""The VM object: configuration, vCPUs and their memory caches, the fault-in
helper, and the auditor."""
import numpy as np
import pytest

from kvmmmu import memslots as M
from kvmmmu.errors import KvmNoMemoryError
from kvmmmu.host import KVM_PFN_NOSLOT, HostConfig
from kvmmmu.vm import (
    MMU_TOPUP_MIN, RET_PF_CONTINUE, RET_PF_EMULATE, RET_PF_RETRY, VM, KvmParams, VmAuditError,
    VmTypeError,
)

MiB = 1 << 20


def test_mmu_flavours_and_formats():
    assert VM().mmu == "tdp_mmu" and VM().fmt.masks()  # EPT + TDP MMU by default
    v = VM(params=KvmParams(tdp_mmu=False))
    assert v.mmu == "tdp" and v.tdp_enabled and not v.tdp_mmu_enabled
    s = VM("shadow")
    assert not s.tdp_enabled and s.kvm_memslots_have_rmaps and s.kvm_page_track_write_tracking_enabled
    assert VM(host=HostConfig(tdp=None)).mmu == "shadow"
    assert VM(host=HostConfig(tdp="npt")).fmt.shadow_mmio_access_mask != 0      # legacy/NPT format
    assert VM(host=HostConfig(tdp="ept")).fmt.shadow_mmio_access_mask == 0      # EPT
    assert not VM(host=HostConfig(tdp="ept", ad_bits=False)).fmt.kvm_ad_enabled
    assert not VM(params=KvmParams(mmio_caching=False)).enable_mmio_caching
    with pytest.raises(ValueError):
        VM("tdp", host=HostConfig(tdp=None))
    with pytest.raises(ValueError):
        VM("tdp_mmu", host=HostConfig(host_64bit=False, maxphyaddr=36, tdp="ept"))
    h32 = VM(host=HostConfig(host_64bit=False, maxphyaddr=36, tdp="ept"))
    assert h32.mmu == "tdp" and not h32.arena.host_64bit


def test_vm_types():
    assert VM(vm_type="sw_protected").has_private_mem
    with pytest.raises(VmTypeError):
        VM("tdp", vm_type="sw_protected")                       # needs the TDP MMU
    with pytest.raises(VmTypeError):
        VM(vm_type="snp")                                       # needs NPT
    snp = VM(host=HostConfig(tdp="npt"), vm_type="snp")
    assert snp.has_private_mem and snp.has_protected_state and not snp.kvm_arch_has_readonly_mem
    tdx = VM(vm_type="tdx")
    assert tdx.kvm_has_mirrored_tdp and tdx.nr_memslot_as_ids == 1


def test_from_host_matches_the_machine():
    vm = VM.from_host()
    from kvmmmu import live
    p = live.kvm_params()
    if p.get("tdp_mmu") == "N":
        assert not vm.tdp_mmu_enabled
    if p.get("mmio_caching") == "N":
        assert not vm.params.mmio_caching and not vm.enable_mmio_caching
    if p.get("eager_page_split"):
        assert vm.params.eager_page_split == (p["eager_page_split"] == "Y")
    vm.audit()


def test_topup_amounts_order_and_refill_policy():
    vm = VM(vm_type="tdx", nr_vcpus=2)
    v = vm.vcpus[0]
    assert MMU_TOPUP_MIN == {"mmu_pte_list_desc_cache": 14, "mmu_external_spt_cache": 5,
                             "mmu_shadow_page_cache": 5, "mmu_shadowed_info_cache": 5,
                             "mmu_page_header_cache": 5}
    v.mmu_topup_memory_caches(maybe_indirect=False)
    n = {k: c.nobjs for k, c in v.caches().items()}
    assert n == {"mmu_pte_list_desc_cache": 40, "mmu_external_spt_cache": 40,
                 "mmu_shadow_page_cache": 40, "mmu_shadowed_info_cache": 0,
                 "mmu_page_header_cache": 40}
    # at or above min: untouched; below: back to capacity
    sps = [vm.arena.alloc_sp(v.mmu_shadow_page_cache, v.mmu_page_header_cache) for _ in range(35)]
    v.mmu_topup_memory_caches(maybe_indirect=True)
    assert v.mmu_shadow_page_cache.nobjs == 5 and v.mmu_shadowed_info_cache.nobjs == 40
    sps.append(vm.arena.alloc_sp(v.mmu_shadow_page_cache, v.mmu_page_header_cache))
    v.mmu_topup_memory_caches(maybe_indirect=True)
    assert v.mmu_shadow_page_cache.nobjs == 40 and v.mmu_page_header_cache.nobjs == 40
    for sp in sps:
        vm.arena.kvm_mmu_free_shadow_page(sp)
    vm.audit()
    plain = VM()
    plain.vcpus[0].mmu_topup_memory_caches(maybe_indirect=False)
    assert plain.vcpus[0].mmu_external_spt_cache.nobjs == 0       # only mirrored TDP


def test_topup_failure_keeps_earlier_caches():
    vm = VM("shadow")
    v = vm.vcpus[0]
    vm.rmap_pool.capacity = 10                                    # fewer than the 14 needed
    with pytest.raises(KvmNoMemoryError):
        v.mmu_topup_memory_caches(maybe_indirect=True)
    assert v.mmu_pte_list_desc_cache.nobjs == 10                 # what it got stays
    assert v.mmu_shadow_page_cache.nobjs == 0                    # never reached
    vm.rmap_pool.capacity = None
    v.mmu_topup_memory_caches(maybe_indirect=True)
    assert v.mmu_pte_list_desc_cache.nobjs == 40                 # 10 < 14: refilled to capacity
    vm.audit()


def test_faultin_noslot_mmio_and_invalid_slot():
    vm = VM("tdp_mmu")
    v = vm.vcpus[0]
    r = vm.kvm_mmu_faultin_pfn(v, 0x1234)
    assert r.ret == RET_PF_CONTINUE and r.pfn == KVM_PFN_NOSLOT and r.slot is None
    assert v.vcpu_match_mmio_gpa(0x1234 << 12)
    nocache = VM("tdp_mmu", params=KvmParams(mmio_caching=False))
    assert nocache.kvm_mmu_faultin_pfn(nocache.vcpus[0], 0x1234).ret == RET_PF_EMULATE
    big = vm.kvm_mmu_faultin_pfn(v, (1 << 46) >> 12)            # above host MAXPHYADDR 46
    assert big.ret == RET_PF_EMULATE
    s = vm.add_memory(0, 2 * MiB)
    s.flags |= M.KVM_MEMSLOT_INVALID                                 # as during a DELETE/MOVE
    assert vm.kvm_mmu_faultin_pfn(v, 1).ret == RET_PF_RETRY
    assert vm.kvm_mmu_faultin_pfn(v, 1, prefetch=True).ret == -11      # -EAGAIN
    s.flags &= ~M.KVM_MEMSLOT_INVALID
    # the vCPU's cached slot is dropped when the generation moves
    assert v.gfn_to_memslot(1) is s
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert v.gfn_to_memslot(1) is None


def test_private_faults_use_guest_memfd():
    pv = VM(vm_type="sw_protected")
    fd = pv.create_guest_memfd(4 * MiB)
    hva = pv.host.mmap(4 * MiB)
    pv.set_user_memory_region(0, M.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB, hva, 0, fd)
    pv.set_memory_attributes(0, 2 * MiB, 0x8)
    v = pv.vcpus[0]
    r = pv.kvm_mmu_faultin_pfn(v, 5, is_private=True, write=True)
    assert r.ret == RET_PF_CONTINUE and r.max_level == 1 and r.map_writable
    assert r.pfn == pv.guest_memfds[fd].pfn[5]
    assert pv.kvm_mmu_faultin_pfn(v, 5, is_private=False).memory_fault_exit
    r2 = pv.kvm_mmu_faultin_pfn(v, 0x300)                      # shared half: host memory
    assert r2.ret == RET_PF_CONTINUE and r2.pfn == pv.host.zero_pfn
    pv.audit()


def test_audit_reports_every_violation_at_once():
    vm = VM("tdp")
    s = vm.add_memory(0, 4 * MiB)
    vm.set_user_memory_region(1, M.KVM_MEM_LOG_DIRTY_PAGES, 8 * MiB, 0x41000, 0x7E00_0000_0000)
    vm.audit()
    t = vm.memslots[0].id_to_memslot(1)
    s.lpage_info[0][0] = M.KVM_LPAGE_MIXED_FLAG                    # MIXED without attributes
    t.dirty_bitmap[-1] = 0xFF                                      # bits beyond npages
    vm.nr_memslot_pages += 1
    vm.notifier.mmu_invalidate_seq += 5
    with pytest.raises(VmAuditError) as ei:
        vm.audit()
    text = "\n".join(ei.value.problems)
    for needle in ("MIXED", "beyond npages", "nr_memslot_pages", "mmu_invalidate_seq"):
        assert needle in text
    assert len(ei.value.problems) >= 4


def test_stats_are_read_through_from_the_core():
    vm = VM()
    vm.arena.kvm_update_page_stats(1, 3)
    vm.arena.kvm_update_page_stats(2, 1)
    vm.kvm_flush_remote_tlbs()
    d = vm.stat.as_dict()
    assert d["pages_4k"] == 3 and d["pages_2m"] == 1
    # no vCPU in guest mode: no IPI, so the kernel leaves remote_tlb_flush alone
    # (the live shadow scenarios show 0 with one vCPU)
    assert d["remote_tlb_flush_requests"] == 1 and d["remote_tlb_flush"] == 0
    vm.stat.mmu_cache_miss += 2
    vm.stat.peak("max_mmu_page_hash_collisions", 7)
    vm.stat.peak("max_mmu_page_hash_collisions", 3)
    assert vm.stat.as_dict()["max_mmu_page_hash_collisions"] == 7
    with pytest.raises(AttributeError):
        vm.stat.pages_4k = 5
    c = vm.vcpus[0].stat
    c.pf_taken += 1
    d = c.as_dict()
    assert d["pf_taken"] == 1 and d["halt_wait_hist"] == [0] * 32
