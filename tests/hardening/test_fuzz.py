"""A hypothesis fuzzer over kvmmmu's public surface.

For each public module it enumerates the public callables (functions,
constructors, static/class methods, methods of well-formed and of half-built
instances; tests/hardening/_surface.py) and draws batches of calls with
random, mostly invalid arguments (wrong types, floats, NaN, negatives, huge
ints, read-only / strided / empty / wrongly typed arrays, other kvmmmu
objects).  Each batch runs in its own interpreter (tests/_probe.py): a fatal
signal or a hang fails the test with the batch and the call that was running;
an exception that is neither kvmmmu's own nor a TypeError / ValueError /
OverflowError / KeyError / IndexError / OSError fails it with the calls that
raised it.  Derandomized, so a failure (and each strict xfail) reproduces.
"""
import _surface as S
import pytest
from _probe import run_probe
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

EXAMPLES = 3          # batches per module
CALLS = (25, 40)      # calls per batch

# Modules whose fuzzing fails on today's main: {module: "owner <who>: <finding>"}
# (strict xfails; none today).
XFAIL = {}


def _call_line(target, args, out):
    a = ", ".join(args)
    if out is not None:
        a += (", " if a else "") + f"out={out}"
    return f"{target}({a})"


def _calls(modname):
    tg = S.targets(modname)
    val = st.sampled_from(S.VALUES)
    one = st.builds(_call_line, st.sampled_from(tg), st.lists(val, max_size=4),
                    st.one_of(st.none(), st.none(), val))
    return st.lists(one, min_size=CALLS[0], max_size=CALLS[1])


def _params():
    for m in S.MODULES:
        marks = []
        if m in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[m]))
        yield pytest.param(m, marks=marks, id=m)


@pytest.mark.parametrize("modname", list(_params()))
def test_fuzz_public_surface(modname):
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              phases=(Phase.generate,), suppress_health_check=list(HealthCheck))
    @given(calls=_calls(modname))
    def run(calls):
        r = run_probe(S.batch_source(modname, calls), timeout=120)
        died = r.hung or r.signal is not None or (r.returncode != 0 and r.raised is None)
        assert not died, (f"crash/hang in {modname}; reproducer (after the setup and "
                          f"the calls before it): {S.last_call(r.stderr)}\n" + r.describe())
        assert r.raised is None, r.describe()

    run()


def test_fuzz_harness_catches_crashes_and_stray_exceptions():
    """The batch runner fails on what it must fail on (planted calls)."""
    r = run_probe(S.batch_source("kvmmmu._core.defs", ["int('x')", "[].pop()"]))
    assert r.raised is None, r.describe()          # ValueError, IndexError: allowed
    r = run_probe(S.batch_source("kvmmmu._core.defs", ["object().nope"]))
    assert r.raised == "AssertionError" and "AttributeError" in r.msg, r.describe()
    r = run_probe(S.batch_source("kvmmmu._core.defs", ["0", "__import__('ctypes').string_at(0)"]))
    # SIGSEGV; under AddressSanitizer its handler reports and exits with status 1
    assert r.signal == "SIGSEGV" or (r.returncode != 0 and r.raised is None), r.describe()
    assert S.last_call(r.stderr) == "__import__('ctypes').string_at(0)"
    r = run_probe(S.batch_source("kvmmmu._core.defs", ["__import__('time').sleep(30)"], per_call=1))
    assert r.returncode != 0 and "Timeout" in r.stderr, r.describe()
