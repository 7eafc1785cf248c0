"""The page-table arena: SPTE pages, ``struct kvm_mmu_page`` headers, split
SPTEs and lockless walks (Linux v6.18 ``arch/x86/kvm/mmu/mmu.c``,
``mmu_internal.h``, ``tdp_mmu.c``).

Every MMU of a VM keeps its SPTEs in pages of 512 entries with one header per
page.  A :class:`PtArena` holds all of them for one VM:

* **Pages** (tables and the shadow MMU's ``shadowed_translation`` pages) are
  rows of 512 ``uint64`` in numpy-owned chunks of ``tables_per_chunk`` pages.
  A chunk never moves and is never released before the arena, so zero-copy
  views (:meth:`PtArena.spt`, :meth:`PtArena.table`) and SPTE locations stay
  valid while the arena grows.
* **Handles.**  Page ``t`` (the table index) has the pfn ``base_pfn + t`` in
  the model's host physical space, and the SPTE ``i`` of it lives at
  ``sptep = (pfn << 12) | (i << 3)`` (``types.pxd``), so a non-leaf SPTE
  built with ``make_nonleaf_spte(fmt, pfn << 12)`` points at the table and an
  rmap can store ``sptep``.  The default ``base_pfn`` is 3/4 of the way up the
  MAXPHYADDR-46 pfn space (pfn ``0x3_0000_0000``, host physical 48 TiB), below
  2**34 and far above any guest memory a model maps; the whole range
  ``[base_pfn, base_pfn + max_tables)`` is reserved for page tables.  A
  header is named by ``sp`` = header index + 1 (0 is NULL).
* **Headers** are a C array of ``struct kvm_mmu_page`` (pt_arena_defs.h) with
  the kernel's fields at the kernel's widths; :data:`HEADER_DTYPE` is the
  matching numpy structured dtype (views: :meth:`PtArena.sp_header`).
* **Memory caches.**  Pages and headers come from
  :class:`MmuMemoryCache` objects with the kernel's topup / alloc / free
  semantics (``mmu_shadow_page_cache`` pages are filled with
  SHADOW_NONPRESENT_VALUE, ``mmu_page_header_cache`` headers are zeroed).
  A topup that the arena cannot satisfy raises :class:`KvmNoMemoryError`
  and changes nothing.
* **Freeing is deferred past the lockless walkers.**  The shadow MMU frees
  only in :meth:`PtArena.kvm_mmu_commit_zap_page`, after a remote TLB flush
  that waits for every vCPU in READING_SHADOW_PAGE_TABLES to finish its walk
  (the kernel's IPI with KVM_REQUEST_WAIT; a walker has IRQs off).  The TDP
  MMU hands pages to :meth:`PtArena.call_rcu_free_sp` and they are freed
  when a grace period has passed (:meth:`PtArena.rcu_poll`,
  :meth:`PtArena.synchronize_rcu`).  Freed pages and headers are filled with
  :data:`PT_POISON` (0x6b bytes) and queued FIFO, so a use after free reads
  poison for as long as possible and is detected.
* **32-bit hosts.**  An arena built for a format with ``host_64bit=False``
  stores each SPTE as ``union split_spte`` (low half first) and uses the
  kernel's half-ordered writes, ``clear_spte_count`` and the retrying
  lockless read; otherwise every access is one 64-bit atomic.
* **Kernel era.**  ``era="v6.18"`` (default) follows v6.13+ rules;
  ``era="v6.12"`` follows the older mmu_spte_update (flush on lost A/D) and
  reports A/D of zapped SPTEs to a host callback.

Invariants (checked by :meth:`PtArena.audit`):

* every page slot handed out is in exactly one state: free (poisoned, on the
  free list), cached (in a memory cache, untouched fill), spt or info (owned
  by exactly one live header whose ``spt`` / ``shadowed_translation`` names
  it, and whose back-pointer names the header);
* every header slot handed out is free (poisoned), cached (zero), in use, or
  RCU-pending (on the RCU list, in grace-period order);
* a live table holds no poison, and no present non-leaf SPTE of a live table
  at level >= 2 points at a page of the arena that is not a live table;
* on 64-bit hosts clear_spte_count stays 0.

Concurrency: writers (everything that changes SPTEs, headers or pools) are
serialized by the caller, as mmu_lock does.  Lockless readers may run on
other threads at any time; see the protocols in pt_arena.pxd.
"""

cimport cython
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from cpython.exc cimport PyErr_CheckSignals

import threading
import time
import warnings

import numpy as np

from kvmmmu._core._checks import (check_array as _check_array, out_array as _out_array,
                                  readonly as _readonly)
from kvmmmu.errors import KvmNoMemoryError

from kvmmmu._core.defs import PAGE_SIZE, SPTE_ENT_PER_PAGE
from kvmmmu._core.mmu_defs cimport PAGE_SIZE as PAGE_SIZE_C, SPTE_ENT_PER_PAGE as SPTES_PER_PAGE_C
from kvmmmu._core.memcache cimport (
    KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE, KVMMMU_ENOMEM, kvm_mmu_free_memory_cache,
    kvm_mmu_memory_cache, kvm_mmu_memory_cache_alloc, kvm_mmu_memory_cache_init,
    kvm_mmu_topup_memory_cache,
)
from kvmmmu._core.spte cimport (
    ACC_ALL, MKSPTE_HOST_WRITABLE, PG_LEVEL_4K, PT64_ROOT_MAX_LEVEL, PT_WRITABLE_MASK,
    is_large_pte, make_nonleaf_spte, make_spte,
)

cnp.import_array()


# --- constants --------------------------------------------------------------

#: Fill value of freed pages and headers (slab POISON_FREE bytes).
POISON = PT_POISON
#: vcpu->mode values.
globals().update(
    OUTSIDE_GUEST_MODE=OUTSIDE_GUEST_MODE, IN_GUEST_MODE=IN_GUEST_MODE,
    EXITING_GUEST_MODE=EXITING_GUEST_MODE,
    READING_SHADOW_PAGE_TABLES=READING_SHADOW_PAGE_TABLES,
    KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
    PT_ROLE_INVALID=PT_ROLE_INVALID, PT_ROLE_LEVEL_MASK=PT_ROLE_LEVEL_MASK,
)
#: Page and header slot states (see :meth:`PtArena.table_states`).
PAGE_STATES = {PT_PAGE_FREE: "free", PT_PAGE_CACHED: "cached", PT_PAGE_SPT: "spt",
               PT_PAGE_INFO: "info", PT_PAGE_CACHED_INFO: "cached_info"}
SP_STATES = {PT_SP_FREE: "free", PT_SP_CACHED: "cached", PT_SP_IN_USE: "in_use",
             PT_SP_RCU_PENDING: "rcu_pending"}
#: Memory cache kinds, named after the vCPU fields.
CACHE_KINDS = {"shadow_page": PT_CACHE_SHADOW_PAGE, "page_header": PT_CACHE_PAGE_HEADER,
               "shadowed_info": PT_CACHE_SHADOWED_INFO}

#: Names of the access-log events (:meth:`PtArena.start_access_log`).
ACCESS_EVENTS = {
    PT_EV_WRITE64: "write64", PT_EV_XCHG64: "xchg64", PT_EV_READ64: "read64",
    PT_EV_WRITE_LOW: "write_low", PT_EV_WRITE_HIGH: "write_high", PT_EV_XCHG_LOW: "xchg_low",
    PT_EV_READ_LOW: "read_low", PT_EV_READ_HIGH: "read_high", PT_EV_WMB: "smp_wmb",
    PT_EV_RMB: "smp_rmb", PT_EV_READ_COUNT: "read_clear_spte_count",
    PT_EV_INC_COUNT: "inc_clear_spte_count",
}

DEFAULT_TABLES_PER_CHUNK = 512          # 2 MiB of SPTEs per chunk
DEFAULT_MAX_TABLES = 1 << 22            # 16 GiB of page tables
#: Most events an access log may hold (16 bytes each: 4 GiB).
ACCESS_LOG_MAX = 1 << 28
SPTES_PER_PAGE = SPTE_ENT_PER_PAGE    # the arena's historical name

_WARN_TEXT = (
    "mmu_spte_set: the SPTE is already shadow-present (WARN_ON_ONCE)",
    "mmu_spte_update: the new SPTE is not shadow-present (WARN_ON_ONCE)",
    "check_spte_writable_invariants: W without MMU-writable, or MMU-writable "
    "without Host-writable (WARN_ONCE)",
    "mmu_spte_update: the old SPTE was not present or its PFN differs (WARN_ON_ONCE)",
    "KVM_MMU_WARN_ON(is_ept_ve_possible(spte)): suppress-#VE clear in a present EPT entry",
    "kvm_mmu_commit_zap_page: freeing a page that is not invalid or is still a root "
    "(WARN_ON_ONCE)",
    "kvm_update_page_stats: level outside 4K..1G (model check)",
)


class KvmDeadWalkerError(RuntimeError):
    """A wait for lockless walkers (remote TLB flush, grace period) would never
    end: the thread inside the walk has exited without ending it."""


class KvmUseAfterFreeError(RuntimeError):
    """An SPTE or header of a page that has been freed (poisoned) was used."""


class KvmMmuWarning(RuntimeWarning):
    """A WARN_ON_ONCE of the kernel fired; the model, like the kernel, went on."""


class PtArenaAuditError(AssertionError):
    """:meth:`PtArena.audit` found broken arena invariants (one per line)."""


# --- struct kvm_mmu_page as a numpy dtype -----------------------------------

cdef kvm_mmu_page _H

cdef inline Py_ssize_t _off(void *field) noexcept:
    return <char *>field - <char *>&_H

#: (name, numpy type, kernel type) of every header field, in kernel order.
#: Names sharing a union share bytes.
KVM_MMU_PAGE_FIELDS = (
    ("link_prev", "u4", "struct list_head link (sp handle)", _off(&_H.link_prev)),
    ("link_next", "u4", "struct list_head link (sp handle)", _off(&_H.link_next)),
    ("hash_next", "u4", "struct hlist_node hash_link (sp handle)", _off(&_H.hash_next)),
    ("hash_pprev", "u4", "struct hlist_node hash_link (sp handle)", _off(&_H.hash_pprev)),
    ("tdp_mmu_page", "?", "bool", _off(&_H.tdp_mmu_page)),
    ("unsync", "?", "bool", _off(&_H.unsync)),
    ("mmu_valid_gen", "u1", "u8", _off(&_H.mmu_valid_gen)),
    ("tdp_mmu_scheduled_root_to_zap", "?", "bool", _off(&_H.tdp_mmu_scheduled_root_to_zap)),
    ("nx_huge_page_disallowed", "?", "bool", _off(&_H.nx_huge_page_disallowed)),
    ("role", "u4", "union kvm_mmu_page_role (u32 word)", _off(&_H.role)),
    ("gfn", "u8", "gfn_t", _off(&_H.gfn)),
    ("spt", "u8", "u64 * (pfn)", _off(&_H.spt)),
    ("shadowed_translation", "u8", "u64 * (pfn)", _off(&_H.shadowed_translation)),
    ("root_count", "i4", "int", _off(&_H.root_count)),
    ("tdp_mmu_root_count", "i4", "refcount_t", _off(&_H.tdp_mmu_root_count)),
    ("has_mapped_host_mmio", "?", "bool", _off(&_H.has_mapped_host_mmio)),
    ("unsync_children", "u4", "unsigned int", _off(&_H.unsync_children)),
    ("write_flooding_count", "i4", "atomic_t", _off(&_H.write_flooding_count)),
    ("external_spt", "u8", "void *", _off(&_H.external_spt)),
    ("parent_ptes", "u8", "struct kvm_rmap_head", _off(&_H.parent_ptes)),
    ("ptep", "u8", "tdp_ptep_t (sptep)", _off(&_H.ptep)),
    ("unsync_child_bitmap", ("u8", 8), "DECLARE_BITMAP(, 512)", _off(&_H.unsync_child_bitmap[0])),
    ("nx_link_prev", "u4", "struct list_head possible_nx_huge_page_link", _off(&_H.nx_link_prev)),
    ("nx_link_next", "u4", "struct list_head possible_nx_huge_page_link", _off(&_H.nx_link_next)),
    ("clear_spte_count", "i4", "int (CONFIG_X86_32)", _off(&_H.clear_spte_count)),
    ("rcu_next", "u4", "struct rcu_head (sp handle)", _off(&_H.rcu_next)),
    ("rcu_gp", "u8", "struct rcu_head (grace period)", _off(&_H.rcu_gp)),
)

HEADER_DTYPE = np.dtype({
    "names": [f[0] for f in KVM_MMU_PAGE_FIELDS],
    "formats": [f[1] for f in KVM_MMU_PAGE_FIELDS],
    "offsets": [f[3] for f in KVM_MMU_PAGE_FIELDS],
    "itemsize": sizeof(kvm_mmu_page),
})

cdef pt_slot_meta _M
META_DTYPE = np.dtype({
    "names": ["table_sp", "table_next", "sp_next", "table_state", "sp_state"],
    "formats": ["u4", "u4", "u4", "u1", "u1"],
    "offsets": [<char *>&_M.table_sp - <char *>&_M, <char *>&_M.table_next - <char *>&_M,
                <char *>&_M.sp_next - <char *>&_M, <char *>&_M.table_state - <char *>&_M,
                <char *>&_M.sp_state - <char *>&_M],
    "itemsize": sizeof(pt_slot_meta),
})

# Fields set_sp() refuses: the arena owns them (allocation, RCU).
_ARENA_OWNED = frozenset(("spt", "shadowed_translation", "rcu_next", "rcu_gp"))
_BOOL_FIELDS = frozenset(f[0] for f in KVM_MMU_PAGE_FIELDS if f[1] == "?")


# --- pools ------------------------------------------------------------------

cdef inline void _push_free_page(pt_arena_t *a, uint64_t tidx) noexcept nogil:
    """Poison page `tidx` and append it to the FIFO free list."""
    cdef pt_slot_meta *m = pt_slot(a, tidx)
    memset(pt_table_ptr(a, tidx), PT_POISON_BYTE, PAGE_SIZE_C)
    m.table_next = 0
    m.table_state = PT_PAGE_FREE
    if a.table_free_tail:
        pt_slot(a, a.table_free_tail - 1).table_next = <uint32_t>(tidx + 1)
    else:
        a.table_free_head = tidx + 1
    a.table_free_tail = tidx + 1
    a.n_free_tables += 1

cdef inline void _push_free_sp(pt_arena_t *a, uint64_t sp) noexcept nogil:
    cdef pt_slot_meta *m = pt_slot(a, sp - 1)
    memset(pt_sp_ptr(a, sp), PT_POISON_BYTE, sizeof(kvm_mmu_page))
    m.sp_next = 0
    m.sp_state = PT_SP_FREE
    if a.sp_free_tail:
        pt_slot(a, a.sp_free_tail - 1).sp_next = <uint32_t>sp
    else:
        a.sp_free_head = sp
    a.sp_free_tail = sp
    a.n_free_sps += 1

cdef int pt_pool_alloc(void *pool, uint64_t *obj) noexcept nogil:
    cdef pt_pool *p = <pt_pool *>pool
    cdef pt_arena_t *a = <pt_arena_t *>p.arena
    cdef uint64_t idx, i, fill
    cdef uint64_t *t
    cdef pt_slot_meta *m
    if p.kind == PT_CACHE_PAGE_HEADER:
        if a.n_free_sps:
            idx = a.sp_free_head - 1
            m = pt_slot(a, idx)
            a.sp_free_head = m.sp_next
            if a.sp_free_head == 0:
                a.sp_free_tail = 0
            m.sp_next = 0
            a.n_free_sps -= 1
        elif a.headers_hw < a.n_chunks * a.tables_per_chunk:
            idx = a.headers_hw
            a.headers_hw += 1
            m = pt_slot(a, idx)
        else:
            return -KVMMMU_ENOMEM
        memset(pt_sp_ptr(a, idx + 1), 0, sizeof(kvm_mmu_page))
        m.sp_state = PT_SP_CACHED
        a.n_cached_sps += 1
        obj[0] = idx + 1
        return 0
    if a.n_free_tables:
        idx = a.table_free_head - 1
        m = pt_slot(a, idx)
        a.table_free_head = m.table_next
        if a.table_free_head == 0:
            a.table_free_tail = 0
        m.table_next = 0
        a.n_free_tables -= 1
    elif a.tables_hw < a.n_chunks * a.tables_per_chunk:
        idx = a.tables_hw
        m = pt_slot(a, idx)
    else:
        return -KVMMMU_ENOMEM
    t = pt_table_ptr(a, idx)
    pt_write_once_u32(&m.table_sp, 0)
    if p.kind == PT_CACHE_SHADOW_PAGE:
        fill = a.fmt.nonpresent_value
        for i in range(512):
            t[i] = fill
        m.table_state = PT_PAGE_CACHED
    else:
        memset(t, 0, PAGE_SIZE_C)
        m.table_state = PT_PAGE_CACHED_INFO
    if idx == a.tables_hw:
        # Publish a fresh slot only once it holds its fill value.
        pt_store_release64(&a.tables_hw, idx + 1)
    a.n_cached_tables += 1
    obj[0] = a.base_pfn + idx
    return 0

cdef void pt_pool_free(void *pool, uint64_t obj) noexcept nogil:
    cdef pt_pool *p = <pt_pool *>pool
    cdef pt_arena_t *a = <pt_arena_t *>p.arena
    if p.kind == PT_CACHE_PAGE_HEADER:
        a.n_cached_sps -= 1
        _push_free_sp(a, obj)
    else:
        a.n_cached_tables -= 1
        _push_free_page(a, obj - a.base_pfn)


cdef int pt_alloc_sp(pt_arena_t *a, kvm_mmu_memory_cache *page_cache,
                     kvm_mmu_memory_cache *header_cache,
                     kvm_mmu_memory_cache *info_cache, uint64_t *sp) noexcept nogil:
    cdef uint64_t h_sp = 0, pfn = 0, info_pfn = 0
    cdef kvm_mmu_page *h
    cdef pt_slot_meta *m
    if header_cache.nobjs == 0 or page_cache.nobjs == 0:
        return -KVMMMU_ENOMEM
    if info_cache != NULL and info_cache.nobjs == 0:
        return -KVMMMU_ENOMEM
    kvm_mmu_memory_cache_alloc(header_cache, &h_sp)
    kvm_mmu_memory_cache_alloc(page_cache, &pfn)
    h = pt_sp_ptr(a, h_sp)
    h.spt = pfn
    m = pt_slot(a, pfn - a.base_pfn)
    pt_write_once_u32(&m.table_sp, <uint32_t>h_sp)
    m.table_state = PT_PAGE_SPT
    a.n_cached_tables -= 1
    a.n_spt += 1
    pt_slot(a, h_sp - 1).sp_state = PT_SP_IN_USE
    a.n_cached_sps -= 1
    a.n_sps += 1
    if info_cache != NULL:
        kvm_mmu_memory_cache_alloc(info_cache, &info_pfn)
        h.shadowed_translation = info_pfn
        m = pt_slot(a, info_pfn - a.base_pfn)
        pt_write_once_u32(&m.table_sp, <uint32_t>h_sp)
        m.table_state = PT_PAGE_INFO
        a.n_cached_tables -= 1
        a.n_info += 1
    sp[0] = h_sp
    return 0


cdef void pt_free_sp(pt_arena_t *a, uint64_t sp) noexcept nogil:
    # The page's back-pointer is left behind, stale, as page->private is.
    cdef kvm_mmu_page *h = pt_sp_ptr(a, sp)
    cdef pt_slot_meta *hm = pt_slot(a, sp - 1)
    if hm.sp_state == PT_SP_RCU_PENDING:
        a.n_rcu_pending -= 1
    else:
        a.n_sps -= 1
    _push_free_page(a, h.spt - a.base_pfn)
    a.n_spt -= 1
    if h.shadowed_translation:
        _push_free_page(a, h.shadowed_translation - a.base_pfn)
        a.n_info -= 1
    _push_free_sp(a, sp)
    a.nr_sps_freed += 1


# --- remote TLB flush and RCU -----------------------------------------------

cdef inline void _spin(uint64_t *spins) noexcept nogil:
    spins[0] += 1
    if (spins[0] & 1023) == 0:
        pt_yield()
    else:
        pt_cpu_relax()


cdef int kvm_flush_remote_tlbs(pt_arena_t *a) noexcept nogil:
    cdef int i, waited = 0
    cdef uint64_t w, spins = 0
    cdef kvm_vcpu_lockless *v
    a.remote_tlb_flush_requests += 1
    # Pairs with the walker's smp_store_mb(): either we see its mode, or it
    # sees every unlink we did before this flush.
    pt_smp_mb()
    for i in range(a.nr_vcpus):
        v = &a.vcpus[i]
        w = pt_load_acquire64(&v.mode)
        if (w & 3) == OUTSIDE_GUEST_MODE:
            continue
        if (w & 3) == IN_GUEST_MODE:
            # kvm_vcpu_exiting_guest_mode(); the IPI makes the guest exit at
            # once, so the model does not wait for it.
            pt_try_cmpxchg64(&v.mode, &w, (w & ~(<uint64_t>3)) | EXITING_GUEST_MODE)
            continue
        if (w & 3) == EXITING_GUEST_MODE:
            continue
        # READING_SHADOW_PAGE_TABLES: IRQs are off on that CPU; the IPI is
        # acknowledged only at walk_shadow_page_lockless_end().
        waited += 1
        while pt_load_acquire64(&v.mode) == w:
            _spin(&spins)
    a.remote_tlb_flush += 1
    a.flush_ipis_waited += waited
    return waited


cdef int _flush_remote_tlbs_slice(pt_arena_t *a, int *nxt, int *waited,
                                  uint64_t max_spins) noexcept nogil:
    """The vCPU loop of kvm_flush_remote_tlbs from vCPU ``*nxt`` on, spinning
    at most ``max_spins`` times: 1 when every vCPU was handled, 0 when the
    budget ran out waiting for vCPU ``*nxt`` (call again to go on)."""
    cdef uint64_t w, spins = 0
    cdef kvm_vcpu_lockless *v
    while nxt[0] < a.nr_vcpus:
        v = &a.vcpus[nxt[0]]
        w = pt_load_acquire64(&v.mode)
        if (w & 3) == IN_GUEST_MODE:
            pt_try_cmpxchg64(&v.mode, &w, (w & ~(<uint64_t>3)) | EXITING_GUEST_MODE)
        elif (w & 3) == READING_SHADOW_PAGE_TABLES:
            if spins == 0:
                waited[0] += 1
            while pt_load_acquire64(&v.mode) == w:
                if spins >= max_spins:
                    if spins:
                        waited[0] -= 1          # counted again when resumed
                    return 0
                _spin(&spins)
        nxt[0] += 1
        spins = 0
    return 1


cdef void kvm_mmu_commit_zap_page(pt_arena_t *a, const uint64_t *sps, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef kvm_mmu_page *h
    if n == 0:
        return
    kvm_flush_remote_tlbs(a)
    for i in range(n):
        h = pt_sp_ptr(a, sps[i])
        if not (h.role & PT_ROLE_INVALID) or h.root_count:
            a.warn[PT_WARN_COMMIT_ZAP] += 1
        pt_free_sp(a, sps[i])


cdef void call_rcu_free_sp(pt_arena_t *a, uint64_t sp) noexcept nogil:
    cdef kvm_mmu_page *h = pt_sp_ptr(a, sp)
    h.rcu_gp = a.rcu_gp_seq
    h.rcu_next = 0
    pt_slot(a, sp - 1).sp_state = PT_SP_RCU_PENDING
    a.n_sps -= 1
    a.n_rcu_pending += 1
    if a.rcu_tail:
        pt_sp_ptr(a, a.rcu_tail).rcu_next = <uint32_t>sp
    else:
        a.rcu_head = sp
    a.rcu_tail = sp


cdef inline void _rcu_start_gp(pt_arena_t *a) noexcept nogil:
    # Callbacks queued so far carry cookies <= target; readers that start
    # after this store see target + 1 and are not waited for.
    a.rcu_gp_target = a.rcu_gp_seq
    pt_store_mb64(&a.rcu_gp_seq, a.rcu_gp_target + 1)
    a.rcu_gp_in_progress = True


cdef inline int64_t _rcu_do_callbacks(pt_arena_t *a) noexcept nogil:
    cdef int64_t freed = 0
    cdef uint64_t sp
    cdef kvm_mmu_page *h
    while a.rcu_head != 0:
        sp = a.rcu_head
        h = pt_sp_ptr(a, sp)
        if h.rcu_gp > a.rcu_completed:
            break
        a.rcu_head = h.rcu_next
        if a.rcu_head == 0:
            a.rcu_tail = 0
        pt_free_sp(a, sp)           # tdp_mmu_free_sp_rcu_callback
        freed += 1
    return freed


cdef inline bint _rcu_try_finish_gp(pt_arena_t *a) noexcept nogil:
    cdef int i
    cdef uint64_t c
    pt_smp_mb()
    for i in range(a.nr_vcpus):
        c = pt_load_acquire64(&a.vcpus[i].rcu_gp)
        if c != 0 and c <= a.rcu_gp_target:
            return False
    a.rcu_completed = a.rcu_gp_target
    a.rcu_gp_in_progress = False
    a.rcu_gps += 1
    return True


cdef int64_t rcu_poll(pt_arena_t *a) noexcept nogil:
    if not a.rcu_gp_in_progress:
        if a.rcu_head == 0:
            return 0
        if pt_sp_ptr(a, a.rcu_head).rcu_gp > a.rcu_completed:
            _rcu_start_gp(a)
    if a.rcu_gp_in_progress and not _rcu_try_finish_gp(a):
        return 0
    return _rcu_do_callbacks(a)


cdef void synchronize_rcu(pt_arena_t *a) noexcept nogil:
    cdef uint64_t spins = 0
    while a.rcu_gp_in_progress and not _rcu_try_finish_gp(a):
        _spin(&spins)
    _rcu_start_gp(a)
    while not _rcu_try_finish_gp(a):
        _spin(&spins)
    _rcu_do_callbacks(a)


cdef void rcu_barrier(pt_arena_t *a) noexcept nogil:
    cdef uint64_t spins = 0
    while a.rcu_head != 0:
        if rcu_poll(a) == 0 and a.rcu_head != 0:
            _spin(&spins)


# --- argument helpers ----------------------------------------------------------

cdef object _cache_kind(object kind):
    if isinstance(kind, str):
        try:
            return CACHE_KINDS[kind]
        except KeyError:
            raise ValueError(f"kind must be one of {sorted(CACHE_KINDS)}, not {kind!r}") from None
    if kind in CACHE_KINDS.values():
        return int(kind)
    raise ValueError(f"kind must be one of {sorted(CACHE_KINDS)}, not {kind!r}")


class _LocklessWalk:
    """Context manager for :meth:`PtArena.lockless_walk`."""
    __slots__ = ("arena", "vcpu")

    def __init__(self, arena, vcpu):
        self.arena = arena
        self.vcpu = vcpu

    def __enter__(self):
        self.arena.walk_shadow_page_lockless_begin(self.vcpu)
        return self.arena

    def __exit__(self, *exc):
        self.arena.walk_shadow_page_lockless_end(self.vcpu)
        return False


# --- the arena -------------------------------------------------------------------

@cython.no_gc_clear              # MmuMemoryCache.__dealloc__ may still use the chunks
cdef class PtArena:
    """All page-table pages and ``kvm_mmu_page`` headers of one VM.

    Parameters
    ----------
    fmt : SpteFormat
        The VM's SPTE format.  ``fmt.host_64bit`` chooses the mode: 64-bit
        hosts access SPTEs with single 64-bit atomics, 32-bit hosts use
        ``union split_spte`` and ``clear_spte_count``.  New tables are
        filled with ``fmt.SHADOW_NONPRESENT_VALUE``.
    nr_vcpus : int
        vCPUs taking part in the lockless walk protocols (``vcpu`` arguments
        are ``0 .. nr_vcpus - 1``).
    base_pfn : int, optional
        pfn of table 0.  Default: ``3/4 * 2**(min(maxphyaddr, 46) - 12)``
        (``0x3_0000_0000`` for MAXPHYADDR 46).  ``[base_pfn, base_pfn +
        max_tables)`` must lie in ``[1, 2**(maxphyaddr - 12))`` and is reserved
        for page tables.
    max_tables : int
        Capacity in pages (tables plus shadowed-translation pages); a
        multiple of ``tables_per_chunk``, below 2**32.  Memory is committed
        one chunk at a time as caches are topped up.
    tables_per_chunk : int
        Pages per chunk, a power of two (default 512: 2 MiB of SPTEs).
    era : {"v6.18", "v6.12"}
        Rules of mmu_spte_update / mmu_spte_clear_track_bits (see module doc).
    prove_mmu : bool
        Also check ``KVM_MMU_WARN_ON(is_ept_ve_possible())`` on 64-bit writes
        (``CONFIG_KVM_PROVE_MMU``).
    host_ad : callable, optional
        ``host_ad(pfn, accessed, dirty)``, called when the v6.12 helpers pass
        A/D state to the host page (``kvm_set_pfn_accessed/dirty``).
    """

    def __cinit__(self):
        self.a.chunk_base = NULL
        self._vcpus_raw = NULL

    def __init__(self, SpteFormat fmt not None, *, int nr_vcpus=1, base_pfn=None,
                 uint64_t max_tables=DEFAULT_MAX_TABLES,
                 uint64_t tables_per_chunk=DEFAULT_TABLES_PER_CHUNK,
                 str era="v6.18", bint prove_mmu=False, host_ad=None):
        cdef uint64_t limit, base, shift
        cdef int i
        if self.a.chunk_base != NULL:
            raise RuntimeError("PtArena.__init__ called twice")
        if tables_per_chunk == 0 or (tables_per_chunk & (tables_per_chunk - 1)):
            raise ValueError(f"tables_per_chunk={tables_per_chunk} is not a power of two")
        if max_tables == 0 or max_tables % tables_per_chunk:
            raise ValueError(f"max_tables={max_tables} is not a positive multiple of "
                             f"tables_per_chunk={tables_per_chunk}")
        if max_tables >= (<uint64_t>1) << 32:
            raise ValueError(f"max_tables={max_tables} does not fit the 32-bit handles")
        if not 1 <= nr_vcpus <= 4096:
            raise ValueError(f"nr_vcpus={nr_vcpus} is outside 1..4096")
        if era not in ("v6.18", "v6.12"):
            raise ValueError(f"era must be 'v6.18' or 'v6.12', not {era!r}")
        if host_ad is not None and not callable(host_ad):
            raise TypeError("host_ad must be callable")
        limit = (<uint64_t>1) << (fmt.fmt.maxphyaddr - 12)
        if base_pfn is None:
            base = ((<uint64_t>1) << (min(fmt.fmt.maxphyaddr, 46) - 12)) // 4 * 3
        else:
            if not isinstance(base_pfn, int) or base_pfn < 0:
                raise ValueError(f"base_pfn must be a non-negative int, not {base_pfn!r}")
            base = base_pfn
        if base == 0:
            raise ValueError("base_pfn must not be 0 (pfn 0 is never a page table)")
        if base > limit or max_tables > limit - base:
            raise ValueError(f"tables [{base:#x}, {base + max_tables:#x}) do not fit below "
                             f"MAXPHYADDR {fmt.fmt.maxphyaddr} (pfn limit {limit:#x})")
        self.fmt = fmt
        self.a.fmt = fmt.fmt
        self.a.host_64bit = fmt.fmt.host_64bit
        self.a.era = PT_ERA_V6_18 if era == "v6.18" else PT_ERA_V6_12
        self.a.prove_mmu = prove_mmu
        self.a.base_pfn = base
        self.a.tables_per_chunk = tables_per_chunk
        shift = 0
        while ((<uint64_t>1) << shift) < tables_per_chunk:
            shift += 1
        self.a.chunk_shift = shift
        self.a.chunk_mask = tables_per_chunk - 1
        self.a.hdr_off = tables_per_chunk * PAGE_SIZE_C
        self.a.meta_off = self.a.hdr_off + tables_per_chunk * sizeof(kvm_mmu_page)
        self.a.max_chunks = max_tables // tables_per_chunk
        self.a.chunk_base = <uint8_t **>calloc(self.a.max_chunks, sizeof(uint8_t *))
        if self.a.chunk_base == NULL:
            raise MemoryError()
        self._dir_bytes = self.a.max_chunks * sizeof(uint8_t *)
        self._vcpus_raw = calloc(nr_vcpus + 1, sizeof(kvm_vcpu_lockless))
        if self._vcpus_raw == NULL:
            raise MemoryError()
        self.a.vcpus = <kvm_vcpu_lockless *>((<size_t>self._vcpus_raw + 63) & ~(<size_t>63))
        self.a.nr_vcpus = nr_vcpus
        for i in range(nr_vcpus):
            self.a.vcpus[i].mode = OUTSIDE_GUEST_MODE
        self.a.rcu_gp_seq = 1
        for i in range(3):
            self.a.pools[i].arena = &self.a
            self.a.pools[i].kind = i
        self._chunks = ()
        self._table_views = ()
        self._header_views = ()
        self._meta_views = ()
        self._walk_owner = [None] * nr_vcpus
        self._host_ad = host_ad

    def __repr__(self):
        return (f"PtArena({self.fmt!r}, {'64' if self.a.host_64bit else '32'}-bit host, "
                f"era={self.era!r}, base_pfn={self.a.base_pfn:#x}, "
                f"{self.a.n_chunks}/{self.a.max_chunks} chunks of {self.a.tables_per_chunk}, "
                f"{self.a.n_sps} sps)")

    def __dealloc__(self):
        free(self.a.chunk_base)
        free(self._vcpus_raw)
        free(self.a.log)

    # -- geometry -------------------------------------------------------------

    @property
    def host_64bit(self):
        """False: 32-bit host, SPTEs are ``union split_spte``."""
        return bool(self.a.host_64bit)

    @property
    def era(self):
        return "v6.18" if self.a.era == PT_ERA_V6_18 else "v6.12"

    @property
    def base_pfn(self):
        return self.a.base_pfn

    @property
    def max_tables(self):
        return self.a.max_chunks * self.a.tables_per_chunk

    @property
    def tables_per_chunk(self):
        return self.a.tables_per_chunk

    @property
    def n_chunks(self):
        return self.a.n_chunks

    @property
    def capacity(self):
        """Page slots in the chunks allocated so far."""
        return self.a.n_chunks * self.a.tables_per_chunk

    @property
    def nr_vcpus(self):
        return self.a.nr_vcpus

    @property
    def nonpresent_value(self):
        """SHADOW_NONPRESENT_VALUE of the arena's format (new tables hold it)."""
        return self.a.fmt.nonpresent_value

    @property
    def nbytes(self):
        """Bytes the arena holds: chunks, chunk directory and vCPU states."""
        cdef uint64_t n = 0
        for c in self._chunks:
            n += (<cnp.ndarray>c).nbytes
        return n + self._dir_bytes + (self.a.nr_vcpus + 1) * sizeof(kvm_vcpu_lockless)

    @property
    def bytes_per_table(self):
        """:attr:`nbytes` divided by the page slots allocated (chunks x pages)."""
        return self.nbytes / self.capacity if self.a.n_chunks else float("nan")

    def owns_pfn(self, uint64_t pfn):
        """Is `pfn` inside the range reserved for this arena's pages?"""
        return self.a.base_pfn <= pfn < self.a.base_pfn + self.max_tables

    # -- growth ---------------------------------------------------------------

    cdef int _grow_for(self, uint64_t tables, uint64_t headers) except -1:
        """Add chunks so that `tables` more pages and `headers` more headers
        can be taken without growing.  All-or-nothing; the caller checked
        the capacity."""
        cdef pt_arena_t *a = &self.a
        cdef uint64_t T = a.tables_per_chunk, need_slots = 0, have = a.n_chunks * T
        cdef uint64_t n_new, nbytes, addr, pad, c, i
        cdef cnp.ndarray buf
        if tables > a.n_free_tables:
            need_slots = max(need_slots, a.tables_hw + tables - a.n_free_tables)
        if headers > a.n_free_sps:
            need_slots = max(need_slots, a.headers_hw + headers - a.n_free_sps)
        if need_slots <= have:
            return 0
        n_new = (need_slots - have + T - 1) // T
        if a.n_chunks + n_new > a.max_chunks:
            raise KvmNoMemoryError("page-table arena is full")
        nbytes = a.meta_off + T * sizeof(pt_slot_meta) + PAGE_SIZE_C
        new = [np.zeros(nbytes, dtype=np.uint8) for _ in range(n_new)]   # may raise: nothing changed yet
        for buf in new:
            addr = <size_t>cnp.PyArray_DATA(buf)
            pad = (PAGE_SIZE_C - (addr & (PAGE_SIZE_C - 1))) & (PAGE_SIZE_C - 1)
            c = a.n_chunks
            a.chunk_base[c] = <uint8_t *>(addr + pad)
            # Tuples, not lists: the garbage collector never clears a tuple,
            # so a reference cycle cannot free chunk memory C still uses.
            self._chunks += (buf,)
            self._table_views += (buf[pad:pad + T * PAGE_SIZE_C].view(np.uint64).reshape(T, SPTES_PER_PAGE_C),)
            self._header_views += (buf[pad + a.hdr_off:pad + a.meta_off].view(HEADER_DTYPE),)
            self._meta_views += (buf[pad + a.meta_off:pad + a.meta_off + T * sizeof(pt_slot_meta)].view(META_DTYPE),)
            pt_store_release64(&a.n_chunks, c + 1)
        return 0

    def grow(self, uint64_t n_chunks=1):
        """Allocate `n_chunks` more chunks now (caches grow the arena on demand)."""
        if n_chunks > self.a.max_chunks - self.a.n_chunks:      # no wrap-around
            raise KvmNoMemoryError(f"page-table arena is full ({self.a.n_chunks} of "
                                   f"{self.a.max_chunks} chunks)")
        cdef uint64_t T = self.a.tables_per_chunk
        self._grow_for(self.a.n_free_tables + (self.a.n_chunks + n_chunks) * T - self.a.tables_hw, 0)

    cdef uint64_t _available(self, int kind):
        cdef uint64_t total = self.a.max_chunks * self.a.tables_per_chunk
        if kind == PT_CACHE_PAGE_HEADER:
            return self.a.n_free_sps + total - self.a.headers_hw
        return self.a.n_free_tables + total - self.a.tables_hw

    # -- locations ------------------------------------------------------------

    def table_pfn(self, uint64_t table_index):
        """pfn of page `table_index` (``base_pfn + table_index``)."""
        if table_index >= self.max_tables:
            raise ValueError(f"table index {table_index} is outside 0..{self.max_tables - 1}")
        return self.a.base_pfn + table_index

    def table_index(self, uint64_t pfn):
        """Table index of page `pfn`."""
        if not self.owns_pfn(pfn):
            raise ValueError(f"pfn {pfn:#x} is not a page of this arena")
        return pfn - self.a.base_pfn

    def make_sptep(self, uint64_t table_index, unsigned int index):
        """sptep of entry `index` (0..511) of page `table_index`."""
        if index >= SPTES_PER_PAGE_C:
            raise ValueError(f"SPTE index {index} is outside 0..511")
        return make_sptep(self.table_pfn(table_index), index)

    def sptep_location(self, uint64_t sptep):
        """``(table_index, index)`` of `sptep`."""
        if (sptep & 7) or not self.owns_pfn(sptep_table_pfn(sptep)):
            raise ValueError(f"sptep {sptep:#x} is not an SPTE address of this arena")
        return sptep_table_pfn(sptep) - self.a.base_pfn, spte_index(sptep)

    def make_spteps(self, table_indices, indices):
        """Batch :meth:`make_sptep`: uint64 arrays (broadcast) -> uint64 sptep array."""
        t = np.asarray(table_indices, dtype=np.uint64)
        i = np.asarray(indices, dtype=np.uint64)
        if t.size and int(t.max()) >= self.max_tables:
            raise ValueError("table index outside the arena")
        if i.size and int(i.max()) >= SPTES_PER_PAGE_C:
            raise ValueError("SPTE index outside 0..511")
        return ((t + np.uint64(self.a.base_pfn)) << np.uint64(12)) | (i << np.uint64(3))

    def sptep_locations(self, spteps):
        """Batch :meth:`sptep_location`: -> (table_indices, indices) uint64 arrays."""
        s = np.asarray(spteps, dtype=np.uint64)
        pfn = s >> np.uint64(12)
        if s.size and (np.any(s & np.uint64(7)) or int(pfn.min()) < self.a.base_pfn or
                       int(pfn.max()) >= self.a.base_pfn + self.max_tables):
            raise ValueError("sptep outside the arena")
        return pfn - np.uint64(self.a.base_pfn), (s >> np.uint64(3)) & np.uint64(511)

    def sp_sptep(self, uint64_t sp, unsigned int index):
        """sptep of entry `index` of `sp`'s table."""
        self._check_sp(sp, True)
        if index >= SPTES_PER_PAGE_C:
            raise ValueError(f"SPTE index {index} is outside 0..511")
        return make_sptep(pt_sp_ptr(&self.a, sp).spt, index)

    def sp_pa(self, uint64_t sp):
        """Host physical address of `sp`'s table (``__pa(sp->spt)``), what
        make_nonleaf_spte() takes."""
        self._check_sp(sp, True)
        return pt_sp_ptr(&self.a, sp).spt << 12

    def sptep_to_sp(self, uint64_t sptep):
        """sp handle of the table holding `sptep`."""
        self._check_sptep(sptep)
        return pt_page_sp(&self.a, sptep_table_pfn(sptep))

    def spte_to_child_sp(self, uint64_t spte):
        """sp handle of the table a non-leaf SPTE points to (0: not an arena page)."""
        return spte_to_child_sp(&self.a, spte)

    # -- checks ---------------------------------------------------------------

    cdef int _check_sptep(self, sptep_t sptep) except -1:
        cdef pt_slot_meta *m
        if not pt_sptep_in_arena(&self.a, sptep):
            raise ValueError(f"sptep {sptep:#x} is not an SPTE of a page this arena handed out")
        m = pt_slot(&self.a, pt_table_index(&self.a, sptep))
        if m.table_state == PT_PAGE_SPT:
            return 0
        if m.table_state == PT_PAGE_FREE:
            raise KvmUseAfterFreeError(f"sptep {sptep:#x} is in a freed (poisoned) page")
        raise ValueError(f"sptep {sptep:#x} is in a page in state "
                         f"{PAGE_STATES.get(m.table_state, m.table_state)}, not a live table")

    cdef int _check_sp(self, uint64_t sp, bint allow_pending) except -1:
        cdef uint8_t st
        if sp == 0 or sp > self.a.headers_hw:
            raise ValueError(f"sp {sp} is not a header this arena handed out")
        st = pt_slot(&self.a, sp - 1).sp_state
        if st == PT_SP_IN_USE or (allow_pending and st == PT_SP_RCU_PENDING):
            return 0
        if st == PT_SP_FREE:
            raise KvmUseAfterFreeError(f"sp {sp} has been freed (poisoned)")
        raise ValueError(f"sp {sp} is {SP_STATES.get(st, st)}")

    cdef int _warn_since(self, uint32_t *before) except -1:
        cdef int i
        for i in range(PT_NR_WARN):
            if self.a.warn[i] != before[i]:
                if self.warn_sink is not None:      # the VM's one WARN record
                    self.warn_sink.warn(_WARN_TEXT[i].split(":")[0], _WARN_TEXT[i], once=True)
                warnings.warn(_WARN_TEXT[i], KvmMmuWarning, stacklevel=3)
        return 0

    # -- views ----------------------------------------------------------------

    def table(self, uint64_t table_index):
        """Zero-copy ``uint64[512]`` view of page `table_index` (any state).

        Writing through a view bypasses the SPTE protocols: use the helpers
        for anything a lockless reader may see.
        """
        if table_index >= self.a.n_chunks * self.a.tables_per_chunk:
            raise ValueError(f"table index {table_index} is not in an allocated chunk")
        return self._table_views[table_index >> self.a.chunk_shift][table_index & self.a.chunk_mask]

    def spt(self, uint64_t sp):
        """Zero-copy ``uint64[512]`` view of `sp`'s table (``sp->spt``)."""
        self._check_sp(sp, True)
        return self.table(pt_sp_ptr(&self.a, sp).spt - self.a.base_pfn)

    def shadowed_translation(self, uint64_t sp):
        """View of `sp`'s ``shadowed_translation`` page, or None (direct sp)."""
        self._check_sp(sp, True)
        cdef uint64_t pfn = pt_sp_ptr(&self.a, sp).shadowed_translation
        return None if pfn == 0 else self.table(pfn - self.a.base_pfn)

    def chunk_tables(self, uint64_t chunk):
        """``(tables_per_chunk, 512)`` uint64 view of a chunk's pages."""
        return self._table_views[chunk]

    def chunk_headers(self, uint64_t chunk):
        """``(tables_per_chunk,)`` :data:`HEADER_DTYPE` view of a chunk's headers
        (read-only, like :meth:`sp_header`)."""
        return _readonly(self._header_views[chunk])

    def sp_header(self, uint64_t sp):
        """0-d :data:`HEADER_DTYPE` view of `sp`'s header (any state), read-only
        and not re-flippable: C follows several of its fields (spt,
        parent_ptes, shadowed_translation); change fields with :meth:`set_sp`."""
        return _readonly(self._sp_header_rw(sp))

    def _sp_header_rw(self, uint64_t sp):
        """The writable header view, for tests that plant corruption for the
        auditor to find.  Not API: what is planted here, C will follow."""
        if sp == 0 or sp > self.a.n_chunks * self.a.tables_per_chunk:
            raise ValueError(f"sp {sp} is not a header slot of this arena")
        return self._header_views[(sp - 1) >> self.a.chunk_shift][(sp - 1) & self.a.chunk_mask, ...]

    def table_states(self):
        """uint8 array (copy): PT state of every page slot handed out (:data:`PAGE_STATES`)."""
        return self._meta_column("table_state", self.a.tables_hw)

    def sp_states(self):
        """uint8 array (copy): state of every header slot handed out (:data:`SP_STATES`)."""
        return self._meta_column("sp_state", self.a.headers_hw)

    def _meta_column(self, name, uint64_t n):
        if self.a.n_chunks == 0:
            return np.zeros(0, np.uint8)
        return np.concatenate([m[name] for m in self._meta_views])[:n].copy()

    # -- header fields ----------------------------------------------------------

    def get_sp(self, uint64_t sp):
        """Every header field of `sp` as a dict (``unsync_child_bitmap`` as a
        512-bit int)."""
        self._check_sp(sp, True)
        v = self.sp_header(sp)
        out = {}
        for name, *_ in KVM_MMU_PAGE_FIELDS:
            if name == "unsync_child_bitmap":
                out[name] = sum(int(w) << (64 * i) for i, w in enumerate(v[name]))
            elif name in _BOOL_FIELDS:
                out[name] = bool(v[name])
            else:
                out[name] = int(v[name])
        return out

    def set_sp(self, uint64_t sp, **fields):
        """Set header fields of `sp`, checked against the kernel's widths.

        Values that do not fit raise (OverflowError / ValueError / TypeError)
        before anything is written.  ``spt``, ``shadowed_translation`` and the
        RCU fields belong to the arena and cannot be set.
        """
        self._check_sp(sp, True)
        names = {f[0]: f for f in KVM_MMU_PAGE_FIELDS}
        staged = []
        for name, value in fields.items():
            if name not in names:
                raise AttributeError(f"struct kvm_mmu_page has no field {name!r}")
            if name in _ARENA_OWNED:
                raise ValueError(f"{name} is owned by the arena")
            if name == "unsync_child_bitmap":
                if not isinstance(value, int) or not 0 <= value < (1 << 512):
                    raise ValueError("unsync_child_bitmap must be an int in [0, 2**512)")
                value = np.array([(value >> (64 * i)) & 0xFFFFFFFFFFFFFFFF for i in range(8)],
                                 dtype=np.uint64)
            elif name in _BOOL_FIELDS:
                if not (isinstance(value, bool) or value in (0, 1)):
                    raise ValueError(f"{name} is a bool, not {value!r}")
                value = bool(value)
            else:
                if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                    raise TypeError(f"{name} must be an int, not {type(value).__name__}")
                info = np.iinfo(np.dtype(names[name][1]))
                if not info.min <= value <= info.max:
                    raise OverflowError(f"{name}={value} does not fit {names[name][2]} "
                                        f"({np.dtype(names[name][1]).itemsize * 8}-bit)")
            staged.append((name, value))
        v = self._sp_header_rw(sp)
        for name, value in staged:
            v[name] = value

    # -- allocation and freeing ----------------------------------------------------

    def alloc_sp(self, MmuMemoryCache page_cache not None, MmuMemoryCache header_cache not None,
                 MmuMemoryCache info_cache=None, *, uint32_t role=0, uint64_t gfn=0,
                 bint tdp_mmu_page=False):
        """Take a header and a table (and, for indirect pages, a
        shadowed_translation page) from the caches: the allocation half of
        kvm_mmu_alloc_shadow_page / tdp_mmu_alloc_sp.  Returns the sp handle.

        Raises KvmNoMemoryError, taking nothing, if a cache is empty.
        """
        cdef uint64_t sp
        cdef int rc
        for c, kind, name in ((page_cache, PT_CACHE_SHADOW_PAGE, "page_cache"),
                              (header_cache, PT_CACHE_PAGE_HEADER, "header_cache"),
                              (info_cache, PT_CACHE_SHADOWED_INFO, "info_cache")):
            if c is None:
                continue
            if (<MmuMemoryCache>c).arena is not self:
                raise ValueError(f"{name} belongs to another arena")
            if (<MmuMemoryCache>c).kind != kind:
                raise ValueError(f"{name} is a {(<MmuMemoryCache>c).kind_name} cache")
        rc = pt_alloc_sp(&self.a, &page_cache.mc, &header_cache.mc,
                         &info_cache.mc if info_cache is not None else NULL, &sp)
        if rc:
            empty = [n for c, n in ((page_cache, "mmu_shadow_page_cache"),
                                    (header_cache, "mmu_page_header_cache"),
                                    (info_cache, "mmu_shadowed_info_cache"))
                     if c is not None and (<MmuMemoryCache>c).mc.nobjs == 0]
            raise KvmNoMemoryError(f"{', '.join(empty)} empty: top up before allocating")
        cdef kvm_mmu_page *h = pt_sp_ptr(&self.a, sp)
        h.role = role
        h.gfn = gfn
        h.tdp_mmu_page = tdp_mmu_page
        return sp

    def kvm_mmu_free_shadow_page(self, uint64_t sp):
        """Poison and free `sp` now.  Safe only when no lockless walker can
        reach it: after kvm_flush_remote_tlbs(), after a grace period, or at
        teardown.  Normal paths use :meth:`kvm_mmu_commit_zap_page` or
        :meth:`call_rcu_free_sp`."""
        self._check_sp(sp, False)
        pt_free_sp(&self.a, sp)

    def kvm_mmu_commit_zap_page(self, sps):
        """Free the zapped pages `sps` (a sequence of sp handles): flush
        remote TLBs, which waits for every vCPU inside a shadow-MMU lockless
        walk, then poison and free each.  WARNs (KvmMmuWarning) for a page
        that is not ``role.invalid`` or still has ``root_count``, and frees
        it anyway, as the kernel does."""
        arr = np.array(list(sps), dtype=np.uint64)
        seen = set()
        for sp in arr.tolist():
            self._check_sp(sp, False)
            if sp in seen:
                raise ValueError(f"sp {sp} listed twice")
            seen.add(sp)
        self._no_walk_in_this_thread("kvm_mmu_commit_zap_page", rcu=False)
        cdef uint32_t before[PT_NR_WARN]
        memcpy(before, self.a.warn, sizeof(before))
        cdef const uint64_t[::1] v = arr
        cdef Py_ssize_t n = arr.shape[0]
        with nogil:
            kvm_mmu_commit_zap_page(&self.a, &v[0] if n else NULL, n)
        self._warn_since(before)

    def kvm_flush_remote_tlbs(self):
        """Flush every vCPU's TLB, waiting for vCPUs in
        READING_SHADOW_PAGE_TABLES to end their walk (IN_GUEST_MODE vCPUs are
        kicked to EXITING_GUEST_MODE).  Returns the number of vCPUs waited for."""
        cdef int waited = 0, nxt = 0, done = 0
        self._no_walk_in_this_thread("kvm_flush_remote_tlbs", rcu=False)
        self.a.remote_tlb_flush_requests += 1
        pt_smp_mb()
        # Wait in GIL-released slices; between them, a walker thread that
        # died inside its walk raises instead of hanging, and Ctrl-C works.
        while True:
            with nogil:
                done = _flush_remote_tlbs_slice(&self.a, &nxt, &waited, 1 << 16)
            if done:
                break
            self._no_walk_in_this_thread("kvm_flush_remote_tlbs", rcu=False)
            PyErr_CheckSignals()
        self.a.remote_tlb_flush += 1
        self.a.flush_ipis_waited += waited
        return waited

    def call_rcu_free_sp(self, uint64_t sp):
        """TDP MMU: free `sp` after a grace period (``call_rcu(&sp->rcu_head,
        tdp_mmu_free_sp_rcu_callback)``).  The page stays intact until then."""
        self._check_sp(sp, False)
        call_rcu_free_sp(&self.a, sp)

    def rcu_poll(self):
        """Advance the model's RCU without blocking; returns the sps freed."""
        return rcu_poll(&self.a)

    def synchronize_rcu(self):
        """Wait for a grace period (every RCU reader that started earlier has
        left), then free the callbacks that became due."""
        self._no_walk_in_this_thread("synchronize_rcu", rcu=True)
        with nogil:
            synchronize_rcu(&self.a)

    def rcu_barrier(self):
        """Wait until every pending RCU free has run."""
        self._no_walk_in_this_thread("rcu_barrier", rcu=True)
        with nogil:
            rcu_barrier(&self.a)

    def _no_walk_in_this_thread(self, what, bint rcu):
        """Refuse a wait that could never end: this thread, or a thread that
        has exited, is inside a lockless walk the wait would wait for."""
        me = threading.get_ident()
        alive = None
        for v, owner in enumerate(self._walk_owner):
            if owner is None or rcu != bool(self.a.vcpus[v].tdp_mmu_active):
                continue
            if owner == me:
                raise RuntimeError(f"{what} would wait forever: this thread is inside a "
                                   f"lockless walk of vCPU {v}")
            if alive is None:
                alive = {t.ident for t in threading.enumerate()}
            if owner not in alive:
                raise KvmDeadWalkerError(
                    f"{what} would wait forever: thread {owner} exited inside a lockless "
                    f"walk of vCPU {v} (end the walk with walk_shadow_page_lockless_end)")

    # -- lockless walks --------------------------------------------------------------

    cdef int _vcpu(self, int vcpu) except -1:
        if not 0 <= vcpu < self.a.nr_vcpus:
            raise ValueError(f"vcpu {vcpu} is outside 0..{self.a.nr_vcpus - 1}")
        return vcpu

    def set_tdp_mmu_active(self, int vcpu, bint active):
        """Set ``is_tdp_mmu_active(vcpu)`` (tdp_mmu_enabled and a direct root):
        it picks RCU instead of vcpu->mode for the vCPU's lockless walks.  The
        TDP MMU exists only on 64-bit hosts."""
        self._vcpu(vcpu)
        if active and not self.a.host_64bit:
            raise ValueError("the TDP MMU requires a 64-bit host")
        if self._walk_owner[vcpu] is not None:
            raise RuntimeError(f"vCPU {vcpu} is inside a lockless walk")
        self.a.vcpus[vcpu].tdp_mmu_active = active

    def is_tdp_mmu_active(self, int vcpu):
        return bool(self.a.vcpus[self._vcpu(vcpu)].tdp_mmu_active)

    def vcpu_mode(self, int vcpu):
        """``vcpu->mode`` (OUTSIDE_GUEST_MODE ... READING_SHADOW_PAGE_TABLES)."""
        return int(pt_read_once64(&self.a.vcpus[self._vcpu(vcpu)].mode) & 3)

    def set_vcpu_mode(self, int vcpu, int mode):
        """Model vcpu_enter_guest / guest exits: OUTSIDE, IN or EXITING_GUEST_MODE
        (READING_SHADOW_PAGE_TABLES is entered only by a lockless walk)."""
        cdef kvm_vcpu_lockless *v = &self.a.vcpus[self._vcpu(vcpu)]
        if mode not in (OUTSIDE_GUEST_MODE, IN_GUEST_MODE, EXITING_GUEST_MODE):
            raise ValueError(f"mode {mode} cannot be set directly")
        if self._walk_owner[vcpu] is not None:
            raise RuntimeError(f"vCPU {vcpu} is inside a lockless walk")
        pt_store_mb64(&v.mode, (pt_read_once64(&v.mode) & ~(<uint64_t>3)) | <uint64_t>mode)

    def walk_shadow_page_lockless_begin(self, int vcpu):
        """Start a lockless walk on `vcpu` (RCU read lock if the vCPU's MMU is
        the TDP MMU, else IRQs off + READING_SHADOW_PAGE_TABLES)."""
        self._vcpu(vcpu)
        if self._walk_owner[vcpu] is not None:
            raise RuntimeError(f"vCPU {vcpu} is already inside a lockless walk")
        if not self.a.vcpus[vcpu].tdp_mmu_active and (self.a.vcpus[vcpu].mode & 3) != OUTSIDE_GUEST_MODE:
            raise RuntimeError(f"vCPU {vcpu} is not OUTSIDE_GUEST_MODE")
        self._walk_owner[vcpu] = threading.get_ident()
        walk_shadow_page_lockless_begin(&self.a, vcpu)

    def walk_shadow_page_lockless_end(self, int vcpu):
        self._vcpu(vcpu)
        if self._walk_owner[vcpu] is None:
            raise RuntimeError(f"vCPU {vcpu} is not inside a lockless walk")
        walk_shadow_page_lockless_end(&self.a, vcpu)
        self._walk_owner[vcpu] = None

    def kvm_tdp_mmu_walk_lockless_begin(self, int vcpu):
        """rcu_read_lock() on behalf of `vcpu` (the vCPU must be TDP MMU active)."""
        if not self.is_tdp_mmu_active(vcpu):
            raise RuntimeError(f"vCPU {vcpu} is not using the TDP MMU")
        self.walk_shadow_page_lockless_begin(vcpu)

    def kvm_tdp_mmu_walk_lockless_end(self, int vcpu):
        if not self.is_tdp_mmu_active(vcpu):
            raise RuntimeError(f"vCPU {vcpu} is not using the TDP MMU")
        self.walk_shadow_page_lockless_end(vcpu)

    def lockless_walk(self, int vcpu):
        """``with arena.lockless_walk(vcpu): ...`` brackets a walk with
        walk_shadow_page_lockless_begin/end."""
        self._vcpu(vcpu)
        return _LocklessWalk(self, vcpu)

    # -- SPTE helpers ------------------------------------------------------------

    def mmu_spte_set(self, uint64_t sptep, uint64_t new_spte):
        """Non-present -> present (or MMIO).  KvmMmuWarning if it was present."""
        self._check_sptep(sptep)
        cdef uint32_t before[PT_NR_WARN]
        memcpy(before, self.a.warn, sizeof(before))
        mmu_spte_set(&self.a, sptep, new_spte)
        self._warn_since(before)

    def mmu_spte_update(self, uint64_t sptep, uint64_t new_spte, host_ad=None):
        """Update a present SPTE's state bits; returns True if remote TLBs must
        be flushed.  See pt_arena.pxd for the rules of each era; v6.12 passes
        lost A/D to ``host_ad(pfn, accessed, dirty)`` (default: the arena's)."""
        self._check_sptep(sptep)
        cdef uint32_t before[PT_NR_WARN]
        cdef pt_ad_out ad
        memcpy(before, self.a.warn, sizeof(before))
        flush = mmu_spte_update(&self.a, sptep, new_spte, &ad)
        self._report_ad(&ad, host_ad)
        self._warn_since(before)
        return flush

    def mmu_spte_clear_track_bits(self, uint64_t sptep, host_ad=None):
        """Zap a leaf SPTE; returns the old SPTE.  Drops the page count of the
        table's level if it was present; v6.12 passes its A/D state to
        ``host_ad(pfn, accessed, dirty)``."""
        self._check_sptep(sptep)
        cdef uint32_t before[PT_NR_WARN]
        cdef pt_ad_out ad
        memcpy(before, self.a.warn, sizeof(before))
        old = mmu_spte_clear_track_bits(&self.a, sptep, &ad)
        self._report_ad(&ad, host_ad)
        self._warn_since(before)
        return old

    def mmu_spte_clear_no_track(self, uint64_t sptep):
        """Clear an upper-level or MMIO SPTE."""
        self._check_sptep(sptep)
        mmu_spte_clear_no_track(&self.a, sptep)

    def mmu_spte_get_lockless(self, uint64_t sptep):
        """One lockless SPTE read (32-bit: the clear_spte_count retry loop)."""
        self._check_sptep(sptep)
        return mmu_spte_get_lockless(&self.a, sptep)

    def try_cmpxchg64(self, uint64_t sptep, uint64_t old_spte, uint64_t new_spte):
        """64-bit compare-and-exchange (fast page fault, lockless aging; atomic
        on 32-bit hosts too).  Returns ``(success, current value)``."""
        self._check_sptep(sptep)
        cdef uint64_t old = old_spte
        ok = pt_try_cmpxchg64(pt_sptep_ptr(&self.a, sptep), &old, new_spte)
        return bool(ok), (new_spte if ok else old)

    def kvm_update_page_stats(self, int level, int64_t count):
        """``kvm->stat.pages[level - 1] += count`` (leaf levels 1..3)."""
        if not 1 <= level <= KVM_NR_PAGE_SIZES:
            raise ValueError(f"level {level} is outside 1..{KVM_NR_PAGE_SIZES}")
        kvm_update_page_stats(&self.a, level, count)

    @property
    def page_stats(self):
        """``kvm->stat.pages``: {'pages_4k', 'pages_2m', 'pages_1g'}."""
        return {"pages_4k": self.a.pages[0], "pages_2m": self.a.pages[1],
                "pages_1g": self.a.pages[2]}

    cdef _report_ad(self, pt_ad_out *ad, host_ad):
        if ad.flags == 0:
            return
        cb = host_ad if host_ad is not None else self._host_ad
        if cb is not None:
            cb(ad.pfn, bool(ad.flags & PT_AD_ACCESSED), bool(ad.flags & PT_AD_DIRTY))

    def get_sptes_lockless(self, spteps, out=None, *, vcpu=None):
        """Batch lockless read: ``out[i] = mmu_spte_get_lockless(spteps[i])``.

        Parameters
        ----------
        spteps : ndarray of uint64, shape (n,)
            SPTE locations of live tables.
        out : ndarray of uint64, shape (n,), optional
            Where to store the values.
        vcpu : int, optional
            If given, the batch runs inside walk_shadow_page_lockless_begin /
            end of that vCPU.

        One pass without the GIL: each location is range-checked (an
        SPTE of a page the arena handed out) and read.  A location that
        fails the check raises ValueError; a value that reads as poison (its
        page was freed before or during the read) raises KvmUseAfterFreeError.
        A page that is not a live table (e.g. still in a memory cache) reads
        as whatever it holds.  Returns `out`.
        """
        _check_array("spteps", spteps)
        cdef Py_ssize_t n = spteps.shape[0], i, bad = -1, poisoned = -1
        out = _out_array("out", out, n, np.uint64, inputs=(spteps,))
        if n == 0:
            return out
        cdef const uint64_t[::1] s = spteps
        cdef uint64_t[::1] o = out
        cdef pt_arena_t *a = &self.a
        cdef uint64_t retries = 0, v
        cdef int cpu = -1
        if vcpu is not None:
            cpu = self._vcpu(vcpu)
            self.walk_shadow_page_lockless_begin(cpu)
        try:
            with nogil:
                for i in range(n):
                    if not pt_sptep_in_arena(a, s[i]):
                        bad = i
                        break
                    v = _get_spte_lockless(a, s[i], &retries)
                    o[i] = v
                    if v == PT_POISON and poisoned < 0:
                        poisoned = i
        finally:
            if cpu >= 0:
                self.walk_shadow_page_lockless_end(cpu)
            if retries:
                pt_fetch_add64(&a.lockless_retries, retries)
        if bad >= 0:
            raise ValueError(f"spteps[{bad}] = {s[bad]:#x} is not an SPTE of a page this "
                             "arena handed out")
        if poisoned >= 0:
            raise KvmUseAfterFreeError(f"spteps[{poisoned}] = {s[poisoned]:#x} read poison: "
                                       "its page has been freed")
        return out

    # -- access log -------------------------------------------------------------------

    def start_access_log(self, Py_ssize_t capacity=4096):
        """Record every SPTE half/whole access, barrier and clear_spte_count
        access of the low-level accessors, in program order, until
        :meth:`stop_access_log` (at most `capacity` events).  For tests and
        teaching; not thread-safe (use from one thread)."""
        if not 0 < capacity <= ACCESS_LOG_MAX:
            raise ValueError(f"capacity={capacity} is outside 1..{ACCESS_LOG_MAX}")
        cdef uint64_t *buf = <uint64_t *>malloc(2 * capacity * sizeof(uint64_t))
        if buf == NULL:
            raise MemoryError(f"access log of {capacity} events")
        free(self.a.log)                    # only once the new one exists
        self.a.log_len = 0
        self.a.log_cap = capacity
        self.a.log = buf

    def stop_access_log(self):
        """Stop recording; returns ``[(event, value), ...]`` where event is one
        of :data:`ACCESS_EVENTS` (values of halves are 32-bit)."""
        out = []
        cdef uint64_t i
        if self.a.log == NULL:
            return out
        for i in range(self.a.log_len):
            out.append((ACCESS_EVENTS[self.a.log[2 * i]], self.a.log[2 * i + 1]))
        free(self.a.log)
        self.a.log = NULL
        self.a.log_len = self.a.log_cap = 0
        return out

    # -- statistics -----------------------------------------------------------------

    @property
    def warn_counts(self):
        """How often each WARN site fired (name -> count)."""
        names = ("set_present", "update_nonpresent", "writable_invariant", "update_pfn",
                 "ept_ve", "commit_zap", "bad_level")
        return {n: self.a.warn[i] for i, n in enumerate(names)}

    def stats(self):
        """Counters of the arena (a dict of ints)."""
        a = &self.a
        return dict(
            n_chunks=a.n_chunks, capacity=self.capacity, tables_hw=a.tables_hw,
            headers_hw=a.headers_hw, free_tables=a.n_free_tables,
            cached_tables=a.n_cached_tables, spt_tables=a.n_spt, info_tables=a.n_info,
            free_sps=a.n_free_sps, cached_sps=a.n_cached_sps, sps=a.n_sps,
            rcu_pending=a.n_rcu_pending, sps_freed=a.nr_sps_freed,
            remote_tlb_flush_requests=a.remote_tlb_flush_requests,
            remote_tlb_flush=a.remote_tlb_flush, flush_ipis_waited=a.flush_ipis_waited,
            rcu_gp_seq=a.rcu_gp_seq, rcu_gps=a.rcu_gps,
            nr_set_spte=a.nr_set, nr_update_clear_spte_fast=a.nr_update_fast,
            nr_update_clear_spte_slow=a.nr_update_slow,
            nr_count_spte_clear=a.nr_count_spte_clear, lockless_retries=a.lockless_retries,
            nbytes=self.nbytes,
        )

    # -- auditor ----------------------------------------------------------------------

    def audit(self, *, bint contents=True):
        """Check the arena invariants (module docstring); raise
        PtArenaAuditError listing every violation found (up to 64).

        `contents` also scans page and header bytes (poison in free slots,
        fill values in cached ones, no poison and no link to a dead page in
        live tables).  Call it with no lockless writer running.  Returns the
        recounted states as a dict.
        """
        cdef pt_arena_t *a = &self.a
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
        if a.n_chunks > a.max_chunks or <uint64_t>len(self._chunks) != a.n_chunks:
            bad(f"n_chunks={a.n_chunks} (max {a.max_chunks}, {len(self._chunks)} buffers)")
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
                if a.host_64bit and h.clear_spte_count != 0:
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
            self._audit_contents(bad)
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

    def _audit_contents(self, bad):
        cdef pt_arena_t *a = &self.a
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


# --- memory caches ---------------------------------------------------------------------

@cython.no_gc_clear
cdef class MmuMemoryCache:
    """``struct kvm_mmu_memory_cache`` over a :class:`PtArena`.

    Parameters
    ----------
    arena : PtArena
    kind : {"shadow_page", "page_header", "shadowed_info"}
        ``mmu_shadow_page_cache`` (pages filled with SHADOW_NONPRESENT_VALUE),
        ``mmu_page_header_cache`` (zeroed headers) or
        ``mmu_shadowed_info_cache`` (zeroed pages; the kernel does not zero
        them, the model does so that arenas are byte-reproducible).
    capacity : int
        1..KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE (40).
    """

    def __init__(self, PtArena arena not None, kind="shadow_page", *,
                 int capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE):
        if self.arena is not None:
            raise RuntimeError("MmuMemoryCache.__init__ called twice")
        if not 1 <= capacity <= KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE:
            raise ValueError(f"capacity={capacity} is outside 1..{KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE}")
        self.kind = _cache_kind(kind)
        self.arena = arena
        kvm_mmu_memory_cache_init(&self.mc, capacity)

    def __dealloc__(self):
        if self.arena is not None:
            kvm_mmu_free_memory_cache(&self.mc, pt_pool_free, &self.arena.a.pools[self.kind])

    @property
    def kind_name(self):
        return {v: k for k, v in CACHE_KINDS.items()}[self.kind]

    @property
    def nobjs(self):
        return self.mc.nobjs

    @property
    def capacity(self):
        return self.mc.capacity

    @property
    def objects(self):
        """Handles held (pfns for page caches, sp handles for header caches)."""
        return [self.mc.objects[i] for i in range(self.mc.nobjs)]

    def topup(self, int min_objs):
        """kvm_mmu_topup_memory_cache(cache, min_objs).

        Nothing happens if the cache holds at least `min_objs`.  Otherwise it
        is filled to capacity, or as far as the arena allows if that is still
        at least `min_objs` (growing the arena by whole chunks).  If the arena
        cannot provide `min_objs` objects, KvmNoMemoryError is raised and
        nothing changes (the kernel would keep the objects it did get in the
        cache; a failed topup aborts the fault either way).
        """
        cdef PtArena arena = self.arena
        cdef uint64_t need, take, avail
        cdef int rc
        if not 0 <= min_objs <= self.mc.capacity:
            raise ValueError(f"min_objs={min_objs} is outside 0..capacity={self.mc.capacity}")
        if self.mc.nobjs >= min_objs:
            return
        need = min_objs - self.mc.nobjs
        avail = arena._available(self.kind)
        if avail < need:
            raise KvmNoMemoryError(
                f"{self.kind_name} cache: need {need} more, the arena has {avail} left "
                f"(max_tables={arena.max_tables})")
        take = min(<uint64_t>(self.mc.capacity - self.mc.nobjs), avail)
        if self.kind == PT_CACHE_PAGE_HEADER:
            arena._grow_for(0, take)
        else:
            arena._grow_for(take, 0)
        rc = kvm_mmu_topup_memory_cache(&self.mc, min_objs, pt_pool_alloc, &arena.a.pools[self.kind])
        if rc:
            raise AssertionError("topup failed after the capacity check")

    def free(self):
        """kvm_mmu_free_memory_cache: give every cached object back (poisoned)."""
        kvm_mmu_free_memory_cache(&self.mc, pt_pool_free, &self.arena.a.pools[self.kind])

    def __repr__(self):
        return f"MmuMemoryCache({self.kind_name!r}, nobjs={self.mc.nobjs}, capacity={self.mc.capacity})"

