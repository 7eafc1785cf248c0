/*
 * kvmmmu: constants of the guest page-table walker (Linux v6.18 facts:
 * PFERR_* from asm/kvm_host.h, EPT violation qualification bits from
 * asm/vmx.h, the PSE-36 layout of mmu.h).
 */
#ifndef KVMMMU_GUEST_WALK_DEFS_H
#define KVMMMU_GUEST_WALK_DEFS_H

#include <stdint.h>
#include "spte_defs.h"

/* #PF error code bits, and KVM's synthetic bits above 31. */
#define PFERR_PRESENT_MASK      KVMMMU_BIT(0)
#define PFERR_WRITE_MASK        KVMMMU_BIT(1)
#define PFERR_USER_MASK         KVMMMU_BIT(2)
#define PFERR_RSVD_MASK         KVMMMU_BIT(3)
#define PFERR_FETCH_MASK        KVMMMU_BIT(4)
#define PFERR_PK_MASK           KVMMMU_BIT(5)
#define PFERR_SS_MASK           KVMMMU_BIT(6)
#define PFERR_SGX_MASK          KVMMMU_BIT(15)
#define PFERR_IMPLICIT_ACCESS   KVMMMU_BIT(48)

/* What a walk may be asked for: the hardware access bits plus KVM's
 * implicit-supervisor marker.  P is accepted and ignored (the shadow fault
 * path passes the hardware error code, which may have it). */
#define GW_ACCESS_ALLOWED  (PFERR_PRESENT_MASK | PFERR_WRITE_MASK | PFERR_USER_MASK | \
                            PFERR_FETCH_MASK | PFERR_IMPLICIT_ACCESS)

#define GW_INVALID_GPA          (~0ULL)

/* Guest entry layout. */
#define GW_PT64_BASE_ADDR_MASK  KVMMMU_GENMASK(51, 12)
#define GW_PT32_BASE_ADDR_MASK  0xfffff000ULL
#define GW_PT64_NX_SHIFT        63
#define GW_PKEY_SHIFT           59          /* protection key: bits 62:59 */
#define GW_PT_ACCESSED_SHIFT    5
#define GW_PT_DIRTY_SHIFT       6
#define GW_EPT_ACCESSED_SHIFT   8
#define GW_EPT_DIRTY_SHIFT      9
#define GW_PSE36_SHIFT          13          /* PDE bits 16:13 = PA bits 35:32 */
#define GW_PSE36_MASK           (0xfULL << GW_PSE36_SHIFT)

/* EPT violation exit qualification (the part the walker builds). */
#define EPT_VIOLATION_ACC_READ   KVMMMU_BIT(0)
#define EPT_VIOLATION_ACC_WRITE  KVMMMU_BIT(1)
#define EPT_VIOLATION_ACC_INSTR  KVMMMU_BIT(2)
#define EPT_VIOLATION_PROT_SHIFT 3

/* The index into mmu->permissions is pfec >> 1 with bit 3 (RSVD) standing
 * for "SMAP overridden": it must stay below 16. */
_Static_assert(((GW_ACCESS_ALLOWED | PFERR_RSVD_MASK) & 0xffffffffULL) >> 1 < 16,
               "permission index out of range");
_Static_assert((PFERR_PK_MASK & GW_ACCESS_ALLOWED) == 0, "PK is an output bit");
_Static_assert(PT_WRITABLE_MASK == ACC_WRITE_MASK, "protect_clean_gpte relies on W == ACC_WRITE");

#endif
