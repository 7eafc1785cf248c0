"""The shadow MMU's C fault path (kvmmmu/_core/shadow_fault.pyx) against the
Python reference path (``ShadowMmu.c_fast_path = False``): the same
sequence of vCPU events must give the same kvmmmu trace lines, the same VM
and vCPU statistics and the same shadow pages, SPTEs, translations and
rmaps - on varied sequences (random faults with every access kind,
4-level / PAE / 32-bit / paging-off guests, direct mmu="tdp" VMs, dirty
logging, write-tracked and shadowed gfns, emulated writes of guest tables,
INVLPG, CR3 reloads, guest huge pages) and on every recorded scenario.
Also: the batch path ``ShadowMmu.page_fault_batch`` against the scalar one,
that the C path is really taken, and hostile inputs to the new entry
points (in subprocesses).
"""
import glob
import os
import random

import numpy as np
import pytest

from kvmmmu import mmutrace as tp
from kvmmmu import replay
from kvmmmu._core.defs import RET_PF_FIXED
from kvmmmu._core.guest_walk import PFERR_FETCH_MASK as F_, PFERR_PRESENT_MASK as P_, \
    PFERR_USER_MASK as U_, PFERR_WRITE_MASK as W_
from kvmmmu._core.shadow_fault import DECLINE, ShadowFastCore
from kvmmmu.guest_tables import GuestPageTables
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES
from kvmmmu.shadow_mmu import ShadowMmu
from kvmmmu.vm import VM

from _probe import assert_no_crash
from test_shadow_mmu import (
    A, CR0_PE, CR0_PG, CR0_WP, CR4_PAE, CR4_PSE, D, EFER_LME, EFER_NX, MiB, NX, P, PS, U, W,
    GuestTables, shadow_vm, tdp_vm,
)

DATA = os.path.join(os.path.dirname(__file__), "data", "shadow_scenarios")


# ---------------------------------------------------------------------------
# what "the same" means
# ---------------------------------------------------------------------------

def state(vm):
    """Every shadow page (creation order) with its table, translations and
    the mirror fields; the rmaps (chains without descriptor addresses); the
    host PTE flags; the statistics."""
    sm = vm.mmu_backend
    pages = []
    for sp in sorted(sm.pages.values(), key=lambda s: s.serial):
        st = sp.shadowed_translation
        pages.append((sp.gfn, sp.word, sp.spt.tobytes(), None if st is None else st.tobytes(),
                      sp.write_flooding_count, bool(sp.unsync), sp.unsync_children,
                      sp.unsync_child_bitmap, sp.root_count, tuple(sorted(sp.parent_ptes))))
    rmaps = []
    for slots in vm.memslots:
        for s in slots:
            r = s.arch.rmap
            if r is not None:
                rmaps.append((s.id, tuple((lv, i, tuple(tuple(c[1:]) for c in chain))
                                          for lv, i, _, chain in r.snapshot())))
    host = [(v.start, v.pte.tobytes(), v.pfn.tobytes()) for v in vm.host.vmas]
    vst = [v.stat.as_dict() for v in vm.vcpus]
    return pages, rmaps, host, vm.stat.as_dict(), vst


def twin(script, monkeypatch):
    """Run ``script()`` (which builds its VM and returns it) on each path;
    return both (lines, state, results) triples."""
    out = []
    for c in (False, True):
        monkeypatch.setattr(ShadowMmu, "c_fast_path", c)
        with tp.capture(capacity=1 << 20) as ring:
            vm, results = script()
        assert vm.audit() == []
        out.append((ring.lines(), state(vm), results))
    return out


def assert_same(ref, fast):
    lines_r, state_r, res_r = ref
    lines_f, state_f, res_f = fast
    assert res_f == res_r
    for i, (a, b) in enumerate(zip(lines_r, lines_f)):
        assert a == b, f"first divergence at trace line {i}"
    assert len(lines_f) == len(lines_r)
    names = ("pages", "rmaps", "host", "vm stats", "vcpu stats")
    for name, a, b in zip(names, state_r, state_f):
        assert a == b, name


class Counting:
    """Counts what the C core answered (to check it is really used)."""

    def __init__(self, monkeypatch):
        self.done = self.declined = 0
        real = ShadowFastCore.fetch
        me = self

        def fetch(core, *args, **kw):
            r = real(core, *args, **kw)
            if r == DECLINE:
                me.declined += 1
            else:
                me.done += 1
            return r
        monkeypatch.setattr(ShadowMmu, "_fastcore", _wrap_core(fetch))


def _wrap_core(fetch):
    class Core:
        def __init__(self, core):
            self._core = core

        def fetch(self, *a, **kw):
            return fetch(self._core, *a, **kw)

        def __getattr__(self, name):
            return getattr(self._core, name)

    def _fastcore(self):
        c = self.__dict__.get("_fast_wrapped")
        if c is None:
            c = self.__dict__["_fast_wrapped"] = Core(ShadowMmu._fastcore_real(self))
        return c
    return _fastcore


ShadowMmu._fastcore_real = ShadowMmu._fastcore


# ---------------------------------------------------------------------------
# guests
# ---------------------------------------------------------------------------

MODES = ("long", "pae", "32bit", "32bit-pse")


def guest(mode, **kw):
    """A guest of `mode` mapping 48 pages of user data (some read-only, some
    not accessed, some NX, a few 2M/4M guest huge pages) plus an alias of
    its own page tables; returns (vm, vcpu, tables, gvas, leaf gpas)."""
    vm = shadow_vm(**kw)
    entry = 4 if mode.startswith("32bit") else 8
    top = {"long": 4, "pae": 3, "32bit": 2, "32bit-pse": 2}[mode]
    g = GuestTables(vm, entry=entry)
    if mode == "pae":
        cr3 = g.alloc()
        pdpt = cr3
        for i in range(4):                                   # PDPTEs: P only
            g.set(pdpt + 8 * i, g.alloc() | P)
    else:
        cr3 = g.alloc()
    rng = random.Random(7)
    gvas, leaves = [], []
    base = 0x400000
    for k in range(48):
        gva = base + (k // 16) * 0x200000 + (k % 16) * 0x1000
        flags = P | U
        if rng.random() < 0.7:
            flags |= W
        if rng.random() < 0.6:
            flags |= A
        if rng.random() < 0.3:
            flags |= D
        if entry == 8 and rng.random() < 0.1:
            flags |= NX
        if mode == "pae":
            leaves.append(_map_pae(g, cr3, gva, 0x1000000 + k * 0x1000, flags))
        else:
            leaves.append(g.map(cr3, gva, 0x1000000 + k * 0x1000, flags=P | W | U | A, leaf=flags,
                                top=top))
        gvas.append(gva)
    if mode in ("long", "32bit-pse"):
        huge = 0x40000000 if mode == "long" else 0x800000
        size = 0x200000 if mode == "long" else 0x400000
        g.map(cr3, huge, 0x1400000 if mode == "long" else 0x1400000, flags=P | W | U | A,
              leaf=P | W | U | A, level=2, top=top)
        gvas += [huge, huge + 0x1000, huge + size - 0x1000]
    # the tables themselves, user-writable at gva 0x10000000 (the unsync alias)
    for k in range(8):
        t = 0x1000 * (1 + k)
        if mode == "pae":
            _map_pae(g, cr3, 0x10000000 + k * 0x1000, t, P | W | U | A | D)
        else:
            g.map(cr3, 0x10000000 + k * 0x1000, t, flags=P | W | U | A, leaf=P | W | U | A | D,
                  top=top)
        gvas.append(0x10000000 + k * 0x1000)
    v = vm.vcpus[0]
    if mode == "long":
        v.kvm_set_efer(EFER_LME | EFER_NX)
        v.kvm_set_cr4(CR4_PAE)
    elif mode == "pae":
        v.kvm_set_efer(EFER_NX)
        v.kvm_set_cr4(CR4_PAE)
    elif mode == "32bit-pse":
        v.kvm_set_cr4(CR4_PSE)
    v.kvm_set_cr3(cr3)
    v.kvm_set_cr0(CR0_PE | CR0_PG | CR0_WP)
    v.set_cpl(3)
    v.vcpu_enter_guest()
    return vm, v, g, gvas, leaves


def _map_pae(g, cr3, gva, gpa, leaf):
    pd = g.get(cr3 + 8 * (gva >> 30)) & ~0xFFF
    e = g.get(pd + 8 * ((gva >> 21) & 511))
    if not e & P:
        e = g.alloc() | P | W | U | A
        g.set(pd + 8 * ((gva >> 21) & 511), e)
    pt = e & 0x000FFFFFFFFFF000
    g.set(pt + 8 * ((gva >> 12) & 511), gpa | leaf)
    return pt + 8 * ((gva >> 12) & 511)


EC = (U_, U_ | W_, U_ | F_, U_ | P_, U_ | W_ | P_, 0, W_, W_ | P_, F_)


def random_script(mode, seed, n=160):
    def script():
        vm, v, g, gvas, leaves = guest(mode)
        rng = random.Random(seed)
        res = []
        slot0 = vm.memslots[0].id_to_memslot(0)
        for _ in range(n):
            x = rng.random()
            if x < 0.62:
                ec = rng.choice(EC)
                if ec & U_ == 0:
                    v.set_cpl(0)
                res.append(v.kvm_mmu_page_fault(rng.choice(gvas), ec))
                v.set_cpl(3)
            elif x < 0.70:                       # the guest edits a leaf (untracked store)
                i = rng.randrange(len(leaves))
                old = g.get(leaves[i])
                g.set(leaves[i], old ^ rng.choice((A, W, D, P)))
            elif x < 0.78:                       # the emulator writes a guest PTE (tracked)
                i = rng.randrange(len(leaves))
                val = g.get(leaves[i]) ^ rng.choice((A, W, 0))
                v.kvm_page_track_write(leaves[i], val.to_bytes(g.entry, "little"))
            elif x < 0.83:
                v.kvm_mmu_invlpg(rng.choice(gvas))
            elif x < 0.87:
                v.kvm_set_cr3(v.cpu.cr3)
            elif x < 0.91:                       # dirty logging on / off
                flags = slot0.flags ^ KVM_MEM_LOG_DIRTY_PAGES
                vm.set_user_memory_region(0, flags, 0, 32 * MiB, slot0.userspace_addr)
                slot0 = vm.memslots[0].id_to_memslot(0)
            elif x < 0.94:                       # the MMU's own write tracking of a gfn
                res.append(v.kvm_mmu_page_fault(0x10000000 + rng.randrange(8) * 0x1000,
                                                U_ | W_ | P_))
            else:
                res.append(tuple(int(w) for w in vm.get_dirty_log(0)[:8])
                           if slot0.flags & KVM_MEM_LOG_DIRTY_PAGES else None)
            v.vcpu_enter_guest()
        return vm, res
    return script


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
def test_random_faults_give_the_same_events_stats_and_state(mode, seed, monkeypatch):
    cnt = Counting(monkeypatch)
    ref, fast = twin(random_script(mode, seed), monkeypatch)
    assert_same(ref, fast)
    assert cnt.done >= 40                      # the C path did most of the faults


def test_the_c_path_is_taken_for_faults_over_existing_pages(monkeypatch):
    cnt = Counting(monkeypatch)
    vm, v, g, gvas, leaves = guest("long")
    for gva in gvas[:16]:                                  # one table: a page, then C
        v.kvm_mmu_page_fault(gva, U_)
    assert cnt.done >= 14
    assert vm.audit() == []


def tdp_script(seed, n=200):
    def script():
        vm, v = tdp_vm()
        rng = random.Random(seed)
        res = []
        slot = vm.memslots[0].id_to_memslot(0)
        for _ in range(n):
            x = rng.random()
            if x < 0.8:
                gpa = rng.randrange(0, 64 * MiB + (4 * MiB if rng.random() < 0.05 else 0)) & ~0xFFF
                res.append(v.kvm_mmu_page_fault(gpa, rng.choice((0, W_, F_, W_ | P_))))
            elif x < 0.9:
                flags = slot.flags ^ KVM_MEM_LOG_DIRTY_PAGES
                vm.set_user_memory_region(0, flags, 0, 64 * MiB, slot.userspace_addr)
                slot = vm.memslots[0].id_to_memslot(0)
            else:
                v.vcpu_enter_guest()
        return vm, res
    return script


@pytest.mark.parametrize("seed", range(3))
def test_direct_tdp_faults_give_the_same_events_stats_and_state(seed, monkeypatch):
    cnt = Counting(monkeypatch)
    ref, fast = twin(tdp_script(seed), monkeypatch)
    assert_same(ref, fast)
    assert cnt.done >= 60


def test_nonpaging_guest_gives_the_same_result(monkeypatch):
    def script():
        vm = shadow_vm()
        v = vm.vcpus[0]
        v.vcpu_enter_guest()
        rng = random.Random(3)
        res = [v.kvm_mmu_page_fault(rng.randrange(0, 32 * MiB) & ~0xFFF, rng.choice((0, W_)))
               for _ in range(120)]
        return vm, res
    ref, fast = twin(script, monkeypatch)
    assert_same(ref, fast)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(DATA, "*.stream.jsonl"))),
                         ids=lambda p: os.path.basename(p).split(".")[0])
def test_recorded_scenarios_give_the_same_result(path, monkeypatch):
    out = []
    for c in (False, True):
        monkeypatch.setattr(ShadowMmu, "c_fast_path", c)
        r = replay.run_stream(path)
        out.append((r.lines, r.stats, state(r.vm)))
    assert out[0][0] == out[1][0]
    assert out[0][1] == out[1][1]
    assert out[0][2] == out[1][2]


def test_write_flooding_count_lives_in_the_header_while_the_page_does():
    vm, v, g, gvas, leaves = guest("long")
    v.kvm_mmu_page_fault(gvas[0], U_)
    sm = vm.mmu_backend
    sp = sm.shadow_walk(v, gvas[0])[1][0]                     # the level-3 page
    core = sm._fastcore()
    sp.write_flooding_count = 2
    assert core.write_flooding_count(sp.sp) == 2 == sp.write_flooding_count
    # the C path declines a walk through a page with a flooding count: the
    # Python path resets it, and C takes the next fault
    v.kvm_mmu_page_fault(gvas[1], U_)
    assert sp.write_flooding_count == 0 == core.write_flooding_count(sp.sp)
    with pytest.raises(ValueError, match="not a live shadow page"):
        core.write_flooding_count(0)


# ---------------------------------------------------------------------------
# the batch path
# ---------------------------------------------------------------------------

def big_guest(gib_frac=64, accessed=False):
    """A ring-3 long-mode guest mapping `gib_frac` MiB of 4K user pages
    through its own tables (tables below 16 MiB); new shadow pages needed."""
    vm = VM("shadow")
    size = gib_frac * MiB
    vm.add_memory(0, 16 * MiB + size, slot=0, thp=False)
    gpt = GuestPageTables(vm, 0, 16 * MiB // 4096)
    gpt.map(0, 16 * MiB, size, accessed=accessed)
    v = vm.vcpus[0]
    gpt.enter_long_mode(v)
    v.vcpu_enter_guest()
    return vm, v


@pytest.mark.parametrize("accessed", [False, True])
def test_batch_gives_the_scalar_events_stats_and_state(accessed, monkeypatch):
    rng = np.random.default_rng(5)
    n = 64 * 256
    gvas = (rng.permutation(n).astype(np.uint64) << np.uint64(12))[:6000]
    gvas = np.concatenate([gvas, gvas[:300], np.array([1 << 40], np.uint64)])   # spurious, guest #PF
    ecs = rng.choice(np.array([U_, U_ | W_, U_ | F_, U_ | P_ | W_], np.uint64), gvas.size)
    out = []
    for batch in (False, True):
        with tp.capture(capacity=1 << 22) as ring:
            vm, v = big_guest(accessed=accessed)
            if batch:
                rets = vm.mmu_backend.page_fault_batch(v, gvas, ecs)
            else:
                rets = np.array([v.kvm_mmu_page_fault(int(g), int(e)) for g, e in zip(gvas, ecs)],
                                np.int32)
        assert vm.audit() == []
        out.append((ring.lines(), state(vm), rets.tolist()))
    assert out[0][2] == out[1][2]
    assert_same(out[0], out[1])


def test_batch_takes_one_error_code_or_an_array_and_checks_first():
    vm, v = big_guest(gib_frac=4)
    sm = vm.mmu_backend
    before = state(vm)
    with pytest.raises(TypeError):
        sm.page_fault_batch(v, [0x1000], U_)
    with pytest.raises(TypeError):
        sm.page_fault_batch(v, np.array([0x1000], np.int64), U_)
    with pytest.raises(ValueError, match="error_code"):
        sm.page_fault_batch(v, np.array([0x1000, 0x2000], np.uint64), np.array([U_], np.uint64))
    with pytest.raises(ValueError, match="error_code"):
        sm.page_fault_batch(v, np.array([0x1000], np.uint64), 1 << 20)
    with pytest.raises(Exception, match="canonical"):
        sm.page_fault_batch(v, np.array([0x1000, 1 << 63], np.uint64), U_)
    # the scalar entry's rule: bits 7-14 never come with a #PF (only 0-6 and 15)
    for ec in (U_ | 1 << 7, U_ | 1 << 14):
        with pytest.raises(ValueError, match="error_code"):
            v.kvm_mmu_page_fault(0x1000, ec)
        with pytest.raises(ValueError, match="error_code"):
            sm.page_fault_batch(v, np.array([0x1000, 0x2000], np.uint64),
                                np.array([U_, ec], np.uint64))
    assert state(vm) == before
    r = sm.page_fault_batch(v, np.array([0x1000, 0x2000], np.uint64), U_)
    assert r.tolist() == [RET_PF_FIXED, RET_PF_FIXED] and r.dtype == np.int32
    assert sm.page_fault_batch(v, np.array([], np.uint64), U_).shape == (0,)


# ---------------------------------------------------------------------------
# hostile input (subprocesses: a crash is a failure)
# ---------------------------------------------------------------------------

def test_hostile_inputs_to_the_c_entry_points_never_crash():
    code = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n" + r'''
import numpy as np
from kvmmmu._core.shadow_fault import ShadowFastCore, DECLINE
from kvmmmu._core.pt_arena import PtArena
from test_shadow_fast_path import big_guest, guest
from kvmmmu._core.guest_walk import PFERR_USER_MASK as U_
vm, v = big_guest(gib_frac=4)
sm = vm.mmu_backend
core = sm._fastcore()
for bad in (0, 1, 2**40, 2**64 - 1, -1, 10**30):
    for fn in (core.write_flooding_count, lambda s: core.set_write_flooding_count(s, 1)):
        try:
            fn(bad)
        except (ValueError, OverflowError, TypeError):
            pass
class F:
    pass
root = v.mmu_root.sp
for root_sp, lvl in ((0, 4), (root.sp, 9), (root.sp, 0), (2**63, 4), (root.sp + 10**6, 4),
                     (root.sp, 3), (root.sp, 4)):
    f = F()
    f.slot = vm.memslots[0].id_to_memslot(0)
    for addr, gfn, pfn in ((0, 0, 0), (2**64 - 1, 2**52, 2**39), (1 << 47, 5, 7)):
        f.addr, f.gfn, f.pfn, f.write, f.prefetch, f.map_writable = addr, gfn, pfn, True, False, True
        try:
            r = core.fetch(sm, v, f, 7, root_sp, lvl)
        except (ValueError, OverflowError, TypeError):
            pass
# a walker whose gPTE addresses point anywhere
class G:
    level = 1
    ptes = (0, 2**64 - 1, 5, 7, 0)
    pte_gpa = (2**64 - 8, 0, 2**52, 1 << 40, 3)
    table_gfn = (0, 1, 2, 3, 4)
f = F()
f.slot = vm.memslots[0].id_to_memslot(0)
f.addr, f.gfn, f.pfn, f.write, f.prefetch, f.map_writable = 0x1000, 5000, 9, False, False, True
from kvmmmu.paging import reset_guest_rsvds_bits_mask
m = sm._ctx(v)
rsvd = sm._rsvd(v, m)
for top in (1, 2, 4, 5, 0, 7):
    for size in (4, 8, 3):
        try:
            core.fetch(sm, v, f, 7, root.sp, 4, G(), top, size, rsvd)
        except (ValueError, OverflowError, TypeError):
            pass
# batches of hostile addresses and error codes
for gv in (np.array([2**64 - 1, 0, 1 << 47], np.uint64), np.arange(0, 1 << 24, 4097, dtype=np.uint64)):
    for ec in (0, U_, 0xFFFF, np.full(gv.size, 0xFFFF, np.uint64)):
        try:
            sm.page_fault_batch(v, gv, ec)
        except Exception:
            pass
assert vm.audit() == [], vm.audit()
print("ok")
'''
    r = assert_no_crash(code, timeout=300, allow_raise=False)
    assert "ok" in r.stdout


def test_batch_on_a_direct_vcpu_checks_every_fault_before_the_first():
    """mmu='tdp': the batch takes each fault through the scalar entry, but
    checks all of them first with the entry's own rule (a gpa of 52 bits
    or more never arrives): bad input raises and nothing is counted."""
    vm = VM("tdp")
    vm.add_memory(0, 4 * MiB, slot=0, populate=True)
    v = vm.vcpus[0]
    v.vcpu_enter_guest()
    sm = vm.mmu_backend
    with pytest.raises(ValueError, match="cr2_or_gpa"):
        sm.page_fault_batch(v, np.array([0x1000, 1 << 52], np.uint64), W)
    assert v.stat.pf_taken == 0
    assert sm.page_fault_batch(v, np.array([0x1000, 0x2000], np.uint64), W).tolist() == \
        [RET_PF_FIXED, RET_PF_FIXED]
    assert v.stat.pf_taken == 2 and vm.audit() == []


def _dirty_gfns(vm):
    bm = vm.get_dirty_log(0)
    return set(np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little")).tolist())


@pytest.mark.parametrize("how", ["scalar", "batch"])
def test_the_fault_walks_a_d_write_back_dirties_the_guest_tables(how):
    """FNAME(update_accessed_dirty_bits) marks each table whose entry got
    A/D dirty (kvm_vcpu_mark_page_dirty): with dirty logging on, the first
    read fault through tables without A bits logs the 4 table pages on its
    path (the data page: a read maps it read-only, so it is not logged);
    the batch logs exactly what the scalar path logs."""
    import _shadow_oracle as O
    vm = VM("shadow")
    slot = vm.add_memory(0, 8 * MiB, slot=0, populate=True)
    gpt = GuestPageTables(vm, 0, 256)
    gpt.map(0, 4 * MiB, 2 * MiB)                       # no A bits anywhere
    v = vm.vcpus[0]
    gpt.enter_long_mode(v)
    v.vcpu_enter_guest()
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 8 * MiB, slot.userspace_addr)
    vm.get_dirty_log(0)
    gva = 0x3000
    # the independent expectation: the tables the SDM walk goes through
    walk = O.walk_guest(O.memory_reader(vm), gva, O.GuestRegs.of_vcpu(v))
    tables = {t for t in walk.tables}
    assert len(tables) == 4
    if how == "scalar":
        assert v.kvm_mmu_page_fault(gva, U_) == RET_PF_FIXED
    else:
        assert vm.mmu_backend.page_fault_batch(v, np.array([gva], np.uint64), U_).tolist() == \
            [RET_PF_FIXED]
    assert _dirty_gfns(vm) == tables
    assert vm.mmu_backend.page_fault_batch(v, np.array([gva + 0x1000], np.uint64), U_).tolist() \
        == [RET_PF_FIXED]
    assert _dirty_gfns(vm) == {walk.tables[-1]}        # only the leaf table's new A bit
