"""The MMU-wide constants and geometry helpers, from ``mmu_defs.h``.

This is the one Python home of ``PAGE_SHIFT``, ``PAGE_SIZE``, ``PG_LEVEL_*``,
``PT64_ROOT_MAX_LEVEL``, ``KVM_NR_PAGE_SIZES``, ``KVM_MAX_HUGEPAGE_LEVEL``,
``ACC_*``, ``RET_PF_*`` and ``PTE_PREFETCH_NUM``, and of the memslot geometry
helpers ``KVM_PAGES_PER_HPAGE``, ``gfn_to_index`` and ``kvm_mmu_slot_lpages``.
Cython modules ``cimport`` the same names from ``mmu_defs.pxd``; every other
module imports them from here rather than defining its own copy.
"""
from operator import index as _index

from libc.stdint cimport uint64_t

from kvmmmu._core.mmu_defs cimport (
    PAGE_SHIFT as _PAGE_SHIFT, PAGE_SIZE as _PAGE_SIZE,
    SPTE_LEVEL_BITS as _SPTE_LEVEL_BITS, SPTE_ENT_PER_PAGE as _SPTE_ENT_PER_PAGE,
    PG_LEVEL_NONE as _PG_LEVEL_NONE, PG_LEVEL_4K as _PG_LEVEL_4K,
    PG_LEVEL_2M as _PG_LEVEL_2M, PG_LEVEL_1G as _PG_LEVEL_1G,
    PG_LEVEL_512G as _PG_LEVEL_512G, PG_LEVEL_256T as _PG_LEVEL_256T,
    PT64_ROOT_MAX_LEVEL as _PT64_ROOT_MAX_LEVEL,
    KVM_NR_PAGE_SIZES as _KVM_NR_PAGE_SIZES, KVM_MAX_HUGEPAGE_LEVEL as _KVM_MAX_HUGEPAGE_LEVEL,
    KVM_HPAGE_GFN_SHIFT_PER_LEVEL as _KVM_HPAGE_GFN_SHIFT_PER_LEVEL,
    ACC_EXEC_MASK as _ACC_EXEC_MASK, ACC_WRITE_MASK as _ACC_WRITE_MASK,
    ACC_USER_MASK as _ACC_USER_MASK, ACC_ALL as _ACC_ALL,
    RET_PF_CONTINUE as _RET_PF_CONTINUE, RET_PF_RETRY as _RET_PF_RETRY,
    RET_PF_EMULATE as _RET_PF_EMULATE, RET_PF_WRITE_PROTECTED as _RET_PF_WRITE_PROTECTED,
    RET_PF_INVALID as _RET_PF_INVALID, RET_PF_FIXED as _RET_PF_FIXED,
    RET_PF_SPURIOUS as _RET_PF_SPURIOUS, PTE_PREFETCH_NUM as _PTE_PREFETCH_NUM,
    KVM_PAGES_PER_HPAGE as _pages_per_hpage, gfn_to_index as _gfn_to_index,
    kvm_mmu_slot_lpages as _slot_lpages,
)

PAGE_SHIFT = _PAGE_SHIFT
PAGE_SIZE = int(_PAGE_SIZE)
SPTE_LEVEL_BITS = _SPTE_LEVEL_BITS
SPTE_ENT_PER_PAGE = _SPTE_ENT_PER_PAGE
PG_LEVEL_NONE = _PG_LEVEL_NONE
PG_LEVEL_4K = _PG_LEVEL_4K
PG_LEVEL_2M = _PG_LEVEL_2M
PG_LEVEL_1G = _PG_LEVEL_1G
PG_LEVEL_512G = _PG_LEVEL_512G
PG_LEVEL_256T = _PG_LEVEL_256T
PT64_ROOT_MAX_LEVEL = _PT64_ROOT_MAX_LEVEL
KVM_NR_PAGE_SIZES = _KVM_NR_PAGE_SIZES
KVM_MAX_HUGEPAGE_LEVEL = _KVM_MAX_HUGEPAGE_LEVEL
KVM_HPAGE_GFN_SHIFT_PER_LEVEL = _KVM_HPAGE_GFN_SHIFT_PER_LEVEL
ACC_EXEC_MASK = _ACC_EXEC_MASK
ACC_WRITE_MASK = _ACC_WRITE_MASK
ACC_USER_MASK = _ACC_USER_MASK
ACC_ALL = _ACC_ALL
RET_PF_CONTINUE = _RET_PF_CONTINUE
RET_PF_RETRY = _RET_PF_RETRY
RET_PF_EMULATE = _RET_PF_EMULATE
RET_PF_WRITE_PROTECTED = _RET_PF_WRITE_PROTECTED
RET_PF_INVALID = _RET_PF_INVALID
RET_PF_FIXED = _RET_PF_FIXED
RET_PF_SPURIOUS = _RET_PF_SPURIOUS
PTE_PREFETCH_NUM = _PTE_PREFETCH_NUM

#: RET_PF_* value -> the kernel's enum name.
RET_PF_NAMES = {
    RET_PF_CONTINUE: "RET_PF_CONTINUE", RET_PF_RETRY: "RET_PF_RETRY",
    RET_PF_EMULATE: "RET_PF_EMULATE", RET_PF_WRITE_PROTECTED: "RET_PF_WRITE_PROTECTED",
    RET_PF_INVALID: "RET_PF_INVALID", RET_PF_FIXED: "RET_PF_FIXED",
    RET_PF_SPURIOUS: "RET_PF_SPURIOUS",
}

cdef uint64_t _U64_MAX = 0xFFFFFFFFFFFFFFFF


cdef object _int(str name, object v):
    try:
        return _index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(v).__name__}") from None


cdef int _level(object level, int top=_KVM_MAX_HUGEPAGE_LEVEL) except -1:
    cdef object lv = _int("level", level)
    if not 1 <= lv <= top:
        raise ValueError(f"level {lv} is outside 1..{top}")
    return <int>lv


cdef uint64_t _u64(str name, object v) except? 0xFFFFFFFFFFFFFFFF:
    cdef object n = _int(name, v)
    if not 0 <= n <= _U64_MAX:
        raise ValueError(f"{name} {n:#x} is not a 64-bit frame number")
    return <uint64_t>n


def KVM_PAGES_PER_HPAGE(level):
    """4 KiB frames in one page of `level` (1..KVM_MAX_HUGEPAGE_LEVEL)."""
    return _pages_per_hpage(_level(level))


def gfn_to_index(gfn, base_gfn, level):
    """The kernel's gfn_to_index: the index of `gfn`'s frame at `level` in a
    slot's per-level arrays (index 0 holds `base_gfn`).  `gfn` below
    `base_gfn` is refused: the kernel never asks, and the unsigned result
    would wrap."""
    cdef uint64_t g = _u64("gfn", gfn), b = _u64("base_gfn", base_gfn)
    cdef int lv = _level(level)
    if g < b:
        raise ValueError(f"gfn {g:#x} is below base_gfn {b:#x}")
    return _gfn_to_index(g, b, lv)


def kvm_mmu_slot_lpages(base_gfn, npages, level):
    """__kvm_mmu_slot_lpages: entries a slot's per-level array needs."""
    cdef uint64_t b = _u64("base_gfn", base_gfn), n = _u64("npages", npages)
    cdef int lv = _level(level)
    if n == 0:
        raise ValueError("npages must be at least 1")
    if b + n < b:
        raise ValueError(f"base_gfn {b:#x} + npages {n:#x} overflows 64 bits")
    return _slot_lpages(b, n, lv)
