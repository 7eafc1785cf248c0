"""The TDP MMU on a VM, against the host it mirrors.

A hypothesis state machine drives a VM with two THP-backed memslots through
faults (read/write, several vCPUs), host munmap + re-mmap, THP splits,
mprotect, memslot delete/re-create, dirty logging on/off with writes and
GET_DIRTY_LOG, aging and the fast zap of all roots.  The independent
expectation is the host itself: after every step every present leaf of
every root maps, for each 4K page it covers, exactly the host pfn the
memslot's hva has now, at no more than the level the memslot and the host
allow, writable only if the host page is; a dirty-logged slot has no
writable huge leaf; every gfn written since the last GET_DIRTY_LOG is
reported by it; and TdpMmu.audit() (page stats = leaves, tdp_mmu_pages =
tables, no FROZEN) and VM.audit() are clean."""
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmmmu._core.defs import (
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
)
from kvmmmu._core.tdp_iter import TdpIter
from kvmmmu.host import HostConfig
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES
from kvmmmu.notifiers import KvmGfnRange
from kvmmmu.tdp_mmu import TdpMmu
from kvmmmu.vm import VM, KvmParams

MiB = 1 << 20
SLOTS = {0: 0, 1: 16 * MiB}          # slot id -> gpa; each 8 MiB
SIZE = 8 * MiB


def pages(level):
    return 1 << (9 * (level - 1))


def _vm(eager=True):
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), nr_vcpus=2,
            params=KvmParams(eager_page_split=eager))
    for sid, gpa in SLOTS.items():
        vm.add_memory(gpa, SIZE, slot=sid, thp=True, populate=True)
    t = vm.register_mmu(TdpMmu(vm))
    for v in vm.vcpus:
        t.kvm_mmu_load(v)
    return vm, t


def check_against_host(vm, t):
    fmt = vm.fmt
    for root in t.roots:
        if root.invalid:
            continue
        for gfn, level, _, spte in TdpIter(vm.arena, root.sp, 0, 1 << 36):
            if not fmt.is_shadow_present_pte_array(np.array([spte], np.uint64))[0]:
                continue
            if level > 1 and not (spte >> 7) & 1:
                continue                                        # a table
            slot = vm.gfn_to_memslot(gfn)
            assert slot is not None, f"leaf at gfn {gfn:#x} outside every memslot"
            assert gfn + pages(level) <= slot.base_gfn + slot.npages
            g = np.arange(gfn, gfn + pages(level), dtype=np.uint64)
            hva = np.uint64(slot.userspace_addr) + ((g - np.uint64(slot.base_gfn)) << np.uint64(12))
            pfn, _ = vm.host.hva_to_pfn_array(hva)
            base = int(fmt.spte_to_pfn_array(np.array([spte], np.uint64))[0])
            assert (pfn == np.arange(base, base + pages(level), dtype=np.uint64)).all(), \
                f"leaf {gfn:#x}/{level} maps {base:#x}, host has {int(pfn[0]):#x}"
            assert level <= vm.kvm_mmu_max_mapping_level(slot, gfn, 3)
            writable = bool(spte & 2)
            if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                assert not (writable and level > 1), f"writable huge leaf {gfn:#x} while logging"
    assert t.audit() == []
    assert vm.audit(raise_=False) == []


class TdpVmMachine(RuleBasedStateMachine):
    @initialize(eager=st.booleans())
    def setup(self, eager):
        self.vm, self.t = _vm(eager)
        self.written = {sid: set() for sid in SLOTS}
        self.slot_live = {sid: True for sid in SLOTS}

    def _slot_gfn(self, sid, off):
        return (SLOTS[sid] >> 12) + off

    @rule(sid=st.sampled_from(sorted(SLOTS)), off=st.integers(0, SIZE // 4096 - 1),
          write=st.booleans(), vcpu=st.integers(0, 1), n=st.integers(1, 8))
    def fault(self, sid, off, write, vcpu, n):
        v = self.vm.vcpus[vcpu]
        if "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in v.requests:
            self.t.kvm_mmu_load(v)
        for k in range(n):
            o = (off + 37 * k) % (SIZE // 4096)
            gfn = self._slot_gfn(sid, o)
            r = self.t.page_fault(v, gfn, write=write)
            if not self.slot_live[sid]:
                assert r == RET_PF_EMULATE              # no memslot: emulated (no MMIO SPTE)
            else:
                assert r in (RET_PF_FIXED, RET_PF_SPURIOUS), r
                if write:
                    self.written[sid].add(o)

    @rule(sid=st.sampled_from(sorted(SLOTS)), off=st.integers(0, 3), npg=st.integers(1, 2))
    def host_remap(self, sid, off, npg):
        """munmap 2 MiB-aligned chunks of the slot's backing and map them again."""
        slot = self.vm.memslots[0].id_to_memslot(sid)
        if slot is None:
            return
        hva = slot.userspace_addr + off * 2 * MiB
        size = min(npg * 2 * MiB, slot.userspace_addr + SIZE - hva)
        self.vm.host.munmap(hva, size)
        self.vm.host.mmap(size, hva=hva, thp=True, populate=True)

    @rule(sid=st.sampled_from(sorted(SLOTS)), off=st.integers(0, 3))
    def thp_split(self, sid, off):
        slot = self.vm.memslots[0].id_to_memslot(sid)
        if slot is not None:
            self.vm.host.split_huge_pmd(slot.userspace_addr + off * 2 * MiB)

    @rule(sid=st.sampled_from(sorted(SLOTS)))
    def delete_and_recreate(self, sid):
        if self.slot_live[sid]:
            flags = self.vm.memslots[0].id_to_memslot(sid).flags
            self.vm.delete_memslot(sid)
            self.slot_live[sid] = False
            self._flags = flags
        else:
            self.vm.add_memory(SLOTS[sid], SIZE, slot=sid, thp=True, populate=True)
            self.slot_live[sid] = True
            self.written[sid] = set()

    @rule(sid=st.sampled_from(sorted(SLOTS)))
    def toggle_dirty_log(self, sid):
        slot = self.vm.memslots[0].id_to_memslot(sid)
        if slot is None:
            return
        flags = slot.flags ^ KVM_MEM_LOG_DIRTY_PAGES
        self.vm.set_user_memory_region(sid, flags, slot.base_gfn << 12, slot.npages << 12,
                                       slot.userspace_addr)
        self.written[sid] = set()
        if flags & KVM_MEM_LOG_DIRTY_PAGES:
            self.vm.get_dirty_log(sid)                  # start a clean round

    @rule(sid=st.sampled_from(sorted(SLOTS)))
    def dirty_round(self, sid):
        slot = self.vm.memslots[0].id_to_memslot(sid)
        if slot is None or not slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            return
        bm = self.vm.get_dirty_log(sid)
        dirty = {i for i in range(slot.npages) if int(bm[i // 64]) >> (i % 64) & 1}
        assert self.written[sid] <= dirty, sorted(self.written[sid] - dirty)[:5]
        self.written[sid] = set()

    @rule(sid=st.sampled_from(sorted(SLOTS)))
    def age(self, sid):
        slot = self.vm.memslots[0].id_to_memslot(sid)
        if slot is not None:
            self.vm.host.age(slot.userspace_addr, SIZE)

    @rule()
    def zap_all_fast(self):
        self.t.kvm_mmu_zap_all_fast()

    @invariant()
    def consistent(self):
        check_against_host(self.vm, self.t)


TestTdpVm = TdpVmMachine.TestCase
TestTdpVm.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)


def test_a_64_mib_thp_guest_maps_at_2m_and_a_dirty_round_reports_the_writes():
    vm, t = _vm()
    v = vm.vcpus[0]
    g = np.arange(0, SIZE >> 12, dtype=np.uint64)
    r = t.map_memory(v, g)
    assert set(r.tolist()) == {RET_PF_FIXED}            # one fault per 2M frame, reported per gfn
    assert vm.arena.page_stats == {"pages_4k": 0, "pages_2m": 4, "pages_1g": 0}
    check_against_host(vm, t)
    slot = vm.memslots[0].id_to_memslot(0)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SIZE, slot.userspace_addr)
    assert vm.arena.page_stats == {"pages_4k": 2048, "pages_2m": 0, "pages_1g": 0}  # eager split
    vm.get_dirty_log(0)
    written = [3, 700, 701, 2047]
    fast = v.stat.pf_fast
    for o in written:
        assert t.page_fault(v, o, write=True) == RET_PF_FIXED                    # W was removed
    assert v.stat.pf_fast == fast + 4               # fixed by fast_page_fault, no mmu_lock
    bm = vm.get_dirty_log(0)
    assert [i for i in range(2048) if int(bm[i // 64]) >> (i % 64) & 1] == written
    check_against_host(vm, t)
    vm.set_user_memory_region(0, 0, 0, SIZE, slot.userspace_addr)             # logging off
    assert vm.arena.page_stats["pages_2m"] == 4                               # recovered
    check_against_host(vm, t)


def test_invalidated_roots_make_faults_stale_until_the_vcpu_reloads():
    vm, t = _vm()
    v = vm.vcpus[0]
    assert t.page_fault(v, 5) == RET_PF_FIXED
    t.kvm_mmu_zap_all_fast()
    assert "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in v.requests
    assert t.page_fault(v, 5) == RET_PF_RETRY
    t.kvm_mmu_load(v)
    assert t.page_fault(v, 5) == RET_PF_FIXED
    t.kvm_mmu_load(vm.vcpus[1])
    assert len(t.roots) == 1 and t.roots[0].refcount == 3      # both vCPUs and the list
    vm.arena.rcu_barrier()
    check_against_host(vm, t)


def test_page_fault_needs_a_loaded_root_and_a_tdp_vm():
    vm, t = _vm()
    t.kvm_mmu_unload(vm.vcpus[0])
    with pytest.raises(ValueError, match="kvm_mmu_load"):
        t.page_fault(vm.vcpus[0], 5)
    with pytest.raises(ValueError, match="TDP"):
        TdpMmu(VM("shadow"))


def test_fast_page_fault_restores_access_tracked_sptes_without_ad_bits():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept", ad_bits=False))
    vm.add_memory(0, SIZE, slot=0, populate=True)
    t = vm.register_mmu(TdpMmu(vm))
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    assert t.page_fault(v, 9) == RET_PF_FIXED and v.stat.pf_fast == 0
    assert t.kvm_age_gfn(KvmGfnRange(vm.memslots[0].id_to_memslot(0), 0, 16))
    spte = int(t.translate(v, np.array([9], np.uint64))[0][0])
    assert vm.fmt.is_access_track_spte(spte)
    assert t.page_fault(v, 9) == RET_PF_FIXED and v.stat.pf_fast == 1
    spte = int(t.translate(v, np.array([9], np.uint64))[0][0])
    assert not vm.fmt.is_access_track_spte(spte) and vm.fmt.is_accessed_spte(spte)
    assert t.page_fault(v, 9) == RET_PF_SPURIOUS       # a read fault on a present SPTE: slow path
    assert v.stat.pf_fast == 1
    check_against_host(vm, t)


@pytest.mark.parametrize("caching", [True, False])
def test_mmio_sptes_carry_the_memslot_generation(caching):
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), params=KvmParams(mmio_caching=caching))
    vm.add_memory(0, SIZE, slot=0, populate=True)
    t = vm.register_mmu(TdpMmu(vm))
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    hole = (32 * MiB) >> 12
    assert t.page_fault(v, hole) == RET_PF_EMULATE
    spte = int(t.translate(v, np.array([hole], np.uint64))[0][0])
    assert bool(vm.fmt.is_mmio_spte(spte)) == caching
    assert v.stat.pf_mmio_spte_created == int(caching) and v.stat.pf_taken == 1
    assert t.page_fault(v, hole, write=True) == RET_PF_EMULATE
    # with caching, the second access is the reserved-bit fault: no page fault taken
    assert v.stat.pf_taken == (1 if caching else 2)
    vm.add_memory(32 * MiB, 2 * MiB, slot=3, populate=True)        # the generation moves on
    assert t.page_fault(v, hole, write=True) == RET_PF_FIXED        # the stale SPTE is replaced
    check_against_host(vm, t)


def test_vm_audit_runs_the_tdp_invariants():
    vm, t = _vm()
    v = vm.vcpus[0]
    assert t.page_fault(v, 0x10, write=True) == RET_PF_FIXED
    assert vm.audit(raise_=False) == []
    # a leaf written behind the TDP MMU's back (no handle_changed_spte): the
    # page statistics no longer match the tables
    sptes, levels = t.translate(v, np.array([0x800], np.uint64))
    assert levels[0] == 2 and not vm.fmt.is_shadow_present_pte_array(sptes)[0]
    root = t.vcpu_root[v.index].sp
    it = TdpIter(vm.arena, root, 0x800, 0x801)
    sptep = next(s for _, lvl, s, _ in it if lvl == 2)
    spte, _ = vm.fmt.make_spte(level=2, pte_access=7, pfn=0x40000)
    vm.arena.mmu_spte_set(sptep, spte)
    bad = vm.audit(raise_=False)
    assert any(b.startswith("TdpMmu: page stats") for b in bad), bad


def test_nx_huge_pages_split_on_exec_and_recovery_lets_huge_pages_back():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"),
            params=KvmParams(nx_huge_pages=True, nx_huge_pages_recovery_ratio=1))
    vm.add_memory(0, SIZE, slot=0, thp=True, populate=True)
    t = vm.register_mmu(TdpMmu(vm))
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    assert t.page_fault(v, 0x205, exec=True) == RET_PF_FIXED         # a fetch: 4K only
    assert t.translate(v, np.array([0x205], np.uint64))[1].tolist() == [1]
    assert t.core.nx_lpage_splits == 1 == vm.stat.nx_lpage_splits
    assert len(t.core.possible_nx_huge_pages()) == 1
    # a data access in the same 2M frame must not put a huge page over the
    # flagged table: it maps 4K too
    assert t.page_fault(v, 0x3ff, write=True) == RET_PF_FIXED
    assert t.translate(v, np.array([0x3ff], np.uint64))[1].tolist() == [1]
    # elsewhere, data still maps 2M
    assert t.page_fault(v, 0x400) == RET_PF_FIXED
    assert t.translate(v, np.array([0x400], np.uint64))[1].tolist() == [2]
    assert t.audit() == [] and vm.audit(raise_=False) == []
    assert t.kvm_recover_nx_huge_pages() == 1                          # ceil(1 / 1)
    assert t.core.nx_lpage_splits == 0 and t.core.possible_nx_huge_pages() == []
    assert t.page_fault(v, 0x3ff) == RET_PF_FIXED                     # the 2M page is back
    assert t.translate(v, np.array([0x3ff], np.uint64))[1].tolist() == [2]
    vm.arena.rcu_barrier()
    check_against_host(vm, t)
    # recovery ratio 0: nothing is zapped
    t.page_fault(v, 0x605, exec=True)
    assert t.kvm_recover_nx_huge_pages(0) == 0 and t.core.nx_lpage_splits == 1


_NX_SETUP = """
import numpy as np
from kvmmmu.vm import VM, KvmParams
from kvmmmu.host import HostConfig
from kvmmmu.tdp_mmu import TdpMmu
vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), params=KvmParams(nx_huge_pages=True))
vm.add_memory(0, 8 << 20, thp=True, populate=True)
t = vm.register_mmu(TdpMmu(vm)); v = vm.vcpus[0]; t.kvm_mmu_load(v)
t.page_fault(v, 0x205, exec=True)
sp = t.core.possible_nx_huge_pages()[0]
"""


def test_headers_rewritten_from_python_cannot_steer_the_c_code():
    """The NX list links are the MMU's (set_sp refuses them); a ptep planted
    with set_sp is range-checked before recovery reads it; a table cycle
    planted through a writable table view is counted, not spun on or freed
    twice.  Each in a fresh interpreter, so a crash fails the test."""
    from _probe import assert_no_crash, assert_raises_in_child
    assert_raises_in_child(_NX_SETUP + "vm.arena.set_sp(sp, nx_link_next=1 << 40)",
                           "ValueError", "owned by the arena")
    assert_no_crash(_NX_SETUP + """
# a non-leaf SPTE planted towards an arena page no sp owns (a cached page):
# walks do not enter it, so a fault below it never reads a missing header
v.mmu_topup_memory_caches(False)
free_pfn = vm.arena.table_pfn(int(np.flatnonzero(vm.arena.table_states() == 2)[0]))
l2 = vm.arena.sptep_to_sp(vm.arena.get_sp(sp)["ptep"])
vm.arena.table(vm.arena.table_index(vm.arena.get_sp(l2)["spt"]))[7] = \\
    vm.fmt.make_nonleaf_spte(free_pfn << 12)
t.page_fault(v, 0x200 * 7 + 3, exec=True)   # 4K goal (NX): the walk goes below 2M
""", allow_raise=False)
    assert_no_crash(_NX_SETUP + """
vm.arena.set_sp(sp, ptep=1 << 60)
assert t.core.recover_nx_huge_page(sp) is False
assert any("recover" in w for w in t.core.warnings())
""", allow_raise=False)
    assert_no_crash(_NX_SETUP + """
# an empty entry of the 2M-level table points back at the 1G-level table
# holding its own link: a cycle
l2 = vm.arena.sptep_to_sp(vm.arena.get_sp(sp)["ptep"])
l3_pfn = vm.arena.get_sp(l2)["ptep"] >> 12
vm.arena.table(vm.arena.table_index(vm.arena.get_sp(l2)["spt"]))[5] = \
    vm.fmt.make_nonleaf_spte(l3_pfn << 12)
t.kvm_mmu_zap_all_fast()
vm.arena.rcu_barrier()
assert t.core.warnings(), "the cycle went unnoticed"             # counted, no spin, no crash
""", allow_raise=False)
