"""The shadow MMU (``arch/x86/kvm/mmu/mmu.c`` without the TDP MMU, and
``paging_tmpl.h``): shadow pages in a hash, rmaps, unsync, write
protection of guest page tables, zapping.

One :class:`ShadowMmu` per VM takes the vCPUs' faults for three flavours:

* ``mmu="tdp"`` (TDP on the shadow MMU, ``kvm.tdp_mmu=N``): direct shadow
  pages indexed by gpa; ``direct_page_fault`` with ``fast_page_fault``,
  ``direct_map`` and ``direct_pte_prefetch``;
* ``mmu="shadow"`` (``tdp_enabled=false``): the guest's page tables are
  shadowed.  ``FNAME(page_fault)`` walks them through ``vcpu.walk_mmu``
  (:class:`kvmmmu.paging.GuestMmu`), ``FNAME(fetch)`` builds indirect
  shadow pages for the guest tables and direct ones below a guest huge
  page, ``FNAME(pte_prefetch)`` maps the accessed neighbours.  A guest with
  paging off runs on direct PAE roots (``nonpaging_page_fault``);
* nested EPT on ``mmu="tdp"`` (``kvm_init_shadow_ept_mmu``): while a vCPU
  runs L2 (``vcpu.nested_ept_enter(eptp)``) its ``vcpu->arch.mmu`` is
  ``guest_mmu`` (:class:`KvmMmu` with ``ept``): L1's EPT tables are
  shadowed with indirect ``guest_mode`` pages through the same
  ``FNAME(page_fault)``/``fetch``, ``vcpu.walk_mmu`` being L1's EPT walker
  (``GuestMmu.ept``); gPTEs are 8 bytes with R/W/X (R stands for ACC_USER),
  A/D at bits 8/9 only when the EPTP enables them.  ``root_mmu`` keeps its
  direct roots meanwhile; an EPTP change goes through ``kvm_mmu_new_pgd``;
  INVEPT frees ``guest_mmu`` roots; a fault in L1's tables exits to L1
  (``vcpu.nested_ept_exit``).

Use::

    vm = VM("tdp")                       # or VM("shadow"); vm.mmu_backend is a ShadowMmu
    v = vm.vcpus[0]
    v.vcpu_enter_guest()                 # loads the root (kvm_mmu_reload)
    v.kvm_mmu_page_fault(addr, error_code)   # RET_PF_*; gva for shadow paging

Where the ``struct kvm_mmu_page`` fields live.  Each shadow page is a
header and a table of the VM's :class:`~kvmmmu._core.pt_arena.PtArena`
(``PtArena.alloc_sp``) and a Python mirror, :class:`KvmMmuPage`.  The
arena header holds ``spt``, ``shadowed_translation`` (the table and the
gfn/access page themselves), ``gfn``, ``role`` (``role.invalid`` written
when the page is zapped), ``mmu_valid_gen``, ``root_count`` and
``unsync`` (written when they change: rarely).  The fields the fault path
touches on every pass - ``unsync_children``, ``unsync_child_bitmap``,
``parent_ptes`` (an :class:`~kvmmmu._core.rmap.ParentPtes` list), the hash
and active-list links, ``nx_huge_page_disallowed`` - live only in the
mirror, for speed; ``write_flooding_count`` is mirrored and written through
to the header, where the C fault path reads it.

The fault's hot part runs in C (:mod:`kvmmmu._core.shadow_fault`, while
:attr:`ShadowMmu.c_fast_path`): ``FNAME(fetch)`` of a 4K guest leaf and
``direct_map`` at a 4K goal over the shadow pages that exist, with
``mmu_set_spte``, ``rmap_add`` and the prefetch; whatever needs this
module (a new page, an unsync decision, MMIO, huge pages, ...) is declined
before any change and done here.  :meth:`ShadowMmu.page_fault_batch` runs
many faults that way, walk and faultin included.

Lists, in the kernel's order: ``mmu_page_hash`` (4096 buckets, bucket
``hash_64(gfn, 12)``, newest first as ``hlist_add_head`` leaves them) and
``active_mmu_pages`` (an insertion-ordered dict: its *first* item is the
kernel list's tail, the oldest page; new pages go at the end, the kernel's
head), ``possible_nx_huge_pages`` likewise.

Per vCPU, :class:`KvmMmu` is ``vcpu->arch.mmu`` (``root_mmu``): the CPU and
root roles, ``root`` and the three ``prev_roots`` (:class:`KvmMmuRootInfo`),
``pae_root``.  ``vcpu.mmu_root`` is the current root while it is valid.

Statistics: ``vm.stat`` counters (``mmu_shadow_zapped``, ``mmu_pte_write``,
``mmu_pde_zapped``, ``mmu_flooded``, ``mmu_recycled``, ``mmu_cache_miss``,
``mmu_unsync``, ``nx_lpage_splits``, ``max_mmu_page_hash_collisions``)
change where the kernel changes them; ``pages_*`` through the arena,
``max_mmu_rmap_size`` through the rmap pool.

Invariants (checked by :meth:`ShadowMmu.audit`, reported all at once):
every present leaf SPTE is in exactly one rmap, at its (gfn, level, slot),
and every rmap entry is such a leaf; ``parent_ptes`` are exactly the
non-leaf SPTEs pointing at each page; ``unsync`` only on level-1 indirect
pages, every unsync page reachable through set ``unsync_child_bitmap``
bits, ``unsync_children`` equal to the bits set, ``mmu_unsync`` equal to
the unsync pages; (gfn, role) unique among valid pages; each indirect page
above 4K write-tracks its gfn (counter = number of such pages) and each
level-1 one disallows huge pages over it; no writable SPTE maps a
write-tracked gfn or a gfn shadowed by a sync page (S1-S4); the active list
FIFO by creation (S9), ``n_used_mmu_pages`` its length (S7), generations
in {0, 1} (S8).

Thread-safety: a :class:`ShadowMmu` is shared by the VM's vCPUs but, like
the kernel's shadow MMU, every change runs with ``vm.mmu_lock`` held for
write (the fault path, root load/free, sync, zaps, hooks).  The model's
MmuLock does not wait: a second thread entering while one holds the lock
raises ``ConcurrentUseError``, so callers serialize (one vCPU thread at a
time, or their own lock).  :class:`KvmMmuPage` / :class:`KvmMmu` are owned
by their ShadowMmu / vCPU and never shared on their own.
"""
from __future__ import annotations

import errno as E
import operator

import numpy as np

from kvmmmu import mmu as _mmu
from kvmmmu import mmutrace as _tp
from kvmmmu import page_track as _pt
from kvmmmu._core.defs import (
    ACC_ALL, ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK, KVM_MAX_HUGEPAGE_LEVEL, PAGE_SHIFT,
    PG_LEVEL_4K, PTE_PREFETCH_NUM, RET_PF_CONTINUE, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_INVALID, RET_PF_RETRY,
    RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED,
)
from kvmmmu._core.guest_walk import (
    EPT_VIOLATION_ACC_INSTR, EPT_VIOLATION_ACC_READ, EPT_VIOLATION_ACC_WRITE, PFERR_FETCH_MASK,
    PFERR_IMPLICIT_ACCESS, PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK,
)
from kvmmmu._core.shadow_fault import DECLINE as _DECLINE, ShadowFastCore
from kvmmmu._core.rmap import (
    RMAP_RECYCLE_THRESHOLD, ParentPtes, gfn_to_rmap, rmap_add as _rmap_add, rmap_remove as _rmap_remove,
)
from kvmmmu._core.role import (
    KvmCpuRole, KvmMmuPageRole, kvm_calc_cpu_role, kvm_calc_shadow_ept_root_page_role,
    kvm_calc_shadow_mmu_root_page_role,
    kvm_calc_tdp_mmu_root_page_role, kvm_mmu_child_role, kvm_mmu_get_tdp_level,
    role_sync_mismatch,
)
from kvmmmu._core.spte import (
    PT_ACCESSED_MASK, PT_PAGE_SIZE_MASK, PT_PRESENT_MASK, PT_USER_MASK, PT_WRITABLE_MASK,
    SPTE_BASE_ADDR_MASK, SPTE_MMU_PRESENT_MASK,
)
from kvmmmu._core.spte import spte_ad_enabled as _spte_ad_enabled
from kvmmmu._core._checks import check_array, int_arg
from kvmmmu.errors import KvmNoMemoryError
from kvmmmu.host import KVM_PFN_NOSLOT, hva_to_pfn_fast
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEMSLOT_INVALID
from kvmmmu.mmu import KvmPageFault, MmuBackend
from kvmmmu.paging import AccessError, GuestMmu, reset_guest_rsvds_bits_mask

__all__ = [
    "ShadowMmu", "KvmMmuPage", "KvmMmu", "KvmMmuRootInfo", "kvm_page_table_hashfn",
    "KVM_MMU_HASH_SHIFT", "KVM_NUM_MMU_PAGES", "KVM_MMU_NUM_PREV_ROOTS", "KVM_MMU_ROOT_CURRENT",
    "KVM_MMU_ROOTS_ALL", "KVM_MMU_ROOT_PREVIOUS", "PTE_PREFETCH_NUM", "KVM_MIN_FREE_MMU_PAGES",
    "KVM_REFILL_PAGES", "KVM_PAGE_ARRAY_NR", "WRITE_FLOODING_THRESHOLD",
    "NestedEpt", "NestedEptError", "NestedEptExit", "ept_violation_error_code",
    "VMX_EPT_EXTENT_CONTEXT", "VMX_EPT_EXTENT_GLOBAL", "EXIT_REASON_EPT_VIOLATION",
    "EXIT_REASON_EPT_MISCONFIG",
]

KVM_MMU_HASH_SHIFT = 12
KVM_NUM_MMU_PAGES = 1 << KVM_MMU_HASH_SHIFT
GOLDEN_RATIO_64 = 0x61C8864680B583EB
_U64 = (1 << 64) - 1
KVM_MMU_NUM_PREV_ROOTS = 3
KVM_MMU_ROOT_CURRENT = 1


#: the bits a #PF error code can carry: P W U RSVD I/D PK SS (0-6) and SGX (15)
_PF_ERROR_CODE_BITS = 0x807F


def KVM_MMU_ROOT_PREVIOUS(i: int) -> int:
    return 1 << (i + 1)


KVM_MMU_ROOTS_ALL = (1 << (1 + KVM_MMU_NUM_PREV_ROOTS)) - 1
KVM_MIN_FREE_MMU_PAGES = 5
KVM_REFILL_PAGES = 25
KVM_PAGE_ARRAY_NR = 16
BATCH_ZAP_PAGES = 10
#: detect_write_flooding: an upper-level page is zapped at its third
#: emulated write without an intervening use
WRITE_FLOODING_THRESHOLD = 3
PT32_ROOT_LEVEL = 2
PT32E_ROOT_LEVEL = 3
PT64_ROOT_4LEVEL = 4
INVALID_INDEX = -1

# root.hpa values that are not a shadow page's table (root_to_sp() is NULL)
INVALID_PAGE = None
PAE_ROOT = "pae_root"
DUMMY_ROOT = "dummy_root"

_PRESENT = SPTE_MMU_PRESENT_MASK
_LARGE = PT_PAGE_SIZE_MASK
_ADDR = SPTE_BASE_ADDR_MASK
_W = PT_WRITABLE_MASK
_GUEST_ACCESS = PFERR_PRESENT_MASK | PFERR_WRITE_MASK | PFERR_USER_MASK | PFERR_FETCH_MASK | \
    PFERR_IMPLICIT_ACCESS
# 64-bit and 32-bit guest PTE frame masks (PT64_BASE_ADDR_MASK / PT32_BASE_ADDR_MASK)
_GPTE64_ADDR = ((1 << 52) - 1) & ~0xFFF
_GPTE32_ADDR = 0xFFFFF000
_GPTE_NX = 1 << 63
# EPT entry bits (SDM Vol. 3C 29.3.2): read, write, execute, accessed, dirty
_EPT_R, _EPT_W, _EPT_X, _EPT_A, _EPT_D = 1, 2, 4, 1 << 8, 1 << 9
_EPT_RWX = 7


# --- nested EPT (vmx/nested.c as the MMU sees it) -----------------------------------
#: INVEPT types (``VMX_EPT_EXTENT_*``)
VMX_EPT_EXTENT_CONTEXT = 1
VMX_EPT_EXTENT_GLOBAL = 2
#: the VM-exit reasons a fault in L1's EPT is reflected to L1 with
EXIT_REASON_EPT_VIOLATION = 48
EXIT_REASON_EPT_MISCONFIG = 49
#: EPT violation exit qualification bits (SDM Vol. 3C Table 28-7; the access
#: bits 2:0 come from the walker's home, _core.guest_walk)
EPT_VIOLATION_PROT_MASK = 7 << 3
EPT_VIOLATION_GVA_IS_VALID = 1 << 7
EPT_VIOLATION_GVA_TRANSLATED = 1 << 8
#: ``EPTP_PA_MASK``: the EP4TA bits of an EPTP (INVEPT and the TLB tag roots by them)
EPTP_PA_MASK = ((1 << 52) - 1) & ~0xFFF
_PFERR_GUEST_FINAL = _mmu.PFERR_GUEST_FINAL_MASK
_PFERR_GUEST_PAGE = _mmu.PFERR_GUEST_PAGE_MASK
#: the error-code bits an EPT violation of L2 can carry (``__vmx_handle_ept_violation``)
_EPT_VIOLATION_PFERR = PFERR_PRESENT_MASK | PFERR_WRITE_MASK | PFERR_USER_MASK | \
    PFERR_FETCH_MASK | _PFERR_GUEST_FINAL | _PFERR_GUEST_PAGE


class NestedEptError(ValueError):
    """A nested EPT operation the vCPU's state does not allow: entering L2
    on a VM whose MMU is not the shadow MMU with TDP (``mmu="tdp"``,
    ``tdp_mmu=N``, an EPT host), entering twice, leaving or switching the
    EPTP outside L2, INVEPT from L2, or an INVEPT type L1 cannot use."""


def ept_violation_error_code(exit_qualification: int) -> int:
    """``__vmx_handle_ept_violation``: the PFERR_* error code of an EPT
    violation exit: read -> U, write -> W, fetch -> F, any of the entry's
    R/W/X permission bits -> P, and with a valid guest linear address
    PFERR_GUEST_FINAL (the access was to the final translation) or
    PFERR_GUEST_PAGE (to a paging structure).

    Raises ValueError for a qualification that is not a 64-bit int."""
    q = operator.index(exit_qualification)
    if not 0 <= q <= _U64:
        raise ValueError(f"exit_qualification={q:#x} is not a 64-bit value")
    ec = (PFERR_USER_MASK if q & EPT_VIOLATION_ACC_READ else 0) | \
        (PFERR_WRITE_MASK if q & EPT_VIOLATION_ACC_WRITE else 0) | \
        (PFERR_FETCH_MASK if q & EPT_VIOLATION_ACC_INSTR else 0) | \
        (PFERR_PRESENT_MASK if q & EPT_VIOLATION_PROT_MASK else 0)
    if q & EPT_VIOLATION_GVA_IS_VALID:
        ec |= _PFERR_GUEST_FINAL if q & EPT_VIOLATION_GVA_TRANSLATED else _PFERR_GUEST_PAGE
    return ec


class NestedEpt:
    """What ``guest_mmu`` keeps of L1's EPT: ``eptp`` (``vmcs12->ept_pointer``),
    L1's EPT capabilities (``execonly``, ``huge_level``, ``ad_supported``,
    ``five_level_supported``: the nested VMX capability MSR) and ``walker``,
    the :meth:`kvmmmu.paging.GuestMmu.ept` walker over L1's memory."""
    __slots__ = ("eptp", "execonly", "huge_level", "ad_supported", "five_level_supported",
                 "walker")

    def __repr__(self):
        return (f"NestedEpt(eptp={self.eptp:#x}, execonly={self.execonly}, "
                f"huge_level={self.huge_level})")


class NestedEptExit:
    """The VM exit to L1 that ``nested_ept_inject_page_fault`` makes of a
    fault in L1's EPT: ``reason`` (EXIT_REASON_EPT_VIOLATION or
    EXIT_REASON_EPT_MISCONFIG), ``exit_qualification`` (the walker's
    access/permission bits plus the exit's GVA bits; 0 for a
    misconfiguration), ``guest_physical_address`` (the L2 gpa) and
    ``fault`` (the walker's :class:`~kvmmmu.paging.PageFault`)."""
    __slots__ = ("reason", "exit_qualification", "guest_physical_address", "fault")

    def __init__(self, reason, exit_qualification, guest_physical_address, fault):
        self.reason, self.exit_qualification = reason, exit_qualification
        self.guest_physical_address, self.fault = guest_physical_address, fault

    def __repr__(self):
        kind = "EPT_VIOLATION" if self.reason == EXIT_REASON_EPT_VIOLATION else "EPT_MISCONFIG"
        return (f"NestedEptExit({kind}, qual={self.exit_qualification:#x}, "
                f"gpa={self.guest_physical_address:#x})")


def kvm_page_table_hashfn(gfn: int) -> int:
    """``kvm_page_table_hashfn`` = ``hash_64(gfn, KVM_MMU_HASH_SHIFT)``: the
    top 12 bits of ``gfn * GOLDEN_RATIO_64`` (mod 2**64)."""
    return ((gfn * GOLDEN_RATIO_64) & _U64) >> (64 - KVM_MMU_HASH_SHIFT)


class KvmMmuPage:
    """``struct kvm_mmu_page`` of one shadow page (the Python mirror; the
    module docstring says which fields also live in the arena header).

    ``sp`` is the arena handle, ``pfn``/``pa`` the table's host frame and
    address (``__pa(sp->spt)``), ``spt`` a uint64[512] view of the table,
    ``shadowed_translation`` the gfn<<12|access page of an indirect page
    at or below 1G (None otherwise)."""
    __slots__ = ("sp", "pfn", "pa", "spt", "shadowed_translation", "role", "word", "level",
                 "direct", "has_gptes", "gfn", "mmu_valid_gen", "root_count", "unsync",
                 "unsync_children", "unsync_child_bitmap", "_wfc", "_fast", "parent_ptes",
                 "nx_huge_page_disallowed", "invalid", "serial", "__weakref__")

    @property
    def write_flooding_count(self) -> int:
        """``sp->write_flooding_count``; written through to the arena header
        while the page is allocated (the C fault path reads it there)."""
        return self._wfc

    @write_flooding_count.setter
    def write_flooding_count(self, value: int) -> None:
        self._wfc = value
        if self._fast is not None:
            self._fast.set_write_flooding_count(self.sp, value)

    def __repr__(self):
        return (f"KvmMmuPage(sp={self.sp}, gfn={self.gfn:#x}, l{self.level}"
                f"{' direct' if self.direct else ''} q{self.role.quadrant} "
                f"access={self.role.access}{' invalid' if self.invalid else ''}"
                f"{' unsync' if self.unsync else ''}, root_count={self.root_count})")

    def trace_fields(self) -> dict:
        """``KVM_MMU_PAGE_ASSIGN``: the fields the kvmmmu page events record."""
        return dict(mmu_valid_gen=self.mmu_valid_gen, gfn=self.gfn, role=self.word,
                    root_count=self.root_count, unsync=bool(self.unsync))


class _CWalker:
    """A guest walk the batch path did in C, handed to the scalar
    :meth:`ShadowMmu.fname_page_fault` (the fields of
    :class:`kvmmmu.paging.GuestWalker` the fault path reads)."""
    __slots__ = ("fault", "gfn", "level", "max_level", "pte_access", "ptes", "pte_gpa",
                 "table_gfn", "pt_access", "pte_writable", "gva", "access")

    def __init__(self, fault, gfn, level, max_level, pte_access, ptes, pte_gpa, table_gfn,
                 pt_access, pte_writable, gva, access):
        self.fault, self.gfn, self.level, self.max_level = fault, gfn, level, max_level
        self.pte_access, self.ptes, self.pte_gpa, self.table_gfn = pte_access, ptes, pte_gpa, table_gfn
        self.pt_access, self.pte_writable, self.gva, self.access = pt_access, pte_writable, gva, access

    @property
    def ok(self) -> bool:
        return self.fault is None


class KvmMmuRootInfo:
    """``struct kvm_mmu_root_info``: ``pgd`` and ``hpa`` (a :class:`KvmMmuPage`
    for a shadow-page root, :data:`PAE_ROOT`, :data:`DUMMY_ROOT`, or None:
    INVALID_PAGE)."""
    __slots__ = ("pgd", "hpa")

    def __init__(self, pgd: int = 0, hpa=INVALID_PAGE):
        self.pgd, self.hpa = pgd, hpa

    @property
    def sp(self):
        """``root_to_sp(hpa)``: the shadow page, or None for special roots."""
        return self.hpa if isinstance(self.hpa, KvmMmuPage) else None

    @property
    def valid(self) -> bool:
        return self.hpa is not None

    def __repr__(self):
        h = self.hpa
        return f"KvmMmuRootInfo(pgd={self.pgd:#x}, {h.sp if isinstance(h, KvmMmuPage) else h})"


class KvmMmu:
    """``vcpu->arch.mmu`` (``root_mmu``) as the shadow MMU keeps it.

    ``cpu_role`` / ``root_role`` are computed from the vCPU's registers when
    the context is (re)initialised (``kvm_init_mmu``, after a reset);
    ``root``, ``prev_roots`` (MRU first) and ``pae_root`` (four entries:
    the level-2 :class:`KvmMmuPage` or None = INVALID_PAE_ROOT).  ``ept``:
    the context shadows L1's EPT for an L2 guest (``guest_mmu`` of
    ``kvm_init_shadow_ept_mmu``: 8-byte EPT gPTEs, no U/S, execute-only),
    and ``nested`` then holds its :class:`NestedEpt` (EPTP, L1's EPT
    capabilities, the EPT walker)."""
    __slots__ = ("cpu_role", "root_role", "direct", "root", "prev_roots", "pae_root", "key",
                 "cr0_wp", "cr4_smep", "rsvd", "ept", "nested")

    def __init__(self):
        self.cpu_role = self.root_role = None
        self.key = None
        self.direct = True
        self.root = KvmMmuRootInfo()
        self.prev_roots = [KvmMmuRootInfo() for _ in range(KVM_MMU_NUM_PREV_ROOTS)]
        self.pae_root = [None] * 4
        self.cr0_wp = self.cr4_smep = False
        self.rsvd = None
        self.ept = False
        self.nested = None


class ShadowMmu(MmuBackend):
    """The shadow MMU of one VM (``vm.mmu_backend`` of ``mmu="tdp"`` and
    ``mmu="shadow"`` VMs).  See the module docstring.

    Public API by stream event kind (what a runner calls; the VM and vCPU
    methods reach this class through :mod:`kvmmmu.mmu`):

    * VM entry: ``vcpu.vcpu_enter_guest()`` (requests, then
      :meth:`kvm_mmu_load` through ``kvm_mmu_reload``);
    * page fault: ``vcpu.kvm_mmu_page_fault(addr, error_code)`` (the
      common entry checks the arguments with :meth:`check_fault_args`,
      then calls :meth:`mmu_page_fault`); an injected guest #PF is left in
      ``vcpu.injected_page_fault`` (``pf_guest`` counts it);
    * translate: ``vm.mmu_backend.translate(vcpu, gva, access)`` (a walk
      that sets A/D bits; None when it faults);
    * write: ``vcpu.kvm_page_track_write(gpa, data)`` (track: the
      emulator's store -> :meth:`kvm_mmu_track_write`); untracked:
      ``vm.write_guest(gpa, data)`` (a guest store the MMU does not see);
    * invlpg: ``vcpu.kvm_mmu_invlpg(gva)`` -> :meth:`kvm_mmu_invlpg`;
    * CR/EFER loads: ``vcpu.kvm_set_cr0/3/4``, ``kvm_set_efer``,
      ``set_cpl`` -> :meth:`kvm_mmu_new_pgd`, :meth:`kvm_mmu_unload` (reset);
    * memslots / dirty log: ``vm.set_user_memory_region``,
      ``vm.get_dirty_log``, ``vm.clear_dirty_log`` -> the MmuBackend hooks;
    * marks: ``vm.stat`` / ``vcpu.stat`` (``as_dict()``);
    * nested EPT (``mmu="tdp"``): ``vcpu.nested_ept_enter(eptp)`` ->
      :meth:`nested_ept_init_mmu_context`, ``vcpu.nested_ept_new_eptp`` ->
      :meth:`nested_ept_new_eptp`, ``vcpu.nested_ept_leave`` ->
      :meth:`nested_vmx_vmexit`, ``vcpu.nested_invept`` ->
      :meth:`handle_invept`, ``vcpu.nested_invvpid`` -> :meth:`handle_invvpid`;
      L2's faults: ``vcpu.kvm_mmu_page_fault(l2_gpa,
      ept_violation_error_code(qual))`` (checked by
      :meth:`check_l2_fault_args`).
    """
    is_tdp = False
    direct = False
    #: Take the C fault path (:mod:`kvmmmu._core.shadow_fault`) where it
    #: applies; False runs the Python reference path only.  Both give the
    #: same events, statistics and state.
    c_fast_path = True
    _fast = None
    #: (gva, access, walker) of a fault the batch path walked in C and hands
    #: to the scalar entry (consumed by :meth:`fname_page_fault`)
    _prewalked = None

    def __init__(self, vm):
        if vm.tdp_mmu_enabled:
            raise ValueError("the shadow MMU takes the faults of mmu='tdp' and mmu='shadow' VMs, "
                             "not of a TDP-MMU VM")
        self.vm = vm
        self.tdp = bool(vm.tdp_enabled)
        if self.tdp:
            self.is_tdp = True
            self.direct = True
            hc = vm.host_config
            self.tdp_level = kvm_mmu_get_tdp_level(5 if getattr(hc, "la57", False) else 4,
                                                   hc.maxphyaddr)
        self.arena = vm.arena
        self.fmt = vm.fmt
        fmt = self.fmt
        self._mmu_writable = fmt.shadow_mmu_writable_mask
        self._host_writable = fmt.shadow_host_writable_mask
        self._nonpresent = fmt.SHADOW_NONPRESENT_VALUE
        self._accessed = fmt.shadow_accessed_mask
        self._dirty = fmt.shadow_dirty_mask
        self._trace_masks = dict(present_mask=fmt.shadow_present_mask, user_mask=fmt.shadow_user_mask,
                                 x_mask=fmt.shadow_x_mask, nx_mask=fmt.shadow_nx_mask)
        #: ``kvm->arch.mmu_page_hash``: bucket -> list of pages, newest first
        self.mmu_page_hash: dict[int, list[KvmMmuPage]] = {}
        #: ``kvm->arch.active_mmu_pages``: first item = the oldest (the kernel's tail)
        self.active_mmu_pages: dict[int, KvmMmuPage] = {}
        #: ``kvm->arch.possible_nx_huge_pages`` (shadow MMU type), oldest first
        self.possible_nx_huge_pages: dict[int, KvmMmuPage] = {}
        #: every page not yet freed, by arena handle and by table pfn
        self.pages: dict[int, KvmMmuPage] = {}
        self.by_pfn: dict[int, KvmMmuPage] = {}
        self.n_used_mmu_pages = 0
        self.indirect_shadow_pages = 0
        #: per vCPU index: its current KvmMmu (``vcpu->arch.mmu``: root_mmu,
        #: or guest_mmu while the vCPU runs L2 under L1's EPT)
        self.vcpu_mmu: dict[int, KvmMmu] = {}
        #: per vCPU index: ``vcpu->arch.root_mmu`` and ``vcpu->arch.guest_mmu``
        #: (the latter made at the first nested EPT entry); both keep their roots
        self.vcpu_root_mmu: dict[int, KvmMmu] = {}
        self.vcpu_guest_mmu: dict[int, KvmMmu] = {}
        self.nx_huge_pages_recovery_ratio = getattr(vm.params, "nx_huge_pages_recovery_ratio", 60)
        #: creation order of the pages (the audit checks the active list's FIFO order)
        self._serial = 0
        #: set by kvm_mmu_prepare_zap_page: it zapped children (the kernel's list_unstable)
        self._unstable = False

    @property
    def roots(self) -> list[KvmMmuPage]:
        """The pages some vCPU uses as a root (``root_count > 0``)."""
        return [sp for sp in self.pages.values() if sp.root_count]

    @property
    def vcpu_root(self) -> dict[int, KvmMmuRootInfo]:
        """vCPU index -> its current root, for the vCPUs that have one."""
        return {i: m.root for i, m in self.vcpu_mmu.items() if m.root.hpa is not None}

    # ================================================================ helpers
    def _ctx(self, vcpu) -> KvmMmu:
        m = self.vcpu_mmu.get(vcpu.index)
        if m is None:
            m = self.vcpu_mmu[vcpu.index] = self.vcpu_root_mmu[vcpu.index] = KvmMmu()
        if m.key is None:
            self._init_mmu(vcpu, m)
        return m

    def _vcpu_mmus(self, index: int) -> list[KvmMmu]:
        """``root_mmu`` and ``guest_mmu`` of vCPU `index` (those that exist)."""
        return [m for m in (self.vcpu_root_mmu.get(index), self.vcpu_guest_mmu.get(index))
                if m is not None]

    def _init_mmu(self, vcpu, m: KvmMmu) -> None:
        """``kvm_init_mmu``: the roles of the vCPU's current registers
        (``kvm_init_shadow_ept_mmu`` for the nested EPT context)."""
        cpu = vcpu.cpu
        if m.ept:
            self._init_shadow_ept_roles(m)
            return
        if self.tdp:
            m.cpu_role = KvmCpuRole(base=KvmMmuPageRole(smm=int(vcpu.smm)))
            m.root_role = kvm_calc_tdp_mmu_root_page_role(m.cpu_role, self.tdp_level,
                                                          self.vm.kvm_ad_enabled)
        else:
            m.cpu_role = kvm_calc_cpu_role(cpu.cr0, cpu.cr4, cpu.efer, smm=int(vcpu.smm))
            m.root_role = kvm_calc_shadow_mmu_root_page_role(m.cpu_role)
        m.direct = bool(m.root_role.direct)
        m.cr0_wp = bool(m.cpu_role.base.cr0_wp)
        m.cr4_smep = bool(m.cpu_role.ext.cr4_smep)
        m.key = (cpu.cr0, cpu.cr4, cpu.efer, vcpu.smm)

    def _publish(self, vcpu, m: KvmMmu) -> None:
        if self.vcpu_mmu.get(vcpu.index) is not m:      # not vcpu->arch.mmu: nothing to show
            return
        vcpu.mmu_root = m.root if m.root.hpa is not None else None

    def _wlock(self):
        """``mmu_lock`` for write, unless this thread already holds it
        (hooks the VM calls with it held)."""
        lock = self.vm.mmu_lock
        try:
            lock.lockdep_assert_held_write()
        except Exception:
            return lock.write()
        return _NoLock

    def is_obsolete_sp(self, sp: KvmMmuPage) -> bool:
        """``is_obsolete_sp``: invalid, or of the other ``mmu_valid_gen``."""
        return sp.invalid or sp.mmu_valid_gen != self.vm.mmu_valid_gen

    def _slot(self, gfn: int, smm: int = 0):
        return self.vm.memslots[smm].gfn_to_memslot(gfn) if smm < len(self.vm.memslots) else None

    def _sptep_sp(self, sptep: int) -> KvmMmuPage:
        return self.by_pfn[sptep >> 12]

    def _child(self, spte: int) -> KvmMmuPage:
        return self.by_pfn[(spte & _ADDR) >> 12]

    def _c_root_stale(self, vcpu, m: KvmMmu) -> bool:
        """The root half of :meth:`_is_page_fault_stale` (the batch checks it
        before C runs; the notifier half cannot move while C holds the GIL)."""
        h = m.root.hpa
        if isinstance(h, KvmMmuPage):
            return h.invalid or h.mmu_valid_gen != self.vm.mmu_valid_gen
        return h is None or "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in vcpu.requests

    def _fastcore(self) -> ShadowFastCore:
        """The C fault path over this MMU's arena (made on first use)."""
        core = self._fast
        if core is None:
            core = self._fast = ShadowFastCore(self.arena)
        return core

    def _set_header(self, sp: KvmMmuPage, **fields) -> None:
        self.arena.set_sp(sp.sp, **fields)

    @staticmethod
    def kvm_mmu_page_get_gfn(sp: KvmMmuPage, index: int) -> int:
        """``kvm_mmu_page_get_gfn``: the gfn entry `index` of `sp` maps."""
        if sp.role.passthrough:
            return sp.gfn
        st = sp.shadowed_translation
        if st is not None:
            return st.item(index) >> PAGE_SHIFT
        return sp.gfn + (index << ((sp.level - 1) * 9))

    @staticmethod
    def kvm_mmu_page_get_access(sp: KvmMmuPage, index: int) -> int:
        st = sp.shadowed_translation
        if st is not None:
            return st.item(index) & ACC_ALL
        return sp.role.access

    def kvm_mmu_page_set_translation(self, sp: KvmMmuPage, index: int, gfn: int, access: int) -> None:
        if sp.has_gptes:
            sp.shadowed_translation[index] = (gfn << PAGE_SHIFT) | access
            return
        if access != sp.role.access or gfn != self.kvm_mmu_page_get_gfn(sp, index):
            self.vm.warn_sink.warn("kvm_mmu_page_set_translation",
                                   f"direct sp {sp.sp} entry {index}: gfn/access mismatch", once=True)

    def kvm_mmu_page_set_access(self, sp: KvmMmuPage, index: int, access: int) -> None:
        self.kvm_mmu_page_set_translation(sp, index, self.kvm_mmu_page_get_gfn(sp, index), access)

    # ================================================================ pages
    def _bucket(self, gfn: int) -> list:
        b = kvm_page_table_hashfn(gfn)
        lst = self.mmu_page_hash.get(b)
        if lst is None:
            lst = self.mmu_page_hash[b] = []
        return lst

    def for_each_gfn_valid_sp_with_gptes(self, gfn: int) -> list[KvmMmuPage]:
        """The valid (not obsolete) pages with guest PTEs shadowing `gfn`,
        in bucket order (a snapshot: callers may zap while iterating)."""
        lst = self.mmu_page_hash.get(kvm_page_table_hashfn(gfn))
        if not lst:
            return []
        gen = self.vm.mmu_valid_gen
        return [sp for sp in lst if sp.gfn == gfn and sp.has_gptes and not sp.invalid
                and sp.mmu_valid_gen == gen]

    def kvm_mmu_find_shadow_page(self, vcpu, gfn: int, bucket: list, role: KvmMmuPageRole):
        """``kvm_mmu_find_shadow_page`` (shadow-mmu.md §4.2)."""
        vm = self.vm
        word = role.word
        collisions = 0
        invalid_list: list = []
        found = None
        gen = vm.mmu_valid_gen
        for sp in list(bucket):
            if sp.invalid or sp.mmu_valid_gen != gen:
                continue
            if sp.gfn != gfn:
                collisions += 1
                continue
            if sp.word != word:
                if role.level > PG_LEVEL_4K and sp.unsync:
                    self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                continue
            if sp.direct:
                found = sp
                break
            if sp.unsync:
                if vcpu is None:
                    vm.kvm_bug("kvm_mmu_find_shadow_page: unsync sp without a vCPU")
                    break
                ret = self.kvm_sync_page(vcpu, sp, invalid_list)
                if ret < 0:
                    break
                if ret > 0:
                    vm.kvm_flush_remote_tlbs()
            sp.write_flooding_count = 0
            found = sp
            break
        if found is None:
            vm.stat.mmu_cache_miss += 1
        self.kvm_mmu_commit_zap_page(invalid_list)
        if collisions > vm.stat.max_mmu_page_hash_collisions:
            vm.stat.max_mmu_page_hash_collisions = collisions
        return found

    def kvm_mmu_alloc_shadow_page(self, vcpu, gfn: int, bucket: list,
                                  role: KvmMmuPageRole) -> KvmMmuPage:
        """``kvm_mmu_alloc_shadow_page``: header, table (all
        SHADOW_NONPRESENT_VALUE) and, for indirect pages up to 1G, the
        shadowed_translation page, from the vCPU's caches; on the active
        list's head and the hash bucket's head; ``account_shadowed``."""
        vm = self.vm
        a = self.arena
        indirect = not role.direct and role.level <= KVM_MAX_HUGEPAGE_LEVEL
        h = a.alloc_sp(vcpu.mmu_shadow_page_cache, vcpu.mmu_page_header_cache,
                       vcpu.mmu_shadowed_info_cache if indirect else None,
                       role=role.word, gfn=gfn)
        sp = KvmMmuPage()
        sp.sp = h
        sp._fast = self._fastcore()
        sp.pa = a.sp_pa(h)
        sp.pfn = sp.pa >> 12
        sp.spt = a.spt(h)
        sp.shadowed_translation = a.shadowed_translation(h) if indirect else None
        sp.role, sp.word, sp.level = role, role.word, role.level
        sp.direct = bool(role.direct)
        sp.has_gptes = not role.direct and not role.passthrough
        sp.gfn = gfn
        sp.mmu_valid_gen = vm.mmu_valid_gen
        if sp.mmu_valid_gen:
            a.set_sp(h, mmu_valid_gen=sp.mmu_valid_gen)
        sp.root_count = 0
        sp.unsync = False
        sp.unsync_children = 0
        sp.unsync_child_bitmap = 0
        sp.write_flooding_count = 0
        sp.parent_ptes = ParentPtes(vm.rmap_pool)
        sp.nx_huge_page_disallowed = False
        sp.invalid = False
        self._serial += 1
        sp.serial = self._serial
        self.pages[h] = sp
        self.by_pfn[sp.pfn] = sp
        self.active_mmu_pages[h] = sp
        self.n_used_mmu_pages += 1
        bucket.insert(0, sp)
        if sp.has_gptes:
            self.account_shadowed(sp)
        return sp

    def kvm_mmu_get_shadow_page(self, vcpu, gfn: int, role: KvmMmuPageRole) -> KvmMmuPage:
        """``kvm_mmu_get_shadow_page`` / ``__kvm_mmu_get_shadow_page``: find
        (gfn, role) in the hash or create it; traces ``kvm_mmu_get_page``
        (new / existing) before the caller takes a root reference."""
        bucket = self._bucket(gfn)
        sp = self.kvm_mmu_find_shadow_page(vcpu, gfn, bucket, role)
        created = sp is None
        if created:
            sp = self.kvm_mmu_alloc_shadow_page(vcpu, gfn, bucket, role)
        if _tp.kvm_mmu_get_page.enabled:
            _tp.kvm_mmu_get_page.emit(created=created, **sp.trace_fields())
        return sp

    def kvm_mmu_get_child_sp(self, vcpu, sptep: int, gfn: int, direct: bool, access: int):
        """``kvm_mmu_get_child_sp``: None (the kernel's -EEXIST) when the
        SPTE already links a table; else the child page of the role
        ``kvm_mmu_child_role`` gives."""
        parent = self._sptep_sp(sptep)
        spte = parent.spt.item((sptep >> 3) & 511)
        if spte & _PRESENT and not spte & _LARGE:
            return None
        role = kvm_mmu_child_role(parent.role, (sptep >> 3) & 511, direct, access)
        return self.kvm_mmu_get_shadow_page(vcpu, gfn, role)

    def link_shadow_page(self, vcpu, sptep: int, sp: KvmMmuPage, flush: bool = True) -> None:
        """``__link_shadow_page``: drop a huge leaf in the way (flushing),
        install the non-leaf SPTE, add it to the child's ``parent_ptes`` and
        propagate unsync marks."""
        parent = self._sptep_sp(sptep)
        old = parent.spt.item((sptep >> 3) & 511)
        if old & _PRESENT:
            if parent.level == PG_LEVEL_4K:
                self.vm.warn_sink.warn("drop_large_spte", "a 4K SPTE in the way of a table", once=True)
            self.drop_spte(sptep)
            if flush:
                self.vm.kvm_flush_remote_tlbs()
        self.arena.mmu_spte_set(sptep, self.fmt.make_nonleaf_spte(sp.pa, bool(sp.role.ad_disabled)))
        sp.parent_ptes.add(vcpu.mmu_pte_list_desc_cache, sptep)
        if sp.unsync_children:
            self.vm.warn_sink.warn("__link_shadow_page", "linking a page with unsync children",
                                   once=True)
        if sp.unsync_children or sp.unsync:
            self.mark_unsync(sptep)

    # ------------------------------------------------------------ shadowing
    def account_shadowed(self, sp: KvmMmuPage) -> None:
        """``account_shadowed``: count the page; above 4K write-track its gfn
        (page_track), at 4K disallow huge pages over it and write-protect its
        4K SPTEs."""
        vm = self.vm
        self.indirect_shadow_pages += 1
        slot = self._slot(sp.gfn, sp.role.smm)
        if slot is None:
            vm.warn_sink.warn("account_shadowed", f"shadowed gfn {sp.gfn:#x} has no memslot",
                              once=True)
            return
        if sp.level > PG_LEVEL_4K:
            _pt.kvm_write_track_add_gfn_locked(
                vm, slot, sp.gfn, lambda s, g: self.kvm_mmu_slot_gfn_write_protect(s, g, PG_LEVEL_4K))
            return
        vm.kvm_mmu_gfn_disallow_lpage(slot, sp.gfn)
        if self.kvm_mmu_slot_gfn_write_protect(slot, sp.gfn, PG_LEVEL_4K):
            vm.kvm_flush_remote_tlbs()

    def unaccount_shadowed(self, sp: KvmMmuPage) -> None:
        vm = self.vm
        self.indirect_shadow_pages -= 1
        slot = self._slot(sp.gfn, sp.role.smm)
        if slot is None:
            return
        if sp.level > PG_LEVEL_4K:
            _pt.kvm_write_track_remove_gfn_locked(vm, slot, sp.gfn)
            return
        vm.kvm_mmu_gfn_allow_lpage(slot, sp.gfn)

    def spte_write_protect(self, sptep: int, pt_protect: bool) -> bool:
        """``spte_write_protect``: clear W (and MMU-writable with
        `pt_protect`); whether a flush is needed."""
        sp = self._sptep_sp(sptep)
        spte = sp.spt.item((sptep >> 3) & 511)
        mw = self._mmu_writable
        if not spte & _W and not (pt_protect and spte & mw):
            return False
        if pt_protect:
            spte &= ~mw
        return bool(self.arena.mmu_spte_update(sptep, spte & ~_W))

    def rmap_write_protect(self, head, pt_protect: bool) -> bool:
        flush = False
        for sptep in head:
            flush |= self.spte_write_protect(sptep, pt_protect)
        return flush

    def kvm_mmu_slot_gfn_write_protect(self, slot, gfn: int, min_level: int) -> bool:
        """``kvm_mmu_slot_gfn_write_protect``: write-protect (pt_protect) every
        SPTE mapping `gfn`, from `min_level` up to 1G."""
        rs = slot.arch.rmap
        if rs is None:
            return False
        wp = False
        for level in range(min_level, KVM_MAX_HUGEPAGE_LEVEL + 1):
            wp |= self.rmap_write_protect(gfn_to_rmap(gfn, level, rs), True)
        return wp

    # ------------------------------------------------------------ unsync
    def mark_unsync(self, sptep: int) -> None:
        """``mark_unsync``: set the bit of `sptep` in its page's
        ``unsync_child_bitmap``; the first child marks the parents."""
        while True:
            sp = self._sptep_sp(sptep)
            bit = 1 << ((sptep >> 3) & 511)
            if sp.unsync_child_bitmap & bit:
                return
            sp.unsync_child_bitmap |= bit
            sp.unsync_children += 1
            if sp.unsync_children > 1:
                return
            parents = list(sp.parent_ptes)
            if len(parents) == 1:
                sptep = parents[0]
                continue
            for p in parents:
                self.mark_unsync(p)
            return

    def kvm_mmu_mark_parents_unsync(self, sp: KvmMmuPage) -> None:
        for p in list(sp.parent_ptes):
            self.mark_unsync(p)

    def kvm_unsync_page(self, sp: KvmMmuPage) -> None:
        """``kvm_unsync_page``: trace, ``mmu_unsync++``, mark the parents."""
        if _tp.kvm_mmu_unsync_page.enabled:
            _tp.kvm_mmu_unsync_page.emit(**sp.trace_fields())
        self.vm.stat.mmu_unsync += 1
        sp.unsync = True
        self._set_header(sp, unsync=True)
        self.kvm_mmu_mark_parents_unsync(sp)

    def kvm_unlink_unsync_page(self, sp: KvmMmuPage) -> None:
        """``kvm_unlink_unsync_page``: the ``kvm_mmu_sync_page`` event,
        ``unsync`` cleared, ``mmu_unsync--``."""
        if not sp.unsync:
            self.vm.warn_sink.warn("kvm_unlink_unsync_page", "page is not unsync", once=True)
        if _tp.kvm_mmu_sync_page.enabled:
            _tp.kvm_mmu_sync_page.emit(**sp.trace_fields())
        sp.unsync = False
        self._set_header(sp, unsync=False)
        self.vm.stat.mmu_unsync -= 1

    def mmu_try_to_unsync_pages(self, slot, gfn: int, synchronizing: bool, prefetch: bool) -> int:
        """``mmu_try_to_unsync_pages``: 0 if `gfn` may be mapped writable
        (every page shadowing it is, or becomes, unsync); -EPERM if it is
        write-tracked or when `synchronizing`; -EEXIST on a prefetch that
        would need a page unsync'd."""
        vm = self.vm
        if _pt.kvm_gfn_is_write_tracked(vm, slot, gfn):
            return -E.EPERM
        if not self.indirect_shadow_pages:      # no page with guest PTEs exists at all
            return 0
        for sp in self.for_each_gfn_valid_sp_with_gptes(gfn):
            if synchronizing:
                return -E.EPERM
            if sp.unsync:
                continue
            if prefetch:
                return -E.EEXIST
            if sp.level != PG_LEVEL_4K:
                vm.warn_sink.warn("mmu_try_to_unsync_pages", "unsync of a page above 4K", once=True)
            self.kvm_unsync_page(sp)
        return 0

    # ------------------------------------------------------------ SPTE changes
    def rmap_add(self, vcpu, slot, sptep: int, gfn: int, access: int) -> None:
        """``rmap_add``/``__rmap_add``: record gfn+access, ``pages_*``+1, add
        to the gfn's rmap at the page's level; recycle a list above
        RMAP_RECYCLE_THRESHOLD (zap it, flush)."""
        sp = self._sptep_sp(sptep)
        self.kvm_mmu_page_set_translation(sp, (sptep >> 3) & 511, gfn, access)
        self.arena.kvm_update_page_stats(sp.level, 1)
        clear = self.arena.mmu_spte_clear_track_bits
        n = _rmap_add(vcpu.mmu_pte_list_desc_cache, slot.arch.rmap, gfn, sptep, sp.level, clear)
        if n > RMAP_RECYCLE_THRESHOLD:
            self.vm.kvm_flush_remote_tlbs()

    def rmap_remove(self, sptep: int) -> None:
        """``rmap_remove``: the gfn from the page's translation, its memslot,
        pte_list_remove."""
        sp = self._sptep_sp(sptep)
        gfn = self.kvm_mmu_page_get_gfn(sp, (sptep >> 3) & 511)
        slot = self._slot(gfn, sp.role.smm)
        if slot is None or slot.arch.rmap is None:
            self.vm.kvm_bug(f"rmap_remove: gfn {gfn:#x} has no memslot", "rmap_remove")
            return
        _rmap_remove(slot.arch.rmap, gfn, sptep, sp.level)

    def drop_spte(self, sptep: int) -> None:
        """``drop_spte``: clear a leaf (``pages_*``-1 if present) and take it
        out of its rmap."""
        old = self.arena.mmu_spte_clear_track_bits(sptep)
        if old & _PRESENT:
            self.rmap_remove(sptep)

    def drop_parent_pte(self, sp: KvmMmuPage, sptep: int) -> None:
        sp.parent_ptes.remove(sptep)
        self.arena.mmu_spte_clear_no_track(sptep)

    def _trace_set_spte(self, level, gfn, sptep, spte):
        _tp.kvm_mmu_set_spte.emit(**_tp.kvm_mmu_set_spte_fields(level, gfn, spte, sptep,
                                                                 **self._trace_masks))

    def mark_mmio_spte(self, vcpu, sptep: int, gfn: int, access: int) -> None:
        spte = self.fmt.make_mmio_spte(gfn, access & self.vm.shadow_mmio_access_mask,
                                       vcpu.mmio_spte_generation())
        if _tp.mark_mmio_spte.enabled:
            _tp.mark_mmio_spte.emit(sptep=sptep, gfn=gfn,
                                    access=spte & self.vm.shadow_mmio_access_mask,
                                    gen=vcpu.mmio_spte_generation())
        self.arena.mmu_spte_set(sptep, spte)

    def make_spte(self, vcpu, sp: KvmMmuPage, slot, pte_access: int, gfn: int, pfn: int,
                  old_spte: int, prefetch: bool, synchronizing: bool,
                  host_writable: bool) -> tuple[int, bool]:
        """``make_spte`` with the unsync question answered here
        (``mmu_try_to_unsync_pages``) and the dirty-log mark of a writable
        SPTE in a dirty-logged slot."""
        fmt = self.fmt
        level = sp.level
        refused = False
        if pte_access & ACC_WRITE_MASK and fmt.make_spte_wants_unsync(
                level=level, pte_access=pte_access, old_spte=old_spte, host_writable=host_writable):
            refused = self.mmu_try_to_unsync_pages(slot, gfn, synchronizing, prefetch) != 0
        spte, wrprot = fmt.make_spte(level=level, pte_access=pte_access, pfn=pfn, old_spte=old_spte,
                                     prefetch=prefetch, synchronizing=synchronizing,
                                     host_writable=host_writable,
                                     ad_disabled=bool(sp.role.ad_disabled),
                                     nx_huge_pages=self.vm.is_nx_huge_page_enabled,
                                     unsync_refused=refused)
        if spte & _W and slot is not None and slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            if level > PG_LEVEL_4K:
                self.vm.warn_sink.warn("make_spte", "writable huge SPTE in a dirty-logged slot",
                                       once=True)
            _mmu.mark_gfn_dirty(self.vm, slot, gfn)
        return spte, wrprot

    def mmu_set_spte(self, vcpu, slot, sptep: int, pte_access: int, gfn: int, pfn: int,
                     fault: KvmPageFault | None) -> int:
        """``mmu_set_spte`` (shadow-mmu.md §3.3): RET_PF_FIXED, SPURIOUS,
        EMULATE (an MMIO SPTE) or WRITE_PROTECTED."""
        vm = self.vm
        a = self.arena
        sp = self._sptep_sp(sptep)
        idx = (sptep >> 3) & 511
        level = sp.level
        was_rmapped = False
        ret = RET_PF_FIXED
        flush = False
        host_writable = fault is None or fault.map_writable
        prefetch = fault is None or fault.prefetch
        write_fault = fault is not None and fault.write
        old = sp.spt.item(idx)
        if old & _PRESENT:
            if prefetch and (level == 1 or old & _LARGE) and pfn == ((old & _ADDR) >> 12):
                return RET_PF_SPURIOUS
            if level > PG_LEVEL_4K and not old & _LARGE:
                self.drop_parent_pte(self._child(old), sptep)
                flush = True
            elif pfn != (old & _ADDR) >> 12:
                if sp.direct:
                    vm.warn_sink.warn("mmu_set_spte", "direct SPTE changes its pfn", once=True)
                self.drop_spte(sptep)
                flush = True
            else:
                was_rmapped = True
        if pfn == KVM_PFN_NOSLOT:
            vcpu.stat.pf[_mmu._PF_MMIO_SPTE_CREATED] += 1
            self.mark_mmio_spte(vcpu, sptep, gfn, pte_access)
            if flush:
                vm.kvm_flush_remote_tlbs()
            return RET_PF_EMULATE
        cur = sp.spt.item(idx)
        spte, wrprot = self.make_spte(vcpu, sp, slot, pte_access, gfn, pfn, cur, prefetch, False,
                                      host_writable)
        if cur == spte:
            ret = RET_PF_SPURIOUS
        else:
            flush |= bool(a.mmu_spte_update(sptep, spte))
            if _tp.kvm_mmu_set_spte.enabled:
                self._trace_set_spte(level, gfn, sptep, sp.spt.item(idx))
        if wrprot and write_fault:
            ret = RET_PF_WRITE_PROTECTED
        if flush:
            vm.kvm_flush_remote_tlbs()
        if not was_rmapped:
            if ret == RET_PF_SPURIOUS:
                vm.warn_sink.warn("mmu_set_spte", "spurious fault on an unmapped SPTE", once=True)
            self.rmap_add(vcpu, slot, sptep, gfn, pte_access)
        else:
            self.kvm_mmu_page_set_access(sp, idx, pte_access)
        return ret

    # ------------------------------------------------------------ zapping
    def mmu_page_zap_pte(self, sp: KvmMmuPage, sptep: int, invalid_list) -> int:
        """``mmu_page_zap_pte``: drop a leaf, unlink a child (a parentless
        nested child is zapped with TDP on), clear an MMIO SPTE.  Returns
        the pages zapped."""
        pte = sp.spt.item((sptep >> 3) & 511)
        if pte & _PRESENT:
            if sp.level == 1 or pte & _LARGE:
                self.drop_spte(sptep)
            else:
                child = self._child(pte)
                self.drop_parent_pte(child, sptep)
                if self.tdp and invalid_list is not None and child.role.guest_mode and \
                        not len(child.parent_ptes):
                    return self.kvm_mmu_prepare_zap_page(child, invalid_list)
        elif self.fmt.is_mmio_spte(pte):
            self.arena.mmu_spte_clear_no_track(sptep)
        return 0

    def kvm_mmu_page_unlink_children(self, sp: KvmMmuPage, invalid_list) -> int:
        zapped = 0
        spt = sp.spt
        nonpresent = self._nonpresent
        base = sp.pa
        for i in range(512):
            v = spt.item(i)
            if v != nonpresent and v:
                zapped += self.mmu_page_zap_pte(sp, base | (i << 3), invalid_list)
        return zapped

    def kvm_mmu_unlink_parents(self, sp: KvmMmuPage) -> None:
        while len(sp.parent_ptes):
            self.drop_parent_pte(sp, sp.parent_ptes.first())

    def mmu_zap_unsync_children(self, parent: KvmMmuPage, invalid_list) -> int:
        if parent.level == PG_LEVEL_4K:
            return 0
        zapped = 0
        while True:
            pages = self.mmu_unsync_walk(parent)
            if not pages:
                break
            for sp, parents in self._for_each_sp(pages):
                self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                self.mmu_pages_clear_parents(parents)
                zapped += 1
        return zapped

    def kvm_mmu_prepare_zap_page(self, sp: KvmMmuPage, invalid_list) -> int:
        """``__kvm_mmu_prepare_zap_page`` (shadow-mmu.md §11.1): returns the
        number of pages zapped (the kernel's ``nr_zapped``); a non-zero count
        of zapped children means the active list changed."""
        vm = self.vm
        if _tp.kvm_mmu_prepare_zap_page.enabled:
            _tp.kvm_mmu_prepare_zap_page.emit(**sp.trace_fields())
        vm.stat.mmu_shadow_zapped += 1
        nr = self.mmu_zap_unsync_children(sp, invalid_list)
        nr += self.kvm_mmu_page_unlink_children(sp, invalid_list)
        self.kvm_mmu_unlink_parents(sp)
        self._unstable = nr > 0
        if not sp.invalid and sp.has_gptes:
            self.unaccount_shadowed(sp)
        if sp.unsync:
            self.kvm_unlink_unsync_page(sp)
        zapped_root = False
        if not sp.root_count:
            nr += 1
            self.active_mmu_pages.pop(sp.sp, None)
            invalid_list.append(sp)
            self.n_used_mmu_pages -= 1
        else:
            self.active_mmu_pages.pop(sp.sp, None)
            zapped_root = not self.is_obsolete_sp(sp)
        if sp.nx_huge_page_disallowed:
            self.unaccount_nx_huge_page(sp)
        if not sp.invalid:
            sp.invalid = True
            sp.role = sp.role.replace(invalid=1)
            sp.word = sp.role.word
            self._set_header(sp, role=sp.word)
        if zapped_root:
            vm.kvm_make_all_cpus_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")
        return nr

    def kvm_mmu_commit_zap_page(self, invalid_list: list) -> None:
        """``kvm_mmu_commit_zap_page``: flush remote TLBs (waiting out
        lockless walkers), then free every zapped page."""
        if not invalid_list:
            return
        for sp in invalid_list:
            if not sp.invalid or sp.root_count:
                self.vm.warn_sink.warn("kvm_mmu_commit_zap_page", "freeing a live page", once=True)
            self._unhash(sp)
        self.arena.kvm_mmu_commit_zap_page([sp.sp for sp in invalid_list])
        invalid_list.clear()

    def _unhash(self, sp: KvmMmuPage) -> None:
        b = self.mmu_page_hash.get(kvm_page_table_hashfn(sp.gfn))
        if b is not None:
            b.remove(sp)
            if not b:
                del self.mmu_page_hash[kvm_page_table_hashfn(sp.gfn)]
        self.pages.pop(sp.sp, None)
        self.by_pfn.pop(sp.pfn, None)
        self.active_mmu_pages.pop(sp.sp, None)
        sp._fast = None                 # the header is freed: the mirror stops writing it

    def kvm_mmu_remote_flush_or_zap(self, invalid_list: list, remote_flush: bool) -> bool:
        if not remote_flush and not invalid_list:
            return False
        if invalid_list:
            self.kvm_mmu_commit_zap_page(invalid_list)
        else:
            self.vm.kvm_flush_remote_tlbs()
        return True

    def kvm_mmu_zap_oldest_mmu_pages(self, nr_to_zap: int) -> int:
        """``kvm_mmu_zap_oldest_mmu_pages``: zap from the oldest, skipping
        roots, until `nr_to_zap` pages went; ``mmu_recycled`` += that."""
        total = 0
        invalid_list: list = []
        if not self.active_mmu_pages:
            return 0
        restart = True
        while restart:
            restart = False
            for sp in list(self.active_mmu_pages.values()):
                if sp.sp not in self.active_mmu_pages or sp.root_count:
                    continue
                nr = self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                total += nr
                if total >= nr_to_zap:
                    break
                if self._unstable:
                    restart = True
                    break
        self.kvm_mmu_commit_zap_page(invalid_list)
        self.vm.stat.mmu_recycled += total
        return total

    def kvm_mmu_available_pages(self) -> int:
        mx = self.vm.n_max_mmu_pages
        return mx - self.n_used_mmu_pages if mx > self.n_used_mmu_pages else 0

    def make_mmu_pages_available(self) -> int:
        """``make_mmu_pages_available``: fewer than 5 pages left -> zap the
        oldest (up to 25 - available); none left then -> -ENOSPC."""
        avail = self.kvm_mmu_available_pages()
        if avail >= KVM_MIN_FREE_MMU_PAGES:
            return 0
        self.kvm_mmu_zap_oldest_mmu_pages(KVM_REFILL_PAGES - avail)
        if not self.kvm_mmu_available_pages():
            return -E.ENOSPC
        return 0

    def kvm_zap_obsolete_pages(self) -> None:
        """``kvm_zap_obsolete_pages``: zap from the oldest while pages are
        obsolete (FIFO: the first valid one ends it), then commit."""
        invalid_list: list = []
        restart = True
        while restart:
            restart = False
            for sp in list(self.active_mmu_pages.values()):
                if sp.sp not in self.active_mmu_pages:
                    continue
                if not self.is_obsolete_sp(sp):
                    break
                if sp.invalid:
                    self.vm.warn_sink.warn("kvm_zap_obsolete_pages", "invalid page on the active list",
                                           once=True)
                    continue
                self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                if self._unstable:
                    restart = True
                    break
        self.kvm_mmu_commit_zap_page(invalid_list)

    # ------------------------------------------------------------ unsync walks
    def mmu_unsync_walk(self, sp: KvmMmuPage) -> list:
        """``mmu_unsync_walk``: up to KVM_PAGE_ARRAY_NR (page, index)
        entries, the start page first (index INVALID_INDEX)."""
        if not sp.unsync_children:
            return []
        pvec = [(sp, INVALID_INDEX)]
        self._mmu_unsync_walk(sp, pvec)
        return pvec

    def _pages_add(self, pvec, sp, idx) -> bool:
        if sp.unsync:
            for s, _ in pvec:
                if s is sp:
                    return False
        pvec.append((sp, idx))
        return len(pvec) == KVM_PAGE_ARRAY_NR

    def _clear_unsync_child_bit(self, sp, idx):
        sp.unsync_children -= 1
        if sp.unsync_children < 0:
            self.vm.warn_sink.warn("clear_unsync_child_bit", "unsync_children underflow", once=True)
        sp.unsync_child_bitmap &= ~(1 << idx)

    def _mmu_unsync_walk(self, sp, pvec) -> int:
        nr = 0
        bm = sp.unsync_child_bitmap
        while bm:
            low = bm & -bm
            i = low.bit_length() - 1
            bm ^= low
            ent = sp.spt.item(i)
            if not ent & _PRESENT or ent & _LARGE:
                self._clear_unsync_child_bit(sp, i)
                continue
            child = self._child(ent)
            if child.unsync_children:
                if self._pages_add(pvec, child, i):
                    return -E.ENOSPC
                ret = self._mmu_unsync_walk(child, pvec)
                if not ret:
                    self._clear_unsync_child_bit(sp, i)
                    continue
                if ret > 0:
                    nr += ret
                else:
                    return ret
            elif child.unsync:
                nr += 1
                if self._pages_add(pvec, child, i):
                    return -E.ENOSPC
            else:
                self._clear_unsync_child_bit(sp, i)
        return nr

    def _for_each_sp(self, pvec):
        """``for_each_sp``: the level-1 pages of `pvec` with their parent
        path (``struct mmu_page_path``), computed as the walk goes."""
        if not pvec:
            return
        parent = [None] * 5
        idxs = [INVALID_INDEX] * 5
        sp0 = pvec[0][0]
        lv = sp0.level
        parent[lv - 2] = sp0
        parent[lv - 1] = None
        n = 1
        while True:
            while n < len(pvec):
                sp, idx = pvec[n]
                lv = sp.level
                idxs[lv - 1] = idx
                if lv == PG_LEVEL_4K:
                    break
                parent[lv - 2] = sp
                n += 1
            if n >= len(pvec):
                return
            yield pvec[n][0], (parent, idxs)
            n += 1

    def mmu_pages_clear_parents(self, path) -> None:
        parent, idxs = path
        level = 0
        while True:
            sp = parent[level]
            if sp is None:
                return
            self._clear_unsync_child_bit(sp, idxs[level])
            level += 1
            if sp.unsync_children:
                return

    def mmu_sync_children(self, vcpu, parent: KvmMmuPage, can_yield: bool) -> int:
        """``mmu_sync_children``: write-protect the gfns of the unsync pages
        below `parent` (flushing if that changed anything), sync each
        (zapping those that fail), in batches of 16.  Never has to yield in
        the model: returns 0."""
        invalid_list: list = []
        flush = False
        while True:
            pages = self.mmu_unsync_walk(parent)
            if not pages:
                break
            items = list(self._for_each_sp(pages))
            protected = False
            for sp, _ in items:
                slot = self._slot(sp.gfn, sp.role.smm)
                if slot is not None:
                    protected |= self.kvm_mmu_slot_gfn_write_protect(slot, sp.gfn, PG_LEVEL_4K)
            if protected:
                self.kvm_mmu_remote_flush_or_zap(invalid_list, True)
                flush = False
            # the parent path of each entry is recomputed as the walk goes
            for sp, path in self._for_each_sp(pages):
                self.kvm_unlink_unsync_page(sp)
                flush |= self.kvm_sync_page(vcpu, sp, invalid_list) > 0
                self.mmu_pages_clear_parents(path)
        self.kvm_mmu_remote_flush_or_zap(invalid_list, flush)
        return 0

    # ------------------------------------------------------------ sync
    def kvm_sync_page(self, vcpu, sp: KvmMmuPage, invalid_list) -> int:
        ret = self.__kvm_sync_page(vcpu, sp)
        if ret < 0:
            self.kvm_mmu_prepare_zap_page(sp, invalid_list)
        return ret

    def __kvm_sync_page(self, vcpu, sp: KvmMmuPage) -> int:
        m = self._ctx(vcpu)
        if sp.direct or m.direct or role_sync_mismatch(sp.role, m.root_role):
            self.vm.warn_sink.warn("kvm_sync_page_check", "page cannot be synced with this MMU",
                                   once=True)
            return -1
        flush = 0
        failed = False
        nonpresent = self._nonpresent
        for i in range(512):
            v = sp.spt.item(i)
            if v == nonpresent or not v:
                continue
            r = self.fname_sync_spte(vcpu, sp, i)
            if r < 0:
                failed = True
            elif r:
                flush = 1
        return -1 if failed else flush

    # ================================================================ roots
    def mmu_alloc_root(self, vcpu, gfn: int, quadrant: int, level: int) -> KvmMmuPage:
        m = self._ctx(vcpu)
        role = m.root_role.replace(level=level, quadrant=quadrant)
        sp = self.kvm_mmu_get_shadow_page(vcpu, gfn, role)
        sp.root_count += 1
        self._set_header(sp, root_count=sp.root_count)
        return sp

    def kvm_mmu_load(self, vcpu) -> int:
        """``kvm_mmu_load`` (after the common top-up): allocate the roots
        (direct or shadow), then ``kvm_mmu_sync_roots``.  Returns 0, or the
        roots' -ENOSPC (``make_mmu_pages_available``: nothing left under
        ``n_max_mmu_pages``) with the vCPU still without a root."""
        m = self._ctx(vcpu)
        if m.root.hpa is not None:
            return 0
        if m.direct:
            r = self.mmu_alloc_direct_roots(vcpu, m)
        else:
            r = self.mmu_alloc_shadow_roots(vcpu, m)
        if r:
            return r
        self._publish(vcpu, m)
        self.kvm_mmu_sync_roots(vcpu)
        return 0

    def mmu_alloc_direct_roots(self, vcpu, m: KvmMmu) -> int:
        with self._wlock():
            r = self.make_mmu_pages_available()
            if r < 0:
                return r
            level = m.root_role.level
            if level >= PT64_ROOT_4LEVEL:
                m.root.hpa = self.mmu_alloc_root(vcpu, 0, 0, level)
            elif level == PT32E_ROOT_LEVEL:
                for i in range(4):
                    m.pae_root[i] = self.mmu_alloc_root(vcpu, i << (30 - PAGE_SHIFT), 0,
                                                        PT32_ROOT_LEVEL)
                m.root.hpa = PAE_ROOT
            else:
                self.vm.warn_sink.warn("mmu_alloc_direct_roots", f"bad root level {level}", once=True)
                return -E.EIO
            m.root.pgd = 0
        return 0

    def mmu_alloc_shadow_roots(self, vcpu, m: KvmMmu) -> int:
        vm = self.vm
        cpu = vcpu.cpu
        root_pgd = m.nested.eptp if m.ept else cpu.cr3     # mmu->get_guest_pgd
        root_gfn = (root_pgd & _GPTE64_ADDR) >> PAGE_SHIFT
        cpu_level = m.cpu_role.base.level
        if vcpu.gfn_to_memslot(root_gfn) is None:
            m.root.hpa = DUMMY_ROOT
            m.root.pgd = root_pgd
            return 0
        pdptrs = [0] * 4
        if cpu_level == PT32E_ROOT_LEVEL:
            pdptrs = list(vcpu.pdptrs or (0, 0, 0, 0))
            for i in range(4):
                if pdptrs[i] & PT_PRESENT_MASK and \
                        vcpu.gfn_to_memslot((pdptrs[i] & _GPTE64_ADDR) >> PAGE_SHIFT) is None:
                    pdptrs[i] = 0
        vm.mmu_first_shadow_root_alloc()
        with self._wlock():
            r = self.make_mmu_pages_available()
            if r < 0:
                return r
            if cpu_level >= PT64_ROOT_4LEVEL:
                m.root.hpa = self.mmu_alloc_root(vcpu, root_gfn, 0, m.root_role.level)
                m.root.pgd = root_pgd
                return 0
            for i in range(4):
                gfn = root_gfn
                if cpu_level == PT32E_ROOT_LEVEL:
                    if not pdptrs[i] & PT_PRESENT_MASK:
                        m.pae_root[i] = None
                        continue
                    gfn = (pdptrs[i] & _GPTE64_ADDR) >> PAGE_SHIFT
                quadrant = i if cpu_level == PT32_ROOT_LEVEL else 0
                m.pae_root[i] = self.mmu_alloc_root(vcpu, gfn, quadrant, PT32_ROOT_LEVEL)
            m.root.hpa = PAE_ROOT
            m.root.pgd = root_pgd
        return 0

    def mmu_free_root_page(self, hpa, invalid_list):
        if isinstance(hpa, KvmMmuPage):
            hpa.root_count -= 1
            self._set_header(hpa, root_count=hpa.root_count)
            if not hpa.root_count and hpa.invalid:
                self.kvm_mmu_prepare_zap_page(hpa, invalid_list)
        elif hpa is not None and hpa not in (PAE_ROOT, DUMMY_ROOT):
            self.vm.warn_sink.warn("mmu_free_root_page", "root without a shadow page", once=True)

    def kvm_mmu_free_roots(self, vcpu, m: KvmMmu, roots_to_free: int) -> None:
        """``kvm_mmu_free_roots``: drop the selected roots (current:
        bit 0, previous i: bit i+1); a root page whose count drops to 0
        while invalid is zapped."""
        roots_to_free &= KVM_MMU_ROOTS_ALL
        free_active = bool(roots_to_free & KVM_MMU_ROOT_CURRENT) and m.root.hpa is not None
        if not free_active and not any(roots_to_free & KVM_MMU_ROOT_PREVIOUS(i) and
                                       m.prev_roots[i].hpa is not None
                                       for i in range(KVM_MMU_NUM_PREV_ROOTS)):
            return
        invalid_list: list = []
        with self._wlock():
            for i in range(KVM_MMU_NUM_PREV_ROOTS):
                if roots_to_free & KVM_MMU_ROOT_PREVIOUS(i) and m.prev_roots[i].hpa is not None:
                    self.mmu_free_root_page(m.prev_roots[i].hpa, invalid_list)
                    m.prev_roots[i].hpa = INVALID_PAGE
            if free_active:
                h = m.root.hpa
                if h is PAE_ROOT:
                    for i in range(4):
                        if m.pae_root[i] is not None:
                            self.mmu_free_root_page(m.pae_root[i], invalid_list)
                            m.pae_root[i] = None
                elif h is not DUMMY_ROOT:
                    self.mmu_free_root_page(h, invalid_list)
                m.root.hpa = INVALID_PAGE
                m.root.pgd = 0
            self.kvm_mmu_commit_zap_page(invalid_list)
        self._publish(vcpu, m)

    def kvm_mmu_unload(self, vcpu) -> None:
        """``kvm_mmu_unload``: free every root (current and previous) and the
        MMIO cache; the context is re-initialised at the next load
        (``kvm_mmu_reset_context`` = unload + ``kvm_init_mmu``)."""
        for m in self._vcpu_mmus(vcpu.index):          # root_mmu, then guest_mmu
            self.kvm_mmu_free_roots(vcpu, m, KVM_MMU_ROOTS_ALL)
            if not m.ept:           # guest_mmu keeps its EPT role (kvm_init_mmu leaves it)
                m.key = None
        vcpu.mmu_root = None
        vcpu.vcpu_clear_mmio_info()

    def _is_obsolete_root(self, hpa) -> bool:
        if hpa is None:
            return False
        return not isinstance(hpa, KvmMmuPage) or self.is_obsolete_sp(hpa)

    def free_obsolete_roots(self, vcpu) -> None:
        """``kvm_mmu_free_obsolete_roots``: free the current and previous
        roots that are obsolete (special roots count as obsolete), of
        ``root_mmu`` and of ``guest_mmu``."""
        for m in self._vcpu_mmus(vcpu.index):
            roots = KVM_MMU_ROOT_CURRENT if self._is_obsolete_root(m.root.hpa) else 0
            for i in range(KVM_MMU_NUM_PREV_ROOTS):
                if self._is_obsolete_root(m.prev_roots[i].hpa):
                    roots |= KVM_MMU_ROOT_PREVIOUS(i)
            if roots:
                self.kvm_mmu_free_roots(vcpu, m, roots)

    # ------------------------------------------------------------ CR3 switch
    @staticmethod
    def _is_root_usable(root: KvmMmuRootInfo, pgd: int, role: KvmMmuPageRole) -> bool:
        h = root.hpa
        if h is None:
            return False
        if not role.direct and pgd != root.pgd:
            return False
        if not isinstance(h, KvmMmuPage):
            return False
        return role.word == h.word

    def fast_pgd_switch(self, vcpu, m: KvmMmu, new_pgd: int) -> bool:
        """``fast_pgd_switch``: special roots are freed; then look for a
        usable cached root (MRU rotation keeping the current one, or a
        search of ``prev_roots`` without one)."""
        role = m.root_role
        if m.root.hpa is not None and not isinstance(m.root.hpa, KvmMmuPage):
            self.kvm_mmu_free_roots(vcpu, m, KVM_MMU_ROOT_CURRENT)
        if m.root.hpa is not None:
            if self._is_root_usable(m.root, new_pgd, role):
                return True
            for i in range(KVM_MMU_NUM_PREV_ROOTS):
                m.root, m.prev_roots[i] = m.prev_roots[i], m.root
                if self._is_root_usable(m.root, new_pgd, role):
                    return True
            self.kvm_mmu_free_roots(vcpu, m, KVM_MMU_ROOT_CURRENT)
            return False
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            if self._is_root_usable(m.prev_roots[i], new_pgd, role):
                break
        else:
            return False
        m.root, m.prev_roots[i] = m.prev_roots[i], m.root
        while i < KVM_MMU_NUM_PREV_ROOTS - 1:
            m.prev_roots[i] = m.prev_roots[i + 1]
            i += 1
        m.prev_roots[i] = KvmMmuRootInfo()
        return True

    def kvm_mmu_new_pgd(self, vcpu, new_pgd: int) -> None:
        """``kvm_mmu_new_pgd`` (a CR3 load, before the store): a cached root
        for `new_pgd` becomes current (KVM_REQ_LOAD_MMU_PGD, the MMIO cache
        cleared, the root's write-flooding count reset); without one the
        next entry loads a new root."""
        m = self._ctx(vcpu)
        hit = self.fast_pgd_switch(vcpu, m, new_pgd)
        self._publish(vcpu, m)
        if not hit:
            return
        vcpu.kvm_make_request("KVM_REQ_LOAD_MMU_PGD")
        if getattr(self.vm.params, "flush_on_reuse", False):     # force_flush_and_sync_on_reuse
            vcpu.kvm_make_request("KVM_REQ_MMU_SYNC")
            vcpu.kvm_make_request("KVM_REQ_TLB_FLUSH_CURRENT")
        vcpu.vcpu_clear_mmio_info()
        if not m.root_role.direct:
            sp = m.root.sp
            if sp is None:
                self.vm.warn_sink.warn("kvm_mmu_new_pgd", "reused root without a page", once=True)
            else:
                sp.write_flooding_count = 0

    # ------------------------------------------------------------ syncing roots
    @staticmethod
    def _is_unsync_root(hpa) -> bool:
        return isinstance(hpa, KvmMmuPage) and bool(hpa.unsync or hpa.unsync_children)

    def kvm_mmu_sync_roots(self, vcpu) -> None:
        """``kvm_mmu_sync_roots``: sync the unsync pages below the current
        root (each PAE root for 2/3-level guests)."""
        m = self.vcpu_mmu.get(vcpu.index)
        if m is None or m.key is None or m.root_role.direct or m.root.hpa is None:
            return
        vcpu.vcpu_clear_mmio_info()
        if m.cpu_role.base.level >= PT64_ROOT_4LEVEL:
            if m.root.hpa is DUMMY_ROOT or not self._is_unsync_root(m.root.hpa):
                return
            with self._wlock():
                self.mmu_sync_children(vcpu, m.root.hpa, True)
            return
        with self._wlock():
            for sp in m.pae_root:
                if sp is not None:
                    self.mmu_sync_children(vcpu, sp, True)

    def kvm_mmu_sync_prev_roots(self, vcpu) -> None:
        """``kvm_mmu_sync_prev_roots``: free (not sync) the unsync cached roots."""
        m = self.vcpu_mmu.get(vcpu.index)
        if m is None:
            return
        roots = 0
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            if self._is_unsync_root(m.prev_roots[i].hpa):
                roots |= KVM_MMU_ROOT_PREVIOUS(i)
        self.kvm_mmu_free_roots(vcpu, m, roots)

    # ================================================================ shadow walks
    def _walk_start(self, m: KvmMmu, root_hpa, addr: int):
        """``shadow_walk_init_using_root``: (table page, level) or (None, 0)."""
        if root_hpa is PAE_ROOT:
            sp = m.pae_root[(addr >> 30) & 3]
            return (sp, 2) if sp is not None else (None, 0)
        if isinstance(root_hpa, KvmMmuPage):
            return root_hpa, root_hpa.level
        return None, 0

    def shadow_walk(self, vcpu, addr: int, root_hpa=None) -> list[tuple[KvmMmuPage, int, int]]:
        """The entries a ``for_each_shadow_entry`` walk of `addr` visits:
        ``[(page, index, spte), ...]`` from the root down to the last one."""
        m = self._ctx(vcpu)
        sp, level = self._walk_start(m, m.root.hpa if root_hpa is None else root_hpa, addr)
        out = []
        while sp is not None and level >= 1:
            idx = (addr >> (12 + 9 * (level - 1))) & 511
            spte = sp.spt.item(idx)
            out.append((sp, idx, spte))
            if not spte & _PRESENT or level == 1 or spte & _LARGE:
                break
            sp = self._child(spte)
            level -= 1
        return out

    # ================================================================ faults
    def mmu_page_fault(self, vcpu, fault: KvmPageFault) -> int:
        """``vcpu->arch.mmu->page_fault``: ``kvm_tdp_page_fault`` ->
        ``direct_page_fault`` (mmu="tdp"); ``FNAME(page_fault)`` for a
        paging guest, ``nonpaging_page_fault`` (2M at most) without paging."""
        m = self._ctx(vcpu)
        if m.direct:
            if not self.tdp:
                fault.gfn = gfn = fault.addr >> PAGE_SHIFT
                fault.slot = vcpu.gfn_to_memslot(gfn)
                if fault.max_level > 2:
                    fault.max_level = 2
            return self.direct_page_fault(vcpu, fault, m)
        return self.fname_page_fault(vcpu, fault, m)

    def page_fault_batch(self, vcpu, gvas, error_code) -> np.ndarray:
        """``kvm_mmu_page_fault`` for each gva of `gvas` in order, with one
        `error_code` or an array of them: the RET_PF_* codes (int32).

        The same events, statistics and state as the scalar calls in a loop
        (``vcpu.last_fault`` is the last fault's), but for a shadow-paging
        vCPU the guest walk, faultin (host pages already present) and
        ``FNAME(fetch)`` over existing shadow pages run in one C loop
        (:meth:`ShadowFastCore.page_fault_batch`); a fault C declines (new
        shadow pages, write protection, unsync, MMIO, a host page to fault
        in, a guest #PF, ...) goes through the scalar Python path, in order.
        Every address and error code is checked first (as
        :meth:`check_fault_args` would): bad input raises and changes nothing.

        Parameters
        ----------
        vcpu : Vcpu of this VM
        gvas : ndarray of uint64, shape (n,), C-contiguous
        error_code : int, or ndarray of uint64, shape (n,)
        """
        vm = self.vm
        if vm.warn_sink.bugged:
            vm.warn_sink.check()
        if vcpu.vm is not vm:
            raise ValueError("vcpu belongs to another VM")
        gvas = check_array("gvas", gvas)
        n = gvas.shape[0]
        if isinstance(error_code, np.ndarray):
            ecs = check_array("error_code", error_code)
            if ecs.shape[0] != n:
                raise ValueError(f"error_code has {ecs.shape[0]} elements, gvas {n}")
        else:
            ecs = np.full(n, int_arg("error_code", error_code), np.uint64)
        out = np.empty(n, np.int32)
        if n == 0:
            return out
        self._check_fault_args_array(vcpu, gvas, ecs)
        if self.direct or vcpu.guest_mode or not self.c_fast_path:
            pf = vcpu.kvm_mmu_page_fault
            for i, (g, e) in enumerate(zip(gvas.tolist(), ecs.tolist())):
                out[i] = pf(g, e)
            return out
        self._fastcore().page_fault_batch(self, vcpu, gvas, ecs, out, _CWalker, KvmPageFault)
        return out

    def _check_fault_args_array(self, vcpu, gvas, ecs) -> None:
        """The common entry's input checks for every fault of a batch, before
        any runs (bad input raises and changes nothing): the shadow #PF's
        rules vectorised, as :meth:`check_fault_args`; a direct or L2 vCPU's
        through the entry's own checker, fault by fault."""
        if self.direct or vcpu.guest_mode:
            check = self.check_l2_fault_args if vcpu.guest_mode else \
                (lambda v, a, e: _mmu.check_direct_fault_args(self.vm, a, e))
            for g, e in zip(gvas.tolist(), ecs.tolist()):
                check(vcpu, g, e)
            return
        bad = ecs & np.uint64(~_PF_ERROR_CODE_BITS & _U64)
        if bad.any():
            self.check_fault_args(vcpu, 0, int(ecs[np.flatnonzero(bad)[0]]))
        cpu = vcpu.cpu
        if cpu.efer & (1 << 10):
            bits = 57 if cpu.cr4 & (1 << 12) else 48
            top = gvas >> np.uint64(bits - 1)
            badv = (top != 0) & (top != np.uint64((1 << (65 - bits)) - 1))
        else:
            badv = (gvas >> np.uint64(32)) != 0
        if badv.any():
            self.check_fault_args(vcpu, int(gvas[np.flatnonzero(badv)[0]]), 0)

    def check_fault_args(self, vcpu, addr: int, error_code: int) -> None:
        """What the common entry checks for a shadow-paging #PF before it
        counts anything: the error code has only bits a #PF exit carries
        (P W U RSVD I/D PK SS and SGX (15); bits 7-14 and 16-31 are
        reserved, KVM enables no HLAT, and kvm_handle_page_fault drops the
        upper half with a WARN: KVM's synthetic bits never come from a
        #PF), and the address fits the paging mode (32 bits outside long
        mode, canonical in it).  Raises ValueError /
        :class:`kvmmmu.paging.AccessError` naming the argument."""
        if error_code & ~_PF_ERROR_CODE_BITS:
            raise ValueError(f"error_code={error_code:#x} has bits a #PF error code never has "
                             f"({error_code & ~_PF_ERROR_CODE_BITS:#x})")
        cpu = vcpu.cpu
        if cpu.efer & (1 << 10):                            # EFER.LMA
            bits = 57 if cpu.cr4 & (1 << 12) else 48
            top = addr >> (bits - 1)
            if top not in (0, (1 << (65 - bits)) - 1):
                raise AccessError(f"gva={addr:#x} (cr2_or_gpa) is not canonical")
        elif addr >> 32:
            raise AccessError(f"gva={addr:#x} (cr2_or_gpa) does not fit 32 bits outside long mode")

    def _is_page_fault_stale(self, vcpu, m: KvmMmu, fault) -> bool:
        """``is_page_fault_stale`` (:func:`kvmmmu.mmu.is_page_fault_stale`,
        inline): an obsolete root page, a pending free-obsolete-roots request
        for a root without one, or an invalidation since faultin."""
        h = m.root.hpa
        if isinstance(h, KvmMmuPage):
            if h.invalid or h.mmu_valid_gen != self.vm.mmu_valid_gen:
                return True
        elif "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in vcpu.requests:
            return True
        if fault.slot is None:
            return False
        n = self.vm.notifier
        if n.mmu_invalidate_seq == fault.mmu_seq and not n.mmu_invalidate_in_progress:
            return False
        return _mmu.mmu_invalidate_retry_gfn(self.vm, fault.mmu_seq, fault.gfn)

    def _topup(self, vcpu, maybe_indirect: bool) -> int:
        if vcpu.mmu_shadow_page_cache.nobjs >= 5 and vcpu.mmu_page_header_cache.nobjs >= 5 and \
                vcpu.mmu_pte_list_desc_cache.nobjs >= 14 and \
                (not maybe_indirect or vcpu.mmu_shadowed_info_cache.nobjs >= 5):
            return 0
        try:
            vcpu.mmu_topup_memory_caches(maybe_indirect)
        except KvmNoMemoryError:
            return -E.ENOMEM
        return 0

    def direct_page_fault(self, vcpu, fault: KvmPageFault, m: KvmMmu) -> int:
        """``direct_page_fault``: page-track check, ``fast_page_fault``,
        top-up, faultin, then under ``mmu_lock`` (write): stale check, page
        budget, ``direct_map``."""
        if m.root.hpa is DUMMY_ROOT:
            self.vm.warn_sink.warn("direct_page_fault", "fault on a dummy root", once=True)
            return RET_PF_RETRY
        if fault.present and fault.write and _mmu.page_fault_handle_page_track(vcpu, fault):
            return RET_PF_WRITE_PROTECTED
        if _mmu.page_fault_can_be_fast(self.vm, fault):
            r = _mmu.fast_page_fault(vcpu, fault)
            if r != RET_PF_INVALID:
                return r
        r = self._topup(vcpu, False)
        if r:
            return r
        r = _mmu.faultin_pfn(vcpu, fault, ACC_ALL)
        if r != RET_PF_CONTINUE:
            return r
        lock = self.vm.mmu_lock
        lock.acquire_write()
        try:
            if self._is_page_fault_stale(vcpu, m, fault):
                return RET_PF_RETRY
            if self.vm.n_max_mmu_pages - self.n_used_mmu_pages < KVM_MIN_FREE_MMU_PAGES:
                r = self.make_mmu_pages_available()
                if r:
                    return r
            return self.direct_map(vcpu, fault, m)
        finally:
            lock.release_write()

    @staticmethod
    def _hugepage_adjust(vcpu, fault) -> None:
        """``kvm_mmu_hugepage_adjust`` and its pfn alignment to the goal level."""
        _mmu.kvm_mmu_hugepage_adjust(vcpu, fault)
        if fault.goal_level > 1:
            fault.pfn &= ~((1 << (9 * (fault.goal_level - 1))) - 1)

    def _trace_spte_requested(self, fault):
        if _tp.kvm_mmu_spte_requested.enabled:
            g = fault.goal_level
            _tp.kvm_mmu_spte_requested.emit(
                gfn=fault.gfn, level=g,
                pfn=(fault.pfn | (fault.gfn & ((1 << (9 * (g - 1))) - 1))) & _U64)

    def disallowed_hugepage_adjust(self, fault, spte: int, cur_level: int) -> None:
        """``disallowed_hugepage_adjust``: at the goal level, a table made
        for an NX split (``nx_huge_page_disallowed``) lowers the goal."""
        if cur_level > PG_LEVEL_4K and cur_level == fault.goal_level and spte & _PRESENT and \
                not spte & _LARGE:
            child = self._child(spte)
            if child.nx_huge_page_disallowed:
                fault.pfn |= fault.gfn & (((1 << (9 * (cur_level - 1))) - 1) &
                                          ~((1 << (9 * (cur_level - 2))) - 1))
                fault.goal_level -= 1

    def account_nx_huge_page(self, sp: KvmMmuPage, nx_huge_page_possible: bool) -> None:
        if sp.nx_huge_page_disallowed:
            return
        sp.nx_huge_page_disallowed = True
        self._set_header(sp, nx_huge_page_disallowed=True)
        if nx_huge_page_possible:
            self.possible_nx_huge_pages[sp.sp] = sp
            self.vm.stat.nx_lpage_splits += 1

    def unaccount_nx_huge_page(self, sp: KvmMmuPage) -> None:
        sp.nx_huge_page_disallowed = False
        if self.possible_nx_huge_pages.pop(sp.sp, None) is not None:
            self.vm.stat.nx_lpage_splits -= 1

    def direct_map(self, vcpu, fault: KvmPageFault, m: KvmMmu) -> int:
        """``direct_map``: ``kvm_mmu_hugepage_adjust``, then down the shadow
        walk of ``fault.addr`` linking direct pages to the goal level,
        ``mmu_set_spte``, ``direct_pte_prefetch``.  A 4K goal over existing
        pages runs in C when :attr:`c_fast_path` (same events and state)."""
        self._hugepage_adjust(vcpu, fault)
        if self.c_fast_path and fault.goal_level == PG_LEVEL_4K and not m.ept:
            r = self._c_direct_map(vcpu, fault, m)
            if r is not None:
                return r
        self._trace_spte_requested(fault)
        sp, level = self._walk_start(m, m.root.hpa, fault.addr)
        level, sptep, base_gfn = self._direct_levels(vcpu, fault, sp, level, ACC_ALL, False)
        if level != fault.goal_level:
            self.vm.warn_sink.warn("direct_map", "walk did not reach the goal level", once=True)
            return -E.EFAULT
        ret = self.mmu_set_spte(vcpu, fault.slot, sptep, ACC_ALL, base_gfn, fault.pfn, fault)
        if ret == RET_PF_SPURIOUS:
            return ret
        self.direct_pte_prefetch(vcpu, sptep)
        return ret

    def _direct_levels(self, vcpu, fault: KvmPageFault, sp, level: int, access: int,
                       validate: bool):
        """The direct part of ``direct_map`` and ``FNAME(fetch)``: from table
        `sp` at `level` down to ``fault.goal_level``, linking direct pages
        of `access` (``disallowed_hugepage_adjust`` with the NX workaround,
        ``validate_direct_spte`` first when `validate`, NX accounting of new
        pages).  Returns (level reached, its sptep, its base gfn)."""
        addr = fault.addr
        base_gfn = fault.gfn
        sptep = 0
        while sp is not None and level >= 1:
            idx = (addr >> (12 + 9 * (level - 1))) & 511
            sptep = sp.pa | (idx << 3)
            spte = sp.spt.item(idx)
            if fault.nx_huge_page_workaround_enabled:
                self.disallowed_hugepage_adjust(fault, spte, level)
            base_gfn = fault.gfn & ~((1 << (9 * (level - 1))) - 1)
            if level == fault.goal_level:
                break
            if validate:
                self.validate_direct_spte(sptep, access)
            child = self.kvm_mmu_get_child_sp(vcpu, sptep, base_gfn, True, access)
            if child is not None:
                self.link_shadow_page(vcpu, sptep, child)
                if fault.huge_page_disallowed:
                    self.account_nx_huge_page(child, fault.req_level >= level)
                sp = child
            else:
                sp = self._child(sp.spt.item(idx))
            level -= 1
        return level, sptep, base_gfn

    def _c_start(self, m: KvmMmu, addr: int):
        """Where the C path's shadow walk of `addr` starts: (sp handle,
        level), or None (no usable root: the Python path says why)."""
        h = m.root.hpa
        if type(h) is KvmMmuPage:
            return h.sp, h.level
        if h is PAE_ROOT:
            sp = m.pae_root[(addr >> 30) & 3]
            if sp is not None:
                return sp.sp, 2
        return None

    def _c_direct_map(self, vcpu, fault: KvmPageFault, m: KvmMmu):
        """``direct_map`` at a 4K goal in C; None when it declined (nothing
        changed)."""
        start = self._c_start(m, fault.addr)
        if start is None:
            return None
        core = self._fastcore()
        r = core.fetch(self, vcpu, fault, ACC_ALL, start[0], start[1])
        if r == _DECLINE:
            return None
        if core.flush:
            self.vm.kvm_flush_remote_tlbs()
        if core.direct_prefetch_py:
            self.direct_pte_prefetch(vcpu, core.sptep)
        return r

    def direct_pte_prefetch(self, vcpu, sptep: int) -> None:
        sp = self._sptep_sp(sptep)
        if sp.role.ad_disabled or sp.level > PG_LEVEL_4K:
            return
        if self.vm.notifier.mmu_invalidate_in_progress:
            return
        self.__direct_pte_prefetch(vcpu, sp, sptep)

    def __direct_pte_prefetch(self, vcpu, sp: KvmMmuPage, sptep: int) -> None:
        if not sp.direct:
            self.vm.warn_sink.warn("__direct_pte_prefetch", "indirect page", once=True)
        i0 = ((sptep >> 3) & 511) & ~(PTE_PREFETCH_NUM - 1)
        start = None
        for i in range(i0, i0 + PTE_PREFETCH_NUM):
            p = sp.pa | (i << 3)
            if sp.spt.item(i) & _PRESENT or p == sptep:
                if start is None:
                    continue
                if self._direct_pte_prefetch_many(vcpu, sp, start, i) < 0:
                    return
                start = None
            elif start is None:
                start = i
        if start is not None:
            self._direct_pte_prefetch_many(vcpu, sp, start, i0 + PTE_PREFETCH_NUM)

    def _prefetch_slot(self, vcpu, gfn: int, no_dirty_log: bool):
        """``gfn_to_memslot_dirty_bitmap``."""
        slot = vcpu.gfn_to_memslot(gfn)
        if slot is None or slot.flags & KVM_MEMSLOT_INVALID:
            return None
        if no_dirty_log and slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            return None
        return slot

    def _prefetch_pages(self, slot, gfn: int, n: int) -> list[int]:
        """``kvm_prefetch_pages``: pfns of the first present, writable host
        pages (GUP fast only, FOLL_WRITE), stopping at the first miss."""
        if gfn + n > slot.base_gfn + slot.npages:
            return []
        out = []
        host = self.vm.host
        for k in range(n):
            hva = slot.userspace_addr + ((gfn + k - slot.base_gfn) << PAGE_SHIFT)
            r = hva_to_pfn_fast(host, hva, True)
            if r is None or not r[1]:
                break
            out.append(r[0])
        return out

    def _direct_pte_prefetch_many(self, vcpu, sp: KvmMmuPage, start: int, end: int) -> int:
        access = sp.role.access
        gfn = self.kvm_mmu_page_get_gfn(sp, start)
        slot = self._prefetch_slot(vcpu, gfn, bool(access & ACC_WRITE_MASK))
        if slot is None:
            return -1
        pfns = self._prefetch_pages(slot, gfn, end - start)
        if not pfns:
            return -1
        for k, pfn in enumerate(pfns):
            self.mmu_set_spte(vcpu, slot, sp.pa | ((start + k) << 3), access, gfn + k, pfn, None)
        return 0

    # ------------------------------------------------------------ fast page fault
    def fast_page_fault(self, vcpu, fault: KvmPageFault) -> tuple[int, bool]:
        """The shadow MMU's half of ``fast_page_fault`` (direct MMUs): a
        lockless walk to the last SPTE; SPURIOUS if the access is already
        allowed; W restored on an MMU-writable leaf (not a huge page of a
        dirty-logged slot) or an access-tracked SPTE restored, by cmpxchg.
        ``(RET_PF_*, made_writable)``; traces ``fast_page_fault``."""
        m = self._ctx(vcpu)
        a = self.arena
        fmt = self.fmt
        ret = RET_PF_INVALID
        made = False
        sptep = 0
        spte = self._nonpresent
        a.walk_shadow_page_lockless_begin(vcpu.index)
        try:
            for _ in range(5):
                walk = self.shadow_walk(vcpu, fault.addr, m.root.hpa)
                if not walk:
                    break
                sp, idx, spte = walk[-1]
                sptep = sp.pa | (idx << 3)
                if not spte & _PRESENT:
                    break
                if not (sp.level == 1 or spte & _LARGE):
                    break
                if self._is_access_allowed(fault, spte):
                    ret = RET_PF_SPURIOUS
                    break
                new = spte
                if not self.vm.kvm_ad_enabled and fmt.is_access_track_spte(spte):
                    new = fmt.restore_acc_track_spte(new) | self._accessed
                if fault.write and spte & self._mmu_writable:
                    new |= _W
                    if sp.level > PG_LEVEL_4K and fault.slot is not None and \
                            fault.slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                        break
                if new == spte or not self._is_access_allowed(fault, new):
                    break
                ok, cur = a.try_cmpxchg64(sptep, spte, new)
                if ok:
                    made = bool(new & _W) and not spte & _W
                    ret = RET_PF_FIXED
                    break
        finally:
            a.walk_shadow_page_lockless_end(vcpu.index)
        if _tp.fast_page_fault.enabled and sptep:
            _tp.fast_page_fault.emit(vcpu_id=vcpu.vcpu_id, cr2_or_gpa=fault.addr,
                                     error_code=fault.error_code & _U64, sptep=sptep,
                                     old_spte=spte, new_spte=a.mmu_spte_get_lockless(sptep), ret=ret)
        return ret, made

    def _is_access_allowed(self, fault, spte: int) -> bool:
        fmt = self.fmt
        if fault.exec:
            return fmt.is_executable_pte(spte)
        if fault.write:
            return bool(spte & _W)
        return bool(spte & _PRESENT) and not fmt.is_access_track_spte(spte)

    def get_mmio_spte(self, vcpu, addr: int) -> tuple[bool, int]:
        """``get_mmio_spte``: the last SPTE of a lockless walk of `addr`."""
        m = self.vcpu_mmu.get(vcpu.index)
        if m is None or m.root.hpa is None:
            return False, 0
        a = self.arena
        a.walk_shadow_page_lockless_begin(vcpu.index)
        try:
            walk = self.shadow_walk(vcpu, addr, m.root.hpa)
        finally:
            a.walk_shadow_page_lockless_end(vcpu.index)
        return False, (walk[-1][2] if walk else 0)

    # ------------------------------------------------------------ FNAME(page_fault)
    def _read_gpte(self, vcpu, gpa: int, size: int):
        try:
            return int.from_bytes(self.vm.guest_memory(vcpu.as_id).read(gpa, size), "little")
        except Exception:
            return None

    def kvm_inject_emulated_page_fault(self, vcpu, pf) -> None:
        """``kvm_inject_emulated_page_fault``: a present, non-reserved fault
        first invalidates the address in the current root; then the MMU's
        ``inject_page_fault``: a #PF for the guest (``pf_guest++``,
        ``vcpu.injected_page_fault``), or, for a fault in L1's EPT,
        :meth:`nested_ept_inject_page_fault` (a VM exit to L1)."""
        ec = pf.error_code
        if ec & PFERR_PRESENT_MASK and not ec & PFERR_RSVD_MASK:
            self.kvm_mmu_invalidate_addr(vcpu, pf.address, KVM_MMU_ROOT_CURRENT)
        m = self.vcpu_mmu.get(vcpu.index)
        if m is not None and m.ept:
            self.nested_ept_inject_page_fault(vcpu, pf)
            return
        vcpu.stat.pf_guest += 1
        vcpu.injected_page_fault = pf

    def fname_page_fault(self, vcpu, fault: KvmPageFault, m: KvmMmu) -> int:
        """``FNAME(page_fault)`` (ARCHITECTURE §3.1, S1-S19)."""
        vm = self.vm
        if fault.is_tdp:
            vm.warn_sink.warn("FNAME(page_fault)", "TDP fault on a shadow MMU", once=True)
        access = fault.error_code & _GUEST_ACCESS
        pw = self._prewalked
        if pw is not None and pw[0] == fault.addr and pw[1] == access:
            self._prewalked = None              # the batch path's C walk of this fault
            walker = pw[2]                      # (its A/D write-back already dirtied the tables)
        else:
            walker = vcpu.walk_addr(fault.addr, access)     # A/D write-back dirties the tables
        if walker.fault is not None:
            if not fault.prefetch:
                self.kvm_inject_emulated_page_fault(vcpu, walker.fault)
            return RET_PF_RETRY
        fault.gfn = gfn = walker.gfn
        fault.max_level = walker.level
        fault.slot = vcpu.gfn_to_memslot(gfn)
        if fault.present and fault.write and _mmu.page_fault_handle_page_track(vcpu, fault):
            self.shadow_page_table_clear_flood(vcpu, fault.addr)
            return RET_PF_WRITE_PROTECTED
        r = self._topup(vcpu, True)
        if r:
            return r
        pte_access = walker.pte_access
        r = _mmu.faultin_pfn(vcpu, fault, pte_access)
        if r != RET_PF_CONTINUE:
            return r
        if fault.write and not pte_access & ACC_WRITE_MASK and not m.cr0_wp and not fault.user \
                and fault.slot is not None:
            pte_access = (pte_access | ACC_WRITE_MASK) & ~ACC_USER_MASK
            if m.cr4_smep:
                pte_access &= ~ACC_EXEC_MASK
        lock = vm.mmu_lock
        lock.acquire_write()
        try:
            if self._is_page_fault_stale(vcpu, m, fault):
                return RET_PF_RETRY
            if vm.n_max_mmu_pages - self.n_used_mmu_pages < KVM_MIN_FREE_MMU_PAGES:
                r = self.make_mmu_pages_available()
                if r:
                    return r
            return self.fname_fetch(vcpu, fault, walker, pte_access, m)
        finally:
            lock.release_write()

    def shadow_page_table_clear_flood(self, vcpu, addr: int) -> None:
        a = self.arena
        a.walk_shadow_page_lockless_begin(vcpu.index)
        try:
            for sp, _, _ in self.shadow_walk(vcpu, addr):
                sp.write_flooding_count = 0
        finally:
            a.walk_shadow_page_lockless_end(vcpu.index)

    @staticmethod
    def _gpte_changed(mem, pte_gpas, ptes, level: int, size: int, prefetch_ptes: list) -> bool:
        """``FNAME(gpte_changed)``: re-read the gPTE the walk used at `level`
        (a read failure counts as a change); at 4K read its whole 8-entry
        group into `prefetch_ptes` for ``FNAME(pte_prefetch)``."""
        pte_gpa = pte_gpas[level - 1]
        try:
            if level == PG_LEVEL_4K:
                base = pte_gpa & ~(PTE_PREFETCH_NUM * size - 1)
                raw = mem.read(base, PTE_PREFETCH_NUM * size)
                prefetch_ptes[:] = [int.from_bytes(raw[k:k + size], "little")
                                    for k in range(0, PTE_PREFETCH_NUM * size, size)]
                cur = prefetch_ptes[(pte_gpa - base) // size]
            else:
                cur = int.from_bytes(mem.read(pte_gpa, size), "little")
        except Exception:
            return True
        return cur != ptes[level - 1]

    def fname_fetch(self, vcpu, fault: KvmPageFault, gw, direct_access: int, m: KvmMmu) -> int:
        """``FNAME(fetch)``: indirect pages for the guest tables above the
        guest leaf, ``kvm_mmu_hugepage_adjust``, direct pages below a guest
        huge page, ``mmu_set_spte``, ``FNAME(pte_prefetch)``.  A 4K guest
        leaf over existing shadow pages runs in C when :attr:`c_fast_path`."""
        if self.c_fast_path and gw.level == PG_LEVEL_4K and not m.ept:
            r = self._c_fname_fetch(vcpu, fault, gw, direct_access, m)
            if r is not None:
                return r
        vm = self.vm
        prefetch_ptes: list = []
        top_level = m.cpu_role.base.level
        if top_level == PT32E_ROOT_LEVEL:
            top_level = PT32_ROOT_LEVEL
        mem = vm.guest_memory(vcpu.as_id)
        pte_gpas, ptes = gw.pte_gpa, gw.ptes
        size = 4 if m.cpu_role.base.has_4_byte_gpte else 8
        if self._gpte_changed(mem, pte_gpas, ptes, top_level, size, prefetch_ptes):
            return RET_PF_RETRY
        if m.root.hpa is None:
            vm.warn_sink.warn("FNAME(fetch)", "no valid root", once=True)
            return RET_PF_RETRY
        if m.root.hpa is DUMMY_ROOT:
            vcpu.kvm_make_request("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")
            return RET_PF_RETRY
        addr = fault.addr
        sp, level = self._walk_start(m, m.root.hpa, addr)
        gw_level = gw.level
        table_gfns = gw.table_gfn
        pt_access = gw.pt_access
        while sp is not None and level >= 1 and level > gw_level:
            idx = (addr >> (12 + 9 * (level - 1))) & 511
            sptep = sp.pa | (idx << 3)
            sp.write_flooding_count = 0
            table_gfn = table_gfns[level - 2]
            child = self.kvm_mmu_get_child_sp(vcpu, sptep, table_gfn, False, pt_access[level - 2])
            if child is not None and child.unsync_children:
                if self.mmu_sync_children(vcpu, child, False):
                    return RET_PF_RETRY
            if self._gpte_changed(mem, pte_gpas, ptes, level - 1, size, prefetch_ptes):
                return RET_PF_RETRY
            if child is not None:
                self.link_shadow_page(vcpu, sptep, child)
            else:
                child = self._child(sp.spt.item(idx))
            if fault.write and table_gfn == fault.gfn:
                fault.write_fault_to_shadow_pgtable = True
            sp = child
            level -= 1
        self._hugepage_adjust(vcpu, fault)
        self._trace_spte_requested(fault)
        level, sptep, base_gfn = self._direct_levels(vcpu, fault, sp, level, direct_access, True)
        if level != fault.goal_level:
            vm.warn_sink.warn("FNAME(fetch)", "walk did not reach the goal level", once=True)
            return -E.EFAULT
        ret = self.mmu_set_spte(vcpu, fault.slot, sptep, direct_access, base_gfn, fault.pfn, fault)
        if ret == RET_PF_SPURIOUS:
            return ret
        self.fname_pte_prefetch(vcpu, m, sptep, prefetch_ptes)
        return ret

    def _c_fname_fetch(self, vcpu, fault: KvmPageFault, gw, access: int, m: KvmMmu):
        """``FNAME(fetch)`` of a 4K guest leaf in C; None when it declined
        (nothing changed).  What ``kvm_mmu_hugepage_adjust`` leaves for a 4K
        ``max_level`` is set here; a prefetch that reaches a gPTE to map
        resumes in :meth:`fname_pte_prefetch`."""
        start = self._c_start(m, fault.addr)
        if start is None:
            return None
        base = m.cpu_role.base
        top_level = base.level
        if top_level == PT32E_ROOT_LEVEL:
            top_level = PT32_ROOT_LEVEL
        core = self._fastcore()
        r = core.fetch(self, vcpu, fault, access, start[0], start[1], gw, top_level,
                       4 if base.has_4_byte_gpte else 8, self._rsvd(vcpu, m))
        if r == _DECLINE:
            return None
        fault.huge_page_disallowed = fault.exec and fault.nx_huge_page_workaround_enabled
        if core.wf_to_spt:
            fault.write_fault_to_shadow_pgtable = True
        if core.flush:
            self.vm.kvm_flush_remote_tlbs()
        k = core.prefetch_resume
        if k >= 0:
            self.fname_pte_prefetch(vcpu, m, core.sptep, core.gptes, k)
        return r

    def validate_direct_spte(self, sptep: int, direct_access: int) -> None:
        """``validate_direct_spte``: a direct child table made for another
        access is unlinked (and the TLB flushed)."""
        sp = self._sptep_sp(sptep)
        spte = sp.spt.item((sptep >> 3) & 511)
        if spte & _PRESENT and not spte & _LARGE:
            child = self._child(spte)
            if child.role.access == direct_access:
                return
            self.drop_parent_pte(child, sptep)
            self.vm.kvm_flush_remote_tlbs()

    # ------------------------------------------------------------ gPTE helpers
    def _gpte_access(self, m: KvmMmu, gpte: int) -> int:
        """``FNAME(gpte_access)``: P -> X (cleared by NX), W, U; for EPT
        gPTEs W -> W, X -> X and R -> ACC_USER (EPT has no U/S: "user"
        stands for readable)."""
        if m.ept:
            return (ACC_WRITE_MASK if gpte & _EPT_W else 0) | (ACC_EXEC_MASK if gpte & _EPT_X else 0) | \
                (ACC_USER_MASK if gpte & _EPT_R else 0)
        access = gpte & (PT_WRITABLE_MASK | PT_USER_MASK | PT_PRESENT_MASK)
        if m.cpu_role.base.has_4_byte_gpte:
            return access
        return access ^ ((gpte >> 63) & 1)

    def _protect_clean_gpte(self, access: int, gpte: int, m: KvmMmu | None = None) -> int:
        """``FNAME(protect_clean_gpte)``: no write through a gPTE whose D bit
        is clear (bit 6; EPT: bit 9, and only when L1's EPTP enables A/D -
        without them there is no D bit to keep)."""
        if m is not None and m.ept:
            if m.root_role.ad_disabled or gpte & _EPT_D:
                return access
            return access & ~ACC_WRITE_MASK
        if not gpte & (1 << 6):                     # D clear: no write until it is set
            access &= ~ACC_WRITE_MASK
        return access

    def _gpte_to_gfn(self, m: KvmMmu, gpte: int) -> int:
        mask = _GPTE32_ADDR if m.cpu_role.base.has_4_byte_gpte else _GPTE64_ADDR
        return (gpte & mask) >> PAGE_SHIFT

    def _rsvd(self, vcpu, m: KvmMmu):
        """The guest's reserved-bit masks (``FNAME(is_rsvd_bits_set)``) for
        the context's role and the vCPU's guest model (cached per context);
        for EPT the walker's ``reset_rsvds_bits_mask_ept`` masks."""
        if m.ept:
            return self.nested_ept_walk_mmu(vcpu, m).guest_rsvd_check
        key = (m.key, id(vcpu.guest_model))
        if m.rsvd is None or m.rsvd[0] != key:
            m.rsvd = (key, reset_guest_rsvds_bits_mask(m.cpu_role, vcpu.guest_model))
        return m.rsvd[1]

    def prefetch_invalid_gpte(self, vcpu, m: KvmMmu, sp: KvmMmuPage, sptep: int, gpte: int,
                              rsvd=None) -> bool:
        """``FNAME(prefetch_invalid_gpte)``: a gPTE that is not present, not
        accessed or has reserved bits drops the SPTE (True).  EPT: present
        is any of R/W/X, and A (bit 8) counts only with A/D enabled."""
        if m.ept:
            if (rsvd if rsvd is not None else self._rsvd(vcpu, m)).is_rsvd_spte(gpte, PG_LEVEL_4K) \
                    or not gpte & _EPT_RWX or \
                    (not m.root_role.ad_disabled and not gpte & _EPT_A):
                self.drop_spte(sptep)
                return True
            return False
        if not gpte & PT_PRESENT_MASK or not gpte & PT_ACCESSED_MASK or \
                (rsvd if rsvd is not None else self._rsvd(vcpu, m)).is_rsvd_spte(gpte, PG_LEVEL_4K):
            self.drop_spte(sptep)
            return True
        return False

    def fname_prefetch_gpte(self, vcpu, m: KvmMmu, sp: KvmMmuPage, sptep: int, gpte: int,
                            rsvd) -> bool:
        if self.prefetch_invalid_gpte(vcpu, m, sp, sptep, gpte, rsvd):
            return False
        gfn = self._gpte_to_gfn(m, gpte)
        pte_access = self._protect_clean_gpte(sp.role.access & self._gpte_access(m, gpte), gpte, m)
        slot = self._prefetch_slot(vcpu, gfn, bool(pte_access & ACC_WRITE_MASK))
        if slot is None:
            return False
        pfns = self._prefetch_pages(slot, gfn, 1)
        if len(pfns) != 1:
            return False
        self.mmu_set_spte(vcpu, slot, sptep, pte_access, gfn, pfns[0], None)
        return True

    def fname_pte_prefetch(self, vcpu, m: KvmMmu, sptep: int, gptes: list, start: int = 0) -> None:
        """``FNAME(pte_prefetch)``: map the present, accessed gPTEs of the
        8-entry group around a level-1 fault, stopping at the first that
        cannot be mapped; direct pages use ``__direct_pte_prefetch``.
        `start`: the group entry to begin with (where the C path stopped)."""
        sp = self._sptep_sp(sptep)
        if sp.level > PG_LEVEL_4K:
            return
        if self.vm.notifier.mmu_invalidate_in_progress:
            return
        if sp.direct:
            self.__direct_pte_prefetch(vcpu, sp, sptep)
            return
        if len(gptes) != PTE_PREFETCH_NUM:
            return
        i0 = ((sptep >> 3) & 511) & ~(PTE_PREFETCH_NUM - 1)
        rsvd = self._rsvd(vcpu, m)
        for k in range(start, PTE_PREFETCH_NUM):
            p = sp.pa | ((i0 + k) << 3)
            if p == sptep:
                continue
            if sp.spt.item(i0 + k) & _PRESENT:
                continue
            if not self.fname_prefetch_gpte(vcpu, m, sp, p, gptes[k], rsvd):
                break

    def _level1_sp_gpa(self, sp: KvmMmuPage) -> int:
        """``FNAME(get_level1_sp_gpa)``: the gpa of the first guest entry the
        page shadows (a 32-bit table's second quadrant starts at +2K)."""
        off = 0
        if sp.role.has_4_byte_gpte:
            off = sp.role.quadrant << 11
        return (sp.gfn << PAGE_SHIFT) + off

    def fname_sync_spte(self, vcpu, sp: KvmMmuPage, i: int) -> int:
        """``FNAME(sync_spte)``: re-read gPTE `i`; drop the SPTE if the gPTE
        is invalid or maps another gfn (1); refresh an MMIO SPTE (0); with
        changed access rebuild the SPTE over the same pfn (prefetch,
        synchronizing): whether to flush.  -1 if the gPTE cannot be read."""
        m = self._ctx(vcpu)
        if sp.shadowed_translation is None:
            self.vm.warn_sink.warn("FNAME(sync_spte)", "no shadowed_translation", once=True)
            return 0
        size = 4 if sp.role.has_4_byte_gpte else 8
        gpte = self._read_gpte(vcpu, self._level1_sp_gpa(sp) + i * size, size)
        if gpte is None:
            return -1
        sptep = sp.pa | (i << 3)
        if self.prefetch_invalid_gpte(vcpu, m, sp, sptep, gpte):
            return 1
        gfn = self._gpte_to_gfn(m, gpte)
        pte_access = self._protect_clean_gpte(sp.role.access & self._gpte_access(m, gpte), gpte, m)
        old = sp.spt.item(i)
        if self.fmt.is_mmio_spte(old):
            if gfn != self.fmt.get_mmio_spte_gfn(old):
                self.arena.mmu_spte_clear_no_track(sptep)
            else:
                self.mark_mmio_spte(vcpu, sptep, gfn, pte_access)
            return 0
        if (pte_access | self.fmt.shadow_present_mask) == self._nonpresent or \
                gfn != self.kvm_mmu_page_get_gfn(sp, i):
            self.drop_spte(sptep)
            return 1
        if pte_access == self.kvm_mmu_page_get_access(sp, i):
            return 0
        self.kvm_mmu_page_set_access(sp, i, pte_access)
        slot = vcpu.gfn_to_memslot(gfn)
        spte, _ = self.make_spte(vcpu, sp, slot, pte_access, gfn, (old & _ADDR) >> 12, old,
                                 True, True, bool(old & self._host_writable))
        return int(bool(self.arena.mmu_spte_update(sptep, spte)))

    # ------------------------------------------------------------ INVLPG
    def kvm_mmu_invlpg(self, vcpu, gva: int) -> None:
        """``kvm_mmu_invlpg`` (the common entry counts ``invlpg``):
        ``kvm_mmu_invalidate_addr`` in every root."""
        self.kvm_mmu_invalidate_addr(vcpu, gva, KVM_MMU_ROOTS_ALL)

    def kvm_mmu_invalidate_addr(self, vcpu, addr: int, roots: int) -> None:
        """``kvm_mmu_invalidate_addr``: for the selected roots, walk `addr`
        and sync the entry in each unsync page on the way (zapping it if the
        sync fails), stopping below the first page without unsync children."""
        m = self.vcpu_mmu.get(vcpu.index)
        if m is None or m.key is None or m.root_role.direct:
            return
        if roots & KVM_MMU_ROOT_CURRENT:
            self._invalidate_addr(vcpu, m, addr, m.root.hpa)
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            if roots & KVM_MMU_ROOT_PREVIOUS(i):
                self._invalidate_addr(vcpu, m, addr, m.prev_roots[i].hpa)

    def _invalidate_addr(self, vcpu, m, addr, root_hpa) -> None:
        vcpu.vcpu_clear_mmio_info(addr)
        if root_hpa is None:
            return
        with self._wlock():
            sp, level = self._walk_start(m, root_hpa, addr)
            while sp is not None and level >= 1:
                idx = (addr >> (12 + 9 * (level - 1))) & 511
                sptep = sp.pa | (idx << 3)
                if sp.unsync:
                    ret = self.fname_sync_spte(vcpu, sp, idx) \
                        if sp.spt.item(idx) not in (self._nonpresent, 0) else 0
                    if ret < 0:
                        self.mmu_page_zap_pte(sp, sptep, None)
                    if ret:
                        self.vm.kvm_flush_remote_tlbs()
                if not sp.unsync_children:
                    break
                spte = sp.spt.item(idx)
                if not spte & _PRESENT or level == 1 or spte & _LARGE:
                    break
                sp = self._child(spte)
                level -= 1

    # ------------------------------------------------------------ emulated writes
    def kvm_mmu_track_write(self, vcpu, gpa: int, new: bytes) -> None:
        """``kvm_mmu_track_write``: after an emulated write of `new` at
        `gpa` (already in guest memory): count ``mmu_pte_write``; zap each
        page shadowing the gfn that the write floods or hits misaligned
        (``mmu_flooded``), else zap the written SPTEs (``mmu_pde_zapped``
        for a non-zero new gPTE above 4K)."""
        vm = self.vm
        if vm.page_track_external_users:          # __kvm_page_track_write, first
            _pt.kvm_page_track_write_notify(vm, gpa, new)
        if not self.indirect_shadow_pages:
            return
        nbytes = len(new)
        gfn = gpa >> PAGE_SHIFT
        invalid_list: list = []
        flush = False
        with self._wlock():
            if vcpu.cpu.cr4 & (1 << 5) and nbytes == 4:        # is_pae: widen to the gPTE
                gpa &= ~7
                nbytes = 8
            gentry = 0
            if nbytes in (4, 8):
                g = self._read_gpte(vcpu, gpa, nbytes)
                gentry = 0 if g is None else g
            vm.stat.mmu_pte_write += 1
            for sp in self.for_each_gfn_valid_sp_with_gptes(gfn):
                if sp.invalid:
                    continue
                if self.detect_write_misaligned(sp, gpa, nbytes) or self.detect_write_flooding(sp):
                    self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                    vm.stat.mmu_flooded += 1
                    continue
                r = self.get_written_sptes(sp, gpa)
                if r is None:
                    continue
                first, npte = r
                for k in range(npte):
                    i = first + k
                    entry = sp.spt.item(i)
                    self.mmu_page_zap_pte(sp, sp.pa | (i << 3), None)
                    if gentry and sp.level != PG_LEVEL_4K:
                        vm.stat.mmu_pde_zapped += 1
                    if entry & _PRESENT:
                        flush = True
            self.kvm_mmu_remote_flush_or_zap(invalid_list, flush)

    @staticmethod
    def detect_write_misaligned(sp: KvmMmuPage, gpa: int, nbytes: int) -> bool:
        offset = gpa & 0xFFF
        size = 4 if sp.role.has_4_byte_gpte else 8
        if not offset & (size - 1) and nbytes == 1:
            return False
        return bool((offset ^ (offset + nbytes - 1)) & ~(size - 1)) or nbytes < 4

    @staticmethod
    def detect_write_flooding(sp: KvmMmuPage) -> bool:
        if sp.level == PG_LEVEL_4K:
            return False
        sp.write_flooding_count += 1
        return sp.write_flooding_count >= WRITE_FLOODING_THRESHOLD

    @staticmethod
    def get_written_sptes(sp: KvmMmuPage, gpa: int):
        """``get_written_sptes``: (first index, count) or None when the
        write is in another quadrant."""
        off = gpa & 0xFFF
        n = 1
        if sp.role.has_4_byte_gpte:
            off <<= 1
            if sp.level == PT32_ROOT_LEVEL:
                off &= ~7
                off <<= 1
                n = 2
            quadrant = off >> PAGE_SHIFT
            off &= 0xFFF
            if quadrant != sp.role.quadrant:
                return None
        return off >> 3, n

    def unprotect_gfn_and_retry(self, vcpu, cr2_or_gpa: int) -> bool:
        """``__kvm_mmu_unprotect_gfn_and_retry``: zap every valid page with
        guest PTEs for the gfn (translating a gva for shadow paging, as a
        write); whether one was zapped."""
        if not self.indirect_shadow_pages:
            return False
        m = self._ctx(vcpu)
        gpa = cr2_or_gpa
        if not m.root_role.direct:
            cpu = vcpu.cpu
            w = vcpu.walk_addr(cr2_or_gpa, PFERR_WRITE_MASK |
                                        (PFERR_USER_MASK if cpu.cpl == 3 else 0))
            if w.fault is not None:
                return False
            gpa = w.gfn << PAGE_SHIFT
        invalid_list: list = []
        with self._wlock():
            sps = self.for_each_gfn_valid_sp_with_gptes(gpa >> PAGE_SHIFT)
            for sp in sps:
                if not sp.invalid:
                    self.kvm_mmu_prepare_zap_page(sp, invalid_list)
            self.kvm_mmu_commit_zap_page(invalid_list)
        return bool(sps)

    def translate(self, vcpu, gva: int, access: int) -> int | None:
        """The emulator's gva->gpa (``kvm_mmu_gva_to_gpa_*``): a walk that
        sets A/D bits; None when it faults (the emulator would inject)."""
        w = vcpu.walk_addr(gva, access)
        if w.fault is not None:
            return None
        return w.gpa

    # ================================================================ nested EPT
    # vcpu->arch.mmu = &guest_mmu while L2 runs under L1's EPT; root_mmu (L1's
    # direct pages) keeps its roots meanwhile.  The Vcpu methods
    # nested_ept_enter / nested_ept_new_eptp / nested_ept_leave /
    # nested_invept / nested_invvpid are the entry points.
    def _require_nested_ept(self) -> None:
        if not self.tdp or self.fmt.name != "ept":
            raise NestedEptError(
                f"nested EPT needs mmu='tdp' on the shadow MMU of an EPT host "
                f"(this VM: mmu={self.vm.mmu!r}, SPTE format {self.fmt.name!r})")

    def _make_nested(self, vcpu, eptp, execonly, huge_level, ad_supported,
                     five_level_supported) -> NestedEpt:
        """Check `eptp` as ``nested_vmx_check_eptp`` does (EptpError: memory
        type, walk length, A/D, reserved bits) and build its walker."""
        n = NestedEpt()
        n.walker = GuestMmu.ept(self.vm.guest_memory(vcpu.as_id), eptp, vcpu.guest_model,
                                execonly=bool(execonly), huge_level=huge_level,
                                ad_supported=bool(ad_supported),
                                five_level_supported=bool(five_level_supported))
        n.eptp = n.walker.eptp
        n.execonly, n.huge_level = bool(execonly), huge_level
        n.ad_supported, n.five_level_supported = bool(ad_supported), bool(five_level_supported)
        return n

    def _init_shadow_ept_roles(self, m: KvmMmu) -> None:
        """The role half of ``kvm_init_shadow_ept_mmu``: the CPU role of
        ``kvm_calc_shadow_ept_root_page_role`` (A/D from EPTP bit 6, the walk
        length, execonly), the root role its base; kept when unchanged."""
        n = m.nested
        role = kvm_calc_shadow_ept_root_page_role(bool(n.eptp >> 6 & 1), n.execonly,
                                                  ((n.eptp >> 3) & 7) + 1)
        if m.cpu_role is None or m.cpu_role.as_u64 != role.as_u64:
            m.cpu_role = role
            m.root_role = role.base
        m.direct = False
        m.cr0_wp = True             # PTTYPE_EPT has no CR0.WP=0 supervisor-write override
        m.cr4_smep = False
        m.key = ("ept", role.as_u64)

    def kvm_init_shadow_ept_mmu(self, vcpu, m: KvmMmu) -> None:
        """``kvm_init_shadow_ept_mmu``: roles for L1's current EPTP, then
        ``kvm_mmu_new_pgd(eptp)`` (fast switch among the cached roots)."""
        self._init_shadow_ept_roles(m)
        self.kvm_mmu_new_pgd(vcpu, m.nested.eptp)

    def nested_ept_init_mmu_context(self, vcpu, eptp: int, *, execonly=True, huge_level=3,
                                    ad_supported=True, five_level_supported=True) -> None:
        """Nested VM entry with EPT (``nested_ept_init_mmu_context``):
        ``vcpu->arch.mmu`` becomes ``guest_mmu`` and ``nested_ept_new_eptp``
        loads `eptp`.  Bad input raises before anything changes:
        :class:`NestedEptError` (not this VM flavour, already in L2),
        :class:`~kvmmmu.paging.EptpError` (an EPTP L1 may not use)."""
        self._require_nested_ept()
        if vcpu.guest_mode:
            raise NestedEptError(f"vCPU {vcpu.vcpu_id} is already running L2 (nested_ept_enter twice)")
        n = self._make_nested(vcpu, eptp, execonly, huge_level, ad_supported,
                              five_level_supported)
        self._ctx(vcpu)                                   # root_mmu exists
        m = self.vcpu_guest_mmu.get(vcpu.index)
        if m is None:
            m = self.vcpu_guest_mmu[vcpu.index] = KvmMmu()
            m.ept = True
        m.nested = n
        self.vcpu_mmu[vcpu.index] = m
        vcpu.guest_mode = True
        vcpu.nested_eptp = n.eptp
        vcpu.mmu_root = None
        self.kvm_init_shadow_ept_mmu(vcpu, m)
        self._publish(vcpu, m)

    def nested_ept_new_eptp(self, vcpu, eptp: int) -> None:
        """A new EPTP while L2 runs (``nested_vmx_eptp_switching``, VMFUNC 0
        -> ``nested_ept_new_eptp``): the same EPTP does nothing; another one
        goes through ``kvm_init_shadow_ept_mmu`` (a cached root for it is
        reused, ``prev_roots`` rotate).  L1's capabilities stay those of the
        entry.  NestedEptError outside L2, EptpError for a bad EPTP (nothing
        changes)."""
        m = self.vcpu_mmu.get(vcpu.index)
        if not vcpu.guest_mode or m is None or not m.ept:
            raise NestedEptError(f"vCPU {vcpu.vcpu_id} is not running L2: no EPTP to switch")
        old = m.nested
        n = self._make_nested(vcpu, eptp, old.execonly, old.huge_level, old.ad_supported,
                              old.five_level_supported)
        if n.eptp == old.eptp:
            return
        m.nested = n
        vcpu.nested_eptp = n.eptp
        self.kvm_init_shadow_ept_mmu(vcpu, m)

    def nested_ept_walk_mmu(self, vcpu, m: KvmMmu | None = None) -> GuestMmu:
        """The EPT walker of the vCPU's ``guest_mmu`` (``vcpu.walk_mmu`` in
        L2), rebuilt when L1's memory or CPU model object changed."""
        if m is None:
            m = self.vcpu_mmu[vcpu.index]
        n = m.nested
        mem = self.vm.guest_memory(vcpu.as_id)
        if n.walker.memory is not mem or n.walker.model is not vcpu.guest_model:
            n.walker = GuestMmu.ept(mem, n.eptp, vcpu.guest_model, execonly=n.execonly,
                                    huge_level=n.huge_level, ad_supported=n.ad_supported,
                                    five_level_supported=n.five_level_supported)
        return n.walker

    def nested_vmx_vmexit(self, vcpu) -> None:
        """The MMU's part of a nested VM exit (``nested_ept_uninit_mmu_context``
        then the host CR3 load): ``vcpu->arch.mmu`` is ``root_mmu`` again,
        whose root was kept (``kvm_mmu_new_pgd`` of L1's CR3 finds it);
        ``guest_mmu`` keeps its roots for the next entry."""
        if not vcpu.guest_mode:
            raise NestedEptError(f"vCPU {vcpu.vcpu_id} is not running L2 (nested_ept_leave in L1)")
        root = self.vcpu_root_mmu[vcpu.index]
        self.vcpu_mmu[vcpu.index] = root
        vcpu.guest_mode = False
        vcpu.nested_eptp = None
        vcpu.mmu_root = None
        self._publish(vcpu, root)
        self.kvm_mmu_new_pgd(vcpu, vcpu.cpu.cr3)

    def nested_ept_inject_page_fault(self, vcpu, pf) -> None:
        """``nested_ept_inject_page_fault``: a fault in L1's EPT goes to L1
        as an EPT misconfiguration (PFERR_RSVD: qualification 0) or an EPT
        violation (the walker's qualification plus the GVA bits of the exit,
        known here from PFERR_GUEST_FINAL/PAGE of the fault's error code;
        the address is also invalidated in the cached roots of the same
        EP4TA); then the VM exit (:meth:`nested_vmx_vmexit`).  Left in
        ``vcpu.nested_ept_exit`` (a :class:`NestedEptExit`)."""
        m = self.vcpu_mmu[vcpu.index]
        if pf.error_code & PFERR_RSVD_MASK:
            reason, qual = EXIT_REASON_EPT_MISCONFIG, 0
        else:
            reason = EXIT_REASON_EPT_VIOLATION
            qual = pf.exit_qualification
            f = vcpu.last_fault
            ec = f.error_code if f is not None else 0
            if ec & _PFERR_GUEST_FINAL:
                qual |= EPT_VIOLATION_GVA_IS_VALID | EPT_VIOLATION_GVA_TRANSLATED
            elif ec & _PFERR_GUEST_PAGE:
                qual |= EPT_VIOLATION_GVA_IS_VALID
            self.nested_ept_invalidate_addr(vcpu, m.nested.eptp, pf.address)
        vcpu.nested_ept_exit = NestedEptExit(reason, qual, pf.address, pf)
        self.nested_vmx_vmexit(vcpu)

    @staticmethod
    def nested_ept_root_matches(root: KvmMmuRootInfo, eptp: int) -> bool:
        """``nested_ept_root_matches``: a valid root for the same EP4TA."""
        return root.hpa is not None and (root.pgd & EPTP_PA_MASK) == (eptp & EPTP_PA_MASK)

    def nested_ept_invalidate_addr(self, vcpu, eptp: int, addr: int) -> None:
        """``nested_ept_invalidate_addr``: ``kvm_mmu_invalidate_addr`` in the
        cached previous roots of the current EPTP's EP4TA."""
        m = self.vcpu_mmu[vcpu.index]
        roots = 0
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            if self.nested_ept_root_matches(m.prev_roots[i], eptp):
                roots |= KVM_MMU_ROOT_PREVIOUS(i)
        if roots:
            self.kvm_mmu_invalidate_addr(vcpu, addr, roots)

    def handle_invept(self, vcpu, invept_type: int, eptp: int = 0) -> None:
        """``handle_invept`` (L1 executes INVEPT): single-context frees the
        ``guest_mmu`` roots (current and cached) of `eptp`'s EP4TA, global
        frees them all.  Freed roots are not zapped: their pages stay
        hashed and are found again (and synced) by the next root load.
        NestedEptError from L2 or for another type; EptpError for a
        single-context EPTP L1 may not use.  Nothing changes on error."""
        self._require_nested_ept()
        if vcpu.guest_mode:
            raise NestedEptError("INVEPT is L1's instruction: leave L2 first")
        t = operator.index(invept_type)
        if t not in (VMX_EPT_EXTENT_CONTEXT, VMX_EPT_EXTENT_GLOBAL):
            raise NestedEptError(f"invept_type={t}: only single-context (1) and global (2) INVEPT "
                                 "are offered to L1")
        m = self.vcpu_guest_mmu.get(vcpu.index)
        if t == VMX_EPT_EXTENT_CONTEXT:
            c = m.nested if m is not None else None
            self._make_nested(vcpu, eptp, True if c is None else c.execonly,
                              3 if c is None else c.huge_level,
                              True if c is None else c.ad_supported,
                              True if c is None else c.five_level_supported)
        if m is None:
            return
        if t == VMX_EPT_EXTENT_GLOBAL:
            roots = KVM_MMU_ROOTS_ALL
        else:
            roots = KVM_MMU_ROOT_CURRENT if self.nested_ept_root_matches(m.root, eptp) else 0
            for i in range(KVM_MMU_NUM_PREV_ROOTS):
                if self.nested_ept_root_matches(m.prev_roots[i], eptp):
                    roots |= KVM_MMU_ROOT_PREVIOUS(i)
        if roots:
            self.kvm_mmu_free_roots(vcpu, m, roots)

    def kvm_mmu_free_guest_mode_roots(self, vcpu, m: KvmMmu) -> None:
        """``kvm_mmu_free_guest_mode_roots``: free the cached previous roots
        of `m` that are special or of a guest_mode role (never the current
        one; WARN if `m` itself is a guest-mode context)."""
        if m.root_role is not None and m.root_role.guest_mode:
            self.vm.warn_sink.warn("kvm_mmu_free_guest_mode_roots", "called on an L2 context",
                                   once=True)
        roots = 0
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            h = m.prev_roots[i].hpa
            if h is None:
                continue
            if not isinstance(h, KvmMmuPage) or h.role.guest_mode:
                roots |= KVM_MMU_ROOT_PREVIOUS(i)
        self.kvm_mmu_free_roots(vcpu, m, roots)

    def handle_invvpid(self, vcpu) -> None:
        """``handle_invvpid`` as the MMU sees it: L2's linear mappings in
        ``root_mmu``'s cached guest-mode roots are dropped
        (``kvm_mmu_free_guest_mode_roots``); nested EPT roots are not
        (VPID does not tag guest-physical mappings)."""
        self._require_nested_ept()
        if vcpu.guest_mode:
            raise NestedEptError("INVVPID is L1's instruction: leave L2 first")
        self.kvm_mmu_free_guest_mode_roots(vcpu, self._ctx(vcpu))

    def check_l2_fault_args(self, vcpu, addr: int, error_code: int) -> None:
        """What an EPT violation / misconfiguration exit of L2 can carry
        (``handle_ept_violation``, ``handle_ept_misconfig``): an error code
        of P/W/U/F with at most one of PFERR_GUEST_FINAL / PFERR_GUEST_PAGE
        (see :func:`ept_violation_error_code`), or exactly PFERR_RSVD (a
        misconfiguration); an L2 gpa below L1's MAXPHYADDR.  ValueError /
        :class:`~kvmmmu.paging.AccessError` naming the argument."""
        if error_code != PFERR_RSVD_MASK:
            if error_code & ~_EPT_VIOLATION_PFERR:
                raise ValueError(f"error_code={error_code:#x} has bits an EPT violation's error "
                                 f"code never has ({error_code & ~_EPT_VIOLATION_PFERR:#x})")
            if error_code & _PFERR_GUEST_FINAL and error_code & _PFERR_GUEST_PAGE:
                raise ValueError(f"error_code={error_code:#x} sets both PFERR_GUEST_FINAL and "
                                 "PFERR_GUEST_PAGE")
        maxphy = vcpu.guest_model.maxphyaddr
        if addr >> maxphy:
            raise AccessError(f"l2_gpa={addr:#x} (cr2_or_gpa) is above L1's MAXPHYADDR ({maxphy} bits)")

    # ================================================================ hooks
    def _rmap_heads(self, slot, start: int, end: int, min_level=1, max_level=KVM_MAX_HUGEPAGE_LEVEL):
        rs = slot.arch.rmap
        if rs is None:
            return
        for level in range(min_level, max_level + 1):
            s = 9 * (level - 1)
            g = start & ~((1 << s) - 1)
            while g < end:
                if slot.base_gfn >> s <= g >> s <= (slot.base_gfn + slot.npages - 1) >> s:
                    gg = max(g, slot.base_gfn)
                    yield level, gg, gfn_to_rmap(gg, level, rs)
                g += 1 << s

    def _zap_rmap(self, head) -> bool:
        """``kvm_zap_all_rmap_sptes``: drop every SPTE of the list."""
        sps = list(head)
        for sptep in sps:
            self.drop_spte(sptep)
        return bool(sps)

    def _rmap_zap_gfn_range(self, slot, start: int, end: int) -> bool:
        flush = False
        for _, _, head in self._rmap_heads(slot, start, end):
            if len(head):
                flush |= self._zap_rmap(head)
        return flush

    def kvm_unmap_gfn_range(self, rng) -> bool:
        with self._wlock():
            return self._rmap_zap_gfn_range(rng.slot, rng.start, rng.end)

    def _age(self, rng, test_only: bool) -> bool:
        young = False
        fmt = self.fmt
        a = self.arena
        for _, _, head in self._rmap_heads(rng.slot, rng.start, rng.end):
            for sptep in list(head):
                sp = self._sptep_sp(sptep)
                spte = sp.spt.item((sptep >> 3) & 511)
                if not fmt.is_accessed_spte(spte):
                    continue
                young = True
                if test_only:
                    return True
                if _spte_ad_enabled(spte):
                    a.try_cmpxchg64(sptep, spte, spte & ~self._accessed)
                else:
                    a.try_cmpxchg64(sptep, spte, fmt.mark_spte_for_access_track(spte))
        return young

    def kvm_age_gfn(self, rng) -> bool:
        """``kvm_rmap_age_gfn_range`` (lockless): clear A (or mark for access
        tracking) on every young SPTE of the range; whether one was young."""
        return self._age(rng, False)

    def kvm_test_age_gfn(self, rng) -> bool:
        return self._age(rng, True)

    def kvm_zap_gfn_range(self, gfn_start, gfn_end) -> bool:
        flush = False
        with self._wlock():
            for slots in self.vm.memslots:
                for slot in slots:
                    s = max(gfn_start, slot.base_gfn)
                    e = min(gfn_end, slot.base_gfn + slot.npages)
                    if s < e:
                        flush |= self._rmap_zap_gfn_range(slot, s, e)
        return flush

    def kvm_arch_flush_shadow_memslot(self, slot) -> None:
        """The slot's part of a memslot flush when the VM does not zap
        everything (:func:`kvmmmu.mmu.kvm_memslot_flush_zap_all` false: not
        a default VM, or ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` disabled): the slot's
        leaves and the pages shadowing its gfns."""
        invalid_list: list = []
        with self._wlock():
            flush = self._rmap_zap_gfn_range(slot, slot.base_gfn, slot.base_gfn + slot.npages)
            for sp in list(self.active_mmu_pages.values()):
                if sp.sp in self.active_mmu_pages and sp.has_gptes and \
                        slot.base_gfn <= sp.gfn < slot.base_gfn + slot.npages and \
                        sp.role.smm == slot.as_id:
                    self.kvm_mmu_prepare_zap_page(sp, invalid_list)
            self.kvm_mmu_remote_flush_or_zap(invalid_list, flush)

    def kvm_arch_flush_shadow_all(self) -> None:
        """``kvm_mmu_zap_all``: zap every page (roots become invalid)."""
        invalid_list: list = []
        with self._wlock():
            while True:
                pages = [sp for sp in self.active_mmu_pages.values()]
                if not pages:
                    break
                for sp in pages:
                    if sp.sp in self.active_mmu_pages:
                        self.kvm_mmu_prepare_zap_page(sp, invalid_list)
            self.kvm_mmu_commit_zap_page(invalid_list)

    def kvm_mmu_zap_all_fast(self) -> None:
        """The shadow part of ``kvm_mmu_zap_all_fast``: the common code
        (:func:`kvmmmu.mmu.kvm_mmu_zap_all_fast`, holding ``mmu_lock``)
        traced the event before it flipped ``mmu_valid_gen`` and asked
        every vCPU to free obsolete roots; zap the obsolete pages."""
        self.kvm_zap_obsolete_pages()

    def kvm_mmu_change_mmu_pages(self, nr_mmu_pages) -> None:
        """``kvm_mmu_change_mmu_pages``: above the new goal, zap the oldest
        down to it; the limit is then what is in use."""
        with self._wlock():
            if self.n_used_mmu_pages > nr_mmu_pages:
                self.kvm_mmu_zap_oldest_mmu_pages(self.n_used_mmu_pages - nr_mmu_pages)
                self.vm.n_max_mmu_pages = max(nr_mmu_pages, self.n_used_mmu_pages)

    def kvm_mmu_recover_huge_pages(self, slot) -> None:
        """``kvm_rmap_zap_collapsible_sptes``: walk the slot's rmaps at 4K and
        2M (``KVM_MAX_HUGEPAGE_LEVEL - 1``) and zap each SPTE of a direct
        shadow page whose whole region (``sp.gfn``, one level up) the slot
        now lets map huge (dirty logging off), then flush the slot.

        A shadow page whose ``gfn`` lies below the slot covers a frame only
        partly inside it: that frame is the slot's misaligned head, whose
        ``disallow_lpage`` is always set, so the kernel's answer there is at
        most ``sp.role.level`` and nothing is zapped (the TDP MMU's
        ``recover_huge_pages_range`` skips such frames explicitly)."""
        flush = False
        vm = self.vm
        base = slot.base_gfn
        end = base + slot.npages
        with self._wlock():
            for level, _, head in self._rmap_heads(slot, base, end,
                                                   1, KVM_MAX_HUGEPAGE_LEVEL - 1):
                for sptep in list(head):
                    sp = self._sptep_sp(sptep)
                    if sp.direct and base <= sp.gfn < end and \
                            sp.level < vm.kvm_mmu_max_mapping_level(slot, sp.gfn):
                        self.drop_spte(sptep)
                        flush = True
            if flush:
                vm.kvm_flush_remote_tlbs()

    def kvm_mmu_slot_try_split_huge_pages(self, slot, target_level) -> None:
        """Eager page splitting exists only with the TDP MMU
        (``kvm_mmu_slot_try_split_huge_pages`` returns at once without it):
        nothing to do."""

    def kvm_mmu_slot_leaf_clear_dirty(self, slot) -> None:
        """``kvm_mmu_slot_leaf_clear_dirty`` (PML): clear D on 4K leaves (W
        for SPTEs without A/D)."""
        with self._wlock():
            for _, _, head in self._rmap_heads(slot, slot.base_gfn, slot.base_gfn + slot.npages,
                                               1, 1):
                for sptep in list(head):
                    self._clear_dirty(sptep)

    def _clear_dirty(self, sptep) -> bool:
        sp = self._sptep_sp(sptep)
        spte = sp.spt.item((sptep >> 3) & 511)
        if self._dirty and not sp.role.ad_disabled:
            if spte & self._dirty:
                return bool(self.arena.mmu_spte_update(sptep, spte & ~self._dirty))
            return False
        return self.spte_write_protect(sptep, False)

    def kvm_mmu_slot_remove_write_access(self, slot, start_level) -> None:
        """``slot_rmap_write_protect`` over the slot from `start_level`
        (pt_protect off: the fast path may restore W and log the page)."""
        with self._wlock():
            for _, _, head in self._rmap_heads(slot, slot.base_gfn, slot.base_gfn + slot.npages,
                                               start_level):
                self.rmap_write_protect(head, False)

    def kvm_arch_mmu_enable_log_dirty_pt_masked(self, slot, gfn_offset, mask) -> None:
        """Re-arm dirty logging for the gfns of `mask`: write-protect (no
        PML) or clear D (PML) their 4K SPTEs; with manual-protect +
        initially-all-set first write-protect the covering 2M frames."""
        vm = self.vm
        rs = slot.arch.rmap
        if rs is None or not mask:
            return
        with self._wlock():
            base = slot.base_gfn + gfn_offset
            if vm.kvm_dirty_log_manual_protect_and_init_set:
                lo = (mask & -mask).bit_length() - 1
                hi = mask.bit_length() - 1
                self.kvm_mmu_slot_gfn_write_protect(slot, base + lo, 2)
                if (base + lo) >> 9 != (base + hi) >> 9:
                    self.kvm_mmu_slot_gfn_write_protect(slot, base + hi, 2)
            while mask:
                low = mask & -mask
                g = base + low.bit_length() - 1
                mask ^= low
                head = gfn_to_rmap(g, 1, rs)
                if vm.cpu_dirty_log_size:
                    for sptep in list(head):
                        self._clear_dirty(sptep)
                else:
                    self.rmap_write_protect(head, False)

    def kvm_recover_nx_huge_pages(self, ratio: int | None = None) -> int:
        """One pass of the NX recovery thread for the shadow MMU: zap
        ``ceil(n / ratio)`` of the possible NX huge pages, oldest first
        (those in dirty-logged slots are only untracked).  Returns the
        number handled."""
        ratio = self.nx_huge_pages_recovery_ratio if ratio is None else ratio
        if not ratio or not self.possible_nx_huge_pages:
            return 0
        n = len(self.possible_nx_huge_pages)
        to_zap = (n + ratio - 1) // ratio
        invalid_list: list = []
        done = 0
        with self._wlock():
            while done < to_zap and self.possible_nx_huge_pages:
                sp = next(iter(self.possible_nx_huge_pages.values()))
                slot = self._slot(sp.gfn, sp.role.smm)
                if slot is not None and slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                    self.unaccount_nx_huge_page(sp)
                else:
                    self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                done += 1
            self.kvm_mmu_commit_zap_page(invalid_list)
        return done

    # ================================================================ audit
    def audit(self) -> list[str]:
        """The shadow-MMU invariants (module docstring); every violation."""
        return _audit(self)


class _NoLockCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NoLock = _NoLockCtx()


def _audit(mmu: ShadowMmu) -> list[str]:
    """Every violation of the shadow MMU's invariants (see the module
    docstring), checked from the tables, rmaps and lists themselves."""
    bad: list[str] = []
    vm = mmu.vm
    gen = vm.mmu_valid_gen
    if gen not in (0, 1):
        bad.append(f"mmu_valid_gen {gen} is not 0 or 1")
    pages = mmu.pages
    # parent_ptes expected from the tables; leaves by (slot, level, gfn)
    parents: dict[int, list[int]] = {h: [] for h in pages}
    leaves: dict[int, tuple] = {}
    writable_gfns: dict[tuple, int] = {}
    huge: list[tuple] = []
    for h, sp in pages.items():
        if sp.mmu_valid_gen not in (0, 1):
            bad.append(f"sp {h}: mmu_valid_gen {sp.mmu_valid_gen}")
        if sp.unsync and (sp.level != 1 or sp.direct):
            bad.append(f"sp {h}: unsync at level {sp.level}{' (direct)' if sp.direct else ''} (S4)")
        n_bits = bin(sp.unsync_child_bitmap).count("1")
        if n_bits != sp.unsync_children:
            bad.append(f"sp {h}: unsync_children {sp.unsync_children} != {n_bits} bits set")
        if mmu.by_pfn.get(sp.pfn) is not sp:
            bad.append(f"sp {h}: not found by its table pfn")
        hdr = vm.arena.get_sp(h)
        if hdr["gfn"] != sp.gfn or hdr["role"] != sp.word or hdr["root_count"] != sp.root_count or \
                hdr["unsync"] != sp.unsync or hdr["mmu_valid_gen"] != sp.mmu_valid_gen:
            bad.append(f"sp {h}: arena header disagrees with the page (gfn/role/root_count/unsync/gen)")
        spt = sp.spt
        for i in range(512):
            v = spt.item(i)
            if not v & _PRESENT:
                continue
            sptep = sp.pa | (i << 3)
            if sp.level > 1 and not v & _LARGE:
                child = mmu.by_pfn.get((v & _ADDR) >> 12)
                if child is None:
                    bad.append(f"sp {h}[{i}] links a table that is not a live page")
                else:
                    parents[child.sp].append(sptep)
                continue
            gfn = mmu.kvm_mmu_page_get_gfn(sp, i)
            leaves[sptep] = (sp.role.smm, sp.level, gfn)
            if v & _W:
                writable_gfns[(sp.role.smm, gfn)] = sptep
            if sp.level > 1:
                huge.append((sp.role.smm, sp.level, gfn, sptep))
    for h, sp in pages.items():
        got = sorted(sp.parent_ptes)
        if got != sorted(parents[h]):
            bad.append(f"sp {h}: parent_ptes {[hex(x) for x in got]} != linking SPTEs "
                       f"{[hex(x) for x in sorted(parents[h])]}")
        # S5: every unsync page / page with unsync children is marked in each parent
        if sp.unsync or sp.unsync_children:
            for p in got:
                psp = mmu.by_pfn.get(p >> 12)
                if psp is not None and not psp.unsync_child_bitmap >> ((p >> 3) & 511) & 1:
                    bad.append(f"sp {h}: unsync mark missing in parent sp {psp.sp} (S5)")
    # rmaps: every entry is one of the leaves, at its (slot, level, gfn), exactly once
    seen: dict[int, int] = {}
    for as_id, slots in enumerate(vm.memslots):
        for slot in slots:
            rs = slot.arch.rmap
            if rs is None:
                continue
            for level in (1, 2, 3):
                from kvmmmu._core.rmap import rmap_count_all
                counts = rmap_count_all(rs, level)
                for idx in counts.nonzero()[0]:
                    g = rs.index_to_gfn(int(idx), level)
                    for sptep in gfn_to_rmap(g, level, rs):
                        seen[sptep] = seen.get(sptep, 0) + 1
                        want = leaves.get(sptep)
                        if want is None:
                            bad.append(f"rmap slot {slot.id} l{level} gfn {g:#x}: {sptep:#x} is "
                                       f"not a present leaf")
                        elif want[0] != as_id or want[1] != level or \
                                want[2] >> (9 * (level - 1)) != g >> (9 * (level - 1)):
                            bad.append(f"rmap slot {slot.id} l{level} gfn {g:#x}: {sptep:#x} maps "
                                       f"gfn {want[2]:#x} at level {want[1]}")
    for sptep, key in leaves.items():
        n = seen.get(sptep, 0)
        if n != 1:
            bad.append(f"leaf {sptep:#x} (gfn {key[2]:#x}, l{key[1]}) is in {n} rmaps")
    # hash: every page in the bucket of its gfn, once; (gfn, role) unique among valid pages
    in_hash: dict[int, int] = {}
    for b, lst in mmu.mmu_page_hash.items():
        for sp in lst:
            in_hash[sp.sp] = in_hash.get(sp.sp, 0) + 1
            if kvm_page_table_hashfn(sp.gfn) != b:
                bad.append(f"sp {sp.sp} in hash bucket {b}, not {kvm_page_table_hashfn(sp.gfn)}")
    keys: set = set()
    for h, sp in pages.items():
        if in_hash.get(h) != 1:
            bad.append(f"sp {h} is in the hash {in_hash.get(h, 0)} times")
        if not sp.invalid and sp.mmu_valid_gen == gen:
            k = (sp.gfn, sp.word)
            if k in keys:
                bad.append(f"two valid pages for gfn {sp.gfn:#x} role {sp.word:#x} (S6)")
            keys.add(k)
    # active list: FIFO by creation (S9); n_used (S7)
    last = 0
    for sp in mmu.active_mmu_pages.values():
        if sp.invalid:
            bad.append(f"sp {sp.sp}: invalid page on the active list")
        if sp.serial < last:
            bad.append("active_mmu_pages is not in creation order (S9)")
        last = sp.serial
    n_used = len(mmu.active_mmu_pages) + sum(1 for sp in pages.values()
                                             if sp.invalid and sp.root_count)
    if n_used != mmu.n_used_mmu_pages:
        bad.append(f"n_used_mmu_pages {mmu.n_used_mmu_pages} != {n_used} (S7)")
    if len(pages) != n_used:
        bad.append(f"{len(pages) - n_used} zapped pages were never freed")
    unsync = sum(1 for sp in pages.values() if sp.unsync)
    if vm.stat.mmu_unsync != unsync:
        bad.append(f"stat mmu_unsync {vm.stat.mmu_unsync} != {unsync} unsync pages")
    ind = sum(1 for sp in pages.values() if sp.has_gptes and not sp.invalid)
    if ind != mmu.indirect_shadow_pages:
        bad.append(f"indirect_shadow_pages {mmu.indirect_shadow_pages} != {ind}")
    nx = sum(1 for sp in mmu.possible_nx_huge_pages.values())
    if vm.stat.nx_lpage_splits != nx and not vm.tdp_mmu_enabled:
        bad.append(f"stat nx_lpage_splits {vm.stat.nx_lpage_splits} != {nx}")
    # write tracking and lpage disallow (S1, S2, S3)
    track: dict[tuple, int] = {}
    lpage: dict[tuple, int] = {}
    sync_gfns: set = set()
    small: set = set()
    for sp in pages.values():
        if not sp.has_gptes or sp.invalid:
            continue
        k = (sp.role.smm, sp.gfn)
        lpage[k] = lpage.get(k, 0) + 1
        if sp.level > 1:
            track[k] = track.get(k, 0) + 1
        else:
            small.add(k)
        if not sp.unsync and sp.mmu_valid_gen == gen:
            sync_gfns.add(k)
    external = vm.external_write_tracking
    for as_id, slots in enumerate(vm.memslots):
        for slot in slots:
            t = slot.arch.gfn_write_track
            if t is not None:
                for rel in t.nonzero()[0]:
                    g = slot.base_gfn + int(rel)
                    want = track.get((as_id, g), 0)
                    if (int(t[rel]) != want and not external) or int(t[rel]) < want:
                        bad.append(f"gfn {g:#x}: write-track count {int(t[rel])}, {want} upper-level "
                                   f"pages shadow it (S1)")
            ledger = getattr(slot.arch, "disallow_lpage_ledger", None)
            for (a, g), n in lpage.items():
                if a != as_id or not slot.base_gfn <= g < slot.base_gfn + slot.npages:
                    continue
                if t is not None and (t[g - slot.base_gfn] if track.get((a, g)) else 1) == 0:
                    bad.append(f"gfn {g:#x}: shadowed above 4K but not write-tracked (S1)")
                if ledger is not None and ledger.get(g, 0) < n and not external:
                    bad.append(f"gfn {g:#x}: disallow_lpage {ledger.get(g, 0)} < {n} shadow pages (S2)")
    for (a, g), sptep in writable_gfns.items():
        slot = mmu._slot(g, a)
        if slot is not None and _pt.kvm_gfn_is_write_tracked(vm, slot, g):
            bad.append(f"gfn {g:#x} is write-tracked but mapped writable at {sptep:#x} (S1)")
        if (a, g) in sync_gfns:
            bad.append(f"gfn {g:#x} is shadowed by a sync page but mapped writable (S3)")
    for a, level, g, sptep in huge:
        base = g & ~((1 << (9 * (level - 1))) - 1)
        for (aa, sg) in small:
            if aa == a and base <= sg < base + (1 << (9 * (level - 1))):
                bad.append(f"huge SPTE {sptep:#x} (l{level}) covers shadowed table gfn {sg:#x} (S2)")
                break
    # nested EPT pages (guest_mode) exist only with TDP; vCPU contexts are consistent
    if not mmu.tdp and any(sp.role.guest_mode for sp in pages.values()):
        bad.append("guest_mode shadow pages on a VM without TDP")
    for i, m in mmu.vcpu_mmu.items():
        if m is not mmu.vcpu_root_mmu.get(i) and m is not mmu.vcpu_guest_mmu.get(i):
            bad.append(f"vCPU {i}: current MMU is neither its root_mmu nor its guest_mmu")
    # roots: root_count = the references the vCPUs hold
    refs: dict[int, int] = {}
    for m in [c for i in sorted(set(mmu.vcpu_root_mmu) | set(mmu.vcpu_guest_mmu))
              for c in mmu._vcpu_mmus(i)]:
        for r in [m.root] + m.prev_roots:
            sp = r.sp
            if sp is not None and bool(sp.role.guest_mode) != m.ept:
                bad.append(f"sp {sp.sp}: a {'guest_mmu' if m.ept else 'root_mmu'} root with "
                           f"guest_mode={sp.role.guest_mode}")
        hs = [m.root.hpa] + [r.hpa for r in m.prev_roots]
        if m.root.hpa is PAE_ROOT:
            hs += [p for p in m.pae_root if p is not None]
        for x in hs:
            if isinstance(x, KvmMmuPage):
                refs[x.sp] = refs.get(x.sp, 0) + 1
                if x.sp not in pages:
                    bad.append(f"a vCPU holds freed root sp {x.sp}")
    for h, sp in pages.items():
        if sp.root_count != refs.get(h, 0):
            bad.append(f"sp {h}: root_count {sp.root_count} != {refs.get(h, 0)} vCPU references")
    return bad
