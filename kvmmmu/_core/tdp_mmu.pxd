# The C half of the TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c): the SPTE setters and
# the change handler every path goes through, the fault-time map, leaf and
# root zaps, over a page-table arena and struct tdp_iter (tdp_iter.pxd).
# Bodies in tdp_mmu.pyx.
from libc.stdint cimport uint64_t, int64_t, uint32_t, uint8_t

from kvmmmu._core.types cimport sptep_t
from kvmmmu._core.pt_arena_defs cimport pt_arena_t
from kvmmmu._core.memcache cimport kvm_mmu_memory_cache
from kvmmmu._core.spte cimport spte_fmt_t
from kvmmmu._core.tdp_iter cimport tdp_iter, tdp_resched

cdef enum:
    # WARN_ON_ONCE / KVM_BUG_ON sites of tdp_mmu.c, counted per site.
    TDP_WARN_BAD_LEVEL_OR_GFN = 0   # handle_changed_spte: level outside 1..5 or gfn unaligned
    TDP_BUG_PFN_CHANGED = 1         # handle_changed_spte: a present leaf changed pfn (BUG())
    TDP_WARN_NONPRESENT_CHANGE = 2  # non-present -> non-present that is neither MMIO nor FROZEN
    TDP_WARN_SET_YIELDED = 3        # an atomic set on a yielded iterator or a FROZEN old value
    TDP_WARN_SET_FROZEN = 4         # a non-atomic set from or to FROZEN
    TDP_WARN_CHILD_NOT_TABLE = 5    # a non-leaf SPTE whose target is not a table of the arena
    TDP_WARN_MAP_LEVEL = 6          # map: target entry not at goal_level
    TDP_WARN_SPURIOUS_PFN = 7       # spurious fault on a leaf with another pfn
    TDP_WARN_WRITABLE_INVARIANT = 8 # check_spte_writable_invariants(new leaf)
    TDP_WARN_NX_RECOVER = 9         # a listed page that is not a flagged TDP table
    TDP_WARN_FROZEN_IN_REMOVED = 10 # handle_removed_pt met FROZEN / its table freed meanwhile
    # The mirror (TDX) sites: KVM_BUG_ON, so each also bugs the VM (through the hooks).
    TDP_BUG_MIRROR_ZAP_ATOMIC = 11  # an atomic (read-lock) change of a mirror SPTE to non-present
    TDP_BUG_MIRROR_WAS_PRESENT = 12 # set_external_spte_present over a present mirror SPTE
    TDP_BUG_MIRROR_SET_PRESENT = 13 # tdp_mmu_set_spte (write lock) of a present mirror value
    TDP_BUG_MIRROR_SHARED_PT = 14   # handle_removed_pt of a mirror table under the read lock
    TDP_BUG_MIRROR_HUGE = 15        # a mirror huge leaf met by the fault path (no private huge pages)
    TDP_BUG_NO_EXTERNAL_SPT = 16    # a mirror table linked without its external_spt page
    TDP_BUG_REMOVE_EXTERNAL = 17    # remove_external_spte failed (v6.18: KVM_BUG_ON(ret))
    TDP_WARN_FREE_EXTERNAL_SPT = 18 # free_external_spt failed: the S-EPT page is leaked (WARN_ON)
    TDP_NR_WARN = 19

    # The kvm_x86_ops calls of the mirror path (tdp_mmu_t.ext_ops), with their arguments.
    EXT_LINK_SPT = 0                # link_external_spt(gfn, level, the child's external_spt)
    EXT_SET_SPTE = 1                # set_external_spte(gfn, level, new mirror SPTE)
    EXT_REMOVE_SPTE = 2             # remove_external_spte(gfn, level, old mirror SPTE)
    EXT_FREE_SPT = 3                # free_external_spt(gfn, level, the table's external_spt)
    EXT_ALLOC_SPT = 4               # kvm_mmu_alloc_external_spt(vcpu, sp): the page's pfn
    EXT_FREE_PAGE = 5               # tdp_mmu_free_sp of a never-linked mirror table: free page `arg`
    EXT_BUG = 6                     # KVM_BUG_ON at site `arg` (a TDP_* index)


# struct kvm's TDP MMU part, for one arena.
ctypedef struct tdp_mmu_t:
    pt_arena_t *a
    const spte_fmt_t *f
    int64_t tdp_mmu_pages           # kvm->arch.tdp_mmu_pages: linked non-root tables
    uint64_t nr_flushes             # TLB flushes asked for by the map path (gfn-ranged)
    uint64_t nx_head_next           # possible_nx_huge_pages: first sp + 1 (1: empty; 0: unused)
    uint64_t nx_head_prev           # last sp + 1
    int64_t nx_lpage_splits         # kvm->stat.nx_lpage_splits
    uint64_t warn[TDP_NR_WARN]
    # kvm->arch.tdp_mmu_pages_lock: the possible-NX list and the flag of each
    # listed page, when mmu_lock is held for read (several threads map).
    uint32_t nx_lock
    tdp_resched resched             # need_resched() of the yielding loops (every = 0: never)
    uint64_t nr_yield_flushes       # kvm_flush_remote_tlbs() done before a yield that owed one
    # The external hooks of a VM with mirror roots (TDX): a Python callable
    # ext_ops(op, gfn, level, arg) -> int, borrowed (TdpMmuCore keeps the
    # reference); NULL for every other VM.  Called with the GIL taken.
    void *ext_ops


# The part of struct kvm_page_fault the map path reads.
ctypedef struct tdp_fault:
    uint64_t gfn
    uint64_t pfn                    # aligned to goal_level by the caller
    int goal_level
    int req_level
    bint write
    bint exec
    bint prefetch
    bint map_writable
    bint huge_page_disallowed
    bint nx_huge_pages              # is_nx_huge_page_enabled(kvm)
    bint noslot                     # no memslot: install an MMIO SPTE
    uint64_t mmio_gen               # the memslot generation it carries
    # Leaves this fault (or batch pass) created, per level 4K..1G, not yet in
    # kvm->stat.pages: the map path counts them here and adds them once
    # (tdp_fault_flush_stats), so threads mapping at once do not bounce the
    # counters' cache line on every leaf.  Zero before use.
    int64_t pages_delta[3]


# One batch of guest accesses (TdpMmu.guest_access -> TdpMmuCore.guest_access_batch):
# the arrays belong to the GuestAccessBatch object (private copies / outputs).
cdef enum:
    GA_DONE = 0                     # every access completed
    GA_SLOW = 1                     # stopped at an exit the caller must take (scalar path)
    GA_GIVE_UP = 2                  # stopped at an access that took max_faults exits already
    GA_UNEXPECTED = 3               # stopped: a fault mapped here answered c_last_ret (no RET_PF_
                                    # FIXED, SPURIOUS or RETRY): the caller reports it
    GA_CLASS_NOFAST = 1             # gclass: an exit here always goes to the caller
    GA_CLASS_LOGGED = 2             # gclass: the gfn's memslot has KVM_MEM_LOG_DIRTY_PAGES
    GA_CLASS_SLOW = 4               # gclass: a plain memslot wholly in one 4K-only VMA: a
                                    # not-present exit may be mapped here (slot_* arrays)
    GA_MADE_WRITABLE = 1            # flags: a fault made a writable leaf (mark_page_dirty)
    GA_DIRTIED = 2                  # flags: the CPU set D from 0 (what PML logs)
    GA_PFERR_PRESENT = 1
    GA_PFERR_WRITE = 2
    GA_PFERR_USER = 4
    GA_PFERR_FETCH = 16

ctypedef struct ga_batch:
    const uint64_t *gfns
    const uint8_t *gclass
    uint8_t *faults                 # exits per access so far
    uint8_t *flags                  # GA_MADE_WRITABLE | GA_DIRTIED per access
    Py_ssize_t n
    bint write
    const uint8_t *writes           # per access: 1 a write, 0 a read (NULL: all `write`)
    bint exec
    int max_faults
    int vcpu_id                     # for the fast_page_fault tracepoint
    int64_t nr_fast                 # exits fixed here (each: pf_taken, pf_fast, pf_fixed)
    Py_ssize_t c_last_idx           # the access of the last exit fixed here (-1: none)
    uint64_t c_last_ec              # ... and its error code
    int c_last_ret                  # the stop access's last exit's RET_PF_* if it was taken here
    # The slow path of a not-present exit on a GA_CLASS_SLOW gfn (kvm_tdp_page_fault's
    # faultin of a present 4K host page, then kvm_tdp_mmu_map at 4K), per slot index
    # k = sidx[i]: the host PTE flags and pfns of the slot's first page on.
    const int *sidx
    uint8_t **slot_pte
    const uint64_t **slot_pfn
    const uint64_t *slot_base
    bint slow_ok                    # this pass may map (the caller checked the rest)
    bint exits_ok                   # this pass may take exits at all (not: a bugged VM)
    bint nx_huge_pages              # fault->nx_huge_page_workaround_enabled
    kvm_mmu_memory_cache *pc
    kvm_mmu_memory_cache *hc
    int64_t nr_slow                 # exits mapped here (pf_taken each)
    int64_t nr_slow_fixed           # ... that answered RET_PF_FIXED (pf_fixed)
    int64_t nr_slow_spurious        # ... RET_PF_SPURIOUS (pf_spurious)
    bint c_last_slow                # the last exit taken here was a mapped one ...
    uint64_t c_last_pfn             # ... of this host pfn
    bint c_last_writable            # ... map_writable
    Py_ssize_t c_last_slow_idx      # the access of the last mapped exit (-1: none)


cdef int tdp_guest_access(tdp_mmu_t *m, uint64_t root, ga_batch *b,
                          Py_ssize_t *pos) noexcept nogil

cdef void handle_changed_spte(tdp_mmu_t *m, int as_id, uint64_t gfn, uint64_t old_spte,
                              uint64_t new_spte, int level, bint shared) noexcept nogil
cdef void handle_removed_pt(tdp_mmu_t *m, uint64_t sp, bint shared) noexcept nogil
# Zap everything under `root` with the atomic setter (mmu_lock held for read:
# kvm_tdp_mmu_zap_invalidated_roots(shared=true)), retrying lost races.
cdef void tdp_mmu_zap_root_shared(tdp_mmu_t *m, uint64_t root) noexcept nogil
cdef int tdp_mmu_set_spte_atomic(tdp_mmu_t *m, tdp_iter *it, uint64_t new_spte) noexcept nogil
cdef uint64_t tdp_mmu_set_spte(tdp_mmu_t *m, int as_id, sptep_t sptep, uint64_t old_spte,
                               uint64_t new_spte, uint64_t gfn, int level) noexcept nogil
cdef int kvm_tdp_mmu_map(tdp_mmu_t *m, uint64_t root, tdp_fault *fault,
                         kvm_mmu_memory_cache *page_cache,
                         kvm_mmu_memory_cache *header_cache) noexcept nogil
cdef bint tdp_mmu_zap_leafs(tdp_mmu_t *m, uint64_t root, uint64_t start, uint64_t end,
                            bint flush) noexcept nogil
cdef void tdp_mmu_zap_root(tdp_mmu_t *m, uint64_t root) noexcept nogil
cdef bint kvm_tdp_mmu_age_gfn_range(tdp_mmu_t *m, uint64_t root, uint64_t start, uint64_t end,
                                    bint test_only) noexcept nogil
cdef bint kvm_tdp_mmu_clear_bit_range(tdp_mmu_t *m, uint64_t root, uint64_t start, uint64_t end,
                                      int min_level, uint64_t bit) noexcept nogil
cdef uint64_t kvm_tdp_mmu_clear_dirty_pt_masked(tdp_mmu_t *m, uint64_t root, uint64_t gfn,
                                                uint64_t mask, uint64_t dbit) noexcept nogil
cdef int tdp_mmu_split_huge_pages_root(tdp_mmu_t *m, uint64_t root, uint64_t start,
                                       uint64_t end, int target_level,
                                       kvm_mmu_memory_cache *page_cache,
                                       kvm_mmu_memory_cache *header_cache,
                                       bint nx_huge_pages, uint64_t *resume,
                                       uint64_t *huge_spte, int *huge_level,
                                       int64_t *nr) noexcept nogil
cdef int64_t kvm_tdp_mmu_recover_huge_pages(tdp_mmu_t *m, uint64_t root, uint64_t base_gfn,
                                            uint64_t npages, const signed char *max_level,
                                            bint nx_huge_pages) noexcept nogil
cdef void track_possible_nx_huge_page(tdp_mmu_t *m, uint64_t sp) noexcept nogil
cdef void untrack_possible_nx_huge_page(tdp_mmu_t *m, uint64_t sp) noexcept nogil
