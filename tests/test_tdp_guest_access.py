"""TdpMmu.guest_access: the guest touching many gfns on a TDP MMU VM.

The reference is ``batch=False`` (one Python step per walk, per A/D update
and per exit, every exit through TdpMmu.page_fault); ``batch=True`` runs the
CPU's part and the exits fast_page_fault fixes in the core's nogil loop.
Each scenario is run on two VMs built the same way, one per mode, and must
leave the same SPTEs (every root's dump), VM and vCPU statistics, dirty
bitmaps, ``vcpu.last_fault`` and kvmmmu trace lines (every event enabled),
and the same per-access exit counts; VM.audit() stays clean.  Hand counts
pin the expected numbers where they are known from the kernel's rules.
"""
import errno

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmmmu import mmutrace as tp
from kvmmmu._core.spte import SPTE_MMU_PRESENT_MASK
from kvmmmu.host import HostConfig
from kvmmmu.memslots import KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES
from kvmmmu.vm import VM, KvmParams

MiB = 1 << 20
SIZE = 64 * MiB
NPAGES = SIZE >> 12
HOLE = NPAGES + 0x100                      # a gfn with no memslot (MMIO)


@pytest.fixture(autouse=True)
def _events_off():
    tp.disable_all()
    yield
    tp.disable_all()


def _vm(thp=False, tdp="ept", ad=True, eager=True, pml=False, size=SIZE, populate=True,
        nx=False):
    vm = VM("tdp_mmu", host=HostConfig(tdp=tdp, ad_bits=ad, pml=pml),
            params=KvmParams(eager_page_split=eager, nx_huge_pages=nx))
    vm.add_memory(0, size, slot=0, thp=thp, populate=populate)
    vm.vcpus[0].kvm_mmu_reload()
    return vm


def _slot(vm, sid=0):
    return vm.memslots[0].id_to_memslot(sid)


def _log_dirty(vm, on=True, sid=0):
    s = _slot(vm, sid)
    vm.set_user_memory_region(sid, KVM_MEM_LOG_DIRTY_PAGES if on else 0, s.base_gfn << 12,
                              s.npages << 12, s.userspace_addr)


def state(vm):
    """Everything guest_access may change, in comparable form."""
    t = vm.mmu_backend
    v = vm.vcpus[0]
    lf = v.last_fault
    return {
        "roots": [(r.sp, r.refcount, r.invalid, t.core.dump(r.sp).tolist()) for r in t.roots],
        "vm_stat": vm.stat.as_dict(),
        "vcpu_stat": [c.stat.as_dict() for c in vm.vcpus],
        "dirty": {(s.as_id, s.id): None if s.dirty_bitmap is None else s.dirty_bitmap.tolist()
                  for space in vm.memslots for s in space},
        "last_fault": None if lf is None else
        sorted((k, getattr(v, "id", v)) for k, v in vars(lf).items()),
        "emulation_type": v.emulation_type,
        "host": [(m.start, m.end, m.pte.tolist(), m.pfn.tolist()) for m in vm.host.vmas],
        "host_events": dict(vm.host.events),
        "vma_hint": None if vm.host._vma_hint is None else
        (vm.host._vma_hint[0], vm.host._vma_hint[1].start),
        "caches": [(c.mmu_shadow_page_cache.nobjs, c.mmu_page_header_cache.nobjs) for c in vm.vcpus],
        "notifier_seq": vm.notifier.mmu_invalidate_seq,
        "last_used_slot": [getattr(c.last_used_slot, "id", None) for c in vm.vcpus],
    }


def both(build, *steps):
    """Build two VMs with `build`, run each step (a callable (vm, batch) ->
    anything) on both with every kvmmmu event captured; the results, the
    trace lines and the final state must agree.  Returns (vm_batch, results)."""
    out = []
    for batch in (False, True):
        vm = build()
        res = []
        with tp.capture(capacity=1 << 20) as ring:
            for step in steps:
                try:
                    r = step(vm, batch)
                    res.append(r.tolist() if isinstance(r, np.ndarray) else r)
                except (RuntimeError, OSError) as e:
                    res.append((type(e).__name__, getattr(e, "errno", None), str(e)))
        assert ring.dropped == 0
        assert vm.audit(raise_=False) == []
        out.append((vm, res, ring.lines(), state(vm)))
    (_, r0, l0, s0), (vm1, r1, l1, s1) = out
    assert r0 == r1
    assert len(l0) == len(l1)
    assert l0 == l1
    for k in s0:
        assert s0[k] == s1[k], k
    return vm1, r1


def acc(gfns, **kw):
    g = np.asarray(gfns, dtype=np.uint64)
    return lambda vm, batch: vm.mmu_backend.guest_access(vm.vcpus[0], g, batch=batch, **kw)


def do(fn):
    def step(vm, batch):
        fn(vm)
    return step


def rnd(seed, n, hi, holes=False):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, hi, n).astype(np.uint64)
    g[rng.integers(0, n, n // 8)] = g[rng.integers(0, n, n // 8)]      # repeats
    if holes:
        g[rng.integers(0, n, 3)] = HOLE
    return g


# ---------------------------------------------------------------------------
# Hand counts
# ---------------------------------------------------------------------------

def test_first_touch_4k_one_fault_each():
    vm, res = both(lambda: _vm(thp=False), acc(np.arange(512)))
    assert res[0] == [1] * 512
    st = vm.vcpus[0].stat
    assert st.pf_taken == st.pf_fixed == 512 and st.pf_fast == 0
    assert vm.stat.pages_4k == 512


def test_first_touch_4k_mapped_by_the_core(monkeypatch):
    """A not-present exit on a present 4K host page is mapped in the batch's
    C pass: the scalar page_fault runs only to top the caches up (and the
    host PTEs get young/dirty as hva_to_pfn_fast sets them)."""
    from kvmmmu.host import PTE_DIRTY, PTE_YOUNG
    from kvmmmu.tdp_mmu import TdpMmu
    calls = []
    orig = TdpMmu.page_fault
    monkeypatch.setattr(TdpMmu, "page_fault",
                        lambda self, *a, **k: calls.append(a[1]) or orig(self, *a, **k))
    vm = _vm(thp=False)
    n = 4096
    f = vm.mmu_backend.guest_access(vm.vcpus[0], np.arange(n, dtype=np.uint64), write=True)
    assert f.tolist() == [1] * n
    assert len(calls) < n // 100
    st = vm.vcpus[0].stat
    assert st.pf_taken == st.pf_fixed == n and vm.stat.pages_4k == n
    pte = vm.host.vmas[0].pte[:n]
    assert np.all(pte & (PTE_YOUNG | PTE_DIRTY) == PTE_YOUNG | PTE_DIRTY)


def test_first_touch_thp_frame_one_fault():
    vm, res = both(lambda: _vm(thp=True), acc(np.arange(512, 1024)))
    assert sum(res[0]) == 1 and res[0][0] == 1
    assert vm.vcpus[0].stat.pf_fixed == 1 and vm.stat.pages_2m == 1


def test_accessed_set_by_the_cpu_after_aging():
    vm = _vm()
    t, v = vm.mmu_backend, vm.vcpus[0]
    a = vm.fmt.masks()["accessed_mask"]
    g = np.arange(4, dtype=np.uint64)
    t.guest_access(v, g)
    vm.host.age(_slot(vm).userspace_addr, 4 << 12)          # kvm_age_gfn clears A
    assert not any(int(s) & a for s in t.translate(v, g)[0])
    assert t.guest_access(v, g).tolist() == [0] * 4          # no exit ...
    assert all(int(s) & a for s in t.translate(v, g)[0])     # ... the CPU set A


def test_pml_dirty_bit_set_by_the_cpu_is_logged():
    """With PML, dirty logging clears D on 4K leaves instead of W: a write
    does not exit, the CPU sets D and PML logs the gfn."""
    vm = _vm(pml=True)
    t, v = vm.mmu_backend, vm.vcpus[0]
    d = vm.fmt.masks()["dirty_mask"]
    g = np.arange(8, dtype=np.uint64)
    t.guest_access(v, g, write=True)
    _log_dirty(vm)
    vm.get_dirty_log(0)
    assert not any(int(s) & d for s in t.translate(v, g[::2].copy())[0])
    assert t.guest_access(v, g[::2].copy(), write=True).tolist() == [0] * 4
    assert all(int(s) & d for s in t.translate(v, g[::2].copy())[0])
    assert int(vm.get_dirty_log(0)[0]) == 0b01010101


@pytest.mark.parametrize("eager", [True, False])
def test_write_after_dirty_logging_one_fast_fault_each(eager):
    n = 300
    g = np.arange(1000, 1000 + n, dtype=np.uint64)

    def setup(vm, batch):
        vm.mmu_backend.guest_access(vm.vcpus[0], np.arange(NPAGES, dtype=np.uint64),
                                    batch=batch)
        _log_dirty(vm)
        vm.get_dirty_log(0)

    def log(vm, batch):
        return vm.get_dirty_log(0)

    vm, res = both(lambda: _vm(thp=True, eager=eager), setup, acc(g, write=True), log)
    st = vm.vcpus[0].stat
    if eager:
        # every 2M leaf was split, the 4K leaves write-protected: one fast fault each
        assert res[1] == [1] * n
        assert st.pf_fast == n
    bm = np.array(res[2], np.uint64)
    marked = np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little"))
    assert marked.tolist() == g.tolist()


def test_no_ad_bits_aging_restores_by_fast_fault():
    g = np.arange(64, dtype=np.uint64)

    def age(vm, batch):
        s = _slot(vm)
        vm.host.age(s.userspace_addr, 64 << 12)

    vm, res = both(lambda: _vm(ad=False), acc(g), age, acc(g), acc(g, write=True))
    assert res[0] == [1] * 64
    assert res[2] == [1] * 64          # access-tracked: restored by fast_page_fault
    # access tracking saves R and X only: W comes back by a second fast fault
    assert res[3] == [1] * 64
    assert vm.vcpus[0].stat.pf_fast == 128


# ---------------------------------------------------------------------------
# Scalar vs batch
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    dict(thp=False), dict(thp=True), dict(ad=False), dict(ad=False, thp=True),
    dict(tdp="npt"), dict(tdp="npt", thp=True), dict(pml=True, thp=True),
    dict(nx=True), dict(nx=True, thp=True), dict(populate=False), dict(populate=False, thp=True),
])
def test_mixed_accesses_match(cfg):
    hi = NPAGES + 64

    def age(vm, batch):
        vm.host.age(_slot(vm).userspace_addr, SIZE // 2)

    def logging(vm, batch):
        _log_dirty(vm)
        vm.get_dirty_log(0)

    def getlog(vm, batch):
        return vm.get_dirty_log(0)

    both(lambda: _vm(**cfg),
         acc(rnd(1, 3000, hi, holes=True)),
         acc(rnd(2, 2000, hi, holes=True), write=True),
         acc(rnd(3, 500, hi), exec=True),
         age,
         acc(rnd(4, 2000, hi)),
         logging,
         acc(rnd(5, 3000, NPAGES), write=True),
         getlog,
         acc(rnd(6, 3000, NPAGES), write=True),
         acc(rnd(7, 500, NPAGES), exec=True),
         getlog)


@pytest.mark.parametrize("eager", [True, False])
def test_manual_dirty_log_protect_match(eager):
    g = rnd(11, 4000, NPAGES)

    def setup(vm, batch):
        vm.enable_manual_dirty_log_protect(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        vm.mmu_backend.guest_access(vm.vcpus[0], g, write=True, batch=batch)
        _log_dirty(vm)

    def clear(vm, batch):
        bm = vm.get_dirty_log(0)
        vm.clear_dirty_log(0, 0, NPAGES, bm)
        return bm

    both(lambda: _vm(thp=True, eager=eager), setup, acc(g, write=True), clear,
         acc(g[::-1].copy(), write=True), clear, acc(g), clear)


def test_munmap_mid_batch_raises_after_the_earlier_accesses():
    def unmap(vm, batch):
        vm.host.munmap(_slot(vm).userspace_addr + (1 << 21), 1 << 21)
        vm.host.age(_slot(vm).userspace_addr, 1 << 21)          # clear A

    g = np.array([1, 2, 3, 513, 4, 5], np.uint64)
    vm, res = both(lambda: _vm(thp=False), acc(np.arange(8)), unmap, acc(g, write=True))
    name, err, msg = res[2]
    assert (name, err) == ("OSError", errno.EFAULT) and "gfns[3]=0x201" in msg
    # the earlier writes were done (A set again), the later ones not
    sp, _ = vm.mmu_backend.translate(vm.vcpus[0], g)
    a = vm.fmt.masks()["accessed_mask"]
    assert [bool(int(s) & a) for s in sp] == [True, True, True, False, False, False]


def test_mprotect_readonly_host_match():
    def ro(vm, batch):
        vm.host.mprotect(_slot(vm).userspace_addr, SIZE, False)

    g = rnd(21, 1000, NPAGES)
    both(lambda: _vm(thp=True), acc(g, write=True), ro, acc(g), acc(g[:5].copy(), write=True))


def test_two_slots_two_vmas_match():
    """Accesses alternating between two 4K-backed memslots (two VMAs: the
    host's find_vma hint follows the last fault-in) and a THP one."""
    def build():
        vm = _vm(thp=False, size=8 * MiB)
        vm.add_memory(16 * MiB, 8 * MiB, slot=1, thp=False, populate=True)
        vm.add_memory(32 * MiB, 8 * MiB, slot=2, thp=True, populate=True)
        return vm

    rng = np.random.default_rng(5)
    g = np.concatenate([rng.integers(0, 2048, 600), rng.integers(4096, 6144, 600),
                        rng.integers(8192, 10240, 600)]).astype(np.uint64)
    rng.shuffle(g)
    vm, res = both(build, acc(g), acc(g[::-1].copy(), write=True))
    assert len(vm.host.vmas) == 3
    assert vm.vcpus[0].stat.pf_taken == sum(res[0]) + sum(res[1])


def test_tdx_vm_refused():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), vm_type="tdx")
    with pytest.raises(NotImplementedError, match="TDX"):
        vm.mmu_backend.guest_access(vm.vcpus[0], np.arange(2, dtype=np.uint64))


def test_mmio_emulated_each_time():
    g = np.array([HOLE, HOLE, HOLE + 1], np.uint64)
    vm, res = both(lambda: _vm(), acc(g), acc(g, write=True))
    assert res[0] == [1, 1, 1] and res[1] == [1, 1, 1]
    st = vm.vcpus[0].stat
    assert st.pf_mmio_spte_created == 2 and st.pf_emulate == 2


# ---------------------------------------------------------------------------
# Hypothesis: random access sequences with aging and dirty logging
# ---------------------------------------------------------------------------

_OPS = st.one_of(
    st.tuples(st.sampled_from(["r", "w", "x"]),
              st.lists(st.integers(0, 4096 + 8), min_size=1, max_size=64)),
    st.tuples(st.just("age"), st.integers(0, 7)),
    st.tuples(st.just("log"), st.booleans()),
    st.tuples(st.just("get"), st.just(0)),
    st.tuples(st.just("prot"), st.booleans()),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=st.sampled_from([dict(thp=True), dict(thp=False), dict(thp=False, ad=False),
                            dict(tdp="npt", thp=True), dict(tdp="npt"), dict(thp=True, eager=False),
                            dict(thp=False, pml=True)]),
       ops=st.lists(_OPS, min_size=1, max_size=8))
def test_random_sequences_match(cfg, ops):
    steps = []
    for op, arg in ops:
        if op in "rwx":
            steps.append(acc(np.array(arg, np.uint64), write=op == "w", exec=op == "x"))
        elif op == "age":
            steps.append(do(lambda vm, k=arg: vm.host.age(_slot(vm).userspace_addr + (k << 21),
                                                          1 << 21)))
        elif op == "prot":
            steps.append(do(lambda vm, w=arg: vm.host.mprotect(_slot(vm).userspace_addr, 16 * MiB,
                                                               w)))
        elif op == "log":
            steps.append(do(lambda vm, on=arg: _log_dirty(vm, on)))
        else:
            steps.append(lambda vm, b: None if _slot(vm).dirty_bitmap is None
                         else vm.get_dirty_log(0).tolist())
    both(lambda: _vm(size=16 * MiB, **cfg), *steps)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

def test_gives_up_after_max_faults(monkeypatch):
    """An exit that never makes progress (the fault answers RETRY forever)."""
    from kvmmmu._core.defs import RET_PF_RETRY
    for batch in (False, True):
        vm = _vm(thp=True)                  # (THP: the core maps no first touch itself)
        t, v = vm.mmu_backend, vm.vcpus[0]
        t.guest_access(v, np.arange(2, dtype=np.uint64))
        monkeypatch.setattr(type(t), "page_fault", lambda self, *a, **k: RET_PF_RETRY)
        with pytest.raises(RuntimeError, match=r"gfns\[1\]=0x1000: the read still exits after "
                                               r"3 faults \(last RET_PF_RETRY\)"):
            t.guest_access(v, np.array([1, 0x1000, 6], np.uint64), batch=batch, max_faults=3)
        monkeypatch.undo()


def test_bad_input_changes_nothing():
    vm = _vm()
    t, v = vm.mmu_backend, vm.vcpus[0]
    t.guest_access(v, np.arange(8, dtype=np.uint64))
    before = state(vm)
    g = np.arange(4, dtype=np.uint64)
    for batch in (False, True):
        with pytest.raises(TypeError, match="gfns"):
            t.guest_access(v, g.astype(np.int64), batch=batch)
        with pytest.raises(TypeError, match="gfns"):
            t.guest_access(v, [1, 2], batch=batch)
        with pytest.raises(ValueError, match="gfns"):
            t.guest_access(v, np.arange(8, dtype=np.uint64)[::2], batch=batch)
        with pytest.raises(ValueError, match=r"gfns\[1\]"):
            t.guest_access(v, np.array([1, 1 << 36, 2], np.uint64), batch=batch)
        with pytest.raises(ValueError, match="write, exec"):
            t.guest_access(v, g, write=True, exec=True, batch=batch)
        with pytest.raises(ValueError, match="max_faults"):
            t.guest_access(v, g, max_faults=0, batch=batch)
        with pytest.raises(ValueError, match="write"):
            t.guest_access(v, g, write=2, batch=batch)
        other = _vm()
        with pytest.raises(ValueError, match="vcpu"):
            t.guest_access(other.vcpus[0], g, batch=batch)
    assert state(vm) == before
    t.kvm_mmu_unload(v)
    with pytest.raises(ValueError, match="vcpu.*no root"):
        t.guest_access(v, g)


def test_core_batch_checks():
    vm = _vm()
    t = vm.mmu_backend
    root = t.vcpu_root[0].sp
    g = np.arange(4, dtype=np.uint64)
    c = np.zeros(4, np.uint8)
    with pytest.raises(TypeError, match="gclass"):
        t.core.guest_access_batch(root, g, c.astype(np.int8))
    with pytest.raises(ValueError, match="gclass"):
        t.core.guest_access_batch(root, g, c[:3].copy())
    with pytest.raises(ValueError, match="max_faults"):
        t.core.guest_access_batch(root, g, c, max_faults=256)
    with pytest.raises(ValueError, match="root"):
        t.core.guest_access_batch(root + 1000, g, c)
    with pytest.raises(ValueError, match="page_cache"):
        t.core.guest_access_batch(root, g, c | 4)                   # GA_CLASS_SLOW, no slots
    v = vm.vcpus[0]
    caches = dict(page_cache=v.mmu_shadow_page_cache, header_cache=v.mmu_page_header_cache)
    with pytest.raises(ValueError, match="sidx"):
        t.core.guest_access_batch(root, g, c | 4, sidx=np.zeros(4, np.int32), **caches)
    pte, pfn = np.zeros(2, np.uint8), np.zeros(2, np.uint64)
    with pytest.raises(ValueError, match=r"gfns\[2\]"):
        t.core.guest_access_batch(root, g, c | 4, sidx=np.zeros(4, np.int32),
                                  slot_base=np.zeros(1, np.uint64), slot_pte=[pte],
                                  slot_pfn=[pfn], **caches)
    with pytest.raises(ValueError, match="slot_pfn"):
        t.core.guest_access_batch(root, g, c, slot_base=np.zeros(1, np.uint64), slot_pte=[pte],
                                  slot_pfn=[pfn[:1].copy()])
    with pytest.raises(TypeError, match="slot_pte"):
        t.core.guest_access_batch(root, g, c, slot_base=np.zeros(1, np.uint64),
                                  slot_pte=[pte.astype(np.uint16)], slot_pfn=[pfn])
    b = t.core.guest_access_batch(root, g, c)
    with pytest.raises(ValueError, match="taken"):
        b.run(4, 1)
    with pytest.raises(ValueError, match="taken"):
        b.run(0, 256)
    g[:] = 1 << 40                                  # the batch holds its own copy
    with pytest.raises(ValueError, match="start"):
        b.run(5)
    status, pos, *_ = b.run(0)
    assert (status, pos) == (1, 0)                  # GA_SLOW: gfn 0 is not mapped yet
    assert b.run(0, 0, True)[:2] == (1, 0)          # no slot tables: still the caller's
    assert b.run(4)[:2] == (0, 4)                   # GA_DONE
    assert int(t.core.get_last_sptep(root, 1 << 40)[0]) == 0
    sptep, spte, level = t.core.get_last_sptep(root, 0)
    assert sptep and level == 4 and not spte & SPTE_MMU_PRESENT_MASK


# ---------------------------------------------------------------------------
# Threads: vCPUs running batches at once (the kernel's concurrency)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("modes", [(True, True), (True, False)])
def test_vcpu_threads_batches_at_once(modes):
    """Two vCPUs on two threads touch overlapping gfns of 4K-backed memory
    (populated: no host fault-in, whose COW invalidations the model's
    mmu_lock would refuse beside another thread's fault): no error, a clean
    audit, every gfn mapped with A and D set, the exits counted once each."""
    from _threads import run_in_threads
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), nr_vcpus=2)
    vm.add_memory(0, 16 * MiB, slot=0, thp=False, populate=True)
    for v in vm.vcpus:
        v.kvm_mmu_reload()
    t = vm.mmu_backend
    n = 4096
    rng = np.random.default_rng(3)
    orders = [rng.permutation(n).astype(np.uint64) for _ in range(2)]
    errors, exits = [], [0, 0]

    def work(k):
        try:
            exits[k] += int(t.guest_access(vm.vcpus[k], orders[k], batch=modes[k]).sum())
            exits[k] += int(t.guest_access(vm.vcpus[k], orders[k][::-1].copy(), write=True,
                                           batch=modes[k]).sum())
        except BaseException as e:      # noqa: BLE001
            errors.append(e)

    run_in_threads(work, 2)
    assert errors == []
    assert vm.audit(raise_=False) == []
    sptes, levels = t.translate(vm.vcpus[0], np.arange(n, dtype=np.uint64))
    m = vm.fmt.masks()
    ad = m["accessed_mask"] | m["dirty_mask"]
    assert np.all(levels == 1) and np.all(sptes & np.uint64(ad) == np.uint64(ad))
    assert sum(c.stat.pf_taken for c in vm.vcpus) == sum(exits)
    assert vm.stat.pages_4k == n


@pytest.mark.parametrize("thp,eager,pml", [(False, True, False), (True, False, False),
                                           (False, True, True)])
def test_per_access_write_flags(thp, eager, pml):
    # a write array is the same as the runs of reads and writes it describes, taken one
    # call per run: same exits, SPTEs, statistics, dirty bits and trace lines
    rng = np.random.default_rng(7)
    n = 4096
    gfns = rng.permutation(np.arange(n, dtype=np.uint64))
    writes = rng.random(n) < 0.4

    def build():
        return _vm(thp=thp, eager=eager, pml=pml, size=16 * MiB, populate=True)

    def prepare(vm, batch):
        # every page mapped, then logging on: a read then never exits, a write faults
        # (a read fault that maps a page of a logged slot would mark it dirty too)
        vm.mmu_backend.guest_access(vm.vcpus[0], gfns, write=True, batch=batch)
        _log_dirty(vm)
        vm.get_dirty_log(0)

    def one_call(vm, batch):
        return vm.mmu_backend.guest_access(vm.vcpus[0], gfns, write=writes, batch=batch)

    def by_runs(vm, batch):
        cut = np.flatnonzero(np.diff(writes.astype(np.int8))) + 1
        return np.concatenate([vm.mmu_backend.guest_access(vm.vcpus[0], g, write=bool(w[0]),
                                                           batch=batch)
                               for g, w in zip(np.split(gfns, cut), np.split(writes, cut))])

    def dirty(vm, batch):
        return vm.get_dirty_log(0)

    vm_a, res_a = both(build, prepare, one_call, dirty)
    vm_b, res_b = both(build, prepare, by_runs, dirty)
    assert res_a == res_b
    assert state(vm_a) == state(vm_b)
    # every write of the logged slot is in the bitmap; no read is
    bits = np.unpackbits(np.asarray(res_a[2], np.uint64).view(np.uint8), bitorder="little")
    assert set(np.flatnonzero(bits[:n]).tolist()) == set(gfns[writes].tolist())


@pytest.mark.parametrize("write,exc,words", [
    (np.ones(3, np.int32), TypeError, "bool or uint8"),
    (np.ones((2, 2), bool), TypeError, "1-d"),
    (np.ones(5, bool), ValueError, "5 flags"),
    (np.full(4, 2, np.uint8), ValueError, "0 (a read) or 1"),
])
def test_bad_write_flags_change_nothing(write, exc, words):
    vm = _vm(size=4 * MiB)
    before = state(vm)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        vm.mmu_backend.guest_access(vm.vcpus[0], np.arange(4, dtype=np.uint64), write=write)
    with pytest.raises(ValueError, match="not both"):
        vm.mmu_backend.guest_access(vm.vcpus[0], np.arange(4, dtype=np.uint64),
                                    write=np.array([0, 1, 0, 0], bool), exec=True)
    assert state(vm) == before


def test_core_batch_probes():
    """A batch built by hand, bad per-access write flags, and a batch whose root
    was zapped and freed before it ran: each raises a specific error, none
    reaches the C loop."""
    from kvmmmu._core.tdp_mmu import GuestAccessBatch
    with pytest.raises(TypeError, match="guest_access_batch"):
        GuestAccessBatch().run(0)
    vm = _vm(size=4 * MiB)
    t, v = vm.mmu_backend, vm.vcpus[0]
    root = t.vcpu_root[0].sp
    g, c = np.arange(4, dtype=np.uint64), np.zeros(4, np.uint8)
    with pytest.raises(TypeError, match="writes"):
        t.core.guest_access_batch(root, g, c, writes=np.ones(4, np.int8))
    with pytest.raises(ValueError, match="writes has 3"):
        t.core.guest_access_batch(root, g, c, writes=np.ones(3, np.uint8))
    with pytest.raises(ValueError, match="0 \\(a read\\) or 1"):
        t.core.guest_access_batch(root, g, c, writes=np.full(4, 2, np.uint8))
    with pytest.raises(ValueError, match="not writes and exec"):
        t.core.guest_access_batch(root, g, c, writes=np.ones(4, np.uint8), exec=True)
    w = np.array([1, 0, 1, 0], np.uint8)
    b = t.core.guest_access_batch(root, g, c, writes=w)
    w[:] = 7                                        # the batch holds its own copy
    t.kvm_mmu_unload(v)
    t.kvm_tdp_mmu_invalidate_roots()
    t.kvm_tdp_mmu_zap_invalidated_roots()
    vm.arena.rcu_barrier()
    with pytest.raises(ValueError, match="not a live sp"):
        b.run(0)
    assert vm.audit(raise_=False) == []
