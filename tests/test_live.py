"""kvmmmu.live itself: VM/vCPU plumbing, binary stats, tracefs instances
(skipped cleanly without /dev/kvm or tracefs)."""
import numpy as np
import pytest

from kvmmmu import live

pytestmark = pytest.mark.live


def test_problem_is_a_reason_or_none():
    p = live.problem()
    assert p is None or isinstance(p, str)


@pytest.mark.skipif(live.kvm_problem() is not None, reason=str(live.kvm_problem()))
def test_vm_vcpu_cpuid_stats_and_a_halting_guest():
    with live.Kvm() as kvm, kvm.create_vm() as vm:
        assert kvm.api_version == 12
        cpuid = kvm.supported_cpuid()
        assert any(fn == 0 for fn, *_ in cpuid)
        ram = vm.add_memory(0, 1 << 20)
        ram[0x1000] = 0xF4                                   # hlt, paging off
        cpu = vm.create_vcpu()
        cpu.set_cpuid(cpuid)
        model = live.host_guest_model(cpu)
        assert 32 <= model.maxphyaddr <= 52
        live.write_tables(ram, {}, long_mode=False)
        state = live.setup_guest(cpu, "nonpaging", rip=0x1000, rsp=0x8000)
        assert state.cr0 & 1 and not state.cr0 & (1 << 31)
        assert cpu.run_until_stop() == 5 and cpu.exit_name == "HLT"
        vstats, cstats = vm.stats(), cpu.stats()
        assert "mmu_cache_miss" in vstats and "exits" in cstats and cstats["exits"] >= 1
    assert isinstance(live.kvm_params(), dict)


@pytest.mark.skipif(live.problem() is not None, reason=str(live.problem()))
def test_trace_instance_is_private_and_removed():
    with live.TraceInstance(["kvm_mmu_walker_error"]) as tr:
        path = tr.path
        assert (path / "events/kvmmmu/kvm_mmu_walker_error/enable").read_text().strip() == "1"
        assert (path / "events/kvmmmu/kvm_mmu_get_page/enable").read_text().strip() == "0"
        assert tr.read() == []
    assert not path.exists()
    with pytest.raises(Exception):
        live.TraceInstance(["no_such_event"])
