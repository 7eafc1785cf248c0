"""``<linux/kvm.h>`` for x86-64: ioctl numbers and structures (ctypes).

Only what :mod:`kvmmmu.live` uses.  Layouts are the kernel's UAPI (stable
ABI); sizes are asserted at import.
"""
import ctypes as C

KVMIO = 0xAE


def _ioc(direction, nr, size):
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr):
    return _ioc(0, nr, 0)


def _ior(nr, size):
    return _ioc(2, nr, size)


def _iow(nr, size):
    return _ioc(1, nr, size)


def _iowr(nr, size):
    return _ioc(3, nr, size)


class kvm_segment(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint32), ("selector", C.c_uint16),
                ("type", C.c_uint8), ("present", C.c_uint8), ("dpl", C.c_uint8),
                ("db", C.c_uint8), ("s", C.c_uint8), ("l", C.c_uint8), ("g", C.c_uint8),
                ("avl", C.c_uint8), ("unusable", C.c_uint8), ("padding", C.c_uint8)]


class kvm_dtable(C.Structure):
    _fields_ = [("base", C.c_uint64), ("limit", C.c_uint16), ("padding", C.c_uint16 * 3)]


class kvm_sregs(C.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment), ("gdt", kvm_dtable),
                ("idt", kvm_dtable), ("cr0", C.c_uint64), ("cr2", C.c_uint64),
                ("cr3", C.c_uint64), ("cr4", C.c_uint64), ("cr8", C.c_uint64),
                ("efer", C.c_uint64), ("apic_base", C.c_uint64),
                ("interrupt_bitmap", C.c_uint64 * 4)]


class kvm_regs(C.Structure):
    _fields_ = [(n, C.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_userspace_memory_region(C.Structure):
    _fields_ = [("slot", C.c_uint32), ("flags", C.c_uint32), ("guest_phys_addr", C.c_uint64),
                ("memory_size", C.c_uint64), ("userspace_addr", C.c_uint64)]


class kvm_cpuid_entry2(C.Structure):
    _fields_ = [("function", C.c_uint32), ("index", C.c_uint32), ("flags", C.c_uint32),
                ("eax", C.c_uint32), ("ebx", C.c_uint32), ("ecx", C.c_uint32),
                ("edx", C.c_uint32), ("padding", C.c_uint32 * 3)]


def kvm_cpuid2(n):
    """A ``struct kvm_cpuid2`` type with room for `n` entries."""
    class _cpuid2(C.Structure):
        _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32),
                    ("entries", kvm_cpuid_entry2 * n)]
    return _cpuid2


class kvm_stats_header(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("name_size", C.c_uint32), ("num_desc", C.c_uint32),
                ("id_offset", C.c_uint32), ("desc_offset", C.c_uint32),
                ("data_offset", C.c_uint32)]


class kvm_stats_desc(C.Structure):          # followed by char name[name_size]
    _fields_ = [("flags", C.c_uint32), ("exponent", C.c_int16), ("size", C.c_uint16),
                ("offset", C.c_uint32), ("bucket_size", C.c_uint32)]


assert C.sizeof(kvm_segment) == 24
assert C.sizeof(kvm_sregs) == 312
assert C.sizeof(kvm_regs) == 144
assert C.sizeof(kvm_userspace_memory_region) == 32
assert C.sizeof(kvm_cpuid_entry2) == 40
assert C.sizeof(kvm_stats_header) == 24
assert C.sizeof(kvm_stats_desc) == 16

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, C.sizeof(kvm_userspace_memory_region))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, C.sizeof(kvm_regs))
KVM_SET_REGS = _iow(0x82, C.sizeof(kvm_regs))
KVM_GET_SREGS = _ior(0x83, C.sizeof(kvm_sregs))
KVM_SET_SREGS = _iow(0x84, C.sizeof(kvm_sregs))
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_CPUID2 = _iowr(0x91, 8)
KVM_GET_STATS_FD = _io(0xCE)

KVM_MEM_READONLY = 1 << 1

# struct kvm_run: exit_reason at offset 8; the exit union starts at 32.
KVM_RUN_EXIT_REASON = 8
KVM_RUN_EXIT_UNION = 32
#: Size of the exit union of ``struct kvm_run`` (its padding is 256 bytes).
KVM_RUN_EXIT_UNION_SIZE = 256
EXIT_REASONS = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 11: "SET_TPR",
    12: "TPR_ACCESS", 17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT",
}
KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN = 2, 5, 6, 8
KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTERNAL_ERROR = 9, 17

# kvm_stats_desc.flags
KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNITS = {0: "none", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}
