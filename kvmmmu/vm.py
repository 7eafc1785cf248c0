"""The VM: ``struct kvm`` and ``struct kvm_vcpu`` as far as the MMU sees them.

A :class:`VM` ties together

* the **host**: a :class:`~kvmmmu.host.HostConfig` (64/32-bit, MAXPHYADDR,
  EPT/NPT/none, A/D bits, PML, 1G pages, config options) and a
  :class:`~kvmmmu.host.HostMm` (the VMM process's page tables), to which the
  VM subscribes a :class:`~kvmmmu.notifiers.KvmMmuNotifier`;
* the kvm **module parameters** that change MMU behaviour
  (:class:`KvmParams`: ``tdp_mmu``, ``eager_page_split``, ``nx_huge_pages``,
  ``mmio_caching``, ...) and the **MMU flavour** (``mmu="tdp_mmu"`` - TDP
  with the TDP MMU, ``"tdp"`` - TDP on the shadow MMU (``tdp_mmu=N``),
  ``"shadow"`` - shadow paging of guest page tables, ``tdp_enabled = false``);
* the **SPTE format** and the page-table arena
  (:class:`~kvmmmu._core.pt_arena.PtArena`) and descriptor pool
  (:class:`~kvmmmu._core.rmap.PteListDescPool`) the MMUs allocate from;
* the **memslots** of each address space (as_id 0, and 1 for SMM when the
  host has CONFIG_KVM_SMM and the VM has no private memory), memory
  attributes, guest_memfd files, dirty logging (:mod:`kvmmmu.memslots`,
  :mod:`kvmmmu.memattrs`);
* the **MMU-notifier state** (:mod:`kvmmmu.notifiers`) and ``mmu_lock``;
* **statistics** (``vm.stat``, ``vcpu.stat``: :mod:`kvmmmu.stats`);
* **vCPUs** (:class:`Vcpu`) with their MMU memory caches
  (:meth:`Vcpu.mmu_topup_memory_caches` with the kernel's amounts), SMM
  address space, MMIO info cache and requests;
* the **MMUs** themselves, as :class:`MmuBackend` objects registered with
  :meth:`VM.register_mmu`: the VM calls their hooks (unmap a gfn range, age,
  flush a memslot, dirty-logging transitions...) exactly where the kernel
  calls into ``mmu.c`` / ``tdp_mmu.c``.  ``mmu="tdp_mmu"`` gets its
  :class:`~kvmmmu.tdp_mmu.TdpMmu` (``vm.mmu_backend``, the MMU that takes
  the vCPUs' faults: ``vcpu.kvm_mmu_page_fault(gpa, error_code)``);
  :class:`RecordingMmu` records the calls it receives.

``VM.from_host()`` configures all of this like the machine it runs on
(``/sys/module/kvm/parameters``, ``/proc/cpuinfo``, ``/dev/kvm``
capabilities).  :meth:`VM.audit` checks every invariant of every part and
reports all violations at once.

Example
-------
>>> vm = VM(mmu="tdp_mmu")
>>> slot = vm.add_memory(0, 64 << 20, thp=True)          # 64 MiB at gpa 0
>>> vm.set_memory_attributes(0, 1 << 21, 0)               # doctest: +SKIP
>>> seq = vm.notifier.mmu_invalidate_seq                   # a fault's snapshot
>>> vm.host.munmap(slot.userspace_addr, 1 << 21)           # host event -> zap
>>> with vm.mmu_lock.write():
...     vm.is_page_fault_stale(seq, 0, slot)
True
>>> vm.audit()
[]
"""
from __future__ import annotations

import errno as E
import functools
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kvmmmu._core.pt_arena import MmuMemoryCache, PtArena
from kvmmmu._core.rmap import PteListDescCache, PteListDescPool
from kvmmmu._core.spte import MMIO_SPTE_GEN_MASK, get_mmio_spte_generation
from kvmmmu._core._checks import check_array, int_arg
from kvmmmu.errors import KvmNoMemoryError
from kvmmmu.warn import KvmBugError, WarnSink  # noqa: F401  (KvmBugError re-exported)
from kvmmmu.host import (
    PAGE_SHIFT, HostConfig, HostMm,
)
from kvmmmu import memslots as M
from kvmmmu import mmu as _mmu
from kvmmmu.mmu import FaultinResult, MmuBackend, RecordingMmu  # noqa: F401  (re-exported)
from kvmmmu._core.mmu_lock import MmuLock  # noqa: F401  (re-exported)
from kvmmmu.memattrs import (
    KVM_MEMORY_ATTRIBUTE_PRIVATE, MemoryAttributes, kvm_supported_mem_attributes,
    kvm_vm_ioctl_set_mem_attributes,
)
from kvmmmu.notifiers import KvmMmuNotifier, MmuInvalidateState
from kvmmmu.stats import VcpuStat, VmStat
from kvmmmu.tdp_mmu import TdpMmu
from kvmmmu.shadow_mmu import ShadowMmu
from kvmmmu._core.guest_walk import GuestMemory, GpaNotMappedError, GpaReadOnlyError
from kvmmmu import paging as _pg
from kvmmmu import mmutrace as _tp

__all__ = [
    "KvmParams", "VM", "Vcpu", "MmuBackend", "RecordingMmu", "MmuLock", "VmAuditError",
    "VmTypeError", "FaultinResult",
    "KVM_X86_DEFAULT_VM", "KVM_X86_SW_PROTECTED_VM", "KVM_X86_SEV_VM", "KVM_X86_SEV_ES_VM",
    "KVM_X86_SNP_VM", "KVM_X86_TDX_VM", "VM_TYPES",
    "RET_PF_CONTINUE", "RET_PF_RETRY", "RET_PF_EMULATE", "RET_PF_WRITE_PROTECTED",
    "RET_PF_INVALID", "RET_PF_FIXED", "RET_PF_SPURIOUS",
    "PT64_ROOT_MAX_LEVEL", "PTE_PREFETCH_NUM", "MMU_TOPUP_MIN", "KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE",
]

# --- VM types (arch/x86/include/uapi/asm/kvm.h; their home is mmu.py) -------------
from kvmmmu.mmu import (  # noqa: E402
    KVM_X86_DEFAULT_VM, KVM_X86_SEV_ES_VM, KVM_X86_SEV_VM, KVM_X86_SNP_VM,
    KVM_X86_SW_PROTECTED_VM, KVM_X86_TDX_VM, VM_TYPES,
)

# --- page fault return values (mmu_internal.h, v6.12+) ----------------------------
from kvmmmu._core.defs import (  # noqa: E402  (the one home of these)
    RET_PF_CONTINUE, RET_PF_RETRY, RET_PF_EMULATE, RET_PF_WRITE_PROTECTED,
    RET_PF_INVALID, RET_PF_FIXED, RET_PF_SPURIOUS, PT64_ROOT_MAX_LEVEL, PTE_PREFETCH_NUM,
)

# --- memory caches (mmu.c mmu_topup_memory_caches) ---------------------------------
KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40
#: ``min`` passed to kvm_mmu_topup_memory_cache per cache, per fault
MMU_TOPUP_MIN = {
    "mmu_pte_list_desc_cache": 1 + PT64_ROOT_MAX_LEVEL + PTE_PREFETCH_NUM,   # 14
    "mmu_external_spt_cache": PT64_ROOT_MAX_LEVEL,                           # mirrored TDP only
    "mmu_shadow_page_cache": PT64_ROOT_MAX_LEVEL,
    "mmu_shadowed_info_cache": PT64_ROOT_MAX_LEVEL,                          # maybe_indirect only
    "mmu_page_header_cache": PT64_ROOT_MAX_LEVEL,
}


class VmAuditError(AssertionError):
    """:meth:`VM.audit` found violations; ``problems`` lists all of them."""

    def __init__(self, problems):
        super().__init__(f"{len(problems)} invariant violation(s):\n  " + "\n  ".join(problems))
        self.problems = problems


class VmTypeError(ValueError):
    """``KVM_CREATE_VM`` with a type this host / MMU does not support (-EINVAL)."""
    errno = E.EINVAL


@dataclass(frozen=True)
class KvmParams:
    """The kvm module parameters that change MMU behaviour (``/sys/module/kvm/parameters``).

    ``nx_huge_pages`` is the resolved value (the kernel's ``auto`` turns into
    Y on CPUs with X86_BUG_ITLB_MULTIHIT); ``nx_huge_pages_never`` records the
    ``never`` setting (permanently off).  Defaults are the upstream defaults
    on an unaffected CPU.
    """
    tdp_mmu: bool = True
    eager_page_split: bool = True
    nx_huge_pages: bool = False
    nx_huge_pages_never: bool = False
    nx_huge_pages_recovery_ratio: int = 60
    nx_huge_pages_recovery_period_ms: int = 0
    mmio_caching: bool = True
    flush_on_reuse: bool = False

    @classmethod
    def from_system(cls, path="/sys/module/kvm/parameters") -> "KvmParams":
        p = Path(path)

        def get(name):
            try:
                return (p / name).read_text().strip()
            except OSError:
                return None

        def yes(v):
            return v is not None and v.upper() in ("Y", "1", "TRUE", "FORCE")

        kw = {}
        for name in ("tdp_mmu", "eager_page_split", "mmio_caching"):
            v = get(name)
            if v is not None:
                kw[name] = yes(v)
        v = get("flush_on_reuse")
        if v is not None:
            kw["flush_on_reuse"] = yes(v)
        v = get("nx_huge_pages")
        if v is not None:
            kw["nx_huge_pages"] = yes(v)
            kw["nx_huge_pages_never"] = v.lower() == "never"
        for name in ("nx_huge_pages_recovery_ratio", "nx_huge_pages_recovery_period_ms"):
            v = get(name)
            if v is not None and v.isdigit():
                kw[name] = int(v)
        return cls(**kw)


def _vm_ioctl(fn):
    """A VM ioctl: serialized with every other ioctl and notifier callback
    of the VM (``vm.api_lock``), and -EIO (:class:`KvmBugError`) once the VM
    is bugged."""
    @functools.wraps(fn)
    def ioctl(self, *args, **kw):
        with self.api_lock:
            self.warn_sink.check()
            return fn(self, *args, **kw)
    return ioctl


class _ExternalSptCache:
    """``vcpu->arch.mmu_external_spt_cache`` (mirrored TDP / TDX): plain pages
    handed to the TDX module, taken from host physical memory, with the
    kernel's topup semantics (fill to capacity when below ``min``)."""

    def __init__(self, vm, capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE):
        self.vm, self.capacity = vm, capacity
        self.objects: list[int] = []

    @property
    def nobjs(self):
        return len(self.objects)

    def topup(self, min_objs):
        if len(self.objects) >= min_objs:
            return
        try:
            need = self.capacity - len(self.objects)
            self.objects.extend(int(p) for p in self.vm.host.phys.alloc_kernel_pages(need))
        except MemoryError:
            if len(self.objects) < min_objs:
                raise KvmNoMemoryError("external_spt cache: host out of memory") from None

    def alloc(self) -> int:
        if not self.objects:
            raise KvmNoMemoryError("external_spt cache is empty (not topped up)")
        return self.objects.pop()

    def free(self):
        if self.objects:
            self.vm.host.phys.free_kernel_pages(np.array(self.objects, dtype=np.uint64))
        self.objects = []

    def __repr__(self):
        return f"ExternalSptCache(nobjs={self.nobjs}, capacity={self.capacity})"


class Vcpu:
    """``struct kvm_vcpu`` as the MMU sees it.

    Attributes
    ----------
    vcpu_id : int
    smm : bool
        In SMM: memslot lookups use address space 1.
    stat : VcpuStat
    mmu_pte_list_desc_cache, mmu_shadow_page_cache, mmu_shadowed_info_cache,
    mmu_page_header_cache, mmu_external_spt_cache :
        The per-vCPU memory caches (``vcpu->arch.mmu_*_cache``).
    requests : set of str
        Pending ``KVM_REQ_*``.
    """

    def __init__(self, vm: "VM", vcpu_id: int, index: int):
        self.vm, self.vcpu_id, self.index = vm, vcpu_id, index
        self.smm = False
        self.stat = VcpuStat()
        self.mmu_pte_list_desc_cache = PteListDescCache(vm.rmap_pool)
        self.mmu_shadow_page_cache = MmuMemoryCache(vm.arena, "shadow_page")
        self.mmu_shadowed_info_cache = MmuMemoryCache(vm.arena, "shadowed_info")
        self.mmu_page_header_cache = MmuMemoryCache(vm.arena, "page_header")
        self.mmu_external_spt_cache = _ExternalSptCache(vm)
        vm._set_warn_sink(self.mmu_pte_list_desc_cache, self.mmu_shadow_page_cache,
                          self.mmu_shadowed_info_cache, self.mmu_page_header_cache)
        self.requests: set[str] = set()
        self.last_used_slot = None
        self.last_used_slot_gen = None
        self.mmio_gva = 0
        self.mmio_gfn = 0
        self.mmio_access = 0
        self.mmio_gen = 0
        #: ``vcpu->arch.mmu->root``: the root the VM's MMU loaded for this vCPU
        #: (None: INVALID_PAGE); set by its kvm_mmu_load / kvm_mmu_unload
        self.mmu_root = None
        #: the EMULTYPE_* flags of the last fault that asked for emulation
        self.emulation_type = 0
        #: the KvmPageFault of the last kvm_mmu_do_page_fault (for inspection)
        self.last_fault = None
        #: ``vcpu->arch.last_retry_addr``: the gpa of the last unprotect-and-retry
        self.last_retry_addr = None
        #: ``kvm_event_needs_reinjection`` (shadow paging's unprotect rule)
        self.event_needs_reinjection = False
        #: the last #PF the shadow MMU injected into the guest (a walker PageFault)
        self.injected_page_fault = None
        #: ``is_guest_mode``: L2 runs under L1's EPT (``vcpu->arch.mmu`` is
        #: ``guest_mmu``); ``nested_eptp``: L1's EPTP meanwhile (else None);
        #: ``nested_ept_exit``: the last fault in L1's EPT reflected to L1 (a
        #: :class:`~kvmmmu.shadow_mmu.NestedEptExit`; that exit left L2)
        self.guest_mode = False
        self.nested_eptp = None
        self.nested_ept_exit = None
        #: the registers the MMU reads (CR0/CR3/CR4/EFER/RFLAGS/CPL/PKRU), a
        #: frozen :class:`~kvmmmu.paging.CpuState` replaced by the ``kvm_set_*``
        #: methods; a new vCPU has paging off, as after INIT
        self.cpu = _pg.CpuState.nonpaging()
        #: the guest CPUID facts (:class:`~kvmmmu.paging.GuestCpuModel`)
        self.guest_model = _pg.GuestCpuModel()
        #: ``walk_mmu->pdptrs``: the PAE PDPTEs loaded by the last CR0/CR3/CR4
        #: load that had to load them (None outside PAE paging)
        self.pdptrs = None
        self._walk_mmu = None
        #: ``vm.arena.remote_tlb_flush_requests`` when this vCPU last entered:
        #: a larger count means a KVM_REQ_TLB_FLUSH is pending for it
        self.tlb_flush_requests_seen = vm.arena.remote_tlb_flush_requests

    def __repr__(self):
        return f"Vcpu({self.vcpu_id}{' smm' if self.smm else ''})"

    # -- memory caches ---------------------------------------------------------
    def caches(self) -> dict:
        return {"mmu_pte_list_desc_cache": self.mmu_pte_list_desc_cache,
                "mmu_external_spt_cache": self.mmu_external_spt_cache,
                "mmu_shadow_page_cache": self.mmu_shadow_page_cache,
                "mmu_shadowed_info_cache": self.mmu_shadowed_info_cache,
                "mmu_page_header_cache": self.mmu_page_header_cache}

    def mmu_topup_memory_caches(self, maybe_indirect: bool) -> None:
        """``mmu_topup_memory_caches``, in the kernel's order and amounts:
        descriptors ``1 + PT64_ROOT_MAX_LEVEL + PTE_PREFETCH_NUM`` (14); for
        mirrored-TDP VMs external page tables 5; shadow pages 5; shadowed-info
        pages 5 if ``maybe_indirect``; headers 5.  A cache holding at least its
        ``min`` is left alone, otherwise it is filled to capacity (40).
        Raises KvmNoMemoryError at the first cache that cannot reach its
        ``min``; caches topped up before it stay topped up (as in the kernel)."""
        self.mmu_pte_list_desc_cache.topup(MMU_TOPUP_MIN["mmu_pte_list_desc_cache"])
        if self.vm.kvm_has_mirrored_tdp:
            self.mmu_external_spt_cache.topup(MMU_TOPUP_MIN["mmu_external_spt_cache"])
        self.mmu_shadow_page_cache.topup(MMU_TOPUP_MIN["mmu_shadow_page_cache"])
        if maybe_indirect:
            self.mmu_shadowed_info_cache.topup(MMU_TOPUP_MIN["mmu_shadowed_info_cache"])
        self.mmu_page_header_cache.topup(MMU_TOPUP_MIN["mmu_page_header_cache"])

    def mmu_free_memory_caches(self) -> None:
        for c in self.caches().values():
            c.free()

    # -- memslots ------------------------------------------------------------------
    @property
    def as_id(self) -> int:
        """``kvm_arch_vcpu_memslots_id``: 1 in SMM, else 0."""
        return 1 if self.smm else 0

    def kvm_vcpu_memslots(self):
        return self.vm.memslots[self.as_id]

    def gfn_to_memslot(self, gfn: int):
        """``kvm_vcpu_gfn_to_memslot``: per-vCPU last-used slot, reset whenever the
        address space's generation differs from the one it was cached under."""
        slots = self.vm.memslots[1 if self.smm else 0]
        if slots.generation != self.last_used_slot_gen:
            self.last_used_slot = None
            self.last_used_slot_gen = slots.generation
        s = self.last_used_slot
        if s is not None and s.base_gfn <= gfn < s.base_gfn + s.npages:
            return s
        if len(slots) <= 8:
            # a few slots: a scan costs less than the numpy search (and a
            # gfn outside every slot, an MMIO access, would search each time)
            for s in slots:
                if s.base_gfn <= gfn < s.base_gfn + s.npages:
                    self.last_used_slot = s
                    return s
            return None
        s = slots.search_memslots(gfn)
        if s is not None:
            self.last_used_slot = s
        return s

    # -- MMIO info cache (x86.h vcpu_cache_mmio_info) -----------------------------
    def vcpu_cache_mmio_info(self, gva: int, gfn: int, access: int) -> None:
        gen = self.kvm_vcpu_memslots().generation
        if gen & M.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
            return
        self.mmio_gva = gva & ~((1 << PAGE_SHIFT) - 1)
        self.mmio_access = access
        self.mmio_gfn = gfn
        self.mmio_gen = gen

    def vcpu_clear_mmio_info(self, gva: int | None = None) -> None:
        if gva is not None and self.mmio_gva != (gva & ~((1 << PAGE_SHIFT) - 1)):
            return
        self.mmio_gva = 0

    def vcpu_match_mmio_gen(self) -> bool:
        return self.mmio_gen == self.kvm_vcpu_memslots().generation

    def vcpu_match_mmio_gva(self, gva: int) -> bool:
        return bool(self.vcpu_match_mmio_gen() and self.mmio_gva and
                    self.mmio_gva == gva & ~((1 << PAGE_SHIFT) - 1))

    def vcpu_match_mmio_gpa(self, gpa: int) -> bool:
        return bool(self.vcpu_match_mmio_gen() and self.mmio_gfn and
                    self.mmio_gfn == gpa >> PAGE_SHIFT)

    def mmio_spte_generation(self) -> int:
        """The generation ``make_mmio_spte`` puts in an MMIO SPTE built now."""
        return self.kvm_vcpu_memslots().generation & MMIO_SPTE_GEN_MASK

    def check_mmio_spte(self, spte: int) -> bool:
        """``check_mmio_spte``: the SPTE's generation is current (and no update
        is in progress); traces ``check_mmio_spte`` once the generations are
        compared."""
        gen = self.kvm_vcpu_memslots().generation
        if gen & M.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
            return False                         # (no event: the kernel returns before it)
        kvm_gen = gen & MMIO_SPTE_GEN_MASK
        spte_gen = get_mmio_spte_generation(spte)
        if _tp.check_mmio_spte.enabled:
            _tp.check_mmio_spte.emit(spte=spte, kvm_gen=kvm_gen, spte_gen=spte_gen)
        return kvm_gen == spte_gen

    # -- requests ---------------------------------------------------------------------
    def kvm_make_request(self, req: str) -> None:
        self.requests.add(req)

    def kvm_test_request(self, req: str) -> bool:
        return req in self.requests

    def kvm_check_request(self, req: str) -> bool:
        if req in self.requests:
            self.requests.discard(req)
            return True
        return False

    # -- architectural state (x86.c as the MMU sees it) ---------------------------
    @property
    def walk_mmu(self) -> "_pg.GuestMmu":
        """``vcpu->arch.walk_mmu``: the guest MMU of the current registers
        over ``vm.guest_memory(as_id)``; rebuilt when the registers, the
        guest model or the memslots changed since the last use.  In L2
        (:meth:`nested_ept_enter`) it is L1's EPT walker
        (``GuestMmu.ept``), the walk the MMU's faults take: L2's own
        registers are not modelled."""
        if self.guest_mode:
            return self.vm.mmu_backend.nested_ept_walk_mmu(self)
        smm = self.smm
        vm = self.vm
        w = self._walk_mmu
        if w is not None and w.cpu is self.cpu and w.model is self.guest_model and w.smm == smm:
            # guest_memory's cache check, inline: the walker's memory is the
            # cached one and that is current
            c = vm._guest_mem.get(1 if smm else 0)
            if c is not None and c[1] is w.memory:
                key = c[0]
                if key[0] == vm.memslots[1 if smm else 0].generation and \
                        key[1] == vm.host.vma_gen:
                    return w
        mem = vm.guest_memory(1 if smm else 0)
        if w is None or w.memory is not mem or w.cpu is not self.cpu or \
                w.model is not self.guest_model or w.smm != smm:
            w = _pg.GuestMmu(mem, self.cpu, self.guest_model, smm=self.smm,
                             pdptrs=self.pdptrs if self._pae_paging(self.cpu) else None)
            w.smm = self.smm
            self._walk_mmu = w
        return w

    def walk_addr(self, gva: int, access: int = 0):
        """``FNAME(walk_addr)`` through :attr:`walk_mmu` (the fault path's and
        the emulator's ``gva_to_gpa`` walk): a :class:`~kvmmmu.paging.GuestWalker`.
        The A/D bits the walk writes dirty their table pages
        (``mark_page_dirty_in_slot``), as the kernel's write-back does."""
        w = self.walk_mmu.walk_addr(gva, access)
        m = w.ad_written
        if m:
            vm = self.vm
            for level in range(1, 6):
                if m >> (level - 1) & 1:
                    gfn = w.pte_gpa[level - 1] >> PAGE_SHIFT
                    M.mark_page_dirty_in_slot(vm, self.gfn_to_memslot(gfn), gfn)
        return w

    @staticmethod
    def _pae_paging(cpu) -> bool:
        return bool(cpu.cr0 & _pg.X86_CR0_PG and cpu.cr4 & _pg.X86_CR4_PAE
                    and not cpu.efer & _pg.EFER_LMA)

    def _load_pdptrs(self, cpu):
        try:
            return _pg.load_pdptrs(self.vm.guest_memory(self.as_id), cpu.cr3, self.guest_model)
        except _pg.PdptrLoadError as e:
            raise CrLoadError(f"#GP: load_pdptrs failed for CR3={cpu.cr3:#x}: {e}") from None

    def _set_state(self, cpu, *, check=True):
        """Install a new register state (``cpu`` must pass ``CpuState.check``)."""
        if check:
            try:
                cpu.check(self.guest_model)
            except _pg.CpuStateError as e:
                raise CrLoadError(f"#GP: {e}") from None
        self.cpu = cpu

    def kvm_set_cr0(self, cr0: int) -> None:
        """``kvm_set_cr0``: ET is forced on; bits 63:32, NW without CD, PG
        without PE, turning paging on in long mode without CR4.PAE, turning
        it off in 64-bit mode, or PDPTEs that do not load are a #GP
        (:class:`CrLoadError`, nothing changed).  Turning paging on with
        EFER.LME sets EFER.LMA.  Then ``kvm_post_set_cr0``: clearing PG asks
        for a guest TLB flush; a change of PG or WP resets the MMU context.
        (CS.L is not modelled: code running with EFER.LMA is 64-bit code.)"""
        self._l1_registers()
        cr0 = int_arg("cr0", cr0, 0, (1 << 64) - 1) | X86_CR0_ET
        old = self.cpu
        if cr0 >> 32:
            raise CrLoadError(f"#GP: CR0={cr0:#x} sets reserved bits 63:32")
        if cr0 & X86_CR0_NW and not cr0 & X86_CR0_CD:
            raise CrLoadError("#GP: CR0.NW without CR0.CD")
        if cr0 & _pg.X86_CR0_PG and not cr0 & _pg.X86_CR0_PE:
            raise CrLoadError("#GP: CR0.PG without CR0.PE")
        efer, pdptrs = old.efer, self.pdptrs
        if cr0 & _pg.X86_CR0_PG and not old.cr0 & _pg.X86_CR0_PG:
            if efer & _pg.EFER_LME:
                if not old.cr4 & _pg.X86_CR4_PAE:
                    raise CrLoadError("#GP: enabling paging with EFER.LME needs CR4.PAE")
                efer |= _pg.EFER_LMA
        elif not cr0 & _pg.X86_CR0_PG and old.cr0 & _pg.X86_CR0_PG and efer & _pg.EFER_LMA:
            raise CrLoadError("#GP: clearing CR0.PG in 64-bit mode")
        new = replace(old, cr0=cr0, efer=efer)
        if self._pae_paging(new) and not self._pae_paging(old):
            pdptrs = self._load_pdptrs(new)
        self._set_state(new)
        self.pdptrs = pdptrs if self._pae_paging(new) else None
        if (cr0 ^ old.cr0) & _pg.X86_CR0_PG and not cr0 & _pg.X86_CR0_PG:
            self.kvm_make_request("KVM_REQ_TLB_FLUSH_GUEST")
        if (cr0 ^ old.cr0) & KVM_MMU_CR0_ROLE_BITS:
            _mmu.kvm_mmu_reset_context(self)

    def kvm_set_cr4(self, cr4: int) -> None:
        """``kvm_set_cr4``: bits the guest model lacks, clearing PAE or
        toggling LA57 in long mode, PCIDE (not modelled) or PDPTEs that do
        not load are a #GP (:class:`CrLoadError`, nothing changed).  Then
        ``kvm_post_set_cr4``: a change of a role bit (PSE, PAE, SMEP, SMAP,
        PKE, LA57) resets the MMU context; toggling PGE asks for a guest TLB
        flush, else toggling PAE or setting SMEP for a flush of the current
        context."""
        self._l1_registers()
        cr4 = int_arg("cr4", cr4, 0, (1 << 64) - 1)
        old = self.cpu
        if cr4 & ~KVM_MODEL_CR4_BITS:
            raise CrLoadError(f"#GP: CR4={cr4:#x} sets bits the model does not support "
                              f"({cr4 & ~KVM_MODEL_CR4_BITS:#x})")
        pdptrs = self.pdptrs
        if old.efer & _pg.EFER_LMA:
            if not cr4 & _pg.X86_CR4_PAE:
                raise CrLoadError("#GP: clearing CR4.PAE in long mode")
            if (cr4 ^ old.cr4) & _pg.X86_CR4_LA57:
                raise CrLoadError("#GP: toggling CR4.LA57 in long mode")
        new = replace(old, cr4=cr4)
        if self._pae_paging(new) and (cr4 ^ old.cr4) & X86_CR4_PDPTR_BITS:
            pdptrs = self._load_pdptrs(new)
        self._set_state(new)
        self.pdptrs = pdptrs if self._pae_paging(new) else None
        if (cr4 ^ old.cr4) & KVM_MMU_CR4_ROLE_BITS:
            _mmu.kvm_mmu_reset_context(self)
        if (cr4 ^ old.cr4) & X86_CR4_PGE:
            self.kvm_make_request("KVM_REQ_TLB_FLUSH_GUEST")
        elif (cr4 ^ old.cr4) & _pg.X86_CR4_PAE or \
                (cr4 & _pg.X86_CR4_SMEP and not old.cr4 & _pg.X86_CR4_SMEP):
            self.kvm_make_request("KVM_REQ_TLB_FLUSH_CURRENT")

    def kvm_set_cr3(self, cr3: int) -> None:
        """``kvm_set_cr3`` without PCIDs: an illegal CR3 (bits above
        MAXPHYADDR in long mode, above 32 bits outside it) or PDPTEs that do
        not load are a #GP (:class:`CrLoadError`, nothing changed).  A new
        value goes to ``kvm_mmu_new_pgd`` (the fast switch among cached
        roots) before it is stored; then ``kvm_invalidate_pcid`` for PCID 0:
        with TDP a guest TLB flush, else a sync of the roots and a flush of
        the current context."""
        self._l1_registers()
        cr3 = int_arg("cr3", cr3, 0, (1 << 64) - 1)
        old = self.cpu
        pae = self._pae_paging(old)
        pdptrs = self.pdptrs
        if cr3 != old.cr3 or pae:
            new = replace(old, cr3=cr3)
            try:
                new.check(self.guest_model)
            except _pg.CpuStateError as e:
                raise CrLoadError(f"#GP: {e}") from None
            if pae:
                pdptrs = self._load_pdptrs(new)
            if cr3 != old.cr3:
                _mmu.kvm_mmu_new_pgd(self, cr3)
            self._set_state(new, check=False)
            self.pdptrs = pdptrs
            if pae:
                self._walk_mmu = None        # same CR3, new PDPTEs
        if self.vm.tdp_enabled:
            self.kvm_make_request("KVM_REQ_TLB_FLUSH_GUEST")
        else:
            self.kvm_make_request("KVM_REQ_MMU_SYNC")
            self.kvm_make_request("KVM_REQ_TLB_FLUSH_CURRENT")

    def kvm_set_efer(self, efer: int) -> None:
        """``set_efer`` from a WRMSR: bits other than SCE/LME/LMA/NX, features
        the guest model lacks, or toggling LME while paging is on are a #GP
        (:class:`CrLoadError`, nothing changed); LMA keeps its current value
        (the CPU owns it).  A change of LME or NX resets the MMU context."""
        self._l1_registers()
        efer = int_arg("efer", efer, 0, (1 << 64) - 1)
        old = self.cpu
        if efer & ~(EFER_SCE | _pg.EFER_LME | _pg.EFER_LMA | _pg.EFER_NX):
            raise CrLoadError(f"#GP: EFER={efer:#x} sets reserved bits")
        if old.cr0 & _pg.X86_CR0_PG and (efer ^ old.efer) & _pg.EFER_LME:
            raise CrLoadError("#GP: toggling EFER.LME while paging is on")
        efer = (efer & ~_pg.EFER_LMA) | (old.efer & _pg.EFER_LMA)
        self._set_state(replace(old, efer=efer))
        if (efer ^ old.efer) & KVM_MMU_EFER_ROLE_BITS:
            _mmu.kvm_mmu_reset_context(self)

    def set_cpl(self, cpl: int) -> None:
        """Change the current privilege level (no MMU effect: it only decides
        the U bit of the accesses the vCPU makes)."""
        cpl = int_arg("cpl", cpl, 0, 3)
        self.cpu = replace(self.cpu, cpl=cpl)

    def set_guest_model(self, model: "_pg.GuestCpuModel") -> None:
        """``KVM_SET_CPUID2`` as the MMU sees it (``kvm_mmu_after_set_cpuid``):
        the registers must stay valid for the new model; the MMU context is
        reset."""
        if not isinstance(model, _pg.GuestCpuModel):
            raise TypeError(f"model must be a GuestCpuModel, not {type(model).__name__}")
        try:
            self.cpu.check(model)
        except _pg.CpuStateError as e:
            raise CrLoadError(f"the registers do not fit the new guest model: {e}") from None
        self.guest_model = model
        _mmu.kvm_mmu_reset_context(self)

    # -- nested EPT (vmx/nested.c as the MMU sees it; mmu="tdp" with tdp_mmu=N) ----
    def _l1_registers(self) -> None:
        """``vcpu.cpu`` is L1's register state; L2's are not modelled (with
        nested EPT its CR3 loads never reach KVM's MMU): loads in L2 raise."""
        if self.guest_mode:
            from kvmmmu.shadow_mmu import NestedEptError
            raise NestedEptError("the vCPU runs L2: L2's control registers are not modelled "
                                 "(nested_ept_leave first)")

    def _nested_mmu(self):
        from kvmmmu.shadow_mmu import NestedEptError, ShadowMmu
        mmu = self.vm.mmu_backend
        if not isinstance(mmu, ShadowMmu):
            raise NestedEptError(f"nested EPT needs mmu='tdp' on the shadow MMU (tdp_mmu=N); this "
                                 f"VM has mmu={self.vm.mmu!r} with {type(mmu).__name__}")
        return mmu

    def nested_ept_enter(self, eptp: int, *, execonly=True, huge_level=3, ad_supported=True,
                         five_level_supported=True) -> None:
        """Nested VM entry into L2 with L1's EPT (``nested_ept_init_mmu_context``):
        ``vcpu->arch.mmu`` becomes ``guest_mmu`` (roles from
        ``kvm_calc_shadow_ept_root_page_role``: guest_mode=1, ad_disabled
        unless EPTP bit 6, the walk length, `execonly`), then
        ``kvm_mmu_new_pgd(eptp)``; L1's ``root_mmu`` keeps its roots.  The
        keywords are L1's EPT capabilities (largest page level, A/D and
        5-level support).  Faults of L2 are then
        ``kvm_mmu_page_fault(l2_gpa, ept_violation_error_code(qual))``; a
        fault in L1's tables leaves L2 (``nested_ept_exit``).  Raises
        NestedEptError (not mmu="tdp" with the shadow MMU, already in L2) or
        paging.EptpError (bad EPTP), changing nothing."""
        self._nested_mmu().nested_ept_init_mmu_context(
            self, eptp, execonly=execonly, huge_level=huge_level, ad_supported=ad_supported,
            five_level_supported=five_level_supported)

    def nested_ept_new_eptp(self, eptp: int) -> None:
        """A new EPTP while L2 runs (VMFUNC EPTP switching): the fast pgd
        switch among ``guest_mmu``'s cached roots.  NestedEptError outside
        L2, EptpError for a bad EPTP."""
        self._nested_mmu().nested_ept_new_eptp(self, eptp)

    def nested_ept_leave(self) -> None:
        """Nested VM exit to L1: ``vcpu->arch.mmu`` is ``root_mmu`` again
        with its kept root; ``guest_mmu``'s roots stay cached.
        NestedEptError outside L2."""
        self._nested_mmu().nested_vmx_vmexit(self)

    def nested_invept(self, invept_type: int, eptp: int = 0) -> None:
        """L1's INVEPT (``handle_invept``): type 1 (single context) frees the
        cached L2 roots of `eptp`'s EP4TA, type 2 (global) all of them."""
        self._nested_mmu().handle_invept(self, invept_type, eptp)

    def nested_invvpid(self) -> None:
        """L1's INVVPID (``handle_invvpid``): ``kvm_mmu_free_guest_mode_roots``."""
        self._nested_mmu().handle_invvpid(self)

    def kvm_vcpu_write_guest(self, gpa: int, data) -> None:
        """``kvm_vcpu_write_guest``: KVM writes guest memory (the page is
        marked dirty in its memslot).  A range not wholly inside writable
        memslots raises (GpaNotMappedError / GpaReadOnlyError) before
        anything is written (the kernel would stop at the first bad page)."""
        self.vm._write_guest(gpa, data, self.as_id, dirty=True)

    # -- the fault entry (kvmmmu.mmu), bound so that vcpu.X(...) is mmu.X(vcpu, ...)
    #: ``kvm_mmu_page_fault(gpa, error_code)``: an EPT violation / NPF with
    #: its PFERR_* error code; RET_PF_* or -errno (see :mod:`kvmmmu.mmu`).
    kvm_mmu_page_fault = _mmu.kvm_mmu_page_fault
    #: ``kvm_mmu_do_page_fault(gpa, error_code, prefetch)``: the MMU's handler
    #: without the entry's MMIO shortcut and statistics.
    kvm_mmu_do_page_fault = _mmu.kvm_mmu_do_page_fault
    kvm_mmu_prefetch_fault = _mmu.kvm_mmu_prefetch_fault
    #: ``KVM_PRE_FAULT_MEMORY``: ``(r, gpa, size)`` (see :func:`kvmmmu.mmu.kvm_vcpu_pre_fault_memory`)
    kvm_vcpu_pre_fault_memory = _mmu.kvm_vcpu_pre_fault_memory
    #: ``kvm_mmu_reload()``: what ``vcpu_enter_guest`` does before entering
    #: the guest (free an obsolete root, load a valid one); call it before
    #: the first fault and after a fast zap.
    kvm_mmu_reload = _mmu.kvm_mmu_reload
    kvm_mmu_load = _mmu.kvm_mmu_load
    kvm_mmu_unload = _mmu.kvm_mmu_unload
    kvm_mmu_reset_context = _mmu.kvm_mmu_reset_context
    #: ``vcpu_enter_guest()``: the MMU requests in the kernel's order, then
    #: ``kvm_mmu_reload``
    vcpu_enter_guest = _mmu.vcpu_enter_guest
    kvm_mmu_invlpg = _mmu.kvm_mmu_invlpg
    kvm_page_track_write = _mmu.kvm_page_track_write
    kvm_mmu_sync_roots = _mmu.kvm_mmu_sync_roots
    kvm_mmu_sync_prev_roots = _mmu.kvm_mmu_sync_prev_roots


class CrLoadError(ValueError):
    """A control-register or EFER load KVM refuses (the guest would get #GP);
    the vCPU is unchanged."""


X86_CR0_ET = 1 << 4
X86_CR0_NW = 1 << 29
X86_CR0_CD = 1 << 30
X86_CR4_PGE = 1 << 7
EFER_SCE = 1 << 0
#: the CR0 / CR4 / EFER bits that are part of the MMU role (a change resets the context)
KVM_MMU_CR0_ROLE_BITS = _pg.X86_CR0_PG | _pg.X86_CR0_WP
KVM_MMU_CR4_ROLE_BITS = (_pg.X86_CR4_PSE | _pg.X86_CR4_PAE | _pg.X86_CR4_SMEP |
                         _pg.X86_CR4_SMAP | _pg.X86_CR4_PKE | _pg.X86_CR4_LA57)
KVM_MMU_EFER_ROLE_BITS = _pg.EFER_LME | _pg.EFER_NX
#: CR4 bits whose change makes a PAE guest reload its PDPTEs
X86_CR4_PDPTR_BITS = X86_CR4_PGE | _pg.X86_CR4_PSE | _pg.X86_CR4_PAE | _pg.X86_CR4_SMEP
#: CR4 bits the model accepts (VME..OSXMMEXCPT, UMIP, FSGSBASE, OSXSAVE and the role bits;
#: not PCIDE: PCIDs are not modelled)
KVM_MODEL_CR4_BITS = (0x7FF | (1 << 11) | (1 << 16) | (1 << 18) | KVM_MMU_CR4_ROLE_BITS) & ~(1 << 17)


class VM:
    """``struct kvm`` for the MMU.  See the module docstring.

    Parameters
    ----------
    mmu : {"tdp_mmu", "tdp", "shadow", None}
        MMU flavour; None picks ``"tdp_mmu"`` / ``"tdp"`` from the host's TDP
        support and ``params.tdp_mmu``, else ``"shadow"``.  An explicit value
        overrides ``params.tdp_mmu``.
    host : HostConfig, optional
    params : KvmParams, optional
    vm_type : str or int
        ``"default"``, ``"sw_protected"``, ``"sev"``, ``"sev_es"``, ``"snp"``,
        ``"tdx"`` (or the KVM_X86_*_VM number).
    nr_vcpus : int
        vCPUs created now (ids 0..n-1).
    max_vcpus : int
        vCPUs the page-table arena is sized for.
    host_mm : HostMm, optional
        Share a process address space between VMs (default: a new one).
    era : {"v6.18", "v6.12"}
        Passed to the page-table arena.
    backend : "auto", None or MmuBackend
        The MMU that takes the vCPUs' faults and receives the hooks:
        ``"auto"`` gives ``mmu="tdp_mmu"`` its :class:`~kvmmmu.tdp_mmu.TdpMmu`
        (``vm.mmu_backend``; with mirror roots for a TDX VM) and the other
        flavours the shadow MMU; None registers nothing (register your own
        with :meth:`register_mmu`); an object is registered as it is.
    tdx_era : {"v6.18", "genB"}
        A TDX VM's code generation (mirror-tdx.md §0): ``"v6.18"`` (the
        modelled kernel, "Gen A": hooks take a pfn, pinned pages, premapped
        initial image) or ``"genB"`` (the newer one).
    tdx_module : kvmmmu.tdx_module.TdxModule, optional
        The TDX module a TDX VM talks to (default: its own).

    Invariants (checked by :meth:`audit`, which reports all violations at once):

    * memslots, their metadata and the VM's page counters agree
      (:func:`kvmmmu.memslots.audit_memslots`);
    * the notifier state is balanced (:meth:`MmuInvalidateState.audit`);
    * memory attributes are a coalesced interval map; every guest_memfd binding
      lies in its file, does not overlap another and names an installed slot;
    * the host page tables, the rmaps and the page-table arena pass their own
      audits; every per-vCPU cache holds ``0..capacity`` objects;
    * no statistic underflowed; ``mmu_lock`` and ``slots_lock`` are free
      between operations; no kernel WARN or KVM_BUG was hit.
    """

    def __init__(self, mmu: str | None = None, *, host: HostConfig | None = None,
                 params: KvmParams | None = None, vm_type="default", nr_vcpus: int = 1,
                 max_vcpus: int = 64, host_mm: HostMm | None = None, era: str = "v6.18",
                 backend="auto", tdx_era: str = "v6.18", tdx_module=None):
        self.host_config = host or HostConfig()
        params = params or KvmParams()
        hc = self.host_config
        if mmu is None:
            mmu = ("tdp_mmu" if params.tdp_mmu and hc.host_64bit else "tdp") if hc.tdp else "shadow"
        if mmu not in ("tdp_mmu", "tdp", "shadow"):
            raise ValueError(f"mmu must be 'tdp_mmu', 'tdp' or 'shadow', not {mmu!r}")
        if mmu != "shadow" and not hc.tdp:
            raise ValueError(f"mmu={mmu!r} needs a host with EPT or NPT (host.tdp)")
        if mmu == "tdp_mmu" and not hc.host_64bit:
            raise ValueError("the TDP MMU exists only on 64-bit hosts")
        self.mmu = mmu
        if mmu == "tdp":                       # TDP on the shadow MMU: kvm.tdp_mmu=N
            params = replace(params, tdp_mmu=False)
        elif mmu == "tdp_mmu":
            params = replace(params, tdp_mmu=True)
        self.params = params
        self.tdp_enabled = mmu != "shadow"
        self.tdp_mmu_enabled = mmu == "tdp_mmu"
        if isinstance(vm_type, str):
            if vm_type not in VM_TYPES:
                raise VmTypeError(f"unknown VM type {vm_type!r}")
            vm_type = VM_TYPES[vm_type]
        self.vm_type = vm_type
        self.kvm_sw_protected_vm = vm_type == KVM_X86_SW_PROTECTED_VM
        # Fixed for the VM's life, read on every fault: plain attributes.
        #: ``kvm_arch_has_private_mem``
        self.has_private_mem = vm_type in (KVM_X86_SW_PROTECTED_VM, KVM_X86_SNP_VM, KVM_X86_TDX_VM)
        #: ``kvm_has_mirrored_tdp`` (TDX)
        self.kvm_has_mirrored_tdp = vm_type == KVM_X86_TDX_VM
        #: ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` (on unless disabled with
        #: ``KVM_CAP_DISABLE_QUIRKS2``): deleting or moving a memslot of a
        #: default VM zaps everything (``kvm_mmu_zap_all_fast``)
        self.quirk_slot_zap_all = True
        #: ``max_huge_page_level``: 1G with host gbpages, else 2M
        self.max_huge_page_level = 3 if self.host_config.gbpages else 2
        self._check_vm_type()
        #: the SPTE format the MMUs use (EPT for ept, legacy otherwise)
        self.fmt = hc.spte_format_for(hc.tdp if self.tdp_enabled else None,
                                      mmio_caching=self.params.mmio_caching)
        #: ``kvm_ad_enabled``: the SPTEs use hardware A/D bits
        self.kvm_ad_enabled = bool(self.fmt.masks()["ad_enabled"])
        #: ``enable_mmio_caching`` (the format's, fixed like the module parameter)
        self.enable_mmio_caching = bool(self.fmt.enable_mmio_caching)
        #: ``shadow_mmio_access_mask``: the access bits an MMIO SPTE keeps
        self.shadow_mmio_access_mask = int(self.fmt.shadow_mmio_access_mask)
        self.host = host_mm if host_mm is not None else HostMm(hc)
        #: The one WARN / KVM_BUG record of this VM (kvmmmu.warn): every layer
        #: reports here; once bugged, every ioctl raises KvmBugError (-EIO).
        self.warn_sink = WarnSink()
        #: Serializes the VM's ioctls and the MMU-notifier callbacks (the
        #: kernel's slots_lock / mmu_lock discipline); re-entrant, so a host
        #: event raised inside an ioctl is handled in the same thread.  A
        #: condition: a memslot update waits on it for open invalidations of
        #: other threads (``kvm_swap_active_memslots``).
        self.api_lock = threading.Condition(threading.RLock())
        #: seconds a memslot update waits for other threads' invalidations
        self.memslot_wait_timeout = 30.0
        self.arena = PtArena(self.fmt, nr_vcpus=max_vcpus, era=era)
        self.rmap_pool = PteListDescPool()
        self._set_warn_sink(self.arena, self.rmap_pool)
        self.mmu_lock = MmuLock()
        self.notifier = MmuInvalidateState(self)
        self.mem_attrs = MemoryAttributes()
        self.stat = VmStat(self.arena, self.rmap_pool)
        self.memslots = [M.KvmMemslots(i) for i in range(self.nr_memslot_as_ids)]
        self.nr_memslot_pages = 0
        self.nr_memslots_dirty_logging = 0
        self.n_requested_mmu_pages = 0
        self.n_max_mmu_pages = 0
        self.manual_dirty_log_protect = 0
        self.dirty_ring_size = 0
        self.dirty_ring_with_bitmap = False
        self._gfn_direct_bits = 0
        self.guest_memfds: dict[int, M.GuestMemfd] = {}
        self._next_fd = 100
        self.page_track_external_users: list = []
        self.external_write_tracking = False
        self.shadow_root_allocated = False
        self.slots_lock_held = False
        self.mmus: list[MmuBackend] = []
        self.vcpus: list[Vcpu] = []
        self.max_vcpus = max_vcpus
        #: KVM_CAP_VM_DISABLE_NX_HUGE_PAGES
        self.disable_nx_huge_pages = False
        self.mmio_gen_wraps = 0
        #: ``kvm->arch.mmu_valid_gen``: flipped by kvm_mmu_zap_all_fast
        self.mmu_valid_gen = 0
        self.fail_next_metadata_alloc = False
        self._guest_mem: dict[int, tuple] = {}
        self.mmu_notifier = KvmMmuNotifier(self)
        self.host.mmu_notifier_register(self.mmu_notifier)
        #: the MMU that takes the vCPUs' page faults (``vcpu->arch.mmu``)
        self.mmu_backend: MmuBackend | None = None
        #: ``to_kvm_tdx(kvm)`` of a TDX VM (:class:`kvmmmu.tdx.KvmTdx`: the
        #: TDX kvm_x86_ops and ioctls over a TDX-module model), else None
        self.tdx = None
        if self.kvm_has_mirrored_tdp:
            from kvmmmu.tdx import KvmTdx
            self.tdx = KvmTdx(self, module=tdx_module, era=tdx_era)
        elif tdx_module is not None:
            raise VmTypeError("tdx_module is for vm_type='tdx' only")
        self._auto_backend = None
        for i in range(nr_vcpus):
            self.create_vcpu(i)
        if isinstance(backend, str):
            if backend != "auto":
                raise ValueError(f"backend must be 'auto', None or an MmuBackend, not {backend!r}")
            if mmu == "tdp_mmu":
                backend = TdpMmu(self)
            else:                               # "tdp" (tdp_mmu=N) and "shadow"
                backend = ShadowMmu(self)
            self._auto_backend = backend
        if backend is not None:
            self.register_mmu(backend)

    def _set_warn_sink(self, *objs):
        """Route the WARN/BUG reports of core objects the VM owns to its sink.
        Guarded by ``hasattr``: core classes gain the ``warn_sink`` attribute
        one by one, and a class without it keeps its local counters."""
        for o in objs:
            if hasattr(o, "warn_sink"):
                o.warn_sink = self.warn_sink

    @property
    def _fail_next_metadata_alloc(self) -> bool:
        """Old name of :attr:`fail_next_metadata_alloc` (fault injection)."""
        return self.fail_next_metadata_alloc

    @_fail_next_metadata_alloc.setter
    def _fail_next_metadata_alloc(self, v: bool) -> None:
        self.fail_next_metadata_alloc = bool(v)

    def _as_id(self, as_id) -> int:
        return int_arg("as_id", as_id, 0, self.nr_memslot_as_ids - 1)

    def _check_vm_type(self):
        t, hc = self.vm_type, self.host_config
        ok = t == KVM_X86_DEFAULT_VM
        if t == KVM_X86_SW_PROTECTED_VM:
            ok = hc.sw_protected_vm and self.tdp_mmu_enabled
        elif t in (KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM):
            ok = hc.tdp == "npt" and self.tdp_enabled
        elif t == KVM_X86_TDX_VM:
            ok = hc.tdp == "ept" and self.tdp_mmu_enabled and hc.ad_bits
        if not ok:
            raise VmTypeError(f"VM type {t} is not supported with mmu={self.mmu!r} on {hc}")

    @classmethod
    def from_host(cls, *, vm_type="default", nr_vcpus: int = 1, **kw) -> "VM":
        """A VM configured like the machine this runs on: :meth:`HostConfig.from_system`
        and :meth:`KvmParams.from_system` (on this development host: shadow
        paging - kvm_pvm has no EPT/NPT -, ``tdp_mmu=N``, ``eager_page_split=Y``,
        ``nx_huge_pages=N``, ``mmio_caching=N``, no SMM address space)."""
        return cls(None, host=HostConfig.from_system(), params=KvmParams.from_system(),
                   vm_type=vm_type, nr_vcpus=nr_vcpus, **kw)

    def __repr__(self):
        return (f"VM(mmu={self.mmu!r}, type={self.vm_type}, {len(self.vcpus)} vcpus, "
                f"{sum(len(s) for s in self.memslots)} memslots, "
                f"{self.nr_memslot_pages << PAGE_SHIFT:#x} bytes)")

    def close(self) -> None:
        """Drop the notifier subscription (``mmu_notifier_unregister``)."""
        if self.mmu_notifier in self.host.notifiers:
            self.host.mmu_notifier_unregister(self.mmu_notifier)
        for v in self.vcpus:
            v.mmu_free_memory_caches()

    @property
    def gfn_direct_bits(self) -> int:
        """``kvm->arch.gfn_direct_bits``: the TDX shared bit as a gfn bit
        (``KVM_TDX_INIT_VM`` sets it: gfn bit 35 for a 48-bit GPA width, 39
        for 52), 0 for every other VM.  Memslots, attributes and faults use
        gfns without it; a direct root is indexed with it."""
        return self._gfn_direct_bits

    @gfn_direct_bits.setter
    def gfn_direct_bits(self, bits: int) -> None:
        bits = int_arg("gfn_direct_bits", bits, 0, (1 << 40) - 1)
        if bits and not self.kvm_has_mirrored_tdp:
            raise ValueError("gfn_direct_bits: only a TDX VM has a shared bit")
        self.arena.gfn_direct_bits = bits       # checks: one bit, no table yet
        self._gfn_direct_bits = bits

    @property
    def pre_fault_allowed(self) -> bool:
        """``kvm->arch.pre_fault_allowed``: ``KVM_PRE_FAULT_MEMORY`` works on a
        default or SW-protected VM with TDP, on a TD once finalized
        (``vm.tdx.pre_fault_allowed``); never on SEV-SNP here (no launch)."""
        if self.tdx is not None:
            return bool(self.tdx.pre_fault_allowed)
        return self.tdp_enabled and self.vm_type in (KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM)

    # -- configuration predicates (kernel names) ---------------------------------------
    @property
    def has_protected_state(self) -> bool:
        return self.vm_type in (KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM, KVM_X86_TDX_VM)

    @property
    def kvm_arch_has_readonly_mem(self) -> bool:
        return not self.has_protected_state

    @property
    def kvm_arch_supports_gmem(self) -> bool:
        """v6.18: ``KVM_MEM_GUEST_MEMFD`` is valid whenever CONFIG_KVM_GUEST_MEMFD is."""
        return self.host_config.guest_memfd

    @property
    def supported_mem_attributes(self) -> int:
        return kvm_supported_mem_attributes(self)

    @property
    def nr_memslot_as_ids(self) -> int:
        """``kvm_arch_nr_memslot_as_ids``: 2 with SMM, 1 for private-memory VMs."""
        if not self.host_config.smm:
            return 1
        return 1 if self.has_private_mem else 2

    @property
    def kvm_memslots_have_rmaps(self) -> bool:
        return not self.tdp_mmu_enabled or self.shadow_root_allocated

    @property
    def kvm_page_track_write_tracking_enabled(self) -> bool:
        return self.external_write_tracking or not self.tdp_enabled or self.shadow_root_allocated

    @property
    def kvm_use_dirty_bitmap(self) -> bool:
        return not self.dirty_ring_size or self.dirty_ring_with_bitmap

    @property
    def kvm_dirty_log_manual_protect_and_init_set(self) -> bool:
        return bool(self.manual_dirty_log_protect & M.KVM_DIRTY_LOG_INITIALLY_SET)

    @property
    def cpu_dirty_log_size(self) -> int:
        """``kvm->arch.cpu_dirty_log_size``: the PML buffer size (512) with PML, else 0."""
        return 512 if (self.tdp_enabled and self.host_config.pml) else 0

    @property
    def is_nx_huge_page_enabled(self) -> bool:
        return self.params.nx_huge_pages and not self.disable_nx_huge_pages

    def kvm_mem_is_private(self, gfn: int) -> bool:
        return self.has_private_mem and bool(self.mem_attrs.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE)

    # -- vCPUs, MMUs, requests, flushes -----------------------------------------------
    @_vm_ioctl
    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        """``KVM_CREATE_VCPU``."""
        if len(self.vcpus) >= self.max_vcpus:
            raise ValueError(f"already {self.max_vcpus} vCPUs")
        if vcpu_id is None:
            vcpu_id = len(self.vcpus)
        vcpu_id = int_arg("vcpu_id", vcpu_id, 0, 0xFFFFFFFF)
        if any(v.vcpu_id == vcpu_id for v in self.vcpus):
            raise ValueError(f"vCPU {vcpu_id} exists")
        v = Vcpu(self, vcpu_id, len(self.vcpus))
        self.vcpus.append(v)
        return v

    def register_mmu(self, mmu: MmuBackend) -> MmuBackend:
        """Register an MMU (an :class:`MmuBackend`: every hook of
        :data:`~kvmmmu.mmu.MMU_BACKEND_HOOKS` callable) to receive the hooks."""
        missing = [h for h in _mmu.MMU_BACKEND_HOOKS if not callable(getattr(mmu, h, None))]
        if missing:
            raise TypeError(f"mmu lacks the MmuBackend hooks {', '.join(missing)}")
        takes_faults = getattr(type(mmu), "mmu_page_fault", MmuBackend.mmu_page_fault) \
            is not MmuBackend.mmu_page_fault
        with self.api_lock:
            if any(m is mmu for m in self.mmus):
                raise ValueError(f"{type(mmu).__name__} is already registered on this VM")
            if takes_faults and self.mmu_backend is not None:
                auto = self._auto_backend
                if self.mmu_backend is not auto or auto.roots or auto.vcpu_root:
                    raise ValueError(
                        f"the VM already has an MMU that takes its faults "
                        f"({type(self.mmu_backend).__name__}, vm.mmu_backend); create the VM "
                        f"with backend=None to register another")
                # the automatic TdpMmu was never used: the one given replaces it
                self.mmus.remove(auto)
                self.mmu_backend = self._auto_backend = None
            self.mmus.append(mmu)
            if takes_faults:
                self.mmu_backend = mmu
        return mmu

    def kvm_make_all_cpus_request(self, req: str) -> None:
        for v in self.vcpus:
            v.kvm_make_request(req)

    def kvm_flush_remote_tlbs(self) -> None:
        """``kvm_flush_remote_tlbs``: ``stat.remote_tlb_flush_requests`` counts
        it, ``remote_tlb_flush`` only when a vCPU needed the IPI (one not
        outside guest mode); every vCPU gets KVM_REQ_TLB_FLUSH (seen at its
        next ``vcpu_enter_guest``, counted in its ``tlb_flush``)."""
        self.arena.kvm_flush_remote_tlbs()

    def kvm_bug(self, msg: str, site: str = "KVM_BUG_ON") -> None:
        """KVM_BUG_ON: the VM is marked bugged; every later ioctl fails with
        :class:`~kvmmmu.warn.KvmBugError` (-EIO)."""
        self.warn_sink.bug(site, msg)

    @property
    def bugged(self) -> list[str]:
        """The KVM_BUG messages (empty while the VM is healthy)."""
        return self.warn_sink.bugs

    def mmu_first_shadow_root_alloc(self) -> None:
        """``mmu_first_shadow_root_alloc``: the first shadow root of a TDP-MMU VM
        (nested TDP) allocates rmaps and write-tracking arrays for every slot."""
        if self.shadow_root_allocated:
            return
        from kvmmmu._core.rmap import RmapSlot
        for slots in self.memslots:
            for s in slots:
                if s.arch.rmap is None:
                    s.arch.rmap = RmapSlot(s.base_gfn, s.npages, self.rmap_pool)
                if s.arch.gfn_write_track is None:
                    s.arch.gfn_write_track = np.zeros(s.npages, dtype=np.uint16)
        self.shadow_root_allocated = True

    # -- memslots ----------------------------------------------------------------
    def kvm_swap_active_memslots(self, as_id: int) -> None:
        """``kvm_swap_active_memslots``: publish, then generation += nr_as (with the
        update-in-progress bit set in between) and ``kvm_arch_memslots_updated``."""
        slots = self.memslots[as_id]
        gen = slots.generation
        if gen & M.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
            self.warn_sink.warn("kvm_swap_active_memslots", "memslot generation already in progress")
        slots.generation = gen | M.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
        gen = (slots.generation & ~M.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS) + self.nr_memslot_as_ids
        try:
            self.kvm_mmu_invalidate_mmio_sptes(gen)
        finally:
            slots.generation = gen          # published even if an MMU's zap raised

    def kvm_mmu_invalidate_mmio_sptes(self, gen: int) -> None:
        """If the MMIO generation wrapped (ignoring the address-space bits), fast-zap
        everything, since old MMIO SPTEs could match again."""
        g = gen & MMIO_SPTE_GEN_MASK
        g &= ~(self.nr_memslot_as_ids - 1)
        if g == 0:
            self.mmio_gen_wraps += 1
            _mmu.kvm_mmu_zap_all_fast(self)

    @_vm_ioctl
    def set_user_memory_region(self, slot, flags=0, guest_phys_addr=0, memory_size=0,
                               userspace_addr=0, guest_memfd_offset=0, guest_memfd=0, *,
                               v1: bool = False):
        """``KVM_SET_USER_MEMORY_REGION2`` (``v1=True``: the V1 ioctl).  ``slot`` is the
        packed ``as_id << 16 | id`` or a :class:`~kvmmmu.memslots.UserspaceMemoryRegion`.
        Returns the :class:`~kvmmmu.memslots.KvmMrChange` made (None: no change)."""
        if isinstance(slot, M.UserspaceMemoryRegion):
            mem = slot
        else:
            mem = M.UserspaceMemoryRegion(slot, flags, guest_phys_addr, memory_size, userspace_addr,
                                          guest_memfd_offset, guest_memfd)
        return M.kvm_set_memory_region(self, mem, v1=v1)

    @_vm_ioctl
    def add_memory(self, gpa: int, size: int, *, slot: int | None = None, as_id: int = 0,
                   flags: int = 0, writable: bool | None = None, thp: bool = False,
                   hugetlb=None, populate: bool = False, hva: int | None = None,
                   guest_memfd: bool = False):
        """Map ``size`` bytes of host memory and create a memslot for ``[gpa, gpa+size)``.

        The host mapping is read-only for READONLY slots unless ``writable``.
        ``guest_memfd``: also create a guest_memfd of ``size`` bytes and bind
        the slot to it (``KVM_MEM_GUEST_MEMFD``, offset 0), so that the range
        can hold private memory.
        Returns the new :class:`~kvmmmu.memslots.KvmMemorySlot`.
        """
        fd = 0
        if guest_memfd:
            fd = self.create_guest_memfd(size)
            flags |= M.KVM_MEM_GUEST_MEMFD
        if writable is None:
            writable = not flags & M.KVM_MEM_READONLY
        if slot is None:
            used = {s.id for s in self.memslots[as_id]}
            slot = next(i for i in range(M.KVM_USER_MEM_SLOTS) if i not in used)
        addr = self.host.mmap(size, hva=hva, writable=writable, thp=thp, hugetlb=hugetlb,
                              populate=populate)
        try:
            self.set_user_memory_region((as_id << 16) | slot, flags, gpa, size, addr, 0, fd)
        except BaseException:
            # an MMU hook that raised past the commit point leaves the slot
            # created: its host mapping stays (unmapping it would zap the slot)
            s = self.memslots[as_id].id_to_memslot(slot)
            if s is None or s.userspace_addr != addr:
                self.host.munmap(addr, size)
            raise
        return self.memslots[as_id].id_to_memslot(slot)

    @_vm_ioctl
    def delete_memslot(self, slot_id: int, as_id: int = 0) -> None:
        slot_id = int_arg("slot_id", slot_id, 0, 0xFFFF)
        self.set_user_memory_region((self._as_id(as_id) << 16) | slot_id, 0, 0, 0, 0)

    def gfn_to_memslot(self, gfn: int, as_id: int = 0):
        return self.memslots[self._as_id(as_id)].gfn_to_memslot(int_arg("gfn", gfn))

    @_vm_ioctl
    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """``KVM_CREATE_GUEST_MEMFD``: returns a file descriptor number."""
        size = int_arg("size", size, 0, (1 << 64) - 1)
        flags = int_arg("flags", flags, 0, (1 << 64) - 1)
        if not self.host_config.guest_memfd:
            raise M.GuestMemfdError("CONFIG_KVM_GUEST_MEMFD is off")
        if flags:
            raise M.GuestMemfdError(f"guest_memfd flags {flags:#x} not supported by the model")
        if size <= 0 or size % (1 << PAGE_SHIFT):
            raise M.GuestMemfdError(f"guest_memfd size {size:#x} must be positive and page aligned")
        fd = self._next_fd
        self._next_fd += 1
        self.guest_memfds[fd] = M.GuestMemfd(self, size, flags, fd)
        return fd

    def kvm_gmem_get_file(self, fd):
        if isinstance(fd, M.GuestMemfd):
            g = fd
        else:
            g = self.guest_memfds.get(fd)
            if g is None:
                raise M.GuestMemfdBadFdError(f"{fd} is not an open file descriptor")
        if g.vm is not self:
            raise M.GuestMemfdBindError("guest_memfd belongs to another VM")
        return g

    @_vm_ioctl
    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` (see :mod:`kvmmmu.memattrs`)."""
        kvm_vm_ioctl_set_mem_attributes(self, address, size, attributes, flags)

    @_vm_ioctl
    def enable_manual_dirty_log_protect(self, flags: int) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)``."""
        flags = int_arg("flags", flags)
        if flags & ~(M.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | M.KVM_DIRTY_LOG_INITIALLY_SET):
            raise M.DirtyLogError(f"bad flags {flags:#x}")
        if flags and not flags & M.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            raise M.DirtyLogError("INITIALLY_SET needs MANUAL_PROTECT_ENABLE")
        self.manual_dirty_log_protect = flags

    @_vm_ioctl
    def get_dirty_log(self, slot: int) -> np.ndarray:
        return M.kvm_get_dirty_log_protect(self, slot)

    @_vm_ioctl
    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap) -> None:
        M.kvm_clear_dirty_log_protect(self, slot, first_page, num_pages, bitmap)

    def mark_page_dirty(self, gfn, as_id: int = 0) -> None:
        """``mark_page_dirty`` for an int gfn or an array of gfns of one slot."""
        slots = self.memslots[self._as_id(as_id)]
        if isinstance(gfn, np.ndarray):
            gfn = check_array("gfn", gfn)
            if not gfn.size:
                return
            g0 = int(gfn[0])
        else:
            gfn = g0 = int_arg("gfn", gfn)
        M.mark_page_dirty_in_slot(self, slots.gfn_to_memslot(g0), gfn)

    # -- the MMU seam (kvmmmu.mmu): the kernel's kvm_arch_* / kvm_mmu_* entry ------
    # points, bound as methods so a caller pays one Python call.
    kvm_mmu_faultin_pfn = _mmu.kvm_mmu_faultin_pfn
    is_page_fault_stale = _mmu.is_page_fault_stale
    kvm_mmu_max_mapping_level = _mmu.kvm_mmu_max_mapping_level
    kvm_mmu_max_mapping_level_array = _mmu.kvm_mmu_max_mapping_level_array
    kvm_mmu_gfn_disallow_lpage = _mmu.kvm_mmu_gfn_disallow_lpage
    kvm_mmu_gfn_allow_lpage = _mmu.kvm_mmu_gfn_allow_lpage
    kvm_mmu_init_memslot_memory_attributes = _mmu.kvm_mmu_init_memslot_memory_attributes
    kvm_arch_pre_set_memory_attributes = _mmu.kvm_arch_pre_set_memory_attributes
    kvm_arch_post_set_memory_attributes = _mmu.kvm_arch_post_set_memory_attributes
    kvm_mmu_slot_apply_flags = _mmu.kvm_mmu_slot_apply_flags
    kvm_unmap_gfn_range = _mmu.kvm_unmap_gfn_range
    kvm_age_gfn = _mmu.kvm_age_gfn
    kvm_test_age_gfn = _mmu.kvm_test_age_gfn
    kvm_zap_gfn_range = _mmu.kvm_zap_gfn_range
    kvm_arch_flush_shadow_all = _mmu.kvm_arch_flush_shadow_all
    kvm_arch_flush_shadow_memslot = _mmu.kvm_arch_flush_shadow_memslot
    kvm_mmu_zap_all_fast = _mmu.kvm_mmu_zap_all_fast
    kvm_arch_mmu_enable_log_dirty_pt_masked = _mmu.kvm_arch_mmu_enable_log_dirty_pt_masked
    kvm_mmu_change_mmu_pages = _mmu.kvm_mmu_change_mmu_pages

    # -- guest memory contents ------------------------------------------------------
    def guest_memory(self, as_id: int = 0) -> GuestMemory:
        """The guest physical memory of address space `as_id` as the guest
        walker reads it: one :class:`~kvmmmu._core.guest_walk.GuestMemory`
        slot per memslot, over the bytes of the host VMA behind it
        (:attr:`kvmmmu.host.Vma.data`), read-only for READONLY memslots.  A
        memslot whose hva range is not inside one VMA is left out (its gpas
        read as holes, as a failed ``copy_from_user`` would).  Rebuilt when
        the memslots generation or the host's VMA list changed."""
        # an as_id with a cached memory was checked when it was built: only
        # a plain int is looked up before the check (1.0 would hash like 1)
        c = self._guest_mem.get(as_id) if type(as_id) is int else None
        if c is not None:
            key = c[0]
            if key[0] == self.memslots[as_id].generation and key[1] == self.host.vma_gen:
                return c[1]
        as_id = self._as_id(as_id)
        slots = self.memslots[as_id]
        key = (slots.generation, self.host.vma_gen)
        mem = GuestMemory()
        for s in slots:
            if s.flags & M.KVM_MEMSLOT_INVALID:
                continue
            size = s.npages << PAGE_SHIFT
            v = self.host.find_vma(s.userspace_addr)
            if v is None or s.userspace_addr + size > v.end:
                continue
            off = s.userspace_addr - v.start
            mem.add_slot(s.base_gfn << PAGE_SHIFT, v.data[off:off + size],
                         readonly=bool(s.flags & M.KVM_MEM_READONLY))
        self._guest_mem[as_id] = (key, mem)
        return mem

    def read_guest(self, gpa: int, size: int, as_id: int = 0) -> bytes:
        """The VMM reads guest memory (``size`` bytes at ``gpa``)."""
        return self.guest_memory(as_id).read(int_arg("gpa", gpa), int_arg("size", size, 0, 1 << 32))

    def write_guest(self, gpa: int, data, as_id: int = 0) -> None:
        """The VMM writes guest memory through its own mapping: no page
        tracking, no dirty logging, allowed on READONLY memslots (the host
        mapping is the VMM's).  Like any store, it faults the host pages in
        (writable when the VMA is), so a later read fault of the guest maps
        them host-writable, as on the real machine.  A range not wholly inside memslots raises
        GpaNotMappedError before anything is written."""
        self._write_guest(gpa, data, as_id, dirty=False)

    def _write_guest(self, gpa, data, as_id, *, dirty):
        gpa = int_arg("gpa", gpa)
        data = bytes(data)
        as_id = self._as_id(as_id)
        slots = self.memslots[as_id]
        mem = self.guest_memory(as_id)
        end = gpa + len(data)
        pieces = []
        g = gpa
        while g < end:                                  # check every page first
            gfn = g >> PAGE_SHIFT
            slot = slots.gfn_to_memslot(gfn)
            if slot is None or not mem.is_mapped(g):
                raise GpaNotMappedError(f"gpa {g:#x} is not in a memslot backed by host memory")
            if dirty and slot.flags & M.KVM_MEM_READONLY:
                raise GpaReadOnlyError(f"gpa {g:#x} is in a read-only memslot")
            n = min(end, (gfn + 1) << PAGE_SHIFT) - g
            pieces.append((g, slot, gfn, n))
            g += n
        for g, slot, gfn, n in pieces:
            off = g - gpa
            hva = slot.userspace_addr + g - (slot.base_gfn << PAGE_SHIFT)
            v = self.host.find_vma(hva)
            # the store faults the page in (writable where the mapping allows:
            # a loader writing a read-only mapping has its own writable alias)
            self.host.populate(hva, n, write=v.writable)
            v.data[hva - v.start:hva - v.start + n] = np.frombuffer(data, np.uint8, n, off)
            if dirty:
                M.mark_page_dirty_in_slot(self, slot, gfn)

    def mmio_generation(self, as_id: int = 0) -> int:
        return self.memslots[self._as_id(as_id)].generation & MMIO_SPTE_GEN_MASK

    # -- snapshots and audit ---------------------------------------------------------
    def snapshot(self):
        """Everything a failed memslot / attribute call must leave unchanged."""
        return (tuple((s.generation, tuple(x.snapshot() for x in s)) for s in self.memslots),
                self.nr_memslot_pages, self.nr_memslots_dirty_logging, self.n_max_mmu_pages,
                self.notifier.snapshot(), self.mem_attrs.snapshot(),
                tuple((fd, tuple((a, b, sl.id) for a, b, sl in g.bindings))
                      for fd, g in sorted(self.guest_memfds.items())),
                tuple(tuple(sorted(v.requests)) for v in self.vcpus))

    def audit(self, raise_: bool = True) -> list[str]:
        """Check every invariant of the VM and its parts (memslots and their
        metadata, memory attributes, notifier state, host page tables, rmaps,
        page-table arena, caches, statistics); report all violations at once.

        Raises VmAuditError (``raise_``) or returns the list."""
        bad = list(M.audit_memslots(self))
        bad += self.notifier.audit()
        bad += self.mem_attrs.audit()
        bad += ["host: " + x for x in self.host.audit()]
        bad += self.stat.audit()
        for mmu in self.mmus:
            bad += [f"{type(mmu).__name__}: {x}" for x in mmu.audit()]
            if getattr(mmu, "mirrored", False):
                bad += [f"{type(mmu).__name__} mirror: {x}" for x in mmu.audit_mirror()]
        if self.tdx is not None:
            bad += [f"tdx: {x}" for x in self.tdx.audit()]
        try:
            self.arena.audit()
        except AssertionError as e:
            bad.append(f"arena: {e}")
        if self.mmu_lock.held:
            bad.append("mmu_lock held between operations")
        if self.slots_lock_held:
            bad.append("slots_lock held between operations")
        for fd, g in self.guest_memfds.items():
            spans = sorted((a, b) for a, b, _ in g.bindings)
            for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
                if a1 < b0:
                    bad.append(f"guest_memfd {fd}: overlapping bindings")
            for a, b, sl in g.bindings:
                if b > g.size >> PAGE_SHIFT:
                    bad.append(f"guest_memfd {fd}: binding beyond the file")
                if self.memslots[sl.as_id].id_to_memslot(sl.id) is not sl:
                    bad.append(f"guest_memfd {fd}: binding of a slot that is not installed")
        for v in self.vcpus:
            for name, c in v.caches().items():
                if not 0 <= c.nobjs <= c.capacity:
                    bad.append(f"vcpu {v.vcpu_id}: {name} holds {c.nobjs} of {c.capacity}")
            bad += [f"vcpu {v.vcpu_id}: {x}" for x in v.stat.audit()]
            if v.smm and self.nr_memslot_as_ids < 2:
                bad.append(f"vcpu {v.vcpu_id}: in SMM without an SMM address space")
        if self.notifier.warnings:
            bad += ["WARN: " + w for w in self.notifier.warnings]
        if self.bugged:
            bad += ["KVM_BUG: " + b for b in self.bugged]
        if bad and raise_:
            raise VmAuditError(bad)
        return bad
