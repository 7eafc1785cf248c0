"""The common fault entry (kvmmmu.mmu: kvm_mmu_page_fault -> kvm_mmu_do_page_fault ->
the TDP MMU) against the kernel's rules, as tables: which fault ends FIXED,
SPURIOUS, RETRY, EMULATE or WRITE_PROTECTED, which vCPU statistics move, what
fast_page_fault fixes and what it leaves to the slow path, how
kvm_mmu_hugepage_adjust picks the level, and what bad input does.

Each case builds a small VM (an 8 MiB slot at gpa 0, populated, plus what the
case needs), loads the vCPU's root as vcpu_enter_guest would
(``vcpu.kvm_mmu_reload()``), and compares the return value and the change of
the six fault counters with the table."""
import errno

import numpy as np
import pytest

from kvmmmu._core.defs import (
    RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED,
)
from kvmmmu.host import HostConfig
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEMSLOT_INVALID
from kvmmmu.mmu import (
    EMULTYPE_ALLOW_RETRY_PF, EMULTYPE_PF, PFERR_GUEST_PAGE_MASK, PFERR_PRIVATE_ACCESS,
    KvmPageFault, RecordingMmu, kvm_mmu_do_page_fault,
)
from kvmmmu.stats import VCPU_PF_COUNTERS
from kvmmmu.tdp_mmu import TdpMmu
from kvmmmu.vm import VM, KvmParams
from kvmmmu.warn import KvmBugError

P, W, U, RSVD, F = 1, 2, 4, 8, 16
MiB = 1 << 20
SLOT = 8 * MiB


def _vm(*, host=None, params=None, thp=False, vm_type="default", **kw):
    vm = VM("tdp_mmu", host=host or HostConfig(tdp="ept"), params=params or KvmParams(),
            vm_type=vm_type, **kw)
    if vm_type == "default":
        vm.add_memory(0, SLOT, slot=0, populate=True, thp=thp)
    v = vm.vcpus[0]
    v.kvm_mmu_reload()
    return vm, v


def _stats(v):
    return {n: getattr(v.stat, n) for n in VCPU_PF_COUNTERS}


def _delta(before, after):
    return {k[3:]: after[k] - before[k] for k in before if after[k] != before[k]}


def _leaf(vm, v, gfn):
    sptes, levels = vm.mmu_backend.translate(v, np.array([gfn], np.uint64))
    return int(sptes[0]), int(levels[0])


def _fault(v, gpa, ec):
    before = _stats(v)
    r = v.kvm_mmu_page_fault(gpa, ec)
    return r, _delta(before, _stats(v))


# ---------------------------------------------------------------------------
# the outcomes and the statistics
# ---------------------------------------------------------------------------

def test_a_fresh_fault_is_fixed_then_spurious_on_both_paths():
    vm, v = _vm()
    table = [
        # (gpa, error code, result, counters that move)
        (0x5000, W, RET_PF_FIXED, {"taken": 1, "fixed": 1}),
        # the CPU saw a present, writable translation (a stale TLB): fast path
        (0x5000, W | P, RET_PF_SPURIOUS, {"taken": 1, "fast": 1, "spurious": 1}),
        # "not present" again (another vCPU raced): with A/D bits no fast path;
        # the map finds the leaf already allows the access
        (0x5000, W, RET_PF_SPURIOUS, {"taken": 1, "spurious": 1}),
        (0x6000, U, RET_PF_FIXED, {"taken": 1, "fixed": 1}),                   # a read
        (0x7000, F, RET_PF_FIXED, {"taken": 1, "fixed": 1}),                   # a fetch
    ]
    for gpa, ec, want, moved in table:
        assert _fault(v, gpa, ec) == (want, moved), (hex(gpa), ec)
    assert vm.audit() == []


@pytest.mark.parametrize("caching", [False, True])
def test_a_gfn_outside_every_slot_is_emulated_and_cached_as_mmio(caching):
    vm, v = _vm(params=KvmParams(mmio_caching=caching))
    hole = 64 * MiB
    moved = {"taken": 1, "emulate": 1}
    if caching:
        moved["mmio_spte_created"] = 1
    assert _fault(v, hole, W) == (RET_PF_EMULATE, moved)
    assert v.vcpu_match_mmio_gpa(hole) and v.emulation_type == EMULTYPE_PF
    spte, _ = _leaf(vm, v, hole >> 12)
    assert bool(spte) and bool(vm.fmt.is_mmio_spte(spte)) == caching
    assert vm.audit() == []


def test_reserved_bit_faults_take_the_mmio_path_with_the_memslot_generation():
    vm, v = _vm(params=KvmParams(mmio_caching=True))
    hole = 64 * MiB
    v.kvm_mmu_page_fault(hole, W)                       # installs the MMIO SPTE
    # the MMIO cache answers: straight to emulation, no statistic at all
    assert _fault(v, hole, RSVD) == (RET_PF_EMULATE, {})
    # without the cache: the MMIO SPTE of the current generation answers
    v.mmio_gfn = 0
    assert _fault(v, hole, RSVD) == (RET_PF_EMULATE, {})
    assert v.vcpu_match_mmio_gpa(hole)
    # a memslot change moves the generation: the SPTE is stale (INVALID), the
    # full fault runs and installs a fresh one
    vm.add_memory(128 * MiB, 2 * MiB, slot=3)
    v.mmio_gfn = 0
    assert _fault(v, hole, RSVD) == (RET_PF_EMULATE,
                                     {"taken": 1, "emulate": 1, "mmio_spte_created": 1})
    spte, _ = _leaf(vm, v, hole >> 12)
    assert v.check_mmio_spte(spte)
    # a reserved-bit fault where the entry is no MMIO SPTE (zapped, or RAM
    # now): RETRY, nothing counted
    v.kvm_mmu_page_fault(0x1000, W)
    assert _fault(v, 0x1000, RSVD) == (RET_PF_RETRY, {})
    # a reserved-bit fault on a private access is a kernel WARN, -EFAULT
    assert _fault(v, hole, RSVD | PFERR_PRIVATE_ACCESS) == (-errno.EFAULT, {})
    assert any("reserved-bit fault on a private access" in w for w in vm.warn_sink.warnings)


def test_read_only_slot_invalid_slot_and_a_notifier_in_progress():
    vm, v = _vm()
    ro = vm.add_memory(16 * MiB, 2 * MiB, slot=1, flags=KVM_MEM_READONLY, populate=True)
    table = [
        (16 * MiB, W, RET_PF_EMULATE, {"taken": 1, "emulate": 1}),        # write: emulated
        (16 * MiB, U, RET_PF_FIXED, {"taken": 1, "fixed": 1}),            # read: mapped
    ]
    for gpa, ec, want, moved in table:
        assert _fault(v, gpa, ec) == (want, moved)
    spte, level = _leaf(vm, v, (16 * MiB) >> 12)
    assert level == 1 and not spte & 2                                   # mapped read-only
    ro.flags |= KVM_MEMSLOT_INVALID                                      # as during DELETE/MOVE
    assert _fault(v, 16 * MiB + 0x1000, U) == (RET_PF_RETRY, {"taken": 1})
    assert kvm_mmu_do_page_fault(v, 16 * MiB + 0x1000, U, True) == -errno.EAGAIN   # prefetch
    ro.flags &= ~KVM_MEMSLOT_INVALID
    n = vm.notifier
    with vm.mmu_lock.write():
        n.kvm_mmu_invalidate_begin()
        n.kvm_mmu_invalidate_range_add(0x40, 0x50)
    assert _fault(v, 0x45000, W) == (RET_PF_RETRY, {"taken": 1})          # inside the range
    assert _fault(v, 0x55000, W) == (RET_PF_FIXED, {"taken": 1, "fixed": 1})
    with vm.mmu_lock.write():
        n.kvm_mmu_invalidate_end()
    assert _fault(v, 0x45000, W) == (RET_PF_FIXED, {"taken": 1, "fixed": 1})
    assert vm.audit() == []


def test_an_obsolete_root_makes_faults_stale_until_the_vcpu_reloads():
    vm, v = _vm()
    vm.mmu_backend.kvm_mmu_zap_all_fast()
    assert "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in v.requests
    assert _fault(v, 0x5000, W) == (RET_PF_RETRY, {"taken": 1})
    v.kvm_mmu_reload()
    assert not vm.mmu_backend.vcpu_root[v.index].invalid
    assert _fault(v, 0x5000, W) == (RET_PF_FIXED, {"taken": 1, "fixed": 1})
    vm.arena.rcu_barrier()
    assert vm.audit() == []


def test_without_a_root_the_fault_warns_and_retries():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"))
    vm.add_memory(0, SLOT, slot=0)
    v = vm.vcpus[0]
    assert _fault(v, 0x5000, W) == (RET_PF_RETRY, {})
    assert any("without a valid root" in w for w in vm.warn_sink.warnings)
    assert vm.arena.page_stats["pages_4k"] == 0


def test_private_and_shared_faults_on_a_sw_protected_vm():
    vm, v = _vm(vm_type="sw_protected")
    fd = vm.create_guest_memfd(4 * MiB)
    hva = vm.host.mmap(4 * MiB, populate=True)
    vm.set_user_memory_region(0, 1 << 2, 0, 4 * MiB, hva, 0, fd)          # KVM_MEM_GUEST_MEMFD
    vm.set_memory_attributes(0, 2 * MiB, 0x8)                            # first half private
    # the entry adds PFERR_PRIVATE_ACCESS from the attribute: guest_memfd, 4K
    assert _fault(v, 0x5000, W) == (RET_PF_FIXED, {"taken": 1, "fixed": 1})
    spte, level = _leaf(vm, v, 5)
    assert level == 1 and (spte >> 12) & ((1 << 40) - 1) == vm.guest_memfds[fd].pfn[5]
    assert _fault(v, 0x300000, W) == (RET_PF_FIXED, {"taken": 1, "fixed": 1})  # shared half
    # a private access to a shared gfn: KVM_EXIT_MEMORY_FAULT (-EFAULT)
    assert _fault(v, 0x301000, W | PFERR_PRIVATE_ACCESS) == (-errno.EFAULT, {"taken": 1})
    assert v.last_fault.memory_fault_exit and v.last_fault.is_private
    assert vm.audit() == []


def test_a_private_access_on_a_vm_without_private_memory_is_a_memory_fault_exit():
    vm, v = _vm()
    assert _fault(v, 0x5000, W | PFERR_PRIVATE_ACCESS) == (-errno.EFAULT, {"taken": 1})
    assert v.last_fault.memory_fault_exit
    assert vm.arena.page_stats["pages_4k"] == 0


def test_gfns_above_the_max_gfn_and_beyond_the_root_are_emulated():
    vm, v = _vm(params=KvmParams(mmio_caching=True))         # MAXPHYADDR 46, 4-level root
    table = [
        (1 << 46, W),                  # above kvm_mmu_max_gfn: an MMIO SPTE could not hold it
        ((1 << 48) + 0x5000, W),       # beyond what the root maps at all
        ((1 << 52) - 4096, U),         # the widest gpa a CPU can report
    ]
    for gpa, ec in table:
        assert _fault(v, gpa, ec) == (RET_PF_EMULATE, {"taken": 1, "emulate": 1}), hex(gpa)
    # wider than any MAXPHYADDR: no exit carries it (tests/test_fault_entry_input.py)
    with pytest.raises(ValueError, match="cr2_or_gpa"):
        v.kvm_mmu_page_fault((1 << 64) - 4096, U)
    assert vm.audit() == []


def test_a_write_to_a_write_tracked_gfn_is_write_protected_then_emulated():
    vm, v = _vm()
    vm.external_write_tracking = True
    vm.mmu_first_shadow_root_alloc()                 # allocates gfn_write_track
    slot = vm.memslots[0].id_to_memslot(0)
    v.kvm_mmu_page_fault(0x9000, U)                  # mapped (read)
    slot.arch.gfn_write_track[9] = 1
    try:
        assert kvm_mmu_do_page_fault(v, 0x9000, W | P) == RET_PF_WRITE_PROTECTED
        # the entry turns it into emulation: the TDP MMU has nothing to unprotect
        for ec in (W | P, W | P | PFERR_GUEST_PAGE_MASK):
            assert _fault(v, 0x9000, ec) == (RET_PF_EMULATE, {"taken": 1, "emulate": 1})
            assert v.emulation_type == EMULTYPE_PF | EMULTYPE_ALLOW_RETRY_PF
        # not present, or a read: no page-track check
        assert _fault(v, 0x9000, U | P) == (RET_PF_SPURIOUS, {"taken": 1, "spurious": 1})
    finally:
        slot.arch.gfn_write_track[9] = 0


def test_a_bugged_vm_runs_no_fault_and_changes_nothing():
    vm, v = _vm()
    v.kvm_mmu_page_fault(0x5000, W)
    vm.kvm_bug("test")
    before, pages = _stats(v), dict(vm.arena.page_stats)
    for call in (lambda: v.kvm_mmu_page_fault(0x6000, W),
                 lambda: v.kvm_mmu_prefetch_fault(0x6000, W)):
        with pytest.raises(KvmBugError):
            call()
    assert _stats(v) == before and vm.arena.page_stats == pages


def test_prefetch_faults_count_only_when_fixed():
    vm, v = _vm()
    before = _stats(v)
    assert v.kvm_mmu_prefetch_fault(0x5000, W) == RET_PF_FIXED
    assert _delta(before, _stats(v)) == {"fixed": 1}             # no pf_taken
    before = _stats(v)
    assert v.kvm_mmu_prefetch_fault(0x5000, W) == RET_PF_SPURIOUS
    assert _delta(before, _stats(v)) == {}                       # never counted as spurious


# ---------------------------------------------------------------------------
# fast_page_fault: what it fixes and what it refuses
# ---------------------------------------------------------------------------

def test_fast_page_fault_fixes_a_write_protected_4k_spte_and_marks_it_dirty():
    vm, v = _vm(params=KvmParams(eager_page_split=True))
    slot = vm.memslots[0].id_to_memslot(0)
    for g in range(16):
        v.kvm_mmu_page_fault(g << 12, W)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SLOT, slot.userspace_addr)
    vm.get_dirty_log(0)
    table = [
        (0x3000, W | P, RET_PF_FIXED, {"taken": 1, "fast": 1, "fixed": 1}),   # W restored
        (0x3000, W | P, RET_PF_SPURIOUS, {"taken": 1, "fast": 1, "spurious": 1}),
        (0x4000, U | P, RET_PF_SPURIOUS, {"taken": 1, "spurious": 1}),        # a read: no fast path
        (0x5000, F | P, RET_PF_SPURIOUS, {"taken": 1, "spurious": 1}),        # a fetch: no fast path
    ]
    for gpa, ec, want, moved in table:
        assert _fault(v, gpa, ec) == (want, moved), (hex(gpa), ec)
    bm = vm.get_dirty_log(0)
    assert [i for i in range(64) if int(bm[0]) >> i & 1] == [3]
    assert vm.audit() == []


def test_fast_page_fault_refuses_a_huge_spte_of_a_dirty_logged_slot():
    vm, v = _vm(params=KvmParams(eager_page_split=False), thp=True)
    slot = vm.memslots[0].id_to_memslot(0)
    assert v.kvm_mmu_page_fault(0x5000, W) == RET_PF_FIXED
    assert _leaf(vm, v, 5)[1] == 2                               # a 2M leaf
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SLOT, slot.userspace_addr)
    spte, level = _leaf(vm, v, 5)
    assert level == 2 and not spte & 2                           # write-protected, not split
    # the fast path refuses (only this gfn would be logged); the slow path maps 4K
    assert _fault(v, 0x5000, W | P) == (RET_PF_FIXED, {"taken": 1, "fixed": 1})
    assert _leaf(vm, v, 5)[1] == 1
    assert vm.audit() == []


def test_fast_page_fault_restores_an_access_tracked_spte_without_ad_bits():
    vm, v = _vm(host=HostConfig(tdp="ept", ad_bits=False))
    from kvmmmu.notifiers import KvmGfnRange
    assert v.kvm_mmu_page_fault(0x9000, U) == RET_PF_FIXED
    assert vm.mmu_backend.kvm_age_gfn(KvmGfnRange(vm.memslots[0].id_to_memslot(0), 0, 16))
    assert vm.fmt.is_access_track_spte(_leaf(vm, v, 9)[0])
    # not present (the R/X bits went into the saved field): fixable without A/D bits
    assert _fault(v, 0x9000, U) == (RET_PF_FIXED, {"taken": 1, "fast": 1, "fixed": 1})
    assert not vm.fmt.is_access_track_spte(_leaf(vm, v, 9)[0])
    # a reserved-bit fault never takes the fast path
    assert _fault(v, 0x9000, RSVD) == (RET_PF_RETRY, {})
    assert vm.audit() == []


def test_fast_page_fault_refuses_a_write_to_a_read_only_host_page():
    vm, v = _vm()
    ro = vm.add_memory(16 * MiB, 2 * MiB, slot=1, writable=False, populate=True)
    assert ro.flags == 0
    assert v.kvm_mmu_page_fault(16 * MiB, U) == RET_PF_FIXED
    # not MMU-writable (the host page is read-only): the slow path, which fails the write
    r, moved = _fault(v, 16 * MiB, W | P)
    assert r == -errno.EFAULT and moved == {"taken": 1}


# ---------------------------------------------------------------------------
# kvm_mmu_hugepage_adjust
# ---------------------------------------------------------------------------

def test_hugepage_adjust_clamps_the_level_to_what_the_slot_and_host_allow():
    vm, v = _vm(thp=True)
    assert v.kvm_mmu_page_fault(0x205000, W) == RET_PF_FIXED
    f = v.last_fault
    # max_level starts at 1G; the 8 MiB slot cannot hold a 1G page (lpage_info)
    assert (f.max_level, f.req_level, f.goal_level) == (3, 2, 2)
    assert _leaf(vm, v, 0x205)[1] == 2
    # a slot not aligned like its host mapping: 4K only
    hva = vm.host.mmap(4 * MiB, thp=True, populate=True)
    vm.set_user_memory_region(2, 0, 32 * MiB + 4096, 2 * MiB, hva)
    assert v.kvm_mmu_page_fault(32 * MiB + 8192, W) == RET_PF_FIXED
    assert (v.last_fault.req_level, v.last_fault.goal_level) == (1, 1)
    # a 4K host mapping: 4K
    vm.add_memory(64 * MiB, 4 * MiB, slot=4, populate=True)
    assert v.kvm_mmu_page_fault(64 * MiB, W) == RET_PF_FIXED
    assert v.last_fault.goal_level == 1
    assert vm.audit() == []


def test_hugepage_adjust_with_nx_huge_pages_keeps_req_level_for_fetches():
    vm, v = _vm(thp=True, params=KvmParams(nx_huge_pages=True))
    assert v.kvm_mmu_page_fault(0x205000, F) == RET_PF_FIXED
    f = v.last_fault
    assert f.huge_page_disallowed and (f.req_level, f.goal_level) == (2, 1)
    assert vm.stat.nx_lpage_splits == 1
    assert v.kvm_mmu_page_fault(0x405000, W) == RET_PF_FIXED          # a write: 2M
    assert (v.last_fault.req_level, v.last_fault.goal_level) == (2, 2)
    assert vm.audit() == []


def test_hugepage_adjust_maps_4k_in_a_dirty_logged_slot():
    vm, v = _vm(thp=True)
    slot = vm.memslots[0].id_to_memslot(0)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SLOT, slot.userspace_addr)
    assert v.kvm_mmu_page_fault(0x205000, W) == RET_PF_FIXED
    assert (v.last_fault.req_level, v.last_fault.goal_level) == (1, 1)
    bm = vm.get_dirty_log(0)
    assert int(bm[0x205 // 64]) >> (0x205 % 64) & 1
    assert vm.audit() == []


# ---------------------------------------------------------------------------
# the VM's backend, and bad input
# ---------------------------------------------------------------------------

def test_the_tdp_mmu_vm_gets_its_backend():
    vm = VM("tdp_mmu")
    assert isinstance(vm.mmu_backend, TdpMmu) and vm.mmus == [vm.mmu_backend]
    assert VM("tdp_mmu", backend=None).mmu_backend is None
    rec = RecordingMmu()
    vm2 = VM("tdp_mmu", backend=rec)
    assert vm2.mmus == [rec] and vm2.mmu_backend is None           # hooks only, no faults
    with pytest.raises(LookupError, match="no MMU backend"):
        vm2.vcpus[0].kvm_mmu_page_fault(0x1000, W)
    # the shadow flavours get the shadow MMU (issue 12); backend=None still gives none
    from kvmmmu.shadow_mmu import ShadowMmu
    assert isinstance(VM("shadow").mmu_backend, ShadowMmu)
    assert VM("shadow", backend=None).mmu_backend is None
    # an unused automatic TdpMmu gives way to one registered explicitly
    vm3 = VM("tdp_mmu")
    t = vm3.register_mmu(TdpMmu(vm3))
    assert vm3.mmu_backend is t and vm3.mmus == [t]
    with pytest.raises(ValueError, match="already registered"):
        vm3.register_mmu(t)
    t.kvm_mmu_load(vm3.vcpus[0])
    with pytest.raises(ValueError, match="already has an MMU"):
        vm3.register_mmu(TdpMmu(vm3))
    with pytest.raises(ValueError, match="backend"):
        VM("tdp_mmu", backend="tdp")


@pytest.mark.parametrize("gpa,ec,exc,name", [
    (-1, W, ValueError, "cr2_or_gpa"), (1.5, W, TypeError, "cr2_or_gpa"),
    ("0", W, TypeError, "cr2_or_gpa"), (1 << 64, W, ValueError, "cr2_or_gpa"),
    (0x1000, -1, ValueError, "error_code"), (0x1000, 1 << 64, ValueError, "error_code"),
    (0x1000, 2.0, TypeError, "error_code"),
])
def test_bad_arguments_raise_and_change_nothing(gpa, ec, exc, name):
    vm, v = _vm()
    before, pages = _stats(v), dict(vm.arena.page_stats)
    with pytest.raises(exc, match=name):
        v.kvm_mmu_page_fault(gpa, ec)
    assert _stats(v) == before and vm.arena.page_stats == pages


def test_the_fault_record():
    f = KvmPageFault(0x5000, W | P | U | PFERR_PRIVATE_ACCESS, True, True, True, 5)
    assert (f.write, f.present, f.user, f.exec, f.rsvd, f.is_private, f.prefetch) == \
        (True, True, True, False, False, True, True)
    assert (f.max_level, f.req_level, f.goal_level, f.slot, f.pfn) == (3, 1, 1, None, 0)
    assert f.nx_huge_page_workaround_enabled and f.is_tdp and "gfn=0x5" in repr(f)


def test_zap_all_fast_obsoletes_every_root_under_the_write_lock():
    from kvmmmu import mmu
    vm, v = _vm()
    w = vm.create_vcpu()                           # a vCPU that never loaded a root
    assert v.kvm_mmu_page_fault(0x5000, W) == RET_PF_FIXED
    gen = vm.mmu_valid_gen
    mmu.kvm_mmu_zap_all_fast(vm)
    assert vm.mmu_valid_gen == gen ^ 1 and not vm.mmu_lock.held
    assert all("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in x.requests for x in (v, w))
    assert v.mmu_root.invalid and vm.arena.page_stats["pages_4k"] == 0
    assert _fault(v, 0x5000, W) == (RET_PF_RETRY, {"taken": 1})       # stale until reload
    v.kvm_mmu_reload()
    assert not v.mmu_root.invalid and "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" not in v.requests
    assert _fault(v, 0x5000, W) == (RET_PF_FIXED, {"taken": 1, "fixed": 1})
    w.kvm_mmu_reload()
    assert w.mmu_root is v.mmu_root and v.mmu_root.refcount == 3
    with vm.mmu_lock.write():                      # called with mmu_lock held: the kernel deadlocks
        with pytest.raises(RuntimeError):
            mmu.kvm_mmu_zap_all_fast(vm)
    vm.arena.rcu_barrier()
    assert vm.audit() == []


def test_reset_context_unloads_and_the_next_entry_loads_the_new_role():
    vm, v = _vm()
    assert v.kvm_mmu_page_fault(0x5000, W) == RET_PF_FIXED
    old = v.mmu_root
    v.smm = True                                   # the role changes (SMM address space)
    v.kvm_mmu_reset_context()
    assert v.mmu_root is None
    assert _fault(v, 0x5000, W) == (RET_PF_RETRY, {})                  # no root: WARN, RETRY
    v.kvm_mmu_reload()
    assert v.mmu_root is not old and v.mmu_root.as_id == 1
    v.smm = False
    v.kvm_mmu_reset_context()
    v.kvm_mmu_reload()
    assert v.mmu_root is old                        # the valid root of the role is reused
    vm.arena.rcu_barrier()


def test_hostile_arguments_to_the_scalar_c_entries_raise_in_a_child():
    from _probe import assert_no_crash
    r = assert_no_crash("""
        from kvmmmu.vm import VM, KvmParams
        from kvmmmu.host import HostConfig
        from kvmmmu._core.pt_arena import MmuMemoryCache, PtArena
        from kvmmmu.errors import KvmNoMemoryError
        vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), params=KvmParams(mmio_caching=False))
        vm.add_memory(0, 4 << 20, slot=0, populate=True)
        v = vm.vcpus[0]
        v.kvm_mmu_reload()
        assert v.kvm_mmu_page_fault(0x5000, 2) == 5
        core, root = vm.mmu_backend.core, v.mmu_root.sp
        sc, hc = v.mmu_shadow_page_cache, v.mmu_page_header_cache
        child = vm.arena.get_sp(root)                      # any header read works
        other = PtArena(vm.fmt)
        osc, ohc = MmuMemoryCache(other, "shadow_page"), MmuMemoryCache(other, "page_header")
        osc.topup(5); ohc.topup(5)
        empty = MmuMemoryCache(vm.arena, "shadow_page")
        bad = [
            ((0, 5, 1, 1, 1, 0, 0, sc, hc), ValueError),
            ((1 << 40, 5, 1, 1, 1, 0, 0, sc, hc), ValueError),
            ((root + 1, 5, 1, 1, 1, 0, 0, sc, hc), ValueError),
            ((root, 1 << 36, 1, 1, 1, 0, 0, sc, hc), ValueError),
            ((root, -1, 1, 1, 1, 0, 0, sc, hc), ValueError),
            ((root, 5, 1 << 40, 1, 1, 0, 0, sc, hc), ValueError),
            ((root, 5, 1, 0, 1, 0, 0, sc, hc), ValueError),
            ((root, 5, 1, 4, 1, 0, 0, sc, hc), ValueError),
            ((root, 5, 1, 1, 9, 0, 0, sc, hc), ValueError),
            ((root, 5, 1, 1, 1, -1, 0, sc, hc), ValueError),
            ((root, 5, 1, 1, 1, 64, 0, sc, hc), ValueError),
            ((root, 5, 1, 1, 1, 32, 0, sc, hc), ValueError),     # MMIO SPTE, caching off
            ((root, 5, 1.5, 1, 1, 0, 0, sc, hc), TypeError),
            ((root, 5, 1, 1, 1, 0, 0, osc, ohc), ValueError),     # another arena's caches
            ((root, 5, 1, 1, 1, 0, 0, hc, sc), ValueError),       # swapped kinds
            ((root, 5, 1, 1, 1, 0, 0, empty, hc), KvmNoMemoryError),
            ((root, 5, 1, 1, 1, 0, 0, None, hc), TypeError),
        ]
        for args, exc in bad:
            try:
                core.page_fault_map(*args)
            except exc:
                pass
            else:
                raise AssertionError(f"page_fault_map{args[:7]} did not raise {exc.__name__}")
        assert core.get_last_spte(root, (1 << 64) - 1) == (0, 0)
        for args, exc in [((0, 5), ValueError), ((root, -1), ValueError), ((root, 2.0), TypeError)]:
            try:
                core.get_last_spte(*args)
            except exc:
                pass
            else:
                raise AssertionError(f"get_last_spte{args} did not raise {exc.__name__}")
        # the host mapping goes away behind the slot: the fault fails, no crash
        vm.host.munmap(vm.memslots[0].id_to_memslot(0).userspace_addr, 4 << 20)
        assert v.kvm_mmu_page_fault(0x6000, 2) == -14
        vm.audit()
    """, allow_raise=False)
    assert r.raised is None


def test_eager_split_takes_the_vms_split_caches_not_a_vcpus():
    vm0 = VM("tdp_mmu", host=HostConfig(tdp="ept"), nr_vcpus=0)         # no vCPU yet
    s0 = vm0.add_memory(0, SLOT, slot=0, thp=True, populate=True)
    vm0.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SLOT, s0.userspace_addr)
    assert vm0.audit() == []
    vm, v = _vm(thp=True)
    assert v.kvm_mmu_page_fault(0x205000, W) == RET_PF_FIXED
    held = (v.mmu_shadow_page_cache.nobjs, v.mmu_page_header_cache.nobjs)
    slot = vm.memslots[0].id_to_memslot(0)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SLOT, slot.userspace_addr)
    assert vm.arena.page_stats["pages_4k"] == 512 and vm.arena.page_stats["pages_2m"] == 0
    assert (v.mmu_shadow_page_cache.nobjs, v.mmu_page_header_cache.nobjs) == held
    assert vm.audit() == []


def test_a_tdx_vm_gets_the_tdp_mmu_with_mirror_roots():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx")
    assert isinstance(vm.mmu_backend, TdpMmu) and vm.mmu_backend.mirrored
    assert vm.tdx is not None and not VM("tdp_mmu", host=HostConfig(tdp="ept")).mmu_backend.mirrored


def test_vcpu_threads_fixing_writes_in_one_bitmap_word_lose_no_dirty_bit():
    from _threads import run_in_threads
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), nr_vcpus=4)
    slot = vm.add_memory(0, SLOT, slot=0, populate=True)
    for v in vm.vcpus:
        v.kvm_mmu_reload()
    n = 1024
    for g in range(n):
        vm.vcpus[0].kvm_mmu_page_fault(g << 12, W)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SLOT, slot.userspace_addr)
    vm.get_dirty_log(0)
    results = [[] for _ in vm.vcpus]

    def run(i):
        v = vm.vcpus[i]
        for g in range(i, n, len(vm.vcpus)):       # the threads share every bitmap word
            results[i].append(v.kvm_mmu_page_fault(g << 12, W | P))

    run_in_threads(run, len(vm.vcpus))
    assert all(r == RET_PF_FIXED for rs in results for r in rs)
    assert sum(v.stat.pf_fast for v in vm.vcpus) == n
    bm = vm.get_dirty_log(0)
    assert [i for i in range(n) if int(bm[i // 64]) >> (i % 64) & 1] == list(range(n))


def test_a_map_that_finds_its_mmio_spte_already_in_place_still_emulates():
    """tdp_mmu_map_handle_target_level: an unchanged SPTE is SPURIOUS, but
    an MMIO SPTE still ends in RET_PF_EMULATE (the kernel tests the new SPTE
    after the set, whether or not it changed).  The common entry never gets
    there with a current MMIO SPTE (the reserved-bit fault answers first),
    so the map is called directly."""
    vm, v = _vm(params=KvmParams(mmio_caching=True))
    hole = (64 * MiB) >> 12
    assert _fault(v, hole << 12, W)[0] == RET_PF_EMULATE
    spte, _ = _leaf(vm, v, hole)
    assert vm.fmt.is_mmio_spte(spte)
    t = vm.mmu_backend
    v.mmu_topup_memory_caches(False)
    r = t.core.map_one(t.vcpu_root[v.index].sp, hole, 0, 1, v.mmu_shadow_page_cache,
                       v.mmu_page_header_cache, write=True, mmio_gen=v.mmio_spte_generation())
    assert r == RET_PF_EMULATE
    assert _leaf(vm, v, hole)[0] == spte and vm.audit() == []


def test_mmio_fault_events_have_the_kernels_fields_and_order():
    """``handle_mmio_page_fault`` (mmu.c): ``check_mmio_spte`` is traced with
    the SPTE and both generations once they are compared (also when they
    differ), ``handle_mmio_page_fault`` only for a current MMIO SPTE, with
    the address 0 on a direct MMU; an MMIO-cache hit traces nothing."""
    from kvmmmu import mmutrace
    from kvmmmu._core.spte import get_mmio_spte_generation
    vm, v = _vm(params=KvmParams(mmio_caching=True))
    hole = 64 * MiB
    v.kvm_mmu_page_fault(hole, W)
    spte, _ = _leaf(vm, v, hole >> 12)
    events = ("check_mmio_spte", "handle_mmio_page_fault")
    with mmutrace.capture(*events) as ring:
        v.kvm_mmu_page_fault(hole, RSVD)                # the MMIO cache answers
    assert ring.lines() == []
    v.mmio_gfn = 0
    with mmutrace.capture(*events) as ring:
        v.kvm_mmu_page_fault(hole, RSVD)
    cur = v.mmio_spte_generation()
    assert get_mmio_spte_generation(spte) == cur
    assert ring.lines() == [
        f"check_mmio_spte: spte {spte:x} kvm_gen {cur:x} spte-gen {cur:x} valid 1",
        f"handle_mmio_page_fault: addr:0 gfn {hole >> 12:x} access {vm.fmt.get_mmio_spte_access(spte):x}",
    ]
    vm.add_memory(128 * MiB, 2 * MiB, slot=3)           # the generation moves on
    v.mmio_gfn = 0
    with mmutrace.capture(*events) as ring:
        v.kvm_mmu_page_fault(hole, RSVD)                # stale: INVALID, then the full fault
    new = v.mmio_spte_generation()
    assert new != cur
    assert ring.lines()[0] == f"check_mmio_spte: spte {spte:x} kvm_gen {new:x} spte-gen {cur:x} valid 0"
    assert not any(x.startswith("handle_mmio_page_fault") for x in ring.lines())


@pytest.mark.parametrize("quirk", [True, False])
def test_memslot_delete_zaps_everything_with_the_slot_zap_all_quirk(quirk):
    """``kvm_arch_flush_shadow_memslot`` (mmu.c): a default VM with
    ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` takes ``kvm_mmu_zap_all_fast`` — the TDP
    MMU's roots are invalidated, so every other slot's mappings go too and
    the vCPU loads a new root; with the quirk disabled only the deleted
    slot's leaves go (tdp-mmu.md: zaps by cause)."""
    from kvmmmu import mmutrace
    from kvmmmu._core.spte import is_shadow_present_pte
    vm, v = _vm()
    vm.quirk_slot_zap_all = quirk
    vm.add_memory(16 * MiB, 2 * MiB, slot=1, populate=True)
    for gpa in (0x1000, 16 * MiB):
        assert v.kvm_mmu_page_fault(gpa, W) == RET_PF_FIXED
    old_root = v.mmu_root
    with mmutrace.capture("kvm_mmu_zap_all_fast") as ring:
        vm.delete_memslot(1)
    assert len(ring.lines()) == (1 if quirk else 0)
    assert ("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in v.requests) == quirk
    v.vcpu_enter_guest()
    assert (v.mmu_root is not old_root) == quirk
    spte, _ = _leaf(vm, v, 1)
    assert is_shadow_present_pte(spte) != quirk   # slot 0's leaf survives only without the quirk
    assert _fault(v, 0x1000, W) == (RET_PF_FIXED if quirk else RET_PF_SPURIOUS,
                                    {"taken": 1, "fixed": 1} if quirk else {"taken": 1, "spurious": 1})
    assert vm.audit() == []
