"""Hardening of the guest walker (issue 10): misuse and threads through
kvmmmu.paging and kvmmmu._core.guest_walk.  Anything that could crash runs in
a subprocess (tests/_probe.py), so a crash is a failure, not a dead run."""
import pickle

import numpy as np
import pytest

from _probe import assert_no_crash, assert_raises_in_child
from kvmmmu import paging as P
from kvmmmu._core import guest_walk as GW

PR, RW, US = 1, 2, 4

SETUP = """
import threading, time
import numpy as np
from kvmmmu import paging as P
ram = np.zeros(4 << 20, np.uint8)
q = ram.view(np.uint64)
q[0x1000 // 8] = 0x2000 | 7
q[0x2000 // 8] = 0x3000 | 7
q[0x3000 // 8 + 2] = 0x4000 | 7
for i in range(512):
    q[0x4000 // 8 + i] = (0x100000 + i * 0x1000) | 7
mem = P.GuestMemory(ram)
mmu = P.GuestMmu(mem, P.CpuState.long_mode(cr3=0x1000), P.GuestCpuModel(maxphyaddr=46))
gvas = (np.uint64(0x400000) + np.uint64(0x1000) * np.arange(1 << 21, dtype=np.uint64) % np.uint64(512))
"""


def _walkable():
    ram = np.zeros(4 << 20, np.uint8)
    q = ram.view(np.uint64)
    q[0x1000 // 8] = 0x2000 | PR | RW | US
    q[0x2000 // 8] = 0x3000 | PR | RW | US
    q[0x3000 // 8 + 2] = 0x4000 | PR | RW | US
    for i in range(512):
        q[0x4000 // 8 + i] = (0x100000 + i * 0x1000) | PR | RW | US
    mem = P.GuestMemory(ram)
    return ram, mem, P.GuestMmu(mem, P.CpuState.long_mode(cr3=0x1000), P.GuestCpuModel(maxphyaddr=46))


# --- results built once, from C ----------------------------------------------

def test_walk_results_are_the_core_types_and_immutable():
    _, _, mmu = _walkable()
    w = mmu.walk_addr(0x400123, P.PFERR_WRITE_MASK)
    assert type(w) is P.GuestWalker is GW.GuestWalker
    assert w.ok and w.gpa == 0x100123 and w.level == 1 and w.max_level == 4
    assert w.ptes[0] & 0x60 == 0x60 and len(w.table_gfn) == len(w.pte_gpa) == 5
    with pytest.raises(AttributeError):
        w.gfn = 0
    with pytest.raises(AttributeError):
        w.fault = None
    f = mmu.walk_addr(0x7ff000, 0).fault
    assert type(f) is P.PageFault and f == P.PageFault(0, 0x7ff000) and hash(f) == hash(P.PageFault(0, 0x7ff000))
    assert pickle.loads(pickle.dumps(f)) == f
    with pytest.raises(AttributeError):
        f.address = 1
    # the same walk twice gives equal records
    assert mmu.walk_addr(0x400123, 0) == mmu.walk_addr(0x400123, 0)


@pytest.mark.parametrize("args, name", [
    ((-1, 0), "error_code"), ((1 << 64, 0), "error_code"), ((1.5, 0), "error_code"),
    (("1", 0), "error_code"), ((0, 1 << 64), "address"), ((0, -4096), "address"),
    ((0, 0, True, -1), "exit_qualification"), ((0, 0, "yes"), "nested_page_fault"),
])
def test_page_fault_refuses_bad_fields(args, name):
    with pytest.raises((TypeError, ValueError), match=name):
        P.PageFault(*args)


@pytest.mark.parametrize("gva", [1 << 64, -1, 1.0, "0x1000", None])
def test_walk_addr_bad_gva_is_a_specific_error(gva):
    _, _, mmu = _walkable()
    with pytest.raises(P.AccessError, match="gva"):
        mmu.walk_addr(gva, 0)


@pytest.mark.parametrize("acc", [1 << 64, -1, 2.0, P.PFERR_RSVD_MASK])
def test_walk_addr_bad_access_is_a_specific_error(acc):
    _, _, mmu = _walkable()
    with pytest.raises(P.AccessError, match="access"):
        mmu.walk_addr(0x400000, acc)


def test_walk_addr_takes_numpy_integers_through_the_checked_path():
    _, _, mmu = _walkable()
    assert mmu.walk_addr(np.uint64(0x400123), np.int64(0)).gpa == 0x100123


def test_walk_addr_32bit_limit_outside_long_mode():
    ram = np.zeros(1 << 20, np.uint8)
    mmu = P.GuestMmu(P.GuestMemory(ram), P.CpuState.nonpaging(), P.GuestCpuModel())
    assert mmu.walk_addr(0xffffffff, 0).gpa == 0xffffffff
    with pytest.raises(P.AccessError, match="gva"):
        mmu.walk_addr(1 << 32, 0)


# --- load_pdptrs -------------------------------------------------------------

@pytest.mark.parametrize("cr3, exc", [
    (1 << 64, P.PdptrLoadError), (-1, P.PdptrLoadError), (4096.0, TypeError), (True, TypeError),
    ("4096", TypeError),
])
def test_load_pdptrs_bad_cr3(cr3, exc):
    _, mem, _ = _walkable()
    with pytest.raises(exc, match="cr3"):
        P.load_pdptrs(mem, cr3, P.GuestCpuModel())


def test_load_pdptrs_bad_objects():
    _, mem, _ = _walkable()
    with pytest.raises(TypeError, match="memory"):
        P.load_pdptrs(None, 0x1000, P.GuestCpuModel())
    with pytest.raises(TypeError, match="model"):
        P.load_pdptrs(mem, 0x1000, None)
    with pytest.raises(TypeError, match="nested"):
        P.load_pdptrs(mem, 0x1000, P.GuestCpuModel(), nested=object())
    assert P.load_pdptrs(mem, np.uint64(0x5000), P.GuestCpuModel()) == (0, 0, 0, 0)


# --- batch input -------------------------------------------------------------

def test_walk_array_refuses_out_overlapping_gvas_and_changes_nothing():
    ram, _, mmu = _walkable()
    before = ram.copy()
    buf = np.zeros(64 * 3, np.uint64)
    gvas = buf[:8]
    gvas[:] = 0x400000
    out = buf.view(np.uint8)[:8 * P.WALK_DTYPE.itemsize].view(P.WALK_DTYPE)
    with pytest.raises(ValueError, match="overlaps"):
        mmu.walk_array(gvas, 0, out=out)
    assert (ram == before).all()


@pytest.mark.parametrize("gvas", [np.zeros(4, np.float64), np.zeros(4, np.int64), [0x400000],
                                  np.zeros((2, 2), np.uint64)])
def test_walk_array_refuses_bad_arrays(gvas):
    _, _, mmu = _walkable()
    with pytest.raises((TypeError, ValueError)):
        mmu.walk_array(gvas, 0)


# --- re-initialised / half-built contexts (subprocess) ----------------------

def test_reinit_with_bad_argument_keeps_the_context_walking():
    assert_no_crash(SETUP + """
ctx = mmu._ctx
perms = list(mmu.permissions)
try:
    ctx.__init__(mem, 64, 4, 0x1000, (0, 0, 0, 0), True, True, False, False, False, True,
                 0, 0, perms[:15] + [256], mmu.guest_rsvd_check, None)
except ValueError as e:
    assert "permissions" in str(e)
else:
    raise AssertionError("accepted")
del mem, ram
import gc; gc.collect()
assert mmu.walk_addr(0x400123, 0).gpa == 0x100123
""", allow_raise=False)


def test_half_built_context_refuses_to_walk_in_every_entry():
    assert_raises_in_child("""
import numpy as np
from kvmmmu._core.guest_walk import WalkContext
c = WalkContext.__new__(WalkContext)
c.walk_array(np.zeros(4, np.uint64), 0)
""", "ObjectInitError", "not initialised")
    assert_raises_in_child("""
from kvmmmu._core.guest_walk import WalkContext
WalkContext.__new__(WalkContext).walk_fast(0x1000, 0, 1 << 32)
""", "ObjectInitError", "not initialised")


def test_reinit_on_another_memory_during_a_walk_keeps_the_old_memory_alive():
    assert_no_crash(SETUP + """
ctx = mmu._ctx
other = P.GuestMemory(np.zeros(1 << 20, np.uint8))
args = (64, 4, 0x1000, (0, 0, 0, 0), True, True, False, False, False, True, 0, 0,
        list(mmu.permissions), mmu.guest_rsvd_check, None)
out = np.empty(gvas.size, P.WALK_DTYPE)
t = threading.Thread(target=lambda: ctx.walk_array(gvas, 0, out))
t.start()
time.sleep(0.02)
ctx.__init__(other, *args)          # the running walk keeps its memory pinned
del mem, ram, mmu
import gc; gc.collect()
t.join()
assert (out["gpa"] == (gvas - np.uint64(0x400000) + np.uint64(0x100000))).all()
""", allow_raise=False)


# --- GuestMemory.add_slot under a concurrent walk (subprocess) ---------------

def test_add_slot_is_refused_while_a_walk_runs_in_another_thread():
    r = assert_no_crash(SETUP + """
out = np.empty(gvas.size, P.WALK_DTYPE)
t = threading.Thread(target=lambda: mmu.walk_array(gvas, 0, out))
t.start()
time.sleep(0.02)
refused = added = 0
base = 0x10000000
while t.is_alive():
    try:
        mem.add_slot(base, bytearray(4096))
        added += 1
        base += 0x1000
    except P.GuestMemoryError as e:
        assert "walk" in str(e), e
        refused += 1
t.join()
assert (out["gpa"] == (gvas - np.uint64(0x400000) + np.uint64(0x100000))).all()
mem.add_slot(0x20000000, bytearray(4096))          # accepted again afterwards
assert len(mem.slots) == 2 + added
print("refused", refused, "added", added)
""", allow_raise=False)
    assert "refused" in r.stdout


def test_add_slot_walker_count_returns_to_zero_after_a_failed_walk():
    _, mem, mmu = _walkable()
    with pytest.raises(P.AccessError):
        mmu.walk_addr(-1, 0)
    mmu.walk_addr(0x7ff000, 0)            # a fault
    mmu.walk_array(np.zeros(0, np.uint64), 0)
    mem.add_slot(0x10000000, bytearray(4096))
    assert mem.slots[-1] == (0x10000000, 4096, False)


def test_a_trace_sink_may_add_a_slot():
    from kvmmmu import mmutrace as tp
    _, mem, mmu = _walkable()
    added = []

    def sink(rec):
        if not added:
            mem.add_slot(0x10000000, bytearray(4096))
            added.append(rec.event)

    tp.enable("kvm_mmu_pagetable_walk")
    tp.subscribe(sink)
    try:
        assert mmu.walk_addr(0x400000, 0).ok
    finally:
        tp.unsubscribe(sink)
        tp.disable("kvm_mmu_pagetable_walk")
    assert added == ["kvm_mmu_pagetable_walk"] and len(mem.slots) == 2
