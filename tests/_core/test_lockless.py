"""The lockless protocols on real OS threads (kvmmmu._core.lockless_torture).

Each torture runs its threads' C loops inside ``with nogil:`` and pins them
to different CPUs, so reader and writer (walker and zapper) really overlap.
Each protected run has a broken twin (naive two-half read; freeing without
the flush or the grace period) that must be caught, which shows that the
harness can fail.  If this machine cannot make the broken twin fail, the test
is skipped and says how many tries it made.
"""
import os

import pytest

from kvmmmu._core.lockless_torture import lockless_walk_torture, spte_torture
from kvmmmu._core.pt_arena import PtArena
from kvmmmu._core.spte import SpteFormat

N_READS = 10_000_000            # per run; the benchmark script does 1e8
BROKEN_BUDGET = 200_000_000     # reads (or walks x 100) before giving up on the broken twin

# With one CPU the threads only interleave at preemption points, so "ran
# alongside" can only be asked as "ran at all".
TWO_CPUS = len(os.sched_getaffinity(0)) >= 2 if hasattr(os, "sched_getaffinity") else False

FORMATS = {
    "legacy32": lambda: SpteFormat.legacy(host_64bit=False),
    "ept32": lambda: SpteFormat.ept(host_64bit=False),   # MMU-writable lives in the high half
    "legacy64": lambda: SpteFormat.legacy(),
    "ept64": lambda: SpteFormat.ept(),
}


@pytest.mark.parametrize("n_sptes", [1, 4])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_lockless_read_never_tears(fmt, n_sptes):
    a = PtArena(FORMATS[fmt]())
    r = spte_torture(a, N_READS, n_sptes=n_sptes, n_tables=min(2, n_sptes))
    assert r["reads"] >= 10_000_000
    assert r["torn"] == 0, f"torn value {r['first_torn']:#x}"
    assert r["writes"] > (100 if TWO_CPUS else 0), "the writer did not run alongside the reader"
    assert r["writer_errors"] == 0                  # clear_track_bits returned what was written
    assert r["page_stats_drift"] == 0
    if a.host_64bit:
        assert r["retries"] == 0 and r["nonpresent_mixes"] == 0
    a.audit()


def test_naive_two_half_read_tears():
    a = PtArena(SpteFormat.legacy(host_64bit=False))
    tried = torn = 0
    while tried < BROKEN_BUDGET and not torn:
        r = spte_torture(a, N_READS, read="naive", n_sptes=1, n_tables=1)
        assert r["writer_errors"] == 0
        tried += r["reads"]
        torn += r["torn"]
    if not torn:
        pytest.skip(f"the naive two-half read did not tear in {tried} reads on this machine")
    assert torn > 0
    a.audit()


@pytest.mark.parametrize("fmt, scheme", [("legacy32", "shadow"), ("legacy64", "shadow"),
                                         ("ept64", "shadow"), ("ept64", "tdp")])
def test_walker_never_sees_a_freed_table(fmt, scheme):
    a = PtArena(FORMATS[fmt](), nr_vcpus=2)
    r = lockless_walk_torture(a, 300_000, scheme=scheme)
    assert r["walks"] == 300_000
    assert r["uaf"] == 0 and r["wild"] == 0 and r["alloc_failures"] == 0
    assert r["zaps"] > (10 if TWO_CPUS else 0), "the zapper did not run alongside the walker"
    if scheme == "shadow":
        assert r["flush_ipis_waited"] > 0            # commit_zap waited for the walk
    else:
        assert r["rcu_gps"] > 0 and r["flush_ipis_waited"] == 0
    a.audit()


@pytest.mark.parametrize("fmt, scheme", [("legacy32", "shadow"), ("ept64", "tdp")])
def test_freeing_without_the_protocol_is_caught(fmt, scheme):
    a = PtArena(FORMATS[fmt](), nr_vcpus=2)
    walks = uaf = 0
    while walks < BROKEN_BUDGET // 100 and not uaf:
        r = lockless_walk_torture(a, 300_000, scheme=scheme, protect=False)
        walks += r["walks"]
        uaf += r["uaf"]
    if not uaf:
        pytest.skip(f"no use after free observed in {walks} unprotected walks on this machine")
    assert uaf > 0
    a.audit()
