"""Hostile use of the public API, each probe in a fresh interpreter
(tests/_probe.py): no signal, no hang, a specific exception, and the object's
audit / snapshot unchanged afterwards.  One entry per class of misuse that
issue 10 names; the probes state the bug they guard against."""
import pytest

from _probe import assert_no_crash, assert_raises_in_child

RMAP_SETUP = """
import numpy as np
from kvmmmu._core import rmap as R
pool = R.PteListDescPool(); cache = R.PteListDescCache(pool); cache.topup(40)
slot = R.RmapSlot(0, 1024, pool)
g = np.arange(16, dtype=np.uint64); s = (np.arange(16, dtype=np.uint64) + 1) * 8 + (1 << 40)
R.rmap_add_batch(cache, slot, g, s)
before = slot.snapshot()
"""
ARENA_SETUP = """
from kvmmmu._core.pt_arena import PtArena, MmuMemoryCache
from kvmmmu._core.spte import SpteFormat
a = PtArena(SpteFormat.legacy(), nr_vcpus=2)
pc = MmuMemoryCache(a, "shadow_page"); hc = MmuMemoryCache(a, "page_header")
pc.topup(5); hc.topup(5)
sp = a.alloc_sp(pc, hc, role=1, gfn=0x10)
a.audit()
"""
UNCHANGED_RMAP = "\nassert slot.snapshot() == before; R.audit(slot)\n"

# name: (code that must raise, exception class name, text in the message)
RAISES = {
    # checked once, trusted later: out= overlapping an input of a nogil loop
    "rmap_add_batch out= overlapping gfns": (RMAP_SETUP + """
gg = g + np.uint64(100)
try:
    R.rmap_add_batch(cache, slot, gg, s + np.uint64(1 << 20), out=gg.view(np.uint32)[:16])
finally:
""" + "    assert slot.snapshot() == before; R.audit(slot)\n", "ValueError", "overlaps"),
    "spte batch out= overlapping its input": ("""
import numpy as np
from kvmmmu._core.spte import SpteFormat
f = SpteFormat.legacy(); s = np.arange(8, dtype=np.uint64)
f.spte_to_pfn_array(s, out=s)
""", "ValueError", "overlaps"),
    # missing type / NULL guards
    "rmap.audit(None)": ("from kvmmmu._core import rmap as R; R.audit(None)", "TypeError", "RmapSlot"),
    "half-built WalkContext": ("""
from kvmmmu._core.guest_walk import WalkContext
WalkContext.__new__(WalkContext).walk(0x1000, 0)
""", "ObjectInitError", "not initialised"),
    # writable views behind the checks
    "rmap head array flipped writable": (RMAP_SETUP + """
try:
    slot.rmap[0].setflags(write=True)
finally:
""" + "    assert slot.snapshot() == before\n", "ValueError", "WRITEABLE"),
    "sp_header flipped writable": (ARENA_SETUP + """
h = a.sp_header(sp)
try:
    h.setflags(write=True)
finally:
    a.audit()
""", "ValueError", "WRITEABLE"),
    "chunk_headers written": (ARENA_SETUP + "a.chunk_headers(0)[0]['spt'] = 1\n", "ValueError", "read-only"),
    # floats are not integers
    "rmap_remove with a float gfn": (RMAP_SETUP + """
try:
    R.rmap_remove(slot, 8.9, int(s[8]))
finally:
""" + "    assert slot.snapshot() == before\n", "TypeError", "gfn must be an integer"),
    # size arithmetic
    "start_access_log(2**62)": (ARENA_SETUP + "a.start_access_log(capacity=2**62)\n",
                                "ValueError", "capacity"),
    "grow(2**64 - 1) after one chunk": (ARENA_SETUP + """
n = a.n_chunks
try:
    a.grow(2**64 - 1)
finally:
    assert a.n_chunks == n; a.audit()
""", "KvmNoMemoryError", "full"),
    # silent corruption through negative indices
    "clear_dirty_log(first_page=-64)": ("""
import numpy as np
from kvmmmu.vm import VM
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES
vm = VM("tdp"); vm.enable_manual_dirty_log_protect(1)
vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 21, 0x7f0000000000)
snap = vm.snapshot()
try:
    vm.clear_dirty_log(0, -64, 64, np.ones(1, np.uint64))
finally:
    assert vm.snapshot() == snap and vm.audit(raise_=False) == []
""", "ValueError", "first_page"),
    # a hang Ctrl-C cannot break
    "flush after the walker thread died": (ARENA_SETUP + """
import threading
t = threading.Thread(target=lambda: a.walk_shadow_page_lockless_begin(1)); t.start(); t.join()
a.kvm_flush_remote_tlbs()
""", "KvmDeadWalkerError", "exited"),
}


@pytest.mark.parametrize("name", sorted(RAISES))
def test_misuse_raises_a_specific_error_and_changes_nothing(name):
    code, exc, match = RAISES[name]
    assert_raises_in_child(code, exc, match=match, timeout=60)


# name: code that must run to its end (no crash, no exception)
SURVIVES = {
    "RmapHead.__new__ without a factory": """
from kvmmmu._core import rmap as R
h = R.RmapHead.__new__(R.RmapHead)
assert h.val == 0 and len(h) == 0 and list(h) == []
""",
    "arena and memory cache in a reference cycle": ARENA_SETUP + """
import gc
c = MmuMemoryCache(a, "shadow_page"); c.topup(10)
cycle = [a, c, pc, hc]; cycle.append(cycle)
del a, c, pc, hc, cycle
gc.collect()
""",
    "memory cache collected before its arena": ARENA_SETUP + """
import gc
cycle = [pc, hc, a]; cycle.append(cycle); del pc, hc, a, cycle
gc.collect()
""",
}


@pytest.mark.parametrize("name", sorted(SURVIVES))
def test_misuse_that_must_not_crash(name):
    assert_no_crash(SURVIVES[name], allow_raise=False, timeout=60)
