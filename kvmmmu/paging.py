"""The guest page-table walker of KVM x86 (Linux v6.18 ``paging_tmpl.h``).

KVM walks the guest's own page tables in software whenever it needs a
guest-virtual to guest-physical translation: on every shadow-paging page
fault, for every address the instruction emulator touches, and (nested) for
L1's EPT tables.  This module does the same walk, with the kernel's results:

* the gpa, the page size and the effective access (``ACC_*`` bits, with
  ``protect_clean_gpte`` applied), or a fault with the exact error code (P,
  W, U, RSVD, F, PK), the fault address and, for EPT, the violation
  qualification bits;
* the accessed/dirty bits written back into guest memory as KVM writes them
  (only after a successful walk; A on every level, D on the leaf for writes;
  tables in read-only memslots are left alone);
* the five walker tracepoints of :mod:`kvmmmu.mmutrace`
  (``kvm_mmu_pagetable_walk``, ``kvm_mmu_paging_element``,
  ``kvm_mmu_set_accessed_bit``, ``kvm_mmu_set_dirty_bit``,
  ``kvm_mmu_walker_error``), with the kernel's text.

Paging modes: 32-bit 2-level (CR4.PSE 4 MiB pages with PSE-36), PAE (the
four PDPTEs are loaded when the MMU is built, i.e. at "CR3 load", and their
reserved bits are checked then, as ``load_pdptrs`` does), 4- and 5-level
long mode, paging off, and EPT (:meth:`GuestMmu.ept`), also as the outer MMU
of an L2 walk (``nested=``).

Permission checks use KVM's precomputed tables, built per MMU role exactly as
``update_permission_bitmask`` and ``update_pkru_bitmask`` do: CR0.WP=0
supervisor writes, SMEP, SMAP with RFLAGS.AC and implicit supervisor
accesses, protection keys for user pages only, bit 63 reserved when
EFER.NXE=0 (``reset_guest_rsvds_bits_mask``).

Example
-------
>>> import numpy as np
>>> from kvmmmu import paging
>>> ram = np.zeros(1 << 20, np.uint8)
>>> mem = paging.GuestMemory(ram)
>>> mem.write_u64(0x1000, 0x2000 | 0x7)          # PML4E -> PDPT
>>> mem.write_u64(0x2000, 0x3000 | 0x7)          # PDPTE -> PD
>>> mem.write_u64(0x3000, 0x200000 | 0x87)       # PDE: 2 MiB page at 2 MiB
>>> mmu = paging.GuestMmu(mem, paging.CpuState.long_mode(cr3=0x1000), paging.GuestCpuModel())
>>> w = mmu.walk_addr(0x1234, paging.PFERR_WRITE_MASK)
>>> hex(w.gpa), w.page_size, w.access_str
('0x201234', 2097152, 'wux')
>>> hex(mem.read_u64(0x3000))                     # A and D set by the walk
'0x2000e7'

Bad input (CPU state that KVM would refuse, unknown access bits, gvas that
do not fit the mode) raises a :class:`PagingError` subclass before anything
is read or written.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from operator import index as _index

import numpy as np

from kvmmmu._core import guest_walk as _gw
from kvmmmu._core.guest_walk import (
    WALK_DTYPE, WALK_FAULT, WALK_NESTED_FAULT, GuestMemory, GuestMemoryError,
    GpaNotMappedError, GpaReadOnlyError, PTTYPE_32, PTTYPE_64, PTTYPE_EPT,
)
from kvmmmu._core.role import KvmCpuRole, kvm_calc_cpu_role, kvm_calc_shadow_ept_root_page_role
from kvmmmu._core.spte import RsvdBitsValidate
from kvmmmu._core.trace_buf import print_flags

__all__ = [
    "GuestMemory", "GuestCpuModel", "CpuState", "GuestMmu", "GuestWalker", "PageFault",
    "PagingError", "CpuStateError", "PdptrLoadError", "AccessError", "EptpError",
    "GuestMemoryError", "GpaNotMappedError", "GpaReadOnlyError", "PageFaultError",
    "update_permission_bitmask", "update_pkru_bitmask", "reset_guest_rsvds_bits_mask",
    "load_pdptrs", "pferr_str", "WALK_DTYPE", "WALK_FAULT", "WALK_NESTED_FAULT",
    "PTTYPE_32", "PTTYPE_64", "PTTYPE_EPT", "INVALID_GPA",
]

# --- constants ---------------------------------------------------------------

PFERR_PRESENT_MASK = _gw.PFERR_PRESENT_MASK
PFERR_WRITE_MASK = _gw.PFERR_WRITE_MASK
PFERR_USER_MASK = _gw.PFERR_USER_MASK
PFERR_RSVD_MASK = _gw.PFERR_RSVD_MASK
PFERR_FETCH_MASK = _gw.PFERR_FETCH_MASK
PFERR_PK_MASK = _gw.PFERR_PK_MASK
PFERR_SS_MASK = _gw.PFERR_SS_MASK
PFERR_IMPLICIT_ACCESS = _gw.PFERR_IMPLICIT_ACCESS
#: Access bits a walk accepts (P is ignored, as in the kernel).
ACCESS_ALLOWED = _gw.ACCESS_ALLOWED
INVALID_GPA = _gw.INVALID_GPA

from kvmmmu._core.defs import (  # noqa: E402  (the one home of these)
    ACC_EXEC_MASK, ACC_WRITE_MASK, ACC_USER_MASK, ACC_ALL,
    PG_LEVEL_NONE, PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G,
)

X86_CR0_PE = 1 << 0
X86_CR0_WP = 1 << 16
X86_CR0_PG = 1 << 31
X86_CR4_PSE = 1 << 4
X86_CR4_PAE = 1 << 5
X86_CR4_LA57 = 1 << 12
X86_CR4_SMEP = 1 << 20
X86_CR4_SMAP = 1 << 21
X86_CR4_PKE = 1 << 22
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NX = 1 << 11
X86_EFLAGS_AC = 1 << 18

EPT_VIOLATION_ACC_READ = _gw.EPT_VIOLATION_ACC_READ
EPT_VIOLATION_ACC_WRITE = _gw.EPT_VIOLATION_ACC_WRITE
EPT_VIOLATION_ACC_INSTR = _gw.EPT_VIOLATION_ACC_INSTR

_U64 = (1 << 64) - 1


# --- errors ------------------------------------------------------------------

class PagingError(ValueError):
    """Bad input to the walker; nothing was read or written."""


class CpuStateError(PagingError):
    """CPU state that KVM refuses (KVM_SET_SREGS fails or the guest gets #GP)."""


class PdptrLoadError(PagingError):
    """PAE: the PDPTEs at CR3 cannot be loaded (``load_pdptrs`` fails: #GP)."""


class AccessError(PagingError):
    """An access with PFERR bits the walker does not take, or a gva that does
    not fit the paging mode."""


class EptpError(PagingError):
    """An EPTP that nested VM entry would reject."""


class PageFaultError(Exception):
    """Raised by :meth:`GuestMmu.gva_to_gpa`; ``.fault`` is the :class:`PageFault`."""

    def __init__(self, fault: "PageFault"):
        super().__init__(str(fault))
        self.fault = fault


def pferr_str(error_code: int) -> str:
    """Error-code flags as the kvmmmu tracepoints print them (``"P|W|U"``)."""
    return print_flags(error_code)


# --- guest CPU model ---------------------------------------------------------

_AMD_VENDORS = ("amd", "hygon")


@dataclass(frozen=True)
class GuestCpuModel:
    """The guest CPUID facts that decide reserved bits and allowed CR4/EFER bits.

    Attributes
    ----------
    vendor : str
        ``"intel"``, ``"amd"`` or ``"hygon"`` (AMD-compatible guests reserve
        bit 8 of non-leaf PML5Es/PML4Es, ``guest_cpuid_is_amd_compatible``).
    maxphyaddr : int
        CPUID.80000008H:EAX[7:0] (32..52); bits from here to 51 are reserved
        in every entry.  KVM uses 36 when the guest has no leaf 0x80000008.
    gbpages : bool
        1 GiB pages (CPUID.80000001H:EDX.Page1GB); without it bit 7 of a
        PDPTE is reserved.
    nx, smep, smap, pku, la57, lm : bool
        Features that EFER.NXE, CR4.SMEP/SMAP/PKE/LA57 and long mode need.
    """

    vendor: str = "intel"
    maxphyaddr: int = 48
    gbpages: bool = True
    nx: bool = True
    smep: bool = True
    smap: bool = True
    pku: bool = False
    la57: bool = False
    lm: bool = True

    def __post_init__(self):
        if self.vendor not in ("intel",) + _AMD_VENDORS:
            raise PagingError(f"vendor={self.vendor!r} is not 'intel', 'amd' or 'hygon'")
        if not isinstance(self.maxphyaddr, int) or not 32 <= self.maxphyaddr <= 52:
            raise PagingError(f"maxphyaddr={self.maxphyaddr!r} is outside 32..52")

    @property
    def amd_compatible(self) -> bool:
        return self.vendor in _AMD_VENDORS

    @classmethod
    def from_cpuid(cls, entries) -> "GuestCpuModel":
        """The model of a vCPU whose CPUID is `entries`.

        Parameters
        ----------
        entries : iterable of (function, index, eax, ebx, ecx, edx)
            As set with ``KVM_SET_CPUID2``; missing leaves read as zero, and
            a missing leaf 0x80000008 gives MAXPHYADDR 36 (KVM's default).
        """
        leaves = {}
        for fn, idx, a, b, c, d in entries:
            leaves.setdefault((fn, idx), (a, b, c, d))

        def leaf(fn, idx=0):
            return leaves.get((fn, idx), (0, 0, 0, 0))

        _, b, c, d = leaf(0)
        vendor_str = (b.to_bytes(4, "little") + d.to_bytes(4, "little") + c.to_bytes(4, "little"))
        vendor = {b"AuthenticAMD": "amd", b"HygonGenuine": "hygon"}.get(vendor_str, "intel")
        if (0x80000008, 0) in leaves:
            maxphyaddr = leaf(0x80000008)[0] & 0xff
        else:
            maxphyaddr = 36
        e1d = leaf(0x80000001)[3]
        _, b7, c7, _ = leaf(7, 0)
        return cls(vendor=vendor, maxphyaddr=maxphyaddr, gbpages=bool(e1d >> 26 & 1),
                   nx=bool(e1d >> 20 & 1), lm=bool(e1d >> 29 & 1),
                   smep=bool(b7 >> 7 & 1), smap=bool(b7 >> 20 & 1),
                   pku=bool(c7 >> 3 & 1), la57=bool(c7 >> 16 & 1))


# --- CPU state ---------------------------------------------------------------

@dataclass(frozen=True)
class CpuState:
    """The vCPU registers the walker reads.

    Attributes
    ----------
    cr0, cr3, cr4, efer, rflags : int
        Only CR0.PE/PG/WP, CR4.PSE/PAE/LA57/SMEP/SMAP/PKE, EFER.LME/LMA/NX and
        RFLAGS.AC matter.
    cpl : int
        Current privilege level; :meth:`access` derives the U bit from it.
        (KVM's walker itself only sees the access bits.)
    pkru : int
        The PKRU register.
    """

    cr0: int = X86_CR0_PE | X86_CR0_PG | X86_CR0_WP
    cr3: int = 0
    cr4: int = X86_CR4_PAE
    efer: int = EFER_LME | EFER_LMA | EFER_NX
    rflags: int = 0x2
    cpl: int = 0
    pkru: int = 0

    @classmethod
    def long_mode(cls, cr3, *, la57=False, wp=True, nxe=True, smep=False, smap=False,
                  pke=False, pse=False, ac=False, cpl=0, pkru=0) -> "CpuState":
        """64-bit paging (4-level, or 5-level with `la57`)."""
        cr4 = (X86_CR4_PAE | (X86_CR4_LA57 if la57 else 0) | (X86_CR4_SMEP if smep else 0) |
               (X86_CR4_SMAP if smap else 0) | (X86_CR4_PKE if pke else 0) | (X86_CR4_PSE if pse else 0))
        return cls(cr0=X86_CR0_PE | X86_CR0_PG | (X86_CR0_WP if wp else 0), cr3=cr3, cr4=cr4,
                   efer=EFER_LME | EFER_LMA | (EFER_NX if nxe else 0),
                   rflags=0x2 | (X86_EFLAGS_AC if ac else 0), cpl=cpl, pkru=pkru)

    @classmethod
    def pae(cls, cr3, *, wp=True, nxe=True, smep=False, smap=False, ac=False, cpl=0) -> "CpuState":
        """32-bit PAE paging (3 levels, PDPTEs from CR3)."""
        cr4 = X86_CR4_PAE | (X86_CR4_SMEP if smep else 0) | (X86_CR4_SMAP if smap else 0)
        return cls(cr0=X86_CR0_PE | X86_CR0_PG | (X86_CR0_WP if wp else 0), cr3=cr3, cr4=cr4,
                   efer=EFER_NX if nxe else 0, rflags=0x2 | (X86_EFLAGS_AC if ac else 0), cpl=cpl)

    @classmethod
    def legacy32(cls, cr3, *, pse=True, wp=True, smep=False, smap=False, ac=False,
                 cpl=0) -> "CpuState":
        """32-bit 2-level paging (4 MiB pages with `pse`)."""
        cr4 = (X86_CR4_PSE if pse else 0) | (X86_CR4_SMEP if smep else 0) | (X86_CR4_SMAP if smap else 0)
        return cls(cr0=X86_CR0_PE | X86_CR0_PG | (X86_CR0_WP if wp else 0), cr3=cr3, cr4=cr4,
                   efer=0, rflags=0x2 | (X86_EFLAGS_AC if ac else 0), cpl=cpl)

    @classmethod
    def nonpaging(cls, *, cpl=0) -> "CpuState":
        """Protected mode with paging off (gva == gpa)."""
        return cls(cr0=X86_CR0_PE, cr3=0, cr4=0, efer=0, cpl=cpl)

    def access(self, *, write=False, fetch=False, implicit=False) -> int:
        """The PFERR access KVM builds for an access at this CPL.

        ``U`` when CPL is 3 and the access is not an implicit supervisor
        access (descriptor tables, TSS, ...), which gets
        ``PFERR_IMPLICIT_ACCESS`` instead.
        """
        if write and fetch:
            raise AccessError("an access is a write or a fetch, not both")
        acc = (PFERR_WRITE_MASK if write else 0) | (PFERR_FETCH_MASK if fetch else 0)
        if implicit:
            return acc | PFERR_IMPLICIT_ACCESS
        return acc | (PFERR_USER_MASK if self.cpl == 3 else 0)

    @property
    def long_mode_active(self) -> bool:
        return bool(self.efer & EFER_LMA)

    def check(self, model: GuestCpuModel) -> None:
        """Raise :class:`CpuStateError` if KVM would refuse this state for `model`."""
        for name in ("cr0", "cr3", "cr4", "efer", "rflags"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= _U64:
                raise CpuStateError(f"{name}={v!r} is not a 64-bit register value")
        if not isinstance(self.cpl, int) or not 0 <= self.cpl <= 3:
            raise CpuStateError(f"cpl={self.cpl!r} is not 0..3")
        if not isinstance(self.pkru, int) or not 0 <= self.pkru < 1 << 32:
            raise CpuStateError(f"pkru={self.pkru!r} is not a 32-bit value")
        cr0, cr4, efer = self.cr0, self.cr4, self.efer
        if cr0 & X86_CR0_PG and not cr0 & X86_CR0_PE:
            raise CpuStateError("CR0.PG requires CR0.PE")
        if efer & EFER_LME and cr0 & X86_CR0_PG:
            if not cr4 & X86_CR4_PAE:
                raise CpuStateError("long mode (EFER.LME with CR0.PG) requires CR4.PAE")
            if not efer & EFER_LMA:
                raise CpuStateError("EFER.LME with CR0.PG requires EFER.LMA")
        elif efer & EFER_LMA:
            raise CpuStateError("EFER.LMA requires EFER.LME and CR0.PG")
        needs = ((cr4 & X86_CR4_SMEP, model.smep, "CR4.SMEP", "SMEP"),
                 (cr4 & X86_CR4_SMAP, model.smap, "CR4.SMAP", "SMAP"),
                 (cr4 & X86_CR4_PKE, model.pku, "CR4.PKE", "PKU"),
                 (cr4 & X86_CR4_LA57, model.la57, "CR4.LA57", "LA57"),
                 (efer & EFER_NX, model.nx, "EFER.NXE", "NX"),
                 (efer & EFER_LME, model.lm, "EFER.LME", "LM"))
        for bit, have, reg, feature in needs:
            if bit and not have:
                raise CpuStateError(f"{reg} needs {feature} in the guest CPUID")
        if efer & EFER_LMA:
            if self.cr3 >> model.maxphyaddr and self.cr3 >> 52 == 0:
                raise CpuStateError(f"CR3={self.cr3:#x} has bits above MAXPHYADDR {model.maxphyaddr}")
            if self.cr3 >> 52:
                raise CpuStateError(f"CR3={self.cr3:#x} has bits 63:52 set (LAM/no-flush not modelled)")
        elif self.cr3 >> 32:
            raise CpuStateError(f"CR3={self.cr3:#x} does not fit 32 bits outside long mode")


# --- the MMU's tables (mmu.c) ------------------------------------------------

def _byte_mask(acc_bit):
    """BYTE_MASK(): bit v set for every ACC_* value v (0..7) that has `acc_bit`."""
    return sum(1 << v for v in range(8) if v & acc_bit)


def _role_bits(cpu_role: KvmCpuRole):
    base, ext = cpu_role.base, cpu_role.ext
    return (bool(ext.cr4_smep), bool(ext.cr4_smap), bool(base.cr0_wp), bool(base.efer_nx),
            bool(ext.cr4_pke))


@functools.lru_cache(maxsize=256)
def _permissions(smep, smap, wp, nx, ept):
    x, w, u = _byte_mask(ACC_EXEC_MASK), _byte_mask(ACC_WRITE_MASK), _byte_mask(ACC_USER_MASK)
    out = []
    for byte in range(16):
        pfec = byte << 1
        wf = (~w & 0xff) if pfec & PFERR_WRITE_MASK else 0
        uf = (~u & 0xff) if pfec & PFERR_USER_MASK else 0
        ff = (~x & 0xff) if pfec & PFERR_FETCH_MASK else 0
        smepf = smapf = 0
        if not ept:
            kf = 0 if pfec & PFERR_USER_MASK else u      # supervisor access to a user page
            if not nx:
                ff = 0
            if not wp:
                wf = wf if pfec & PFERR_USER_MASK else 0
            if smep:
                smepf = kf if pfec & PFERR_FETCH_MASK else 0
            if smap:
                # RSVD stands for "SMAP overridden" (AC set, explicit access).
                smapf = 0 if pfec & (PFERR_RSVD_MASK | PFERR_FETCH_MASK) else kf
        out.append(ff | uf | wf | smepf | smapf)
    arr = np.array(out, dtype=np.uint8)
    arr.flags.writeable = False
    return arr


def update_permission_bitmask(cpu_role: KvmCpuRole, ept: bool = False) -> np.ndarray:
    """``mmu->permissions`` for an MMU with this CPU role.

    Byte ``i`` is for the access ``pfec = i << 1`` (W=bit 1, U=bit 2, bit 3 =
    SMAP overridden, F=bit 4); bit ``a`` of the byte is set when an access
    with those bits faults on a page whose accumulated access is ``a``
    (``ACC_*``).  Cached per role.

    Returns
    -------
    ndarray of uint8, shape (16,), read-only
    """
    if not isinstance(cpu_role, KvmCpuRole):
        raise TypeError(f"cpu_role must be a KvmCpuRole, not {type(cpu_role).__name__}")
    smep, smap, wp, nx, _ = _role_bits(cpu_role)
    return _permissions(smep, smap, wp, nx, bool(ept))


@functools.lru_cache(maxsize=64)
def _pkru_mask(pke, wp):
    if not pke:
        return 0
    mask = 0
    for bit in range(16):
        pfec = bit << 1
        ff = pfec & PFERR_FETCH_MASK
        uf = pfec & PFERR_USER_MASK
        wf = pfec & PFERR_WRITE_MASK
        pte_user = pfec & PFERR_RSVD_MASK           # RSVD stands for "user page"
        check_pkey = not ff and pte_user
        check_write = check_pkey and wf and (uf or wp)
        mask |= ((1 if check_pkey else 0) | (2 if check_write else 0)) << pfec
    return mask


def update_pkru_bitmask(cpu_role: KvmCpuRole) -> int:
    """``mmu->pkru_mask``: two bits (AD, WD) per access index, 0 without CR4.PKE
    in long mode.  The index is the access without P, with bit 3 standing
    for "the page is a user page"."""
    if not isinstance(cpu_role, KvmCpuRole):
        raise TypeError(f"cpu_role must be a KvmCpuRole, not {type(cpu_role).__name__}")
    _, _, wp, _, pke = _role_bits(cpu_role)
    return _pkru_mask(pke, wp)


def reset_guest_rsvds_bits_mask(cpu_role: KvmCpuRole, model: GuestCpuModel) -> RsvdBitsValidate:
    """``mmu->guest_rsvd_check`` for a (non-EPT) guest with this role and CPU model."""
    base, ext = cpu_role.base, cpu_role.ext
    return RsvdBitsValidate.legacy(maxphyaddr=model.maxphyaddr, level=base.level,
                                   nx=bool(base.efer_nx), gbpages=model.gbpages,
                                   pse=bool(ext.cr4_pse), amd=model.amd_compatible)


def _pdptr_rsvd_bits(model: GuestCpuModel) -> int:
    # load_pdptrs(): MAXPHYADDR..63, and bits 8:5 and 2:1.
    return (_U64 & ~((1 << model.maxphyaddr) - 1)) | 0x1e0 | 0x6


def load_pdptrs(memory: GuestMemory, cr3: int, model: GuestCpuModel, nested: "GuestMmu" = None):
    """The four PAE PDPTEs that a load of `cr3` puts in the PDPTE registers.

    Reads 32 bytes at ``cr3 & ~0x1f`` (through `nested`, the outer MMU, for
    an L2 guest); a present PDPTE with a reserved bit (MAXPHYADDR..63, 8:5,
    2:1) makes the load fail, as KVM's ``load_pdptrs`` does (#GP).

    Raises
    ------
    PdptrLoadError
        Also for a `cr3` outside ``[0, 2**64)``.
    TypeError
        `memory`, `model`, `nested` or `cr3` of the wrong type (floats and
        bools are not addresses).
    """
    if not isinstance(memory, GuestMemory):
        raise TypeError(f"memory must be a GuestMemory, not {type(memory).__name__}")
    if not isinstance(model, GuestCpuModel):
        raise TypeError(f"model must be a GuestCpuModel, not {type(model).__name__}")
    if nested is not None and not isinstance(nested, GuestMmu):
        raise TypeError(f"nested must be a GuestMmu or None, not {type(nested).__name__}")
    if isinstance(cr3, bool):
        raise TypeError("cr3 must be an int, not bool")
    try:
        cr3 = _index(cr3)
    except TypeError:
        raise TypeError(f"cr3 must be an int, not {type(cr3).__name__}") from None
    if not 0 <= cr3 <= _U64:
        raise PdptrLoadError(f"cr3={cr3:#x} is not a 64-bit value")
    gpa = cr3 & 0xffffffe0
    if nested is not None:
        w = nested.walk_addr(gpa, PFERR_USER_MASK | PFERR_WRITE_MASK)
        if not w.ok:
            raise PdptrLoadError(f"CR3={cr3:#x}: the PDPT gpa does not translate ({w.fault})")
        gpa = w.gpa
    try:
        raw = memory.read(gpa, 32)
    except GpaNotMappedError:
        raise PdptrLoadError(f"CR3={cr3:#x}: the PDPT is not in guest memory") from None
    pdptrs = tuple(int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(4))
    rsvd = _pdptr_rsvd_bits(model)
    for i, p in enumerate(pdptrs):
        if p & 1 and p & rsvd:
            raise PdptrLoadError(f"PDPTE{i}={p:#x} has reserved bits {p & rsvd:#x}")
    return pdptrs


# --- results -----------------------------------------------------------------
# PageFault (``struct x86_exception``) and GuestWalker (``struct guest_walker``)
# are extension types the C walker fills directly (kvmmmu._core.guest_walk).

PageFault = _gw.PageFault
GuestWalker = _gw.GuestWalker


# --- the MMU -----------------------------------------------------------------

def _check_access(access):
    try:
        acc = _index(access)
    except TypeError:
        raise AccessError(f"access must be an int, not {type(access).__name__}") from None
    if not 0 <= acc <= _U64 or acc & ~ACCESS_ALLOWED:
        raise AccessError(f"access={acc:#x}: only PFERR W, U, F, P and IMPLICIT_ACCESS are taken "
                          "(RSVD, PK and SS are outputs or unsupported)")
    return acc


def _check_gva(limit, gva):
    try:
        gva = _index(gva)
    except TypeError:
        raise AccessError(f"gva must be an int, not {type(gva).__name__}") from None
    if not 0 <= gva <= limit:
        raise AccessError(f"gva={gva:#x} does not fit this paging mode (at most {limit:#x})")
    return gva


def _walk_args(limit, gva, access):
    """GuestMmu.walk_addr's checks: ``(gva, access)`` as ints, or AccessError."""
    return _check_gva(limit, gva), _check_access(access)


class GuestMmu:
    """A guest MMU as KVM sets it up for walking (``struct kvm_mmu``).

    ``root_mmu``/``nested_mmu``: built from a :class:`CpuState` and a
    :class:`GuestCpuModel` (``kvm_calc_cpu_role``, then
    ``reset_guest_paging_metadata``).  ``guest_mmu`` for nested EPT: see
    :meth:`ept`.

    Parameters
    ----------
    memory : GuestMemory
        Guest physical memory (for an L2 MMU: L1's, shared with `nested`).
    cpu : CpuState
    model : GuestCpuModel
    smm, guest_mode : bool
        Role bits (``guest_mode`` is forced on when `nested` is given).
    pdptrs : sequence of 4 ints, optional
        PAE only: the PDPTE registers.  By default they are loaded from
        memory now (:func:`load_pdptrs`), as a write to CR3 does.
    nested : GuestMmu, optional
        The EPT MMU of L1: this MMU then walks L2's tables and translates
        every table gpa and the final gpa through it (``kvm_translate_gpa``).

    Raises
    ------
    CpuStateError, PdptrLoadError, TypeError

    Invariants: the walk context is immutable; walks change only guest
    memory (A/D bits) and emit trace events.

    Threads: a GuestMmu may be walked from several threads at once (results
    and trace records are per call); see :class:`GuestMemory` for adding
    slots meanwhile.
    """

    def __init__(self, memory: GuestMemory, cpu: CpuState, model: GuestCpuModel, *,
                 smm=False, guest_mode=False, pdptrs=None, nested: "GuestMmu" = None):
        if not isinstance(memory, GuestMemory):
            raise TypeError(f"memory must be a GuestMemory, not {type(memory).__name__}")
        if not isinstance(cpu, CpuState):
            raise TypeError(f"cpu must be a CpuState, not {type(cpu).__name__}")
        if not isinstance(model, GuestCpuModel):
            raise TypeError(f"model must be a GuestCpuModel, not {type(model).__name__}")
        if nested is not None:
            if not isinstance(nested, GuestMmu) or nested.pttype != PTTYPE_EPT:
                raise TypeError("nested must be an EPT GuestMmu (GuestMmu.ept)")
            if nested.memory is not memory:
                raise PagingError("an L2 MMU and its EPT MMU must share L1's GuestMemory")
            guest_mode = True
        cpu.check(model)
        role = kvm_calc_cpu_role(cpu.cr0, cpu.cr4, cpu.efer, smm=smm, guest_mode=guest_mode)
        level = role.base.level if not role.base.direct else 0
        pttype = PTTYPE_64 if cpu.cr4 & X86_CR4_PAE else PTTYPE_32
        if level == 3:
            if pdptrs is None:
                pdptrs = load_pdptrs(memory, cpu.cr3, model, nested)
            else:
                pdptrs = tuple(pdptrs)
                if len(pdptrs) != 4 or any(not isinstance(p, int) or not 0 <= p <= _U64 for p in pdptrs):
                    raise PdptrLoadError("pdptrs must be four 64-bit ints")
        elif pdptrs is not None:
            raise PdptrLoadError("pdptrs are only used with PAE paging")
        else:
            pdptrs = (0, 0, 0, 0)
        self.memory = memory
        self.cpu = cpu
        self.model = model
        self.cpu_role = role
        self.pttype = pttype
        self.root_level = level
        self.pdptrs = tuple(pdptrs)
        self.nested = nested
        if level:
            self.permissions = update_permission_bitmask(role)
            self.pkru_mask = update_pkru_bitmask(role)
            self.guest_rsvd_check = reset_guest_rsvds_bits_mask(role, model)
        else:
            self.permissions = np.zeros(16, np.uint8)
            self.pkru_mask = 0
            self.guest_rsvd_check = RsvdBitsValidate.legacy(maxphyaddr=model.maxphyaddr, level=4,
                                                            nx=True, gbpages=True)
        self._gva_limit = _U64 if cpu.long_mode_active else 0xFFFFFFFF
        self._ctx = _gw.WalkContext(
            memory, pttype, level, cpu.cr3, self.pdptrs, True, bool(role.base.efer_nx),
            bool(role.ext.cr4_smep), bool(role.ext.cr4_pse), bool(cpu.rflags & X86_EFLAGS_AC),
            True, cpu.pkru, self.pkru_mask, self.permissions, self.guest_rsvd_check,
            nested._ctx if nested is not None else None)
        self._bind_walk_addr()

    @classmethod
    def ept(cls, memory: GuestMemory, eptp: int, model: GuestCpuModel, *, execonly=True,
            huge_level=PG_LEVEL_1G, ad_supported=True, five_level_supported=True) -> "GuestMmu":
        """L1's EPT as KVM walks it for L2 (``kvm_init_shadow_ept_mmu``).

        Walks take an L2 gpa and PFERR bits where U means "read"
        (``PFERR_USER_MASK``), W write and F fetch.

        Parameters
        ----------
        eptp : int
            Memory type (bits 2:0: 0 UC or 6 WB), walk length - 1 (bits
            5:3: 3 or 4), A/D enable (bit 6), PML4/PML5 address.
        model : GuestCpuModel
            L1's CPU model (MAXPHYADDR).
        execonly : bool
            VMX capability "execute-only EPT entries" (else XWR=100 is a
            misconfiguration).
        huge_level : int
            Largest EPT page: 1 (none), 2 (2 MiB) or 3 (1 GiB).
        ad_supported, five_level_supported : bool
            VMX capabilities that decide whether EPTP bit 6 / a 5-level walk
            are accepted.

        Raises
        ------
        EptpError
        """
        if not isinstance(memory, GuestMemory):
            raise TypeError(f"memory must be a GuestMemory, not {type(memory).__name__}")
        if not isinstance(model, GuestCpuModel):
            raise TypeError(f"model must be a GuestCpuModel, not {type(model).__name__}")
        try:
            eptp = _index(eptp)
        except TypeError:
            raise EptpError(f"eptp must be an int, not {type(eptp).__name__}") from None
        if not 0 <= eptp <= _U64:
            raise EptpError(f"eptp={eptp:#x} is not 64-bit")
        memtype, walk, ad = eptp & 7, (eptp >> 3) & 7, bool(eptp >> 6 & 1)
        if memtype not in (0, 6):
            raise EptpError(f"EPTP memory type {memtype} is not UC (0) or WB (6)")
        if walk not in (3, 4) or (walk == 4 and not five_level_supported):
            raise EptpError(f"EPTP page-walk length {walk + 1} is not supported")
        if ad and not ad_supported:
            raise EptpError("EPTP enables A/D bits but they are not supported")
        if (eptp >> 7) & 0x1f or eptp >> model.maxphyaddr:
            raise EptpError(f"EPTP={eptp:#x} has reserved bits set")
        if huge_level not in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G):
            raise EptpError(f"huge_level={huge_level!r} is not 1, 2 or 3")
        self = cls.__new__(cls)
        role = kvm_calc_shadow_ept_root_page_role(ad, bool(execonly), walk + 1)
        self.memory = memory
        self.cpu = None
        self.model = model
        self.cpu_role = role
        self.pttype = PTTYPE_EPT
        self.root_level = walk + 1
        self.pdptrs = (0, 0, 0, 0)
        self.nested = None
        self.eptp = eptp
        self.permissions = update_permission_bitmask(role, ept=True)
        self.pkru_mask = 0
        self.guest_rsvd_check = RsvdBitsValidate.ept(maxphyaddr=model.maxphyaddr,
                                                     execonly=bool(execonly), huge_level=huge_level)
        self._gva_limit = _U64
        self._ctx = _gw.WalkContext(
            memory, PTTYPE_EPT, walk + 1, eptp, self.pdptrs, ad, False, False, False, False,
            False, 0, 0, self.permissions, self.guest_rsvd_check, None)
        self._bind_walk_addr()
        return self

    def __repr__(self):
        kind = {PTTYPE_32: "32-bit", PTTYPE_64: "64-bit", PTTYPE_EPT: "EPT"}[self.pttype]
        return f"<GuestMmu {kind} level={self.root_level} {self.cpu_role!r}>"

    def _check_gva(self, gva):
        return _check_gva(self._gva_limit, gva)

    def _bind_walk_addr(self):
        # One call per walk from Python: the instance's walk_addr is the
        # context's (the same checks and answers as the method below, which
        # stays the documented form
        # answers; the checker holds the limit, not self: no reference cycle)
        self._ctx.bind_walk_addr(self._gva_limit, functools.partial(_walk_args, self._gva_limit))
        self.walk_addr = self._ctx.walk_addr

    def walk_addr(self, gva: int, access: int = 0) -> GuestWalker:
        """Walk `gva` for `access` (``FNAME(walk_addr_generic)``).

        Parameters
        ----------
        gva : int
            Guest-virtual address (an L2 gpa for EPT).  Outside long mode it
            must fit 32 bits.  Canonical form is not checked (KVM's callers
            do that).
        access : int
            PFERR bits: W, U (EPT: read), F, plus PFERR_IMPLICIT_ACCESS for
            implicit supervisor accesses.  P is accepted and ignored.

        Returns
        -------
        GuestWalker
            Check ``.ok``; A/D bits are already written back.
        """
        w = self._ctx.walk_fast(gva, access, self._gva_limit)
        if w is None:       # not plain in-range ints: check them and say why
            w = self._ctx.walk(self._check_gva(gva), _check_access(access))
        return w

    def gva_to_gpa(self, gva: int, access: int = 0) -> int:
        """The gpa of `gva` (``FNAME(gva_to_gpa)``).

        Raises
        ------
        PageFaultError
            The walk failed; ``.fault`` says how.
        """
        w = self.walk_addr(gva, access)
        if w.fault:
            raise PageFaultError(w.fault)
        return w.gpa

    def walk_array(self, gvas, access: int = 0, out=None) -> np.ndarray:
        """Walk every gva of `gvas` in order (one access, this CPU state).

        The same as :meth:`walk_addr` per element (A/D bits written by one
        walk are seen by the next; events are emitted after the batch), as
        one C loop without the GIL.

        Parameters
        ----------
        gvas : array_like of uint64, shape (n,)
        access : int
        out : ndarray of WALK_DTYPE, shape (n,), optional

        Returns
        -------
        ndarray of WALK_DTYPE, shape (n,)
            Per walk: ``gpa`` (INVALID_GPA on a fault), ``address`` and
            ``error_code`` of the fault, ``level``, ``pte_access``,
            ``flags`` (WALK_FAULT, WALK_NESTED_FAULT),
            ``exit_qualification`` (EPT), ``retries``.
        """
        acc = _check_access(access)
        # No silent conversion: a float or signed array would be truncated or
        # wrap, so only uint64 is accepted (as everywhere in the batch API).
        if not isinstance(gvas, np.ndarray):
            raise TypeError(f"gvas must be a numpy.ndarray of uint64, not {type(gvas).__name__}")
        if gvas.dtype != np.uint64:
            raise TypeError(f"gvas must have dtype uint64, not {gvas.dtype}")
        if gvas.ndim != 1:
            raise AccessError(f"gvas must be 1-d, not {gvas.ndim}-d")
        arr = np.ascontiguousarray(gvas)
        if self._gva_limit != _U64 and arr.size and int(arr.max()) > self._gva_limit:
            raise AccessError("a gva does not fit 32 bits outside long mode")
        return self._ctx.walk_array(arr, acc, out)
