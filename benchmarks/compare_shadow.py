#!/usr/bin/env python3
"""The shadow MMU's figures (issue 12, "How it is checked: Speed").

* one shadow fault with its guest walk, from Python: the median of
  ``vcpu.kvm_mmu_page_fault(gva, error_code)`` (the common entry: the guest
  walk, faultin, fetch, mmu_set_spte, rmap_add, prefetch) on a ring-3 guest
  with 4-level tables (target <= 8 us), by case (fresh random gvas with the
  host page faulted in; fresh gvas whose level-1 shadow page exists; fresh
  gvas needing new shadow pages; spurious), and on a direct (``mmu="tdp"``,
  TDP on the shadow MMU) VM for a fresh gpa - each on the C path
  (``ShadowMmu.c_fast_path``) and on the Python reference path;
* faulting in a 4 GiB guest through its own 4-level tables: 2^20 first
  touches in random order, ns per fault, next to the bare C baseline of the
  same size (:meth:`kvmmmu._core.tdp_bench.BareRadixMap.shadow_fault`: the
  guest walk with A/D and a radix-tree insert, nothing else), with
  ``ShadowMmu.page_fault_batch`` (host pages populated);
* rmap memory per mapping: the ``pte_list_desc`` bytes in use over the leaf
  SPTEs, next to the kernel's figures (a single mapping costs the 8-byte
  head only; a descriptor of 128 bytes holds 14 sptes, about 9.1 bytes per
  mapping once full);
* shadow pages per guest table.

Prints, never asserts.

    python benchmarks/compare_shadow.py [--quick] [--gib 4]
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from kvmmmu import paging as P  # noqa: E402
from kvmmmu._core.tdp_bench import BareRadixMap  # noqa: E402
from kvmmmu._core.defs import RET_PF_FIXED  # noqa: E402
from kvmmmu.guest_tables import GuestPageTables  # noqa: E402
from kvmmmu.shadow_mmu import ShadowMmu  # noqa: E402
from kvmmmu.vm import VM  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
TABLES = 16 * MiB                 # the guest's tables live in [0, 16 MiB); data above
PFERR_USER = P.PFERR_USER_MASK


def guest(gib, mmu="shadow", populate=False):
    """A long-mode ring-3 guest whose 4-level tables map gva [0, gib GiB) onto
    gpa [16 MiB, 16 MiB + gib GiB) with 4K pages, user, writable (host pages
    populated if asked: faultin then finds them, as GUP fast does)."""
    vm = VM(mmu)
    vm.add_memory(0, TABLES + gib * GiB, slot=0, thp=False, populate=populate)
    gpt = GuestPageTables(vm, 0, TABLES // 4096)
    gpt.map(0, TABLES, gib * GiB)
    v = vm.vcpus[0]
    gpt.enter_long_mode(v)
    return vm, v, gpt


def _timed(pf, addrs, ec, clock):
    ns = np.empty(len(addrs), np.int64)
    for i, g in enumerate(addrs):
        t0 = clock()
        pf(g, ec)
        ns[i] = clock() - t0
    return ns


def _fmt(ns):
    return f"{np.median(ns) / 1e3:6.2f} us median [p90 {np.percentile(ns, 90) / 1e3:6.2f}]"


def scalar(n, clock=time.perf_counter_ns):
    """The scalar figures, on the C path and on the Python reference path."""
    rng = np.random.default_rng(0)
    rand = (rng.choice(1 << 18, n, replace=False).astype(np.int64) << 12).tolist()
    print(f"\nscalar shadow fault from Python (kvm_mmu_page_fault: walk + faultin + fetch + "
          f"set_spte + prefetch), {n} faults each; target <= 8 us median")
    print(f"  {'case':46s} {'C path (c_fast_path)':>30s}   {'Python reference path':>30s}")
    rows = {}
    for c in (True, False):
        ShadowMmu.c_fast_path = c
        # the case: fresh random gvas of a 1 GiB guest, host pages not
        # populated (faultin faults them in; most faults need a new level-1 page)
        vm, v, _ = guest(1)
        v.vcpu_enter_guest()
        rows.setdefault("fresh random gva, host page faulted in", []).append(
            _timed(v.kvm_mmu_page_fault, rand, PFERR_USER, clock))
        rows.setdefault("the same gvas again (spurious)", []).append(
            _timed(v.kvm_mmu_page_fault, rand, PFERR_USER, clock))
        # fresh gvas whose level-1 shadow page exists, host pages present
        vm, v, _ = guest(1, populate=True)
        v.vcpu_enter_guest()
        pf = v.kvm_mmu_page_fault
        tables = sorted({g >> 21 for g in rand[: max(n // 64, 8)]})
        for t in tables:
            pf(t << 21, PFERR_USER)
        fresh = [(t << 21) | (k << 12) for t in tables for k in range(1, 512)][:n]
        rng.shuffle(fresh)
        rows.setdefault("fresh gva, level-1 shadow page exists", []).append(
            _timed(pf, fresh, PFERR_USER, clock))
        used = {g >> 21 for g in fresh} | set(tables)
        new = [t << 21 for t in range(512) if t not in used][:n]      # 1 GiB: 512 tables
        rows.setdefault("fresh gva in a new guest table (new pages)", []).append(
            _timed(pf, new, PFERR_USER, clock))
        # direct: TDP on the shadow MMU (mmu="tdp"), fresh 4K gpa
        vm = VM("tdp")
        vm.add_memory(0, 1 * GiB, slot=0, thp=False, populate=True)
        v = vm.vcpus[0]
        v.vcpu_enter_guest()
        gpas = rng.choice(1 << 18, n, replace=False).astype(np.int64) << 12
        rows.setdefault("direct (mmu='tdp') fresh 4K gpa", []).append(
            _timed(v.kvm_mmu_page_fault, gpas.tolist(), P.PFERR_WRITE_MASK, clock))
    ShadowMmu.c_fast_path = True
    for name, (c, py) in rows.items():
        print(f"  {name:46s} {_fmt(c):>30s}   {_fmt(py):>30s}")


def full_guest(gib, clock=time.perf_counter_ns):
    n = gib << 18
    gvas = np.arange(n, dtype=np.uint64) << np.uint64(12)
    np.random.default_rng(1).shuffle(gvas)
    vm, v, gpt = guest(gib)
    bare = BareRadixMap()
    t0 = clock()
    done = bare.shadow_fault(gpt._q, gpt.cr3, gvas)
    tb = clock() - t0
    assert done == n
    print(f"\n{gib} GiB guest, {n} first touches in random order through its own 4-level tables "
          f"(host pages populated)")
    print(f"  bare C baseline (walk with A/D + tree insert)  {tb / n:8.1f} ns/fault")
    vm, v, gpt = guest(gib, populate=True)
    v.vcpu_enter_guest()
    sm = vm.mmu_backend
    t0 = clock()
    r = sm.page_fault_batch(v, gvas, PFERR_USER)
    tt = clock() - t0
    assert (r == RET_PF_FIXED).all()
    print(f"  ShadowMmu.page_fault_batch                     {tt / n:8.1f} ns/fault  x{tt / tb:.1f}")
    t0 = clock()
    sm.page_fault_batch(v, gvas, PFERR_USER)
    ts = clock() - t0
    print(f"  the same batch again (all spurious)            {ts / n:8.1f} ns/fault")
    m = min(n, 1 << 14)
    vm2, v2, _ = guest(gib, populate=True)
    v2.vcpu_enter_guest()
    pf = v2.kvm_mmu_page_fault
    t0 = clock()
    for g in gvas[:m].tolist():
        pf(g, PFERR_USER)
    tscal = clock() - t0
    print(f"  scalar kvm_mmu_page_fault loop (first {m})  {tscal / m:8.1f} ns/fault")
    st = vm.stat.as_dict()
    leaves = st["pages_4k"] + st["pages_2m"] + st["pages_1g"]
    pool = vm.rmap_pool
    print(f"  rmap: {pool.active_bytes} bytes of pte_list_desc for {leaves} leaf SPTEs: "
          f"{(8 * leaves + pool.active_bytes) / max(leaves, 1):.2f} B/mapping with the 8-byte "
          f"heads (kernel: 8 for a single mapping, ~9.1 once a 128-byte descriptor of 14 "
          f"is full; max rmap size {pool.max_mmu_rmap_size})")
    print(f"  shadow pages {st.get('mmu_cache_miss')} for {gpt.tables_used} guest tables")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gib", type=int, default=4)
    args = ap.parse_args()
    scalar(300 if args.quick else 3000)
    full_guest(1 if args.quick else args.gib)


if __name__ == "__main__":
    main()
