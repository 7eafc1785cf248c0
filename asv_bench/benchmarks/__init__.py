"""asv benchmarks for kvmmmu: one module per layer (see ../README.md)."""
