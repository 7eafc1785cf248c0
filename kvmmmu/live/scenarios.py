"""Scenario guests for the event-by-event check of the shadow MMU against /dev/kvm.

Each scenario is a small long-mode guest, described as data (nothing here
opens /dev/kvm): the memslots and their initial bytes (page tables, GDT/IDT/TSS,
code), the vCPU's first register state, and a list of *steps* that userspace
performs in order -- run the vCPU from a given RIP at a given CPL until it
stops, change a memslot, get or clear the dirty log, take a stats snapshot.
:mod:`kvmmmu.live.record` runs the steps on the host's KVM while the
``kvmmmu`` and ``kvm`` tracepoints are recorded, and derives from the trace the
vCPU input stream the model replays (``docs/STREAM.md``).

Guest conventions (all scenarios):

* long mode, 4-level paging, CR0.WP=1, EFER.NXE=1, CR4.PSE; no SMEP/SMAP.
* Ring-0 code runs in KVM's instruction emulator on this host (kvm_pvm), so
  every ring-0 memory access is an emulator translation (a software walk that
  sets A/D bits) and every store is an emulated write through page tracking.
  Ring-3 code runs natively on KVM's shadow page tables: its first touches are
  shadow page faults.
* Ring-3 code stops with a one-byte store to :data:`STOP_GVA`, which maps
  :data:`STOP_GPA`, outside every memslot: an MMIO write, emulated after the
  shadow page fault, that exits to userspace with the instruction completed
  (``out`` and ``hlt`` at ring 3 raise #GP under kvm_pvm).  Ring-0 code stops
  with ``hlt``.  No exception is raised, so no event delivery (IDT reads,
  frame pushes) shows in the traces.
* Every register a ring-3 instruction uses in a store that KVM may emulate is
  preset by the step (``regs``), so the value stored is known from the step.

Layout (guest physical; the first 2 MiB are identity-mapped where used):

==========  =========================================================
0x1000      PML4 (the default root); PDPT 0x2000, PD 0x3000, PT 0x4000
0x20000..   more page-table pages (``GuestImage.alloc_table``), identity-mapped
0x8000      ring-0 stack top
0xE000      GDT, TSS 0xE800, IDT 0xF000 (:func:`kvmmmu.live.x86.write_tables`)
0x10000..   code, one 256-byte chunk per phase
0x100000..  data pages
==========  =========================================================
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmmmu.live.x86 import asm, asm64

__all__ = ["PR", "RW", "US", "A", "D", "PS", "NX", "PML4", "PDPT", "PD", "PT0", "STACK",
           "CODE", "DATA", "STOP_GVA", "STOP_GPA", "RFLAGS", "Prog", "run", "mark", "Memslot", "Step", "Scenario", "GuestImage", "SCENARIOS", "get"]

PR, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63
TABLE = PR | RW | US
PML4, PDPT, PD, PT0 = 0x1000, 0x2000, 0x3000, 0x4000
STACK = 0x8000
CODE = 0x10000
TABLES, TABLES_END = 0x20000, 0x40000
DATA = 0x100000
KVM_MEM_LOG_DIRTY_PAGES = 1
#: RFLAGS for every run
RFLAGS = 0x2
#: Where ring-3 code stores a byte to stop (an MMIO write exit)
STOP_GVA, STOP_GPA = 0x1FF000, 0xD0000000
#: ``mov rbx, STOP_GVA; mov [rbx], al``
STOP3 = asm.movabs_rbx(STOP_GVA) + b"\x88\x03"


@dataclass(frozen=True)
class Memslot:
    """One ``KVM_SET_USER_MEMORY_REGION`` request (``size == 0`` deletes).

    ``thp``: the host memory is 2 MiB aligned and ``madvise(MADV_HUGEPAGE)``;
    otherwise it is ``MADV_NOHUGEPAGE`` (4 KiB host pages).
    """
    slot: int
    gpa: int
    size: int
    flags: int = 0
    thp: bool = False

    def to_json(self):
        return {"slot": self.slot, "as_id": 0, "gpa": self.gpa, "size": self.size,
                "flags": self.flags, "thp": self.thp}


@dataclass(frozen=True)
class Step:
    """One thing userspace does.  ``op`` is one of:

    ``run``      rip, cpl, regs (dict of general registers): set them, then
                 ``KVM_RUN`` until the guest stops (HLT at ring 0, the stop
                 store at ring 3, HLT if ``to_ring0``: an exception delivered
                 to a ring-0 handler; MMIO read exits are completed and the
                 vCPU re-entered); ``readback``: [(gpa, n)] of guest memory
                 to record after the run (what the kernel wrote untraced);
                 ``stores``: native stores the code cannot tell
    ``memslot``  memslot (a :class:`Memslot`; size 0 deletes); a re-added slot
                 gets fresh host memory filled with ``fill`` (gpa -> bytes)
    ``get_dirty_log``    slot
    ``clear_dirty_log``  slot, first_page, num_pages, bitmap (bytes)
    ``mark``     label: a stats snapshot
    """
    op: str
    args: dict = field(default_factory=dict)


@dataclass
class Scenario:
    """A scenario guest: what :mod:`kvmmmu.live.record` needs to run it."""
    name: str
    doc: str
    memslots: list
    image: dict            # slot -> bytearray (initial contents)
    cr3: int
    steps: list
    manual_dirty_log_protect: int = 0
    #: rip of a ring-3 phase -> [(gva, gpa, bytes)]: the stores its code makes
    #: natively (KVM sees none of them; the stream gets them as writes
    #: without page tracking)
    native_stores: dict = field(default_factory=dict)

    def initial_memory(self):
        """``[(gpa, bytes)]``: the non-zero runs of the initial memory (runs
        separated by fewer than 32 zero bytes are merged)."""
        out = []
        for ms in self.memslots:
            buf = self.image.get(ms.slot)
            if buf is None:
                continue
            out += [(ms.gpa + lo, bytes(buf[lo:hi])) for lo, hi in _nonzero_runs(buf)]
        return out


def _nonzero_runs(buf, gap=32):
    runs = []
    mv = memoryview(buf)
    n = len(buf)
    for page in range(0, n, 4096):
        chunk = bytes(mv[page:page + 4096])
        if not any(chunk):
            continue
        i = 0
        while i < len(chunk):
            if chunk[i] == 0:
                i += 1
                continue
            j = i
            last = i
            while j < len(chunk) and j - last <= gap:
                if chunk[j]:
                    last = j
                j += 1
            runs.append((page + i, page + last + 1))
            i = last + 1
    # merge runs that touch across pages
    merged = []
    for lo, hi in runs:
        if merged and lo - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


class GuestImage:
    """Builds slot 0's initial bytes: page tables, descriptor tables and code.

    Parameters
    ----------
    size : int
        Size of slot 0 (guest physical 0..size).
    """

    def __init__(self, size=4 << 20):
        from kvmmmu.live.x86 import write_tables
        self.size = size
        self.mem = bytearray(size)
        self._next_table = TABLES
        self._next_code = CODE
        self.native_stores = {}
        self.q(PML4, PDPT | TABLE)
        self.q(PDPT, PD | TABLE)
        self.q(PD, PT0 | TABLE)
        # the pages every guest uses: tables, stack, descriptor tables
        for gpa in range(0x1000, 0x10000, 0x1000):
            self.map4k(gpa, gpa, PR | RW)
        self.map4k(STOP_GVA, STOP_GPA, PR | RW | US)
        import numpy as np
        arr = np.frombuffer(self.mem, dtype=np.uint8)
        write_tables(arr, {}, stack=STACK)

    def q(self, gpa, value):
        struct.pack_into("<Q", self.mem, gpa, value)

    def read_q(self, gpa):
        return struct.unpack_from("<Q", self.mem, gpa)[0]

    def alloc_table(self):
        t = self._next_table
        if t >= TABLES_END:
            raise MemoryError(f"out of page-table pages ({TABLES:#x}..{TABLES_END:#x})")
        self._next_table += 0x1000
        self.q(PT0 + 8 * (t >> 12), t | PR | RW)      # identity-mapped for ring-0 stores
        return t

    def _walk(self, gva, root, levels, create):
        table = root
        for level in range(4, levels, -1):
            idx = (gva >> (12 + 9 * (level - 1))) & 511
            entry = self.read_q(table + 8 * idx)
            if not entry & PR:
                if not create:
                    raise KeyError(f"{gva:#x} not mapped at level {level}")
                entry = self.alloc_table() | TABLE
                self.q(table + 8 * idx, entry)
            table = entry & 0xFFFFFFFFF000
        return table

    def pte_gpa(self, gva, root=PML4, level=1):
        """The gpa of the level-`level` entry that maps `gva` under `root`."""
        table = self._walk(gva, root, level, create=True)
        return table + 8 * ((gva >> (12 + 9 * (level - 1))) & 511)

    def map4k(self, gva, gpa, flags=PR | RW | US, root=PML4):
        self.q(self.pte_gpa(gva, root), gpa | flags)

    def map2m(self, gva, gpa, flags=PR | RW | US, root=PML4):
        self.q(self.pte_gpa(gva, root, 2), gpa | flags | PS)

    def translate(self, gva, root=PML4):
        """The gpa the image's tables map `gva` to (4 KiB or 2 MiB pages)."""
        table = root
        for level in (4, 3, 2, 1):
            shift = 12 + 9 * (level - 1)
            entry = self.read_q(table + 8 * ((gva >> shift) & 511))
            if not entry & PR:
                raise KeyError(f"{gva:#x} is not mapped (level {level})")
            if level == 1 or (level == 2 and entry & PS):
                return (entry & 0xFFFFFFFFF000 & ~((1 << shift) - 1)) | (gva & ((1 << shift) - 1))
            table = entry & 0xFFFFFFFFF000

    def code(self, body, *, user: bool) -> int:
        """Place a phase's code (`body`, bytes or a :class:`Prog`, plus its stop
        instruction) at the next 256-byte chunk; returns its address.  The
        native stores of a ring-3 :class:`Prog` are noted in
        ``native_stores`` (gpas as the tables map them now)."""
        if isinstance(body, Prog):
            if user and body.stores:
                self.native_stores[self._next_code] = [(gva, self.translate(gva), data)
                                                       for gva, data in body.stores]
            body = body.code
        stop = STOP3 if user else asm.hlt
        rip = self._next_code
        blob = body + stop
        if len(blob) > 256:
            raise ValueError(f"phase code of {len(blob)} bytes does not fit 256")
        self.mem[rip:rip + len(blob)] = blob
        if rip & 0xFFF == 0:
            self.map4k(rip, rip, PR | US)             # code pages: read-only, user
        self._next_code += 256
        return rip


@dataclass
class Prog:
    """Code with the stores it makes (``(gva, bytes)``, in program order)."""
    code: bytes = b""
    stores: list = field(default_factory=list)

    def __add__(self, other):
        if isinstance(other, bytes):
            other = Prog(other)
        return Prog(self.code + other.code, self.stores + other.stores)

    def __radd__(self, other):
        return Prog(other) + self


def run(rip, cpl, stores=(), **regs):
    """A run step; `stores`: ``[(gva, gpa, bytes)]`` native stores of its code
    that the code's :class:`Prog` cannot know (they depend on preset `regs`)."""
    args = dict(rip=rip, cpl=cpl, regs=regs)
    if stores:
        args["stores"] = [(gva, gpa, bytes(data)) for gva, gpa, data in stores]
    return Step("run", args)


def mark(label):
    return Step("mark", dict(label=label))


def _reads(gvas):
    return Prog(b"".join(asm.read(g) for g in gvas))


def _writes(gvas, value=0x5A5A):
    return Prog(b"".join(asm64.store(g, value + i) for i, g in enumerate(gvas)),
                [(g, struct.pack("<Q", value + i)) for i, g in enumerate(gvas)])


# ---------------------------------------------------------------------------
# The scenarios
# ---------------------------------------------------------------------------

def _tag(g, gpa):
    """Give the page at `gpa` a non-zero qword (its own address) so that the
    host page is populated when the VM starts: KVM's prefetch only maps pages
    the host already has, so an unpopulated page would make it host-dependent."""
    g.q(gpa + 8, gpa | 0x7A6)


def _slot0(g):
    return Memslot(0, 0, g.size)


def first_touch_4k():
    """Ring 3 touches 8 fresh 4 KiB pages of one guest page table (6 reads,
    2 writes): the first fault builds the shadow root's children (PDPT, PD,
    PT shadow pages), each later one one SPTE; gPTEs have A=0 so nothing is
    prefetched.  A second pass hits the SPTEs without faulting."""
    g = GuestImage()
    pages = [DATA + i * 0x1000 for i in range(8)]
    for p in pages:
        g.map4k(p, p)
        _tag(g, p)
    touch = g.code(_reads(pages[:6]) + _writes(pages[6:]), user=True)
    again = g.code(_reads(pages), user=True)
    steps = [run(touch, 3), mark("touched"), run(again, 3)]
    return Scenario("first_touch_4k", first_touch_4k.__doc__, [_slot0(g)], {0: g.mem}, PML4, steps,
                    native_stores=g.native_stores)


def _huge(thp):
    g = GuestImage()
    base = 0x400000                        # slot 1: one 2 MiB page
    g.map2m(base, base)
    img = bytearray(HUGE)
    for off in (0, 0x1000, 0x3000, 0x9000, 0x100000):
        struct.pack_into("<Q", img, off + 8, (base + off) | 0x7A6)
    gvas = [base + 0x1000, base + 0x9000, base + 0x100000]
    touch = g.code(_reads(gvas[:2]) + _writes(gvas[2:]) + _reads([base + 0x3000]), user=True)
    steps = [run(touch, 3), mark("touched")]
    slots = [_slot0(g), Memslot(1, base, HUGE, thp=thp)]
    return g, slots, {0: g.mem, 1: img}, steps


HUGE = 2 << 20


def huge_2m_4k_host():
    """Ring 3 touches a guest 2 MiB page whose memslot is backed by 4 KiB
    host pages (MADV_NOHUGEPAGE): a direct level-1 shadow page (gfn of the
    2 MiB frame, role ``direct``) maps it with 4 KiB SPTEs, and each fault
    prefetches the present host pages of its 8-entry group."""
    g, slots, image, steps = _huge(False)
    return Scenario("huge_2m_4k_host", huge_2m_4k_host.__doc__, slots, image, PML4, steps,
                    native_stores=g.native_stores)


def huge_2m_thp():
    """The same guest 2 MiB page backed by a transparent huge page
    (2 MiB-aligned host memory, MADV_HUGEPAGE, written from the host before
    the run): one level-2 SPTE maps it (``kvm_mmu_spte_requested`` level 2)."""
    g, slots, image, steps = _huge(True)
    return Scenario("huge_2m_thp", huge_2m_thp.__doc__, slots, image, PML4, steps,
                    native_stores=g.native_stores)


def prefetch():
    """Prefetch (``pte_prefetch``): group A (8 gPTEs, one page table) has
    accessed gPTEs at 1, 2, 5 (clean) and 6 (dirty, writable) and unaccessed
    ones at 0, 3, 4, 7; a read of 0 maps 0 and prefetches 1 and 2 (read-only:
    clean), stopping at 3, the first unaccessed gPTE; 1 is then read without
    a fault, 3 faults (prefetch stops at 4 at once), and 6 is written (its own
    fault: it was never prefetched).  In group B no neighbour is accessed:
    nothing is prefetched."""
    g = GuestImage()
    base_a, base_b = 0x600000, 0x608000
    for i in range(8):
        for base in (base_a, base_b):
            gpa = DATA + (base - 0x600000) + i * 0x1000
            flags = PR | RW | US
            if base == base_a and i in (1, 2, 5):
                flags |= A
            if base == base_a and i == 6:
                flags |= A | D
            g.map4k(base + i * 0x1000, gpa, flags)
            _tag(g, gpa)
    touch = g.code(_reads([base_a, base_a + 0x1000, base_a + 0x3000, base_b + 0x2000,
                           base_a + 0x6000]) + _writes([base_a + 0x6000]), user=True)
    steps = [run(touch, 3), mark("prefetched")]
    return Scenario("prefetch", prefetch.__doc__, [_slot0(g)], {0: g.mem}, PML4, steps,
                    native_stores=g.native_stores)


def ring0_pte_rewrite():
    """A ring-0 (emulated) store rewrites the gPTE of a page ring 3 is using:
    the write goes through page tracking (``kvm_mmu_track_write``), which
    zaps the SPTE it shadows; ring 3's next read faults and maps the new
    frame.  A second ring-0 store writes a gPTE no SPTE shadows yet."""
    g = GuestImage()
    v = 0x700000
    g.map4k(v, DATA)
    g.map4k(v + 0x1000, DATA + 0x1000)
    for p in (DATA, DATA + 0x1000, DATA + 0x2000, DATA + 0x3000):
        _tag(g, p)
    pte = g.pte_gpa(v)
    use = g.code(_reads([v, v + 0x1000]), user=True)
    rewrite = g.code(asm64.store(pte, DATA + 0x2000 | PR | RW | US)
                     + asm64.store(pte + 16, DATA + 0x3000 | PR | RW | US), user=False)
    again = g.code(_reads([v, v + 0x1000, v + 0x2000]), user=True)
    steps = [run(use, 3), run(rewrite, 0), mark("rewritten"), run(again, 3)]
    return Scenario("ring0_pte_rewrite", ring0_pte_rewrite.__doc__, [_slot0(g)], {0: g.mem},
                    PML4, steps, native_stores=g.native_stores)


def unsync_invlpg():
    """Unsync: ring 3 uses page V (its page table T gets a shadow page and is
    write-protected), then writes V's gPTE through a writable ring-3 alias of
    T: the write fault unsyncs T's shadow page (``kvm_mmu_unsync_page``) and
    the store runs natively.  V still reads the old frame (no fault: stale
    until INVLPG); ring 0 runs INVLPG V, which syncs that SPTE; ring 3 reads V
    again (the new frame).  Then a second gPTE (W) is rewritten through the
    alias and ring 0 reloads CR3 with its own value: the guest TLB flush syncs
    the whole unsync page (``kvm_mmu_sync_page``)."""
    g = GuestImage()
    v, w, alias = 0x800000, 0x801000, 0xA00000
    g.map4k(v, DATA)
    g.map4k(w, DATA + 0x1000)
    for p in (DATA, DATA + 0x1000, DATA + 0x2000, DATA + 0x3000):
        _tag(g, p)
    t = g.pte_gpa(v) & ~0xFFF
    g.map4k(alias, t)
    use = g.code(_reads([v, w]), user=True)
    store = g.code(b"\x48\x89\x03", user=True)            # mov [rbx], rax
    inv = g.code(asm64.invlpg(v), user=False)
    reload = g.code(asm64.set_cr3(PML4), user=False)
    new_v, new_w = DATA + 0x2000 | PR | RW | US, DATA + 0x3000 | PR | RW | US
    pte_v, pte_w = g.pte_gpa(v), g.pte_gpa(w)
    steps = [run(use, 3),
             run(store, 3, rax=new_v, rbx=alias + (pte_v & 0xFFF),
                 stores=[(alias + (pte_v & 0xFFF), pte_v, struct.pack("<Q", new_v))]),
             mark("unsync"), run(use, 3), run(inv, 0), run(use, 3), mark("invlpg"),
             run(store, 3, rax=new_w, rbx=alias + (pte_w & 0xFFF),
                 stores=[(alias + (pte_w & 0xFFF), pte_w, struct.pack("<Q", new_w))]),
             run(reload, 0), run(use, 3)]
    return Scenario("unsync_invlpg", unsync_invlpg.__doc__, [_slot0(g)], {0: g.mem}, PML4, steps,
                    native_stores=g.native_stores)


def cr3_switch():
    """Ring 0 loads CR3 with five different roots in turn (R1 the initial
    one, R2..R5 copies of its PML4 page: same PDPT below), ring 3 touching a
    page under each; the vCPU caches the current root and 3 previous ones, so
    by R5 the first root has been dropped from the cache and going back to
    it finds its shadow page in the hash (``existing``), while the last
    switch, back to R5, is served from the cache (no ``kvm_mmu_get_page``).
    Under a new root only the root's own entry is missing: one fault, whose
    leaf SPTE is already there (spurious, no ``kvm_mmu_set_spte``)."""
    g = GuestImage()
    roots = [PML4]
    for _ in range(4):
        r = g.alloc_table()
        g.q(r, PDPT | TABLE)
        roots.append(r)
    page = DATA
    g.map4k(page, page)
    _tag(g, page)
    touch = g.code(_reads([page]), user=True)
    loads = {r: g.code(asm64.set_cr3(r), user=False) for r in roots}
    steps = [run(touch, 3)]
    for r in roots[1:] + [roots[0], roots[4]]:
        steps += [run(loads[r], 0), run(touch, 3)]
    steps.append(mark("switched"))
    return Scenario("cr3_switch", cr3_switch.__doc__, [_slot0(g)], {0: g.mem}, PML4, steps,
                    native_stores=g.native_stores)


def write_flooding():
    """Write flooding: ring 3 uses two pages of page table T (shadowed); ring
    0 then stores into unused gPTEs of T, twice, and four times into unused
    entries of the page directory above T with no use of it in between.
    Stores into a level-1 table never count as flooding (it could be unsync
    instead); for the level-2 one the flooding count reaches its threshold at
    the third store and the directory's shadow page is zapped
    (``kvm_mmu_prepare_zap_page``, ``mmu_flooded``); ring 3's next use
    rebuilds it (``new``)."""
    g = GuestImage()
    v = 0x900000
    g.map4k(v, DATA)
    g.map4k(v + 0x1000, DATA + 0x1000)
    for p in (DATA, DATA + 0x1000):
        _tag(g, p)
    t = g.pte_gpa(v) & ~0xFFF
    use = g.code(_reads([v, v + 0x1000]), user=True)
    flood = g.code(b"".join(asm64.store(t + 8 * (100 + i), 0) for i in range(2))
                   + b"".join(asm64.store(PD + 8 * (100 + i), 0) for i in range(4)), user=False)
    steps = [run(use, 3), run(flood, 0), mark("flooded"), run(use, 3)]
    return Scenario("write_flooding", write_flooding.__doc__, [_slot0(g)], {0: g.mem}, PML4, steps,
                    native_stores=g.native_stores)


def misaligned_write():
    """Misaligned emulated writes to a shadowed page table T (ring 3 uses two
    of its pages first): a 2-byte store into an unused gPTE (shorter than a
    gPTE: misaligned) zaps T's shadow page at once, with no flooding count
    needed; after ring 3 rebuilt it, an 8-byte store straddling two gPTEs
    (offset 4) zaps it again."""
    g = GuestImage()
    v = 0xD00000
    g.map4k(v, DATA)
    g.map4k(v + 0x1000, DATA + 0x1000)
    for p in (DATA, DATA + 0x1000):
        _tag(g, p)
    t = g.pte_gpa(v) & ~0xFFF
    use = g.code(_reads([v, v + 0x1000]), user=True)
    short = g.code(asm.movabs_rax(0) + asm.movabs_rbx(t + 8 * 200) + b"\x66\x89\x03",
                   user=False)                                  # mov [rbx], ax
    straddle = g.code(asm64.store(t + 8 * 300 + 4, 0), user=False)
    steps = [run(use, 3), run(short, 0), mark("short"), run(use, 3), run(straddle, 0),
             mark("straddle"), run(use, 3)]
    return Scenario("misaligned_write", misaligned_write.__doc__, [_slot0(g)], {0: g.mem}, PML4,
                    steps, native_stores=g.native_stores)


def memslot_readd():
    """Memslot delete and re-add: ring 3 maps three pages of slot 1; slot 1
    is deleted (the shadow pages are zapped: on this host the slot-zap quirk
    zaps everything, ``kvm_mmu_zap_all_fast``) and added again at the same
    place with new host memory; ring 3's next touches rebuild everything."""
    g = GuestImage()
    base = 0x400000
    size = 1 << 20
    pages = [base + 0x1000 * i for i in (0, 1, 9)]
    img = bytearray(size)
    for p in pages:
        g.map4k(p, p)
        struct.pack_into("<Q", img, p - base + 8, p | 0x7A6)
    touch = g.code(_reads(pages[:2]) + _writes(pages[2:]), user=True)
    slot1 = Memslot(1, base, size)
    fill = {p + 8: struct.pack("<Q", p | 0x5A6) for p in pages}
    steps = [run(touch, 3), mark("mapped"),
             Step("memslot", dict(memslot=Memslot(1, base, 0))), mark("deleted"),
             Step("memslot", dict(memslot=slot1, fill=fill)), run(touch, 3)]
    return Scenario("memslot_readd", memslot_readd.__doc__, [_slot0(g), slot1], {0: g.mem, 1: img},
                    PML4, steps, native_stores=g.native_stores)


def mmio():
    """MMIO: ring 3 reads a page mapped to a gpa outside every memslot.
    With mmio_caching=N no MMIO SPTE is made: each access is a page fault
    that ends in emulation (``pf_emulate``) and a KVM_EXIT_MMIO (completed
    with zeros by the recorder).  Ring 0 reads it too (emulator only).  (Every
    ring-3 phase also ends with an MMIO store: :data:`STOP_GVA`.)"""
    g = GuestImage()
    gva, gpa = 0xB00000, 0xD0001000
    g.map4k(gva, gpa)
    r3 = g.code(_reads([gva, gva + 8]), user=True)
    r0 = g.code(_reads([gva + 16]), user=False)
    steps = [run(r3, 3), run(r0, 0), run(r3, 3), mark("mmio")]
    return Scenario("mmio", mmio.__doc__, [_slot0(g)], {0: g.mem}, PML4, steps,
                    native_stores=g.native_stores)


def dirty_log():
    """Dirty logging with manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    no initially-set): slot 1 (64 pages, KVM_MEM_LOG_DIRTY_PAGES) has four
    pages written by ring 3 and two read; KVM_GET_DIRTY_LOG reports the four;
    KVM_CLEAR_DIRTY_LOG on all 64 write-protects them again, so the next
    writes to them fault (present, write: error code P|W|U) and are fixed,
    and a second get reports the pages written since."""
    g = GuestImage()
    base = 0x400000
    size = 64 << 12
    img = bytearray(size)
    pages = [base + 0x1000 * i for i in range(6)]
    for p in pages:
        g.map4k(p, p)
        struct.pack_into("<Q", img, p - base + 8, p | 0x7A6)
    first = g.code(_writes(pages[:4]) + _reads(pages[4:]), user=True)
    second = g.code(_writes(pages[1:3] + pages[5:6]), user=True)
    steps = [run(first, 3), mark("written"),
             Step("get_dirty_log", dict(slot=1)),
             Step("clear_dirty_log", dict(slot=1, first_page=0, num_pages=64, bitmap=b"\xff" * 8)),
             mark("cleared"), run(second, 3), Step("get_dirty_log", dict(slot=1))]
    slots = [_slot0(g), Memslot(1, base, size, flags=KVM_MEM_LOG_DIRTY_PAGES)]
    return Scenario("dirty_log", dirty_log.__doc__, slots, {0: g.mem, 1: img}, PML4, steps,
                    manual_dirty_log_protect=1, native_stores=g.native_stores)


def guest_page_fault():
    """A fault the guest gets: ring 3 reads page P (mapped) then page Q,
    whose gPTE is not present; the walk fails (``kvm_mmu_walker_error``) and
    KVM injects #PF, which kvm_pvm delivers itself: reads of the IDT gate and
    TSS.RSP0, six frame pushes onto the ring-0 stack (writes without page
    tracking), the CS descriptor.  The ring-0 handler stores a present gPTE
    for Q (an emulated write to a shadowed table: ``mmu_pte_write``) and
    halts; ring 3 then reads Q again and it is mapped."""
    from kvmmmu.live.x86 import write_tables
    import numpy as np
    g = GuestImage()
    p, q = 0xC00000, 0xC01000
    g.map4k(p, DATA)
    for d in (DATA, DATA + 0x1000):
        _tag(g, d)
    pte_q = g.pte_gpa(q)                         # same table as p, left not present
    touch = g.code(_reads([p, q]), user=True)
    handler = g.code(asm64.store(pte_q, DATA + 0x1000 | PR | RW | US), user=False)
    write_tables(np.frombuffer(g.mem, dtype=np.uint8), {14: handler}, stack=STACK)
    retry = g.code(_reads([q]), user=True)
    frame = (STACK - 48, 48)
    steps = [Step("run", dict(rip=touch, cpl=3, regs={}, to_ring0=True, readback=[frame])),
             mark("delivered"), run(retry, 3)]
    return Scenario("guest_page_fault", guest_page_fault.__doc__, [_slot0(g)], {0: g.mem}, PML4,
                    steps, native_stores=g.native_stores)


def nxe_clear():
    """EFER.NXE cleared under a mapped page whose gPTE has XD (bit 63) set:
    ring 3 reads page V (gPTE P|W|U|A|XD; the shadow SPTE is made, NX);
    ring 0 clears EFER.NXE with ``wrmsr`` (``kvm_set_efer``: the MMU role
    bits changed, ``kvm_mmu_reset_context`` drops the roots) and reloads CR3;
    ring 3 reads V again.  By the SDM bit 63 is now reserved and the read
    should fault (#PF P|U|RSVD); KVM's shadow root role keeps ``efer_nx`` set
    whatever the guest's EFER (shadow-mmu.md §1.3), so the new root is the old
    shadow page (``existing``) and the SPTE made under NXE=1 still maps V: the
    read goes through without a fault.  (A #PF would go to a ring-0 handler
    that halts, and the run would end in HLT.)"""
    from kvmmmu.live.x86 import write_tables
    import numpy as np
    g = GuestImage()
    v = 0xE00000
    g.map4k(v, DATA, PR | RW | US | A | NX)
    _tag(g, DATA)
    touch = g.code(_reads([v]), user=True)
    efer = (1 << 8) | (1 << 10)                          # LME, LMA; NXE (bit 11) clear
    clear = g.code(b"\x48\xb9" + (0xC0000080).to_bytes(8, "little")       # mov rcx, MSR_EFER
                   + asm.movabs_rax(efer)
                   + b"\x48\xba" + (0).to_bytes(8, "little")              # mov rdx, 0
                   + b"\x0f\x30"                                          # wrmsr
                   + asm64.set_cr3(PML4), user=False)
    handler = g.code(b"", user=False)                    # #PF: halt
    write_tables(np.frombuffer(g.mem, dtype=np.uint8), {14: handler}, stack=STACK)
    steps = [run(touch, 3), mark("mapped"), run(clear, 0), mark("nxe_clear"), run(touch, 3)]
    return Scenario("nxe_clear", nxe_clear.__doc__, [_slot0(g)], {0: g.mem}, PML4, steps,
                    native_stores=g.native_stores)


#: name -> function building the scenario
SCENARIOS = {f.__name__: f for f in (first_touch_4k, huge_2m_4k_host, huge_2m_thp, prefetch,
                                     ring0_pte_rewrite, unsync_invlpg, cr3_switch,
                                     write_flooding, memslot_readd, mmio, dirty_log,
                                     guest_page_fault, misaligned_write, nxe_clear)}


def get(name) -> Scenario:
    """Build scenario `name` (a key of :data:`SCENARIOS`)."""
    if name not in SCENARIOS:
        raise KeyError(f"no scenario {name!r}; known: {sorted(SCENARIOS)}")
    return SCENARIOS[name]()
