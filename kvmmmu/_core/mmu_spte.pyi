"""kvmmmu._core.mmu_spte: cdef-only (SPTE writers, split SPTEs); no Python API."""
