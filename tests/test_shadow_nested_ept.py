"""Nested EPT on the shadow MMU (``kvm_init_shadow_ept_mmu``): L2 runs under
L1's EPT on a ``VM("tdp")`` (TDP on the shadow MMU, tdp_mmu=N).

Expectations are written from the SDM's EPT rules and the kernel's
(mmu.c kvm_calc_shadow_ept_root_page_role, paging_tmpl.h PTTYPE_EPT,
vmx/nested.c nested_ept_* / handle_invept), by hand: role words, SPTE
permission bits, exit qualifications.  The security rule uses an EPT walker
written here from the SDM (Vol. 3C 29.3), not kvmmmu.paging.

No live check: this host runs no nested EPT (the recorded scenarios are
shadow paging), so nothing here is compared with a kernel trace.
"""
import errno
from functools import partial
from unittest import mock

import numpy as np
import pytest
from _inject import hog_arena, release
from _shadow_oracle import check_leaf_memslot, iter_shadow, memory_reader
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmmmu._core.defs import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS
from kvmmmu._core.pt_arena import PtArena
from kvmmmu.errors import KvmNoMemoryError
from kvmmmu.host import HostConfig
from kvmmmu.paging import AccessError, EptpError
from kvmmmu.shadow_mmu import (
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_EPT_VIOLATION,
    NestedEptError,
    ept_violation_error_code,
)
from kvmmmu.vm import VM

MiB = 1 << 20
# EPT entry bits (SDM Vol. 3C 29.3.2)
R, Wb, X = 1, 2, 4
WB = 6 << 3                       # memory type write-back in a leaf
PS = 1 << 7                       # leaf above 4K
EA, ED = 1 << 8, 1 << 9           # accessed / dirty (with EPTP bit 6)
# exit qualification (SDM Table 28-7)
Q_READ, Q_WRITE, Q_FETCH = 1, 2, 4
Q_GVA_VALID, Q_GVA_TRANSLATED = 1 << 7, 1 << 8
# PFERR bits
P_, W_, U_, RSVD_, F_ = 1, 2, 4, 8, 16
GUEST_FINAL, GUEST_PAGE = 1 << 32, 1 << 33
SPTE_TDP_AD_MASK = 3 << 52
SPTE_TDP_AD_DISABLED = 1 << 52
SPTE_MMU_PRESENT = 1 << 11
ADDR = ((1 << 52) - 1) & ~0xFFF

PML4 = 0x100000                   # L1's EPT tables live at 1 MiB..
DATA = 0x400000                   # L2's memory is L1's 4 MiB..


def eptp_of(pml4, *, ad=False, levels=4, memtype=6):
    return pml4 | ((levels - 1) << 3) | memtype | (1 << 6 if ad else 0)


def role_word(level, *, ad_disabled, direct=False, access=7):
    """union kvm_mmu_page_role by hand: level 3:0, direct 7, access 10:8,
    ad_disabled 16, guest_mode 17."""
    return level | (int(direct) << 7) | (access << 8) | (int(ad_disabled) << 16) | (1 << 17)


class Ept:
    """L1's EPT tables in L1's memory (written by the VMM: no tracking)."""

    def __init__(self, vm, pml4=PML4, levels=4):
        self.vm, self.pml4, self.levels = vm, pml4, levels
        self.next = pml4 + 0x1000
        vm.write_guest(pml4, bytes(4096))

    def get(self, gpa):
        return int.from_bytes(self.vm.read_guest(gpa, 8), "little")

    def set(self, gpa, val):
        self.vm.write_guest(gpa, val.to_bytes(8, "little"))

    def alloc(self):
        t = self.next
        self.next += 0x1000
        self.vm.write_guest(t, bytes(4096))
        return t

    def map(self, l2_gpa, l1_gpa, perm=R | Wb | X, *, level=1, extra=WB, table_perm=R | Wb | X,
            table_extra=0):
        """l2_gpa -> l1_gpa with leaf `perm` at `level`; returns the leaf
        entry's gpa."""
        t = self.pml4
        for lv in range(self.levels, level, -1):
            e_gpa = t + 8 * ((l2_gpa >> (12 + 9 * (lv - 1))) & 511)
            e = self.get(e_gpa)
            if not e & 7:
                e = self.alloc() | table_perm | table_extra
                self.set(e_gpa, e)
            t = e & ADDR
        e_gpa = t + 8 * ((l2_gpa >> (12 + 9 * (level - 1))) & 511)
        self.set(e_gpa, l1_gpa | perm | extra | (PS if level > 1 else 0))
        return e_gpa

    def table_gfns(self, l2_gpa):
        """The L1 gfns of the tables a walk of `l2_gpa` reads, top first."""
        out, t = [], self.pml4
        for lv in range(self.levels, 0, -1):
            out.append(t >> 12)
            e = self.get(t + 8 * ((l2_gpa >> (12 + 9 * (lv - 1))) & 511))
            if not e & 7 or lv == 1 or e & PS:
                break
            t = e & ADDR
        return out


def make_vm(**kw):
    vm = VM("tdp", **kw)
    vm.add_memory(0, 16 * MiB)
    vm.write_guest(0, bytes(16 * MiB))        # host pages exist and are writable (no COW retry)
    v = vm.vcpus[0] if vm.vcpus else vm.create_vcpu()
    v.vcpu_enter_guest()
    return vm, v


def l2_fault(v, gpa, qual):
    v.vcpu_enter_guest()
    return v.kvm_mmu_page_fault(gpa, ept_violation_error_code(qual | Q_GVA_VALID | Q_GVA_TRANSLATED))


def leaf(vm, v, l2_gpa):
    sm = vm.mmu_backend
    walk = sm.shadow_walk(v, l2_gpa)
    return walk[-1] if walk else None


def host_pfn(vm, gpa):
    slot = vm.gfn_to_memslot(gpa >> 12)
    pfn, _ = vm.host.hva_to_pfn_array(np.array(
        [slot.userspace_addr + gpa - (slot.base_gfn << 12)], dtype=np.uint64))
    return int(pfn[0])


# ----------------------------------------------------------------------------- basics
def test_error_code_from_exit_qualification():
    """__vmx_handle_ept_violation, by hand."""
    assert ept_violation_error_code(Q_READ) == U_
    assert ept_violation_error_code(Q_WRITE | (1 << 3)) == W_ | P_          # R present
    assert ept_violation_error_code(Q_FETCH | (4 << 3)) == F_ | P_          # X present
    assert ept_violation_error_code(Q_READ | Q_GVA_VALID) == U_ | GUEST_PAGE
    assert ept_violation_error_code(Q_WRITE | Q_GVA_VALID | Q_GVA_TRANSLATED) == W_ | GUEST_FINAL
    assert ept_violation_error_code(Q_GVA_TRANSLATED) == 0      # GVA bits need IS_VALID
    with pytest.raises(ValueError):
        ept_violation_error_code(-1)
    with pytest.raises(TypeError):
        ept_violation_error_code(1.0)


@pytest.mark.parametrize("ad,levels", [(False, 4), (True, 4), (True, 5)])
def test_roles_guest_mode_and_root_level(ad, levels):
    vm, v = make_vm()
    ept = Ept(vm, levels=levels)
    ept.map(0, DATA)
    l1_root = v.mmu_root.hpa
    v.nested_ept_enter(eptp_of(PML4, ad=ad, levels=levels))
    assert v.guest_mode and v.nested_eptp == eptp_of(PML4, ad=ad, levels=levels)
    assert l2_fault(v, 0, Q_READ) == RET_PF_FIXED
    sm = vm.mmu_backend
    root = v.mmu_root.hpa
    assert root is not l1_root
    assert root.word == role_word(levels, ad_disabled=not ad)
    assert root.gfn == PML4 >> 12 and v.mmu_root.pgd == eptp_of(PML4, ad=ad, levels=levels)
    # every shadow page of L2's walk: the L1 table gfn, one level down, same role bits
    path = sm.shadow_walk(v, 0)
    assert [sp.level for sp, _, _ in path] == list(range(levels, 0, -1))
    assert [sp.gfn for sp, _, _ in path] == ept.table_gfns(0)
    for sp, _, _ in path:
        assert sp.word == role_word(sp.level, ad_disabled=not ad)
    # execonly comes from the capability, in the CPU role's ext
    m = sm.vcpu_mmu[v.index]
    assert m.ept and m.cpu_role.ext.execonly == 1 and m.cpu_role.base.word == root.word
    assert vm.audit(raise_=False) == []


@pytest.mark.parametrize("perm,qual,rwx", [
    (R, Q_READ, R),
    (R | Wb, Q_WRITE, R | Wb),
    (R | X, Q_FETCH, R | X),
    (R | Wb | X, Q_WRITE, R | Wb | X),
    (X, Q_FETCH, X),                 # execute-only: no read bit in the SPTE
])
def test_leaf_permissions_from_ept_rwx(perm, qual, rwx):
    """EPT R/W/X -> ACC_USER/WRITE/EXEC -> the shadow EPT SPTE's R/W/X;
    A/D disabled by the EPTP: the SPTE is marked SPTE_TDP_AD_DISABLED."""
    vm, v = make_vm()
    ept = Ept(vm)
    ept.map(0x5000, DATA + 0x3000, perm)
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0x5000, qual) == RET_PF_FIXED
    sp, idx, spte = leaf(vm, v, 0x5000)
    assert sp.level == 1 and idx == 5
    assert spte & 7 == rwx
    assert (spte & ADDR) >> 12 == host_pfn(vm, DATA + 0x3000)
    assert spte & SPTE_TDP_AD_MASK == SPTE_TDP_AD_DISABLED
    assert (spte >> 3) & 7 == 6                   # RAM: write-back
    assert vm.audit(raise_=False) == []


def test_ad_enabled_dirty_bit_gates_write():
    """With A/D in the EPTP, a read maps a writable EPT page read-only until
    its D bit is set (protect_clean_gpte, bit 9); the walk sets A (bit 8)
    and, for the write, D."""
    vm, v = make_vm()
    ept = Ept(vm)
    e = ept.map(0x2000, DATA, R | Wb | X)
    v.nested_ept_enter(eptp_of(PML4, ad=True))
    assert l2_fault(v, 0x2000, Q_READ) == RET_PF_FIXED
    assert ept.get(e) & (EA | ED) == EA
    _, _, spte = leaf(vm, v, 0x2000)
    assert spte & 7 == R | X and not spte & SPTE_TDP_AD_MASK
    assert l2_fault(v, 0x2000, Q_WRITE | (5 << 3)) == RET_PF_FIXED
    assert ept.get(e) & (EA | ED) == EA | ED
    _, _, spte = leaf(vm, v, 0x2000)
    assert spte & 7 == R | Wb | X
    assert vm.audit(raise_=False) == []


def test_huge_ept_page_gets_direct_guest_mode_pages():
    vm, v = make_vm()
    ept = Ept(vm)
    ept.map(0x200000, 0x800000, R | X, level=2)
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0x212345, Q_READ) == RET_PF_FIXED
    path = vm.mmu_backend.shadow_walk(v, 0x212345)
    sp, _, spte = path[-1]
    # host THP is off: a 4K leaf in a direct child page of the 2M EPT leaf
    assert sp.direct and sp.word == role_word(1, ad_disabled=True, direct=True, access=5)
    assert (spte & ADDR) >> 12 == host_pfn(vm, 0x812000) and spte & 7 == R | X
    assert vm.audit(raise_=False) == []


def test_prefetch_maps_neighbours_execute_only():
    """FNAME(pte_prefetch) over EPT gPTEs, A/D off: the 8-entry group is
    mapped; prefetched SPTEs of an A/D-disabled page are access-tracked (R/W/X
    cleared, R and X saved at bits 54/56), execute-only keeps no R."""
    vm, v = make_vm()
    ept = Ept(vm)
    for i in range(8):
        ept.map(i * 0x1000, DATA + i * 0x1000, X if i == 3 else R | X)
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0, Q_READ) == RET_PF_FIXED
    sp = vm.mmu_backend.shadow_walk(v, 0)[-1][0]
    sptes = [sp.spt.item(i) for i in range(8)]
    assert sptes[0] & 7 == R | X
    for i in range(1, 8):
        assert sptes[i] & SPTE_MMU_PRESENT and sptes[i] & 7 == 0
        assert (sptes[i] >> 54) & 7 == (X if i == 3 else R | X)
        assert (sptes[i] & ADDR) >> 12 == host_pfn(vm, DATA + i * 0x1000)
    assert vm.audit(raise_=False) == []


def test_prefetch_with_ad_needs_accessed_gptes():
    """With A/D in the EPTP only accessed (bit 8) neighbours are prefetched,
    stopping at the first that is not."""
    vm, v = make_vm()
    ept = Ept(vm)
    for i in range(8):
        ept.map(i * 0x1000, DATA + i * 0x1000, R | X, extra=WB | (EA if i != 5 else 0))
    v.nested_ept_enter(eptp_of(PML4, ad=True))
    assert l2_fault(v, 0, Q_READ) == RET_PF_FIXED
    sp = vm.mmu_backend.shadow_walk(v, 0)[-1][0]
    present = [bool(sp.spt.item(i) & SPTE_MMU_PRESENT) for i in range(8)]
    assert present == [True] * 5 + [False] * 3
    assert all(sp.spt.item(i) & 7 == R | X for i in range(5))   # A/D on: no access tracking
    assert vm.audit(raise_=False) == []


# ----------------------------------------------------------------------------- faults for L1
def test_unmapped_l2_gpa_exits_to_l1_with_ept_violation():
    vm, v = make_vm()
    ept = Ept(vm)
    ept.map(0, DATA, R)
    v.nested_ept_enter(eptp_of(PML4))
    pf_guest = v.stat.pf_guest
    # write to a read-only page: qualification = write access | R permission | GVA bits
    assert l2_fault(v, 0, Q_WRITE) == RET_PF_RETRY
    ex = v.nested_ept_exit
    assert ex.reason == EXIT_REASON_EPT_VIOLATION
    assert ex.exit_qualification == Q_WRITE | (R << 3) | Q_GVA_VALID | Q_GVA_TRANSLATED
    assert ex.guest_physical_address == 0
    assert not v.guest_mode and v.stat.pf_guest == pf_guest        # not a #PF for L1
    assert vm.audit(raise_=False) == []
    # not present at the PDPT level
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0x40000000, Q_READ) == RET_PF_RETRY
    assert v.nested_ept_exit.exit_qualification == Q_READ | Q_GVA_VALID | Q_GVA_TRANSLATED


def test_eptp_outside_memory_gets_a_dummy_root_and_exits():
    """mmu_check_root: an EPTP whose PML4 is in no memslot loads the dummy
    root; the walk cannot read the table: an EPT violation for L1."""
    vm, v = make_vm()
    v.nested_ept_enter(eptp_of(0x4000000))
    v.vcpu_enter_guest()
    assert v.mmu_root.hpa == "dummy_root" and v.mmu_root.pgd == eptp_of(0x4000000)
    assert l2_fault(v, 0x1000, Q_READ) == RET_PF_RETRY
    assert v.nested_ept_exit.reason == EXIT_REASON_EPT_VIOLATION and not v.guest_mode
    assert vm.audit(raise_=False) == []


@pytest.mark.parametrize("perm,execonly", [(Wb, True), (Wb | X, True), (X, False)])
def test_misconfigured_ept_entry_exits_with_misconfig(perm, execonly):
    vm, v = make_vm()
    ept = Ept(vm)
    ept.map(0x3000, DATA, perm)
    v.nested_ept_enter(eptp_of(PML4), execonly=execonly)
    assert l2_fault(v, 0x3000, Q_FETCH if perm & X else Q_WRITE) == RET_PF_RETRY
    assert v.nested_ept_exit.reason == EXIT_REASON_EPT_MISCONFIG
    assert v.nested_ept_exit.exit_qualification == 0
    assert vm.audit(raise_=False) == []


# ----------------------------------------------------------------------------- L1's EPT tables are guest page tables
def test_l1_ept_tables_are_write_tracked_and_protected():
    vm, v = make_vm()
    ept = Ept(vm)
    ept.map(0, DATA)
    pml4, pdpt, pd, pt = ept.table_gfns(0)
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0, Q_READ) == RET_PF_FIXED
    v.nested_ept_leave()
    slot = vm.gfn_to_memslot(pml4)
    track = slot.arch.gfn_write_track
    assert [int(track[g - slot.base_gfn]) for g in (pml4, pdpt, pd, pt)] == [1, 1, 1, 0]
    # L1 writes its PDPT: the gfn is write-tracked -> emulate; the emulated
    # 8-byte store zaps the shadow entry that linked the PD's shadow page
    v.vcpu_enter_guest()
    assert v.kvm_mmu_page_fault(pdpt << 12, W_) == RET_PF_EMULATE
    before = vm.stat.mmu_pte_write
    v.kvm_page_track_write(pdpt << 12, (0).to_bytes(8, "little"))
    assert vm.stat.mmu_pte_write == before + 1
    sm = vm.mmu_backend
    pdpt_sp = next(sp for sp in sm.pages.values() if sp.gfn == pdpt and not sp.direct)
    assert not pdpt_sp.spt.item(0) & SPTE_MMU_PRESENT
    assert vm.audit(raise_=False) == []


def test_l1_page_walk_hitting_its_ept_table_unprotects_and_retries():
    """An L1 walk of its own page tables that writes (A/D) into a page it also
    uses as an EPT table: a direct MMU sees PFERR_GUEST_PAGE|W|P on a
    write-protected gfn and unprotects it (zapping the nested shadow pages
    for it) instead of emulating."""
    vm, v = make_vm()
    ept = Ept(vm)
    ept.map(0, DATA)
    pdpt = ept.table_gfns(0)[1]
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0, Q_READ) == RET_PF_FIXED
    v.nested_ept_leave()
    v.vcpu_enter_guest()
    sm = vm.mmu_backend
    sp = next(sp for sp in sm.pages.values() if sp.gfn == pdpt and not sp.direct)
    assert v.kvm_mmu_page_fault(pdpt << 12, GUEST_PAGE | W_ | P_) == RET_PF_RETRY
    assert sp.invalid or sp.sp not in sm.pages
    slot = vm.gfn_to_memslot(pdpt)
    assert int(slot.arch.gfn_write_track[pdpt - slot.base_gfn]) == 0
    assert vm.audit(raise_=False) == []


def test_l1_write_to_level1_ept_table_unsyncs_then_invept_syncs():
    vm, v = make_vm()
    ept = Ept(vm)
    e = ept.map(0, DATA, R | Wb)
    pt = ept.table_gfns(0)[-1]
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0, Q_WRITE) == RET_PF_FIXED
    sm = vm.mmu_backend
    pt_sp = next(sp for sp in sm.pages.values() if sp.gfn == pt and not sp.direct)
    v.nested_ept_leave()
    # L1 maps its level-1 EPT table writable: the shadow page goes unsync
    v.vcpu_enter_guest()
    assert v.kvm_mmu_page_fault(pt << 12, W_) == RET_PF_FIXED
    assert pt_sp.unsync and vm.stat.mmu_unsync == 1
    assert vm.audit(raise_=False) == []
    # ... and writes it without KVM seeing: read-only now
    ept.set(e, DATA | R | WB)
    _, _, stale = sm.shadow_walk(v, 0, sm.vcpu_guest_mmu[v.index].root.hpa)[-1]
    assert stale & Wb                              # the stale entry (allowed until INVEPT)
    v.nested_invept(1, eptp_of(PML4))
    v.nested_ept_enter(eptp_of(PML4))
    v.vcpu_enter_guest()                           # root load syncs the unsync page
    assert not pt_sp.unsync and vm.stat.mmu_unsync == 0
    _, _, spte = leaf(vm, v, 0)
    assert spte & 7 == R
    assert vm.audit(raise_=False) == []


def test_write_flooding_zaps_upper_ept_shadow_page():
    vm, v = make_vm()
    ept = Ept(vm)
    ept.map(0, DATA)
    pd = ept.table_gfns(0)[2]
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0, Q_READ) == RET_PF_FIXED
    v.nested_ept_leave()
    sm = vm.mmu_backend
    pd_sp = next(sp for sp in sm.pages.values() if sp.gfn == pd and not sp.direct)
    flooded = vm.stat.mmu_flooded
    for k in range(3):                  # writes to an unused entry: no use in between
        v.kvm_page_track_write((pd << 12) + 8 * 100, (k).to_bytes(8, "little"))
    assert pd_sp.invalid and vm.stat.mmu_flooded == flooded + 1
    assert vm.audit(raise_=False) == []


# ----------------------------------------------------------------------------- roots
def test_eptp_switch_hits_prev_roots():
    vm, v = make_vm()
    a = Ept(vm, PML4)
    b = Ept(vm, 0x180000)
    a.map(0, DATA)
    b.map(0, DATA + 0x1000)
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0, Q_READ) == RET_PF_FIXED
    root_a = v.mmu_root.hpa
    v.nested_ept_new_eptp(eptp_of(0x180000))
    assert v.mmu_root is None                      # no cached root for B: loaded at entry
    assert l2_fault(v, 0, Q_READ) == RET_PF_FIXED
    root_b = v.mmu_root.hpa
    assert root_b is not root_a and root_b.gfn == 0x180
    m = vm.mmu_backend.vcpu_mmu[v.index]
    assert m.prev_roots[0].hpa is root_a and m.prev_roots[0].pgd == eptp_of(PML4)
    n_pages = len(vm.mmu_backend.pages)
    v.nested_ept_new_eptp(eptp_of(PML4))           # fast pgd switch: A's root again
    assert v.mmu_root.hpa is root_a and m.prev_roots[0].hpa is root_b
    assert "KVM_REQ_LOAD_MMU_PGD" in v.requests
    assert l2_fault(v, 0, Q_READ) == RET_PF_SPURIOUS or leaf(vm, v, 0)[2] & SPTE_MMU_PRESENT
    assert len(vm.mmu_backend.pages) == n_pages
    # a different A/D setting is another role: not usable, not the same root
    v.nested_ept_new_eptp(eptp_of(PML4, ad=True))
    v.vcpu_enter_guest()
    assert v.mmu_root.hpa.word == role_word(4, ad_disabled=False)
    assert vm.audit(raise_=False) == []


def test_leave_keeps_root_mmu_root_and_reenter_reuses_guest_root():
    vm, v = make_vm()
    ept = Ept(vm)
    ept.map(0, DATA)
    l1_root = v.mmu_root.hpa
    assert l1_root.direct and not l1_root.role.guest_mode
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0, Q_READ) == RET_PF_FIXED
    l2_root = v.mmu_root.hpa
    v.nested_ept_leave()
    assert v.mmu_root.hpa is l1_root and l1_root.root_count == 1
    assert l2_root.root_count == 1                 # still guest_mmu's current root
    v.nested_ept_enter(eptp_of(PML4))
    assert v.mmu_root.hpa is l2_root               # kvm_mmu_new_pgd: usable as is
    assert vm.audit(raise_=False) == []


def test_invept_single_context_and_global():
    vm, v = make_vm()
    a, b = Ept(vm, PML4), Ept(vm, 0x180000)
    a.map(0, DATA)
    b.map(0, DATA)
    v.nested_ept_enter(eptp_of(PML4))
    l2_fault(v, 0, Q_READ)
    v.nested_ept_new_eptp(eptp_of(0x180000))
    l2_fault(v, 0, Q_READ)
    v.nested_ept_new_eptp(eptp_of(PML4, ad=True))       # same EP4TA as A, another role
    l2_fault(v, 0, Q_READ)
    v.nested_ept_leave()
    m = vm.mmu_backend.vcpu_guest_mmu[v.index]
    pgds = [m.root.pgd] + [r.pgd for r in m.prev_roots if r.hpa is not None]
    assert pgds == [eptp_of(PML4, ad=True), eptp_of(0x180000), eptp_of(PML4)]
    n_pages = len(vm.mmu_backend.pages)
    v.nested_invept(1, eptp_of(PML4))              # EP4TA match: current and prev[1]
    assert m.root.hpa is None and m.prev_roots[1].hpa is None
    assert m.prev_roots[0].pgd == eptp_of(0x180000) and m.prev_roots[0].hpa is not None
    assert len(vm.mmu_backend.pages) == n_pages    # freed, not zapped
    v.nested_invept(2)
    assert all(r.hpa is None for r in [m.root] + m.prev_roots)
    assert all(sp.root_count == 0 for sp in vm.mmu_backend.pages.values() if sp.role.guest_mode)
    assert v.mmu_root.hpa.direct                   # L1's root untouched
    assert vm.audit(raise_=False) == []


def test_reset_context_in_l2_frees_both_contexts():
    vm, v = make_vm()
    Ept(vm).map(0, DATA)
    v.nested_ept_enter(eptp_of(PML4))
    l2_fault(v, 0, Q_READ)
    v.kvm_mmu_reset_context()
    sm = vm.mmu_backend
    assert all(r.hpa is None for m in (sm.vcpu_root_mmu[v.index], sm.vcpu_guest_mmu[v.index])
               for r in [m.root] + m.prev_roots)
    assert v.guest_mode and l2_fault(v, 0, Q_READ) in (RET_PF_FIXED, RET_PF_SPURIOUS)
    assert v.mmu_root.hpa.word == role_word(4, ad_disabled=True)
    assert vm.audit(raise_=False) == []


def test_fast_zap_frees_obsolete_roots_of_both_contexts():
    vm, v = make_vm()
    Ept(vm).map(0, DATA)
    v.nested_ept_enter(eptp_of(PML4))
    l2_fault(v, 0, Q_READ)
    v.nested_ept_leave()
    sm = vm.mmu_backend
    gm, rm = sm.vcpu_guest_mmu[v.index], sm.vcpu_root_mmu[v.index]
    old_l2, old_l1 = gm.root.hpa, rm.root.hpa
    vm.kvm_mmu_zap_all_fast()
    v.vcpu_enter_guest()           # KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: both contexts
    assert gm.root.hpa is None and old_l2.root_count == 0 and old_l2.sp not in sm.pages
    assert rm.root.hpa is not old_l1 and not sm.is_obsolete_sp(rm.root.hpa)
    v.nested_ept_enter(eptp_of(PML4))
    assert l2_fault(v, 0, Q_READ) == RET_PF_FIXED and not sm.is_obsolete_sp(v.mmu_root.hpa)
    assert vm.audit(raise_=False) == []


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("eptp", [
    PML4 | (3 << 3) | 1,              # memory type 1 (WC) is not offered
    PML4 | (1 << 3) | 6,              # walk length 2
    PML4 | (3 << 3) | 6 | (1 << 7),   # reserved bit 7
    (1 << 50) | (3 << 3) | 6,         # above MAXPHYADDR
])
def test_bad_eptp_raises_and_changes_nothing(eptp):
    vm, v = make_vm()
    root = v.mmu_root
    with pytest.raises(EptpError):
        v.nested_ept_enter(eptp)
    assert not v.guest_mode and v.nested_eptp is None and v.mmu_root is root
    assert vm.mmu_backend.vcpu_guest_mmu == {}
    v.nested_ept_enter(eptp_of(PML4))
    before = v.nested_eptp
    with pytest.raises(EptpError):
        v.nested_ept_new_eptp(eptp)
    assert v.nested_eptp == before and v.guest_mode
    v.nested_ept_leave()
    with pytest.raises(EptpError):
        v.nested_invept(1, eptp)
    assert vm.audit(raise_=False) == []


def test_unsupported_walk_length_and_ad_by_capability():
    _, v = make_vm()
    with pytest.raises(EptpError):
        v.nested_ept_enter(eptp_of(PML4, levels=5), five_level_supported=False)
    with pytest.raises(EptpError):
        v.nested_ept_enter(eptp_of(PML4, ad=True), ad_supported=False)
    assert not v.guest_mode


@pytest.mark.parametrize("mmu,host", [("shadow", HostConfig()), ("tdp_mmu", HostConfig()),
                                      ("tdp", HostConfig(tdp="npt"))])
def test_nested_enter_needs_tdp_on_the_shadow_mmu(mmu, host):
    vm = VM(mmu, host=host)
    vm.add_memory(0, 4 * MiB)
    v = vm.vcpus[0] if vm.vcpus else vm.create_vcpu()
    with pytest.raises(NestedEptError):
        v.nested_ept_enter(eptp_of(PML4))
    assert not v.guest_mode


def test_state_errors():
    vm, v = make_vm()
    with pytest.raises(NestedEptError):
        v.nested_ept_leave()
    with pytest.raises(NestedEptError):
        v.nested_ept_new_eptp(eptp_of(PML4))
    with pytest.raises(NestedEptError):
        v.nested_invept(3)
    v.nested_ept_enter(eptp_of(PML4))
    with pytest.raises(NestedEptError):
        v.nested_ept_enter(eptp_of(PML4))
    with pytest.raises(NestedEptError):
        v.nested_invept(2)
    with pytest.raises(NestedEptError):
        v.nested_invvpid()
    cpu = v.cpu
    for load in (v.kvm_set_cr0, v.kvm_set_cr3, v.kvm_set_cr4, v.kvm_set_efer):
        with pytest.raises(NestedEptError):
            load(0)
    assert v.cpu is cpu and v.guest_mode and vm.audit(raise_=False) == []
    v.nested_ept_leave()
    v.nested_invvpid()                             # L1: nothing guest-mode in root_mmu
    assert v.mmu_root.hpa.direct and vm.audit(raise_=False) == []


@pytest.mark.parametrize("gpa,ec,exc", [
    (0, W_ | RSVD_, ValueError),          # RSVD only alone (a misconfiguration exit)
    (0, U_ | (1 << 5), ValueError),       # PK never comes with an EPT violation
    (0, U_ | GUEST_FINAL | GUEST_PAGE, ValueError),
    (0, U_ | (1 << 48), ValueError),      # a synthetic KVM flag
    (1 << 48, U_, AccessError),           # above L1's MAXPHYADDR (48 bits)
])
def test_bad_l2_fault_arguments(gpa, ec, exc):
    vm, v = make_vm()
    Ept(vm).map(0, DATA)
    v.nested_ept_enter(eptp_of(PML4))
    v.vcpu_enter_guest()
    stat = dict(v.stat.as_dict())
    n_pages = len(vm.mmu_backend.pages)
    with pytest.raises(exc):
        v.kvm_mmu_page_fault(gpa, ec)
    assert dict(v.stat.as_dict()) == stat and len(vm.mmu_backend.pages) == n_pages
    assert v.guest_mode


def test_misconfig_exit_error_code_is_accepted():
    """handle_ept_misconfig passes PFERR_RSVD alone: the MMIO path."""
    vm, v = make_vm()
    Ept(vm).map(0, DATA)
    v.nested_ept_enter(eptp_of(PML4))
    v.vcpu_enter_guest()
    assert v.kvm_mmu_page_fault(0, RSVD_) in (RET_PF_RETRY, RET_PF_FIXED, RET_PF_EMULATE)
    assert vm.audit(raise_=False) == []


# ----------------------------------------------------------------------------- the oracle
# An EPT walk from the SDM (Vol. 3C 29.3.2/29.3.3), independent of kvmmmu.paging.

def sdm_ept_translate(read_u64, eptp, l2_gpa, *, execonly=True, maxphyaddr=46, huge_level=3):
    """(gfn, r, w, x, dirty) of the 4K frame `l2_gpa` maps, or None
    (not present or misconfigured)."""
    levels = ((eptp >> 3) & 7) + 1
    ad = bool(eptp >> 6 & 1)
    high = ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)
    table = eptp & ADDR & ~high
    r = w = x = True
    for level in range(levels, 0, -1):
        e = read_u64(table + 8 * ((l2_gpa >> (12 + 9 * (level - 1))) & 511))
        if e is None:
            return None
        perm = e & 7
        if not perm:
            return None
        if perm & 2 and not perm & 1:               # write without read
            return None
        if perm == 4 and not execonly:
            return None
        if e & high:
            return None
        big = level > 1 and bool(e & PS)
        if level >= 4 and e & PS:
            return None
        if big and level > huge_level:
            return None
        r, w, x = r and bool(perm & 1), w and bool(perm & 2), x and bool(perm & 4)
        if level == 1 or big:
            if (e >> 3) & 7 in (2, 3, 7):           # memory type
                return None
            span = 1 << (9 * (level - 1))
            if big and (e >> 12) & (span - 1):      # reserved low address bits
                return None
            gfn = ((e & ADDR) >> 12) + ((l2_gpa >> 12) & (span - 1))
            return gfn, r, w, x, (bool(e & ED) if ad else True)
        if (e >> 3) & (0x1F if level >= 4 else 0xF):  # reserved in a non-leaf
            return None
        table = e & ADDR
    return None


def check_nested_ept(vm, v):
    """The security rule for nested EPT: every present leaf below the
    vCPU's guest_mmu roots grants no more than L1's EPT (R/W/X, W only with
    D when A/D is on), maps L1's frame, and the memslot allows it; leaves
    whose path goes through an unsync page may lag L1's tables until the
    next INVEPT."""
    sm = vm.mmu_backend
    gm = sm.vcpu_guest_mmu.get(v.index)
    if gm is None:
        return []
    read = memory_reader(vm)
    bad = []
    execonly = gm.nested.execonly
    for root in [gm.root] + gm.prev_roots:
        if root.sp is None:
            continue
        rh = root.sp.sp
        for lf in iter_shadow(vm.arena, vm.fmt, rh, problems=bad):
            if lf.mmio:
                continue
            where = f"root {root.pgd:#x} l2 gpa {lf.addr:#x}/l{lf.level}"
            if any(vm.arena.get_sp(sp)["unsync"] for sp, _ in lf.path):
                # may lag L1's table until INVEPT: only the memslot allow holds
                bad += check_leaf_memslot(vm, sm.kvm_mmu_page_get_gfn(sm.pages[lf.sp], lf.index),
                                          lf, where)
                continue
            for k in range(0, lf.size >> 12, max(1, (lf.size >> 12) // 4)):
                tr = sdm_ept_translate(read, root.pgd, lf.addr + (k << 12), execonly=execonly)
                if tr is None:
                    bad.append(f"{where}: present but L1's EPT does not map it")
                    break
                gfn, r, w, x, dirty = tr
                if k == 0:
                    bad += check_leaf_memslot(vm, gfn, lf, where)
                if lf.spte & 1 and not r:
                    bad.append(f"{where}: readable, L1's EPT is not")
                if lf.w and not (w and dirty):
                    bad.append(f"{where}: writable, L1's EPT {'is not' if not w else 'has D clear'}")
                if lf.x and not x:
                    bad.append(f"{where}: executable, L1's EPT is not")
    return bad


def test_oracle_on_worked_example():
    vm, v = make_vm()
    ept = Ept(vm)
    for i in range(16):
        ept.map(i * 0x1000, DATA + i * 0x1000, [R, R | Wb, R | X, X, R | Wb | X][i % 5])
    ept.map(0x200000, 0x800000, R | Wb, level=2)
    v.nested_ept_enter(eptp_of(PML4, ad=True))
    for i in range(16):
        l2_fault(v, i * 0x1000, Q_FETCH if i % 5 == 3 else Q_READ)
        if not v.guest_mode:
            v.nested_ept_enter(eptp_of(PML4, ad=True))
    l2_fault(v, 0x201000, Q_WRITE)
    assert check_nested_ept(vm, v) == []
    # the oracle sees a grant L1 withdrew behind KVM's back (no tracking, no INVEPT)
    vm.write_guest(ept.table_gfns(0x201000)[2] << 12, bytes(8 * 2))
    assert check_nested_ept(vm, v) != []


# ----------------------------------------------------------------------------- the machine
EPTPS = [eptp_of(PML4), eptp_of(PML4, ad=True), eptp_of(0x180000)]
LEAF_PERMS = [0, R, R | Wb, R | X, X, R | Wb | X, Wb]            # Wb alone: misconfig
QUALS = [Q_READ, Q_WRITE, Q_FETCH]


class NestedEptMachine(RuleBasedStateMachine):
    """Two vCPUs: L2 faults, L1 writes to its EPT tables (through the MMU when
    they are write-protected, straight into memory when L1 maps them
    writable), EPTP switches, nested entry/exit, INVEPT and L1's own faults;
    a vCPU in the wrong mode for a step skips it.  Audit and the security
    rule (both vCPUs) after every step."""

    def __init__(self):
        super().__init__()
        self.vm, v0 = self._make_vm()
        v1 = self.vm.create_vcpu()
        v1.vcpu_enter_guest()
        self.vs = [v0, v1]
        self.hog = []
        self.tables = [Ept(self.vm, PML4), Ept(self.vm, 0x180000)]
        for t, base in zip(self.tables, (DATA, DATA + 0x100000)):
            for i in range(12):
                t.map(i * 0x1000, base + i * 0x1000, R | Wb | X, extra=WB | EA | ED)
            t.map(0x200000, 0x800000, R | X, level=2)

    @staticmethod
    def _make_vm():
        return make_vm()

    @rule(c=st.integers(0, 1), i=st.integers(0, len(EPTPS) - 1))
    def enter(self, c, i):
        if not self.vs[c].guest_mode:
            self.vs[c].nested_ept_enter(EPTPS[i])

    @rule(c=st.integers(0, 1))
    def leave(self, c):
        if self.vs[c].guest_mode:
            self.vs[c].nested_ept_leave()

    @rule(c=st.integers(0, 1), i=st.integers(0, len(EPTPS) - 1))
    def switch(self, c, i):
        if self.vs[c].guest_mode:
            self.vs[c].nested_ept_new_eptp(EPTPS[i])

    INJECT = False

    def _enter(self, v):
        """VM entry; with injected failures the root load's top-up may fail."""
        try:
            v.vcpu_enter_guest()
            return True
        except KvmNoMemoryError:
            assert self.INJECT, "KvmNoMemoryError at VM entry without an injected failure"
            return False

    @rule(c=st.integers(0, 1), page=st.integers(0, 15), huge=st.booleans(),
          q=st.sampled_from(QUALS))
    def l2_fault(self, c, page, huge, q):
        v = self.vs[c]
        if not v.guest_mode or not self._enter(v):
            return
        r = v.kvm_mmu_page_fault((0x200000 if huge else 0) + page * 0x1000,
                                 ept_violation_error_code(q | Q_GVA_VALID | Q_GVA_TRANSLATED))
        ok = (RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS, RET_PF_EMULATE)
        assert r in ok or (self.INJECT and r == -errno.ENOMEM), r

    @rule(c=st.integers(0, 1), t=st.integers(0, 1), idx=st.integers(0, 15),
          perm=st.sampled_from(LEAF_PERMS), frame=st.integers(0, 31),
          ad=st.sampled_from([0, EA, EA | ED]))
    def l1_writes_leaf(self, c, t, idx, perm, frame, ad):
        """L1 stores an entry of a level-1 EPT table."""
        table = self.tables[t].table_gfns(0)
        if len(table) == 4:
            self._l1_store(c, (table[3] << 12) + 8 * idx,
                           (DATA + frame * 0x1000) | perm | (WB | ad if perm else 0))

    @rule(c=st.integers(0, 1), t=st.integers(0, 1), huge=st.booleans(),
          perm=st.sampled_from([0, R | X, R | Wb | X]))
    def l1_writes_pde(self, c, t, huge, perm):
        """L1 rewrites the PDE of L2's 2 MiB region: a 2 MiB leaf or nothing."""
        pd = self.tables[t].table_gfns(0x200000)[2]
        self._l1_store(c, (pd << 12) + 8,
                       (0x800000 | perm | WB | PS | EA | ED) if perm and huge else 0)

    def _l1_store(self, c, gpa, val):
        v, sm = self.vs[c], self.vm.mmu_backend
        if v.guest_mode or not self._enter(v):
            return
        walk = sm.shadow_walk(v, gpa)
        present = bool(walk) and bool(walk[-1][2] & SPTE_MMU_PRESENT)
        r = v.kvm_mmu_page_fault(gpa, W_ | (P_ if present else 0))
        data = val.to_bytes(8, "little")
        if r < 0:
            assert self.INJECT and r == -errno.ENOMEM, r
            return                                  # L1 retries the store later
        if r == RET_PF_EMULATE:
            v.kvm_page_track_write(gpa, data)
        else:
            self.vm.write_guest(gpa, data)

    @rule(c=st.integers(0, 1), t=st.sampled_from([1, 2]), i=st.integers(0, len(EPTPS) - 1))
    def invept(self, c, t, i):
        if not self.vs[c].guest_mode:
            self.vs[c].nested_invept(t, EPTPS[i])

    @rule(c=st.integers(0, 1), page=st.integers(0, 0x7FF), write=st.booleans())
    def l1_fault(self, c, page, write):
        v = self.vs[c]
        if not v.guest_mode and self._enter(v):
            r = v.kvm_mmu_page_fault(page << 12, W_ if write else U_)
            assert r >= 0 or (self.INJECT and r == -errno.ENOMEM), r

    @precondition(lambda self: self.INJECT)
    @rule(n=st.integers(0, 20))
    def inject_desc_failure(self, n):
        """The pte_list_desc pool fails after `n` more allocations."""
        self.vm.rmap_pool.fail_after(n)

    @precondition(lambda self: self.INJECT)
    @rule()
    def hog_the_arena(self):
        """Take every free page-table page of the (small) arena into a cache
        of our own: the next shadow page cannot be had."""
        self.hog += hog_arena(self.vm.arena)

    @precondition(lambda self: self.INJECT)
    @rule()
    def lift_injection(self):
        release(self.vm, self.hog)

    @invariant()
    def audit(self):
        assert self.vm.audit(raise_=False) == []
        assert self.vm.warn_sink.warnings == [] and self.vm.warn_sink.bugs == []

    @invariant()
    def security(self):
        for v in self.vs:
            assert check_nested_ept(self.vm, v) == []


NestedEptMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestNestedEptMachine = NestedEptMachine.TestCase


class NestedEptMachineInject(NestedEptMachine):
    """The same with pte_list_desc allocation failures injected: a failure
    ends in -ENOMEM from the fault (or KvmNoMemoryError at VM entry) and a
    clean audit."""
    INJECT = True

    @staticmethod
    def _make_vm():
        with mock.patch("kvmmmu.vm.PtArena", partial(PtArena, max_tables=512, tables_per_chunk=16)):
            return make_vm()


NestedEptMachineInject.TestCase.settings = settings(
    max_examples=30, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestNestedEptMachineInject = NestedEptMachineInject.TestCase
