"""gfn write tracking (``arch/x86/kvm/mmu/page_track.c``, v6.6+ shape).

Each memslot with write tracking enabled carries ``slot.arch.gfn_write_track``:
one ``uint16`` counter per 4 KiB gfn (``unsigned short`` in the kernel).
A gfn is *write-tracked* while its counter is non-zero; the MMUs then never
map it writable (``mmu_try_to_unsync_pages`` refuses, a write fault answers
RET_PF_WRITE_PROTECTED and is emulated).

Who counts (shadow-mmu.md §6):

* the shadow MMU, for every shadow page with guest PTEs at a level above
  4K (``account_shadowed`` -> :func:`kvm_write_track_add_gfn_locked`,
  ``unaccount_shadowed`` -> :func:`kvm_write_track_remove_gfn_locked`);
* external users (KVMGT): :func:`kvm_write_track_add_gfn` /
  :func:`kvm_write_track_remove_gfn` (``kvm_write_track_{add,remove}_gfn``),
  with notifiers registered by :func:`kvm_page_track_register_notifier`.

Every add also disallows huge pages over the gfn (``lpage_info`` counters
through :func:`kvmmmu.mmu.kvm_mmu_gfn_disallow_lpage`) and write-protects
every SPTE that maps it; every remove allows them again.

Invariants: ``0 <= gfn_write_track[i] <= USHRT_MAX``; an update that would
leave that range is the kernel's WARN_ON_ONCE (reported to ``vm.warn_sink``)
and changes nothing.  The caller holds ``mmu_lock`` for write (the
``_locked`` forms); the external API takes it.

Thread-safety: functions, no state of their own; they mutate the memslot's
counter array and must run under ``mmu_lock`` held for write (checked by
the external API, assumed by the ``_locked`` forms, as in the kernel).
"""
from __future__ import annotations

from kvmmmu._core._checks import int_arg

__all__ = [
    "USHRT_MAX", "kvm_page_track_write_tracking_enabled", "kvm_gfn_is_write_tracked",
    "update_gfn_write_track", "kvm_write_track_add_gfn_locked",
    "kvm_write_track_remove_gfn_locked", "kvm_write_track_add_gfn",
    "kvm_write_track_remove_gfn", "kvm_page_track_register_notifier",
    "kvm_page_track_unregister_notifier", "kvm_page_track_write_notify",
    "PageTrackError",
]

USHRT_MAX = 0xFFFF


class PageTrackError(ValueError):
    """A page-tracking call with a gfn outside the memslot, or on a VM
    without write tracking (nothing changed)."""


def kvm_page_track_write_tracking_enabled(vm) -> bool:
    """``kvm_page_track_write_tracking_enabled``: external tracking, TDP
    off, or a shadow root was allocated."""
    return vm.kvm_page_track_write_tracking_enabled


def kvm_gfn_is_write_tracked(vm, slot, gfn: int) -> bool:
    """``kvm_gfn_is_write_tracked``: the counter is non-zero (False with no
    slot, a gfn outside it, or tracking disabled)."""
    if slot is None or not vm.kvm_page_track_write_tracking_enabled:
        return False
    track = slot.arch.gfn_write_track
    if track is None:
        return False
    i = gfn - slot.base_gfn
    return 0 <= i < slot.npages and track.item(i) != 0


def update_gfn_write_track(vm, slot, gfn: int, count: int) -> bool:
    """``update_gfn_write_track``: add `count` (+1/-1) to the gfn's counter;
    an under/overflow is a WARN and nothing changes.  Returns whether the
    counter changed."""
    track = slot.arch.gfn_write_track
    i = gfn - slot.base_gfn
    if track is None or not 0 <= i < slot.npages:
        raise PageTrackError(f"gfn {gfn:#x} has no write-track counter in slot {slot.id}")
    val = track.item(i) + count
    if val < 0 or val > USHRT_MAX:
        vm.warn_sink.warn("update_gfn_write_track",
                          f"gfn {gfn:#x} write-track counter would become {val}", once=True)
        return False
    track[i] = val
    return True


def kvm_write_track_add_gfn_locked(vm, slot, gfn: int, write_protect) -> None:
    """``__kvm_write_track_add_gfn`` (``mmu_lock`` held for write): count
    the gfn, disallow huge pages over it, and write-protect its SPTEs
    (``write_protect(slot, gfn)``: the MMU's ``kvm_mmu_slot_gfn_write_protect``
    from 4K up; a True answer is followed by a remote TLB flush)."""
    if not update_gfn_write_track(vm, slot, gfn, 1):
        return
    vm.kvm_mmu_gfn_disallow_lpage(slot, gfn)
    if write_protect is not None and write_protect(slot, gfn):
        vm.kvm_flush_remote_tlbs()


def kvm_write_track_remove_gfn_locked(vm, slot, gfn: int) -> None:
    """``__kvm_write_track_remove_gfn``: un-count the gfn and allow huge
    pages over it again."""
    if not update_gfn_write_track(vm, slot, gfn, -1):
        return
    vm.kvm_mmu_gfn_allow_lpage(slot, gfn)


def _slot_for(vm, gfn, as_id):
    gfn = int_arg("gfn", gfn)
    slot = vm.memslots[vm._as_id(as_id)].gfn_to_memslot(gfn)
    if slot is None:
        raise PageTrackError(f"gfn {gfn:#x} is not in a memslot")
    if not vm.kvm_page_track_write_tracking_enabled or slot.arch.gfn_write_track is None:
        raise PageTrackError("write tracking is not enabled on this VM")
    return gfn, slot


def _write_protect_hook(vm):
    mmu = vm.mmu_backend
    return getattr(mmu, "kvm_mmu_slot_gfn_write_protect", None)


def kvm_write_track_add_gfn(vm, gfn: int, as_id: int = 0) -> None:
    """``kvm_write_track_add_gfn`` (the external API, e.g. KVMGT): take
    ``mmu_lock`` for write and track the gfn.  A gfn outside the memslots
    or a VM without write tracking raises :class:`PageTrackError`."""
    gfn, slot = _slot_for(vm, gfn, as_id)
    with vm.api_lock, vm.mmu_lock.write():
        wp = _write_protect_hook(vm)
        kvm_write_track_add_gfn_locked(vm, slot, gfn,
                                       None if wp is None else (lambda s, g: wp(s, g, 1)))


def kvm_write_track_remove_gfn(vm, gfn: int, as_id: int = 0) -> None:
    """``kvm_write_track_remove_gfn``: the reverse of :func:`kvm_write_track_add_gfn`
    (an untracked gfn is a WARN and nothing changes)."""
    gfn, slot = _slot_for(vm, gfn, as_id)
    with vm.api_lock, vm.mmu_lock.write():
        kvm_write_track_remove_gfn_locked(vm, slot, gfn)


def kvm_page_track_register_notifier(vm, notifier) -> None:
    """``kvm_page_track_register_notifier``: `notifier` is called as
    ``notifier.track_write(gpa, new_bytes)`` after every emulated write
    (:func:`kvm_page_track_write_notify`); registering enables external
    write tracking on the VM (every memslot gets its counters)."""
    if not callable(getattr(notifier, "track_write", None)):
        raise TypeError("a page-track notifier needs a track_write(gpa, data) method")
    import numpy as np
    with vm.api_lock:
        # kvm_page_track_write_tracking_enable: every memslot gets its counters
        for slots in vm.memslots:
            for s in slots:
                if s.arch.gfn_write_track is None:
                    s.arch.gfn_write_track = np.zeros(s.npages, dtype=np.uint16)
        vm.page_track_external_users.append(notifier)
        vm.external_write_tracking = True


def kvm_page_track_unregister_notifier(vm, notifier) -> None:
    vm.page_track_external_users.remove(notifier)


def kvm_page_track_write_notify(vm, gpa: int, data: bytes) -> None:
    """``__kvm_page_track_write``: tell the external users about a write."""
    for n in list(vm.page_track_external_users):
        n.track_write(gpa, data)
