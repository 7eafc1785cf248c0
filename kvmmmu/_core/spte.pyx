"""Packed 64-bit SPTEs (Linux v6.18 ``arch/x86/kvm/mmu/spte.{h,c}``).

An SPTE ("shadow PTE") is the 64-bit entry KVM writes into the page tables
the hardware walks: shadow paging, NPT and EPT, shadow MMU and TDP MMU alike.
The kernel interprets SPTEs through a block of global masks set once at module
load (``kvm_mmu_reset_all_pte_masks`` for legacy/NPT, ``kvm_mmu_set_ept_masks``
for EPT).  Here that block is a :class:`SpteFormat`; helpers that read the
kernel's globals are methods of the format, the others are module functions.

Every helper is a ``noexcept nogil`` C function for the other Cython
modules: the one-line predicates ``cdef inline`` in spte.pxd, the builders
(make_spte, make_mmio_spte, access tracking, split/huge SPTEs) defined here
and declared in spte.pxd (other modules reach them through the C-API
capsule).  Each is wrapped here for Python, and the bulk forms are
single-pass loops over contiguous ``uint64`` numpy arrays.

Debug builds (``KVMMMU_DEBUG_CYTHON=1``, C macro ``KVMMMU_DEBUG``) count the
kernel's WARN_ON_ONCE / KVM_MMU_WARN_ON / KVM_BUG_ON conditions of
spte.c/spte.h that these helpers can see (:func:`mmu_warnings`); release
builds compile the checks away (:data:`DEBUG_BUILD` says which).

Invariants (the kernel's, checked by :meth:`SpteFormat.check_spte_writable_invariants`):

* every present SPTE, leaf or not, has ``SPTE_MMU_PRESENT_MASK`` (bit 11);
  MMIO, frozen and non-present values never do;
* MMU-writable clear => W clear; MMU-writable set => Host-writable set;
* an access-tracked SPTE (A/D disabled, R=W=X=0) keeps R and X in bits 54/56.
"""

cimport numpy as cnp
from libc.stdint cimport uint8_t, uint64_t

from operator import index as _index

import numpy as np

from kvmmmu._core._checks import check_array as _check_array, export, out_array as _out_array

cnp.import_array()

# --- constants, re-exported as Python ints ---------------------------------
globals().update(
    PAGE_SHIFT=PAGE_SHIFT, SPTE_LEVEL_BITS=SPTE_LEVEL_BITS, SPTE_ENT_PER_PAGE=SPTE_ENT_PER_PAGE,
    PG_LEVEL_NONE=PG_LEVEL_NONE, PG_LEVEL_4K=PG_LEVEL_4K, PG_LEVEL_2M=PG_LEVEL_2M,
    PG_LEVEL_1G=PG_LEVEL_1G, PG_LEVEL_512G=PG_LEVEL_512G, PG_LEVEL_256T=PG_LEVEL_256T,
    PT64_ROOT_MAX_LEVEL=PT64_ROOT_MAX_LEVEL,
    PT_PRESENT_MASK=PT_PRESENT_MASK, PT_WRITABLE_MASK=PT_WRITABLE_MASK, PT_USER_MASK=PT_USER_MASK,
    PT_PWT_MASK=PT_PWT_MASK, PT_PCD_MASK=PT_PCD_MASK, PT_ACCESSED_MASK=PT_ACCESSED_MASK,
    PT_DIRTY_MASK=PT_DIRTY_MASK, PT_PAGE_SIZE_MASK=PT_PAGE_SIZE_MASK, PT_PAT_MASK=PT_PAT_MASK,
    PT_GLOBAL_MASK=PT_GLOBAL_MASK, PT64_NX_MASK=PT64_NX_MASK,
    VMX_EPT_READABLE_MASK=VMX_EPT_READABLE_MASK, VMX_EPT_WRITABLE_MASK=VMX_EPT_WRITABLE_MASK,
    VMX_EPT_EXECUTABLE_MASK=VMX_EPT_EXECUTABLE_MASK, VMX_EPT_RWX_MASK=VMX_EPT_RWX_MASK,
    VMX_EPT_MT_EPTE_SHIFT=VMX_EPT_MT_EPTE_SHIFT, VMX_EPT_MT_MASK=VMX_EPT_MT_MASK,
    VMX_EPT_IPAT_BIT=VMX_EPT_IPAT_BIT, VMX_EPT_ACCESS_BIT=VMX_EPT_ACCESS_BIT,
    VMX_EPT_DIRTY_BIT=VMX_EPT_DIRTY_BIT, VMX_EPT_SUPPRESS_VE_BIT=VMX_EPT_SUPPRESS_VE_BIT,
    VMX_EPT_MISCONFIG_WX_VALUE=VMX_EPT_MISCONFIG_WX_VALUE,
    SPTE_MMU_PRESENT_MASK=SPTE_MMU_PRESENT_MASK, SPTE_TDP_AD_SHIFT=SPTE_TDP_AD_SHIFT,
    SPTE_TDP_AD_MASK=SPTE_TDP_AD_MASK, SPTE_TDP_AD_ENABLED=SPTE_TDP_AD_ENABLED,
    SPTE_TDP_AD_DISABLED=SPTE_TDP_AD_DISABLED, SPTE_TDP_AD_WRPROT_ONLY=SPTE_TDP_AD_WRPROT_ONLY,
    SPTE_BASE_ADDR_MASK=SPTE_BASE_ADDR_MASK,
    ACC_EXEC_MASK=ACC_EXEC_MASK, ACC_WRITE_MASK=ACC_WRITE_MASK, ACC_USER_MASK=ACC_USER_MASK,
    ACC_ALL=ACC_ALL,
    SHADOW_ACC_TRACK_SAVED_BITS_MASK=SHADOW_ACC_TRACK_SAVED_BITS_MASK,
    SHADOW_ACC_TRACK_SAVED_BITS_SHIFT=SHADOW_ACC_TRACK_SAVED_BITS_SHIFT,
    DEFAULT_SPTE_HOST_WRITABLE=DEFAULT_SPTE_HOST_WRITABLE,
    DEFAULT_SPTE_MMU_WRITABLE=DEFAULT_SPTE_MMU_WRITABLE,
    EPT_SPTE_HOST_WRITABLE=EPT_SPTE_HOST_WRITABLE, EPT_SPTE_MMU_WRITABLE=EPT_SPTE_MMU_WRITABLE,
    MMIO_SPTE_GEN_LOW_MASK=MMIO_SPTE_GEN_LOW_MASK, MMIO_SPTE_GEN_HIGH_MASK=MMIO_SPTE_GEN_HIGH_MASK,
    MMIO_SPTE_GEN_LOW_SHIFT=MMIO_SPTE_GEN_LOW_SHIFT,
    MMIO_SPTE_GEN_HIGH_SHIFT=MMIO_SPTE_GEN_HIGH_SHIFT, MMIO_SPTE_GEN_MASK=MMIO_SPTE_GEN_MASK,
    SPTE_MMIO_ALLOWED_MASK=SPTE_MMIO_ALLOWED_MASK,
    SHADOW_NONPRESENT_OR_RSVD_MASK_LEN=SHADOW_NONPRESENT_OR_RSVD_MASK_LEN,
    SHADOW_NONPRESENT_VALUE=SHADOW_NONPRESENT_VALUE_64,
    FROZEN_SPTE=SHADOW_NONPRESENT_VALUE_64 | FROZEN_SPTE_LOW_BITS,
    MKSPTE_PREFETCH=MKSPTE_PREFETCH, MKSPTE_SYNCHRONIZING=MKSPTE_SYNCHRONIZING,
    MKSPTE_HOST_WRITABLE=MKSPTE_HOST_WRITABLE, MKSPTE_AD_DISABLED=MKSPTE_AD_DISABLED,
    MKSPTE_AD_WRPROT_ONLY=MKSPTE_AD_WRPROT_ONLY, MKSPTE_NX_HUGE_PAGES=MKSPTE_NX_HUGE_PAGES,
    MKSPTE_HOST_MMIO=MKSPTE_HOST_MMIO, MKSPTE_UNSYNC_REFUSED=MKSPTE_UNSYNC_REFUSED,
)

#: Width of the PFN field (bits 51:12).
PFN_BITS = 40
cdef uint64_t _PFN_LIMIT = (<uint64_t>1) << 40


# --- SPTE builders (declared in spte.pxd, exported through the C-API capsule) --
#
# KVMMMU_DEBUG_ON is a compile-time 0 in release builds, so every debug check
# below is dead code there.

from kvmmmu._core.mmu_defs cimport KVM_PAGES_PER_HPAGE, kvmmmu_count_warn

cdef uint64_t[SPTE_WARN_NR_SITES] _mmu_warn_count

#: True when this module was built with KVMMMU_DEBUG (debug-only checks on).
DEBUG_BUILD = bool(KVMMMU_DEBUG_ON)

#: Debug check sites: counter index -> (kernel function, condition).
_WARN_SITES = {
    SPTE_WARN_MAKE_SPTE_NO_PRESENT_BIT:
        ("make_spte", "(pte_access | shadow_present_mask) == SHADOW_NONPRESENT_VALUE"),
    SPTE_WARN_MAKE_SPTE_WRITABLE_INVARIANT:
        ("make_spte", "new SPTE fails check_spte_writable_invariants()"),
    SPTE_WARN_ACC_TRACK_WRITABLE_INVARIANT:
        ("mark_spte_for_access_track", "SPTE fails check_spte_writable_invariants()"),
    SPTE_WARN_ACC_TRACK_SAVED_BITS:
        ("mark_spte_for_access_track", "Access Tracking saved bit locations are not zero"),
    SPTE_WARN_MMIO_NO_VALUE:
        ("make_mmio_spte", "shadow_mmio_value is 0 (MMIO caching off)"),
    SPTE_WARN_SMALL_NOT_HUGE:
        ("make_small_spte", "huge_spte is not a present huge SPTE"),
    SPTE_WARN_HUGE_NOT_PRESENT:
        ("make_huge_spte", "small_spte is not present, or level is PG_LEVEL_4K"),
    SPTE_WARN_MMIO_AMBIGUOUS:
        ("is_mmio_spte", "an MMU-present SPTE matches the MMIO value"),
}


def mmu_warnings():
    """Counts of the debug-only checks that failed since the last
    :func:`reset_mmu_warnings`, as ``{(kernel function, condition): count}``
    (failed sites only).  Every failure counts, where the kernel WARNs once.
    Always empty in a release build (:data:`DEBUG_BUILD` False)."""
    cdef int i
    cdef dict res = {}
    for i in range(<int>SPTE_WARN_NR_SITES):
        if _mmu_warn_count[i]:
            res[_WARN_SITES[i]] = int(_mmu_warn_count[i])
    return res


def reset_mmu_warnings():
    """Zero the debug-check counters of :func:`mmu_warnings`."""
    cdef int i
    for i in range(<int>SPTE_WARN_NR_SITES):
        _mmu_warn_count[i] = 0

cdef void spte_mmu_warn(int site) noexcept nogil:
    if 0 <= site < SPTE_WARN_NR_SITES:
        kvmmmu_count_warn(&_mmu_warn_count[site])


cdef inline bint _writable_invariants_broken(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """check_spte_writable_invariants() would WARN: MMU-writable without
    Host-writable, or W without MMU-writable."""
    if spte & f.mmu_writable_mask:
        return (spte & f.host_writable_mask) == 0
    return is_writable_pte(spte)


cdef uint64_t get_mmio_spte_gfn(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    cdef uint64_t gpa = spte & f.nonpresent_or_rsvd_lower_gfn_mask
    gpa |= (spte >> SHADOW_NONPRESENT_OR_RSVD_MASK_LEN) & f.nonpresent_or_rsvd_mask
    return gpa >> PAGE_SHIFT

cdef uint64_t make_mmio_spte(const spte_fmt_t *f, uint64_t gfn, unsigned int access,
                             uint64_t gen) noexcept nogil:
    """MMIO SPTE for `gfn` with MMIO generation `gen` (already <= MMIO_SPTE_GEN_MASK)."""
    cdef uint64_t gpa = gfn << PAGE_SHIFT
    if KVMMMU_DEBUG_ON and f.mmio_value == 0:
        spte_mmu_warn(SPTE_WARN_MMIO_NO_VALUE)
    cdef uint64_t spte = generation_mmio_spte_mask(gen & MMIO_SPTE_GEN_MASK)
    spte |= f.mmio_value | (access & f.mmio_access_mask)
    spte |= gpa | f.nonpresent_or_rsvd_mask
    spte |= (gpa & f.nonpresent_or_rsvd_mask) << SHADOW_NONPRESENT_OR_RSVD_MASK_LEN
    return spte

cdef uint64_t mark_spte_for_access_track(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """A/D enabled: clear Accessed.  A/D disabled: save R/X in bits 54/56 and
    clear R/W/X and the software Accessed bit (W is not saved)."""
    if spte_ad_enabled(spte):
        return spte & ~f.accessed_mask
    if is_access_track_spte(f, spte):
        return spte
    if KVMMMU_DEBUG_ON:
        if _writable_invariants_broken(f, spte):
            spte_mmu_warn(SPTE_WARN_ACC_TRACK_WRITABLE_INVARIANT)
        if spte & (SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT):
            spte_mmu_warn(SPTE_WARN_ACC_TRACK_SAVED_BITS)
    spte |= (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    spte &= ~(f.acc_track_mask | f.accessed_mask)
    return spte

cdef uint64_t restore_acc_track_spte(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    """Undo access tracking: R and X come back from bits 54/56, W stays clear."""
    cdef uint64_t saved = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
    spte &= ~f.acc_track_mask
    spte &= ~(SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)
    return spte | saved

cdef uint64_t modify_spte_protections(const spte_fmt_t *f, uint64_t spte,
                                      uint64_t set_mask, uint64_t clear_mask) noexcept nogil:
    cdef bint tracked = is_access_track_spte(f, spte)
    if tracked:
        spte = restore_acc_track_spte(f, spte)
    spte = (spte | set_mask) & ~clear_mask
    if tracked:
        spte = mark_spte_for_access_track(f, spte)
    return spte

cdef uint64_t make_spte_executable(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    return modify_spte_protections(f, spte, f.x_mask, f.nx_mask)

cdef uint64_t make_spte_nonexecutable(const spte_fmt_t *f, uint64_t spte) noexcept nogil:
    return modify_spte_protections(f, spte, f.nx_mask, f.x_mask)

cdef uint64_t make_nonleaf_spte(const spte_fmt_t *f, uint64_t child_pa,
                                bint ad_disabled) noexcept nogil:
    """Link to a child table at physical address `child_pa`: always RWX/P+W+U."""
    cdef uint64_t spte = SPTE_MMU_PRESENT_MASK
    spte |= (child_pa & SPTE_BASE_ADDR_MASK) | f.present_mask | PT_WRITABLE_MASK
    spte |= f.user_mask | f.x_mask
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    else:
        spte |= f.accessed_mask
    return spte

cdef uint64_t make_small_spte(const spte_fmt_t *f, uint64_t huge_spte, int child_level,
                              int index, unsigned int child_access,
                              bint nx_huge_pages) noexcept nogil:
    """Entry `index` of the table that replaces `huge_spte` (child level
    `child_level`); every other bit is inherited.  make_huge_page_split_spte()
    before v6.13."""
    if KVMMMU_DEBUG_ON and not (is_shadow_present_pte(huge_spte) and is_large_pte(huge_spte)):
        spte_mmu_warn(SPTE_WARN_SMALL_NOT_HUGE)
    cdef uint64_t child = huge_spte | ((<uint64_t>index * KVM_PAGES_PER_HPAGE(child_level)) << PAGE_SHIFT)
    if child_level == PG_LEVEL_4K:
        child &= ~PT_PAGE_SIZE_MASK
        if (child_access & ACC_EXEC_MASK) and nx_huge_pages:
            child = make_spte_executable(f, child)
    return child

cdef uint64_t make_huge_spte(const spte_fmt_t *f, uint64_t small_spte, int level,
                             bint nx_huge_pages) noexcept nogil:
    """Huge SPTE at `level` covering the page `small_spte` maps (in-place recovery)."""
    if KVMMMU_DEBUG_ON and (not is_shadow_present_pte(small_spte) or level == PG_LEVEL_4K):
        spte_mmu_warn(SPTE_WARN_HUGE_NOT_PRESENT)
    cdef uint64_t huge = small_spte | PT_PAGE_SIZE_MASK
    huge &= ~((KVM_PAGES_PER_HPAGE(level) - 1) << PAGE_SHIFT)
    if nx_huge_pages:
        huge = make_spte_nonexecutable(f, huge)
    return huge

cdef uint64_t make_spte(const spte_fmt_t *f, int level, unsigned int pte_access,
                        uint64_t pfn, uint64_t old_spte, unsigned int flags,
                        bint *wrprot) noexcept nogil:
    """Leaf SPTE (v6.18 make_spte).  `flags` is a MKSPTE_* mask; `*wrprot` is
    set when the write was refused because the gfn is shadowed (the caller
    evaluated mmu_try_to_unsync_pages into MKSPTE_UNSYNC_REFUSED)."""
    cdef uint64_t spte = SPTE_MMU_PRESENT_MASK
    cdef bint prefetch = (flags & MKSPTE_PREFETCH) != 0
    cdef bint synchronizing = (flags & MKSPTE_SYNCHRONIZING) != 0
    wrprot[0] = False
    if KVMMMU_DEBUG_ON and (pte_access | f.present_mask) == f.nonpresent_value:
        spte_mmu_warn(SPTE_WARN_MAKE_SPTE_NO_PRESENT_BIT)
    if flags & MKSPTE_AD_DISABLED:
        spte |= SPTE_TDP_AD_DISABLED
    elif flags & MKSPTE_AD_WRPROT_ONLY:
        spte |= SPTE_TDP_AD_WRPROT_ONLY
    spte |= f.present_mask
    if (not prefetch) or synchronizing:
        spte |= f.accessed_mask
    if level > PG_LEVEL_4K and (pte_access & ACC_EXEC_MASK) and (flags & MKSPTE_NX_HUGE_PAGES):
        pte_access &= ~ACC_EXEC_MASK
    if pte_access & ACC_EXEC_MASK:
        spte |= f.x_mask
    else:
        spte |= f.nx_mask
    if pte_access & ACC_USER_MASK:
        spte |= f.user_mask
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if f.is_ept:
        spte |= f.mmio_memtype if (flags & MKSPTE_HOST_MMIO) else f.ram_memtype
    if flags & MKSPTE_HOST_WRITABLE:
        spte |= f.host_writable_mask
    else:
        pte_access &= ~ACC_WRITE_MASK
    spte |= pfn << PAGE_SHIFT
    if pte_access & ACC_WRITE_MASK:
        if ((not is_last_spte(old_spte, level) or not is_writable_pte(old_spte))
                and (flags & MKSPTE_UNSYNC_REFUSED)):
            wrprot[0] = True
        else:
            spte |= PT_WRITABLE_MASK | f.mmu_writable_mask | f.dirty_mask
    if prefetch and not synchronizing:
        spte = mark_spte_for_access_track(f, spte)
    if KVMMMU_DEBUG_ON and _writable_invariants_broken(f, spte):
        spte_mmu_warn(SPTE_WARN_MAKE_SPTE_WRITABLE_INVARIANT)
    return spte

cdef bint make_spte_wants_unsync(int level, unsigned int pte_access, uint64_t old_spte,
                                 unsigned int flags) noexcept nogil:
    """Would make_spte() call mmu_try_to_unsync_pages() for these inputs?"""
    if not (flags & MKSPTE_HOST_WRITABLE) or not (pte_access & ACC_WRITE_MASK):
        return False
    return not is_last_spte(old_spte, level) or not is_writable_pte(old_spte)


# --- argument checking (Python level, before any state is touched) ---------

# Integers are taken as operator.index takes them (int, bool, numpy
# integers); a float or a string is a TypeError naming the argument, never
# truncated.  Exact ints skip the index call.

cdef inline object _int(object value, str name):
    if type(value) is int:
        return value
    try:
        return _index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None


cdef inline object _int_in(object value, str name, object lo, object hi):
    """`value` as an int in lo..hi, or TypeError/ValueError naming `name`."""
    cdef object v = _int(value, name)
    if not lo <= v <= hi:
        raise ValueError(f"{name}={v} is outside {lo}..{hi}")
    return v


cdef inline uint64_t _u64(object value, str name) except? 0:
    cdef object v = _int(value, name)
    if v < 0 or v > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{name}={v:#x} does not fit in 64 bits")
    return <uint64_t>v


cdef inline int _level(object level, str name="level") except -1:
    return <int>_int_in(level, name, PG_LEVEL_4K, PT64_ROOT_MAX_LEVEL)


cdef inline bint _bool(object value, str name) except -1:
    """A flag: bool, or an int 0/1 (not truthiness: "no" is refused)."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    return <bint>_int_in(value, name, 0, 1)


cdef inline uint64_t _pfn(object pfn, str name="pfn") except? 0:
    cdef uint64_t v = _u64(pfn, name)
    if v >= _PFN_LIMIT:
        raise ValueError(f"{name}={v:#x} is wider than the 40-bit PFN field (bits 51:12)")
    return v


cdef inline unsigned int _access(object access, str name="pte_access") except? 0:
    cdef object a = _int(access, name)
    if not 0 <= a <= ACC_ALL:
        raise ValueError(f"{name}={a} is not an ACC_* mask (0..7)")
    return <unsigned int>a


# --- format-independent helpers --------------------------------------------
#
# The C helpers in spte.pxd carry the kernel's names, so the Python wrappers
# are defined under private names and published under the kernel's names.
def _export(name):
    return export(globals(), name)


@_export("is_shadow_present_pte")
def _py_is_shadow_present_pte(spte):
    """True if `spte` is MMU-present (bit 11): leaf or non-leaf, maybe
    access-tracked; never MMIO, frozen or SHADOW_NONPRESENT_VALUE."""
    return is_shadow_present_pte(_u64(spte, "spte"))


@_export("is_large_pte")
def _py_is_large_pte(spte):
    """True if the PS / EPT large-page bit (7) is set."""
    return is_large_pte(_u64(spte, "spte"))


@_export("is_last_spte")
def _py_is_last_spte(spte, level):
    """True if `spte` is a leaf at `level` (level 1, or PS set).  Presence is
    not checked, as in the kernel."""
    return is_last_spte(_u64(spte, "spte"), _level(level))


@_export("is_writable_pte")
def _py_is_writable_pte(spte):
    """Hardware W bit (1)."""
    return is_writable_pte(_u64(spte, "spte"))


@_export("spte_ad_enabled")
def _py_spte_ad_enabled(spte):
    """A/D type field (bits 53:52) is not DISABLED; the caller passes a present SPTE."""
    return spte_ad_enabled(_u64(spte, "spte"))


@_export("spte_ad_need_write_protect")
def _py_spte_ad_need_write_protect(spte):
    """A/D type is DISABLED or WRPROT_ONLY: dirty logging must write-protect."""
    return spte_ad_need_write_protect(_u64(spte, "spte"))


@_export("spte_to_pfn")
def _py_spte_to_pfn(spte):
    """Host PFN: ``(spte & SPTE_BASE_ADDR_MASK) >> 12``."""
    return spte_to_pfn(_u64(spte, "spte"))


@_export("get_mmio_spte_generation")
def _py_get_mmio_spte_generation(spte):
    """The 19-bit MMIO generation: SPTE bits 10:3 and 62:52."""
    return get_mmio_spte_generation(_u64(spte, "spte"))


# --- formats ----------------------------------------------------------------

# Kernel global name -> spte_fmt_t field, for attribute access on SpteFormat.
_KERNEL_NAMES = {
    "shadow_present_mask": "present_mask",
    "shadow_user_mask": "user_mask",
    "shadow_x_mask": "x_mask",
    "shadow_nx_mask": "nx_mask",
    "shadow_accessed_mask": "accessed_mask",
    "shadow_dirty_mask": "dirty_mask",
    "shadow_acc_track_mask": "acc_track_mask",
    "shadow_host_writable_mask": "host_writable_mask",
    "shadow_mmu_writable_mask": "mmu_writable_mask",
    "shadow_mmio_value": "mmio_value",
    "shadow_mmio_mask": "mmio_mask",
    "shadow_mmio_access_mask": "mmio_access_mask",
    "shadow_nonpresent_or_rsvd_mask": "nonpresent_or_rsvd_mask",
    "shadow_nonpresent_or_rsvd_lower_gfn_mask": "nonpresent_or_rsvd_lower_gfn_mask",
    "SHADOW_NONPRESENT_VALUE": "nonpresent_value",
    "FROZEN_SPTE": "frozen_spte",
    "kvm_ad_enabled": "ad_enabled",
    "enable_mmio_caching": "mmio_caching",
    "maxphyaddr": "maxphyaddr",
    "host_64bit": "host_64bit",
}


cdef inline uint64_t _genmask(int h, int l) noexcept:
    if h < l:
        return 0
    return ((~(<uint64_t>0)) << l) & ((~(<uint64_t>0)) >> (63 - h))


# Passed by the factories to __cinit__: a bare SpteFormat.__new__() or
# RsvdBitsValidate.__new__() (an object with all-zero masks) is refused.
cdef object _CONSTRUCT = object()


cdef SpteFormat _new_format(str name, int maxphyaddr, bint host_64bit, object l1tf_cache_bits):
    if not 32 <= maxphyaddr <= 52:
        raise ValueError(f"maxphyaddr={maxphyaddr!r} is outside 32..52")
    cdef SpteFormat self = SpteFormat.__new__(SpteFormat, _CONSTRUCT)
    self.name = name
    self.fmt.maxphyaddr = maxphyaddr
    self.fmt.host_64bit = host_64bit
    self.fmt.nonpresent_value = SHADOW_NONPRESENT_VALUE_64 if host_64bit else 0
    self.fmt.frozen_spte = self.fmt.nonpresent_value | FROZEN_SPTE_LOW_BITS
    self.fmt.ad_enabled = True
    # L1TF: the top SHADOW_NONPRESENT_OR_RSVD_MASK_LEN bits below the
    # cache's physical-address width are forced to 1 in non-present SPTEs.
    cdef int low_phys_bits = maxphyaddr
    if l1tf_cache_bits is not None:
        l1tf_cache_bits = _int(l1tf_cache_bits, "l1tf_cache_bits")
        if not (SHADOW_NONPRESENT_OR_RSVD_MASK_LEN + 13 <= l1tf_cache_bits
                < 52 - SHADOW_NONPRESENT_OR_RSVD_MASK_LEN):
            raise ValueError(
                f"l1tf_cache_bits={l1tf_cache_bits!r}: the L1TF guard needs 18..46 "
                "(the kernel applies it only below 47 cache address bits)")
        if l1tf_cache_bits < maxphyaddr:
            raise ValueError(
                f"l1tf_cache_bits={l1tf_cache_bits} is below maxphyaddr={maxphyaddr} "
                "(x86_cache_bits starts at x86_phys_bits and is only ever raised)")
        low_phys_bits = l1tf_cache_bits - SHADOW_NONPRESENT_OR_RSVD_MASK_LEN
        self.fmt.nonpresent_or_rsvd_mask = _genmask(l1tf_cache_bits - 1, low_phys_bits)
    self.fmt.nonpresent_or_rsvd_lower_gfn_mask = _genmask(low_phys_bits - 1, PAGE_SHIFT)
    return self

cdef void _set_mmio_spte_mask(SpteFormat self, uint64_t value, uint64_t mask, uint64_t access,
                              bint allow):
    """kvm_mmu_set_mmio_spte_mask(): an unusable value turns caching off."""
    if not allow:
        value = 0
    if mask & ~SPTE_MMIO_ALLOWED_MASK:
        value = 0
    if value & (self.fmt.nonpresent_or_rsvd_mask << SHADOW_NONPRESENT_OR_RSVD_MASK_LEN):
        value = 0
    if (value & mask) != value or (value and (self.fmt.frozen_spte & mask) == value):
        value = 0
    self.fmt.mmio_caching = value != 0
    self.fmt.mmio_value = value
    self.fmt.mmio_mask = mask
    self.fmt.mmio_access_mask = access


cdef class SpteFormat:
    """The SPTE flavour of one VM: the kernel's ``shadow_*`` mask globals.

    Build one with :meth:`legacy` (shadow paging and AMD NPT,
    ``kvm_mmu_reset_all_pte_masks``) or :meth:`ept` (Intel EPT,
    ``kvm_mmu_set_ept_masks``).  Every mask is readable under the kernel's
    global name, e.g. ``fmt.shadow_present_mask``, ``fmt.FROZEN_SPTE``.

    Methods named like kernel helpers behave like them; their ``*_array``
    twins apply the same rule to every element of a uint64 array in one
    nogil pass.

    Only the factories build one (``SpteFormat()`` and a bare
    ``SpteFormat.__new__`` raise TypeError).  Immutable once built, so one
    format may be shared by any number of threads; the bulk forms release
    the GIL and read each input element once.  An array written by another
    thread during a call gives unspecified (but in-range) results, never a
    crash; in-place forms on one array from two threads race like any numpy
    in-place update.
    """

    def __cinit__(self, *args, **kwargs):
        if len(args) != 1 or args[0] is not _CONSTRUCT or kwargs:
            raise TypeError("use SpteFormat.legacy(...) or SpteFormat.ept(...)")

    def __init__(self, *args, **kwargs):
        # Only reached through SpteFormat(...), which __cinit__ refuses.
        raise TypeError("use SpteFormat.legacy(...) or SpteFormat.ept(...)")

    # -- construction --------------------------------------------------------

    @staticmethod
    def legacy(*, maxphyaddr=46, mmio_caching=True, host_64bit=True, l1tf_cache_bits=None):
        """Legacy shadow paging / AMD NPT format (``kvm_mmu_reset_all_pte_masks``).

        Parameters
        ----------
        maxphyaddr : int
            Host MAXPHYADDR (CPUID 0x80000008 EAX[7:0]).  Below 52 the MMIO
            value is ``BIT(51) | BIT(0)`` (a reserved bit plus P); at 52 there is
            no reserved bit and MMIO caching is off.
        mmio_caching : bool
            The ``kvm.mmio_caching`` module parameter.
        host_64bit : bool
            64-bit host: SHADOW_NONPRESENT_VALUE is BIT(63); 32-bit host: 0.
        l1tf_cache_bits : int or None
            ``x86_cache_bits`` of a host with X86_BUG_L1TF, or None.
        """
        cdef int phys = _int_in(maxphyaddr, "maxphyaddr", 32, 52)
        cdef bint caching = _bool(mmio_caching, "mmio_caching")
        cdef SpteFormat self = _new_format("legacy", phys, _bool(host_64bit, "host_64bit"),
                                           l1tf_cache_bits)
        self.fmt.present_mask = PT_PRESENT_MASK
        self.fmt.user_mask = PT_USER_MASK
        self.fmt.x_mask = 0
        self.fmt.nx_mask = PT64_NX_MASK
        self.fmt.accessed_mask = PT_ACCESSED_MASK
        self.fmt.dirty_mask = PT_DIRTY_MASK
        self.fmt.acc_track_mask = 0
        self.fmt.host_writable_mask = DEFAULT_SPTE_HOST_WRITABLE
        self.fmt.mmu_writable_mask = DEFAULT_SPTE_MMU_WRITABLE
        self.fmt.is_ept = False
        cdef uint64_t mask = ((<uint64_t>1) << 51 | PT_PRESENT_MASK) if phys < 52 else 0
        _set_mmio_spte_mask(self, mask, mask, ACC_WRITE_MASK | ACC_USER_MASK, caching)
        return self

    @staticmethod
    def ept(*, ad_bits=True, exec_only=True, maxphyaddr=46, mmio_caching=True, host_64bit=True,
            l1tf_cache_bits=None):
        """Intel EPT format (``kvm_mmu_set_ept_masks(ad_bits, exec_only)``).

        EPT's Accessed/Dirty bits (8/9) are in the masks even without
        hardware A/D (v6.13+): A/D-disabled SPTEs carry them as software bits,
        and ``kvm_ad_enabled`` records the hardware capability.  Present SPTEs
        carry suppress-#VE (bit 63); R joins the present mask when the CPU
        cannot do execute-only.  RAM gets memtype WB with IPAT (0x70), host
        MMIO UC (0) — vmx_get_mt_mask for a VM without non-coherent DMA.
        """
        cdef bint ad = _bool(ad_bits, "ad_bits"), execonly = _bool(exec_only, "exec_only")
        cdef int phys = _int_in(maxphyaddr, "maxphyaddr", 32, 52)
        cdef bint caching = _bool(mmio_caching, "mmio_caching")
        cdef SpteFormat self = _new_format("ept" if ad else "ept-noad", phys,
                                           _bool(host_64bit, "host_64bit"), l1tf_cache_bits)
        self.fmt.ad_enabled = ad
        self.fmt.present_mask = VMX_EPT_SUPPRESS_VE_BIT | (0 if execonly else VMX_EPT_READABLE_MASK)
        self.fmt.user_mask = VMX_EPT_READABLE_MASK
        self.fmt.x_mask = VMX_EPT_EXECUTABLE_MASK
        self.fmt.nx_mask = 0
        self.fmt.accessed_mask = VMX_EPT_ACCESS_BIT
        self.fmt.dirty_mask = VMX_EPT_DIRTY_BIT
        self.fmt.acc_track_mask = VMX_EPT_RWX_MASK
        self.fmt.host_writable_mask = EPT_SPTE_HOST_WRITABLE
        self.fmt.mmu_writable_mask = EPT_SPTE_MMU_WRITABLE
        self.fmt.is_ept = True
        self.fmt.ram_memtype = (MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_IPAT_BIT
        self.fmt.mmio_memtype = MTRR_TYPE_UNCACHABLE << VMX_EPT_MT_EPTE_SHIFT
        _set_mmio_spte_mask(self, VMX_EPT_MISCONFIG_WX_VALUE,
                                 VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT, 0, caching)
        return self

    # -- introspection -------------------------------------------------------

    def masks(self):
        """All fields of the format as a dict (spte_fmt_t field names)."""
        return dict(self.fmt)

    def __getattr__(self, name):
        field = _KERNEL_NAMES.get(name)
        if field is None:
            raise AttributeError(f"SpteFormat has no attribute {name!r}")
        return dict(self.fmt)[field]

    def __eq__(self, other):
        if not isinstance(other, SpteFormat):
            return NotImplemented
        return self.masks() == (<SpteFormat>other).masks()

    def __hash__(self):
        return hash(tuple(sorted(self.masks().items())))

    def __repr__(self):
        return (f"SpteFormat.{self.name.replace('-noad', '')}(maxphyaddr={self.fmt.maxphyaddr}, "
                f"ad_enabled={bool(self.fmt.ad_enabled)}, "
                f"mmio_caching={bool(self.fmt.mmio_caching)}, host_64bit={bool(self.fmt.host_64bit)})")

    @property
    def max_gfn(self):
        """kvm_mmu_max_gfn(): the largest gfn the host's MAXPHYADDR can address."""
        return ((<uint64_t>1) << (self.fmt.maxphyaddr - PAGE_SHIFT)) - 1

    # -- scalar helpers ------------------------------------------------------

    def is_mmu_writable_spte(self, spte):
        """MMU-writable software bit (10 legacy, 58 EPT)."""
        return is_mmu_writable_spte(&self.fmt, _u64(spte, "spte"))

    def is_executable_pte(self, spte):
        """Legacy: NX clear.  EPT: X set."""
        return is_executable_pte(&self.fmt, _u64(spte, "spte"))

    def is_access_track_spte(self, spte):
        """A/D disabled and R=W=X=0 (R/X saved in bits 54/56)."""
        return is_access_track_spte(&self.fmt, _u64(spte, "spte"))

    def is_accessed_spte(self, spte):
        """The Accessed bit (v6.13+: hardware or software A bit alike)."""
        return is_accessed_spte(&self.fmt, _u64(spte, "spte"))

    def is_dirty_spte(self, spte):
        """Dirty as dirty logging sees it: W for SPTEs that need write
        protection (A/D DISABLED or WRPROT_ONLY), else the D bit.

        v6.18 has no function of this name: this is the test its dirty-log
        paths (``__rmap_clear_dirty``, the TDP MMU's clear-dirty walk) make.
        """
        return is_dirty_spte(&self.fmt, _u64(spte, "spte"))

    def is_mmio_spte(self, spte):
        """``(spte & shadow_mmio_mask) == mmio_value`` with MMIO caching on."""
        return is_mmio_spte(&self.fmt, _u64(spte, "spte"))

    def is_frozen_spte(self, spte):
        return is_frozen_spte(&self.fmt, _u64(spte, "spte"))

    def spte_needs_atomic_update(self, spte):
        """Could a lockless writer (fast page fault, the CPU's A/D assists)
        change this present SPTE?  See spte.pxd for the rules."""
        return spte_needs_atomic_update(&self.fmt, _u64(spte, "spte"))

    def spte_has_volatile_bits(self, spte):
        """The pre-v6.15 name of :meth:`spte_needs_atomic_update`; v6.18 rules
        (a clear Accessed bit no longer counts)."""
        return spte_needs_atomic_update(&self.fmt, _u64(spte, "spte"))

    def leaf_spte_change_needs_tlb_flush(self, old_spte, new_spte):
        """Only losing MMU-writable forces a flush (clearing A, D or W does not)."""
        return (is_mmu_writable_spte(&self.fmt, _u64(old_spte, "old_spte")) and
                not is_mmu_writable_spte(&self.fmt, _u64(new_spte, "new_spte")))

    def is_ept_ve_possible(self, spte):
        """Could the CPU raise #VE for this SPTE (suppress-#VE clear, not MMIO)?"""
        return is_ept_ve_possible(&self.fmt, _u64(spte, "spte"))

    def check_spte_writable_invariants(self, spte):
        """Raise AssertionError if a present leaf breaks the writable-bit rules:
        MMU-writable => Host-writable; not MMU-writable => not W."""
        cdef uint64_t s = _u64(spte, "spte")
        if s & self.fmt.mmu_writable_mask:
            if not (s & self.fmt.host_writable_mask):
                raise AssertionError(f"MMU-writable SPTE is not Host-writable: {s:#x}")
        elif is_writable_pte(s):
            raise AssertionError(f"Writable SPTE is not MMU-writable: {s:#x}")

    def get_mmio_spte_gfn(self, spte):
        """gfn of an MMIO SPTE, undoing the L1TF relocation."""
        return get_mmio_spte_gfn(&self.fmt, _u64(spte, "spte"))

    def get_mmio_spte_access(self, spte):
        return get_mmio_spte_access(&self.fmt, _u64(spte, "spte"))

    def make_mmio_spte(self, gfn, access, generation):
        """MMIO SPTE caching "no memslot at `gfn`" for MMIO `generation`.

        Parameters
        ----------
        gfn : int
            At most :attr:`max_gfn`.
        access : int
            ACC_* bits; only ``shadow_mmio_access_mask`` of them are kept.
        generation : int
            The memslots generation's low 19 bits (0..MMIO_SPTE_GEN_MASK).
        """
        cdef uint64_t g = _u64(gfn, "gfn")
        cdef unsigned int a = _access(access, "access")
        cdef uint64_t gen = _u64(generation, "generation")
        if not self.fmt.mmio_caching:
            raise ValueError("MMIO caching is disabled for this format (enable_mmio_caching=0)")
        if g > self.max_gfn:
            raise ValueError(f"gfn={gfn:#x} is above kvm_mmu_max_gfn()={self.max_gfn:#x}")
        if gen > MMIO_SPTE_GEN_MASK:
            raise ValueError(f"generation={generation:#x} is above MMIO_SPTE_GEN_MASK "
                             f"({MMIO_SPTE_GEN_MASK:#x})")
        return make_mmio_spte(&self.fmt, g, a, gen)

    def make_spte(self, *, level, pte_access, pfn, old_spte=None, prefetch=False,
                  synchronizing=False, host_writable=True, ad_disabled=False,
                  ad_wrprot_only=False, nx_huge_pages=False, host_mmio=False,
                  unsync_refused=False):
        """Leaf SPTE as v6.18 ``make_spte()`` builds it.

        Parameters
        ----------
        level : int
            ``sp->role.level`` (1..5; PS is set above level 1).
        pte_access : int
            ACC_* bits (EXEC 1, WRITE 2, USER 4).
        pfn : int
            Host pfn, < 2**40.
        old_spte : int, optional
            The SPTE being replaced; default SHADOW_NONPRESENT_VALUE.
        prefetch, synchronizing, host_writable : bool
            As the kernel's arguments of the same names.
        ad_disabled, ad_wrprot_only : bool
            ``sp->role.ad_disabled`` / ``kvm_mmu_page_ad_need_write_protect()``.
        nx_huge_pages : bool
            ``is_nx_huge_page_enabled(kvm)``.
        host_mmio : bool
            ``kvm_is_mmio_pfn(pfn)`` (EPT memtype UC instead of WB).
        unsync_refused : bool
            What ``mmu_try_to_unsync_pages()`` would answer (non-zero = True);
            consulted only when the old SPTE is not a writable leaf
            (see :meth:`make_spte_wants_unsync`).

        Returns
        -------
        (int, bool)
            The new SPTE and ``wrprot`` (write access refused because the
            gfn is shadowed).
        """
        cdef int lvl = _level(level)
        cdef unsigned int acc = _access(pte_access)
        cdef uint64_t p = _pfn(pfn)
        cdef uint64_t old = self.fmt.nonpresent_value if old_spte is None else _u64(old_spte, "old_spte")
        cdef unsigned int flags = _mkspte_flags(prefetch, synchronizing, host_writable, ad_disabled,
                                                ad_wrprot_only, nx_huge_pages, host_mmio,
                                                unsync_refused)
        cdef bint wrprot = False
        cdef uint64_t spte = make_spte(&self.fmt, lvl, acc, p, old, flags, &wrprot)
        return spte, bool(wrprot)

    def make_spte_wants_unsync(self, *, level, pte_access, old_spte=None, host_writable=True):
        """Would make_spte() ask mmu_try_to_unsync_pages() for these inputs?"""
        cdef uint64_t old = self.fmt.nonpresent_value if old_spte is None else _u64(old_spte, "old_spte")
        cdef unsigned int flags = MKSPTE_HOST_WRITABLE if _bool(host_writable, "host_writable") else 0
        return make_spte_wants_unsync(_level(level), _access(pte_access), old, flags)

    def make_nonleaf_spte(self, child_pa, ad_disabled=False):
        """SPTE linking to the child table at host physical address `child_pa`."""
        cdef uint64_t pa = _u64(child_pa, "child_pa")
        if pa & ~SPTE_BASE_ADDR_MASK:
            raise ValueError(f"child_pa={child_pa:#x} is not a page-aligned address below 2**52")
        return make_nonleaf_spte(&self.fmt, pa, _bool(ad_disabled, "ad_disabled"))

    def make_small_spte(self, huge_spte, child_level, index, child_access=ACC_ALL,
                        nx_huge_pages=False):
        """Entry `index` (0..511) of the child table that splits `huge_spte`.

        `child_level` and `child_access` are the new table's role.level and
        role.access.  Raises ValueError if `huge_spte` is not a present huge
        SPTE (the kernel's KVM_BUG_ON).
        """
        cdef uint64_t huge = _u64(huge_spte, "huge_spte")
        cdef int lvl = _level(child_level, "child_level")
        if lvl > PG_LEVEL_2M:
            raise ValueError(f"child_level={child_level} cannot be split into (huge pages are 2M/1G)")
        if not (is_shadow_present_pte(huge) and is_large_pte(huge)):
            raise ValueError(f"huge_spte={huge:#x} is not a present huge SPTE")
        cdef int idx = _int_in(index, "index", 0, SPTE_ENT_PER_PAGE - 1)
        return make_small_spte(&self.fmt, huge, lvl, idx, _access(child_access, "child_access"),
                               _bool(nx_huge_pages, "nx_huge_pages"))

    make_huge_page_split_spte = make_small_spte

    def make_huge_spte(self, small_spte, level, nx_huge_pages=False):
        """Huge SPTE at `level` (2 or 3) for the region `small_spte` lies in."""
        cdef uint64_t small = _u64(small_spte, "small_spte")
        cdef int lvl = _level(level)
        if lvl == PG_LEVEL_4K or lvl > PG_LEVEL_1G:
            raise ValueError(f"level={level} is not a huge-page level (2 or 3)")
        if not is_shadow_present_pte(small):
            raise ValueError(f"small_spte={small:#x} is not present")
        return make_huge_spte(&self.fmt, small, lvl, _bool(nx_huge_pages, "nx_huge_pages"))

    def mark_spte_for_access_track(self, spte):
        """Age a present SPTE: clear A, or (A/D disabled) make it access-tracked."""
        cdef uint64_t s = _u64(spte, "spte")
        if not spte_ad_enabled(s) and not is_access_track_spte(&self.fmt, s):
            if s & (SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT):
                raise ValueError(f"spte={s:#x} already has saved access bits set")
        return mark_spte_for_access_track(&self.fmt, s)

    def restore_acc_track_spte(self, spte):
        """Undo access tracking: R/X back from bits 54/56; W stays clear."""
        return restore_acc_track_spte(&self.fmt, _u64(spte, "spte"))

    def make_spte_executable(self, spte):
        return make_spte_executable(&self.fmt, _u64(spte, "spte"))

    def make_spte_nonexecutable(self, spte):
        return make_spte_nonexecutable(&self.fmt, _u64(spte, "spte"))

    def decode_spte(self, spte, gfn=0, level=PG_LEVEL_4K, sptep=0):
        """Render `spte` as the kernel's kvm_mmu_set_spte tracepoint prints it.

        ``gfn %llx spte %llx (rwxu) level %d at %llx``: r is set whenever the
        format has a present mask or P is set, w is bit 1, x is
        is_executable_pte, u the user (EPT: readable) bit.  `sptep` is the
        host physical address of the entry (see types.pxd).
        """
        # The fields as kvm_mmu_set_spte's TP_fast_assign computes them
        # (kvmmmu.mmutrace.kvm_mmu_set_spte_fields), rendered by its TP_printk;
        # done here so that the core needs nothing above it.
        cdef int lv = _level(level)
        cdef uint64_t g = _u64(gfn, "gfn"), v = _u64(spte, "spte"), p = _u64(sptep, "sptep")
        cdef uint64_t xm = self.fmt.x_mask, nxm = self.fmt.nx_mask
        r = "r" if (self.fmt.present_mask or (v & 1)) else "-"
        w = "w" if v & 2 else "-"
        x = "x" if (v & (xm | nxm)) == xm else "-"
        u = ("u" if v & self.fmt.user_mask else "-") if self.fmt.user_mask else ""
        return f"gfn {g:x} spte {v:x} ({r}{w}{x}{u}) level {lv} at {p:x}"

    def audit_sptes(self, sptes, level):
        """Check every entry of one table at `level` against the kernel's SPTE rules.

        Raises :class:`SpteAuditError` naming the first bad entry and the rule:

        * a non-present entry is SHADOW_NONPRESENT_VALUE, FROZEN_SPTE or an MMIO SPTE;
        * a present entry carries shadow_present_mask unless it is access-tracked;
        * only access-tracked SPTEs have the saved R/X bits 54/56;
        * legacy/NPT SPTEs have no A/D type bits (bits 53:52 are reserved in PAE);
        * a leaf that is MMU-writable is Host-writable; a writable leaf is MMU-writable.

        Returns the number of entries checked.
        """
        return _audit_sptes(self, sptes, level)

    # -- bulk forms ----------------------------------------------------------

    def is_shadow_present_pte_array(self, sptes, out=None):
        """Bulk :func:`is_shadow_present_pte`; returns a bool array."""
        return _predicate(P_PRESENT, &self.fmt, sptes, PG_LEVEL_4K, out)

    def is_last_spte_array(self, sptes, level, out=None):
        return _predicate(P_LAST, &self.fmt, sptes, _level(level), out)

    def is_writable_pte_array(self, sptes, out=None):
        return _predicate(P_WRITABLE, &self.fmt, sptes, PG_LEVEL_4K, out)

    def is_mmu_writable_spte_array(self, sptes, out=None):
        return _predicate(P_MMU_WRITABLE, &self.fmt, sptes, PG_LEVEL_4K, out)

    def is_accessed_spte_array(self, sptes, out=None):
        return _predicate(P_ACCESSED, &self.fmt, sptes, PG_LEVEL_4K, out)

    def is_dirty_spte_array(self, sptes, out=None):
        return _predicate(P_DIRTY, &self.fmt, sptes, PG_LEVEL_4K, out)

    def is_mmio_spte_array(self, sptes, out=None):
        return _predicate(P_MMIO, &self.fmt, sptes, PG_LEVEL_4K, out)

    def is_access_track_spte_array(self, sptes, out=None):
        return _predicate(P_ACC_TRACK, &self.fmt, sptes, PG_LEVEL_4K, out)

    def spte_to_pfn_array(self, sptes, out=None):
        """Bulk :func:`spte_to_pfn`; returns uint64 pfns."""
        _check_array("sptes", sptes)
        cdef const uint64_t[::1] s = sptes
        cdef Py_ssize_t n = s.shape[0], i
        res = _out_array("out", out, n, np.uint64, inputs=(sptes,))
        cdef uint64_t[::1] o = res
        with nogil:
            for i in range(n):
                o[i] = spte_to_pfn(s[i])
        return res

    def make_spte_array(self, pfns, *, level, pte_access, prefetch=False, synchronizing=False,
                        host_writable=True, ad_disabled=False, ad_wrprot_only=False,
                        nx_huge_pages=False, host_mmio=False, unsync_refused=False, out=None):
        """make_spte() for every pfn of `pfns`, with the other inputs shared
        and every old SPTE non-present.  Returns the uint64 SPTEs.

        Raises ValueError naming the first pfn wider than the PFN field;
        a caller-provided `out` is then left untouched.
        """
        _check_array("pfns", pfns)
        cdef int lvl = _level(level)
        cdef unsigned int acc = _access(pte_access)
        cdef unsigned int flags = _mkspte_flags(prefetch, synchronizing, host_writable, ad_disabled,
                                                ad_wrprot_only, nx_huge_pages, host_mmio,
                                                unsync_refused)
        cdef const uint64_t[::1] p = pfns
        cdef Py_ssize_t n = p.shape[0], i
        cdef uint64_t bad = 0, old = self.fmt.nonpresent_value
        if out is not None:
            with nogil:
                for i in range(n):
                    bad |= p[i]
            if bad >= _PFN_LIMIT:
                _raise_bad_pfn(pfns)
        res = _out_array("out", out, n, np.uint64, inputs=(pfns,))
        cdef uint64_t[::1] o = res
        with nogil:
            _make_spte_loop(&self.fmt, lvl, acc, &p[0] if n else NULL, old, flags,
                            &o[0] if n else NULL, n, &bad)
        if bad >= _PFN_LIMIT:
            _raise_bad_pfn(pfns)
        return res

    def write_protect_array(self, sptes, pt_protect=False, level=PG_LEVEL_4K):
        """spte_write_protect() on every present leaf (at `level`), in place.

        Clears W; with `pt_protect` (shadowing a guest page table) also
        MMU-writable.  Returns how many SPTEs changed.
        """
        return _mutate(M_WRPROT_PT if _bool(pt_protect, "pt_protect") else M_WRPROT, &self.fmt, sptes, _level(level))

    def clear_dirty_array(self, sptes, level=PG_LEVEL_4K):
        """__rmap_clear_dirty() on every present leaf (at `level`), in place:
        SPTEs that need write protection lose W, the others lose D.
        Returns how many SPTEs changed."""
        return _mutate(M_CLEAR_DIRTY, &self.fmt, sptes, _level(level))

    def access_track_array(self, sptes, level=PG_LEVEL_4K):
        """mark_spte_for_access_track() on every present leaf (at `level`),
        in place.  Returns how many SPTEs changed (were young)."""
        return _mutate(M_ACC_TRACK, &self.fmt, sptes, _level(level))


cdef unsigned int _mkspte_flags(object prefetch, object synchronizing, object host_writable,
                                object ad_disabled, object ad_wrprot_only, object nx_huge_pages,
                                object host_mmio, object unsync_refused) except? 0:
    return ((MKSPTE_PREFETCH if _bool(prefetch, "prefetch") else 0) |
            (MKSPTE_SYNCHRONIZING if _bool(synchronizing, "synchronizing") else 0) |
            (MKSPTE_HOST_WRITABLE if _bool(host_writable, "host_writable") else 0) |
            (MKSPTE_AD_DISABLED if _bool(ad_disabled, "ad_disabled") else 0) |
            (MKSPTE_AD_WRPROT_ONLY if _bool(ad_wrprot_only, "ad_wrprot_only") else 0) |
            (MKSPTE_NX_HUGE_PAGES if _bool(nx_huge_pages, "nx_huge_pages") else 0) |
            (MKSPTE_HOST_MMIO if _bool(host_mmio, "host_mmio") else 0) |
            (MKSPTE_UNSYNC_REFUSED if _bool(unsync_refused, "unsync_refused") else 0))


def _raise_bad_pfn(pfns):
    idx = int(np.argmax(pfns >= (1 << PFN_BITS)))
    raise ValueError(f"pfns[{idx}]={int(pfns[idx]):#x} is wider than the 40-bit PFN field")


cdef void _make_spte_loop(const spte_fmt_t *f, int level, unsigned int acc, const uint64_t *p,
                          uint64_t old, unsigned int flags, uint64_t *o, Py_ssize_t n,
                          uint64_t *bad) noexcept nogil:
    # make_spte() only ORs the pfn into bits 51:12 and no later step reads
    # those bits, so with shared inputs every SPTE is the pfn-0 SPTE | pfn << 12.
    cdef Py_ssize_t i
    cdef bint wrprot
    cdef uint64_t acc_bits = 0
    cdef uint64_t base = make_spte(f, level, acc, 0, old, flags, &wrprot)
    for i in range(n):
        acc_bits |= p[i]
        o[i] = base | (p[i] << PAGE_SHIFT)
    bad[0] = acc_bits


# --- fused single-pass loops --------------------------------------------------
#
# Branch-free bit tricks: baseline x86-64 (SSE2) has no 64-bit vector compare,
# so tests are written with shifts, OR, AND and negation, which it has.

cdef inline uint64_t _nz(uint64_t x) noexcept nogil:
    """1 if x != 0 else 0, without a compare."""
    return (x | ((<uint64_t>0) - x)) >> 63

cdef inline uint64_t _mask(uint64_t bit) noexcept nogil:
    """All-ones if bit (0 or 1) is set, else 0."""
    return (<uint64_t>0) - bit

cdef inline uint64_t _need_wp(uint64_t v) noexcept nogil:
    """spte_ad_need_write_protect(): A/D type bits 53:52 not zero, as 0/1."""
    return ((v >> SPTE_TDP_AD_SHIFT) | (v >> (SPTE_TDP_AD_SHIFT + 1))) & 1

cdef inline uint64_t _ad_disabled(uint64_t v) noexcept nogil:
    """A/D type == DISABLED (bit 52 set, bit 53 clear), as 0/1."""
    return (v >> SPTE_TDP_AD_SHIFT) & ~(v >> (SPTE_TDP_AD_SHIFT + 1)) & 1
#
# One loop body per operation, chosen at compile time through a fused "tag"
# type, so each specialization inlines its own rule.

cdef struct _tag_present:
    char unused
cdef struct _tag_last:
    char unused
cdef struct _tag_writable:
    char unused
cdef struct _tag_mmu_writable:
    char unused
cdef struct _tag_accessed:
    char unused
cdef struct _tag_dirty:
    char unused
cdef struct _tag_mmio:
    char unused
cdef struct _tag_acc_track:
    char unused

ctypedef fused _pred_tag:
    _tag_present
    _tag_last
    _tag_writable
    _tag_mmu_writable
    _tag_accessed
    _tag_dirty
    _tag_mmio
    _tag_acc_track

cdef enum:
    P_PRESENT, P_LAST, P_WRITABLE, P_MMU_WRITABLE, P_ACCESSED, P_DIRTY, P_MMIO, P_ACC_TRACK


cdef void _pred_loop(_pred_tag *tag, const spte_fmt_t *f, const uint64_t *s, uint8_t *o,
                     Py_ssize_t n, int level) noexcept nogil:
    # The masks are copied into locals: `o` is a byte pointer that may alias
    # anything, so reading them through `f` would reload them every element.
    # The per-element rules are those of the helpers in spte.pxd, written
    # branch-free so the loops vectorize.
    cdef Py_ssize_t i
    cdef uint64_t v
    cdef uint64_t all_last = level == PG_LEVEL_4K
    cdef uint64_t accessed = f.accessed_mask, dirty = f.dirty_mask
    cdef uint64_t mmu_writable = f.mmu_writable_mask, acc_track = f.acc_track_mask
    cdef uint64_t mmio_mask = f.mmio_mask
    # With caching off nothing is MMIO: (v & mask) never equals all-ones.
    cdef uint64_t mmio_value = f.mmio_value if f.mmio_caching else ~(<uint64_t>0)
    for i in range(n):
        v = s[i]
        if _pred_tag is _tag_present:
            o[i] = <uint8_t>((v >> 11) & 1)
        elif _pred_tag is _tag_last:
            o[i] = <uint8_t>(all_last | ((v >> 7) & 1))
        elif _pred_tag is _tag_writable:
            o[i] = <uint8_t>((v >> 1) & 1)
        elif _pred_tag is _tag_mmu_writable:
            o[i] = <uint8_t>_nz(v & mmu_writable)
        elif _pred_tag is _tag_accessed:
            o[i] = <uint8_t>_nz(v & accessed)
        elif _pred_tag is _tag_dirty:
            # is_dirty_spte: W when the A/D type needs write protection, else D.
            o[i] = <uint8_t>_nz(v & (dirty ^ ((PT_WRITABLE_MASK ^ dirty) & _mask(_need_wp(v)))))
        elif _pred_tag is _tag_mmio:
            o[i] = <uint8_t>(1 - _nz((v & mmio_mask) ^ mmio_value))
        else:
            o[i] = <uint8_t>(_ad_disabled(v) & (1 - _nz(v & acc_track)))


cdef object _predicate(int kind, const spte_fmt_t *f, sptes, int level, out):
    _check_array("sptes", sptes)
    cdef const uint64_t[::1] s = sptes
    cdef Py_ssize_t n = s.shape[0]
    res = _out_array("out", out, n, np.bool_, inputs=(sptes,))
    if n == 0:
        return res
    cdef uint8_t[::1] o = res.view(np.uint8)
    cdef const uint64_t *sp = &s[0]
    cdef uint8_t *op = &o[0]
    with nogil:
        if kind == P_PRESENT:
            _pred_loop(<_tag_present *>NULL, f, sp, op, n, level)
        elif kind == P_LAST:
            _pred_loop(<_tag_last *>NULL, f, sp, op, n, level)
        elif kind == P_WRITABLE:
            _pred_loop(<_tag_writable *>NULL, f, sp, op, n, level)
        elif kind == P_MMU_WRITABLE:
            _pred_loop(<_tag_mmu_writable *>NULL, f, sp, op, n, level)
        elif kind == P_ACCESSED:
            _pred_loop(<_tag_accessed *>NULL, f, sp, op, n, level)
        elif kind == P_DIRTY:
            _pred_loop(<_tag_dirty *>NULL, f, sp, op, n, level)
        elif kind == P_MMIO:
            _pred_loop(<_tag_mmio *>NULL, f, sp, op, n, level)
        else:
            _pred_loop(<_tag_acc_track *>NULL, f, sp, op, n, level)
    return res


cdef struct _tag_wrprot:
    char unused
cdef struct _tag_wrprot_pt:
    char unused
cdef struct _tag_clear_dirty:
    char unused
cdef struct _tag_age:
    char unused

ctypedef fused _mut_tag:
    _tag_wrprot
    _tag_wrprot_pt
    _tag_clear_dirty
    _tag_age

cdef enum:
    M_WRPROT, M_WRPROT_PT, M_CLEAR_DIRTY, M_ACC_TRACK


cdef enum:
    _BLOCK = 256    # SPTEs per block (2 KiB): the second read of a block hits L1


cdef inline uint64_t _leaf_mask(uint64_t old, uint64_t all_last) noexcept nogil:
    """All-ones for a present SPTE that is a leaf at the loop's level."""
    return _mask(((old >> 11) & 1) & (all_last | ((old >> 7) & 1)))


cdef Py_ssize_t _mut_loop(_mut_tag *tag, const spte_fmt_t *f, uint64_t *s, Py_ssize_t n,
                          int level) noexcept nogil:
    # Branch-free: the leaf mask is all-ones for a present leaf at `level`
    # and zero otherwise, and every element is stored back, so the loops
    # vectorize instead of mispredicting on interleaved empty entries.
    # The rules are those of spte_write_protect(), __rmap_clear_dirty() and
    # mark_spte_for_access_track().  Clear-dirty and aging depend on each
    # SPTE's A/D type; a block in which no SPTE has A/D type bits takes the
    # short A/D-enabled rule (clear D / clear A), found by OR-ing the block
    # first.
    cdef Py_ssize_t i, start, stop
    cdef uint64_t changed = 0, old, new, leaf, ad_off, untracked, aged, block_bits
    cdef uint64_t clear_pt = PT_WRITABLE_MASK | f.mmu_writable_mask, dirty = f.dirty_mask
    cdef uint64_t accessed = f.accessed_mask, acc_track = f.acc_track_mask
    cdef uint64_t all_last = level == PG_LEVEL_4K
    if _mut_tag is _tag_wrprot or _mut_tag is _tag_wrprot_pt:
        # The A/D type does not matter here.
        for i in range(n):
            old = s[i]
            if _mut_tag is _tag_wrprot:
                new = old & ~(PT_WRITABLE_MASK & _leaf_mask(old, all_last))
            else:
                new = old & ~(clear_pt & _leaf_mask(old, all_last))
            s[i] = new
            changed += _nz(new ^ old)
        return <Py_ssize_t>changed
    start = 0
    while start < n:
        stop = min(start + _BLOCK, n)
        block_bits = 0
        for i in range(start, stop):
            block_bits |= s[i]
        if (block_bits & SPTE_TDP_AD_MASK) == 0:
            # Every SPTE of the block is A/D-enabled.
            for i in range(start, stop):
                old = s[i]
                if _mut_tag is _tag_clear_dirty:
                    new = old & ~(dirty & _leaf_mask(old, all_last))
                else:
                    new = old & ~(accessed & _leaf_mask(old, all_last))
                s[i] = new
                changed += _nz(new ^ old)
            start = stop
            continue
        for i in range(start, stop):
            old = s[i]
            leaf = _leaf_mask(old, all_last)
            if _mut_tag is _tag_clear_dirty:
                # W for SPTEs that need write protection, D for the others.
                new = old & ~((dirty ^ ((PT_WRITABLE_MASK ^ dirty) & _mask(_need_wp(old)))) & leaf)
            else:
                # A/D enabled: clear A.  A/D disabled and not yet tracked:
                # save R/X in bits 54/56, clear RWX and A.  Tracked: unchanged.
                ad_off = _mask(_ad_disabled(old))
                untracked = ad_off & _mask(_nz(old & acc_track))
                aged = ((old | (((old & SHADOW_ACC_TRACK_SAVED_BITS_MASK)
                                 << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & untracked))
                        & ~((acc_track & untracked) | (accessed & (untracked | ~ad_off))))
                new = (aged & leaf) | (old & ~leaf)
            s[i] = new
            changed += _nz(new ^ old)
        start = stop
    return <Py_ssize_t>changed


cdef object _mutate(int kind, const spte_fmt_t *f, sptes, int level):
    _check_array("sptes", sptes, writable=True)
    cdef uint64_t[::1] s = sptes
    cdef Py_ssize_t n = s.shape[0], changed = 0
    if n == 0:
        return 0
    cdef uint64_t *sp = &s[0]
    with nogil:
        if kind == M_WRPROT:
            changed = _mut_loop(<_tag_wrprot *>NULL, f, sp, n, level)
        elif kind == M_WRPROT_PT:
            changed = _mut_loop(<_tag_wrprot_pt *>NULL, f, sp, n, level)
        elif kind == M_CLEAR_DIRTY:
            changed = _mut_loop(<_tag_clear_dirty *>NULL, f, sp, n, level)
        else:
            changed = _mut_loop(<_tag_age *>NULL, f, sp, n, level)
    return changed


# --- reserved-bit checks ------------------------------------------------------

cdef inline uint64_t _rsvd_bits(int s, int e):
    """rsvd_bits(s, e): bits s..e, 0 when e < s."""
    return _genmask(e, s)


cdef RsvdBitsValidate _rsvd_legacy(int maxphyaddr, int level, bint nx, bint gbpages, bint pse,
                                   bint amd):
    cdef RsvdBitsValidate self = RsvdBitsValidate.__new__(RsvdBitsValidate, _CONSTRUCT)
    cdef uint64_t (*m)[5]
    m = self.chk.rsvd_bits_mask
    cdef uint64_t pa_rsvd = _rsvd_bits(maxphyaddr, 63)
    cdef uint64_t high = pa_rsvd & _rsvd_bits(0, 51)
    cdef uint64_t nonleaf_bit8 = PT_GLOBAL_MASK if amd else 0
    cdef uint64_t gb = 0 if gbpages else PT_PAGE_SIZE_MASK
    if not nx:
        high |= PT64_NX_MASK
    if level == 2:
        m[0][1] = 0
        m[0][0] = 0
        m[1][0] = 0
        m[1][1] = _rsvd_bits(17, 21) if pse else 0
    elif level == 3:
        high = pa_rsvd & _rsvd_bits(0, 62)
        if not nx:
            high |= PT64_NX_MASK
        m[0][2] = PT64_NX_MASK | high | _rsvd_bits(5, 8) | _rsvd_bits(1, 2)
        m[0][1] = high
        m[0][0] = high
        m[1][1] = high | _rsvd_bits(13, 20)
        m[1][0] = m[0][0]
    else:
        m[0][4] = high | nonleaf_bit8 | PT_PAGE_SIZE_MASK
        m[1][4] = m[0][4]
        m[0][3] = high | nonleaf_bit8 | PT_PAGE_SIZE_MASK
        m[1][3] = m[0][3]
        m[0][2] = high | gb
        m[1][2] = high | gb | _rsvd_bits(13, 29)
        m[0][1] = high
        m[1][1] = high | _rsvd_bits(13, 20)
        m[0][0] = high
        m[1][0] = m[0][0]
    self.chk.bad_mt_xwr = 0
    return self


cdef RsvdBitsValidate _rsvd_ept(int maxphyaddr, bint execonly, int huge_level):
    cdef RsvdBitsValidate self = RsvdBitsValidate.__new__(RsvdBitsValidate, _CONSTRUCT)
    cdef uint64_t (*m)[5]
    m = self.chk.rsvd_bits_mask
    cdef uint64_t high = _rsvd_bits(maxphyaddr, 63) & _rsvd_bits(0, 51)
    cdef uint64_t large_1g = PT_PAGE_SIZE_MASK if huge_level < PG_LEVEL_1G else 0
    cdef uint64_t large_2m = PT_PAGE_SIZE_MASK if huge_level < PG_LEVEL_2M else 0
    m[0][4] = high | _rsvd_bits(3, 7)
    m[0][3] = high | _rsvd_bits(3, 7)
    m[0][2] = high | _rsvd_bits(3, 6) | large_1g
    m[0][1] = high | _rsvd_bits(3, 6) | large_2m
    m[0][0] = high
    m[1][4] = m[0][4]
    m[1][3] = m[0][3]
    m[1][2] = high | _rsvd_bits(12, 29) | large_1g
    m[1][1] = high | _rsvd_bits(12, 20) | large_2m
    m[1][0] = m[0][0]
    cdef uint64_t bad = 0
    cdef int memtype, xwr
    for memtype in range(8):
        for xwr in range(8):
            # UC-/reserved memtypes 2, 3, 7; write-only; write+exec without
            # read; exec-only when the CPU cannot do it.
            if (memtype in (2, 3, 7) or xwr == 0b010 or xwr == 0b110 or
                    (not execonly and xwr == 0b100)):
                bad |= (<uint64_t>1) << (memtype * 8 + xwr)
    self.chk.bad_mt_xwr = bad
    return self


cdef class RsvdBitsValidate:
    """``struct rsvd_bits_validate``: reserved-bit masks per (bit 7, level)
    plus EPT's bad memtype/XWR bitmap.  Build with :meth:`legacy` or
    :meth:`ept`; check with :meth:`is_rsvd_spte`.  Only the factories
    build one; immutable once built and safe to share between threads.
    """

    def __cinit__(self, *args, **kwargs):
        if len(args) != 1 or args[0] is not _CONSTRUCT or kwargs:
            raise TypeError("use RsvdBitsValidate.legacy(...) or RsvdBitsValidate.ept(...)")

    def __init__(self, *args, **kwargs):
        raise TypeError("use RsvdBitsValidate.legacy(...) or RsvdBitsValidate.ept(...)")

    @staticmethod
    def legacy(*, maxphyaddr, level, nx, gbpages, pse=False, amd=False):
        """__reset_rsvds_bits_mask() for a legacy/PAE/NPT table walk.

        `level` is the root level: 2 (32-bit), 3 (PAE), 4 or 5.  With 2-level
        PSE the 4 MiB page's reserved bits are those of PSE-36 (bits 21:17).
        """
        return _rsvd_legacy(_int_in(maxphyaddr, "maxphyaddr", 32, 52),
                            _int_in(level, "level", 2, PT64_ROOT_MAX_LEVEL), _bool(nx, "nx"),
                            _bool(gbpages, "gbpages"), _bool(pse, "pse"), _bool(amd, "amd"))

    @staticmethod
    def ept(*, maxphyaddr, execonly, huge_level=PG_LEVEL_1G):
        """__reset_rsvds_bits_mask_ept(); `huge_level` is the largest huge
        page level allowed (1 none, 2 for 2M, 3 for 1G)."""
        return _rsvd_ept(_int_in(maxphyaddr, "maxphyaddr", 32, 52), _bool(execonly, "execonly"),
                         _int_in(huge_level, "huge_level", PG_LEVEL_4K, PG_LEVEL_1G))

    @property
    def rsvd_bits_mask(self):
        """The masks as a (2, 5) uint64 array: [bit 7][level - 1]."""
        return np.array([[self.chk.rsvd_bits_mask[b][l] for l in range(5)] for b in range(2)],
                        dtype=np.uint64)

    @property
    def bad_mt_xwr(self):
        return self.chk.bad_mt_xwr

    def get_rsvd_bits(self, pte, level):
        return get_rsvd_bits(&self.chk, _u64(pte, "pte"), _level(level))

    def is_rsvd_spte(self, spte, level):
        """True if `spte` has a reserved bit set for `level`, or (EPT) a bad
        memtype/XWR combination."""
        return is_rsvd_spte(&self.chk, _u64(spte, "spte"), _level(level))

    def is_rsvd_spte_array(self, sptes, level, out=None):
        _check_array("sptes", sptes)
        cdef int lvl = _level(level)
        cdef const uint64_t[::1] s = sptes
        cdef Py_ssize_t n = s.shape[0], i
        res = _out_array("out", out, n, np.bool_, inputs=(sptes,))
        cdef uint8_t[::1] o = res.view(np.uint8)
        with nogil:
            for i in range(n):
                o[i] = is_rsvd_spte(&self.chk, s[i], lvl)
        return res


# --- auditor ------------------------------------------------------------------

class SpteAuditError(AssertionError):
    """An SPTE breaks one of the kernel's invariants (see :meth:`SpteFormat.audit_sptes`)."""


cdef enum:
    AUDIT_OK, AUDIT_MMU_WR_NOT_HOST_WR, AUDIT_W_NOT_MMU_WR, AUDIT_SAVED_BITS,
    AUDIT_PRESENT_MASK, AUDIT_AD_TYPE, AUDIT_BAD_NONPRESENT

_AUDIT_RULES = {
    AUDIT_MMU_WR_NOT_HOST_WR: "MMU-writable SPTE is not Host-writable",
    AUDIT_W_NOT_MMU_WR: "writable SPTE is not MMU-writable",
    AUDIT_SAVED_BITS: "access-track saved bits (54/56) set on an SPTE that is not access-tracked",
    AUDIT_PRESENT_MASK: "present SPTE lacks shadow_present_mask",
    AUDIT_AD_TYPE: "A/D type bits set in a legacy/NPT SPTE",
    AUDIT_BAD_NONPRESENT: ("non-present SPTE is neither SHADOW_NONPRESENT_VALUE, "
                           "FROZEN_SPTE nor an MMIO SPTE"),
}


cdef int _audit_one(const spte_fmt_t *f, uint64_t s, int level) noexcept nogil:
    cdef bint tracked
    if not is_shadow_present_pte(s):
        if s == f.nonpresent_value or s == f.frozen_spte or is_mmio_spte(f, s):
            return AUDIT_OK
        return AUDIT_BAD_NONPRESENT
    tracked = is_access_track_spte(f, s)
    if not f.is_ept and (s & SPTE_TDP_AD_MASK):
        return AUDIT_AD_TYPE
    if not tracked and (s & f.present_mask) != f.present_mask:
        return AUDIT_PRESENT_MASK
    if not tracked and (s & (SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)):
        return AUDIT_SAVED_BITS
    if is_last_spte(s, level):
        if s & f.mmu_writable_mask:
            if not (s & f.host_writable_mask):
                return AUDIT_MMU_WR_NOT_HOST_WR
        elif is_writable_pte(s):
            return AUDIT_W_NOT_MMU_WR
    return AUDIT_OK


cdef object _audit_sptes(SpteFormat fmt, sptes, level):
    _check_array("sptes", sptes)
    cdef int lvl = _level(level)
    cdef const uint64_t[::1] s = sptes
    cdef Py_ssize_t n = s.shape[0], i, bad_at = -1
    cdef int rule = AUDIT_OK
    with nogil:
        for i in range(n):
            rule = _audit_one(&fmt.fmt, s[i], lvl)
            if rule != AUDIT_OK:
                bad_at = i
                break
    if bad_at >= 0:
        raise SpteAuditError(f"sptes[{bad_at}]={s[bad_at]:#x} (level {lvl}, {fmt.name}): "
                             f"{_AUDIT_RULES[rule]}")
    return n


