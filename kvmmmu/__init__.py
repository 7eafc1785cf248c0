"""kvmmmu: a faithful, fast model of the Linux KVM x86 MMU (v6.18).

See README.md for a tour and docs/ARCHITECTURE.md for what lives where.
"""
__version__ = "0.1.0"
