"""kvmmmu._core.defs holds the kernel's values (Linux v6.18, x86-64).

The expectations are written out here independently of mmu_defs.h, from the
kernel's definitions: 4 KiB base pages, 9 index bits per level, the
pg_level enum, three huge-page sizes, the ACC_* bits of mmu.h, the RET_PF_*
enum order of mmu_internal.h.  Also: the SPTE and role modules re-export the
same values (one home, re-exported, never redefined).
"""
import pytest

from kvmmmu._core import defs


def test_page_geometry():
    assert defs.PAGE_SHIFT == 12
    assert defs.PAGE_SIZE == 4096 == 1 << defs.PAGE_SHIFT
    assert defs.SPTE_LEVEL_BITS == 9
    assert defs.SPTE_ENT_PER_PAGE == 512 == defs.PAGE_SIZE // 8


def test_pg_levels():
    # enum pg_level: PG_LEVEL_NONE, 4K, 2M, 1G, 512G, 256T (5-level paging).
    levels = [defs.PG_LEVEL_NONE, defs.PG_LEVEL_4K, defs.PG_LEVEL_2M, defs.PG_LEVEL_1G,
              defs.PG_LEVEL_512G, defs.PG_LEVEL_256T]
    assert levels == [0, 1, 2, 3, 4, 5]
    assert defs.PT64_ROOT_MAX_LEVEL == 5
    assert defs.KVM_NR_PAGE_SIZES == 3
    assert defs.KVM_MAX_HUGEPAGE_LEVEL == defs.PG_LEVEL_1G == 3


def test_acc_bits():
    assert (defs.ACC_EXEC_MASK, defs.ACC_WRITE_MASK, defs.ACC_USER_MASK) == (1, 2, 4)
    assert defs.ACC_ALL == 7


def test_ret_pf_enum():
    names = ["RET_PF_CONTINUE", "RET_PF_RETRY", "RET_PF_EMULATE", "RET_PF_WRITE_PROTECTED",
             "RET_PF_INVALID", "RET_PF_FIXED", "RET_PF_SPURIOUS"]
    assert [getattr(defs, n) for n in names] == list(range(7))
    assert defs.RET_PF_NAMES == {i: n for i, n in enumerate(names)}
    assert defs.PTE_PREFETCH_NUM == 8


@pytest.mark.parametrize("level", [1, 2, 3])
def test_hpage_geometry(level):
    # KVM_HPAGE_GFN_SHIFT(level) = (level - 1) * 9; KVM_PAGES_PER_HPAGE = 1 << that.
    shift = (level - 1) * 9
    assert defs.KVM_HPAGE_GFN_SHIFT_PER_LEVEL * (level - 1) == shift
    assert defs.KVM_PAGES_PER_HPAGE(level) == 1 << shift
    assert defs.KVM_PAGES_PER_HPAGE(level) * defs.PAGE_SIZE == {1: 4 << 10, 2: 2 << 20,
                                                                 3: 1 << 30}[level]
    # gfn_to_index: (gfn >> shift) - (base_gfn >> shift).
    base, gfn = 0x12345, 0x12345 + 0x80000
    assert defs.gfn_to_index(gfn, base, level) == (gfn >> shift) - (base >> shift)
    # __kvm_mmu_slot_lpages: gfn_to_index(last gfn) + 1.
    npages = 0x80001
    assert defs.kvm_mmu_slot_lpages(base, npages, level) == \
        ((base + npages - 1) >> shift) - (base >> shift) + 1


def test_spte_and_role_reexport_the_same_values():
    from kvmmmu._core import role, spte
    for name in ("PAGE_SHIFT", "SPTE_LEVEL_BITS", "SPTE_ENT_PER_PAGE", "PG_LEVEL_NONE",
                 "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G", "PG_LEVEL_512G", "PG_LEVEL_256T",
                 "PT64_ROOT_MAX_LEVEL", "ACC_EXEC_MASK", "ACC_WRITE_MASK", "ACC_USER_MASK",
                 "ACC_ALL"):
        assert getattr(spte, name) == getattr(defs, name), name
    # role's own root-level names agree with the pg_level numbers.
    assert role.PT64_ROOT_5LEVEL == defs.PT64_ROOT_MAX_LEVEL
    assert role.PT32_ROOT_LEVEL == defs.PG_LEVEL_2M


@pytest.mark.parametrize("bad, exc", [(1.0, TypeError), ("1", TypeError), (0, ValueError),
                                      (4, ValueError), (-1, ValueError)])
def test_defs_helpers_refuse_bad_levels(bad, exc):
    with pytest.raises(exc, match="level"):
        defs.KVM_PAGES_PER_HPAGE(bad)
    with pytest.raises(exc, match="level"):
        defs.gfn_to_index(1, 0, bad)
