"""Reader for KVM's binary statistics (``KVM_GET_STATS_FD``).

The file holds a header, a descriptor per statistic (flags with type and
unit, exponent, size in u64s, offset, bucket size, then the name) and the
data block; the layout is the kernel's UAPI (``struct kvm_stats_header``,
``struct kvm_stats_desc``, declared in :mod:`kvmmmu.live._uapi`).
:mod:`kvmmmu.stats` returns the model's statistics in the same dict shape.
"""
from __future__ import annotations

import ctypes as C
import fcntl
import os

from kvmmmu.live import _uapi as U

__all__ = ["read_stats", "read_stats_descriptors", "read_stats_of"]


def read_stats_descriptors(fd: int) -> tuple[str, list[dict]]:
    """Parse the header and descriptors of a ``KVM_GET_STATS_FD`` file.

    Returns ``(id, descs)``: the stats id string (e.g. ``"kvm-1234"``) and,
    per statistic, ``{name, kind, unit, exponent, size, offset, bucket_size}``
    with ``offset`` absolute in the file.
    """
    hdr = U.kvm_stats_header.from_buffer_copy(os.pread(fd, C.sizeof(U.kvm_stats_header), 0))
    ident = os.pread(fd, hdr.name_size, hdr.id_offset).split(b"\0", 1)[0].decode()
    dsize = C.sizeof(U.kvm_stats_desc) + hdr.name_size
    raw = os.pread(fd, dsize * hdr.num_desc, hdr.desc_offset)
    descs = []
    for i in range(hdr.num_desc):
        chunk = raw[i * dsize:(i + 1) * dsize]
        d = U.kvm_stats_desc.from_buffer_copy(chunk[:C.sizeof(U.kvm_stats_desc)])
        kind = d.flags & U.KVM_STATS_TYPE_MASK
        unit = (d.flags & U.KVM_STATS_UNIT_MASK) >> U.KVM_STATS_UNIT_SHIFT
        descs.append(dict(
            name=chunk[C.sizeof(U.kvm_stats_desc):].split(b"\0", 1)[0].decode(),
            kind=U.KVM_STATS_TYPES.get(kind, str(kind)),
            unit=U.KVM_STATS_UNITS.get(unit, str(unit)),
            exponent=d.exponent, size=d.size, offset=hdr.data_offset + d.offset,
            bucket_size=d.bucket_size))
    return ident, descs


def read_stats(fd: int, *, descs: list[dict] | None = None) -> dict:
    """``{name: value}``; a histogram (size > 1) is a list of its buckets.

    The data block is read with one ``pread``.
    """
    if descs is None:
        _, descs = read_stats_descriptors(fd)
    if not descs:
        return {}
    lo = min(d["offset"] for d in descs)
    hi = max(d["offset"] + 8 * d["size"] for d in descs)
    block = os.pread(fd, hi - lo, lo)
    out = {}
    for d in descs:
        at = d["offset"] - lo
        vals = [int.from_bytes(block[at + 8 * i:at + 8 * i + 8], "little") for i in range(d["size"])]
        out[d["name"]] = vals[0] if d["size"] == 1 else vals
    return out


def read_stats_of(obj_fd: int) -> dict:
    """``KVM_GET_STATS_FD`` on a VM or vCPU file descriptor: ``{name: value}``.

    The stats file is opened, read once and closed.
    """
    fd = fcntl.ioctl(obj_fd, U.KVM_GET_STATS_FD)
    try:
        return read_stats(fd)
    finally:
        os.close(fd)
