# Page and header pools of the arena (pt_pool.pyx).  All require the writer
# side (mmu_lock).
from libc.stdint cimport uint64_t
from kvmmmu._core.memcache cimport kvm_mmu_memory_cache
from kvmmmu._core.pt_arena_defs cimport pt_arena_t

# memcache.pxd pool callbacks: one page or header from the arena's free lists
# or unused slots of existing chunks (never grows: growth needs the GIL).
cdef int pt_pool_alloc(void *pool, uint64_t *obj) noexcept nogil
cdef void pt_pool_free(void *pool, uint64_t obj) noexcept nogil

# kvm_mmu_alloc_shadow_page / tdp_mmu_alloc_sp: a header and a page from the
# caches (and a shadowed_translation page if info_cache is not NULL).
# 0, or -12 (-ENOMEM) with nothing taken if a cache is empty.
cdef int pt_alloc_sp(pt_arena_t *a, kvm_mmu_memory_cache *page_cache,
                     kvm_mmu_memory_cache *header_cache,
                     kvm_mmu_memory_cache *info_cache, uint64_t *sp) noexcept nogil
# kvm_mmu_free_shadow_page / tdp_mmu_free_sp: poison and free at once.  Only
# safe when no lockless walker can reach the page (after a flush or a grace
# period, or at teardown).
cdef void pt_free_sp(pt_arena_t *a, uint64_t sp) noexcept nogil
