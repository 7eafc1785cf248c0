"""kvm->stat / vcpu->stat: names and kinds, and the binary-stats reader
against a VM created on this machine's /dev/kvm."""
import os

import pytest

from kvmmmu import live
from kvmmmu import stats as S
from kvmmmu.vm import VM


def _reference_read(fd):
    """The binary stats file parsed straight from the UAPI layout with struct:
    header (flags, name_size, num_desc, id_offset, desc_offset, data_offset),
    descriptors (u32 flags, s16 exponent, u16 size, u32 offset, u32
    bucket_size, char name[name_size]), u64 values."""
    import struct
    _, name_size, num_desc, _, desc_offset, data_offset = struct.unpack(
        "<6I", os.pread(fd, 24, 0))
    out = {}
    for i in range(num_desc):
        raw = os.pread(fd, 16 + name_size, desc_offset + i * (16 + name_size))
        _, _, size, offset, _ = struct.unpack("<IhHII", raw[:16])
        name = raw[16:].split(b"\0", 1)[0].decode()
        vals = struct.unpack(f"<{size}Q", os.pread(fd, 8 * size, data_offset + offset))
        out[name] = vals[0] if size == 1 else list(vals)
    return out


def test_model_names_and_kinds_are_the_kernels():
    vm = VM()
    d = vm.stat.as_dict()
    assert list(d) == [x.name for x in S.VM_STATS_DESC]
    assert d["pages_4k"] == 0 and isinstance(d["max_mmu_rmap_size"], int)
    kinds = {x.name: x.kind for x in S.VM_STATS_DESC}
    assert kinds["pages_1g"] == "instant" and kinds["max_mmu_rmap_size"] == "peak"
    assert kinds["mmu_cache_miss"] == "cumulative"
    c = vm.vcpus[0].stat.as_dict()
    assert list(c)[:3] == ["halt_successful_poll", "halt_attempted_poll", "halt_poll_invalid"]
    assert len(c["halt_poll_success_hist"]) == S.HALT_POLL_HIST_COUNT
    assert "pf_taken" in c and "notify_window_exits" in c


def test_underflow_is_reported():
    vm = VM()
    vm.stat.data[vm.stat._off["mmu_unsync"][0]] = (1 << 64) - 1
    assert any("mmu_unsync" in p for p in vm.audit(raise_=False))


def _guest_hlt(lvm):
    ram = lvm.add_memory(0, 1 << 20)
    ram[0x1000] = 0xF4                                       # hlt, paging off
    cpu = lvm.create_vcpu()
    cpu.set_cpuid(lvm.kvm.supported_cpuid())
    live.write_tables(ram, {}, long_mode=False)
    live.setup_guest(cpu, "nonpaging", rip=0x1000, rsp=0x8000)
    return cpu


@pytest.mark.live
@pytest.mark.skipif(live.kvm_problem() is not None, reason=str(live.kvm_problem()))
def test_live_vm_stats_reader():
    """The reader returns the live kernel's counters for a VM created on
    /dev/kvm: the same dict as a plain struct-based parse written here, a superset
    of the model's names with the model's kinds, zero MMU counters on a fresh
    VM, and counters that move once a guest ran."""
    from kvmmmu.live import _uapi as U
    with live.Kvm() as kvm, kvm.create_vm() as lvm:
        fresh = S.read_live_vm_stats(lvm)
        model = VM.from_host().stat.as_dict()
        cmp = S.compare_stats(model, fresh)
        assert cmp["only_model"] == []                      # every upstream name is there
        for k in ("pages_4k", "pages_2m", "pages_1g", "mmu_shadow_zapped", "mmu_cache_miss",
                  "max_mmu_rmap_size", "mmu_unsync"):
            assert fresh[k] == 0, k
        ident, descs = S.read_stats_descriptors(_fd := _stats_fd(lvm))
        os.close(_fd)
        assert ident.startswith("kvm-")
        kinds = {d["name"]: d["kind"] for d in descs}
        for x in S.VM_STATS_DESC:
            assert kinds[x.name] == x.kind, x.name
        cpu = _guest_hlt(lvm)
        assert cpu.run_until_stop() == U.KVM_EXIT_HLT
        after = S.read_live_vm_stats(lvm)
        fd = _stats_fd(lvm)
        try:
            assert S.read_stats_fd(fd) == _reference_read(fd)   # two independent parsers agree
        finally:
            os.close(fd)
        # shadow MMU: new shadow pages count mmu_cache_miss; TDP MMU: leaves count pages_*
        assert after["mmu_cache_miss"] + after["pages_4k"] + after["pages_2m"] + after["pages_1g"] >= 1
        assert after["remote_tlb_flush_requests"] >= fresh["remote_tlb_flush_requests"]
        vc = S.read_live_vcpu_stats(cpu)
        mc = VM.from_host().vcpus[0].stat.as_dict()
        assert S.compare_stats(mc, vc)["only_model"] == []
        assert vc["exits"] >= 1 and vc["halt_exits"] + vc["exits"] >= 1
        assert isinstance(vc["halt_wait_hist"], list) and len(vc["halt_wait_hist"]) == 32
        assert vc == live.Vcpu.stats(cpu)


def _stats_fd(obj):
    import fcntl
    return fcntl.ioctl(obj.fd, 0xAECE)
