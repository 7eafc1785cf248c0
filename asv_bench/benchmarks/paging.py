"""Guest page-table walks (kvmmmu.paging).

These benchmarks depend on kvmmmu.paging and its C core kvmmmu._core.guest_walk
(which uses kvmmmu._core.spte for the reserved-bit masks and
kvmmmu._core.role for the CPU role).

The target: at least 1M 4-level batch walks per second.  ``WalkArray`` walks
``n_gvas`` random 4 KiB-mapped gvas of a guest with 1 GiB of identity-mapped
4 KiB pages (512 page tables), with A/D already set so that the timed walks
are pure reads; rate = n_gvas / time.  ``WalkAddr`` is the scalar twin (one
Python call per walk).  Tracing is off, as in production use.
"""
import numpy as np

from kvmmmu import paging as P

N_GVAS = [1 << 16, 1 << 20]
GIB_PAGES = 1 << 18


def make_guest(levels=4):
    """A guest whose first GiB is mapped with 4 KiB pages; returns (mem, mmu)."""
    tables = 4 + 512                          # PML5/PML4/PDPT/PD + 512 PTs
    ram = np.zeros((tables + 2) * 4096, np.uint8)
    q = ram.view(np.uint64)
    flags = 0x1 | 0x2 | 0x4 | 0x20 | 0x40    # P W U A D
    pml5, pml4, pdpt, pd, pt0 = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
    q[pml5 // 8] = pml4 | flags
    q[pml4 // 8] = pdpt | flags
    q[pdpt // 8] = pd | flags
    q[pd // 8:pd // 8 + 512] = (pt0 + 4096 * np.arange(512, dtype=np.uint64)) | flags
    q[pt0 // 8:pt0 // 8 + GIB_PAGES] = (np.arange(GIB_PAGES, dtype=np.uint64) << 12) | flags
    mem = P.GuestMemory(ram)
    cr3 = pml5 if levels == 5 else pml4
    model = P.GuestCpuModel(la57=levels == 5)
    mmu = P.GuestMmu(mem, P.CpuState.long_mode(cr3=cr3, la57=levels == 5), model)
    return mem, mmu


class WalkArray:
    params = ([4, 5], N_GVAS)
    param_names = ["levels", "n_gvas"]

    def setup(self, levels, n_gvas):
        rng = np.random.default_rng(1234)
        self.mem, self.mmu = make_guest(levels)
        self.gvas = (rng.integers(0, GIB_PAGES, n_gvas, dtype=np.uint64) << np.uint64(12)) | np.uint64(0x123)
        self.out = np.empty(n_gvas, dtype=P.WALK_DTYPE)
        self.mmu.walk_array(self.gvas, P.PFERR_WRITE_MASK, out=self.out)     # warm

    def time_walk_array(self, levels, n_gvas):
        self.mmu.walk_array(self.gvas, P.PFERR_WRITE_MASK, out=self.out)

    def peakmem_walk_array(self, levels, n_gvas):
        self.mmu.walk_array(self.gvas, P.PFERR_WRITE_MASK, out=self.out)


class WalkAddr:
    params = [[4], [1 << 12]]
    param_names = ["levels", "n_gvas"]

    def setup(self, levels, n_gvas):
        rng = np.random.default_rng(1234)
        self.mem, self.mmu = make_guest(levels)
        self.gvas = [int(g) << 12 for g in rng.integers(0, GIB_PAGES, n_gvas)]
        self.mmu.walk_addr(self.gvas[0], 0)

    def time_walk_addr(self, levels, n_gvas):
        walk = self.mmu.walk_addr
        for g in self.gvas:
            walk(g, P.PFERR_WRITE_MASK)


class WalkAddrTraced:
    """``WalkAddr`` with the five walker tracepoints on and one subscriber
    (records drained from the call's own buffer to :mod:`kvmmmu.mmutrace`)."""
    params = [[4], [1 << 12]]
    param_names = ["levels", "n_gvas"]

    def setup(self, levels, n_gvas):
        from kvmmmu import mmutrace as T
        self.T = T
        rng = np.random.default_rng(1234)
        self.mem, self.mmu = make_guest(levels)
        self.gvas = [int(g) << 12 for g in rng.integers(0, GIB_PAGES, n_gvas)]
        self.events = ("kvm_mmu_pagetable_walk", "kvm_mmu_paging_element",
                       "kvm_mmu_set_accessed_bit", "kvm_mmu_set_dirty_bit", "kvm_mmu_walker_error")
        self.seen = []
        T.enable(*self.events)
        T.subscribe(self.seen.append)

    def teardown(self, levels, n_gvas):
        self.T.unsubscribe(self.seen.append)
        self.T.disable(*self.events)

    def time_walk_addr_traced(self, levels, n_gvas):
        walk = self.mmu.walk_addr
        for g in self.gvas:
            walk(g, P.PFERR_WRITE_MASK)
        self.seen.clear()
