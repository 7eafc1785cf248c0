"""The vCPU's architectural state as the MMU sees it (x86.c): CR0/CR3/CR4/EFER
loads with their #GP rules, which loads reset the MMU context or switch the
pgd, the requests they leave and how ``vcpu_enter_guest`` services them; and
the VM's guest memory contents (``vm.guest_memory``, ``read_guest``,
``write_guest``, ``kvm_vcpu_write_guest``, ``kvm_page_track_write``).

The expectations are the rules of x86.c (``kvm_set_cr0``/``kvm_post_set_cr0``,
``kvm_set_cr4``/``kvm_post_set_cr4``, ``kvm_set_cr3``/``kvm_invalidate_pcid``,
``set_efer``, ``vcpu_enter_guest``), written out as tables."""
import struct

import numpy as np
import pytest

from kvmmmu import paging as P
from kvmmmu._core.guest_walk import GpaNotMappedError, GpaReadOnlyError
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmmmu.mmu import MmuBackend
from kvmmmu.vm import VM, CrLoadError

PE, PG, WP = P.X86_CR0_PE, P.X86_CR0_PG, P.X86_CR0_WP
ET, NW, CD = 1 << 4, 1 << 29, 1 << 30
PAE, PSE, SMEP, LA57, PGE = P.X86_CR4_PAE, P.X86_CR4_PSE, P.X86_CR4_SMEP, P.X86_CR4_LA57, 1 << 7
LME, LMA, NX = P.EFER_LME, P.EFER_LMA, P.EFER_NX


class SpyMmu(MmuBackend):
    """A fault MMU that records the per-vCPU calls the vCPU state makes."""
    is_tdp = False
    direct = False

    def __init__(self):
        self.calls = []

    def kvm_mmu_unload(self, vcpu):
        self.calls.append("unload")
        vcpu.mmu_root = None

    def kvm_mmu_load(self, vcpu):
        self.calls.append("load")
        vcpu.mmu_root = object()

    def free_obsolete_roots(self, vcpu):
        self.calls.append("free_obsolete_roots")

    def kvm_mmu_new_pgd(self, vcpu, pgd):
        self.calls.append(("new_pgd", pgd, vcpu.cpu.cr3))

    def kvm_mmu_sync_roots(self, vcpu):
        self.calls.append("sync_roots")

    def kvm_mmu_sync_prev_roots(self, vcpu):
        self.calls.append("sync_prev_roots")

    def kvm_mmu_invlpg(self, vcpu, gva):
        self.calls.append(("invlpg", gva))

    def kvm_mmu_track_write(self, vcpu, gpa, new):
        self.calls.append(("track_write", gpa, new, vcpu.vm.read_guest(gpa, len(new))))


def _vm(mmu="shadow", **kw):
    vm = VM(mmu, backend=None, **kw)
    spy = SpyMmu()
    vm.register_mmu(spy)
    vm.mmu_backend = spy
    vm.add_memory(0, 1 << 21)
    return vm, vm.vcpus[0], spy


def _long_mode(v):
    v.kvm_set_cr4(PAE)
    v.kvm_set_efer(LME | NX)
    v.kvm_set_cr3(0x1000)
    v.kvm_set_cr0(PE | PG | WP)


def test_a_new_vcpu_has_paging_off():
    vm, v, _ = _vm()
    assert v.cpu == P.CpuState.nonpaging()
    assert v.walk_mmu.root_level == 0 and v.walk_mmu.gva_to_gpa(0x1234) == 0x1234


def test_entering_long_mode_sets_lma_and_resets_the_context_once_per_role_change():
    vm, v, spy = _vm()
    v.kvm_set_cr4(PAE)                 # role bit: reset
    v.kvm_set_efer(LME | NX)           # role bits: reset
    v.kvm_set_cr3(0x1000)              # new pgd
    v.kvm_set_cr0(PE | PG | WP)        # PG and WP: reset
    assert v.cpu.efer == LME | LMA | NX and v.cpu.cr0 == PE | PG | WP | ET
    assert spy.calls == ["unload", "unload", ("new_pgd", 0x1000, 0), "unload"]
    assert v.walk_mmu.root_level == 4


@pytest.mark.parametrize("cr4_change, reset, req", [
    (PSE, True, None),                  # role bit
    (SMEP, True, "KVM_REQ_TLB_FLUSH_CURRENT"),   # role bit; setting SMEP flushes
    (PGE, False, "KVM_REQ_TLB_FLUSH_GUEST"),     # not a role bit; toggling PGE flushes all
    (1 << 9, False, None),              # OSFXSR: nothing for the MMU
])
def test_cr4_changes_reset_and_flush_as_kvm_post_set_cr4(cr4_change, reset, req):
    vm, v, spy = _vm()
    _long_mode(v)
    spy.calls.clear()
    v.requests.clear()
    v.kvm_set_cr4(PAE | cr4_change)
    assert (spy.calls == ["unload"]) is reset and (spy.calls == []) is not reset
    assert v.requests == ({req} if req else set())


def test_cr0_wp_resets_and_other_bits_do_not():
    vm, v, spy = _vm()
    _long_mode(v)
    spy.calls.clear()
    v.kvm_set_cr0(PE | PG)                       # WP off: role bit
    assert spy.calls == ["unload"]
    v.kvm_set_cr0(PE | PG | (1 << 5))            # NE: not a role bit
    assert spy.calls == ["unload"]


def test_cr3_load_switches_pgd_first_then_asks_for_sync_and_flush():
    vm, v, spy = _vm()
    _long_mode(v)
    spy.calls.clear()
    v.requests.clear()
    v.kvm_set_cr3(0x5000)
    # kvm_mmu_new_pgd sees the old CR3 still in place
    assert spy.calls == [("new_pgd", 0x5000, 0x1000)] and v.cpu.cr3 == 0x5000
    assert v.requests == {"KVM_REQ_MMU_SYNC", "KVM_REQ_TLB_FLUSH_CURRENT"}
    v.requests.clear()
    v.kvm_set_cr3(0x5000)                        # same value: no new pgd, still the flush
    assert spy.calls == [("new_pgd", 0x5000, 0x1000)]
    assert v.requests == {"KVM_REQ_MMU_SYNC", "KVM_REQ_TLB_FLUSH_CURRENT"}


def test_cr3_load_with_tdp_asks_for_a_guest_flush():
    vm, v, spy = _vm("tdp")
    _long_mode(v)
    v.requests.clear()
    v.kvm_set_cr3(0x5000)
    assert v.requests == {"KVM_REQ_TLB_FLUSH_GUEST"}


def test_vcpu_enter_guest_services_requests_in_the_kernels_order():
    vm, v, spy = _vm()
    _long_mode(v)
    spy.calls.clear()
    v.stat.tlb_flush = 0
    for r in ("KVM_REQ_TLB_FLUSH_GUEST", "KVM_REQ_TLB_FLUSH_CURRENT", "KVM_REQ_MMU_SYNC",
              "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS", "KVM_REQ_LOAD_MMU_PGD"):
        v.kvm_make_request(r)
    v.vcpu_enter_guest()
    assert spy.calls == ["free_obsolete_roots", "sync_roots", "sync_roots", "sync_prev_roots",
                         "load"]
    assert v.requests == set() and v.stat.tlb_flush == 2
    # a full flush covers the current-context one
    v.kvm_make_request("KVM_REQ_TLB_FLUSH")
    v.kvm_make_request("KVM_REQ_TLB_FLUSH_CURRENT")
    v.vcpu_enter_guest()
    assert v.stat.tlb_flush == 3 and spy.calls.count("load") == 1        # root still loaded


def test_a_guest_flush_with_tdp_does_not_sync():
    vm, v, spy = _vm("tdp")
    v.kvm_make_request("KVM_REQ_TLB_FLUSH_GUEST")
    v.vcpu_enter_guest()
    assert spy.calls == ["load"] and v.stat.tlb_flush == 1


GP_CASES = [
    ("kvm_set_cr0", 1 << 32, "63:32"),
    ("kvm_set_cr0", PE | NW, "NW"),
    ("kvm_set_cr0", PG, "PG without"),
    ("kvm_set_cr0", PE, "64-bit mode"),                  # clearing PG in long mode
    ("kvm_set_cr4", PAE | (1 << 17), "not support"),    # PCIDE
    ("kvm_set_cr4", 0, "PAE in long mode"),
    ("kvm_set_cr4", PAE | LA57, "LA57"),
    ("kvm_set_cr3", 1 << 48, "MAXPHYADDR"),
    ("kvm_set_efer", LME | NX | (1 << 12), "reserved"),
    ("kvm_set_efer", NX, "LME while paging"),
]


@pytest.mark.parametrize("method, value, match", GP_CASES)
def test_refused_loads_raise_and_change_nothing(method, value, match):
    vm, v, spy = _vm()
    _long_mode(v)
    spy.calls.clear()
    v.requests.clear()
    before = (v.cpu, v.pdptrs, v.walk_mmu)
    with pytest.raises(CrLoadError, match=match):
        getattr(v, method)(value)
    assert (v.cpu, v.pdptrs, v.walk_mmu) == before and spy.calls == [] and v.requests == set()


def test_enabling_long_mode_without_pae_is_refused():
    vm, v, spy = _vm()
    v.kvm_set_efer(LME)
    with pytest.raises(CrLoadError, match="CR4.PAE"):
        v.kvm_set_cr0(PE | PG)
    assert not v.cpu.cr0 & PG


def test_features_the_guest_lacks_are_refused():
    vm, v, spy = _vm()
    v.set_guest_model(P.GuestCpuModel(nx=False, smep=False))
    with pytest.raises(CrLoadError, match="NX"):
        v.kvm_set_efer(NX)
    with pytest.raises(CrLoadError, match="SMEP"):
        v.kvm_set_cr4(SMEP)
    with pytest.raises(TypeError):
        v.set_guest_model("intel")
    with pytest.raises(Exception):
        v.kvm_set_cr0(-1)


def test_pae_paging_loads_pdptrs_at_cr_loads_not_at_walks():
    vm, v, spy = _vm()
    pdpt = 0x3000
    vm.write_guest(pdpt, struct.pack("<4Q", 0x4000 | 1, 0, 0, 0))
    vm.write_guest(0x4000, struct.pack("<Q", 0x5000 | 1))          # PD[0] -> PT
    vm.write_guest(0x5000 + 8 * 7, struct.pack("<Q", 0x9000 | 1))  # gva 0x7000 -> 0x9000
    v.kvm_set_cr4(PAE)
    v.kvm_set_cr3(pdpt)
    v.kvm_set_cr0(PE | PG)
    assert v.pdptrs == (0x4001, 0, 0, 0)
    assert v.walk_mmu.gva_to_gpa(0x7000) == 0x9000
    # the guest rewrites its PDPT: the cached PDPTEs stay until the next CR3 load
    vm.write_guest(pdpt, struct.pack("<Q", 0))
    v._walk_mmu = None
    assert v.walk_mmu.gva_to_gpa(0x7000) == 0x9000
    v.kvm_set_cr3(pdpt)
    assert v.pdptrs == (0, 0, 0, 0)
    # a PDPTE with reserved bits makes the load #GP and leaves the old ones
    vm.write_guest(pdpt, struct.pack("<Q", 0x4000 | 1 | (1 << 5)))  # bit 5 reserved in a PDPTE
    with pytest.raises(CrLoadError, match="load_pdptrs"):
        v.kvm_set_cr3(pdpt)
    assert v.pdptrs == (0, 0, 0, 0)


def test_invlpg_goes_to_the_mmu_and_is_counted():
    vm, v, spy = _vm()
    v.kvm_mmu_invlpg(0xdead000)
    assert spy.calls == [("invlpg", 0xdead000)] and v.stat.invlpg == 1
    with pytest.raises(Exception):
        v.kvm_mmu_invlpg(-1)
    assert v.stat.invlpg == 1


# -- guest memory --------------------------------------------------------------

def test_guest_memory_follows_the_memslots_and_the_host_bytes():
    vm = VM("tdp_mmu")
    vm.add_memory(0, 1 << 21)
    s = vm.add_memory(1 << 30, 1 << 21, flags=KVM_MEM_READONLY)
    vm.write_guest(0x1ff8, b"12345678abcdefgh")                   # crosses a page
    assert vm.read_guest(0x1ff8, 16) == b"12345678abcdefgh"
    vma = vm.host.find_vma(vm.memslots[0].id_to_memslot(0).userspace_addr)
    assert bytes(vma.data[0x1ff8:0x2008]) == b"12345678abcdefgh"
    vm.write_guest(1 << 30, b"ro")                                 # the VMM may write a RO slot
    assert vm.read_guest(1 << 30, 2) == b"ro"
    with pytest.raises(GpaReadOnlyError):
        vm.vcpus[0].kvm_vcpu_write_guest(1 << 30, b"x")           # KVM may not
    mem = vm.guest_memory()
    assert vm.guest_memory() is mem                               # cached
    vm.delete_memslot(s.id)
    assert vm.guest_memory() is not mem and not vm.guest_memory().is_mapped(1 << 30)
    with pytest.raises(GpaNotMappedError):
        vm.read_guest(1 << 30, 1)


def test_a_write_that_leaves_the_slots_changes_nothing():
    vm = VM("tdp_mmu")
    vm.add_memory(0, 1 << 21)
    with pytest.raises(GpaNotMappedError):
        vm.write_guest((1 << 21) - 4, b"12345678")
    assert vm.read_guest((1 << 21) - 4, 4) == b"\0" * 4


def test_kvm_writes_mark_pages_dirty_and_vmm_writes_do_not():
    vm = VM("tdp_mmu")
    s = vm.add_memory(0, 1 << 21, flags=KVM_MEM_LOG_DIRTY_PAGES)
    vm.write_guest(0x3000, b"v")
    vm.vcpus[0].kvm_vcpu_write_guest(0x5ffe, b"kvm!")              # gfns 5 and 6
    bm = vm.get_dirty_log(s.id)
    bits = np.unpackbits(bm.view(np.uint8), bitorder="little")
    assert set(np.flatnonzero(bits)) == {5, 6}


def test_page_track_write_writes_then_tells_the_mmu():
    vm, v, spy = _vm()
    v.kvm_page_track_write(0x2004, b"\x11\x22")
    assert spy.calls == [("track_write", 0x2004, b"\x11\x22", b"\x11\x22")]
    with pytest.raises(GpaNotMappedError):
        v.kvm_page_track_write(1 << 21, b"\x00")
    assert len(spy.calls) == 1


def test_contents_survive_a_host_migration_and_go_with_munmap():
    vm = VM("tdp_mmu")
    s = vm.add_memory(0, 1 << 21, populate=True)
    vm.write_guest(0x1000, b"keep")
    assert vm.host.migrate_pages(s.userspace_addr, 1 << 21) > 0
    assert vm.read_guest(0x1000, 4) == b"keep"
    vm.host.munmap(s.userspace_addr, 1 << 21)
    assert not vm.guest_memory().is_mapped(0x1000)


def test_a_walk_that_sets_a_d_bits_dirties_the_table_pages():
    vm = VM("shadow", backend=None)
    s = vm.add_memory(0, 1 << 21, flags=KVM_MEM_LOG_DIRTY_PAGES)
    v = vm.vcpus[0]
    # PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000; gva 0x5000 -> gpa 0x6000
    for table, entry, nxt in ((0x1000, 0, 0x2000), (0x2000, 0, 0x3000), (0x3000, 0, 0x4000),
                              (0x4000, 5, 0x6000)):
        vm.write_guest(table + 8 * entry, struct.pack("<Q", nxt | 7))
    vm.write_guest(0x2000, struct.pack("<Q", 0x3000 | 7 | (1 << 5)))       # PDPTE already accessed
    v.kvm_set_cr4(PAE)
    v.kvm_set_efer(LME | NX)
    v.kvm_set_cr3(0x1000)
    v.kvm_set_cr0(PE | PG | WP)
    vm.get_dirty_log(s.id)                         # start from a clean log
    w = v.walk_addr(0x5000, P.PFERR_WRITE_MASK)
    assert w.ok and w.gfn == 6 and w.ad_written == 0b1011
    bits = np.unpackbits(vm.get_dirty_log(s.id).view(np.uint8), bitorder="little")
    assert set(np.flatnonzero(bits)) == {1, 3, 4}
    w = v.walk_addr(0x5000, P.PFERR_WRITE_MASK)   # A and D already set: nothing written
    assert w.ad_written == 0
    assert not np.unpackbits(vm.get_dirty_log(s.id).view(np.uint8)).any()


def test_vmm_and_kvm_writes_fault_the_host_pages_in_writable():
    vm = VM("tdp_mmu")
    s = vm.add_memory(0, 1 << 21)
    vma = vm.host.find_vma(s.userspace_addr)
    vm.write_guest(0x3000, b"code")
    vm.vcpus[0].kvm_vcpu_write_guest(0x7000, b"data")
    present = np.flatnonzero(vma.pte & 1)
    assert list(present) == [3, 7]
    from kvmmmu.host import hva_to_pfn
    r = hva_to_pfn(vm.host, s.userspace_addr + 0x3000, write_fault=False)
    assert r[1] is True                              # a read fault may map it writable


def test_a_remote_flush_is_a_pending_request_of_every_vcpu_and_an_ipi_only_when_needed():
    vm = VM("tdp_mmu", nr_vcpus=2)
    vm.add_memory(0, 1 << 21)
    a, b = vm.vcpus
    for v in (a, b):
        v.vcpu_enter_guest()
    base = (vm.stat.remote_tlb_flush_requests, vm.stat.remote_tlb_flush, a.stat.tlb_flush)
    vm.kvm_flush_remote_tlbs()                       # both vCPUs outside guest mode: no IPI
    assert (vm.stat.remote_tlb_flush_requests, vm.stat.remote_tlb_flush) == (base[0] + 1, base[1])
    vm.arena.set_vcpu_mode(1, 1)                     # vCPU 1 IN_GUEST_MODE: it gets kicked
    vm.kvm_flush_remote_tlbs()
    assert vm.stat.remote_tlb_flush == base[1] + 1
    a.vcpu_enter_guest()
    assert a.stat.tlb_flush == base[2] + 1           # two flushes, one pending request
    a.vcpu_enter_guest()
    assert a.stat.tlb_flush == base[2] + 1
    v3 = vm.create_vcpu()                            # a later vCPU owes nothing
    v3.vcpu_enter_guest()
    assert v3.stat.tlb_flush == 0
