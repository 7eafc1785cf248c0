"""Hostile use of the VM layer's public API (issue 10): every bad argument is
a specific exception naming the argument, and leaves the VM unchanged (its
snapshot equal, its audit clean); no negative index wraps through numpy; a
float is never truncated; numpy integers are real integers.  The whole
battery also runs in a fresh interpreter, so a crash is a test failure.
Then the thread-safety contract: ioctls are serialized by ``vm.api_lock``;
``mmu_lock`` refuses a second holder instead of letting two threads in.
"""
import threading
import time

import numpy as np
import pytest

from _probe import assert_no_crash

from kvmmmu import memslots as M
from kvmmmu.host import HostConfig
from kvmmmu.vm import VM

MiB = 1 << 20
U64 = (1 << 64) - 1


def _vm():
    vm = VM("tdp_mmu", vm_type="sw_protected", host=HostConfig(tdp="ept"))
    s = vm.add_memory(4 * MiB, 4 * MiB, thp=True, populate=True)          # gfns 0x400..0x7ff
    vm.set_user_memory_region(1, M.KVM_MEM_LOG_DIRTY_PAGES, 16 * MiB, 0x41000,
                              vm.host.mmap(0x41000))                      # 65 pages
    vm.enable_manual_dirty_log_protect(M.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    vm.mark_page_dirty(np.array([0x1000, 0x1001, 0x1040], dtype=np.uint64))
    return vm, s


BM = np.array([U64, 1], dtype=np.uint64)

# (id, call, exception, text the message must contain)
CASES = [
    ("clear_dirty_log-negative-first_page",
     lambda vm, s: vm.clear_dirty_log(1, -64, 64, BM), ValueError, "first_page"),
    ("clear_dirty_log-float-first_page",
     lambda vm, s: vm.clear_dirty_log(1, 0.0, 64, BM), TypeError, "first_page"),
    ("clear_dirty_log-negative-num_pages",
     lambda vm, s: vm.clear_dirty_log(1, 0, -1, BM), ValueError, "num_pages"),
    ("clear_dirty_log-list-bitmap",
     lambda vm, s: vm.clear_dirty_log(1, 0, 65, [U64, 1]), TypeError, "bitmap"),
    ("clear_dirty_log-float-bitmap",
     lambda vm, s: vm.clear_dirty_log(1, 0, 65, np.ones(2)), TypeError, "bitmap"),
    ("get_dirty_log-negative-slot", lambda vm, s: vm.get_dirty_log(-1), ValueError, "slot"),
    ("get_dirty_log-float-slot", lambda vm, s: vm.get_dirty_log(1.0), TypeError, "slot"),
    ("set_region-float-size",
     lambda vm, s: vm.set_user_memory_region(2, 0, 32 * MiB, 2.0 * MiB, 0x7E00_0000_0000),
     TypeError, "memory_size"),
    ("set_region-negative-gpa",
     lambda vm, s: vm.set_user_memory_region(2, 0, -4096, 2 * MiB, 0x7E00_0000_0000),
     ValueError, "guest_phys_addr"),
    ("set_region-negative-slot",
     lambda vm, s: vm.set_user_memory_region(-1, 0, 32 * MiB, 2 * MiB, 0x7E00_0000_0000),
     ValueError, "slot"),
    ("set_region-float-flags",
     lambda vm, s: vm.set_user_memory_region(2, 1.0, 32 * MiB, 2 * MiB, 0x7E00_0000_0000),
     TypeError, "flags"),
    ("set_region-str-hva",
     lambda vm, s: vm.set_user_memory_region(2, 0, 32 * MiB, 2 * MiB, "0x7E00_0000_0000"),
     TypeError, "userspace_addr"),
    ("set_attrs-float-size",
     lambda vm, s: vm.set_memory_attributes(4 * MiB, 4096.0, 8), TypeError, "size"),
    ("set_attrs-negative-address",
     lambda vm, s: vm.set_memory_attributes(-4096, 4096, 8), ValueError, "address"),
    ("mark_dirty-float", lambda vm, s: vm.mark_page_dirty(0x1000 + 0.5), TypeError, "gfn"),
    ("mark_dirty-list", lambda vm, s: vm.mark_page_dirty([0x1000]), TypeError, "gfn"),
    ("mark_dirty-signed-array",
     lambda vm, s: vm.mark_page_dirty(np.array([0x1000, -1])), TypeError, "gfn"),
    ("mark_dirty-outside",
     lambda vm, s: vm.mark_page_dirty(np.array([0x1000, 0x1041], dtype=np.uint64)),
     ValueError, "gfn"),
    ("mark_dirty-negative-as_id", lambda vm, s: vm.mark_page_dirty(0x1000, as_id=-1),
     ValueError, "as_id"),
    ("gfn_to_memslot-negative-as_id", lambda vm, s: vm.gfn_to_memslot(0x400, as_id=-1),
     ValueError, "as_id"),
    ("delete_memslot-negative-as_id", lambda vm, s: vm.delete_memslot(0, as_id=-1),
     ValueError, "as_id"),
    ("create_vcpu-float", lambda vm, s: vm.create_vcpu(1.5), TypeError, "vcpu_id"),
    ("guest_memfd-float-size", lambda vm, s: vm.create_guest_memfd(4096.0), TypeError, "size"),
    ("manual_protect-float", lambda vm, s: vm.enable_manual_dirty_log_protect(1.0),
     TypeError, "flags"),
    ("faultin-float-gfn", lambda vm, s: vm.kvm_mmu_faultin_pfn(vm.vcpus[0], 0x400 + 0.5),
     TypeError, "gfn"),
    ("faultin-negative-gfn", lambda vm, s: vm.kvm_mmu_faultin_pfn(vm.vcpus[0], -1),
     ValueError, "gfn"),
    ("max_level-below-slot", lambda vm, s: vm.kvm_mmu_max_mapping_level(s, 0x3FF),
     ValueError, "outside the slot"),
    ("max_level-float-gfn", lambda vm, s: vm.kvm_mmu_max_mapping_level(s, 0x400 + 0.5),
     TypeError, "gfn"),
    ("max_level-float-max_level", lambda vm, s: vm.kvm_mmu_max_mapping_level(s, 0x400, 2.5),
     TypeError, "max_level"),
    ("max_level_array-list",
     lambda vm, s: vm.kvm_mmu_max_mapping_level_array(s, [0x400]), TypeError, "gfns"),
    ("disallow_lpage-below-slot", lambda vm, s: vm.kvm_mmu_gfn_disallow_lpage(s, 0x3FF),
     ValueError, "outside the slot"),
    ("gfn_to_memslot_array-list",
     lambda vm, s: vm.memslots[0].gfn_to_memslot_array([0x400]), TypeError, "gfns"),
    ("gfn_to_hva_array-below-slot",
     lambda vm, s: s.gfn_to_hva_array(np.array([0x3FF], dtype=np.uint64)), ValueError, "gfns"),
    ("get_array-negative",
     lambda vm, s: vm.mem_attrs.get_array(np.array([3, -1])), ValueError, "gfns"),
    ("get_array-float",
     lambda vm, s: vm.mem_attrs.get_array(np.array([3.0])), TypeError, "gfns"),
    ("register_mmu-not-a-backend", lambda vm, s: vm.register_mmu(object()), TypeError,
     "MmuBackend"),
]


@pytest.mark.parametrize("call,exc,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_refused_and_changes_nothing(call, exc, text):
    vm, s = _vm()
    before = vm.snapshot()
    lpage = [a.copy() for a in s.lpage_info]
    bitmap = vm.memslots[0].id_to_memslot(1).dirty_bitmap.copy()
    with pytest.raises(exc, match=text):
        call(vm, s)
    assert vm.snapshot() == before
    assert all((x == y).all() for x, y in zip(lpage, s.lpage_info))
    assert (vm.memslots[0].id_to_memslot(1).dirty_bitmap == bitmap).all()
    assert vm.audit(raise_=False) == []


def test_the_battery_runs_in_a_fresh_interpreter_without_a_crash():
    """The same calls in a child process: a crash would kill the child, not the run."""
    assert_no_crash("""
        import sys
        sys.path.insert(0, %r)
        import pytest
        import test_vm_hardening as T
        for name, call, exc, text in T.CASES:
            vm, s = T._vm()
            before = vm.snapshot()
            with pytest.raises(exc, match=text):
                call(vm, s)
            assert vm.snapshot() == before, name
            assert vm.audit(raise_=False) == [], name
    """ % (str(__import__("pathlib").Path(__file__).parent),), allow_raise=False)


def test_clear_dirty_log_first_page_minus_64_does_not_clear_the_last_word():
    # The old code indexed bm[-1 + k]: the last word was cleared and re-protected.
    vm, _ = _vm()
    t = vm.memslots[0].id_to_memslot(1)
    assert t.dirty_bitmap.tolist() == [0b11, 1]
    with pytest.raises(ValueError, match="first_page"):
        vm.clear_dirty_log(1, -64, 64, np.array([U64], dtype=np.uint64))
    assert t.dirty_bitmap.tolist() == [0b11, 1]


def test_numpy_integers_are_integers():
    """np.uint64 / np.int64 arguments go through operator.index: the same
    result as Python ints, never a float or a wrapped value."""
    a, _ = _vm()
    b, _ = _vm()
    u, i = np.uint64, np.int64
    a.set_user_memory_region(2, 0, 32 * MiB, 2 * MiB, 0x7E00_0000_0000)
    b.set_user_memory_region(u(2), u(0), u(32 * MiB), i(2 * MiB), u(0x7E00_0000_0000))
    a.clear_dirty_log(1, 0, 65, np.array([0b10, 1], dtype=np.uint64))
    b.clear_dirty_log(u(1), u(0), i(65), np.array([0b10, 1], dtype=np.uint64))
    a.set_memory_attributes(4 * MiB, 2 * MiB, 8)
    b.set_memory_attributes(u(4 * MiB), i(2 * MiB), u(8))
    assert a.snapshot() == b.snapshot()
    assert a.kvm_mmu_faultin_pfn(a.vcpus[0], 0x600).pfn == \
        b.kvm_mmu_faultin_pfn(b.vcpus[0], u(0x600)).pfn
    assert a.audit(raise_=False) == [] and b.audit(raise_=False) == []


def test_the_audit_notices_a_corrupted_lpage_counter():
    """What the old gfn-below-the-slot bug did (numpy's index -1 is the slot's
    last frame): one counter off by one, with no disallow_lpage to account
    for it.  Runtime counts are accounted by the ledger and pass."""
    vm, s = _vm()
    vm.kvm_mmu_gfn_disallow_lpage(s, 0x605)
    assert vm.audit(raise_=False) == []
    s.lpage_info[0][-1] += 1
    problems = vm.audit(raise_=False)
    assert any("disallow_lpage count" in p for p in problems), problems
    s.lpage_info[0][-1] -= 1
    vm.kvm_mmu_gfn_allow_lpage(s, 0x605)
    assert vm.audit(raise_=False) == []


def test_moved_names_still_answer_from_memslots():
    vm, s = _vm()
    g = np.arange(0x400, 0x800, dtype=np.uint64)
    assert (M.kvm_mmu_max_mapping_level_array(vm, s, g) ==
            vm.kvm_mmu_max_mapping_level_array(s, g)).all()
    assert M.kvm_mmu_max_mapping_level(vm, s, 0x400) == vm.kvm_mmu_max_mapping_level(s, 0x400)
    with pytest.raises(AttributeError):
        M.no_such_name


# --------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------

def test_ioctls_wait_for_the_api_lock():
    vm, _ = _vm()
    done = threading.Event()

    def other():
        vm.set_memory_attributes(4 * MiB, 2 * MiB, 8)
        done.set()

    with vm.api_lock:
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.1)
        assert not done.is_set()                 # blocked behind this thread's ioctl
    t.join(10)
    assert done.is_set() and vm.mem_attrs.get(0x400) == 8
    assert vm.audit(raise_=False) == []


def test_a_memslot_update_waits_for_another_threads_invalidation():
    """kvm_swap_active_memslots waits until mn_active_invalidate_count is 0:
    an invalidation opened by another thread delays the update until it ends;
    one opened by the calling thread (it would wait for itself) or a wait
    past ``memslot_wait_timeout`` refuses before changing anything."""
    vm, s = _vm()
    rng = vm.host.invalidate_begin(s.userspace_addr, s.userspace_addr + MiB)
    before = vm.snapshot()
    with pytest.raises(M.MemslotUpdateWouldBlockError, match="1 MMU-notifier"):
        vm.set_user_memory_region(5, 0, 64 * MiB, 2 * MiB, 0x7E00_0000_0000)
    assert vm.snapshot() == before
    vm.host.invalidate_end(rng)

    opened, done = threading.Event(), []
    release = threading.Event()

    def host():
        r = vm.host.invalidate_begin(s.userspace_addr, s.userspace_addr + MiB)
        opened.set()
        release.wait(10)
        vm.host.invalidate_end(r)

    t = threading.Thread(target=host)
    t.start()
    opened.wait(10)
    u = threading.Thread(target=lambda: done.append(
        vm.set_user_memory_region(5, 0, 64 * MiB, 2 * MiB, 0x7E00_0000_0000)))
    u.start()
    time.sleep(0.2)
    assert not done and vm.memslots[0].id_to_memslot(5) is None       # waiting
    release.set()
    t.join(10)
    u.join(10)
    assert done == [M.KvmMrChange.KVM_MR_CREATE] and vm.memslots[0].id_to_memslot(5)
    assert vm.notifier.mn_active_invalidate_count == 0 and vm.audit(raise_=False) == []

    # a wait that times out refuses and changes nothing
    opened.clear()
    release.clear()
    t = threading.Thread(target=host)
    t.start()
    opened.wait(10)
    vm.memslot_wait_timeout = 0.05
    before = vm.snapshot()
    with pytest.raises(M.MemslotUpdateWouldBlockError):
        vm.delete_memslot(5)
    assert vm.snapshot() == before
    release.set()
    t.join(10)


def test_mmu_lock_refuses_a_second_thread():
    vm, _ = _vm()
    got = []
    with vm.mmu_lock.write():
        t = threading.Thread(target=lambda: got.append(_try(vm.mmu_lock.acquire_write)))
        t.start()
        t.join(10)
    assert got and isinstance(got[0], RuntimeError)
    assert not vm.mmu_lock.held


def _try(f):
    try:
        f()
    except Exception as e:      # noqa: BLE001 - the test inspects it
        return e
    return None


def test_ioctls_and_host_events_from_several_threads_keep_the_vm_consistent():
    vm, s = _vm()
    errors = []

    def attrs():
        try:
            for k in range(150):
                vm.set_memory_attributes(4 * MiB + (k % 8) * 4096, 4096 * (1 + k % 5), 8 * (k & 1))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def slots():
        try:
            for _ in range(60):
                vm.set_user_memory_region(5, 0, 64 * MiB, 2 * MiB, 0x7E00_0000_0000)
                vm.delete_memslot(5)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def host():
        try:
            for k in range(150):
                vm.host.age(s.userspace_addr, 4 * MiB)
                a = s.userspace_addr + (k % 4) * MiB
                vm.host.invalidate_end(vm.host.invalidate_begin(a, a + MiB))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=f) for f in (attrs, slots, host)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    assert vm.audit(raise_=False) == []
    assert vm.notifier.mmu_invalidate_in_progress == 0
