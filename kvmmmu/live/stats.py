"""Reader for KVM's binary statistics (``KVM_GET_STATS_FD``).

The file holds a header, a descriptor per statistic (type, unit, size in
u64s, offset, name) and the data block; the layout is the kernel's UAPI
(``struct kvm_stats_header``, ``struct kvm_stats_desc``).
"""
from __future__ import annotations

import ctypes as C
import os

from kvmmmu.live import _uapi as U

__all__ = ["read_stats", "read_stats_descriptors"]


def read_stats_descriptors(fd: int) -> list[dict]:
    """The descriptors: ``[{name, type, size, offset, exponent, bucket_size}]``."""
    hdr = U.kvm_stats_header.from_buffer_copy(os.pread(fd, C.sizeof(U.kvm_stats_header), 0))
    dsize = C.sizeof(U.kvm_stats_desc) + hdr.name_size
    raw = os.pread(fd, dsize * hdr.num_desc, hdr.desc_offset)
    out = []
    for i in range(hdr.num_desc):
        chunk = raw[i * dsize:(i + 1) * dsize]
        d = U.kvm_stats_desc.from_buffer_copy(chunk[:C.sizeof(U.kvm_stats_desc)])
        name = chunk[C.sizeof(U.kvm_stats_desc):].split(b"\0", 1)[0].decode()
        out.append(dict(name=name, type=U.KVM_STATS_TYPES.get(d.flags & U.KVM_STATS_TYPE_MASK,
                                                              d.flags & U.KVM_STATS_TYPE_MASK),
                        size=d.size, offset=hdr.data_offset + d.offset, exponent=d.exponent,
                        bucket_size=d.bucket_size))
    return out


def read_stats(fd: int) -> dict:
    """``{name: value}``; a histogram (size > 1) is a list of its buckets."""
    out = {}
    for d in read_stats_descriptors(fd):
        raw = os.pread(fd, 8 * d["size"], d["offset"])
        vals = [int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(d["size"])]
        out[d["name"]] = vals[0] if d["size"] == 1 else vals
    return out
