"""kvmmmu.tracediff: normalising kernel and model kvmmmu traces and finding
the first divergence.

The kernel lines here are written by hand in tracefs's text layout (task,
pid, CPU, flags, timestamp, then the event's print format); the masking
must drop exactly the host-dependent values (host addresses, the pfn bits
of present SPTEs, host pfns, MMIO generations) and keep everything the MMU
decided (gfns, levels, roles, permission and flag bits).
"""
import json

import pytest

from kvmmmu import mmutrace as tp
from kvmmmu import tracediff as T
from kvmmmu._core.spte import SpteFormat

PFX = "  qemu-system-x86-4242    [003] d..1.  1234.567890: "

# A shadow-paging fault as the kernel prints it (hash-ptr on: %p hashed).
KERNEL = [
    "# tracer: nop",
    "#",
    PFX + "kvm_mmu_pagetable_walk: addr 10000 pferr 10 F",
    PFX + "kvm_mmu_paging_element: pte 2007 level 4",
    PFX + "kvm_mmu_paging_element: pte 10003 level 1",
    PFX + "kvm_mmu_set_accessed_bit: gpa 4080",
    PFX + "kvm_exit: reason EPT_VIOLATION rip 0x10000 info 0 0",
    PFX + "kvm_mmu_get_page: sp gen 0 gfn 1 l4 8-byte q0 wux nxe ad root 0 sync new",
    PFX + "kvm_mmu_spte_requested: gfn 10 pfn 1a2b3c level 1",
    PFX + "kvm_mmu_get_page: sp gen 0 gfn 2 l3 8-byte q0 wux nxe ad root 0 sync new",
    PFX + "kvm_mmu_set_spte: gfn 10 spte 800000001a2b3a25 (r-x-) level 1 at 12f4c6080",
    PFX + "fast_page_fault: vcpu 0 gva 10000 error_code P|W sptep 00000000c0ffee11 "
          "old 0x1a2b3a25 new 1a2b3a27 spurious 0 fixed 1",
]
# The model's lines for the same events: other pfns, other SPTE addresses.
MODEL = [
    "kvm_mmu_pagetable_walk: addr 10000 pferr 10 F",
    "kvm_mmu_paging_element: pte 2007 level 4",
    "kvm_mmu_paging_element: pte 10003 level 1",
    "kvm_mmu_set_accessed_bit: gpa 4080",
    "kvm_mmu_get_page: sp gen 0 gfn 1 l4 8-byte q0 wux nxe ad root 0 sync new",
    "kvm_mmu_spte_requested: gfn 10 pfn 777 level 1",
    "kvm_mmu_get_page: sp gen 0 gfn 2 l3 8-byte q0 wux nxe ad root 0 sync new",
    "kvm_mmu_set_spte: gfn 10 spte 8000000000777a25 (r-x-) level 1 at 300000024080",
    "fast_page_fault: vcpu 0 gva 10000 error_code P|W sptep 0000300000024080 "
    "old 0x777a25 new 777a27 spurious 0 fixed 1",
]


def test_equal_traces_give_none():
    assert T.diff_traces(KERNEL, MODEL) is None
    assert T.diff_traces(KERNEL, MODEL, events="all") is None
    assert T.diff_traces(MODEL, MODEL) is None
    assert T.diff_traces([], []) is None


def test_masking_keeps_what_the_mmu_decided():
    k = T.normalize_trace(KERNEL, events="all", source="kernel")
    m = T.normalize_trace(MODEL, events="all")
    assert [t.line for t in k] == [t.line for t in m]
    by = {t.event: t for t in k}
    s = by["kvm_mmu_set_spte"]
    # the pfn bits (51:12) go; NX (63), the flag bits (11:0) and the letters stay
    assert s.text == "gfn 10 spte ~8000000000000a25 (r-x-) level 1 at *080"
    assert s.fields == {"gfn": "10", "spte": "~8000000000000a25", "r": "r", "w": "-", "x": "x",
                        "u": "-", "level": "1", "sptep": "*080"}
    assert s.raw.endswith("at 12f4c6080") and s.lineno == 11
    assert by["kvm_mmu_spte_requested"].text == "gfn 10 pfn * level 1"
    assert by["fast_page_fault"].text == ("vcpu 0 gva 10000 error_code P|W sptep * old 0x~a25 "
                                          "new ~a27 spurious 0 fixed 1")
    # shadow pages, walker events: nothing masked
    for ev in ("kvm_mmu_get_page", "kvm_mmu_pagetable_walk", "kvm_mmu_paging_element",
               "kvm_mmu_set_accessed_bit"):
        assert by[ev].text == by[ev].raw
    # the comment lines and the non-kvmmmu kvm_exit are not part of it
    assert len(k) == len(KERNEL) - 3


@pytest.mark.parametrize("i,old,new,field", [
    (10, "spte 800000001a2b3a25", "spte 800000001a2b3a27", "spte"),       # W bit: a real change
    (10, "spte 800000001a2b3a25", "spte 000000001a2b3a25", "spte"),       # NX bit
    (10, "level 1", "level 2", "level"),
    (10, "(r-x-)", "(rwx-)", "w"),
    (10, "at 12f4c6080", "at 12f4c6088", "sptep"),                        # another index
    (7, "sync new", "sync existing", "created"),
    (7, "gfn 1 l4", "gfn 1 l3", "level"),
    (7, "q0 wux", "q0 direct wux", "direct"),
    (7, " nxe", " !nxe", "nxe"),
    (7, "root 0", "root 1", "root_count"),
    (8, "gfn 10", "gfn 11", "gfn"),
    (3, "pte 2007", "pte 2027", "pte"),
    (2, "pferr 10 F", "pferr 12 W|F", "pferr"),
])
def test_the_first_divergence_is_found_at_its_index_and_field(i, old, new, field):
    kernel = list(KERNEL)
    assert old in kernel[i]
    kernel[i] = kernel[i].replace(old, new)
    d = T.diff_traces(kernel, MODEL, events="all")
    assert d is not None and d.field == field
    # the index counts the selected lines: 2 comments and kvm_exit are not counted
    want = i - 2 - (i > 6)
    assert d.index == want
    assert d.kernel.lineno == i + 1 and d.model.lineno == want + 1
    assert d.before == [t.line for t in T.normalize_trace(MODEL, events="all")][max(0, want - 3):want]
    assert d.kernel_value != d.model_value
    text = str(d)
    assert f"event {want}" in text and repr(field) in text and f"kernel line {i + 1}" in text


def test_a_huge_leaf_keeps_the_pfn_bits_below_its_size():
    """A 2M leaf's pfn is 2M aligned on every host: a model that maps the
    faulting 4K page's pfn instead (not aligned) must show."""
    k = ["kvm_mmu_set_spte: gfn 400 spte 130800ee7 (rwxu) level 2 at 1420d4010"]
    ok = ["kvm_mmu_set_spte: gfn 400 spte 200ee7 (rwxu) level 2 at 300000025010"]
    bad = ["kvm_mmu_set_spte: gfn 400 spte 300ee7 (rwxu) level 2 at 300000025010"]
    assert T.diff_traces(k, ok) is None
    d = T.diff_traces(k, bad)
    assert (d.field, d.kernel_value, d.model_value) == ("spte", "~ee7", "~100ee7")
    # a level-1 leaf (bit 7 is PAT there) and a non-leaf keep nothing of the address
    assert T.normalize("kvm_mmu_set_spte", "gfn 1 spte 123480a25 (r-xu) level 1 at 8").fields["spte"] \
        == "~a25"
    tbl = "as id 0 gfn 0 level 2 old_spte 8000000000000000 new_spte 8000300000025907"
    assert T.normalize("kvm_tdp_mmu_spte_changed", tbl).fields["new_spte"] == "~8000000000000907"
    # spte_requested at 2M prints the aligned pfn | the gfn's offset: the offset stays
    req = T.normalize("kvm_mmu_spte_requested", "gfn 401 pfn 130801 level 2")
    assert req.fields["pfn"] == "*1" and req.text == "gfn 401 pfn *1 level 2"
    assert T.normalize("kvm_mmu_spte_requested", "gfn 401 pfn 130801 level 1").fields["pfn"] == "*"
    huge = "gfn 200 spte 86000000002a0bf7 level 2 errno 0"
    assert T.normalize("kvm_mmu_split_huge_page", huge).fields["spte"] == "~86000000000a0bf7"


def test_host_values_alone_never_diverge():
    kernel = [ln.replace("pfn 1a2b3c", "pfn 5").replace("at 12f4c6080", "at 5080")
              .replace("00000000c0ffee11", "(____ptrval____)") for ln in KERNEL]
    assert T.diff_traces(kernel, MODEL, events="all") is None


def test_a_different_event_and_a_shorter_trace():
    kernel = list(KERNEL)
    kernel[9] = PFX + "kvm_mmu_prepare_zap_page: sp gen 0 gfn 2 l3 8-byte q0 wux nxe ad root 0 sync"
    d = T.diff_traces(kernel, MODEL)
    assert (d.index, d.field) == (6, "event")
    assert (d.kernel_value, d.model_value) == ("kvm_mmu_prepare_zap_page", "kvm_mmu_get_page")
    d = T.diff_traces(KERNEL, MODEL[:-2], events="all")
    assert (d.index, d.field, d.model) == (7, "end", None)
    assert d.kernel.event == "kvm_mmu_set_spte" and d.model_value is None
    assert "<end of trace>" in str(d)
    d = T.diff_traces(KERNEL[:4], MODEL, context=1)
    assert (d.index, d.kernel, d.field) == (2, None, "end") and len(d.before) == 1
    assert d.model_after == [MODEL[3]]


def test_the_default_selection_is_the_issues_event_list():
    assert set(T.DEFAULT_EVENTS) == {
        "kvm_mmu_get_page", "kvm_mmu_set_spte", "kvm_mmu_prepare_zap_page", "kvm_mmu_unsync_page",
        "kvm_mmu_sync_page", "kvm_mmu_spte_requested", "kvm_mmu_pagetable_walk",
        "kvm_mmu_paging_element", "kvm_mmu_set_accessed_bit", "kvm_mmu_set_dirty_bit",
        "kvm_mmu_walker_error"}
    # fast_page_fault is not in it: a difference there is invisible by default
    kernel = [ln.replace("fixed 1", "fixed 0") for ln in KERNEL]
    assert T.diff_traces(kernel, MODEL) is None
    assert T.diff_traces(kernel, MODEL, events="all").field == "fixed"
    assert T.diff_traces(kernel, MODEL, events=["fast_page_fault"]).index == 0
    assert T.diff_traces(kernel, MODEL, events="fast_page_fault").index == 0
    with pytest.raises(tp.UnknownEventError):
        T.diff_traces(KERNEL, MODEL, events=["kvm_mmu_set_sptes"])


def test_every_events_model_text_parses_and_masks():
    """Each event rendered by mmutrace (the kernel's format, test_mmutrace)
    parses; the masked fields are those of the docstring's table."""
    sample = {
        "kvm_mmu_pagetable_walk": dict(addr=0x1234, pferr=0x6),
        "kvm_mmu_paging_element": dict(pte=0x2027, level=4),
        "kvm_mmu_set_accessed_bit": dict(gpa=0x1000),
        "kvm_mmu_set_dirty_bit": dict(gpa=0x1000),
        "kvm_mmu_walker_error": dict(pferr=0),
        "kvm_mmu_get_page": dict(mmu_valid_gen=1, gfn=5, role=0x1c4, root_count=2, unsync=True,
                                 created=False),
        "kvm_mmu_sync_page": dict(mmu_valid_gen=0, gfn=5, role=0x101, root_count=0, unsync=True),
        "kvm_mmu_unsync_page": dict(mmu_valid_gen=0, gfn=5, role=0x1801, root_count=0, unsync=False),
        "kvm_mmu_prepare_zap_page": dict(mmu_valid_gen=0, gfn=5, role=0x31, root_count=0,
                                         unsync=False),
        "kvm_mmu_set_spte": dict(gfn=5, spte=0x1234a77, sptep=0xabc, level=1, r=True, x=True, u=1),
        "kvm_mmu_spte_requested": dict(gfn=5, pfn=1 << 63, level=1),
        "kvm_tdp_mmu_spte_changed": dict(gfn=5, old_spte=0x8000000000000000, new_spte=0x1234a77,
                                         level=1, as_id=0),
        "kvm_mmu_split_huge_page": dict(gfn=0x200, spte=0x2000af7, level=2, errno=-12),
        "fast_page_fault": dict(vcpu_id=1, cr2_or_gpa=0x5000, error_code=0, sptep=0x10,
                                old_spte=0x1234a75, new_spte=0x1234a77, ret=6),
        "mark_mmio_spte": dict(sptep=0x10, gfn=0xfee00, access=6, gen=0x12),
        "handle_mmio_page_fault": dict(addr=0xfee00000, gfn=0xfee00, access=6),
        "check_mmio_spte": dict(kvm_gen=0x12, spte_gen=0x10, spte=0x6 | 0x12 << 3 | 0xfee00000),
        "kvm_mmu_zap_all_fast": dict(mmu_valid_gen=1, mmu_used_pages=0x1f),
    }
    assert set(sample) == {ev.name for ev in tp.EVENTS}
    masked = {}
    for name, values in sample.items():
        text = tp.get_event(name).format(**values)
        fields = T.parse_payload(name, text)
        assert fields is not None, (name, text)
        t = T.normalize(name, text)
        masked[name] = {k for k, v in t.fields.items() if v != fields[k]}
        assert T.parse_payload(name, text + "x") is None
    assert masked == {
        "kvm_mmu_pagetable_walk": set(), "kvm_mmu_paging_element": set(),
        "kvm_mmu_set_accessed_bit": set(), "kvm_mmu_set_dirty_bit": set(),
        "kvm_mmu_walker_error": set(), "kvm_mmu_get_page": set(), "kvm_mmu_sync_page": set(),
        "kvm_mmu_unsync_page": set(), "kvm_mmu_prepare_zap_page": set(),
        "kvm_mmu_set_spte": {"spte", "sptep"},
        "kvm_mmu_spte_requested": set(),                    # KVM_PFN_NOSLOT is no host page
        "kvm_tdp_mmu_spte_changed": {"new_spte"},           # the non-present old one stays
        "kvm_mmu_split_huge_page": {"spte"},
        "fast_page_fault": {"sptep", "old_spte", "new_spte"},
        "mark_mmio_spte": {"sptep", "gen"},
        "handle_mmio_page_fault": set(),
        "check_mmio_spte": {"spte", "kvm_gen", "spte_gen"},
        "kvm_mmu_zap_all_fast": set(),
    }


def test_mmio_generations_are_masked_unless_asked():
    a = "mark_mmio_spte: sptep:ffff888012345678 gfn fee00 access 6 gen 12"
    b = "mark_mmio_spte: sptep:0000300000024080 gfn fee00 access 6 gen 4"
    assert T.diff_traces([a], [b], events="all") is None
    d = T.diff_traces([a], [b], events="all", mask_mmio_gen=False)
    assert (d.field, d.kernel_value, d.model_value) == ("gen", "12", "4")
    c = b.replace("access 6", "access 2")
    assert T.diff_traces([a], [c], events="all").field == "access"
    # check_mmio_spte: the SPTE's generation bits go, its gfn and access bits stay
    k = "check_mmio_spte: spte fee00096 kvm_gen 12 spte-gen 12 valid 1"
    m = "check_mmio_spte: spte fee00026 kvm_gen 4 spte-gen 4 valid 1"
    assert T.diff_traces([k], [m], events="all") is None
    assert T.diff_traces([k], [m.replace("valid 1", "valid 0")], events="all").field == "valid"
    assert T.diff_traces([k], [m.replace("fee00026", "fee01026")], events="all").field == "spte"


def test_an_mmio_spte_inside_a_tdp_change_needs_the_format():
    fmt = SpteFormat.ept(mmio_caching=True)
    s1 = fmt.make_mmio_spte(0x1234, 0, 3)
    s2 = fmt.make_mmio_spte(0x1234, 0, 9)
    assert s1 != s2 and not s1 & T.SPTE_MMU_PRESENT_MASK
    line = "kvm_tdp_mmu_spte_changed: as id 0 gfn 1234 level 1 old_spte 8000000000000000 new_spte {:x}"
    a, b = [line.format(s1)], [line.format(s2)]
    assert T.diff_traces(a, b, events="all").field == "new_spte"
    assert T.diff_traces(a, b, events="all", fmt=fmt) is None
    c = [line.format(fmt.make_mmio_spte(0x1235, 0, 9)).replace("gfn 1234", "gfn 1235")]
    d = T.diff_traces(a, c, events="all", fmt=fmt)
    assert d.field == "gfn"


def test_a_selected_line_in_another_format_is_an_error():
    bad = KERNEL[:5] + [PFX + "kvm_mmu_set_spte: gfn 10 spte zz level 1"]
    with pytest.raises(T.TraceParseError) as ei:
        T.diff_traces(bad, MODEL)
    assert ei.value.source == "kernel" and ei.value.lineno == 6
    with pytest.raises(TypeError):
        T.diff_traces([3], MODEL)
    with pytest.raises(ValueError):
        T.diff_traces(KERNEL, MODEL, context=-1)
    with pytest.raises(tp.UnknownEventError):
        T.parse_payload("kvm_exit", "reason 1")


def test_pairs_as_read_trace_gives_them():
    pairs = [tp.split_trace_line(ln) for ln in KERNEL]
    assert T.diff_traces([p for p in pairs if p], MODEL) is None


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

def _snap(label, pf_taken, pages_4k, vcpu_key=0, **more):
    return {"label": label, "event": 0, "vm": {"pages_4k": pages_4k, "mmu_cache_miss": 0},
            "vcpus": {vcpu_key: {"pf_taken": pf_taken, "halt_wait_hist": [0] * 32, **more}}}


def test_stat_deltas_and_diff():
    kernel = [_snap("start", 100, 7, "0", exits=900), _snap("a", 103, 10, "0", exits=950),
              _snap("end", 104, 10, "0", exits=999)]
    model = [_snap("start", 0, 0), _snap("a", 3, 3), _snap("end", 4, 3)]
    assert T.stat_deltas(model) == [
        {"label": "a", "vm": {"pages_4k": 3, "mmu_cache_miss": 0}, "vcpus": {0: {"pf_taken": 3}}},
        {"label": "end", "vm": {"pages_4k": 0, "mmu_cache_miss": 0}, "vcpus": {0: {"pf_taken": 1}}}]
    assert T.diff_stats(kernel, model) == []          # exits are not an MMU statistic
    model[2]["vcpus"][0]["pf_taken"] = 6
    model[1]["vm"]["pages_4k"] = 1
    assert T.diff_stats(kernel, model) == [
        T.StatDifference("a", "vm", "pages_4k", 3, 1),
        T.StatDifference("end", "vm", "pages_4k", 0, 2),
        T.StatDifference("end", "vcpu 0", "pf_taken", 1, 3)]
    assert T.diff_stats(kernel, model[:2]) == [
        T.StatDifference("", "", "<label>", ["start", "a", "end"], ["start", "a"])]
    model = [_snap("start", 0, 0), _snap("a", 3, 3), _snap("end", 4, 3, vcpu_key=1)]
    assert T.diff_stats(kernel, model)[0].name == "<vcpu>"


def test_cli(tmp_path, capsys):
    k, m = tmp_path / "k.trace", tmp_path / "m.trace"
    k.write_text("\n".join(KERNEL) + "\n")
    m.write_text("\n".join(MODEL) + "\n")
    assert T.main([str(k), str(m)]) == 0
    assert "traces agree" in capsys.readouterr().out
    m.write_text("\n".join(MODEL[:-3]) + "\n")
    assert T.main([str(k), str(m), "--all"]) == 1
    out = capsys.readouterr().out
    assert "first divergence at event 6" in out and "'end'" in out
    ks, ms = tmp_path / "k.json", tmp_path / "m.json"
    ks.write_text(json.dumps([_snap("s", 0, 0), _snap("e", 2, 0)]))
    ms.write_text(json.dumps([_snap("s", 0, 0), _snap("e", 1, 0)]))
    m.write_text("\n".join(MODEL) + "\n")
    assert T.main([str(k), str(m), "--stats", str(ks), str(ms)]) == 1
    assert "pf_taken" in capsys.readouterr().out
    assert T.main([str(k), str(tmp_path / "nope")]) == 2
    assert T.main([str(k), str(m), "--events", "nope"]) == 2


RECORDED = {"marks": [{"label": "touched", "vcpu0": {"pf_taken": 10, "pf_fixed": 9, "exits": 40},
                       "vm": {"pages_4k": 9, "mmu_cache_miss": 4}}],
            "end": {"vcpu0": {"pf_taken": 11, "pf_fixed": 9, "pf_emulate": 2},
                    "vm": {"pages_4k": 9, "mmu_cache_miss": 4}}}


def test_a_recordings_stats_read_as_cumulative_deltas():
    d = T.recorded_stat_deltas(RECORDED)
    assert [x["label"] for x in d] == ["touched", "end"]
    assert d[0]["vcpus"][0]["pf_taken"] == 10 and d[0]["vcpus"][0]["pf_emulate"] == 0
    assert "exits" not in d[0]["vcpus"][0]                  # not an MMU statistic
    assert d[1]["vm"]["pages_4k"] == 9 and d[1]["vm"]["mmu_shadow_zapped"] == 0
    # the model's snapshots against their baseline: the same shape
    base = {"label": "start", "event": -1, "vm": {"pages_4k": 0, "mmu_cache_miss": 0},
            "vcpus": {0: {"pf_taken": 0, "pf_fixed": 0, "pf_emulate": 0}}}
    snaps = [{"label": "touched", "event": 5, "vm": {"pages_4k": 9, "mmu_cache_miss": 4},
              "vcpus": {0: {"pf_taken": 10, "pf_fixed": 9, "pf_emulate": 0}}},
             {"label": "end", "event": 9, "vm": {"pages_4k": 9, "mmu_cache_miss": 4},
              "vcpus": {0: {"pf_taken": 11, "pf_fixed": 9, "pf_emulate": 2}}}]
    m = T.stat_deltas(snaps, baseline=base)
    assert T.diff_stat_deltas(d, m) == []
    assert T.diff_stat_files(RECORDED, [base] + snaps) == []
    snaps[1]["vcpus"][0]["pf_emulate"] = 1
    assert T.diff_stat_files(RECORDED, [base] + snaps) == [
        T.StatDifference("end", "vcpu 0", "pf_emulate", 2, 1)]
    with pytest.raises(ValueError, match="baseline"):
        T.diff_stat_files(RECORDED, snaps)
    with pytest.raises(ValueError):
        T.recorded_stat_deltas({"marks": 3})


def test_cli_compares_a_recording_with_the_replays_stats(tmp_path, capsys):
    from kvmmmu import replay as R
    stream = tmp_path / "s.jsonl"
    init = {"kind": "init", "version": 1, "mmu": "tdp_mmu", "params": {}, "guest_model": {},
            "memslots": [{"slot": 0, "as_id": 0, "gpa": 0, "size": 1 << 21, "flags": 0,
                          "thp": False}],
            "memory": [], "vcpus": [{"id": 0, "cr0": 1, "cr3": 0, "cr4": 0, "efer": 0,
                                     "rflags": 2, "cpl": 0}]}
    R.write_stream(init, [{"kind": "entry", "vcpu": 0},
                          {"kind": "page_fault", "vcpu": 0, "addr": 0x1000, "error_code": 6},
                          {"kind": "mark", "label": "one"}], stream)
    st, tr = tmp_path / "m.json", tmp_path / "m.trace"
    assert R.main([str(stream), "--stats", str(st), "--trace", str(tr)]) == 0
    rec = tmp_path / "k.json"
    rec.write_text(json.dumps({"marks": [{"label": "one", "vcpu0": {"pf_taken": 1, "pf_fixed": 1},
                                          "vm": {"pages_4k": 1}}],
                               "end": {"vcpu0": {"pf_taken": 1, "pf_fixed": 1},
                                       "vm": {"pages_4k": 1}}}))
    capsys.readouterr()
    assert T.main([str(tr), str(tr), "--stats", str(rec), str(st)]) == 0
    rec.write_text(rec.read_text().replace('"pf_fixed": 1}, "vm"', '"pf_fixed": 2}, "vm"', 1))
    assert T.main([str(tr), str(tr), "--stats", str(rec), str(st)]) == 1
    assert "pf_fixed at 'one': kernel delta 2, model 1" in capsys.readouterr().out
