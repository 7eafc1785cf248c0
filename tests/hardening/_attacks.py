"""Generic probe campaign for one public module (tests/hardening/test_probe_*.py).

Each probe is a batch of calls run in one child (tests/_probe.py, through
_surface.batch_source): no signal, no hang, and only kvmmmu's own exceptions
or the allowed built-in families.  The attacks:

* ``half_built``  every method of ``Cls.__new__(Cls)`` (no ``__init__``), with
  no argument and with 0, for compiled classes (S.is_extension_type);
* ``wrong_types`` every public callable given None, a float, NaN, a negative,
  a huge int, a string, a read-only array — alone and as a pair;
* ``reinit``      ``__init__`` called again on a built object of a compiled
  class with bad arguments, then the object's ``audit()`` (if it has one) must still pass;
* ``threads``     four threads calling every no-argument method of the
  built objects at once (a concurrent-use error is allowed, a crash is not);
* ``cycles``      built objects put into reference cycles (through
  ``warn_sink`` where they have one), dropped, ``gc.collect()``, and the
  survivors audited.
Module files add their own probes (out= overlap, views flipped writable,
inputs mutated by another thread during a batch call, ...).
"""
import _surface as S
import pytest
from _probe import run_probe

BAD = ["None", "1.5", "float('nan')", "-1", "2**200", "'x'", "_ro(np.arange(4, dtype=np.uint64))"]


def _instances(modname, extension_only=False):
    """Names of the built objects (o_<Class>) the module's setup makes
    (only those of compiled classes, if asked: see S.is_extension_type)."""
    import importlib
    import re
    names = sorted(set(re.findall(r"\bo_([A-Za-z]+)\s*=", S.MODULES[modname][1])))
    if extension_only:
        mod = importlib.import_module(modname)
        names = [n for n in names if S.is_extension_type(getattr(mod, n, object))]
    return names


def generic(modname):
    tg = S.targets(modname)
    objs = _instances(modname)
    half = [t for t in tg if t.startswith("_half(")]
    probes = {
        "half_built": [f"{t}()" for t in half] + [f"{t}(0)" for t in half],
        "wrong_types": [f"{t}({b})" for t in tg for b in BAD]
                       + [f"{t}({b}, {b})" for t in tg for b in BAD[:4]],
        "reinit": [c for o in _instances(modname, True) for c in (f"_obj({o!r}).__init__(None)",
                                             f"_obj({o!r}).__init__(-1, 2**200)",
                                             f"getattr(_obj({o!r}), 'audit', lambda: None)()")],
        "threads": [f"_threads(_obj({o!r}))" for o in objs],
        "cycles": [f"_cycle({o!r})" for o in objs] + ["gc.collect()"]
                  + [f"getattr(globals().get('o_' + {o!r}), 'audit', lambda: None)()" for o in objs],
    }
    return probes


HELPERS = r'''
import threading, inspect
_ZERO_ARG_SKIP = {"close", "clear", "reset", "kvm_mmu_zap_all", "destroy"}
def _zero_arg_methods(o):
    out = []
    for n in dir(type(o)):
        if n.startswith("_") or n in _ZERO_ARG_SKIP:
            continue
        try:
            f = getattr(o, n)
        except Exception:
            continue
        if not callable(f) or inspect.isclass(f):
            continue
        try:
            sig = inspect.signature(f)
            if any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                   for p in sig.parameters.values()):
                continue
        except (TypeError, ValueError):
            continue
        out.append(f)
    return out
def _threads(o):
    fs = _zero_arg_methods(o)
    def run():
        for _ in range(20):
            for f in fs:
                try:
                    f()
                except BaseException as e:
                    t = type(e)
                    if not (t.__module__.startswith("kvmmmu") or isinstance(e, _ALLOWED)):
                        _bad.append((repr(f), t.__qualname__, str(e)[:200]))
    ts = [threading.Thread(target=run) for _ in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
def _cycle(name):
    o = globals().get("o_" + name)
    if o is None:
        return
    box = [o]
    box.append(box)
    if hasattr(o, "warn_sink"):
        from kvmmmu.warn import WarnSink
        sink = WarnSink()
        try:
            sink.cycle = box          # o -> sink -> box -> o
            o.warn_sink = sink
        except (TypeError, ValueError, AttributeError):
            pass
    del box, o
'''


def make_test(modname, specific=None, xfail=None):
    """A parametrized test running the generic attacks and `specific`
    ({name: [call lines] or (setup-extra source, [call lines])}) for `modname`.
    `xfail`: {probe name: "owner <helper>: <what>"} (strict)."""
    probes = generic(modname)
    probes.update(specific or {})
    xfail = xfail or {}
    params = [pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=xfail[n])] if n in xfail else [],
                           id=n) for n in probes]

    @pytest.mark.parametrize("probe", params)
    def test_probe(probe):
        calls = probes[probe]
        src = S.batch_source(modname, calls)
        src = src.replace("_bad = []", "_bad = []\n" + HELPERS, 1)
        r = run_probe(src, timeout=150)
        died = r.hung or r.signal is not None or (r.returncode != 0 and r.raised is None)
        assert not died, f"crash/hang; reproducer: {S.last_call(r.stderr)}\n" + r.describe()[-3000:]
        assert r.raised is None, r.describe()[:3000]

    return test_probe
