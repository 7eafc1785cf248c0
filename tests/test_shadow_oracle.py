"""Self-tests of the shadow-MMU oracle (tests/_shadow_oracle.py).

The oracle must pass correct shadow tables and catch each planted violation:
too much access, a wrong gfn, a pfn that is not the host's, a write through
a read-only memslot, a writable leaf without the guest D bit or in a
dirty-logged slot without its dirty bit, a child SP that does not shadow the
guest's table, a writable alias of a shadowed table, and a translation left
stale after INVLPG.  The guest tables and the shadow tables are written by
hand (guest memory through ``vm.write_guest``, SPTEs straight into the
arena), so nothing of the shadow MMU under test is involved.

The guest walker is checked on hand-built tables of every paging mode and
against the model's own walker (``kvmmmu.paging``) on random entries: two
independent implementations of the SDM must agree.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import _shadow_oracle as O
from kvmmmu import paging
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmmmu.vm import VM

MiB = 1 << 20
P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63
ACC_X, ACC_W, ACC_U = 1, 2, 4


def _long_regs(cr3, **kw):
    c = paging.CpuState.long_mode(cr3, **{k: v for k, v in kw.items() if k in ("wp", "smep", "nxe", "la57")})
    return O.GuestRegs(c.cr0, c.cr3, c.cr4, c.efer, 48, True, False, None)


class Guest:
    """A VM without an MMU backend, a populated slot 0 (4 MiB) and a
    read-only slot 1 (1 MiB at 8 MiB); 4-level tables at fixed gfns:
    PML4 1, PDPT 2, PD 3, PT 4 (covering gva 0..2M), PT 5 (2M..4M)."""

    def __init__(self):
        self.vm = vm = VM("shadow", backend=None)
        vm.add_memory(0, 4 * MiB, slot=0, populate=True)
        vm.add_memory(8 * MiB, 1 * MiB, slot=1, flags=KVM_MEM_READONLY, writable=True, populate=True)
        self.v = vm.vcpus[0]
        self.set(1 << 12, 2 << 12 | P | W | U | A)
        self.set(2 << 12, 3 << 12 | P | W | U | A)
        self.set(3 << 12, 4 << 12 | P | W | U | A)
        self.set(3 << 12 | 8, 5 << 12 | P | W | U | A)
        self.regs = _long_regs(1 << 12)
        self.read = O.memory_reader(vm)
        a = vm.arena
        self.v.mmu_topup_memory_caches(True)
        self.sps = {}
        for lvl, gfn in ((4, 1), (3, 2), (2, 3), (1, 4)):
            self.sps[lvl] = a.alloc_sp(self.v.mmu_shadow_page_cache, self.v.mmu_page_header_cache,
                                       self.v.mmu_shadowed_info_cache, role=lvl | (7 << 8) | (1 << 12) | (1 << 13),
                                       gfn=gfn)
        for lvl in (4, 3, 2):
            self.link(self.sps[lvl], 0, self.sps[lvl - 1])

    def set(self, gpa, val):
        self.vm.write_guest(gpa, int(val).to_bytes(8, "little"))

    def pte(self, gva, val):
        self.set((4 << 12) + ((gva >> 12) & 511) * 8, val)

    def link(self, parent, i, child):
        a = self.vm.arena
        a.mmu_spte_set(a.sp_sptep(parent, i), self.vm.fmt.make_nonleaf_spte(a.sp_pa(child)))

    def host_pfn(self, gfn):
        return O._host_pfn(self.vm, gfn)

    def leaf(self, gva, gfn, access, *, pfn=None, sp=None, level=1, index=None):
        a, fmt = self.vm.arena, self.vm.fmt
        spte, _ = fmt.make_spte(level=level, pte_access=access,
                                pfn=self.host_pfn(gfn) if pfn is None else pfn, host_writable=True)
        sp = self.sps[1] if sp is None else sp
        sptep = a.sp_sptep(sp, (gva >> 12) & 511 if index is None else index)
        a.mmu_spte_clear_no_track(sptep)
        a.mmu_spte_set(sptep, spte)
        return spte

    def check(self, **kw):
        kw.setdefault("read_u64", self.read)
        return O.check_shadow_root(self.vm, self.v, self.sps[4], self.regs, **kw)


# --- the guest walker ---------------------------------------------------------

def test_walker_4level_4k_2m_1g_and_access():
    g = Guest()
    g.pte(0x3000, 0x40 << 12 | P | A | D)                      # supervisor read-only
    tr = O.translate(g.read, 0x3123, g.regs)
    assert (tr.gfn, tr.level, tr.w, tr.u, tr.nx, tr.accessed, tr.dirty) == (0x40, 1, False, False, False, True, True)
    assert tr.gpa == 0x40123 and tr.tables == (1, 2, 3, 4)
    assert O.guest_allows(tr, g.regs) == {"SR", "SX"}
    assert O.guest_allows(tr, O.GuestRegs(g.regs.cr0 & ~O.CR0_WP, *[getattr(g.regs, f) for f in
                                          ("cr3", "cr4", "efer")])) == {"SR", "SW", "SX"}
    g.set(3 << 12 | 16, 0x200000 | P | W | U | A | D | PS | NX)  # 2M page at gva 4M
    tr = O.translate(g.read, 0x400000 + 0x5123, g.regs)
    assert (tr.gfn, tr.base_gfn, tr.level, tr.nx) == (0x205, 0x200, 2, True)
    assert O.guest_allows(tr, g.regs) == {"SR", "SW", "UR", "UW"}
    g.set(2 << 12 | 8, 0x40000000 | P | W | A | PS)             # 1G page at gva 1G
    tr = O.translate(g.read, 0x40000000 + 0x12345678, g.regs)
    assert (tr.gfn, tr.level) == (0x40000 + 0x12345, 3)
    nogb = O.GuestRegs(*[getattr(g.regs, f) for f in ("cr0", "cr3", "cr4", "efer", "maxphyaddr")], gbpages=False)
    w = O.walk_guest(g.read, 0x40000000, nogb)
    assert w.translation is None and (w.fault, w.fault_level) == ("reserved", 3)


@pytest.mark.parametrize("entry, why", [
    (0x40 << 12 | P | A | (1 << 50), "reserved"),              # above MAXPHYADDR 48
    (0x40 << 12 | A, "not present"),
])
def test_walker_reserved_and_not_present(entry, why):
    g = Guest()
    g.pte(0x3000, entry)
    w = O.walk_guest(g.read, 0x3000, g.regs)
    assert w.translation is None and w.fault == why and w.fault_level == 1


def test_walker_nx_reserved_without_nxe_and_noncanonical():
    g = Guest()
    g.pte(0x3000, 0x40 << 12 | P | A | NX)
    assert O.translate(g.read, 0x3000, g.regs).nx
    nonxe = _long_regs(1 << 12, nxe=False)
    assert O.walk_guest(g.read, 0x3000, nonxe).fault == "reserved"
    assert O.walk_guest(g.read, 1 << 47, g.regs).fault == "non-canonical"
    assert O.walk_guest(g.read, (1 << 64) - 4096, g.regs).fault == "not present"   # canonical, unmapped


def test_walker_pae_and_32bit():
    g = Guest()
    # PAE: PDPTE registers -> PD at gfn 6 -> PT at gfn 7
    g.set(6 << 12 | 8 * 1, 7 << 12 | P | W | A)                  # PDE 1: gva 2M..4M
    g.set(7 << 12 | 8 * 3, 0x41 << 12 | P | W | U | A | D)
    c = paging.CpuState.pae(0x1000)
    pae = O.GuestRegs(c.cr0, c.cr3, c.cr4, c.efer, 48, pdptrs=(0, 6 << 12 | P, 0, 0))
    tr = O.translate(g.read, 0x40000000 + 0x200000 + 0x3000 + 5, pae)
    assert (tr.gfn, tr.w, tr.u, tr.tables) == (0x41, True, False, (6, 7))
    assert O.translate(g.read, 0x3000, pae) is None              # PDPTE 0 not present
    # 32-bit: PD at gfn 8 (4-byte entries), 4M PSE page with PSE-36 bits
    g.vm.write_guest(8 << 12 | 4 * 2, (0x00C00000 | 1 << 13 | P | W | U | A | D | PS).to_bytes(4, "little"))
    g.vm.write_guest(8 << 12 | 4 * 1, (9 << 12 | P | W | U | A).to_bytes(4, "little"))
    g.vm.write_guest(9 << 12 | 4 * 700, (0x42 << 12 | P | U | A).to_bytes(4, "little"))
    c = paging.CpuState.legacy32(8 << 12)
    r32 = O.GuestRegs(c.cr0, c.cr3, c.cr4, c.efer, 48)
    tr = O.translate(g.read, 0x00800000 + 0x1234, r32)
    assert (tr.gfn, tr.level) == ((1 << 20) + 0xC00 + 1, 2)      # bit 13 -> address bit 32
    tr = O.translate(g.read, 0x00400000 + 700 * 4096, r32)
    assert (tr.gfn, tr.level, tr.w, tr.u) == (0x42, 1, False, True)
    nopse = O.GuestRegs(c.cr0, c.cr3, 0, 0, 48)                    # PS ignored without CR4.PSE
    assert O.translate(g.read, 0x00800000, nopse) is None or O.translate(g.read, 0x00800000, nopse).level == 1


_ENTRY_BITS = st.sampled_from([0, P, P | W, P | U, P | W | U]).flatmap(
    lambda b: st.tuples(st.just(b), st.sampled_from([0, A, A | D]), st.sampled_from([0, PS]),
                        st.sampled_from([0, NX]), st.sampled_from([0, 0, 1 << 47, 1 << 49])))


@settings(max_examples=120, deadline=None)
@given(bits=st.lists(_ENTRY_BITS, min_size=4, max_size=4), nxe=st.booleans(), gb=st.booleans(),
       low=st.integers(0, 0x1FFFFF))
def test_walker_agrees_with_the_models_walker(bits, nxe, gb, low):
    """Random entries on one 4-level path: our walk and kvmmmu.paging's
    (a supervisor read: allowed whenever the walk succeeds, no SMAP) give
    the same gfn, page size, U, X and - the model applies protect_clean_gpte
    to a read - W only with D."""
    mem = paging.GuestMemory(np.zeros(64 << 12, np.uint8))
    tables = [1, 2, 3, 4]
    for lvl, (b, ad, ps, nx, hi) in zip((4, 3, 2, 1), bits):
        nxt = tables[5 - lvl] if lvl > 1 else 0
        frame = (nxt << 12) if not ps and lvl > 1 else (0x40000000 if lvl == 3 else 0x200000 if lvl == 2 else 0x9000)
        mem.write_u64((tables[4 - lvl] << 12), frame | b | ad | ps | nx | hi)
    gva = low
    c = paging.CpuState.long_mode(1 << 12, nxe=nxe)
    model = paging.GuestCpuModel(gbpages=gb)
    regs = O.GuestRegs(c.cr0, c.cr3, c.cr4, c.efer, 48, gb, False)
    mine = O.translate(lambda gpa: mem.read_u64(gpa), gva, regs)
    w = paging.GuestMmu(mem, c, model).walk_addr(gva, 0)
    assert (mine is not None) == w.ok, (mine, w.fault)
    if mine is not None:
        assert (mine.gfn, mine.page_size) == (w.gfn, w.page_size)
        acc = w.pte_access
        assert bool(acc & ACC_U) == mine.u and bool(acc & ACC_X) == (not mine.nx)
        assert bool(acc & ACC_W) == (mine.w and mine.dirty)


# --- the security rule on hand-built shadow tables --------------------------------

def test_correct_tables_pass():
    g = Guest()
    g.pte(0x3000, 0x40 << 12 | P | W | U | A | D)
    g.pte(0x4000, 0x41 << 12 | P | U | A)                       # read-only, clean
    g.pte(0x6000, 0x100 << 12 | P | W | U | A | D)              # gfn 0x100: RO slot? no: slot 0
    g.leaf(0x3000, 0x40, ACC_W | ACC_U | ACC_X)
    g.leaf(0x4000, 0x41, ACC_U | ACC_X)
    g.leaf(0x6000, 0x100, ACC_U)                                # less than allowed is fine
    assert g.check() == []


@pytest.mark.parametrize("gpte, access, pfn_gfn, why", [
    (0x40 << 12 | P | U | A | D, ACC_W | ACC_U | ACC_X, 0x40, "grants SW/UW"),        # too much: W
    (0x40 << 12 | P | W | A | D, ACC_W | ACC_U | ACC_X, 0x40, "grants UR/UW/UX"),     # too much: U
    (0x40 << 12 | P | W | U | A | D | NX, ACC_W | ACC_U | ACC_X, 0x40, "grants SX/UX"),  # too much: X
    (0x40 << 12 | P | W | U | A, ACC_W | ACC_U, 0x40, "D bit is clear"),             # W without D
    (0x40 << 12 | P | W | U | D, ACC_U, 0x40, "A bit clear"),                        # no A
    (0x40 << 12 | P | W | U | A | D, ACC_U, 0x41, "the leaf maps"),                  # wrong gfn
    (0x40 << 12 | W | U | A | D, ACC_U, 0x40, "does not map it"),                    # not present
])
def test_each_planted_violation_is_caught(gpte, access, pfn_gfn, why):
    g = Guest()
    g.pte(0x3000, gpte)
    g.leaf(0x3000, pfn_gfn, access)
    bad = g.check()
    assert len(bad) == 1 and why in bad[0], bad


def test_wrong_pfn_and_readonly_slot_and_dirty_log_are_caught():
    g = Guest()
    g.pte(0x3000, 0x40 << 12 | P | W | U | A | D)
    g.leaf(0x3000, 0x40, ACC_U, pfn=g.host_pfn(0x40) + 0x1000)   # not the host's page
    bad = g.check()
    assert len(bad) == 1 and "the leaf maps" in bad[0]
    # a write through the read-only slot (gfn 0x800 is slot 1's first page)
    g = Guest()
    g.pte(0x3000, 0x800 << 12 | P | W | U | A | D)
    g.leaf(0x3000, 0x800, ACC_U | ACC_W)
    bad = g.check()
    assert len(bad) == 1 and "READONLY memslot" in bad[0], bad
    g.leaf(0x3000, 0x800, ACC_U)                                  # read-only: fine
    assert g.check() == []
    # dirty logging: writable without the dirty bit
    g = Guest()
    s = g.vm.memslots[0].id_to_memslot(0)
    g.vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MiB, s.userspace_addr)
    g.vm.get_dirty_log(0)
    g.pte(0x3000, 0x40 << 12 | P | W | U | A | D)
    g.leaf(0x3000, 0x40, ACC_U | ACC_W)
    bad = g.check()
    assert len(bad) == 1 and "without its dirty bit" in bad[0], bad
    g.vm.mark_page_dirty(0x40)
    assert g.check() == []


def test_huge_leaf_above_the_guest_page_and_wrong_link_are_caught():
    g = Guest()
    for i in range(512):
        g.set((4 << 12) + 8 * i, (0x200 + i) << 12 | P | W | U | A | D)
    g.leaf(0, 0x200, ACC_U, sp=g.sps[2], index=0, level=2)       # 2M over guest 4K pages
    bad = g.check()
    assert any("above the guest page level" in b for b in bad), bad
    # a level-1 SP whose gfn is not the guest's PT for that gva
    g = Guest()
    g.pte(0x3000, 0x40 << 12 | P | W | U | A | D)
    g.leaf(0x3000, 0x40, ACC_U)
    g.set(3 << 12, 5 << 12 | P | W | U | A)                      # guest PD[0] now -> PT 5
    g.set((5 << 12) + 3 * 8, 0x40 << 12 | P | W | U | A | D)
    bad = g.check()
    assert len(bad) == 1 and "shadows gfn 0x4, the guest table there is 0x5" in bad[0], bad


def test_writable_alias_of_a_shadowed_table_is_caught():
    g = Guest()
    g.pte(0x3000, 3 << 12 | P | W | U | A | D)                   # the guest maps its own PD
    g.leaf(0x3000, 3, ACC_U | ACC_W)
    assert g.check() == []                                       # one root's rule cannot see it
    bad = O.writable_aliases(g.vm, [(g.sps[4], 0, 48)])
    assert len(bad) == 1 and "gfn 0x3" in bad[0] and "level 2" in bad[0], bad
    g.leaf(0x3000, 3, ACC_U)
    assert O.writable_aliases(g.vm, [(g.sps[4], 0, 48)]) == []
    # a level-1 SP may have writable aliases once it is unsync
    g.pte(0x4000, 4 << 12 | P | W | U | A | D)
    g.leaf(0x4000, 4, ACC_U | ACC_W)
    assert len(O.writable_aliases(g.vm, [(g.sps[4], 0, 48)])) == 1
    g.vm.arena.set_sp(g.sps[1], unsync=True)
    assert O.writable_aliases(g.vm, [(g.sps[4], 0, 48)]) == []


def test_stale_unsync_entry_allowed_until_invlpg():
    """An unsync level-1 SP may keep a translation the guest gave since the
    last invalidation of the gva; after INVLPG (window.flush) it may not."""
    g = Guest()
    gva = 0x3000
    win = O.TlbWindow([gva, 0x4000])
    g.pte(gva, 0x40 << 12 | P | W | U | A | D)
    win.flush_all(g.read, g.regs)
    g.leaf(gva, 0x40, ACC_U | ACC_W | ACC_X)
    g.vm.arena.set_sp(g.sps[1], unsync=True)
    assert g.check(window=win) == []
    g.pte(gva, 0x41 << 12 | P | U | A)                           # the guest remaps it natively
    win.observe(g.read, g.regs)
    assert g.check(window=win) == []                             # a TLB may still hold gfn 0x40
    bad = g.check()                                               # no window: only the current one
    assert len(bad) == 1 and "(unsync)" in bad[0]
    win.flush(gva, g.read, g.regs)                                # INVLPG
    bad = g.check(window=win)
    assert len(bad) == 1 and "gva 0x3000" in bad[0], bad
    g.leaf(gva, 0x41, ACC_U | ACC_X)                              # what a sync would install
    assert g.check(window=win) == []
    # a sync SP gets no window: the guest cannot have changed it unnoticed
    g.vm.arena.set_sp(g.sps[1], unsync=False)
    g.pte(gva, 0x42 << 12 | P | U | A)
    win.observe(g.read, g.regs)
    assert len(g.check(window=win)) == 1


def test_direct_root_checker():
    vm = VM("shadow", backend=None)
    vm.add_memory(0, 4 * MiB, slot=0, populate=True)
    v = vm.vcpus[0]
    v.mmu_topup_memory_caches(True)
    a, fmt = vm.arena, vm.fmt
    direct = (1 << 7) | (7 << 8) | (1 << 12) | (1 << 13)
    sps = [a.alloc_sp(v.mmu_shadow_page_cache, v.mmu_page_header_cache, role=direct | lvl, gfn=0)
           for lvl in (4, 3, 2, 1)]
    for p, c in zip(sps, sps[1:]):
        a.mmu_spte_set(a.sp_sptep(p, 0), fmt.make_nonleaf_spte(a.sp_pa(c)))
    pfn = O._host_pfn(vm, 5)
    a.mmu_spte_set(a.sp_sptep(sps[3], 5), fmt.make_spte(level=1, pte_access=7, pfn=pfn, host_writable=True)[0])
    assert O.check_direct_root(vm, v, sps[0]) == []
    a.mmu_spte_set(a.sp_sptep(sps[3], 6), fmt.make_spte(level=1, pte_access=7, pfn=pfn, host_writable=True)[0])
    bad = O.check_direct_root(vm, v, sps[0])
    assert len(bad) == 1 and "gfn 0x6 -> pfn" in bad[0], bad
    a.mmu_spte_clear_no_track(a.sp_sptep(sps[3], 6))
    a.mmu_spte_set(a.sp_sptep(sps[2], 3), fmt.make_spte(level=2, pte_access=7, pfn=0x12345 << 9,
                                                        host_writable=True)[0])
    bad = O.check_direct_root(vm, v, sps[0])
    assert len(bad) == 1 and "outside every memslot" in bad[0], bad


def test_a_page_table_used_twice_is_one_sp_linked_twice():
    """A guest PT referenced by two PDEs of one PD: the shadow links one SP
    from both entries; the oracle walks it twice, at both gvas, and only a
    cycle would be an error."""
    g = Guest()
    g.set(3 << 12 | 16, 4 << 12 | P | W | U | A)                  # PD[2] -> PT 4 as well
    g.pte(0x3000, 0x40 << 12 | P | W | U | A | D)
    g.leaf(0x3000, 0x40, ACC_U | ACC_W)
    g.link(g.sps[2], 2, g.sps[1])
    leaves = list(O.iter_shadow(g.vm.arena, g.vm.fmt, g.sps[4], va_bits=48))
    assert sorted(lf.addr for lf in leaves) == [0x3000, 0x400000 + 0x3000]
    assert g.check() == []
    g.set(3 << 12 | 16, 5 << 12 | P | W | U | A)                  # the guest moves PD[2] away
    bad = g.check()
    assert all("gva 0x403000" in b for b in bad) and "guest table there is 0x5" in bad[0], bad
    assert "does not map it" in bad[1]                            # PT 5 has nothing at 0x403000
