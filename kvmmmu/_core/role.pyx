"""Role words of the KVM x86 MMU (Linux v6.18).

A shadow page (``struct kvm_mmu_page``) is found by ``(gfn, role)``; the role
is a 32-bit ``union kvm_mmu_page_role`` that records everything about the
guest paging mode and the page's place in the tree that changes what its
SPTEs mean.  An MMU context also keeps a 64-bit ``union kvm_cpu_role``: the
page role of the guest's own paging mode (``base``) plus an extended role
(``ext``) with CR4/EFER bits that do not change SP contents.

Bit layout of ``kvm_mmu_page_role`` (LSB first, as the kernel's bitfields)::

    bits   field             width
    3:0    level             4     SP level, 1 = 4K page table ... 5 = PML5
    4      has_4_byte_gpte   1     guest uses 32-bit non-PAE paging
    6:5    quadrant          2     which part of a 4-byte guest table is shadowed
    7      direct            1     not backed by a guest page table
    10:8   access            3     ACC_* (EXEC=1, WRITE=2, USER=4) from upper levels
    11     invalid           1     zapped (may still be a root in use)
    12     efer_nx           1
    13     cr0_wp            1
    14     smep_andnot_wp    1     CR4.SMEP && !CR0.WP
    15     smap_andnot_wp    1     CR4.SMAP && !CR0.WP
    16     ad_disabled       1     SPTEs below use access tracking, not A/D bits
    17     guest_mode        1     belongs to an L2 (nested) context
    18     passthrough       1     5-level NPT root over a 4-level guest NPT
    19     is_mirror         1     TDX mirror root/page
    23:20  (unused)
    31:24  smm               8     address-space id (1 = SMM)

``kvm_mmu_extended_role``: valid 0, execonly 1, cr4_pse 2, cr4_pke 3,
cr4_smap 4, cr4_smep 5, cr4_la57 6, efer_lma 7.  ``kvm_cpu_role``: base in
bits 31:0, ext in bits 63:32 of ``as_u64``.

The Python classes are immutable and hashable (roles are hash keys); they
compare and hash by their word.  Every constructor path (including a bare
``__new__``, which gives the all-zero role) validates, and ``__init__`` cannot
change a built role, so roles may be shared freely between threads.  Cython modules use the inline helpers in
role.pxd on bare ``uint32_t`` words instead.
"""

from libc.stdint cimport uint32_t, uint64_t
from operator import index as _index

from kvmmmu._core.mmu_defs cimport KVMMMU_DEBUG_ON, kvmmmu_count_warn

__all__ = [
    "KvmMmuPageRole", "KvmMmuExtendedRole", "KvmCpuRole",
    "PAGE_ROLE_FIELDS", "EXTENDED_ROLE_FIELDS", "ACCESS_STR",
    "SYNC_ROLE_IGN", "SYNC_ROLE_IGN_WORD",
    "kvm_calc_cpu_role", "kvm_mmu_get_tdp_level",
    "kvm_calc_tdp_mmu_root_page_role", "kvm_calc_shadow_mmu_root_page_role",
    "kvm_calc_shadow_npt_roles", "kvm_calc_shadow_ept_root_page_role",
    "kvm_mmu_child_role", "role_sync_mismatch", "role_trace_text",
    "DEBUG_BUILD", "mmu_warnings", "reset_mmu_warnings",
    "X86_CR0_WP", "X86_CR0_PG", "X86_CR4_PSE", "X86_CR4_PAE", "X86_CR4_LA57",
    "X86_CR4_SMEP", "X86_CR4_SMAP", "X86_CR4_PKE", "EFER_LMA", "EFER_NX",
    "PT32_ROOT_LEVEL", "PT32E_ROOT_LEVEL", "PT64_ROOT_4LEVEL", "PT64_ROOT_5LEVEL",
]

# Re-export the C constants as Python ints (a module-level assignment cannot
# reuse the cimported C name, hence the update of the module dict).
globals().update(
    X86_CR0_WP=X86_CR0_WP, X86_CR0_PG=X86_CR0_PG, X86_CR4_PSE=X86_CR4_PSE,
    X86_CR4_PAE=X86_CR4_PAE, X86_CR4_LA57=X86_CR4_LA57, X86_CR4_SMEP=X86_CR4_SMEP,
    X86_CR4_SMAP=X86_CR4_SMAP, X86_CR4_PKE=X86_CR4_PKE, EFER_LMA=EFER_LMA, EFER_NX=EFER_NX,
    PT32_ROOT_LEVEL=PT32_ROOT_LEVEL, PT32E_ROOT_LEVEL=PT32E_ROOT_LEVEL,
    PT64_ROOT_4LEVEL=PT64_ROOT_4LEVEL, PT64_ROOT_5LEVEL=PT64_ROOT_5LEVEL,
    SYNC_ROLE_IGN_WORD=SYNC_ROLE_IGN_WORD,
)

#: ``(name, shift, width)`` of every ``kvm_mmu_page_role`` field, in bit order.
PAGE_ROLE_FIELDS = (
    ("level", ROLE_LEVEL_SHIFT, ROLE_LEVEL_WIDTH),
    ("has_4_byte_gpte", ROLE_HAS_4_BYTE_GPTE_SHIFT, ROLE_HAS_4_BYTE_GPTE_WIDTH),
    ("quadrant", ROLE_QUADRANT_SHIFT, ROLE_QUADRANT_WIDTH),
    ("direct", ROLE_DIRECT_SHIFT, ROLE_DIRECT_WIDTH),
    ("access", ROLE_ACCESS_SHIFT, ROLE_ACCESS_WIDTH),
    ("invalid", ROLE_INVALID_SHIFT, ROLE_INVALID_WIDTH),
    ("efer_nx", ROLE_EFER_NX_SHIFT, ROLE_EFER_NX_WIDTH),
    ("cr0_wp", ROLE_CR0_WP_SHIFT, ROLE_CR0_WP_WIDTH),
    ("smep_andnot_wp", ROLE_SMEP_ANDNOT_WP_SHIFT, ROLE_SMEP_ANDNOT_WP_WIDTH),
    ("smap_andnot_wp", ROLE_SMAP_ANDNOT_WP_SHIFT, ROLE_SMAP_ANDNOT_WP_WIDTH),
    ("ad_disabled", ROLE_AD_DISABLED_SHIFT, ROLE_AD_DISABLED_WIDTH),
    ("guest_mode", ROLE_GUEST_MODE_SHIFT, ROLE_GUEST_MODE_WIDTH),
    ("passthrough", ROLE_PASSTHROUGH_SHIFT, ROLE_PASSTHROUGH_WIDTH),
    ("is_mirror", ROLE_IS_MIRROR_SHIFT, ROLE_IS_MIRROR_WIDTH),
    ("smm", ROLE_SMM_SHIFT, ROLE_SMM_WIDTH),
)

#: ``(name, shift, width)`` of every ``kvm_mmu_extended_role`` field.
EXTENDED_ROLE_FIELDS = (
    ("valid", EXT_VALID_SHIFT, 1),
    ("execonly", EXT_EXECONLY_SHIFT, 1),
    ("cr4_pse", EXT_CR4_PSE_SHIFT, 1),
    ("cr4_pke", EXT_CR4_PKE_SHIFT, 1),
    ("cr4_smap", EXT_CR4_SMAP_SHIFT, 1),
    ("cr4_smep", EXT_CR4_SMEP_SHIFT, 1),
    ("cr4_la57", EXT_CR4_LA57_SHIFT, 1),
    ("efer_lma", EXT_EFER_LMA_SHIFT, 1),
)

#: The tracepoints' text for ``role.access`` (index bit 0 = x, 1 = w, 2 = u).
ACCESS_STR = ("---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux")

cdef dict _PAGE_FIELD = {name: (shift, width) for name, shift, width in PAGE_ROLE_FIELDS}
cdef dict _EXT_FIELD = {name: (shift, width) for name, shift, width in EXTENDED_ROLE_FIELDS}


# ---------------------------------------------------------------------------
# Validation helpers (Python level; the C helpers assume valid input).
# ---------------------------------------------------------------------------

cdef object _uint(object value, int width, str what):
    """`value` as a Python int in [0, 2**width), else TypeError/ValueError naming `what`."""
    try:
        v = _index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer or bool, not {type(value).__name__}") from None
    if v < 0 or v >> width:
        raise ValueError(f"{what}={value!r} does not fit in {width} bit(s) "
                         f"(0..{(1 << width) - 1})")
    return v


cdef object _flag(object value, str what):
    """A 0/1 flag (bool or int); anything else is an error, not truthiness."""
    return _uint(value, 1, what)


cdef uint64_t _apply_fields(uint64_t word, dict fields, dict table, str cls) except? 0xdead:
    cdef int shift, width
    for name, value in fields.items():
        try:
            shift, width = table[name]
        except KeyError:
            raise TypeError(f"{cls} has no field {name!r}") from None
        v = _uint(value, width, f"{cls}.{name}")
        word = (word & ~((((<uint64_t>1) << width) - 1) << shift)) | ((<uint64_t>v) << shift)
    return word


cdef str _fields_repr(uint64_t word, tuple layout):
    cdef int shift, width
    parts = []
    for name, shift, width in layout:
        v = (word >> shift) & (((<uint64_t>1) << width) - 1)
        if v:
            parts.append(f"{name}={v}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# union kvm_mmu_page_role
# ---------------------------------------------------------------------------

cdef class KvmMmuPageRole:
    """``union kvm_mmu_page_role``: an immutable, hashable 32-bit role word.

    Parameters
    ----------
    word : int, optional
        Starting word (0..2**32-1), default 0.
    **fields
        Field values applied on top of `word`, e.g. ``level=4, direct=1``.
        Field names are those of :data:`PAGE_ROLE_FIELDS`.

    Raises
    ------
    TypeError
        Unknown field name, or a non-integer value.
    ValueError
        A value that does not fit its field (nothing is truncated).

    Notes
    -----
    Roles compare equal and hash alike when their words are equal.  Bits
    23:20 (no field in v6.18) are kept as given in `word`.

    Examples
    --------
    >>> KvmMmuPageRole(level=4, direct=1, access=7, efer_nx=1, cr0_wp=1).word == 0x3784
    True
    """

    def __cinit__(self, word=0, **fields):
        cdef uint64_t w = _uint(word, 32, "KvmMmuPageRole.word")
        if fields:
            w = _apply_fields(w, fields, _PAGE_FIELD, "KvmMmuPageRole")
        self.word = <uint32_t>w

    def replace(self, **fields):
        """Return a copy with `fields` changed (same rules as the constructor)."""
        return page_role_from_word(<uint32_t>_apply_fields(self.word, fields, _PAGE_FIELD,
                                                           "KvmMmuPageRole"))

    def as_dict(self):
        """All fields as ``{name: int}``, in bit order."""
        return {name: (self.word >> shift) & ((1 << width) - 1)
                for name, shift, width in PAGE_ROLE_FIELDS}

    @property
    def level(self):
        return role_level(self.word)

    @property
    def has_4_byte_gpte(self):
        return <int>role_has_4_byte_gpte(self.word)

    @property
    def quadrant(self):
        return role_quadrant(self.word)

    @property
    def direct(self):
        return <int>role_direct(self.word)

    @property
    def access(self):
        return role_access(self.word)

    @property
    def invalid(self):
        return <int>role_invalid(self.word)

    @property
    def efer_nx(self):
        return <int>role_efer_nx(self.word)

    @property
    def cr0_wp(self):
        return <int>role_cr0_wp(self.word)

    @property
    def smep_andnot_wp(self):
        return <int>role_smep_andnot_wp(self.word)

    @property
    def smap_andnot_wp(self):
        return <int>role_smap_andnot_wp(self.word)

    @property
    def ad_disabled(self):
        return <int>role_ad_disabled(self.word)

    @property
    def guest_mode(self):
        return <int>role_guest_mode(self.word)

    @property
    def passthrough(self):
        return <int>role_passthrough(self.word)

    @property
    def is_mirror(self):
        return <int>role_is_mirror(self.word)

    @property
    def smm(self):
        return role_smm(self.word)

    def __eq__(self, other):
        if isinstance(other, KvmMmuPageRole):
            return self.word == (<KvmMmuPageRole>other).word
        return NotImplemented

    def __ne__(self, other):
        if isinstance(other, KvmMmuPageRole):
            return self.word != (<KvmMmuPageRole>other).word
        return NotImplemented

    def __hash__(self):
        return hash(self.word)

    def __reduce__(self):
        return (KvmMmuPageRole, (self.word,))

    def __repr__(self):
        fields = _fields_repr(self.word, PAGE_ROLE_FIELDS)
        return f"KvmMmuPageRole(word=0x{self.word:08x}{', ' if fields else ''}{fields})"


cdef KvmMmuPageRole page_role_from_word(uint32_t word):
    """Fast constructor for Cython callers (no validation needed)."""
    cdef KvmMmuPageRole r = KvmMmuPageRole.__new__(KvmMmuPageRole)
    r.word = word
    return r


# ---------------------------------------------------------------------------
# union kvm_mmu_extended_role
# ---------------------------------------------------------------------------

cdef class KvmMmuExtendedRole:
    """``union kvm_mmu_extended_role``: CR4/EFER bits tracked by an MMU context.

    Parameters
    ----------
    word : int, optional
        Starting word (0..2**32-1), default 0.
    **fields
        ``valid``, ``execonly``, ``cr4_pse``, ``cr4_pke``, ``cr4_smap``,
        ``cr4_smep``, ``cr4_la57``, ``efer_lma`` (each 0 or 1).

    Raises
    ------
    TypeError, ValueError
        As for :class:`KvmMmuPageRole`.
    """

    def __cinit__(self, word=0, **fields):
        cdef uint64_t w = _uint(word, 32, "KvmMmuExtendedRole.word")
        if fields:
            w = _apply_fields(w, fields, _EXT_FIELD, "KvmMmuExtendedRole")
        self.word = <uint32_t>w

    def replace(self, **fields):
        """Return a copy with `fields` changed."""
        return ext_role_from_word(<uint32_t>_apply_fields(self.word, fields, _EXT_FIELD,
                                                          "KvmMmuExtendedRole"))

    def as_dict(self):
        """All fields as ``{name: int}``, in bit order."""
        return {name: (self.word >> shift) & 1 for name, shift, _ in EXTENDED_ROLE_FIELDS}

    @property
    def valid(self):
        return <int>ext_bit(self.word, EXT_VALID_MASK)

    @property
    def execonly(self):
        return <int>ext_bit(self.word, EXT_EXECONLY_MASK)

    @property
    def cr4_pse(self):
        return <int>ext_bit(self.word, EXT_CR4_PSE_MASK)

    @property
    def cr4_pke(self):
        return <int>ext_bit(self.word, EXT_CR4_PKE_MASK)

    @property
    def cr4_smap(self):
        return <int>ext_bit(self.word, EXT_CR4_SMAP_MASK)

    @property
    def cr4_smep(self):
        return <int>ext_bit(self.word, EXT_CR4_SMEP_MASK)

    @property
    def cr4_la57(self):
        return <int>ext_bit(self.word, EXT_CR4_LA57_MASK)

    @property
    def efer_lma(self):
        return <int>ext_bit(self.word, EXT_EFER_LMA_MASK)

    def __eq__(self, other):
        if isinstance(other, KvmMmuExtendedRole):
            return self.word == (<KvmMmuExtendedRole>other).word
        return NotImplemented

    def __ne__(self, other):
        if isinstance(other, KvmMmuExtendedRole):
            return self.word != (<KvmMmuExtendedRole>other).word
        return NotImplemented

    def __hash__(self):
        return hash(self.word)

    def __reduce__(self):
        return (KvmMmuExtendedRole, (self.word,))

    def __repr__(self):
        fields = _fields_repr(self.word, EXTENDED_ROLE_FIELDS)
        return f"KvmMmuExtendedRole(word=0x{self.word:08x}{', ' if fields else ''}{fields})"


cdef KvmMmuExtendedRole ext_role_from_word(uint32_t word):
    cdef KvmMmuExtendedRole r = KvmMmuExtendedRole.__new__(KvmMmuExtendedRole)
    r.word = word
    return r


# ---------------------------------------------------------------------------
# union kvm_cpu_role
# ---------------------------------------------------------------------------

cdef uint32_t _word_of(object role, type cls, str what) except? 0xdead:
    if isinstance(role, cls):
        return role.word
    if isinstance(role, (KvmMmuPageRole, KvmMmuExtendedRole, KvmCpuRole)):
        raise TypeError(f"{what} must be a {cls.__name__} or an int, not {type(role).__name__}")
    return <uint32_t>_uint(role, 32, what)


cdef class KvmCpuRole:
    """``union kvm_cpu_role``: ``base`` (page role) and ``ext`` (extended role).

    Parameters
    ----------
    base : KvmMmuPageRole or int, optional
        Page role of the guest's paging mode (bits 31:0 of `as_u64`).
    ext : KvmMmuExtendedRole or int, optional
        Extended role (bits 63:32 of `as_u64`).
    """

    def __cinit__(self, base=0, ext=0):
        cdef uint32_t b = _word_of(base, KvmMmuPageRole, "KvmCpuRole.base")
        cdef uint32_t e = _word_of(ext, KvmMmuExtendedRole, "KvmCpuRole.ext")
        self.as_u64 = cpu_role_as_u64(b, e)

    @staticmethod
    def from_u64(as_u64):
        """Build from the 64-bit ``as_u64`` value."""
        return cpu_role_from_u64(_uint(as_u64, 64, "KvmCpuRole.as_u64"))

    @property
    def base(self):
        return page_role_from_word(cpu_role_base(self.as_u64))

    @property
    def ext(self):
        return ext_role_from_word(cpu_role_ext(self.as_u64))

    def replace(self, base=None, ext=None):
        """Return a copy with `base` and/or `ext` replaced."""
        cdef uint32_t b = cpu_role_base(self.as_u64)
        cdef uint32_t e = cpu_role_ext(self.as_u64)
        if base is not None:
            b = _word_of(base, KvmMmuPageRole, "KvmCpuRole.base")
        if ext is not None:
            e = _word_of(ext, KvmMmuExtendedRole, "KvmCpuRole.ext")
        return cpu_role_from_u64(cpu_role_as_u64(b, e))

    def __eq__(self, other):
        if isinstance(other, KvmCpuRole):
            return self.as_u64 == (<KvmCpuRole>other).as_u64
        return NotImplemented

    def __ne__(self, other):
        if isinstance(other, KvmCpuRole):
            return self.as_u64 != (<KvmCpuRole>other).as_u64
        return NotImplemented

    def __hash__(self):
        return hash(self.as_u64)

    def __reduce__(self):
        return (KvmCpuRole, (cpu_role_base(self.as_u64), cpu_role_ext(self.as_u64)))

    def __repr__(self):
        return f"KvmCpuRole(base={self.base!r}, ext={self.ext!r})"


cdef KvmCpuRole cpu_role_from_u64(uint64_t as_u64):
    cdef KvmCpuRole r = KvmCpuRole.__new__(KvmCpuRole)
    r.as_u64 = as_u64
    return r


#: sync_role_ign: the role bits an unsync SP may differ in from the syncing
#: MMU's root role (level, access, quadrant, passthrough) = 0x0004076F.
SYNC_ROLE_IGN = page_role_from_word(SYNC_ROLE_IGN_WORD)


# ---------------------------------------------------------------------------
# Debug-only checks (KVMMMU_DEBUG builds; compiled away otherwise).
# ---------------------------------------------------------------------------

cdef enum:
    ROLE_WARN_CHILD_4_BYTE_GPTE_NOT_4K
    ROLE_WARN_CHILD_OF_LEAF_LEVEL
    ROLE_WARN_NR_SITES

cdef uint64_t[ROLE_WARN_NR_SITES] _mmu_warn_count

#: True when this module was built with KVMMMU_DEBUG (debug-only checks on).
DEBUG_BUILD = bool(KVMMMU_DEBUG_ON)

_WARN_SITES = {
    ROLE_WARN_CHILD_4_BYTE_GPTE_NOT_4K:
        ("kvm_mmu_child_role", "has_4_byte_gpte child is not a PG_LEVEL_4K page"),
    ROLE_WARN_CHILD_OF_LEAF_LEVEL:
        ("kvm_mmu_child_role", "parent role level is below 2"),
}


def mmu_warnings():
    """Counts of the failed debug-only checks since :func:`reset_mmu_warnings`,
    as ``{(kernel function, condition): count}``; empty in a release build."""
    cdef int i
    cdef dict res = {}
    for i in range(<int>ROLE_WARN_NR_SITES):
        if _mmu_warn_count[i]:
            res[_WARN_SITES[i]] = int(_mmu_warn_count[i])
    return res


def reset_mmu_warnings():
    """Zero the counters of :func:`mmu_warnings`."""
    cdef int i
    for i in range(<int>ROLE_WARN_NR_SITES):
        _mmu_warn_count[i] = 0


cdef uint32_t mmu_child_role_word(uint32_t parent, int sptep_index, bint direct,
                                  uint32_t access) noexcept nogil:
    """kvm_mmu_child_role(): role of the SP linked from entry `sptep_index`
    of a parent SP with role `parent`.

    Copies the parent, one level down, with the caller's `direct` and
    `access`, passthrough cleared.  For 4-byte guest PTEs (32-bit non-PAE
    guest, whose 4 KiB page tables are shadowed by two 2 MiB-wide SPs) the
    quadrant becomes the low bit of the parent entry index.

    Preconditions: role_level(parent) >= 2, 0 <= sptep_index < 512,
    access <= ACC_ALL.  The kernel WARNs when a 4-byte-gpte child is not a
    4K SP; debug builds count that (:func:`mmu_warnings`).
    """
    if KVMMMU_DEBUG_ON and role_level(parent) < 2:
        kvmmmu_count_warn(&_mmu_warn_count[ROLE_WARN_CHILD_OF_LEAF_LEVEL])
    cdef uint32_t role = role_set_level(parent, role_level(parent) - 1)
    role = role_set_access(role, access)
    role = role_set_direct(role, direct)
    role = role_set_passthrough(role, False)
    if role_has_4_byte_gpte(role):
        if KVMMMU_DEBUG_ON and role_level(role) != PG_LEVEL_4K:
            kvmmmu_count_warn(&_mmu_warn_count[ROLE_WARN_CHILD_4_BYTE_GPTE_NOT_4K])
        role = role_set_quadrant(role, <uint32_t>(sptep_index & 1))
    return role


# ---------------------------------------------------------------------------
# Derivations (mmu.c).
# ---------------------------------------------------------------------------

cdef uint64_t calc_cpu_role(uint64_t cr0, uint64_t cr4, uint64_t efer, uint32_t smm,
                            bint guest_mode) noexcept nogil:
    """kvm_calc_cpu_role() on raw register values; returns ``as_u64``."""
    cdef uint32_t base = 0
    cdef uint32_t ext = EXT_VALID_MASK
    cdef bint wp = (cr0 & X86_CR0_WP) != 0
    cdef bint pae = (cr4 & X86_CR4_PAE) != 0
    cdef bint lma = (efer & EFER_LMA) != 0
    base = role_set_access(base, ACC_ALL)
    base = role_set_smm(base, smm)
    base = role_set_guest_mode(base, guest_mode)
    if not (cr0 & X86_CR0_PG):
        # Paging off: guest-physical = guest-virtual, nothing else matters.
        return cpu_role_as_u64(role_set_direct(base, True), ext)
    base = role_set_efer_nx(base, (efer & EFER_NX) != 0)
    base = role_set_cr0_wp(base, wp)
    base = role_set_smep_andnot_wp(base, (cr4 & X86_CR4_SMEP) != 0 and not wp)
    base = role_set_smap_andnot_wp(base, (cr4 & X86_CR4_SMAP) != 0 and not wp)
    base = role_set_has_4_byte_gpte(base, not pae)
    if lma:
        base = role_set_level(base, PT64_ROOT_5LEVEL if (cr4 & X86_CR4_LA57) else PT64_ROOT_4LEVEL)
    elif pae:
        base = role_set_level(base, PT32E_ROOT_LEVEL)
    else:
        base = role_set_level(base, PT32_ROOT_LEVEL)
    if cr4 & X86_CR4_SMEP:
        ext |= EXT_CR4_SMEP_MASK
    if cr4 & X86_CR4_SMAP:
        ext |= EXT_CR4_SMAP_MASK
    if cr4 & X86_CR4_PSE:
        ext |= EXT_CR4_PSE_MASK
    # Protection keys and 5-level paging only exist in long mode.
    if lma and (cr4 & X86_CR4_PKE):
        ext |= EXT_CR4_PKE_MASK
    if lma and (cr4 & X86_CR4_LA57):
        ext |= EXT_CR4_LA57_MASK
    if lma:
        ext |= EXT_EFER_LMA_MASK
    return cpu_role_as_u64(base, ext)


def kvm_calc_cpu_role(cr0=0, cr4=0, efer=0, *, smm=False, guest_mode=False):
    """The CPU role of a vCPU with these register values (``kvm_calc_cpu_role``).

    Parameters
    ----------
    cr0, cr4, efer : int
        Guest register values (64-bit).  Only CR0.PG/WP, CR4.PSE/PAE/LA57/
        SMEP/SMAP/PKE and EFER.NX/LMA are read.
    smm : bool
        vCPU in System Management Mode (``is_smm``).
    guest_mode : bool
        vCPU running L2 (``is_guest_mode``).

    Returns
    -------
    KvmCpuRole
        ``base``: access=ACC_ALL, smm, guest_mode, and then either direct=1
        (CR0.PG=0; nothing else is set) or efer_nx, cr0_wp,
        smep/smap_andnot_wp, has_4_byte_gpte = !CR4.PAE and level = 5/4 (long
        mode, by LA57), 3 (PAE) or 2.  ``ext``: valid=1 and, with paging on,
        cr4_smep/smap/pse, cr4_pke and cr4_la57 (long mode only), efer_lma.
    """
    return cpu_role_from_u64(calc_cpu_role(
        _uint(cr0, 64, "cr0"), _uint(cr4, 64, "cr4"), _uint(efer, 64, "efer"),
        _flag(smm, "smm"), _flag(guest_mode, "guest_mode")))


def kvm_mmu_get_tdp_level(max_tdp_level, maxphyaddr, tdp_root_level=0):
    """TDP root level for a vCPU (``kvm_mmu_get_tdp_level``).

    Parameters
    ----------
    max_tdp_level : int
        Host capability (4 or 5).
    maxphyaddr : int
        Guest MAXPHYADDR from CPUID (for TDX the max guest physical address).
    tdp_root_level : int, optional
        Architecture-forced level (SVM: fixed by the host paging mode), 0 if none.

    Returns
    -------
    int
        `tdp_root_level` if non-zero; 4 when 5-level TDP is available but the
        guest cannot address more than 48 bits; else `max_tdp_level`.
    """
    if tdp_root_level:
        return _index(tdp_root_level)
    if max_tdp_level == 5 and maxphyaddr <= 48:
        return 4
    return _index(max_tdp_level)


cdef uint32_t _cpu_base(object cpu_role) except? 0xdead:
    if not isinstance(cpu_role, KvmCpuRole):
        raise TypeError(f"cpu_role must be a KvmCpuRole, not {type(cpu_role).__name__}")
    return cpu_role_base((<KvmCpuRole>cpu_role).as_u64)


cdef uint32_t _root_level(object level, str what) except 0:
    v = _uint(level, 4, what)
    if not PT32E_ROOT_LEVEL <= v <= PT64_ROOT_5LEVEL:
        raise ValueError(f"{what}={level!r} is not a TDP root level (3, 4 or 5)")
    return v


def kvm_calc_tdp_mmu_root_page_role(cpu_role, tdp_level, ad_enabled=True):
    """Root role of the (non-nested) TDP MMU (``kvm_calc_tdp_mmu_root_page_role``).

    Parameters
    ----------
    cpu_role : KvmCpuRole
        Only ``base.smm`` and ``base.guest_mode`` are used.
    tdp_level : int
        TDP root level (3, 4 or 5), see :func:`kvm_mmu_get_tdp_level`.
    ad_enabled : bool
        ``kvm_ad_enabled``: hardware A/D bits usable in the TDP tables.

    Returns
    -------
    KvmMmuPageRole
        access=ACC_ALL, cr0_wp=1, efer_nx=1, direct=1, level=`tdp_level`,
        ad_disabled=!`ad_enabled`, smm and guest_mode from `cpu_role`.  A TDX
        mirror root is this role with ``is_mirror=1`` (set by the caller when
        allocating the root, as ``kvm_tdp_mmu_alloc_root`` does).
    """
    cdef uint32_t cpu = _cpu_base(cpu_role)
    cdef uint32_t level = _root_level(tdp_level, "tdp_level")
    cdef uint32_t w = 0
    w = role_set_access(w, ACC_ALL)
    w = role_set_cr0_wp(w, True)
    w = role_set_efer_nx(w, True)
    w = role_set_smm(w, role_smm(cpu))
    w = role_set_guest_mode(w, role_guest_mode(cpu))
    w = role_set_ad_disabled(w, not _flag(ad_enabled, "ad_enabled"))
    w = role_set_level(w, level)
    w = role_set_direct(w, True)
    return page_role_from_word(w)


def kvm_calc_shadow_mmu_root_page_role(cpu_role):
    """Root role of shadow paging, TDP disabled (``kvm_init_shadow_mmu``).

    Returns
    -------
    KvmMmuPageRole
        ``cpu_role.base`` with level raised to at least 3 (KVM shadows every
        non-64-bit guest with PAE tables) and efer_nx forced to 1 (KVM runs
        the guest with EFER.NX=1 when TDP is off).
    """
    cdef uint32_t w = _cpu_base(cpu_role)
    if role_level(w) < <uint32_t>PT32E_ROOT_LEVEL:
        w = role_set_level(w, PT32E_ROOT_LEVEL)
    w = role_set_efer_nx(w, True)
    return page_role_from_word(w)


def kvm_calc_shadow_npt_roles(cr0, cr4, efer, tdp_level, *, smm=False):
    """CPU and root roles of nested NPT (``kvm_init_shadow_npt_mmu``).

    Parameters
    ----------
    cr0, cr4, efer : int
        L1's values from the nested VMCB.  CR0.PG must be set (NPT requires
        paging); CR4.PKE is ignored.
    tdp_level : int
        KVM's TDP root level (3, 4 or 5).
    smm : bool
        vCPU in SMM.

    Returns
    -------
    (KvmCpuRole, KvmMmuPageRole)
        The CPU role (guest_mode=1) and the root role: the CPU role's base at
        `tdp_level`, with passthrough=1 when a 5-level root shadows a 4-level
        guest NPT.

    Raises
    ------
    ValueError
        CR0.PG is clear (the kernel WARNs).
    """
    cdef uint64_t r4 = _uint(cr4, 64, "cr4")
    cdef uint32_t level = _root_level(tdp_level, "tdp_level")
    cdef uint64_t cpu = calc_cpu_role(_uint(cr0, 64, "cr0"), r4 & ~X86_CR4_PKE,
                                      _uint(efer, 64, "efer"), _flag(smm, "smm"), True)
    cdef uint32_t root = cpu_role_base(cpu)
    if role_direct(root):
        raise ValueError("nested NPT requires CR0.PG=1")
    root = role_set_level(root, level)
    if level == <uint32_t>PT64_ROOT_5LEVEL and role_level(cpu_role_base(cpu)) == <uint32_t>PT64_ROOT_4LEVEL:
        root = role_set_passthrough(root, True)
    return cpu_role_from_u64(cpu), page_role_from_word(root)


def kvm_calc_shadow_ept_root_page_role(accessed_dirty, execonly, level):
    """CPU role of nested EPT (``kvm_calc_shadow_ept_root_page_role``).

    Parameters
    ----------
    accessed_dirty : bool
        EPTP bit 6: L1 enabled A/D bits in its EPT.
    execonly : bool
        Execute-only EPT entries allowed.
    level : int
        EPT walk length from L1's EPTP (4 or 5).

    Returns
    -------
    KvmCpuRole
        ``base``: level, direct=0, has_4_byte_gpte=0, ad_disabled=!A/D,
        guest_mode=1, access=ACC_ALL, everything else 0 (efer_nx=0,
        cr0_wp=0, smm=0).  ``ext``: execonly and valid.  The root role is
        ``.base`` (EPT does not read CR0, CR4 or EFER).
    """
    cdef uint32_t lvl = _root_level(level, "level")
    cdef uint32_t w = 0
    w = role_set_level(w, lvl)
    w = role_set_ad_disabled(w, not _flag(accessed_dirty, "accessed_dirty"))
    w = role_set_guest_mode(w, True)
    w = role_set_access(w, ACC_ALL)
    cdef uint32_t ext = EXT_VALID_MASK
    if _flag(execonly, "execonly"):
        ext |= EXT_EXECONLY_MASK
    return cpu_role_from_u64(cpu_role_as_u64(w, ext))


def kvm_mmu_child_role(parent_role, sptep_index, direct, access):
    """Role of a child SP linked from a parent SPTE (``kvm_mmu_child_role``).

    Parameters
    ----------
    parent_role : KvmMmuPageRole
        Role of the SP that holds the parent SPTE (level >= 2).
    sptep_index : int
        Index of the parent SPTE in its SP, 0..511 (``spte_index(sptep)``).
    direct : bool
        The child is not backed by a guest page table.
    access : int
        ACC_* bits for the child (0..7).

    Returns
    -------
    KvmMmuPageRole
        The parent role one level down, with `direct` and `access`,
        passthrough=0, and -- for a guest with 4-byte PTEs -- quadrant =
        ``sptep_index & 1`` (which 2 MiB half of the guest's 4 MiB page table
        the child shadows).  The kernel WARNs if a 4-byte-gpte child is not a
        4K SP; that case is returned as computed, and counted by
        :func:`mmu_warnings` in a debug build.

    Raises
    ------
    ValueError
        Parent level < 2, index or access out of range.
    """
    if not isinstance(parent_role, KvmMmuPageRole):
        raise TypeError(f"parent_role must be a KvmMmuPageRole, not {type(parent_role).__name__}")
    cdef uint32_t parent = (<KvmMmuPageRole>parent_role).word
    if role_level(parent) < 2:
        raise ValueError(f"a level-{role_level(parent)} SP has no child SPs")
    cdef int index = _uint(sptep_index, 9, "sptep_index")
    cdef uint32_t acc = _uint(access, 3, "access")
    return page_role_from_word(mmu_child_role_word(parent, index, _flag(direct, "direct"), acc))


def role_sync_mismatch(sp_role, root_role):
    """True if `sp_role` differs from `root_role` outside :data:`SYNC_ROLE_IGN`.

    This is the role part of ``kvm_sync_page_check()``: an unsync SP can only
    be synced by an MMU whose root role matches it in every bit except
    level, access, quadrant and passthrough.
    """
    return role_sync_mismatch_word(_word_of(sp_role, KvmMmuPageRole, "sp_role"),
                                   _word_of(root_role, KvmMmuPageRole, "root_role"))


def role_trace_text(role, mmu_valid_gen, gfn, root_count, unsync):
    """The shadow-page text of the kvmmmu SP tracepoints.

    This is what ``kvm_mmu_sync_page``, ``kvm_mmu_unsync_page`` and
    ``kvm_mmu_prepare_zap_page`` print, and the first half of
    ``kvm_mmu_get_page`` (which appends ``" new"`` or ``" existing"``)::

        sp gen %u gfn %llx l%u %u-byte q%u%s %s%s %snxe %sad root %u %s

    Parameters
    ----------
    role : KvmMmuPageRole or int
        ``sp->role`` (the word, if an int).
    mmu_valid_gen : int
        ``sp->mmu_valid_gen`` (u8).
    gfn : int
        ``sp->gfn`` (u64), printed in lower-case hex without ``0x``.
    root_count : int
        ``sp->root_count`` (u32 in the record).
    unsync : bool
        ``sp->unsync``.

    Returns
    -------
    str

    Examples
    --------
    >>> role_trace_text(KvmMmuPageRole(0x3784), 0, 0, 0, False)
    'sp gen 0 gfn 0 l4 8-byte q0 direct wux nxe ad root 0 sync'
    """
    cdef uint32_t w = _word_of(role, KvmMmuPageRole, "role")
    gen = _uint(mmu_valid_gen, 8, "mmu_valid_gen")
    g = _uint(gfn, 64, "gfn")
    rc = _uint(root_count, 32, "root_count")
    us = _flag(unsync, "unsync")
    return (f"sp gen {gen} gfn {g:x} l{role_level(w)} "
            f"{4 if role_has_4_byte_gpte(w) else 8}-byte q{role_quadrant(w)}"
            f"{' direct' if role_direct(w) else ''} {ACCESS_STR[role_access(w)]}"
            f"{' invalid' if role_invalid(w) else ''} "
            f"{'' if role_efer_nx(w) else '!'}nxe {'!' if role_ad_disabled(w) else ''}ad "
            f"root {rc} {'unsync' if us else 'sync'}")
