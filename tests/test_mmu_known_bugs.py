"""The known bugs of issue 12, each against what the kernel (v6.18) does:

* ``kvm_rmap_zap_collapsible_sptes`` in a memslot that does not start on a
  1G boundary (mmu.c: ``kvm_mmu_zap_collapsible_spte`` asks the maximum
  mapping level at ``sp->gfn``, the start of the shadow page's region);
* eager page splitting with no memory left (best effort: the slot is still
  write-protected);
* ``n_max_mmu_pages == 0`` at root allocation (-ENOSPC out of
  ``kvm_mmu_load``);
* the ``kvm_mmu_zap_all_fast`` trace event (after the generation flip).
"""
from __future__ import annotations

import errno
import os
import re
from functools import partial
from pathlib import Path
from unittest import mock

import pytest

import _shadow_oracle as O
from _inject import hog_arena
from kvmmmu import live
from kvmmmu import mmutrace as tp
from kvmmmu._core.pt_arena import PtArena

from kvmmmu._core.guest_walk import PFERR_USER_MASK, PFERR_WRITE_MASK
from kvmmmu._core.defs import RET_PF_FIXED
from kvmmmu.host import HostConfig
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES
from kvmmmu.vm import VM, KvmParams

MiB = 1 << 20
PRESENT = 1 << 11          # SPTE_MMU_PRESENT_MASK
LARGE = 1 << 7             # PT_PAGE_SIZE_MASK
WRITABLE = 1 << 1


def _leaf(vm, v, gpa):
    """``(sp.level, spte)`` of the last SPTE a shadow walk of `gpa` visits."""
    sp, _, spte = vm.mmu_backend.shadow_walk(v, gpa)[-1]
    return sp.level, spte


def test_dirty_log_off_zaps_only_collapsible_sptes_inside_the_slot():
    """A slot at 16 MiB (not 1G-aligned, THP-backed): a 2M leaf at 16 MiB
    sits in the level-2 page of gfn 0, outside the slot; a 4K leaf at
    18 MiB + 4K, made while dirty logging was on, sits in the level-1 page
    of gfn 0x1200, inside it.  Logging off: the kernel asks the maximum
    mapping level at each page's gfn.  The 2M frame at 0x1200 may be huge
    again (2 > 1: the 4K leaf is zapped); the 1G frame at gfn 0 is the
    slot's misaligned head, disallowed (at most 2, not > 2: the 2M leaf
    stays, still write-protected from the logging)."""
    vm = VM("tdp", host=HostConfig(tdp="ept"), params=KvmParams(eager_page_split=False))
    s = vm.add_memory(16 * MiB, 4 * MiB, slot=1, thp=True, populate=True)
    v = vm.vcpus[0]
    v.vcpu_enter_guest()
    assert v.kvm_mmu_page_fault(16 * MiB, PFERR_USER_MASK) == RET_PF_FIXED
    assert _leaf(vm, v, 16 * MiB)[0] == 2
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 16 * MiB, 4 * MiB, s.userspace_addr)
    assert v.kvm_mmu_page_fault(18 * MiB + 0x1000, PFERR_WRITE_MASK | PFERR_USER_MASK) == RET_PF_FIXED
    level, spte = _leaf(vm, v, 18 * MiB + 0x1000)
    assert level == 1 and spte & PRESENT
    flushes = vm.stat.remote_tlb_flush_requests
    vm.set_user_memory_region(1, 0, 16 * MiB, 4 * MiB, s.userspace_addr)
    level, spte = _leaf(vm, v, 18 * MiB + 0x1000)
    assert level == 1 and not spte & PRESENT                 # zapped: collapsible
    level, spte = _leaf(vm, v, 16 * MiB)
    assert level == 2 and spte & PRESENT and spte & LARGE    # kept: its 1G frame is not in the slot
    assert not spte & WRITABLE
    assert vm.stat.remote_tlb_flush_requests > flushes
    assert vm.audit(raise_=False) == []
    # the zapped range faults back in huge now that logging is off
    assert v.kvm_mmu_page_fault(18 * MiB + 0x1000, PFERR_USER_MASK) == RET_PF_FIXED
    assert _leaf(vm, v, 18 * MiB + 0x1000)[0] == 2


def test_eager_split_without_memory_traces_enomem_and_write_protects():
    """kvm_mmu_slot_apply_flags with eager_page_split: the split is best
    effort (kvm_mmu_slot_try_split_huge_pages returns nothing).  With no
    page to be had, tdp_mmu_split_huge_pages_root traces the first huge leaf
    with errno -ENOMEM and stops; the ioctl still succeeds, and the huge
    leaves are write-protected like any other (slot_rmap / TDP write
    protection from 2M when PML is on, from 4K otherwise), so the first
    write after it faults and is logged."""
    with mock.patch("kvmmmu.vm.PtArena", partial(PtArena, max_tables=256, tables_per_chunk=16)):
        vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), params=KvmParams(eager_page_split=True))
    s = vm.add_memory(0, 4 * MiB, slot=0, thp=True, populate=True)
    v = vm.vcpus[0]
    v.vcpu_enter_guest()
    for gpa in (0x1000, 0x201000):
        assert v.kvm_mmu_page_fault(gpa, PFERR_WRITE_MASK) == RET_PF_FIXED
    root = v.mmu_root.sp
    huge = []
    for gpa in (0, 2 * MiB):
        spte, level, (w, _, _), _ = O.shadow_lookup(vm.arena, vm.fmt, root, gpa, va_bits=None)
        assert level == 2 and w
        huge.append(spte)
    hog = hog_arena(vm.arena)
    try:
        with tp.capture("kvm_mmu_split_huge_page") as ring:
            vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MiB, s.userspace_addr)
        assert ring.lines() == [f"kvm_mmu_split_huge_page: gfn 0 spte {huge[0]:x} level 2 errno -12"]
        for gpa in (0, 2 * MiB):
            spte, level, (w, _, _), _ = O.shadow_lookup(vm.arena, vm.fmt, root, gpa, va_bits=None)
            assert level == 2 and spte is not None and not w
    finally:
        for c in hog:
            c.free()
    assert vm.audit(raise_=False) == []
    vm.get_dirty_log(0)
    assert v.kvm_mmu_page_fault(0x3000, PFERR_WRITE_MASK) == RET_PF_FIXED
    bitmap = vm.get_dirty_log(0)
    assert _bit(bitmap, 3) and not _bit(bitmap, 4)


def _bit(bitmap, i):
    b = bytes(bitmap) if not hasattr(bitmap, "tobytes") else bitmap.tobytes()
    return bool(b[i >> 3] >> (i & 7) & 1)


# -- n_max_mmu_pages == 0: the root load fails with -ENOSPC ------------------------------

def _paging_guest(v):
    """Long mode with CR3 at gpa 0x1000 (no memslot needs to hold it)."""
    v.kvm_set_cr4(1 << 5)                          # PAE
    v.kvm_set_efer((1 << 8) | (1 << 11))           # LME, NX
    v.kvm_set_cr3(0x1000)
    v.kvm_set_cr0(1 | 1 << 16 | 1 << 31)           # PE, WP, PG


@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
def test_root_load_without_mmu_pages_fails_with_enospc(mmu):
    """Before the first memslot commit ``n_max_mmu_pages`` is 0: the shadow
    MMU's mmu_alloc_direct_roots finds no page (make_mmu_pages_available:
    -ENOSPC), kvm_mmu_load returns it and vcpu_enter_guest cancels the entry
    (KVM_RUN fails with ENOSPC: test_root_load_without_memslots_live).  The
    vCPU has no root and no shadow page was made.  The first memslot sets
    the default limit (at least 64 pages) and the next entry loads a root."""
    vm = VM(mmu, host=HostConfig(tdp="ept"))
    v = vm.vcpus[0]
    assert vm.n_max_mmu_pages == 0
    sps = vm.arena.stats()["sps"]
    assert v.vcpu_enter_guest() == -errno.ENOSPC
    assert v.kvm_mmu_reload() == -errno.ENOSPC
    assert v.mmu_root is None and vm.arena.stats()["sps"] == sps
    assert vm.audit(raise_=False) == []
    vm.add_memory(0, 2 * MiB, slot=0, populate=True)
    assert vm.n_max_mmu_pages >= 64
    assert v.vcpu_enter_guest() is None and v.mmu_root is not None
    assert v.kvm_mmu_page_fault(0x5000, PFERR_WRITE_MASK | PFERR_USER_MASK) == RET_PF_FIXED


def test_a_shadow_root_for_a_cr3_outside_memslots_needs_no_page():
    """mmu_alloc_shadow_roots checks the root gfn first: not visible, the
    dummy root, before make_mmu_pages_available - no -ENOSPC."""
    vm = VM("shadow", host=HostConfig(tdp="ept"))
    v = vm.vcpus[0]
    _paging_guest(v)
    assert v.vcpu_enter_guest() is None and v.mmu_root is not None


def test_the_tdp_mmu_allocates_its_root_without_the_limit():
    """mmu_alloc_direct_roots with the TDP MMU returns before
    make_mmu_pages_available: no -ENOSPC."""
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"))
    v = vm.vcpus[0]
    assert vm.n_max_mmu_pages == 0
    assert v.vcpu_enter_guest() is None and v.mmu_root is not None


@pytest.mark.skipif(live.kvm_problem() is not None, reason=str(live.kvm_problem()))
def test_root_load_without_memslots_live():
    """This machine's KVM and the model configured like it agree: KVM_RUN on
    a VM without memslots (real mode: a direct root) fails with ENOSPC."""
    from kvmmmu.live.kvm import Kvm
    with Kvm() as k:
        lvm = k.create_vm()
        lv = lvm.create_vcpu(0)
        with pytest.raises(OSError) as e:
            lv.run()
        assert e.value.errno == errno.ENOSPC
        lvm.close()
    vm = VM.from_host()
    if vm.mmu_backend is None or vm.tdp_enabled:
        pytest.skip("the model of this host takes no shadow-MMU faults")
    assert vm.vcpus[0].vcpu_enter_guest() == -e.value.errno


# -- the kvm_mmu_zap_all_fast trace event ----------------------------------------------

_FORMAT = "kvm_mmu_zap_all_fast/format"
_LIVE_FORMAT = Path("/sys/kernel/tracing/events/kvmmmu") / _FORMAT
_DATA_FORMAT = Path(__file__).parent / "data" / "tracefs_kvmmmu" / "kvm_mmu_zap_all_fast.format"


def _format_fields(text):
    """``[(ctype, name, offset, size, signed)]`` of the event's own fields."""
    out = []
    for m in re.finditer(r"field:(.+?) (\w+);\s*offset:(\d+);\s*size:(\d+);\s*signed:(\d);", text):
        if not m.group(2).startswith("common_"):
            out.append((m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), m.group(5) == "1"))
    return out


def test_zap_all_fast_event_fields_are_the_kernels():
    """The record layout and the print format against this machine's
    tracefs (the stored v6.18 copy where tracefs is not readable)."""
    path = _LIVE_FORMAT if os.access(_LIVE_FORMAT, os.R_OK) else _DATA_FORMAT
    text = path.read_text()
    ev = tp.get_event("kvm_mmu_zap_all_fast")
    assert _format_fields(text) == [(f.ctype, f.name, f.offset, f.size, f.signed) for f in ev.fields]
    assert 'print fmt: "kvm-mmu-valid-gen %u used_pages %x"' in text


@pytest.mark.parametrize("mmu, used", [("shadow", 5), ("tdp", 4), ("tdp_mmu", 0)])
def test_zap_all_fast_traces_the_generation_it_retires(mmu, used):
    """mmu.c kvm_mmu_zap_all_fast traces under mmu_lock before it toggles
    mmu_valid_gen: the record holds the old generation and
    kvm->arch.n_used_mmu_pages, the shadow pages in use (a real-mode guest:
    four PAE roots and a page table; TDP on the shadow MMU: four levels;
    the TDP MMU's pages are not counted there) - once per fast zap,
    whatever the MMU."""
    vm = VM(mmu, host=HostConfig(tdp="ept"))
    vm.add_memory(0, 2 * MiB, slot=0, populate=True)
    v = vm.vcpus[0]
    v.vcpu_enter_guest()
    assert v.kvm_mmu_page_fault(0x5000, PFERR_WRITE_MASK | PFERR_USER_MASK) == RET_PF_FIXED
    assert vm.mmu_valid_gen == 0
    with tp.capture("kvm_mmu_zap_all_fast") as ring:
        vm.kvm_mmu_zap_all_fast()
    assert ring.lines() == [f"kvm_mmu_zap_all_fast: kvm-mmu-valid-gen 0 used_pages {used:x}"]
    assert vm.mmu_valid_gen == 1
    v.vcpu_enter_guest()                      # frees the obsolete root
    with tp.capture("kvm_mmu_zap_all_fast") as ring:
        vm.kvm_mmu_zap_all_fast()
    n_root = {"shadow": 4, "tdp": 1, "tdp_mmu": 0}[mmu]      # the fresh root(s) of gen 1
    assert ring.lines() == [f"kvm_mmu_zap_all_fast: kvm-mmu-valid-gen 1 used_pages {n_root:x}"]
    assert vm.mmu_valid_gen == 0
    assert vm.audit(raise_=False) == []
