# Type stubs for kvmmmu._core.guest_walk (see guest_walk.pyx).
from typing import Any, Iterable

import numpy as np
import numpy.typing as npt

from kvmmmu._core.spte import RsvdBitsValidate

PTTYPE_32: int
PTTYPE_64: int
PTTYPE_EPT: int
PFERR_PRESENT_MASK: int
PFERR_WRITE_MASK: int
PFERR_USER_MASK: int
PFERR_RSVD_MASK: int
PFERR_FETCH_MASK: int
PFERR_PK_MASK: int
PFERR_SS_MASK: int
PFERR_SGX_MASK: int
PFERR_IMPLICIT_ACCESS: int
ACCESS_ALLOWED: int
INVALID_GPA: int
EPT_VIOLATION_ACC_READ: int
EPT_VIOLATION_ACC_WRITE: int
EPT_VIOLATION_ACC_INSTR: int
WALK_FAULT: int
WALK_NESTED_FAULT: int
WALK_DTYPE: np.dtype[np.void]

class GuestMemoryError(ValueError): ...
class GpaNotMappedError(LookupError): ...
class GpaReadOnlyError(PermissionError): ...

class GuestMemory:
    def __init__(self, buffer: Any = ..., *, holes: Iterable[tuple[int, int]] = ...) -> None: ...
    def add_slot(self, base_gpa: int, buffer: Any, *, readonly: bool = ...) -> None: ...
    @property
    def slots(self) -> list[tuple[int, int, bool]]: ...
    def is_mapped(self, gpa: int) -> bool: ...
    def read(self, gpa: int, size: int) -> bytes: ...
    def write(self, gpa: int, data: Any) -> None: ...
    def read_u64(self, gpa: int) -> int: ...
    def read_u32(self, gpa: int) -> int: ...
    def write_u64(self, gpa: int, value: int) -> None: ...
    def write_u32(self, gpa: int, value: int) -> None: ...

class PageFault:
    error_code: int
    address: int
    nested_page_fault: bool
    exit_qualification: int
    def __init__(self, error_code: int, address: int, nested_page_fault: bool = ...,
                 exit_qualification: int = ...) -> None: ...

class GuestWalker:
    gva: int
    access: int
    pttype: int
    level: int
    max_level: int
    table_gfn: tuple[int, ...]
    pte_gpa: tuple[int, ...]
    ptes: tuple[int, ...]
    pte_writable: tuple[bool, ...]
    pt_access: tuple[int, ...]
    pte_access: int
    gfn: int
    fault: PageFault | None
    retries: int
    ad_written: int
    @property
    def ok(self) -> bool: ...
    @property
    def gpa(self) -> int: ...
    @property
    def page_size(self) -> int: ...
    @property
    def access_str(self) -> str: ...

class WalkContext:
    memory: GuestMemory
    nested: WalkContext | None
    def __init__(self, memory: GuestMemory, pttype: int, root_level: int, pgd: int,
                 pdptrs: Iterable[int], have_ad: bool, efer_nx: bool, cr4_smep: bool,
                 cr4_pse: bool, rflags_ac: bool, is_walk_mmu: bool, pkru: int, pkru_mask: int,
                 permissions: Iterable[int], rsvd: RsvdBitsValidate,
                 nested: WalkContext | None = ...) -> None: ...
    def walk(self, addr: int, access: int) -> GuestWalker: ...
    def walk_fast(self, addr: object, access: object, addr_limit: int) -> GuestWalker | None: ...
    def walk_array(self, addrs: npt.NDArray[np.uint64],  # const uint64_t[::1]
                   access: int, out: npt.NDArray[np.void] | None = ...) -> npt.NDArray[np.void]: ...
