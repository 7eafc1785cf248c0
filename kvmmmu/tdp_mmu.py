"""The TDP MMU (``arch/x86/kvm/mmu/tdp_mmu.c``): roots, the fault path and
every hook the VM calls, over the C core (:mod:`kvmmmu._core.tdp_mmu`).

A VM created with ``mmu="tdp_mmu"`` has one (``vm.mmu_backend``, registered
for the hooks); faults come through the common entry of :mod:`kvmmmu.mmu`::

    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"))
    v = vm.vcpus[0]
    v.kvm_mmu_reload()                              # load the vCPU's root
    v.kvm_mmu_page_fault(gpa, PFERR_WRITE_MASK)     # RET_PF_*, with the statistics
    vm.mmu_backend.page_fault(v, gfn, write=True)   # the same, error code as the CPU's

``TdpMmu(vm)`` registered by hand replaces the VM's own while that one has
not loaded a root; ``VM(..., backend=None)`` starts without any.

Roots (tdp-mmu.md §1-2).  A vCPU loads the valid root of its role (level,
``smm``, ``guest_mode``, A/D), taking a reference, or allocates one with two
references (the vCPU's and the list's).  ``kvm_tdp_mmu_invalidate_roots``
marks every root ``role.invalid`` and schedules it; ``kvm_tdp_mmu_zap_
invalidated_roots`` zaps the scheduled ones and drops the list's reference;
a root whose last reference goes is zapped, unlinked and freed after a
grace period.  A vCPU whose root is invalid must reload
(``KVM_REQ_MMU_FREE_OBSOLETE_ROOTS``): its faults are stale.

The fault (``kvm_tdp_page_fault``, tdp-mmu.md §5; :meth:`TdpMmu.mmu_page_fault`,
called by :func:`kvmmmu.mmu.kvm_mmu_do_page_fault` with a
:class:`~kvmmmu.mmu.KvmPageFault`): a write to a write-tracked gfn is
WRITE_PROTECTED; ``fast_page_fault``; top up the caches;
``kvm_mmu_faultin_pfn``; take ``mmu_lock`` for read, give up (RETRY) if the
fault is stale, choose the level (``kvm_mmu_hugepage_adjust``), and walk:
one C call, :meth:`~kvmmmu._core.tdp_mmu.TdpMmuCore.page_fault_map`.  A
writable SPTE created in a dirty-logged slot marks the gfn dirty, as
``make_spte`` does.  The common steps are functions of :mod:`kvmmmu.mmu`.

``fast_page_fault`` comes first: a write to an MMU-writable SPTE (dirty
logging took W away) or an access-tracked SPTE is fixed with one cmpxchg,
without mmu_lock, marking the page dirty when W is set.

A gfn without a memslot gets an MMIO SPTE carrying the memslot generation
(with ``mmio_caching``; without it the fault is emulated each time); a later
access to it is a reserved-bit fault that ``handle_mmio_page_fault``
answers (RET_PF_EMULATE) while the generation is current.

With ``nx_huge_pages`` (the iTLB multihit workaround) an instruction fetch
maps 4K and flags the tables it creates; those a huge page could have
replaced go on the possible-NX list (``nx_lpage_splits``), and a huge
mapping never replaces a flagged table (``disallowed_hugepage_adjust``)
until :meth:`TdpMmu.kvm_recover_nx_huge_pages` zaps it.

Faults of different vCPUs may run on different threads: the C map path takes
the arena's shared side (``mmu_lock`` held for read), every change a cmpxchg.
``kvm_mmu_zap_all_fast`` zaps the invalidated roots under the read lock
too, beside those faults (``TdpMmuCore.zap_root_shared``).

A TDX VM (``vm_type="tdx"``) has two roots per vCPU (mirror-tdx.md §3): the
mirror root (``role.is_mirror``: KVM's copy of the Secure EPT, indexed with
the plain gfn) and the direct root (the shared EPT, indexed with the gfn plus
``vm.gfn_direct_bits``).  A fault whose gpa lacks the shared bit goes to the
mirror root, where every change reaches the TDX module through the
``kvm_x86_ops`` hooks of ``vm.tdx`` (:class:`_ExternalOps`; the C side is
described in :mod:`kvmmmu._core.tdp_mmu`).  Zaps pick roots by the range's
attribute filter; fast zap and zap-all leave the mirror root alone; it goes
only at teardown (:meth:`TdpMmu.kvm_mmu_uninit_tdp_mmu`).
:meth:`TdpMmu.audit_mirror` compares it with the module's S-EPT.
"""
from __future__ import annotations

import errno as E
import threading

import numpy as np

from kvmmmu._core._checks import check_array, int_arg
from kvmmmu._core.defs import (
    ACC_ALL,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_INVALID,
    RET_PF_RETRY,
    RET_PF_WRITE_PROTECTED,
)
from kvmmmu._core.defs import RET_PF_NAMES as _RET_PF_NAMES
from kvmmmu._core.role import (
    KvmCpuRole,
    KvmMmuPageRole,
    kvm_calc_tdp_mmu_root_page_role,
    kvm_mmu_get_tdp_level,
)
from kvmmmu._core.spte import PT_WRITABLE_MASK, SPTE_BASE_ADDR_MASK, SPTE_MMU_PRESENT_MASK
from kvmmmu._core.tdp_iter import kvm_tdp_mmu_get_walk
from kvmmmu._core.pt_arena import MmuMemoryCache
from kvmmmu._core.tdp_mmu import EXT_OPS, GUEST_ACCESS as _GA, WARN_SITES, TdpMmuCore
from kvmmmu.errors import KvmNoMemoryError
from kvmmmu import host as _host
from kvmmmu.host import PTE_DIRTY, PTE_PRESENT, PTE_WRITE, PTE_YOUNG
from kvmmmu.memslots import (
    KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEMSLOT_INVALID,
)
from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmmmu.notifiers import KVM_FILTER_PRIVATE, KVM_FILTER_SHARED
from kvmmmu import mmu as _mmu
from kvmmmu.mmu import KvmPageFault, MmuBackend

__all__ = ["TdpMmu", "TdpRoot"]

class TdpRoot:
    """A root of the TDP MMU (the fields of ``struct kvm_mmu_page`` a root uses)."""
    __slots__ = ("as_id", "invalid", "is_mirror", "nr_gfns", "refcount", "role",
                 "scheduled_to_zap", "sp", "zapped")

    def __init__(self, sp: int, role: KvmMmuPageRole):
        self.sp, self.role, self.as_id = sp, role, role.smm
        #: a TDX mirror root (``role.is_mirror``): KVM's copy of the S-EPT
        self.is_mirror = bool(role.is_mirror)
        #: the gfns the root maps (2**(9 * level))
        self.nr_gfns = 1 << (9 * role.level)
        self.refcount = 2           # the vCPU's and the roots list's
        self.invalid = False
        self.scheduled_to_zap = False
        #: emptied by kvm_tdp_mmu_zap_invalidated_roots (the last put frees it as is)
        self.zapped = False

    def __repr__(self):
        return (f"TdpRoot(sp={self.sp}, level={self.role.level}, as_id={self.as_id}, "
                f"refcount={self.refcount}{', mirror' if self.is_mirror else ''}"
                f"{', invalid' if self.invalid else ''})")


_EXT = EXT_OPS
_EXT_LINK, _EXT_SET, _EXT_REMOVE, _EXT_FREE = (_EXT["link_external_spt"], _EXT["set_external_spte"],
                                               _EXT["remove_external_spte"], _EXT["free_external_spt"])
_EXT_ALLOC, _EXT_FREE_PAGE, _EXT_BUG = (_EXT["alloc_external_spt"], _EXT["free_external_spt_page"],
                                        _EXT["kvm_bug"])


class _ExternalOps:
    """What the C mirror path calls (``TdpMmuCore.set_external_ops``): the
    ``kvm_x86_ops`` external hooks of ``vm.tdx`` with the arguments of the
    VM's code generation (v6.18: the pfn of the SPTE; Gen B: the SPTE),
    the ``external_spt`` page of a new mirror table from the faulting
    vCPU's ``mmu_external_spt_cache``, and KVM_BUG_ON.  Never raises into
    C: an exception of a hook (a broken test double) is kept in
    :attr:`errors`, bugs the VM and answers -EIO."""

    def __init__(self, mmu: "TdpMmu"):
        self.mmu = mmu
        self.vm = mmu.vm
        #: exceptions the hooks raised (and the VM was bugged for)
        self.errors: list[BaseException] = []

    def __call__(self, op: int, gfn: int, level: int, arg: int) -> int:
        try:
            r = self._call(op, gfn, level, arg)
            if type(r) is not int or not -4095 <= r < 1 << 63:
                raise TypeError(f"external hook {op} returned {r!r}, not 0, a -errno or a pfn")
            return r
        except BaseException as e:            # noqa: BLE001 (nothing may unwind through C)
            self.errors.append(e)
            self.vm.kvm_bug(f"external hook {op} raised {e!r}", site="kvm_x86_ops")
            return -E.EIO

    def _call(self, op, gfn, level, arg) -> int:
        vm = self.vm
        tdx = vm.tdx
        if op == _EXT_SET:
            return tdx.set_external_spte(gfn, level, arg if tdx.era == "genB"
                                         else (arg & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT)
        if op == _EXT_LINK:
            return tdx.link_external_spt(gfn, level, arg)
        if op == _EXT_REMOVE:
            if tdx.era == "genB":                 # void: TDX bugs the VM itself
                tdx.remove_external_spte(gfn, level, arg)
                return 0
            r = tdx.remove_external_spte(gfn, level, (arg & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT)
            if r:
                vm.kvm_bug(f"remove_external_spte(gfn={gfn:#x}, level={level}) = {r}")
            return r
        if op == _EXT_FREE:
            r = tdx.free_external_spt(gfn, level, arg)
            if r:
                vm.warn_sink.warn("handle_removed_pt", f"free_external_spt(gfn={gfn:#x}, "
                                  f"level={level}) = {r}: S-EPT page {arg:#x} leaked")
            else:                                 # tdp_mmu_free_sp: the page goes back
                vm.host.phys.free_kernel_pages(np.array([arg], np.uint64))
            return r
        if op == _EXT_ALLOC:
            faulting = self.mmu._faulting
            cache = faulting.vcpu.mmu_external_spt_cache
            if not cache.nobjs and getattr(faulting, "refill", False):
                cache.topup(cache.capacity)         # (a batch: topped up between faults)
            pfn = cache.alloc()
            return pfn if pfn > 0 else -E.ENOMEM
        if op == _EXT_FREE_PAGE:
            vm.host.phys.free_kernel_pages(np.array([arg], np.uint64))
            return 0
        if op == _EXT_BUG:
            vm.kvm_bug(WARN_SITES[arg] + f" (gfn {gfn:#x}, level {level})")
            return 0
        raise ValueError(f"unknown external op {op}")


class TdpMmu(MmuBackend):
    """The TDP MMU of one VM (``vm.mmu_backend`` of a ``mmu="tdp_mmu"`` VM).

    Thread-safety: the hooks run under the VM's ``api_lock`` / ``mmu_lock``
    discipline.  Faults (:meth:`mmu_page_fault`, :meth:`page_fault`) take
    ``mmu_lock`` for read; a vCPU faults from one thread at a time (its
    fault record, statistics and caches are its own), different vCPUs may
    fault from different threads as far as the core's map path allows
    (the arena's writer check raises ConcurrentUseError otherwise); the
    dirty-bitmap word and host PTE updates of the fault path are locked."""

    def __init__(self, vm, *, max_tdp_level: int | None = None, guest_maxphyaddr: int | None = None):
        if not vm.tdp_enabled:
            raise ValueError("the TDP MMU needs a VM with TDP enabled (mmu='tdp_mmu')")
        self.vm = vm
        self.core = TdpMmuCore(vm.arena)
        hc = vm.host_config
        if max_tdp_level is None:
            max_tdp_level = 5 if getattr(hc, "la57", False) else 4
        self.tdp_level = kvm_mmu_get_tdp_level(
            int_arg("max_tdp_level", max_tdp_level, 4, 5),
            int_arg("guest_maxphyaddr", hc.maxphyaddr if guest_maxphyaddr is None
                    else guest_maxphyaddr, 32, 52))
        self.roots: list[TdpRoot] = []
        self.vcpu_root: dict[int, TdpRoot] = {}
        #: ``kvm_has_mirrored_tdp`` (TDX): each vCPU also holds the mirror root
        self.mirrored = bool(vm.kvm_has_mirrored_tdp)
        #: ``vcpu->arch.mmu->mirror_root_hpa`` per vCPU
        self.vcpu_mirror_root: dict[int, TdpRoot] = {}
        #: the vCPU whose fault runs on this thread (its external_spt cache)
        self._faulting = threading.local()
        if self.mirrored:
            self.external_ops = _ExternalOps(self)
            self.core.set_external_ops(self.external_ops)
        #: ``kvm->arch.split_{shadow_page,page_header}_cache``: eager split's tables
        self.split_shadow_page_cache = MmuMemoryCache(vm.arena, "shadow_page")
        self.split_page_header_cache = MmuMemoryCache(vm.arena, "page_header")

    # ------------------------------------------------------------------ roots
    def _root_role(self, vcpu, mirror: bool = False) -> KvmMmuPageRole:
        # the vCPU's mode matters only through smm (guest_mode: no nested TDP yet)
        cpu_role = KvmCpuRole(base=KvmMmuPageRole(smm=int(vcpu.smm)))
        role = kvm_calc_tdp_mmu_root_page_role(cpu_role, self.tdp_level,
                                               self.vm.fmt.masks()["ad_enabled"])
        return role.replace(is_mirror=1) if mirror else role

    def kvm_tdp_mmu_alloc_root(self, vcpu, mirror: bool = False) -> TdpRoot:
        """The valid root of the vCPU's role (``is_mirror`` for `mirror`),
        with a new reference, or a new root (refcount 2)."""
        role = self._root_role(vcpu, mirror)
        for r in self.roots:
            if not r.invalid and r.role == role and r.refcount > 0:
                r.refcount += 1
                return r
        vcpu.mmu_topup_memory_caches(False)
        sp = self.vm.arena.alloc_sp(vcpu.mmu_shadow_page_cache, vcpu.mmu_page_header_cache,
                                    role=role.word, gfn=0, tdp_mmu_page=True)
        self.core.trace_init_sp(sp)                 # tdp_mmu_init_sp's kvm_mmu_get_page
        root = TdpRoot(sp, role)
        self.roots.append(root)
        return root

    def kvm_mmu_load(self, vcpu) -> TdpRoot:
        """``kvm_mmu_load``: give `vcpu` a valid root (dropping an invalid one).
        With mirrored TDP (``mmu_alloc_direct_roots``) the mirror root comes
        first, when the vCPU has none: a vCPU never holds a direct root
        without a mirror one (mirror-tdx.md §3)."""
        old = self.vcpu_root.get(vcpu.index)
        if old is not None and not old.invalid:
            return old
        with self.vm.mmu_lock.write():
            if self.mirrored and vcpu.index not in self.vcpu_mirror_root:
                self.vcpu_mirror_root[vcpu.index] = self.kvm_tdp_mmu_alloc_root(vcpu, True)
            if old is not None:
                self.kvm_tdp_mmu_put_root(old)
            root = self.vcpu_root[vcpu.index] = self.kvm_tdp_mmu_alloc_root(vcpu)
        vcpu.mmu_root = root
        self.vm.arena.set_tdp_mmu_active(vcpu.index, True)
        vcpu.requests.discard("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")
        return root

    def free_obsolete_roots(self, vcpu) -> None:
        """``kvm_mmu_free_obsolete_roots``: a vCPU whose root was invalidated
        drops it (the next :func:`kvmmmu.mmu.kvm_mmu_reload` loads a valid one)."""
        root = self.vcpu_root.get(vcpu.index)
        if root is not None and root.invalid:
            self.kvm_mmu_unload(vcpu)

    def kvm_mmu_unload(self, vcpu) -> None:
        """``kvm_mmu_unload``: drop the vCPU's root reference (the direct
        root; a mirror root is kept until :meth:`kvm_mmu_destroy`)."""
        root = self.vcpu_root.pop(vcpu.index, None)
        vcpu.mmu_root = None
        if root is not None:
            with self.vm.mmu_lock.write():
                self.kvm_tdp_mmu_put_root(root)
            self.vm.arena.set_tdp_mmu_active(vcpu.index, False)

    def kvm_mmu_destroy(self, vcpu) -> None:
        """``kvm_mmu_destroy`` (vCPU teardown): unload, then drop the mirror
        root's reference too (the roots list still holds one, so nothing
        is zapped here: :meth:`kvm_mmu_uninit_tdp_mmu` does it)."""
        self.kvm_mmu_unload(vcpu)
        mroot = self.vcpu_mirror_root.pop(vcpu.index, None)
        if mroot is not None:
            with self.vm.mmu_lock.write():
                self.kvm_tdp_mmu_put_root(mroot)

    def kvm_mmu_uninit_tdp_mmu(self) -> None:
        """``kvm_mmu_uninit_tdp_mmu`` (VM teardown, after the vCPUs): every
        root, mirror included, is invalidated and zapped under the write lock
        and its list reference dropped.  Zapping a mirror root frees its
        tables bottom-up, each through ``free_external_spt`` (TDX: RECLAIM,
        legal only once the HKID is released).  WARNs if a root or a table
        is left."""
        vm = self.vm
        with vm.mmu_lock.write():
            self.kvm_tdp_mmu_invalidate_roots(mirror=True)
            self.kvm_tdp_mmu_zap_invalidated_roots()
        vm.arena.rcu_barrier()
        if self.core.tdp_mmu_pages:
            vm.warn_sink.warn("kvm_mmu_uninit_tdp_mmu", f"{self.core.tdp_mmu_pages} tables left")
        if self.roots:
            vm.warn_sink.warn("kvm_mmu_uninit_tdp_mmu", f"roots left: {self.roots}")

    def kvm_tdp_mmu_put_root(self, root: TdpRoot) -> None:
        """Drop a reference; the last one zaps the root, unlinks it and frees
        it after a grace period."""
        if root.refcount <= 0:
            self.vm.warn_sink.warn("kvm_tdp_mmu_put_root", "root refcount underflow")
            return
        root.refcount -= 1
        if root.refcount:
            return
        if not root.zapped:                 # the kernel's roots are always empty here
            self.core.zap_root(root.sp)
        self.roots.remove(root)
        self.vm.arena.call_rcu_free_sp(root.sp)

    def kvm_tdp_mmu_invalidate_roots(self, mirror: bool = False) -> None:
        """Mark every direct root (and with `mirror` the mirror roots:
        teardown only) invalid and scheduled for zapping; every vCPU must
        reload."""
        for r in self.roots:
            if not r.invalid and (mirror or not r.is_mirror):
                r.invalid = r.scheduled_to_zap = True
                self.vm.arena.set_sp(r.sp, role=r.role.replace(invalid=1).word)
        for vcpu in self.vm.vcpus:
            if vcpu.index in self.vcpu_root:
                vcpu.requests.add("KVM_REQ_MMU_FREE_OBSOLETE_ROOTS")

    def kvm_tdp_mmu_zap_invalidated_roots(self, shared: bool = False) -> None:
        """Zap each scheduled root and drop the list's reference on it.
        `shared`: with ``mmu_lock`` held for read, as ``kvm_mmu_zap_all_fast``
        runs it, beside other vCPUs' faults (``TdpMmuCore.zap_root_shared``:
        every entry by cmpxchg)."""
        for r in [r for r in self.roots if r.scheduled_to_zap]:
            r.scheduled_to_zap = False
            if shared:
                self.core.zap_root_shared(r.sp)
            else:
                self.core.zap_root(r.sp)
            r.zapped = True
            self.kvm_tdp_mmu_put_root(r)

    def _valid_roots(self, as_id=None):
        return [r for r in self.roots if not r.invalid and (as_id is None or r.as_id == as_id)]

    # ------------------------------------------------------------------ faults
    #: the MMU's handler is kvm_tdp_page_fault, on direct (gpa-indexed) roots
    is_tdp = True
    direct = True

    def kvm_mmu_hugepage_adjust(self, slot, gfn: int, max_level: int, exec_: bool) -> tuple[int, int]:
        """``(goal_level, req_level)`` for a fault on `gfn` in `slot` (the
        common :func:`kvm_mmu_hugepage_adjust` on a :class:`KvmPageFault` is
        what the fault path uses)."""
        if max_level == PG_LEVEL_4K or slot is None or slot.kvm_slot_dirty_track_enabled():
            return PG_LEVEL_4K, PG_LEVEL_4K
        req = self.vm.kvm_mmu_max_mapping_level(slot, gfn, max_level)
        if req == PG_LEVEL_4K or (exec_ and self.vm.params.nx_huge_pages):
            return PG_LEVEL_4K, req
        return req, req

    def mmu_page_fault(self, vcpu, fault: KvmPageFault) -> int:
        """``kvm_tdp_page_fault`` -> ``kvm_tdp_mmu_page_fault`` (tdp-mmu.md §5):
        a write to a write-tracked gfn (WRITE_PROTECTED), ``fast_page_fault``,
        the cache top-up, ``kvm_mmu_faultin_pfn``, then under ``mmu_lock``
        for read: RETRY if the fault is stale, else
        ``kvm_mmu_hugepage_adjust`` and the map (one C call).  An MMIO SPTE
        installed counts in ``pf_mmio_spte_created``; a writable leaf
        created in a dirty-logged slot marks the gfn dirty (``make_spte``)."""
        vm = self.vm
        root = droot = vcpu.mmu_root
        if root is None:
            return RET_PF_RETRY
        if self.mirrored:
            # tdp_mmu_get_root_for_fault: a gpa without the shared bit goes
            # to the mirror root
            if not fault.addr >> PAGE_SHIFT & vm.gfn_direct_bits:
                root = self.vcpu_mirror_root.get(vcpu.index)
                if root is None:
                    return RET_PF_RETRY
            self._faulting.vcpu = vcpu
        gfn = fault.gfn
        if gfn >= root.nr_gfns:
            return _mmu.kvm_handle_noslot_fault(vcpu, fault, ACC_ALL) if fault.slot is None \
                else RET_PF_RETRY
        present = fault.present
        if present:
            if fault.write and _mmu.page_fault_handle_page_track(vcpu, fault):
                return RET_PF_WRITE_PROTECTED
        if (present or not vm.kvm_ad_enabled) and _mmu.page_fault_can_be_fast(vm, fault):
            r = _mmu.fast_page_fault(vcpu, fault)
            if r != RET_PF_INVALID:
                return r
        sc, hc = vcpu.mmu_shadow_page_cache, vcpu.mmu_page_header_cache
        # (mmu_topup_memory_caches would leave caches at their minimum alone)
        if sc.nobjs < 5 or hc.nobjs < 5 or vcpu.mmu_pte_list_desc_cache.nobjs < 14 or \
                self.mirrored and vcpu.mmu_external_spt_cache.nobjs < 5:
            try:
                vcpu.mmu_topup_memory_caches(False)
            except KvmNoMemoryError:
                return -E.ENOMEM
        r = _mmu.faultin_pfn(vcpu, fault, ACC_ALL)
        if r != RET_PF_CONTINUE:
            return r
        slot = fault.slot
        n = vm.notifier
        lock = vm.mmu_lock
        lock.acquire_read()
        try:
            # is_page_fault_stale: an obsolete (direct) root, or an
            # invalidation since faultin
            if droot.invalid or slot is not None and (
                    n.mmu_invalidate_seq != fault.mmu_seq or n.mmu_invalidate_in_progress and
                    _mmu.mmu_invalidate_retry_gfn(vm, fault.mmu_seq, gfn)):
                return RET_PF_RETRY
            # page_fault_map's flags: W (PFERR bit 1) -> 0, F (bit 4) -> 1, then
            # prefetch, map_writable, the NX workaround
            ec = fault.error_code
            flags = ((ec >> 1) & 1 | (ec >> 3) & 2 | fault.prefetch << 2 |
                     fault.map_writable << 3 | fault.nx_huge_page_workaround_enabled << 4)
            if slot is None:
                r = self.core.page_fault_map(root.sp, gfn, 0, 1, 1, flags | 32,
                                             vcpu.mmio_spte_generation(), sc, hc)
                if r == RET_PF_EMULATE:
                    vcpu.stat.pf[_mmu._PF_MMIO_SPTE_CREATED] += 1
                return r
            if fault.host_level != 1 or fault.exec:
                # (a 4K host leaf and no fetch: hugepage_adjust would leave
                # req_level, goal_level and huge_page_disallowed as they are)
                _mmu.kvm_mmu_hugepage_adjust(vcpu, fault)
            r = self.core.page_fault_map(root.sp, gfn, fault.pfn, fault.goal_level,
                                         fault.req_level, flags, 0, sc, hc)
            if fault.huge_page_disallowed:
                vm.stat.nx_lpage_splits = self.core.nx_lpage_splits
            if r == RET_PF_FIXED and fault.map_writable and slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                _mmu.mark_gfn_dirty(vm, slot, gfn)
            return r
        finally:
            lock.release_read()

    def fast_page_fault(self, vcpu, fault: KvmPageFault) -> tuple[int, bool]:
        """The TDP walk and cmpxchg of ``fast_page_fault`` (the common part is
        :func:`kvmmmu.mmu.fast_page_fault`): ``(RET_PF_*, made_writable)``."""
        root = self.vcpu_root[vcpu.index]
        slot = fault.slot
        r, made, _ = self.core.fast_page_fault(
            root.sp, fault.gfn, write=fault.write, exec=fault.exec,
            slot_dirty_tracked=slot is not None and bool(slot.flags & KVM_MEM_LOG_DIRTY_PAGES),
            vcpu_id=vcpu.vcpu_id, addr=fault.addr, error_code=fault.error_code)
        return r, made

    def get_mmio_spte(self, vcpu, addr: int) -> tuple[bool, int]:
        """``get_mmio_spte``: ``(reserved, spte)`` of the last entry a lockless
        walk of `addr` reaches.  The model builds no SPTE with reserved bits
        other than MMIO SPTEs, so ``reserved`` is False."""
        root = self.vcpu_root[vcpu.index]
        spte, _ = self.core.get_last_spte(root.sp, addr >> PAGE_SHIFT)
        return False, spte

    def unprotect_gfn_and_retry(self, vcpu, cr2_or_gpa: int) -> bool:
        """``__unprotect_gfn_and_retry``: the TDP MMU shadows no guest
        page tables (``indirect_shadow_pages`` is 0): nothing to unprotect."""
        return False

    def hardware_error_code(self, vcpu, gfn: int, *, write: bool = False, exec: bool = False) -> int:
        """The error code the CPU reports for an access to `gfn` given the
        vCPU's current tables: an EPT misconfiguration / reserved-bit NPF
        (PFERR_RSVD) on an MMIO SPTE; else PFERR_PRESENT when the final
        translation was present (a permission fault), W for a write, F for
        a fetch, and on EPT U for a read (``handle_ept_violation``)."""
        root = self.vcpu_root[vcpu.index]
        spte, level = self.core.get_last_spte(root.sp, gfn)
        return _mmu.tdp_hardware_error_code(self.vm.fmt, self.vm.host_config.tdp == "ept", spte,
                                            level, write=write, exec=exec)

    def page_fault(self, vcpu, gfn: int, *, write: bool = False, exec: bool = False,
                   prefetch: bool = False) -> int:
        """The guest touches guest-physical `gfn` and the CPU exits: the error
        code the hardware would give (:meth:`hardware_error_code`) goes to
        :func:`kvmmmu.mmu.kvm_mmu_page_fault` (``prefetch``: a prefetch fault
        through ``kvm_mmu_do_page_fault``, as the async #PF completion does:
        no ``pf_taken``, FIXED counted).  Returns RET_PF_* or a negative
        errno, with the vCPU statistics the kernel keeps."""
        root = self.vcpu_root.get(vcpu.index)
        if root is None:
            raise ValueError(f"vCPU {vcpu.vcpu_id} has no root: call kvm_mmu_load first")
        if type(gfn) is not int or gfn < 0 or gfn >> (9 * root.role.level):
            gfn = int_arg("gfn", gfn, 0, (1 << (9 * root.role.level)) - 1)
        ec = self.hardware_error_code(vcpu, gfn, write=write, exec=exec)
        if prefetch:
            return _mmu.kvm_mmu_prefetch_fault(vcpu, gfn << PAGE_SHIFT, ec)
        return _mmu.kvm_mmu_page_fault(vcpu, gfn << PAGE_SHIFT, ec)

    # ------------------------------------------------------------------ the guest's accesses
    def guest_access(self, vcpu, gfns, *, write: bool = False, exec: bool = False,
                     batch: bool = True, max_faults: int = 4) -> np.ndarray:
        """The guest on `vcpu` touches guest-physical memory: for each gfn of
        `gfns` (uint64, 1-d, C-contiguous; any order, repeats allowed), in
        order, one read (default), write (`write` True) or instruction fetch
        (`exec`); `write` may also be an array (bool or uint8 0/1, one per
        gfn) saying which accesses are writes, the others reads.  Returns
        the exits each access took (uint8).

        An access the CPU's walk of the vCPU's TDP root completes - a present
        leaf (not MMIO, not access-tracked) that grants it: on EPT R for a
        read, W for a write, X for a fetch; on NPT P, P and W, P and not NX -
        causes no exit; with A/D bits (``vm.kvm_ad_enabled``) the CPU sets
        the leaf's Accessed bit, and Dirty for a write (with PML, a D bit it
        sets logs the gfn, and the model flushes the log at once: the gfn is
        marked dirty if its memslot logs dirty pages).  Any other access
        exits: :meth:`page_fault` (the CPU's error code to
        :func:`kvmmmu.mmu.kvm_mmu_page_fault`), then the vCPU re-enters
        (``vcpu_enter_guest``; the call starts with one too, as KVM_RUN
        does) and the access is retried,
        except after RET_PF_EMULATE (the instruction is emulated: the
        access is done).

        Errors: an access still exiting after `max_faults` exits raises
        RuntimeError naming the gfn and the last RET_PF_*; a fault that
        answers a negative errno (e.g. -EFAULT: the memslot's host mapping
        is gone) raises OSError with that errno; a bugged VM raises
        :class:`~kvmmmu.warn.KvmBugError` before any access.  On such an
        error the accesses before that one are done, and that access's exits
        so far stay done, as the kernel would leave them (statistics, dirty
        log and traces included).  A gfn without a memslot is not an error:
        it is MMIO (emulated; with MMIO caching an MMIO SPTE is installed
        and later accesses exit with a reserved-bit fault).

        Bad input raises before anything changes: `gfns` not a 1-d
        C-contiguous uint64 array (TypeError/ValueError naming ``gfns``),
        a gfn beyond what the root maps (ValueError naming ``gfns[i]``),
        `write` and `exec` both, `max_faults` outside 1..255, a vCPU of
        another VM, without a loaded valid root, or in guest mode
        (ValueError naming ``vcpu``); a TDX VM (mirror roots: private gfns
        go to the mirror root) raises NotImplementedError.

        `batch` (default) runs the accesses in nogil C passes
        (:meth:`~kvmmmu._core.tdp_mmu.TdpMmuCore.guest_access_batch`): the
        CPU's part; every exit that ``kvm_mmu_page_fault`` would end in
        ``fast_page_fault``'s RET_PF_FIXED (W set on an MMU-writable leaf,
        an access-tracked leaf restored: pf_taken, pf_fast, pf_fixed, the
        ``fast_page_fault`` trace line, the dirty bit); and, with A/D bits,
        a read or write exit on a not-present SPTE of a plain memslot (not
        read-only, no guest_memfd) backed by a VMA of 4K pages whose host
        page is present (and writable for a write): ``hva_to_pfn_fast``'s
        host PTE bits, ``kvm_tdp_mmu_map`` at 4K under ``mmu_lock`` for
        read, pf_taken and pf_fixed (or pf_spurious), the map's trace
        lines, the dirty bit of a writable leaf in a dirty-logged slot.  A
        pass stops at the first exit that needs anything else (the caches
        to top up, a host page to fault in, a THP or hugetlb backing, a
        fetch, MMIO, write tracking, private memory...), which is taken
        through :meth:`page_fault` as with ``batch=False``, and the next
        pass resumes at that access.  ``batch=False`` is the reference, one
        Python step per walk and per exit.  Both leave the same SPTEs,
        statistics, dirty bitmaps, host PTEs, ``vcpu.last_fault`` and
        kvmmmu trace lines (every event is emitted in both, in the same
        order)."""
        root, gfns, write, exec, max_faults = self._guest_access_check(vcpu, gfns, write, exec,
                                                                       max_faults)
        self._reenter(vcpu)             # KVM_RUN: what is pending is serviced first
        if batch:
            return self._guest_access_batch(vcpu, root, gfns, write, exec, max_faults)
        return self._guest_access_scalar(vcpu, root, gfns, write, exec, max_faults)

    def _guest_access_check(self, vcpu, gfns, write, exec, max_faults):
        """guest_access's argument checks (nothing changes before they pass)."""
        vm = self.vm
        if self.mirrored:
            raise NotImplementedError("guest_access: a TDX VM (mirror roots) is not modelled: "
                                      "its private gfns go to the mirror root")
        if getattr(vcpu, "vm", None) is not vm:
            raise ValueError(f"vcpu: {vcpu!r} is not a vCPU of this VM")
        root = self.vcpu_root.get(vcpu.index)
        if root is None or vcpu.mmu_root is not root:
            raise ValueError(f"vcpu: vCPU {vcpu.vcpu_id} has no root loaded: call kvm_mmu_load "
                             f"(or vcpu.kvm_mmu_reload()) first")
        if root.invalid:
            raise ValueError(f"vcpu: vCPU {vcpu.vcpu_id}'s root is invalid (KVM_REQ_MMU_FREE_"
                             f"OBSOLETE_ROOTS pending): reload it before running the guest")
        if vcpu.guest_mode:
            raise ValueError(f"vcpu: vCPU {vcpu.vcpu_id} is in guest mode (L2): guest_access "
                             f"models L1 accesses to guest-physical memory")
        exec = self._guest_access_flag("exec", exec)
        max_faults = int_arg("max_faults", max_faults, 1, 255)
        gfns = check_array("gfns", gfns)
        if isinstance(write, np.ndarray):
            if write.dtype not in (np.bool_, np.uint8) or write.ndim != 1:
                raise TypeError(f"write: an array of write flags is 1-d bool or uint8, not "
                                f"{write.ndim}-d {write.dtype}")
            if write.shape[0] != gfns.shape[0]:
                raise ValueError(f"write has {write.shape[0]} flags, gfns {gfns.shape[0]}")
            write = np.array(write, np.uint8, copy=True)     # the caller may change theirs
            if write.size and int(write.max()) > 1:
                raise ValueError("write: each flag is 0 (a read) or 1 (a write)")
            if exec and write.any():
                raise ValueError("write, exec: an access is a read, a write or a fetch, not both")
        else:
            write = self._guest_access_flag("write", write)
            if write and exec:
                raise ValueError("write, exec: an access is a read, a write or a fetch, "
                                 "not both")
        if gfns.size and int(gfns.max()) >= root.nr_gfns:
            i = int(np.argmax(gfns >= np.uint64(root.nr_gfns)))
            raise ValueError(f"gfns[{i}]={int(gfns[i]):#x} is beyond what the root maps "
                             f"(below {root.nr_gfns:#x})")
        if vm.warn_sink.bugged:
            vm.warn_sink.check()                 # a bugged VM runs no vCPU
        return root, gfns, write, exec, max_faults

    @staticmethod
    def _guest_access_flag(name: str, v) -> bool:
        """A bool argument (True/False, or the ints 0 and 1), else TypeError/ValueError."""
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        return bool(int_arg(name, v, 0, 1))

    def _guest_access_allowed(self, spte: int, level: int, write: bool, exec: bool) -> bool:
        """Does the CPU's walk ending at `spte` (`level`) complete the access
        (the Python twin of the core's ``tdp_hw_access_allowed``)?"""
        if not spte & SPTE_MMU_PRESENT_MASK or not (level == PG_LEVEL_4K or spte >> 7 & 1):
            return False
        if exec:
            return self.vm.fmt.is_executable_pte(spte) and \
                (self.vm.host_config.tdp == "ept" or bool(spte & 1))
        if write:
            return spte & 3 == 3
        return bool(spte & 1)

    @staticmethod
    def _reenter(vcpu) -> None:
        """The VM entry after an exit KVM handled in Python
        (``vcpu_enter_guest``: the requests the fault made - a TLB flush
        after a zap, a root to reload - are serviced before the retry).  The
        exits the batch's C passes handle make no request, so their
        re-entries are no-ops and are left out."""
        r = _mmu.vcpu_enter_guest(vcpu)
        if r is not None:
            raise OSError(-r, f"guest_access: vCPU {vcpu.vcpu_id}: the VM entry after an exit "
                              f"failed with {r}")

    def _guest_access_error(self, i: int, gfn: int, r: int, nf: int, write: bool, exec: bool):
        """The exception guest_access raises for access `i` (see there)."""
        kind = "fetch" if exec else "write" if write else "read"
        if r < 0:
            return OSError(-r, f"guest_access: gfns[{i}]={gfn:#x}: the {kind}'s fault "
                               f"(exit {nf}) failed with -{E.errorcode.get(-r, -r)}")
        return RuntimeError(f"guest_access: gfns[{i}]={gfn:#x}: the {kind} still exits after "
                            f"{nf} faults (last {_RET_PF_NAMES.get(r, r)})")

    def _guest_access_scalar(self, vcpu, root, gfns, write, exec, max_faults) -> np.ndarray:
        """guest_access, one Python step per walk (get_last_sptep), per A/D
        update (try_cmpxchg64) and per exit (page_fault): the reference."""
        vm = self.vm
        core, arena, sp = self.core, vm.arena, root.sp
        masks = vm.fmt.masks()
        a_bit = masks["accessed_mask"] if vm.kvm_ad_enabled else 0
        d_bit = masks["dirty_mask"] if vm.kvm_ad_enabled else 0
        pml = bool(d_bit) and bool(vm.cpu_dirty_log_size)
        slots = vm.memslots[vcpu.as_id]
        out = np.zeros(gfns.shape[0], np.uint8)
        writes = write.tolist() if isinstance(write, np.ndarray) else None
        for i, gfn in enumerate(gfns.tolist()):
            if writes is not None:
                write = bool(writes[i])
            ad = a_bit | (d_bit if write else 0)
            dbit = d_bit if write else 0
            nf = r = 0
            while True:
                sptep, spte, level = core.get_last_sptep(sp, gfn)
                if sptep and self._guest_access_allowed(spte, level, write, exec):
                    if ad and spte | ad != spte:
                        ok, _ = arena.try_cmpxchg64(sptep, spte, spte | ad)
                        if not ok:
                            continue                # changed meanwhile: walk again
                        if pml and not spte & dbit:     # what PML logs, flushed at once
                            _mmu.mark_page_dirty_in_slot(vm, slots.search_memslots(gfn), gfn)
                    break
                if nf >= max_faults:
                    raise self._guest_access_error(i, gfn, r, nf, write, exec)
                r = self.page_fault(vcpu, gfn, write=write, exec=exec)
                nf += 1
                out[i] = nf
                if r < 0:
                    raise self._guest_access_error(i, gfn, r, nf, write, exec)
                self._reenter(vcpu)
                if r == RET_PF_EMULATE:
                    break                           # the instruction is emulated
        return out

    def _guest_access_class(self, vcpu, gfns, write, exec):
        """Per gfn: the core's class bits (NOFAST: no memslot, a write to a
        write-tracked gfn, a VM with private memory; LOGGED: the memslot
        logs dirty pages; SLOW: a not-present exit may be mapped by the
        core - see :meth:`_guest_access_slow_slot`) and the memslot index
        into the list returned (-1 for none); and the core's slot tables
        (``slot_base``, ``slot_pte``, ``slot_pfn``, the VMA of each slot)."""
        vm = self.vm
        slots = vm.memslots[vcpu.as_id]
        ids = slots.gfn_to_memslot_array(gfns)
        gclass = np.zeros(gfns.shape[0], np.uint8)
        sidx = np.full(gfns.shape[0], -1, np.int32)
        objs, bases, ptes, pfns, vmas = [], [], [], [], []
        writes = write if isinstance(write, np.ndarray) else None
        tracking = bool(write.any() if writes is not None else write) and \
            vm.kvm_page_track_write_tracking_enabled
        for sid in np.unique(ids).tolist():
            sel = ids == sid
            if sid < 0:
                gclass[sel] |= _GA["CLASS_NOFAST"]
                continue
            slot = slots.id_to_memslot(sid)
            sidx[sel] = len(objs)
            objs.append(slot)
            if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
                gclass[sel] |= _GA["CLASS_LOGGED"]
            track = slot.arch.gfn_write_track
            if tracking and track is not None:
                where = np.flatnonzero(sel if writes is None else sel & (writes != 0))
                hit = where[track[(gfns[where] - np.uint64(slot.base_gfn)).astype(np.int64)] != 0]
                gclass[hit] |= _GA["CLASS_NOFAST"]
            vma = None if exec else self._guest_access_slow_slot(slot)
            bases.append(slot.base_gfn)
            vmas.append(vma)
            if vma is None:
                ptes.append(np.zeros(0, np.uint8))
                pfns.append(np.zeros(0, np.uint64))
            else:
                off = (slot.userspace_addr - vma.start) >> PAGE_SHIFT
                ptes.append(vma.pte[off:off + slot.npages])
                pfns.append(vma.pfn[off:off + slot.npages])
                gclass[sel] |= _GA["CLASS_SLOW"]
        if vm.has_private_mem:
            gclass |= _GA["CLASS_NOFAST"]
        return gclass, sidx, objs, (np.array(bases, np.uint64), ptes, pfns, vmas)

    def _guest_access_slow_slot(self, slot):
        """The VMA whose host pages the core may fault in for `slot`'s
        not-present exits (``kvm_tdp_page_fault`` without fast_page_fault:
        A/D bits on), or None: a plain memslot (not read-only, no
        guest_memfd, not being deleted) wholly inside one VMA of 4K pages
        only (no THP, no hugetlb: the host level is 4K, no hugepage_adjust)."""
        vm = self.vm
        if not vm.kvm_ad_enabled or vm.has_private_mem or \
                slot.flags & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD | KVM_MEMSLOT_INVALID):
            return None
        mm = vm.host
        ua, size = slot.userspace_addr, slot.npages << PAGE_SHIFT
        vma = mm.find_vma(ua) if not ua & ((1 << PAGE_SHIFT) - 1) else None
        if vma is None or vma.thp or vma.hugetlb or ua + size > vma.end:
            return None
        if (_GA["HOST_PTE_PRESENT"], _GA["HOST_PTE_WRITE"], _GA["HOST_PTE_YOUNG"],
                _GA["HOST_PTE_DIRTY"]) != (PTE_PRESENT, PTE_WRITE, PTE_YOUNG, PTE_DIRTY):
            raise AssertionError("the core's host PTE bits differ from kvmmmu.host's")
        return vma

    def _guest_access_batch(self, vcpu, root, gfns, write, exec, max_faults) -> np.ndarray:
        """guest_access in nogil C passes, each exit the C cannot take
        through :meth:`page_fault` (see :meth:`guest_access`)."""
        vm = self.vm
        gclass, sidx, slots, (bases, ptes, pfns, vmas) = \
            self._guest_access_class(vcpu, gfns, write, exec)
        writes = write if isinstance(write, np.ndarray) else None
        b = self.core.guest_access_batch(
            root.sp, gfns, gclass, write=writes is None and write, writes=writes, exec=exec,
            max_faults=max_faults,
            vcpu_id=vcpu.vcpu_id, sidx=sidx, slot_base=bases, slot_pte=ptes, slot_pfn=pfns,
            page_cache=vcpu.mmu_shadow_page_cache, header_cache=vcpu.mmu_page_header_cache,
            nx_huge_pages=vm.params.nx_huge_pages and not vm.disable_nx_huge_pages)
        any_slow = bool(np.any(gclass & np.uint8(_GA["CLASS_SLOW"])))
        mm, n, lock = vm.host, vm.notifier, vm.mmu_lock
        vma_gen = mm.vma_gen
        desc = vcpu.mmu_pte_list_desc_cache
        faults = b.faults
        pf = vcpu.stat.pf
        done, slow, give_up = _GA["DONE"], _GA["SLOW"], _GA["GIVE_UP"]
        last_c = None                   # the last exit the C took: (access, ec, slow info)
        py_last = (-1, 0)               # (access, RET_PF_*) of the last exit taken here
        i = taken = 0
        try:
            while True:
                # a pass may map not-present exits: what kvm_tdp_page_fault
                # checks before (caches, invalidations), under mmu_lock
                slow_ok = any_slow and desc.nobjs >= 14 and not n.mmu_invalidate_in_progress \
                    and mm.vma_gen == vma_gen
                exits_ok = not vm.warn_sink.bugged
                if slow_ok:
                    # (the host PTE bits: the C ORs them in, serialized
                    # with the scalar fault threads' read-modify-write)
                    lock.acquire_read()
                    try:
                        with _host._pte_bits_lock:
                            status, i, nr_fast, li, lec, lret, sl = b.run(i, taken, True,
                                                                          exits_ok)
                    finally:
                        lock.release_read()
                else:
                    status, i, nr_fast, li, lec, lret, sl = b.run(i, taken, False, exits_ok)
                taken = 0
                if nr_fast:
                    # kvm_mmu_page_fault's pf_taken and pf_fixed, fast_page_fault's pf_fast
                    pf[_mmu._PF_TAKEN] += nr_fast
                    pf[_mmu._PF_FAST] += nr_fast
                    pf[_mmu._PF_FIXED] += nr_fast
                if sl is not None:
                    nr_slow, nr_fixed, nr_spurious, lsi, pfn, writable, last_slow = sl
                    pf[_mmu._PF_TAKEN] += nr_slow
                    pf[_mmu._PF_FIXED] += nr_fixed
                    pf[_mmu._PF_SPURIOUS] += nr_spurious
                    if len(mm.vmas) > 1:            # hva_to_pfn_fast's find_vma hint
                        mm._vma_hint = (mm.vma_gen, vmas[sidx[lsi]])
                if li >= 0:
                    last_c = (li, lec, (pfn, writable) if sl is not None and last_slow else None)
                if status == done:
                    break
                gfn = gfns.item(i)
                w = bool(writes[i]) if writes is not None else write
                if status == give_up:
                    r = lret or (py_last[1] if py_last[0] == i else 0)
                    raise self._guest_access_error(i, gfn, r, int(faults[i]), w, exec)
                if status != slow:              # a mapped exit answered lret
                    raise self._guest_access_error(i, gfn, lret, int(faults[i]), w, exec)
                last_c = None
                r = self.page_fault(vcpu, gfn, write=w, exec=exec)
                py_last = (i, r)
                if r < 0:
                    faults[i] += 1
                    raise self._guest_access_error(i, gfn, r, int(faults[i]), w, exec)
                self._reenter(vcpu)
                if r == RET_PF_EMULATE:
                    faults[i] += 1
                    i += 1                          # the instruction is emulated
                else:
                    taken = 1                       # counted by the next pass
        finally:
            self._guest_access_finish(vcpu, gfns, b.flags, sidx, slots, write, last_c)
        return faults.copy()

    def _guest_access_finish(self, vcpu, gfns, flags, sidx, slots, write, last_c) -> None:
        """What the batch's C passes leave to Python: the dirty bits of the
        gfns a fault made writable in a dirty-logged slot (and, with PML, of
        those whose D bit the CPU set), and ``vcpu.last_fault`` when the last
        exit was the C's (as :func:`kvmmmu.mmu.kvm_mmu_do_page_fault` and,
        for a mapped one, ``kvm_mmu_faultin_pfn`` leave it)."""
        vm = self.vm
        mask = _GA["MADE_WRITABLE"]
        if np.any(write) and vm.kvm_ad_enabled and vm.cpu_dirty_log_size:
            mask |= _GA["DIRTIED"]
        hit = np.flatnonzero(flags & np.uint8(mask))
        if hit.size:
            where = sidx[hit]
            for k in np.unique(where).tolist():
                if k >= 0:
                    with _mmu._dirty_word_lock:
                        _mmu.mark_page_dirty_in_slot(vm, slots[k], gfns[hit[where == k]])
        if last_c is not None:
            gfn = int(gfns[last_c[0]])
            fault = KvmPageFault(gfn << PAGE_SHIFT, last_c[1], False, self.is_tdp,
                                 vm.params.nx_huge_pages and not vm.disable_nx_huge_pages)
            fault.gfn = gfn & ~vm.gfn_direct_bits
            fault.slot = vcpu.gfn_to_memslot(fault.gfn)
            if last_c[2] is not None:               # kvm_mmu_faultin_pfn's fields
                fault.mmu_seq = vm.notifier.mmu_invalidate_seq
                fault.pfn, fault.map_writable = last_c[2]
                fault.host_level = PG_LEVEL_4K
            vcpu.last_fault = fault

    def map_memory(self, vcpu, gfns, *, write: bool = False, private: bool = False) -> np.ndarray:
        """Fault in many gfns of one memslot at once (the populate path, as
        ``KVM_PRE_FAULT_MEMORY`` does, one nogil pass per mapping level):
        the host pages must be present (see ``HostMm.populate``); each gfn is
        mapped at the level ``kvm_mmu_hugepage_adjust`` allows, one fault per
        frame of that level.  Returns, per gfn, the RET_PF_* code of the
        fault that covered it.

        `private` (a TDX VM): private gfns of a guest_memfd slot on the
        mirror root, at 4K, each leaf through the TDX hooks (SEPT.ADD for a
        missing table, AUG - or before FINALIZE the era's initial-image
        path); every gfn must be private (ValueError otherwise)."""
        vm = self.vm
        if private and not self.mirrored:
            raise ValueError("map_memory(private=True) needs a TDX VM (mirror roots)")
        root = (self.vcpu_mirror_root if private else self.vcpu_root).get(vcpu.index)
        if root is None:
            raise ValueError(f"vCPU {vcpu.vcpu_id} has no root: call kvm_mmu_load first")
        gfns = check_array("gfns", gfns)
        out = np.zeros(gfns.shape[0], np.int8)
        if not gfns.size:
            return out
        slot = vcpu.gfn_to_memslot(int(gfns[0]))
        if slot is None or int(gfns.min()) < slot.base_gfn or \
                int(gfns.max()) >= slot.base_gfn + slot.npages:
            raise ValueError("map_memory: every gfn must lie in the memslot of the first one")
        if private:
            return self._map_private(vcpu, root, slot, gfns, out)
        hva = (slot.userspace_addr + ((gfns - np.uint64(slot.base_gfn)) << np.uint64(PAGE_SHIFT)))
        pfn, _ = vm.host.hva_to_pfn_array(hva.astype(np.uint64))
        if not pfn.all():
            raise ValueError("map_memory: host pages missing (populate the VMA first)")
        if slot.kvm_slot_dirty_track_enabled():
            level = np.ones(gfns.shape[0], np.uint8)
        else:
            level = vm.kvm_mmu_max_mapping_level_array(slot, gfns)
        writable = not slot.flags & KVM_MEM_READONLY
        with vm.mmu_lock.read():
            for lvl in np.unique(level):
                idx = np.flatnonzero(level == lvl)
                mask = np.uint64(KVM_PAGES_PER_HPAGE(int(lvl)) - 1)
                g, first = np.unique(gfns[idx] & ~mask, return_index=True)
                p = pfn[idx][first] & ~mask
                r = self.core.map(root.sp, g, p, int(lvl), vcpu.mmu_shadow_page_cache,
                                  vcpu.mmu_page_header_cache, write=write, map_writable=writable,
                                  nx_huge_pages=vm.params.nx_huge_pages)
                out[idx] = r[np.searchsorted(g, gfns[idx] & ~mask)]
        if writable and slot.kvm_slot_dirty_track_enabled():
            vm.mark_page_dirty(gfns[out == RET_PF_FIXED], slot.as_id)
        return out

    def _map_private(self, vcpu, root, slot, gfns, out) -> np.ndarray:
        vm = self.vm
        if not slot.kvm_slot_has_gmem():
            raise ValueError("map_memory(private=True): the memslot has no guest_memfd")
        if not np.all(vm.mem_attrs.get_array(gfns) & np.uint64(KVM_MEMORY_ATTRIBUTE_PRIVATE)):
            raise ValueError("map_memory(private=True): every gfn must be private")
        g, inv = np.unique(gfns, return_inverse=True)
        pfns = slot.gmem.get_pfn_array(slot, g)
        self._faulting.vcpu = vcpu
        self._faulting.refill = True        # a batch may need more than one topup's pages
        try:
            with vm.mmu_lock.read():
                r = self.core.map(root.sp, g, pfns, PG_LEVEL_4K, vcpu.mmu_shadow_page_cache,
                                  vcpu.mmu_page_header_cache, write=True,
                                  map_writable=not slot.flags & KVM_MEM_READONLY)
        finally:
            self._faulting.refill = False
        out[:] = r[inv]
        return out

    def translate(self, vcpu_or_as_id, gfns, *, mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``kvm_tdp_mmu_get_walk`` for an array of (unaliased) gfns on the
        valid direct root - or with `mirror` the mirror root - of an address
        space (a vCPU's, or the first valid root of an as_id): ``(sptes,
        levels)`` of the last entry each walk reached."""
        if isinstance(vcpu_or_as_id, int):
            roots = [r for r in self._valid_roots(vcpu_or_as_id) if r.is_mirror == bool(mirror)]
            if not roots:
                raise ValueError(f"no valid {'mirror' if mirror else 'direct'} root for as_id "
                                 f"{vcpu_or_as_id}")
            root = roots[0]
        else:
            root = (self.vcpu_mirror_root if mirror else self.vcpu_root)[vcpu_or_as_id.index]
        return kvm_tdp_mmu_get_walk(self.vm.arena, root.sp, check_array("gfns", gfns))

    # ------------------------------------------------------------------ TDX entry points
    #: kvm_tdp_mmu_map_private_pfn: RET_PF_RETRY turns taken before giving
    #: up as a pending signal would (-EINTR); the kernel loops until then
    MAX_PREFAULT_RETRIES = _mmu.MAX_PREFAULT_RETRIES

    def kvm_tdp_map_page(self, vcpu, gpa: int, error_code: int) -> tuple[int, int]:
        """:func:`kvmmmu.mmu.kvm_tdp_map_page` (the TDX side calls it here)."""
        return _mmu.kvm_tdp_map_page(vcpu, gpa, error_code)

    def kvm_tdp_mmu_gpa_is_mapped(self, vcpu, gpa: int) -> bool:
        """``kvm_tdp_mmu_gpa_is_mapped`` (v6.18): a present leaf for `gpa` in
        the vCPU's mirror root (private gpa) or direct root (shared gpa)."""
        vm = self.vm
        mirror = self.mirrored and not gpa >> PAGE_SHIFT & vm.gfn_direct_bits
        root = (self.vcpu_mirror_root if mirror else self.vcpu_root).get(vcpu.index)
        if root is None:
            return False
        gfn = (gpa >> PAGE_SHIFT) & ~vm.gfn_direct_bits
        spte, level = kvm_tdp_mmu_get_walk(vm.arena, root.sp, np.array([gfn], np.uint64))
        lvl = int(level[0])
        return lvl > 0 and bool(int(spte[0]) & SPTE_MMU_PRESENT_MASK) and \
            (lvl == 1 or bool(int(spte[0]) >> 7 & 1))

    def kvm_tdp_mmu_map_private_pfn(self, vcpu, gfn: int, pfn: int) -> int:
        """``kvm_tdp_mmu_map_private_pfn`` (Gen B's initial image): map
        private `gfn` to `pfn` at 4K on the mirror root as a synthetic
        prefetch fault (GUEST_FINAL | PRIVATE_ACCESS, writable), looping on
        RET_PF_RETRY; -EPERM for a write-tracked gfn, -EIO when the VM is
        bugged or the map ends in anything but RET_PF_FIXED."""
        vm = self.vm
        gfn = int_arg("gfn", gfn, 0, (1 << 40) - 1)
        pfn = int_arg("pfn", pfn, 0, (1 << 40) - 1)
        if not self.mirrored:
            vm.kvm_bug("kvm_tdp_mmu_map_private_pfn without mirrored TDP")
            return -E.EIO
        slot = vcpu.gfn_to_memslot(gfn)
        if slot is None or gfn & vm.gfn_direct_bits:
            return -E.EFAULT
        track = slot.arch.gfn_write_track
        if vm.kvm_page_track_write_tracking_enabled and track is not None and \
                track[gfn - slot.base_gfn]:
            return -E.EPERM
        if _mmu.kvm_mmu_reload(vcpu):
            return -E.EIO
        flags = 4 | (0 if slot.flags & KVM_MEM_READONLY else 8)    # prefetch, map_writable
        for _ in range(self.MAX_PREFAULT_RETRIES):
            if vm.warn_sink.bugged:
                return -E.EIO
            try:
                vcpu.mmu_topup_memory_caches(False)
            except KvmNoMemoryError:
                return -E.ENOMEM
            root = self.vcpu_mirror_root.get(vcpu.index)
            if root is None:
                return -E.EIO
            self._faulting.vcpu = vcpu
            with vm.mmu_lock.read():
                r = self.core.page_fault_map(root.sp, gfn, pfn, PG_LEVEL_4K, PG_LEVEL_4K, flags, 0,
                                             vcpu.mmu_shadow_page_cache, vcpu.mmu_page_header_cache)
            if r != RET_PF_RETRY:
                return 0 if r == RET_PF_FIXED else (r if r < 0 else -E.EIO)
        return -E.EINTR

    # ------------------------------------------------------------------ hooks
    def _zap_range(self, as_id, start, end, roots=None) -> bool:
        flush = False
        for r in (self.roots if roots is None else roots):
            if as_id is None or r.as_id == as_id:
                flush |= self.core.zap_leafs(r.sp, start, end)
        return flush

    def _filter_roots(self, attr_filter: int, with_invalid: bool = True) -> list:
        """``kvm_gfn_range_filter_to_root_types``: PRIVATE -> the mirror
        roots, SHARED -> the direct ones (every root is direct without
        mirrored TDP); invalid roots too when `with_invalid`."""
        if not self.mirrored:
            return [r for r in self.roots if with_invalid or not r.invalid]
        return [r for r in self.roots if (with_invalid or not r.invalid) and
                attr_filter & (KVM_FILTER_PRIVATE if r.is_mirror else KVM_FILTER_SHARED)]

    def kvm_unmap_gfn_range(self, rng) -> bool:
        # the filter's roots, valid or not (an invalid root may still be in use by a vCPU)
        return self._zap_range(rng.slot.as_id, rng.start, rng.end,
                               self._filter_roots(rng.attr_filter))

    def kvm_age_gfn(self, rng) -> bool:
        # (the notifiers' SHARED filter: never a mirror root)
        young = False
        for r in self._filter_roots(rng.attr_filter, False):
            if r.as_id == rng.slot.as_id:
                young |= self.core.age_gfn_range(r.sp, rng.start, rng.end)
        return young

    def kvm_test_age_gfn(self, rng) -> bool:
        return any(self.core.age_gfn_range(r.sp, rng.start, rng.end, test_only=True)
                   for r in self._filter_roots(rng.attr_filter, False)
                   if r.as_id == rng.slot.as_id)

    def kvm_zap_gfn_range(self, gfn_start, gfn_end) -> bool:
        return self._zap_range(None, gfn_start, gfn_end)

    def kvm_arch_flush_shadow_memslot(self, slot) -> None:
        """``kvm_mmu_zap_memslot``: the slot's leaves in every root (mirror
        ones too: a TD's filter is PRIVATE | SHARED), under ``mmu_lock`` for
        write."""
        with self.vm.mmu_lock.write():
            if self._zap_range(slot.as_id, slot.base_gfn, slot.base_gfn + slot.npages):
                self.vm.kvm_flush_remote_tlbs()

    def kvm_arch_flush_shadow_all(self) -> None:
        """``kvm_mmu_zap_all``: zap every direct root (the roots stay until
        put); never a mirror root, whose pages the TD still uses."""
        for r in list(self.roots):
            if not r.is_mirror:
                self.core.zap_root(r.sp)
        self.vm.kvm_flush_remote_tlbs()

    def kvm_mmu_zap_all_fast(self) -> None:
        self.kvm_tdp_mmu_invalidate_roots()
        self.kvm_tdp_mmu_zap_invalidated_roots()

    def kvm_mmu_recover_huge_pages(self, slot) -> None:
        if slot.kvm_slot_dirty_track_enabled():
            self.vm.warn_sink.warn("recover_huge_pages_range", "slot still logs dirty pages")
            return
        base = slot.base_gfn & ~(KVM_PAGES_PER_HPAGE(PG_LEVEL_2M) - 1)
        end = slot.base_gfn + slot.npages
        # kvm_mmu_max_mapping_level at each 2M frame's first gfn (the slot's
        # first gfn for a partial first frame, which is never recovered)
        frames = np.maximum(np.arange(base, end, KVM_PAGES_PER_HPAGE(PG_LEVEL_2M), dtype=np.uint64),
                            np.uint64(slot.base_gfn))
        ml = self.vm.kvm_mmu_max_mapping_level_array(slot, frames).astype(np.int8)
        n = 0
        for r in self._valid_roots(slot.as_id):
            n += self.core.recover_huge_pages(r.sp, base, end - base, ml,
                                              nx_huge_pages=self.vm.params.nx_huge_pages)
        if n:
            self.vm.kvm_flush_remote_tlbs()

    def kvm_mmu_slot_try_split_huge_pages(self, slot, target_level) -> None:
        """Eager page split: the tables come from the VM's split caches
        (``kvm->arch.split_shadow_page_cache`` / ``split_page_header_cache``),
        not a vCPU's: a VM may log dirty pages before it has vCPUs.

        Best effort, like ``kvm_tdp_mmu_try_split_huge_pages``: when a page
        cannot be had the walk stops at the first root that failed (the
        core traced -ENOMEM) and the huge leaves left are write-protected
        (or cleaned) by the caller, ``kvm_mmu_slot_apply_flags``."""
        for r in self._valid_roots(slot.as_id):
            try:
                self.core.split_huge_pages(r.sp, slot.base_gfn, slot.base_gfn + slot.npages,
                                           target_level, self.split_shadow_page_cache,
                                           self.split_page_header_cache,
                                           nx_huge_pages=self.vm.params.nx_huge_pages)
            except KvmNoMemoryError:
                break

    def _dbit(self, root) -> int:
        # tdp_mmu_need_write_protect: no A/D bits (or a nested root under PML)
        if not self.vm.fmt.masks()["ad_enabled"] or root.role.guest_mode:
            return PT_WRITABLE_MASK
        return self.vm.fmt.masks()["dirty_mask"]

    def kvm_mmu_slot_leaf_clear_dirty(self, slot) -> None:
        for r in self._valid_roots(slot.as_id):
            self.core.clear_bit_range(r.sp, slot.base_gfn, slot.base_gfn + slot.npages,
                                      self._dbit(r))

    def kvm_mmu_slot_remove_write_access(self, slot, start_level) -> None:
        for r in self._valid_roots(slot.as_id):
            self.core.clear_bit_range(r.sp, slot.base_gfn, slot.base_gfn + slot.npages,
                                      PT_WRITABLE_MASK, min_level=start_level)

    def kvm_arch_mmu_enable_log_dirty_pt_masked(self, slot, gfn_offset, mask) -> None:
        pml = bool(self.vm.cpu_dirty_log_size)
        gfn = slot.base_gfn + gfn_offset
        base, shift = gfn & ~63, gfn & 63
        words = np.array([(mask << shift) & ((1 << 64) - 1), mask >> (64 - shift) if shift else 0],
                         np.uint64)
        for r in self._valid_roots(slot.as_id):
            self.core.clear_dirty_log(r.sp, base, words, wrprot=not pml or
                                      self._dbit(r) == PT_WRITABLE_MASK)

    # ------------------------------------------------------------------ NX huge pages
    def kvm_recover_nx_huge_pages(self, ratio: int | None = None) -> int:
        """One run of the "kvm-nx-lpage-recovery" task for the TDP MMU: zap
        the oldest ``ceil(nx_lpage_splits / ratio)`` possible NX huge pages
        (``nx_huge_pages_recovery_ratio``; 0 turns recovery off), except
        that a page whose memslot logs dirty pages is only taken off the
        list.  Returns the pages zapped."""
        vm = self.vm
        ratio = vm.params.nx_huge_pages_recovery_ratio if ratio is None else \
            int_arg("ratio", ratio, 0, 1 << 31)
        n = self.core.nx_lpage_splits
        to_zap = -(-n // ratio) if ratio else 0
        zapped = 0
        with vm.mmu_lock.read():
            for sp in self.core.possible_nx_huge_pages()[:to_zap]:
                h = vm.arena.get_sp(sp)
                slot = vm.gfn_to_memslot(h["gfn"], KvmMmuPageRole(h["role"]).smm)
                logging = slot is not None and slot.kvm_slot_dirty_track_enabled()
                zapped += self.core.recover_nx_huge_page(sp, zap=not logging)
            vm.stat.nx_lpage_splits = self.core.nx_lpage_splits
        if zapped:
            vm.kvm_flush_remote_tlbs()
        return zapped

    # ------------------------------------------------------------------ audit
    def audit(self) -> list[str]:
        """The TDP invariants (tdp-mmu.md §12), by one nogil walk of the
        tables (:func:`kvmmmu._core.tdp_audit.tdp_audit`): ``pages_4k/2m/1g``
        equal the leaves per level under the roots, ``tdp_mmu_pages`` the
        linked non-root tables, one parent per table (its header agreeing),
        no FROZEN entry, every leaf inside a memslot of its address space and
        not above the slot's alignment level, the writable invariants, the
        possible-NX list made of linked flagged tables; the refcounts are
        positive.  Returns the violations (empty when clean)."""
        from kvmmmu._core.tdp_audit import tdp_audit
        bad = []
        for r in self.roots:
            if r.refcount <= 0:
                bad.append(f"{r}: refcount {r.refcount}")
        slots = [slot for space in self.vm.memslots for slot in space]
        top = self.vm.max_huge_page_level
        counts, problems = tdp_audit(
            self.vm.arena, np.array([r.sp for r in self.roots], np.uint64),
            np.array([s.base_gfn for s in slots], np.uint64),
            np.array([s.npages for s in slots], np.uint64),
            np.array([self._aligned_level(s, top) for s in slots], np.int8),
            np.array([s.as_id for s in slots], np.int8),
            np.array(self.core.possible_nx_huge_pages(), np.uint64))
        for kind, ri, g, lvl, val in problems.tolist():
            bad.append(self._audit_message(self.roots[ri] if ri >= 0 else None, kind, g, lvl, val))
        if counts["problems"] > len(problems):
            bad.append(f"... and {counts['problems'] - len(problems)} more")
        if counts["tables"] != self.core.tdp_mmu_pages:
            bad.append(f"tdp_mmu_pages {self.core.tdp_mmu_pages} != {counts['tables']} tables reachable")
        stats = self.vm.arena.page_stats
        got = {1: stats["pages_4k"], 2: stats["pages_2m"], 3: stats["pages_1g"]}
        leaves = {k: counts["leaves"][k] for k in (1, 2, 3)}
        if got != leaves or counts["leaves"][4] or counts["leaves"][5]:
            bad.append(f"page stats {got} != leaves {counts['leaves']}")
        nx = self.core.possible_nx_huge_pages()
        if len(nx) != self.core.nx_lpage_splits:
            bad.append(f"possible NX list holds {len(nx)}, nx_lpage_splits {self.core.nx_lpage_splits}")
        for msg, n in self.core.warnings().items():
            bad.append(f"{n}x {msg}")
        return bad

    def audit_mirror(self) -> list[str]:
        """The mirror invariants (mirror-tdx.md §12) against the TDX module's
        S-EPT (``vm.tdx``): every present mirror 4K leaf of gfn G and pfn P
        has the S-EPT leaf (tdx level 0, G) PENDING or MAPPED on P (M1),
        every present mirror table entry at level L the S-EPT entry (L-1)
        NL_MAPPED on the child's ``external_spt`` (M2), and the S-EPT has no
        entry the mirror lacks - except, in v6.18 before FINALIZE, the
        "premapped" leaves ``nr_premapped`` counts.  No mirror leaf above 4K
        (M9), none on a shared gfn, and no direct-root leaf on a private gfn
        (M12: the shared EPT never maps private memory).  Returns the
        violations."""
        vm = self.vm
        if not self.mirrored:
            return []
        bad = []
        tdx = vm.tdx
        mirror = {}
        for r in self.roots:
            d = self.core.dump(r.sp)
            if r.is_mirror:
                if r.invalid:
                    continue
                for e in d.tolist():
                    gfn, level, spte, leaf, _sp, ext = e
                    if leaf:
                        if level != 1:
                            bad.append(f"M9: mirror leaf at level {level}, gfn {gfn:#x}")
                        if not vm.kvm_mem_is_private(gfn):
                            bad.append(f"mirror leaf on shared gfn {gfn:#x}")
                        mirror[(level - 1, gfn << PAGE_SHIFT)] = \
                            ("leaf", (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT)
                    else:
                        mirror[(level - 1, gfn << PAGE_SHIFT)] = ("table", ext)
            else:
                for e in d[d["leaf"]].tolist():
                    gfn, level = e[0], e[1]
                    attrs = vm.mem_attrs.get_array(
                        np.arange(gfn, gfn + KVM_PAGES_PER_HPAGE(level), dtype=np.uint64))
                    if np.any(attrs & np.uint64(KVM_MEMORY_ATTRIBUTE_PRIVATE)):
                        bad.append(f"{r}: shared EPT leaf at gfn {gfn:#x} level {level} "
                                   f"maps private memory")
        if tdx.td is None:
            if mirror:
                bad.append(f"{len(mirror)} mirror entries but no TD")
            return bad
        sept = tdx.module.sept_snapshot(tdx.td)
        premapped = 0
        for key, (kind, pfn) in mirror.items():
            got = sept.get(key)
            lvl, gpa = key
            if kind == "leaf":
                if got is None and tdx.era == "v6.18" and not tdx.pre_fault_allowed:
                    premapped += 1
                elif got is None or got[0] not in ("PENDING", "MAPPED") or got[1] != pfn:
                    bad.append(f"M1: mirror leaf gpa {gpa:#x} pfn {pfn:#x}, S-EPT has {got}")
            elif got is None or got[0] != "NL_MAPPED" or got[1] != pfn:
                bad.append(f"M2: mirror table entry tdx level {lvl} gpa {gpa:#x} (external_spt "
                           f"{pfn:#x}), S-EPT has {got}")
        for key, got in sept.items():
            if key not in mirror:
                bad.append(f"S-EPT entry tdx level {key[0]} gpa {key[1]:#x} {got} has no mirror entry")
        if tdx.era == "v6.18" and premapped != tdx.nr_premapped:
            bad.append(f"{premapped} premapped mirror leaves, nr_premapped {tdx.nr_premapped}")
        if self.external_ops.errors:
            bad.append(f"external hooks raised: {self.external_ops.errors!r}")
        return bad

    @staticmethod
    def _audit_message(r, kind: int, g: int, lvl: int, val: int) -> str:
        """The text of one problem of tdp_audit (kind: PROBLEM_KINDS)."""
        if kind == 0:
            return f"{r}: FROZEN SPTE left at gfn {g:#x} level {lvl}"
        if kind == 1:
            return (f"{r}: non-leaf SPTE {val:#x} at gfn {g:#x} level {lvl} points to no live "
                    f"table of the arena")
        if kind == 2:
            return f"{r}: table pfn {val:#x} linked a second time at gfn {g:#x} level {lvl}"
        if kind == 3:
            return (f"{r}: sp {val} linked at gfn {g:#x} level {lvl}: its header's level, gfn "
                    f"or ptep disagree")
        if kind == 4:
            return f"{r}: leaf {val:#x} at gfn {g:#x} level {lvl} outside every memslot"
        if kind == 5:
            return f"{r}: leaf at gfn {g:#x} level {lvl} above its memslot's max level {val}"
        if kind == 6:
            return f"{r}: leaf {val:#x} at gfn {g:#x} level {lvl} breaks the writable invariants"
        if kind == 7:
            return f"sp {val} on the possible NX list is not a flagged TDP table"
        return f"{r}: sp {val} is not a live TDP root"

    @staticmethod
    def _aligned_level(slot, top: int) -> int:
        """The highest level a leaf in `slot` may have whatever the host
        maps: where the slot's gfns and host addresses are co-aligned
        (kvm_alloc_memslot_metadata disallows the other levels), at most
        ``max_huge_page_level``."""
        level = 1
        ugfn = slot.userspace_addr >> PAGE_SHIFT
        while level < top and not (slot.base_gfn ^ ugfn) & (KVM_PAGES_PER_HPAGE(level + 1) - 1):
            level += 1
        return level
