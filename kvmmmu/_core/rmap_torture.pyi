"""Stubs for kvmmmu._core.rmap_torture (see rmap_torture.pyx)."""
from typing import Literal, TypedDict

from kvmmmu._core.rmap import ParentPtes, PteListDescCache, PteListDescPool, RmapHead

class ReaderResult(TypedDict):
    walks: int
    bad_walks: int
    contended: int
    in_window: int
    unlock_errors: int

def debug_store_head(head: RmapHead, value: int) -> None: ...
def debug_poke_desc(head: RmapHead, k: int,
                    field: Literal["spte_count", "tail_count", "sptes"],
                    value: int, index: int = ...) -> int: ...

class LockStress:
    @property
    def head(self) -> ParentPtes: ...
    def __init__(self, pool: PteListDescPool, n_entries: int = ..., base: int = ...) -> None: ...
    def run_writer(self, cache: PteListDescCache, iters: int, k: int = ...,
                   wait_spins: int = ..., naive_reader: bool = ..., seed: int = ...) -> int: ...
    def run_reader(self, locked: bool) -> ReaderResult: ...

def concurrent_writer(cache: PteListDescCache, head: RmapHead, base: int, n: int,
                      rounds: int) -> int: ...
