"""Stubs for kvmmmu._core.tdp_bench (see tdp_bench.pyx)."""
from typing import Final

import numpy as np
from numpy.typing import NDArray

TABLE_BYTES: Final[int]
LEVELS: Final[int]

class BareRadixMap:
    leaf_bits: int
    n_tables: int
    def __init__(self, *, leaf_bits: int = ...) -> None: ...
    @property
    def nbytes(self) -> int: ...
    def map(self, gfns: NDArray[np.uint64], pfns: NDArray[np.uint64], level: int) -> None: ...
    def shadow_fault(self, memory: NDArray[np.uint64], cr3: int, gvas: NDArray[np.uint64], *,
                     write: bool = ...) -> int: ...
    def walk(self, gfns: NDArray[np.uint64], *, out_spte: NDArray[np.uint64] | None = ...,
             out_level: NDArray[np.int8] | None = ...
             ) -> tuple[NDArray[np.uint64], NDArray[np.int8]]: ...
