"""The scalar fault path's shortcuts answer exactly what the general code does.

* ``host.hva_to_pfn_fast(..., fault_in=True)`` (faultin's scalar hva -> pfn)
  against ``host.hva_to_pfn`` on a twin mm: the same pfn and writability,
  the same PTEs, events and allocations, the same errors; the level it
  reports is the host mapping level or 0 (unknown);
* the VMA lookup hint never answers a VMA that munmap removed;
* ``vm.guest_memory`` and ``vcpu.walk_mmu`` caches: reused while nothing
  changed, rebuilt after a memslot change, bad ``as_id`` still refused;
* ``KvmPageFault``'s flags from the error code, and the lpage counters'
  argument checks.
"""
import threading

import numpy as np
import pytest

from kvmmmu import paging as P
from kvmmmu.errors import ConcurrentUseError
from kvmmmu.host import (
    HostConfig, HostMm, HostOutOfMemoryError, HostPhysMem, hva_to_pfn, hva_to_pfn_fast,
)
from kvmmmu.mmu import (
    PFERR_PRIVATE_ACCESS, KvmPageFault, kvm_mmu_gfn_allow_lpage, kvm_mmu_gfn_disallow_lpage,
)
from kvmmmu.vm import VM

MiB = 1 << 20
PAGES = 16


def _mm(zero_page=True):
    """An mm whose pages are in every state hva_to_pfn distinguishes: never
    mapped, the zero page, present writable / read-only, swapped out,
    hwpoisoned; in private, shared, read-only and THP VMAs."""
    mm = HostMm(HostConfig(), zero_page=zero_page)
    vmas = {
        "anon": mm.mmap(PAGES * 4096),
        "shared": mm.mmap(PAGES * 4096, shared=True),
        "ro": mm.mmap(PAGES * 4096, writable=False),
        "thp": mm.mmap(4 * MiB, thp=True),
    }
    a = vmas["anon"]
    mm.populate(a + 4096, 4096, write=False)              # the zero page
    mm.populate(a + 2 * 4096, 2 * 4096, write=True)       # present, writable
    mm.swap_out(a + 3 * 4096, 4096)
    mm.populate(a + 5 * 4096, 4096, write=True)
    mm.memory_failure(a + 5 * 4096)
    mm.populate(vmas["thp"], 2 * MiB, write=True)         # one huge leaf
    return mm, vmas


def _hvas(vmas):
    out = []
    for name, base in vmas.items():
        n = 1024 if name == "thp" else PAGES
        out += [base + i * 4096 for i in range(0, n, 1 if n == PAGES else 97)]
    out += [0x1000, max(vmas.values()) + 64 * MiB]       # no VMA
    return out


def _state(mm):
    return mm.snapshot(), dict(mm.events), mm.phys.nr_allocated, mm.phys.nr_free


@pytest.mark.parametrize("zero_page", [True, False])
@pytest.mark.parametrize("write", [False, True])
def test_scalar_hva_to_pfn_matches_the_general_path(zero_page, write):
    a, va = _mm(zero_page)
    b, vb = _mm(zero_page)
    assert va == vb and _state(a) == _state(b)
    for k, (ha, hb) in enumerate(zip(_hvas(va), _hvas(vb))):
        r = hva_to_pfn_fast(a, ha, write, True)
        pfn, writable = hva_to_pfn(b, hb, write_fault=write, want_writable=True)
        assert (r[0], r[1]) == (pfn, writable), (k, hex(ha))
        assert _state(a) == _state(b), (k, hex(ha))
        if r[2]:
            assert r[2] == a.host_pfn_mapping_level(ha), (k, hex(ha))
    assert a.audit() == [] and b.audit() == []


def test_scalar_slow_path_maps_the_zero_page_and_new_pages_with_level_4k():
    mm = HostMm(HostConfig())
    hva = mm.mmap(PAGES * 4096)
    assert hva_to_pfn_fast(mm, hva, False) is None
    assert hva_to_pfn_fast(mm, hva, False, True) == (mm.zero_pfn, False, 1)
    assert mm.events["faults"] == 1 and mm.events["zero_maps"] == 1
    pfn, w, lvl = hva_to_pfn_fast(mm, hva + 4096, True, True)
    assert w and lvl == 1 and pfn == mm.follow_pte(hva + 4096)[0] != mm.zero_pfn
    assert mm.events["faults"] == 2 and mm.audit() == []


def test_scalar_slow_path_out_of_memory_changes_no_pte():
    mm = HostMm(HostConfig(), phys=HostPhysMem(mem_bytes=4 * 4096))
    hva = mm.mmap(PAGES * 4096)
    for i in range(3):
        hva_to_pfn_fast(mm, hva + i * 4096, True, True)
    pte = mm.vmas[0].pte.copy()
    with pytest.raises(HostOutOfMemoryError):
        hva_to_pfn_fast(mm, hva + 3 * 4096, True, True)
    assert (mm.vmas[0].pte == pte).all() and not mm._guard.locked()


def test_scalar_slow_path_refuses_a_second_thread():
    mm = HostMm(HostConfig())
    hva = mm.mmap(PAGES * 4096)
    before = _state(mm)
    held, go = threading.Event(), threading.Event()

    def other():                        # another thread inside a mutating call
        with mm._guard:
            mm._owner = threading.get_ident()
            held.set()
            go.wait(10)
            mm._owner = None

    t = threading.Thread(target=other)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(ConcurrentUseError):
            hva_to_pfn_fast(mm, hva, False, True)
        assert _state(mm) == before
    finally:
        go.set()
        t.join()


def test_vma_hint_never_answers_an_unmapped_vma():
    mm = HostMm(HostConfig())
    a = mm.mmap(PAGES * 4096, populate=True)
    b = mm.mmap(PAGES * 4096, populate=True)
    assert hva_to_pfn_fast(mm, b + 4096, False) is not None       # hint: b's VMA
    mm.munmap(b, PAGES * 4096)
    assert hva_to_pfn_fast(mm, b + 4096, False) is None
    assert hva_to_pfn_fast(mm, b + 4096, False, True)[0] == hva_to_pfn(mm, b + 4096,
                                                                 write_fault=False)[0]
    assert hva_to_pfn_fast(mm, a, False) is not None


def test_guest_memory_cache_and_as_id_checks():
    vm = VM("shadow")
    vm.add_memory(0, 4 * MiB, slot=0)
    m = vm.guest_memory(0)
    assert vm.guest_memory(0) is m and vm.guest_memory() is m
    if vm.nr_memslot_as_ids > 1:
        vm.guest_memory(1)                  # cached: 1.0 (hashing like 1) must still be refused
    for bad, exc in ((1.0, TypeError), ("0", TypeError), (vm.nr_memslot_as_ids, ValueError),
                     (-1, ValueError)):
        with pytest.raises(exc, match="as_id"):
            vm.guest_memory(bad)
    vm.add_memory(8 * MiB, 4 * MiB, slot=1)
    m2 = vm.guest_memory(0)
    assert m2 is not m and m2.read(8 * MiB, 8) == bytes(8)


def test_walk_mmu_is_reused_until_something_changes():
    vm = VM("shadow")
    vm.add_memory(0, 4 * MiB, slot=0)
    v = vm.vcpus[0]
    w = v.walk_mmu
    assert v.walk_mmu is w and w.memory is vm.guest_memory(0)
    vm.add_memory(8 * MiB, 4 * MiB, slot=1)                 # new memslot generation
    w2 = v.walk_mmu
    assert w2 is not w and w2.memory is vm.guest_memory(0)
    v.kvm_set_cr4(P.X86_CR4_PAE)                            # new registers
    assert v.walk_mmu is not w2


@pytest.mark.parametrize("ec", range(32))
def test_fault_record_flags(ec):
    for extra in (0, PFERR_PRIVATE_ACCESS):
        f = KvmPageFault(0x1000, ec | extra)
        assert (f.present, f.write, f.user, f.rsvd, f.exec) == \
            tuple(bool(ec >> b & 1) for b in range(5))
        assert f.is_private == bool(extra) and f.prefetch is False and f.gfn == 0


def test_lpage_counter_arguments():
    vm = VM("shadow")
    slot = vm.add_memory(0, 4 * MiB, slot=0)
    info = [a.copy() for a in slot.arch.lpage_info]
    for bad, exc in ((1.0, TypeError), (1 << 10, ValueError), (-1, ValueError)):
        with pytest.raises(exc, match="gfn"):
            kvm_mmu_gfn_disallow_lpage(vm, slot, bad)
    assert all((a == b).all() for a, b in zip(info, slot.arch.lpage_info))
    kvm_mmu_gfn_disallow_lpage(vm, slot, np.int64(0x201))
    assert slot.arch.lpage_info[0][1] == info[0][1] + 1
    assert slot.arch.lpage_info[1][0] == info[1][0] + 1
    kvm_mmu_gfn_allow_lpage(vm, slot, 0x201)
    assert all((a == b).all() for a, b in zip(info, slot.arch.lpage_info))


def test_guest_memory_follows_the_vma_list():
    vm = VM("shadow")
    slot = vm.add_memory(0, 4 * MiB, slot=0)
    m = vm.guest_memory(0)
    gen = vm.host.vma_gen
    vm.host.munmap(slot.userspace_addr, 4 * MiB)        # the slot's bytes are gone
    assert vm.host.vma_gen != gen
    m2 = vm.guest_memory(0)
    assert m2 is not m and vm.guest_memory(0) is m2
    vm.host.mmap(4 * MiB, hva=slot.userspace_addr)      # mapped again: fresh bytes
    assert vm.guest_memory(0) is not m2


def _ring3_walker():
    from kvmmmu.guest_tables import GuestPageTables
    vm = VM("shadow")
    vm.add_memory(0, 8 * MiB, slot=0)
    gpt = GuestPageTables(vm, 0, 256)
    gpt.map(0, 4 * MiB, 4 * MiB)
    v = vm.vcpus[0]
    gpt.enter_long_mode(v, cpl=0)
    return vm, v


def test_walk_addr_in_one_call_answers_like_the_method():
    vm, v = _ring3_walker()
    w = v.walk_mmu
    assert w.walk_addr == w._ctx.walk_addr                  # the instance's one-call form
    rng = np.random.default_rng(5)
    for gva in [0, 0x1234, 8 * MiB, 1 << 47, (1 << 64) - 4096] + \
            [int(x) for x in rng.integers(0, 8 * MiB, 64)]:
        for acc in (0, P.PFERR_WRITE_MASK, P.PFERR_USER_MASK, P.PFERR_FETCH_MASK):
            a = w.walk_addr(gva, acc)
            b = P.GuestMmu.walk_addr(w, gva, acc)            # the Python method
            assert (a.gpa, a.level, a.pte_access, a.fault) == (b.gpa, b.level, b.pte_access, b.fault)
    for gva, acc in ((1.0, 0), (-1, 0), (1 << 64, 0), (0, 1.0), (0, -1), (0, P.PFERR_RSVD_MASK)):
        with pytest.raises(P.AccessError, match="gva|access"):
            w.walk_addr(gva, acc)


def test_walk_context_walk_addr_needs_its_binding():
    from kvmmmu._core.guest_walk import WalkContext
    vm, v = _ring3_walker()
    ctx = v.walk_mmu._ctx
    c2 = WalkContext.__new__(WalkContext)
    with pytest.raises(ValueError, match="bind_walk_addr"):
        c2.walk_addr(1.5, 0)
    with pytest.raises(TypeError, match="arg_check"):
        ctx.bind_walk_addr(1 << 48, None)
    with pytest.raises((TypeError, ValueError, OverflowError)):
        ctx.bind_walk_addr(-1, lambda a, b: (a, b))
    assert v.walk_mmu.walk_addr(0x1000, 0).gpa == 4 * MiB + 0x1000   # binding unchanged


@pytest.mark.parametrize("nslots", [1, 3, 8, 9, 12])
def test_search_memslots_scan_answers_like_the_search(nslots):
    vm = VM("shadow")
    for k in range(nslots):
        vm.add_memory((3 * k) * MiB, MiB + 4096 * k, slot=k)
    slots = vm.memslots[0]
    bases = np.array([s.base_gfn for s in slots._sorted], dtype=np.uint64)
    ends = np.array([s.base_gfn + s.npages for s in slots._sorted], dtype=np.uint64)
    for gfn in range(0, (3 * nslots + 1) * 256, 37):
        i = int(np.searchsorted(bases, np.uint64(gfn), side="right")) - 1
        want = slots._sorted[i] if i >= 0 and gfn < int(ends[i]) else None
        assert slots.search_memslots(gfn) is want
        assert slots.gfn_to_memslot(gfn) is want
    with pytest.raises(OverflowError):
        slots.search_memslots(1 << 64)
