"""The auditor of the page-table arena (:meth:`PtArena.audit`).

Recounts every page and header slot state, walks the FIFO free lists and the
RCU list, checks each live header against its pages (and back), and with
``contents`` scans page and header bytes: poison in free slots, fill values
in cached ones, no poison and no link to a dead page in live tables.  The
invariants are those of the pt_arena module docstring.  It reads the arena's
C state directly and must run with no writer active (the caller holds
mmu_lock, as kvm_mmu_audit would).
"""
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memset

from kvmmmu._core.pt_arena_defs cimport (
    pt_arena_t, pt_slot_meta, kvm_mmu_page, pt_slot, pt_sp_ptr, pt_table_ptr,
    PT_PAGE_FREE, PT_PAGE_CACHED, PT_PAGE_SPT, PT_PAGE_INFO, PT_PAGE_CACHED_INFO,
    PT_SP_FREE, PT_SP_CACHED, PT_SP_IN_USE, PT_SP_RCU_PENDING, PT_POISON, PT_POISON_BYTE,
    PT_ROLE_LEVEL_MASK,
)
from kvmmmu._core.spte cimport PT64_ROOT_MAX_LEVEL, is_large_pte, is_shadow_present_pte, spte_to_pfn

#: Page and header slot states (see :meth:`PtArena.table_states`).
PAGE_STATES = {PT_PAGE_FREE: "free", PT_PAGE_CACHED: "cached", PT_PAGE_SPT: "spt",
               PT_PAGE_INFO: "info", PT_PAGE_CACHED_INFO: "cached_info"}
SP_STATES = {PT_SP_FREE: "free", PT_SP_CACHED: "cached", PT_SP_IN_USE: "in_use",
             PT_SP_RCU_PENDING: "rcu_pending"}


class PtArenaAuditError(AssertionError):
    """:meth:`PtArena.audit` found broken arena invariants (one per line)."""


cdef object audit_arena(pt_arena_t *a, uint64_t n_buffers, bint contents):
    """Check the arena invariants (module docstring); raise
    PtArenaAuditError listing every violation found (up to 64).

    `contents` also scans page and header bytes (poison in free slots,
    fill values in cached ones, no poison and no link to a dead page in
    live tables).  Call it with no lockless writer running.  Returns the
    recounted states as a dict.
    """
    cdef uint64_t T = a.tables_per_chunk, cap = a.n_chunks * T
    cdef uint64_t i, j, k, n, sp, pfn, tidx, prev_gp, target, lvl
    cdef uint64_t cnt_page[6]
    cdef uint64_t cnt_sp[5]
    cdef uint64_t *t
    cdef uint64_t e
    cdef uint8_t *b
    cdef pt_slot_meta *m
    cdef kvm_mmu_page *h
    cdef uint8_t st
    problems = []

    def bad(msg):
        if len(problems) < 64:
            problems.append(msg)

    memset(cnt_page, 0, sizeof(cnt_page))
    memset(cnt_sp, 0, sizeof(cnt_sp))
    if a.n_chunks > a.max_chunks or <uint64_t>n_buffers != a.n_chunks:
        bad(f"n_chunks={a.n_chunks} (max {a.max_chunks}, {n_buffers} buffers)")
    for i in range(a.max_chunks):
        if (a.chunk_base[i] != NULL) != (i < a.n_chunks):
            bad(f"chunk directory entry {i} is {'set' if a.chunk_base[i] else 'NULL'}")
    if a.tables_hw > cap or a.headers_hw > cap:
        bad(f"high-water marks {a.tables_hw}/{a.headers_hw} beyond capacity {cap}")
        raise PtArenaAuditError("\n".join(problems))
    # Page slots.
    for i in range(a.tables_hw):
        st = pt_slot(a, i).table_state
        if 1 <= st <= 5:
            cnt_page[st] += 1
        else:
            bad(f"page {i}: bad state {st}")
    for name, idx, want in (("free", PT_PAGE_FREE, a.n_free_tables),
                            ("cached", -1, a.n_cached_tables),
                            ("spt", PT_PAGE_SPT, a.n_spt), ("info", PT_PAGE_INFO, a.n_info)):
        have = cnt_page[PT_PAGE_CACHED] + cnt_page[PT_PAGE_CACHED_INFO] if idx < 0 else cnt_page[idx]
        if have != want:
            bad(f"{have} {name} pages, counter says {want}")
    # Page free list: FIFO, exactly the free pages.
    n = 0
    k = a.table_free_head
    j = 0
    while k != 0 and n <= a.tables_hw:
        if k > a.tables_hw:
            bad(f"page free list links to {k - 1}, beyond the high-water mark")
            break
        if pt_slot(a, k - 1).table_state != PT_PAGE_FREE:
            bad(f"page {k - 1} on the free list is {PAGE_STATES.get(pt_slot(a, k - 1).table_state)}")
        n += 1
        j = k
        k = pt_slot(a, k - 1).table_next
    if n != a.n_free_tables or j != a.table_free_tail:
        bad(f"page free list: {n} entries ending at {j}, expected {a.n_free_tables} "
            f"ending at {a.table_free_tail}")
    # Header slots.
    for i in range(a.headers_hw):
        st = pt_slot(a, i).sp_state
        if 1 <= st <= 4:
            cnt_sp[st] += 1
        else:
            bad(f"header {i + 1}: bad state {st}")
    for name, idx, want in (("free", PT_SP_FREE, a.n_free_sps),
                            ("cached", PT_SP_CACHED, a.n_cached_sps),
                            ("in-use", PT_SP_IN_USE, a.n_sps),
                            ("rcu-pending", PT_SP_RCU_PENDING, a.n_rcu_pending)):
        if cnt_sp[idx] != want:
            bad(f"{cnt_sp[idx]} {name} headers, counter says {want}")
    n = 0
    k = a.sp_free_head
    j = 0
    while k != 0 and n <= a.headers_hw:
        if k > a.headers_hw:
            bad(f"header free list links to {k}, beyond the high-water mark")
            break
        if pt_slot(a, k - 1).sp_state != PT_SP_FREE:
            bad(f"header {k} on the free list is {SP_STATES.get(pt_slot(a, k - 1).sp_state)}")
        n += 1
        j = k
        k = pt_slot(a, k - 1).sp_next
    if n != a.n_free_sps or j != a.sp_free_tail:
        bad(f"header free list: {n} entries ending at {j}, expected {a.n_free_sps} "
            f"ending at {a.sp_free_tail}")
    # RCU list: pending headers in grace-period order.
    n = 0
    k = a.rcu_head
    j = 0
    prev_gp = 0
    while k != 0 and n <= a.headers_hw:
        if k > a.headers_hw or pt_slot(a, k - 1).sp_state != PT_SP_RCU_PENDING:
            bad(f"RCU list holds sp {k}, which is not RCU-pending")
            break
        h = pt_sp_ptr(a, k)
        if h.rcu_gp < prev_gp or h.rcu_gp > a.rcu_gp_seq:
            bad(f"RCU list out of order at sp {k} (gp {h.rcu_gp} after {prev_gp})")
        prev_gp = h.rcu_gp
        n += 1
        j = k
        k = h.rcu_next
    if n != a.n_rcu_pending or j != a.rcu_tail:
        bad(f"RCU list: {n} entries ending at {j}, expected {a.n_rcu_pending} "
            f"ending at {a.rcu_tail}")
    # Live headers <-> their pages.
    for sp in range(1, a.headers_hw + 1):
        st = pt_slot(a, sp - 1).sp_state
        h = pt_sp_ptr(a, sp)
        if st == PT_SP_IN_USE or st == PT_SP_RCU_PENDING:
            for what, pfn, want_st in (("spt", h.spt, PT_PAGE_SPT),
                                       ("shadowed_translation", h.shadowed_translation,
                                        PT_PAGE_INFO)):
                if pfn == 0 and what == "shadowed_translation":
                    continue
                if pfn < a.base_pfn or pfn - a.base_pfn >= a.tables_hw:
                    bad(f"sp {sp}: {what} pfn {pfn:#x} is not an arena page")
                    continue
                m = pt_slot(a, pfn - a.base_pfn)
                if m.table_state != want_st or m.table_sp != sp:
                    bad(f"sp {sp}: {what} page {pfn - a.base_pfn} is "
                        f"{PAGE_STATES.get(m.table_state)} owned by sp {m.table_sp}")
            # An RCU-pending header's rcu_head shares these bytes.
            if a.host_64bit and st == PT_SP_IN_USE and h.clear_spte_count != 0:
                bad(f"sp {sp}: clear_spte_count={h.clear_spte_count} on a 64-bit host")
        elif contents:
            b = <uint8_t *>h
            for k in range(sizeof(kvm_mmu_page)):
                if b[k] != (PT_POISON_BYTE if st == PT_SP_FREE else 0):
                    bad(f"sp {sp}: {SP_STATES.get(st)} header is not "
                        f"{'poisoned' if st == PT_SP_FREE else 'zeroed'}")
                    break
    for i in range(a.tables_hw):
        m = pt_slot(a, i)
        if m.table_state == PT_PAGE_SPT or m.table_state == PT_PAGE_INFO:
            sp = m.table_sp
            if sp == 0 or sp > a.headers_hw:
                bad(f"page {i}: owner sp {sp} is not a header")
                continue
            st = pt_slot(a, sp - 1).sp_state
            h = pt_sp_ptr(a, sp)
            pfn = a.base_pfn + i
            if st not in (PT_SP_IN_USE, PT_SP_RCU_PENDING) or \
                    (h.spt if m.table_state == PT_PAGE_SPT else h.shadowed_translation) != pfn:
                bad(f"page {i}: owner sp {sp} ({SP_STATES.get(st)}) does not point back")
    if contents:
        _audit_contents(a, bad)
    # vCPUs.
    for i in range(<uint64_t>a.nr_vcpus):
        if (a.vcpus[i].rcu_nesting == 0) != (a.vcpus[i].rcu_gp == 0):
            bad(f"vCPU {i}: rcu_nesting={a.vcpus[i].rcu_nesting} but rcu_gp={a.vcpus[i].rcu_gp}")
    if problems:
        raise PtArenaAuditError("\n".join(problems))
    return dict(free_tables=cnt_page[PT_PAGE_FREE],
                cached_tables=cnt_page[PT_PAGE_CACHED] + cnt_page[PT_PAGE_CACHED_INFO],
                spt_tables=cnt_page[PT_PAGE_SPT], info_tables=cnt_page[PT_PAGE_INFO],
                free_sps=cnt_sp[PT_SP_FREE], cached_sps=cnt_sp[PT_SP_CACHED],
                sps=cnt_sp[PT_SP_IN_USE], rcu_pending=cnt_sp[PT_SP_RCU_PENDING])

cdef _audit_contents(pt_arena_t *a, bad):
    cdef uint64_t i, j, e, pfn, lvl, np_val = a.fmt.nonpresent_value, child
    cdef uint64_t *t
    cdef uint8_t st, cst
    cdef int reported
    for i in range(a.tables_hw):
        st = pt_slot(a, i).table_state
        t = pt_table_ptr(a, i)
        reported = 0
        if st == PT_PAGE_FREE:
            for j in range(512):
                if t[j] != PT_POISON:
                    bad(f"free page {i} entry {j} = {t[j]:#x}: written after free")
                    break
        elif st == PT_PAGE_CACHED:
            for j in range(512):
                if t[j] != np_val:
                    bad(f"cached page {i} entry {j} = {t[j]:#x}, not SHADOW_NONPRESENT_VALUE")
                    break
        elif st == PT_PAGE_CACHED_INFO:
            for j in range(512):
                if t[j] != 0:
                    bad(f"cached shadowed-info page {i} entry {j} = {t[j]:#x}, not 0")
                    break
        elif st == PT_PAGE_SPT:
            lvl = pt_sp_ptr(a, pt_slot(a, i).table_sp).role & PT_ROLE_LEVEL_MASK \
                if pt_slot(a, i).table_sp else 0
            for j in range(512):
                e = t[j]
                if e == PT_POISON:
                    bad(f"live table {i} entry {j} holds poison")
                    break
                if lvl < 2 or lvl > PT64_ROOT_MAX_LEVEL or not is_shadow_present_pte(e) \
                        or is_large_pte(e):
                    continue
                pfn = spte_to_pfn(e)
                if pfn < a.base_pfn or pfn - a.base_pfn >= a.max_chunks * a.tables_per_chunk:
                    continue
                if pfn - a.base_pfn >= a.tables_hw:
                    bad(f"table {i} entry {j} links to page {pfn - a.base_pfn}, never allocated")
                    continue
                cst = pt_slot(a, pfn - a.base_pfn).table_state
                child = pt_slot(a, pfn - a.base_pfn).table_sp
                if cst != PT_PAGE_SPT or pt_slot(a, child - 1).sp_state != PT_SP_IN_USE:
                    bad(f"table {i} entry {j} links to page {pfn - a.base_pfn}, which is "
                        f"{PAGE_STATES.get(cst)} (sp {child} "
                        f"{SP_STATES.get(pt_slot(a, child - 1).sp_state) if child else '-'})")
