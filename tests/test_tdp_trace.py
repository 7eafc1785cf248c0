"""The TDP MMU's tracepoints (kvmmmu/_core/tdp_trace.pxd), line by line.

A worked sequence on a small EPT VM with the TDP MMU — a fresh 4K fault, a
2M fault, an NX split, an eager split, a fast page fault fixing a
write-protected SPTE, an MMIO fault with MMIO caching on, a zap — must
print exactly the lines the kernel's tdp_mmu.c (v6.18) prints, in its order.

The expected lines are derived here, independently of kvmmmu.mmutrace's
renderers: each is the event's ``print fmt`` from the stored tracefs format
file (tests/data/tracefs_kvmmmu, equal to the live files: test_mmutrace)
run through a small C printf, with the argument values written out in
this file from the kernel's TP_fast_assign and TP_printk: SPTE values and
SPTE addresses are read back from the tables after each step (the trace
shows what was written), pfns from the host, the rest from the kernel's
rules (pfn | gfn offset for kvm_mmu_spte_requested, spte & ACC_ALL for
mark_mmio_spte's access, the role bits for kvm_mmu_get_page, ...).
"""
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from kvmmmu import mmutrace as tp
from kvmmmu._core import tdp_trace
from kvmmmu._core import trace_buf as tb
from kvmmmu._core.defs import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_SPURIOUS
from kvmmmu._core.pt_arena import MmuMemoryCache, PtArena
from kvmmmu._core.role import KvmMmuPageRole
from kvmmmu._core.spte import SpteFormat
from kvmmmu._core.tdp_iter import TdpIter
from kvmmmu._core.tdp_mmu import TdpMmuCore
from kvmmmu.host import HostConfig
from kvmmmu.tdp_mmu import TdpMmu
from kvmmmu.vm import VM, KvmParams

DATA = Path(__file__).parent / "data" / "tracefs_kvmmmu"
LIVE = Path("/sys/kernel/tracing/events/kvmmmu")
MiB = 1 << 20
PT_WRITABLE_MASK = 1 << 1
TDP_EVENTS = ("kvm_mmu_get_page", "kvm_mmu_prepare_zap_page", "kvm_mmu_set_spte",
              "kvm_mmu_spte_requested", "kvm_tdp_mmu_spte_changed", "kvm_mmu_split_huge_page",
              "fast_page_fault", "mark_mmio_spte")


@pytest.fixture(autouse=True)
def _events_off():
    tp.disable_all()
    yield
    tp.disable_all()


# ---------------------------------------------------------------------------
# The kernel's print formats, and a C printf
# ---------------------------------------------------------------------------

def _split_args(text):
    """Top-level comma-separated items of a C argument list."""
    out, depth, cur, quoted = [], 0, "", False
    for ch in text:
        if ch == '"' and not cur.endswith("\\"):
            quoted = not quoted
        if not quoted:
            depth += ch in "({["
            depth -= ch in ")}]"
            if ch == "," and depth == 0:
                out.append(cur.strip())
                cur = ""
                continue
        cur += ch
    out.append(cur.strip())
    return out


def print_fmt(name):
    """(format string, [argument expressions]) of the stored format file."""
    text = (DATA / f"{name}.format").read_text()
    fmt_line = re.search(r"^print fmt: (.*)$", text, re.M).group(1)
    m = re.match(r'"((?:[^"\\]|\\.)*)", (.*)$', fmt_line)
    return m.group(1), _split_args(m.group(2))


def cprintf(fmt, args):
    """The kernel's vsprintf for the conversions these formats use."""
    args = list(args)

    def conv(m):
        flag, length, c = m.group(1), m.group(2), m.group(3)
        if c == "%":
            return "%"
        v = args.pop(0)
        if c == "s":
            return v
        if c == "c":
            return "" if v == 0 else chr(v)      # the %c 0 ends a trace_seq string
        if c == "p":                             # %p with hash-ptr off (%px)
            return f"{v:016x}"
        bits = 64 if length == "ll" else 32
        if c in "xu":
            v %= 1 << bits
        if c == "x":
            return ("0x" if flag == "#" else "") + f"{v:x}"
        return str(v)
    out = re.sub(r"%(#?)(ll)?([dxuspc%])", conv, fmt)
    assert not args, f"{len(args)} arguments left for {fmt!r}"
    return out


def simple_line(name, **fields):
    """For a format whose arguments are all plain ``REC->field``."""
    fmt, exprs = print_fmt(name)
    assert all(re.fullmatch(r"REC->\w+", e) for e in exprs), exprs
    assert sorted(e[5:] for e in exprs) == sorted(fields)
    return f"{name}: " + cprintf(fmt, [fields[e[5:]] for e in exprs])


ACCESS_STR = ("---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux")


def sp_text(role, gfn, *, gen=0, root_count=0, unsync=False):
    """The shadow-page text of kvm_mmu_get_page / kvm_mmu_prepare_zap_page:
    the trace_seq_printf inside their print fmt, with union
    kvm_mmu_page_role's bits (level:4 has_4_byte_gpte:1 quadrant:2 direct:1
    access:3 invalid:1 efer_nx:1 cr0_wp:1 smep_andnot_wp:1 smap_andnot_wp:1
    ad_disabled:1 ...)."""
    _, exprs = print_fmt("kvm_mmu_prepare_zap_page")
    inner = re.search(r'trace_seq_printf\(p, "([^"]*)" "([^"]*)"', exprs[0])
    fmt = inner.group(1) + inner.group(2)
    w = role
    bit = lambda s, n=1: (w >> s) & ((1 << n) - 1)  # noqa: E731
    return cprintf(fmt, [gen, gfn, bit(0, 4), 4 if bit(4) else 8, bit(5, 2),
                         " direct" if bit(7) else "", ACCESS_STR[bit(8, 3)],
                         " invalid" if bit(11) else "", "" if bit(12) else "!",
                         "!" if bit(16) else "", root_count, "unsync" if unsync else "sync", 0])


def get_page_line(role, gfn):
    fmt, exprs = print_fmt("kvm_mmu_get_page")
    assert fmt == "%s %s" and exprs[1] == 'REC->created ? "new" : "existing"'
    return "kvm_mmu_get_page: " + cprintf(fmt, [sp_text(role, gfn), "new"])


def prepare_zap_line(role, gfn):
    return "kvm_mmu_prepare_zap_page: " + cprintf(print_fmt("kvm_mmu_prepare_zap_page")[0],
                                                  [sp_text(role, gfn)])


def set_spte_line(fmtm, gfn, spte, sptep, level):
    """kvm_mmu_set_spte: r = shadow_present_mask || spte & PT_PRESENT_MASK,
    x = is_executable_pte, u = -1 without shadow_user_mask."""
    fmt, exprs = print_fmt("kvm_mmu_set_spte")
    assert exprs[2:6] == ['REC->r ? "r" : "-"', 'REC->spte & (1ULL << 1) ? "w" : "-"',
                          'REC->x ? "x" : "-"', 'REC->u == -1 ? "" : (REC->u ? "u" : "-")']
    r = bool(fmtm["present_mask"]) or bool(spte & 1)
    x = (spte & (fmtm["x_mask"] | fmtm["nx_mask"])) == fmtm["x_mask"]
    u = -1 if not fmtm["user_mask"] else int(bool(spte & fmtm["user_mask"]))
    return "kvm_mmu_set_spte: " + cprintf(fmt, [
        gfn, spte, "r" if r else "-", "w" if spte & 2 else "-", "x" if x else "-",
        "" if u == -1 else ("u" if u else "-"), level, sptep])


PFERR = {"P": 1 << 0, "W": 1 << 1, "U": 1 << 2, "RSVD": 1 << 3, "F": 1 << 4}


def fast_pf_line(vcpu_id, gpa, flags, sptep, old, new, ret):
    fmt, exprs = print_fmt("fast_page_fault")
    assert exprs[-2:] == ["REC->ret == 6", "REC->ret == 5"]
    assert RET_PF_SPURIOUS == 6 and RET_PF_FIXED == 5
    return "fast_page_fault: " + cprintf(fmt, [vcpu_id, gpa, "|".join(flags), sptep, old, new,
                                               int(ret == 6), int(ret == 5)])


# ---------------------------------------------------------------------------
# The VM and what its tables hold
# ---------------------------------------------------------------------------

THP_GPA, SMALL_GPA, HOLE_GPA = 0, 16 * MiB, 48 * MiB


def make_vm(**params):
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"),
            params=KvmParams(mmio_caching=True, nx_huge_pages=True, **params))
    vm.add_memory(THP_GPA, 8 * MiB, slot=0, thp=True, populate=True)
    vm.add_memory(SMALL_GPA, 2 * MiB, slot=1, populate=True)          # 4K only
    t = vm.register_mmu(TdpMmu(vm))
    return vm, t


def entry(vm, root, gfn, level):
    """(sptep, spte) of the entry at `level` on gfn's path."""
    for g, lvl, sptep, spte in TdpIter(vm.arena, root, gfn, gfn + 1):
        if lvl == level:
            return sptep, spte
    raise AssertionError(f"no level-{level} entry for gfn {gfn:#x}")


def host_pfn(vm, gfn):
    slot = vm.gfn_to_memslot(gfn)
    hva = np.array([slot.userspace_addr + ((gfn - slot.base_gfn) << 12)], np.uint64)
    return int(vm.host.hva_to_pfn_array(hva)[0][0])


def changed(gfn, level, old, new, as_id=0):
    return simple_line("kvm_tdp_mmu_spte_changed", as_id=as_id, gfn=gfn, level=level,
                       old_spte=old, new_spte=new)


def requested(gfn, pfn, level):
    return simple_line("kvm_mmu_spte_requested", gfn=gfn, pfn=pfn, level=level)


def split(gfn, spte, level, errno=0):
    return simple_line("kvm_mmu_split_huge_page", gfn=gfn, spte=spte, level=level, errno=errno)


# ---------------------------------------------------------------------------
# The worked sequence
# ---------------------------------------------------------------------------

def test_the_print_formats_used_here_are_the_live_kernels():
    if not LIVE.is_dir():
        pytest.skip("no /sys/kernel/tracing/events/kvmmmu")
    for name in TDP_EVENTS:
        live = re.search(r"^print fmt: (.*)$", (LIVE / name / "format").read_text(), re.M)
        stored = re.search(r"^print fmt: (.*)$", (DATA / f"{name}.format").read_text(), re.M)
        assert live.group(1) == stored.group(1), name


def test_worked_sequence_prints_the_kernels_lines_in_its_order():
    vm, t = make_vm()
    v = vm.vcpus[0]
    m = vm.fmt.masks()
    NP = m["nonpresent_value"]
    with tp.capture(*TDP_EVENTS) as ring:
        # the root: tdp_mmu_init_sp
        t.kvm_mmu_load(v)
        root = t.vcpu_root[v.index]
        role = root.role.word
        assert ring.lines() == [get_page_line(role, 0)]
        rl = lambda level: root.role.replace(level=level).word  # noqa: E731

        # 1. a fresh 4K fault on an empty root: three tables, then the leaf
        ring.clear()
        g1 = (SMALL_GPA >> 12) + 3
        assert t.page_fault(v, g1) == RET_PF_FIXED
        s4, t3 = entry(vm, root.sp, g1, 4)
        s3, t2 = entry(vm, root.sp, g1, 3)
        s2, t1 = entry(vm, root.sp, g1, 2)
        s1, leaf1 = entry(vm, root.sp, g1, 1)
        assert ring.lines() == [
            requested(g1, host_pfn(vm, g1), 1),
            get_page_line(rl(3), 0), changed(0, 4, NP, t3),
            get_page_line(rl(2), 0), changed(0, 3, NP, t2),
            get_page_line(rl(1), g1 & ~511), changed(g1 & ~511, 2, NP, t1),
            changed(g1, 1, NP, leaf1),
            set_spte_line(m, g1, leaf1, s1, 1),
        ]

        # 2. a 2M fault: the pfn printed is the gfn's own (aligned pfn + offset)
        ring.clear()
        g2 = 0x205
        assert t.page_fault(v, g2) == RET_PF_FIXED
        s2m, huge = entry(vm, root.sp, g2, 2)
        assert (huge >> 7) & 1 and host_pfn(vm, g2) & 511 == 5
        assert ring.lines() == [
            requested(g2, host_pfn(vm, g2), 2),
            changed(0x200, 2, NP, huge),
            set_spte_line(m, 0x200, huge, s2m, 2),
        ]

        # 3. an NX split: a fetch in that 2M page maps 4K; the huge leaf is
        # split in place (the 4K children are executable: spurious at 4K)
        ring.clear()
        assert t.page_fault(v, 0x207, exec=True) == RET_PF_SPURIOUS
        _, table = entry(vm, root.sp, 0x207, 2)
        assert ring.lines() == [
            requested(0x207, host_pfn(vm, 0x207), 1),
            get_page_line(rl(1), 0x200),
            changed(0x200, 2, huge, table),
            split(0x200, huge, 2),
        ]

        # 4. eager split: the 2M leaf at 0x400, split when the slot asks for 4K
        assert t.page_fault(v, 0x400) == RET_PF_FIXED
        _, huge4 = entry(vm, root.sp, 0x400, 2)
        ring.clear()
        t.kvm_mmu_slot_try_split_huge_pages(vm.memslots[0].id_to_memslot(0), 1)
        _, table4 = entry(vm, root.sp, 0x400, 2)
        assert ring.lines() == [
            get_page_line(rl(1), 0x400),
            changed(0x400, 2, huge4, table4),
            split(0x400, huge4, 2),
        ]

        # 5. write-protect the 4K leaf (kvm_tdp_mmu_wrprot_slot's atomic set),
        # then a write: fast_page_fault sets W back with one cmpxchg
        ring.clear()
        assert leaf1 & PT_WRITABLE_MASK
        assert t.core.clear_bit_range(root.sp, SMALL_GPA >> 12, (SMALL_GPA >> 12) + 512,
                                      PT_WRITABLE_MASK)
        ro = leaf1 & ~PT_WRITABLE_MASK
        assert entry(vm, root.sp, g1, 1) == (s1, ro)
        fast = v.stat.pf_fast
        assert t.page_fault(v, g1, write=True) == RET_PF_FIXED and v.stat.pf_fast == fast + 1
        _, now = entry(vm, root.sp, g1, 1)
        assert now == ro | PT_WRITABLE_MASK
        assert ring.lines() == [
            changed(g1, 1, leaf1, ro),
            fast_pf_line(v.vcpu_id, g1 << 12, ["P", "W"], s1, ro, now, RET_PF_FIXED),
        ]

        # 6. an MMIO fault with MMIO caching on: an MMIO SPTE with the
        # memslot generation; the requested pfn is KVM_PFN_NOSLOT
        ring.clear()
        g3 = HOLE_GPA >> 12
        gen = v.mmio_spte_generation()
        assert t.page_fault(v, g3) == RET_PF_EMULATE
        _, t1b = entry(vm, root.sp, g3, 2)
        s_mmio, mmio = entry(vm, root.sp, g3, 1)
        assert vm.fmt.is_mmio_spte(mmio) and mmio & 7 == 6     # EPT's W+X misconfig value
        assert ring.lines() == [
            requested(g3, 1 << 63, 1),
            get_page_line(rl(1), g3), changed(g3, 2, NP, t1b),
            changed(g3, 1, NP, mmio),
            simple_line("mark_mmio_spte", sptep=s_mmio, gfn=g3, access=mmio & 7, gen=gen),
        ]
        # the second access is the reserved-bit fault: no fast_page_fault line
        ring.clear()
        assert t.page_fault(v, g3) == RET_PF_EMULATE
        assert ring.lines() == []

        # 7. a zap of the small slot: its one leaf goes
        ring.clear()
        assert t.kvm_zap_gfn_range(SMALL_GPA >> 12, (SMALL_GPA >> 12) + 512)
        assert ring.lines() == [changed(g1, 1, now, NP)]
    assert ring.dropped == 0


def test_a_root_zap_traces_each_table_after_the_entry_that_linked_it():
    """handle_changed_spte traces the entry, then handle_removed_pt traces the
    table (kvm_mmu_prepare_zap_page) before the entries it freezes."""
    vm, t = make_vm()
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    root = t.vcpu_root[v.index]
    for g in (3, 0x205, (SMALL_GPA >> 12) + 1):
        t.page_fault(v, g, write=True)
    m = vm.fmt.masks()
    l3_sptep, l3 = entry(vm, root.sp, 0, 3)
    tables = [(lvl, g) for g, lvl, _, s in TdpIter(vm.arena, root.sp, 0, 1 << 27)
              if lvl > 1 and m["nonpresent_value"] != s and not (s >> 7) & 1]
    with tp.capture("kvm_tdp_mmu_spte_changed", "kvm_mmu_prepare_zap_page") as ring:
        t.core.zap_root(root.sp)
    lines = ring.lines()
    rl = lambda level: root.role.replace(level=level).word  # noqa: E731
    assert lines[0] == changed(0, 3, l3, m["nonpresent_value"])
    assert lines[1] == prepare_zap_line(rl(2), 0)
    zaps = [ln for ln in lines if ln.startswith("kvm_mmu_prepare_zap_page")]
    # every table below the root goes once: the level-2 and level-1 ones in
    # the pass at 1G, the level-3 one in the pass at the root's level
    assert len(zaps) == len(tables) == 3
    assert zaps[-1] == prepare_zap_line(rl(3), 0)
    for ln in lines:
        if ln.startswith("kvm_tdp_mmu_spte_changed"):
            new = int(ln.rsplit("new_spte ", 1)[1], 16)
            assert new in (m["nonpresent_value"], m["frozen_spte"])


def test_aging_and_the_masked_dirty_clear_trace_the_bit_they_clear():
    vm, t = make_vm()
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    root = t.vcpu_root[v.index]
    g = (SMALL_GPA >> 12) + 7
    assert t.page_fault(v, g, write=True) == RET_PF_FIXED
    s1, leaf = entry(vm, root.sp, g, 1)
    m = vm.fmt.masks()
    ti, idx = vm.arena.sptep_location(s1)
    vm.arena.table(ti)[idx] = leaf | m["accessed_mask"] | m["dirty_mask"]   # the CPU's A/D
    leaf |= m["accessed_mask"] | m["dirty_mask"]
    with tp.capture("kvm_tdp_mmu_spte_changed") as ring:
        assert t.core.age_gfn_range(root.sp, g, g + 1)
        young_gone = leaf & ~m["accessed_mask"]
        mask = np.zeros(8, np.uint64)
        mask[(g - (SMALL_GPA >> 12)) // 64] = np.uint64(1 << (g % 64))
        t.core.clear_dirty_log(root.sp, SMALL_GPA >> 12, mask)
    assert ring.lines() == [changed(g, 1, leaf, young_gone),
                            changed(g, 1, young_gone, young_gone & ~m["dirty_mask"])]


# ---------------------------------------------------------------------------
# Off, selective, overflow, a sink that raises
# ---------------------------------------------------------------------------

def _run_sequence(vm, t):
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    t.page_fault(v, (SMALL_GPA >> 12) + 3)
    t.page_fault(v, 0x205)
    t.page_fault(v, 0x207, exec=True)
    t.page_fault(v, HOLE_GPA >> 12)
    t.kvm_zap_gfn_range(0, 1 << 20)


def test_nothing_is_emitted_while_the_events_are_off():
    vm, t = make_vm()
    ring = tp.subscribe(tp.RingBuffer(1024))
    dropped = tb.dropped()
    try:
        _run_sequence(vm, t)
    finally:
        tp.unsubscribe(ring)
    assert ring.lines() == [] and tb.dropped() == dropped


def test_one_event_on_records_only_that_event():
    vm, t = make_vm()
    with tp.capture("kvm_mmu_split_huge_page") as ring:
        _run_sequence(vm, t)
    assert [r.event for r in ring] == ["kvm_mmu_split_huge_page"]
    with tp.capture("mark_mmio_spte") as ring:
        t.page_fault(vm.vcpus[0], (HOLE_GPA >> 12) + 9)
    assert [r.event for r in ring] == ["mark_mmio_spte"]


def _core(n_root_level=4):
    fmt = SpteFormat.ept()
    a = PtArena(fmt, nr_vcpus=1)
    pc, hc = MmuMemoryCache(a, "shadow_page"), MmuMemoryCache(a, "page_header")
    pc.topup(1)
    hc.topup(1)
    role = KvmMmuPageRole(level=n_root_level, direct=1, access=7).word
    root = a.alloc_sp(pc, hc, role=role, gfn=0, tdp_mmu_page=True)
    return a, TdpMmuCore(a), root, pc, hc


def test_a_buffer_overflow_is_counted_and_the_map_completes():
    """One map call of 2^17 fresh 4K gfns records 2^17 + 258 SPTE changes;
    a buffer keeps 65,536 and counts the rest as dropped."""
    a, core, root, pc, hc = _core()
    n = 1 << 17
    g = np.arange(n, dtype=np.uint64)
    before = tb.dropped()
    with tp.capture("kvm_tdp_mmu_spte_changed", capacity=1 << 17) as ring:
        r = core.map(root, g, g + (1 << 20), 1, pc, hc)
    assert (r == RET_PF_FIXED).all()
    total = n + n // 512 + 2
    assert tb.TRACE_BUF_CAP == 65536
    assert len(ring) == tb.TRACE_BUF_CAP and tb.dropped() - before == total - tb.TRACE_BUF_CAP
    assert a.page_stats["pages_4k"] == n                   # nothing else was lost
    assert tdp_trace.pending() == 0                          # drained when map returned
    first = ring.records()[0].fields
    assert (first["gfn"], first["level"]) == (0, 4)        # kept in push order
    # the buffer is empty again: the next call records from scratch
    with tp.capture("kvm_tdp_mmu_spte_changed") as ring:
        core.zap_leafs(root, 0, 1)
    assert len(ring) == 1 and tb.dropped() - before == total - tb.TRACE_BUF_CAP


def test_a_sink_that_raises_fails_the_call_and_leaves_nothing_behind():
    a, core, root, pc, hc = _core()

    def boom(rec):
        raise RuntimeError("sink")
    tp.subscribe(boom)
    try:
        with tp.capture("kvm_mmu_spte_requested"):
            with pytest.raises(RuntimeError, match="sink"):
                core.map(root, np.array([5], np.uint64), np.array([0x100005], np.uint64), 1, pc, hc)
    finally:
        tp.unsubscribe(boom)
    # the arena is not left claimed, and no stale record comes out later
    (_, _, _, leaf), = [e for e in TdpIter(a, root, 5, 6) if e[1] == 1]
    with tp.capture("kvm_mmu_spte_requested", "kvm_tdp_mmu_spte_changed") as ring:
        assert core.zap_leafs(root, 0, 512)
    assert ring.lines() == [changed(5, 1, leaf, 0x8000000000000000)]


def test_threads_record_into_their_own_buffers():
    """Each thread's calls drain their own records: two threads on two
    arenas, each seeing exactly its own gfns."""
    seen = {}
    with tp.capture("kvm_mmu_spte_requested") as ring:
        def run(k):
            a, core, root, pc, hc = _core()
            g = np.arange(k * 4096, k * 4096 + 2048, dtype=np.uint64)
            for _ in range(5):
                core.map(root, g, g + (1 << 20), 1, pc, hc)
        ths = [threading.Thread(target=run, args=(k,)) for k in (1, 2)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    for r in ring:
        seen.setdefault(r.fields["gfn"] // 4096, []).append(r.fields["gfn"])
    for k in (1, 2):
        assert seen[k] == list(range(k * 4096, k * 4096 + 2048)) * 5


def test_fast_page_fault_is_not_traced_when_it_cannot_be_fast():
    """page_fault_can_be_fast: a read of a present SPTE (with A/D bits) or
    a fault on a missing one never walks, so prints nothing; a write on a
    writable SPTE walks and prints spurious 1."""
    vm, t = make_vm()
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    root = t.vcpu_root[v.index]
    g = (SMALL_GPA >> 12) + 5
    with tp.capture("fast_page_fault") as ring:
        t.page_fault(v, g)                              # missing: no walk
        t.page_fault(v, g)                              # read, present: no walk
        assert ring.lines() == []
        assert t.page_fault(v, g, write=True) == RET_PF_SPURIOUS
    sptep, spte = entry(vm, root.sp, g, 1)
    assert ring.lines() == [fast_pf_line(v.vcpu_id, g << 12, ["P", "W"], sptep, spte, spte,
                                         RET_PF_SPURIOUS)]
    # the caller's VM-exit values are printed as given
    with tp.capture("fast_page_fault") as ring:
        t.core.fast_page_fault(root.sp, g, write=True, vcpu_id=3, addr=(g << 12) | 0x7c,
                               error_code=(1 << 32) | 3)
    assert ring.lines() == [fast_pf_line(3, (g << 12) | 0x7c, ["P", "W", "0x100000000"], sptep,
                                         spte, spte, RET_PF_SPURIOUS)]
    with pytest.raises(TypeError, match="vcpu_id"):
        t.core.fast_page_fault(root.sp, g, vcpu_id="0")
    with pytest.raises((TypeError, ValueError, OverflowError), match="error_code"):
        t.core.fast_page_fault(root.sp, g, error_code=-1)


def test_fast_page_fault_restoring_an_access_tracked_spte_without_ad_bits():
    """Without A/D bits a fault on a non-present SPTE may be fast (an
    access-tracked SPTE): the read fault prints no flag (error_code "") and
    the SPTE fast_page_fault restored."""
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept", ad_bits=False))
    vm.add_memory(0, 8 * MiB, slot=0, populate=True)
    t = vm.register_mmu(TdpMmu(vm))
    v = vm.vcpus[0]
    t.kvm_mmu_load(v)
    root = t.vcpu_root[v.index]
    assert t.page_fault(v, 9) == RET_PF_FIXED
    sptep, leaf = entry(vm, root.sp, 9, 1)
    from kvmmmu.notifiers import KvmGfnRange
    with tp.capture("fast_page_fault", "kvm_tdp_mmu_spte_changed") as ring:
        assert t.kvm_age_gfn(KvmGfnRange(vm.memslots[0].id_to_memslot(0), 0, 16))
        _, tracked = entry(vm, root.sp, 9, 1)
        assert vm.fmt.is_access_track_spte(tracked) and tracked & 7 == 0
        assert t.page_fault(v, 9) == RET_PF_FIXED and v.stat.pf_fast == 1
    _, now = entry(vm, root.sp, 9, 1)
    assert ring.lines() == [changed(9, 1, leaf, tracked),
                            fast_pf_line(v.vcpu_id, 9 << 12, ["U"], sptep, tracked, now, RET_PF_FIXED)]
    assert "error_code U sptep" in ring.lines()[1]            # one flag, no separator
