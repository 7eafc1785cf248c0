"""Hostile probes of kvmmmu._core.rmap, each in a subprocess (tests/_probe.py):
a crash is a test failure; bad input must raise a specific exception."""
import pytest

from _probe import assert_raises_in_child, assert_no_crash

SETUP = """
import numpy as np
from kvmmmu._core import rmap as R
pool = R.PteListDescPool()
slot = R.RmapSlot(0, 64, pool)
cache = R.PteListDescCache(pool)
cache.topup()
"""


def test_add_batch_out_overlapping_gfns_is_refused():
    assert_raises_in_child(SETUP + """
g = np.zeros(8, dtype=np.uint64)
s = np.arange(8, dtype=np.uint64) * 8 + 8
R.rmap_add_batch(cache, slot, g, s, out=g.view(np.uint32)[:8])
""", ValueError, match="out overlaps")


def test_audit_none_is_type_error():
    assert_raises_in_child(SETUP + "R.audit(None)\n", TypeError, match="audit")


def test_rmap_head_new_is_an_empty_word():
    assert_no_crash(SETUP + """
h = R.RmapHead.__new__(R.RmapHead)
assert h.val == 0 and len(h) == 0 and list(h) == []
""")


def test_remove_float_sptep_is_type_error_and_changes_nothing():
    assert_no_crash(SETUP + """
R.rmap_add(cache, slot, 1, 8)
try:
    R.rmap_remove(slot, 1, 8.9)
except TypeError as e:
    assert "sptep" in str(e)
else:
    raise AssertionError("float sptep accepted")
assert R.rmap_count(slot, 1) == 1
""")


@pytest.mark.parametrize("call", [
    "R.rmap_add_batch(cache, slot, np.zeros(1, np.uint64), np.array([8], np.uint64), level=1.5)",
    "R.rmap_remove_batch(slot, np.zeros(1, np.uint64), np.array([8], np.uint64), level=1.0)",
    "R.rmap_count_batch(slot, np.zeros(1, np.uint64), level=2.0)",
    "R.rmap_count_all(slot, level=1.0)",
])
def test_batch_level_float_is_type_error(call):
    assert_raises_in_child(SETUP + call + "\n", TypeError, match="level")


def test_batch_level_out_of_range_is_refused():
    assert_raises_in_child(SETUP + "R.rmap_count_all(slot, level=2**40)\n",
                           ValueError, match="level")


def test_iterator_detects_remove_then_add():
    # remove + add restores the head word and the descriptor count; the pool
    # generation still tells the iterator the list changed.
    assert_raises_in_child(SETUP + """
R.rmap_add(cache, slot, 1, 8); R.rmap_add(cache, slot, 1, 16)
h = R.gfn_to_rmap(1, 1, slot)
it = iter(h); next(it)
R.rmap_remove(slot, 1, 16); R.rmap_add(cache, slot, 1, 24)
list(it)
""", RuntimeError, match="changed during iteration")


def test_iterator_detects_batch_modification():
    assert_raises_in_child(SETUP + """
R.rmap_add(cache, slot, 1, 8); R.rmap_add(cache, slot, 1, 16)
h = R.gfn_to_rmap(1, 1, slot)
it = iter(h); next(it)
R.rmap_remove_batch(slot, np.array([1], np.uint64), np.array([16], np.uint64))
R.rmap_add_batch(cache, slot, np.array([1], np.uint64), np.array([24], np.uint64))
list(it)
""", RuntimeError, match="changed during iteration")


def test_iterator_unmodified_yields_all():
    assert_no_crash(SETUP + """
for k in range(1, 6):
    R.rmap_add(cache, slot, 3, 8 * k)
assert sorted(R.gfn_to_rmap(3, 1, slot)) == [8, 16, 24, 32, 40]
""")


@pytest.mark.parametrize("call", ["add", "remove", "count"])
def test_batch_inputs_rewritten_by_another_thread(call):
    # Another thread keeps rewriting the gfns with values far outside the slot
    # while the nogil loop runs: the loop re-checks each element it loads, so
    # the call either completes, refuses before any change (validation saw
    # the bad value) or stops at the changed element (RmapInputChangedError,
    # `done` elements applied); never an access outside the heads.
    r = assert_no_crash(SETUP + f"""
import threading
from kvmmmu.errors import ConcurrentUseError
n = 1 << 20
pool = R.PteListDescPool(); cache = R.PteListDescCache(pool)
slot = R.RmapSlot(0, n, pool)
g = np.arange(n, dtype=np.uint64)
s = (np.arange(n, dtype=np.uint64) + 1) * 8
seen = set()
for attempt in range(6):
    if {call!r} != "add":
        R.rmap_add_batch(cache, slot, g, s)
    stop = []
    def writer():
        while not stop:
            g[n // 2:] = np.uint64(1 << 60)
            g[n // 2:] = np.arange(n // 2, n, dtype=np.uint64)
    t = threading.Thread(target=writer); t.start()
    try:
        if {call!r} == "add":
            R.rmap_add_batch(cache, slot, g, s)
        elif {call!r} == "remove":
            R.rmap_remove_batch(slot, g, s)
        else:
            R.rmap_count_batch(slot, g)
        done = n if {call!r} != "count" else 0
        seen.add("ok")
    except R.GfnOutOfSlotError:
        done = 0
        seen.add("refused")
    except R.RmapInputChangedError as e:
        assert isinstance(e, ConcurrentUseError)
        assert 0 <= e.done < n
        done = e.done if {call!r} != "count" else 0
        seen.add("changed")
    finally:
        stop.append(1); t.join()
    g[:] = np.arange(n, dtype=np.uint64)
    total = int(R.rmap_count_all(slot).sum())
    if {call!r} == "add":
        assert total == done, (total, done)
    elif {call!r} == "remove":
        assert total == n - done, (total, done)
    R.audit(slot)
    R.rmap_remove_batch(slot, g[R.rmap_count_all(slot) == 1], s[R.rmap_count_all(slot) == 1])
print("OUTCOMES", sorted(seen))
""", timeout=300, allow_raise=False)
    assert "OUTCOMES" in r.stdout


@pytest.mark.parametrize("call, name", [
    ("R.rmap_add(cache, slot, 1.0, 8)", "gfn"),
    ("R.rmap_count(slot, 1, level=1.0)", "level"),
    ("R.gfn_to_rmap(2.5, 1, slot)", "gfn"),
    ("slot.index_to_gfn(1.0)", "index"),
    ("T.debug_store_head(R.gfn_to_rmap(1, 1, slot), 8.0)", "value"),
    ("T.debug_poke_desc(R.gfn_to_rmap(1, 1, slot), 0.0, 'sptes', 8)", "k"),
    ("T.concurrent_writer(cache, R.ParentPtes(pool), 0x1000, 4.0, 1)", "n"),
    ("T.LockStress(pool).run_writer(cache, 1.5)", "iters"),
])
def test_scalar_float_is_type_error(call, name):
    assert_raises_in_child(SETUP + "from kvmmmu._core import rmap_torture as T\n" + call + "\n",
                           TypeError, match=name)
