# The TDP MMU's iterator (arch/x86/kvm/mmu/tdp_iter.[ch]): struct tdp_iter at
# the kernel's v6.18 layout (tdp_iter_defs.h) and its steps, as C functions
# over a page-table arena.  The steps are inline here: they are the
# per-entry body of every TDP loop (map, walk, zap, dirty log), which runs in
# other modules, and out of line they cost those loops about 12%
# (benchmarks/compare_tdp.py).  The yield rule's bodies are in tdp_iter.pyx.
#
#     cdef tdp_iter it
#     tdp_iter_start(&it, a, root_sp, PG_LEVEL_4K, start, gfn_bits)
#     while it.valid and it.gfn < end:
#         ...                       # it.sptep, it.old_spte, it.level, it.gfn
#         tdp_iter_next(&it, a)
#
# is for_each_tdp_pte_min_level.  Every handle the walk follows is checked
# against the arena first (root header, child tables), so a corrupted or
# freed (poisoned) entry ends the descent instead of reaching outside it.
from libc.stdint cimport uint64_t, int64_t

from kvmmmu._core.types cimport sptep_t, make_sptep
from kvmmmu._core.pt_arena_defs cimport (
    pt_arena_t, pt_read_once64, pt_sptep_ptr, kvm_mmu_page, pt_sp_ptr, pt_slot, pt_page_sp,
    PT_SP_IN_USE, PT_SP_RCU_PENDING,
)
from kvmmmu._core.role cimport role_level, role_as_id, role_is_mirror
from kvmmmu._core.spte cimport (
    SPTE_LEVEL_BITS, SPTE_ENT_PER_PAGE, PT64_ROOT_MAX_LEVEL,
    is_shadow_present_pte, is_last_spte, spte_to_pfn, spte_index_of,
)

cdef extern from "tdp_iter_defs.h" nogil:
    ctypedef struct tdp_iter:
        uint64_t next_last_level_gfn
        uint64_t yielded_gfn
        uint64_t pt_path[5]
        uint64_t sptep
        uint64_t gfn
        uint64_t gfn_bits
        int root_level
        int min_level
        int level
        int as_id
        uint64_t old_spte
        bint valid
        bint yielded


# need_resched() of the model: the caller's budget of steps between yields.
ctypedef struct tdp_resched:
    int64_t every           # steps between two need_resched() answers of true (0: never)
    int64_t count           # steps since the last yield
    uint64_t nr_yields


cdef inline uint64_t kvm_tdp_mmu_read_spte(const pt_arena_t *a, sptep_t sptep) noexcept nogil:
    """READ_ONCE(*rcu_dereference(sptep)); `sptep` was checked by the walk."""
    return pt_read_once64(pt_sptep_ptr(a, sptep))


cdef inline uint64_t kvm_gfn_root_bits(const pt_arena_t *a, uint64_t root_sp) noexcept nogil:
    """The bits added to a gfn to index `root_sp`: none for a TDX mirror root
    (private memory at its own gfn), the VM's ``gfn_direct_bits`` (the TDX
    shared bit; 0 for other VMs) for a direct root.  `root_sp` must be a
    header handle the caller validated."""
    if a.gfn_direct_bits == 0 or role_is_mirror(pt_sp_ptr(a, root_sp).role):
        return 0
    return a.gfn_direct_bits


cdef inline uint64_t _pages_per_entry(int level) noexcept nogil:
    """KVM_PAGES_PER_HPAGE(level): gfns one SPTE at `level` maps."""
    return (<uint64_t>1) << ((level - 1) * SPTE_LEVEL_BITS)


cdef inline uint64_t _round_for_level(uint64_t gfn, int level) noexcept nogil:
    """gfn_round_for_level()."""
    return gfn & ~(_pages_per_entry(level) - 1)


cdef inline bint _table_in_arena(const pt_arena_t *a, uint64_t pfn) noexcept nogil:
    return pfn >= a.base_pfn and pfn - a.base_pfn < pt_read_once64(&a.tables_hw)


cdef inline sptep_t spte_to_child_pt(const pt_arena_t *a, uint64_t spte, int level) noexcept nogil:
    """The table a present non-leaf SPTE at `level` points to (as the handle
    of its entry 0), or 0: not present, a leaf, or not the table of an sp of
    this arena (a page without an owner is never entered: the walk's callers
    read that owner's header)."""
    cdef uint64_t pfn
    if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
        return 0
    pfn = spte_to_pfn(spte)
    if not _table_in_arena(a, pfn) or pt_page_sp(a, pfn) == 0:
        return 0
    return make_sptep(pfn, 0)


cdef inline void _refresh_sptep(tdp_iter *it, const pt_arena_t *a) noexcept nogil:
    it.sptep = it.pt_path[it.level - 1] + (<uint64_t>spte_index_of(it.gfn | it.gfn_bits, it.level) << 3)
    it.old_spte = kvm_tdp_mmu_read_spte(a, it.sptep)


cdef inline void tdp_iter_restart(tdp_iter *it, const pt_arena_t *a) noexcept nogil:
    """Back to the root at next_last_level_gfn (also how a yield resumes)."""
    it.yielded = False
    it.yielded_gfn = it.next_last_level_gfn
    it.level = it.root_level
    it.gfn = _round_for_level(it.next_last_level_gfn, it.level)
    _refresh_sptep(it, a)
    it.valid = True


cdef inline void tdp_iter_start(tdp_iter *it, const pt_arena_t *a, uint64_t root_sp,
                                int min_level, uint64_t gfn, uint64_t gfn_bits) noexcept nogil:
    """Begin a walk of `root_sp` at `gfn`; invalid (no walk) for a root that
    is not a live header with a table of this arena, a root level outside
    1..PT64_ROOT_MAX_LEVEL, a min_level outside 1..root level, or a `gfn`
    that already holds `gfn_bits`."""
    cdef kvm_mmu_page *root
    cdef int level
    it.valid = False
    if root_sp == 0 or root_sp > pt_read_once64(&a.headers_hw):
        return
    if pt_slot(a, root_sp - 1).sp_state not in (PT_SP_IN_USE, PT_SP_RCU_PENDING):
        return
    root = pt_sp_ptr(a, root_sp)
    level = <int>role_level(root.role)
    if level < 1 or level > PT64_ROOT_MAX_LEVEL or min_level < 1 or min_level > level:
        return
    if (gfn_bits and gfn >= gfn_bits) or not _table_in_arena(a, root.spt):
        return
    it.next_last_level_gfn = gfn
    it.gfn_bits = gfn_bits
    it.root_level = level
    it.min_level = min_level
    it.pt_path[level - 1] = make_sptep(root.spt, 0)
    it.as_id = <int>role_as_id(root.role)
    tdp_iter_restart(it, a)


cdef inline bint _try_step_down(tdp_iter *it, const pt_arena_t *a) noexcept nogil:
    cdef sptep_t child
    if it.level == it.min_level:
        return False
    # Read again: the entry may have been zapped or replaced since the
    # snapshot, and a table no longer linked here must not be entered.
    it.old_spte = kvm_tdp_mmu_read_spte(a, it.sptep)
    child = spte_to_child_pt(a, it.old_spte, it.level)
    if child == 0:
        return False
    it.level -= 1
    it.pt_path[it.level - 1] = child
    it.gfn = _round_for_level(it.next_last_level_gfn, it.level)
    _refresh_sptep(it, a)
    return True


cdef inline bint _try_step_side(tdp_iter *it, const pt_arena_t *a) noexcept nogil:
    if spte_index_of(it.gfn | it.gfn_bits, it.level) == SPTE_ENT_PER_PAGE - 1:
        return False
    it.gfn += _pages_per_entry(it.level)
    it.next_last_level_gfn = it.gfn
    it.sptep += 8
    it.old_spte = kvm_tdp_mmu_read_spte(a, it.sptep)
    return True


cdef inline bint _try_step_up(tdp_iter *it, const pt_arena_t *a) noexcept nogil:
    if it.level == it.root_level:
        return False
    it.level += 1
    it.gfn = _round_for_level(it.gfn, it.level)
    _refresh_sptep(it, a)
    return True


cdef inline void tdp_iter_next(tdp_iter *it, const pt_arena_t *a) noexcept nogil:
    """The next entry in pre-order (restart after a yield)."""
    if it.yielded:
        tdp_iter_restart(it, a)
        return
    if _try_step_down(it, a):
        return
    while True:
        if _try_step_side(it, a):
            return
        if not _try_step_up(it, a):
            break
    it.valid = False



cdef bint tdp_mmu_iter_need_resched(tdp_iter *it, tdp_resched *r) noexcept nogil
cdef bint tdp_mmu_iter_cond_resched(tdp_iter *it, tdp_resched *r) noexcept nogil
