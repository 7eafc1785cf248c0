"""kvmmmu._core.pt_arena: locations, growth, memory caches, kvm_mmu_page
headers at the kernel's widths, poisoning, deferred frees (flush wait and
RCU) and the auditor.  The threaded protocol checks are in test_lockless.py,
the SPTE helpers in test_split_spte.py.
"""
import gc
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmmmu._core import pt_arena as P
from kvmmmu._core.pt_arena import (
    HEADER_DTYPE, KvmMmuWarning, KvmNoMemoryError, KvmUseAfterFreeError, MmuMemoryCache,
    PtArena, PtArenaAuditError,
)
from kvmmmu._core.spte import SpteFormat

LEGACY = SpteFormat.legacy()
LEGACY32 = SpteFormat.legacy(host_64bit=False)
EPT = SpteFormat.ept()


def small(fmt=LEGACY, **kw):
    kw.setdefault("tables_per_chunk", 4)
    kw.setdefault("max_tables", 64)
    return PtArena(fmt, **kw)


def caches(a, n=4, info=False, capacity=40):
    pc = MmuMemoryCache(a, "shadow_page", capacity=capacity)
    hc = MmuMemoryCache(a, "page_header", capacity=capacity)
    pc.topup(n)
    hc.topup(n)
    if not info:
        return pc, hc
    ic = MmuMemoryCache(a, "shadowed_info", capacity=capacity)
    ic.topup(n)
    return pc, hc, ic


def leaf(fmt, pfn=0x1234, level=1):
    return fmt.make_spte(level=level, pte_access=7, pfn=pfn)[0]


def zap(a, sps):
    for sp in sps:
        a.set_sp(sp, role=a.get_sp(sp)["role"] | P.PT_ROLE_INVALID)
    a.kvm_mmu_commit_zap_page(sps)


# --- geometry and locations ---------------------------------------------------

def test_default_geometry():
    a = PtArena(LEGACY)
    assert a.base_pfn == 0x3_0000_0000
    assert a.base_pfn + a.max_tables <= 1 << 34            # valid under MAXPHYADDR 46
    assert a.max_tables == P.DEFAULT_MAX_TABLES and a.tables_per_chunk == 512
    assert a.owns_pfn(a.base_pfn) and not a.owns_pfn(a.base_pfn - 1)
    assert not a.owns_pfn(a.base_pfn + a.max_tables)
    assert a.host_64bit and not PtArena(LEGACY32).host_64bit
    assert a.nonpresent_value == 1 << 63 and PtArena(LEGACY32).nonpresent_value == 0
    assert a.n_chunks == 0 and a.nbytes < 128 * 1024       # nothing committed yet
    assert PtArena(SpteFormat.legacy(maxphyaddr=36)).base_pfn == 0xC0_0000


@pytest.mark.parametrize("kw, match", [
    (dict(base_pfn=0), "must not be 0"),
    (dict(base_pfn=(1 << 34) - 8), "do not fit"),
    (dict(tables_per_chunk=3), "power of two"),
    (dict(max_tables=100, tables_per_chunk=64), "multiple"),
    (dict(max_tables=1 << 32, tables_per_chunk=1 << 20), "32-bit"),
    (dict(nr_vcpus=0), "nr_vcpus"),
    (dict(era="v5.10"), "era"),
])
def test_bad_geometry(kw, match):
    with pytest.raises(ValueError, match=match):
        PtArena(LEGACY, **kw)


@settings(max_examples=200, deadline=None)
@given(t=st.integers(0, P.DEFAULT_MAX_TABLES - 1), i=st.integers(0, 511))
def test_sptep_location_round_trip(t, i):
    a = _BIG
    s = a.make_sptep(t, i)
    assert s != 0 and s & 7 == 0
    assert s == ((a.base_pfn + t) << 12) | (i << 3)
    assert a.sptep_location(s) == (t, i)
    assert a.table_index(a.table_pfn(t)) == t
    tt, ii = a.sptep_locations(np.array([s], np.uint64))
    assert (int(tt[0]), int(ii[0])) == (t, i)
    assert int(a.make_spteps([t], [i])[0]) == s


_BIG = PtArena(LEGACY)


def test_bad_locations():
    a = small()
    with pytest.raises(ValueError):
        a.make_sptep(0, 512)
    with pytest.raises(ValueError):
        a.table_pfn(64)
    with pytest.raises(ValueError):
        a.sptep_location(a.make_sptep(0, 1) | 4)
    with pytest.raises(ValueError):
        a.sptep_location(8)
    with pytest.raises(ValueError):
        a.mmu_spte_get_lockless(a.make_sptep(0, 0))          # never handed out


@pytest.mark.parametrize("fmt", [LEGACY, LEGACY32, EPT], ids=["legacy", "legacy32", "ept"])
def test_nonleaf_spte_points_at_the_table(fmt):
    a = small(fmt)
    pc, hc = caches(a)
    root, child = a.alloc_sp(pc, hc, role=2), a.alloc_sp(pc, hc, role=1)
    spte = fmt.make_nonleaf_spte(a.sp_pa(child))
    assert a.table_index(spte >> 12 & ((1 << 40) - 1)) == a.sptep_location(a.sp_sptep(child, 0))[0]
    assert a.spte_to_child_sp(spte) == child
    assert a.spte_to_child_sp(leaf(fmt)) == 0               # guest memory is not an arena page
    a.mmu_spte_set(a.sp_sptep(root, 3), spte)
    assert a.sptep_to_sp(a.sp_sptep(root, 3)) == root
    assert a.sptep_to_sp(a.sp_sptep(child, 511)) == child
    a.audit()


# --- allocation, fill values, growth -------------------------------------------

@pytest.mark.parametrize("fmt", [LEGACY, LEGACY32, EPT], ids=["legacy", "legacy32", "ept"])
def test_new_pages_and_headers(fmt):
    a = small(fmt)
    pc, hc, ic = caches(a, info=True)
    sp = a.alloc_sp(pc, hc, ic, role=0x3784, gfn=0x1000, tdp_mmu_page=True)
    assert np.all(a.spt(sp) == fmt.SHADOW_NONPRESENT_VALUE)
    assert np.all(a.shadowed_translation(sp) == 0)
    h = a.get_sp(sp)
    assert (h["role"], h["gfn"], h["tdp_mmu_page"]) == (0x3784, 0x1000, True)
    assert h["spt"] == a.sptep_location(a.sp_sptep(sp, 0))[0] + a.base_pfn
    zero = {k: v for k, v in h.items() if k not in ("role", "gfn", "tdp_mmu_page", "spt",
                                                     "shadowed_translation")}
    assert not any(zero.values())
    sp2 = a.alloc_sp(pc, hc)
    assert a.shadowed_translation(sp2) is None
    assert a.audit()["sps"] == 2


def test_growth_keeps_views_and_locations_valid():
    a = PtArena(LEGACY32, tables_per_chunk=2, max_tables=512)
    pc, hc = caches(a, 1)
    sp = a.alloc_sp(pc, hc, role=1)
    view, s = a.spt(sp), a.sp_sptep(sp, 5)
    chunk0 = a.chunk_tables(0)
    addr = view.__array_interface__["data"][0]
    a.mmu_spte_set(s, leaf(LEGACY32))
    n0 = a.n_chunks
    more = []
    for _ in range(6):                                    # 6 x 40 pages: 100+ new chunks
        c = MmuMemoryCache(a, "shadow_page")
        c.topup(40)
        more.append(c)
    assert a.n_chunks > n0 + 100
    assert view.__array_interface__["data"][0] == addr    # nothing moved
    assert np.shares_memory(view, a.spt(sp)) and np.shares_memory(chunk0, a.chunk_tables(0))
    assert a.sptep_to_sp(s) == sp and a.sptep_location(s) == a.sptep_location(a.sp_sptep(sp, 5))
    a.mmu_spte_clear_track_bits(s)                        # a write through the location ...
    assert int(view[5]) == 0                              # ... is seen through the old view
    a.mmu_spte_set(s, leaf(LEGACY32, 0x777))
    assert int(a.get_sptes_lockless(np.array([s], np.uint64))[0]) == leaf(LEGACY32, 0x777)
    a.audit()
    del a, more, pc, hc
    gc.collect()
    assert int(view[5]) == leaf(LEGACY32, 0x777)          # the view keeps its chunk alive


def test_memory_per_table_is_within_5_percent_of_a_page_plus_header():
    target = 1.05 * (4096 + HEADER_DTYPE.itemsize)
    a = PtArena(LEGACY)                                    # default geometry
    a.grow(1)
    assert a.bytes_per_table <= target, a.bytes_per_table
    a.grow(15)
    assert a.bytes_per_table <= 1.01 * (4096 + HEADER_DTYPE.itemsize)


# --- memory caches -----------------------------------------------------------------

def _snapshot(a, *cs):
    states = (a.table_states().tobytes(), a.sp_states().tobytes())
    mem = tuple(a.chunk_tables(c).tobytes() + a.chunk_headers(c).tobytes()
                for c in range(a.n_chunks))
    return a.stats(), states, mem, [c.objects for c in cs], a.n_chunks, a.nbytes


def test_topup_semantics():
    a = small(max_tables=8, tables_per_chunk=2)
    c = MmuMemoryCache(a, "shadow_page", capacity=5)
    c.topup(2)
    assert c.nobjs == 5 and a.n_chunks == 3                # filled to capacity
    before = _snapshot(a, c)
    c.topup(5)                                             # already >= min: nothing
    c.topup(0)
    assert _snapshot(a, c) == before
    d = MmuMemoryCache(a, "shadow_page", capacity=5)
    d.topup(2)                                             # only 3 left: partial fill is fine
    assert d.nobjs == 3 and a.n_chunks == 4
    with pytest.raises(ValueError):
        d.topup(6)
    d.free()
    c.free()
    assert a.audit()["free_tables"] == 8


@pytest.mark.parametrize("kind", ["shadow_page", "page_header", "shadowed_info"])
def test_cache_exhaustion_raises_and_leaves_the_arena_unchanged(kind):
    a = small(LEGACY32, max_tables=6, tables_per_chunk=2)
    full = MmuMemoryCache(a, kind, capacity=4)
    full.topup(4)
    other = MmuMemoryCache(a, kind, capacity=4)
    before = _snapshot(a, full, other)
    with pytest.raises(KvmNoMemoryError, match="arena has 2 left"):
        other.topup(3)
    assert _snapshot(a, full, other) == before
    a.audit()


def test_alloc_from_an_empty_cache_raises_and_takes_nothing():
    a = small()
    pc, hc, ic = caches(a, 1, info=True, capacity=1)
    a.alloc_sp(pc, hc, ic)
    pc.topup(1)
    hc.topup(1)
    before = _snapshot(a, pc, hc, ic)
    with pytest.raises(KvmNoMemoryError, match="mmu_shadowed_info_cache"):
        a.alloc_sp(pc, hc, ic)
    assert _snapshot(a, pc, hc, ic) == before
    with pytest.raises(ValueError, match="header_cache is a shadow_page cache"):
        a.alloc_sp(pc, pc)
    with pytest.raises(ValueError, match="another arena"):
        a.alloc_sp(MmuMemoryCache(small()), hc)


def test_full_arena_raises():
    a = small(max_tables=4, tables_per_chunk=2)
    pc, hc = caches(a, 4)
    [a.alloc_sp(pc, hc) for _ in range(4)]
    with pytest.raises(KvmNoMemoryError):
        pc.topup(1)
    with pytest.raises(KvmNoMemoryError):
        a.grow()
    a.audit()


# --- header fields at the kernel's widths ----------------------------------------

# struct kvm_mmu_page (v6.18 mmu_internal.h): field -> numpy type of the
# kernel type (bool: 1 byte; int, atomic_t, refcount_t: s32; unsigned int:
# u32; u8; gfn_t, pointers, unsigned long: u64).
KERNEL_TYPES = {
    "tdp_mmu_page": "?", "unsync": "?", "mmu_valid_gen": "u1",
    "tdp_mmu_scheduled_root_to_zap": "?", "nx_huge_page_disallowed": "?",
    "role": "u4", "gfn": "u8", "spt": "u8", "shadowed_translation": "u8",
    "root_count": "i4", "tdp_mmu_root_count": "i4", "has_mapped_host_mmio": "?",
    "unsync_children": "u4", "write_flooding_count": "i4", "external_spt": "u8",
    "parent_ptes": "u8", "ptep": "u8", "clear_spte_count": "i4",
}
UNIONS = [("mmu_valid_gen", "tdp_mmu_scheduled_root_to_zap"), ("root_count", "tdp_mmu_root_count"),
          ("parent_ptes", "ptep"), ("unsync_children", "external_spt"),
          ("write_flooding_count", "external_spt")]
STRUCT = {"u1": "<B", "u4": "<I", "i4": "<i", "u8": "<Q", "?": "<?"}
SETTABLE = [f for f in KERNEL_TYPES if f not in ("spt", "shadowed_translation")]


def test_header_dtype_matches_the_kernel():
    for name, t in KERNEL_TYPES.items():
        assert HEADER_DTYPE.fields[name][0] == np.dtype(t), name
    assert HEADER_DTYPE.fields["unsync_child_bitmap"][0] == np.dtype(("u8", (8,)))
    assert HEADER_DTYPE.itemsize == 160
    for a_, b_ in UNIONS:
        oa, ob = HEADER_DTYPE.fields[a_][1], HEADER_DTYPE.fields[b_][1]
        assert ob <= oa < ob + HEADER_DTYPE.fields[b_][0].itemsize, (a_, b_)


def _bounds(t):
    if t == "?":
        return [False, True]
    info = np.iinfo(np.dtype(t))
    return [int(info.min), int(info.max), int(info.max) // 3]


@pytest.mark.parametrize("name", SETTABLE)
def test_header_field_round_trip(name):
    a = small()
    pc, hc = caches(a, 2)
    sp, other = a.alloc_sp(pc, hc), a.alloc_sp(pc, hc)
    t = KERNEL_TYPES[name]
    off = HEADER_DTYPE.fields[name][1]
    for value in _bounds(t):
        a.set_sp(sp, **{name: value})
        assert a.get_sp(sp)[name] == value
        raw = a.sp_header(sp).tobytes()
        assert struct.unpack_from(STRUCT[t], raw, off)[0] == value     # the C layout
    assert not any(v for k, v in a.get_sp(other).items() if k != "spt")  # neighbour untouched
    keep = a.get_sp(sp)[name]
    if t == "?":
        with pytest.raises(ValueError):
            a.set_sp(sp, **{name: 2})
    else:
        info = np.iinfo(np.dtype(t))
        for bad in (int(info.max) + 1, int(info.min) - 1):
            with pytest.raises(OverflowError):
                a.set_sp(sp, **{name: bad})
    assert a.get_sp(sp)[name] == keep


@settings(max_examples=50, deadline=None)
@given(st.integers(0, (1 << 512) - 1))
def test_unsync_child_bitmap_round_trip(bitmap):
    a = _HDR_ARENA
    a.set_sp(_HDR_SP, unsync_child_bitmap=bitmap)
    assert a.get_sp(_HDR_SP)["unsync_child_bitmap"] == bitmap
    words = a.sp_header(_HDR_SP)["unsync_child_bitmap"]
    assert all(int(words[i]) == (bitmap >> (64 * i)) & (2**64 - 1) for i in range(8))


_HDR_ARENA = small()
_HDR_SP = _HDR_ARENA.alloc_sp(*caches(_HDR_ARENA, 1))


def test_header_unions_share_bytes():
    a = small()
    sp = a.alloc_sp(*caches(a, 1))
    a.set_sp(sp, root_count=-5)
    assert a.get_sp(sp)["tdp_mmu_root_count"] == -5
    a.set_sp(sp, external_spt=0x1122334455667788)
    h = a.get_sp(sp)
    assert (h["unsync_children"], h["write_flooding_count"]) == (0x55667788, 0x11223344)
    a.set_sp(sp, ptep=a.sp_sptep(sp, 3))
    assert a.get_sp(sp)["parent_ptes"] == a.sp_sptep(sp, 3)
    a.set_sp(sp, mmu_valid_gen=1)
    assert a.get_sp(sp)["tdp_mmu_scheduled_root_to_zap"] is True


def test_header_field_errors_write_nothing():
    a = small()
    sp = a.alloc_sp(*caches(a, 1))
    with pytest.raises(OverflowError):
        a.set_sp(sp, gfn=5, role=1 << 32)
    assert a.get_sp(sp)["gfn"] == 0                        # validated before any write
    with pytest.raises(ValueError, match="owned by the arena"):
        a.set_sp(sp, spt=1)
    with pytest.raises(AttributeError):
        a.set_sp(sp, gfns=1)
    with pytest.raises(TypeError):
        a.set_sp(sp, gfn=1.0)


# --- freeing, poisoning, use after free -------------------------------------------

@pytest.mark.parametrize("fmt", [LEGACY, LEGACY32], ids=["64", "32"])
def test_freed_pages_and_headers_are_poisoned(fmt):
    a = small(fmt)
    pc, hc, ic = caches(a, 2, info=True)
    sp = a.alloc_sp(pc, hc, ic, role=1)
    s = a.sp_sptep(sp, 0)
    a.mmu_spte_set(s, leaf(fmt))
    spt, info = a.spt(sp), a.shadowed_translation(sp)
    zap(a, [sp])
    assert np.all(spt == P.POISON) and np.all(info == P.POISON)
    assert set(a.sp_header(sp).tobytes()) == {0x6B}
    for call in (lambda: a.mmu_spte_get_lockless(s), lambda: a.mmu_spte_set(s, 0),
                 lambda: a.get_sptes_lockless(np.array([s], np.uint64)),
                 lambda: a.get_sp(sp), lambda: a.spt(sp), lambda: a.kvm_mmu_commit_zap_page([sp])):
        with pytest.raises(KvmUseAfterFreeError):
            call()
    a.audit()


def test_free_list_is_fifo_and_reuse_refills():
    a = small()
    pc, hc = caches(a, 3)
    sps = [a.alloc_sp(pc, hc, role=1) for _ in range(3)]
    pfns = [a.get_sp(sp)["spt"] for sp in sps]
    zap(a, [sps[1]])
    zap(a, [sps[0]])
    pc.free()                                            # its pages queue behind
    pc.topup(1)
    got = pc.objects
    assert got[:2] == [pfns[1], pfns[0]]                  # oldest freed page first
    sp = a.alloc_sp(pc, hc)
    assert np.all(a.spt(sp) == LEGACY.SHADOW_NONPRESENT_VALUE)
    a.audit()


def test_commit_zap_warns_on_valid_or_root_pages_and_frees_anyway():
    a = small()
    pc, hc = caches(a, 2)
    sp, root = a.alloc_sp(pc, hc, role=1), a.alloc_sp(pc, hc, role=4 | P.PT_ROLE_INVALID)
    a.set_sp(root, root_count=1)
    with pytest.warns(KvmMmuWarning, match="not invalid or is still a root"):
        a.kvm_mmu_commit_zap_page([sp, root])
    assert a.warn_counts["commit_zap"] == 2
    assert a.audit()["sps"] == 0


# --- waiting out lockless walkers --------------------------------------------------

def _run_blocked(fn):
    done = threading.Event()
    err = []

    def body():
        try:
            fn()
        except BaseException as e:          # pragma: no cover - reported below
            err.append(e)
        done.set()

    th = threading.Thread(target=body)
    th.start()
    return th, done, err


def test_commit_zap_waits_for_a_shadow_walker():
    a = small(nr_vcpus=3)
    pc, hc = caches(a, 1)
    sp = a.alloc_sp(pc, hc, role=1 | P.PT_ROLE_INVALID)
    a.set_vcpu_mode(2, P.IN_GUEST_MODE)
    a.walk_shadow_page_lockless_begin(0)
    assert a.vcpu_mode(0) == P.READING_SHADOW_PAGE_TABLES
    th, done, err = _run_blocked(lambda: a.kvm_mmu_commit_zap_page([sp]))
    assert not done.wait(0.3)                             # the flush IPI is not acked yet
    assert np.all(a.spt(sp) == LEGACY.SHADOW_NONPRESENT_VALUE)   # not freed yet
    a.walk_shadow_page_lockless_end(0)
    assert done.wait(10)
    th.join()
    assert not err
    assert a.vcpu_mode(0) == P.OUTSIDE_GUEST_MODE
    assert a.vcpu_mode(2) == P.EXITING_GUEST_MODE       # kicked, not waited for
    s = a.stats()
    assert (s["remote_tlb_flush"], s["flush_ipis_waited"], s["sps"]) == (1, 1, 0)
    a.audit()


def test_flush_from_inside_a_walk_would_deadlock():
    a = small()
    with a.lockless_walk(0):
        with pytest.raises(RuntimeError, match="wait forever"):
            a.kvm_flush_remote_tlbs()
        with pytest.raises(RuntimeError, match="already inside"):
            a.walk_shadow_page_lockless_begin(0)
    assert a.kvm_flush_remote_tlbs() == 0
    with pytest.raises(RuntimeError):
        a.walk_shadow_page_lockless_end(0)


def test_rcu_free_waits_for_readers_that_predate_the_grace_period():
    a = small(nr_vcpus=2)
    for v in (0, 1):
        a.set_tdp_mmu_active(v, True)
    pc, hc = caches(a, 1)
    sp = a.alloc_sp(pc, hc, role=1, tdp_mmu_page=True)
    page = a.spt(sp)
    a.kvm_tdp_mmu_walk_lockless_begin(0)                  # rcu_read_lock()
    a.call_rcu_free_sp(sp)
    assert a.rcu_poll() == 0                              # grace period started, vCPU 0 inside
    a.kvm_tdp_mmu_walk_lockless_begin(1)                  # starts later: not waited for
    assert a.rcu_poll() == 0
    assert np.all(page == LEGACY.SHADOW_NONPRESENT_VALUE)  # still intact
    assert a.audit()["rcu_pending"] == 1
    a.kvm_tdp_mmu_walk_lockless_end(0)
    assert a.rcu_poll() == 1
    assert np.all(page == P.POISON)
    a.kvm_tdp_mmu_walk_lockless_end(1)
    a.audit()


def test_synchronize_rcu_blocks_until_the_reader_leaves():
    a = small()
    a.set_tdp_mmu_active(0, True)
    sp = a.alloc_sp(*caches(a, 1), role=1)
    a.call_rcu_free_sp(sp)
    a.walk_shadow_page_lockless_begin(0)
    with pytest.raises(RuntimeError, match="wait forever"):
        a.synchronize_rcu()
    th, done, err = _run_blocked(a.synchronize_rcu)
    assert not done.wait(0.3)
    a.walk_shadow_page_lockless_end(0)
    assert done.wait(10)
    th.join()
    assert not err and a.audit()["rcu_pending"] == 0
    a.rcu_barrier()


def test_tdp_mmu_needs_a_64bit_host():
    with pytest.raises(ValueError, match="64-bit"):
        small(LEGACY32).set_tdp_mmu_active(0, True)
    with pytest.raises(RuntimeError):
        small().kvm_tdp_mmu_walk_lockless_begin(0)
    with pytest.raises(ValueError):
        small().vcpu_mode(1)


# --- batch read --------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [LEGACY, LEGACY32], ids=["64", "32"])
def test_get_sptes_lockless_batch(fmt):
    a = small(fmt)
    pc, hc = caches(a, 3)
    sps = [a.alloc_sp(pc, hc, role=1) for _ in range(3)]
    rng = np.random.default_rng(1234)
    spteps = np.array([a.sp_sptep(sps[i % 3], int(j)) for i, j in
                       enumerate(rng.integers(0, 512, 100))], np.uint64)
    for k, s in enumerate(np.unique(spteps)):
        a.mmu_spte_set(int(s), leaf(fmt, 0x100000 + k))
    want = np.array([a.spt(a.sptep_to_sp(int(s)))[int(s) >> 3 & 511] for s in spteps], np.uint64)
    assert np.array_equal(a.get_sptes_lockless(spteps), want)
    out = np.zeros(100, np.uint64)
    assert a.get_sptes_lockless(spteps, out, vcpu=0) is out and np.array_equal(out, want)
    assert a.vcpu_mode(0) == P.OUTSIDE_GUEST_MODE
    with pytest.raises(TypeError):
        a.get_sptes_lockless(spteps.astype(np.int64))
    with pytest.raises(ValueError):
        a.get_sptes_lockless(spteps, np.zeros(3, np.uint64))
    with pytest.raises(ValueError):
        a.get_sptes_lockless(np.array([8], np.uint64))
    assert a.get_sptes_lockless(np.zeros(0, np.uint64)).shape == (0,)


# --- the auditor ------------------------------------------------------------------

def _healthy():
    """root -> child, one freed sp (and its page), one cached page and header."""
    a = small(LEGACY)
    pc, hc = caches(a, 4, capacity=4)
    root, child = a.alloc_sp(pc, hc, role=2), a.alloc_sp(pc, hc, role=1)
    a.mmu_spte_set(a.sp_sptep(root, 0), LEGACY.make_nonleaf_spte(a.sp_pa(child)))
    a.mmu_spte_set(a.sp_sptep(child, 0), leaf(LEGACY))
    gone = a.alloc_sp(pc, hc, role=1)
    gone_page = a.sptep_location(a.sp_sptep(gone, 0))[0]
    zap(a, [gone])
    return a, pc, hc, root, child, (gone, gone_page)


BREAKAGES = {
    "poison in a live table": (lambda a, pc, hc, r, c, g: a.spt(c).__setitem__(7, P.POISON),
                               "holds poison"),
    "write after free": (lambda a, pc, hc, r, c, g: a.table(g[1]).__setitem__(0, 0),
                         "written after free"),
    "cached page touched": (lambda a, pc, hc, r, c, g: a.table(pc.objects[0] - a.base_pfn)
                            .__setitem__(3, 5), "not SHADOW_NONPRESENT_VALUE"),
    "link to a freed table": (lambda a, pc, hc, r, c, g: zap(a, [c]), "links to page"),
    "header does not own its page": (lambda a, pc, hc, r, c, g: a._sp_header_rw(c)
                                     .__setitem__("spt", a.get_sp(r)["spt"]), "does not point back"),
    "freed header written": (lambda a, pc, hc, r, c, g: a._sp_header_rw(g[0]).__setitem__("gfn", 1),
                             "not poisoned"),
    "cached header written": (lambda a, pc, hc, r, c, g: a._sp_header_rw(hc.objects[0])
                              .__setitem__("gfn", 1), "not zeroed"),
    "clear_spte_count on a 64-bit host": (lambda a, pc, hc, r, c, g: a.set_sp(c, clear_spte_count=1),
                                          "64-bit host"),
}


def test_auditor_accepts_healthy_arenas():
    a, *_ = _healthy()
    assert a.audit() == dict(free_tables=1, cached_tables=1, spt_tables=2, info_tables=0,
                             free_sps=1, cached_sps=1, sps=2, rcu_pending=0)


@pytest.mark.parametrize("what", sorted(BREAKAGES))
def test_auditor_catches(what):
    a, pc, hc, root, child, gone = _healthy()
    breaker, msg = BREAKAGES[what]
    breaker(a, pc, hc, root, child, gone)
    with pytest.raises(PtArenaAuditError, match=msg):
        a.audit()


# --- a reference model ---------------------------------------------------------------

class ArenaMachine(RuleBasedStateMachine):
    """Random allocate / zap / RCU / cache sequences against a set-based model;
    the auditor and the counters must agree after every step."""

    def __init__(self):
        super().__init__()
        self.a = PtArena(SpteFormat.legacy(), nr_vcpus=2, tables_per_chunk=4, max_tables=48)
        self.a.set_tdp_mmu_active(1, True)
        self.pc = MmuMemoryCache(self.a, "shadow_page", capacity=6)
        self.hc = MmuMemoryCache(self.a, "page_header", capacity=6)
        self.ic = MmuMemoryCache(self.a, "shadowed_info", capacity=6)
        self.live, self.pending, self.reading = {}, {}, False

    @rule(kind=st.sampled_from(["pc", "hc", "ic"]), n=st.integers(0, 6))
    def topup(self, kind, n):
        c = getattr(self, kind)
        before = self.a.stats()
        try:
            c.topup(n)
        except KvmNoMemoryError:
            assert self.a.stats() == before
        else:
            assert c.nobjs >= n

    @rule(indirect=st.booleans())
    def alloc(self, indirect):
        try:
            sp = self.a.alloc_sp(self.pc, self.hc, self.ic if indirect else None, role=1)
        except KvmNoMemoryError:
            assert self.pc.nobjs == 0 or self.hc.nobjs == 0 or (indirect and self.ic.nobjs == 0)
        else:
            assert sp not in self.live
            self.live[sp] = indirect

    @precondition(lambda self: self.live)
    @rule(data=st.data(), i=st.integers(0, 511))
    def set_and_clear(self, data, i):
        sp = data.draw(st.sampled_from(sorted(self.live)))
        s = self.a.sp_sptep(sp, i)
        self.a.mmu_spte_set(s, leaf(LEGACY, 0x1000 + i))
        assert self.a.mmu_spte_clear_track_bits(s) == leaf(LEGACY, 0x1000 + i)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), rcu=st.booleans())
    def zap(self, data, rcu):
        sp = data.draw(st.sampled_from(sorted(self.live)))
        indirect = self.live.pop(sp)
        if rcu:
            self.a.call_rcu_free_sp(sp)
            self.pending[sp] = indirect
        else:
            zap(self.a, [sp])

    @rule()
    def toggle_reader(self):
        if self.reading:
            self.a.kvm_tdp_mmu_walk_lockless_end(1)
        else:
            self.a.kvm_tdp_mmu_walk_lockless_begin(1)
        self.reading = not self.reading

    @rule()
    def poll(self):
        freed = self.a.rcu_poll()
        if freed:
            assert self.a.stats()["rcu_pending"] == len(self.pending) - freed
            states = self.a.sp_states()
            self.pending = {sp: i for sp, i in self.pending.items() if states[sp - 1] == 4}

    @rule(kind=st.sampled_from(["pc", "hc", "ic"]))
    def free_cache(self, kind):
        getattr(self, kind).free()

    @invariant()
    def consistent(self):
        got = self.a.audit()
        assert got["sps"] == len(self.live)
        assert got["info_tables"] == sum(self.live.values()) + sum(self.pending.values())
        assert got["rcu_pending"] == len(self.pending)
        assert got["cached_sps"] == self.hc.nobjs
        assert got["cached_tables"] == self.pc.nobjs + self.ic.nobjs

    def teardown(self):
        if self.reading:
            self.a.kvm_tdp_mmu_walk_lockless_end(1)
        self.a.rcu_barrier()
        assert self.a.audit()["rcu_pending"] == 0


TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
