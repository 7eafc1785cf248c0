"""kvmmmu.mmu, the seam between the VM plumbing and the MMUs, and the VM's
one WARN/KVM_BUG sink (kvmmmu.warn)."""
import errno

import numpy as np
import pytest

from _probe import assert_raises_in_child
from kvmmmu import mmu
from kvmmmu._core.rmap import rmap_remove
from kvmmmu.host import HostConfig
from kvmmmu.notifiers import KvmGfnRange
from kvmmmu.vm import VM, RecordingMmu
from kvmmmu.warn import KvmBugError

MiB = 1 << 20


def _vm(**kw):
    vm = VM("tdp", host=HostConfig(tdp="ept"), **kw)
    slot = vm.add_memory(0, 4 * MiB, thp=True, populate=True)
    return vm, slot


def test_every_backend_hook_is_recorded_by_recordingmmu():
    assert mmu.MMU_BACKEND_HOOKS            # the table is not empty
    for name in mmu.MMU_BACKEND_HOOKS:
        assert name in vars(mmu.RecordingMmu), name


def test_fan_outs_reach_every_registered_mmu_in_order():
    vm, slot = _vm()
    a, b = vm.register_mmu(RecordingMmu()), vm.register_mmu(RecordingMmu())
    rng = KvmGfnRange(slot=slot, start=0, end=16, may_block=True)
    with vm.mmu_lock.write():
        vm.notifier.kvm_mmu_invalidate_begin()
        vm.notifier.kvm_mmu_invalidate_range_add(0, 16)
        vm.kvm_unmap_gfn_range(rng)
        vm.notifier.kvm_mmu_invalidate_end()
    vm.kvm_age_gfn(rng)
    vm.kvm_test_age_gfn(rng)
    vm.kvm_zap_gfn_range(0, 16)
    vm.quirk_slot_zap_all = False              # (else the memslot flush is the fast zap)
    vm.kvm_arch_flush_shadow_memslot(slot)
    vm.quirk_slot_zap_all = True
    vm.kvm_arch_mmu_enable_log_dirty_pt_masked(slot, 64, 0b101)
    vm.kvm_mmu_change_mmu_pages(123)
    vm.kvm_arch_flush_shadow_all()
    mmu.kvm_mmu_zap_all_fast(vm)
    want = ["kvm_unmap_gfn_range", "kvm_age_gfn", "kvm_test_age_gfn", "kvm_zap_gfn_range",
            "kvm_arch_flush_shadow_memslot", "kvm_arch_mmu_enable_log_dirty_pt_masked",
            "kvm_mmu_change_mmu_pages", "kvm_arch_flush_shadow_all", "kvm_mmu_zap_all_fast"]
    assert a.names() == want and b.calls == a.calls
    assert vm.n_max_mmu_pages == 123
    assert vm.warn_sink.records == []


def test_a_flush_is_asked_for_when_any_mmu_asks():
    vm, slot = _vm()
    vm.register_mmu(RecordingMmu())
    vm.register_mmu(RecordingMmu(kvm_zap_gfn_range=True))
    assert vm.kvm_zap_gfn_range(0, 16) is True


def test_lpage_counters_refuse_a_gfn_outside_the_slot_and_change_nothing():
    vm = VM("tdp", host=HostConfig(tdp="ept"))
    s = vm.add_memory(4 * MiB, 4 * MiB, thp=True, populate=True)      # gfns 0x400..0x7ff
    before = [a.copy() for a in s.lpage_info]
    snap = vm.snapshot()
    for gfn in (0x3ff, 0x800, 0, 1 << 40):
        with pytest.raises(ValueError, match="outside the slot"):
            vm.kvm_mmu_gfn_disallow_lpage(s, gfn)
        with pytest.raises(ValueError, match="outside the slot"):
            vm.kvm_mmu_gfn_allow_lpage(s, gfn)
    with pytest.raises(TypeError, match="gfn"):
        vm.kvm_mmu_gfn_disallow_lpage(s, 0x400 + 0.5)
    assert all((x == y).all() for x, y in zip(before, s.lpage_info))
    assert vm.snapshot() == snap and vm.audit(raise_=False) == []


def test_batch_max_mapping_level_checks_its_input():
    vm, s = _vm()
    with pytest.raises(TypeError, match="gfns"):
        vm.kvm_mmu_max_mapping_level_array(s, np.arange(4, dtype=np.float64))
    with pytest.raises(TypeError, match="gfns"):
        vm.kvm_mmu_max_mapping_level_array(s, [1, 2, 3])
    with pytest.raises(ValueError, match="slot"):
        vm.kvm_mmu_max_mapping_level_array(s, np.array([0x400], dtype=np.uint64))
    with pytest.raises(ValueError, match="out"):
        vm.kvm_mmu_max_mapping_level_array(s, np.arange(4, dtype=np.uint64),
                                           out=np.empty(3, np.uint8))
    g = np.arange(0x400, dtype=np.uint64)
    assert (vm.kvm_mmu_max_mapping_level_array(s, g)
            == [vm.kvm_mmu_max_mapping_level(s, int(x)) for x in g]).all()


def test_a_warn_is_recorded_once_in_the_sink_and_the_vm_goes_on():
    vm, slot = _vm()
    assert vm.kvm_zap_gfn_range(5, 5) is False           # empty range: WARN, nothing done
    assert [r.site for r in vm.warn_sink.records] == ["kvm_zap_gfn_range"]
    assert vm.notifier.warnings == vm.warn_sink.warnings
    assert not vm.warn_sink.bugged and vm.bugged == []
    vm.add_memory(8 * MiB, 2 * MiB)                      # ioctls still work
    assert vm.audit(raise_=False) == ["WARN: kvm_zap_gfn_range: empty range"]


def test_rmap_data_corruption_bugs_the_vm_and_later_ioctls_fail_with_eio():
    vm = VM("shadow")
    s = vm.add_memory(0, 2 * MiB)
    v = vm.create_vcpu()
    with pytest.raises(RuntimeError, match="not in the level-1 rmap"):
        rmap_remove(s.arch.rmap, 5, 0x1000_0008)        # an SPTE that was never added
    assert vm.warn_sink.bugged and vm.bugged and "rmap" in vm.bugged[0]
    for ioctl in (lambda: vm.add_memory(4 * MiB, 2 * MiB), vm.create_vcpu,
                  lambda: vm.get_dirty_log(0), lambda: vm.set_memory_attributes(0, 4096, 0),
                  lambda: vm.kvm_mmu_faultin_pfn(v, 5)):
        with pytest.raises(KvmBugError) as ei:
            ioctl()
        assert ei.value.errno == errno.EIO


def test_kvm_bug_marks_the_vm_bugged():
    vm, _ = _vm()
    vm.kvm_bug("fault gfn has the alias bit")
    with pytest.raises(KvmBugError, match="alias bit"):
        vm.delete_memslot(0)
    assert vm.memslots[0].id_to_memslot(0) is not None        # nothing was done


def test_the_arena_and_rmap_pool_report_to_the_vms_sink():
    vm = VM("shadow")
    assert vm.arena.warn_sink is vm.warn_sink and vm.rmap_pool.warn_sink is vm.warn_sink


def test_below_vm_layers_do_not_reach_into_the_vm():
    assert_raises_in_child("""
        import sys
        import kvmmmu.memslots, kvmmmu.memattrs, kvmmmu.notifiers, kvmmmu.mmu
        assert "kvmmmu.vm" not in sys.modules
        raise LookupError("done")
    """, LookupError, match="done")


class _FailingMmu(RecordingMmu):
    def kvm_unmap_gfn_range(self, rng):
        super().kvm_unmap_gfn_range(rng)
        raise RuntimeError("MMU bug in kvm_unmap_gfn_range")


def test_a_backend_that_raises_in_an_invalidation_leaves_no_invalidation_open():
    vm = VM("tdp", host=HostConfig(tdp="ept"))
    slot = vm.add_memory(0, 4 * MiB, populate=True)
    hva = slot.userspace_addr
    ok = vm.register_mmu(RecordingMmu())
    vm.register_mmu(_FailingMmu())
    seq = vm.notifier.mmu_invalidate_seq
    with pytest.raises(RuntimeError, match="MMU bug"):
        vm.host.munmap(hva, 4096)
    n = vm.notifier
    assert n.mmu_invalidate_in_progress == 0 and n.mn_active_invalidate_count == 0
    assert n.mmu_invalidate_seq >= seq
    assert vm.host.open_invalidations == ()
    assert ok.names()[0] == "kvm_unmap_gfn_range"
    assert vm.audit(raise_=False) == []
    # and the next invalidation works normally
    vm.mmus.pop()
    vm.host.munmap(hva, 4096)
    assert n.mmu_invalidate_in_progress == 0 and vm.audit(raise_=False) == []
