"""The TDX-module model (kvmmmu/tdx_module.py): the S-EPT behind SEAMCALLs.

* the legal sequences of mirror-tdx.md succeed (tables top-down, AUG, BLOCK +
  TRACK + kick + REMOVE, SEPT.REMOVE bottom-up, INIT_MEM_REGION via PAGE.ADD,
  teardown with RECLAIM);
* each forbidden sequence is rejected with the module's error and changes
  nothing (snapshots compared);
* TDX_OPERAND_BUSY injected at any call (by index, by name, by seeded
  probability, by a contending vCPU, in host-priority mode) changes nothing;
* bad Python input raises TypeError/ValueError naming the argument, never a
  status, and logs nothing;
* a hypothesis machine drives random calls against a brute-force model
  written here (a dict of (level, gpa) -> entry) and checks that the module
  accepts exactly what the model accepts, with the same error.
"""
import pytest
from hypothesis import Phase, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

import kvmmmu.tdx_module as tm
from kvmmmu._core.defs import PG_LEVEL_2M, PG_LEVEL_4K
from kvmmmu.tdx_module import (
    TDX_OPERAND_ID_RCX, TDX_OPERAND_ID_SEPT, TDX_OPERAND_ID_TD_EPOCH,
    TDX_EPT_ENTRY_STATE_INCORRECT, TdxModule, status_name, tdx_operand_busy)

TDR, HKID, VCPU, VCPU2 = 0x100, 7, 0x101, 0x102
G = 0x12345000                      # a private GPA (4-level TD: GPAW 48)
K = 1 << 12


def base(gpa, lv):
    s = 12 + 9 * lv
    return gpa >> s << s


class Pfns:
    def __init__(self, start=0x10000):
        self.next = start

    def __call__(self):
        self.next += 1
        return self.next


def make_td(era="v6.18", vcpus=(VCPU,), finalize=False, ept_levels=4):
    m = TdxModule(era=era)
    r, td = m.tdh_mng_create(TDR, HKID, ept_levels=ept_levels)
    assert r.ok
    for v in vcpus:
        assert m.tdh_vp_create(td, v).ok
    if finalize:
        assert m.tdh_mr_finalize(td).ok
    return m, td


def lv_arg(m, tdx_level):
    return tdx_level if m.era == "v6.18" else tdx_level + PG_LEVEL_4K


def build_tables(m, td, gpa, pfns, down_to=1):
    for lv in range(3, down_to - 1, -1):
        r = m.tdh_mem_sept_add(td, base(gpa, lv), lv_arg(m, lv), pfns())
        assert r.ok, (lv, r)


def kick_all(m, td):
    """kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE)."""
    for v in m.vcpus_in_guest(td):
        m.td_exit(td, v)


def remove_private_page(m, td, gpa, pfn):
    """tdx_sept_remove_private_spte, v6.18 order: BLOCK, TRACK + kick,
    REMOVE, WBINVD."""
    assert m.tdh_mem_range_block(td, gpa, 0).ok
    assert m.tdh_mem_track(td).ok
    kick_all(m, td)
    r = m.tdh_mem_page_remove(td, gpa, 0)
    assert r.ok, r
    assert m.needs_wbinvd(pfn)
    assert m.tdh_phymem_page_wbinvd_hkid(HKID, pfn).ok
    assert not m.needs_wbinvd(pfn)


# ---------------------------------------------------------------------------
# legal sequences
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("era", TdxModule.ERAS)
def test_runtime_fault_aug_then_zap_with_block_track_remove(era):
    m, td = make_td(era, vcpus=(VCPU, VCPU2), finalize=True)
    pfns = Pfns()
    build_tables(m, td, G, pfns)
    page = pfns()
    assert m.tdh_mem_page_aug(td, G, lv_arg(m, 0), page).ok
    snap = m.sept_snapshot(td)
    assert snap[(0, G)] == ("PENDING", page, None)
    assert [snap[(lv, base(G, lv))][0] for lv in (3, 2, 1)] == ["NL_MAPPED"] * 3
    assert m.pamt_snapshot()[page] == (TDR, "PT_REG")
    # the guest runs, accepts, keeps running
    assert m.tdh_vp_enter(td, VCPU).ok and m.tdh_vp_enter(td, VCPU2).ok
    assert m.tdg_mem_page_accept(td, VCPU, G).ok
    assert m.sept_snapshot(td)[(0, G)][0] == "MAPPED"
    assert m.tdh_mem_range_block(td, G, lv_arg(m, 0)).ok
    assert m.tdh_mem_track(td).ok
    kick_all(m, td)
    r = m.tdh_mem_page_remove(td, G, lv_arg(m, 0))
    assert r.ok
    assert (0, G) not in m.sept_snapshot(td)
    assert page not in m.pamt_snapshot() and m.needs_wbinvd(page)
    assert m.tdh_phymem_page_wbinvd_hkid(HKID, page).ok
    # the page can be given to the TD again, at another GPA
    assert m.tdh_mem_page_aug(td, G + K, lv_arg(m, 0), page).ok
    assert m.audit() == []
    names = [c.name for c in m.calls]
    i = names.index("tdh_mem_range_block")
    assert names[i:i + 2] == ["tdh_mem_range_block", "tdh_mem_track"]
    assert names.index("tdh_mem_page_remove") > names.index("td_exit")


def test_init_mem_region_page_add_before_finalize_then_runtime():
    m, td = make_td()
    pfns = Pfns()
    build_tables(m, td, G, pfns)
    pages = [pfns() for _ in range(4)]
    for i, p in enumerate(pages):
        assert m.tdh_mem_page_add(td, G + i * K, p, 0x9000 + i).ok
        assert m.sept_snapshot(td)[(0, G + i * K)][0] == "MAPPED"
    # before FINALIZE nothing ran: removing needs neither BLOCK nor TRACK
    assert m.tdh_mem_page_remove(td, G + 3 * K, 0).ok
    assert m.tdh_mr_finalize(td).ok
    assert m.td_snapshot(td)["nr_added"] == 4 and m.td_snapshot(td)["finalized"]
    assert m.tdh_mem_page_aug(td, G + 8 * K, 0, pfns()).ok
    assert m.audit() == []


def test_2m_aug_takes_512_pages_and_remove_returns_them():
    m, td = make_td(finalize=True)
    pfns = Pfns()
    build_tables(m, td, 0x40000000, pfns, down_to=2)
    big = 0x200000 >> 12 << 9                # a 512-aligned pfn
    assert m.tdh_mem_page_aug(td, 0x40000000, 1, big).ok
    pamt = m.pamt_snapshot()
    assert all(pamt[p] == (TDR, "PT_REG") for p in range(big, big + 512))
    assert m.tdh_mem_range_block(td, 0x40000000, 1).ok and m.tdh_mem_track(td).ok
    assert m.tdh_mem_page_remove(td, 0x40000000, 1).ok
    assert not any(big <= p < big + 512 for p in m.pamt_snapshot())
    assert m.audit() == []


def test_sept_remove_bottom_up_after_the_leaves():
    m, td = make_td(finalize=True)
    pfns = Pfns()
    build_tables(m, td, G, pfns)
    page = pfns()
    assert m.tdh_mem_page_aug(td, G, 0, page).ok
    # the 4K table still has a child
    assert m.tdh_mem_range_block(td, base(G, 1), 1).ok
    assert m.tdh_mem_track(td).ok
    r = m.tdh_mem_sept_remove(td, base(G, 1), 1)
    assert r.name == "TDX_EPT_PAGE_NOT_FREE"
    # the blocked table also hides its leaf from the walk
    assert m.tdh_mem_page_remove(td, G, 0).name == "TDX_EPT_WALK_FAILED"
    m2, td2 = make_td(finalize=True)
    pfns = Pfns()
    build_tables(m2, td2, G, pfns)
    page = pfns()
    assert m2.tdh_mem_page_aug(td2, G, 0, page).ok
    remove_private_page(m2, td2, G, page)
    for lv in (1, 2, 3):
        assert m2.tdh_mem_range_block(td2, base(G, lv), lv).ok
        assert m2.tdh_mem_track(td2).ok
        assert m2.tdh_mem_sept_remove(td2, base(G, lv), lv).ok, lv
    assert m2.sept_snapshot(td2) == {}
    assert set(m2.pamt_snapshot()) == {TDR, VCPU}
    assert m2.audit() == []


def test_teardown_reclaims_sept_pages_bottom_up_then_the_tdr():
    m, td = make_td(finalize=True)
    pfns = Pfns()
    build_tables(m, td, G, pfns)
    tables = [m.sept_snapshot(td)[(lv, base(G, lv))][1] for lv in (1, 2, 3)]
    page = pfns()
    assert m.tdh_mem_page_aug(td, G, 0, page).ok
    assert m.tdh_vp_enter(td, VCPU).ok
    remove_private_page(m, td, G, page)
    # RECLAIM while the HKID is assigned is refused
    r = m.tdh_phymem_page_reclaim(tables[0])
    assert r.name == "TDX_LIFECYCLE_STATE_INCORRECT"
    assert m.tdh_mng_key_freeid(td).ok
    assert m.tdh_mem_page_aug(td, G + K, 0, pfns()).name == "TDX_LIFECYCLE_STATE_INCORRECT"
    assert m.tdh_phymem_page_reclaim(TDR).name == "TDX_TD_ASSOCIATED_PAGES_EXIST"
    for pfn in tables:                       # free_external_spt, lowest first
        r = m.tdh_phymem_page_reclaim(pfn)
        assert r.ok and r.tdx_pt == tm.PageType.PT_EPT and r.tdx_owner == TDR << 12
        assert m.audit() == []
    assert m.tdh_phymem_page_reclaim(VCPU).ok
    assert m.tdh_phymem_page_reclaim(TDR).ok
    assert m.pamt_snapshot() == {}
    assert m.tdh_phymem_page_reclaim(TDR).name == "TDX_PAGE_METADATA_INCORRECT"
    with pytest.raises(ValueError, match="td"):
        m.sept_snapshot(td)
    # the HKID can be used again
    assert m.tdh_mng_create(0x200, HKID)[0].ok


def test_teardown_may_reclaim_mapped_pages_and_tables_in_any_order():
    m, td = make_td(finalize=True)
    pfns = Pfns()
    build_tables(m, td, G, pfns)
    page = pfns()
    assert m.tdh_mem_page_aug(td, G, 0, page).ok
    assert m.tdh_mng_key_freeid(td).ok
    top = m.sept_snapshot(td)[(3, 0)][1]
    assert m.tdh_phymem_page_reclaim(top).ok
    assert m.sept_snapshot(td) == {}
    assert m.audit() == []
    rest = [p for p, (o, t) in m.pamt_snapshot().items() if t in ("PT_EPT", "PT_REG")]
    for p in rest:
        assert m.tdh_phymem_page_reclaim(p).ok
    assert m.tdh_phymem_page_reclaim(VCPU).ok and m.tdh_phymem_page_reclaim(TDR).ok


def test_gen_a_premapped_zap_sees_entry_state_incorrect_with_a_nonpresent_entry():
    """tdx_is_sept_zap_err_due_to_premap: BLOCK of a GFN whose tables exist
    but whose leaf was never PAGE.ADDed."""
    m, td = make_td()
    build_tables(m, td, G, Pfns())
    r = m.tdh_mem_range_block(td, G, 0)
    assert r.status == TDX_EPT_ENTRY_STATE_INCORRECT | TDX_OPERAND_ID_RCX
    assert r.level_state & 7 == 0 and (r.level_state >> 8) == tm.SeptState.FREE
    assert r.entry & 7 == 0                  # no RWX: not a present leaf


def test_two_tds_do_not_share_pages_or_hkids():
    m, td = make_td(finalize=True)
    r, td2 = m.tdh_mng_create(0x300, HKID)
    assert r.name == "TDX_OPERAND_INVALID" and td2 is None
    r, td2 = m.tdh_mng_create(0x300, HKID + 1)
    assert r.ok
    assert m.tdh_mng_create(0x300, HKID + 2)[0].name == "TDX_PAGE_METADATA_INCORRECT"
    pfns = Pfns()
    build_tables(m, td, G, pfns)
    assert m.tdh_mr_finalize(td2).ok
    build_tables(m, td2, G, Pfns(0x50000))
    page = pfns()
    assert m.tdh_mem_page_aug(td, G, 0, page).ok
    before = m.snapshot()
    r = m.tdh_mem_page_aug(td2, G, 0, page)
    assert r.name == "TDX_PAGE_METADATA_INCORRECT" and r.status & 0xFFFFFFFF == tm.TDX_OPERAND_ID_R8
    assert m.snapshot() == before
    assert m.audit() == []


# ---------------------------------------------------------------------------
# forbidden sequences: the module's error, no state change
# ---------------------------------------------------------------------------
def _leaf_ready(finalize=True, vcpus=(VCPU,)):
    m, td = make_td(vcpus=vcpus, finalize=finalize)
    pfns = Pfns()
    build_tables(m, td, G, pfns)
    return m, td, pfns


def _aug_mapped(**kw):
    m, td, pfns = _leaf_ready(**kw)
    page = pfns()
    assert m.tdh_mem_page_aug(td, G, 0, page).ok
    return m, td, pfns


def _blocked_running(**kw):
    m, td, pfns = _aug_mapped(**kw)
    assert m.tdh_vp_enter(td, VCPU).ok
    assert m.tdh_mem_range_block(td, G, 0).ok
    return m, td, pfns


def _blocked_tracked_not_kicked():
    m, td, pfns = _blocked_running()
    assert m.tdh_mem_track(td).ok
    return m, td, pfns


def _tables_only(lv):
    def setup():
        m, td = make_td(finalize=True)
        build_tables(m, td, G, Pfns(), down_to=lv)
        return m, td, Pfns(0x40000)
    return setup


def _table_with_child_blocked_tracked():
    m, td, pfns = _aug_mapped()
    assert m.tdh_mem_range_block(td, base(G, 1), 1).ok
    assert m.tdh_mem_track(td).ok
    return m, td, pfns


def _empty_td(finalize):
    def setup():
        m, td = make_td(finalize=finalize)
        return m, td, Pfns()
    return setup


def _torn_down():
    m, td, pfns = _aug_mapped()
    assert m.tdh_mng_key_freeid(td).ok
    return m, td, pfns


def _in_guest():
    m, td, pfns = _leaf_ready()
    assert m.tdh_vp_enter(td, VCPU).ok
    return m, td, pfns


def _tracked_once_vcpu_stays():
    m, td, pfns = _in_guest()
    assert m.tdh_mem_track(td).ok
    return m, td, pfns


FORBIDDEN = [
    # (id, setup, call, expected status name)
    ("leaf before its 4K table", _tables_only(2),
     lambda m, td, p: m.tdh_mem_page_aug(td, G, 0, p()), "TDX_EPT_WALK_FAILED"),
    ("table before its parent", _tables_only(3),
     lambda m, td, p: m.tdh_mem_sept_add(td, base(G, 1), 1, p()), "TDX_EPT_WALK_FAILED"),
    ("leaf into an empty TD", _empty_td(True),
     lambda m, td, p: m.tdh_mem_page_aug(td, G, 0, p()), "TDX_EPT_WALK_FAILED"),
    ("AUG over a present page", _aug_mapped,
     lambda m, td, p: m.tdh_mem_page_aug(td, G, 0, p()), "TDX_EPT_ENTRY_STATE_INCORRECT"),
    ("SEPT.ADD over a present table", _tables_only(1),
     lambda m, td, p: m.tdh_mem_sept_add(td, base(G, 1), 1, p()), "TDX_EPT_ENTRY_STATE_INCORRECT"),
    ("SEPT.ADD where a leaf is", _aug_mapped,
     lambda m, td, p: m.tdh_mem_sept_add(td, base(G, 1), 1, p()), "TDX_EPT_ENTRY_STATE_INCORRECT"),
    ("AUG with a page the TD already owns", _aug_mapped,
     lambda m, td, p: m.tdh_mem_page_aug(td, G + K, 0, m.sept_snapshot(td)[(0, G)][1]),
     "TDX_PAGE_METADATA_INCORRECT"),
    ("AUG with an S-EPT page", _leaf_ready,
     lambda m, td, p: m.tdh_mem_page_aug(td, G, 0, m.sept_snapshot(td)[(1, base(G, 1))][1]),
     "TDX_PAGE_METADATA_INCORRECT"),
    ("SEPT.ADD with the TDR page", _tables_only(2),
     lambda m, td, p: m.tdh_mem_sept_add(td, base(G, 1), 1, TDR), "TDX_PAGE_METADATA_INCORRECT"),
    ("AUG with a vCPU's TDVPR page", _leaf_ready,
     lambda m, td, p: m.tdh_mem_page_aug(td, G, 0, VCPU), "TDX_PAGE_METADATA_INCORRECT"),
    ("REMOVE without BLOCK", _aug_mapped,
     lambda m, td, p: m.tdh_mem_page_remove(td, G, 0), "TDX_GPA_RANGE_NOT_BLOCKED"),
    ("REMOVE after BLOCK without TRACK", _blocked_running,
     lambda m, td, p: m.tdh_mem_page_remove(td, G, 0), "TDX_TLB_TRACKING_NOT_DONE"),
    ("REMOVE after TRACK with a vCPU not kicked", _blocked_tracked_not_kicked,
     lambda m, td, p: m.tdh_mem_page_remove(td, G, 0), "TDX_TLB_TRACKING_NOT_DONE"),
    ("REMOVE of a FREE leaf", _leaf_ready,
     lambda m, td, p: m.tdh_mem_page_remove(td, G, 0), "TDX_EPT_ENTRY_STATE_INCORRECT"),
    ("REMOVE at the wrong level (a table there)", _aug_mapped,
     lambda m, td, p: m.tdh_mem_page_remove(td, base(G, 1), 1), "TDX_EPT_ENTRY_STATE_INCORRECT"),
    ("SEPT.REMOVE with a GPA not aligned to its level", _aug_mapped,
     lambda m, td, p: m.tdh_mem_sept_remove(td, base(G, 1), 2), "TDX_OPERAND_INVALID"),
    ("SEPT.REMOVE at the 4K level", _aug_mapped,
     lambda m, td, p: m.tdh_mem_sept_remove(td, G, 0), "TDX_OPERAND_INVALID"),
    ("SEPT.REMOVE of a table with children", _table_with_child_blocked_tracked,
     lambda m, td, p: m.tdh_mem_sept_remove(td, base(G, 1), 1), "TDX_EPT_PAGE_NOT_FREE"),
    ("SEPT.REMOVE without BLOCK", _tables_only(1),
     lambda m, td, p: m.tdh_mem_sept_remove(td, base(G, 1), 1), "TDX_GPA_RANGE_NOT_BLOCKED"),
    ("BLOCK twice", _blocked_running,
     lambda m, td, p: m.tdh_mem_range_block(td, G, 0), "TDX_GPA_RANGE_ALREADY_BLOCKED"),
    ("BLOCK of a FREE leaf", _leaf_ready,
     lambda m, td, p: m.tdh_mem_range_block(td, G, 0), "TDX_EPT_ENTRY_STATE_INCORRECT"),
    ("TRACK while a vCPU runs on the previous epoch", _tracked_once_vcpu_stays,
     lambda m, td, p: m.tdh_mem_track(td), "TDX_PREVIOUS_TLB_EPOCH_BUSY"),
    ("PAGE.ADD after FINALIZE", _leaf_ready,
     lambda m, td, p: m.tdh_mem_page_add(td, G, p(), 0x9000), "TDX_OP_STATE_INCORRECT"),
    ("AUG before FINALIZE", lambda: _leaf_ready(finalize=False),
     lambda m, td, p: m.tdh_mem_page_aug(td, G, 0, p()), "TDX_OP_STATE_INCORRECT"),
    ("FINALIZE twice", _empty_td(True),
     lambda m, td, p: m.tdh_mr_finalize(td), "TDX_OP_STATE_INCORRECT"),
    ("VP.ENTER before FINALIZE", _empty_td(False),
     lambda m, td, p: m.tdh_vp_enter(td, VCPU), "TDX_OP_STATE_INCORRECT"),
    ("VP.ENTER of a vCPU in guest mode", _in_guest,
     lambda m, td, p: m.tdh_vp_enter(td, VCPU), "TDX_VCPU_STATE_INCORRECT"),
    ("VP.CREATE after FINALIZE", _empty_td(True),
     lambda m, td, p: m.tdh_vp_create(td, p()), "TDX_OP_STATE_INCORRECT"),
    ("SEPT.ADD at the 4K level", _tables_only(1),
     lambda m, td, p: m.tdh_mem_sept_add(td, G, 0, p()), "TDX_OPERAND_INVALID"),
    ("SEPT.ADD above the root", _empty_td(True),
     lambda m, td, p: m.tdh_mem_sept_add(td, 0, 4, p()), "TDX_OPERAND_INVALID"),
    ("SEPT.ADD with a GPA not aligned to its level", _tables_only(2),
     lambda m, td, p: m.tdh_mem_sept_add(td, base(G, 1) + K, 1, p()), "TDX_OPERAND_INVALID"),
    ("AUG at 1G", _tables_only(3),
     lambda m, td, p: m.tdh_mem_page_aug(td, 0, 2, p()), "TDX_OPERAND_INVALID"),
    ("AUG at 2M of an unaligned pfn", _tables_only(2),
     lambda m, td, p: m.tdh_mem_page_aug(td, base(G, 1), 1, 0x40001), "TDX_OPERAND_INVALID"),
    ("AUG of a shared GPA", _leaf_ready,
     lambda m, td, p: m.tdh_mem_page_aug(td, G | 1 << 47, 0, p()), "TDX_OPERAND_INVALID"),
    ("AUG beyond the GPAW", _leaf_ready,
     lambda m, td, p: m.tdh_mem_page_aug(td, 1 << 48, 0, p()), "TDX_OPERAND_INVALID"),
    ("PAGE.ADD copying from a TD page", lambda: _leaf_ready(finalize=False),
     lambda m, td, p: m.tdh_mem_page_add(td, G, p(), TDR), "TDX_OPERAND_INVALID"),
    ("accept of a non-pending page", _in_guest,
     lambda m, td, p: m.tdg_mem_page_accept(td, VCPU, G), "TDX_EPT_ENTRY_STATE_INCORRECT"),
    ("UNBLOCK of an unblocked page", _aug_mapped,
     lambda m, td, p: m.tdh_mem_range_unblock(td, G, 0), "TDX_GPA_RANGE_NOT_BLOCKED"),
    ("UNBLOCK before the TLB tracking", _blocked_running,
     lambda m, td, p: m.tdh_mem_range_unblock(td, G, 0), "TDX_TLB_TRACKING_NOT_DONE"),
    ("KEY.FREEID with a vCPU in guest mode", _in_guest,
     lambda m, td, p: m.tdh_mng_key_freeid(td), "TDX_FLUSHVP_NOT_DONE"),
    ("SEPT.ADD after the HKID is freed", _torn_down,
     lambda m, td, p: m.tdh_mem_sept_add(td, base(G + (1 << 30), 2), 2, p()),
     "TDX_LIFECYCLE_STATE_INCORRECT"),
    ("REMOVE after the HKID is freed", _torn_down,
     lambda m, td, p: m.tdh_mem_page_remove(td, G, 0), "TDX_LIFECYCLE_STATE_INCORRECT"),
    ("RECLAIM of a page no TD owns", _empty_td(True),
     lambda m, td, p: m.tdh_phymem_page_reclaim(p()), "TDX_PAGE_METADATA_INCORRECT"),
    ("RECLAIM of a mapped page of a live TD", _aug_mapped,
     lambda m, td, p: m.tdh_phymem_page_reclaim(m.sept_snapshot(td)[(0, G)][1]),
     "TDX_LIFECYCLE_STATE_INCORRECT"),
]


@pytest.mark.parametrize("setup,call,want", [f[1:] for f in FORBIDDEN],
                         ids=[f[0] for f in FORBIDDEN])
def test_forbidden_sequence_is_rejected_and_changes_nothing(setup, call, want):
    m, td, pfns = setup()
    before = m.snapshot()
    n = len(m.calls)
    r = call(m, td, pfns)
    assert r.name == want, r
    assert not r.ok
    assert m.snapshot() == before
    assert m.audit() == []
    rec = m.calls[-1]
    assert len(m.calls) == n + 1 and rec.status == r.status and rec.status_name == want


def test_walk_failure_reports_where_the_walk_stopped():
    m, td = make_td(finalize=True)
    build_tables(m, td, G, Pfns(), down_to=3)
    r = m.tdh_mem_page_aug(td, G, 0, 0x7777)
    assert r.status == tm.TDX_EPT_WALK_FAILED | TDX_OPERAND_ID_RCX
    assert r.level_state & 7 == 2                # the free level-2 entry
    assert r.level_state >> 8 == tm.SeptState.FREE


def test_track_is_refused_until_the_blocking_epoch_is_drained():
    """A second TRACK while a vCPU still runs on the blocking epoch is
    refused, so REMOVE can never race a vCPU that may hold a stale
    translation; once it left, REMOVE is allowed even if it re-entered."""
    m, td, pfns = _blocked_tracked_not_kicked()
    assert m.tdh_mem_track(td).name == "TDX_PREVIOUS_TLB_EPOCH_BUSY"
    kick_all(m, td)
    assert m.tdh_vp_enter(td, VCPU).ok          # re-enters on the new epoch
    assert m.tdh_mem_page_remove(td, G, 0).ok   # old epoch has no vCPU
    assert m.audit() == []


# ---------------------------------------------------------------------------
# BUSY injection
# ---------------------------------------------------------------------------
def _scenario(m, td):
    """A legal life: tables, image, finalize, run, AUG, zap, teardown."""
    pfns = Pfns()
    for lv in (3, 2, 1):
        m.tdh_mem_sept_add(td, base(G, lv), lv, pfns())
    m.tdh_mem_page_add(td, G, pfns(), 0x9000)
    m.tdh_mr_finalize(td)
    m.tdh_vp_enter(td, VCPU)
    page = 0x30000
    m.tdh_mem_page_aug(td, G + K, 0, page)
    if m.vcpus_in_guest(td):
        m.tdg_mem_page_accept(td, VCPU, G + K)
    m.tdh_mem_range_block(td, G + K, 0)
    m.tdh_mem_track(td)
    kick_all(m, td)
    m.tdh_mem_page_remove(td, G + K, 0)
    m.tdh_phymem_page_wbinvd_hkid(HKID, page)
    m.tdh_mng_key_freeid(td)
    m.tdh_phymem_page_reclaim(VCPU)


def _clean_run():
    m, td = make_td()
    _scenario(m, td)
    return m


CLEAN = _clean_run()
SEAMCALLS = [c for c in CLEAN.calls if c.name.startswith("tdh_") and c.index >= 2]


def test_the_scenario_is_legal():
    assert all(c.status == 0 for c in CLEAN.calls), [c for c in CLEAN.calls if c.status]
    assert CLEAN.audit() == []
    assert {c.name for c in SEAMCALLS} >= {
        "tdh_mem_sept_add", "tdh_mem_page_add", "tdh_mr_finalize", "tdh_vp_enter",
        "tdh_mem_page_aug", "tdh_mem_range_block", "tdh_mem_track", "tdh_mem_page_remove",
        "tdh_phymem_page_wbinvd_hkid", "tdh_mng_key_freeid", "tdh_phymem_page_reclaim"}


class _Recorder(TdxModule):
    """Snapshots right before and right after the call with index `watch`."""
    watch = None
    before = after = None

    def _injected_busy(self, name, t):
        if len(self._log) == self.watch:
            self.before = self.snapshot()
        return super()._injected_busy(name, t)

    def _record(self, name, t, args, status):
        super()._record(name, t, args, status)
        if len(self._log) == self.watch + 1:
            self.after = self.snapshot()


@pytest.mark.parametrize("idx", [c.index for c in SEAMCALLS],
                         ids=[f"{c.index}-{c.name}" for c in SEAMCALLS])
def test_busy_injected_at_each_call_changes_nothing(idx):
    m = _Recorder()
    m.watch = idx
    r, td = m.tdh_mng_create(TDR, HKID)
    assert m.tdh_vp_create(td, VCPU).ok
    m.inject_busy(call_index=idx)
    _scenario(m, td)
    rec = m.calls[idx]
    assert rec.name == CLEAN.calls[idx].name
    assert tdx_operand_busy(rec.status) and rec.status_name == "TDX_OPERAND_BUSY"
    want = (TDX_OPERAND_ID_TD_EPOCH if rec.name == "tdh_mem_track"
            else TDX_OPERAND_ID_SEPT if rec.name in TdxModule.SEPT_LOCKED
            else tm.TDX_OPERAND_ID_RCX)
    assert rec.status & 0xFFFFFFFF == want
    assert m.before is not None and m.after == m.before
    assert m.audit() == []


def test_busy_on_vp_create():
    m = TdxModule()
    r, td = m.tdh_mng_create(TDR, HKID)
    m.inject_busy(name="tdh_vp_create")
    before = m.snapshot()
    assert m.tdh_vp_create(td, VCPU).busy
    assert m.snapshot() == before
    assert m.tdh_vp_create(td, VCPU).ok


def test_busy_on_create():
    m = TdxModule()
    m.inject_busy(name="tdh_mng_create")
    r, td = m.tdh_mng_create(TDR, HKID)
    assert r.busy and td is None and m.pamt_snapshot() == {}
    assert m.tdh_mng_create(TDR, HKID)[0].ok


def test_busy_by_name_counts_down_and_then_succeeds():
    m, td, pfns = _leaf_ready()
    m.inject_busy(name="tdh_mem_page_aug", times=2)
    page = pfns()
    before = m.snapshot()
    assert m.tdh_mem_page_aug(td, G, 0, page).busy
    assert m.tdh_mem_page_aug(td, G, 0, page).busy
    assert m.snapshot() == before
    assert m.tdh_mem_page_aug(td, G, 0, page).ok


def test_busy_by_probability_is_reproducible_per_seed():
    def run(seed):
        m, td = make_td()
        m.inject_busy(probability=0.5, seed=seed)
        _scenario(m, td)
        return [(c.name, c.status) for c in m.calls]
    a, b, c = run(1), run(1), run(2)
    assert a == b
    assert a != c
    assert any(tdx_operand_busy(s) for _, s in a)
    assert any(not tdx_operand_busy(s) for n, s in a if n.startswith("tdh_"))


def test_probability_restricted_to_names():
    m, td, pfns = _leaf_ready()
    m.inject_busy(probability=1.0, seed=0, names=["tdh_mem_track"])
    assert m.tdh_mem_track(td).busy
    assert m.tdh_mem_page_aug(td, G, 0, pfns()).ok
    m.clear_injections()
    assert m.tdh_mem_track(td).ok


def test_contending_vcpu_holds_the_sept_lock_until_kicked():
    """§8.2: KVM's one retry with every vCPU kicked out succeeds."""
    m, td, pfns = _aug_mapped()
    assert m.tdh_vp_enter(td, VCPU).ok
    m.contend(td, VCPU, lock="sept")
    before = m.snapshot()
    r = m.tdh_mem_range_block(td, G, 0)
    assert r.busy and r.status & 0xFFFFFFFF == TDX_OPERAND_ID_SEPT
    assert m.tdh_mem_range_block(td, G, 0).busy
    assert m.snapshot() == before
    kick_all(m, td)                               # tdx_no_vcpus_enter_start
    assert m.tdh_mem_range_block(td, G, 0).ok
    assert m.tdh_mem_track(td).ok                 # not the same lock


def test_contending_vcpu_on_the_epoch_lock_blocks_track_only():
    m, td, pfns = _leaf_ready()
    assert m.tdh_vp_enter(td, VCPU).ok
    m.contend(td, VCPU, lock="epoch")
    assert m.tdh_mem_page_aug(td, G, 0, pfns()).ok
    r = m.tdh_mem_track(td)
    assert r.busy and r.status & 0xFFFFFFFF == TDX_OPERAND_ID_TD_EPOCH
    m.td_exit(td, VCPU)
    assert m.tdh_mem_track(td).ok


def test_host_priority_makes_the_guest_yield_after_one_busy():
    m, td, pfns = _leaf_ready()
    assert m.tdh_vp_enter(td, VCPU).ok
    m.contend(td, VCPU, lock="sept", host_priority=True)
    page = pfns()
    assert m.tdh_mem_page_aug(td, G, 0, page).busy
    yielded = m.calls_named("tdg_host_priority_yield")
    assert len(yielded) == 1 and yielded[0].status_name == "TDX_OPERAND_BUSY_HOST_PRIORITY"
    assert m.tdh_mem_page_aug(td, G, 0, page).ok
    assert m.vcpus_in_guest(td) == (VCPU,)


def test_contend_needs_a_vcpu_in_guest_mode():
    m, td, pfns = _leaf_ready()
    with pytest.raises(ValueError, match="guest mode"):
        m.contend(td, VCPU)
    with pytest.raises(ValueError, match="lock"):
        m.contend(td, VCPU, lock="mmu")


# ---------------------------------------------------------------------------
# call log, eras, bad input
# ---------------------------------------------------------------------------
def test_every_call_is_logged_with_name_args_status():
    m, td, pfns = _leaf_ready()
    page = pfns()
    m.tdh_mem_page_aug(td, G, 0, page)
    m.tdh_mem_page_aug(td, G, 0, page)
    a, b = m.calls[-2:]
    assert (a.name, a.td, a.args, a.status) == ("tdh_mem_page_aug", TDR, (G, 0, page), 0)
    assert b.status_name == "TDX_EPT_ENTRY_STATE_INCORRECT" and b.index == a.index + 1
    assert [c.index for c in m.calls] == list(range(len(m.calls)))
    assert m.calls_named("tdh_mem_sept_add") == tuple(c for c in m.calls
                                                       if c.name == "tdh_mem_sept_add")


def test_gen_b_wrappers_take_pg_level():
    a, tda = make_td("v6.18", finalize=True)
    b, tdb = make_td("genB", finalize=True)
    for lv in (3, 2, 1):
        assert a.tdh_mem_sept_add(tda, base(G, lv), lv, 0x1000 + lv).ok
        assert b.tdh_mem_sept_add(tdb, base(G, lv), lv + PG_LEVEL_4K, 0x1000 + lv).ok
    assert b.tdh_mem_page_aug(tdb, G, PG_LEVEL_4K, 0x2000).ok
    assert a.tdh_mem_page_aug(tda, G, 0, 0x2000).ok
    assert a.sept_snapshot(tda) == b.sept_snapshot(tdb)
    assert [c.args for c in a.calls] == [c.args for c in b.calls]   # same ABI
    with pytest.raises(ValueError, match="level"):
        b.tdh_mem_range_block(tdb, G, 0)
    assert b.tdh_mem_range_block(tdb, base(G, 1), PG_LEVEL_2M).ok


def test_5_level_td_has_a_level_4_root_and_bit_51_shared():
    m, td = make_td(ept_levels=5, finalize=True)
    g = 1 << 48
    for lv in (4, 3, 2, 1):
        assert m.tdh_mem_sept_add(td, base(g, lv), lv, 0x1000 + lv).ok
    assert m.tdh_mem_page_aug(td, g, 0, 0x2000).ok
    assert m.tdh_mem_page_aug(td, g | 1 << 51, 0, 0x2001).name == "TDX_OPERAND_INVALID"


BAD = [
    ("gpa", "str", lambda m, td: m.tdh_mem_page_aug(td, "0x1000", 0, 1), TypeError),
    ("gpa", "float", lambda m, td: m.tdh_mem_sept_add(td, 4096.0, 1, 1), TypeError),
    ("gpa", "unaligned", lambda m, td: m.tdh_mem_range_block(td, G + 1, 0), ValueError),
    ("gpa", "negative", lambda m, td: m.tdh_mem_page_remove(td, -4096, 0), ValueError),
    ("gpa", "beyond 52 bits", lambda m, td: m.tdh_mem_page_aug(td, 1 << 52, 0, 1), ValueError),
    ("level", "5", lambda m, td: m.tdh_mem_sept_add(td, 0, 5, 1), ValueError),
    ("level", "-1", lambda m, td: m.tdh_mem_range_block(td, G, -1), ValueError),
    ("level", "float", lambda m, td: m.tdh_mem_page_remove(td, G, 0.0), TypeError),
    ("page", "None", lambda m, td: m.tdh_mem_page_aug(td, G, 0, None), TypeError),
    ("page", "huge", lambda m, td: m.tdh_mem_page_aug(td, G, 0, 1 << 40), ValueError),
    ("source", "str", lambda m, td: m.tdh_mem_page_add(td, G, 1, "src"), TypeError),
    ("hkid", "str", lambda m, td: m.tdh_phymem_page_wbinvd_hkid("7", 1), TypeError),
    ("td", "int", lambda m, td: m.tdh_mem_track(TDR), TypeError),
    ("td", "foreign", lambda m, td: m.tdh_mem_track(make_td()[1]), ValueError),
    ("vcpu", "unknown", lambda m, td: m.tdh_vp_enter(td, 0x999), ValueError),
    ("tdr_pfn", "str", lambda m, td: m.tdh_mng_create("x", 9), TypeError),
    ("hkid", "zero", lambda m, td: m.tdh_mng_create(0x500, 0), ValueError),
    ("ept_levels", "3", lambda m, td: m.tdh_mng_create(0x500, 9, ept_levels=3), ValueError),
]


@pytest.mark.parametrize("arg,why,call,exc", BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_bad_python_input_raises_naming_the_argument(arg, why, call, exc):
    m, td, pfns = _leaf_ready()
    before, n = m.snapshot(), len(m.calls)
    with pytest.raises(exc, match=arg):
        call(m, td)
    assert m.snapshot() == before and len(m.calls) == n     # not a status: nothing logged


def test_bad_injection_arguments():
    m = TdxModule()
    with pytest.raises(ValueError, match="name"):
        m.inject_busy(name="tdh_no_such_call")
    with pytest.raises(TypeError, match="name"):
        m.inject_busy(name=3)
    with pytest.raises(ValueError, match="probability"):
        m.inject_busy(probability=1.5)
    with pytest.raises(TypeError, match="probability"):
        m.inject_busy(probability="0.5")
    with pytest.raises(ValueError, match="era"):
        TdxModule(era="v7")
    with pytest.raises(ValueError, match="call_index"):
        m.inject_busy(call_index=-1)


def test_status_names_and_values_match_the_kernel_headers():
    # arch/x86/include/asm/shared/tdx_errno.h
    assert tm.TDX_OPERAND_BUSY == 0x8000020000000000
    assert tm.TDX_OPERAND_INVALID == 0xC000010000000000
    assert tm.TDX_EPT_WALK_FAILED == 0xC0000B0000000000
    assert tm.TDX_EPT_ENTRY_STATE_INCORRECT == 0xC0000B0D00000000
    assert tm.TDX_PAGE_METADATA_INCORRECT == 0xC000030000000000
    assert tm.TDX_PREVIOUS_TLB_EPOCH_BUSY == 0x8000020100000000
    assert (TDX_OPERAND_ID_RCX, tm.TDX_OPERAND_ID_TDR, TDX_OPERAND_ID_SEPT,
            TDX_OPERAND_ID_TD_EPOCH) == (0x01, 0x80, 0x92, 0xA9)
    assert status_name(tm.TDX_OPERAND_BUSY | TDX_OPERAND_ID_SEPT) == "TDX_OPERAND_BUSY"
    assert status_name(0x1234) == "0x1234"
    assert status_name(0xC0000F0000000000) == "0xc0000f0000000000"
    assert status_name(0) == "TDX_SUCCESS"
    assert len(set(tm.STATUS.values())) == len(tm.STATUS)


# ---------------------------------------------------------------------------
# the auditor can fail
# ---------------------------------------------------------------------------
def _corrupt(kind):
    m, td, pfns = _aug_mapped()
    t = m._tds[TDR]
    if kind == "orphan leaf":
        del t.sept[(1, base(G, 1))]
    elif kind == "child count":
        t.sept[(1, base(G, 1))].nchildren += 1
    elif kind == "pamt owner":
        m._pamt[t.sept[(0, G)].pfn] = (TDR, tm.PageType.PT_EPT)
    elif kind == "shared page":
        t.sept[(0, G + K)] = tm._Entry(tm.SeptState.MAPPED, t.sept[(0, G)].pfn)
        t.sept[(1, base(G, 1))].nchildren += 1
    elif kind == "epoch back":
        m.tdh_mem_track(td)
        t.epoch -= 1
    elif kind == "stale vcpu":
        m.tdh_vp_enter(td, VCPU)
        t.epoch += 2
        t.max_epoch_seen = t.epoch
    elif kind == "unreferenced page":
        m._pamt[0x77777] = (TDR, tm.PageType.PT_REG)
    elif kind == "block epoch":
        t.sept[(0, G)].bepoch = 5
    return m


@pytest.mark.parametrize("kind", ["orphan leaf", "child count", "pamt owner", "shared page",
                                  "epoch back", "stale vcpu", "unreferenced page",
                                  "block epoch"])
def test_audit_reports_corrupted_state(kind):
    assert _aug_mapped()[0].audit() == []
    assert _corrupt(kind).audit() != []


# ---------------------------------------------------------------------------
# hypothesis: the module accepts exactly what a brute-force model accepts
# ---------------------------------------------------------------------------
# A small universe: a 4-level TD, GPAs under one 1G entry, pages from a small
# pool (collisions wanted), one pfn owned by another TD, two vCPUs.
GPAS0 = [0, K, 0x200000, 0x200000 + K]            # 4K leaves
GPA_2M = 0x400000                                 # a 2M leaf
POOL = [0x1000 + i for i in range(6)] + [0x3000]  # 0x3000: owned by another TD
BIG = 0x4000                                      # 512-aligned
OTHER_TDR = 0x3000
TABLE_GPAS = {3: [0], 2: [0], 1: [0, 0x200000, 0x400000]}


class Oracle:
    """Brute force: a flat dict of entries, scanned for every question."""

    def __init__(self):
        self.e = {}                 # (lv, gpa) -> [state, pfn, bepoch]
        self.owner = {TDR: "TDR", VCPU: "VP", VCPU2: "VP", OTHER_TDR: "OTHER"}
        self.epoch = 1
        self.finalized = False
        self.vcpu = {VCPU: None, VCPU2: None}      # epoch if in guest
        self.torn = False

    def parents_ok(self, gpa, lv):
        for k in range(3, lv, -1):
            s = 12 + 9 * k
            e = self.e.get((k, gpa >> s << s))
            if e is None or e[0] != "NL_MAPPED":
                return False
        return True

    def pages(self, pfn, lv):
        return range(pfn, pfn + (512 ** lv))

    def tracked(self, be):
        if be + 1 < self.epoch:
            return True
        return be + 1 == self.epoch and all(v != be for v in self.vcpu.values())

    def children(self, lv, gpa):
        size = 1 << (12 + 9 * lv)
        return [k for k in self.e if k[0] == lv - 1 and gpa <= k[1] < gpa + size]

    # each returns the expected status name and applies the change on success
    def sept_add(self, lv, gpa, pfn):
        if self.torn:
            return "TDX_LIFECYCLE_STATE_INCORRECT"
        if not self.parents_ok(gpa, lv):
            return "TDX_EPT_WALK_FAILED"
        if (lv, gpa) in self.e:
            return "TDX_EPT_ENTRY_STATE_INCORRECT"
        if pfn in self.owner:
            return "TDX_PAGE_METADATA_INCORRECT"
        self.e[(lv, gpa)] = ["NL_MAPPED", pfn, None]
        self.owner[pfn] = "EPT"
        return "TDX_SUCCESS"

    def map(self, lv, gpa, pfn, state):
        if not self.parents_ok(gpa, lv):
            return "TDX_EPT_WALK_FAILED"
        if (lv, gpa) in self.e:
            return "TDX_EPT_ENTRY_STATE_INCORRECT"
        if any(p in self.owner for p in self.pages(pfn, lv)):
            return "TDX_PAGE_METADATA_INCORRECT"
        self.e[(lv, gpa)] = [state, pfn, None]
        for p in self.pages(pfn, lv):
            self.owner[p] = "REG"
        return "TDX_SUCCESS"

    def aug(self, lv, gpa, pfn):
        if self.torn:
            return "TDX_LIFECYCLE_STATE_INCORRECT"
        if not self.finalized:
            return "TDX_OP_STATE_INCORRECT"
        return self.map(lv, gpa, pfn, "PENDING")

    def add(self, gpa, pfn, src):
        if self.torn:
            return "TDX_LIFECYCLE_STATE_INCORRECT"
        if self.finalized:
            return "TDX_OP_STATE_INCORRECT"
        if src in self.owner or src == pfn:
            return "TDX_OPERAND_INVALID"
        return self.map(0, gpa, pfn, "MAPPED")

    def block(self, lv, gpa):
        if self.torn:
            return "TDX_LIFECYCLE_STATE_INCORRECT"
        if not self.parents_ok(gpa, lv):
            return "TDX_EPT_WALK_FAILED"
        e = self.e.get((lv, gpa))
        if e is None:
            return "TDX_EPT_ENTRY_STATE_INCORRECT"
        if "BLOCKED" in e[0]:
            return "TDX_GPA_RANGE_ALREADY_BLOCKED"
        e[0] = {"MAPPED": "BLOCKED", "PENDING": "PENDING_BLOCKED",
                "NL_MAPPED": "NL_BLOCKED"}[e[0]]
        e[2] = self.epoch
        return "TDX_SUCCESS"

    def track(self):
        if self.torn:
            return "TDX_LIFECYCLE_STATE_INCORRECT"
        if any(v is not None and v < self.epoch for v in self.vcpu.values()):
            return "TDX_PREVIOUS_TLB_EPOCH_BUSY"
        self.epoch += 1
        return "TDX_SUCCESS"

    def _removable(self, e):
        if not self.finalized:
            return None
        if "BLOCKED" not in e[0]:
            return "TDX_GPA_RANGE_NOT_BLOCKED"
        if not self.tracked(e[2]):
            return "TDX_TLB_TRACKING_NOT_DONE"
        return None

    def remove(self, lv, gpa):
        if self.torn:
            return "TDX_LIFECYCLE_STATE_INCORRECT"
        if not self.parents_ok(gpa, lv):
            return "TDX_EPT_WALK_FAILED"
        e = self.e.get((lv, gpa))
        if e is None or e[0].startswith("NL"):
            return "TDX_EPT_ENTRY_STATE_INCORRECT"
        why = self._removable(e)
        if why:
            return why
        del self.e[(lv, gpa)]
        for p in self.pages(e[1], lv):
            del self.owner[p]
        return "TDX_SUCCESS"

    def sept_remove(self, lv, gpa):
        if self.torn:
            return "TDX_LIFECYCLE_STATE_INCORRECT"
        if not self.parents_ok(gpa, lv):
            return "TDX_EPT_WALK_FAILED"
        e = self.e.get((lv, gpa))
        if e is None or not e[0].startswith("NL"):
            return "TDX_EPT_ENTRY_STATE_INCORRECT"
        why = self._removable(e)
        if why:
            return why
        if self.children(lv, gpa):
            return "TDX_EPT_PAGE_NOT_FREE"
        del self.e[(lv, gpa)]
        del self.owner[e[1]]
        return "TDX_SUCCESS"

    def freeid(self):
        if self.torn:
            return "TDX_LIFECYCLE_STATE_INCORRECT"
        if any(v is not None for v in self.vcpu.values()):
            return "TDX_FLUSHVP_NOT_DONE"
        self.torn = True
        return "TDX_SUCCESS"

    def reclaim(self, pfn):
        who = self.owner.get(pfn)
        if who is None:
            return "TDX_PAGE_METADATA_INCORRECT"
        if who == "OTHER" or not self.torn:
            return "TDX_LIFECYCLE_STATE_INCORRECT"
        if who == "TDR":
            return ("TDX_TD_ASSOCIATED_PAGES_EXIST" if len(self.owner) > 2
                    else "TDX_SUCCESS")
        for (lv, g), e in list(self.e.items()):
            if who == "EPT" and e[0].startswith("NL") and e[1] == pfn:
                size = 1 << (12 + 9 * lv)
                for k in [k for k in self.e if k[0] < lv and g <= k[1] < g + size]:
                    del self.e[k]
                del self.e[(lv, g)]
                break
            if who == "REG" and not e[0].startswith("NL") and pfn in self.pages(e[1], lv):
                del self.e[(lv, g)]
                break
        if who == "VP":
            del self.vcpu[pfn]
        del self.owner[pfn]
        return "TDX_SUCCESS"

    def accept(self, gpa):
        if not self.parents_ok(gpa, 0):
            return "TDX_EPT_WALK_FAILED"
        e = self.e.get((0, gpa))
        if e is None or e[0] != "PENDING":
            return "TDX_EPT_ENTRY_STATE_INCORRECT"
        e[0] = "MAPPED"
        return "TDX_SUCCESS"


LEAF_SITES = [(0, g) for g in GPAS0] + [(1, GPA_2M)]
TABLE_SITES = [(lv, g) for lv, gs in TABLE_GPAS.items() for g in gs]


class TdxModuleMachine(RuleBasedStateMachine):
    module_cls = TdxModule

    @initialize(busy_seed=st.integers(0, 3))
    def setup(self, busy_seed):
        self.m = self.module_cls()
        r, self.other = self.m.tdh_mng_create(OTHER_TDR, HKID + 1)
        assert r.ok
        r, self.td = self.m.tdh_mng_create(TDR, HKID)
        assert r.ok
        for v in (VCPU, VCPU2):
            assert self.m.tdh_vp_create(self.td, v).ok
        self.o = Oracle()
        self.next_pfn = 0x8000
        self.steps = 0
        # some runs also see random BUSY on any call
        if busy_seed:
            self.m.inject_busy(probability=0.15, seed=busy_seed)

    def check(self, want, r, before):
        if r.busy:
            assert self.m.snapshot() == before
            return False
        assert r.name == want, (want, r)
        if not r.ok:
            assert self.m.snapshot() == before
        return True

    def run(self, oracle_call, module_call):
        self.steps += 1
        before = self.m.snapshot()
        saved = (dict((k, list(v)) for k, v in self.o.e.items()), dict(self.o.owner),
                 self.o.epoch, self.o.finalized, dict(self.o.vcpu), self.o.torn)
        r = module_call()
        want = oracle_call()
        if r.busy:                    # the oracle must not move either
            (e, self.o.owner, self.o.epoch, self.o.finalized, self.o.vcpu,
             self.o.torn) = saved
            self.o.e = e
        self.check(want, r, before)
        return r

    def fresh(self):
        self.next_pfn += 1
        return self.next_pfn

    @rule(site=st.sampled_from(LEAF_SITES))
    def build_path(self, site):
        """The fault path: SEPT.ADD of every missing level, top-down."""
        lv, g = site
        for k in range(3, lv, -1):
            b = base(g, k)
            if (k, b) in self.o.e:
                continue
            pfn = self.fresh()
            r = self.run(lambda: self.o.sept_add(k, b, pfn),
                         lambda: self.m.tdh_mem_sept_add(self.td, b, k, pfn))
            if not r.ok:
                return

    @rule(site=st.sampled_from(LEAF_SITES), kick=st.booleans())
    def zap(self, site, kick):
        """remove_external_spte: BLOCK, TRACK, kick (or forget to), REMOVE."""
        lv, g = site
        self.block(site)
        self.track()
        if kick:
            for v in self.m.vcpus_in_guest(self.td):
                self.exit(v)
        self.remove(site)

    @rule(fresh=st.booleans(), site=st.sampled_from(LEAF_SITES))
    def aug_fresh(self, fresh, site):
        lv, g = site
        pfn = BIG if lv else self.fresh()
        self.run(lambda: self.o.aug(lv, g, pfn),
                 lambda: self.m.tdh_mem_page_aug(self.td, g, lv, pfn))

    @rule(g=st.sampled_from(GPAS0))
    def add_fresh(self, g):
        pfn = self.fresh()
        self.run(lambda: self.o.add(g, pfn, 0x9000),
                 lambda: self.m.tdh_mem_page_add(self.td, g, pfn, 0x9000))

    @precondition(lambda self: self.steps > 40)     # late: teardown ends the TD's life
    @rule(kick=st.booleans())
    def key_freeid(self, kick):
        if kick:
            for v in self.m.vcpus_in_guest(self.td):
                self.exit(v)
        self.run(self.o.freeid, lambda: self.m.tdh_mng_key_freeid(self.td))

    @rule(data=st.data())
    def reclaim(self, data):
        pages = sorted(p for p, w in self.o.owner.items() if w != "TDR") + [0x7777]
        pfn = data.draw(st.sampled_from(pages))
        self.run(lambda: self.o.reclaim(pfn),
                 lambda: self.m.tdh_phymem_page_reclaim(pfn))

    @rule(site=st.sampled_from(TABLE_SITES), pfn=st.sampled_from(POOL))
    def sept_add(self, site, pfn):
        lv, g = site
        self.run(lambda: self.o.sept_add(lv, g, pfn),
                 lambda: self.m.tdh_mem_sept_add(self.td, g, lv, pfn))

    @rule(site=st.sampled_from(LEAF_SITES), pfn=st.sampled_from(POOL + [BIG]))
    def aug(self, site, pfn):
        lv, g = site
        if lv == 1 and pfn != BIG:
            pfn = BIG
        self.run(lambda: self.o.aug(lv, g, pfn),
                 lambda: self.m.tdh_mem_page_aug(self.td, g, lv, pfn))

    @rule(g=st.sampled_from(GPAS0), pfn=st.sampled_from(POOL), src=st.sampled_from(POOL + [0x9000]))
    def add(self, g, pfn, src):
        self.run(lambda: self.o.add(g, pfn, src),
                 lambda: self.m.tdh_mem_page_add(self.td, g, pfn, src))

    @rule(site=st.sampled_from(LEAF_SITES + TABLE_SITES))
    def block(self, site):
        lv, g = site
        self.run(lambda: self.o.block(lv, g),
                 lambda: self.m.tdh_mem_range_block(self.td, g, lv))

    @rule()
    def track(self):
        self.run(self.o.track, lambda: self.m.tdh_mem_track(self.td))

    @rule(site=st.sampled_from(LEAF_SITES))
    def remove(self, site):
        lv, g = site
        self.run(lambda: self.o.remove(lv, g),
                 lambda: self.m.tdh_mem_page_remove(self.td, g, lv))

    @rule(site=st.sampled_from(TABLE_SITES))
    def sept_remove(self, site):
        lv, g = site
        self.run(lambda: self.o.sept_remove(lv, g),
                 lambda: self.m.tdh_mem_sept_remove(self.td, g, lv))

    @rule()
    def finalize(self):
        def o():
            if self.o.torn:
                return "TDX_LIFECYCLE_STATE_INCORRECT"
            if self.o.finalized:
                return "TDX_OP_STATE_INCORRECT"
            self.o.finalized = True
            return "TDX_SUCCESS"
        self.run(o, lambda: self.m.tdh_mr_finalize(self.td))

    @rule(v=st.sampled_from([VCPU, VCPU2]))
    def enter(self, v):
        if v not in self.o.vcpu:
            return

        def o():
            if self.o.torn:
                return "TDX_LIFECYCLE_STATE_INCORRECT"
            if not self.o.finalized:
                return "TDX_OP_STATE_INCORRECT"
            if self.o.vcpu[v] is not None:
                return "TDX_VCPU_STATE_INCORRECT"
            self.o.vcpu[v] = self.o.epoch
            return "TDX_SUCCESS"
        self.run(o, lambda: self.m.tdh_vp_enter(self.td, v))

    @rule(v=st.sampled_from([VCPU, VCPU2]))
    def exit(self, v):
        if v not in self.o.vcpu:
            return
        if self.o.vcpu[v] is None:
            with pytest.raises(ValueError):
                self.m.td_exit(self.td, v)
        else:
            self.m.td_exit(self.td, v)
            self.o.vcpu[v] = None

    @rule(v=st.sampled_from([VCPU, VCPU2]), g=st.sampled_from(GPAS0))
    def accept(self, v, g):
        if self.o.vcpu.get(v) is None:
            return
        self.run(lambda: self.o.accept(g),
                 lambda: self.m.tdg_mem_page_accept(self.td, v, g))

    @invariant()
    def same_sept(self):
        if not hasattr(self, "m"):
            return
        got = {k: (s, p, b) for k, (s, p, b) in self.m.sept_snapshot(self.td).items()}
        want = {k: tuple(v) for k, v in self.o.e.items()}
        assert got == want
        pamt = self.m.pamt_snapshot()
        mine = {p for p, (o, _) in pamt.items() if o == TDR}
        assert mine == {p for p, w in self.o.owner.items() if w != "OTHER"}
        assert self.m.td_snapshot(self.td)["epoch"] == self.o.epoch

    @invariant()
    def audit_clean(self):
        if hasattr(self, "m"):
            assert self.m.audit() == []


TdxModuleMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60,
                                              deadline=None)
test_tdx_module_machine = TdxModuleMachine.TestCase


class _NoTrackCheck(TdxModule):
    """A broken module that forgets the TLB-tracking rule."""

    def _tracked(self, t, bepoch):
        return True


class _NoChildCount(TdxModule):
    """A broken module that loses the non-leaf child counts."""

    def _free(self, t, level, gpa):
        del t.sept[(level, gpa)]


@pytest.mark.parametrize("broken", [_NoTrackCheck, _NoChildCount])
def test_the_machine_catches_a_broken_module(broken):
    class Broken(TdxModuleMachine):
        module_cls = broken
    with pytest.raises(AssertionError):
        run_state_machine_as_test(Broken, settings=settings(
            max_examples=300, stateful_step_count=60, deadline=None, database=None,
            derandomize=True, print_blob=False, phases=[Phase.generate]))


def test_calls_from_several_threads_are_serialized():
    import threading
    m, td, pfns = _leaf_ready()
    base_pfn = 0x70000
    errors = []

    def worker(w):
        try:
            for i in range(w * 128, (w + 1) * 128):
                r = m.tdh_mem_page_aug(td, base(G, 1) + (i << 12), 0, base_pfn + i)
                assert r.ok, r
        except Exception as e:          # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(1 for k in m.sept_snapshot(td) if k[0] == 0) == 512
    assert [c.index for c in m.calls] == list(range(len(m.calls)))
    assert m.audit() == []


def test_log_limit_keeps_the_last_calls_with_their_global_index():
    m = TdxModule(log_limit=3)
    r, td = m.tdh_mng_create(TDR, HKID)
    pfns = Pfns()
    build_tables(m, td, G, pfns)                  # 3 more calls: 4 in all
    assert [c.index for c in m.calls] == [1, 2, 3]
    assert [c.name for c in m.calls] == ["tdh_mem_sept_add"] * 3
    m.inject_busy(call_index=4)                   # indices count every call, logged or not
    assert m.tdh_mem_page_add(td, G, pfns(), pfns()).busy
    with pytest.raises(ValueError):
        TdxModule(log_limit=-1)
