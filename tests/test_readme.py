"""The README's API tour runs as written (blocks run in order, sharing names).

A block that drives the live kernel (it imports kvmmmu.live) runs only where
/dev/kvm and a writable tracefs with the kvmmmu events are present.
"""
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
LIVE_OK = (os.access("/dev/kvm", os.R_OK | os.W_OK)
           and os.access("/sys/kernel/tracing/instances", os.W_OK)
           and os.path.isdir("/sys/kernel/tracing/events/kvmmmu"))


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


def test_readme_examples_run():
    ns = {}
    for i, block in enumerate(BLOCKS):
        if "kvmmmu.live" in block and not LIVE_OK:
            continue
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), ns)
        except Exception as exc:  # name the block in the failure
            pytest.fail(f"README python block {i} failed: {type(exc).__name__}: {exc}\n{block}")
