/*
 * kvmmmu: the MMU-wide constants, in one place (Linux v6.18 values).
 *
 * Every other header (spte_defs.h, rmap_defs.h, pt_arena_defs.h, ...) includes
 * this one instead of defining its own copy; Cython reads it through
 * mmu_defs.pxd and Python through kvmmmu._core.defs.  tests/test_one_home.py
 * fails if any of these names is defined a second time anywhere in the tree.
 */
#ifndef KVMMMU_MMU_DEFS_H
#define KVMMMU_MMU_DEFS_H

#include <stdint.h>

#define KVMMMU_BIT(n)          (1ULL << (n))
#define KVMMMU_GENMASK(h, l)   (((~0ULL) << (l)) & (~0ULL >> (63 - (h))))

/* Pages and page-table geometry (arch/x86/include/asm/page_types.h, mmu.h). */
#define PAGE_SHIFT             12
#define PAGE_SIZE              (1ULL << PAGE_SHIFT)
#define SPTE_LEVEL_BITS        9
#define SPTE_ENT_PER_PAGE      512

/* enum pg_level (arch/x86/include/asm/pgtable_types.h). */
#define PG_LEVEL_NONE          0
#define PG_LEVEL_4K            1
#define PG_LEVEL_2M            2
#define PG_LEVEL_1G            3
#define PG_LEVEL_512G          4
#define PG_LEVEL_256T          5
#define PT64_ROOT_MAX_LEVEL    5

/* Huge pages (arch/x86/include/asm/kvm_host.h). */
#define KVM_NR_PAGE_SIZES              3        /* 4K, 2M, 1G */
#define KVM_MAX_HUGEPAGE_LEVEL         PG_LEVEL_1G
#define KVM_HPAGE_GFN_SHIFT_PER_LEVEL  9        /* KVM_HPAGE_GFN_SHIFT(l) = (l - 1) * 9 */

/* Access bits of a shadow page / SPTE (arch/x86/kvm/mmu/spte.h). */
#define ACC_EXEC_MASK          1U
#define ACC_WRITE_MASK         2U
#define ACC_USER_MASK          4U
#define ACC_ALL                7U

/* enum ret_pf (arch/x86/kvm/mmu/mmu_internal.h): the page-fault results. */
#define RET_PF_CONTINUE        0
#define RET_PF_RETRY           1
#define RET_PF_EMULATE         2
#define RET_PF_WRITE_PROTECTED 3
#define RET_PF_INVALID         4
#define RET_PF_FIXED           5
#define RET_PF_SPURIOUS        6

/* SPTEs prefetched around a fault (mmu.c). */
#define PTE_PREFETCH_NUM       8

_Static_assert(SPTE_ENT_PER_PAGE == 1 << SPTE_LEVEL_BITS, "512 SPTEs per table");
_Static_assert(PAGE_SIZE == SPTE_ENT_PER_PAGE * 8, "a table is one page of 8-byte SPTEs");
_Static_assert(KVM_MAX_HUGEPAGE_LEVEL == KVM_NR_PAGE_SIZES, "levels 1..3 are leaf sizes");

/* KVM_PAGES_PER_HPAGE(level): 4 KiB frames in one page of `level`. */
static inline uint64_t kvmmmu_pages_per_hpage(int level)
{
    return 1ULL << ((level - 1) * KVM_HPAGE_GFN_SHIFT_PER_LEVEL);
}

/* gfn_to_index: the index of gfn's frame at `level` in a slot's per-level
 * arrays; index 0 is the frame that holds base_gfn, aligned or not. */
static inline uint64_t kvmmmu_gfn_to_index(uint64_t gfn, uint64_t base_gfn, int level)
{
    int shift = (level - 1) * KVM_HPAGE_GFN_SHIFT_PER_LEVEL;
    return (gfn >> shift) - (base_gfn >> shift);
}

/* __kvm_mmu_slot_lpages: entries a slot's per-level array needs (npages >= 1). */
static inline uint64_t kvmmmu_slot_lpages(uint64_t base_gfn, uint64_t npages, int level)
{
    return kvmmmu_gfn_to_index(base_gfn + npages - 1, base_gfn, level) + 1;
}


/*
 * Debug-only invariant checks (where the kernel has KVM_MMU_WARN_ON, or a
 * WARN_ON_ONCE/KVM_BUG_ON on a condition only a caller bug can cause).
 * setup.py defines KVMMMU_DEBUG to 1 with KVMMMU_DEBUG_CYTHON=1 and to 0
 * otherwise; a module built without setup.py gets 0.  With 0,
 * `if (KVMMMU_DEBUG_ON && ...)` is dead code the compiler drops.
 */
#ifndef KVMMMU_DEBUG
#define KVMMMU_DEBUG 0
#endif
#define KVMMMU_DEBUG_ON (KVMMMU_DEBUG != 0)

/* Count one failed debug check (relaxed atomic: nogil callers on any thread). */
static inline void kvmmmu_count_warn(uint64_t *counter)
{
	__atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}

#endif /* KVMMMU_MMU_DEFS_H */
