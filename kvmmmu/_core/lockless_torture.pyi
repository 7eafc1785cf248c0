"""Stubs for kvmmmu._core.lockless_torture (see lockless_torture.pyx)."""
from typing import Literal, TypedDict

from kvmmmu._core.pt_arena import PtArena

class SpteTortureResult(TypedDict):
    read: str
    host_64bit: bool
    reads: int
    torn: int
    nonpresent_mixes: int
    retries: int
    retry_rate: float
    reads_per_second: float
    seconds: float
    writes: int
    writer_errors: int
    flushes: int
    first_torn: int | None
    cpus: list[int] | None
    page_stats_drift: int

class WalkTortureResult(TypedDict):
    scheme: str
    protect: bool
    walks: int
    uaf: int
    uaf_walks: int
    wild: int
    nonpresent_roots: int
    zaps: int
    alloc_failures: int
    seconds: float
    flush_ipis_waited: int
    rcu_gps: int
    cpus: list[int] | None

def spte_torture(arena: PtArena, n_reads: int, *, read: Literal["lockless", "naive"] = ...,
                 n_sptes: int = ..., n_tables: int = ..., writer: bool = ...,
                 n_readers: int = ..., pin: bool = ...) -> SpteTortureResult: ...

def lockless_walk_torture(arena: PtArena, n_walks: int, *,
                          scheme: Literal["shadow", "tdp"] = ..., protect: bool = ...,
                          vcpu: int = ..., n_children: int = ..., reads_per_walk: int = ...,
                          spare_pages: int = ..., pin: bool = ...) -> WalkTortureResult: ...
