"""The TDP MMU's mirror roots (TDX), at the MMU seam (mirror-tdx.md §3-§6, §11-§12).

The KVM TDX side is replaced here by small doubles over the TDX-module model
(:class:`kvmmmu.tdx_module.TdxModule`), so that what the MMU does - which hook,
in which order, with the SPTE in which state - is checked on its own:

* the roots: a TD vCPU loads the mirror root first, then the direct one; they
  differ only in ``is_mirror``; the direct root is indexed with the shared bit;
* a private fault links the missing tables top-down (SEPT.ADD at TDX levels
  3, 2, 1) and then the leaf (AUG), each while the mirror SPTE holds FROZEN;
  a second vCPU's fault on the same gfn is spurious, without a second AUG;
* a failing hook leaves the mirror SPTE as it was (BUSY: retry; the new table
  and its external page go back at once);
* zaps: conversions and memslot deletion remove private leaves through the
  hook (the tables stay); fast zap and zap-all never touch the mirror root;
  teardown frees the mirror tables bottom-up through free_external_spt;
* the KVM_BUG_ON sites of the mirror path bug the VM;
* broken propagation doubles (a leaf before its table, a removal without
  TRACK) are caught by the module model and by ``audit_mirror``.
"""
import errno as E

import numpy as np
import pytest

from kvmmmu._core.defs import RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS
from kvmmmu.host import HostConfig
from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmmmu.mmu import PFERR_GUEST_FINAL_MASK, PFERR_PRIVATE_ACCESS
from kvmmmu.tdx_module import TdxModule
from kvmmmu.vm import VM

W = 2
PRIV = W | PFERR_PRIVATE_ACCESS | PFERR_GUEST_FINAL_MASK      # tdx_handle_ept_violation
SHARED_BIT = 1 << 47                                           # GPAW 48
GB = 1 << 30


class ModuleTdx:
    """The TDX kvm_x86_ops as v6.18 issues them (mirror-tdx.md §4, §7.2),
    minimal: no premapping, no pinning, one TD made RUNNABLE at once.  The
    ``calls`` list records the hooks the MMU made, in order."""

    era = "v6.18"

    def __init__(self, vm, module=None):
        self.vm = vm
        self.module = module or TdxModule()
        self.td = None
        self.nr_premapped = 0
        self.pre_fault_allowed = False
        self.calls = []

    def start(self, finalize=True):
        r, self.td = self.module.tdh_mng_create(0x7F0000, 9, ept_levels=4)
        assert r.ok
        self.vm.gfn_direct_bits = SHARED_BIT >> 12
        if finalize:
            assert self.module.tdh_mr_finalize(self.td).ok
            self.pre_fault_allowed = True

    def _ret(self, r):
        if r.ok:
            return 0
        if r.busy:
            return -E.EBUSY
        self.vm.kvm_bug(f"SEAMCALL failed: {r.status_name}")
        return -E.EIO

    def link_external_spt(self, gfn, level, external_spt):
        self.calls.append(("link", gfn, level))
        return self._ret(self.module.tdh_mem_sept_add(self.td, gfn << 12, level - 1, external_spt))

    def set_external_spte(self, gfn, level, pfn):
        self.calls.append(("set", gfn, level))
        return self._ret(self.module.tdh_mem_page_aug(self.td, gfn << 12, level - 1, pfn))

    def remove_external_spte(self, gfn, level, pfn):
        self.calls.append(("remove", gfn, level))
        m, gpa = self.module, gfn << 12
        for step in (lambda: m.tdh_mem_range_block(self.td, gpa, level - 1),
                     lambda: m.tdh_mem_track(self.td),
                     lambda: m.tdh_mem_page_remove(self.td, gpa, level - 1)):
            r = self._ret(step())
            if r:
                return r
        return 0

    def free_external_spt(self, gfn, level, external_spt):
        self.calls.append(("free", gfn, level))
        return self._ret(self.module.tdh_phymem_page_reclaim(external_spt))

    def release_hkid(self):
        assert self.module.tdh_mng_key_freeid(self.td).ok

    def audit(self):
        return self.module.audit()


def make_td(nr_vcpus=1, size=GB, private=(0, 16 << 20), tdx_cls=ModuleTdx):
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", nr_vcpus=nr_vcpus)
    vm.tdx = tdx = tdx_cls(vm)
    tdx.start()
    slot = vm.add_memory(0, size, guest_memfd=True)
    if private:
        vm.set_memory_attributes(private[0], private[1], KVM_MEMORY_ATTRIBUTE_PRIVATE)
    for v in vm.vcpus:
        assert v.kvm_mmu_reload() == 0
    return vm, tdx, slot


def mirror_entries(vm):
    mmu = vm.mmu_backend
    root = next(r for r in mmu.roots if r.is_mirror and not r.invalid)
    return {(int(e["gfn"]), int(e["level"])): bool(e["leaf"]) for e in mmu.core.dump(root.sp)}


def names(module, start=0):
    return [c.name.removeprefix("tdh_mem_") for c in module.calls[start:]]


# --------------------------------------------------------------------------- roots

def test_a_td_vcpu_loads_the_mirror_root_first_and_shares_both():
    vm, _tdx, _ = make_td(nr_vcpus=2)
    mmu = vm.mmu_backend
    mirror, direct = mmu.roots                         # allocation order
    assert mirror.is_mirror and not direct.is_mirror
    assert mirror.role.replace(is_mirror=0) == direct.role
    assert mirror.refcount == direct.refcount == 3     # the list's + two vCPUs'
    v = vm.vcpus[0]
    assert mmu.vcpu_mirror_root[v.index] is mirror and v.mmu_root is direct
    # kvm_mmu_unload (a context reset) keeps the mirror root
    mmu.kvm_mmu_unload(v)
    assert mmu.vcpu_mirror_root[v.index] is mirror and direct.refcount == 2
    assert v.kvm_mmu_reload() == 0 and mmu.roots == [mirror, direct] and direct.refcount == 3


def test_the_direct_root_is_indexed_with_the_shared_bit():
    vm, _tdx, slot = make_td(private=None)
    v = vm.vcpus[0]
    gfn = 0x12345
    vm.host.populate(slot.userspace_addr + (gfn << 12), 4096)
    assert v.kvm_mmu_page_fault(SHARED_BIT | gfn << 12, W | PFERR_GUEST_FINAL_MASK) == RET_PF_FIXED
    root = v.mmu_root
    top = vm.arena.spt(root.sp)
    used = np.flatnonzero(top & 7)                    # EPT RWX: present
    # root index of gfn | bit 35: bits 27..35 of it (independent arithmetic)
    assert used.tolist() == [((gfn | SHARED_BIT >> 12) >> 27) & 511] == [256]
    sptes, levels = vm.mmu_backend.translate(v, np.array([gfn], np.uint64))
    pfn, _ = vm.host.hva_to_pfn_array(np.array([slot.userspace_addr + (gfn << 12)], np.uint64))
    assert levels[0] == 1 and int(sptes[0]) >> 12 & ((1 << 40) - 1) == int(pfn[0])
    assert mirror_entries(vm) == {}
    assert vm.audit(raise_=False) == []


# --------------------------------------------------------------------------- private faults

def test_a_private_fault_links_tables_top_down_then_augs_the_leaf():
    vm, tdx, slot = make_td()
    v = vm.vcpus[0]
    n0 = len(tdx.module.calls)
    assert v.kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_FIXED
    assert names(tdx.module, n0) == ["sept_add"] * 3 + ["page_aug"]
    assert [c.args[:2] for c in tdx.module.calls[n0:]] == [(0, 3), (0, 2), (0, 1), (0x5000, 0)]
    # the AUGed page is the guest_memfd page of the gfn
    assert tdx.module.calls[-1].args[2] == slot.gmem.get_pfn(slot, 5)
    assert mirror_entries(vm) == {(0, 4): False, (0, 3): False, (0, 2): False, (5, 1): True}
    assert vm.arena.page_stats["pages_4k"] == 1
    # the same 2M: only the leaf; the same gfn from another vCPU: spurious, no AUG
    n1 = len(tdx.module.calls)
    assert v.kvm_mmu_page_fault(0x6000, PRIV) == RET_PF_FIXED
    assert names(tdx.module, n1) == ["page_aug"]
    vm2, tdx2, _ = make_td(nr_vcpus=2)
    assert vm2.vcpus[0].kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_FIXED
    n2 = len(tdx2.module.calls)
    assert vm2.vcpus[1].kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_SPURIOUS
    assert len(tdx2.module.calls) == n2
    assert vm.audit(raise_=False) == [] and vm2.audit(raise_=False) == []


def test_the_mirror_spte_is_frozen_while_the_hook_runs():
    seen = []

    class Watch(ModuleTdx):
        def link_external_spt(self, gfn, level, external_spt):
            seen.append(("link", level, self._read(gfn, level)))
            return super().link_external_spt(gfn, level, external_spt)

        def set_external_spte(self, gfn, level, pfn):
            seen.append(("set", level, self._read(gfn, level)))
            return super().set_external_spte(gfn, level, pfn)

        def _read(self, gfn, level):
            mmu = self.vm.mmu_backend
            root = next(r for r in mmu.roots if r.is_mirror)
            from kvmmmu._core.tdp_iter import kvm_tdp_mmu_get_walk
            sptes, levels = kvm_tdp_mmu_get_walk(self.vm.arena, root.sp, np.array([gfn], np.uint64))
            assert levels[0] == level
            return int(sptes[0])

    vm, _tdx, _ = make_td(tdx_cls=Watch)
    assert vm.vcpus[0].kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_FIXED
    frozen = vm.fmt.masks()["frozen_spte"]
    assert [(k, lvl) for k, lvl, _ in seen] == [("link", 4), ("link", 3), ("link", 2), ("set", 1)]
    assert {spte for _, _, spte in seen} == {frozen}
    assert vm.audit(raise_=False) == []


@pytest.mark.parametrize("at", ["tdh_mem_sept_add", "tdh_mem_page_aug"])
def test_busy_from_a_map_hook_restores_the_spte_and_the_fault_retries(at):
    vm, tdx, _ = make_td()
    v = vm.vcpus[0]
    kernel0 = vm.host.phys.nr_kernel
    tdx.module.inject_busy(name=at, times=1)
    assert v.kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_RETRY
    # BUSY at the first SEPT.ADD: nothing linked; at AUG: the tables were
    # linked before, the leaf is not
    tables = {} if at == "tdh_mem_sept_add" else {(0, 4): False, (0, 3): False, (0, 2): False}
    assert mirror_entries(vm) == tables and vm.arena.page_stats["pages_4k"] == 0
    assert vm.mmu_backend.core.tdp_mmu_pages == len(tables)
    assert not vm.bugged and vm.audit(raise_=False) == []
    if not tables:      # the unlinked table's external page went back to the host
        # (-1; +1: the gfn's guest_memfd page, allocated at faultin)
        assert vm.host.phys.nr_kernel == kernel0
    assert v.kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_FIXED
    assert vm.audit(raise_=False) == []


def test_another_hook_error_bugs_the_vm_and_leaves_the_mirror_unchanged():
    vm, tdx, _ = make_td()
    v = vm.vcpus[0]
    assert v.kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_FIXED
    tdx.module.tdh_mem_page_aug(tdx.td, 0x6000, 0, 0x999999)   # someone else's AUG: not free
    before = mirror_entries(vm)
    assert v.kvm_mmu_page_fault(0x6000, PRIV) == RET_PF_RETRY
    assert mirror_entries(vm) == before and vm.bugged


def test_a_hook_that_raises_bugs_the_vm_without_unwinding_through_c():
    class Raises(ModuleTdx):
        def set_external_spte(self, gfn, level, pfn):
            raise RuntimeError("broken double")

    vm, _tdx, _ = make_td(tdx_cls=Raises)
    assert vm.vcpus[0].kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_RETRY
    assert vm.bugged
    ops = vm.mmu_backend.external_ops
    assert isinstance(ops.errors[0], RuntimeError)
    assert (5, 1) not in mirror_entries(vm)


def test_a_private_fault_on_a_shared_gfn_is_a_memory_fault_exit():
    vm, tdx, _ = make_td(private=None)
    v = vm.vcpus[0]
    n0 = len(tdx.module.calls)
    assert v.kvm_mmu_page_fault(0x5000, PRIV) == -E.EFAULT
    assert v.last_fault.memory_fault_exit and len(tdx.module.calls) == n0
    vm.set_memory_attributes(0x5000, 4096, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert v.kvm_mmu_page_fault(SHARED_BIT | 0x5000, W | PFERR_GUEST_FINAL_MASK) == -E.EFAULT


# --------------------------------------------------------------------------- zaps

def test_converting_private_to_shared_removes_leaves_through_the_hook():
    vm, tdx, _ = make_td()
    v = vm.vcpus[0]
    for g in (5, 6, 0x300):
        assert v.kvm_mmu_page_fault(g << 12, PRIV) == RET_PF_FIXED
    tdx.calls.clear()
    n0 = len(tdx.module.calls)
    vm.set_memory_attributes(0x5000, 0x2000, 0)                # 5 and 6 become shared
    assert tdx.calls == [("remove", 5, 1), ("remove", 6, 1)]
    assert names(tdx.module, n0) == ["range_block", "track", "page_remove"] * 2
    ent = mirror_entries(vm)
    assert (5, 1) not in ent and (6, 1) not in ent and ent[(0x300, 1)]
    assert (0, 2) in ent                                        # the tables stay
    assert vm.arena.page_stats["pages_4k"] == 1
    assert vm.audit(raise_=False) == []


def td_with_a_private_and_a_shared_page():
    """A TD with private gfn 5 mapped in the mirror root and shared gfn
    0x2000 in the direct one."""
    vm, tdx, slot = make_td()
    v = vm.vcpus[0]
    assert v.kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_FIXED
    vm.host.populate(slot.userspace_addr + (0x2000 << 12), 4096)
    assert v.kvm_mmu_page_fault(SHARED_BIT | 0x2000 << 12, W | PFERR_GUEST_FINAL_MASK) == RET_PF_FIXED
    return vm, tdx, slot, v


def test_fast_zap_and_zap_all_never_touch_the_mirror_root():
    vm, tdx, slot, v = td_with_a_private_and_a_shared_page()
    mmu = vm.mmu_backend
    mirror = next(r for r in mmu.roots if r.is_mirror)
    tdx.calls.clear()
    mmu.kvm_mmu_zap_all_fast()
    assert not mirror.invalid and tdx.calls == [] and mirror_entries(vm)[(5, 1)]
    assert v.kvm_mmu_reload() == 0
    mmu.kvm_arch_flush_shadow_all()
    assert tdx.calls == [] and mirror_entries(vm)[(5, 1)]
    assert vm.arena.page_stats["pages_4k"] == 1                 # only the private leaf
    assert vm.audit(raise_=False) == []


def test_deleting_a_td_memslot_zaps_its_leaves_in_both_roots():
    vm, tdx, slot, v = td_with_a_private_and_a_shared_page()
    tdx.calls.clear()
    vm.delete_memslot(slot.id)
    assert tdx.calls == [("remove", 5, 1)]
    assert vm.arena.page_stats["pages_4k"] == 0
    assert not [k for k, leaf in mirror_entries(vm).items() if leaf]
    assert vm.audit(raise_=False) == []


def test_teardown_frees_the_mirror_tables_bottom_up_after_the_hkid_release():
    vm, tdx, _ = make_td(nr_vcpus=2, size=2 * GB)
    vm.set_memory_attributes(GB, 4096, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    v = vm.vcpus[0]
    for g in (5, 0x300, 0x40000):                               # two 1G-level subtrees
        assert v.kvm_mmu_page_fault(g << 12, PRIV) == RET_PF_FIXED
    vm.set_memory_attributes(0, 16 << 20, 0)                    # guest_memfd release: leaves go
    vm.set_memory_attributes(0x40000 << 12, 4096, 0)
    assert vm.arena.page_stats["pages_4k"] == 0
    tdx.release_hkid()
    mmu = vm.mmu_backend
    for w in vm.vcpus:
        mmu.kvm_mmu_destroy(w)
    tdx.calls.clear()
    mmu.kvm_mmu_uninit_tdp_mmu()
    frees = [c for c in tdx.calls if c[0] == "free"]
    # each 1G subtree from its bottom, then the 512G table: the 4K tables of
    # gfns 5 and 0x300 (two 2M frames) and their 2M table, then 0x40000's
    assert [(g, lvl) for _, g, lvl in frees] == [(0, 1), (0x200, 1), (0, 2), (0x40000, 1),
                                                 (0x40000, 2), (0, 3)]
    assert mmu.roots == [] and mmu.core.tdp_mmu_pages == 0
    assert tdx.module.sept_snapshot(tdx.td) == {}
    assert not vm.warn_sink.warnings and not vm.bugged


def test_freeing_mirror_tables_while_the_hkid_is_assigned_leaks_them_with_a_warn():
    vm, tdx, _ = make_td()
    v = vm.vcpus[0]
    assert v.kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_FIXED
    vm.set_memory_attributes(0, 16 << 20, 0)
    mmu = vm.mmu_backend
    mmu.kvm_mmu_destroy(v)
    mmu.kvm_mmu_uninit_tdp_mmu()                                # HKID still assigned
    assert mmu.core.warnings()                                  # RECLAIM refused: WARN_ON, leak
    assert vm.bugged                                             # (the double bugs the VM too)


# --------------------------------------------------------------------------- KVM_BUG_ON sites

def test_an_atomic_zap_of_the_mirror_root_is_a_kvm_bug():
    vm, _tdx, _ = make_td()
    v = vm.vcpus[0]
    assert v.kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_FIXED
    mmu = vm.mmu_backend
    mirror = next(r for r in mmu.roots if r.is_mirror)
    before = mirror_entries(vm)
    mmu.core.zap_root_shared(mirror.sp)
    assert vm.bugged and mirror_entries(vm) == before
    assert any("zapped under the read lock" in k for k in mmu.core.warnings())


# --------------------------------------------------------------------------- broken propagation

def test_a_double_that_sets_the_leaf_before_its_tables_is_caught():
    class LeafFirst(ModuleTdx):
        """Defers every SEPT.ADD until after the next leaf: the order bug."""

        def __init__(self, vm):
            super().__init__(vm)
            self.pending = []

        def link_external_spt(self, gfn, level, external_spt):
            self.pending.append((gfn, level, external_spt))
            return 0

        def set_external_spte(self, gfn, level, pfn):
            r = super().set_external_spte(gfn, level, pfn)
            for p in self.pending:
                super().link_external_spt(*p)
            self.pending.clear()
            return r

    vm, tdx, _ = make_td(tdx_cls=LeafFirst)
    assert vm.vcpus[0].kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_RETRY
    aug = next(c for c in tdx.module.calls if c.name == "tdh_mem_page_aug")
    assert aug.status_name.startswith("TDX_EPT_WALK_FAILED")
    assert vm.bugged
    assert any(x.startswith("M2") or x.startswith("S-EPT") for x in vm.mmu_backend.audit_mirror())


def test_a_double_that_removes_without_track_is_caught():
    class NoTrack(ModuleTdx):
        def remove_external_spte(self, gfn, level, pfn):
            m, gpa = self.module, gfn << 12
            r = self._ret(m.tdh_mem_range_block(self.td, gpa, 0))
            return r or self._ret(m.tdh_mem_page_remove(self.td, gpa, 0))

    vm, tdx, _ = make_td(tdx_cls=NoTrack)
    assert vm.vcpus[0].kvm_mmu_page_fault(0x5000, PRIV) == RET_PF_FIXED
    vm.set_memory_attributes(0x5000, 4096, 0)
    rem = next(c for c in tdx.module.calls if c.name == "tdh_mem_page_remove")
    assert rem.status_name.startswith("TDX_TLB_TRACKING_NOT_DONE")
    assert vm.bugged
    assert any(x.startswith("S-EPT entry") for x in vm.mmu_backend.audit_mirror())


# --------------------------------------------------------------------------- several vCPU threads

def test_vcpu_threads_faulting_the_same_private_gfns_aug_each_once():
    """Four vCPU threads fault overlapping private gfns at once: the map
    paths run in parallel (nogil) and meet each other's FROZEN entries
    (RET_PF_RETRY) while a hook runs; every gfn ends mapped once, every
    table linked once, and the module saw no second AUG or SEPT.ADD of one
    entry (it would refuse it and the double would bug the VM)."""
    from _threads import run_in_threads
    import time

    class Slow(ModuleTdx):
        """Each map hook lets the other threads run (as a SEAMCALL takes
        time): their walks then meet the entry FROZEN."""

        def link_external_spt(self, *a):
            time.sleep(1e-4)
            return super().link_external_spt(*a)

        def set_external_spte(self, *a):
            time.sleep(1e-4)
            return super().set_external_spte(*a)

    vm, tdx, slot = make_td(nr_vcpus=4, tdx_cls=Slow)
    gfns = list(range(0, 1024, 3))
    results = [[] for _ in vm.vcpus]
    retries = [0] * 4

    def run(i):
        v = vm.vcpus[i]
        order = gfns[i::2] + gfns[(i + 1) % 2::2]             # every thread touches every gfn
        for g in order:
            while True:
                r = v.kvm_mmu_page_fault(g << 12, PRIV)
                if r != RET_PF_RETRY:
                    break
                retries[i] += 1
            results[i].append(r)

    run_in_threads(run, 4)
    assert not vm.bugged, vm.bugged
    assert sum(retries) > 0                 # the FROZEN entries were met
    assert all(r in (RET_PF_FIXED, RET_PF_SPURIOUS) for rs in results for r in rs)
    augs = [c for c in tdx.module.calls if c.name == "tdh_mem_page_aug" and c.status == 0]
    assert sorted(c.args[0] >> 12 for c in augs) == gfns
    leaves = sorted(g for (g, _), leaf in mirror_entries(vm).items() if leaf)
    assert leaves == gfns and vm.arena.page_stats["pages_4k"] == len(gfns)
    assert vm.audit(raise_=False) == []


def test_a_private_batch_map_equals_the_scalar_faults():
    """map_memory(private=True) (the KVM_PRE_FAULT_MEMORY path) leaves the
    mirror, the S-EPT and the stats exactly as one scalar private fault per
    gfn does: every leaf goes through the hook, none through the batch's
    fresh-leaf shortcut."""
    gfns = np.array(sorted({(i * 7919) % 4096 for i in range(3000)}), np.uint64)
    states = []
    for batch in (False, True):
        vm, tdx, _ = make_td()
        v = vm.vcpus[0]
        if batch:
            r = vm.mmu_backend.map_memory(v, gfns, private=True)
            assert set(r.tolist()) == {RET_PF_FIXED}
        else:
            for g in gfns.tolist():
                assert v.kvm_mmu_page_fault(g << 12, PRIV) == RET_PF_FIXED
        assert vm.audit(raise_=False) == []
        sept = tdx.module.sept_snapshot(tdx.td)
        states.append((mirror_entries(vm), {k: v[:2] for k, v in sept.items()},
                       dict(vm.arena.page_stats), vm.mmu_backend.core.tdp_mmu_pages))
    # the pfns differ (allocation order); compare the shapes and the leaves' gfns
    assert states[0][0] == states[1][0]
    assert {k: s for k, (s, _) in states[0][1].items()} == {k: s for k, (s, _) in states[1][1].items()}
    assert states[0][2:] == states[1][2:]
    with pytest.raises(ValueError, match="private"):
        vm.mmu_backend.map_memory(v, np.array([1 << 17], np.uint64), private=True)   # shared gfn


def test_shared_huge_pages_only_where_the_frame_is_not_mixed():
    """KVM_LPAGE_MIXED_FLAG (mirror-tdx.md §10): a shared fault maps 2M on
    the direct root where the whole 2M frame is shared, 4K where one of its
    gfns is private; private mappings are 4K whatever the frame."""
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx")
    vm.tdx = ModuleTdx(vm)
    vm.tdx.start()
    vm.add_memory(0, GB, guest_memfd=True, thp=True, populate=True)
    vm.set_memory_attributes(0x400000 + 0x3000, 4096, KVM_MEMORY_ATTRIBUTE_PRIVATE)  # frame 2
    v = vm.vcpus[0]
    assert v.kvm_mmu_reload() == 0
    shared = W | PFERR_GUEST_FINAL_MASK
    assert v.kvm_mmu_page_fault(SHARED_BIT | 0x200000, shared) == RET_PF_FIXED
    assert v.kvm_mmu_page_fault(SHARED_BIT | 0x400000, shared) == RET_PF_FIXED
    assert v.kvm_mmu_page_fault(0x403000, PRIV) == RET_PF_FIXED
    _, levels = vm.mmu_backend.translate(v, np.array([0x200, 0x400], np.uint64))
    assert levels.tolist() == [2, 1]
    _, mlevels = vm.mmu_backend.translate(v, np.array([0x403], np.uint64), mirror=True)
    assert mlevels.tolist() == [1]
    # the frame becomes uniform again: the next shared fault there may map 2M
    vm.set_memory_attributes(0x403000, 4096, 0)
    assert v.kvm_mmu_page_fault(SHARED_BIT | 0x401000, shared) in (RET_PF_FIXED, RET_PF_SPURIOUS)
    vm.mmu_backend.kvm_mmu_zap_all_fast()
    assert v.kvm_mmu_reload() == 0
    assert v.kvm_mmu_page_fault(SHARED_BIT | 0x401000, shared) == RET_PF_FIXED
    _, levels = vm.mmu_backend.translate(v, np.array([0x401], np.uint64))
    assert levels.tolist() == [2]
    assert vm.audit(raise_=False) == []


def test_pre_fault_memory_maps_private_and_shared_pages_once_finalized():
    """KVM_PRE_FAULT_MEMORY on a TD (mirror-tdx.md §2.2 rule 5): refused
    before FINALIZE (-EOPNOTSUPP) and for an aliased gpa (-EINVAL); a
    private gfn goes to the mirror root, a shared one to the direct root;
    the range written back is what is left."""
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx")
    vm.tdx = tdx = ModuleTdx(vm)
    tdx.start(finalize=False)
    vm.add_memory(0, GB, guest_memfd=True, populate=True)
    vm.set_memory_attributes(0, 0x4000, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    v = vm.vcpus[0]
    assert v.kvm_vcpu_pre_fault_memory(0, 0x8000) == (-E.EOPNOTSUPP, 0, 0x8000)
    assert vm.tdx.module.tdh_mr_finalize(tdx.td).ok
    tdx.pre_fault_allowed = True
    assert v.kvm_vcpu_pre_fault_memory(SHARED_BIT, 0x1000) == (-E.EINVAL, SHARED_BIT, 0x1000)
    assert v.kvm_vcpu_pre_fault_memory(0x1000, 0x3000, flags=1)[0] == -E.EINVAL
    assert v.kvm_vcpu_pre_fault_memory(0, 0x8000) == (0, 0x8000, 0)
    ent = mirror_entries(vm)
    assert sorted(g for (g, _), leaf in ent.items() if leaf) == [0, 1, 2, 3]
    _, levels = vm.mmu_backend.translate(v, np.arange(4, 8, dtype=np.uint64))
    assert levels.tolist() == [1, 1, 1, 1]
    from kvmmmu.mmu import _PF_TAKEN
    assert v.stat.pf[_PF_TAKEN] == 0                      # prefetch faults: not guest faults
    assert vm.audit(raise_=False) == []
    # a default VM: allowed at once; a huge mapping covers more than a page
    vm2 = VM("tdp_mmu", host=HostConfig(tdp="ept"))
    vm2.add_memory(0, 1 << 22, thp=True, populate=True)
    w = vm2.vcpus[0]
    assert w.kvm_vcpu_pre_fault_memory(0x1000, 0x3000) == (0, 0x4000, 0)
    assert vm2.mmu_backend.translate(w, np.array([1], np.uint64))[1].tolist() == [2]


def test_audit_mirror_catches_planted_violations():
    """Each check of audit_mirror can fail: a private gfn under a shared 2M
    leaf (attributes stored behind the MMU's back), a mirror leaf the S-EPT
    lacks, an S-EPT leaf the mirror lacks."""
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx")
    vm.tdx = tdx = ModuleTdx(vm)
    tdx.start()
    vm.add_memory(0, GB, guest_memfd=True, thp=True, populate=True)
    vm.set_memory_attributes(0x800000, 0x200000, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    v = vm.vcpus[0]
    assert v.kvm_mmu_reload() == 0
    assert v.kvm_mmu_page_fault(SHARED_BIT | 0x200000, W | PFERR_GUEST_FINAL_MASK) == RET_PF_FIXED
    assert v.kvm_mmu_page_fault(0x800000, PRIV) == RET_PF_FIXED
    mmu = vm.mmu_backend
    assert mmu.audit_mirror() == []
    vm.mem_attrs.store(0x201, 0x202, KVM_MEMORY_ATTRIBUTE_PRIVATE)      # no unmap
    assert any("maps private memory" in x for x in mmu.audit_mirror())
    vm.mem_attrs.store(0x201, 0x202, 0)
    # the S-EPT loses the leaf (removed behind KVM's back)
    m = tdx.module
    assert m.tdh_mem_range_block(tdx.td, 0x800000, 0).ok and m.tdh_mem_track(tdx.td).ok
    assert m.tdh_mem_page_remove(tdx.td, 0x800000, 0).ok
    assert any(x.startswith("M1") for x in mmu.audit_mirror())
    # and an S-EPT leaf without a mirror one
    assert m.tdh_mem_page_aug(tdx.td, 0x801000, 0, 0x123456).ok
    assert any(x.startswith("S-EPT entry tdx level 0 gpa 0x801000") for x in mmu.audit_mirror())


# --------------------------------------------------------------------------- hostile hooks

def test_hostile_hooks_never_crash_the_interpreter():
    """A hook is Python called from inside a C walk: one that re-enters the
    core (a zap of the root it is walking, a nested fault), returns
    garbage, raises, or drops the VM's last references cannot crash the
    interpreter or leave a FROZEN entry; each misdeed ends as an error
    result and a bugged VM."""
    from _probe import run_probe
    code = '''
import sys, gc
sys.path.insert(0, "tests")
from test_tdp_mirror import make_td, ModuleTdx, PRIV
import numpy as np

class Hostile(ModuleTdx):
    mode = None
    def set_external_spte(self, gfn, level, pfn):
        mmu = self.vm.mmu_backend
        root = next(r for r in mmu.roots if r.is_mirror)
        if self.mode == "zap":
            mmu.core.zap_root(root.sp)                       # exclusive inside a shared walk
        elif self.mode == "nested":
            return self.vm.vcpus[0].kvm_mmu_page_fault((gfn + 1) << 12, PRIV)
        elif self.mode == "big":
            return 1 << 80
        elif self.mode == "none":
            return None
        elif self.mode == "drop":
            self.vm.mmu_backend = None
            gc.collect()
            return -16
        return super().set_external_spte(gfn, level, pfn)

for mode in ("zap", "nested", "big", "none", "drop"):
    vm, tdx, _ = make_td(tdx_cls=Hostile)
    tdx.mode = mode
    mmu = vm.mmu_backend
    r = vm.vcpus[0].kvm_mmu_page_fault(0x5000, PRIV) if mode != "drop" else \\
        mmu.map_memory(vm.vcpus[0], np.array([5], np.uint64), private=True)
    d = mmu.core.dump(next(x for x in mmu.roots if x.is_mirror).sp)
    frozen = vm.fmt.masks()["frozen_spte"]
    assert not (d["spte"] == frozen).any(), mode
    assert vm.bugged or mode == "drop", mode          # garbage answers bug the VM too
'''
    res = run_probe(code)
    assert res.signal is None and not res.hung, res
    assert res.raised is None, (res.raised, res.msg)


def test_hostile_removal_hooks_never_crash_the_interpreter():
    """The write-locked side: remove_external_spte and free_external_spt run
    inside a zap holding the arena exclusively (without the GIL between
    hooks).  A hook that zaps the root again, frees the table being torn
    down or writes a header meanwhile is refused (ConcurrentUseError, the
    VM bugged) and the interpreter survives."""
    from _probe import run_probe
    code = '''
import sys
sys.path.insert(0, "tests")
from test_tdp_mirror import make_td, ModuleTdx, PRIV

class Hostile(ModuleTdx):
    mode = None
    def _misbehave(self):
        mmu = self.vm.mmu_backend
        root = next(r for r in mmu.roots if r.is_mirror)
        if self.mode == "zap":
            mmu.core.zap_root(root.sp)
        elif self.mode == "free":
            self.vm.arena.call_rcu_free_sp(root.sp)
        elif self.mode == "header":
            self.vm.arena.set_sp(root.sp, gfn=0x12345)
    def remove_external_spte(self, gfn, level, pfn):
        self._misbehave()
        return super().remove_external_spte(gfn, level, pfn)
    def free_external_spt(self, gfn, level, ext):
        self._misbehave()
        return super().free_external_spt(gfn, level, ext)

for mode in ("zap", "free", "header"):
    vm, tdx, _ = make_td(tdx_cls=Hostile)
    v = vm.vcpus[0]
    assert v.kvm_mmu_page_fault(0x5000, PRIV) == 5
    tdx.mode = mode
    vm.set_memory_attributes(0x5000, 0x1000, 0)          # remove_external_spte
    tdx.release_hkid()
    mmu = vm.mmu_backend
    mmu.kvm_mmu_destroy(v)
    mmu.kvm_mmu_uninit_tdp_mmu()                          # free_external_spt
    assert vm.bugged, mode
    assert type(mmu.external_ops.errors[0]).__name__ == "ConcurrentUseError", mode
'''
    res = run_probe(code)
    assert res.signal is None and not res.hung, res
    assert res.raised is None, (res.raised, res.msg)
