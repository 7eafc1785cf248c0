"""spte.pxd is a contract other Cython modules build against.

Compiles a small consumer module in a temporary directory that cimports the
inline helpers and the format struct, then checks it agrees with the Python
wrappers.  This is how the rmap, arena and TDP modules will use the core.
"""
import sys
import textwrap

import pytest

from cimport_consumer import build_consumer

CONSUMER = textwrap.dedent("""
    # cython: language_level=3
    from libc.stdint cimport uint64_t
    from kvmmmu._core.spte cimport (SpteFormat, spte_fmt_t, is_shadow_present_pte, make_spte,
                                    spte_to_pfn, MKSPTE_HOST_WRITABLE, PG_LEVEL_4K, ACC_ALL)

    def leaf(SpteFormat fmt, uint64_t pfn):
        cdef bint wrprot
        cdef uint64_t spte
        with nogil:
            spte = make_spte(&fmt.fmt, PG_LEVEL_4K, ACC_ALL, pfn, fmt.fmt.nonpresent_value,
                             MKSPTE_HOST_WRITABLE, &wrprot)
        return spte, is_shadow_present_pte(spte), spte_to_pfn(spte)
""")

@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cimport")
    try:
        yield build_consumer(tmp, "consumer", CONSUMER)
    finally:
        if str(tmp) in sys.path:
            sys.path.remove(str(tmp))


def test_consumer_agrees_with_python(consumer):
    from kvmmmu._core.spte import SpteFormat
    fmt = SpteFormat.ept()
    spte, present, pfn = consumer.leaf(fmt, 0x123456)
    assert spte == fmt.make_spte(level=1, pte_access=7, pfn=0x123456)[0] == 0x8600000123456B77
    assert present and pfn == 0x123456


BUILDERS = textwrap.dedent("""
    # cython: language_level=3
    from libc.stdint cimport uint64_t
    from kvmmmu._core.spte cimport (SpteFormat, make_mmio_spte, mark_spte_for_access_track,
                                    restore_acc_track_spte, make_small_spte, make_huge_spte,
                                    make_nonleaf_spte, make_spte_wants_unsync, get_mmio_spte_gfn,
                                    spte_needs_atomic_update, PG_LEVEL_4K, ACC_ALL,
                                    MKSPTE_HOST_WRITABLE)

    def builders(SpteFormat fmt, uint64_t huge, uint64_t leaf):
        cdef uint64_t mmio, aged
        with nogil:
            mmio = make_mmio_spte(&fmt.fmt, 0x42, 6, 3)
            aged = mark_spte_for_access_track(&fmt.fmt, leaf)
        return (mmio, get_mmio_spte_gfn(&fmt.fmt, mmio), aged,
                restore_acc_track_spte(&fmt.fmt, aged),
                make_small_spte(&fmt.fmt, huge, PG_LEVEL_4K, 5, ACC_ALL, True),
                make_huge_spte(&fmt.fmt, leaf, 2, False),
                make_nonleaf_spte(&fmt.fmt, 0x5000, False),
                make_spte_wants_unsync(PG_LEVEL_4K, ACC_ALL, fmt.fmt.nonpresent_value,
                                       MKSPTE_HOST_WRITABLE),
                spte_needs_atomic_update(&fmt.fmt, leaf))
""")


def test_builders_reach_other_modules_through_the_capsule(tmp_path):
    # The builders are defined once in spte.pyx and exported through its
    # C-API capsule; a consumer module gets the same results as Python.
    from kvmmmu._core.spte import SpteFormat
    try:
        mod = build_consumer(tmp_path, "builders_consumer", BUILDERS)
        fmt = SpteFormat.ept(ad_bits=False)
        huge, _ = fmt.make_spte(level=2, pte_access=7, pfn=512, nx_huge_pages=True,
                                ad_disabled=True)
        leaf, _ = fmt.make_spte(level=1, pte_access=7, pfn=0x777, ad_disabled=True)
        got = mod.builders(fmt, huge, leaf)
        aged = fmt.mark_spte_for_access_track(leaf)
        assert got == (fmt.make_mmio_spte(0x42, 6, 3), 0x42, aged,
                       fmt.restore_acc_track_spte(aged),
                       fmt.make_small_spte(huge, 1, 5, 7, nx_huge_pages=True),
                       fmt.make_huge_spte(leaf, 2), fmt.make_nonleaf_spte(0x5000),
                       fmt.make_spte_wants_unsync(level=1, pte_access=7),
                       fmt.spte_needs_atomic_update(leaf))
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
