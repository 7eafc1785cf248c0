"""Misuse of kvmmmu._core.spte and kvmmmu._core.role: specific exceptions that
name the argument, nothing silently converted, no crash.

Probes that could take the interpreter down run in a fresh child
(tests/_probe.py); argument checks that cannot crash run in-process.  The
debug-only invariant checks (KVMMMU_DEBUG builds) are tested at the end and
skipped in a release build.
"""
import numpy as np
import pytest

from _probe import assert_no_crash, assert_raises_in_child, run_probe
from kvmmmu._core import role as R
from kvmmmu._core import spte as S
from kvmmmu._core.spte import RsvdBitsValidate, SpteFormat

EPT = SpteFormat.ept()
LEGACY = SpteFormat.legacy()


# --- integers: operator.index, never truncation ---------------------------------

@pytest.mark.parametrize("call, name", [
    (lambda v: EPT.make_spte(level=v, pte_access=7, pfn=1), "level"),
    (lambda v: EPT.make_spte(level=1, pte_access=v, pfn=1), "pte_access"),
    (lambda v: EPT.make_spte(level=1, pte_access=7, pfn=v), "pfn"),
    (lambda v: EPT.make_spte(level=1, pte_access=7, pfn=1, old_spte=v), "old_spte"),
    (lambda v: EPT.is_mmu_writable_spte(v), "spte"),
    (lambda v: EPT.make_small_spte(EPT.make_spte(level=2, pte_access=7, pfn=512)[0], 1, v),
     "index"),
    (lambda v: EPT.make_mmio_spte(v, 0, 0), "gfn"),
    (lambda v: EPT.decode_spte(1, gfn=v), "gfn"),
    (lambda v: SpteFormat.ept(maxphyaddr=v), "maxphyaddr"),
    (lambda v: SpteFormat.legacy(l1tf_cache_bits=v), "l1tf_cache_bits"),
    (lambda v: RsvdBitsValidate.legacy(maxphyaddr=46, level=v, nx=True, gbpages=True), "level"),
    (lambda v: RsvdBitsValidate.ept(maxphyaddr=46, execonly=True, huge_level=v), "huge_level"),
    (lambda v: S.spte_to_pfn(v), "spte"),
])
def test_floats_are_refused_not_truncated(call, name):
    with pytest.raises(TypeError, match=name):
        call(1.0)
    with pytest.raises(TypeError, match=name):
        call("1")


def test_numpy_integers_are_accepted():
    a = EPT.make_spte(level=np.uint8(1), pte_access=np.int64(7), pfn=np.uint64(5))
    assert a == EPT.make_spte(level=1, pte_access=7, pfn=5)
    assert EPT.make_small_spte(EPT.make_spte(level=2, pte_access=7, pfn=512)[0], 1,
                               np.int32(3)) == \
        EPT.make_small_spte(EPT.make_spte(level=2, pte_access=7, pfn=512)[0], 1, 3)
    f = SpteFormat.ept(maxphyaddr=np.int16(46))
    assert f == EPT


@pytest.mark.parametrize("call, name, bad", [
    (lambda v: EPT.make_spte(level=v, pte_access=7, pfn=1), "level", 6),
    (lambda v: EPT.make_small_spte(EPT.make_spte(level=2, pte_access=7, pfn=512)[0], 1, v),
     "index", 512),
    (lambda v: EPT.make_small_spte(EPT.make_spte(level=2, pte_access=7, pfn=512)[0], 1, v),
     "index", -1),
    (lambda v: SpteFormat.ept(maxphyaddr=v), "maxphyaddr", 53),
    (lambda v: RsvdBitsValidate.legacy(maxphyaddr=v, level=4, nx=True, gbpages=True),
     "maxphyaddr", 31),
    (lambda v: RsvdBitsValidate.ept(maxphyaddr=46, execonly=True, huge_level=v), "huge_level", 4),
    (lambda v: EPT.is_mmu_writable_spte(v), "spte", 1 << 64),
])
def test_ranges_name_the_argument(call, name, bad):
    with pytest.raises(ValueError, match=name):
        call(bad)


@pytest.mark.parametrize("flag", ["prefetch", "synchronizing", "host_writable", "ad_disabled",
                                  "ad_wrprot_only", "nx_huge_pages", "host_mmio",
                                  "unsync_refused"])
def test_flags_are_bools_not_truthiness(flag):
    with pytest.raises(TypeError, match=flag):
        EPT.make_spte(level=1, pte_access=7, pfn=1, **{flag: "no"})
    with pytest.raises(ValueError, match=flag):
        EPT.make_spte(level=1, pte_access=7, pfn=1, **{flag: 2})
    with pytest.raises(TypeError, match=flag):
        EPT.make_spte_array(np.arange(3, dtype=np.uint64), level=1, pte_access=7,
                            **{flag: 0.5})
    # 0/1 and numpy bools are flags.
    assert EPT.make_spte(level=1, pte_access=7, pfn=1, **{flag: 1}) == \
        EPT.make_spte(level=1, pte_access=7, pfn=1, **{flag: np.bool_(True)})


def test_format_flags_are_bools():
    for kw in ("ad_bits", "exec_only", "mmio_caching", "host_64bit"):
        with pytest.raises(TypeError, match=kw):
            SpteFormat.ept(**{kw: "yes"})
    with pytest.raises(ValueError, match="mmio_caching"):
        SpteFormat.legacy(mmio_caching=2)
    with pytest.raises(TypeError, match="pt_protect"):
        EPT.write_protect_array(np.zeros(2, np.uint64), pt_protect=None)


# --- arrays and out= ------------------------------------------------------------------

def test_out_overlapping_the_input_is_refused_and_nothing_written():
    pfns = np.arange(16, dtype=np.uint64)
    before = pfns.copy()
    with pytest.raises(ValueError, match="out overlaps"):
        EPT.make_spte_array(pfns, level=1, pte_access=7, out=pfns)
    sptes = EPT.make_spte_array(pfns, level=1, pte_access=7)
    with pytest.raises(ValueError, match="out overlaps"):
        EPT.spte_to_pfn_array(sptes, out=sptes)
    raw = np.zeros(32, dtype=np.uint64)
    with pytest.raises(ValueError, match="out overlaps"):
        EPT.is_shadow_present_pte_array(raw[:16], out=raw[8:24].view(np.uint8)[:16].view(np.bool_))
    rsvd = RsvdBitsValidate.ept(maxphyaddr=46, execonly=True)
    with pytest.raises(ValueError, match="out overlaps"):
        rsvd.is_rsvd_spte_array(raw[:4], 1, out=raw.view(np.bool_)[:4])
    assert (pfns == before).all()
    assert not raw.any()


@pytest.mark.parametrize("bad, exc", [
    (np.zeros(4, np.int64), TypeError), (np.zeros(4, np.float64), TypeError),
    (np.zeros((2, 2), np.uint64), ValueError), (np.zeros(8, np.uint64)[::2], ValueError),
    ([1, 2, 3], TypeError), (None, TypeError),
])
def test_bad_arrays_name_the_argument(bad, exc):
    with pytest.raises(exc, match="sptes"):
        EPT.is_dirty_spte_array(bad)
    with pytest.raises(exc, match="sptes"):
        EPT.audit_sptes(bad, 1)
    with pytest.raises(exc, match="pfns"):
        EPT.make_spte_array(bad, level=1, pte_access=7)
    with pytest.raises(exc, match="sptes"):
        RsvdBitsValidate.ept(maxphyaddr=46, execonly=True).is_rsvd_spte_array(bad, 1)


def test_readonly_array_is_refused_in_place():
    s = EPT.make_spte_array(np.arange(4, dtype=np.uint64), level=1, pte_access=7)
    s.setflags(write=False)
    for op in (EPT.write_protect_array, EPT.clear_dirty_array, EPT.access_track_array):
        with pytest.raises(ValueError, match="sptes must be writable"):
            op(s)


# --- half-built objects ---------------------------------------------------------------

@pytest.mark.parametrize("code", [
    "from kvmmmu._core.spte import SpteFormat as C\nC.__new__(C)",
    "from kvmmmu._core.spte import RsvdBitsValidate as C\nC.__new__(C)",
    "from kvmmmu._core.spte import SpteFormat as C\nC.__new__(C, object())",
    "from kvmmmu._core.spte import SpteFormat as C\nC()",
    "from kvmmmu._core.spte import RsvdBitsValidate as C\nC(1)",
    "from kvmmmu._core.spte import SpteFormat as C\nC.ept().__init__()",
    "from kvmmmu._core.spte import RsvdBitsValidate as C\n"
    "C.ept(maxphyaddr=46, execonly=True).__init__(maxphyaddr=3)",
])
def test_half_built_formats_are_refused(code):
    assert_raises_in_child(code, TypeError)


def test_reinit_leaves_a_format_unchanged():
    f = SpteFormat.legacy(maxphyaddr=40)
    before = f.masks()
    with pytest.raises(TypeError):
        f.__init__()
    assert f.masks() == before


@pytest.mark.parametrize("cls, args", [
    ("KvmMmuPageRole", "(level=16)"), ("KvmMmuPageRole", "(1.5)"),
    ("KvmMmuExtendedRole", "(bogus=1)"), ("KvmCpuRole", "(base=1 << 33)"),
])
def test_roles_refuse_bad_construction_in_child(cls, args):
    r = run_probe(f"from kvmmmu._core.role import {cls}\n{cls}.__new__({cls}, *(), **{{}})\n"
                  f"{cls}{args}")
    assert r.signal is None and not r.hung, r.describe()
    assert r.raised in ("TypeError", "ValueError"), r.describe()


def test_role_reinit_is_a_no_op():
    role = R.KvmMmuPageRole(level=4, direct=1, access=7)
    word = role.word
    role.__init__(level=9)          # object.__init__: the role stays immutable
    role.__init__(0)
    assert role.word == word
    cpu = R.KvmCpuRole(role, 0)
    cpu.__init__(base=123)
    assert cpu.base == role


def test_new_without_args_gives_a_valid_zero_role():
    r = R.KvmMmuPageRole.__new__(R.KvmMmuPageRole)
    assert r.word == 0 and r == R.KvmMmuPageRole()


# --- hostile probes: no crash -----------------------------------------------------------

@pytest.mark.parametrize("code", [
    # Empty arrays, huge levels, overlapping out on every bulk form.
    """
    import numpy as np
    from kvmmmu._core.spte import SpteFormat
    f = SpteFormat.ept(ad_bits=False)
    e = np.zeros(0, np.uint64)
    f.make_spte_array(e, level=1, pte_access=7); f.spte_to_pfn_array(e)
    f.is_dirty_spte_array(e); f.write_protect_array(e); f.audit_sptes(e, 5)
    s = np.arange(64, dtype=np.uint64)
    for op in ("is_shadow_present_pte_array", "is_dirty_spte_array", "is_mmio_spte_array"):
        try:
            getattr(f, op)(s, out=s.view(np.bool_)[:64])
        except ValueError:
            pass
        else:
            raise AssertionError(op)
    """,
    # Every scalar helper over extreme values.
    """
    from kvmmmu._core import spte as S
    fs = [S.SpteFormat.ept(), S.SpteFormat.ept(ad_bits=False, exec_only=False),
          S.SpteFormat.legacy(maxphyaddr=52), S.SpteFormat.legacy(host_64bit=False)]
    for f in fs:
        for v in (0, 1, (1 << 64) - 1, 1 << 63, 0x7ff, f.FROZEN_SPTE):
            for m in ("is_mmu_writable_spte", "is_executable_pte", "is_access_track_spte",
                      "is_dirty_spte", "is_mmio_spte", "spte_needs_atomic_update",
                      "get_mmio_spte_gfn", "restore_acc_track_spte", "make_spte_executable",
                      "make_spte_nonexecutable", "decode_spte"):
                getattr(f, m)(v)
            for lv in range(1, 6):
                f.make_spte(level=lv, pte_access=7, pfn=(1 << 40) - 1, old_spte=v)
    """,
    # A bare __new__ must not leave a usable zero-mask object behind.
    """
    from kvmmmu._core.spte import SpteFormat, RsvdBitsValidate
    for C in (SpteFormat, RsvdBitsValidate):
        try:
            C.__new__(C)
        except TypeError:
            pass
        else:
            raise AssertionError(C)
    """,
])
def test_probe_no_crash(code):
    assert_no_crash(code, allow_raise=False)


def test_bulk_call_with_input_mutated_by_another_thread():
    # The loops read each input element once (no check-then-trust): another
    # thread rewriting the pfns cannot make them index anything.
    assert_no_crash("""
    import threading, numpy as np
    from kvmmmu._core.spte import SpteFormat
    f = SpteFormat.ept()
    pfns = np.arange(1 << 16, dtype=np.uint64)
    stop = False
    def scribble():
        while not stop:
            pfns[:] = np.uint64((1 << 64) - 1); pfns[:] = 7
    t = threading.Thread(target=scribble); t.start()
    try:
        for _ in range(200):
            try:
                f.make_spte_array(pfns, level=1, pte_access=7)
            except ValueError:
                pass
            s = f.make_spte_array(np.arange(1 << 16, dtype=np.uint64), level=1, pte_access=7)
            f.access_track_array(s); f.audit_sptes(s, 1)
    finally:
        stop = True; t.join()
    """, allow_raise=False)


# --- the core renders its own trace text --------------------------------------------

def test_spte_does_not_import_mmutrace():
    r = run_probe("""
    import sys
    from kvmmmu._core import spte
    spte.SpteFormat.ept().decode_spte(0x600000000000b77, gfn=1, level=1, sptep=8)
    assert "kvmmmu.mmutrace" not in sys.modules, "spte pulled in mmutrace"
    """)
    assert r.raised is None and r.returncode == 0, r.describe()


@pytest.mark.parametrize("fmt", [EPT, LEGACY, SpteFormat.ept(exec_only=False),
                                 SpteFormat.legacy(host_64bit=False)])
def test_decode_matches_mmutrace(fmt):
    from kvmmmu import mmutrace
    rng = np.random.default_rng(7)
    for v in rng.integers(0, 2**63, 64, dtype=np.uint64):
        v = int(v) ^ (1 << 63)
        fields = mmutrace.kvm_mmu_set_spte_fields(
            3, 0xabcde, v, 0x1238, present_mask=fmt.shadow_present_mask,
            user_mask=fmt.shadow_user_mask, x_mask=fmt.shadow_x_mask,
            nx_mask=fmt.shadow_nx_mask)
        assert fmt.decode_spte(v, gfn=0xabcde, level=3, sptep=0x1238) == \
            mmutrace.kvm_mmu_set_spte.format(**fields)


# --- debug-only checks ----------------------------------------------------------------

def test_release_build_counts_nothing():
    if S.DEBUG_BUILD:
        pytest.skip("debug build")
    S.reset_mmu_warnings()
    R.reset_mmu_warnings()
    sp = EPT.make_spte(level=2, pte_access=7, pfn=512)[0]
    EPT.mark_spte_for_access_track(sp)
    R.kvm_mmu_child_role(R.KvmMmuPageRole(level=3, has_4_byte_gpte=1), 0, direct=0, access=7)
    assert S.mmu_warnings() == {} and R.mmu_warnings() == {}
    assert S.DEBUG_BUILD is False and R.DEBUG_BUILD is False


debug_only = pytest.mark.skipif(not S.DEBUG_BUILD, reason="needs KVMMMU_DEBUG_CYTHON=1 build")


@debug_only
def test_debug_make_spte_checks():
    S.reset_mmu_warnings()
    ok, _ = EPT.make_spte(level=1, pte_access=7, pfn=1)
    assert S.mmu_warnings() == {}
    # EPT exec-only: pte_access 0 leaves only suppress-#VE == SHADOW_NONPRESENT_VALUE.
    EPT.make_spte(level=1, pte_access=0, pfn=1)
    assert S.mmu_warnings() == {
        ("make_spte", "(pte_access | shadow_present_mask) == SHADOW_NONPRESENT_VALUE"): 1}
    S.reset_mmu_warnings()
    LEGACY.make_spte(level=1, pte_access=0, pfn=1)
    assert S.mmu_warnings() == {}


@debug_only
def test_debug_access_track_and_mmio_checks():
    f = SpteFormat.ept(ad_bits=False)
    S.reset_mmu_warnings()
    # Prefetched A/D-disabled leaves are aged by make_spte: consistent, no warning.
    sp, _ = f.make_spte(level=1, pte_access=7, pfn=1, ad_disabled=True)
    f.make_spte(level=1, pte_access=7, pfn=1, ad_disabled=True, prefetch=True)
    f.mark_spte_for_access_track(sp)
    assert S.mmu_warnings() == {}
    # W without MMU-writable (built by hand) fails check_spte_writable_invariants.
    f.mark_spte_for_access_track(sp & ~f.shadow_mmu_writable_mask)
    assert S.mmu_warnings() == {
        ("mark_spte_for_access_track", "SPTE fails check_spte_writable_invariants()"): 1}
    # The branch-free bulk loop has no checks (it never calls the helper).
    S.reset_mmu_warnings()
    f.access_track_array(np.array([sp & ~f.shadow_mmu_writable_mask], np.uint64))
    assert S.mmu_warnings() == {}
    # An MMU-present SPTE that also matches the MMIO value is ambiguous.
    mmio = LEGACY.make_mmio_spte(5, 6, 1)
    assert LEGACY.is_mmio_spte(mmio)
    assert S.mmu_warnings() == {}
    LEGACY.is_mmio_spte(mmio | S.SPTE_MMU_PRESENT_MASK)
    assert S.mmu_warnings() == {("is_mmio_spte", "an MMU-present SPTE matches the MMIO value"): 1}
    S.reset_mmu_warnings()


@debug_only
def test_debug_role_child_check():
    R.reset_mmu_warnings()
    R.kvm_mmu_child_role(R.KvmMmuPageRole(level=2, has_4_byte_gpte=1), 3, direct=0, access=7)
    assert R.mmu_warnings() == {}
    R.kvm_mmu_child_role(R.KvmMmuPageRole(level=3, has_4_byte_gpte=1), 3, direct=0, access=7)
    assert R.mmu_warnings() == {
        ("kvm_mmu_child_role", "has_4_byte_gpte child is not a PG_LEVEL_4K page"): 1}


@pytest.mark.parametrize("call, name", [
    (lambda v: R.kvm_mmu_child_role(R.KvmMmuPageRole(level=4), v, direct=1, access=7),
     "sptep_index"),
    (lambda v: R.kvm_mmu_child_role(R.KvmMmuPageRole(level=4), 1, direct=1, access=v), "access"),
    (lambda v: R.kvm_mmu_child_role(R.KvmMmuPageRole(level=4), 1, direct=v, access=7), "direct"),
    (lambda v: R.kvm_calc_cpu_role(cr0=v), "cr0"),
    (lambda v: R.KvmCpuRole.from_u64(v), "as_u64"),
    (lambda v: R.KvmMmuPageRole(level=v), "level"),
])
def test_role_entry_points_refuse_floats(call, name):
    with pytest.raises(TypeError, match=name):
        call(1.0)
