"""A model of the Intel TDX module's Secure-EPT side, behind SEAMCALL-shaped calls.

KVM keeps a *mirror* of a TD's private page table and propagates every change
to the Secure EPT (S-EPT), which only the TDX module can read or write
(reference: ``mirror-tdx.md`` §1, §7, §9; seed design note 003).  This module
is that other side: it holds the S-EPT, the TD's TLB epoch and the PAMT (which
host page belongs to which TD, and as what) where MMU code cannot reach them,
and lets them change only through methods named after the kernel's SEAMCALL
wrappers (``arch/x86/virt/vmx/tdx/tdx.c``): :meth:`TdxModule.tdh_mem_sept_add`,
``tdh_mem_page_aug``, ``tdh_mem_page_add``, ``tdh_mem_range_block``,
``tdh_mem_range_unblock``, ``tdh_mem_track``, ``tdh_mem_page_remove``,
``tdh_mem_sept_remove``, ``tdh_mr_finalize``, ``tdh_phymem_page_wbinvd_hkid``,
``tdh_phymem_page_reclaim`` and the TD/vCPU life cycle calls
(``tdh_mng_create``, ``tdh_vp_create``, ``tdh_vp_enter`` /
:meth:`TdxModule.td_exit`, ``tdh_mng_key_freeid``).

Every call returns a :class:`SeamcallResult`: the status (RAX) with the
module's operand id in bits 31:0, exactly as KVM compares it
(``err == (TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX)``,
``tdx_operand_busy(err)``), plus the out-registers KVM reads (``entry`` /
``level_state`` for the memory calls, ``tdx_pt`` / ``tdx_owner`` /
``tdx_size`` for RECLAIM).  A rejected call changes nothing.  Every call is
recorded (:attr:`TdxModule.calls`).

Status codes
------------
The numeric values are the TDX module ABI's.  The merged kernel defines only
a few of them (``arch/x86/include/asm/shared/tdx_errno.h``: ``TDX_OPERAND_BUSY``,
``TDX_OPERAND_INVALID``, ``TDX_PAGE_METADATA_INCORRECT``, ``TDX_EPT_WALK_FAILED``,
``TDX_EPT_ENTRY_STATE_INCORRECT``, ``TDX_PREVIOUS_TLB_EPOCH_BUSY``,
``TDX_FLUSHVP_NOT_DONE``, the ``TDX_OPERAND_ID_*``); the others
(``TDX_GPA_RANGE_NOT_BLOCKED``, ``TDX_GPA_RANGE_ALREADY_BLOCKED``,
``TDX_TLB_TRACKING_NOT_DONE``, ``TDX_EPT_PAGE_NOT_FREE``,
``TDX_OP_STATE_INCORRECT``, ``TDX_LIFECYCLE_STATE_INCORRECT``,
``TDX_TD_ASSOCIATED_PAGES_EXIST``, ``TDX_OPERAND_BUSY_HOST_PRIORITY``) carry the
values of earlier TDX patch postings / the module's error table.  Which error
a TDX 1.5 module reports for a non-FREE target of AUG/ADD/SEPT.ADD is
``TDX_EPT_ENTRY_STATE_INCORRECT`` (a 1.0 module said ``TDX_EPT_ENTRY_NOT_FREE``);
the model follows 1.5, as the reference does (§9.3).

Module rules modelled (TDX-module semantics, reference §7.3, §9)
---------------------------------------------------------------
* The S-EPT of a TD with ``ept_levels`` levels has entries at TDX levels
  ``ept_levels-1`` (root table, owned by the TD) down to 0 (4K).  An entry at
  level L covers ``4K << 9L`` bytes; its parent is the entry at L+1 covering
  it.  A walk descends only through ``NL_MAPPED`` entries; a walk that cannot
  reach the requested level fails with ``TDX_EPT_WALK_FAILED`` (out-registers:
  the entry and level where it stopped).
* SEPT.ADD (levels 1..ept_levels-1), PAGE.AUG (levels 0..1) and PAGE.ADD (4K)
  need a FREE target entry and a host page that no TD owns
  (``TDX_PAGE_METADATA_INCORRECT`` otherwise: not reclaimed, or another TD's).
  PAGE.ADD only before FINALIZE, PAGE.AUG only after it
  (``TDX_OP_STATE_INCORRECT``; the AUG rule is the 1.5 module's op-state
  table as far as we know -- UNVERIFIED).
* RANGE.BLOCK: MAPPED → BLOCKED, PENDING → PENDING_BLOCKED, NL_MAPPED →
  NL_BLOCKED, remembering the TD epoch at blocking (``bepoch``); a FREE entry
  is ``TDX_EPT_ENTRY_STATE_INCORRECT`` (Gen A KVM relies on that for its
  "premapped" pages); an already blocked one ``TDX_GPA_RANGE_ALREADY_BLOCKED``.
* TRACK increments the TD epoch, refused with ``TDX_PREVIOUS_TLB_EPOCH_BUSY``
  while a vCPU still runs in guest mode with an epoch older than the current
  one.  A blocked entry is *TLB-tracked* once the epoch advanced twice since
  the block, or once with no vCPU left in guest mode on the block epoch.
* PAGE.REMOVE / SEPT.REMOVE of a RUNNABLE TD need the entry blocked
  (``TDX_GPA_RANGE_NOT_BLOCKED``) and TLB-tracked (``TDX_TLB_TRACKING_NOT_DONE``);
  before FINALIZE no vCPU ever ran, and neither is required.  SEPT.REMOVE
  also needs every entry of the table FREE (``TDX_EPT_PAGE_NOT_FREE``).  A
  removed page is free in the PAMT but still cached under the TD's HKID until
  ``tdh_phymem_page_wbinvd_hkid``.
* Model choices where the module source was not read (UNVERIFIED): PAGE.REMOVE
  of a PENDING page needs BLOCK + TRACK like a MAPPED one; PAGE.ADD refuses a
  source page that some TD owns (``TDX_OPERAND_INVALID`` on R9); VP.CREATE
  after FINALIZE is ``TDX_OP_STATE_INCORRECT``; MR.FINALIZE twice is
  ``TDX_OP_STATE_INCORRECT``.
* RECLAIM only after the HKID is freed (``tdh_mng_key_freeid``, refused with
  ``TDX_FLUSHVP_NOT_DONE`` while a vCPU is in guest mode); the TDR last
  (``TDX_TD_ASSOCIATED_PAGES_EXIST``).
* Locks are try-locks: contention is ``TDX_OPERAND_BUSY`` (operand id
  ``SEPT`` for the S-EPT tree lock, ``TD_EPOCH`` for TRACK), see Fault injection.

Not modelled: TDCS/TDCX pages, KEY.CONFIG/ADDCX/MNG.INIT (folded into
``tdh_mng_create``), MR.EXTEND/measurement, DEMOTE/PROMOTE, the guest's
ACCEPT other than as :meth:`TdxModule.tdg_mem_page_accept`, live migration
states, the exact bit layout of the S-EPT entry the module reports (the model
reports ``pfn << 12 | RWX`` for present entries, RWX = 0 for blocked and
pending ones, bit 7 for a leaf above 4K, and the suppress-#VE bit 63 for a
FREE entry -- what KVM inspects: ``is_last_spte(entry)`` and the RWX bits).
The numeric state in ``level_state`` bits 15:8 follows :class:`SeptState`
(order as the ABI lists the states; UNVERIFIED).

Fault injection
---------------
:meth:`TdxModule.inject_busy` makes chosen calls return ``TDX_OPERAND_BUSY``
(by global call index, by wrapper name for the next N calls, or with a
probability from a seeded RNG) before anything is checked or changed.
:meth:`TdxModule.contend` models §8.3's contenders: a vCPU in guest mode
holding the S-EPT tree lock (zero-step mitigation in VP.ENTER, a guest
TDCALL such as ACCEPT) or the epoch lock (VP.ENTER against TRACK).  Every host
SEAMCALL needing that lock is BUSY until the vCPU leaves guest mode (which is
why KVM's single retry with all vCPUs kicked out succeeds: §8.2); in
*host-priority* mode the module instead makes the guest side yield after the
first host BUSY (the guest's TDCALL sees ``TDX_OPERAND_BUSY_HOST_PRIORITY``,
recorded in the log), so the host's next attempt succeeds.

Code generations (mirror-tdx.md §0)
-----------------------------------
The SEAMCALL ABI (registers in, registers out, status codes) is the same for
both generations; what differs at the boundary is the kernel's C wrappers:

* ``era="v6.18"`` (Gen A, the modelled kernel): the wrappers take the TDX
  level (``int level`` = ``pg_level_to_tdx_sept_level(level)``, done by KVM)
  and ``struct page *`` for the guest page (a pfn here).
* ``era="genB"``: the wrappers take ``enum pg_level`` and convert it
  themselves, and pfns instead of pages for AUG/ADD/RECLAIM/WBINVD (read from
  the post-v6.18 header change; exact release UNVERIFIED).

So the only visible difference is the ``level`` argument: TDX level (0..4)
in v6.18, ``PG_LEVEL_*`` (1..5) in Gen B.  Everything else Gen A vs Gen B
(premap counting, PAGE.ADD inside ``set_external_spte``, ``tdh_do_no_vcpus``,
pinning) is KVM's side and belongs in the mirror MMU, not here.

The v6.18 hook prototypes, read from this machine's kernel BTF
(``/sys/kernel/btf/vmlinux``, 6.18.44; ``struct kvm_x86_ops`` members)::

    int (*link_external_spt)(struct kvm *, gfn_t, enum pg_level, void *);
    int (*set_external_spte)(struct kvm *, gfn_t, enum pg_level, kvm_pfn_t);
    int (*free_external_spt)(struct kvm *, gfn_t, enum pg_level, void *);
    int (*remove_external_spte)(struct kvm *, gfn_t, enum pg_level, kvm_pfn_t);

(Gen A: ``set_external_spte`` takes the pfn, ``remove_external_spte``
returns int.)  The host kernel is built without ``CONFIG_INTEL_TDX_HOST``:
its BTF has no ``tdh_*`` or ``tdx_*`` functions, so the wrapper prototypes
above come from the kernel source, not BTF.

Design note: wiring the mirror root of ``TdpMmu`` (kvmmmu/tdp_mmu.py)
--------------------------------------------------------------------
One ``TdxModule`` per host, one ``TdHandle`` per TDX VM (``tdh_mng_create``
at ``KVM_TDX_INIT_VM``; keep the HKID in the VM).  The TDX backend implements
the four ``kvm_x86_ops`` hooks over this module as tdx.c does (§4, §7.2):

* ``link_external_spt(kvm, gfn, level, external_spt)`` →
  ``tdh_mem_sept_add(td, gfn << 12, level - 1, external_spt_pfn)``;
  ``res.busy`` → ``-EBUSY`` (mirror SPTE un-frozen, ``RET_PF_RETRY``), other
  non-zero → ``KVM_BUG_ON``, ``-EIO``.  ``external_spt_pfn`` is the host pfn of
  the page taken from ``mmu_external_spt_cache`` (allocate it from the host
  model; never reuse one that was not reclaimed: the module refuses).
* ``set_external_spte(kvm, gfn, level, pfn)`` (v6.18): TD RUNNABLE →
  ``tdh_mem_page_aug(td, gfn << 12, 0, pfn)``; before FINALIZE count the page
  as premapped, and ``tdx_gmem_post_populate`` later calls
  ``tdh_mem_page_add(td, gpa, pfn, src_pfn)``; ``tdh_mr_finalize`` at
  ``KVM_TDX_FINALIZE_VM`` once the count is 0.
* ``remove_external_spte(kvm, gfn, level, pfn)`` (W held): BLOCK
  (``tdh_mem_range_block(td, gpa, 0)``) → if RUNNABLE ``tdh_mem_track(td)`` and
  kick every vCPU out of guest mode (``td_exit`` for each vCPU in guest mode)
  → ``tdh_mem_page_remove(td, gpa, 0)`` → ``tdh_phymem_page_wbinvd_hkid(hkid,
  pfn)``; a BUSY on BLOCK/TRACK/REMOVE gets one retry with all vCPUs kicked out
  and kept out; Gen A: a BLOCK of a premapped page returns
  ``TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX`` with a non-present
  entry, which KVM takes as "drop the premap count".
* ``free_external_spt(kvm, gfn, level, external_spt)``: only after
  ``tdh_mng_key_freeid`` → ``tdh_phymem_page_reclaim(external_spt_pfn)``.
* Checking: after every step call :meth:`TdxModule.audit` (the module's own
  invariants) and compare :meth:`TdxModule.sept_snapshot` with the mirror
  root (invariants M1-M4 of mirror-tdx.md §12: every present mirror leaf has
  an S-EPT leaf at ``(0, gfn << 12)`` with the same pfn, and vice versa).

Thread safety: a ``TdxModule`` may be shared between threads; every call is
serialized by an internal lock.  Contention BUSY is modelled explicitly
(injection, :meth:`TdxModule.contend`), not by racing threads.
"""
from __future__ import annotations

import collections
import enum
import random
import threading
from dataclasses import dataclass
from typing import NamedTuple

from kvmmmu._core._checks import ArgumentRangeError, int_arg
from kvmmmu._core.defs import PAGE_SHIFT, PG_LEVEL_4K

__all__ = [
    "STATUS", "TDX_SUCCESS", "SeamcallResult", "SeamcallRecord", "SeptState",
    "PageType", "TdHandle", "TdxModule", "status_name", "tdx_operand_busy",
]

# ---------------------------------------------------------------------------
# Status codes (RAX).  Bits 63:32 are the status class and code; bits 31:0
# carry the operand id (and details).  TDX_SEAMCALL_STATUS_MASK selects the
# status proper.
# ---------------------------------------------------------------------------
TDX_SUCCESS = 0
TDX_SEAMCALL_STATUS_MASK = 0xFFFFFFFF00000000

TDX_OPERAND_INVALID = 0xC000010000000000
TDX_OPERAND_BUSY = 0x8000020000000000
TDX_PREVIOUS_TLB_EPOCH_BUSY = 0x8000020100000000
TDX_OPERAND_BUSY_HOST_PRIORITY = 0x8000020400000000
TDX_PAGE_METADATA_INCORRECT = 0xC000030000000000
TDX_TD_ASSOCIATED_PAGES_EXIST = 0xC000040000000000
TDX_LIFECYCLE_STATE_INCORRECT = 0xC000060700000000
TDX_OP_STATE_INCORRECT = 0xC000060800000000
TDX_VCPU_STATE_INCORRECT = 0xC000070000000000
TDX_FLUSHVP_NOT_DONE = 0x8000082400000000
TDX_EPT_WALK_FAILED = 0xC0000B0000000000
TDX_EPT_ENTRY_FREE = 0xC0000B0100000000
TDX_EPT_ENTRY_NOT_FREE = 0xC0000B0200000000
TDX_EPT_ENTRY_NOT_PRESENT = 0xC0000B0300000000
TDX_EPT_ENTRY_NOT_LEAF = 0xC0000B0400000000
TDX_EPT_ENTRY_LEAF = 0xC0000B0500000000
TDX_GPA_RANGE_NOT_BLOCKED = 0xC0000B0600000000
TDX_GPA_RANGE_ALREADY_BLOCKED = 0x00000B0700000000
TDX_TLB_TRACKING_NOT_DONE = 0xC0000B0800000000
TDX_EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
TDX_EPT_PAGE_NOT_FREE = 0xC0000B0E00000000

# name -> value of every status the model returns or names
STATUS = {n: globals()[n] for n in (
    "TDX_SUCCESS",
    "TDX_OPERAND_INVALID",
    "TDX_OPERAND_BUSY",
    "TDX_PREVIOUS_TLB_EPOCH_BUSY",
    "TDX_OPERAND_BUSY_HOST_PRIORITY",
    "TDX_PAGE_METADATA_INCORRECT",
    "TDX_TD_ASSOCIATED_PAGES_EXIST",
    "TDX_LIFECYCLE_STATE_INCORRECT",
    "TDX_OP_STATE_INCORRECT",
    "TDX_VCPU_STATE_INCORRECT",
    "TDX_FLUSHVP_NOT_DONE",
    "TDX_EPT_WALK_FAILED",
    "TDX_EPT_ENTRY_FREE",
    "TDX_EPT_ENTRY_NOT_FREE",
    "TDX_EPT_ENTRY_NOT_PRESENT",
    "TDX_EPT_ENTRY_NOT_LEAF",
    "TDX_EPT_ENTRY_LEAF",
    "TDX_GPA_RANGE_NOT_BLOCKED",
    "TDX_GPA_RANGE_ALREADY_BLOCKED",
    "TDX_TLB_TRACKING_NOT_DONE",
    "TDX_EPT_ENTRY_STATE_INCORRECT",
    "TDX_EPT_PAGE_NOT_FREE",
)}
_NAME_OF = {v: k for k, v in STATUS.items()}

# Operand ids (bits 31:0 of an error status).
TDX_OPERAND_ID_RCX = 0x01
TDX_OPERAND_ID_RDX = 0x02
TDX_OPERAND_ID_R8 = 0x08
TDX_OPERAND_ID_R9 = 0x09
TDX_OPERAND_ID_TDR = 0x80
TDX_OPERAND_ID_SEPT = 0x92
TDX_OPERAND_ID_TD_EPOCH = 0xA9

_MAX_PA_BITS = 52
_MAX_PFN = (1 << (_MAX_PA_BITS - PAGE_SHIFT)) - 1
_SVE_BIT = 1 << 63                  # suppress-#VE, set in a FREE entry
_RWX = 0x7
_PS_BIT = 1 << 7


def status_name(status):
    """The module's name of ``status`` (operand id ignored), e.g.
    ``"TDX_EPT_WALK_FAILED"``; ``hex`` for a code the model does not know."""
    status = int(status)
    if status & TDX_SEAMCALL_STATUS_MASK == 0:
        return "TDX_SUCCESS" if status == 0 else hex(status)
    return _NAME_OF.get(status & TDX_SEAMCALL_STATUS_MASK, hex(status))


def tdx_operand_busy(status):
    """KVM's ``tdx_operand_busy()``: the status proper is TDX_OPERAND_BUSY."""
    return (int(status) & TDX_SEAMCALL_STATUS_MASK) == TDX_OPERAND_BUSY


class SeptState(enum.IntEnum):
    """S-EPT entry states used by KVM's flows (reference §9.1)."""
    FREE = 0
    BLOCKED = 1
    PENDING = 2
    PENDING_BLOCKED = 3
    MAPPED = 4
    NL_MAPPED = 5
    NL_BLOCKED = 6


_LEAF_STATES = frozenset({SeptState.MAPPED, SeptState.PENDING,
                          SeptState.BLOCKED, SeptState.PENDING_BLOCKED})
_NL_STATES = frozenset({SeptState.NL_MAPPED, SeptState.NL_BLOCKED})
_BLOCKED_STATES = frozenset({SeptState.BLOCKED, SeptState.PENDING_BLOCKED,
                             SeptState.NL_BLOCKED})
_BLOCK_TO = {SeptState.MAPPED: SeptState.BLOCKED,
             SeptState.PENDING: SeptState.PENDING_BLOCKED,
             SeptState.NL_MAPPED: SeptState.NL_BLOCKED}
_UNBLOCK_TO = {v: k for k, v in _BLOCK_TO.items()}


class PageType(enum.IntEnum):
    """PAMT page type of a host 4K page (the module's PT_* values)."""
    PT_NDA = 0          # not assigned to any TD
    PT_RSVD = 1
    PT_REG = 3          # a TD private page
    PT_TDR = 4
    PT_TDCX = 5
    PT_TDVPR = 6
    PT_EPT = 8          # an S-EPT page


class SeamcallResult(NamedTuple):
    """A SEAMCALL's status (RAX) and the out-registers KVM reads.

    ``entry`` / ``level_state`` are ``ext_err1`` / ``ext_err2`` of the memory
    calls (RCX, RDX); ``tdx_pt`` / ``tdx_owner`` / ``tdx_size`` those of RECLAIM
    (RCX, RDX, R8)."""
    status: int
    rcx: int = 0
    rdx: int = 0
    r8: int = 0

    @property
    def name(self):
        return status_name(self.status)

    def __repr__(self):
        return (f"SeamcallResult({self.name}|{self.status & 0xFFFFFFFF:#x}, "
                f"rcx={self.rcx:#x}, rdx={self.rdx:#x}, r8={self.r8:#x})")

    @property
    def ok(self):
        return self.status == TDX_SUCCESS

    @property
    def busy(self):
        return tdx_operand_busy(self.status)

    entry = property(lambda self: self.rcx)
    level_state = property(lambda self: self.rdx)
    tdx_pt = property(lambda self: self.rcx)
    tdx_owner = property(lambda self: self.rdx)
    tdx_size = property(lambda self: self.r8)


@dataclass(frozen=True)
class SeamcallRecord:
    """One logged call: global index, wrapper name, arguments, status."""
    index: int
    name: str
    td: int | None
    args: tuple
    status: int

    @property
    def status_name(self):
        return status_name(self.status)


class TdHandle:
    """Opaque handle of one TD (the kernel's ``struct tdx_td``): names the TD
    by its TDR page.  Carries no state the MMU could read."""
    __slots__ = ("_tdr_pfn", "_module")

    def __init__(self, module, tdr_pfn):
        self._module = module
        self._tdr_pfn = tdr_pfn

    @property
    def tdr_pfn(self):
        return self._tdr_pfn

    def __repr__(self):
        return f"TdHandle(tdr_pfn={self._tdr_pfn:#x})"


class _Entry:
    __slots__ = ("state", "pfn", "bepoch", "nchildren")

    def __init__(self, state, pfn, bepoch=None):
        self.state = state
        self.pfn = pfn
        self.bepoch = bepoch
        self.nchildren = 0


class _Vcpu:
    __slots__ = ("in_guest", "epoch")

    def __init__(self):
        self.in_guest = False
        self.epoch = None


class _Td:
    """The module's private per-TD state (TDR + TDCS + S-EPT)."""

    def __init__(self, handle, hkid, ept_levels):
        self.handle = handle
        self.hkid = hkid
        self.ept_levels = ept_levels
        self.gpaw = 52 if ept_levels == 5 else 48
        self.finalized = False          # op_state RUNNABLE after MR.FINALIZE
        self.teardown = False           # HKID freed: only RECLAIM is left
        self.epoch = 1
        self.max_epoch_seen = 1
        self.sept: dict[tuple[int, int], _Entry] = {}
        self.vcpus: dict[int, _Vcpu] = {}       # tdvpr pfn -> vCPU
        self.nr_added = 0               # pages PAGE.ADDed (measured image)
        self.contention = None          # (lock, vcpu, host_priority) or None


def _cover_shift(tdx_level):
    return PAGE_SHIFT + 9 * tdx_level


# (the walk's per-level constants, out of the enum and the function call)
_NL_MAPPED = SeptState.NL_MAPPED
_SHIFT = tuple(_cover_shift(k) for k in range(6))


class TdxModule:
    """The TDX module of one host, with any number of TDs.

    Parameters
    ----------
    era : {"v6.18", "genB"}
        Which kernel's wrapper convention the ``level`` arguments follow (see
        the module docstring): the TDX level (v6.18) or ``enum pg_level``.
    """

    ERAS = ("v6.18", "genB")
    SEPT_LOCKED = frozenset({
        "tdh_mem_sept_add", "tdh_mem_page_aug", "tdh_mem_page_add",
        "tdh_mem_range_block", "tdh_mem_range_unblock", "tdh_mem_page_remove",
        "tdh_mem_sept_remove"})
    EPOCH_LOCKED = frozenset({"tdh_mem_track"})

    def __init__(self, *, era="v6.18", log_limit=None):
        """`log_limit`: keep only the last that many calls in :attr:`calls`
        (None: all; a 64 GiB TD makes tens of millions)."""
        if not isinstance(era, str):
            raise TypeError(f"era must be a str, not {type(era).__name__}")
        if era not in self.ERAS:
            raise ValueError(f"era must be one of {self.ERAS}, not {era!r}")
        if log_limit is not None:
            log_limit = int_arg("log_limit", log_limit, 0, 1 << 62)
        self.era = era
        self._lock = threading.RLock()
        self._tds: dict[int, _Td] = {}                  # tdr pfn -> TD
        self._pamt: dict[int, tuple[int, PageType]] = {}  # pfn -> (tdr pfn, type)
        self._cached: dict[int, int] = {}               # pfn -> hkid (needs WBINVD)
        self._hkids: set[int] = set()
        self._log = collections.deque(maxlen=log_limit)
        self._ncalls = 0                                # calls made (the next index)
        self._busy_at: set[int] = set()
        self._busy_names: dict[str, int] = {}
        self._busy_prob = 0.0
        self._busy_prob_names = None
        self._rng = random.Random(0)

    # ------------------------------------------------------------------
    # argument checks (Python errors, never module statuses)
    # ------------------------------------------------------------------
    def _td(self, td):
        if not isinstance(td, TdHandle):
            raise TypeError(f"td must be a TdHandle, not {type(td).__name__}")
        if td._module is not self or td._tdr_pfn not in self._tds:
            raise ValueError(f"td {td!r} does not belong to this TdxModule "
                             "(or its TDR was reclaimed)")
        return self._tds[td._tdr_pfn]

    @staticmethod
    def _gpa(gpa):
        g = int_arg("gpa", gpa, 0, (1 << _MAX_PA_BITS) - 1)
        if g & ((1 << PAGE_SHIFT) - 1):
            raise ArgumentRangeError(f"gpa={g:#x} is not 4K-aligned (bits 11:0 "
                                     "of RCX hold the level)")
        return g

    @staticmethod
    def _pfn(name, pfn):
        return int_arg(name, pfn, 0, _MAX_PFN)

    def _level(self, level):
        """The TDX level from the wrapper's ``level`` argument."""
        if self.era == "v6.18":
            return int_arg("level", level, 0, 4)
        return int_arg("level", level, PG_LEVEL_4K, PG_LEVEL_4K + 4) - PG_LEVEL_4K

    # ------------------------------------------------------------------
    # fault injection
    # ------------------------------------------------------------------
    def inject_busy(self, *, call_index=None, name=None, times=1,
                    probability=None, seed=None, names=None):
        """Make chosen calls return TDX_OPERAND_BUSY with no state change.

        ``call_index``: the call that will get that index in :attr:`calls`.
        ``name`` (+ ``times``): the next ``times`` calls of that wrapper.
        ``probability`` (+ ``seed``, optional ``names`` to restrict it): each
        call independently, from a ``random.Random(seed)``.
        """
        with self._lock:
            if call_index is not None:
                self._busy_at.add(int_arg("call_index", call_index, 0, 1 << 62))
            if name is not None:
                self._check_wrapper("name", name)
                self._busy_names[name] = (self._busy_names.get(name, 0)
                                          + int_arg("times", times, 1, 1 << 62))
            if probability is not None:
                if isinstance(probability, bool) or not isinstance(probability, (int, float)):
                    raise TypeError("probability must be a float, not "
                                    f"{type(probability).__name__}")
                if not 0.0 <= probability <= 1.0:
                    raise ValueError(f"probability={probability} is outside 0..1")
                if names is not None:
                    names = frozenset(names)
                    for n in names:
                        self._check_wrapper("names", n)
                self._busy_prob = float(probability)
                self._busy_prob_names = names
                self._rng = random.Random(seed)

    def clear_injections(self):
        with self._lock:
            self._busy_at.clear()
            self._busy_names.clear()
            self._busy_prob = 0.0
            self._busy_prob_names = None

    def contend(self, td, vcpu, *, lock="sept", host_priority=False):
        """vCPU ``vcpu`` (in guest mode) takes the TD's S-EPT tree lock
        (``lock="sept"``: zero-step mitigation in VP.ENTER, a guest TDCALL) or
        its epoch lock (``"epoch"``: VP.ENTER against TRACK).  Host SEAMCALLs
        needing that lock get TDX_OPERAND_BUSY until the vCPU exits guest
        mode; with ``host_priority`` the guest yields after the first such
        BUSY."""
        with self._lock:
            t = self._td(td)
            v = self._vcpu(t, vcpu)
            if lock not in ("sept", "epoch"):
                raise ValueError(f"lock must be 'sept' or 'epoch', not {lock!r}")
            if not isinstance(host_priority, bool):
                raise TypeError("host_priority must be a bool")
            if not t.vcpus[v].in_guest:
                raise ValueError(f"vcpu {v:#x} is not in guest mode: it cannot hold a lock")
            t.contention = (lock, v, host_priority)

    def _check_wrapper(self, argname, name):
        if not isinstance(name, str):
            raise TypeError(f"{argname} must be a str, not {type(name).__name__}")
        if not name.startswith("tdh_") or not callable(getattr(self, name, None)):
            raise ValueError(f"{argname}={name!r} is not a SEAMCALL wrapper of this model")

    def _injected_busy(self, name, t):
        """The BUSY status to return for this call, or None."""
        idx = self._ncalls
        opid = (TDX_OPERAND_ID_TD_EPOCH if name in self.EPOCH_LOCKED
                else TDX_OPERAND_ID_SEPT if name in self.SEPT_LOCKED
                else TDX_OPERAND_ID_RCX)
        busy = TDX_OPERAND_BUSY | opid
        if idx in self._busy_at:
            self._busy_at.discard(idx)
            return busy
        if self._busy_names.get(name):
            self._busy_names[name] -= 1
            if not self._busy_names[name]:
                del self._busy_names[name]
            return busy
        if self._busy_prob and (self._busy_prob_names is None or name in self._busy_prob_names):
            if self._rng.random() < self._busy_prob:
                return busy
        if t is not None and t.contention is not None:
            lock, v, prio = t.contention
            if (lock == "sept" and name in self.SEPT_LOCKED) or \
               (lock == "epoch" and name in self.EPOCH_LOCKED):
                if prio:
                    t.contention = None
                    self._record("tdg_host_priority_yield", t, (v,),
                                 TDX_OPERAND_BUSY_HOST_PRIORITY)
                return busy
        return None

    # ------------------------------------------------------------------
    # logging
    # ------------------------------------------------------------------
    def _record(self, name, t, args, status):
        self._log.append(SeamcallRecord(self._ncalls, name,
                                        None if t is None else t.handle.tdr_pfn,
                                        tuple(args), status))
        self._ncalls += 1

    def _ret(self, name, t, args, status, rcx=0, rdx=0, r8=0):
        self._record(name, t, args, status)
        return SeamcallResult(status, rcx, rdx, r8)

    @property
    def calls(self):
        """Every call so far, oldest first (a tuple of :class:`SeamcallRecord`)."""
        with self._lock:
            return tuple(self._log)

    def calls_named(self, name):
        with self._lock:
            return tuple(r for r in self._log if r.name == name)

    # ------------------------------------------------------------------
    # S-EPT helpers
    # ------------------------------------------------------------------
    @staticmethod
    def _arch_entry(e, level):
        if e is None or e.state == SeptState.FREE:
            return _SVE_BIT
        v = e.pfn << PAGE_SHIFT
        if e.state in (SeptState.MAPPED, SeptState.NL_MAPPED):
            v |= _RWX
        if e.state in _LEAF_STATES and level > 0:
            v |= _PS_BIT
        return v

    def _details(self, e, level):
        state = SeptState.FREE if e is None else e.state
        return self._arch_entry(e, level), level | (int(state) << 8)

    def _walk(self, t, gpa, level):
        """Walk to the entry at ``level`` covering gpa: (True, entry-or-None)
        or (False, (stop level, entry))."""
        sept = t.sept
        for k in range(t.ept_levels - 1, level, -1):
            s = _SHIFT[k]
            e = sept.get((k, gpa >> s << s))
            if e is None or e.state is not _NL_MAPPED:
                return False, (k, e)
        return True, sept.get((level, gpa))

    def _gpa_invalid(self, t, gpa, level):
        """OPERAND_INVALID reasons the module checks on (gpa, level)."""
        if gpa >> t.gpaw:
            return True             # beyond the TD's GPAW
        if gpa >> (t.gpaw - 1) & 1:
            return True             # shared GPA: no S-EPT for it
        return bool(gpa & ((1 << _cover_shift(level)) - 1))

    def _parent(self, t, level, gpa):
        if level + 1 >= t.ept_levels:
            return None
        s = _SHIFT[level + 1]
        return t.sept.get((level + 1, gpa >> s << s))

    def _set(self, t, level, gpa, entry):
        t.sept[(level, gpa)] = entry
        p = self._parent(t, level, gpa)
        if p is not None:
            p.nchildren += 1

    def _free(self, t, level, gpa):
        del t.sept[(level, gpa)]
        p = self._parent(t, level, gpa)
        if p is not None:
            p.nchildren -= 1

    def _tracked(self, t, bepoch):
        if bepoch + 1 < t.epoch:
            return True
        return bepoch + 1 == t.epoch and not any(
            v.in_guest and v.epoch == bepoch for v in t.vcpus.values())

    def _page_free(self, pfn):
        return pfn not in self._pamt

    # ------------------------------------------------------------------
    # TD and vCPU life cycle
    # ------------------------------------------------------------------
    def tdh_mng_create(self, tdr_pfn, hkid, *, ept_levels=4):
        """Create a TD whose TDR is host page ``tdr_pfn`` with private key
        ``hkid`` (folds in KEY.CONFIG, ADDCX and MNG.INIT).  Returns
        ``(SeamcallResult, TdHandle or None)``."""
        with self._lock:
            tdr = self._pfn("tdr_pfn", tdr_pfn)
            h = int_arg("hkid", hkid, 1, 0xFFFF)
            lv = int_arg("ept_levels", ept_levels, 4, 5)
            args = (tdr, h, lv)
            busy = self._injected_busy("tdh_mng_create", None)
            if busy is not None:
                return self._ret("tdh_mng_create", None, args, busy), None
            if not self._page_free(tdr):
                return self._ret("tdh_mng_create", None, args,
                                 TDX_PAGE_METADATA_INCORRECT | TDX_OPERAND_ID_RCX), None
            if h in self._hkids:
                return self._ret("tdh_mng_create", None, args,
                                 TDX_OPERAND_INVALID | TDX_OPERAND_ID_RDX), None
            handle = TdHandle(self, tdr)
            t = _Td(handle, h, lv)
            self._tds[tdr] = t
            self._hkids.add(h)
            self._pamt[tdr] = (tdr, PageType.PT_TDR)
            self._cached.pop(tdr, None)
            return self._ret("tdh_mng_create", t, args, TDX_SUCCESS), handle

    def _vcpu(self, t, vcpu):
        v = self._pfn("vcpu", vcpu)
        if v not in t.vcpus:
            raise ValueError(f"vcpu={v:#x} is not a vCPU (TDVPR) of this TD")
        return v

    def tdh_vp_create(self, td, tdvpr_pfn):
        """Add a vCPU whose TDVPR is host page ``tdvpr_pfn``; the pfn names
        the vCPU from then on."""
        with self._lock:
            t = self._td(td)
            v = self._pfn("tdvpr_pfn", tdvpr_pfn)
            busy = self._injected_busy("tdh_vp_create", t)
            if busy is not None:
                return self._ret("tdh_vp_create", t, (v,), busy)
            if t.teardown:
                return self._ret("tdh_vp_create", t, (v,),
                                 TDX_LIFECYCLE_STATE_INCORRECT | TDX_OPERAND_ID_TDR)
            if t.finalized:
                return self._ret("tdh_vp_create", t, (v,),
                                 TDX_OP_STATE_INCORRECT | TDX_OPERAND_ID_TDR)
            if not self._page_free(v):
                return self._ret("tdh_vp_create", t, (v,),
                                 TDX_PAGE_METADATA_INCORRECT | TDX_OPERAND_ID_RCX)
            t.vcpus[v] = _Vcpu()
            self._pamt[v] = (t.handle.tdr_pfn, PageType.PT_TDVPR)
            self._cached.pop(v, None)
            return self._ret("tdh_vp_create", t, (v,), TDX_SUCCESS)

    def tdh_vp_enter(self, td, vcpu):
        """TD entry of ``vcpu``: it runs in guest mode with the current epoch
        (the module flushes its private TLB if it last ran on an older one).
        Only a RUNNABLE TD runs."""
        with self._lock:
            t = self._td(td)
            v = self._vcpu(t, vcpu)
            busy = self._injected_busy("tdh_vp_enter", t)
            if busy is not None:
                return self._ret("tdh_vp_enter", t, (v,), busy)
            if t.teardown:
                return self._ret("tdh_vp_enter", t, (v,),
                                 TDX_LIFECYCLE_STATE_INCORRECT | TDX_OPERAND_ID_TDR)
            if not t.finalized:
                return self._ret("tdh_vp_enter", t, (v,),
                                 TDX_OP_STATE_INCORRECT | TDX_OPERAND_ID_TDR)
            if t.vcpus[v].in_guest:
                return self._ret("tdh_vp_enter", t, (v,),
                                 TDX_VCPU_STATE_INCORRECT | TDX_OPERAND_ID_RCX)
            t.vcpus[v].in_guest = True
            t.vcpus[v].epoch = t.epoch
            return self._ret("tdh_vp_enter", t, (v,), TDX_SUCCESS)

    def td_exit(self, td, vcpu):
        """A TD exit of ``vcpu`` (not a SEAMCALL: it ends VP.ENTER).  Raises
        ValueError if the vCPU is not in guest mode.  Releases any lock the
        vCPU held (:meth:`contend`)."""
        with self._lock:
            t = self._td(td)
            v = self._vcpu(t, vcpu)
            if not t.vcpus[v].in_guest:
                raise ValueError(f"vcpu={v:#x} is not in guest mode")
            t.vcpus[v].in_guest = False
            if t.contention is not None and t.contention[1] == v:
                t.contention = None
            self._record("td_exit", t, (v,), TDX_SUCCESS)

    def vcpus_in_guest(self, td):
        """The vCPUs (TDVPR pfns) now in guest mode: what KVM's
        ``kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE)`` kicks."""
        with self._lock:
            t = self._td(td)
            return tuple(sorted(v for v, s in t.vcpus.items() if s.in_guest))

    def tdh_mr_finalize(self, td):
        """Finalize the measurement: the TD becomes RUNNABLE."""
        with self._lock:
            t = self._td(td)
            busy = self._injected_busy("tdh_mr_finalize", t)
            if busy is not None:
                return self._ret("tdh_mr_finalize", t, (), busy)
            if t.teardown:
                return self._ret("tdh_mr_finalize", t, (),
                                 TDX_LIFECYCLE_STATE_INCORRECT | TDX_OPERAND_ID_TDR)
            if t.finalized:
                return self._ret("tdh_mr_finalize", t, (),
                                 TDX_OP_STATE_INCORRECT | TDX_OPERAND_ID_TDR)
            t.finalized = True
            return self._ret("tdh_mr_finalize", t, (), TDX_SUCCESS)

    def tdh_mng_key_freeid(self, td):
        """Release the TD's HKID (after VP.FLUSH of every vCPU, VPFLUSHDONE
        and PHYMEM.CACHE.WB, folded in here): the TD enters teardown, where
        only RECLAIM is possible."""
        with self._lock:
            t = self._td(td)
            busy = self._injected_busy("tdh_mng_key_freeid", t)
            if busy is not None:
                return self._ret("tdh_mng_key_freeid", t, (), busy)
            if t.teardown:
                return self._ret("tdh_mng_key_freeid", t, (),
                                 TDX_LIFECYCLE_STATE_INCORRECT | TDX_OPERAND_ID_TDR)
            if any(v.in_guest for v in t.vcpus.values()):
                return self._ret("tdh_mng_key_freeid", t, (),
                                 TDX_FLUSHVP_NOT_DONE)
            t.teardown = True
            t.contention = None
            self._hkids.discard(t.hkid)
            # CACHE.WB wrote back everything cached under the HKID
            for pfn in [p for p, k in self._cached.items() if k == t.hkid]:
                del self._cached[pfn]
            return self._ret("tdh_mng_key_freeid", t, (), TDX_SUCCESS)

    # ------------------------------------------------------------------
    # S-EPT SEAMCALLs
    # ------------------------------------------------------------------
    def _mem_prologue(self, name, td, gpa, level):
        """Python argument checks shared by the memory calls: (t, gpa,
        tdx level)."""
        t = self._td(td)
        g = self._gpa(gpa)
        lv = self._level(level)
        return t, g, lv

    def _live_checks(self, name, t, args):
        """Status for a TD that cannot take S-EPT changes now, or None."""
        busy = self._injected_busy(name, t)
        if busy is not None:
            return busy
        if t.teardown:
            return TDX_LIFECYCLE_STATE_INCORRECT | TDX_OPERAND_ID_TDR
        return None

    def _locate(self, name, t, args, g, lv, level_ok):
        """The front every S-EPT entry call shares, in the module's order: a
        TD that cannot take changes now (BUSY, teardown), an operand the
        call refuses (`level_ok` false, a bad gpa for `lv`), a walk that
        stops above `lv`.  Returns ``(result, None)`` to hand back at once,
        or ``(None, entry)``: the entry at `lv` (None when free)."""
        st = self._live_checks(name, t, args)
        if st is not None:
            return self._ret(name, t, args, st), None
        if not level_ok or self._gpa_invalid(t, g, lv):
            return self._ret(name, t, args, TDX_OPERAND_INVALID | TDX_OPERAND_ID_RCX), None
        ok, e = self._walk(t, g, lv)
        if not ok:
            return self._walk_fail(name, t, args, e), None
        return None, e

    def _walk_fail(self, name, t, args, stop):
        k, e = stop
        ent, ls = self._details(e, k)
        return self._ret(name, t, args, TDX_EPT_WALK_FAILED | TDX_OPERAND_ID_RCX, ent, ls)

    def tdh_mem_sept_add(self, td, gpa, level, page):
        """TDH.MEM.SEPT.ADD: make host page ``page`` (a pfn) the S-EPT page
        behind the entry at ``level`` covering ``gpa``."""
        name = "tdh_mem_sept_add"
        with self._lock:
            t, g, lv = self._mem_prologue(name, td, gpa, level)
            pfn = self._pfn("page", page)
            args = (g, lv, pfn)
            r, e = self._locate(name, t, args, g, lv, 1 <= lv < t.ept_levels)
            if r is not None:
                return r
            if e is not None:
                ent, ls = self._details(e, lv)
                return self._ret(name, t, args,
                                 TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX, ent, ls)
            if not self._page_free(pfn):
                return self._ret(name, t, args, TDX_PAGE_METADATA_INCORRECT | TDX_OPERAND_ID_R8)
            self._set(t, lv, g, _Entry(SeptState.NL_MAPPED, pfn))
            self._pamt[pfn] = (t.handle.tdr_pfn, PageType.PT_EPT)
            self._cached.pop(pfn, None)
            return self._ret(name, t, args, TDX_SUCCESS)

    def _map_leaf(self, name, t, g, lv, pfn, args, state):
        ok, e = self._walk(t, g, lv)
        if not ok:
            return self._walk_fail(name, t, args, e)
        if e is not None:
            ent, ls = self._details(e, lv)
            return self._ret(name, t, args,
                             TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX, ent, ls)
        npages = 1 << (9 * lv)
        if pfn & (npages - 1) or pfn + npages - 1 > _MAX_PFN:
            return self._ret(name, t, args, TDX_OPERAND_INVALID | TDX_OPERAND_ID_R8)
        pamt = self._pamt
        if (pfn in pamt) if npages == 1 else any(p in pamt for p in range(pfn, pfn + npages)):
            return self._ret(name, t, args, TDX_PAGE_METADATA_INCORRECT | TDX_OPERAND_ID_R8)
        self._set(t, lv, g, _Entry(state, pfn))
        owner = (t.handle.tdr_pfn, PageType.PT_REG)
        for p in range(pfn, pfn + npages):
            pamt[p] = owner
            self._cached.pop(p, None)
        return self._ret(name, t, args, TDX_SUCCESS)

    def tdh_mem_page_aug(self, td, gpa, level, page):
        """TDH.MEM.PAGE.AUG: map host page ``page`` (pfn) PENDING at ``gpa``
        (4K or 2M) in a RUNNABLE TD; the guest must accept it."""
        name = "tdh_mem_page_aug"
        with self._lock:
            t, g, lv = self._mem_prologue(name, td, gpa, level)
            pfn = self._pfn("page", page)
            args = (g, lv, pfn)
            st = self._live_checks(name, t, args)
            if st is not None:
                return self._ret(name, t, args, st)
            if not t.finalized:
                return self._ret(name, t, args, TDX_OP_STATE_INCORRECT | TDX_OPERAND_ID_TDR)
            if lv > 1 or self._gpa_invalid(t, g, lv):
                return self._ret(name, t, args, TDX_OPERAND_INVALID | TDX_OPERAND_ID_RCX)
            return self._map_leaf(name, t, g, lv, pfn, args, SeptState.PENDING)

    def tdh_mem_page_add(self, td, gpa, page, source):
        """TDH.MEM.PAGE.ADD: copy host page ``source`` into ``page`` (pfns) and
        map it MAPPED at 4K ``gpa``; only before FINALIZE."""
        name = "tdh_mem_page_add"
        with self._lock:
            t = self._td(td)
            g = self._gpa(gpa)
            pfn = self._pfn("page", page)
            src = self._pfn("source", source)
            args = (g, pfn, src)
            st = self._live_checks(name, t, args)
            if st is not None:
                return self._ret(name, t, args, st)
            if t.finalized:
                return self._ret(name, t, args, TDX_OP_STATE_INCORRECT | TDX_OPERAND_ID_TDR)
            if self._gpa_invalid(t, g, 0):
                return self._ret(name, t, args, TDX_OPERAND_INVALID | TDX_OPERAND_ID_RCX)
            if src in self._pamt or src == pfn:
                return self._ret(name, t, args, TDX_OPERAND_INVALID | TDX_OPERAND_ID_R9)
            r = self._map_leaf(name, t, g, 0, pfn, args, SeptState.MAPPED)
            if r.ok:
                t.nr_added += 1
            return r

    def tdg_mem_page_accept(self, td, vcpu, gpa):
        """The guest's TDG.MEM.PAGE.ACCEPT of a PENDING 4K page (run by a vCPU
        in guest mode): PENDING → MAPPED.  Returns the TDCALL status."""
        name = "tdg_mem_page_accept"
        with self._lock:
            t = self._td(td)
            v = self._vcpu(t, vcpu)
            g = self._gpa(gpa)
            args = (v, g)
            if not t.vcpus[v].in_guest:
                raise ValueError(f"vcpu={v:#x} is not in guest mode")
            if self._gpa_invalid(t, g, 0):
                return self._ret(name, t, args, TDX_OPERAND_INVALID | TDX_OPERAND_ID_RCX)
            ok, e = self._walk(t, g, 0)
            if not ok:
                return self._walk_fail(name, t, args, e)
            if e is None or e.state != SeptState.PENDING:
                ent, ls = self._details(e, 0)
                return self._ret(name, t, args,
                                 TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX, ent, ls)
            e.state = SeptState.MAPPED
            return self._ret(name, t, args, TDX_SUCCESS)

    def tdh_mem_range_block(self, td, gpa, level):
        """TDH.MEM.RANGE.BLOCK: no new TLB entries for the range of the entry
        at ``level`` covering ``gpa``; remembers the epoch."""
        name = "tdh_mem_range_block"
        with self._lock:
            t, g, lv = self._mem_prologue(name, td, gpa, level)
            args = (g, lv)
            r, e = self._locate(name, t, args, g, lv, lv < t.ept_levels)
            if r is not None:
                return r
            ent, ls = self._details(e, lv)
            if e is None:
                return self._ret(name, t, args,
                                 TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX, ent, ls)
            if e.state in _BLOCKED_STATES:
                return self._ret(name, t, args,
                                 TDX_GPA_RANGE_ALREADY_BLOCKED | TDX_OPERAND_ID_RCX, ent, ls)
            e.state = _BLOCK_TO[e.state]
            e.bepoch = t.epoch
            return self._ret(name, t, args, TDX_SUCCESS)

    def tdh_mem_range_unblock(self, td, gpa, level):
        """TDH.MEM.RANGE.UNBLOCK (KVM does not use it): back to the unblocked
        state, only once the block is TLB-tracked."""
        name = "tdh_mem_range_unblock"
        with self._lock:
            t, g, lv = self._mem_prologue(name, td, gpa, level)
            args = (g, lv)
            r, e = self._locate(name, t, args, g, lv, lv < t.ept_levels)
            if r is not None:
                return r
            ent, ls = self._details(e, lv)
            if e is None or e.state not in _BLOCKED_STATES:
                return self._ret(name, t, args,
                                 TDX_GPA_RANGE_NOT_BLOCKED | TDX_OPERAND_ID_RCX, ent, ls)
            if t.finalized and not self._tracked(t, e.bepoch):
                return self._ret(name, t, args,
                                 TDX_TLB_TRACKING_NOT_DONE | TDX_OPERAND_ID_SEPT, ent, ls)
            e.state = _UNBLOCK_TO[e.state]
            e.bepoch = None
            return self._ret(name, t, args, TDX_SUCCESS)

    def tdh_mem_track(self, td):
        """TDH.MEM.TRACK: advance the TD's TLB epoch; refused while a vCPU
        still runs in guest mode on an epoch older than the current one."""
        name = "tdh_mem_track"
        with self._lock:
            t = self._td(td)
            st = self._live_checks(name, t, ())
            if st is not None:
                return self._ret(name, t, (), st)
            if any(v.in_guest and v.epoch < t.epoch for v in t.vcpus.values()):
                return self._ret(name, t, (),
                                 TDX_PREVIOUS_TLB_EPOCH_BUSY | TDX_OPERAND_ID_TD_EPOCH)
            t.epoch += 1
            t.max_epoch_seen = max(t.max_epoch_seen, t.epoch)
            return self._ret(name, t, (), TDX_SUCCESS)

    def _removal_checks(self, name, t, args, e, lv, states):
        """What a removal needs of the entry `e` at `lv`: one of `states`
        (a leaf or a table), and, when the TD is RUNNABLE, blocked and
        TLB-tracked.  The refusal's result, or None."""
        ent, ls = self._details(e, lv)
        if e is None or e.state not in states:
            return self._ret(name, t, args,
                             TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX, ent, ls)
        if not t.finalized:
            return None
        if e.state not in _BLOCKED_STATES:
            return self._ret(name, t, args, TDX_GPA_RANGE_NOT_BLOCKED | TDX_OPERAND_ID_RCX, ent, ls)
        if not self._tracked(t, e.bepoch):
            return self._ret(name, t, args, TDX_TLB_TRACKING_NOT_DONE | TDX_OPERAND_ID_RCX, ent, ls)
        return None

    def tdh_mem_page_remove(self, td, gpa, level):
        """TDH.MEM.PAGE.REMOVE: unmap the private leaf at ``level`` covering
        ``gpa``.  The page leaves the TD but stays cached under its HKID."""
        name = "tdh_mem_page_remove"
        with self._lock:
            t, g, lv = self._mem_prologue(name, td, gpa, level)
            args = (g, lv)
            r, e = self._locate(name, t, args, g, lv, lv <= 1)
            if r is not None:
                return r
            r = self._removal_checks(name, t, args, e, lv, _LEAF_STATES)
            if r is not None:
                return r
            ent, ls = self._details(e, lv)
            self._free(t, lv, g)
            for p in range(e.pfn, e.pfn + (1 << (9 * lv))):
                del self._pamt[p]
                self._cached[p] = t.hkid
            return self._ret(name, t, args, TDX_SUCCESS, ent, ls)

    def tdh_mem_sept_remove(self, td, gpa, level):
        """TDH.MEM.SEPT.REMOVE (KVM never issues it): free the S-EPT page
        behind the entry at ``level``; every entry of that page must be FREE."""
        name = "tdh_mem_sept_remove"
        with self._lock:
            t, g, lv = self._mem_prologue(name, td, gpa, level)
            args = (g, lv)
            r, e = self._locate(name, t, args, g, lv, 1 <= lv < t.ept_levels)
            if r is not None:
                return r
            r = self._removal_checks(name, t, args, e, lv, _NL_STATES)
            if r is not None:
                return r
            if e.nchildren:
                ent, ls = self._details(e, lv)
                return self._ret(name, t, args, TDX_EPT_PAGE_NOT_FREE | TDX_OPERAND_ID_RCX, ent, ls)
            ent, ls = self._details(e, lv)
            self._free(t, lv, g)
            del self._pamt[e.pfn]
            self._cached[e.pfn] = t.hkid
            return self._ret(name, t, args, TDX_SUCCESS, ent, ls)

    # ------------------------------------------------------------------
    # physical pages
    # ------------------------------------------------------------------
    def tdh_phymem_page_wbinvd_hkid(self, hkid, page):
        """Write back and invalidate the cache lines of ``page`` (pfn) tagged
        with ``hkid``: after it the host may reuse a removed private page."""
        name = "tdh_phymem_page_wbinvd_hkid"
        with self._lock:
            h = int_arg("hkid", hkid, 0, 0xFFFF)
            pfn = self._pfn("page", page)
            busy = self._injected_busy(name, None)
            if busy is not None:
                return self._ret(name, None, (h, pfn), busy)
            if self._cached.get(pfn) == h:
                del self._cached[pfn]
            return self._ret(name, None, (h, pfn), TDX_SUCCESS)

    def tdh_phymem_page_reclaim(self, page):
        """TDH.PHYMEM.PAGE.RECLAIM of a page of a torn-down TD (HKID freed).
        Out-registers: page type, owner TDR address, size (0 = 4K)."""
        name = "tdh_phymem_page_reclaim"
        with self._lock:
            pfn = self._pfn("page", page)
            owner = self._pamt.get(pfn)
            t = None if owner is None else self._tds.get(owner[0])
            busy = self._injected_busy(name, t)
            if busy is not None:
                return self._ret(name, t, (pfn,), busy)
            if owner is None:
                return self._ret(name, None, (pfn,), TDX_PAGE_METADATA_INCORRECT | TDX_OPERAND_ID_RCX)
            tdr, ptype = owner
            if not t.teardown:
                return self._ret(name, t, (pfn,), TDX_LIFECYCLE_STATE_INCORRECT | TDX_OPERAND_ID_TDR)
            out = (int(ptype), tdr << PAGE_SHIFT, 0)
            if ptype == PageType.PT_TDR:
                if any(o[0] == tdr and p != tdr for p, o in self._pamt.items()):
                    return self._ret(name, t, (pfn,), TDX_TD_ASSOCIATED_PAGES_EXIST | TDX_OPERAND_ID_RCX)
                del self._pamt[pfn]
                del self._tds[tdr]
                return self._ret(name, t, (pfn,), TDX_SUCCESS, *out)
            if ptype == PageType.PT_EPT:
                self._drop_table(t, pfn)
            elif ptype == PageType.PT_REG:
                self._drop_leaf(t, pfn)
            elif ptype == PageType.PT_TDVPR:
                del t.vcpus[pfn]
            del self._pamt[pfn]
            return self._ret(name, t, (pfn,), TDX_SUCCESS, *out)

    def _drop_table(self, t, pfn):
        """Teardown: forget the entry pointing at S-EPT page ``pfn`` and the
        entries below it (their pages stay TD-owned until reclaimed)."""
        key = next((k for k, e in t.sept.items() if e.state in _NL_STATES and e.pfn == pfn), None)
        if key is None:
            return
        lv, g = key
        self._free(t, lv, g)
        lo, hi = g, g + (1 << _cover_shift(lv))
        for k in [k for k in t.sept if k[0] < lv and lo <= k[1] < hi]:
            del t.sept[k]

    def _drop_leaf(self, t, pfn):
        for (lv, g), e in list(t.sept.items()):
            if e.state in _LEAF_STATES and e.pfn <= pfn < e.pfn + (1 << (9 * lv)):
                self._free(t, lv, g)
                return

    # ------------------------------------------------------------------
    # inspection API: for tests and auditors only, returns copies
    # ------------------------------------------------------------------
    def sept_snapshot(self, td):
        """Copy of the TD's S-EPT: ``{(tdx_level, gpa): (state name, pfn,
        bepoch)}`` for every non-FREE entry.  Inspection only."""
        with self._lock:
            t = self._td(td)
            return {k: (e.state.name, e.pfn, e.bepoch) for k, e in t.sept.items()}

    def pamt_snapshot(self):
        """Copy of the PAMT: ``{pfn: (owner tdr pfn, page type name)}`` for
        every page some TD owns.  Inspection only."""
        with self._lock:
            return {p: (o, pt.name) for p, (o, pt) in self._pamt.items()}

    def td_snapshot(self, td):
        """Copy of the TD's control state: epoch, op state, vCPUs."""
        with self._lock:
            t = self._td(td)
            return {"hkid": None if t.teardown else t.hkid, "epoch": t.epoch,
                    "finalized": t.finalized, "teardown": t.teardown,
                    "nr_added": t.nr_added, "ept_levels": t.ept_levels,
                    "vcpus": {v: (s.in_guest, s.epoch) for v, s in t.vcpus.items()}}

    def snapshot(self, td=None):
        """Everything a call may change (S-EPT of ``td`` or of every TD, PAMT,
        HKID-cached pages, TD states): equal snapshots ⇒ no state change."""
        with self._lock:
            tds = [td] if td is not None else [t.handle for t in self._tds.values()]
            return {"sept": {h.tdr_pfn: self.sept_snapshot(h) for h in tds},
                    "td": {h.tdr_pfn: self.td_snapshot(h) for h in tds},
                    "pamt": self.pamt_snapshot(), "cached": dict(self._cached),
                    "hkids": frozenset(self._hkids)}

    def needs_wbinvd(self, page):
        """True if host page ``page`` may still hold cache lines under a TD's
        HKID (removed but not yet written back): the host must not reuse it."""
        with self._lock:
            return self._pfn("page", page) in self._cached

    # ------------------------------------------------------------------
    # auditor
    # ------------------------------------------------------------------
    def audit(self):
        """Check the module's own invariants; returns a list of violations
        (empty when consistent):

        * every S-EPT entry below the root level has a parent non-leaf entry
          (NL_MAPPED, or NL_BLOCKED while being torn down), and each
          non-leaf's child count is right;
        * leaves only at levels 0-1 with aligned pfns, non-leaves at 1.. top;
        * PAMT: every referenced page owned by that TD with the right type,
          no page referenced twice, every owned page referenced (or the TD
          torn down, pages awaiting RECLAIM), owners exist;
        * epochs: never decreasing, block epochs not in the future, vCPUs in
          guest mode on the current or the previous epoch only."""
        out = []
        with self._lock:
            refs: dict[int, tuple] = {}
            for tdr, t in self._tds.items():
                if t.epoch < t.max_epoch_seen:
                    out.append(f"td {tdr:#x}: epoch {t.epoch} went back from {t.max_epoch_seen}")
                for v, s in t.vcpus.items():
                    if s.in_guest and s.epoch not in (t.epoch, t.epoch - 1):
                        out.append(f"td {tdr:#x}: vcpu {v:#x} in guest on epoch "
                                   f"{s.epoch}, TD epoch {t.epoch}")
                    if self._pamt.get(v) != (tdr, PageType.PT_TDVPR):
                        out.append(f"td {tdr:#x}: vcpu {v:#x} TDVPR not owned in PAMT")
                counts: dict[tuple, int] = {}
                for (lv, g), e in t.sept.items():
                    where = f"td {tdr:#x} entry (level {lv}, gpa {g:#x})"
                    if e.state == SeptState.FREE:
                        out.append(f"{where}: FREE entry stored")
                    if g & ((1 << _cover_shift(lv)) - 1) or not 0 <= lv < t.ept_levels:
                        out.append(f"{where}: misaligned or bad level")
                    if e.state in _NL_STATES and lv == 0:
                        out.append(f"{where}: non-leaf at 4K level")
                    if e.state in _LEAF_STATES and (lv > 1 or e.pfn & ((1 << 9 * lv) - 1)):
                        out.append(f"{where}: bad leaf level/pfn alignment")
                    if (e.state in _BLOCKED_STATES) != (e.bepoch is not None):
                        out.append(f"{where}: block epoch inconsistent with state")
                    if e.bepoch is not None and e.bepoch > t.epoch:
                        out.append(f"{where}: blocked in future epoch {e.bepoch}")
                    if lv + 1 < t.ept_levels:
                        s = _cover_shift(lv + 1)
                        pk = (lv + 1, g >> s << s)
                        p = t.sept.get(pk)
                        if p is None or p.state not in _NL_STATES:
                            out.append(f"{where}: {e.state.name} without a present parent table")
                        counts[pk] = counts.get(pk, 0) + 1
                    npages = 1 << (9 * lv) if e.state in _LEAF_STATES else 1
                    want = PageType.PT_REG if e.state in _LEAF_STATES else PageType.PT_EPT
                    for pfn in range(e.pfn, e.pfn + npages):
                        if pfn in refs:
                            out.append(f"{where}: pfn {pfn:#x} also referenced by {refs[pfn]}")
                        refs[pfn] = (tdr, lv, g)
                        if self._pamt.get(pfn) != (tdr, want):
                            out.append(f"{where}: pfn {pfn:#x} PAMT {self._pamt.get(pfn)} "
                                       f"!= ({tdr:#x}, {want.name})")
                for k, e in t.sept.items():
                    if e.state in _NL_STATES and e.nchildren != counts.get(k, 0):
                        out.append(f"td {tdr:#x} entry {k}: child count {e.nchildren} "
                                   f"!= {counts.get(k, 0)}")
                if not t.teardown and t.hkid not in self._hkids:
                    out.append(f"td {tdr:#x}: live TD without its HKID")
            for pfn, (tdr, pt) in self._pamt.items():
                t = self._tds.get(tdr)
                if t is None:
                    out.append(f"pfn {pfn:#x}: owner TDR {tdr:#x} does not exist")
                    continue
                if pt in (PageType.PT_REG, PageType.PT_EPT) and pfn not in refs \
                        and not t.teardown:
                    out.append(f"pfn {pfn:#x}: {pt.name} of td {tdr:#x} not in its S-EPT")
                if pfn in self._cached:
                    out.append(f"pfn {pfn:#x}: owned by a TD and still cached under "
                               f"HKID {self._cached[pfn]}")
        return out
