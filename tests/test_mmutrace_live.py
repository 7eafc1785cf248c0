"""End-to-end check of the kvmmmu renderers against the live kernel.

Runs a few tiny 64-bit guests through /dev/kvm while the kvmmmu events are
enabled in a private tracefs instance, then reads the instance buffer twice:
once as text and once with the ``fields`` option (raw field values).  Every
event line is re-rendered by kvmmmu.mmutrace from the raw values and must
equal the kernel's text.  The instance has ``hash-ptr`` off so that ``%p``
prints the raw value, as kvmmmu does.

Needs root, /dev/kvm and a writable /sys/kernel/tracing; skipped otherwise.
The guests run through kvmmmu.live; the instance is removed afterwards.  Which events appear depends on the host
(TDP vs shadow paging, PVM, ...); the check covers whatever the kernel emits.
"""
import re
import struct
from collections import Counter

import numpy as np
import pytest

from kvmmmu import live
from kvmmmu import mmutrace as tp

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(live.problem() is not None,
                       reason=f"needs /dev/kvm and a writable tracefs with kvmmmu events: {live.problem()}"),
]

MEM_SIZE = 0x400000
CODE_GPA = 0x10000


def run_guest(code, extra_ptes=()):
    """Run `code` at 0x10000 in a 64-bit guest until HLT or shutdown.

    Guest memory 0..4 MiB; page tables at 0x1000 (PML4), 0x2000, 0x3000,
    0x4000 identity-map 0..2 MiB with 4K pages and 2..4 MiB with one 2 MiB
    page; 0x70000 is not present.  `extra_ptes` are (gva >> 12, pte) pairs
    written into the 4K page table.
    """
    with live.Kvm() as kvm, kvm.create_vm() as vm:
        vm.set_tss_addr(0x7FFBD000)
        mem = vm.add_memory(0, MEM_SIZE)
        struct.pack_into("Q", mem, 0x1000, 0x2000 | 0x7)
        struct.pack_into("Q", mem, 0x2000, 0x3000 | 0x7)
        struct.pack_into("Q", mem, 0x3000, 0x4000 | 0x7)
        struct.pack_into("Q", mem, 0x3008, 0x200000 | 0x83)
        for i in range(512):
            struct.pack_into("Q", mem, 0x4000 + 8 * i, (i << 12) | 0x3)
        struct.pack_into("Q", mem, 0x4000 + 8 * 0x70, 0)
        for index, pte in extra_ptes:
            struct.pack_into("Q", mem, 0x4000 + 8 * index, pte)
        mem[CODE_GPA:CODE_GPA + len(code)] = np.frombuffer(code, np.uint8)
        cpu = vm.create_vcpu()
        live.setup_guest(cpu, "4level", cr3=0x1000, rip=CODE_GPA, rsp=0x80000, pse=False)
        cpu.run_until_stop(max_runs=50)


GUESTS = [
    # mov rax,[0x50000]; mov [0x60000],rax; mov [0x200010],rax; hlt
    (bytes.fromhex("488b042500000500" "4889042500000600" "4889042510002000" "f4"), ()),
    # mov rax,[0x70000] (not present): #PF, no IDT -> shutdown
    (bytes.fromhex("488b042500000700" "f4"), ()),
    # mov rax,[0x72000] with a reserved PTE bit: RSVD fault
    (bytes.fromhex("488b042500200700" "f4"), ((0x72, 0x72000 | 0x3 | 1 << 51),)),
    # mov eax,0x71000; jmp rax into an NX page: fetch fault
    (bytes.fromhex("b800100700" "ffe0"), ((0x71, 0x71000 | 0x3 | 1 << 63),)),
]

FIELD_RE = re.compile(r"(\w+)=[^=]*?\((-?\d+)\)")


def _raw_values(event, fields_text):
    """Field values from a line printed with the ``fields`` option.

    Each field is printed as ``name=<something> (<decimal>)`` (or
    ``name='c'(<decimal>)`` for printable bytes); the decimal is the value
    as a C int/long long, which is reinterpreted with the field's size and
    signedness.
    """
    raw = dict(FIELD_RE.findall(fields_text))
    values = {}
    for f in event.fields:
        bits = 8 * f.size
        v = int(raw[f.name]) % (1 << bits)
        if f.signed and v >> (bits - 1):
            v -= 1 << bits
        values[f.name] = v
    return values


def test_renderers_match_live_kernel_text():
    with live.TraceInstance() as inst:
        for code, ptes in GUESTS:
            run_guest(code, ptes)
    text_lines = inst.read()
    field_lines = inst.read_fields()

    if not text_lines:
        pytest.skip("the guests produced no kvmmmu events on this host")
    assert len(text_lines) == len(field_lines)
    seen = Counter()
    mismatches = []
    for (name, text), (name2, fields_text) in zip(text_lines, field_lines):
        assert name == name2
        ev = tp.get_event(name)
        ours = ev.format(**_raw_values(ev, fields_text))
        seen[name] += 1
        if ours != text:
            mismatches.append((name, text, ours))
    assert mismatches == [], f"{len(mismatches)} of {len(text_lines)} lines differ"
    # The shadow-page text is always exercised (a root is built for every guest).
    assert seen["kvm_mmu_get_page"] >= len(GUESTS) - 1
