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
    # the dirty_log workload: 4 x 1 GiB of THP = 2048 2M faults, then 2 passes of
    # 2^20 fast faults each; every bitmap exact
    assert "faults 2,099,200 (fast 2,097,152), bitmaps exact: True" in out


def test_cli_needs_a_command():
    res = subprocess.run([sys.executable, "-m", "kvmmmu"], capture_output=True, text=True)
    assert res.returncode == 2 and "demo" in res.stderr


def test_tdx_demo_shows_the_two_code_generations():
    """``python -m kvmmmu demo --tdx``: v6.18 premaps (a mirror leaf counted
    before its PAGE.ADD), Gen B adds inside the fault; both then AUG a
    private fault, remove a converted page with BLOCK, TRACK, REMOVE, WBINVD,
    and tear down with KEY.FREEID before every RECLAIM."""
    import io
    from kvmmmu.demo import run_tdx
    out = io.StringIO()
    steps = run_tdx(out)
    text = out.getvalue()
    assert "v6.18" in text and "genB" in text
    a, b = steps["v6.18"], steps["genB"]
    assert a[0][1] == ["mem_sept_add"] * 3 and a[0][2] == 1          # premapped, no ADD yet
    assert a[1][1] == ["mem_page_add"] and a[1][2] == 0
    assert b[0][1] == ["mem_sept_add"] * 3 + ["mem_page_add"] and b[0][2] == 0
    for log in (a, b):
        steps_by_name = dict((n, c) for n, c, _ in log)
        assert steps_by_name["FINALIZE"] == ["mr_finalize"]
        assert steps_by_name["private fault"][-1] == "mem_page_aug"
        assert steps_by_name["convert to shared"] == [
            "mem_range_block", "mem_track", "mem_page_remove", "phymem_page_wbinvd_hkid"]
        down = steps_by_name["teardown"]
        free = down.index("mng_key_freeid")
        assert "phymem_page_reclaim" not in down[:free]
        assert set(down[free + 1:]) == {"phymem_page_reclaim"}
        # two image pages + ... the private fault's page was converted: 2 leaves left
        assert down[:free].count("mem_page_remove") == 2
