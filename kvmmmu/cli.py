"""``python -m kvmmmu``: the command line.

Subcommands (``python -m kvmmmu SUBCOMMAND --help`` says more about each)::

    demo   [--tdx]                                   a short tour of the model
    run    WORKLOAD [--PARAM VALUE ...] [--mmu M]    a selftest-like workload and its report
    replay FILE                                      a vCPU input stream, or a recorded
                                                     kernel trace against the model
    diff   A B                                       two kvmmmu traces, host values masked
    sweep  GRID                                      a grid of workload runs (Dask)

Every subcommand has ``--json`` (one JSON document on stdout, nothing else
there), long work shows tqdm progress bars on stderr, and
``run``/``sweep`` draw matplotlib PNGs with ``--plot DIR`` (the paths go to
stderr, or into the JSON under ``"plots"``).

Exit status: 0 success (``replay`` of a recorded trace / ``diff``: the
traces agree); 1 a result that is not success (traces that differ, a sweep
cell that failed, a model that refused a stream event); 2 bad arguments or
input (argparse's message names the argument), or a missing optional
dependency (the message names the extra to install).

This module imports nothing of the model at import time: every subcommand
imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

__all__ = ["main", "build_parser", "Progress"]

PROG = "python -m kvmmmu"
#: options every workload parser has; a workload parameter of one of these names
#: would be shadowed, so build_parser refuses it (WorkloadParamError naming it)
COMMON_OPTION_NAMES = ("mmu", "seed", "json", "plot", "progress", "stream", "help")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; ``(default: X)`` after an
    option's help when it has a meaningful default and does not say it."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if ("%(default)" not in h and "default" not in h and action.option_strings
                and d is not None and d is not False and d is not argparse.SUPPRESS
                and action.nargs != 0):
            h += " (default: %(default)s)"
        return h


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*a, **kw)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_INT_RE = re.compile(r"\s*([+-]?)(0x[0-9a-f]+|\d+)\s*([kmgt]?)(?:i?b)?\s*\Z", re.I)


def _int_value(text: str) -> int:
    """An integer: decimal, ``0x`` hex, or with a binary size suffix
    (``4K``, ``2M``, ``1G``, ``1T``; ``KiB``/``KB`` accepted)."""
    m = _INT_RE.match(text)
    if m is None:
        raise ValueError(text)
    sign, digits, suffix = m.groups()
    v = int(digits, 0) * _SUFFIX[suffix.lower()]
    return -v if sign == "-" else v


_int_value.__name__ = "int"


def _positive_int(text: str) -> int:
    v = _int_value(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return v


def _existing_file(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    return text


def _out_file(text: str) -> str:
    """A file to write: its directory must exist, and it must not be one."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r}: directory {parent!r} does not exist")
    return text


def _out_dir(text: str) -> str:
    """A directory to write into (created if missing): no file may be there."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return text


def _event_list(text: str) -> list[str]:
    from kvmmmu import mmutrace as tp                # noqa: PLC0415
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("empty event list")
    known = {ev.name for ev in tp.EVENTS}
    bad = [n for n in names if n not in known]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kvmmmu event(s) {', '.join(bad)} (known: "
                                         f"{', '.join(sorted(known))})")
    return names


def _scheduler(text: str) -> str:
    if text in ("inprocess", "local") or re.match(r"\A(tcp|tls|inproc|ucx)://\S+\Z", text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r}: use inprocess, local, or a Dask scheduler address such as tcp://host:8786")


def _json_value(v):
    """A JSON-able copy of `v` (numpy scalars/arrays, NaN -> null, paths)."""
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if hasattr(v, "tolist"):                          # numpy scalar / array
        return _json_value(v.tolist())
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def _print_json(obj) -> None:
    json.dump(_json_value(obj), sys.stdout, indent=1)
    sys.stdout.write("\n")


def _missing_extra(parser, option: str, module: str, extra: str) -> None:
    parser.error(f"argument {option}: needs {module}, which is not installed; "
                 f"install it with: pip install kvmmmu[{extra}]")


def _importable(module: str) -> bool:
    import importlib                                 # noqa: PLC0415
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """A ``progress(desc, done, total)`` callable that draws tqdm bars on
    stderr, one per `desc` (a new `desc` closes the previous bar).  Without
    tqdm, or when disabled, it does nothing (no error)."""

    def __init__(self, enabled: bool = True, file=None):
        self._tqdm = None
        self.file = file if file is not None else sys.stderr
        if enabled:
            try:
                from tqdm import tqdm                # noqa: PLC0415 (optional dependency)
            except ImportError:
                tqdm = None
            self._tqdm = tqdm
        self.bar = None
        self.desc = None

    @property
    def active(self) -> bool:
        return self._tqdm is not None

    def __call__(self, desc: str, done: int, total: int) -> None:
        if self._tqdm is None:
            return
        if self.bar is None or desc != self.desc:
            self.close()
            self.bar = self._tqdm(total=total, desc=str(desc), file=self.file, leave=True,
                                  dynamic_ncols=True, mininterval=0.2)
            self.desc = desc
        if total is not None and total != self.bar.total:
            self.bar.total = total
            self.bar.refresh()
        step = int(done) - self.bar.n
        if step:
            self.bar.update(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.desc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _progress(args) -> Progress:
    on = args.progress if args.progress is not None else sys.stderr.isatty()
    return Progress(enabled=on)


def _add_common(p, *, json_help: str, plot: str | None = None, progress: bool = True) -> None:
    p.add_argument("--json", action="store_true", help=json_help)
    if plot:
        p.add_argument("--plot", metavar="DIR", type=_out_dir,
                       help=plot + " (created if missing; needs matplotlib: kvmmmu[plot])")
    if progress:
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="tqdm progress bars on stderr for long work (default: on when "
                            "stderr is a terminal; quietly none when tqdm is not installed)")


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------

def _add_demo(sub):
    p = sub.add_parser(
        "demo", help="a short tour of what the model does (kernel trace lines and numbers)",
        description="A short tour of the model: SPTEs as the kernel prints them, shadow and "
                    "TDP roots, the TDP MMU mapping, eagerly splitting and dirty-logging a "
                    "64 GiB guest.",
        epilog=f"example:\n  {PROG} demo\n  {PROG} demo --tdx")
    p.add_argument("--tdx", action="store_true",
                   help="instead: a TD's life in both TDX code generations, side by side")
    p.add_argument("--json", action="store_true",
                   help="print {\"demo\", \"lines\"} as JSON instead of the text (with --tdx "
                        "also \"steps\": per code generation, each step's SEAMCALLs and "
                        "nr_premapped after it)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args, parser) -> int:
    import io                                        # noqa: PLC0415
    from kvmmmu.demo import run, run_tdx             # noqa: PLC0415
    if not args.json:
        (run_tdx if args.tdx else run)(sys.stdout)
        return 0
    out = io.StringIO()
    steps = (run_tdx if args.tdx else run)(out)
    doc = {"demo": "tdx" if args.tdx else "main", "lines": out.getvalue().splitlines()}
    if args.tdx:
        doc["steps"] = {era: [{"step": name, "seamcalls": calls, "nr_premapped": premapped}
                              for name, calls, premapped in log]
                        for era, log in steps.items()}
    _print_json(doc)
    return 0


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------

_RUN_EPILOG = f"""\
examples:
  {PROG} run --list
  {PROG} run dirty_log --help
  {PROG} run dirty_log --mmu tdp_mmu --json
  {PROG} run dirty_log --plot plots/"""


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain_int(text: str) -> int:
    """An integer, decimal or ``0x`` hex."""
    return int(text.strip(), 0)


_plain_int.__name__ = "int"


def _sized(prm) -> bool:
    return prm.type is int and "bytes" in prm.name


def _param_help(prm) -> str:
    h = (prm.help or "").rstrip(".")
    tname = getattr(prm.type, "__name__", str(prm.type))
    if prm.type is bool:
        d = f"--{'' if prm.default else 'no-'}{prm.name.replace('_', '-')}"
        return f"{h} (bool; default: {d})".replace("%", "%%")
    bits = [tname]
    lo, hi = getattr(prm, "lo", None), getattr(prm, "hi", None)
    if lo is not None or hi is not None:
        bits.append(f"{'' if lo is None else lo:g}..{'' if hi is None else hi:g}"
                    if prm.type is float else
                    f"{'' if lo is None else lo}..{'' if hi is None else hi}")
    if _sized(prm):
        bits.append("sizes like 4K, 2M, 1G accepted")
    return f"{h} ({'; '.join(bits)}; default: {prm.default!r})".replace("%", "%%")


def _add_param(group, prm) -> None:
    opt = _opt(prm.name)
    kw = dict(dest="p_" + prm.name, default=argparse.SUPPRESS, help=_param_help(prm))
    if prm.type is bool:
        group.add_argument(opt, action=argparse.BooleanOptionalAction, **kw)
        return
    kw["type"] = _int_value if _sized(prm) else \
        {int: _plain_int, float: float, str: str}.get(prm.type, prm.type)
    kw["metavar"] = prm.name.upper()
    if prm.choices:
        kw["choices"] = tuple(prm.choices)
        kw["metavar"] = "{" + ",".join(map(str, prm.choices)) + "}"
    group.add_argument(opt, **kw)


def _first_line(doc: str) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def _run_accepts(W, name: str) -> bool:
    import inspect                                   # noqa: PLC0415
    try:
        sig = inspect.signature(W.run)
    except (TypeError, ValueError):                  # pragma: no cover
        return False
    return name in sig.parameters


def _add_run(sub, parsers, with_workloads=True):
    p = sub.add_parser(
        "run", help="run a workload (like the kernel's MMU selftests) and print its report",
        description="Run one workload on the model and print its report in the selftests' "
                    "terms (populate time, per-iteration dirty time, get/clear dirty log "
                    "time) next to the model's own counts (faults by kind, SPTEs, shadow "
                    "pages, rmap descriptors, bytes per structure).  Each workload's "
                    "parameters are options of its own: see `run WORKLOAD --help`.",
        epilog=_RUN_EPILOG)
    p.add_argument("--list", action="store_true",
                   help="list the workloads with their one-line summaries (also what `run` "
                        "without a WORKLOAD does)")
    p.set_defaults(func=_cmd_run, workload=None)
    p._kvmmmu_parsers = parsers
    parsers["run"] = p
    if not with_workloads:
        return
    try:
        from kvmmmu import workloads as W            # noqa: PLC0415
    except ImportError as e:                          # the model is not built
        p.epilog = (p.epilog or "") + f"\n\n(the workloads cannot be listed: {e})"
        return
    wsub = p.add_subparsers(dest="workload", metavar="WORKLOAD", title="workloads",
                            parser_class=_Parser)
    shared = set.intersection(*(set(w.params) for w in W.WORKLOADS.values())) \
        if W.WORKLOADS else set()
    for name, wl in W.WORKLOADS.items():
        mmus = tuple(wl.mmus)
        example = f"{PROG} run {name}"
        params = list(wl.params.values())
        ints = [q for q in params if q.type is int and not q.choices and q.name not in shared] \
            or [q for q in params if q.type is int and not q.choices]
        if ints:
            example += f" {_opt(ints[0].name)} {ints[0].default}"
        wp = wsub.add_parser(
            name, help=_first_line(wl.doc), description=wl.doc,
            epilog=f"examples:\n  {example} --mmu {mmus[0]}\n  {example} --json"
                   f"\n  {PROG} run {name} --plot plots/ --no-progress")
        g = wp.add_argument_group(f"{name} parameters")
        for prm in params:
            if prm.name in COMMON_OPTION_NAMES:
                raise W.WorkloadParamError(prm.name, f"workload {name!r}: a parameter may not "
                                                     f"be called like the common option "
                                                     f"--{prm.name}")
            _add_param(g, prm)
        c = wp.add_argument_group("common options")
        c.add_argument("--mmu", choices=mmus, default="tdp_mmu" if "tdp_mmu" in mmus else mmus[0],
                       help="the MMU flavour: tdp_mmu (TDP with the TDP MMU), tdp (TDP on the "
                            "shadow MMU, kvm.tdp_mmu=N), shadow (shadow paging)")
        c.add_argument("--seed", type=_plain_int, default=0,
                       help="the workload's random seed (the same seed gives the same report)")
        if _run_accepts(W, "stream"):
            c.add_argument("--stream", metavar="OUT", type=_out_file,
                           help="also write the vCPU input stream the workload ran "
                                "(docs/STREAM.md; replay it with `replay OUT`)")
        _add_common(c, json_help="print the report as JSON (Report.to_dict(), plus \"plots\")",
                    plot="write memory-by-structure and faults-by-kind PNGs into DIR")
        wp.set_defaults(func=_cmd_run)
        parsers["run " + name] = wp


def _list_workloads() -> int:
    try:
        from kvmmmu import workloads as W            # noqa: PLC0415
    except ImportError as e:
        _note(f"{PROG} run: the workloads cannot be loaded: {e}")
        return 2
    width = max((len(n) for n in W.WORKLOADS), default=0)
    print("workloads (run WORKLOAD --help for its parameters):")
    for name, wl in W.WORKLOADS.items():
        print(f"  {name:<{width}}  {_first_line(wl.doc)}  [{', '.join(wl.mmus)}]")
    return 0


def _cmd_run(args, parser) -> int:
    if args.list or args.workload is None:
        return _list_workloads()
    from kvmmmu import workloads as W                # noqa: PLC0415
    wparser = parser._kvmmmu_parsers["run " + args.workload]
    if args.plot and not _importable("matplotlib"):
        _missing_extra(wparser, "--plot", "matplotlib", "plot")
    params = {k[2:]: v for k, v in vars(args).items() if k.startswith("p_")}
    kw = {}
    if getattr(args, "stream", None):
        kw["stream"] = args.stream
    with _progress(args) as bar:
        try:
            rep = W.run(args.workload, mmu=args.mmu, seed=args.seed,
                        progress=bar if bar.active else None, **kw, **params)
        except W.WorkloadParamError as e:
            bar.close()
            name = getattr(e, "param", None) or "workload"
            opt = "WORKLOAD" if name == "workload" else _opt(name)
            msg = str(e)
            if msg.startswith(f"{name}: "):
                msg = msg[len(name) + 2:]
            wparser.error(f"argument {opt}: {msg}")
        except W.WorkloadError as e:
            bar.close()
            _note(f"{PROG} run {args.workload}: {e}")
            return 1
    out = rep.to_dict()
    if getattr(args, "stream", None):
        out["stream"] = str(args.stream)
    if args.plot:
        from kvmmmu.plots import PlotError, plot_report  # noqa: PLC0415
        try:
            out["plots"] = plot_report(out, args.plot)
        except PlotError as e:                       # a report without a timeline
            _note(f"{PROG} run {args.workload}: cannot plot: {e}")
            return 1
        if not args.json:
            for path in out["plots"]:
                _note(f"wrote {path}")
    if getattr(args, "stream", None) and not args.json:
        _note(f"wrote {args.stream}")
    if args.json:
        _print_json(out)
    else:
        text = rep.text()
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


# ---------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------

_REPLAY_EPILOG = f"""\
FILE is either
  a vCPU input stream (JSON lines, docs/STREAM.md): it runs on the model, and the
  summary says how many events ran, how many trace lines the model printed (by
  event) and the VM's and each vCPU's MMU statistics at the end; exit 0, or 1 when
  the model refuses an event (2: a bad stream);
  or a recorded kernel trace NAME.trace with NAME.stream.jsonl beside it (and,
  when present, NAME.stats.json): the stream runs on the model, the model's trace
  is compared with the kernel's (host addresses masked, kvmmmu.tracediff) and the
  MMU statistic deltas with the recorded ones; exit 0 when they agree, 1 at the
  first divergence, which is printed.

examples:
  {PROG} replay tests/data/shadow_scenarios/prefetch.stream.jsonl --trace model.trace
  {PROG} replay tests/data/shadow_scenarios/prefetch.trace
  {PROG} replay tests/data/shadow_scenarios/cr3_switch.trace --all --json"""


def _add_replay(sub, parsers):
    p = sub.add_parser(
        "replay", help="run a vCPU input stream, or check the model against a recorded "
                       "kernel trace",
        description="Run a vCPU input stream (docs/STREAM.md) on the model, or replay a "
                    "recorded live trace's stream and diff the model's trace against the "
                    "kernel's.",
        epilog=_REPLAY_EPILOG)
    p.add_argument("file", metavar="FILE", type=_existing_file,
                   help="a stream (*.jsonl) or a recorded kernel trace (NAME.trace with "
                        "NAME.stream.jsonl beside it)")
    p.add_argument("--trace", metavar="OUT", type=_out_file,
                   help="write the model's kvmmmu trace lines to OUT")
    p.add_argument("--audit", action="store_true",
                   help="check the VM's invariants (VM.audit()) after every event; the first "
                        "violation stops the run")
    ev = p.add_mutually_exclusive_group()
    ev.add_argument("--events", metavar="E1,E2", type=_event_list,
                    help="a stream: capture only these kvmmmu events; a recorded trace: "
                         "compare only these (default: the MMU events and the walker's, "
                         "tracediff.DEFAULT_EVENTS)")
    ev.add_argument("--all", action="store_true",
                    help="a recorded trace: compare every kvmmmu event")
    p.add_argument("--context", type=_plain_int, default=3, metavar="N",
                   help="equal lines shown before a divergence, and lines after it")
    _add_common(p, json_help="print the summary / the comparison as one JSON object",
                progress=False)
    p.set_defaults(func=_cmd_replay)
    parsers["replay"] = p


def _stat_values(snap: dict) -> tuple[dict, dict]:
    from kvmmmu import tracediff as T                # noqa: PLC0415
    vm = {n: snap["vm"][n] for n in T.MMU_VM_STATS if n in snap["vm"]}
    vcpus = {str(i): {n: s[n] for n in T.MMU_VCPU_STATS if n in s}
             for i, s in snap["vcpus"].items()}
    return vm, vcpus


def _nonzero(d: dict) -> str:
    items = [f"{k}={v}" for k, v in d.items() if v]
    return " ".join(items) if items else "(all zero)"


def _divergence_dict(d) -> dict | None:
    if d is None:
        return None
    return {"index": d.index, "field": d.field, "kernel_value": d.kernel_value,
            "model_value": d.model_value,
            "kernel_line": d.kernel.line if d.kernel else None,
            "kernel_lineno": d.kernel.lineno if d.kernel else None,
            "model_line": d.model.line if d.model else None,
            "model_lineno": d.model.lineno if d.model else None,
            "before": d.before, "kernel_after": d.kernel_after, "model_after": d.model_after,
            "text": str(d)}


def _cmd_replay(args, parser) -> int:
    from kvmmmu import replay as R                   # noqa: PLC0415
    from kvmmmu import tracediff as T                # noqa: PLC0415
    recorded = args.file.endswith(".trace")
    stream_path, stats_path = args.file, None
    if recorded:
        base = args.file[:-len(".trace")]
        stream_path = base + ".stream.jsonl"
        if not os.path.isfile(stream_path):
            parser.error(f"argument FILE: {args.file!r} is a recorded trace, but its stream "
                         f"{stream_path!r} is not beside it")
        stats_path = base + ".stats.json" if os.path.isfile(base + ".stats.json") else None
    elif args.all:
        parser.error("argument --all: only for a recorded trace (FILE ending in .trace)")
    capture = None if recorded else args.events
    if args.context < 0:
        parser.error(f"argument --context: must be >= 0, not {args.context}")
    try:
        res = R.run_stream(stream_path, events=capture, audit=args.audit)
    except R.StreamError as e:
        parser.error(f"argument FILE: {stream_path}: {e}")
    except R.StreamRunError as e:
        _note(f"{stream_path}: the model refused an event: {e}")
        if args.json:
            _print_json({"file": args.file, "stream": stream_path, "error": str(e), "ok": False})
        return 1
    if args.trace:
        with open(args.trace, "w", encoding="utf-8") as fh:
            fh.writelines(ln + "\n" for ln in res.lines)
    vm_stats, vcpu_stats = _stat_values(res.stats[-1])
    by_event: dict[str, int] = {}
    for ln in res.lines:
        ev = ln.split(":", 1)[0]
        by_event[ev] = by_event.get(ev, 0) + 1
    out = {"file": args.file, "mode": "recorded" if recorded else "stream",
           "stream": stream_path, "events_run": len(res.stream.events),
           "trace_lines": len(res.lines), "trace_events": by_event,
           "marks": [s["label"] for s in res.stats[:-1]],
           "vm": vm_stats, "vcpus": vcpu_stats, "trace": args.trace}
    if not recorded:
        out["ok"] = True
        if args.json:
            _print_json(out)
        else:
            print(f"{stream_path}: {out['events_run']} events run, {out['trace_lines']} "
                  f"kvmmmu trace lines" + (f" (written to {args.trace})" if args.trace else ""))
            for ev, n in sorted(by_event.items()):
                print(f"  {ev:<28} {n}")
            print(f"VM MMU stats at the end: {_nonzero(vm_stats)}")
            for i, s in vcpu_stats.items():
                print(f"vCPU {i} MMU stats at the end: {_nonzero(s)}")
        return 0

    events = "all" if args.all else args.events
    with open(args.file, encoding="utf-8", errors="replace") as fh:
        kernel_lines = fh.read().splitlines()
    try:
        d = T.diff_traces(kernel_lines, res.lines, events=events, context=args.context)
        compared = len(T.normalize_trace(kernel_lines, events=events, source="kernel"))
        sd = T.diff_stat_files(T.load_stats(stats_path), [res.baseline] + res.stats) \
            if stats_path else []
    except (T.TraceParseError, ValueError, OSError) as e:
        parser.error(f"argument FILE: {e}")
    out.update(trace_agree=d is None, compared_events=compared, divergence=_divergence_dict(d),
               stats_file=stats_path,
               stat_differences=[{"label": s.label, "scope": s.scope, "name": s.name,
                                  "kernel": s.kernel, "model": s.model} for s in sd])
    out["agree"] = out["ok"] = d is None and not sd
    if args.json:
        _print_json(out)
    else:
        print(f"{args.file}: replayed {stream_path} ({out['events_run']} events, "
              f"{out['trace_lines']} model trace lines)")
        if d is None:
            print(f"trace: the kernel's and the model's {compared} compared events agree")
        else:
            print(f"trace: {d}")
        if stats_path:
            print(f"stats: {'the MMU stat deltas agree' if not sd else 'the MMU stat deltas differ'}"
                  f" ({stats_path})")
            for s in sd:
                print(f"  stat {s.scope} {s.name} at {s.label!r}: kernel delta {s.kernel}, "
                      f"model {s.model}")
        print("agree" if out["agree"] else "differ")
    return 0 if out["agree"] else 1


# ---------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------

_DIFF_EPILOG = f"""\
Both traces are read as tracefs text or `event: payload` lines; lines that are not
kvmmmu events are skipped; host addresses and host pfns are masked (sptep, the
SPTE's pfn, spte_requested's pfn), and so are MMIO generations unless
--keep-mmio-gen.  A is called "kernel" and B "model" in the report.  Exit 0 when
they agree, 1 at the first divergence (printed with context).

examples:
  {PROG} diff tests/data/shadow_scenarios/prefetch.trace model.trace
  {PROG} diff kernel.trace model.trace --all --json
  {PROG} diff kernel.trace model.trace --events kvm_mmu_get_page,kvm_mmu_set_spte"""


def _add_diff(sub, parsers):
    p = sub.add_parser("diff", help="compare two kvmmmu traces (host addresses masked)",
                       description="Report the first divergence between two kvmmmu traces "
                                   "(kvmmmu.tracediff).",
                       epilog=_DIFF_EPILOG)
    p.add_argument("a", metavar="A", type=_existing_file, help="the first trace (the kernel's)")
    p.add_argument("b", metavar="B", type=_existing_file, help="the second trace (the model's)")
    ev = p.add_mutually_exclusive_group()
    ev.add_argument("--all", action="store_true", help="compare every kvmmmu event")
    ev.add_argument("--events", metavar="E1,E2", type=_event_list,
                    help="compare only these kvmmmu events (default: the MMU events and the "
                         "walker's, tracediff.DEFAULT_EVENTS)")
    p.add_argument("--context", type=_plain_int, default=3, metavar="N",
                   help="equal lines shown before the divergence, and lines after it")
    p.add_argument("--keep-mmio-gen", action="store_true",
                   help="compare MMIO generations too (masked by default)")
    p.add_argument("--json", action="store_true",
                   help="print {agree, compared, divergence} as JSON")
    p.set_defaults(func=_cmd_diff)
    parsers["diff"] = p


def _cmd_diff(args, parser) -> int:
    from kvmmmu import tracediff as T                # noqa: PLC0415
    if args.context < 0:
        parser.error(f"argument --context: must be >= 0, not {args.context}")
    events = "all" if args.all else args.events
    lines = {}
    for key, path in (("A", args.a), ("B", args.b)):
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines[key] = fh.read().splitlines()
        except OSError as e:
            parser.error(f"argument {key}: {e}")
    kw = dict(events=events, mask_mmio_gen=not args.keep_mmio_gen)
    try:
        d = T.diff_traces(lines["A"], lines["B"], context=args.context, **kw)
        counts = [len(T.normalize_trace(lines[k], source=s, **kw))
                  for k, s in (("A", "kernel"), ("B", "model"))]
    except T.TraceParseError as e:
        parser.error(f"argument {'A' if e.source == 'kernel' else 'B'}: {e}")
    out = {"a": args.a, "b": args.b, "agree": d is None, "compared": counts,
           "events": "all" if args.all else (args.events or "default"),
           "divergence": _divergence_dict(d)}
    if args.json:
        _print_json(out)
    elif d is None:
        print(f"traces agree ({counts[0]} events compared)")
    else:
        print(d)
    return 0 if d is None else 1


# ---------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------

_SWEEP_EPILOG = f"""\
GRID is a JSON or TOML file naming the workloads, the MMU flavours and the
values of each parameter; every combination is a cell with its own seed, so
a cell reruns identically.  For example (grid.json):

  {{"workloads": ["dirty_log"], "mmus": ["tdp_mmu", "shadow"],
   "params": {{"eager_page_split": [true, false]}}, "seed": 0}}

A cell that raises is a row with status "failed" and its error, never dropped;
the exit status is then 1 (after everything is printed and written).

examples:
  {PROG} sweep grid.json
  {PROG} sweep grid.json --scheduler local --workers 4 --parquet out.parquet
  {PROG} sweep grid.toml --scheduler tcp://10.0.0.5:8786 --json
  {PROG} sweep grid.json --plot plots/ --metric pf_fixed"""


def _add_sweep(sub, parsers):
    p = sub.add_parser("sweep", help="run a grid of workloads x MMU flavours x parameters "
                                     "(in process or on Dask)",
                       description="Run every cell of a grid (kvmmmu.sweep) and print one "
                                   "metric as a table: a row per workload and parameter "
                                   "values, a column per MMU flavour (--json: every column "
                                   "of every cell).  Needs pandas and, for a Dask scheduler, "
                                   "dask[distributed] (kvmmmu[sweep]).",
                       epilog=_SWEEP_EPILOG)
    p.add_argument("grid", metavar="GRID", type=_existing_file, help="the grid file (JSON or TOML)")
    p.add_argument("--scheduler", type=_scheduler, default="local", metavar="S",
                   help="inprocess (one after the other, no Dask), local (a Dask LocalCluster "
                        "on this machine), or a Dask scheduler address tcp://host:port")
    p.add_argument("--workers", type=_positive_int, default=2, metavar="N",
                   help="worker processes of the local cluster (--scheduler local)")
    p.add_argument("--parquet", metavar="OUT", type=_out_file, help="also write the results to OUT as Parquet")
    p.add_argument("--metric", metavar="NAME",
                   help="the result column the table and --plot show (default: the first "
                        "numeric summary column that is not a wall time)")
    _add_common(p, json_help="print {grid, cells, failed, rows, parquet, plots} as JSON",
                plot="write per-MMU side-by-side bars of --metric into DIR")
    p.set_defaults(func=_cmd_sweep)
    parsers["sweep"] = p


def _cmd_sweep(args, parser) -> int:
    if not _importable("pandas"):
        _missing_extra(parser, "GRID", "pandas", "sweep")
    if args.scheduler != "inprocess" and not _importable("dask.distributed"):
        _missing_extra(parser, "--scheduler", "dask[distributed]", "sweep")
    if args.parquet and not _importable("pyarrow"):
        _missing_extra(parser, "--parquet", "pyarrow", "sweep")
    if args.plot and not _importable("matplotlib"):
        _missing_extra(parser, "--plot", "matplotlib", "plot")
    from kvmmmu import sweep as SW                   # noqa: PLC0415
    try:
        grid = SW.Grid.from_file(args.grid)
    except (SW.GridError, OSError) as e:
        parser.error(f"argument GRID: {args.grid}: {e}")
    with _progress(args) as bar:
        df = SW.run(grid, scheduler=args.scheduler, n_workers=args.workers,
                    progress=bar if bar.active else None)
    metric = args.metric
    if metric is not None and metric not in df.columns:
        parser.error(f"argument --metric: {metric!r} is not a column of the results "
                     f"({', '.join(map(str, df.columns))})")
    if metric is None:
        metric = SW.default_metric(df)          # what format_table shows by default
    plots: list[str] = []
    if args.parquet:
        SW.to_parquet(df, args.parquet)
    if args.plot:
        from kvmmmu.plots import PlotError, plot_sweep   # noqa: PLC0415
        try:
            plots = plot_sweep(df, args.plot, metric, group_by=["workload", *grid.params])
        except PlotError as e:
            parser.error(f"argument --metric: {e}")
    rows = SW.to_records(df)
    failed = [r for r in rows if r["status"] != "ok"]
    if args.json:
        _print_json({"grid": args.grid, "scheduler": args.scheduler, "cells": len(rows),
                     "failed": len(failed), "skipped": grid.skipped, "metric": metric,
                     "rows": rows, "parquet": args.parquet, "plots": plots})
    else:
        print(SW.format_table(df, metric))
        if failed:
            print(f"{len(failed)} of {len(rows)} cells failed:")
            for r in failed:
                cell = {k: r[k] for k in (*SW.CELL_KEYS, *grid.params) if r.get(k) is not None}
                print(f"  {cell}: {r['error']}")
        for sk in grid.skipped:
            print(f"skipped {sk['workload']} on {sk['mmu']}: {sk['reason']}")
        if args.parquet:
            _note(f"wrote {args.parquet}")
        for path in plots:
            _note(f"wrote {path}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------
# The parser and main
# ---------------------------------------------------------------------------

_MAIN_EPILOG = f"""\
examples:
  {PROG} demo
  {PROG} run --list
  {PROG} run dirty_log --mmu shadow --plot plots/
  {PROG} replay tests/data/shadow_scenarios/prefetch.trace
  {PROG} diff kernel.trace model.trace
  {PROG} sweep grid.json --scheduler local --workers 2 --parquet out.parquet

`{PROG} SUBCOMMAND --help` explains each one.  Exit status: 0 success, 1 a result
that is not (traces differ, a sweep cell failed), 2 bad arguments or input."""


def build_parser(with_workloads: bool = True) -> argparse.ArgumentParser:
    """The ``python -m kvmmmu`` parser: ``run`` has one sub-parser per
    workload (``kvmmmu.workloads`` imported) unless `with_workloads` is false
    (what ``main`` builds for the other subcommands: they start faster)."""
    parser = _Parser(prog=PROG, description="kvmmmu: a model of the Linux v6.18 KVM x86 MMU. "
                                            "Run workloads, replay streams, compare traces, "
                                            "sweep configurations.",
                     epilog=_MAIN_EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, title="subcommands",
                                parser_class=_Parser)
    parsers: dict[str, argparse.ArgumentParser] = {}
    _add_demo(sub)
    _add_run(sub, parsers, with_workloads)
    _add_replay(sub, parsers)
    _add_diff(sub, parsers)
    _add_sweep(sub, parsers)
    parser._kvmmmu_parsers = parsers
    return parser


def _normalize_argv(argv: list[str]) -> list[str]:
    """``--bytes_per_vcpu`` spells ``--bytes-per-vcpu`` too (the workload
    parameters' own names)."""
    out = []
    for a in argv:
        if a == "--":
            out.extend(argv[len(out):])
            break
        if a.startswith("--") and "_" in a.split("=", 1)[0]:
            name, eq, val = a.partition("=")
            a = name.replace("_", "-") + eq + val
        out.append(a)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(with_workloads=command == "run")
    args, extra = parser.parse_known_args(_normalize_argv(argv))
    key = f"run {args.workload}" if args.command == "run" and args.workload else args.command
    sub = parser._kvmmmu_parsers.get(args.command, parser)
    if extra:                                       # in the usage of the (workload's) subcommand
        parser._kvmmmu_parsers.get(key, sub).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, sub)
    except KeyboardInterrupt:
        _note(f"{PROG} {args.command}: interrupted")
        return 130
