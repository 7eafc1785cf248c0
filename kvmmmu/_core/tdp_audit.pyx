"""The TDP MMU's invariants, checked by one nogil walk over the arena.

:func:`tdp_audit` walks every table under the given roots (depth first, the
tables' own entries, so a planted link cannot send it round a cycle: a table
is entered once) and checks, for the TDP MMU of tdp-mmu.md §12:

* **one parent per table**: a non-root table is linked from exactly one
  present non-leaf SPTE, no root is linked from one, and its header agrees
  with that SPTE (``role.level`` one below, ``gfn`` the entry's first gfn,
  ``ptep`` the entry);
* every non-leaf SPTE points to the table of a live sp of the arena;
* **no FROZEN SPTE** is left (outside a fault in flight);
* each present leaf lies **inside one memslot** of its root's address space
  and not above that slot's max mapping level (the slot's alignment and
  ``max_huge_page_level``: the caller passes them), and satisfies the
  **writable invariants** (``check_spte_writable_invariants``: W implies
  MMU-writable, MMU-writable implies Host-writable);
* every sp on the **possible NX huge page list** is a live, flagged TDP table
  that is linked.

It also counts the leaves per level and the linked non-root tables, which the
caller compares with ``pages_4k/2m/1g`` and ``tdp_mmu_pages`` (and checks
the roots' refcounts, which live in Python).  It takes the arena's writer
side for the walk (callers hold ``mmu_lock``), so no writer runs meanwhile.
"""
from libc.stdint cimport uint8_t, int8_t, uint64_t, int64_t
from libc.string cimport memset
from libc.stdlib cimport calloc, free

import numpy as np

from kvmmmu._core.types cimport make_sptep
from kvmmmu._core.pt_arena_defs cimport (
    pt_arena_t, kvm_mmu_page, pt_sp_ptr, pt_slot, pt_sptep_ptr, pt_page_sp, pt_read_once64,
    PT_SP_IN_USE,
)
from kvmmmu._core.pt_arena cimport PtArena
from kvmmmu._core.role cimport role_level, role_as_id
from kvmmmu._core.spte cimport (
    spte_fmt_t, SPTE_LEVEL_BITS, SPTE_ENT_PER_PAGE, PT64_ROOT_MAX_LEVEL,
    is_shadow_present_pte, is_large_pte, spte_to_pfn, is_frozen_spte,
)
from kvmmmu._core.mmu_spte cimport _spte_writable_invariants_ok
from kvmmmu._core.tdp_iter cimport kvm_gfn_root_bits

from kvmmmu._core._checks import check_array as _check_array, int_arg as _int_arg

cdef enum:
    P_FROZEN = 0        # a FROZEN SPTE
    P_BAD_CHILD = 1     # a non-leaf SPTE whose target is not the table of a live sp
    P_TWO_PARENTS = 2   # a table linked a second time (or a root linked as a child)
    P_HEADER = 3        # a child header disagreeing with its parent entry
    P_NO_SLOT = 4       # a leaf outside every memslot of its address space
    P_LEVEL = 5         # a leaf above its memslot's max mapping level
    P_WRITABLE = 6      # a leaf breaking the writable invariants
    P_NX = 7            # an sp on the NX list that is not a live, flagged, linked TDP table
    P_BAD_ROOT = 8      # a root handle that is not a live TDP root

#: Problem kinds (the ``kind`` field of :func:`tdp_audit`'s problems).
PROBLEM_KINDS = {P_FROZEN: "frozen", P_BAD_CHILD: "bad_child", P_TWO_PARENTS: "two_parents",
                 P_HEADER: "header", P_NO_SLOT: "no_slot", P_LEVEL: "level",
                 P_WRITABLE: "writable", P_NX: "nx", P_BAD_ROOT: "bad_root"}

#: One problem: which root (index into `roots`; -1 for the NX list), the
#: entry's gfn and level, and a value (the SPTE, the table pfn or the sp).
PROBLEM_DTYPE = np.dtype([("kind", np.int8), ("root", np.int32), ("gfn", np.uint64),
                          ("level", np.int8), ("value", np.uint64)])


ctypedef struct _problem:
    int8_t kind
    int root
    uint64_t gfn
    int8_t level
    uint64_t value


ctypedef struct _audit:
    const pt_arena_t *a
    const spte_fmt_t *f
    uint8_t *seen                   # per table index: entered already
    uint64_t ntables
    const uint64_t *sbase
    const uint64_t *snpages
    const int8_t *smax
    const int8_t *sas
    Py_ssize_t nslots
    Py_ssize_t last_slot
    _problem *out
    Py_ssize_t cap
    Py_ssize_t n                    # problems found (may exceed cap: the rest are counted)
    uint64_t leaves[PT64_ROOT_MAX_LEVEL + 1]
    uint64_t tables                 # linked non-root tables


cdef inline void _bad(_audit *w, int kind, int root, uint64_t gfn, int level,
                      uint64_t value) noexcept nogil:
    if w.n < w.cap:
        w.out[w.n].kind = <int8_t>kind
        w.out[w.n].root = root
        w.out[w.n].gfn = gfn
        w.out[w.n].level = <int8_t>level
        w.out[w.n].value = value
    w.n += 1


cdef inline uint64_t _pages(int level) noexcept nogil:
    return (<uint64_t>1) << ((level - 1) * SPTE_LEVEL_BITS)


cdef inline bint _table_of_live_sp(const pt_arena_t *a, uint64_t pfn, uint64_t *sp) noexcept nogil:
    if pfn < a.base_pfn or pfn - a.base_pfn >= pt_read_once64(&a.tables_hw):
        return False
    sp[0] = pt_page_sp(a, pfn)
    return sp[0] != 0 and sp[0] <= a.headers_hw and \
        pt_slot(a, sp[0] - 1).sp_state == PT_SP_IN_USE and pt_sp_ptr(a, sp[0]).spt == pfn


cdef inline void _check_leaf(_audit *w, int r, int as_id, uint64_t gfn, int level,
                             uint64_t spte) noexcept nogil:
    cdef Py_ssize_t s = w.last_slot, k
    cdef uint64_t end = gfn + _pages(level)
    w.leaves[level] += 1
    if not _spte_writable_invariants_ok(w.f, spte):
        _bad(w, P_WRITABLE, r, gfn, level, spte)
    if not (0 <= s < w.nslots and w.sas[s] == as_id and w.sbase[s] <= gfn and
            end <= w.sbase[s] + w.snpages[s]):
        s = -1
        for k in range(w.nslots):
            if w.sas[k] == as_id and w.sbase[k] <= gfn and end <= w.sbase[k] + w.snpages[k]:
                s = k
                break
        if s < 0:
            _bad(w, P_NO_SLOT, r, gfn, level, spte)
            return
        w.last_slot = s
    if level > w.smax[s]:
        _bad(w, P_LEVEL, r, gfn, level, <uint64_t>w.smax[s])


cdef void _walk_root(_audit *w, int r, uint64_t root_sp) noexcept nogil:
    """Depth first over the tables under `root_sp` (entered once each)."""
    cdef const pt_arena_t *a = w.a
    cdef kvm_mmu_page *h = pt_sp_ptr(a, root_sp)
    cdef kvm_mmu_page *ch
    cdef int top = <int>role_level(h.role), as_id = <int>role_as_id(h.role), lvl
    cdef uint64_t pfn[PT64_ROOT_MAX_LEVEL + 1]
    cdef uint64_t base[PT64_ROOT_MAX_LEVEL + 1]
    cdef int idx[PT64_ROOT_MAX_LEVEL + 1]
    cdef uint64_t spte, gfn, child_sp, cpfn
    # a TDX direct root is indexed with the shared bit: its gfns drop it
    cdef uint64_t alias = ~kvm_gfn_root_bits(a, root_sp)
    cdef int i
    lvl = top
    pfn[lvl] = h.spt
    base[lvl] = 0
    idx[lvl] = 0
    while True:
        if idx[lvl] == SPTE_ENT_PER_PAGE:
            if lvl == top:
                return
            lvl += 1
            continue
        i = idx[lvl]
        idx[lvl] += 1
        spte = pt_read_once64(pt_sptep_ptr(a, make_sptep(pfn[lvl], i)))
        gfn = (base[lvl] + <uint64_t>i * _pages(lvl)) & alias
        if is_frozen_spte(w.f, spte):
            _bad(w, P_FROZEN, r, gfn, lvl, spte)
            continue
        if not is_shadow_present_pte(spte):
            continue
        if lvl == 1 or is_large_pte(spte):
            _check_leaf(w, r, as_id, gfn, lvl, spte)
            continue
        cpfn = spte_to_pfn(spte)
        if not _table_of_live_sp(a, cpfn, &child_sp):
            _bad(w, P_BAD_CHILD, r, gfn, lvl, spte)
            continue
        if w.seen[cpfn - a.base_pfn]:
            _bad(w, P_TWO_PARENTS, r, gfn, lvl, cpfn)
            continue
        w.seen[cpfn - a.base_pfn] = 1
        w.tables += 1
        ch = pt_sp_ptr(a, child_sp)
        if <int>role_level(ch.role) != lvl - 1 or ch.gfn != gfn or \
                ch.ptep != make_sptep(pfn[lvl], i):
            _bad(w, P_HEADER, r, gfn, lvl, child_sp)
        lvl -= 1
        pfn[lvl] = cpfn
        base[lvl] = gfn
        idx[lvl] = 0


def tdp_audit(PtArena arena not None, roots, slot_base, slot_npages, slot_max_level,
              slot_as_id, nx_list=None, *, max_problems=1000):
    """Walk the TDP tables under `roots` (sp handles, uint64) and check the
    invariants of the module docstring.

    The memslots come as arrays of one entry per slot: ``slot_base`` and
    ``slot_npages`` (uint64), ``slot_max_level`` (int8: the highest level
    a leaf in the slot may have) and ``slot_as_id`` (int8).  `nx_list`
    (uint64 sp handles, or None) is ``possible_nx_huge_pages``.

    Returns ``(counts, problems)``: ``counts`` is ``{"leaves": {level: n},
    "tables": linked non-root tables, "problems": total found}``,
    ``problems`` a :data:`PROBLEM_DTYPE` array of the first `max_problems`.
    """
    cdef pt_arena_t *a = &arena.a
    _check_array("roots", roots)
    _check_array("slot_base", slot_base)
    _check_array("slot_npages", slot_npages)
    _check_array("slot_max_level", slot_max_level, np.int8)
    _check_array("slot_as_id", slot_as_id, np.int8)
    cdef Py_ssize_t cap = _int_arg("max_problems", max_problems, 0, 1 << 24)
    cdef Py_ssize_t ns = slot_base.shape[0], nr = roots.shape[0], i
    for name, arr in (("slot_npages", slot_npages), ("slot_max_level", slot_max_level),
                      ("slot_as_id", slot_as_id)):
        if arr.shape[0] != ns:
            raise ValueError(f"{name} has {arr.shape[0]} entries, slot_base {ns}")
    if nx_list is None:
        nx_list = np.zeros(0, np.uint64)
    _check_array("nx_list", nx_list)
    r_arr = np.array(roots, copy=True)
    b_arr = np.array(slot_base, copy=True)
    n_arr = np.array(slot_npages, copy=True)
    m_arr = np.array(slot_max_level, copy=True)
    s_arr = np.array(slot_as_id, copy=True)
    x_arr = np.array(nx_list, copy=True)
    for i in range(ns):
        if int(b_arr[i]) + int(n_arr[i]) >= 1 << 64:
            raise ValueError(f"slot {i}: slot_base + slot_npages wraps")
    cdef const uint64_t[::1] rv = r_arr
    cdef const uint64_t[::1] bv = b_arr
    cdef const uint64_t[::1] nv = n_arr
    cdef const int8_t[::1] mv = m_arr
    cdef const int8_t[::1] sv = s_arr
    cdef const uint64_t[::1] xv = x_arr
    problems = np.zeros(max(cap, 1), PROBLEM_DTYPE)
    cdef _audit w
    cdef uint64_t sp, root
    cdef kvm_mmu_page *h
    cdef Py_ssize_t nx = x_arr.shape[0]
    memset(&w, 0, sizeof(w))
    w.f = &arena.fmt.fmt
    w.a = a
    w.sbase = &bv[0] if ns else NULL
    w.snpages = &nv[0] if ns else NULL
    w.smax = &mv[0] if ns else NULL
    w.sas = &sv[0] if ns else NULL
    w.nslots = ns
    w.last_slot = -1
    w.cap = cap
    if a.chunk_base == NULL:
        from kvmmmu.errors import ObjectInitError
        raise ObjectInitError("tdp_audit: PtArena.__init__ has not run")
    arena._writer("tdp_audit")
    arena._busy = "tdp_audit"
    try:
        w.ntables = a.tables_hw
        w.out = <_problem *>calloc(max(cap, 1), sizeof(_problem))
        w.seen = <uint8_t *>calloc(max(w.ntables, 1), 1)
        if w.out == NULL or w.seen == NULL:
            free(w.out)
            raise MemoryError("tdp_audit: no memory for the table marks")
        with nogil:
            # The roots' own tables first: any link to one is a second parent.
            for i in range(nr):
                root = rv[i]
                if root == 0 or root > a.headers_hw or pt_slot(a, root - 1).sp_state != PT_SP_IN_USE:
                    _bad(&w, P_BAD_ROOT, <int>i, 0, 0, root)
                    continue
                h = pt_sp_ptr(a, root)
                if not h.tdp_mmu_page or role_level(h.role) < 1 or \
                        role_level(h.role) > PT64_ROOT_MAX_LEVEL or \
                        h.spt < a.base_pfn or h.spt - a.base_pfn >= w.ntables or \
                        w.seen[h.spt - a.base_pfn]:
                    _bad(&w, P_BAD_ROOT, <int>i, 0, 0, root)
                    continue
                w.seen[h.spt - a.base_pfn] = 2
            for i in range(nr):
                root = rv[i]
                if root != 0 and root <= a.headers_hw and \
                        pt_slot(a, root - 1).sp_state == PT_SP_IN_USE and \
                        pt_sp_ptr(a, root).spt - a.base_pfn < w.ntables and \
                        w.seen[pt_sp_ptr(a, root).spt - a.base_pfn] == 2:
                    w.seen[pt_sp_ptr(a, root).spt - a.base_pfn] = 3      # walked once
                    _walk_root(&w, <int>i, root)
            for i in range(nx):
                sp = xv[i]
                if sp == 0 or sp > a.headers_hw or pt_slot(a, sp - 1).sp_state != PT_SP_IN_USE:
                    _bad(&w, P_NX, -1, 0, 0, sp)
                    continue
                h = pt_sp_ptr(a, sp)
                if not h.nx_huge_page_disallowed or not h.tdp_mmu_page or h.ptep == 0 or \
                        h.spt < a.base_pfn or h.spt - a.base_pfn >= w.ntables or \
                        w.seen[h.spt - a.base_pfn] != 1:
                    _bad(&w, P_NX, -1, h.gfn, <int>role_level(h.role), sp)
    finally:
        arena._busy = None
        free(w.seen)
    try:
        k = min(w.n, cap)
        for i in range(k):
            problems[i] = (w.out[i].kind, w.out[i].root, w.out[i].gfn, w.out[i].level,
                           w.out[i].value)
    finally:
        free(w.out)
    counts = {"leaves": {lvl: int(w.leaves[lvl]) for lvl in range(1, PT64_ROOT_MAX_LEVEL + 1)},
              "tables": int(w.tables), "problems": int(w.n)}
    return counts, problems[:min(w.n, cap)]
