"""The shadow MMU driven like a vCPU, against the independent oracle
(tests/_shadow_oracle.py), with ``VM.audit()`` after every step.

Two hypothesis state machines, each also run with allocation failures
injected:

* :class:`DirectMachine` - ``mmu="tdp"`` (TDP on the shadow MMU, direct
  shadow pages); the same machine runs on ``mmu="tdp_mmu"`` (the TDP MMU,
  same shape of roots) so the machine itself is known to work.  The guest
  touches gpas (read / write / fetch); memslots are created, moved,
  deleted, made dirty-logged and harvested; the host mprotects, migrates,
  unmaps and re-maps their memory; the MMU is fast-zapped.  After every
  step every leaf of every vCPU's root agrees with its memslot and the
  host (:func:`_shadow_oracle.check_direct_root`).
* :class:`ShadowPagingMachine` - ``mmu="shadow"``: a 4-level guest with
  five page-table roots (more than the three cached previous roots plus
  the current one), shared PDPT/PD/PT pages and a kernel window (a 2 MiB
  supervisor mapping of the page-table memory).  The guest stores to its
  own page tables through that window as a CPU would: natively when the
  shadow SPTE lets it (an unsync page table), else through the fault and
  the emulator (``kvm_page_track_write``); it loads CR3, executes INVLPG,
  toggles CR0.WP / CR4.SMEP / EFER.NXE and CPL, touches gvas as user or
  supervisor, and the VM changes memslots, dirty logging and host mappings.
  After every step: the current root obeys the security rule with a TLB
  window per gva (:class:`_shadow_oracle.TlbWindow`: flushed by INVLPG for
  that gva and by CR3 loads for all), the cached previous roots obey it for
  their synced pages, no writable SPTE aliases a shadowed page table
  unless every shadow page of it is unsync, and ``VM.audit()`` is clean.
  A guest access the guest's tables allow must make progress (at most a
  few faults before the hardware lets it through or the emulator takes
  it); one they refuse must end in an injected #PF (RET_PF_RETRY).

With failures injected (``PteListDescPool.fail_after``, and a page-table
arena small enough to run dry, held by a hog cache), an allocation failure
must surface as -ENOMEM from the fault (or ``KvmNoMemoryError`` from the
root load at VM entry), leave a clean audit and the oracle's rule, and the
same access must succeed once the memory is back.

The machines skip, with the reason, while ``vm.mmu_backend`` is None for
their flavour (the shadow MMU not merged yet).

Bad input: a fault address that does not fit the mode, error-code bits the
kernel never passes, a CR3 above MAXPHYADDR, writes beyond a slot -> a
specific exception, state unchanged (``vm.snapshot()``, the vCPU
registers, the shadow tables) and a clean audit.
"""
from __future__ import annotations

import errno as E
from functools import partial
from unittest import mock

import numpy as np
import pytest
from _inject import hog_arena, release
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import _shadow_oracle as O
from kvmmmu._core.defs import (
    RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS,
)
from kvmmmu._core.guest_walk import (
    PFERR_FETCH_MASK, PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK,
)
from kvmmmu._core.pt_arena import PtArena
from kvmmmu.errors import KvmNoMemoryError
from kvmmmu.host import HostConfig
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmmmu.vm import VM, CrLoadError, KvmParams

MiB = 1 << 20
ENOMEM = -E.ENOMEM


def _backend_or_skip(mmu, **kw):
    vm = VM(mmu, **kw)
    if vm.mmu_backend is None:
        pytest.skip(f"no MMU backend takes faults for mmu={mmu!r} yet (the shadow MMU is not merged)")
    return vm


# --- roots, whatever MMU holds them ----------------------------------------------

def vcpu_roots(vm, vcpu):
    """``[(label, sp, base, va_bits, pgd, current)]`` for the vCPU's current
    root and (shadow MMU) its cached previous roots; a PAE root is its four
    level-2 pages at ``i << 30``."""
    mmu = vm.mmu_backend
    out = []
    ctx = getattr(mmu, "vcpu_mmu", {}).get(vcpu.index) if hasattr(mmu, "vcpu_mmu") else None
    if ctx is None:                                    # the TDP MMU: one root per vCPU
        r = vcpu.mmu_root
        if r is not None and not getattr(r, "invalid", False):
            out.append(("root", r.sp, 0, None, 0, True))
        return out
    infos = [("root", ctx.root, True)] + [(f"prev{i}", r, False) for i, r in enumerate(ctx.prev_roots)]
    for label, info, cur in infos:
        h = info.hpa
        if h is None:
            continue
        if hasattr(h, "sp"):
            if getattr(h, "invalid", False):
                continue
            out.append((label, h.sp, 0, None, info.pgd, cur))
        elif h == "pae_root" and cur:
            for i, p in enumerate(ctx.pae_root):
                if p is not None and not getattr(p, "invalid", False):
                    out.append((f"{label}.pae{i}", p.sp, i << 30, None, info.pgd, cur))
    return out


def hw_access(vm, root_sp, addr, *, write=False, fetch=False, user=False, smep=False,
              va_bits=None, base_level=None):
    """What the CPU does with an access through the shadow tables:
    ``(allowed, error_code_if_not)``.  The error code is the hardware's:
    P if the translation was present (permission fault), RSVD|P on an MMIO
    SPTE, W, U, F (EFER.NXE is always on in hardware under shadow paging)."""
    fmt = vm.fmt
    spte, level, (w, u, x), _ = O.shadow_lookup(vm.arena, fmt, root_sp, addr, va_bits=va_bits)
    ec = (PFERR_WRITE_MASK if write else 0) | (PFERR_USER_MASK if user else 0) | \
        (PFERR_FETCH_MASK if fetch else 0)
    if spte is None:
        return False, ec
    if fmt.is_mmio_spte(spte):
        return False, ec | PFERR_RSVD_MASK | PFERR_PRESENT_MASK
    kind = ("U" if user else "S") + ("W" if write else "X" if fetch else "R")
    ok = kind in O.spte_grants(w, u, x, smep)
    return ok, ec | PFERR_PRESENT_MASK


def _ept_access(vm, root_sp, gpa, write, fetch):
    spte, level, (w, u, x), _ = O.shadow_lookup(vm.arena, vm.fmt, root_sp, gpa, va_bits=None)
    # EPT violation: U stands for "read" (handle_ept_violation)
    ec = PFERR_WRITE_MASK if write else PFERR_FETCH_MASK if fetch else PFERR_USER_MASK
    if spte is None:
        return False, ec
    if vm.fmt.is_mmio_spte(spte):
        return False, PFERR_RSVD_MASK
    r = bool(spte & 1)
    ok = (w if write else x if fetch else r)
    return ok, ec | PFERR_PRESENT_MASK


# =====================================================================================
# mmu="tdp": direct shadow pages (and the TDP MMU, same machine)
# =====================================================================================

SLOT0 = (0, 4 * MiB)                   # gpa, size: thp, populated
SLOT1 = (16 * MiB, 2 * MiB)            # moved to 64 MiB and back, deleted, re-added
SLOT1_ALT = 64 * MiB
SLOT2 = (32 * MiB, 1 * MiB)            # READONLY
MMIO_GPA = 80 * MiB


class DirectMachine(RuleBasedStateMachine):
    MMU = "tdp"
    INJECT = False

    @initialize(eager=st.booleans(), mmio=st.booleans(), npt=st.booleans())
    def setup(self, eager, mmio, npt):
        self.vm = vm = self._make_vm(host=HostConfig(tdp="npt" if npt else "ept"),
                                     params=KvmParams(eager_page_split=eager, mmio_caching=mmio),
                                     nr_vcpus=2)
        vm.add_memory(SLOT0[0], SLOT0[1], slot=0, thp=True, populate=True)
        vm.add_memory(SLOT1[0], SLOT1[1], slot=1, thp=True, populate=True)
        vm.add_memory(SLOT2[0], SLOT2[1], slot=2, flags=KVM_MEM_READONLY, populate=True)
        self.slot1 = SLOT1[0]                          # None: deleted
        self.eager = eager
        self.hog = []
        self.failed = 0
        for v in vm.vcpus:
            v.vcpu_enter_guest()

    def _make_vm(self, **kw):
        if self.INJECT:
            with mock.patch("kvmmmu.vm.PtArena", partial(PtArena, max_tables=256, tables_per_chunk=16)):
                return _backend_or_skip(self.MMU, **kw)
        return _backend_or_skip(self.MMU, **kw)

    def _slot(self, sid):
        return self.vm.memslots[0].id_to_memslot(sid)

    def _enter(self, v):
        try:
            v.vcpu_enter_guest()
            return True
        except KvmNoMemoryError:
            assert self.INJECT, "KvmNoMemoryError at VM entry without an injected failure"
            self.failed += 1
            return False

    def _root(self, v):
        r = vcpu_roots(self.vm, v)
        return r[0][1] if r else None

    def _touch(self, v, gpa, write, fetch):
        """The vCPU accesses gpa; at most 4 exits before the hardware lets it
        through, the emulator takes it (MMIO, a write to a READONLY slot) or
        the host refuses (-EFAULT: no writable host page)."""
        vm = self.vm
        for attempt in range(6):
            if not self._enter(v):
                return "enomem"
            root = self._root(v)
            assert root is not None, "no root after VM entry"
            if vm.fmt.name == "ept":
                ok, ec = _ept_access(vm, root, gpa, write, fetch)
            else:
                ok, ec = hw_access(vm, root, gpa, write=write, fetch=fetch, user=True)
            if ok:
                return "ok"
            r = v.kvm_mmu_page_fault(gpa, ec)
            if r == ENOMEM:
                assert self.INJECT, "-ENOMEM without an injected failure"
                self.failed += 1
                return "enomem"
            if r == RET_PF_EMULATE:
                s = vm.gfn_to_memslot(gpa >> 12)
                assert s is None or (write and s.flags & KVM_MEM_READONLY), \
                    f"EMULATE for a {'write' if write else 'read'} of gpa {gpa:#x} in slot {s}"
                return "emulated"
            if r == -E.EFAULT:
                return "efault"
            assert r in (RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_RETRY), f"gpa {gpa:#x}: r={r}"
        raise AssertionError(f"no progress on gpa {gpa:#x} (write={write}, fetch={fetch}) after 6 exits")

    # ------------------------------------------------------------------ rules
    @rule(where=st.sampled_from(["s0", "s1", "s2", "mmio"]), off=st.integers(0, 255),
          kind=st.sampled_from(["r", "w", "x"]), vcpu=st.integers(0, 1), n=st.integers(1, 4))
    def touch(self, where, off, kind, vcpu, n):
        base = {"s0": SLOT0[0], "s1": self.slot1 if self.slot1 is not None else SLOT1[0],
                "s2": SLOT2[0], "mmio": MMIO_GPA}[where]
        v = self.vm.vcpus[vcpu]
        for k in range(n):
            gpa = base + ((off * 7 + k * 131) % 256) * 4096 + (0x200000 if k == 3 and where == "s0" else 0)
            self._touch(v, gpa, kind == "w", kind == "x")

    @rule(writable=st.booleans())
    def host_mprotect_slot1(self, writable):
        s = self._slot(1)
        if s is not None:
            self.vm.host.mprotect(s.userspace_addr, SLOT1[1], writable)

    @rule(sid=st.sampled_from([0, 1]), chunk=st.integers(0, 1))
    def host_migrate(self, sid, chunk):
        s = self._slot(sid)
        if s is not None:
            self.vm.host.migrate_pages(s.userspace_addr + chunk * 2 * MiB, 2 * MiB)

    @rule()
    def host_munmap_remap_slot1(self):
        s = self._slot(1)
        if s is None:
            return
        v = self.vm.host.find_vma(s.userspace_addr)
        writable = v.writable if v is not None else True
        self.vm.host.munmap(s.userspace_addr, SLOT1[1])
        self.vm.host.mmap(SLOT1[1], hva=s.userspace_addr, thp=True, writable=writable)

    @rule()
    def move_slot1(self):
        s = self._slot(1)
        if s is None:
            return
        new = SLOT1_ALT if self.slot1 == SLOT1[0] else SLOT1[0]
        self.vm.set_user_memory_region(1, s.flags, new, SLOT1[1], s.userspace_addr)
        self.slot1 = new

    @rule()
    def delete_or_add_slot1(self):
        if self._slot(1) is not None:
            self.vm.delete_memslot(1)
            self.slot1 = None
        else:
            self.vm.add_memory(SLOT1[0], SLOT1[1], slot=1, thp=True, populate=True)
            self.slot1 = SLOT1[0]

    @rule(sid=st.sampled_from([0, 1]))
    def toggle_dirty_log(self, sid):
        s = self._slot(sid)
        self._release()          # see test_eager_split_without_memory_still_write_protects
        if s is not None:
            self.vm.set_user_memory_region(sid, s.flags ^ KVM_MEM_LOG_DIRTY_PAGES, s.base_gfn << 12,
                                           s.npages << 12, s.userspace_addr)

    @precondition(lambda self: any(s.flags & KVM_MEM_LOG_DIRTY_PAGES for s in self.vm.memslots[0]))
    @rule()
    def harvest(self):
        for s in list(self.vm.memslots[0]):
            if s.flags & KVM_MEM_LOG_DIRTY_PAGES:
                self.vm.get_dirty_log(s.id)

    @rule()
    def zap_all_fast(self):
        self.vm.kvm_mmu_zap_all_fast()

    # --- injected failures
    @precondition(lambda self: self.INJECT)
    @rule(n=st.integers(0, 20))
    def inject_desc_failure(self, n):
        self.vm.rmap_pool.fail_after(n)

    @precondition(lambda self: self.INJECT)
    @rule()
    def hog_the_arena(self):
        """Take every free page-table page of the arena into a cache of our own."""
        self.hog += hog_arena(self.vm.arena)

    @precondition(lambda self: self.INJECT)
    @rule(vcpu=st.integers(0, 1), off=st.integers(0, 255), write=st.booleans())
    def memory_back_and_retry(self, vcpu, off, write):
        """Lift the injection: the failed access now goes through."""
        self._release()
        r = self._touch(self.vm.vcpus[vcpu], SLOT0[0] + off * 4096, write, False)
        assert r == "ok", r

    def _release(self):
        release(self.vm, self.hog)

    # ------------------------------------------------------------------ invariant
    @invariant()
    def oracle_and_audit(self):
        vm = self.vm
        for v in vm.vcpus:
            for label, sp, base, bits, pgd, cur in vcpu_roots(vm, v):
                bad = O.check_direct_root(vm, v, sp, label=f"vcpu{v.vcpu_id} {label}", base=base)
                assert bad == [], bad[:6]
        assert vm.audit(raise_=False) == []

    def teardown(self):
        if hasattr(self, "vm"):
            release(self.vm, self.hog)


class DirectTdpMmuMachine(DirectMachine):
    MMU = "tdp_mmu"


class DirectMachineInjected(DirectMachine):
    INJECT = True


class DirectTdpMmuMachineInjected(DirectMachine):
    MMU = "tdp_mmu"
    INJECT = True


# derandomize: CI explores the same examples on every run (a random seed once
# found the PAE discrepancy pinned by test_pae_unsync_leaf_seed_104727 below,
# and a red CI run must be reproducible)
_FAST = settings(max_examples=12, stateful_step_count=18, deadline=None, derandomize=True,
                 database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

TestDirectTdp = DirectMachine.TestCase
TestDirectTdp.settings = _FAST
TestDirectTdpMmu = DirectTdpMmuMachine.TestCase
TestDirectTdpMmu.settings = settings(_FAST, max_examples=6)
TestDirectTdpInjected = DirectMachineInjected.TestCase
TestDirectTdpInjected.settings = _FAST
TestDirectTdpMmuInjected = DirectTdpMmuMachineInjected.TestCase
TestDirectTdpMmuInjected.settings = settings(_FAST, max_examples=6)


@pytest.mark.parametrize("mmu", [
    "tdp_mmu", "tdp"])
def test_eager_split_without_memory_still_write_protects(mmu):
    with mock.patch("kvmmmu.vm.PtArena", partial(PtArena, max_tables=256, tables_per_chunk=16)):
        vm = _backend_or_skip(mmu, host=HostConfig(tdp="ept"), params=KvmParams(eager_page_split=True))
    s = vm.add_memory(0, 4 * MiB, slot=0, thp=True, populate=True)
    v = vm.vcpus[0]
    v.vcpu_enter_guest()
    for gpa in (0x1000, 0x201000):
        assert v.kvm_mmu_page_fault(gpa, PFERR_WRITE_MASK) == RET_PF_FIXED
    hog = hog_arena(vm.arena)
    try:
        vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MiB, s.userspace_addr)
    finally:
        bad = [b for label, sp, base, _, _, _ in vcpu_roots(vm, v)
               for b in O.check_direct_root(vm, v, sp, base=base)]
        for c in hog:
            c.free()
    assert bad == []
    assert vm.audit(raise_=False) == []


# =====================================================================================
# mmu="shadow": shadow paging of a 4-level guest
# =====================================================================================

P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63
ROOTS = (1, 2, 3, 4, 5)           # top-table gfns: more than the current + 3 cached roots
PDPT_OF = {1: 8, 2: 9, 3: 8, 4: 9, 5: 8}      # 4-level: PML4 -> PDPT
PD_OF_PDPT = {8: 10, 9: 11}
PD_OF_ROOT = {1: 10, 2: 11, 3: 10, 4: 11, 5: 10}   # PAE: PDPTE 0 -> PD
PT_OF_PD = {10: (12, 13), 11: (13, 14)}       # PT 13 is shared by both PDs
PT_OF_ROOT32 = {1: (12, 13), 2: (13, 14), 3: (12, 13), 4: (13, 14), 5: (12, 14)}  # 32-bit PDs
PDPT_K, PD_K = 15, 16
IDX = (0, 1, 2, 3, 8, 9, 300, 511)
IDX32 = (0, 1, 2, 511, 512, 513, 700, 1023)    # both halves (quadrants) of a 4-byte PT
DATA = (0x40, 0x41, 0x42, 0x43, 0x5f, 0x400, 0x401, 0x4ff, 0x800, 0xc00, 12, 13, 10)
SHADOW_SLOT1 = (4 * MiB, 1 * MiB)             # data; deleted/re-added, dirty-logged, host games
SHADOW_SLOT2 = (8 * MiB, 256 << 10)           # READONLY data
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_SMEP = 1 << 4, 1 << 5, 1 << 20
EFER_LME, EFER_NX = 1 << 8, 1 << 11


class Layout:
    """The guest's page tables for one paging mode (4: 4-level, 3: PAE,
    2: 32-bit): entry size, the tables the PDEs live in, the kernel window
    (a supervisor huge page over gpa 0..2M/4M, where all tables live), and
    the gvas the machine uses."""

    def __init__(self, mode):
        self.mode = mode
        self.esize = 4 if mode == 2 else 8
        self.nidx = 1024 if mode == 2 else 512
        if mode == 4:
            self.kwin, self.pds = 1 << 39, (10, 11)
        elif mode == 3:
            self.kwin, self.pds = 1 << 30, (10, 11)
        else:
            self.kwin, self.pds = 1 << 30, ROOTS
        shift = 22 if mode == 2 else 21
        idx = IDX32 if mode == 2 else IDX
        self.gvas = tuple((pd << shift) | (i << 12) for pd in (0, 1) for i in idx) + \
            ((2 << shift), (2 << shift) + 0x1000, (3 << shift) - 0x1000)
        self.huge = 0x400000                      # a huge guest page over slot 1 (and the hole after it)

    def pts_of(self, pd):
        return PT_OF_ROOT32[pd] if self.mode == 2 else PT_OF_PD[pd]

    def build(self, put):
        """Write the tables with put(gpa, value) (entry-sized)."""
        e = self.esize
        if self.mode == 4:
            for r in ROOTS:
                put(r << 12, PDPT_OF[r] << 12 | P | W | U | A)
                put(r << 12 | 8, PDPT_K << 12 | P | W | A)
            for pdpt, pd in PD_OF_PDPT.items():
                put(pdpt << 12, pd << 12 | P | W | U | A)
            put(PDPT_K << 12, PD_K << 12 | P | W | A)
            put(PD_K << 12, 0 | P | W | A | D | PS)            # kwin -> gpa 0..2M
        elif self.mode == 3:
            for r in ROOTS:                                    # PDPTEs: P and the address only
                put(r << 12, PD_OF_ROOT[r] << 12 | P)
                put(r << 12 | 8, PD_K << 12 | P)
            put(PD_K << 12, 0 | P | W | A | D | PS)
        else:
            for r in ROOTS:
                put(r << 12 | 4 * 256, 0 | P | W | A | D | PS)   # kwin -> gpa 0..4M (4M page)
        for pd in self.pds:
            pt0, pt1 = self.pts_of(pd)
            put(pd << 12, pt0 << 12 | P | W | U | A)
            put((pd << 12) + e, pt1 << 12 | P | W | U | A)
        for pt in (12, 13, 14):
            for k, i in enumerate(IDX32 if self.mode == 2 else IDX):
                put((pt << 12) + e * i, (0x40 + k) << 12 | P | W | U | A | (D if k & 1 else 0))

    def regs(self, v, nx, smep):
        sm = CR4_SMEP if smep else 0
        if self.mode == 4:
            v.kvm_set_cr4(CR4_PAE | sm)
            v.kvm_set_efer(EFER_LME | (EFER_NX if nx else 0))
        elif self.mode == 3:
            v.kvm_set_cr4(CR4_PAE | sm)
            v.kvm_set_efer(EFER_NX if nx else 0)
        else:
            v.kvm_set_cr4(CR4_PSE | sm)
            v.kvm_set_efer(EFER_NX if nx else 0)
        v.kvm_set_cr3(ROOTS[0] << 12)
        v.kvm_set_cr0(CR0_PE | CR0_PG | CR0_WP)

    def pte_values(self):
        flags = st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
                          st.booleans())
        nx = 0 if self.mode == 2 else NX
        return st.tuples(st.sampled_from(DATA), flags, st.integers(0, 9)).map(
            lambda t: 0 if t[2] == 0 else (t[0] << 12) | (P if t[2] > 1 else 0) |
            (W if t[1][0] else 0) | (U if t[1][1] else 0) | (A if t[1][2] or t[2] > 4 else 0) |
            (D if t[1][3] else 0) | (nx if t[1][4] and t[1][5] else 0))

    def pde_values(self, pd):
        pts = self.pts_of(pd)
        ptr = st.tuples(st.sampled_from(pts + (12, 13, 14)), st.booleans(), st.booleans(),
                        st.booleans()).map(
            lambda t: (t[0] << 12) | P | A | (W if t[1] or t[3] else 0) | (U if t[2] or t[3] else 0))
        huge = st.sampled_from([0, self.huge]).map(lambda b: b | P | W | U | A | D | PS)
        return st.one_of(ptr, ptr, huge, st.just(0))


class ShadowPagingMachine(RuleBasedStateMachine):
    INJECT = False

    MODE = 4

    @initialize(nx=st.booleans(), smep=st.booleans(), mmio=st.booleans())
    def setup(self, nx, smep, mmio):
        kw = dict(params=KvmParams(mmio_caching=mmio, eager_page_split=True))
        if self.INJECT:
            with mock.patch("kvmmmu.vm.PtArena", partial(PtArena, max_tables=256, tables_per_chunk=16)):
                self.vm = vm = _backend_or_skip("shadow", **kw)
        else:
            self.vm = vm = _backend_or_skip("shadow", **kw)
        self.lay = lay = Layout(self.MODE)
        vm.add_memory(0, 2 * MiB, slot=0, populate=True)
        vm.add_memory(*SHADOW_SLOT1, slot=1, populate=True)
        vm.add_memory(*SHADOW_SLOT2, slot=2, flags=KVM_MEM_READONLY, populate=True)
        self.hog = []
        self.failed = 0
        lay.build(self._set)
        self.v = vm.vcpus[0]
        lay.regs(self.v, nx, smep)
        self.win = O.TlbWindow(lay.gvas)
        self._enter()
        self._regs_changed(flush=True)

    # ----------------------------------------------------------------- helpers
    def _set(self, gpa, val):
        self.vm.write_guest(gpa, int(val).to_bytes(self.lay.esize, "little"))

    @property
    def _va_bits(self):
        return 48 if self.MODE == 4 else None

    def _regs(self):
        return O.GuestRegs.of_vcpu(self.v)

    def _read(self):
        return O.memory_reader(self.vm)

    def _observe(self):
        self.win.observe(self._read(), self._regs())

    def _regs_changed(self, flush):
        if flush:
            self.win.flush_all(self._read(), self._regs())
        else:
            self._observe()

    def _enter(self):
        try:
            self.v.vcpu_enter_guest()
            return True
        except KvmNoMemoryError:
            assert self.INJECT, "KvmNoMemoryError at VM entry without an injected failure"
            self.failed += 1
            return False

    def _root(self, gva):
        """The shadow page the hardware starts its walk of gva from (one of
        the four PAE roots for 2/3-level guests; None: INVALID_PAE_ROOT)."""
        assert self.v.mmu_root is not None, "no valid root after VM entry"
        r = [x for x in vcpu_roots(self.vm, self.v) if x[5]]
        if self.MODE == 4:
            assert len(r) == 1 and r[0][2] == 0, r
            return r[0][1]
        hit = [x[1] for x in r if x[2] == (gva >> 30) << 30]
        return hit[0] if hit else None

    def _pfn_to_gpa(self, pfn):
        from kvmmmu.host import PTE_PRESENT
        for s in self.vm.memslots[0]:
            g = np.arange(s.base_gfn, s.base_gfn + s.npages, dtype=np.uint64)
            p, fl = self.vm.host.hva_to_pfn_array(s.gfn_to_hva_array(g))
            hit = np.flatnonzero((p == np.uint64(pfn)) & ((fl & PTE_PRESENT) != 0))
            if hit.size:
                return (s.base_gfn + int(hit[0])) << 12
        return None

    def _access(self, gva, kind, cpl, data=None):
        """The guest makes one access (kind 'r', 'w' or 'x') at CPL `cpl`,
        as the CPU would: through the shadow tables when they allow it
        (a store then lands in the page the SPTE maps), otherwise a #PF exit
        to KVM; FIXED/SPURIOUS/RETRY re-enter, EMULATE goes to the
        emulator (it walks the guest tables, setting A/D, and writes with
        page tracking).  Returns how it ended."""
        vm, v = self.vm, self.v
        write, fetch, user = kind == "w", kind == "x", cpl == 3
        if v.cpu.cpl != cpl:
            v.set_cpl(cpl)
        regs = self._regs()
        tr = O.translate(self._read(), gva, regs)
        want = ("U" if user else "S") + kind.upper()
        allowed = want in O.guest_allows(tr, regs)
        for attempt in range(8):
            if not self._enter():
                return "enomem"
            root = self._root(gva)
            if root is None:                             # an INVALID_PAE_ROOT: not present
                ok, ec = False, ((PFERR_WRITE_MASK if write else 0) | (PFERR_USER_MASK if user else 0) |
                                 (PFERR_FETCH_MASK if fetch else 0))
            else:
                ok, ec = hw_access(vm, root, gva, write=write, fetch=fetch, user=user, smep=regs.smep,
                                   va_bits=self._va_bits)
            if ok:
                if write:
                    spte, _, _, _ = O.shadow_lookup(vm.arena, vm.fmt, root, gva, va_bits=self._va_bits)
                    gpa = self._pfn_to_gpa((spte & O.SPTE_ADDR_MASK) >> 12)
                    assert gpa is not None, f"writable SPTE {spte:#x} for gva {gva:#x} maps no guest page"
                    gpa |= gva & 0xFFF
                    vm.write_guest(gpa, data)            # a native store: no exit, no tracking
                    self._observe()
                return "native"
            r = v.kvm_mmu_page_fault(gva, ec)
            self._observe()                              # the walk may have set A/D bits
            if r == ENOMEM:
                assert self.INJECT, f"-ENOMEM without an injected failure (gva {gva:#x})"
                self.failed += 1
                return "enomem"
            if r == RET_PF_RETRY and not allowed:
                return "#PF"
            if r == -E.EFAULT:                           # KVM_RUN fails: no host page for a write
                t = O.translate(self._read(), gva, self._regs())
                s = t is not None and vm.gfn_to_memslot(t.gfn)
                vma = s and vm.host.find_vma(s.gfn_to_hva(t.gfn))
                assert write and vma is not None and not vma.writable, \
                    f"-EFAULT for a {kind} at gva {gva:#x} (gfn {t.gfn if t else None}) the host can back"
                return "efault"
            if r == RET_PF_EMULATE:
                w = v.walk_mmu.walk_addr(gva, (PFERR_WRITE_MASK if write else 0) |
                                         (PFERR_USER_MASK if user else 0) | (PFERR_FETCH_MASK if fetch else 0))
                self._observe()
                if not w.ok:
                    return "#PF"
                s = vm.gfn_to_memslot(w.gpa >> 12)
                if s is None or (write and s.flags & KVM_MEM_READONLY):
                    return "mmio"
                if write:
                    v.kvm_page_track_write(w.gpa, data)
                    self._observe()
                return "emulated"
            assert r in (RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_RETRY), f"gva {gva:#x} {kind}: r={r}"
        raise AssertionError(f"no progress: {kind} at gva {gva:#x} cpl {cpl} ({'allowed' if allowed else 'refused'} "
                             f"by the guest: {tr}) after 8 exits")

    def _store_entry(self, table_gfn, index, value, how):
        e = self.lay.esize
        gpa = (table_gfn << 12) + e * index
        data = int(value).to_bytes(e, "little")
        kwin = self.lay.kwin
        if how == "emulator":                           # an instruction emulated for another reason
            if not self._enter():
                return
            self.v.kvm_page_track_write(gpa, data)
            self._observe()
        elif how == "split":                            # two half stores (misaligned for the gpte size)
            self._access(kwin + gpa, "w", 0, data[:e // 2])
            self._access(kwin + gpa + e // 2, "w", 0, data[e // 2:])
        else:
            self._access(kwin + gpa, "w", 0, data)

    # ------------------------------------------------------------------- rules
    @rule(data=st.data(), pt=st.sampled_from((12, 13, 14)), how=st.sampled_from(["cpu", "cpu", "emulator", "split"]))
    def write_pte(self, data, pt, how):
        i = data.draw(st.sampled_from(IDX32 if self.MODE == 2 else IDX))
        self._store_entry(pt, i, data.draw(self.lay.pte_values()), how)

    @rule(data=st.data(), how=st.sampled_from(["cpu", "emulator"]))
    def write_pde(self, data, how):
        pd = data.draw(st.sampled_from(self.lay.pds))
        i = data.draw(st.sampled_from([0, 1, 2]))
        self._store_entry(pd, i, data.draw(self.lay.pde_values(pd)), how)

    @rule(data=st.data(), then=st.sampled_from(["invlpg", "cr3", "none"]),
          how=st.sampled_from(["cpu", "cpu", "emulator"]))
    def remap_gva(self, data, then, how):
        """The guest uses a gva, rewrites the PTE that maps it (through its
        kernel window: the page table goes unsync and the store is native,
        or it stays write-protected and the store is emulated), then
        invalidates the gva, reloads CR3, or does neither (the old
        translation may stay in the TLB)."""
        gva = data.draw(st.sampled_from(self.lay.gvas))
        val = data.draw(self.lay.pte_values())
        walk = O.walk_guest(self._read(), gva, self._regs())
        tr = walk.translation
        if not (tr is not None and tr.level == 1 or tr is None and walk.fault_level == 1):
            return
        self._access(gva, "r", 3)
        self._store_entry(walk.tables[-1], (gva >> 12) % self.lay.nidx, val, how)
        if then == "invlpg":
            self.invlpg(None, gva)
        elif then == "cr3":
            self.set_cr3(self.v.cpu.cr3 >> 12)

    @rule(data=st.data(), kind=st.sampled_from("rwx"), cpl=st.sampled_from([0, 3]),
          val=st.integers(0, 255))
    def access(self, data, kind, cpl, val):
        gva = data.draw(st.sampled_from(self.lay.gvas))
        self._access(gva + 8 * (val & 7), kind, cpl, bytes([val]) * 8)

    @rule(data=st.data())
    def invlpg(self, data, gva=None):
        gva = data.draw(st.sampled_from(self.lay.gvas)) if gva is None else gva
        self.v.kvm_mmu_invlpg(gva)
        if self._enter():
            self.win.flush(gva, self._read(), self._regs())

    def _pdptr_load(self, load, cr3) -> bool:
        """Run a register load that reloads the PAE PDPTEs (MOV CR3; in PAE
        mode also a CR4.SMEP change, one of X86_CR4_PDPTR_BITS): when a PDPTE
        the guest wrote has reserved bits it is a #GP and nothing changes.
        Returns whether the load happened."""
        if self.MODE == 3 and not O.pae_pdptes_loadable(self._read(), cr3,
                                                        self._regs().maxphyaddr):
            def regs():
                p = self.v.pdptrs
                return self.v.cpu, None if p is None else tuple(int(x) for x in p)
            before = regs()
            with pytest.raises(CrLoadError):
                load()
            assert regs() == before
            return False
        load()
        return True

    @rule(root=st.sampled_from(ROOTS))
    def set_cr3(self, root):
        if not self._pdptr_load(lambda: self.v.kvm_set_cr3(root << 12), root << 12):
            return
        if self._enter():
            self._regs_changed(flush=True)

    @rule(bit=st.sampled_from(["wp", "smep", "nx"]))
    def toggle(self, bit):
        c = self.v.cpu
        if bit == "wp":
            self.v.kvm_set_cr0(c.cr0 ^ CR0_WP)
        elif bit == "smep":
            if not self._pdptr_load(lambda: self.v.kvm_set_cr4(c.cr4 ^ CR4_SMEP), c.cr3):
                return
        else:
            self.v.kvm_set_efer(c.efer ^ EFER_NX)
        self._enter()
        self._regs_changed(flush=False)

    @rule()
    def delete_or_add_slot1(self):
        if self.vm.memslots[0].id_to_memslot(1) is not None:
            self.vm.delete_memslot(1)
        else:
            self.vm.add_memory(*SHADOW_SLOT1, slot=1, populate=True)
        self._enter()

    @rule()
    def toggle_dirty_log_slot1(self):
        s = self.vm.memslots[0].id_to_memslot(1)
        self._release()
        if s is not None:
            self.vm.set_user_memory_region(1, s.flags ^ KVM_MEM_LOG_DIRTY_PAGES, s.base_gfn << 12,
                                           s.npages << 12, s.userspace_addr)
        self._enter()

    @precondition(lambda self: any(s.flags & KVM_MEM_LOG_DIRTY_PAGES for s in self.vm.memslots[0]))
    @rule()
    def harvest(self):
        self.vm.get_dirty_log(1)

    @rule(sid=st.sampled_from([0, 1]), writable=st.booleans(), what=st.sampled_from(["migrate", "mprotect"]))
    def host(self, sid, writable, what):
        s = self.vm.memslots[0].id_to_memslot(sid)
        if s is None:
            return
        if what == "migrate":
            self.vm.host.migrate_pages(s.userspace_addr, s.npages << 12)
        elif sid == 1:                                   # the page tables stay writable
            self.vm.host.mprotect(s.userspace_addr, s.npages << 12, writable)

    @rule()
    def zap_all_fast(self):
        self.vm.kvm_mmu_zap_all_fast()
        self._enter()

    @precondition(lambda self: self.INJECT)
    @rule(n=st.integers(0, 12))
    def inject_desc_failure(self, n):
        self.vm.rmap_pool.fail_after(n)

    @precondition(lambda self: self.INJECT)
    @rule()
    def hog_the_arena(self):
        self.hog += hog_arena(self.vm.arena)

    @precondition(lambda self: self.INJECT)
    @rule(data=st.data(), kind=st.sampled_from("rw"))
    def memory_back_and_retry(self, data, kind):
        gva = data.draw(st.sampled_from(self.lay.gvas))
        self._release()
        r = self._access(gva, kind, 0, b"\x5a" * 8)
        assert r != "enomem", f"the access failed again once the memory was back: {r}"

    def _release(self):
        release(self.vm, self.hog)

    # --------------------------------------------------------------- invariant
    @invariant()
    def security_rule_and_audit(self):
        vm, v = self.vm, self.v
        regs = self._regs()
        read = self._read()
        roots = vcpu_roots(vm, v)
        bad = []
        for label, sp, base, bits, pgd, cur in roots:
            if cur and "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS" in v.requests:
                continue
            r = regs if cur else O.GuestRegs(regs.cr0, pgd, regs.cr4, regs.efer, regs.maxphyaddr,
                                             regs.gbpages, regs.amd)
            bad += O.check_shadow_root(vm, v, sp, r, read_u64=read, window=self.win if cur else None,
                                       base=base, va_bits=self._va_bits, label=label,
                                       strict_unsync=not cur, allow=("nx_reserved",))
        bad += O.writable_aliases(vm, [(sp, base, self._va_bits) for _, sp, base, *_ in roots])
        assert bad == [], bad[:6]
        assert vm.audit(raise_=False) == []

    def teardown(self):
        if hasattr(self, "vm"):
            self._release()


class ShadowPagingMachineInjected(ShadowPagingMachine):
    INJECT = True


class ShadowPagingPaeMachine(ShadowPagingMachine):
    MODE = 3


class ShadowPaging32Machine(ShadowPagingMachine):
    MODE = 2


TestShadowPaging = ShadowPagingMachine.TestCase
TestShadowPaging.settings = settings(_FAST, max_examples=25, stateful_step_count=25)
TestShadowPagingInjected = ShadowPagingMachineInjected.TestCase
TestShadowPagingInjected.settings = settings(_FAST, max_examples=12, stateful_step_count=25)
TestShadowPagingPae = ShadowPagingPaeMachine.TestCase
TestShadowPagingPae.settings = settings(_FAST, max_examples=12, stateful_step_count=25)
TestShadowPaging32 = ShadowPaging32Machine.TestCase
TestShadowPaging32.settings = settings(_FAST, max_examples=12, stateful_step_count=25)


# =====================================================================================
# Bad input: a specific exception, nothing changed
# =====================================================================================

def _guest_vm(flavour):
    """A VM with a little state: 'shadow' (a 4-level guest), 'shadow32' (a
    2-level 32-bit guest), 'tdp' / 'tdp_mmu' (gpa faults)."""
    mmu = "shadow" if flavour.startswith("shadow") else flavour
    vm = _backend_or_skip(mmu, host=HostConfig(tdp="ept"))
    vm.add_memory(0, 2 * MiB, slot=0, populate=True)
    v = vm.vcpus[0]
    s = lambda gpa, val, n=8: vm.write_guest(gpa, int(val).to_bytes(n, "little"))  # noqa: E731
    if flavour == "shadow":
        s(0x1000, 0x2000 | P | W | U | A)
        s(0x2000, 0x3000 | P | W | U | A)
        s(0x3000, 0x4000 | P | W | U | A)
        for i in range(8):
            s(0x4000 + 8 * i, (0x40 + i) << 12 | P | W | U | A | D)
        v.kvm_set_cr4(CR4_PAE)
        v.kvm_set_efer(EFER_LME | EFER_NX)
        v.kvm_set_cr3(0x1000)
        v.kvm_set_cr0(CR0_PE | CR0_PG | CR0_WP)
    elif flavour == "shadow32":
        s(0x1000, 0x2000 | P | W | U | A, 4)
        for i in range(8):
            s(0x2000 + 4 * i, (0x40 + i) << 12 | P | W | U | A | D, 4)
        v.kvm_set_cr3(0x1000)
        v.kvm_set_cr0(CR0_PE | CR0_PG | CR0_WP)
    v.vcpu_enter_guest()
    for i in range(4):
        assert v.kvm_mmu_page_fault(i << 12, PFERR_WRITE_MASK) in (RET_PF_FIXED, RET_PF_SPURIOUS)
    return vm, v


def _state(vm, v):
    """Everything a refused call must leave as it was."""
    tables = []
    for label, sp, base, bits, pgd, cur in vcpu_roots(vm, v):
        for leaf in O.iter_shadow(vm.arena, vm.fmt, sp, base=base):
            tables.append((label, leaf.addr, leaf.spte))
    return (vm.snapshot(), v.cpu, tuple(v.stat.pf), v.stat.invlpg, tuple(sorted(v.requests)),
            sorted(tables), vm.arena.stats()["sps"], bytes(vm.read_guest(0, 2 * MiB)),
            vm.stat.refresh() if hasattr(vm.stat, "refresh") else None)


def _refused(vm, v, call, exc, word):
    before = _state(vm, v)
    with pytest.raises(exc) as e:
        call()
    assert word in str(e.value), f"the message does not name {word!r}: {e.value}"
    assert _state(vm, v) == before
    assert vm.audit(raise_=False) == []


def _xf(why):
    return pytest.mark.xfail(strict=True, reason=why)


@pytest.mark.parametrize("flavour, addr", [
    ("shadow", 1 << 47),                                            # non-canonical, 4-level
    ("shadow", (1 << 64) - (1 << 47) - 4096),
    ("shadow32", 1 << 32),                                          # above 4 GiB, 32-bit paging
    ("tdp", 1 << 52),                                               # above any MAXPHYADDR
    ("tdp_mmu", 1 << 52),
])
def test_fault_address_that_does_not_fit_the_mode(flavour, addr):
    vm, v = _guest_vm(flavour)
    _refused(vm, v, lambda: v.kvm_mmu_page_fault(addr, 0), ValueError, "cr2_or_gpa")


@pytest.mark.parametrize("flavour, bit", [
    (f, b) for f in ("shadow", "tdp", "tdp_mmu") for b in (7, 13, 40, 63)])
def test_error_code_bits_the_kernel_never_passes(flavour, bit):
    vm, v = _guest_vm(flavour)
    _refused(vm, v, lambda: v.kvm_mmu_page_fault(0x5000, PFERR_WRITE_MASK | 1 << bit), ValueError,
             "error_code")


@pytest.mark.parametrize("flavour", ["shadow", "shadow32", "tdp"])
def test_non_integer_fault_arguments(flavour):
    vm, v = _guest_vm(flavour)
    _refused(vm, v, lambda: v.kvm_mmu_page_fault(20480.0, 0), TypeError, "cr2_or_gpa")
    _refused(vm, v, lambda: v.kvm_mmu_page_fault(0x5000, -1), ValueError, "error_code")
    _refused(vm, v, lambda: v.kvm_mmu_invlpg(-4096), ValueError, "gva")


@pytest.mark.parametrize("flavour", ["shadow", "shadow32"])
@pytest.mark.parametrize("cr3", [1 << 48, 1 << 51, (1 << 64) - 4096])
def test_cr3_above_maxphyaddr(flavour, cr3):
    from kvmmmu.vm import CrLoadError
    vm, v = _guest_vm(flavour)
    _refused(vm, v, lambda: v.kvm_set_cr3(cr3), CrLoadError, "CR3")


@pytest.mark.parametrize("flavour", ["shadow", "tdp"])
@pytest.mark.parametrize("gpa, n", [(2 * MiB, 8), (2 * MiB - 4, 8), (2 * MiB - 4096, 4097), (1 << 40, 1)])
def test_writes_beyond_a_slot(flavour, gpa, n):
    """A tracked (emulated) write or a VMM write not wholly inside memslots
    raises before writing a byte or telling the MMU (the guest page table
    at 0x1000..0x4000 and the shadow pages stay as they are)."""
    from kvmmmu._core.guest_walk import GpaNotMappedError
    vm, v = _guest_vm(flavour)
    data = b"\xff" * n
    _refused(vm, v, lambda: v.kvm_page_track_write(gpa, data), GpaNotMappedError, "gpa")
    _refused(vm, v, lambda: vm.write_guest(gpa, data), GpaNotMappedError, "gpa")


@pytest.mark.parametrize("mmu", [
    "tdp_mmu",
    "tdp",
])
def test_dirty_log_off_in_a_slot_not_1g_aligned(mmu):
    """A 2M leaf in a memslot at 16 MiB, dirty logging on (no eager split:
    the leaf stays, write-protected) and off again: the ioctl succeeds and
    every leaf still agrees with the memslot and the host."""
    vm = _backend_or_skip(mmu, host=HostConfig(tdp="ept"), params=KvmParams(eager_page_split=False))
    s = vm.add_memory(16 * MiB, 2 * MiB, slot=1, thp=True, populate=True)
    v = vm.vcpus[0]
    v.vcpu_enter_guest()
    assert v.kvm_mmu_page_fault(16 * MiB, PFERR_USER_MASK) == RET_PF_FIXED
    vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, 16 * MiB, 2 * MiB, s.userspace_addr)
    vm.set_user_memory_region(1, 0, 16 * MiB, 2 * MiB, s.userspace_addr)
    v.vcpu_enter_guest()
    bad = [b for label, sp, base, _, _, _ in vcpu_roots(vm, v) for b in O.check_direct_root(vm, v, sp, base=base)]
    assert bad == [] and vm.audit(raise_=False) == []


def test_clearing_nxe_leaves_a_reserved_gpte_mapped():
    """An architectural divergence the kernel has, verified live (scenario
    nxe_clear, tests/data/shadow_scenarios: after the guest's ``wrmsr`` the
    new root is ``kvm_mmu_get_page ... l4 ... nxe ... existing`` and ring 3
    reads the page without a fault): the shadow root role forces efer_nx=1
    (shadow-mmu.md §1.3), so after the guest clears EFER.NXE the shadow pages
    built under NXE=1 are reused and a leaf whose gPTE has bit 63 set - now
    reserved - stays mapped even after MOV CR3, where the SDM (and KVM's own
    walker: #PF P|U|RSVD) says the read faults.  The machines accept it with
    allow=('nx_reserved',)."""
    vm = _backend_or_skip("shadow")
    vm.add_memory(0, 2 * MiB, slot=0, populate=True)
    v = vm.vcpus[0]
    s = lambda gpa, val: vm.write_guest(gpa, int(val).to_bytes(8, "little"))  # noqa: E731
    s(0x1000, 0x2000 | P | W | U | A)
    s(0x2000, 0x3000 | P | W | U | A)
    s(0x3000, 0x4000 | P | W | U | A)
    s(0x4000, 0x40 << 12 | P | U | A | D | NX)
    v.kvm_set_cr4(CR4_PAE)
    v.kvm_set_efer(EFER_LME | EFER_NX)
    v.kvm_set_cr3(0x1000)
    v.kvm_set_cr0(CR0_PE | CR0_PG | CR0_WP)
    v.vcpu_enter_guest()
    assert v.kvm_mmu_page_fault(0, PFERR_USER_MASK) == RET_PF_FIXED
    (_, root, *_), = vcpu_roots(vm, v)
    v.kvm_set_efer(EFER_LME)                     # NXE=0: bit 63 of the PTE is reserved now
    v.vcpu_enter_guest()
    v.kvm_set_cr3(0x1000)                        # MOV CR3 flushes every translation
    v.vcpu_enter_guest()
    regs = O.GuestRegs.of_vcpu(v)
    assert O.walk_guest(O.memory_reader(vm), 0, regs).fault == "reserved"
    roots = vcpu_roots(vm, v)
    assert [sp for _, sp, *_ in roots][:1] == [root]           # the same shadow root page
    ok, _ = hw_access(vm, root, 0, user=True)
    assert ok                                                  # the read needs no fault
    bad = [b for label, sp, base, *_ in roots for b in O.check_shadow_root(vm, v, sp, regs, base=base)]
    # exactly the one leaf, which the guest's tables no longer map
    assert len(bad) == 1 and "gva 0x0/l1" in bad[0] and "reserved at level 1" in bad[0], bad
    assert [b for label, sp, base, *_ in roots
            for b in O.check_shadow_root(vm, v, sp, regs, base=base, allow=("nx_reserved",))] == []


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="open: with this seed a PAE guest's current root keeps an "
                   "unsync level-1 SPTE that maps neither the guest's present translation nor "
                   "one of the window of earlier ones; either the shadow MMU leaves a stale "
                   "SPTE the kernel would have synced, or the oracle's window misses a state "
                   "(not yet decided)")
def test_pae_unsync_leaf_seed_104727():
    """The example a random CI run found (seed 104727332784428171541269817353487079116),
    replayed without shrinking (well under a second)."""
    from hypothesis import Phase, seed
    from hypothesis.stateful import run_state_machine_as_test
    machine = seed(104727332784428171541269817353487079116)(ShadowPagingPaeMachine)
    run_state_machine_as_test(machine, settings=settings(
        _FAST, derandomize=False, max_examples=12, stateful_step_count=25,
        phases=[Phase.generate]))
