"""One sink for the kernel's WARN and KVM_BUG reports (include/linux/kvm_host.h).

Every layer of a VM reports here: the notifier and memslot code, the MMUs,
the page-table arena's WARN sites and the rmap pool's data-corruption checks.
The semantics are the kernel's:

* ``warn(site, msg)`` is ``WARN_ON``/``WARN_ON_ONCE``: recorded, and the
  caller goes on.  A site marked ``once`` is recorded the first time only
  (``counts`` still counts every hit).
* ``bug(site, msg)`` is ``KVM_BUG_ON``: recorded, and the VM is marked
  bugged (``kvm->vm_bugged``, which also makes it dead).  From then on
  ``check()`` raises :class:`KvmBugError` (``-EIO``), which every VM ioctl
  and vCPU run calls first.

This module is below the VM: it imports nothing of kvmmmu, so any layer may
use it.  Thread-safe: reports from several threads are serialized.
"""
from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

__all__ = ["KvmBugError", "WarnRecord", "WarnSink"]


class KvmBugError(OSError):
    """An ioctl on a bugged (dead) VM: the kernel returns -EIO."""

    def __init__(self, msg):
        super().__init__(errno.EIO, msg)


@dataclass(frozen=True)
class WarnRecord:
    """One report: ``kind`` is ``"WARN"`` or ``"KVM_BUG"``; ``site`` names the
    kernel function (or the WARN site) that reported it."""
    kind: str
    site: str
    msg: str

    def __str__(self):
        return f"{self.kind}: {self.site}: {self.msg}" if self.site else f"{self.kind}: {self.msg}"


class WarnSink:
    """The WARN / KVM_BUG record of one VM (see the module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.records: list[WarnRecord] = []
        self.counts: dict[str, int] = {}
        self.bugged = False

    def warn(self, site: str, msg: str, once: bool = False) -> None:
        """WARN_ON (``once``: WARN_ON_ONCE): record and go on."""
        with self._lock:
            n = self.counts.get(site, 0)
            self.counts[site] = n + 1
            if not (once and n):
                self.records.append(WarnRecord("WARN", site, msg))

    def bug(self, site: str, msg: str) -> None:
        """KVM_BUG_ON: record and mark the VM bugged."""
        with self._lock:
            self.counts[site] = self.counts.get(site, 0) + 1
            self.records.append(WarnRecord("KVM_BUG", site, msg))
            self.bugged = True

    def check(self) -> None:
        """Raise KvmBugError if the VM is bugged (the kernel's -EIO)."""
        if self.bugged:
            raise KvmBugError("the VM is bugged: " + "; ".join(
                str(r) for r in self.records if r.kind == "KVM_BUG"))

    @property
    def warnings(self) -> list[str]:
        """The WARN messages, oldest first."""
        return [r.msg for r in self.records if r.kind == "WARN"]

    @property
    def bugs(self) -> list[str]:
        """The KVM_BUG messages, oldest first."""
        return [r.msg for r in self.records if r.kind == "KVM_BUG"]

    def __len__(self):
        return len(self.records)

    def __repr__(self):
        return f"<WarnSink {len(self.warnings)} WARN, {len(self.bugs)} KVM_BUG{', bugged' if self.bugged else ''}>"
