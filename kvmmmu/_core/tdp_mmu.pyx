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
  of that table is frozen (``FROZEN_SPTE``; under the read lock by ``xchg``,
  waiting while another thread holds the entry FROZEN — bounded: the model
  has no long-lived freeze, so an entry still FROZEN after ~20 ms, or a
  table reached twice by one removal, is a planted cycle, counted
  ``TDP_WARN_FROZEN_IN_REMOVED``), handled recursively, and the table
  is freed after an RCU grace period.  A present leaf never changes pfn
  (the kernel BUG()s; the model counts ``TDP_BUG_PFN_CHANGED``).

``kvm_tdp_mmu_map`` is the fault path's walk: down to ``goal_level``,
linking a new table where an entry is empty and splitting a huge leaf in
place where the goal is lower (``tdp_mmu_split_huge_page``); at the goal,
the leaf from ``make_spte``, or RET_PF_SPURIOUS when the existing leaf
already allows the access.  ``tdp_mmu_zap_leafs`` and ``tdp_mmu_zap_root``
are the write-locked zaps.

Concurrency is the kernel's: the map path, ``fast_page_fault`` and the
shared zap of a root run under ``mmu_lock`` held for read on any number of
threads at once (``TdpMmuCore``'s shared side, without the GIL), every
change a ``try_cmpxchg64`` with RET_PF_RETRY on a lost race, each walk an
RCU read-side section of the arena; ``tdp_mmu_pages``, the page stats and
the WARN counters are atomics, the possible-NX list is under
``tdp_mmu_pages_lock`` (a spinlock), pages come from the caller's own
caches.  Everything else is write-locked (exclusive).

Mirror roots (TDX; a root whose role has ``is_mirror``, in a VM that
installed external hooks with ``TdpMmuCore.set_external_ops``) follow the
kernel's extra rules, each a KVM_BUG_ON site here (mirror-tdx.md §4, §11):

* a mirror SPTE goes non-present -> present only through
  ``set_external_spte_present``: cmpxchg to FROZEN_SPTE, the hook
  (``link_external_spt`` for a table, ``set_external_spte`` for a leaf),
  then the new value - or the old one back when the hook failed (-EBUSY for
  TDX_OPERAND_BUSY: the fault retries).  The S-EPT changes before the mirror
  SPTE becomes present, and only one thread at a time is inside a hook for
  one SPTE;
* present -> non-present only under the write lock (``tdp_mmu_set_spte``),
  a leaf through ``remove_external_spte``; a removed mirror table hands each
  leaf to it and gives its ``external_spt`` back with ``free_external_spt``;
* no huge mirror leaf, no atomic zap of a mirror SPTE, no present value
  written under the write lock.
The hooks are Python (the TDX side, ``kvmmmu.tdx``): the walk takes the GIL
for each call and nothing else.
"""
from libc.stdint cimport uint64_t, int64_t, uint32_t, uint8_t
from libc.stdlib cimport malloc, free

import numpy as np

from kvmmmu._core.argcheck cimport u64_arg, s32_arg, s64_arg
from kvmmmu._core.types cimport sptep_t, make_sptep, sptep_table_pfn
from kvmmmu._core.pt_arena_defs cimport (
    pt_arena_t, kvm_mmu_page, pt_pool, pt_sp_ptr, pt_slot, pt_sptep_ptr, pt_page_sp,
    pt_read_once64, pt_write_once64, pt_xchg64, pt_try_cmpxchg64, pt_sptep_in_arena,
    spte_to_child_sp, PT_SP_IN_USE, PT_CACHE_SHADOW_PAGE, PT_CACHE_PAGE_HEADER,
    PT_WARN_BAD_LEVEL, KVM_NR_PAGE_SIZES, pt_spin_lock, pt_spin_unlock, pt_atomic_add_s64,
    pt_atomic_inc_u32, pt_cpu_relax, pt_yield, pt_now_ns,
)
from kvmmmu._core.pt_arena cimport PtArena, MmuMemoryCache
from kvmmmu._core.mmu_spte cimport kvm_update_page_stats, _spte_writable_invariants_ok
from kvmmmu._core.pt_pool cimport pt_pool_alloc, pt_alloc_sp, pt_free_sp
from kvmmmu._core.mmu_lockless cimport call_rcu_free_sp, pt_shared_rcu_lock, pt_shared_rcu_unlock
from kvmmmu._core.memcache cimport kvm_mmu_memory_cache, kvm_mmu_topup_memory_cache
from kvmmmu._core.role cimport (
    role_level, role_set_level, role_as_id, role_ad_disabled, role_is_mirror,
)
from kvmmmu._core.spte cimport (
    spte_fmt_t, SpteFormat, SPTE_LEVEL_BITS, SPTE_ENT_PER_PAGE, PG_LEVEL_4K, PG_LEVEL_1G,
    PT64_ROOT_MAX_LEVEL, PT_PRESENT_MASK, ACC_ALL,
    is_shadow_present_pte, is_last_spte, is_large_pte, is_writable_pte, is_executable_pte,
    is_mmio_spte, is_frozen_spte, is_mmu_writable_spte, spte_to_pfn, spte_needs_atomic_update,
    is_accessed_spte, spte_ad_enabled, PT_WRITABLE_MASK, spte_index_of,
    SPTE_TDP_AD_MASK, SPTE_TDP_AD_DISABLED,
    make_spte, make_mmio_spte, make_nonleaf_spte, make_small_spte, make_huge_spte,
    mark_spte_for_access_track,
    is_access_track_spte, restore_acc_track_spte,
    MKSPTE_PREFETCH, MKSPTE_HOST_WRITABLE, MKSPTE_AD_DISABLED, MKSPTE_NX_HUGE_PAGES,
)
from kvmmmu._core.tdp_iter cimport (
    tdp_iter, tdp_iter_start, tdp_iter_next, kvm_tdp_mmu_read_spte, spte_to_child_pt,
    kvm_gfn_root_bits,
    tdp_mmu_iter_cond_resched, tdp_mmu_iter_need_resched,
)
from kvmmmu._core.tdp_trace cimport (
    tdp_trace_flush, tdp_trace_spte_changed, tdp_trace_changed_on, tdp_trace_map_events_on,
    tdp_trace_iter_changed,
    tdp_trace_get_page, tdp_trace_prepare_zap_page, tdp_trace_spte_requested,
    tdp_trace_split_huge_page, tdp_trace_map_target, tdp_trace_fast_page_fault,
    tdp_trace_masked_clear,
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
    #define tdp_inc(p) ((void)__atomic_fetch_add((p), 1, __ATOMIC_RELAXED))
    #define tdp_prefetch(p) __builtin_prefetch((const void *)(p), 1, 3)
    """
    void tdp_prefetch(const uint64_t *p) nogil
    int64_t tdp_stat_add(int64_t *p, int64_t v) nogil
    uint64_t tdp_fetch_and64(uint64_t *p, uint64_t v) nogil
    # A WARN counter or a statistic the shared side moves: atomic, relaxed.
    void tdp_inc(uint64_t *p) nogil

cdef enum:
    _EIO = 5
    _EBUSY = 16
    _ENOMEM = 12
    _EAGAIN = 11

# handle_removed_pt marks a table it is tearing down in the rcu_head's next
# link (unused until call_rcu): reaching the same table again (a cycle
# planted through a writable table view) stops there instead of freezing
# and freeing it twice.
cdef uint64_t _RCU_REMOVING = 0xFFFFFFFFFFFFFFFF
# How long handle_removed_pt waits, in all, for FROZEN entries of one table
# to change (another thread between its freeze and its final write; long
# enough for a preempted writer on a busy machine, short enough that a
# FROZEN value planted through a table view costs little).
cdef uint64_t _FROZEN_WAIT_NS = 20000000

#: The external hook calls a mirror root makes (``TdpMmuCore.set_external_ops``).
EXT_OPS = {"link_external_spt": EXT_LINK_SPT, "set_external_spte": EXT_SET_SPTE,
           "remove_external_spte": EXT_REMOVE_SPTE, "free_external_spt": EXT_FREE_SPT,
           "alloc_external_spt": EXT_ALLOC_SPT, "free_external_spt_page": EXT_FREE_PAGE,
           "kvm_bug": EXT_BUG}

#: The codes of :meth:`TdpMmuCore.guest_access_batch` / :meth:`GuestAccessBatch.run`:
#: run's status, the per-gfn class bits, the per-access flags.
GUEST_ACCESS = {"DONE": GA_DONE, "SLOW": GA_SLOW, "GIVE_UP": GA_GIVE_UP,
                "UNEXPECTED": GA_UNEXPECTED, "CLASS_SLOW": GA_CLASS_SLOW,
                "HOST_PTE_PRESENT": GA_HOST_PTE_PRESENT, "HOST_PTE_WRITE": GA_HOST_PTE_WRITE,
                "HOST_PTE_YOUNG": GA_HOST_PTE_YOUNG, "HOST_PTE_DIRTY": GA_HOST_PTE_DIRTY,
                "CLASS_NOFAST": GA_CLASS_NOFAST, "CLASS_LOGGED": GA_CLASS_LOGGED,
                "MADE_WRITABLE": GA_MADE_WRITABLE, "DIRTIED": GA_DIRTIED}

#: One entry of :meth:`TdpMmuCore.dump`.
DUMP_DTYPE = np.dtype([("gfn", np.uint64), ("level", np.int8), ("spte", np.uint64),
                       ("leaf", np.bool_), ("sp", np.uint64), ("external_spt", np.uint64)])

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
    "__tdp_mmu_set_spte_atomic: a mirror SPTE zapped under the read lock (KVM_BUG_ON)",
    "set_external_spte_present: the old mirror SPTE is present (KVM_BUG_ON)",
    "tdp_mmu_set_spte: a present value written to a mirror SPTE under the write lock (KVM_BUG_ON)",
    "handle_removed_pt: a mirror table removed under the read lock (KVM_BUG_ON)",
    "kvm_tdp_mmu_map: a huge mirror leaf would need splitting (KVM_BUG_ON)",
    "set_external_spte_present: a mirror table without its external_spt (KVM_BUG_ON)",
    "remove_external_spte: the hook failed (KVM_BUG_ON)",
    "handle_removed_pt: free_external_spt failed, the S-EPT page is leaked (WARN_ON)",
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


cdef inline uint64_t _freeze_shared(tdp_mmu_t *m, uint64_t *p,
                                    uint64_t *budget_end) noexcept nogil:
    """Freeze one entry of a removed table under the read lock: xchg in
    FROZEN_SPTE, and while the old value was FROZEN (another thread is
    between its own freeze and its final write) wait for it to change.  The
    wait is bounded by the removal's budget, `*budget_end` (0: not started,
    1: spent): the model has no writer that keeps an entry FROZEN for long,
    so an entry still FROZEN after it belongs to a table removed twice.
    Returns the old value, FROZEN when given up."""
    cdef uint64_t frozen = m.f.frozen_spte, old, spins = 0
    old = pt_xchg64(p, frozen)
    while is_frozen_spte(m.f, old) and budget_end[0] != 1:
        if budget_end[0] == 0:
            budget_end[0] = pt_now_ns() + _FROZEN_WAIT_NS
        spins += 1
        if (spins & 63) == 0:
            if pt_now_ns() >= budget_end[0]:
                budget_end[0] = 1
                break
            pt_yield()
        else:
            pt_cpu_relax()
        old = pt_xchg64(p, frozen)
    return old


# ---------------------------------------------------------------------------
# Mirror roots (TDX): the kvm_x86_ops external hooks
# ---------------------------------------------------------------------------
# A mirror table's header has role.is_mirror; its SPTEs are KVM's copy of the
# S-EPT, which only the TDX module holds.  Every change of a mirror SPTE goes
# to the module through m.ext_ops (a Python callable, mirror-tdx.md §4):
# non-present -> present under the read lock with the entry FROZEN while the
# hook runs (set_external_spte_present), present leaf -> non-present only
# under the write lock (remove_external_spte), tables given back only when
# they are freed (free_external_spt).

cdef int64_t _ext_call(tdp_mmu_t *m, int op, uint64_t gfn, int level,
                       uint64_t arg) noexcept nogil:
    """Call the VM's external hook `op` with the GIL taken.  An exception
    from it (a broken test double) becomes -EIO; the callable records it."""
    with gil:
        try:
            return (<object>m.ext_ops)(op, gfn, level, arg)
        except BaseException:
            return -5                               # -EIO


cdef inline bint is_mirror_sptep(tdp_mmu_t *m, sptep_t sptep) noexcept nogil:
    """The SPTE lies in a mirror table (its header has role.is_mirror)."""
    return m.ext_ops != NULL and \
        role_is_mirror(pt_sp_ptr(m.a, pt_page_sp(m.a, sptep_table_pfn(sptep))).role)


cdef inline void _mirror_bug(tdp_mmu_t *m, int site, uint64_t gfn, int level) noexcept nogil:
    """KVM_BUG_ON at a mirror site: counted, and the VM is bugged."""
    tdp_inc(&m.warn[site])
    _ext_call(m, EXT_BUG, gfn, level, <uint64_t>site)


cdef inline void _remove_external_spte(tdp_mmu_t *m, uint64_t gfn, uint64_t old_spte,
                                       int level) noexcept nogil:
    """The tdp_mmu.c wrapper: only a present leaf at `level` goes to the
    hook (tables go through handle_removed_pt and free_external_spt); the
    write lock is held (every caller here is a write-locked path)."""
    if not (is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level)):
        return
    if _ext_call(m, EXT_REMOVE_SPTE, gfn, level, old_spte) != 0:
        tdp_inc(&m.warn[TDP_BUG_REMOVE_EXTERNAL])


cdef int set_external_spte_present(tdp_mmu_t *m, tdp_iter *it, uint64_t new_spte) noexcept nogil:
    """A mirror SPTE goes non-present -> present: freeze it, have the hook
    change the S-EPT, then store `new_spte` (the hook succeeded) or the old
    value back (it failed: its error, -EBUSY for TDX_OPERAND_BUSY).  A lost
    cmpxchg is -EBUSY with it.old_spte left as it was (the kernel works on a
    local copy; the fault retries)."""
    cdef uint64_t old = it.old_spte, expect = it.old_spte, child
    cdef uint64_t *p = pt_sptep_ptr(m.a, it.sptep)
    cdef int64_t r
    if is_shadow_present_pte(old):
        _mirror_bug(m, TDP_BUG_MIRROR_WAS_PRESENT, it.gfn, it.level)
        return -_EIO
    if not pt_try_cmpxchg64(p, &expect, m.f.frozen_spte):
        return -_EBUSY
    if is_last_spte(new_spte, it.level):
        r = _ext_call(m, EXT_SET_SPTE, it.gfn, it.level, new_spte)
    else:
        child = spte_to_child_sp(m.a, new_spte)
        if child == 0 or pt_sp_ptr(m.a, child).external_spt == 0 or \
                <int>role_level(pt_sp_ptr(m.a, child).role) != it.level - 1 or \
                pt_sp_ptr(m.a, child).gfn != it.gfn:
            _mirror_bug(m, TDP_BUG_NO_EXTERNAL_SPT, it.gfn, it.level)
            r = -_EIO
        else:
            r = _ext_call(m, EXT_LINK_SPT, it.gfn, it.level, pt_sp_ptr(m.a, child).external_spt)
    pt_write_once64(p, old if r else new_spte)
    return <int>r


cdef void handle_removed_pt(tdp_mmu_t *m, uint64_t sp, bint shared) noexcept nogil:
    """A table is no longer reachable: freeze and handle each entry, then
    free the table after a grace period (its entries stay FROZEN, so a
    walker of another thread still inside sees only non-present values and
    its cmpxchg there fails)."""
    cdef kvm_mmu_page *h = pt_sp_ptr(m.a, sp)
    cdef int level = <int>role_level(h.role)
    cdef int as_id = <int>role_as_id(h.role)
    cdef uint64_t base = h.gfn, frozen = m.f.frozen_spte, old, budget_end = 0
    cdef uint64_t *p
    cdef int i
    cdef bint mirror = m.ext_ops != NULL and role_is_mirror(h.role)
    if level < PG_LEVEL_4K or level >= PT64_ROOT_MAX_LEVEL:
        tdp_inc(&m.warn[TDP_WARN_CHILD_NOT_TABLE])      # a header rewritten from Python
        return
    if pt_xchg64(&h.rcu_next, _RCU_REMOVING) == _RCU_REMOVING:
        # Already being torn down further up this removal (a table cycle):
        # its first visit freezes, accounts and frees it.
        tdp_inc(&m.warn[TDP_WARN_FROZEN_IN_REMOVED])
        return
    tdp_trace_prepare_zap_page(m.a, sp)
    tdp_stat_add(&m.tdp_mmu_pages, -1)                  # tdp_unaccount_mmu_page
    if h.nx_huge_page_disallowed:
        # tdp_mmu_unlink_sp: the flag goes under the lock, so that a thread
        # that linked this table and is about to list it sees it cleared.
        pt_spin_lock(&m.nx_lock)
        h.nx_huge_page_disallowed = 0
        untrack_possible_nx_huge_page(m, sp)
        pt_spin_unlock(&m.nx_lock)
    for i in range(SPTE_ENT_PER_PAGE):
        p = pt_sptep_ptr(m.a, make_sptep(h.spt, i))
        if shared:
            old = _freeze_shared(m, p, &budget_end)
            if is_frozen_spte(m.f, old):
                tdp_inc(&m.warn[TDP_WARN_FROZEN_IN_REMOVED])
                continue
        else:
            old = pt_read_once64(p)
            if not is_shadow_present_pte(old):
                continue
            old = kvm_tdp_mmu_write_spte(m, make_sptep(h.spt, i), old, frozen, level)
        handle_changed_spte(m, as_id, base + <uint64_t>i * _pages(level), old, frozen, level, shared)
        if mirror:
            if shared:
                _mirror_bug(m, TDP_BUG_MIRROR_SHARED_PT, base + <uint64_t>i * _pages(level), level)
            _remove_external_spte(m, base + <uint64_t>i * _pages(level), old, level)
    if mirror and h.external_spt:
        # give the S-EPT page back (TDX: only once the HKID is released);
        # a failure leaks it: the header forgets the page
        if _ext_call(m, EXT_FREE_SPT, base, level, h.external_spt) != 0:
            tdp_inc(&m.warn[TDP_WARN_FREE_EXTERNAL_SPT])
        h.external_spt = 0
    if pt_slot(m.a, sp - 1).sp_state == PT_SP_IN_USE:   # not freed by a cycle meanwhile
        call_rcu_free_sp(m.a, sp)
    else:
        tdp_inc(&m.warn[TDP_WARN_FROZEN_IN_REMOVED])


cdef inline void _page_stats(tdp_mmu_t *m, int level, int64_t count) noexcept nogil:
    """kvm_update_page_stats: atomic64_add, as the read-lock paths of several
    threads move the counters at once."""
    if 1 <= level <= KVM_NR_PAGE_SIZES:
        pt_atomic_add_s64(&m.a.pages[level - 1], count)
    else:
        pt_atomic_inc_u32(&m.a.warn[PT_WARN_BAD_LEVEL])


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
        tdp_inc(&m.warn[TDP_WARN_BAD_LEVEL_OR_GFN])
    if was_leaf and is_leaf and pfn_changed:
        tdp_inc(&m.warn[TDP_BUG_PFN_CHANGED])
    if old_spte == new_spte:
        return
    tdp_trace_spte_changed(as_id, gfn, level, old_spte, new_spte)
    if is_leaf and not _spte_writable_invariants_ok(m.f, new_spte):
        tdp_inc(&m.warn[TDP_WARN_WRITABLE_INVARIANT])
    if not was_present and not is_present:
        if not (is_mmio_spte(m.f, old_spte) or is_mmio_spte(m.f, new_spte)
                or is_frozen_spte(m.f, new_spte)):
            tdp_inc(&m.warn[TDP_WARN_NONPRESENT_CHANGE])
        return
    if was_leaf != is_leaf:
        _page_stats(m, level, 1 if is_leaf else -1)
    if was_present and not was_leaf and (is_leaf or not is_present or pfn_changed):
        child = spte_to_child_sp(m.a, old_spte)
        if child == 0 or pt_slot(m.a, child - 1).sp_state != PT_SP_IN_USE:
            tdp_inc(&m.warn[TDP_WARN_CHILD_NOT_TABLE])
            return
        handle_removed_pt(m, child, shared)


cdef int tdp_mmu_set_spte_atomic(tdp_mmu_t *m, tdp_iter *it, uint64_t new_spte) noexcept nogil:
    """cmpxchg the iterator's SPTE from it.old_spte to `new_spte`: 0, or
    -EBUSY (it.old_spte now holds the current value) if someone else changed
    it first."""
    cdef int r
    if it.yielded or is_frozen_spte(m.f, it.old_spte):
        tdp_inc(&m.warn[TDP_WARN_SET_YIELDED])
    if is_mirror_sptep(m, it.sptep) and not is_frozen_spte(m.f, new_spte):
        # a mirror SPTE changes only non-present -> present here, through the hook
        if not is_shadow_present_pte(new_spte):
            _mirror_bug(m, TDP_BUG_MIRROR_ZAP_ATOMIC, it.gfn, it.level)
            return -_EBUSY
        r = set_external_spte_present(m, it, new_spte)
        if r:
            return r
    elif not pt_try_cmpxchg64(pt_sptep_ptr(m.a, it.sptep), &it.old_spte, new_spte):
        return -_EBUSY
    handle_changed_spte(m, it.as_id, it.gfn, it.old_spte, new_spte, it.level, True)
    return 0


cdef uint64_t tdp_mmu_set_spte(tdp_mmu_t *m, int as_id, sptep_t sptep, uint64_t old_spte,
                               uint64_t new_spte, uint64_t gfn, int level) noexcept nogil:
    """The write-locked setter; returns the value really replaced (it can
    differ from `old_spte` only in bits others may set)."""
    if is_frozen_spte(m.f, old_spte) or is_frozen_spte(m.f, new_spte):
        tdp_inc(&m.warn[TDP_WARN_SET_FROZEN])
    old_spte = kvm_tdp_mmu_write_spte(m, sptep, old_spte, new_spte, level)
    handle_changed_spte(m, as_id, gfn, old_spte, new_spte, level, False)
    if is_mirror_sptep(m, sptep):
        # the write-locked paths only zap mirror SPTEs
        if is_shadow_present_pte(new_spte):
            _mirror_bug(m, TDP_BUG_MIRROR_SET_PRESENT, gfn, level)
        _remove_external_spte(m, gfn, old_spte, level)
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
        _page_stats(m, it.level - 1, SPTE_ENT_PER_PAGE)
    tdp_trace_split_huge_page(it.gfn, huge, it.level, r)
    return r


cdef inline void _fault_stats_init(tdp_fault *fault) noexcept nogil:
    fault.pages_delta[0] = fault.pages_delta[1] = fault.pages_delta[2] = 0


cdef inline void _fault_stats_flush(tdp_mmu_t *m, tdp_fault *fault) noexcept nogil:
    """Add the leaves the fault path counted into kvm->stat.pages (atomic)."""
    cdef int k
    for k in range(3):
        if fault.pages_delta[k]:
            pt_atomic_add_s64(&m.a.pages[k], fault.pages_delta[k])
            fault.pages_delta[k] = 0


cdef inline int _set_target_atomic(tdp_mmu_t *m, tdp_iter *it, tdp_fault *fault,
                                   uint64_t new_spte) noexcept nogil:
    """tdp_mmu_set_spte_atomic for the target entry of a fault.  The common
    change, a non-present entry becoming a leaf, needs from
    handle_changed_spte only its checks and one page-stat increment, which
    goes to the fault's own count; every other change takes the full
    handler."""
    cdef uint64_t old
    if m.ext_ops != NULL:
        # (a VM with mirror roots: a mirror leaf goes through its hook)
        return tdp_mmu_set_spte_atomic(m, it, new_spte)
    if it.yielded or is_frozen_spte(m.f, it.old_spte):
        tdp_inc(&m.warn[TDP_WARN_SET_YIELDED])
    if not pt_try_cmpxchg64(pt_sptep_ptr(m.a, it.sptep), &it.old_spte, new_spte):
        return -_EBUSY
    old = it.old_spte
    if not is_shadow_present_pte(old) and is_shadow_present_pte(new_spte) and \
            is_last_spte(new_spte, it.level) and PG_LEVEL_4K <= it.level <= PG_LEVEL_1G:
        if it.gfn & (_pages(it.level) - 1):
            tdp_inc(&m.warn[TDP_WARN_BAD_LEVEL_OR_GFN])
        if not _spte_writable_invariants_ok(m.f, new_spte):
            tdp_inc(&m.warn[TDP_WARN_WRITABLE_INVARIANT])
        fault.pages_delta[it.level - 1] += 1
        tdp_trace_spte_changed(it.as_id, it.gfn, it.level, old, new_spte)
    else:
        handle_changed_spte(m, it.as_id, it.gfn, old, new_spte, it.level, True)
    return 0


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
        tdp_inc(&m.warn[TDP_WARN_MAP_LEVEL])
        return RET_PF_RETRY
    if is_shadow_present_pte(old) and (fault.prefetch or _access_allowed(m, fault, old)) and \
            is_last_spte(old, it.level):
        if spte_to_pfn(old) != fault.pfn:
            tdp_inc(&m.warn[TDP_WARN_SPURIOUS_PFN])
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
    cdef int ret = RET_PF_FIXED
    if new_spte == old:
        # nothing to set; the write-protected and MMIO answers below still
        # apply, as in the kernel
        ret = RET_PF_SPURIOUS
    elif _set_target_atomic(m, it, fault, new_spte):
        return RET_PF_RETRY
    elif is_shadow_present_pte(old) and (not is_last_spte(old, it.level) or
                                         (is_mmu_writable_spte(m.f, old) and
                                          not is_mmu_writable_spte(m.f, new_spte))):
        tdp_inc(&m.nr_flushes)                # kvm_flush_remote_tlbs_gfn(gfn, level)
    tdp_trace_map_target(m.a, m.f, it.sptep, it.gfn, it.level, new_spte, ret)
    if wrprot and fault.write:
        return RET_PF_WRITE_PROTECTED
    if is_mmio_spte(m.f, new_spte):
        return RET_PF_EMULATE
    return ret


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
    tdp_trace_get_page(m.a, sp)


cdef int kvm_tdp_mmu_map(tdp_mmu_t *m, uint64_t root, tdp_fault *fault,
                         kvm_mmu_memory_cache *page_cache,
                         kvm_mmu_memory_cache *header_cache) noexcept nogil:
    """Map fault.gfn at fault.goal_level under `root`: RET_PF_*, or -ENOMEM
    if a cache ran dry (the kernel topped them up before; nothing linked
    stays half-built)."""
    cdef tdp_iter it
    cdef int r
    _fault_stats_init(fault)
    r = _tdp_mmu_map(m, root, fault, page_cache, header_cache, &it)
    _fault_stats_flush(m, fault)
    return r


cdef inline int _tdp_mmu_map(tdp_mmu_t *m, uint64_t root, tdp_fault *fault,
                             kvm_mmu_memory_cache *page_cache,
                             kvm_mmu_memory_cache *header_cache, tdp_iter *last) noexcept nogil:
    """kvm_tdp_mmu_map, leaving in *last the iterator at the target entry
    when the walk reached the goal level (last.level = 0 otherwise)."""
    cdef tdp_iter it
    cdef uint64_t sp
    cdef kvm_mmu_page *h
    cdef int r
    cdef int64_t ext
    cdef bint mirror = m.ext_ops != NULL and role_is_mirror(pt_sp_ptr(m.a, root).role)
    last.level = 0
    tdp_trace_spte_requested(fault.gfn, fault.pfn, fault.goal_level, fault.noslot)
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, fault.gfn, kvm_gfn_root_bits(m.a, root))
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
        if mirror:
            # kvm_mmu_alloc_external_spt: the page for the S-EPT, from the
            # vCPU's mmu_external_spt_cache
            ext = _ext_call(m, EXT_ALLOC_SPT, it.gfn, it.level - 1, sp)
            if ext <= 0:
                pt_free_sp(m.a, sp)
                return -_ENOMEM
            h.external_spt = <uint64_t>ext
        if is_shadow_present_pte(it.old_spte):
            if mirror:                              # no private huge pages
                _mirror_bug(m, TDP_BUG_MIRROR_HUGE, it.gfn, it.level)
                r = -_EIO
            else:
                r = _split_huge_page(m, &it, sp, fault.nx_huge_pages)
        else:
            r = _link_sp(m, &it, sp)
        if r:
            if mirror:                              # tdp_mmu_free_sp: the page too
                _ext_call(m, EXT_FREE_PAGE, it.gfn, it.level - 1, h.external_spt)
                h.external_spt = 0
            pt_free_sp(m.a, sp)                     # never published: freed at once
            return RET_PF_RETRY
        # A huge page would have been allowed here: zapping this table may
        # later let one be created (NX recovery)
        # (under tdp_mmu_pages_lock: a thread that removed the table meanwhile
        # cleared the flag under it, and the table must not be listed then)
        if fault.huge_page_disallowed and fault.req_level >= it.level:
            pt_spin_lock(&m.nx_lock)
            if h.nx_huge_page_disallowed:
                track_possible_nx_huge_page(m, sp)
            pt_spin_unlock(&m.nx_lock)
        tdp_iter_next(&it, m.a)
    # The walk ended above the goal: an entry on the way was zapped or frozen
    # by another thread after it was linked or read (the iterator does not
    # step into a table no longer linked).  The vCPU faults again.
    if it.level == fault.goal_level:
        tdp_inc(&m.warn[TDP_WARN_MAP_LEVEL])
    return RET_PF_RETRY


# ---------------------------------------------------------------------------
# Yielding
# ---------------------------------------------------------------------------

cdef inline bint _cond_resched(tdp_mmu_t *m, tdp_iter *it, bint flush) noexcept nogil:
    """tdp_mmu_iter_cond_resched(kvm, iter, flush, shared) for the long
    loops, first thing at each entry: True if the walk yields here (the
    caller resets its `flush` and goes on with tdp_iter_next, which restarts
    from the root).  A TLB flush owed is done before the lock is dropped
    (counted in nr_yield_flushes); the model has no lock to drop."""
    if m.resched.every <= 0:                    # need_resched() never true
        return False
    if not tdp_mmu_iter_cond_resched(it, &m.resched):
        return False
    if flush:
        m.nr_yield_flushes += 1                 # kvm_flush_remote_tlbs()
    return True


# ---------------------------------------------------------------------------
# Zaps (mmu_lock held for write)
# ---------------------------------------------------------------------------

cdef bint tdp_mmu_zap_leafs(tdp_mmu_t *m, uint64_t root, uint64_t start, uint64_t end,
                            bint flush) noexcept nogil:
    """Zap every present leaf of `root` in [start, end); the tables stay.
    Returns whether a TLB flush is owed (`flush`, or a leaf was zapped
    since the last yield, which flushed first)."""
    cdef tdp_iter it
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, start, kvm_gfn_root_bits(m.a, root))
    while it.valid and it.gfn < end:
        if _cond_resched(m, &it, flush):
            flush = False
            tdp_iter_next(&it, m.a)
            continue
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
            it.old_spte = tdp_mmu_set_spte(m, it.as_id, it.sptep, it.old_spte,
                                           m.f.nonpresent_value, it.gfn, it.level)
            flush = True
        tdp_iter_next(&it, m.a)
    return flush


cdef inline void _zap_root_at(tdp_mmu_t *m, uint64_t root, int zap_level) noexcept nogil:
    cdef tdp_iter it
    tdp_iter_start(&it, m.a, root, zap_level, 0, kvm_gfn_root_bits(m.a, root))
    while it.valid:
        if _cond_resched(m, &it, False):
            tdp_iter_next(&it, m.a)
            continue
        if is_shadow_present_pte(it.old_spte) and it.level <= zap_level:
            it.old_spte = tdp_mmu_set_spte(m, it.as_id, it.sptep, it.old_spte,
                                           m.f.nonpresent_value, it.gfn, it.level)
        tdp_iter_next(&it, m.a)


cdef void tdp_mmu_zap_root_shared(tdp_mmu_t *m, uint64_t root) noexcept nogil:
    """tdp_mmu_zap_root with shared=true (mmu_lock held for read): as below,
    1G first and then the root's level, but each entry by the atomic setter,
    looking at an entry again when its cmpxchg lost (the new value may be
    present again: a fault of another thread)."""
    cdef int top = <int>role_level(pt_sp_ptr(m.a, root).role)
    cdef int zap_level, k
    cdef tdp_iter it
    if m.ext_ops != NULL and role_is_mirror(pt_sp_ptr(m.a, root).role):
        # (no atomic zap of mirror SPTEs; the loop below would spin on it)
        _mirror_bug(m, TDP_BUG_MIRROR_ZAP_ATOMIC, 0, top)
        return
    for k in range(2):
        zap_level = PG_LEVEL_1G if k == 0 else top
        tdp_iter_start(&it, m.a, root, zap_level, 0, kvm_gfn_root_bits(m.a, root))
        while it.valid:
            if is_shadow_present_pte(it.old_spte) and it.level <= zap_level:
                if tdp_mmu_set_spte_atomic(m, &it, m.f.nonpresent_value) != 0:
                    continue            # it.old_spte is the current value: again
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
    flush, and no yield (the kernel's aging loop never yields either)."""
    cdef tdp_iter it
    cdef bint young = False
    cdef bint tr = tdp_trace_changed_on()
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, start, kvm_gfn_root_bits(m.a, root))
    while it.valid and it.gfn < end:
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level) and \
                is_accessed_spte(m.f, it.old_spte):
            if test_only:
                return True
            young = True
            if spte_ad_enabled(it.old_spte):
                it.old_spte = tdp_fetch_and64(pt_sptep_ptr(m.a, it.sptep), ~m.f.accessed_mask)
                tdp_trace_iter_changed(tr, &it, it.old_spte & ~m.f.accessed_mask)
            elif pt_try_cmpxchg64(pt_sptep_ptr(m.a, it.sptep), &it.old_spte,
                                  mark_spte_for_access_track(m.f, it.old_spte)):
                tdp_trace_iter_changed(tr, &it, mark_spte_for_access_track(m.f, it.old_spte))
        tdp_iter_next(&it, m.a)
    return young


cdef bint kvm_tdp_mmu_clear_bit_range(tdp_mmu_t *m, uint64_t root, uint64_t start, uint64_t end,
                                      int min_level, uint64_t bit) noexcept nogil:
    """The read-locked loops of dirty logging: clear `bit` in every present
    leaf at or above `min_level` in [start, end) with the atomic setter,
    retrying an entry whose cmpxchg lost.  ``bit = PT_WRITABLE_MASK`` is
    wrprot_gfn_range (MMU-writable stays, so fast page fault can restore W and
    log the page); the dirty bit or W at 4K is clear_dirty_gfn_range.
    It may yield at every entry (wrprot_gfn_range's placement;
    clear_dirty_gfn_range asks at present leaves only: the same result, the
    step budget is spent differently).  The cmpxchg and the
    handle_changed_spte per changed SPTE are the kernel's (other holders of
    mmu_lock for read may change the entry meanwhile): they, not the walk,
    set this loop's floor."""
    cdef tdp_iter it
    cdef bint changed = False
    cdef int j, last
    tdp_iter_start(&it, m.a, root, min_level, start, kvm_gfn_root_bits(m.a, root))
    while it.valid and it.gfn < end:
        if _cond_resched(m, &it, False):
            tdp_iter_next(&it, m.a)
            continue
        if it.level == PG_LEVEL_4K and m.resched.every <= 0:
            # need_resched() is never true: the rest of this 4K table (up
            # to `end`) in one loop, each entry the iterator's sideways step
            # done inline, then the iterator goes on from the last one.
            last = SPTE_ENT_PER_PAGE - 1 - spte_index_of(it.gfn, PG_LEVEL_4K)
            if end - it.gfn <= last:
                last = <int>(end - it.gfn) - 1
            for j in range(last + 1):
                if j:
                    it.gfn += 1
                    it.next_last_level_gfn = it.gfn
                    it.sptep += 8
                    it.old_spte = kvm_tdp_mmu_read_spte(m.a, it.sptep)
                while is_shadow_present_pte(it.old_spte) and (it.old_spte & bit):
                    if tdp_mmu_set_spte_atomic(m, &it, it.old_spte & ~bit) == 0:
                        changed = True
                        break
            tdp_iter_next(&it, m.a)
            continue
        while is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level) and \
                (it.old_spte & bit):
            if tdp_mmu_set_spte_atomic(m, &it, it.old_spte & ~bit) == 0:
                changed = True
                break
        tdp_iter_next(&it, m.a)
    return changed


cdef inline bint _tdp_table_at(tdp_mmu_t *m, uint64_t root, uint64_t gfn, int level,
                               uint64_t *table) noexcept nogil:
    """Find the pfn of the table at `level` holding `gfn`'s entry under
    `root`; False if the walk from the root ends above `level` (a hole or a
    huge leaf: the whole region of `gfn` that such a table would map holds
    no entry at `level`)."""
    cdef tdp_iter it
    cdef int shift = SPTE_LEVEL_BITS * level
    tdp_iter_start(&it, m.a, root, level, gfn, kvm_gfn_root_bits(m.a, root))
    while it.valid and it.level > level:
        if not is_shadow_present_pte(it.old_spte) or is_last_spte(it.old_spte, it.level):
            return False
        tdp_iter_next(&it, m.a)             # down (or sideways past a table not of the arena)
    if not it.valid or it.level != level or (it.gfn >> shift) != (gfn >> shift):
        return False
    table[0] = sptep_table_pfn(it.pt_path[level - 1])
    return True


cdef inline bint _none_volatile(const spte_fmt_t *f, uint64_t all_and, uint64_t all_or) noexcept nogil:
    """From the AND and the OR of present SPTEs: is spte_needs_atomic_update
    false for each?  So when all are writable, have the dirty bit, and share
    one A/D type that is not DISABLED (a dirty writable A/D SPTE has no bit
    left for the CPU or fast page fault to set)."""
    return (f.dirty_mask != 0 and (all_and & f.dirty_mask) == f.dirty_mask and
            (all_and & PT_WRITABLE_MASK) != 0 and
            (all_and & SPTE_TDP_AD_MASK) == (all_or & SPTE_TDP_AD_MASK) and
            (all_or & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED)


cdef inline uint64_t _clear_dirty_4k_masked(tdp_mmu_t *m, uint64_t table, uint64_t gfn,
                                            uint64_t mask, uint64_t dbit) noexcept nogil:
    """clear_dirty_pt_masked on the 64 entries of 4K table `table` from
    `gfn` (64-aligned) on: a 4K entry that is present is a leaf, so the
    kernel's leaf walk from gfn + ffs(mask) is this loop over the set bits,
    in the same order, with the same non-atomic clear (atomic only when
    spte_needs_atomic_update)."""
    cdef uint64_t found = 0, spte, all_and, all_or
    cdef int first = spte_index_of(gfn, PG_LEVEL_4K), b
    cdef uint64_t *p = pt_sptep_ptr(m.a, make_sptep(table, first))
    if mask == ~(<uint64_t>0):
        # The whole word (a full bitmap, the usual case): one branch-free
        # pass of reductions (it vectorizes; the 512 bytes then sit in L1)
        # says whether every entry is present and whether any has `dbit`:
        # a clean word is only read, as in the kernel's loop.
        # (Plain loads here, so the pass vectorizes: an aligned 64-bit load
        # is never torn, and the entries it flags are read again, once.)
        all_and = ~(<uint64_t>0)
        all_or = 0
        # A hint (never a fault, whatever the address): the same 512 bytes
        # of the next page, where the next 4K table usually is, so the
        # table switch does not start on cold lines.
        for b in range(0, 64, 8):
            tdp_prefetch(p + SPTE_ENT_PER_PAGE + b)
        for b in range(64):
            all_and &= p[b]
            all_or |= p[b]
        if is_shadow_present_pte(all_and):
            found = mask
        else:
            for b in range(64):
                found |= (<uint64_t>is_shadow_present_pte(pt_read_once64(p + b))) << b
        if not (all_or & dbit):
            return found
        if is_shadow_present_pte(all_and) and (all_and & dbit) and _none_volatile(m.f, all_and, all_or):
            # Every entry is a present leaf with `dbit` that nobody else may
            # change (spte_needs_atomic_update false for all): the kernel's 64
            # plain stores, as one loop that vectorizes.
            for b in range(64):
                p[b] = p[b] & ~dbit
            return found
        for b in range(64):
            spte = pt_read_once64(p + b)
            if is_shadow_present_pte(spte) and (spte & dbit):
                if spte_needs_atomic_update(m.f, spte):
                    tdp_fetch_and64(p + b, ~dbit)
                else:
                    pt_write_once64(p + b, spte & ~dbit)
        return found
    while mask:
        b = __builtin_ctzll(mask)
        mask &= mask - 1
        spte = pt_read_once64(p + b)
        if not is_shadow_present_pte(spte):
            continue
        found |= (<uint64_t>1) << b
        if spte & dbit:
            if spte_needs_atomic_update(m.f, spte):
                tdp_fetch_and64(p + b, ~dbit)
            else:
                pt_write_once64(p + b, spte & ~dbit)
    return found


cdef inline uint64_t _clear_dirty_4k_masked_traced(tdp_mmu_t *m, uint64_t root, uint64_t table,
                                                   uint64_t gfn, uint64_t mask,
                                                   uint64_t dbit) noexcept nogil:
    """_clear_dirty_4k_masked, and the kvm_tdp_mmu_spte_changed events of the
    entries it clears when that event is on (read before the clear: the
    present entries under `mask` that have `dbit`)."""
    cdef uint64_t cleared = 0, spte
    cdef int b
    cdef uint64_t *p
    if not tdp_trace_changed_on():
        return _clear_dirty_4k_masked(m, table, gfn, mask, dbit)
    p = pt_sptep_ptr(m.a, make_sptep(table, spte_index_of(gfn, PG_LEVEL_4K)))
    for b in range(64):
        if mask >> b & 1:
            spte = pt_read_once64(p + b)
            if is_shadow_present_pte(spte) and (spte & dbit):
                cleared |= (<uint64_t>1) << b
    mask = _clear_dirty_4k_masked(m, table, gfn, mask, dbit)
    tdp_trace_masked_clear(m.a, root, gfn, cleared, dbit)
    return mask


cdef uint64_t kvm_tdp_mmu_clear_dirty_pt_masked(tdp_mmu_t *m, uint64_t root, uint64_t gfn,
                                                uint64_t mask, uint64_t dbit) noexcept nogil:
    """KVM_CLEAR_DIRTY_LOG's step (mmu_lock held for write): for each set
    bit i of `mask`, clear `dbit` in the 4K leaf of gfn + i (`gfn` is
    64-aligned, so the 64 gfns share one 4K table).  Huge leaves and holes
    are left alone.  Returns the bits whose 4K leaf was found (none for a
    `gfn` that is not 64-aligned: the 64 entries would run past the table;
    TdpMmuCore.clear_dirty_log aligns and refuses before calling)."""
    cdef uint64_t table
    if mask == 0 or (gfn & 63) or not _tdp_table_at(m, root, gfn, PG_LEVEL_4K, &table):
        return 0
    return _clear_dirty_4k_masked_traced(m, root, table, gfn, mask, dbit)


# ---------------------------------------------------------------------------
# Fast page fault (mmu.c fast_page_fault over kvm_tdp_mmu_fast_pf_get_last_sptep)
# ---------------------------------------------------------------------------

cdef sptep_t kvm_tdp_mmu_fast_pf_get_last_sptep(tdp_mmu_t *m, uint64_t root, uint64_t gfn,
                                                uint64_t *spte, int *level) noexcept nogil:
    """The last entry on `gfn`'s path (a leaf, or the first hole) and its
    value: 0 if the root cannot be walked."""
    cdef tdp_iter it
    cdef sptep_t sptep = 0
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, gfn, kvm_gfn_root_bits(m.a, root))
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
# The guest touches memory (TdpMmu.guest_access): the CPU's walk of the TDP
# tables, its A/D assists, and the exits fast_page_fault fixes
# ---------------------------------------------------------------------------

cdef inline bint tdp_hw_access_allowed(const spte_fmt_t *f, uint64_t spte, int level,
                                       bint write, bint exec) noexcept nogil:
    """Does the CPU's walk that ended at `spte` (at `level`) complete the
    access without an exit?  A present leaf (never an MMIO SPTE, which is not
    MMU-present; an access-tracked one has R, W and X clear) granting it:
    EPT: R for a read, W for a write, X for a fetch; NPT: P for a read, P
    and W for a write, P and not NX for a fetch."""
    if not is_shadow_present_pte(spte) or not is_last_spte(spte, level):
        return False
    if exec:
        return is_executable_pte(f, spte) and (f.is_ept or (spte & PT_PRESENT_MASK) != 0)
    if write:
        return (spte & (PT_PRESENT_MASK | PT_WRITABLE_MASK)) == (PT_PRESENT_MASK | PT_WRITABLE_MASK)
    return (spte & PT_PRESENT_MASK) != 0


cdef inline uint64_t tdp_hw_error_code(const spte_fmt_t *f, uint64_t spte, int level,
                                       bint write, bint exec) noexcept nogil:
    """The error code of the exit for a non-MMIO `spte`, as
    TdpMmu.hardware_error_code gives it: W, F, U for an EPT read, P when the
    walk ended at a present leaf granting some access."""
    cdef uint64_t ec = (GA_PFERR_WRITE if write else 0) | (GA_PFERR_FETCH if exec else 0)
    if f.is_ept and not write and not exec:
        ec |= GA_PFERR_USER
    if is_shadow_present_pte(spte) and (level == PG_LEVEL_4K or
                                        (level <= PG_LEVEL_1G and is_large_pte(spte))) and \
            spte & (7 if f.is_ept else PT_PRESENT_MASK):
        ec |= GA_PFERR_PRESENT
    return ec


cdef extern from *:
    """
    #define kvmmmu_ga_or8(p, v) ((void)__atomic_fetch_or((p), (v), __ATOMIC_SEQ_CST))
    """
    void kvmmmu_ga_or8(uint8_t *p, uint8_t v) nogil

cdef enum:
    # kvmmmu.host's PTE flag bits (checked against it by TdpMmu.guest_access)
    GA_HOST_PTE_PRESENT = 0x01
    GA_HOST_PTE_WRITE = 0x02
    GA_HOST_PTE_YOUNG = 0x04
    GA_HOST_PTE_DIRTY = 0x08


cdef inline int _ga_map_4k(tdp_mmu_t *m, uint64_t root, ga_batch *b, Py_ssize_t i,
                           uint64_t gfn, bint write) noexcept nogil:
    """The rest of kvm_tdp_page_fault for a not-present exit on a gfn of a
    plain memslot backed by a 4K-only VMA, when the host page is present
    (and writable for a write): hva_to_pfn_fast's part (the host PTE young,
    dirty for a write; pfn, map_writable, level 4K, so no hugepage_adjust),
    then kvm_tdp_mmu_map at 4K.  -1 when the host page is not there (the
    caller takes the exit: hva_to_pfn faults it in)."""
    cdef int k = b.sidx[i]
    cdef uint64_t rel = gfn - b.slot_base[k]
    cdef uint8_t *pte = &b.slot_pte[k][rel]
    cdef uint8_t fl = pte[0]
    cdef uint8_t bits = GA_HOST_PTE_YOUNG | (GA_HOST_PTE_DIRTY if write else 0)
    cdef tdp_fault fault
    if not (fl & GA_HOST_PTE_PRESENT) or (write and not (fl & GA_HOST_PTE_WRITE)):
        return -1
    fault.pfn = b.slot_pfn[k][rel]
    if fault.pfn >> 40:
        return -1
    if (fl & bits) != bits:
        kvmmmu_ga_or8(pte, bits)
    fault.gfn = gfn
    fault.goal_level = fault.req_level = PG_LEVEL_4K
    fault.write, fault.exec, fault.prefetch = write, False, False
    fault.map_writable = (fl & GA_HOST_PTE_WRITE) != 0
    fault.huge_page_disallowed = False
    fault.nx_huge_pages = b.nx_huge_pages
    fault.noslot, fault.mmio_gen = False, 0
    b.c_last_pfn = fault.pfn
    b.c_last_writable = fault.map_writable
    return kvm_tdp_mmu_map(m, root, &fault, b.pc, b.hc)


cdef int tdp_guest_access(tdp_mmu_t *m, uint64_t root, ga_batch *b,
                          Py_ssize_t *pos) noexcept nogil:
    """From b.gfns[*pos] on, in order: an access the CPU completes sets A
    (and D for a write) in the leaf when the format has A/D bits; an access
    that exits is handled here when kvm_mmu_page_fault would end in
    fast_page_fault's RET_PF_FIXED (a write to an MMU-writable leaf, or an
    access-tracked leaf without A/D bits: tdp_fast_page_fault's rules), or,
    in a pass with b.slow_ok, when it is a read or write exit on a
    not-present SPTE of a GA_CLASS_SLOW gfn whose 4K host page is present
    (_ga_map_4k: the rest of kvm_tdp_page_fault), and retried.  Returns with
    *pos at the first access whose exit needs
    anything else (GA_SLOW: the caller takes that one exit through the
    scalar path and calls again), at an access that already took
    b.max_faults exits and still exits (GA_GIVE_UP), at a mapped exit that
    answered neither FIXED, SPURIOUS nor RETRY (GA_UNEXPECTED), or at b.n
    (GA_DONE).

    Nothing is changed or traced for an exit left to the caller: the
    decision is made on the SPTE the walk read, and the cmpxchg installs the
    fix only if that SPTE is still there (a lost race walks again, as the
    retried access would; after 5 lost races the exit goes to the caller)."""
    cdef Py_ssize_t i = pos[0]
    cdef uint64_t gfn, spte = 0, new_spte, ad, ec
    cdef int level = 0, nf, races, r
    cdef sptep_t sptep
    cdef uint8_t cls
    cdef bint write = b.write, exec = b.exec, present
    cdef const spte_fmt_t *f = m.f
    cdef tdp_fault fault                        # what _access_allowed reads
    fault.write, fault.exec = write, exec
    ad = (f.accessed_mask | (f.dirty_mask if write else 0)) if f.ad_enabled else 0
    b.c_last_ret = 0
    while i < b.n:
        if b.writes != NULL:                    # this access's kind
            write = b.writes[i] != 0
            fault.write = write
            ad = (f.accessed_mask | (f.dirty_mask if write else 0)) if f.ad_enabled else 0
        gfn = b.gfns[i]
        cls = b.gclass[i]
        nf = b.faults[i]
        races = 0
        while True:
            sptep = kvm_tdp_mmu_fast_pf_get_last_sptep(m, root, gfn, &spte, &level)
            if sptep != 0 and tdp_hw_access_allowed(f, spte, level, write, exec):
                # the access completes: the CPU's A/D assist on the leaf
                new_spte = spte | ad
                if new_spte == spte:
                    break
                if pt_try_cmpxchg64(pt_sptep_ptr(m.a, sptep), &spte, new_spte):
                    if write and f.dirty_mask and not (spte & f.dirty_mask):
                        b.flags[i] |= GA_DIRTIED
                    break
                continue                            # changed meanwhile: walk again
            # an exit
            if nf >= b.max_faults:
                pos[0] = i
                return GA_GIVE_UP
            if sptep == 0 or (cls & GA_CLASS_NOFAST) or races > 4 or not b.exits_ok or \
                    is_mmio_spte(f, spte):
                pos[0] = i
                return GA_SLOW
            ec = tdp_hw_error_code(f, spte, level, write, exec)
            present = (ec & GA_PFERR_PRESENT) != 0
            if not present and f.ad_enabled:
                # kvm_tdp_page_fault with no fast_page_fault: a first touch
                # of a present 4K host page is mapped here, all else (caches
                # to top up, the host page to fault in, a fetch, a FROZEN
                # entry) goes to the caller
                if not ((cls & GA_CLASS_SLOW) and b.slow_ok and not exec and
                        not is_shadow_present_pte(spte) and not is_frozen_spte(f, spte) and
                        b.pc.nobjs >= 5 and b.hc.nobjs >= 5):
                    pos[0] = i
                    return GA_SLOW
                r = _ga_map_4k(m, root, b, i, gfn, write)
                if r == -1:
                    pos[0] = i
                    return GA_SLOW
                nf += 1
                b.faults[i] = <uint8_t>nf
                b.nr_slow += 1
                b.c_last_idx = b.c_last_slow_idx = i
                b.c_last_ec = ec
                b.c_last_ret = r
                b.c_last_slow = True
                if r == RET_PF_FIXED:
                    b.nr_slow_fixed += 1
                    if b.c_last_writable and (cls & GA_CLASS_LOGGED):
                        b.flags[i] |= GA_MADE_WRITABLE
                elif r == RET_PF_SPURIOUS:
                    b.nr_slow_spurious += 1
                elif r != RET_PF_RETRY:
                    pos[0] = i
                    return GA_UNEXPECTED
                continue
            # kvm_tdp_page_fault's gate (present, or no A/D bits) and
            # page_fault_can_be_fast (a present fault only for a write)
            if not (write if present else not f.ad_enabled):
                pos[0] = i
                return GA_SLOW
            # tdp_fast_page_fault on this SPTE: RET_PF_FIXED here, all else
            # (INVALID, SPURIOUS) to the caller
            new_spte = spte
            if is_shadow_present_pte(spte) and is_last_spte(spte, level) and \
                    not _access_allowed(m, &fault, spte):
                if not f.ad_enabled and is_access_track_spte(f, spte):
                    new_spte = restore_acc_track_spte(f, new_spte) | f.accessed_mask
                if write and is_mmu_writable_spte(f, spte):
                    new_spte |= PT_WRITABLE_MASK
                    if level > PG_LEVEL_4K and (cls & GA_CLASS_LOGGED):
                        new_spte = spte
            if new_spte == spte or not _access_allowed(m, &fault, new_spte):
                pos[0] = i
                return GA_SLOW
            if not pt_try_cmpxchg64(pt_sptep_ptr(m.a, sptep), &spte, new_spte):
                races += 1
                continue
            # one exit, fixed: kvm_mmu_page_fault counts it in pf_taken,
            # fast_page_fault in pf_fast, then pf_fixed
            nf += 1
            b.faults[i] = <uint8_t>nf
            b.nr_fast += 1
            b.c_last_idx = i
            b.c_last_ec = ec
            b.c_last_ret = RET_PF_FIXED
            b.c_last_slow = False
            if is_writable_pte(new_spte) and not is_writable_pte(spte):
                b.flags[i] |= GA_MADE_WRITABLE
            tdp_trace_fast_page_fault(m.a, f, root, gfn, write, exec, RET_PF_FIXED, spte,
                                      b.vcpu_id, gfn << 12, ec, True)
            races = 0
        i += 1
        b.c_last_ret = 0
    pos[0] = i
    return GA_DONE


# ---------------------------------------------------------------------------
# Huge pages: eager split and recovery
# ---------------------------------------------------------------------------

cdef int tdp_mmu_split_huge_pages_root(tdp_mmu_t *m, uint64_t root, uint64_t start,
                                       uint64_t end, int target_level,
                                       kvm_mmu_memory_cache *page_cache,
                                       kvm_mmu_memory_cache *header_cache,
                                       bint nx_huge_pages, uint64_t *resume,
                                       uint64_t *huge_spte, int *huge_level,
                                       int64_t *nr) noexcept nogil:
    """Split every huge leaf above `target_level` in [start, end) down to
    it (pre-order: a 1G page becomes 2M pages, visited and split in turn).
    Adds the pages split to `*nr`; returns 0, or -ENOMEM when the caches
    ran dry: `*resume` is then the gfn to start again from (after a refill),
    as the kernel restarts its walk after dropping the lock to allocate,
    and `*huge_spte` / `*huge_level` the leaf that needed the page (what
    the kernel traces if that allocation fails)."""
    cdef tdp_iter it
    cdef uint64_t sp
    tdp_iter_start(&it, m.a, root, target_level + 1, start, kvm_gfn_root_bits(m.a, root))
    while it.valid and it.gfn < end:
        if _cond_resched(m, &it, False):
            tdp_iter_next(&it, m.a)
            continue
        if not is_shadow_present_pte(it.old_spte) or not is_large_pte(it.old_spte) or \
                it.level <= target_level:
            tdp_iter_next(&it, m.a)
            continue
        if pt_alloc_sp(m.a, page_cache, header_cache, NULL, &sp) != 0:
            resume[0] = it.gfn
            huge_spte[0] = it.old_spte
            huge_level[0] = it.level
            return -_ENOMEM
        _init_child(m, &it, sp)
        if _split_huge_page(m, &it, sp, nx_huge_pages):
            pt_free_sp(m.a, sp)                 # lost a race: retry the same entry
            continue
        nr[0] += 1
        tdp_iter_next(&it, m.a)
    return 0


cdef int _first_leaf_below(tdp_mmu_t *m, uint64_t root, tdp_iter *parent,
                           uint64_t *leaf) noexcept nogil:
    """The first present leaf below the parent iterator's non-leaf entry
    (tdp_mmu_make_huge_spte's search): 0, -ENOENT, or -EAGAIN when the
    parent walk should yield first (need_resched() asked of the parent, so
    its forward-progress rule holds and the retry cannot spin).  The steps
    of this walk count against the step budget."""
    cdef tdp_iter it
    cdef uint64_t gfn = parent.gfn
    cdef int level = parent.level
    tdp_iter_start(&it, m.a, root, PG_LEVEL_4K, gfn, kvm_gfn_root_bits(m.a, root))
    while it.valid and it.gfn < gfn + _pages(level):
        if m.resched.every > 0:
            m.resched.count += 1
        if it.level < level and is_shadow_present_pte(it.old_spte) and \
                is_last_spte(it.old_spte, it.level):
            if m.resched.every > 0 and tdp_mmu_iter_need_resched(parent, &m.resched):
                return -_EAGAIN
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
    cdef bint flush = False
    cdef int r
    tdp_iter_start(&it, m.a, root, 2, base_gfn, kvm_gfn_root_bits(m.a, root))
    while it.valid and it.gfn < base_gfn + npages:
        if _cond_resched(m, &it, flush):
            flush = False
            tdp_iter_next(&it, m.a)
            continue
        if it.level > PG_LEVEL_1G or not is_shadow_present_pte(it.old_spte) or \
                is_last_spte(it.old_spte, it.level) or it.gfn < base_gfn or \
                it.gfn + _pages(it.level) > base_gfn + npages or \
                max_level[(it.gfn - base_gfn) >> SPTE_LEVEL_BITS] < it.level:
            tdp_iter_next(&it, m.a)
            continue
        r = _first_leaf_below(m, root, &it, &leaf)
        if r == -_EAGAIN:
            continue                            # yield at the top, then look again
        if r != 0:
            tdp_iter_next(&it, m.a)
            continue
        huge = make_huge_spte(m.f, leaf, it.level, nx_huge_pages)
        if tdp_mmu_set_spte_atomic(m, &it, huge):
            continue                            # lost a race: look at the entry again
        nr += 1
        flush = True
        tdp_iter_next(&it, m.a)
    return nr


# ---------------------------------------------------------------------------
# Python
# ---------------------------------------------------------------------------

cdef class TdpMmuCore:
    """The TDP MMU's tables in one arena, driven from Python.

    Holds ``kvm->arch.tdp_mmu_pages`` and the WARN counters of tdp_mmu.c.
    Page statistics are the arena's (:meth:`PtArena.page_stats`).

    Thread safety (the kernel's ``mmu_lock``, an rwlock, made checkable):

    * the **shared side** (``mmu_lock`` held for read): :meth:`map`,
      :meth:`map_one`, :meth:`fast_page_fault` (RCU only in the kernel) and
      :meth:`zap_root_shared` may run on any number of threads at once, each
      without the GIL and each with its own vCPU's pair of
      :class:`MmuMemoryCache` (a cache used by two threads at once raises
      ConcurrentUseError).  Every change is a ``try_cmpxchg64``; a lost race
      is RET_PF_RETRY; removed tables are frozen entry by entry and freed
      after a grace period that waits for every shared holder (each is an
      RCU reader); ``tdp_mmu_pages``, the page stats and the WARN counters
      are atomics; the possible-NX list is under a spinlock;
    * every other method is the **exclusive side** (``mmu_lock`` held for
      write): it raises ConcurrentUseError while another thread holds either
      side, and a shared call raises while an exclusive one runs.
    """
    cdef tdp_mmu_t m
    cdef readonly PtArena arena
    cdef readonly SpteFormat fmt
    # the object m.ext_ops points to (kept alive here)
    cdef readonly object external_ops

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

    cdef int _leave(self) except -1:
        self.arena._busy = None
        tdp_trace_flush()               # this thread's trace records, to mmutrace
        return 0

    cdef int _enter_shared(self, str what, MmuMemoryCache pc, MmuMemoryCache hc) except -1:
        # The shared side: the arena's shared claim (refused while an
        # exclusive call runs), then this vCPU's caches (refused if another
        # thread uses them).  Returns the RCU slot; no Python code runs
        # between any check and its claim.
        cdef int slot
        self._ready(what)
        if pc is not None:
            pc._claim(what)
            try:
                hc._claim(what)
            except BaseException:
                pc._release()
                raise
        try:
            slot = self.arena._shared_enter(what)
        except BaseException:
            if pc is not None:
                pc._release()
                hc._release()
            raise
        return slot

    cdef int _leave_shared(self, int slot, MmuMemoryCache pc, MmuMemoryCache hc) except -1:
        self.arena._shared_leave(slot)
        if pc is not None:
            pc._release()
            hc._release()
        tdp_trace_flush()               # this thread's trace records, to mmutrace
        return 0

    cdef int _map_fault(self, str what, uint64_t c_root, tdp_fault *fault,
                        MmuMemoryCache page_cache, MmuMemoryCache header_cache) except? -9999:
        # kvm_tdp_mmu_map for one checked fault, on the shared side (other
        # vCPU threads may map meanwhile): RET_PF_* or -ENOMEM.
        cdef int slot = self._enter_shared(what, page_cache, header_cache)
        cdef tdp_mmu_t *m = &self.m
        cdef kvm_mmu_memory_cache *pc = &page_cache.mc
        cdef kvm_mmu_memory_cache *hc = &header_cache.mc
        cdef int top, r
        try:
            top = self._root(c_root)
            if fault.gfn >> (SPTE_LEVEL_BITS * top):
                raise ValueError(f"gfn={fault.gfn:#x} is beyond what the root maps")
            if self.arena._shared > 1:
                # other threads map too: let them run during this walk
                with nogil:
                    pt_shared_rcu_lock(m.a, slot)
                    r = kvm_tdp_mmu_map(m, c_root, fault, pc, hc)
                    pt_shared_rcu_unlock(m.a, slot)
            else:
                pt_shared_rcu_lock(m.a, slot)
                r = kvm_tdp_mmu_map(m, c_root, fault, pc, hc)
                pt_shared_rcu_unlock(m.a, slot)
        finally:
            self._leave_shared(slot, page_cache, header_cache)
        return r

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

    @property
    def resched_every(self):
        """The model's ``need_resched()`` for the long loops (zap_leafs,
        zap_root, clear_bit_range, split_huge_pages, recover_huge_pages):
        true once this many entries were visited since the last yield; 0
        (the default) never.  Each loop calls ``tdp_mmu_iter_cond_resched``
        at every entry: when it yields (and only after forward progress) it
        first does the TLB flush it owes (:attr:`nr_yield_flushes`), then
        the walk restarts from the root at ``next_last_level_gfn``.  The
        results never depend on it; aging and ``clear_dirty_log`` never
        yield, as in the kernel."""
        self._ready("TdpMmuCore.resched_every")
        return self.m.resched.every

    @resched_every.setter
    def resched_every(self, value):
        from kvmmmu._core._checks import int_arg
        cdef int64_t every = int_arg("resched_every", value, 0, (1 << 62))
        self._enter("TdpMmuCore.resched_every")
        try:
            self.m.resched.every = every
            self.m.resched.count = 0
        finally:
            self._leave()

    @property
    def nr_yields(self):
        """Times a loop yielded (dropped and retook mmu_lock, restarted at
        the root)."""
        self._ready("TdpMmuCore.nr_yields")
        return self.m.resched.nr_yields

    @property
    def nr_yield_flushes(self):
        """``kvm_flush_remote_tlbs()`` calls done before a yield because the
        loop had changed SPTEs since its last flush (zap_leafs, recovery)."""
        self._ready("TdpMmuCore.nr_yield_flushes")
        return self.m.nr_yield_flushes

    def set_external_ops(self, ops):
        """Install the external hooks of a VM with mirror roots (TDX), once,
        before any mirror table exists: `ops` is called as
        ``ops(op, gfn, level, arg) -> int`` (op one of ``EXT_OPS``) with the
        GIL taken, from inside the walks, and must not raise (an exception
        counts as -EIO).  A root whose role has ``is_mirror`` is then a
        mirror root; without hooks, ``is_mirror`` roots behave as direct
        ones (and must not be created)."""
        self._ready("TdpMmuCore.set_external_ops")
        if not callable(ops):
            raise TypeError("ops must be callable as ops(op, gfn, level, arg) -> int")
        if self.external_ops is not None:
            raise ValueError("the external hooks are already installed")
        if self.arena._shared or self.arena._busy is not None:
            raise ValueError("set_external_ops while the arena is in use")
        self.external_ops = ops
        self.m.ext_ops = <void *>ops

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
        # make_spte for a fresh entry of this batch: for a non-present old
        # SPTE, without prefetch or the NX adjustment, it is a constant OR-ed
        # with the pfn (the roots' role.ad_disabled is !ad_enabled, checked by
        # _root, and every table inherits it).  The shortcut then needs only
        # the cmpxchg and a page-stat count, if the constant's writable
        # invariants hold (they do: checked once here, not per leaf).
        cdef bint wp = False
        cdef unsigned int tflags = (MKSPTE_HOST_WRITABLE if fault.map_writable else 0) | \
            (0 if self.m.f.ad_enabled else MKSPTE_AD_DISABLED)
        cdef uint64_t tmpl = make_spte(self.m.f, goal, ACC_ALL, 0, self.m.f.nonpresent_value,
                                       tflags, &wp)
        # (never on a mirror root: each of its leaves goes through the hook)
        cdef bint fresh_fast = same_table and not fault.prefetch and not wp and \
            _spte_writable_invariants_ok(self.m.f, tmpl) and not tdp_trace_map_events_on() and \
            not (self.m.ext_ops != NULL and role_is_mirror(pt_sp_ptr(self.m.a, c_root).role))
        cdef uint64_t tbase = 0, old
        cdef uint64_t *tptr = NULL
        cdef int k
        cdef int slot = self._enter_shared("TdpMmuCore.map", page_cache, header_cache)
        try:
            self._root(c_root)          # again, now that no exclusive call can run
            while done < n:
                before = done
                last.level = 0          # the previous pass's table may be gone
                with nogil:
                    # One RCU read-side section per pass: a table this pass
                    # walked is not freed under it (the arena grows between
                    # passes, with the GIL and outside the section).
                    pt_shared_rcu_lock(a, slot)
                    _fault_stats_init(&fault)
                    for i in range(done, n):
                        if kvm_mmu_topup_memory_cache(pc, PT64_ROOT_MAX_LEVEL, pt_pool_alloc,
                                                      &a.pools[PT_CACHE_SHADOW_PAGE]) or \
                                kvm_mmu_topup_memory_cache(hc, PT64_ROOT_MAX_LEVEL, pt_pool_alloc,
                                                           &a.pools[PT_CACHE_PAGE_HEADER]):
                            break
                        fault.gfn = g[i]
                        fault.pfn = p[i]
                        # disallowed_hugepage_adjust may have lowered the
                        # previous gfn's goal: each fault starts from the batch's
                        fault.goal_level = goal
                        if same_table and last.level == goal and \
                                (g[i] >> table_shift) == (last.gfn >> table_shift):
                            # The goal-level table of the previous fault: not
                            # freed inside this RCU section; if another thread
                            # removed it, its entries read FROZEN (walk again);
                            # else it is linked where the walk found it.
                            if last.pt_path[goal - 1] != tbase:
                                tbase = last.pt_path[goal - 1]
                                tptr = pt_sptep_ptr(a, tbase)
                            k = spte_index_of(g[i], goal)
                            old = pt_read_once64(tptr + k)
                            if fresh_fast and not is_shadow_present_pte(old) and \
                                    not is_frozen_spte(m.f, old):
                                # a fresh leaf: make_spte's value is tmpl | pfn
                                if pt_try_cmpxchg64(tptr + k, &old, tmpl | (p[i] << 12)):
                                    fault.pages_delta[goal - 1] += 1
                                    o[i] = RET_PF_FIXED
                                    done = i + 1
                                    continue
                                r = RET_PF_RETRY
                                last.level = 0
                                o[i] = r
                                done = i + 1
                                continue
                            last.gfn = last.next_last_level_gfn = g[i]
                            last.sptep = tbase + (<uint64_t>k << 3)
                            last.old_spte = old
                            if is_frozen_spte(m.f, old):
                                # another thread removed that table: walk again
                                r = _tdp_mmu_map(m, c_root, &fault, pc, hc, &last)
                            else:
                                tdp_trace_spte_requested(fault.gfn, fault.pfn, goal, fault.noslot)
                                r = _map_target_level(m, &last, &fault)
                        else:
                            r = _tdp_mmu_map(m, c_root, &fault, pc, hc, &last)
                        if r != RET_PF_FIXED and r != RET_PF_SPURIOUS:
                            last.level = 0
                        o[i] = r
                        done = i + 1
                    _fault_stats_flush(m, &fault)
                    pt_shared_rcu_unlock(a, slot)
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
            self._leave_shared(slot, page_cache, header_cache)
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

    def dump(self, root):
        """Every present entry under `root`, in walk order, as a structured
        array (``DUMP_DTYPE``): ``gfn`` (without the root's alias bits),
        ``level``, ``spte``, ``leaf``, and for a table entry the child's
        ``sp`` and ``external_spt`` (0 for leaves).  For audits and tests: it
        takes the arena exclusively (no walk runs beside it)."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef tdp_iter it
        cdef Py_ssize_t n = 0, i = 0
        cdef uint64_t child, bits
        cdef tdp_mmu_t *m = &self.m
        cdef uint64_t[::1] g, sv, cs, ex
        cdef signed char[::1] lv
        cdef unsigned char[::1] lf
        self._enter("TdpMmuCore.dump")
        try:
            self._root(c_root)
            bits = kvm_gfn_root_bits(m.a, c_root)
            # two nogil passes (count, then fill): nothing changes in between,
            # the arena is held exclusively
            with nogil:
                tdp_iter_start(&it, m.a, c_root, PG_LEVEL_4K, 0, bits)
                while it.valid:
                    if is_shadow_present_pte(it.old_spte):
                        n += 1
                    tdp_iter_next(&it, m.a)
            arrays = [np.zeros(n, np.uint64), np.zeros(n, np.int8), np.zeros(n, np.uint64),
                      np.zeros(n, np.uint8), np.zeros(n, np.uint64), np.zeros(n, np.uint64)]
            g, lv, sv, lf, cs, ex = arrays
            with nogil:
                tdp_iter_start(&it, m.a, c_root, PG_LEVEL_4K, 0, bits)
                while it.valid and i < n:
                    if is_shadow_present_pte(it.old_spte):
                        g[i], lv[i], sv[i] = it.gfn, it.level, it.old_spte
                        lf[i] = is_last_spte(it.old_spte, it.level)
                        if not lf[i]:
                            child = spte_to_child_sp(m.a, it.old_spte)
                            cs[i] = child
                            ex[i] = pt_sp_ptr(m.a, child).external_spt if child else 0
                        i += 1
                    tdp_iter_next(&it, m.a)
        finally:
            self._leave()
        out = np.zeros(n, DUMP_DTYPE)
        for name, a in zip(DUMP_DTYPE.names, arrays):
            out[name] = a
        return out

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
        cdef uint64_t g, region = ~(<uint64_t>0), table = 0, pd_region = ~(<uint64_t>0), pd = 0
        cdef sptep_t child
        cdef bint have = False, have_pd = False
        cdef pt_arena_t *a = self.m.a
        self._enter("TdpMmuCore.clear_dirty_log")
        try:
            self._root(c_root)
            with nogil:
                for w in range(n):
                    g = base + 64 * <uint64_t>w
                    if mk[w] == 0:
                        o[w] = 0
                        continue
                    # One walk per 1G region, not per word: this call holds
                    # the writer side and clearing bits never links or
                    # unlinks a table, so the 2M-level table the walk found
                    # for an earlier word of the same 1G region is still the
                    # one, and from its entry the 4K table is one step down
                    # (the iterator's step: a present non-leaf SPTE linking
                    # a table of the arena).
                    if (g >> SPTE_LEVEL_BITS) != region:
                        region = g >> SPTE_LEVEL_BITS
                        if (g >> (2 * SPTE_LEVEL_BITS)) != pd_region:
                            pd_region = g >> (2 * SPTE_LEVEL_BITS)
                            have_pd = _tdp_table_at(&self.m, c_root, g, 2, &pd)
                        have = False
                        if have_pd:
                            child = spte_to_child_pt(a, kvm_tdp_mmu_read_spte(
                                a, make_sptep(pd, spte_index_of(g, 2))), 2)
                            if child:
                                table = sptep_table_pfn(child)
                                have = True
                    o[w] = _clear_dirty_4k_masked_traced(&self.m, c_root, table, g, mk[w], dbit) if have else 0
        finally:
            self._leave()
        return out

    def split_huge_pages(self, root, start, end, target_level, MmuMemoryCache page_cache not None,
                         MmuMemoryCache header_cache not None, *, nx_huge_pages=False):
        """``tdp_mmu_split_huge_pages_root`` over [start, end) down to
        `target_level` (eager page splitting when dirty logging starts).
        Returns the huge pages split.  Pages come from the caches, topped up
        from the arena (which grows) when a huge leaf needs one and they are
        dry.  If the arena cannot give even one page (the kernel's
        ``tdp_mmu_alloc_sp_for_split`` failing), the leaf is traced
        (``kvm_mmu_split_huge_page`` with -ENOMEM) and KvmNoMemoryError is
        raised with ``.split`` = the pages split before it; those splits
        stay (the kernel's walk is best effort and keeps what it did)."""
        cdef uint64_t c_root = u64_arg(root, "root"), s, e, resume = 0, huge = 0
        cdef int target = s32_arg(target_level, "target_level")
        cdef int64_t total = 0
        cdef int r, level = 0, grown
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
                with nogil:
                    r = tdp_mmu_split_huge_pages_root(&self.m, c_root, s, e, target,
                                                      &page_cache.mc, &header_cache.mc, nx, &resume,
                                                      &huge, &level, &total)
                if r == 0:
                    return total
                s = resume                              # refill, then go on from there
                grown = 0
                while kvm_mmu_topup_memory_cache(&page_cache.mc, 1, pt_pool_alloc,
                                                 &a.pools[PT_CACHE_SHADOW_PAGE]) or \
                        kvm_mmu_topup_memory_cache(&header_cache.mc, 1, pt_pool_alloc,
                                                   &a.pools[PT_CACHE_PAGE_HEADER]):
                    # grow in steps of 64 while there is room; near the
                    # arena's limit one page is all the walk needs
                    try:
                        if grown == 0:
                            self.arena._grow_for(64, 64)
                        elif grown == 1:
                            self.arena._grow_for(1, 1)
                        else:
                            raise KvmNoMemoryError("split: the caches cannot be topped up")
                    except KvmNoMemoryError:
                        if grown == 0:
                            grown = 1
                            continue
                        tdp_trace_split_huge_page(resume, huge, level, -_ENOMEM)
                        err = KvmNoMemoryError(f"eager split: no page for the huge leaf at gfn {resume:#x} "
                                               f"(level {level}); {total} split before it")
                        err.split = total
                        raise err
                    grown += 1
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
        if not PG_LEVEL_4K <= fault.goal_level <= PG_LEVEL_1G:
            raise ValueError(f"goal_level={fault.goal_level} is outside 1..{PG_LEVEL_1G}")
        mask = _pages(fault.goal_level) - 1
        if (fault.pfn & mask) or fault.pfn >> 40:
            raise ValueError(f"pfn={fault.pfn:#x} is not aligned to level {fault.goal_level}, "
                             f"or >= 2**40")
        if page_cache.mc.nobjs < PT64_ROOT_MAX_LEVEL or header_cache.mc.nobjs < PT64_ROOT_MAX_LEVEL:
            raise KvmNoMemoryError("map_one: top the caches up first (mmu_topup_memory_caches)")
        self._check_caches(page_cache, header_cache)
        return self._map_fault("TdpMmuCore.map_one", c_root, &fault, page_cache, header_cache)

    def fast_page_fault(self, root, gfn, *, write=False, exec=False, slot_dirty_tracked=False,
                        vcpu_id=0, addr=None, error_code=None):
        """``fast_page_fault`` on a TDP root: ``(RET_PF_*, made_writable,
        last_spte)``, RET_PF_INVALID meaning "take the slow path";
        `last_spte` is the last entry on the gfn's path (an MMIO SPTE there
        means the hardware reports a reserved-bit fault).  Runs without mmu_lock
        in the kernel (RCU only); here it takes the arena's shared side (it
        may run beside other threads' maps, not beside an exclusive call).

        `vcpu_id`, `addr` (default ``gfn << 12``) and `error_code` (default:
        P when the SPTE found grants any access, W, F for a write, a fetch)
        only feed the ``fast_page_fault`` tracepoint."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef int c_vcpu = s32_arg(vcpu_id, "vcpu_id")
        cdef uint64_t c_addr = 0 if addr is None else u64_arg(addr, "addr")
        cdef uint64_t c_ec = 0 if error_code is None else u64_arg(error_code, "error_code")
        cdef tdp_fault fault
        cdef bint made = False
        cdef bint logged = bool(slot_dirty_tracked)
        cdef int r
        cdef uint64_t last = 0
        fault.gfn = u64_arg(gfn, "gfn")
        fault.write, fault.exec, fault.prefetch = bool(write), bool(exec), False
        cdef int slot = self._enter_shared("TdpMmuCore.fast_page_fault", None, None)
        cdef tdp_mmu_t *m = &self.m
        try:
            top = self._root(c_root)
            if fault.gfn >> (SPTE_LEVEL_BITS * top):
                raise ValueError(f"gfn={fault.gfn:#x} is beyond what the root maps")
            if self.arena._shared > 1:
                with nogil:
                    pt_shared_rcu_lock(m.a, slot)
                    r = tdp_fast_page_fault(m, c_root, &fault, logged, &made, &last)
                    pt_shared_rcu_unlock(m.a, slot)
            else:
                pt_shared_rcu_lock(m.a, slot)
                r = tdp_fast_page_fault(m, c_root, &fault, logged, &made, &last)
                pt_shared_rcu_unlock(m.a, slot)
            tdp_trace_fast_page_fault(m.a, m.f, c_root, fault.gfn, fault.write, fault.exec,
                                      r, last, c_vcpu, c_addr if addr is not None else fault.gfn << 12,
                                      c_ec, error_code is not None)
        finally:
            self._leave_shared(slot, None, None)
        return r, bool(made), last

    def zap_root_shared(self, root):
        """``tdp_mmu_zap_root(kvm, root, shared=true)``, as
        ``kvm_tdp_mmu_zap_invalidated_roots`` runs it under ``mmu_lock`` held
        for read: the shared side, beside other threads' faults.  Every
        entry goes by ``try_cmpxchg64`` (a lost race is retried); the removed
        tables are frozen and freed after a grace period
        (:meth:`PtArena.rcu_poll` may run meanwhile on any thread)."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef int slot = self._enter_shared("TdpMmuCore.zap_root_shared", None, None)
        cdef tdp_mmu_t *m = &self.m
        try:
            self._root(c_root)
            with nogil:
                pt_shared_rcu_lock(m.a, slot)
                tdp_mmu_zap_root_shared(m, c_root)
                pt_shared_rcu_unlock(m.a, slot)
        finally:
            self._leave_shared(slot, None, None)

    def trace_init_sp(self, sp):
        """Emit ``kvm_mmu_get_page`` (created) for `sp`, a table this arena
        holds, as ``tdp_mmu_init_sp`` does: for a root the Python side set up
        (the C paths emit it for the tables they create)."""
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        self._ready("TdpMmuCore.trace_init_sp")
        if c_sp == 0 or c_sp > self.m.a.headers_hw or \
                pt_slot(self.m.a, c_sp - 1).sp_state != PT_SP_IN_USE:
            raise ValueError(f"sp {c_sp} is not a live sp of this arena")
        tdp_trace_get_page(self.m.a, c_sp)
        tdp_trace_flush()

    @property
    def nx_lpage_splits(self):
        """``kvm->stat.nx_lpage_splits``: tables on the possible-NX list."""
        return self.m.nx_lpage_splits

    def possible_nx_huge_pages(self):
        """The sp handles on ``possible_nx_huge_pages[KVM_TDP_MMU]``, oldest
        first: one consistent snapshot, read under ``tdp_mmu_pages_lock``
        (threads mapping under the read lock may be changing the list)."""
        self._ready("TdpMmuCore.possible_nx_huge_pages")
        cdef uint64_t node, hw = self.m.a.headers_hw
        cdef int64_t cap, got = 0, k
        cdef uint64_t *buf
        cdef bint grew
        while True:
            cap = self.m.nx_lpage_splits + 1
            if cap < 1:
                cap = 1
            buf = <uint64_t *>malloc(cap * sizeof(uint64_t))
            if buf == NULL:
                raise MemoryError("possible_nx_huge_pages")
            got = 0
            pt_spin_lock(&self.m.nx_lock)       # no Python code while held
            node = self.m.nx_head_next
            # the list holds nx_lpage_splits entries; a link outside the
            # headers handed out (never expected) ends the walk
            while node > 1 and node - 1 <= hw and got < cap:
                buf[got] = node - 1
                got += 1
                node = pt_sp_ptr(self.m.a, node - 1).nx_link_next
            grew = got == cap and node > 1 and got <= self.m.nx_lpage_splits
            pt_spin_unlock(&self.m.nx_lock)
            if not grew:
                break
            free(buf)                           # the list grew meanwhile: again
        try:
            return [buf[k] for k in range(got)]
        finally:
            free(buf)

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
        is beyond what the root maps.  Changes nothing; the shared side, as
        :meth:`fast_page_fault`."""
        _, spte, level = self.get_last_sptep(root, gfn)
        return spte, level

    def get_last_sptep(self, root, gfn):
        """:meth:`get_last_spte` with the entry's address: ``(sptep, spte,
        level)`` of the last entry on `gfn`'s path, ``(0, 0, 0)`` when `gfn`
        is beyond what the root maps (what the CPU's walk ends at; a caller
        may set A/D there with :meth:`PtArena.try_cmpxchg64`)."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef uint64_t c_gfn = u64_arg(gfn, "gfn")
        cdef uint64_t spte = 0
        cdef int level = 0, top
        cdef sptep_t sptep = 0
        cdef int slot = self._enter_shared("TdpMmuCore.get_last_sptep", None, None)
        try:
            top = self._root(c_root)
            if not c_gfn >> (SPTE_LEVEL_BITS * top):
                pt_shared_rcu_lock(self.m.a, slot)
                sptep = kvm_tdp_mmu_fast_pf_get_last_sptep(&self.m, c_root, c_gfn, &spte, &level)
                pt_shared_rcu_unlock(self.m.a, slot)
        finally:
            self._leave_shared(slot, None, None)
        if sptep == 0:
            return 0, 0, 0
        return sptep, spte, level

    def guest_access_batch(self, root, gfns, gclass, *, write=False, exec=False, max_faults=4,
                           vcpu_id=0, sidx=None, slot_base=None, slot_pte=None, slot_pfn=None,
                           MmuMemoryCache page_cache=None, MmuMemoryCache header_cache=None,
                           nx_huge_pages=False, writes=None):
        """A :class:`GuestAccessBatch` over private copies of `gfns` (uint64,
        each below what `root` maps) and `gclass` (uint8, one per gfn:
        ``GA_CLASS_NOFAST`` - an exit on it always goes to the caller - and
        ``GA_CLASS_LOGGED`` - its memslot logs dirty pages), for accesses of
        one kind (`write`, `exec`: a fetch), or with `writes` (uint8, one
        per gfn: 1 a write, 0 a read; copied) of the kind each says.
        `max_faults` (1..255): exits one access may take.

        The slow path (``GA_CLASS_SLOW`` gfns: a not-present exit is mapped
        at 4K when the host page is present): `sidx` (int32 per gfn: the
        slot index k), per slot k `slot_base[k]` (uint64: its first gfn),
        `slot_pte[k]` (the host PTE flags of its pages, uint8, written: the
        batch holds them, never copies) and `slot_pfn[k]` (their pfns,
        uint64), the vCPU's `page_cache` and `header_cache`, and
        `nx_huge_pages` (the fault's NX workaround flag).  Checks everything
        here; changes nothing."""
        cdef uint64_t c_root = u64_arg(root, "root")
        cdef int top = self._root(c_root)
        cdef int c_max = s32_arg(max_faults, "max_faults")
        cdef int c_vcpu = s32_arg(vcpu_id, "vcpu_id")
        if role_is_mirror(pt_sp_ptr(self.m.a, c_root).role):
            raise ValueError(f"root {c_root} is a mirror root: its changes go through the TDX "
                             f"hooks, which guest_access_batch does not call")
        if not 1 <= c_max <= 255:
            raise ValueError(f"max_faults={c_max} is outside 1..255")
        if write and exec:
            raise ValueError("an access is a read, a write or a fetch: not write and exec")
        _check_array("gfns", gfns)
        _check_array("gclass", gclass, np.uint8)
        if gclass.shape[0] != gfns.shape[0]:
            raise ValueError(f"gclass has {gclass.shape[0]} entries, gfns {gfns.shape[0]}")
        g_arr = np.array(gfns, copy=True)
        c_arr = np.array(gclass, copy=True)
        w_arr = None
        if writes is not None:
            _check_array("writes", writes, np.uint8)
            if writes.shape[0] != gfns.shape[0]:
                raise ValueError(f"writes has {writes.shape[0]} entries, gfns {gfns.shape[0]}")
            w_arr = np.array(writes, copy=True)
            if w_arr.shape[0] and int(w_arr.max()) > 1:
                raise ValueError("writes: each entry is 0 (a read) or 1 (a write)")
            if exec and w_arr.any():
                raise ValueError("an access is a read, a write or a fetch: not writes and exec")
        if g_arr.shape[0]:
            hi = int(g_arr.max())
            if hi >> (SPTE_LEVEL_BITS * top):
                i = int(np.argmax(g_arr))
                raise ValueError(f"gfns[{i}]={hi:#x} is beyond what the root maps "
                                 f"(level {top}: below {1 << (SPTE_LEVEL_BITS * top):#x})")
        cdef Py_ssize_t n = g_arr.shape[0]
        slow = np.flatnonzero(c_arr & GA_CLASS_SLOW)
        if sidx is None:
            s_arr = np.full(n, -1, np.int32)
        else:
            _check_array("sidx", sidx, np.int32)
            if sidx.shape[0] != n:
                raise ValueError(f"sidx has {sidx.shape[0]} entries, gfns {n}")
            s_arr = np.array(sidx, copy=True)
        ptes, pfns = list(slot_pte or ()), list(slot_pfn or ())
        if slot_base is None:
            b_arr = np.zeros(0, np.uint64)
        else:
            _check_array("slot_base", slot_base)
            b_arr = np.array(slot_base, copy=True)
        if len(ptes) != b_arr.shape[0] or len(pfns) != b_arr.shape[0]:
            raise ValueError(f"slot_base, slot_pte and slot_pfn must have one entry per slot "
                             f"({b_arr.shape[0]}, {len(ptes)}, {len(pfns)})")
        for k in range(len(ptes)):
            _check_array(f"slot_pte[{k}]", ptes[k], np.uint8, writable=True)
            _check_array(f"slot_pfn[{k}]", pfns[k])
            if pfns[k].shape[0] != ptes[k].shape[0]:
                raise ValueError(f"slot_pfn[{k}] has {pfns[k].shape[0]} entries, slot_pte[{k}] "
                                 f"{ptes[k].shape[0]}")
        if slow.size:
            if page_cache is None or header_cache is None:
                raise ValueError("gclass: GA_CLASS_SLOW gfns need page_cache and header_cache")
            self._check_caches(page_cache, header_cache)
            k_arr = s_arr[slow]
            if int(k_arr.min()) < 0 or int(k_arr.max()) >= len(ptes):
                raise ValueError("sidx: a GA_CLASS_SLOW gfn's slot index is not 0..len(slot_pte)-1")
            lens = np.array([a.shape[0] for a in ptes], np.uint64)
            rel = g_arr[slow] - b_arr[k_arr]           # (below the base: wraps, and fails)
            if np.any(rel >= lens[k_arr]):
                i = int(slow[np.argmax(rel >= lens[k_arr])])
                raise ValueError(f"gfns[{i}]={int(g_arr[i]):#x} is outside its slot's slot_pte")
        cdef GuestAccessBatch b = GuestAccessBatch.__new__(GuestAccessBatch)
        b._init(self, c_root, top, g_arr, c_arr, w_arr, bool(write), bool(exec), c_max, c_vcpu)
        b._init_slow(s_arr, b_arr, ptes, pfns, page_cache, header_cache, bool(nx_huge_pages))
        return b

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
        return self._map_fault("TdpMmuCore.page_fault_map", c_root, &fault, page_cache,
                               header_cache)


cdef class GuestAccessBatch:
    """Accesses of a guest to many gfns on one TDP root, run by
    :func:`tdp_guest_access` in nogil passes (made by
    :meth:`TdpMmuCore.guest_access_batch`; :meth:`kvmmmu.tdp_mmu.TdpMmu.guest_access`
    drives it).  Owns private copies of its inputs and the outputs:

    * :attr:`faults` (uint8): the exits each access took so far - the
      caller adds the ones it takes itself;
    * :attr:`flags` (uint8): ``GA_MADE_WRITABLE`` (a fast fault set W: the
      gfn is marked dirty), ``GA_DIRTIED`` (the CPU set D from 0).

    :meth:`run` holds the arena's shared side (``mmu_lock`` for read, as
    ``fast_page_fault`` runs under RCU only) for one pass."""
    cdef TdpMmuCore core
    cdef uint64_t root
    cdef int top
    cdef ga_batch b
    cdef object _gfns, _gclass, _writes, _sidx, _base, _ptes, _pfns
    cdef MmuMemoryCache _pc, _hc
    cdef uint8_t **_pte_ptrs
    cdef const uint64_t **_pfn_ptrs
    cdef readonly object faults
    cdef readonly object flags

    def __cinit__(self):
        self.b.n = 0
        self.b.gfns = NULL
        self.b.gclass = NULL
        self.b.writes = NULL
        self.b.faults = NULL
        self.b.flags = NULL
        self.b.sidx = NULL
        self.b.slot_pte = NULL
        self.b.slot_pfn = NULL
        self.b.slot_base = NULL
        self.b.pc = self.b.hc = NULL
        self.b.slow_ok = False
        self.b.exits_ok = True
        self._pte_ptrs = NULL
        self._pfn_ptrs = NULL

    def __dealloc__(self):
        free(self._pte_ptrs)
        free(self._pfn_ptrs)

    cdef _init_slow(self, object s_arr, object b_arr, list ptes, list pfns,
                    MmuMemoryCache pc, MmuMemoryCache hc, bint nx):
        cdef Py_ssize_t k, nk = len(ptes)
        cdef uint8_t[::1] pv
        cdef const uint64_t[::1] fv
        cdef const int[::1] sv = s_arr
        cdef const uint64_t[::1] bv
        self._sidx, self._base, self._ptes, self._pfns = s_arr, b_arr, ptes, pfns
        self._pc, self._hc = pc, hc
        if self.b.n:
            self.b.sidx = &sv[0]
        if nk:
            bv = b_arr
            self.b.slot_base = &bv[0]
            self._pte_ptrs = <uint8_t **>malloc(nk * sizeof(uint8_t *))
            self._pfn_ptrs = <const uint64_t **>malloc(nk * sizeof(uint64_t *))
            if self._pte_ptrs == NULL or self._pfn_ptrs == NULL:
                raise MemoryError("GuestAccessBatch: slot tables")
            for k in range(nk):
                self._pte_ptrs[k] = NULL
                self._pfn_ptrs[k] = NULL
                if ptes[k].shape[0]:
                    pv = ptes[k]
                    fv = pfns[k]
                    self._pte_ptrs[k] = &pv[0]
                    self._pfn_ptrs[k] = &fv[0]
            self.b.slot_pte = self._pte_ptrs
            self.b.slot_pfn = self._pfn_ptrs
        if pc is not None:
            self.b.pc, self.b.hc = &pc.mc, &hc.mc
        self.b.nx_huge_pages = nx

    cdef _init(self, TdpMmuCore core, uint64_t root, int top, object g_arr, object c_arr,
               object w_arr, bint write, bint exec, int max_faults, int vcpu_id):
        cdef Py_ssize_t n = g_arr.shape[0]
        cdef const uint8_t[::1] w
        self.core, self.root, self.top = core, root, top
        self._gfns, self._gclass, self._writes = g_arr, c_arr, w_arr
        if w_arr is not None and n:
            w = w_arr
            self.b.writes = &w[0]
        self.faults = np.zeros(n, np.uint8)
        self.flags = np.zeros(n, np.uint8)
        cdef const uint64_t[::1] g = g_arr
        cdef const uint8_t[::1] c = c_arr
        cdef uint8_t[::1] fa = self.faults
        cdef uint8_t[::1] fl = self.flags
        self.b.n = n
        if n:
            self.b.gfns = &g[0]
            self.b.gclass = &c[0]
            self.b.faults = &fa[0]
            self.b.flags = &fl[0]
        self.b.write, self.b.exec = write, exec
        self.b.max_faults, self.b.vcpu_id = max_faults, vcpu_id

    def __len__(self):
        return self.b.n

    def run(self, start, taken=0, slow_ok=False, exits_ok=True):
        """One pass from access `start` (`taken`: exits the caller took on
        access `start` since the last pass, added to its count first;
        `slow_ok`: GA_CLASS_SLOW gfns may be mapped in this pass - the
        caller holds ``mmu_lock`` for read, no invalidation is in progress,
        the vCPU's pte_list_desc cache needs no top-up; not `exits_ok`:
        every exit goes to the caller, e.g. once the VM is bugged):
        ``(status, pos, nr_fast, last_idx,
        last_ec, last_ret)`` - status ``GA_DONE`` (pos = len), ``GA_SLOW``
        (the exit of access `pos` is the caller's to take) or ``GA_GIVE_UP``
        (access `pos` already took max_faults exits and exits again);
        `nr_fast` exits fixed in this pass (each a pf_taken, pf_fast and
        pf_fixed), `last_idx` / `last_ec` the access and error code of the
        last of them (-1 if none), `last_ret` RET_PF_FIXED when access
        `pos`'s last exit was one of them (else 0); then ``slow``: None,
        or when exits were mapped in this pass ``(nr_slow, nr_fixed,
        nr_spurious, last_idx, pfn, map_writable, last_is_slow)``.  Status
        ``GA_UNEXPECTED``: a mapped exit of access `pos` answered `last_ret`
        (not FIXED, SPURIOUS or RETRY)."""
        if self.core is None:
            raise TypeError("GuestAccessBatch: make it with TdpMmuCore.guest_access_batch")
        cdef Py_ssize_t pos = s64_arg(start, "start")
        cdef int c_taken = s32_arg(taken, "taken")
        if not 0 <= pos <= self.b.n:
            raise ValueError(f"start={pos} is outside 0..{self.b.n}")
        if c_taken:
            if pos == self.b.n or not 0 < c_taken <= 255 - self.b.faults[pos]:
                raise ValueError(f"taken={c_taken}: not 1..255 exits in all on an access "
                                 f"(start={pos} of {self.b.n})")
            self.b.faults[pos] += c_taken
        cdef TdpMmuCore core = self.core
        cdef tdp_mmu_t *m = &core.m
        cdef int status
        cdef bint slow = bool(slow_ok) and self._pc is not None
        cdef MmuMemoryCache pc = self._pc if slow else None
        cdef MmuMemoryCache hc = self._hc if slow else None
        cdef int slot = core._enter_shared("TdpMmuCore.guest_access", pc, hc)
        try:
            if core._root(self.root) != self.top:
                raise ValueError(f"root {self.root} changed level since the batch was made")
            self.b.slow_ok = slow
            self.b.exits_ok = bool(exits_ok)
            self.b.nr_fast = self.b.nr_slow = self.b.nr_slow_fixed = self.b.nr_slow_spurious = 0
            self.b.c_last_idx = self.b.c_last_slow_idx = -1
            self.b.c_last_ec = 0
            self.b.c_last_slow = False
            with nogil:
                pt_shared_rcu_lock(m.a, slot)
                status = tdp_guest_access(m, self.root, &self.b, &pos)
                pt_shared_rcu_unlock(m.a, slot)
        finally:
            self.b.slow_ok = False
            core._leave_shared(slot, pc, hc)
        return (status, pos, self.b.nr_fast, self.b.c_last_idx, self.b.c_last_ec,
                self.b.c_last_ret,
                None if not self.b.nr_slow else
                (self.b.nr_slow, self.b.nr_slow_fixed, self.b.nr_slow_spurious,
                 self.b.c_last_slow_idx, self.b.c_last_pfn, bool(self.b.c_last_writable),
                 bool(self.b.c_last_slow)))
