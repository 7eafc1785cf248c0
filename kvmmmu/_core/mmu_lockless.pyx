"""Remote TLB flushes and the model's RCU: how freeing waits out the
lockless walkers (mmu.c kvm_flush_remote_tlbs / kvm_mmu_commit_zap_page,
tdp_mmu.c call_rcu / tdp_mmu_free_sp_rcu_callback).

Shadow MMU: a walker sits in READING_SHADOW_PAGE_TABLES with IRQs off, so the
flush IPI (KVM_REQUEST_WAIT) completes only when the walk ends; pages are
freed after the flush.  TDP MMU: walkers are RCU readers; an unlinked page is
freed once a grace period has passed (every reader that predates it left).
The protocols' reader halves (walk_shadow_page_lockless_begin/end,
kvm_tdp_mmu_walk_lockless_begin/end) are cdef inline in mmu_lockless.pxd:
they bracket every lockless walk; a thread holding the arena's shared side
(TDP MMU faults under mmu_lock for read) is a reader too, in its own
shared_rcu slot (pt_shared_rcu_lock), and call_rcu / rcu_poll run under
rcu_lock so they may run beside it.  The plain C waits here spin until done;
PtArena's Python methods wait with the _within / _wait_word_change slices
instead, so that a walker whose thread died is detected.
"""
from libc.stdint cimport uint64_t, int64_t

from kvmmmu._core.pt_arena_defs cimport (
    OUTSIDE_GUEST_MODE, IN_GUEST_MODE, EXITING_GUEST_MODE, PT_ROLE_INVALID, PT_SP_RCU_PENDING,
    PT_WARN_COMMIT_ZAP, kvm_mmu_page, kvm_vcpu_lockless, pt_arena_t, pt_slot, pt_sp_ptr,
    pt_smp_mb, pt_cpu_relax, pt_yield, pt_load_acquire64, pt_store_mb64, pt_try_cmpxchg64,
    pt_now_ns, pt_spin_lock, pt_spin_unlock, pt_atomic_add_u64, PT_NR_SHARED,
)
from kvmmmu._core.pt_pool cimport pt_free_sp



cdef inline void _spin(uint64_t *spins) noexcept nogil:
    spins[0] += 1
    if (spins[0] & 1023) == 0:
        pt_yield()
    else:
        pt_cpu_relax()


cdef int kvm_flush_remote_tlbs(pt_arena_t *a) noexcept nogil:
    cdef int i, waited = 0
    cdef bint ipi = False
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
        ipi = True                  # kvm_request_needs_ipi() for a KVM_REQUEST_WAIT request
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
    if ipi:
        # kvm_make_all_cpus_request() reports an IPI sent: only then does
        # kvm_flush_remote_tlbs() count remote_tlb_flush (with one vCPU, or
        # every other vCPU outside guest mode, it stays put)
        a.remote_tlb_flush += 1
    a.flush_ipis_waited += waited
    return waited


cdef void kvm_mmu_commit_zap_page(pt_arena_t *a, const uint64_t *sps, Py_ssize_t n) noexcept nogil:
    if n == 0:
        return
    kvm_flush_remote_tlbs(a)
    _free_zapped(a, sps, n)


cdef bint _wait_word_change(const uint64_t *p, uint64_t w, uint64_t ns) noexcept nogil:
    """Spin until *p != w (True) or `ns` nanoseconds passed (False)."""
    cdef uint64_t spins = 0, end = pt_now_ns() + ns
    while pt_load_acquire64(p) == w:
        _spin(&spins)
        if (spins & 255) == 0 and pt_now_ns() >= end:
            return False
    return True


cdef bint _rcu_finish_within(pt_arena_t *a, uint64_t ns) noexcept nogil:
    """Try to finish the grace period in progress for up to `ns` ns."""
    cdef uint64_t spins = 0, end = pt_now_ns() + ns
    while not _rcu_try_finish_gp(a):
        _spin(&spins)
        if (spins & 255) == 0 and pt_now_ns() >= end:
            return False
    return True


cdef void _free_zapped(pt_arena_t *a, const uint64_t *sps, Py_ssize_t n) noexcept nogil:
    """The freeing half of kvm_mmu_commit_zap_page (after the flush)."""
    cdef Py_ssize_t i
    cdef kvm_mmu_page *h
    for i in range(n):
        h = pt_sp_ptr(a, sps[i])
        if not (h.role & PT_ROLE_INVALID) or h.root_count:
            a.warn[PT_WARN_COMMIT_ZAP] += 1
        pt_free_sp(a, sps[i])


cdef void call_rcu_free_sp(pt_arena_t *a, uint64_t sp) noexcept nogil:
    # Callers may run on several threads at once (handle_removed_pt under
    # mmu_lock held for read): the queue and the cookie are under rcu_lock.
    cdef kvm_mmu_page *h = pt_sp_ptr(a, sp)
    pt_spin_lock(&a.rcu_lock)
    h.rcu_gp = a.rcu_gp_seq
    h.rcu_next = 0
    pt_slot(a, sp - 1).sp_state = PT_SP_RCU_PENDING
    pt_atomic_add_u64(&a.n_sps, <uint64_t>-1)
    pt_atomic_add_u64(&a.n_rcu_pending, 1)
    if a.rcu_tail:
        pt_sp_ptr(a, a.rcu_tail).rcu_next = sp
    else:
        a.rcu_head = sp
    a.rcu_tail = sp
    pt_spin_unlock(&a.rcu_lock)


cdef void _rcu_start_gp(pt_arena_t *a) noexcept nogil:
    # Callbacks queued so far carry cookies <= target; readers that start
    # after this store see target + 1 and are not waited for.
    a.rcu_gp_target = a.rcu_gp_seq
    pt_store_mb64(&a.rcu_gp_seq, a.rcu_gp_target + 1)
    a.rcu_gp_in_progress = True


cdef int64_t _rcu_do_callbacks(pt_arena_t *a) noexcept nogil:
    # Pops under rcu_lock (call_rcu may append at the same time), frees
    # outside it.
    cdef int64_t freed = 0
    cdef uint64_t sp
    cdef kvm_mmu_page *h
    while True:
        pt_spin_lock(&a.rcu_lock)
        sp = a.rcu_head
        if sp == 0 or pt_sp_ptr(a, sp).rcu_gp > a.rcu_completed:
            pt_spin_unlock(&a.rcu_lock)
            return freed
        h = pt_sp_ptr(a, sp)
        a.rcu_head = h.rcu_next
        if a.rcu_head == 0:
            a.rcu_tail = 0
        pt_spin_unlock(&a.rcu_lock)
        pt_free_sp(a, sp)           # tdp_mmu_free_sp_rcu_callback
        freed += 1


cdef inline bint _rcu_try_finish_gp(pt_arena_t *a) noexcept nogil:
    # Every reader: the vCPUs' lockless walks and the threads holding the
    # shared side (their map / zap walks are RCU read-side sections).
    cdef int i
    cdef uint64_t c
    pt_smp_mb()
    for i in range(a.nr_vcpus):
        c = pt_load_acquire64(&a.vcpus[i].rcu_gp)
        if c != 0 and c <= a.rcu_gp_target:
            return False
    for i in range(PT_NR_SHARED):
        c = pt_load_acquire64(&a.shared_rcu[i])
        if c != 0 and c <= a.rcu_gp_target:
            return False
    a.rcu_completed = a.rcu_gp_target
    a.rcu_gp_in_progress = False
    a.rcu_gps += 1
    return True


cdef int64_t rcu_poll(pt_arena_t *a) noexcept nogil:
    # Callable beside holders of the shared side (the kernel runs RCU
    # callbacks whatever mmu_lock does): the grace-period step under rcu_lock.
    cdef bint due = True
    pt_spin_lock(&a.rcu_lock)
    if not a.rcu_gp_in_progress:
        if a.rcu_head == 0:
            due = False
        elif pt_sp_ptr(a, a.rcu_head).rcu_gp > a.rcu_completed:
            _rcu_start_gp(a)
    if due and a.rcu_gp_in_progress and not _rcu_try_finish_gp(a):
        due = False
    pt_spin_unlock(&a.rcu_lock)
    if not due:
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
