"""Memory attributes (``KVM_SET_MEMORY_ATTRIBUTES``): per-gfn attribute words
with range semantics.

The kernel keeps ``kvm->mem_attr_array``, an xarray indexed by gfn whose
entries are the attribute word (no entry = 0).  Only
``KVM_MEMORY_ATTRIBUTE_PRIVATE`` (bit 3) exists, and only VMs with private
memory (``KVM_X86_SW_PROTECTED_VM``, SNP, TDX) support it.  Attributes are
VM-wide: they belong to gfns, not to memslots, and may be set where no
memslot exists.

:class:`MemoryAttributes` stores the map as sorted, disjoint, coalesced
intervals ``[start, end) -> value`` (value != 0) in two numpy arrays, so a
64 GiB private range is one interval and "is this 2 MiB frame uniform?" is
a ``searchsorted`` for any number of frames at once.

Setting attributes (:func:`kvm_vm_set_mem_attributes`, the kernel's function
of that name in kvm_main.c) is an MMU invalidation: if the range already has
the value nothing happens at all; otherwise, for the memslots the range
overlaps, ``kvm_mmu_invalidate_begin`` + the per-slot pre-set hook
(``kvm_arch_pre_set_memory_attributes``: extend the invalidation over
straddled huge frames, unmap the old attribute's mappings), then the store,
then the per-slot post-set hook (``kvm_arch_post_set_memory_attributes``:
recompute ``KVM_LPAGE_MIXED_FLAG``) + ``kvm_mmu_invalidate_end``.  If no
memslot overlaps the range there is no begin/end and the sequence count does
not move.

Invariants: ``starts`` strictly increasing; ``starts[i] < ends[i] <=
starts[i + 1]``; ``values != 0``; adjacent intervals that touch have
different values (coalesced).
"""
from __future__ import annotations

import bisect

import numpy as np

from kvmmmu._core._checks import check_uint_array, int_arg

__all__ = ["KVM_MEMORY_ATTRIBUTE_PRIVATE", "MemoryAttributes", "InvalidMemoryAttributesError",
           "MemoryAttributesNotSupportedError",
           "kvm_supported_mem_attributes", "kvm_vm_ioctl_set_mem_attributes",
           "kvm_vm_set_mem_attributes"]

#: include/uapi/linux/kvm.h
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
_U64 = (1 << 64) - 1


class InvalidMemoryAttributesError(ValueError):
    """``KVM_SET_MEMORY_ATTRIBUTES`` rejected its arguments (-EINVAL)."""
    errno = 22


class MemoryAttributesNotSupportedError(InvalidMemoryAttributesError):
    """The kernel has no ``KVM_SET_MEMORY_ATTRIBUTES`` ioctl
    (CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES off): -ENOTTY."""
    errno = 25


class MemoryAttributes:
    """The gfn -> attribute-word map (``kvm->mem_attr_array``)."""

    def __init__(self):
        self.starts = np.empty(0, dtype=np.uint64)
        self.ends = np.empty(0, dtype=np.uint64)
        self.values = np.empty(0, dtype=np.uint64)
        # (starts array, starts, ends, values as lists) for get(); rebuilt
        # whenever starts is another array (store replaces all three)
        self._lists = None

    def __len__(self):
        return len(self.starts)

    def intervals(self) -> list[tuple[int, int, int]]:
        return [(int(a), int(b), int(v)) for a, b, v in zip(self.starts, self.ends, self.values)]

    def __repr__(self):
        body = ", ".join(f"[{a:#x}, {b:#x}): {v:#x}" for a, b, v in self.intervals()[:8])
        more = "" if len(self) <= 8 else f", ... ({len(self)} intervals)"
        return f"MemoryAttributes({body}{more})"

    def snapshot(self):
        return tuple(self.intervals())

    # -- queries -----------------------------------------------------------------
    def get(self, gfn: int) -> int:
        """``kvm_get_memory_attributes(kvm, gfn)``: a bisection of plain lists
        kept beside the arrays (every fault of a VM with private memory asks;
        a numpy call per fault costs more than the rest of the lookup)."""
        lists = self._lists
        if lists is None or lists[0] is not self.starts:
            lists = self._lists = (self.starts, self.starts.tolist(), self.ends.tolist(),
                                   self.values.tolist())
        i = bisect.bisect_right(lists[1], gfn) - 1
        if i >= 0 and gfn < lists[2][i]:
            return lists[3][i]
        return 0

    def get_array(self, gfns) -> np.ndarray:
        """Attribute words of many gfns (uint64).  ``gfns`` is a 1-d integer
        array: uint64, or a signed one whose values are all >= 0 (checked,
        never wrapped); anything else is a TypeError/ValueError."""
        g = check_uint_array("gfns", gfns)
        i = np.searchsorted(self.starts, g, side="right").astype(np.int64) - 1
        out = np.zeros(g.shape, dtype=np.uint64)
        ok = i >= 0
        ii = i[ok]
        inside = g[ok] < self.ends[ii]
        sel = np.flatnonzero(ok)[inside]
        out[sel] = self.values[ii[inside]]
        return out

    def range_has(self, start: int, end: int, mask: int, attrs: int, supported: int) -> bool:
        """``kvm_range_has_memory_attributes``: every gfn of ``[start, end)``
        has ``(attr & mask) == attrs``, where ``mask`` is first limited to the
        VM's supported attributes."""
        mask &= supported
        if attrs & ~mask:
            return False
        if end == start + 1:
            return (self.get(start) & mask) == attrs
        lo = int(np.searchsorted(self.ends, np.uint64(start), side="right"))
        hi = int(np.searchsorted(self.starts, np.uint64(end), side="left"))
        if attrs == 0:
            # no entry at all may exist in the range (the kernel checks for
            # any entry, not for entries with masked bits)
            return hi <= lo
        pos = start
        for k in range(lo, hi):
            a, b, v = int(self.starts[k]), int(self.ends[k]), int(self.values[k])
            if a > pos or (v & mask) != attrs:
                return False
            pos = b
        return pos >= end

    def uniform_frames(self, frame_starts, npages: int) -> tuple[np.ndarray, np.ndarray]:
        """For frames ``[f, f + npages)``: ``(uniform, value)`` where uniform
        means every gfn of the frame has the same attribute word (one value
        change = one interval boundary strictly inside the frame, since the
        map is coalesced)."""
        f = check_uint_array("frame_starts", frame_starts)
        bounds = np.union1d(self.starts, self.ends)
        lo = np.searchsorted(bounds, f, side="right")
        hi = np.searchsorted(bounds, f + np.uint64(npages), side="left")
        return hi <= lo, self.get_array(f)

    # -- update ------------------------------------------------------------------
    def store(self, start: int, end: int, value: int) -> None:
        """Set every gfn of ``[start, end)`` to ``value`` (0 erases), keeping
        the intervals sorted, disjoint and coalesced."""
        if end <= start:
            return
        s, e, v = self.starts, self.ends, self.values
        left = int(np.searchsorted(e, np.uint64(start), side="left"))     # first ending after start... >=
        right = int(np.searchsorted(s, np.uint64(end), side="right"))     # first starting after end
        ns, ne, nv = [], [], []
        for k in range(left, right):
            a, b, val = int(s[k]), int(e[k]), int(v[k])
            if a < start:
                ns.append(a), ne.append(start), nv.append(val)
            if b > end:
                ns.append(end), ne.append(b), nv.append(val)
        if value:
            ns.append(start), ne.append(end), nv.append(value)
        order = np.argsort(np.array(ns, dtype=np.uint64), kind="stable")
        mid_s = np.array(ns, dtype=np.uint64)[order]
        mid_e = np.array(ne, dtype=np.uint64)[order]
        mid_v = np.array(nv, dtype=np.uint64)[order]
        S = np.concatenate([s[:left], mid_s, s[right:]])
        E = np.concatenate([e[:left], mid_e, e[right:]])
        V = np.concatenate([v[:left], mid_v, v[right:]])
        # coalesce touching neighbours with equal values
        if len(S) > 1:
            join = (S[1:] == E[:-1]) & (V[1:] == V[:-1])
            if join.any():
                keep = np.ones(len(S), dtype=bool)
                keep[1:][join] = False
                # the end of each kept run is the end of its last member
                run_id = np.cumsum(keep) - 1
                newE = np.zeros(int(keep.sum()), dtype=np.uint64)
                np.maximum.at(newE, run_id, E)
                S, V, E = S[keep], V[keep], newE
        self.starts, self.ends, self.values = S, E, V

    def audit(self) -> list[str]:
        bad = []
        s, e, v = self.starts, self.ends, self.values
        if (e <= s).any():
            bad.append("memory attributes: empty interval")
        if len(s) > 1:
            if (s[1:] < e[:-1]).any():
                bad.append("memory attributes: overlapping intervals")
            if ((s[1:] == e[:-1]) & (v[1:] == v[:-1])).any():
                bad.append("memory attributes: not coalesced")
            if (np.diff(s.astype(np.int64)) <= 0).any():
                bad.append("memory attributes: starts not increasing")
        if (v == 0).any():
            bad.append("memory attributes: interval with value 0")
        return bad


def kvm_supported_mem_attributes(vm) -> int:
    """``kvm_supported_mem_attributes``: PRIVATE for VMs with private memory, else 0."""
    return KVM_MEMORY_ATTRIBUTE_PRIVATE if vm is None or vm.has_private_mem else 0


def kvm_vm_ioctl_set_mem_attributes(vm, address: int, size: int, attributes: int,
                                    flags: int = 0) -> None:
    """``KVM_SET_MEMORY_ATTRIBUTES``: validate, then :func:`kvm_vm_set_mem_attributes`.

    Raises InvalidMemoryAttributesError (EINVAL) for non-zero flags,
    unsupported attributes, an empty or wrapping range, or an unaligned
    address or size, MemoryAttributesNotSupportedError (ENOTTY) when the
    host kernel lacks the ioctl.  The VM is unchanged on error.
    """
    address = int_arg("address", address)
    size = int_arg("size", size)
    attributes = int_arg("attributes", attributes)
    flags = int_arg("flags", flags)
    if not vm.host_config.memory_attributes:
        raise MemoryAttributesNotSupportedError("KVM_SET_MEMORY_ATTRIBUTES: no such ioctl here")
    if flags:
        raise InvalidMemoryAttributesError(f"flags={flags:#x} must be 0")
    if attributes & ~kvm_supported_mem_attributes(vm):
        raise InvalidMemoryAttributesError(
            f"attributes {attributes:#x} not supported by this VM "
            f"(supported {kvm_supported_mem_attributes(vm):#x})")
    if size == 0 or address + size > _U64:
        raise InvalidMemoryAttributesError("size is 0 or address + size wraps")
    if address & 0xFFF or size & 0xFFF:
        raise InvalidMemoryAttributesError("address and size must be page aligned")
    kvm_vm_set_mem_attributes(vm, address >> 12, (address + size) >> 12, attributes)


def kvm_vm_set_mem_attributes(vm, start: int, end: int, attributes: int) -> None:
    """Set ``attributes`` for gfns ``[start, end)`` (kvm_main.c flow, see module doc)."""
    from kvmmmu.notifiers import KVM_FILTER_PRIVATE, KVM_FILTER_SHARED, KvmGfnRange
    attrs = vm.mem_attrs
    if attrs.range_has(start, end, _U64, attributes, kvm_supported_mem_attributes(vm)):
        return
    # kvm_handle_gfn_range(pre_set_range): per overlapping slot of every address space
    ranges = []
    for as_id in range(vm.nr_memslot_as_ids):
        for slot in vm.memslots[as_id].slots_in_gfn_range(start, end):
            a, b = max(start, slot.base_gfn), min(end, slot.base_gfn + slot.npages)
            if a < b:
                ranges.append(KvmGfnRange(slot=slot, start=a, end=b, may_block=True,
                                          attributes=attributes,
                                          attr_filter=KVM_FILTER_PRIVATE | KVM_FILTER_SHARED))
    notifier = vm.notifier
    flush = False
    if ranges:
        vm.mmu_lock.acquire_write()
        try:
            saved = notifier.snapshot_invalidate()
            notifier.kvm_mmu_invalidate_begin()
            try:
                for r in ranges:
                    # kvm_pre_set_memory_attributes: the range itself, unconditionally
                    notifier.kvm_mmu_invalidate_range_add(r.start, r.end)
                    flush |= vm.kvm_arch_pre_set_memory_attributes(r)
            except BaseException:
                # An MMU raised before anything was stored: the invalidation
                # is taken back (what an MMU zapped stays zapped: always safe)
                # and the attributes stay as they were.
                notifier.restore_invalidate(saved)
                vm.kvm_flush_remote_tlbs()
                raise
            if flush:
                vm.kvm_flush_remote_tlbs()
        finally:
            vm.mmu_lock.release_write()
    attrs.store(start, end, attributes)
    if ranges:
        vm.mmu_lock.acquire_write()
        try:
            notifier.kvm_mmu_invalidate_end()          # on_lock of post_set_range
            for r in ranges:
                vm.kvm_arch_post_set_memory_attributes(r)
        finally:
            vm.mmu_lock.release_write()
