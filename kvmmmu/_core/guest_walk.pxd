# See guest_walk.pyx for details.
#
# The guest page-table walker of KVM x86 (Linux v6.18 paging_tmpl.h,
# FNAME(walk_addr_generic)) as one C loop that serves the three PTTYPE
# instantiations: 32 (2-level, 4-byte entries), 64 (PAE, 4- and 5-level) and
# EPT (L1's EPT tables).  Other Cython modules do
#
#     from kvmmmu._core.guest_walk cimport gw_mmu_t, guest_walker_t, walk_addr_generic
#
# and fill a gw_mmu_t themselves; Python code goes through kvmmmu.paging.

from kvmmmu._core.trace_buf cimport trace_buf_t
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from kvmmmu._core.spte cimport rsvd_bits_validate

# PTTYPE values (the kernel uses 32, 64 and an arbitrary 18 for EPT).
cdef enum:
    PTTYPE_32 = 32
    PTTYPE_64 = 64
    PTTYPE_EPT = 18

# walk_addr_generic() return values.
cdef enum:
    GW_FAULT = 0                 # walker.fault holds the fault
    GW_OK = 1                    # translation in walker.gfn
    GW_ENOMEM = -1               # a trace record could not be stored: no memory


ctypedef struct gw_slot_t:
    # One memslot of guest memory.
    uint64_t base_gfn            # first gfn
    uint64_t npages              # number of 4 KiB pages (> 0)
    uint8_t *hva                 # byte 0 of base_gfn; valid for npages << 12 bytes
    bint writable                # !KVM_MEM_READONLY (gfn_to_hva_memslot_prot's *writable)


ctypedef struct gw_mem_t:
    # Guest memory: memslots that do not overlap, in any order.  A gfn that no
    # slot covers is a hole (!kvm_is_visible_memslot).
    gw_slot_t *slots
    int nslots
    int last                     # index of the slot that answered last (a cache)


ctypedef struct gw_mmu_t:
    # The parts of struct kvm_mmu (plus vCPU state) the walker reads.
    int pttype                   # PTTYPE_32 / PTTYPE_64 / PTTYPE_EPT
    int root_level               # cpu_role.base.level: 0 (paging off), 2, 3, 4, 5
    uint64_t pgd                 # get_guest_pgd(): CR3, or the EPTP
    uint64_t pdptrs[4]           # PAE: the PDPTE registers loaded at CR3 load
    bint have_ad                 # PT_HAVE_ACCESSED_DIRTY (EPT: EPTP bit 6)
    bint efer_nx                 # cpu_role.base.efer_nx
    bint cr4_smep                # cpu_role.ext.cr4_smep
    bint cr4_pse                 # cpu_role.ext.cr4_pse
    bint rflags_ac               # RFLAGS.AC
    bint is_walk_mmu             # this MMU is vcpu->arch.walk_mmu (else faults are nested)
    uint32_t pkru                # vcpu->arch.pkru
    uint32_t pkru_mask           # mmu->pkru_mask (update_pkru_bitmask)
    uint8_t permissions[16]      # mmu->permissions (update_permission_bitmask)
    rsvd_bits_validate rsvd      # mmu->guest_rsvd_check
    gw_mem_t *mem                # guest memory (L1 physical for the nested case)
    gw_mmu_t *nested             # vcpu->arch.mmu when this is nested_mmu: translates
                                 # L2 GPAs (kvm_translate_gpa); NULL otherwise
    trace_buf_t *trace           # where events go (the calling walk's own buffer); never NULL


ctypedef struct guest_walker_t:
    # struct guest_walker, indexed [level - 1] like the kernel's arrays.
    int level                    # level of the leaf (or where the walk stopped)
    int max_level                # first level read from memory (2 for PAE)
    uint64_t table_gfn[5]        # gfn of the table read at each level (untranslated)
    uint64_t ptes[5]             # entry at each level (after A/D write-back)
    uint64_t pte_gpa[5]          # gpa of the entry at each level (untranslated)
    uint8_t *ptep[5]             # where the entry lives in host memory
    bint pte_writable[5]         # the table's memslot is writable
    uint32_t pt_access[5]        # ACC_* of the levels above each level
    uint32_t pte_access          # ACC_* of the whole walk (protect_clean_gpte applied)
    uint64_t gfn                 # result: real gfn
    int retries                  # walks restarted because an entry changed under cmpxchg
    uint8_t ad_written           # bit level-1: this walk wrote A/D into that level's entry
    # struct x86_exception (valid when walk_addr_generic returned GW_FAULT)
    uint16_t error_code
    bint nested_page_fault
    uint64_t address
    uint64_t exit_qualification  # EPT template only, and only without RSVD


cdef int walk_addr_generic(gw_mmu_t *mmu, guest_walker_t *w, uint64_t addr,
                           uint64_t access) noexcept nogil
