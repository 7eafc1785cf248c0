# See role.pyx for details.
#
# The role words of the KVM x86 MMU (Linux v6.18) as plain integers:
#
#   union kvm_mmu_page_role      uint32_t "word"    (kvm_mmu_page.role)
#   union kvm_mmu_extended_role  uint32_t "word"
#   union kvm_cpu_role           uint64_t "as_u64"  (base | ext << 32)
#
# Shadow-page headers store the page role as a bare uint32_t.  Other Cython
# modules read and build it with the inline helpers below, e.g.
#
#     from kvmmmu._core.role cimport role_level, role_set_invalid
#
# The one-line extractors, setters and comparisons are `cdef inline` here;
# derived roles (mmu_child_role_word, calc_cpu_role) are defined in role.pyx.
#
# Setters take an already validated value: they mask it to the field width
# and never fail (the Python classes in role.pyx do the range checks).

from libc.stdint cimport uint32_t, uint64_t

# The MMU-wide constants have one home, mmu_defs.h (re-exported here so that
# `from kvmmmu._core.role cimport ACC_ALL` keeps working).
from kvmmmu._core.mmu_defs cimport (
    ACC_EXEC_MASK, ACC_WRITE_MASK, ACC_USER_MASK, ACC_ALL, PG_LEVEL_4K, SPTE_ENT_PER_PAGE,
)

cdef extern from "role_defs.h" nogil:
    # union kvm_mmu_page_role: shift, width and in-place mask of every field.
    const int ROLE_LEVEL_SHIFT
    const int ROLE_LEVEL_WIDTH
    const int ROLE_HAS_4_BYTE_GPTE_SHIFT
    const int ROLE_HAS_4_BYTE_GPTE_WIDTH
    const int ROLE_QUADRANT_SHIFT
    const int ROLE_QUADRANT_WIDTH
    const int ROLE_DIRECT_SHIFT
    const int ROLE_DIRECT_WIDTH
    const int ROLE_ACCESS_SHIFT
    const int ROLE_ACCESS_WIDTH
    const int ROLE_INVALID_SHIFT
    const int ROLE_INVALID_WIDTH
    const int ROLE_EFER_NX_SHIFT
    const int ROLE_EFER_NX_WIDTH
    const int ROLE_CR0_WP_SHIFT
    const int ROLE_CR0_WP_WIDTH
    const int ROLE_SMEP_ANDNOT_WP_SHIFT
    const int ROLE_SMEP_ANDNOT_WP_WIDTH
    const int ROLE_SMAP_ANDNOT_WP_SHIFT
    const int ROLE_SMAP_ANDNOT_WP_WIDTH
    const int ROLE_AD_DISABLED_SHIFT
    const int ROLE_AD_DISABLED_WIDTH
    const int ROLE_GUEST_MODE_SHIFT
    const int ROLE_GUEST_MODE_WIDTH
    const int ROLE_PASSTHROUGH_SHIFT
    const int ROLE_PASSTHROUGH_WIDTH
    const int ROLE_IS_MIRROR_SHIFT
    const int ROLE_IS_MIRROR_WIDTH
    const int ROLE_SMM_SHIFT
    const int ROLE_SMM_WIDTH

    const uint32_t ROLE_LEVEL_MASK
    const uint32_t ROLE_HAS_4_BYTE_GPTE_MASK
    const uint32_t ROLE_QUADRANT_MASK
    const uint32_t ROLE_DIRECT_MASK
    const uint32_t ROLE_ACCESS_MASK
    const uint32_t ROLE_INVALID_MASK
    const uint32_t ROLE_EFER_NX_MASK
    const uint32_t ROLE_CR0_WP_MASK
    const uint32_t ROLE_SMEP_ANDNOT_WP_MASK
    const uint32_t ROLE_SMAP_ANDNOT_WP_MASK
    const uint32_t ROLE_AD_DISABLED_MASK
    const uint32_t ROLE_GUEST_MODE_MASK
    const uint32_t ROLE_PASSTHROUGH_MASK
    const uint32_t ROLE_IS_MIRROR_MASK
    const uint32_t ROLE_SMM_MASK
    const uint32_t ROLE_USED_MASK      # union of the field masks
    const uint32_t ROLE_UNUSED_MASK    # bits 23:20
    const uint32_t SYNC_ROLE_IGN_WORD  # 0x0004076F

    # union kvm_mmu_extended_role: single-bit fields in bits 7:0.
    const int EXT_VALID_SHIFT
    const int EXT_EXECONLY_SHIFT
    const int EXT_CR4_PSE_SHIFT
    const int EXT_CR4_PKE_SHIFT
    const int EXT_CR4_SMAP_SHIFT
    const int EXT_CR4_SMEP_SHIFT
    const int EXT_CR4_LA57_SHIFT
    const int EXT_EFER_LMA_SHIFT
    const uint32_t EXT_VALID_MASK
    const uint32_t EXT_EXECONLY_MASK
    const uint32_t EXT_CR4_PSE_MASK
    const uint32_t EXT_CR4_PKE_MASK
    const uint32_t EXT_CR4_SMAP_MASK
    const uint32_t EXT_CR4_SMEP_MASK
    const uint32_t EXT_CR4_LA57_MASK
    const uint32_t EXT_EFER_LMA_MASK
    const uint32_t EXT_USED_MASK

    const int CPU_ROLE_EXT_SHIFT       # 32

    # Guest control-register bits read by kvm_calc_cpu_role().
    const uint64_t X86_CR0_WP
    const uint64_t X86_CR0_PG
    const uint64_t X86_CR4_PSE
    const uint64_t X86_CR4_PAE
    const uint64_t X86_CR4_LA57
    const uint64_t X86_CR4_SMEP
    const uint64_t X86_CR4_SMAP
    const uint64_t X86_CR4_PKE
    const uint64_t EFER_LMA
    const uint64_t EFER_NX

    const int PT32_ROOT_LEVEL
    const int PT32E_ROOT_LEVEL
    const int PT64_ROOT_4LEVEL
    const int PT64_ROOT_5LEVEL


# ---------------------------------------------------------------------------
# kvm_mmu_page_role extractors.
# ---------------------------------------------------------------------------

cdef inline uint32_t role_level(uint32_t word) noexcept nogil:
    return (word & ROLE_LEVEL_MASK) >> ROLE_LEVEL_SHIFT

cdef inline bint role_has_4_byte_gpte(uint32_t word) noexcept nogil:
    return (word & ROLE_HAS_4_BYTE_GPTE_MASK) != 0

cdef inline uint32_t role_quadrant(uint32_t word) noexcept nogil:
    return (word & ROLE_QUADRANT_MASK) >> ROLE_QUADRANT_SHIFT

cdef inline bint role_direct(uint32_t word) noexcept nogil:
    return (word & ROLE_DIRECT_MASK) != 0

cdef inline uint32_t role_access(uint32_t word) noexcept nogil:
    """ACC_* bits (EXEC=1, WRITE=2, USER=4)."""
    return (word & ROLE_ACCESS_MASK) >> ROLE_ACCESS_SHIFT

cdef inline bint role_invalid(uint32_t word) noexcept nogil:
    return (word & ROLE_INVALID_MASK) != 0

cdef inline bint role_efer_nx(uint32_t word) noexcept nogil:
    return (word & ROLE_EFER_NX_MASK) != 0

cdef inline bint role_cr0_wp(uint32_t word) noexcept nogil:
    return (word & ROLE_CR0_WP_MASK) != 0

cdef inline bint role_smep_andnot_wp(uint32_t word) noexcept nogil:
    return (word & ROLE_SMEP_ANDNOT_WP_MASK) != 0

cdef inline bint role_smap_andnot_wp(uint32_t word) noexcept nogil:
    return (word & ROLE_SMAP_ANDNOT_WP_MASK) != 0

cdef inline bint role_ad_disabled(uint32_t word) noexcept nogil:
    return (word & ROLE_AD_DISABLED_MASK) != 0

cdef inline bint role_guest_mode(uint32_t word) noexcept nogil:
    return (word & ROLE_GUEST_MODE_MASK) != 0

cdef inline bint role_passthrough(uint32_t word) noexcept nogil:
    return (word & ROLE_PASSTHROUGH_MASK) != 0

cdef inline bint role_is_mirror(uint32_t word) noexcept nogil:
    return (word & ROLE_IS_MIRROR_MASK) != 0

cdef inline uint32_t role_smm(uint32_t word) noexcept nogil:
    return (word & ROLE_SMM_MASK) >> ROLE_SMM_SHIFT

cdef inline uint32_t role_as_id(uint32_t word) noexcept nogil:
    """kvm_mmu_role_as_id(): the address space of the SP is the smm byte."""
    return role_smm(word)


# ---------------------------------------------------------------------------
# kvm_mmu_page_role setters: return a new word, `v` masked to the field.
# ---------------------------------------------------------------------------

cdef inline uint32_t role_set_field(uint32_t word, uint32_t mask, int shift,
                                    uint32_t v) noexcept nogil:
    return (word & ~mask) | ((v << shift) & mask)

cdef inline uint32_t role_set_level(uint32_t word, uint32_t v) noexcept nogil:
    return role_set_field(word, ROLE_LEVEL_MASK, ROLE_LEVEL_SHIFT, v)

cdef inline uint32_t role_set_has_4_byte_gpte(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_HAS_4_BYTE_GPTE_MASK, ROLE_HAS_4_BYTE_GPTE_SHIFT, v)

cdef inline uint32_t role_set_quadrant(uint32_t word, uint32_t v) noexcept nogil:
    return role_set_field(word, ROLE_QUADRANT_MASK, ROLE_QUADRANT_SHIFT, v)

cdef inline uint32_t role_set_direct(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_DIRECT_MASK, ROLE_DIRECT_SHIFT, v)

cdef inline uint32_t role_set_access(uint32_t word, uint32_t v) noexcept nogil:
    return role_set_field(word, ROLE_ACCESS_MASK, ROLE_ACCESS_SHIFT, v)

cdef inline uint32_t role_set_invalid(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_INVALID_MASK, ROLE_INVALID_SHIFT, v)

cdef inline uint32_t role_set_efer_nx(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_EFER_NX_MASK, ROLE_EFER_NX_SHIFT, v)

cdef inline uint32_t role_set_cr0_wp(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_CR0_WP_MASK, ROLE_CR0_WP_SHIFT, v)

cdef inline uint32_t role_set_smep_andnot_wp(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_SMEP_ANDNOT_WP_MASK, ROLE_SMEP_ANDNOT_WP_SHIFT, v)

cdef inline uint32_t role_set_smap_andnot_wp(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_SMAP_ANDNOT_WP_MASK, ROLE_SMAP_ANDNOT_WP_SHIFT, v)

cdef inline uint32_t role_set_ad_disabled(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_AD_DISABLED_MASK, ROLE_AD_DISABLED_SHIFT, v)

cdef inline uint32_t role_set_guest_mode(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_GUEST_MODE_MASK, ROLE_GUEST_MODE_SHIFT, v)

cdef inline uint32_t role_set_passthrough(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_PASSTHROUGH_MASK, ROLE_PASSTHROUGH_SHIFT, v)

cdef inline uint32_t role_set_is_mirror(uint32_t word, bint v) noexcept nogil:
    return role_set_field(word, ROLE_IS_MIRROR_MASK, ROLE_IS_MIRROR_SHIFT, v)

cdef inline uint32_t role_set_smm(uint32_t word, uint32_t v) noexcept nogil:
    return role_set_field(word, ROLE_SMM_MASK, ROLE_SMM_SHIFT, v)


# ---------------------------------------------------------------------------
# Derived roles and comparisons.
# ---------------------------------------------------------------------------

cdef uint32_t mmu_child_role_word(uint32_t parent, int sptep_index, bint direct,
                                  uint32_t access) noexcept nogil
    # kvm_mmu_child_role() (defined in role.pyx; reached through the C-API
    # capsule): see its docstring there.

cdef inline bint role_sync_mismatch_word(uint32_t sp_word, uint32_t root_word) noexcept nogil:
    """True when an unsync SP cannot be synced under an MMU whose root role is
    `root_word` because a bit outside sync_role_ign differs (the role test of
    kvm_sync_page_check(); the caller also checks sp direct and sync_spte)."""
    return ((sp_word ^ root_word) & ~SYNC_ROLE_IGN_WORD) != 0


# ---------------------------------------------------------------------------
# kvm_mmu_extended_role and kvm_cpu_role.
# ---------------------------------------------------------------------------

cdef inline bint ext_bit(uint32_t ext, uint32_t mask) noexcept nogil:
    return (ext & mask) != 0

cdef inline uint64_t cpu_role_as_u64(uint32_t base, uint32_t ext) noexcept nogil:
    return (<uint64_t>base) | ((<uint64_t>ext) << CPU_ROLE_EXT_SHIFT)

cdef inline uint32_t cpu_role_base(uint64_t as_u64) noexcept nogil:
    return <uint32_t>(as_u64 & 0xffffffffu)

cdef inline uint32_t cpu_role_ext(uint64_t as_u64) noexcept nogil:
    return <uint32_t>(as_u64 >> CPU_ROLE_EXT_SHIFT)

cdef uint64_t calc_cpu_role(uint64_t cr0, uint64_t cr4, uint64_t efer, uint32_t smm,
                            bint guest_mode) noexcept nogil


cdef class KvmMmuPageRole:
    cdef readonly uint32_t word        # union kvm_mmu_page_role.word


cdef class KvmMmuExtendedRole:
    cdef readonly uint32_t word        # union kvm_mmu_extended_role.word


cdef class KvmCpuRole:
    cdef readonly uint64_t as_u64      # union kvm_cpu_role.as_u64 (base | ext << 32)


cdef KvmMmuPageRole page_role_from_word(uint32_t word)
cdef KvmMmuExtendedRole ext_role_from_word(uint32_t word)
cdef KvmCpuRole cpu_role_from_u64(uint64_t as_u64)
