"""kvmmmu._core.pt_pool: cdef-only (page and header pools of the arena); no Python API."""
