"""Hostile use of the page-table arena (issue 10), every probe in a fresh
interpreter (tests/_probe.py): a crash or a hang is a test failure.

Covers: the GC clearing a PtArena before a MmuMemoryCache that writes into
its chunks; the read-only header views; size arithmetic of the access log and
of grow(); waits for a lockless walk whose thread has exited (flush, RCU);
lockless batch readers against a writer on another thread; half-built
objects; out= overlap; integer arguments.
"""
import textwrap

import pytest

from _probe import assert_no_crash, assert_raises_in_child

PRE = """
import gc, threading, time, numpy as np
from kvmmmu._core import pt_arena as P
from kvmmmu._core.pt_arena import PtArena, MmuMemoryCache
from kvmmmu._core.spte import SpteFormat
F = SpteFormat.legacy()
def small(fmt=F, **kw):
    kw.setdefault("tables_per_chunk", 4); kw.setdefault("max_tables", 64)
    return PtArena(fmt, **kw)
def caches(a, n=4):
    pc = MmuMemoryCache(a, "shadow_page"); hc = MmuMemoryCache(a, "page_header")
    pc.topup(n); hc.topup(n)
    return pc, hc
def leaf(pfn=0x1234):
    return F.make_spte(level=1, pte_access=7, pfn=pfn)[0]
def snap(a):
    return (a.stats(), bytes(a.chunk_tables(0).tobytes()) if a.n_chunks else b"")
"""


def probe(body, exc=None, match=None, timeout=30):
    code = PRE + textwrap.dedent(body)
    if exc is None:
        return assert_no_crash(code, timeout=timeout, allow_raise=False)
    return assert_raises_in_child(code, exc, match, timeout=timeout)


# --- lifetime -----------------------------------------------------------------------

def test_gc_cycle_arena_and_cache_does_not_write_freed_chunks():
    # Default chunks are > 2 MiB, so a released chunk is unmapped: a cache
    # that poisoned its pages after the arena's chunks were cleared would fault.
    probe("""
    for i in range(5):
        a = PtArena(F)
        c = MmuMemoryCache(a, "shadow_page"); c.topup(8)
        h = MmuMemoryCache(a, "page_header"); h.topup(8)
        a.warn_sink = (c, h)            # arena -> caches -> arena: a cycle
        del a, c, h
        gc.collect()
    """)


def test_half_built_objects_refuse():
    probe("""
    a = PtArena.__new__(PtArena)
    for call in (lambda: a.grow(1), lambda: a.kvm_flush_remote_tlbs(), lambda: a.rcu_poll(),
                 lambda: a.get_sptes_lockless(np.zeros(1, np.uint64)),
                 lambda: a.start_access_log(4), lambda: a.sp_header(1), lambda: a.table(0),
                 lambda: a.walk_shadow_page_lockless_begin(0), lambda: a.stats(),
                 lambda: a.synchronize_rcu(), lambda: a.rcu_barrier(),
                 lambda: a.kvm_mmu_commit_zap_page([1]), lambda: MmuMemoryCache(a)):
        try:
            call()
        except (ValueError, RuntimeError, TypeError, P.KvmNoMemoryError):
            pass
    c = MmuMemoryCache.__new__(MmuMemoryCache)
    for call in (lambda: c.free(), lambda: c.topup(1)):
        try:
            call()
            raise AssertionError("a half-built cache worked")
        except RuntimeError as e:
            assert "__init__" in str(e)
    """)


# --- read-only views --------------------------------------------------------------------

def test_sp_header_is_read_only_and_cannot_be_flipped():
    probe("""
    a = small(); pc, hc = caches(a)
    sp = a.alloc_sp(pc, hc, role=1)
    v = a.sp_header(sp)
    before = v.tobytes()
    for attempt in (lambda: v.__setitem__("spt", 1), lambda: v.setflags(write=True),
                    lambda: a.chunk_headers(0).__setitem__(0, 0),
                    lambda: a.chunk_headers(0).setflags(write=True)):
        try:
            attempt()
            raise AssertionError("a header view became writable")
        except ValueError:
            pass
    assert a.sp_header(sp).tobytes() == before
    a.set_sp(sp, gfn=5)                       # the checked way still works
    assert a.get_sp(sp)["gfn"] == 5 and a.sp_header(sp)["gfn"] == 5
    a.audit()
    """)


def test_clear_spte_count_and_rcu_head_do_not_collide():
    probe("""
    a = small(); a.set_tdp_mmu_active(0, True); pc, hc = caches(a)
    sp = a.alloc_sp(pc, hc, role=1, tdp_mmu_page=True)
    a.call_rcu_free_sp(sp)
    try:
        a.set_sp(sp, clear_spte_count=7)
        raise AssertionError("planted a value into a pending rcu_head")
    except ValueError as e:
        assert "rcu_head" in str(e)
    a.rcu_barrier(); a.audit()
    b = small(SpteFormat.legacy(host_64bit=False)); pc, hc = caches(b)
    sp = b.alloc_sp(pc, hc, role=1)
    try:
        b.call_rcu_free_sp(sp)
        raise AssertionError("32-bit host queued an RCU callback")
    except ValueError as e:
        assert "32-bit" in str(e)
    b.audit()
    """)


# --- size arithmetic and integer arguments -----------------------------------------------

@pytest.mark.parametrize("arg, exc", [("2**62", "ValueError"), ("2**64", "ValueError"),
                                      ("0", "ValueError"), ("-1", "ValueError"),
                                      ("1.5", "TypeError"), ("'8'", "TypeError")])
def test_access_log_capacity_is_checked(arg, exc):
    probe(f"""
    a = small(); before = snap(a)
    try:
        a.start_access_log({arg})
    except {exc} as e:
        assert "capacity" in str(e)
        assert snap(a) == before and a.stop_access_log() == []
        raise
    """, exc, "capacity")


@pytest.mark.parametrize("arg, exc", [("2**64 - 1", "KvmNoMemoryError"), ("2**63", "KvmNoMemoryError"),
                                      ("2**64", "ValueError"), ("-1", "ValueError"),
                                      ("1.0", "TypeError")])
def test_grow_does_not_wrap(arg, exc):
    probe(f"""
    a = small(); a.grow(1); before = snap(a)
    try:
        a.grow({arg})
    finally:
        assert snap(a) == before and a.n_chunks == 1
        a.audit()
    """, exc, "n_chunks")


def test_float_and_negative_ints_are_refused():
    probe("""
    a = small(); pc, hc = caches(a)
    for bad, exc in ((1.5, TypeError), (-1, ValueError), (41, ValueError)):
        try:
            pc.topup(bad)
            raise AssertionError(f"topup({bad!r}) accepted")
        except exc as e:
            assert "min_objs" in str(e)
    for bad in ([1.5], [-3]):
        try:
            a.make_spteps(bad, [0])
            raise AssertionError(f"make_spteps({bad!r}) accepted")
        except (TypeError, ValueError) as e:
            assert "table_indices" in str(e)
    """)


def test_no_scalar_integer_argument_truncates_a_float():
    """Every method taking scalar integers refuses 1.5 with a TypeError that
    names the argument (a C-typed parameter would have used 1), and leaves
    the arena as it was."""
    from kvmmmu._core.pt_arena import PtArena, MmuMemoryCache
    from kvmmmu._core.rmap import PteListDescPool, PteListDescCache
    from kvmmmu._core.spte import SpteFormat
    a = PtArena(SpteFormat.ept(), nr_vcpus=2)
    pc = MmuMemoryCache(a, "shadow_page")
    pc.topup(4)
    hc = MmuMemoryCache(a, "page_header")
    hc.topup(1)
    before = (a.table_states().tolist(), a.sp_states().tolist(), [a.vcpu_mode(v) for v in (0, 1)])
    calls = {
        "owns_pfn": ("pfn",), "table_pfn": ("table_index",), "table_index": ("pfn",),
        "make_sptep": ("table_index", "index"), "sptep_location": ("sptep",),
        "sp_sptep": ("sp", "index"), "sp_pa": ("sp",), "sptep_to_sp": ("sptep",),
        "spte_to_child_sp": ("spte",), "table": ("table_index",), "spt": ("sp",),
        "shadowed_translation": ("sp",), "chunk_tables": ("chunk",), "chunk_headers": ("chunk",),
        "sp_header": ("sp",), "get_sp": ("sp",), "set_sp": ("sp",),
        "kvm_mmu_free_shadow_page": ("sp",), "call_rcu_free_sp": ("sp",),
        "set_tdp_mmu_active": ("vcpu", "active"), "is_tdp_mmu_active": ("vcpu",),
        "vcpu_mode": ("vcpu",), "set_vcpu_mode": ("vcpu", "mode"),
        "walk_shadow_page_lockless_begin": ("vcpu",), "walk_shadow_page_lockless_end": ("vcpu",),
        "kvm_tdp_mmu_walk_lockless_begin": ("vcpu",), "kvm_tdp_mmu_walk_lockless_end": ("vcpu",),
        "mmu_spte_set": ("sptep", "new_spte"), "mmu_spte_update": ("sptep", "new_spte"),
        "mmu_spte_clear_track_bits": ("sptep",), "mmu_spte_clear_no_track": ("sptep",),
        "mmu_spte_get_lockless": ("sptep",), "kvm_update_page_stats": ("level", "count"),
    }
    for name, params in calls.items():
        for k, p in enumerate(params):
            if p == "active":
                continue
            args = [1] * len(params)
            args[k] = 1.5
            with pytest.raises(TypeError, match=p):
                getattr(a, name)(*args)
    for ctor, kw in ((lambda **k: PtArena(SpteFormat.ept(), **k), "nr_vcpus"),
                     (lambda **k: PtArena(SpteFormat.ept(), **k), "max_tables"),
                     (lambda **k: MmuMemoryCache(a, "shadow_page", **k), "capacity"),
                     (lambda **k: PteListDescPool(**k), "descs_per_chunk"),
                     (lambda **k: PteListDescCache(PteListDescPool(), **k), "capacity")):
        with pytest.raises(TypeError, match=kw):
            ctor(**{kw: 1.5})
    for kw in ("role", "gfn"):
        with pytest.raises(TypeError, match=kw):
            a.alloc_sp(pc, hc, **{kw: 1.5})
    assert (a.table_states().tolist(), a.sp_states().tolist(),
            [a.vcpu_mode(v) for v in (0, 1)]) == before


def test_out_overlapping_spteps_is_refused():
    probe("""
    a = small(); pc, hc = caches(a)
    sp = a.alloc_sp(pc, hc, role=1)
    s = np.array([a.sp_sptep(sp, i) for i in range(8)], dtype=np.uint64)
    a.get_sptes_lockless(s, out=s[::-1].copy())
    try:
        a.get_sptes_lockless(s, out=s)
        raise AssertionError("out=spteps accepted")
    except ValueError as e:
        assert "overlaps" in str(e)
    """)


# --- waits that could spin forever --------------------------------------------------------

DEAD_WALKER = """
a = small(nr_vcpus=2); pc, hc = caches(a)
def walker():
    a.walk_shadow_page_lockless_begin(1)      # never ended: the thread exits
t = threading.Thread(target=walker); t.start(); t.join()
gc.collect()
"""


def test_flush_with_a_dead_walker_thread_raises():
    probe(DEAD_WALKER + textwrap.dedent("""
    t0 = time.monotonic()
    try:
        a.kvm_flush_remote_tlbs()
    finally:
        assert time.monotonic() - t0 < 2
    """), "KvmDeadWalkerError", "exited", timeout=20)


def test_commit_zap_with_a_dead_walker_thread_raises_and_frees_nothing():
    probe(DEAD_WALKER + textwrap.dedent("""
    sp = a.alloc_sp(pc, hc, role=1 | P.PT_ROLE_INVALID)
    try:
        a.kvm_mmu_commit_zap_page([sp])
    finally:
        assert a.sp_states()[sp - 1] == 3      # still in use
        a.audit()
    """), "KvmDeadWalkerError", "exited", timeout=20)


def test_synchronize_rcu_with_a_dead_reader_thread_raises():
    probe("""
    a = small(nr_vcpus=2); a.set_tdp_mmu_active(1, True); pc, hc = caches(a)
    sp = a.alloc_sp(pc, hc, role=1, tdp_mmu_page=True)
    t = threading.Thread(target=lambda: a.kvm_tdp_mmu_walk_lockless_begin(1)); t.start(); t.join()
    gc.collect()
    a.call_rcu_free_sp(sp)
    t0 = time.monotonic()
    try:
        a.synchronize_rcu()
    finally:
        assert time.monotonic() - t0 < 2
    """, "KvmDeadWalkerError", "exited", timeout=20)


def test_flush_timeout_with_a_live_walker():
    probe("""
    a = small(nr_vcpus=2)
    go, stop = threading.Event(), threading.Event()
    def walker():
        with a.lockless_walk(1):
            go.set(); stop.wait(10)
    t = threading.Thread(target=walker); t.start(); go.wait(5)
    try:
        a.kvm_flush_remote_tlbs(timeout=0.1)
    finally:
        stop.set(); t.join()
        assert a.kvm_flush_remote_tlbs(timeout=1) == 0
    """, "TimeoutError", "did not leave", timeout=20)


def test_writer_during_another_threads_flush_raises():
    probe("""
    a = small(nr_vcpus=2); pc, hc = caches(a)
    go, stop = threading.Event(), threading.Event()
    def walker():
        with a.lockless_walk(1):
            go.set(); stop.wait(10)
    t = threading.Thread(target=walker); t.start(); go.wait(5)
    f = threading.Thread(target=lambda: a.kvm_flush_remote_tlbs(timeout=5)); f.start()
    time.sleep(0.1)
    try:
        a.alloc_sp(pc, hc, role=1)
    finally:
        stop.set(); t.join(); f.join(); a.audit()
    """, "RuntimeError", "in use by another thread", timeout=20)


# --- lockless readers against a writer ---------------------------------------------------

def test_lockless_batch_readers_with_a_concurrent_writer_do_not_crash():
    probe("""
    a = small(nr_vcpus=2, max_tables=256); pc, hc = caches(a, 8)
    sps = [a.alloc_sp(pc, hc, role=1) for _ in range(4)]
    spteps = np.array([a.sp_sptep(sp, i) for sp in sps for i in range(512)], dtype=np.uint64)
    stop = threading.Event(); errors = []
    def reader():
        while not stop.is_set():
            try:
                a.get_sptes_lockless(spteps, vcpu=1)
            except P.KvmUseAfterFreeError:
                pass
            except Exception as e:
                errors.append(e); return
    t = threading.Thread(target=reader); t.start()
    t0 = time.monotonic(); n = 0
    while time.monotonic() - t0 < 0.7:
        s = int(spteps[n % len(spteps)])
        try:
            a.mmu_spte_set(s, leaf(0x1000 + n % 512))
            a.mmu_spte_clear_track_bits(s)
            a.start_access_log(16); a.stop_access_log()
        except RuntimeError:
            pass                            # log busy: a batch read is running
        n += 1
    stop.set(); t.join()
    assert not errors, errors
    a.audit()
    """, timeout=30)


# --- MMU_WARN_ON checks (KVMMMU_DEBUG builds) and the WARN sink -------------------------

def test_debug_checks_fire_only_in_debug_builds():
    probe("""
    from kvmmmu.warn import WarnSink
    a = small(); pc, hc = caches(a)
    sink = WarnSink(); a.warn_sink = sink
    sp = a.alloc_sp(pc, hc, role=1)
    a.mmu_spte_set(a.sp_sptep(sp, 0), leaf())
    huge = F.make_spte(level=2, pte_access=7, pfn=0x200)[0]
    a.mmu_spte_set(a.sp_sptep(sp, 1), huge)          # a PS SPTE in a level-1 table
    a.kvm_mmu_free_shadow_page(sp)                   # still holds present SPTEs
    c = a.debug_warn_counts
    if P.DEBUG_CHECKS:
        assert c["wrong_level"] == 1 and c["free_not_empty"] == 1, c
        assert any("is_empty_shadow_page" in w for w in sink.warnings), sink.warnings
    else:
        assert not any(c.values()), c                # compiled away
    """)


def test_warns_go_to_the_warn_sink():
    probe("""
    from kvmmmu.warn import WarnSink
    import warnings
    warnings.simplefilter("ignore")
    a = small(); pc, hc = caches(a)
    sink = WarnSink(); a.warn_sink = sink
    sp = a.alloc_sp(pc, hc, role=1)
    s = a.sp_sptep(sp, 0)
    a.mmu_spte_set(s, leaf()); a.mmu_spte_set(s, leaf())   # WARN: already present
    assert a.warn_counts["set_present"] == 1
    assert any("mmu_spte_set" in w for w in sink.warnings), sink.warnings
    """)
