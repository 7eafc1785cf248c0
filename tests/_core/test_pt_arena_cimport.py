"""pt_arena.pxd, mmu_spte.pxd and mmu_lockless.pxd are contracts other Cython
modules build against.

Compiles a consumer in a temporary directory that cimports the arena, the
SPTE helpers (mmu_spte) and the walk protocol (mmu_lockless), runs them
without the GIL, and checks the result against the Python wrappers (the
shadow and TDP MMU modules will use the arena exactly this way).
"""
import sys
import textwrap

import pytest

from cimport_consumer import build_consumer

CONSUMER = textwrap.dedent("""
    # cython: language_level=3
    from libc.stdint cimport uint64_t
    from kvmmmu._core.pt_arena cimport (
        PtArena, pt_arena_t, kvm_mmu_page, sptep_to_sp, pt_sptep_in_arena,
    )
    from kvmmmu._core.mmu_spte cimport (
        mmu_spte_set, mmu_spte_update, mmu_spte_get_lockless, mmu_spte_clear_track_bits,
    )
    from kvmmmu._core.mmu_lockless cimport (
        walk_shadow_page_lockless_begin, walk_shadow_page_lockless_end,
    )

    def cycle(PtArena arena, uint64_t sptep, uint64_t spte, uint64_t ro, int vcpu):
        cdef pt_arena_t *a = &arena.a
        cdef uint64_t got, old
        cdef bint flush
        cdef int count
        if not pt_sptep_in_arena(a, sptep):
            raise ValueError("not an arena sptep")
        with nogil:
            mmu_spte_set(a, sptep, spte)
            flush = mmu_spte_update(a, sptep, ro, NULL)
            walk_shadow_page_lockless_begin(a, vcpu)
            got = mmu_spte_get_lockless(a, sptep)
            walk_shadow_page_lockless_end(a, vcpu)
            old = mmu_spte_clear_track_bits(a, sptep, NULL)
            count = sptep_to_sp(a, sptep).clear_spte_count
        return got, flush, old, count
""")

@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cimport_arena")
    try:
        yield build_consumer(tmp, "arena_consumer", CONSUMER)
    finally:
        if str(tmp) in sys.path:
            sys.path.remove(str(tmp))


@pytest.mark.parametrize("host_64bit", [True, False])
def test_consumer_agrees_with_python(consumer, host_64bit):
    from kvmmmu._core.pt_arena import MmuMemoryCache, PtArena
    from kvmmmu._core.spte import SpteFormat
    fmt = SpteFormat.legacy(host_64bit=host_64bit)
    a = PtArena(fmt, tables_per_chunk=4, max_tables=16)
    pc, hc = MmuMemoryCache(a, "shadow_page"), MmuMemoryCache(a, "page_header")
    pc.topup(1)
    hc.topup(1)
    sp = a.alloc_sp(pc, hc, role=1)
    s = a.sp_sptep(sp, 17)
    spte = fmt.make_spte(level=1, pte_access=7, pfn=0x123456789)[0]
    ro = spte & ~(2 | fmt.shadow_mmu_writable_mask)
    got, flush, old, count = consumer.cycle(a, s, spte, ro, 0)
    assert (got, flush, old) == (ro, True, ro)
    assert count == (0 if host_64bit else 1)
    assert a.mmu_spte_get_lockless(s) == fmt.SHADOW_NONPRESENT_VALUE
    assert a.page_stats["pages_4k"] == -1
    a.audit()
