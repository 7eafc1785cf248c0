# Shared C-level types of the kvmmmu core.  No .pyx: cimport only.
#
# SPTE locations ("sptep").  The kernel names an SPTE by its address; rmaps
# and parent lists store that address, and the low bits of an rmap head are
# free for flags because SPTEs are 8-byte aligned.  kvmmmu keeps the same
# shape: a page-table page has a pfn in the model's host physical space, and
#
#     sptep = (table_pfn << 12) | (index << 3)       index = 0..511
#
# is the SPTE's host physical byte address.  So, as in the kernel:
#   * sptep & 7 == 0, and sptep != 0 (pfn 0 is never a page table);
#   * spte_index(sptep) = (sptep >> 3) & 511;
#   * a non-leaf SPTE pointing at that table holds table_pfn << 12, and the
#     kvm_mmu_set_spte tracepoint's "at %llx" prints sptep.
from libc.stdint cimport uint64_t

ctypedef uint64_t sptep_t

cdef inline sptep_t make_sptep(uint64_t table_pfn, unsigned int index) noexcept nogil:
    return (table_pfn << 12) | (<uint64_t>(index & 511) << 3)

cdef inline uint64_t sptep_table_pfn(sptep_t sptep) noexcept nogil:
    return sptep >> 12

cdef inline unsigned int spte_index(sptep_t sptep) noexcept nogil:
    return <unsigned int>((sptep >> 3) & 511)
