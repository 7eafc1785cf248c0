"""``python -m kvmmmu``: every subcommand in a subprocess (kvmmmu/cli.py).

Each subcommand runs with ``--json`` and its JSON is checked against the
library it drives (the same stream run in process, the same traces diffed
in process); ``--plot`` writes PNGs that open and show something; bad
arguments exit 2 naming the argument; a missing optional dependency exits
2 naming the extra; ``--help`` of each subcommand shows an example.
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from kvmmmu import replay as R
from kvmmmu import tracediff as T

TREE = Path(__file__).resolve().parent.parent
DATA = TREE / "tests" / "data" / "shadow_scenarios"
STREAMS = sorted(DATA.glob("*.stream.jsonl"))


def cli(*args, block=(), tmp_path=None, check=None, inproc=False):
    """Run ``python -m kvmmmu ARGS`` from the tree; `block`: top-level
    modules made unimportable (a package whose import raises ImportError,
    first on the path).  ``inproc=True``: call ``kvmmmu.cli.main(ARGS)`` in
    this process instead (same result object; for the many cheap cases -
    every subcommand still runs in a subprocess elsewhere in this file)."""
    if inproc:
        assert not block
        return _inproc(args, check)
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


def _inproc(args, check):
    from kvmmmu.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    res = types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
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
    """The PNG opens, has a plausible size and shows data: a memory plot's
    stacked bars/areas cover a good part of it, a faults plot's lines or
    bars and a sweep's bars at least some (the legend alone is ~0.2 %)."""
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, img.shape
    rgb = img[..., :3]
    assert (rgb < 0.5).any(), f"{path}: nothing dark drawn (no axes, no text)"
    colourful = ((rgb.max(axis=2) - rgb.min(axis=2)) > 0.2).mean()
    need = 0.05 if str(path).endswith("_memory.png") else 0.004
    assert colourful > need, f"{path}: {colourful:.4f} of the pixels coloured, want > {need}"


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
    out, _ = cli_json("replay", stream, "--trace", tmp_path / "model.trace", inproc=True)
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


def test_replay_of_a_stream_the_model_refuses_exits_1(tmp_path):
    lines = (DATA / "prefetch.stream.jsonl").read_text().splitlines()
    lines.append(json.dumps({"kind": "get_dirty_log", "slot": 0}))   # no dirty logging on it
    s = tmp_path / "refused.jsonl"
    s.write_text("\n".join(lines) + "\n")
    out, res = cli_json("replay", s, check=1)
    assert out["ok"] is False and "line 17" in out["error"] and "dirty" in out["error"]
    assert "refused" in res.stderr


def test_replay_bad_arguments(tmp_path):
    usage_error(cli("replay", tmp_path / "nope.jsonl", inproc=True), "argument FILE", "no such file")
    lonely = tmp_path / "lonely.trace"
    lonely.write_text("")
    usage_error(cli("replay", lonely, inproc=True), "argument FILE", "lonely.stream.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "init"}\n')
    usage_error(cli("replay", bad, inproc=True), "argument FILE", "line 1")
    usage_error(cli("replay", DATA / "prefetch.stream.jsonl", "--all", inproc=True), "argument --all")
    usage_error(cli("replay", DATA / "prefetch.stream.jsonl", "--events", "kvm_nope", inproc=True),
                "argument --events", "kvm_nope")
    usage_error(cli("replay", DATA / "prefetch.stream.jsonl", "--trace", tmp_path / "no" / "t",
                    inproc=True), "argument --trace", "does not exist")


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
    usage_error(cli("diff", t, tmp_path / "missing.trace", inproc=True), "argument B", "no such file")
    usage_error(cli("diff", t, inproc=True), "B")
    usage_error(cli("diff", t, t, "--all", "--events", "kvm_mmu_get_page", inproc=True),
                "argument --events", "not allowed with argument --all")
    usage_error(cli("diff", t, t, "--context", "many", inproc=True), "argument --context")
    broken = tmp_path / "broken.trace"
    broken.write_text("kvm_mmu_set_accessed_bit: gpa nothex\n")
    usage_error(cli("diff", t, broken, inproc=True), "argument B", "model line 1")


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------

TINY = ("--vcpu-mib", "2")


def test_run_list_names_every_workload_with_its_summary():
    from kvmmmu import workloads as W
    for args, inproc in ((("run",), False), (("run", "--list"), True)):
        out = cli(*args, check=0, inproc=inproc).stdout
        for name, wl in W.WORKLOADS.items():
            line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
            assert wl.doc.strip().splitlines()[0] in line


def test_run_json_is_the_reports_dict():
    from kvmmmu import workloads as W
    out, res = cli_json("run", "dirty_log", *TINY, "--iterations", "3", "--mmu", "shadow",
                        "--seed", "7", "--no-eager-page-split", "--write_percent", "50")
    rep = W.run("dirty_log", mmu="shadow", seed=7, vcpu_mib=2, iterations=3,
                eager_page_split=False, write_percent=50)
    want = rep.to_dict()
    assert (out["workload"], out["mmu"], out["seed"]) == ("dirty_log", "shadow", 7)
    assert out["params"] == want["params"]
    assert out["params"]["eager_page_split"] is False and out["params"]["write_percent"] == 50

    def timeless(d):                                # wall times are the only non-deterministic values
        return {k: v for k, v in d.items() if not k.endswith("_s") and k != "seconds"}
    assert timeless(out["summary"]) == timeless(want["summary"])
    assert out["timeline"] == want["timeline"]
    assert [timeless(p) for p in out["phases"]] == [timeless(p) for p in want["phases"]]
    assert "plots" not in out and res.stderr == ""


def test_run_text_report_and_host_option():
    out = cli("run", "first_touch", *TINY, "--host", "npt", "--mmu", "tdp", check=0).stdout
    from kvmmmu import workloads as W
    want = W.run("first_touch", mmu="tdp", vcpu_mib=2, host="npt").text().splitlines()
    assert out.splitlines()[:2] == want[:2] and "host=npt" in want[1]
    assert "faults:" in out and "memory:" in out


def test_run_plot_writes_pngs_that_open(tmp_path):
    out, res = cli_json("run", "dirty_log", *TINY, "--iterations", "2", "--plot",
                        tmp_path / "plots")
    assert len(out["plots"]) == 2
    assert {Path(p).name for p in out["plots"]} == {"dirty_log_tdp_mmu_memory.png",
                                                    "dirty_log_tdp_mmu_faults.png"}
    for p in out["plots"]:
        png_ok(p)
    res = cli("run", "first_touch", *TINY, "--plot", tmp_path / "p2", check=0)
    written = sorted(ln.split()[-1] for ln in res.stderr.splitlines() if ln.startswith("wrote "))
    assert [Path(p).name for p in written] == ["first_touch_tdp_mmu_faults.png",
                                               "first_touch_tdp_mmu_memory.png"]


def test_run_stream_replays_to_the_reports_counts(tmp_path):
    s = tmp_path / "ft.stream.jsonl"
    out, _ = cli_json("run", "first_touch", *TINY, "--mmu", "shadow", "--stream", s)
    assert out["stream"] == str(s)
    replayed, _ = cli_json("replay", s)
    assert replayed["events_run"] > 0
    for k in ("pf_taken", "pf_fixed"):
        assert replayed["vcpus"]["0"][k] == out["summary"][k] > 0, k
    assert replayed["vm"]["pages_4k"] == out["summary"]["pages_4k"] > 0


def test_run_progress_bars_on_request(tmp_path):
    res = cli("run", "dirty_log", *TINY, "--progress", check=0, inproc=True)
    assert "populate" in res.stderr and "iteration 2" in res.stderr and "100%" in res.stderr
    res = cli("run", "dirty_log", *TINY, "--progress", block=["tqdm"], tmp_path=tmp_path,
              check=0)
    assert res.stderr == "" and "dirty_log on mmu=tdp_mmu" in res.stdout


@pytest.mark.parametrize("args, names", [
    (("run", "nope"), ("argument WORKLOAD", "nope")),
    (("run", "dirty_log", "--iterations", "abc"), ("argument --iterations", "abc")),
    (("run", "dirty_log", "--iterations", "0"), ("argument --iterations", "below 1")),
    (("run", "dirty_log", "--write-percent", "101"), ("argument --write-percent", "above 100")),
    (("run", "dirty_log", "--backing", "huge"), ("argument --backing", "huge")),
    (("run", "dirty_log", "--mmu", "ept"), ("argument --mmu", "ept")),
    (("run", "working_set", "--hot-fraction", "x"), ("argument --hot-fraction", "float")),
    (("run", "dirty_log", "--seed", "-1"), ("argument --seed",)),
    (("run", "dirty_log", "--frob", "1"), ("--frob",)),
    (("run", "dirty_log", "--plot", str(DATA / "prefetch.trace")), ("argument --plot",
                                                                     "not a directory")),
    (("run", "dirty_log", "--stream", "/nonexistent-dir/s.jsonl"), ("argument --stream",
                                                                    "does not exist")),
    (("run", "access_tracking", "--stream", "/tmp/x.jsonl"), ("argument --stream",
                                                              "cannot record")),
])
def test_run_bad_arguments_name_the_argument(args, names):
    usage_error(cli(*args, inproc=True), *names)


def test_run_plot_without_matplotlib_names_the_extra(tmp_path):
    res = cli("run", "dirty_log", *TINY, "--plot", tmp_path / "p", block=["matplotlib"],
              tmp_path=tmp_path)
    usage_error(res, "argument --plot", "matplotlib", "pip install kvmmmu[plot]")
    assert not (tmp_path / "p").exists()


def test_run_help_shows_the_workloads_options():
    out = cli("run", "dirty_log", "--help", check=0).stdout
    for opt in ("--iterations", "--manual-protect", "--no-manual-protect", "--vcpu-mib",
                "--host {ept,npt}", "--mmu {tdp_mmu,tdp,shadow}", "--stream", "--plot DIR"):
        assert opt in out, opt
    assert "default: 2" in out                      # iterations
    assert "python -m kvmmmu run dirty_log" in out.split("examples:")[1]


# ---------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------

def _grid(tmp_path, **kw):
    g = {"workloads": ["dirty_log"], "mmus": ["tdp_mmu", "shadow"],
         "params": {"vcpu_mib": [2], "eager_page_split": [True, False]}, "seed": 3, **kw}
    p = tmp_path / "grid.json"
    p.write_text(json.dumps(g))
    return p


def test_sweep_inprocess_json_parquet_and_plot(tmp_path):
    from kvmmmu import sweep as SW
    grid = _grid(tmp_path)
    out, _ = cli_json("sweep", grid, "--scheduler", "inprocess", "--parquet", tmp_path / "o.pq",
                      "--plot", tmp_path / "plots", "--metric", "pf_taken")
    cells = SW.Grid.from_file(grid).cells()
    assert out["cells"] == len(out["rows"]) == len(cells) == 4 and out["failed"] == 0
    assert [{k: r[k] for k in c} for r, c in zip(out["rows"], cells)] == cells
    assert all(r["status"] == "ok" for r in out["rows"])
    df = SW.read_parquet(tmp_path / "o.pq")
    assert SW.to_records(df) == out["rows"]
    for r in out["rows"]:                           # each row is its cell's own run
        if not r["eager_page_split"]:
            from kvmmmu import workloads as W
            want = W.run_cell({k: r[k] for k in ("workload", "mmu", "seed", "vcpu_mib",
                                                 "eager_page_split")})
            assert r["pf_taken"] == want["pf_taken"] and r["pages_4k"] == want["pages_4k"]
    assert out["metric"] == "pf_taken" and [Path(p).name for p in out["plots"]] == \
        ["sweep_pf_taken.png"]
    png_ok(out["plots"][0])


def test_sweep_on_a_local_cluster_matches_inprocess(tmp_path):
    grid = _grid(tmp_path)
    a, _ = cli_json("sweep", grid, "--scheduler", "local", "--workers", "2")
    b, _ = cli_json("sweep", grid, "--scheduler", "inprocess", inproc=True)

    def timeless(rows):
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]
    assert timeless(a["rows"]) == timeless(b["rows"]) and a["failed"] == 0


def test_sweep_text_table_and_a_failed_cell(tmp_path):
    grid = _grid(tmp_path, params={"vcpu_mib": [1, 2]})     # 1 MiB: no whole 2 MiB frame
    res = cli("sweep", grid, "--scheduler", "inprocess", check=1, inproc=True)
    assert "per MMU (4 cells, 2 failed)" in res.stdout
    assert "2 of 4 cells failed:" in res.stdout and "WorkloadParamError" in res.stdout
    out, _ = cli_json("sweep", grid, "--scheduler", "inprocess", check=1, inproc=True)
    assert out["failed"] == 2
    assert sorted(r["vcpu_mib"] for r in out["rows"] if r["status"] == "failed") == [1, 1]


def test_sweep_bad_arguments(tmp_path):
    usage_error(cli("sweep", tmp_path / "none.json", inproc=True), "argument GRID", "no such file")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"workloads": ["nope"]}))
    usage_error(cli("sweep", bad, "--scheduler", "inprocess", inproc=True), "argument GRID", "nope")
    bad.write_text("{not json")
    usage_error(cli("sweep", bad, "--scheduler", "inprocess", inproc=True), "argument GRID", "JSON")
    grid = _grid(tmp_path)
    usage_error(cli("sweep", grid, "--scheduler", "carrier-pigeon", inproc=True), "argument --scheduler")
    usage_error(cli("sweep", grid, "--workers", "0", inproc=True), "argument --workers")
    usage_error(cli("sweep", grid, "--parquet", tmp_path, inproc=True), "argument --parquet",
                "is a directory")
    usage_error(cli("sweep", grid, "--scheduler", "inprocess", "--metric", "nope", inproc=True),
                "argument --metric", "nope")
    usage_error(cli("sweep", grid, "--scheduler", "local", block=["dask"], tmp_path=tmp_path),
                "argument --scheduler", "pip install kvmmmu[sweep]")
    usage_error(cli("sweep", grid, "--scheduler", "inprocess", "--plot", tmp_path / "p",
                    block=["matplotlib"], tmp_path=tmp_path),
                "argument --plot", "pip install kvmmmu[plot]")
    usage_error(cli("sweep", grid, block=["pandas"], tmp_path=tmp_path), "pandas",
                "pip install kvmmmu[sweep]")


def test_sweep_progress_bar(tmp_path):
    res = cli("sweep", _grid(tmp_path), "--scheduler", "inprocess", "--progress", check=0,
              inproc=True)
    assert "sweep" in res.stderr and "4/4" in res.stderr


# ---------------------------------------------------------------------------
# plots, in process
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("workload, params", [
    ("cr3_switch", dict(mmu="shadow", processes=4, rounds=2)),   # one sample: bars
    ("dirty_log", dict(vcpu_mib=2, iterations=30)),               # 63 samples: areas
])
def test_plot_report_draws_one_sample_and_many(tmp_path, workload, params):
    from kvmmmu import plots
    from kvmmmu import workloads as W
    d = W.run(workload, **params).to_dict()
    paths = plots.plot_report(d, tmp_path)
    assert len(paths) == 2
    for p in paths:
        png_ok(p)


def test_plot_functions_refuse_what_they_cannot_draw(tmp_path):
    import pandas as pd
    from kvmmmu import plots
    with pytest.raises(plots.PlotError, match="timeline"):
        plots.plot_report({"workload": "x", "timeline": []}, tmp_path)
    df = pd.DataFrame({"workload": ["w"], "mmu": ["tdp_mmu"], "status": ["ok"], "name": ["a"]})
    with pytest.raises(plots.PlotError, match="not numeric"):
        plots.plot_sweep(df, tmp_path, "name")
    with pytest.raises(plots.PlotError, match="not a column"):
        plots.plot_sweep(df, tmp_path, "nope")
    assert list(tmp_path.iterdir()) == []


def test_the_grid_example_in_sweep_help_is_a_valid_grid():
    from kvmmmu import sweep as SW
    text = cli("sweep", "--help", check=0, inproc=True).stdout
    start = text.index("{", text.index("(grid.json):"))
    example = json.loads(text[start:text.index("}\n", start) + 1])
    grid = SW.Grid.from_dict(example)
    assert len(grid.cells()) == 4


def test_demo_tdx_json():
    doc = json.loads(cli("demo", "--tdx", "--json", check=0).stdout)
    assert doc["demo"] == "tdx" and any("v6.18" in ln for ln in doc["lines"])
    a = doc["steps"]["v6.18"]
    # v6.18 premaps the image page: SEPT.ADD for its tables, no PAGE.ADD yet, one premapped
    assert a[0]["seamcalls"] == ["mem_sept_add"] * 3 and a[0]["nr_premapped"] == 1
    assert [s["nr_premapped"] for s in doc["steps"]["genB"]] == [0] * len(doc["steps"]["genB"])
