"""The TDP MMU's iterator over one root (arch/x86/kvm/mmu/tdp_iter.c).

A pre-order walk of the paging structure under a root, over the gfn range
``[start, end)`` and down to ``min_level``:

* **start** records the root's table at ``pt_path[root_level - 1]`` and
  restarts; it leaves the iterator invalid for a root that is not a live
  header of the arena, a root level outside 1..5, or a start gfn that
  already holds ``gfn_bits``;
* **restart** goes back to the root level at ``next_last_level_gfn``
  (rounded down for the level), remembers it as ``yielded_gfn`` and reads
  the SPTE;
* **next** steps down (not at ``min_level``; the SPTE is read again first
  and must be a present non-leaf), else sideways (not past index 511:
  ``gfn`` moves by the entry's size and becomes ``next_last_level_gfn``),
  else up and sideways again; the walk is over when it cannot go up.  After a
  yield, next restarts instead;
* a table index is taken from ``gfn | gfn_bits`` (the alias bit of a TDX
  VM's shared half), while ``gfn`` itself never holds those bits.

Yielding (``tdp_mmu_iter_cond_resched``) needs forward progress:
``next_last_level_gfn != yielded_gfn``.  The model's ``need_resched()`` is
a budget of steps the caller sets (``tdp_resched.every``).

:class:`TdpIter` drives the same C steps from Python, one entry per
``next()``; :func:`kvm_tdp_mmu_get_walk` walks an array of gfns in one
nogil call.  Every handle the walk follows is checked against the arena
(root header, child tables), so an SPTE pointing outside it, or a freed
table's poison, ends the descent instead of reaching foreign memory.
"""
from libc.stdint cimport uint64_t, int64_t, uint32_t

import numpy as np

from kvmmmu._core.argcheck cimport u64_arg, s32_arg, s64_arg
from kvmmmu._core.types cimport sptep_t, make_sptep, spte_index
from kvmmmu._core.pt_arena_defs cimport (
    pt_arena_t, kvm_mmu_page, pt_sp_ptr, pt_slot, pt_read_once64, PT_SP_IN_USE, PT_SP_RCU_PENDING,
)
from kvmmmu._core.pt_arena cimport PtArena
from kvmmmu._core.role cimport role_level, role_as_id
from kvmmmu._core.spte cimport (
    SPTE_LEVEL_BITS, SPTE_ENT_PER_PAGE, PG_LEVEL_4K, PT64_ROOT_MAX_LEVEL,
    is_shadow_present_pte, is_last_spte, spte_to_pfn, spte_index_of,
)

from kvmmmu._core._checks import check_array as _check_array, out_array as _out_array

cdef extern from "tdp_iter_defs.h" nogil:
    size_t TDP_ITER_NR_FIELDS
    size_t TDP_ITER_SIZE
    const char *tdp_iter_field_name(size_t i)
    size_t tdp_iter_field_offset(size_t i)
    size_t tdp_iter_field_size(size_t i)


# ---------------------------------------------------------------------------
# The C steps
# ---------------------------------------------------------------------------

cdef bint tdp_mmu_iter_need_resched(tdp_iter *it, tdp_resched *r) noexcept nogil:
    """need_resched() (the step budget ran out) and forward progress made."""
    if r.every <= 0 or r.count < r.every:
        return False
    return it.next_last_level_gfn != it.yielded_gfn


cdef bint tdp_mmu_iter_cond_resched(tdp_iter *it, tdp_resched *r) noexcept nogil:
    """Yield if tdp_mmu_iter_need_resched(): mark the iterator yielded (the
    caller drops and retakes mmu_lock and RCU, flushing first if it owes a
    flush, then `continue`s: the next step restarts from the root).  Counts
    one step otherwise.  Never yields twice without a step between."""
    if it.yielded:
        return False
    if not tdp_mmu_iter_need_resched(it, r):
        r.count += 1
        return False
    r.count = 0
    r.nr_yields += 1
    it.yielded = True
    return True


# ---------------------------------------------------------------------------
# Python
# ---------------------------------------------------------------------------

def tdp_iter_layout():
    """``{field: (offset, size)}`` of the C ``struct tdp_iter`` (112 bytes,
    the kernel's v6.18 x86-64 layout), and ``"sizeof"``."""
    cdef size_t i
    out = {tdp_iter_field_name(i).decode(): (tdp_iter_field_offset(i), tdp_iter_field_size(i))
           for i in range(TDP_ITER_NR_FIELDS)}
    out["sizeof"] = TDP_ITER_SIZE
    return out


cdef int _check_root(PtArena arena, uint64_t root) except -1:
    cdef pt_arena_t *a = &arena.a
    if a.chunk_base == NULL:
        from kvmmmu.errors import ObjectInitError
        raise ObjectInitError("PtArena.__init__ has not run")
    if root == 0 or root > a.headers_hw or pt_slot(a, root - 1).sp_state != PT_SP_IN_USE:
        raise ValueError(f"root {root} is not a live sp of this arena")
    cdef int level = <int>role_level(pt_sp_ptr(a, root).role)
    if level < 1 or level > PT64_ROOT_MAX_LEVEL:
        raise ValueError(f"root {root} has role.level {level}, not 1..{PT64_ROOT_MAX_LEVEL}")
    return level


cdef class TdpIter:
    """``for_each_tdp_pte_min_level(iter, kvm, root, min_level, start, end)``
    from Python: each ``next()`` yields ``(gfn, level, sptep, old_spte)`` of
    the entry the C iterator is at, until it falls off the root or reaches
    ``end``.

    Parameters
    ----------
    arena : PtArena
    root : int
        sp handle of a live root (its ``role.level`` is the root level).
    start, end : int
        gfn range ``[start, end)``; ``start`` must not hold ``gfn_bits``.
    min_level : int
        Lowest level visited (1 = 4 KiB SPTEs).
    gfn_bits : int
        Bits OR-ed into the gfn for the table indexes (``kvm_gfn_root_bits``).
    resched_every : int
        The model's ``need_resched()``: true once this many steps passed
        since the last yield (0: never).  See :meth:`cond_resched`.

    The attributes mirror ``struct tdp_iter``.  Not thread-safe: one
    iterator per thread (the arena itself may be shared).
    """
    cdef tdp_iter it
    cdef tdp_resched r
    cdef readonly PtArena arena
    cdef readonly uint64_t root, start, end
    cdef bint _begun

    def __init__(self, PtArena arena not None, root, start, end, *, min_level=PG_LEVEL_4K,
                 gfn_bits=0, resched_every=0):
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef uint64_t c_start = u64_arg(start, "start")
        cdef uint64_t c_end = u64_arg(end, "end")
        cdef int c_min = s32_arg(min_level, "min_level")
        cdef uint64_t c_bits = u64_arg(gfn_bits, "gfn_bits")
        cdef int64_t every = s64_arg(resched_every, "resched_every")
        cdef int level = _check_root(arena, c_root)
        if every < 0:
            raise ValueError(f"resched_every={every} is negative")
        if not 1 <= c_min <= level:
            raise ValueError(f"min_level={c_min} is outside 1..{level} (the root level)")
        if c_start >> (SPTE_LEVEL_BITS * level):
            raise ValueError(f"start={c_start:#x} is beyond what a level-{level} root maps")
        if c_bits & (c_bits - 1):
            raise ValueError(f"gfn_bits={c_bits:#x} is not zero or a single bit")
        if c_bits and (c_start >= c_bits or c_end > c_bits):
            raise ValueError(f"[start, end) = [{c_start:#x}, {c_end:#x}) reaches gfn_bits {c_bits:#x}")
        self.arena = arena
        self.root, self.start, self.end = c_root, c_start, c_end
        self.r.every, self.r.count, self.r.nr_yields = every, 0, 0
        tdp_iter_start(&self.it, &arena.a, c_root, c_min, c_start, c_bits)
        self._begun = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.arena is None:
            raise StopIteration
        if self._begun:
            tdp_iter_next(&self.it, &self.arena.a)
        self._begun = True
        if not self.it.valid or self.it.gfn >= self.end:
            raise StopIteration
        return (self.it.gfn, self.it.level, self.it.sptep, self.it.old_spte)

    def cond_resched(self):
        """``tdp_mmu_iter_cond_resched``: True if the walk yields here (the
        step budget ran out and the walk made progress since its last
        (re)start); the next ``next()`` then restarts from the root at
        :attr:`next_last_level_gfn`.  Call it once per entry, first thing,
        as the kernel's loops do."""
        return bool(tdp_mmu_iter_cond_resched(&self.it, &self.r))

    @property
    def gfn(self):
        return self.it.gfn

    @property
    def level(self):
        return self.it.level

    @property
    def sptep(self):
        return self.it.sptep

    @property
    def old_spte(self):
        return self.it.old_spte

    @property
    def valid(self):
        return bool(self.it.valid)

    @property
    def yielded(self):
        return bool(self.it.yielded)

    @property
    def next_last_level_gfn(self):
        return self.it.next_last_level_gfn

    @property
    def yielded_gfn(self):
        return self.it.yielded_gfn

    @property
    def root_level(self):
        return self.it.root_level

    @property
    def min_level(self):
        return self.it.min_level

    @property
    def as_id(self):
        return self.it.as_id

    @property
    def gfn_bits(self):
        return self.it.gfn_bits

    @property
    def pt_path(self):
        """Table handle (entry 0) per level, index ``level - 1``; levels
        above the root or below the deepest reached read 0."""
        return tuple(self.it.pt_path[i] if self.it.level <= i + 1 <= self.it.root_level else 0
                     for i in range(PT64_ROOT_MAX_LEVEL))

    @property
    def nr_yields(self):
        return self.r.nr_yields

    def __repr__(self):
        return (f"TdpIter(root={self.root}, gfn={self.it.gfn:#x}, level={self.it.level}, "
                f"sptep={self.it.sptep:#x}, old_spte={self.it.old_spte:#x}, "
                f"valid={bool(self.it.valid)})")


def kvm_tdp_mmu_get_walk(PtArena arena not None, root, gfns, *, out_spte=None, out_level=None):
    """``kvm_tdp_mmu_get_walk`` for an array of gfns, in one nogil pass:
    walk from `root` to the last entry on the path of each gfn (a leaf, or
    the first non-present entry) and return ``(sptes, levels)``: that entry's
    value and level.

    The kernel reads under ``rcu_read_lock()`` (``kvm_tdp_mmu_walk_lockless_
    begin``); the model reads tables that a concurrent writer may free: a
    freed table reads as poison, which the walk never follows.  `gfns` is
    copied first, so another thread rewriting it cannot change what is read.
    """
    cdef uint64_t c_root = u64_arg(root, "root")
    _check_array("gfns", gfns)
    cdef Py_ssize_t n = gfns.shape[0], i
    out_spte = _out_array("out_spte", out_spte, n, np.uint64, inputs=(gfns,))
    out_level = _out_array("out_level", out_level, n, np.int8, inputs=(gfns, out_spte))
    cdef int root_level = _check_root(arena, c_root)
    cdef const uint64_t[::1] g = np.array(gfns, copy=True)
    cdef uint64_t[::1] os = out_spte
    cdef signed char[::1] ol = out_level
    cdef pt_arena_t *a = &arena.a
    cdef tdp_iter it
    cdef int leaf
    cdef uint64_t spte
    cdef Py_ssize_t bad = -1
    with nogil:
        for i in range(n):
            if g[i] >> (SPTE_LEVEL_BITS * root_level):
                bad = i
                break
            leaf = -1
            spte = 0
            tdp_iter_start(&it, a, c_root, PG_LEVEL_4K, g[i], kvm_gfn_root_bits(a, c_root))
            while it.valid and it.gfn <= g[i]:
                leaf = it.level
                spte = it.old_spte
                tdp_iter_next(&it, a)
            os[i] = spte
            ol[i] = leaf
    if bad >= 0:
        raise ValueError(f"gfns[{bad}]={g[bad]:#x} is beyond what a level-{root_level} root maps "
                         f"(out_spte/out_level hold the entries before it)")
    return out_spte, out_level
