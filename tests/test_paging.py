"""Hand-built page tables for every paging mode: exact gpa, error code, A/D bits
and trace lines (kvmmmu.paging)."""
import numpy as np
import pytest

from kvmmmu import mmutrace as tp
from kvmmmu import paging as P

W, U, F = P.PFERR_WRITE_MASK, P.PFERR_USER_MASK, P.PFERR_FETCH_MASK
IMPLICIT = P.PFERR_IMPLICIT_ACCESS
PR, RW, US, PWT, A, D, PS, G = 1, 2, 4, 8, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63
WALKER_EVENTS = [ev.name for ev in tp.EVENTS[:5]]
INTEL = P.GuestCpuModel(maxphyaddr=46, gbpages=True)


class Mem:
    """A 4 MiB guest with helpers to write 4- or 8-byte entries."""

    def __init__(self, size=4 << 20, **kw):
        self.ram = np.zeros(size, np.uint8)
        self.mem = P.GuestMemory(self.ram, **kw)

    def q(self, gpa, v=None):
        if v is None:
            return int(self.ram[gpa:gpa + 8].view(np.uint64)[0])
        self.ram[gpa:gpa + 8].view(np.uint64)[0] = v

    def d(self, gpa, v=None):
        if v is None:
            return int(self.ram[gpa:gpa + 4].view(np.uint32)[0])
        self.ram[gpa:gpa + 4].view(np.uint32)[0] = v


def lines(fn):
    with tp.capture(*WALKER_EVENTS) as ring:
        result = fn()
    return result, ring.lines()


# --- 2-level ------------------------------------------------------------------

def test_2level_4k_walk_sets_a_then_d_with_exact_trace():
    m = Mem()
    m.d(0x1000 + 4 * 1, 0x2000 | PR | RW | US)            # PDE for 0x00400000
    m.d(0x2000 + 4 * 5, 0x345000 | PR | RW | US)           # PTE for 0x00405000
    mmu = P.GuestMmu(m.mem, P.CpuState.legacy32(cr3=0x1000), INTEL)
    w, out = lines(lambda: mmu.walk_addr(0x405abc, W | U))
    assert w.ok and w.gpa == 0x345abc and w.level == 1 and w.page_size == 4096
    assert w.pte_access == P.ACC_ALL and w.access_str == "wux"   # no NX in 32-bit paging
    assert m.d(0x1004) == 0x2000 | PR | RW | US | A                # A on the PDE only
    assert m.d(0x2014) == 0x345000 | PR | RW | US | A | D          # A and D on the PTE
    assert out == [
        "kvm_mmu_pagetable_walk: addr 405abc pferr 6 W|U",
        "kvm_mmu_paging_element: pte 2007 level 2",
        "kvm_mmu_paging_element: pte 345007 level 1",
        "kvm_mmu_set_accessed_bit: gpa 1004",
        "kvm_mmu_set_accessed_bit: gpa 2014",
        "kvm_mmu_set_dirty_bit: gpa 2014",
    ]
    # The top level's pt_access lacks ACC_EXEC: the kernel ANDs the 32-bit
    # PDE into an all-ones u64, whose bit 63 then reads as NX.
    assert w.pt_access[1] == P.ACC_WRITE_MASK | P.ACC_USER_MASK
    assert w.pt_access[0] == P.ACC_ALL


def test_2level_pse_4m_page_and_pse36():
    m = Mem()
    # 4 MiB page at 0x00c00000 with PSE-36 bits 16:13 = 0x3 -> PA bits 33:32.
    m.d(0x1000 + 4 * 2, 0x00c00000 | (0x3 << 13) | PR | RW | PS)
    mmu = P.GuestMmu(m.mem, P.CpuState.legacy32(cr3=0x1000, pse=True), INTEL)
    w = mmu.walk_addr(0x0089abcd, 0)
    assert w.ok and w.level == 2 and w.page_size == 4 << 20
    assert w.gpa == (0x3 << 32) | 0x00c00000 | 0x09abcd
    assert w.pte_access == P.ACC_EXEC_MASK                    # clean page: not writable yet
    assert m.d(0x1008) & A and not m.d(0x1008) & D
    # PSE-36 reserves bits 21:17 of a 4 MiB PDE.
    m.d(0x1000 + 4 * 3, 0x00c00000 | (1 << 17) | PR | PS)
    f = mmu.walk_addr(0x00c00000, W)
    assert f.fault.error_code == P.PFERR_RSVD_MASK | 1 | W


def test_2level_bit7_is_ignored_without_pse():
    m = Mem()
    m.d(0x1000, 0x2000 | PR | RW | PS)                       # PS: ignored without CR4.PSE
    m.d(0x2000 + 4 * 3, 0x7000 | PR)
    mmu = P.GuestMmu(m.mem, P.CpuState.legacy32(cr3=0x1000, pse=False), INTEL)
    w = mmu.walk_addr(0x3123, 0)
    assert w.ok and w.level == 1 and w.gpa == 0x7123


def test_2level_supervisor_write_with_cr0_wp_clear():
    m = Mem()
    m.d(0x1000, 0x2000 | PR | US)
    m.d(0x2000, 0x9000 | PR | US)                             # read-only user page
    mmu0 = P.GuestMmu(m.mem, P.CpuState.legacy32(cr3=0x1000, wp=False), INTEL)
    w = mmu0.walk_addr(0x10, W)
    assert w.ok and w.gpa == 0x9010 and not w.pte_access & P.ACC_WRITE_MASK
    assert m.d(0x2000) & D                                   # D set although not writable
    mmu1 = P.GuestMmu(m.mem, P.CpuState.legacy32(cr3=0x1000, wp=True), INTEL)
    assert mmu1.walk_addr(0x10, W).fault.error_code == 1 | W
    assert mmu1.walk_addr(0x10, W | U).fault.error_code == 1 | W | U


# --- PAE ----------------------------------------------------------------------

def pae_tables():
    m = Mem()
    m.q(0x1020, 0x2000 | PR)                                 # PDPT at 0x1020 (32-byte aligned)
    m.q(0x1028, 0x3000 | PR)
    m.q(0x2000 + 8 * 1, 0x4000 | PR | RW | US)               # 0x00200000 -> PT
    m.q(0x4000 + 8 * 2, 0x8000 | PR | RW | US | NX)          # 0x00202000
    m.q(0x3000 + 8 * 0, 0x600000 | PR | RW | PS)             # 0x40000000: 2 MiB
    return m


def test_pae_walk_uses_pdptes_loaded_at_cr3_load():
    m = pae_tables()
    mmu = P.GuestMmu(m.mem, P.CpuState.pae(cr3=0x1020), INTEL)
    assert mmu.pdptrs == (0x2000 | PR, 0x3000 | PR, 0, 0)
    w, out = lines(lambda: mmu.walk_addr(0x202010, U))
    assert w.ok and w.gpa == 0x8010 and w.max_level == 2 and w.access_str == "-u-"
    assert out[:4] == ["kvm_mmu_pagetable_walk: addr 202010 pferr 4 U",
                       "kvm_mmu_paging_element: pte 2001 level 3",
                       "kvm_mmu_paging_element: pte 4007 level 2",
                       "kvm_mmu_paging_element: pte 8000000000008007 level 1"]
    # Changing the PDPT in memory does not change the registers...
    m.q(0x1020, 0)
    assert mmu.walk_addr(0x202010, U).ok
    # ...until the next CR3 load.
    mmu2 = P.GuestMmu(m.mem, P.CpuState.pae(cr3=0x1020), INTEL)
    w, out = lines(lambda: mmu2.walk_addr(0x202010, U))
    assert w.fault == P.PageFault(U, 0x202010)
    assert out == ["kvm_mmu_pagetable_walk: addr 202010 pferr 4 U",
                   "kvm_mmu_paging_element: pte 0 level 3",
                   "kvm_mmu_walker_error: pferr 4 U"]


def test_pae_2m_page_nx_fetch_and_rsvd_bits():
    m = pae_tables()
    mmu = P.GuestMmu(m.mem, P.CpuState.pae(cr3=0x1020), INTEL)
    w = mmu.walk_addr(0x40012345, W)
    assert w.ok and w.level == 2 and w.gpa == 0x612345 and w.page_size == 2 << 20
    assert mmu.walk_addr(0x202000, F | U).fault.error_code == 1 | U | F
    # Without EFER.NXE, bit 63 is reserved; F is not reported (no NX, no SMEP).
    mmu_nonx = P.GuestMmu(m.mem, P.CpuState.pae(cr3=0x1020, nxe=False), INTEL)
    assert mmu_nonx.walk_addr(0x202000, F | U).fault.error_code == 1 | 8 | U
    # PAE high reserved bits run up to 62 (not 51): bit 60 is reserved too.
    m.q(0x4000 + 8 * 3, 0x9000 | PR | (1 << 60))
    assert mmu.walk_addr(0x203000, 0).fault.error_code == 1 | 8


@pytest.mark.parametrize("bad", [1 << 46, 1 << 5, 1 << 8, 1 << 1, 1 << 2, NX])
def test_pae_pdpte_reserved_bits_fail_the_cr3_load(bad):
    m = pae_tables()
    before = m.ram.copy()
    m.q(0x1030, 0x5000 | PR | bad)
    with pytest.raises(P.PdptrLoadError):
        P.GuestMmu(m.mem, P.CpuState.pae(cr3=0x1020), INTEL)
    m.q(0x1030, 0x5000 | bad)                                # not present: not checked
    P.GuestMmu(m.mem, P.CpuState.pae(cr3=0x1020), INTEL)
    m.q(0x1030, 0)
    assert np.array_equal(m.ram, before)


# --- 4-level ------------------------------------------------------------------

def long_tables(m, la57=False):
    base = 0x1000
    if la57:
        m.q(0x1000, 0x6000 | PR | RW | US)                   # PML5[0] -> PML4 at 0x6000
        base = 0x6000
    m.q(base, 0x2000 | PR | RW | US)
    m.q(0x2000, 0x3000 | PR | RW | US)
    m.q(0x3000, 0x4000 | PR | RW | US)
    for i in range(512):
        m.q(0x4000 + 8 * i, (i << 12) | PR | RW)
    m.q(0x3008, 0x200000 | PR | RW | PS)                     # 2 MiB page at 2 MiB
    m.q(0x2008, 0x40000000 | PR | RW | PS)                   # 1 GiB page at 1 GiB


def test_4level_4k_2m_1g_pages():
    m = Mem()
    long_tables(m)
    mmu = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000), INTEL)
    assert (mmu.gva_to_gpa(0x5123), mmu.walk_addr(0x5123).page_size) == (0x5123, 4096)
    assert mmu.gva_to_gpa(0x2fedcb) == 0x2fedcb and mmu.walk_addr(0x200000).level == 2
    w = mmu.walk_addr(0x7fffffff, W)
    assert w.ok and w.level == 3 and w.gpa == 0x7fffffff and w.page_size == 1 << 30
    assert m.q(0x2008) == 0x40000000 | PR | RW | PS | A | D


def test_4level_gbpages_absent_makes_bit7_of_pdpte_reserved():
    m = Mem()
    long_tables(m)
    mmu = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000),
                     P.GuestCpuModel(maxphyaddr=46, gbpages=False))
    assert mmu.walk_addr(0x40000000, 0).fault.error_code == 1 | 8


def test_4level_maxphyaddr_vendor_and_nx_reserved_bits():
    m = Mem()
    long_tables(m)
    m.q(0x4000 + 8 * 9, 0x9000 | PR | (1 << 45))            # below MAXPHYADDR 46: fine
    m.q(0x4000 + 8 * 10, 0xa000 | PR | (1 << 46))           # at MAXPHYADDR: reserved
    mmu = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000), INTEL)
    assert mmu.walk_addr(0x9000).gpa == (1 << 45) | 0x9000
    assert mmu.walk_addr(0xa000, U).fault.error_code == 1 | 8 | U
    # Bit 8 of a non-leaf PML4E: ignored by Intel guests, reserved for AMD ones.
    m.q(0x1000, m.q(0x1000) | G)
    assert mmu.walk_addr(0x5000).ok
    amd = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000),
                     P.GuestCpuModel(vendor="amd", maxphyaddr=46))
    assert amd.walk_addr(0x5000).fault.error_code == 1 | 8
    # Bit 7 of a PML4E is always reserved.
    m.q(0x1000, 0x2000 | PR | RW | US | PS)
    assert mmu.walk_addr(0x5000, F).fault.error_code == 1 | 8 | F


def test_4level_not_present_and_hole_give_errcode_without_p():
    m = Mem(holes=[(0x100000, 0x200000)])
    long_tables(m)
    m.q(0x3000 + 8 * 5, 0x150000 | PR | RW | US)             # PD entry -> PT inside the hole
    m.q(0x4000 + 8 * 7, 0)
    mmu = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000, cpl=3), INTEL)
    assert mmu.walk_addr(0x7000, W | U).fault == P.PageFault(W | U, 0x7000)
    w, out = lines(lambda: mmu.walk_addr(0xa00000, 0))
    assert w.fault == P.PageFault(0, 0xa00000) and w.level == 1
    assert out[-2:] == ["kvm_mmu_paging_element: pte 150007 level 2",
                        "kvm_mmu_walker_error: pferr 0 "]


def test_4level_smep_smap_ac_implicit_and_pkeys():
    m = Mem()
    long_tables(m)
    m.q(0x4000 + 8 * 0x11, 0x11000 | PR | RW | US | (5 << 59))  # user page, protection key 5
    model = P.GuestCpuModel(maxphyaddr=46, pku=True)
    cpu = P.CpuState.long_mode(cr3=0x1000, smep=True, smap=True)
    mmu = P.GuestMmu(m.mem, cpu, model)
    assert mmu.walk_addr(0x11000, F).fault.error_code == 1 | F             # SMEP
    assert mmu.walk_addr(0x11000, 0).fault.error_code == 1                 # SMAP
    ac = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000, smep=True, smap=True, ac=True), model)
    assert ac.walk_addr(0x11000, W).ok                                    # AC overrides SMAP...
    assert ac.walk_addr(0x11000, IMPLICIT).fault.error_code == 1          # ...but not implicitly
    # PKRU key 5: AD -> every data access faults with PK, user or supervisor.
    pk = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000, pke=True, pkru=1 << 10), model)
    assert pk.walk_addr(0x11000, U).fault.error_code == 1 | U | P.PFERR_PK_MASK
    assert pk.walk_addr(0x11000, 0).fault.error_code == 1 | P.PFERR_PK_MASK
    assert pk.walk_addr(0x11000, F | U).ok                                # fetches ignore keys
    assert pk.walk_addr(0x5000, 0).ok                                     # supervisor pages too
    # WD: user writes fault; supervisor writes only with CR0.WP.
    wd = dict(pke=True, pkru=2 << 10)
    assert P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000, **wd), model).walk_addr(
        0x11000, W | U).fault.error_code == 1 | W | U | P.PFERR_PK_MASK
    assert P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000, wp=False, **wd), model).walk_addr(
        0x11000, W).ok
    assert mmu.pkru_mask == 0 and pk.pkru_mask != 0


def test_5level_walk():
    m = Mem()
    long_tables(m, la57=True)
    m.q(0x1000 + 8 * 3, 0x6000 | PR | RW)                   # PML5[3] -> the same PML4
    mmu = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000, la57=True),
                     P.GuestCpuModel(maxphyaddr=52, la57=True))
    assert mmu.root_level == 5
    w, out = lines(lambda: mmu.walk_addr((3 << 48) | 0x5678, W))
    assert w.ok and w.gpa == 0x5678 and w.max_level == 5
    assert [l.split(": ")[1] for l in out[1:6]] == [
        "pte 6003 level 5", "pte 2007 level 4", "pte 3007 level 3", "pte 4007 level 2",
        "pte 5003 level 1"]


def test_self_mapping_table_restarts_the_walk_on_a_changed_entry():
    """PML4[0] points at the PML4 itself, so gva 0 reads the same entry at all
    four levels.  The A-bit write-back of level 4 changes the entry that
    level 3 read; the kernel's cmpxchg then fails and the walk restarts
    (without a second pagetable_walk event)."""
    m = Mem()
    m.q(0x1000, 0x1000 | PR | RW)
    mmu = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000), INTEL)
    w, out = lines(lambda: mmu.walk_addr(0x18, 0))
    assert w.ok and w.gpa == 0x1018 and w.retries == 1
    assert out == (["kvm_mmu_pagetable_walk: addr 18 pferr 0 "]
                   + [f"kvm_mmu_paging_element: pte 1003 level {l}" for l in (4, 3, 2, 1)]
                   + ["kvm_mmu_set_accessed_bit: gpa 1000"] * 2
                   + [f"kvm_mmu_paging_element: pte 1023 level {l}" for l in (4, 3, 2, 1)])
    assert m.q(0x1000) == 0x1000 | PR | RW | A


def test_readonly_memslot_tables_keep_a_d_clear_but_trace_them():
    ram = np.zeros(1 << 20, np.uint8)
    rom = np.zeros(0x10000, np.uint8)
    mem = P.GuestMemory(ram)
    mem.add_slot(0x200000, rom, readonly=True)
    v = rom.view(np.uint64)
    v[0] = 0x201000 | PR | RW
    v[512] = 0x202000 | PR | RW
    v[1024] = 0x203000 | PR | RW
    v[1536] = 0x5000 | PR | RW
    mmu = P.GuestMmu(mem, P.CpuState.long_mode(cr3=0x200000), INTEL)
    w, out = lines(lambda: mmu.walk_addr(0x10, W))
    assert w.ok and w.gpa == 0x5010
    assert out.count("kvm_mmu_set_accessed_bit: gpa 200000") == 1
    assert "kvm_mmu_set_dirty_bit: gpa 203000" in out
    assert v[0] == 0x201000 | PR | RW and v[1536] == 0x5000 | PR | RW
    with pytest.raises(P.GpaReadOnlyError):
        mem.write_u64(0x200000, 0)


# --- EPT ----------------------------------------------------------------------

R_, W_, X_ = 1, 2, 4
WB = 6 << 3


def ept_tables(m):
    m.q(0x1000, 0x2000 | R_ | W_ | X_)
    m.q(0x2000, 0x3000 | R_ | W_ | X_)
    m.q(0x3000, 0x4000 | R_ | W_ | X_)
    m.q(0x4000 + 8 * 1, 0x11000 | R_ | WB)                   # read-only
    m.q(0x4000 + 8 * 2, 0x12000 | X_ | WB)                   # execute-only
    m.q(0x4000 + 8 * 3, 0x13000 | W_ | WB)                   # write-only: misconfig
    m.q(0x3000 + 8 * 1, 0x400000 | R_ | W_ | X_ | WB | PS)   # 2 MiB


def eptp(root=0x1000, ad=True, levels=4):
    return root | ((levels - 1) << 3) | 6 | (0x40 if ad else 0)


def test_ept_permissions_misconfig_and_exit_qualification():
    m = Mem()
    ept_tables(m)
    mmu = P.GuestMmu.ept(m.mem, eptp(), INTEL, execonly=True)
    R, Wr, X = U, W, F                                      # EPT: PFERR U means read
    assert mmu.walk_addr(0x1234, R).gpa == 0x11234
    f = mmu.walk_addr(0x1234, Wr).fault
    assert f.error_code == 1 | W and f.nested_page_fault
    assert f.exit_qualification == P.EPT_VIOLATION_ACC_WRITE | (R_ << 3)
    f = mmu.walk_addr(0x2000, R).fault                      # execute-only page read
    assert f.error_code == 1 | U and f.exit_qualification == P.EPT_VIOLATION_ACC_READ | (X_ << 3)
    f = mmu.walk_addr(0x2000, X).fault is None
    f = mmu.walk_addr(0x3000, R).fault                      # W without R: misconfiguration
    assert f.error_code == 1 | 8 | U and f.exit_qualification == 0
    f = mmu.walk_addr(0x7000, X).fault                      # not present; F never reported
    assert f.error_code == 0 and f.exit_qualification == P.EPT_VIOLATION_ACC_INSTR
    assert mmu.walk_addr(0x200123, Wr).gpa == 0x400123
    noexec = P.GuestMmu.ept(m.mem, eptp(), INTEL, execonly=False)
    assert noexec.walk_addr(0x2000, X).fault.error_code & 8


def test_ept_a_d_bits_only_with_eptp_ad():
    m = Mem()
    ept_tables(m)
    P.GuestMmu.ept(m.mem, eptp(ad=False), INTEL).walk_addr(0x200000, W)
    assert m.q(0x3008) == 0x400000 | R_ | W_ | X_ | WB | PS
    w, out = lines(lambda: P.GuestMmu.ept(m.mem, eptp(ad=True), INTEL).walk_addr(0x200000, W))
    assert m.q(0x3008) == 0x400000 | R_ | W_ | X_ | WB | PS | (1 << 8) | (1 << 9)
    assert m.q(0x1000) & (1 << 8) and not m.q(0x1000) & (1 << 9)
    assert out[-2:] == ["kvm_mmu_set_accessed_bit: gpa 3008", "kvm_mmu_set_dirty_bit: gpa 3008"]


def test_nested_l2_walk_translates_tables_through_ept():
    m = Mem()
    # L1's EPT: identity for L2 gpas 0..2M except that L2 page 0x8 maps to L1 0x20000.
    m.q(0x1000, 0x2000 | 7)
    m.q(0x2000, 0x3000 | 7)
    m.q(0x3000, 0x4000 | 7)
    for i in range(512):
        m.q(0x4000 + 8 * i, (i << 12) | 7 | WB)
    m.q(0x4000 + 8 * 8, 0x20000 | 7 | WB)
    m.q(0x4000 + 8 * 0x30, 0)                               # L2 gpa 0x30000 unmapped in EPT
    ept = P.GuestMmu.ept(m.mem, eptp(), INTEL)
    # L2's 4-level tables at L2 gpas 0x8000.. (the first lives at L1 0x20000).
    m.q(0x20000, 0x9000 | PR | RW)
    m.q(0x9000, 0xa000 | PR | RW)
    m.q(0xa000, 0xb000 | PR | RW)
    m.q(0xb000 + 8 * 1, 0x8000 | PR | RW)                   # L2 va 0x1000 -> L2 gpa 0x8000
    m.q(0xb000 + 8 * 2, 0x30000 | PR | RW)                  # L2 va 0x2000 -> L2 gpa 0x30000
    l2 = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x8000), INTEL, nested=ept)
    assert l2.cpu_role.base.guest_mode
    w = l2.walk_addr(0x1010, 0)
    assert w.ok and w.gpa == 0x20010                        # L2 gpa 0x8010 -> L1 0x20010
    assert w.table_gfn[3] == 0x8                            # L2 gfns, as the kernel records them
    f = l2.walk_addr(0x2000, W).fault
    assert f.nested_page_fault and f.address == 0x30000 and f.error_code == W | U
    # EPT A/D got set for the table pages read through it.
    assert m.q(0x4000 + 8 * 8) & (1 << 8)


# --- paging off, batch, bad input --------------------------------------------

def test_nonpaging_is_identity():
    m = Mem()
    mmu = P.GuestMmu(m.mem, P.CpuState.nonpaging(), INTEL)
    w, out = lines(lambda: mmu.walk_addr(0x123456, W))
    assert w.ok and w.gpa == 0x123456 and w.level == 0 and out == []


def test_batch_equals_scalar_walks():
    m1, m2 = Mem(), Mem()
    for m in (m1, m2):
        long_tables(m)
        m.q(0x4000 + 8 * 7, 0)
        m.q(0x4000 + 8 * 8, 0x8000 | PR | RW | NX)
    gvas = np.array([0x7000, 0x8000, 0x1000, 0x201000, 0x40000000, 0x5000, 0x1000],
                    dtype=np.uint64)
    mmu1 = P.GuestMmu(m1.mem, P.CpuState.long_mode(cr3=0x1000), INTEL)
    mmu2 = P.GuestMmu(m2.mem, P.CpuState.long_mode(cr3=0x1000), INTEL)
    with tp.capture(*WALKER_EVENTS) as ring:
        res = mmu1.walk_array(gvas, F)
    with tp.capture(*WALKER_EVENTS) as ring2:
        ws = [mmu2.walk_addr(int(g), F) for g in gvas]
    assert ring.lines() == ring2.lines()
    assert np.array_equal(m1.ram, m2.ram)
    for r, w in zip(res, ws):
        assert int(r["gpa"]) == w.gpa
        assert bool(r["flags"] & P.WALK_FAULT) == (not w.ok)
        assert r["error_code"] == (w.fault.error_code if w.fault else 0)
        assert r["level"] == w.level and r["pte_access"] == (w.pte_access if w.ok else 0)


@pytest.mark.parametrize("cpu,model,exc", [
    (P.CpuState.long_mode(cr3=0x1000, smep=True), P.GuestCpuModel(smep=False), P.CpuStateError),
    (P.CpuState.long_mode(cr3=0x1000, pke=True), P.GuestCpuModel(pku=False), P.CpuStateError),
    (P.CpuState.long_mode(cr3=0x1000, la57=True), P.GuestCpuModel(la57=False), P.CpuStateError),
    (P.CpuState.long_mode(cr3=0x1000, nxe=True), P.GuestCpuModel(nx=False), P.CpuStateError),
    (P.CpuState.long_mode(cr3=1 << 47), P.GuestCpuModel(maxphyaddr=46), P.CpuStateError),
    (P.CpuState(cr0=P.X86_CR0_PG, cr4=0, efer=0), P.GuestCpuModel(), P.CpuStateError),
    (P.CpuState(cr0=P.X86_CR0_PE | P.X86_CR0_PG, cr4=0, efer=P.EFER_LME | P.EFER_LMA),
     P.GuestCpuModel(), P.CpuStateError),
    (P.CpuState.legacy32(cr3=1 << 32), P.GuestCpuModel(), P.CpuStateError),
    (P.CpuState(cpl=4), P.GuestCpuModel(), P.CpuStateError),
])
def test_bad_cpu_state_is_refused(cpu, model, exc):
    m = Mem()
    long_tables(m)
    before = m.ram.copy()
    with pytest.raises(exc):
        P.GuestMmu(m.mem, cpu, model)
    assert np.array_equal(m.ram, before)


@pytest.mark.parametrize("access", [P.PFERR_RSVD_MASK, P.PFERR_PK_MASK, P.PFERR_SS_MASK,
                                    1 << 15, 1 << 32, -1, "w", 1 << 64])
def test_bad_access_is_refused_and_nothing_changes(access):
    m = Mem()
    long_tables(m)
    before = m.ram.copy()
    mmu = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000), INTEL)
    with tp.capture(*WALKER_EVENTS) as ring:
        with pytest.raises((P.AccessError, TypeError)):
            mmu.walk_addr(0x1000, access)
        with pytest.raises((P.AccessError, TypeError, OverflowError)):
            mmu.walk_array(np.array([0x1000], np.uint64), access)
    assert np.array_equal(m.ram, before) and ring.lines() == []


def test_bad_gva_eptp_and_memory_are_refused():
    m = Mem()
    long_tables(m)
    mmu32 = P.GuestMmu(m.mem, P.CpuState.legacy32(cr3=0x1000), INTEL)
    with pytest.raises(P.AccessError):
        mmu32.walk_addr(1 << 32)
    with pytest.raises(P.AccessError):
        mmu32.walk_array(np.array([1 << 32], np.uint64))
    for bad in (eptp() | 1, eptp(levels=3), eptp() | (1 << 7), eptp() | (1 << 50)):
        with pytest.raises(P.EptpError):
            P.GuestMmu.ept(m.mem, bad, INTEL)
    with pytest.raises(P.EptpError):
        P.GuestMmu.ept(m.mem, eptp(ad=True), INTEL, ad_supported=False)
    mem = P.GuestMemory(np.zeros(0x2000, np.uint8))
    for base, buf in ((0x1000, np.zeros(0x1000, np.uint8)), (0x3001, np.zeros(0x1000, np.uint8)),
                      (0x4000, np.zeros(0x800, np.uint8)), (0x4000, b"\0" * 4096)):
        with pytest.raises(P.GuestMemoryError):
            mem.add_slot(base, buf)
    assert mem.slots == [(0, 0x2000, False)]
    with pytest.raises(P.GpaNotMappedError):
        mem.read_u64(0x1ffc)
    with pytest.raises(P.PagingError):
        P.GuestCpuModel(maxphyaddr=60)
    with pytest.raises(P.PagingError):
        P.GuestCpuModel(vendor="via")


def test_pferr_and_fault_text():
    assert P.pferr_str(0x27) == "P|W|U|PK"
    assert str(P.PageFault(0x11, 0x71000)) == "#PF error_code=0x11 (P|F) address=0x71000"
    with pytest.raises(P.PageFaultError) as e:
        m = Mem()
        P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000), INTEL).gva_to_gpa(0x1000)
    assert e.value.fault.address == 0x1000


def test_guest_cpu_model_from_cpuid():
    vendor = (int.from_bytes(b"Auth", "little"), int.from_bytes(b"cAMD", "little"),
              int.from_bytes(b"enti", "little"))
    entries = [(0, 0, 0xd, vendor[0], vendor[1], vendor[2]),
               (7, 0, 0, (1 << 7) | (1 << 20), (1 << 3), 0),
               (0x80000001, 0, 0, 0, 0, (1 << 20) | (1 << 26) | (1 << 29)),
               (0x80000008, 0, 0x3027, 0, 0, 0)]
    assert P.GuestCpuModel.from_cpuid(entries) == P.GuestCpuModel(
        vendor="amd", maxphyaddr=39, gbpages=True, nx=True, smep=True, smap=True, pku=True,
        la57=False, lm=True)
    assert P.GuestCpuModel.from_cpuid([]).maxphyaddr == 36


def test_walk_array_refuses_arrays_it_would_have_to_convert():
    # A float gva would be truncated and a negative int64 would wrap: refused.
    m = Mem()
    long_tables(m)
    mmu = P.GuestMmu(m.mem, P.CpuState.long_mode(cr3=0x1000), INTEL)
    before = m.ram.copy()
    with pytest.raises(TypeError, match="gvas must have dtype uint64, not float64"):
        mmu.walk_array(np.array([4096.7]))
    with pytest.raises(TypeError, match="gvas must have dtype uint64, not int64"):
        mmu.walk_array(np.array([-1], np.int64))
    with pytest.raises(TypeError, match="gvas must be a numpy.ndarray"):
        mmu.walk_array([0x1000])
    assert np.array_equal(m.ram, before)
