"""``mmu_lock`` as an rwlock on a VM: the read side shared, the write side
exclusive, both checked; and the TDP MMU's read-lock map path driven from
several vCPU threads of one VM, each with its own caches.

* MmuLock: several threads hold it for read at once; the write side is
  refused (ConcurrentUseError) while any thread reads or another writes;
  taking it again in a conflicting mode on the same thread is a deadlock
  (refused); releases and ``lockdep_assert_*`` are per thread; the counts
  stay exact under many threads.
* Two vCPU threads populating overlapping gfns of THP-backed memslots
  under ``vm.mmu_lock.read()`` end in the tables a single vCPU's
  ``map_memory`` builds, with VM.audit() and TdpMmu.audit() clean.
"""
import threading

import numpy as np
import pytest

from kvmmmu._core.defs import KVM_PAGES_PER_HPAGE, PAGE_SHIFT, RET_PF_FIXED, RET_PF_RETRY, \
    RET_PF_SPURIOUS
from kvmmmu._core.tdp_iter import TdpIter
from kvmmmu.errors import ConcurrentUseError, LockNotHeldError
from kvmmmu.host import HostConfig
from kvmmmu.tdp_mmu import TdpMmu
from kvmmmu.vm import VM, MmuLock

MiB = 1 << 20


def _in_thread(fn):
    out = []

    def body():
        try:
            out.append(("ok", fn()))
        except BaseException as e:      # noqa: BLE001 - returned to the test
            out.append(("raised", e))
    th = threading.Thread(target=body)
    th.start()
    th.join(10)
    assert out, "the thread hung"
    return out[0]


# ---------------------------------------------------------------------------
# MmuLock
# ---------------------------------------------------------------------------

def test_the_read_side_is_shared_by_threads():
    lock = MmuLock()
    with lock.read():
        kind, _ = _in_thread(lambda: (lock.acquire_read(), lock.readers, lock.release_read()))
        assert kind == "ok"
        kind, got = _in_thread(lambda: _hold_read_and_count(lock))
        assert kind == "ok" and got == 2
        assert lock.readers == 1 and lock.writers == 0
    assert not lock.held


def _hold_read_and_count(lock):
    with lock.read():
        return lock.readers


def test_the_write_side_is_exclusive_against_readers_and_writers():
    lock = MmuLock()
    with lock.read():
        kind, e = _in_thread(lock.acquire_write)
        assert kind == "raised" and isinstance(e, ConcurrentUseError) and "hold it for read" in str(e)
    with lock.write():
        for fn in (lock.acquire_write, lock.acquire_read):
            kind, e = _in_thread(fn)
            assert kind == "raised" and isinstance(e, ConcurrentUseError) and "another thread" in str(e)
    assert not lock.held
    kind, _ = _in_thread(lambda: (lock.acquire_write(), lock.release_write()))
    assert kind == "ok" and not lock.held


def test_conflicting_modes_on_one_thread_are_a_deadlock():
    lock = MmuLock()
    with lock.read():
        with pytest.raises(ConcurrentUseError, match="deadlock"):
            lock.acquire_write()
        with lock.read():                 # a recursive read is fine
            assert lock.readers == 2
    with lock.write():
        for fn in (lock.acquire_write, lock.acquire_read):
            with pytest.raises(ConcurrentUseError, match="deadlock"):
                fn()
    assert not lock.held


def test_releases_and_lockdep_are_per_thread():
    lock = MmuLock()
    with pytest.raises(LockNotHeldError):
        lock.release_read()
    with pytest.raises(LockNotHeldError):
        lock.release_write()
    with lock.write():
        kind, e = _in_thread(lock.release_write)
        assert kind == "raised" and isinstance(e, LockNotHeldError)
        kind, e = _in_thread(lock.lockdep_assert_held_write)
        assert kind == "raised" and isinstance(e, LockNotHeldError)
        lock.lockdep_assert_held_write()
        lock.lockdep_assert_held()
    with lock.read():
        kind, e = _in_thread(lock.release_read)
        assert kind == "raised" and isinstance(e, LockNotHeldError)
        kind, e = _in_thread(lock.lockdep_assert_held)
        assert kind == "raised" and isinstance(e, LockNotHeldError)
        lock.lockdep_assert_held()
        with pytest.raises(LockNotHeldError):
            lock.lockdep_assert_held_write()
    assert not lock.held


def test_counts_stay_exact_under_many_threads():
    lock = MmuLock()
    barrier, errors, writes = threading.Barrier(8), [], []

    def body(k):
        try:
            barrier.wait(10)
            for i in range(2000):
                if (i + k) % 50 == 0:
                    try:
                        with lock.write():
                            assert lock.readers == 0 and lock.writers == 1
                            writes.append(1)
                    except ConcurrentUseError:
                        pass
                else:
                    try:
                        with lock.read():
                            assert lock.writers == 0 and lock.readers >= 1
                    except ConcurrentUseError:
                        pass
        except BaseException as e:      # noqa: BLE001
            errors.append(e)

    ths = [threading.Thread(target=body, args=(k,)) for k in range(8)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    assert not errors and not lock.held and lock.readers == 0 and writes


# ---------------------------------------------------------------------------
# vCPU threads populating one VM under the read lock
# ---------------------------------------------------------------------------

def _vm():
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), nr_vcpus=3)
    vm.add_memory(0, 64 * MiB, slot=0, thp=True, populate=True)
    vm.add_memory(128 * MiB, 16 * MiB, slot=1, thp=False, populate=True)
    t = vm.register_mmu(TdpMmu(vm))
    for v in vm.vcpus:
        t.kvm_mmu_load(v)
    return vm, t


def _leaves(vm, t):
    out = {}
    for root in t.roots:
        for gfn, level, _, spte in TdpIter(vm.arena, root.sp, 0, 1 << 36):
            if vm.fmt.is_shadow_present_pte_array(np.array([spte], np.uint64))[0] and \
                    (level == 1 or (spte >> 7) & 1):
                out[(gfn, level)] = spte
    return out


def _faults(vm, gfns):
    """What map_memory computes before taking the lock: (gfns, pfns, level)
    batches, one fault per frame of the level the memslot and host allow."""
    out = []
    for sid in (0, 1):
        slot = vm.memslots[0].id_to_memslot(sid)
        g = gfns[(gfns >= slot.base_gfn) & (gfns < slot.base_gfn + slot.npages)]
        hva = np.uint64(slot.userspace_addr) + ((g - np.uint64(slot.base_gfn)) << np.uint64(PAGE_SHIFT))
        pfn, _ = vm.host.hva_to_pfn_array(hva)
        level = vm.kvm_mmu_max_mapping_level_array(slot, g)
        for lvl in np.unique(level):
            idx = np.flatnonzero(level == lvl)
            mask = np.uint64(KVM_PAGES_PER_HPAGE(int(lvl)) - 1)
            f, first = np.unique(g[idx] & ~mask, return_index=True)
            out.append((f, pfn[idx][first] & ~mask, int(lvl)))
    return out


def test_vcpu_threads_populating_under_the_read_lock_match_one_vcpu():
    rng = np.random.default_rng(5)
    every = np.concatenate([np.arange(0, 16384, dtype=np.uint64),
                            np.arange(32768, 36864, dtype=np.uint64)])
    ref_vm, ref_t = _vm()
    for sid in (0, 1):
        slot = ref_vm.memslots[0].id_to_memslot(sid)
        g = every[(every >= slot.base_gfn) & (every < slot.base_gfn + slot.npages)]
        ref_t.map_memory(ref_vm.vcpus[0], g, write=True)
    want = _leaves(ref_vm, ref_t)

    vm, t = _vm()
    shares = [np.sort(rng.choice(every, every.size * 2 // 3, replace=False)) for _ in range(3)]
    shares[0] = np.union1d(shares[0], np.setdiff1d(every, np.concatenate(shares)))
    plans = [_faults(vm, s) for s in shares]      # host lookups: one thread at a time
    barrier, errors = threading.Barrier(3), []

    def vcpu_thread(k):
        v = vm.vcpus[k]
        root = t.vcpu_root[v.index]
        try:
            barrier.wait(10)
            for g, p, lvl in plans[k]:
                while g.size:
                    with vm.mmu_lock.read():
                        r = t.core.map(root.sp, g, p, lvl, v.mmu_shadow_page_cache,
                                       v.mmu_page_header_cache, write=True)
                    assert set(r.tolist()) <= {RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_RETRY}
                    g, p = g[r == RET_PF_RETRY], p[r == RET_PF_RETRY]
        except BaseException as e:      # noqa: BLE001
            errors.append(e)

    ths = [threading.Thread(target=vcpu_thread, args=(k,)) for k in range(3)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    assert not errors, errors
    assert not vm.mmu_lock.held
    assert _leaves(vm, t) == want
    assert vm.arena.page_stats == ref_vm.arena.page_stats
    assert vm.arena.page_stats["pages_2m"] > 0 and vm.arena.page_stats["pages_4k"] > 0
    assert t.audit() == []
    vm.audit()
    # the write side is refused while a vCPU thread holds the read side
    with vm.mmu_lock.read():
        kind, e = _in_thread(vm.mmu_lock.acquire_write)
    assert kind == "raised" and isinstance(e, ConcurrentUseError)


def test_faulting_vcpu_threads_race_the_fast_zap_of_all_roots():
    """kvm_mmu_zap_all_fast invalidates the roots under the write lock and
    zaps them under the read lock, beside vCPU threads faulting through the
    common entry.  The checked MmuLock raises instead of waiting, so each
    side retries a refused lock.  At the end: no FROZEN SPTE, no leaked or
    early-freed table (audits clean after a grace period), every fault
    answered with a kernel result, and a last round of faults maps every gfn
    to the host's pfn."""
    vm = VM("tdp_mmu", host=HostConfig(tdp="ept"), nr_vcpus=2)
    vm.add_memory(0, 16 * MiB, slot=0, thp=True, populate=True)
    t = vm.mmu_backend
    for v in vm.vcpus:
        v.kvm_mmu_reload()
    stop, errors, results = threading.Event(), [], set()
    rng = np.random.default_rng(11)
    gfns = [rng.integers(0, 4096, 400).tolist() for _ in vm.vcpus]

    def vcpu_thread(k):
        v = vm.vcpus[k]
        try:
            while not stop.is_set():
                for g in gfns[k]:
                    try:
                        v.kvm_mmu_reload()          # frees obsolete roots, loads a new one
                        results.add(t.page_fault(v, g, write=bool(g & 1)))
                    except ConcurrentUseError:
                        pass                        # the zapper holds mmu_lock for write
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def zapper():
        try:
            done = 0
            while done < 20:
                try:
                    vm.kvm_mmu_zap_all_fast()
                    done += 1
                except ConcurrentUseError:
                    pass                            # a vCPU holds mmu_lock
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    ths = [threading.Thread(target=vcpu_thread, args=(k,)) for k in range(2)]
    ths.append(threading.Thread(target=zapper))
    for th in ths:
        th.start()
    for th in ths:
        th.join(120)
    assert not any(th.is_alive() for th in ths), "a thread hung"
    assert not errors, errors
    assert results <= {RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_RETRY}, results
    assert not vm.mmu_lock.held
    for v in vm.vcpus:
        v.kvm_mmu_reload()
    vm.arena.rcu_barrier()
    assert t.audit() == [] and vm.audit(raise_=False) == []
    v = vm.vcpus[0]
    for g in range(0, 4096, 97):
        assert t.page_fault(v, g) in (RET_PF_FIXED, RET_PF_SPURIOUS)
    sptes, levels = t.translate(v, np.arange(0, 4096, 97, dtype=np.uint64))
    slot = vm.memslots[0].id_to_memslot(0)
    g = np.arange(0, 4096, 97, dtype=np.uint64)
    pfn, _ = vm.host.hva_to_pfn_array(np.uint64(slot.userspace_addr) + (g << np.uint64(12)))
    base = vm.fmt.spte_to_pfn_array(sptes)
    off = g & ((np.uint64(1) << (np.uint64(9) * (levels.astype(np.uint64) - np.uint64(1)))) - np.uint64(1))
    assert (base + off == pfn).all()
    assert t.audit() == [] and vm.audit(raise_=False) == []
