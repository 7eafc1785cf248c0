PAGE_SHIFT: int
PAGE_SIZE: int
SPTE_LEVEL_BITS: int
SPTE_ENT_PER_PAGE: int
PG_LEVEL_NONE: int
PG_LEVEL_4K: int
PG_LEVEL_2M: int
PG_LEVEL_1G: int
PG_LEVEL_512G: int
PG_LEVEL_256T: int
PT64_ROOT_MAX_LEVEL: int
KVM_NR_PAGE_SIZES: int
KVM_MAX_HUGEPAGE_LEVEL: int
KVM_HPAGE_GFN_SHIFT_PER_LEVEL: int
ACC_EXEC_MASK: int
ACC_WRITE_MASK: int
ACC_USER_MASK: int
ACC_ALL: int
RET_PF_CONTINUE: int
RET_PF_RETRY: int
RET_PF_EMULATE: int
RET_PF_WRITE_PROTECTED: int
RET_PF_INVALID: int
RET_PF_FIXED: int
RET_PF_SPURIOUS: int
PTE_PREFETCH_NUM: int
RET_PF_NAMES: dict[int, str]

def KVM_PAGES_PER_HPAGE(level: int) -> int: ...
def gfn_to_index(gfn: int, base_gfn: int, level: int) -> int: ...
def kvm_mmu_slot_lpages(base_gfn: int, npages: int, level: int) -> int: ...
