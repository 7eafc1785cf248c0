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
