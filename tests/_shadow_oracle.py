"""An independent oracle for the shadow MMU: what the guest's page tables and
the host allow, against what the shadow page tables grant.

Nothing here calls the model's guest walker (``kvmmmu.paging``,
``_core.guest_walk``) or the shadow MMU's own code: the guest side is a
plain-Python page-table walk written from the SDM (Vol. 3A ch. 4) over a
``read_u64(gpa)`` callable, and the shadow side is read straight out of the
page-table arena (``PtArena.spt``, ``spte_to_child_sp``, ``get_sp``) with the
SPTE bit layout of ``spte.md``.

Three parts:

* :func:`walk_guest` / :func:`translate` - the guest's translation of a gva
  (4- and 5-level long mode, PAE with PDPTE registers, 2-level 32-bit with
  PSE): the frame, the page size, the effective W/U/NX (AND / AND / OR over
  the levels), whether every level has A set and whether the leaf has D,
  or None (not present, reserved bits set).  :func:`guest_allows` turns a
  translation into the set of accesses the architecture permits under
  CR0.WP, CR4.SMEP and EFER.NXE (SMAP and protection keys are not part of
  the comparison: hardware enforces them from the guest's own CR4/RFLAGS
  on the shadow entries, and KVM documents that a WP=0 kernel-writable copy
  of a user page escapes SMAP - mmu.rst "Emulating cr0.wp").
* :func:`iter_shadow` - every present or MMIO leaf below a root SP, with its
  address range (gva for indirect roots, gpa for direct ones), level, SPTE,
  pfn, the hardware access it grants (AND of W/U, OR of NX over the path)
  and the SPs on its path.
* the checkers:

  - :func:`check_shadow_root` (shadow paging): no present leaf grants more
    than the guest's tables (kind by kind: supervisor/user x read/write/
    fetch), maps another gfn, is writable without the guest leaf's D bit or
    present without A on every level, or links a child SP whose gfn is not
    the guest's table at that level; and the memslot allow for every leaf
    (:func:`check_leaf_memslot`).  A leaf whose path goes through an unsync
    SP may instead match any translation in the :class:`TlbWindow` of its
    gva: the x86 TLB may keep a translation from the moment of the last
    invalidation of that gva (INVLPG, or a CR3 load / TLB flush for all)
    until the next one, so an unsync shadow entry may lag the guest's
    tables by exactly that much (shadow-mmu.md §7-§9).
  - :func:`check_direct_root` (``mmu="tdp"`` direct shadow pages, and the
    TDP MMU's roots, which have the same shape): every leaf lies in a
    memslot at its position and agrees with the memslot allow.
  - :func:`check_leaf_memslot`: the gfn is in a valid memslot; the pfn is
    the host's page for the memslot's hva (page by page for huge leaves);
    W only if the slot is not READONLY, the host PTE is writable, the gfn
    is not write-tracked, and - dirty logging - the gfn's dirty bit is set
    and the leaf is 4K.  A current-generation MMIO SPTE must be for a gfn
    outside every memslot.

Every checker returns a list of problem strings (empty: all good), so a
test can assert ``== []`` and see every violation at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# --- architectural constants (SDM Vol. 3A 4.x; independent of kvmmmu) ----------
PT_P, PT_W, PT_U, PT_A, PT_D, PT_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
PT_XD = 1 << 63
CR0_WP, CR0_PG = 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_LA57, CR4_SMEP = 1 << 4, 1 << 5, 1 << 12, 1 << 20
EFER_LMA, EFER_NXE = 1 << 10, 1 << 11

#: the six access kinds compared: (supervisor|user) x (read|write|fetch)
KINDS = ("SR", "SW", "SX", "UR", "UW", "UX")

_M64 = (1 << 64) - 1


def _bits(lo, hi):
    """Mask of bits lo..hi inclusive (empty when hi < lo)."""
    return 0 if hi < lo else ((1 << (hi - lo + 1)) - 1) << lo


@dataclass(frozen=True)
class GuestRegs:
    """The register state a translation depends on, plus the CPUID facts
    that decide reserved bits.  ``pdptrs``: the four PAE PDPTE registers
    (loaded at the CR3 load; None outside PAE paging)."""
    cr0: int
    cr3: int
    cr4: int
    efer: int
    maxphyaddr: int = 48
    gbpages: bool = True
    amd: bool = False
    pdptrs: tuple | None = None

    @classmethod
    def of_vcpu(cls, vcpu) -> "GuestRegs":
        c, m = vcpu.cpu, vcpu.guest_model
        return cls(c.cr0, c.cr3, c.cr4, c.efer, m.maxphyaddr, m.gbpages, m.amd_compatible,
                   None if vcpu.pdptrs is None else tuple(int(x) for x in vcpu.pdptrs))

    @property
    def paging(self) -> bool:
        return bool(self.cr0 & CR0_PG)

    @property
    def mode(self) -> int:
        """Guest paging levels: 0 (paging off), 2, 3 (PAE), 4 or 5."""
        if not self.paging:
            return 0
        if self.efer & EFER_LMA:
            return 5 if self.cr4 & CR4_LA57 else 4
        return 3 if self.cr4 & CR4_PAE else 2

    @property
    def nxe(self) -> bool:
        return bool(self.efer & EFER_NXE)

    @property
    def wp(self) -> bool:
        return bool(self.cr0 & CR0_WP)

    @property
    def smep(self) -> bool:
        return bool(self.cr4 & CR4_SMEP)


@dataclass(frozen=True)
class GuestTranslation:
    """One successful guest translation of ``gva``.

    ``level``: 1 (4K), 2 (2M; 4M for 32-bit paging), 3 (1G).  ``gfn`` is the
    frame of ``gva`` itself; ``base_gfn`` the first frame of the page.
    ``w``/``u``: R/W and U/S set on every level; ``nx``: XD on some level
    (only with EFER.NXE); ``accessed``: A on every level; ``dirty``: D on
    the leaf.  ``tables``: the gfn of the table read at each level, top
    first; ``entries``: the entries read, top first."""
    gva: int
    gfn: int
    base_gfn: int
    level: int
    w: bool
    u: bool
    nx: bool
    accessed: bool
    dirty: bool
    tables: tuple = ()
    entries: tuple = ()

    @property
    def gpa(self) -> int:
        return (self.gfn << 12) | (self.gva & 0xFFF)

    @property
    def page_size(self) -> int:
        return 4096 << (9 * (self.level - 1)) if self.level < 3 else 1 << 30

    def key(self):
        """What a TLB entry caches (compared by :class:`TlbWindow`)."""
        return (self.gfn, self.level, self.w, self.u, self.nx, self.accessed, self.dirty)


@dataclass
class WalkResult:
    """A walk, successful or not: ``translation`` (None on failure),
    ``tables``/``entries`` as far as the walk went, ``fault`` ("not present",
    "reserved", "non-canonical", "bad gva") and the level it failed at."""
    translation: GuestTranslation | None
    tables: list = field(default_factory=list)
    entries: list = field(default_factory=list)
    fault: str | None = None
    fault_level: int = 0


def _rsvd_64(regs: GuestRegs, level: int, pte: int, mode: int) -> bool:
    """Reserved bits of a 64-bit-format entry (4/5-level or PAE PDE/PTE)."""
    m = regs.maxphyaddr
    high = _bits(m, 51) if mode >= 4 else _bits(m, 62)
    if not regs.nxe:
        high |= PT_XD
    rsvd = high
    large = bool(pte & PT_PS)
    if mode >= 4 and level >= 4:
        rsvd |= PT_PS                                   # no PS in PML4E/PML5E
        if regs.amd:
            rsvd |= 1 << 8
    elif level == 3:
        if large:
            rsvd |= (0 if regs.gbpages else PT_PS) | _bits(13, 29)
        elif not regs.gbpages:
            pass                                        # non-leaf PDPTE: PS clear, nothing more
    elif level == 2 and large:
        rsvd |= _bits(13, 20)
    return bool(pte & rsvd)


def pae_pdptes_loadable(read_u64, cr3: int, maxphyaddr: int) -> bool:
    """SDM 4.4.1: MOV CR3 in PAE paging loads the four PDPTEs from the
    32-byte-aligned table at CR3[31:5]; a present one with a reserved bit
    (2:1, 8:5, 63:MAXPHYADDR) — or a table the CPU cannot read — is a #GP."""
    base = cr3 & 0xFFFFFFE0
    rsvd = _bits(1, 2) | _bits(5, 8) | _bits(maxphyaddr, 63)
    for i in range(4):
        e = read_u64(base + 8 * i)
        if e is None or e & PT_P and e & rsvd:
            return False
    return True


def _canonical(gva: int, bits: int) -> bool:
    top = gva >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def walk_guest(read_u64, gva: int, regs: GuestRegs) -> WalkResult:
    """The guest's translation of ``gva`` from its tables in memory.

    ``read_u64(gpa)`` returns the 8 bytes at ``gpa`` (little endian) or
    raises / returns None for a gpa outside guest memory (the walk then
    fails as "not present", as KVM's walker does for a table it cannot
    read).  Paging off: identity, every access allowed."""
    mode = regs.mode
    if mode == 0:
        g = gva >> 12
        return WalkResult(GuestTranslation(gva, g, g, 1, True, True, False, True, True))
    if mode >= 4:
        bits = 48 if mode == 4 else 57
        if not _canonical(gva, bits):
            return WalkResult(None, fault="non-canonical")
    elif gva >> 32:
        return WalkResult(None, fault="bad gva")
    res = WalkResult(None)

    def rd(gpa, size):
        try:
            v = read_u64(gpa & ~7)
        except Exception:                               # noqa: BLE001 - any read failure
            return None
        if v is None:
            return None
        v = int(v)
        if size == 4:
            v = (v >> (32 * ((gpa >> 2) & 1))) & 0xFFFFFFFF
        return v

    w = u = True
    nx = False
    accessed = True
    addr_mask = _bits(12, regs.maxphyaddr - 1)
    if mode == 2:
        table = (regs.cr3 & 0xFFFFF000) >> 12
        level, esize = 2, 4
    elif mode == 3:
        pdptrs = regs.pdptrs or (0, 0, 0, 0)
        pdpte = int(pdptrs[(gva >> 30) & 3])
        res.entries.append(pdpte)
        if not pdpte & PT_P:
            res.fault, res.fault_level = "not present", 3
            return res
        table = (pdpte & addr_mask) >> 12
        level, esize = 2, 8
    else:
        table = (regs.cr3 & addr_mask) >> 12
        level, esize = mode, 8
    while True:
        shift = 12 + (10 if esize == 4 else 9) * (level - 1)
        idx = (gva >> shift) & ((1 << (10 if esize == 4 else 9)) - 1)
        res.tables.append(table)
        pte = rd((table << 12) + idx * esize, esize)
        if pte is None:
            res.fault, res.fault_level = "unreadable table", level
            return res
        res.entries.append(pte)
        if not pte & PT_P:
            res.fault, res.fault_level = "not present", level
            return res
        if esize == 8 and _rsvd_64(regs, level, pte, mode):
            res.fault, res.fault_level = "reserved", level
            return res
        if esize == 4 and level == 2 and pte & PT_PS and regs.cr4 & CR4_PSE and pte & _bits(17, 21):
            res.fault, res.fault_level = "reserved", level
            return res
        w &= bool(pte & PT_W)
        u &= bool(pte & PT_U)
        accessed &= bool(pte & PT_A)
        if esize == 8 and regs.nxe and pte & PT_XD:
            nx = True
        last = level == 1 or (pte & PT_PS and (level in (2, 3) if esize == 8 else
                                                 bool(regs.cr4 & CR4_PSE)))
        if last:
            if esize == 4 and level == 2:
                base = ((pte >> 22) & 0x3FF) << 10 | ((pte >> 13) & 0xF) << 20
                frame_bits = 22
            else:
                frame_bits = shift
                base = (pte & addr_mask & ~((1 << frame_bits) - 1)) >> 12
            gfn = base + ((gva & ((1 << frame_bits) - 1)) >> 12)
            res.translation = GuestTranslation(
                gva, gfn, base, level, bool(w), bool(u), nx, bool(accessed), bool(pte & PT_D),
                tuple(res.tables), tuple(res.entries))
            return res
        table = ((pte & 0xFFFFF000) if esize == 4 else (pte & addr_mask)) >> 12
        level -= 1


def translate(read_u64, gva: int, regs: GuestRegs) -> GuestTranslation | None:
    """:func:`walk_guest`'s translation, or None."""
    return walk_guest(read_u64, gva, regs).translation


def memory_reader(vm, as_id: int = 0):
    """A ``read_u64`` over the VM's guest memory (``vm.guest_memory``);
    None for a gpa outside it."""
    mem = vm.guest_memory(as_id)

    def read_u64(gpa):
        try:
            return int.from_bytes(bytes(mem.read(gpa, 8)), "little")
        except Exception:                               # noqa: BLE001 - a hole
            return None
    return read_u64


def guest_allows(tr: GuestTranslation | None, regs: GuestRegs) -> frozenset:
    """The accesses the architecture permits through ``tr`` (SDM 4.6):
    user accesses need U on every level, user writes also W; supervisor
    writes need W when CR0.WP=1; fetches need no XD (with EFER.NXE), and a
    supervisor fetch from a user page is refused with CR4.SMEP."""
    if tr is None:
        return frozenset()
    x = not tr.nx
    k = {"SR"}
    if tr.w or not regs.wp:
        k.add("SW")
    if x and not (regs.smep and tr.u):
        k.add("SX")
    if tr.u:
        k.add("UR")
        if tr.w:
            k.add("UW")
        if x:
            k.add("UX")
    return frozenset(k)


# --- the shadow side ----------------------------------------------------------------

#: bits of union kvm_mmu_page_role (shadow-page.md §2.1)
def role_fields(word: int) -> dict:
    return {"level": word & 0xF, "has_4_byte_gpte": bool(word >> 4 & 1),
            "quadrant": word >> 5 & 3, "direct": bool(word >> 7 & 1), "access": word >> 8 & 7,
            "invalid": bool(word >> 11 & 1), "efer_nx": bool(word >> 12 & 1),
            "cr0_wp": bool(word >> 13 & 1), "smep_andnot_wp": bool(word >> 14 & 1),
            "smap_andnot_wp": bool(word >> 15 & 1), "ad_disabled": bool(word >> 16 & 1),
            "guest_mode": bool(word >> 17 & 1), "passthrough": bool(word >> 18 & 1),
            "smm": word >> 24 & 0xFF}


SPTE_MMU_PRESENT = 1 << 11          # spte.md: KVM's "present" bit (both formats)
SPTE_ADDR_MASK = _bits(12, 51)      # the physical-address field of a leaf


def spte_hw_bits(fmt, spte: int) -> tuple[bool, bool, bool, bool]:
    """``(r, w, u, x)`` the hardware reads from one SPTE: legacy format
    P/RW/US/!XD; EPT R/W/X with no user distinction."""
    if fmt.name == "ept":
        return bool(spte & 1), bool(spte & 2), True, bool(spte & 4)
    return bool(spte & 1), bool(spte & 2), bool(spte & 4), not (spte & fmt.shadow_nx_mask)


def spte_grants(w: bool, u: bool, x: bool, smep: bool) -> frozenset:
    """The accesses a (present) shadow translation lets the hardware make:
    under shadow paging the CPU runs with CR0.WP=1 and EFER.NXE=1, and with
    the guest's CR4.SMEP."""
    k = {"SR"}
    if w:
        k.add("SW")
    if x and not (smep and u):
        k.add("SX")
    if u:
        k.add("UR")
        if w:
            k.add("UW")
        if x:
            k.add("UX")
    return frozenset(k)


@dataclass
class ShadowLeaf:
    """One leaf below a root: ``addr`` (gva or gpa) and ``size`` of the range
    it maps, its ``level``, ``spte``, ``pfn``, the hardware ``(w, u, x)``
    over the whole path, ``mmio`` (an MMIO SPTE: reserved bits, grants
    nothing to the hardware), the SP it sits in and its ``index``, and
    ``path``: the ``(sp, index)`` of every level from the root down."""
    addr: int
    size: int
    level: int
    spte: int
    pfn: int
    w: bool
    u: bool
    x: bool
    mmio: bool
    sp: int
    index: int
    path: tuple


def sp_info(arena, sp: int) -> dict:
    h = arena.get_sp(sp)
    h.update(role_fields(int(h["role"])))
    return h


def _sext(va: int, bits: int) -> int:
    if va >> (bits - 1) & 1:
        va |= _M64 & ~((1 << bits) - 1)
    return va


def iter_shadow(arena, fmt, root_sp: int, *, base: int = 0, va_bits: int | None = None,
                problems: list | None = None, _path=(), _acc=(True, True, True)):
    """Yield a :class:`ShadowLeaf` for every present leaf and every MMIO
    SPTE below ``root_sp``.  The address of entry ``i`` of an SP at level
    L is ``base + i * 4K * 512**(L-1)`` (sign-extended from ``va_bits`` for
    4/5-level gva roots).  One SP may be linked from several entries (a
    guest table used twice); a non-leaf SPTE whose child is not a live SP
    of the level below, or a child already on the path (a cycle), is
    reported in ``problems`` (if given) and not followed."""
    info = arena.get_sp(root_sp)
    level = int(info["role"]) & 0xF
    tbl = np.array(arena.spt(root_sp), copy=True)
    shift = 12 + 9 * (level - 1)
    for i in np.flatnonzero(tbl != np.uint64(arena.nonpresent_value)):
        i = int(i)
        spte = int(tbl[i])
        addr = base + (i << shift)
        if va_bits:
            addr = _sext(addr, va_bits)
        path = _path + ((root_sp, i),)
        if fmt.is_mmio_spte(spte):
            yield ShadowLeaf(addr, 1 << shift, level, spte, 0, False, False, False, True,
                             root_sp, i, path)
            continue
        if not spte & SPTE_MMU_PRESENT:
            continue
        r, w, u, x = spte_hw_bits(fmt, spte)
        acc = (_acc[0] and w, _acc[1] and u, _acc[2] and x)
        if level == 1 or spte & PT_PS:
            pfn = (spte & SPTE_ADDR_MASK) >> 12
            yield ShadowLeaf(addr, 1 << shift, level, spte, pfn, *acc, False, root_sp, i, path)
            continue
        try:
            child = arena.spte_to_child_sp(spte)
            clevel = int(arena.get_sp(child)["role"]) & 0xF
        except Exception as e:                          # noqa: BLE001 - report, don't stop
            if problems is not None:
                problems.append(f"sp {root_sp}[{i}] = {spte:#x}: no child SP ({e})")
            continue
        if clevel != level - 1 or any(child == p for p, _ in path):
            if problems is not None:
                problems.append(f"sp {root_sp}[{i}] (level {level}) links sp {child} of level {clevel}"
                                f"{' already on its path' if clevel == level - 1 else ''}")
            continue
        yield from iter_shadow(arena, fmt, child, base=addr if not va_bits else
                               addr & ((1 << va_bits) - 1), va_bits=va_bits, problems=problems,
                               _path=path, _acc=acc)


def shadow_lookup(arena, fmt, root_sp: int, va: int, *, va_bits: int | None = 48):
    """The hardware's walk of the shadow tables for ``va``: ``(leaf_spte,
    level, (w, u, x), path)`` with ``leaf_spte`` None when some level is
    not present (``level`` is then that level); MMIO SPTEs come back as
    leaves (the caller checks :meth:`SpteFormat.is_mmio_spte`)."""
    sp = root_sp
    acc = (True, True, True)
    path = []
    while True:
        level = int(arena.get_sp(sp)["role"]) & 0xF
        i = (va >> (12 + 9 * (level - 1))) & 511
        spte = int(arena.spt(sp)[i])
        path.append((sp, i))
        if fmt.is_mmio_spte(spte):
            return spte, level, (False, False, False), path
        if not spte & SPTE_MMU_PRESENT or not spte & (7 if fmt.name == "ept" else 1):
            return None, level, acc, path
        r, w, u, x = spte_hw_bits(fmt, spte)
        acc = (acc[0] and w, acc[1] and u, acc[2] and x)
        if level == 1 or spte & PT_PS:
            return spte, level, acc, path
        sp = arena.spte_to_child_sp(spte)


# --- the memslot / host allow -------------------------------------------------------

def _slot_at(vm, gfn, as_id=0):
    for s in vm.memslots[as_id]:
        if s.base_gfn <= gfn < s.base_gfn + s.npages:
            return s
    return None


def _dirty_bit(slot, gfn) -> bool:
    bm = slot.dirty_bitmap
    rel = gfn - slot.base_gfn
    return bm is not None and bool(int(bm[rel >> 6]) >> (rel & 63) & 1)


def check_leaf_memslot(vm, gfn: int, leaf: ShadowLeaf, where: str, as_id: int = 0) -> list[str]:
    """The memslot allow for a present leaf mapping ``gfn`` (its first
    frame): see the module docstring."""
    from kvmmmu.host import PTE_PRESENT, PTE_WRITE
    from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEMSLOT_INVALID
    bad = []
    n = leaf.size >> 12
    slot = _slot_at(vm, gfn, as_id)
    if slot is None or gfn + n > slot.base_gfn + slot.npages:
        return [f"{where}: maps gfn {gfn:#x} (+{n}) outside every memslot"]
    if slot.flags & KVM_MEMSLOT_INVALID:
        bad.append(f"{where}: maps gfn {gfn:#x} of an INVALID (being deleted) memslot")
    g = np.arange(gfn, gfn + n, dtype=np.uint64)
    hva = np.uint64(slot.userspace_addr) + ((g - np.uint64(slot.base_gfn)) << np.uint64(12))
    pfn, flags = vm.host.hva_to_pfn_array(hva)
    want = np.arange(leaf.pfn, leaf.pfn + n, dtype=np.uint64)
    present = (flags & PTE_PRESENT) != 0
    if not present.all():
        k = int(np.flatnonzero(~present)[0])
        bad.append(f"{where}: gfn {gfn + k:#x} mapped (pfn {leaf.pfn + k:#x}) but the host has no page there")
    elif (pfn != want).any():
        k = int(np.flatnonzero(pfn != want)[0])
        bad.append(f"{where}: gfn {gfn + k:#x} -> pfn {leaf.pfn + k:#x}, the host has {int(pfn[k]):#x}")
    if leaf.spte & 2:                                   # the SPTE itself is writable
        if slot.flags & KVM_MEM_READONLY:
            bad.append(f"{where}: writable leaf for gfn {gfn:#x} in a READONLY memslot")
        if not ((flags & PTE_WRITE) != 0).all():
            bad.append(f"{where}: writable leaf for gfn {gfn:#x} over a host page that is not writable")
        wt = slot.arch.gfn_write_track
        if wt is not None and wt[gfn - slot.base_gfn: gfn - slot.base_gfn + n].any():
            bad.append(f"{where}: writable leaf for write-tracked gfn {gfn:#x}")
        if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            if leaf.level > 1:
                bad.append(f"{where}: writable huge leaf (level {leaf.level}) in a dirty-logged memslot")
            elif not _dirty_bit(slot, gfn):
                bad.append(f"{where}: writable leaf for gfn {gfn:#x} in a dirty-logged memslot "
                           "without its dirty bit (a write would go unlogged)")
    return bad


def check_mmio_leaf(vm, vcpu, leaf: ShadowLeaf, where: str) -> tuple[list[str], int | None]:
    """A current-generation MMIO SPTE must be for a gfn outside every
    memslot.  Returns (problems, gfn) - gfn None for a stale generation
    (the next access re-faults, nothing is granted)."""
    fmt = vm.fmt
    if not vcpu.check_mmio_spte(leaf.spte):
        return [], None
    gfn = fmt.get_mmio_spte_gfn(leaf.spte)
    s = _slot_at(vm, gfn, vcpu.as_id)
    if s is not None:
        return [f"{where}: current MMIO SPTE for gfn {gfn:#x}, which is in memslot {s.id}"], gfn
    return [], gfn


# --- direct roots -----------------------------------------------------------------

def check_direct_root(vm, vcpu, root_sp: int, *, label: str = "direct", base: int = 0) -> list[str]:
    """Every leaf below a direct root (``mmu="tdp"``'s shadow pages, or a
    TDP MMU root): in a memslot at its position, pfn = the host's, W only
    as the memslot allows; child SPs cover their parent entry's gfn range
    (``sp.gfn``); an MMIO SPTE is for the gfn at its position."""
    arena, fmt = vm.arena, vm.fmt
    bad: list[str] = []
    for leaf in iter_shadow(arena, fmt, root_sp, base=base, problems=bad):
        gfn = leaf.addr >> 12
        where = f"{label} root {root_sp}: leaf gfn {gfn:#x}/l{leaf.level}"
        for sp, i in leaf.path[0 if base else 1:]:
            info = arena.get_sp(sp)
            lv = int(info["role"]) & 0xF
            span_gfn = (gfn >> (9 * lv)) << (9 * lv)
            if int(info["gfn"]) != span_gfn:
                bad.append(f"{where}: on its path sp {sp} (level {lv}) has gfn {int(info['gfn']):#x}, "
                           f"its position is {span_gfn:#x}")
        if leaf.mmio:
            p, mg = check_mmio_leaf(vm, vcpu, leaf, where)
            bad += p
            if mg is not None and mg != gfn:
                bad.append(f"{where}: MMIO SPTE for gfn {mg:#x} at the position of gfn {gfn:#x}")
            continue
        bad += check_leaf_memslot(vm, gfn, leaf, where, vcpu.as_id)
    return bad


# --- shadow paging ----------------------------------------------------------------

class TlbWindow:
    """What an x86 TLB may still hold per 4K gva page: the translations the
    guest's tables gave since the last invalidation of that page.

    :meth:`observe` records the current translation of each tracked gva
    (call it after every step that may change guest memory or registers);
    :meth:`flush` (INVLPG of a gva) and :meth:`flush_all` (CR3 load, TLB
    flush) forget the history and keep only the current translation.  A
    gva that was never tracked has an empty window: only the current
    translation is allowed for it."""

    def __init__(self, gvas=()):
        self.gvas = sorted({g & ~0xFFF for g in gvas})
        self.hist: dict[int, list] = {g: [] for g in self.gvas}

    def _cur(self, read_u64, regs, g):
        return translate(read_u64, g, regs)

    def observe(self, read_u64, regs: GuestRegs) -> None:
        for g in self.gvas:
            tr = self._cur(read_u64, regs, g)
            h = self.hist[g]
            if tr is not None and all(t.key() != tr.key() for t in h):
                h.append(tr)

    def flush(self, gva: int, read_u64, regs: GuestRegs) -> None:
        g = gva & ~0xFFF
        if g in self.hist:
            tr = self._cur(read_u64, regs, g)
            self.hist[g] = [tr] if tr is not None else []

    def flush_all(self, read_u64, regs: GuestRegs) -> None:
        for g in self.gvas:
            self.flush(g, read_u64, regs)

    def window(self, gva: int) -> list:
        return list(self.hist.get(gva & ~0xFFF, ()))


def _leaf_vs_translation(leaf: ShadowLeaf, tr: GuestTranslation, regs: GuestRegs, smep: bool) -> list[str]:
    """Why ``leaf`` is not covered by ``tr`` (empty: it is), gfn aside."""
    why = []
    if tr.level < leaf.level:
        why.append(f"shadow level {leaf.level} above the guest page level {tr.level}")
    extra = spte_grants(leaf.w, leaf.u, leaf.x, smep) - guest_allows(tr, regs)
    if extra:
        why.append(f"grants {'/'.join(sorted(extra))} the guest does not "
                   f"(guest w={tr.w:d} u={tr.u:d} nx={tr.nx:d}, WP={regs.wp:d} SMEP={regs.smep:d}; "
                   f"shadow w={leaf.w:d} u={leaf.u:d} x={leaf.x:d})")
    if not tr.accessed:
        why.append("guest A bit clear on some level")
    if leaf.spte & 2 and not tr.dirty:
        why.append("writable while the guest leaf's D bit is clear")
    return why


def check_shadow_root(vm, vcpu, root_sp: int, regs: GuestRegs, *, read_u64=None,
                      window: TlbWindow | None = None, base: int = 0, va_bits: int | None = None,
                      label: str = "root", strict_unsync: bool = False,
                      allow: tuple = ()) -> list[str]:
    """The security rule for one shadow-paging root (SP handle) of a guest
    with registers ``regs``: see the module docstring.  ``base``/``va_bits``
    place the root in the gva space (a 4-level root: 0/48; one PAE root of
    the four: ``i << 30``/None).  Leaves on a path through an unsync SP are
    compared with the ``window`` of their gva (``strict_unsync``: skip them
    instead when there is no window - a cached root not in use).

    ``allow``: known kernel departures from the architecture to accept.
    ``"nx_reserved"``: shadow paging's root role forces ``efer_nx=1``
    (shadow-mmu.md §1.3), so the shadow pages built while the
    guest had EFER.NXE=1 are reused after it clears NXE, and a leaf whose
    gPTE has bit 63 set (now a reserved bit: the walk must fault with
    RSVD) stays mapped until something zaps or syncs it - even across a
    CR3 load.  With it, such a leaf is compared with the translation the
    guest's tables give with NXE=1."""
    arena, fmt = vm.arena, vm.fmt
    read_u64 = read_u64 or memory_reader(vm, vcpu.as_id)
    if va_bits is None and base == 0 and regs.mode >= 4:
        va_bits = 48 if regs.mode == 4 else 57
    bad: list[str] = []
    info_cache: dict[int, dict] = {}

    def info(sp):
        if sp not in info_cache:
            info_cache[sp] = sp_info(arena, sp)
        return info_cache[sp]

    root = info(root_sp)
    if regs.mode >= 4 and not root["direct"] and root["gfn"] != (regs.cr3 & _bits(12, regs.maxphyaddr - 1)) >> 12:
        bad.append(f"{label} {root_sp}: root gfn {root['gfn']:#x} is not CR3's {regs.cr3 >> 12:#x}")
    linked_ok: set = set()
    for leaf in iter_shadow(arena, fmt, root_sp, base=base, va_bits=va_bits, problems=bad):
        va = leaf.addr
        where = f"{label} {root_sp}: gva {va:#x}/l{leaf.level} spte {leaf.spte:#x}"
        walk = walk_guest(read_u64, va, regs)
        tr = walk.translation
        unsync = any(info(sp)["unsync"] for sp, _ in leaf.path)
        # links: an indirect SP on the path shadows the guest's table at its level
        tables = dict(zip(range(_top_level(regs), 0, -1), walk.tables))
        for depth, (sp, _) in enumerate(leaf.path):
            h = info(sp)
            link = leaf.path[depth - 1] + (sp,) if depth else (sp,)
            if h["direct"] or link in linked_ok:
                continue
            want = tables.get(h["level"])
            if want is None:
                bad.append(f"{where}: sp {sp} (level {h['level']}, gfn {h['gfn']:#x}) shadows a guest "
                           f"table the guest walk does not reach ({walk.fault} at level {walk.fault_level})")
            elif h["gfn"] != want:
                bad.append(f"{where}: sp {sp} (level {h['level']}) shadows gfn {h['gfn']:#x}, the guest "
                           f"table there is {want:#x}")
            elif h["has_4_byte_gpte"] and h["quadrant"] != (va >> (21 if h["level"] == 1 else 30)) & (1 if h["level"] == 1 else 3):
                bad.append(f"{where}: sp {sp} (level {h['level']}) has quadrant {h['quadrant']} for gva {va:#x}")
            else:
                linked_ok.add(link)
        if leaf.mmio:
            p, mg = check_mmio_leaf(vm, vcpu, leaf, where)
            bad += p
            if mg is not None:
                cands = [tr] if tr is not None else []
                if unsync and window is not None:
                    cands += window.window(va)
                if not any(t.gfn == mg for t in cands):
                    bad.append(f"{where}: MMIO SPTE for gfn {mg:#x}, the guest maps "
                               f"{'nothing' if tr is None else f'gfn {tr.gfn:#x}'}")
            continue
        if unsync and window is None and strict_unsync:
            continue
        cands = [tr] if tr is not None else []
        if unsync and window is not None:
            cands += [t for t in window.window(va) if t is not None]
        if tr is None and walk.fault == "reserved" and "nx_reserved" in allow and not regs.nxe:
            from dataclasses import replace as _replace
            t_nx = translate(read_u64, va, _replace(regs, efer=regs.efer | EFER_NXE))
            if t_nx is not None:
                cands.append(t_nx)
        ok = None
        reasons = []
        for t in cands:
            host = _host_pfn(vm, t.gfn, vcpu.as_id)
            if host != leaf.pfn:
                reasons.append(f"gfn {t.gfn:#x} is host pfn {host if host is None else hex(host)}, "
                               f"the leaf maps {leaf.pfn:#x}")
                continue
            why = _leaf_vs_translation(leaf, t, regs, regs.smep)
            if why:
                reasons += why
                continue
            ok = t
            break
        if ok is None:
            if tr is None:
                reasons.insert(0, f"the guest does not map it ({walk.fault} at level {walk.fault_level})")
            bad.append(f"{where}{' (unsync)' if unsync else ''}: " + "; ".join(reasons))
            continue
        bad += check_leaf_memslot(vm, ok.gfn, leaf, where, vcpu.as_id)
    return bad


def _top_level(regs: GuestRegs) -> int:
    return {2: 2, 3: 2, 4: 4, 5: 5}[regs.mode]


def _host_pfn(vm, gfn: int, as_id: int = 0):
    from kvmmmu.host import PTE_PRESENT
    s = _slot_at(vm, gfn, as_id)
    if s is None:
        return None
    pfn, fl = vm.host.hva_to_pfn_array(np.array([s.gfn_to_hva(gfn)], np.uint64))
    return int(pfn[0]) if fl[0] & PTE_PRESENT else None


def writable_aliases(vm, roots) -> list[str]:
    """Over all the given ``(root_sp, base, va_bits)``: a writable leaf
    mapping a gfn that a reachable indirect SP shadows, unless every such SP
    is level 1 and unsync (S1/S3 of shadow-mmu.md §20: the guest could
    change a shadowed table without KVM noticing)."""
    arena, fmt = vm.arena, vm.fmt
    shadowed: dict[int, list] = {}
    writable: list = []
    for root, base, bits in roots:
        for leaf in iter_shadow(arena, fmt, root, base=base, va_bits=bits):
            for sp, _ in leaf.path:
                h = sp_info(arena, sp)
                if not h["direct"] and not h["invalid"]:
                    shadowed.setdefault(int(h["gfn"]), {})[sp] = h
            if not leaf.mmio and leaf.spte & 2:
                writable.append(leaf)
    bad = []
    pfn_to_gfn = {}
    for gfn in shadowed:
        p = _host_pfn(vm, gfn)
        if p is not None:
            pfn_to_gfn[p] = gfn
    for leaf in writable:
        for k in range(leaf.size >> 12):
            gfn = pfn_to_gfn.get(leaf.pfn + k)
            if gfn is None:
                continue
            for sp, h in shadowed[gfn].items():
                if h["level"] > 1 or not h["unsync"]:
                    bad.append(f"writable leaf at {leaf.addr + (k << 12):#x} maps gfn {gfn:#x}, "
                               f"shadowed by sp {sp} (level {h['level']}, "
                               f"{'unsync' if h['unsync'] else 'sync'})")
    return bad
