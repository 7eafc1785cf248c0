"""The shadow-MMU scenario recordings (tests/data/shadow_scenarios) and the live kernel.

tests/data/shadow_scenarios holds, per scenario guest of
:mod:`kvmmmu.live.scenarios`, what :mod:`kvmmmu.live.record` recorded on a host
with /dev/kvm (kvm_pvm, shadow paging): the kernel's trace, the same records
printed with raw fields, the VM/vCPU stat deltas and the derived vCPU input
stream.  Here:

* without /dev/kvm: every stored stream is well-formed JSON lines with the
  fields docs/STREAM.md requires, re-derives from its stored trace and the
  scenario's own description, and every stored kvmmmu trace line re-renders
  through :mod:`kvmmmu.mmutrace` from its raw fields;
* with /dev/kvm and tracefs (``live`` marker): re-recording each scenario
  gives the same MMU events (host addresses and pfns masked), the same
  derived stream and the same stat deltas as stored, so the stored data stay
  trustworthy.
"""
import json
import re
from pathlib import Path

import pytest

from kvmmmu import live
from kvmmmu import mmutrace as tp
from kvmmmu.live import record as R
from kvmmmu.live import scenarios as S

DATA = Path(__file__).parent / "data" / "shadow_scenarios"
NAMES = sorted(S.SCENARIOS)

#: required fields per stream event kind (docs/STREAM.md)
REQUIRED = {
    "init": {"version", "mmu", "params", "guest_model", "memslots", "memory", "vcpus"},
    "entry": {"vcpu"},
    "page_fault": {"vcpu", "addr", "error_code"},
    "translate": {"vcpu", "gva", "access"},
    "write": {"vcpu", "gpa", "hex", "track"},
    "invlpg": {"vcpu", "gva"},
    "set_cr": {"vcpu", "cr", "value"},
    "set_efer": {"vcpu", "value"},
    "set_cpl": {"vcpu", "cpl"},
    "memslot": {"slot", "as_id", "gpa", "size", "flags", "thp"},
    "get_dirty_log": {"slot"},
    "clear_dirty_log": {"slot", "first_page", "num_pages", "hex"},
    "mark": {"label"},
}
#: optional fields (docs/STREAM.md; ``reload_only`` on entry is this recorder's, see the README)
OPTIONAL = {"init": {"kind", "manual_dirty_log_protect"}, "entry": {"reload_only"},
            "write": {"vmm"}, "memslot": {"fresh"}}
HEX_RE = re.compile(r"^(?:[0-9a-f]{2})*$")
FIELD_RE = re.compile(r"(\w+)=[^=]*?\((-?\d+)\)")


def _files(name):
    return {ext: DATA / f"{name}.{ext}" for ext in ("trace", "fields", "stats.json", "stream.jsonl",
                                                    "sources.jsonl")}


def _check_hex(where, value):
    assert isinstance(value, str) and HEX_RE.match(value), f"{where}: bad hex {value!r}"


def _check_ints(where, ev, names):
    for n in names:
        if n in ev and n not in ("hex", "label", "mmu", "source", "scenario"):
            v = ev[n]
            if isinstance(v, (dict, list, str)):
                continue
            assert type(v) in (int, bool), f"{where}: {n}={v!r} is not a JSON integer"


# ---------------------------------------------------------------------------
# Without /dev/kvm
# ---------------------------------------------------------------------------

def test_every_scenario_is_stored():
    stored = {p.name.split(".")[0] for p in DATA.glob("*.stream.jsonl")}
    assert stored == set(NAMES)
    for name in NAMES:
        for ext, path in _files(name).items():
            assert path.is_file() and path.stat().st_size > 0, path
    assert (DATA / "README.md").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_stream_is_well_formed(name):
    lines = _files(name)["stream.jsonl"].read_text().splitlines()
    events = [json.loads(line) for line in lines]
    init = events[0]
    assert init["kind"] == "init" and init["version"] == 1 and init["mmu"] == "shadow"
    assert REQUIRED["init"] <= set(init) <= REQUIRED["init"] | OPTIONAL["init"]
    assert set(init["params"]) == {"mmio_caching", "eager_page_split", "nx_huge_pages", "tdp_mmu"}
    for ms in init["memslots"]:
        assert REQUIRED["memslot"] <= set(ms)
        _check_ints(f"{name} memslot", ms, ms)
    for m in init["memory"]:
        assert isinstance(m["gpa"], int)
        _check_hex(f"{name} init memory", m["hex"])
        assert any(s["gpa"] <= m["gpa"] and m["gpa"] + len(m["hex"]) // 2 <= s["gpa"] + s["size"]
                   for s in init["memslots"]), f"{name}: memory at {m['gpa']:#x} outside the memslots"
    (vcpu,) = init["vcpus"]
    assert {"id", "cr0", "cr3", "cr4", "efer", "rflags", "cpl"} <= set(vcpu)
    kinds = set()
    for i, ev in enumerate(events[1:], 2):
        where = f"{name} line {i}"
        assert ev.get("kind") in REQUIRED and ev["kind"] != "init", f"{where}: kind {ev.get('kind')}"
        assert REQUIRED[ev["kind"]] <= set(ev), f"{where}: missing {REQUIRED[ev['kind']] - set(ev)}"
        extra = set(ev) - REQUIRED[ev["kind"]] - OPTIONAL.get(ev["kind"], set()) - {"kind"}
        assert not extra, f"{where}: fields the stream format does not define: {extra}"
        _check_ints(where, ev, ev)
        if "hex" in ev:
            _check_hex(where, ev["hex"])
        if ev["kind"] == "write":
            assert not (ev["track"] and ev.get("vmm")), where
        kinds.add(ev["kind"])
    sources = R.load_stream(_files(name)["sources.jsonl"])
    assert [(x["line"], x["kind"]) for x in sources] == [(i, ev["kind"]) for i, ev in
                                                         enumerate(events, 1)]
    for x in sources:
        assert re.match(r"^(trace|marker|derived|scenario):[\w-]+$", x["source"]), x
        if "result_hex" in x:
            _check_hex(f"{name} sources", x["result_hex"])
    # every stream starts with an entry and reaches at least one fault
    assert events[1]["kind"] == "entry" and "page_fault" in kinds


def test_streams_cover_the_issue_list():
    kinds = {}
    for name in NAMES:
        for ev in R.load_stream(_files(name)["stream.jsonl"]):
            kinds.setdefault(ev["kind"], set()).add(name)
    for kind in ("entry", "page_fault", "translate", "write", "invlpg", "set_cr", "set_cpl",
                 "memslot", "get_dirty_log", "clear_dirty_log", "mark"):
        assert kind in kinds, kind
    traces = {name: R.load_trace(_files(name)["trace"]) for name in NAMES}
    seen = {e for lines in traces.values() for e, _ in lines}
    for ev in ("kvm_mmu_get_page", "kvm_mmu_set_spte", "kvm_mmu_spte_requested",
               "kvm_mmu_prepare_zap_page", "kvm_mmu_unsync_page", "kvm_mmu_sync_page",
               "kvm_mmu_zap_all_fast", "kvm_mmu_pagetable_walk", "kvm_emulate_insn", "kvm_mmio"):
        assert ev in seen, ev
    writes = [ev for name in NAMES for ev in R.load_stream(_files(name)["stream.jsonl"])
              if ev["kind"] == "write"]
    assert {(ev["track"], ev.get("vmm", False)) for ev in writes} == \
        {(True, False), (False, False), (False, True)}       # emulated, event delivery, native
    assert any("level 2" in t for e, t in traces["huge_2m_thp"] if e == "kvm_mmu_spte_requested")
    assert any(e == "kvm_mmu_walker_error" for e, t in traces["guest_page_fault"])
    assert any(" existing" in t for e, t in traces["cr3_switch"] if e == "kvm_mmu_get_page")
    assert any(" direct " in t for e, t in traces["huge_2m_4k_host"] if e == "kvm_mmu_get_page")


def _raw_values(event, fields_text):
    """Field values from a line printed with the ``fields`` option (as in
    test_mmutrace_live: ``name=<x> (<decimal>)``, reinterpreted with the
    field's size and signedness)."""
    raw = dict(FIELD_RE.findall(fields_text))
    values = {}
    for f in event.fields:
        bits = 8 * f.size
        v = int(raw[f.name]) % (1 << bits)
        if f.signed and v >> (bits - 1):
            v -= 1 << bits
        values[f.name] = v
    return values


@pytest.mark.parametrize("name", NAMES)
def test_stored_trace_rerenders(name):
    # tracefs cannot print the trace_marker records with the fields option
    text = [x for x in R.load_trace(_files(name)["trace"]) if x[0] != R.MARK_EVENT]
    fields = R.load_trace(_files(name)["fields"])
    assert [e for e, _ in text] == [e for e, _ in fields]
    n = 0
    for (ev, t), (_, f) in zip(text, fields):
        if ev not in tp._BY_NAME:
            continue
        event = tp.get_event(ev)
        assert event.format(**_raw_values(event, f)) == t, (ev, t)
        n += 1
    assert n > 20


@pytest.mark.parametrize("name", NAMES)
def test_stream_rederives_from_stored_trace(name):
    stored = R.load_stream(_files(name)["stream.jsonl"])
    init = stored[0]
    # the initial state is the scenario's own (guest model and params come from the host)
    from kvmmmu.paging import GuestCpuModel
    fresh = R.stream_init(S.get(name), GuestCpuModel(**init["guest_model"]), init["params"])
    assert fresh == init
    lines = R.load_trace(_files(name)["trace"])
    assert R.derive_stream(init, lines) == stored
    assert R.derive_sources(init, lines) == R.load_stream(_files(name)["sources.jsonl"])


def _replay_walks(stream):
    """Walk every ``translate`` and ``page_fault`` of `stream` with the model's
    guest walker, in order, over a guest memory that the stream's writes and
    memslot changes keep up to date: the walker lines, one list per walk."""
    import numpy as np
    from kvmmmu import paging as P
    init = stream[0]
    end = max(m["gpa"] + m["size"] for m in init["memslots"])
    ram = np.zeros(end, np.uint8)

    def put(gpa, hexstr):
        data = bytes.fromhex(hexstr)
        ram[gpa:gpa + len(data)] = np.frombuffer(data, np.uint8)

    for m in init["memory"]:
        put(m["gpa"], m["hex"])
    mem = P.GuestMemory(ram)
    model = P.GuestCpuModel(**init["guest_model"])
    v = init["vcpus"][0]
    state = dict(cr0=v["cr0"], cr3=v["cr3"], cr4=v["cr4"], efer=v["efer"], rflags=v["rflags"],
                 cpl=v["cpl"])
    walks = []
    for ev in stream[1:]:
        kind = ev["kind"]
        if kind == "write":
            put(ev["gpa"], ev["hex"])
        elif kind == "memslot" and ev["size"]:
            assert ev.get("fresh")                          # new host memory: zeros
            ram[ev["gpa"]:ev["gpa"] + ev["size"]] = 0
        elif kind == "set_cr":
            state[f"cr{ev['cr']}"] = ev["value"]
        elif kind == "set_cpl":
            state["cpl"] = ev["cpl"]
        elif kind in ("translate", "page_fault"):
            gva = ev["gva"] if kind == "translate" else ev["addr"]
            access = ev["access"] if kind == "translate" else ev["error_code"]
            mmu = P.GuestMmu(mem, P.CpuState(**state), model)
            with tp.capture(*R.WALKER) as ring:
                mmu.walk_addr(gva, access & P.ACCESS_ALLOWED)
            walks.append(ring.lines())
    return walks


@pytest.mark.parametrize("name", NAMES)
def test_stream_reproduces_the_kernel_walks(name):
    """The model's guest walker, fed the stream's translations and faults in
    order (and its writes: emulated, native, memslot fills), prints exactly the
    kernel's walker lines: the derived events, their order, the CR3/CPL they
    see and the memory they read (A/D bits included) are the kernel's."""
    stream = R.load_stream(_files(name)["stream.jsonl"])
    kernel, cur = [], None
    for ev, text in R.load_trace(_files(name)["trace"]):
        if ev == "kvm_mmu_pagetable_walk":
            cur = []
            kernel.append(cur)
        if ev in R.WALKER:
            cur.append(f"{ev}: {text}")
    model = _replay_walks(stream)
    assert len(model) == len(kernel)
    for i, (m, k) in enumerate(zip(model, kernel)):
        assert m == k, f"{name}: walk {i} differs"


def test_derive_refuses_what_it_does_not_know():
    init = R.load_stream(_files("first_touch_4k")["stream.jsonl"])[0]
    mark = (R.MARK_EVENT, R.MARK_PREFIX + json.dumps({"op": "run", "cpl": 0, "rip": 0x10000,
                                                      "regs": {}}))
    walk = [("kvm_mmu_pagetable_walk", "addr 10000 pferr 10 F"),
            ("kvm_mmu_paging_element", "pte 10025 level 1")]
    with pytest.raises(R.DeriveError, match="not one the derivation knows"):
        R.derive_stream(init, [mark, *walk, ("kvm_emulate_insn", "0:10000:0f 0b (prot64)")])
    with pytest.raises(R.DeriveError, match="kvm_exit"):
        R.derive_stream(init, [mark, ("kvm_exit", "vcpu 0 reason EXCEPTION_NMI rip 0x0")])
    # an exception frame push whose bytes the recorder did not read back
    push = [("kvm_inj_exception", "#PF (0x4)"), ("kvm_mmu_pagetable_walk", "addr 7ff8 pferr 2 W"),
            ("kvm_mmu_paging_element", "pte 7063 level 1")]
    with pytest.raises(R.DeriveError, match="no readback"):
        R.derive_stream(init, [mark, *push])
    with pytest.raises(R.DeriveError, match="unknown marker"):
        R.derive_stream(init, [(R.MARK_EVENT, R.MARK_PREFIX + '{"op": "nope"}')])
    with pytest.raises(R.DeriveError, match="ring-0 walk"):
        R.derive_stream(init, [mark, *walk])
    # mov cr3, rax with rax never loaded
    with pytest.raises(R.DeriveError, match="rax unknown"):
        R.derive_stream(init, [mark, *walk, ("kvm_emulate_insn", "0:10000:0f 22 d8 (prot64)")])


def test_derive_checks_its_arguments():
    init = R.load_stream(_files("first_touch_4k")["stream.jsonl"])[0]
    with pytest.raises(TypeError, match="init must be"):
        R.derive_stream({"kind": "entry"}, [])
    with pytest.raises(ValueError, match="no 'vcpus'"):
        R.derive_stream({"kind": "init", "memslots": []}, [])
    with pytest.raises(TypeError, match=r"lines\[1\] must be"):
        R.derive_stream(init, [("kvm_mmu_get_page", "x"), "kvm_mmu_get_page: x"])
    with pytest.raises(TypeError, match="scn must be"):
        R.record("first_touch_4k")


def test_guest_image():
    g = S.GuestImage()
    g.map4k(0x700000, 0x123000)
    g.map2m(0x800000, 0x400000)
    assert g.translate(0x700abc) == 0x123abc
    assert g.translate(0x812345) == 0x412345
    with pytest.raises(KeyError, match="not mapped"):
        g.translate(0xA00000)
    with pytest.raises(ValueError, match="does not fit 256"):
        g.code(b"\x90" * 300, user=False)
    rip = g.code(S.Prog(b"\x90") + S.Prog(b"", [(0x700000, b"\x01")]), user=True)
    assert g.native_stores[rip] == [(0x700000, 0x123000, b"\x01")]


def test_mask_line():
    line = "kvm_mmu_set_spte: gfn 10 spte 1ccaaea25 (r-xu) level 1 at 1069fd080"
    assert R.mask_line(line) == "kvm_mmu_set_spte: gfn 10 spte a25/pfn (r-xu) level 1 at *"
    assert R.mask_line("kvm_mmu_spte_requested: gfn 10 pfn 1ccaae level 1") == \
        "kvm_mmu_spte_requested: gfn 10 pfn * level 1"
    other = "kvm_mmu_get_page: sp gen 0 gfn 1 l4 8-byte q0 wux nxe ad root 0 sync new"
    assert R.mask_line(other) == other
    # NX (bit 63) and the software bits above the pfn survive the mask
    hi = "kvm_mmu_set_spte: gfn 10 spte 8000000123456e67 (rw-u) level 1 at 1"
    assert R.mask_line(hi) == "kvm_mmu_set_spte: gfn 10 spte 8000000000000e67/pfn (rw-u) level 1 at *"


def test_scenarios_build_without_kvm():
    for name in NAMES:
        scn = S.get(name)
        assert scn.name == name and scn.steps and scn.doc
        assert any(s.op == "run" for s in scn.steps)
    with pytest.raises(KeyError, match="no scenario"):
        S.get("nope")


# ---------------------------------------------------------------------------
# Live: re-record and compare with the stored data
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host():
    reason = live.problem(tracing=False)
    if reason:
        pytest.skip(reason)
    if live.tracefs_problem() and not live.mount_tracefs():
        pytest.skip(live.tracefs_problem())
    if live.tracefs_problem():
        pytest.skip(live.tracefs_problem())
    return live.kvm_params()


@pytest.mark.live
def test_cli_writes_the_files(host, tmp_path):
    R.main(["--out", str(tmp_path), "prefetch"])
    got = sorted(p.name for p in tmp_path.iterdir())
    assert got == sorted(p.name for p in _files("prefetch").values())
    assert R.load_stream(tmp_path / "prefetch.stream.jsonl") == \
        R.load_stream(_files("prefetch")["stream.jsonl"])


@pytest.mark.live
def test_recording_from_another_thread(host):
    import threading
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("rec", R.record(S.get("huge_2m_4k_host"))))
    t.start()
    t.join()
    assert out["rec"].stream == R.load_stream(_files("huge_2m_4k_host")["stream.jsonl"])


@pytest.mark.live
def test_one_recording_at_a_time(host):
    assert R._RECORDING.acquire(blocking=False)
    try:
        with pytest.raises(RuntimeError, match="another scenario"):
            R.record(S.get("mmio"))
    finally:
        R._RECORDING.release()


@pytest.mark.live
@pytest.mark.parametrize("name", NAMES)
def test_rerecording_matches_stored(host, name):
    rec = R.record(S.get(name))
    stored_lines = R.load_trace(_files(name)["trace"])
    stored_stream = R.load_stream(_files(name)["stream.jsonl"])
    if name == "huge_2m_thp" and not any(
            "level 2" in t for e, t in rec.lines if e == "kvm_mmu_spte_requested"):
        pytest.skip("the host gave no transparent huge page for the THP slot this time")
    got = [R.mask_line(l) for l in R.mmu_lines(rec.lines)]
    want = [R.mask_line(l) for l in R.mmu_lines(stored_lines)]
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert got == want, (f"{name}: first divergence at event {first}: "
                         f"{got[first] if first < len(got) else '<end>'} != "
                         f"{want[first] if first < len(want) else '<end>'}")
    assert rec.stream == stored_stream
    assert rec.sources == R.load_stream(_files(name)["sources.jsonl"])
    assert rec.stats == json.loads(_files(name)["stats.json"].read_text())
