"""kvmmmu.guest_tables (a guest's own tables, built vectorised) and the bare
shadow-fault baseline of the benchmarks (tdp_bench.BareRadixMap.shadow_fault),
both checked against the formula of the mapping and the model's walker."""
import numpy as np
import pytest

from kvmmmu import paging as P
from kvmmmu._core.tdp_bench import BareRadixMap
from kvmmmu.guest_tables import GuestPageTables
from kvmmmu.vm import VM

MiB, GiB = 1 << 20, 1 << 30


def _vm(size=64 * MiB):
    vm = VM("shadow", backend=None)
    vm.add_memory(0, size)
    return vm


def _long_mode(v, cr3):
    v.kvm_set_cr4(P.X86_CR4_PAE)
    v.kvm_set_efer(P.EFER_LME | P.EFER_NX)
    v.kvm_set_cr0(P.X86_CR0_PE | P.X86_CR0_PG | P.X86_CR0_WP)
    v.kvm_set_cr3(cr3)


@pytest.mark.parametrize("page_size", [4096, 2 * MiB, GiB])
def test_the_walker_sees_the_mapping_the_builder_wrote(page_size):
    vm = _vm(2 * GiB + 4 * MiB if page_size == GiB else 64 * MiB)
    gpt = GuestPageTables(vm, 0, 256)
    gva, gpa = (1 << 40) + page_size * 3, GiB if page_size == GiB else 8 * MiB
    size = page_size * (1 if page_size == GiB else 8)
    gpt.map(gva, gpa, size, page_size=page_size, writable=False, nx=True)
    v = vm.vcpus[0]
    _long_mode(v, gpt.cr3)
    rng = np.random.default_rng(0)
    for off in rng.integers(0, size, 50):
        w = v.walk_addr(gva + int(off), 0)
        assert w.ok and w.gpa == gpa + int(off)
        assert w.level == {4096: 1, 2 * MiB: 2, GiB: 3}[page_size]
        assert w.pte_access == P.ACC_USER_MASK          # read-only, NX
    w = v.walk_addr(gva, P.PFERR_WRITE_MASK)
    assert not w.ok
    w = v.walk_addr(gva + size, 0)
    assert not w.ok                                      # beyond the range
    assert gpt.tables_used == {4096: 4, 2 * MiB: 3, GiB: 2}[page_size]


def test_a_five_level_guest_and_bad_input():
    vm = _vm()
    gpt = GuestPageTables(vm, 0, 64, levels=5)
    gpt.map(1 << 50, 16 * MiB, 4096 * 3)
    v = vm.vcpus[0]
    v.set_guest_model(P.GuestCpuModel(la57=True))
    v.kvm_set_cr4(P.X86_CR4_PAE | P.X86_CR4_LA57)
    v.kvm_set_efer(P.EFER_LME)
    v.kvm_set_cr0(P.X86_CR0_PE | P.X86_CR0_PG)
    v.kvm_set_cr3(gpt.cr3)
    assert v.walk_addr((1 << 50) + 0x2010, 0).gpa == 16 * MiB + 0x2010
    used = gpt.tables_used
    for kw, match in (({"page_size": 8192}, "page_size"), ({"gva": 1 << 57}, "address space"),
                      ({"gva": 0x1001}, "aligned")):
        args = dict(gva=0, gpa=0, size=4096)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            gpt.map(**args)
    with pytest.raises(ValueError, match="already mapped"):
        gpt.map(1 << 50, 0, 4096)
    assert gpt.tables_used == used
    with pytest.raises(ValueError, match="memslot"):
        GuestPageTables(vm, 1 << 40, 4)
    with pytest.raises(MemoryError, match="full"):
        GuestPageTables(vm, 0, 2).map(0, 0, 2 * MiB * 600)


def test_the_bare_shadow_fault_maps_every_gva_to_its_gfn_and_sets_accessed():
    vm = _vm(64 * MiB)
    gpt = GuestPageTables(vm, 0, 64)
    gpt.map(0, 16 * MiB, 32 * MiB)
    gpt.map(1 << 39, 48 * MiB, 4 * MiB, page_size=2 * MiB, writable=False)
    gvas = np.concatenate([np.arange(0, 32 * MiB, 4096, dtype=np.uint64),
                           np.arange(1 << 39, (1 << 39) + 4 * MiB, 4096, dtype=np.uint64)])
    np.random.default_rng(1).shuffle(gvas)
    b = BareRadixMap()
    assert b.shadow_fault(gpt._q, gpt.cr3, gvas, write=False) == gvas.size
    sptes, levels = b.walk(gvas >> np.uint64(12))
    expect = np.where(gvas < (1 << 39), gvas + np.uint64(16 * MiB),
                      gvas - np.uint64(1 << 39) + np.uint64(48 * MiB)) >> np.uint64(12)
    assert (levels == 1).all() and ((sptes >> np.uint64(12)) == expect).all()
    writable = (sptes & np.uint64(2)) != 0
    assert (writable == (gvas < (1 << 39))).all()
    v = vm.vcpus[0]
    _long_mode(v, gpt.cr3)
    w = v.walk_addr(0x5000, 0)                          # A already set by the baseline
    assert w.ad_written == 0
    # an unmapped gva stops the loop
    assert b.shadow_fault(gpt._q, gpt.cr3, np.array([0, 1 << 45], dtype=np.uint64)) == 1


@pytest.mark.parametrize("levels", [4, 5])
def test_enter_long_mode_loads_the_boot_registers(levels):
    """``enter_long_mode`` is a guest kernel's switch to long mode on these
    tables: the SDM's register values (CR4.PAE, LA57 for 5 levels, EFER.LME
    and NX, CR0.PE|PG|WP; EFER.LMA set by the CPU), CR3 = the root, the CPL;
    the walk then translates through the tables."""
    vm = _vm()
    gpt = GuestPageTables(vm, 0, 64, levels=levels)
    gva = (1 << 50) if levels == 5 else (1 << 40)
    gpt.map(gva, 16 * MiB, 4096)
    v = vm.vcpus[0]
    if levels == 5:
        v.set_guest_model(P.GuestCpuModel(la57=True))
    gpt.enter_long_mode(v, cpl=0, nx=False)
    c = v.cpu
    assert c.cr4 & ((1 << 5) | (1 << 12)) == (1 << 5) | ((1 << 12) if levels == 5 else 0)
    assert c.efer & 0xD00 == 0x500                       # LME|LMA, no NX
    assert c.cr0 & 0x80010001 == 0x80010001              # PG|WP|PE
    assert c.cr3 == gpt.cr3 and c.cpl == 0
    assert v.walk_addr(gva + 0x10, 0).gpa == 16 * MiB + 0x10
