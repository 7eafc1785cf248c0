"""A bare C radix-tree map: the baseline of the TDP MMU's speed figures.

The issue asks the TDP MMU's batch map to be "within 3x of a bare C
radix-tree map of the same gfns".  :class:`BareRadixMap` is that map: the
same tree shape as a 4-level EPT/NPT root (512 entries of 8 bytes per 4 KiB
table, 9 gfn bits per level), built with plain stores into tables carved
from 2 MiB malloc'd chunks, with none of what the TDP MMU adds: no SPTE
format, no cmpxchg, no change handler or page statistics, no caches, no
headers, no RCU, no arena.  A table entry is the child table's address with
bits 0-2 set; a leaf is ``pfn << 12 | leaf_bits``, plus bit 7 above 4K.

:meth:`BareRadixMap.shadow_fault` is the shadow MMU's baseline: the guest
walk of a 4-level guest table plus the same tree insert, nothing else.

Nothing cimports this module (a bench module, like ``lockless_torture``);
``benchmarks/compare_tdp.py`` and ``asv_bench/benchmarks/core_tdp.py`` time
it against :class:`kvmmmu._core.tdp_mmu.TdpMmuCore`.
"""

from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport free, realloc

cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)
from libc.string cimport memset

import numpy as np

from kvmmmu._core.argcheck cimport u64_arg, s32_arg
from kvmmmu._core._checks import check_array as _check_array, out_array as _out_array

cdef enum:
    BARE_LEVELS = 4
    BARE_ENTRIES = 512
    BARE_TABLES_PER_CHUNK = 512         # 2 MiB of tables per malloc

cdef uint64_t BARE_TABLE_BITS = 0x7     # R/W/X on a table entry
cdef uint64_t BARE_HUGE = 0x80          # PS: a leaf above 4K
cdef uint64_t BARE_PFN_MASK = ((<uint64_t>1 << 52) - 1) & ~(<uint64_t>0xfff)

TABLE_BYTES = 4096
LEVELS = BARE_LEVELS


cdef inline int _index(uint64_t gfn, int level) noexcept nogil:
    return <int>((gfn >> (9 * (level - 1))) & (BARE_ENTRIES - 1))


cdef class BareRadixMap:
    """A 4-level radix tree of 4 KiB tables mapping gfns to pfns.

    ``map(gfns, pfns, level)`` stores one leaf per gfn at `level` (1 = 4K,
    2 = 2M, 3 = 1G), allocating the tables on the way down; an empty entry
    or a huge leaf in the way is replaced by a fresh table (the huge leaf is
    dropped, not split); a table replaced by a huge leaf stays allocated,
    unreachable, until the map is freed.  ``walk(gfns)`` returns, per gfn,
    the last entry on its path (a leaf, or an empty entry: 0) and its level,
    as ``kvm_tdp_mmu_get_walk`` does.

    Only the argument checks (done before the nogil loop) separate a Python
    caller from the C loop.  One thread at a time: a second thread calling
    while a call runs gets :class:`~kvmmmu.errors.ConcurrentUseError`.
    """
    cdef uint64_t **chunks
    cdef Py_ssize_t n_chunks_, cap_chunks, used   # tables handed out in the last chunk
    cdef uint64_t *root
    cdef readonly uint64_t leaf_bits
    cdef readonly Py_ssize_t n_tables
    cdef bint busy

    def __cinit__(self):
        self.chunks = NULL
        self.root = NULL

    def __init__(self, *, leaf_bits=0xb77):
        cdef uint64_t bits = u64_arg(leaf_bits, "leaf_bits")
        if bits == 0 or bits & (BARE_PFN_MASK | BARE_HUGE):
            raise ValueError(f"leaf_bits={bits:#x} must be non-zero and clear of bit 7 and "
                             f"the pfn bits 12..51")
        if self.root != NULL:
            raise RuntimeError("BareRadixMap.__init__ called twice")
        self.leaf_bits = bits
        self.root = self._alloc_table()
        if self.root == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.n_chunks_):
            free(self.chunks[i])
        free(self.chunks)

    cdef uint64_t *_alloc_table(self) noexcept nogil:
        # A zeroed 4 KiB table from the last chunk, or NULL if malloc fails.
        cdef uint64_t **grown
        cdef uint64_t *t
        if self.n_chunks_ == 0 or self.used == BARE_TABLES_PER_CHUNK:
            if self.n_chunks_ == self.cap_chunks:
                grown = <uint64_t **>realloc(self.chunks, (2 * self.cap_chunks + 16) * sizeof(uint64_t *))
                if grown == NULL:
                    return NULL
                self.chunks = grown
                self.cap_chunks = 2 * self.cap_chunks + 16
            t = <uint64_t *>aligned_alloc(4096, BARE_TABLES_PER_CHUNK * 4096)
            if t == NULL:
                return NULL
            self.chunks[self.n_chunks_] = t
            self.n_chunks_ += 1
            self.used = 0
        t = self.chunks[self.n_chunks_ - 1] + self.used * BARE_ENTRIES
        self.used += 1
        self.n_tables += 1
        memset(t, 0, 4096)
        return t

    cdef int _claim(self) except -1:
        if self.root == NULL:
            from kvmmmu.errors import ObjectInitError
            raise ObjectInitError("BareRadixMap.__init__ has not run")
        if self.busy:
            from kvmmmu.errors import ConcurrentUseError
            raise ConcurrentUseError("BareRadixMap: another thread is using this map")
        self.busy = True
        return 0

    @property
    def nbytes(self):
        """Bytes of tables malloc'd (whole chunks)."""
        return self.n_chunks_ * BARE_TABLES_PER_CHUNK * 4096

    def map(self, gfns, pfns, level):
        """Map ``gfns[i] -> pfns[i]`` (uint64, aligned to `level`, gfns below
        2**36, pfns below 2**40) with a leaf at `level`, in one nogil loop."""
        cdef int goal = s32_arg(level, "level")
        if not 1 <= goal <= 3:
            raise ValueError(f"level={goal} is outside 1..3")
        _check_array("gfns", gfns)
        _check_array("pfns", pfns)
        if pfns.shape[0] != gfns.shape[0]:
            raise ValueError(f"pfns has {pfns.shape[0]} entries, gfns {gfns.shape[0]}")
        cdef const uint64_t[::1] g = gfns
        cdef const uint64_t[::1] p = pfns
        cdef Py_ssize_t n = g.shape[0], i, done = 0
        cdef uint64_t align = (<uint64_t>1 << (9 * (goal - 1))) - 1
        for i in range(n):
            if (g[i] & align) or (p[i] & align) or g[i] >> 36 or p[i] >> 40:
                raise ValueError(f"gfns[{i}]={g[i]:#x} / pfns[{i}]={p[i]:#x}: not aligned to "
                                 f"level {goal}, gfn >= 2**36 or pfn >= 2**40")
        cdef uint64_t leaf_bits = self.leaf_bits | (BARE_HUGE if goal > 1 else 0)
        cdef uint64_t *t
        cdef uint64_t *child
        cdef uint64_t e
        cdef int lvl, idx
        self._claim()
        try:
            with nogil:
                for i in range(n):
                    t = self.root
                    lvl = BARE_LEVELS
                    while lvl > goal:
                        idx = _index(g[i], lvl)
                        e = t[idx]
                        if e == 0 or (e & BARE_HUGE):
                            child = self._alloc_table()
                            if child == NULL:
                                break
                            t[idx] = <uint64_t><uintptr_t>child | BARE_TABLE_BITS
                        else:
                            child = <uint64_t *><uintptr_t>(e & ~(<uint64_t>0xfff))
                        t = child
                        lvl -= 1
                    if lvl > goal:
                        break
                    t[_index(g[i], goal)] = (p[i] << 12) | leaf_bits
                    done = i + 1
        finally:
            self.busy = False
        if done < n:
            raise MemoryError(f"BareRadixMap.map: malloc failed after {done} of {n} gfns")

    def shadow_fault(self, memory, cr3, gvas, *, bint write=False):
        """The bare shadow-paging baseline: per gva (uint64, 4K aligned, below
        2**48), walk the guest's 4-level tables in `memory` (a writable
        ``uint64`` view of guest physical memory from gpa 0) from `cr3`,
        setting A bits (and D on the leaf for a `write`) as the CPU would,
        then map the gva's page onto the translated gfn (pfn == gfn) with a
        4K leaf in this tree, indexed by gva.  No roles, no hash, no rmaps,
        no shadow-page bookkeeping: the floor under a shadow MMU's fault.
        Returns the number of gvas mapped; stops at the first gva whose walk
        fails (not present or outside `memory`)."""
        _check_array("gvas", gvas)
        cdef uint64_t[::1] mem = memory
        cdef const uint64_t[::1] g = gvas
        cdef uint64_t root = u64_arg(cr3, "cr3") & BARE_PFN_MASK
        cdef Py_ssize_t n = g.shape[0], i, done = 0
        cdef Py_ssize_t nq = mem.shape[0]
        for i in range(n):
            if g[i] & 0xfff or g[i] >> 48:
                raise ValueError(f"gvas[{i}]={g[i]:#x} is not 4K aligned or is above 2**48")
        cdef uint64_t *t
        cdef uint64_t *child
        cdef uint64_t e, table, gfn, wbit, q
        cdef uint64_t ad = 0x20 | (0x40 if write else 0)
        cdef int lvl, idx
        cdef bint ok
        self._claim()
        try:
            with nogil:
                for i in range(n):
                    table = root
                    wbit = 2
                    lvl = 4
                    ok = False
                    while lvl > 0:
                        q = (table >> 3) + ((g[i] >> (12 + 9 * (lvl - 1))) & 511)
                        if <Py_ssize_t>q >= nq:
                            break
                        e = mem[q]
                        if not e & 1:
                            break
                        wbit &= e
                        if lvl == 1 or (lvl <= 3 and e & BARE_HUGE):
                            if (e & ad) != ad:
                                mem[q] = e | ad
                            gfn = ((e & BARE_PFN_MASK) >> 12) + (
                                (g[i] >> 12) & ((<uint64_t>1 << (9 * (lvl - 1))) - 1))
                            ok = True
                            break
                        if not e & 0x20:
                            mem[q] = e | 0x20
                        table = e & BARE_PFN_MASK
                        lvl -= 1
                    if not ok:
                        break
                    t = self.root
                    lvl = BARE_LEVELS
                    while lvl > 1:
                        idx = _index(g[i] >> 12, lvl)
                        e = t[idx]
                        if e == 0:
                            child = self._alloc_table()
                            if child == NULL:
                                break
                            t[idx] = <uint64_t><uintptr_t>child | BARE_TABLE_BITS
                        else:
                            child = <uint64_t *><uintptr_t>(e & ~(<uint64_t>0xfff))
                        t = child
                        lvl -= 1
                    if lvl > 1:
                        break
                    t[_index(g[i] >> 12, 1)] = (gfn << 12) | (self.leaf_bits & ~<uint64_t>2) | wbit
                    done = i + 1
        finally:
            self.busy = False
        return done

    def walk(self, gfns, *, out_spte=None, out_level=None):
        """``(sptes, levels)``: per gfn (uint64, below 2**36), the last entry
        on its path and that entry's level, in one nogil loop."""
        _check_array("gfns", gfns)
        cdef const uint64_t[::1] g = gfns
        cdef Py_ssize_t n = g.shape[0], i
        for i in range(n):
            if g[i] >> 36:
                raise ValueError(f"gfns[{i}]={g[i]:#x} is beyond what a 4-level tree maps")
        out_spte = _out_array("out_spte", out_spte, n, np.uint64, inputs=(gfns,))
        out_level = _out_array("out_level", out_level, n, np.int8, inputs=(gfns, out_spte))
        cdef uint64_t[::1] os = out_spte
        cdef signed char[::1] ol = out_level
        cdef uint64_t *t
        cdef uint64_t e
        cdef int lvl
        self._claim()
        try:
            with nogil:
                for i in range(n):
                    t = self.root
                    lvl = BARE_LEVELS
                    while True:
                        e = t[_index(g[i], lvl)]
                        if lvl == 1 or e == 0 or (e & BARE_HUGE):
                            break
                        t = <uint64_t *><uintptr_t>(e & ~(<uint64_t>0xfff))
                        lvl -= 1
                    os[i] = e
                    ol[i] = lvl
        finally:
            self.busy = False
        return out_spte, out_level
