"""The walker against the live kernel's (differential; skipped without /dev/kvm + tracefs).

One 64-bit guest runs a series of probes.  Each probe is a single access
(read, write or instruction fetch of a fresh page whose PTE has the probe's
flags), at ring 0 -- executed by KVM's instruction emulator, whose every
memory access is a software walk -- or at ring 3, which runs on KVM's
shadow page tables, so that the access is walked by the shadow page-fault
path.  A #PF goes to a guest handler (``hlt``), which leaves the error code
on its stack and the address in CR2.

For every probe the kvmmmu model must reproduce, from a copy of the initial
guest memory:

* every walk the kernel traced during the probe (``kvm_mmu_pagetable_walk``
  with its address and access, then the same ``kvm_mmu_paging_element``,
  ``kvm_mmu_set_accessed_bit``, ``kvm_mmu_set_dirty_bit`` and
  ``kvm_mmu_walker_error`` lines, text for text);
* the guest-visible #PF error code and address of the probed access (from
  the handler's stack and CR2);
* and at the end, the page tables byte for byte (the same A/D bits).

The model is configured from the CPUID the vCPU was given
(:func:`kvmmmu.live.host_guest_model`).  This host runs long mode only, so
2-level and PAE paging are covered by tests/test_paging*.py alone.
"""
import struct

import numpy as np
import pytest

from kvmmmu import live
from kvmmmu import mmutrace as tp
from kvmmmu import paging as P
from kvmmmu.live import asm

pytestmark = pytest.mark.live

WALKER_EVENTS = {ev.name for ev in tp.EVENTS[:5]}
MEM_SIZE = 8 << 20
PML4, PDPT, PD, PT0, PT_PROBE, PT_NOWRITE = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000
STACK = 0x8000
PF_HANDLER, GP_HANDLER, DF_HANDLER = 0x9000, 0x9100, 0x9200
USER_CODE, SUP_CODE = 0x10000, 0x20000
FRAME = 0x300000                      # every probe page maps this frame (full of hlt)
PROBE_BASE, NOWRITE_BASE = 0x400000, 0x600000
PR, RW, US, A, D, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63
U3 = P.PFERR_USER_MASK
W_, F_ = P.PFERR_WRITE_MASK, P.PFERR_FETCH_MASK

# (name, leaf flags, table, cpl, kind, setup kwargs, expected error code or None)
PROBES = [
    ("user read", PR | RW | US, "probe", 3, "read", {}, None),
    ("user write, clean page", PR | RW | US, "probe", 3, "write", {}, None),
    ("user write, A and D preset", PR | RW | US | A | D, "probe", 3, "write", {}, None),
    ("user write to read-only", PR | US, "probe", 3, "write", {}, 1 | W_ | U3),
    ("user read of supervisor page", PR | RW, "probe", 3, "read", {}, 1 | U3),
    ("user read, not present", 0, "probe", 3, "read", {}, U3),
    ("user write, not present", RW | US, "probe", 3, "write", {}, W_ | U3),
    ("user fetch of NX page", PR | RW | US | NX, "probe", 3, "fetch", {}, 1 | U3 | F_),
    ("user fetch", PR | US, "probe", 3, "fetch", {}, None),
    ("user read, bit 51 reserved", PR | RW | US | (1 << 51), "probe", 3, "read", {}, 1 | 8 | U3),
    ("user write under a read-only PDE", PR | RW | US, "nowrite", 3, "write", {}, 1 | W_ | U3),
    ("user read under a read-only PDE", PR | RW | US, "nowrite", 3, "read", {}, None),
    ("emulated read", PR | RW, "probe", 0, "read", {}, None),
    ("emulated write", PR | RW, "probe", 0, "write", {}, None),
    ("emulated write to read-only, CR0.WP=1", PR, "probe", 0, "write", {}, 1 | W_),
    ("emulated write to read-only, CR0.WP=0", PR, "probe", 0, "write", dict(wp=False), None),
    ("emulated read of user page, SMAP", PR | RW | US, "probe", 0, "read", dict(smap=True), 1),
    ("emulated read of user page, SMAP, AC=1", PR | RW | US, "probe", 0, "read",
     dict(smap=True, ac=True), None),
    ("emulated fetch of user page, SMEP", PR | RW | US, "probe", 0, "fetch", dict(smep=True),
     1 | F_),
    ("emulated fetch of NX page", PR | RW | NX, "probe", 0, "fetch", {}, 1 | F_),
    ("emulated read of NX page, EFER.NXE=0", PR | RW | NX, "probe", 0, "read", dict(nxe=False),
     1 | 8),
    ("emulated read, not present", 0, "probe", 0, "read", {}, 0),
    ("emulated read, 2 MiB page", None, "2m", 0, "read", {}, None),
    ("emulated write, 1 GiB page (no GBPAGES)", None, "1g", 0, "write", {}, None),
    ("emulated read, PML4E bit 7", None, "pml4ps", 0, "read", {}, 1 | 8),
]


def _identity_tables(ram, gbpages):
    q = lambda gpa, v: struct.pack_into("<Q", ram, gpa, v)
    q(PML4, PDPT | PR | RW | US)
    q(PDPT, PD | PR | RW | US)
    q(PD, PT0 | PR | RW | US)
    for i in range(512):
        user = USER_CODE <= i << 12 < USER_CODE + 0x10000
        q(PT0 + 8 * i, (i << 12) | PR | RW | (US if user else 0))
    q(PD + 8 * 1, 0x200000 | PR | RW | PS)                  # identity 2 MiB page (FRAME)
    q(PD + 8 * 2, PT_PROBE | PR | RW | US)
    q(PD + 8 * 3, PT_NOWRITE | PR | US)                      # read-only PDE
    q(PD + 8 * 4, FRAME & ~0x1fffff | PR | RW | PS)          # a 2 MiB probe page
    q(PDPT + 8 * 1, 0x40000000 | PR | RW | PS)               # 1 GiB page
    q(PML4 + 8 * 1, PDPT | PR | RW | PS)                     # bit 7 is reserved in a PML4E
    ram[FRAME:FRAME + 0x1000] = 0xF4


def _target(i, probe, ram):
    """Write probe `i`'s leaf and return its gva.

    Each probe gets its own group of 8 PTEs: the shadow MMU prefetches the
    accessed neighbours of a faulting PTE within its group of 8, and a
    prefetched page would not be walked at all.
    """
    name, flags, table, *_ = probe
    i *= 8
    if table == "probe":
        struct.pack_into("<Q", ram, PT_PROBE + 8 * i, FRAME | flags if flags else 0)
        return PROBE_BASE + (i << 12)
    if table == "nowrite":
        struct.pack_into("<Q", ram, PT_NOWRITE + 8 * i, FRAME | flags)
        return NOWRITE_BASE + (i << 12)
    return {"2m": (4 << 21) | 0x123, "1g": (1 << 30) | 0x456, "pml4ps": 1 << 39}[table]


def _code(kind, gva):
    body = {"read": asm.read(gva), "write": asm.write(gva), "fetch": asm.fetch(gva)}[kind]
    return body + asm.hlt


def _split_walks(events):
    """Group walker events into walks: [(addr, pferr, [lines])]."""
    walks = []
    for ev, text in events:
        if ev not in WALKER_EVENTS:
            continue
        if ev == "kvm_mmu_pagetable_walk":
            f = text.split()
            walks.append((int(f[1], 16), int(f[3], 16), []))
        walks[-1][2].append(f"{ev}: {text}")
    return walks


@pytest.fixture(scope="module")
def host():
    reason = live.problem(tracing=False)
    if reason:
        pytest.skip(reason)
    if live.tracefs_problem() and not live.mount_tracefs():
        pytest.skip(live.tracefs_problem())
    if live.tracefs_problem():
        pytest.skip(live.tracefs_problem())
    params = live.kvm_params()
    return params


def test_walks_match_the_kernel(host):
    results = []
    with live.Kvm() as kvm, kvm.create_vm() as vm:
        vm.set_tss_addr(0x7FFBD000)
        ram = vm.add_memory(0, MEM_SIZE)
        cpu = vm.create_vcpu()
        cpu.set_cpuid(kvm.supported_cpuid())
        model = live.host_guest_model(cpu)
        _identity_tables(ram, model.gbpages)
        live.write_tables(ram, {14: PF_HANDLER, 13: GP_HANDLER, 8: DF_HANDLER}, stack=STACK)
        ram[PF_HANDLER] = ram[GP_HANDLER] = ram[DF_HANDLER] = 0xF4
        targets = [_target(i, p, ram) for i, p in enumerate(PROBES)]
        model_ram = ram.copy()
        model_mem = P.GuestMemory(model_ram)

        with live.TraceInstance(sorted(WALKER_EVENTS), buffer_size_kb=4096) as tr:
            for probe, gva in zip(PROBES, targets):
                name, flags, table, cpl, kind, kw, expected = probe
                code_at = USER_CODE if cpl == 3 else SUP_CODE
                code = _code(kind, gva)
                ram[code_at:code_at + len(code)] = np.frombuffer(code, np.uint8)
                model_ram[code_at:code_at + len(code)] = np.frombuffer(code, np.uint8)
                tr.clear()
                state = live.setup_guest(cpu, "4level", cr3=PML4, rip=code_at, rsp=STACK - 0x800,
                                         cpl=cpl, **kw)
                exit_reason = cpu.run_until_stop(max_runs=20)
                regs, sregs = cpu.get_regs(), cpu.get_sregs()
                events = tr.read()
                outcome = None
                if regs.rip == PF_HANDLER + 1:
                    outcome = (struct.unpack_from("<Q", ram, regs.rsp)[0], sregs.cr2)
                results.append((probe, gva, state, cpu.exit_name, regs.rip, outcome, events))
        kernel_tables = ram[PML4:PT_NOWRITE + 0x1000].copy()

    mismatches = []
    covered = {"emulator": 0, "shadow": 0, "walks": 0, "faults": 0}
    for probe, gva, state, exit_name, rip, outcome, events in results:
        name, flags, table, cpl, kind, kw, expected = probe
        mmu = P.GuestMmu(model_mem, state, model)
        walks = _split_walks(events)
        target_walks = []
        for addr, pferr, kernel_lines in walks:
            with tp.capture(*WALKER_EVENTS) as ring:
                w = mmu.walk_addr(addr, pferr & P.ACCESS_ALLOWED)
            covered["walks"] += 1
            if ring.lines() != kernel_lines:
                mismatches.append((name, kernel_lines, ring.lines()))
            if addr == gva:
                target_walks.append((pferr, w))
        assert target_walks, f"{name}: the kernel never walked {gva:#x} ({exit_name} at {rip:#x})"
        pferr, w = target_walks[-1]
        covered["shadow" if cpl == 3 else "emulator"] += 1
        model_err = w.fault.error_code if w.fault else None
        if expected is not None or table == "probe":
            assert model_err == expected, f"{name}: model error code {model_err} != rule {expected}"
        if w.fault:
            covered["faults"] += 1
            assert outcome is not None, f"{name}: the model faults ({w.fault}), the guest did not"
            assert outcome == (w.fault.error_code, gva), f"{name}: guest #PF {outcome}, model {w.fault}"
        else:
            assert outcome is None, f"{name}: the guest took #PF {outcome}, the model did not"
    assert mismatches == [], f"{len(mismatches)} walks differ; first: {mismatches[0]}"
    # Same A/D bits: the page tables are identical byte for byte.
    diff = np.flatnonzero(kernel_tables.view(np.uint64) != model_ram[PML4:PT_NOWRITE + 0x1000].view(np.uint64))
    assert diff.size == 0, [(hex(PML4 + 8 * i), hex(kernel_tables.view(np.uint64)[i]),
                             hex(model_ram[PML4:].view(np.uint64)[i])) for i in diff[:5]]
    assert covered["shadow"] >= 10 and covered["emulator"] >= 10, covered
    assert covered["walks"] > 100 and covered["faults"] >= 12, covered
