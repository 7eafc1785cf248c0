/*
 * kvmmmu: bit layout of the KVM x86 MMU role words (Linux v6.18, checked
 * against the BTF of a running 6.18 kernel).
 *
 *   union kvm_mmu_page_role      32-bit word, LSB-first bitfields
 *   union kvm_mmu_extended_role  32-bit word
 *   union kvm_cpu_role           64-bit: page role in bits 31:0,
 *                                        extended role in bits 63:32
 *
 * Masks are #defines rather than C enum constants: the smm byte mask
 * (0xff000000) does not fit in an int.  The static asserts check that no
 * two fields overlap and that the page-role fields cover exactly the bits
 * the kernel uses (23:20 are unused in v6.18).
 */
#ifndef KVMMMU_ROLE_DEFS_H
#define KVMMMU_ROLE_DEFS_H

#include <stdint.h>

#define KVMMMU_ROLE_FIELD(shift, width) \
	((uint32_t)((((uint64_t)1 << (width)) - 1) << (shift)))

/* union kvm_mmu_page_role */
#define ROLE_LEVEL_SHIFT            0
#define ROLE_LEVEL_WIDTH            4
#define ROLE_HAS_4_BYTE_GPTE_SHIFT  4
#define ROLE_HAS_4_BYTE_GPTE_WIDTH  1
#define ROLE_QUADRANT_SHIFT         5
#define ROLE_QUADRANT_WIDTH         2
#define ROLE_DIRECT_SHIFT           7
#define ROLE_DIRECT_WIDTH           1
#define ROLE_ACCESS_SHIFT           8
#define ROLE_ACCESS_WIDTH           3
#define ROLE_INVALID_SHIFT          11
#define ROLE_INVALID_WIDTH          1
#define ROLE_EFER_NX_SHIFT          12
#define ROLE_EFER_NX_WIDTH          1
#define ROLE_CR0_WP_SHIFT           13
#define ROLE_CR0_WP_WIDTH           1
#define ROLE_SMEP_ANDNOT_WP_SHIFT   14
#define ROLE_SMEP_ANDNOT_WP_WIDTH   1
#define ROLE_SMAP_ANDNOT_WP_SHIFT   15
#define ROLE_SMAP_ANDNOT_WP_WIDTH   1
#define ROLE_AD_DISABLED_SHIFT      16
#define ROLE_AD_DISABLED_WIDTH      1
#define ROLE_GUEST_MODE_SHIFT       17
#define ROLE_GUEST_MODE_WIDTH       1
#define ROLE_PASSTHROUGH_SHIFT      18
#define ROLE_PASSTHROUGH_WIDTH      1
#define ROLE_IS_MIRROR_SHIFT        19
#define ROLE_IS_MIRROR_WIDTH        1
#define ROLE_SMM_SHIFT              24
#define ROLE_SMM_WIDTH              8

#define ROLE_LEVEL_MASK           KVMMMU_ROLE_FIELD(ROLE_LEVEL_SHIFT, ROLE_LEVEL_WIDTH)
#define ROLE_HAS_4_BYTE_GPTE_MASK KVMMMU_ROLE_FIELD(ROLE_HAS_4_BYTE_GPTE_SHIFT, ROLE_HAS_4_BYTE_GPTE_WIDTH)
#define ROLE_QUADRANT_MASK        KVMMMU_ROLE_FIELD(ROLE_QUADRANT_SHIFT, ROLE_QUADRANT_WIDTH)
#define ROLE_DIRECT_MASK          KVMMMU_ROLE_FIELD(ROLE_DIRECT_SHIFT, ROLE_DIRECT_WIDTH)
#define ROLE_ACCESS_MASK          KVMMMU_ROLE_FIELD(ROLE_ACCESS_SHIFT, ROLE_ACCESS_WIDTH)
#define ROLE_INVALID_MASK         KVMMMU_ROLE_FIELD(ROLE_INVALID_SHIFT, ROLE_INVALID_WIDTH)
#define ROLE_EFER_NX_MASK         KVMMMU_ROLE_FIELD(ROLE_EFER_NX_SHIFT, ROLE_EFER_NX_WIDTH)
#define ROLE_CR0_WP_MASK          KVMMMU_ROLE_FIELD(ROLE_CR0_WP_SHIFT, ROLE_CR0_WP_WIDTH)
#define ROLE_SMEP_ANDNOT_WP_MASK  KVMMMU_ROLE_FIELD(ROLE_SMEP_ANDNOT_WP_SHIFT, ROLE_SMEP_ANDNOT_WP_WIDTH)
#define ROLE_SMAP_ANDNOT_WP_MASK  KVMMMU_ROLE_FIELD(ROLE_SMAP_ANDNOT_WP_SHIFT, ROLE_SMAP_ANDNOT_WP_WIDTH)
#define ROLE_AD_DISABLED_MASK     KVMMMU_ROLE_FIELD(ROLE_AD_DISABLED_SHIFT, ROLE_AD_DISABLED_WIDTH)
#define ROLE_GUEST_MODE_MASK      KVMMMU_ROLE_FIELD(ROLE_GUEST_MODE_SHIFT, ROLE_GUEST_MODE_WIDTH)
#define ROLE_PASSTHROUGH_MASK     KVMMMU_ROLE_FIELD(ROLE_PASSTHROUGH_SHIFT, ROLE_PASSTHROUGH_WIDTH)
#define ROLE_IS_MIRROR_MASK       KVMMMU_ROLE_FIELD(ROLE_IS_MIRROR_SHIFT, ROLE_IS_MIRROR_WIDTH)
#define ROLE_SMM_MASK             KVMMMU_ROLE_FIELD(ROLE_SMM_SHIFT, ROLE_SMM_WIDTH)

/* Bits 23:20 have no field in v6.18. */
#define ROLE_UNUSED_MASK          0x00f00000u

#define ROLE_USED_MASK (ROLE_LEVEL_MASK | ROLE_HAS_4_BYTE_GPTE_MASK | ROLE_QUADRANT_MASK | \
	ROLE_DIRECT_MASK | ROLE_ACCESS_MASK | ROLE_INVALID_MASK | ROLE_EFER_NX_MASK | \
	ROLE_CR0_WP_MASK | ROLE_SMEP_ANDNOT_WP_MASK | ROLE_SMAP_ANDNOT_WP_MASK | \
	ROLE_AD_DISABLED_MASK | ROLE_GUEST_MODE_MASK | ROLE_PASSTHROUGH_MASK | \
	ROLE_IS_MIRROR_MASK | ROLE_SMM_MASK)

/* Sum of the field masks == their union <=> no two fields share a bit. */
#define ROLE_SUM_OF_MASKS ((uint64_t)ROLE_LEVEL_MASK + ROLE_HAS_4_BYTE_GPTE_MASK + \
	ROLE_QUADRANT_MASK + ROLE_DIRECT_MASK + ROLE_ACCESS_MASK + ROLE_INVALID_MASK + \
	ROLE_EFER_NX_MASK + ROLE_CR0_WP_MASK + ROLE_SMEP_ANDNOT_WP_MASK + \
	ROLE_SMAP_ANDNOT_WP_MASK + ROLE_AD_DISABLED_MASK + ROLE_GUEST_MODE_MASK + \
	ROLE_PASSTHROUGH_MASK + ROLE_IS_MIRROR_MASK + ROLE_SMM_MASK)

_Static_assert(ROLE_SUM_OF_MASKS == ROLE_USED_MASK, "kvm_mmu_page_role fields overlap");
_Static_assert((ROLE_USED_MASK | ROLE_UNUSED_MASK) == 0xffffffffu,
	       "kvm_mmu_page_role fields must cover bits 19:0 and 31:24");
_Static_assert((ROLE_USED_MASK & ROLE_UNUSED_MASK) == 0, "unused role bits overlap a field");

/*
 * sync_role_ign: role bits that may differ between an unsync shadow page
 * and the MMU that syncs it (level, access, quadrant, passthrough).
 */
#define SYNC_ROLE_IGN_WORD (ROLE_LEVEL_MASK | ROLE_ACCESS_MASK | ROLE_QUADRANT_MASK | \
	ROLE_PASSTHROUGH_MASK)
_Static_assert(SYNC_ROLE_IGN_WORD == 0x0004076fu, "sync_role_ign word");

/* union kvm_mmu_extended_role: one bit per field, bits 31:8 unused. */
#define EXT_VALID_SHIFT     0
#define EXT_EXECONLY_SHIFT  1
#define EXT_CR4_PSE_SHIFT   2
#define EXT_CR4_PKE_SHIFT   3
#define EXT_CR4_SMAP_SHIFT  4
#define EXT_CR4_SMEP_SHIFT  5
#define EXT_CR4_LA57_SHIFT  6
#define EXT_EFER_LMA_SHIFT  7

#define EXT_VALID_MASK      ((uint32_t)1 << EXT_VALID_SHIFT)
#define EXT_EXECONLY_MASK   ((uint32_t)1 << EXT_EXECONLY_SHIFT)
#define EXT_CR4_PSE_MASK    ((uint32_t)1 << EXT_CR4_PSE_SHIFT)
#define EXT_CR4_PKE_MASK    ((uint32_t)1 << EXT_CR4_PKE_SHIFT)
#define EXT_CR4_SMAP_MASK   ((uint32_t)1 << EXT_CR4_SMAP_SHIFT)
#define EXT_CR4_SMEP_MASK   ((uint32_t)1 << EXT_CR4_SMEP_SHIFT)
#define EXT_CR4_LA57_MASK   ((uint32_t)1 << EXT_CR4_LA57_SHIFT)
#define EXT_EFER_LMA_MASK   ((uint32_t)1 << EXT_EFER_LMA_SHIFT)
#define EXT_USED_MASK       0x000000ffu

/* union kvm_cpu_role */
#define CPU_ROLE_EXT_SHIFT  32

/*
 * Guest register bits that kvm_calc_cpu_role() reads (architectural
 * positions, SDM vol. 3 ch. 2).
 */
#define X86_CR0_WP   ((uint64_t)1 << 16)
#define X86_CR0_PG   ((uint64_t)1 << 31)
#define X86_CR4_PSE  ((uint64_t)1 << 4)
#define X86_CR4_PAE  ((uint64_t)1 << 5)
#define X86_CR4_LA57 ((uint64_t)1 << 12)
#define X86_CR4_SMEP ((uint64_t)1 << 20)
#define X86_CR4_SMAP ((uint64_t)1 << 21)
#define X86_CR4_PKE  ((uint64_t)1 << 22)
#define EFER_LMA     ((uint64_t)1 << 10)
#define EFER_NX      ((uint64_t)1 << 11)

/* Root levels (PT32_ROOT_LEVEL, PT32E_ROOT_LEVEL, PT64_ROOT_4LEVEL/5LEVEL). */
#define PT32_ROOT_LEVEL   2
#define PT32E_ROOT_LEVEL  3
#define PT64_ROOT_4LEVEL  4
#define PT64_ROOT_5LEVEL  5

#endif /* KVMMMU_ROLE_DEFS_H */
