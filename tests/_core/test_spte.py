"""kvmmmu._core.spte against the kernel's constants and worked examples.

Expected values are written out in hex from the kernel's definitions (v6.18
spte.h/spte.c and vmx.h) and from ../shared/reference/spte.md §10; where
v6.18 differs from that file's v6.12 baseline the derivation is spelled out.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmmmu._core import spte as S
from kvmmmu._core.spte import RsvdBitsValidate, SpteFormat

EPT = SpteFormat.ept()
EPT_NOAD = SpteFormat.ept(ad_bits=False)
LEGACY = SpteFormat.legacy()


# --- constants -------------------------------------------------------------

@pytest.mark.parametrize("name, value", [
    ("SPTE_MMU_PRESENT_MASK", 0x800),
    ("SPTE_TDP_AD_SHIFT", 52),
    ("SPTE_TDP_AD_MASK", 0x0030000000000000),
    ("SPTE_TDP_AD_ENABLED", 0),
    ("SPTE_TDP_AD_DISABLED", 0x0010000000000000),
    ("SPTE_TDP_AD_WRPROT_ONLY", 0x0020000000000000),
    ("SPTE_BASE_ADDR_MASK", 0x000FFFFFFFFFF000),
    ("SHADOW_ACC_TRACK_SAVED_BITS_MASK", 0x5),
    ("SHADOW_ACC_TRACK_SAVED_BITS_SHIFT", 54),
    ("DEFAULT_SPTE_HOST_WRITABLE", 0x200),
    ("DEFAULT_SPTE_MMU_WRITABLE", 0x400),
    ("EPT_SPTE_HOST_WRITABLE", 0x0200000000000000),
    ("EPT_SPTE_MMU_WRITABLE", 0x0400000000000000),
    ("MMIO_SPTE_GEN_LOW_MASK", 0x7F8),
    ("MMIO_SPTE_GEN_HIGH_MASK", 0x7FF0000000000000),
    ("MMIO_SPTE_GEN_LOW_SHIFT", 3),
    ("MMIO_SPTE_GEN_HIGH_SHIFT", 44),
    ("MMIO_SPTE_GEN_MASK", 0x7FFFF),
    ("SPTE_MMIO_ALLOWED_MASK", 0x800FFFFFFFFFF007),
    ("SHADOW_NONPRESENT_VALUE", 0x8000000000000000),
    ("FROZEN_SPTE", 0x80000000000005A0),
    ("ACC_EXEC_MASK", 1), ("ACC_WRITE_MASK", 2), ("ACC_USER_MASK", 4), ("ACC_ALL", 7),
    ("PT_PAGE_SIZE_MASK", 0x80), ("PT64_NX_MASK", 1 << 63),
    ("VMX_EPT_MISCONFIG_WX_VALUE", 0x6), ("VMX_EPT_SUPPRESS_VE_BIT", 1 << 63),
    ("PT64_ROOT_MAX_LEVEL", 5), ("SPTE_ENT_PER_PAGE", 512),
])
def test_constants(name, value):
    assert getattr(S, name) == value


LEGACY_MASKS = dict(
    shadow_present_mask=0x1, shadow_user_mask=0x4, shadow_x_mask=0, shadow_nx_mask=1 << 63,
    shadow_accessed_mask=0x20, shadow_dirty_mask=0x40, shadow_acc_track_mask=0,
    shadow_host_writable_mask=0x200, shadow_mmu_writable_mask=0x400,
    shadow_mmio_value=0x0008000000000001, shadow_mmio_mask=0x0008000000000001,
    shadow_mmio_access_mask=0x6, kvm_ad_enabled=True, enable_mmio_caching=True,
    shadow_nonpresent_or_rsvd_mask=0, shadow_nonpresent_or_rsvd_lower_gfn_mask=0x3FFFFFFFF000,
)
EPT_MASKS = dict(
    shadow_present_mask=1 << 63, shadow_user_mask=0x1, shadow_x_mask=0x4, shadow_nx_mask=0,
    shadow_accessed_mask=0x100, shadow_dirty_mask=0x200, shadow_acc_track_mask=0x7,
    shadow_host_writable_mask=1 << 57, shadow_mmu_writable_mask=1 << 58,
    shadow_mmio_value=0x6, shadow_mmio_mask=0x8000000000000007, shadow_mmio_access_mask=0,
    kvm_ad_enabled=True, enable_mmio_caching=True,
)


@pytest.mark.parametrize("fmt, expected", [
    (LEGACY, LEGACY_MASKS),
    (EPT, EPT_MASKS),
    # v6.13+: EPT keeps A/D bits 8/9 in the masks without hardware A/D.
    (EPT_NOAD, dict(EPT_MASKS, kvm_ad_enabled=False)),
    # Without execute-only support, R joins the present mask.
    (SpteFormat.ept(exec_only=False), dict(EPT_MASKS, shadow_present_mask=(1 << 63) | 1)),
])
def test_format_masks(fmt, expected):
    for name, value in expected.items():
        assert getattr(fmt, name) == value, name


def test_format_mmio_caching_rules():
    # kvm.mmio_caching=0 leaves no MMIO value.
    off = SpteFormat.legacy(mmio_caching=False)
    assert off.shadow_mmio_value == 0 and not off.enable_mmio_caching
    # MAXPHYADDR 52: no reserved physical-address bit for the legacy MMIO value.
    full = SpteFormat.legacy(maxphyaddr=52)
    assert full.shadow_mmio_value == 0 and not full.enable_mmio_caching
    assert not full.is_mmio_spte(0)
    with pytest.raises(ValueError, match="MMIO caching is disabled"):
        full.make_mmio_spte(1, 0, 0)


def test_format_32bit_host():
    f = SpteFormat.legacy(host_64bit=False)
    assert f.SHADOW_NONPRESENT_VALUE == 0
    assert f.FROZEN_SPTE == 0x5A0
    assert EPT.SHADOW_NONPRESENT_VALUE == 1 << 63


def test_format_l1tf_masks():
    f = SpteFormat.legacy(l1tf_cache_bits=46)
    assert f.shadow_nonpresent_or_rsvd_mask == 0x00003E0000000000       # bits 45:41
    assert f.shadow_nonpresent_or_rsvd_lower_gfn_mask == 0x000001FFFFFFF000  # bits 40:12
    with pytest.raises(ValueError, match="l1tf_cache_bits"):
        SpteFormat.legacy(l1tf_cache_bits=47)
    with pytest.raises(ValueError, match="below maxphyaddr"):
        SpteFormat.legacy(maxphyaddr=46, l1tf_cache_bits=44)


def test_format_bad_args():
    with pytest.raises(ValueError, match="maxphyaddr"):
        SpteFormat.legacy(maxphyaddr=53)
    with pytest.raises(TypeError):
        SpteFormat()
    with pytest.raises(AttributeError):
        EPT.no_such_mask


# --- predicates --------------------------------------------------------------

def test_present_predicates():
    assert S.is_shadow_present_pte(0x800)
    assert not S.is_shadow_present_pte(S.SHADOW_NONPRESENT_VALUE)
    assert not S.is_shadow_present_pte(S.FROZEN_SPTE)
    assert not S.is_shadow_present_pte(EPT.make_mmio_spte(0x1234, 0, 0x7FFFF))
    assert S.is_large_pte(0x80) and not S.is_large_pte(0x7F)
    assert S.is_last_spte(0, 1)             # level 1 is always last
    assert not S.is_last_spte(0x800, 2)
    assert S.is_last_spte(0x880, 3)
    assert S.is_writable_pte(0x2) and not S.is_writable_pte(0x1)
    assert S.spte_to_pfn(0x8600000123456B77) == 0x123456
    assert S.spte_ad_enabled(0x800) and S.spte_ad_enabled(0x800 | S.SPTE_TDP_AD_WRPROT_ONLY)
    assert not S.spte_ad_enabled(0x800 | S.SPTE_TDP_AD_DISABLED)
    assert S.spte_ad_need_write_protect(0x800 | S.SPTE_TDP_AD_WRPROT_ONLY)
    assert S.spte_ad_need_write_protect(0x800 | S.SPTE_TDP_AD_DISABLED)
    assert not S.spte_ad_need_write_protect(0x800)
    assert EPT.is_frozen_spte(0x80000000000005A0) and not EPT.is_frozen_spte(0x5A0)


def test_executable_and_mmu_writable():
    assert LEGACY.is_executable_pte(0x801) and not LEGACY.is_executable_pte(0x801 | 1 << 63)
    assert EPT.is_executable_pte(0x804) and not EPT.is_executable_pte(0x801)
    assert LEGACY.is_mmu_writable_spte(0x400) and not LEGACY.is_mmu_writable_spte(1 << 58)
    assert EPT.is_mmu_writable_spte(1 << 58) and not EPT.is_mmu_writable_spte(0x400)


# --- worked examples: make_spte ------------------------------------------------

def test_ept_4k_leaf_with_ad():
    # spte.md §10.1: MMU-present 0x800 | suppress-#VE 1<<63 | A 0x100 | X 4 |
    # R 1 | WB<<3|IPAT 0x70 | host-writable 1<<57 | pfn<<12 | W 2 |
    # MMU-writable 1<<58 | D 0x200.
    spte, wrprot = EPT.make_spte(level=1, pte_access=7, pfn=0x123456)
    assert spte == 0x8600000123456B77 and not wrprot
    # Prefetch: no Accessed bit.
    spte, _ = EPT.make_spte(level=1, pte_access=7, pfn=0x123456, prefetch=True)
    assert spte == 0x8600000123456A77


def test_ept_4k_leaf_ad_disabled_v618():
    # v6.18 differs from the v6.12 example 0x8610000123456877: the software A
    # (bit 8) and D (bit 9) bits are set for A/D-disabled SPTEs too.
    spte, _ = EPT_NOAD.make_spte(level=1, pte_access=7, pfn=0x123456, ad_disabled=True)
    assert spte == 0x8610000123456B77
    assert EPT_NOAD.is_accessed_spte(spte)
    # Access tracking: R and X copied to bits 54/56 (0x0140...), then RWX and
    # the software A bit cleared: 0x8610000123456B77 | 0x0140000000000000 & ~0x107.
    tracked = EPT_NOAD.mark_spte_for_access_track(spte)
    assert tracked == 0x8750000123456A70
    assert EPT_NOAD.is_access_track_spte(tracked)
    assert not EPT_NOAD.is_accessed_spte(tracked)
    assert EPT_NOAD.mark_spte_for_access_track(tracked) == tracked   # idempotent
    # Restore brings back R and X but not W.
    assert EPT_NOAD.restore_acc_track_spte(tracked) == 0x8610000123456A75
    # Prefetch of an A/D-disabled SPTE is access-tracked straight away.
    pre, _ = EPT_NOAD.make_spte(level=1, pte_access=7, pfn=0x123456, ad_disabled=True,
                                prefetch=True)
    assert pre == 0x8750000123456A70


def test_legacy_2m_leaf():
    # spte.md §10.2: 0x800 | P | A | U | PS | host-wr | pfn<<12 | W | MMU-wr | D.
    spte, _ = LEGACY.make_spte(level=2, pte_access=7, pfn=0x40000)
    assert spte == 0x0000000040000EE7
    spte, _ = LEGACY.make_spte(level=2, pte_access=7, pfn=0x40000, nx_huge_pages=True)
    assert spte == 0x8000000040000EE7
    # NX huge pages never touch 4K mappings.
    spte, _ = LEGACY.make_spte(level=1, pte_access=7, pfn=0x40000, nx_huge_pages=True)
    assert spte == 0x0000000040000E67


def test_make_spte_write_rules():
    # Read-only host mapping: no host-writable, no W.
    spte, wrprot = LEGACY.make_spte(level=1, pte_access=7, pfn=1, host_writable=False)
    assert spte == 0x0000000000001825 and not wrprot   # 0x800|A|U|P, no D
    # The gfn is shadowed: write refused, SPTE read-only but host-writable.
    spte, wrprot = LEGACY.make_spte(level=1, pte_access=7, pfn=1, unsync_refused=True)
    assert spte == 0x0000000000001A25 and wrprot
    # ... unless the old SPTE already was a writable leaf (no unsync check).
    old, _ = LEGACY.make_spte(level=1, pte_access=7, pfn=1)
    spte, wrprot = LEGACY.make_spte(level=1, pte_access=7, pfn=1, old_spte=old,
                                    unsync_refused=True)
    assert spte == old and not wrprot
    assert LEGACY.make_spte_wants_unsync(level=1, pte_access=7)
    assert not LEGACY.make_spte_wants_unsync(level=1, pte_access=7, old_spte=old)
    assert not LEGACY.make_spte_wants_unsync(level=1, pte_access=5)
    # A non-leaf old SPTE at level 2 (W set) still goes through the unsync check.
    assert LEGACY.make_spte_wants_unsync(level=2, pte_access=7, old_spte=0x827)
    # Synchronizing prefetch (sync_spte) sets A and is not access-tracked.
    spte, _ = LEGACY.make_spte(level=1, pte_access=7, pfn=1, prefetch=True, synchronizing=True)
    assert spte & 0x20
    # No user access: U clear; no exec on legacy: NX set.
    spte, _ = LEGACY.make_spte(level=1, pte_access=2, pfn=1)
    assert spte == 0x8000000000001E63


def test_make_spte_ad_type_and_memtype():
    spte, _ = EPT.make_spte(level=1, pte_access=7, pfn=1, ad_wrprot_only=True)
    assert spte & S.SPTE_TDP_AD_MASK == S.SPTE_TDP_AD_WRPROT_ONLY
    # ad_disabled wins over ad_wrprot_only.
    spte, _ = EPT.make_spte(level=1, pte_access=7, pfn=1, ad_disabled=True, ad_wrprot_only=True)
    assert spte & S.SPTE_TDP_AD_MASK == S.SPTE_TDP_AD_DISABLED
    # Host MMIO pfn: EPT memtype UC (0), no IPAT.
    spte, _ = EPT.make_spte(level=1, pte_access=7, pfn=1, host_mmio=True)
    assert spte & 0x78 == 0
    # NPT/legacy never gets memtype bits.
    spte, _ = LEGACY.make_spte(level=1, pte_access=7, pfn=1, host_mmio=True)
    assert spte & 0x18 == 0


def test_make_nonleaf_spte():
    # spte.md §9.2, child table at PA 0x1000000.
    assert EPT.make_nonleaf_spte(0x1000000) == 0x8000000001000907
    assert LEGACY.make_nonleaf_spte(0x1000000) == 0x0000000001000827
    assert EPT_NOAD.make_nonleaf_spte(0x1000000, ad_disabled=True) == 0x8010000001000807
    with pytest.raises(ValueError, match="child_pa"):
        EPT.make_nonleaf_spte(0x1000001)


def test_make_small_spte():
    huge, _ = LEGACY.make_spte(level=2, pte_access=7, pfn=0x40000, nx_huge_pages=True)
    # Entry 3 of the 4K child: pfn + 3, PS cleared, made executable again.
    child = LEGACY.make_small_spte(huge, 1, 3, child_access=7, nx_huge_pages=True)
    assert child == (0x0000000040000EE7 | 0x3000) & ~0x80
    # Without NX huge pages the NX bit is inherited as is.
    child = LEGACY.make_small_spte(huge, 1, 3, child_access=7)
    assert child == ((0x8000000040000EE7 | 0x3000) & ~0x80)
    # 1G -> 2M: entry 5 is 5 * 512 pages further and keeps PS.
    huge1g, _ = EPT.make_spte(level=3, pte_access=7, pfn=0x40000)
    child = EPT.make_small_spte(huge1g, 2, 5)
    assert child == huge1g | (5 * 512) << 12 and S.is_large_pte(child)
    assert EPT.make_huge_page_split_spte(huge1g, 2, 5) == child
    with pytest.raises(ValueError, match="not a present huge"):
        EPT.make_small_spte(0x800, 1, 0)
    with pytest.raises(ValueError, match="index"):
        EPT.make_small_spte(huge1g, 2, 512)


def test_make_huge_spte():
    small, _ = LEGACY.make_spte(level=1, pte_access=7, pfn=0x40123)
    huge = LEGACY.make_huge_spte(small, 2)
    assert S.spte_to_pfn(huge) == 0x40000 and S.is_large_pte(huge)
    assert huge == (small | 0x80) & ~0x1FF000
    assert LEGACY.make_huge_spte(small, 2, nx_huge_pages=True) == huge | 1 << 63
    with pytest.raises(ValueError, match="huge-page level"):
        LEGACY.make_huge_spte(small, 1)


def test_make_spte_executable_on_tracked_spte():
    spte, _ = EPT_NOAD.make_spte(level=1, pte_access=6, pfn=1, ad_disabled=True)
    tracked = EPT_NOAD.mark_spte_for_access_track(spte)
    x = EPT_NOAD.make_spte_executable(tracked)
    # Still access-tracked, but X is now saved in bit 56.
    assert EPT_NOAD.is_access_track_spte(x) and x & (1 << 56)
    assert EPT_NOAD.restore_acc_track_spte(x) & 0x5 == 0x5


# --- MMIO --------------------------------------------------------------------

@pytest.mark.parametrize("fmt, expected", [
    (EPT, 0x01200000FEBF01A6),
    (SpteFormat.ept(l1tf_cache_bits=46), 0x01203E00FEBF01A6),
    (LEGACY, 0x01280000FEBF01A7),
])
def test_mmio_spte_worked_examples(fmt, expected):
    # spte.md §10.3: gfn 0xFEBF0, generation 0x1234, access 7.
    spte = fmt.make_mmio_spte(0xFEBF0, 7, 0x1234)
    assert spte == expected
    assert fmt.is_mmio_spte(spte)
    assert not S.is_shadow_present_pte(spte)
    assert fmt.get_mmio_spte_gfn(spte) == 0xFEBF0
    assert S.get_mmio_spte_generation(spte) == 0x1234
    assert fmt.get_mmio_spte_access(spte) == (6 if fmt.name == "legacy" else 0)


def test_mmio_l1tf_relocation():
    f = SpteFormat.legacy(l1tf_cache_bits=46)
    spte = f.make_mmio_spte(0x200000001, 7, 0x1234)
    assert spte == 0x012C3E00000011A7
    assert f.get_mmio_spte_gfn(spte) == 0x200000001


@given(gfn=st.integers(0, (1 << 34) - 1), gen=st.integers(0, 0x7FFFF),
       access=st.integers(0, 7),
       phys=st.sampled_from([(46, None), (46, 46), (40, 44), (36, 44)]),
       ept=st.booleans())
def test_mmio_round_trip(gfn, gen, access, phys, ept):
    maxphyaddr, l1tf = phys
    fmt = (SpteFormat.ept if ept else SpteFormat.legacy)(maxphyaddr=maxphyaddr,
                                                         l1tf_cache_bits=l1tf)
    gfn %= fmt.max_gfn + 1
    spte = fmt.make_mmio_spte(gfn, access, gen)
    assert fmt.is_mmio_spte(spte)
    assert not S.is_shadow_present_pte(spte)
    assert fmt.get_mmio_spte_gfn(spte) == gfn
    assert S.get_mmio_spte_generation(spte) == gen
    assert fmt.get_mmio_spte_access(spte) == access & fmt.shadow_mmio_access_mask


def test_mmio_bad_input():
    with pytest.raises(ValueError, match="generation"):
        EPT.make_mmio_spte(1, 0, 0x80000)
    with pytest.raises(ValueError, match="gfn"):
        EPT.make_mmio_spte(1 << 34, 0, 0)
    with pytest.raises(ValueError, match="access"):
        EPT.make_mmio_spte(1, 8, 0)


# --- volatile bits / flush rules ---------------------------------------------

@pytest.mark.parametrize("fmt, spte, expected", [
    # MMU-writable but not W: fast page fault may set W.
    (LEGACY, 0x800 | 0x1 | 0x200 | 0x400 | 0x20 | 0x40, True),
    # Writable and dirty, A/D enabled: nothing can change under us.
    (LEGACY, 0x800 | 0x1 | 0x2 | 0x200 | 0x400 | 0x20 | 0x40, False),
    # Writable, D clear: the CPU may set D.
    (LEGACY, 0x800 | 0x1 | 0x2 | 0x200 | 0x400 | 0x20, True),
    # v6.15+: a clear Accessed bit alone does not count.
    (LEGACY, 0x800 | 0x1 | 0x2 | 0x200 | 0x400 | 0x40, False),
    # Read-only, not MMU-writable, A/D enabled.
    (LEGACY, 0x800 | 0x1 | 0x200 | 0x20, False),
    # Any A/D-disabled SPTE.
    (EPT_NOAD, 0x800 | S.SPTE_TDP_AD_DISABLED | 0x5, True),
])
def test_spte_needs_atomic_update(fmt, spte, expected):
    assert fmt.spte_needs_atomic_update(spte) is expected
    assert fmt.spte_has_volatile_bits(spte) is expected


def test_leaf_flush_and_writable_invariants():
    assert LEGACY.leaf_spte_change_needs_tlb_flush(0xE67, 0xA67)      # lost MMU-writable
    assert not LEGACY.leaf_spte_change_needs_tlb_flush(0xE67, 0xE65)  # lost W only
    LEGACY.check_spte_writable_invariants(0xE67)
    with pytest.raises(AssertionError, match="not Host-writable"):
        LEGACY.check_spte_writable_invariants(0xC67)
    with pytest.raises(AssertionError, match="not MMU-writable"):
        LEGACY.check_spte_writable_invariants(0xA67)


def test_is_dirty_spte():
    spte, _ = EPT.make_spte(level=1, pte_access=7, pfn=1)
    assert EPT.is_dirty_spte(spte) and not EPT.is_dirty_spte(spte & ~0x200)
    # Write-protect-tracked SPTEs are dirty while writable, whatever bit 9 says.
    spte, _ = EPT.make_spte(level=1, pte_access=7, pfn=1, ad_wrprot_only=True)
    assert EPT.is_dirty_spte(spte & ~0x200) and not EPT.is_dirty_spte(spte & ~0x2)


def test_ept_ve_possible():
    spte, _ = EPT.make_spte(level=1, pte_access=7, pfn=1)
    assert not EPT.is_ept_ve_possible(spte)
    assert EPT.is_ept_ve_possible(spte & ~(1 << 63))
    assert not LEGACY.is_ept_ve_possible(0)


# --- decode: the kvm_mmu_set_spte tracepoint text ------------------------------

def test_decode_spte():
    # "gfn %llx spte %llx (%s%s%s%s) level %d at %llx"
    assert (EPT.decode_spte(0x8600000123456B77, gfn=0x10, level=1, sptep=0x1234008)
            == "gfn 10 spte 8600000123456b77 (rwxu) level 1 at 1234008")
    # Legacy, no exec (NX), not user, read-only.
    assert (LEGACY.decode_spte(0x8000000000001A21, gfn=0xabc, level=2, sptep=0xff8)
            == "gfn abc spte 8000000000001a21 (r---) level 2 at ff8")
    # Legacy: r comes from the present mask being non-zero, even with P clear.
    assert LEGACY.decode_spte(0, gfn=0, level=1) == "gfn 0 spte 0 (r-x-) level 1 at 0"


@settings(max_examples=300)
@given(fmt=st.sampled_from(["legacy", "ept", "ept-noad"]), spte=st.integers(0, 2**64 - 1),
       gfn=st.integers(0, 2**52), level=st.integers(1, 5), sptep=st.integers(0, 2**52))
def test_decode_spte_is_the_tracepoint_text(fmt, spte, gfn, level, sptep):
    # The core renders without importing mmutrace (it sits below it); the
    # text must still be the kvm_mmu_set_spte event's, field for field.
    from kvmmmu import mmutrace
    f = {"legacy": LEGACY, "ept": EPT, "ept-noad": EPT_NOAD}[fmt]
    fields = mmutrace.kvm_mmu_set_spte_fields(
        level, gfn, spte, sptep, present_mask=f.shadow_present_mask, user_mask=f.shadow_user_mask,
        x_mask=f.shadow_x_mask, nx_mask=f.shadow_nx_mask)
    assert f.decode_spte(spte, gfn=gfn, level=level, sptep=sptep) == \
        mmutrace.kvm_mmu_set_spte.format(**fields)


# --- round trip: make, then decode every field ------------------------------------

FORMATS = {"legacy": LEGACY, "ept": EPT, "ept-noad": EPT_NOAD}


@settings(max_examples=400)
@given(fmt_name=st.sampled_from(sorted(FORMATS)), level=st.integers(1, 3),
       access=st.integers(0, 7), pfn=st.integers(0, (1 << (46 - 12)) - 1),
       prefetch=st.booleans(), synchronizing=st.booleans(), host_writable=st.booleans(),
       nx_huge=st.booleans(), unsync_refused=st.booleans(), wrprot_only=st.booleans())
def test_make_spte_round_trip(fmt_name, level, access, pfn, prefetch, synchronizing,
                              host_writable, nx_huge, unsync_refused, wrprot_only):
    # pfns stay below the formats' MAXPHYADDR (46): above it a pfn hits
    # reserved bits (legacy's MMIO value uses bit 51), as in the kernel.
    fmt = FORMATS[fmt_name]
    ad_disabled = fmt_name == "ept-noad"
    spte, wrprot = fmt.make_spte(level=level, pte_access=access, pfn=pfn, prefetch=prefetch,
                                 synchronizing=synchronizing, host_writable=host_writable,
                                 nx_huge_pages=nx_huge, unsync_refused=unsync_refused,
                                 ad_disabled=ad_disabled, ad_wrprot_only=wrprot_only)
    want_write = bool(access & 2) and host_writable and not unsync_refused
    want_exec = bool(access & 1) and not (nx_huge and level > 1)
    tracked = prefetch and not synchronizing
    assert S.is_shadow_present_pte(spte)
    assert not fmt.is_mmio_spte(spte)
    assert S.spte_to_pfn(spte) == pfn
    assert S.is_large_pte(spte) == (level > 1)
    assert S.is_last_spte(spte, level)
    assert wrprot == (bool(access & 2) and host_writable and unsync_refused)
    assert fmt.is_mmu_writable_spte(spte) == want_write
    assert bool(spte & fmt.shadow_host_writable_mask) == host_writable
    fmt.check_spte_writable_invariants(spte)
    ad_type = (S.SPTE_TDP_AD_DISABLED if ad_disabled
               else S.SPTE_TDP_AD_WRPROT_ONLY if wrprot_only else 0)
    assert spte & S.SPTE_TDP_AD_MASK == ad_type
    if ad_disabled and tracked:
        assert fmt.is_access_track_spte(spte)
        spte = fmt.restore_acc_track_spte(spte)
        assert not S.is_writable_pte(spte)
    else:
        assert S.is_writable_pte(spte) == want_write
        assert fmt.is_dirty_spte(spte) == want_write
    assert fmt.is_executable_pte(spte) == want_exec
    assert bool(spte & fmt.shadow_user_mask) == bool(access & 4)
    assert fmt.is_accessed_spte(spte) == (not tracked)


# --- bulk forms: each element equals the scalar helper ---------------------------

def _random_sptes(n=4096, seed=7):
    rng = np.random.default_rng(seed)
    sptes = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
    made = [EPT.make_spte(level=1, pte_access=int(a), pfn=int(p))[0]
            for a, p in zip(rng.integers(0, 8, 512), rng.integers(0, 1 << 40, 512))]
    sptes[:512] = np.array(made, dtype=np.uint64)
    sptes[512:600] = S.SHADOW_NONPRESENT_VALUE
    return sptes


@pytest.mark.parametrize("fmt", [LEGACY, EPT, EPT_NOAD], ids=["legacy", "ept", "ept-noad"])
def test_bulk_predicates_match_scalar(fmt):
    sptes = _random_sptes()
    vals = [int(x) for x in sptes]
    cases = {
        "is_shadow_present_pte_array": S.is_shadow_present_pte,
        "is_writable_pte_array": S.is_writable_pte,
        "is_mmu_writable_spte_array": fmt.is_mmu_writable_spte,
        "is_accessed_spte_array": fmt.is_accessed_spte,
        "is_dirty_spte_array": fmt.is_dirty_spte,
        "is_mmio_spte_array": fmt.is_mmio_spte,
        "is_access_track_spte_array": fmt.is_access_track_spte,
    }
    for method, scalar in cases.items():
        got = getattr(fmt, method)(sptes)
        assert got.dtype == np.bool_
        assert got.tolist() == [scalar(v) for v in vals], method
    assert fmt.is_last_spte_array(sptes, 2).tolist() == [S.is_last_spte(v, 2) for v in vals]
    assert fmt.spte_to_pfn_array(sptes).tolist() == [S.spte_to_pfn(v) for v in vals]


@pytest.mark.parametrize("fmt", [LEGACY, EPT, EPT_NOAD], ids=["legacy", "ept", "ept-noad"])
def test_bulk_mutations_match_scalar(fmt):
    sptes = _random_sptes(seed=11)
    vals = [int(x) for x in sptes]

    def apply(rule, level=1):
        out = []
        for v in vals:
            out.append(rule(v) if S.is_shadow_present_pte(v) and S.is_last_spte(v, level) else v)
        return out

    for level in (1, 2):
        a = sptes.copy()
        n = fmt.write_protect_array(a, level=level)
        want = apply(lambda v: v & ~2, level)
        assert a.tolist() == want and n == sum(x != y for x, y in zip(vals, want))
        a = sptes.copy()
        fmt.write_protect_array(a, pt_protect=True, level=level)
        assert a.tolist() == apply(lambda v: v & ~(2 | fmt.shadow_mmu_writable_mask), level)
        a = sptes.copy()
        fmt.clear_dirty_array(a, level=level)
        assert a.tolist() == apply(
            lambda v: v & ~2 if S.spte_ad_need_write_protect(v) else v & ~fmt.shadow_dirty_mask,
            level)
        a = sptes.copy()
        n = fmt.access_track_array(a, level=level)
        want = apply(lambda v: _acc_track_model(fmt, v), level)
        assert a.tolist() == want and n == sum(x != y for x, y in zip(vals, want))


def _acc_track_model(fmt, v):
    """mark_spte_for_access_track written out from the kernel's rules."""
    if not S.spte_ad_enabled(v):
        if v & fmt.shadow_acc_track_mask == 0:
            return v
        v |= (v & 5) << 54
        return v & ~(fmt.shadow_acc_track_mask | fmt.shadow_accessed_mask)
    return v & ~fmt.shadow_accessed_mask


def test_make_spte_array_matches_scalar():
    rng = np.random.default_rng(3)
    pfns = rng.integers(0, 1 << 40, 1000, dtype=np.uint64)
    for fmt, kw in ((EPT, dict(level=1, pte_access=7)),
                    (LEGACY, dict(level=2, pte_access=5, nx_huge_pages=True, prefetch=True))):
        got = fmt.make_spte_array(pfns, **kw)
        assert got.tolist() == [fmt.make_spte(pfn=int(p), **kw)[0] for p in pfns]
        out = np.zeros_like(pfns)
        assert fmt.make_spte_array(pfns, out=out, **kw) is out
        assert out.tolist() == got.tolist()


def test_rsvd_bulk_matches_scalar():
    chk = RsvdBitsValidate.ept(maxphyaddr=46, execonly=False)
    sptes = _random_sptes()
    assert (chk.is_rsvd_spte_array(sptes, 2).tolist()
            == [chk.is_rsvd_spte(int(v), 2) for v in sptes])


def test_empty_arrays():
    e = np.empty(0, dtype=np.uint64)
    assert EPT.is_shadow_present_pte_array(e).shape == (0,)
    assert EPT.make_spte_array(e, level=1, pte_access=7).shape == (0,)
    assert EPT.clear_dirty_array(e) == 0


# --- bad input: specific errors, nothing changed -----------------------------------

def test_bad_scalar_input():
    with pytest.raises(ValueError, match="pfn=0x10000000000 is wider than the 40-bit PFN"):
        EPT.make_spte(level=1, pte_access=7, pfn=1 << 40)
    for level in (0, 6):
        with pytest.raises(ValueError, match=f"level={level} is outside 1..5"):
            EPT.make_spte(level=level, pte_access=7, pfn=1)
        with pytest.raises(ValueError, match="level"):
            S.is_last_spte(0, level)
    with pytest.raises(TypeError, match="level must be an int"):
        EPT.make_spte(level=1.0, pte_access=7, pfn=1)
    with pytest.raises(ValueError, match="pte_access"):
        EPT.make_spte(level=1, pte_access=8, pfn=1)
    with pytest.raises(ValueError, match="spte=-0x1 does not fit"):
        S.is_shadow_present_pte(-1)
    with pytest.raises(ValueError, match="spte"):
        S.is_shadow_present_pte(1 << 64)
    with pytest.raises(TypeError, match="spte must be an int"):
        S.spte_to_pfn("0x800")


def test_bad_array_input_leaves_state_unchanged():
    good = _random_sptes()[:64].copy()
    snapshot = good.copy()
    with pytest.raises(TypeError, match="sptes must have dtype uint64, not int64"):
        EPT.clear_dirty_array(good.astype(np.int64))
    with pytest.raises(TypeError, match="sptes must be a numpy.ndarray"):
        EPT.is_shadow_present_pte_array(list(good))
    with pytest.raises(ValueError, match="sptes must be C-contiguous"):
        EPT.write_protect_array(good[::2])
    with pytest.raises(ValueError, match="one-dimensional"):
        EPT.access_track_array(good.reshape(8, 8))
    ro = good.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="sptes must be writable"):
        EPT.clear_dirty_array(ro)
    with pytest.raises(ValueError, match="level"):
        EPT.clear_dirty_array(good, level=0)
    assert np.array_equal(good, snapshot)

    pfns = np.array([1, 2, 1 << 40, 3], dtype=np.uint64)
    out = np.full(4, 0xAA, dtype=np.uint64)
    with pytest.raises(ValueError, match=r"pfns\[2\]=0x10000000000 is wider"):
        EPT.make_spte_array(pfns, level=1, pte_access=7, out=out)
    assert out.tolist() == [0xAA] * 4
    with pytest.raises(ValueError, match=r"pfns\[2\]"):
        EPT.make_spte_array(pfns, level=1, pte_access=7)
    with pytest.raises(ValueError, match=r"out must have shape \(3,\)"):
        EPT.spte_to_pfn_array(good[:3], out=np.empty(4, dtype=np.uint64))
    with pytest.raises(TypeError, match="out must have dtype bool"):
        EPT.is_shadow_present_pte_array(good, out=np.empty(64, dtype=np.uint8))


# --- reserved bits ------------------------------------------------------------------

def _hexrows(chk):
    return [[int(x) for x in row] for row in chk.rsvd_bits_mask]


def test_rsvd_legacy_worked_example():
    # spte.md §7.1: MAXPHYADDR 46, 4-level, nx, gbpages, amd.
    chk = RsvdBitsValidate.legacy(maxphyaddr=46, level=4, nx=True, gbpages=True, amd=True)
    rows = _hexrows(chk)
    assert rows[0][3] == 0x000FC00000000180
    assert rows[0][2] == rows[0][1] == rows[0][0] == 0x000FC00000000000
    assert rows[1][2] == 0x000FC0003FFFE000
    assert rows[1][1] == 0x000FC000001FE000
    assert chk.bad_mt_xwr == 0
    # Without NX, bit 63 is reserved everywhere; without gbpages, PS in a PDPTE.
    chk = RsvdBitsValidate.legacy(maxphyaddr=46, level=4, nx=False, gbpages=False)
    assert chk.is_rsvd_spte(1 << 63, 1)
    assert chk.is_rsvd_spte(0x80, 3)
    assert not chk.is_rsvd_spte(0x80, 2)
    assert chk.is_rsvd_spte(1 << 46, 1) and not chk.is_rsvd_spte(1 << 45, 1)


def test_rsvd_ept_worked_example():
    # spte.md §7.2: MAXPHYADDR 46, huge level 1G.
    chk = RsvdBitsValidate.ept(maxphyaddr=46, execonly=True)
    rows = _hexrows(chk)
    assert rows[0][3] == 0x000FC000000000F8
    assert rows[0][2] == rows[0][1] == 0x000FC00000000078
    assert rows[1][2] == 0x000FC0003FFFF000
    assert rows[1][1] == 0x000FC000001FF000
    assert chk.bad_mt_xwr == 0xFF444444FFFF4444
    assert RsvdBitsValidate.ept(maxphyaddr=46, execonly=False).bad_mt_xwr == 0xFF545454FFFF5454
    # Write-only is always bad, exec-only only without the capability.
    assert chk.is_rsvd_spte(0x32, 1)               # WB, W only
    assert not chk.is_rsvd_spte(0x34, 1)           # WB, X only, execonly
    assert RsvdBitsValidate.ept(maxphyaddr=46, execonly=False).is_rsvd_spte(0x34, 1)
    # The SPTEs make_spte builds pass the check.
    spte, _ = EPT.make_spte(level=1, pte_access=7, pfn=0x123456)
    assert not chk.is_rsvd_spte(spte, 1)
    # Huge pages above huge_level are reserved.
    assert RsvdBitsValidate.ept(maxphyaddr=46, execonly=True, huge_level=2).is_rsvd_spte(
        0x80 | 0x37, 3)


def test_rsvd_bad_args():
    with pytest.raises(ValueError, match="level"):
        RsvdBitsValidate.legacy(maxphyaddr=46, level=1, nx=True, gbpages=True)
    with pytest.raises(ValueError, match="huge_level"):
        RsvdBitsValidate.ept(maxphyaddr=46, execonly=True, huge_level=4)
    chk = RsvdBitsValidate.ept(maxphyaddr=46, execonly=True)
    with pytest.raises(ValueError, match="level"):
        chk.is_rsvd_spte(0, 0)


# --- auditor ---------------------------------------------------------------------

def _table(fmt, level=1, **kw):
    """A table as KVM fills it: empty entries, a few leaves, an MMIO entry."""
    t = np.full(512, fmt.SHADOW_NONPRESENT_VALUE, dtype=np.uint64)
    for i in range(0, 512, 7):
        t[i] = fmt.make_spte(level=level, pte_access=i % 8, pfn=i << 9, **kw)[0]
    if fmt.enable_mmio_caching:
        t[1] = fmt.make_mmio_spte(0x1234, 6, 0x42)
    t[2] = fmt.FROZEN_SPTE
    return t


@pytest.mark.parametrize("fmt, kw", [
    (LEGACY, {}), (EPT, {}), (EPT, dict(ad_wrprot_only=True)),
    (EPT_NOAD, dict(ad_disabled=True)), (EPT_NOAD, dict(ad_disabled=True, prefetch=True)),
    (SpteFormat.ept(exec_only=False, ad_bits=False), dict(ad_disabled=True, prefetch=True)),
])
def test_audit_accepts_kernel_built_tables(fmt, kw):
    for level in (1, 2):
        t = _table(fmt, level, **kw)
        assert fmt.audit_sptes(t, level) == 512
        # Aging, dirty logging and write protection keep the invariants.
        fmt.access_track_array(t, level=level)
        fmt.clear_dirty_array(t, level=level)
        fmt.write_protect_array(t, pt_protect=True, level=level)
        assert fmt.audit_sptes(t, level) == 512
    t = np.full(512, fmt.SHADOW_NONPRESENT_VALUE, dtype=np.uint64)
    t[5] = fmt.make_nonleaf_spte(0x5000, ad_disabled=bool(kw.get("ad_disabled")))
    assert fmt.audit_sptes(t, 2) == 512


@pytest.mark.parametrize("fmt, corrupt, rule", [
    (LEGACY, lambda s: s & ~0x200, "MMU-writable SPTE is not Host-writable"),
    (LEGACY, lambda s: s & ~0x400, "writable SPTE is not MMU-writable"),
    (EPT, lambda s: s | 1 << 54, "saved bits"),
    (EPT, lambda s: s & ~(1 << 63), "lacks shadow_present_mask"),
    (LEGACY, lambda s: s | S.SPTE_TDP_AD_DISABLED, "A/D type bits"),
    (LEGACY, lambda s: 0, "neither SHADOW_NONPRESENT_VALUE"),
])
def test_audit_names_the_broken_rule(fmt, corrupt, rule):
    t = _table(fmt)
    t[14] = corrupt(int(t[14]))
    with pytest.raises(S.SpteAuditError, match=rf"sptes\[14\].*{rule}"):
        fmt.audit_sptes(t, 1)
