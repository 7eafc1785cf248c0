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
``kvm_mmu_page_fault``                             :func:`kvm_mmu_page_fault` (also
                                                   ``vcpu.kvm_mmu_page_fault``)
``kvm_mmu_do_page_fault``                          :func:`kvm_mmu_do_page_fault`
``struct kvm_page_fault``                          :class:`KvmPageFault`
``handle_mmio_page_fault``,                        same names
``mmio_info_in_cache``
``kvm_mmu_write_protect_fault``                    same name
``page_fault_handle_page_track``,                  same names
``page_fault_can_be_fast``, ``fast_page_fault``
``kvm_mmu_hugepage_adjust``                        same name (on the fault)
``kvm_mmu_faultin_pfn``, ``kvm_handle_noslot``     :func:`faultin_pfn` (on the fault),
                                                   :func:`kvm_mmu_faultin_pfn` (by gfn)
``kvm_mmu_{load,unload,reload,reset_context}``     same names
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
import threading
from dataclasses import dataclass

import numpy as np

from kvmmmu._core._checks import check_array, int_arg, out_array
from kvmmmu._core.defs import (
    KVM_MAX_HUGEPAGE_LEVEL, KVM_PAGES_PER_HPAGE, PAGE_SHIFT, RET_PF_CONTINUE, RET_PF_EMULATE,
    RET_PF_FIXED, RET_PF_INVALID, RET_PF_RETRY, RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED,
    gfn_to_index,
)
from kvmmmu._core.guest_walk import (
    PFERR_FETCH_MASK, PFERR_IMPLICIT_ACCESS, PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PFERR_SS_MASK,
    PFERR_USER_MASK, PFERR_WRITE_MASK,
)
from kvmmmu import mmutrace as _tp

# VM types (arch/x86/include/uapi/asm/kvm.h; vm.py re-exports them)
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5
VM_TYPES = {"default": KVM_X86_DEFAULT_VM, "sw_protected": KVM_X86_SW_PROTECTED_VM,
            "sev": KVM_X86_SEV_VM, "sev_es": KVM_X86_SEV_ES_VM, "snp": KVM_X86_SNP_VM,
            "tdx": KVM_X86_TDX_VM}
from kvmmmu.host import (
    KVM_PFN_ERR_HWPOISON, KVM_PFN_ERR_MASK, KVM_PFN_ERR_NOSLOT_MASK, KVM_PFN_ERR_RO_FAULT, KVM_PFN_ERR_SIGPENDING,
    KVM_PFN_NOSLOT, hva_to_pfn, hva_to_pfn_fast,
)
from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmmmu._core.spte import SPTE_MMU_PRESENT_MASK
from kvmmmu.memslots import (
    KVM_LPAGE_MIXED_FLAG, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEMSLOT_INVALID,
    KvmMemorySlot, KvmMrChange, kvm_mmu_max_gfn, mark_page_dirty_in_slot,
)
from kvmmmu.notifiers import (
    KVM_FILTER_PRIVATE, KVM_FILTER_SHARED, KvmGfnRange, mmu_invalidate_retry_gfn,
)

__all__ = [
    "MmuBackend", "RecordingMmu", "MMU_BACKEND_HOOKS", "FaultinResult",
    "KvmPageFault", "kvm_mmu_page_fault", "kvm_mmu_do_page_fault", "kvm_mmu_prefetch_fault",
    "handle_mmio_page_fault", "mmio_info_in_cache", "kvm_mmu_write_protect_fault",
    "page_fault_handle_page_track", "page_fault_can_be_fast", "fast_page_fault",
    "kvm_mmu_hugepage_adjust", "faultin_pfn", "mark_gfn_dirty", "kvm_handle_noslot_fault",
    "kvm_mmu_load", "kvm_mmu_unload", "kvm_mmu_reload", "kvm_mmu_reset_context",
    "PFERR_PRIVATE_ACCESS", "PFERR_SYNTHETIC_MASK", "PFERR_GUEST_FINAL_MASK",
    "PFERR_GUEST_PAGE_MASK", "PFERR_GUEST_ENC_MASK", "PFERR_GUEST_RMP_MASK",
    "PFERR_GUEST_SIZEM_MASK", "PFERR_GUEST_VMPL_MASK",
    "EMULTYPE_PF", "EMULTYPE_ALLOW_RETRY_PF", "EMULTYPE_WRITE_PF_TO_SP",
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

from kvmmmu.stats import VCPU_PF_COUNTERS as _PF_COUNTERS  # noqa: E402

# indices of the fault counters in VcpuStat.pf
_PF_TAKEN, _PF_FIXED, _PF_EMULATE, _PF_SPURIOUS, _PF_FAST, _PF_MMIO_SPTE_CREATED = (
    _PF_COUNTERS.index(n) for n in ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious",
                                    "pf_fast", "pf_mmio_spte_created"))


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

    # -- the fault side (vcpu->arch.mmu): what kvm_mmu_page_fault calls in the
    # MMU that takes the vCPUs' faults (vm.mmu_backend).  Such a backend also
    # has kvm_mmu_load(vcpu) / kvm_mmu_unload(vcpu), which set and clear
    # ``vcpu.mmu_root`` (``vcpu->arch.mmu->root``: None is INVALID_PAGE).  A
    # backend that only receives the hooks (RecordingMmu) takes no faults.
    #: ``mmu->page_fault == kvm_tdp_page_fault``
    is_tdp = False
    #: ``root_role.direct``: roots indexed by gpa (TDP, or shadow without paging)
    direct = False

    def mmu_page_fault(self, vcpu, fault) -> int:
        """``vcpu->arch.mmu->page_fault``: RET_PF_* (never INVALID) or -errno."""
        raise NotImplementedError(f"{type(self).__name__} takes no page faults")

    def fast_page_fault(self, vcpu, fault) -> tuple:
        """The MMU's lockless walk + cmpxchg of ``fast_page_fault``:
        ``(RET_PF_*, made_writable)``; direct MMUs only."""
        return RET_PF_INVALID, False

    def get_mmio_spte(self, vcpu, addr) -> tuple:
        """``get_mmio_spte``: ``(reserved, spte)`` of the last entry a lockless
        walk of `addr` reaches."""
        return False, 0

    def unprotect_gfn_and_retry(self, vcpu, cr2_or_gpa) -> bool:
        """``__unprotect_gfn_and_retry``: zap the shadow pages of the
        gfn; whether something was zapped."""
        return False


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
    if addr is None:
        addr = gfn << PAGE_SHIFT if vm.tdp_enabled else 0
    fault = KvmPageFault(addr, (PFERR_WRITE_MASK if write else 0) |
                         (PFERR_PRIVATE_ACCESS if is_private else 0), prefetch,
                         vm.tdp_enabled, False, gfn)
    fault.slot = vcpu.gfn_to_memslot(gfn)
    r.ret = faultin_pfn(vcpu, fault, access)
    r.slot, r.pfn, r.map_writable, r.mmu_seq = fault.slot, fault.pfn, fault.map_writable, fault.mmu_seq
    r.memory_fault_exit = fault.memory_fault_exit
    if fault.max_level == 1:
        r.max_level = 1
    return r


# ==================================================================================
# The page fault entry (mmu.c kvm_mmu_page_fault, mmu_internal.h kvm_mmu_do_page_fault)
# ==================================================================================

# #PF error code bits above the hardware's low ones (asm/kvm_host.h); the low
# ones (P, W, U, RSVD, F, PK, SS, SGX, IMPLICIT_ACCESS) live with the guest walker.
PFERR_GUEST_RMP_MASK = 1 << 31
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33
PFERR_GUEST_ENC_MASK = 1 << 34
PFERR_GUEST_SIZEM_MASK = 1 << 35
PFERR_GUEST_VMPL_MASK = 1 << 36
#: KVM-defined: the access is to private (guest_memfd) memory
PFERR_PRIVATE_ACCESS = 1 << 49
PFERR_SYNTHETIC_MASK = PFERR_IMPLICIT_ACCESS | PFERR_PRIVATE_ACCESS
#: undefined in the #NPF error code KVM defines; AMD's supervisor-shadow-stack bit
PFERR_NPF_SSS_MASK = 1 << 37

# What reaches kvm_mmu_page_fault on a direct MMU.  VMX: handle_ept_violation
# builds P/W/U(read)/F plus GUEST_FINAL or GUEST_PAGE (and PRIVATE_ACCESS for
# a TDX private gpa), handle_ept_misconfig passes RSVD alone.  SVM:
# npf_interception passes EXITINFO1 (the #PF bits P W U RSVD F, SS, and RMP,
# GUEST_FINAL/PAGE, ENC, SIZEM, VMPL, SSS above) with the synthetic bits
# cleared, plus PRIVATE_ACCESS for an SNP encrypted access.  PRIVATE_ACCESS
# is also KVM's own (kvm_mmu_page_fault adds it for a SW-protected VM).
_EC_DIRECT_COMMON = (PFERR_PRESENT_MASK | PFERR_WRITE_MASK | PFERR_USER_MASK | PFERR_RSVD_MASK |
                     PFERR_FETCH_MASK | PFERR_GUEST_FINAL_MASK | PFERR_GUEST_PAGE_MASK |
                     PFERR_PRIVATE_ACCESS)
_EC_EPT = _EC_DIRECT_COMMON
_EC_NPT = (_EC_DIRECT_COMMON | PFERR_SS_MASK | PFERR_GUEST_RMP_MASK | PFERR_GUEST_ENC_MASK |
           PFERR_GUEST_SIZEM_MASK | PFERR_GUEST_VMPL_MASK | PFERR_NPF_SSS_MASK)


def tdp_hardware_error_code(fmt, ept: bool, spte: int, level: int, *, write: bool = False,
                            exec: bool = False) -> int:
    """The error code an EPT violation / misconfiguration or an NPF brings to
    ``kvm_mmu_page_fault`` for an access whose walk ended at `spte` (at
    `level`): an MMIO SPTE is a misconfiguration (EPT: RSVD alone) or a
    reserved-bit NPF (RSVD|P, W for a write); otherwise W for a write, F for
    a fetch, on EPT U for a read (``handle_ept_violation``), and P when the
    walk ended at a present leaf that grants some access (a permission
    fault)."""
    if spte and fmt.is_mmio_spte(spte):
        return PFERR_RSVD_MASK if ept else \
            PFERR_RSVD_MASK | PFERR_PRESENT_MASK | (PFERR_WRITE_MASK if write else 0)
    ec = (PFERR_WRITE_MASK if write else 0) | (PFERR_FETCH_MASK if exec else 0)
    if ept and not write and not exec:
        ec |= PFERR_USER_MASK
    leaf = level == 1 or (level in (2, 3) and (spte >> 7) & 1)
    if leaf and spte & SPTE_MMU_PRESENT_MASK and spte & (7 if ept else 1):
        ec |= PFERR_PRESENT_MASK
    return ec


#: no x86 CPU reports a guest-physical address of more bits (MAXPHYADDR <= 52);
#: below it, a gpa above the host's MAXPHYADDR can arrive when KVM itself runs
#: nested under an L0 that reports a smaller MAXPHYADDR: the kernel emulates
#: it (kvm_handle_noslot_fault: gfn > kvm_mmu_max_gfn)
_GPA_BITS_MAX = 52


def check_direct_fault_args(vm, cr2_or_gpa: int, error_code: int) -> None:
    """What no EPT violation / misconfiguration or #NPF can carry: a gpa of
    more than 52 bits, or error-code bits the vendor's exit handler never
    sets (EPT: P W U F RSVD GUEST_FINAL GUEST_PAGE PRIVATE_ACCESS; NPT also
    SS, RMP, ENC, SIZEM, VMPL, SSS).  Raises ValueError naming the argument;
    nothing has been counted or changed."""
    if cr2_or_gpa >> _GPA_BITS_MAX:
        raise ValueError(f"cr2_or_gpa={cr2_or_gpa:#x} has bits above {_GPA_BITS_MAX}: no CPU "
                         f"reports such a guest-physical address (MAXPHYADDR <= {_GPA_BITS_MAX})")
    tdp = vm.host_config.tdp
    ok = _EC_NPT if tdp == "npt" else _EC_EPT
    if error_code & ~ok:
        exit_ = "a #NPF" if tdp == "npt" else "an EPT violation or misconfiguration"
        raise ValueError(f"error_code={error_code:#x} has bits {error_code & ~ok:#x} that "
                         f"{exit_} never passes to kvm_mmu_page_fault")

# emulation_type bits kvm_mmu_page_fault hands to x86_emulate_instruction (kvm_host.h)
EMULTYPE_ALLOW_RETRY_PF = 1 << 3
EMULTYPE_PF = 1 << 6
EMULTYPE_WRITE_PF_TO_SP = 1 << 8


#: KvmPageFault's (exec, write, present, rsvd) for each value of the low five
#: PFERR bits (P, W, U, RSVD, F)
_PFERR_LOW_BITS = tuple(((e & PFERR_FETCH_MASK) != 0, (e & PFERR_WRITE_MASK) != 0,
                         (e & PFERR_PRESENT_MASK) != 0, (e & PFERR_RSVD_MASK) != 0)
                        for e in range(32))


class KvmPageFault:
    """``struct kvm_page_fault``: one fault as it goes through the MMU.

    Built once by :func:`kvm_mmu_do_page_fault`; the MMU's ``page_fault``
    fills in the rest.  Fields, by who sets them in the kernel:

    * arguments: ``addr`` (gpa, or gva for shadow paging), ``error_code``
      (PFERR_* bits), ``prefetch``;
    * derived from ``error_code``: ``exec`` (F), ``write`` (W), ``present``
      (P), ``rsvd`` (RSVD), ``user`` (U), ``is_private`` (PFERR_PRIVATE_ACCESS);
    * from the VM/vCPU: ``is_tdp`` (the MMU's handler is kvm_tdp_page_fault),
      ``nx_huge_page_workaround_enabled`` (``is_nx_huge_page_enabled``);
    * levels: ``max_level`` (starts at KVM_MAX_HUGEPAGE_LEVEL, lowered by
      guest_memfd or the guest's page size), ``req_level`` and ``goal_level``
      (``kvm_mmu_hugepage_adjust``; the TDP walk may lower the goal further),
      ``huge_page_disallowed`` (``exec`` with the NX workaround);
    * ``gfn`` and ``slot``: ``kvm_mmu_do_page_fault`` for direct MMUs (alias
      bits stripped), the guest walk for shadow paging;
    * faultin: ``mmu_seq`` (the invalidation sequence snapshot), ``pfn``,
      ``map_writable``;
    * ``write_fault_to_shadow_pgtable``: shadow paging's fetch found the
      write targets a page table of its own walk (EMULTYPE_WRITE_PF_TO_SP).

    Model field: ``memory_fault_exit`` (the fault ends in KVM_EXIT_MEMORY_FAULT,
    ``kvm_mmu_prepare_memory_fault_exit``).  Fields that rarely change from
    their initial value are class attributes until first written, so that
    building a fault costs a handful of stores.
    """
    is_tdp = True
    nx_huge_page_workaround_enabled = False
    max_level = KVM_MAX_HUGEPAGE_LEVEL
    req_level = 1
    goal_level = 1
    huge_page_disallowed = False
    slot = None
    mmu_seq = 0
    pfn = 0
    map_writable = False
    write_fault_to_shadow_pgtable = False
    memory_fault_exit = False
    #: model: the host mapping level faultin's GUP fast saw (0: not known)
    host_level = 0

    prefetch = False
    is_private = False
    gfn = 0

    def __init__(self, addr: int, error_code: int, prefetch: bool = False, is_tdp: bool = True,
                 nx_huge_page_workaround_enabled: bool = False, gfn: int = 0):
        self.addr = addr
        self.error_code = error_code
        # (exec, write, present, rsvd) of the low five PFERR bits, one lookup
        self.exec, self.write, self.present, self.rsvd = _PFERR_LOW_BITS[error_code & 31]
        if prefetch:
            self.prefetch = prefetch
        if error_code & PFERR_PRIVATE_ACCESS:
            self.is_private = True
        if not is_tdp:
            self.is_tdp = False
        if nx_huge_page_workaround_enabled:
            self.nx_huge_page_workaround_enabled = True
        if gfn:
            self.gfn = gfn

    @property
    def user(self) -> bool:
        """PFERR_USER (read by the shadow MMU's guest walk, never on the TDP path)."""
        return (self.error_code & PFERR_USER_MASK) != 0

    def __repr__(self):
        acc = "".join(c for c, b in (("P", self.present), ("W", self.write), ("U", self.user),
                                      ("R", self.rsvd), ("F", self.exec)) if b)
        return (f"KvmPageFault(addr={self.addr:#x}, gfn={self.gfn:#x}, {acc or '-'}"
                f"{', private' if self.is_private else ''}{', prefetch' if self.prefetch else ''}, "
                f"goal_level={self.goal_level}, pfn={self.pfn:#x})")


def kvm_mmu_page_fault(vcpu, cr2_or_gpa: int, error_code: int, insn=None, insn_len: int = 0) -> int:
    """``kvm_mmu_page_fault``: the exit handler's entry for an EPT violation /
    NPF / shadow-paging #PF (E1-E4 of ARCHITECTURE §3.0).

    1. no valid root: WARN_ON_ONCE, RET_PF_RETRY;
    2. a SW-protected VM gets PFERR_PRIVATE_ACCESS from the gfn's attribute;
    3. PFERR_RSVD: :func:`handle_mmio_page_fault` (an MMIO SPTE the hardware
       tripped over); EMULATE goes straight to emulation (no statistic);
       a stale generation (INVALID) takes the full fault;
    4. ``stat.pf_taken++`` and :func:`kvm_mmu_do_page_fault`; INVALID from it
       is a KVM_BUG (-EIO);
    5. a negative errno is returned as is; RET_PF_WRITE_PROTECTED goes
       through :func:`kvm_mmu_write_protect_fault` (RETRY or EMULATE);
    6. FIXED / EMULATE / SPURIOUS count in ``pf_fixed`` / ``pf_emulate`` /
       ``pf_spurious``.

    Returns the RET_PF_* code (RETRY, FIXED, SPURIOUS: re-enter the guest;
    EMULATE: the instruction would be emulated, with ``vcpu.emulation_type``
    recording the EMULTYPE_* flags) or a negative errno.  A bugged VM does
    not run vCPUs: :class:`~kvmmmu.warn.KvmBugError` (-EIO), nothing changes.
    ``insn``/``insn_len`` are accepted for the kernel's signature; the
    emulator is out of scope.
    """
    vm = vcpu.vm
    if vm.warn_sink.bugged:
        vm.warn_sink.check()
    if type(cr2_or_gpa) is not int or not 0 <= cr2_or_gpa <= _U64:
        cr2_or_gpa = int_arg("cr2_or_gpa", cr2_or_gpa)
    if type(error_code) is not int or not 0 <= error_code <= _U64:
        error_code = int_arg("error_code", error_code)
    mmu = vm.mmu_backend
    if mmu is None:
        raise LookupError(f"the VM (mmu={vm.mmu!r}) has no MMU backend to take page faults")
    # input no exit handler can produce is refused before anything happens
    l2 = vcpu.guest_mode                     # L2 under L1's EPT: vcpu->arch.mmu is guest_mmu
    direct = mmu.direct and not l2           # vcpu->arch.mmu->root_role.direct
    if l2:                                   # an EPT violation of L2
        mmu.check_l2_fault_args(vcpu, cr2_or_gpa, error_code)
    elif not direct:                         # a #PF: its address and error code are the CPU's
        mmu.check_fault_args(vcpu, cr2_or_gpa, error_code)
    elif error_code & ~_EC_DIRECT_COMMON or cr2_or_gpa >> _GPA_BITS_MAX:
        check_direct_fault_args(vm, cr2_or_gpa, error_code)
    if vcpu.mmu_root is None:                # !VALID_PAGE(vcpu->arch.mmu->root.hpa)
        vm.warn_sink.warn("kvm_mmu_page_fault", "page fault without a valid root", once=True)
        return RET_PF_RETRY
    if vm.kvm_sw_protected_vm and vm.kvm_mem_is_private(cr2_or_gpa >> PAGE_SHIFT):
        error_code |= PFERR_PRIVATE_ACCESS
    r = RET_PF_INVALID
    if error_code & PFERR_RSVD_MASK:
        if error_code & PFERR_PRIVATE_ACCESS:
            vm.warn_sink.warn("kvm_mmu_page_fault", "reserved-bit fault on a private access",
                              once=True)
            return -E.EFAULT
        r = handle_mmio_page_fault(vcpu, cr2_or_gpa, direct)
        if r == RET_PF_EMULATE:
            vcpu.emulation_type = EMULTYPE_PF
            return r
    stat = vcpu.stat.pf
    if r == RET_PF_INVALID:
        stat[_PF_TAKEN] += 1
        r = kvm_mmu_do_page_fault(vcpu, cr2_or_gpa, error_code, False)
        if r == RET_PF_FIXED:                    # the common case first
            stat[_PF_FIXED] += 1
            return r
        if r == RET_PF_INVALID:
            vm.kvm_bug("kvm_mmu_do_page_fault returned RET_PF_INVALID", "kvm_mmu_page_fault")
            return -E.EIO
        if r == RET_PF_EMULATE:
            vcpu.emulation_type = EMULTYPE_PF | (
                EMULTYPE_WRITE_PF_TO_SP if vcpu.last_fault.write_fault_to_shadow_pgtable else 0)
    if r < 0:
        return r
    if r == RET_PF_WRITE_PROTECTED:
        r = kvm_mmu_write_protect_fault(vcpu, cr2_or_gpa, error_code)
    if r == RET_PF_FIXED:
        stat[_PF_FIXED] += 1
    elif r == RET_PF_SPURIOUS:
        stat[_PF_SPURIOUS] += 1
    elif r == RET_PF_EMULATE:
        stat[_PF_EMULATE] += 1
    elif r == RET_PF_CONTINUE:
        vm.warn_sink.warn("kvm_mmu_page_fault", "RET_PF_CONTINUE escaped the fault path", once=True)
    return r


def kvm_mmu_do_page_fault(vcpu, cr2_or_gpa: int, err: int, prefetch: bool = False) -> int:
    """``kvm_mmu_do_page_fault``: build the :class:`KvmPageFault` (for a
    direct MMU: the gfn without the alias bits, and its memslot) and call the
    MMU's ``page_fault`` (``kvm_tdp_page_fault`` for the TDP MMU).  No
    statistics here (the callers count); prefetch faults (async #PF
    completion, pre-fault) are not guest faults.  Returns RET_PF_* or a
    negative errno; the fault is left in ``vcpu.last_fault``."""
    vm = vcpu.vm
    mmu = vm.mmu_backend
    l2 = vcpu.guest_mode                     # nested EPT: guest_mmu is not direct
    fault = KvmPageFault(cr2_or_gpa, err, prefetch, mmu.is_tdp and not l2,
                         vm.params.nx_huge_pages and not vm.disable_nx_huge_pages)
    if mmu.direct and not l2:
        fault.gfn = gfn = (cr2_or_gpa >> PAGE_SHIFT) & ~vm.gfn_direct_bits
        fault.slot = vcpu.gfn_to_memslot(gfn)
    vcpu.last_fault = fault
    return mmu.mmu_page_fault(vcpu, fault)


def kvm_mmu_write_protect_fault(vcpu, cr2_or_gpa: int, error_code: int) -> int:
    """``kvm_mmu_write_protect_fault``: a write hit a gfn KVM keeps read-only
    (write-tracked, a shadowed guest page table).  Emulate, unless a direct
    MMU sees a write to a guest page table during a walk (or shadow paging
    an event awaiting reinjection) and unprotecting the gfn zapped
    something: then RETRY.  The same address faulting again right after an
    unprotect-and-retry is emulated."""
    mmu = vcpu.vm.mmu_backend
    fault = vcpu.last_fault
    vcpu.emulation_type = EMULTYPE_PF | (EMULTYPE_WRITE_PF_TO_SP if fault is not None and
                                         fault.write_fault_to_shadow_pgtable else 0)
    if vcpu.last_retry_addr == cr2_or_gpa and vcpu.last_retry_addr is not None:
        return RET_PF_EMULATE
    vcpu.last_retry_addr = None
    direct = mmu.direct and not vcpu.guest_mode
    if mmio_info_in_cache(vcpu, cr2_or_gpa, direct):
        vcpu.vm.warn_sink.warn("kvm_mmu_write_protect_fault", "write-protect fault on a cached MMIO gpa",
                               once=True)
        return RET_PF_EMULATE
    mask = PFERR_GUEST_PAGE_MASK | PFERR_WRITE_MASK | PFERR_PRESENT_MASK
    if direct and (error_code & mask) == mask or \
            not direct and vcpu.event_needs_reinjection:
        if mmu.unprotect_gfn_and_retry(vcpu, cr2_or_gpa):
            vcpu.last_retry_addr = cr2_or_gpa
            return RET_PF_RETRY
    vcpu.emulation_type |= EMULTYPE_ALLOW_RETRY_PF
    return RET_PF_EMULATE


def mmio_info_in_cache(vcpu, addr: int, direct: bool) -> bool:
    """``mmio_info_in_cache``: the vCPU's MMIO cache answers ``addr`` (a gpa
    for a direct MMU; gva caching is the shadow MMU's)."""
    if direct:
        return vcpu.vcpu_match_mmio_gpa(addr)
    return vcpu.vcpu_match_mmio_gva(addr)


def handle_mmio_page_fault(vcpu, addr: int, direct: bool) -> int:
    """``handle_mmio_page_fault`` for a PFERR_RSVD fault: the MMIO cache, or
    the last SPTE of a lockless walk (``get_mmio_spte``): an MMIO SPTE of the
    current memslot generation caches its gfn and access and gives
    RET_PF_EMULATE (traced as ``handle_mmio_page_fault``, the address 0 for
    a direct MMU); a stale one RET_PF_INVALID (the full fault rebuilds it);
    anything else (zapped meanwhile) RET_PF_RETRY; a reserved bit in a
    non-MMIO SPTE is a KVM bug the kernel WARNs about (-EINVAL)."""
    if mmio_info_in_cache(vcpu, addr, direct):
        return RET_PF_EMULATE
    vm = vcpu.vm
    reserved, spte = vm.mmu_backend.get_mmio_spte(vcpu, addr)
    if reserved:
        vm.warn_sink.warn("handle_mmio_page_fault", "reserved bits in a non-MMIO SPTE", once=True)
        return -E.EINVAL
    fmt = vm.fmt
    if fmt.is_mmio_spte(spte):
        if not vcpu.check_mmio_spte(spte):
            return RET_PF_INVALID
        if direct:
            addr = 0
        gfn, access = fmt.get_mmio_spte_gfn(spte), fmt.get_mmio_spte_access(spte)
        if _tp.handle_mmio_page_fault.enabled:
            _tp.handle_mmio_page_fault.emit(addr=addr, gfn=gfn, access=access)
        vcpu.vcpu_cache_mmio_info(addr, gfn, access)
        return RET_PF_EMULATE
    return RET_PF_RETRY


def page_fault_handle_page_track(vcpu, fault: KvmPageFault) -> bool:
    """``page_fault_handle_page_track``: a write to a present, write-tracked
    gfn (a shadowed guest page table, an external tracker) must be emulated:
    the MMU answers RET_PF_WRITE_PROTECTED."""
    if fault.rsvd or not fault.present or not fault.write:
        return False
    slot = fault.slot
    if slot is None or not vcpu.vm.kvm_page_track_write_tracking_enabled:
        return False
    track = slot.arch.gfn_write_track
    return track is not None and bool(track[fault.gfn - slot.base_gfn])


def page_fault_can_be_fast(vm, fault: KvmPageFault) -> bool:
    """``page_fault_can_be_fast``: only a present fault that is a write, or
    (without A/D bits) a not-present one on an access-tracked SPTE, can be
    fixed without mmu_lock; never a reserved-bit fault or a private/shared
    mismatch."""
    if fault.rsvd:
        return False
    if vm.has_private_mem and fault.is_private != vm.kvm_mem_is_private(fault.gfn):
        return False
    if not fault.present:
        return not vm.kvm_ad_enabled
    return fault.write


def fast_page_fault(vcpu, fault: KvmPageFault) -> int:
    """``fast_page_fault`` (the caller checked :func:`page_fault_can_be_fast`):
    the MMU's lockless walk and cmpxchg (at most 5 attempts) fix a leaf that
    only lacks W (MMU-writable, not a huge page of a dirty-logged slot) or
    was access-tracked; RET_PF_FIXED, RET_PF_SPURIOUS (already allowed) or
    RET_PF_INVALID (take the slow path).  A SPTE made writable marks the gfn
    dirty; FIXED and SPURIOUS count in ``pf_fast``."""
    r, made_writable = vcpu.vm.mmu_backend.fast_page_fault(vcpu, fault)
    if r != RET_PF_INVALID:
        if made_writable:
            mark_gfn_dirty(vcpu.vm, fault.slot, fault.gfn)
        vcpu.stat.pf[_PF_FAST] += 1
    return r


#: Serializes the read-modify-write of one dirty-bitmap word by the fault paths
#: (set_bit_le is atomic in the kernel; here the item read and the store are two
#: steps another fault thread could come between).
_dirty_word_lock = threading.Lock()


def mark_gfn_dirty(vm, slot, gfn: int) -> None:
    """``mark_page_dirty_in_slot`` for one int gfn of a dirty-logged slot's
    bitmap, with scalar numpy access (the fault paths' form); anything else
    goes to :func:`kvmmmu.memslots.mark_page_dirty_in_slot`."""
    if slot is not None and slot.flags & KVM_MEM_LOG_DIRTY_PAGES and type(gfn) is int:
        bm = slot.dirty_bitmap
        rel = gfn - slot.base_gfn
        if bm is not None and 0 <= rel < slot.npages:
            w = rel >> 6
            with _dirty_word_lock:              # two vCPU threads may mark one word
                bm[w] = bm.item(w) | (1 << (rel & 63))
            return
    mark_page_dirty_in_slot(vm, slot, gfn)


def kvm_mmu_hugepage_adjust(vcpu, fault: KvmPageFault) -> None:
    """``kvm_mmu_hugepage_adjust``: set ``fault.req_level`` (the largest level
    the memslot, the lpage_info counters, the attributes and the host mapping
    allow, capped by ``fault.max_level``) and ``fault.goal_level`` (4K when
    the NX workaround forbids a huge page for an instruction fetch).
    Nothing for a 4K ``max_level``, an error / no-slot pfn, or a memslot
    logging dirty pages.  The walk aligns the pfn to the goal level."""
    fault.huge_page_disallowed = disallowed = fault.exec and fault.nx_huge_page_workaround_enabled
    slot = fault.slot
    max_level = fault.max_level
    if max_level == 1 or slot is None or fault.pfn & KVM_PFN_ERR_NOSLOT_MASK or \
            slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
        return
    # kvm_mmu_max_mapping_level, inline: the lpage_info counters from the
    # top level down, capped (shared memory) by the host mapping level; the
    # result is the minimum of both, so a 4K host leaf decides alone.
    vm = vcpu.vm
    gfn = fault.gfn
    base = slot.base_gfn
    host = 1 if fault.is_private else fault.host_level
    if host == 1:
        fault.req_level = 1
        return
    level = vm.max_huge_page_level
    if max_level < level:
        level = max_level
    lpage_info = slot.arch.lpage_info
    while level > 1:
        s = (level - 1) * 9
        if not lpage_info[level - 2].item((gfn >> s) - (base >> s)):
            break
        level -= 1
    if level > 1:
        if not host:
            host = vm.host.host_pfn_mapping_level(slot.userspace_addr + ((gfn - base) << PAGE_SHIFT))
        if host < level:
            level = host
    fault.req_level = level
    if level == 1 or disallowed:
        return
    fault.goal_level = level


def faultin_pfn(vcpu, fault: KvmPageFault, access: int = 7) -> int:
    """``kvm_mmu_faultin_pfn`` on a :class:`KvmPageFault` (``fault.gfn`` and
    ``fault.slot`` set): fills ``mmu_seq``, ``pfn``, ``map_writable`` (and
    ``max_level`` for private memory); returns RET_PF_CONTINUE or the early
    answer (see :func:`kvm_mmu_faultin_pfn` for the steps)."""
    vm = vcpu.vm
    gfn = fault.gfn
    slot = fault.slot
    n = vm.notifier
    fault.mmu_seq = seq = n.mmu_invalidate_seq
    is_private = fault.is_private
    if vm.has_private_mem:
        if is_private != vm.kvm_mem_is_private(gfn):
            fault.memory_fault_exit = True
            return -E.EFAULT
    elif is_private:
        fault.memory_fault_exit = True
        return -E.EFAULT
    if slot is None:
        return kvm_handle_noslot_fault(vcpu, fault, access)
    flags = slot.flags
    if flags & KVM_MEMSLOT_INVALID:
        return -E.EAGAIN if fault.prefetch else RET_PF_RETRY
    # mmu_invalidate_retry_gfn_unsafe (the sequence cannot have moved yet)
    in_progress = n.mmu_invalidate_in_progress
    if in_progress and n.mmu_invalidate_range_start <= gfn < n.mmu_invalidate_range_end:
        return RET_PF_RETRY
    if is_private:
        if not slot.kvm_slot_has_gmem():
            fault.memory_fault_exit = True
            return -E.EFAULT
        fault.pfn = pfn = slot.gmem.get_pfn(slot, gfn)
        fault.map_writable = not flags & KVM_MEM_READONLY
        if fault.max_level > 1:
            fault.max_level = 1
    elif flags & KVM_MEM_READONLY:
        if fault.write:
            pfn = KVM_PFN_ERR_RO_FAULT
        else:
            pfn, fault.map_writable = hva_to_pfn(vm.host, slot.gfn_to_hva(gfn), write_fault=False,
                                                 want_writable=False)
        fault.pfn = pfn
    else:
        # GUP fast (or the slow path's first touch of a 4K-only VMA) also saw
        # the leaf's level: hugepage_adjust uses it (a change of it before the
        # map is an invalidation: the fault is stale); 0 when not known
        pfn, fault.map_writable, fault.host_level = hva_to_pfn_fast(
            vm.host, slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT), fault.write, True)
        fault.pfn = pfn
    if pfn & KVM_PFN_ERR_MASK:
        if pfn == KVM_PFN_ERR_SIGPENDING:
            return -E.EINTR
        if pfn == KVM_PFN_ERR_RO_FAULT:
            return RET_PF_EMULATE
        if pfn == KVM_PFN_ERR_HWPOISON:
            return RET_PF_RETRY
        return -E.EFAULT
    if n.mmu_invalidate_seq != seq or n.mmu_invalidate_in_progress and \
            n.mmu_invalidate_range_start <= gfn < n.mmu_invalidate_range_end:
        return RET_PF_RETRY
    return RET_PF_CONTINUE


#: kvm_tdp_map_page: RET_PF_RETRY turns taken before giving up as a pending
#: signal would (-EINTR); the kernel loops until then
MAX_PREFAULT_RETRIES = 10000


def kvm_tdp_map_page(vcpu, gpa: int, error_code: int) -> tuple[int, int]:
    """``kvm_tdp_map_page``: a prefetch fault on `gpa` through
    :func:`kvm_mmu_do_page_fault`, again while it answers RET_PF_RETRY (a
    bugged VM stops it with -EIO; after ``MAX_PREFAULT_RETRIES`` turns it
    stops as a signal would, -EINTR).  Returns ``(r, level)``: 0 for FIXED /
    SPURIOUS / WRITE_PROTECTED with the fault's goal level, -ENOENT for
    EMULATE, a negative errno as it came, -EIO (WARN) for anything else;
    -EOPNOTSUPP unless the vCPU's MMU is a direct TDP one."""
    vm = vcpu.vm
    gpa = int_arg("gpa", gpa, 0, (1 << _GPA_BITS_MAX) - 1)
    error_code = int_arg("error_code", error_code, 0, _U64)
    mmu = vm.mmu_backend
    if mmu is None or not mmu.is_tdp or vcpu.guest_mode:
        return -E.EOPNOTSUPP, 0
    for _ in range(MAX_PREFAULT_RETRIES):
        if vm.warn_sink.bugged:                  # KVM_REQ_VM_DEAD
            return -E.EIO, 0
        r = kvm_mmu_do_page_fault(vcpu, gpa, error_code, True)
        if r != RET_PF_RETRY:
            break
    else:
        return -E.EINTR, 0
    if r < 0:
        return r, 0
    if r in (RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED):
        return 0, vcpu.last_fault.goal_level
    if r == RET_PF_EMULATE:
        return -E.ENOENT, 0
    vm.warn_sink.warn("kvm_tdp_map_page", "could not fix page fault during prefault", once=True)
    return -E.EIO, 0


def kvm_arch_vcpu_pre_fault_memory(vcpu, gpa: int, size: int) -> int:
    """x86's part of ``KVM_PRE_FAULT_MEMORY`` for the page at `gpa`: -EOPNOTSUPP
    until the VM allows it (``pre_fault_allowed``: default and SW-protected
    VMs; a TD after FINALIZE), -EINVAL for a gpa with the alias bit; the
    mmu reload; a private gfn maps with PFERR_PRIVATE_ACCESS, another with
    the alias bit set; then :func:`kvm_tdp_map_page`.  Returns the bytes the
    mapping covers from `gpa` on (at most `size`), or a negative errno."""
    vm = vcpu.vm
    if not vm.pre_fault_allowed:
        return -E.EOPNOTSUPP
    gfn = gpa >> PAGE_SHIFT
    if vm.gfn_direct_bits and gfn & vm.gfn_direct_bits:
        return -E.EINVAL
    r = kvm_mmu_reload(vcpu)
    if r:
        return r
    error_code = PFERR_GUEST_FINAL_MASK
    direct = 0
    if vm.has_private_mem and vm.kvm_mem_is_private(gfn):
        error_code |= PFERR_PRIVATE_ACCESS
    else:
        direct = vm.gfn_direct_bits << PAGE_SHIFT
    r, level = kvm_tdp_map_page(vcpu, gpa | direct, error_code)
    if r < 0:
        return r
    huge = KVM_PAGES_PER_HPAGE(level) << PAGE_SHIFT
    return min(size, (gpa & ~(huge - 1)) + huge - gpa)


def kvm_vcpu_pre_fault_memory(vcpu, gpa: int, size: int, flags: int = 0) -> tuple[int, int, int]:
    """``KVM_PRE_FAULT_MEMORY`` (``kvm_vcpu_pre_fault_memory``): map
    [gpa, gpa + size) ahead of the guest, page by page (a huge mapping
    covers more).  Returns ``(r, gpa, size)``: the range still to do, as the
    ioctl writes it back, and 0 if at least one page was mapped, else the
    first error (-EINVAL for flags or an unaligned / wrapping range)."""
    gpa = int_arg("gpa", gpa, 0, _U64)
    size = int_arg("size", size, 0, _U64)
    flags = int_arg("flags", flags, 0, _U64)
    if flags or (gpa | size) & ((1 << PAGE_SHIFT) - 1) or not size or gpa + size > _U64 + 1:
        return -E.EINVAL, gpa, size
    full = size
    r = 0
    while size:
        r = kvm_arch_vcpu_pre_fault_memory(vcpu, gpa, size)
        if r == 0 or r == -E.EIO:
            if r == 0:
                vcpu.vm.warn_sink.warn("kvm_vcpu_pre_fault_memory", "no progress", once=True)
            break
        if r < 0:
            break
        gpa += r
        size -= r
    return (r if full == size else 0), gpa, size


def kvm_mmu_prefetch_fault(vcpu, gpa: int, error_code: int) -> int:
    """A prefetch fault (``kvm_arch_async_page_ready``: the async #PF
    completion): :func:`kvm_mmu_do_page_fault` with ``prefetch``; not a
    guest fault (no ``pf_taken``), but FIXED counts in ``pf_fixed``."""
    vm = vcpu.vm
    if vm.warn_sink.bugged:
        vm.warn_sink.check()
    gpa, error_code = int_arg("gpa", gpa), int_arg("error_code", error_code)
    if vm.mmu_backend is None or vcpu.mmu_root is None:
        return RET_PF_RETRY
    r = kvm_mmu_do_page_fault(vcpu, gpa, error_code, True)
    if r == RET_PF_FIXED:
        vcpu.stat.pf[_PF_FIXED] += 1
    return r


def kvm_mmu_load(vcpu) -> int:
    """``kvm_mmu_load``: top up the caches and give the vCPU a valid root of
    the VM's MMU (the MMU drops an obsolete one first).  Returns 0, or the
    negative errno the root allocation failed with: the shadow MMU's
    ``mmu_alloc_direct_roots`` / ``mmu_alloc_shadow_roots`` return -ENOSPC
    when ``make_mmu_pages_available`` finds no page under
    ``n_max_mmu_pages`` even after zapping the oldest (``n_max_mmu_pages``
    is 0 until the first memslot commit sets the default); the vCPU is then
    left without a root.  (A failed top-up raises KvmNoMemoryError.)"""
    mmu = _fault_mmu(vcpu)
    vcpu.mmu_topup_memory_caches(not mmu.direct or vcpu.guest_mode)
    r = mmu.kvm_mmu_load(vcpu)
    return r if type(r) is int and r < 0 else 0


def kvm_mmu_unload(vcpu) -> None:
    """``kvm_mmu_unload``: drop the vCPU's roots (none without a fault MMU)."""
    mmu = vcpu.vm.mmu_backend
    if mmu is not None:
        mmu.kvm_mmu_unload(vcpu)


def kvm_mmu_reload(vcpu) -> int:
    """``kvm_mmu_reload`` as ``vcpu_enter_guest`` runs it:
    ``KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`` frees an obsolete root, then a vCPU
    without a valid root loads one.  Returns 0 or :func:`kvm_mmu_load`'s
    negative errno."""
    mmu = _fault_mmu(vcpu)
    if vcpu.kvm_check_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS"):
        mmu.free_obsolete_roots(vcpu)
    if vcpu.mmu_root is None:
        return kvm_mmu_load(vcpu)
    return 0


def _backend_op(vcpu, name):
    """The fault MMU's method `name`, or None (a backend without it has
    nothing to do there: the TDP MMU has no guest roots to sync)."""
    mmu = vcpu.vm.mmu_backend
    return None if mmu is None else getattr(mmu, name, None)


def kvm_mmu_new_pgd(vcpu, new_pgd: int) -> None:
    """``kvm_mmu_new_pgd``: a CR3 load; the MMU switches to a cached root for
    `new_pgd` (``fast_pgd_switch``) or drops the current one."""
    f = _backend_op(vcpu, "kvm_mmu_new_pgd")
    if f is not None:
        f(vcpu, new_pgd)


def kvm_mmu_sync_roots(vcpu) -> None:
    """``kvm_mmu_sync_roots`` (KVM_REQ_MMU_SYNC): sync the unsync shadow
    pages under the current root."""
    f = _backend_op(vcpu, "kvm_mmu_sync_roots")
    if f is not None:
        f(vcpu)


def kvm_mmu_sync_prev_roots(vcpu) -> None:
    """``kvm_mmu_sync_prev_roots``: the same for the cached previous roots."""
    f = _backend_op(vcpu, "kvm_mmu_sync_prev_roots")
    if f is not None:
        f(vcpu)


def kvm_mmu_invlpg(vcpu, gva: int) -> None:
    """``kvm_mmu_invlpg`` (an intercepted INVLPG): the MMU invalidates `gva`
    in every root (``kvm_mmu_invalidate_addr``); ``stat.invlpg`` counts it."""
    gva = int_arg("gva", gva)
    f = _backend_op(vcpu, "kvm_mmu_invlpg")
    if f is not None:
        f(vcpu, gva)
    vcpu.stat.invlpg += 1


def kvm_page_track_write(vcpu, gpa: int, data) -> None:
    """``emulator_write_phys``: the emulator's store, ``kvm_vcpu_write_guest``
    (the page is marked dirty), then ``kvm_page_track_write``, which tells
    the MMU (``kvm_mmu_track_write(vcpu, gpa, new_bytes)``) so it can zap or
    update the shadow pages of a written guest page table."""
    data = bytes(data)
    vcpu.kvm_vcpu_write_guest(gpa, data)
    f = _backend_op(vcpu, "kvm_mmu_track_write")
    if f is not None:
        f(vcpu, gpa, data)


def vcpu_enter_guest(vcpu) -> int | None:
    """The MMU's part of ``vcpu_enter_guest``, in the kernel's order: free an
    obsolete root (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS), sync the roots
    (KVM_REQ_MMU_SYNC), load the pgd (KVM_REQ_LOAD_MMU_PGD: hardware only),
    the TLB flushes (KVM_REQ_TLB_FLUSH, then _CURRENT and _GUEST; each
    counted in ``stat.tlb_flush``; a guest flush on shadow paging syncs the
    current and previous roots), then :func:`kvm_mmu_reload`.  Returns None
    when the guest is entered, or the negative errno of a failed root load
    (the kernel cancels the entry and KVM_RUN fails with it, e.g. -ENOSPC)."""
    mmu = _fault_mmu(vcpu)
    if vcpu.kvm_check_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS"):
        mmu.free_obsolete_roots(vcpu)
    if vcpu.kvm_check_request("KVM_REQ_MMU_SYNC"):
        kvm_mmu_sync_roots(vcpu)
    vcpu.kvm_check_request("KVM_REQ_LOAD_MMU_PGD")
    # kvm_flush_remote_tlbs() (in C, in the arena) makes KVM_REQ_TLB_FLUSH to
    # every vCPU: one is pending if a flush happened since this vCPU last looked
    n = vcpu.vm.arena.remote_tlb_flush_requests
    if n != vcpu.tlb_flush_requests_seen:
        vcpu.tlb_flush_requests_seen = n
        vcpu.kvm_make_request("KVM_REQ_TLB_FLUSH")
    if vcpu.kvm_check_request("KVM_REQ_TLB_FLUSH"):
        vcpu.stat.tlb_flush += 1
        vcpu.kvm_check_request("KVM_REQ_TLB_FLUSH_CURRENT")   # the full flush covers it
    if vcpu.kvm_check_request("KVM_REQ_TLB_FLUSH_CURRENT"):
        vcpu.stat.tlb_flush += 1
    if vcpu.kvm_check_request("KVM_REQ_TLB_FLUSH_GUEST"):
        vcpu.stat.tlb_flush += 1
        if not vcpu.vm.tdp_enabled:
            kvm_mmu_sync_roots(vcpu)
            kvm_mmu_sync_prev_roots(vcpu)
    r = kvm_mmu_reload(vcpu)
    return r if r else None


def kvm_mmu_reset_context(vcpu) -> None:
    """``kvm_mmu_reset_context`` (CR0/CR4/EFER or SMM changed): unload the
    roots; the next entry (:func:`kvm_mmu_reload`) loads the root of the
    new role."""
    kvm_mmu_unload(vcpu)


def _fault_mmu(vcpu):
    mmu = vcpu.vm.mmu_backend
    if mmu is None:
        raise LookupError(f"the VM (mmu={vcpu.vm.mmu!r}) has no MMU backend to take page faults")
    return mmu


def kvm_handle_noslot_fault(vcpu, fault: KvmPageFault, access: int) -> int:
    """``kvm_handle_noslot_fault``: a gfn outside every memslot.  Private:
    a memory-fault exit.  Otherwise cache the MMIO info, and emulate when
    MMIO caching is off or the gfn is above ``kvm_mmu_max_gfn`` (its MMIO
    SPTE could not hold it); else RET_PF_CONTINUE with ``KVM_PFN_NOSLOT``,
    for which the MMU installs an MMIO SPTE."""
    vm = vcpu.vm
    if fault.is_private:
        fault.memory_fault_exit = True
        return -E.EFAULT
    gva = 0 if vm.tdp_enabled else fault.addr
    vcpu.vcpu_cache_mmio_info(gva, fault.gfn, access & vm.shadow_mmio_access_mask)
    fault.slot, fault.pfn, fault.map_writable = None, KVM_PFN_NOSLOT, False
    if not vm.enable_mmio_caching or fault.gfn > kvm_mmu_max_gfn(vm):
        return RET_PF_EMULATE
    return RET_PF_CONTINUE


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


def kvm_memslot_flush_zap_all(vm) -> bool:
    """``kvm_memslot_flush_zap_all``: a default VM with
    ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` zaps everything when a slot goes."""
    return vm.vm_type == KVM_X86_DEFAULT_VM and vm.quirk_slot_zap_all


def kvm_arch_flush_shadow_memslot(vm, slot) -> None:
    """``kvm_arch_flush_shadow_memslot``: a slot is being deleted or moved.
    A default VM with the SLOT_ZAP_ALL quirk takes :func:`kvm_mmu_zap_all_fast`
    (every MMU: the shadow MMU's pages go obsolete, the TDP MMU's roots are
    invalidated); any other VM zaps the slot's part in each MMU."""
    if kvm_memslot_flush_zap_all(vm):
        kvm_mmu_zap_all_fast(vm)
        return
    for mmu in vm.mmus:
        mmu.kvm_arch_flush_shadow_memslot(slot)


def kvm_arch_mmu_enable_log_dirty_pt_masked(vm, slot, gfn_offset: int, mask: int) -> None:
    """Re-arm dirty logging for the gfns of ``mask`` (64 from ``gfn_offset``)."""
    for mmu in vm.mmus:
        mmu.kvm_arch_mmu_enable_log_dirty_pt_masked(slot, gfn_offset, mask)


def kvm_mmu_zap_all_fast(vm) -> None:
    """``kvm_mmu_zap_all_fast`` (MMIO generation wrap): with ``mmu_lock``
    held for write, trace ``kvm_mmu_zap_all_fast`` (the generation being
    retired and ``n_used_mmu_pages``, the shadow pages in use: whatever the
    MMU, once), flip ``mmu_valid_gen`` (shadow pages of the old
    generation are obsolete), ask every vCPU to free its obsolete roots
    (``KVM_REQ_MMU_FREE_OBSOLETE_ROOTS``), and let each MMU obsolete and
    zap its roots.  The TDP MMU only invalidates its roots there, and zaps
    the invalidated ones after the write lock is dropped, with ``mmu_lock``
    held for read (faults of other vCPUs may run meanwhile)."""
    tdp = []
    with vm.mmu_lock.write():
        if _tp.kvm_mmu_zap_all_fast.enabled:
            _tp.kvm_mmu_zap_all_fast.emit(
                mmu_valid_gen=vm.mmu_valid_gen,
                mmu_used_pages=sum(getattr(m, "n_used_mmu_pages", 0) for m in vm.mmus))
        vm.mmu_valid_gen ^= 1
        vm.kvm_make_all_cpus_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")
        for mmu in vm.mmus:
            if hasattr(mmu, "kvm_tdp_mmu_zap_invalidated_roots"):
                mmu.kvm_tdp_mmu_invalidate_roots()
                tdp.append(mmu)
            else:
                mmu.kvm_mmu_zap_all_fast()
    if tdp:
        with vm.mmu_lock.read():
            for mmu in tdp:
                mmu.kvm_tdp_mmu_zap_invalidated_roots(shared=True)


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
    if type(gfn) is not int:
        gfn = int_arg("gfn", gfn)
    base = slot.base_gfn
    if not base <= gfn < base + slot.npages:
        raise ValueError(f"gfn={gfn:#x} is outside the slot [{base:#x}, "
                         f"{base + slot.npages:#x})")
    lpage_info = slot.arch.lpage_info
    for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
        # lpage_info_slot / gfn_to_index, inline (gfn is in the slot)
        arr = lpage_info[level - 2]
        s = (level - 1) * 9
        i = (gfn >> s) - (base >> s)
        old = arr.item(i)
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
