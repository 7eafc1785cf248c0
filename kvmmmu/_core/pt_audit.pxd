# The arena auditor (pt_audit.pyx); PtArena.audit() calls it.
from libc.stdint cimport uint64_t
from kvmmmu._core.pt_arena_defs cimport pt_arena_t

# Check every invariant of the arena `a` (whose owner holds `n_buffers` chunk
# buffers); raise PtArenaAuditError listing the violations, else return the
# recounted slot states as a dict.  Caller holds the writer side.
cdef object audit_arena(pt_arena_t *a, uint64_t n_buffers, bint contents)
