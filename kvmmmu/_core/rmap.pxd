# See rmap.pyx for details.
#
# KVM's PTE lists (Linux v6.18, arch/x86/kvm/mmu/mmu.c): the `pte_list_desc`
# chains behind every memslot rmap and every shadow page's `parent_ptes`, the
# tagged `kvm_rmap_head` word with its bit spinlock (v6.15+), the descriptor
# pool (the kernel's `pte_list_desc_cache` kmem cache) and the operations, all
# with the kernel's names.  Other Cython modules do
#
#     from kvmmmu._core.rmap cimport (kvm_rmap_head, pte_list_add, pte_list_remove,
#                                     rmap_iterator, rmap_get_first, rmap_get_next)
#
# Entries.  Every entry in a list, and the inline single entry of a head, is an
# `sptep_t` (types.pxd): the SPTE's host physical byte address
# `(table_pfn << 12) | (index << 3)`, 8-byte aligned and never 0, exactly the
# kernel's `u64 *sptep`.  That is what leaves bits 0 and 1 of a head free.
#
# Descriptor references.  `pte_list_desc.more` and the descriptor address in a
# head word are real C pointers into the pool's chunks (malloc'd, never moved,
# freed only when the pool dies; every RmapSlot / RmapHead / cache keeps its
# pool alive).  Consequently heads are process-local: they cannot be pickled
# or compared across runs (use `RmapSlot.snapshot()` / `rmap_iter` for that).
#
# The pool stands in for `struct kvm` in the kernel's signatures
# (`pte_list_add(kvm, cache, spte, head)`): it is where descriptors are freed to,
# and it carries the two per-VM facts the rmap code touches,
# kvm->stat.max_mmu_rmap_size and the KVM_BUG_ON count (kvm->vm_bugged).
#
# Locking (v6.15+, rmap.md section 3): modifications need mmu_lock held for
# write (the caller's business; kvmmmu's Python layer models mmu_lock) and take
# the head's KVM_RMAP_LOCKED bit.  Walkers without mmu_lock use
# kvm_rmap_lock_readonly.  An empty head is never locked (the lock helpers
# return 0 without touching it).  Userspace deviation: the kernel spins with
# preemption off, so a holder is never descheduled; here a spinner calls
# sched_yield() every RMAP_SPIN_YIELD_EVERY pauses instead.

from libc.stdint cimport uint32_t, uint64_t, int64_t

from kvmmmu._core.types cimport sptep_t
from kvmmmu._core.memcache cimport kvm_mmu_memory_cache

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "rmap_defs.h" nogil:
    enum: PTE_LIST_EXT                   # 14 entries per descriptor
    const uint64_t KVM_RMAP_MANY         # bit 0: head word addresses a descriptor
    const uint64_t KVM_RMAP_LOCKED       # bit 1: head word's bit spinlock
    const uint64_t KVM_RMAP_FLAGS        # both

    # 128 bytes, the kernel's field order (static asserts in rmap_defs.h).
    cdef struct pte_list_desc:
        pte_list_desc *more              # next (older) descriptor; NULL ends the chain
        uint32_t spte_count              # entries in this descriptor: head 1..14, tails 14
        uint32_t tail_count              # entries in all descriptors after this one
        sptep_t sptes[PTE_LIST_EXT]      # entries; [0, spte_count) non-zero, the rest 0

    # One tagged word (kernel: atomic_long_t val).  0: empty; bit 0 clear: the
    # word is the single sptep; bit 0 set: (word & ~KVM_RMAP_FLAGS) is the head
    # descriptor.  Bit 1 is set only while someone holds the rmap lock.
    cdef struct kvm_rmap_head:
        uint64_t val

    uint64_t kvm_rmap_atomic_read(const uint64_t *p)
    bint kvm_rmap_try_cmpxchg_acquire(uint64_t *p, uint64_t *old, uint64_t new_val)
    void kvm_rmap_set_release(uint64_t *p, uint64_t v)
    void kvm_rmap_cpu_relax()
    void kvmmmu_prefetchw(const void *p)
    uint64_t kvmmmu_load_relaxed_u64(const uint64_t *p)
    void kvmmmu_store_relaxed_u64(uint64_t *p, uint64_t v)
    uint32_t kvmmmu_load_relaxed_u32(const uint32_t *p)
    void kvmmmu_fetch_add_u64(uint64_t *p, uint64_t v)
    bint kvmmmu_spin_trylock(unsigned char *l)
    void kvmmmu_spin_unlock(unsigned char *l)


from kvmmmu._core.mmu_defs cimport (
    KVM_NR_PAGE_SIZES, KVM_MAX_HUGEPAGE_LEVEL, KVM_HPAGE_GFN_SHIFT_PER_LEVEL,
    PTE_PREFETCH_NUM, gfn_to_index, kvm_mmu_slot_lpages,
)

cdef enum:
    RMAP_RECYCLE_THRESHOLD = 1000        # rmap_add zaps a list that already held more
    PTE_LIST_DESC_CACHE_MIN = 14         # 1 + PT64_ROOT_MAX_LEVEL + PTE_PREFETCH_NUM (fault topup)
    RMAP_LOG_SIZE = 11                   # mmu_rmaps_stat histogram columns
    PTE_LIST_DESC_CHUNK = 512            # default descriptors per pool chunk (64 KiB)
    RMAP_SPIN_YIELD_EVERY = 1024         # pauses between sched_yield() calls while spinning
    KVMMMU_ENOENT = 2                    # pte_list_remove: entry not in the list

# Called once per entry by the zap helpers, with the rmap lock held.
ctypedef void (*rmap_zap_fn)(void *ctx, sptep_t sptep) noexcept nogil


# The descriptor pool: the kernel's `pte_list_desc_cache` kmem cache, plus the
# per-VM facts the rmap code updates (see the header comment).
#
# Invariants:
#   * chunks[0 .. nr_chunks-1] are descs_per_chunk-descriptor blocks, 64-byte
#     aligned, never moved or freed before the pool;
#   * nr_active + nr_free == carved (descriptors taken out of chunks so far);
#   * 0 < capacity  =>  nr_active <= capacity;
#   * every descriptor handed out is zero-filled (the kernel's __GFP_ZERO).
cdef struct pte_list_desc_pool:
    pte_list_desc **chunks               # chunk base addresses
    size_t nr_chunks                     # chunks allocated
    size_t chunks_cap                    # slots in `chunks`
    size_t descs_per_chunk               # descriptors per chunk
    size_t chunk_used                    # descriptors carved from chunks[nr_chunks - 1]
    pte_list_desc *free_list             # freed descriptors, LIFO, linked through `more`
    uint64_t nr_free                     # length of free_list
    uint64_t nr_active                   # handed out, not yet freed (in caches or in chains)
    uint64_t capacity                    # limit on nr_active; 0 = unlimited
    int64_t fail_after                   # fault injection: -1 off, else successes left
    uint64_t nr_alloc_failures           # allocations refused (capacity, injection, malloc)
    uint64_t max_mmu_rmap_size           # kvm->stat.max_mmu_rmap_size (pre-add high-water)
    uint64_t nr_bugs                     # KVM_BUG_ON_DATA_CORRUPTION hits (vm_bugged if > 0)
    unsigned char lock                   # protects the allocator fields above
    uint64_t gen                         # bumped (GIL held) by every Python-level change of a
                                         # chain in this pool; rmap_iter compares it, like a
                                         # dict's version, to detect a modification


# The rmap part of a memslot (kernel: slot->base_gfn, slot->npages and
# slot->arch.rmap[]).  rmap[level-1] has lpages[level-1] heads;
# lpages = gfn_to_index(base_gfn + npages - 1, base_gfn, level) + 1.
cdef struct kvm_rmap_slot:
    uint64_t base_gfn                    # first gfn of the slot
    uint64_t npages                      # 4 KiB pages in the slot (>= 1)
    kvm_rmap_head *rmap[KVM_NR_PAGE_SIZES]   # per-level head arrays ([0] = 4K)
    uint64_t lpages[KVM_NR_PAGE_SIZES]       # heads per level


# Walk state (kernel: struct rmap_iterator).  desc == NULL after the first
# step means "the list was the single inline entry".
cdef struct rmap_iterator:
    pte_list_desc *desc                  # descriptor holding the current entry
    int pos                              # index of the current entry in desc.sptes


# ---------------------------------------------------------------- memslot geometry

cdef inline kvm_rmap_head *gfn_to_rmap(uint64_t gfn, int level, const kvm_rmap_slot *slot) noexcept nogil:
    """&slot->arch.rmap[level - 1][gfn_to_index(...)]; no range check (callers validate)."""
    return &slot.rmap[level - 1][gfn_to_index(gfn, slot.base_gfn, level)]


# ---------------------------------------------------------------- head word helpers

cdef inline pte_list_desc *rmap_val_desc(uint64_t val) noexcept nogil:
    """The head descriptor of an unlocked head value with KVM_RMAP_MANY set."""
    return <pte_list_desc *>(val & ~KVM_RMAP_FLAGS)


cdef inline bint sptep_is_valid(sptep_t sptep) noexcept nogil:
    """An entry must be a non-zero, 8-byte aligned address (types.pxd)."""
    return sptep != 0 and (sptep & 7) == 0


cdef inline uint64_t kvm_rmap_get(kvm_rmap_head *head) noexcept nogil:
    """Unlocked read of a head, lock bit stripped (kernel: kvm_rmap_get)."""
    return kvm_rmap_atomic_read(&head.val) & ~KVM_RMAP_LOCKED


cdef inline uint64_t __kvm_rmap_lock(kvm_rmap_head *head) noexcept nogil:
    """Take the head's bit lock; return its value without the lock bit.

    Returns 0 without locking when the head is (or becomes) empty: only an
    mmu_lock-for-write holder may fill an empty head, and those exclude each
    other.  Otherwise spins: pause while the bit is set, then cmpxchg_acquire
    `old -> old | LOCKED`; a failed cmpxchg refreshes `old` and loops.
    """
    cdef uint64_t old = kvm_rmap_atomic_read(&head.val)
    cdef unsigned int spins = 0
    if old == 0:
        return 0
    while True:
        while old & KVM_RMAP_LOCKED:
            kvm_rmap_cpu_relax()
            spins += 1
            if spins % RMAP_SPIN_YIELD_EVERY == 0:
                sched_yield()
            old = kvm_rmap_atomic_read(&head.val)
        if old == 0:
            return 0
        if kvm_rmap_try_cmpxchg_acquire(&head.val, &old, old | KVM_RMAP_LOCKED):
            return old


cdef inline bint __kvm_rmap_trylock(kvm_rmap_head *head, uint64_t *old) noexcept nogil:
    """One attempt at __kvm_rmap_lock.  True: *old is what __kvm_rmap_lock
    would have returned (0 = empty, nothing locked).  False: the bit was held."""
    cdef uint64_t v = kvm_rmap_atomic_read(&head.val)
    while True:
        if v == 0:
            old[0] = 0
            return True
        if v & KVM_RMAP_LOCKED:
            return False
        if kvm_rmap_try_cmpxchg_acquire(&head.val, &v, v | KVM_RMAP_LOCKED):
            old[0] = v
            return True


cdef inline void __kvm_rmap_unlock(kvm_rmap_head *head, uint64_t val) noexcept nogil:
    """Publish `val` (lock bit clear) and drop the lock in one release store."""
    kvm_rmap_set_release(&head.val, val & ~KVM_RMAP_LOCKED)


cdef inline uint64_t kvm_rmap_lock(kvm_rmap_head *head) noexcept nogil:
    """Writer lock.  The kernel also asserts mmu_lock is held for write."""
    return __kvm_rmap_lock(head)


cdef inline void kvm_rmap_unlock(kvm_rmap_head *head, uint64_t new_val) noexcept nogil:
    """Writer unlock: install the new chain value and release the lock."""
    __kvm_rmap_unlock(head, new_val)


cdef inline uint64_t kvm_rmap_lock_readonly(kvm_rmap_head *head) noexcept nogil:
    """Lock for a walker that does not hold mmu_lock (lockless aging).  The
    holder may follow the chain but must not change it."""
    return __kvm_rmap_lock(head)


cdef inline int kvm_rmap_unlock_readonly(kvm_rmap_head *head, uint64_t old_val) noexcept nogil:
    """Undo kvm_rmap_lock_readonly.  A no-op when nothing was locked
    (old_val == 0).  Returns -1 when the chain value changed under the
    read-only lock (the kernel WARNs), 0 otherwise; `old_val` is written back
    either way."""
    cdef int ret = 0
    if old_val == 0:
        return 0
    if kvm_rmap_get(head) != old_val:
        ret = -1
    __kvm_rmap_unlock(head, old_val)
    return ret


# ---------------------------------------------------------------- counting and walking

cdef inline uint32_t pte_list_count_val(uint64_t val) noexcept nogil:
    """Entries in the list an (unlocked) head value describes, in O(1)."""
    cdef pte_list_desc *desc
    if val == 0:
        return 0
    if not (val & KVM_RMAP_MANY):
        return 1
    desc = rmap_val_desc(val)
    return desc.tail_count + desc.spte_count


cdef inline uint32_t pte_list_count(kvm_rmap_head *head) noexcept nogil:
    """The kernel's pte_list_count: no lock taken."""
    return pte_list_count_val(kvm_rmap_get(head))


cdef inline sptep_t rmap_get_first_val(uint64_t val, rmap_iterator *it) noexcept nogil:
    """rmap_get_first on a head value already read (e.g. returned by a lock)."""
    if val == 0:
        return 0
    if not (val & KVM_RMAP_MANY):
        it.desc = NULL
        return <sptep_t>val
    it.desc = rmap_val_desc(val)
    it.pos = 0
    return it.desc.sptes[0]


cdef inline sptep_t rmap_get_first(kvm_rmap_head *head, rmap_iterator *it) noexcept nogil:
    """Start a walk; 0 when the list is empty.  Takes no lock: legal under
    mmu_lock, or while holding this head's lock (then use rmap_get_first_val)."""
    return rmap_get_first_val(kvm_rmap_get(head), it)


cdef inline sptep_t rmap_get_next(rmap_iterator *it) noexcept nogil:
    """Next entry, 0 at the end.  Order: head descriptor slots 0.., then each
    (full) tail.  Any removal invalidates the walk: restart with rmap_get_first."""
    if it.desc == NULL:
        return 0
    if it.pos < PTE_LIST_EXT - 1:
        it.pos += 1
        if it.desc.sptes[it.pos] != 0:
            return it.desc.sptes[it.pos]
    it.desc = it.desc.more
    if it.desc == NULL:
        return 0
    it.pos = 0
    return it.desc.sptes[0]


# ---------------------------------------------------------------- operations (rmap.pyx)
#
# Return conventions (no exceptions in nogil code; Python wrappers raise):
#   >= 0                success (pte_list_add / rmap_add: list length before the add)
#   -KVMMMU_ENOMEM      the vCPU cache was empty; nothing changed
#   -KVMMMU_ENOENT      pte_list_remove: the entry is not in the list (the
#                       kernel's KVM_BUG_ON_DATA_CORRUPTION); nothing changed,
#                       kvm.nr_bugs incremented

# Pool allocator and free, shaped for memcache.pxd's pool_alloc_fn / pool_free_fn.
cdef int pte_list_desc_pool_alloc(void *pool, uint64_t *obj) noexcept nogil
cdef void pte_list_desc_pool_free(void *pool, uint64_t obj) noexcept nogil
cdef void mmu_free_pte_list_desc(pte_list_desc_pool *kvm, pte_list_desc *desc) noexcept nogil

# Bodies that work on an unlocked head value `*val` (caller holds the head's
# lock, or the head is private); descriptors are changed in place, and *val
# receives the value to publish.
cdef int __pte_list_add(kvm_mmu_memory_cache *cache, sptep_t spte, uint64_t *val) noexcept nogil
cdef void pte_list_desc_remove_entry(pte_list_desc_pool *kvm, uint64_t *val,
                                     pte_list_desc *desc, int i) noexcept nogil
cdef int __pte_list_remove(pte_list_desc_pool *kvm, sptep_t spte, uint64_t *val) noexcept nogil
cdef uint64_t __pte_list_zap_all(pte_list_desc_pool *kvm, uint64_t val,
                                 rmap_zap_fn fn, void *ctx) noexcept nogil

# Locked operations on one head, the kernel's names and argument order.
cdef int pte_list_add(pte_list_desc_pool *kvm, kvm_mmu_memory_cache *cache, sptep_t spte,
                      kvm_rmap_head *head) noexcept nogil
cdef int pte_list_remove(pte_list_desc_pool *kvm, sptep_t spte, kvm_rmap_head *head) noexcept nogil
cdef bint kvm_zap_all_rmap_sptes(pte_list_desc_pool *kvm, kvm_rmap_head *head,
                                 rmap_zap_fn fn, void *ctx) noexcept nogil

# __rmap_add's list part: pte_list_add on gfn_to_rmap(gfn, level, slot), the
# max_mmu_rmap_size high-water mark, and recycling (zap the whole list through
# `fn` when it already held more than RMAP_RECYCLE_THRESHOLD entries; the
# return value then exceeds the threshold, which tells the caller to flush).
cdef int rmap_add(pte_list_desc_pool *kvm, kvm_mmu_memory_cache *cache, const kvm_rmap_slot *slot,
                  sptep_t spte, uint64_t gfn, int level, rmap_zap_fn fn, void *ctx) noexcept nogil

# parent_ptes: the same list code keyed by shadow page (parent_pte 0 = a root: no-op).
cdef int mmu_page_add_parent_pte(pte_list_desc_pool *kvm, kvm_mmu_memory_cache *cache,
                                 kvm_rmap_head *parent_ptes, sptep_t parent_pte) noexcept nogil
cdef int mmu_page_remove_parent_pte(pte_list_desc_pool *kvm, kvm_rmap_head *parent_ptes,
                                    sptep_t parent_pte) noexcept nogil


# ---------------------------------------------------------------- Python-visible owners

cdef class PteListDescPool:
    cdef pte_list_desc_pool c            # the pool itself (address is stable)
    cdef public object warn_sink         # kvmmmu.warn.WarnSink (or None): KVM_BUG reports go there too
    cdef int desc_state(self, uint64_t addr, set free) except -2


cdef class PteListDescCache:
    cdef kvm_mmu_memory_cache mc         # vcpu->arch.mmu_pte_list_desc_cache
    cdef readonly PteListDescPool pool   # where topup allocates from and free returns to
    cdef int _busy                       # a nogil section of one thread is using mc


cdef class RmapSlot:
    cdef kvm_rmap_slot c                 # geometry + head pointers (into `rmap` arrays)
    cdef readonly PteListDescPool pool   # descriptors of every chain in this slot
    cdef readonly tuple rmap             # read-only views of the heads, rmap[level - 1]
    cdef tuple _owners                   # the arrays that own the head words


cdef class RmapHead:
    cdef kvm_rmap_head _own              # the word of a head made outside a factory (empty)
    cdef kvm_rmap_head *head             # the word (inside `owner`, or &_own)
    cdef object owner                    # keeps the word's memory alive
    cdef readonly PteListDescPool pool   # descriptors of this chain


cdef class ParentPtes(RmapHead):
    cdef kvm_rmap_head word              # storage for a stand-alone sp->parent_ptes


cdef class RmapLock:
    cdef readonly RmapHead head          # the locked head
    cdef readonly uint64_t val           # value at lock time; for writers, the value to publish
    cdef readonly bint readonly          # taken with kvm_rmap_lock_readonly
    cdef readonly bint held              # unlock() not yet called
    cdef readonly bint locked            # the lock bit was really taken (head was non-empty)
    cdef object owner                    # thread id of the holder (lock bookkeeping)
    cdef int _check_held(self) except -1
    cdef int _check_writer(self) except -1
