"""kvmmmu.live objects own their file descriptors: closed by close() and by
context managers, and by a finalizer when dropped without either; a closed
object refuses use with KvmClosedError instead of reaching a recycled fd."""
import errno
import gc
import os

import pytest

from kvmmmu.live import Kvm, KvmClosedError

pytestmark = pytest.mark.live

if not os.access("/dev/kvm", os.R_OK | os.W_OK):
    pytest.skip("needs /dev/kvm", allow_module_level=True)


def _nfds():
    return len(os.listdir("/proc/self/fd"))


def _make(n_vcpus=2):
    kvm = Kvm()
    vm = kvm.create_vm()
    cpus = [vm.create_vcpu(i) for i in range(n_vcpus)]
    return kvm, vm, cpus


def test_dropping_objects_without_close_releases_every_fd():
    gc.collect()
    before = _nfds()
    for _ in range(20):
        kvm, vm, cpus = _make()
        assert _nfds() >= before + 4
        del kvm, vm, cpus
        gc.collect()
    assert _nfds() == before


def test_close_and_context_managers_release_fds_once():
    gc.collect()
    before = _nfds()
    with Kvm() as kvm:
        with kvm.create_vm() as vm:
            vm.create_vcpu(0)
        assert vm.closed and vm.vcpus == []
    assert kvm.closed and _nfds() == before
    kvm.close()                      # idempotent
    vm.close()


def test_a_closed_object_refuses_use_before_any_syscall():
    kvm, vm, (cpu, _) = _make()
    cpu.close()
    with pytest.raises(KvmClosedError) as ei:
        cpu.run()
    assert ei.value.errno == errno.EBADF and "vCPU 0" in str(ei.value)
    # the number may be reused by a new descriptor; the closed vCPU never touches it
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(KvmClosedError):
            cpu.get_regs()
    finally:
        os.close(fd)
    vm.close()
    with pytest.raises(KvmClosedError):
        vm.create_vcpu(3)
    with pytest.raises(KvmClosedError):
        vm.stats()


def test_closing_kvm_leaves_its_vms_usable_as_in_the_kernel():
    kvm, vm, (cpu, _) = _make()
    kvm.close()
    assert isinstance(vm.stats(), dict) and isinstance(cpu.stats(), dict)
    vm.close()


def test_init_called_again_is_refused_and_keeps_the_descriptor():
    from kvmmmu.live import KvmError, Vcpu, Vm
    with Kvm() as kvm, kvm.create_vm() as vm:
        fd, n = vm.fd, _nfds()
        with pytest.raises(KvmError) as e:
            vm.__init__(kvm, 3)
        assert e.value.errno == errno.EBUSY
        with pytest.raises(KvmError):
            kvm.__init__()
        assert vm.fd == fd and not vm.closed and _nfds() == n
        with pytest.raises(TypeError, match="kvm must be a Kvm"):
            Vm(None, 3)
        with pytest.raises(TypeError, match="vm must be a Vm"):
            Vcpu(kvm, 3, 0)
    assert _nfds() == n - 2


@pytest.mark.parametrize("cls", ["Kvm", "Vm", "Vcpu"])
def test_half_built_object_is_closed(cls):
    import kvmmmu.live as L
    C = getattr(L, cls)
    o = C.__new__(C)
    assert o.closed
    with pytest.raises(KvmClosedError):
        o.fd
    o.close()                       # nothing to close: no error, no fd touched
