"""KVM's PTE lists and rmaps (Linux v6.18 ``arch/x86/kvm/mmu/mmu.c``), in C.

The shadow MMU finds every SPTE that maps a gfn through *rmaps*: per memslot,
per level, one ``kvm_rmap_head`` word per (huge) frame.  A head is empty
(0), holds one sptep inline, or (bit 0, ``KVM_RMAP_MANY``) points at a chain of
128-byte ``pte_list_desc`` blocks of 14 entries each.  The same list code holds
each shadow page's ``parent_ptes``.  Facts: ``../shared/reference/rmap.md``.

Layout and invariants (rmap.md section 1; :func:`audit` checks every one):

1. New descriptors are pushed at the head; the head word points at the newest.
2. Every tail (non-head) descriptor is full: ``spte_count == PTE_LIST_EXT``.
3. The head descriptor is never empty: ``1 <= spte_count <= 14``.
4. ``tail_count == 14 * (descriptors after this one)``, fixed at creation.
5. ``sptes[0:spte_count]`` are valid sptep values and the rest are 0.
6. Length = ``head.spte_count + head.tail_count`` (1 for the inline form).
7. A one-entry list may be inline or a one-entry descriptor (removal never
   converts back to the inline form).

Entries are ``sptep_t`` (``types.pxd``): an SPTE's host physical byte address,
8-byte aligned and non-zero.  Descriptors come from a :class:`PteListDescPool`
(the kernel's ``pte_list_desc_cache`` kmem cache: chunks that never move, a
LIFO free list, a capacity limit and fault injection) through a per-vCPU
:class:`PteListDescCache` (``kvm_mmu_memory_cache``: ``topup(min)`` before a
fault, allocation only from the cache inside it).

The rmap lock (v6.15+): bit 1 of the head, ``KVM_RMAP_LOCKED``, taken with a
cmpxchg-acquire spin and dropped by a release store of the new value.  Writers
(which in the kernel also hold ``mmu_lock`` for write) use
:func:`kvm_rmap_lock`; walkers without ``mmu_lock`` (lockless aging) use
:func:`kvm_rmap_lock_readonly` and may not change the chain.  Empty heads are
never locked.  The C forms (``rmap.pxd``) work in ``nogil`` code; the batch
functions here run their whole loop without the GIL.

Python API, scalar and batch::

    pool  = PteListDescPool(capacity=1 << 20)       # descriptors, ~128 MiB max
    cache = PteListDescCache(pool)                  # one per vCPU
    slot  = RmapSlot(base_gfn=0x100, npages=1 << 18, pool=pool)
    cache.topup(PTE_LIST_DESC_CACHE_MIN)            # before the "fault"
    n = rmap_add(cache, slot, gfn, sptep, level=1)  # entries before the add
    counts = rmap_add_batch(cache, slot, gfns, sptes, level=1)
    rmap_remove_batch(slot, gfns, sptes, level=1)
    head = gfn_to_rmap(gfn, 1, slot)                # kernel-named head API
    pte_list_count(head); list(rmap_iter(head))

Errors: :class:`KvmNoMemoryError` (-ENOMEM), :class:`RmapDataCorruptionError`
(the kernel's KVM_BUG_ON_DATA_CORRUPTION: removing an absent entry),
:class:`RmapLockError`, :class:`GfnOutOfSlotError`, :class:`InvalidLevelError`,
:class:`InvalidSptepError`, ``TypeError`` for arrays that are not uint64.
Validation errors leave every rmap unchanged.  :class:`RmapInputChangedError`
when another thread rewrote a batch call's input while its nogil loop ran
(each element is re-checked as it is loaded; ``done`` says how many applied).
"""

from kvmmmu._core.argcheck cimport s32_arg, s64_arg, u64_arg
cimport cython
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset

from kvmmmu._core.types cimport sptep_t
from kvmmmu._core.memcache cimport (kvm_mmu_memory_cache, kvm_mmu_memory_cache_init,
                                    kvm_mmu_topup_memory_cache, kvm_mmu_memory_cache_alloc,
                                    kvm_mmu_free_memory_cache, KVMMMU_ENOMEM,
                                    KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE)

from threading import get_ident as _get_ident

import numpy as np

from kvmmmu._core._checks import (check_array as _check_array, export,
                                  out_array as _out_array, readonly as _readonly)
from kvmmmu.errors import ConcurrentUseError, KvmNoMemoryError

cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)

cdef extern from *:
    """
    #define kvmmmu_ffs(x) __builtin_ffs(x)
    """
    int kvmmmu_ffs(int x) nogil


# ------------------------------------------------------------------ exceptions

def _data_corruption(PteListDescPool pool, str msg, **kw):
    """KVM_BUG_ON_DATA_CORRUPTION: report to the VM's sink (the VM becomes
    bugged) and return the exception for the caller to raise."""
    if pool is not None and pool.warn_sink is not None:
        pool.warn_sink.bug("pte_list_remove", msg)
    return RmapDataCorruptionError(msg, **kw)


class RmapDataCorruptionError(RuntimeError):
    """The kernel's KVM_BUG_ON_DATA_CORRUPTION in ``pte_list_remove``: the
    entry is not in the list.  The list is unchanged; the pool's ``nr_bugs``
    (``kvm->vm_bugged``) is incremented.  Batch calls set ``index``: the
    failing element (the ones before it were removed)."""

    def __init__(self, msg, index=None):
        super().__init__(msg)
        self.index = index


class RmapInputChangedError(ConcurrentUseError):
    """A batch call's input array was rewritten (by another thread) while
    the call ran without the GIL: an element that passed validation no
    longer does.  The loop stops there; ``done`` elements before it were
    applied (each is one complete operation), the rest are untouched."""

    def __init__(self, msg, done=None):
        super().__init__(msg)
        self.done = done


class RmapLockError(RuntimeError):
    """Misuse of the rmap lock: modifying through a read-only lock, changing a
    chain under a read-only lock, or a call that would spin forever on a lock
    this thread already holds."""


class GfnOutOfSlotError(IndexError):
    """A gfn outside ``[slot.base_gfn, slot.base_gfn + slot.npages)``."""


class InvalidLevelError(ValueError):
    """An rmap level outside ``1..KVM_MAX_HUGEPAGE_LEVEL`` (4K, 2M, 1G)."""


class InvalidSptepError(ValueError):
    """An entry that is not a valid sptep (0 or not 8-byte aligned)."""


class RmapAuditError(AssertionError):
    """:func:`audit` found broken invariants; the message lists them all."""


# ------------------------------------------------------------------ constants and layout checks

cdef pte_list_desc _probe
if sizeof(pte_list_desc) != 128 or sizeof(pte_list_desc) % 64 != 0:
    raise ImportError("pte_list_desc must be 128 bytes (two cache lines)")
if (<char *>&_probe.spte_count - <char *>&_probe != 8 or
        <char *>&_probe.tail_count - <char *>&_probe != 12 or
        <char *>&_probe.sptes[0] - <char *>&_probe != 16):
    raise ImportError("pte_list_desc fields are not in the kernel's order")
if sizeof(kvm_rmap_head) != 8:
    raise ImportError("kvm_rmap_head must be one 64-bit word")

PTE_LIST_EXT_ = PTE_LIST_EXT
globals()["PTE_LIST_EXT"] = PTE_LIST_EXT_
del PTE_LIST_EXT_
SIZEOF_PTE_LIST_DESC = sizeof(pte_list_desc)
globals()["KVM_RMAP_MANY"] = KVM_RMAP_MANY
globals()["KVM_RMAP_LOCKED"] = KVM_RMAP_LOCKED
globals()["KVM_NR_PAGE_SIZES"] = KVM_NR_PAGE_SIZES
globals()["KVM_MAX_HUGEPAGE_LEVEL"] = KVM_MAX_HUGEPAGE_LEVEL
globals()["RMAP_RECYCLE_THRESHOLD"] = RMAP_RECYCLE_THRESHOLD
globals()["PTE_PREFETCH_NUM"] = PTE_PREFETCH_NUM
globals()["PTE_LIST_DESC_CACHE_MIN"] = PTE_LIST_DESC_CACHE_MIN
globals()["RMAP_LOG_SIZE"] = RMAP_LOG_SIZE
globals()["KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE"] = KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE
#: The largest gfn + 1 a slot may cover: 52 physical address bits.
MAX_GFN = 1 << 40


# ------------------------------------------------------------------ the descriptor pool (C)

cdef inline void _pool_lock(pte_list_desc_pool *p) noexcept nogil:
    while not kvmmmu_spin_trylock(&p.lock):
        kvm_rmap_cpu_relax()


cdef int _pool_grow(pte_list_desc_pool *p) noexcept nogil:
    """Add one chunk (pool lock held).  Existing chunks never move."""
    cdef size_t cap
    cdef pte_list_desc **chunks
    cdef pte_list_desc *chunk
    if p.nr_chunks == p.chunks_cap:
        cap = p.chunks_cap * 2 if p.chunks_cap else 16
        chunks = <pte_list_desc **>realloc(p.chunks, cap * sizeof(pte_list_desc *))
        if chunks == NULL:
            return -KVMMMU_ENOMEM
        p.chunks = chunks
        p.chunks_cap = cap
    chunk = <pte_list_desc *>aligned_alloc(64, p.descs_per_chunk * sizeof(pte_list_desc))
    if chunk == NULL:
        return -KVMMMU_ENOMEM
    p.chunks[p.nr_chunks] = chunk
    p.nr_chunks += 1
    p.chunk_used = 0
    return 0


cdef int pte_list_desc_pool_alloc(void *pool, uint64_t *obj) noexcept nogil:
    """Hand out one zero-filled descriptor: 0, or -KVMMMU_ENOMEM when the
    capacity is reached, a failure is injected, or malloc fails."""
    cdef pte_list_desc_pool *p = <pte_list_desc_pool *>pool
    cdef pte_list_desc *desc
    _pool_lock(p)
    if p.fail_after == 0 or (p.capacity != 0 and p.nr_active >= p.capacity):
        p.nr_alloc_failures += 1
        kvmmmu_spin_unlock(&p.lock)
        return -KVMMMU_ENOMEM
    if p.free_list != NULL:
        desc = p.free_list
        p.free_list = desc.more
        p.nr_free -= 1
    else:
        if p.nr_chunks == 0 or p.chunk_used == p.descs_per_chunk:
            if _pool_grow(p) != 0:
                p.nr_alloc_failures += 1
                kvmmmu_spin_unlock(&p.lock)
                return -KVMMMU_ENOMEM
        desc = &p.chunks[p.nr_chunks - 1][p.chunk_used]
        p.chunk_used += 1
    p.nr_active += 1
    if p.fail_after > 0:
        p.fail_after -= 1
    kvmmmu_spin_unlock(&p.lock)
    memset(desc, 0, sizeof(pte_list_desc))
    obj[0] = <uint64_t><uintptr_t>desc
    return 0


cdef void mmu_free_pte_list_desc(pte_list_desc_pool *kvm, pte_list_desc *desc) noexcept nogil:
    """Return a descriptor to the pool (kernel: kmem_cache_free)."""
    _pool_lock(kvm)
    desc.more = kvm.free_list
    kvm.free_list = desc
    kvm.nr_free += 1
    kvm.nr_active -= 1
    kvmmmu_spin_unlock(&kvm.lock)


cdef void pte_list_desc_pool_free(void *pool, uint64_t obj) noexcept nogil:
    mmu_free_pte_list_desc(<pte_list_desc_pool *>pool, <pte_list_desc *><uintptr_t>obj)


# ------------------------------------------------------------------ list bodies (C)

cdef int __pte_list_add(kvm_mmu_memory_cache *cache, sptep_t spte, uint64_t *val) noexcept nogil:
    """Add `spte` to the list `*val` describes.  Returns the number of entries
    before the add, or -KVMMMU_ENOMEM (cache empty; nothing changed).  No
    duplicate check, as in the kernel."""
    cdef uint64_t old = val[0]
    cdef uint64_t obj
    cdef pte_list_desc *desc
    cdef pte_list_desc *fresh
    cdef uint32_t count
    if old == 0:
        val[0] = spte                                   # inline single entry
        return 0
    if not (old & KVM_RMAP_MANY):
        # Second entry: move the inline one into a new descriptor.
        if kvm_mmu_memory_cache_alloc(cache, &obj) != 0:
            return -KVMMMU_ENOMEM
        desc = <pte_list_desc *><uintptr_t>obj
        desc.sptes[0] = old
        desc.sptes[1] = spte
        desc.spte_count = 2
        desc.tail_count = 0
        val[0] = obj | KVM_RMAP_MANY
        return 1
    desc = rmap_val_desc(old)
    count = desc.tail_count + desc.spte_count
    if desc.spte_count == PTE_LIST_EXT:
        # The head is full: a new, empty head goes in front, so tails stay full.
        if kvm_mmu_memory_cache_alloc(cache, &obj) != 0:
            return -KVMMMU_ENOMEM
        fresh = <pte_list_desc *><uintptr_t>obj
        fresh.more = desc
        fresh.spte_count = 0
        fresh.tail_count = count
        desc = fresh
        val[0] = obj | KVM_RMAP_MANY
    desc.sptes[desc.spte_count] = spte
    desc.spte_count += 1
    return <int>count


cdef void pte_list_desc_remove_entry(pte_list_desc_pool *kvm, uint64_t *val,
                                     pte_list_desc *desc, int i) noexcept nogil:
    """Drop desc.sptes[i]: the head descriptor's last entry fills the hole, so
    every tail stays full; a head left empty is freed and its successor (full)
    becomes the head, or the list becomes empty."""
    cdef pte_list_desc *head_desc = rmap_val_desc(val[0])
    cdef int j = <int>head_desc.spte_count - 1
    desc.sptes[i] = head_desc.sptes[j]
    head_desc.sptes[j] = 0
    head_desc.spte_count -= 1
    if head_desc.spte_count != 0:
        return
    if head_desc.more == NULL:
        val[0] = 0
    else:
        val[0] = <uint64_t><uintptr_t>head_desc.more | KVM_RMAP_MANY
    mmu_free_pte_list_desc(kvm, head_desc)


cdef int __pte_list_remove(pte_list_desc_pool *kvm, sptep_t spte, uint64_t *val) noexcept nogil:
    """Remove one occurrence of `spte` (the first met walking from the head).
    Returns 0, or -KVMMMU_ENOENT if absent (nothing changed, kvm.nr_bugs += 1)."""
    cdef uint64_t v = val[0]
    cdef pte_list_desc *desc
    cdef int i
    if v != 0:
        if not (v & KVM_RMAP_MANY):
            if v == spte:
                val[0] = 0
                return 0
        else:
            desc = rmap_val_desc(v)
            while desc != NULL:
                for i in range(<int>desc.spte_count):
                    if desc.sptes[i] == spte:
                        pte_list_desc_remove_entry(kvm, val, desc, i)
                        return 0
                desc = desc.more
    kvmmmu_fetch_add_u64(&kvm.nr_bugs, 1)
    return -KVMMMU_ENOENT


cdef uint64_t __pte_list_zap_all(pte_list_desc_pool *kvm, uint64_t val,
                                 rmap_zap_fn fn, void *ctx) noexcept nogil:
    """Call fn(ctx, sptep) for every entry (fn may be NULL) and free every
    descriptor.  Returns the number of entries; the caller publishes 0."""
    cdef pte_list_desc *desc
    cdef pte_list_desc *nxt
    cdef uint64_t n = 0
    cdef int i
    if val == 0:
        return 0
    if not (val & KVM_RMAP_MANY):
        if fn != NULL:
            fn(ctx, <sptep_t>val)
        return 1
    desc = rmap_val_desc(val)
    while desc != NULL:
        if fn != NULL:
            for i in range(<int>desc.spte_count):
                fn(ctx, desc.sptes[i])
        n += desc.spte_count
        nxt = desc.more
        mmu_free_pte_list_desc(kvm, desc)
        desc = nxt
    return n


# ------------------------------------------------------------------ locked operations (C)

cdef int pte_list_add(pte_list_desc_pool *kvm, kvm_mmu_memory_cache *cache, sptep_t spte,
                      kvm_rmap_head *head) noexcept nogil:
    cdef uint64_t v = kvm_rmap_lock(head)
    cdef int r = __pte_list_add(cache, spte, &v)
    kvm_rmap_unlock(head, v)
    return r


cdef int pte_list_remove(pte_list_desc_pool *kvm, sptep_t spte, kvm_rmap_head *head) noexcept nogil:
    cdef uint64_t v = kvm_rmap_lock(head)
    cdef int r = __pte_list_remove(kvm, spte, &v)
    kvm_rmap_unlock(head, v)
    return r


cdef bint kvm_zap_all_rmap_sptes(pte_list_desc_pool *kvm, kvm_rmap_head *head,
                                 rmap_zap_fn fn, void *ctx) noexcept nogil:
    """True iff the list had entries (the caller must then flush TLBs).  All
    entries are passed to `fn` and all descriptors freed with the lock held."""
    cdef uint64_t v = kvm_rmap_lock(head)
    if v == 0:
        return False
    __pte_list_zap_all(kvm, v, fn, ctx)
    kvm_rmap_unlock(head, 0)
    return True


cdef inline void _update_max_rmap_size(pte_list_desc_pool *kvm, uint64_t n) noexcept nogil:
    # Not atomic as a read-modify-write, like the kernel's plain stat update.
    if n > kvmmmu_load_relaxed_u64(&kvm.max_mmu_rmap_size):
        kvmmmu_store_relaxed_u64(&kvm.max_mmu_rmap_size, n)


cdef int rmap_add(pte_list_desc_pool *kvm, kvm_mmu_memory_cache *cache, const kvm_rmap_slot *slot,
                  sptep_t spte, uint64_t gfn, int level, rmap_zap_fn fn, void *ctx) noexcept nogil:
    cdef kvm_rmap_head *head = gfn_to_rmap(gfn, level, slot)
    cdef int n = pte_list_add(kvm, cache, spte, head)
    if n < 0:
        return n
    _update_max_rmap_size(kvm, <uint64_t>n)
    if n > RMAP_RECYCLE_THRESHOLD:
        kvm_zap_all_rmap_sptes(kvm, head, fn, ctx)
    return n


cdef int mmu_page_add_parent_pte(pte_list_desc_pool *kvm, kvm_mmu_memory_cache *cache,
                                 kvm_rmap_head *parent_ptes, sptep_t parent_pte) noexcept nogil:
    if parent_pte == 0:
        return 0                                        # a root has no parent
    return pte_list_add(kvm, cache, parent_pte, parent_ptes)


cdef int mmu_page_remove_parent_pte(pte_list_desc_pool *kvm, kvm_rmap_head *parent_ptes,
                                    sptep_t parent_pte) noexcept nogil:
    return pte_list_remove(kvm, parent_pte, parent_ptes)


# Collects the entries a zap visits, so Python callbacks can run on them.
cdef struct _zap_collector:
    sptep_t *buf
    size_t n
    size_t cap
    bint oom


cdef void _collect_zap(void *ctx, sptep_t sptep) noexcept nogil:
    cdef _zap_collector *c = <_zap_collector *>ctx
    cdef size_t cap
    cdef sptep_t *buf
    if c.n == c.cap:
        cap = c.cap * 2 if c.cap else 64
        buf = <sptep_t *>realloc(c.buf, cap * sizeof(sptep_t))
        if buf == NULL:
            c.oom = True
            return
        c.buf = buf
        c.cap = cap
    c.buf[c.n] = sptep
    c.n += 1


# ------------------------------------------------------------------ Python-side lock bookkeeping

# Heads locked through RmapLock guards (and during zap callbacks), so that a
# Python call on a head this thread holds raises instead of spinning forever.
# Maps (head address, thread id) -> "read-only" | "write" | ...
_held_locks = {}


cdef int _check_not_held_by_me(uintptr_t addr) except -1:
    cdef object mode = _held_locks.get((addr, _get_ident()))
    if mode is not None:
        raise RmapLockError(f"rmap head {addr:#x} is locked ({mode}) by this thread; "
                            f"use the RmapLock object, or unlock first")
    return 0


cdef int _check_no_lock_held_by_me() except -1:
    cdef object me
    if _held_locks:
        me = _get_ident()
        for addr, ident in list(_held_locks):
            if ident == me:
                raise RmapLockError(f"this thread holds the lock of rmap head {addr:#x}; "
                                    f"batch calls would spin on it forever")
    return 0


cdef uint64_t _lock_py(kvm_rmap_head *head) except 2:
    """__kvm_rmap_lock from Python: one cmpxchg with the GIL held; if the bit
    is taken, spin without the GIL (the holder may be a Python thread)."""
    cdef uint64_t v
    if _held_locks:
        _check_not_held_by_me(<uintptr_t>head)
    if __kvm_rmap_trylock(head, &v):
        return v
    with nogil:
        v = __kvm_rmap_lock(head)
    return v


# ------------------------------------------------------------------ argument checks

cdef inline int _check_level(int level) except -1:
    if level < 1 or level > KVM_MAX_HUGEPAGE_LEVEL:
        raise InvalidLevelError(f"level={level} is outside 1..{KVM_MAX_HUGEPAGE_LEVEL} (4K, 2M, 1G)")
    return 0


cdef inline int _check_gfn(const kvm_rmap_slot *slot, uint64_t gfn) except -1:
    if gfn - slot.base_gfn >= slot.npages:
        raise GfnOutOfSlotError(f"gfn={gfn:#x} is outside the slot "
                                f"[{slot.base_gfn:#x}, {slot.base_gfn + slot.npages:#x})")
    return 0


cdef inline int _check_sptep(uint64_t sptep) except -1:
    if not sptep_is_valid(sptep):
        raise InvalidSptepError(f"sptep={sptep:#x} is not an SPTE address "
                                f"(must be non-zero and 8-byte aligned)")
    return 0


cdef inline int _check_idle(PteListDescCache cache, str what) except -1:
    # A vCPU's cache is used by one thread at a time: while a nogil section
    # of another thread fills or drains it, every other use is refused.
    if cache._busy:
        raise ConcurrentUseError(f"{what}: the PteListDescCache is in use by another thread")
    return 0


cdef inline int _check_same_pool(PteListDescCache cache, PteListDescPool pool) except -1:
    if cache.pool is not pool:
        raise ValueError("the cache allocates from a different PteListDescPool than the rmap's")
    _check_idle(cache, "pte_list_add")
    return 0


# The C functions in rmap.pxd carry the kernel's names, so the Python wrappers
# are defined under private names and published under the kernel's names.

def _export(name):
    return export(globals(), name)



# ------------------------------------------------------------------ Python classes

@cython.no_gc_clear
@cython.auto_pickle(False)
cdef class PteListDescPool:
    """The descriptor pool: the kernel's ``pte_list_desc_cache`` kmem cache.

    Descriptors (128 bytes, 64-byte aligned) are carved from chunks of
    ``descs_per_chunk`` that are malloc'd on demand and never move or shrink
    while the pool lives; freed descriptors go on a LIFO free list.  Every
    descriptor handed out is zero-filled.

    The pool also plays the part of ``struct kvm`` in the kernel's signatures:
    it holds ``max_mmu_rmap_size`` (kvm->stat) and ``nr_bugs`` (how many
    KVM_BUG_ON_DATA_CORRUPTION hits; the kernel marks the VM bugged).

    Parameters
    ----------
    capacity : int or None
        The most descriptors that may be live (in chains or in vCPU caches) at
        once; an allocation beyond it fails with -ENOMEM.  None: unlimited.
    descs_per_chunk : int
        Chunk size in descriptors (default 512, i.e. 64 KiB chunks).

    Invariants: ``nr_active + nr_free`` descriptors have been carved;
    ``nr_active <= capacity`` when a capacity is set.
    """

    def __cinit__(self, capacity=None, descs_per_chunk=PTE_LIST_DESC_CHUNK):
        cdef Py_ssize_t c_descs_per_chunk = s64_arg(descs_per_chunk, "descs_per_chunk")
        memset(&self.c, 0, sizeof(self.c))
        self.c.fail_after = -1
        if c_descs_per_chunk < 1 or c_descs_per_chunk > (1 << 24):
            raise ValueError(f"descs_per_chunk={descs_per_chunk} is outside 1..2**24")
        self.c.descs_per_chunk = <size_t>c_descs_per_chunk
        self.capacity = capacity

    def __dealloc__(self):
        cdef size_t i
        for i in range(self.c.nr_chunks):
            free(self.c.chunks[i])
        free(self.c.chunks)
        self.c.chunks = NULL
        self.c.nr_chunks = 0

    @property
    def capacity(self):
        """Limit on live descriptors (None: unlimited).  May be lowered below
        ``nr_active``: only further allocations fail."""
        return None if self.c.capacity == 0 else self.c.capacity

    @capacity.setter
    def capacity(self, value):
        if value is None:
            self.c.capacity = 0
        elif not isinstance(value, int) or value < 1:
            raise ValueError(f"capacity must be a positive int or None, not {value!r}")
        else:
            self.c.capacity = value

    def fail_after(self, n):
        """Fault injection: let ``n`` more allocations succeed, then fail every
        allocation with -ENOMEM until ``fail_after(None)``."""
        if n is None:
            self.c.fail_after = -1
        elif not isinstance(n, int) or n < 0:
            raise ValueError(f"fail_after takes a non-negative int or None, not {n!r}")
        else:
            self.c.fail_after = n

    @property
    def nr_active(self):
        """Descriptors handed out and not freed (in chains or vCPU caches)."""
        return self.c.nr_active

    @property
    def nr_free(self):
        return self.c.nr_free

    @property
    def nr_chunks(self):
        return self.c.nr_chunks

    @property
    def descs_per_chunk(self):
        return self.c.descs_per_chunk

    @property
    def nbytes(self):
        """Bytes of descriptor memory obtained from the system (whole chunks)."""
        return self.c.nr_chunks * self.c.descs_per_chunk * sizeof(pte_list_desc)

    @property
    def active_bytes(self):
        """Bytes in live descriptors: ``nr_active * 128``."""
        return self.c.nr_active * sizeof(pte_list_desc)

    @property
    def nr_alloc_failures(self):
        return self.c.nr_alloc_failures

    @property
    def max_mmu_rmap_size(self):
        """kvm->stat.max_mmu_rmap_size: the largest list length seen by
        rmap_add *before* its add.  Never reset, as in the kernel."""
        return self.c.max_mmu_rmap_size

    @property
    def nr_bugs(self):
        """KVM_BUG_ON_DATA_CORRUPTION hits (absent entries removed)."""
        return self.c.nr_bugs

    @property
    def vm_bugged(self):
        return self.c.nr_bugs != 0

    def stats(self):
        """All counters as a dict."""
        return dict(nr_active=self.nr_active, nr_free=self.nr_free, nr_chunks=self.nr_chunks,
                    descs_per_chunk=self.descs_per_chunk, nbytes=self.nbytes,
                    active_bytes=self.active_bytes, capacity=self.capacity,
                    nr_alloc_failures=self.nr_alloc_failures,
                    max_mmu_rmap_size=self.max_mmu_rmap_size, nr_bugs=self.nr_bugs)

    def free_descriptors(self):
        """Set of the addresses on the free list (for audits; O(nr_free))."""
        cdef set out = set()
        cdef pte_list_desc *d
        _pool_lock(&self.c)
        try:
            d = self.c.free_list
            while d != NULL:
                out.add(<uintptr_t>d)
                d = d.more
        finally:
            kvmmmu_spin_unlock(&self.c.lock)
        return out

    cdef int desc_state(self, uint64_t addr, set free) except -2:
        """0: not a descriptor of this pool; 1: on the free list; 2: handed out."""
        cdef size_t i, carved
        cdef uintptr_t base
        cdef uint64_t size = self.c.descs_per_chunk * sizeof(pte_list_desc)
        for i in range(self.c.nr_chunks):
            base = <uintptr_t>self.c.chunks[i]
            if base <= addr < base + size:
                if (addr - base) % sizeof(pte_list_desc):
                    return 0
                carved = self.c.chunk_used if i == self.c.nr_chunks - 1 else self.c.descs_per_chunk
                if (addr - base) // sizeof(pte_list_desc) >= carved:
                    return 0
                return 1 if addr in free else 2
        return 0

    def __repr__(self):
        return (f"PteListDescPool(nr_active={self.nr_active}, nr_free={self.nr_free}, "
                f"nbytes={self.nbytes}, capacity={self.capacity})")


@cython.no_gc_clear
@cython.auto_pickle(False)
cdef class PteListDescCache:
    """A vCPU's descriptor cache (``vcpu->arch.mmu_pte_list_desc_cache``, a
    ``kvm_mmu_memory_cache``).  Top it up before a fault; inside the fault
    descriptors come only from here, and an empty cache fails with -ENOMEM.
    Objects still cached are returned to the pool by :meth:`free` and when the
    cache dies.

    Parameters
    ----------
    pool : PteListDescPool
    capacity : int
        Objects the cache holds when full (default and maximum
        KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40).
    """

    def __cinit__(self, PteListDescPool pool not None, capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE):
        cdef int c_capacity = s32_arg(capacity, "capacity")
        if c_capacity < 1 or c_capacity > KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE:
            raise ValueError(f"capacity={capacity} is outside 1..{KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE}")
        self.pool = pool
        kvm_mmu_memory_cache_init(&self.mc, c_capacity)

    def __dealloc__(self):
        if self.pool is not None:
            kvm_mmu_free_memory_cache(&self.mc, pte_list_desc_pool_free, &self.pool.c)

    def topup(self, min_objs=PTE_LIST_DESC_CACHE_MIN):
        """kvm_mmu_topup_memory_cache: if fewer than ``min_objs`` are cached,
        fill to capacity.  Raises KvmNoMemoryError when the pool cannot supply
        ``min_objs`` (what was obtained stays cached, as in the kernel)."""
        cdef int c_min_objs = s32_arg(min_objs, "min_objs")
        cdef int r
        if c_min_objs < 0 or c_min_objs > self.mc.capacity:
            raise ValueError(f"min_objs={min_objs} is outside 0..{self.mc.capacity}")
        _check_idle(self, "topup")
        self._busy = 1
        try:
            with nogil:
                r = kvm_mmu_topup_memory_cache(&self.mc, c_min_objs, pte_list_desc_pool_alloc,
                                               &self.pool.c)
        finally:
            self._busy = 0
        if r != 0:
            raise KvmNoMemoryError(f"pte_list_desc pool exhausted: cache holds {self.mc.nobjs}, "
                                   f"needed {min_objs} (pool capacity {self.pool.capacity})")

    def free(self):
        """kvm_mmu_free_memory_cache: give every cached object back to the pool."""
        _check_idle(self, "free")
        kvm_mmu_free_memory_cache(&self.mc, pte_list_desc_pool_free, &self.pool.c)

    @property
    def nobjs(self):
        return self.mc.nobjs

    @property
    def capacity(self):
        return self.mc.capacity

    def __repr__(self):
        return f"PteListDescCache(nobjs={self.mc.nobjs}, capacity={self.mc.capacity})"


cdef PteListDescPool _ORPHAN_POOL = None


cdef PteListDescPool _orphan_pool():
    """The pool of heads made by ``RmapHead.__new__`` outside a factory."""
    global _ORPHAN_POOL
    if _ORPHAN_POOL is None:
        _ORPHAN_POOL = PteListDescPool()
    return _ORPHAN_POOL


cdef inline RmapHead _make_head(kvm_rmap_head *h, object owner, PteListDescPool pool):
    cdef RmapHead r = RmapHead.__new__(RmapHead)
    r.head = h
    r.owner = owner
    r.pool = pool
    return r


cdef void _free_chains(pte_list_desc_pool *kvm, kvm_rmap_head *heads, uint64_t n) noexcept nogil:
    cdef uint64_t i, v
    for i in range(n):
        v = heads[i].val & ~KVM_RMAP_LOCKED
        if v & KVM_RMAP_MANY:
            __pte_list_zap_all(kvm, v, NULL, NULL)
        heads[i].val = 0


@cython.no_gc_clear
@cython.auto_pickle(False)
cdef class RmapSlot:
    """The rmap part of one memslot: ``base_gfn``, ``npages`` and one array of
    rmap heads per level (kernel: ``slot->arch.rmap[KVM_NR_PAGE_SIZES]``).

    ``rmap[level - 1]`` is a read-only numpy uint64 array with
    ``lpages[level - 1]`` heads, sized the kernel's way: the head of ``gfn`` is
    ``(gfn >> s) - (base_gfn >> s)`` with ``s = (level - 1) * 9``, and a level
    needs that index of the last gfn, plus one.  So a slot that does not start
    or end on a huge-page boundary still gets a head for each partial frame.
    The arrays are views of the live words (they change as lists change);
    writing them behind the module's back breaks the invariants.

    Deliberately small: issue 5's memslots will own one of these (or arrays
    of the same shape).  Chains still present when the slot dies are freed to
    the pool.

    Parameters
    ----------
    base_gfn : int
    npages : int
        ``>= 1``; ``base_gfn + npages <= MAX_GFN`` (2**40).
    pool : PteListDescPool
        Where this slot's descriptors come from and return to.
    """

    def __cinit__(self, base_gfn, npages, PteListDescPool pool not None):
        cdef int level
        cdef uint64_t lp
        cdef uint64_t[::1] mv
        if not isinstance(base_gfn, int) or not isinstance(npages, int):
            raise TypeError("base_gfn and npages must be ints")
        if base_gfn < 0 or npages < 1 or base_gfn + npages > MAX_GFN:
            raise ValueError(f"slot [base_gfn={base_gfn:#x}, +npages={npages:#x}) must be non-empty "
                             f"and below MAX_GFN={MAX_GFN:#x}")
        # Every array is allocated before C sees any of it: a MemoryError
        # half-way leaves no pointer for __dealloc__ to walk.
        arrays = [np.zeros(kvm_mmu_slot_lpages(base_gfn, npages, level), dtype=np.uint64)
                  for level in range(1, KVM_NR_PAGE_SIZES + 1)]
        self._owners = tuple(arrays)
        self.c.base_gfn = base_gfn
        self.c.npages = npages
        for level in range(1, KVM_NR_PAGE_SIZES + 1):
            mv = arrays[level - 1]
            self.c.rmap[level - 1] = <kvm_rmap_head *>&mv[0]
            self.c.lpages[level - 1] = mv.shape[0]
        self.pool = pool
        # What Python sees: read-only views that cannot be flipped back to
        # writable (the heads are words C follows as pointers).
        self.rmap = tuple(_readonly(a) for a in arrays)

    def __dealloc__(self):
        cdef int i
        if self.pool is None:
            return
        for i in range(KVM_NR_PAGE_SIZES):
            if self.c.rmap[i] != NULL:
                _free_chains(&self.pool.c, self.c.rmap[i], self.c.lpages[i])

    @property
    def base_gfn(self):
        return self.c.base_gfn

    @property
    def npages(self):
        return self.c.npages

    @property
    def lpages(self):
        """Heads per level, ``(4K, 2M, 1G)``."""
        return tuple(self.c.lpages[i] for i in range(KVM_NR_PAGE_SIZES))

    @property
    def nbytes(self):
        """Bytes of rmap heads, all levels (descriptors are in the pool)."""
        return 8 * sum(self.lpages)

    def gfn_to_rmap(self, gfn, level=1):
        """Same as :func:`gfn_to_rmap`."""
        cdef uint64_t g = u64_arg(gfn, "gfn")
        cdef int lv = s32_arg(level, "level")
        _check_level(lv)
        _check_gfn(&self.c, g)
        return _make_head(gfn_to_rmap(g, lv, &self.c), self, self.pool)

    def index_to_gfn(self, index, level=1):
        """First gfn of head ``index`` at ``level`` (may lie below base_gfn
        for the partial first frame; the slot's own gfns start at base_gfn)."""
        cdef uint64_t idx = u64_arg(index, "index")
        cdef int lv = s32_arg(level, "level")
        _check_level(lv)
        if idx >= self.c.lpages[lv - 1]:
            raise IndexError(f"index={idx} is outside 0..{self.c.lpages[lv - 1] - 1}")
        shift = (lv - 1) * KVM_HPAGE_GFN_SHIFT_PER_LEVEL
        return ((self.c.base_gfn >> shift) + idx) << shift

    def snapshot(self):
        """A comparable picture of every non-empty head and its exact chain:
        ``((level, index, head_word, chain), ...)`` where ``chain`` is a tuple
        of ``(desc_address, spte_count, tail_count, sptes)`` (empty for the
        inline form).  Equal snapshots mean byte-identical rmaps."""
        out = []
        for level in range(1, KVM_NR_PAGE_SIZES + 1):
            arr = self.rmap[level - 1]
            for index in np.flatnonzero(arr):
                out.append((level, int(index), int(arr[index]),
                            _chain_snapshot(<uint64_t>arr[index])))
        return tuple(out)

    def __repr__(self):
        return (f"RmapSlot(base_gfn={self.c.base_gfn:#x}, npages={self.c.npages:#x}, "
                f"lpages={self.lpages})")


cdef tuple _chain_snapshot(uint64_t val):
    cdef pte_list_desc *d
    cdef int i
    val &= ~KVM_RMAP_LOCKED
    if not (val & KVM_RMAP_MANY):
        return ()
    out = []
    d = rmap_val_desc(val)
    while d != NULL:
        out.append((<uintptr_t>d, d.spte_count, d.tail_count,
                    tuple(d.sptes[i] for i in range(PTE_LIST_EXT))))
        d = d.more
    return tuple(out)


@cython.no_gc_clear
@cython.auto_pickle(False)
cdef class RmapHead:
    """One ``struct kvm_rmap_head``: a word in a slot's rmap array (from
    :func:`gfn_to_rmap`) or a shadow page's ``parent_ptes`` (:class:`ParentPtes`).

    Keeps the word's owner and the descriptor pool alive.  Iterating yields the
    entries (sptep ints) in the kernel's walk order; ``len()`` is
    ``pte_list_count``.  Heads compare equal when they name the same word.
    """

    def __cinit__(self, *args, **kwargs):
        # Until a factory points it at a real word, a head is its own empty
        # word in a private pool: RmapHead.__new__(RmapHead) is harmless.
        self._own.val = 0
        self.head = &self._own
        self.owner = None
        self.pool = _orphan_pool()

    def __init__(self, *args, **kwargs):
        raise TypeError("RmapHead objects come from gfn_to_rmap() or ParentPtes()")

    @property
    def val(self):
        """The raw head word, lock bit included."""
        return kvm_rmap_atomic_read(&self.head.val)

    @property
    def address(self):
        """Address of the word (identity; the key of the lock bookkeeping)."""
        return <uintptr_t>self.head

    @property
    def is_locked(self):
        return bool(kvm_rmap_atomic_read(&self.head.val) & KVM_RMAP_LOCKED)

    @property
    def is_single(self):
        """True when the list is one inline entry (no descriptor)."""
        cdef uint64_t v = kvm_rmap_get(self.head)
        return v != 0 and not (v & KVM_RMAP_MANY)

    @property
    def count(self):
        return pte_list_count(self.head)

    def __len__(self):
        return pte_list_count(self.head)

    def __iter__(self):
        return rmap_iter(self)

    def __contains__(self, sptep):
        return int(sptep) in self.to_array()

    def first(self):
        """rmap_get_first: the first entry, or None when empty."""
        cdef rmap_iterator it
        cdef sptep_t s = rmap_get_first(self.head, &it)
        return None if s == 0 else s

    def to_array(self):
        """The entries in walk order as a uint64 array (one C walk)."""
        cdef rmap_iterator it
        cdef uint64_t v = kvm_rmap_get(self.head)
        cdef uint32_t n = pte_list_count_val(v)
        cdef Py_ssize_t i = 0
        out = np.empty(n, dtype=np.uint64)
        cdef uint64_t[::1] o = out
        cdef sptep_t s = rmap_get_first_val(v, &it)
        while s != 0 and i < n:
            o[i] = s
            i += 1
            s = rmap_get_next(&it)
        if i != n:
            raise RmapLockError("rmap changed during to_array(); take kvm_rmap_lock_readonly()")
        return out

    def __eq__(self, other):
        if not isinstance(other, RmapHead):
            return NotImplemented
        return (<RmapHead>self).head == (<RmapHead>other).head

    def __hash__(self):
        return hash(<uintptr_t>self.head)

    def __repr__(self):
        return (f"{type(self).__name__}(address={<uintptr_t>self.head:#x}, "
                f"val={kvm_rmap_atomic_read(&self.head.val):#x}, count={pte_list_count(self.head)})")


@cython.no_gc_clear
@cython.auto_pickle(False)
cdef class ParentPtes(RmapHead):
    """A stand-alone ``sp->parent_ptes``: the list of non-leaf SPTEs that point
    at one shadow page, on the same list code as the rmaps.  One parent is
    stored inline in the word (``is_single``); a second turns it into a
    descriptor chain.  (The page-table arena embeds the word in its
    ``kvm_mmu_page`` headers and calls the C functions directly.)

    Chains still present when the object dies are freed to the pool.
    """

    def __cinit__(self, PteListDescPool pool not None):
        self.head = &self.word
        self.word.val = 0
        self.owner = None
        self.pool = pool

    def __init__(self, PteListDescPool pool not None):
        pass

    def __dealloc__(self):
        cdef uint64_t v
        if self.pool is not None:
            v = self.word.val & ~KVM_RMAP_LOCKED
            if v & KVM_RMAP_MANY:
                __pte_list_zap_all(&self.pool.c, v, NULL, NULL)
            self.word.val = 0

    def add(self, PteListDescCache cache not None, parent_pte):
        """mmu_page_add_parent_pte: no-op for ``None``/0 (a root); otherwise
        pte_list_add.  Returns the number of parents before the add."""
        if parent_pte is None or parent_pte == 0:
            return 0
        return _py_pte_list_add(cache, parent_pte, self)

    def remove(self, parent_pte):
        """mmu_page_remove_parent_pte (= pte_list_remove)."""
        _py_pte_list_remove(parent_pte, self)


# ------------------------------------------------------------------ kernel-named head API

@_export("gfn_to_rmap")
def _py_gfn_to_rmap(gfn, level, RmapSlot slot not None):
    """The rmap head of ``gfn`` at ``level`` in ``slot``.

    Raises InvalidLevelError (level not 1..3) or GfnOutOfSlotError.
    """
    cdef uint64_t g = u64_arg(gfn, "gfn")
    cdef int lv = s32_arg(level, "level")
    _check_level(lv)
    _check_gfn(&slot.c, g)
    return _make_head(gfn_to_rmap(g, lv, &slot.c), slot, slot.pool)


# gfn_to_index and kvm_mmu_slot_lpages have their Python home in kvmmmu._core.defs.
from kvmmmu._core import defs as _defs  # noqa: E402
globals()["gfn_to_index"] = _defs.gfn_to_index
globals()["kvm_mmu_slot_lpages"] = _defs.kvm_mmu_slot_lpages


@_export("pte_list_add")
def _py_pte_list_add(PteListDescCache cache not None, sptep, RmapHead head not None):
    """pte_list_add: add ``sptep`` to ``head``'s list under the rmap lock.

    Returns
    -------
    int
        Entries in the list before the add.

    Raises KvmNoMemoryError if a descriptor was needed and the cache is empty
    (the list is unchanged), InvalidSptepError, ValueError (cache of another
    pool), RmapLockError (this thread holds the head's lock).
    """
    cdef uint64_t sp = u64_arg(sptep, "sptep")
    cdef uint64_t v
    cdef int r
    _check_sptep(sp)
    _check_same_pool(cache, head.pool)
    v = _lock_py(head.head)
    head.pool.c.gen += 1
    r = __pte_list_add(&cache.mc, sp, &v)
    kvm_rmap_unlock(head.head, v)
    if r < 0:
        raise KvmNoMemoryError("vCPU pte_list_desc cache is empty: topup() before the fault")
    return r


@_export("pte_list_remove")
def _py_pte_list_remove(sptep, RmapHead head not None):
    """pte_list_remove: remove one occurrence of ``sptep``.  The head
    descriptor's last entry fills the hole; an emptied head descriptor is freed.

    Raises RmapDataCorruptionError if ``sptep`` is not in the list (the
    kernel's KVM_BUG_ON_DATA_CORRUPTION; the list is unchanged).
    """
    cdef uint64_t sp = u64_arg(sptep, "sptep")
    cdef uint64_t v
    cdef int r
    v = _lock_py(head.head)
    head.pool.c.gen += 1
    r = __pte_list_remove(&head.pool.c, sp, &v)
    kvm_rmap_unlock(head.head, v)
    if r < 0:
        raise _data_corruption(head.pool, f"sptep={sp:#x} is not in rmap head {<uintptr_t>head.head:#x}")


@_export("pte_list_count")
def _py_pte_list_count(RmapHead head not None):
    """pte_list_count: entries in the list, O(1), no lock."""
    return pte_list_count(head.head)


@_export("kvm_rmap_get")
def _py_kvm_rmap_get(RmapHead head not None):
    """kvm_rmap_get: the head word without the lock bit."""
    return kvm_rmap_get(head.head)


def rmap_iter(RmapHead head not None):
    """Generator over the entries (sptep ints): the kernel's
    ``__for_each_rmap_spte`` (no SPTE-present filter: SPTE values live in the
    page-table arena).  Takes no lock, like the kernel's walks under mmu_lock.
    Raises RuntimeError if the list is modified during the iteration: any add,
    remove or zap made through this module bumps the pool's generation (a
    remove followed by an add restores the head word and count, but not the
    generation), and the head word / head descriptor count are compared too.
    """
    cdef rmap_iterator it
    cdef uint64_t gen0 = head.pool.c.gen
    cdef uint64_t v0 = kvm_rmap_get(head.head)
    cdef uint32_t c0 = rmap_val_desc(v0).spte_count if v0 & KVM_RMAP_MANY else 0
    cdef sptep_t s = rmap_get_first_val(v0, &it)
    while s != 0:
        yield s
        if head.pool.c.gen != gen0 or kvm_rmap_get(head.head) != v0 or (
                v0 & KVM_RMAP_MANY and rmap_val_desc(v0).spte_count != c0):
            raise RmapLockError("rmap changed during iteration")
        s = rmap_get_next(&it)


cdef int _call_zaps(object zap, sptep_t *buf, size_t n, uintptr_t addr, bint under_lock) except -1:
    """Call zap(sptep) for each collected entry; the first exception is
    re-raised after all calls."""
    cdef size_t i
    first_exc = None
    if under_lock:
        key = (addr, _get_ident())
        _held_locks[key] = "write (zap callback)"
    try:
        for i in range(n):
            try:
                zap(buf[i])
            except BaseException as e:
                if first_exc is None:
                    first_exc = e
    finally:
        if under_lock:
            _held_locks.pop(key, None)
    if first_exc is not None:
        raise first_exc
    return 0


cdef bint _zap_all_py(kvm_rmap_head *head, PteListDescPool pool, object zap) except -1:
    cdef uint64_t v = _lock_py(head)
    cdef _zap_collector col
    pool.c.gen += 1
    if v == 0:
        return False
    if zap is None:
        __pte_list_zap_all(&pool.c, v, NULL, NULL)
        kvm_rmap_unlock(head, 0)
        return True
    memset(&col, 0, sizeof(col))
    __pte_list_zap_all(&pool.c, v, _collect_zap, &col)
    try:
        if col.oom:
            raise MemoryError("out of memory collecting zapped entries")
        _call_zaps(zap, col.buf, col.n, <uintptr_t>head, True)
    finally:
        kvm_rmap_unlock(head, 0)        # the list is gone whatever the callbacks did
        free(col.buf)
    return True


@_export("kvm_zap_all_rmap_sptes")
def _py_kvm_zap_all_rmap_sptes(RmapHead head not None, zap=None):
    """kvm_zap_all_rmap_sptes: empty the list, calling ``zap(sptep)`` for
    every entry while the rmap lock is held (the kernel clears each SPTE there)
    and freeing every descriptor.

    Returns True iff the list had entries (the caller then flushes TLBs).  If a
    callback raises, the remaining callbacks still run, the list is still
    emptied, and the first exception is re-raised.
    """
    return _zap_all_py(head.head, head.pool, zap)


# ------------------------------------------------------------------ rmap lock guards

cdef RmapLock _acquire(RmapHead head, bint readonly):
    cdef RmapLock g = RmapLock.__new__(RmapLock)
    g.head = head
    g.readonly = readonly
    g.val = _lock_py(head.head)
    g.held = True
    g.locked = g.val != 0
    g.owner = _get_ident()
    _held_locks[(<uintptr_t>head.head, g.owner)] = "read-only" if readonly else "write"
    return g


@_export("kvm_rmap_lock")
def _py_kvm_rmap_lock(RmapHead head not None):
    """Writer lock (kernel: kvm_rmap_lock; mmu_lock for write is the caller's
    business).  Returns an :class:`RmapLock`; use it as a context manager.
    An empty head is not locked (its value is 0): the kernel relies on
    mmu_lock to keep other writers away from it."""
    return _acquire(head, False)


@_export("kvm_rmap_lock_readonly")
def _py_kvm_rmap_lock_readonly(RmapHead head not None):
    """Read-only lock for walkers without mmu_lock (kernel:
    kvm_rmap_lock_readonly).  Returns an :class:`RmapLock` whose modifying
    methods raise RmapLockError."""
    return _acquire(head, True)


@cython.no_gc_clear
@cython.auto_pickle(False)
cdef class RmapLock:
    """A held rmap lock (from :func:`kvm_rmap_lock` or
    :func:`kvm_rmap_lock_readonly`).  ``with kvm_rmap_lock(head) as lk: ...``
    unlocks on exit.

    ``val`` is the chain value the lock returned (lock bit clear).  A writer's
    :meth:`add` / :meth:`remove` change the chain in place and ``val``, and
    :meth:`unlock` publishes ``val`` and drops the lock in one release store
    (kernel: kvm_rmap_unlock).  A read-only holder may only walk; its unlock
    writes the old value back and raises RmapLockError if the chain value
    changed meanwhile (the kernel WARNs).
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("use kvm_rmap_lock(head) or kvm_rmap_lock_readonly(head)")

    def __dealloc__(self):
        if self.held:                   # forgotten guard: do not leave the bit set
            self.held = False
            _held_locks.pop((<uintptr_t>self.head.head, self.owner), None)
            if self.readonly:
                kvm_rmap_unlock_readonly(self.head.head, self.val)
            else:
                kvm_rmap_unlock(self.head.head, self.val)

    @property
    def count(self):
        """pte_list_count of the locked chain."""
        self._check_held()
        return pte_list_count_val(self.val)

    cdef int _check_held(self) except -1:
        if not self.held:
            raise RmapLockError("this rmap lock was already released")
        return 0

    cdef int _check_writer(self) except -1:
        self._check_held()
        if self.readonly:
            raise RmapLockError("cannot modify an rmap through a read-only lock "
                                "(kvm_rmap_lock_readonly); take kvm_rmap_lock with mmu_lock held")
        return 0

    def sptes(self):
        """The locked chain's entries, walk order, as a uint64 array."""
        cdef rmap_iterator it
        cdef uint32_t n
        cdef Py_ssize_t i = 0
        cdef sptep_t s
        self._check_held()
        n = pte_list_count_val(self.val)
        out = np.empty(n, dtype=np.uint64)
        cdef uint64_t[::1] o = out
        s = rmap_get_first_val(self.val, &it)
        while s != 0 and i < n:
            o[i] = s
            i += 1
            s = rmap_get_next(&it)
        return out

    def __iter__(self):
        return iter(self.sptes().tolist())

    def add(self, PteListDescCache cache not None, sptep):
        """pte_list_add's body under this (writer) lock; returns the count before."""
        cdef uint64_t sp = u64_arg(sptep, "sptep")
        cdef int r
        self._check_writer()
        _check_sptep(sp)
        _check_same_pool(cache, self.head.pool)
        self.head.pool.c.gen += 1
        r = __pte_list_add(&cache.mc, sp, &self.val)
        if r < 0:
            raise KvmNoMemoryError("vCPU pte_list_desc cache is empty: topup() before the fault")
        return r

    def remove(self, sptep):
        """pte_list_remove's body under this (writer) lock."""
        cdef uint64_t sp = u64_arg(sptep, "sptep")
        self._check_writer()
        self.head.pool.c.gen += 1
        if __pte_list_remove(&self.head.pool.c, sp, &self.val) < 0:
            raise _data_corruption(self.head.pool, f"sptep={sp:#x} is not in the locked rmap")

    def unlock(self):
        """Release (writers publish ``val``).  Raises RmapLockError if a
        read-only holder's chain changed while it was held."""
        cdef int r = 0
        self._check_held()
        self.held = False
        _held_locks.pop((<uintptr_t>self.head.head, self.owner), None)
        if self.readonly:
            r = kvm_rmap_unlock_readonly(self.head.head, self.val)
        else:
            kvm_rmap_unlock(self.head.head, self.val)
        if r != 0:
            raise RmapLockError("the chain changed while it was locked read-only")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.held:
            self.unlock()
        return False

    def __repr__(self):
        mode = "read-only" if self.readonly else "write"
        state = "held" if self.held else "released"
        return f"RmapLock({mode}, {state}, val={self.val:#x})"


# ------------------------------------------------------------------ scalar rmap API (slot, gfn, level)

@_export("rmap_add")
def _py_rmap_add(PteListDescCache cache not None, RmapSlot slot not None, gfn,
                sptep, level=1, zap=None):
    """__rmap_add's list part: pte_list_add on ``gfn_to_rmap(gfn, level,
    slot)``, then the ``max_mmu_rmap_size`` stat, then recycling.

    Returns
    -------
    int
        Entries before the add.  Above RMAP_RECYCLE_THRESHOLD (1000) the whole
        list, new entry included, was zapped (kvm_zap_all_rmap_sptes):
        ``zap(sptep)`` was called for each entry with the rmap lock held, and
        the caller must flush.

    Raises InvalidLevelError, GfnOutOfSlotError, InvalidSptepError, ValueError
    (cache of another pool), KvmNoMemoryError (empty cache; nothing changed).
    """
    cdef uint64_t g = u64_arg(gfn, "gfn")
    cdef uint64_t sp = u64_arg(sptep, "sptep")
    cdef int lv = s32_arg(level, "level")
    cdef kvm_rmap_head *head
    cdef uint64_t v
    cdef int n
    cdef _zap_collector col
    _check_level(lv)
    _check_gfn(&slot.c, g)
    _check_sptep(sp)
    _check_same_pool(cache, slot.pool)
    head = gfn_to_rmap(g, lv, &slot.c)
    v = _lock_py(head)
    slot.pool.c.gen += 1
    n = __pte_list_add(&cache.mc, sp, &v)
    kvm_rmap_unlock(head, v)
    if n < 0:
        raise KvmNoMemoryError("vCPU pte_list_desc cache is empty: topup() before the fault")
    _update_max_rmap_size(&slot.pool.c, <uint64_t>n)
    if n > RMAP_RECYCLE_THRESHOLD:
        _zap_all_py(head, slot.pool, zap)
    return n


@_export("rmap_remove")
def _py_rmap_remove(RmapSlot slot not None, gfn, sptep, level=1):
    """pte_list_remove on ``gfn_to_rmap(gfn, level, slot)`` (the list part of
    the kernel's rmap_remove).  Raises RmapDataCorruptionError when absent."""
    cdef uint64_t g = u64_arg(gfn, "gfn")
    cdef uint64_t sp = u64_arg(sptep, "sptep")
    cdef int lv = s32_arg(level, "level")
    cdef kvm_rmap_head *head
    cdef uint64_t v
    cdef int r
    _check_level(lv)
    _check_gfn(&slot.c, g)
    head = gfn_to_rmap(g, lv, &slot.c)
    v = _lock_py(head)
    slot.pool.c.gen += 1
    r = __pte_list_remove(&slot.pool.c, sp, &v)
    kvm_rmap_unlock(head, v)
    if r < 0:
        raise _data_corruption(slot.pool, f"sptep={sp:#x} is not in the level-{lv} rmap of gfn={g:#x}")


def rmap_count(RmapSlot slot not None, gfn, level=1):
    """pte_list_count of ``gfn_to_rmap(gfn, level, slot)``."""
    cdef uint64_t g = u64_arg(gfn, "gfn")
    cdef int lv = s32_arg(level, "level")
    _check_level(lv)
    _check_gfn(&slot.c, g)
    return pte_list_count(gfn_to_rmap(g, lv, &slot.c))


# ------------------------------------------------------------------ batch API (nogil loops)

cdef Py_ssize_t _validate_pairs(const kvm_rmap_slot *slot, const uint64_t *gfns, const uint64_t *sptes,
                                Py_ssize_t n, int *why) noexcept nogil:
    """First index with a gfn outside the slot (why=1) or a bad sptep (why=2); -1 if none.
    Branch-free over blocks (vectorizable); the exact index is looked up only
    in a block that failed."""
    cdef Py_ssize_t i, j, end
    cdef uint64_t base = slot.base_gfn, npages = slot.npages
    cdef uint64_t bad, d, sp
    i = 0
    while i < n:
        end = i + 1024 if i + 1024 < n else n
        bad = 0
        # Without 64-bit compares (SSE2 has none), so the loops vectorize:
        # d >= npages  <=>  bit 63 of (d | (npages - 1 - d))  (npages >= 1);
        # s == 0       <=>  bit 63 of (s | -s) is clear.
        for j in range(i, end):
            d = gfns[j] - base
            bad |= (d | (npages - 1 - d)) >> 63
        if sptes != NULL:
            for j in range(i, end):
                sp = sptes[j]
                bad |= (((sp | ((<uint64_t>0) - sp)) >> 63) ^ 1) | (sp & 7)
        if bad:
            for j in range(i, end):
                if gfns[j] - base >= npages:
                    why[0] = 1
                    return j
                if sptes != NULL and not sptep_is_valid(sptes[j]):
                    why[0] = 2
                    return j
        i = end
    return -1


cdef int _raise_bad_pair(RmapSlot slot, gfns, sptes, Py_ssize_t i, int why) except -1:
    if why == 1:
        raise GfnOutOfSlotError(f"gfns[{i}]={int(gfns[i]):#x} is outside the slot "
                                f"[{slot.c.base_gfn:#x}, {slot.c.base_gfn + slot.c.npages:#x}); "
                                f"nothing was changed")
    raise InvalidSptepError(f"sptes[{i}]={int(sptes[i]):#x} is not an SPTE address "
                            f"(non-zero, 8-byte aligned); nothing was changed")


# Batch loops.  The caller validated every (gfn, sptep) pair before the loop,
# but the arrays belong to the caller and the loop runs without the GIL:
# another thread may rewrite them meanwhile.  So each element is loaded once
# (a relaxed load the compiler cannot repeat) and its gfn (and sptep) checked
# again, a compare and a test, before it indexes anything; a changed element
# stops the loop (-RMAP_BATCH_INPUT_CHANGED, elements before it are done).
#
# Memory-level parallelism: with random gfns nearly every head is a cache
# miss, and each iteration's locked update waits for its own head.  The loops
# prefetch the head of element i + RMAP_BATCH_PREFETCH, so the misses of
# independent heads overlap as they do in a plain C loop with no per-element
# call in it.

cdef enum:
    RMAP_BATCH_PREFETCH = 64             # elements the head prefetch runs ahead
    RMAP_BATCH_INPUT_CHANGED = 1000      # -code: an input element failed its re-check


cdef inline void _prefetch_head(kvm_rmap_head *heads, const uint64_t *gfns, Py_ssize_t i,
                                Py_ssize_t n, int shift, uint64_t base_index) noexcept nogil:
    # A hint only (never faults): the address is formed as an integer, so a
    # gfn rewritten out of range is harmless here; the element is checked
    # before it is used.
    if i < n:
        kvmmmu_prefetchw(<const void *>(<uintptr_t>heads + <uintptr_t>(
            ((kvmmmu_load_relaxed_u64(&gfns[i]) >> shift) - base_index) * sizeof(kvm_rmap_head))))


cdef Py_ssize_t _rmap_add_batch(pte_list_desc_pool *kvm, kvm_mmu_memory_cache *cache,
                                const kvm_rmap_slot *slot, int level, const uint64_t *gfns,
                                const uint64_t *sptes, Py_ssize_t n, uint32_t *counts,
                                _zap_collector *col, int *err) noexcept nogil:
    """rmap_add for each element.  An add that needs a descriptor and finds
    the cache empty drops the rmap lock, tops the cache up (to capacity) and
    retries, like a fault that goes back for memory.  Returns the number of
    elements done; *err = -ENOMEM when the pool cannot supply one, or
    -RMAP_BATCH_INPUT_CHANGED when an element no longer passes validation."""
    cdef Py_ssize_t i
    cdef kvm_rmap_head *head
    cdef uint64_t v, g, sp
    cdef int r
    cdef uint64_t high = 0
    cdef int shift = (level - 1) * KVM_HPAGE_GFN_SHIFT_PER_LEVEL
    cdef uint64_t base_gfn = slot.base_gfn, npages = slot.npages
    cdef uint64_t base_index = base_gfn >> shift
    cdef kvm_rmap_head *heads = slot.rmap[level - 1]
    err[0] = 0
    for i in range(RMAP_BATCH_PREFETCH):
        _prefetch_head(heads, gfns, i, n, shift, base_index)
    for i in range(n):
        _prefetch_head(heads, gfns, i + RMAP_BATCH_PREFETCH, n, shift, base_index)
        g = kvmmmu_load_relaxed_u64(&gfns[i])
        sp = kvmmmu_load_relaxed_u64(&sptes[i])
        if g - base_gfn >= npages or not sptep_is_valid(sp):
            err[0] = -RMAP_BATCH_INPUT_CHANGED
            break
        head = &heads[(g >> shift) - base_index]
        v = kvm_rmap_lock(head)
        if v == 0:
            # An empty head takes the entry inline: nothing to allocate, no
            # count to track (the kernel's first pte_list_add case).
            kvm_rmap_unlock(head, sp)
            counts[i] = 0
            continue
        r = __pte_list_add(cache, sp, &v)
        kvm_rmap_unlock(head, v)
        if r < 0:
            r = kvm_mmu_topup_memory_cache(cache, 1, pte_list_desc_pool_alloc, kvm)
            if r == 0:
                v = kvm_rmap_lock(head)
                r = __pte_list_add(cache, sp, &v)
                kvm_rmap_unlock(head, v)
            if r < 0:
                err[0] = r
                break
        counts[i] = <uint32_t>r
        if <uint64_t>r > high:
            high = <uint64_t>r
        if r > RMAP_RECYCLE_THRESHOLD:
            kvm_zap_all_rmap_sptes(kvm, head, _collect_zap, col)
    else:
        i = n
    _update_max_rmap_size(kvm, high)
    return i


def rmap_add_batch(PteListDescCache cache not None, RmapSlot slot not None, gfns, sptes,
                   level=1, out=None, zap=None):
    """rmap_add for every ``(gfns[i], sptes[i])``, in order, in one nogil loop.

    Each element is treated as one fault: when an add needs a descriptor and
    the cache is empty, the cache is topped up (to its capacity) and the add
    retried.  Validation runs first, so bad input changes nothing.

    Parameters
    ----------
    cache : PteListDescCache
    slot : RmapSlot
    gfns : ndarray[uint64], shape (n,), C-contiguous   # const uint64_t[::1]
    sptes : ndarray[uint64], shape (n,), C-contiguous  # const uint64_t[::1]
    level : int, 1..3
    out : ndarray[uint32], shape (n,), optional
        Receives the list length before each add.
    zap : callable(int) or None
        Called, after the loop, for every entry that recycling (a list already
        above RMAP_RECYCLE_THRESHOLD) zapped, in zap order.

    Returns
    -------
    ndarray[uint32], shape (n,)

    Raises TypeError (not uint64 arrays), ValueError (shapes), InvalidLevelError,
    GfnOutOfSlotError, InvalidSptepError -- all before any change -- and
    KvmNoMemoryError (``done`` = elements applied) when the pool runs dry, or
    RmapInputChangedError (``done`` likewise) when another thread rewrote an
    element of ``gfns``/``sptes`` during the loop.
    """
    cdef int lv = s32_arg(level, "level")
    cdef Py_ssize_t n, done, bad
    cdef int why = 0, err = 0
    cdef _zap_collector col
    _check_level(lv)
    _check_array("gfns", gfns)
    _check_array("sptes", sptes)
    n = gfns.shape[0]
    if sptes.shape[0] != n:
        raise ValueError(f"gfns and sptes differ in length ({n} vs {sptes.shape[0]})")
    out = _out_array("out", out, n, np.uint32, inputs=(gfns, sptes))
    _check_same_pool(cache, slot.pool)
    _check_no_lock_held_by_me()
    if n == 0:
        return out
    cdef const uint64_t[::1] g = gfns
    cdef const uint64_t[::1] s = sptes
    cdef uint32_t[::1] o = out
    with nogil:
        bad = _validate_pairs(&slot.c, &g[0], &s[0], n, &why)
    if bad >= 0:
        _raise_bad_pair(slot, gfns, sptes, bad, why)
    memset(&col, 0, sizeof(col))
    slot.pool.c.gen += 1
    _check_idle(cache, "rmap_add_batch")
    cache._busy = 1
    try:
        with nogil:
            done = _rmap_add_batch(&slot.pool.c, &cache.mc, &slot.c, lv, &g[0], &s[0], n,
                                   &o[0], &col, &err)
    finally:
        cache._busy = 0
    slot.pool.c.gen += 1
    try:
        if col.oom:
            raise MemoryError("out of memory collecting recycled entries")
        if zap is not None and col.n:
            _call_zaps(zap, col.buf, col.n, 0, False)
    finally:
        free(col.buf)
    if err == -RMAP_BATCH_INPUT_CHANGED:
        raise RmapInputChangedError(f"gfns/sptes element {done} changed during rmap_add_batch "
                                    f"and is no longer valid; the {done} adds before it were "
                                    f"applied", done=done)
    if err != 0:
        raise KvmNoMemoryError(f"pte_list_desc pool exhausted after {done} of {n} adds "
                               f"(capacity {slot.pool.capacity})", done=done)
    return out


cdef Py_ssize_t _rmap_remove_batch(pte_list_desc_pool *kvm, const kvm_rmap_slot *slot, int level,
                                   const uint64_t *gfns, const uint64_t *sptes,
                                   Py_ssize_t n, int *err) noexcept nogil:
    """Returns n, or the index of the first absent entry (*err = -ENOENT) or
    of the first element whose gfn no longer passes validation (*err =
    -RMAP_BATCH_INPUT_CHANGED).  A changed sptep needs no re-check: the
    search compares it and never follows it."""
    cdef Py_ssize_t i
    cdef kvm_rmap_head *head
    cdef uint64_t v, g
    cdef int r
    cdef int shift = (level - 1) * KVM_HPAGE_GFN_SHIFT_PER_LEVEL
    cdef uint64_t base_gfn = slot.base_gfn, npages = slot.npages
    cdef uint64_t base_index = base_gfn >> shift
    cdef kvm_rmap_head *heads = slot.rmap[level - 1]
    err[0] = 0
    for i in range(RMAP_BATCH_PREFETCH):
        _prefetch_head(heads, gfns, i, n, shift, base_index)
    for i in range(n):
        _prefetch_head(heads, gfns, i + RMAP_BATCH_PREFETCH, n, shift, base_index)
        g = kvmmmu_load_relaxed_u64(&gfns[i])
        if g - base_gfn >= npages:
            err[0] = -RMAP_BATCH_INPUT_CHANGED
            return i
        head = &heads[(g >> shift) - base_index]
        v = kvm_rmap_lock(head)
        r = __pte_list_remove(kvm, kvmmmu_load_relaxed_u64(&sptes[i]), &v)
        kvm_rmap_unlock(head, v)
        if r != 0:
            err[0] = r
            return i
    return n


def rmap_remove_batch(RmapSlot slot not None, gfns, sptes, level=1):
    """pte_list_remove for every ``(gfns[i], sptes[i])``, in order, nogil.

    Parameters as :func:`rmap_add_batch`.  Validation runs first (bad input
    changes nothing).  An absent entry raises RmapDataCorruptionError with
    ``index`` set; elements before it were removed, the rest untouched.
    """
    cdef int lv = s32_arg(level, "level")
    cdef Py_ssize_t n, done, bad
    cdef int why = 0, err = 0
    _check_level(lv)
    _check_array("gfns", gfns)
    _check_array("sptes", sptes)
    n = gfns.shape[0]
    if sptes.shape[0] != n:
        raise ValueError(f"gfns and sptes differ in length ({n} vs {sptes.shape[0]})")
    _check_no_lock_held_by_me()
    if n == 0:
        return
    cdef const uint64_t[::1] g = gfns
    cdef const uint64_t[::1] s = sptes
    with nogil:
        bad = _validate_pairs(&slot.c, &g[0], &s[0], n, &why)
    if bad >= 0:
        _raise_bad_pair(slot, gfns, sptes, bad, why)
    slot.pool.c.gen += 1
    with nogil:
        done = _rmap_remove_batch(&slot.pool.c, &slot.c, lv, &g[0], &s[0], n, &err)
    slot.pool.c.gen += 1
    if err == -RMAP_BATCH_INPUT_CHANGED:
        raise RmapInputChangedError(f"gfns element {done} changed during rmap_remove_batch "
                                    f"and is no longer in the slot; the {done} removes before "
                                    f"it were applied", done=done)
    if done != n:
        raise _data_corruption(slot.pool,
            f"sptes[{done}]={int(sptes[done]):#x} is not in the level-{lv} rmap of "
            f"gfns[{done}]={int(gfns[done]):#x}; the {done} entries before it were removed",
            index=done)


cdef Py_ssize_t _rmap_count_batch(const kvm_rmap_slot *slot, int level, const uint64_t *gfns,
                                  Py_ssize_t n, uint32_t *counts) noexcept nogil:
    """pte_list_count for each (validated) gfn.  Returns -1, or the index of
    the first gfn that no longer passes validation (nothing after it is
    counted)."""
    cdef Py_ssize_t i
    cdef uint64_t g
    cdef int shift = (level - 1) * KVM_HPAGE_GFN_SHIFT_PER_LEVEL
    cdef uint64_t base_gfn = slot.base_gfn, npages = slot.npages
    cdef uint64_t base_index = base_gfn >> shift
    cdef kvm_rmap_head *heads = slot.rmap[level - 1]
    for i in range(RMAP_BATCH_PREFETCH):
        _prefetch_head(heads, gfns, i, n, shift, base_index)
    for i in range(n):
        _prefetch_head(heads, gfns, i + RMAP_BATCH_PREFETCH, n, shift, base_index)
        g = kvmmmu_load_relaxed_u64(&gfns[i])
        if g - base_gfn >= npages:
            return i
        counts[i] = pte_list_count(&heads[(g >> shift) - base_index])
    return -1


def rmap_count_batch(RmapSlot slot not None, gfns, level=1, out=None):
    """pte_list_count for every gfn (nogil).  Returns ndarray[uint32] (n,).
    Raises GfnOutOfSlotError for a gfn outside the slot."""
    cdef int lv = s32_arg(level, "level")
    cdef Py_ssize_t n, bad
    _check_level(lv)
    _check_array("gfns", gfns)
    n = gfns.shape[0]
    out = _out_array("out", out, n, np.uint32, inputs=(gfns,))
    if n == 0:
        return out
    cdef const uint64_t[::1] g = gfns
    cdef uint32_t[::1] o = out
    cdef int why = 0
    with nogil:
        bad = _validate_pairs(&slot.c, &g[0], NULL, n, &why)
    if bad >= 0:
        _raise_bad_pair(slot, gfns, None, bad, why)
    with nogil:
        bad = _rmap_count_batch(&slot.c, lv, &g[0], n, &o[0])
    if bad >= 0:
        raise RmapInputChangedError(f"gfns element {bad} changed during rmap_count_batch and "
                                    f"is no longer in the slot", done=bad)
    return out


def rmap_count_all(RmapSlot slot not None, level=1, out=None):
    """pte_list_count of every head of one level, index order (nogil).
    Returns ndarray[uint32] of shape (slot.lpages[level - 1],)."""
    cdef int lv = s32_arg(level, "level")
    cdef Py_ssize_t n, i
    _check_level(lv)
    n = slot.c.lpages[lv - 1]
    out = _out_array("out", out, n, np.uint32)
    cdef uint32_t[::1] o = out
    cdef kvm_rmap_head *heads = slot.c.rmap[lv - 1]
    with nogil:
        for i in range(n):
            o[i] = pte_list_count(&heads[i])
    return out


def mmu_rmaps_stat(RmapSlot slot not None):
    """The debugfs ``mmu_rmaps_stat`` histogram for one slot: an
    ndarray[uint64] of shape (3, RMAP_LOG_SIZE), row = level (4K, 2M, 1G),
    column = ``ffs(count)`` clamped to RMAP_LOG_SIZE - 1.  ``ffs`` (lowest set
    bit) is the kernel's, so e.g. count 3 lands in column 1 ("1") and count 6
    in column 2 ("2-3"), whatever the column labels say."""
    out = np.zeros((KVM_NR_PAGE_SIZES, RMAP_LOG_SIZE), dtype=np.uint64)
    cdef uint64_t[:, ::1] h = out
    cdef int level, col
    cdef uint64_t i
    cdef kvm_rmap_head *heads
    with nogil:
        for level in range(KVM_NR_PAGE_SIZES):
            heads = slot.c.rmap[level]
            for i in range(slot.c.lpages[level]):
                col = kvmmmu_ffs(<int>pte_list_count(&heads[i]))
                if col > RMAP_LOG_SIZE - 1:
                    col = RMAP_LOG_SIZE - 1
                h[level, col] += 1
    return out


def format_mmu_rmaps_stat(hist):
    """Text of the debugfs file for a histogram from :func:`mmu_rmaps_stat`
    (summed over slots if you like): tab-separated, each line ends in a tab."""
    labels = ["0", "1"] + [f"{1 << (i - 1)}-{(1 << i) - 1}" for i in range(2, RMAP_LOG_SIZE)]
    lines = ["Rmap_Count:\t" + "".join(f"{x}\t" for x in labels)]
    for name, row in zip(("4K", "2M", "1G"), np.asarray(hist)):
        lines.append(f"Level={name}:\t" + "".join(f"{int(x)}\t" for x in row))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ audit

cdef object _audit_chain(uint64_t word, PteListDescPool pool, set free, set seen_desc,
                         set seen_sptes, str where, list errors, bint allow_locked):
    """Check one head; returns (entries, descriptors)."""
    cdef uint64_t v = word & ~KVM_RMAP_LOCKED
    cdef pte_list_desc *d
    cdef uint64_t addr, s
    cdef int state, i
    cdef uint64_t ndesc = 0, nent = 0, after
    if (word & KVM_RMAP_LOCKED) and not allow_locked:
        errors.append(f"{where}: lock bit set in {word:#x} while nobody should hold it")
    if v == 0:
        if word & KVM_RMAP_LOCKED:
            errors.append(f"{where}: empty head with the lock bit set")
        return 0, 0
    if not (v & KVM_RMAP_MANY):
        if not sptep_is_valid(v):
            errors.append(f"{where}: inline entry {v:#x} is not a valid sptep")
        if v in seen_sptes:
            errors.append(f"{where}: entry {v:#x} appears twice")
        seen_sptes.add(v)
        return 1, 0
    if v & 0x3E:
        errors.append(f"{where}: descriptor address {v:#x} is not 64-byte aligned")
        return 0, 0
    # First pass: validate every descriptor address before reading through it.
    chain = []
    addr = v & ~KVM_RMAP_FLAGS
    while addr != 0:
        state = pool.desc_state(addr, free)
        if state == 0:
            errors.append(f"{where}: {addr:#x} is not a descriptor of this pool")
            return nent, ndesc
        if state == 1:
            errors.append(f"{where}: descriptor {addr:#x} is on the pool's free list")
            return nent, ndesc
        if addr in seen_desc:
            errors.append(f"{where}: descriptor {addr:#x} is reachable twice (cycle or shared)")
            return nent, ndesc
        seen_desc.add(addr)
        chain.append(addr)
        addr = <uintptr_t>(<pte_list_desc *><uintptr_t>addr).more
    ndesc = len(chain)
    for k, addr in enumerate(chain):
        d = <pte_list_desc *><uintptr_t>addr
        after = ndesc - 1 - k
        tag = f"{where} desc#{k} {addr:#x}"
        if k == 0:
            if not 1 <= d.spte_count <= PTE_LIST_EXT:
                errors.append(f"{tag}: head spte_count={d.spte_count} outside 1..{PTE_LIST_EXT}")
        elif d.spte_count != PTE_LIST_EXT:
            errors.append(f"{tag}: tail descriptor not full (spte_count={d.spte_count})")
        if d.tail_count != PTE_LIST_EXT * after:
            errors.append(f"{tag}: tail_count={d.tail_count}, expected {PTE_LIST_EXT * after}")
        for i in range(PTE_LIST_EXT):
            s = d.sptes[i]
            if i < <int>d.spte_count:
                if not sptep_is_valid(s):
                    errors.append(f"{tag}: sptes[{i}]={s:#x} is not a valid sptep")
                if s in seen_sptes:
                    errors.append(f"{tag}: entry {s:#x} appears twice")
                seen_sptes.add(s)
                nent += 1
            elif s != 0:
                errors.append(f"{tag}: sptes[{i}]={s:#x} beyond spte_count={d.spte_count} is not 0")
    d = <pte_list_desc *><uintptr_t>chain[0]
    if d.spte_count + d.tail_count != nent:
        errors.append(f"{where}: pte_list_count={d.spte_count + d.tail_count} but {nent} entries walked")
    return nent, ndesc


def audit(obj, *, bint unique=True, bint allow_locked=False):
    """Check the rmap invariants (module docstring, 1-7) of a slot, a head, or
    a list/tuple of them (sharing one pool), and that every descriptor address
    is a live descriptor of the pool, reachable once.

    Parameters
    ----------
    obj : RmapSlot | RmapHead | list | tuple
    unique : bool
        Also require that no sptep appears twice across everything audited
        (an SPTE is in exactly one rmap).  Within one list it is always required.
    allow_locked : bool
        Accept heads whose lock bit is set (an audit concurrent with holders).

    Returns
    -------
    dict
        ``heads`` (non-empty), ``entries``, ``descriptors``, ``max_count``.

    Raises RmapAuditError listing every violation found.
    """
    objs = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    for o in objs:
        if not isinstance(o, (RmapSlot, RmapHead)):
            raise TypeError(f"audit() takes RmapSlot or RmapHead objects (or a list of them), "
                            f"not {type(o).__name__}")
    if not objs:
        return dict(heads=0, entries=0, descriptors=0, max_count=0)
    pools = {id((<RmapSlot>o).pool if isinstance(o, RmapSlot) else (<RmapHead>o).pool) for o in objs}
    if len(pools) != 1:
        raise ValueError("audit() takes objects that share one PteListDescPool")
    first = objs[0]
    cdef PteListDescPool pool = (<RmapSlot>first).pool if isinstance(first, RmapSlot) else (<RmapHead>first).pool
    cdef set free = pool.free_descriptors()
    cdef set seen_desc = set()
    cdef set seen_sptes = set()
    cdef list errors = []
    heads = entries = descs = max_count = 0
    for o in objs:
        if isinstance(o, RmapSlot):
            for level in range(1, KVM_NR_PAGE_SIZES + 1):
                arr = (<RmapSlot>o).rmap[level - 1]
                for index in np.flatnonzero(arr):
                    local = seen_sptes if unique else set()
                    e, nd = _audit_chain(<uint64_t>arr[index], pool, free, seen_desc, local,
                                         f"level {level} index {index}", errors, allow_locked)
                    heads += 1
                    entries += e
                    descs += nd
                    max_count = max(max_count, e)
        elif isinstance(o, RmapHead):
            word = kvm_rmap_atomic_read(&(<RmapHead>o).head.val)
            local = seen_sptes if unique else set()
            e, nd = _audit_chain(word, pool, free, seen_desc, local,
                                 f"head {(<RmapHead>o).address:#x}", errors, allow_locked)
            heads += word != 0
            entries += e
            descs += nd
            max_count = max(max_count, e)
        else:
            raise TypeError(f"audit() takes RmapSlot or RmapHead objects, not {type(o).__name__}")
    if errors:
        raise RmapAuditError(f"{len(errors)} rmap invariant violation(s):\n  " + "\n  ".join(errors[:100]))
    return dict(heads=heads, entries=entries, descriptors=descs, max_count=max_count)
