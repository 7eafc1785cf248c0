"""The C half of the TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c), over one arena.

Every SPTE change goes through one of two setters and then through
``handle_changed_spte``, as in the kernel:

* ``tdp_mmu_set_spte_atomic`` (mmu_lock held for read): ``try_cmpxchg64``
  against the iterator's ``old_spte``; a lost race returns -EBUSY and
  refreshes ``old_spte`` with the current value;
* ``tdp_mmu_set_spte`` (mmu_lock held for write): a plain store, or ``xchg``
  when the old SPTE is a present leaf whose A/D or W bits others may set;
* ``handle_changed_spte``: the page statistics (``pages_4k/2m/1g`` move only
  when an entry stops or starts being a leaf), and, when a present non-leaf
  goes away, ``handle_removed_pt`` on the table it pointed to: every entry
  of that table is frozen (``FROZEN_SPTE``; under the read lock by ``xchg``;
  the kernel waits out another thread's freeze there, the model, with one
  writer per arena, counts a FROZEN entry as a corrupted table), handled
  recursively, and the table
  is freed after an RCU grace period.  A present leaf never changes pfn
  (the kernel BUG()s; the model counts ``TDP_BUG_PFN_CHANGED``).

``kvm_tdp_mmu_map`` is the fault path's walk: down to ``goal_level``,
linking a new table where an entry is empty and splitting a huge leaf in
place where the goal is lower (``tdp_mmu_split_huge_page``); at the goal,
the leaf from ``make_spte``, or RET_PF_SPURIOUS when the existing leaf
already allows the access.  ``tdp_mmu_zap_leafs`` and ``tdp_mmu_zap_root``
are the write-locked zaps.

Not modelled yet in this module: the NX huge page list and
``disallowed_hugepage_adjust``, MMIO SPTEs (no memslot), mirror roots, and
concurrent writers (the model's RCU and page pools take one writer at a
time: callers serialize map and zap calls on one arena).
"""
from libc.stdint cimport uint64_t, int64_t, uint32_t

import numpy as np

from kvmmmu._core.argcheck cimport u64_arg, s32_arg
from kvmmmu._core.types cimport sptep_t, make_sptep, sptep_table_pfn
from kvmmmu._core.pt_arena_defs cimport (
    pt_arena_t, kvm_mmu_page, pt_pool, pt_sp_ptr, pt_slot, pt_sptep_ptr, pt_page_sp,
    pt_read_once64, pt_write_once64, pt_xchg64, pt_try_cmpxchg64, pt_sptep_in_arena,
    spte_to_child_sp, PT_SP_IN_USE, PT_CACHE_SHADOW_PAGE, PT_CACHE_PAGE_HEADER,
)
from kvmmmu._core.pt_arena cimport PtArena, MmuMemoryCache
from kvmmmu._core.mmu_spte cimport kvm_update_page_stats, _spte_writable_invariants_ok
from kvmmmu._core.pt_pool cimport pt_pool_alloc, pt_alloc_sp, pt_free_sp
from kvmmmu._core.mmu_lockless cimport call_rcu_free_sp
from kvmmmu._core.memcache cimport kvm_mmu_memory_cache, kvm_mmu_topup_memory_cache
from kvmmmu._core.role cimport role_level, role_set_level, role_as_id, role_ad_disabled
from kvmmmu._core.spte cimport (
    spte_fmt_t, SpteFormat, SPTE_LEVEL_BITS, SPTE_ENT_PER_PAGE, PG_LEVEL_4K, PG_LEVEL_1G,
    PT64_ROOT_MAX_LEVEL, PT_PRESENT_MASK, ACC_ALL,
    is_shadow_present_pte, is_last_spte, is_large_pte, is_writable_pte, is_executable_pte,
    is_mmio_spte, is_frozen_spte, is_mmu_writable_spte, spte_to_pfn, spte_needs_atomic_update,
    is_accessed_spte, spte_ad_enabled, PT_WRITABLE_MASK, spte_index_of,
    make_spte, make_mmio_spte, make_nonleaf_spte, make_small_spte, make_huge_spte,
    mark_spte_for_access_track,
    is_access_track_spte, restore_acc_track_spte,
    MKSPTE_PREFETCH, MKSPTE_HOST_WRITABLE, MKSPTE_AD_DISABLED, MKSPTE_NX_HUGE_PAGES,
)
from kvmmmu._core.tdp_iter cimport (
    tdp_iter, tdp_iter_start, tdp_iter_next, kvm_tdp_mmu_read_spte,
)

from kvmmmu._core._checks import check_array as _check_array, out_array as _out_array
from kvmmmu.errors import KvmNoMemoryError

cdef extern from "mmu_defs.h" nogil:
    const int RET_PF_EMULATE
    const int RET_PF_INVALID
    const int RET_PF_RETRY
    const int RET_PF_WRITE_PROTECTED
    const int RET_PF_FIXED
    const int RET_PF_SPURIOUS

cdef extern from *:
    int __builtin_ctzll(unsigned long long x) nogil

cdef extern from *:
    """
    #define tdp_stat_add(p, v) __atomic_add_fetch((p), (v), __ATOMIC_RELAXED)
    #define tdp_fetch_and64(p, v) __atomic_fetch_and((p), (v), __ATOMIC_SEQ_CST)
    """
    int64_t tdp_stat_add(int64_t *p, int64_t v) nogil
    uint64_t tdp_fetch_and64(uint64_t *p, uint64_t v) nogil

cdef enum:
    _EBUSY = 16
    _ENOMEM = 12

#: One text per TDP_* site (index = counter).
WARN_SITES = (
    "handle_changed_spte: level outside 1..5 or gfn not aligned to it (WARN_ON_ONCE)",
    "handle_changed_spte: a present leaf changed its pfn (BUG)",
    "handle_changed_spte: a non-present SPTE changed to another, neither MMIO nor FROZEN (WARN)",
    "__tdp_mmu_set_spte_atomic: iterator yielded or old SPTE FROZEN (WARN_ON_ONCE)",
    "tdp_mmu_set_spte: FROZEN old or new value under the write lock (WARN_ON_ONCE)",
    "a non-leaf SPTE that points outside the arena's tables (model check)",
    "kvm_tdp_mmu_map: the target entry is not at goal_level (WARN_ON_ONCE)",
    "tdp_mmu_map_handle_target_level: spurious fault on a leaf with another pfn (WARN_ON_ONCE)",
    "check_spte_writable_invariants: a new leaf writable without MMU-writable, or MMU-writable "
    "without Host-writable (WARN_ONCE)",
    "kvm_recover_nx_huge_pages: a listed page not flagged, not a TDP page, or a root "
    "(WARN_ON_ONCE)",
    "handle_removed_pt: an entry already FROZEN, or the table freed during its own removal "
    "(a table cycle; model check)",
)


# ---------------------------------------------------------------------------
# Writes
# ---------------------------------------------------------------------------

cdef inline uint64_t _pages(int level) noexcept nogil:
    return (<uint64_t>1) << ((level - 1) * SPTE_LEVEL_BITS)


cdef inline uint64_t kvm_tdp_mmu_write_spte(tdp_mmu_t *m, sptep_t sptep, uint64_t old_spte,
                                            uint64_t new_spte, int level) noexcept nogil:
    """xchg when the old value is a present leaf with bits others may set
    (A/D by the CPU, W by fast page fault); else a plain store.  Returns the
    value really replaced."""
    cdef uint64_t *p = pt_sptep_ptr(m.a, sptep)
    if is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level) and \
            spte_needs_atomic_update(m.f, old_spte):
        return pt_xchg64(p, new_spte)
    pt_write_once64(p, new_spte)
    return old_spte


cdef void handle_removed_pt(tdp_mmu_t *m, uint64_t sp, bint shared) noexcept nogil:
    """A table is no longer reachable: freeze and handle each entry, then
    free the table after a grace period (its entries stay FROZEN, so a
    lockless walker still inside sees only non-present values)."""
    cdef kvm_mmu_page *h = pt_sp_ptr(m.a, sp)
    cdef int level = <int>role_level(h.role)
    cdef int as_id = <int>role_as_id(h.role)
    cdef uint64_t base = h.gfn, frozen = m.f.frozen_spte, old
    cdef uint64_t *p
    cdef int i
    if level < PG_LEVEL_4K or level >= PT64_ROOT_MAX_LEVEL:
        m.warn[TDP_WARN_CHILD_NOT_TABLE] += 1          # a header rewritten from Python
        return
    tdp_stat_add(&m.tdp_mmu_pages, -1)                  # tdp_unaccount_mmu_page
    if h.nx_huge_page_disallowed:
        h.nx_huge_page_disallowed = 0
        untrack_possible_nx_huge_page(m, sp)
    for i in range(SPTE_ENT_PER_PAGE):
        p = pt_sptep_ptr(m.a, make_sptep(h.spt, i))
        if shared:
            # In the kernel another thread may be between its freeze and its
            # final write, and the remover waits for it.  The model runs one
            # writer per arena (the writer claim), so a FROZEN entry here can
            # only belong to a table already being removed (a cycle planted
            # through a writable table view): counted and skipped, never
            # waited for, as the wait would never end.
            old = pt_xchg64(p, frozen)
            if is_frozen_spte(m.f, old):
                m.warn[TDP_WARN_FROZEN_IN_REMOVED] += 1
                continue
        else:
            old = pt_read_once64(p)
            if not is_shadow_present_pte(old):
                continue
            old = kvm_tdp_mmu_write_spte(m, make_sptep(h.spt, i), old, frozen, level)
        handle_changed_spte(m, as_id, base + <uint64_t>i * _pages(level), old, frozen, level, shared)
    if pt_slot(m.a, sp - 1).sp_state == PT_SP_IN_USE:   # not freed by a cycle meanwhile
        call_rcu_free_sp(m.a, sp)
    else:
        m.warn[TDP_WARN_FROZEN_IN_REMOVED] += 1


cdef void handle_changed_spte(tdp_mmu_t *m, int as_id, uint64_t gfn, uint64_t old_spte,
                              uint64_t new_spte, int level, bint shared) noexcept nogil:
    """The bookkeeping of one SPTE change (see the module docstring)."""
    cdef bint was_present = is_shadow_present_pte(old_spte)
    cdef bint is_present = is_shadow_present_pte(new_spte)
    cdef bint was_leaf = was_present and is_last_spte(old_spte, level)
    cdef bint is_leaf = is_present and is_last_spte(new_spte, level)
    cdef bint pfn_changed = spte_to_pfn(old_spte) != spte_to_pfn(new_spte)
    cdef uint64_t child
    if level < PG_LEVEL_4K or level > PT64_ROOT_MAX_LEVEL or (gfn & (_pages(level) - 1)):
        m.warn[TDP_WARN_BAD_LEVEL_OR_GFN] += 1
    if was_leaf and is_leaf and pfn_changed:
        m.warn[TDP_BUG_PFN_CHANGED] += 1
    if old_spte == new_spte:
        return
    if is_leaf and not _spte_writable_invariants_ok(m.f, new_spte):
        m.warn[TDP_WARN_WRITABLE_INVARIANT] += 1
    if not was_present and not is_present:
        if not (is_mmio_spte(m.f, old_spte) or is_mmio_spte(m.f, new_spte)
                or is_frozen_spte(m.f, new_spte)):
            m.warn[TDP_WARN_NONPRESENT_CHANGE] += 1
        return
    if was_leaf != is_leaf:
        kvm_update_page_stats(m.a, level, 1 if is_leaf else -1)
    if was_present and not was_leaf and (is_leaf or not is_present or pfn_changed):
        child = spte_to_child_sp(m.a, old_spte)
        if child == 0 or pt_slot(m.a, child - 1).sp_state != PT_SP_IN_USE:
            m.warn[TDP_WARN_CHILD_NOT_TABLE] += 1
            return
        handle_removed_pt(m, child, shared)


cdef int tdp_mmu_set_spte_atomic(tdp_mmu_t *m, tdp_iter *it, uint64_t new_spte) noexcept nogil:
    """cmpxchg the iterator's SPTE from it.old_spte to `new_spte`: 0, or
    -EBUSY (it.old_spte now holds the current value) if someone else changed
    it first."""
    if it.yielded or is_frozen_spte(m.f, it.old_spte):
        m.warn[TDP_WARN_SET_YIELDED] += 1
    if not pt_try_cmpxchg64(pt_sptep_ptr(m.a, it.sptep), &it.old_spte, new_spte):
        return -_EBUSY
    handle_changed_spte(m, it.as_id, it.gfn, it.old_spte, new_spte, it.level, True)
    return 0


cdef uint64_t tdp_mmu_set_spte(tdp_mmu_t *m, int as_id, sptep_t sptep, uint64_t old_spte,
                               uint64_t new_spte, uint64_t gfn, int level) noexcept nogil:
    """The write-locked setter; returns the value really replaced (it can
    differ from `old_spte` only in bits others may set)."""
    if is_frozen_spte(m.f, old_spte) or is_frozen_spte(m.f, new_spte):
        m.warn[TDP_WARN_SET_FROZEN] += 1
    old_spte = kvm_tdp_mmu_write_spte(m, sptep, old_spte, new_spte, level)
    handle_changed_spte(m, as_id, gfn, old_spte, new_spte, level, False)
    return old_spte


# ---------------------------------------------------------------------------
# The fault path
# ---------------------------------------------------------------------------

cdef inline int _link_sp(tdp_mmu_t *m, tdp_iter *it, uint64_t sp) noexcept nogil:
    """tdp_mmu_link_sp(shared=true): publish `sp` at the iterator's entry,
    and account it only once linked."""
    cdef kvm_mmu_page *h = pt_sp_ptr(m.a, sp)
    cdef int r = tdp_mmu_set_spte_atomic(
        m, it, make_nonleaf_spte(m.f, h.spt << 12, not m.f.ad_enabled))
    if r == 0:
        tdp_stat_add(&m.tdp_mmu_pages, 1)               # tdp_account_mmu_page
    return r


cdef inline int _split_huge_page(tdp_mmu_t *m, tdp_iter *it, uint64_t sp,
                                 bint nx_huge_pages) noexcept nogil:
    """tdp_mmu_split_huge_page: fill `sp` with the small SPTEs of the huge
    leaf at the iterator (before it is published, plain stores), then link
    it in place of the leaf.  The leaf count of the lower level grows by
    512: those entries never went through handle_changed_spte."""
    cdef kvm_mmu_page *h = pt_sp_ptr(m.a, sp)
    cdef uint64_t huge = it.old_spte
    cdef int i, r
    for i in range(SPTE_ENT_PER_PAGE):
        pt_write_once64(pt_sptep_ptr(m.a, make_sptep(h.spt, i)),
                        make_small_spte(m.f, huge, it.level - 1, i, ACC_ALL, nx_huge_pages))
    r = _link_sp(m, it, sp)
    if r == 0:
        kvm_update_page_stats(m.a, it.level - 1, SPTE_ENT_PER_PAGE)
    return r


cdef inline bint _access_allowed(tdp_mmu_t *m, tdp_fault *fault, uint64_t spte) noexcept nogil:
    if fault.exec:
        return is_executable_pte(m.f, spte)
    if fault.write:
        return is_writable_pte(spte)
    return (spte & PT_PRESENT_MASK) != 0


cdef inline int _map_target_level(tdp_mmu_t *m, tdp_iter *it, tdp_fault *fault) noexcept nogil:
    """tdp_mmu_map_handle_target_level: the leaf (or, without a memslot, an
    MMIO SPTE carrying the memslot generation: RET_PF_EMULATE)."""
    cdef uint64_t old = it.old_spte, new_spte
    cdef bint wrprot = False
    cdef unsigned int flags = 0
    cdef kvm_mmu_page *sp = pt_sp_ptr(m.a, pt_page_sp(m.a, sptep_table_pfn(it.sptep)))
    if <int>role_level(sp.role) != fault.goal_level:
        m.warn[TDP_WARN_MAP_LEVEL] += 1
        return RET_PF_RETRY
    if is_shadow_present_pte(old) and (fault.prefetch or _access_allowed(m, fault, old)) and \
            is_last_spte(old, it.level):
        if spte_to_pfn(old) != fault.pfn:
            m.warn[TDP_WARN_SPURIOUS_PFN] += 1
        return RET_PF_SPURIOUS
    if fault.prefetch:
        flags |= MKSPTE_PREFETCH
    if fault.map_writable:
        flags |= MKSPTE_HOST_WRITABLE
    if role_ad_disabled(sp.role):
        flags |= MKSPTE_AD_DISABLED
    if fault.nx_huge_pages:
        flags |= MKSPTE_NX_HUGE_PAGES
    if fault.noslot:
        new_spte = make_mmio_spte(m.f, it.gfn, ACC_ALL, fault.mmio_gen)
    else:
        new_spte = make_spte(m.f, it.level, ACC_ALL, fault.pfn, old, flags, &wrprot)
    if new_spte == old:
        return RET_PF_SPURIOUS
    if tdp_mmu_set_spte_atomic(m, it, new_spte):
        return RET_PF_RETRY
    if is_shadow_present_pte(old) and (not is_last_spte(old, it.level) or
                                       (is_mmu_writable_spte(m.f, old) and
                                        not is_mmu_writable_spte(m.f, new_spte))):
        m.nr_flushes += 1                # kvm_flush_remote_tlbs_gfn(gfn, level)
    if wrprot and fault.write:
        return RET_PF_WRITE_PROTECTED
    if is_mmio_spte(m.f, new_spte):
        return RET_PF_EMULATE
    return RET_PF_FIXED


# ---------------------------------------------------------------------------
# The possible NX huge pages (kvm->arch.possible_nx_huge_pages[KVM_TDP_MMU])
# ---------------------------------------------------------------------------
# A doubly linked list through the headers' possible_nx_huge_page_link, as in
# the kernel.  Links hold "sp handle + 1", with 1 for the list head (the
# tdp_mmu_t) and 0 for "not on the list" (a zeroed header).

cdef inline uint64_t *_nx_next(tdp_mmu_t *m, uint64_t node) noexcept nogil:
    return &m.nx_head_next if node == 1 else &pt_sp_ptr(m.a, node - 1).nx_link_next


cdef inline uint64_t *_nx_prev(tdp_mmu_t *m, uint64_t node) noexcept nogil:
    return &m.nx_head_prev if node == 1 else &pt_sp_ptr(m.a, node - 1).nx_link_prev


cdef void track_possible_nx_huge_page(tdp_mmu_t *m, uint64_t sp) noexcept nogil:
    """Append `sp` (idempotent); ``stat.nx_lpage_splits++``."""
    cdef kvm_mmu_page *h = pt_sp_ptr(m.a, sp)
    cdef uint64_t tail
    if h.nx_link_next != 0:
        return
    if m.nx_head_next == 0:                     # first use: an empty list points at itself
        m.nx_head_next = m.nx_head_prev = 1
    tail = m.nx_head_prev
    h.nx_link_next = 1
    h.nx_link_prev = tail
    _nx_next(m, tail)[0] = sp + 1
    m.nx_head_prev = sp + 1
    m.nx_lpage_splits += 1


cdef void untrack_possible_nx_huge_page(tdp_mmu_t *m, uint64_t sp) noexcept nogil:
    """Take `sp` off the list (if on it); ``stat.nx_lpage_splits--``."""
    cdef kvm_mmu_page *h = pt_sp_ptr(m.a, sp)
    if h.nx_link_next == 0:
        return
    _nx_next(m, h.nx_link_prev)[0] = h.nx_link_next
    _nx_prev(m, h.nx_link_next)[0] = h.nx_link_prev
    h.nx_link_next = h.nx_link_prev = 0
    m.nx_lpage_splits -= 1


cdef inline void _disallowed_hugepage_adjust(tdp_mmu_t *m, tdp_fault *fault, uint64_t spte,
                                             int level) noexcept nogil:
    """Do not replace a table of small pages created by an NX split with a
    (possibly executable) huge page: map one level lower instead, with the
    pfn of the gfn inside it."""
    cdef uint64_t child
    if level > PG_LEVEL_4K and level == fault.goal_level and is_shadow_present_pte(spte) and \
            not is_large_pte(spte):
        child = spte_to_child_sp(m.a, spte)
        if child != 0 and pt_sp_ptr(m.a, child).nx_huge_page_disallowed:
            fault.pfn |= fault.gfn & (_pages(level) - _pages(level - 1))
            fault.goal_level -= 1


cdef inline void _init_child(tdp_mmu_t *m, tdp_iter *it, uint64_t sp) noexcept nogil:
    """The new table at the iterator's entry: the parent's role one level
    down, the entry's gfn (tdp_mmu_init_child_sp)."""
    cdef kvm_mmu_page *h = pt_sp_ptr(m.a, sp)
    h.role = role_set_level(pt_sp_ptr(m.a, pt_page_sp(m.a, sptep_table_pfn(it.sptep))).role,
                            <uint32_t>(it.level - 1))
    h.gfn = it.gfn
    h.ptep = it.sptep
    h.tdp_mmu_page = 1


cdef int kvm_tdp_mmu_map(tdp_mmu_t *m, uint64_t root, tdp_fault *fault,
                         kvm_mmu_memory_cache *page_cache,
                         kvm_mmu_memory_cache *header_cache) noexcept nogil:
    """Map fault.gfn at fault.goal_level under `root`: RET_PF_*, or -ENOMEM
    if a cache ran dry (the kernel topped them up before; nothing linked
    stays half-built)."""
    cdef tdp_iter it
    return _tdp_mmu_map(m, root, fault, page_cache, header_cache, &it)


cdef inline int _tdp_mmu_map(tdp_mmu_t *m, uint64_t root, tdp_fault *fault,
                             kvm_mmu_memory_cache *page_cache,
                             kvm_mmu_memory_cache *header_cache, tdp_iter *last) noexcept nogil:
    """kvm_tdp_mmu_map, leaving in *last the iterator at the target entry
    when the walk reached the goal level (last.level = 0 otherwise)."""
    cdef tdp_iter it
    cdef uint64_t sp
    cdef kvm_mmu_page *h
    cdef int r
    last.level = 0
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, fault.gfn, 0)
    while it.valid and it.gfn <= fault.gfn:
        if fault.nx_huge_pages:
            _disallowed_hugepage_adjust(m, fault, it.old_spte, it.level)
        if is_frozen_spte(m.f, it.old_spte):
            return RET_PF_RETRY                     # another thread owns this entry
        if it.level == fault.goal_level:
            r = _map_target_level(m, &it, fault)
            last[0] = it
            return r
        if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
            tdp_iter_next(&it, m.a)
            continue
        if pt_alloc_sp(m.a, page_cache, header_cache, NULL, &sp) != 0:
            return -_ENOMEM
        _init_child(m, &it, sp)
        h = pt_sp_ptr(m.a, sp)
        h.nx_huge_page_disallowed = fault.huge_page_disallowed
        if is_shadow_present_pte(it.old_spte):
            r = _split_huge_page(m, &it, sp, fault.nx_huge_pages)
        else:
            r = _link_sp(m, &it, sp)
        if r:
            pt_free_sp(m.a, sp)                     # never published: freed at once
            return RET_PF_RETRY
        # A huge page would have been allowed here: zapping this table may
        # later let one be created (NX recovery)
        if fault.huge_page_disallowed and fault.req_level >= it.level and \
                h.nx_huge_page_disallowed:
            track_possible_nx_huge_page(m, sp)
        tdp_iter_next(&it, m.a)
    m.warn[TDP_WARN_MAP_LEVEL] += 1
    return RET_PF_RETRY


# ---------------------------------------------------------------------------
# Zaps (mmu_lock held for write)
# ---------------------------------------------------------------------------

cdef bint tdp_mmu_zap_leafs(tdp_mmu_t *m, uint64_t root, uint64_t start, uint64_t end,
                            bint flush) noexcept nogil:
    """Zap every present leaf of `root` in [start, end); the tables stay.
    Returns whether a TLB flush is owed (`flush`, or a leaf was zapped)."""
    cdef tdp_iter it
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, start, 0)
    while it.valid and it.gfn < end:
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
            it.old_spte = tdp_mmu_set_spte(m, it.as_id, it.sptep, it.old_spte,
                                           m.f.nonpresent_value, it.gfn, it.level)
            flush = True
        tdp_iter_next(&it, m.a)
    return flush


cdef inline void _zap_root_at(tdp_mmu_t *m, uint64_t root, int zap_level) noexcept nogil:
    cdef tdp_iter it
    tdp_iter_start(&it, m.a, root, zap_level, 0, 0)
    while it.valid:
        if is_shadow_present_pte(it.old_spte) and it.level <= zap_level:
            it.old_spte = tdp_mmu_set_spte(m, it.as_id, it.sptep, it.old_spte,
                                           m.f.nonpresent_value, it.gfn, it.level)
        tdp_iter_next(&it, m.a)


cdef void tdp_mmu_zap_root(tdp_mmu_t *m, uint64_t root) noexcept nogil:
    """Zap everything under `root` (the root's own table stays, empty): first
    at 1G, so each removed subtree is small, then at the root's top level."""
    cdef int top = <int>role_level(pt_sp_ptr(m.a, root).role)
    _zap_root_at(m, root, PG_LEVEL_1G)
    _zap_root_at(m, root, top)


# ---------------------------------------------------------------------------
# Aging and dirty logging
# ---------------------------------------------------------------------------

cdef inline uint64_t tdp_mmu_clear_spte_bits(tdp_mmu_t *m, sptep_t sptep, uint64_t old_spte,
                                             uint64_t mask, int level) noexcept nogil:
    """Clear `mask` in an SPTE: an atomic and when the old value is a present
    leaf others may change, else a plain store.  Returns the old value."""
    cdef uint64_t *p = pt_sptep_ptr(m.a, sptep)
    if is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level) and \
            spte_needs_atomic_update(m.f, old_spte):
        return tdp_fetch_and64(p, ~mask)
    pt_write_once64(p, old_spte & ~mask)
    return old_spte


cdef bint kvm_tdp_mmu_age_gfn_range(tdp_mmu_t *m, uint64_t root, uint64_t start, uint64_t end,
                                    bint test_only) noexcept nogil:
    """clear_young / test_young over [start, end) under RCU only: True if a
    leaf was young.  With A/D bits the Accessed bit is cleared atomically;
    without, the SPTE becomes access-tracked by one cmpxchg (losing it is
    fine: the SPTE is changing, so it is young).  No handle_changed_spte, no
    flush."""
    cdef tdp_iter it
    cdef bint young = False
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, start, 0)
    while it.valid and it.gfn < end:
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level) and \
                is_accessed_spte(m.f, it.old_spte):
            if test_only:
                return True
            young = True
            if spte_ad_enabled(it.old_spte):
                it.old_spte = tdp_fetch_and64(pt_sptep_ptr(m.a, it.sptep), ~m.f.accessed_mask)
            else:
                pt_try_cmpxchg64(pt_sptep_ptr(m.a, it.sptep), &it.old_spte,
                                 mark_spte_for_access_track(m.f, it.old_spte))
        tdp_iter_next(&it, m.a)
    return young


cdef bint kvm_tdp_mmu_clear_bit_range(tdp_mmu_t *m, uint64_t root, uint64_t start, uint64_t end,
                                      int min_level, uint64_t bit) noexcept nogil:
    """The read-locked loops of dirty logging: clear `bit` in every present
    leaf at or above `min_level` in [start, end) with the atomic setter,
    retrying an entry whose cmpxchg lost.  ``bit = PT_WRITABLE_MASK`` is
    wrprot_gfn_range (MMU-writable stays, so fast page fault can restore W and
    log the page); the dirty bit or W at 4K is clear_dirty_gfn_range."""
    cdef tdp_iter it
    cdef bint changed = False
    tdp_iter_start(&it, m.a, root, min_level, start, 0)
    while it.valid and it.gfn < end:
        while is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level) and \
                (it.old_spte & bit):
            if tdp_mmu_set_spte_atomic(m, &it, it.old_spte & ~bit) == 0:
                changed = True
                break
        tdp_iter_next(&it, m.a)
    return changed


cdef uint64_t kvm_tdp_mmu_clear_dirty_pt_masked(tdp_mmu_t *m, uint64_t root, uint64_t gfn,
                                                uint64_t mask, uint64_t dbit) noexcept nogil:
    """KVM_CLEAR_DIRTY_LOG's step (mmu_lock held for write): for each set
    bit i of `mask`, clear `dbit` in the 4K leaf of gfn + i.  Huge leaves and
    holes are left alone.  Returns the bits whose 4K leaf was found."""
    cdef tdp_iter it
    cdef uint64_t bit, found = 0
    if mask == 0:
        return 0
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, gfn + <uint64_t>__builtin_ctzll(mask), 0)
    while it.valid and it.gfn < gfn + 64 and mask:
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level) and \
                it.level == PG_LEVEL_4K:
            bit = (<uint64_t>1) << (it.gfn - gfn)
            if mask & bit:
                mask &= ~bit
                found |= bit
                if it.old_spte & dbit:
                    it.old_spte = tdp_mmu_clear_spte_bits(m, it.sptep, it.old_spte, dbit, it.level)
        tdp_iter_next(&it, m.a)
    return found


# ---------------------------------------------------------------------------
# Fast page fault (mmu.c fast_page_fault over kvm_tdp_mmu_fast_pf_get_last_sptep)
# ---------------------------------------------------------------------------

cdef sptep_t kvm_tdp_mmu_fast_pf_get_last_sptep(tdp_mmu_t *m, uint64_t root, uint64_t gfn,
                                                uint64_t *spte, int *level) noexcept nogil:
    """The last entry on `gfn`'s path (a leaf, or the first hole) and its
    value: 0 if the root cannot be walked."""
    cdef tdp_iter it
    cdef sptep_t sptep = 0
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, gfn, 0)
    while it.valid and it.gfn <= gfn:
        sptep = it.sptep
        spte[0] = it.old_spte
        level[0] = it.level
        tdp_iter_next(&it, m.a)
    return sptep


cdef int tdp_fast_page_fault(tdp_mmu_t *m, uint64_t root, tdp_fault *fault,
                             bint slot_dirty_tracked, bint *made_writable,
                             uint64_t *last_spte) noexcept nogil:
    """fast_page_fault for a TDP root, without mmu_lock: fix what needs no
    new page — restore an access-tracked SPTE, set W on an MMU-writable
    one (not on a huge leaf while the slot logs dirty pages) — with one
    cmpxchg, at most 5 attempts.  RET_PF_SPURIOUS if the access is already
    allowed, RET_PF_FIXED, or RET_PF_INVALID (take the slow path).
    `*made_writable`: W went from 0 to 1 (the caller marks the page dirty).
    The hardware's "present" (any of the permission bits) is read from the
    SPTE, as the CPU that faulted saw it."""
    cdef uint64_t spte = 0, new_spte
    cdef int level = 0, tries = 0
    cdef sptep_t sptep
    cdef bint hw_present
    made_writable[0] = False
    while True:
        sptep = kvm_tdp_mmu_fast_pf_get_last_sptep(m, root, fault.gfn, &spte, &level)
        last_spte[0] = spte
        if sptep == 0 or not is_shadow_present_pte(spte) or not is_last_spte(spte, level):
            return RET_PF_INVALID
        if tries == 0:
            hw_present = (spte & (7 if m.f.is_ept else PT_PRESENT_MASK)) != 0
            # page_fault_can_be_fast: a fault on a present translation can be
            # fixed only for a write; on a non-present one only when KVM runs
            # without A/D bits (an access-tracked SPTE)
            if not (fault.write if hw_present else not m.f.ad_enabled):
                return RET_PF_INVALID
        if _access_allowed(m, fault, spte):
            return RET_PF_SPURIOUS
        new_spte = spte
        if not m.f.ad_enabled and is_access_track_spte(m.f, spte):
            new_spte = restore_acc_track_spte(m.f, new_spte) | m.f.accessed_mask
        if fault.write and is_mmu_writable_spte(m.f, spte):
            new_spte |= PT_WRITABLE_MASK
            if level > PG_LEVEL_4K and slot_dirty_tracked:
                return RET_PF_INVALID
        if new_spte == spte or not _access_allowed(m, fault, new_spte):
            return RET_PF_INVALID
        if pt_try_cmpxchg64(pt_sptep_ptr(m.a, sptep), &spte, new_spte):
            made_writable[0] = is_writable_pte(new_spte) and not is_writable_pte(spte)
            return RET_PF_FIXED
        tries += 1
        if tries > 4:
            return RET_PF_INVALID


# ---------------------------------------------------------------------------
# Huge pages: eager split and recovery
# ---------------------------------------------------------------------------

cdef int tdp_mmu_split_huge_pages_root(tdp_mmu_t *m, uint64_t root, uint64_t start,
                                       uint64_t end, int target_level,
                                       kvm_mmu_memory_cache *page_cache,
                                       kvm_mmu_memory_cache *header_cache,
                                       bint nx_huge_pages, uint64_t *resume,
                                       int64_t *nr) noexcept nogil:
    """Split every huge leaf above `target_level` in [start, end) down to
    it (pre-order: a 1G page becomes 2M pages, visited and split in turn).
    Adds the pages split to `*nr`; returns 0, or -ENOMEM when the caches
    ran dry: `*resume` is then the gfn to start again from (after a refill),
    as the kernel restarts its walk after dropping the lock to allocate."""
    cdef tdp_iter it
    cdef uint64_t sp
    tdp_iter_start(&it, m.a, root, target_level + 1, start, 0)
    while it.valid and it.gfn < end:
        if not is_shadow_present_pte(it.old_spte) or not is_large_pte(it.old_spte) or \
                it.level <= target_level:
            tdp_iter_next(&it, m.a)
            continue
        if pt_alloc_sp(m.a, page_cache, header_cache, NULL, &sp) != 0:
            resume[0] = it.gfn
            return -_ENOMEM
        _init_child(m, &it, sp)
        if _split_huge_page(m, &it, sp, nx_huge_pages):
            pt_free_sp(m.a, sp)                 # lost a race: retry the same entry
            continue
        nr[0] += 1
        tdp_iter_next(&it, m.a)
    return 0


cdef int _first_leaf_below(tdp_mmu_t *m, uint64_t root, uint64_t gfn, int level,
                           uint64_t *leaf) noexcept nogil:
    """The first present leaf in [gfn, gfn + pages(level)) below a non-leaf
    entry at `level` (tdp_mmu_make_huge_spte's search): 0, or -ENOENT."""
    cdef tdp_iter it
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, gfn, 0)
    while it.valid and it.gfn < gfn + _pages(level):
        if it.level < level and is_shadow_present_pte(it.old_spte) and \
                is_last_spte(it.old_spte, it.level):
            leaf[0] = it.old_spte
            return 0
        tdp_iter_next(&it, m.a)
    return -2


cdef int64_t kvm_tdp_mmu_recover_huge_pages(tdp_mmu_t *m, uint64_t root, uint64_t base_gfn,
                                            uint64_t npages, const signed char *max_level,
                                            bint nx_huge_pages) noexcept nogil:
    """recover_huge_pages_range over a memslot [base_gfn, base_gfn + npages):
    each present non-leaf at 2M or 1G whose range lies in the slot and whose
    gfn may be mapped at that level (`max_level[(gfn - base_gfn) >> 9]`,
    kvm_mmu_max_mapping_level of the 2M frame's first gfn) becomes a huge
    leaf built from the first leaf below it (make_huge_spte), by the atomic
    setter, which tears the subtree down.  Returns the entries replaced
    (the caller flushes the slot if any)."""
    cdef tdp_iter it
    cdef uint64_t leaf, huge
    cdef int64_t nr = 0
    tdp_iter_start(&it, m.a, root, 2, base_gfn, 0)
    while it.valid and it.gfn < base_gfn + npages:
        if it.level > PG_LEVEL_1G or not is_shadow_present_pte(it.old_spte) or \
                is_last_spte(it.old_spte, it.level) or it.gfn < base_gfn or \
                it.gfn + _pages(it.level) > base_gfn + npages or \
                max_level[(it.gfn - base_gfn) >> SPTE_LEVEL_BITS] < it.level:
            tdp_iter_next(&it, m.a)
            continue
        if _first_leaf_below(m, root, it.gfn, it.level, &leaf) != 0:
            tdp_iter_next(&it, m.a)
            continue
        huge = make_huge_spte(m.f, leaf, it.level, nx_huge_pages)
        if tdp_mmu_set_spte_atomic(m, &it, huge):
            continue                            # lost a race: look at the entry again
        nr += 1
        tdp_iter_next(&it, m.a)
    return nr


# ---------------------------------------------------------------------------
# Python
# ---------------------------------------------------------------------------

cdef class TdpMmuCore:
    """The TDP MMU's tables in one arena, driven from Python.

    Holds ``kvm->arch.tdp_mmu_pages`` and the WARN counters of tdp_mmu.c.
    Every method takes the arena's writer side (callers hold ``mmu_lock``):
    one thread at a time per arena.  Page statistics are the arena's
    (:meth:`PtArena.page_stats`).
    """
    cdef tdp_mmu_t m
    cdef readonly PtArena arena
    cdef readonly SpteFormat fmt

    def __init__(self, PtArena arena not None):
        if arena.a.chunk_base == NULL:
            from kvmmmu.errors import ObjectInitError
            raise ObjectInitError("arena: PtArena.__init__ has not run")
        self.arena = arena
        self.fmt = arena.fmt
        self.m.a = &arena.a
        self.m.f = &self.fmt.fmt

    cdef int _ready(self, str what) except -1:
        # Every method checks this before it touches self.m (NULL pointers
        # in a half-built object).
        if self.arena is None:
            from kvmmmu.errors import ObjectInitError
            raise ObjectInitError(f"{what}: TdpMmuCore.__init__ has not run")
        return 0

    cdef int _enter(self, str what) except -1:
        # The writer check and the claim, with no Python code in between (so
        # no other thread runs in between): from here until _leave, another
        # thread's writer call on the arena raises ConcurrentUseError.
        self._ready(what)
        self.arena._writer(what)
        self.arena._busy = what
        return 0

    cdef void _leave(self):
        self.arena._busy = None

    cdef int _check_caches(self, MmuMemoryCache page_cache, MmuMemoryCache header_cache) except -1:
        for c, kind, name in ((page_cache, PT_CACHE_SHADOW_PAGE, "page_cache"),
                              (header_cache, PT_CACHE_PAGE_HEADER, "header_cache")):
            if (<MmuMemoryCache>c).arena is not self.arena or (<MmuMemoryCache>c).kind != kind:
                raise ValueError(f"{name} is not this arena's "
                                 f"{'shadow_page' if kind == PT_CACHE_SHADOW_PAGE else 'page_header'} cache")
        return 0

    cdef int _root(self, uint64_t root) except -1:
        self._ready("TdpMmuCore")
        cdef pt_arena_t *a = self.m.a
        if root == 0 or root > a.headers_hw or pt_slot(a, root - 1).sp_state != PT_SP_IN_USE:
            raise ValueError(f"root {root} is not a live sp of this arena")
        cdef kvm_mmu_page *h = pt_sp_ptr(a, root)
        if role_level(h.role) < 4 or role_level(h.role) > PT64_ROOT_MAX_LEVEL or not h.tdp_mmu_page:
            raise ValueError(f"root {root} is not a TDP MMU root (level 4 or 5, tdp_mmu_page)")
        if role_ad_disabled(h.role) != (not self.m.f.ad_enabled):
            raise ValueError(f"root {root}: role.ad_disabled must be !kvm_ad_enabled "
                             f"({not self.m.f.ad_enabled}) for this SPTE format")
        return <int>role_level(h.role)

    @property
    def tdp_mmu_pages(self):
        """``kvm->arch.tdp_mmu_pages``: non-root tables linked and not yet removed."""
        return self.m.tdp_mmu_pages

    @property
    def nr_flushes(self):
        """gfn-ranged remote TLB flushes the map path asked for."""
        return self.m.nr_flushes

    def warnings(self):
        """``{site text: count}`` of the WARNs/BUGs that fired (non-zero only)."""
        return {WARN_SITES[i]: self.m.warn[i] for i in range(TDP_NR_WARN) if self.m.warn[i]}

    def map(self, root, gfns, pfns, goal_level, MmuMemoryCache page_cache not None,
            MmuMemoryCache header_cache not None, *, write=False, exec=False, prefetch=False,
            map_writable=True, nx_huge_pages=False, out=None):
        """``kvm_tdp_mmu_map`` for each ``(gfns[i], pfns[i])`` at `goal_level`,
        in one nogil pass; returns the RET_PF_* codes (int8).

        `gfns` and `pfns` (uint64) must be aligned to `goal_level`'s size
        (the caller's ``kvm_mmu_hugepage_adjust``).  The caches are topped
        up before each fault, as ``mmu_topup_memory_caches`` does, from the
        arena's pool; the arena grows between passes when the pool runs
        dry.  The inputs are copied first.
        """
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef int goal = s32_arg(goal_level, "goal_level")
        cdef int top = self._root(c_root)
        if not PG_LEVEL_4K <= goal <= PG_LEVEL_1G:
            raise ValueError(f"goal_level={goal} is outside 1..{PG_LEVEL_1G}")
        self._check_caches(page_cache, header_cache)
        _check_array("gfns", gfns)
        _check_array("pfns", pfns)
        cdef Py_ssize_t n = gfns.shape[0], i, done = 0
        if pfns.shape[0] != n:
            raise ValueError(f"pfns has {pfns.shape[0]} entries, gfns {n}")
        out = _out_array("out", out, n, np.int8, inputs=(gfns, pfns))
        g_arr = np.array(gfns, copy=True)
        p_arr = np.array(pfns, copy=True)
        cdef const uint64_t[::1] g = g_arr
        cdef const uint64_t[::1] p = p_arr
        cdef signed char[::1] o = out
        cdef uint64_t mask = _pages(goal) - 1
        cdef uint64_t limit = (<uint64_t>1) << (SPTE_LEVEL_BITS * top)
        for i in range(n):
            if (g[i] & mask) or (p[i] & mask) or g[i] >= limit or p[i] >> 40:
                raise ValueError(f"gfns[{i}]={g[i]:#x} / pfns[{i}]={p[i]:#x}: not aligned to "
                                 f"level {goal}, beyond the root, or pfn >= 2**40")
        cdef tdp_fault fault
        fault.goal_level = goal
        fault.req_level = goal
        fault.write, fault.exec, fault.prefetch = bool(write), bool(exec), bool(prefetch)
        fault.map_writable, fault.nx_huge_pages = bool(map_writable), bool(nx_huge_pages)
        fault.huge_page_disallowed = bool(exec) and bool(nx_huge_pages)
        fault.noslot, fault.mmio_gen = False, 0
        cdef pt_arena_t *a = self.m.a
        cdef tdp_mmu_t *m = &self.m
        cdef kvm_mmu_memory_cache *pc = &page_cache.mc
        cdef kvm_mmu_memory_cache *hc = &header_cache.mc
        cdef int r, stuck = 0
        cdef Py_ssize_t before
        cdef tdp_iter last
        # The shortcut to the previous target table needs the walk's own
        # decisions to be the same at every entry of that table: not with the
        # NX workaround (disallowed_hugepage_adjust looks at each entry).
        cdef bint same_table = goal < top and not fault.nx_huge_pages
        cdef int table_shift = SPTE_LEVEL_BITS * goal
        last.level = 0
        self._enter("TdpMmuCore.map")
        try:
            self._root(c_root)          # again, now that no other writer can run
            while done < n:
                before = done
                with nogil:
                    for i in range(done, n):
                        if kvm_mmu_topup_memory_cache(pc, PT64_ROOT_MAX_LEVEL, pt_pool_alloc,
                                                      &a.pools[PT_CACHE_SHADOW_PAGE]) or \
                                kvm_mmu_topup_memory_cache(hc, PT64_ROOT_MAX_LEVEL, pt_pool_alloc,
                                                           &a.pools[PT_CACHE_PAGE_HEADER]):
                            break
                        fault.gfn = g[i]
                        fault.pfn = p[i]
                        if same_table and last.level == goal and \
                                (g[i] >> table_shift) == (last.gfn >> table_shift):
                            # The goal-level table of the previous fault: this
                            # call holds the writer side, so it is still
                            # linked where the walk found it; go to the entry.
                            last.gfn = last.next_last_level_gfn = g[i]
                            last.sptep = last.pt_path[goal - 1] + \
                                (<uint64_t>spte_index_of(g[i], goal) << 3)
                            last.old_spte = kvm_tdp_mmu_read_spte(a, last.sptep)
                            r = _map_target_level(m, &last, &fault)
                        else:
                            r = _tdp_mmu_map(m, c_root, &fault, pc, hc, &last)
                        if r != RET_PF_FIXED and r != RET_PF_SPURIOUS:
                            last.level = 0
                        o[i] = r
                        done = i + 1
                if done < n:
                    # The pool ran dry: grow the arena (with the GIL) and go
                    # on.  A pass without progress right after a growth means
                    # the growth cannot help (never expected).
                    stuck = stuck + 1 if done == before else 0
                    if stuck > 1:
                        raise KvmNoMemoryError("tdp map: the caches cannot be topped up")
                    self.arena._grow_for(PT64_ROOT_MAX_LEVEL * 64, PT64_ROOT_MAX_LEVEL * 64)
        except KvmNoMemoryError as e:
            e.done = done
            raise
        finally:
            self._leave()
        return out

    def zap_leafs(self, root, start, end, *, flush=False):
        """``tdp_mmu_zap_leafs`` over [start, end): True if a flush is owed."""
        cdef uint64_t c_root = u64_arg(root, "root"), s, e
        cdef bint f = bool(flush)
        self._range(start, end, &s, &e)
        self._enter("TdpMmuCore.zap_leafs")
        try:
            self._root(c_root)
            with nogil:
                f = tdp_mmu_zap_leafs(&self.m, c_root, s, e, f)
        finally:
            self._leave()
        return bool(f)

    def zap_root(self, root):
        """``tdp_mmu_zap_root``: remove everything below `root` (the removed
        tables are freed after a grace period: :meth:`PtArena.rcu_barrier`)."""
        cdef uint64_t c_root = u64_arg(root, "root")
        self._enter("TdpMmuCore.zap_root")
        try:
            self._root(c_root)
            with nogil:
                tdp_mmu_zap_root(&self.m, c_root)
        finally:
            self._leave()

    cdef int _range(self, object start, object end, uint64_t *s, uint64_t *e) except -1:
        s[0] = u64_arg(start, "start")
        e[0] = u64_arg(end, "end")
        if e[0] < s[0]:
            raise ValueError(f"end={e[0]:#x} is below start={s[0]:#x}")
        return 0

    def age_gfn_range(self, root, start, end, *, test_only=False):
        """``kvm_tdp_mmu_age_gfn_range`` / ``kvm_tdp_mmu_test_age_gfn`` over
        [start, end): True if a leaf was young (and, unless `test_only`,
        it is old now).  The kernel runs this under RCU alone; the model
        serializes it with the arena's writers."""
        cdef uint64_t c_root = u64_arg(root, "root"), s, e
        cdef bint t = bool(test_only), young
        self._range(start, end, &s, &e)
        self._enter("TdpMmuCore.age_gfn_range")
        try:
            self._root(c_root)
            with nogil:
                young = kvm_tdp_mmu_age_gfn_range(&self.m, c_root, s, e, t)
        finally:
            self._leave()
        return bool(young)

    def clear_bit_range(self, root, start, end, bit, *, min_level=PG_LEVEL_4K):
        """Clear `bit` (``PT_WRITABLE_MASK`` for ``kvm_tdp_mmu_wrprot_slot``;
        the format's dirty mask, or W, for ``kvm_tdp_mmu_clear_dirty_slot``)
        in every present leaf at or above `min_level` in [start, end), with
        the atomic setter.  True if anything changed (the caller flushes)."""
        cdef uint64_t c_root = u64_arg(root, "root"), s, e
        cdef uint64_t c_bit = u64_arg(bit, "bit")
        cdef int c_min = s32_arg(min_level, "min_level")
        cdef bint changed
        self._ready("TdpMmuCore.clear_bit_range")
        self._range(start, end, &s, &e)
        if not PG_LEVEL_4K <= c_min <= PG_LEVEL_1G:
            raise ValueError(f"min_level={c_min} is outside 1..{PG_LEVEL_1G}")
        if c_bit == 0 or c_bit & (c_bit - 1) or c_bit not in (PT_WRITABLE_MASK, self.m.f.dirty_mask):
            raise ValueError(f"bit={c_bit:#x} is neither PT_WRITABLE_MASK nor the dirty bit")
        self._enter("TdpMmuCore.clear_bit_range")
        try:
            self._root(c_root)
            with nogil:
                changed = kvm_tdp_mmu_clear_bit_range(&self.m, c_root, s, e, c_min, c_bit)
        finally:
            self._leave()
        return bool(changed)

    def clear_dirty_log(self, root, base_gfn, mask, *, wrprot=False, out=None):
        """``kvm_tdp_mmu_clear_dirty_pt_masked`` for a dirty bitmap: word w
        of `mask` (uint64) covers gfns ``base_gfn + 64*w ..``; clear W
        (`wrprot`) or the dirty bit in the 4K leaf of every set bit, in one
        nogil pass.  Returns, per word, the bits whose 4K leaf was found."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef uint64_t base = u64_arg(base_gfn, "base_gfn")
        self._ready("TdpMmuCore.clear_dirty_log")
        cdef uint64_t dbit = PT_WRITABLE_MASK if wrprot else self.m.f.dirty_mask
        _check_array("mask", mask)
        cdef Py_ssize_t n = mask.shape[0], w
        if dbit == 0:
            raise ValueError("this SPTE format has no dirty bit: pass wrprot=True")
        if base & 63:
            raise ValueError(f"base_gfn={base:#x} is not a multiple of 64")
        if n and base + 64 * <uint64_t>n - 1 < base:
            raise ValueError("base_gfn + 64 * len(mask) wraps")
        out = _out_array("out", out, n, np.uint64, inputs=(mask,))
        m_arr = np.array(mask, copy=True)
        cdef const uint64_t[::1] mk = m_arr
        cdef uint64_t[::1] o = out
        self._enter("TdpMmuCore.clear_dirty_log")
        try:
            self._root(c_root)
            with nogil:
                for w in range(n):
                    o[w] = kvm_tdp_mmu_clear_dirty_pt_masked(&self.m, c_root, base + 64 * <uint64_t>w,
                                                             mk[w], dbit)
        finally:
            self._leave()
        return out

    def split_huge_pages(self, root, start, end, target_level, MmuMemoryCache page_cache not None,
                         MmuMemoryCache header_cache not None, *, nx_huge_pages=False):
        """``kvm_tdp_mmu_try_split_huge_pages`` over [start, end) down to
        `target_level` (eager page splitting when dirty logging starts).
        Returns the huge pages split.  Pages come from the caches, topped up
        from the arena (which grows) whenever they run dry."""
        cdef uint64_t c_root = u64_arg(root, "root"), s, e, resume = 0
        cdef int target = s32_arg(target_level, "target_level")
        cdef int64_t total = 0
        cdef int r
        cdef bint nx = bool(nx_huge_pages)
        self._range(start, end, &s, &e)
        if not PG_LEVEL_4K <= target < PG_LEVEL_1G:
            raise ValueError(f"target_level={target} is outside 1..{PG_LEVEL_1G - 1}")
        self._check_caches(page_cache, header_cache)
        cdef pt_arena_t *a = self.m.a
        self._enter("TdpMmuCore.split_huge_pages")
        try:
            self._root(c_root)
            while True:
                if kvm_mmu_topup_memory_cache(&page_cache.mc, 1, pt_pool_alloc,
                                              &a.pools[PT_CACHE_SHADOW_PAGE]) or \
                        kvm_mmu_topup_memory_cache(&header_cache.mc, 1, pt_pool_alloc,
                                                   &a.pools[PT_CACHE_PAGE_HEADER]):
                    self.arena._grow_for(64, 64)
                    continue
                with nogil:
                    r = tdp_mmu_split_huge_pages_root(&self.m, c_root, s, e, target,
                                                      &page_cache.mc, &header_cache.mc, nx, &resume,
                                                      &total)
                if r == 0:
                    return total
                s = resume                              # refill, then go on from there
        finally:
            self._leave()

    def recover_huge_pages(self, root, base_gfn, npages, max_level, *, nx_huge_pages=False):
        """``kvm_tdp_mmu_recover_huge_pages`` for the memslot [base_gfn,
        base_gfn + npages): `max_level` (int8, one per 2M frame of the slot)
        is ``kvm_mmu_max_mapping_level`` at each frame's first gfn.  Returns
        the entries made huge again (flush the slot if any).  The torn-down
        tables are freed after a grace period."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef uint64_t base = u64_arg(base_gfn, "base_gfn")
        cdef uint64_t n = u64_arg(npages, "npages")
        cdef int64_t r
        _check_array("max_level", max_level, np.int8)
        if base + n < base:
            raise ValueError("base_gfn + npages wraps")
        if max_level.shape[0] != ((base + n - 1) >> 9) - (base >> 9) + 1 and n:
            raise ValueError(f"max_level needs one entry per 2M frame of the slot "
                             f"({((base + n - 1) >> 9) - (base >> 9) + 1}), not {max_level.shape[0]}")
        if base & 511:
            raise ValueError(f"base_gfn={base:#x} is not 2M aligned (the frames would not match)")
        ml_arr = np.array(max_level, copy=True)
        cdef const signed char[::1] ml = ml_arr
        cdef bint nx = bool(nx_huge_pages)
        self._enter("TdpMmuCore.recover_huge_pages")
        try:
            self._root(c_root)
            if n == 0:
                return 0
            with nogil:
                r = kvm_tdp_mmu_recover_huge_pages(&self.m, c_root, base, n, &ml[0], nx)
        finally:
            self._leave()
        return r

    def map_one(self, root, gfn, pfn, goal_level, MmuMemoryCache page_cache not None,
                MmuMemoryCache header_cache not None, *, write=False, exec=False,
                prefetch=False, map_writable=True, nx_huge_pages=False, req_level=None,
                mmio_gen=None):
        """``kvm_tdp_mmu_map`` for one fault (the scalar path a vCPU takes):
        `gfn` is the faulting gfn, `pfn` the host pfn aligned to
        `goal_level` (``kvm_mmu_hugepage_adjust``).  The caches must hold enough for the walk (``mmu_topup_memory_caches``
        before taking the lock); returns RET_PF_*.  `req_level` (default the
        goal) only matters with the NX workaround.  ``mmio_gen`` (an int):
        the gfn has no memslot, install an MMIO SPTE with that memslot
        generation at 4K (`pfn` is ignored) and return RET_PF_EMULATE."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef tdp_fault fault
        fault.gfn = u64_arg(gfn, "gfn")
        fault.pfn = u64_arg(pfn, "pfn")
        fault.goal_level = s32_arg(goal_level, "goal_level")
        fault.req_level = fault.goal_level if req_level is None else s32_arg(req_level, "req_level")
        fault.write, fault.exec, fault.prefetch = bool(write), bool(exec), bool(prefetch)
        fault.map_writable, fault.nx_huge_pages = bool(map_writable), bool(nx_huge_pages)
        fault.huge_page_disallowed = fault.exec and fault.nx_huge_pages
        self._ready("TdpMmuCore.map_one")
        fault.noslot = mmio_gen is not None
        fault.mmio_gen = 0 if mmio_gen is None else u64_arg(mmio_gen, "mmio_gen")
        if fault.noslot and (fault.goal_level != PG_LEVEL_4K or not self.m.f.mmio_caching):
            raise ValueError("an MMIO SPTE goes at 4K, with MMIO caching enabled")
        cdef uint64_t mask
        cdef int top, r
        if not PG_LEVEL_4K <= fault.goal_level <= PG_LEVEL_1G:
            raise ValueError(f"goal_level={fault.goal_level} is outside 1..{PG_LEVEL_1G}")
        mask = _pages(fault.goal_level) - 1
        if (fault.pfn & mask) or fault.pfn >> 40:
            raise ValueError(f"pfn={fault.pfn:#x} is not aligned to level {fault.goal_level}, "
                             f"or >= 2**40")
        if page_cache.mc.nobjs < PT64_ROOT_MAX_LEVEL or header_cache.mc.nobjs < PT64_ROOT_MAX_LEVEL:
            raise KvmNoMemoryError("map_one: top the caches up first (mmu_topup_memory_caches)")
        self._check_caches(page_cache, header_cache)
        self._enter("TdpMmuCore.map_one")
        try:
            top = self._root(c_root)
            if fault.gfn >> (SPTE_LEVEL_BITS * top):
                raise ValueError(f"gfn={fault.gfn:#x} is beyond what the root maps")
            r = kvm_tdp_mmu_map(&self.m, c_root, &fault, &page_cache.mc, &header_cache.mc)
        finally:
            self._leave()
        return r

    def fast_page_fault(self, root, gfn, *, write=False, exec=False, slot_dirty_tracked=False):
        """``fast_page_fault`` on a TDP root: ``(RET_PF_*, made_writable,
        last_spte)``, RET_PF_INVALID meaning "take the slow path";
        `last_spte` is the last entry on the gfn's path (an MMIO SPTE there
        means the hardware reports a reserved-bit fault).  Runs without mmu_lock
        in the kernel (RCU only); the model serializes it with the arena's
        writers."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef tdp_fault fault
        cdef bint made = False
        cdef bint logged = bool(slot_dirty_tracked)
        cdef int r
        cdef uint64_t last = 0
        fault.gfn = u64_arg(gfn, "gfn")
        fault.write, fault.exec, fault.prefetch = bool(write), bool(exec), False
        self._enter("TdpMmuCore.fast_page_fault")
        try:
            top = self._root(c_root)
            if fault.gfn >> (SPTE_LEVEL_BITS * top):
                raise ValueError(f"gfn={fault.gfn:#x} is beyond what the root maps")
            r = tdp_fast_page_fault(&self.m, c_root, &fault, logged, &made, &last)
        finally:
            self._leave()
        return r, bool(made), last

    @property
    def nx_lpage_splits(self):
        """``kvm->stat.nx_lpage_splits``: tables on the possible-NX list."""
        return self.m.nx_lpage_splits

    def possible_nx_huge_pages(self):
        """The sp handles on ``possible_nx_huge_pages[KVM_TDP_MMU]``, oldest first."""
        out = []
        cdef uint64_t node = self.m.nx_head_next
        while node > 1 and len(out) <= self.m.nx_lpage_splits:
            out.append(node - 1)
            node = pt_sp_ptr(self.m.a, node - 1).nx_link_next
        return out

    def recover_nx_huge_page(self, sp, *, zap=True):
        """One step of ``kvm_recover_nx_huge_pages`` for the TDP MMU: take `sp`
        off the list and clear its flag (``unaccount_nx_huge_page``), then,
        if `zap` (its memslot does not log dirty pages), zap the SPTE linking
        it if it still does (``kvm_tdp_mmu_zap_possible_nx_huge_page``, an
        atomic set that tears the table down).  True if it was zapped (the
        caller flushes)."""
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        cdef kvm_mmu_page *h
        cdef tdp_iter it
        cdef bint zapped = False
        self._enter("TdpMmuCore.recover_nx_huge_page")
        try:
            if c_sp == 0 or c_sp > self.m.a.headers_hw or \
                    pt_slot(self.m.a, c_sp - 1).sp_state != PT_SP_IN_USE:
                raise ValueError(f"sp {c_sp} is not a live sp of this arena")
            h = pt_sp_ptr(self.m.a, c_sp)
            if h.nx_link_next == 0:
                raise ValueError(f"sp {c_sp} is not on the possible NX huge page list")
            if not h.nx_huge_page_disallowed or not h.tdp_mmu_page or h.ptep == 0:
                self.m.warn[TDP_WARN_NX_RECOVER] += 1
            h.nx_huge_page_disallowed = 0
            untrack_possible_nx_huge_page(&self.m, c_sp)
            if zap and h.ptep != 0 and not pt_sptep_in_arena(self.m.a, h.ptep):
                self.m.warn[TDP_WARN_NX_RECOVER] += 1       # a ptep rewritten from Python
            elif zap and h.ptep != 0:
                it.sptep = h.ptep
                it.old_spte = kvm_tdp_mmu_read_spte(self.m.a, h.ptep)
                it.level = <int>role_level(h.role) + 1
                it.gfn = h.gfn
                it.as_id = <int>role_as_id(h.role)
                it.yielded = False
                if spte_to_child_sp(self.m.a, it.old_spte) == c_sp:
                    zapped = tdp_mmu_set_spte_atomic(&self.m, &it, self.m.f.nonpresent_value) == 0
        finally:
            self._leave()
        return bool(zapped)

    # -----------------------------------------------------------------------
    # The scalar fault entry (kvmmmu.mmu.kvm_mmu_page_fault -> TdpMmu)
    # -----------------------------------------------------------------------
    def get_last_spte(self, root, gfn):
        """The last entry on `gfn`'s path under `root` and its level
        (``kvm_tdp_mmu_fast_pf_get_last_sptep``, a lockless walk; what
        ``get_mmio_spte`` looks at): ``(spte, level)``, ``(0, 0)`` when `gfn`
        is beyond what the root maps.  Changes nothing; serialized with the
        arena's writers, as :meth:`fast_page_fault` is."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef uint64_t c_gfn = u64_arg(gfn, "gfn")
        cdef uint64_t spte = 0
        cdef int level = 0, top
        cdef sptep_t sptep = 0
        self._enter("TdpMmuCore.get_last_spte")
        try:
            top = self._root(c_root)
            if not c_gfn >> (SPTE_LEVEL_BITS * top):
                sptep = kvm_tdp_mmu_fast_pf_get_last_sptep(&self.m, c_root, c_gfn, &spte, &level)
        finally:
            self._leave()
        if sptep == 0:
            return 0, 0
        return spte, level

    def page_fault_map(self, root, gfn, pfn, goal_level, req_level, flags, mmio_gen,
                       MmuMemoryCache page_cache not None, MmuMemoryCache header_cache not None):
        """``kvm_tdp_mmu_map`` for the scalar fault entry, with positional
        arguments only (no keyword parsing on the hot path).  `pfn` is the
        host pfn of `gfn` itself: it is aligned down to `goal_level` here
        (what ``kvm_mmu_hugepage_adjust`` does to ``fault->pfn``).  `flags`:
        bit 0 write, 1 exec, 2 prefetch, 3 map_writable, 4 the NX huge page
        workaround, 5 no memslot (an MMIO SPTE carrying `mmio_gen`, at 4K).
        The caches must hold what a walk may take (``mmu_topup_memory_caches``
        ran before faultin).  Returns RET_PF_* (or -ENOMEM)."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef tdp_fault fault
        cdef int fl = s32_arg(flags, "flags")
        cdef int top, r
        fault.gfn = u64_arg(gfn, "gfn")
        fault.pfn = u64_arg(pfn, "pfn")
        fault.goal_level = s32_arg(goal_level, "goal_level")
        fault.req_level = s32_arg(req_level, "req_level")
        fault.mmio_gen = u64_arg(mmio_gen, "mmio_gen")
        if fl < 0 or fl >> 6:
            raise ValueError(f"flags={fl:#x} has bits other than 0..5")
        fault.write, fault.exec, fault.prefetch = fl & 1, (fl >> 1) & 1, (fl >> 2) & 1
        fault.map_writable, fault.nx_huge_pages = (fl >> 3) & 1, (fl >> 4) & 1
        fault.noslot = (fl >> 5) & 1
        fault.huge_page_disallowed = fault.exec and fault.nx_huge_pages
        if not PG_LEVEL_4K <= fault.goal_level <= PG_LEVEL_1G:
            raise ValueError(f"goal_level={fault.goal_level} is outside 1..{PG_LEVEL_1G}")
        if not PG_LEVEL_4K <= fault.req_level <= PG_LEVEL_1G:
            raise ValueError(f"req_level={fault.req_level} is outside 1..{PG_LEVEL_1G}")
        if fault.noslot:
            if fault.goal_level != PG_LEVEL_4K or not self.m.f.mmio_caching:
                raise ValueError("an MMIO SPTE goes at 4K, with MMIO caching enabled")
            fault.pfn = 0
        elif fault.pfn >> 40:
            raise ValueError(f"pfn={fault.pfn:#x} is >= 2**40")
        fault.pfn &= ~(_pages(fault.goal_level) - 1)
        if page_cache.mc.nobjs < PT64_ROOT_MAX_LEVEL or header_cache.mc.nobjs < PT64_ROOT_MAX_LEVEL:
            raise KvmNoMemoryError("page_fault_map: top the caches up first (mmu_topup_memory_caches)")
        # _check_caches without its tuple loop (this is the per-fault path)
        if page_cache.arena is not self.arena or page_cache.kind != PT_CACHE_SHADOW_PAGE or \
                header_cache.arena is not self.arena or header_cache.kind != PT_CACHE_PAGE_HEADER:
            self._check_caches(page_cache, header_cache)
        self._enter("TdpMmuCore.page_fault_map")
        try:
            top = self._root(c_root)
            if fault.gfn >> (SPTE_LEVEL_BITS * top):
                raise ValueError(f"gfn={fault.gfn:#x} is beyond what the root maps")
            r = kvm_tdp_mmu_map(&self.m, c_root, &fault, &page_cache.mc, &header_cache.mc)
        finally:
            self._leave()
        return r
