"""`python -m kvmmmu demo`, the README's first command, runs and shows kernel values."""
import subprocess
import sys


def test_demo_runs():
    out = subprocess.run([sys.executable, "-m", "kvmmmu", "demo"], check=True,
                         capture_output=True, text=True).stdout
    # spte.md §10.1 with A/D disabled, v6.18: software A/D bits set.
    assert "gfn 10 spte 8610000123456b77 (rwxu) level 1 at 2000080" in out
    # spte.md §10.2 with NX huge pages.
    assert "spte 8000000040000ee7 (rw-u) level 2" in out
    # shadow-page.md §2.1: shadow-paging 64-bit root with CR0.WP=1, and the TDP root.
    assert "0x00003704  kvm_mmu_get_page: sp gen 0 gfn 1000 l4 8-byte q0 wux nxe ad root 1 sync new" in out
    assert "0x00003784  kvm_mmu_get_page: sp gen 0 gfn 0 l4 8-byte q0 direct wux nxe ad root 1 sync new" in out
    # The TDP MMU: 64 GiB / 2 MiB and 4 GiB / 4 KiB leaves; eager split turns
    # every 2 MiB leaf into 512; the dirty round reports exactly the writes.
    assert "pages_2m=32,768 pages_4k=1,048,576" in out
    assert f"pages_4k={(1 << 24) + (1 << 20):,}" in out
    assert "the dirty round reports 10,000 pages" in out


def test_cli_needs_a_command():
    res = subprocess.run([sys.executable, "-m", "kvmmmu"], capture_output=True, text=True)
    assert res.returncode == 2 and "demo" in res.stderr
