# Remote TLB flush, RCU and the lockless-walk protocols (mmu_lockless.pyx).
# All require the writer side (mmu_lock) except the walk begin/end helpers
# (inline, at the end), which a lockless reader calls for its own vCPU.
from libc.stdint cimport uint64_t, int64_t
from kvmmmu._core.pt_arena_defs cimport (
    OUTSIDE_GUEST_MODE, READING_SHADOW_PAGE_TABLES, kvm_vcpu_lockless, pt_arena_t, pt_smp_mb,
    pt_read_once64, pt_load_acquire64, pt_write_once64, pt_store_release64, pt_store_mb64,
)

# kvm_flush_remote_tlbs (KVM_REQ_TLB_FLUSH carries KVM_REQUEST_WAIT): returns
# how many vCPUs it had to wait for.
cdef int kvm_flush_remote_tlbs(pt_arena_t *a) noexcept nogil
# kvm_mmu_commit_zap_page: flush (waiting out every shadow-MMU walker), then free.
cdef void kvm_mmu_commit_zap_page(pt_arena_t *a, const uint64_t *sps, Py_ssize_t n) noexcept nogil
# call_rcu(&sp->rcu_head, tdp_mmu_free_sp_rcu_callback).
cdef void call_rcu_free_sp(pt_arena_t *a, uint64_t sp) noexcept nogil
# One non-blocking step of the model's RCU: start a grace period if callbacks
# wait, finish it if every reader that predates it has left; returns the
# number of sps freed.
cdef int64_t rcu_poll(pt_arena_t *a) noexcept nogil
# synchronize_rcu(): wait for a full grace period, then run due callbacks.
cdef void synchronize_rcu(pt_arena_t *a) noexcept nogil
# rcu_barrier(): wait until every pending callback has run.
cdef void rcu_barrier(pt_arena_t *a) noexcept nogil

# Building blocks of PtArena's bounded waits.
# The freeing half of kvm_mmu_commit_zap_page (after the flush).
cdef void _free_zapped(pt_arena_t *a, const uint64_t *sps, Py_ssize_t n) noexcept nogil
# Spin until *p != w (True) or `ns` nanoseconds passed (False).
cdef bint _wait_word_change(const uint64_t *p, uint64_t w, uint64_t ns) noexcept nogil
# Try to finish the grace period in progress for up to `ns` nanoseconds.
cdef bint _rcu_finish_within(pt_arena_t *a, uint64_t ns) noexcept nogil
# Start a grace period / run the callbacks that are due.
cdef void _rcu_start_gp(pt_arena_t *a) noexcept nogil
cdef int64_t _rcu_do_callbacks(pt_arena_t *a) noexcept nogil

# The reader halves, for the calling walker's own vCPU.  Inline on purpose
# (each is two or three stores and a barrier around every lockless walk): out
# of line they added about 1 ns to every walk (a 4-SPTE nogil walk on a 64-bit
# host, 6.7 -> 7.7 ns; same-machine A/B of a consumer loop).
# TDP MMU: rcu_read_lock() / rcu_read_unlock(), nesting.  Shadow MMU: IRQs off
# + READING_SHADOW_PAGE_TABLES, so a remote TLB flush waits for the walk; end
# acknowledges a pending flush.  A vCPU on the TDP MMU takes the RCU halves.
cdef inline void kvm_tdp_mmu_walk_lockless_begin(pt_arena_t *a, int vcpu) noexcept nogil:
    """rcu_read_lock(): publish the grace-period sequence seen, then a full
    barrier so no SPTE load of the walk is performed before it is visible."""
    cdef kvm_vcpu_lockless *v = &a.vcpus[vcpu]
    if v.rcu_nesting == 0:
        pt_write_once64(&v.rcu_gp, pt_load_acquire64(&a.rcu_gp_seq))
        pt_smp_mb()
    v.rcu_nesting += 1

cdef inline void kvm_tdp_mmu_walk_lockless_end(pt_arena_t *a, int vcpu) noexcept nogil:
    """rcu_read_unlock(): release, so every SPTE load completes first."""
    cdef kvm_vcpu_lockless *v = &a.vcpus[vcpu]
    v.rcu_nesting -= 1
    if v.rcu_nesting == 0:
        pt_store_release64(&v.rcu_gp, 0)

# The same pair for a thread holding the arena's shared side (TDP MMU map
# and shared zaps under mmu_lock held for read: rcu_read_lock() around the
# walk), in its own slot of pt_arena_t.shared_rcu.  Not nested.
cdef inline void pt_shared_rcu_lock(pt_arena_t *a, int slot) noexcept nogil:
    pt_write_once64(&a.shared_rcu[slot], pt_load_acquire64(&a.rcu_gp_seq))
    pt_smp_mb()

cdef inline void pt_shared_rcu_unlock(pt_arena_t *a, int slot) noexcept nogil:
    pt_store_release64(&a.shared_rcu[slot], 0)

cdef inline void walk_shadow_page_lockless_begin(pt_arena_t *a, int vcpu) noexcept nogil:
    """Shadow MMU: local_irq_disable(), then smp_store_mb(mode, READING)."""
    cdef kvm_vcpu_lockless *v = &a.vcpus[vcpu]
    if v.tdp_mmu_active:
        kvm_tdp_mmu_walk_lockless_begin(a, vcpu)
        return
    v.irqs_disabled = 1
    pt_store_mb64(&v.mode, (pt_read_once64(&v.mode) & ~(<uint64_t>3)) | READING_SHADOW_PAGE_TABLES)

cdef inline void walk_shadow_page_lockless_end(pt_arena_t *a, int vcpu) noexcept nogil:
    """Shadow MMU: smp_store_release(mode, OUTSIDE), then local_irq_enable()
    (a pending flush IPI is acknowledged at this point: the walk sequence
    in the mode word moves on)."""
    cdef kvm_vcpu_lockless *v = &a.vcpus[vcpu]
    cdef uint64_t w
    if v.tdp_mmu_active:
        kvm_tdp_mmu_walk_lockless_end(a, vcpu)
        return
    w = pt_read_once64(&v.mode)
    pt_store_release64(&v.mode, (((w >> 2) + 1) << 2) | OUTSIDE_GUEST_MODE)
    v.irqs_disabled = 0
    v.nr_walks += 1
