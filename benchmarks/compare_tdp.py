#!/usr/bin/env python3
"""The TDP MMU's C core against a bare C radix-tree map of the same gfns.

The baseline is :class:`kvmmmu._core.tdp_bench.BareRadixMap`: the same
4-level tree of 512 x 8-byte entries per 4 KiB table, built with plain stores
(no SPTE format, cmpxchg, change handler, stats, caches or headers), measured
in the same run.  Figures (issue 11, "How it is checked"):

* a 64 GiB guest (2^24 gfns) mapped at 4 KiB and at 2 MiB through one
  ``TdpMmuCore.map`` call: ns per gfn and the ratio to the bare map (target
  within 3x); table memory: arena bytes against (4 KiB + 184-byte header) per
  table in use (target within 1.05x); RSS;
* a batch walk of 1M random gfns: ``kvm_tdp_mmu_get_walk`` against the bare walk;
* one dirty-log round over the 2^24 4K SPTEs: ``clear_bit_range`` of the D bit
  over the range (``kvm_tdp_mmu_clear_dirty_slot``), ``clear_dirty_log`` of a
  full bitmap (``kvm_tdp_mmu_clear_dirty_pt_masked`` per word) plus the
  collect (popcount of the bitmap it returns), against
  ``SpteFormat.clear_dirty_array`` over an array of the same 2^24 SPTEs
  (target within 2x);
* eager split of 64 GiB of 2 MiB leaves to 4K (``split_huge_pages``; the
  kernel reports ~1.5 s for 96 GiB, i.e. ~1.0 s for 64 GiB);
* the scalar ``TdpMmu.page_fault`` from Python (faultin included; target
  <= 3 us median) and the scalar ``TdpMmuCore.map_one``;
* cost per operation of the 4K map, the walk and the dirty-log round at
  2^20, 2^22, 2^24 pages (flat?);
* ``TdpMmu.audit`` (the C walk of kvmmmu._core.tdp_audit) over the 64 GiB
  4K guest.

Prints, never asserts.  Before each timed TDP operation the SPTEs get their D
bits back through the arena's table views (what the CPU does on a write), so
every clear has work to do.

    python benchmarks/compare_tdp.py [--quick] [--repeat 3]
"""
import argparse
import gc
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kvmmmu._core.pt_arena import HEADER_DTYPE, MmuMemoryCache, PtArena  # noqa: E402
from kvmmmu._core.role import KvmMmuPageRole  # noqa: E402
from kvmmmu._core.spte import SpteFormat  # noqa: E402
from kvmmmu._core.tdp_bench import BareRadixMap  # noqa: E402
from kvmmmu._core.tdp_iter import kvm_tdp_mmu_get_walk  # noqa: E402
from kvmmmu._core.tdp_mmu import TdpMmuCore  # noqa: E402

HOST = 1 << 24                      # gfn g is backed by pfn HOST + g (1G aligned)
PAGE = 4096
HEADER = HEADER_DTYPE.itemsize      # sizeof(struct kvm_mmu_page) here: 184
PFN_MASK = ((1 << 52) - 1) & ~0xfff
KERNEL_SPLIT_S_PER_GIB = 1.5 / 96   # the kernel figure


def rss():
    """(current RSS, peak RSS) of this process in bytes."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def mib(n):
    return f"{n / (1 << 20):.1f} MiB"


class Tdp:
    """An arena, its caches, a 4-level TDP root and the core."""

    def __init__(self, max_tables=1 << 17):
        self.fmt = SpteFormat.ept()
        self.a = PtArena(self.fmt, nr_vcpus=1, max_tables=max_tables)
        self.pc = MmuMemoryCache(self.a, "shadow_page")
        self.hc = MmuMemoryCache(self.a, "page_header")
        self.pc.topup(1)
        self.hc.topup(1)
        role = KvmMmuPageRole(level=4, direct=1, access=7, ad_disabled=0).word
        self.root = self.a.alloc_sp(self.pc, self.hc, role=role, gfn=0, tdp_mmu_page=True)
        self.t = TdpMmuCore(self.a)

    def map(self, gfns, level, write=True):
        return self.t.map(self.root, gfns, gfns + np.uint64(HOST), level, self.pc, self.hc,
                          write=write)

    def tables_in_use(self):
        return self.t.tdp_mmu_pages + 1                  # + the root

    def redirty(self):
        """Set D in every present 4K leaf, as the CPU does on a write (through
        the arena's zero-copy table views; untimed)."""
        d = np.uint64(self.fmt.masks()["dirty_mask"])
        states = self.a.table_states()
        tpc = self.a.tables_per_chunk
        base = np.uint64(self.a.base_pfn)
        for c in range(self.a.n_chunks):
            rows = np.flatnonzero(states[c * tpc:(c + 1) * tpc] == 3)       # spt tables
            if not rows.size:
                continue
            view = self.a.chunk_tables(c)
            tab = view[rows]
            pres = self.fmt.is_shadow_present_pte_array(tab.ravel()).reshape(tab.shape)
            leaf = pres & (((tab & np.uint64(PFN_MASK)) >> np.uint64(12)) < base) & \
                ((tab & np.uint64(0x80)) == 0)
            view[rows] = np.where(leaf, tab | d, tab)


def timed(fn, *args, **kw):
    t0 = time.perf_counter_ns()
    r = fn(*args, **kw)
    return time.perf_counter_ns() - t0, r


def bare_for(tdp, gfns, level):
    """A BareRadixMap with the TDP MMU's leaf bits (so the SPTEs are equal)."""
    s, _ = kvm_tdp_mmu_get_walk(tdp.a, tdp.root, gfns[:1])
    return BareRadixMap(leaf_bits=int(s[0]) & ~PFN_MASK & ~0x80)


def map_figures(n, level, repeat, walk_n, rng):
    """Map n gfns' worth of guest at `level` in both; walk walk_n random gfns."""
    step = 1 << (9 * (level - 1))
    gfns = np.arange(0, n, step, dtype=np.uint64)
    pfns = gfns + np.uint64(HOST)
    probe = rng.integers(0, n, walk_n).astype(np.uint64)
    best = {"tdp": float("inf"), "bare": float("inf"), "walk_tdp": float("inf"),
            "walk_bare": float("inf")}
    last = None
    for _ in range(repeat):
        last = None
        gc.collect()
        tdp = Tdp()
        dt, r = timed(tdp.map, gfns, level)
        assert (r == 5).all(), "TDP map did not FIX every gfn"
        best["tdp"] = min(best["tdp"], dt)
        peak = rss()[1]
        del r
        bare = bare_for(tdp, gfns, level)
        dt, _ = timed(bare.map, gfns, pfns, level)
        best["bare"] = min(best["bare"], dt)
        dt, (ts, tl) = timed(kvm_tdp_mmu_get_walk, tdp.a, tdp.root, probe)
        best["walk_tdp"] = min(best["walk_tdp"], dt)
        dt, (bs, bl) = timed(bare.walk, probe)
        best["walk_bare"] = min(best["walk_bare"], dt)
        assert (ts == bs).all() and (tl == bl).all(), "the walks disagree"
        tables = tdp.tables_in_use()
        mem = (tdp.a.nbytes, tables, tdp.a.capacity, bare.nbytes, bare.n_tables, peak)
        last = (tdp, bare)
        del tdp, bare
    return {"n": n, "ngfns": len(gfns), "best": best, "mem": mem, "keep": last, "walk_n": walk_n}


def print_map(f, label):
    n, best = f["ngfns"], f["best"]
    nbytes, tables, cap, bbytes, btables, peak = f["mem"]
    ideal = tables * (PAGE + HEADER)
    print(f"\n{label}: {f['n']} 4K pages = {f['n'] >> 18} GiB, {n} gfns mapped by one call")
    print(f"  TdpMmuCore.map   {best['tdp'] / n:8.1f} ns/gfn  ({best['tdp'] / 1e9:.3f} s)"
          f"   x{best['tdp'] / best['bare']:.2f} of the bare map (target <= 3)")
    print(f"  BareRadixMap.map {best['bare'] / n:8.1f} ns/gfn  ({best['bare'] / 1e9:.3f} s)")
    print(f"  tables in use {tables} (bare {btables}); arena {mib(nbytes)} = "
          f"x{nbytes / ideal:.3f} of (4096 + {HEADER}) B per table in use (target <= 1.05);"
          f" slots allocated {cap}; bare {mib(bbytes)}; process peak RSS after the TDP map {mib(peak)}")
    w = f["walk_n"]
    print(f"  walk of {w} random gfns: kvm_tdp_mmu_get_walk {best['walk_tdp'] / w:.1f} ns/gfn,"
          f" bare {best['walk_bare'] / w:.1f} ns/gfn, x{best['walk_tdp'] / best['walk_bare']:.2f}")


def dirty_round(tdp, n, repeat):
    """The dirty-log figures over the n 4K leaves of `tdp` (mapped writable)."""
    d = tdp.fmt.masks()["dirty_mask"]
    gfns = np.arange(n, dtype=np.uint64)
    sptes, _ = kvm_tdp_mmu_get_walk(tdp.a, tdp.root, gfns)
    assert (sptes & np.uint64(d)).all(), "the 4K leaves are not dirty"
    del gfns
    full = np.full(n // 64, ~np.uint64(0), np.uint64)
    best = {"cbr": float("inf"), "cdl": float("inf"), "collect": float("inf"),
            "array": float("inf")}
    work = np.empty_like(sptes)
    for _ in range(repeat):
        tdp.redirty()
        dt, changed = timed(tdp.t.clear_bit_range, tdp.root, 0, n, d)
        assert changed
        best["cbr"] = min(best["cbr"], dt)
        tdp.redirty()
        dt, found = timed(tdp.t.clear_dirty_log, tdp.root, 0, full)
        best["cdl"] = min(best["cdl"], dt)
        dt, count = timed(lambda: int(np.bitwise_count(found).sum()))
        assert count == n, f"clear_dirty_log found {count} of {n} leaves"
        best["collect"] = min(best["collect"], dt)
        np.copyto(work, sptes)
        dt, changed = timed(tdp.fmt.clear_dirty_array, work)
        assert changed == n
        best["array"] = min(best["array"], dt)
    return best


def print_dirty(b, n):
    arr = b["array"]
    print(f"\ndirty-log round over {n} 4K SPTEs (all dirty before each clear)")
    print(f"  SpteFormat.clear_dirty_array (baseline)    {arr / 1e6:8.1f} ms  {arr / n:6.2f} ns/SPTE")
    for key, label in (("cbr", "clear_bit_range(D) over the range"),
                       ("cdl", "clear_dirty_log(full bitmap)"),
                       ("collect", "collect (popcount of its bitmap)")):
        print(f"  {label:42s} {b[key] / 1e6:8.1f} ms  {b[key] / n:6.2f} ns/SPTE  x{b[key] / arr:.2f}")
    rnd = b["cdl"] + b["collect"]
    print(f"  round = clear_dirty_log + collect          {rnd / 1e6:8.1f} ms  x{rnd / arr:.2f}"
          f" of the baseline (target <= 2)")
    both = b["cbr"] + rnd
    print(f"  clear_bit_range + round                    {both / 1e6:8.1f} ms  x{both / arr:.2f}")


def audit_figures(tdp, n):
    """TdpMmu.audit's C walk (kvmmmu._core.tdp_audit.tdp_audit) over the
    guest: one memslot covering it."""
    try:
        from kvmmmu._core.tdp_audit import tdp_audit
    except ImportError:
        print("\naudit: kvmmmu._core.tdp_audit is not built")
        return
    slots = (np.zeros(1, np.uint64), np.full(1, n, np.uint64), np.full(1, 3, np.int8),
             np.zeros(1, np.int8))
    best = float("inf")
    for _ in range(3):
        dt, (counts, probs) = timed(tdp_audit, tdp.a, np.array([tdp.root], np.uint64), *slots)
        assert not len(probs) and counts["leaves"][1] == n, (counts, probs[:5])
        best = min(best, dt)
    print(f"\naudit (C walk, every invariant) of the {n >> 18} GiB guest at 4K:"
          f" {best / 1e6:.1f} ms, {best / n:.2f} ns per leaf")


def split_figures(n, repeat):
    gfns = np.arange(0, n, 512, dtype=np.uint64)
    best = float("inf")
    for _ in range(repeat):
        tdp = Tdp()
        tdp.map(gfns, 2)
        dt, nr = timed(tdp.t.split_huge_pages, tdp.root, 0, n, 1, tdp.pc, tdp.hc)
        assert nr == len(gfns), (nr, len(gfns))
        assert tdp.a.page_stats["pages_4k"] == n
        best = min(best, dt)
        del tdp
        gc.collect()
    gib = n >> 18
    print(f"\neager split of {gib} GiB of 2M leaves ({len(gfns)}) to 4K: {best / 1e9:.3f} s,"
          f" {best / len(gfns) / 1e3:.2f} us per 2M page; kernel ~{KERNEL_SPLIT_S_PER_GIB * gib:.2f} s"
          f" for {gib} GiB (x{best / 1e9 / (KERNEL_SPLIT_S_PER_GIB * gib):.2f})")


def scalar_figures(n_faults):
    """Medians of one ``vcpu.kvm_mmu_page_fault(gpa, error_code)`` (the
    common entry, faultin included) on fresh 4K gfns of a non-THP slot and
    again on the same gfns (the fast path answers SPURIOUS), of
    ``TdpMmu.page_fault`` (which first builds the error code an EPT
    violation reports), and of TdpMmuCore.map_one on fresh gfns."""
    from kvmmmu.host import HostConfig
    from kvmmmu.vm import VM
    clock = time.perf_counter_ns

    def vm_with(n):
        vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), nr_vcpus=1)
        vm.add_memory(0, n * PAGE, slot=0, thp=False, populate=True)
        vm.vcpus[0].kvm_mmu_reload()
        return vm, vm.vcpus[0]

    vm, v = vm_with(n_faults)
    pf = v.kvm_mmu_page_fault
    ns = np.empty(n_faults, np.int64)
    rets = set()
    for g in range(n_faults):
        t0 = clock()
        r = pf(g << 12, 2)                          # PFERR_WRITE: a fresh write
        ns[g] = clock() - t0
        rets.add(r)
    assert rets == {5}, rets
    spur = np.empty(n_faults, np.int64)
    for g in range(n_faults):                       # again: the fast path answers
        t0 = clock()
        pf(g << 12, 3)                              # PFERR_PRESENT | PFERR_WRITE
        spur[g] = clock() - t0
    vm, v = vm_with(n_faults)
    conv = vm.mmu_backend.page_fault
    old = np.empty(n_faults, np.int64)
    for g in range(n_faults):
        t0 = clock()
        conv(v, g, write=True)
        old[g] = clock() - t0

    tdp = Tdp()
    one = tdp.t.map_one
    m1 = np.empty(n_faults, np.int64)
    root, pc, hc = tdp.root, tdp.pc, tdp.hc
    for g in range(n_faults):
        pc.topup(5)
        hc.topup(5)
        t0 = clock()
        one(root, g, HOST + g, 1, pc, hc, write=True)
        m1[g] = clock() - t0
    empty = np.empty(n_faults, np.int64)
    for g in range(n_faults):
        t0 = clock()
        empty[g] = clock() - t0
    print(f"\nscalar, from Python, {n_faults} fresh 4K gfns (medians; p90 in brackets;"
          f" timer overhead {np.median(empty):.0f} ns included)")
    print(f"  kvm_mmu_page_fault, new 4K mapping, faultin included {np.median(ns) / 1e3:6.2f} us"
          f" [{np.percentile(ns, 90) / 1e3:.2f}]  (target <= 3 us)")
    print(f"  kvm_mmu_page_fault, present (fast_page_fault)        {np.median(spur) / 1e3:6.2f} us"
          f" [{np.percentile(spur, 90) / 1e3:.2f}]")
    print(f"  TdpMmu.page_fault (builds the error code), new 4K    {np.median(old) / 1e3:6.2f} us"
          f" [{np.percentile(old, 90) / 1e3:.2f}]")
    print(f"  TdpMmuCore.map_one, new 4K mapping                   {np.median(m1) / 1e3:6.2f} us"
          f" [{np.percentile(m1, 90) / 1e3:.2f}]")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N per figure")
    args = ap.parse_args()
    big = 1 << (20 if args.quick else 24)
    sizes = [big >> 4, big >> 2, big]
    walk_n = min(1 << 20, big)
    rng = np.random.default_rng(1234)
    t_start = time.perf_counter()
    print(f"TDP MMU core vs a bare C radix-tree map (best of {args.repeat}); "
          f"sizes {', '.join(f'2^{s.bit_length() - 1}' for s in sizes)} 4K pages")

    flat = []
    for n in sizes:
        f = map_figures(n, 1, args.repeat, walk_n, rng)
        flat.append(f)
        tdp, bare = f.pop("keep")
        del bare
        gc.collect()
        f["dirty"] = dirty_round(tdp, n, args.repeat)
        if n == big:
            keep = tdp
        del tdp
        gc.collect()
    f4k = flat[-1]
    print_map(f4k, "4K leaves")
    print_dirty(f4k["dirty"], big)
    audit_figures(keep, big)
    del keep
    gc.collect()

    f2m = map_figures(big, 2, args.repeat, walk_n, rng)
    del f2m["keep"]
    print_map(f2m, "2M leaves")
    print("  (at 2M the tables in use fill a fraction of one arena chunk of "
          "512 tables: the ratio is chunk granularity, not per-table overhead)")
    gc.collect()

    split_figures(big, args.repeat)

    print(f"\nns per operation as the guest grows (4K map per gfn; walk of {walk_n} random"
          f" gfns per gfn; dirty round = clear_dirty_log + collect per SPTE, against"
          f" clear_dirty_array)")
    print(f"  {'pages':>8s} {'TDP map':>9s} {'bare map':>9s} {'ratio':>6s} {'TDP walk':>9s}"
          f" {'bare walk':>10s} {'dirty rnd':>10s} {'array':>7s} {'ratio':>6s}")
    for f in flat:
        b, n, w, d = f["best"], f["ngfns"], f["walk_n"], f["dirty"]
        rnd = d["cdl"] + d["collect"]
        print(f"  2^{n.bit_length() - 1:<6d} {b['tdp'] / n:9.1f} {b['bare'] / n:9.1f}"
              f" {b['tdp'] / b['bare']:6.2f} {b['walk_tdp'] / w:9.1f} {b['walk_bare'] / w:10.1f}"
              f" {rnd / n:10.2f} {d['array'] / n:7.2f} {rnd / d['array']:6.2f}")

    scalar_figures(4096 if args.quick else 32768)
    cur, peak = rss()
    print(f"\npeak RSS {mib(peak)} (now {mib(cur)}); wall {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
