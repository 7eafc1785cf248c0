"""The guest page-table walker's C core (Linux v6.18 ``paging_tmpl.h``).

KVM compiles ``paging_tmpl.h`` three times (PTTYPE 32, 64 and EPT); here one C
function, :c:func:`walk_addr_generic`, takes the PTTYPE from its ``gw_mmu_t``
and does what ``FNAME(walk_addr_generic)`` does, step for step:

1. trace ``kvm_mmu_pagetable_walk``; start from the guest pgd (CR3 or EPTP),
   or for PAE from the PDPTE register chosen by address bits 31:30;
2. per level, top-down: compute the entry's gpa, translate the table's gpa
   through the outer MMU when walking for L2 (``kvm_translate_gpa``), find
   the memslot (a hole ends the walk with a not-present fault), read the
   entry, trace ``kvm_mmu_paging_element``, AND its permission bits into the
   running access (NX inverted), stop on not-present or reserved bits;
3. ``permission_fault`` (the permission bitmap and the PKRU mask of the MMU);
4. the gfn of the leaf (plus the PSE-36 bits for 2-level 4 MiB pages);
5. ``protect_clean_gpte`` for reads, and the A/D write-back
   (``update_accessed_dirty_bits``) when an A bit, or for writes the leaf D
   bit, is clear; a write-back that finds an entry changed under it restarts
   the walk, as the kernel's cmpxchg does;
6. on failure: the error code (W and U of the access; F only with EFER.NX or
   CR4.SMEP), the fault address, the EPT exit qualification, and the
   ``kvm_mmu_walker_error`` event.

Events are recorded in the calling walk's own ``trace_buf_t`` (trace_buf.pxd:
fixed-width records, no Python) and drained to :mod:`kvmmmu.mmutrace`'s sink
after the walk or the batch; this module never imports mmutrace.

Python sees two classes: :class:`GuestMemory` (memslots over writable
buffers, holes allowed) and :class:`WalkContext` (one MMU: what
``kvmmmu.paging.GuestMmu`` computes from the CPU state and the guest CPU
model).  Use :mod:`kvmmmu.paging`; the arguments here are checked only for
type and range.

Invariants:

* ``gw_mem_t.slots`` never overlap; a slot's buffer stays exported (so it
  cannot be resized or freed) while the :class:`GuestMemory` lives.
* A read-only slot is never written: A/D bits of tables in it are traced but
  not stored (the kernel's ``pte_writable`` rule).
* ``permissions``/``pkru_mask`` are indexed only with access bits in
  ``GW_ACCESS_ALLOWED`` (so the index stays below 16).
"""

from kvmmmu._core.argcheck cimport u64_arg
cimport cython
cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

import numpy as np

from kvmmmu._core._checks import (check_array as _check_array, int_arg as _int_arg,
                                  out_array as _out_array, ObjectInitError)
from kvmmmu._core.trace_buf import print_flags as _print_flags

from kvmmmu._core.trace_buf cimport (
    trace_buf_t, trace_buf_init, trace_on, trace_push, trace_drain,
    TP_KVM_MMU_PAGETABLE_WALK, TP_KVM_MMU_PAGING_ELEMENT, TP_KVM_MMU_SET_ACCESSED_BIT,
    TP_KVM_MMU_SET_DIRTY_BIT, TP_KVM_MMU_WALKER_ERROR)
from kvmmmu._core.spte cimport (RsvdBitsValidate, rsvd_bits_validate, is_rsvd_spte,
                                ACC_EXEC_MASK, ACC_WRITE_MASK, ACC_USER_MASK, ACC_ALL,
                                PT_PRESENT_MASK, PT_PAGE_SIZE_MASK, PG_LEVEL_4K)

cnp.import_array()

cdef extern from "guest_walk_defs.h" nogil:
    const uint64_t PFERR_PRESENT_MASK
    const uint64_t PFERR_WRITE_MASK
    const uint64_t PFERR_USER_MASK
    const uint64_t PFERR_RSVD_MASK
    const uint64_t PFERR_FETCH_MASK
    const uint64_t PFERR_PK_MASK
    const uint64_t PFERR_SS_MASK
    const uint64_t PFERR_SGX_MASK
    const uint64_t PFERR_IMPLICIT_ACCESS
    const uint64_t GW_ACCESS_ALLOWED
    const uint64_t GW_INVALID_GPA
    const uint64_t GW_PT64_BASE_ADDR_MASK
    const uint64_t GW_PT32_BASE_ADDR_MASK
    const int GW_PT64_NX_SHIFT
    const int GW_PKEY_SHIFT
    const int GW_PT_ACCESSED_SHIFT
    const int GW_PT_DIRTY_SHIFT
    const int GW_EPT_ACCESSED_SHIFT
    const int GW_EPT_DIRTY_SHIFT
    const int GW_PSE36_SHIFT
    const uint64_t GW_PSE36_MASK
    const uint64_t EPT_VIOLATION_ACC_READ
    const uint64_t EPT_VIOLATION_ACC_WRITE
    const uint64_t EPT_VIOLATION_ACC_INSTR
    const int EPT_VIOLATION_PROT_SHIFT

globals().update(
    PTTYPE_32=PTTYPE_32, PTTYPE_64=PTTYPE_64, PTTYPE_EPT=PTTYPE_EPT,
    PFERR_PRESENT_MASK=PFERR_PRESENT_MASK, PFERR_WRITE_MASK=PFERR_WRITE_MASK,
    PFERR_USER_MASK=PFERR_USER_MASK, PFERR_RSVD_MASK=PFERR_RSVD_MASK,
    PFERR_FETCH_MASK=PFERR_FETCH_MASK, PFERR_PK_MASK=PFERR_PK_MASK, PFERR_SS_MASK=PFERR_SS_MASK,
    PFERR_SGX_MASK=PFERR_SGX_MASK, PFERR_IMPLICIT_ACCESS=PFERR_IMPLICIT_ACCESS,
    ACCESS_ALLOWED=GW_ACCESS_ALLOWED, INVALID_GPA=GW_INVALID_GPA,
    EPT_VIOLATION_ACC_READ=EPT_VIOLATION_ACC_READ, EPT_VIOLATION_ACC_WRITE=EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_ACC_INSTR=EPT_VIOLATION_ACC_INSTR,
)

# ``flags`` bits of :data:`WALK_DTYPE`.
cdef enum:
    WALK_FAULT = 1          # the walk failed; error_code/address are the fault's
    WALK_NESTED_FAULT = 2   # fault.nested_page_fault (raised by the outer/EPT MMU)
    GW_ERR_NOT_PRESENT = 0x10000    # internal marker: "goto error" with errcode 0

globals().update(WALK_FAULT=WALK_FAULT, WALK_NESTED_FAULT=WALK_NESTED_FAULT)

# One batch result.  The C struct and the dtype must agree byte for byte.
ctypedef struct walk_result_t:
    uint64_t gpa                 # translation (INVALID_GPA on a fault)
    uint64_t address             # fault address (0 on success)
    uint16_t error_code          # fault error code (0 on success)
    uint8_t level                # leaf level (PG_LEVEL_NONE with paging off)
    uint8_t pte_access           # ACC_* of the walk (success only)
    uint8_t flags                # WALK_FAULT | WALK_NESTED_FAULT
    uint8_t exit_qualification   # EPT violation qualification bits 5:0
    uint16_t retries             # restarts after a changed entry (saturates)

#: Structured dtype of :meth:`WalkContext.walk_array` results (24 bytes).
WALK_DTYPE = np.dtype([
    ("gpa", "<u8"), ("address", "<u8"), ("error_code", "<u2"), ("level", "u1"),
    ("pte_access", "u1"), ("flags", "u1"), ("exit_qualification", "u1"), ("retries", "<u2"),
])
assert WALK_DTYPE.itemsize == sizeof(walk_result_t) == 24, "walk_result_t layout"


class GuestMemoryError(ValueError):
    """A memslot that cannot be added (alignment, size, overlap, buffer type)."""


class GpaNotMappedError(LookupError):
    """A gpa range that is not (entirely) inside one memslot."""


class GpaReadOnlyError(PermissionError):
    """A write to a read-only memslot through :class:`GuestMemory`."""


# ---------------------------------------------------------------------------
# Walk results: built once, from C
# ---------------------------------------------------------------------------

_ACCESS_STR = ("---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux")


@cython.final
cdef class PageFault:
    """``struct x86_exception`` of a failed walk (immutable).

    Attributes
    ----------
    error_code : int
        PFERR bits: P, W, U, RSVD, F, PK.  For EPT, RSVD means "EPT
        misconfiguration".
    address : int
        The faulting address (the gva; for a nested fault, the L2 gpa).
    nested_page_fault : bool
        Raised by the outer MMU (EPT), not by this walk's own tables.
    exit_qualification : int
        EPT only (0 otherwise and for misconfigurations): access bits 2:0
        (read, write, fetch) and the accumulated R/W/X of the walked entries
        in bits 5:3.
    """
    cdef readonly uint64_t error_code
    cdef readonly uint64_t address
    cdef readonly bint nested_page_fault
    cdef readonly uint64_t exit_qualification

    def __init__(self, error_code, address, nested_page_fault=False, exit_qualification=0):
        self.error_code = _u64(error_code, "error_code")
        self.address = _u64(address, "address")
        if not isinstance(nested_page_fault, (bool, int)):
            raise TypeError("nested_page_fault must be a bool")
        self.nested_page_fault = nested_page_fault
        self.exit_qualification = _u64(exit_qualification, "exit_qualification")

    def _key(self):
        return (self.error_code, self.address, self.nested_page_fault, self.exit_qualification)

    def __eq__(self, other):
        if not isinstance(other, PageFault):
            return NotImplemented
        return self._key() == (<PageFault>other)._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (f"PageFault(error_code={self.error_code}, address={self.address}, "
                f"nested_page_fault={bool(self.nested_page_fault)}, "
                f"exit_qualification={self.exit_qualification})")

    def __str__(self):
        return (f"#PF error_code={self.error_code:#x} ({_print_flags(self.error_code)}) "
                f"address={self.address:#x}" + (" nested" if self.nested_page_fault else ""))

    def __reduce__(self):
        return (PageFault, self._key())


@cython.final
cdef class GuestWalker:
    """One walk (``struct guest_walker``), filled by the C walker (immutable).

    Tuples are indexed ``[level - 1]``; only levels ``level..max_level`` were
    walked (on a fault, only those read before it).  Made only by
    :meth:`WalkContext.walk` (``GuestWalker()`` gives an empty record).

    Attributes
    ----------
    gva, access : int
        What was walked.
    pttype : int
    level : int
        Level of the leaf (1 = 4 KiB), or where the walk stopped; 0 with
        paging off.
    max_level : int
        First level read from memory (2 for PAE).
    table_gfn, pte_gpa, ptes : tuple of int
        The table, the entry's gpa and its value (after A/D write-back).
    pt_access : tuple of int
        ACC_* bits granted by the levels above each level.
    pte_access : int
        Effective ACC_* bits of the translation (a read of a clean page has
        no ACC_WRITE: ``protect_clean_gpte``).
    gfn : int
        Translated frame (success only).
    fault : PageFault or None
    retries : int
        Walk restarts because an A/D write-back found an entry changed (a
        table that maps itself).
    ad_written : int
        Bit ``level - 1`` is set when this walk wrote an A or D bit into the
        entry of that level (``pte_gpa[level - 1]``): the table pages KVM
        dirtied (``mark_page_dirty_in_slot`` in the kernel's write-back).
    """
    cdef guest_walker_t w
    cdef readonly uint64_t gva
    cdef readonly uint64_t access
    cdef readonly int pttype
    cdef readonly object fault

    @property
    def level(self):
        return self.w.level

    @property
    def max_level(self):
        return self.w.max_level

    @property
    def table_gfn(self):
        return tuple([self.w.table_gfn[i] for i in range(5)])

    @property
    def pte_gpa(self):
        return tuple([self.w.pte_gpa[i] for i in range(5)])

    @property
    def ptes(self):
        return tuple([self.w.ptes[i] for i in range(5)])

    @property
    def pte_writable(self):
        return tuple([bool(self.w.pte_writable[i]) for i in range(5)])

    @property
    def pt_access(self):
        return tuple([self.w.pt_access[i] for i in range(5)])

    @property
    def pte_access(self):
        return self.w.pte_access

    @property
    def gfn(self):
        return self.w.gfn

    @property
    def retries(self):
        return self.w.retries

    @property
    def ad_written(self):
        return self.w.ad_written

    @property
    def ok(self):
        return self.fault is None

    @property
    def gpa(self):
        """The translated gpa (``gva_to_gpa``), or INVALID_GPA after a fault."""
        if self.fault is not None:
            return GW_INVALID_GPA
        return (self.w.gfn << 12) | (self.gva & 0xfff)

    @property
    def page_size(self):
        """Bytes mapped by the leaf (4 KiB with paging off)."""
        if self.w.level <= 1:
            return 4096
        bits = 10 if self.pttype == PTTYPE_32 else 9
        return 4096 << (bits * (self.w.level - 1))

    @property
    def access_str(self):
        """``pte_access`` as w/u/x letters (``"wux"``, ``"-u-"``...)."""
        return _ACCESS_STR[self.w.pte_access & 7]

    def _key(self):
        return (self.gva, self.access, self.pttype, self.level, self.max_level, self.table_gfn,
                self.pte_gpa, self.ptes, self.pt_access, self.pte_access, self.gfn, self.fault,
                self.retries)

    def __eq__(self, other):
        if not isinstance(other, GuestWalker):
            return NotImplemented
        return self._key() == (<GuestWalker>other)._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (f"GuestWalker(gva={self.gva:#x}, access={self.access:#x}, level={self.level}, "
                f"gfn={self.gfn:#x}, pte_access={self.access_str}, fault={self.fault!r})")


cdef inline void _unpin(tuple pinned):
    (<GuestMemory>pinned[0]).walkers -= 1
    if pinned[1] is not None:
        (<GuestMemory>pinned[1]).walkers -= 1


cdef GuestWalker make_walker(guest_walker_t *w, int r, uint64_t gva, uint64_t access, int pttype):
    """The Python view of one finished walk: one allocation (two on a fault)."""
    cdef GuestWalker res = GuestWalker.__new__(GuestWalker)
    cdef PageFault f
    res.w = w[0]
    res.gva = gva
    res.access = access
    res.pttype = pttype
    if r != GW_OK:
        f = PageFault.__new__(PageFault)
        f.error_code = w.error_code
        f.address = w.address
        f.nested_page_fault = w.nested_page_fault
        f.exit_qualification = w.exit_qualification
        res.fault = f
    else:
        res.fault = None
    return res


# ---------------------------------------------------------------------------
# Trace records
# ---------------------------------------------------------------------------

cdef inline int gw_trace(gw_mmu_t *mmu, int event, int nvals, uint64_t a,
                         uint64_t b) noexcept nogil:
    """Record one walker event (values in the event's field order) if it is
    on; -1 only when the record could not be stored for lack of memory."""
    cdef uint64_t v[2]
    if not trace_on(event):
        return 0
    v[0] = a
    v[1] = b
    return trace_push(mmu.trace, event, nvals, v)


# ---------------------------------------------------------------------------
# Guest memory
# ---------------------------------------------------------------------------

cdef inline uint8_t *gfn_to_hva(gw_mem_t *mem, uint64_t gfn, bint *writable) noexcept nogil:
    """kvm_vcpu_gfn_to_memslot + gfn_to_hva_memslot_prot; NULL for a hole."""
    cdef int i
    cdef gw_slot_t *s
    if mem.nslots == 0:
        return NULL
    s = &mem.slots[mem.last]
    if gfn - s.base_gfn < s.npages:          # unsigned: also false below base
        writable[0] = s.writable
        return s.hva + ((gfn - s.base_gfn) << 12)
    for i in range(mem.nslots):
        s = &mem.slots[i]
        if gfn - s.base_gfn < s.npages:
            mem.last = i
            writable[0] = s.writable
            return s.hva + ((gfn - s.base_gfn) << 12)
    return NULL


cdef class GuestMemory:
    """Guest physical memory: memslots over writable byte buffers.

    Each slot maps ``[base_gpa, base_gpa + len(buffer))`` onto a buffer
    (numpy ``uint8`` array, ``bytearray`` or a writable ``memoryview``),
    without copying: the walker reads and sets A/D bits in the caller's
    buffer.  Gpas that no slot covers are holes; a page-table walk that
    reaches one fails like the kernel's (not-present error code).

    Parameters
    ----------
    buffer : buffer, optional
        Shortcut for ``add_slot(0, buffer)``.
    holes : iterable of (int, int), optional
        With `buffer`: half-open gpa ranges ``[start, end)`` (page aligned)
        to leave unmapped; the buffer is split into slots around them.

    Invariants: slots do not overlap; a slot's buffer cannot be resized while
    this object lives (it stays exported).

    Threads: may be shared.  Walks from any number of threads run at once
    (each pins the memory for its duration); ``add_slot`` while a walk runs
    in another thread raises :class:`GuestMemoryError` instead of moving
    the slot table under it.  ``read``/``write`` take the GIL and see whole
    values; concurrent A/D write-backs to one entry race as in hardware
    (the walker re-reads and restarts, it never reads outside a slot).
    """
    cdef gw_mem_t mem
    cdef Py_ssize_t walkers    # walks running on this memory (changed under the GIL)
    cdef list _views           # the exported memoryviews, one per slot
    cdef list _info            # (base_gpa, size, readonly) per slot

    def __cinit__(self):
        self.mem.slots = NULL
        self.mem.nslots = 0
        self.mem.last = 0
        self.walkers = 0
        self._views = []
        self._info = []

    def __init__(self, buffer=None, *, holes=()):
        if buffer is None:
            if holes:
                raise GuestMemoryError("holes= needs a buffer")
            return
        size = memoryview(buffer).nbytes
        cuts = sorted((int(a), int(b)) for a, b in holes)
        start = 0
        for a, b in cuts:
            if a % 4096 or b % 4096 or not 0 <= a < b <= size or a < start:
                raise GuestMemoryError(f"bad hole [{a:#x}, {b:#x}) in a {size:#x}-byte buffer")
            start = b
        view = memoryview(buffer).cast("B")
        start = 0
        pieces = []
        for a, b in cuts + [(size, size)]:
            if a > start:
                pieces.append((start, view[start:a]))
            start = b
        for base, part in pieces:
            self.add_slot(base, part)

    def __dealloc__(self):
        PyMem_Free(self.mem.slots)

    def add_slot(self, base_gpa, buffer, *, readonly=False):
        """Map `buffer` at `base_gpa` (``KVM_SET_USER_MEMORY_REGION``).

        Parameters
        ----------
        base_gpa : int
            Page aligned.
        buffer : buffer
            C-contiguous bytes, a non-zero multiple of 4096 long; writable
            unless `readonly`.
        readonly : bool
            ``KVM_MEM_READONLY``: the walker never stores A/D bits here.

        Raises
        ------
        GuestMemoryError
            Misaligned, empty, overlapping or unsuitable buffer, or a walk
            is running on this memory in another thread (the slot table
            cannot be reallocated under it); nothing is added.
        """
        cdef uint8_t[::1] wview
        cdef const uint8_t[::1] rview
        cdef uint8_t *hva
        cdef gw_slot_t *slots
        if not isinstance(base_gpa, int) or base_gpa < 0 or base_gpa % 4096 or base_gpa >= 1 << 52:
            raise GuestMemoryError(f"base_gpa={base_gpa!r} must be a page-aligned gpa below 2**52")
        try:
            if readonly:
                view = memoryview(buffer).cast("B")
                rview = view
                hva = <uint8_t *>&rview[0] if rview.shape[0] else NULL
            else:
                view = memoryview(buffer).cast("B")
                wview = view
                hva = &wview[0] if wview.shape[0] else NULL
        except (TypeError, ValueError, BufferError) as e:
            kind = "a readable" if readonly else "a writable"
            raise GuestMemoryError(f"buffer must be {kind} C-contiguous byte buffer: {e}") from None
        size = view.shape[0]
        if size == 0 or size % 4096:
            raise GuestMemoryError(f"buffer size {size:#x} is not a non-zero multiple of 4096")
        if base_gpa + size > 1 << 52:
            raise GuestMemoryError("slot extends beyond gpa 2**52")
        for b, s, _ in self._info:
            if base_gpa < b + s and b < base_gpa + size:
                raise GuestMemoryError(
                    f"slot [{base_gpa:#x}, {base_gpa + size:#x}) overlaps [{b:#x}, {b + s:#x})")
        if self.walkers:
            raise GuestMemoryError(
                f"add_slot while {self.walkers} walk(s) run on this GuestMemory in other threads")
        slots = <gw_slot_t *>PyMem_Realloc(self.mem.slots, (self.mem.nslots + 1) * sizeof(gw_slot_t))
        if slots == NULL:
            raise MemoryError()
        self.mem.slots = slots
        slots[self.mem.nslots].base_gfn = base_gpa >> 12
        slots[self.mem.nslots].npages = size >> 12
        slots[self.mem.nslots].hva = hva
        slots[self.mem.nslots].writable = not readonly
        self.mem.nslots += 1
        self._views.append(view)
        self._info.append((base_gpa, size, bool(readonly)))

    @property
    def slots(self):
        """``[(base_gpa, size, readonly), ...]`` in the order they were added."""
        return list(self._info)

    cdef uint8_t *_range(self, uint64_t gpa, size_t n, bint write) except NULL:
        cdef bint writable = False
        cdef uint8_t *p
        if gpa + n < gpa or not self._contiguous(gpa, n):
            raise GpaNotMappedError(f"gpa range [{gpa:#x}, {gpa + n:#x}) is not inside one memslot")
        p = gfn_to_hva(&self.mem, gpa >> 12, &writable)
        if write and not writable:
            raise GpaReadOnlyError(f"gpa {gpa:#x} is in a read-only memslot")
        return p + (gpa & 0xfff)

    cdef bint _contiguous(self, uint64_t gpa, size_t n):
        for b, s, _ in self._info:
            if b <= gpa and gpa + n <= b + s:
                return True
        return False

    def is_mapped(self, gpa):
        """True if `gpa` is inside a memslot."""
        cdef bint w
        return 0 <= gpa < 1 << 64 and gfn_to_hva(&self.mem, gpa >> 12, &w) != NULL

    def read(self, gpa, size):
        """`size` bytes at `gpa` (inside one memslot) as ``bytes``."""
        cdef uint8_t *p = self._range(_gpa(gpa), _size(size), False)
        return (<char *>p)[:size]

    def write(self, gpa, data):
        """Store `data` at `gpa` (inside one writable memslot)."""
        cdef const uint8_t[::1] src = memoryview(data).cast("B")
        cdef size_t n = src.shape[0]
        if n == 0:
            return
        cdef uint8_t *p = self._range(_gpa(gpa), n, True)
        memcpy(p, &src[0], n)

    def read_u64(self, gpa):
        cdef uint64_t v
        memcpy(&v, self._range(_gpa(gpa), 8, False), 8)
        return v

    def read_u32(self, gpa):
        cdef uint32_t v
        memcpy(&v, self._range(_gpa(gpa), 4, False), 4)
        return v

    def write_u64(self, gpa, value):
        cdef uint64_t v = _u64(value, "value")
        memcpy(self._range(_gpa(gpa), 8, True), &v, 8)

    def write_u32(self, gpa, value):
        if not isinstance(value, int) or not 0 <= value < 1 << 32:
            raise ValueError(f"value={value!r} does not fit in 32 bits")
        cdef uint32_t v = value
        memcpy(self._range(_gpa(gpa), 4, True), &v, 4)


cdef uint64_t _u64(object v, str name) except? 0:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    v = int(v)
    if not 0 <= v < 1 << 64:
        raise ValueError(f"{name}={v:#x} does not fit in 64 bits")
    return v


cdef uint64_t _gpa(object v) except? 0:
    return _u64(v, "gpa")


cdef size_t _size(object v) except? 0:
    if not isinstance(v, int) or not 0 < v <= 1 << 32:
        raise ValueError(f"size={v!r} must be a positive int")
    return v


# ---------------------------------------------------------------------------
# The walker
# ---------------------------------------------------------------------------

cdef inline uint64_t read_entry(const uint8_t *p, int pttype) noexcept nogil:
    cdef uint32_t v32
    cdef uint64_t v64
    if pttype == PTTYPE_32:
        memcpy(&v32, p, 4)
        return v32
    memcpy(&v64, p, 8)
    return v64


cdef inline uint32_t gpte_access(int pttype, uint64_t gpte) noexcept nogil:
    """FNAME(gpte_access): entry bits (NX already XOR-ed back) -> ACC_*."""
    if pttype == PTTYPE_EPT:
        # ACC_USER stands for "readable" in the EPT instantiation.
        return ((ACC_WRITE_MASK if gpte & 2 else 0) | (ACC_EXEC_MASK if gpte & 4 else 0) |
                (ACC_USER_MASK if gpte & 1 else 0))
    # P is always set here, so P XOR NX is "executable".
    return <uint32_t>((gpte & 7) ^ (gpte >> GW_PT64_NX_SHIFT))


cdef inline bint is_present_gpte(int pttype, uint64_t pte) noexcept nogil:
    if pttype == PTTYPE_EPT:
        return (pte & 7) != 0
    return (pte & PT_PRESENT_MASK) != 0


cdef inline bint is_last_gpte(gw_mmu_t *mmu, int level, uint64_t gpte) noexcept nogil:
    """FNAME(is_last_gpte): level 1 always ends the walk; above it bit 7 does,
    except that a 32-bit PDE's bit 7 is ignored without CR4.PSE."""
    if level == PG_LEVEL_4K:
        return True
    if mmu.pttype == PTTYPE_32 and not (level == 2 and mmu.cr4_pse):
        return False
    return (gpte & PT_PAGE_SIZE_MASK) != 0


cdef inline uint64_t base_addr_mask(int pttype) noexcept nogil:
    return GW_PT32_BASE_ADDR_MASK if pttype == PTTYPE_32 else GW_PT64_BASE_ADDR_MASK


cdef inline int level_bits(int pttype) noexcept nogil:
    return 10 if pttype == PTTYPE_32 else 9


cdef uint32_t permission_fault(gw_mmu_t *mmu, uint32_t pte_access, uint32_t pte_pkey,
                               uint64_t access) noexcept nogil:
    """mmu.h permission_fault(): 0, or PRESENT [| PK]."""
    cdef uint32_t pfec = <uint32_t>access
    cdef bint not_smap = mmu.rflags_ac and not (access & PFERR_IMPLICIT_ACCESS)
    cdef uint32_t index = (pfec | (PFERR_RSVD_MASK if not_smap else 0)) >> 1
    cdef bint fault = (mmu.permissions[index] >> pte_access) & 1
    cdef uint32_t errcode = PFERR_PRESENT_MASK
    cdef uint32_t pkru_bits, offset
    if mmu.pkru_mask:
        pkru_bits = (mmu.pkru >> (pte_pkey * 2)) & 3
        # Index: the access without P, with RSVD standing for "user page".
        offset = (pfec & ~<uint32_t>1) | (PFERR_RSVD_MASK if pte_access & ACC_USER_MASK else 0)
        pkru_bits &= mmu.pkru_mask >> offset
        if pkru_bits:
            errcode |= PFERR_PK_MASK
            fault = True
    return errcode if fault else 0


cdef uint64_t translate_gpa(gw_mmu_t *mmu, uint64_t gpa, uint64_t access,
                            guest_walker_t *w) noexcept nogil:
    """kvm_translate_gpa(): identity, or through the outer MMU for L2.

    On failure the outer walk's fault is copied into `w` (as the kernel's
    nested walk fills walker->fault) and INVALID_GPA is returned; the
    trace-buffer ENOMEM case also returns INVALID_GPA, with w.retries = -1.
    """
    cdef guest_walker_t inner
    cdef int r
    if mmu.nested == NULL:
        return gpa
    # translate_nested_gpa: NPT/EPT walks are always user (read) walks.
    r = walk_addr_generic(mmu.nested, &inner, gpa, access | PFERR_USER_MASK)
    if r == GW_OK:
        return (inner.gfn << 12) | (gpa & 0xfff)
    if r == GW_ENOMEM:
        w.retries = -1
        return GW_INVALID_GPA
    w.error_code = inner.error_code
    w.address = inner.address
    w.nested_page_fault = inner.nested_page_fault
    w.exit_qualification = inner.exit_qualification
    return GW_INVALID_GPA


cdef int update_accessed_dirty_bits(gw_mmu_t *mmu, guest_walker_t *w, bint write_fault,
                                    int a_shift, int d_shift) noexcept nogil:
    """FNAME(update_accessed_dirty_bits): 0 done, 1 an entry changed (restart
    the walk), -1 no memory for a trace record."""
    cdef int level
    cdef uint64_t pte, orig, cur
    cdef uint64_t a_mask = (<uint64_t>1) << a_shift
    cdef uint64_t d_mask = (<uint64_t>1) << d_shift
    if not mmu.have_ad:
        return 0                                  # EPT without A/D: nothing to update
    for level in range(w.max_level, w.level - 1, -1):
        pte = orig = w.ptes[level - 1]
        if not (pte & a_mask):
            if gw_trace(mmu, TP_KVM_MMU_SET_ACCESSED_BIT, 1, w.pte_gpa[level - 1], 0):
                return -1
            pte |= a_mask
        if level == w.level and write_fault and not (pte & d_mask):
            if gw_trace(mmu, TP_KVM_MMU_SET_DIRTY_BIT, 1, w.pte_gpa[level - 1], 0):
                return -1
            # (EPT: the nested PML hook would log the gpa here; L1 PML is not modelled.)
            pte |= d_mask
        if pte == orig:
            continue
        # Tables in a read-only memslot (ROM) keep their A/D bits clear.
        if not w.pte_writable[level - 1]:
            continue
        # cmpxchg: the entry must still hold what the walk read.
        cur = read_entry(w.ptep[level - 1], mmu.pttype)
        if cur != orig:
            return 1
        if mmu.pttype == PTTYPE_32:
            (<uint32_t *>w.ptep[level - 1])[0] = <uint32_t>pte
        else:
            (<uint64_t *>w.ptep[level - 1])[0] = pte
        w.ptes[level - 1] = pte
        w.ad_written |= <uint8_t>(1 << (level - 1))
    return 0


@cython.cdivision(True)
cdef int walk_addr_generic(gw_mmu_t *mmu, guest_walker_t *w, uint64_t addr,
                           uint64_t access) noexcept nogil:
    """FNAME(walk_addr_generic) for mmu.pttype.  Returns GW_OK, GW_FAULT
    (fault in `w`) or GW_ENOMEM (no memory for a trace record; guest memory may already
    hold some of the walk's A/D bits)."""
    cdef int pttype = mmu.pttype
    cdef bint write_fault = (access & PFERR_WRITE_MASK) != 0
    cdef bint user_fault = (access & PFERR_USER_MASK) != 0
    cdef bint fetch_fault = (access & PFERR_FETCH_MASK) != 0
    cdef uint32_t errcode = 0
    cdef uint64_t pte, pt_access, pte_access = 0, nested_access, real_gpa, table_gfn, pte_gpa
    cdef uint64_t walk_nx_mask = 0, gfn, base_mask = base_addr_mask(pttype)
    cdef uint64_t accessed_dirty, lvl_span
    cdef uint32_t index, offset, pte_pkey
    cdef int bits = level_bits(pttype)
    cdef int esize = 4 if pttype == PTTYPE_32 else 8
    cdef int a_shift = GW_EPT_ACCESSED_SHIFT if pttype == PTTYPE_EPT else GW_PT_ACCESSED_SHIFT
    cdef int d_shift = GW_EPT_DIRTY_SHIFT if pttype == PTTYPE_EPT else GW_PT_DIRTY_SHIFT
    cdef bint have_ad, writable
    cdef uint8_t *hva
    cdef int ret

    w.retries = 0
    w.ad_written = 0
    w.nested_page_fault = False
    w.error_code = 0
    w.address = 0
    w.exit_qualification = 0
    w.pte_access = 0

    if mmu.root_level == 0:
        # nonpaging_gva_to_gpa(): paging off, gva == gpa (translated for L2).
        w.level = w.max_level = 0
        real_gpa = translate_gpa(mmu, addr, access, w)
        if real_gpa == GW_INVALID_GPA:
            return GW_ENOMEM if w.retries < 0 else GW_FAULT
        w.gfn = real_gpa >> 12
        w.pte_access = ACC_ALL
        return GW_OK

    if gw_trace(mmu, TP_KVM_MMU_PAGETABLE_WALK, 2, addr, <uint32_t>access):
        return GW_ENOMEM

    while True:                                   # retry_walk
        errcode = 0
        w.level = mmu.root_level
        pte = mmu.pgd
        if pttype == PTTYPE_32:
            pte &= <uint64_t>0xffffffffu
        have_ad = mmu.have_ad
        if pttype == PTTYPE_64:
            walk_nx_mask = (<uint64_t>1) << GW_PT64_NX_SHIFT
            if w.level == 3:
                pte = mmu.pdptrs[(addr >> 30) & 3]
                if gw_trace(mmu, TP_KVM_MMU_PAGING_ELEMENT, 2, pte, w.level):
                    return GW_ENOMEM
                if not is_present_gpte(pttype, pte):
                    break                         # goto error
                w.level -= 1
        w.max_level = w.level
        nested_access = (PFERR_WRITE_MASK if have_ad else 0) | PFERR_USER_MASK
        pte_access = ~(<uint64_t>0)
        w.level += 1

        while True:
            pt_access = pte_access
            w.level -= 1
            index = (addr >> (12 + (w.level - 1) * bits)) & ((1u << bits) - 1)
            table_gfn = (pte & base_mask) >> 12
            offset = index * esize
            pte_gpa = (table_gfn << 12) + offset
            w.table_gfn[w.level - 1] = table_gfn
            w.pte_gpa[w.level - 1] = pte_gpa

            real_gpa = translate_gpa(mmu, table_gfn << 12, nested_access, w)
            if real_gpa == GW_INVALID_GPA:
                return GW_ENOMEM if w.retries < 0 else GW_FAULT

            hva = gfn_to_hva(mmu.mem, real_gpa >> 12, &writable)
            if hva == NULL:
                errcode = GW_ERR_NOT_PRESENT      # goto error (not present)
                break
            w.pte_writable[w.level - 1] = writable
            hva += offset
            pte = read_entry(hva, pttype)
            w.ptep[w.level - 1] = hva
            if gw_trace(mmu, TP_KVM_MMU_PAGING_ELEMENT, 2, pte, w.level):
                return GW_ENOMEM

            # NX is inverted so that it ANDs like the other permission bits.
            pte_access = pt_access & (pte ^ walk_nx_mask)

            if not is_present_gpte(pttype, pte):
                errcode = GW_ERR_NOT_PRESENT
                break
            if is_rsvd_spte(&mmu.rsvd, pte, w.level):
                errcode = PFERR_RSVD_MASK | PFERR_PRESENT_MASK
                break
            w.ptes[w.level - 1] = pte
            w.pt_access[w.level - 1] = gpte_access(pttype, pt_access ^ walk_nx_mask)
            if is_last_gpte(mmu, w.level, pte):
                errcode = 0
                break
        if errcode:
            if errcode == GW_ERR_NOT_PRESENT:
                errcode = 0
            break                                 # goto error

        pte_pkey = <uint32_t>((pte >> GW_PKEY_SHIFT) & 0xf) if pttype == PTTYPE_64 else 0
        accessed_dirty = (pte_access & ((<uint64_t>1) << a_shift)) if have_ad else 0

        w.pte_access = gpte_access(pttype, pte_access ^ walk_nx_mask)
        errcode = permission_fault(mmu, w.pte_access, pte_pkey, access)
        if errcode:
            break

        # The leaf's frame at its level plus the address bits below it.
        lvl_span = ((<uint64_t>1) << (12 + (w.level - 1) * bits)) - 1
        gfn = (pte & base_mask & ~lvl_span) >> 12
        gfn += (addr & base_mask & lvl_span) >> 12
        if pttype == PTTYPE_32 and w.level > PG_LEVEL_4K:
            # PSE-36: PDE bits 16:13 are physical address bits 35:32.
            gfn += (pte & GW_PSE36_MASK) << (32 - GW_PSE36_SHIFT - 12)

        real_gpa = translate_gpa(mmu, gfn << 12, access, w)
        if real_gpa == GW_INVALID_GPA:
            return GW_ENOMEM if w.retries < 0 else GW_FAULT
        w.gfn = real_gpa >> 12

        if not write_fault:
            # protect_clean_gpte: a clean leaf is mapped read-only so that the
            # first write faults and sets D.
            if have_ad and not ((pte >> d_shift) & 1):
                w.pte_access &= ~ACC_WRITE_MASK
        else:
            accessed_dirty &= pte >> (d_shift - a_shift)

        if not accessed_dirty:
            ret = update_accessed_dirty_bits(mmu, w, write_fault, a_shift, d_shift)
            if ret < 0:
                return GW_ENOMEM
            if ret:
                w.retries += 1
                continue                          # goto retry_walk
        return GW_OK

    # error:
    errcode |= (PFERR_WRITE_MASK if write_fault else 0) | (PFERR_USER_MASK if user_fault else 0)
    if fetch_fault and (mmu.efer_nx or mmu.cr4_smep):
        errcode |= PFERR_FETCH_MASK
    w.error_code = <uint16_t>errcode
    if pttype == PTTYPE_EPT and not (errcode & PFERR_RSVD_MASK):
        w.exit_qualification = ((EPT_VIOLATION_ACC_WRITE if write_fault else 0) |
                                (EPT_VIOLATION_ACC_READ if user_fault else 0) |
                                (EPT_VIOLATION_ACC_INSTR if fetch_fault else 0) |
                                ((pte_access & 7) << EPT_VIOLATION_PROT_SHIFT))
    w.address = addr
    w.nested_page_fault = not mmu.is_walk_mmu
    if gw_trace(mmu, TP_KVM_MMU_WALKER_ERROR, 1, w.error_code, 0):
        return GW_ENOMEM
    return GW_FAULT


# ---------------------------------------------------------------------------
# Python: one MMU
# ---------------------------------------------------------------------------

cdef class WalkContext:
    """One guest MMU ready to walk (``struct kvm_mmu`` + the vCPU state).

    Built by :class:`kvmmmu.paging.GuestMmu`, which derives every field from
    the CPU state and the guest CPU model.  Arguments are checked for range
    only; consistency (e.g. a PAE root level with PTTYPE 64) is the caller's.

    Parameters
    ----------
    memory : GuestMemory
    pttype : int
        PTTYPE_32, PTTYPE_64 or PTTYPE_EPT.
    root_level : int
        0 (paging off), 2 (PTTYPE_32), 3/4/5 (PTTYPE_64), 4/5 (EPT).
    pgd : int
        CR3, or the EPTP.
    pdptrs : sequence of 4 ints
        PAE PDPTE registers (ignored unless root_level == 3).
    have_ad, efer_nx, cr4_smep, cr4_pse, rflags_ac, is_walk_mmu : bool
    pkru, pkru_mask : int
    permissions : sequence of 16 ints (0..255)
    rsvd : RsvdBitsValidate
    nested : WalkContext or None
        The MMU that translates this one's gpas (L1's EPT for an L2 walk).

    Threads: may be shared; every walk copies the MMU and gets its own trace
    buffer.  A failed re-``__init__`` leaves the context unchanged; a
    successful one during another thread's walk does not affect that walk
    (it keeps the memories it pinned alive).  A context whose ``__init__``
    never completed refuses to walk (ValueError).
    """
    cdef gw_mmu_t mmu
    cdef bint ready            # __init__ completed: mmu.mem points into self.memory
    cdef readonly GuestMemory memory
    cdef readonly WalkContext nested
    # walk_addr's binding (bind_walk_addr): the address limit of the mode and
    # the checker for anything but exact in-range ints
    cdef uint64_t addr_limit
    cdef object arg_check

    def __init__(self, GuestMemory memory not None, pttype, root_level, pgd, pdptrs,
                 bint have_ad, bint efer_nx, bint cr4_smep, bint cr4_pse, bint rflags_ac,
                 bint is_walk_mmu, pkru, pkru_mask, permissions, RsvdBitsValidate rsvd not None,
                 WalkContext nested=None):
        # Everything is checked and built in a local struct first, and
        # committed at the end: a failing re-__init__ leaves the context as
        # it was (never pointing at memory or a nested MMU it no longer holds).
        cdef int i
        cdef gw_mmu_t m
        pttype = _int_arg("pttype", pttype, 0, 255)
        root_level = _int_arg("root_level", root_level, 0, 255)
        if pttype not in (PTTYPE_32, PTTYPE_64, PTTYPE_EPT):
            raise ValueError(f"pttype={pttype} is not 32, 64 or {PTTYPE_EPT} (EPT)")
        allowed = {PTTYPE_32: (0, 2), PTTYPE_64: (0, 3, 4, 5), PTTYPE_EPT: (4, 5)}[pttype]
        if root_level not in allowed:
            raise ValueError(f"root_level={root_level} is not valid for PTTYPE {pttype}")
        if len(pdptrs) != 4 or len(permissions) != 16:
            raise ValueError("pdptrs needs 4 entries and permissions 16")
        perms = [_int_arg("permissions", p, 0, 255) for p in permissions]
        if nested is not None and (nested.nested is not None or not nested.ready):
            raise ValueError("the outer MMU must be a ready WalkContext that is not itself nested")
        if nested is self:
            raise ValueError("a WalkContext cannot be its own outer MMU")
        m.pttype = pttype
        m.root_level = root_level
        m.pgd = _u64(pgd, "pgd")
        for i in range(4):
            m.pdptrs[i] = _u64(pdptrs[i], "pdptr")
        for i in range(16):
            m.permissions[i] = perms[i]
        m.have_ad = have_ad
        m.efer_nx = efer_nx
        m.cr4_smep = cr4_smep
        m.cr4_pse = cr4_pse
        m.rflags_ac = rflags_ac
        m.is_walk_mmu = is_walk_mmu
        m.pkru = _int_arg("pkru", pkru, 0, 0xffffffff)
        m.pkru_mask = _int_arg("pkru_mask", pkru_mask, 0, 0xffffffff)
        m.rsvd = rsvd.chk
        m.mem = &memory.mem
        m.trace = NULL                      # set per call (_prepare)
        m.nested = &nested.mmu if nested is not None else NULL
        self.memory = memory
        self.nested = nested
        self.mmu = m
        self.ready = True

    cdef tuple _pin(self):
        """Count a walk in on the memories it reads, so that
        ``GuestMemory.add_slot`` refuses to move their slot tables under it;
        the returned references also keep them alive should another thread
        re-``__init__`` this context meanwhile.  Called with the GIL held
        (the counters change only under the GIL)."""
        cdef GuestMemory mem = self.memory
        cdef GuestMemory nmem = self.nested.memory if self.nested is not None else None
        mem.walkers += 1
        if nmem is not None:
            nmem.walkers += 1
        return (mem, nmem)

    cdef int _prepare(self, gw_mmu_t *m, gw_mmu_t *outer, trace_buf_t *tb) except -1:
        """Copy this MMU (and its outer MMU) for one call, with the call's own
        trace buffer: threads walking one context never share a buffer."""
        if not self.ready:
            raise ObjectInitError("WalkContext was not initialised (__init__ did not complete)")
        trace_buf_init(tb)
        m[0] = self.mmu
        m.trace = tb
        if self.nested is not None:
            outer[0] = self.nested.mmu
            outer.trace = tb
            outer.nested = NULL
            m.nested = outer
        return 0

    cdef GuestWalker _walk(self, uint64_t a, uint64_t acc):
        cdef guest_walker_t w
        cdef int r
        cdef gw_mmu_t m, outer
        cdef trace_buf_t tb
        self._prepare(&m, &outer, &tb)
        pinned = self._pin()
        with nogil:
            r = walk_addr_generic(&m, &w, a, acc)
        _unpin(pinned)
        try:
            if r == GW_ENOMEM:
                raise MemoryError("no memory for a trace record")
        finally:
            trace_drain(&tb)
        return make_walker(&w, r, a, acc, m.pttype)

    def walk(self, addr, access):
        """Walk one address; returns its :class:`GuestWalker` (built from C)."""
        cdef uint64_t a = _u64(addr, "addr")
        cdef uint64_t acc = _u64(access, "access")
        if acc & ~GW_ACCESS_ALLOWED:
            raise ValueError(f"access={acc:#x} has bits outside W|U|F|P|IMPLICIT_ACCESS")
        return self._walk(a, acc)

    def walk_fast(self, addr, access, addr_limit):
        """:meth:`walk` for the common call, or None when `addr`/`access` are
        not exact ints in range (the caller then checks them and says why).

        Only ``int`` objects that fit: ``addr <= addr_limit`` and `access`
        within ``ACCESS_ALLOWED``.  Never converts anything else.
        """
        cdef uint64_t c_addr_limit = u64_arg(addr_limit, "addr_limit")
        cdef unsigned long long a, acc
        if type(addr) is not int or type(access) is not int:
            return None
        if addr < 0 or access < 0 or addr > c_addr_limit or access > <unsigned long long>GW_ACCESS_ALLOWED:
            return None
        a = addr
        acc = access
        if acc & ~GW_ACCESS_ALLOWED:
            return None
        return self._walk(a, acc)

    def bind_walk_addr(self, addr_limit, arg_check):
        """Bind :meth:`walk_addr` to this MMU's address limit and to
        ``arg_check(addr, access) -> (addr, access)``, the caller's checker
        for anything but exact in-range ints (it raises, naming the argument,
        or returns the checked ints)."""
        cdef uint64_t lim = u64_arg(addr_limit, "addr_limit")
        if not callable(arg_check):
            raise TypeError(f"arg_check must be callable, not {type(arg_check).__name__}")
        self.addr_limit = lim
        self.arg_check = arg_check

    def walk_addr(self, addr, access=0):
        """One walk from Python in one call: :meth:`walk_fast` under the bound
        limit for exact ints in range, else the bound checker decides (it
        raises, or returns ints :meth:`walk` takes).  ValueError before
        :meth:`bind_walk_addr`."""
        cdef unsigned long long a, acc
        if type(addr) is int and type(access) is int and addr >= 0 and access >= 0 and \
                addr <= self.addr_limit and access <= <unsigned long long>GW_ACCESS_ALLOWED:
            a = addr
            acc = access
            if not acc & ~GW_ACCESS_ALLOWED:
                return self._walk(a, acc)
        if self.arg_check is None:
            raise ValueError("walk_addr before bind_walk_addr")
        addr, access = self.arg_check(addr, access)
        return self.walk(addr, access)

    def walk_array(self, addrs, access, out=None):
        """Walk every address of `addrs` in order, with one access and one CPU state.

        Equivalent to calling :meth:`walk` for each address in turn (A/D
        bits written by one walk are seen by the next), but runs as one C
        loop without the GIL.

        Parameters
        ----------
        addrs : ndarray of uint64, shape (n,)
            C-contiguous.
        access : int
            PFERR bits (W, U, F, P, IMPLICIT_ACCESS).
        out : ndarray of WALK_DTYPE, shape (n,), optional

        Returns
        -------
        ndarray of WALK_DTYPE, shape (n,)
        """
        cdef uint64_t acc = _u64(access, "access")
        if acc & ~GW_ACCESS_ALLOWED:
            raise ValueError(f"access={acc:#x} has bits outside W|U|F|P|IMPLICIT_ACCESS")
        cdef const uint64_t[::1] av = _check_array("addrs", addrs)
        cdef Py_ssize_t n = av.shape[0], i
        out = _out_array("out", out, n, WALK_DTYPE, inputs=(addrs,))
        if n == 0:
            return out
        cdef uint8_t[::1] ob = out.view(np.uint8)
        cdef walk_result_t *res = <walk_result_t *>&ob[0]
        cdef guest_walker_t w
        cdef int r = GW_OK
        cdef gw_mmu_t m, outer
        cdef trace_buf_t tb
        self._prepare(&m, &outer, &tb)
        pinned = self._pin()
        with nogil:
            for i in range(n):
                r = walk_addr_generic(&m, &w, av[i], acc)
                if r == GW_ENOMEM:
                    break
                if r == GW_OK:
                    res[i].gpa = (w.gfn << 12) | (av[i] & 0xfff)
                    res[i].address = 0
                    res[i].error_code = 0
                    res[i].level = w.level
                    res[i].pte_access = w.pte_access
                    res[i].flags = 0
                    res[i].exit_qualification = 0
                else:
                    res[i].gpa = GW_INVALID_GPA
                    res[i].address = w.address
                    res[i].error_code = w.error_code
                    res[i].level = w.level
                    res[i].pte_access = 0
                    res[i].flags = WALK_FAULT | (WALK_NESTED_FAULT if w.nested_page_fault else 0)
                    res[i].exit_qualification = <uint8_t>w.exit_qualification
                res[i].retries = w.retries if w.retries < 0xffff else 0xffff
        _unpin(pinned)
        try:
            if r == GW_ENOMEM:
                raise MemoryError("no memory for a trace record")
        finally:
            trace_drain(&tb)
        return out
