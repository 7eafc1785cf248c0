"""Build a guest's own page tables in its memory (what a guest kernel does at
boot), vectorised so that a 4 GiB or 64 GiB guest takes a fraction of a
second.

:class:`GuestPageTables` writes x86-64 4-level or 5-level tables (the format
of ``paging.PTTYPE_64``) into one memslot of a :class:`~kvmmmu.vm.VM`,
through the memslot's host bytes (no page tracking, no dirty logging: the
VMM writes them, as a loader would).  Tables are carved from a region the
caller names; ``map`` maps a page-aligned gva range onto a gpa range with 4
KiB, 2 MiB or 1 GiB leaves and the given flags; ``cr3`` is the root to load.

Used by the benchmarks and tests that fault a whole guest in through its own
tables, and by the shadow MMU's batch path tests.  Invariants: every table
lies inside the table region and inside the memslot; a leaf never replaces a
table (mapping over an existing smaller mapping raises ``ValueError``).
"""
from __future__ import annotations

import numpy as np

from kvmmmu._core._checks import int_arg
from kvmmmu._core.defs import PAGE_SHIFT, PAGE_SIZE
from kvmmmu import paging as _pg
P, RW, US, PS, A, D = 1, 2, 4, 0x80, 0x20, 0x40
NX = 1 << 63
ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)
_LEVEL_SHIFT = {1: 12, 2: 21, 3: 30}


class GuestPageTables:
    """x86-64 page tables in one memslot of `vm`.

    Parameters
    ----------
    vm : VM
    table_gpa : int
        First gpa of the region the tables are carved from (page aligned).
    table_pages : int
        Size of that region in pages.
    levels : {4, 5}
        4-level (CR4.LA57=0) or 5-level paging.
    as_id : int
    """

    def __init__(self, vm, table_gpa: int, table_pages: int, *, levels: int = 4, as_id: int = 0):
        table_gpa = int_arg("table_gpa", table_gpa)
        table_pages = int_arg("table_pages", table_pages, 1, 1 << 40)
        if table_gpa % PAGE_SIZE:
            raise ValueError(f"table_gpa={table_gpa:#x} is not page aligned")
        if levels not in (4, 5):
            raise ValueError(f"levels must be 4 or 5, not {levels!r}")
        slot = vm.memslots[as_id].gfn_to_memslot(table_gpa >> PAGE_SHIFT)
        if slot is None:
            raise ValueError(f"table_gpa={table_gpa:#x} is not in a memslot")
        base = slot.base_gfn << PAGE_SHIFT
        if table_gpa + table_pages * PAGE_SIZE > base + (slot.npages << PAGE_SHIFT):
            raise ValueError("the table region does not fit in the memslot")
        vma = vm.host.find_vma(slot.userspace_addr)
        size = slot.npages << PAGE_SHIFT
        if vma is None or slot.userspace_addr + size > vma.end:
            raise ValueError("the memslot is not backed by one host mapping")
        off = slot.userspace_addr - vma.start
        #: the memslot's bytes as 64-bit entries, indexed by (gpa - slot base) // 8
        self._q = vma.data[off:off + size].view(np.uint64)
        self._base = base
        self.levels = levels
        self.table_gpa, self.table_pages = table_gpa, table_pages
        self._next = 0
        #: gpa of the root table (the value to load into CR3)
        self.cr3 = self._alloc(1)[0]

    @property
    def tables_used(self) -> int:
        return self._next

    def _alloc(self, n: int) -> np.ndarray:
        if self._next + n > self.table_pages:
            raise MemoryError(f"the table region ({self.table_pages} pages) is full")
        first = self.table_gpa + self._next * PAGE_SIZE
        self._next += n
        q0 = (first - self._base) >> 3
        self._q[q0:q0 + n * 512] = 0
        return first + PAGE_SIZE * np.arange(n, dtype=np.uint64)

    def _entries(self, table_gpas: np.ndarray, index: np.ndarray) -> np.ndarray:
        return ((table_gpas - np.uint64(self._base)) >> np.uint64(3)) + index.astype(np.uint64)

    def map(self, gva: int, gpa: int, size: int, *, page_size: int = PAGE_SIZE,
            writable: bool = True, user: bool = True, nx: bool = False,
            accessed: bool = False, dirty: bool = False) -> None:
        """Map ``[gva, gva + size)`` onto ``[gpa, gpa + size)`` with leaves of
        `page_size` (4 KiB, 2 MiB or 1 GiB).  Non-leaf entries get P|RW|US
        (and A when `accessed`), so the leaf flags decide the access."""
        gva, gpa = int_arg("gva", gva), int_arg("gpa", gpa)
        size = int_arg("size", size, 1)
        level = {PAGE_SIZE: 1, 1 << 21: 2, 1 << 30: 3}.get(page_size)
        if level is None:
            raise ValueError(f"page_size must be 4 KiB, 2 MiB or 1 GiB, not {page_size!r}")
        if (gva | gpa | size) % page_size:
            raise ValueError("gva, gpa and size must be aligned to page_size")
        if gva + size > 1 << (9 * self.levels + 12):
            raise ValueError(f"the gva range ends above the {self.levels}-level address space")
        if gpa + size > 1 << 52:
            raise ValueError("the gpa range ends above 2**52")
        shift = _LEVEL_SHIFT[level]
        n = size >> shift
        vas = np.uint64(gva) + (np.arange(n, dtype=np.uint64) << np.uint64(shift))
        tables = np.full(n, self.cr3, dtype=np.uint64)
        nonleaf = np.uint64(P | RW | US | (A if accessed else 0))
        for lvl in range(self.levels, level, -1):
            idx = (vas >> np.uint64(12 + 9 * (lvl - 1))) & np.uint64(511)
            ent = self._entries(tables, idx)
            # one child per distinct entry: allocate the missing ones
            uniq, first = np.unique(ent, return_index=True)
            cur = self._q[uniq.astype(np.int64)]
            if (cur & np.uint64(P)).any() and (cur[(cur & np.uint64(P)) != 0] & np.uint64(PS)).any():
                raise ValueError(f"a level-{lvl} leaf is in the way")
            missing = (cur & np.uint64(P)) == 0
            if missing.any():
                new = self._alloc(int(missing.sum()))
                cur[missing] = new | nonleaf
                self._q[uniq[missing].astype(np.int64)] = cur[missing]
            child = cur & np.uint64(ADDR_MASK)
            tables = child[np.searchsorted(uniq, ent)]
        idx = (vas >> np.uint64(shift)) & np.uint64(511)
        ent = self._entries(tables, idx).astype(np.int64)
        if (self._q[ent] & np.uint64(P)).any():
            raise ValueError("part of the gva range is already mapped")
        leaf = (np.uint64(gpa) + (np.arange(n, dtype=np.uint64) << np.uint64(shift))) | np.uint64(
            P | (RW if writable else 0) | (US if user else 0) | (PS if level > 1 else 0) |
            (A if accessed else 0) | (D if dirty else 0) | (NX if nx else 0))
        self._q[ent] = leaf

    def enter_long_mode(self, vcpu, *, cpl: int = 3, nx: bool = True, wp: bool = True) -> None:
        """Put `vcpu` in long mode on these tables, as a guest kernel's boot
        does, through the vCPU's own register loads (x86.c's checks, the MMU
        sees each change): CR4.PAE (and LA57 for 5 levels: the guest model
        must have it), EFER.LME (and NX), CR0.PE|PG (and WP), CR3 =
        :attr:`cr3`, then the CPL."""
        vcpu.kvm_set_cr4(_pg.X86_CR4_PAE | (_pg.X86_CR4_LA57 if self.levels == 5 else 0))
        vcpu.kvm_set_efer(_pg.EFER_LME | (_pg.EFER_NX if nx else 0))
        vcpu.kvm_set_cr0(_pg.X86_CR0_PE | _pg.X86_CR0_PG | (_pg.X86_CR0_WP if wp else 0))
        vcpu.kvm_set_cr3(self.cr3)
        vcpu.set_cpl(cpl)

    def read_entry(self, gpa: int) -> int:
        """The 64-bit entry at `gpa` (a table entry's address)."""
        return int(self._q[(int_arg("gpa", gpa) - self._base) >> 3])
