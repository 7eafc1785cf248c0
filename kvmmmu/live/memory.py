"""Memslot, guest_memfd, memory-attribute and dirty-log ioctls on a live VM,
returning the kernel's answer as ``0`` or ``-errno`` instead of raising, so a
table of requests can be compared with :mod:`kvmmmu.memslots` one to one.

>>> from kvmmmu import live                                   # doctest: +SKIP
>>> with live.Kvm() as kvm, kvm.create_vm() as vm:
...     set_user_memory_region2(vm, 0, 0, 0, 1 << 21, 0x7f0000000000)
0
"""
from __future__ import annotations

import ctypes as C
import fcntl

from kvmmmu.live import _uapi as U

__all__ = ["kvm_userspace_memory_region2", "kvm_create_guest_memfd", "kvm_memory_attributes",
           "KVM_SET_USER_MEMORY_REGION2", "KVM_CREATE_GUEST_MEMFD", "KVM_SET_MEMORY_ATTRIBUTES",
           "set_user_memory_region", "set_user_memory_region2", "create_guest_memfd",
           "set_memory_attributes", "check_extension"]


class kvm_userspace_memory_region2(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("flags", C.c_uint32), ("guest_phys_addr", C.c_uint64),
                ("memory_size", C.c_uint64), ("userspace_addr", C.c_uint64),
                ("guest_memfd_offset", C.c_uint64), ("guest_memfd", C.c_uint32),
                ("pad1", C.c_uint32), ("pad2", C.c_uint64 * 14)]


class kvm_create_guest_memfd(C.Structure):
    _fields_ = [("size", C.c_uint64), ("flags", C.c_uint64), ("reserved", C.c_uint64 * 6)]


class kvm_memory_attributes(C.Structure):
    _fields_ = [("address", C.c_uint64), ("size", C.c_uint64), ("attributes", C.c_uint64),
                ("flags", C.c_uint64)]


assert C.sizeof(kvm_userspace_memory_region2) == 160
assert C.sizeof(kvm_create_guest_memfd) == 64
assert C.sizeof(kvm_memory_attributes) == 32

KVM_SET_USER_MEMORY_REGION2 = U._iow(0x49, C.sizeof(kvm_userspace_memory_region2))
KVM_CREATE_GUEST_MEMFD = U._iowr(0xD4, C.sizeof(kvm_create_guest_memfd))
KVM_SET_MEMORY_ATTRIBUTES = U._iow(0xD2, C.sizeof(kvm_memory_attributes))


def _fd(obj):
    return getattr(obj, "fd", obj)


def _call(fd, req, buf):
    try:
        return fcntl.ioctl(_fd(fd), req, buf, True)
    except OSError as e:
        return -e.errno


def set_user_memory_region(vm, slot, flags, gpa, size, hva) -> int:
    """``KVM_SET_USER_MEMORY_REGION``: 0 or -errno."""
    r = bytearray(bytes(U.kvm_userspace_memory_region(slot, flags, gpa, size, hva)))
    return min(_call(vm, U.KVM_SET_USER_MEMORY_REGION, r), 0)


def set_user_memory_region2(vm, slot, flags, gpa, size, hva, guest_memfd_offset=0,
                            guest_memfd=0) -> int:
    """``KVM_SET_USER_MEMORY_REGION2``: 0 or -errno."""
    r = bytearray(bytes(kvm_userspace_memory_region2(slot, flags, gpa, size, hva,
                                                     guest_memfd_offset, guest_memfd & 0xFFFFFFFF)))
    return min(_call(vm, KVM_SET_USER_MEMORY_REGION2, r), 0)


def create_guest_memfd(vm, size, flags=0) -> int:
    """``KVM_CREATE_GUEST_MEMFD``: a new fd (>= 0) or -errno."""
    return _call(vm, KVM_CREATE_GUEST_MEMFD, bytearray(bytes(kvm_create_guest_memfd(size, flags))))


def set_memory_attributes(vm, address, size, attributes, flags=0) -> int:
    """``KVM_SET_MEMORY_ATTRIBUTES``: 0 or -errno."""
    b = bytearray(bytes(kvm_memory_attributes(address, size, attributes, flags)))
    return min(_call(vm, KVM_SET_MEMORY_ATTRIBUTES, b), 0)


def check_extension(obj, cap) -> int:
    """``KVM_CHECK_EXTENSION`` on /dev/kvm or a VM fd (negative errno on failure)."""
    try:
        return fcntl.ioctl(_fd(obj), U.KVM_CHECK_EXTENSION, cap)
    except OSError as e:
        return -e.errno
