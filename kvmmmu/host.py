"""The host side of a VM: the platform, physical memory and the process's
page tables (``mm_struct``), with the MMU-notifier events they raise.

KVM never owns guest memory.  A memslot points at a range of the VMM's
virtual address space (an *hva* range); KVM resolves ``gfn -> hva`` through
the memslot, then ``hva -> pfn`` through the host page tables, and learns from
the host how big the host mapping is (``host_pfn_mapping_level``).  When the
host changes a mapping (munmap, THP split or collapse, page migration,
swap-out, copy-on-write, memory failure) it calls the MMU notifiers first, and
KVM zaps its SPTEs for the range.  This module models that host:

* :class:`HostConfig`: the platform KVM runs on (64- or 32-bit host, host
  MAXPHYADDR, EPT / NPT / no TDP, EPT A/D bits, PML, 1 GiB pages, 5-level
  paging, and the kernel config options that change KVM's ABI:
  ``CONFIG_KVM_SMM``, ``CONFIG_KVM_GUEST_MEMFD``, ``CONFIG_KVM_SW_PROTECTED_VM``).
  :meth:`HostConfig.from_system` reads the machine this runs on.
* :class:`HostPhysMem`: host physical memory, handed out as pfns.  Huge pages
  are physically contiguous and naturally aligned blocks of 512 (2 MiB) or
  262144 (1 GiB) pfns.
* :class:`HostMm`: the process address space.  Each :class:`Vma` keeps its
  page table as numpy arrays indexed by 4 KiB page (pfn and a flag byte) plus
  one flag per 2 MiB / 1 GiB hva frame that says "mapped by a huge leaf"
  (PMD / PUD).  A 64 GiB mapping is three arrays, not 16M Python objects.
* Host events drive the registered :class:`MmuNotifier` subscribers (a
  :class:`kvmmmu.vm.VM` registers one at creation, as ``kvm_create_vm`` does
  with ``current->mm``): ``invalidate_range_start`` / ``_end`` around every
  change that removes or replaces a present PTE, ``clear_flush_young`` /
  ``clear_young`` / ``test_young`` for aging, ``release`` at exit.
* :func:`hva_to_pfn`: KVM's ``hva_to_pfn`` (kvm_main.c): the GUP fast path,
  then a fault through :meth:`HostMm.handle_mm_fault`; returns the pfn and
  whether KVM may map it writable, or one of the ``KVM_PFN_ERR_*`` values.

Invariants (checked by :meth:`HostMm.audit`):

* VMAs are page aligned, non-empty, sorted and do not overlap; hugetlb VMAs
  are aligned to their page size;
* a present PTE has a pfn != 0; a not-present PTE has pfn 0 and at most one of
  SWAP / MIGRATION / HWPOISON; the zero page is mapped only read-only and only
  in private anonymous VMAs;
* a 2 MiB (1 GiB) huge leaf covers a frame wholly inside its VMA, all of its
  512 (262144) PTEs are present with pfns ``base + i`` where ``base`` is
  aligned to 512 (262144), and its PTE flags are uniform;
* no pfn other than the zero page is mapped twice, every mapped pfn is
  allocated in :class:`HostPhysMem`, and no allocated pfn is lost.

What is simplified (documented, not hidden): file mappings, KSM, fork/COW
of non-zero pages and PROT_NONE are not modelled; a read fault in a THP or
shared VMA allocates a real page (no huge zero page); aging calls the
notifier once per call range (Linux calls it per mapped folio; the union of
the ranges and the OR of the answers are the same).
"""
from __future__ import annotations

import bisect
import enum
import mmap
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = [
    "PAGE_SHIFT", "PAGE_SIZE", "PMD_SHIFT", "PMD_SIZE", "PUD_SHIFT", "PUD_SIZE",
    "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G",
    "KVM_PFN_ERR_MASK", "KVM_PFN_ERR_NOSLOT_MASK", "KVM_PFN_NOSLOT", "KVM_PFN_ERR_FAULT",
    "KVM_PFN_ERR_HWPOISON", "KVM_PFN_ERR_RO_FAULT", "KVM_PFN_ERR_SIGPENDING",
    "KVM_PFN_ERR_NEEDS_IO", "is_error_pfn", "is_noslot_pfn", "is_error_noslot_pfn",
    "PTE_PRESENT", "PTE_WRITE", "PTE_YOUNG", "PTE_DIRTY", "PTE_SWAP", "PTE_ZERO",
    "PTE_MIGRATION", "PTE_HWPOISON",
    "HostConfig", "HostPhysMem", "HostOutOfMemoryError", "HostMmError", "HostFaultError",
    "MmuNotifyEvent", "MmuNotifierRange", "MmuNotifier", "Vma", "HostMm", "hva_to_pfn",
    "hva_to_pfn_fast",
]

from kvmmmu._core._checks import check_array, int_arg, ArgumentRangeError, U64_MAX  # noqa: E402
from kvmmmu.errors import ConcurrentUseError  # noqa: E402
import functools  # noqa: E402
import threading  # noqa: E402
from threading import get_ident  # noqa: E402
from kvmmmu._core.defs import PAGE_SHIFT, PAGE_SIZE, PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G  # noqa: E402
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PUD_SHIFT = 30
PUD_SIZE = 1 << PUD_SHIFT
_LEVEL_SHIFT = {PG_LEVEL_4K: PAGE_SHIFT, PG_LEVEL_2M: PMD_SHIFT, PG_LEVEL_1G: PUD_SHIFT}

# --- kvm_pfn_t error values (include/linux/kvm_host.h) --------------------------
#: Bits 62:52 set: an error pfn; bit 63: no memslot.
KVM_PFN_ERR_MASK = 0x7FF << 52
KVM_PFN_ERR_NOSLOT_MASK = 0xFFF << 52
KVM_PFN_NOSLOT = 1 << 63
KVM_PFN_ERR_FAULT = KVM_PFN_ERR_MASK
KVM_PFN_ERR_HWPOISON = KVM_PFN_ERR_MASK + 1
KVM_PFN_ERR_RO_FAULT = KVM_PFN_ERR_MASK + 2
KVM_PFN_ERR_SIGPENDING = KVM_PFN_ERR_MASK + 3
KVM_PFN_ERR_NEEDS_IO = KVM_PFN_ERR_MASK + 4


def is_error_pfn(pfn: int) -> bool:
    """An error pfn (``KVM_PFN_ERR_*``), not a memory pfn and not NOSLOT."""
    return bool(pfn & KVM_PFN_ERR_MASK)


def is_noslot_pfn(pfn: int) -> bool:
    return pfn == KVM_PFN_NOSLOT


def is_error_noslot_pfn(pfn: int) -> bool:
    return bool(pfn & KVM_PFN_ERR_NOSLOT_MASK)


# --- PTE flag byte (one per 4 KiB page of a VMA) ---------------------------------
PTE_PRESENT = 0x01       #: mapped (pfn valid)
PTE_WRITE = 0x02         #: writable PTE (only with PRESENT)
PTE_YOUNG = 0x04         #: host Accessed bit
PTE_DIRTY = 0x08         #: host Dirty bit
PTE_SWAP = 0x10          #: not present: swap entry (page swapped out)
PTE_ZERO = 0x20          #: present: the shared zero page (never writable)
PTE_MIGRATION = 0x40     #: not present: migration entry (page being moved)
PTE_HWPOISON = 0x80      #: not present: hwpoison entry (memory failure)
_NONPRESENT_KINDS = PTE_SWAP | PTE_MIGRATION | PTE_HWPOISON


class HostMmError(ValueError):
    """A host mm call with bad arguments (the errno says which, as mmap(2) would)."""

    def __init__(self, msg, errno_=22):
        super().__init__(msg)
        self.errno = errno_


class HostFaultError(RuntimeError):
    """``handle_mm_fault`` could not map the page.

    ``kind`` is ``"efault"`` (no VMA, or a write to a read-only VMA) or
    ``"hwpoison"`` (the page had a memory failure).
    """

    def __init__(self, msg, kind):
        super().__init__(msg)
        self.kind = kind


class HostOutOfMemoryError(MemoryError):
    """The simulated host ran out of physical memory."""


# ==================================================================================
# Host configuration
# ==================================================================================

@dataclass(frozen=True)
class HostConfig:
    """The platform KVM runs on.

    Parameters
    ----------
    host_64bit : bool
        64-bit host (CONFIG_X86_64).  A 32-bit host stores SPTEs as two
        halves (split SPTEs), has no TDP MMU, a 32-bit ``unsigned long``
        (memslot sizes and the total page count must fit) and a 3 GiB user
        address space.
    maxphyaddr : int
        Host MAXPHYADDR (``boot_cpu_data.x86_phys_bits``), 32..52.
    tdp : {"ept", "npt", None}
        Two-dimensional paging the vendor module enables (``enable_ept`` /
        ``npt_enabled``); None: shadow paging only (``tdp_enabled = false``),
        as on this development host (kvm_pvm).
    ad_bits : bool
        EPT accessed/dirty bits (``kvm_intel.eptad``).  NPT and the legacy
        format always have them.
    pml : bool
        Page-modification logging (``kvm_intel.enable_pml``): dirty logging
        clears D bits instead of write-protecting 4K SPTEs
        (``kvm->arch.cpu_dirty_log_size`` != 0).
    gbpages : bool
        1 GiB pages: the host can map hugetlb 1G pages, and KVM's
        ``max_huge_page_level`` is 1G (else 2M).
    la57 : bool
        The host kernel runs 5-level paging; user addresses go up to
        2**56 - 4096 instead of 2**47 - 4096.
    smm : bool
        CONFIG_KVM_SMM: two memslot address spaces (as_id 1 is SMM).
    guest_memfd : bool
        CONFIG_KVM_GUEST_MEMFD: ``KVM_MEM_GUEST_MEMFD`` memslots.
    sw_protected_vm : bool
        CONFIG_KVM_SW_PROTECTED_VM: ``KVM_X86_SW_PROTECTED_VM`` (private
        memory without hardware protection).
    memory_attributes : bool
        CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES: the ``KVM_SET_MEMORY_ATTRIBUTES``
        ioctl exists (selected by the private-memory VM types).
    mem_bytes : int
        Physical memory the host can hand out (for :class:`HostPhysMem`).
    """

    host_64bit: bool = True
    maxphyaddr: int = 46
    tdp: str | None = "ept"
    ad_bits: bool = True
    pml: bool = False
    gbpages: bool = True
    la57: bool = False
    smm: bool = True
    guest_memfd: bool = True
    sw_protected_vm: bool = True
    memory_attributes: bool = True
    mem_bytes: int = 1 << 40

    def __post_init__(self):
        if not 32 <= self.maxphyaddr <= 52:
            raise ValueError(f"maxphyaddr={self.maxphyaddr} is outside 32..52")
        if self.tdp not in ("ept", "npt", None):
            raise ValueError(f"tdp must be 'ept', 'npt' or None, not {self.tdp!r}")
        if self.la57 and not self.host_64bit:
            raise ValueError("la57 needs a 64-bit host")
        if self.pml and self.tdp != "ept":
            raise ValueError("PML exists only with EPT")
        if self.mem_bytes < (64 << 20):
            raise ValueError("mem_bytes must be at least 64 MiB")

    @property
    def task_size_max(self) -> int:
        """Top of user space (``TASK_SIZE_MAX``): ``access_ok`` accepts
        ``[addr, addr + size)`` only if ``addr + size`` stays at or below it."""
        if not self.host_64bit:
            return 0xC000_0000                       # PAGE_OFFSET, 3G/1G split
        return (1 << (56 if self.la57 else 47)) - PAGE_SIZE

    @property
    def page_offset(self) -> int:
        """``PAGE_OFFSET``: ``KVM_HVA_ERR_BAD`` and every error hva are at or above it."""
        if not self.host_64bit:
            return 0xC000_0000
        return 0xFF11_0000_0000_0000 if self.la57 else 0xFFFF_8880_0000_0000

    @property
    def ulong_bits(self) -> int:
        return 64 if self.host_64bit else 32

    def spte_format(self):
        """The :class:`~kvmmmu._core.spte.SpteFormat` KVM uses for its SPTEs:
        EPT for ``tdp="ept"``, the legacy/NPT format otherwise."""
        from kvmmmu._core.spte import SpteFormat
        return self.spte_format_for(self.tdp)

    def spte_format_for(self, tdp, *, mmio_caching=True):
        from kvmmmu._core.spte import SpteFormat
        if tdp == "ept":
            return SpteFormat.ept(ad_bits=self.ad_bits, maxphyaddr=self.maxphyaddr,
                                  mmio_caching=mmio_caching, host_64bit=self.host_64bit)
        return SpteFormat.legacy(maxphyaddr=self.maxphyaddr, mmio_caching=mmio_caching,
                                 host_64bit=self.host_64bit)

    @classmethod
    def from_system(cls, *, sysfs="/sys/module", cpuinfo="/proc/cpuinfo",
                    dev_kvm="/dev/kvm") -> "HostConfig":
        """The configuration of the machine this runs on.

        Reads ``/proc/cpuinfo`` (address sizes, ``pdpe1gb``, ``la57``), the
        vendor module parameters (``kvm_intel``: ``ept``, ``eptad``,
        ``enable_pml``; ``kvm_amd``: ``npt``) and, when ``/dev/kvm`` can be
        opened, the capabilities that reveal kernel config options
        (``KVM_CAP_MULTI_ADDRESS_SPACE`` for SMM, ``KVM_CAP_GUEST_MEMFD``,
        ``KVM_CAP_VM_TYPES``).  Anything unreadable keeps its default.
        """
        kw = {}
        try:
            text = Path(cpuinfo).read_text()
        except OSError:
            text = ""
        m = re.search(r"address sizes\s*:\s*(\d+) bits physical", text)
        if m:
            kw["maxphyaddr"] = int(m.group(1))
        fl = re.search(r"^flags\s*:(.*)$", text, re.M)
        flags = set(fl.group(1).split()) if fl else set()
        if flags:
            kw["gbpages"] = "pdpe1gb" in flags
            kw["la57"] = "la57" in flags and "lm" in flags
            kw["host_64bit"] = "lm" in flags
        mod = Path(sysfs)

        def param(module, name):
            try:
                return (mod / module / "parameters" / name).read_text().strip()
            except OSError:
                return None

        tdp = None
        if (mod / "kvm_intel").is_dir() and param("kvm_intel", "ept") in ("Y", "1"):
            tdp = "ept"
            kw["ad_bits"] = param("kvm_intel", "eptad") in ("Y", "1")
            kw["pml"] = param("kvm_intel", "enable_pml") in ("Y", "1")
        elif (mod / "kvm_amd").is_dir() and param("kvm_amd", "npt") in ("Y", "1"):
            tdp = "npt"
        kw["tdp"] = tdp
        if tdp != "ept":
            kw["pml"] = False
        caps = _probe_caps(dev_kvm)
        if caps:
            kw["smm"] = caps["multi_address_space"] > 1
            kw["guest_memfd"] = caps["guest_memfd"] > 0
            kw["sw_protected_vm"] = bool(caps["vm_types"] & (1 << 1))
            kw["memory_attributes"] = caps["memory_attributes"] > 0
        try:
            pages = os.sysconf("SC_PHYS_PAGES")
            kw["mem_bytes"] = max(pages * PAGE_SIZE, 64 << 20)
        except (ValueError, OSError):
            pass
        return cls(**kw)


def _probe_caps(path):
    """KVM_CHECK_EXTENSION on /dev/kvm for a few config-revealing caps, or None."""
    try:
        import fcntl
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except (OSError, ImportError):
        return None
    try:
        check = 0xAE03                                   # _IO(KVMIO, 0x03)
        return dict(multi_address_space=fcntl.ioctl(fd, check, 118),
                    guest_memfd=fcntl.ioctl(fd, check, 234),
                    vm_types=fcntl.ioctl(fd, check, 235),
                    memory_attributes=fcntl.ioctl(fd, check, 219))
    except OSError:
        return None
    finally:
        os.close(fd)


# ==================================================================================
# Physical memory
# ==================================================================================

def _range_args(hva, size, *, hva_name="hva", size_name="size", min_size=0):
    """``(hva, size)`` as Python ints: ``hva`` in [0, 2**64), ``size`` in
    [min_size, 2**64), and ``hva + size`` (page rounded) no higher than 2**64:
    a range that would wrap is refused, not truncated."""
    hva = int_arg(hva_name, hva)
    size = int_arg(size_name, size, min_size)
    if hva + size + PAGE_SIZE - 1 > U64_MAX + PAGE_SIZE:
        raise ArgumentRangeError(f"{hva_name}={hva:#x} + {size_name}={size:#x} wraps past 2**64")
    return hva, size


def _hva_arg(hva, name="hva"):
    """``int_arg(name, hva)`` with a fast path for the common plain int."""
    if type(hva) is int and 0 <= hva <= U64_MAX:
        return hva
    return int_arg(name, hva)


def _locked(method):
    """Run ``method`` under the object's ``_lock`` (an RLock)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


def _exclusive(method):
    """Run ``method`` as the one thread using the mm: a second thread calling
    in while another is inside gets RuntimeError (the mm is not shared between
    threads, see HostMm); re-entry from the same thread (a notifier calling
    back) is allowed."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        me = get_ident()
        if self._guard.acquire(False):
            self._owner = me
            try:
                return method(self, *args, **kwargs)
            finally:
                self._owner = None
                self._guard.release()
        if self._owner == me:
            return method(self, *args, **kwargs)
        raise ConcurrentUseError(f"HostMm.{method.__name__}: the mm is in use by another thread")
    return wrapper


class HostPhysMem:
    """Host physical memory as pfns: a bump allocator with per-order free lists.

    Order 0 (4 KiB) pages come from the free list first, then from the bump
    pointer.  Order 9 (2 MiB) and 18 (1 GiB) blocks are naturally aligned and
    contiguous; they come from their own free lists, then from the bump
    pointer (the pages skipped to align it go on the order-0 list, so nothing
    is lost).  There is no buddy splitting or merging.

    Parameters
    ----------
    base_pfn : int
        First pfn handed out (default 0x100: host physical 1 MiB; pfn 0 is
        never used, so 0 can mean "no page").
    limit_pfn : int
        One past the last pfn.  The default stops below the page-table arena's
        default range (3/4 of the 46-bit pfn space, see ``PtArena``) and below
        ``2**(maxphyaddr - 12)``.
    mem_bytes : int
        At most this much memory is live at once (``HostOutOfMemoryError``).

    Invariants: ``nr_allocated + nr_free == pages carved``; every free pfn
    is below the bump pointer and on exactly one free list.  Arguments are
    checked (``operator.index`` integers, uint64 pfn arrays) before any
    counter or list changes; a failed allocation gives back what it took.

    Thread safety: may be shared between threads (several ``HostMm`` on one
    physical memory); allocation and freeing are serialised by an internal
    lock.
    """

    def __init__(self, *, base_pfn=0x100, limit_pfn=None, maxphyaddr=46, mem_bytes=1 << 40):
        arena_base = (1 << (min(maxphyaddr, 46) - 12)) // 4 * 3
        lim = min(arena_base, 1 << (maxphyaddr - 12)) if limit_pfn is None else limit_pfn
        if not 0 < base_pfn < lim:
            raise ValueError(f"pfn range [{base_pfn:#x}, {lim:#x}) is empty")
        self.base_pfn = base_pfn
        self.limit_pfn = lim
        self.max_pages = mem_bytes >> PAGE_SHIFT
        self._bump = base_pfn
        self._free0: list[np.ndarray] = []
        self._nfree0 = 0
        self._free_huge: dict[int, list[int]] = {9: [], 18: []}
        self.nr_allocated = 0
        #: pages held by the kernel itself (guest_memfd, TDX external page
        #: tables), not mapped by any process
        self.nr_kernel = 0
        self._lock = threading.RLock()

    @property
    def nr_free(self) -> int:
        return self._nfree0 + sum(len(v) << o for o, v in self._free_huge.items())

    def _take_bump(self, n, align):
        start = (self._bump + align - 1) & ~(align - 1)
        if start + n > self.limit_pfn:
            raise HostOutOfMemoryError(f"host pfn space exhausted at {self._bump:#x}")
        if start > self._bump:
            self._free0.append(np.arange(self._bump, start, dtype=np.uint64))
            self._nfree0 += start - self._bump
        self._bump = start + n
        return start

    def _charge(self, n):
        if self.nr_allocated + n > self.max_pages:
            raise HostOutOfMemoryError(
                f"host out of memory: {self.nr_allocated} + {n} pages > {self.max_pages}")
        self.nr_allocated += n

    @_locked
    def alloc_pages(self, n: int) -> np.ndarray:
        """``n`` order-0 pages (uint64 pfns; contiguous when carved fresh).
        ``n`` is an integer (``operator.index``); n <= 0 allocates nothing."""
        n = int_arg("n", n, -U64_MAX)
        if n <= 0:
            return np.empty(0, dtype=np.uint64)
        self._charge(n)
        parts, need = [], n
        while need and self._free0:
            a = self._free0[-1]
            if len(a) <= need:
                parts.append(self._free0.pop())
                need -= len(a)
            else:
                parts.append(a[-need:].copy())
                self._free0[-1] = a[:-need]
                need = 0
        self._nfree0 -= n - need
        if need:
            try:
                start = self._take_bump(need, 1)
            except HostOutOfMemoryError:
                self.nr_allocated -= n
                for p in parts:
                    self.free_pages(p, _uncharge=False)
                raise
            parts.append(np.arange(start, start + need, dtype=np.uint64))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @_locked
    def alloc_kernel_pages(self, n: int) -> np.ndarray:
        """Pages for the kernel's own use (not mapped in any mm)."""
        n = int_arg("n", n, 0)
        out = self.alloc_pages(n)
        self.nr_kernel += n
        return out

    @_locked
    def free_kernel_pages(self, pfns) -> None:
        pfns = check_array("pfns", pfns)
        self.nr_kernel -= pfns.size
        self.free_pages(pfns)

    @_locked
    def alloc_huge(self, order: int, count: int = 1) -> np.ndarray:
        """``count`` naturally aligned blocks of ``2**order`` pfns (order 9 or 18);
        returns their base pfns."""
        order = int_arg("order", order)
        count = int_arg("count", count)
        if order not in self._free_huge:
            raise ValueError(f"order {order} is not 9 or 18")
        self._charge(count << order)
        out = np.empty(count, dtype=np.uint64)
        fl = self._free_huge[order]
        k = min(count, len(fl))
        for i in range(k):
            out[i] = fl.pop()
        if count > k:
            try:
                start = self._take_bump((count - k) << order, 1 << order)
            except HostOutOfMemoryError:
                self.nr_allocated -= count << order
                fl.extend(int(x) for x in out[:k])
                raise
            out[k:] = start + (np.arange(count - k, dtype=np.uint64) << np.uint64(order))
        return out

    @_locked
    def free_pages(self, pfns, *, _uncharge=True) -> None:
        pfns = check_array("pfns", pfns)
        if pfns.size:
            self._free0.append(pfns.copy())
            self._nfree0 += pfns.size
            if _uncharge:
                self.nr_allocated -= pfns.size

    @_locked
    def free_huge(self, order: int, bases) -> None:
        order = int_arg("order", order)
        if order not in self._free_huge:
            raise ValueError(f"order {order} is not 9 or 18")
        bases = check_array("bases", bases)
        self._free_huge[order].extend(int(b) for b in bases)
        self.nr_allocated -= bases.size << order

    @_locked
    def free_pfn_array(self) -> np.ndarray:
        """Every free pfn (for audits)."""
        parts = list(self._free0)
        for o, v in self._free_huge.items():
            if v:
                b = np.array(v, dtype=np.uint64)
                parts.append((b[:, None] + np.arange(1 << o, dtype=np.uint64)).ravel())
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)

    @property
    def carved(self) -> int:
        return self._bump - self.base_pfn

    def __repr__(self):
        return (f"HostPhysMem(pfns [{self.base_pfn:#x}, {self.limit_pfn:#x}), "
                f"{self.nr_allocated} allocated, {self.nr_free} free)")


# ==================================================================================
# MMU notifiers
# ==================================================================================

class MmuNotifyEvent(enum.IntEnum):
    """``enum mmu_notifier_event`` (include/linux/mmu_notifier.h)."""
    MMU_NOTIFY_UNMAP = 0
    MMU_NOTIFY_CLEAR = 1
    MMU_NOTIFY_PROTECTION_VMA = 2
    MMU_NOTIFY_PROTECTION_PAGE = 3
    MMU_NOTIFY_SOFT_DIRTY = 4
    MMU_NOTIFY_RELEASE = 5
    MMU_NOTIFY_MIGRATE = 6
    MMU_NOTIFY_EXCLUSIVE = 7


@dataclass
class MmuNotifierRange:
    """``struct mmu_notifier_range``: ``[start, end)`` in hva, page aligned."""
    start: int
    end: int
    event: MmuNotifyEvent = MmuNotifyEvent.MMU_NOTIFY_CLEAR
    blockable: bool = True
    #: set by :meth:`HostMm.invalidate_end`
    ended: bool = False


class MmuNotifier:
    """A secondary MMU subscribed to a :class:`HostMm` (``struct mmu_notifier_ops``).

    Subclasses override what they need; the defaults do nothing and report
    "not young".
    """

    def invalidate_range_start(self, mm: "HostMm", rng: MmuNotifierRange) -> int:
        return 0

    def invalidate_range_end(self, mm: "HostMm", rng: MmuNotifierRange) -> None:
        pass

    def clear_flush_young(self, mm: "HostMm", start: int, end: int) -> bool:
        return False

    def clear_young(self, mm: "HostMm", start: int, end: int) -> bool:
        return False

    def test_young(self, mm: "HostMm", address: int) -> bool:
        return False

    def release(self, mm: "HostMm") -> None:
        pass


# ==================================================================================
# VMAs and the address space
# ==================================================================================

def _anon_bytes(size: int) -> np.ndarray:
    """``size`` zero bytes of lazily allocated anonymous memory (a private
    MAP_NORESERVE mapping: untouched pages cost nothing and are not charged
    against overcommit)."""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    return np.frombuffer(m, dtype=np.uint8)


_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class Vma:
    """One mapping (``struct vm_area_struct``) and its page table.

    Attributes
    ----------
    start, end : int
        hva range ``[start, end)``, page aligned.
    writable : bool
        VM_WRITE.
    shared : bool
        MAP_SHARED (no zero page, no copy-on-write).
    thp : bool
        Transparent huge pages allowed (MADV_HUGEPAGE / "always").
    hugetlb : int or None
        PG_LEVEL_2M or PG_LEVEL_1G for a hugetlbfs mapping, else None.
    pfn : ndarray of uint64, shape (npages,)
        pfn mapped at each 4 KiB page (0 when not present).
    pte : ndarray of uint8, shape (npages,)
        ``PTE_*`` flags of each page.
    pmd_leaf, pud_leaf : ndarray of bool
        Per 2 MiB / 1 GiB hva frame overlapping the VMA (index
        ``(hva >> shift) - (start >> shift)``): mapped by a huge leaf.

    ``start < end``, both page aligned integers no higher than 2**64
    (checked).  Thread safety: a Vma belongs to its ``HostMm`` and is changed
    only through it; it is not shared between threads (it has no guard of
    its own: it is covered by its mm's).
    """

    def __init__(self, start, end, *, writable=True, shared=False, thp=False, hugetlb=None):
        start = int_arg("start", start)
        end = int_arg("end", end, 0, U64_MAX + 1)
        if start >= end or (start | end) & (PAGE_SIZE - 1):
            raise ArgumentRangeError(f"Vma [{start:#x}, {end:#x}) must be a non-empty, "
                                     f"page aligned range")
        if hugetlb not in (None, PG_LEVEL_2M, PG_LEVEL_1G):
            raise ValueError(f"hugetlb must be None, PG_LEVEL_2M or PG_LEVEL_1G, not {hugetlb!r}")
        self.start, self.end = start, end
        self.writable, self.shared, self.thp, self.hugetlb = writable, shared, thp, hugetlb
        n = (end - start) >> PAGE_SHIFT
        self.pfn = np.zeros(n, dtype=np.uint64)
        self.pte = np.zeros(n, dtype=np.uint8)
        self.pmd_leaf = np.zeros(((end - 1) >> PMD_SHIFT) - (start >> PMD_SHIFT) + 1, dtype=bool)
        self.pud_leaf = np.zeros(((end - 1) >> PUD_SHIFT) - (start >> PUD_SHIFT) + 1, dtype=bool)
        self._data = None

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def data(self) -> np.ndarray:
        """The bytes of the mapping (what the VMM and the guest read and
        write), ``uint8[end - start]``: an anonymous private mapping of the
        real process, made on first use with MAP_NORESERVE, so a 64 GiB guest
        costs only the pages it touches.  Contents belong to the hva range:
        they survive swap-out, migration and THP splits (as the host's page
        contents do) and go away with ``munmap``; a VMA split by ``munmap``
        keeps views of the same bytes."""
        d = self._data
        if d is None:
            d = self._data = _anon_bytes(self.end - self.start)
        return d

    def __repr__(self):
        kind = (f"hugetlb-{'2M' if self.hugetlb == PG_LEVEL_2M else '1G'}" if self.hugetlb
                else ("shared" if self.shared else "anon") + ("+thp" if self.thp else ""))
        return (f"Vma({self.start:#x}-{self.end:#x} {'rw' if self.writable else 'r-'} {kind}, "
                f"{int(np.count_nonzero(self.pte & PTE_PRESENT))}/{self.npages} present)")

    # -- index helpers -------------------------------------------------------
    def idx(self, hva):
        return (hva - self.start) >> PAGE_SHIFT

    def page_levels(self, i0=0, i1=None) -> np.ndarray:
        """Mapping level (1/2/3) of pages ``[i0, i1)`` (1 where not present)."""
        i1 = self.npages if i1 is None else i1
        idx = np.arange(i0, i1, dtype=np.int64)
        hva = self.start + (idx << PAGE_SHIFT)
        lvl = np.ones(i1 - i0, dtype=np.uint8)
        pmd = self.pmd_leaf[(hva >> PMD_SHIFT) - (self.start >> PMD_SHIFT)]
        pud = self.pud_leaf[(hva >> PUD_SHIFT) - (self.start >> PUD_SHIFT)]
        lvl[pmd] = PG_LEVEL_2M
        lvl[pud] = PG_LEVEL_1G
        lvl[(self.pte[i0:i1] & PTE_PRESENT) == 0] = PG_LEVEL_4K
        return lvl

    def leaf_span(self, i):
        """Page index range of the mapping unit containing page ``i``: the huge
        leaf, or the page itself."""
        hva = self.start + (i << PAGE_SHIFT)
        if self.pud_leaf[(hva >> PUD_SHIFT) - (self.start >> PUD_SHIFT)]:
            return self.frame_range(hva, PG_LEVEL_1G)
        if self.pmd_leaf[(hva >> PMD_SHIFT) - (self.start >> PMD_SHIFT)]:
            return self.frame_range(hva, PG_LEVEL_2M)
        return i, i + 1

    def frame_range(self, hva, level):
        """Page index range ``[i0, i1)`` of the ``level`` frame containing hva,
        or None if the frame is not wholly inside the VMA."""
        shift = _LEVEL_SHIFT[level]
        f0 = hva & ~((1 << shift) - 1)
        f1 = f0 + (1 << shift)
        if f0 < self.start or f1 > self.end:
            return None
        return self.idx(f0), self.idx(f1)


class HostMm:
    """A process address space (``struct mm_struct``) with simulated page tables.

    Parameters
    ----------
    config : HostConfig, optional
    phys : HostPhysMem, optional
        Physical memory (default: a new one sized from ``config``).
    zero_page : bool
        Read faults on untouched private anonymous memory map the shared zero
        page read-only (``do_anonymous_page``); a later write copies it, with
        an MMU-notifier invalidation (``wp_page_copy``).

    Every operation that removes or replaces a present PTE runs inside
    ``invalidate_range_start`` / ``invalidate_range_end`` of all registered
    notifiers, as Linux does; installing a PTE where none was present needs no
    notification.  Counters of what happened are in :attr:`events`.

    Every public call checks its arguments (``operator.index`` integers below
    2**64, ranges that do not wrap past 2**64) before it changes anything; a
    failing call leaves :meth:`snapshot` unchanged.  A notifier that raises
    never leaves an invalidation open (:meth:`invalidate_begin`,
    :meth:`invalidate_end`).

    Thread safety: not shared between threads.  One thread at a time may be
    inside a mutating call; a second thread calling in meanwhile gets
    ``RuntimeError`` (the state is never corrupted); re-entry from the same
    thread (a notifier calling back into the mm) is allowed.  Read-only
    queries (``find_vma``, ``follow_pte``, the ``*_array`` lookups) take no
    guard: call them from the owning thread.
    """

    def __init__(self, config: HostConfig | None = None, *, phys: HostPhysMem | None = None,
                 zero_page: bool = True):
        if config is not None and not isinstance(config, HostConfig):
            raise TypeError(f"config must be a HostConfig, not {type(config).__name__}")
        if phys is not None and not isinstance(phys, HostPhysMem):
            raise TypeError(f"phys must be a HostPhysMem, not {type(phys).__name__}")
        self.config = config or HostConfig()
        self.phys = phys or HostPhysMem(maxphyaddr=self.config.maxphyaddr,
                                        mem_bytes=self.config.mem_bytes)
        self.vmas: list[Vma] = []
        self.notifiers: list[MmuNotifier] = []
        self.zero_page = zero_page
        self.zero_pfn = int(self.phys.alloc_pages(1)[0])
        top = 0x7F00_0000_0000 if self.config.host_64bit else 0xB000_0000
        self._mmap_top = min(top, self.config.task_size_max)
        self._open: list[MmuNotifierRange] = []
        self._poisoned = 0
        self.events = dict(faults=0, zero_maps=0, cow=0, thp_faults=0, swap_out=0, swap_in=0,
                           migrated=0, thp_split=0, thp_collapse=0, hwpoison=0,
                           invalidations=0)
        self.dead = False
        self._guard = threading.Lock()
        self._owner = None
        #: bumped by every change of the VMA list (mmap, munmap, exit): the
        #: key of lookups cached over it (``vm.guest_memory``, ``_vma_at``)
        self.vma_gen = 0
        #: the scalar fault paths' VMA lookup hint (see ``_vma_at``)
        self._vma_hint = None

    def __repr__(self):
        return f"HostMm({len(self.vmas)} vmas, {len(self.notifiers)} notifiers, {self.phys!r})"

    # -- notifier plumbing -----------------------------------------------------
    @_exclusive
    def mmu_notifier_register(self, sub: MmuNotifier) -> None:
        if not isinstance(sub, MmuNotifier):
            raise TypeError(f"sub must be an MmuNotifier, not {type(sub).__name__}")
        if sub in self.notifiers:
            raise ValueError("notifier already registered")
        self.notifiers.append(sub)

    @_exclusive
    def mmu_notifier_unregister(self, sub: MmuNotifier) -> None:
        if sub not in self.notifiers:
            raise ValueError("sub is not a registered notifier")
        self.notifiers.remove(sub)

    @_exclusive
    def invalidate_begin(self, start: int, end: int,
                         event: MmuNotifyEvent = MmuNotifyEvent.MMU_NOTIFY_CLEAR,
                         blockable: bool = True) -> MmuNotifierRange:
        """``mmu_notifier_invalidate_range_start``: open an invalidation of
        ``[start, end)`` (page aligned outward) and tell every subscriber.

        Returns the range; pass it to :meth:`invalidate_end`.  Between the two
        the host may change the PTEs in the range.  Exposed so tests can
        interleave a KVM fault with an invalidation.

        ``start``/``end`` are integers below 2**64 (``operator.index``).  If a
        subscriber raises, the subscribers that started are ended and the
        range is closed before the exception propagates: no invalidation
        stays open, and the invalidation count is unchanged.
        """
        start = int_arg("start", start)
        end = int_arg("end", end, 0, U64_MAX + 1 - PAGE_SIZE)
        event = MmuNotifyEvent(event)
        start &= ~(PAGE_SIZE - 1)
        end = (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if end <= start:
            raise HostMmError(f"empty invalidation range [{start:#x}, {end:#x})")
        rng = MmuNotifierRange(start, end, MmuNotifyEvent(event), blockable)
        self._open.append(rng)
        self.events["invalidations"] += 1
        started = []
        try:
            for sub in list(self.notifiers):
                sub.invalidate_range_start(self, rng)
                started.append(sub)
        except BaseException:
            # A subscriber failed: end the range for those that started it
            # (the failing one cleaned up after itself) and close it, so no
            # invalidation stays open; the caller changes no PTE.
            try:
                for sub in started:
                    sub.invalidate_range_end(self, rng)
            finally:
                rng.ended = True
                self._open.remove(rng)
                self.events["invalidations"] -= 1
            raise
        return rng

    @_exclusive
    def invalidate_end(self, rng: MmuNotifierRange) -> None:
        """``mmu_notifier_invalidate_range_end`` for a range from :meth:`invalidate_begin`."""
        if not isinstance(rng, MmuNotifierRange):
            raise TypeError(f"rng must be an MmuNotifierRange, not {type(rng).__name__}")
        if rng.ended or rng not in self._open:
            raise HostMmError("invalidate_end on a range that is not open")
        # Every subscriber is told and the range is closed even if one of
        # them raises (the first exception propagates afterwards): an
        # invalidation never stays open because of a failing subscriber.
        err = None
        for sub in list(self.notifiers):
            try:
                sub.invalidate_range_end(self, rng)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                if err is None:
                    err = e
        rng.ended = True
        self._open.remove(rng)
        if err is not None:
            raise err

    @property
    def open_invalidations(self) -> tuple[MmuNotifierRange, ...]:
        return tuple(self._open)

    class _Invalidation:
        def __init__(self, mm, start, end, event):
            self.mm, self.args = mm, (start, end, event)

        def __enter__(self):
            self.rng = self.mm.invalidate_begin(*self.args)
            return self.rng

        def __exit__(self, *exc):
            self.mm.invalidate_end(self.rng)
            return False

    def invalidation(self, start, end, event=MmuNotifyEvent.MMU_NOTIFY_CLEAR):
        """Context manager: ``with mm.invalidation(a, b): <change PTEs>``."""
        return HostMm._Invalidation(self, start, end, event)

    # -- VMAs ------------------------------------------------------------------
    def find_vma(self, hva: int) -> Vma | None:
        """The VMA containing hva, or None."""
        hva = _hva_arg(hva)
        vmas = self.vmas
        if len(vmas) == 1:
            v = vmas[0]
            return v if v.start <= hva < v.end else None
        i = bisect.bisect_right([v.start for v in vmas], hva) - 1
        if i >= 0 and hva < vmas[i].end:
            return vmas[i]
        return None

    def vmas_in(self, start, end) -> list[Vma]:
        return [v for v in self.vmas if v.start < end and v.end > start]

    def _check_alive(self):
        if self.dead:
            raise HostMmError("the mm has exited")

    @_exclusive
    def mmap(self, size: int, *, hva: int | None = None, writable: bool = True,
             shared: bool = False, thp: bool = False, hugetlb: int | str | None = None,
             populate: bool = False) -> int:
        """Create a mapping and return its hva.

        Parameters
        ----------
        size : int
            Bytes, rounded up to the page size (to the huge page size for hugetlb).
        hva : int, optional
            Fixed address (MAP_FIXED_NOREPLACE: an overlap is an error).  By
            default the mapping is placed top-down below earlier ones, aligned
            to 1 GiB for 1G hugetlb, else to 2 MiB when ``size >= 2 MiB`` (as
            ``thp_get_unmapped_area`` does), else to 4 KiB.
        writable, shared, thp : bool
            PROT_WRITE, MAP_SHARED, THP allowed.
        hugetlb : {None, "2M", "1G", 2, 3}
            A hugetlbfs mapping of that page size.
        populate : bool
            MAP_POPULATE: fault every page in (writable mappings are populated
            for write).
        """
        self._check_alive()
        size = int_arg("size", size, 1)
        if hva is not None:
            hva, size = _range_args(hva, size, min_size=1)
        if isinstance(hugetlb, str):
            hugetlb = {"2M": PG_LEVEL_2M, "1G": PG_LEVEL_1G}.get(hugetlb.upper(), hugetlb)
        if hugetlb not in (None, PG_LEVEL_2M, PG_LEVEL_1G):
            raise HostMmError(f"hugetlb must be None, '2M' or '1G', not {hugetlb!r}")
        if hugetlb == PG_LEVEL_1G and not self.config.gbpages:
            raise HostMmError("1 GiB hugetlb pages need gbpages")
        if hugetlb and thp:
            raise HostMmError("a hugetlb mapping is not a THP mapping")
        gran = 1 << _LEVEL_SHIFT[hugetlb] if hugetlb else PAGE_SIZE
        size = (size + gran - 1) & ~(gran - 1)
        if hva is None:
            align = PUD_SIZE if hugetlb == PG_LEVEL_1G else (PMD_SIZE if (hugetlb or size >= PMD_SIZE) else PAGE_SIZE)
            lowest = min([v.start for v in self.vmas] + [self._mmap_top])
            hva = (lowest - size) & ~(align - 1)
            if hva <= 0x1_0000:
                raise HostMmError("out of virtual address space", 12)
        if hva % gran:
            raise HostMmError(f"hva {hva:#x} is not aligned to {gran:#x}")
        if hva + size > self.config.task_size_max:
            raise HostMmError(f"[{hva:#x}, {hva + size:#x}) is above TASK_SIZE_MAX", 12)
        if self.vmas_in(hva, hva + size):
            raise HostMmError(f"[{hva:#x}, {hva + size:#x}) overlaps an existing mapping", 17)
        vma = Vma(hva, hva + size, writable=writable, shared=shared, thp=thp, hugetlb=hugetlb)
        self.vmas.append(vma)
        self.vmas.sort(key=lambda v: v.start)
        self.vma_gen += 1
        if populate:
            self.populate(hva, size, write=writable)
        return hva

    # -- page-table queries ------------------------------------------------------
    def follow_pte(self, hva: int) -> tuple[int, int, int] | None:
        """``(pfn of this 4K page, mapping level, PTE flags)`` or None if no VMA."""
        hva = _hva_arg(hva)
        vma = self.find_vma(hva)
        if vma is None:
            return None
        i = vma.idx(hva)
        flags = int(vma.pte[i])
        lvl = int(vma.page_levels(i, i + 1)[0])
        return int(vma.pfn[i]), lvl, flags

    def host_pfn_mapping_level(self, hva: int) -> int:
        """``host_pfn_mapping_level``: PG_LEVEL_1G if a PUD leaf maps hva,
        PG_LEVEL_2M for a PMD leaf, else PG_LEVEL_4K (also when nothing is
        mapped).  Callers must be tied into the notifiers (shadow-mmu.md §16.2)."""
        if type(hva) is not int or not 0 <= hva <= U64_MAX:
            hva = _hva_arg(hva)
        vmas = self.vmas
        if len(vmas) == 1:
            v = vmas[0]
            if not v.start <= hva < v.end:
                return PG_LEVEL_4K
        else:
            v = self.find_vma(hva)
            if v is None:
                return PG_LEVEL_4K
        if not (v.thp or v.hugetlb):            # only these VMAs get huge leaves
            return PG_LEVEL_4K
        if v.pud_leaf.item((hva >> PUD_SHIFT) - (v.start >> PUD_SHIFT)):
            return PG_LEVEL_1G
        if v.pmd_leaf.item((hva >> PMD_SHIFT) - (v.start >> PMD_SHIFT)):
            return PG_LEVEL_2M
        return PG_LEVEL_4K

    def host_pfn_mapping_level_array(self, hvas) -> np.ndarray:
        """Batch form: ``uint8`` levels for an array of hvas.  A huge leaf is
        always present, so only the per-frame leaf flags are read."""
        h = check_array("hvas", hvas).astype(np.int64)
        out = np.ones(h.shape, dtype=np.uint8)
        if not h.size:
            return out
        lo, hi = int(h.min()), int(h.max())
        for v in self.vmas_in(lo, hi + 1):
            if v.start <= lo and hi < v.end:
                sel, hh = None, h
            else:
                sel = (h >= v.start) & (h < v.end)
                hh = h[sel]
            lvl = v.pmd_leaf.view(np.uint8).take((hh >> PMD_SHIFT) - (v.start >> PMD_SHIFT))
            lvl += 1
            if v.pud_leaf.any():
                lvl[v.pud_leaf.take((hh >> PUD_SHIFT) - (v.start >> PUD_SHIFT))] = PG_LEVEL_1G
            if sel is None:
                out = lvl
            else:
                out[sel] = lvl
        return out

    def hva_to_pfn_array(self, hvas) -> tuple[np.ndarray, np.ndarray]:
        """Batch lookup without faulting: ``(pfn, pte flags)``; pfn 0 where not present."""
        hvas = check_array("hvas", hvas)
        pfn = np.zeros(hvas.shape, dtype=np.uint64)
        fl = np.zeros(hvas.shape, dtype=np.uint8)
        for v in self.vmas:
            m = (hvas >= np.uint64(v.start)) & (hvas < np.uint64(v.end))
            if m.any():
                idx = ((hvas[m] - np.uint64(v.start)) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
                pfn[m] = v.pfn[idx]
                fl[m] = v.pte[idx]
        return pfn, fl

    # -- faults --------------------------------------------------------------------
    def _alloc_fill(self, vma, i0, i1, flags):
        n = i1 - i0
        vma.pfn[i0:i1] = self.phys.alloc_pages(n)
        vma.pte[i0:i1] = flags

    def _install_huge(self, vma, i0, level, flags, base=None):
        order = 9 if level == PG_LEVEL_2M else 18
        if base is None:
            base = int(self.phys.alloc_huge(order, 1)[0])
        n = 1 << order
        vma.pfn[i0:i0 + n] = np.arange(base, base + n, dtype=np.uint64)
        vma.pte[i0:i0 + n] = flags
        hva = vma.start + (i0 << PAGE_SHIFT)
        if level == PG_LEVEL_2M:
            vma.pmd_leaf[(hva >> PMD_SHIFT) - (vma.start >> PMD_SHIFT)] = True
        else:
            vma.pud_leaf[(hva >> PUD_SHIFT) - (vma.start >> PUD_SHIFT)] = True

    def _fault_flags(self, vma, write):
        f = PTE_PRESENT | PTE_YOUNG
        if vma.writable:
            f |= PTE_WRITE
        if write:
            f |= PTE_DIRTY
        return f

    @_exclusive
    def handle_mm_fault(self, hva: int, write: bool) -> None:
        """Fault one page in (``handle_mm_fault``), as GUP's slow path does.

        * no VMA, or a write to a read-only VMA: HostFaultError("efault");
        * a hwpoisoned page: HostFaultError("hwpoison");
        * hugetlb: the whole huge page is allocated;
        * THP: an empty 2 MiB frame wholly inside the VMA gets a huge page;
        * a read fault on untouched private anonymous memory maps the zero
          page read-only; a write to the zero page copies it (notifier);
        * a swapped-out page is swapped in; a migration entry finishes the
          migration first (the model completes migrations synchronously, so
          one is never seen here).
        """
        self._check_alive()
        hva = _hva_arg(hva)
        vma = self.find_vma(hva)
        if vma is None:
            raise HostFaultError(f"no VMA at {hva:#x}", "efault")
        if write and not vma.writable:
            raise HostFaultError(f"write to read-only VMA at {hva:#x}", "efault")
        self.events["faults"] += 1
        i = vma.idx(hva)
        f = int(vma.pte[i])
        if f & PTE_HWPOISON:
            raise HostFaultError(f"hwpoisoned page at {hva:#x}", "hwpoison")
        if f & PTE_PRESENT:
            if write and not (f & PTE_WRITE):
                if f & PTE_ZERO:
                    self._cow_zero(vma, hva)
                elif vma.writable:
                    # a write-protected PTE of a writable private page that is
                    # exclusively ours: the fault just makes it writable again
                    j0, j1 = vma.leaf_span(i)
                    vma.pte[j0:j1] |= PTE_WRITE
            j0, j1 = vma.leaf_span(i)
            vma.pte[j0:j1] |= PTE_YOUNG | (PTE_DIRTY if write else 0)
            return
        flags = self._fault_flags(vma, write)
        if f & PTE_SWAP:
            self.events["swap_in"] += 1
            vma.pte[i] = 0
            self._alloc_fill(vma, i, i + 1, flags)
            return
        if vma.hugetlb:
            i0, _ = vma.frame_range(hva, vma.hugetlb)
            self._install_huge(vma, i0, vma.hugetlb, flags)
            return
        if vma.thp:
            fr = vma.frame_range(hva, PG_LEVEL_2M)
            if fr is not None and not vma.pte[fr[0]:fr[1]].any():
                self.events["thp_faults"] += 1
                self._install_huge(vma, fr[0], PG_LEVEL_2M, flags)
                return
        if not write and not vma.shared and self.zero_page:
            self.events["zero_maps"] += 1
            vma.pfn[i] = self.zero_pfn
            vma.pte[i] = PTE_PRESENT | PTE_ZERO | PTE_YOUNG
            return
        self._alloc_fill(vma, i, i + 1, flags)

    def _cow_zero(self, vma, hva):
        i = vma.idx(hva)
        page = hva & ~(PAGE_SIZE - 1)
        with self.invalidation(page, page + PAGE_SIZE, MmuNotifyEvent.MMU_NOTIFY_CLEAR):
            self.events["cow"] += 1
            vma.pfn[i] = self.phys.alloc_pages(1)[0]
            vma.pte[i] = PTE_PRESENT | PTE_WRITE | PTE_YOUNG | PTE_DIRTY

    @_exclusive
    def populate(self, hva: int, size: int, *, write: bool = True) -> None:
        """Fault in every page of ``[hva, hva + size)`` (MAP_POPULATE / MADV_POPULATE_*),
        vectorized: huge pages where the VMA allows them, 4 KiB pages elsewhere.
        Pages already present are left alone (a write populate still copies
        zero pages)."""
        self._check_alive()
        hva, size = _range_args(hva, size)
        end = (hva + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        hva &= ~(PAGE_SIZE - 1)
        # refuse before faulting anything in: a read-only VMA late in the
        # range must not leave the earlier ones populated
        vmas = self.vmas_in(hva, end)
        if write:
            for vma in vmas:
                if not vma.writable:
                    raise HostFaultError(f"write populate of read-only VMA at {vma.start:#x}", "efault")
        for vma in vmas:
            a, b = max(hva, vma.start), min(end, vma.end)
            i0, i1 = vma.idx(a), vma.idx(b)
            flags = self._fault_flags(vma, write)
            if vma.hugetlb or vma.thp:
                level = vma.hugetlb or PG_LEVEL_2M
                shift = _LEVEL_SHIFT[level]
                n = 1 << (shift - PAGE_SHIFT)
                f0 = max(a & ~((1 << shift) - 1), vma.start)
                frames = np.arange(f0 >> shift, ((b - 1) >> shift) + 1, dtype=np.int64)
                starts = frames << shift
                inside = (starts >= vma.start) & (starts + (1 << shift) <= vma.end)
                cand = starts[inside]
                if cand.size:
                    ii = (cand - vma.start) >> PAGE_SHIFT
                    blocks = vma.pte[(ii[:, None] + np.arange(n)).ravel()].reshape(len(ii), n)
                    empty = ~blocks.any(axis=1)
                    ii = ii[empty]
                    if ii.size:
                        order = 9 if level == PG_LEVEL_2M else 18
                        bases = self.phys.alloc_huge(order, len(ii))
                        pos = (ii[:, None] + np.arange(n)).ravel()
                        vma.pfn[pos] = (bases[:, None] + np.arange(n, dtype=np.uint64)).ravel()
                        vma.pte[pos] = flags
                        leaf = vma.pmd_leaf if level == PG_LEVEL_2M else vma.pud_leaf
                        leaf[((vma.start + (ii << PAGE_SHIFT)) >> shift) - (vma.start >> shift)] = True
                        if vma.thp:
                            self.events["thp_faults"] += len(ii)
                if vma.hugetlb:
                    continue
            sl = slice(i0, i1)
            if write:
                zero = np.flatnonzero(vma.pte[sl] & PTE_ZERO) + i0
                for i in zero:
                    self._cow_zero(vma, vma.start + (int(i) << PAGE_SHIFT))
            none = np.flatnonzero((vma.pte[sl] & (PTE_PRESENT | _NONPRESENT_KINDS)) == 0) + i0
            swapped = np.flatnonzero(vma.pte[sl] & PTE_SWAP) + i0
            self.events["swap_in"] += len(swapped)
            todo = np.concatenate([none, swapped])
            if todo.size:
                if not write and not vma.shared and self.zero_page:
                    vma.pfn[none] = self.zero_pfn
                    vma.pte[none] = PTE_PRESENT | PTE_ZERO | PTE_YOUNG
                    self.events["zero_maps"] += len(none)
                    todo = swapped
                if todo.size:
                    vma.pfn[todo] = self.phys.alloc_pages(len(todo))
                    vma.pte[todo] = flags
            self.events["faults"] += int(i1 - i0)

    # -- host events ------------------------------------------------------------
    def _free_range(self, vma, i0, i1):
        """Drop the PTEs of pages [i0, i1) (huge leaves must lie wholly inside)."""
        for leaf, shift, order in ((vma.pud_leaf, PUD_SHIFT, 18), (vma.pmd_leaf, PMD_SHIFT, 9)):
            a = vma.start + (i0 << PAGE_SHIFT)
            b = vma.start + (i1 << PAGE_SHIFT)
            fr = np.arange((a >> shift) - (vma.start >> shift), ((b - 1) >> shift) - (vma.start >> shift) + 1)
            fr = fr[leaf[fr]]
            if fr.size:
                fstart = ((vma.start >> shift) + fr) << shift
                bases = vma.pfn[(fstart - vma.start) >> PAGE_SHIFT]
                self.phys.free_huge(order, bases)
                for s in fstart:
                    j = (int(s) - vma.start) >> PAGE_SHIFT
                    vma.pte[j:j + (1 << order)] = 0
                    vma.pfn[j:j + (1 << order)] = 0
                leaf[fr] = False
        sl = slice(i0, i1)
        small = np.flatnonzero((vma.pte[sl] & PTE_PRESENT) & ~((vma.pte[sl] & PTE_ZERO) != 0)) + i0
        self.phys.free_pages(vma.pfn[small])
        vma.pfn[sl] = 0
        vma.pte[sl] = 0

    def _split_leaves(self, a, b, *, notify=True):
        """Split huge leaves that straddle ``a`` or ``b`` (``__split_huge_pmd``):
        PUD leaves into PMD leaves and PMD leaves into PTEs, pfns unchanged."""
        for vma in self.vmas_in(a - 1 if a else a, b + 1):
            for edge in (a, b):
                if not vma.start < edge < vma.end:
                    continue
                for level in (PG_LEVEL_1G, PG_LEVEL_2M):
                    shift = _LEVEL_SHIFT[level]
                    if edge & ((1 << shift) - 1) == 0:
                        continue
                    leaf = vma.pud_leaf if level == PG_LEVEL_1G else vma.pmd_leaf
                    k = (edge >> shift) - (vma.start >> shift)
                    if leaf[k]:
                        if vma.hugetlb:
                            raise HostMmError(f"cannot split a hugetlb page at {edge:#x}")
                        self._split_one(vma, ((edge >> shift) << shift), level, notify)

    def _split_one(self, vma, f0, level, notify):
        shift = _LEVEL_SHIFT[level]
        leaf = vma.pud_leaf if level == PG_LEVEL_1G else vma.pmd_leaf

        def do():
            leaf[(f0 >> shift) - (vma.start >> shift)] = False
            if level == PG_LEVEL_1G:
                # a PUD leaf becomes 512 PMD leaves of the same pfns
                k0 = (f0 >> PMD_SHIFT) - (vma.start >> PMD_SHIFT)
                vma.pmd_leaf[k0:k0 + 512] = True
                # the 1 GiB block is now 512 2 MiB blocks for the allocator
            self.events["thp_split"] += 1

        if notify:
            with self.invalidation(f0, f0 + (1 << shift), MmuNotifyEvent.MMU_NOTIFY_CLEAR):
                do()
        else:
            do()

    @_exclusive
    def munmap(self, hva: int, size: int) -> None:
        """``munmap``: split huge pages straddling the edges (each with its own
        notifier range), then one ``MMU_NOTIFY_UNMAP`` invalidation of the
        whole range while the pages are freed; VMAs are trimmed or split."""
        self._check_alive()
        hva, size = _range_args(hva, size)
        if hva % PAGE_SIZE or size <= 0:
            raise HostMmError(f"munmap({hva:#x}, {size:#x}): bad range")
        end = (hva + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        vmas = self.vmas_in(hva, end)
        for v in vmas:
            if v.hugetlb:
                g = 1 << _LEVEL_SHIFT[v.hugetlb]
                if (max(hva, v.start) % g) or (min(end, v.end) % g):
                    raise HostMmError(f"munmap of a hugetlb mapping must be {g:#x} aligned")
        if not vmas:
            return
        self._split_leaves(hva, end)
        with self.invalidation(hva, end, MmuNotifyEvent.MMU_NOTIFY_UNMAP):
            for v in vmas:
                a, b = max(hva, v.start), min(end, v.end)
                self._free_range(v, v.idx(a), v.idx(b))
        out = []
        for v in self.vmas:
            if v not in vmas:
                out.append(v)
                continue
            if v.start < hva:
                out.append(self._slice_vma(v, v.start, hva))
            if v.end > end:
                out.append(self._slice_vma(v, end, v.end))
        self.vmas = sorted(out, key=lambda v: v.start)
        self.vma_gen += 1

    def _slice_vma(self, v, a, b):
        n = Vma(a, b, writable=v.writable, shared=v.shared, thp=v.thp, hugetlb=v.hugetlb)
        i0, i1 = v.idx(a), v.idx(b)
        n.pfn[:] = v.pfn[i0:i1]
        n.pte[:] = v.pte[i0:i1]
        if v._data is not None:
            n._data = v._data[a - v.start:b - v.start]
        for src, dst, shift in ((v.pmd_leaf, n.pmd_leaf, PMD_SHIFT), (v.pud_leaf, n.pud_leaf, PUD_SHIFT)):
            k0 = (a >> shift) - (v.start >> shift)
            dst[:] = src[k0:k0 + len(dst)]
            # a frame that is no longer wholly inside cannot be a leaf (split above)
        return n

    @_exclusive
    def mprotect(self, hva: int, size: int, writable: bool) -> None:
        """``mprotect``: change VM_WRITE of whole VMAs in the range.  Removing
        write access write-protects the PTEs under an
        ``MMU_NOTIFY_PROTECTION_VMA`` invalidation; adding it changes only
        the VMA (PTEs become writable on the next write fault)."""
        self._check_alive()
        hva, size = _range_args(hva, size)
        end = (hva + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        vmas = self.vmas_in(hva, end)
        for v in vmas:
            if v.start < hva or v.end > end:
                raise HostMmError("the model's mprotect changes whole VMAs only")
        if not writable and vmas:
            with self.invalidation(hva, end, MmuNotifyEvent.MMU_NOTIFY_PROTECTION_VMA):
                for v in vmas:
                    v.writable = False
                    v.pte &= np.uint8(~PTE_WRITE & 0xFF)
        else:
            for v in vmas:
                v.writable = writable

    @_exclusive
    def split_huge_pmd(self, hva: int, size: int = PMD_SIZE) -> int:
        """Split every THP leaf in ``[hva, hva + size)`` into 4 KiB PTEs of the
        same pfns (``__split_huge_pmd``; one ``MMU_NOTIFY_CLEAR`` range per
        huge page).  1 GiB leaves split into 2 MiB leaves.  Returns how many
        leaves were split.  hugetlb pages cannot be split."""
        self._check_alive()
        hva, size = _range_args(hva, size)
        n = 0
        end = hva + size
        for vma in self.vmas_in(hva, end):
            if vma.hugetlb:
                continue
            for level, leaf in ((PG_LEVEL_1G, vma.pud_leaf), (PG_LEVEL_2M, vma.pmd_leaf)):
                shift = _LEVEL_SHIFT[level]
                k0 = (max(hva, vma.start) >> shift) - (vma.start >> shift)
                k1 = ((min(end, vma.end) - 1) >> shift) - (vma.start >> shift) + 1
                for k in np.flatnonzero(leaf[k0:k1]) + k0:
                    self._split_one(vma, ((vma.start >> shift) + int(k)) << shift, level, True)
                    n += 1
        return n

    @_exclusive
    def collapse_huge_page(self, hva: int, *, max_ptes_none: int = 511) -> bool:
        """khugepaged ``collapse_huge_page`` for the 2 MiB frame containing hva.

        Needs a THP-enabled anonymous VMA containing the whole frame, no huge
        leaf there already, no swapped/migrating/poisoned entry, at most
        ``max_ptes_none`` empty PTEs and no zero page.  Allocates a new aligned
        huge page, and under one ``MMU_NOTIFY_CLEAR`` invalidation of the frame
        replaces the 512 PTEs with a PMD leaf and frees the old pages.  Returns
        whether it collapsed.
        """
        self._check_alive()
        hva = _hva_arg(hva)
        max_ptes_none = int_arg("max_ptes_none", max_ptes_none, 0, 512)
        vma = self.find_vma(hva)
        if vma is None or not vma.thp or vma.hugetlb:
            return False
        fr = vma.frame_range(hva, PG_LEVEL_2M)
        if fr is None:
            return False
        i0, i1 = fr
        f0 = vma.start + (i0 << PAGE_SHIFT)
        if vma.pmd_leaf[(f0 >> PMD_SHIFT) - (vma.start >> PMD_SHIFT)] or \
                vma.pud_leaf[(f0 >> PUD_SHIFT) - (vma.start >> PUD_SHIFT)]:
            return False
        pte = vma.pte[i0:i1]
        if (pte & (_NONPRESENT_KINDS | PTE_ZERO)).any():
            return False
        if int(np.count_nonzero((pte & PTE_PRESENT) == 0)) > max_ptes_none or not (pte & PTE_PRESENT).any():
            return False
        base = int(self.phys.alloc_huge(9, 1)[0])
        with self.invalidation(f0, f0 + PMD_SIZE, MmuNotifyEvent.MMU_NOTIFY_CLEAR):
            old = vma.pfn[i0:i1][(pte & PTE_PRESENT) != 0].copy()
            young = bool((pte & PTE_YOUNG).any())
            dirty = bool((pte & PTE_DIRTY).any())
            self.phys.free_pages(old)
            flags = PTE_PRESENT | (PTE_WRITE if vma.writable else 0) | \
                (PTE_YOUNG if young else 0) | (PTE_DIRTY if dirty else 0)
            self._install_huge(vma, i0, PG_LEVEL_2M, flags, base=base)
            self.events["thp_collapse"] += 1
        return True

    def _present_units(self, vma, a, b):
        """Mapped memory in [a, b): ``(units, small)`` where ``units`` lists the
        huge leaves overlapping the range as ``(i0, i1, level)`` and ``small``
        the indices of present 4 KiB pages that are not the zero page."""
        i0, i1 = vma.idx(a), vma.idx(b)
        covered = np.zeros(i1 - i0, dtype=bool)
        units = []
        for leaf, shift, level in ((vma.pud_leaf, PUD_SHIFT, PG_LEVEL_1G),
                                   (vma.pmd_leaf, PMD_SHIFT, PG_LEVEL_2M)):
            k0 = (a >> shift) - (vma.start >> shift)
            k1 = ((b - 1) >> shift) - (vma.start >> shift) + 1
            for k in np.flatnonzero(leaf[k0:k1]) + k0:
                j0 = ((((vma.start >> shift) + int(k)) << shift) - vma.start) >> PAGE_SHIFT
                j1 = j0 + (1 << (shift - PAGE_SHIFT))
                units.append((j0, j1, level))
                covered[max(j0, i0) - i0:min(j1, i1) - i0] = True
        f = vma.pte[i0:i1]
        small = np.flatnonzero((f & PTE_PRESENT != 0) & (f & PTE_ZERO == 0) & ~covered) + i0
        return units, small

    @_exclusive
    def migrate_pages(self, hva: int, size: int) -> int:
        """Migrate every mapped page (or whole huge page) of the range to newly
        allocated memory.  The new pages are allocated first; then one
        ``MMU_NOTIFY_CLEAR`` invalidation of the range covers turning the PTEs
        into migration entries and freeing the old pages; then the new PTEs
        are installed with the old flags (installing needs no notification).
        Huge pages move to new aligned huge pages; huge leaves that stick out
        of the range stay.  Returns the number of 4 KiB pages moved."""
        self._check_alive()
        hva, size = _range_args(hva, size)
        end = hva + size
        plan = []
        for vma in self.vmas_in(hva, end):
            a, b = max(hva, vma.start), min(end, vma.end)
            units, small = self._present_units(vma, a, b)
            units = [u for u in units if u[0] >= vma.idx(a) and u[1] <= vma.idx(b)]
            if units or small.size:
                new_small, new_bases = np.empty(0, np.uint64), []
                try:
                    new_small = self.phys.alloc_pages(len(small))
                    for _, _, L in units:
                        o = 9 if L == PG_LEVEL_2M else 18
                        new_bases.append((o, self.phys.alloc_huge(o, 1)))
                except HostOutOfMemoryError:
                    # out of memory part-way: give back what the plan holds,
                    # nothing was unmapped yet
                    plan.append((vma, units, small, new_small, new_bases))
                    for _, _, _, ns, nb in plan:
                        self.phys.free_pages(ns)
                        for o, b in nb:
                            self.phys.free_huge(o, b)
                    raise
                plan.append((vma, units, small, new_small, new_bases))
        if not plan:
            return 0
        moved = 0
        saved = []
        with self.invalidation(hva, end, MmuNotifyEvent.MMU_NOTIFY_CLEAR):
            for vma, units, small, new_small, new_bases in plan:
                f_small = vma.pte[small].copy()
                self.phys.free_pages(vma.pfn[small])
                vma.pfn[small] = 0
                vma.pte[small] = PTE_MIGRATION
                f_units = []
                for j0, j1, L in units:
                    f_units.append(int(vma.pte[j0]))
                    self.phys.free_huge(9 if L == PG_LEVEL_2M else 18, vma.pfn[j0:j0 + 1])
                    vma.pfn[j0:j1] = 0
                    vma.pte[j0:j1] = PTE_MIGRATION
                saved.append((vma, units, small, f_small, f_units, new_small, new_bases))
        for vma, units, small, f_small, f_units, new_small, new_bases in saved:
            vma.pfn[small] = new_small
            vma.pte[small] = f_small
            moved += len(small)
            for (j0, j1, L), f, (_, base) in zip(units, f_units, new_bases):
                base = int(base[0])
                vma.pfn[j0:j1] = np.arange(base, base + (j1 - j0), dtype=np.uint64)
                vma.pte[j0:j1] = f
                moved += j1 - j0
        self.events["migrated"] += moved
        return moved

    @_exclusive
    def swap_out(self, hva: int, size: int) -> int:
        """Reclaim the anonymous pages of the range to swap (``try_to_unmap``):
        THP leaves in the range are split first; one ``MMU_NOTIFY_CLEAR``
        invalidation covers the unmap; present pages become swap entries and
        are freed; zero-page PTEs are simply dropped.  hugetlb and shared
        mappings are skipped.  Returns the number of pages swapped out."""
        self._check_alive()
        hva, size = _range_args(hva, size)
        end = hva + size
        vmas = [v for v in self.vmas_in(hva, end) if not v.hugetlb and not v.shared]
        if not vmas:
            return 0
        self.split_huge_pmd(hva, size)
        self._split_leaves(hva, end)
        n = 0
        with self.invalidation(hva, end, MmuNotifyEvent.MMU_NOTIFY_CLEAR):
            for v in vmas:
                i0, i1 = v.idx(max(hva, v.start)), v.idx(min(end, v.end))
                sl = slice(i0, i1)
                pres = (v.pte[sl] & PTE_PRESENT) != 0
                zero = (v.pte[sl] & PTE_ZERO) != 0
                real = np.flatnonzero(pres & ~zero) + i0
                self.phys.free_pages(v.pfn[real])
                v.pfn[real] = 0
                v.pte[real] = PTE_SWAP
                zi = np.flatnonzero(zero) + i0
                v.pfn[zi] = 0
                v.pte[zi] = 0
                n += len(real)
        self.events["swap_out"] += n
        return n

    @_exclusive
    def memory_failure(self, hva: int) -> bool:
        """A memory error on the page at hva (``memory_failure``): the page
        (the whole huge page for hugetlb; a THP is split first) is unmapped
        under an ``MMU_NOTIFY_CLEAR`` invalidation and its PTE becomes a
        hwpoison entry; later faults on it fail with hwpoison."""
        self._check_alive()
        hva = _hva_arg(hva)
        vma = self.find_vma(hva)
        if vma is None:
            return False
        i = vma.idx(hva)
        if not vma.pte[i] & PTE_PRESENT or vma.pte[i] & PTE_ZERO:
            return False
        lvl = int(vma.page_levels(i, i + 1)[0])
        if lvl > 1 and not vma.hugetlb:
            self.split_huge_pmd(hva & ~(PMD_SIZE - 1) if lvl == 2 else hva & ~(PUD_SIZE - 1),
                                1 << _LEVEL_SHIFT[lvl])
            lvl = int(vma.page_levels(i, i + 1)[0])
            if lvl > 1:                               # a 1G leaf became 2M leaves
                self.split_huge_pmd(hva & ~(PMD_SIZE - 1), PMD_SIZE)
                lvl = 1
        j0, j1 = vma.frame_range(hva, lvl) if lvl > 1 else (i, i + 1)
        a = vma.start + (j0 << PAGE_SHIFT)
        with self.invalidation(a, vma.start + (j1 << PAGE_SHIFT), MmuNotifyEvent.MMU_NOTIFY_CLEAR):
            # the poisoned page is never reused: it stays allocated
            if lvl > 1:
                leaf = vma.pmd_leaf if lvl == 2 else vma.pud_leaf
                leaf[(a >> _LEVEL_SHIFT[lvl]) - (vma.start >> _LEVEL_SHIFT[lvl])] = False
            self._poisoned += j1 - j0
            vma.pfn[j0:j1] = 0
            vma.pte[j0:j1] = PTE_HWPOISON
        self.events["hwpoison"] += 1
        return True

    @_exclusive
    def age(self, hva: int, size: int, *, flush: bool = True) -> bool:
        """Page aging (``folio_referenced``): clear the host Accessed bits of
        the mapped pages in the range and ask every notifier
        (``clear_flush_young``, or ``clear_young`` when ``flush`` is false)
        about the same range.  Returns whether anything was young."""
        self._check_alive()
        hva, size = _range_args(hva, size)
        end = hva + size
        young = False
        for v in self.vmas_in(hva, end):
            i0, i1 = v.idx(max(hva, v.start)), v.idx(min(end, v.end))
            i0, i1 = v.leaf_span(i0)[0], v.leaf_span(i1 - 1)[1]     # whole folios
            sl = v.pte[i0:i1]
            young |= bool((sl & PTE_YOUNG).any())
            sl &= np.uint8(~PTE_YOUNG & 0xFF)
        for sub in list(self.notifiers):
            young |= bool(sub.clear_flush_young(self, hva, end) if flush
                          else sub.clear_young(self, hva, end))
        return young

    @_exclusive
    def test_young(self, hva: int) -> bool:
        """``mmu_notifier_test_young`` plus the host's own Accessed bit."""
        self._check_alive()
        hva = _hva_arg(hva)
        vma = self.find_vma(hva)
        young = bool(vma is not None and vma.pte[vma.idx(hva)] & PTE_YOUNG)
        for sub in list(self.notifiers):
            young |= bool(sub.test_young(self, hva))
        return young

    @_exclusive
    def exit_mmap(self) -> None:
        """Process exit: ``mmu_notifier_release`` (KVM zaps everything), then
        the mappings are torn down without further notification."""
        self._check_alive()
        for sub in list(self.notifiers):
            sub.release(self)
        for v in self.vmas:
            self._free_range(v, 0, v.npages)
        self.vmas = []
        self.vma_gen += 1
        self.dead = True

    # -- audit ---------------------------------------------------------------------
    def snapshot(self) -> tuple:
        """A comparable, hashable record of the whole host state: every VMA
        (range, flags, pfns, PTEs, huge leaves), the physical allocator's
        counters and free lists, the notifier list, the open invalidations and
        the event counters.  Two snapshots are equal iff nothing observable
        changed; tests take one before a call that must fail and compare."""
        ph = self.phys
        vmas = tuple((v.start, v.end, v.writable, v.shared, v.thp, v.hugetlb,
                      v.pfn.tobytes(), v.pte.tobytes(), v.pmd_leaf.tobytes(),
                      v.pud_leaf.tobytes()) for v in self.vmas)
        phys = (ph._bump, ph.nr_allocated, ph.nr_kernel, ph._nfree0,
                tuple(a.tobytes() for a in ph._free0),
                tuple((o, tuple(v)) for o, v in sorted(ph._free_huge.items())))
        return (vmas, phys, tuple(id(n) for n in self.notifiers),
                tuple((r.start, r.end, int(r.event)) for r in self._open),
                tuple(sorted(self.events.items())), self._poisoned, self.dead)

    def audit(self) -> list[str]:
        """Check the module invariants; returns every violation found."""
        bad = []
        prev_end = 0
        mapped = []
        for v in self.vmas:
            tag = f"vma {v.start:#x}-{v.end:#x}"
            if v.start % PAGE_SIZE or v.end % PAGE_SIZE or v.end <= v.start:
                bad.append(f"{tag}: not page aligned or empty")
            if v.start < prev_end:
                bad.append(f"{tag}: overlaps the previous VMA")
            prev_end = v.end
            if v.hugetlb:
                g = 1 << _LEVEL_SHIFT[v.hugetlb]
                if v.start % g or v.end % g:
                    bad.append(f"{tag}: hugetlb VMA not aligned to {g:#x}")
            pres = (v.pte & PTE_PRESENT) != 0
            if (v.pfn[pres] == 0).any():
                bad.append(f"{tag}: present PTE with pfn 0")
            if (v.pfn[~pres] != 0).any():
                bad.append(f"{tag}: not-present PTE with a pfn")
            np_kinds = v.pte[~pres] & _NONPRESENT_KINDS
            if ((np_kinds & (np_kinds - 1)) != 0).any():
                bad.append(f"{tag}: not-present PTE with two entry kinds")
            if (v.pte[~pres] & (PTE_WRITE | PTE_ZERO | PTE_YOUNG | PTE_DIRTY)).any():
                bad.append(f"{tag}: not-present PTE with present-only flags")
            zero = (v.pte & PTE_ZERO) != 0
            if zero.any():
                if v.shared or (v.pte[zero] & PTE_WRITE).any() or (v.pfn[zero] != self.zero_pfn).any():
                    bad.append(f"{tag}: bad zero-page PTE")
            if (v.pte & PTE_WRITE).any() and not v.writable:
                bad.append(f"{tag}: writable PTE in a read-only VMA")
            for leaf, shift, order in ((v.pmd_leaf, PMD_SHIFT, 9), (v.pud_leaf, PUD_SHIFT, 18)):
                for k in np.flatnonzero(leaf):
                    f0 = ((v.start >> shift) + int(k)) << shift
                    if f0 < v.start or f0 + (1 << shift) > v.end:
                        bad.append(f"{tag}: huge leaf at {f0:#x} not inside the VMA")
                        continue
                    j = (f0 - v.start) >> PAGE_SHIFT
                    pf = v.pfn[j:j + (1 << order)]
                    fl = v.pte[j:j + (1 << order)]
                    base = int(pf[0])
                    if base % (1 << order) or not np.array_equal(
                            pf, np.arange(base, base + (1 << order), dtype=np.uint64)):
                        bad.append(f"{tag}: huge leaf at {f0:#x} not contiguous/aligned")
                    if not (fl & PTE_PRESENT).all() or (fl != fl[0]).any() or (fl & PTE_ZERO).any():
                        bad.append(f"{tag}: huge leaf at {f0:#x} has non-uniform PTEs")
                    if order == 9 and v.pud_leaf[(f0 >> PUD_SHIFT) - (v.start >> PUD_SHIFT)]:
                        bad.append(f"{tag}: PMD leaf inside a PUD leaf at {f0:#x}")
                    if v.hugetlb and v.hugetlb != (2 if order == 9 else 3):
                        bad.append(f"{tag}: hugetlb leaf of the wrong size at {f0:#x}")
            if v.hugetlb:
                leaf = v.pmd_leaf if v.hugetlb == PG_LEVEL_2M else v.pud_leaf
                lv = v.page_levels()
                if (lv[pres] != v.hugetlb).any():
                    bad.append(f"{tag}: hugetlb page mapped below its size")
                del leaf
            # mapped memory as pfn ranges: one per huge leaf, one per 4K page
            in_leaf = np.zeros(v.npages, dtype=bool)
            for leaf, shift in ((v.pmd_leaf, PMD_SHIFT), (v.pud_leaf, PUD_SHIFT)):
                n = 1 << (shift - PAGE_SHIFT)
                for k in np.flatnonzero(leaf):
                    f0 = ((v.start >> shift) + int(k)) << shift
                    if v.start <= f0 and f0 + (1 << shift) <= v.end:
                        j = (f0 - v.start) >> PAGE_SHIFT
                        in_leaf[j:j + n] = True
                        mapped.append((v.pfn[j:j + 1], np.full(1, n, dtype=np.uint64)))
            small = v.pfn[pres & ~zero & ~in_leaf]
            mapped.append((small, np.ones(small.size, dtype=np.uint64)))
        nmapped = int(sum(int(l.sum()) for _, l in mapped))
        free = [(a, np.ones(a.size, dtype=np.uint64)) for a in self.phys._free0]
        for o, lst in self.phys._free_huge.items():
            if lst:
                free.append((np.array(lst, dtype=np.uint64), np.full(len(lst), 1 << o, dtype=np.uint64)))
        parts = [(a, l, np.zeros(a.size, dtype=np.uint8)) for a, l in mapped] + \
                [(a, l, np.ones(a.size, dtype=np.uint8)) for a, l in free]
        if parts:
            st = np.concatenate([p[0] for p in parts])
            ln = np.concatenate([p[1] for p in parts])
            kind = np.concatenate([p[2] for p in parts])
            order = np.argsort(st, kind="stable")
            st, ln, kind = st[order], ln[order], kind[order]
            over = np.flatnonzero(st[1:] < st[:-1] + ln[:-1])
            if over.size:
                i = int(over[0])
                what = {(0, 0): "a pfn is mapped twice", (1, 1): "a pfn is free twice"}.get(
                    (int(kind[i]), int(kind[i + 1])), "a mapped pfn is on a free list")
                bad.append(f"{what} (pfn {int(st[i + 1]):#x})")
        poisoned = self._poisoned
        kern = self.phys.nr_kernel
        if not self.dead and self.phys.nr_allocated != nmapped + 1 + poisoned + kern:
            bad.append(f"allocated pages {self.phys.nr_allocated} != mapped {nmapped} "
                       f"+ zero page + {poisoned} poisoned + {kern} kernel")
        if self.phys.nr_allocated + self.phys.nr_free != self.phys.carved:
            bad.append("allocator: allocated + free != carved")
        return bad


# ==================================================================================
# KVM's hva -> pfn
# ==================================================================================

def hva_to_pfn_fast(mm: HostMm, hva: int, write_fault: bool,
                    fault_in: bool = False) -> tuple[int, bool, int] | None:
    """Step 1 of :func:`hva_to_pfn` alone (GUP fast, ``want_writable``), for
    the scalar fault path: ``(pfn, writable, level)`` when a present PTE
    allows the access, with ``level`` the host mapping level of the leaf
    (what :meth:`HostMm.host_pfn_mapping_level` answers for ``hva`` now);
    else None (the caller goes on with :func:`hva_to_pfn`, which faults the
    page in).  The same effect on the host PTEs (young, and dirty for a
    write, over the whole leaf), with scalar reads instead of array slices;
    ``hva`` must be a plain int in range.

    With ``fault_in`` the rest of :func:`hva_to_pfn` follows instead of
    None (faultin's one call): the answer is never None, and ``level`` is 0
    when the slow path cannot tell it.  The same answers and effects on the
    mm (PTE flags, ``events``, allocations, errors) as :func:`hva_to_pfn`;
    its common case, a first touch of a never-mapped page of a VMA without
    huge leaves (the zero page for a read of private memory, a new page
    otherwise: level 4K), is done here under the mm's one-thread guard
    instead of through :meth:`HostMm.handle_mm_fault`; everything else
    (swap, hwpoison, COW, THP, hugetlb, no VMA, a busy or dead mm) goes the
    general way."""
    vmas = mm.vmas
    if len(vmas) == 1:
        vma = vmas[0]
        if not vma.start <= hva < vma.end:
            vma = None
    else:
        vma = _vma_at(mm, vmas, hva)
    if vma is None:
        return _hva_to_pfn_general(mm, hva, write_fault) if fault_in else None
    i = (hva - vma.start) >> PAGE_SHIFT
    pte = vma.pte
    f = pte.item(i)
    if not f & PTE_PRESENT or (write_fault and not f & PTE_WRITE):
        if not fault_in:
            return None
        if not f and not (vma.thp or vma.hugetlb) and not mm.dead and \
                (vma.writable or not write_fault) and mm._guard.acquire(False):
            # handle_mm_fault on a page that never was (no swap entry, no
            # poison): the zero page or a new 4K page, nothing to notify
            mm._owner = get_ident()
            try:
                ev = mm.events
                ev["faults"] += 1
                if not write_fault and not vma.shared and mm.zero_page:
                    ev["zero_maps"] += 1
                    vma.pfn[i] = mm.zero_pfn
                    pte[i] = PTE_PRESENT | PTE_ZERO | PTE_YOUNG
                    return mm.zero_pfn, False, PG_LEVEL_4K
                f = mm._fault_flags(vma, write_fault)
                mm._alloc_fill(vma, i, i + 1, f)
                return vma.pfn.item(i), bool(write_fault or f & PTE_WRITE), PG_LEVEL_4K
            finally:
                mm._owner = None
                mm._guard.release()
        return _hva_to_pfn_general(mm, hva, write_fault)
    bits = PTE_YOUNG | PTE_DIRTY if write_fault else PTE_YOUNG
    level = PG_LEVEL_4K
    if vma.thp or vma.hugetlb:
        # only these VMAs get huge leaves: every page of one gets the bits
        j0, j1 = vma.leaf_span(i)
        if j1 - j0 > 1:
            pte[j0:j1] |= bits                  # one ufunc call: atomic under the GIL
            level = PG_LEVEL_2M if j1 - j0 == 1 << 9 else PG_LEVEL_1G
        elif f & bits != bits:
            _set_pte_bits(pte, i, bits)
    elif f & bits != bits:
        _set_pte_bits(pte, i, bits)
    return vma.pfn.item(i), (f & PTE_WRITE) != 0, level


def _hva_to_pfn_general(mm: HostMm, hva: int, write_fault: bool) -> tuple[int, bool, int]:
    pfn, writable = hva_to_pfn(mm, hva, write_fault=write_fault, want_writable=True)
    return pfn, writable, 0


def _vma_at(mm: HostMm, vmas: list, hva: int) -> Vma | None:
    """``find_vma`` for the scalar fault paths (``vmas`` is ``mm.vmas``, with
    more than one VMA): the VMA the last lookup found when ``hva`` is in it
    (the kernel's per-mm VMA cache), else the search.  The hint is kept
    with the ``vma_gen`` it was found under: after any change of the VMA
    list (mmap, munmap, exit) it never matches, so a removed VMA is never
    answered."""
    c = mm._vma_hint
    if c is not None and c[0] == mm.vma_gen:
        v = c[1]
        if v.start <= hva < v.end:
            return v
    v = mm.find_vma(hva)
    if v is not None:
        mm._vma_hint = (mm.vma_gen, v)
    return v


#: Serializes the read-modify-write of one PTE's flags by fault threads
#: (another vCPU thread faulting the same page must not undo a dirty bit).
_pte_bits_lock = threading.Lock()


def _set_pte_bits(pte, i, bits):
    _pte_bits_lock.acquire()
    pte[i] = pte.item(i) | bits                 # cannot raise: i is in range
    _pte_bits_lock.release()


def hva_to_pfn(mm: HostMm, hva: int, *, write_fault: bool, want_writable: bool = True,
               no_wait: bool = False) -> tuple[int, bool]:
    """KVM's ``hva_to_pfn`` (virt/kvm/kvm_main.c) on a simulated mm.

    1. GUP fast (no fault): a present PTE that is writable, or any present PTE
       for a read fault, gives its pfn; KVM may map it writable iff the PTE is
       writable and ``want_writable``.
    2. Otherwise GUP slow: :meth:`HostMm.handle_mm_fault` with ``write_fault``
       (zero page for a first read, swap-in, COW...), then the same answer.
       With ``no_wait`` (async page faults, pre-fault without I/O) a swapped
       page gives ``KVM_PFN_ERR_NEEDS_IO`` instead.

    Returns ``(pfn, writable)``, or ``(KVM_PFN_ERR_FAULT, False)`` when the
    address has no VMA or a write hits a read-only VMA, and
    ``(KVM_PFN_ERR_HWPOISON, False)`` for a poisoned page.
    """
    vma = mm.find_vma(hva)
    if vma is not None:
        i = vma.idx(hva)
        f = int(vma.pte[i])
        if f & PTE_PRESENT and (f & PTE_WRITE or not write_fault):
            j0, j1 = vma.leaf_span(i)
            vma.pte[j0:j1] |= PTE_YOUNG | (PTE_DIRTY if write_fault else 0)
            return int(vma.pfn[i]), bool(want_writable and f & PTE_WRITE)
        if no_wait and f & PTE_SWAP:
            return KVM_PFN_ERR_NEEDS_IO, False
    try:
        mm.handle_mm_fault(hva, write_fault)
    except HostFaultError as e:
        return (KVM_PFN_ERR_HWPOISON if e.kind == "hwpoison" else KVM_PFN_ERR_FAULT), False
    vma = mm.find_vma(hva)
    i = vma.idx(hva)
    f = int(vma.pte[i])
    return int(vma.pfn[i]), bool(write_fault or (want_writable and f & PTE_WRITE))
