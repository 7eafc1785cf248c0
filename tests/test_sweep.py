"""kvmmmu.sweep: grid expansion and seeds, GridError, running cells in-process
and on Dask (a LocalCluster of two worker processes), failed rows, Parquet,
the per-MMU text table.

Most tests use a small registry of fake workloads (same shape as
``kvmmmu.workloads.WORKLOADS``) and cell functions defined here, so what they
count does not move when the real workloads change; the tests at the end run
the real ``kvmmmu.workloads.run_cell`` on tiny sizes.  Cell functions are
top-level functions of this module: Dask workers import them by name.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

from kvmmmu import sweep as SW  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: object
    help: str = ""
    choices: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    params: dict
    mmus: tuple
    doc: str = ""


REG = {
    "touch": Workload("touch", {
        "vcpus": Param("vcpus", int, 1),
        "backing": Param("backing", str, "4k", choices=("4k", "2m")),
        "eager_split": Param("eager_split", bool, False),
    }, ("tdp_mmu", "tdp", "shadow")),
    "cr3": Workload("cr3", {
        "vcpus": Param("vcpus", int, 1),
        "hot": Param("hot", float, 0.5),
    }, ("shadow",)),
}


def grid(**kw):
    kw.setdefault("registry", REG)
    return SW.Grid(**kw)


# --- cell functions (importable by the workers) --------------------------------------------

def count_cell(cell):
    """Deterministic in the cell; raises for vcpus == 3."""
    if cell.get("vcpus") == 3:
        raise RuntimeError(f"no room for 3 vCPUs (seed {cell['seed']})")
    n = cell.get("vcpus", 1) * (512 if cell.get("backing") == "2m" else 1)
    return {"faults": n, "ratio": n / 4, "label": f"{cell['workload']}/{cell['mmu']}",
            "huge": cell.get("backing") == "2m", "wall_s": time.perf_counter()}


def odd_cell(cell):
    """Different shapes of bad return values, chosen by the seed."""
    kind = cell["seed"]
    if kind == 0:
        return [1, 2]
    if kind == 1:
        return {"status": "fine"}
    if kind == 2:
        return {"x": [1, 2]}
    if kind == 3:
        import numpy as np
        return {"x": np.int64(7), "y": np.float32(0.5), "z": np.bool_(True)}
    return {"mmu": "other"}


def wait_cell(cell):
    """Waits until the file named by the cell's "flag" exists (at most 60 s)."""
    t0 = time.monotonic()
    while not os.path.exists(cell["flag"]) and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    return {"waited": True}


def die_in_worker_cell(cell):
    """Ends its worker process when the seed is 1 (never outside a worker)."""
    if cell["seed"] == 1:
        from distributed import get_worker
        get_worker()            # raises ValueError outside a Dask worker
        os._exit(3)
    return {"faults": cell["seed"]}


# --- the grid ------------------------------------------------------------------------------

def test_grid_expands_to_the_hand_counted_cells():
    g = grid(workloads=["touch", "cr3"], mmus=["tdp_mmu", "shadow"],
             params={"vcpus": [1, 2], "backing": ["4k", "2m"]}, seed=7, repeat=2)
    cells = g.cells()
    # touch: 2 vcpus x 2 backings x 2 replicates x 2 MMUs = 16;
    # cr3 (shadow only, no backing): 2 vcpus x 2 replicates x 1 MMU = 4
    assert len(cells) == len(g) == 20
    assert g.skipped == [{"workload": "cr3", "mmu": "tdp_mmu", "reason": "cr3 runs on shadow"}]
    touch = [c for c in cells if c["workload"] == "touch"]
    assert [(c["vcpus"], c["backing"], c["mmu"]) for c in touch[:8]] == [
        (1, "4k", "tdp_mmu"), (1, "4k", "shadow"), (1, "4k", "tdp_mmu"), (1, "4k", "shadow"),
        (1, "2m", "tdp_mmu"), (1, "2m", "shadow"), (1, "2m", "tdp_mmu"), (1, "2m", "shadow")]
    cr3 = [c for c in cells if c["workload"] == "cr3"]
    assert [set(c) for c in cr3] == [{"workload", "mmu", "seed", "vcpus"}] * 4
    assert [list(c) for c in touch[:1]] == [["workload", "mmu", "seed", "vcpus", "backing"]]
    # the MMUs of one configuration share a seed; replicates do not
    assert touch[0]["seed"] == touch[1]["seed"] != touch[2]["seed"] == touch[3]["seed"]
    # 8 (touch) + 4 (cr3) distinct configurations x replicates
    assert len({(c["workload"], c["seed"]) for c in cells}) == 12
    assert all(isinstance(c["seed"], int) and 0 <= c["seed"] < 2**32 for c in cells)


def test_a_grid_without_params_has_one_cell_per_pair():
    g = grid(workloads=["touch", "cr3"])
    assert [(c["workload"], c["mmu"]) for c in g.cells()] == [
        ("touch", "tdp_mmu"), ("touch", "tdp"), ("touch", "shadow"), ("cr3", "shadow")]
    assert [(s["workload"], s["mmu"]) for s in g.skipped] == [("cr3", "tdp_mmu"), ("cr3", "tdp")]


def test_cell_seeds_are_the_documented_hash():
    g = grid(workloads=["touch"], mmus=["tdp"], params={"vcpus": [2], "eager_split": [True]},
             seed=11)
    text = json.dumps({"grid_seed": 11, "workload": "touch",
                       "params": {"vcpus": 2, "eager_split": True}, "replicate": 0},
                      sort_keys=True, separators=(",", ":"))
    want = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
    assert g.cells() == [{"workload": "touch", "mmu": "tdp", "seed": want, "vcpus": 2,
                          "eager_split": True}]


def test_same_grid_same_cells_and_any_change_a_different_seed():
    base = dict(workloads=["touch"], mmus=["tdp_mmu"], params={"vcpus": [1]}, seed=0)
    assert grid(**base).cells() == grid(**base).cells()
    s0 = grid(**base).cells()[0]["seed"]
    assert grid(**{**base, "seed": 1}).cells()[0]["seed"] != s0
    assert grid(**{**base, "params": {"vcpus": [2]}}).cells()[0]["seed"] != s0
    assert grid(**{**base, "params": {"vcpus": [1], "backing": ["2m"]}}).cells()[0]["seed"] != s0
    assert grid(**{**base, "workloads": ["cr3"], "mmus": ["shadow"]}).cells()[0]["seed"] != s0
    # the MMU is not hashed: every MMU sees the same guest
    assert grid(**{**base, "mmus": ["shadow"]}).cells()[0]["seed"] == s0
    # a cell does not depend on its neighbours in the grid
    wide = grid(**{**base, "params": {"vcpus": [4, 1, 2]}}).cells()
    assert [c["seed"] for c in wide if c["vcpus"] == 1] == [s0]
    # raising repeat keeps replicate 0
    rep = grid(**{**base, "repeat": 3}).cells()
    assert rep[0]["seed"] == s0 and len({c["seed"] for c in rep}) == 3


def test_an_int_for_a_float_param_is_a_float_and_bool_is_not_int():
    g = grid(workloads=["cr3"], mmus=["shadow"], params={"hot": [1, 0.25]})
    assert [type(c["hot"]) for c in g.cells()] == [float, float]
    assert g.params == {"hot": (1.0, 0.25)}
    a = SW.cell_seed(0, "w", {"x": 1})
    assert a != SW.cell_seed(0, "w", {"x": True}) and a != SW.cell_seed(0, "w", {"x": "1"})


@pytest.mark.parametrize("kw, field, words", [
    (dict(workloads=[]), "workloads", "at least one"),
    (dict(workloads="touch"), "workloads", "list of workload names"),
    (dict(workloads=["touch", "nope"]), "workloads", "unknown workload 'nope'"),
    (dict(workloads=["touch", "touch"]), "workloads", "listed twice"),
    (dict(workloads=[1]), "workloads", "not a workload name"),
    (dict(workloads=["touch"], mmus=[]), "mmus", "at least one"),
    (dict(workloads=["touch"], mmus=["ept"]), "mmus", "unknown MMU 'ept'"),
    (dict(workloads=["touch"], mmus=["tdp", "tdp"]), "mmus", "listed twice"),
    (dict(workloads=["cr3"], mmus=["tdp_mmu", "tdp"]), "mmus", "no cell to run"),
    (dict(workloads=["touch"], seed=-1), "seed", "int >= 0"),
    (dict(workloads=["touch"], seed=True), "seed", "int >= 0"),
    (dict(workloads=["touch"], seed=1.0), "seed", "int >= 0"),
    (dict(workloads=["touch"], repeat=0), "repeat", "int >= 1"),
    (dict(workloads=["touch"], params=[("vcpus", [1])]), "params", "mapping"),
    (dict(workloads=["touch"], params={"hot": [0.5]}), "params.hot", "declares parameter 'hot'"),
    (dict(workloads=["touch"], params={"nr_pages": [1]}), "params.nr_pages", "no listed workload"),
    (dict(workloads=["touch"], params={"vcpus": []}), "params.vcpus", "at least one value"),
    (dict(workloads=["touch"], params={"vcpus": 2}), "params.vcpus", "list of values"),
    (dict(workloads=["touch"], params={"backing": "4k"}), "params.backing", "list of values"),
    (dict(workloads=["touch"], params={"vcpus": [1, 1]}), "params.vcpus", "listed twice"),
    (dict(workloads=["touch"], params={"vcpus": ["2"]}), "params.vcpus", "'2' is a str"),
    (dict(workloads=["touch"], params={"vcpus": [2.0]}), "params.vcpus", "2.0 is a float"),
    (dict(workloads=["touch"], params={"vcpus": [True]}), "params.vcpus", "True is a bool"),
    (dict(workloads=["touch"], params={"eager_split": [1]}), "params.eager_split",
     "takes a bool"),
    (dict(workloads=["touch"], params={"backing": ["1g"]}), "params.backing",
     "not one of ('4k', '2m')"),
    (dict(workloads=["cr3"], mmus=["shadow"], params={"hot": [math.nan]}), "params.hot",
     "finite float"),
    (dict(workloads=["cr3"], mmus=["shadow"], params={"hot": ["0.5"]}), "params.hot",
     "takes a finite float"),
    (dict(workloads=["touch"], params={"seed": [1]}), "params.seed", "cell key"),
])
def test_grid_errors_name_the_field(kw, field, words):
    with pytest.raises(SW.GridError) as ei:
        grid(**kw)
    assert isinstance(ei.value, ValueError)
    assert ei.value.field == field
    assert str(ei.value).startswith(f"{field}: ")
    assert words in str(ei.value)


def test_a_value_must_suit_every_workload_that_declares_the_param():
    reg = dict(REG, other=Workload("other", {"vcpus": Param("vcpus", int, 1, choices=(1, 2))},
                                   ("tdp",)))
    SW.Grid(["touch", "other"], params={"vcpus": [1, 2]}, registry=reg)
    with pytest.raises(SW.GridError, match=r"params.vcpus: 4 is not one of \(1, 2\) "
                                           r"\(workload 'other'\)"):
        SW.Grid(["touch", "other"], params={"vcpus": [1, 4]}, registry=reg)


def test_grid_from_dict_json_and_toml_agree(tmp_path):
    d = {"workloads": ["touch", "cr3"], "mmus": ["tdp", "shadow"],
         "params": {"vcpus": [1, 2], "eager_split": [False, True]}, "seed": 5, "repeat": 2}
    g = SW.Grid.from_dict(d, registry=REG)
    assert g.to_dict() == d
    (tmp_path / "g.json").write_text(json.dumps(d))
    (tmp_path / "g.toml").write_text(
        'workloads = ["touch", "cr3"]\nmmus = ["tdp", "shadow"]\nseed = 5\nrepeat = 2\n'
        "[params]\nvcpus = [1, 2]\neager_split = [false, true]\n")
    gj = SW.Grid.from_file(tmp_path / "g.json", registry=REG)
    gt = SW.Grid.from_file(str(tmp_path / "g.toml"), registry=REG)
    assert gj == g == gt
    assert gj.cells() == g.cells() == gt.cells()
    assert SW.Grid.from_dict({"workloads": ["touch"]}, registry=REG).mmus == SW.MMUS


def test_grid_file_and_dict_errors(tmp_path):
    with pytest.raises(SW.GridError, match="^grid: must be a mapping"):
        SW.Grid.from_dict(["touch"], registry=REG)
    with pytest.raises(SW.GridError, match="^workload: unknown grid key") as ei:
        SW.Grid.from_dict({"workloads": ["touch"], "workload": "x"}, registry=REG)
    assert ei.value.field == "workload"
    with pytest.raises(SW.GridError, match="^workloads: missing"):
        SW.Grid.from_dict({"mmus": ["tdp"]}, registry=REG)
    (tmp_path / "g.yaml").write_text("workloads: [touch]\n")
    with pytest.raises(SW.GridError, match=r"^path: .*g\.yaml.*\.json or \.toml"):
        SW.Grid.from_file(tmp_path / "g.yaml", registry=REG)
    (tmp_path / "bad.json").write_text('{"workloads": ["touch"],}')
    with pytest.raises(SW.GridError, match=r"^path: .*bad\.json.* not valid JSON"):
        SW.Grid.from_file(tmp_path / "bad.json", registry=REG)
    (tmp_path / "bad.toml").write_text("workloads = [touch]\n")
    with pytest.raises(SW.GridError, match=r"^path: .*bad\.toml.* not valid TOML"):
        SW.Grid.from_file(tmp_path / "bad.toml", registry=REG)
    (tmp_path / "typo.toml").write_text('workloads = ["touch"]\n[params]\nvcpu = [1]\n')
    with pytest.raises(SW.GridError, match="^params.vcpu: no listed workload"):
        SW.Grid.from_file(tmp_path / "typo.toml", registry=REG)
    with pytest.raises(FileNotFoundError):
        SW.Grid.from_file(tmp_path / "absent.json", registry=REG)


# --- running in-process --------------------------------------------------------------------

GRID_2X2 = dict(workloads=["touch"], mmus=["tdp_mmu", "shadow"],
                params={"vcpus": [2, 3], "backing": ["4k", "2m"]}, seed=1)


def test_inprocess_rows_columns_and_failed_cells():
    g = grid(**GRID_2X2)
    seen = []
    df = SW.run(g, scheduler="inprocess", cell_fn=count_cell,
                progress=lambda *a: seen.append(a))
    assert seen == [("sweep", i, 8) for i in range(9)]
    assert list(df.columns) == ["workload", "mmu", "seed", "vcpus", "backing", "status",
                                "error", "cell_s", "faults", "ratio", "label", "huge", "wall_s"]
    cells = g.cells()
    assert df[["workload", "mmu", "seed", "vcpus", "backing"]].to_dict("records") == cells
    ok = df["vcpus"] == 2
    assert list(df["status"]) == ["ok" if v == 2 else "failed" for v in df["vcpus"]]
    assert list(df.loc[ok, "faults"]) == [2, 2, 1024, 1024]
    assert list(df.loc[ok, "huge"]) == [False, False, True, True]
    assert set(df.loc[ok, "error"]) == {""}
    failed = df[~ok]
    assert len(failed) == 4
    for err, seed in zip(failed["error"], failed["seed"]):
        assert err == f"RuntimeError: no room for 3 vCPUs (seed {seed})"
    assert failed["faults"].isna().all() and failed["label"].isna().all()
    assert failed["ratio"].isna().all() and failed["huge"].isna().all()
    assert (df["cell_s"] >= 0).all()
    assert {k: str(t) for k, t in df.dtypes.items()} == {
        "workload": "str", "mmu": "str", "seed": "Int64", "vcpus": "Int64", "backing": "str",
        "status": "str", "error": "str", "cell_s": "float64", "faults": "Int64",
        "ratio": "float64", "label": "str", "huge": "boolean", "wall_s": "float64"}


def test_bad_return_values_are_failed_rows():
    cells = [{"workload": "w", "mmu": "tdp", "seed": s} for s in range(5)]
    df = SW.run(cells, scheduler="inprocess", cell_fn=odd_cell)
    assert list(df["status"]) == ["failed", "failed", "failed", "ok", "failed"]
    err = list(df["error"])
    assert err[0] == "TypeError: cell function returned a list, not a dict"
    assert err[1] == "ValueError: summary key 'status' collides with a sweep column"
    assert err[2].startswith("TypeError: a summary value is a list")
    assert err[4] == "ValueError: summary key 'mmu' = 'other' contradicts the cell's 'tdp'"
    row = df.iloc[3]
    assert (row["x"], row["y"], row["z"]) == (7, 0.5, True)
    assert (str(df["x"].dtype), str(df["z"].dtype)) == ("Int64", "boolean")


def test_run_refuses_bad_arguments_before_running():
    calls = []
    cells = [{"workload": "w", "mmu": "tdp", "seed": 0}]

    def fn(c):
        calls.append(c)
        return {}
    with pytest.raises(ValueError, match="scheduler must be 'inprocess', 'local' or an address"):
        SW.run(cells, scheduler="threads", cell_fn=fn)
    with pytest.raises(TypeError, match="scheduler: a str or a distributed.Client"):
        SW.run(cells, scheduler=3, cell_fn=fn)
    with pytest.raises(ValueError, match="n_workers must be an int >= 1"):
        SW.run(cells, n_workers=0, cell_fn=fn)
    with pytest.raises(ValueError, match="threads_per_worker must be an int >= 1"):
        SW.run(cells, threads_per_worker=1.5, cell_fn=fn)
    with pytest.raises(ValueError, match="timeout must be None or a finite"):
        SW.run(cells, scheduler="inprocess", timeout=0, cell_fn=fn)
    with pytest.raises(TypeError, match="cell_fn must be callable"):
        SW.run(cells, scheduler="inprocess", cell_fn="run_cell")
    with pytest.raises(TypeError, match="progress must be callable"):
        SW.run(cells, scheduler="inprocess", cell_fn=fn, progress=True)
    with pytest.raises(ValueError, match=r"grid_or_cells\[1\]: cell lacks seed"):
        SW.run(cells + [{"workload": "w", "mmu": "tdp"}], scheduler="inprocess", cell_fn=fn)
    with pytest.raises(ValueError, match=r"grid_or_cells\[0\]: seed must be an int >= 0"):
        SW.run([{**cells[0], "seed": -2}], scheduler="inprocess", cell_fn=fn)
    with pytest.raises(ValueError, match=r"grid_or_cells\[0\]: cell key 'error' is not allowed"):
        SW.run([{**cells[0], "error": ""}], scheduler="inprocess", cell_fn=fn)
    with pytest.raises(TypeError, match="grid_or_cells: a Grid or a list of cell dicts"):
        SW.run(cells[0], scheduler="inprocess", cell_fn=fn)
    assert calls == []


def test_inprocess_timeout_fails_the_cells_not_started():
    def slow(cell):
        time.sleep(0.2)
        return {"n": cell["seed"]}
    cells = [{"workload": "w", "mmu": "tdp", "seed": s} for s in range(3)]
    df = SW.run(cells, scheduler="inprocess", cell_fn=slow, timeout=0.05)
    assert list(df["status"]) == ["ok", "failed", "failed"]
    assert list(df["n"].astype(object).where(df["n"].notna(), None)) == [0, None, None]
    assert list(df["error"])[1:] == [
        "TimeoutError: not started within the sweep timeout of 0.05 s"] * 2


def test_the_inprocess_path_never_imports_dask():
    code = ("import sys; from kvmmmu import sweep as SW; "
            "df = SW.run([{'workload': 'w', 'mmu': 'tdp', 'seed': 4}], scheduler='inprocess', "
            "cell_fn=SW.null_cell); assert df['seed_echo'].tolist() == [4]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    top = os.path.dirname(os.path.dirname(SW.__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=top), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_importing_sweep_imports_no_optional_dependency():
    code = ("import sys, kvmmmu.sweep; "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'dask', 'distributed', "
            "'kvmmmu.workloads', 'kvmmmu.vm') if m in sys.modules))")
    top = os.path.dirname(os.path.dirname(SW.__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=top), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- parquet, records, cells_of, the table --------------------------------------------------

def test_parquet_round_trip_keeps_values_and_dtypes(tmp_path):
    df = SW.run(grid(**GRID_2X2), scheduler="inprocess", cell_fn=count_cell)
    assert (df["status"] == "failed").any()
    SW.to_parquet(df, tmp_path / "s.parquet")
    back = SW.read_parquet(tmp_path / "s.parquet")
    pd.testing.assert_frame_equal(back, df)
    with pytest.raises(ValueError, match="df: not a sweep frame"):
        SW.to_parquet(pd.DataFrame({"a": [1]}), tmp_path / "x.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"path: .*other\.parquet' holds no sweep frame"):
        SW.read_parquet(tmp_path / "other.parquet")


def test_no_cells_is_an_empty_frame_and_cell_keys_come_first():
    df = SW.run([], scheduler="inprocess", cell_fn=SW.null_cell)
    assert list(df.columns) == ["workload", "mmu", "seed", "status", "error", "cell_s"]
    assert len(df) == 0 and str(df["seed"].dtype) == "Int64"
    df = SW.run([{"seed": 1, "z": 2, "mmu": "tdp", "workload": "x"}], scheduler="inprocess",
                cell_fn=SW.null_cell)
    assert list(df.columns) == ["workload", "mmu", "seed", "z", "status", "error", "cell_s",
                                "seed_echo"]


def test_cells_of_rebuilds_the_cells_and_records_are_json():
    g = grid(workloads=["touch", "cr3"], mmus=["tdp", "shadow"],
             params={"vcpus": [1, 3], "hot": [0.5]})
    df = SW.run(g, scheduler="inprocess", cell_fn=count_cell)
    assert SW.cells_of(df) == g.cells()     # cr3's hot comes back; touch has no hot key
    failed = SW.cells_of(df, status="failed")
    assert failed == [c for c in g.cells() if c["vcpus"] == 3]
    assert SW.run(failed, scheduler="inprocess", cell_fn=count_cell)["error"].tolist() == \
        df.loc[df["status"] == "failed", "error"].tolist()
    recs = SW.to_records(df)
    assert json.loads(json.dumps(recs)) == recs
    assert recs[0]["hot"] is None and recs[-1]["hot"] == 0.5 and recs[-1]["faults"] is None
    with pytest.raises(ValueError, match="status must be None, 'ok' or 'failed'"):
        SW.cells_of(df, status="dead")


def table_cell(cell):
    if cell["workload"] == "cr3" and cell["vcpus"] == 2:
        raise RuntimeError("boom")
    base = {"touch": 100, "cr3": 7}[cell["workload"]] * cell["vcpus"]
    extra = {"tdp_mmu": 0, "tdp": 1, "shadow": 20}[cell["mmu"]]
    out = {"faults": base + extra, "mean_ms": (base + extra) / 8}
    if cell["workload"] == "touch":
        out["split"] = cell.get("eager_split", False)
    return out


def test_format_table_puts_the_mmus_side_by_side():
    g = grid(workloads=["touch", "cr3"], mmus=["tdp_mmu", "tdp", "shadow"],
             params={"vcpus": [1, 2], "eager_split": [True]})
    df = SW.run(g, scheduler="inprocess", cell_fn=table_cell)
    assert SW.format_table(df) == SW.format_table(df, "faults")
    assert SW.format_table(df) == "\n".join([
        "faults per MMU (8 cells, 1 failed)",
        "workload  vcpus  eager_split  | tdp_mmu  tdp  shadow",
        "----------------------------------------------------",
        "touch     1      True         |     100  101     120",
        "touch     2      True         |     200  201     220",
        "cr3       1      -            |                   27",
        "cr3       2      -            |               failed",
    ])
    t = SW.format_table(df, "mean_ms").splitlines()
    assert t[3] == "touch     1      True         |    12.5  12.62      15"
    t = SW.format_table(df, "split").splitlines()
    assert t[3:] == ["touch     1      True         |    True  True    True",
                     "touch     2      True         |    True  True    True",
                     "cr3       1      -            |                     -",
                     "cr3       2      -            |                failed"]
    with pytest.raises(ValueError, match="metric 'nope' is not a column"):
        SW.format_table(df, "nope")


def test_format_table_averages_replicates_and_counts_failures():
    def half(cell):         # fails on odd seeds
        if cell["seed"] % 2:
            raise RuntimeError("odd")
        return {"n": cell["seed"]}
    cells = [{"workload": "w", "mmu": "tdp", "seed": s} for s in (2, 4, 3)]
    cells += [{"workload": "w", "mmu": "shadow", "seed": s} for s in (1, 3)]
    df = SW.run(cells, scheduler="inprocess", cell_fn=half)
    # tdp: seeds 2 and 4 succeed, 3 fails -> mean 3 over 2 of 3; shadow: both fail
    assert SW.format_table(df).splitlines() == [
        "n per MMU (5 cells, 3 failed)",
        "workload  |     tdp  shadow",
        "---------------------------",
        "w         | 3 (2/3)  failed",
    ]


# --- Dask ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("distributed")
    import dask
    from distributed import LocalCluster

    quiet = {n: logging.getLogger(n).level for n in ("distributed", "tornado", "asyncio")}
    for n in quiet:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    # no retries: a cell whose worker dies is failed at once (see the KilledWorker test)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=":0", silence_logs=logging.CRITICAL)
    try:
        yield c
    finally:
        c.close()
        for n, level in quiet.items():
            logging.getLogger(n).setLevel(level)


def _no_wall(df):
    return df.drop(columns=[c for c in df.columns if c.endswith("_s")])


def test_dask_and_inprocess_give_the_same_frame(cluster):
    g = grid(**GRID_2X2)
    local = SW.run(g, scheduler="inprocess", cell_fn=count_cell)
    seen = []
    dist = SW.run(g, scheduler=cluster.scheduler_address, cell_fn=count_cell,
                  progress=lambda *a: seen.append(a))
    pd.testing.assert_frame_equal(_no_wall(dist), _no_wall(local))
    assert (dist["status"] == "failed").sum() == 4
    assert dist.loc[dist["status"] == "failed", "error"].str.startswith(
        "RuntimeError: no room for 3 vCPUs").all()
    assert seen == [("sweep", i, 8) for i in range(9)]


def test_a_client_is_used_as_is_and_left_open(cluster):
    from distributed import Client
    with Client(cluster) as client:
        df = SW.run([{"workload": "w", "mmu": "tdp", "seed": s} for s in range(4)],
                    scheduler=client, cell_fn=SW.null_cell)
        assert df["seed_echo"].tolist() == [0, 1, 2, 3]
        assert client.status == "running"
        assert client.submit(SW.null_cell, {"seed": 9}).result() == {"seed_echo": 9}


def test_dask_timeout_fails_the_unfinished_cells(cluster, tmp_path):
    flag = str(tmp_path / "go")
    cells = [{"workload": "w", "mmu": "tdp", "seed": s, "flag": flag} for s in range(2)]
    try:
        df = SW.run(cells, scheduler=cluster.scheduler_address, cell_fn=wait_cell, timeout=0.5)
    finally:
        open(flag, "w").close()     # let the workers go
    assert list(df["status"]) == ["failed", "failed"]
    assert set(df["error"]) == {"TimeoutError: not finished within the sweep timeout of 0.5 s"}
    assert df["cell_s"].isna().all()


def test_scheduler_local_starts_and_closes_its_own_cluster():
    pytest.importorskip("distributed")
    g = grid(workloads=["touch"], mmus=["tdp", "shadow"], params={"vcpus": [1, 3]})
    df = SW.run(g, scheduler="local", n_workers=2, cell_fn=count_cell)
    pd.testing.assert_frame_equal(
        _no_wall(df), _no_wall(SW.run(g, scheduler="inprocess", cell_fn=count_cell)))


def test_the_default_metric_is_one_every_successful_cell_reports():
    def fn(cell):
        out = {"only_a": 1} if cell["workload"] == "a" else {}
        out.update(t_s=0.5, flag=True, faults=cell["seed"])
        return out
    cells = [{"workload": w, "mmu": "tdp", "seed": s} for w, s in (("a", 1), ("b", 2))]
    df = SW.run(cells, scheduler="inprocess", cell_fn=fn)
    assert list(df.columns)[-4:] == ["only_a", "t_s", "flag", "faults"]
    assert SW.format_table(df).splitlines()[0] == "faults per MMU (2 cells)"
    df = SW.run(cells[:1], scheduler="inprocess", cell_fn=lambda c: {"t_s": 1.0})
    assert SW.format_table(df).splitlines()[0] == "cell_s per MMU (1 cells)"


# --- the real workloads, tiny --------------------------------------------------------------

def test_grid_validates_against_the_real_workloads():
    from kvmmmu import workloads as W

    assert SW.MMUS == W.MMUS
    g = SW.Grid(["first_touch", "dirty_log"], ["tdp_mmu", "shadow"],
                {"vcpu_mib": [2, 4], "iterations": [1]})
    cells = g.cells()
    assert len(cells) == 8 and g.skipped == []
    assert [set(c) - set(SW.CELL_KEYS) for c in cells] == \
        [{"vcpu_mib"}] * 4 + [{"vcpu_mib", "iterations"}] * 4
    for kw, field, words in [
        (dict(params={"iterations": [1]}), "params.iterations", "no listed workload"),
        (dict(params={"vcpus": [0]}), "params.vcpus", "0 is below 1 (workload 'first_touch')"),
        (dict(params={"pattern": ["zigzag"]}), "params.pattern", "'zigzag' is not one of"),
        (dict(params={"write": ["yes"]}), "params.write", "takes a bool"),
    ]:
        with pytest.raises(SW.GridError, match=f"^{field}: .*{words}".replace("(", r"\(")
                           .replace(")", r"\)")):
            SW.Grid(["first_touch"], **kw)
    with pytest.raises(SW.GridError, match="^workloads: unknown workload 'dirty_log_perf'"):
        SW.Grid(["dirty_log_perf"])


def test_real_cells_same_frame_in_process_and_on_dask_and_rerun_alone(cluster):
    from kvmmmu import workloads as W

    g = SW.Grid(["dirty_log"], ["tdp_mmu", "shadow"], {"vcpu_mib": [2, 4], "iterations": [1]},
                seed=3)
    # one cell the workload refuses at run time (1 MiB does not make whole 2 MiB frames)
    cells = g.cells() + [{"workload": "dirty_log", "mmu": "tdp", "seed": 5, "vcpu_mib": 1}]
    local = SW.run(cells, scheduler="inprocess")
    dist = SW.run(cells, scheduler=cluster.scheduler_address)
    pd.testing.assert_frame_equal(_no_wall(dist), _no_wall(local))
    assert list(local["status"]) == ["ok"] * 4 + ["failed"]
    assert local.loc[4, "error"].startswith("WorkloadParamError: vcpu_mib: ")
    # the workload's own record: one iteration writes every page of every vCPU
    assert list(local.loc[:3, "dirty_pages"]) == [512, 512, 1024, 1024]
    assert local.loc[:3, "check_dirty_log_exact"].all()
    # a row reruns identically on its own, from its cell
    again = W.run_cell(SW.cells_of(dist)[2])
    row = dist.iloc[2]
    assert {k: v for k, v in again.items() if not k.endswith("_s")} == \
        {k: SW.to_records(dist)[2][k] for k in again if not k.endswith("_s")}
    assert row["mmu"] == "tdp_mmu" and row["vcpu_mib"] == 4
    table = SW.format_table(local, "dirty_pages").splitlines()
    assert table[1].split() == ["workload", "vcpu_mib", "iterations", "|", "tdp_mmu", "tdp",
                                "shadow"]
    assert table[3:] == [
        "dirty_log  2         1           |     512             512",
        "dirty_log  4         1           |    1024            1024",
        "dirty_log  1         -           |          failed",
    ]


# last: it ends a worker of the module's cluster (the nanny restarts it)
def test_a_worker_that_dies_is_a_failed_row(cluster):
    cells = [{"workload": "w", "mmu": "tdp", "seed": s} for s in (0, 1, 2)]
    df = SW.run(cells, scheduler=cluster.scheduler_address, cell_fn=die_in_worker_cell)
    assert len(df) == 3 and df["seed"].tolist() == [0, 1, 2]
    assert df.loc[1, "status"] == "failed"
    assert df.loc[1, "error"].startswith("KilledWorker")
    # the others ran, or were on the dying worker too (no retries in this cluster)
    for i in (0, 2):
        assert (df.loc[i, "status"], df.loc[i, "faults"]) == ("ok", i) or \
            df.loc[i, "error"].startswith("KilledWorker")


def test_the_grid_file_in_the_module_doc_is_a_valid_grid(tmp_path):
    import textwrap
    doc = SW.__doc__
    text = textwrap.dedent(doc[doc.index("    workloads = ["):doc.index("The frame.")])
    (tmp_path / "doc.toml").write_text(text)
    g = SW.Grid.from_file(tmp_path / "doc.toml")
    assert len(g) == 16 and g.params["eager_page_split"] == (True, False)
