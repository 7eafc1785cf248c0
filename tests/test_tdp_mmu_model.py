"""The TDP MMU against a brute-force model, through everything a VM does.

tests/test_tdp_mmu.py drives faults, host remaps and dirty logging; this
machine adds what the issue lists on top: instruction fetches with the NX
huge page workaround on, host mprotect and page migration, memslot MOVE,
manual-protect dirty logging (``KVM_CLEAR_DIRTY_LOG``), NX recovery and
several vCPUs faulting the same gfns.

The model is a dict per slot - the gfns touched since their last dirty-log
harvest, and the gfns written - plus the host itself (what each hva maps
now).  After every step:

* every present leaf of every valid root maps exactly the host's pfns, at a
  level the memslot and the host allow, writable only if the host VMA is;
* with ``nx_huge_pages`` on, no huge leaf is executable;
* no leaf lies outside a memslot (so none in a zapped, moved or deleted
  range);
* ``TdpMmu.audit()`` and ``VM.audit()`` are clean;
* a dirty-log harvest reports every gfn written since the previous one and
  nothing that was not touched: written <= reported <= touched.  (A read
  fault may map a page writable - and so mark it dirty - when the host page
  is writable; the kernel's make_spte does the same.)
"""
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmmmu._core.spte import is_last_spte, is_shadow_present_pte, spte_to_pfn
from kvmmmu._core.defs import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS
from kvmmmu._core.tdp_iter import TdpIter
from kvmmmu.host import HostConfig
from kvmmmu.memslots import KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES
from kvmmmu.tdp_mmu import TdpMmu
from kvmmmu.vm import VM, KvmParams

MiB = 1 << 20
SIZE = 4 * MiB
NPAGES = SIZE >> 12
GPAS = {0: (0, 64 * MiB), 1: (16 * MiB, 80 * MiB)}     # slot -> the two places it can be
EFAULT = 14


def _bits(bm, n):
    return {i for i in range(n) if int(bm[i // 64]) >> (i % 64) & 1}


class TdpModelMachine(RuleBasedStateMachine):
    @initialize(eager=st.booleans(), manual=st.booleans(), nx=st.booleans())
    def setup(self, eager, manual, nx):
        self.vm = vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), nr_vcpus=3,
                          params=KvmParams(eager_page_split=eager, nx_huge_pages=nx,
                                           nx_huge_pages_recovery_ratio=2))
        if manual:
            vm.enable_manual_dirty_log_protect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self.manual, self.nx = manual, nx
        self.where = {}
        for sid, (gpa, _) in GPAS.items():
            vm.add_memory(gpa, SIZE, slot=sid, thp=True, populate=True)
            self.where[sid] = gpa
        self.t = vm.register_mmu(TdpMmu(vm))
        for v in vm.vcpus:
            self.t.kvm_mmu_load(v)
        self.touched = {sid: set() for sid in GPAS}     # faulted since the last harvest
        self.written = {sid: set() for sid in GPAS}     # written since the last harvest
        self.readonly = {sid: False for sid in GPAS}    # the VMA mprotected read-only

    # ----------------------------------------------------------------- helpers
    def _slot(self, sid):
        return self.vm.memslots[0].id_to_memslot(sid)

    def _logging(self, sid):
        return bool(self._slot(sid).flags & KVM_MEM_LOG_DIRTY_PAGES)

    def _leaf(self, v, gfn):
        sptes, levels = self.t.translate(v, np.array([gfn], np.uint64))
        return int(sptes[0]), int(levels[0])

    # ------------------------------------------------------------------- rules
    @rule(sid=st.sampled_from(sorted(GPAS)), off=st.integers(0, NPAGES - 1),
          kind=st.sampled_from(["read", "write", "exec"]), vcpu=st.integers(0, 2),
          n=st.integers(1, 6), same=st.booleans())
    def fault(self, sid, off, kind, vcpu, n, same):
        v = self.vm.vcpus[vcpu]
        if "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in v.requests:
            self.t.kvm_mmu_load(v)
        for k in range(n):
            # `same`: every vCPU faults the same gfn in turn (a fault another
            # vCPU already fixed is SPURIOUS for the next one)
            o = off if same else (off + 53 * k) % NPAGES
            w = self.vm.vcpus[(vcpu + k) % 3] if same else v
            if "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in w.requests:
                self.t.kvm_mmu_load(w)
            gfn = (self.where[sid] >> 12) + o
            r = self.t.page_fault(w, gfn, write=kind == "write", exec=kind == "exec")
            if kind == "write" and self.readonly[sid]:
                assert r == -EFAULT, r                  # hva_to_pfn: no writable host page
                continue
            assert r in (RET_PF_FIXED, RET_PF_SPURIOUS), (kind, r)
            self.touched[sid].add(o)
            spte, level = self._leaf(w, gfn)
            assert is_shadow_present_pte(spte), f"gfn {gfn:#x} not mapped after {kind}"
            if kind == "write":
                self.written[sid].add(o)
                assert spte & 2, f"gfn {gfn:#x} not writable after a write fault"
            if kind == "exec":
                assert spte & 4, f"gfn {gfn:#x} not executable after a fetch"
                if self.nx:
                    assert level == 1, f"fetch with nx_huge_pages mapped level {level}"

    @rule(sid=st.sampled_from(sorted(GPAS)), writable=st.booleans())
    def host_mprotect(self, sid, writable):
        """mprotect the slot's whole VMA (the host model changes whole VMAs)."""
        self.vm.host.mprotect(self._slot(sid).userspace_addr, SIZE, writable)
        self.readonly[sid] = not writable

    @rule(sid=st.sampled_from(sorted(GPAS)), chunk=st.integers(0, SIZE // (2 * MiB) - 1))
    def host_migrate(self, sid, chunk):
        self.vm.host.migrate_pages(self._slot(sid).userspace_addr + chunk * 2 * MiB, 2 * MiB)

    @rule(sid=st.sampled_from(sorted(GPAS)))
    def move_slot(self, sid):
        """KVM_MR_MOVE: the old gpa range is zapped; the slot's dirty bitmap
        goes with it, so the model keeps its sets."""
        s = self._slot(sid)
        a, b = GPAS[sid]
        new = b if self.where[sid] == a else a
        self.vm.set_user_memory_region(sid, s.flags, new, SIZE, s.userspace_addr)
        self.where[sid] = new

    @rule(sid=st.sampled_from(sorted(GPAS)))
    def toggle_dirty_log(self, sid):
        s = self._slot(sid)
        flags = s.flags ^ KVM_MEM_LOG_DIRTY_PAGES
        self.vm.set_user_memory_region(sid, flags, s.base_gfn << 12, SIZE, s.userspace_addr)
        if flags & KVM_MEM_LOG_DIRTY_PAGES:
            self._harvest(sid, check=False)              # start a clean round

    def _harvest(self, sid, check=True):
        bm = self.vm.get_dirty_log(sid)
        got = _bits(bm, NPAGES)
        if self.manual:
            # KVM_GET_DIRTY_LOG only reads; KVM_CLEAR_DIRTY_LOG re-protects
            self.vm.clear_dirty_log(sid, 0, NPAGES, bm)
        if check:
            assert self.written[sid] <= got, sorted(self.written[sid] - got)[:5]
            assert got <= self.touched[sid], sorted(got - self.touched[sid])[:5]
        self.written[sid], self.touched[sid] = set(), set()

    @precondition(lambda self: any(self._logging(s) for s in GPAS))
    @rule(data=st.data())
    def dirty_round(self, data):
        sid = data.draw(st.sampled_from([s for s in sorted(GPAS) if self._logging(s)]))
        self._harvest(sid)

    @rule(sid=st.sampled_from(sorted(GPAS)))
    def age(self, sid):
        self.vm.host.age(self._slot(sid).userspace_addr, SIZE)

    @rule()
    def nx_recovery(self):
        self.t.kvm_recover_nx_huge_pages()

    @rule()
    def zap_all_fast(self):
        self.t.kvm_mmu_zap_all_fast()

    # --------------------------------------------------------------- invariant
    @invariant()
    def consistent(self):
        vm = self.vm
        for root in self.t.roots:
            if root.invalid:
                continue
            for gfn, level, _, spte in TdpIter(vm.arena, root.sp, 0, 1 << 36):
                if not is_shadow_present_pte(spte) or not is_last_spte(spte, level):
                    continue
                n = 1 << (9 * (level - 1))
                slot = vm.gfn_to_memslot(gfn)
                assert slot is not None and gfn + n <= slot.base_gfn + slot.npages, \
                    f"leaf {gfn:#x}/{level} outside every memslot"
                g = np.arange(gfn, gfn + n, dtype=np.uint64)
                hva = np.uint64(slot.userspace_addr) + ((g - np.uint64(slot.base_gfn)) << np.uint64(12))
                pfn, writable = vm.host.hva_to_pfn_array(hva)
                base = spte_to_pfn(spte)
                assert (pfn == np.arange(base, base + n, dtype=np.uint64)).all(), \
                    f"leaf {gfn:#x}/{level} maps {base:#x}, the host has {int(pfn[0]):#x}"
                assert level <= vm.kvm_mmu_max_mapping_level(slot, gfn, 3)
                if spte & 2:
                    assert not self.readonly[slot.id], f"leaf {gfn:#x} writable over a read-only VMA"
                    assert not (level > 1 and slot.flags & KVM_MEM_LOG_DIRTY_PAGES)
                if self.nx and level > 1:
                    assert not spte & 4, f"executable huge leaf {gfn:#x}/{level} with nx_huge_pages"
        assert self.t.audit() == []
        assert vm.audit(raise_=False) == []


TestTdpModel = TdpModelMachine.TestCase
TestTdpModel.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)


def test_manual_protect_round_reports_exactly_the_writes():
    """With only write faults, KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG report
    exactly the written gfns, and a cleared page is write-protected again
    (its next write is a fast page fault that marks it dirty)."""
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), params=KvmParams(eager_page_split=True))
    vm.enable_manual_dirty_log_protect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    s = vm.add_memory(0, SIZE, slot=0, thp=True, populate=True)
    t = vm.register_mmu(TdpMmu(vm))
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    t.map_memory(v, np.arange(NPAGES, dtype=np.uint64))
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, SIZE, s.userspace_addr)
    vm.clear_dirty_log(0, 0, NPAGES, vm.get_dirty_log(0))
    first = {3, 64, 65, 511, 512, 1023}
    for g in sorted(first):
        assert t.page_fault(v, g, write=True) == RET_PF_FIXED
    bm = vm.get_dirty_log(0)
    assert _bits(bm, NPAGES) == first
    assert _bits(vm.get_dirty_log(0), NPAGES) == first      # GET alone clears nothing
    # clear only the first 64 pages' word: 3 is re-protected, the others stay dirty
    part = np.zeros_like(bm)
    part[0] = bm[0]
    vm.clear_dirty_log(0, 0, 64, part[:1])
    assert _bits(vm.get_dirty_log(0), NPAGES) == first - {3}
    fast = v.stat.pf_fast
    assert t.page_fault(v, 3, write=True) == RET_PF_FIXED and v.stat.pf_fast == fast + 1
    assert t.page_fault(v, 64, write=True) == RET_PF_SPURIOUS     # never re-protected
    assert _bits(vm.get_dirty_log(0), NPAGES) == first
    assert t.audit() == [] and vm.audit(raise_=False) == []


def test_a_fault_in_a_moved_slot_maps_the_new_gpa_and_the_old_one_is_gone():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"))
    s = vm.add_memory(0, SIZE, slot=0, thp=True, populate=True)
    t = vm.register_mmu(TdpMmu(vm))
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    assert t.page_fault(v, 0x10, write=True) == RET_PF_FIXED

    def pfn_of(gfn):
        sptes, levels = t.translate(v, np.array([gfn], np.uint64))
        return spte_to_pfn(int(sptes[0])) + (gfn & ((1 << (9 * (int(levels[0]) - 1))) - 1))

    pfn = pfn_of(0x10)
    vm.set_user_memory_region(0, 0, 64 * MiB, SIZE, s.userspace_addr)
    assert not is_shadow_present_pte(int(t.translate(v, np.array([0x10], np.uint64))[0][0]))
    new = (64 * MiB >> 12) + 0x10
    r = t.page_fault(v, new)
    assert r in (RET_PF_FIXED, RET_PF_RETRY)
    if r == RET_PF_RETRY:                                 # the move bumped the generation
        t.kvm_mmu_load(v)
        assert t.page_fault(v, new) == RET_PF_FIXED
    assert pfn_of(new) == pfn                             # the same host page, new gpa
    assert t.page_fault(v, 0x10) == RET_PF_EMULATE       # the old gpa is a hole now
    assert t.audit() == [] and vm.audit(raise_=False) == []
