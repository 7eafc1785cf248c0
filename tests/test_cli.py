"""``python -m kvmmmu``: every subcommand in a subprocess (kvmmmu/cli.py).

Each subcommand runs with ``--json`` and its JSON is checked against the
library it drives (the same stream run in process, the same traces diffed
in process); ``--plot`` writes PNGs that open and show something; bad
arguments exit 2 naming the argument; a missing optional dependency exits
2 naming the extra; ``--help`` of each subcommand shows an example.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmmmu import replay as R
from kvmmmu import tracediff as T

TREE = Path(__file__).resolve().parent.parent
DATA = TREE / "tests" / "data" / "shadow_scenarios"
STREAMS = sorted(DATA.glob("*.stream.jsonl"))


def cli(*args, block=(), tmp_path=None, check=None):
    """Run ``python -m kvmmmu ARGS`` from the tree; `block`: top-level
    modules made unimportable (a package whose import raises ImportError,
    first on the path)."""
    path = [str(TREE)]
    if block:
        d = tmp_path / "blocked"
        for mod in block:
            (d / mod).mkdir(parents=True, exist_ok=True)
            (d / mod / "__init__.py").write_text(f"raise ImportError('{mod} blocked by the test')\n")
        path.insert(0, str(d))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    res = subprocess.run([sys.executable, "-m", "kvmmmu", *map(str, args)], cwd=TREE, env=env,
                         capture_output=True, text=True, timeout=120)
    if check is not None:
        assert res.returncode == check, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    return res


def cli_json(*args, check=0, **kw):
    res = cli(*args, "--json", check=check, **kw)
    return json.loads(res.stdout), res


def usage_error(res, *names):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == ""
    for n in names:
        assert n in res.stderr, (n, res.stderr)


def png_ok(path):
    """The PNG opens, has a plausible size and is not blank."""
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, img.shape
    rgb = img[..., :3]
    assert (rgb < 0.5).any(), f"{path}: nothing dark drawn"
    colourful = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.2
    assert colourful.sum() > 500, f"{path}: no coloured data drawn"


# ---------------------------------------------------------------------------
# help and the top level
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sub", ["demo", "run", "replay", "diff", "sweep"])
def test_each_subcommands_help_teaches_with_an_example(sub):
    res = cli(sub, "--help", check=0)
    assert f"python -m kvmmmu {sub}" in res.stdout.split("example", 1)[1]
    assert "usage:" in res.stdout


def test_the_top_level_help_names_every_subcommand():
    out = cli("--help", check=0).stdout
    for sub in ("demo", "run", "replay", "diff", "sweep"):
        assert f"python -m kvmmmu {sub}" in out


def test_an_unknown_subcommand_is_a_usage_error():
    usage_error(cli("frobnicate"), "invalid choice", "frobnicate")


# ---------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("stream", STREAMS, ids=lambda p: p.name.split(".")[0])
def test_replay_of_a_stream_reports_what_the_library_runs(stream, tmp_path):
    out, _ = cli_json("replay", stream, "--trace", tmp_path / "model.trace")
    res = R.run_stream(stream)
    assert out["mode"] == "stream" and out["ok"] is True
    assert out["events_run"] == len(res.stream.events) > 0
    assert out["trace_lines"] == len(res.lines) > 0
    assert sum(out["trace_events"].values()) == len(res.lines)
    end = res.stats[-1]
    for name in T.MMU_VM_STATS:
        assert out["vm"][name] == end["vm"][name], name
    assert set(out["vcpus"]) == {str(i) for i in end["vcpus"]}
    for i, s in end["vcpus"].items():
        for name in T.MMU_VCPU_STATS:
            assert out["vcpus"][str(i)][name] == s[name], (i, name)
    assert out["marks"] == [e["label"] for e in res.stream.events if e["kind"] == "mark"]
    assert (tmp_path / "model.trace").read_text().splitlines() == res.lines


def test_replay_text_summary_and_audit():
    res = cli("replay", DATA / "prefetch.stream.jsonl", "--audit", check=0)
    lines = R.run_stream(DATA / "prefetch.stream.jsonl").lines
    assert f"{len(lines)} kvmmmu trace lines" in res.stdout
    assert "VM MMU stats at the end:" in res.stdout and "vCPU 0 MMU stats" in res.stdout


def test_replay_events_captures_only_those():
    out, _ = cli_json("replay", DATA / "cr3_switch.stream.jsonl", "--events", "kvm_mmu_get_page")
    assert set(out["trace_events"]) == {"kvm_mmu_get_page"} and out["trace_lines"] > 1


def _recording(name, tmp_path):
    for ext in ("trace", "stream.jsonl", "stats.json"):
        shutil.copy(DATA / f"{name}.{ext}", tmp_path / f"{name}.{ext}")
    return tmp_path / f"{name}.trace"


def test_replay_of_a_recorded_trace_agrees():
    out, _ = cli_json("replay", DATA / "cr3_switch.trace")
    assert out["mode"] == "recorded" and out["agree"] is True and out["trace_agree"] is True
    assert out["divergence"] is None and out["stat_differences"] == []
    assert out["stats_file"].endswith("cr3_switch.stats.json")
    kernel = (DATA / "cr3_switch.trace").read_text().splitlines()
    assert out["compared_events"] == len(T.normalize_trace(kernel)) > 0
    text = cli("replay", DATA / "cr3_switch.trace", "--all", check=0).stdout
    assert text.rstrip().endswith("agree")


def test_replay_of_a_tampered_recorded_trace_differs(tmp_path):
    trace = _recording("cr3_switch", tmp_path)
    lines = trace.read_text().splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("kvm_mmu_get_page:") and
             ln.endswith(" new"))
    lines[i] = lines[i][:-len(" new")] + " existing"
    trace.write_text("\n".join(lines) + "\n")
    out, _ = cli_json("replay", trace, check=1)
    assert out["agree"] is False and out["trace_agree"] is False
    d = out["divergence"]
    assert d["field"] == "created" and (d["kernel_value"], d["model_value"]) == ("existing", "new")
    assert d["kernel_lineno"] == i + 1
    res = cli("replay", trace, check=1)
    assert "first divergence" in res.stdout and res.stdout.rstrip().endswith("differ")


def test_replay_of_a_recording_with_tampered_stats_differs(tmp_path):
    trace = _recording("prefetch", tmp_path)
    stats = tmp_path / "prefetch.stats.json"
    obj = json.loads(stats.read_text())
    obj["end"]["vm"]["pages_4k"] += 1
    stats.write_text(json.dumps(obj))
    out, _ = cli_json("replay", trace, check=1)
    assert out["trace_agree"] is True and out["agree"] is False
    assert [(s["scope"], s["name"]) for s in out["stat_differences"]] == [("vm", "pages_4k")]


def test_replay_bad_arguments(tmp_path):
    usage_error(cli("replay", tmp_path / "nope.jsonl"), "argument FILE", "no such file")
    lonely = tmp_path / "lonely.trace"
    lonely.write_text("")
    usage_error(cli("replay", lonely), "argument FILE", "lonely.stream.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "init"}\n')
    usage_error(cli("replay", bad), "argument FILE", "line 1")
    usage_error(cli("replay", DATA / "prefetch.stream.jsonl", "--all"), "argument --all")
    usage_error(cli("replay", DATA / "prefetch.stream.jsonl", "--events", "kvm_nope"),
                "argument --events", "kvm_nope")


def test_replay_progress_bar_on_request_and_without_tqdm(tmp_path):
    res = cli("replay", DATA / "prefetch.stream.jsonl", "--progress", check=0)
    assert "replay prefetch.stream.jsonl" in res.stderr and "100%" in res.stderr
    assert "replay" not in cli("replay", DATA / "prefetch.stream.jsonl", check=0).stderr
    res = cli("replay", DATA / "prefetch.stream.jsonl", "--progress", block=["tqdm"],
              tmp_path=tmp_path, check=0)
    assert res.stderr == "" and "events run" in res.stdout


# ---------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------

def test_diff_agrees_with_the_models_trace_and_finds_a_divergence(tmp_path):
    model = tmp_path / "model.trace"
    cli("replay", DATA / "misaligned_write.stream.jsonl", "--trace", model, check=0)
    kernel = DATA / "misaligned_write.trace"
    out, _ = cli_json("diff", kernel, model)
    assert out["agree"] is True and out["divergence"] is None
    assert out["compared"][0] == out["compared"][1] > 0
    assert cli("diff", kernel, model, check=0).stdout.startswith("traces agree")

    other = DATA / "prefetch.trace"
    out, _ = cli_json("diff", kernel, other, "--all", check=1)
    d = T.diff_traces(kernel.read_text().splitlines(), other.read_text().splitlines(),
                      events="all")
    assert out["agree"] is False and out["events"] == "all"
    assert (out["divergence"]["index"], out["divergence"]["field"]) == (d.index, d.field)
    assert out["divergence"]["text"] == str(d)
    assert "first divergence" in cli("diff", kernel, other, check=1).stdout


def test_diff_events_selects_what_is_compared(tmp_path):
    a = tmp_path / "a.trace"
    b = tmp_path / "b.trace"
    a.write_text("kvm_mmu_pagetable_walk: addr 1000 pferr 4 U\n"
                 "kvm_mmu_set_accessed_bit: gpa 2000\n")
    b.write_text("kvm_mmu_pagetable_walk: addr 1000 pferr 4 U\n"
                 "kvm_mmu_set_accessed_bit: gpa 3000\n")
    out, _ = cli_json("diff", a, b, check=1)
    assert out["divergence"]["field"] == "gpa"
    out, _ = cli_json("diff", a, b, "--events", "kvm_mmu_pagetable_walk")
    assert out["agree"] is True and out["compared"] == [1, 1]


def test_diff_bad_arguments(tmp_path):
    t = DATA / "prefetch.trace"
    usage_error(cli("diff", t, tmp_path / "missing.trace"), "argument B", "no such file")
    usage_error(cli("diff", t), "B")
    usage_error(cli("diff", t, t, "--all", "--events", "kvm_mmu_get_page"),
                "argument --events", "not allowed with argument --all")
    usage_error(cli("diff", t, t, "--context", "many"), "argument --context")
    broken = tmp_path / "broken.trace"
    broken.write_text("kvm_mmu_set_accessed_bit: gpa nothex\n")
    usage_error(cli("diff", t, broken), "argument B", "model line 1")
