"""Test benches of the rmap lock and the PTE lists on real OS threads.

Like :mod:`kvmmmu._core.lockless_torture` for the lockless SPTE protocols,
these run the real code of :mod:`kvmmmu._core.rmap` (through its ``rmap.pxd``
contract only) from C loops without the GIL, started from Python
``threading`` threads, and count what the threads saw:

* :class:`LockStress` -- one writer holds an rmap head's bit lock while it
  half-updates the chain (a *window*); readers walk the chain under the
  read-only lock (they must never see the window) or with bare loads (they
  do: that is why the lock exists).  Handshakes make the overlap certain even
  on one CPU.
* :func:`concurrent_writer` -- several writers add to and remove from one
  head with the locked pte_list_add / pte_list_remove; the bit lock must
  serialise them (failed operations are counted).
* :func:`debug_store_head`, :func:`debug_poke_desc` -- overwrite a head word
  or a descriptor field, bypassing every rule, so the audit and the lock
  checks can be shown broken input.

Tests and benchmarks only: nothing in the model imports this module.
"""

cimport cython
from kvmmmu._core.argcheck cimport s32_arg, s64_arg, u64_arg
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.string cimport memset

from kvmmmu._core.memcache cimport kvm_mmu_topup_memory_cache
from kvmmmu._core.rmap cimport (
    KVM_RMAP_LOCKED, KVM_RMAP_MANY, PTE_LIST_DESC_CACHE_MIN, PTE_LIST_EXT, ParentPtes,
    PteListDescCache, PteListDescPool, RmapHead, __kvm_rmap_trylock, __pte_list_add,
    __pte_list_remove, kvm_rmap_cpu_relax, kvm_rmap_get, kvm_rmap_head, kvm_rmap_lock,
    kvm_rmap_set_release, kvm_rmap_unlock, kvm_rmap_unlock_readonly, kvmmmu_fetch_add_u64,
    kvmmmu_load_relaxed_u32, kvmmmu_load_relaxed_u64, kvmmmu_store_relaxed_u64,
    pte_list_add, pte_list_desc, pte_list_desc_pool, pte_list_desc_pool_alloc, pte_list_remove,
    rmap_val_desc, sched_yield,
)


cdef int _check_same_pool(PteListDescCache cache, PteListDescPool pool) except -1:
    if cache.pool is not pool:
        raise ValueError("the cache allocates from a different PteListDescPool than the head's")
    return 0


# ------------------------------------------------------------------ rule-breaking pokes

def debug_store_head(RmapHead head not None, value):
    """Overwrite a head word (release store), bypassing every rule."""
    cdef uint64_t c_value = u64_arg(value, "value")
    head.pool.c.gen += 1
    kvm_rmap_set_release(&head.head.val, c_value)


def debug_poke_desc(RmapHead head not None, k, str field not None, value, index=0):
    """Overwrite a field (``"spte_count"``, ``"tail_count"`` or ``"sptes"``
    at ``index``) of the k-th descriptor of a chain (0 = head descriptor),
    bypassing every rule; returns the old value."""
    cdef int c_k = s32_arg(k, "k")
    cdef uint64_t c_value = u64_arg(value, "value")
    cdef int c_index = s32_arg(index, "index")
    cdef uint64_t v = kvm_rmap_get(head.head)
    cdef pte_list_desc *d
    cdef uint64_t old
    if not (v & KVM_RMAP_MANY):
        raise ValueError("the list has no descriptor")
    d = rmap_val_desc(v)
    for _ in range(c_k):
        d = d.more
        if d == NULL:
            raise IndexError(f"the chain has fewer than {c_k + 1} descriptors")
    if field == "spte_count":
        old = d.spte_count
        d.spte_count = <uint32_t>c_value
    elif field == "tail_count":
        old = d.tail_count
        d.tail_count = <uint32_t>c_value
    elif field == "sptes":
        if not 0 <= c_index < PTE_LIST_EXT:
            raise IndexError(index)
        old = d.sptes[c_index]
        d.sptes[c_index] = c_value
    else:
        raise ValueError(field)
    return old


# ------------------------------------------------------------------ lock stress bench

cdef struct _stress_shared:
    uint64_t window_seq          # odd while the writer is mid-update, lock held
    uint64_t reader_tried_seq    # last odd window_seq during which a reader was blocked / walking
    uint64_t reader_saw_seq      # last odd window_seq a reader finished a walk in
    uint64_t reader_walks        # walks finished so far (all readers)
    uint64_t stop
    uint64_t readers_ready


cdef inline uint64_t _xorshift(uint64_t *s) noexcept nogil:
    cdef uint64_t x = s[0]
    x ^= x << 13
    x ^= x >> 7
    x ^= x << 17
    s[0] = x
    return x


cdef inline bint _spin_until(uint64_t *p, uint64_t value, bint equal, long spins) noexcept nogil:
    """Wait (pause, and sched_yield now and then: the threads may share one
    CPU) until (*p == value) == equal; False after `spins` rounds."""
    cdef long w
    for w in range(spins):
        if (kvmmmu_load_relaxed_u64(p) == value) == equal:
            return True
        kvm_rmap_cpu_relax()
        if w % 64 == 63:
            sched_yield()
    return False


@cython.no_gc_clear
@cython.auto_pickle(False)
cdef class LockStress:
    """Real-thread test bench for the rmap lock.

    One head holds the entries ``base + 8*i`` for ``i < n_entries`` whenever it
    is unlocked.  Each :meth:`run_writer` iteration takes the writer lock,
    removes ``k`` entries (removals move entries inside the chain and may free
    the head descriptor), opens a *window* (``window_seq`` odd), waits for a
    reader to arrive, closes the window, adds the entries back and publishes
    with the unlock.  The chain is half-updated while the window is open.

    :meth:`run_reader` walks the chain until stopped, under the read-only lock
    (``locked=True``) or with bare loads, and counts walks that saw anything
    but the published state (entry set, count, structure).

    Handshakes make the overlap certain even when both threads share one CPU:
    a locked reader that finds the lock held reports the open window while it
    spins, and the writer waits for that report, then (after unlocking) for
    the reader's next walk; a bare reader reports the windows it walked in,
    and the writer waits for a whole walk inside the window.
    """
    cdef _stress_shared s
    cdef readonly ParentPtes head
    cdef PteListDescPool pool
    cdef uint64_t base
    cdef int n_entries

    def __cinit__(self, PteListDescPool pool not None, n_entries=40, base=0x1000):
        cdef int c_n_entries = s32_arg(n_entries, "n_entries")
        cdef uint64_t c_base = u64_arg(base, "base")
        if c_n_entries < 2 or c_n_entries > 64:
            raise ValueError("n_entries must be 2..64")
        memset(&self.s, 0, sizeof(self.s))
        self.pool = pool
        self.head = ParentPtes(pool)
        self.base = c_base
        self.n_entries = c_n_entries
        cdef PteListDescCache cache = PteListDescCache(pool)
        cache.topup(PTE_LIST_DESC_CACHE_MIN)
        for i in range(c_n_entries):
            if pte_list_add(&pool.c, &cache.mc, c_base + 8 * <uint64_t>i, self.head.head) < 0:
                raise MemoryError("LockStress: the cache ran dry filling the list")

    def run_writer(self, PteListDescCache cache not None, iters, k=5,
                   wait_spins=1000000, bint naive_reader=False, seed=12345):
        """Returns the number of windows in which the reader handshake completed."""
        cdef long c_iters = s64_arg(iters, "iters")
        cdef int c_k = s32_arg(k, "k")
        cdef long c_wait_spins = s64_arg(wait_spins, "wait_spins")
        cdef uint64_t c_seed = u64_arg(seed, "seed")
        cdef long it
        cdef int j, t
        cdef uint64_t v, rng = c_seed | 1, seq, walks
        cdef uint64_t removed[64]
        cdef uint64_t mask
        cdef long windows_seen = 0, misses = 0
        cdef bint ok
        cdef kvm_rmap_head *head = self.head.head
        cdef pte_list_desc_pool *kvm = &self.pool.c
        if c_k < 1 or c_k >= self.n_entries:
            raise ValueError("k must be 1..n_entries-1")
        _check_same_pool(cache, self.pool)
        with nogil:
            while kvmmmu_load_relaxed_u64(&self.s.readers_ready) == 0:
                kvm_rmap_cpu_relax()
            for it in range(c_iters):
                kvm_mmu_topup_memory_cache(&cache.mc, c_k + 1, pte_list_desc_pool_alloc, kvm)
                v = kvm_rmap_lock(head)
                mask = 0
                for j in range(c_k):
                    while True:
                        t = <int>(_xorshift(&rng) % <uint64_t>self.n_entries)
                        if not (mask >> t) & 1:
                            break
                    mask |= (<uint64_t>1) << t
                    removed[j] = self.base + 8 * <uint64_t>t
                    __pte_list_remove(kvm, removed[j], &v)
                seq = kvmmmu_load_relaxed_u64(&self.s.window_seq) + 1
                kvmmmu_store_relaxed_u64(&self.s.window_seq, seq)          # odd: open
                if naive_reader:
                    # A bare reader reports after walking inside this window.
                    ok = _spin_until(&self.s.reader_saw_seq, seq, True, c_wait_spins)
                else:
                    # A locked reader reports while it spins on our lock.
                    ok = _spin_until(&self.s.reader_tried_seq, seq, True, c_wait_spins)
                if ok:
                    windows_seen += 1
                    misses = 0
                else:
                    misses += 1
                kvmmmu_store_relaxed_u64(&self.s.window_seq, seq + 1)      # even: closed
                for j in range(c_k):
                    __pte_list_add(&cache.mc, removed[j], &v)
                walks = kvmmmu_load_relaxed_u64(&self.s.reader_walks)
                kvm_rmap_unlock(head, v)
                if not naive_reader:
                    # Let the blocked reader take the lock and walk before we relock.
                    _spin_until(&self.s.reader_walks, walks, False, c_wait_spins)
                if misses >= 10:
                    break                   # the reader does not show up: give up early
            kvmmmu_store_relaxed_u64(&self.s.stop, 1)
        return windows_seen

    def run_reader(self, bint locked):
        """Walk until stopped.  Returns a dict: walks, bad_walks, contended
        (lock attempts that found the bit held), in_window (walks started
        while a window was open), unlock_errors (read-only unlock saw a change)."""
        cdef long walks = 0, bad = 0, contended = 0, in_window = 0, unlock_errors = 0
        cdef long spins
        cdef uint64_t seq, v, probe
        cdef kvm_rmap_head *head = self.head.head
        with nogil:
            kvmmmu_fetch_add_u64(&self.s.readers_ready, 1)
            while kvmmmu_load_relaxed_u64(&self.s.stop) == 0:
                seq = kvmmmu_load_relaxed_u64(&self.s.window_seq)
                if seq & 1:
                    in_window += 1
                if locked:
                    # kvm_rmap_lock_readonly, spelled out as its cmpxchg loop so
                    # that a reader blocked on the writer can report the window.
                    if not __kvm_rmap_trylock(head, &v):
                        contended += 1
                        spins = 0
                        while True:
                            probe = kvmmmu_load_relaxed_u64(&self.s.window_seq)
                            if probe & 1:
                                kvmmmu_store_relaxed_u64(&self.s.reader_tried_seq, probe)
                            if __kvm_rmap_trylock(head, &v):
                                break
                            kvm_rmap_cpu_relax()
                            spins += 1
                            if spins % 64 == 0:
                                sched_yield()
                    if not self._walk_ok(v, False):
                        bad += 1
                    if kvm_rmap_unlock_readonly(head, v) != 0:
                        unlock_errors += 1
                else:
                    v = kvmmmu_load_relaxed_u64(&head.val) & ~KVM_RMAP_LOCKED
                    if not self._walk_ok(v, True):
                        bad += 1
                    if seq & 1:
                        kvmmmu_store_relaxed_u64(&self.s.reader_saw_seq, seq)
                walks += 1
                kvmmmu_fetch_add_u64(&self.s.reader_walks, 1)
        return dict(walks=walks, bad_walks=bad, contended=contended, in_window=in_window,
                    unlock_errors=unlock_errors)

    cdef bint _walk_ok(self, uint64_t v, bint racy) noexcept nogil:
        """The chain `v` holds exactly the published entry set with a sound
        structure.  `racy`: read with relaxed atomics and a step bound."""
        cdef pte_list_desc *d
        cdef uint64_t seen = 0, s, bit, full
        cdef uint32_t count, spte_count, tail_count
        cdef int i, steps = 0, ndesc = 0
        cdef int n = 0
        full = (<uint64_t>1 << self.n_entries) - 1 if self.n_entries < 64 else ~(<uint64_t>0)
        if v == 0 or not (v & KVM_RMAP_MANY):
            return False                       # the bench list always has n_entries >= 2
        d = rmap_val_desc(v)
        if racy:
            count = kvmmmu_load_relaxed_u32(&d.spte_count) + kvmmmu_load_relaxed_u32(&d.tail_count)
        else:
            count = d.spte_count + d.tail_count
        while d != NULL:
            steps += 1
            if steps > 16:
                return False
            if racy:
                spte_count = kvmmmu_load_relaxed_u32(&d.spte_count)
                tail_count = kvmmmu_load_relaxed_u32(&d.tail_count)
            else:
                spte_count = d.spte_count
                tail_count = d.tail_count
            if spte_count > PTE_LIST_EXT or (ndesc > 0 and spte_count != PTE_LIST_EXT):
                return False
            for i in range(PTE_LIST_EXT):
                s = kvmmmu_load_relaxed_u64(&d.sptes[i]) if racy else d.sptes[i]
                if i >= <int>spte_count:
                    if s != 0:
                        return False
                    continue
                if s < self.base or (s - self.base) % 8 or (s - self.base) // 8 >= <uint64_t>self.n_entries:
                    return False
                bit = (<uint64_t>1) << ((s - self.base) // 8)
                if seen & bit:
                    return False
                seen |= bit
                n += 1
            ndesc += 1
            if racy:
                d = <pte_list_desc *><uintptr_t>kvmmmu_load_relaxed_u64(<uint64_t *>&d.more)
            else:
                d = d.more
        return seen == full and n == self.n_entries and count == <uint32_t>n


def concurrent_writer(PteListDescCache cache not None, RmapHead head not None, base, n, rounds):
    """Add ``n`` entries ``base + 8*i`` to ``head`` one by one, then
    remove them in a scrambled order, ``rounds`` times, each add/remove a
    locked pte_list_add/pte_list_remove without the GIL.  Returns the number
    of failed operations (should be 0)."""
    cdef uint64_t c_base = u64_arg(base, "base")
    cdef int c_n = s32_arg(n, "n")
    cdef long c_rounds = s64_arg(rounds, "rounds")
    cdef long r
    cdef int i, j, failures = 0
    cdef uint64_t rng = c_base | 1
    cdef pte_list_desc_pool *kvm = &head.pool.c
    cdef uint64_t order[256]
    cdef uint64_t tmp
    if c_n < 1 or c_n > 256:
        raise ValueError("n must be 1..256")
    _check_same_pool(cache, head.pool)
    with nogil:
        for r in range(c_rounds):
            for i in range(c_n):
                if cache.mc.nobjs == 0:
                    kvm_mmu_topup_memory_cache(&cache.mc, 1, pte_list_desc_pool_alloc, kvm)
                if pte_list_add(kvm, &cache.mc, c_base + 8 * <uint64_t>i, head.head) < 0:
                    failures += 1
                order[i] = c_base + 8 * <uint64_t>i
            for i in range(c_n - 1, 0, -1):
                j = <int>(_xorshift(&rng) % <uint64_t>(i + 1))
                tmp = order[i]
                order[i] = order[j]
                order[j] = tmp
            for i in range(c_n):
                if pte_list_remove(kvm, order[i], head.head) != 0:
                    failures += 1
    return failures
