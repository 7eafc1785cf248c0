"""Memory attributes: range semantics against a per-gfn reference, the ioctl's
validation, the invalidation it performs, and KVM_LPAGE_MIXED_FLAG for
hand-computed layouts."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmmmu import memslots as M
from kvmmmu.memattrs import (
    KVM_MEMORY_ATTRIBUTE_PRIVATE as P, InvalidMemoryAttributesError, MemoryAttributes,
)
from kvmmmu.vm import VM, RecordingMmu

MiB = 1 << 20
H = 0x7E00_0000_0000
MIX = M.KVM_LPAGE_MIXED_FLAG
G1 = 1 << 18


# --------------------------------------------------------------------------------
# the interval map against a dense reference
# --------------------------------------------------------------------------------

ops = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 60), st.sampled_from([0, P, 1, 2])),
               min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_interval_map_matches_dense_reference(seq):
    m = MemoryAttributes()
    ref = np.zeros(300, dtype=np.uint64)
    for start, n, v in seq:
        m.store(start, start + n, v)
        ref[start:start + n] = v
        assert m.audit() == []
    assert [m.get(g) for g in range(300)] == ref.tolist()
    assert m.get_array(np.arange(300)).tolist() == ref.tolist()
    for a in range(0, 290, 7):
        for b in (a + 1, a + 5, a + 64):
            for want in (0, P, 1):
                dense = bool((ref[a:b] == want).all()) if want else not ref[a:b].any()
                assert m.range_has(a, b, (1 << 64) - 1, want, (1 << 64) - 1) == dense
    f = np.arange(0, 256, 16, dtype=np.uint64)
    uni, val = m.uniform_frames(f, 16)
    for k, s in enumerate(f.tolist()):
        assert uni[k] == (len(set(ref[s:s + 16].tolist())) == 1)
        assert val[k] == ref[s]


def test_store_coalesces():
    m = MemoryAttributes()
    m.store(0, 10, P)
    m.store(10, 20, P)
    m.store(5, 6, 0)
    m.store(5, 6, P)
    assert m.intervals() == [(0, 20, P)]


# --------------------------------------------------------------------------------
# ioctl validation and the invalidation it performs
# --------------------------------------------------------------------------------

def test_ioctl_validation_leaves_vm_unchanged():
    pv = VM("tdp_mmu", vm_type="sw_protected")
    pv.add_memory(0, 4 * MiB)
    before = pv.snapshot()
    for args in [(0, 4096, P, 1), (0, 4096, 1 << 4), (0, 0, P), (0x800, 4096, P), (0, 0x800, P),
                 ((1 << 64) - 4096, 8192, P)]:
        with pytest.raises(InvalidMemoryAttributesError) as ei:
            pv.set_memory_attributes(*args)
        assert ei.value.errno == 22
        assert pv.snapshot() == before
    vm = VM("tdp_mmu")                                  # default VM: no private memory
    with pytest.raises(InvalidMemoryAttributesError):
        vm.set_memory_attributes(0, 4096, P)
    vm.set_memory_attributes(0, 4096, 0)                  # 0 is supported everywhere: a no-op
    assert len(vm.mem_attrs) == 0


def test_attribute_change_is_an_invalidation_only_where_slots_are():
    pv = VM("tdp_mmu", vm_type="sw_protected")
    s = pv.add_memory(0, 4 * MiB)
    rec = pv.register_mmu(RecordingMmu(kvm_unmap_gfn_range=True))
    seq = pv.notifier.mmu_invalidate_seq
    flushes = pv.stat.remote_tlb_flush_requests
    pv.set_memory_attributes(0x10000, 0x10000, P)           # gfns [0x10, 0x20)
    assert pv.notifier.mmu_invalidate_seq == seq + 1
    assert pv.notifier.mmu_invalidate_in_progress == 0
    # the range itself plus the straddled (non-MIXED) 2M and 1G head frames
    assert (pv.notifier.mmu_invalidate_range_start, pv.notifier.mmu_invalidate_range_end) == (0, 0x200)
    assert rec.calls == [("kvm_unmap_gfn_range", 0, s.id, 0x10, 0x20, 1)]   # old attr: SHARED
    assert pv.stat.remote_tlb_flush_requests == flushes + 1
    # already has the value: nothing at all
    pv.set_memory_attributes(0x10000, 0x10000, P)
    assert pv.notifier.mmu_invalidate_seq == seq + 1
    # no memslot there: the store happens, but no invalidation
    pv.set_memory_attributes(1 << 40, 1 << 21, P)
    assert pv.notifier.mmu_invalidate_seq == seq + 1 and pv.mem_attrs.get((1 << 40) >> 12) == P
    # back to shared: unmaps the PRIVATE mappings
    rec.calls.clear()
    pv.set_memory_attributes(0x10000, 0x10000, 0)
    assert rec.calls == [("kvm_unmap_gfn_range", 0, s.id, 0x10, 0x20, 2)]
    pv.audit()


def test_attribute_race_with_fault_is_stale():
    pv = VM("tdp_mmu", vm_type="sw_protected")
    s = pv.add_memory(0, 4 * MiB, populate=True)
    v = pv.vcpus[0]
    r = pv.kvm_mmu_faultin_pfn(v, 0x15, write=True)            # shared fault, seq snapshot
    assert r.ret == 0
    pv.set_memory_attributes(0x10000, 0x10000, P)
    with pv.mmu_lock.write():
        assert pv.is_page_fault_stale(r.mmu_seq, 0x15, s)
    r2 = pv.kvm_mmu_faultin_pfn(v, 0x15, write=True)           # now a shared access to private memory
    assert r2.ret < 0 and r2.memory_fault_exit


# --------------------------------------------------------------------------------
# KVM_LPAGE_MIXED_FLAG, hand-computed
# --------------------------------------------------------------------------------

def _flags(arr, idx):
    return [bool(arr[i] & MIX) for i in idx]


def test_mixed_flag_hand_computed():
    pv = VM("tdp_mmu", vm_type="sw_protected")
    pv.set_user_memory_region(0, 0, 0, 2 << 30, H)           # 2 GiB, aligned: 1024 x 2M, 2 x 1G
    s = pv.memslots[0].id_to_memslot(0)
    l2, l1 = s.lpage_info
    assert not l2.any() and not l1.any()
    # 1. 16 private pages inside the first 2M frame: 2M[0] and 1G[0] mixed
    pv.set_memory_attributes(0x10 << 12, 0x10 << 12, P)
    assert np.flatnonzero(l2).tolist() == [0] and l2[0] == MIX
    assert l1.tolist() == [MIX, 0]
    # 2. the whole first 2M frame private: 2M[0] uniform again, 1G[0] still mixed
    pv.set_memory_attributes(0, 2 * MiB, P)
    assert not l2.any() and l1.tolist() == [MIX, 0]
    # 3. the whole first 1G frame private: everything uniform
    pv.set_memory_attributes(0, 1 << 30, P)
    assert not l2.any() and not l1.any()
    # 4. shared over [1G - 2M, 1G + 2M): both 2M frames uniform (shared), 1G[0] mixed
    pv.set_memory_attributes((G1 - 0x200) << 12, 4 * MiB, 0)
    assert not l2.any() and l1.tolist() == [MIX, 0]
    # 5. one private page in the middle of 2M frame 700 (in 1G[1])
    pv.set_memory_attributes((700 * 512 + 5) << 12, 4096, P)
    assert np.flatnonzero(l2).tolist() == [700] and l1.tolist() == [MIX, MIX]
    # runtime counts are kept below the flag
    pv.kvm_mmu_gfn_disallow_lpage(s, 700 * 512)
    assert l2[700] == MIX | 1 and l1[1] == MIX | 1
    pv.kvm_mmu_gfn_allow_lpage(s, 700 * 512)
    assert pv.kvm_mmu_max_mapping_level(s, 700 * 512) == 1     # MIXED forbids huge
    pv.audit()


def test_mixed_flag_on_slot_creation_and_misaligned_edges():
    pv = VM("tdp_mmu", vm_type="sw_protected")
    base = 0x100000
    pv.set_memory_attributes((base + 0x100) << 12, 0x200 << 12, P)     # [base+0x100, base+0x300)
    pv.set_user_memory_region(0, 0, base << 12, 0x800 << 12, H)       # 4 x 2M frames
    s = pv.memslots[0].id_to_memslot(0)
    l2, l1 = s.lpage_info
    assert l2.tolist() == [MIX, MIX, 0, 0]
    assert l1.tolist() == [1]              # end misaligned: counted, never MIXED
    # a slot whose edges straddle frames: the edge frames are never MIXED
    pv.set_user_memory_region(1, 0, (base + 0x1000 + 0x100) << 12, 0x400 << 12, H + (0x1100 << 12))
    t = pv.memslots[0].id_to_memslot(1)
    pv.set_memory_attributes((base + 0x1000) << 12, 0x800 << 12, P)
    pv.set_memory_attributes((base + 0x1000 + 0x150) << 12, 0x10 << 12, 0)
    assert t.lpage_info[0].tolist() == [1, 0, 1]
    pv.set_memory_attributes((base + 0x1000 + 0x250) << 12, 0x10 << 12, 0)
    assert t.lpage_info[0].tolist() == [1, MIX, 1]
    pv.audit()


def test_mixed_matches_rescan_after_random_changes():
    rng = np.random.default_rng(1234)
    pv = VM("tdp_mmu", vm_type="sw_protected")
    pv.set_user_memory_region(0, 0, 0x1F000 << 12, (3 * G1 + 0x1234) << 12, H + (0x1F000 << 12))
    for _ in range(40):
        a = int(rng.integers(0, 4 * G1))
        n = int(rng.choice([1, 17, 512, 700, 5000, G1 // 2]))
        pv.set_memory_attributes(a << 12, n << 12, int(rng.choice([0, P])))
        assert pv.audit(raise_=False) == []


def test_ioctl_absent_like_the_live_kernel():
    from kvmmmu import live
    from kvmmmu.host import HostConfig
    from kvmmmu.memattrs import MemoryAttributesNotSupportedError
    vm = VM("shadow", host=HostConfig(tdp=None, memory_attributes=False))
    with pytest.raises(MemoryAttributesNotSupportedError) as ei:
        vm.set_memory_attributes(0, 4096, 0)
    assert ei.value.errno == 25
    if live.kvm_problem() is None:
        from kvmmmu.live import memory as LM
        model = VM.from_host()
        try:
            model.set_memory_attributes(0, 4096, 0)
            want = 0
        except InvalidMemoryAttributesError as e:
            want = -e.errno
        with live.Kvm() as kvm, kvm.create_vm() as lvm:
            assert LM.set_memory_attributes(lvm, 0, 4096, 0) == want
