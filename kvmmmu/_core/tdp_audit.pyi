"""Stubs for kvmmmu._core.tdp_audit (the C walk behind TdpMmu.audit)."""
from typing import Final

import numpy as np
import numpy.typing as npt

from kvmmmu._core.pt_arena import PtArena

#: kind -> name of the problems tdp_audit reports.
PROBLEM_KINDS: Final[dict[int, str]]
#: (kind int8, root int32, gfn uint64, level int8, value uint64)
PROBLEM_DTYPE: Final[np.dtype]

def tdp_audit(
    arena: PtArena,
    roots: npt.NDArray[np.uint64],
    slot_base: npt.NDArray[np.uint64],
    slot_npages: npt.NDArray[np.uint64],
    slot_max_level: npt.NDArray[np.int8],
    slot_as_id: npt.NDArray[np.int8],
    nx_list: npt.NDArray[np.uint64] | None = ...,
    *,
    max_problems: int = ...,
) -> tuple[dict, np.ndarray]: ...
