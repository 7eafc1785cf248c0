/*
 * kvmmmu: fixed SPTE constants (Linux v6.18, arch/x86/kvm/mmu/spte.h facts).
 *
 * 64-bit masks are #defines, not C enums (enums are int).  The static
 * asserts restate the kernel's no-overlap invariants so that a wrong edit
 * here fails the build instead of silently corrupting SPTEs.
 */
#ifndef KVMMMU_SPTE_DEFS_H
#define KVMMMU_SPTE_DEFS_H

#include <stdint.h>

#include "mmu_defs.h"    /* PAGE_SHIFT, PG_LEVEL_*, ACC_*, KVMMMU_BIT, ... */

/* Hardware bits shared by legacy/PAE/NPT page tables. */
#define PT_PRESENT_MASK        KVMMMU_BIT(0)
#define PT_WRITABLE_MASK       KVMMMU_BIT(1)
#define PT_USER_MASK           KVMMMU_BIT(2)
#define PT_PWT_MASK            KVMMMU_BIT(3)
#define PT_PCD_MASK            KVMMMU_BIT(4)
#define PT_ACCESSED_MASK       KVMMMU_BIT(5)
#define PT_DIRTY_MASK          KVMMMU_BIT(6)
#define PT_PAGE_SIZE_MASK      KVMMMU_BIT(7)
#define PT_PAT_MASK            KVMMMU_BIT(7)
#define PT_GLOBAL_MASK         KVMMMU_BIT(8)
#define PT64_NX_MASK           KVMMMU_BIT(63)

/* Intel EPT entry bits. */
#define VMX_EPT_READABLE_MASK       0x1ULL
#define VMX_EPT_WRITABLE_MASK       0x2ULL
#define VMX_EPT_EXECUTABLE_MASK     0x4ULL
#define VMX_EPT_RWX_MASK            0x7ULL
#define VMX_EPT_MT_EPTE_SHIFT       3
#define VMX_EPT_MT_MASK             (7ULL << VMX_EPT_MT_EPTE_SHIFT)
#define VMX_EPT_IPAT_BIT            KVMMMU_BIT(6)
#define VMX_EPT_ACCESS_BIT          KVMMMU_BIT(8)
#define VMX_EPT_DIRTY_BIT           KVMMMU_BIT(9)
#define VMX_EPT_SUPPRESS_VE_BIT     KVMMMU_BIT(63)
#define VMX_EPT_MISCONFIG_WX_VALUE  (VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK)
#define MTRR_TYPE_UNCACHABLE        0
#define MTRR_TYPE_WRBACK            6

/* KVM software bits. */
#define SPTE_MMU_PRESENT_MASK       KVMMMU_BIT(11)
#define SPTE_TDP_AD_SHIFT           52
#define SPTE_TDP_AD_MASK            (3ULL << SPTE_TDP_AD_SHIFT)
#define SPTE_TDP_AD_ENABLED         (0ULL << SPTE_TDP_AD_SHIFT)
#define SPTE_TDP_AD_DISABLED        (1ULL << SPTE_TDP_AD_SHIFT)
#define SPTE_TDP_AD_WRPROT_ONLY     (2ULL << SPTE_TDP_AD_SHIFT)
#define SPTE_BASE_ADDR_MASK         KVMMMU_GENMASK(51, 12)


#define SHADOW_ACC_TRACK_SAVED_BITS_MASK  (VMX_EPT_READABLE_MASK | VMX_EPT_EXECUTABLE_MASK)
#define SHADOW_ACC_TRACK_SAVED_BITS_SHIFT 54
#define SHADOW_ACC_TRACK_SAVED_MASK \
	(SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)

#define DEFAULT_SPTE_HOST_WRITABLE  KVMMMU_BIT(9)
#define DEFAULT_SPTE_MMU_WRITABLE   KVMMMU_BIT(10)
#define EPT_SPTE_HOST_WRITABLE      KVMMMU_BIT(57)
#define EPT_SPTE_MMU_WRITABLE       KVMMMU_BIT(58)

/* MMIO generation: gen[7:0] -> SPTE[10:3], gen[18:8] -> SPTE[62:52]. */
#define MMIO_SPTE_GEN_LOW_START     3
#define MMIO_SPTE_GEN_LOW_END       10
#define MMIO_SPTE_GEN_HIGH_START    52
#define MMIO_SPTE_GEN_HIGH_END      62
#define MMIO_SPTE_GEN_LOW_MASK      KVMMMU_GENMASK(MMIO_SPTE_GEN_LOW_END, MMIO_SPTE_GEN_LOW_START)
#define MMIO_SPTE_GEN_HIGH_MASK     KVMMMU_GENMASK(MMIO_SPTE_GEN_HIGH_END, MMIO_SPTE_GEN_HIGH_START)
#define MMIO_SPTE_GEN_LOW_BITS      (MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1)
#define MMIO_SPTE_GEN_HIGH_BITS     (MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1)
#define MMIO_SPTE_GEN_LOW_SHIFT     (MMIO_SPTE_GEN_LOW_START - 0)
#define MMIO_SPTE_GEN_HIGH_SHIFT    (MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS)
#define MMIO_SPTE_GEN_MASK          KVMMMU_GENMASK(MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS - 1, 0)
#define SPTE_MMIO_ALLOWED_MASK      (KVMMMU_BIT(63) | KVMMMU_GENMASK(51, 12) | KVMMMU_GENMASK(2, 0))
#define SHADOW_NONPRESENT_OR_RSVD_MASK_LEN 5

/* Non-present values (64-bit host; a 32-bit host uses 0 as the empty value). */
#define SHADOW_NONPRESENT_VALUE_64  KVMMMU_BIT(63)
#define FROZEN_SPTE_LOW_BITS        0x5a0ULL

_Static_assert(SPTE_TDP_AD_ENABLED == 0, "A/D enabled must be 0 (reserved in PAE)");
_Static_assert(!(SPTE_TDP_AD_MASK & SHADOW_ACC_TRACK_SAVED_MASK), "A/D type vs saved bits");
_Static_assert(!(EPT_SPTE_HOST_WRITABLE & SPTE_TDP_AD_MASK), "host-writable vs A/D type");
_Static_assert(!(EPT_SPTE_MMU_WRITABLE & SPTE_TDP_AD_MASK), "MMU-writable vs A/D type");
_Static_assert(!(EPT_SPTE_HOST_WRITABLE & SHADOW_ACC_TRACK_SAVED_MASK), "host-writable vs saved");
_Static_assert(!(EPT_SPTE_MMU_WRITABLE & SHADOW_ACC_TRACK_SAVED_MASK), "MMU-writable vs saved");
_Static_assert(!(SPTE_MMU_PRESENT_MASK & (MMIO_SPTE_GEN_LOW_MASK | MMIO_SPTE_GEN_HIGH_MASK)),
	       "MMIO generation vs MMU-present");
_Static_assert(MMIO_SPTE_GEN_LOW_BITS == 8 && MMIO_SPTE_GEN_HIGH_BITS == 11, "19-bit MMIO gen");
_Static_assert(!(SPTE_MMIO_ALLOWED_MASK & (SPTE_MMU_PRESENT_MASK | MMIO_SPTE_GEN_LOW_MASK |
					   MMIO_SPTE_GEN_HIGH_MASK)), "MMIO allowed mask");
_Static_assert(!((SHADOW_NONPRESENT_VALUE_64 | FROZEN_SPTE_LOW_BITS) & SPTE_MMU_PRESENT_MASK),
	       "frozen SPTE must not look present");
_Static_assert(!(SHADOW_NONPRESENT_VALUE_64 & SPTE_MMU_PRESENT_MASK), "nonpresent value");

/* Debug-only checks: KVMMMU_DEBUG_ON and kvmmmu_count_warn() come from mmu_defs.h. */
/* One counter per check site, bumped from nogil code (relaxed atomics). */
enum spte_warn_site {
	SPTE_WARN_MAKE_SPTE_NO_PRESENT_BIT,	/* make_spte: pte_access | present mask == 0 */
	SPTE_WARN_MAKE_SPTE_WRITABLE_INVARIANT,	/* make_spte: result breaks W/MMU-W/Host-W */
	SPTE_WARN_ACC_TRACK_WRITABLE_INVARIANT,	/* mark_spte_for_access_track */
	SPTE_WARN_ACC_TRACK_SAVED_BITS,		/* mark_spte_for_access_track */
	SPTE_WARN_MMIO_NO_VALUE,		/* make_mmio_spte with caching off */
	SPTE_WARN_SMALL_NOT_HUGE,		/* make_small_spte: not a present huge SPTE */
	SPTE_WARN_HUGE_NOT_PRESENT,		/* make_huge_spte: not present, or level 4K */
	SPTE_WARN_MMIO_AMBIGUOUS,		/* is_mmio_spte on an MMU-present SPTE */
	SPTE_WARN_NR_SITES
};


#endif
