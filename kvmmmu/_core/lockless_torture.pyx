"""Torture tests of the lockless SPTE protocols on real OS threads.

Like the kernel's rcutorture and locktorture, these run the real code paths
of :mod:`kvmmmu._core.pt_arena`, :mod:`~kvmmmu._core.mmu_spte` and
:mod:`~kvmmmu._core.mmu_lockless` concurrently and count what a reader saw:

* :func:`spte_torture` -- writer threads cycle SPTEs present -> non-present ->
  present with a different high half through mmu_spte_set /
  mmu_spte_update / mmu_spte_clear_track_bits / mmu_spte_clear_no_track,
  while readers read them with __get_spte_lockless (or, to show why it
  exists, with a naive two-half read) and count torn values.
* :func:`lockless_walk_torture` -- a vCPU thread walks a two-level table
  inside walk_shadow_page_lockless_begin/end while a zapper thread unlinks and
  frees child tables (kvm_mmu_commit_zap_page for the shadow MMU, call_rcu
  for the TDP MMU) and links fresh ones; the walker counts poisoned (freed)
  entries it read.

Every thread runs a C loop inside ``with nogil:``, started from Python
``threading`` threads, so the threads run on separate cores at once.  A C
start barrier lines them up.  This module uses only the .pxd contracts of the
arena (pt_arena, pt_arena_defs, pt_pool, mmu_spte, mmu_lockless).
"""

from kvmmmu._core.argcheck cimport s32_arg
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memset

import os
import threading

from kvmmmu._core.types cimport sptep_t, make_sptep
from kvmmmu._core.memcache cimport (
    kvm_mmu_memory_cache, kvm_mmu_memory_cache_init, kvm_mmu_topup_memory_cache,
    kvm_mmu_free_memory_cache,
)
from kvmmmu._core.spte cimport (
    ACC_ALL, MKSPTE_HOST_WRITABLE, PG_LEVEL_4K, PT_WRITABLE_MASK, is_large_pte,
    is_shadow_present_pte, make_nonleaf_spte, make_spte, spte_to_pfn,
)
from kvmmmu._core.pt_arena cimport PtArena
from kvmmmu._core.pt_arena_defs cimport (
    PT_CACHE_PAGE_HEADER, PT_CACHE_SHADOW_PAGE, PT_POISON, PT_ROLE_INVALID, kvm_mmu_page,
    pt_arena_t, pt_cpu_relax, pt_fetch_add64, pt_load_acquire64, pt_now_ns, pt_read_once64,
    pt_sp_ptr, pt_sptep_ptr, pt_store_release64, pt_yield, spte_to_child_sp,
)
from kvmmmu._core.pt_pool cimport pt_alloc_sp, pt_free_sp, pt_pool_alloc, pt_pool_free
from kvmmmu._core.mmu_spte cimport (
    _get_spte_lockless, _get_spte_naive_split, kvm_update_page_stats, mmu_spte_clear_no_track,
    mmu_spte_clear_track_bits, mmu_spte_set, mmu_spte_update,
)
from kvmmmu._core.mmu_lockless cimport (
    call_rcu_free_sp, kvm_mmu_commit_zap_page, rcu_poll, synchronize_rcu,
    walk_shadow_page_lockless_begin, walk_shadow_page_lockless_end,
)

from kvmmmu._core.pt_arena import MmuMemoryCache as _MmuMemoryCache

def _cpus():
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def _pin(cpu):
    """Pin the calling thread (Linux: pid 0 is the calling thread)."""
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def _run_threads(targets, bint pin):
    """Start one thread per (name, callable); pinned round-robin over the
    CPUs we may use when `pin`.  Returns the CPUs used (or None)."""
    cpus = _cpus() if pin else []
    if len(cpus) < 2:
        cpus = []

    def body(fn, cpu):
        _pin(cpu)
        fn()

    threads = [threading.Thread(target=body, args=(fn, cpus[i % len(cpus)] if cpus else None),
                                name=name)
               for i, (name, fn) in enumerate(targets)]
    try:
        for th in threads:
            th.start()
    finally:
        for th in threads:
            if th.ident is not None:
                th.join()
    return [cpus[i % len(cpus)] for i in range(len(targets))] if cpus else None


cdef enum:
    MAX_SPTES = 64
    MAX_READERS = 8
    MAX_CHILDREN = 64
    SCHEME_SHADOW = 0
    SCHEME_TDP = 1


cdef inline void _barrier(uint64_t *ready, uint64_t n) noexcept nogil:
    """Wait until all `n` threads arrived, so the loops really overlap."""
    cdef uint64_t spins = 0
    pt_fetch_add64(ready, 1)
    while pt_load_acquire64(ready) < n:
        spins += 1
        if spins & 1023:
            pt_cpu_relax()
        else:
            pt_yield()


cdef inline uint64_t _torture_pfn(uint64_t lo20, uint64_t k) noexcept nogil:
    """The pfn whose low 20 bits are `lo20`: bits 32:20 (the SPTE's high
    half) are a function of lo20 that differs for consecutive values, so a
    low half of one value paired with the high half of the next or previous
    one never forms a legitimate value.  pfns stay below 2**33, outside the
    arena's default table range."""
    return (((lo20 * 0x1A3B + k * 0x9E5) & 0x1FFF) << 20) | lo20


cdef struct spte_torture_t:
    pt_arena_t *a
    int n
    sptep_t spteps[64]
    uint64_t *ptrs[64]
    uint64_t base               # make_spte(pfn=0): writable, accessed, dirty leaf
    uint64_t w_mask
    uint64_t mmuw_mask
    uint64_t n_reads
    bint naive
    uint64_t nthreads
    uint64_t ready
    uint64_t stop
    uint64_t n_readers
    uint64_t readers_done
    uint64_t writes
    uint64_t writer_errors
    uint64_t flushes
    uint64_t writer_ns
    uint64_t reads[8]
    uint64_t torn[8]
    uint64_t retries[8]
    uint64_t mixes[8]
    uint64_t ns[8]
    uint64_t first_torn[8]


cdef void _spte_writer(spte_torture_t *t) noexcept nogil:
    cdef pt_arena_t *a = t.a
    cdef uint64_t gen[64]
    cdef uint64_t P, ro, wp, old, cycles = 0, t0
    cdef int k
    memset(gen, 0, sizeof(gen))
    _barrier(&t.ready, t.nthreads)
    t0 = pt_now_ns()
    while pt_load_acquire64(&t.stop) == 0:
        for k in range(t.n):
            gen[k] = (gen[k] + 1) & 0xFFFFF
            P = t.base | (_torture_pfn(gen[k], k) << 12)
            ro = P & ~t.w_mask                      # write-protected for dirty logging
            wp = P & ~(t.w_mask | t.mmuw_mask)      # write-protected for write tracking
            mmu_spte_set(a, t.spteps[k], P)
            kvm_update_page_stats(a, PG_LEVEL_4K, 1)
            if mmu_spte_update(a, t.spteps[k], ro, NULL):
                t.flushes += 1
            if mmu_spte_update(a, t.spteps[k], wp, NULL):
                t.flushes += 1
            if cycles & 1:
                old = mmu_spte_clear_track_bits(a, t.spteps[k], NULL)
                if old != wp:
                    t.writer_errors += 1
            else:
                mmu_spte_clear_no_track(a, t.spteps[k])
                kvm_update_page_stats(a, PG_LEVEL_4K, -1)
            t.writes += 1
        cycles += 1
    t.writer_ns = pt_now_ns() - t0


cdef void _spte_reader(spte_torture_t *t, int r) noexcept nogil:
    cdef pt_arena_t *a = t.a
    cdef uint64_t i, v, lo, P, t0
    cdef uint64_t torn = 0, mixes = 0, retries = 0
    cdef uint64_t nonpresent = a.fmt.nonpresent_value
    cdef uint64_t w = t.w_mask, ww = t.w_mask | t.mmuw_mask
    cdef int k = 0
    _barrier(&t.ready, t.nthreads)
    t0 = pt_now_ns()
    for i in range(t.n_reads):
        if t.naive:
            v = _get_spte_naive_split(t.ptrs[k])
        else:
            v = _get_spte_lockless(a, t.spteps[k], &retries)
        if is_shadow_present_pte(v):
            lo = (v >> 12) & 0xFFFFF
            P = t.base | (_torture_pfn(lo, k) << 12)
            if v != P and v != (P & ~w) and v != (P & ~ww):
                if torn == 0:
                    t.first_torn[r] = v
                torn += 1
        elif v != nonpresent:
            mixes += 1
        k += 1
        if k == t.n:
            k = 0
    t.ns[r] = pt_now_ns() - t0
    t.reads[r] = t.n_reads
    t.torn[r] = torn
    t.mixes[r] = mixes
    t.retries[r] = retries
    if pt_fetch_add64(&t.readers_done, 1) + 1 == t.n_readers:
        pt_store_release64(&t.stop, 1)


cdef class _SpteTorture:
    cdef spte_torture_t t
    cdef PtArena arena

    def writer(self):
        with nogil:
            _spte_writer(&self.t)

    def reader(self, r):
        cdef int c_r = s32_arg(r, "r")
        with nogil:
            _spte_reader(&self.t, c_r)


def spte_torture(PtArena arena not None, n_reads, *, str read="lockless", int n_sptes=4,
                 int n_tables=2, bint writer=True, int n_readers=1, bint pin=True):
    """Race lockless readers against a writer on the same SPTEs.

    Parameters
    ----------
    arena : PtArena
        Tables are taken from it and given back (its state is unchanged
        afterwards apart from statistics and which free pages are where).
    n_reads : int
        Reads per reader thread.
    read : {"lockless", "naive"}
        ``"lockless"``: mmu_spte_get_lockless (the retry loop on 32-bit
        hosts).  ``"naive"``: the two 32-bit halves read once, low then high.
    n_sptes, n_tables : int
        The writer cycles `n_sptes` SPTEs spread over `n_tables` tables.
        Fewer SPTEs means more contention.
    writer : bool
        False measures uncontended read throughput.
    n_readers : int
        Reader threads (1..8); the writer is one more thread.
    pin : bool
        Pin the threads round-robin to the CPUs this process may use, so
        that reader and writer really run at the same time on different
        cores (otherwise the scheduler may time-slice them on one).

    Returns
    -------
    dict
        ``reads`` (total), ``torn`` (present values that no writer stored:
        the low half of one value with the high half of another),
        ``nonpresent_mixes`` (non-present low half with a stale high half;
        harmless, the kernel ignores a non-present SPTE's high half),
        ``retries`` (rereads of the 32-bit protocol), ``retry_rate``,
        ``reads_per_second`` (all readers), ``writes`` (writer cycles of
        set -> update -> update -> clear), ``writer_errors`` (the old value a
        clear returned was not the one written: must be 0), ``flushes``,
        ``first_torn``, ``seconds``, ``host_64bit``, ``read``.
    """
    if read not in ("lockless", "naive"):
        raise ValueError(f"read must be 'lockless' or 'naive', not {read!r}")
    if not 1 <= n_sptes <= MAX_SPTES:
        raise ValueError(f"n_sptes={n_sptes} is outside 1..{MAX_SPTES}")
    if not 1 <= n_tables <= n_sptes:
        raise ValueError(f"n_tables={n_tables} is outside 1..n_sptes")
    if not 1 <= n_readers <= MAX_READERS:
        raise ValueError(f"n_readers={n_readers} is outside 1..{MAX_READERS}")
    if n_reads < 0:
        raise ValueError("n_reads must be >= 0")
    cdef _SpteTorture run = _SpteTorture()
    cdef spte_torture_t *t = &run.t
    cdef bint wrprot
    cdef int k
    pc = _MmuMemoryCache(arena, "shadow_page", capacity=n_tables)
    hc = _MmuMemoryCache(arena, "page_header", capacity=n_tables)
    pc.topup(n_tables)
    hc.topup(n_tables)
    sps = [arena.alloc_sp(pc, hc, role=PG_LEVEL_4K) for _ in range(n_tables)]
    stats_before = arena.page_stats["pages_4k"]
    try:
        memset(t, 0, sizeof(spte_torture_t))
        run.arena = arena
        t.a = &arena.a
        t.n = n_sptes
        for k in range(n_sptes):
            t.spteps[k] = arena.sp_sptep(sps[k % n_tables], (k * 67 + 5) % 512)
            t.ptrs[k] = pt_sptep_ptr(&arena.a, t.spteps[k])
        t.base = make_spte(&arena.a.fmt, PG_LEVEL_4K, ACC_ALL, 0, arena.a.fmt.nonpresent_value,
                           MKSPTE_HOST_WRITABLE, &wrprot)
        t.w_mask = PT_WRITABLE_MASK
        t.mmuw_mask = arena.a.fmt.mmu_writable_mask
        t.n_reads = n_reads
        t.naive = read == "naive"
        t.n_readers = n_readers
        targets = [(f"spte-reader-{r}", (lambda r=r: run.reader(r))) for r in range(n_readers)]
        if writer:
            targets.append(("spte-writer", run.writer))
        t.nthreads = len(targets)
        cpus = _run_threads(targets, pin)
    finally:
        for sp in sps:
            for k in range(512):
                s = arena.sp_sptep(sp, k)
                if is_shadow_present_pte(arena.spt(sp)[k]):
                    arena.mmu_spte_clear_no_track(s)
            arena.set_sp(sp, role=PG_LEVEL_4K | PT_ROLE_INVALID)
        arena.kvm_mmu_commit_zap_page(sps)
        pc.free()
        hc.free()
    reads = sum(t.reads[r] for r in range(n_readers))
    secs = max(t.ns[r] for r in range(n_readers)) / 1e9
    torn = [t.first_torn[r] for r in range(n_readers) if t.torn[r]]
    return dict(
        read=read, host_64bit=arena.host_64bit, reads=reads,
        torn=sum(t.torn[r] for r in range(n_readers)),
        nonpresent_mixes=sum(t.mixes[r] for r in range(n_readers)),
        retries=sum(t.retries[r] for r in range(n_readers)),
        retry_rate=(sum(t.retries[r] for r in range(n_readers)) / reads) if reads else 0.0,
        reads_per_second=reads / secs if secs else float("inf"),
        seconds=secs, writes=t.writes, writer_errors=t.writer_errors, flushes=t.flushes,
        first_torn=torn[0] if torn else None, cpus=cpus,
        page_stats_drift=arena.page_stats["pages_4k"] - stats_before,
    )


# --- lockless walks against a zapper ------------------------------------------

cdef struct walk_torture_t:
    pt_arena_t *a
    int vcpu
    int scheme
    bint protect
    int n_children
    sptep_t root_spteps[64]
    uint64_t n_walks
    uint64_t reads_per_walk
    uint64_t leaf_base
    kvm_mmu_memory_cache pc
    kvm_mmu_memory_cache hc
    uint64_t nthreads
    uint64_t ready
    uint64_t stop
    uint64_t walks
    uint64_t uaf
    uint64_t uaf_walks
    uint64_t wild
    uint64_t nonpresent_roots
    uint64_t walker_ns
    uint64_t zaps
    uint64_t alloc_failures
    uint64_t zapper_ns


cdef void _walker(walk_torture_t *t) noexcept nogil:
    cdef pt_arena_t *a = t.a
    cdef uint64_t w, j, e, v, pfn, t0, uaf
    cdef int i
    _barrier(&t.ready, t.nthreads)
    t0 = pt_now_ns()
    for w in range(t.n_walks):
        walk_shadow_page_lockless_begin(a, t.vcpu)
        i = <int>(w % <uint64_t>t.n_children)
        e = _get_spte_lockless(a, t.root_spteps[i], NULL)
        if is_shadow_present_pte(e) and not is_large_pte(e):
            pfn = spte_to_pfn(e)
            if pfn >= a.base_pfn and pfn - a.base_pfn < pt_read_once64(&a.tables_hw):
                uaf = 0
                for j in range(t.reads_per_walk):
                    v = _get_spte_lockless(a, make_sptep(pfn, <unsigned int>((j * 97 + w) & 511)), NULL)
                    if v == PT_POISON:
                        uaf += 1
                if uaf:
                    t.uaf += uaf
                    t.uaf_walks += 1
            else:
                t.wild += 1
        else:
            t.nonpresent_roots += 1
        walk_shadow_page_lockless_end(a, t.vcpu)
    t.walks = t.n_walks
    t.walker_ns = pt_now_ns() - t0
    pt_store_release64(&t.stop, 1)


cdef int _refill(walk_torture_t *t) noexcept nogil:
    cdef pt_arena_t *a = t.a
    cdef int rc
    while True:
        rc = kvm_mmu_topup_memory_cache(&t.pc, 1, pt_pool_alloc, &a.pools[PT_CACHE_SHADOW_PAGE])
        if rc == 0:
            rc = kvm_mmu_topup_memory_cache(&t.hc, 1, pt_pool_alloc, &a.pools[PT_CACHE_PAGE_HEADER])
        if rc == 0:
            return 0
        if a.rcu_head == 0:
            return rc
        synchronize_rcu(a)      # out of pages: let the pending RCU frees run


cdef void _zapper(walk_torture_t *t) noexcept nogil:
    cdef pt_arena_t *a = t.a
    cdef uint64_t z = 0, e, child, new_sp, pfn, j, t0
    cdef sptep_t rs
    cdef kvm_mmu_page *h
    cdef int i
    _barrier(&t.ready, t.nthreads)
    t0 = pt_now_ns()
    while pt_load_acquire64(&t.stop) == 0:
        i = <int>(z % <uint64_t>t.n_children)
        z += 1
        rs = t.root_spteps[i]
        e = pt_read_once64(pt_sptep_ptr(a, rs))
        child = spte_to_child_sp(a, e)
        # Unlink (drop_parent_pte / the TDP MMU's parent SPTE change), mark
        # the child invalid, then free it the way the scheme requires.
        mmu_spte_clear_no_track(a, rs)
        h = pt_sp_ptr(a, child)
        h.role = h.role | PT_ROLE_INVALID
        if not t.protect:
            pt_free_sp(a, child)
        elif t.scheme == SCHEME_SHADOW:
            kvm_mmu_commit_zap_page(a, &child, 1)
        else:
            call_rcu_free_sp(a, child)
            rcu_poll(a)
        if _refill(t) != 0:
            t.alloc_failures += 1
            break
        pt_alloc_sp(a, &t.pc, &t.hc, NULL, &new_sp)
        h = pt_sp_ptr(a, new_sp)
        h.role = PG_LEVEL_4K
        h.tdp_mmu_page = t.scheme == SCHEME_TDP
        h.ptep = rs
        pfn = h.spt
        for j in range(512):
            mmu_spte_set(a, make_sptep(pfn, <unsigned int>j), t.leaf_base | ((j + 512 * <uint64_t>i) << 12))
        mmu_spte_set(a, rs, make_nonleaf_spte(&a.fmt, pfn << 12, False))
        t.zaps += 1
    t.zapper_ns = pt_now_ns() - t0


cdef class _WalkTorture:
    cdef walk_torture_t t
    cdef PtArena arena

    def walker(self):
        with nogil:
            _walker(&self.t)

    def zapper(self):
        with nogil:
            _zapper(&self.t)

    def free_caches(self):
        kvm_mmu_free_memory_cache(&self.t.pc, pt_pool_free, &self.arena.a.pools[PT_CACHE_SHADOW_PAGE])
        kvm_mmu_free_memory_cache(&self.t.hc, pt_pool_free, &self.arena.a.pools[PT_CACHE_PAGE_HEADER])


def lockless_walk_torture(PtArena arena not None, n_walks, *, str scheme="shadow",
                          bint protect=True, int vcpu=0, int n_children=8,
                          int reads_per_walk=64, int spare_pages=160, bint pin=True):
    """Walk tables locklessly on one thread while another zaps and frees them.

    Parameters
    ----------
    arena : PtArena
    n_walks : int
        Walks done by the vCPU thread; the zapper runs until they are done.
    scheme : {"shadow", "tdp"}
        ``"shadow"``: the vCPU walks inside walk_shadow_page_lockless_begin/end
        (READING_SHADOW_PAGE_TABLES) and the zapper frees through
        kvm_mmu_commit_zap_page (remote TLB flush, waiting for the walk).
        ``"tdp"``: the vCPU is TDP-MMU active, so begin/end are RCU read-side
        sections, and the zapper frees through call_rcu + rcu_poll (64-bit
        hosts only).
    protect : bool
        False frees each unlinked table at once, skipping the flush or the
        grace period: the broken variant the protocol exists to prevent.
    vcpu, n_children, reads_per_walk : int
        The walking vCPU; tables under the root (each walk reads root entry
        ``walk % n_children`` then `reads_per_walk` entries of that child).
    spare_pages : int
        Freed pages parked first in the FIFO free list, so that a freed table
        stays poisoned for about this many zaps before it is reused.
    pin : bool
        Pin walker and zapper to different CPUs (see :func:`spte_torture`).

    Returns
    -------
    dict
        ``walks``, ``uaf`` (poisoned entries read), ``uaf_walks`` (walks that
        read at least one), ``wild`` (root entries pointing outside the
        arena), ``nonpresent_roots`` (walks that found the root entry being
        replaced), ``zaps``, ``flush_ipis_waited``, ``rcu_gps``,
        ``alloc_failures``, ``seconds``, ``scheme``, ``protect``.
    """
    if scheme not in ("shadow", "tdp"):
        raise ValueError(f"scheme must be 'shadow' or 'tdp', not {scheme!r}")
    if not 1 <= n_children <= MAX_CHILDREN:
        raise ValueError(f"n_children={n_children} is outside 1..{MAX_CHILDREN}")
    if not 0 <= reads_per_walk <= 512:
        raise ValueError(f"reads_per_walk={reads_per_walk} is outside 0..512")
    cdef _WalkTorture run = _WalkTorture()
    cdef walk_torture_t *t = &run.t
    cdef bint wrprot
    cdef int i
    was_tdp = arena.is_tdp_mmu_active(vcpu)
    arena.set_tdp_mmu_active(vcpu, scheme == "tdp")
    before = arena.stats()
    # Park spare pages (and headers) in the free lists, poisoned.
    spare = [_MmuMemoryCache(arena, kind) for kind in ("shadow_page", "page_header")
             for _ in range((spare_pages + 39) // 40)]
    for c in spare:
        c.topup(c.capacity)
    for c in spare:
        c.free()
    pc = _MmuMemoryCache(arena, "shadow_page")
    hc = _MmuMemoryCache(arena, "page_header")
    pc.topup(n_children + 1)
    hc.topup(n_children + 1)
    root = arena.alloc_sp(pc, hc, role=2, tdp_mmu_page=scheme == "tdp")
    memset(t, 0, sizeof(walk_torture_t))
    run.arena = arena
    t.a = &arena.a
    t.vcpu = vcpu
    t.scheme = SCHEME_TDP if scheme == "tdp" else SCHEME_SHADOW
    t.protect = protect
    t.n_children = n_children
    t.n_walks = n_walks
    t.reads_per_walk = reads_per_walk
    t.leaf_base = make_spte(&arena.a.fmt, PG_LEVEL_4K, ACC_ALL, 0, arena.a.fmt.nonpresent_value,
                            MKSPTE_HOST_WRITABLE, &wrprot)
    kvm_mmu_memory_cache_init(&t.pc, 2)     # small: freed pages stay poisoned longer
    kvm_mmu_memory_cache_init(&t.hc, 2)
    for i in range(n_children):
        child = arena.alloc_sp(pc, hc, role=1, tdp_mmu_page=scheme == "tdp")
        for j in range(512):
            arena.mmu_spte_set(arena.sp_sptep(child, j), t.leaf_base | ((j + 512 * i) << 12))
        t.root_spteps[i] = arena.sp_sptep(root, i)
        arena.set_sp(child, ptep=t.root_spteps[i])
        arena.mmu_spte_set(t.root_spteps[i], make_nonleaf_spte(&arena.a.fmt, arena.sp_pa(child), False))
    pc.free()
    hc.free()
    t.nthreads = 2
    cpus = _run_threads([("walker", run.walker), ("zapper", run.zapper)], pin)
    # Teardown: nothing walks any more.
    run.free_caches()
    arena.rcu_barrier()
    zap = []
    for i in range(n_children):
        child = arena.spte_to_child_sp(arena.spt(root)[i])
        arena.mmu_spte_clear_no_track(t.root_spteps[i])
        arena.set_sp(child, role=1 | PT_ROLE_INVALID)
        zap.append(child)
    arena.set_sp(root, role=2 | PT_ROLE_INVALID)
    arena.kvm_mmu_commit_zap_page(zap + [root])
    arena.set_tdp_mmu_active(vcpu, was_tdp)
    after = arena.stats()
    return dict(
        scheme=scheme, protect=protect, walks=t.walks, uaf=t.uaf, uaf_walks=t.uaf_walks,
        wild=t.wild, nonpresent_roots=t.nonpresent_roots, zaps=t.zaps,
        alloc_failures=t.alloc_failures, seconds=t.walker_ns / 1e9,
        flush_ipis_waited=after["flush_ipis_waited"] - before["flush_ipis_waited"],
        rcu_gps=after["rcu_gps"] - before["rcu_gps"], cpus=cpus,
    )
