"""The model's kernel structs against the running kernel's BTF.

KVM is built into this machine's kernel, so /sys/kernel/btf/vmlinux describes
``struct kvm_mmu_page`` (and ``pte_list_desc``, ``tdp_iter``).  Every member of
the kernel struct must sit at the same byte offset with the same size in the
model (kernel pointers are 64-bit handles there).  Skipped where the BTF is
absent or does not describe KVM.
"""
import struct

import numpy as np
import pytest

from kvmmmu.live.btf import Btf, BtfError
from kvmmmu._core.pt_arena import HEADER_DTYPE, KVM_MMU_PAGE_FIELDS

try:
    BTF = Btf.from_file() if Btf.available() else None
    if BTF is not None:
        BTF.find("kvm_mmu_page")
except (OSError, BtfError):
    BTF = None

live = pytest.mark.skipif(BTF is None, reason="no kernel BTF describing struct kvm_mmu_page")

# Kernel members the model splits into several handle fields (list_head,
# hlist_node, rcu_head): their model fields must tile the kernel member exactly.
SPLIT = {
    "link": ("link_next", "link_prev"),
    "hash_link": ("hash_next", "hash_pprev"),
    "possible_nx_huge_page_link": ("nx_link_next", "nx_link_prev"),
    "rcu_head": ("rcu_next", "rcu_gp"),
    "callback_head": ("rcu_next", "rcu_gp"),     # BTF spells rcu_head's type name
}


def _model(name):
    dt, off = HEADER_DTYPE.fields[name][:2]
    return off, dt.itemsize


@live
def test_kvm_mmu_page_size_matches_the_kernel():
    assert BTF.struct_size("kvm_mmu_page") == HEADER_DTYPE.itemsize == 184


@live
def test_every_kvm_mmu_page_member_at_the_kernel_offset_and_size():
    members = BTF.struct_layout("kvm_mmu_page")
    assert len(members) >= 20
    seen = set()
    for m in members:
        assert m.bitfield_size == 0, m
        if m.name in SPLIT:
            parts = [_model(f) for f in SPLIT[m.name]]
            start = m.offset
            for off, size in parts:
                assert off == start, (m, parts)
                start += size
            assert start == m.offset + m.size, (m, parts)
            seen.update(SPLIT[m.name])
        else:
            assert m.name in HEADER_DTYPE.fields, f"model lacks kvm_mmu_page.{m.name}"
            assert _model(m.name) == (m.offset, m.size), m
            seen.add(m.name)
    # The model's only extra field is the CONFIG_X86_32 counter, inside rcu_head.
    extra = set(HEADER_DTYPE.names) - seen
    assert extra == {"clear_spte_count"}
    rcu = next(m for m in members if m.name in ("rcu_head", "callback_head"))
    off, size = _model("clear_spte_count")
    assert rcu.offset <= off and off + size <= rcu.offset + rcu.size


@live
def test_member_order_is_the_kernels():
    order = [m.name for m in BTF.struct_layout("kvm_mmu_page")]
    model = []
    for name, *_ in KVM_MMU_PAGE_FIELDS:
        kname = next((k for k, v in SPLIT.items() if name in v and k in order), name)
        if kname in order and kname not in model:
            model.append(kname)
    assert model == order


@live
def test_pte_list_desc_size():
    from kvmmmu._core import rmap
    assert BTF.struct_size("pte_list_desc") == rmap.SIZEOF_PTE_LIST_DESC
    layout = {m.name: (m.offset, m.size) for m in BTF.struct_layout("pte_list_desc")}
    assert layout["more"] == (0, 8)
    assert layout["spte_count"] == (8, 4) and layout["tail_count"] == (12, 4)
    assert layout["sptes"] == (16, 8 * rmap.PTE_LIST_EXT)


@live
def test_tdp_iter_is_in_the_kernel():
    # The model has no tdp_iter yet; its size is recorded for the TDP MMU work.
    assert BTF.struct_size("tdp_iter") > 0


# --- the reader itself, on synthetic BTF (runs everywhere) ----------------------------

def _synthetic():
    strings = b"\0int\0s\0a\0b\0c\0"
    # type 1: int (4 bytes); type 2: struct s {int a; anon union {int b; int c;}} at 8 bytes
    types = b""
    types += struct.pack("<III", 1, (1 << 24), 4) + struct.pack("<I", 32)
    types += struct.pack("<III", 5, (4 << 24) | 2, 8)
    types += struct.pack("<III", 7, 1, 0) + struct.pack("<III", 0, 3, 32)
    types += struct.pack("<III", 0, (5 << 24) | 2, 4)
    types += struct.pack("<III", 9, 1, 0) + struct.pack("<III", 11, 1, 0)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_reader_flattens_anonymous_unions():
    b = Btf(_synthetic())
    assert b.struct_size("s") == 8
    assert [(m.name, m.offset, m.size) for m in b.struct_layout("s")] == \
        [("a", 0, 4), ("b", 4, 4), ("c", 4, 4)]


def test_reader_refuses_bad_data():
    with pytest.raises(BtfError, match="magic"):
        Btf(b"\0" * 32)
    with pytest.raises(BtfError):
        Btf(b"\x9f\xeb\x01\x00" + b"\0" * 4)
    data = bytearray(_synthetic())
    struct.pack_into("<I", data, 12, 10_000)        # type_len past the end
    with pytest.raises(BtfError, match="past the end"):
        Btf(bytes(data))
    with pytest.raises(BtfError, match="no struct"):
        Btf(_synthetic()).find("nope")
