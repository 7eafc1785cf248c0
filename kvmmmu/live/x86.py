"""x86 guest setup for /dev/kvm: descriptors, paging modes, hand-assembled code.

A tiny guest needs a GDT (code, data and a 64-bit TSS descriptor), an IDT
whose gates point at handlers, control registers for its paging mode, and
segment registers that agree with the GDT.  :func:`setup_guest` writes the
tables into guest memory and loads the vCPU's registers for one of the modes
of :data:`MODES`.  The :mod:`asm` helpers emit the few instructions the
tests need as bytes (no assembler is required).

Memory layout of :func:`write_tables` (gpas; the caller's page tables must
map these gvas to them, identity is simplest):

=========  ===========================================
``GDT``    0xE000  null, code64 (0x08), data (0x10), code32 (0x18),
                   user data (0x23), user code64 (0x2b), TSS (0x30)
``TSS``    0xE800  104 bytes (RSP0 = ``stack``)
``IDT``    0xF000  256 gates (64-bit: 16 bytes each; 32-bit: 8)
=========  ===========================================
"""
from __future__ import annotations

import struct

from kvmmmu._core._checks import int_arg

from kvmmmu import paging as P
from kvmmmu.live import _uapi as U

__all__ = ["MODES", "GDT_BASE", "IDT_BASE", "TSS_BASE", "SEL_CODE64", "SEL_DATA",
           "SEL_CODE32", "SEL_UDATA", "SEL_UCODE64", "SEL_TSS", "gdt_entry", "tss64_descriptor",
           "idt_gate64", "idt_gate32", "write_tables", "setup_guest", "asm", "asm64"]

GDT_BASE = 0xE000
TSS_BASE = 0xE800
IDT_BASE = 0xF000

SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_CODE32 = 0x18
SEL_UDATA = 0x20 | 3
SEL_UCODE64 = 0x28 | 3
SEL_TSS = 0x30

#: Paging modes :func:`setup_guest` knows: (CR0.PG, CR4.PAE, EFER.LMA, CR4.LA57).
MODES = {
    "nonpaging": (False, False, False, False),
    "2level": (True, False, False, False),
    "pae": (True, True, False, False),
    "4level": (True, True, True, False),
    "5level": (True, True, True, True),
}


def gdt_entry(base=0, limit=0xFFFFF, *, type_, s=1, dpl=0, p=1, l=0, db=0, g=1) -> bytes:
    """An 8-byte code/data segment descriptor."""
    lo = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (type_ << 40) | (s << 44) | (dpl << 45) | (p << 47)
    hi = ((limit >> 16) & 0xF) | (l << 5) | (db << 6) | (g << 7)
    return struct.pack("<Q", lo | (hi << 48) | (((base >> 24) & 0xFF) << 56))


def tss64_descriptor(base, limit=103) -> bytes:
    """A 16-byte available 64-bit TSS descriptor (type 9)."""
    lo = gdt_entry(base & 0xFFFFFFFF, limit, type_=9, s=0, g=0)
    return lo + struct.pack("<II", base >> 32, 0)


def idt_gate64(offset, selector=SEL_CODE64, *, type_=0xE, dpl=0, ist=0) -> bytes:
    """A 16-byte long-mode interrupt (0xE) or trap (0xF) gate."""
    return struct.pack("<HHBBHII", offset & 0xFFFF, selector, ist, type_ | (dpl << 5) | 0x80,
                       (offset >> 16) & 0xFFFF, offset >> 32, 0)


def idt_gate32(offset, selector=SEL_CODE32, *, type_=0xE, dpl=0) -> bytes:
    """An 8-byte protected-mode 32-bit interrupt gate."""
    return struct.pack("<HHBBH", offset & 0xFFFF, selector, 0, type_ | (dpl << 5) | 0x80,
                       (offset >> 16) & 0xFFFF)


def _seg(selector, *, code, long_mode, dpl):
    s = U.kvm_segment()
    s.base, s.limit, s.selector = 0, 0xFFFFFFFF, selector
    s.type = 0xB if code else 0x3                   # accessed execute/read, accessed read/write
    s.present, s.dpl, s.s, s.g = 1, dpl, 1, 1
    s.l = 1 if (code and long_mode) else 0
    s.db = 0 if (code and long_mode) else 1
    return s


def write_tables(mem, handlers: dict[int, int], *, long_mode=True, stack=0x8000):
    """Write GDT, IDT (gates for `handlers`: vector -> handler address, the
    others left not present) and TSS into `mem` (a uint8 array at gpa 0)."""
    gdt = (bytes(8) + gdt_entry(type_=0xB, l=1) + gdt_entry(type_=0x3, db=1)
           + gdt_entry(type_=0xB, db=1) + gdt_entry(type_=0x3, db=1, dpl=3)
           + gdt_entry(type_=0xB, l=1, dpl=3) + tss64_descriptor(TSS_BASE))
    mem[GDT_BASE:GDT_BASE + len(gdt)] = memoryview(gdt)
    size = 16 if long_mode else 8
    mem[IDT_BASE:IDT_BASE + 256 * size] = 0
    for vec, addr in handlers.items():
        gate = idt_gate64(addr) if long_mode else idt_gate32(addr)
        mem[IDT_BASE + vec * size:IDT_BASE + (vec + 1) * size] = memoryview(gate)
    tss = bytearray(104)
    struct.pack_into("<Q", tss, 4, stack)          # RSP0
    struct.pack_into("<H", tss, 102, 104)          # no I/O bitmap
    mem[TSS_BASE:TSS_BASE + 104] = memoryview(bytes(tss))


def setup_guest(vcpu, mode: str, *, cr3=0, rip, rsp, cpl=0, wp=True, nxe=True, smep=False,
                smap=False, pke=False, pse=True, ac=False, pdptrs=None):
    """Load the vCPU's registers for paging `mode` (see :data:`MODES`).

    Segments follow :func:`write_tables`'s GDT; CPL 3 uses the user
    selectors.  Returns the :class:`kvmmmu.paging.CpuState` of the loaded
    registers (the model's view of the same vCPU).

    Note: 32-bit and PAE modes need a host whose KVM can run them (this
    sets them up; running is up to the host).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {sorted(MODES)}")
    pg, pae, lma, la57 = MODES[mode]
    cr0 = P.X86_CR0_PE | (1 << 4)                   # PE, ET
    if pg:
        cr0 |= P.X86_CR0_PG
    if wp:
        cr0 |= P.X86_CR0_WP
    cr4 = ((P.X86_CR4_PAE if pae else 0) | (P.X86_CR4_LA57 if la57 else 0) |
           (P.X86_CR4_SMEP if smep else 0) | (P.X86_CR4_SMAP if smap else 0) |
           (P.X86_CR4_PKE if pke else 0) | (P.X86_CR4_PSE if pse else 0))
    efer = (P.EFER_LME | P.EFER_LMA if lma else 0) | (P.EFER_NX if nxe else 0)
    s = vcpu.get_sregs()
    user = cpl == 3
    cs_sel = (SEL_UCODE64 if lma else SEL_CODE32 | 3) if user else (SEL_CODE64 if lma else SEL_CODE32)
    ds_sel = SEL_UDATA if user else SEL_DATA
    s.cs = _seg(cs_sel, code=True, long_mode=lma, dpl=cpl)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(s, name, _seg(ds_sel, code=False, long_mode=lma, dpl=cpl))
    tr = U.kvm_segment()
    tr.base, tr.limit, tr.selector, tr.type, tr.present = TSS_BASE, 103, SEL_TSS, 0xB, 1
    s.tr = tr
    s.gdt.base, s.gdt.limit = GDT_BASE, 7 * 8 + 8 - 1
    s.idt.base, s.idt.limit = IDT_BASE, 256 * (16 if lma else 8) - 1
    s.cr0, s.cr3, s.cr4, s.efer = cr0, cr3, cr4, efer
    vcpu.set_sregs(s)
    vcpu.set_regs(rip=rip, rsp=rsp, rflags=0x2 | (P.X86_EFLAGS_AC if ac else 0))
    return P.CpuState(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer,
                      rflags=0x2 | (P.X86_EFLAGS_AC if ac else 0), cpl=cpl)


class asm:
    """Hand-assembled x86-64 instructions (bytes)."""

    @staticmethod
    def movabs_rax(imm: int) -> bytes:
        """``mov rax, imm64``"""
        return b"\x48\xb8" + struct.pack("<Q", int_arg("imm", imm))

    @staticmethod
    def movabs_rbx(imm: int) -> bytes:
        """``mov rbx, imm64``"""
        return b"\x48\xbb" + struct.pack("<Q", int_arg("imm", imm))

    #: ``mov rax, [rax]``
    load_rax = b"\x48\x8b\x00"
    #: ``mov [rbx], rax``
    store_rbx = b"\x48\x89\x03"
    #: ``jmp rax``
    jmp_rax = b"\xff\xe0"
    #: ``hlt``
    hlt = b"\xf4"
    #: ``ud2``
    ud2 = b"\x0f\x0b"

    @classmethod
    def read(cls, addr: int) -> bytes:
        """Load 8 bytes from `addr` into rax."""
        return cls.movabs_rax(addr) + cls.load_rax

    @classmethod
    def write(cls, addr: int) -> bytes:
        """Store rax to `addr`."""
        return cls.movabs_rbx(addr) + cls.store_rbx

    @classmethod
    def fetch(cls, addr: int) -> bytes:
        """Jump to `addr` (an instruction fetch there)."""
        return cls.movabs_rax(addr) + cls.jmp_rax


class asm64:
    """More hand-assembled x86-64 instructions for the shadow-MMU scenarios
    (:mod:`kvmmmu.live.scenarios`); bytes, as :class:`asm`."""

    #: ``mov cr3, rax``
    mov_cr3_rax = b"\x0f\x22\xd8"
    #: ``mov cr0, rax``
    mov_cr0_rax = b"\x0f\x22\xc0"
    #: ``mov cr4, rax``
    mov_cr4_rax = b"\x0f\x22\xe0"
    #: ``invlpg [rax]``
    invlpg_rax = b"\x0f\x01\x38"
    #: ``out 0x80, al`` (a port-I/O exit: how ring-3 code stops)
    out_80 = b"\xe6\x80"

    @staticmethod
    def store(addr: int, value: int) -> bytes:
        """``mov rax, value; mov rbx, addr; mov [rbx], rax``."""
        return asm.movabs_rax(value) + asm.movabs_rbx(addr) + asm.store_rbx

    @staticmethod
    def set_cr3(value: int) -> bytes:
        """``mov rax, value; mov cr3, rax``."""
        return asm.movabs_rax(value) + asm64.mov_cr3_rax

    @staticmethod
    def invlpg(gva: int) -> bytes:
        """``mov rax, gva; invlpg [rax]``."""
        return asm.movabs_rax(gva) + asm64.invlpg_rax
