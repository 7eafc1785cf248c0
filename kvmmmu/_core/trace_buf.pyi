from typing import Any, Callable, Optional

import numpy as np

TRACE_BUF_CAP: int
TRACE_NR_VALS: int
NR_TP: int
TP_IDS: dict[str, int]
ENABLED: np.ndarray

Sink = Callable[[int, tuple[int, ...]], object]

def set_enabled(event: int, on: bool) -> None: ...
def set_sink(sink: Optional[Sink]) -> Optional[Sink]: ...
def dropped() -> int: ...
def push_records(event: int, values: list[int] | tuple[int, ...], repeat: int = 1) -> int: ...

PFERR_FLAGS: tuple[tuple[int, str], ...]
def print_flags(value: int, delim: str = ..., flags: Any = ...) -> str: ...
