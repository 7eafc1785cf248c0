"""The core's trace-record buffer (kvmmmu._core.trace_buf) and its contract
with kvmmmu.mmutrace: switches, order, the cap and its drop counter, a sink
that raises or traces again, and one buffer per walking thread."""
import threading

import numpy as np
import pytest

from _probe import assert_no_crash
from kvmmmu import mmutrace as tp
from kvmmmu import paging as P
from kvmmmu._core import trace_buf as tb

WALKER_EVENTS = [ev.name for ev in tp.EVENTS[:5]]
PR, RW, US = 1, 2, 4


@pytest.fixture(autouse=True)
def _all_events_off():
    # Record counts below assume no event is on but the ones captured.
    tp.disable_all()
    yield
    tp.disable_all()


def test_ids_are_mmutraces_and_enabled_is_the_same_bytes():
    for name, i in tb.TP_IDS.items():
        assert tp.get_event(name).id == i
    assert tb.NR_TP == tp.NR_EVENTS == len(tb.TP_IDS)
    assert tp.ENABLED is tb.ENABLED
    with tp.capture("kvm_mmu_set_spte"):
        assert tb.ENABLED[tp.kvm_mmu_set_spte.id] == 1
        assert tb.ENABLED.sum() == 1
        assert [ev.enabled for ev in tp.EVENTS] == list(tb.ENABLED.astype(bool))
    assert tb.ENABLED.sum() == 0


def test_enabled_cannot_be_written_or_flipped_writable():
    with pytest.raises(ValueError):
        tb.ENABLED[0] = 1
    with pytest.raises(ValueError):
        tb.ENABLED.setflags(write=True)


def test_a_disabled_event_records_nothing():
    with tp.capture("kvm_mmu_walker_error") as ring:
        assert tb.push_records(tp.kvm_mmu_set_spte.id, [1, 2, 3, 4, 5, 6]) == 0
    assert ring.lines() == []


def test_records_reach_subscribers_in_push_order_with_the_events_fields():
    ev = tp.kvm_mmu_spte_requested            # fields gfn, pfn, level
    with tp.capture(ev.name) as ring:
        tb.push_records(ev.id, [0x10, 0x1234, 1], repeat=3)
    assert ring.lines() == ["kvm_mmu_spte_requested: gfn 10 pfn 1234 level 1"] * 3


def test_the_cap_drops_and_counts_instead_of_growing():
    ev = tp.kvm_mmu_set_dirty_bit
    before = tb.dropped()
    with tp.capture(ev.name, capacity=10) as ring:
        d = tb.push_records(ev.id, [0x1000], repeat=tb.TRACE_BUF_CAP + 7)
    assert d == 7 and tb.dropped() - before == 7
    assert len(ring) == 10 and ring.dropped == tb.TRACE_BUF_CAP - 10   # the ring's own cap


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="event"):
        tb.set_enabled(tb.NR_TP, True)
    with pytest.raises(TypeError, match="event"):
        tb.set_enabled(1.0, True)
    with pytest.raises(TypeError, match="on"):
        tb.set_enabled(0, "yes")
    with pytest.raises(ValueError, match="values"):
        tb.push_records(0, [1] * (tb.TRACE_NR_VALS + 1))
    with pytest.raises(ValueError, match="values"):
        tb.push_records(0, [-1])
    with pytest.raises(TypeError, match="sink"):
        tb.set_sink(42)


def _walkable():
    ram = np.zeros(4 << 20, np.uint8)
    q = ram.view(np.uint64)
    # 4-level identity-ish map of gva 0x400000.. with 4K pages
    q[0x1000 // 8] = 0x2000 | PR | RW | US
    q[0x2000 // 8] = 0x3000 | PR | RW | US
    q[0x3000 // 8 + 2] = 0x4000 | PR | RW | US
    for i in range(512):
        q[0x4000 // 8 + i] = (0x100000 + i * 0x1000) | PR | RW | US
    mem = P.GuestMemory(ram)
    cpu = P.CpuState.long_mode(cr3=0x1000)
    return ram, P.GuestMmu(mem, cpu, P.GuestCpuModel(maxphyaddr=46))


def test_a_sink_that_raises_leaves_no_records_behind():
    _, mmu = _walkable()
    seen = []

    def boom(rec):
        seen.append(rec.line)
        raise RuntimeError("subscriber failed")

    tp.enable(*WALKER_EVENTS)
    try:
        tp.subscribe(boom)
        try:
            with pytest.raises(RuntimeError, match="subscriber failed"):
                mmu.walk_addr(0x400000, 0)
        finally:
            tp.unsubscribe(boom)
        with tp.capture(*WALKER_EVENTS) as ring:
            mmu.walk_addr(0x401000, 0)
    finally:
        tp.disable_all()
    # the second walk emits its own records only, nothing left from the first
    assert ring.lines()[0] == "kvm_mmu_pagetable_walk: addr 401000 pferr 0 "
    assert sum(l.startswith("kvm_mmu_pagetable_walk") for l in ring.lines()) == 1


def test_a_sink_that_walks_again_does_not_reemit():
    _, mmu = _walkable()
    inner_done = []

    def walk_again(rec):
        if not inner_done and rec.event == "kvm_mmu_pagetable_walk":
            inner_done.append(True)
            mmu.walk_addr(0x402000, 0)

    with tp.capture(*WALKER_EVENTS) as ring:
        tp.subscribe(walk_again)
        try:
            mmu.walk_addr(0x400000, 0)
        finally:
            tp.unsubscribe(walk_again)
    walks = [l for l in ring.lines() if l.startswith("kvm_mmu_pagetable_walk")]
    assert walks == ["kvm_mmu_pagetable_walk: addr 400000 pferr 0 ",
                     "kvm_mmu_pagetable_walk: addr 402000 pferr 0 "]
    # first walk: itself, 4 elements, 4 A bits; the second finds the three
    # upper A bits set already: itself, 4 elements, 1 A bit.  Nothing twice.
    assert len(ring.lines()) == (1 + 4 + 4) + (1 + 4 + 1)


def test_threads_walking_one_mmu_with_tracing_get_whole_walks():
    _, mmu = _walkable()
    n_threads, n_walks = 4, 300
    gvas = [0x400000 + 0x1000 * (t * 64 + 1) for t in range(n_threads)]
    errors = []

    def run(g):
        try:
            for _ in range(n_walks):
                w = mmu.walk_addr(g, 0)
                assert w.ok and w.gpa == 0x100000 + (g - 0x400000)
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(e)

    with tp.capture("kvm_mmu_pagetable_walk", "kvm_mmu_paging_element",
                    capacity=1 << 20) as ring:
        ts = [threading.Thread(target=run, args=(g,)) for g in gvas]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors
    lines = ring.lines()
    # Every walk's records arrive, none lost or doubled (a shared buffer lost
    # and repeated records).  Drains of different threads may interleave: the
    # sink runs in Python, and the GIL can switch threads between records.
    assert len(lines) == n_threads * n_walks * 5
    walks = [l for l in lines if l.startswith("kvm_mmu_pagetable_walk")]
    assert sorted(set(walks)) == sorted(f"kvm_mmu_pagetable_walk: addr {g:x} pferr 0 " for g in gvas)
    for g in gvas:
        assert walks.count(f"kvm_mmu_pagetable_walk: addr {g:x} pferr 0 ") == n_walks
    assert sum(l.startswith("kvm_mmu_paging_element") for l in lines) == 4 * len(walks)


def test_the_core_walker_runs_without_mmutrace_loaded():
    assert_no_crash("""
        import sys
        from kvmmmu._core import guest_walk, trace_buf
        assert "kvmmmu.mmutrace" not in sys.modules
        # no sink: switches on, records drained and discarded
        trace_buf.set_enabled(0, True)
        assert trace_buf.push_records(0, [1, 2], repeat=5) == 0
    """, allow_raise=False)
