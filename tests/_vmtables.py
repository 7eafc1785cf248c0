"""The bad-memory-region table shared by the model test and the live test.

Each case is ``(name, setup, probe, expected)``: ``setup`` is a list of
region requests that must succeed, ``probe`` the request under test, and
``expected`` the model exception class or None (accepted).  A request is
``(ioctl, slot, flags, gpa, size, hva, gmem_offset, gmem)`` with ioctl "v1"
or "v2" and ``gmem`` one of 0, "GMEM" (a 4 MiB guest_memfd of the VM),
"BADFD" (a descriptor that is not open).

Addresses are chosen so that the live kernel never needs the memory to
exist: KVM only checks ``access_ok`` when a memslot is created.
"""
from kvmmmu import memslots as M
from kvmmmu.host import HostConfig
from kvmmmu.vm import KvmParams

MiB = 1 << 20
H = 0x7E00_0000_0000           # an hva well inside user space, 1 GiB aligned
TOP = (1 << 47) - 4096          # TASK_SIZE_MAX with 4-level paging
GMEM_SIZE = 4 * MiB
BADFD = 987654

#: the development host: kvm_pvm (shadow paging), tdp_mmu=N, mmio_caching=N,
#: no SMM address space, guest_memfd, 48-bit MAXPHYADDR, 4-level paging
THIS_HOST = HostConfig(tdp=None, maxphyaddr=48, smm=False, guest_memfd=True,
                       sw_protected_vm=False, gbpages=True, la57=False)
THIS_HOST_PARAMS = KvmParams(tdp_mmu=False, eager_page_split=True, nx_huge_pages=False,
                             mmio_caching=False)


def r(slot, flags, gpa, size, hva, off=0, gmem=0, ioctl="v2"):
    return (ioctl, slot, flags, gpa, size, hva, off, gmem)


LOG, RO, GM = M.KVM_MEM_LOG_DIRTY_PAGES, M.KVM_MEM_READONLY, M.KVM_MEM_GUEST_MEMFD
BASE = r(0, 0, 0, 2 * MiB, H)

CASES = [
    ("create", [], BASE, None),
    ("create_v1", [], r(0, 0, 0, 2 * MiB, H, ioctl="v1"), None),
    ("readonly", [], r(0, RO, 0, 2 * MiB, H), None),
    ("dirty_logged", [], r(0, LOG, 0, 2 * MiB, H), None),
    ("unaligned_size", [], r(0, 0, 0, 2 * MiB + 0x800, H), M.MemslotAlignmentError),
    ("unaligned_gpa", [], r(0, 0, 0x800, 2 * MiB, H), M.MemslotAlignmentError),
    ("unaligned_hva", [], r(0, 0, 0, 2 * MiB, H + 0x10), M.MemslotAlignmentError),
    ("hva_at_top_of_user_space", [], r(0, 0, 0, 0x1000, TOP - 0x1000), None),
    ("hva_beyond_user_space", [], r(0, 0, 0, 0x2000, TOP - 0x1000), M.MemslotUserspaceAddressError),
    ("hva_kernel_address", [], r(0, 0, 0, 0x1000, 0xFFFF_8880_0000_0000), M.MemslotUserspaceAddressError),
    ("too_large", [], r(0, 0, 0, (M.KVM_MEM_MAX_NR_PAGES + 1) << 12, 0x1_0000_0000),
     M.MemslotTooLargeError),
    ("gpa_wraps", [], r(0, 0, (1 << 64) - 0x1000, 0x2000, H), M.MemslotWrapError),
    ("last_gfn_at_max", [], r(0, 0, (1 << 52) - 0x1000, 0x1000, H), None),
    ("gfn_beyond_max", [], r(0, 0, 1 << 52, 0x1000, H), M.MemslotGfnLimitError),
    ("slot_id_last_user", [], r(M.KVM_USER_MEM_SLOTS - 1, 0, 0, 2 * MiB, H), None),
    ("slot_id_internal", [], r(M.KVM_USER_MEM_SLOTS, 0, 0, 2 * MiB, H), M.MemslotIdError),
    ("slot_id_huge", [], r(0xFFFF, 0, 0, 2 * MiB, H), M.MemslotIdError),
    ("as_id_1_without_smm", [], r(1 << 16, 0, 0, 2 * MiB, H), M.MemslotIdError),
    ("as_id_2", [], r(2 << 16, 0, 0, 2 * MiB, H), M.MemslotIdError),
    ("flag_bit3", [], r(0, 1 << 3, 0, 2 * MiB, H), M.MemslotFlagsError),
    ("flag_invalid_bit16", [], r(0, M.KVM_MEMSLOT_INVALID, 0, 2 * MiB, H), M.MemslotFlagsError),
    ("v1_guest_memfd_flag", [], r(0, GM, 0, 2 * MiB, H, ioctl="v1"), M.MemslotFlagsError),
    ("overlap", [BASE], r(1, 0, MiB, 2 * MiB, H + 4 * MiB), M.MemslotOverlapError),
    ("overlap_contained", [r(0, 0, 0, 8 * MiB, H)], r(1, 0, 2 * MiB, 2 * MiB, H + 16 * MiB),
     M.MemslotOverlapError),
    ("adjacent", [BASE], r(1, 0, 2 * MiB, 2 * MiB, H + 4 * MiB), None),
    ("same_hva_two_slots", [BASE], r(1, 0, 4 * MiB, 2 * MiB, H), None),
    ("delete", [BASE], r(0, 0, 0, 0, 0), None),
    ("delete_missing", [], r(5, 0, 0, 0, 0), M.MemslotNotFoundError),
    ("delete_with_bad_flags", [BASE], r(0, 1 << 3, 0, 0, 0), M.MemslotFlagsError),
    ("no_change", [BASE], BASE, None),
    ("change_size", [BASE], r(0, 0, 0, 4 * MiB, H), M.MemslotImmutableError),
    ("change_hva", [BASE], r(0, 0, 0, 2 * MiB, H + 2 * MiB), M.MemslotImmutableError),
    ("toggle_readonly", [BASE], r(0, RO, 0, 2 * MiB, H), M.MemslotImmutableError),
    ("flags_only_log_on", [BASE], r(0, LOG, 0, 2 * MiB, H), None),
    ("flags_only_log_off", [r(0, LOG, 0, 2 * MiB, H)], BASE, None),
    ("move", [BASE], r(0, 0, 8 * MiB, 2 * MiB, H), None),
    ("move_dirty_logged", [r(0, LOG, 0, 2 * MiB, H)], r(0, LOG, 8 * MiB, 2 * MiB, H), None),
    ("move_and_log_off", [r(0, LOG, 0, 2 * MiB, H)], r(0, 0, 8 * MiB, 2 * MiB, H), None),
    ("move_onto_other_slot", [BASE, r(1, 0, 8 * MiB, 2 * MiB, H + 8 * MiB)],
     r(1, 0, MiB, 2 * MiB, H + 8 * MiB), M.MemslotOverlapError),
    ("move_beyond_max_gfn", [BASE], r(0, 0, 1 << 52, 2 * MiB, H), M.MemslotGfnLimitError),
    ("guest_memfd", [], r(0, GM, 0, 2 * MiB, H, 0, "GMEM"), None),
    ("guest_memfd_whole_file", [], r(0, GM, 0, GMEM_SIZE, H, 0, "GMEM"), None),
    ("guest_memfd_bad_fd", [], r(0, GM, 0, 2 * MiB, H, 0, "BADFD"), M.GuestMemfdBadFdError),
    ("guest_memfd_unaligned_offset", [], r(0, GM, 0, 2 * MiB, H, 0x123, "GMEM"),
     M.MemslotGuestMemfdOffsetError),
    ("guest_memfd_beyond_file", [], r(0, GM, 0, 2 * MiB, H, 3 * MiB, "GMEM"), M.GuestMemfdBindError),
    ("guest_memfd_binding_overlap", [r(0, GM, 0, 2 * MiB, H, 0, "GMEM")],
     r(1, GM, 4 * MiB, 2 * MiB, H + 4 * MiB, MiB, "GMEM"), M.GuestMemfdBindError),
    ("guest_memfd_second_binding", [r(0, GM, 0, 2 * MiB, H, 0, "GMEM")],
     r(1, GM, 4 * MiB, 2 * MiB, H + 4 * MiB, 2 * MiB, "GMEM"), None),
    ("guest_memfd_dirty_log", [], r(0, GM | LOG, 0, 2 * MiB, H, 0, "GMEM"), M.MemslotFlagsError),
    ("guest_memfd_readonly", [], r(0, GM | RO, 0, 2 * MiB, H, 0, "GMEM"), M.MemslotFlagsError),
    ("guest_memfd_move", [r(0, GM, 0, 2 * MiB, H, 0, "GMEM")],
     r(0, GM, 8 * MiB, 2 * MiB, H, 0, "GMEM"), M.MemslotImmutableError),
    ("guest_memfd_delete", [r(0, GM, 0, 2 * MiB, H, 0, "GMEM")], r(0, 0, 0, 0, 0), None),
]
