"""Test-wide settings.

Hypothesis profiles, chosen with ``HYPOTHESIS_PROFILE`` (default ``ci``):

``ci``
    No per-example deadline (CI machines are shared and noisy; speed is
    measured by the benchmarks, never by tests), and a fixed number of
    examples so a run's length is predictable.
``dev``
    Fewer examples, for a quick local loop.
``debug``
    Many examples and verbose output, to hunt a failure.
"""
import os

from hypothesis import HealthCheck, Verbosity, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=20)
settings.register_profile("debug", deadline=None, max_examples=2000, verbosity=Verbosity.verbose)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
