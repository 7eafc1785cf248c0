"""Exhaustive access table in the spirit of kvm-unit-tests x86/access.c.

Every combination of

* the leaf's P, W, U, A, D, NX bits and protection key (4 keys: PKRU gives
  key 1 access-disable, key 2 write-disable, key 3 both),
* 4 KiB leaf (PTE) or 2 MiB leaf (PDE with PS),
* the W, U and NX bits of the entry above the leaf,
* CR0.WP x EFER.NXE x CR4.SMEP x CR4.SMAP x CR4.PKE x RFLAGS.AC,
* the access: user/supervisor/implicit-supervisor x read/write, user and
  supervisor fetch,

is walked with the batch walker (4-level paging) and compared with the
expectation from :func:`architectural_outcome`, a plain reading of the Intel
SDM rules (vol. 3, 4.6 "Access rights" and 4.7 "Page-fault exceptions")
written here independently of the walker: no permission tables, no KVM
code structure, just the rules per access.  2 097 152 walks.

A second test checks KVM's permission bitmap and PKRU mask bit by bit
against the same rules.
"""
import itertools

import numpy as np
import pytest

from kvmmmu import paging as P

# Access kinds: name -> (user, write, fetch, implicit)
KINDS = {
    "user-read": (1, 0, 0, 0), "user-write": (1, 1, 0, 0), "user-fetch": (1, 0, 1, 0),
    "sup-read": (0, 0, 0, 0), "sup-write": (0, 1, 0, 0), "sup-fetch": (0, 0, 1, 0),
    "implicit-read": (0, 0, 0, 1), "implicit-write": (0, 1, 0, 1),
}
KIND_NAMES = list(KINDS)

#: PKRU: key 1 AD, key 2 WD, key 3 AD|WD (key 0: no restriction).
PKRU = (1 << 2) | (1 << 5) | (3 << 6)

MODEL = P.GuestCpuModel(maxphyaddr=48, gbpages=True, nx=True, smep=True, smap=True, pku=True)

BIT_P, BIT_W, BIT_U, BIT_A, BIT_D, BIT_PS, BIT_NX = 0, 1, 2, 5, 6, 7, 63
FRAME_4K, FRAME_2M = 0x100000, 0x200000


def architectural_outcome(leaf_p, leaf_w, leaf_u, leaf_a, leaf_d, leaf_nx, key,
                          up_w, up_u, up_nx, huge, user, write, fetch, implicit,
                          wp, nxe, smep, smap, pke, ac, pkru):
    """What an x86 CPU does, per the SDM, for arrays of walk inputs.

    Paging structure above the leaf: PML4E and (for a 4 KiB leaf) PDPTE are
    present with W=U=1, NX=0, A=1; the entry right above the leaf has the
    given W/U/NX (A=1).  Returns a dict of arrays: ``fault`` (bool),
    ``error_code``, ``a_after``/``d_after`` (the leaf's A/D after the
    access), ``acc`` (expected ACC_* of a successful walk: exec unless NX
    anywhere, user if U everywhere, write if W everywhere and the leaf is
    already dirty or this is a write -- KVM maps clean pages read-only).
    """
    b = lambda x: np.asarray(x, dtype=bool)
    leaf_p, leaf_w, leaf_u, leaf_a, leaf_d, leaf_nx = map(b, (leaf_p, leaf_w, leaf_u, leaf_a, leaf_d, leaf_nx))
    up_w, up_u, up_nx, user, write, fetch, implicit = map(b, (up_w, up_u, up_nx, user, write, fetch, implicit))
    key = np.asarray(key)

    # 4.6/4.7: with EFER.NXE=0, bit 63 is reserved in every entry; the walk
    # meets the upper entry first.
    upper_rsvd = up_nx & (not nxe)
    leaf_missing = ~upper_rsvd & ~leaf_p
    leaf_rsvd = ~upper_rsvd & leaf_p & leaf_nx & (not nxe)
    translated = ~upper_rsvd & ~leaf_missing & ~leaf_rsvd

    user_page = leaf_u & up_u              # user-mode address: U=1 at every level
    writable = leaf_w & up_w               # R/W=1 at every level
    exec_disable = (leaf_nx | up_nx) & nxe

    supervisor = ~user
    data = ~fetch
    # Supervisor accesses.
    smap_applies = smap & supervisor & data & user_page & (implicit | (not ac))
    sup_write_blocked = supervisor & write & ~writable & wp
    sup_fetch_blocked = supervisor & fetch & (exec_disable | (user_page & smep))
    # User accesses.
    user_blocked = user & (~user_page | (write & ~writable) | (fetch & exec_disable))
    rights_fault = smap_applies | sup_write_blocked | sup_fetch_blocked | user_blocked

    # Protection keys: data accesses to user-mode addresses, long mode + PKE.
    ad = (pkru >> (2 * key)) & 1
    wd = (pkru >> (2 * key + 1)) & 1
    pk_fault = (pke & data & user_page & ((ad == 1) |
                                            ((wd == 1) & write & (user | wp))))

    fault = ~translated | rights_fault | pk_fault
    err = np.where(write, 2, 0) | np.where(user, 4, 0) | np.where(fetch & (nxe or smep), 0x10, 0)
    err = err | np.where(translated | upper_rsvd | leaf_rsvd, 1, 0)      # P: translation found
    err = err | np.where(upper_rsvd | leaf_rsvd, 8, 0)                  # RSVD
    err = err | np.where(translated & pk_fault, 0x20, 0)                # PK
    err = np.where(fault, err, 0)

    ok = ~fault
    a_after = leaf_a | ok
    d_after = leaf_d | (ok & write)
    acc = (np.where(~(leaf_nx | up_nx), 1, 0) | np.where(user_page, 4, 0) |
           np.where(writable & (leaf_d | write), 2, 0))
    return dict(fault=fault, error_code=err, a_after=a_after, d_after=d_after, acc=acc)


def _grid():
    """Flattened (huge, upper, leaf, kind) indices of one context: 2*8*256*8."""
    huge, up, leaf, kind = np.meshgrid(np.arange(2), np.arange(8), np.arange(256), np.arange(8),
                                       indexing="ij")
    return huge.ravel(), up.ravel(), leaf.ravel(), kind.ravel()


HUGE, UP, LEAF, KIND = _grid()
# Position of each walk's leaf inside its group of 2048 (256 leaves x 8 kinds).
SLOT = LEAF * 8 + KIND
TABLE = UP * 4 + SLOT // 512            # 32 tables per size: 4 per upper combination
INDEX = SLOT % 512
GVA = np.where(HUGE == 0, (TABLE << 21) | (INDEX << 12),
               ((1 + TABLE) << 30) | (INDEX << 21)).astype(np.uint64)
PT_BASE, PD2M_BASE = 0x10000, 0x40000
LEAF_GPA = np.where(HUGE == 0, PT_BASE + TABLE * 4096 + INDEX * 8,
                    PD2M_BASE + TABLE * 4096 + INDEX * 8)


def _leaf_bits(c):
    return dict(p=c & 1, w=c >> 1 & 1, u=c >> 2 & 1, a=c >> 3 & 1, d=c >> 4 & 1,
                nx=c >> 5 & 1, key=c >> 6 & 3)


def _upper_bits(u):
    return dict(w=u & 1, u=u >> 1 & 1, nx=u >> 2 & 1)


def build_tables(ram64):
    """Write the grid's page tables into `ram64` (uint64 view of guest memory)."""
    ram64[:] = 0
    full = (1 << BIT_P) | (1 << BIT_W) | (1 << BIT_U) | (1 << BIT_A)
    ram64[0x1000 // 8] = 0x2000 | full                       # PML4[0] -> PDPT
    ram64[0x2000 // 8] = 0x3000 | full                       # PDPT[0] -> PD of 4K tables
    for j in range(32):
        ub = _upper_bits(j // 4)
        flags = ((1 << BIT_P) | (1 << BIT_A) | (ub["w"] << BIT_W) | (ub["u"] << BIT_U)
                 | (ub["nx"] << BIT_NX))
        ram64[0x3000 // 8 + j] = (PT_BASE + j * 4096) | flags          # PDE -> PT j
        ram64[0x2000 // 8 + 1 + j] = (PD2M_BASE + j * 4096) | flags    # PDPTE -> 2M PD j
    lb = _leaf_bits(LEAF.astype(np.uint64))
    val = ((lb["p"] << BIT_P) | (lb["w"] << BIT_W) | (lb["u"] << BIT_U) | (lb["a"] << BIT_A)
           | (lb["d"] << BIT_D) | (lb["nx"] << np.uint64(BIT_NX)) | (lb["key"] << np.uint64(59)))
    val = val | np.where(HUGE == 0, FRAME_4K, FRAME_2M | (1 << BIT_PS)).astype(np.uint64)
    ram64[LEAF_GPA // 8] = val


CONTEXTS = list(itertools.product((0, 1), repeat=6))          # wp, nxe, smep, smap, pke, ac


def test_exhaustive_access_table():
    ram = np.zeros(0x80000, np.uint8)
    ram64 = ram.view(np.uint64)
    mem = P.GuestMemory(ram)
    lb = _leaf_bits(LEAF)
    ub = _upper_bits(UP)
    checked = 0
    for wp, nxe, smep, smap, pke, ac in CONTEXTS:
        build_tables(ram64)
        cpu = P.CpuState.long_mode(cr3=0x1000, wp=wp, nxe=nxe, smep=smep, smap=smap, pke=pke,
                                   ac=ac, pkru=PKRU)
        mmu = P.GuestMmu(mem, cpu, MODEL)
        got = np.empty(GVA.size, dtype=P.WALK_DTYPE)
        for k, name in enumerate(KIND_NAMES):
            user, write, fetch, implicit = KINDS[name]
            sel = KIND == k
            access = cpu.access(write=bool(write), fetch=bool(fetch), implicit=bool(implicit))
            access |= P.PFERR_USER_MASK if user else 0
            got[sel] = mmu.walk_array(GVA[sel], access)
        user, write, fetch, implicit = (np.array([KINDS[n][i] for n in KIND_NAMES])[KIND]
                                        for i in range(4))
        exp = architectural_outcome(lb["p"], lb["w"], lb["u"], lb["a"], lb["d"], lb["nx"],
                                    lb["key"], ub["w"], ub["u"], ub["nx"], HUGE, user, write,
                                    fetch, implicit, bool(wp), bool(nxe), bool(smep), bool(smap),
                                    bool(pke), bool(ac), PKRU)
        fault = (got["flags"] & P.WALK_FAULT) != 0
        leaf_after = ram64[LEAF_GPA // 8]
        expected_gpa = np.where(HUGE == 0, FRAME_4K, FRAME_2M).astype(np.uint64) | (GVA & 0xfff)
        checks = {
            "fault": (fault, exp["fault"]),
            "error_code": (got["error_code"].astype(np.int64), exp["error_code"].astype(np.int64)),
            "gpa": (np.where(fault, 0, got["gpa"]), np.where(exp["fault"], 0, expected_gpa)),
            "level": (np.where(fault, 0, got["level"]), np.where(exp["fault"], 0, 1 + HUGE)),
            "pte_access": (np.where(fault, 0, got["pte_access"]), np.where(exp["fault"], 0, exp["acc"])),
            "A": ((leaf_after >> np.uint64(BIT_A)) & np.uint64(1), exp["a_after"].astype(np.uint64)),
            "D": ((leaf_after >> np.uint64(BIT_D)) & np.uint64(1), exp["d_after"].astype(np.uint64)),
        }
        for what, (g, e) in checks.items():
            bad = np.flatnonzero(np.asarray(g) != np.asarray(e))
            if bad.size:
                i = bad[0]
                pytest.fail(
                    f"{what} differs in {bad.size} walks; first: ctx wp={wp} nxe={nxe} smep={smep} "
                    f"smap={smap} pke={pke} ac={ac}, {KIND_NAMES[KIND[i]]}, huge={HUGE[i]}, "
                    f"leaf={_leaf_bits(int(LEAF[i]))}, upper={_upper_bits(int(UP[i]))}: "
                    f"got {np.asarray(g)[i]!r}, expected {np.asarray(e)[i]!r}")
        checked += GVA.size
    assert checked == 64 * 2 * 8 * 256 * 8


@pytest.mark.parametrize("wp,nxe,smep,smap,pke", list(itertools.product((0, 1), repeat=5)))
def test_permission_bitmap_and_pkru_mask_match_the_rules(wp, nxe, smep, smap, pke):
    """Every bit of mmu->permissions and mmu->pkru_mask, from the SDM rules."""
    cr0 = P.X86_CR0_PE | P.X86_CR0_PG | (P.X86_CR0_WP if wp else 0)
    cr4 = (P.X86_CR4_PAE | (P.X86_CR4_SMEP if smep else 0) | (P.X86_CR4_SMAP if smap else 0)
           | (P.X86_CR4_PKE if pke else 0))
    efer = P.EFER_LME | P.EFER_LMA | (P.EFER_NX if nxe else 0)
    role = P.kvm_calc_cpu_role(cr0, cr4, efer)
    perms = P.update_permission_bitmask(role)
    pkru_mask = P.update_pkru_bitmask(role)
    for index in range(16):
        write, user, not_smap, fetch = (index >> 0) & 1, (index >> 1) & 1, (index >> 2) & 1, (index >> 3) & 1
        for acc in range(8):
            if write and fetch:
                continue                 # not an access a CPU makes
            x, w, u = acc & 1, acc >> 1 & 1, acc >> 2 & 1
            if user:
                fault = not u or (write and not w) or (fetch and nxe and not x)
            elif fetch:
                fault = (nxe and not x) or (smep and u)
            else:
                fault = (write and wp and not w) or (smap and u and not not_smap)
            assert (perms[index] >> acc) & 1 == bool(fault), (index, acc)
        # PKRU: index bit 2 (RSVD position) means "user page" here.
        user_page = not_smap
        ad_checked = pke and user_page and not fetch
        wd_checked = ad_checked and write and (user or wp)
        assert (pkru_mask >> (2 * index)) & 3 == (1 if ad_checked else 0) | (2 if wd_checked else 0)
