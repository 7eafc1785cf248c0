#!/usr/bin/env python3
"""The shadow MMU's figures (issue 12, "How it is checked: Speed").

* one shadow fault with its guest walk, from Python: the median of
  ``vcpu.kvm_mmu_page_fault(gva, error_code)`` (the common entry: the guest
  walk, faultin, fetch, mmu_set_spte, rmap_add, prefetch) on fresh 4K gvas of
  a ring-3 guest with 4-level tables (target <= 8 us), and on a direct
  (``mmu="tdp"``, TDP on the shadow MMU) VM for a fresh gpa;
* faulting in a 4 GiB guest through its own 4-level tables: 2^20 first
  touches in random order, ns per fault, next to the bare C baseline of the
  same size (:meth:`kvmmmu._core.tdp_bench.BareRadixMap.shadow_fault`: the
  guest walk with A/D and a radix-tree insert, nothing else), and the
  backend's batch path when it has one (``page_fault_batch``);
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
from kvmmmu.guest_tables import GuestPageTables  # noqa: E402
from kvmmmu.vm import VM  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
TABLES = 16 * MiB                 # the guest's tables live in [0, 16 MiB); data above
PFERR_USER = P.PFERR_USER_MASK


def guest(gib, mmu="shadow"):
    """A long-mode ring-3 guest whose 4-level tables map gva [0, gib GiB) onto
    gpa [16 MiB, 16 MiB + gib GiB) with 4K pages, user, writable."""
    vm = VM(mmu)
    vm.add_memory(0, TABLES + gib * GiB, slot=0, thp=False)
    gpt = GuestPageTables(vm, 0, TABLES // 4096)
    gpt.map(0, TABLES, gib * GiB)
    v = vm.vcpus[0]
    v.kvm_set_cr4(P.X86_CR4_PAE)
    v.kvm_set_efer(P.EFER_LME | P.EFER_NX)
    v.kvm_set_cr0(P.X86_CR0_PE | P.X86_CR0_PG | P.X86_CR0_WP)
    v.kvm_set_cr3(gpt.cr3)
    v.set_cpl(3)
    return vm, v, gpt


def scalar(n, clock=time.perf_counter_ns):
    vm, v, _ = guest(1)
    if vm.mmu_backend is None:
        print("\nscalar: VM('shadow') has no shadow MMU backend yet")
        return
    v.vcpu_enter_guest()
    rng = np.random.default_rng(0)
    gvas = rng.choice(1 << 18, n, replace=False).astype(np.int64) << 12
    pf = v.kvm_mmu_page_fault
    ns = np.empty(n, np.int64)
    rets = {}
    for i, g in enumerate(gvas.tolist()):
        t0 = clock()
        r = pf(g, PFERR_USER)
        ns[i] = clock() - t0
        rets[r] = rets.get(r, 0) + 1
    again = np.empty(n, np.int64)
    for i, g in enumerate(gvas.tolist()):
        t0 = clock()
        pf(g, PFERR_USER)
        again[i] = clock() - t0
    print(f"\nscalar shadow fault from Python, {n} fresh 4K gvas (RET_PF counts {rets}):")
    print(f"  kvm_mmu_page_fault (walk + fetch + set_spte)  {np.median(ns) / 1e3:6.2f} us median"
          f" [p90 {np.percentile(ns, 90) / 1e3:.2f}]  (target <= 8 us)")
    print(f"  the same gvas again                           {np.median(again) / 1e3:6.2f} us median")
    st = vm.stat.as_dict()
    print(f"  shadow pages: {st.get('mmu_cache_miss')} created (mmu_cache_miss), "
          f"pages_4k {st['pages_4k']}")

    vm = VM("tdp")
    vm.add_memory(0, 1 * GiB, slot=0, thp=False, populate=True)
    v = vm.vcpus[0]
    if vm.mmu_backend is None:
        return
    v.vcpu_enter_guest()
    pf = v.kvm_mmu_page_fault
    gfns = rng.choice(1 << 18, n, replace=False).astype(np.int64) << 12
    d = np.empty(n, np.int64)
    for i, g in enumerate(gfns.tolist()):
        t0 = clock()
        pf(g, P.PFERR_WRITE_MASK)
        d[i] = clock() - t0
    print(f"  direct (mmu='tdp') fresh 4K fault              {np.median(d) / 1e3:6.2f} us median"
          f" [p90 {np.percentile(d, 90) / 1e3:.2f}]")


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
    print(f"\n{gib} GiB guest, {n} first touches in random order through its own 4-level tables")
    print(f"  bare C baseline (walk with A/D + tree insert)  {tb / n:8.1f} ns/fault")
    vm, v, gpt = guest(gib)
    if vm.mmu_backend is None:
        print("  (no shadow MMU backend yet)")
        return
    v.vcpu_enter_guest()
    batch = getattr(vm.mmu_backend, "page_fault_batch", None)
    if batch is not None:
        t0 = clock()
        batch(v, gvas, PFERR_USER)
        tt = clock() - t0
        print(f"  ShadowMmu.page_fault_batch                     {tt / n:8.1f} ns/fault  x{tt / tb:.1f}")
    else:
        pf = v.kvm_mmu_page_fault
        m = min(n, 1 << 16)
        t0 = clock()
        for g in gvas[:m].tolist():
            pf(g, PFERR_USER)
        tt = clock() - t0
        print(f"  scalar kvm_mmu_page_fault (first {m})        {tt / m:8.1f} ns/fault  x{tt / m / (tb / n):.1f}"
              f"  (no batch path yet)")
    st = vm.stat.as_dict()
    leaves = st["pages_4k"] + st["pages_2m"] + st["pages_1g"]
    pool = vm.rmap_pool
    print(f"  rmap: {pool.active_bytes} bytes of pte_list_desc for {leaves} leaf SPTEs "
          f"({pool.active_bytes / max(leaves, 1):.2f} B/mapping beyond the 8-byte heads; "
          f"max rmap size {pool.max_mmu_rmap_size})")
    print(f"  shadow pages {st.get('mmu_cache_miss')} for {gpt.tables_used} guest tables")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gib", type=int, default=4)
    args = ap.parse_args()
    scalar(500 if args.quick else 3000)
    full_guest(1 if args.quick else args.gib)


if __name__ == "__main__":
    main()
