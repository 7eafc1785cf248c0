# The TDP MMU's iterator (arch/x86/kvm/mmu/tdp_iter.[ch]): struct tdp_iter at
# the kernel's v6.18 layout (tdp_iter_defs.h) and its steps, as C functions
# over a page-table arena.  Bodies in tdp_iter.pyx; the one-line SPTE read
# stays inline here.
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

from kvmmmu._core.types cimport sptep_t
from kvmmmu._core.pt_arena_defs cimport pt_arena_t, pt_read_once64, pt_sptep_ptr

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

cdef sptep_t spte_to_child_pt(const pt_arena_t *a, uint64_t spte, int level) noexcept nogil
cdef void tdp_iter_start(tdp_iter *it, const pt_arena_t *a, uint64_t root_sp, int min_level,
                         uint64_t gfn, uint64_t gfn_bits) noexcept nogil
cdef void tdp_iter_restart(tdp_iter *it, const pt_arena_t *a) noexcept nogil
cdef void tdp_iter_next(tdp_iter *it, const pt_arena_t *a) noexcept nogil
cdef bint tdp_mmu_iter_need_resched(tdp_iter *it, tdp_resched *r) noexcept nogil
cdef bint tdp_mmu_iter_cond_resched(tdp_iter *it, tdp_resched *r) noexcept nogil
