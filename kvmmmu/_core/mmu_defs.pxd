# The MMU-wide constants and geometry helpers of mmu_defs.h, for every Cython
# module.  Python reads the same values from kvmmmu._core.defs.
from libc.stdint cimport uint64_t

cdef extern from "mmu_defs.h" nogil:
    const int PAGE_SHIFT
    const uint64_t PAGE_SIZE
    const int SPTE_LEVEL_BITS
    const int SPTE_ENT_PER_PAGE
    const int PG_LEVEL_NONE
    const int PG_LEVEL_4K
    const int PG_LEVEL_2M
    const int PG_LEVEL_1G
    const int PG_LEVEL_512G
    const int PG_LEVEL_256T
    const int PT64_ROOT_MAX_LEVEL
    const int KVM_NR_PAGE_SIZES
    const int KVM_MAX_HUGEPAGE_LEVEL
    const int KVM_HPAGE_GFN_SHIFT_PER_LEVEL
    const unsigned int ACC_EXEC_MASK
    const unsigned int ACC_WRITE_MASK
    const unsigned int ACC_USER_MASK
    const unsigned int ACC_ALL
    const int RET_PF_CONTINUE
    const int RET_PF_RETRY
    const int RET_PF_EMULATE
    const int RET_PF_WRITE_PROTECTED
    const int RET_PF_INVALID
    const int RET_PF_FIXED
    const int RET_PF_SPURIOUS
    const int PTE_PREFETCH_NUM

    uint64_t KVM_PAGES_PER_HPAGE "kvmmmu_pages_per_hpage"(int level)
    uint64_t gfn_to_index "kvmmmu_gfn_to_index"(uint64_t gfn, uint64_t base_gfn, int level)
    uint64_t kvm_mmu_slot_lpages "kvmmmu_slot_lpages"(uint64_t base_gfn, uint64_t npages, int level)

    # Debug-only checks (mmu_defs.h): a compile-time 0 in release builds.
    const bint KVMMMU_DEBUG_ON
    void kvmmmu_count_warn(uint64_t *counter)
