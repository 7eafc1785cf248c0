"""The recorded shadow-MMU scenarios (tests/data/shadow_scenarios, recorded
on this machine's KVM by ``kvmmmu.live.record``) through replay and tracediff.

For every scenario: its derived stream parses and round-trips; every
kvmmmu line of its kernel trace parses in its event's format and the
masking leaves no host page in it; its recorded statistics read as deltas
at the stream's marks; and the model, fed the stream on ``mmu="shadow"``,
prints the kernel's MMU events (tracediff.DEFAULT_EVENTS, host values
masked) with the same MMU statistic deltas (VM.audit() after every event).

Skipped while the recordings are not in the tree; the model comparison is
skipped while ``VM("shadow")`` has no MMU to take faults.
"""
import json
from pathlib import Path

import pytest

from kvmmmu import mmutrace as tp
from kvmmmu import replay as R
from kvmmmu import tracediff as T
from kvmmmu.vm import VM, KvmParams

DATA = Path(__file__).parent / "data" / "shadow_scenarios"
SCENARIOS = sorted(p.name[:-len(".stream.jsonl")] for p in DATA.glob("*.stream.jsonl")) \
    if DATA.is_dir() else []

pytestmark = pytest.mark.skipif(not SCENARIOS, reason="tests/data/shadow_scenarios/ is not recorded")

#: where the model does not (yet) do what the kernel did, (scenario, "trace" or
#: "stats") -> why (the first divergence seen); strict, so an unexpected pass
#: fails and the list stays true: flip an entry when its cause is fixed
#: (none today: every recorded scenario agrees event by event and in its stat deltas)
KNOWN_DIVERGENT: dict[tuple[str, str], str] = {}


def _params(part):
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_DIVERGENT[n, part]))
            if (n, part) in KNOWN_DIVERGENT else n for n in SCENARIOS]


@pytest.fixture(autouse=True)
def _events_off():
    tp.disable_all()
    yield
    tp.disable_all()


def _files(name):
    return {k: DATA / f"{name}.{k}" for k in ("stream.jsonl", "trace", "stats.json")}


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_stream_parses_and_round_trips(name, tmp_path):
    s = R.parse_stream(_files(name)["stream.jsonl"])
    assert s.init["mmu"] == "shadow" and s.events
    again = R.write_stream(s.init, s.events, tmp_path / "s.jsonl")
    assert again == s == R.parse_stream(tmp_path / "s.jsonl")


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_kernel_trace_parses_and_masks_every_host_page(name):
    lines = _files(name)["trace"].read_text().splitlines()
    known = {ev.name for ev in tp.EVENTS}
    kvmmmu_lines = [p for p in map(tp.split_trace_line, lines) if p and p[0] in known]
    norm = T.normalize_trace(lines, events="all", source=name)
    assert len(norm) == len(kvmmmu_lines) > 0
    for t in norm:
        if t.event == "kvm_mmu_set_spte":
            assert t.fields["sptep"].startswith("*")
            if t.fields["spte"].startswith("~"):
                assert int(t.fields["spte"][1:], 16) & T.SPTE_BASE_ADDR_MASK == 0
        if t.event == "kvm_mmu_spte_requested":
            p = t.fields["pfn"]
            if p.startswith("*"):                  # the gfn's offset in a huge page stays
                lvl = int(t.fields["level"])
                assert p == "*" if lvl == 1 else \
                    int(p[1:], 16) == int(t.fields["gfn"], 16) % (1 << 9 * (lvl - 1))
            else:
                assert int(p, 16) >> 52             # an error / noslot pfn


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_recorded_stats_are_deltas_at_the_streams_marks(name):
    s = R.parse_stream(_files(name)["stream.jsonl"])
    d = T.recorded_stat_deltas(json.loads(_files(name)["stats.json"].read_text()))
    assert [x["label"] for x in d] == [e["label"] for e in s.events if e["kind"] == "mark"] + ["end"]


def _shadow_mmu_present():
    vm = VM("shadow", params=KvmParams(tdp_mmu=False))
    try:
        return vm.mmu_backend is not None
    finally:
        vm.close()


_RUNS = {}


def _replay(name):
    if not _shadow_mmu_present():
        pytest.skip("VM('shadow') has no MMU backend yet")
    if name not in _RUNS:
        _RUNS[name] = R.run_stream(_files(name)["stream.jsonl"], audit=True)
    return _RUNS[name]


@pytest.mark.parametrize("name", _params("trace"))
def test_the_model_prints_the_kernels_mmu_events(name):
    res = _replay(name)
    d = T.diff_traces(_files(name)["trace"].read_text().splitlines(), res.lines)
    assert d is None, f"{name}:\n{d}"


@pytest.mark.parametrize("name", _params("stats"))
def test_the_model_counts_the_kernels_stat_deltas(name):
    res = _replay(name)
    sd = T.diff_stat_files(T.load_stats(_files(name)["stats.json"]), [res.baseline] + res.stats)
    assert sd == [], f"{name}: {sd}"
