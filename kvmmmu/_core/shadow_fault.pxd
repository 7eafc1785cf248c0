# See shadow_fault.pyx for details.
#
# The shadow MMU's fault hot path in C: FNAME(fetch) and direct_map over the
# shadow pages that already exist, mmu_set_spte / make_spte with the kernel's
# unsync and flush rules, rmap_add into the memslot's rmap, and the 8-entry
# prefetch (FNAME(pte_prefetch), direct_pte_prefetch), for
# kvmmmu/shadow_mmu.py.  Whatever needs the Python model (a new shadow page,
# an unsync decision over shadowed gfns, MMIO, a huge page, a full rmap) is
# declined before anything changes: SF_DECLINE, and the Python path does the
# whole step as before.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

from kvmmmu._core.types cimport sptep_t
from kvmmmu._core.pt_arena cimport PtArena, pt_arena_t
from kvmmmu._core.rmap cimport kvm_rmap_slot, pte_list_desc_pool
from kvmmmu._core.memcache cimport kvm_mmu_memory_cache
from kvmmmu._core.spte cimport rsvd_bits_validate
from kvmmmu._core.trace_buf cimport trace_buf_t
from kvmmmu._core.guest_walk cimport gw_mem_t, gw_slot_t, gw_mmu_t

cdef enum:
    SF_DECLINE = -1000          # nothing changed: take the Python path
    SF_NO_RESUME = -1           # prefetch finished in C


# One memslot as the C path sees it (kvm_memory_slot + its arch part and the
# host mapping behind it).  Every pointer comes with its length, checked by
# the builder; NULL: that part is not available to C (the C path declines
# whatever would need it).
ctypedef struct sf_slot_t:
    uint64_t base_gfn
    uint64_t npages
    uint64_t flags
    uint64_t userspace_addr
    kvm_rmap_slot *rmap              # slot->arch.rmap (NULL: none yet)
    pte_list_desc_pool *pool         # its descriptor pool
    uint64_t *pool_gen               # the pool's Python-visible change counter
    uint64_t *dirty_bitmap           # (npages + 63) / 64 words, or NULL
    uint16_t *wtrack                 # gfn_write_track[npages], or NULL
    bint wtrack_opaque               # a gfn_write_track C cannot view (Python answers)
    uint32_t *lpage2m                # lpage_info[PG_LEVEL_2M - 2], or NULL
    uint64_t lpage2m_n
    # The host VMA holding the whole slot, when it maps 4K pages only
    # (no THP, no hugetlb): pte flags and pfns from vma_start on.
    uint8_t *hpte
    uint64_t *hpfn
    uint64_t vma_start
    uint64_t vma_npages


# The part of struct kvm_page_fault (plus the guest walker, the vCPU and the
# VM flags) the fetch reads, and what it reports back.
ctypedef struct sf_fault_t:
    uint64_t addr
    uint64_t gfn
    uint64_t pfn
    bint write
    bint prefetch
    bint map_writable
    bint strict                      # decline RET_PF_WRITE_PROTECTED (batch)
    bint nx_huge_pages               # is_nx_huge_page_enabled(kvm)
    bint wtrack_enabled              # kvm_page_track_write_tracking_enabled(kvm)
    bint one_as                      # no SMM address space holds memslots
    bint invalidate_in_progress      # mmu_invalidate_in_progress
    int64_t indirect_shadow_pages
    uint32_t access                  # pte_access of the leaf (ACC_ALL for direct)
    # Shadow paging: the guest walker of a 4K guest leaf.
    bint indirect
    int top_level                    # level of the first gPTE re-read
    int gpte_size                    # 4 or 8
    uint64_t ptes[5]
    uint64_t pte_gpa[5]
    uint64_t table_gfn[5]
    # Where the walk starts: a table (sp handle) at root_level.
    uint64_t root_sp
    int root_level
    # Out.
    bint wf_to_spt                   # write_fault_to_shadow_pgtable
    bint flush                       # a remote TLB flush is owed (mmu_set_spte)
    sptep_t sptep
    int prefetch_resume              # SF_NO_RESUME, or the entry Python resumes at
    bint direct_prefetch_py          # direct_pte_prefetch is left to Python
    uint64_t gptes[8]
