"""gfn write tracking (kvmmmu.page_track): counters, lpage disallow,
write protection of existing SPTEs, the external API and its errors."""
import pytest

from kvmmmu import page_track as pt
from kvmmmu._core.defs import RET_PF_EMULATE, RET_PF_FIXED
from kvmmmu._core.guest_walk import PFERR_PRESENT_MASK as P_, PFERR_WRITE_MASK as W_
from kvmmmu.host import HostConfig
from kvmmmu.vm import VM

MiB = 1 << 20


def _vm(mmu="shadow"):
    vm = VM(mmu, host=HostConfig(tdp=None if mmu == "shadow" else "ept"))
    vm.add_memory(0, 8 * MiB)
    return vm


def test_external_tracking_counts_disallows_huge_pages_and_write_protects():
    vm = VM("tdp", host=HostConfig(tdp="ept"))
    vm.add_memory(0, 8 * MiB)
    v = vm.vcpus[0]
    v.vcpu_enter_guest()
    assert v.kvm_mmu_page_fault(0x5000, W_) == RET_PF_FIXED
    pt.kvm_page_track_register_notifier(vm, type("N", (), {"track_write": lambda s, g, d: None})())
    slot = vm.memslots[0].id_to_memslot(0)
    pt.kvm_write_track_add_gfn(vm, 5)
    assert int(slot.arch.gfn_write_track[5]) == 1
    assert slot.arch.disallow_lpage_ledger.get(5) == 1
    assert pt.kvm_gfn_is_write_tracked(vm, slot, 5)
    # the existing writable SPTE lost W (and MMU-writable): the next write is emulated
    assert v.kvm_mmu_page_fault(0x5000, W_ | P_) == RET_PF_EMULATE
    pt.kvm_write_track_add_gfn(vm, 5)
    assert int(slot.arch.gfn_write_track[5]) == 2
    pt.kvm_write_track_remove_gfn(vm, 5)
    pt.kvm_write_track_remove_gfn(vm, 5)
    assert int(slot.arch.gfn_write_track[5]) == 0 and 5 not in slot.arch.disallow_lpage_ledger
    assert v.kvm_mmu_page_fault(0x5000, W_ | P_) == RET_PF_FIXED
    assert vm.audit() == []


def test_counter_underflow_and_overflow_warn_and_change_nothing():
    vm = _vm()
    slot = vm.memslots[0].id_to_memslot(0)
    assert not pt.update_gfn_write_track(vm, slot, 7, -1)
    assert int(slot.arch.gfn_write_track[7]) == 0
    slot.arch.gfn_write_track[7] = pt.USHRT_MAX
    assert not pt.update_gfn_write_track(vm, slot, 7, 1)
    assert int(slot.arch.gfn_write_track[7]) == pt.USHRT_MAX
    assert vm.warn_sink.counts["update_gfn_write_track"] == 2


@pytest.mark.parametrize("gfn", [0x10000, -1, "5"])
def test_bad_gfn_raises_and_changes_nothing(gfn):
    vm = _vm()
    slot = vm.memslots[0].id_to_memslot(0)
    before = slot.arch.gfn_write_track.copy()
    with pytest.raises((pt.PageTrackError, TypeError, ValueError)):
        pt.kvm_write_track_add_gfn(vm, gfn)
    assert (slot.arch.gfn_write_track == before).all()


def test_tracking_needs_write_tracking_enabled():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"))
    vm.add_memory(0, 8 * MiB)
    with pytest.raises(pt.PageTrackError, match="not enabled"):
        pt.kvm_write_track_add_gfn(vm, 5)
    assert not pt.kvm_gfn_is_write_tracked(vm, vm.memslots[0].id_to_memslot(0), 5)


def test_notifier_needs_track_write():
    vm = _vm()
    with pytest.raises(TypeError, match="track_write"):
        pt.kvm_page_track_register_notifier(vm, object())
    seen = []
    n = type("N", (), {"track_write": lambda s, g, d: seen.append((g, d))})()
    pt.kvm_page_track_register_notifier(vm, n)
    pt.kvm_page_track_write_notify(vm, 0x1000, b"ab")
    assert seen == [(0x1000, b"ab")]
    pt.kvm_page_track_unregister_notifier(vm, n)
