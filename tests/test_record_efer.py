"""The recorder's derivation of ``set_efer`` from a guest ``wrmsr`` (scenario
nxe_clear, tests/data/shadow_scenarios): EFER only, with ecx/eax/edx known from
emulated ``mov reg, imm64``; anything else is refused, not guessed."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvmmmu.live import record as R

DATA = Path(__file__).parent / "data" / "shadow_scenarios"
pytestmark = pytest.mark.skipif(not (DATA / "nxe_clear.trace").exists(),
                                reason="tests/data/shadow_scenarios/nxe_clear is not recorded")


def _stored():
    return R.load_stream(DATA / "nxe_clear.stream.jsonl"), R.load_trace(DATA / "nxe_clear.trace")


def test_the_wrmsr_to_efer_is_one_set_efer_with_nxe_clear():
    stream, _ = _stored()
    efer = [ev for ev in stream[1:] if ev["kind"] == "set_efer"]
    assert [ev["value"] for ev in efer] == [(1 << 8) | (1 << 10)]      # LME|LMA, NXE clear
    assert stream[0]["vcpus"][0]["efer"] & (1 << 11)                 # it was set before


def test_decode_knows_the_instructions_it_derives_from():
    assert R._decode(0, b"\x0f\x30").effect == ("wrmsr",)
    assert R._decode(0, b"\x48\xb9" + (0xC0000080).to_bytes(8, "little")).effect == \
        ("mov", "rcx", 0xC0000080)
    assert R._decode(0, b"\x48\xba" + (7).to_bytes(8, "little")).effect == ("mov", "rdx", 7)


def _edit(lines, old, new):
    out, n = [], 0
    for ev, text in lines:
        if ev == "kvm_emulate_insn" and old in text:
            text, n = text.replace(old, new), n + 1
        out.append((ev, text))
    assert n == 1
    return out


def test_a_wrmsr_to_another_msr_is_refused():
    stream, lines = _stored()
    bad = _edit(lines, "48 b9 80 00 00 c0", "48 b9 81 00 00 c0")      # ecx = 0xc0000081 (STAR)
    with pytest.raises(R.DeriveError, match="not EFER"):
        R.derive_stream(stream[0], bad)


def test_a_wrmsr_with_an_unknown_register_is_refused():
    stream, lines = _stored()
    bad = _edit(lines, "48 ba 00 00 00 00 00 00 00 00", "f4")         # no mov rdx, imm64
    with pytest.raises(R.DeriveError, match="ecx/eax/edx unknown"):
        R.derive_stream(stream[0], bad)
