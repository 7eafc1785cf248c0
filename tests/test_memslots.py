"""Memslots: the bad-region table (model and live kernel), lpage_info for
hand-computed slots, generations, metadata, dirty logging, guest_memfd."""
import errno

import numpy as np
import pytest

from kvmmmu import live
from kvmmmu import memslots as M
from kvmmmu.errors import KvmNoMemoryError
from kvmmmu.host import HostConfig
from kvmmmu.vm import VM, KvmParams, RecordingMmu

from _vmtables import BADFD, CASES, GMEM_SIZE, H, THIS_HOST, THIS_HOST_PARAMS

MiB = 1 << 20


def this_host_vm(**kw):
    return VM(None, host=THIS_HOST, params=THIS_HOST_PARAMS, **kw)


def _apply_model(vm, req, gmem_fd):
    ioctl, slot, flags, gpa, size, hva, off, gm = req
    fd = {0: 0, "GMEM": gmem_fd, "BADFD": BADFD}[gm]
    return vm.set_user_memory_region(slot, flags, gpa, size, hva, off, fd, v1=(ioctl == "v1"))


def run_model_case(vm, setup, probe):
    """Returns (exception or None, snapshot before, snapshot after)."""
    fd = vm.create_guest_memfd(GMEM_SIZE)
    for req in setup:
        _apply_model(vm, req, fd)
    before = vm.snapshot()
    try:
        _apply_model(vm, probe, fd)
    except M.KvmMemslotError as e:
        return e, before, vm.snapshot()
    return None, before, vm.snapshot()


def _gens(snap):
    return [g for g, _ in snap[0]]


def _without_gens(snap):
    return (tuple(s for _, s in snap[0]),) + snap[1:]


@pytest.mark.parametrize("name,setup,probe,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_region_table_model(name, setup, probe, expected):
    vm = this_host_vm()
    rec = vm.register_mmu(RecordingMmu())
    exc, before, after = run_model_case(vm, setup, probe)
    if expected is None:
        assert exc is None, f"{name}: model rejected with {exc!r}"
    else:
        assert type(exc) is expected, f"{name}: expected {expected.__name__}, got {exc!r}"
        assert exc.errno == expected.errno
        if name == "move_beyond_max_gfn":
            # the kernel's own exception: the INVALID copy was published and
            # reverted (two generation bumps) and everything zapped: a default VM
            # with KVM_X86_QUIRK_SLOT_ZAP_ALL takes kvm_mmu_zap_all_fast, which asks
            # every vCPU to free its obsolete roots (the only other change)
            assert _without_gens(after)[:7] == _without_gens(before)[:7]
            assert all(set(r) <= {"KVM_REQ_MMU_FREE_OBSOLETE_ROOTS"} for r in after[7])
            assert [a - b for a, b in zip(_gens(after), _gens(before))] == [2 * vm.nr_memslot_as_ids]
            assert "kvm_mmu_zap_all_fast" in rec.names()
            assert "kvm_arch_flush_shadow_memslot" not in rec.names()
        else:
            assert after == before, f"{name}: VM changed by a failed call"
    vm.audit()


def test_table_covers_every_exception_class():
    seen = {c[3] for c in CASES if c[3] is not None}
    for cls in (M.MemslotAlignmentError, M.MemslotUserspaceAddressError, M.MemslotTooLargeError,
                M.MemslotWrapError, M.MemslotGfnLimitError, M.MemslotIdError, M.MemslotFlagsError,
                M.MemslotOverlapError, M.MemslotNotFoundError, M.MemslotImmutableError,
                M.GuestMemfdBadFdError, M.MemslotGuestMemfdOffsetError, M.GuestMemfdBindError):
        assert cls in seen, cls


@pytest.mark.live
@pytest.mark.skipif(live.kvm_problem() is not None, reason=str(live.kvm_problem()))
def test_bad_region_table_live():
    """The same table against KVM_SET_USER_MEMORY_REGION(2) of this machine:
    accept/reject and errno must agree with the model configured like the host."""
    from kvmmmu.live import memory as LM
    host = HostConfig.from_system()
    params = KvmParams.from_system()
    if not host.guest_memfd:
        pytest.skip("this host's KVM reports no guest_memfd (KVM_CAP_GUEST_MEMFD = 0); "
                    "the table's GMEM cases need it")
    mismatches = []
    with live.Kvm() as kvm:
        for name, setup, probe, expected in CASES:
            model = VM(None, host=host, params=params)
            exc, _, _ = run_model_case(model, setup, probe)
            want = 0 if exc is None else -exc.errno
            with kvm.create_vm() as lvm:
                gfd = LM.create_guest_memfd(lvm, GMEM_SIZE)
                fds = {0: 0, "GMEM": gfd, "BADFD": BADFD}
                try:
                    def call(req):
                        ioctl, slot, flags, gpa, size, hva, off, gm = req
                        if ioctl == "v1":
                            return LM.set_user_memory_region(lvm, slot, flags, gpa, size, hva)
                        return LM.set_user_memory_region2(lvm, slot, flags, gpa, size, hva, off, fds[gm])
                    for req in setup:
                        assert call(req) == 0, f"{name}: live setup failed"
                    got = call(probe)
                finally:
                    if gfd >= 0:
                        import os
                        os.close(gfd)
            if got != want:
                mismatches.append((name, want, got))
    assert not mismatches, "model vs live (name, model, live): %r" % mismatches


# --------------------------------------------------------------------------------
# lpage_info for hand-computed slots
# --------------------------------------------------------------------------------

G1 = 1 << 18            # pages per 1 GiB frame

LPAGE_CASES = [
    # (base_gfn, npages, hva, expected 2M list (or (len, fill)), expected 1G list)
    ("inside_one_2m_frame", 0x10, 0x10, H + 0x10 * 4096, [1], [1]),
    ("aligned_3_frames", 0x200, 0x600, H + 0x200 * 4096, [0, 0, 0], [1]),
    ("both_ends_misaligned", 0x1FF, 0x402, H + 0x1FF * 4096, [1, 0, 0, 1], [1]),
    ("hva_not_congruent", 0x200, 0x400, H + 0x201 * 4096, [1, 1], [1]),
    ("two_aligned_gib", G1, 2 * G1, H + G1 * 4096, (1024, 0), [0, 0]),
    ("gib_straddled", G1 - 0x200, G1 + 0x400, H + (G1 - 0x200) * 4096, (514, 0), [1, 0, 1]),
    ("congruent_2m_not_1g", G1, G1, H + 2 * MiB, (512, 0), [1]),
]


@pytest.mark.parametrize("name,base,npages,hva,exp2m,exp1g", LPAGE_CASES,
                         ids=[c[0] for c in LPAGE_CASES])
def test_lpage_info_hand_computed(name, base, npages, hva, exp2m, exp1g):
    vm = this_host_vm()
    vm.set_user_memory_region(0, 0, base << 12, npages << 12, hva)
    s = vm.memslots[0].id_to_memslot(0)
    l2, l1g = s.lpage_info
    if isinstance(exp2m, tuple):
        exp2m = [exp2m[1]] * exp2m[0]
    assert l2.tolist() == exp2m
    assert l1g.tolist() == exp1g
    assert s.rmap.lpages == (npages, len(exp2m), len(exp1g))
    vm.audit()


def test_lpage_runtime_counts_and_max_mapping_level():
    vm = VM("tdp", host=HostConfig(tdp="ept"))
    s = vm.add_memory(0, 4 * MiB, thp=True, populate=True)
    assert s.lpage_info[0].tolist() == [0, 0]
    assert vm.kvm_mmu_max_mapping_level(s, 0x5) == 2            # THP-backed, aligned
    vm.kvm_mmu_gfn_disallow_lpage(s, 0x205)                       # a shadowed 4K gPTE table
    assert s.lpage_info[0].tolist() == [0, 1] and s.lpage_info[1].tolist() == [2]
    assert vm.kvm_mmu_max_mapping_level(s, 0x205) == 1
    assert vm.kvm_mmu_max_mapping_level(s, 0x5) == 2
    lv = M.kvm_mmu_max_mapping_level_array(vm, s, np.arange(0, 0x400, dtype=np.uint64))
    assert (lv[:0x200] == 2).all() and (lv[0x200:] == 1).all()
    vm.audit()
    vm.kvm_mmu_gfn_allow_lpage(s, 0x205)
    vm.kvm_mmu_gfn_allow_lpage(s, 0x5)                            # below the baseline: caught
    problems = vm.audit(raise_=False)
    assert any("below creation baseline" in p for p in problems)


# --------------------------------------------------------------------------------
# changes, generations, metadata
# --------------------------------------------------------------------------------

def test_generation_and_change_kinds():
    vm = VM("tdp_mmu")                                  # SMM: two address spaces
    assert vm.nr_memslot_as_ids == 2
    assert [s.generation for s in vm.memslots] == [0, 1]
    rec = vm.register_mmu(RecordingMmu())
    assert vm.set_user_memory_region(0, 0, 0, 2 * MiB, H) is M.KvmMrChange.KVM_MR_CREATE
    assert vm.memslots[0].generation == 2                 # one publish, += nr_as
    assert vm.set_user_memory_region(1 << 16, 0, 0, 2 * MiB, H) is M.KvmMrChange.KVM_MR_CREATE
    assert vm.memslots[1].generation == 3
    assert vm.set_user_memory_region(0, 0, 0, 2 * MiB, H) is None
    assert vm.memslots[0].generation == 2
    assert vm.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MiB, H) \
        is M.KvmMrChange.KVM_MR_FLAGS_ONLY
    assert vm.memslots[0].generation == 4
    assert vm.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 4 * MiB, 2 * MiB, H) \
        is M.KvmMrChange.KVM_MR_MOVE
    assert vm.memslots[0].generation == 8                  # INVALID copy + final: two publishes
    # a default VM with KVM_X86_QUIRK_SLOT_ZAP_ALL flushes a moved slot by zapping all
    assert rec.names().count("kvm_mmu_zap_all_fast") == 1
    vm.quirk_slot_zap_all = False                          # KVM_CAP_DISABLE_QUIRKS2
    assert vm.set_user_memory_region(0, 0, 0, 0, 0) is M.KvmMrChange.KVM_MR_DELETE
    assert vm.memslots[0].generation == 12
    assert rec.names().count("kvm_mmu_zap_all_fast") == 1  # now only the slot's part
    assert rec.names().count("kvm_arch_flush_shadow_memslot") == 1
    assert vm.mmio_generation(0) == 12 and vm.mmio_generation(1) == 3
    vm.audit()


def test_memslot_lookup_scalar_and_batch():
    vm = VM("tdp_mmu")
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, H)
    vm.set_user_memory_region(3, 0, 16 * MiB, 2 * MiB, H + 16 * MiB)
    vm.set_user_memory_region(1, 0, 4 * MiB, 4 * MiB, H + 4 * MiB)
    gfns = np.array([0, 0x1FF, 0x200, 0x400, 0x7FF, 0x800, 0x1000, 0x11FF, 0x1200], dtype=np.uint64)
    ids = vm.memslots[0].gfn_to_memslot_array(gfns)
    assert ids.tolist() == [0, 0, -1, 1, 1, -1, 3, 3, -1]
    for g, i in zip(gfns.tolist(), ids.tolist()):
        s = vm.gfn_to_memslot(g)
        assert (s.id if s else -1) == i
    assert [s.id for s in vm.memslots[0].slots_in_gfn_range(0x100, 0x1001)] == [0, 1, 3]
    v = vm.vcpus[0]
    assert v.gfn_to_memslot(0x400).id == 1 and v.last_used_slot.id == 1
    v.smm = True
    assert v.gfn_to_memslot(0x400) is None                      # SMM address space is empty


def test_move_keeps_dirty_bitmap_and_reallocates_metadata():
    vm = VM("tdp")                                      # shadow MMU: rmaps always
    vm.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MiB, H)
    s = vm.memslots[0].id_to_memslot(0)
    vm.mark_page_dirty(np.array([3, 64, 511], dtype=np.uint64))
    bm = s.dirty_bitmap
    old_rmap = s.rmap
    vm.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 8 * MiB, 2 * MiB, H)
    n = vm.memslots[0].id_to_memslot(0)
    assert n is not s and n.dirty_bitmap is bm                      # reused, as the kernel does
    assert n.dirty_gfns().tolist() == [0x800 + 3, 0x800 + 64, 0x800 + 511]
    assert n.rmap is not old_rmap and n.rmap.base_gfn == 0x800       # new metadata
    vm.audit()


def test_flags_only_shares_arch_and_frees_bitmap():
    vm = VM("tdp")
    vm.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MiB, H)
    s = vm.memslots[0].id_to_memslot(0)
    arch = s.arch
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, H)
    n = vm.memslots[0].id_to_memslot(0)
    assert n.arch is arch and n.dirty_bitmap is None and s.dirty_bitmap is None
    assert vm.nr_memslots_dirty_logging == 0
    vm.audit()


def test_tdp_mmu_allocates_rmaps_lazily():
    vm = VM("tdp_mmu")
    s = vm.add_memory(0, 4 * MiB)
    assert s.rmap is None and s.arch.gfn_write_track is None
    vm.audit()
    vm.mmu_first_shadow_root_alloc()
    assert s.rmap is not None and s.rmap.lpages == (1024, 2, 1)
    assert s.arch.gfn_write_track.shape == (1024,)
    vm.audit()


def test_shadow_paging_allocates_rmaps_and_write_tracking_at_creation():
    vm = this_host_vm()
    s = vm.add_memory(0, 4 * MiB)
    assert s.rmap is not None and s.arch.gfn_write_track is not None


def test_page_budget_follows_memslot_pages():
    vm = VM("tdp")
    rec = vm.register_mmu(RecordingMmu())
    vm.set_user_memory_region(0, 0, 0, 1 << 30, H)                 # 262144 pages
    assert vm.n_max_mmu_pages == 262144 // 50
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    assert vm.n_max_mmu_pages == 64                                  # KVM_MIN_ALLOC_MMU_PAGES
    assert ("kvm_mmu_change_mmu_pages", 64) in rec.calls


def test_dirty_logging_transitions_call_the_mmus():
    for pml, expected in ((False, [("kvm_mmu_slot_try_split_huge_pages", 0, 1),
                                   ("kvm_mmu_slot_remove_write_access", 0, 1)]),
                          (True, [("kvm_mmu_slot_try_split_huge_pages", 0, 1),
                                  ("kvm_mmu_slot_leaf_clear_dirty", 0),
                                  ("kvm_mmu_slot_remove_write_access", 0, 2)])):
        vm = VM("tdp_mmu", host=HostConfig(tdp="ept", pml=pml))
        vm.set_user_memory_region(0, 0, 0, 2 * MiB, H)
        rec = vm.register_mmu(RecordingMmu())
        flushes = vm.stat.remote_tlb_flush_requests
        vm.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MiB, H)
        assert rec.calls == expected
        assert vm.stat.remote_tlb_flush_requests == flushes + 1
        assert all(("KVM_REQ_UPDATE_CPU_DIRTY_LOGGING" in v.requests) == pml for v in vm.vcpus)
        rec.calls.clear()
        vm.set_user_memory_region(0, 0, 0, 2 * MiB, H)
        assert rec.calls == [("kvm_mmu_recover_huge_pages", 0)]
    vm = VM("tdp_mmu", params=KvmParams(eager_page_split=False))
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, H)
    rec = vm.register_mmu(RecordingMmu())
    vm.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MiB, H)
    assert rec.names() == ["kvm_mmu_slot_remove_write_access"]


def test_dirty_log_get_and_clear():
    vm = VM("tdp_mmu")
    vm.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 0, 0x41000, H)    # 65 pages
    rec = vm.register_mmu(RecordingMmu())
    vm.mark_page_dirty(np.array([1, 2, 64], dtype=np.uint64))
    out = vm.get_dirty_log(0)
    assert out.tolist() == [0b110, 1]
    assert vm.memslots[0].id_to_memslot(0).dirty_bitmap.tolist() == [0, 0]
    assert rec.calls == [("kvm_arch_mmu_enable_log_dirty_pt_masked", 0, 0, 0b110),
                         ("kvm_arch_mmu_enable_log_dirty_pt_masked", 0, 64, 1)]
    with pytest.raises(M.DirtyLogError) as ei:
        vm.get_dirty_log(7)
    assert ei.value.errno == errno.ENOENT
    # manual protect + initially set: new bitmaps start all-ones; clear re-protects
    vm2 = VM("tdp_mmu")
    vm2.enable_manual_dirty_log_protect(M.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
                                        M.KVM_DIRTY_LOG_INITIALLY_SET)
    rec2 = vm2.register_mmu(RecordingMmu())
    vm2.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 0, 0x41000, H)
    s = vm2.memslots[0].id_to_memslot(0)
    assert s.dirty_bitmap.tolist() == [(1 << 64) - 1, 1]
    assert "kvm_mmu_slot_remove_write_access" not in rec2.names()     # lazily, per chunk
    assert vm2.get_dirty_log(0).tolist() == [(1 << 64) - 1, 1]      # not cleared
    vm2.clear_dirty_log(0, 0, 65, np.array([0xF0, 1], dtype=np.uint64))
    assert s.dirty_bitmap.tolist() == [(1 << 64) - 1 - 0xF0, 0]
    with pytest.raises(M.DirtyLogError):
        vm2.clear_dirty_log(0, 1, 64, np.zeros(1, np.uint64))        # first_page & 63
    vm2.audit()


def test_mmio_generation_wrap_zaps_all_fast():
    vm = VM("tdp_mmu")
    rec = vm.register_mmu(RecordingMmu())
    from kvmmmu._core.spte import MMIO_SPTE_GEN_MASK
    vm.memslots[0].generation = (MMIO_SPTE_GEN_MASK + 1) - 2     # as 0: even generations
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, H)
    assert vm.memslots[0].generation & MMIO_SPTE_GEN_MASK == 0
    assert rec.names().count("kvm_mmu_zap_all_fast") == 1 and vm.mmio_gen_wraps == 1
    # an MMIO SPTE built before the change is stale after it
    v = vm.vcpus[0]
    spte = vm.fmt.make_mmio_spte(0x12345, 0, v.mmio_spte_generation())
    assert v.check_mmio_spte(spte)
    vm.set_user_memory_region(1, 0, 4 * MiB, 2 * MiB, H)
    assert not v.check_mmio_spte(spte)


def test_update_while_invalidation_open_would_block():
    vm = VM("tdp_mmu")
    s = vm.add_memory(0, 2 * MiB)
    rng = vm.host.invalidate_begin(s.userspace_addr, s.userspace_addr + 4096)
    before = vm.snapshot()
    with pytest.raises(M.MemslotUpdateWouldBlockError):
        vm.set_user_memory_region(1, 0, 4 * MiB, 2 * MiB, H)
    assert vm.snapshot() == before
    vm.host.invalidate_end(rng)
    vm.set_user_memory_region(1, 0, 4 * MiB, 2 * MiB, H)
    vm.audit()


def test_metadata_enomem_leaves_vm_unchanged():
    vm = VM("tdp")
    vm.set_user_memory_region(0, M.KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MiB, H)
    before = vm.snapshot()
    vm._fail_next_metadata_alloc = True
    with pytest.raises(KvmNoMemoryError):
        vm.set_user_memory_region(1, M.KVM_MEM_LOG_DIRTY_PAGES, 4 * MiB, 2 * MiB, H)
    assert vm.snapshot() == before
    vm.audit()


def test_smm_address_space_and_private_vm_have_one():
    vm = VM("tdp_mmu")
    vm.set_user_memory_region(1 << 16, 0, 0, 2 * MiB, H)
    assert len(vm.memslots[1]) == 1
    pv = VM("tdp_mmu", vm_type="sw_protected")
    assert pv.nr_memslot_as_ids == 1
    with pytest.raises(M.MemslotIdError):
        pv.set_user_memory_region(1 << 16, 0, 0, 2 * MiB, H)


def test_protected_state_vm_has_no_readonly_memory():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx")
    with pytest.raises(M.MemslotFlagsError):
        vm.set_user_memory_region(0, M.KVM_MEM_READONLY, 0, 2 * MiB, H)


def test_tdx_alias_bit_limit():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept", maxphyaddr=52), vm_type="tdx")
    vm.gfn_direct_bits = 1 << (47 - 12)
    vm.set_user_memory_region(0, 0, (1 << 47) - 2 * MiB, 2 * MiB, H)
    with pytest.raises(M.MemslotGfnLimitError):
        vm.set_user_memory_region(1, 0, 1 << 47, 2 * MiB, H)


def test_32bit_host_limits():
    vm = VM("shadow", host=HostConfig(host_64bit=False, tdp=None, maxphyaddr=36, gbpages=False))
    with pytest.raises(M.MemslotUserspaceAddressError):
        vm.set_user_memory_region(0, 0, 0, 2 * MiB, 0xBFF0_0000)
    vm.set_user_memory_region(0, 0, 0, 2 * MiB, 0x8000_0000)
    vm.audit()


@pytest.mark.live
@pytest.mark.skipif(live.kvm_problem() is not None, reason=str(live.kvm_problem()))
def test_random_region_sequences_match_the_live_kernel():
    """Random CREATE/DELETE/MOVE/FLAGS_ONLY/invalid requests, applied in lockstep
    to the model (configured like this host) and to the kernel: every answer
    (0 or -errno) must agree."""
    from kvmmmu.live import memory as LM
    rng = np.random.default_rng(1234)
    host, params = HostConfig.from_system(), KvmParams.from_system()
    flags_pool = [0, 0, M.KVM_MEM_LOG_DIRTY_PAGES, M.KVM_MEM_READONLY,
                  M.KVM_MEM_LOG_DIRTY_PAGES | M.KVM_MEM_READONLY, 1 << 5]
    mism = []
    with live.Kvm() as kvm:
        for seq in range(6):
            model = VM(None, host=host, params=params)
            with kvm.create_vm() as lvm:
                for step in range(60):
                    slot = int(rng.integers(0, 4)) | (int(rng.integers(0, 8)) == 0) << 16
                    size = int(rng.choice([0, 1, 2, 4, 3])) * MiB + int(rng.choice([0, 0, 0, 0x800]))
                    gpa = int(rng.integers(0, 16)) * MiB
                    hva = H + (slot & 0xFFFF) * 64 * MiB + int(rng.choice([0, 0, 0, 2 * MiB]))
                    flags = int(rng.choice(flags_pool))
                    try:
                        model.set_user_memory_region(slot, flags, gpa, size, hva)
                        want = 0
                    except M.KvmMemslotError as e:
                        want = -e.errno
                    got = LM.set_user_memory_region2(lvm, slot, flags, gpa, size, hva)
                    if got != want:
                        mism.append((seq, step, hex(slot), hex(flags), hex(gpa), hex(size), want, got))
                model.audit()
    assert not mism, mism[:10]
