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
