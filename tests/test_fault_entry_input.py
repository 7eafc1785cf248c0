"""Bad input at the common fault entry (``kvm_mmu_page_fault``), for the three
MMUs that take faults: ``VM("shadow")`` (a #PF exit), ``VM("tdp")`` and
``VM("tdp_mmu")`` (an EPT violation / misconfiguration, or a #NPF).

What can reach ``kvm_mmu_page_fault`` in the kernel (v6.18):

* shadow paging: ``kvm_handle_page_fault`` with the hardware #PF error code,
  which has P W U RSVD I/D PK SS (bits 0-6) and SGX (15); bits 7-14 and
  16-31 are reserved (KVM enables no HLAT), and the upper half is dropped
  with a WARN, so KVM's synthetic bits (IMPLICIT_ACCESS 48, PRIVATE 49)
  never arrive;
* EPT (``__vmx_handle_ept_violation``): U (read), W, F, P and GUEST_FINAL
  or GUEST_PAGE (32/33), PRIVATE_ACCESS for a TDX private gpa;
  ``handle_ept_misconfig``: RSVD alone;
* NPT (``npf_interception``): EXITINFO1 - the #PF bits P W U RSVD F SS and
  RMP (31), GUEST_FINAL/PAGE, ENC, SIZEM, VMPL, SSS (32-37) - with the
  synthetic bits cleared, PRIVATE_ACCESS for an SNP encrypted access;
* a gpa: at most 52 bits (the architectural MAXPHYADDR limit).  Above the
  host's MAXPHYADDR but below that it can arrive when KVM runs nested under
  an L0 that reports a smaller MAXPHYADDR; the kernel emulates it
  (``kvm_handle_noslot_fault``: gfn > ``kvm_mmu_max_gfn()``).

Whatever cannot arrive raises ValueError naming the argument, with every
statistic, trace line and SPTE as it was; whatever can runs as the kernel
runs it.
"""
from __future__ import annotations

import pytest

import _shadow_oracle as O
from kvmmmu import mmutrace as tp
from kvmmmu._core.defs import RET_PF_EMULATE, RET_PF_FIXED, RET_PF_SPURIOUS
from kvmmmu.host import HostConfig
from kvmmmu.mmu import (
    PFERR_GUEST_ENC_MASK, PFERR_GUEST_FINAL_MASK, PFERR_GUEST_PAGE_MASK, PFERR_GUEST_RMP_MASK,
    PFERR_IMPLICIT_ACCESS, PFERR_PRIVATE_ACCESS,
)
from kvmmmu.vm import VM

P, W, U, RSVD, F, PK, SS, SGX = 1, 2, 4, 8, 16, 32, 64, 1 << 15
A, D = 0x20, 0x40
MiB = 1 << 20
CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_NX = 1 << 8, 1 << 11


def _vm(mmu, tdp="ept"):
    """A VM with a little state; shadow: a 4-level guest mapping gva
    0..32K to gpa 0x40000.. (the tables at 0x1000..0x4000)."""
    vm = VM(mmu, host=HostConfig(tdp=tdp))
    vm.add_memory(0, 2 * MiB, slot=0, populate=True)
    v = vm.vcpus[0]
    if mmu == "shadow":
        s = lambda gpa, val: vm.write_guest(gpa, int(val).to_bytes(8, "little"))  # noqa: E731
        s(0x1000, 0x2000 | P | W | U | A)
        s(0x2000, 0x3000 | P | W | U | A)
        s(0x3000, 0x4000 | P | W | U | A)
        for i in range(8):
            s(0x4000 + 8 * i, (0x40 + i) << 12 | P | W | U | A | D)
        v.kvm_set_cr4(CR4_PAE)
        v.kvm_set_efer(EFER_LME | EFER_NX)
        v.kvm_set_cr3(0x1000)
        v.kvm_set_cr0(CR0_PE | CR0_PG | CR0_WP)
    v.vcpu_enter_guest()
    for i in range(3):
        assert v.kvm_mmu_page_fault(i << 12, W | U) == RET_PF_FIXED
    return vm, v


def _sptes(vm, v):
    sp = v.mmu_root.sp
    sp = getattr(sp, "sp", sp)           # the shadow MMU's KvmMmuPage: its arena index
    bits = 48 if vm.mmu == "shadow" else None
    return sorted((leaf.addr, leaf.spte) for leaf in O.iter_shadow(vm.arena, vm.fmt, sp, va_bits=bits))


def _state(vm, v):
    vm.stat.refresh()
    v.stat.refresh()
    return (tuple(v.stat.pf), repr(vm.stat.as_dict()), repr(v.stat.as_dict()),
            vm.snapshot(), _sptes(vm, v), vm.arena.stats()["sps"], v.mmio_gfn,
            tuple(sorted(v.requests)), list(vm.warn_sink.warnings))


def _refused(vm, v, addr, ec, word):
    before = _state(vm, v)
    with tp.capture() as ring:
        with pytest.raises(ValueError) as e:
            v.kvm_mmu_page_fault(addr, ec)
    assert word in str(e.value), e.value
    assert ring.lines() == []
    assert _state(vm, v) == before
    assert vm.audit(raise_=False) == []


# -- shadow paging: the #PF error code ---------------------------------------------

@pytest.mark.parametrize("bit", [7, 8, 11, 14, 16, 20, 31, 32, 48, 49, 63])
def test_shadow_pf_error_code_reserved_and_synthetic_bits_are_refused(bit):
    vm, v = _vm("shadow")
    _refused(vm, v, 0x5000, W | U | 1 << bit, "error_code")


@pytest.mark.parametrize("extra", [0, PK, SS, SGX, F])
def test_shadow_pf_error_code_bits_the_cpu_reports_are_taken(extra):
    """P W U RSVD F PK SS SGX come from hardware: the fault runs and counts
    (a not-present read/write fault on a present gPTE maps it)."""
    vm, v = _vm("shadow")
    taken = v.stat.pf_taken
    assert v.kvm_mmu_page_fault(0x5000, U | extra) in (RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_EMULATE)
    assert v.stat.pf_taken == taken + 1


def test_shadow_pf_with_a_refused_error_code_and_no_root_changes_nothing():
    """The check comes first: no root (no WARN either) for bad input."""
    vm = VM("shadow", host=HostConfig(tdp="ept"))
    vm.add_memory(0, 2 * MiB, slot=0, populate=True)
    v = vm.vcpus[0]
    with pytest.raises(ValueError, match="error_code"):
        v.kvm_mmu_page_fault(0x5000, 1 << 9)
    assert vm.warn_sink.warnings == [] and v.stat.pf_taken == 0


# -- TDP: EPT violation / misconfiguration, #NPF --------------------------------------

@pytest.mark.parametrize("mmu", ["tdp", "tdp_mmu"])
@pytest.mark.parametrize("bit", [5, 6, 7, 15, 31, 34, 35, 36, 37, 40, 48, 63])
def test_ept_error_code_bits_no_exit_sets_are_refused(mmu, bit):
    vm, v = _vm(mmu)
    _refused(vm, v, 0x5000, W | U | 1 << bit, "error_code")


@pytest.mark.parametrize("mmu", ["tdp", "tdp_mmu"])
@pytest.mark.parametrize("bit", [5, 7, 15, 38, 40, 48, 63])
def test_npt_error_code_bits_no_exit_sets_are_refused(mmu, bit):
    vm, v = _vm(mmu, tdp="npt")
    _refused(vm, v, 0x5000, W | U | 1 << bit, "error_code")


@pytest.mark.parametrize("mmu", ["tdp", "tdp_mmu"])
@pytest.mark.parametrize("tdp, extra", [
    ("ept", PFERR_GUEST_FINAL_MASK), ("ept", PFERR_GUEST_PAGE_MASK), ("ept", F),
    ("npt", PFERR_GUEST_FINAL_MASK), ("npt", SS), ("npt", PFERR_GUEST_RMP_MASK),
    ("npt", PFERR_GUEST_ENC_MASK), ("npt", F),
])
def test_tdp_error_code_bits_an_exit_sets_are_taken(mmu, tdp, extra):
    vm, v = _vm(mmu, tdp=tdp)
    taken, fixed = v.stat.pf_taken, v.stat.pf_fixed
    assert v.kvm_mmu_page_fault(0x5000, W | U | extra) == RET_PF_FIXED
    assert (v.stat.pf_taken, v.stat.pf_fixed) == (taken + 1, fixed + 1)


@pytest.mark.parametrize("mmu", ["tdp", "tdp_mmu"])
def test_tdp_private_access_keeps_the_kernels_path(mmu):
    """PFERR_PRIVATE_ACCESS is passed by the vendor code (TDX, SNP) and set
    by the entry itself (SW-protected): accepted; on a VM without private
    memory the fault is a memory-fault exit (-EFAULT), as in the kernel."""
    vm, v = _vm(mmu)
    r = v.kvm_mmu_page_fault(0x6000, W | PFERR_PRIVATE_ACCESS)
    assert r < 0 and v.last_fault.memory_fault_exit


@pytest.mark.parametrize("mmu", ["tdp", "tdp_mmu"])
def test_tdp_implicit_access_is_refused(mmu):
    """PFERR_IMPLICIT_ACCESS is the emulator's, for permission checks; no
    exit handler passes it (SVM clears it with a WARN)."""
    vm, v = _vm(mmu)
    _refused(vm, v, 0x5000, W | PFERR_IMPLICIT_ACCESS, "error_code")


@pytest.mark.parametrize("mmu", ["tdp", "tdp_mmu"])
@pytest.mark.parametrize("gpa", [1 << 52, (1 << 52) + 0x5000, 1 << 57, (1 << 64) - 4096])
def test_gpa_wider_than_any_maxphyaddr_is_refused(mmu, gpa):
    vm, v = _vm(mmu)
    _refused(vm, v, gpa, W | U, "cr2_or_gpa")


@pytest.mark.parametrize("mmu", ["tdp", "tdp_mmu"])
@pytest.mark.parametrize("gpa", [1 << 46, (1 << 52) - 4096])
def test_gpa_above_the_host_maxphyaddr_is_emulated(mmu, gpa):
    """Below 52 bits but above the host's MAXPHYADDR (46 here): KVM nested
    under a misreporting L0 sees it; no memslot, gfn > kvm_mmu_max_gfn():
    RET_PF_EMULATE, counted, no SPTE made."""
    vm, v = _vm(mmu)
    sptes = _sptes(vm, v)
    taken, emulate = v.stat.pf_taken, v.stat.pf_emulate
    assert v.kvm_mmu_page_fault(gpa, W | U) == RET_PF_EMULATE
    assert (v.stat.pf_taken, v.stat.pf_emulate) == (taken + 1, emulate + 1)
    assert _sptes(vm, v) == sptes


@pytest.mark.parametrize("mmu", ["shadow", "tdp", "tdp_mmu"])
def test_non_integers_are_refused(mmu):
    vm, v = _vm(mmu)
    before = _state(vm, v)
    with pytest.raises(TypeError, match="cr2_or_gpa"):
        v.kvm_mmu_page_fault(20480.0, W)
    with pytest.raises(TypeError, match="error_code"):
        v.kvm_mmu_page_fault(0x5000, "2")
    with pytest.raises(ValueError, match="error_code"):
        v.kvm_mmu_page_fault(0x5000, 1 << 64)
    assert _state(vm, v) == before
