# struct kvm_mmu_memory_cache with the kernel's semantics (virt/kvm/kvm_main.c).
# No .pyx: cimport only.  The owning pool supplies the allocator.
#
# The kernel tops a vCPU's caches up *before* taking mmu_lock (where it may
# sleep), and inside the fault allocates only from the cache.  Objects here
# are 64-bit handles (an arena index, a descriptor index), never 0.
#
# Invariants:
#   * 0 <= nobjs <= capacity <= KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE;
#   * objects[0 .. nobjs-1] are allocated from the pool and owned by the cache.
from libc.stdint cimport uint64_t

cdef enum:
    KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40
    KVMMMU_ENOMEM = 12

# Allocate one object from `pool` into *obj; 0 on success, -KVMMMU_ENOMEM when
# the pool's configured capacity is exhausted (or a fault is injected).
ctypedef int (*pool_alloc_fn)(void *pool, uint64_t *obj) noexcept nogil
ctypedef void (*pool_free_fn)(void *pool, uint64_t obj) noexcept nogil

ctypedef struct kvm_mmu_memory_cache:
    int nobjs
    int capacity
    uint64_t objects[KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE]


cdef inline void kvm_mmu_memory_cache_init(kvm_mmu_memory_cache *mc, int capacity) noexcept nogil:
    mc.nobjs = 0
    mc.capacity = capacity if 0 < capacity <= KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE \
        else KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE


cdef inline int kvm_mmu_topup_memory_cache(kvm_mmu_memory_cache *mc, int min_objs,
                                           pool_alloc_fn alloc, void *pool) noexcept nogil:
    """Fill the cache to capacity if it holds fewer than `min_objs`.

    Returns 0, or -KVMMMU_ENOMEM if the pool ran dry before `min_objs` objects
    were cached (objects allocated so far stay in the cache, as in the kernel).
    """
    cdef uint64_t obj
    if mc.nobjs >= min_objs:
        return 0
    while mc.nobjs < mc.capacity:
        if alloc(pool, &obj) != 0:
            return 0 if mc.nobjs >= min_objs else -KVMMMU_ENOMEM
        mc.objects[mc.nobjs] = obj
        mc.nobjs += 1
    return 0


cdef inline int kvm_mmu_memory_cache_alloc(kvm_mmu_memory_cache *mc, uint64_t *obj) noexcept nogil:
    """Take one object; -KVMMMU_ENOMEM if the cache is empty (the caller
    forgot to top up: the kernel WARNs, kvmmmu raises)."""
    if mc.nobjs == 0:
        return -KVMMMU_ENOMEM
    mc.nobjs -= 1
    obj[0] = mc.objects[mc.nobjs]
    return 0


cdef inline void kvm_mmu_free_memory_cache(kvm_mmu_memory_cache *mc, pool_free_fn free_fn,
                                           void *pool) noexcept nogil:
    while mc.nobjs > 0:
        mc.nobjs -= 1
        free_fn(pool, mc.objects[mc.nobjs])
