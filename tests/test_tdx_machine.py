"""A TD's whole life against a brute-force model (issue 13, "How it is checked").

A hypothesis state machine drives one TD (``VM(vm_type="tdx")`` with its
:class:`kvmmmu.tdx.KvmTdx` over the TDX-module model) through its life
cycle - INIT_VM and INIT_VCPU at setup, then ``KVM_TDX_INIT_MEM_REGION``,
FINALIZE, private and shared EPT violations from three vCPUs (one after the
other, or all at once on their own threads), ``KVM_PRE_FAULT_MEMORY``, vCPUs
entering and leaving the TD, private<->shared conversions
(``KVM_SET_MEMORY_ATTRIBUTES``), ``kvm_zap_gfn_range``, the fast zap, host
munmap / mmap / mprotect of the slots' backing (MMU-notifier invalidations of
shared memory), guest_memfd hole punches, memslot deletion and re-creation
(same guest_memfd, same hva), TDX_OPERAND_BUSY injected
by name, by probability and by a contending vCPU (``TdxModule.contend``), a
deliberate double failure of a removal SEAMCALL, and teardown
(``destroy_vm``) - once per code generation (``tdx_era`` "v6.18" and "genB").

The model is written out here, independently of the MMU: which gfns are
private, which private gfns were faulted in (or added by INIT_MEM_REGION)
and not zapped since, which shared gfns were faulted in and not
invalidated since, which slots and host mappings exist.  After every step:

* ``audit_mirror()`` (M1/M2, M9, M12), the module's own audit, ``KvmTdx.audit``
  and ``VM.audit()`` are clean;
* the private gfns mapped in the mirror root are exactly the model's, each on
  its guest_memfd page, and the S-EPT holds exactly those leaves (PENDING or
  MAPPED, same pfn), nothing blocked;
* every direct-root leaf maps shared memory of a live slot on exactly the
  host's pfns for its hvas (writable only over a writable VMA), and every
  shared gfn the model says is mapped is;
* the memory attributes equal the model's.

Per step: a private fault ends FIXED (SPURIOUS when already mapped) or, under
contention, RET_PF_RETRY with nothing mapped; a fault whose shared/private
access disagrees with the attribute is a memory-fault exit (-EFAULT); BUSY on
the map side ends in RET_PF_RETRY with nothing mapped and the next try
succeeds; BUSY on the removal side ends with the page removed after one forced
retry and the VM healthy; two BUSYs in a row on one removal SEAMCALL bug the
VM - from then on the mapping equality is no longer checked, but the audits
still run without raising and the module's own audit stays clean.

After ``destroy_vm``: no root is left, the HKID is released, every page went
back (PAMT empty), nothing is pinned, and every audit above is clean.
The file runs in about 5 s (60 examples of up to 50 steps per era,
derandomized).
"""
import errno as E

import numpy as np
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmmmu import mmu as kmmu
from kvmmmu._core.defs import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY, RET_PF_SPURIOUS
from kvmmmu._core.spte import spte_to_pfn
from kvmmmu.host import HostConfig
from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE
from kvmmmu.memslots import KVM_MEM_GUEST_MEMFD
from kvmmmu.mmu import PFERR_GUEST_FINAL_MASK, PFERR_PRIVATE_ACCESS, PFERR_WRITE_MASK
from kvmmmu.tdx import TD_STATE_INITIALIZED, TD_STATE_RUNNABLE
from kvmmmu.tdx_module import tdx_operand_busy
from kvmmmu.vm import VM

SHARED = 1 << 47                                # the shared bit of a GPAW-48 TD
PRIV_EC = PFERR_WRITE_MASK | PFERR_PRIVATE_ACCESS | PFERR_GUEST_FINAL_MASK
NPAGES = 512
SIZE = NPAGES << 12
#: slot id -> (gpa, THP backing); slot 1 sits in another 1G subtree (more SEPT.ADDs)
#: and may map shared memory with 2M leaves
SLOTS = {0: (0, False), 1: (1 << 30, True)}
NR_VCPUS = 3
MAP_SIDE = ("tdh_mem_sept_add", "tdh_mem_page_aug")
REMOVAL_SIDE = ("tdh_mem_range_block", "tdh_mem_track", "tdh_mem_page_remove")
ERAS = ("v6.18", "genB")

GFN = st.tuples(st.sampled_from(sorted(SLOTS)),
                st.one_of(st.integers(0, 7), st.integers(0, NPAGES - 1)))
VCPU = st.integers(0, NR_VCPUS - 1)



def _base(sid):
    return SLOTS[sid][0] >> 12


def _busy_records(calls, names=None):
    return [c for c in calls if tdx_operand_busy(c.status) and (names is None or c.name in names)]


def _double_busy(calls):
    """Whether some removal SEAMCALL got BUSY and then BUSY again on its
    forced retry (the next call of the same wrapper with the same args)."""
    last = {}
    for c in calls:
        if c.name not in REMOVAL_SIDE:
            continue
        key = (c.name, c.args)
        busy = tdx_operand_busy(c.status)
        if busy and last.get(key):
            return True
        last[key] = busy
    return False


class TdxMachine(RuleBasedStateMachine):
    ERA = None          # set by the subclass per code generation

    # ------------------------------------------------------------------ setup
    @initialize(first_private=st.integers(0, NPAGES), image=st.integers(0, 3),
                start=st.sampled_from(["runnable", "runnable", "initialized"]))
    def setup(self, first_private, image, start):
        """INIT_VM, INIT_VCPU of each vCPU, two guest_memfd slots, slot 0's
        first pages private, an initial image of up to 3 pages, and (mostly)
        FINALIZE; the rules can do the rest."""
        self.vm = vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx",
                          nr_vcpus=NR_VCPUS, tdx_era=self.ERA)
        self.tdx = t = vm.tdx
        assert t.init_vm() == 0
        for v in vm.vcpus:
            assert t.init_vcpu(v) == 0
        self.slot_args = {}
        for sid, (gpa, thp) in SLOTS.items():
            s = vm.add_memory(gpa, SIZE, slot=sid, guest_memfd=True, thp=thp, populate=True)
            self.slot_args[sid] = (s.userspace_addr, s.gmem.fd)
        self.live = {sid: True for sid in SLOTS}
        self.host_mapped = {sid: True for sid in SLOTS}
        self.readonly = {sid: False for sid in SLOTS}
        # slot 0: its first `first_private` pages private; slot 1: all shared
        self.private = set()
        if first_private:
            vm.set_memory_attributes(0, first_private << 12, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            self.private = set(range(first_private))
        self.src = vm.host.mmap(8 << 12, populate=True)       # the VMM's image pages
        self.mapped = {}            # private gfn -> the guest_memfd pfn it must map
        self.shared_mapped = set()  # shared gfns faulted in and not invalidated since
        self.dead = False
        self.bugged_on_purpose = False
        self.contention = None      # (vcpu index, host_priority, log index at contend)
        self.steps = 0
        if image and first_private:
            self.init_mem_region((0, 0), image, 0, None)
        if start == "runnable":
            self.finalize(False)

    # ------------------------------------------------------------------ helpers
    def _alive(self):
        return not self.dead and not self.vm.bugged

    def _runnable(self):
        return self._alive() and self.tdx.state == TD_STATE_RUNNABLE

    def _slot_of(self, gfn):
        for sid in SLOTS:
            if _base(sid) <= gfn < _base(sid) + NPAGES:
                return sid
        return None

    def _gmem_pfn(self, gfn):
        slot = self.vm.gfn_to_memslot(gfn)
        assert slot is not None and slot.kvm_slot_has_gmem()
        return slot.gmem.get_pfn(slot, gfn)

    def _hva(self, gfn):
        sid = self._slot_of(gfn)
        return self.slot_args[sid][0] + ((gfn - _base(sid)) << 12)

    def _calls(self):
        return self.tdx.module.calls

    def _forget_private(self, a, b):
        for g in [g for g in self.mapped if a <= g < b]:
            del self.mapped[g]

    def _forget_shared(self, a, b):
        # a zap takes a whole huge leaf: forget the 2M frames the range touches
        a, b = a & ~511, (b + 511) & ~511
        self.shared_mapped = {g for g in self.shared_mapped if not a <= g < b}

    def _tdvpr(self, v):
        return self.tdx.tdvpr[v.index]

    def _in_guest(self, v):
        return self._tdvpr(v) in self.tdx.module.vcpus_in_guest(self.tdx.td)

    def _contended(self):
        """Whether a vCPU still holds a module lock (contend()): until it
        leaves guest mode, or with host priority until it yielded once."""
        if self.contention is None:
            return False
        idx, prio, n0 = self.contention
        if not self._in_guest(self.vm.vcpus[idx]) or \
                (prio and any(c.name == "tdg_host_priority_yield" for c in self._calls()[n0:])):
            self.contention = None
            return False
        return True

    def _exit_and_reload(self, v):
        """The vCPU took an exit (an EPT violation is one) and KVM is about to
        handle it: out of guest mode, its roots reloaded as vcpu_enter_guest
        left them."""
        self.tdx.vcpu_exit(v)
        assert v.vcpu_enter_guest() is None

    def _private_fault_expect(self, v, gfn, r, busy, was_mapped, sid):
        """The result of a private fault on gfn against the model."""
        if gfn not in self.private:                 # attribute mismatch: memory fault exit
            assert r == -E.EFAULT and v.last_fault.memory_fault_exit, r
            return
        if not self.live[sid]:                      # private, no memslot: the same exit
            assert r == -E.EFAULT, r
            return
        if r == RET_PF_RETRY:
            assert busy and not was_mapped, (r, busy, was_mapped)
            return
        assert r == (RET_PF_SPURIOUS if was_mapped else RET_PF_FIXED), (r, was_mapped)
        self.mapped[gfn] = self._gmem_pfn(gfn)

    # ------------------------------------------------------------------ the initial image
    @precondition(lambda self: self._alive() and self.tdx.state == TD_STATE_INITIALIZED)
    @rule(where=GFN, n=st.integers(1, 4), vcpu=VCPU,
          busy=st.sampled_from([None, "tdh_mem_page_add", "tdh_mem_sept_add"]))
    def init_mem_region(self, where, n, vcpu, busy):
        """KVM_TDX_INIT_MEM_REGION of n pages: those up to the first one not
        private / without a slot / already mapped are added; a BUSY PAGE.ADD
        (v6.18: from the populate callback) comes back as -EBUSY and the
        ioctl is resumed from the region it wrote back."""
        sid, off = where
        n = min(n, NPAGES - off)
        a = _base(sid) + off
        v = self.vm.vcpus[vcpu]
        ok = 0
        while ok < n and self.live[sid] and a + ok in self.private and a + ok not in self.mapped:
            ok += 1
        m = self.tdx.module
        if busy:
            m.inject_busy(name=busy)
        n0 = len(self._calls())
        r, region = self.tdx.init_mem_region(v, a << 12, n, self.src)
        ebusy = 0
        while r == -E.EBUSY and ebusy < 3:
            ebusy += 1
            # v6.18: the page stays premapped (mirror leaf, no S-EPT leaf) until resumed
            fresh = region["gpa"] >> 12 not in self.mapped
            assert self.tdx.nr_premapped == (1 if self.ERA == "v6.18" and fresh else 0)
            r, region = self.tdx.init_mem_region(v, region["gpa"], region["nr_pages"],
                                                 region["source_addr"])
        busy_seen = bool(_busy_records(self._calls()[n0:]))
        m.clear_injections()
        assert not self.vm.bugged
        # -EBUSY reaches userspace only for v6.18's PAGE.ADD; every other BUSY
        # is retried inside the fault
        assert ebusy == (1 if busy == "tdh_mem_page_add" and busy_seen and self.ERA == "v6.18"
                         else 0)
        assert region["nr_pages"] == n - ok, (region, ok)
        if ok == n:
            assert r == 0
        else:
            bad = a + ok
            want = -E.EIO if bad in self.mapped else -E.EINVAL
            assert r == want, (r, want)
        for g in range(a, a + ok):
            self.mapped[g] = self._gmem_pfn(g)

    @precondition(lambda self: self._alive() and self.tdx.state == TD_STATE_INITIALIZED)
    @rule(busy=st.booleans())
    def finalize(self, busy):
        if busy:
            self.tdx.module.inject_busy(name="tdh_mr_finalize")
            assert self.tdx.finalize_vm() == -E.EBUSY
            assert self.tdx.state == TD_STATE_INITIALIZED
        assert self.tdx.finalize_vm() == 0
        assert self.tdx.state == TD_STATE_RUNNABLE and self.tdx.pre_fault_allowed

    # ------------------------------------------------------------------ vCPUs
    @precondition(lambda self: self._runnable())
    @rule(vcpu=VCPU)
    def enter(self, vcpu):
        v = self.vm.vcpus[vcpu]
        if not self._in_guest(v):
            assert v.vcpu_enter_guest() is None
            assert self.tdx.vcpu_enter(v)
            assert self._in_guest(v)

    @precondition(lambda self: self._runnable())
    @rule(vcpu=VCPU)
    def exit(self, vcpu):
        v = self.vm.vcpus[vcpu]
        self.tdx.vcpu_exit(v)
        assert not self._in_guest(v)

    @precondition(lambda self: self._runnable() and not self._contended())
    @rule(vcpu=VCPU, lock=st.sampled_from(["sept", "epoch"]), host_priority=st.booleans())
    def contend(self, vcpu, lock, host_priority):
        """A vCPU in guest mode takes a module lock (zero-step mitigation, a
        guest TDCALL; or VP.ENTER against TRACK)."""
        v = self.vm.vcpus[vcpu]
        self.enter(vcpu)
        self.tdx.module.contend(self.tdx.td, self._tdvpr(v), lock=lock,
                                host_priority=host_priority)
        self.contention = (vcpu, host_priority, len(self._calls()))

    # ------------------------------------------------------------------ faults
    @precondition(lambda self: self._runnable())
    @rule(vcpu=VCPU, where=GFN)
    def private_fault(self, vcpu, where):
        """A private EPT violation: tdx_handle_ept_violation retries locally
        while the fault answers RET_PF_RETRY; under a held module lock one
        kvm_mmu_page_fault (the local loop would spin until the guest lets
        go), which must then end in RET_PF_RETRY with nothing mapped."""
        sid, off = where
        gfn = _base(sid) + off
        v = self.vm.vcpus[vcpu]
        self._exit_and_reload(v)
        contended = self._contended()
        was = gfn in self.mapped
        n0 = len(self._calls())
        if contended:
            r = v.kvm_mmu_page_fault(gfn << 12, PRIV_EC)
        else:
            r = self.tdx.handle_ept_violation(v, gfn << 12)
        busy = bool(_busy_records(self._calls()[n0:]))
        assert not busy or contended
        self._private_fault_expect(v, gfn, r, busy, was, sid)
        assert not self.vm.bugged

    @precondition(lambda self: self._runnable())
    @rule(vcpu=VCPU, where=GFN, write=st.booleans())
    def shared_fault(self, vcpu, where, write):
        """A shared EPT violation (the gpa with the shared bit): the direct
        root maps the host page of the gfn's hva, no SEAMCALL."""
        sid, off = where
        gfn = _base(sid) + off
        v = self.vm.vcpus[vcpu]
        self._exit_and_reload(v)
        if self.host_mapped[sid]:
            self.vm.host.populate(self._hva(gfn), 4096, write=not self.readonly[sid])
        n0 = len(self._calls())
        r = self.tdx.handle_ept_violation(v, SHARED | gfn << 12, write=write)
        assert len(self._calls()) == n0, "a shared fault issued a SEAMCALL"
        # the attribute is checked first, the memslot then (kvm_mmu_faultin_pfn)
        if gfn in self.private:
            assert r == -E.EFAULT and v.last_fault.memory_fault_exit, r
        elif not self.live[sid]:
            assert r == RET_PF_EMULATE, r                   # no memslot: MMIO
        elif not self.host_mapped[sid] or (write and self.readonly[sid]):
            assert r == -E.EFAULT, r                        # hva_to_pfn failed
        else:
            assert r in (RET_PF_FIXED, RET_PF_SPURIOUS), r
            sptes, levels = self.vm.mmu_backend.translate(v, np.array([gfn], np.uint64))
            lvl = int(levels[0])
            assert lvl >= 1, f"shared gfn {gfn:#x} not mapped after {r}"
            pfn = spte_to_pfn(int(sptes[0])) + (gfn & ((1 << 9 * (lvl - 1)) - 1))
            host, _ = self.vm.host.hva_to_pfn_array(np.array([self._hva(gfn)], np.uint64))
            assert pfn == int(host[0])
            self.shared_mapped.add(gfn)
        assert not self.vm.bugged

    @precondition(lambda self: self._alive() and not self._contended())
    @rule(vcpu=VCPU, where=GFN, n=st.integers(1, 8))
    def pre_fault(self, vcpu, where, n):
        """KVM_PRE_FAULT_MEMORY of n pages (the gpa without the shared bit):
        -EOPNOTSUPP before FINALIZE; then page by page a private gfn goes to
        the mirror root, a shared one (the shared bit added) to the direct
        root, up to the first page that cannot be mapped (no memslot, no host
        page), whose error comes back only if nothing was mapped."""
        sid, off = where
        n = min(n, NPAGES - off)
        a = _base(sid) + off
        v = self.vm.vcpus[vcpu]
        self._exit_and_reload(v)
        r, gpa, size = v.kvm_vcpu_pre_fault_memory(a << 12, n << 12)
        if self.tdx.state != TD_STATE_RUNNABLE:
            assert (r, gpa, size) == (-E.EOPNOTSUPP, a << 12, n << 12)
            return
        done = (gpa >> 12) - a
        assert 0 <= done <= n and size == (n - done) << 12, (r, gpa, size)

        def mappable(g):
            return self.live[sid] and (g in self.private or self.host_mapped[sid])
        ok = 0
        while ok < n and mappable(a + ok):
            ok += 1
        # (a shared 2M leaf may cover several pages at once, never one that
        # cannot be mapped)
        assert done == ok and (r == 0) == (ok > 0), (r, done, ok)
        if not ok:
            assert r in (-E.ENOENT, -E.EFAULT), r
        for g in range(a, a + ok):
            if g in self.private:
                self.mapped[g] = self._gmem_pfn(g)
            else:
                self.shared_mapped.add(g)
        assert not self.vm.bugged

    @precondition(lambda self: self._runnable() and not self._contended())
    @rule(wheres=st.lists(GFN, min_size=1, max_size=12), write=st.booleans())
    def parallel_faults(self, wheres, write):
        """Every vCPU on its own thread faults the same gfns (each thread in
        its own order): the map paths run at once under mmu_lock for read,
        meet each other's FROZEN entries and retry; whatever the
        interleaving, every gfn ends mapped once (a second SEPT.ADD or AUG of
        one entry would be refused by the module and bug the VM).  Only gfns
        that can be mapped (a live slot; shared ones with a host page)."""
        import time

        from _threads import run_in_threads

        gfns = []
        for sid, off in wheres:
            g = _base(sid) + off
            if self.live[sid] and (g in self.private or self.host_mapped[sid]) and g not in gfns:
                gfns.append(g)
        for v in self.vm.vcpus:
            self._exit_and_reload(v)                # root loads take the lock for write
        # the host pages, faulted in (for write where the threads write)
        # beforehand: the host model refuses two threads in handle_mm_fault
        # at once (HostMm is used by one thread at a time)
        for g in gfns:
            if g not in self.private:
                if write and not self.readonly[self._slot_of(g)]:
                    self.vm.host.handle_mm_fault(self._hva(g), True)
                else:
                    self.vm.host.populate(self._hva(g), 4096, write=False)
        results, errors = [[] for _ in self.vm.vcpus], []

        def run(i):
            v = self.vm.vcpus[i]
            try:
                for g in gfns[i:] + gfns[:i]:
                    if g in self.private:
                        gpa, w = g << 12, False
                    else:
                        gpa, w = SHARED | g << 12, write and not self.readonly[self._slot_of(g)]
                    # RET_PF_RETRY (another thread's FROZEN entry): the vCPU
                    # re-enters the guest and faults again, for as long as
                    # the scheduler lets the other thread hold the entry
                    deadline = time.monotonic() + 10
                    while True:
                        r = self.tdx.handle_ept_violation(v, gpa, write=w)
                        if r != RET_PF_RETRY or self.vm.bugged or time.monotonic() > deadline:
                            break
                        time.sleep(0)
                    results[i].append(r)
            except BaseException as e:          # noqa: BLE001 (reported below)
                errors.append(e)

        run_in_threads(run, NR_VCPUS)
        assert not errors, errors
        assert not self.vm.bugged, self.vm.bugged
        assert all(r in (RET_PF_FIXED, RET_PF_SPURIOUS) for rs in results for r in rs), \
            (results, self.vm.audit(raise_=False))
        for g in gfns:
            if g in self.private:
                self.mapped[g] = self._gmem_pfn(g)
            else:
                self.shared_mapped.add(g)

    def _unmapped_private(self):
        return sorted(g for g in self.private
                      if self.live[self._slot_of(g)] and g not in self.mapped)

    @precondition(lambda self: self._runnable() and not self._contended()
                  and self._unmapped_private())
    @rule(data=st.data(), vcpu=VCPU, at=st.sampled_from(MAP_SIDE))
    def busy_map_fault(self, data, vcpu, at):
        """One BUSY injected at SEPT.ADD or PAGE.AUG of a private fault: the
        hook answers -EBUSY, the mirror SPTE goes back, RET_PF_RETRY with
        nothing mapped (checked in the middle of the step too); the retry
        maps the page."""
        gfn = data.draw(st.sampled_from(self._unmapped_private()))
        v = self.vm.vcpus[vcpu]
        self._exit_and_reload(v)
        m = self.tdx.module
        m.inject_busy(name=at)
        n0 = len(self._calls())
        r = v.kvm_mmu_page_fault(gfn << 12, PRIV_EC)
        busy = _busy_records(self._calls()[n0:])
        m.clear_injections()
        if busy:
            # SEPT.ADD is skipped when the tables exist: then nothing was BUSY
            assert [c.name for c in busy] == [at]
            assert r == RET_PF_RETRY and not self.vm.bugged
            self.check()                                    # nothing mapped
            r = v.kvm_mmu_page_fault(gfn << 12, PRIV_EC)
        else:
            assert at == "tdh_mem_sept_add"
        assert r == RET_PF_FIXED, r
        self.mapped[gfn] = self._gmem_pfn(gfn)

    # ------------------------------------------------------------------ conversions and zaps
    @precondition(lambda self: self._alive())
    @rule(where=GFN, n=st.integers(1, 64), to_private=st.booleans())
    def convert(self, where, n, to_private):
        """KVM_SET_MEMORY_ATTRIBUTES: to shared zaps the private mappings of
        the range (BLOCK, TRACK, REMOVE, WBINVD), to private the shared ones."""
        sid, off = where
        a = _base(sid) + off
        b = min(a + n, _base(sid) + NPAGES)
        self.vm.set_memory_attributes(a << 12, (b - a) << 12,
                                      KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0)
        if to_private:
            self.private |= set(range(a, b))
            self._forget_shared(a, b)
        else:
            self.private -= set(range(a, b))
            self._forget_private(a, b)
        assert not self.vm.bugged

    @precondition(lambda self: self._alive())
    @rule(where=GFN, n=st.integers(1, 600))
    def zap_gfn_range(self, where, n):
        """kvm_zap_gfn_range: every valid root, the mirror included."""
        sid, off = where
        a = _base(sid) + off
        kmmu.kvm_zap_gfn_range(self.vm, a, a + n)
        self._forget_private(a, a + n)
        self._forget_shared(a, a + n)
        assert not self.vm.bugged

    @precondition(lambda self: self._alive())
    @rule()
    def zap_all_fast(self):
        """The fast zap (MMIO generation wrap): direct roots only."""
        kmmu.kvm_mmu_zap_all_fast(self.vm)
        self.shared_mapped.clear()

    # ------------------------------------------------------------------ host events
    @precondition(lambda self: not self.dead)
    @rule(sid=st.sampled_from(sorted(SLOTS)))
    def host_munmap(self, sid):
        """munmap of the slot's backing: an MMU_NOTIFY_UNMAP invalidation,
        SHARED filter: the mirror is untouched."""
        if self.host_mapped[sid]:
            self.vm.host.munmap(self.slot_args[sid][0], SIZE)
            self.host_mapped[sid] = False
            self._forget_shared(_base(sid), _base(sid) + NPAGES)

    @precondition(lambda self: not self.dead)
    @rule(sid=st.sampled_from(sorted(SLOTS)))
    def host_mmap(self, sid):
        if not self.host_mapped[sid]:
            self.vm.host.mmap(SIZE, hva=self.slot_args[sid][0], thp=SLOTS[sid][1], populate=True)
            self.host_mapped[sid] = True
            self.readonly[sid] = False

    @precondition(lambda self: not self.dead)
    @rule(sid=st.sampled_from(sorted(SLOTS)), writable=st.booleans())
    def host_mprotect(self, sid, writable):
        if self.host_mapped[sid]:
            self.vm.host.mprotect(self.slot_args[sid][0], SIZE, writable)
            if not writable:
                self._forget_shared(_base(sid), _base(sid) + NPAGES)
            self.readonly[sid] = not writable

    # ------------------------------------------------------------------ memslots
    @precondition(lambda self: self._alive())
    @rule(sid=st.sampled_from(sorted(SLOTS)))
    def delete_slot(self, sid):
        if self.live[sid]:
            self.vm.delete_memslot(sid)
            self.live[sid] = False
            self._forget_private(_base(sid), _base(sid) + NPAGES)
            self._forget_shared(_base(sid), _base(sid) + NPAGES)
            assert not self.vm.bugged

    @precondition(lambda self: self._alive())
    @rule(sid=st.sampled_from(sorted(SLOTS)))
    def readd_slot(self, sid):
        """The slot again, on the same guest_memfd (its pages kept) and hva."""
        if not self.live[sid]:
            hva, fd = self.slot_args[sid]
            self.vm.set_user_memory_region(sid, KVM_MEM_GUEST_MEMFD, SLOTS[sid][0], SIZE,
                                           hva, 0, fd)
            self.live[sid] = True

    @precondition(lambda self: self._alive())
    @rule(where=GFN, n=st.integers(1, 64))
    def punch_hole(self, where, n):
        """fallocate(PUNCH_HOLE) on a slot's guest_memfd: the private mappings
        of the range go (PRIVATE filter: BLOCK, TRACK, REMOVE), then the file
        pages; a later private fault gets a fresh page.  A deleted slot's
        file has no binding: only its pages go."""
        sid, off = where
        n = min(n, NPAGES - off)
        gmem = self.vm.kvm_gmem_get_file(self.slot_args[sid][1])
        gmem.punch_hole(off << 12, n << 12)
        a = _base(sid) + off
        if self.live[sid]:
            self._forget_private(a, a + n)
        else:
            assert not [g for g in self.mapped if a <= g < a + n]
        assert not self.vm.bugged

    # ------------------------------------------------------------------ BUSY on the removal side
    def _remove(self, gfn, how):
        sid = self._slot_of(gfn)
        if how == "convert":
            self.vm.set_memory_attributes(gfn << 12, 4096, 0)
            self.private.discard(gfn)
            self._forget_private(gfn, gfn + 1)
        elif how == "zap":
            kmmu.kvm_zap_gfn_range(self.vm, gfn, gfn + 1)
            self._forget_private(gfn, gfn + 1)
            self._forget_shared(gfn, gfn + 1)
        elif how == "punch":
            self.punch_hole((sid, gfn - _base(sid)), 1)
        else:
            self.delete_slot(sid)

    def _removal_points(self):
        return REMOVAL_SIDE if self.tdx.state == TD_STATE_RUNNABLE else \
            ("tdh_mem_range_block", "tdh_mem_page_remove")     # no TRACK before FINALIZE

    @precondition(lambda self: self._alive() and self.mapped)
    @rule(data=st.data(), how=st.sampled_from(["convert", "zap", "punch", "delete"]))
    def busy_removal(self, data, how):
        """One BUSY at BLOCK, TRACK or REMOVE of a private page's removal:
        the kernel's single forced retry (every vCPU kicked out, entries
        refused meanwhile) removes it; the VM stays healthy."""
        gfn = data.draw(st.sampled_from(sorted(self.mapped)))
        at = data.draw(st.sampled_from(self._removal_points()))
        self._contended()
        m = self.tdx.module
        m.inject_busy(name=at)
        n0 = len(self._calls())
        self._remove(gfn, how)
        calls = [c for c in self._calls()[n0:] if c.name == at]
        m.clear_injections()
        assert not self.vm.bugged
        assert len(calls) >= 2, f"{how} of mapped gfn {gfn:#x}: {at} called {len(calls)}x"
        assert tdx_operand_busy(calls[0].status) and calls[1].args == calls[0].args
        assert not tdx_operand_busy(calls[1].status)
        assert not self.tdx.wait_for_sept_zap
        assert gfn not in self.mapped

    @precondition(lambda self: self._alive() and self.mapped and self.steps >= 20)
    @rule(data=st.data())
    def double_failure(self, data):
        """BUSY twice at one removal SEAMCALL: the forced retry fails too,
        the VM is bugged (on purpose)."""
        gfn = data.draw(st.sampled_from(sorted(self.mapped)))
        at = data.draw(st.sampled_from(self._removal_points()))
        self.tdx.module.inject_busy(name=at, times=2)
        self.vm.set_memory_attributes(gfn << 12, 4096, 0)
        self.tdx.module.clear_injections()
        assert self.vm.bugged
        self.bugged_on_purpose = True

    @precondition(lambda self: self._runnable())
    @rule(p=st.sampled_from([0.1, 0.3]), seed=st.integers(0, 1 << 16),
          ops=st.lists(st.tuples(st.sampled_from(["fault", "share", "privatize", "zap"]),
                                 GFN, VCPU), min_size=1, max_size=6))
    def busy_storm(self, p, seed, ops):
        """BUSY with probability p at every map- and removal-side SEAMCALL
        while faults, conversions and zaps run: faults end FIXED/SPURIOUS or
        RET_PF_RETRY with nothing mapped; the VM is bugged exactly when
        some removal SEAMCALL was BUSY on its forced retry too."""
        m = self.tdx.module
        m.inject_busy(probability=p, seed=seed, names=MAP_SIDE + REMOVAL_SIDE)
        n0 = len(self._calls())
        try:
            for op, (sid, off), vcpu in ops:
                if self.vm.bugged:
                    break
                gfn = _base(sid) + off
                if op == "fault":
                    v = self.vm.vcpus[vcpu]
                    self._exit_and_reload(v)
                    was = gfn in self.mapped
                    k0 = len(self._calls())
                    r = v.kvm_mmu_page_fault(gfn << 12, PRIV_EC)
                    busy = bool(_busy_records(self._calls()[k0:], MAP_SIDE))
                    self._private_fault_expect(v, gfn, r, busy, was, sid)
                elif op == "share":
                    self.vm.set_memory_attributes(gfn << 12, 4096, 0)
                    self.private.discard(gfn)
                    self._forget_private(gfn, gfn + 1)
                elif op == "privatize":
                    self.vm.set_memory_attributes(gfn << 12, 4096, KVM_MEMORY_ATTRIBUTE_PRIVATE)
                    self.private.add(gfn)
                    self._forget_shared(gfn, gfn + 1)
                else:
                    kmmu.kvm_zap_gfn_range(self.vm, gfn, gfn + 1)
                    self._forget_private(gfn, gfn + 1)
                    self._forget_shared(gfn, gfn + 1)
        finally:
            m.clear_injections()
        double = _double_busy(self._calls()[n0:])
        assert bool(self.vm.bugged) == double, (self.vm.bugged, double)
        self.bugged_on_purpose |= double

    # ------------------------------------------------------------------ teardown
    @precondition(lambda self: not self.dead and self.steps >= 15)
    @rule()
    def destroy(self):
        """destroy_vm: guest_memfd release (private leaves, HKID assigned),
        KEY.FREEID, vCPUs, the mirror tables reclaimed bottom-up, the TDR."""
        bugged = bool(self.vm.bugged)
        rc = self.tdx.destroy_vm()
        self.dead = True
        self.mapped.clear()
        self.shared_mapped.clear()
        mmu = self.vm.mmu_backend
        assert mmu.roots == []
        if not bugged:
            assert rc == 0
            assert self.tdx.module.pamt_snapshot() == {}
            assert not self.tdx.pins
            assert not self.vm.bugged

    @precondition(lambda self: self.dead)
    @rule()
    def idle(self):
        """Nothing (a step once the TD is gone)."""

    # ------------------------------------------------------------------ the checks
    @invariant()
    def check(self):
        vm, t, mmu = self.vm, self.tdx, self.vm.mmu_backend
        self.steps += 1
        module_bad = t.module.audit()
        assert module_bad == [], module_bad               # the module's rules, always
        mirror_bad = mmu.audit_mirror()
        tdx_bad = t.audit()
        vm_bad = vm.audit(raise_=False)
        if self.dead:
            assert mmu.roots == [] and t.hkid is None
            assert vm.bugged or t.td is None      # a bugged TD may leak its TDR
        if vm.bugged:
            assert self.bugged_on_purpose, vm.bugged
            return                  # the audits ran; the mappings are KVM's business now
        assert mirror_bad == [], mirror_bad
        assert tdx_bad == [], tdx_bad
        assert vm_bad == [], vm_bad
        if self.dead:
            return
        assert not t.wait_for_sept_zap and (self.ERA != "v6.18" or t.nr_premapped == 0)
        # the attributes
        universe = np.concatenate([np.arange(_base(s), _base(s) + NPAGES, dtype=np.uint64)
                                   for s in SLOTS])
        attrs = vm.mem_attrs.get_array(universe) & np.uint64(KVM_MEMORY_ATTRIBUTE_PRIVATE)
        assert set(universe[attrs != 0].tolist()) == self.private
        # the mirror root: exactly the model's private mappings, on guest_memfd pages
        mirror_roots = [r for r in mmu.roots if r.is_mirror and not r.invalid]
        assert len(mirror_roots) <= 1           # none before a vCPU first loads its roots
        got = {}
        for root in mirror_roots:
            d = mmu.core.dump(root.sp)
            leaves = d[d["leaf"]]
            assert set(leaves["level"].tolist()) <= {1}
            got = {int(g): spte_to_pfn(int(s)) for g, s in zip(leaves["gfn"], leaves["spte"])}
        assert got == self.mapped, (sorted(set(got) ^ set(self.mapped))[:8])
        for g, pfn in got.items():
            assert pfn == self._gmem_pfn(g)
        # the S-EPT: the same leaves, nothing blocked
        sept = t.module.sept_snapshot(t.td)
        sleaves = {gpa >> 12: pfn for (lv, gpa), (state, pfn, _) in sept.items()
                   if state in ("PENDING", "MAPPED")}
        assert sleaves == self.mapped
        assert all(lv == 0 for (lv, _), (state, _, _) in sept.items()
                   if state in ("PENDING", "MAPPED"))
        assert not [k for k, (state, _, _) in sept.items() if "BLOCKED" in state]
        # the direct roots: shared memory only, on the host's pages
        direct = set()
        for r in mmu.roots:
            if r.is_mirror:
                continue
            d = mmu.core.dump(r.sp)
            for g, level, spte in zip(d["gfn"][d["leaf"]].tolist(), d["level"][d["leaf"]].tolist(),
                                      d["spte"][d["leaf"]].tolist()):
                n = 1 << 9 * (level - 1)
                gfns = range(g, g + n)
                sid = self._slot_of(g)
                assert sid is not None and self._slot_of(g + n - 1) == sid, f"leaf {g:#x}/{level}"
                assert self.live[sid] and self.host_mapped[sid], f"leaf {g:#x} of a dead slot/VMA"
                assert not self.private.intersection(gfns), f"shared leaf {g:#x} maps private"
                hva = np.array([self._hva(x) for x in gfns], np.uint64)
                host, _ = vm.host.hva_to_pfn_array(hva)
                base = spte_to_pfn(spte)
                assert (host == np.arange(base, base + n, dtype=np.uint64)).all(), \
                    f"leaf {g:#x}/{level} maps {base:#x}, the host has {int(host[0]):#x}"
                if spte & 2:
                    assert not self.readonly[sid], f"writable leaf {g:#x} over a read-only VMA"
                if not r.invalid:
                    direct.update(gfns)
        assert self.shared_mapped <= direct, sorted(self.shared_mapped - direct)[:8]


class TdxMachineV618(TdxMachine):
    ERA = "v6.18"


class TdxMachineGenB(TdxMachine):
    ERA = "genB"


# no explain phase: its line tracing makes a failing run take minutes
_SETTINGS = settings(max_examples=60, stateful_step_count=50, deadline=None,
                     derandomize=True, database=None,
                     phases=[Phase.explicit, Phase.generate, Phase.shrink])
TestTdxMachineV618 = TdxMachineV618.TestCase
TestTdxMachineV618.settings = _SETTINGS
TestTdxMachineGenB = TdxMachineGenB.TestCase
TestTdxMachineGenB.settings = _SETTINGS


# --------------------------------------------------------------------------- what the machine found
# Minimal reproducers of the two bugs the machine found, kept as regression
# tests: the memslot zap without mmu_lock for write (fixed on main in
# 1c51073) and VM.audit raising after destroy_vm (fixed in 924c613).

def _running_td(era):
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx", tdx_era=era)
    t = vm.tdx
    assert t.init_vm() == 0 and t.init_vcpu(vm.vcpus[0]) == 0
    vm.add_memory(0, SIZE, slot=0, guest_memfd=True)
    vm.set_memory_attributes(0, SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert t.finalize_vm() == 0
    v = vm.vcpus[0]
    assert v.vcpu_enter_guest() is None
    assert t.handle_ept_violation(v, 0x5000) == RET_PF_FIXED
    return vm, t


@pytest.mark.parametrize("era", ERAS)
def test_memslot_delete_removes_private_leaves_under_the_write_lock(era):
    """kvm_mmu_zap_memslot holds mmu_lock for write: the TDX removal
    (BLOCK, TRACK, REMOVE) runs under it and warns otherwise."""
    vm, t = _running_td(era)
    seen = []
    real = t.remove_external_spte

    def spy(*a):
        seen.append(vm.mmu_lock.writers)
        return real(*a)
    t.remove_external_spte = spy
    vm.delete_memslot(0)
    assert seen == [1]                      # one private leaf, removed under the write lock
    assert t.module.sept_snapshot(t.td) and not [
        k for k, (state, _, _) in t.module.sept_snapshot(t.td).items() if k[0] == 0]
    assert vm.audit(raise_=False) == []


@pytest.mark.parametrize("era", ERAS)
def test_vm_audit_after_teardown(era):
    """destroy_vm reclaims the TDR: the audits must not ask the module
    about that TD any more."""
    vm, t = _running_td(era)
    assert t.destroy_vm() == 0
    assert vm.mmu_backend.audit_mirror() == []
    assert vm.audit(raise_=False) == []
