"""The KVM side of TDX as the MMU sees it (``arch/x86/kvm/vmx/tdx.c``): the TD's
state, the four ``kvm_x86_ops`` external hooks the mirror root calls, and the
ioctls of a TD's life cycle, over a TDX-module model (:mod:`kvmmmu.tdx_module`).

Reference: ``mirror-tdx.md`` (§2.3 EPT violations, §4 hooks, §5 mapping flows,
§7 SEAMCALL sequences, §8 errors and BUSY, §9.4 TD states, §11 failure policy).
A VM of type ``"tdx"`` owns one :class:`KvmTdx` as ``vm.tdx``::

    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", nr_vcpus=2)
    tdx = vm.tdx
    tdx.init_vm()                                   # KVM_TDX_INIT_VM: HKID, TDR, shared bit
    for v in vm.vcpus:
        tdx.init_vcpu(v)                            # KVM_TDX_INIT_VCPU
    slot = vm.add_memory(0, 1 << 30, guest_memfd=True)
    vm.set_memory_attributes(0, 1 << 30, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    tdx.init_mem_region(vm.vcpus[0], 0, 16, src_hva)  # KVM_TDX_INIT_MEM_REGION: the image
    tdx.finalize_vm()                               # KVM_TDX_FINALIZE_VM
    tdx.handle_ept_violation(vm.vcpus[0], 0x200000)   # a private fault: SEPT.ADD..., AUG
    tdx.destroy_vm()                                # teardown in the kernel's order

Code generations (``era``, mirror-tdx.md §0)
-------------------------------------------
``"v6.18"`` (the modelled kernel, "Gen A"; this host's BTF has its hook
prototypes): ``set_external_spte`` / ``remove_external_spte`` take the pfn,
the latter returns int; private pages are pinned while mapped (``pins``);
before FINALIZE ``set_external_spte`` only counts the page in
``nr_premapped`` (the mirror leaf exists, the S-EPT leaf not yet) and the
populate callback of ``KVM_TDX_INIT_MEM_REGION`` issues PAGE.ADD; a removal
forces one retry of a BUSY SEAMCALL between ``tdx_no_vcpus_enter_start`` and
``_stop``.  ``"genB"``: the hooks take the mirror SPTE, removal is void (the
TDX side bugs the VM on error), no pinning, PAGE.ADD is issued inside
``set_external_spte`` from ``page_add_src``, the forced retry is
``tdh_do_no_vcpus``.

Invariants (checked by :meth:`KvmTdx.audit`, with the module's own audit):

* M7: a private page is removed BLOCK -> TRACK (only once RUNNABLE) + every
  vCPU out of guest mode -> PAGE.REMOVE -> PHYMEM.PAGE.WBINVD -> reset;
* M8: private leaves go while the HKID is assigned; S-EPT pages are reclaimed
  only after it is freed; SEPT.REMOVE is never issued;
* M10: PAGE.ADD only before FINALIZE, PAGE.AUG only after;
* M15: ``wait_for_sept_zap`` => no vCPU enters the TD;
* v6.18: ``nr_premapped`` >= 0 and 0 after FINALIZE; every pinned pfn is
  pinned once.

Errors follow the kernel: the hooks and ioctls return 0 or a negative errno;
a SEAMCALL failure the kernel does not expect bugs the VM (``vm.kvm_bug``:
every later ioctl fails with -EIO).  Wrong Python input raises.

Not modelled: TDH.MR.EXTEND (the MEASURE flag counts the 256-byte chunks in
``nr_extended``), TDH.VP.FLUSH / MNG.VPFLUSHDONE / PHYMEM.CACHE.WB (folded
into the module's ``tdh_mng_key_freeid``), TDCS/TDCX pages, CPUID/attribute
configuration beyond the GPA width.
"""
from __future__ import annotations

import collections
import errno as E
import itertools
import time

from kvmmmu._core._checks import int_arg
from kvmmmu._core.defs import PAGE_SHIFT, PG_LEVEL_4K, RET_PF_RETRY
from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmmmu.mmu import (
    PFERR_FETCH_MASK, PFERR_GUEST_FINAL_MASK, PFERR_PRESENT_MASK, PFERR_PRIVATE_ACCESS,
    PFERR_USER_MASK, PFERR_WRITE_MASK,
)
from kvmmmu.tdx_module import TDX_EPT_ENTRY_STATE_INCORRECT, TdxModule

__all__ = ["KvmTdx", "TD_STATE_UNINITIALIZED", "TD_STATE_INITIALIZED", "TD_STATE_RUNNABLE",
           "KVM_TDX_MEASURE_MEMORY_REGION", "TDX_EXTENDMR_CHUNKSIZE"]

TD_STATE_UNINITIALIZED = 0
TD_STATE_INITIALIZED = 1
TD_STATE_RUNNABLE = 2

#: ``KVM_TDX_INIT_MEM_REGION`` flag: extend the TD measurement with each page
KVM_TDX_MEASURE_MEMORY_REGION = 1 << 0
#: bytes one TDH.MR.EXTEND measures
TDX_EXTENDMR_CHUNKSIZE = 256
_STATUS_MASK = 0xFFFFFFFF00000000        # TDX_SEAMCALL_STATUS_MASK
_SPTE_PFN_MASK = ((1 << 52) - 1) & ~0xFFF
_RWX = 7
#: local retries of a private EPT violation before giving up (the kernel
#: loops until a signal or a pending event; RET_PF_RETRY comes back)
MAX_LOCAL_RETRIES = 1000

_hkids = itertools.count(16)             # the host's HKID allocator (tdx_guest_keyid_alloc)


class KvmTdx:
    """``struct kvm_tdx``: one TD of a VM with ``vm_type="tdx"``.

    Attributes
    ----------
    era : {"v6.18", "genB"}
    module : TdxModule
        The TDX module this TD lives in (shareable between VMs).
    state : int
        ``TD_STATE_UNINITIALIZED`` / ``INITIALIZED`` / ``RUNNABLE``.
    td : TdHandle or None
        The module's handle of the TD (after :meth:`init_vm`).
    hkid : int or None
        The private key id while assigned (None before INIT_VM and after
        :meth:`release_hkid`).
    nr_premapped : int
        v6.18: mirror leaves mapped before FINALIZE whose PAGE.ADD is still
        to come.
    page_add_src : int or None
        Gen B: the source pfn of the PAGE.ADD that ``set_external_spte``
        issues during ``KVM_TDX_INIT_MEM_REGION``.
    wait_for_sept_zap : bool
        Set while a removal SEAMCALL is retried with every vCPU kept out.
    pre_fault_allowed : bool
        ``kvm->arch.pre_fault_allowed``: set by FINALIZE.
    pins : collections.Counter
        v6.18: pfn -> references taken by ``get_page`` (each mapped private
        page once).
    nr_extended : int
        MR.EXTEND chunks the MEASURE flag asked for (not modelled further).

    Thread-safety: the hooks run with ``mmu_lock`` held (read for the map
    side, from several vCPU threads; write for removals) and touch only
    counters and the module (which locks itself); the ioctls run under the
    VM's ``api_lock`` like the kernel's "all locks" guard.
    """

    ERAS = ("v6.18", "genB")

    def __init__(self, vm, *, module: TdxModule | None = None, era: str = "v6.18"):
        if era not in self.ERAS:
            raise ValueError(f"era must be one of {self.ERAS}, not {era!r}")
        if module is None:
            module = TdxModule(era=era)
        elif not isinstance(module, TdxModule):
            raise TypeError(f"module must be a TdxModule, not {type(module).__name__}")
        elif module.era != era:
            raise ValueError(f"the module speaks era {module.era!r}, the TD {era!r}")
        self.vm = vm
        self.era = era
        self.module = module
        self.state = TD_STATE_UNINITIALIZED
        self.td = None
        self.hkid = None
        self.tdr_pfn = None
        self.nr_premapped = 0
        self.page_add_src = None
        self.wait_for_sept_zap = False
        self.pre_fault_allowed = False
        self.pins: collections.Counter = collections.Counter()
        self.nr_extended = 0
        #: vCPU index -> its TDVPR page (after init_vcpu)
        self.tdvpr: dict[int, int] = {}

    def __repr__(self):
        state = ("UNINITIALIZED", "INITIALIZED", "RUNNABLE")[self.state]
        return (f"KvmTdx({self.era}, {state}, hkid={self.hkid}, "
                f"{len(self.tdvpr)} vcpus, nr_premapped={self.nr_premapped})")

    # ------------------------------------------------------------------ helpers
    def _bug(self, what: str, result=None) -> int:
        """KVM_BUG_ON / TDX_BUG_ON: the VM is bugged; -EIO."""
        self.vm.kvm_bug(f"{what}" + ("" if result is None else f": {result.status_name}"),
                        site="tdx")
        return -E.EIO

    def _lv(self, level: int) -> int:
        """The level argument of the module's wrappers for pg_level `level`
        (v6.18: the TDX level, ``level - 1``; Gen B: the pg_level)."""
        return level - 1 if self.era == "v6.18" else level

    def _hkid_assigned(self) -> bool:
        return self.hkid is not None

    def kick_all(self) -> None:
        """``kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE)``: returns
        once every vCPU is out of guest mode."""
        m, td = self.module, self.td
        for v in m.vcpus_in_guest(td):
            m.td_exit(td, v)

    def _no_vcpus(self, call, *args):
        """A removal SEAMCALL with its one forced retry (v6.18:
        ``tdx_no_vcpus_enter_start/stop``; Gen B: ``tdh_do_no_vcpus``): BUSY
        -> keep every vCPU out (``wait_for_sept_zap``), kick them, call
        again.  Returns the last result."""
        r = call(self.td, *args)
        if r.busy:
            self.wait_for_sept_zap = True
            self.kick_all()
            try:
                r = call(self.td, *args)
            finally:
                self.wait_for_sept_zap = False
        return r

    # ------------------------------------------------------------------ kvm_x86_ops hooks
    def link_external_spt(self, gfn: int, level: int, external_spt: int) -> int:
        """``link_external_spt`` (``tdx_sept_link_private_spt``): TDH.MEM.SEPT.ADD
        of `external_spt` as the S-EPT page behind the entry at `level`
        covering `gfn`.  BUSY -> -EBUSY (the fault retries); another error
        bugs the VM (-EIO)."""
        r = self.module.tdh_mem_sept_add(self.td, gfn << PAGE_SHIFT, self._lv(level),
                                         external_spt)
        if r.ok:
            return 0
        if r.busy:
            return -E.EBUSY
        return self._bug(f"SEPT.ADD gfn {gfn:#x} level {level}", r)

    def set_external_spte(self, gfn: int, level: int, pfn_or_spte: int) -> int:
        """``set_external_spte``: map the private page of `gfn` (v6.18: its
        pfn; Gen B: the mirror SPTE).  4K only.  RUNNABLE: TDH.MEM.PAGE.AUG.
        Before FINALIZE, v6.18 counts the page premapped (no SEAMCALL) and
        Gen B issues TDH.MEM.PAGE.ADD from ``page_add_src``.  BUSY -> -EBUSY,
        other errors bug the VM."""
        vm = self.vm
        if not self._hkid_assigned():
            return self._bug("set_external_spte without an HKID")
        if level != PG_LEVEL_4K:
            return self._bug(f"set_external_spte at level {level}")
        gpa = gfn << PAGE_SHIFT
        if self.era == "v6.18":
            pfn = pfn_or_spte
            self.pins[pfn] += 1                         # get_page
            if self.state == TD_STATE_RUNNABLE:
                r = self.module.tdh_mem_page_aug(self.td, gpa, self._lv(level), pfn)
                if r.ok:
                    return 0
                self._unpin(pfn)
                if r.busy:
                    return -E.EBUSY
                return self._bug(f"PAGE.AUG gfn {gfn:#x}", r)
            # tdx_mem_page_record_premap_cnt
            if self.pre_fault_allowed:
                self._unpin(pfn)
                return self._bug("premapping after pre_fault_allowed")
            self.nr_premapped += 1
            return 0
        spte = pfn_or_spte
        if not spte & 1 << 11 or (spte & _RWX) != _RWX:       # SPTE_MMU_PRESENT, RWX
            vm.warn_sink.warn("tdx_sept_set_private_spte",
                              f"mirror SPTE {spte:#x} not present or not RWX", once=True)
        pfn = (spte & _SPTE_PFN_MASK) >> PAGE_SHIFT
        if self.state == TD_STATE_RUNNABLE:
            r = self.module.tdh_mem_page_aug(self.td, gpa, self._lv(level), pfn)
            what = "PAGE.AUG"
        else:
            if self.pre_fault_allowed or self.page_add_src is None:
                return self._bug("PAGE.ADD without a source page (not from INIT_MEM_REGION)")
            r = self.module.tdh_mem_page_add(self.td, gpa, pfn, self.page_add_src)
            what = "PAGE.ADD"
        if r.ok:
            return 0
        if r.busy:
            return -E.EBUSY
        return self._bug(f"{what} gfn {gfn:#x}", r)

    def _unpin(self, pfn: int) -> None:
        n = self.pins[pfn] - 1
        if n < 0:
            self.vm.warn_sink.warn("tdx_unpin", f"pfn {pfn:#x} unpinned more than pinned")
        if n <= 0:
            del self.pins[pfn]
        else:
            self.pins[pfn] = n

    def remove_external_spte(self, gfn: int, level: int, pfn_or_spte: int):
        """``remove_external_spte`` (write lock held): unmap the private page
        of `gfn`: RANGE.BLOCK, TRACK (only once RUNNABLE) with every vCPU
        kicked out of guest mode, PAGE.REMOVE, PHYMEM.PAGE.WBINVD, page reset
        (M7); BLOCK, TRACK and REMOVE get one forced retry on BUSY.  v6.18
        returns 0 or -errno (a page premapped before FINALIZE: BLOCK finds no
        leaf, the count drops, 0); Gen B returns None and bugs the VM itself
        on any failure."""
        if not self.vm.mmu_lock.writers:
            self.vm.warn_sink.warn("remove_external_spte", "mmu_lock not held for write")
        if self.era == "v6.18":
            return self._remove_v618(gfn, level, pfn_or_spte)
        self._remove_genb(gfn, level, (pfn_or_spte & _SPTE_PFN_MASK) >> PAGE_SHIFT)
        return None

    def _remove_v618(self, gfn, level, pfn) -> int:
        if not self._hkid_assigned():
            return self._bug(f"remove_external_spte gfn {gfn:#x} after the HKID release")
        if level != PG_LEVEL_4K:
            return self._bug(f"remove_external_spte at level {level}")
        gpa, lv, m = gfn << PAGE_SHIFT, self._lv(level), self.module
        # tdx_sept_zap_private_spte
        r = self._no_vcpus(m.tdh_mem_range_block, gpa, lv)
        if (r.status & _STATUS_MASK) == TDX_EPT_ENTRY_STATE_INCORRECT and \
                self.state != TD_STATE_RUNNABLE:
            # a premapped page: no S-EPT leaf yet
            if self.nr_premapped <= 0:
                return self._bug("premapped zap with nr_premapped 0")
            self.nr_premapped -= 1
            self._unpin(pfn)
            return 0
        if not r.ok:
            return self._bug(f"RANGE.BLOCK gfn {gfn:#x}", r)
        self._track()
        # tdx_sept_drop_private_spte
        r = self._no_vcpus(m.tdh_mem_page_remove, gpa, lv)
        if not r.ok:
            return self._bug(f"PAGE.REMOVE gfn {gfn:#x}", r)
        r = m.tdh_phymem_page_wbinvd_hkid(self.hkid, pfn)
        if not r.ok:
            return self._bug(f"PHYMEM.PAGE.WBINVD pfn {pfn:#x}", r)
        self._unpin(pfn)                                # tdx_clear_page, put_page
        return 0

    def _remove_genb(self, gfn, level, pfn) -> None:
        if not self._hkid_assigned() or level != PG_LEVEL_4K:
            self._bug(f"remove_external_spte gfn {gfn:#x} level {level} "
                      f"{'after the HKID release' if not self._hkid_assigned() else ''}")
            return
        gpa, lv, m = gfn << PAGE_SHIFT, self._lv(level), self.module
        r = self._no_vcpus(m.tdh_mem_range_block, gpa, lv)
        if not r.ok:
            self._bug(f"RANGE.BLOCK gfn {gfn:#x}", r)
            return
        if self._track():
            return
        r = self._no_vcpus(m.tdh_mem_page_remove, gpa, lv)
        if not r.ok:
            self._bug(f"PAGE.REMOVE gfn {gfn:#x}", r)
            return
        r = m.tdh_phymem_page_wbinvd_hkid(self.hkid, pfn)
        if not r.ok:
            self._bug(f"PHYMEM.PAGE.WBINVD pfn {pfn:#x}", r)

    def _track(self) -> int:
        """``tdx_track``: TDH.MEM.TRACK (forced retry on BUSY) and every vCPU
        kicked out of guest mode; nothing before FINALIZE (no vCPU ever ran).
        Returns -EIO when the VM was bugged."""
        if self.state != TD_STATE_RUNNABLE:
            return 0
        r = self._no_vcpus(self.module.tdh_mem_track)
        rc = 0 if r.ok else self._bug("MEM.TRACK", r)
        self.kick_all()
        return rc

    def free_external_spt(self, gfn: int, level: int, external_spt: int) -> int:
        """``free_external_spt``: give the S-EPT page back with
        TDH.PHYMEM.PAGE.RECLAIM (and reset it).  Only after the HKID was
        released (a KVM bug before: -EIO); a failed RECLAIM returns -EIO
        and the MMU leaks the page."""
        if self._hkid_assigned():
            return self._bug(f"free_external_spt gfn {gfn:#x} level {level} with the HKID assigned")
        r = self.module.tdh_phymem_page_reclaim(external_spt)
        return 0 if r.ok else -E.EIO

    # ------------------------------------------------------------------ life cycle
    def init_vm(self, *, gpaw: int = 48) -> int:
        """``KVM_TDX_INIT_VM``: take an HKID and a TDR page, TDH.MNG.CREATE
        (with KEY.CONFIG, ADDCX, MNG.INIT folded in), and the shared bit:
        GPA bit 47 (GPAW 48, 4-level EPT) or 51 (GPAW 52, 5-level EPT, which
        the VM's TDP MMU must use).  Returns 0, -EINVAL (state, GPA width)
        or -EIO."""
        gpaw = int_arg("gpaw", gpaw, 48, 52)
        if gpaw not in (48, 52):
            raise ValueError(f"gpaw must be 48 or 52, not {gpaw}")
        vm = self.vm
        vm.warn_sink.check()
        if self.state != TD_STATE_UNINITIALIZED:
            return -E.EINVAL
        levels = 5 if gpaw == 52 else 4
        mmu = vm.mmu_backend
        if mmu is None or getattr(mmu, "tdp_level", None) != levels:
            return -E.EINVAL
        hkid = next(_hkids)
        tdr = int(vm.host.phys.alloc_kernel_pages(1)[0])
        r, td = self.module.tdh_mng_create(tdr, hkid, ept_levels=levels)
        if not r.ok:
            vm.host.phys.free_kernel_pages(_arr(tdr))
            return -E.EAGAIN if r.busy else self._bug("MNG.CREATE", r)
        self.td, self.hkid, self.tdr_pfn = td, hkid, tdr
        vm.gfn_direct_bits = 1 << (gpaw - 1 - PAGE_SHIFT)
        self.state = TD_STATE_INITIALIZED
        return 0

    def init_vcpu(self, vcpu) -> int:
        """``KVM_TDX_INIT_VCPU``: a TDVPR page and TDH.VP.CREATE (with VP.INIT,
        done under ``mmu_lock`` for write).  Before FINALIZE only."""
        vm = self.vm
        vm.warn_sink.check()
        if self.state != TD_STATE_INITIALIZED or vcpu.index in self.tdvpr:
            return -E.EINVAL
        page = int(vm.host.phys.alloc_kernel_pages(1)[0])
        with vm.mmu_lock.write():
            r = self.module.tdh_vp_create(self.td, page)
        if not r.ok:
            vm.host.phys.free_kernel_pages(_arr(page))
            return self._bug("VP.CREATE", r)
        self.tdvpr[vcpu.index] = page
        return 0

    def init_mem_region(self, vcpu, gpa: int, nr_pages: int, source_addr: int, *,
                        flags: int = 0) -> tuple[int, dict]:
        """``KVM_TDX_INIT_MEM_REGION``: copy `nr_pages` pages from the VMM's
        memory at hva `source_addr` into the TD's private memory at `gpa`
        (the initial image), page by page through ``kvm_gmem_populate``:

        * v6.18: ``kvm_tdp_map_page`` maps the gfn on the mirror root (its
          leaf hook only counts it premapped), then the populate callback
          issues TDH.MEM.PAGE.ADD and the count drops;
        * Gen B: the source is stashed in ``page_add_src`` and
          ``kvm_tdp_mmu_map_private_pfn`` maps the gfn, whose leaf hook
          issues PAGE.ADD.

        Returns ``(r, region)``: 0 or the first error, and the region left
        (``source_addr``, ``gpa``, ``nr_pages``) as the ioctl copies it back,
        so a caller can resume after -EBUSY/-EINTR."""
        vm = self.vm
        vm.warn_sink.check()
        gpa = int_arg("gpa", gpa, 0, (1 << 52) - 1)
        nr_pages = int_arg("nr_pages", nr_pages, 0, 1 << 40)
        source_addr = int_arg("source_addr", source_addr, 0, (1 << 64) - 1)
        flags = int_arg("flags", flags, 0, (1 << 64) - 1)
        region = {"source_addr": source_addr, "gpa": gpa, "nr_pages": nr_pages}
        bits = vm.gfn_direct_bits << PAGE_SHIFT
        last = gpa + (nr_pages << PAGE_SHIFT) - 1
        if self.state == TD_STATE_RUNNABLE or not self._hkid_assigned() or \
                vcpu.index not in self.tdvpr or flags & ~KVM_TDX_MEASURE_MEMORY_REGION or \
                (gpa | source_addr) & 0xFFF or not nr_pages or last >= 1 << 52 or \
                gpa & bits or last & bits:
            return -E.EINVAL, region
        r = vcpu.kvm_mmu_reload()
        while region["nr_pages"] and not r:
            r = self._populate_one(vcpu, region["gpa"] >> PAGE_SHIFT, region["source_addr"], flags)
            if r:
                break
            region["gpa"] += 1 << PAGE_SHIFT
            region["source_addr"] += 1 << PAGE_SHIFT
            region["nr_pages"] -= 1
        return r, region

    def _populate_one(self, vcpu, gfn: int, src_hva: int, flags: int) -> int:
        """``kvm_gmem_populate`` of one page with ``tdx_gmem_post_populate``."""
        vm = self.vm
        slot = vcpu.gfn_to_memslot(gfn)
        if slot is None or not slot.kvm_slot_has_gmem() or \
                not vm.mem_attrs.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE:
            return -E.EINVAL
        pfn = slot.gmem.get_pfn(slot, gfn)
        src, _ = vm.host.hva_to_pfn_array(_arr(src_hva))         # get_user_pages_fast
        src = int(src[0])
        if not src:
            vm.host.populate(src_hva, 1 << PAGE_SHIFT, write=False)
            src = int(vm.host.hva_to_pfn_array(_arr(src_hva))[0][0])
            if not src:
                return -E.EFAULT
        mmu = vm.mmu_backend
        if self.era == "v6.18":
            r, _level = mmu.kvm_tdp_map_page(
                vcpu, gfn << PAGE_SHIFT, PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS)
            if r < 0:
                return r
            if not mmu.kvm_tdp_mmu_gpa_is_mapped(vcpu, gfn << PAGE_SHIFT):
                return self._bug(f"INIT_MEM_REGION: gfn {gfn:#x} not mapped after the map")
            res = self.module.tdh_mem_page_add(self.td, gfn << PAGE_SHIFT, pfn, src)
            if not res.ok:
                return -E.EBUSY if res.busy else -E.EIO
            if self.nr_premapped <= 0:
                return self._bug("PAGE.ADD of a page that was not premapped")
            self.nr_premapped -= 1
        else:
            if self.page_add_src is not None:
                return self._bug("page_add_src already set")
            self.page_add_src = src
            try:
                r = mmu.kvm_tdp_mmu_map_private_pfn(vcpu, gfn, pfn)
            finally:
                self.page_add_src = None
            if r:
                return r
        if flags & KVM_TDX_MEASURE_MEMORY_REGION:
            self.nr_extended += (1 << PAGE_SHIFT) // TDX_EXTENDMR_CHUNKSIZE
        return 0

    def finalize_vm(self) -> int:
        """``KVM_TDX_FINALIZE_VM``: TDH.MR.FINALIZE, then RUNNABLE and
        ``pre_fault_allowed``.  -EINVAL unless INITIALIZED with the HKID (and,
        v6.18, no page still premapped); BUSY -> -EBUSY to the caller;
        another error bugs the VM."""
        vm = self.vm
        vm.warn_sink.check()
        if self.state != TD_STATE_INITIALIZED or not self._hkid_assigned():
            return -E.EINVAL
        if self.era == "v6.18" and self.nr_premapped:
            return -E.EINVAL
        r = self.module.tdh_mr_finalize(self.td)
        if r.busy:
            return -E.EBUSY
        if not r.ok:
            return self._bug("MR.FINALIZE", r)
        self.state = TD_STATE_RUNNABLE
        self.pre_fault_allowed = True
        return 0

    # ------------------------------------------------------------------ running
    def vcpu_enter(self, vcpu) -> bool:
        """``tdx_vcpu_run`` up to TDH.VP.ENTER: False (the fast path's "exit
        handled") while ``wait_for_sept_zap`` or when the entry is BUSY;
        -EINVAL-like errors (vCPU not initialized, TD not RUNNABLE) raise."""
        self.vm.warn_sink.check()
        if vcpu.index not in self.tdvpr or self.state != TD_STATE_RUNNABLE:
            raise ValueError(f"vCPU {vcpu.vcpu_id} cannot run: TD not RUNNABLE or vCPU not "
                             f"initialized (KVM_TDX_INIT_VCPU)")
        if self.wait_for_sept_zap:
            return False
        r = self.module.tdh_vp_enter(self.td, self.tdvpr[vcpu.index])
        return r.ok

    def vcpu_exit(self, vcpu) -> None:
        """The TD exits to KVM (``td_exit`` of the module)."""
        page = self.tdvpr.get(vcpu.index)
        if page is not None and page in self.module.vcpus_in_guest(self.td):
            self.module.td_exit(self.td, page)

    def handle_ept_violation(self, vcpu, gpa: int, *, write: bool = False, exec: bool = False,
                             present: bool = False, pending: bool = False) -> int:
        """``tdx_handle_ept_violation`` (mirror-tdx.md §2.3) for guest-physical
        `gpa` (the shared bit as the guest used it).  Private: a "pending"
        violation of a never-accepted page without permission bits kills
        the VM (-EIO); otherwise the fault is a write (no copy-on-write of
        private memory) with PFERR_PRIVATE_ACCESS, retried locally while it
        answers RET_PF_RETRY.  Shared: the exit qualification's bits; a
        fetch from shared memory is a KVM bug.  Returns the last RET_PF_* or
        a negative errno."""
        vm = self.vm
        gpa = int_arg("gpa", gpa, 0, (1 << 52) - 1)
        shared = bool(gpa >> PAGE_SHIFT & vm.gfn_direct_bits)
        if not shared:
            if pending and not present:
                return self._bug(f"guest touched unaccepted private gpa {gpa:#x}")
            ec = PFERR_WRITE_MASK | PFERR_GUEST_FINAL_MASK | PFERR_PRIVATE_ACCESS | \
                (PFERR_PRESENT_MASK if present else 0)
            for _ in range(MAX_LOCAL_RETRIES):
                r = vcpu.kvm_mmu_page_fault(gpa, ec)
                if r != RET_PF_RETRY or vm.warn_sink.bugged:
                    return r
                time.sleep(0)           # cond_resched(): the vCPU holding the entry runs
            return r
        if exec:
            return self._bug(f"instruction fetch from shared gpa {gpa:#x}")
        ec = PFERR_GUEST_FINAL_MASK | (PFERR_WRITE_MASK if write else PFERR_USER_MASK) | \
            (PFERR_PRESENT_MASK if present else 0) | (PFERR_FETCH_MASK if exec else 0)
        return vcpu.kvm_mmu_page_fault(gpa, ec)

    # ------------------------------------------------------------------ teardown
    def release_hkid(self) -> int:
        """``tdx_mmu_release_hkid`` (``vm_pre_destroy``): every vCPU out of
        guest mode (VP.FLUSH), then TDH.MNG.KEY.FREEID; afterwards no private
        leaf may be removed and every S-EPT page may be reclaimed."""
        if not self._hkid_assigned():
            return 0
        self.kick_all()
        r = self.module.tdh_mng_key_freeid(self.td)
        if not r.ok:
            self.vm.warn_sink.warn("tdx_mmu_release_hkid", f"KEY.FREEID failed: {r.status_name}: "
                                   "HKID leaked")
            return -E.EIO
        self.hkid = None
        return 0

    def gmem_release(self) -> bool:
        """The guest_memfd files' release (``kvm_gmem_release``: they hold a
        VM reference, so they go first): every private mapping of their
        bindings is zapped (``GuestMemfd.invalidate``, the PRIVATE filter)
        while the HKID is still assigned.  Returns whether a flush was done."""
        flush = False
        for g in list(self.vm.guest_memfds.values()):
            flush |= g.invalidate(0, g.size >> PAGE_SHIFT)
        return flush

    def destroy_vm(self) -> int:
        """VM destruction in the kernel's order (mirror-tdx.md §7.4): the
        guest_memfd release zaps every private leaf while the HKID is
        assigned; the HKID is released; each vCPU's roots go
        (``kvm_mmu_destroy``) and its TDVPR is reclaimed;
        ``kvm_mmu_uninit_tdp_mmu`` frees the mirror tables bottom-up, each
        S-EPT page through ``free_external_spt`` (RECLAIM); the TDR is
        reclaimed last.  Returns 0 or the first error."""
        vm = self.vm
        mmu = vm.mmu_backend
        if self.td is None:
            return 0
        self.gmem_release()
        rc = self.release_hkid()
        for v in vm.vcpus:
            if mmu is not None:
                mmu.kvm_mmu_destroy(v)
        for idx, page in sorted(self.tdvpr.items()):
            if self.module.tdh_phymem_page_reclaim(page).ok:
                vm.host.phys.free_kernel_pages(_arr(page))
        self.tdvpr.clear()
        if mmu is not None:
            mmu.kvm_mmu_uninit_tdp_mmu()
        r = self.module.tdh_phymem_page_reclaim(self.tdr_pfn)
        if r.ok:
            vm.host.phys.free_kernel_pages(_arr(self.tdr_pfn))
            self.td = None                      # the module forgot the TD with its TDR
        else:
            rc = rc or -E.EIO
        self.state = TD_STATE_UNINITIALIZED
        return rc

    # ------------------------------------------------------------------ audit
    def audit(self) -> list[str]:
        """The KVM-side invariants (module docstring) and the module's own
        audit.  Returns the violations."""
        bad = []
        if self.td is not None and self.state != TD_STATE_UNINITIALIZED:
            bad += [f"module: {x}" for x in self.module.audit()]
        if self.nr_premapped < 0 or (self.state == TD_STATE_RUNNABLE and self.nr_premapped):
            bad.append(f"nr_premapped {self.nr_premapped} in state {self.state}")
        if self.wait_for_sept_zap:
            bad.append("wait_for_sept_zap left set")
        if self.era == "v6.18":
            over = {p: n for p, n in self.pins.items() if n != 1}
            if over:
                bad.append(f"pfns pinned other than once: {dict(list(over.items())[:5])}")
            mmu = self.vm.mmu_backend
            if mmu is not None and getattr(mmu, "mirrored", False):
                mapped = set()
                for r in mmu.roots:
                    if r.is_mirror and not r.invalid:
                        d = mmu.core.dump(r.sp)
                        mapped |= {(int(s) & _SPTE_PFN_MASK) >> PAGE_SHIFT
                                   for s in d["spte"][d["leaf"]]}
                if mapped != set(self.pins):
                    bad.append(f"{len(mapped ^ set(self.pins))} pfns pinned but not mapped in "
                               f"the mirror root, or mapped but not pinned")
        return bad


def _arr(x):
    import numpy as np
    return np.array([x], np.uint64)
