"""SPTE accessors and MMU-level helpers of kvmmmu._core.pt_arena, one
thread: the kernel's half orders (32-bit hosts), clear_spte_count, and each
helper's return value, flush decision and fast/slow path against tables
written from v6.18 mmu.c / spte.c (and v6.12 for era="v6.12").

Row notation: P is a writable leaf as make_spte() builds it (A, D, W,
Host- and MMU-writable set).  ``P-W`` clears W, ``P-W-MW`` also
MMU-writable, ``P-A`` / ``P-D`` clear Accessed / Dirty.
"""
import numpy as np
import pytest

from kvmmmu._core import pt_arena as P
from kvmmmu._core.pt_arena import KvmMmuWarning, MmuMemoryCache, PtArena
from kvmmmu._core.spte import SpteFormat

PFN = 0x123456789          # pfn bits on both sides of bit 32 of the SPTE
W = 1 << 1


def new_arena(fmt, **kw):
    return PtArena(fmt, tables_per_chunk=4, max_tables=64, **kw)


def new_sp(arena, level=1):
    pc, hc = MmuMemoryCache(arena, "shadow_page"), MmuMemoryCache(arena, "page_header")
    pc.topup(1)
    hc.topup(1)
    return arena.alloc_sp(pc, hc, role=level)


def bits(fmt, name, pfn=PFN, **kw):
    """The SPTE called `name` in the tables ("NP", "P", "P-W", "P-W-MW", ...)."""
    if name == "NP":
        return fmt.SHADOW_NONPRESENT_VALUE
    spte = fmt.make_spte(level=1, pte_access=7, pfn=pfn, **kw)[0]
    for part in name.split("-")[1:]:
        spte &= ~{"W": W, "MW": fmt.shadow_mmu_writable_mask, "A": fmt.shadow_accessed_mask,
                  "D": fmt.shadow_dirty_mask}[part]
    return spte


def paths(arena, before):
    s = arena.stats()
    d = {k: s[k] - before[k] for k in ("nr_set_spte", "nr_update_clear_spte_fast",
                                       "nr_update_clear_spte_slow")}
    return {"nr_set_spte": "set", "nr_update_clear_spte_fast": "fast",
            "nr_update_clear_spte_slow": "slow"}[max(d, key=d.get)] if any(d.values()) else None


FORMATS = {
    "legacy64": lambda: SpteFormat.legacy(),
    "legacy32": lambda: SpteFormat.legacy(host_64bit=False),
    "ept": lambda: SpteFormat.ept(),
}


# --- access orders ----------------------------------------------------------

def _log(fmt_name, fn):
    fmt = FORMATS[fmt_name]()
    a = new_arena(fmt)
    sp = new_sp(a)
    s = a.sp_sptep(sp, 7)
    out = fn(a, fmt, s)
    return out


def test_set_spte_writes_high_then_low_on_32bit():
    def run(a, fmt, s):
        p = bits(fmt, "P")
        a.start_access_log()
        a.mmu_spte_set(s, p)
        return a.stop_access_log(), p
    log, p = _log("legacy32", run)
    assert log == [("write_high", p >> 32), ("smp_wmb", 0), ("write_low", p & 0xFFFFFFFF)]


def test_update_clear_fast_writes_low_then_high_and_counts_clears():
    def run(a, fmt, s):
        p = bits(fmt, "P")
        a.mmu_spte_set(s, p)
        a.start_access_log()
        a.mmu_spte_update(s, bits(fmt, "P-W"))        # not volatile: fast, still present
        a.mmu_spte_clear_no_track(s)                  # fast, non-present: counted
        return a.stop_access_log(), p
    log, p = _log("legacy32", run)
    lo = (p & ~W) & 0xFFFFFFFF
    assert log == [
        ("write_low", lo), ("smp_wmb", 0), ("write_high", p >> 32),
        ("write_low", 0), ("smp_wmb", 0), ("write_high", 0), ("smp_wmb", 0),
        ("inc_clear_spte_count", 1),
    ]


def test_update_clear_slow_exchanges_low_then_rewrites_high():
    def run(a, fmt, s):
        p = bits(fmt, "P-W")                           # !W && MMU-writable: volatile
        a.mmu_spte_set(s, p)
        a.start_access_log()
        old = a.mmu_spte_clear_track_bits(s)
        return a.stop_access_log(), p, old
    log, p, old = _log("legacy32", run)
    assert old == p
    assert log == [("xchg_low", 0), ("read_high", p >> 32), ("write_high", 0),
                   ("smp_wmb", 0), ("inc_clear_spte_count", 1)]


def test_get_spte_lockless_reads_count_low_high_then_rechecks():
    def run(a, fmt, s):
        p = bits(fmt, "P")
        a.mmu_spte_set(s, p)
        a.start_access_log()
        v = a.mmu_spte_get_lockless(s)
        return a.stop_access_log(), p, v
    log, p, v = _log("legacy32", run)
    assert v == p
    assert log == [
        ("read_clear_spte_count", 0), ("smp_rmb", 0), ("read_low", p & 0xFFFFFFFF),
        ("smp_rmb", 0), ("read_high", p >> 32), ("smp_rmb", 0),
        ("read_low", p & 0xFFFFFFFF), ("read_clear_spte_count", 0),
    ]


@pytest.mark.parametrize("fmt_name", ["legacy64", "ept"])
def test_64bit_host_uses_single_64bit_accesses(fmt_name):
    def run(a, fmt, s):
        a.start_access_log()
        a.mmu_spte_set(s, bits(fmt, "P"))
        a.mmu_spte_update(s, bits(fmt, "P-W"))
        a.mmu_spte_update(s, bits(fmt, "P-W-MW"))
        a.mmu_spte_get_lockless(s)
        a.mmu_spte_clear_track_bits(s)
        a.mmu_spte_clear_no_track(s)
        return a.stop_access_log(), fmt
    log, fmt = _log(fmt_name, run)
    np_ = fmt.SHADOW_NONPRESENT_VALUE
    assert log == [("write64", bits(fmt, "P")), ("write64", bits(fmt, "P-W")),
                   ("xchg64", bits(fmt, "P-W-MW")), ("read64", bits(fmt, "P-W-MW")),
                   ("write64", np_), ("write64", np_)]


def test_split_spte_layout_is_little_endian():
    fmt = FORMATS["legacy32"]()
    a = new_arena(fmt)
    sp = new_sp(a)
    p = bits(fmt, "P")
    a.mmu_spte_set(a.sp_sptep(sp, 3), p)
    halves = a.spt(sp).view(np.uint32)
    assert (halves[6], halves[7]) == (p & 0xFFFFFFFF, p >> 32)     # spte_low, spte_high


# --- clear_spte_count ----------------------------------------------------------

# (operation, SPTE before, count increments on a 32-bit host)
COUNT_TABLE = [
    ("mmu_spte_set", "NP", 0),                      # __set_spte never counts
    ("update_fast_present", "P", 0),                # present -> present
    ("update_slow_present", "P-W", 0),              # xchg path, still present
    ("clear_track_bits_fast", "P", 1),
    ("clear_track_bits_slow", "P-W", 1),
    ("clear_track_bits_nonpresent", "NP", 1),       # the old value is not looked at
    ("clear_no_track", "P", 1),
    ("clear_no_track_nonpresent", "NP", 1),
]


@pytest.mark.parametrize("fmt_name", ["legacy32", "legacy64"])
@pytest.mark.parametrize("op, before, inc", COUNT_TABLE)
def test_clear_spte_count(fmt_name, op, before, inc):
    fmt = FORMATS[fmt_name]()
    a = new_arena(fmt)
    sp = new_sp(a)
    s = a.sp_sptep(sp, 9)
    if before != "NP":
        a.mmu_spte_set(s, bits(fmt, before))
    c0 = a.get_sp(sp)["clear_spte_count"]
    if op == "mmu_spte_set":
        a.mmu_spte_set(s, bits(fmt, "P"))
    elif op.startswith("update"):
        a.mmu_spte_update(s, bits(fmt, before + "-A"))
    elif op.startswith("clear_track_bits"):
        a.mmu_spte_clear_track_bits(s)
    else:
        a.mmu_spte_clear_no_track(s)
    want = inc if not a.host_64bit else 0          # 64-bit hosts have no count
    assert a.get_sp(sp)["clear_spte_count"] - c0 == want
    a.audit()


def test_clear_spte_count_is_per_page_not_per_spte():
    fmt = FORMATS["legacy32"]()
    a = new_arena(fmt)
    sp = new_sp(a)
    for i in range(5):
        a.mmu_spte_set(a.sp_sptep(sp, i), bits(fmt, "P", pfn=PFN + i))
        a.mmu_spte_clear_no_track(a.sp_sptep(sp, i))
    assert a.get_sp(sp)["clear_spte_count"] == 5


# --- mmu_spte_update ----------------------------------------------------------------

# (format, old, new, path, flush).  v6.18: spte_needs_atomic_update(old)
# picks xchg; flush iff old is MMU-writable and new is not.
UPDATE_V6_18 = [
    ("legacy", "NP", "P", "set", False),            # old not present: mmu_spte_set
    ("legacy", "P", "P-W", "fast", False),          # dirty logging wrprot: no flush here
    ("legacy", "P", "P-A", "fast", False),          # losing A never flushes
    ("legacy", "P", "P-D", "fast", False),          # nor does losing D (v6.13+)
    ("legacy", "P", "P-W-MW", "fast", True),        # write tracking: MMU-writable lost
    ("legacy", "P-W", "P-W", "slow", False),        # !W && MMU-writable: fast PF may set W
    ("legacy", "P-W", "P-W-MW", "slow", True),
    ("legacy", "P-D", "P-D-W", "slow", False),      # W && !D: the CPU may set D
    ("legacy", "P-A", "P-A", "fast", False),        # A clear alone is not volatile
    ("legacy", "P-W-MW", "P-W-MW-A", "fast", False),
    ("ept", "P", "P-W", "fast", False),
    ("ept", "P", "P-W-MW", "fast", True),           # EPT MMU-writable is bit 58 (high half)
    ("ept", "P-W", "P-W-MW", "slow", True),
    ("ept-noad", "P", "P-A", "slow", False),        # A/D disabled: always atomic
    ("ept-noad", "P-W-MW", "P-W-MW", "slow", False),
]

# v6.12: spte_has_volatile_bits(old) picks xchg; flush iff old MMU-writable
# and new not W, or A lost, or D lost; lost A/D reach the host page.
UPDATE_V6_12 = [
    # (format, old, new, path, flush, host_ad(accessed, dirty) or None)
    ("legacy", "NP", "P", "set", False, None),
    ("legacy", "P", "P-W", "fast", True, None),     # MMU-writable old, new not W
    ("legacy", "P", "P-A", "fast", True, (True, False)),
    ("legacy", "P", "P-D", "fast", True, (False, True)),
    ("legacy", "P", "P-A-D", "fast", True, (True, True)),
    ("legacy", "P-A", "P-A", "slow", False, None),  # A clear was volatile before v6.13
    ("legacy", "P-W", "P-W-MW", "slow", True, None),
    ("legacy", "P-W-MW", "P-W-MW", "fast", False, None),
    # A/D disabled: not volatile before v6.15 unless access-tracked or
    # MMU-writable without W; "dirty" means W, "accessed" means not tracked.
    ("ept-noad", "P", "P-W", "fast", True, (False, True)),
    ("ept-noad", "P-W", "P-W", "slow", True, None),
    # The pre-v6.13 rule tested the new SPTE's W, not its MMU-writable bit:
    # refreshing a read-only but MMU-writable SPTE flushed.
    ("legacy", "P-W", "P-W", "slow", True, None),
]

FMT = {"legacy": SpteFormat.legacy, "ept": SpteFormat.ept,
       "ept-noad": lambda **kw: SpteFormat.ept(ad_bits=False, **kw)}


def _leaf(fmt_key, fmt, name):
    return bits(fmt, name, ad_disabled=(fmt_key == "ept-noad"))


# Legacy rows run on both hosts, EPT rows on 64-bit hosts.
V6_18_CASES = [(h, *row) for row in UPDATE_V6_18
               for h in ((True, False) if row[0] == "legacy" else (True,))]


@pytest.mark.parametrize("host_64bit, fmt_key, old, new, path, flush", V6_18_CASES)
def test_mmu_spte_update_v6_18(host_64bit, fmt_key, old, new, path, flush):
    fmt = FMT[fmt_key](host_64bit=host_64bit)
    a = new_arena(fmt)
    s = a.sp_sptep(new_sp(a), 1)
    if old != "NP":
        a.mmu_spte_set(s, _leaf(fmt_key, fmt, old))
    calls = []
    before = a.stats()
    got = a.mmu_spte_update(s, _leaf(fmt_key, fmt, new), host_ad=lambda *x: calls.append(x))
    assert got is flush
    assert paths(a, before) == path
    assert int(a.spt(a.sptep_to_sp(s))[1]) == _leaf(fmt_key, fmt, new)
    assert calls == []                               # v6.18 never marks the host page here
    assert not any(a.warn_counts.values())


@pytest.mark.parametrize("fmt_key, old, new, path, flush, host_ad", UPDATE_V6_12)
def test_mmu_spte_update_v6_12(fmt_key, old, new, path, flush, host_ad):
    fmt = FMT[fmt_key]()
    a = new_arena(fmt, era="v6.12")
    s = a.sp_sptep(new_sp(a), 1)
    if old != "NP":
        a.mmu_spte_set(s, _leaf(fmt_key, fmt, old))
    calls = []
    before = a.stats()
    assert a.mmu_spte_update(s, _leaf(fmt_key, fmt, new), host_ad=lambda *x: calls.append(x)) is flush
    assert paths(a, before) == path
    assert calls == ([] if host_ad is None else [(PFN, *host_ad)])


# --- mmu_spte_clear_track_bits ----------------------------------------------------

# (era, old, path, host_ad or None): returns old, writes SHADOW_NONPRESENT_VALUE.
CLEAR_TRACK = [
    ("v6.18", "P", "fast", None),
    ("v6.18", "P-W", "slow", None),                 # !W && MMU-writable
    ("v6.18", "P-D", "slow", None),                 # W && !D
    ("v6.18", "NP", "fast", None),
    ("v6.12", "P", "fast", (True, True)),           # kvm_set_pfn_accessed + _dirty
    ("v6.12", "P-D", "slow", (True, False)),
    ("v6.12", "P-A-D", "slow", None),               # A clear: volatile; nothing to report
    ("v6.12", "NP", "fast", None),
]


@pytest.mark.parametrize("host_64bit", [True, False])
@pytest.mark.parametrize("era, old, path, host_ad", CLEAR_TRACK)
def test_mmu_spte_clear_track_bits(host_64bit, era, old, path, host_ad):
    fmt = SpteFormat.legacy(host_64bit=host_64bit)
    calls = []
    a = new_arena(fmt, era=era, host_ad=lambda *x: calls.append(x))
    s = a.sp_sptep(new_sp(a), 4)
    old_spte = bits(fmt, old)
    if old != "NP":
        a.mmu_spte_set(s, old_spte)
    before = a.stats()
    assert a.mmu_spte_clear_track_bits(s) == old_spte
    assert paths(a, before) == path
    assert int(a.spt(a.sptep_to_sp(s))[4]) == fmt.SHADOW_NONPRESENT_VALUE
    assert a.page_stats["pages_4k"] == (-1 if old != "NP" else 0)
    assert calls == ([] if host_ad is None else [(PFN, *host_ad)])


@pytest.mark.parametrize("level, key", [(1, "pages_4k"), (2, "pages_2m"), (3, "pages_1g")])
def test_clear_track_bits_counts_pages_at_the_tables_level(level, key):
    fmt = SpteFormat.legacy()
    a = new_arena(fmt)
    sp = new_sp(a, level=level)
    s = a.sp_sptep(sp, 0)
    a.kvm_update_page_stats(level, 1)
    a.mmu_spte_set(s, fmt.make_spte(level=level, pte_access=7, pfn=0x200)[0])
    a.mmu_spte_clear_track_bits(s)
    assert a.page_stats == {"pages_4k": 0, "pages_2m": 0, "pages_1g": 0}


def test_mmu_spte_clear_no_track_returns_nothing_and_clears_upper_level():
    fmt = SpteFormat.legacy()
    a = new_arena(fmt)
    root, child = new_sp(a, level=2), new_sp(a, level=1)
    s = a.sp_sptep(root, 0)
    a.mmu_spte_set(s, fmt.make_nonleaf_spte(a.sp_pa(child)))
    assert a.mmu_spte_clear_no_track(s) is None
    assert int(a.spt(root)[0]) == fmt.SHADOW_NONPRESENT_VALUE
    assert a.page_stats["pages_4k"] == 0              # no page accounting for non-leaves


# --- WARN_ON_ONCE sites --------------------------------------------------------------

def test_mmu_spte_set_on_present_warns_and_writes():
    fmt = SpteFormat.legacy()
    a = new_arena(fmt)
    s = a.sp_sptep(new_sp(a), 0)
    a.mmu_spte_set(s, bits(fmt, "P"))
    with pytest.warns(KvmMmuWarning, match="already shadow-present"):
        a.mmu_spte_set(s, bits(fmt, "P", pfn=7))
    assert a.mmu_spte_get_lockless(s) == bits(fmt, "P", pfn=7)
    assert a.warn_counts["set_present"] == 1


@pytest.mark.parametrize("new, warns", [
    ("nonpresent", {"update_nonpresent", "update_pfn"}),
    ("other_pfn", {"update_pfn"}),
    ("w_without_mmu_writable", {"writable_invariant"}),
])
def test_mmu_spte_update_warnings(new, warns):
    fmt = SpteFormat.legacy()
    a = new_arena(fmt)
    s = a.sp_sptep(new_sp(a), 0)
    a.mmu_spte_set(s, bits(fmt, "P"))
    value = {"nonpresent": fmt.SHADOW_NONPRESENT_VALUE, "other_pfn": bits(fmt, "P", pfn=5),
             "w_without_mmu_writable": bits(fmt, "P-MW")}[new]
    with pytest.warns(KvmMmuWarning):
        a.mmu_spte_update(s, value)
    assert {k for k, v in a.warn_counts.items() if v} == warns


def test_prove_mmu_flags_ept_entries_without_suppress_ve():
    fmt = SpteFormat.ept()
    a = new_arena(fmt, prove_mmu=True)
    s = a.sp_sptep(new_sp(a), 0)
    a.mmu_spte_set(s, bits(fmt, "P"))                  # bit 63 set: fine
    with pytest.warns(KvmMmuWarning, match="is_ept_ve_possible"):
        a.mmu_spte_clear_no_track(s)
        a.mmu_spte_set(s, bits(fmt, "P") & ~(1 << 63))
    assert a.warn_counts["ept_ve"] == 1


def test_try_cmpxchg64():
    fmt = SpteFormat.legacy(host_64bit=False)
    a = new_arena(fmt)
    s = a.sp_sptep(new_sp(a), 0)
    a.mmu_spte_set(s, bits(fmt, "P-W"))
    assert a.try_cmpxchg64(s, bits(fmt, "P"), 0) == (False, bits(fmt, "P-W"))
    assert a.try_cmpxchg64(s, bits(fmt, "P-W"), bits(fmt, "P")) == (True, bits(fmt, "P"))
    assert a.mmu_spte_get_lockless(s) == bits(fmt, "P")
