"""The seam between the VM plumbing and the MMUs (the MMU half of ``mmu.c``
and ``x86.c`` that generic KVM code calls).

The VM layer (:mod:`kvmmmu.vm`, and through the VM's public hooks
:mod:`kvmmmu.memslots`, :mod:`kvmmmu.notifiers` and :mod:`kvmmmu.memattrs`)
never calls an MMU directly: it calls the functions here, which do the
MMU-independent part of the kernel's entry point and fan out to every MMU
registered on the VM (``vm.mmus``, each an :class:`MmuBackend`).  The VM
binds the functions as its methods (``vm.kvm_unmap_gfn_range(rng)``), so a
caller pays one Python call, as before.

What lives here, by kernel entry point:

================================================  ================================
kernel                                            here
================================================  ================================
``kvm_mmu_faultin_pfn`` (+ ``kvm_handle_noslot``)  :func:`kvm_mmu_faultin_pfn`
``is_page_fault_stale``                            :func:`is_page_fault_stale`
``kvm_mmu_max_mapping_level``                      :func:`kvm_mmu_max_mapping_level`
                                                  (+ ``_array``, a batch form)
``lpage_info``: ``kvm_mmu_gfn_{dis,}allow_lpage``,  :func:`kvm_mmu_gfn_disallow_lpage`, ...
``hugepage_has_attrs``, MIXED flags
``kvm_arch_{pre,post}_set_memory_attributes``      same names
``kvm_mmu_init_memslot_memory_attributes``         same name
``kvm_mmu_slot_apply_flags`` (dirty logging)       same name
``kvm_unmap_gfn_range``, ``kvm_age_gfn``,           same names (fan-outs)
``kvm_test_age_gfn``, ``kvm_zap_gfn_range``,
``kvm_arch_flush_shadow_{all,memslot}``,
``kvm_arch_mmu_enable_log_dirty_pt_masked``,
``kvm_mmu_zap_all_fast``, ``kvm_mmu_change_mmu_pages``
================================================  ================================

Layering: this module imports the layers below it (memslots, notifiers,
memattrs, host, the core) and nothing imports it but :mod:`kvmmmu.vm`.
"""
from __future__ import annotations

import errno as E
from dataclasses import dataclass

import numpy as np

from kvmmmu._core._checks import check_array, int_arg, out_array
from kvmmmu._core.defs import (
    KVM_MAX_HUGEPAGE_LEVEL, KVM_PAGES_PER_HPAGE, PAGE_SHIFT, RET_PF_CONTINUE, RET_PF_EMULATE,
    RET_PF_RETRY, gfn_to_index,
)
from kvmmmu.host import (
    KVM_PFN_ERR_HWPOISON, KVM_PFN_ERR_RO_FAULT, KVM_PFN_ERR_SIGPENDING, KVM_PFN_NOSLOT,
    hva_to_pfn, is_error_pfn,
)
from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmmmu.memslots import (
    KVM_LPAGE_MIXED_FLAG, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEMSLOT_INVALID,
    KvmMemorySlot, KvmMrChange, kvm_mmu_max_gfn,
)
from kvmmmu.notifiers import (
    KVM_FILTER_PRIVATE, KVM_FILTER_SHARED, KvmGfnRange, mmu_invalidate_retry_gfn,
    mmu_invalidate_retry_gfn_unsafe,
)

__all__ = [
    "MmuBackend", "RecordingMmu", "MMU_BACKEND_HOOKS", "FaultinResult",
    "kvm_mmu_faultin_pfn", "is_page_fault_stale",
    "kvm_mmu_max_mapping_level", "kvm_mmu_max_mapping_level_array",
    "lpage_info_slot", "kvm_mmu_gfn_disallow_lpage", "kvm_mmu_gfn_allow_lpage",
    "hugepage_has_attrs", "kvm_mmu_init_memslot_memory_attributes",
    "kvm_arch_pre_set_memory_attributes", "kvm_arch_post_set_memory_attributes",
    "kvm_mmu_slot_apply_flags",
    "kvm_unmap_gfn_range", "kvm_age_gfn", "kvm_test_age_gfn", "kvm_zap_gfn_range",
    "kvm_arch_flush_shadow_all", "kvm_arch_flush_shadow_memslot",
    "kvm_arch_mmu_enable_log_dirty_pt_masked", "kvm_mmu_zap_all_fast",
    "kvm_mmu_change_mmu_pages",
]

_U64 = (1 << 64) - 1


# ==================================================================================
# The MMU interface
# ==================================================================================

class MmuBackend:
    """What the VM layer calls in an MMU (the kernel's ``mmu.c`` / ``tdp_mmu.c``
    entry points used by generic and memslot code).  Every hook defaults to
    "nothing to do"; boolean hooks return whether a TLB flush is needed (or,
    for aging, whether anything was young).

    The hooks, who calls them (through the fan-out functions of this module)
    and under which locks:

    ==========================================  ======================================  ==========
    hook                                        called from (kernel path)               locks held
    ==========================================  ======================================  ==========
    ``kvm_unmap_gfn_range(rng)``                MMU-notifier ``invalidate_range_start``  mmu_lock W
                                                (inside begin/end), memslot DELETE,
                                                ``kvm_arch_pre_set_memory_attributes``
    ``kvm_age_gfn(rng)``                        ``clear(_flush)_young`` (lockless aging) none
    ``kvm_test_age_gfn(rng)``                   ``test_young`` (lockless aging)         none
    ``kvm_zap_gfn_range(start, end)``           ``kvm_zap_gfn_range`` (MTRR, CR0.CD,    mmu_lock W
                                                APICv), inside its own begin/end
    ``kvm_arch_flush_shadow_memslot(slot)``     ``kvm_set_memslot`` DELETE / MOVE,      slots_lock
                                                after the INVALID slot is published
    ``kvm_arch_flush_shadow_all()``             notifier ``release`` (mm exit)          none
    ``kvm_mmu_zap_all_fast()``                  MMIO generation wrap in                 slots_lock
                                                ``kvm_swap_active_memslots``
    ``kvm_mmu_change_mmu_pages(n)``             commit of CREATE / DELETE (default      slots_lock
                                                shadow-page budget)
    ``kvm_mmu_recover_huge_pages(slot)``        commit: dirty logging turned off        slots_lock
    ``kvm_mmu_slot_try_split_huge_pages``       commit: dirty logging on (eager split)  slots_lock
    ``kvm_mmu_slot_leaf_clear_dirty(slot)``     commit: dirty logging on, with PML      slots_lock
    ``kvm_mmu_slot_remove_write_access``        commit: dirty logging on (level 1, or   slots_lock
                                                2 with PML)
    ``kvm_arch_mmu_enable_log_dirty_pt_masked`` ``KVM_GET/CLEAR_DIRTY_LOG``, per        mmu_lock W
                                                non-zero 64-bit word
    ==========================================  ======================================  ==========

    Entry points with no hook of their own: ``kvm_arch_{pre,post}_set_memory_attributes``
    (the MIXED/lpage bookkeeping is here; the MMU sees only the unmap), and
    ``kvm_mmu_invalidate_{begin,end}`` (generic bookkeeping in
    :mod:`kvmmmu.notifiers`; x86 has no arch hook there).

    Failure contract: a hook may raise.  Before the point of no return the
    VM takes its operation back (an aborted notifier start, an attribute
    change, a memslot flush before publication, a dirty-log re-protect);
    after it (commit hooks, zaps) the VM completes its own bookkeeping; in
    both cases the exception propagates and the VM's audit stays clean
    (tests/test_vm_flaky_backend.py).  The VM's ioctls, its notifier
    callbacks and ``kvm_zap_gfn_range`` call hooks with ``vm.api_lock`` held,
    so those calls come from one thread at a time; an MMU's own fault path
    (faultin, lpage counters) runs without it.
    """

    def kvm_unmap_gfn_range(self, rng) -> bool:
        return False

    def kvm_age_gfn(self, rng) -> bool:
        return False

    def kvm_test_age_gfn(self, rng) -> bool:
        return False

    def kvm_zap_gfn_range(self, gfn_start, gfn_end) -> bool:
        return False

    def kvm_arch_flush_shadow_memslot(self, slot) -> None:
        pass

    def kvm_arch_flush_shadow_all(self) -> None:
        pass

    def kvm_mmu_zap_all_fast(self) -> None:
        pass

    def kvm_mmu_change_mmu_pages(self, nr_mmu_pages) -> None:
        pass

    def kvm_mmu_recover_huge_pages(self, slot) -> None:
        pass

    def kvm_mmu_slot_try_split_huge_pages(self, slot, target_level) -> None:
        pass

    def kvm_mmu_slot_leaf_clear_dirty(self, slot) -> None:
        pass

    def kvm_mmu_slot_remove_write_access(self, slot, start_level) -> None:
        pass

    def kvm_arch_mmu_enable_log_dirty_pt_masked(self, slot, gfn_offset, mask) -> None:
        pass

    def audit(self) -> list[str]:
        """The MMU's own invariants, checked by :meth:`VM.audit`: the
        violations found (none by default)."""
        return []


class RecordingMmu(MmuBackend):
    """An :class:`MmuBackend` that records every call as ``(name, args)`` in
    :attr:`calls`; boolean hooks return ``returns.get(name, False)``."""

    def __init__(self, **returns):
        self.calls: list[tuple] = []
        self.returns = returns

    def _rec(self, name, *args):
        self.calls.append((name,) + args)
        return self.returns.get(name, False)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def kvm_unmap_gfn_range(self, rng):
        return self._rec("kvm_unmap_gfn_range", rng.slot.as_id, rng.slot.id, rng.start, rng.end,
                         rng.attr_filter)

    def kvm_age_gfn(self, rng):
        return self._rec("kvm_age_gfn", rng.slot.as_id, rng.slot.id, rng.start, rng.end)

    def kvm_test_age_gfn(self, rng):
        return self._rec("kvm_test_age_gfn", rng.slot.as_id, rng.slot.id, rng.start, rng.end)

    def kvm_zap_gfn_range(self, gfn_start, gfn_end):
        return self._rec("kvm_zap_gfn_range", gfn_start, gfn_end)

    def kvm_arch_flush_shadow_memslot(self, slot):
        self._rec("kvm_arch_flush_shadow_memslot", slot.as_id, slot.id, slot.base_gfn, slot.npages)

    def kvm_arch_flush_shadow_all(self):
        self._rec("kvm_arch_flush_shadow_all")

    def kvm_mmu_zap_all_fast(self):
        self._rec("kvm_mmu_zap_all_fast")

    def kvm_mmu_change_mmu_pages(self, nr_mmu_pages):
        self._rec("kvm_mmu_change_mmu_pages", nr_mmu_pages)

    def kvm_mmu_recover_huge_pages(self, slot):
        self._rec("kvm_mmu_recover_huge_pages", slot.id)

    def kvm_mmu_slot_try_split_huge_pages(self, slot, target_level):
        self._rec("kvm_mmu_slot_try_split_huge_pages", slot.id, target_level)

    def kvm_mmu_slot_leaf_clear_dirty(self, slot):
        self._rec("kvm_mmu_slot_leaf_clear_dirty", slot.id)

    def kvm_mmu_slot_remove_write_access(self, slot, start_level):
        self._rec("kvm_mmu_slot_remove_write_access", slot.id, start_level)

    def kvm_arch_mmu_enable_log_dirty_pt_masked(self, slot, gfn_offset, mask):
        self._rec("kvm_arch_mmu_enable_log_dirty_pt_masked", slot.id, gfn_offset, mask)


#: The hooks an :class:`MmuBackend` implements, in the order of its class body.
MMU_BACKEND_HOOKS = tuple(n for n in vars(MmuBackend) if n.startswith("kvm_"))


# ==================================================================================
# The fault side
# ==================================================================================

@dataclass
class FaultinResult:
    """What ``kvm_mmu_faultin_pfn`` leaves in ``struct kvm_page_fault``."""
    ret: int
    gfn: int
    slot: object = None
    pfn: int = 0
    map_writable: bool = False
    mmu_seq: int = 0
    is_private: bool = False
    #: largest level the guest_memfd backing allows (4K here) for private faults
    max_level: int = 5
    #: the fault ends in a KVM_EXIT_MEMORY_FAULT (private/shared mismatch)
    memory_fault_exit: bool = False


def kvm_mmu_faultin_pfn(vm, vcpu, gfn: int, *, write: bool = False,
                        is_private: bool = False, prefetch: bool = False,
                        addr: int | None = None, access: int = 7) -> FaultinResult:
    """``kvm_mmu_faultin_pfn`` up to (not including) taking ``mmu_lock``.

    1. ``mmu_seq = mmu_invalidate_seq`` (the snapshot the staleness checks use);
    2. private/shared mismatch with the gfn's attribute: memory-fault exit
       (``-EFAULT``);
    3. no memslot: ``kvm_handle_noslot_fault`` (cache MMIO info; emulate when
       MMIO caching is off or the gfn is above ``kvm_mmu_max_gfn``; else
       CONTINUE with ``KVM_PFN_NOSLOT`` so the MMU installs an MMIO SPTE);
    4. INVALID memslot (being deleted/moved): RETRY (``-EAGAIN`` for prefetch);
    5. the lockless notifier pre-check: RETRY;
    6. the pfn: guest_memfd for private faults (4K), else ``hva_to_pfn``
       through the memslot (READONLY slot + write: ``KVM_PFN_ERR_RO_FAULT``);
       error pfns become EMULATE (read-only slot), RETRY (hwpoison),
       ``-EINTR`` (signal) or ``-EFAULT``;
    7. the pre-check again: RETRY.
    Otherwise ``ret = RET_PF_CONTINUE``; the caller takes ``mmu_lock`` and
    calls :meth:`is_page_fault_stale` with ``result.mmu_seq``.
    """
    if vm.warn_sink.bugged:                  # the vCPU ioctl of a bugged VM: -EIO
        vm.warn_sink.check()
    # inline (no call on the common path): a real integer gfn in u64 range
    if type(gfn) is not int or not 0 <= gfn <= _U64:
        gfn = int_arg("gfn", gfn)
    r = FaultinResult(ret=RET_PF_CONTINUE, gfn=gfn, is_private=is_private)
    if vm.gfn_direct_bits and gfn & vm.gfn_direct_bits:
        vm.kvm_bug("fault gfn has the alias bit")
        r.ret = -E.EFAULT
        return r
    r.slot = slot = vcpu.gfn_to_memslot(gfn)
    r.mmu_seq = vm.notifier.mmu_invalidate_seq
    if is_private != vm.kvm_mem_is_private(gfn):
        r.ret, r.memory_fault_exit = -E.EFAULT, True
        return r
    if slot is None:
        return _handle_noslot_fault(vm, vcpu, r, addr, access)
    if slot.flags & KVM_MEMSLOT_INVALID:
        r.ret = -E.EAGAIN if prefetch else RET_PF_RETRY
        return r
    if mmu_invalidate_retry_gfn_unsafe(vm, r.mmu_seq, gfn):
        r.ret = RET_PF_RETRY
        return r
    if is_private:
        if not slot.kvm_slot_has_gmem():
            r.ret, r.memory_fault_exit = -E.EFAULT, True
            return r
        r.pfn = slot.gmem.get_pfn(slot, gfn)
        r.map_writable = not slot.flags & KVM_MEM_READONLY
        r.max_level = 1
    else:
        readonly = bool(slot.flags & KVM_MEM_READONLY)
        if readonly and write:
            r.pfn = KVM_PFN_ERR_RO_FAULT
        else:
            r.pfn, r.map_writable = hva_to_pfn(vm.host, slot.gfn_to_hva(gfn), write_fault=write,
                                               want_writable=not readonly)
    if is_error_pfn(r.pfn):
        if r.pfn == KVM_PFN_ERR_SIGPENDING:
            r.ret = -E.EINTR
        elif r.pfn == KVM_PFN_ERR_RO_FAULT:
            r.ret = RET_PF_EMULATE
        elif r.pfn == KVM_PFN_ERR_HWPOISON:
            r.ret = RET_PF_RETRY
        else:
            r.ret = -E.EFAULT
        return r
    if mmu_invalidate_retry_gfn_unsafe(vm, r.mmu_seq, gfn):
        r.ret = RET_PF_RETRY
    return r

def _handle_noslot_fault(vm, vcpu, r, addr, access):
    if r.is_private:
        r.ret, r.memory_fault_exit = -E.EFAULT, True
        return r
    gva = 0 if (vm.tdp_enabled or addr is None) else addr
    vcpu.vcpu_cache_mmio_info(gva, r.gfn, access & vm.fmt.shadow_mmio_access_mask)
    r.slot, r.pfn, r.map_writable = None, KVM_PFN_NOSLOT, False
    if not vm.enable_mmio_caching or r.gfn > kvm_mmu_max_gfn(vm):
        r.ret = RET_PF_EMULATE
    return r


def is_page_fault_stale(vm, mmu_seq: int, gfn: int, slot, *, root_obsolete: bool = False,
                        root_has_sp: bool = True, free_obsolete_roots_pending: bool = False) -> bool:
    """``is_page_fault_stale`` (mmu.c), with ``mmu_lock`` held.

    Parameters
    ----------
    mmu_seq : int
        The fault's snapshot of ``mmu_invalidate_seq``.
    gfn, slot :
        The fault's gfn and memslot (None for MMIO: no notifier check).
    root_obsolete : bool
        The vCPU's root shadow page is obsolete (``role.invalid`` or an old
        ``mmu_valid_gen``).
    root_has_sp, free_obsolete_roots_pending : bool
        For a root without a shadow page (PAE roots), a pending
        ``KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`` makes the fault stale.
    """
    if root_has_sp and root_obsolete:
        return True
    if not root_has_sp and free_obsolete_roots_pending:
        return True
    return slot is not None and mmu_invalidate_retry_gfn(vm, mmu_seq, gfn)


# ==================================================================================
# Fan-out to the MMUs (the kernel's kvm_arch_* hooks)
# ==================================================================================

def kvm_unmap_gfn_range(vm, rng: KvmGfnRange) -> bool:
    """x86 ``kvm_unmap_gfn_range``: every MMU zaps the range; returns whether a
    TLB flush is needed.  Outside memslot deletion it must run inside an
    invalidation (the kernel's lockdep assertion)."""
    if not vm.notifier.mmu_invalidate_in_progress and not vm.slots_lock_held:
        vm.warn_sink.warn("kvm_unmap_gfn_range", "kvm_unmap_gfn_range outside an invalidation")
    flush = False
    for mmu in vm.mmus:
        flush |= bool(mmu.kvm_unmap_gfn_range(rng))
    return flush


def kvm_age_gfn(vm, rng: KvmGfnRange) -> bool:
    young = False
    for mmu in vm.mmus:
        young |= bool(mmu.kvm_age_gfn(rng))
    return young


def kvm_test_age_gfn(vm, rng: KvmGfnRange) -> bool:
    for mmu in vm.mmus:
        if mmu.kvm_test_age_gfn(rng):
            return True
    return False


def kvm_zap_gfn_range(vm, gfn_start: int, gfn_end: int) -> bool:
    """x86 ``kvm_zap_gfn_range`` (MTRR/CR0.CD/APIC changes): an invalidation of
    ``[gfn_start, gfn_end)`` across all address spaces, under ``mmu_lock``."""
    if gfn_end <= gfn_start:
        vm.warn_sink.warn("kvm_zap_gfn_range", "kvm_zap_gfn_range: empty range")
        return False
    flush = False
    with vm.api_lock, vm.mmu_lock.write():
        n = vm.notifier
        n.kvm_mmu_invalidate_begin()
        n.kvm_mmu_invalidate_range_add(gfn_start, gfn_end)
        try:
            for mmu in vm.mmus:
                flush |= bool(mmu.kvm_zap_gfn_range(gfn_start, gfn_end))
        finally:
            # the invalidation ends even if an MMU raised: the zap is the whole
            # operation, and what was zapped must make racing faults retry
            if flush:
                vm.kvm_flush_remote_tlbs()
            n.kvm_mmu_invalidate_end()
    return flush


def kvm_arch_flush_shadow_all(vm) -> None:
    """``kvm_arch_flush_shadow_all``: the mm is going away; every MMU drops everything."""
    for mmu in vm.mmus:
        mmu.kvm_arch_flush_shadow_all()


def kvm_arch_flush_shadow_memslot(vm, slot) -> None:
    """``kvm_arch_flush_shadow_memslot``: a slot is being deleted or moved."""
    for mmu in vm.mmus:
        mmu.kvm_arch_flush_shadow_memslot(slot)


def kvm_arch_mmu_enable_log_dirty_pt_masked(vm, slot, gfn_offset: int, mask: int) -> None:
    """Re-arm dirty logging for the gfns of ``mask`` (64 from ``gfn_offset``)."""
    for mmu in vm.mmus:
        mmu.kvm_arch_mmu_enable_log_dirty_pt_masked(slot, gfn_offset, mask)


def kvm_mmu_zap_all_fast(vm) -> None:
    """``kvm_mmu_zap_all_fast``: obsolete every root (MMIO generation wrap)."""
    for mmu in vm.mmus:
        mmu.kvm_mmu_zap_all_fast()


def kvm_mmu_change_mmu_pages(vm, nr_mmu_pages: int) -> None:
    """``kvm_mmu_change_mmu_pages``: the shadow-page budget changed."""
    vm.n_max_mmu_pages = nr_mmu_pages
    for mmu in vm.mmus:
        mmu.kvm_mmu_change_mmu_pages(nr_mmu_pages)


def kvm_mmu_slot_apply_flags(vm, old, new, change) -> None:
    """``kvm_mmu_slot_apply_flags`` (x86.c): dirty logging switched on or off
    for a slot: recover huge pages when it goes off; otherwise split (eager
    page split), then write-protect or clear D bits, and flush."""
    old_flags = old.flags if old is not None else 0
    new_flags = new.flags if new is not None else 0
    log = bool(new_flags & KVM_MEM_LOG_DIRTY_PAGES)
    if (old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES and vm.cpu_dirty_log_size:
        n = vm.nr_memslots_dirty_logging
        if (log and n == 1) or not n:
            vm.kvm_make_all_cpus_request("KVM_REQ_UPDATE_CPU_DIRTY_LOGGING")
    if change is not KvmMrChange.KVM_MR_FLAGS_ONLY or new_flags & KVM_MEM_READONLY:
        return
    if not (old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES:
        vm.warn_sink.warn("kvm_mmu_slot_apply_flags",
                          "FLAGS_ONLY change without a dirty-logging toggle")
        return
    if not log:
        for mmu in vm.mmus:
            mmu.kvm_mmu_recover_huge_pages(new)
        return
    if vm.kvm_dirty_log_manual_protect_and_init_set:
        return
    if vm.params.eager_page_split:
        for mmu in vm.mmus:
            mmu.kvm_mmu_slot_try_split_huge_pages(new, 1)
    for mmu in vm.mmus:
        if vm.cpu_dirty_log_size:
            mmu.kvm_mmu_slot_leaf_clear_dirty(new)
            mmu.kvm_mmu_slot_remove_write_access(new, 2)
        else:
            mmu.kvm_mmu_slot_remove_write_access(new, 1)
    vm.kvm_flush_remote_tlbs()                       # kvm_flush_remote_tlbs_memslot


# ==================================================================================
# lpage_info
# ==================================================================================

def lpage_info_slot(gfn: int, slot: KvmMemorySlot, level: int) -> tuple[np.ndarray, int]:
    """``lpage_info_slot``: ``(array, index)`` of gfn's frame at ``level`` (2 or 3)."""
    return slot.arch.lpage_info[level - 2], gfn_to_index(gfn, slot.base_gfn, level)


def _update_gfn_disallow_lpage_count(vm, slot, gfn, count):
    # Checked before any level changes: a gfn outside the slot would index
    # another frame's counter (or wrap through numpy's negative indices).
    gfn = int_arg("gfn", gfn)
    if not slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
        raise ValueError(f"gfn={gfn:#x} is outside the slot [{slot.base_gfn:#x}, "
                         f"{slot.base_gfn + slot.npages:#x})")
    for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
        arr, i = lpage_info_slot(gfn, slot, level)
        old = int(arr[i])
        new = (old + count) & 0xFFFFFFFF
        if (old ^ new) & KVM_LPAGE_MIXED_FLAG:
            vm.warn_sink.warn("update_gfn_disallow_lpage_count",
                              f"disallow_lpage count flipped MIXED at gfn {gfn:#x} level {level}")
        arr[i] = new
    ledger = slot.arch.disallow_lpage_ledger
    n = ledger.get(gfn, 0) + count
    if n:
        ledger[gfn] = n
    else:
        ledger.pop(gfn, None)


def kvm_mmu_gfn_disallow_lpage(vm, slot: KvmMemorySlot, gfn: int) -> None:
    """One more reason not to map gfn's 2M and 1G frames huge (shadowed gPTE
    table at 4K, ``account_shadowed``)."""
    _update_gfn_disallow_lpage_count(vm, slot, gfn, 1)


def kvm_mmu_gfn_allow_lpage(vm, slot: KvmMemorySlot, gfn: int) -> None:
    _update_gfn_disallow_lpage_count(vm, slot, gfn, -1)


def _test_mixed(slot, gfn, level):
    arr, i = lpage_info_slot(gfn, slot, level)
    return bool(arr[i] & KVM_LPAGE_MIXED_FLAG)


def _set_mixed(slot, gfn, level, mixed):
    arr, i = lpage_info_slot(gfn, slot, level)
    if mixed:
        arr[i] |= np.uint32(KVM_LPAGE_MIXED_FLAG)
    else:
        arr[i] &= np.uint32(~KVM_LPAGE_MIXED_FLAG & 0xFFFFFFFF)


def hugepage_has_attrs(vm, slot: KvmMemorySlot, gfn: int, level: int, attrs: int) -> bool:
    """Every gfn of the frame at ``gfn`` has exactly ``attrs``: at 2M a range
    check of the attributes; at 1G every 2M sub-frame must be non-MIXED and
    start with ``attrs``."""
    p = KVM_PAGES_PER_HPAGE(level)
    if level == 2:
        return vm.mem_attrs.range_has(gfn, gfn + p, _U64, attrs, vm.supported_mem_attributes)
    sub = KVM_PAGES_PER_HPAGE(level - 1)
    for g in range(gfn, gfn + p, sub):
        if _test_mixed(slot, g, level - 1) or attrs != vm.mem_attrs.get(g):
            return False
    return True


def _frames_has_attrs(vm, slot, frames, level, attrs=None):
    """Vectorized ``hugepage_has_attrs`` for many frame starts (attrs None: each
    frame's own first-gfn attribute)."""
    frames = check_array("frames", frames)
    p = KVM_PAGES_PER_HPAGE(level)
    if level == 2:
        uni, val = vm.mem_attrs.uniform_frames(frames, p)
        if attrs is not None:
            uni &= val == np.uint64(attrs)
        return uni
    sub = KVM_PAGES_PER_HPAGE(level - 1)
    subs = (frames[:, None] + np.arange(0, p, sub, dtype=np.uint64)).ravel()
    li = slot.arch.lpage_info[level - 3]
    idx = (subs >> np.uint64(9)).astype(np.int64) - (slot.base_gfn >> 9)
    mixed = (li[idx] & np.uint32(KVM_LPAGE_MIXED_FLAG)) != 0
    val = vm.mem_attrs.get_array(subs)
    want = val.reshape(len(frames), -1)[:, 0] if attrs is None else np.full(len(frames), attrs, np.uint64)
    ok = ~mixed.reshape(len(frames), -1) & (val.reshape(len(frames), -1) == want[:, None])
    return ok.all(axis=1)


def kvm_mmu_init_memslot_memory_attributes(vm, slot: KvmMemorySlot) -> None:
    """Set MIXED on every huge frame wholly inside a new slot whose attributes
    are not uniform (frames straddling the slot edges are skipped: their
    misalignment already forbids huge pages).  Levels 2M, then 1G."""
    if not vm.has_private_mem:
        return
    for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
        p = KVM_PAGES_PER_HPAGE(level)
        end = (slot.base_gfn + slot.npages) & ~(p - 1)
        start = slot.base_gfn & ~(p - 1)
        if start < slot.base_gfn:
            start += p
        if start >= end:
            continue
        frames = np.arange(start, end, p, dtype=np.uint64)
        ok = _frames_has_attrs(vm, slot, frames, level)
        arr = slot.arch.lpage_info[level - 2]
        idx = (frames >> np.uint64((level - 1) * 9)).astype(np.int64) - (slot.base_gfn >> ((level - 1) * 9))
        arr[idx[ok]] &= np.uint32(~KVM_LPAGE_MIXED_FLAG & 0xFFFFFFFF)
        arr[idx[~ok]] |= np.uint32(KVM_LPAGE_MIXED_FLAG)


def kvm_arch_pre_set_memory_attributes(vm, rng) -> bool:
    """Before attributes change over ``rng`` (one slot): add straddled huge
    frames that may currently be mapped huge (inside the slot, not MIXED) to the
    in-progress invalidation, then unmap the old attribute's mappings.
    Returns whether a TLB flush is needed."""
    if not vm.has_private_mem:
        vm.warn_sink.warn("kvm_arch_pre_set_memory_attributes",
                          "pre_set_memory_attributes on a VM without private memory")
        return False
    if rng.end <= rng.start:
        vm.warn_sink.warn("kvm_arch_pre_set_memory_attributes",
                          "pre_set_memory_attributes: empty range")
        return False
    slot = rng.slot
    send = slot.base_gfn + slot.npages
    for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
        p = KVM_PAGES_PER_HPAGE(level)
        start = rng.start & ~(p - 1)
        end = (rng.end - 1) & ~(p - 1)
        if (start != rng.start or start + p > rng.end) and start >= slot.base_gfn and \
                start + p <= send and not _test_mixed(slot, start, level):
            vm.notifier.kvm_mmu_invalidate_range_add(start, start + p)
        if end == start:
            continue
        if end + p > rng.end and end + p <= send and not _test_mixed(slot, end, level):
            vm.notifier.kvm_mmu_invalidate_range_add(end, end + p)
    rng.attr_filter = KVM_FILTER_SHARED if rng.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE \
        else KVM_FILTER_PRIVATE
    return kvm_unmap_gfn_range(vm, rng)


def kvm_arch_post_set_memory_attributes(vm, rng) -> bool:
    """After attributes were stored: recompute MIXED for the straddled head and
    tail frames (when inside the slot) and clear it for frames wholly inside
    the range (they now have exactly the new value).  2M before 1G: the 1G
    answer reads the 2M flags."""
    if not vm.has_private_mem:
        vm.warn_sink.warn("kvm_arch_post_set_memory_attributes",
                          "post_set_memory_attributes on a VM without private memory")
        return False
    attrs = rng.attributes
    slot = rng.slot
    send = slot.base_gfn + slot.npages
    for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
        p = KVM_PAGES_PER_HPAGE(level)
        gfn = rng.start & ~(p - 1)
        if gfn != rng.start or gfn + p > rng.end:
            if gfn >= slot.base_gfn and gfn + p <= send:
                _set_mixed(slot, gfn, level, not hugepage_has_attrs(vm, slot, gfn, level, attrs))
            gfn += p
        if gfn + p <= rng.end:
            last = ((rng.end - gfn) // p) * p + gfn
            arr = slot.arch.lpage_info[level - 2]
            s = (level - 1) * 9
            i0, i1 = (gfn >> s) - (slot.base_gfn >> s), (last >> s) - (slot.base_gfn >> s)
            arr[i0:i1] &= np.uint32(~KVM_LPAGE_MIXED_FLAG & 0xFFFFFFFF)
            gfn = last
        if gfn < rng.end and gfn + p <= send:
            _set_mixed(slot, gfn, level, not hugepage_has_attrs(vm, slot, gfn, level, attrs))
    return False


def kvm_mmu_max_mapping_level(vm, slot: KvmMemorySlot, gfn: int, max_level: int = 5,
                              is_private: bool = False) -> int:
    """``__kvm_mmu_max_mapping_level``: from ``min(max_level,
    max_huge_page_level)`` go down while the frame's ``disallow_lpage`` is
    non-zero; private faults stop there (guest_memfd folios are 4K here), shared
    ones are capped by the host mapping level of the hva.  ``gfn`` must lie
    in ``slot`` (ValueError: it would index another frame's counter)."""
    # inline checks, no extra call on the common path (ints in range)
    if type(gfn) is not int or type(max_level) is not int:
        gfn, max_level = int_arg("gfn", gfn), int_arg("max_level", max_level, 1, 5)
    if not slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
        raise ValueError(f"gfn={gfn:#x} is outside the slot [{slot.base_gfn:#x}, "
                         f"{slot.base_gfn + slot.npages:#x})")
    level = min(max_level, vm.max_huge_page_level)
    while level > 1:
        arr, i = lpage_info_slot(gfn, slot, level)
        if not arr[i]:
            break
        level -= 1
    if is_private:
        return min(level, 1)
    if level == 1:
        return 1
    return min(level, vm.host.host_pfn_mapping_level(slot.gfn_to_hva(gfn)))


_CHUNK = 1 << 18


def kvm_mmu_max_mapping_level_array(vm, slot: KvmMemorySlot, gfns, max_level: int = 5,
                                    out=None) -> np.ndarray:
    """Batch ``kvm_mmu_max_mapping_level`` (shared memory) for many gfns of one
    slot; ``out`` (uint8, same length) may be given.  Works in chunks of 256K
    gfns so that temporaries stay small and are reused."""
    g_all = check_array("gfns", gfns)
    max_level = int_arg("max_level", max_level, 1, 5)
    n = g_all.shape[0]
    out = out_array("out", out, n, np.uint8, inputs=(g_all,))
    if n and (int(g_all.min()) < slot.base_gfn or int(g_all.max()) >= slot.base_gfn + slot.npages):
        raise ValueError(f"gfns must lie in the slot [{slot.base_gfn:#x}, "
                         f"{slot.base_gfn + slot.npages:#x})")
    top = min(max_level, vm.max_huge_page_level)
    for c0 in range(0, n, _CHUNK):
        g = g_all[c0:c0 + _CHUNK]
        if g.dtype != np.int64:
            g = g.astype(np.int64)
        lvl = out[c0:c0 + _CHUNK]
        lvl[:] = top
        for level in range(top, 1, -1):
            s = (level - 1) * 9
            dis = slot.arch.lpage_info[level - 2].take((g >> s) - (slot.base_gfn >> s)) != 0
            lvl[(lvl == level) & dis] = level - 1
        huge = np.flatnonzero(lvl > 1)
        if huge.size:
            hva = (slot.userspace_addr + ((g[huge] - slot.base_gfn) << PAGE_SHIFT)).astype(np.uint64)
            lvl[huge] = np.minimum(lvl[huge], vm.host.host_pfn_mapping_level_array(hva))
    return out
