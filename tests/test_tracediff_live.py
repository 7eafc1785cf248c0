"""kvmmmu.tracediff on traces this machine's KVM records (kvmmmu.live).

The small 64-bit guests of test_mmutrace_live run twice with the kvmmmu
events on in a private tracefs instance (``hash-ptr`` left on, as a plain
recording has it).  Every kvmmmu line the kernel prints must parse in its
event's format; two runs of the same guests must agree once host values are
masked (their host pages and SPTE addresses may differ); a changed line is
found at its index.  Needs root, /dev/kvm and tracefs; skipped otherwise.
"""
import pytest

from kvmmmu import live
from kvmmmu import tracediff as T

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(live.problem() is not None,
                       reason=f"needs /dev/kvm and a writable tracefs with kvmmmu events: {live.problem()}"),
]


def _record():
    from test_mmutrace_live import GUESTS, run_guest
    with live.TraceInstance() as inst:
        for code, ptes in GUESTS:
            run_guest(code, ptes)
    return inst.lines()


def test_two_recordings_of_the_same_guests_agree_and_a_change_is_found():
    a, b = _record(), _record()
    if not a:
        pytest.skip("the guests produced no kvmmmu events on this host")
    norm = T.normalize_trace(a, events="all", source="kernel")
    assert len(norm) == len(a)                     # every line parsed in its format
    assert T.diff_traces(a, b, events="all") is None
    assert T.diff_traces(a, b) is None
    # the first shadow page's gfn changed: found at its index, field gfn
    i = next(j for j, t in enumerate(norm) if t.event == "kvm_mmu_get_page")
    c = list(b)
    g = norm[i].fields["gfn"]
    c[i] = c[i].replace(f"gfn {g} ", f"gfn {int(g, 16) + 1:x} ", 1)
    d = T.diff_traces(a, c, events="all")
    assert (d.index, d.field) == (i, "gfn") and d.kernel.lineno == i + 1
    # a line dropped from the middle: the divergence is where it was
    j = len(a) // 2
    d = T.diff_traces(a, a[:j] + a[j + 1:], events="all")
    assert d is not None and d.index >= j      # (a[j] may equal a[j + 1])
    assert d.before == [t.line for t in norm][max(0, d.index - 3):d.index]
