"""Recording the kernel's kvmmmu tracepoints in a private tracefs instance.

:class:`TraceInstance` creates ``/sys/kernel/tracing/instances/<name>``,
turns ``hash-ptr`` off (so ``%p`` fields print raw values, as kvmmmu prints
them), enables the requested ``kvmmmu`` events for the duration of a
``with`` block, and on exit switches them off, clears the buffer and removes
the instance.  The top-level buffer and other instances are never touched.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kvmmmu import mmutrace

__all__ = ["TRACEFS", "TraceInstance", "tracefs_problem", "mount_tracefs"]

TRACEFS = mmutrace.TRACEFS


def tracefs_problem(tracefs: Path = TRACEFS) -> str | None:
    """Why kvmmmu events cannot be recorded here, or None if they can."""
    tracefs = Path(tracefs)
    if not (tracefs / "instances").is_dir():
        return f"tracefs is not mounted at {tracefs}"
    if not os.access(tracefs / "instances", os.W_OK):
        return f"{tracefs}/instances is not writable (need root)"
    if not (tracefs / "events" / mmutrace.TRACE_SYSTEM).is_dir():
        return "the kernel has no kvmmmu events (kvm module not loaded?)"
    return None


def mount_tracefs(tracefs: Path = TRACEFS) -> bool:
    """Try ``mount -t tracefs nodev <tracefs>`` if it is not mounted; True if
    tracefs is usable afterwards."""
    if (Path(tracefs) / "instances").is_dir():
        return True
    try:
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracefs)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return (Path(tracefs) / "instances").is_dir()


class TraceInstance:
    """A private tracefs instance that records kvmmmu events.

    Parameters
    ----------
    events : iterable of str, optional
        kvmmmu event names (default: all of them).
    name : str, optional
        Instance name (default ``kvmmmu_<pid>_<id>``).
    tracefs : path
    buffer_size_kb : int, optional
        Per-CPU buffer size of the instance.

    Use as a context manager: events are on inside the block.  After the
    block, :meth:`lines` still returns what was recorded (read on exit).
    """

    def __init__(self, events=None, *, name=None, tracefs=TRACEFS, buffer_size_kb=None):
        self.events = list(events) if events is not None else [ev.name for ev in mmutrace.EVENTS]
        for ev in self.events:
            mmutrace.get_event(ev)
        self.tracefs = Path(tracefs)
        self.name = name or f"kvmmmu_{os.getpid()}_{id(self):x}"
        self.path = self.tracefs / "instances" / self.name
        self.buffer_size_kb = buffer_size_kb
        self._lines = None
        self._fields = None

    def _write(self, rel, text):
        (self.path / rel).write_text(text)

    def _set_events(self, on):
        for ev in self.events:
            self._write(f"events/{mmutrace.TRACE_SYSTEM}/{ev}/enable", "1" if on else "0")

    def __enter__(self):
        problem = tracefs_problem(self.tracefs)
        if problem:
            raise OSError(problem)
        self.path.mkdir()
        try:
            self._write("options/hash-ptr", "0")
            if self.buffer_size_kb:
                self._write("buffer_size_kb", str(self.buffer_size_kb))
            self._set_events(True)
        except BaseException:
            self._remove()
            raise
        return self

    def read(self) -> list[tuple[str, str]]:
        """The recorded kvmmmu events so far as ``(event, text)`` pairs."""
        if not self.path.exists():
            return list(self._lines or [])
        return mmutrace.read_trace(self.path / "trace")

    def read_fields(self) -> list[tuple[str, str]]:
        """The same records printed with the ``fields`` option (raw values)."""
        if not self.path.exists():
            return list(self._fields or [])
        self._write("options/fields", "1")
        try:
            return mmutrace.read_trace(self.path / "trace")
        finally:
            self._write("options/fields", "0")

    def lines(self) -> list[str]:
        """``"<event>: <text>"`` lines, comparable with ``RingBuffer.lines()``."""
        return [f"{e}: {t}" for e, t in self.read()]

    def clear(self):
        """Empty the instance buffer."""
        self._write("trace", "")

    def _remove(self):
        try:
            self._set_events(False)
        finally:
            try:
                self._write("trace", "")
            finally:
                self.path.rmdir()

    def __exit__(self, *exc):
        try:
            self._set_events(False)
            self._lines = mmutrace.read_trace(self.path / "trace")
            self._write("options/fields", "1")
            self._fields = mmutrace.read_trace(self.path / "trace")
        finally:
            self._remove()
