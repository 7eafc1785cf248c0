#!/usr/bin/env python3
"""Time kvmmmu's bulk SPTE operations against the equivalent numpy expressions.

Usage::

    python benchmarks/compare.py [--n 16777216] [--repeat 5]
                                 [--formats legacy,ept,ept-noad] [--json FILE] [-v]

For every SPTE format and bulk operation of ``kvmmmu._core.spte.SpteFormat``
the script times the kvmmmu call and the same computation written as
multi-step numpy expressions, on the same data and in the same run, and checks
that both produce identical results (an AssertionError stops the script
otherwise).  The data is the realistic mix of the asv benchmarks
(``asv_bench/benchmarks/core_spte.py``: mostly present leaf SPTEs from
``make_spte_array``, some SHADOW_NONPRESENT_VALUE, a few MMIO SPTEs) built from
``np.random.default_rng(1234)``.

Fairness rules:

* Each side is timed in every form a user could reasonably write, and the
  best form counts (its name is printed): kvmmmu with a fresh result array
  and with ``out=``; numpy as one expression, with preallocated temporaries
  and ``out=``, and (little-endian hosts, single-bit tests) on a uint8 view
  of the byte that holds the bit.  For in-place operations numpy gets a
  boolean-index form (``s[present] &= ~W``), an ``np.where`` form and a
  branch-free form that shifts the present bit onto the bit to clear.
* Times are the best of ``--repeat`` runs (``time.perf_counter``) after one
  untimed warm-up run.  In-place operations run on a fresh copy of the input
  every time; the copy (into a preallocated buffer) is not timed.
* The masks come from the SpteFormat attributes (``fmt.shadow_dirty_mask``,
  ...) and the module constants, never from literals.
* For the A/D-enabled formats (legacy, ept) the numpy forms assume what holds
  for this data: every present leaf is A/D-enabled, so dirty is the D bit,
  clear-dirty clears D and access tracking clears A.  For ept-noad they
  follow the SPTE's A/D type as kvmmmu does (write protection stands in for
  D; aging saves R/X into bits 54/56 and clears RWX and A).
* ``ratio`` is numpy time / kvmmmu time: above 1 kvmmmu is faster.

Both sides run single-threaded (numpy ufuncs do; the kvmmmu loops are not
split across threads).  If kvmmmu is not installed, the source tree next to
this script is used (build it with ``python setup.py build_ext --inplace``).
"""
import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    from kvmmmu._core import spte
except ImportError:
    sys.path.insert(0, _ROOT)
    from kvmmmu._core import spte


def _load_asv_module():
    """asv_bench/benchmarks/core_spte.py: the data mix shared with asv (no asv needed)."""
    path = os.path.join(_ROOT, "asv_bench", "benchmarks", "core_spte.py")
    spec = importlib.util.spec_from_file_location("kvmmmu_asv_core_spte", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


core_spte = _load_asv_module()

U64 = np.uint64
ALL_ONES = U64(0xFFFFFFFFFFFFFFFF)


def _bit(mask):
    """Index of the single bit set in `mask`."""
    mask = int(mask)
    if mask == 0 or mask & (mask - 1):
        raise ValueError(f"{mask:#x} is not a single bit")
    return mask.bit_length() - 1


# --- numpy building blocks ------------------------------------------------------

def bit_test_forms(s, mask, ob, t64, t8):
    """numpy forms of ``(s & mask) != 0`` (bool array); `mask` a single bit."""
    m = U64(mask)
    forms = {
        "expr": lambda: (s & m) != 0,
        "prealloc": lambda: np.not_equal(np.bitwise_and(s, m, out=t64), 0, out=ob),
    }
    if sys.byteorder == "little":
        bit = _bit(mask)
        byte, bm = bit // 8, np.uint8(1 << (bit % 8))
        b8 = s.view(np.uint8)[byte::8]
        forms["u8-view"] = lambda: np.not_equal(np.bitwise_and(b8, bm, out=t8), 0, out=ob)
    return forms


def shift_bit(t, from_mask, to_mask):
    """In place: move the single bit `from_mask` of every element of `t` onto `to_mask`."""
    d = _bit(from_mask) - _bit(to_mask)
    if d > 0:
        np.right_shift(t, U64(d), out=t)
    elif d < 0:
        np.left_shift(t, U64(-d), out=t)
    return t


def clear_if_present_forms(w, clear_mask, t64):
    """numpy forms of "clear `clear_mask` (a single bit) in every present SPTE", in place."""
    P, C = U64(spte.SPTE_MMU_PRESENT_MASK), U64(clear_mask)

    def mask_index():
        w[(w & P) != 0] &= ~C

    def where():
        np.bitwise_and(w, np.where((w & P) != 0, ~C, ALL_ONES), out=w)

    def shift():
        # t = C where present, else 0; w &= ~t.  Four passes, no allocation.
        np.bitwise_and(w, P, out=t64)
        shift_bit(t64, P, C)
        np.invert(t64, out=t64)
        np.bitwise_and(w, t64, out=w)

    return {"mask-index": mask_index, "where": where, "shift": shift}


# --- the operations ---------------------------------------------------------------

class Op:
    """One bulk operation: kvmmmu forms, numpy forms, and whether it works in place."""

    def __init__(self, name, kvmmmu, numpy, inplace=False):
        self.name, self.kvmmmu, self.numpy, self.inplace = name, kvmmmu, numpy, inplace


def build_ops(fmt, s, w, pfns, n):
    """The operations for format `fmt` over SPTEs `s` (read-only), work buffer `w`
    (in-place operations) and `pfns` (make_spte)."""
    P = U64(spte.SPTE_MMU_PRESENT_MASK)
    W = U64(spte.PT_WRITABLE_MASK)
    PS = U64(spte.PT_PAGE_SIZE_MASK)
    A = U64(fmt.shadow_accessed_mask)
    D = U64(fmt.shadow_dirty_mask)
    MMIO_MASK, MMIO_VALUE = U64(fmt.shadow_mmio_mask), U64(fmt.shadow_mmio_value)
    BASE = U64(spte.SPTE_BASE_ADDR_MASK)
    SHIFT = U64(spte.PAGE_SHIFT)
    AD_MASK = U64(spte.SPTE_TDP_AD_MASK)
    AD_ENABLED = U64(spte.SPTE_TDP_AD_ENABLED)
    AD_DISABLED = U64(spte.SPTE_TDP_AD_DISABLED)
    TRACK = U64(fmt.shadow_acc_track_mask)
    SAVED = U64(spte.SHADOW_ACC_TRACK_SAVED_BITS_MASK)
    SAVED_SHIFT = U64(spte.SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)
    ad_enabled = bool(fmt.kvm_ad_enabled)
    if not fmt.enable_mmio_caching:
        raise SystemExit(f"{fmt!r}: MMIO caching is off; is_mmio_spte has no numpy equivalent here")

    # Preallocated outputs and temporaries (one set, reused by every form).
    ob = np.empty(n, dtype=np.bool_)
    o64 = np.empty(n, dtype=np.uint64)
    t64 = np.empty(n, dtype=np.uint64)
    u64 = np.empty(n, dtype=np.uint64)
    t8 = np.empty(n, dtype=np.uint8)
    for a in (ob, o64, t64, u64, t8):
        a.fill(0)  # fault the pages in now, not inside a timed run

    def pred(method, *args):
        f = getattr(fmt, method)
        return {"alloc": lambda: f(s, *args), "out=": lambda: f(s, *args, out=ob)}

    ops = [
        Op("is_shadow_present_pte", pred("is_shadow_present_pte_array"),
           bit_test_forms(s, P, ob, t64, t8)),
        Op("is_last_spte(level=2)", pred("is_last_spte_array", spte.PG_LEVEL_2M),
           bit_test_forms(s, PS, ob, t64, t8)),
        Op("is_writable_pte", pred("is_writable_pte_array"),
           bit_test_forms(s, W, ob, t64, t8)),
        Op("is_accessed_spte", pred("is_accessed_spte_array"),
           bit_test_forms(s, A, ob, t64, t8)),
    ]

    # is_dirty_spte
    if ad_enabled:
        dirty = bit_test_forms(s, D, ob, t64, t8)
    else:
        def dirty_prealloc():
            need_wp = np.not_equal(np.bitwise_and(s, AD_MASK, out=t64), AD_ENABLED, out=ob)
            np.bitwise_and(s, np.where(need_wp, W, D), out=t64)
            return np.not_equal(t64, 0, out=ob)
        dirty = {
            "where": lambda: np.where((s & AD_MASK) != AD_ENABLED, s & W, s & D) != 0,
            "where-mask": lambda: (s & np.where((s & AD_MASK) != AD_ENABLED, W, D)) != 0,
            "prealloc": dirty_prealloc,
        }
    ops.append(Op("is_dirty_spte", pred("is_dirty_spte_array"), dirty))

    ops.append(Op("is_mmio_spte", pred("is_mmio_spte_array"), {
        "expr": lambda: (s & MMIO_MASK) == MMIO_VALUE,
        "prealloc": lambda: np.equal(np.bitwise_and(s, MMIO_MASK, out=t64), MMIO_VALUE, out=ob),
    }))

    ops.append(Op("spte_to_pfn", {
        "alloc": lambda: fmt.spte_to_pfn_array(s),
        "out=": lambda: fmt.spte_to_pfn_array(s, out=o64),
    }, {
        "expr": lambda: (s & BASE) >> SHIFT,
        "prealloc": lambda: np.right_shift(np.bitwise_and(s, BASE, out=o64), SHIFT, out=o64),
    }))

    # make_spte: a writable, accessed 4K leaf per pfn; the numpy side computes
    # the pfn-0 SPTE once with the scalar make_spte().
    mk = dict(level=spte.PG_LEVEL_4K, pte_access=spte.ACC_ALL, ad_disabled=not ad_enabled)
    base = U64(fmt.make_spte(pfn=0, **mk)[0])
    ops.append(Op("make_spte", {
        "alloc": lambda: fmt.make_spte_array(pfns, **mk),
        "out=": lambda: fmt.make_spte_array(pfns, out=o64, **mk),
    }, {
        "expr": lambda: base | (pfns << SHIFT),
        "prealloc": lambda: np.bitwise_or(np.left_shift(pfns, SHIFT, out=o64), base, out=o64),
    }))

    # In place, level 1 (every present SPTE is a leaf).
    ops.append(Op("write_protect", {"in place": lambda: fmt.write_protect_array(w)},
                  clear_if_present_forms(w, W, t64), inplace=True))

    if ad_enabled:
        clear_dirty = clear_if_present_forms(w, D, t64)
        access_track = clear_if_present_forms(w, A, t64)
    else:
        def cd_mask_index():
            present = (w & P) != 0
            need_wp = (w & AD_MASK) != AD_ENABLED
            w[present & need_wp] &= ~W
            w[present & ~need_wp] &= ~D

        def cd_where():
            clear = np.where((w & AD_MASK) != AD_ENABLED, W, D)
            clear[(w & P) == 0] = 0
            np.bitwise_and(w, ~clear, out=w)

        def cd_prealloc():
            # u64 = all-ones where present (0 - present bit), t64 = W or D.
            np.bitwise_and(w, P, out=u64)
            np.right_shift(u64, U64(_bit(P)), out=u64)
            np.negative(u64, out=u64)
            need_wp = np.not_equal(np.bitwise_and(w, AD_MASK, out=t64), AD_ENABLED, out=ob)
            np.copyto(t64, D)
            np.copyto(t64, W, where=need_wp)
            np.bitwise_and(t64, u64, out=t64)
            np.invert(t64, out=t64)
            np.bitwise_and(w, t64, out=w)

        clear_dirty = {"mask-index": cd_mask_index, "where": cd_where, "prealloc": cd_prealloc}

        # mark_spte_for_access_track(): A/D-enabled SPTEs lose A; A/D-disabled
        # ones that are not yet access-tracked (some of R/W/X set) save R/X in
        # bits 54/56 and lose R/W/X and A; access-tracked ones stay.
        def at_mask_index():
            present = (w & P) != 0
            ad_off = (w & AD_MASK) == AD_DISABLED
            sel = present & ad_off & ((w & TRACK) != 0)
            v = w[sel]
            v |= (v & SAVED) << SAVED_SHIFT
            v &= ~(TRACK | A)
            w[sel] = v
            w[present & ~ad_off] &= ~A

        def at_where():
            ad_off = (w & AD_MASK) == AD_DISABLED
            aged = ((w | ((w & SAVED) << SAVED_SHIFT)) & ~(TRACK | A))
            new = np.where(ad_off, np.where((w & TRACK) == 0, w, aged), w & ~A)
            np.copyto(w, new, where=(w & P) != 0)

        def at_prealloc():
            # ob = SPTEs to age the A/D-disabled way; then the A/D-enabled ones.
            np.bitwise_and(w, AD_MASK, out=t64)
            np.equal(t64, AD_DISABLED, out=ob)
            ad_off = ob.copy()
            np.bitwise_and(w, TRACK, out=t64)
            np.logical_and(ob, t64 != 0, out=ob)
            present = (w & P) != 0
            np.logical_and(ob, present, out=ob)
            np.bitwise_and(w, SAVED, out=t64)
            np.left_shift(t64, SAVED_SHIFT, out=t64)
            np.bitwise_or(t64, w, out=t64)
            np.bitwise_and(t64, ~(TRACK | A), out=t64)
            np.copyto(w, t64, where=ob)
            np.logical_and(present, ~ad_off, out=present)
            np.bitwise_and(w, ~A, out=t64)
            np.copyto(w, t64, where=present)

        access_track = {"mask-index": at_mask_index, "where": at_where, "prealloc": at_prealloc}

    ops.append(Op("clear_dirty", {"in place": lambda: fmt.clear_dirty_array(w)},
                  clear_dirty, inplace=True))
    ops.append(Op("access_track", {"in place": lambda: fmt.access_track_array(w)},
                  access_track, inplace=True))
    return ops


# --- timing -----------------------------------------------------------------------

def best_of(fn, repeat, before=None):
    """(best seconds, last result) of `repeat` timed calls after one warm-up call.
    `before` runs ahead of every call, outside the timing."""
    best, result = float("inf"), None
    for i in range(repeat + 1):
        if before is not None:
            before()
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        if i:
            best = min(best, dt)
    return best, result


def run_op(op, pristine, w, repeat):
    """Time every form of `op`; check that all forms agree.  Returns the row dict."""
    restore = (lambda: np.copyto(w, pristine)) if op.inplace else None
    times = {"kvmmmu": {}, "numpy": {}}
    reference = None
    for side, forms in (("kvmmmu", op.kvmmmu), ("numpy", op.numpy)):
        for form, fn in forms.items():
            dt, res = best_of(fn, repeat, restore)
            if op.inplace:
                if side == "kvmmmu":
                    changed = int(np.count_nonzero(w != pristine))
                    assert res == changed, (op.name, form, res, changed)
                res = w
            res = np.array(res, copy=True)
            if reference is None:
                reference = res
            else:
                assert res.dtype == reference.dtype and np.array_equal(res, reference), (
                    f"{op.name}: {side} form {form!r} disagrees with kvmmmu "
                    f"({int(np.count_nonzero(res != reference))} elements differ)")
            times[side][form] = dt
    if op.inplace and pristine.shape[0] >= 1024:
        # A realistic mix always has SPTEs to change; if not, the data is wrong.
        assert not np.array_equal(reference, pristine), f"{op.name} changed nothing"
    k_form = min(times["kvmmmu"], key=times["kvmmmu"].get)
    n_form = min(times["numpy"], key=times["numpy"].get)
    k, m = times["kvmmmu"][k_form], times["numpy"][n_form]
    n = pristine.shape[0]
    return {
        "op": op.name,
        "kvmmmu_ms": k * 1e3,
        "numpy_ms": m * 1e3,
        "ratio": m / k,
        "kvmmmu_ns_per_spte": k * 1e9 / n,
        "numpy_ns_per_spte": m * 1e9 / n,
        "kvmmmu_form": k_form,
        "numpy_form": n_form,
        "kvmmmu_forms_ms": {f: t * 1e3 for f, t in times["kvmmmu"].items()},
        "numpy_forms_ms": {f: t * 1e3 for f, t in times["numpy"].items()},
    }


def host_info(n, repeat):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "kvmmmu": getattr(sys.modules.get("kvmmmu"), "__version__", "?"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "n": n,
        "repeat": repeat,
    }


def _ms(v):
    return f"{v:.2f}" if v >= 1 else f"{v:.4f}"


def format_table(rows, verbose=False):
    head = ("format", "op", "kvmmmu ms", "numpy ms", "numpy/kvmmmu",
            "kvmmmu ns/SPTE", "numpy ns/SPTE", "kvmmmu form", "numpy form")
    body = []
    for r in rows:
        body.append((r["format"], r["op"], _ms(r["kvmmmu_ms"]), _ms(r["numpy_ms"]),
                     f"{r['ratio']:.2f}", f"{r['kvmmmu_ns_per_spte']:.2f}",
                     f"{r['numpy_ns_per_spte']:.2f}", r["kvmmmu_form"], r["numpy_form"]))
        if verbose:
            for side in ("kvmmmu", "numpy"):
                for form, ms in r[f"{side}_forms_ms"].items():
                    body.append(("", f"  {side} {form}", _ms(ms) if side == "kvmmmu" else "",
                                 _ms(ms) if side == "numpy" else "", "", "", "", "", ""))
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    left = {0, 1, 7, 8}

    def line(cells):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep] + [line(b) for b in body])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1 << 24, help="SPTEs per array (default 16777216)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per form; the best counts")
    ap.add_argument("--formats", default=",".join(core_spte.FORMATS),
                    help="comma-separated SPTE formats (default: %(default)s)")
    ap.add_argument("--json", metavar="FILE", help="also write the table (and every form's time) as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every form's time")
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeat < 1:
        ap.error("--n and --repeat must be positive")

    info = host_info(args.n, args.repeat)
    print(f"kvmmmu bulk SPTE ops vs numpy: n={args.n} SPTEs, best of {args.repeat}")
    print(f"python {info['python']}, numpy {info['numpy']}, {info['cpu']} "
          f"({info['cpus']} CPUs), {info['platform']}")
    print("ratio = numpy ms / kvmmmu ms (> 1: kvmmmu faster)\n", flush=True)

    rows = []
    for fmt_name in args.formats.split(","):
        fmt = core_spte.make_format(fmt_name)
        pristine = core_spte.make_sptes(fmt, args.n, np.random.default_rng(1234))
        pristine.flags.writeable = False
        pfns = np.random.default_rng(1234).integers(0, core_spte.PFN_RANGE, size=args.n,
                                                    dtype=np.uint64)
        w = pristine.copy()
        for op in build_ops(fmt, pristine, w, pfns, args.n):
            row = run_op(op, pristine, w, args.repeat)
            row["format"] = fmt_name
            rows.append(row)
            print(f"  {fmt_name:9} {op.name:22} kvmmmu {row['kvmmmu_ms']:8.2f} ms   "
                  f"numpy {row['numpy_ms']:8.2f} ms   ratio {row['ratio']:5.2f}",
                  file=sys.stderr, flush=True)

    print(format_table(rows, args.verbose))
    slower = [r for r in rows if r["ratio"] < 1]
    if slower:
        print("\nkvmmmu slower than numpy: " + ", ".join(
            f"{r['format']} {r['op']} ({1 / r['ratio']:.2f}x)" for r in slower))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": info, "rows": rows}, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
