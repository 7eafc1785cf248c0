"""kvmmmu.workloads: each workload at a small size against a hand count, the same
seed giving the same report, the dirty-log loop reporting exactly what was written,
a recorded stream replaying to the same timeline, and the input checks."""
import json

import numpy as np
import pytest

from kvmmmu import replay
from kvmmmu import workloads as W
from kvmmmu.vm import VM
from kvmmmu.host import HostConfig

MIB = 1 << 20
SMALL = dict(vcpu_mib=4)                    # 1024 pages per vCPU, two 2 MiB frames
N = 4 * MIB >> 12


def _det(summary):
    """The deterministic part of a summary (wall times dropped)."""
    return {k: v for k, v in summary.items() if not k.endswith("_s")}


def _exits(rep, prefix):
    return [ph["exits"] for ph in rep.phases if ph["name"].startswith(prefix) and "exits" in ph]


# ---------------------------------------------------------------------------
# first touch
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["sequential", "random", "strided"])
def test_first_touch_4k_faults_once_per_page(pattern):
    r = W.run("first_touch", mmu="tdp_mmu", vcpus=2, pattern=pattern, stride=7, **SMALL)
    s = r.summary
    assert s["pf_taken"] == s["pf_fixed"] == s["exits"] == 2 * N
    assert (s["pages_4k"], s["pages_2m"]) == (2 * N, 0)
    # root + PDPT + PD + one PT per 2 MiB of the 8 MiB
    assert s["mmu_pages"] == 3 + 4
    assert s["mem_spt"] == 7 * 4096 and s["mem_sp_headers"] == 7 * W.SIZEOF_KVM_MMU_PAGE
    assert s["rmap_descs"] == 0 and s["mem_rmap_desc"] == 0     # the TDP MMU keeps no rmaps


def test_first_touch_thp_faults_once_per_2m_frame():
    r = W.run("first_touch", mmu="tdp_mmu", backing="anonymous_thp", pattern="random", **SMALL)
    s = r.summary
    assert s["pf_taken"] == N // 512 == 2
    assert (s["pages_4k"], s["pages_2m"]) == (0, 2)


def test_first_touch_tdp_on_shadow_mmu_prefetches_aligned_blocks_of_8():
    # direct_pte_prefetch maps the other 7 present host pages of the fault's
    # aligned 8-entry block, so only one touch in 8 exits, in any order
    for pattern in ("sequential", "random"):
        s = W.run("first_touch", mmu="tdp", pattern=pattern, **SMALL).summary
        assert s["pf_taken"] == N // 8 and s["pages_4k"] == N


def test_first_touch_shadow_paging_one_fault_per_page_and_table_shadows():
    # the guest PTEs have no Accessed bit yet, so FNAME(pte_prefetch) skips them
    s = W.run("first_touch", mmu="shadow", **SMALL).summary
    assert s["pf_taken"] == s["pf_fixed"] == N and s["pages_4k"] == N
    # shadow pages: PML4, PDPT, PD and two PTs (4 MiB of 4 KiB guest pages)
    assert s["mmu_pages"] == 5
    assert s["mem_memslot_meta"] > 0                 # shadow paging allocates rmaps
    # shadowed_translation pages: indirect shadow pages up to the 1G level (not the PML4)
    assert s["mem_shadowed_info"] == 4 * 4096


# ---------------------------------------------------------------------------
# the dirty-log loop
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backing", ["anonymous", "anonymous_thp"])
def test_dirty_log_eager_split_one_fast_fault_per_page_per_iteration(backing):
    r = W.run("dirty_log", mmu="tdp_mmu", backing=backing, vcpus=2, iterations=3, **SMALL)
    s = r.summary
    n = 2 * N
    populate = n if backing == "anonymous" else n // 512
    assert _exits(r, "populate") == [populate]
    # logging on: eager split to 4K + write protection; every write is a fast fault
    assert _exits(r, "iteration") == [n, n, n]
    assert s["pf_fast"] == 3 * n and s["pf_taken"] == populate + 3 * n
    assert s["pf_fixed"] == s["pf_taken"]
    assert [ph["dirty_pages"] for ph in r.phases if "dirty_pages" in ph] == [n, n, n]
    assert s["check_dirty_log_exact"] and s["dirty_pages"] == 3 * n
    if backing == "anonymous_thp":
        # the split tables stay while logging; recovery frees them after an RCU grace period
        mem = [(t["mem"]["spt"], t["mem"]["rcu_pending"]) for t in r.timeline]
        assert mem[0] == (3 * 4096, 0) and mem[1] == (7 * 4096, 0)
        assert mem[-1] == (3 * 4096, 4 * (4096 + W.SIZEOF_KVM_MMU_PAGE))
    # logging off: kvm_mmu_recover_huge_pages puts the 2M leaves back in place
    assert (s["pages_4k"], s["pages_2m"]) == ((n, 0) if backing == "anonymous" else (0, n // 512))


def test_dirty_log_without_eager_split_splits_on_fault():
    r = W.run("dirty_log", mmu="tdp_mmu", backing="anonymous_thp", eager_page_split=False,
              iterations=2, **SMALL)
    # iteration 1: a write-protected 2M leaf cannot be fixed fast in a logged slot; the
    # first write in each frame takes the slow path, which splits the leaf in place
    # (tdp_mmu_split_huge_page: 512 write-protected 4K children) and maps its page; the
    # frame's other writes are then fast faults, as all of iteration 2's are
    assert _exits(r, "iteration") == [N, N]
    assert r.summary["pf_fast"] == 2 * N - N // 512
    assert r.summary["check_dirty_log_exact"]


def test_dirty_log_manual_protect_initially_set():
    r = W.run("dirty_log", mmu="tdp_mmu", manual_protect=True, initially_set=True,
              iterations=3, **SMALL)
    # INITIALLY_SET: nothing is protected until the first clear
    assert _exits(r, "iteration") == [0, N, N]
    dirty = [ph["dirty_pages"] for ph in r.phases if "dirty_pages" in ph]
    assert dirty == [N, N, N]                          # the first one is the initial set
    assert r.summary["check_dirty_log_exact"]
    assert any(ph["name"].endswith("clear dirty log") for ph in r.phases)


@pytest.mark.parametrize("mmu", W.MMUS)
def test_dirty_log_reports_exactly_the_written_pages(mmu):
    r = W.run("dirty_log", mmu=mmu, write_percent=37, random_access=True, slots=2,
              iterations=3, seed=5, **SMALL)
    written = [ph["pages_written"] for ph in r.phases if "pages_written" in ph]
    dirty = [ph["dirty_pages"] for ph in r.phases if "dirty_pages" in ph]
    assert dirty == written and 0 < written[0] < N
    assert all(ph["exact"] for ph in r.phases if "exact" in ph)
    assert r.summary["check_dirty_log_exact"]


def test_dirty_log_check_catches_a_wrong_bitmap(monkeypatch):
    # the record check is real: a get_dirty_log that loses a page fails the run
    real = VM.get_dirty_log

    def lossy(self, slot):
        bm = real(self, slot).copy()
        bm[0] &= ~np.uint64(1)
        return bm
    monkeypatch.setattr(VM, "get_dirty_log", lossy)
    with pytest.raises(W.WorkloadError, match="dirty_log_exact"):
        W.run("dirty_log", mmu="tdp_mmu", iterations=1, **SMALL)
    r = W.run("dirty_log", mmu="tdp_mmu", iterations=1, check=False, **SMALL)
    assert r.summary["check_dirty_log_exact"] is False


# ---------------------------------------------------------------------------
# access tracking, memslot churn, host invalidations, CR3 switches
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mmu", W.MMUS)
@pytest.mark.parametrize("ad_bits", [True, False])
def test_access_tracking_idle_pages_are_the_ones_not_reaccessed(mmu, ad_bits):
    r = W.run("access_tracking", mmu=mmu, ad_bits=ad_bits, reaccess_percent=40, seed=3,
              iterations=2, **SMALL)
    idle = [ph["idle_pages"] for ph in r.phases if "idle_pages" in ph]
    accessed = [ph["pages_accessed"] for ph in r.phases if "pages_accessed" in ph]
    assert [i + a for i, a in zip(idle, accessed)] == [N, N]
    access_exits = [ph["exits"] for ph in r.phases if ph["name"].endswith(": access")]
    if ad_bits or mmu == "shadow":
        # the CPU sets the Accessed bit: no exit (shadow paging's legacy SPTEs have A/D)
        assert access_exits == [0, 0]
    else:
        # aging access-tracked the SPTEs: each re-access is a fast fault
        assert access_exits == accessed
    assert r.summary["check_idle_count_exact"]


def test_access_tracking_thp_is_idle_by_folio():
    r = W.run("access_tracking", mmu="tdp_mmu", backing="anonymous_thp", reaccess_percent=0,
              iterations=1, **SMALL)
    assert r.summary["idle_pages"] == N
    r = W.run("access_tracking", mmu="tdp_mmu", backing="anonymous_thp", reaccess_percent=1,
              iterations=1, seed=1, **SMALL)
    # a few pages of each 2 MiB folio were touched: no folio is idle
    assert r.summary["idle_pages"] == 0


def test_memslot_churn_delete_zaps_everything():
    r = W.run("memslot_churn", mmu="tdp_mmu", mode="delete", slots=2, iterations=3, vcpu_mib=8)
    n = 8 * MIB >> 12
    # KVM_X86_QUIRK_SLOT_ZAP_ALL: each delete zaps all; the other slot refaults
    assert _exits(r, "iteration") == [n // 2] * 3
    assert r.summary["pf_taken"] == n + 3 * n // 2


def test_memslot_churn_dirty_log_toggle_splits_and_recovers():
    r = W.run("memslot_churn", mmu="tdp_mmu", mode="dirty_log", backing="anonymous_thp",
              slots=2, iterations=2, vcpu_mib=8)
    n = 8 * MIB >> 12
    # iteration 1: slot 0 logged (split, protected): its pages fast-fault; slot 1 is still
    # 2M; iteration 2: slot 0 back to huge (recovered), slot 1 logged
    assert _exits(r, "iteration") == [n // 2, n // 2]
    assert r.summary["pf_fast"] == n


@pytest.mark.parametrize("event,backing,per_chunk", [
    ("munmap", "anonymous", 512), ("numa_scan", "anonymous", 512),
    ("migrate", "anonymous", 512), ("numa_scan", "anonymous_thp", 1),
    ("migrate", "anonymous_thp", 1),
])
def test_host_invalidation_refaults_what_was_zapped(event, backing, per_chunk):
    r = W.run("host_invalidation", mmu="tdp_mmu", event=event, backing=backing, chunks=3,
              iterations=2, vcpu_mib=8)
    touch = [ph["exits"] for ph in r.phases if ph["name"].endswith(": touch")]
    assert touch == [3 * per_chunk] * 2
    assert r.phases[1]["pages_hit"] == 3 * 512


def test_host_invalidation_thp_split_once():
    r = W.run("host_invalidation", mmu="tdp_mmu", event="thp_split", backing="anonymous_thp",
              chunks=4, iterations=2, vcpu_mib=8)
    # iteration 1 splits every 2M page: the 2M SPTEs are zapped and each 4K page
    # refaults at 4K; iteration 2 finds nothing left to split: no invalidation
    touch = [ph["exits"] for ph in r.phases if ph["name"].endswith(": touch")]
    assert touch == [2048, 0]
    assert (r.summary["pages_4k"], r.summary["pages_2m"]) == (2048, 0)


def test_host_invalidation_refuses_bad_combinations():
    with pytest.raises(W.WorkloadParamError) as e:
        W.run("host_invalidation", event="thp_split", **SMALL)
    assert e.value.param == "event"
    with pytest.raises(W.WorkloadParamError) as e:
        W.run("host_invalidation", chunks=3, **SMALL)             # 2 chunks of 512 only
    assert e.value.param == "chunks"


def test_cr3_switch_shadow_pages_and_rmap_descriptors_by_hand():
    P, X, S_ = 8, 40, 30
    r = W.run("cr3_switch", mmu="shadow", processes=P, process_pages=X, shared_pages=S_,
              rounds=2, touch="all", write_fraction=1.0)
    s = r.summary
    # round 1: every page of every process faults once (a write: the walker sets A/D);
    # round 2: the roots are still in the hash, every SPTE present: no fault
    assert s["pf_taken"] == s["pf_fixed"] == P * (X + S_)
    # per process: PML4, PDPT, two PDs (4 MiB and 1 GiB), two PTs
    assert s["mmu_pages"] == 6 * P
    # a shared page has one SPTE per process: head + one pte_list_desc (P <= 14);
    # a private page's single SPTE lives in the rmap head itself
    assert s["rmap_descs"] == S_ and s["mem_rmap_desc"] == S_ * 128
    # rmap_add records the chain length it found before adding (pte_list_add's count)
    assert s["max_mmu_rmap_size"] == P - 1
    assert s["cr3_switches"] == 2 * P - 1


def test_cr3_switch_beyond_the_mmu_page_limit_recycles():
    r = W.run("cr3_switch", mmu="shadow", processes=40, rounds=2, touch="all",
              process_pages=8, shared_pages=8)
    # KVM_MIN_ALLOC_MMU_PAGES (64) for this small guest: 240 shadow pages cannot stay
    assert r.summary["mmu_recycled"] > 0 and r.summary["mmu_pages"] <= 64
    assert r.summary["pf_taken"] > 40 * 16


# ---------------------------------------------------------------------------
# determinism, streams, reports
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,mmu,kw", [
    ("working_set", "tdp_mmu", dict(accesses=4000)),
    ("working_set", "shadow", dict(accesses=2000)),
    ("first_touch", "tdp", dict(pattern="random")),
    ("cr3_switch", "shadow", dict(processes=5)),
])
def test_same_seed_same_report(name, mmu, kw):
    kw = {**(SMALL if name != "cr3_switch" else {}), **kw}
    a = W.run(name, mmu=mmu, seed=11, **kw)
    b = W.run(name, mmu=mmu, seed=11, **kw)
    assert _det(a.summary) == _det(b.summary)
    assert a.timeline == b.timeline
    c = W.run(name, mmu=mmu, seed=12, **kw)
    assert c.params == a.params


def test_working_set_faults_on_distinct_pages():
    r = W.run("working_set", mmu="tdp_mmu", accesses=3000, hot_fraction=0.05, seed=2, **SMALL)
    assert r.summary["pf_taken"] == r.summary["distinct_pages"] < N
    r = W.run("working_set", mmu="tdp_mmu", accesses=3000, backing="anonymous_thp", **SMALL)
    assert r.summary["pf_taken"] == 2


@pytest.mark.parametrize("name,mmu,kw", [
    ("dirty_log", "tdp_mmu", dict(manual_protect=True, slots=2, write_percent=60)),
    ("dirty_log", "shadow", dict(iterations=2)),
    ("dirty_log", "tdp", dict(backing="anonymous_thp", eager_page_split=False)),
    ("memslot_churn", "tdp", dict(mode="move", slots=2)),
    ("memslot_churn", "shadow", dict(mode="delete", slots=2)),
    ("cr3_switch", "shadow", dict(processes=6)),
    ("working_set", "shadow", dict(accesses=1500)),
])
def test_recorded_stream_replays_to_the_same_timeline(tmp_path, name, mmu, kw):
    kw = {**(SMALL if name != "cr3_switch" else {}), **kw}
    path = tmp_path / "run.jsonl"
    r = W.run(name, mmu=mmu, stream=path, **kw)
    res = replay.run_stream(path)
    assert [s["label"] for s in res.stats[:-1]] == [t["phase"] for t in r.timeline]
    for snap, tl in zip(res.stats, r.timeline):
        faults = {k: sum(v[k] for v in snap["vcpus"].values()) for k in W.FAULT_KINDS}
        assert faults == tl["faults"], tl["phase"]
    end = res.stats[-1]["vm"]
    for k in ("pages_4k", "pages_2m", "mmu_shadow_zapped", "max_mmu_rmap_size"):
        assert end[k] == r.summary[k], k
    res.vm.audit()


def test_host_event_workloads_refuse_to_record(tmp_path):
    with pytest.raises(W.WorkloadParamError) as e:
        W.run("access_tracking", stream=tmp_path / "x.jsonl", **SMALL)
    assert e.value.param == "stream"
    assert not (tmp_path / "x.jsonl").exists()


def test_report_json_and_text():
    r = W.run("dirty_log", mmu="tdp_mmu", iterations=1, **SMALL)
    d = json.loads(r.to_json())
    assert d["workload"] == "dirty_log" and d["params"]["iterations"] == 1
    assert [t["phase"] for t in d["timeline"]] == [
        "populate", "enable dirty logging", "iteration 1: get dirty log", "disable dirty logging"]
    assert set(d["timeline"][0]["mem"]) == set(W.MEM_KINDS)
    assert set(d["timeline"][0]["faults"]) == set(W.FAULT_KINDS)
    # faults are cumulative and never go down
    taken = [t["faults"]["pf_taken"] for t in d["timeline"]]
    assert taken == sorted(taken) and taken[0] == N
    # the dirty bitmap exists only while logging
    assert [t["mem"]["dirty_bitmap"] for t in d["timeline"]] == [0, N // 8, N // 8, 0]
    text = r.text()
    assert "populate" in text and "get dirty log" in text and "dirty_log_exact: ok" in text
    for k, v in d["summary"].items():
        assert isinstance(v, (int, float, str, bool)), k


def test_run_cell_and_registry():
    assert list(W.WORKLOADS) == ["first_touch", "working_set", "dirty_log", "access_tracking",
                                 "memslot_churn", "host_invalidation", "cr3_switch",
                                 "td_private"]
    for wl in W.WORKLOADS.values():
        assert wl.summary_line and set(wl.mmus) <= set(W.MMUS)
        for q in wl.params.values():
            assert q.check(q.default) == q.default
    s = W.run_cell({"workload": "first_touch", "mmu": "tdp", "seed": 1, "vcpu_mib": 2})
    assert s["pages_4k"] == 512
    with pytest.raises(W.WorkloadParamError):
        W.run_cell({"mmu": "tdp"})


@pytest.mark.parametrize("call,param", [
    (lambda: W.run("nope"), "workload"),
    (lambda: W.run("first_touch", mmu="ept"), "mmu"),
    (lambda: W.run("cr3_switch", mmu="tdp_mmu"), "mmu"),
    (lambda: W.run("first_touch", seed=-1), "seed"),
    (lambda: W.run("first_touch", bogus=1), "bogus"),
    (lambda: W.run("first_touch", vcpus=0), "vcpus"),
    (lambda: W.run("first_touch", vcpus=True), "vcpus"),
    (lambda: W.run("first_touch", vcpu_mib=1.5), "vcpu_mib"),
    (lambda: W.run("first_touch", backing="hugetlb"), "backing"),
    (lambda: W.run("working_set", hot_fraction=1.5), "hot_fraction"),
    (lambda: W.run("dirty_log", initially_set=True), "initially_set"),
    (lambda: W.run("dirty_log", slots=3, vcpu_mib=4), "slots"),
    (lambda: W.run("first_touch", vcpu_mib=1), "vcpu_mib"),
    (lambda: W.run("first_touch", write="yes"), "write"),
])
def test_bad_params_name_the_parameter(call, param):
    with pytest.raises(W.WorkloadParamError) as e:
        call()
    assert e.value.param == param and param in str(e.value)


def test_float_params_take_ints():
    r = W.run("working_set", mmu="tdp_mmu", hot_fraction=1, accesses=100, **SMALL)
    assert r.params["hot_fraction"] == 1.0 and type(r.params["hot_fraction"]) is float


def test_progress_is_called():
    seen = []
    W.run("dirty_log", mmu="tdp_mmu", vcpus=2, iterations=1, vcpu_mib=2,
          progress=lambda d, i, n: seen.append((d, i, n)))
    assert ("populate", 2, 2) in seen and ("iteration 1", 1, 2) in seen


def test_shadow_aging_access_tracks_ad_disabled_sptes():
    # kvm_rmap_age_gfn_range: an A/D-disabled SPTE (EPT without A/D bits) is
    # access-tracked, not stripped of its software Accessed bit
    vm = VM("tdp", host=HostConfig(tdp="ept", ad_bits=False))
    slot = vm.add_memory(0, 2 * MIB, populate=True)
    v = vm.vcpus[0]
    assert v.vcpu_enter_guest() is None
    cpu = W.GuestCpu(vm, batch=False)
    assert cpu.access(v, np.array([0x3000], np.uint64)) == 1
    vm.host.age(slot.userspace_addr + 0x3000, 4096, flush=False)
    _, spte, level = cpu._last_spte(v, 0x3000)
    assert vm.fmt.is_access_track_spte(spte)
    assert cpu.access(v, np.array([0x3000], np.uint64)) == 1       # the fast path restores it
    assert v.stat.as_dict()["pf_fast"] == 1
    vm.audit()


@pytest.mark.parametrize("name,kw", [
    ("first_touch", dict(pattern="random", backing="anonymous_thp")),
    ("first_touch", dict(host="npt")),
    ("dirty_log", dict(iterations=2, write_percent=70, random_access=True)),
    ("dirty_log", dict(backing="anonymous_thp", eager_page_split=False, manual_protect=True)),
    ("access_tracking", dict(ad_bits=False, reaccess_percent=50)),
    ("access_tracking", dict(reaccess_percent=50, access="write")),
    ("working_set", dict(accesses=3000)),
    ("memslot_churn", dict(mode="dirty_log", slots=2)),
    ("host_invalidation", dict(event="numa_scan", chunks=2)),
])
def test_tdp_mmu_batch_access_matches_the_scalar_cpu(name, kw):
    # TdpMmu.guest_access (one C loop) against GuestCpu's scalar walk-and-fault loop
    from kvmmmu.tdp_mmu import TdpMmu
    assert hasattr(TdpMmu, "guest_access")
    a = W.run(name, mmu="tdp_mmu", seed=4, batch=True, **SMALL, **kw)
    b = W.run(name, mmu="tdp_mmu", seed=4, batch=False, **SMALL, **kw)
    assert _det(a.summary) == _det(b.summary)
    assert a.timeline == b.timeline


@pytest.mark.parametrize("era", ["v6.18", "genB"])
def test_td_private_seamcalls_by_hand(era):
    V, pages, image, conv = 2, 512, 8, 25
    r = W.run("td_private", era=era, vcpus=V, vcpu_mib=2, image_pages=image, iterations=2,
              convert_percent=conv)
    s = r.summary
    n = V * pages
    picked = V * (pages * conv // 100)
    populate = n - image                        # the image is mapped by INIT_MEM_REGION
    assert _exits(r, "touch private") == [populate]
    assert _exits(r, "iteration") == [picked] * 4        # shared, private, shared, private
    assert s["pf_taken"] == s["pf_fixed"] == populate + 4 * picked
    assert s["seamcall_mem_page_add"] == image
    assert s["seamcall_mem_page_aug"] == populate + 2 * picked
    # every private leaf ever mapped is removed once: the conversions, then the teardown
    removed = 2 * picked + n
    for k in ("mem_range_block", "mem_page_remove", "phymem_page_wbinvd_hkid"):
        assert s["seamcall_" + k] == removed, k
    # S-EPT: a PDPT, a PD and two PTs for 4 MiB; reclaimed with two TDVPRs and the TDR
    assert s["seamcall_mem_sept_add"] == 4 and s["seamcall_phymem_page_reclaim"] == 4 + V + 1
    assert s["pages_4k"] == n and s["nr_premapped"] == 0   # before the teardown
    assert s["check_teardown_clean"]


def test_td_private_refuses_an_image_larger_than_the_memory():
    with pytest.raises(W.WorkloadParamError) as e:
        W.run("td_private", vcpu_mib=2, image_pages=600)
    assert e.value.param == "image_pages"
