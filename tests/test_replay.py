"""kvmmmu.replay: the vCPU input stream (docs/STREAM.md) and its runner.

* the parser: a valid stream round-trips through write_stream/parse_stream;
  every validation rule raises its specific error naming the line and the
  field, and nothing runs;
* the runner on mmu="tdp_mmu": a stream of entries, page faults, memslot
  changes and dirty-log calls gives the same trace lines and statistics as
  the same API calls made by hand, and the lines of the first fault are the
  kernel's (built from the stored tracefs print formats, as
  test_tdp_trace does, with values read back from the tables);
* each event reaches the call docs/STREAM.md names (a spy MMU records the
  per-vCPU calls), translations write A/D bits and dirty the table pages,
  writes go through page tracking only when asked, refused CR loads are the
  guest's #GP, memslots re-created keep their memory;
* the CLI.
"""
import json
import struct

import numpy as np
import pytest

from kvmmmu import mmutrace as tp
from kvmmmu import paging as P
from kvmmmu import replay as R
from kvmmmu.host import PTE_PRESENT, HostConfig
from kvmmmu.memslots import KVM_MEM_LOG_DIRTY_PAGES, KvmMrChange
from kvmmmu.mmu import MmuBackend
from kvmmmu.vm import RET_PF_EMULATE, RET_PF_FIXED, VM, CrLoadError, KvmParams

from test_vcpu_state import SpyMmu as VcpuStateSpy
from test_tdp_trace import changed, entry, get_page_line, host_pfn, requested, set_spte_line

MiB = 1 << 20
SMALL = 16 * MiB          # slot 1: 2 MiB, 4K host pages
PFERR_W, PFERR_U = 2, 4


@pytest.fixture(autouse=True)
def _events_off():
    tp.disable_all()
    yield
    tp.disable_all()


def dumps(o):
    return json.dumps(o, separators=(",", ":"))


def tdp_init(**extra):
    init = {"kind": "init", "version": 1, "mmu": "tdp_mmu",
            "params": {"mmio_caching": True, "nx_huge_pages": False},
            "guest_model": {"maxphyaddr": 46},
            "memslots": [{"slot": 0, "as_id": 0, "gpa": 0, "size": 8 * MiB, "flags": 0, "thp": True},
                         {"slot": 1, "as_id": 0, "gpa": SMALL, "size": 2 * MiB, "flags": 0,
                          "thp": False}],
            "memory": [{"gpa": 0x5000, "hex": "c0ffee"}],
            "vcpus": [{"id": 0, "cr0": 1, "cr3": 0, "cr4": 0, "efer": 0, "rflags": 2, "cpl": 0}]}
    init.update(extra)
    return init


TDP_EVENTS = [
    {"kind": "mark", "label": "start"},
    {"kind": "entry", "vcpu": 0},
    {"kind": "page_fault", "vcpu": 0, "addr": SMALL + 0x3000, "error_code": PFERR_W | PFERR_U},
    {"kind": "page_fault", "vcpu": 0, "addr": 0x205000, "error_code": PFERR_U},
    {"kind": "memslot", "slot": 1, "as_id": 0, "gpa": SMALL, "size": 2 * MiB,
     "flags": KVM_MEM_LOG_DIRTY_PAGES, "thp": False},
    {"kind": "page_fault", "vcpu": 0, "addr": SMALL + 0x3000, "error_code": PFERR_W | PFERR_U},
    {"kind": "get_dirty_log", "slot": 1},
    {"kind": "mark", "label": "logged"},
    {"kind": "memslot", "slot": 1, "as_id": 0, "gpa": 0, "size": 0, "flags": 0, "thp": False},
    {"kind": "entry", "vcpu": 0},
    {"kind": "page_fault", "vcpu": 0, "addr": SMALL + 0x3000, "error_code": PFERR_U},
    {"kind": "memslot", "slot": 1, "as_id": 0, "gpa": SMALL, "size": 2 * MiB, "flags": 0,
     "thp": False},
    {"kind": "entry", "vcpu": 0},
    {"kind": "page_fault", "vcpu": 0, "addr": SMALL + 0x4000, "error_code": PFERR_W | PFERR_U},
    {"kind": "mark", "label": "done"},
]


def stream_lines(init, events):
    return [dumps(init)] + [dumps(e) for e in events]


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------

def test_a_stream_round_trips_through_write_and_parse(tmp_path):
    p = tmp_path / "s.jsonl"
    s = R.write_stream(tdp_init(), TDP_EVENTS, p)
    text = p.read_text()
    assert text.splitlines() == stream_lines(tdp_init(), TDP_EVENTS) and text.endswith("\n")
    again = R.parse_stream(p)
    assert again == s == R.parse_stream(stream_lines(tdp_init(), TDP_EVENTS))
    assert again.init == tdp_init() and list(again.events) == TDP_EVENTS
    assert again.lineno(0) == 2
    # a Stream passes through; str and Path both name files
    assert R.parse_stream(again) is again and R.parse_stream(str(p)) == again


def test_write_stream_writes_nothing_for_a_bad_event(tmp_path):
    p = tmp_path / "s.jsonl"
    with pytest.raises(R.StreamFieldError) as ei:
        R.write_stream(tdp_init(), [{"kind": "entry", "vcpu": 0}, {"kind": "entry"}], p)
    assert ei.value.lineno == 3 and ei.value.field == "vcpu"
    assert not p.exists() and list(tmp_path.iterdir()) == []


def _with_event(ev, at=None):
    evs = list(TDP_EVENTS)
    evs.insert(len(evs) if at is None else at, ev)
    return stream_lines(tdp_init(), evs), (len(evs) + 1 if at is None else at + 2)


def _init_with(**changes):
    init = tdp_init()
    for k, v in changes.items():
        init[k] = v
    return init


BAD_EVENTS = [
    # (event, error class, field)
    ({"kind": "teleport", "vcpu": 0}, R.StreamFieldError, "kind"),
    ({"kind": "init", "version": 1}, R.StreamFieldError, "kind"),
    ({"kind": 3}, R.StreamFieldError, "kind"),
    ({"vcpu": 0}, R.StreamFieldError, "kind"),
    ({"kind": "page_fault", "vcpu": 0, "addr": 0}, R.StreamFieldError, "error_code"),
    ({"kind": "page_fault", "vcpu": 0, "addr": 0, "error_code": 0, "cr2": 0}, R.StreamFieldError, "cr2"),
    ({"kind": "page_fault", "vcpu": 0, "addr": "0x1000", "error_code": 0}, R.StreamFieldError, "addr"),
    ({"kind": "page_fault", "vcpu": 0, "addr": 4096.0, "error_code": 0}, R.StreamFieldError, "addr"),
    ({"kind": "page_fault", "vcpu": 0, "addr": 0, "error_code": True}, R.StreamFieldError, "error_code"),
    ({"kind": "page_fault", "vcpu": 0, "addr": -1, "error_code": 0}, R.StreamValueError, "addr"),
    ({"kind": "page_fault", "vcpu": 0, "addr": 1 << 64, "error_code": 0}, R.StreamValueError, "addr"),
    ({"kind": "page_fault", "vcpu": 1, "addr": 0, "error_code": 0}, R.StreamValueError, "vcpu"),
    ({"kind": "entry", "vcpu": None}, R.StreamFieldError, "vcpu"),
    ({"kind": "write", "vcpu": 0, "gpa": 0, "hex": "ABCD", "track": True}, R.StreamValueError, "hex"),
    ({"kind": "write", "vcpu": 0, "gpa": 0, "hex": "abc", "track": True}, R.StreamValueError, "hex"),
    ({"kind": "write", "vcpu": 0, "gpa": 0, "hex": "zz", "track": True}, R.StreamValueError, "hex"),
    ({"kind": "write", "vcpu": 0, "gpa": 0, "hex": "0x00", "track": True}, R.StreamValueError, "hex"),
    ({"kind": "write", "vcpu": 0, "gpa": 0, "hex": "", "track": True}, R.StreamValueError, "hex"),
    ({"kind": "write", "vcpu": 0, "gpa": 0, "hex": 12, "track": True}, R.StreamFieldError, "hex"),
    ({"kind": "write", "vcpu": 0, "gpa": 0, "hex": "00", "track": 1}, R.StreamFieldError, "track"),
    ({"kind": "write", "vcpu": 0, "gpa": 0, "hex": "00", "track": True, "vmm": True},
     R.StreamValueError, "vmm"),
    ({"kind": "translate", "vcpu": 0, "gva": 0, "access": 8}, R.StreamValueError, "access"),
    ({"kind": "set_cr", "vcpu": 0, "cr": 2, "value": 0}, R.StreamValueError, "cr"),
    ({"kind": "set_cr", "vcpu": 0, "cr": 8, "value": 0}, R.StreamValueError, "cr"),
    ({"kind": "set_cpl", "vcpu": 0, "cpl": 4}, R.StreamValueError, "cpl"),
    ({"kind": "set_efer", "vcpu": 0}, R.StreamFieldError, "value"),
    ({"kind": "invlpg", "vcpu": 0, "gva": [1]}, R.StreamFieldError, "gva"),
    ({"kind": "memslot", "slot": 2, "as_id": 0, "gpa": 0, "size": 0, "flags": 0, "thp": False},
     R.StreamValueError, "slot"),
    ({"kind": "memslot", "slot": 2, "as_id": 2, "gpa": 0, "size": 4096, "flags": 0, "thp": False},
     R.StreamValueError, "as_id"),
    ({"kind": "memslot", "slot": 40000, "as_id": 0, "gpa": 0, "size": 4096, "flags": 0, "thp": False},
     R.StreamValueError, "slot"),
    ({"kind": "memslot", "slot": 2, "as_id": 0, "gpa": 0x100, "size": 4096, "flags": 0, "thp": False},
     R.StreamValueError, "gpa"),
    ({"kind": "memslot", "slot": 2, "as_id": 0, "gpa": 0, "size": 100, "flags": 0, "thp": False},
     R.StreamValueError, "size"),
    ({"kind": "memslot", "slot": 2, "as_id": 0, "gpa": 0, "size": 4096, "flags": 4, "thp": False},
     R.StreamValueError, "flags"),
    ({"kind": "memslot", "slot": 2, "as_id": 0, "gpa": 0, "size": 4096, "flags": 0},
     R.StreamFieldError, "thp"),
    ({"kind": "get_dirty_log", "slot": 7}, R.StreamValueError, "slot"),
    ({"kind": "get_dirty_log", "slot": 0, "as_id": 1}, R.StreamValueError, "slot"),
    ({"kind": "clear_dirty_log", "slot": 0, "first_page": 0, "num_pages": 64, "hex": "ff"},
     R.StreamValueError, "hex"),
    ({"kind": "clear_dirty_log", "slot": 0, "first_page": 0, "num_pages": 1 << 32, "hex": "ff"},
     R.StreamValueError, "num_pages"),
    ({"kind": "mark", "label": ""}, R.StreamValueError, "label"),
    ({"kind": "mark", "label": 5}, R.StreamFieldError, "label"),
    ({"kind": "mark"}, R.StreamFieldError, "label"),
]


@pytest.mark.parametrize("ev,cls,field", BAD_EVENTS, ids=[f"{e.get('kind')}-{f}-{i}" for i, (e, _, f)
                                                           in enumerate(BAD_EVENTS)])
def test_every_bad_event_names_its_line_and_field_and_runs_nothing(ev, cls, field):
    lines, lineno = _with_event(ev, at=3)
    with pytest.raises(cls) as ei:
        R.parse_stream(lines)
    assert ei.value.lineno == lineno and ei.value.field == field
    assert f"line {lineno}" in str(ei.value) and repr(field) in str(ei.value)
    # the runner validates everything first: nothing is emitted, no VM is touched
    vm = VM("tdp_mmu", params=KvmParams(mmio_caching=True), nr_vcpus=0)
    ring = tp.subscribe(tp.RingBuffer(64))
    try:
        with pytest.raises(cls):
            R.run_stream(lines, vm=vm)
    finally:
        tp.unsubscribe(ring)
    assert len(ring) == 0 and vm.vcpus == [] and all(len(s) == 0 for s in vm.memslots)


def test_a_slot_deleted_earlier_in_the_stream_cannot_be_logged_later():
    evs = [{"kind": "memslot", "slot": 1, "as_id": 0, "gpa": 0, "size": 0, "flags": 0, "thp": False},
           {"kind": "get_dirty_log", "slot": 1}]
    with pytest.raises(R.StreamValueError) as ei:
        R.parse_stream(stream_lines(tdp_init(), evs))
    assert (ei.value.lineno, ei.value.field) == (3, "slot")
    # re-created, it exists again
    evs.insert(1, {"kind": "memslot", "slot": 1, "as_id": 0, "gpa": SMALL, "size": 4096, "flags": 1,
                   "thp": False})
    R.parse_stream(stream_lines(tdp_init(), evs))


BAD_SYNTAX = [
    ('{"kind":"entry","vcpu":0', "not valid JSON"),
    ("", "blank line"),
    ("   ", "blank line"),
    ('{"kind":"entry","vcpu":0,"vcpu":0}', "twice"),
    ('{"kind":"page_fault","vcpu":0,"addr":NaN,"error_code":0}', "not valid JSON"),
    ('[1, 2]', "JSON object"),
    ('"entry"', "JSON object"),
]


@pytest.mark.parametrize("line,msg", BAD_SYNTAX)
def test_syntax_errors_name_their_line(line, msg):
    lines = stream_lines(tdp_init(), TDP_EVENTS[:2]) + [line]
    with pytest.raises(R.StreamSyntaxError) as ei:
        R.parse_stream(lines)
    assert ei.value.lineno == 4 and ei.value.field is None and msg in str(ei.value)


def test_an_empty_stream_and_a_stream_without_init():
    with pytest.raises(R.StreamSyntaxError) as ei:
        R.parse_stream([])
    assert ei.value.lineno == 1
    with pytest.raises(R.StreamFieldError) as ei:
        R.parse_stream([dumps({"kind": "entry", "vcpu": 0})])
    assert (ei.value.lineno, ei.value.field) == (1, "kind")
    with pytest.raises(TypeError):
        R.parse_stream(42)
    with pytest.raises(TypeError):
        R.parse_stream(b"{}")
    with pytest.raises(R.StreamSyntaxError):
        R.parse_stream([b"{}"])


def _slot(**kw):
    s = {"slot": 3, "as_id": 0, "gpa": 32 * MiB, "size": 4096, "flags": 0, "thp": False}
    s.update(kw)
    return s


BAD_INITS = [
    (dict(version=2), R.StreamValueError, "version"),
    (dict(version="1"), R.StreamFieldError, "version"),
    (dict(mmu="ept"), R.StreamValueError, "mmu"),
    (dict(params={"mmio_caching": 1}), R.StreamFieldError, "params.mmio_caching"),
    (dict(params={"turbo": True}), R.StreamFieldError, "params.turbo"),
    (dict(params=[]), R.StreamFieldError, "params"),
    (dict(guest_model={"maxphyaddr": 60}), R.StreamValueError, "guest_model"),
    (dict(guest_model={"vendor": 1}), R.StreamFieldError, "guest_model.vendor"),
    (dict(host={"tdp": "svm"}), R.StreamValueError, "host"),
    (dict(host={"cores": 2}), R.StreamFieldError, "host.cores"),
    (dict(manual_dirty_log_protect=-1), R.StreamValueError, "manual_dirty_log_protect"),
    (dict(memslots=[_slot(), _slot()]), R.StreamValueError, "memslots[1].slot"),
    (dict(memslots=[_slot(), _slot(slot=4)]), R.StreamValueError, "memslots[1].gpa"),
    (dict(memslots=[_slot(size=0)]), R.StreamValueError, "memslots[0].size"),
    (dict(memslots=[_slot(gpa=5)]), R.StreamValueError, "memslots[0].gpa"),
    (dict(memslots=[_slot(flags=8)]), R.StreamValueError, "memslots[0].flags"),
    (dict(memslots=[_slot(extra=1)]), R.StreamFieldError, "memslots[0].extra"),
    (dict(memslots=[3]), R.StreamFieldError, "memslots[0]"),
    (dict(memory=[{"gpa": 12 * MiB, "hex": "00"}]), R.StreamValueError, "memory[0].gpa"),
    (dict(memory=[{"gpa": 32 * MiB + 4095, "hex": "0000"}], memslots=[_slot()]),
     R.StreamValueError, "memory[0].gpa"),
    (dict(memory=[{"gpa": 32 * MiB, "hex": ""}], memslots=[_slot()]), R.StreamValueError, "memory[0].hex"),
    (dict(memory=[{"gpa": 32 * MiB}], memslots=[_slot()]), R.StreamFieldError, "memory[0].hex"),
    (dict(vcpus=[]), R.StreamValueError, "vcpus"),
    (dict(vcpus=[{"id": 0, "cr0": 1, "cr3": 0, "cr4": 0, "efer": 0, "rflags": 2}]),
     R.StreamFieldError, "vcpus[0].cpl"),
    (dict(vcpus=[{"id": 0, "cr0": 1, "cr3": 0, "cr4": 0, "efer": 0, "rflags": 2, "cpl": 0}] * 2),
     R.StreamValueError, "vcpus[1].id"),
]


@pytest.mark.parametrize("changes,cls,field", BAD_INITS,
                         ids=[f for _, _, f in BAD_INITS])
def test_every_bad_init_field_is_named(changes, cls, field):
    init = _init_with(**changes)
    with pytest.raises(cls) as ei:
        R.parse_stream([dumps(init)])
    assert (ei.value.lineno, ei.value.field) == (1, field)


def test_a_missing_or_unknown_init_field():
    init = tdp_init()
    del init["memory"]
    with pytest.raises(R.StreamFieldError) as ei:
        R.parse_stream([dumps(init)])
    assert ei.value.field == "memory"
    with pytest.raises(R.StreamFieldError) as ei:
        R.parse_stream([dumps(tdp_init(sregs=[]))])
    assert ei.value.field == "sregs"


AMD_CPUID = [[0, 0, 0xd, 0x68747541, 0x444d4163, 0x69746e65],     # "AuthenticAMD"
             [0x80000001, 0, 0, 0, 0, (1 << 20) | (1 << 29)],       # NX, LM
             [0x80000008, 0, 43, 0, 0, 0]]


def test_the_guest_cpu_can_be_given_as_cpuid_entries():
    init = tdp_init(cpuid=AMD_CPUID, guest_model={})
    vm = R.build_vm(init)
    assert vm.vcpus[0].guest_model == P.GuestCpuModel(vendor="amd", maxphyaddr=43, gbpages=False,
                                                      nx=True, smep=False, smap=False, lm=True)
    with pytest.raises(R.StreamValueError) as ei:
        R.parse_stream([dumps(tdp_init(cpuid=AMD_CPUID))])          # and a guest_model
    assert ei.value.field == "cpuid"
    for bad, field, cls in (([[0, 0, 0, 0, 0]], "cpuid[0]", R.StreamFieldError),
                            ([[0, 0, 0, 0, 0, -1]], "cpuid[0][5]", R.StreamValueError),
                            ([[0, 0, 0, 0, 0, "0"]], "cpuid[0][5]", R.StreamFieldError),
                            ([[0x80000008, 0, 70, 0, 0, 0]], "cpuid", R.StreamValueError)):
        with pytest.raises(cls) as ei:
            R.parse_stream([dumps(tdp_init(cpuid=bad, guest_model={}))])
        assert ei.value.field == field


def test_registers_kvm_would_refuse_are_a_line_1_error():
    # long mode without CR4.PAE: KVM_SET_SREGS refuses it
    init = tdp_init(vcpus=[{"id": 0, "cr0": 0x80000011, "cr3": 0x1000, "cr4": 0,
                            "efer": 0x500, "rflags": 2, "cpl": 0}])
    with pytest.raises(R.StreamValueError) as ei:
        R.run_stream([dumps(init)])
    assert (ei.value.lineno, ei.value.field) == (1, "vcpus[0]")


# ---------------------------------------------------------------------------
# The runner on the TDP MMU
# ---------------------------------------------------------------------------

def _by_hand():
    """The TDP_EVENTS stream as direct API calls on a VM built by hand."""
    vm = VM("tdp_mmu", host=HostConfig(), params=KvmParams(mmio_caching=True, nx_huge_pages=False),
            nr_vcpus=1)
    vm.add_memory(0, 8 * MiB, slot=0, thp=True)
    vm.add_memory(SMALL, 2 * MiB, slot=1)
    vm.write_guest(0x5000, b"\xc0\xff\xee")
    v = vm.vcpus[0]
    stats = []

    def mark(label, i):
        stats.append({"label": label, "event": i, "vm": vm.stat.as_dict(),
                      "vcpus": {0: v.stat.as_dict()}})
    hva1 = vm.memslots[0].id_to_memslot(1).userspace_addr
    with tp.capture() as ring:
        mark("start", 0)
        v.vcpu_enter_guest()
        r = [v.kvm_mmu_page_fault(SMALL + 0x3000, PFERR_W | PFERR_U),
             v.kvm_mmu_page_fault(0x205000, PFERR_U)]
        vm.set_user_memory_region(1, KVM_MEM_LOG_DIRTY_PAGES, SMALL, 2 * MiB, hva1)
        r.append(v.kvm_mmu_page_fault(SMALL + 0x3000, PFERR_W | PFERR_U))
        log = vm.get_dirty_log(1)
        mark("logged", 7)
        vm.delete_memslot(1)
        v.vcpu_enter_guest()
        r.append(v.kvm_mmu_page_fault(SMALL + 0x3000, PFERR_U))
        vm.set_user_memory_region(1, 0, SMALL, 2 * MiB, hva1)
        v.vcpu_enter_guest()
        r.append(v.kvm_mmu_page_fault(SMALL + 0x4000, PFERR_W | PFERR_U))
        mark("done", 14)
    mark("end", 15)
    return ring.lines(), stats, r, log


def test_the_runner_equals_the_api_called_by_hand():
    res = R.run_stream(stream_lines(tdp_init(), TDP_EVENTS))
    lines, stats, r, log = _by_hand()
    assert res.lines == lines and len(lines) > 20
    assert res.stats == stats
    assert [s["label"] for s in res.stats] == ["start", "logged", "done", "end"]
    pf = [x for x, e in zip(res.results, TDP_EVENTS) if e["kind"] == "page_fault"]
    assert pf == r
    assert pf[:3] == [RET_PF_FIXED] * 3 and pf[3] == RET_PF_EMULATE     # the deleted slot: MMIO
    got_log = res.results[6]
    assert np.array_equal(got_log, log) and int(got_log[0]) == 1 << 3
    assert res.results[4] is KvmMrChange.KVM_MR_FLAGS_ONLY
    # the statistics say what happened between the marks
    first, second = res.stats[0]["vcpus"][0], res.stats[1]["vcpus"][0]
    assert second["pf_taken"] - first["pf_taken"] == 3
    assert res.stats[-1]["vcpus"][0]["pf_taken"] == 5
    assert res.stats[-1]["vcpus"][0]["pf_emulate"] == 1
    res.vm.audit()


def test_the_first_fault_prints_the_kernels_lines():
    """Independent expectation: the print formats of the stored tracefs
    files, values read back from the tables (test_tdp_trace's helpers)."""
    evs = [{"kind": "entry", "vcpu": 0},
           {"kind": "page_fault", "vcpu": 0, "addr": SMALL + 0x3000, "error_code": PFERR_W | PFERR_U}]
    res = R.run_stream(stream_lines(tdp_init(), evs))
    vm = res.vm
    t = vm.mmu_backend
    v = vm.vcpus[0]
    root = t.vcpu_root[v.index]
    m = vm.fmt.masks()
    NP = m["nonpresent_value"]
    rl = lambda level: root.role.replace(level=level).word  # noqa: E731
    g1 = (SMALL >> 12) + 3
    s4, t3 = entry(vm, root.sp, g1, 4)
    s3, t2 = entry(vm, root.sp, g1, 3)
    s2, t1 = entry(vm, root.sp, g1, 2)
    s1, leaf = entry(vm, root.sp, g1, 1)
    assert res.lines == [
        get_page_line(root.role.word, 0),
        requested(g1, host_pfn(vm, g1), 1),
        get_page_line(rl(3), 0), changed(0, 4, NP, t3),
        get_page_line(rl(2), 0), changed(0, 3, NP, t2),
        get_page_line(rl(1), g1 & ~511), changed(g1 & ~511, 2, NP, t1),
        changed(g1, 1, NP, leaf),
        set_spte_line(m, g1, leaf, s1, 1),
    ]
    assert res.results == [None, RET_PF_FIXED]


def test_audit_after_every_event_stops_at_the_first_violation():
    res = R.run_stream(stream_lines(tdp_init(), TDP_EVENTS), audit=True)
    assert res.results[2] == RET_PF_FIXED

    class Breaks(MmuBackend):
        """An extra MMU whose audit fails once a third hook call arrived."""
        def __init__(self):
            self.n = 0

        def kvm_arch_flush_shadow_memslot(self, slot):
            self.n += 1

        def kvm_mmu_slot_remove_write_access(self, slot, start_level):
            self.n += 1

        def audit(self):
            return ["planted"] if self.n >= 1 else []
    vm = VM("tdp_mmu", params=KvmParams(mmio_caching=True, nx_huge_pages=False), nr_vcpus=0)
    vm.register_mmu(Breaks())
    with pytest.raises(R.StreamRunError) as ei:
        R.run_stream(stream_lines(tdp_init(), TDP_EVENTS), vm=vm, audit=True)
    assert ei.value.lineno == 6 and "planted" in str(ei.value.__cause__)   # the dirty-log flag


def test_events_selects_what_is_captured():
    res = R.run_stream(stream_lines(tdp_init(), TDP_EVENTS), events=["kvm_mmu_set_spte"])
    assert res.lines and all(ln.startswith("kvm_mmu_set_spte: ") for ln in res.lines)
    with pytest.raises(tp.UnknownEventError):
        R.run_stream(stream_lines(tdp_init(), TDP_EVENTS), events=["kvm_mmu_set_sptes"])


def test_a_capture_overflow_raises_instead_of_truncating():
    with pytest.raises(R.StreamRunError) as ei:
        R.run_stream(stream_lines(tdp_init(), TDP_EVENTS), trace_capacity=4)
    assert isinstance(ei.value.__cause__, OverflowError)
    assert ei.value.lineno == 4          # the first fault (line 4) emits more than 4 records


def test_a_refused_event_stops_the_run_with_its_line():
    evs = [{"kind": "entry", "vcpu": 0},
           {"kind": "write", "vcpu": 0, "gpa": 64 * MiB, "hex": "00", "track": True},
           {"kind": "entry", "vcpu": 0}]
    with pytest.raises(R.StreamRunError) as ei:
        R.run_stream(stream_lines(tdp_init(), evs))
    e = ei.value
    assert e.lineno == 3 and e.event == evs[1] and "write" in str(e)
    assert e.result.results == [None] and e.result.lines[0].startswith("kvm_mmu_get_page")
    assert type(e.__cause__).__name__ == "GpaNotMappedError"


# ---------------------------------------------------------------------------
# Each event's call
# ---------------------------------------------------------------------------

class SpyMmu(VcpuStateSpy):
    """A shadow-flavoured fault MMU recording the per-vCPU calls (the vCPU
    state tests' spy, recording what a replayed event passes and taking
    faults)."""

    def kvm_mmu_new_pgd(self, vcpu, pgd):
        self.calls.append(("new_pgd", pgd))

    def kvm_mmu_track_write(self, vcpu, gpa, new):
        self.calls.append(("track_write", gpa, bytes(new)))

    def mmu_page_fault(self, vcpu, fault):
        self.calls.append(("fault", fault.addr, fault.error_code))
        return RET_PF_FIXED

    def check_fault_args(self, vcpu, addr, error_code):
        """(the common entry asks an indirect MMU to check a #PF's arguments)"""


LONG = {"id": 0, "cr0": P.X86_CR0_PE | P.X86_CR0_PG | P.X86_CR0_WP | (1 << 4), "cr3": 0x1000,
        "cr4": P.X86_CR4_PAE, "efer": P.EFER_LME | P.EFER_LMA | P.EFER_NX, "rflags": 2, "cpl": 0}


def _tables():
    """Identity-map 0..2 MiB with 4K pages: PML4 0x1000, PDPT 0x2000, PD 0x3000,
    PT 0x4000 (no A/D bits set)."""
    mem = [{"gpa": 0x1000, "hex": struct.pack("<Q", 0x2000 | 7).hex()},
           {"gpa": 0x2000, "hex": struct.pack("<Q", 0x3000 | 7).hex()},
           {"gpa": 0x3000, "hex": struct.pack("<Q", 0x4000 | 7).hex()},
           {"gpa": 0x4000, "hex": b"".join(struct.pack("<Q", (i << 12) | 7) for i in range(512)).hex()}]
    return mem


def shadow_init(**extra):
    init = {"kind": "init", "version": 1, "mmu": "shadow",
            "params": {"mmio_caching": False, "tdp_mmu": False}, "guest_model": {"maxphyaddr": 46},
            "memslots": [{"slot": 0, "as_id": 0, "gpa": 0, "size": 4 * MiB, "flags": 1, "thp": False}],
            "memory": _tables(), "vcpus": [dict(LONG)]}
    init.update(extra)
    return init


def spy_vm():
    vm = VM("shadow", params=KvmParams(mmio_caching=False, tdp_mmu=False), backend=None,
            nr_vcpus=0)
    spy = SpyMmu()
    vm.register_mmu(spy)
    return vm, spy


def test_each_event_makes_its_call():
    vm, spy = spy_vm()
    evs = [
        {"kind": "entry", "vcpu": 0},
        {"kind": "page_fault", "vcpu": 0, "addr": 0x7000, "error_code": PFERR_W},
        {"kind": "write", "vcpu": 0, "gpa": 0x4038, "hex": "0770000000000000", "track": True},
        {"kind": "write", "vcpu": 0, "gpa": 0x9000, "hex": "aa", "track": False},
        {"kind": "write", "vcpu": 0, "gpa": 0xa000, "hex": "bb", "track": False, "vmm": True},
        {"kind": "invlpg", "vcpu": 0, "gva": 0x7000},
        {"kind": "set_cr", "vcpu": 0, "cr": 3, "value": 0x1000 + 0x0},      # same CR3: no new pgd
        {"kind": "entry", "vcpu": 0},
        {"kind": "set_cr", "vcpu": 0, "cr": 3, "value": 0x5000},
        {"kind": "set_cr", "vcpu": 0, "cr": 0, "value": LONG["cr0"] & ~P.X86_CR0_WP},
        {"kind": "set_cr", "vcpu": 0, "cr": 4, "value": P.X86_CR4_PAE | P.X86_CR4_SMEP},
        {"kind": "set_efer", "vcpu": 0, "value": P.EFER_LME | P.EFER_LMA},
        {"kind": "set_cpl", "vcpu": 0, "cpl": 3},
        {"kind": "entry", "vcpu": 0},
        {"kind": "mark", "label": "x"},
    ]
    res = R.run_stream(stream_lines(shadow_init(), evs), vm=vm)
    assert res.vm is vm
    v = vm.vcpus[0]
    k = spy.calls.index("load")
    # set_guest_model and KVM_SET_SREGS reset the context; KVM_SET_SREGS's
    # KVM_REQ_TLB_FLUSH_GUEST syncs the roots at the first entry (shadow paging)
    assert spy.calls[:k] == ["unload", "unload", "sync_roots", "sync_prev_roots"]
    calls = spy.calls[k:]
    assert calls == [
        "load",
        ("fault", 0x7000, PFERR_W),
        ("track_write", 0x4038, bytes.fromhex("0770000000000000")),
        ("invlpg", 0x7000),
        "sync_roots",                               # KVM_REQ_MMU_SYNC from the CR3 write
        ("new_pgd", 0x5000),
        "unload",                                   # CR0.WP
        "unload",                                   # CR4.SMEP
        "unload",                                   # EFER.NX
        "sync_roots",
        "load",
    ]
    assert (v.cpu.cr3, v.cpu.cpl, v.cpu.efer & P.EFER_NX) == (0x5000, 3, 0)
    assert vm.read_guest(0x4038, 8) == bytes.fromhex("0770000000000000")
    assert vm.read_guest(0x9000, 1) == b"\xaa" and vm.read_guest(0xa000, 1) == b"\xbb"
    # tracked and KVM's own writes are dirty-logged, the VMM's is not
    log = vm.get_dirty_log(0)
    dirty = {i * 64 + b for i, w in enumerate(log) for b in range(64) if int(w) >> b & 1}
    assert dirty == {0x4, 0x9}
    assert v.stat.invlpg == 1 and v.stat.pf_taken == 1 and res.stats[0]["vcpus"][0]["invlpg"] == 1


def test_a_reload_only_entry_loads_a_root_and_leaves_the_requests():
    vm, spy = spy_vm()
    evs = [{"kind": "entry", "vcpu": 0},
           {"kind": "set_cr", "vcpu": 0, "cr": 3, "value": 0x5000},
           {"kind": "set_cr", "vcpu": 0, "cr": 0, "value": LONG["cr0"] & ~P.X86_CR0_WP},
           {"kind": "entry", "vcpu": 0, "reload_only": True}]
    R.run_stream(stream_lines(shadow_init(), evs), vm=vm)
    k = spy.calls.index("load")
    assert spy.calls[k:] == ["load", ("new_pgd", 0x5000), "unload", "load"]
    assert {"KVM_REQ_MMU_SYNC", "KVM_REQ_TLB_FLUSH_CURRENT"} <= vm.vcpus[0].requests
    R.parse_stream(stream_lines(shadow_init(), evs[:1] + [dict(evs[0], reload_only=False)]))
    with pytest.raises(R.StreamFieldError) as ei:
        R.parse_stream(stream_lines(shadow_init(), [dict(evs[0], reload_only=1)]))
    assert ei.value.field == "reload_only"


def test_translate_walks_sets_ad_and_dirties_the_tables():
    vm, spy = spy_vm()
    evs = [{"kind": "translate", "vcpu": 0, "gva": 0x7123, "access": PFERR_W},
           {"kind": "translate", "vcpu": 0, "gva": 0x400000, "access": 0},
           {"kind": "set_cpl", "vcpu": 0, "cpl": 3},
           {"kind": "translate", "vcpu": 0, "gva": 0x8000, "access": PFERR_U}]
    res = R.run_stream(stream_lines(shadow_init(), evs), vm=vm)
    assert res.results[0] == 0x7123
    fault = res.results[1]
    assert isinstance(fault, P.PageFault) and fault.address == 0x400000
    assert fault.error_code == 0                    # not present, read, supervisor
    assert res.results[3] == 0x8000
    # A on every level, D on the written leaf, as the kernel's walker writes them
    assert struct.unpack("<Q", vm.read_guest(0x1000, 8))[0] == 0x2000 | 7 | 0x20
    assert struct.unpack("<Q", vm.read_guest(0x4000 + 8 * 7, 8))[0] == 0x7000 | 7 | 0x60
    assert struct.unpack("<Q", vm.read_guest(0x4000 + 8 * 8, 8))[0] == 0x8000 | 7 | 0x20
    # the trace is the walker's, line for line what the same walks print by hand
    vm2, _ = spy_vm()
    R.build_vm(shadow_init(), vm=vm2)
    with tp.capture() as ring:
        vm2.vcpus[0].walk_addr(0x7123, PFERR_W)
        vm2.vcpus[0].walk_addr(0x400000, 0)
        vm2.vcpus[0].set_cpl(3)
        vm2.vcpus[0].walk_addr(0x8000, PFERR_U)
    assert res.lines == ring.lines()
    assert res.lines[0] == "kvm_mmu_pagetable_walk: addr 7123 pferr 2 W"
    assert "kvm_mmu_set_dirty_bit: gpa 4038" in res.lines
    assert res.lines.count("kvm_mmu_walker_error: pferr 0 ") == 1
    # the table pages written back are dirty in the logging slot
    log = vm.get_dirty_log(0)
    dirty = {i * 64 + b for i, w in enumerate(log) for b in range(64) if int(w) >> b & 1}
    assert dirty == {1, 2, 3, 4}
    assert spy.calls == ["unload", "unload"]        # the set-up's; a translation is no MMU call


def test_a_refused_cr_load_is_the_guests_gp_and_the_stream_goes_on():
    vm, spy = spy_vm()
    evs = [{"kind": "set_cr", "vcpu": 0, "cr": 0, "value": 1 << 40},
           {"kind": "set_cr", "vcpu": 0, "cr": 3, "value": 1 << 50},
           {"kind": "set_efer", "vcpu": 0, "value": 1 << 20},
           {"kind": "entry", "vcpu": 0}]
    res = R.run_stream(stream_lines(shadow_init(), evs), vm=vm)
    assert all(isinstance(r, CrLoadError) for r in res.results[:3])
    assert vm.vcpus[0].cpu.cr3 == 0x1000 and res.results[3] is None
    assert spy.calls == ["unload", "unload", "sync_roots", "sync_prev_roots", "load"]
    assert vm.vcpus[0].stat.tlb_flush == 1          # KVM_SET_SREGS's guest flush


def test_build_vm_checks_a_given_vm():
    vm, _ = spy_vm()
    with pytest.raises(R.StreamValueError) as ei:
        R.build_vm(tdp_init(), vm=vm)
    assert ei.value.field == "mmu"
    vm2 = VM("shadow", params=KvmParams(mmio_caching=True, tdp_mmu=False), backend=None)
    with pytest.raises(R.StreamValueError) as ei:
        R.build_vm(shadow_init(), vm=vm2)
    assert ei.value.field == "params.mmio_caching"
    with pytest.raises(TypeError):
        R.build_vm(shadow_init(), vm="vm")
    built = R.build_vm(shadow_init(), vm=spy_vm()[0])
    with pytest.raises(ValueError, match="already has memslots"):
        R.build_vm(shadow_init(), vm=built)


def test_build_vm_sets_model_registers_and_memory():
    init = shadow_init(guest_model={"maxphyaddr": 40, "vendor": "amd"},
                       vcpus=[dict(LONG), dict(LONG, id=5, cpl=3)])
    vm = R.build_vm(init, vm=spy_vm()[0])
    assert [v.vcpu_id for v in vm.vcpus] == [0, 5]
    assert vm.vcpus[1].guest_model == P.GuestCpuModel(maxphyaddr=40, vendor="amd")
    assert vm.vcpus[1].cpu == P.CpuState(cr0=LONG["cr0"], cr3=0x1000, cr4=P.X86_CR4_PAE,
                                         efer=LONG["efer"], rflags=2, cpl=3)
    assert vm.read_guest(0x4000 + 8 * 511, 8) == struct.pack("<Q", (511 << 12) | 7)
    # the VMM's initial writes are not dirty-logged
    assert not vm.get_dirty_log(0).any()
    # __set_sregs: changed CR0/CR3/CR4/EFER reset the MMU and ask for a guest
    # TLB flush; registers equal to a new vCPU's (paging off) do neither
    assert all("KVM_REQ_TLB_FLUSH_GUEST" in v.requests for v in vm.vcpus)
    assert "KVM_REQ_TLB_FLUSH_GUEST" not in R.build_vm(tdp_init()).vcpus[0].requests


def test_a_pae_guest_loads_its_pdptes_from_the_initial_memory():
    mem = [{"gpa": 0x1000, "hex": struct.pack("<4Q", 0x2001, 0, 0, 0).hex()}]
    pae = {"id": 0, "cr0": LONG["cr0"], "cr3": 0x1000, "cr4": P.X86_CR4_PAE, "efer": 0,
           "rflags": 2, "cpl": 0}
    vm = R.build_vm(shadow_init(memory=mem, vcpus=[pae]), vm=spy_vm()[0])
    assert vm.vcpus[0].pdptrs == (0x2001, 0, 0, 0)
    bad = [{"gpa": 0x1000, "hex": struct.pack("<Q", 0x2001 | 1 << 5 | 1 << 7).hex()}]
    with pytest.raises(R.StreamValueError) as ei:
        R.build_vm(shadow_init(memory=bad, vcpus=[pae]), vm=spy_vm()[0])
    assert ei.value.field == "vcpus[0]"


def test_a_recreated_slot_keeps_its_memory_unless_fresh():
    base = [{"kind": "write", "vcpu": 0, "gpa": SMALL + 0x10, "hex": "5a5a", "track": False},
            {"kind": "memslot", "slot": 1, "as_id": 0, "gpa": 0, "size": 0, "flags": 0, "thp": False}]
    readd = {"kind": "memslot", "slot": 1, "as_id": 0, "gpa": SMALL, "size": 2 * MiB, "flags": 0,
             "thp": False}
    res = R.run_stream(stream_lines(tdp_init(), base + [readd]))
    assert res.vm.read_guest(SMALL + 0x10, 2) == b"\x5a\x5a"
    assert res.results[2] is KvmMrChange.KVM_MR_CREATE
    res = R.run_stream(stream_lines(tdp_init(), base + [dict(readd, fresh=True)]))
    assert res.vm.read_guest(SMALL + 0x10, 2) == b"\0\0"
    # another backing (THP) cannot reuse the 4K mapping: fresh memory
    res = R.run_stream(stream_lines(tdp_init(), base + [dict(readd, thp=True)]))
    assert res.vm.read_guest(SMALL + 0x10, 2) == b"\0\0"
    # a moved slot keeps its memory too
    move = dict(readd, gpa=32 * MiB)
    res = R.run_stream(stream_lines(tdp_init(), base[:1] + [move]))
    assert res.vm.read_guest(32 * MiB + 0x10, 2) == b"\x5a\x5a"
    assert res.results[1] is KvmMrChange.KVM_MR_MOVE
    # an existing slot's backing cannot change
    with pytest.raises(R.StreamRunError) as ei:
        R.run_stream(stream_lines(tdp_init(), [dict(readd, thp=True, flags=1)]))
    assert ei.value.lineno == 2 and "backing" in str(ei.value)


def _host_pte_present(vm, gpa):
    slot = vm.gfn_to_memslot(gpa >> 12)
    pte = vm.host.follow_pte(slot.userspace_addr + gpa - (slot.base_gfn << 12))
    return pte is not None and bool(pte[2] & PTE_PRESENT)


def test_writes_and_populate_fault_the_host_pages_in():
    init = tdp_init()
    vm = R.build_vm(init)
    # the VMM's store of the initial contents faulted its (THP: 2 MiB) page in, nothing else
    assert _host_pte_present(vm, 0x5000) and _host_pte_present(vm, 0x1ff000)
    assert not _host_pte_present(vm, 0x200000)
    assert vm.host.host_pfn_mapping_level(vm.memslots[0].id_to_memslot(0).userspace_addr) == 2
    assert not _host_pte_present(vm, SMALL + 0x1000)
    init["memslots"][1]["populate"] = True
    vm = R.build_vm(init)
    assert all(_host_pte_present(vm, SMALL + i * 4096) for i in range(512))
    evs = [{"kind": "write", "vcpu": 0, "gpa": 0x7ffe, "hex": "0102030405", "track": False},
           {"kind": "memslot", "slot": 2, "as_id": 0, "gpa": 32 * MiB, "size": 8192, "flags": 0,
            "thp": False, "populate": True}]
    res = R.run_stream(stream_lines(tdp_init(), evs))
    assert _host_pte_present(res.vm, 0x7000) and _host_pte_present(res.vm, 0x8000)
    assert _host_pte_present(res.vm, 32 * MiB + 4096)
    with pytest.raises(R.StreamFieldError) as ei:
        R.parse_stream(stream_lines(tdp_init(), [{"kind": "entry", "vcpu": 0, "populate": True}]))
    assert ei.value.field == "populate"


def test_clear_dirty_log_with_manual_protection():
    evs = [{"kind": "memslot", "slot": 1, "as_id": 0, "gpa": SMALL, "size": 2 * MiB, "flags": 1,
            "thp": False},
           {"kind": "entry", "vcpu": 0},
           {"kind": "page_fault", "vcpu": 0, "addr": SMALL + 0x1000, "error_code": PFERR_W | PFERR_U},
           {"kind": "page_fault", "vcpu": 0, "addr": SMALL + 0x2000, "error_code": PFERR_W | PFERR_U},
           {"kind": "get_dirty_log", "slot": 1},
           {"kind": "clear_dirty_log", "slot": 1, "first_page": 0, "num_pages": 64,
            "hex": (1 << 1).to_bytes(8, "little").hex()},
           {"kind": "get_dirty_log", "slot": 1}]
    res = R.run_stream(stream_lines(tdp_init(manual_dirty_log_protect=1), evs))
    assert int(res.results[4][0]) == 0b110 and int(res.results[6][0]) == 0b100
    # a bitmap word past the slot: KVM refuses, the run stops there
    evs[5] = dict(evs[5], first_page=512, num_pages=64)
    with pytest.raises(R.StreamRunError) as ei:
        R.run_stream(stream_lines(tdp_init(manual_dirty_log_protect=1), evs))
    assert ei.value.lineno == 7 and type(ei.value.__cause__).__name__ == "DirtyLogError"


# ---------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------

def test_cli_writes_trace_and_stats(tmp_path, capsys):
    s = tmp_path / "s.jsonl"
    R.write_stream(tdp_init(), TDP_EVENTS, s)
    out, st = tmp_path / "t.txt", tmp_path / "st.json"
    assert R.main([str(s), "--trace", str(out), "--stats", str(st)]) == 0
    res = R.run_stream(s)
    assert out.read_text().splitlines() == res.lines
    stats = json.loads(st.read_text())
    assert [x["label"] for x in stats] == ["start", "start", "logged", "done", "end"]
    assert stats[0]["event"] == -1 and stats[0]["vcpus"]["0"] == res.baseline["vcpus"][0]
    assert stats[-1]["vcpus"]["0"] == res.stats[-1]["vcpus"][0]
    capsys.readouterr()
    assert R.main([str(s), "--events", "kvm_mmu_get_page"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(ln.startswith("kvm_mmu_get_page: ") for ln in lines)


def test_cli_reports_a_bad_stream(tmp_path, capsys):
    s = tmp_path / "s.jsonl"
    s.write_text(dumps(tdp_init()) + "\n" + '{"kind":"entry"}\n')
    assert R.main([str(s)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "'vcpu'" in err
    assert R.main([str(tmp_path / "missing.jsonl")]) == 2


# ---------------------------------------------------------------------------
# Round trip of generated streams
# ---------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_u64 = st.integers(0, (1 << 64) - 1)
_hex = st.binary(min_size=1, max_size=16).map(bytes.hex)
_vcpu_events = st.one_of(
    st.builds(lambda: {"kind": "entry", "vcpu": 0}),
    st.builds(lambda a, e: {"kind": "page_fault", "vcpu": 0, "addr": a, "error_code": e}, _u64, _u64),
    st.builds(lambda g, a: {"kind": "translate", "vcpu": 0, "gva": g, "access": a}, _u64,
              st.sampled_from([0, 2, 4, 6, 16, 20, 1 << 48])),
    st.builds(lambda g, h, t: {"kind": "write", "vcpu": 0, "gpa": g, "hex": h, "track": t},
              _u64, _hex, st.booleans()),
    st.builds(lambda g: {"kind": "invlpg", "vcpu": 0, "gva": g}, _u64),
    st.builds(lambda c, v: {"kind": "set_cr", "vcpu": 0, "cr": c, "value": v},
              st.sampled_from([0, 3, 4]), _u64),
    st.builds(lambda v: {"kind": "set_efer", "vcpu": 0, "value": v}, _u64),
    st.builds(lambda c: {"kind": "set_cpl", "vcpu": 0, "cpl": c}, st.integers(0, 3)),
    st.builds(lambda n: {"kind": "get_dirty_log", "slot": 0}, st.just(0)),
    st.builds(lambda s: {"kind": "mark", "label": s}, st.text(min_size=1, max_size=8)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_vcpu_events, max_size=20))
def test_generated_streams_round_trip(tmp_path_factory, events):
    p = tmp_path_factory.mktemp("rt") / "s.jsonl"
    init = tdp_init()
    s = R.write_stream(init, events, p)
    assert R.parse_stream(p) == s and list(s.events) == events and s.init == init
    # and line by line, what json would have written
    assert p.read_text().splitlines() == stream_lines(init, events)


# ---------------------------------------------------------------------------
# mmu="shadow" (the shadow MMU as VM('shadow')'s backend)
# ---------------------------------------------------------------------------

def _shadow_stream():
    init = shadow_init()
    init["memslots"] = [{"slot": 0, "as_id": 0, "gpa": 0, "size": 4 * MiB, "flags": 0, "thp": False,
                         "populate": True}]
    init["guest_model"] = {"vendor": "amd", "maxphyaddr": 48, "gbpages": False}
    return init


def test_a_shadow_first_touch_prints_what_the_kernel_prints():
    """A ring-3 read, then a write, of one 4K page of a 4-level guest.  The
    expected lines are the kernel's for such a guest (the recorded scenario
    first_touch_4k shows the same sequence on this machine's KVM): the root
    at the entry; the walk with its A bits; the three shadow pages below the
    root; the leaf read-only (the gPTE is clean: D is tracked), then
    writable after the write walk sets D."""
    if VM("shadow", params=KvmParams(tdp_mmu=False)).mmu_backend is None:
        pytest.skip("VM('shadow') has no MMU backend")
    evs = [{"kind": "entry", "vcpu": 0},
           {"kind": "set_cpl", "vcpu": 0, "cpl": 3},
           {"kind": "page_fault", "vcpu": 0, "addr": 0x7000, "error_code": PFERR_U},
           {"kind": "entry", "vcpu": 0},
           {"kind": "page_fault", "vcpu": 0, "addr": 0x7008, "error_code": 1 | PFERR_W | PFERR_U}]
    res = R.run_stream(stream_lines(_shadow_stream(), evs), audit=True)
    sp = "kvm_mmu_get_page: sp gen 0 gfn {:x} l{} 8-byte q0 wux nxe ad root 0 sync new"
    from kvmmmu import tracediff as T
    want = [sp.format(1, 4),
            "kvm_mmu_pagetable_walk: addr 7000 pferr 4 U",
            "kvm_mmu_paging_element: pte 2007 level 4", "kvm_mmu_paging_element: pte 3007 level 3",
            "kvm_mmu_paging_element: pte 4007 level 2", "kvm_mmu_paging_element: pte 7007 level 1",
            "kvm_mmu_set_accessed_bit: gpa 1000", "kvm_mmu_set_accessed_bit: gpa 2000",
            "kvm_mmu_set_accessed_bit: gpa 3000", "kvm_mmu_set_accessed_bit: gpa 4038",
            sp.format(2, 3), sp.format(3, 2), sp.format(4, 1),
            "kvm_mmu_spte_requested: gfn 7 pfn 5 level 1",
            "kvm_mmu_set_spte: gfn 7 spte 123400a25 (r-xu) level 1 at 1038",
            "kvm_mmu_pagetable_walk: addr 7008 pferr 7 P|W|U",
            "kvm_mmu_paging_element: pte 2027 level 4", "kvm_mmu_paging_element: pte 3027 level 3",
            "kvm_mmu_paging_element: pte 4027 level 2", "kvm_mmu_paging_element: pte 7027 level 1",
            "kvm_mmu_set_dirty_bit: gpa 4038",
            "kvm_mmu_spte_requested: gfn 7 pfn 5 level 1",
            "kvm_mmu_set_spte: gfn 7 spte 123400e67 (rwxu) level 1 at 1038"]
    assert T.diff_traces(want, res.lines) is None, T.diff_traces(want, res.lines)
    assert res.results == [None, None, RET_PF_FIXED, None, RET_PF_FIXED]
    st = res.stats[-1]
    assert (st["vcpus"][0]["pf_taken"], st["vcpus"][0]["pf_fixed"], st["vcpus"][0]["tlb_flush"]) \
        == (2, 2, 1)
    assert st["vm"]["mmu_cache_miss"] == 4 and st["vm"]["pages_4k"] == 1


def test_a_shadow_stream_equals_the_api_called_by_hand():
    if VM("shadow", params=KvmParams(tdp_mmu=False)).mmu_backend is None:
        pytest.skip("VM('shadow') has no MMU backend")
    pte7 = struct.pack("<Q", 0x9000 | 7).hex()
    evs = [{"kind": "entry", "vcpu": 0},
           {"kind": "page_fault", "vcpu": 0, "addr": 0x7000, "error_code": PFERR_W},
           {"kind": "page_fault", "vcpu": 0, "addr": 0x8000, "error_code": 0},
           {"kind": "translate", "vcpu": 0, "gva": 0x4038, "access": PFERR_W},
           {"kind": "write", "vcpu": 0, "gpa": 0x4038, "hex": pte7, "track": True},
           {"kind": "invlpg", "vcpu": 0, "gva": 0x7000},
           {"kind": "mark", "label": "rewritten"},
           {"kind": "entry", "vcpu": 0},
           {"kind": "page_fault", "vcpu": 0, "addr": 0x7000, "error_code": 0},
           {"kind": "set_cr", "vcpu": 0, "cr": 3, "value": 0x1000},
           {"kind": "entry", "vcpu": 0}]
    res = R.run_stream(stream_lines(_shadow_stream(), evs), audit=True)
    vm = R.build_vm(_shadow_stream())
    v = vm.vcpus[0]
    with tp.capture() as ring:
        v.vcpu_enter_guest()
        v.kvm_mmu_page_fault(0x7000, PFERR_W)
        v.kvm_mmu_page_fault(0x8000, 0)
        v.walk_addr(0x4038, PFERR_W)
        v.kvm_page_track_write(0x4038, bytes.fromhex(pte7))
        v.kvm_mmu_invlpg(0x7000)
        mid = v.stat.as_dict()
        v.vcpu_enter_guest()
        v.kvm_mmu_page_fault(0x7000, 0)
        v.kvm_set_cr3(0x1000)
        v.vcpu_enter_guest()
    assert res.lines == ring.lines() and len(ring.lines()) > 30
    assert res.stats[0]["vcpus"][0] == mid and res.stats[-1]["vcpus"][0] == v.stat.as_dict()
    assert res.stats[-1]["vm"] == vm.stat.as_dict()
    # the guest now maps gva 0x7000 to gpa 0x9000: the model's walk says so
    assert res.vm.vcpus[0].walk_addr(0x7000, 0).gpa == 0x9000
    res.vm.audit()


def test_the_documented_init_line_runs():
    """docs/STREAM.md's example init line is a valid stream (the doc stays true)."""
    import re
    from pathlib import Path
    text = (Path(__file__).parent.parent / "docs" / "STREAM.md").read_text()
    block = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    init = "".join(ln.strip() for ln in block.splitlines())
    res = R.run_stream([init, dumps({"kind": "entry", "vcpu": 0})])
    assert res.lines == ["kvm_mmu_get_page: sp gen 0 gfn 1 l4 8-byte q0 wux nxe ad root 0 sync new"]
    # every kind the doc's event table lists is one the parser knows, and back
    kinds = set(re.findall(r"^\| `(\w+)` \|", text.split("## Events")[1].split("## Validation")[0],
                           re.M))
    assert kinds == set(R.EVENT_FIELDS)
