"""kvmmmu._core.mmu_lockless: cdef-only (remote TLB flush, the model's RCU); no Python API."""
