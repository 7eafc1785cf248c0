#!/usr/bin/env python3
"""The mirrored TDP MMU's figures (issue 13, "How it is checked: Speed"), each
next to the same operation on a plain TDP root measured in the same run:

* private faults per second on a TD (the mirror walk, SEPT.ADD for new
  tables, PAGE.AUG per leaf through the TDX-module model), scalar
  (``vcpu.kvm_mmu_page_fault``, median us) and batch
  (``TdpMmu.map_memory(private=True)``, ns per page), against write faults on
  a default VM's TDP root; the TD's shared faults (its direct root) too;
* converting 1 GiB private -> shared (``KVM_SET_MEMORY_ATTRIBUTES`` with every
  page mapped in the mirror: per page RANGE.BLOCK, TRACK, PAGE.REMOVE,
  PHYMEM.PAGE.WBINVD) against the same ioctl shared -> private on a
  SW-protected VM (a plain TDP root losing 1 GiB of 4K leaves);
* the MMU's own share of a private fault: the same faults with hooks that
  return at once (no TDX-module model behind them).

Prints, never asserts.

    python benchmarks/compare_tdx.py [--quick]
"""
import argparse
import importlib.util
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

_spec = importlib.util.spec_from_file_location(
    "asv_tdx", os.path.join(os.path.dirname(HERE), "asv_bench", "benchmarks", "tdx.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)                      # td(), plain(), PRIV, SHARED: one home

from kvmmmu.memattrs import KVM_MEMORY_ATTRIBUTE_PRIVATE  # noqa: E402
from kvmmmu.mmu import PFERR_GUEST_FINAL_MASK, PFERR_WRITE_MASK  # noqa: E402

GiB = 1 << 30


def _scalar(pf, addrs, ec):
    ns = np.empty(len(addrs), np.int64)
    clock = time.perf_counter_ns
    for i, a in enumerate(addrs):
        t0 = clock()
        pf(a, ec)
        ns[i] = clock() - t0
    return ns


def _fmt(ns):
    return f"{np.median(ns) / 1e3:6.2f} us median [p90 {np.percentile(ns, 90) / 1e3:6.2f}]"


class _NoopHooks:
    """The hooks of a TD that answer at once (the MMU's own cost)."""

    def __init__(self, tdx):
        self.__dict__.update(tdx.__dict__)

    def link_external_spt(self, *a):
        return 0

    set_external_spte = link_external_spt

    def audit(self):
        return []


def faults(n):
    gfns = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(7)) % np.uint64(1 << 18)
    addrs = (np.unique(gfns[gfns != 0]) << np.uint64(12)).tolist()
    print(f"\nscalar faults from Python, {len(addrs)} fresh gfns 7 apart (a 4K table every 73)")
    td = B.td()
    plain = B.plain()
    t_priv = _scalar(td.vcpus[0].kvm_mmu_page_fault, addrs, B.PRIV)
    t_plain = _scalar(plain.vcpus[0].kvm_mmu_page_fault, addrs, PFERR_WRITE_MASK)
    td2 = B.td()
    td2.tdx = _NoopHooks(td2.tdx)
    t_mmu = _scalar(td2.vcpus[0].kvm_mmu_page_fault, addrs, B.PRIV)
    td3 = B.td(private=1 << 21)
    slot = td3.memslots[0].id_to_memslot(0)
    td3.host.populate(slot.userspace_addr, GiB)
    shared = [B.SHARED | a for a in addrs if a >= 1 << 21]
    t_shared = _scalar(td3.vcpus[0].kvm_mmu_page_fault, shared,
                       PFERR_WRITE_MASK | PFERR_GUEST_FINAL_MASK)
    base = np.median(t_plain)
    for name, t in (("plain TDP root, write fault", t_plain),
                    ("TD private fault (mirror + module)", t_priv),
                    ("TD private fault, no-op hooks (MMU)", t_mmu),
                    ("TD shared fault (direct root)", t_shared)):
        print(f"  {name:38s} {_fmt(t)}   x{np.median(t) / base:5.2f}  "
              f"({1e9 / np.median(t):9.0f} faults/s)")


def batch(n):
    gfns = np.arange(1 << 9, (1 << 9) + n, dtype=np.uint64)
    td = B.td(size=GiB + (2 << 20), private=GiB + (2 << 20))
    plain = B.plain(size=GiB + (2 << 20))
    v = plain.vcpus[0]
    t0 = time.perf_counter()
    td.mmu_backend.map_memory(td.vcpus[0], gfns, private=True)
    t_td = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain.mmu_backend.map_memory(v, gfns, write=True)
    t_plain = time.perf_counter() - t0
    print(f"\nbatch map of {n} 4K pages (TdpMmu.map_memory: private=True on the TD, 4K host "
          f"pages on the plain root)")
    print(f"  plain TDP root     {t_plain / n * 1e9:9.0f} ns/page")
    print(f"  TD private         {t_td / n * 1e9:9.0f} ns/page   x{t_td / t_plain:7.1f}  "
          f"({n / t_td:9.0f} pages/s)")
    return td, gfns


def convert(td, gfns):
    n = len(gfns)
    size = n << 12
    sw = B.plain(size=GiB + (2 << 20), vm_type="sw_protected")
    sw.mmu_backend.map_memory(sw.vcpus[0], gfns)
    mapped = sw.arena.page_stats["pages_4k"]
    t0 = time.perf_counter()
    sw.set_memory_attributes(int(gfns[0]) << 12, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    td.set_memory_attributes(int(gfns[0]) << 12, size, 0)
    t_td = time.perf_counter() - t0
    left = td.arena.page_stats["pages_4k"] - 1          # the image page stays
    print(f"\nconvert {size >> 20} MiB, every page mapped (KVM_SET_MEMORY_ATTRIBUTES)")
    print(f"  (check: {mapped} of {n} plain leaves were mapped, {left} TD leaves left, "
          f"TD {'bugged' if td.bugged else 'healthy'})")
    print(f"  plain root (SW-protected), shared -> private: {t_plain * 1e3:10.2f} ms "
          f"({t_plain / n * 1e9:.0f} ns/page)")
    print(f"  TD, private -> shared (BLOCK, TRACK, REMOVE, WBINVD per page): {t_td * 1e3:10.2f} ms"
          f"   x{t_td / t_plain:7.0f}  ({t_td / n * 1e6:.1f} us/page)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB instead of 1 GiB, fewer faults")
    a = ap.parse_args(argv)
    faults(1024 if a.quick else 8192)
    td, gfns = batch((64 << 20) >> 12 if a.quick else GiB >> 12)
    convert(td, gfns)


if __name__ == "__main__":
    main()
