"""The simulated host: physical memory, page tables, huge pages, events."""
import numpy as np
import pytest

from kvmmmu.host import (
    KVM_PFN_ERR_FAULT, KVM_PFN_ERR_HWPOISON, KVM_PFN_ERR_NEEDS_IO, PMD_SIZE, PUD_SIZE,
    PTE_PRESENT, PTE_SWAP, HostConfig, HostMm, HostMmError, HostOutOfMemoryError, HostPhysMem,
    MmuNotifier, hva_to_pfn,
)

MiB = 1 << 20


class Log(MmuNotifier):
    def __init__(self):
        self.ev = []

    def invalidate_range_start(self, mm, rng):
        self.ev.append(("start", rng.start, rng.end, int(rng.event)))

    def invalidate_range_end(self, mm, rng):
        self.ev.append(("end", rng.start, rng.end))


@pytest.fixture
def mm():
    mm = HostMm(HostConfig())
    mm.log = Log()
    mm.mmu_notifier_register(mm.log)
    yield mm
    assert mm.audit() == []


def test_allocator_alignment_and_reuse():
    p = HostPhysMem(base_pfn=0x101, mem_bytes=1 << 32)
    a = p.alloc_pages(3)
    assert a.tolist() == [0x101, 0x102, 0x103]
    h = p.alloc_huge(9, 2)
    assert (h % 512 == 0).all() and h[1] - h[0] == 512
    g = p.alloc_huge(18)
    assert g[0] % (1 << 18) == 0
    free_before = p.nr_free
    assert free_before > 0                                        # alignment holes are kept
    p.free_pages(a)
    assert p.alloc_pages(3).tolist() == sorted(a.tolist())        # reused (LIFO block)
    p.free_huge(9, h[:1])
    assert p.alloc_huge(9)[0] == h[0]
    with pytest.raises(HostOutOfMemoryError):
        p.alloc_pages(1 << 21)
    assert p.nr_allocated + p.nr_free == p.carved


def test_thp_populate_is_contiguous_aligned_and_levels(mm):
    hva = mm.mmap(5 * MiB + 8192, thp=True, populate=True)
    assert hva % PMD_SIZE == 0
    lv = mm.host_pfn_mapping_level_array(hva + np.arange(0, 5 * MiB + 8192, 4096, dtype=np.uint64))
    assert (lv[:1024] == 2).all() and (lv[1024:] == 1).all()      # 2 THPs + 258 pages
    pfn, fl = mm.hva_to_pfn_array(hva + np.arange(0, 2 * MiB, 4096, dtype=np.uint64))
    assert pfn[0] % 512 == 0 and (np.diff(pfn.astype(np.int64)) == 1).all()
    assert (fl & PTE_PRESENT).all()
    assert mm.host_pfn_mapping_level(hva + 5 * MiB) == 1
    assert mm.host_pfn_mapping_level(hva - 4096) == 1            # nothing mapped
    assert mm.log.ev == []                                        # populating needs no notifier


def test_hugetlb_1g_and_alignment_rules(mm):
    hva = mm.mmap(PUD_SIZE, hugetlb="1G", populate=True)
    assert hva % PUD_SIZE == 0
    assert mm.host_pfn_mapping_level(hva + 12345 * 4096) == 3
    pfn = mm.follow_pte(hva)[0]
    assert pfn % (1 << 18) == 0
    assert mm.split_huge_pmd(hva, PUD_SIZE) == 0                 # hugetlb does not split
    with pytest.raises(HostMmError):
        mm.munmap(hva, PMD_SIZE)                                  # must be 1G aligned
    with pytest.raises(HostMmError):
        HostMm(HostConfig(gbpages=False)).mmap(PUD_SIZE, hugetlb="1G")
    h2 = mm.mmap(4 * MiB, hugetlb="2M")
    pfn, w = hva_to_pfn(mm, h2 + 3 * MiB + 5 * 4096, write_fault=True)
    assert w and mm.host_pfn_mapping_level(h2 + 3 * MiB) == 2
    assert mm.follow_pte(h2 + 2 * MiB)[0] % 512 == 0
    mm.munmap(hva, PUD_SIZE)
    assert mm.log.ev[-2][0] == "start" and mm.log.ev[-2][1:3] == (hva, hva + PUD_SIZE)


def test_hva_to_pfn_semantics(mm):
    rw = mm.mmap(MiB)
    ro = mm.mmap(MiB, writable=False)
    z, w = hva_to_pfn(mm, rw, write_fault=False)
    assert z == mm.zero_pfn and not w
    p, w = hva_to_pfn(mm, rw, write_fault=True)
    assert p != mm.zero_pfn and w
    assert mm.log.ev[0][0] == "start"                          # COW of the zero page
    q, w = hva_to_pfn(mm, rw + 4096, write_fault=False, want_writable=True)
    assert q == mm.zero_pfn and not w
    assert hva_to_pfn(mm, ro, write_fault=True) == (KVM_PFN_ERR_FAULT, False)
    assert hva_to_pfn(mm, ro, write_fault=False)[0] == mm.zero_pfn
    assert hva_to_pfn(mm, 0x1000, write_fault=False) == (KVM_PFN_ERR_FAULT, False)
    shared = mm.mmap(MiB, shared=True)
    s, w = hva_to_pfn(mm, shared, write_fault=False)
    assert s != mm.zero_pfn and w                               # shared: real page, writable PTE
    assert mm.swap_out(shared, 4096) == 0                        # shmem swap is not modelled
    assert mm.follow_pte(shared)[2] & PTE_SWAP == 0
    priv = mm.mmap(MiB, populate=True)
    mm.swap_out(priv, 8192)
    assert mm.follow_pte(priv)[2] == PTE_SWAP
    assert hva_to_pfn(mm, priv, write_fault=False, no_wait=True)[0] == KVM_PFN_ERR_NEEDS_IO
    assert hva_to_pfn(mm, priv, write_fault=False)[1]            # swapped in writable
    mm.memory_failure(priv + 4096 * 5)
    assert hva_to_pfn(mm, priv + 4096 * 5, write_fault=False) == (KVM_PFN_ERR_HWPOISON, False)


def test_every_change_of_a_present_pte_is_bracketed(mm):
    """Each start has its end, ranges are page aligned, and events use the
    event types Linux uses."""
    hva = mm.mmap(8 * MiB, thp=True, populate=True)
    mm.split_huge_pmd(hva + 2 * MiB)
    mm.collapse_huge_page(hva + 2 * MiB)
    mm.migrate_pages(hva, 4 * MiB)
    mm.swap_out(hva + 4 * MiB, 1 * MiB)
    mm.mprotect(hva, 8 * MiB, writable=False)
    mm.munmap(hva + 6 * MiB, 2 * MiB)
    starts = [e for e in mm.log.ev if e[0] == "start"]
    ends = [e for e in mm.log.ev if e[0] == "end"]
    assert len(starts) == len(ends) and not mm.open_invalidations
    assert all(e[1] % 4096 == 0 and e[2] % 4096 == 0 for e in starts)
    kinds = [e[3] for e in starts]
    assert kinds[-1] == 0                       # MMU_NOTIFY_UNMAP
    assert 2 in kinds                           # MMU_NOTIFY_PROTECTION_VMA


def test_random_event_sequences_keep_invariants():
    rng = np.random.default_rng(1234)
    mm = HostMm(HostConfig())
    vmas = [mm.mmap(16 * MiB, thp=True), mm.mmap(8 * MiB), mm.mmap(8 * MiB, hugetlb="2M"),
            mm.mmap(4 * MiB, shared=True)]
    sizes = {vmas[0]: 16 * MiB, vmas[1]: 8 * MiB, vmas[2]: 8 * MiB, vmas[3]: 4 * MiB}
    for step in range(300):
        base = vmas[int(rng.integers(len(vmas)))]
        if mm.find_vma(base) is None:
            continue
        off = int(rng.integers(0, sizes[base] // 4096)) * 4096
        hva = base + off
        op = int(rng.integers(8))
        n = int(rng.choice([4096, 65536, PMD_SIZE]))
        n = min(n, sizes[base] - off)
        vma = mm.find_vma(hva)
        if vma is None:
            continue
        if op == 0:
            hva_to_pfn(mm, hva, write_fault=bool(rng.integers(2)))
        elif op == 1:
            mm.populate(hva, n, write=bool(rng.integers(2)) and vma.writable)
        elif op == 2:
            mm.split_huge_pmd(hva, n)
        elif op == 3:
            mm.collapse_huge_page(hva)
        elif op == 4:
            mm.migrate_pages(hva, n)
        elif op == 5:
            mm.swap_out(hva, n)
        elif op == 6:
            mm.age(hva, n)
        elif op == 7 and not vma.hugetlb:
            mm.memory_failure(hva)
        problems = mm.audit()
        assert problems == [], (step, op, problems)
    mm.exit_mmap()
    with pytest.raises(HostMmError):
        mm.mmap(4096)


def test_from_system_reads_this_machine():
    hc = HostConfig.from_system()
    assert 32 <= hc.maxphyaddr <= 52
    assert hc.tdp in ("ept", "npt", None)


def test_audit_catches_corruption():
    mm = HostMm(HostConfig())
    hva = mm.mmap(4 * MiB, thp=True, populate=True)
    small = mm.mmap(64 * 1024, populate=True)
    assert mm.audit() == []
    v = mm.find_vma(small)
    v.pfn[3] = v.pfn[4]
    assert any("mapped twice" in p for p in mm.audit())
    v.pfn[3] = mm.follow_pte(hva)[0] + 7                  # inside a THP
    assert any("mapped twice" in p for p in mm.audit())
    mm2 = HostMm(HostConfig())
    h = mm2.mmap(64 * 1024, populate=True)
    mm2.phys.free_pages(mm2.find_vma(h).pfn[2:3])
    assert any("free list" in p for p in mm2.audit())
    mm3 = HostMm(HostConfig())
    h = mm3.mmap(4 * MiB, thp=True, populate=True)
    mm3.find_vma(h).pfn[7] += 1                           # breaks contiguity
    assert any("contiguous" in p for p in mm3.audit())
