"""MMU notifiers: the fault/invalidation race, hva -> gfn dispatch, and every
host event driving invalidate_range_start/end or aging."""
import pytest

from kvmmmu import notifiers as N
from kvmmmu.host import HostConfig, PMD_SIZE
from kvmmmu.vm import RET_PF_CONTINUE, RET_PF_RETRY, VM, RecordingMmu

MiB = 1 << 20


@pytest.fixture
def vm():
    vm = VM("tdp_mmu")
    vm.rec = vm.register_mmu(RecordingMmu())
    vm.slot = vm.add_memory(0, 8 * MiB, thp=True, populate=True)
    vm.hva = vm.slot.userspace_addr
    yield vm
    assert vm.audit(raise_=False) == []


def stale(vm, seq, gfn):
    with vm.mmu_lock.write():
        return vm.is_page_fault_stale(seq, gfn, vm.slot)


# --------------------------------------------------------------------------------
# the race the issue asks for
# --------------------------------------------------------------------------------

def test_fault_racing_an_invalidation_is_stale(vm):
    """begin before the fault, end after it: stale (at every check)."""
    gfn = 0x123
    rng = vm.host.invalidate_begin(vm.hva, vm.hva + 2 * MiB)          # covers gfns [0, 0x200)
    assert vm.notifier.mmu_invalidate_in_progress == 1
    seq = vm.notifier.mmu_invalidate_seq                              # the fault's snapshot
    r = vm.kvm_mmu_faultin_pfn(vm.vcpus[0], gfn, write=True)
    assert r.ret == RET_PF_RETRY                                      # the lockless pre-check
    assert stale(vm, seq, gfn)                                        # under mmu_lock: in range
    vm.host.invalidate_end(rng)
    assert stale(vm, seq, gfn)                                        # the sequence moved
    assert stale(vm, r.mmu_seq, gfn)


def test_fault_snapshotted_before_begin_checked_after_end_is_stale(vm):
    seq = vm.notifier.mmu_invalidate_seq
    with vm.host.invalidation(vm.hva, vm.hva + 4096):
        pass
    assert stale(vm, seq, 0)


def test_fault_after_the_end_is_not_stale(vm):
    gfn = 0x123
    with vm.host.invalidation(vm.hva, vm.hva + 2 * MiB):
        pass
    r = vm.kvm_mmu_faultin_pfn(vm.vcpus[0], gfn, write=True)
    assert r.ret == RET_PF_CONTINUE and r.pfn and r.map_writable
    assert not stale(vm, r.mmu_seq, gfn)


def test_in_progress_invalidation_elsewhere_does_not_block_a_fault_until_it_ends(vm):
    rng = vm.host.invalidate_begin(vm.hva, vm.hva + 2 * MiB)         # gfns [0, 0x200)
    r = vm.kvm_mmu_faultin_pfn(vm.vcpus[0], 0x300, write=False)      # outside the range
    assert r.ret == RET_PF_CONTINUE
    assert not stale(vm, r.mmu_seq, 0x300)
    vm.host.invalidate_end(rng)
    assert stale(vm, r.mmu_seq, 0x300)                                # any end moves the sequence


def test_ranges_of_nested_invalidations_accumulate(vm):
    a = vm.host.invalidate_begin(vm.hva, vm.hva + 4096)
    b = vm.host.invalidate_begin(vm.hva + 6 * MiB, vm.hva + 6 * MiB + 4096)
    n = vm.notifier
    assert n.mmu_invalidate_in_progress == 2
    assert (n.mmu_invalidate_range_start, n.mmu_invalidate_range_end) == (0, 0x601)
    seq = n.mmu_invalidate_seq
    vm.host.invalidate_end(a)
    # still in progress: the union persists until every invalidation ended
    assert n.mmu_invalidate_in_progress == 1 and n.mmu_invalidate_range_end == 0x601
    assert stale(vm, seq + 1, 0x300)
    vm.host.invalidate_end(b)
    assert n.mmu_invalidate_seq == seq + 2 and n.mmu_invalidate_in_progress == 0
    assert not stale(vm, seq + 2, 0x300)


def test_invalidation_without_memslot_changes_nothing(vm):
    other = vm.host.mmap(2 * MiB)
    seq = vm.notifier.mmu_invalidate_seq
    with vm.host.invalidation(other, other + 2 * MiB):
        assert vm.notifier.mmu_invalidate_in_progress == 0
        assert vm.notifier.mn_active_invalidate_count == 1
    assert vm.notifier.mmu_invalidate_seq == seq
    assert vm.notifier.mn_active_invalidate_count == 0
    assert not stale(vm, seq, 0)


def test_unsafe_and_locked_checks_agree_at_rest(vm):
    seq = vm.notifier.mmu_invalidate_seq
    assert not N.mmu_invalidate_retry_gfn_unsafe(vm, seq, 0)
    assert N.mmu_invalidate_retry_gfn_unsafe(vm, seq - 1, 0)
    with pytest.raises(RuntimeError):
        N.mmu_invalidate_retry_gfn(vm, seq, 0)                       # needs mmu_lock
    with vm.mmu_lock.read():
        assert not N.mmu_invalidate_retry_gfn(vm, seq, 0)


def test_obsolete_root_is_stale_without_notifier_activity(vm):
    seq = vm.notifier.mmu_invalidate_seq
    with vm.mmu_lock.write():
        assert vm.is_page_fault_stale(seq, 0, vm.slot, root_obsolete=True)
        assert vm.is_page_fault_stale(seq, 0, vm.slot, root_has_sp=False,
                                      free_obsolete_roots_pending=True)
        assert not vm.is_page_fault_stale(seq, 0, None)               # MMIO: no notifier check


# --------------------------------------------------------------------------------
# hva -> gfn dispatch
# --------------------------------------------------------------------------------

def test_dispatch_to_every_slot_and_address_space_mapping_the_hva():
    vm = VM("tdp_mmu")
    rec = vm.register_mmu(RecordingMmu())
    hva = vm.host.mmap(8 * MiB, populate=True)
    vm.set_user_memory_region(0, 0, 0x100000000, 8 * MiB, hva)                 # gfn 0x100000
    vm.set_user_memory_region(1, 0, 0, 4 * MiB, hva + 4 * MiB)                   # alias, gfn 0
    vm.set_user_memory_region(1 << 16, 0, 0, 8 * MiB, hva)                       # SMM view
    rec.calls.clear()
    vm.host.munmap(hva + 5 * MiB, 4096)
    assert sorted(c[1:5] for c in rec.calls) == [(0, 0, 0x100500, 0x100501), (0, 1, 0x100, 0x101),
                                                 (1, 0, 0x500, 0x501)]
    assert vm.notifier.mmu_invalidate_seq == 1          # one begin/end for all of them
    vm.audit()


def test_partial_pages_round_outward():
    vm = VM("tdp_mmu")
    rec = vm.register_mmu(RecordingMmu())
    s = vm.add_memory(0, 4 * MiB)
    rec.calls.clear()
    vm.mmu_notifier.invalidate_range_start(vm.host, _rng(s.userspace_addr + 0x1800, s.userspace_addr + 0x2001))
    assert rec.calls[-1][3:5] == (1, 3)
    vm.mmu_notifier.invalidate_range_end(vm.host, _rng(s.userspace_addr + 0x1800, s.userspace_addr + 0x2001))


def _rng(a, b):
    from kvmmmu.host import MmuNotifierRange
    return MmuNotifierRange(a, b)


# --------------------------------------------------------------------------------
# host events
# --------------------------------------------------------------------------------

def _unmaps(rec):
    return [c[3:5] for c in rec.calls if c[0] == "kvm_unmap_gfn_range"]


def test_munmap_invalidates_and_faults_then_fail(vm):
    vm.rec.calls.clear()
    seq = vm.notifier.mmu_invalidate_seq
    vm.host.munmap(vm.hva + 2 * MiB, 2 * MiB)
    assert _unmaps(vm.rec) == [(0x200, 0x400)]
    assert vm.notifier.mmu_invalidate_seq == seq + 1
    r = vm.kvm_mmu_faultin_pfn(vm.vcpus[0], 0x300)
    assert r.ret == -14                                                 # -EFAULT: no VMA


def test_munmap_straddling_a_thp_splits_it_first(vm):
    vm.rec.calls.clear()
    vm.host.munmap(vm.hva + MiB, 4096)                                  # inside THP 0
    assert _unmaps(vm.rec) == [(0, 0x200), (0x100, 0x101)]               # split, then unmap
    assert vm.host.host_pfn_mapping_level(vm.hva) == 1
    assert vm.host.host_pfn_mapping_level(vm.hva + 2 * MiB) == 2


def test_thp_split_and_collapse(vm):
    assert vm.kvm_mmu_max_mapping_level(vm.slot, 0x210) == 2
    vm.rec.calls.clear()
    old = vm.host.follow_pte(vm.hva + 2 * MiB)[0]
    assert vm.host.split_huge_pmd(vm.hva + 2 * MiB) == 1
    assert _unmaps(vm.rec) == [(0x200, 0x400)]
    assert vm.host.follow_pte(vm.hva + 2 * MiB)[0] == old                 # same pfns
    assert vm.kvm_mmu_max_mapping_level(vm.slot, 0x210) == 1
    vm.rec.calls.clear()
    assert vm.host.collapse_huge_page(vm.hva + 2 * MiB)
    assert _unmaps(vm.rec) == [(0x200, 0x400)]
    new = vm.host.follow_pte(vm.hva + 2 * MiB)[0]
    assert new != old and new % 512 == 0
    assert vm.kvm_mmu_max_mapping_level(vm.slot, 0x210) == 2


def test_migration_swap_and_cow(vm):
    v = vm.vcpus[0]
    pfn0 = vm.kvm_mmu_faultin_pfn(v, 0x410).pfn
    vm.rec.calls.clear()
    assert vm.host.migrate_pages(vm.hva + 4 * MiB, 2 * MiB) == 512
    assert _unmaps(vm.rec) == [(0x400, 0x600)]
    r = vm.kvm_mmu_faultin_pfn(v, 0x410)
    assert r.pfn != pfn0 and r.pfn % 512 == 0x10
    vm.rec.calls.clear()
    assert vm.host.swap_out(vm.hva + 6 * MiB, 4096) == 1
    assert _unmaps(vm.rec) == [(0x600, 0x800), (0x600, 0x601)]          # THP split, then swap
    swapped = vm.host.events["swap_in"]
    r = vm.kvm_mmu_faultin_pfn(v, 0x600, write=True)
    assert r.ret == 0 and vm.host.events["swap_in"] == swapped + 1
    # zero page: a read maps it read-only; the write copies it under a notifier
    z = vm.add_memory(1 << 30, 2 * MiB)
    vm.rec.calls.clear()
    g = (1 << 30) >> 12
    r = vm.kvm_mmu_faultin_pfn(v, g)
    assert r.pfn == vm.host.zero_pfn and not r.map_writable
    r = vm.kvm_mmu_faultin_pfn(v, g, write=True)
    assert r.pfn != vm.host.zero_pfn and r.map_writable
    assert r.ret == RET_PF_RETRY              # the COW's own invalidation made this fault stale
    assert _unmaps(vm.rec) == [(g, g + 1)]
    assert vm.kvm_mmu_faultin_pfn(v, g, write=True).ret == RET_PF_CONTINUE
    assert z.id == 1


def test_memory_failure_and_readonly(vm):
    v = vm.vcpus[0]
    assert vm.host.memory_failure(vm.hva + 4096)
    r = vm.kvm_mmu_faultin_pfn(v, 1)
    assert r.ret == RET_PF_RETRY                                        # KVM_PFN_ERR_HWPOISON
    ro = vm.add_memory(1 << 30, 2 * MiB, flags=2)                        # READONLY slot, r/o VMA
    r = vm.kvm_mmu_faultin_pfn(v, (1 << 30) >> 12, write=True)
    assert r.ret == 2                                                   # RET_PF_EMULATE
    r = vm.kvm_mmu_faultin_pfn(v, (1 << 30) >> 12)
    assert r.ret == 0 and not r.map_writable
    assert ro.flags == 2


def test_mprotect_write_protects_under_a_notifier(vm):
    vm.rec.calls.clear()
    vm.host.mprotect(vm.hva, 8 * MiB, writable=False)
    assert _unmaps(vm.rec) == [(0, 0x800)]
    r = vm.kvm_mmu_faultin_pfn(vm.vcpus[0], 5, write=True)
    assert r.ret == -14


def test_aging_is_lockless_and_reports_young():
    vm = VM("tdp_mmu")
    rec = vm.register_mmu(RecordingMmu(kvm_age_gfn=True, kvm_test_age_gfn=True))
    s = vm.add_memory(0, 4 * MiB, populate=True)
    seq = vm.notifier.mmu_invalidate_seq
    assert vm.host.age(s.userspace_addr, 4 * MiB)
    assert [c for c in rec.calls if c[0] == "kvm_age_gfn"] == [("kvm_age_gfn", 0, 0, 0, 0x400)]
    assert vm.host.test_young(s.userspace_addr + 8192)
    assert rec.calls[-1] == ("kvm_test_age_gfn", 0, 0, 2, 3)
    assert vm.notifier.mmu_invalidate_seq == seq                   # aging is not an invalidation
    rec.returns.clear()
    assert not vm.host.age(s.userspace_addr, 4 * MiB)                # host A bits were cleared
    flushes = vm.stat.remote_tlb_flush_requests
    rec.returns["kvm_age_gfn"] = True
    vm.host.age(s.userspace_addr, 4 * MiB, flush=True)
    assert vm.stat.remote_tlb_flush_requests == flushes              # x86 elides the flush
    vm.audit()


def test_release_zaps_everything():
    vm = VM("tdp_mmu")
    rec = vm.register_mmu(RecordingMmu())
    vm.add_memory(0, 2 * MiB, populate=True)
    vm.host.exit_mmap()
    assert rec.names()[-1] == "kvm_arch_flush_shadow_all"


def test_kvm_zap_gfn_range_is_an_invalidation():
    vm = VM("tdp_mmu")
    rec = vm.register_mmu(RecordingMmu(kvm_zap_gfn_range=True))
    vm.add_memory(0, 2 * MiB)
    seq = vm.notifier.mmu_invalidate_seq
    assert vm.kvm_zap_gfn_range(0, 0x100)
    assert rec.calls[-1] == ("kvm_zap_gfn_range", 0, 0x100)
    assert vm.notifier.mmu_invalidate_seq == seq + 1
    vm.audit()


def test_unbalanced_end_is_caught():
    vm = VM("tdp_mmu")
    s = vm.add_memory(0, 2 * MiB)
    vm.mmu_notifier.invalidate_range_end(vm.host, _rng(s.userspace_addr, s.userspace_addr + 4096))
    problems = vm.audit(raise_=False)
    assert any("negative" in p or "end" in p for p in problems)
