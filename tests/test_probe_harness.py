"""The probe harness itself: it must tell a crash, a hang and a raise apart,
or every hardening test built on it proves nothing."""
from _probe import assert_raises_in_child, run_probe


def test_a_segfault_is_reported_as_a_signal():
    r = run_probe("import ctypes; ctypes.cast(16, ctypes.POINTER(ctypes.c_long)).contents.value")
    assert r.signal in ("SIGSEGV", "ASAN-SEGV")       # ASan catches and reports it
    assert "Fatal Python error" in r.stderr or "AddressSanitizer" in r.stderr
    r = run_probe("import os, signal; os.kill(os.getpid(), signal.SIGABRT)")
    assert r.signal in ("SIGABRT", "ASAN")


def test_a_hang_is_reported_and_the_child_killed():
    r = run_probe("import time; time.sleep(60)", timeout=1.0)
    assert r.hung and r.returncode is None


def test_a_raise_is_reported_with_its_classes_and_message():
    r = run_probe("raise KeyError('gfn 5')")
    assert r.signal is None and r.returncode == 0
    assert r.raised == "KeyError" and "LookupError" in r.mro and "gfn 5" in r.msg
    assert_raises_in_child("import kvmmmu._core.defs; int('x')", ValueError, match="invalid literal")


def test_a_probe_that_returns_reports_no_exception():
    r = run_probe("import kvmmmu; x = 1")
    assert r.returncode == 0 and r.raised is None
