"""Sweeps: a grid of workload runs, in-process or on Dask, as a pandas frame.

A :class:`Grid` is the cartesian product of workloads (``kvmmmu.workloads``),
MMU flavours and parameter values, with a grid ``seed`` and an optional
``repeat``.  :meth:`Grid.cells` expands it into cells, plain dicts::

    {"workload": "dirty_log", "mmu": "tdp_mmu", "seed": 2718281828, "vcpus": 2, ...}

that :func:`kvmmmu.workloads.run_cell` runs on their own: a cell carries its
seed, so one row of a sweep reruns identically outside the sweep.
:func:`run` runs the cells -- a plain loop (``scheduler="inprocess"``), a
``distributed.LocalCluster`` (``"local"``) or any Dask scheduler
(``"tcp://host:8786"``) -- and returns one DataFrame row per cell, failed
cells included; :func:`to_parquet` / :func:`read_parquet` store the frame and
:func:`format_table` prints one metric per MMU side by side.

Seeds.  A cell's seed is the first four bytes of a SHA-256 over the grid
seed, the workload, the cell's parameters (name and value, type included) and
the replicate index.  The MMU flavour is deliberately *not* hashed: the same
workload and parameters drive the same guest on every MMU, so the per-MMU
columns of a sweep compare one input stream.  Replicate 0 hashes the same
whatever ``repeat`` is, so raising ``repeat`` keeps the first replicate.

Parameters.  A grid parameter applies to the listed workloads that declare it
(``W.WORKLOADS[name].params``) and is absent from the other workloads' cells
(their frame rows hold a missing value there); every value is checked
against each declaring workload's ``Param.type``, ``choices`` and
``Param.check`` (its range) before anything runs.  Constraints between
parameters (e.g. memory that does not split into the slots asked for) are
the workload's to check when it runs: such a cell is a failed row.  A
workload/MMU pair the workload does not run on (``Workload.mmus``) is
skipped, not failed: :attr:`Grid.skipped` lists it.

A grid file (JSON, or TOML as here)::

    workloads = ["dirty_log", "first_touch"]
    mmus = ["tdp_mmu", "shadow"]          # optional: default all three
    seed = 0                               # optional
    repeat = 1                             # optional
    [params]
    vcpu_mib = [64, 256]
    eager_page_split = [true, false]

The frame.  Columns, in this order: the cell keys (``workload``, ``mmu``,
``seed``, then the grid parameters in grid order), ``status`` (``"ok"`` or
``"failed"``), ``error`` (``"Type: message"``, ``""`` when ok), ``cell_s``
(wall seconds of the cell, measured where it ran; NaN when its worker died
or the sweep timed out before it finished), then the summary keys in
order of first appearance.  Everything before ``status`` is the cell
(:func:`cells_of` rebuilds the cells from a frame).  dtypes depend on the
values, never on which cells failed or on the scheduler: integer columns are
the nullable ``Int64``, booleans ``boolean``, floats ``float64`` (NaN when
missing), strings pandas' string dtype; a column whose values mix kinds
(e.g. int and str) is ``object``.  Columns ending in ``_s`` are wall times,
the only values that differ between two runs of one grid.

pandas, pyarrow and dask/distributed are optional: each is imported inside
the function that needs it (``scheduler="inprocess"`` never imports dask).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
import pathlib
import time
import uuid

__all__ = ["Grid", "GridError", "MMUS", "cell_seed", "run", "to_parquet", "read_parquet",
           "format_table", "default_metric", "cells_of", "to_records", "null_cell", "CELL_KEYS",
           "STATUS_COLUMNS"]

# The MMU flavours a workload may run on (kvmmmu.workloads uses the same names).
MMUS = ("tdp_mmu", "tdp", "shadow")
# Every cell has these keys; the grid's parameters follow them.
CELL_KEYS = ("workload", "mmu", "seed")
# The columns run() adds between the cell keys and the summary keys.
STATUS_COLUMNS = ("status", "error", "cell_s")
_GRID_KEYS = ("workloads", "mmus", "params", "seed", "repeat")
_SEED_BYTES = 4         # cell seeds are in [0, 2**32): any RNG takes them


class GridError(ValueError):
    """A grid that cannot run: unknown workload or MMU, an empty or duplicated
    list, a parameter no listed workload declares, a value of the wrong type
    or outside the parameter's choices, a malformed grid file.  Raised before
    any cell runs; ``field`` names the offending field (``"workloads"``,
    ``"params.vcpus"``, ...)."""

    def __init__(self, field, msg):
        super().__init__(f"{field}: {msg}")
        self.field = field


def _registry(registry):
    if registry is not None:
        return registry
    from kvmmmu import workloads as W
    return W.WORKLOADS


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _type_name(v):
    return type(v).__name__


def _check_value(field, wl_name, param, value):
    """`value` converted to `param`'s type (an int for a float parameter
    becomes a float; nothing else is converted), or GridError."""
    t = param.type
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = _is_int(value)
        value = int(value) if ok else value
    elif t is float:
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
              and math.isfinite(value))
        value = float(value) if ok else value
    elif t is str:
        ok = isinstance(value, str)
    else:
        raise GridError(field, f"workload {wl_name!r} declares type {t!r}, "
                        "not one of int, float, bool, str")
    if not ok:
        want = "a finite float" if t is float else f"a {t.__name__}"
        raise GridError(field, f"{value!r} is a {_type_name(value)}; workload {wl_name!r} "
                        f"takes {want}")
    choices = getattr(param, "choices", None)
    if choices is not None and value not in choices:
        raise GridError(field, f"{value!r} is not one of {tuple(choices)!r} "
                        f"(workload {wl_name!r})")
    check = getattr(param, "check", None)       # W.Param.check: its range (lo, hi) too
    if check is not None:
        try:
            value = check(value)
        except ValueError as e:
            msg = str(e)
            name = getattr(param, "name", None)
            if name and msg.startswith(f"{name}: "):
                msg = msg[len(name) + 2:]
            raise GridError(field, f"{msg} (workload {wl_name!r})") from None
    return value


def _name_list(field, value, known, what):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise GridError(field, f"must be a list of {what} names, got {_type_name(value)}")
    if not value:
        raise GridError(field, f"must list at least one {what}")
    for v in value:
        if not isinstance(v, str):
            raise GridError(field, f"{v!r} is a {_type_name(v)}, not a {what} name")
        if v not in known:
            raise GridError(field, f"unknown {what} {v!r}; known: {', '.join(known)}")
    dup = sorted({v for v in value if value.count(v) > 1})
    if dup:
        raise GridError(field, f"{what} listed twice: {', '.join(dup)}")
    return tuple(value)


def _canonical(v):
    # JSON keeps bool, int, float and str apart (true / 1 / 1.0 / "1").
    return json.dumps(v, sort_keys=True, separators=(",", ":"), allow_nan=False)


def cell_seed(grid_seed, workload, params, replicate=0):
    """The seed of a cell: SHA-256 over the grid seed, the workload name, the
    cell's parameters (as given, keys sorted) and the replicate index; the
    first four bytes, big-endian.  Independent of the MMU (see the module
    doc) and of Python's ``hash()`` randomisation."""
    text = _canonical({"grid_seed": grid_seed, "workload": workload,
                       "params": dict(params), "replicate": replicate})
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:_SEED_BYTES], "big")


class Grid:
    """Workloads x MMU flavours x parameter values (see the module doc).

    Parameters
    ----------
    workloads : list of str
        Names in ``kvmmmu.workloads.WORKLOADS``; at least one, no duplicates.
    mmus : list of str, optional
        Flavours among ``MMUS``; default all of them (pairs a workload does
        not run on are skipped, see :attr:`skipped`).
    params : dict name -> list, optional
        Values per parameter, each list non-empty and without duplicates.
        Every name must be declared by at least one listed workload.
    seed : int
        The grid seed (>= 0); every cell seed derives from it.
    repeat : int
        Replicates per configuration (>= 1): cells that differ only in seed.
    registry : mapping name -> Workload, optional
        What to validate against; default ``kvmmmu.workloads.WORKLOADS``.
        A workload is anything with ``params`` (name -> Param with ``type``,
        ``choices``) and ``mmus``.

    Raises
    ------
    GridError
        Naming the field, for anything that would not run; also when every
        workload/MMU pair is skipped (nothing to run).
    """

    def __init__(self, workloads, mmus=MMUS, params=None, seed=0, repeat=1, *, registry=None):
        reg = _registry(registry)
        self.workloads = _name_list("workloads", workloads, tuple(reg), "workload")
        self.mmus = _name_list("mmus", mmus, MMUS, "MMU")
        if not _is_int(seed) or seed < 0:
            raise GridError("seed", f"must be an int >= 0, got {seed!r}")
        if not _is_int(repeat) or repeat < 1:
            raise GridError("repeat", f"must be an int >= 1, got {repeat!r}")
        self.seed, self.repeat = int(seed), int(repeat)
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise GridError("params", f"must be a mapping name -> list of values, "
                            f"got {_type_name(params)}")
        wls = {n: reg[n] for n in self.workloads}
        self.params = {}
        for name, values in params.items():
            field = f"params.{name}"
            if not isinstance(name, str):
                raise GridError("params", f"parameter names are str, got {name!r}")
            if name in CELL_KEYS:
                raise GridError(field, f"{name!r} is a cell key, not a parameter"
                                + ("; use the grid's seed" if name == "seed" else ""))
            declaring = [n for n, wl in wls.items() if name in wl.params]
            if not declaring:
                raise GridError(field, f"no listed workload ({', '.join(self.workloads)}) "
                                f"declares parameter {name!r}")
            if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
                raise GridError(field, f"must be a list of values, got {_type_name(values)}"
                                f" {values!r}")
            if not values:
                raise GridError(field, "must list at least one value")
            checked = []
            for v in values:
                for n in declaring:
                    v = _check_value(field, n, wls[n].params[name], v)
                checked.append(v)
            canon = [_canonical(v) for v in checked]
            dup = sorted({c for c in canon if canon.count(c) > 1})
            if dup:
                raise GridError(field, f"value listed twice: {', '.join(dup)}")
            self.params[name] = tuple(checked)
        self.skipped = []
        for n in self.workloads:
            for m in self.mmus:
                if m not in wls[n].mmus:
                    self.skipped.append({"workload": n, "mmu": m,
                                         "reason": f"{n} runs on {', '.join(wls[n].mmus)}"})
        self._cells = self._expand(wls)
        if not self._cells:
            raise GridError("mmus", "no cell to run: no listed workload runs on "
                            f"{', '.join(self.mmus)}")

    def _expand(self, wls):
        out = []
        for n in self.workloads:
            names = [p for p in self.params if p in wls[n].params]
            mmus = [m for m in self.mmus if m in wls[n].mmus]
            for combo in itertools.product(*(self.params[p] for p in names)):
                pv = dict(zip(names, combo))
                for r in range(self.repeat):
                    seed = cell_seed(self.seed, n, pv, r)
                    for m in mmus:
                        out.append({"workload": n, "mmu": m, "seed": seed, **pv})
        return out

    def cells(self):
        """The cells, fresh dicts, in a stable order: workloads as listed,
        then parameter values (cartesian product, the first parameter
        slowest), then replicates, then MMUs (fastest, so the MMUs of one
        configuration are adjacent)."""
        return [dict(c) for c in self._cells]

    def __len__(self):
        return len(self._cells)

    def to_dict(self):
        """The grid as ``from_dict`` takes it (values normalised)."""
        return {"workloads": list(self.workloads), "mmus": list(self.mmus),
                "params": {k: list(v) for k, v in self.params.items()},
                "seed": self.seed, "repeat": self.repeat}

    def __repr__(self):
        return (f"Grid(workloads={list(self.workloads)!r}, mmus={list(self.mmus)!r}, "
                f"params={ {k: list(v) for k, v in self.params.items()}!r}, "
                f"seed={self.seed}, repeat={self.repeat})  # {len(self)} cells, "
                f"{len(self.skipped)} skipped pairs")

    def __eq__(self, other):
        return isinstance(other, Grid) and self.to_dict() == other.to_dict()

    __hash__ = None

    @classmethod
    def from_dict(cls, d, *, registry=None):
        """A grid from a mapping with keys ``workloads``, ``mmus`` (optional),
        ``params`` (optional), ``seed`` (optional), ``repeat`` (optional);
        any other key is a GridError."""
        if not isinstance(d, dict):
            raise GridError("grid", f"must be a mapping, got {_type_name(d)}")
        extra = [k for k in d if k not in _GRID_KEYS]
        if extra:
            raise GridError(str(extra[0]), f"unknown grid key; keys are {', '.join(_GRID_KEYS)}")
        if "workloads" not in d:
            raise GridError("workloads", "missing (the list of workload names)")
        return cls(d["workloads"], d.get("mmus", MMUS), d.get("params"), d.get("seed", 0),
                   d.get("repeat", 1), registry=registry)

    @classmethod
    def from_file(cls, path, *, registry=None):
        """A grid from a ``.json`` or ``.toml`` file holding what
        :meth:`from_dict` takes (in TOML, the parameters as a ``[params]``
        table)."""
        p = pathlib.Path(path)
        suffix = p.suffix.lower()
        if suffix not in (".json", ".toml"):
            raise GridError("path", f"{str(path)!r}: a grid file ends in .json or .toml")
        raw = p.read_bytes()
        if suffix == ".json":
            try:
                d = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise GridError("path", f"{str(path)!r} is not valid JSON: {e}") from None
        else:
            try:
                import tomllib
            except ModuleNotFoundError:         # Python 3.10
                try:
                    import tomli as tomllib
                except ModuleNotFoundError:
                    raise GridError("path", f"{str(path)!r}: reading TOML needs Python >= 3.11 "
                                    "or the tomli package") from None
            try:
                d = tomllib.loads(raw.decode())
            except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
                raise GridError("path", f"{str(path)!r} is not valid TOML: {e}") from None
        return cls.from_dict(d, registry=registry)


# --- running cells ------------------------------------------------------------------------

def null_cell(cell):
    """A cell function that does no work: returns ``{"seed_echo": seed}``.
    Run a grid with ``cell_fn=null_cell`` to measure the sweep machinery's
    own cost per cell (benchmarks/compare_sweep.py)."""
    return {"seed_echo": cell["seed"]}


def _plain(v):
    """A summary value as a plain Python scalar, or TypeError."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    try:
        import numpy as np
    except ModuleNotFoundError:     # pragma: no cover - numpy is a core dependency
        np = None
    if np is not None and isinstance(v, np.generic):
        return _plain(v.item())
    raise TypeError(f"a summary value is a {_type_name(v)} ({v!r:.60}), not int/float/str/bool")


def _call_cell(cell_fn, cell):
    """Run one cell where it is scheduled: (summary or None, error text,
    seconds).  A top-level function so a Dask worker can import it; the
    in-process loop calls it too, so both paths produce the same rows."""
    t0 = time.perf_counter()
    try:
        out = cell_fn(dict(cell))
        if not isinstance(out, dict):
            raise TypeError(f"cell function returned a {_type_name(out)}, not a dict")
        summary = {}
        for k, v in out.items():
            if not isinstance(k, str):
                raise TypeError(f"summary key {k!r} is not a str")
            if k in STATUS_COLUMNS:
                raise ValueError(f"summary key {k!r} collides with a sweep column")
            v = _plain(v)
            if k in cell and (cell[k] != v or type(cell[k]) is not type(v)):
                raise ValueError(f"summary key {k!r} = {v!r} contradicts the cell's {cell[k]!r}")
            summary[k] = v
    except Exception as e:      # a failed cell is a row, never a crash of the sweep
        return None, _error_text(e), time.perf_counter() - t0
    return summary, "", time.perf_counter() - t0


def _error_text(e):
    msg = str(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _check_cells(grid_or_cells):
    if isinstance(grid_or_cells, Grid):
        return grid_or_cells.cells()
    if isinstance(grid_or_cells, (str, bytes, dict)) or not hasattr(grid_or_cells, "__iter__"):
        raise TypeError(f"grid_or_cells: a Grid or a list of cell dicts, "
                        f"got {_type_name(grid_or_cells)}")
    cells = list(grid_or_cells)
    for i, c in enumerate(cells):
        if not isinstance(c, dict):
            raise TypeError(f"grid_or_cells[{i}]: a cell is a dict, got {_type_name(c)}")
        missing = [k for k in CELL_KEYS if k not in c]
        if missing:
            raise ValueError(f"grid_or_cells[{i}]: cell lacks {', '.join(missing)}")
        bad = [k for k in c if not isinstance(k, str) or k in STATUS_COLUMNS]
        if bad:
            raise ValueError(f"grid_or_cells[{i}]: cell key {bad[0]!r} is not allowed")
        if not _is_int(c["seed"]) or c["seed"] < 0:
            raise ValueError(f"grid_or_cells[{i}]: seed must be an int >= 0, got {c['seed']!r}")
    return [dict(c) for c in cells]


def _check_count(name, v):
    if not _is_int(v) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def run(grid_or_cells, *, scheduler="local", n_workers=2, threads_per_worker=1, progress=None,
        cell_fn=None, timeout=None):
    """Run every cell; a pandas DataFrame with one row per cell, in cell order.

    Parameters
    ----------
    grid_or_cells : Grid or list of dict
        Cells as :meth:`Grid.cells` makes them (``workload``, ``mmu``,
        ``seed`` and parameters).
    scheduler : str or distributed.Client
        ``"inprocess"``: a plain loop in this process (dask is not imported).
        ``"local"``: a ``distributed.LocalCluster`` of ``n_workers``
        processes with ``threads_per_worker`` threads each, started for this
        call and closed afterwards.  An address (``"tcp://host:8786"``, any
        ``scheme://``): a running Dask scheduler; its workers must be able to
        import kvmmmu (and ``cell_fn``), else every row fails with the import
        error; cells wait while the cluster has no worker (see ``timeout``).
        A ``distributed.Client``: used as is, left open.  ``n_workers`` and
        ``threads_per_worker`` apply to ``"local"`` only.
    progress : callable(desc, done, total), optional
        Called with ``("sweep", 0, total)`` first, then after each finished
        cell (in completion order).
    cell_fn : callable(cell) -> dict, optional
        What runs a cell; default :func:`kvmmmu.workloads.run_cell`.  On
        Dask it must be picklable (an importable top-level function).
    timeout : float, optional
        Wall seconds for the whole sweep.  Cells not finished by then are
        failed rows with a ``TimeoutError`` (on Dask they are cancelled, and
        the clock starts when the cells are submitted, after the cluster
        started; a cell already running in-process is not interrupted, the
        ones after it are not started).

    A cell that raises, returns something other than a dict of scalars, or
    dies with its worker (``KilledWorker``) is a ``"failed"`` row whose
    ``error`` says why; its summary columns are missing.  See the module doc
    for the columns and dtypes.
    """
    cells = _check_cells(grid_or_cells)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable(desc, done, total), got {_type_name(progress)}")
    if cell_fn is None:
        from kvmmmu.workloads import run_cell as cell_fn
    elif not callable(cell_fn):
        raise TypeError(f"cell_fn must be callable(cell) -> dict, got {_type_name(cell_fn)}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or not timeout > 0 or not math.isfinite(timeout)):
        raise ValueError(f"timeout must be None or a finite number of seconds > 0, "
                         f"got {timeout!r}")
    if isinstance(scheduler, str):
        if scheduler == "local":
            _check_count("n_workers", n_workers)
            _check_count("threads_per_worker", threads_per_worker)
        elif scheduler != "inprocess" and "://" not in scheduler:
            raise ValueError(f"scheduler must be 'inprocess', 'local' or an address "
                             f"'tcp://host:port', got {scheduler!r}")
    elif not (hasattr(scheduler, "map") and hasattr(scheduler, "scheduler")):
        raise TypeError(f"scheduler: a str or a distributed.Client, got {_type_name(scheduler)}")
    import pandas       # noqa: F401  (fail before running anything if it is missing)

    total = len(cells)
    results = [None] * total
    if progress is not None:
        progress("sweep", 0, total)
    if scheduler == "inprocess":
        _run_inprocess(cells, cell_fn, results, progress, timeout)
    else:
        _run_dask(cells, cell_fn, results, progress, timeout, scheduler, n_workers,
                  threads_per_worker)
    return _frame(cells, results)


def _run_inprocess(cells, cell_fn, results, progress, timeout):
    deadline = None if timeout is None else time.monotonic() + timeout
    for i, c in enumerate(cells):
        if deadline is not None and time.monotonic() >= deadline:
            results[i] = (None, f"TimeoutError: not started within the sweep timeout of "
                          f"{timeout:g} s", 0.0)
        else:
            results[i] = _call_cell(cell_fn, c)
        if progress is not None:
            progress("sweep", i + 1, len(cells))


def _run_dask(cells, cell_fn, results, progress, timeout, scheduler, n_workers,
              threads_per_worker):
    import contextlib
    import logging

    from distributed import Client, LocalCluster, as_completed

    with contextlib.ExitStack() as stack:
        if scheduler == "local":
            cluster = stack.enter_context(LocalCluster(
                n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                dashboard_address=":0", silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        elif isinstance(scheduler, str):
            client = stack.enter_context(Client(scheduler))
        else:
            client = scheduler
        run_id = uuid.uuid4().hex[:12]
        keys = [f"kvmmmu-sweep-{run_id}-{i}" for i in range(len(cells))]
        futures = client.map(_call_cell, [cell_fn] * len(cells), cells, key=keys, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        done = 0
        try:
            for fut in as_completed(futures, timeout=timeout):
                i = index[fut.key]
                try:
                    results[i] = fut.result()
                except Exception as e:      # KilledWorker, CancelledError, unpickling errors
                    results[i] = (None, _error_text(e), math.nan)
                done += 1
                if progress is not None:
                    progress("sweep", done, len(cells))
        except TimeoutError:
            pass
        finally:
            pending = [f for f in futures if results[index[f.key]] is None]
            if pending:
                client.cancel(pending)
        for f in pending:
            results[index[f.key]] = (None, f"TimeoutError: not finished within the sweep "
                                     f"timeout of {timeout:g} s", math.nan)
            done += 1
            if progress is not None:
                progress("sweep", done, len(cells))


# --- the frame ----------------------------------------------------------------------------

def _kind(values):
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kinds.add("bool")
        elif isinstance(v, int):
            kinds.add("int")
        elif isinstance(v, float):
            kinds.add("float")
        elif isinstance(v, str):
            kinds.add("str")
        else:
            kinds.add("object")
    if kinds == {"int", "float"}:
        return "float"
    if len(kinds) == 1:
        return kinds.pop()
    return "object" if kinds else "float"      # all missing: a NaN column


_DTYPES = {"bool": "boolean", "int": "Int64", "float": "float64", "str": "str",
           "object": "object"}


def _series(values, empty="float"):
    import pandas as pd

    kind = _kind(values) if values else empty
    if kind == "float":
        return pd.Series([math.nan if v is None else float(v) for v in values], dtype="float64")
    if kind == "object":
        return pd.Series(values, dtype="object")
    return pd.Series(values, dtype=_DTYPES[kind])


def _frame(cells, results):
    import pandas as pd

    cell_cols, summary_cols = list(CELL_KEYS), []
    for c in cells:
        for k in c:
            if k not in cell_cols:
                cell_cols.append(k)
    for summary, _err, _s in results:
        for k in summary or ():
            if k not in summary_cols and k not in cell_cols:
                summary_cols.append(k)
    cols = {}
    for k in cell_cols:
        cols[k] = _series([c.get(k) for c in cells], "int" if k == "seed" else "str")
    cols["status"] = pd.Series(["ok" if s is not None else "failed" for s, _e, _t in results],
                               dtype="str")
    cols["error"] = pd.Series([e for _s, e, _t in results], dtype="str")
    cols["cell_s"] = pd.Series([t for _s, _e, t in results], dtype="float64")
    for k in summary_cols:
        cols[k] = _series([None if s is None else s.get(k) for s, _e, _t in results])
    return pd.DataFrame(cols, index=pd.RangeIndex(len(cells)))


def _cell_columns(df):
    cols = list(df.columns)
    if "status" not in cols or not all(k in cols for k in CELL_KEYS):
        raise ValueError("df: not a sweep frame (needs workload, mmu, seed and status columns)")
    return cols[:cols.index("status")]


def _py(v):
    import pandas as pd

    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return _plain(v)


def cells_of(df, status=None):
    """The cells of a sweep frame's rows (optionally only rows whose
    ``status`` is ``status``, e.g. ``"failed"`` to rerun them), as plain
    dicts that :func:`run` or ``W.run_cell`` take; a parameter missing in a
    row is left out of its cell."""
    if status is not None and status not in ("ok", "failed"):
        raise ValueError(f"status must be None, 'ok' or 'failed', got {status!r}")
    cols = _cell_columns(df)
    rows = df if status is None else df[df["status"] == status]
    out = []
    for rec in rows[cols].itertuples(index=False, name=None):
        out.append({k: _py(v) for k, v in zip(cols, rec) if _py(v) is not None})
    return out


def to_records(df):
    """The frame as a list of JSON-able dicts (missing values as None)."""
    cols = list(df.columns)
    return [{k: _py(v) for k, v in zip(cols, rec)}
            for rec in df.itertuples(index=False, name=None)]


def to_parquet(df, path):
    """Write a sweep frame to a Parquet file (pyarrow); dtypes survive."""
    _cell_columns(df)
    df.to_parquet(path, engine="pyarrow", index=False)


def read_parquet(path):
    """Read a frame :func:`to_parquet` wrote."""
    import pandas as pd

    df = pd.read_parquet(path, engine="pyarrow")
    try:
        _cell_columns(df)
    except ValueError:
        raise ValueError(f"path: {str(path)!r} holds no sweep frame (needs workload, mmu, seed "
                         f"and status columns)") from None
    return df


# --- the text table -----------------------------------------------------------------------

def default_metric(df):
    """The first numeric, non-wall-time summary column every successful cell
    reports (e.g. ``pf_taken`` in a grid of several workloads), else the
    first one any cell reports, else ``cell_s``."""
    import pandas as pd

    cols = list(df.columns)
    summary = cols[cols.index("cell_s") + 1:] if "cell_s" in cols else []
    numeric = [k for k in summary
               if not k.endswith("_s") and pd.api.types.is_numeric_dtype(df[k])
               and not pd.api.types.is_bool_dtype(df[k]) and df[k].notna().any()]
    ok = df["status"] == "ok"
    for k in numeric:
        if df.loc[ok, k].notna().all():
            return k
    return numeric[0] if numeric else "cell_s"


def _fmt(v):
    if isinstance(v, bool):
        return str(v)
    if _is_int(v):
        return str(int(v))
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    return str(v)


def format_table(df, metric=None):
    """A text table of one metric: a row per (workload, parameters), a column
    per MMU, for a side-by-side look at the MMUs.

    ``metric`` defaults to the first numeric, non-wall-time summary column
    that every successful cell reports (else the first any cell reports,
    else ``cell_s``).  With ``repeat`` > 1 a value is the mean over
    the replicates that succeeded (their count follows in parentheses when it
    is not all of them).  ``failed`` marks a configuration whose every
    replicate failed, ``-`` a metric the workload does not report, an empty
    cell an MMU the workload was not run on.
    """
    import pandas as pd

    cell_cols = _cell_columns(df)
    if metric is None:
        metric = default_metric(df)
    if metric not in df.columns:
        raise ValueError(f"metric {metric!r} is not a column; columns: {', '.join(df.columns)}")
    params = [k for k in cell_cols if k not in CELL_KEYS]
    mmus = [m for m in MMUS if (df["mmu"] == m).any()]
    mmus += [m for m in pd.unique(df["mmu"]) if m not in mmus]
    numeric = (pd.api.types.is_numeric_dtype(df[metric])
               and not pd.api.types.is_bool_dtype(df[metric]))
    groups = {}         # (workload, param values) -> mmu -> [(status, value)]
    for rec in df[["workload", "mmu", "status", metric] + params].itertuples(index=False,
                                                                             name=None):
        wl, mmu, status, value = rec[:4]
        key = (wl,) + tuple(_py(v) for v in rec[4:])
        groups.setdefault(key, {}).setdefault(mmu, []).append((status, _py(value)))
    header = ["workload"] + params + mmus
    lines = []
    for key, per_mmu in groups.items():
        row = [key[0]] + ["-" if v is None else str(v) for v in key[1:]]
        for m in mmus:
            reps = per_mmu.get(m)
            if not reps:
                row.append("")
                continue
            ok = [v for s, v in reps if s == "ok"]
            if not ok:
                row.append("failed")
                continue
            vals = [v for v in ok if v is not None]
            if not vals:
                text = "-"
            elif numeric:
                text = _fmt(sum(vals) / len(vals) if len(vals) > 1 else vals[0])
            else:
                text = "/".join(dict.fromkeys(_fmt(v) for v in vals))
            if len(ok) < len(reps):
                text += f" ({len(ok)}/{len(reps)})"
            row.append(text)
        lines.append(row)
    widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]
    nkey = 1 + len(params)

    def fmt_row(r):
        left = "  ".join(str(r[i]).ljust(widths[i]) for i in range(nkey))
        right = "  ".join(str(r[i]).rjust(widths[i]) for i in range(nkey, len(r)))
        return (left + "  | " + right).rstrip()

    n_failed = int((df["status"] == "failed").sum())
    title = f"{metric} per MMU ({len(df)} cells" + (f", {n_failed} failed)" if n_failed else ")")
    rule = "-" * len(fmt_row(header))
    return "\n".join([title, fmt_row(header), rule] + [fmt_row(r) for r in lines])
