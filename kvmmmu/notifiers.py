"""MMU-notifier invalidation and the fault-side staleness check
(virt/kvm/kvm_main.c, include/linux/kvm_host.h, arch/x86/kvm/mmu/mmu.c).

Two sides meet here (shadow-mmu.md §18):

* **Invalidation.**  Under ``mmu_lock`` held for write,
  :meth:`MmuInvalidateState.kvm_mmu_invalidate_begin` counts an invalidation
  in progress (and, for the first one, resets the range to ``INVALID_GPA``),
  :meth:`~MmuInvalidateState.kvm_mmu_invalidate_range_add` widens the
  in-progress gfn range to the union, the MMUs zap, and
  :meth:`~MmuInvalidateState.kvm_mmu_invalidate_end` increments
  ``mmu_invalidate_seq`` *before* dropping the in-progress count.
  :class:`KvmMmuNotifier` is the VM's subscriber to the host mm: it turns an
  hva range into one gfn range per overlapping memslot (all address spaces,
  ``KVM_FILTER_SHARED``), calls ``begin`` once - when the first memslot is
  found - and asks every MMU to ``kvm_unmap_gfn_range``.  An hva range that
  hits no memslot takes no lock and changes neither the count nor the
  sequence.  ``mn_active_invalidate_count`` counts every ``start`` not yet
  ``end``-ed, memslot or not; memslot updates wait for it to reach 0.
* **Faults.**  A fault snapshots ``mmu_seq = mmu_invalidate_seq`` before it
  resolves the pfn.  :func:`mmu_invalidate_retry_gfn_unsafe` (no lock) and,
  under ``mmu_lock``, :func:`mmu_invalidate_retry_gfn` /
  :func:`kvmmmu.mmu.is_page_fault_stale` tell it to retry if an invalidation covering the
  gfn is in progress or if any invalidation ended since the snapshot.

So a fault whose snapshot was taken while an invalidation of its gfn was
running, or that is checked after one ended, is stale; a fault that starts
after the invalidation ended is not.

Invariants (checked by :meth:`MmuInvalidateState.audit`):

* ``0 <= mmu_invalidate_in_progress <= mn_active_invalidate_count`` between
  operations (memory-attribute changes and ``kvm_zap_gfn_range`` open and
  close their own invalidation inside one call);
* ``mmu_invalidate_seq`` only grows, by exactly one per ``end``;
* while in progress, the range is either still ``INVALID_GPA`` (between
  ``begin`` and the first ``range_add``) or a non-empty ``[start, end)``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from kvmmmu.host import MmuNotifier, MmuNotifierRange, PAGE_SHIFT, PAGE_SIZE

__all__ = [
    "INVALID_GPA", "KVM_FILTER_SHARED", "KVM_FILTER_PRIVATE", "KvmGfnRange",
    "MmuInvalidateState", "KvmMmuNotifier", "kvm_handle_hva_range", "hva_to_gfn_memslot",
    "mmu_invalidate_retry", "mmu_invalidate_retry_gfn", "mmu_invalidate_retry_gfn_unsafe",
]

INVALID_GPA = (1 << 64) - 1
#: enum kvm_gfn_range_filter
KVM_FILTER_SHARED = 1 << 0
KVM_FILTER_PRIVATE = 1 << 1


@dataclass
class KvmGfnRange:
    """``struct kvm_gfn_range``: ``[start, end)`` gfns of one memslot."""
    slot: object
    start: int
    end: int
    #: ``arg.attributes`` for memory-attribute changes
    attributes: int = 0
    attr_filter: int = KVM_FILTER_SHARED
    may_block: bool = False
    lockless: bool = False

    def __repr__(self):
        return (f"KvmGfnRange(slot {self.slot.as_id}:{self.slot.id}, [{self.start:#x}, "
                f"{self.end:#x}), filter={self.attr_filter}, may_block={self.may_block})")


class MmuInvalidateState:
    """``kvm->mmu_invalidate_*`` and ``kvm->mn_active_invalidate_count``."""

    def __init__(self, vm):
        sink = getattr(vm, "warn_sink", None)
        if sink is None:
            raise TypeError(f"vm must be a VM (with a warn_sink), not {type(vm).__name__}")
        self.vm = vm
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = INVALID_GPA
        self.mmu_invalidate_range_end = INVALID_GPA
        self.mn_active_invalidate_count = 0
        #: open starts of this VM's notifier: id(range) -> (range, thread id)
        #: (the thread that opened it; a memslot update in that thread cannot
        #: wait for it, see :meth:`wait_for_no_invalidation`)
        self.open_ranges: dict[int, tuple] = {}
        self.nr_begin = 0
        self.nr_end = 0
        #: the VM's one WARN/KVM_BUG record (kvmmmu.warn)
        self.sink = sink

    def __repr__(self):
        r = ("none" if self.mmu_invalidate_range_start == INVALID_GPA else
             f"[{self.mmu_invalidate_range_start:#x}, {self.mmu_invalidate_range_end:#x})")
        return (f"MmuInvalidateState(seq={self.mmu_invalidate_seq}, "
                f"in_progress={self.mmu_invalidate_in_progress}, range={r}, "
                f"mn_active={self.mn_active_invalidate_count})")

    def wait_for_no_invalidation(self, timeout: float) -> bool:
        """``kvm_swap_active_memslots``'s wait: block until
        ``mn_active_invalidate_count`` is 0 (``vm.api_lock`` is a condition,
        released while waiting).  False at once if the calling thread opened
        one of them (it would wait for itself), or after ``timeout`` seconds.
        Call with ``vm.api_lock`` held."""
        me = threading.get_ident()
        if any(t == me for _, t in self.open_ranges.values()):
            return False
        return self.vm.api_lock.wait_for(lambda: not self.mn_active_invalidate_count, timeout)

    def snapshot(self):
        return (self.mmu_invalidate_seq, self.mmu_invalidate_in_progress,
                self.mmu_invalidate_range_start, self.mmu_invalidate_range_end,
                self.mn_active_invalidate_count)

    def snapshot_invalidate(self):
        """The bookkeeping an aborted invalidation must give back
        (see :meth:`restore_invalidate`)."""
        return (self.mmu_invalidate_in_progress, self.mmu_invalidate_range_start,
                self.mmu_invalidate_range_end, self.nr_begin)

    def restore_invalidate(self, saved) -> None:
        """Take back an invalidation whose MMU callee raised before the
        primary MMU changed anything: ``mmu_invalidate_in_progress``, the
        range and the begin count return to ``saved``, the sequence is not
        bumped (nothing a racing fault could have seen has changed).  Without
        this the invalidation would stay open for good and every later fault
        on the range would retry forever."""
        (self.mmu_invalidate_in_progress, self.mmu_invalidate_range_start,
         self.mmu_invalidate_range_end, self.nr_begin) = saved

    @property
    def warnings(self) -> list[str]:
        """The VM's WARN messages so far (the sink's), oldest first."""
        return self.sink.warnings

    def kvm_mmu_invalidate_begin(self) -> None:
        """Count one more invalidation in progress; the first one resets the range."""
        self.vm.mmu_lock.lockdep_assert_held_write()
        self.mmu_invalidate_in_progress += 1
        self.nr_begin += 1
        if self.mmu_invalidate_in_progress == 1:
            self.mmu_invalidate_range_start = INVALID_GPA
            self.mmu_invalidate_range_end = INVALID_GPA

    def kvm_mmu_invalidate_range_add(self, start: int, end: int) -> None:
        """Widen the in-progress range to include ``[start, end)``."""
        self.vm.mmu_lock.lockdep_assert_held_write()
        if not self.mmu_invalidate_in_progress:
            self.sink.warn("kvm_mmu_invalidate_range_add",
                           "kvm_mmu_invalidate_range_add without an invalidation in progress")
        if self.mmu_invalidate_range_start == INVALID_GPA:
            self.mmu_invalidate_range_start = start
            self.mmu_invalidate_range_end = end
        else:
            self.mmu_invalidate_range_start = min(self.mmu_invalidate_range_start, start)
            self.mmu_invalidate_range_end = max(self.mmu_invalidate_range_end, end)

    def kvm_mmu_invalidate_end(self) -> None:
        """Bump the sequence, then drop the in-progress count (in that order:
        a fault that sees the count drop must also see the new sequence)."""
        self.vm.mmu_lock.lockdep_assert_held_write()
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1
        self.nr_end += 1
        if self.mmu_invalidate_in_progress < 0:
            self.vm.kvm_bug("mmu_invalidate_in_progress went negative")
        if self.mmu_invalidate_range_start == INVALID_GPA:
            self.sink.warn("kvm_mmu_invalidate_end",
                           "kvm_mmu_invalidate_end without any range added")

    def audit(self) -> list[str]:
        bad = []
        if self.mmu_invalidate_in_progress < 0:
            bad.append("mmu_invalidate_in_progress < 0")
        if self.mn_active_invalidate_count < 0:
            bad.append("mn_active_invalidate_count < 0")
        if self.mmu_invalidate_seq != self.nr_end:
            bad.append(f"mmu_invalidate_seq {self.mmu_invalidate_seq} != number of ends {self.nr_end}")
        if self.nr_begin - self.nr_end != self.mmu_invalidate_in_progress:
            bad.append("begins - ends != mmu_invalidate_in_progress")
        if self.mmu_invalidate_in_progress and self.mmu_invalidate_range_start != INVALID_GPA \
                and self.mmu_invalidate_range_start >= self.mmu_invalidate_range_end:
            bad.append("in-progress invalidation range is empty")
        if self.mmu_invalidate_in_progress > self.mn_active_invalidate_count:
            bad.append("more invalidations in progress than notifier starts open")
        return bad


# ==================================================================================
# Fault side
# ==================================================================================

def mmu_invalidate_retry(vm, mmu_seq: int) -> bool:
    """``mmu_invalidate_retry``: any invalidation in progress, or the sequence moved."""
    n = vm.notifier
    return bool(n.mmu_invalidate_in_progress) or n.mmu_invalidate_seq != mmu_seq


def mmu_invalidate_retry_gfn(vm, mmu_seq: int, gfn: int) -> bool:
    """``mmu_invalidate_retry_gfn`` (``mmu_lock`` held, read or write): retry if
    an in-progress invalidation covers ``gfn`` (or has no range yet - a KVM
    bug the kernel WARNs about), or if the sequence moved since ``mmu_seq``."""
    vm.mmu_lock.lockdep_assert_held()
    n = vm.notifier
    if n.mmu_invalidate_in_progress:
        if n.mmu_invalidate_range_start == INVALID_GPA:
            n.sink.warn("mmu_invalidate_retry_gfn",
                        "mmu_invalidate_retry_gfn: invalidation in progress without a range")
            return True
        if n.mmu_invalidate_range_start <= gfn < n.mmu_invalidate_range_end:
            return True
    return n.mmu_invalidate_seq != mmu_seq


def mmu_invalidate_retry_gfn_unsafe(vm, mmu_seq: int, gfn: int) -> bool:
    """The lockless pre-check (``mmu_invalidate_retry_gfn_unsafe``): may give
    false negatives and positives; must be followed by the locked check."""
    n = vm.notifier
    if n.mmu_invalidate_in_progress and \
            n.mmu_invalidate_range_start <= gfn < n.mmu_invalidate_range_end:
        return True
    return n.mmu_invalidate_seq != mmu_seq


def hva_to_gfn_memslot(hva: int, slot) -> int:
    return slot.base_gfn + ((hva - slot.userspace_addr) >> PAGE_SHIFT)


def kvm_handle_hva_range(vm, start: int, end: int, *,
                         handler: Callable[[KvmGfnRange], bool] | None,
                         on_lock: Callable[[], None] | None = None,
                         flush_on_ret: bool = False, may_block: bool = False,
                         lockless: bool = False) -> tuple[bool, bool]:
    """``kvm_handle_hva_range``: run ``handler`` on the gfn range of every
    memslot (of every address space) whose hva range intersects
    ``[start, end)``.  The lock is taken, and ``on_lock`` called, when the
    first memslot is found (never for lockless walks); with no handler only
    ``on_lock`` runs.  Returns ``(OR of handler results, found_memslot)``."""
    if end <= start:
        vm.warn_sink.warn("kvm_handle_hva_range", "kvm_handle_hva_range: empty range")
        return False, False
    ret = found = False
    try:
        for as_id in range(vm.nr_memslot_as_ids):
            for slot in vm.memslots[as_id].slots_in_hva_range(start, end):
                hs = max(start, slot.userspace_addr)
                he = min(end, slot.userspace_addr + (slot.npages << PAGE_SHIFT))
                rng = KvmGfnRange(slot=slot, start=hva_to_gfn_memslot(hs, slot),
                                  end=hva_to_gfn_memslot(he + PAGE_SIZE - 1, slot),
                                  attr_filter=KVM_FILTER_SHARED, may_block=may_block,
                                  lockless=lockless)
                if not found:
                    found = True
                    if not lockless:
                        vm.mmu_lock.acquire_write()
                        if on_lock is not None:
                            on_lock()
                        if handler is None:
                            raise _Done
                ret |= bool(handler(rng))
        if flush_on_ret and ret:
            vm.kvm_flush_remote_tlbs()
    except _Done:
        pass
    finally:
        if found and not lockless:
            vm.mmu_lock.release_write()
    return ret, found


class _Done(Exception):
    pass


class KvmMmuNotifier(MmuNotifier):
    """The VM's subscription to its host mm (``kvm_mmu_notifier_ops``).

    * ``invalidate_range_start``: ``mn_active_invalidate_count++``, then for
      the memslots hit: ``begin`` (once), ``range_add`` + ``kvm_unmap_gfn_range``
      per memslot, a remote TLB flush if any MMU asked for one;
    * ``invalidate_range_end``: ``end`` (once, if a memslot is hit), then
      ``mn_active_invalidate_count--``;
    * ``clear_flush_young`` / ``clear_young`` / ``test_young``: ``kvm_age_gfn``
      / ``kvm_test_age_gfn`` per memslot; lockless (CONFIG_KVM_MMU_LOCKLESS_AGING)
      and without a flush (CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG), as x86 selects both;
    * ``release``: ``kvm_arch_flush_shadow_all``.

    ``log`` records ``(event, hva range, gfn ranges)`` when not None.
    """

    def __init__(self, vm, *, lockless_aging: bool = True, elide_flush_if_young: bool = True):
        self.vm = vm
        self.lockless_aging = lockless_aging
        self.elide_flush_if_young = elide_flush_if_young
        self.log: list | None = None

    def _record(self, what, start, end):
        if self.log is not None:
            self.log.append((what, start, end))

    def invalidate_range_start(self, mm, rng: MmuNotifierRange) -> int:
        """If an MMU raises, the start is taken back whole (the notifier
        count, ``mmu_invalidate_in_progress``, the range: see
        :meth:`MmuInvalidateState.restore_invalidate`) before the exception
        propagates; the host does not end a start that raised (see
        :meth:`~kvmmmu.host.HostMm.invalidate_begin`), so an aborted start
        never leaves the invalidation open."""
        vm = self.vm
        st = vm.notifier
        with vm.api_lock:
            saved = st.snapshot_invalidate()
            st.mn_active_invalidate_count += 1
            self._record("invalidate_range_start", rng.start, rng.end)

            def handler(r):
                st.kvm_mmu_invalidate_range_add(r.start, r.end)
                return vm.kvm_unmap_gfn_range(r)

            try:
                kvm_handle_hva_range(vm, rng.start, rng.end, handler=handler,
                                     on_lock=st.kvm_mmu_invalidate_begin, flush_on_ret=True,
                                     may_block=rng.blockable)
            except BaseException:
                with vm.mmu_lock.write():
                    st.restore_invalidate(saved)
                    st.mn_active_invalidate_count -= 1
                vm.kvm_flush_remote_tlbs()      # for what an MMU zapped before raising
                raise
            st.open_ranges[id(rng)] = (rng, threading.get_ident())
        return 0

    def invalidate_range_end(self, mm, rng: MmuNotifierRange) -> None:
        vm = self.vm
        st = vm.notifier
        with vm.api_lock:
            if st.open_ranges.pop(id(rng), None) is None:
                st.sink.warn("kvm_mmu_notifier_invalidate_range_end",
                             "invalidate_range_end without a matching start")
                return
            self._record("invalidate_range_end", rng.start, rng.end)
            kvm_handle_hva_range(vm, rng.start, rng.end, handler=None,
                                 on_lock=st.kvm_mmu_invalidate_end, flush_on_ret=False,
                                 may_block=rng.blockable)
            st.mn_active_invalidate_count -= 1
            vm.api_lock.notify_all()            # a memslot update may be waiting

    def _age(self, start, end, handler, flush):
        with self.vm.api_lock:
            ret, _ = kvm_handle_hva_range(self.vm, start, end, handler=handler, on_lock=None,
                                          flush_on_ret=flush, may_block=False,
                                          lockless=self.lockless_aging)
        return ret

    def clear_flush_young(self, mm, start, end) -> bool:
        self._record("clear_flush_young", start, end)
        return self._age(start, end, self.vm.kvm_age_gfn,
                         not self.elide_flush_if_young)

    def clear_young(self, mm, start, end) -> bool:
        self._record("clear_young", start, end)
        return self._age(start, end, self.vm.kvm_age_gfn, False)

    def test_young(self, mm, address) -> bool:
        self._record("test_young", address, address + 1)
        return self._age(address, address + 1, self.vm.kvm_test_age_gfn, False)

    def release(self, mm) -> None:
        with self.vm.api_lock:
            self._record("release", 0, 0)
            self.vm.kvm_arch_flush_shadow_all()
