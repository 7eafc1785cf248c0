"""Memslots: ``KVM_SET_USER_MEMORY_REGION(2)`` with the kernel's semantics, the
per-slot metadata the MMUs use, and dirty logging (virt/kvm/kvm_main.c,
arch/x86/kvm/x86.c, arch/x86/kvm/mmu/mmu.c; shadow-mmu.md §16).

* :func:`kvm_set_memory_region` validates a :class:`UserspaceMemoryRegion` in
  the kernel's order, with one exception class per failure (each carries the
  kernel's ``errno``), classifies the change (CREATE, DELETE, MOVE,
  FLAGS_ONLY, or nothing) and applies it the kernel's way: a DELETE or MOVE
  first publishes an INVALID copy of the old slot and has the MMUs zap it,
  metadata is prepared (and the INVALID copy reverted if that fails), the new
  memslots are published, then committed (page budget, dirty-logging
  transitions).  A failed call leaves memslots, metadata, dirty bitmaps and
  counters unchanged; the one exception is the kernel's own: a DELETE or MOVE
  that fails after the INVALID copy was published has bumped the generation
  twice and zapped the old slot's SPTEs.
* Each address space (:class:`KvmMemslots`) has a ``generation`` that starts
  at ``as_id`` and grows by the number of address spaces on every publish, so
  generations are unique across address spaces; the MMIO SPTE generation is
  ``generation & MMIO_SPTE_GEN_MASK``, and a wrap of it (ignoring the
  address-space bits) makes the MMUs fast-zap everything.
* :class:`KvmMemorySlot` owns an :class:`~kvmmmu._core.rmap.RmapSlot` (rmap
  heads per level, sized the kernel's way) when rmaps are in use,
  ``lpage_info`` per huge level (one 32-bit ``disallow_lpage`` word per huge
  frame overlapping the slot, misaligned ends and hva/gfn incongruence
  counted at creation, ``KVM_LPAGE_MIXED_FLAG`` from memory attributes), the
  write-tracking counts, and the dirty bitmap (``uint64`` words, bit ``i`` of
  word ``j`` = gfn ``base_gfn + 64 j + i``).

Invariants (checked by :func:`audit_memslots`):

* within an address space slots do not overlap in gfn space, ids are unique
  and below ``KVM_MEM_SLOTS_NUM``, no slot is INVALID between calls;
* ``generation % nr_as == as_id`` and the update-in-progress bit is clear;
* metadata sizes match the geometry (``kvm_mmu_slot_lpages``); every
  ``disallow_lpage`` count is at least its creation baseline (misalignment),
  stays below bit 31, and bit 31 (MIXED) equals the attribute scan for every
  frame wholly inside the slot (and is clear elsewhere);
* a dirty bitmap exists iff the slot logs dirty pages (bitmap mode), has
  ``ceil(npages / 64)`` words and no bit beyond ``npages``;
* ``nr_memslot_pages`` is the sum of ``npages`` and
  ``nr_memslots_dirty_logging`` the number of logging slots.
"""
from __future__ import annotations

import enum
import errno as E
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from kvmmmu._core.defs import (
    KVM_MAX_HUGEPAGE_LEVEL, KVM_NR_PAGE_SIZES, KVM_PAGES_PER_HPAGE, gfn_to_index, kvm_mmu_slot_lpages,
)
from kvmmmu._core._checks import check_array, int_arg
from kvmmmu._core.rmap import RmapSlot, audit as rmap_audit
from kvmmmu.errors import KvmNoMemoryError
from kvmmmu.host import PAGE_SHIFT, PAGE_SIZE

__all__ = [
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "KVM_MEM_GUEST_MEMFD", "KVM_MEMSLOT_INVALID",
    "KVM_SET_USER_MEMORY_REGION_V1_FLAGS", "KVM_MEM_SLOTS_NUM", "KVM_INTERNAL_MEM_SLOTS",
    "KVM_USER_MEM_SLOTS", "KVM_MEM_MAX_NR_PAGES", "KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS",
    "KVM_LPAGE_MIXED_FLAG", "KVM_NR_PAGE_SIZES", "KVM_MAX_HUGEPAGE_LEVEL",
    "APIC_ACCESS_PAGE_PRIVATE_MEMSLOT", "IDENTITY_PAGETABLE_PRIVATE_MEMSLOT", "TSS_PRIVATE_MEMSLOT",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE", "KVM_DIRTY_LOG_INITIALLY_SET",
    "KvmMrChange", "KVM_PAGES_PER_HPAGE", "gfn_to_index", "kvm_mmu_slot_lpages",
    "KvmMemslotError", "MemslotFlagsError", "MemslotAlignmentError", "MemslotUserspaceAddressError",
    "MemslotGuestMemfdOffsetError", "MemslotIdError", "MemslotWrapError", "MemslotTooLargeError",
    "MemslotNotFoundError", "MemslotTotalPagesError", "MemslotImmutableError",
    "MemslotOverlapError", "MemslotGfnLimitError", "MemslotMoveTrackedError",
    "GuestMemfdError", "GuestMemfdBadFdError", "GuestMemfdBindError", "MemslotUpdateWouldBlockError",
    "DirtyLogError",
    "UserspaceMemoryRegion", "GuestMemfd", "KvmArchMemorySlot", "KvmMemorySlot", "KvmMemslots",
    "kvm_set_memory_region", "kvm_mmu_max_gfn", "lpage_baseline",
    "mark_page_dirty_in_slot", "kvm_get_dirty_log_protect", "kvm_clear_dirty_log_protect",
    "audit_memslots",
]

# --- flags and limits (include/uapi/linux/kvm.h, include/linux/kvm_host.h, x86) -----
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
#: kernel-internal: the slot is being deleted or moved
KVM_MEMSLOT_INVALID = 1 << 16
KVM_SET_USER_MEMORY_REGION_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
KVM_MEM_SLOTS_NUM = 32767                  # SHRT_MAX
KVM_INTERNAL_MEM_SLOTS = 3                 # x86
KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS
APIC_ACCESS_PAGE_PRIVATE_MEMSLOT = KVM_USER_MEM_SLOTS + 0
IDENTITY_PAGETABLE_PRIVATE_MEMSLOT = KVM_USER_MEM_SLOTS + 1
TSS_PRIVATE_MEMSLOT = KVM_USER_MEM_SLOTS + 2
#: dirty bitmaps are indexed with an unsigned int
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63
#: bit 31 of disallow_lpage: attributes are not uniform over the huge frame
KVM_LPAGE_MIXED_FLAG = 1 << 31
#: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
_U64 = (1 << 64) - 1


class KvmMrChange(enum.Enum):
    """``enum kvm_mr_change``."""
    KVM_MR_CREATE = "create"
    KVM_MR_DELETE = "delete"
    KVM_MR_MOVE = "move"
    KVM_MR_FLAGS_ONLY = "flags_only"


# KVM_PAGES_PER_HPAGE, gfn_to_index and kvm_mmu_slot_lpages live in kvmmmu._core.defs.


# ==================================================================================
# Exceptions: one per failure, each with the kernel's errno
# ==================================================================================

class KvmMemslotError(ValueError):
    """A memslot ioctl failed; ``errno`` is what the kernel returns."""
    errno = E.EINVAL

    def __init__(self, msg):
        super().__init__(msg)


class MemslotFlagsError(KvmMemslotError):
    """Flags not valid for this VM or ioctl (``check_memory_region_flags``, the
    V1 ioctl's ``KVM_SET_USER_MEMORY_REGION_V1_FLAGS``)."""


class MemslotAlignmentError(KvmMemslotError):
    """memory_size, guest_phys_addr or userspace_addr not page aligned (or a
    size that does not fit ``unsigned long``)."""


class MemslotUserspaceAddressError(KvmMemslotError):
    """``access_ok(userspace_addr, memory_size)`` fails: the range leaves user space."""


class MemslotGuestMemfdOffsetError(KvmMemslotError):
    """guest_memfd_offset unaligned, or offset + size wraps."""


class MemslotIdError(KvmMemslotError):
    """as_id (``slot >> 16``) or slot id (``slot & 0xffff``) out of range."""


class MemslotWrapError(KvmMemslotError):
    """guest_phys_addr + memory_size wraps past 2**64."""


class MemslotTooLargeError(KvmMemslotError):
    """More than KVM_MEM_MAX_NR_PAGES pages in a user memslot."""


class MemslotNotFoundError(KvmMemslotError):
    """Deleting (memory_size 0) a slot that does not exist."""


class MemslotTotalPagesError(KvmMemslotError):
    """The total page count of all memslots would overflow ``unsigned long``."""


class MemslotImmutableError(KvmMemslotError):
    """An existing slot cannot change userspace_addr, size or READONLY, and a
    guest_memfd slot cannot change at all (only be deleted)."""


class MemslotOverlapError(KvmMemslotError):
    """The new gfn range overlaps another slot of the address space (-EEXIST)."""
    errno = E.EEXIST


class MemslotGfnLimitError(KvmMemslotError):
    """The last gfn is above ``kvm_mmu_max_gfn()`` or has the TDX shared bit
    (``kvm_arch_prepare_memory_region``)."""


class MemslotMoveTrackedError(KvmMemslotError):
    """MOVE while an external page tracker (KVMGT) is attached."""


class GuestMemfdError(KvmMemslotError):
    """A guest_memfd call failed."""


class GuestMemfdBadFdError(GuestMemfdError):
    """``guest_memfd`` is not an open file descriptor (-EBADF)."""
    errno = E.EBADF


class GuestMemfdBindError(GuestMemfdError):
    """``kvm_gmem_bind`` refused: not a guest_memfd of this VM, range outside
    the file, or overlapping another binding."""


class MemslotUpdateWouldBlockError(RuntimeError):
    """A memslot update while an MMU-notifier invalidation is open: the kernel
    waits in ``kvm_swap_active_memslots`` until ``mn_active_invalidate_count``
    is 0.  The model waits too (``vm.memslot_wait_timeout`` seconds) when
    other threads opened the invalidations; it refuses before changing
    anything when the calling thread opened one (it would wait for itself)
    or the wait times out."""


class DirtyLogError(KvmMemslotError):
    """``KVM_GET_DIRTY_LOG`` / ``KVM_CLEAR_DIRTY_LOG`` failed (errno set per case)."""

    def __init__(self, msg, errno_=E.EINVAL):
        super().__init__(msg)
        self.errno = errno_


# ==================================================================================
# Objects
# ==================================================================================

@dataclass
class UserspaceMemoryRegion:
    """``struct kvm_userspace_memory_region2`` (the V1 struct is its prefix).

    ``slot`` packs ``as_id << 16 | id``.  ``guest_memfd`` is a file
    descriptor number from :meth:`kvmmmu.vm.VM.create_guest_memfd` (or the
    :class:`GuestMemfd` itself).
    """
    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: object = 0


class GuestMemfd:
    """A guest_memfd file (``KVM_CREATE_GUEST_MEMFD``): private memory of one
    VM, bound to memslots by page offset.  Pages are allocated from the host's
    physical memory on first use (``kvm_gmem_get_pfn``), 4 KiB folios only.

    Invariants: bindings do not overlap; each binding lies inside the file.
    """

    def __init__(self, vm, size: int, flags: int, fd: int):
        self.vm, self.size, self.flags, self.fd = vm, size, flags, fd
        self.bindings: list[tuple[int, int, object]] = []      # (pgoff start, end, slot)
        self.pfn = np.zeros(size >> PAGE_SHIFT, dtype=np.uint64)
        # the page cache's lock: two vCPU threads faulting one gfn get one page
        self._alloc_lock = threading.Lock()

    def __repr__(self):
        return f"GuestMemfd(fd={self.fd}, size={self.size:#x}, {len(self.bindings)} bindings)"

    def overlaps(self, start, end) -> bool:
        return any(a < end and start < b for a, b, _ in self.bindings)

    def bind(self, slot, offset: int) -> None:
        """``kvm_gmem_bind``: ``-EINVAL`` if out of the file or overlapping."""
        if offset < 0 or offset % PAGE_SIZE or offset + (slot.npages << PAGE_SHIFT) > self.size:
            raise GuestMemfdBindError(f"guest_memfd range {offset:#x}+{slot.npages << PAGE_SHIFT:#x} "
                                      f"is outside the file (size {self.size:#x})")
        start = offset >> PAGE_SHIFT
        end = start + slot.npages
        if self.overlaps(start, end):
            raise GuestMemfdBindError(f"guest_memfd pages [{start:#x}, {end:#x}) already bound")
        self.bindings.append((start, end, slot))

    def unbind(self, slot) -> None:
        self.bindings = [b for b in self.bindings if b[2] is not slot]

    def get_pfn(self, slot, gfn: int) -> int:
        """``kvm_gmem_get_pfn``: the page backing ``gfn`` (allocated on demand)."""
        i = slot.gmem_pgoff + (gfn - slot.base_gfn)
        pfn = int(self.pfn[i])
        if not pfn:
            with self._alloc_lock:
                pfn = int(self.pfn[i])
                if not pfn:
                    pfn = int(self.vm.host.phys.alloc_kernel_pages(1)[0])
                    self.pfn[i] = pfn
        return pfn

    def invalidate(self, start: int, end: int) -> bool:
        """``kvm_gmem_invalidate_begin/end`` for file pages ``[start, end)``:
        every binding's gfns there lose their private mappings (the
        ``KVM_FILTER_PRIVATE`` unmap; for a TD that is the S-EPT removal),
        inside an MMU invalidation, under ``mmu_lock`` for write.  Returns
        whether a TLB flush was done."""
        from kvmmmu.notifiers import KVM_FILTER_PRIVATE, KvmGfnRange
        vm = self.vm
        ranges = []
        for a, b, slot in self.bindings:
            lo, hi = max(a, start), min(b, end)
            if lo < hi:
                g = slot.base_gfn + (lo - a)
                ranges.append(KvmGfnRange(slot=slot, start=g, end=g + (hi - lo),
                                          attr_filter=KVM_FILTER_PRIVATE, may_block=True))
        if not ranges:
            return False
        n = vm.notifier
        flush = False
        with vm.mmu_lock.write():
            n.kvm_mmu_invalidate_begin()
            try:
                for r in ranges:
                    n.kvm_mmu_invalidate_range_add(r.start, r.end)
                    flush |= bool(vm.kvm_unmap_gfn_range(r))
                if flush:
                    vm.kvm_flush_remote_tlbs()
            finally:
                n.kvm_mmu_invalidate_end()
        return flush

    def punch_hole(self, offset: int, size: int) -> int:
        """``fallocate(FALLOC_FL_PUNCH_HOLE)`` on the file (``kvm_gmem_punch_hole``):
        the private mappings of the range go first (:meth:`invalidate`), then
        its pages go back to the host.  Returns the pages freed."""
        offset = int_arg("offset", offset, 0, self.size)
        size = int_arg("size", size, 0, self.size - offset)
        if (offset | size) & (PAGE_SIZE - 1):
            raise GuestMemfdError(f"punch_hole: offset {offset:#x} and size {size:#x} must be "
                                  "page aligned")
        start, end = offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT
        self.invalidate(start, end)
        with self._alloc_lock:
            held = self.pfn[start:end]
            pfns = held[held != 0].copy()
            held[:] = 0
        if pfns.size:
            self.vm.host.phys.free_kernel_pages(pfns)
        return int(pfns.size)

    def get_pfn_array(self, slot, gfns) -> np.ndarray:
        """:meth:`get_pfn` for an array of gfns of `slot` (uint64, checked to
        lie in the slot): the missing pages are allocated in one call."""
        gfns = check_array("gfns", gfns)
        if gfns.size and (int(gfns.min()) < slot.base_gfn or
                          int(gfns.max()) >= slot.base_gfn + slot.npages):
            raise ValueError("get_pfn_array: every gfn must lie in the slot")
        idx = (gfns - np.uint64(slot.base_gfn) + np.uint64(slot.gmem_pgoff)).astype(np.int64)
        with self._alloc_lock:
            missing = np.unique(idx[self.pfn[idx] == 0])
            if missing.size:
                self.pfn[missing] = self.vm.host.phys.alloc_kernel_pages(missing.size)
            return self.pfn[idx]


class KvmArchMemorySlot:
    """``struct kvm_arch_memory_slot``: rmaps, lpage_info, write-track counts.

    Shared (not copied) between the old and new slot of a FLAGS_ONLY change,
    as the kernel's ``memcpy`` of the struct shares its pointers.
    """

    def __init__(self):
        self.rmap: RmapSlot | None = None
        #: ``lpage_info[level - 2]``: uint32 ``disallow_lpage`` per huge frame
        self.lpage_info: list[np.ndarray] = []
        #: ``gfn_write_track``: uint16 per gfn, or None (not allocated)
        self.gfn_write_track: np.ndarray | None = None
        #: The model's ledger of ``kvm_mmu_gfn_{dis,}allow_lpage`` calls
        #: (gfn -> net count), so the audit can tell the runtime counts in
        #: ``lpage_info`` from a corrupted counter.
        self.disallow_lpage_ledger: dict[int, int] = {}

    @property
    def nbytes(self) -> int:
        n = sum(a.nbytes for a in self.lpage_info)
        if self.rmap is not None:
            n += self.rmap.nbytes
        if self.gfn_write_track is not None:
            n += self.gfn_write_track.nbytes
        return n


class KvmMemorySlot:
    """``struct kvm_memory_slot``.

    Attributes
    ----------
    id, as_id : int
    base_gfn, npages : int
    flags : int
        ``KVM_MEM_*`` (plus ``KVM_MEMSLOT_INVALID`` while being deleted/moved).
    userspace_addr : int
        hva of ``base_gfn``.
    arch : KvmArchMemorySlot
    dirty_bitmap : ndarray of uint64, or None
    gmem : GuestMemfd or None
    gmem_pgoff : int
        First guest_memfd page of the binding.
    """

    def __init__(self, *, id, as_id, base_gfn, npages, flags, userspace_addr,
                 arch=None, dirty_bitmap=None, gmem=None, gmem_pgoff=0):
        self.id, self.as_id = id, as_id
        self.base_gfn, self.npages, self.flags = base_gfn, npages, flags
        self.userspace_addr = userspace_addr
        self.arch = arch if arch is not None else KvmArchMemorySlot()
        self.dirty_bitmap = dirty_bitmap
        self.gmem, self.gmem_pgoff = gmem, gmem_pgoff

    def __repr__(self):
        fl = "|".join(n for b, n in ((KVM_MEM_LOG_DIRTY_PAGES, "LOG_DIRTY"), (KVM_MEM_READONLY, "RO"),
                                     (KVM_MEM_GUEST_MEMFD, "GMEM"), (KVM_MEMSLOT_INVALID, "INVALID"))
                      if self.flags & b) or "0"
        return (f"KvmMemorySlot({self.as_id}:{self.id} gfn [{self.base_gfn:#x}, "
                f"{self.base_gfn + self.npages:#x}) hva {self.userspace_addr:#x} {fl})")

    def copy(self) -> "KvmMemorySlot":
        """``kvm_copy_memslot``: a new struct sharing bitmap and arch data."""
        return KvmMemorySlot(id=self.id, as_id=self.as_id, base_gfn=self.base_gfn,
                             npages=self.npages, flags=self.flags,
                             userspace_addr=self.userspace_addr, arch=self.arch,
                             dirty_bitmap=self.dirty_bitmap, gmem=self.gmem,
                             gmem_pgoff=self.gmem_pgoff)

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def rmap(self):
        return self.arch.rmap

    @property
    def lpage_info(self):
        return self.arch.lpage_info

    def contains(self, gfn) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> int:
        """``__gfn_to_hva_memslot``."""
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)

    def gfn_to_hva_array(self, gfns) -> np.ndarray:
        """Batch ``__gfn_to_hva_memslot``: ``gfns`` a 1-d uint64 array of gfns
        inside the slot (ValueError naming the first one outside)."""
        g = check_array("gfns", gfns)
        if g.size and ((g < np.uint64(self.base_gfn)).any()
                       or (g - np.uint64(self.base_gfn) >= np.uint64(self.npages)).any()):
            raise ValueError(f"gfns: not every gfn is inside the slot "
                             f"[{self.base_gfn:#x}, {self.base_gfn + self.npages:#x})")
        return np.uint64(self.userspace_addr) + ((g - np.uint64(self.base_gfn)) << np.uint64(PAGE_SHIFT))

    def hva_to_gfn(self, hva: int) -> int:
        return self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT)

    def kvm_slot_dirty_track_enabled(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    def kvm_slot_has_gmem(self) -> bool:
        return bool(self.flags & KVM_MEM_GUEST_MEMFD)

    def dirty_gfns(self) -> np.ndarray:
        """The gfns whose dirty bit is set (uint64)."""
        if self.dirty_bitmap is None:
            return np.empty(0, dtype=np.uint64)
        bits = np.unpackbits(self.dirty_bitmap.view(np.uint8), bitorder="little")[:self.npages]
        return np.flatnonzero(bits).astype(np.uint64) + np.uint64(self.base_gfn)

    def snapshot(self):
        """Everything a failed ioctl must leave unchanged (for tests)."""
        a = self.arch
        return (self.id, self.as_id, self.base_gfn, self.npages, self.flags, self.userspace_addr,
                None if self.dirty_bitmap is None else self.dirty_bitmap.tobytes(),
                tuple(x.tobytes() for x in a.lpage_info),
                None if a.rmap is None else (a.rmap.base_gfn, a.rmap.npages, a.rmap.lpages),
                None if a.gfn_write_track is None else a.gfn_write_track.tobytes(),
                None if self.gmem is None else (self.gmem.fd, self.gmem_pgoff))


class KvmMemslots:
    """One address space's memslots (``struct kvm_memslots``).

    Lookups by gfn use sorted base/end arrays (``search_memslots``); the
    batch :meth:`gfn_to_memslot_array` resolves many gfns with one
    ``searchsorted``.
    """

    def __init__(self, as_id: int):
        self.as_id = as_id
        #: starts at as_id; += nr_as per publish (kvm_swap_active_memslots)
        self.generation = as_id
        self._by_id: dict[int, KvmMemorySlot] = {}
        self._sorted: list[KvmMemorySlot] = []
        self._bases = np.empty(0, dtype=np.uint64)
        self._ends = np.empty(0, dtype=np.uint64)
        self.last_used_slot: KvmMemorySlot | None = None

    def __repr__(self):
        return f"KvmMemslots(as_id={self.as_id}, gen={self.generation}, {len(self)} slots)"

    def __len__(self):
        return len(self._by_id)

    def __iter__(self) -> Iterator[KvmMemorySlot]:
        return iter(list(self._sorted))

    def _rebuild(self):
        self._sorted = sorted(self._by_id.values(), key=lambda s: s.base_gfn)
        self._bases = np.array([s.base_gfn for s in self._sorted], dtype=np.uint64)
        self._ends = np.array([s.base_gfn + s.npages for s in self._sorted], dtype=np.uint64)

    def _replace(self, old, new):
        """``kvm_replace_memslot``: remove old and/or add new (by id)."""
        if old is not None:
            del self._by_id[old.id]
            if self.last_used_slot is old:
                self.last_used_slot = new
        if new is not None:
            self._by_id[new.id] = new
        self._rebuild()

    def id_to_memslot(self, id: int) -> KvmMemorySlot | None:
        return self._by_id.get(id)

    def search_memslots(self, gfn: int) -> KvmMemorySlot | None:
        sl = self._sorted
        if len(sl) <= 8 and type(gfn) is int and 0 <= gfn <= 0xFFFFFFFFFFFFFFFF:
            # a few slots: a scan costs less than one numpy search
            for s in sl:
                if s.base_gfn <= gfn < s.base_gfn + s.npages:
                    return s
            return None
        i = int(np.searchsorted(self._bases, np.uint64(gfn), side="right")) - 1
        if i >= 0 and gfn < int(self._ends[i]):
            return self._sorted[i]
        return None

    def gfn_to_memslot(self, gfn: int) -> KvmMemorySlot | None:
        """``__gfn_to_memslot``: try ``last_used_slot``, then search (and remember)."""
        s = self.last_used_slot
        if s is not None and s.base_gfn <= gfn < s.base_gfn + s.npages:
            return s
        s = self.search_memslots(gfn)
        if s is not None:
            self.last_used_slot = s
        return s

    def gfn_to_memslot_array(self, gfns) -> np.ndarray:
        """Batch: slot id of each gfn (int32), -1 where no slot.  ``gfns`` is a
        1-d uint64 array (checked by ``_checks.check_array``, never converted)."""
        g = check_array("gfns", gfns)
        i = np.searchsorted(self._bases, g, side="right").astype(np.int64) - 1
        out = np.full(g.shape, -1, dtype=np.int32)
        if not self._sorted:
            return out
        ok = i >= 0
        ic = np.where(ok, i, 0)
        inside = ok & (g < self._ends[ic])
        ids = np.array([s.id for s in self._sorted], dtype=np.int32)
        out[inside] = ids[ic[inside]]
        return out

    def slots_in_gfn_range(self, start: int, end: int) -> list[KvmMemorySlot]:
        """Slots intersecting ``[start, end)`` (``kvm_for_each_memslot_in_gfn_range``)."""
        lo = int(np.searchsorted(self._ends, np.uint64(start), side="right"))
        hi = int(np.searchsorted(self._bases, np.uint64(end), side="left"))
        return self._sorted[lo:hi]

    def slots_in_hva_range(self, start: int, end: int) -> list[KvmMemorySlot]:
        """Slots whose hva range intersects ``[start, end)`` (the hva interval tree)."""
        return [s for s in self._sorted
                if s.userspace_addr < end and start < s.userspace_addr + (s.npages << PAGE_SHIFT)]

    def check_overlap(self, id: int, start: int, end: int) -> bool:
        """``kvm_check_memslot_overlap``: another slot intersects ``[start, end)``."""
        return any(s.id != id for s in self.slots_in_gfn_range(start, end))


# ==================================================================================
# KVM_SET_USER_MEMORY_REGION(2)
# ==================================================================================

def kvm_mmu_max_gfn(vm) -> int:
    """Largest gfn a memslot may reach: host MAXPHYADDR with TDP, 52 bits without."""
    bits = vm.host_config.maxphyaddr if vm.tdp_enabled else 52
    return (1 << (bits - PAGE_SHIFT)) - 1


def _check_memory_region_flags(vm, flags):
    valid = KVM_MEM_LOG_DIRTY_PAGES
    if vm.kvm_arch_supports_gmem:
        valid |= KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES        # no dirty logging of private memory
    if vm.kvm_arch_has_readonly_mem and not (flags & KVM_MEM_GUEST_MEMFD):
        valid |= KVM_MEM_READONLY
    if flags & ~valid:
        raise MemslotFlagsError(f"flags {flags:#x} not valid here (valid {valid:#x})")


def kvm_set_memory_region(vm, mem: UserspaceMemoryRegion, *, v1: bool = False,
                          internal: bool = False) -> KvmMrChange | None:
    """``KVM_SET_USER_MEMORY_REGION`` (``v1=True``) / ``..._REGION2``.

    Returns the change made, or None when the region equals the existing slot.
    Raises a :class:`KvmMemslotError` subclass (with ``errno``) and leaves
    the VM unchanged on failure (see the module doc for the kernel's own
    exception), :class:`MemslotUpdateWouldBlockError` while an invalidation
    is open, :class:`~kvmmmu.errors.KvmNoMemoryError` if metadata allocation
    fails.  ``internal`` is ``kvm_set_internal_memslot`` (x86's private
    APIC/TSS/identity slots).
    """
    # Every field is a u32/u64 of the UAPI struct: real integers in range,
    # checked before anything changes (a float is a TypeError, not truncated).
    mem = UserspaceMemoryRegion(
        int_arg("slot", mem.slot, 0, 0xFFFFFFFF), int_arg("flags", mem.flags, 0, 0xFFFFFFFF),
        int_arg("guest_phys_addr", mem.guest_phys_addr), int_arg("memory_size", mem.memory_size),
        int_arg("userspace_addr", mem.userspace_addr),
        int_arg("guest_memfd_offset", mem.guest_memfd_offset),
        mem.guest_memfd if isinstance(mem.guest_memfd, GuestMemfd)
        else int_arg("guest_memfd", mem.guest_memfd, 0, 0xFFFFFFFF))
    flags = mem.flags
    if v1 and flags & ~KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
        raise MemslotFlagsError(f"KVM_SET_USER_MEMORY_REGION takes only LOG_DIRTY_PAGES|READONLY, "
                                f"not {flags:#x}")
    if not internal and (mem.slot & 0xFFFF) >= KVM_USER_MEM_SLOTS:
        raise MemslotIdError(f"slot id {mem.slot & 0xFFFF} >= KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
    _check_memory_region_flags(vm, flags)
    as_id, id = mem.slot >> 16, mem.slot & 0xFFFF
    size, gpa, hva = mem.memory_size, mem.guest_phys_addr, mem.userspace_addr
    ulong = (1 << vm.host_config.ulong_bits) - 1
    if size & (PAGE_SIZE - 1) or size > ulong:
        raise MemslotAlignmentError(f"memory_size {size:#x} is not page aligned "
                                    f"or does not fit unsigned long")
    if gpa & (PAGE_SIZE - 1):
        raise MemslotAlignmentError(f"guest_phys_addr {gpa:#x} is not page aligned")
    if hva & (PAGE_SIZE - 1):
        raise MemslotAlignmentError(f"userspace_addr {hva:#x} is not page aligned")
    if hva + size > vm.host_config.task_size_max:
        raise MemslotUserspaceAddressError(
            f"[{hva:#x}, {hva + size:#x}) is not inside user space "
            f"(TASK_SIZE_MAX {vm.host_config.task_size_max:#x})")
    if flags & KVM_MEM_GUEST_MEMFD and (mem.guest_memfd_offset & (PAGE_SIZE - 1)
                                        or mem.guest_memfd_offset + size > _U64):
        raise MemslotGuestMemfdOffsetError(f"guest_memfd_offset {mem.guest_memfd_offset:#x} "
                                           f"is unaligned or wraps")
    if as_id >= vm.nr_memslot_as_ids or id >= KVM_MEM_SLOTS_NUM:
        raise MemslotIdError(f"as_id {as_id} (of {vm.nr_memslot_as_ids}) or id {id} out of range")
    if gpa + size > _U64:
        raise MemslotWrapError(f"guest_phys_addr {gpa:#x} + memory_size {size:#x} wraps")
    if id < KVM_USER_MEM_SLOTS and (size >> PAGE_SHIFT) > KVM_MEM_MAX_NR_PAGES:
        raise MemslotTooLargeError(f"{size >> PAGE_SHIFT:#x} pages > KVM_MEM_MAX_NR_PAGES")

    slots = vm.memslots[as_id]
    old = slots.id_to_memslot(id)
    if not size:
        if old is None or not old.npages:
            raise MemslotNotFoundError(f"no slot {as_id}:{id} to delete")
        _kvm_set_memslot(vm, old, None, KvmMrChange.KVM_MR_DELETE)
        return KvmMrChange.KVM_MR_DELETE

    base_gfn, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
    if old is None:
        change = KvmMrChange.KVM_MR_CREATE
        if vm.nr_memslot_pages + npages > ulong:
            raise MemslotTotalPagesError("total memslot pages would overflow unsigned long")
    else:
        if flags & KVM_MEM_GUEST_MEMFD:
            raise MemslotImmutableError("guest_memfd memslots can only be deleted")
        if hva != old.userspace_addr or npages != old.npages or \
                (flags ^ old.flags) & KVM_MEM_READONLY:
            raise MemslotImmutableError("an existing slot cannot change userspace_addr, "
                                        "memory_size or READONLY")
        if base_gfn != old.base_gfn:
            change = KvmMrChange.KVM_MR_MOVE
        elif flags != old.flags:
            change = KvmMrChange.KVM_MR_FLAGS_ONLY
        else:
            return None
    if change in (KvmMrChange.KVM_MR_CREATE, KvmMrChange.KVM_MR_MOVE) and \
            slots.check_overlap(id, base_gfn, base_gfn + npages):
        raise MemslotOverlapError(f"gfn [{base_gfn:#x}, {base_gfn + npages:#x}) overlaps another slot")

    new = KvmMemorySlot(id=id, as_id=as_id, base_gfn=base_gfn, npages=npages, flags=flags,
                        userspace_addr=hva)
    gmem = None
    if flags & KVM_MEM_GUEST_MEMFD:
        gmem = vm.kvm_gmem_get_file(mem.guest_memfd)      # may raise EBADF / EINVAL
        gmem.bind(new, mem.guest_memfd_offset)
        new.gmem, new.gmem_pgoff = gmem, mem.guest_memfd_offset >> PAGE_SHIFT
    try:
        _kvm_set_memslot(vm, old, new, change)
    except BaseException:
        if gmem is not None:
            gmem.unbind(new)
        raise
    return change


def _kvm_set_memslot(vm, old, new, change):
    """``kvm_set_memslot``."""
    if vm.notifier.mn_active_invalidate_count and \
            not vm.notifier.wait_for_no_invalidation(vm.memslot_wait_timeout):
        raise MemslotUpdateWouldBlockError(
            f"{vm.notifier.mn_active_invalidate_count} MMU-notifier invalidation(s) open")
    as_id = (old or new).as_id
    slots = vm.memslots[as_id]
    invalid = None
    vm.slots_lock_held = True
    try:
        if change in (KvmMrChange.KVM_MR_DELETE, KvmMrChange.KVM_MR_MOVE):
            invalid = old.copy()
            invalid.flags |= KVM_MEMSLOT_INVALID
            slots._replace(old, invalid)
            vm.kvm_swap_active_memslots(as_id)
        try:
            if invalid is not None:
                vm.kvm_arch_flush_shadow_memslot(old)     # an MMU may raise: undo below
            _kvm_prepare_memory_region(vm, old, new, change)
        except BaseException:
            if invalid is not None:
                slots._replace(invalid, old)
                vm.kvm_swap_active_memslots(as_id)
            raise
        if change is KvmMrChange.KVM_MR_CREATE:
            slots._replace(None, new)
        elif change is KvmMrChange.KVM_MR_DELETE:
            slots._replace(invalid, None)
        elif change is KvmMrChange.KVM_MR_MOVE:
            slots._replace(invalid, new)
        else:
            slots._replace(old, new)
        vm.kvm_swap_active_memslots(as_id)
        _kvm_commit_memory_region(vm, old, new, change)
    finally:
        vm.slots_lock_held = False


def _kvm_prepare_memory_region(vm, old, new, change):
    allocated = False
    if change is not KvmMrChange.KVM_MR_DELETE:
        if not new.flags & KVM_MEM_LOG_DIRTY_PAGES:
            new.dirty_bitmap = None
        elif old is not None and old.dirty_bitmap is not None:
            new.dirty_bitmap = old.dirty_bitmap
        elif vm.kvm_use_dirty_bitmap:
            new.dirty_bitmap = np.zeros((new.npages + 63) // 64, dtype=np.uint64)
            allocated = True
            if vm.kvm_dirty_log_manual_protect_and_init_set:
                _bitmap_set(new.dirty_bitmap, 0, new.npages)
    try:
        _kvm_arch_prepare_memory_region(vm, old, new, change)
    except BaseException:
        if allocated:
            new.dirty_bitmap = None
        raise


def _kvm_arch_prepare_memory_region(vm, old, new, change):
    if change is KvmMrChange.KVM_MR_MOVE and vm.page_track_external_users:
        raise MemslotMoveTrackedError("cannot move memslots while an external page tracker is attached")
    if change in (KvmMrChange.KVM_MR_CREATE, KvmMrChange.KVM_MR_MOVE):
        last = new.base_gfn + new.npages - 1
        if last > kvm_mmu_max_gfn(vm):
            raise MemslotGfnLimitError(f"last gfn {last:#x} > kvm_mmu_max_gfn() {kvm_mmu_max_gfn(vm):#x}")
        if vm.gfn_direct_bits and last & vm.gfn_direct_bits:
            raise MemslotGfnLimitError(f"last gfn {last:#x} has the shared (alias) bit")
        new.arch = _kvm_alloc_memslot_metadata(vm, new)
    elif change is KvmMrChange.KVM_MR_FLAGS_ONLY:
        new.arch = old.arch


def _kvm_alloc_memslot_metadata(vm, slot):
    if vm.fail_next_metadata_alloc:
        vm.fail_next_metadata_alloc = False
        raise KvmNoMemoryError("memslot metadata allocation failed (injected)")
    arch = KvmArchMemorySlot()
    if vm.kvm_memslots_have_rmaps:
        arch.rmap = RmapSlot(slot.base_gfn, slot.npages, vm.rmap_pool)
    arch.lpage_info = lpage_baseline(slot.base_gfn, slot.npages, slot.userspace_addr)
    slot.arch = arch
    if vm.has_private_mem:
        vm.kvm_mmu_init_memslot_memory_attributes(slot)
    if vm.kvm_page_track_write_tracking_enabled:
        arch.gfn_write_track = np.zeros(slot.npages, dtype=np.uint16)
    return arch


def lpage_baseline(base_gfn: int, npages: int, userspace_addr: int) -> list[np.ndarray]:
    """The ``lpage_info`` arrays a new slot starts with (``kvm_alloc_memslot_metadata``).

    For each huge level: the first frame is disallowed (1) if ``base_gfn`` is
    not aligned to it, the last if ``base_gfn + npages`` is not, and every
    frame if gfn and hva are not congruent modulo the huge size.  These are
    assignments, not increments: a slot inside one frame misaligned at both
    ends gets 1, not 2.
    """
    out = []
    ugfn = userspace_addr >> PAGE_SHIFT
    for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
        p = KVM_PAGES_PER_HPAGE(level)
        linfo = np.zeros(kvm_mmu_slot_lpages(base_gfn, npages, level), dtype=np.uint32)
        if base_gfn & (p - 1):
            linfo[0] = 1
        if (base_gfn + npages) & (p - 1):
            linfo[-1] = 1
        if (base_gfn ^ ugfn) & (p - 1):
            linfo[:] = 1
        out.append(linfo)
    return out


def _kvm_commit_memory_region(vm, old, new, change):
    old_flags = old.flags if old is not None else 0
    new_flags = new.flags if new is not None else 0
    if change is KvmMrChange.KVM_MR_DELETE:
        vm.nr_memslot_pages -= old.npages
    elif change is KvmMrChange.KVM_MR_CREATE:
        vm.nr_memslot_pages += new.npages
    if (old_flags ^ new_flags) & KVM_MEM_LOG_DIRTY_PAGES:
        vm.nr_memslots_dirty_logging += 1 if new_flags & KVM_MEM_LOG_DIRTY_PAGES else -1
    # kvm_arch_commit_memory_region
    if change is KvmMrChange.KVM_MR_DELETE:
        for t in vm.page_track_external_users:
            t.track_remove_region(old.base_gfn, old.npages)
    # The memslots are published: past the point of no return (the kernel's
    # commit cannot fail).  If an MMU hook raises, the VM's own bookkeeping
    # below still completes, so the VM is as if the update succeeded, and
    # the MMU's exception propagates.
    try:
        if not vm.n_requested_mmu_pages and change in (KvmMrChange.KVM_MR_CREATE,
                                                       KvmMrChange.KVM_MR_DELETE):
            vm.kvm_mmu_change_mmu_pages(max(vm.nr_memslot_pages // 50, 64))
        vm.kvm_mmu_slot_apply_flags(old, new, change)
    finally:
        _kvm_free_old_memslot(old, new, change)


def _kvm_free_old_memslot(old, new, change):
    if change is KvmMrChange.KVM_MR_MOVE:
        old.arch = KvmArchMemorySlot()                   # kvm_arch_free_memslot(old)
    if change is KvmMrChange.KVM_MR_DELETE:
        if old.gmem is not None:
            old.gmem.unbind(old)
        old.dirty_bitmap = None
        old.arch = KvmArchMemorySlot()
    elif change in (KvmMrChange.KVM_MR_MOVE, KvmMrChange.KVM_MR_FLAGS_ONLY):
        if old.dirty_bitmap is not None and new.dirty_bitmap is None:
            old.dirty_bitmap = None


# ==================================================================================
# Dirty logging
# ==================================================================================

def _bitmap_set(bm, start, n):
    bits = np.unpackbits(bm.view(np.uint8), bitorder="little")
    bits[start:start + n] = 1
    bm[:] = np.packbits(bits, bitorder="little").view(np.uint64)


def mark_page_dirty_in_slot(vm, slot: KvmMemorySlot | None, gfn) -> None:
    """Set the dirty bit of ``gfn`` (an int or an array of gfns) if the slot logs."""
    if isinstance(gfn, np.ndarray):
        g = check_array("gfn", gfn)
    else:
        g = np.array([int_arg("gfn", gfn)], dtype=np.uint64)
    if slot is None or not slot.kvm_slot_dirty_track_enabled() or slot.dirty_bitmap is None:
        return
    # below the slot wraps to a huge offset in uint64, so one compare refuses both sides
    rel = g - np.uint64(slot.base_gfn)
    if (rel >= np.uint64(slot.npages)).any():
        raise ValueError(f"gfn: outside the slot [{slot.base_gfn:#x}, "
                         f"{slot.base_gfn + slot.npages:#x})")
    words = (rel >> np.uint64(6)).astype(np.int64)
    bits = np.left_shift(np.uint64(1), rel & np.uint64(63))
    np.bitwise_or.at(slot.dirty_bitmap, words, bits)


def _log_slot(vm, slot_arg):
    slot_arg = int_arg("slot", slot_arg, 0, 0xFFFFFFFF)
    as_id, id = slot_arg >> 16, slot_arg & 0xFFFF
    if not vm.kvm_use_dirty_bitmap:
        raise DirtyLogError("dirty ring in use", E.ENXIO)
    if as_id >= vm.nr_memslot_as_ids or id >= KVM_USER_MEM_SLOTS:
        raise DirtyLogError(f"slot {as_id}:{id} out of range")
    slot = vm.memslots[as_id].id_to_memslot(id)
    if slot is None or slot.dirty_bitmap is None:
        raise DirtyLogError(f"slot {as_id}:{id} has no dirty bitmap", E.ENOENT)
    return slot


def kvm_get_dirty_log_protect(vm, slot_arg: int) -> np.ndarray:
    """``KVM_GET_DIRTY_LOG``.  Returns the bitmap (a copy).  Without manual
    protection the bits are cleared as they are read, and for every non-zero
    64-bit word the MMUs re-protect those gfns
    (``kvm_arch_mmu_enable_log_dirty_pt_masked``), then one flush."""
    slot = _log_slot(vm, slot_arg)
    bm = slot.dirty_bitmap
    if vm.manual_dirty_log_protect:
        return bm.copy()
    out = bm.copy()
    nz = np.flatnonzero(out)
    if nz.size:
        with vm.mmu_lock.write():
            bm[nz] = 0
            try:
                for i in nz:
                    vm.kvm_arch_mmu_enable_log_dirty_pt_masked(slot, int(i) * 64, int(out[i]))
            except BaseException:
                # An MMU failed to re-protect: the bits go back (a dirty bit
                # set again is always safe; a lost one would lose the page).
                bm[nz] |= out[nz]
                vm.kvm_flush_remote_tlbs()
                raise
        vm.kvm_flush_remote_tlbs()
    return out


def kvm_clear_dirty_log_protect(vm, slot_arg: int, first_page: int, num_pages: int,
                                bitmap) -> None:
    """``KVM_CLEAR_DIRTY_LOG``: clear the bits set in ``bitmap`` (relative to
    ``first_page``) and have the MMUs re-protect exactly the bits that were set."""
    # struct kvm_clear_dirty_log: __u32 slot, __u32 num_pages, __u64 first_page.
    # Checked as integers first: a negative first_page must not index the
    # bitmap from its end (numpy's negative indices).
    first_page = int_arg("first_page", first_page)
    num_pages = int_arg("num_pages", num_pages, 0, 0xFFFFFFFF)
    slot = _log_slot(vm, slot_arg)
    if first_page & 63:
        raise DirtyLogError("first_page must be a multiple of 64")
    n = slot.npages
    if first_page > n or num_pages > n - first_page or \
            (num_pages < n - first_page and num_pages & 63):
        raise DirtyLogError("bad first_page/num_pages")
    user = check_array("bitmap", bitmap)
    nwords = (num_pages + 63) // 64
    if user.size < nwords:
        raise DirtyLogError("bitmap too short", E.EFAULT)
    user = user[:nwords].copy()          # read once: a concurrent writer cannot change it
    bm = slot.dirty_bitmap
    flush = False
    done = []
    with vm.mmu_lock.write():
        i0 = first_page // 64
        try:
            for k in range(nwords):
                mask = int(user[k])
                if not mask:
                    continue
                cleared = int(bm[i0 + k]) & mask
                bm[i0 + k] &= np.uint64(~mask & _U64)
                done.append((i0 + k, cleared))
                if cleared:
                    flush = True
                    vm.kvm_arch_mmu_enable_log_dirty_pt_masked(slot, (i0 + k) * 64, cleared)
        except BaseException:
            for i, cleared in done:                  # the bits go back (see get)
                bm[i] |= np.uint64(cleared)
            if flush:
                vm.kvm_flush_remote_tlbs()           # for what was write-protected already
            raise
    if flush:
        vm.kvm_flush_remote_tlbs()


# ==================================================================================
# Audit
# ==================================================================================

def _expected_mixed(vm, slot):
    """Recompute MIXED for every frame wholly inside the slot."""
    out = []
    for level in range(2, KVM_MAX_HUGEPAGE_LEVEL + 1):
        arr = slot.arch.lpage_info[level - 2]
        exp = np.zeros(arr.shape, dtype=bool)
        if vm.has_private_mem:
            p = KVM_PAGES_PER_HPAGE(level)
            start = -(-slot.base_gfn // p) * p
            end = ((slot.base_gfn + slot.npages) // p) * p
            if start < end:
                frames = np.arange(start, end, p, dtype=np.uint64)
                if level == 2:
                    uni, _ = vm.mem_attrs.uniform_frames(frames, p)
                else:
                    # with 2M flags taken from the expectation just computed
                    sub = np.arange(0, p, 512, dtype=np.uint64)
                    subs = (frames[:, None] + sub).ravel()
                    idx2 = (subs >> np.uint64(9)).astype(np.int64) - (slot.base_gfn >> 9)
                    m2 = out[0][idx2].reshape(len(frames), -1)
                    val = vm.mem_attrs.get_array(subs).reshape(len(frames), -1)
                    uni = ~m2.any(axis=1) & (val == val[:, :1]).all(axis=1)
                s = (level - 1) * 9
                idx = (frames >> np.uint64(s)).astype(np.int64) - (slot.base_gfn >> s)
                exp[idx] = ~uni
        out.append(exp)
    return out


def audit_memslots(vm) -> list[str]:
    """Check the module invariants for every address space of ``vm``."""
    bad = []
    total = 0
    logging = 0
    for as_id in range(vm.nr_memslot_as_ids):
        slots = vm.memslots[as_id]
        if slots.generation % vm.nr_memslot_as_ids != as_id:
            bad.append(f"as {as_id}: generation {slots.generation} not congruent to as_id")
        if slots.generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
            bad.append(f"as {as_id}: update-in-progress bit left set")
        prev = None
        for s in slots:
            tag = f"slot {as_id}:{s.id}"
            total += s.npages
            logging += bool(s.flags & KVM_MEM_LOG_DIRTY_PAGES)
            if s.id >= KVM_MEM_SLOTS_NUM or slots.id_to_memslot(s.id) is not s:
                bad.append(f"{tag}: bad id / id index")
            if s.as_id != as_id:
                bad.append(f"{tag}: as_id field {s.as_id}")
            if s.flags & KVM_MEMSLOT_INVALID:
                bad.append(f"{tag}: INVALID between calls")
            if s.npages <= 0:
                bad.append(f"{tag}: empty")
            if prev is not None and prev.base_gfn + prev.npages > s.base_gfn:
                bad.append(f"{tag}: overlaps slot {prev.id}")
            prev = s
            a = s.arch
            if vm.kvm_memslots_have_rmaps:
                if a.rmap is None:
                    bad.append(f"{tag}: no rmaps although rmaps are in use")
                elif (a.rmap.base_gfn, a.rmap.npages) != (s.base_gfn, s.npages) or a.rmap.lpages != tuple(
                        kvm_mmu_slot_lpages(s.base_gfn, s.npages, L) for L in (1, 2, 3)):
                    bad.append(f"{tag}: rmap geometry does not match the slot")
                else:
                    try:
                        rmap_audit(a.rmap, unique=False)
                    except AssertionError as e:
                        bad.append(f"{tag}: rmap audit: {e}")
            if len(a.lpage_info) != 2:
                bad.append(f"{tag}: lpage_info levels {len(a.lpage_info)}")
                continue
            base = lpage_baseline(s.base_gfn, s.npages, s.userspace_addr)
            mixed = _expected_mixed(vm, s)
            for k, level in enumerate((2, 3)):
                li = a.lpage_info[k]
                if li.shape != base[k].shape or li.dtype != np.uint32:
                    bad.append(f"{tag}: lpage_info[{level}] shape/dtype")
                    continue
                cnt = li & np.uint32(~KVM_LPAGE_MIXED_FLAG & 0xFFFFFFFF)
                if (cnt < base[k]).any():
                    i = int(np.flatnonzero(cnt < base[k])[0])
                    bad.append(f"{tag}: level {level} frame {i}: count {int(cnt[i])} below "
                               f"creation baseline {int(base[k][i])}")
                if (cnt >= np.uint32(1 << 30)).any():
                    bad.append(f"{tag}: level {level}: implausible disallow_lpage count")
                want = base[k].astype(np.int64)
                ledger = getattr(a, "disallow_lpage_ledger", {})
                if ledger:
                    g = np.fromiter(ledger.keys(), dtype=np.uint64, count=len(ledger))
                    n = np.fromiter(ledger.values(), dtype=np.int64, count=len(ledger))
                    idx = (g >> np.uint64((level - 1) * 9)).astype(np.int64) - \
                        (s.base_gfn >> ((level - 1) * 9))
                    if ((idx < 0) | (idx >= len(want))).any():
                        bad.append(f"{tag}: disallow_lpage ledger names a gfn outside the slot")
                    else:
                        np.add.at(want, idx, n)
                off = np.flatnonzero(cnt.astype(np.int64) != (want & 0x7FFFFFFF))
                if off.size:
                    i = int(off[0])
                    bad.append(f"{tag}: level {level} frame {i}: disallow_lpage count "
                               f"{int(cnt[i])} != creation baseline {int(base[k][i])} + "
                               f"{int(want[i] - base[k][i])} from kvm_mmu_gfn_disallow_lpage")
                got = (li & np.uint32(KVM_LPAGE_MIXED_FLAG)) != 0
                if not np.array_equal(got, mixed[k]):
                    i = int(np.flatnonzero(got != mixed[k])[0])
                    bad.append(f"{tag}: level {level} frame {i}: MIXED is {bool(got[i])}, "
                               f"attributes say {bool(mixed[k][i])}")
            if vm.kvm_page_track_write_tracking_enabled:
                if a.gfn_write_track is None or a.gfn_write_track.shape != (s.npages,):
                    bad.append(f"{tag}: gfn_write_track missing or mis-sized")
            want_bm = bool(s.flags & KVM_MEM_LOG_DIRTY_PAGES) and vm.kvm_use_dirty_bitmap
            bm = s.dirty_bitmap
            if want_bm != (bm is not None):
                bad.append(f"{tag}: dirty bitmap {'missing' if want_bm else 'present without logging'}")
            elif bm is not None:
                if bm.dtype != np.uint64 or bm.shape != ((s.npages + 63) // 64,):
                    bad.append(f"{tag}: dirty bitmap shape/dtype")
                elif s.npages % 64 and int(bm[-1]) >> (s.npages % 64):
                    bad.append(f"{tag}: dirty bits beyond npages")
            if s.flags & KVM_MEM_GUEST_MEMFD:
                if s.gmem is None or not any(sl is s for _, _, sl in s.gmem.bindings):
                    bad.append(f"{tag}: guest_memfd slot without its binding")
    if total != vm.nr_memslot_pages:
        bad.append(f"nr_memslot_pages {vm.nr_memslot_pages} != sum of npages {total}")
    if logging != vm.nr_memslots_dirty_logging:
        bad.append(f"nr_memslots_dirty_logging {vm.nr_memslots_dirty_logging} != {logging}")
    return bad


# The lpage_info / attribute / max-mapping-level code of mmu.c moved to
# kvmmmu.mmu (the MMU seam).  Their old names here keep working for callers
# that hold a VM (which has loaded kvmmmu.mmu); this module itself never
# imports kvmmmu.mmu, so the import graph keeps no cycle.
_MOVED_TO_MMU = frozenset((
    "lpage_info_slot", "kvm_mmu_gfn_disallow_lpage", "kvm_mmu_gfn_allow_lpage",
    "hugepage_has_attrs", "kvm_mmu_init_memslot_memory_attributes",
    "kvm_arch_pre_set_memory_attributes", "kvm_arch_post_set_memory_attributes",
    "kvm_mmu_max_mapping_level", "kvm_mmu_max_mapping_level_array",
))


def __getattr__(name):
    if name in _MOVED_TO_MMU:
        mmu = sys.modules.get("kvmmmu.mmu")
        if mmu is not None:
            return getattr(mmu, name)
        raise AttributeError(f"kvmmmu.memslots.{name} moved to kvmmmu.mmu.{name} "
                             f"(import kvmmmu.mmu or kvmmmu.vm first)")
    raise AttributeError(f"module 'kvmmmu.memslots' has no attribute {name!r}")
