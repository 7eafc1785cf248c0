"""A minimal /dev/kvm driver: VM, memslots, vCPU, registers, CPUID, runs, stats.

Everything goes through ``fcntl.ioctl`` on the file descriptors the kernel
hands out; guest memory is anonymous ``mmap`` memory exposed as a numpy
``uint8`` array (writes by the guest show up there directly).

Example
-------
>>> with Kvm() as kvm, kvm.create_vm() as vm:            # doctest: +SKIP
...     ram = vm.add_memory(0, 1 << 20)
...     cpu = vm.create_vcpu()
...     cpu.set_cpuid(kvm.supported_cpuid())
...     reason = cpu.run()
"""
from __future__ import annotations

import ctypes as C
import errno
import fcntl
import mmap
import os
import weakref

import numpy as np

from kvmmmu._core._checks import int_arg
from kvmmmu.live import _uapi as U
from kvmmmu.live.stats import read_stats_of

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "CpuidEntry"]


class KvmError(OSError):
    """An ioctl failed; ``errno`` is the kernel's."""


class KvmClosedError(KvmError):
    """Use of a Kvm / Vm / Vcpu after close(): refused before any syscall, so a
    recycled descriptor number is never used by mistake."""

    def __init__(self, what):
        super().__init__(errno.EBADF, f"{what} is closed")


class _Fd:
    """A descriptor owned by one object: closed by close(), or by a finalizer
    when the owner is collected without it (so nothing leaks)."""

    def __init__(self, owner, fd, *extra):
        self.num = fd
        self._fin = weakref.finalize(owner, _close_all, fd, *extra)

    @property
    def open(self):
        return self._fin.alive

    def close(self):
        self._fin()          # runs at most once


class _Unopened:
    """The descriptor of an object made with ``__new__`` but never
    initialised: closed from the start, so every use raises KvmClosedError."""
    open = False
    num = -1

    def close(self):
        pass


_UNOPENED = _Unopened()


def _fresh(obj):
    """__init__ may run once: a second call would drop (and leak) the open
    descriptor the object owns."""
    if obj._fd is not _UNOPENED:
        raise KvmError(errno.EBUSY, f"{type(obj).__name__}.__init__ called on an object "
                                    "that already owns a descriptor")


def _close_all(fd, *extra):
    for x in extra:          # mmaps of the descriptor go first
        try:
            x.close()
        except BufferError:
            pass             # a caller still holds a view: unmapped when it is collected
    os.close(fd)


def _ioctl(fd, request, arg=0, what=""):
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise KvmError(e.errno, f"{what or hex(request)}: {os.strerror(e.errno)}") from None


#: One CPUID leaf: (function, index, flags, eax, ebx, ecx, edx).
CpuidEntry = tuple


class Kvm:
    """The ``/dev/kvm`` system file descriptor.

    Parameters
    ----------
    path : str
        Device node (default ``/dev/kvm``).

    Raises
    ------
    OSError
        The device cannot be opened (not present, no permission).
    """

    _fd = _UNOPENED

    def __init__(self, path="/dev/kvm"):
        _fresh(self)
        self._fd = _Fd(self, os.open(path, os.O_RDWR | os.O_CLOEXEC))
        self.api_version = _ioctl(self.fd, U.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        self.vcpu_mmap_size = _ioctl(self.fd, U.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if `cap` is not supported."""
        return _ioctl(self.fd, U.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID`` as (function, index, flags, eax, ebx, ecx, edx)."""
        n = 64
        while True:
            buf = U.kvm_cpuid2(n)()
            buf.nent = n
            try:
                fcntl.ioctl(self.fd, U.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise KvmError(e.errno, f"KVM_GET_SUPPORTED_CPUID: {os.strerror(e.errno)}") from None
            return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in buf.entries[:buf.nent]]

    def create_vm(self, vm_type: int = 0) -> "Vm":
        """``KVM_CREATE_VM``."""
        return Vm(self, _ioctl(self.fd, U.KVM_CREATE_VM, vm_type, "KVM_CREATE_VM"))

    @property
    def fd(self) -> int:
        """The descriptor; KvmClosedError once closed."""
        if not self._fd.open:
            raise KvmClosedError("/dev/kvm")
        return self._fd.num

    @property
    def closed(self) -> bool:
        return not self._fd.open

    def close(self):
        """Close ``/dev/kvm``.  VMs created from it stay usable, as in the
        kernel (a VM file holds its own reference to KVM)."""
        self._fd.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



class Vm:
    """A VM file descriptor (from :meth:`Kvm.create_vm`).

    Attributes
    ----------
    memory : list of (gpa, ndarray)
        The memslots added with :meth:`add_memory`, in slot order.
    """

    _fd = _UNOPENED

    vcpus = ()
    _maps = ()
    memory = ()

    def __init__(self, kvm: Kvm, fd: int):
        _fresh(self)
        if not isinstance(kvm, Kvm):
            raise TypeError(f"kvm must be a Kvm, not {type(kvm).__name__}")
        fd = int_arg("fd", fd, 0, 2**31 - 1)
        self.kvm = kvm
        self.vcpu_mmap_size = kvm.vcpu_mmap_size
        self._fd = _Fd(self, fd)
        self.memory = []
        self._maps = []
        self.vcpus = []

    def set_tss_addr(self, gpa: int):
        """``KVM_SET_TSS_ADDR`` (VMX needs three pages for real-mode emulation)."""
        _ioctl(self.fd, U.KVM_SET_TSS_ADDR, gpa, "KVM_SET_TSS_ADDR")

    def add_memory(self, gpa: int, size: int, *, readonly=False) -> np.ndarray:
        """Back ``[gpa, gpa + size)`` with fresh anonymous memory (one memslot).

        Returns
        -------
        ndarray of uint8, shape (size,)
            The memory itself: host writes are seen by the guest and vice versa.
        """
        if gpa % 4096 or size % 4096 or size <= 0:
            raise ValueError("gpa and size must be page aligned, size > 0")
        m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arr = np.frombuffer(m, dtype=np.uint8)
        hva = arr.ctypes.data
        region = U.kvm_userspace_memory_region(len(self.memory), U.KVM_MEM_READONLY if readonly else 0,
                                               gpa, size, hva)
        _ioctl(self.fd, U.KVM_SET_USER_MEMORY_REGION, bytes(region), "KVM_SET_USER_MEMORY_REGION")
        self._maps.append(m)
        self.memory.append((gpa, arr))
        return arr

    def create_vcpu(self, vcpu_id: int = 0) -> "Vcpu":
        """``KVM_CREATE_VCPU`` and map its ``kvm_run`` area."""
        fd = _ioctl(self.fd, U.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        cpu = Vcpu(self, fd, vcpu_id)
        self.vcpus.append(cpu)
        return cpu

    def stats(self) -> dict:
        """The VM's binary stats (``KVM_GET_STATS_FD``) as ``{name: value}``."""
        return read_stats_of(self.fd)

    @property
    def fd(self) -> int:
        """The VM descriptor; KvmClosedError once closed."""
        if not self._fd.open:
            raise KvmClosedError("the VM")
        return self._fd.num

    @property
    def closed(self) -> bool:
        return not self._fd.open

    def close(self):
        """Close the vCPUs, the VM descriptor and the guest memory mappings."""
        for cpu in self.vcpus:
            cpu.close()
        self.vcpus = []
        self._fd.close()
        self.memory = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass                     # a caller still holds the array; GC unmaps it
        self._maps = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Vcpu:
    """A vCPU file descriptor and its ``kvm_run`` area."""

    _fd = _UNOPENED
    id = None

    def __init__(self, vm: Vm, fd: int, vcpu_id: int):
        _fresh(self)
        if not isinstance(vm, Vm):
            raise TypeError(f"vm must be a Vm, not {type(vm).__name__}")
        fd = int_arg("fd", fd, 0, 2**31 - 1)
        vcpu_id = int_arg("vcpu_id", vcpu_id, 0, 2**32 - 1)
        self.vm = vm
        self.id = vcpu_id
        try:
            self.run_area = mmap.mmap(fd, vm.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = _Fd(self, fd, self.run_area)

    # registers -------------------------------------------------------------
    def get_regs(self) -> U.kvm_regs:
        r = U.kvm_regs()
        fcntl.ioctl(self.fd, U.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: U.kvm_regs = None, **values):
        """``KVM_SET_REGS``; keyword values (``rip=..., rsp=...``) update `regs`
        (default: the current registers)."""
        r = regs if regs is not None else self.get_regs()
        for k, v in values.items():
            setattr(r, k, v)
        _ioctl(self.fd, U.KVM_SET_REGS, bytes(r), "KVM_SET_REGS")

    def get_sregs(self) -> U.kvm_sregs:
        s = U.kvm_sregs()
        fcntl.ioctl(self.fd, U.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs: U.kvm_sregs):
        _ioctl(self.fd, U.KVM_SET_SREGS, bytes(sregs), "KVM_SET_SREGS")

    def set_cpuid(self, entries):
        """``KVM_SET_CPUID2`` from (function, index, flags, eax, ebx, ecx, edx) tuples."""
        entries = list(entries)
        buf = U.kvm_cpuid2(len(entries))()
        buf.nent = len(entries)
        for i, (fn, idx, flags, a, b, c, d) in enumerate(entries):
            buf.entries[i] = U.kvm_cpuid_entry2(fn, idx, flags, a, b, c, d)
        _ioctl(self.fd, U.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_CPUID2``: the vCPU's CPUID as set (empty before set_cpuid)."""
        n = 256
        buf = U.kvm_cpuid2(n)()
        buf.nent = n
        _ioctl(self.fd, U.KVM_GET_CPUID2, buf, "KVM_GET_CPUID2")
        return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in buf.entries[:buf.nent]]

    # running ---------------------------------------------------------------
    @property
    def exit_reason(self) -> int:
        self.fd                  # KvmClosedError once closed: the mapping went with it
        return int.from_bytes(self.run_area[U.KVM_RUN_EXIT_REASON:U.KVM_RUN_EXIT_REASON + 4], "little")

    @property
    def exit_name(self) -> str:
        return U.EXIT_REASONS.get(self.exit_reason, str(self.exit_reason))

    def exit_data(self, size=64) -> bytes:
        """Raw bytes of the ``kvm_run`` exit union (its meaning depends on the exit)."""
        size = int_arg("size", size, 0, U.KVM_RUN_EXIT_UNION_SIZE)
        self.fd
        return bytes(self.run_area[U.KVM_RUN_EXIT_UNION:U.KVM_RUN_EXIT_UNION + size])

    def run(self) -> int:
        """One ``KVM_RUN``; returns the exit reason (``KVM_EXIT_*``)."""
        _ioctl(self.fd, U.KVM_RUN, 0, "KVM_RUN")
        return self.exit_reason

    def run_until_stop(self, max_runs=100,
                       stop=(U.KVM_EXIT_HLT, U.KVM_EXIT_SHUTDOWN, U.KVM_EXIT_FAIL_ENTRY,
                             U.KVM_EXIT_INTERNAL_ERROR)) -> int:
        """Run until an exit in `stop` (HLT, shutdown, entry failure, internal
        error by default), at most `max_runs` times; returns the last exit."""
        reason = -1
        for _ in range(max_runs):
            reason = self.run()
            if reason in stop:
                break
        return reason

    def stats(self) -> dict:
        """The vCPU's binary stats (``KVM_GET_STATS_FD``) as ``{name: value}``."""
        return read_stats_of(self.fd)

    @property
    def fd(self) -> int:
        """The vCPU descriptor; KvmClosedError once closed."""
        if not self._fd.open:
            raise KvmClosedError(f"vCPU {self.id}")
        return self._fd.num

    @property
    def closed(self) -> bool:
        return not self._fd.open

    def close(self):
        """Unmap ``kvm_run`` and close the descriptor (idempotent)."""
        self._fd.close()
