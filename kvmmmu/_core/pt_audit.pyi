"""Stubs for kvmmmu._core.pt_audit (the arena auditor; PtArena.audit calls it)."""
from typing import Final

PAGE_STATES: Final[dict[int, str]]
SP_STATES: Final[dict[int, str]]

class PtArenaAuditError(AssertionError): ...
