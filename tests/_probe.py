"""Hostile probes, each in a fresh interpreter: a crash is a test failure,
not a dead test run.

A probe is a snippet of Python source.  :func:`run_probe` runs it in a child
process (with ``-X faulthandler``, so a fatal signal prints the Python stack)
that imports the same kvmmmu as the parent, and reports how it ended:

* killed by a signal (SIGSEGV, SIGABRT, ...), or stopped by an
  AddressSanitizer report: ``result.signal`` is set;
* did not end within ``timeout`` seconds: ``result.hung`` is true (the child
  is killed);
* ended: ``result.raised`` is the name of the exception the snippet raised
  (``None`` if it returned), ``result.mro`` the names of its classes and
  ``result.msg`` its message.

:func:`assert_no_crash` and :func:`assert_raises_in_child` turn those into
assertions.  The environment passes through, so the same probes run under
AddressSanitizer when the parent was started with the runtime preloaded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import kvmmmu

PROBE_TIMEOUT = 120.0
_MARK = "@@PROBE "

_CHILD = r"""
import json, sys
def _report(**kw):
    sys.stdout.write(%(mark)r + json.dumps(kw) + "\n")
    sys.stdout.flush()
_src = sys.stdin.read()
try:
    exec(compile(_src, "<probe>", "exec"), {"__name__": "__probe__"})
except BaseException as e:
    _report(raised=type(e).__name__, mro=[c.__name__ for c in type(e).__mro__], msg=str(e))
else:
    _report(raised=None, mro=[], msg="")
"""


@dataclass
class ProbeResult:
    code: str
    returncode: int | None
    stdout: str
    stderr: str
    hung: bool = False
    raised: str | None = None
    mro: list = field(default_factory=list)
    msg: str = ""

    @property
    def signal(self):
        """The signal that killed the child, or None.  Under AddressSanitizer
        a fatal signal is caught and reported instead (the child exits with
        status 1): that counts as ``"ASAN-SEGV"`` (or ``"ASAN"`` for another
        report)."""
        if self.returncode is not None and self.returncode < 0:
            return signal.Signals(-self.returncode).name
        if self.returncode and "AddressSanitizer" in self.stderr:
            return "ASAN-SEGV" if "SEGV" in self.stderr else "ASAN"
        return None

    def describe(self):
        if self.hung:
            how = "hung (killed after the timeout)"
        elif self.signal:
            how = f"killed by {self.signal}"
        elif self.returncode:
            how = f"exited with status {self.returncode}"
        else:
            how = f"raised {self.raised}: {self.msg}" if self.raised else "returned"
        tail = "\n".join(self.stderr.splitlines()[-30:])
        return f"probe {how}\n--- probe ---\n{self.code}\n--- stderr (tail) ---\n{tail}"


def _child_env(extra):
    env = dict(os.environ)
    # The child imports the kvmmmu the parent imported (a work tree or an
    # installed copy), whatever its current directory.
    root = os.path.dirname(os.path.dirname(os.path.abspath(kvmmmu.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONFAULTHANDLER", "1")
    if extra:
        env.update(extra)
    return env


def run_probe(code: str, timeout: float = PROBE_TIMEOUT, env: dict | None = None) -> ProbeResult:
    """Run the snippet `code` in a fresh interpreter and say how it ended."""
    code = textwrap.dedent(code)
    cmd = [sys.executable, "-X", "faulthandler", "-c", _CHILD % {"mark": _MARK}]
    try:
        p = subprocess.run(cmd, input=code, capture_output=True, text=True,
                           timeout=timeout, env=_child_env(env))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return ProbeResult(code, None, out, err, hung=True)
    res = ProbeResult(code, p.returncode, p.stdout, p.stderr)
    for line in p.stdout.splitlines():
        if line.startswith(_MARK):
            rep = json.loads(line[len(_MARK):])
            res.raised, res.mro, res.msg = rep["raised"], rep["mro"], rep["msg"]
    return res


def assert_no_crash(code: str, timeout: float = PROBE_TIMEOUT, env: dict | None = None,
                    allow_raise: bool = True) -> ProbeResult:
    """Run `code`; fail if the child was killed by a signal, hung, or exited
    abnormally (and, with ``allow_raise=False``, if the snippet raised)."""
    r = run_probe(code, timeout, env)
    assert not r.hung and r.signal is None and r.returncode == 0, r.describe()
    if not allow_raise:
        assert r.raised is None, r.describe()
    return r


def assert_raises_in_child(code: str, exc: str | type, match: str | None = None,
                           timeout: float = PROBE_TIMEOUT, env: dict | None = None) -> ProbeResult:
    """Run `code`; it must end by raising `exc` (a class or its name; a
    subclass counts) whose message contains `match`, without crashing."""
    name = exc if isinstance(exc, str) else exc.__name__
    r = assert_no_crash(code, timeout, env)
    assert r.raised is not None and name in r.mro, f"expected {name}; " + r.describe()
    if match is not None:
        assert match in r.msg, f"expected {match!r} in the message; " + r.describe()
    return r
