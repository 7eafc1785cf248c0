"""Tests for kvmmmu._core.role: the KVM MMU role words (Linux v6.18).

Every expected word below is written out by hand from the bit layout in
shadow-page.md section 2 (level 3:0, has_4_byte_gpte 4, quadrant 6:5,
direct 7, access 10:8, invalid 11, efer_nx 12, cr0_wp 13, smep_andnot_wp 14,
smap_andnot_wp 15, ad_disabled 16, guest_mode 17, passthrough 18,
is_mirror 19, smm 31:24), not computed by the code under test.
"""
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmmmu._core import role as R
from kvmmmu._core.role import (
    EFER_LMA,
    EFER_NX,
    SYNC_ROLE_IGN,
    X86_CR0_PG,
    X86_CR0_WP,
    X86_CR4_LA57,
    X86_CR4_PAE,
    X86_CR4_PKE,
    X86_CR4_PSE,
    X86_CR4_SMAP,
    X86_CR4_SMEP,
    KvmCpuRole,
    KvmMmuExtendedRole,
    KvmMmuPageRole,
    kvm_calc_cpu_role,
    kvm_calc_shadow_ept_root_page_role,
    kvm_calc_shadow_mmu_root_page_role,
    kvm_calc_shadow_npt_roles,
    kvm_calc_tdp_mmu_root_page_role,
    kvm_mmu_child_role,
    kvm_mmu_get_tdp_level,
    role_sync_mismatch,
    role_trace_text,
)

# ---------------------------------------------------------------------------
# Bit layout
# ---------------------------------------------------------------------------

PAGE_ROLE_SINGLE_FIELD = [
    ("level", 1, 0x00000001),
    ("level", 4, 0x00000004),
    ("level", 15, 0x0000000F),
    ("has_4_byte_gpte", 1, 0x00000010),
    ("quadrant", 1, 0x00000020),
    ("quadrant", 2, 0x00000040),
    ("quadrant", 3, 0x00000060),
    ("direct", 1, 0x00000080),
    ("access", 1, 0x00000100),
    ("access", 2, 0x00000200),
    ("access", 4, 0x00000400),
    ("access", 7, 0x00000700),
    ("invalid", 1, 0x00000800),
    ("efer_nx", 1, 0x00001000),
    ("cr0_wp", 1, 0x00002000),
    ("smep_andnot_wp", 1, 0x00004000),
    ("smap_andnot_wp", 1, 0x00008000),
    ("ad_disabled", 1, 0x00010000),
    ("guest_mode", 1, 0x00020000),
    ("passthrough", 1, 0x00040000),
    ("is_mirror", 1, 0x00080000),
    ("smm", 1, 0x01000000),
    ("smm", 0x80, 0x80000000),
    ("smm", 0xFF, 0xFF000000),
]

EXT_ROLE_SINGLE_FIELD = [
    ("valid", 0x01),
    ("execonly", 0x02),
    ("cr4_pse", 0x04),
    ("cr4_pke", 0x08),
    ("cr4_smap", 0x10),
    ("cr4_smep", 0x20),
    ("cr4_la57", 0x40),
    ("efer_lma", 0x80),
]

PAGE_FIELD_WIDTH = {
    "level": 4, "has_4_byte_gpte": 1, "quadrant": 2, "direct": 1, "access": 3,
    "invalid": 1, "efer_nx": 1, "cr0_wp": 1, "smep_andnot_wp": 1, "smap_andnot_wp": 1,
    "ad_disabled": 1, "guest_mode": 1, "passthrough": 1, "is_mirror": 1, "smm": 8,
}
UNUSED_BITS = 0x00F00000


@pytest.mark.parametrize("name,value,word", PAGE_ROLE_SINGLE_FIELD)
def test_page_role_single_field_sets_kernel_bit(name, value, word):
    role = KvmMmuPageRole(**{name: value})
    assert role.word == word
    assert getattr(role, name) == value
    others = {k: v for k, v in role.as_dict().items() if k != name}
    assert set(others.values()) == {0}


@pytest.mark.parametrize("name,word", EXT_ROLE_SINGLE_FIELD)
def test_extended_role_single_field_sets_kernel_bit(name, word):
    ext = KvmMmuExtendedRole(**{name: 1})
    assert ext.word == word
    assert getattr(ext, name) == 1
    assert sum(ext.as_dict().values()) == 1


def test_field_tables_match_layout():
    assert [(n, w) for n, _, w in R.PAGE_ROLE_FIELDS] == list(PAGE_FIELD_WIDTH.items())
    assert [n for n, _, _ in R.EXTENDED_ROLE_FIELDS] == [n for n, _ in EXT_ROLE_SINGLE_FIELD]


def test_cpu_role_halves():
    cpu = KvmCpuRole(KvmMmuPageRole(0x00003704), KvmMmuExtendedRole(0x81))
    assert cpu.as_u64 == 0x0000008100003704
    assert cpu.base.word == 0x00003704
    assert cpu.ext.word == 0x00000081
    assert KvmCpuRole(0x00003704, 0x81) == cpu
    assert KvmCpuRole.from_u64(0x0000008100003704) == cpu
    assert KvmCpuRole.from_u64(0xFFFFFFFF00000000).ext.word == 0xFFFFFFFF
    assert cpu.replace(ext=0).as_u64 == 0x3704
    assert cpu.replace(base=KvmMmuPageRole(1)).as_u64 == 0x0000008100000001


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------

page_fields = st.fixed_dictionaries(
    {name: st.integers(0, (1 << width) - 1) for name, width in PAGE_FIELD_WIDTH.items()})


@given(page_fields)
def test_page_role_fields_word_fields(fields):
    role = KvmMmuPageRole(**fields)
    assert role.as_dict() == fields
    assert KvmMmuPageRole(role.word) == role
    for name, value in fields.items():
        assert getattr(role, name) == value


@given(st.integers(0, 0xFFFFFFFF))
def test_page_role_word_fields_word(word):
    role = KvmMmuPageRole(word)
    assert role.word == word
    # Bits 23:20 have no field: rebuilding from the fields drops them.
    assert KvmMmuPageRole(**role.as_dict()).word == word & ~UNUSED_BITS
    assert pickle.loads(pickle.dumps(role)) == role
    assert eval(repr(role), {"KvmMmuPageRole": KvmMmuPageRole}) == role


@given(st.integers(0, 0xFFFFFFFF), page_fields)
def test_replace_only_touches_named_fields(word, fields):
    role = KvmMmuPageRole(word)
    name = sorted(fields)[word % len(fields)]
    new = role.replace(**{name: fields[name]})
    assert getattr(new, name) == fields[name]
    assert {k: v for k, v in new.as_dict().items() if k != name} == \
        {k: v for k, v in role.as_dict().items() if k != name}
    assert new.word & UNUSED_BITS == word & UNUSED_BITS


@given(st.integers(0, 0xFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_extended_and_cpu_role_round_trip(ext_low, base, ext):
    e = KvmMmuExtendedRole(ext_low)
    assert KvmMmuExtendedRole(**e.as_dict()) == e
    cpu = KvmCpuRole(base, ext)
    assert cpu.as_u64 == base | (ext << 32)
    assert KvmCpuRole(cpu.base, cpu.ext) == cpu
    assert pickle.loads(pickle.dumps(cpu)) == cpu


# ---------------------------------------------------------------------------
# Typical words (shadow-page.md 2.1) and the kernel's derivations
# ---------------------------------------------------------------------------

CR0_PG_WP = X86_CR0_PG | X86_CR0_WP
LONG_MODE = dict(cr0=CR0_PG_WP, cr4=X86_CR4_PAE, efer=EFER_LMA | EFER_NX)


def test_typical_words():
    assert KvmMmuPageRole(level=4, direct=1, access=7, efer_nx=1, cr0_wp=1).word == 0x00003784
    assert KvmMmuPageRole(level=4, direct=1, access=7, efer_nx=1, cr0_wp=1,
                          ad_disabled=1).word == 0x00013784
    assert KvmMmuPageRole(level=4, access=7, efer_nx=1, cr0_wp=1).word == 0x00003704
    assert KvmMmuPageRole(level=4, access=7, guest_mode=1).word == 0x00020704


def test_sync_role_ign():
    assert SYNC_ROLE_IGN.word == 0x0004076F
    assert R.SYNC_ROLE_IGN_WORD == 0x0004076F
    assert SYNC_ROLE_IGN == KvmMmuPageRole(level=0xF, access=7, quadrant=3, passthrough=1)


@pytest.mark.parametrize("regs,smm,guest_mode,base,ext", [
    # CR0.PG=0: access=ACC_ALL, direct, nothing else; ext only valid.
    (dict(), False, False, 0x00000780, 0x01),
    (dict(cr4=X86_CR4_PAE | X86_CR4_SMEP, efer=EFER_NX | EFER_LMA), False, False, 0x00000780, 0x01),
    (dict(), True, False, 0x01000780, 0x01),
    (dict(), False, True, 0x00020780, 0x01),
    # 64-bit, 4-level: level 4, access 7, efer_nx, cr0_wp; ext valid|efer_lma.
    (LONG_MODE, False, False, 0x00003704, 0x81),
    # 64-bit with LA57, PKE, SMEP, SMAP, PSE (WP=1, so no *_andnot_wp).
    (dict(cr0=CR0_PG_WP,
          cr4=X86_CR4_PAE | X86_CR4_LA57 | X86_CR4_PKE | X86_CR4_SMEP | X86_CR4_SMAP | X86_CR4_PSE,
          efer=EFER_LMA | EFER_NX), False, False, 0x00003705, 0xFD),
    # 32-bit non-PAE, WP=0, SMEP=1, NX=0: level 2, 4-byte, smep_andnot_wp; ext valid|smep.
    (dict(cr0=X86_CR0_PG, cr4=X86_CR4_SMEP), False, False, 0x00004712, 0x21),
    # ... and SMAP too.
    (dict(cr0=X86_CR0_PG, cr4=X86_CR4_SMEP | X86_CR4_SMAP), False, False, 0x0000C712, 0x31),
    # PAE without long mode: level 3; LA57/PKE ignored outside long mode.
    (dict(cr0=CR0_PG_WP, cr4=X86_CR4_PAE | X86_CR4_LA57 | X86_CR4_PKE, efer=EFER_NX),
     False, False, 0x00003703, 0x01),
    # SMM and L2 with paging on.
    (LONG_MODE, True, True, 0x01023704, 0x81),
])
def test_kvm_calc_cpu_role(regs, smm, guest_mode, base, ext):
    cpu = kvm_calc_cpu_role(**regs, smm=smm, guest_mode=guest_mode)
    assert (cpu.base.word, cpu.ext.word) == (base, ext)
    assert cpu.as_u64 == base | (ext << 32)


def test_tdp_root_role():
    cpu = kvm_calc_cpu_role(**LONG_MODE)
    assert kvm_calc_tdp_mmu_root_page_role(cpu, 4).word == 0x00003784
    assert kvm_calc_tdp_mmu_root_page_role(cpu, 4, ad_enabled=False).word == 0x00013784
    assert kvm_calc_tdp_mmu_root_page_role(cpu, 5).word == 0x00003785
    # Only smm and guest_mode come from the CPU role.
    assert kvm_calc_tdp_mmu_root_page_role(kvm_calc_cpu_role(), 4).word == 0x00003784
    assert kvm_calc_tdp_mmu_root_page_role(kvm_calc_cpu_role(smm=True), 4).word == 0x01003784
    assert kvm_calc_tdp_mmu_root_page_role(kvm_calc_cpu_role(guest_mode=True), 4).word == 0x00023784


def test_kvm_mmu_get_tdp_level():
    assert kvm_mmu_get_tdp_level(5, 46) == 4
    assert kvm_mmu_get_tdp_level(5, 48) == 4
    assert kvm_mmu_get_tdp_level(5, 52) == 5
    assert kvm_mmu_get_tdp_level(4, 52) == 4
    assert kvm_mmu_get_tdp_level(5, 46, tdp_root_level=5) == 5


def test_shadow_mmu_root_role():
    assert kvm_calc_shadow_mmu_root_page_role(kvm_calc_cpu_role(**LONG_MODE)).word == 0x00003704
    # 32-bit non-PAE (0x4712): level raised to 3 and efer_nx forced.
    cpu32 = kvm_calc_cpu_role(cr0=X86_CR0_PG, cr4=X86_CR4_SMEP)
    assert kvm_calc_shadow_mmu_root_page_role(cpu32).word == 0x00005713
    # Paging off (0x0780): PAE-shaped level 3 root, efer_nx forced.
    assert kvm_calc_shadow_mmu_root_page_role(kvm_calc_cpu_role()).word == 0x00001783


def test_shadow_npt_roles():
    cpu, root = kvm_calc_shadow_npt_roles(CR0_PG_WP, X86_CR4_PAE | X86_CR4_PKE,
                                          EFER_LMA | EFER_NX, 4)
    # guest_mode is set; CR4.PKE is dropped before the role is computed.
    assert (cpu.base.word, cpu.ext.word) == (0x00023704, 0x81)
    assert root.word == 0x00023704
    # 5-level NPT over a 4-level L1 table: passthrough root.
    _, root5 = kvm_calc_shadow_npt_roles(CR0_PG_WP, X86_CR4_PAE, EFER_LMA | EFER_NX, 5)
    assert root5.word == 0x00063705
    # 32-bit PAE L1: root at the TDP level, not passthrough.
    _, root_pae = kvm_calc_shadow_npt_roles(CR0_PG_WP, X86_CR4_PAE, EFER_NX, 4)
    assert root_pae.word == 0x00023704


def test_shadow_ept_root_role():
    cpu = kvm_calc_shadow_ept_root_page_role(True, False, 4)
    assert (cpu.base.word, cpu.ext.word) == (0x00020704, 0x01)
    cpu = kvm_calc_shadow_ept_root_page_role(False, True, 5)
    assert (cpu.base.word, cpu.ext.word) == (0x00030705, 0x03)


@pytest.mark.parametrize("parent,index,direct,access,child", [
    # TDP root -> level 3, direct, ACC_ALL.
    (0x00003784, 0, True, 7, 0x00003783),
    (0x00003784, 511, True, 7, 0x00003783),
    # 8-byte guest: quadrant is not derived from the index.
    (0x00003704, 1, False, 7, 0x00003703),
    # 32-bit guest, PAE root q2 (0x3752) -> 4K child, quadrant = index & 1.
    (0x00003752, 7, False, 5, 0x00003531),
    (0x00003752, 6, False, 5, 0x00003511),
    # A guest 4 MiB page shadowed by a direct 4K SP keeps the same rule.
    (0x00003752, 3, True, 3, 0x000033B1),
    # NPT passthrough root (0x63705): the child is not passthrough.
    (0x00063705, 3, False, 7, 0x00023704),
    # smm, guest_mode and ad_disabled are inherited.
    (0x01033784, 0, True, 6, 0x01033683),
])
def test_kvm_mmu_child_role(parent, index, direct, access, child):
    assert kvm_mmu_child_role(KvmMmuPageRole(parent), index, direct, access).word == child


def test_role_sync_mismatch():
    # Level, access and quadrant differ: still syncable.
    assert not role_sync_mismatch(KvmMmuPageRole(0x00003511), KvmMmuPageRole(0x00003713))
    assert not role_sync_mismatch(0x00063705, 0x00023704)
    # Any other bit differs: mismatch.
    assert role_sync_mismatch(0x00013511, 0x00003511)
    assert role_sync_mismatch(0x01003511, 0x00003511)
    assert role_sync_mismatch(0x00003591, 0x00003511)


# ---------------------------------------------------------------------------
# Trace text
# ---------------------------------------------------------------------------

TRACE_TEXT = [
    # TDP MMU root, fresh VM.
    (0x00003784, 0, 0x0, 0, False, "sp gen 0 gfn 0 l4 8-byte q0 direct wux nxe ad root 0 sync"),
    (0x00003784, 0, 0x10, 0, False, "sp gen 0 gfn 10 l4 8-byte q0 direct wux nxe ad root 0 sync"),
    # Nested EPT root: efer_nx=0 prints "!nxe".
    (0x00020704, 0, 0x12345, 1, False, "sp gen 0 gfn 12345 l4 8-byte q0 wux !nxe ad root 1 sync"),
    # 32-bit guest, third PAE root.
    (0x00001752, 0, 0x1A2B3, 0, False, "sp gen 0 gfn 1a2b3 l2 4-byte q2 wux nxe ad root 0 sync"),
    # Unsync level-1 SP after a fast zap.
    (0x00003701, 1, 0x5F0, 0, True, "sp gen 1 gfn 5f0 l1 8-byte q0 wux nxe ad root 0 unsync"),
    # Extremes: access 0, invalid, !nxe, !ad, all-ones numbers.
    (0x00010883, 255, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF, False,
     "sp gen 255 gfn ffffffffffffffff l3 8-byte q0 direct --- invalid !nxe !ad root 4294967295 sync"),
    # Each access value.
    (0x00001101, 0, 1, 0, False, "sp gen 0 gfn 1 l1 8-byte q0 --x nxe ad root 0 sync"),
    (0x00001201, 0, 1, 0, False, "sp gen 0 gfn 1 l1 8-byte q0 w-- nxe ad root 0 sync"),
    (0x00001301, 0, 1, 0, False, "sp gen 0 gfn 1 l1 8-byte q0 w-x nxe ad root 0 sync"),
    (0x00001401, 0, 1, 0, False, "sp gen 0 gfn 1 l1 8-byte q0 -u- nxe ad root 0 sync"),
    (0x00001501, 0, 1, 0, False, "sp gen 0 gfn 1 l1 8-byte q0 -ux nxe ad root 0 sync"),
    (0x00001601, 0, 1, 0, False, "sp gen 0 gfn 1 l1 8-byte q0 wu- nxe ad root 0 sync"),
    # Not printed: cr0_wp, smep/smap_andnot_wp, guest_mode, passthrough, is_mirror, smm.
    (0xFF0FF784, 0, 0, 0, False, "sp gen 0 gfn 0 l4 8-byte q0 direct wux nxe !ad root 0 sync"),
    # Seen on a live 6.18 kernel (shadow paging, real-mode guest): PAE-root
    # children of the paging-off root 0x1783, then the same SPs zapped.
    (0x00001782, 0, 0x40000, 0, False,
     "sp gen 0 gfn 40000 l2 8-byte q0 direct wux nxe ad root 0 sync"),
    (0x00001782, 0, 0xC0000, 1, False,
     "sp gen 0 gfn c0000 l2 8-byte q0 direct wux nxe ad root 1 sync"),
    (0x00001F82, 0, 0x0, 0, False,
     "sp gen 0 gfn 0 l2 8-byte q0 direct wux invalid nxe ad root 0 sync"),
]


@pytest.mark.parametrize("word,gen,gfn,root_count,unsync,text", TRACE_TEXT)
def test_role_trace_text(word, gen, gfn, root_count, unsync, text):
    assert role_trace_text(KvmMmuPageRole(word), gen, gfn, root_count, unsync) == text
    assert role_trace_text(word, gen, gfn, root_count, unsync) == text


def test_paging_off_pae_root_role_matches_live_trace():
    # The live lines above come from mmu_alloc_root(level=2) under the shadow
    # root of a CR0.PG=0 vCPU: check the role chain that produces them.
    root = kvm_calc_shadow_mmu_root_page_role(kvm_calc_cpu_role())
    assert root.replace(level=2).word == 0x00001782


# ---------------------------------------------------------------------------
# Equality, hashing, immutability, repr
# ---------------------------------------------------------------------------

def test_equality_and_hash():
    a, b = KvmMmuPageRole(0x3784), KvmMmuPageRole(level=4, direct=1, access=7, efer_nx=1, cr0_wp=1)
    assert a == b and not (a != b) and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert a != KvmMmuPageRole(0x3785)
    assert a != 0x3784
    assert KvmMmuExtendedRole(1) != KvmMmuPageRole(1)
    assert KvmCpuRole(1, 1) == KvmCpuRole.from_u64((1 << 32) | 1)


def test_immutable():
    role = KvmMmuPageRole(0x3784)
    with pytest.raises(AttributeError):
        role.level = 3
    with pytest.raises(AttributeError):
        role.word = 0
    assert role.replace(level=3).word == 0x3783 and role.word == 0x3784


def test_repr_lists_nonzero_fields():
    assert repr(KvmMmuPageRole(0x00013784)) == (
        "KvmMmuPageRole(word=0x00013784, level=4, direct=1, access=7, efer_nx=1, cr0_wp=1, "
        "ad_disabled=1)")
    assert repr(KvmMmuPageRole()) == "KvmMmuPageRole(word=0x00000000)"
    assert repr(KvmMmuExtendedRole(0x81)) == "KvmMmuExtendedRole(word=0x00000081, valid=1, efer_lma=1)"
    assert repr(KvmCpuRole(0, 1)) == (
        "KvmCpuRole(base=KvmMmuPageRole(word=0x00000000), "
        "ext=KvmMmuExtendedRole(word=0x00000001, valid=1))")


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,width", list(PAGE_FIELD_WIDTH.items()))
def test_out_of_range_field_names_the_field(name, width):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        KvmMmuPageRole(**{name: 1 << width})
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        KvmMmuPageRole(**{name: -1})
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        KvmMmuPageRole().replace(**{name: 1 << width})


def test_bad_input():
    with pytest.raises(TypeError, match="bogus"):
        KvmMmuPageRole(bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        KvmMmuPageRole().replace(bogus=1)
    with pytest.raises(TypeError, match="cr4_pse"):
        KvmMmuPageRole(cr4_pse=1)
    with pytest.raises(TypeError, match="level"):
        KvmMmuPageRole(level="4")
    with pytest.raises(TypeError, match="level"):
        KvmMmuPageRole(level=4.0)
    with pytest.raises(ValueError, match="word"):
        KvmMmuPageRole(1 << 32)
    with pytest.raises(ValueError, match="word"):
        KvmMmuPageRole(-1)
    with pytest.raises(ValueError, match="efer_lma"):
        KvmMmuExtendedRole(efer_lma=2)
    with pytest.raises(TypeError, match="base"):
        KvmCpuRole(base=KvmMmuExtendedRole(1))
    with pytest.raises(ValueError, match="ext"):
        KvmCpuRole(0, 1 << 32)
    with pytest.raises(ValueError, match="as_u64"):
        KvmCpuRole.from_u64(1 << 64)


def test_bad_derivation_input():
    cpu = kvm_calc_cpu_role(**LONG_MODE)
    with pytest.raises(ValueError, match="smm"):
        kvm_calc_cpu_role(smm=2)
    with pytest.raises(ValueError, match="cr0"):
        kvm_calc_cpu_role(cr0=1 << 64)
    with pytest.raises(ValueError, match="tdp_level"):
        kvm_calc_tdp_mmu_root_page_role(cpu, 2)
    with pytest.raises(ValueError, match="tdp_level"):
        kvm_calc_tdp_mmu_root_page_role(cpu, 6)
    with pytest.raises(TypeError, match="cpu_role"):
        kvm_calc_tdp_mmu_root_page_role(cpu.base, 4)
    with pytest.raises(ValueError, match="CR0.PG"):
        kvm_calc_shadow_npt_roles(0, X86_CR4_PAE, EFER_LMA, 4)
    with pytest.raises(ValueError, match="level-1"):
        kvm_mmu_child_role(KvmMmuPageRole(level=1), 0, True, 7)
    with pytest.raises(ValueError, match="sptep_index"):
        kvm_mmu_child_role(KvmMmuPageRole(level=2), 512, True, 7)
    with pytest.raises(ValueError, match="access"):
        kvm_mmu_child_role(KvmMmuPageRole(level=2), 0, True, 8)
    with pytest.raises(TypeError, match="parent_role"):
        kvm_mmu_child_role(0x3784, 0, True, 7)


@pytest.mark.parametrize("args,match", [
    ((0x3784, 256, 0, 0, False), "mmu_valid_gen"),
    ((0x3784, 0, 1 << 64, 0, False), "gfn"),
    ((0x3784, 0, -1, 0, False), "gfn"),
    ((0x3784, 0, 0, 1 << 32, False), "root_count"),
    ((0x3784, 0, 0, -1, False), "root_count"),
    ((0x3784, 0, 0, 0, 2), "unsync"),
    ((1 << 32, 0, 0, 0, False), "role"),
])
def test_trace_text_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        role_trace_text(*args)
