"""role.pxd is a usable contract: a separate Cython module can cimport it.

Builds a small consumer extension in a temporary directory (as numpy's
test_extending does) and checks what it computes against hand-written words.
"""
import sys
import textwrap

from cimport_consumer import build_consumer

CONSUMER = textwrap.dedent("""
    from libc.stdint cimport uint32_t
    from kvmmmu._core.role cimport (
        role_level, role_access, role_smm, role_set_invalid, role_set_smm,
        mmu_child_role_word, role_sync_mismatch_word, calc_cpu_role,
        cpu_role_base, cpu_role_ext, page_role_from_word, KvmMmuPageRole,
        X86_CR0_PG, X86_CR0_WP, X86_CR4_PAE, EFER_LMA, EFER_NX, SYNC_ROLE_IGN_WORD,
    )

    def run():
        cdef uint32_t w = 0x3784
        cdef KvmMmuPageRole r
        with nogil:
            cpu = calc_cpu_role(X86_CR0_PG | X86_CR0_WP, X86_CR4_PAE, EFER_LMA | EFER_NX, 0, False)
            child = mmu_child_role_word(0x3752, 7, False, 5)
        r = page_role_from_word(role_set_smm(w, 1))
        return (role_level(w), role_access(w), role_set_invalid(w, True), child,
                cpu_role_base(cpu), cpu_role_ext(cpu), r.word, role_smm(r.word),
                role_sync_mismatch_word(0x3511, 0x3713), SYNC_ROLE_IGN_WORD)
""")

def test_cimport_role_from_another_module(tmp_path):
    try:
        consumer = build_consumer(tmp_path, "role_consumer", CONSUMER)
        assert consumer.run() == (4, 7, 0x3F84, 0x3531, 0x3704, 0x81, 0x01003784, 1,
                                  False, 0x4076F)
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
