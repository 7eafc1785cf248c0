"""Matplotlib figures for ``python -m kvmmmu run/sweep --plot DIR``.

* :func:`plot_report`: a workload report (``W.Report.to_dict()``): the
  memory each MMU structure holds over the run (stacked bars per sample, or
  stacked areas when there are many samples; one colour per structure of the
  timeline's ``"mem"``) and the faults by kind over the run (one line per
  counter of the timeline's ``"faults"``, cumulative).
* :func:`plot_sweep`: a sweep's DataFrame: one metric as side-by-side bars,
  one bar per MMU flavour in each group of workload and parameters.

matplotlib is an optional dependency (``pip install kvmmmu[plot]``): it is
imported inside the functions, and they draw on a bare
:class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, no display,
no global figure state), so they work headless and from any thread.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["plot_report", "plot_sweep", "PlotError"]

#: columns of a sweep DataFrame that are never a parameter of a group
_NOT_PARAMS = ("mmu", "seed", "status", "error", "workload")


class PlotError(ValueError):
    """Input the plot functions cannot draw (names the argument)."""


def _figure(**kw):
    from matplotlib.figure import Figure           # noqa: PLC0415 (optional dependency)
    return Figure(**kw)


def _byte_unit(peak: float) -> tuple[str, float]:
    for name, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if peak >= scale:
            return name, float(scale)
    return "bytes", 1.0


#: at most this many samples get a tick label each ("step: phase")
MAX_LABELLED_STEPS = 24


def _phase_axis(ax, steps, phases) -> str:
    """Shade alternate runs of samples of one phase; label each step with its
    phase when there are few; return the x-axis label."""
    runs = []                                       # [phase, first step, last step]
    for st, ph in zip(steps, phases):
        if runs and runs[-1][0] == ph:
            runs[-1][2] = st
        else:
            runs.append([ph, st, st])
    for i, (_, a, b) in enumerate(runs):
        if i % 2 == 0:
            ax.axvspan(a - 0.5, b + 0.5, color="0.93", zorder=0, linewidth=0)
    ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    if len(steps) <= MAX_LABELLED_STEPS:
        ax.set_xticks(steps, [f"{st}: {ph}" for st, ph in zip(steps, phases)], rotation=30,
                      ha="right", fontsize=7)
        return "step: phase (one sample at the end of each)"
    return (f"step ({len(steps)} samples in {len(runs)} phase runs, shaded alternately; "
            "see the report's timeline for their names)")


def _check_timeline(report: dict) -> list:
    if not isinstance(report, dict):
        raise PlotError(f"report_dict must be a dict (Report.to_dict()), not {type(report).__name__}")
    tl = report.get("timeline")
    if not isinstance(tl, list) or not tl:
        raise PlotError("report_dict['timeline'] must be a non-empty list of samples")
    for i, s in enumerate(tl):
        if not isinstance(s, dict) or not {"step", "phase", "mem", "faults"} <= set(s):
            raise PlotError(f"report_dict['timeline'][{i}] lacks step/phase/mem/faults")
    return tl


def _title(report: dict, what: str) -> str:
    wl, mmu, seed = report.get("workload", "?"), report.get("mmu", "?"), report.get("seed", "?")
    return f"{wl} on {mmu} (seed {seed}): {what}"


def plot_report(report_dict: dict, outdir) -> list[str]:
    """Write ``<workload>_<mmu>_memory.png`` and ``<workload>_<mmu>_faults.png``
    into `outdir` (created if missing); return their paths.

    Parameters
    ----------
    report_dict : dict
        ``W.Report.to_dict()``: its ``timeline`` samples ``{"step", "phase",
        "mem": {structure: bytes}, "faults": {counter: cumulative count}}``.
    outdir : path

    Raises
    ------
    PlotError
        `report_dict` has no usable timeline.
    ImportError
        matplotlib is not installed.
    """
    tl = _check_timeline(report_dict)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    steps = [int(s["step"]) for s in tl]
    phases = [str(s["phase"]) for s in tl]
    stem = f"{report_dict.get('workload', 'report')}_{report_dict.get('mmu', 'mmu')}"
    paths = []

    # memory by structure: stacked areas
    structs = list(dict.fromkeys(k for s in tl for k in s["mem"]))
    series = [[float(s["mem"].get(k, 0)) for s in tl] for k in structs]
    totals = [sum(col) for col in zip(*series)] if series else [0.0]
    unit, scale = _byte_unit(max(totals))
    fig = _figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    xlabel = _phase_axis(ax, steps, phases)
    if structs and len(steps) <= MAX_LABELLED_STEPS:   # a stacked bar per sample
        bottom = [0.0] * len(steps)
        for k, ys in zip(structs, series):
            h = [v / scale for v in ys]
            ax.bar(steps, h, bottom=bottom, width=0.6, label=k, alpha=0.9, zorder=2)
            bottom = [b + x for b, x in zip(bottom, h)]
    elif structs:                                   # many samples: stacked areas
        ax.stackplot(steps, [[v / scale for v in ys] for ys in series], labels=structs,
                     alpha=0.85, zorder=2)
    if structs:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="structure")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title(_title(report_dict, "MMU memory by structure"))
    ax.set_ylim(bottom=0)
    p = out / f"{stem}_memory.png"
    fig.savefig(p, dpi=100)
    paths.append(str(p))

    # faults by kind: cumulative lines (one sample: a bar per kind)
    kinds = list(dict.fromkeys(k for s in tl for k in s["faults"]))
    counts = {k: [int(s["faults"].get(k, 0)) for s in tl] for k in kinds}
    zero = [k for k in kinds if not any(counts[k])]
    fig = _figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    if len(steps) == 1:
        bars = ax.bar(range(len(kinds)), [counts[k][0] for k in kinds],
                      color=[f"C{i}" for i in range(len(kinds))], zorder=2)
        ax.bar_label(bars, labels=[f"{counts[k][0]:,}" for k in kinds], fontsize=7, padding=1)
        ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
        xlabel = f"fault counter (one sample, at the end of phase {phases[0]!r})"
    else:
        xlabel = _phase_axis(ax, steps, phases)
        styles = ("-", "--", "-.", ":")
        drawn = 0
        for k in kinds:
            if any(counts[k]):                      # dashes keep equal counters visible
                ax.plot(steps, counts[k], marker="o", markersize=4, label=k, zorder=2,
                        linestyle=styles[drawn % len(styles)], linewidth=1.6)
                drawn += 1
        if drawn:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                      title="fault counter")
        if zero:
            ax.text(0.99, 0.02, "zero throughout: " + ", ".join(zero), transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=7, color="0.35")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("faults (cumulative count)")
    ax.set_title(_title(report_dict, "faults by kind"))
    ax.set_ylim(bottom=0)
    p = out / f"{stem}_faults.png"
    fig.savefig(p, dpi=100)
    paths.append(str(p))
    return paths


def _metric_unit(metric: str, peak: float) -> tuple[str, float]:
    if metric.endswith("_s"):
        return "seconds", 1.0
    if "bytes" in metric or metric.startswith("mem_"):   # workloads' mem_<structure>: bytes
        return _byte_unit(peak)
    return "count", 1.0


def _is_missing(v) -> bool:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return True
    try:
        import pandas as pd                          # noqa: PLC0415 (pd.NA of nullable dtypes)
    except ImportError:                               # pragma: no cover
        return False
    return v is pd.NA or v is pd.NaT


def _plain(v):
    """A numpy / pandas scalar as a Python one."""
    return v.item() if hasattr(v, "item") else v


def _bar_text(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e7:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def plot_sweep(df, outdir, metric: str, group_by=None) -> list[str]:
    """Write ``sweep_<metric>.png`` into `outdir`: `metric` as grouped bars,
    one group per workload and parameter combination, one bar per MMU
    flavour; a failed cell (``status`` not ``"ok"``) or a missing value shows
    as an empty slot marked ``failed`` / ``n/a``.  Returns ``[path]``.

    Parameters
    ----------
    df : pandas.DataFrame
        ``kvmmmu.sweep.run``'s result: one row per cell with ``workload``,
        ``mmu``, the cell's parameters, ``status`` and the summary columns.
    outdir : path
    metric : str
        A numeric column of `df`.
    group_by : list of str, optional
        The columns that make a group (default: ``workload`` and every other
        column that is not numeric-summary-like: the cell parameters named in
        ``df.attrs["params"]`` when the sweep recorded them, else the columns
        whose values are bool or str, or that vary while having few values).

    Raises
    ------
    PlotError
        `metric` is not a column, or is not numeric; `df` has no ``mmu``.
    """
    cols = list(df.columns)
    if metric not in cols:
        raise PlotError(f"metric {metric!r} is not a column of the sweep (columns: "
                        f"{', '.join(map(str, cols))})")
    if "mmu" not in cols:
        raise PlotError("the sweep DataFrame has no 'mmu' column")
    vals = [_plain(v) for v in df[metric].tolist() if not _is_missing(v)]
    if any(isinstance(v, (bool, str)) or not isinstance(v, (int, float)) for v in vals):
        raise PlotError(f"metric {metric!r} is not numeric")
    if group_by is None:
        group_by = ["workload"] if "workload" in cols else []
        params = df.attrs.get("params") if hasattr(df, "attrs") else None
        if params:
            group_by += [c for c in params if c in cols and c not in _NOT_PARAMS]
    for c in group_by:
        if c not in cols:
            raise PlotError(f"group_by column {c!r} is not in the sweep")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)

    mmus = list(dict.fromkeys(df["mmu"].tolist()))
    groups: dict[tuple, dict] = {}
    status = df["status"].tolist() if "status" in cols else ["ok"] * len(df)
    keys = [tuple(r) for r in df[group_by].itertuples(index=False)] if group_by else \
        [()] * len(df)
    for key, mmu, st, v in zip(keys, df["mmu"].tolist(), status, df[metric].tolist()):
        key = tuple(None if _is_missing(k) else _plain(k) for k in key)
        cell = groups.setdefault(key, {})
        cell.setdefault(mmu, []).append((st, None if _is_missing(v) else _plain(v)))
    peak = max((abs(float(v)) for v in vals), default=0.0)
    unit, scale = _metric_unit(metric, peak)

    n_groups = len(groups)
    width = 0.8 / max(1, len(mmus))
    fig = _figure(figsize=(max(6.0, 1.2 + n_groups * (0.5 + 0.35 * len(mmus))), 5.5),
                  layout="constrained")
    ax = fig.add_subplot()
    labels = []
    for gi, (key, cells) in enumerate(groups.items()):
        labels.append("\n".join(str(k) if c == "workload" else f"{c}={'-' if k is None else k}"
                                for c, k in zip(group_by, key)) or "all")
    for mi, mmu in enumerate(mmus):
        xs, hs = [], []
        for gi, (key, cells) in enumerate(groups.items()):
            x = gi - 0.4 + width * (mi + 0.5)
            entries = cells.get(mmu, [])
            ok = [float(v) for st, v in entries if st == "ok" and not _is_missing(v)]
            if ok:
                xs.append(x)
                hs.append(sum(ok) / len(ok) / scale)   # several seeds: their mean
            elif entries:
                failed = any(st != "ok" for st, _ in entries)
                ax.text(x, 0, "failed" if failed else "n/a", rotation=90, ha="center",
                        va="bottom", fontsize=7, color="red" if failed else "0.4")
        bars = ax.bar(xs, hs, width=width * 0.95, label=mmu, zorder=2)
        ax.bar_label(bars, labels=[_bar_text(h) for h in hs], fontsize=6, padding=1)
    ax.set_xticks(range(n_groups), labels, fontsize=7)
    ax.set_xlim(-0.5, n_groups - 0.5)
    ax.set_xlabel(" / ".join(group_by) if group_by else "all cells")
    ax.set_ylabel(f"{metric} ({unit})")
    ax.set_title(f"sweep: {metric} per MMU flavour")
    ax.grid(axis="y", color="0.9", zorder=0)
    ax.legend(title="MMU", fontsize=8)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in metric)
    p = out / f"sweep_{safe}.png"
    fig.savefig(p, dpi=100)
    return [os.fspath(p)]
