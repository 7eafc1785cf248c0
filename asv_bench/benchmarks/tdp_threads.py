"""Threads scaling of the TDP MMU's read-lock map path.

Depends only on kvmmmu._core (pt_arena, role, spte, tdp_mmu).

In the kernel, TDP MMU faults hold ``mmu_lock`` for read: the vCPUs of one VM
map in parallel.  ``TdpMmuCore.map`` is that path (the arena's shared side,
without the GIL, each thread with its own vCPU's caches).  ``threads``
threads map one guest through one root (pandas ``gil.py`` style), either
disjoint halves (``overlap="disjoint"``: scaling) or all the same gfns, each
thread starting at a different offset (``overlap="same"``: contention, most
faults spurious).  ``ZapRootShared`` times ``zap_root_shared`` (the read-lock
zap of an invalidated root) alone and beside a faulting thread.
``benchmarks/compare_tdp_threads.py`` prints the ratios.

Guest gfn g is backed by host pfn 2^24 + g.  ``setup`` builds a fresh arena
(``number = 1``), maps the guest once, zaps it and frees the tables, so the
timed map reuses warm memory and times no host page fault.
"""
import threading

import numpy as np

from kvmmmu._core.pt_arena import MmuMemoryCache, PtArena
from kvmmmu._core.role import KvmMmuPageRole
from kvmmmu._core.spte import SpteFormat
from kvmmmu._core.tdp_mmu import TdpMmuCore

HOST = 1 << 24
RET_PF_RETRY = 1


class Guest:
    def __init__(self, pages, level, nthreads):
        self.a = PtArena(SpteFormat.ept(), nr_vcpus=nthreads, max_tables=1 << 17)
        self.caches = [(MmuMemoryCache(self.a, "shadow_page"), MmuMemoryCache(self.a, "page_header"))
                       for _ in range(nthreads)]
        pc, hc = self.caches[0]
        pc.topup(1)
        hc.topup(1)
        role = KvmMmuPageRole(level=4, direct=1, access=7, ad_disabled=0).word
        self.root = self.a.alloc_sp(pc, hc, role=role, gfn=0, tdp_mmu_page=True)
        self.t = TdpMmuCore(self.a)
        self.gfns = np.arange(0, pages, 1 << (9 * (level - 1)), dtype=np.uint64)
        self.level = level
        self.map(0, self.gfns)             # warm: touch every table's memory once
        self.t.zap_root(self.root)
        self.a.rcu_barrier()

    def map(self, vcpu, gfns):
        pc, hc = self.caches[vcpu]
        r = self.t.map(self.root, gfns, gfns + np.uint64(HOST), self.level, pc, hc, write=True)
        while (r == RET_PF_RETRY).any():            # a lost race: the vCPU faults again
            gfns = gfns[r == RET_PF_RETRY]
            r = self.t.map(self.root, gfns, gfns + np.uint64(HOST), self.level, pc, hc, write=True)


def in_threads(fns):
    ths = [threading.Thread(target=f) for f in fns]
    for th in ths:
        th.start()
    for th in ths:
        th.join()


class MapThreads:
    """``threads`` threads mapping 2^22 4K pages (16 GiB) or 2^24 pages at
    2M (64 GiB) through one root under the read lock."""
    params = ([1, 2], [1, 2], ["disjoint", "same"])
    param_names = ["threads", "level", "overlap"]
    number = 1
    repeat = 3
    timeout = 300

    def setup(self, threads, level, overlap):
        self.g = Guest(1 << (22 if level == 1 else 24), level, threads)
        n = self.g.gfns.size
        if overlap == "disjoint":
            self.parts = np.array_split(self.g.gfns, threads)
        else:
            self.parts = [np.roll(self.g.gfns, -(k * n) // threads) for k in range(threads)]

    def time_map(self, threads, level, overlap):
        in_threads([lambda k=k: self.g.map(k, self.parts[k]) for k in range(threads)])

    def peakmem_map(self, threads, level, overlap):
        in_threads([lambda k=k: self.g.map(k, self.parts[k]) for k in range(threads)])


class ZapRootShared:
    """``zap_root_shared`` of a root holding 2^20 4K pages, alone or while
    another thread faults 2^20 other gfns into the same root."""
    params = [False, True]
    param_names = ["beside_faults"]
    number = 1
    repeat = 3
    timeout = 300

    def setup(self, beside_faults):
        self.g = Guest(1 << 20, 1, 2)
        self.g.map(0, self.g.gfns)
        self.other = self.g.gfns + np.uint64(1 << 21)

    def time_zap_root_shared(self, beside_faults):
        fns = [lambda: self.g.t.zap_root_shared(self.g.root)]
        if beside_faults:
            fns.append(lambda: self.g.map(1, self.other))
        in_threads(fns)
