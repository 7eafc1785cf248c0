"""The shadow MMU (kvmmmu.shadow_mmu): worked examples and tables of the
kernel's rules (shadow-mmu.md, shadow-page.md), each followed by VM.audit().

Expectations are written from the reference, not from the model's output:
the kvm_mmu_get_page text is the kernel's print format filled in by hand,
counts follow the kernel's stat rules.
"""
import pytest

from kvmmmu import mmutrace as tp
from kvmmmu._core.defs import (
    RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS,
)
from kvmmmu._core.guest_walk import PFERR_PRESENT_MASK as P_, PFERR_USER_MASK as U_, \
    PFERR_WRITE_MASK as W_
from kvmmmu.host import HostConfig
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES
from kvmmmu.shadow_mmu import (
    KVM_MMU_NUM_PREV_ROOTS, PAE_ROOT, ShadowMmu, kvm_page_table_hashfn,
)
from kvmmmu.vm import VM, KvmParams
from kvmmmu._core.guest_walk import PFERR_FETCH_MASK as F_

MiB = 1 << 20
P, W, U, A, D, PS = 1, 2, 4, 1 << 5, 1 << 6, 1 << 7
NX = 1 << 63
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE = 1 << 4, 1 << 5
EFER_LME, EFER_NX = 1 << 8, 1 << 11

SHADOW_HOST = HostConfig(tdp=None, maxphyaddr=48, smm=False, gbpages=True, la57=False)


class GuestTables:
    """Guest page tables in the VM's memory, written by the VMM (no tracking)."""

    def __init__(self, vm, entry=8, first=0x1000):
        self.vm, self.entry, self.next = vm, entry, first

    def alloc(self):
        t = self.next
        self.next += 0x1000
        self.vm.write_guest(t, bytes(4096))
        return t

    def get(self, gpa):
        return int.from_bytes(self.vm.read_guest(gpa, self.entry), "little")

    def set(self, gpa, val):
        self.vm.write_guest(gpa, val.to_bytes(self.entry, "little"))

    def map(self, cr3, gva, gpa, *, flags=P | W | U | A, leaf=None, level=1, top=4):
        """gva -> gpa (leaf at `level`); returns the gpa of the leaf entry."""
        bits = 9 if self.entry == 8 else 10
        t = cr3 & ~0xFFF
        for lv in range(top, level, -1):
            idx = (gva >> (12 + bits * (lv - 1))) & ((1 << bits) - 1)
            e = self.get(t + self.entry * idx)
            if not e & P:
                e = self.alloc() | flags
                self.set(t + self.entry * idx, e)
            t = e & 0x000FFFFFFFFFF000
        idx = (gva >> (12 + bits * (level - 1))) & ((1 << bits) - 1)
        self.set(t + self.entry * idx, gpa | (flags if leaf is None else leaf) | (PS if level > 1 else 0))
        return t + self.entry * idx


def shadow_vm(**kw):
    params = KvmParams(tdp_mmu=False, mmio_caching=kw.pop("mmio_caching", True),
                       nx_huge_pages=False)
    vm = VM("shadow", host=SHADOW_HOST, params=params, **kw)
    vm.add_memory(0, 32 * MiB)
    return vm


def long_mode(vm, cr3, v=None):
    v = v or vm.vcpus[0]
    v.kvm_set_efer(EFER_LME | EFER_NX)
    v.kvm_set_cr4(CR4_PAE)
    v.kvm_set_cr3(cr3)
    v.kvm_set_cr0(CR0_PE | CR0_PG | CR0_WP)
    v.vcpu_enter_guest()
    return v


def page(gen, gfn, level, q=0, direct=False, access="wux", root=0, sync="sync", created="new",
         size=8):
    return (f"kvm_mmu_get_page: sp gen {gen} gfn {gfn:x} l{level} {size}-byte q{q}"
            f"{' direct' if direct else ''} {access} nxe ad root {root} {sync} {created}")


def get_pages(lines):
    return [x for x in lines if x.startswith("kvm_mmu_get_page")]


# ---------------------------------------------------------------------------
# the page hash
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gfn,bucket", [(0, 0), (1, 1564), (0x1234, 3938), (0xFEBF0, 2518),
                                        (0x100000, 1606)])
def test_hash_64_buckets_of_the_reference(gfn, bucket):
    assert kvm_page_table_hashfn(gfn) == bucket


# ---------------------------------------------------------------------------
# direct flavour: mmu="tdp" with tdp_mmu=N
# ---------------------------------------------------------------------------

def tdp_vm():
    vm = VM("tdp", host=HostConfig(tdp="ept"))
    vm.add_memory(0, 64 * MiB)
    v = vm.vcpus[0]
    v.vcpu_enter_guest()
    return vm, v


def test_tdp_first_touch_builds_the_direct_chain_once():
    vm, v = tdp_vm()
    assert isinstance(vm.mmu_backend, ShadowMmu)
    sm = vm.mmu_backend
    with tp.capture() as buf:
        assert v.kvm_mmu_page_fault(0x1234000, W_) == RET_PF_FIXED
        assert v.kvm_mmu_page_fault(0x1235000, W_) == RET_PF_FIXED      # same 2M: no new page
    lines = buf.lines()
    # the root was made at entry; the fault adds l3..l1, each a cache miss
    # each child's gfn is the fault's gfn rounded to its parent's level
    assert get_pages(lines) == [page(0, 0, 3, direct=True), page(0, 0, 2, direct=True),
                                page(0, 0x1200, 1, direct=True)]
    assert [x.split(":")[0] for x in lines].count("kvm_mmu_set_spte") == 2
    assert sm.n_used_mmu_pages == 4
    assert vm.stat.mmu_cache_miss == 4 and vm.stat.pages_4k == 2
    assert v.stat.pf_fixed == 2 and v.stat.pf_taken == 2
    # the rmap of each gfn at 4K holds exactly its SPTE
    assert vm.audit() == []


def test_tdp_root_role_and_hash_placement():
    vm, v = tdp_vm()
    sm = vm.mmu_backend
    root = v.mmu_root.sp
    assert root.level == 4 and root.direct and root.root_count == 1 and root.gfn == 0
    assert root in sm.mmu_page_hash[kvm_page_table_hashfn(0)]
    # a second vCPU reuses the root: found in the hash ("existing"), root_count 2
    v2 = vm.create_vcpu()
    with tp.capture("kvm_mmu_get_page") as buf:
        v2.vcpu_enter_guest()
    assert buf.lines() == [page(0, 0, 4, direct=True, root=1, created="existing")]
    assert v2.mmu_root.sp is root and root.root_count == 2
    assert vm.audit() == []


def test_tdp_spurious_fault_goes_through_fast_page_fault():
    vm, v = tdp_vm()
    v.kvm_mmu_page_fault(0x5000, W_)
    with tp.capture("fast_page_fault") as buf:
        assert v.kvm_mmu_page_fault(0x5000, W_ | P_) == RET_PF_SPURIOUS
    assert v.stat.pf_fast == 1 and v.stat.pf_spurious == 1
    assert len(buf.lines()) == 1 and "spurious 1 fixed 0" in buf.lines()[0]


def test_tdp_dirty_logging_write_protects_then_fast_fault_restores_w():
    vm, v = tdp_vm()
    s = vm.memslots[0].id_to_memslot(0)
    v.kvm_mmu_page_fault(0x7000, W_)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 64 * MiB, s.userspace_addr)
    sm = vm.mmu_backend
    walk = sm.shadow_walk(v, 0x7000)
    assert not walk[-1][2] & W                                      # write-protected (pt_protect off)
    assert walk[-1][2] & vm.fmt.shadow_mmu_writable_mask            # still MMU-writable
    assert v.kvm_mmu_page_fault(0x7000, W_ | P_) == RET_PF_FIXED
    assert v.stat.pf_fast == 1
    assert sm.shadow_walk(v, 0x7000)[-1][2] & W
    bm = vm.get_dirty_log(0)
    assert int(bm[0]) >> 7 & 1
    assert vm.audit() == []


def test_tdp_mmio_spte_then_reserved_fault_emulates():
    vm, v = tdp_vm()
    gpa = 0x8000_0000                                              # outside every memslot
    with tp.capture("mark_mmio_spte") as buf:
        assert v.kvm_mmu_page_fault(gpa, 0) == RET_PF_EMULATE
    assert v.stat.pf_mmio_spte_created == 1 and len(buf.lines()) == 1
    v.vcpu_clear_mmio_info()
    from kvmmmu._core.guest_walk import PFERR_RSVD_MASK
    assert v.kvm_mmu_page_fault(gpa, PFERR_RSVD_MASK | P_) == RET_PF_EMULATE
    assert v.stat.pf_taken == 1                                     # the MMIO path is not a fault
    assert vm.audit() == []


# ---------------------------------------------------------------------------
# shadow paging: a 4-level guest
# ---------------------------------------------------------------------------

def four_level(n=4, flags=P | W | U | A, leaf=None):
    vm = shadow_vm()
    g = GuestTables(vm)
    cr3 = g.alloc()
    for k in range(n):
        g.map(cr3, 0x400000 + k * 0x1000, 0x1000000 + k * 0x1000, flags=flags, leaf=leaf)
    v = long_mode(vm, cr3)
    return vm, v, g, cr3


def test_shadow_first_touch_makes_the_kernels_pages_and_roles():
    """PML4 at gfn 1, PDPT 2, PD 3, PT 4 (allocation order); a user read of
    0x400000 makes the root at CR3's gfn at entry, then l3, l2, l1 for the
    three tables below, indirect (8-byte, wux: W|U|P and no NX above)."""
    vm, v, g, cr3 = four_level()
    sm = vm.mmu_backend
    assert cr3 == 0x1000
    root = v.mmu_root.sp
    assert (root.gfn, root.level, root.direct, root.root_count) == (1, 4, False, 1)
    with tp.capture("kvm_mmu_get_page", "kvm_mmu_set_spte") as buf:
        assert v.kvm_mmu_page_fault(0x400000, U_) == RET_PF_FIXED
    lines = buf.lines()
    assert get_pages(lines) == [page(0, 2, 3), page(0, 3, 2), page(0, 4, 1)]
    # the leaf: read-only (the gPTE's D bit is clear: protect_clean_gpte), user, executable
    assert lines[-1].startswith("kvm_mmu_set_spte: gfn 1000 ") and "(r-xu) level 1" in lines[-1]
    # upper tables are write-tracked once each, the PT only disallows huge pages
    slot = vm.memslots[0].id_to_memslot(0)
    assert [int(slot.arch.gfn_write_track[g_]) for g_ in (1, 2, 3, 4)] == [1, 1, 1, 0]
    assert slot.arch.disallow_lpage_ledger.get(4) == 1
    assert sm.indirect_shadow_pages == 4 and sm.n_used_mmu_pages == 4
    assert vm.audit() == []


def test_shadow_write_sets_the_guest_dirty_bit_and_maps_writable():
    vm, v, g, cr3 = four_level()
    pte = g.get(0x4000 + 8 * 1)
    assert not pte & D
    assert v.kvm_mmu_page_fault(0x401000, W_ | U_) == RET_PF_FIXED
    assert g.get(0x4000 + 8 * 1) & D
    sm = vm.mmu_backend
    assert sm.shadow_walk(v, 0x401000)[-1][2] & W
    assert vm.audit() == []


def test_write_to_a_shadowed_upper_table_is_write_protected_and_emulated():
    """The PD (gfn 3) is shadowed by a level-2 page: write-tracked, so a
    write through a mapping of it is RET_PF_WRITE_PROTECTED -> emulate."""
    vm, v, g, cr3 = four_level()
    g.map(cr3, 0x800000, 0x3000)                         # a user alias of the PD
    v.kvm_mmu_page_fault(0x400000, U_)
    r = v.kvm_mmu_page_fault(0x800000, W_ | U_)
    assert r == RET_PF_EMULATE and v.stat.pf_emulate == 1
    # the alias is mapped read-only (write-tracked gfn: make_spte refused W)
    assert not vm.mmu_backend.shadow_walk(v, 0x800000)[-1][2] & W
    assert vm.audit() == []


def test_unsync_through_a_writable_alias_then_sync_on_cr3_reload():
    """A user write to the PT (gfn 4, a level-1 shadow page) through an alias
    makes that page unsync (kvm_mmu_unsync_page) instead of refusing W;
    the next CR3 load asks for KVM_REQ_MMU_SYNC, which syncs it back."""
    vm, v, g, cr3 = four_level()
    sm = vm.mmu_backend
    v.kvm_mmu_page_fault(0x400000, U_)
    g.map(cr3, 0xC00000, 0x4000, leaf=P | W | U | A | D)
    with tp.capture("kvm_mmu_unsync_page", "kvm_mmu_sync_page") as buf:
        assert v.kvm_mmu_page_fault(0xC00000, W_ | U_) == RET_PF_FIXED
    assert buf.lines() == ["kvm_mmu_unsync_page: sp gen 0 gfn 4 l1 8-byte q0 wux nxe ad root 0 sync"]
    pt = [sp for sp in sm.pages.values() if sp.gfn == 4][0]
    assert pt.unsync and vm.stat.mmu_unsync == 1
    assert v.mmu_root.sp.unsync_children == 1                # the path is marked up to the root
    assert sm.shadow_walk(v, 0xC00000)[-1][2] & W
    assert vm.audit() == []
    with tp.capture("kvm_mmu_sync_page") as buf:
        v.kvm_set_cr3(cr3)
        v.vcpu_enter_guest()
    assert buf.lines() == ["kvm_mmu_sync_page: sp gen 0 gfn 4 l1 8-byte q0 wux nxe ad root 0 unsync"]
    assert not pt.unsync and vm.stat.mmu_unsync == 0 and v.mmu_root.sp.unsync_children == 0
    # syncing write-protected the PT's gfn again
    assert not sm.shadow_walk(v, 0xC00000)[-1][2] & W
    assert vm.audit() == []


def test_invlpg_syncs_the_changed_gpte_of_an_unsync_page():
    vm, v, g, cr3 = four_level()
    sm = vm.mmu_backend
    v.kvm_mmu_page_fault(0x400000, U_)
    g.map(cr3, 0xC00000, 0x4000, leaf=P | W | U | A | D)
    v.kvm_mmu_page_fault(0xC00000, W_ | U_)                 # PT unsync
    # the guest clears its PTE for 0x400000 through the writable alias (no exit)
    vm.write_guest(0x4000, bytes(8))
    assert sm.shadow_walk(v, 0x400000)[-1][2] & 0x800        # stale SPTE still there
    v.kvm_mmu_invlpg(0x400000)
    assert not sm.shadow_walk(v, 0x400000)[-1][2] & 0x800    # dropped by kvm_sync_spte
    assert v.stat.invlpg == 1
    assert vm.audit() == []


@pytest.mark.parametrize("nbytes,offset,flooded", [
    (8, 0, False), (1, 0, False), (1, 3, True), (2, 0, True), (8, 4, True), (3, 0, True),
    # a 4-byte write of a PAE / long-mode guest is widened to its aligned 8-byte gPTE
    (4, 0, False), (4, 6, False),
])
def test_detect_write_misaligned_table(nbytes, offset, flooded):
    """detect_write_misaligned with 8-byte gPTEs (offsets in the written PD):
    a 1-byte write at an aligned offset is fine, anything crossing an entry
    or shorter than 4 bytes zaps the page (mmu_flooded)."""
    vm, v, g, cr3 = four_level()
    v.kvm_mmu_page_fault(0x400000, U_)
    v.kvm_page_track_write(0x3000 + 0x100 + offset, bytes(nbytes))
    assert vm.stat.mmu_flooded == int(flooded)
    assert vm.stat.mmu_pte_write == 1
    assert vm.audit() == []


def test_write_flooding_zaps_an_upper_page_at_the_third_write():
    vm, v, g, cr3 = four_level()
    sm = vm.mmu_backend
    v.kvm_mmu_page_fault(0x400000, U_)
    pd = [sp for sp in sm.pages.values() if sp.gfn == 3][0]
    for k in range(1, 4):
        v.kvm_page_track_write(0x3000 + 8 * 100, (0).to_bytes(8, "little"))
        assert vm.stat.mmu_flooded == (1 if k == 3 else 0)
        assert (pd.sp in sm.pages) == (k < 3)
    assert vm.stat.mmu_pte_write == 3
    assert vm.audit() == []


def test_a_level1_page_never_floods():
    vm, v, g, cr3 = four_level()
    sm = vm.mmu_backend
    v.kvm_mmu_page_fault(0x400000, U_)
    for _ in range(5):
        v.kvm_page_track_write(0x4000 + 8 * 100, bytes(8))
    assert vm.stat.mmu_flooded == 0 and any(sp.gfn == 4 for sp in sm.pages.values())
    assert vm.audit() == []


def test_a_fault_resets_the_flooding_count_of_the_pages_it_walks():
    vm, v, g, cr3 = four_level()
    sm = vm.mmu_backend
    v.kvm_mmu_page_fault(0x400000, U_)
    pd = [sp for sp in sm.pages.values() if sp.gfn == 3][0]
    for _ in range(2):
        v.kvm_page_track_write(0x3000 + 8 * 100, bytes(8))
    assert pd.write_flooding_count == 2
    v.kvm_mmu_page_fault(0x401000, U_)                       # FNAME(fetch) passes through the PD
    assert pd.write_flooding_count == 0
    v.kvm_page_track_write(0x3000 + 8 * 100, bytes(8))
    assert pd.sp in sm.pages and vm.stat.mmu_flooded == 0


def test_emulated_write_of_a_pde_zaps_the_spte_and_counts_pde_zapped():
    vm, v, g, cr3 = four_level()
    sm = vm.mmu_backend
    v.kvm_mmu_page_fault(0x400000, U_)
    pde_gpa = 0x3000 + 8 * 2                                   # PD entry of 0x400000
    new = g.get(pde_gpa)
    v.kvm_page_track_write(pde_gpa, new.to_bytes(8, "little"))  # rewrite with a non-zero gPTE
    assert vm.stat.mmu_pde_zapped == 1
    walk = sm.shadow_walk(v, 0x400000)
    assert walk[-1][0].level == 2 and not walk[-1][2] & 0x800
    assert vm.audit() == []


# ---------------------------------------------------------------------------
# unsync refusals (mmu_try_to_unsync_pages)
# ---------------------------------------------------------------------------

def test_unsync_refusals_table():
    import errno
    vm, v, g, cr3 = four_level()
    sm = vm.mmu_backend
    v.kvm_mmu_page_fault(0x400000, U_)
    slot = vm.memslots[0].id_to_memslot(0)
    assert sm.mmu_try_to_unsync_pages(slot, 3, False, False) == -errno.EPERM   # write-tracked PD
    assert sm.mmu_try_to_unsync_pages(slot, 4, True, False) == -errno.EPERM    # synchronizing
    assert sm.mmu_try_to_unsync_pages(slot, 4, False, True) == -errno.EEXIST   # prefetch
    assert sm.mmu_try_to_unsync_pages(slot, 0x1000, False, False) == 0         # not shadowed
    assert vm.stat.mmu_unsync == 0
    assert sm.mmu_try_to_unsync_pages(slot, 4, False, False) == 0              # unsync'd
    assert vm.stat.mmu_unsync == 1
    assert sm.mmu_try_to_unsync_pages(slot, 4, False, True) == 0               # already unsync
    assert vm.audit() == []


# ---------------------------------------------------------------------------
# roots: CR3 switches, cached roots, fast zap
# ---------------------------------------------------------------------------

def test_cr3_switch_among_more_roots_than_the_cache_holds():
    vm = shadow_vm()
    g = GuestTables(vm)
    cr3s = []
    for _ in range(5):
        c = g.alloc()
        g.map(c, 0x400000, 0x1000000)
        cr3s.append(c)
    v = long_mode(vm, cr3s[0])
    sm = vm.mmu_backend
    for c in cr3s[1:]:
        v.kvm_set_cr3(c)
        v.vcpu_enter_guest()
    m = sm.vcpu_mmu[v.index]
    # the current root and the three most recent ones stay cached
    assert m.root.pgd == cr3s[4]
    assert [r.pgd for r in m.prev_roots] == [cr3s[3], cr3s[2], cr3s[1]]
    assert len(m.prev_roots) == KVM_MMU_NUM_PREV_ROOTS
    # back to cr3s[2]: a hit, no new page
    with tp.capture("kvm_mmu_get_page") as buf:
        v.kvm_set_cr3(cr3s[2])
        v.vcpu_enter_guest()
    assert buf.lines() == []
    assert m.root.pgd == cr3s[2] and [r.pgd for r in m.prev_roots] == [cr3s[4], cr3s[3], cr3s[1]]
    # cr3s[0] was dropped from the cache: a miss, the root page is found in the hash
    # (it is still there, unused) or made again
    with tp.capture("kvm_mmu_get_page") as buf:
        v.kvm_set_cr3(cr3s[0])
        v.vcpu_enter_guest()
    assert len(buf.lines()) == 1 and "gfn %x l4" % (cr3s[0] >> 12) in buf.lines()[0]
    assert vm.audit() == []


def test_fast_zap_obsoletes_everything_and_the_roots_are_reloaded():
    vm, v, g, cr3 = four_level()
    sm = vm.mmu_backend
    v.kvm_mmu_page_fault(0x400000, U_)
    old_root = v.mmu_root.sp
    vm.kvm_mmu_zap_all_fast()
    assert vm.mmu_valid_gen == 1
    assert "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in v.requests
    # everything but the root is gone; the root is invalid, off the active list
    assert list(sm.pages) == [old_root.sp] and old_root.invalid
    assert vm.audit() == []
    with tp.capture("kvm_mmu_get_page") as buf:
        v.vcpu_enter_guest()
    assert buf.lines() == [page(1, 1, 4)]
    assert old_root.sp not in sm.pages
    assert v.kvm_mmu_page_fault(0x400000, U_) == RET_PF_FIXED
    assert vm.audit() == []


def test_page_budget_zaps_the_oldest_pages():
    vm, v, g, cr3 = four_level(n=1)
    sm = vm.mmu_backend
    # 40 page tables, each its own 2M region: one new level-1 page per fault
    for k in range(40):
        g.map(cr3, 0x40000000 + k * 0x200000, 0x1000000)
    vm.kvm_mmu_change_mmu_pages(20)
    for k in range(40):
        assert v.kvm_mmu_page_fault(0x40000000 + k * 0x200000, U_) == RET_PF_FIXED
        assert vm.audit() == []
    assert vm.stat.mmu_recycled > 0
    assert sm.n_used_mmu_pages <= 20 + 4
    # kvm_mmu_change_mmu_pages below the use zaps down to the goal
    vm.kvm_mmu_change_mmu_pages(10)
    assert sm.n_used_mmu_pages <= 10 or all(sp.root_count for sp in sm.active_mmu_pages.values())
    assert vm.audit() == []


def test_unload_frees_the_roots_and_reset_context_changes_the_role():
    vm, v, g, cr3 = four_level()
    v.kvm_mmu_page_fault(0x400000, U_)
    root = v.mmu_root.sp
    v.kvm_set_cr0(CR0_PE | CR0_PG)                          # CR0.WP off: role bit
    assert v.mmu_root is None and root.root_count == 0
    with tp.capture("kvm_mmu_get_page") as buf:
        v.vcpu_enter_guest()
    # cr0_wp is not printed, but the role word differs: a new root page
    assert buf.lines() == [page(0, 1, 4)]
    assert v.mmu_root.sp is not root and v.mmu_root.sp.word != root.word
    assert vm.audit() == []


def test_cr0_wp0_supervisor_write_to_a_read_only_user_page():
    """CR0.WP=0: a supervisor write to a U=1, W=0 page gets W and loses U."""
    vm = shadow_vm()
    g = GuestTables(vm)
    cr3 = g.alloc()
    g.map(cr3, 0x400000, 0x1000000, leaf=P | U | A | D)
    v = vm.vcpus[0]
    v.kvm_set_efer(EFER_LME | EFER_NX)
    v.kvm_set_cr4(CR4_PAE)
    v.kvm_set_cr3(cr3)
    v.kvm_set_cr0(CR0_PE | CR0_PG)
    v.vcpu_enter_guest()
    assert v.kvm_mmu_page_fault(0x400000, W_) == RET_PF_FIXED
    spte = vm.mmu_backend.shadow_walk(v, 0x400000)[-1][2]
    assert spte & W and not spte & U
    assert vm.audit() == []


# ---------------------------------------------------------------------------
# 32-bit guests: quadrants and PAE roots
# ---------------------------------------------------------------------------

def test_two_level_guest_uses_four_pae_roots_with_quadrants():
    vm = shadow_vm()
    g = GuestTables(vm, entry=4)
    cr3 = g.alloc()
    g.map(cr3, 0xC0400000, 0x1000000, top=2)                # GiB 3, second 2M half? (4M PDE 0x301)
    v = vm.vcpus[0]
    v.kvm_set_cr3(cr3)
    with tp.capture("kvm_mmu_get_page") as buf:
        v.kvm_set_cr0(CR0_PE | CR0_PG | CR0_WP)
        v.vcpu_enter_guest()
    assert buf.lines() == [page(0, 1, 2, q=i, size=4) for i in range(4)]
    assert v.mmu_root.hpa is PAE_ROOT
    with tp.capture("kvm_mmu_get_page") as buf:
        assert v.kvm_mmu_page_fault(0xC0400000, U_) == RET_PF_FIXED
    # the 4-byte PT at gfn 2 is shadowed by a quadrant-0 level-1 page (gva bit 21 clear)
    assert buf.lines() == [page(0, 2, 1, q=0, size=4)]
    with tp.capture("kvm_mmu_get_page") as buf:
        g.map(cr3, 0xC0600000, 0x1001000, top=2)
        assert v.kvm_mmu_page_fault(0xC0600000, U_) == RET_PF_FIXED
    assert buf.lines() == [page(0, 2, 1, q=1, size=4)]
    slot = vm.memslots[0].id_to_memslot(0)
    assert int(slot.arch.gfn_write_track[1]) == 4            # four level-2 pages on the PD
    assert vm.audit() == []


def test_nonpaging_guest_runs_on_direct_pae_roots():
    vm = shadow_vm()
    v = vm.vcpus[0]
    with tp.capture("kvm_mmu_get_page") as buf:
        v.vcpu_enter_guest()
    assert buf.lines() == [page(0, i << 18, 2, direct=True) for i in range(4)]
    with tp.capture("kvm_mmu_spte_requested") as buf:
        assert v.kvm_mmu_page_fault(0x123000, W_) == RET_PF_FIXED
    assert vm.audit() == []


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def test_bad_fault_address_in_32_bit_mode_raises_and_changes_nothing():
    from kvmmmu.paging import AccessError
    vm = shadow_vm()
    g = GuestTables(vm, entry=4)
    cr3 = g.alloc()
    v = vm.vcpus[0]
    v.kvm_set_cr3(cr3)
    v.kvm_set_cr0(CR0_PE | CR0_PG | CR0_WP)
    v.vcpu_enter_guest()
    before = (v.stat.pf_taken, vm.mmu_backend.n_used_mmu_pages)
    with pytest.raises(AccessError, match="gva"):
        v.kvm_mmu_page_fault(1 << 32, U_)
    assert (v.stat.pf_taken, vm.mmu_backend.n_used_mmu_pages) == before


def test_error_code_bits_a_pf_never_has_raise():
    vm, v, g, cr3 = four_level()
    before = v.stat.pf_taken
    with pytest.raises(ValueError, match="error_code"):
        v.kvm_mmu_page_fault(0x400000, 1 << 33)
    assert v.stat.pf_taken == before


# ---------------------------------------------------------------------------
# the audit finds what it claims to check
# ---------------------------------------------------------------------------

def _unsync_state():
    vm, v, g, cr3 = four_level()
    v.kvm_mmu_page_fault(0x400000, U_)
    g.map(cr3, 0xC00000, 0x4000, leaf=P | W | U | A | D)
    v.kvm_mmu_page_fault(0xC00000, W_ | U_)
    assert vm.audit() == []
    return vm, v


def test_audit_reports_a_leaf_missing_from_its_rmap():
    from kvmmmu._core.rmap import rmap_remove
    vm, v = _unsync_state()
    sm = vm.mmu_backend
    sp, idx, _ = sm.shadow_walk(v, 0x400000)[-1]
    rmap_remove(vm.memslots[0].id_to_memslot(0).arch.rmap, 0x1000, sp.pa | (idx << 3), 1)
    assert any("in 0 rmaps" in x for x in vm.audit(raise_=False))


def test_audit_reports_unsync_counts_and_marks():
    vm, v = _unsync_state()
    root = v.mmu_root.sp
    root.unsync_children += 1
    assert any("unsync_children" in x for x in vm.audit(raise_=False))
    root.unsync_children -= 1
    root.unsync_child_bitmap = 0
    root.unsync_children = 0
    bad = vm.audit(raise_=False)
    assert any("(S5)" in x for x in bad)


def test_audit_reports_write_tracking_and_writable_shadowed_gfns():
    vm, v = _unsync_state()
    slot = vm.memslots[0].id_to_memslot(0)
    slot.arch.gfn_write_track[3] += 1
    assert any("write-track count" in x for x in vm.audit(raise_=False))
    slot.arch.gfn_write_track[3] -= 1
    pt = [sp for sp in vm.mmu_backend.pages.values() if sp.gfn == 4][0]
    pt.unsync = False                                       # a writable SPTE maps gfn 4
    assert any("(S3)" in x for x in vm.audit(raise_=False))


def test_audit_reports_a_duplicate_page_in_the_hash():
    vm, v = _unsync_state()
    sm = vm.mmu_backend
    sp = v.mmu_root.sp
    from kvmmmu.shadow_mmu import kvm_page_table_hashfn
    sm.mmu_page_hash[kvm_page_table_hashfn(sp.gfn)].append(sp)
    assert any("in the hash 2 times" in x for x in vm.audit(raise_=False))


def test_fast_zap_traces_and_counts_in_the_kernels_order():
    """kvm_mmu_zap_all_fast: the event with the old generation and the pages in
    use, then prepare_zap of every obsolete page from the oldest (the root,
    kept while in use, then l3, l2, l1); the root's own zap comes when the
    vCPU frees it (mmu_shadow_zapped counts both)."""
    vm, v, g, cr3 = four_level()
    v.kvm_mmu_page_fault(0x400000, U_)
    with tp.capture("kvm_mmu_zap_all_fast", "kvm_mmu_prepare_zap_page") as buf:
        vm.kvm_mmu_zap_all_fast()
        v.vcpu_enter_guest()
    z = "kvm_mmu_prepare_zap_page: sp gen 0 gfn {:x} l{} 8-byte q0 wux{} nxe ad root {} sync"
    assert buf.lines() == [
        "kvm_mmu_zap_all_fast: kvm-mmu-valid-gen 0 used_pages 4",
        z.format(1, 4, "", 1), z.format(2, 3, "", 0), z.format(3, 2, "", 0), z.format(4, 1, "", 0),
        z.format(1, 4, " invalid", 0)]
    assert vm.stat.mmu_shadow_zapped == 5
    assert vm.audit() == []


def test_32_bit_host_runs_the_shadow_mmu_on_split_sptes():
    from kvmmmu.vm import KvmParams
    vm = VM("shadow", host=HostConfig(tdp=None, host_64bit=False, maxphyaddr=36, smm=False,
                                      gbpages=False, la57=False),
            params=KvmParams(tdp_mmu=False, nx_huge_pages=False))
    assert not vm.arena.host_64bit
    vm.add_memory(0, 32 * MiB)
    g = GuestTables(vm)
    cr3 = g.alloc()
    g.map(cr3, 0x400000, 0x1000000)
    v = long_mode(vm, cr3)
    assert v.kvm_mmu_page_fault(0x400000, U_ | W_) == RET_PF_FIXED
    spte = vm.mmu_backend.shadow_walk(v, 0x400000)[-1][2]
    assert spte & W and (spte >> 12) & 0xFFFFFF
    vm.kvm_mmu_zap_all_fast()
    v.vcpu_enter_guest()
    assert vm.audit() == []


def test_guest_page_fault_is_injected_and_counted():
    vm, v, g, cr3 = four_level()
    assert v.kvm_mmu_page_fault(0x7FF000, U_) == RET_PF_RETRY      # no guest mapping
    assert v.stat.pf_guest == 1 and v.stat.pf_taken == 1
    assert v.injected_page_fault.address == 0x7FF000
    assert v.injected_page_fault.error_code & U_
    assert vm.audit() == []


def test_write_protected_fault_with_an_event_to_reinject_unprotects_and_retries():
    """kvm_mmu_write_protect_fault on shadow paging: with an event awaiting
    reinjection the gfn's shadow pages are zapped (unprotect) and the fault
    retried; the same address again is emulated."""
    vm, v, g, cr3 = four_level()
    sm = vm.mmu_backend
    g.map(cr3, 0x800000, 0x3000)                         # alias of the PD (gfn 3)
    v.kvm_mmu_page_fault(0x400000, U_)
    v.event_needs_reinjection = True
    assert v.kvm_mmu_page_fault(0x800000, W_ | U_) == RET_PF_RETRY
    assert not any(sp.gfn == 3 for sp in sm.pages.values() if not sp.invalid)
    assert v.last_retry_addr == 0x800000
    assert vm.audit() == []


# ---------------------------------------------------------------------------
# the MmuBackend hooks through rmaps (mmu="tdp")
# ---------------------------------------------------------------------------

def thp_tdp_vm(**params):
    vm = VM("tdp", host=HostConfig(tdp="ept"), params=KvmParams(tdp_mmu=False, **params))
    s = vm.add_memory(0, 16 * MiB, thp=True, populate=True)
    v = vm.vcpus[0]
    v.vcpu_enter_guest()
    return vm, v, s


def test_thp_backed_fault_maps_2m_and_dirty_logging_breaks_it_down():
    vm, v, s = thp_tdp_vm()
    sm = vm.mmu_backend
    assert v.kvm_mmu_page_fault(0x200000 + 0x3000, W_) == RET_PF_FIXED
    sp, idx, spte = sm.shadow_walk(v, 0x203000)[-1]
    assert sp.level == 2 and spte & PS and vm.stat.pages_2m == 1
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 16 * MiB, s.userspace_addr)
    # write-protected huge leaf: the fast path may not restore W on a huge page of
    # a dirty-logged slot, so the write takes the slow path and maps 4K
    assert v.kvm_mmu_page_fault(0x203000, W_ | P_) == RET_PF_FIXED
    sp, idx, spte = sm.shadow_walk(v, 0x203000)[-1]
    assert sp.level == 1 and spte & W
    assert vm.audit() == []
    # dirty logging off: recover_huge_pages zaps the collapsible 4K SPTEs
    vm.set_user_memory_region(0, 0, 0, 16 * MiB, s.userspace_addr)
    assert not sm.shadow_walk(v, 0x203000)[-1][2] & 0x800
    assert v.kvm_mmu_page_fault(0x203000, W_) == RET_PF_FIXED
    assert sm.shadow_walk(v, 0x203000)[-1][0].level == 2
    assert vm.audit() == []


def test_nx_huge_pages_split_for_fetches_and_recovery_zaps_them():
    vm, v, s = thp_tdp_vm(nx_huge_pages=True)
    sm = vm.mmu_backend
    assert v.kvm_mmu_page_fault(0x400000, F_) == RET_PF_FIXED
    assert sm.shadow_walk(v, 0x400000)[-1][0].level == 1      # exec: 4K
    assert vm.stat.nx_lpage_splits == 1 and len(sm.possible_nx_huge_pages) == 1
    # a data access in the same 2M does not replace the NX-split table with a huge page
    assert v.kvm_mmu_page_fault(0x401000, W_) == RET_PF_FIXED
    assert sm.shadow_walk(v, 0x401000)[-1][0].level == 1
    assert sm.kvm_recover_nx_huge_pages(1) == 1
    assert vm.stat.nx_lpage_splits == 0
    assert v.kvm_mmu_page_fault(0x401000, W_) == RET_PF_FIXED
    assert sm.shadow_walk(v, 0x401000)[-1][0].level == 2      # huge again
    assert vm.audit() == []


def test_host_aging_and_unmap_go_through_the_rmaps():
    vm, v, s = thp_tdp_vm()
    sm = vm.mmu_backend
    v.kvm_mmu_page_fault(0x5000, W_)
    assert sm.shadow_walk(v, 0x5000)[-1][2] & (1 << 8)          # EPT A bit
    assert vm.host.test_young(s.userspace_addr + 0x5000)
    vm.host.age(s.userspace_addr, 16 * MiB)
    assert not sm.shadow_walk(v, 0x5000)[-1][2] & (1 << 8)
    vm.host.munmap(s.userspace_addr, 4 * MiB)
    assert not sm.shadow_walk(v, 0x5000)[-1][2] & 0x800
    assert vm.stat.pages_2m + vm.stat.pages_4k == 0
    assert vm.audit() == []


def test_memslot_delete_fast_zaps_and_the_root_is_reloaded():
    vm, v, s = thp_tdp_vm()
    sm = vm.mmu_backend
    v.kvm_mmu_page_fault(0x5000, W_)
    vm.delete_memslot(0)
    assert vm.mmu_valid_gen == 1 and vm.stat.pages_2m + vm.stat.pages_4k == 0
    v.vcpu_enter_guest()
    assert v.mmu_root.sp.mmu_valid_gen == 1 and len(sm.pages) == 1
    assert vm.audit() == []


# ---------------------------------------------------------------------------
# against a trace this host's kernel recorded (v6.18, shadow paging)
# ---------------------------------------------------------------------------

# Recorded on this machine with kvmmmu.live (tests/test_paging_live.py's guest:
# identity tables at 0x1000.., a ring-3 fetch of the code page 0x10000, then a
# ring-3 read of 0x400000 whose PT (gfn 5) has an accessed neighbour whose host
# page was never touched, so it is not prefetched).  The MMU events only
# (walker lines are checked by test_paging_live); pfns and sptep addresses are
# the host's.
KERNEL_FIRST_TOUCH = """\
kvm_mmu_get_page: sp gen 0 gfn 1 l4 8-byte q0 wux nxe ad root 0 sync new
kvm_mmu_get_page: sp gen 0 gfn 2 l3 8-byte q0 wux nxe ad root 0 sync new
kvm_mmu_get_page: sp gen 0 gfn 3 l2 8-byte q0 wux nxe ad root 0 sync new
kvm_mmu_get_page: sp gen 0 gfn 4 l1 8-byte q0 wux nxe ad root 0 sync new
kvm_mmu_spte_requested: gfn 10 pfn 1b96da level 1
kvm_mmu_set_spte: gfn 10 spte 1b96daa25 (r-xu) level 1 at 14509b080
kvm_mmu_get_page: sp gen 0 gfn 5 l1 8-byte q0 wux nxe ad root 0 sync new
kvm_mmu_spte_requested: gfn 300 pfn 1f20c9 level 1
kvm_mmu_set_spte: gfn 300 spte 1f20c9a25 (r-xu) level 1 at 14509a000
""".splitlines()


def _masked(line):
    import re
    line = re.sub(r"pfn [0-9a-f]+", "pfn *", line)
    line = re.sub(r" at [0-9a-f]+$", " at *", line)
    return re.sub(r"spte ([0-9a-f]+)", lambda m: "spte %x" % (int(m.group(1), 16) & ~0xFFFFFFFFFF000),
                  line)


# The same guest, but the PT's entry 16 maps the PT itself (user, writable, A and D
# set); the code reads 0x400000, then stores through that alias: the level-1
# page of gfn 5 goes unsync and the alias is mapped writable.
KERNEL_UNSYNC_ALIAS = KERNEL_FIRST_TOUCH[:-3] + """kvm_mmu_get_page: sp gen 0 gfn 5 l1 8-byte q0 wux nxe ad root 0 sync new
kvm_mmu_spte_requested: gfn 300 pfn 103a62 level 1
kvm_mmu_set_spte: gfn 300 spte 103a62a25 (r-xu) level 1 at 149811000
kvm_mmu_spte_requested: gfn 5 pfn 131ab1 level 1
kvm_mmu_unsync_page: sp gen 0 gfn 5 l1 8-byte q0 wux nxe ad root 0 sync
kvm_mmu_set_spte: gfn 5 spte 131ab1e67 (rwxu) level 1 at 149811080
""".splitlines()


def _recorded_guest(alias):
    import struct
    import numpy as np
    from kvmmmu import live
    from test_paging_live import (
        DF_HANDLER, FRAME, GP_HANDLER, MEM_SIZE, PF_HANDLER, PT_PROBE, STACK, _identity_tables,
    )
    ram = np.zeros(MEM_SIZE, np.uint8)
    _identity_tables(ram, True)
    live.write_tables(ram, {14: PF_HANDLER, 13: GP_HANDLER, 8: DF_HANDLER}, stack=STACK)
    struct.pack_into("<Q", ram, PT_PROBE, FRAME | 7 | A)
    if alias:
        struct.pack_into("<Q", ram, PT_PROBE + 16 * 8, PT_PROBE | 7 | A | D)
    else:
        struct.pack_into("<Q", ram, PT_PROBE + 8, (FRAME + 0x1000) | 7 | A)
    return ram


@pytest.mark.parametrize("alias", [False, True], ids=["first_touch", "unsync_alias"])
def test_mmu_events_match_the_kernels_recorded_ones(alias):
    from test_paging_live import MEM_SIZE, PML4, PROBE_BASE, USER_CODE
    ram = _recorded_guest(alias)
    vm = VM("shadow", host=SHADOW_HOST, params=KvmParams(tdp_mmu=False, mmio_caching=False,
                                                         nx_huge_pages=False))
    vm.add_memory(0, MEM_SIZE)
    # only the pages the live VMM stored to: a VMM store faults its host page in
    # (present and writable), the untouched ones stay absent (no prefetch there)
    # (the live guest's code page at USER_CODE was stored to as well)
    for gpa in sorted({x & ~0xFFF for x in ram.nonzero()[0].tolist()} | {USER_CODE}):
        vm.write_guest(gpa, ram[gpa:gpa + 0x1000].tobytes())
    v = vm.vcpus[0]
    v.kvm_set_efer(EFER_LME | EFER_NX)
    v.kvm_set_cr4(CR4_PAE)
    v.kvm_set_cr3(PML4)
    v.kvm_set_cr0(CR0_PE | CR0_PG | CR0_WP)
    v.set_cpl(3)
    mmu_events = [e.name for e in tp.EVENTS[5:]]
    with tp.capture(*mmu_events) as buf:
        v.vcpu_enter_guest()
        assert v.kvm_mmu_page_fault(USER_CODE, U_ | F_) == RET_PF_FIXED
        v.vcpu_enter_guest()
        assert v.kvm_mmu_page_fault(PROBE_BASE, U_) == RET_PF_FIXED
        if alias:
            v.vcpu_enter_guest()
            assert v.kvm_mmu_page_fault(PROBE_BASE + 16 * 0x1000 + 8, U_ | W_) == RET_PF_FIXED
    want = KERNEL_UNSYNC_ALIAS if alias else KERNEL_FIRST_TOUCH
    assert [_masked(x) for x in buf.lines()] == [_masked(x) for x in want]
    assert vm.stat.mmu_unsync == int(alias)
    assert vm.audit() == []
