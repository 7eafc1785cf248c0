"""Page and header pools of the page-table arena (the kernel's page
allocator and mmu_page_header_cache kmem cache, as seen by KVM's MMU).

Pages and headers live in the arena's chunks (pt_arena.pyx grows them, with
the GIL); here are the nogil halves: the memcache.pxd pool callbacks that hand
out one page or header from the FIFO free lists or from unused slots of
existing chunks, kvm_mmu_alloc_shadow_page's allocation half and
kvm_mmu_free_shadow_page's poison-and-free.  Freed slots are filled with
PT_POISON and queued FIFO so that a use after free reads poison for as long
as possible.

Like the kernel's page allocator these may run on several threads at once
(a vCPU tops its caches up outside mmu_lock; a table is freed from an RCU
callback): the free lists and the fresh-slot marks are under the arena's
pool_lock, and the state counts move by atomic adds.  pt_alloc_sp takes
only from the caller's own caches (one thread per cache).
"""
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memset

from kvmmmu._core.mmu_defs cimport PAGE_SIZE as PAGE_SIZE_C
from kvmmmu._core.memcache cimport KVMMMU_ENOMEM, kvm_mmu_memory_cache, kvm_mmu_memory_cache_alloc
from kvmmmu._core.spte cimport is_shadow_present_pte
from kvmmmu._core.pt_arena_defs cimport (
    KVMMMU_DEBUG, PT_POISON_BYTE, kvm_mmu_page, pt_arena_t, pt_pool, pt_slot_meta, pt_slot,
    pt_sp_ptr, pt_table_ptr, pt_write_once_u32, pt_store_release64, pt_load_acquire64,
    pt_spin_lock, pt_spin_unlock, pt_atomic_add_u64,
    PT_PAGE_FREE, PT_PAGE_CACHED, PT_PAGE_SPT, PT_PAGE_INFO, PT_PAGE_CACHED_INFO,
    PT_SP_FREE, PT_SP_CACHED, PT_SP_IN_USE, PT_SP_RCU_PENDING,
    PT_CACHE_PAGE_HEADER, PT_CACHE_SHADOW_PAGE, PT_DBG_FREE_NOT_EMPTY, PT_DBG_FREE_PARENTS,
)



cdef inline void _push_free_page(pt_arena_t *a, uint64_t tidx) noexcept nogil:
    """Poison page `tidx` and append it to the FIFO free list (the caller
    holds pool_lock)."""
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
    cdef int r
    pt_spin_lock(&a.pool_lock)
    r = _pool_alloc_locked(p, a, obj)
    pt_spin_unlock(&a.pool_lock)
    return r

cdef inline int _pool_alloc_locked(pt_pool *p, pt_arena_t *a, uint64_t *obj) noexcept nogil:
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
        elif a.headers_hw < pt_load_acquire64(&a.n_chunks) * a.tables_per_chunk:
            idx = a.headers_hw
            a.headers_hw += 1
            m = pt_slot(a, idx)
        else:
            return -KVMMMU_ENOMEM
        memset(pt_sp_ptr(a, idx + 1), 0, sizeof(kvm_mmu_page))
        m.sp_state = PT_SP_CACHED
        pt_atomic_add_u64(&a.n_cached_sps, 1)
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
    elif a.tables_hw < pt_load_acquire64(&a.n_chunks) * a.tables_per_chunk:
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
    pt_atomic_add_u64(&a.n_cached_tables, 1)
    obj[0] = a.base_pfn + idx
    return 0

cdef void pt_pool_free(void *pool, uint64_t obj) noexcept nogil:
    cdef pt_pool *p = <pt_pool *>pool
    cdef pt_arena_t *a = <pt_arena_t *>p.arena
    pt_spin_lock(&a.pool_lock)
    if p.kind == PT_CACHE_PAGE_HEADER:
        pt_atomic_add_u64(&a.n_cached_sps, <uint64_t>-1)
        _push_free_sp(a, obj)
    else:
        pt_atomic_add_u64(&a.n_cached_tables, <uint64_t>-1)
        _push_free_page(a, obj - a.base_pfn)
    pt_spin_unlock(&a.pool_lock)


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
    pt_atomic_add_u64(&a.n_cached_tables, <uint64_t>-1)
    pt_atomic_add_u64(&a.n_spt, 1)
    pt_slot(a, h_sp - 1).sp_state = PT_SP_IN_USE
    pt_atomic_add_u64(&a.n_cached_sps, <uint64_t>-1)
    pt_atomic_add_u64(&a.n_sps, 1)
    if info_cache != NULL:
        kvm_mmu_memory_cache_alloc(info_cache, &info_pfn)
        h.shadowed_translation = info_pfn
        m = pt_slot(a, info_pfn - a.base_pfn)
        pt_write_once_u32(&m.table_sp, <uint32_t>h_sp)
        m.table_state = PT_PAGE_INFO
        pt_atomic_add_u64(&a.n_cached_tables, <uint64_t>-1)
        pt_atomic_add_u64(&a.n_info, 1)
    sp[0] = h_sp
    return 0


cdef void pt_free_sp(pt_arena_t *a, uint64_t sp) noexcept nogil:
    # The page's back-pointer is left behind, stale, as page->private is.
    cdef kvm_mmu_page *h = pt_sp_ptr(a, sp)
    cdef pt_slot_meta *hm = pt_slot(a, sp - 1)
    cdef const uint64_t *t
    cdef int i
    if KVMMMU_DEBUG and not h.tdp_mmu_page:
        if h.parent_ptes != 0 or h.unsync_children != 0:
            a.debug_warn[PT_DBG_FREE_PARENTS] += 1
        t = pt_table_ptr(a, h.spt - a.base_pfn)
        for i in range(512):
            if is_shadow_present_pte(t[i]):
                a.debug_warn[PT_DBG_FREE_NOT_EMPTY] += 1
                break
    if hm.sp_state == PT_SP_RCU_PENDING:
        pt_atomic_add_u64(&a.n_rcu_pending, <uint64_t>-1)
    else:
        pt_atomic_add_u64(&a.n_sps, <uint64_t>-1)
    pt_spin_lock(&a.pool_lock)
    _push_free_page(a, h.spt - a.base_pfn)
    pt_atomic_add_u64(&a.n_spt, <uint64_t>-1)
    if h.shadowed_translation:
        _push_free_page(a, h.shadowed_translation - a.base_pfn)
        pt_atomic_add_u64(&a.n_info, <uint64_t>-1)
    _push_free_sp(a, sp)
    pt_atomic_add_u64(&a.nr_sps_freed, 1)
    pt_spin_unlock(&a.pool_lock)


