# See spte.pyx for details.
#
# The packed 64-bit SPTE of KVM x86 (Linux v6.18): constants, the per-format
# mask block, and `cdef inline ... noexcept nogil` helpers with the kernel's
# names.  Other Cython modules do
#
#     from kvmmmu._core.spte cimport spte_fmt_t, is_shadow_present_pte
#
# Algorithms (make_spte, make_mmio_spte, the access-tracking and split/huge
# builders) are defined once in spte.pyx and reached by other modules through
# spte's C-API capsule; the one-line predicates stay `cdef inline` here
# because the arena's and walkers' inner loops call them per SPTE
# (spte_needs_atomic_update and is_ept_ve_possible on every arena SPTE write,
# is_rsvd_spte at every level of a guest walk): a call through the capsule
# there would cost more than the test itself.
#
# The kernel keeps its masks in globals (shadow_present_mask, ...).  We keep
# them in a `spte_fmt_t` that every mask-reading helper takes as its first
# argument, so that legacy/NPT and EPT formats can live side by side.

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

# The MMU-wide constants have one home, mmu_defs.h; they are re-exported here so
# that `from kvmmmu._core.spte cimport PG_LEVEL_4K` keeps working.
from kvmmmu._core.mmu_defs cimport (
    PAGE_SHIFT, SPTE_LEVEL_BITS, SPTE_ENT_PER_PAGE, PG_LEVEL_NONE, PG_LEVEL_4K,
    PG_LEVEL_2M, PG_LEVEL_1G, PG_LEVEL_512G, PG_LEVEL_256T, PT64_ROOT_MAX_LEVEL,
    ACC_EXEC_MASK, ACC_WRITE_MASK, ACC_USER_MASK, ACC_ALL, KVMMMU_DEBUG_ON,
)

cdef extern from "spte_defs.h" nogil:
    const uint64_t PT_PRESENT_MASK
    const uint64_t PT_WRITABLE_MASK
    const uint64_t PT_USER_MASK
    const uint64_t PT_PWT_MASK
    const uint64_t PT_PCD_MASK
    const uint64_t PT_ACCESSED_MASK
    const uint64_t PT_DIRTY_MASK
    const uint64_t PT_PAGE_SIZE_MASK
    const uint64_t PT_PAT_MASK
    const uint64_t PT_GLOBAL_MASK
    const uint64_t PT64_NX_MASK

    const uint64_t VMX_EPT_READABLE_MASK
    const uint64_t VMX_EPT_WRITABLE_MASK
    const uint64_t VMX_EPT_EXECUTABLE_MASK
    const uint64_t VMX_EPT_RWX_MASK
    const int VMX_EPT_MT_EPTE_SHIFT
    const uint64_t VMX_EPT_MT_MASK
    const uint64_t VMX_EPT_IPAT_BIT
    const uint64_t VMX_EPT_ACCESS_BIT
    const uint64_t VMX_EPT_DIRTY_BIT
    const uint64_t VMX_EPT_SUPPRESS_VE_BIT
    const uint64_t VMX_EPT_MISCONFIG_WX_VALUE
    const uint64_t MTRR_TYPE_UNCACHABLE
    const uint64_t MTRR_TYPE_WRBACK

    const uint64_t SPTE_MMU_PRESENT_MASK
    const int SPTE_TDP_AD_SHIFT
    const uint64_t SPTE_TDP_AD_MASK
    const uint64_t SPTE_TDP_AD_ENABLED
    const uint64_t SPTE_TDP_AD_DISABLED
    const uint64_t SPTE_TDP_AD_WRPROT_ONLY
    const uint64_t SPTE_BASE_ADDR_MASK


    const uint64_t SHADOW_ACC_TRACK_SAVED_BITS_MASK
    const int SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    const uint64_t DEFAULT_SPTE_HOST_WRITABLE
    const uint64_t DEFAULT_SPTE_MMU_WRITABLE
    const uint64_t EPT_SPTE_HOST_WRITABLE
    const uint64_t EPT_SPTE_MMU_WRITABLE

    const int MMIO_SPTE_GEN_LOW_START
    const int MMIO_SPTE_GEN_LOW_END
    const int MMIO_SPTE_GEN_HIGH_START
    const int MMIO_SPTE_GEN_HIGH_END
    const uint64_t MMIO_SPTE_GEN_LOW_MASK
    const uint64_t MMIO_SPTE_GEN_HIGH_MASK
    const int MMIO_SPTE_GEN_LOW_SHIFT
    const int MMIO_SPTE_GEN_HIGH_SHIFT
    const uint64_t MMIO_SPTE_GEN_MASK
    const uint64_t SPTE_MMIO_ALLOWED_MASK
    const int SHADOW_NONPRESENT_OR_RSVD_MASK_LEN

    const uint64_t SHADOW_NONPRESENT_VALUE_64
    const uint64_t FROZEN_SPTE_LOW_BITS

    # Debug-only check sites (counters of spte.mmu_warnings()).
    enum spte_warn_site:
        SPTE_WARN_MAKE_SPTE_NO_PRESENT_BIT
        SPTE_WARN_MAKE_SPTE_WRITABLE_INVARIANT
        SPTE_WARN_ACC_TRACK_WRITABLE_INVARIANT
        SPTE_WARN_ACC_TRACK_SAVED_BITS
        SPTE_WARN_MMIO_NO_VALUE
        SPTE_WARN_SMALL_NOT_HUGE
        SPTE_WARN_HUGE_NOT_PRESENT
        SPTE_WARN_MMIO_AMBIGUOUS
        SPTE_WARN_NR_SITES


# Count one failed debug check at `site` (spte.mmu_warnings() reads the
# counters).  Only reached when KVMMMU_DEBUG_ON.
cdef void spte_mmu_warn(int site) noexcept nogil


# Flags for make_spte(): the kernel passes these as separate bools or reads
# them from the vCPU, the shadow page and the VM.
cdef enum:
    MKSPTE_PREFETCH = 1 << 0        # fault->prefetch / !fault
    MKSPTE_SYNCHRONIZING = 1 << 1   # called from FNAME(sync_spte)
    MKSPTE_HOST_WRITABLE = 1 << 2   # fault->map_writable
    MKSPTE_AD_DISABLED = 1 << 3     # sp->role.ad_disabled
    MKSPTE_AD_WRPROT_ONLY = 1 << 4  # kvm_mmu_page_ad_need_write_protect(kvm, sp)
    MKSPTE_NX_HUGE_PAGES = 1 << 5   # is_nx_huge_page_enabled(kvm)
    MKSPTE_HOST_MMIO = 1 << 6       # kvm_is_mmio_pfn(pfn)
    MKSPTE_UNSYNC_REFUSED = 1 << 7  # mmu_try_to_unsync_pages() != 0


ctypedef struct spte_fmt_t:
    # The kernel's spte.c globals for one SPTE flavour (one VM).
    uint64_t present_mask         # shadow_present_mask
    uint64_t user_mask            # shadow_user_mask (EPT: readable)
    uint64_t x_mask               # shadow_x_mask (EPT only)
    uint64_t nx_mask              # shadow_nx_mask (legacy only)
    uint64_t accessed_mask        # shadow_accessed_mask
    uint64_t dirty_mask           # shadow_dirty_mask
    uint64_t acc_track_mask       # shadow_acc_track_mask (EPT: RWX)
    uint64_t host_writable_mask   # shadow_host_writable_mask
    uint64_t mmu_writable_mask    # shadow_mmu_writable_mask
    uint64_t mmio_value           # kvm->arch.shadow_mmio_value (0: caching off)
    uint64_t mmio_mask            # shadow_mmio_mask
    uint64_t mmio_access_mask     # shadow_mmio_access_mask
    uint64_t nonpresent_or_rsvd_mask            # L1TF guard bits
    uint64_t nonpresent_or_rsvd_lower_gfn_mask  # GPA bits below the guard
    uint64_t nonpresent_value     # SHADOW_NONPRESENT_VALUE (0 on a 32-bit host)
    uint64_t frozen_spte          # FROZEN_SPTE
    uint64_t ram_memtype          # EPT memtype bits for RAM (vmx_get_mt_mask), 0 on NPT
    uint64_t mmio_memtype         # EPT memtype bits for host MMIO pfns (UC)
    bint ad_enabled               # kvm_ad_enabled
    bint is_ept                   # VMX get_mt_mask present
    bint mmio_caching             # enable_mmio_caching (after the mask checks)
    bint host_64bit
    int maxphyaddr                # kvm_host.maxphyaddr


# struct rsvd_bits_validate: reserved-bit masks indexed [bit 7][level - 1].
ctypedef struct rsvd_bits_validate:
    uint64_t rsvd_bits_mask[2][5]
    uint64_t bad_mt_xwr


# ---------------------------------------------------------------------------
# Format-independent predicates.
# ---------------------------------------------------------------------------

cdef inline bint is_shadow_present_pte(uint64_t spte) noexcept nogil:
    """MMU-present: bit 11, set in every present SPTE (leaf or not)."""
    return (spte & SPTE_MMU_PRESENT_MASK) != 0

cdef inline bint is_large_pte(uint64_t spte) noexcept nogil:
    return (spte & PT_PAGE_SIZE_MASK) != 0

cdef inline bint is_last_spte(uint64_t spte, int level) noexcept nogil:
    """Leaf at `level`?  Does not check presence (as in the kernel)."""
    return level == PG_LEVEL_4K or is_large_pte(spte)

cdef inline bint is_writable_pte(uint64_t spte) noexcept nogil:
    """Hardware-writable (bit 1, both formats)."""
    return (spte & PT_WRITABLE_MASK) != 0

cdef inline bint spte_ad_enabled(uint64_t spte) noexcept nogil:
    """A/D type is not DISABLED (WRPROT_ONLY counts as enabled)."""
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED

cdef inline bint spte_ad_need_write_protect(uint64_t spte) noexcept nogil:
    """Dirty tracking must write-protect (A/D DISABLED or WRPROT_ONLY)."""
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_ENABLED

cdef inline uint64_t spte_to_pfn(uint64_t spte) noexcept nogil:
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT

cdef inline uint64_t get_mmio_spte_generation(uint64_t spte) noexcept nogil:
    return (((spte & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_SHIFT) |
            ((spte & MMIO_SPTE_GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_SHIFT))

cdef inline uint64_t generation_mmio_spte_mask(uint64_t gen) noexcept nogil:
    return (((gen << MMIO_SPTE_GEN_LOW_SHIFT) & MMIO_SPTE_GEN_LOW_MASK) |
            ((gen << MMIO_SPTE_GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK))

cdef inline int spte_index_of(uint64_t gfn, int level) noexcept nogil:
    """SPTE_INDEX(gfn << 12, level): the entry that maps `gfn` at `level`."""
    return <int>((gfn >> ((level - 1) * SPTE_LEVEL_BITS)) & (SPTE_ENT_PER_PAGE - 1))


# ---------------------------------------------------------------------------
# Helpers that read the format's masks.
# ---------------------------------------------------------------------------

cdef inline bint is_mmu_writable_spte(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    return (spte & f.mmu_writable_mask) != 0

cdef inline bint is_executable_pte(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    return (spte & (f.x_mask | f.nx_mask)) == f.x_mask

cdef inline bint is_access_track_spte(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """A/D disabled and R, W, X all clear (saved in bits 54/56)."""
    return (not spte_ad_enabled(spte)) and (spte & f.acc_track_mask) == 0

cdef inline bint is_accessed_spte(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """v6.13+: the Accessed bit alone; A/D-disabled SPTEs carry a software A bit."""
    return (spte & f.accessed_mask) != 0

cdef inline bint is_dirty_spte(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """Dirty as KVM's dirty logging sees it.

    SPTEs whose dirty state is tracked by write protection (A/D type DISABLED
    or WRPROT_ONLY) are dirty while writable; the others when the D bit is set.
    """
    if spte_ad_need_write_protect(spte):
        return is_writable_pte(spte)
    return (spte & f.dirty_mask) != 0

cdef inline bint is_mmio_spte(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """MMIO SPTE: the MMIO value under the MMIO mask, with caching on.  The
    format guarantees an MMIO SPTE is never MMU-present (debug builds count
    an SPTE that is both)."""
    cdef bint mmio = (spte & f.mmio_mask) == f.mmio_value and f.mmio_caching
    if KVMMMU_DEBUG_ON and mmio and is_shadow_present_pte(spte):
        spte_mmu_warn(SPTE_WARN_MMIO_AMBIGUOUS)
    return mmio

cdef inline bint is_frozen_spte(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    return spte == f.frozen_spte

cdef inline bint is_ept_ve_possible(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """Could the CPU raise #VE for this SPTE?  Only with suppress-#VE in the
    present mask (EPT, v6.10+), the bit clear here, and not an EPT misconfig."""
    return ((f.present_mask & VMX_EPT_SUPPRESS_VE_BIT) != 0 and
            (spte & VMX_EPT_SUPPRESS_VE_BIT) == 0 and
            (spte & VMX_EPT_RWX_MASK) != VMX_EPT_MISCONFIG_WX_VALUE)

cdef uint64_t get_mmio_spte_gfn(const spte_fmt_t *f, uint64_t spte) noexcept nogil

cdef inline unsigned int get_mmio_spte_access(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    return <unsigned int>(spte & f.mmio_access_mask)

cdef uint64_t make_mmio_spte(const spte_fmt_t *f, uint64_t gfn, unsigned int access,
                             uint64_t gen) noexcept nogil

cdef uint64_t mark_spte_for_access_track(const spte_fmt_t *f, uint64_t spte) noexcept nogil

cdef uint64_t restore_acc_track_spte(const spte_fmt_t *f, uint64_t spte) noexcept nogil

cdef inline bint spte_needs_atomic_update(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """Can someone else change this present SPTE without holding mmu_lock?

    True when fast page fault may set W (MMU-writable but not writable), for
    every A/D-disabled SPTE (fast page fault may restore it), and when the
    CPU may set Dirty (writable, D clear).  A lost Accessed bit is tolerated.
    The kernel called this spte_has_volatile_bits() before v6.15.
    """
    if (not is_writable_pte(spte)) and is_mmu_writable_spte(f, spte):
        return True
    if not spte_ad_enabled(spte):
        return True
    return is_writable_pte(spte) and (spte & f.dirty_mask) == 0

cdef uint64_t modify_spte_protections(const spte_fmt_t *f, uint64_t spte,
                                      uint64_t set_mask, uint64_t clear_mask) noexcept nogil

cdef uint64_t make_spte_executable(const spte_fmt_t *f, uint64_t spte) noexcept nogil

cdef uint64_t make_spte_nonexecutable(const spte_fmt_t *f, uint64_t spte) noexcept nogil

cdef uint64_t make_nonleaf_spte(const spte_fmt_t *f, uint64_t child_pa,
                                bint ad_disabled) noexcept nogil

cdef uint64_t make_small_spte(const spte_fmt_t *f, uint64_t huge_spte, int child_level,
                              int index, unsigned int child_access,
                              bint nx_huge_pages) noexcept nogil

cdef uint64_t make_huge_spte(const spte_fmt_t *f, uint64_t small_spte, int level,
                             bint nx_huge_pages) noexcept nogil

cdef uint64_t make_spte(const spte_fmt_t *f, int level, unsigned int pte_access,
                        uint64_t pfn, uint64_t old_spte, unsigned int flags,
                        bint *wrprot) noexcept nogil

cdef bint make_spte_wants_unsync(int level, unsigned int pte_access, uint64_t old_spte,
                                 unsigned int flags) noexcept nogil


# ---------------------------------------------------------------------------
# Reserved-bit check.
# ---------------------------------------------------------------------------

cdef inline uint64_t get_rsvd_bits(const rsvd_bits_validate *chk, uint64_t pte, int level) noexcept nogil:
    return chk.rsvd_bits_mask[(pte >> 7) & 1][level - 1]

cdef inline bint is_bad_mt_xwr(const rsvd_bits_validate *chk, uint64_t pte) noexcept nogil:
    return (chk.bad_mt_xwr >> (pte & 0x3f)) & 1

cdef inline bint is_rsvd_spte(const rsvd_bits_validate *chk, uint64_t spte, int level) noexcept nogil:
    return is_bad_mt_xwr(chk, spte) or (spte & get_rsvd_bits(chk, spte, level)) != 0


cdef class SpteFormat:
    cdef spte_fmt_t fmt
    cdef readonly str name


cdef class RsvdBitsValidate:
    cdef rsvd_bits_validate chk
