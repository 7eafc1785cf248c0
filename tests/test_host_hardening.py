"""Hostile probes against kvmmmu.host and kvmmmu.stats (issue 10).

Every bad call must raise a specific exception naming the argument and leave
the host state exactly as it was: each probe runs in a subprocess (a crash is a
failure), snapshots the mm before the call, and checks after the exception
that the snapshot is unchanged and the audit clean before re-raising.
"""
import threading

import numpy as np
import pytest

from _probe import assert_no_crash, assert_raises_in_child

from kvmmmu.host import HostMm, HostMmError, MmuNotifier, HostPhysMem, HostOutOfMemoryError
from kvmmmu.stats import VcpuStat

PRELUDE = """
import numpy as np
from kvmmmu.host import HostMm, HostPhysMem, MmuNotifier, MmuNotifyEvent
mm = HostMm()
a = mm.mmap(4 << 20, thp=True, populate=True)
b = mm.mmap(1 << 20)
mm.populate(b, 1 << 16, write=False)
mm.mmu_notifier_register(MmuNotifier())
before = mm.snapshot()
def check():
    assert mm.snapshot() == before, "host state changed by a failing call"
    assert mm.audit() == [], mm.audit()
try:
    {call}
finally:
    check()
"""

BAD_CALLS = [
    # (call, exception, text the message must contain)
    ("mm.mmap(4096.0)", "TypeError", "size"),
    ("mm.mmap(np.float64(8192))", "TypeError", "size"),
    ("mm.mmap(0)", "ValueError", "size"),
    ("mm.mmap(-4096)", "ValueError", "size"),
    ("mm.mmap(1 << 64)", "ValueError", "size"),
    ("mm.mmap(4096, hva=2**64 - 4096 + 1)", "ValueError", "hva"),
    ("mm.mmap(np.uint64(2**64 - 4096), hva=np.uint64(8192))", "ValueError", "wraps"),
    ("mm.mmap(8192, hva=2**64 - 4096)", "ValueError", "wraps"),
    ("mm.mmap(4096, hva='0x1000')", "TypeError", "hva"),
    ("mm.munmap(a, np.uint64(2**64 - 4096))", "ValueError", "wraps"),
    ("mm.munmap(a, 4096.0)", "TypeError", "size"),
    ("mm.munmap(-4096, 4096)", "ValueError", "hva"),
    ("mm.populate(b, 1.5e6)", "TypeError", "size"),
    ("mm.populate(np.uint64(b), np.uint64(2**64 - 1))", "ValueError", "wraps"),
    ("mm.mprotect(a, 2**64, False)", "ValueError", "size"),
    ("mm.split_huge_pmd(a, -1)", "ValueError", "size"),
    ("mm.split_huge_pmd(float(a))", "TypeError", "hva"),
    ("mm.migrate_pages(a, np.uint64(2**64 - 1))", "ValueError", "wraps"),
    ("mm.swap_out(a, np.uint64(2**64 - 1))", "ValueError", "wraps"),
    ("mm.swap_out(a, None)", "TypeError", "size"),
    ("mm.memory_failure(float(a))", "TypeError", "hva"),
    ("mm.memory_failure(-1)", "ValueError", "hva"),
    ("mm.collapse_huge_page(a, max_ptes_none=-1)", "ValueError", "max_ptes_none"),
    ("mm.age(a, 2.0)", "TypeError", "size"),
    ("mm.age(a, np.uint64(2**64 - 1))", "ValueError", "wraps"),
    ("mm.test_young(None)", "TypeError", "hva"),
    ("mm.handle_mm_fault(1.0, True)", "TypeError", "hva"),
    ("mm.follow_pte(-1)", "ValueError", "hva"),
    ("mm.host_pfn_mapping_level(2**64)", "ValueError", "hva"),
    ("mm.invalidate_begin(0, 2**64)", "ValueError", "end"),
    ("mm.invalidate_begin(0.0, 4096)", "TypeError", "start"),
    ("mm.invalidate_begin(0, 4096, event=99)", "ValueError", "MmuNotifyEvent"),
    ("mm.invalidate_end(None)", "TypeError", "rng"),
    ("mm.mmu_notifier_register(object())", "TypeError", "sub"),
    ("mm.mmu_notifier_unregister(MmuNotifier())", "ValueError", "sub"),
    ("mm.host_pfn_mapping_level_array([a])", "TypeError", "hvas"),
    ("mm.hva_to_pfn_array(np.array([a], dtype=np.int64))", "TypeError", "hvas"),
    ("mm.phys.alloc_pages(2.0)", "TypeError", "n"),
    ("mm.phys.alloc_huge(9.0)", "TypeError", "order"),
    ("mm.phys.alloc_huge(9, -1)", "ValueError", "count"),
    ("mm.phys.alloc_huge(10)", "ValueError", "order"),
    ("mm.phys.free_huge(9, [1 << 9])", "TypeError", "bases"),
    ("mm.phys.free_huge(7, np.zeros(1, np.uint64))", "ValueError", "order"),
    ("mm.phys.free_pages([5])", "TypeError", "pfns"),
    ("mm.phys.alloc_kernel_pages(-1)", "ValueError", "n"),
]


@pytest.mark.parametrize("call,exc,text", BAD_CALLS, ids=[c for c, _, _ in BAD_CALLS])
def test_bad_call_raises_and_leaves_host_state_unchanged(call, exc, text):
    assert_raises_in_child(PRELUDE.format(call=call), exc, match=text)


def test_numpy_integers_work_all_the_way():
    """np.uint64 / np.int64 sizes and addresses are integers: the host calls
    succeed and the state equals what Python ints give."""
    def run(conv):
        mm = HostMm()
        a = mm.mmap(conv(4 << 20), thp=True)
        mm.populate(conv(a), conv(4 << 20))
        mm.split_huge_pmd(conv(a), conv(2 << 20))
        assert mm.collapse_huge_page(conv(a), max_ptes_none=conv(0))
        mm.age(conv(a), conv(4096))
        mm.test_young(conv(a))
        mm.mprotect(conv(a), conv(4 << 20), False)
        mm.migrate_pages(conv(a), conv(8192))
        mm.swap_out(conv(a + (2 << 20)), conv(8192))
        assert mm.memory_failure(conv(a + (3 << 20)))
        mm.munmap(conv(a), conv(4096))
        assert mm.audit() == []
        return mm.snapshot()
    assert run(int) == run(np.uint64) == run(np.int64)


def test_hostile_snippets_do_not_crash():
    assert_no_crash("""
        import numpy as np
        from kvmmmu.host import HostMm
        mm = HostMm()
        a = mm.mmap(1 << 21, thp=True, populate=True)
        for bad in (np.uint64(2**64 - 1), 2**64 - 1, -1, 2**70, 1.5, None, "x", np.float64(4096)):
            for f in (mm.munmap, mm.populate, mm.swap_out, mm.migrate_pages, mm.age,
                      mm.split_huge_pmd):
                for args in ((a, bad), (bad, 4096)):
                    try:
                        f(*args)
                    except (TypeError, ValueError):
                        pass
        assert mm.audit() == [], mm.audit()
    """, allow_raise=False)


class _Boom(MmuNotifier):
    def __init__(self, on):
        self.on, self.starts, self.ends = on, 0, 0

    def invalidate_range_start(self, mm, rng):
        self.starts += 1
        if self.on == "start":
            raise RuntimeError("backend failed in start")
        return 0

    def invalidate_range_end(self, mm, rng):
        self.ends += 1
        if self.on == "end":
            raise RuntimeError("backend failed in end")


def test_notifier_raising_in_start_leaves_no_invalidation_open():
    mm = HostMm()
    a = mm.mmap(1 << 21, populate=True)
    good, bad = _Boom(None), _Boom("start")
    mm.mmu_notifier_register(good)
    mm.mmu_notifier_register(bad)
    before = mm.snapshot()
    with pytest.raises(RuntimeError, match="start"):
        mm.munmap(a, 4096)
    assert mm.open_invalidations == ()
    assert good.starts == good.ends == 1
    assert mm.snapshot() == before          # no PTE changed, count unchanged
    assert mm.audit() == []


def test_notifier_raising_in_end_still_closes_the_range_for_everyone():
    mm = HostMm()
    a = mm.mmap(1 << 21, populate=True)
    bad, good = _Boom("end"), _Boom(None)
    mm.mmu_notifier_register(bad)
    mm.mmu_notifier_register(good)
    with pytest.raises(RuntimeError, match="end"):
        mm.munmap(a, 4096)
    assert mm.open_invalidations == ()
    assert good.ends == good.starts == 1      # told despite the first one failing
    assert mm.audit() == []
    mm.mmu_notifier_unregister(bad)
    mm.munmap(a + 4096, 4096)                 # the mm is still usable
    assert mm.audit() == []


def test_populate_write_of_a_later_readonly_vma_changes_nothing():
    mm = HostMm()
    a = mm.mmap(1 << 16, hva=0x10_0000_0000)
    mm.mmap(1 << 16, hva=0x10_0001_0000, writable=False)
    before = mm.snapshot()
    with pytest.raises(Exception, match="read-only"):
        mm.populate(a, 1 << 17, write=True)
    assert mm.snapshot() == before


def test_migrate_pages_out_of_memory_gives_back_its_plan():
    mm = HostMm(phys=HostPhysMem(mem_bytes=3 << 21))
    a = mm.mmap(2 << 21, thp=True, hva=0x10_0000_0000, populate=True)
    before = mm.snapshot()
    with pytest.raises(HostOutOfMemoryError):
        mm.migrate_pages(a, 2 << 21)
    assert mm.snapshot() == before
    assert mm.audit() == []


def test_concurrent_use_of_one_mm_is_detected_not_corrupting():
    mm = HostMm()
    a = mm.mmap(1 << 21)
    inside, release, seen = threading.Event(), threading.Event(), []

    class Slow(MmuNotifier):
        def invalidate_range_start(self, mm_, rng):
            inside.set()
            release.wait(10)
            return 0

    mm.populate(a, 1 << 21)
    mm.mmu_notifier_register(Slow())
    t = threading.Thread(target=mm.munmap, args=(a, 4096))
    t.start()
    assert inside.wait(10)
    try:
        mm.populate(a, 4096)
    except RuntimeError as e:
        seen.append(str(e))
    release.set()
    t.join(10)
    assert seen and "another thread" in seen[0]
    assert mm.audit() == []
    mm.populate(a + 8192, 4096)               # usable again once the owner left


def test_reentry_from_a_notifier_on_the_same_thread_is_allowed():
    mm = HostMm()
    a = mm.mmap(1 << 21, populate=True)
    got = []

    class Peek(MmuNotifier):
        def invalidate_range_start(self, mm_, rng):
            got.append(mm_.test_young(rng.start))
            return 0

    mm.mmu_notifier_register(Peek())
    mm.munmap(a, 4096)
    assert got == [True]


@pytest.mark.parametrize("value,exc", [(1.5, TypeError), (-1, ValueError), (2**64, ValueError),
                                       ("3", TypeError)])
def test_stats_counters_take_only_integers_in_range(value, exc):
    st = VcpuStat()
    name = st.names[0]
    before = st.data.copy()
    with pytest.raises(exc, match=name):
        setattr(st, name, value)
    assert (st.data == before).all()
    setattr(st, name, np.uint64(7))
    assert getattr(st, name) == 7


def test_stats_peak_checks_name_and_value():
    st = VcpuStat()
    peak = next((d.name for d in st.descs if d.kind == "peak"), None)
    with pytest.raises(AttributeError, match="nope"):
        st.peak("nope", 1)
    if peak is not None:
        with pytest.raises(TypeError, match="value"):
            st.peak(peak, 2.5)
        st.peak(peak, np.int64(5))
        assert getattr(st, peak) == 5


@pytest.mark.parametrize("args,exc", [((0.0, 4096), TypeError), ((4096, 4096), ValueError),
                                      ((1, 4097), ValueError), ((0, 2**64 + 4096), ValueError)])
def test_vma_refuses_bad_ranges(args, exc):
    from kvmmmu.host import Vma
    with pytest.raises(exc):
        Vma(*args)


def test_host_phys_mem_shared_between_threads_stays_consistent():
    phys = HostPhysMem(mem_bytes=1 << 32)
    mms = [HostMm(phys=phys) for _ in range(4)]
    errors = []

    def work(mm):
        try:
            for _ in range(30):
                a = mm.mmap(1 << 18, populate=True)
                mm.munmap(a, 1 << 18)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(m,)) for m in mms]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    assert phys.nr_allocated == len(mms)            # one zero page each
    free = phys.free_pfn_array()
    assert len(np.unique(free)) == len(free)        # no pfn freed twice
    assert len(free) + phys.nr_allocated == phys.carved
    assert all(not mm.vmas for mm in mms)
