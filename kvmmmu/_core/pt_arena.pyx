"""The page-table arena: SPTE pages, ``struct kvm_mmu_page`` headers, split
SPTEs and lockless walks (Linux v6.18 ``arch/x86/kvm/mmu/mmu.c``,
``mmu_internal.h``, ``tdp_mmu.c``).

Every MMU of a VM keeps its SPTEs in pages of 512 entries with one header per
page.  A :class:`PtArena` holds all of them for one VM:

* **Pages** (tables and the shadow MMU's ``shadowed_translation`` pages) are
  rows of 512 ``uint64`` in numpy-owned chunks of ``tables_per_chunk`` pages.
  A chunk never moves and is never released before the arena, so zero-copy
  views (:meth:`PtArena.spt`, :meth:`PtArena.table`) and SPTE locations stay
  valid while the arena grows.
* **Handles.**  Page ``t`` (the table index) has the pfn ``base_pfn + t`` in
  the model's host physical space, and the SPTE ``i`` of it lives at
  ``sptep = (pfn << 12) | (i << 3)`` (``types.pxd``), so a non-leaf SPTE
  built with ``make_nonleaf_spte(fmt, pfn << 12)`` points at the table and an
  rmap can store ``sptep``.  The default ``base_pfn`` is 3/4 of the way up the
  MAXPHYADDR-46 pfn space (pfn ``0x3_0000_0000``, host physical 48 TiB), below
  2**34 and far above any guest memory a model maps; the whole range
  ``[base_pfn, base_pfn + max_tables)`` is reserved for page tables.  A
  header is named by ``sp`` = header index + 1 (0 is NULL).
* **Headers** are a C array of ``struct kvm_mmu_page`` (pt_arena_defs.h) with
  the kernel's fields at the kernel's widths; :data:`HEADER_DTYPE` is the
  matching numpy structured dtype (views: :meth:`PtArena.sp_header`).
* **Memory caches.**  Pages and headers come from
  :class:`MmuMemoryCache` objects with the kernel's topup / alloc / free
  semantics (``mmu_shadow_page_cache`` pages are filled with
  SHADOW_NONPRESENT_VALUE, ``mmu_page_header_cache`` headers are zeroed).
  A topup that the arena cannot satisfy raises :class:`KvmNoMemoryError`
  and changes nothing.
* **Freeing is deferred past the lockless walkers.**  The shadow MMU frees
  only in :meth:`PtArena.kvm_mmu_commit_zap_page`, after a remote TLB flush
  that waits for every vCPU in READING_SHADOW_PAGE_TABLES to finish its walk
  (the kernel's IPI with KVM_REQUEST_WAIT; a walker has IRQs off).  The TDP
  MMU hands pages to :meth:`PtArena.call_rcu_free_sp` and they are freed
  when a grace period has passed (:meth:`PtArena.rcu_poll`,
  :meth:`PtArena.synchronize_rcu`).  Freed pages and headers are filled with
  :data:`PT_POISON` (0x6b bytes) and queued FIFO, so a use after free reads
  poison for as long as possible and is detected.
* **32-bit hosts.**  An arena built for a format with ``host_64bit=False``
  stores each SPTE as ``union split_spte`` (low half first) and uses the
  kernel's half-ordered writes, ``clear_spte_count`` and the retrying
  lockless read; otherwise every access is one 64-bit atomic.
* **Kernel era.**  ``era="v6.18"`` (default) follows v6.13+ rules;
  ``era="v6.12"`` follows the older mmu_spte_update (flush on lost A/D) and
  reports A/D of zapped SPTEs to a host callback.

This module is the Python face of the arena; the nogil C code lives by kernel
concept in pt_pool (pools, allocation, freeing), mmu_spte (the SPTE writers
and split SPTEs), mmu_lockless (remote TLB flush, RCU, the lockless-walk
protocols) and pt_audit (the auditor).  pt_arena.pxd re-exports their C names.

Invariants (checked by :meth:`PtArena.audit`):

* every page slot handed out is in exactly one state: free (poisoned, on the
  free list), cached (in a memory cache, untouched fill), spt or info (owned
  by exactly one live header whose ``spt`` / ``shadowed_translation`` names
  it, and whose back-pointer names the header);
* every header slot handed out is free (poisoned), cached (zero), in use, or
  RCU-pending (on the RCU list, in grace-period order);
* a live table holds no poison, and no present non-leaf SPTE of a live table
  at level >= 2 points at a page of the arena that is not a live table;
* on 64-bit hosts clear_spte_count stays 0.

Thread-safety contract (the kernel's mmu_lock, an rwlock, made checkable):

* **PtArena** may be shared between threads.  It has two sides, claimed
  with no Python code between check and claim:

  - the *exclusive* side (mmu_lock held for write): everything that changes
    SPTEs, headers, the RCU state or the access log from Python, and the
    TDP MMU's write-locked calls.  Callers serialize it; an exclusive entry
    point raises :class:`ConcurrentUseError` while another thread's
    exclusive call waits without the GIL (flush, commit_zap,
    synchronize_rcu, rcu_barrier, a TdpMmuCore write-locked call) or while
    any thread holds the shared side;
  - the *shared* side (mmu_lock held for read): the TDP MMU's map path,
    fast page fault and shared root zap (kvmmmu._core.tdp_mmu), on any
    number of threads at once without the GIL; refused while an exclusive
    call runs.  Each holder is an RCU reader in its own slot
    (``shared_rcu``): a grace period waits for it.  Under it the pools are
    the page allocator (``pool_lock``, a spinlock; growth under a Python
    lock), call_rcu and :meth:`PtArena.rcu_poll` take ``rcu_lock``, the
    page stats and state counts move by atomic adds.

  :meth:`PtArena.rcu_poll` and :class:`MmuMemoryCache` topups may run beside
  shared holders (as RCU callbacks and vCPU topups do beside faults in the
  kernel), not beside a waiting exclusive call.  Lockless readers
  (:meth:`PtArena.get_sptes_lockless`, :meth:`PtArena.mmu_spte_get_lockless`,
  walks begun with :meth:`PtArena.walk_shadow_page_lockless_begin`) may run
  on any number of threads at once, also against a writer: chunks never move
  or go away before the arena, every location is range-checked in the nogil
  loop, and a freed page reads as poison (KvmUseAfterFreeError).
* Waits for walkers are bounded: a flush or grace period whose walker thread
  exited raises :class:`KvmDeadWalkerError`; ``timeout=`` gives up with
  TimeoutError; Ctrl-C interrupts.
* **MmuMemoryCache** belongs to one vCPU: one thread at a time.  A cache
  that a nogil map of one thread consumes raises ConcurrentUseError when
  another thread tops it up, frees it or maps with it meanwhile.
* The views (:meth:`PtArena.table`, :meth:`PtArena.spt`) are shared memory
  without protocol; header views are read-only.
"""

from kvmmmu._core.argcheck cimport s32_arg, s64_arg, u32_arg, u64_arg
cimport cython
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from cpython.exc cimport PyErr_CheckSignals

import threading
import time
import warnings
import weakref

import numpy as np

from kvmmmu._core._checks import (
    check_array as _check_array, int_arg as _int_arg, out_array as _out_array,
    readonly as _readonly, ObjectInitError,
)
from kvmmmu.errors import ConcurrentUseError, KvmNoMemoryError

from kvmmmu._core.defs import PAGE_SIZE, SPTE_ENT_PER_PAGE
from kvmmmu._core.mmu_defs cimport PAGE_SIZE as PAGE_SIZE_C, SPTE_ENT_PER_PAGE as SPTES_PER_PAGE_C
from kvmmmu._core.pt_audit cimport audit_arena
from kvmmmu._core.mmu_lockless cimport (
    _free_zapped, _rcu_do_callbacks, _rcu_finish_within, _rcu_start_gp, _wait_word_change,
)
from kvmmmu._core.memcache cimport (
    KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE, KVMMMU_ENOMEM, kvm_mmu_free_memory_cache,
    kvm_mmu_memory_cache, kvm_mmu_memory_cache_alloc, kvm_mmu_memory_cache_init,
    kvm_mmu_topup_memory_cache,
)
from kvmmmu._core.spte cimport (
    ACC_ALL, MKSPTE_HOST_WRITABLE, PG_LEVEL_4K, PT64_ROOT_MAX_LEVEL, PT_WRITABLE_MASK,
    is_large_pte, make_nonleaf_spte, make_spte,
)

cnp.import_array()


# --- constants --------------------------------------------------------------

#: Fill value of freed pages and headers (slab POISON_FREE bytes).
POISON = PT_POISON
#: vcpu->mode values.
globals().update(
    OUTSIDE_GUEST_MODE=OUTSIDE_GUEST_MODE, IN_GUEST_MODE=IN_GUEST_MODE,
    EXITING_GUEST_MODE=EXITING_GUEST_MODE,
    READING_SHADOW_PAGE_TABLES=READING_SHADOW_PAGE_TABLES,
    KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
    PT_ROLE_INVALID=PT_ROLE_INVALID, PT_ROLE_LEVEL_MASK=PT_ROLE_LEVEL_MASK,
)
# Page and header slot states (see :meth:`PtArena.table_states`), and the
# auditor's exception: pt_audit.pyx, re-exported here.
from kvmmmu._core.pt_audit import PAGE_STATES, SP_STATES, PtArenaAuditError
#: Memory cache kinds, named after the vCPU fields.
CACHE_KINDS = {"shadow_page": PT_CACHE_SHADOW_PAGE, "page_header": PT_CACHE_PAGE_HEADER,
               "shadowed_info": PT_CACHE_SHADOWED_INFO}

#: Names of the access-log events (:meth:`PtArena.start_access_log`).
ACCESS_EVENTS = {
    PT_EV_WRITE64: "write64", PT_EV_XCHG64: "xchg64", PT_EV_READ64: "read64",
    PT_EV_WRITE_LOW: "write_low", PT_EV_WRITE_HIGH: "write_high", PT_EV_XCHG_LOW: "xchg_low",
    PT_EV_READ_LOW: "read_low", PT_EV_READ_HIGH: "read_high", PT_EV_WMB: "smp_wmb",
    PT_EV_RMB: "smp_rmb", PT_EV_READ_COUNT: "read_clear_spte_count",
    PT_EV_INC_COUNT: "inc_clear_spte_count",
}

DEFAULT_TABLES_PER_CHUNK = 512          # 2 MiB of SPTEs per chunk
DEFAULT_MAX_TABLES = 1 << 22            # 16 GiB of page tables
SPTES_PER_PAGE = SPTE_ENT_PER_PAGE    # the arena's historical name

_WARN_TEXT = (
    "mmu_spte_set: the SPTE is already shadow-present (WARN_ON_ONCE)",
    "mmu_spte_update: the new SPTE is not shadow-present (WARN_ON_ONCE)",
    "check_spte_writable_invariants: W without MMU-writable, or MMU-writable "
    "without Host-writable (WARN_ONCE)",
    "mmu_spte_update: the old SPTE was not present or its PFN differs (WARN_ON_ONCE)",
    "KVM_MMU_WARN_ON(is_ept_ve_possible(spte)): suppress-#VE clear in a present EPT entry",
    "kvm_mmu_commit_zap_page: freeing a page that is not invalid or is still a root "
    "(WARN_ON_ONCE)",
    "kvm_update_page_stats: level outside 4K..1G (model check)",
)


class KvmUseAfterFreeError(RuntimeError):
    """An SPTE or header of a page that has been freed (poisoned) was used."""


class KvmMmuWarning(RuntimeWarning):
    """A WARN_ON_ONCE of the kernel fired; the model, like the kernel, went on."""


class LocklessWalkError(RuntimeError):
    """A lockless-walk or vCPU-mode step out of order: begin inside a walk,
    end outside one, a mode change or a TDP-MMU switch during a walk, a TDP
    MMU walk on a vCPU not using the TDP MMU.  Refused before any change."""


class KvmDeadWalkerError(RuntimeError):
    """A wait for a vCPU's lockless walk (remote TLB flush) or RCU read-side
    section (grace period) can never end: the thread that began it has exited
    without ending it."""


#: True in KVMMMU_DEBUG_CYTHON builds: the MMU_WARN_ON checks are compiled in.
DEBUG_CHECKS = bool(KVMMMU_DEBUG)
_DEBUG_TEXT = (
    ("kvm_mmu_free_shadow_page", "MMU_WARN_ON(!is_empty_shadow_page(sp->spt)): freeing a "
     "shadow page that still holds a present SPTE"),
    ("kvm_mmu_free_shadow_page", "freeing a shadow page with parent_ptes or unsync children"),
    ("mmu_spte_set", "SPTE store into a page that is not a live table"),
    ("mmu_spte_set", "huge (PS) SPTE stored into a level-1 table"),
)
# Waits that may never end are done in slices of this many ns without the GIL.
cdef uint64_t _WAIT_SLICE_NS = 20000000


# --- struct kvm_mmu_page as a numpy dtype -----------------------------------

cdef kvm_mmu_page _H

cdef inline Py_ssize_t _off(void *field) noexcept:
    return <char *>field - <char *>&_H

#: (name, numpy type, kernel type) of every header field, in kernel order.
#: Names sharing a union share bytes.
KVM_MMU_PAGE_FIELDS = (
    ("link_next", "u8", "struct list_head link (sp handle)", _off(&_H.link_next)),
    ("link_prev", "u8", "struct list_head link (sp handle)", _off(&_H.link_prev)),
    ("hash_next", "u8", "struct hlist_node hash_link (sp handle)", _off(&_H.hash_next)),
    ("hash_pprev", "u8", "struct hlist_node hash_link (sp handle)", _off(&_H.hash_pprev)),
    ("tdp_mmu_page", "?", "bool", _off(&_H.tdp_mmu_page)),
    ("unsync", "?", "bool", _off(&_H.unsync)),
    ("mmu_valid_gen", "u1", "u8", _off(&_H.mmu_valid_gen)),
    ("tdp_mmu_scheduled_root_to_zap", "?", "bool", _off(&_H.tdp_mmu_scheduled_root_to_zap)),
    ("nx_huge_page_disallowed", "?", "bool", _off(&_H.nx_huge_page_disallowed)),
    ("role", "u4", "union kvm_mmu_page_role (u32 word)", _off(&_H.role)),
    ("gfn", "u8", "gfn_t", _off(&_H.gfn)),
    ("spt", "u8", "u64 * (pfn)", _off(&_H.spt)),
    ("shadowed_translation", "u8", "u64 * (pfn)", _off(&_H.shadowed_translation)),
    ("root_count", "i4", "int", _off(&_H.root_count)),
    ("tdp_mmu_root_count", "i4", "refcount_t", _off(&_H.tdp_mmu_root_count)),
    ("has_mapped_host_mmio", "?", "bool", _off(&_H.has_mapped_host_mmio)),
    ("unsync_children", "u4", "unsigned int", _off(&_H.unsync_children)),
    ("write_flooding_count", "i4", "atomic_t", _off(&_H.write_flooding_count)),
    ("external_spt", "u8", "void *", _off(&_H.external_spt)),
    ("parent_ptes", "u8", "struct kvm_rmap_head", _off(&_H.parent_ptes)),
    ("ptep", "u8", "tdp_ptep_t (sptep)", _off(&_H.ptep)),
    ("unsync_child_bitmap", ("u8", 8), "DECLARE_BITMAP(, 512)", _off(&_H.unsync_child_bitmap[0])),
    ("nx_link_next", "u8", "struct list_head possible_nx_huge_page_link", _off(&_H.nx_link_next)),
    ("nx_link_prev", "u8", "struct list_head possible_nx_huge_page_link", _off(&_H.nx_link_prev)),
    ("rcu_next", "u8", "struct rcu_head next (sp handle), CONFIG_X86_64", _off(&_H.rcu_next)),
    ("clear_spte_count", "i4", "int (CONFIG_X86_32, shares rcu_head)", _off(&_H.clear_spte_count)),
    ("rcu_gp", "u8", "struct rcu_head func slot (grace period), CONFIG_X86_64", _off(&_H.rcu_gp)),
)

HEADER_DTYPE = np.dtype({
    "names": [f[0] for f in KVM_MMU_PAGE_FIELDS],
    "formats": [f[1] for f in KVM_MMU_PAGE_FIELDS],
    "offsets": [f[3] for f in KVM_MMU_PAGE_FIELDS],
    "itemsize": sizeof(kvm_mmu_page),
})

cdef pt_slot_meta _M
META_DTYPE = np.dtype({
    "names": ["table_sp", "table_next", "sp_next", "table_state", "sp_state"],
    "formats": ["u4", "u4", "u4", "u1", "u1"],
    "offsets": [<char *>&_M.table_sp - <char *>&_M, <char *>&_M.table_next - <char *>&_M,
                <char *>&_M.sp_next - <char *>&_M, <char *>&_M.table_state - <char *>&_M,
                <char *>&_M.sp_state - <char *>&_M],
    "itemsize": sizeof(pt_slot_meta),
})

# Fields set_sp() refuses: the arena owns them (allocation, RCU).
# Fields C follows as handles: set by the arena (and the TDP MMU's NX list), never from Python.
_ARENA_OWNED = frozenset(("spt", "shadowed_translation", "rcu_next", "rcu_gp",
                          "nx_link_next", "nx_link_prev"))
_BOOL_FIELDS = frozenset(f[0] for f in KVM_MMU_PAGE_FIELDS if f[1] == "?")


# --- argument helpers ----------------------------------------------------------

cdef object _cache_kind(object kind):
    if isinstance(kind, str):
        try:
            return CACHE_KINDS[kind]
        except KeyError:
            raise ValueError(f"kind must be one of {sorted(CACHE_KINDS)}, not {kind!r}") from None
    if kind in CACHE_KINDS.values():
        return int(kind)
    raise ValueError(f"kind must be one of {sorted(CACHE_KINDS)}, not {kind!r}")


class _WalkerToken:
    """Held in a thread-local slot by each thread inside a lockless walk;
    it dies with the thread, which tells a waiter the walk can never end."""
    __slots__ = ("__weakref__",)


def _deadline(timeout):
    if timeout is None:
        return None
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}") from None
    if not t >= 0:
        raise ValueError(f"timeout={timeout!r} must be >= 0")
    return time.monotonic() + t


def _u64_like(name, x):
    """Integers (array-like, any integer dtype, broadcastable) as uint64;
    floats and negative values are refused, not truncated or wrapped."""
    arr = np.asarray(x)
    if arr.size == 0:
        return arr.astype(np.uint64)
    if arr.dtype.kind not in "ui":
        raise TypeError(f"{name} must hold integers, not {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"{name} holds a negative value")
    return arr.astype(np.uint64, copy=False)


def _check_deadline(deadline, what, vcpu):
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"{what}: vCPU {vcpu} did not leave its lockless walk in time")


class _LocklessWalk:
    """Context manager for :meth:`PtArena.lockless_walk`."""
    __slots__ = ("arena", "vcpu")

    def __init__(self, arena, vcpu):
        self.arena = arena
        self.vcpu = vcpu

    def __enter__(self):
        self.arena.walk_shadow_page_lockless_begin(self.vcpu)
        return self.arena

    def __exit__(self, *exc):
        self.arena.walk_shadow_page_lockless_end(self.vcpu)
        return False


# --- the arena -------------------------------------------------------------------

cdef class PtArena:
    """All page-table pages and ``kvm_mmu_page`` headers of one VM.

    Parameters
    ----------
    fmt : SpteFormat
        The VM's SPTE format.  ``fmt.host_64bit`` chooses the mode: 64-bit
        hosts access SPTEs with single 64-bit atomics, 32-bit hosts use
        ``union split_spte`` and ``clear_spte_count``.  New tables are
        filled with ``fmt.SHADOW_NONPRESENT_VALUE``.
    nr_vcpus : int
        vCPUs taking part in the lockless walk protocols (``vcpu`` arguments
        are ``0 .. nr_vcpus - 1``).
    base_pfn : int, optional
        pfn of table 0.  Default: ``3/4 * 2**(min(maxphyaddr, 46) - 12)``
        (``0x3_0000_0000`` for MAXPHYADDR 46).  ``[base_pfn, base_pfn +
        max_tables)`` must lie in ``[1, 2**(maxphyaddr - 12))`` and is reserved
        for page tables.
    max_tables : int
        Capacity in pages (tables plus shadowed-translation pages); a
        multiple of ``tables_per_chunk``, below 2**32.  Memory is committed
        one chunk at a time as caches are topped up.
    tables_per_chunk : int
        Pages per chunk, a power of two (default 512: 2 MiB of SPTEs).
    era : {"v6.18", "v6.12"}
        Rules of mmu_spte_update / mmu_spte_clear_track_bits (see module doc).
    prove_mmu : bool
        Also check ``KVM_MMU_WARN_ON(is_ept_ve_possible())`` on 64-bit writes
        (``CONFIG_KVM_PROVE_MMU``).
    host_ad : callable, optional
        ``host_ad(pfn, accessed, dirty)``, called when the v6.12 helpers pass
        A/D state to the host page (``kvm_set_pfn_accessed/dirty``).
    """

    def __cinit__(self):
        self.a.chunk_base = NULL
        self._vcpus_raw = NULL
        self._readers = 0
        self._busy = None
        self._shared = 0
        self._shared_slots = 0
        self._grow_lock = threading.Lock()

    def __init__(self, SpteFormat fmt not None, *, nr_vcpus=1, base_pfn=None,
                 max_tables=DEFAULT_MAX_TABLES,
                 tables_per_chunk=DEFAULT_TABLES_PER_CHUNK,
                 str era="v6.18", bint prove_mmu=False, host_ad=None):
        cdef uint64_t limit, base, shift
        cdef int i
        if self.a.chunk_base != NULL:
            raise ObjectInitError("PtArena.__init__ called twice")
        nr_vcpus = _int_arg("nr_vcpus", nr_vcpus, -0x80000000, 0x7FFFFFFF)
        max_tables = _int_arg("max_tables", max_tables)
        tables_per_chunk = _int_arg("tables_per_chunk", tables_per_chunk)
        if tables_per_chunk == 0 or (tables_per_chunk & (tables_per_chunk - 1)):
            raise ValueError(f"tables_per_chunk={tables_per_chunk} is not a power of two")
        if max_tables == 0 or max_tables % tables_per_chunk:
            raise ValueError(f"max_tables={max_tables} is not a positive multiple of "
                             f"tables_per_chunk={tables_per_chunk}")
        if max_tables >= (<uint64_t>1) << 32:
            raise ValueError(f"max_tables={max_tables} does not fit the 32-bit handles")
        if not 1 <= nr_vcpus <= 4096:
            raise ValueError(f"nr_vcpus={nr_vcpus} is outside 1..4096")
        if era not in ("v6.18", "v6.12"):
            raise ValueError(f"era must be 'v6.18' or 'v6.12', not {era!r}")
        if host_ad is not None and not callable(host_ad):
            raise TypeError("host_ad must be callable")
        limit = (<uint64_t>1) << (fmt.fmt.maxphyaddr - 12)
        if base_pfn is None:
            base = ((<uint64_t>1) << (min(fmt.fmt.maxphyaddr, 46) - 12)) // 4 * 3
        else:
            if not isinstance(base_pfn, int) or base_pfn < 0:
                raise ValueError(f"base_pfn must be a non-negative int, not {base_pfn!r}")
            base = base_pfn
        if base == 0:
            raise ValueError("base_pfn must not be 0 (pfn 0 is never a page table)")
        if base > limit or max_tables > limit - base:
            raise ValueError(f"tables [{base:#x}, {base + max_tables:#x}) do not fit below "
                             f"MAXPHYADDR {fmt.fmt.maxphyaddr} (pfn limit {limit:#x})")
        self.fmt = fmt
        self.a.fmt = fmt.fmt
        self.a.host_64bit = fmt.fmt.host_64bit
        self.a.era = PT_ERA_V6_18 if era == "v6.18" else PT_ERA_V6_12
        self.a.prove_mmu = prove_mmu
        self.a.base_pfn = base
        self.a.tables_per_chunk = tables_per_chunk
        shift = 0
        while ((<uint64_t>1) << shift) < tables_per_chunk:
            shift += 1
        self.a.chunk_shift = shift
        self.a.chunk_mask = tables_per_chunk - 1
        self.a.hdr_off = tables_per_chunk * PAGE_SIZE_C
        self.a.meta_off = self.a.hdr_off + tables_per_chunk * sizeof(kvm_mmu_page)
        self.a.max_chunks = max_tables // tables_per_chunk
        self.a.chunk_base = <uint8_t **>calloc(self.a.max_chunks, sizeof(uint8_t *))
        if self.a.chunk_base == NULL:
            raise MemoryError()
        self._dir_bytes = self.a.max_chunks * sizeof(uint8_t *)
        self._vcpus_raw = calloc(nr_vcpus + 1, sizeof(kvm_vcpu_lockless))
        if self._vcpus_raw == NULL:
            raise MemoryError()
        self.a.vcpus = <kvm_vcpu_lockless *>((<size_t>self._vcpus_raw + 63) & ~(<size_t>63))
        self.a.nr_vcpus = nr_vcpus
        for i in range(nr_vcpus):
            self.a.vcpus[i].mode = OUTSIDE_GUEST_MODE
        self.a.rcu_gp_seq = 1
        for i in range(3):
            self.a.pools[i].arena = &self.a
            self.a.pools[i].kind = i
        self._chunks = []
        self._table_views = []
        self._header_views = []
        self._meta_views = []
        self._walk_owner = [None] * nr_vcpus
        self._walk_token = [None] * nr_vcpus
        self._tls = threading.local()
        self._host_ad = host_ad

    def __repr__(self):
        return (f"PtArena({self.fmt!r}, {'64' if self.a.host_64bit else '32'}-bit host, "
                f"era={self.era!r}, base_pfn={self.a.base_pfn:#x}, "
                f"{self.a.n_chunks}/{self.a.max_chunks} chunks of {self.a.tables_per_chunk}, "
                f"{self.a.n_sps} sps)")

    def __dealloc__(self):
        free(self.a.chunk_base)
        free(self._vcpus_raw)
        free(self.a.log)

    # -- geometry -------------------------------------------------------------

    @property
    def host_64bit(self):
        """False: 32-bit host, SPTEs are ``union split_spte``."""
        return bool(self.a.host_64bit)

    @property
    def era(self):
        return "v6.18" if self.a.era == PT_ERA_V6_18 else "v6.12"

    @property
    def gfn_direct_bits(self):
        """``kvm->arch.gfn_direct_bits``: the gfn bits a direct (non-mirror)
        TDP root is indexed with (the TDX shared bit), 0 otherwise."""
        return self.a.gfn_direct_bits

    @gfn_direct_bits.setter
    def gfn_direct_bits(self, value):
        # one bit (the shared bit), below 2**40 gfns; set before any root is
        # walked with it (KVM_TDX_INIT_VM runs before the first vCPU root)
        cdef uint64_t v = u64_arg(value, "gfn_direct_bits")
        if v & (v - 1) or v >> 40:
            raise ValueError(f"gfn_direct_bits={v:#x} must be 0 or a single bit below 2**40")
        if v != self.a.gfn_direct_bits and self.a.n_sps:
            raise ValueError("gfn_direct_bits cannot change once the arena holds pages")
        self.a.gfn_direct_bits = v

    @property
    def base_pfn(self):
        return self.a.base_pfn

    @property
    def max_tables(self):
        return self.a.max_chunks * self.a.tables_per_chunk

    @property
    def tables_per_chunk(self):
        return self.a.tables_per_chunk

    @property
    def n_chunks(self):
        return self.a.n_chunks

    @property
    def capacity(self):
        """Page slots in the chunks allocated so far."""
        return self.a.n_chunks * self.a.tables_per_chunk

    @property
    def nr_vcpus(self):
        return self.a.nr_vcpus

    @property
    def nonpresent_value(self):
        """SHADOW_NONPRESENT_VALUE of the arena's format (new tables hold it)."""
        return self.a.fmt.nonpresent_value

    @property
    def nbytes(self):
        """Bytes the arena holds: chunks, chunk directory and vCPU states."""
        cdef uint64_t n = 0
        for c in self._chunks:
            n += (<cnp.ndarray>c).nbytes
        return n + self._dir_bytes + (self.a.nr_vcpus + 1) * sizeof(kvm_vcpu_lockless)

    @property
    def bytes_per_table(self):
        """:attr:`nbytes` divided by the page slots allocated (chunks x pages)."""
        return self.nbytes / self.capacity if self.a.n_chunks else float("nan")

    def owns_pfn(self, pfn):
        """Is `pfn` inside the range reserved for this arena's pages?"""
        cdef uint64_t c_pfn = u64_arg(pfn, "pfn")
        return self.a.base_pfn <= c_pfn < self.a.base_pfn + self.max_tables

    # -- growth ---------------------------------------------------------------

    cdef int _grow_for(self, uint64_t tables, uint64_t headers) except -1:
        """Add chunks so that `tables` more pages and `headers` more headers
        can be taken without growing.  All-or-nothing; the caller checked
        the capacity."""
        with self._grow_lock:       # threads of the shared side grow the arena too
            return self._grow_locked(tables, headers)

    cdef int _grow_locked(self, uint64_t tables, uint64_t headers) except -1:
        cdef pt_arena_t *a = &self.a
        cdef uint64_t T = a.tables_per_chunk, need_slots = 0, have = a.n_chunks * T
        cdef uint64_t n_new, nbytes, addr, pad, c, i
        cdef cnp.ndarray buf
        if tables > a.n_free_tables:
            need_slots = max(need_slots, a.tables_hw + tables - a.n_free_tables)
        if headers > a.n_free_sps:
            need_slots = max(need_slots, a.headers_hw + headers - a.n_free_sps)
        if need_slots <= have:
            return 0
        n_new = (need_slots - have + T - 1) // T
        if a.n_chunks + n_new > a.max_chunks:
            raise KvmNoMemoryError("page-table arena is full")
        nbytes = a.meta_off + T * sizeof(pt_slot_meta) + PAGE_SIZE_C
        new = [np.zeros(nbytes, dtype=np.uint8) for _ in range(n_new)]   # may raise: nothing changed yet
        for buf in new:
            addr = <size_t>cnp.PyArray_DATA(buf)
            pad = (PAGE_SIZE_C - (addr & (PAGE_SIZE_C - 1))) & (PAGE_SIZE_C - 1)
            c = a.n_chunks
            a.chunk_base[c] = <uint8_t *>(addr + pad)
            self._chunks.append(buf)
            self._table_views.append(buf[pad:pad + T * PAGE_SIZE_C].view(np.uint64).reshape(T, SPTES_PER_PAGE_C))
            self._header_views.append(buf[pad + a.hdr_off:pad + a.meta_off].view(HEADER_DTYPE))
            self._meta_views.append(buf[pad + a.meta_off:pad + a.meta_off + T * sizeof(pt_slot_meta)].view(META_DTYPE))
            pt_store_release64(&a.n_chunks, c + 1)
        return 0

    def grow(self, n_chunks=1):
        """Allocate `n_chunks` more chunks now (caches grow the arena on demand)."""
        cdef uint64_t n = _int_arg("n_chunks", n_chunks)
        cdef uint64_t T = self.a.tables_per_chunk
        self._writer("grow")
        if n > self.a.max_chunks - self.a.n_chunks:
            raise KvmNoMemoryError(f"page-table arena is full ({self.a.n_chunks} of "
                                   f"{self.a.max_chunks} chunks, n_chunks={n})")
        self._grow_for(self.a.n_free_tables + (self.a.n_chunks + n) * T - self.a.tables_hw, 0)

    cdef uint64_t _available(self, int kind):
        cdef uint64_t total = self.a.max_chunks * self.a.tables_per_chunk
        if kind == PT_CACHE_PAGE_HEADER:
            return self.a.n_free_sps + total - self.a.headers_hw
        return self.a.n_free_tables + total - self.a.tables_hw

    # -- locations ------------------------------------------------------------

    def table_pfn(self, table_index):
        """pfn of page `table_index` (``base_pfn + table_index``)."""
        cdef uint64_t c_table_index = u64_arg(table_index, "table_index")
        if c_table_index >= self.max_tables:
            raise ValueError(f"table index {table_index} is outside 0..{self.max_tables - 1}")
        return self.a.base_pfn + c_table_index

    def table_index(self, pfn):
        """Table index of page `pfn`."""
        cdef uint64_t c_pfn = u64_arg(pfn, "pfn")
        if not self.owns_pfn(c_pfn):
            raise ValueError(f"pfn {pfn:#x} is not a page of this arena")
        return c_pfn - self.a.base_pfn

    def make_sptep(self, table_index, index):
        """sptep of entry `index` (0..511) of page `table_index`."""
        cdef uint64_t c_table_index = u64_arg(table_index, "table_index")
        cdef unsigned int c_index = u32_arg(index, "index")
        if c_index >= SPTES_PER_PAGE_C:
            raise ValueError(f"SPTE index {index} is outside 0..511")
        return make_sptep(self.table_pfn(c_table_index), c_index)

    def sptep_location(self, sptep):
        """``(table_index, index)`` of `sptep`."""
        cdef uint64_t c_sptep = u64_arg(sptep, "sptep")
        if (c_sptep & 7) or not self.owns_pfn(sptep_table_pfn(c_sptep)):
            raise ValueError(f"sptep {sptep:#x} is not an SPTE address of this arena")
        return sptep_table_pfn(c_sptep) - self.a.base_pfn, spte_index(c_sptep)

    def make_spteps(self, table_indices, indices):
        """Batch :meth:`make_sptep`: uint64 arrays (broadcast) -> uint64 sptep array."""
        t = _u64_like("table_indices", table_indices)
        i = _u64_like("indices", indices)
        if t.size and int(t.max()) >= self.max_tables:
            raise ValueError("table index outside the arena")
        if i.size and int(i.max()) >= SPTES_PER_PAGE_C:
            raise ValueError("SPTE index outside 0..511")
        return ((t + np.uint64(self.a.base_pfn)) << np.uint64(12)) | (i << np.uint64(3))

    def sptep_locations(self, spteps):
        """Batch :meth:`sptep_location`: -> (table_indices, indices) uint64 arrays."""
        s = _u64_like("spteps", spteps)
        pfn = s >> np.uint64(12)
        if s.size and (np.any(s & np.uint64(7)) or int(pfn.min()) < self.a.base_pfn or
                       int(pfn.max()) >= self.a.base_pfn + self.max_tables):
            raise ValueError("sptep outside the arena")
        return pfn - np.uint64(self.a.base_pfn), (s >> np.uint64(3)) & np.uint64(511)

    def sp_sptep(self, sp, index):
        """sptep of entry `index` of `sp`'s table."""
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        cdef unsigned int c_index = u32_arg(index, "index")
        self._check_sp(c_sp, True)
        if c_index >= SPTES_PER_PAGE_C:
            raise ValueError(f"SPTE index {index} is outside 0..511")
        return make_sptep(pt_sp_ptr(&self.a, c_sp).spt, c_index)

    def sp_pa(self, sp):
        """Host physical address of `sp`'s table (``__pa(sp->spt)``), what
        make_nonleaf_spte() takes."""
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        self._check_sp(c_sp, True)
        return pt_sp_ptr(&self.a, c_sp).spt << 12

    def sptep_to_sp(self, sptep):
        """sp handle of the table holding `sptep`."""
        cdef uint64_t c_sptep = u64_arg(sptep, "sptep")
        self._check_sptep(c_sptep)
        return pt_page_sp(&self.a, sptep_table_pfn(c_sptep))

    def spte_to_child_sp(self, spte):
        """sp handle of the table a non-leaf SPTE points to (0: not an arena page)."""
        cdef uint64_t c_spte = u64_arg(spte, "spte")
        return spte_to_child_sp(&self.a, c_spte)

    # -- checks ---------------------------------------------------------------

    cdef int _check_sptep(self, sptep_t sptep) except -1:
        cdef pt_slot_meta *m
        if not pt_sptep_in_arena(&self.a, sptep):
            raise ValueError(f"sptep {sptep:#x} is not an SPTE of a page this arena handed out")
        m = pt_slot(&self.a, pt_table_index(&self.a, sptep))
        if m.table_state == PT_PAGE_SPT:
            return 0
        if m.table_state == PT_PAGE_FREE:
            raise KvmUseAfterFreeError(f"sptep {sptep:#x} is in a freed (poisoned) page")
        raise ValueError(f"sptep {sptep:#x} is in a page in state "
                         f"{PAGE_STATES.get(m.table_state, m.table_state)}, not a live table")

    cdef int _check_sp(self, uint64_t sp, bint allow_pending) except -1:
        cdef uint8_t st
        if sp == 0 or sp > self.a.headers_hw:
            raise ValueError(f"sp {sp} is not a header this arena handed out")
        st = pt_slot(&self.a, sp - 1).sp_state
        if st == PT_SP_IN_USE or (allow_pending and st == PT_SP_RCU_PENDING):
            return 0
        if st == PT_SP_FREE:
            raise KvmUseAfterFreeError(f"sp {sp} has been freed (poisoned)")
        raise ValueError(f"sp {sp} is {SP_STATES.get(st, st)}")

    cdef int _warn_since(self, uint32_t *before) except -1:
        cdef int i
        if KVMMMU_DEBUG:
            for i in range(PT_NR_DBG):
                if self.a.debug_warn[i] != self._debug_seen[i]:
                    self._debug_seen[i] = self.a.debug_warn[i]
                    if self.warn_sink is not None:
                        self.warn_sink.warn(_DEBUG_TEXT[i][0], _DEBUG_TEXT[i][1])
        if before == NULL:
            return 0
        for i in range(PT_NR_WARN):
            if self.a.warn[i] != before[i]:
                if self.warn_sink is not None:      # the VM's one WARN record
                    self.warn_sink.warn(_WARN_TEXT[i].split(":")[0], _WARN_TEXT[i], once=True)
                warnings.warn(_WARN_TEXT[i], KvmMmuWarning, stacklevel=3)
        return 0

    # -- views ----------------------------------------------------------------

    def table(self, table_index):
        """Zero-copy ``uint64[512]`` view of page `table_index` (any state).

        Writing through a view bypasses the SPTE protocols: use the helpers
        for anything a lockless reader may see.
        """
        cdef uint64_t c_table_index = u64_arg(table_index, "table_index")
        if c_table_index >= self.a.n_chunks * self.a.tables_per_chunk:
            raise ValueError(f"table index {table_index} is not in an allocated chunk")
        return self._table_views[c_table_index >> self.a.chunk_shift][c_table_index & self.a.chunk_mask]

    def spt(self, sp):
        """Zero-copy ``uint64[512]`` view of `sp`'s table (``sp->spt``)."""
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        self._check_sp(c_sp, True)
        return self.table(pt_sp_ptr(&self.a, c_sp).spt - self.a.base_pfn)

    def shadowed_translation(self, sp):
        """View of `sp`'s ``shadowed_translation`` page, or None (direct sp)."""
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        self._check_sp(c_sp, True)
        cdef uint64_t pfn = pt_sp_ptr(&self.a, c_sp).shadowed_translation
        return None if pfn == 0 else self.table(pfn - self.a.base_pfn)

    def chunk_tables(self, chunk):
        """``(tables_per_chunk, 512)`` uint64 view of a chunk's pages."""
        cdef uint64_t c_chunk = u64_arg(chunk, "chunk")
        if c_chunk >= self.a.n_chunks:
            raise ValueError(f"chunk={chunk} is outside 0..{self.a.n_chunks - 1}")
        return self._table_views[c_chunk]

    def chunk_headers(self, chunk):
        """``(tables_per_chunk,)`` :data:`HEADER_DTYPE` read-only view of a
        chunk's headers (C follows the handles in them: change fields with
        :meth:`set_sp`)."""
        cdef uint64_t c_chunk = u64_arg(chunk, "chunk")
        if c_chunk >= self.a.n_chunks:
            raise ValueError(f"chunk={chunk} is outside 0..{self.a.n_chunks - 1}")
        return _readonly(self._header_views[c_chunk].view(np.uint8)).view(HEADER_DTYPE)

    def _hdr_view(self, sp):
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        # The writable record, for set_sp only (its values are checked first).
        return self._header_views[(c_sp - 1) >> self.a.chunk_shift][(c_sp - 1) & self.a.chunk_mask, ...]

    def sp_header(self, sp):
        """0-d :data:`HEADER_DTYPE` read-only view of `sp`'s header (any
        state).  It cannot be made writable: C follows the handles in it."""
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        if c_sp == 0 or c_sp > self.a.n_chunks * self.a.tables_per_chunk:
            raise ValueError(f"sp {sp} is not a header slot of this arena")
        cdef uint64_t k = (c_sp - 1) & self.a.chunk_mask
        hv = self._header_views[(c_sp - 1) >> self.a.chunk_shift]
        return _readonly(hv[k:k + 1].view(np.uint8)).view(HEADER_DTYPE).reshape(())

    def table_states(self):
        """uint8 array (copy): PT state of every page slot handed out (:data:`PAGE_STATES`)."""
        return self._meta_column("table_state", self.a.tables_hw)

    def sp_states(self):
        """uint8 array (copy): state of every header slot handed out (:data:`SP_STATES`)."""
        return self._meta_column("sp_state", self.a.headers_hw)

    def _meta_column(self, name, n):
        cdef uint64_t c_n = u64_arg(n, "n")
        if self.a.n_chunks == 0:
            return np.zeros(0, np.uint8)
        return np.concatenate([m[name] for m in self._meta_views])[:c_n].copy()

    # -- header fields ----------------------------------------------------------

    def get_sp(self, sp):
        """Every header field of `sp` as a dict (``unsync_child_bitmap`` as a
        512-bit int)."""
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        self._check_sp(c_sp, True)
        v = self.sp_header(c_sp)
        out = {}
        for name, *_ in KVM_MMU_PAGE_FIELDS:
            if name == "unsync_child_bitmap":
                out[name] = sum(int(w) << (64 * i) for i, w in enumerate(v[name]))
            elif name in _BOOL_FIELDS:
                out[name] = bool(v[name])
            else:
                out[name] = int(v[name])
        return out

    def set_sp(self, sp, **fields):
        """Set header fields of `sp`, checked against the kernel's widths.

        Values that do not fit raise (OverflowError / ValueError / TypeError)
        before anything is written.  ``spt``, ``shadowed_translation`` and the
        RCU fields belong to the arena and cannot be set.
        """
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        self._writer("set_sp")
        self._check_sp(c_sp, True)
        names = {f[0]: f for f in KVM_MMU_PAGE_FIELDS}
        staged = []
        for name, value in fields.items():
            if name not in names:
                raise AttributeError(f"struct kvm_mmu_page has no field {name!r}")
            if name in _ARENA_OWNED:
                raise ValueError(f"{name} is owned by the arena")
            if name == "clear_spte_count" and pt_slot(&self.a, c_sp - 1).sp_state == PT_SP_RCU_PENDING:
                raise ValueError("clear_spte_count shares the rcu_head of an RCU-pending sp")
            if name == "unsync_child_bitmap":
                if not isinstance(value, int) or not 0 <= value < (1 << 512):
                    raise ValueError("unsync_child_bitmap must be an int in [0, 2**512)")
                value = np.array([(value >> (64 * i)) & 0xFFFFFFFFFFFFFFFF for i in range(8)],
                                 dtype=np.uint64)
            elif name in _BOOL_FIELDS:
                if not (isinstance(value, bool) or value in (0, 1)):
                    raise ValueError(f"{name} is a bool, not {value!r}")
                value = bool(value)
            else:
                if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                    raise TypeError(f"{name} must be an int, not {type(value).__name__}")
                info = np.iinfo(np.dtype(names[name][1]))
                if not info.min <= value <= info.max:
                    raise OverflowError(f"{name}={value} does not fit {names[name][2]} "
                                        f"({np.dtype(names[name][1]).itemsize * 8}-bit)")
            staged.append((name, value))
        v = self._hdr_view(c_sp)
        for name, value in staged:
            v[name] = value

    # -- allocation and freeing ----------------------------------------------------

    def alloc_sp(self, MmuMemoryCache page_cache not None, MmuMemoryCache header_cache not None,
                 MmuMemoryCache info_cache=None, *, role=0, gfn=0,
                 bint tdp_mmu_page=False):
        """Take a header and a table (and, for indirect pages, a
        shadowed_translation page) from the caches: the allocation half of
        kvm_mmu_alloc_shadow_page / tdp_mmu_alloc_sp.  Returns the sp handle.

        Raises KvmNoMemoryError, taking nothing, if a cache is empty.
        """
        cdef uint32_t c_role = u32_arg(role, "role")
        cdef uint64_t c_gfn = u64_arg(gfn, "gfn")
        cdef uint64_t sp
        cdef int rc
        self._writer("alloc_sp")
        for c, kind, name in ((page_cache, PT_CACHE_SHADOW_PAGE, "page_cache"),
                              (header_cache, PT_CACHE_PAGE_HEADER, "header_cache"),
                              (info_cache, PT_CACHE_SHADOWED_INFO, "info_cache")):
            if c is None:
                continue
            if (<MmuMemoryCache>c).arena is not self:
                raise ValueError(f"{name} belongs to another arena")
            if (<MmuMemoryCache>c).kind != kind:
                raise ValueError(f"{name} is a {(<MmuMemoryCache>c).kind_name} cache")
        rc = pt_alloc_sp(&self.a, &page_cache.mc, &header_cache.mc,
                         &info_cache.mc if info_cache is not None else NULL, &sp)
        if rc:
            empty = [n for c, n in ((page_cache, "mmu_shadow_page_cache"),
                                    (header_cache, "mmu_page_header_cache"),
                                    (info_cache, "mmu_shadowed_info_cache"))
                     if c is not None and (<MmuMemoryCache>c).mc.nobjs == 0]
            raise KvmNoMemoryError(f"{', '.join(empty)} empty: top up before allocating")
        cdef kvm_mmu_page *h = pt_sp_ptr(&self.a, sp)
        h.role = c_role
        h.gfn = c_gfn
        h.tdp_mmu_page = tdp_mmu_page
        return sp

    def kvm_mmu_free_shadow_page(self, sp):
        """Poison and free `sp` now.  Safe only when no lockless walker can
        reach it: after kvm_flush_remote_tlbs(), after a grace period, or at
        teardown.  Normal paths use :meth:`kvm_mmu_commit_zap_page` or
        :meth:`call_rcu_free_sp`."""
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        self._writer("kvm_mmu_free_shadow_page")
        self._check_sp(c_sp, False)
        pt_free_sp(&self.a, c_sp)
        self._warn_since(NULL)

    def kvm_mmu_commit_zap_page(self, sps, *, timeout=None):
        """Free the zapped pages `sps` (a sequence of sp handles): flush
        remote TLBs, which waits for every vCPU inside a shadow-MMU lockless
        walk, then poison and free each.  WARNs (KvmMmuWarning) for a page
        that is not ``role.invalid`` or still has ``root_count``, and frees
        it anyway, as the kernel does."""
        self._writer("kvm_mmu_commit_zap_page")
        handles = [_int_arg(f"sps[{i}]", sp) for i, sp in enumerate(sps)]
        seen = set()
        for sp in handles:
            self._check_sp(sp, False)
            if sp in seen:
                raise ValueError(f"sp {sp} listed twice")
            seen.add(sp)
        arr = np.array(handles, dtype=np.uint64)
        self._no_walk_in_this_thread("kvm_mmu_commit_zap_page", rcu=False)
        cdef uint32_t before[PT_NR_WARN]
        memcpy(before, self.a.warn, sizeof(before))
        cdef const uint64_t[::1] v = arr
        cdef Py_ssize_t n = arr.shape[0]
        if n == 0:
            return
        # Bounded flush (a walker whose thread died raises), then free.
        self._flush_bounded(_deadline(timeout), "kvm_mmu_commit_zap_page")
        _free_zapped(&self.a, &v[0], n)
        self._warn_since(before)

    def kvm_flush_remote_tlbs(self, *, timeout=None):
        """Flush every vCPU's TLB, waiting for vCPUs in
        READING_SHADOW_PAGE_TABLES to end their walk (IN_GUEST_MODE vCPUs are
        kicked to EXITING_GUEST_MODE).  Returns the number of vCPUs waited for.

        The wait runs without the GIL in slices; between slices it raises
        :class:`KvmDeadWalkerError` if the walk was begun on a thread that has
        exited, TimeoutError after `timeout` seconds (None: no limit), and
        KeyboardInterrupt on Ctrl-C."""
        self._writer("kvm_flush_remote_tlbs")
        self._no_walk_in_this_thread("kvm_flush_remote_tlbs", rcu=False)
        return self._flush_bounded(_deadline(timeout), "kvm_flush_remote_tlbs")

    cdef int _flush_bounded(self, object deadline, str what) except -1:
        # kvm_flush_remote_tlbs() of mmu_lockless.pyx, with the wait for each
        # walker cut into GIL-released slices.
        cdef pt_arena_t *a = &self.a
        cdef int i, waited = 0
        cdef uint64_t w
        cdef bint done, ipi = False
        a.remote_tlb_flush_requests += 1
        pt_smp_mb()
        for i in range(a.nr_vcpus):
            w = pt_load_acquire64(&a.vcpus[i].mode)
            if (w & 3) != OUTSIDE_GUEST_MODE:
                ipi = True
            if (w & 3) == OUTSIDE_GUEST_MODE or (w & 3) == EXITING_GUEST_MODE:
                continue
            if (w & 3) == IN_GUEST_MODE:
                pt_try_cmpxchg64(&a.vcpus[i].mode, &w, (w & ~(<uint64_t>3)) | EXITING_GUEST_MODE)
                continue
            waited += 1
            self._busy = what
            try:
                while True:
                    with nogil:
                        done = _wait_word_change(&a.vcpus[i].mode, w, _WAIT_SLICE_NS)
                    if done:
                        break
                    self._check_walker(i, what)
                    _check_deadline(deadline, what, i)
            finally:
                self._busy = None
        if ipi:                     # as kvm_flush_remote_tlbs() in mmu_lockless.pyx
            a.remote_tlb_flush += 1
        a.flush_ipis_waited += waited
        return waited

    cdef int _rcu_wait(self, object deadline, str what) except -1:
        # Finish the grace period in progress, in GIL-released slices.
        cdef pt_arena_t *a = &self.a
        cdef bint done
        cdef int i
        self._busy = what
        try:
            while True:
                with nogil:
                    done = _rcu_finish_within(a, _WAIT_SLICE_NS)
                if done:
                    return 0
                for i in range(a.nr_vcpus):
                    if a.vcpus[i].rcu_gp != 0 and a.vcpus[i].rcu_gp <= a.rcu_gp_target:
                        self._check_walker(i, what)
                        _check_deadline(deadline, what, i)
        finally:
            self._busy = None

    cdef int _check_walker(self, int vcpu, str what) except -1:
        PyErr_CheckSignals()
        ref = self._walk_token[vcpu]
        if ref is not None and ref() is None:
            raise KvmDeadWalkerError(
                f"{what}: vCPU {vcpu}'s lockless walk was begun on a thread that has exited "
                "without ending it; the wait could never finish")
        return 0

    cdef int _writer(self, str what) except -1:
        """The exclusive side (mmu_lock held for write): refused while another
        thread's writer waits without the GIL or while any thread holds the
        shared side (a TDP MMU map running without the GIL)."""
        if self._busy is not None:
            raise ConcurrentUseError(f"{what}: the arena is in use by another thread "
                               f"({self._busy} is waiting); writers need mmu_lock")
        if self._shared:
            raise ConcurrentUseError(f"{what}: {self._shared} thread(s) hold the arena's shared "
                                     "side (mmu_lock for read); writers need mmu_lock for write")
        if self.a.chunk_base == NULL:
            raise ObjectInitError(f"{what}: PtArena.__init__ has not run")
        return 0

    cdef int _no_exclusive(self, str what) except -1:
        """What may run beside the shared side but not beside an exclusive
        holder waiting without the GIL (rcu_poll, cache topups)."""
        if self._busy is not None:
            raise ConcurrentUseError(f"{what}: the arena is in use by another thread "
                                     f"({self._busy} holds it exclusively)")
        if self.a.chunk_base == NULL:
            raise ObjectInitError(f"{what}: PtArena.__init__ has not run")
        return 0

    cdef int _shared_enter(self, str what) except -1:
        """Take the shared side (the TDP MMU under mmu_lock held for read):
        any number of threads at once, none while an exclusive holder runs.
        Returns the holder's RCU slot (its walks are RCU read-side sections:
        a grace period waits for it, :func:`pt_shared_rcu_lock`).  The check
        and the claim run with no Python code in between."""
        cdef int slot
        self._no_exclusive(what)
        if self._shared_slots == ~(<uint64_t>0):
            raise ConcurrentUseError(f"{what}: more than {PT_NR_SHARED} threads in the shared "
                                     "side of one arena")
        slot = 0
        while (self._shared_slots >> slot) & 1:
            slot += 1
        self._shared_slots |= (<uint64_t>1) << slot
        self._shared += 1
        return slot

    cdef void _shared_leave(self, int slot):
        pt_store_release64(&self.a.shared_rcu[slot], 0)
        self._shared_slots &= ~((<uint64_t>1) << slot)
        self._shared -= 1

    @property
    def shared_holders(self):
        """Threads holding the shared side now (TDP MMU maps under the read lock)."""
        return self._shared

    def shared_rcu_snapshots(self):
        """The grace-period sequence each shared holder's current RCU
        read-side section began in (0: the holder is between sections), one
        per holder slot in use; a grace period started later waits for every
        nonzero one that is not above its target."""
        cdef int i
        return [pt_load_acquire64(&self.a.shared_rcu[i]) for i in range(PT_NR_SHARED)
                if (self._shared_slots >> i) & 1]

    def call_rcu_free_sp(self, sp):
        """TDP MMU: free `sp` after a grace period (``call_rcu(&sp->rcu_head,
        tdp_mmu_free_sp_rcu_callback)``).  The page stays intact until then.
        64-bit hosts only: the kernel has no rcu_head under CONFIG_X86_32 (its
        bytes hold clear_spte_count there)."""
        cdef uint64_t c_sp = u64_arg(sp, "sp")
        # beside the shared side too (the last put of a root zapped under
        # mmu_lock held for read): the queue is under the RCU lock
        self._no_exclusive("call_rcu_free_sp")
        if not self.a.host_64bit:
            raise ValueError("call_rcu_free_sp: a 32-bit host has no rcu_head (TDP MMU is 64-bit only)")
        self._check_sp(c_sp, False)
        call_rcu_free_sp(&self.a, c_sp)

    def rcu_poll(self):
        """Advance the model's RCU without blocking; returns the sps freed.
        May run while other threads hold the shared side (their walks are
        RCU readers: the grace period waits for them), not beside an
        exclusive holder waiting without the GIL."""
        self._no_exclusive("rcu_poll")
        return rcu_poll(&self.a)

    def synchronize_rcu(self, *, timeout=None):
        """Wait for a grace period (every RCU reader that started earlier has
        left), then free the callbacks that became due.  Bounded like
        :meth:`kvm_flush_remote_tlbs` (dead reader thread, `timeout`, Ctrl-C)."""
        self._writer("synchronize_rcu")
        self._no_walk_in_this_thread("synchronize_rcu", rcu=True)
        deadline = _deadline(timeout)
        if self.a.rcu_gp_in_progress:
            self._rcu_wait(deadline, "synchronize_rcu")
        _rcu_start_gp(&self.a)
        self._rcu_wait(deadline, "synchronize_rcu")
        _rcu_do_callbacks(&self.a)

    def rcu_barrier(self, *, timeout=None):
        """Wait until every pending RCU free has run (bounded like
        :meth:`synchronize_rcu`)."""
        self._writer("rcu_barrier")
        self._no_walk_in_this_thread("rcu_barrier", rcu=True)
        deadline = _deadline(timeout)
        while self.a.rcu_head != 0:
            if rcu_poll(&self.a) == 0 and self.a.rcu_head != 0 and self.a.rcu_gp_in_progress:
                self._rcu_wait(deadline, "rcu_barrier")

    def _no_walk_in_this_thread(self, what, bint rcu):
        me = threading.get_ident()
        for v, owner in enumerate(self._walk_owner):
            if owner == me and (rcu == bool(self.a.vcpus[v].tdp_mmu_active)):
                raise LocklessWalkError(f"{what} would wait forever: this thread is inside a "
                                        f"lockless walk of vCPU {v}")

    # -- lockless walks --------------------------------------------------------------

    cdef int _vcpu(self, int vcpu) except -1:
        if not 0 <= vcpu < self.a.nr_vcpus:
            raise ValueError(f"vcpu {vcpu} is outside 0..{self.a.nr_vcpus - 1}")
        return vcpu

    def set_tdp_mmu_active(self, vcpu, bint active):
        """Set ``is_tdp_mmu_active(vcpu)`` (tdp_mmu_enabled and a direct root):
        it picks RCU instead of vcpu->mode for the vCPU's lockless walks.  The
        TDP MMU exists only on 64-bit hosts."""
        cdef int c_vcpu = s32_arg(vcpu, "vcpu")
        self._vcpu(c_vcpu)
        if active and not self.a.host_64bit:
            raise ValueError("the TDP MMU requires a 64-bit host")
        if self._walk_owner[c_vcpu] is not None:
            raise LocklessWalkError(f"vCPU {vcpu} is inside a lockless walk")
        self.a.vcpus[c_vcpu].tdp_mmu_active = active

    def is_tdp_mmu_active(self, vcpu):
        cdef int c_vcpu = s32_arg(vcpu, "vcpu")
        return bool(self.a.vcpus[self._vcpu(c_vcpu)].tdp_mmu_active)

    def vcpu_mode(self, vcpu):
        """``vcpu->mode`` (OUTSIDE_GUEST_MODE ... READING_SHADOW_PAGE_TABLES)."""
        cdef int c_vcpu = s32_arg(vcpu, "vcpu")
        return int(pt_read_once64(&self.a.vcpus[self._vcpu(c_vcpu)].mode) & 3)

    def set_vcpu_mode(self, vcpu, mode):
        """Model vcpu_enter_guest / guest exits: OUTSIDE, IN or EXITING_GUEST_MODE
        (READING_SHADOW_PAGE_TABLES is entered only by a lockless walk)."""
        cdef int c_vcpu = s32_arg(vcpu, "vcpu")
        cdef int c_mode = s32_arg(mode, "mode")
        cdef kvm_vcpu_lockless *v = &self.a.vcpus[self._vcpu(c_vcpu)]
        if c_mode not in (OUTSIDE_GUEST_MODE, IN_GUEST_MODE, EXITING_GUEST_MODE):
            raise ValueError(f"mode {mode} cannot be set directly")
        if self._walk_owner[c_vcpu] is not None:
            raise LocklessWalkError(f"vCPU {vcpu} is inside a lockless walk")
        pt_store_mb64(&v.mode, (pt_read_once64(&v.mode) & ~(<uint64_t>3)) | <uint64_t>c_mode)

    def walk_shadow_page_lockless_begin(self, vcpu):
        """Start a lockless walk on `vcpu` (RCU read lock if the vCPU's MMU is
        the TDP MMU, else IRQs off + READING_SHADOW_PAGE_TABLES)."""
        cdef int c_vcpu = s32_arg(vcpu, "vcpu")
        self._vcpu(c_vcpu)
        if self._walk_owner[c_vcpu] is not None:
            raise LocklessWalkError(f"vCPU {vcpu} is already inside a lockless walk")
        if not self.a.vcpus[c_vcpu].tdp_mmu_active and (self.a.vcpus[c_vcpu].mode & 3) != OUTSIDE_GUEST_MODE:
            raise LocklessWalkError(f"vCPU {vcpu} is not OUTSIDE_GUEST_MODE")
        token = getattr(self._tls, "token", None)
        if token is None:
            token = self._tls.token = _WalkerToken()
        self._walk_owner[c_vcpu] = threading.get_ident()
        self._walk_token[c_vcpu] = weakref.ref(token)
        walk_shadow_page_lockless_begin(&self.a, c_vcpu)

    def walk_shadow_page_lockless_end(self, vcpu):
        cdef int c_vcpu = s32_arg(vcpu, "vcpu")
        self._vcpu(c_vcpu)
        if self._walk_owner[c_vcpu] is None:
            raise LocklessWalkError(f"vCPU {vcpu} is not inside a lockless walk")
        walk_shadow_page_lockless_end(&self.a, c_vcpu)
        self._walk_owner[c_vcpu] = None
        self._walk_token[c_vcpu] = None

    def kvm_tdp_mmu_walk_lockless_begin(self, vcpu):
        """rcu_read_lock() on behalf of `vcpu` (the vCPU must be TDP MMU active)."""
        cdef int c_vcpu = s32_arg(vcpu, "vcpu")
        if not self.is_tdp_mmu_active(c_vcpu):
            raise LocklessWalkError(f"vCPU {vcpu} is not using the TDP MMU")
        self.walk_shadow_page_lockless_begin(c_vcpu)

    def kvm_tdp_mmu_walk_lockless_end(self, vcpu):
        cdef int c_vcpu = s32_arg(vcpu, "vcpu")
        if not self.is_tdp_mmu_active(c_vcpu):
            raise LocklessWalkError(f"vCPU {vcpu} is not using the TDP MMU")
        self.walk_shadow_page_lockless_end(c_vcpu)

    def lockless_walk(self, vcpu):
        """``with arena.lockless_walk(vcpu): ...`` brackets a walk with
        walk_shadow_page_lockless_begin/end."""
        cdef int c_vcpu = s32_arg(vcpu, "vcpu")
        self._vcpu(c_vcpu)
        return _LocklessWalk(self, c_vcpu)

    # -- SPTE helpers ------------------------------------------------------------

    def mmu_spte_set(self, sptep, new_spte):
        """Non-present -> present (or MMIO).  KvmMmuWarning if it was present."""
        cdef uint64_t c_sptep = u64_arg(sptep, "sptep")
        cdef uint64_t c_new_spte = u64_arg(new_spte, "new_spte")
        self._writer("mmu_spte_set")
        self._check_sptep(c_sptep)
        cdef uint32_t before[PT_NR_WARN]
        memcpy(before, self.a.warn, sizeof(before))
        mmu_spte_set(&self.a, c_sptep, c_new_spte)
        self._warn_since(before)

    def mmu_spte_update(self, sptep, new_spte, host_ad=None):
        """Update a present SPTE's state bits; returns True if remote TLBs must
        be flushed.  See mmu_spte.pyx for the rules of each era; v6.12 passes
        lost A/D to ``host_ad(pfn, accessed, dirty)`` (default: the arena's)."""
        cdef uint64_t c_sptep = u64_arg(sptep, "sptep")
        cdef uint64_t c_new_spte = u64_arg(new_spte, "new_spte")
        self._writer("mmu_spte_update")
        self._check_sptep(c_sptep)
        cdef uint32_t before[PT_NR_WARN]
        cdef pt_ad_out ad
        memcpy(before, self.a.warn, sizeof(before))
        flush = mmu_spte_update(&self.a, c_sptep, c_new_spte, &ad)
        self._report_ad(&ad, host_ad)
        self._warn_since(before)
        return flush

    def mmu_spte_clear_track_bits(self, sptep, host_ad=None):
        """Zap a leaf SPTE; returns the old SPTE.  Drops the page count of the
        table's level if it was present; v6.12 passes its A/D state to
        ``host_ad(pfn, accessed, dirty)``."""
        cdef uint64_t c_sptep = u64_arg(sptep, "sptep")
        self._writer("mmu_spte_clear_track_bits")
        self._check_sptep(c_sptep)
        cdef uint32_t before[PT_NR_WARN]
        cdef pt_ad_out ad
        memcpy(before, self.a.warn, sizeof(before))
        old = mmu_spte_clear_track_bits(&self.a, c_sptep, &ad)
        self._report_ad(&ad, host_ad)
        self._warn_since(before)
        return old

    def mmu_spte_clear_no_track(self, sptep):
        """Clear an upper-level or MMIO SPTE."""
        cdef uint64_t c_sptep = u64_arg(sptep, "sptep")
        self._writer("mmu_spte_clear_no_track")
        self._check_sptep(c_sptep)
        mmu_spte_clear_no_track(&self.a, c_sptep)

    def mmu_spte_get_lockless(self, sptep):
        """One lockless SPTE read (32-bit: the clear_spte_count retry loop)."""
        cdef uint64_t c_sptep = u64_arg(sptep, "sptep")
        self._check_sptep(c_sptep)
        return mmu_spte_get_lockless(&self.a, c_sptep)

    def try_cmpxchg64(self, sptep, old_spte, new_spte):
        """64-bit compare-and-exchange (fast page fault, lockless aging; atomic
        on 32-bit hosts too).  Returns ``(success, current value)``."""
        cdef uint64_t c_sptep = u64_arg(sptep, "sptep")
        cdef uint64_t c_old_spte = u64_arg(old_spte, "old_spte")
        cdef uint64_t c_new_spte = u64_arg(new_spte, "new_spte")
        self._check_sptep(c_sptep)
        cdef uint64_t old = c_old_spte
        ok = pt_try_cmpxchg64(pt_sptep_ptr(&self.a, c_sptep), &old, c_new_spte)
        return bool(ok), (c_new_spte if ok else old)

    def kvm_update_page_stats(self, level, count):
        """``kvm->stat.pages[level - 1] += count`` (leaf levels 1..3)."""
        cdef int c_level = s32_arg(level, "level")
        cdef int64_t c_count = s64_arg(count, "count")
        if not 1 <= c_level <= KVM_NR_PAGE_SIZES:
            raise ValueError(f"level {level} is outside 1..{KVM_NR_PAGE_SIZES}")
        kvm_update_page_stats(&self.a, c_level, c_count)

    @property
    def page_stats(self):
        """``kvm->stat.pages``: {'pages_4k', 'pages_2m', 'pages_1g'}."""
        return {"pages_4k": self.a.pages[0], "pages_2m": self.a.pages[1],
                "pages_1g": self.a.pages[2]}

    @property
    def remote_tlb_flush_requests(self):
        """``kvm->stat.remote_tlb_flush_requests`` alone (cheap: one load).
        Each request is a KVM_REQ_TLB_FLUSH made to every vCPU; a vCPU that
        last saw a smaller count has one pending."""
        return self.a.remote_tlb_flush_requests

    cdef _report_ad(self, pt_ad_out *ad, host_ad):
        if ad.flags == 0:
            return
        cb = host_ad if host_ad is not None else self._host_ad
        if cb is not None:
            cb(ad.pfn, bool(ad.flags & PT_AD_ACCESSED), bool(ad.flags & PT_AD_DIRTY))

    def get_sptes_lockless(self, spteps, out=None, *, vcpu=None):
        """Batch lockless read: ``out[i] = mmu_spte_get_lockless(spteps[i])``.

        Parameters
        ----------
        spteps : ndarray of uint64, shape (n,)
            SPTE locations of live tables.
        out : ndarray of uint64, shape (n,), optional
            Where to store the values.
        vcpu : int, optional
            If given, the batch runs inside walk_shadow_page_lockless_begin /
            end of that vCPU.

        One pass without the GIL: each location is range-checked (an
        SPTE of a page the arena handed out) and read.  A location that
        fails the check raises ValueError; a value that reads as poison (its
        page was freed before or during the read) raises KvmUseAfterFreeError.
        A page that is not a live table (e.g. still in a memory cache) reads
        as whatever it holds.  Returns `out`.
        """
        _check_array("spteps", spteps)
        cdef Py_ssize_t n = spteps.shape[0], i, bad = -1, poisoned = -1
        out = _out_array("out", out, n, np.uint64, inputs=(spteps,))
        if self.a.chunk_base == NULL:
            raise ObjectInitError("get_sptes_lockless: PtArena.__init__ has not run")
        if n == 0:
            return out
        cdef const uint64_t[::1] s = spteps
        cdef uint64_t[::1] o = out
        cdef pt_arena_t *a = &self.a
        cdef uint64_t retries = 0, v
        cdef int cpu = -1
        if vcpu is not None:
            cpu = self._vcpu(_int_arg("vcpu", vcpu, 0, self.a.nr_vcpus - 1))
            self.walk_shadow_page_lockless_begin(cpu)
        self._readers += 1
        try:
            with nogil:
                for i in range(n):
                    if not pt_sptep_in_arena(a, s[i]):
                        bad = i
                        break
                    v = _get_spte_lockless(a, s[i], &retries)
                    o[i] = v
                    if v == PT_POISON and poisoned < 0:
                        poisoned = i
        finally:
            self._readers -= 1
            if cpu >= 0:
                self.walk_shadow_page_lockless_end(cpu)
            if retries:
                pt_fetch_add64(&a.lockless_retries, retries)
        if bad >= 0:
            raise ValueError(f"spteps[{bad}] = {s[bad]:#x} is not an SPTE of a page this "
                             "arena handed out")
        if poisoned >= 0:
            raise KvmUseAfterFreeError(f"spteps[{poisoned}] = {s[poisoned]:#x} read poison: "
                                       "its page has been freed")
        return out

    # -- access log -------------------------------------------------------------------

    def start_access_log(self, capacity=4096):
        """Record every SPTE half/whole access, barrier and clear_spte_count
        access of the low-level accessors, in program order, until
        :meth:`stop_access_log` (at most `capacity` events, 1..2**32).  For
        tests and teaching: the order is only meaningful from one thread, and
        the log cannot be started or stopped while a batch read runs."""
        cdef uint64_t cap = _int_arg("capacity", capacity, 1, 1 << 32)
        self._log_guard("start_access_log")
        cdef uint64_t *buf = <uint64_t *>malloc(2 * cap * sizeof(uint64_t))
        if buf == NULL:
            raise MemoryError(f"start_access_log: no memory for capacity={cap}")
        free(self.a.log)
        self.a.log = NULL
        if buf == NULL:
            raise MemoryError()
        self.a.log_len = 0
        self.a.log_cap = cap
        self.a.log = buf

    def _log_guard(self, what):
        self._writer(what)
        if self._readers:
            raise ConcurrentUseError(f"{what}: a batch read of another thread is using the log")

    def stop_access_log(self):
        """Stop recording; returns ``[(event, value), ...]`` where event is one
        of :data:`ACCESS_EVENTS` (values of halves are 32-bit)."""
        out = []
        cdef uint64_t i
        if self.a.log == NULL:
            return out
        self._log_guard("stop_access_log")
        for i in range(self.a.log_len):
            out.append((ACCESS_EVENTS[self.a.log[2 * i]], self.a.log[2 * i + 1]))
        free(self.a.log)
        self.a.log = NULL
        self.a.log_len = self.a.log_cap = 0
        return out

    # -- statistics -----------------------------------------------------------------

    @property
    def debug_warn_counts(self):
        """MMU_WARN_ON checks that fired (name -> count); always 0 unless
        :data:`DEBUG_CHECKS` (a KVMMMU_DEBUG_CYTHON=1 build)."""
        names = ("free_not_empty", "free_with_parents", "write_not_live", "wrong_level")
        return {n: self.a.debug_warn[i] for i, n in enumerate(names)}

    @property
    def warn_counts(self):
        """How often each WARN site fired (name -> count)."""
        names = ("set_present", "update_nonpresent", "writable_invariant", "update_pfn",
                 "ept_ve", "commit_zap", "bad_level")
        return {n: self.a.warn[i] for i, n in enumerate(names)}

    def stats(self):
        """Counters of the arena (a dict of ints)."""
        a = &self.a
        return dict(
            n_chunks=a.n_chunks, capacity=self.capacity, tables_hw=a.tables_hw,
            headers_hw=a.headers_hw, free_tables=a.n_free_tables,
            cached_tables=a.n_cached_tables, spt_tables=a.n_spt, info_tables=a.n_info,
            free_sps=a.n_free_sps, cached_sps=a.n_cached_sps, sps=a.n_sps,
            rcu_pending=a.n_rcu_pending, sps_freed=a.nr_sps_freed,
            remote_tlb_flush_requests=a.remote_tlb_flush_requests,
            remote_tlb_flush=a.remote_tlb_flush, flush_ipis_waited=a.flush_ipis_waited,
            rcu_gp_seq=a.rcu_gp_seq, rcu_gps=a.rcu_gps,
            nr_set_spte=a.nr_set, nr_update_clear_spte_fast=a.nr_update_fast,
            nr_update_clear_spte_slow=a.nr_update_slow,
            nr_count_spte_clear=a.nr_count_spte_clear, lockless_retries=a.lockless_retries,
            nbytes=self.nbytes,
        )

    # -- auditor ----------------------------------------------------------------------

    def audit(self, *, bint contents=True):
        """Check the arena invariants (module docstring); raise
        PtArenaAuditError listing every violation found (up to 64).

        `contents` also scans page and header bytes (poison in free slots,
        fill values in cached ones, no poison and no link to a dead page in
        live tables).  Call it with no lockless writer running.  Returns the
        recounted states as a dict.  The auditor lives in pt_audit.pyx.
        """
        if self.a.chunk_base == NULL:
            raise ObjectInitError("audit: PtArena.__init__ has not run")
        return audit_arena(&self.a, len(self._chunks), contents)


# --- memory caches ---------------------------------------------------------------------

@cython.no_gc_clear
cdef class MmuMemoryCache:
    """``struct kvm_mmu_memory_cache`` over a :class:`PtArena`.

    One vCPU's cache: use it from one thread at a time.  It keeps its arena
    alive; if both die in one garbage cycle, the cached objects are simply
    dropped with the arena's chunks.

    Parameters
    ----------
    arena : PtArena
    kind : {"shadow_page", "page_header", "shadowed_info"}
        ``mmu_shadow_page_cache`` (pages filled with SHADOW_NONPRESENT_VALUE),
        ``mmu_page_header_cache`` (zeroed headers) or
        ``mmu_shadowed_info_cache`` (zeroed pages; the kernel does not zero
        them, the model does so that arenas are byte-reproducible).
    capacity : int
        1..KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE (40).
    """

    def __init__(self, PtArena arena not None, kind="shadow_page", *,
                 capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE):
        capacity = _int_arg("capacity", capacity, -0x80000000, 0x7FFFFFFF)
        if self.arena is not None:
            raise ObjectInitError("MmuMemoryCache.__init__ called twice")
        if arena.a.chunk_base == NULL:
            raise ObjectInitError("arena: PtArena.__init__ has not run")
        if not 1 <= capacity <= KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE:
            raise ValueError(f"capacity={capacity} is outside 1..{KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE}")
        self.kind = _cache_kind(kind)
        self.arena = arena
        kvm_mmu_memory_cache_init(&self.mc, capacity)

    def __dealloc__(self):
        # The arena outlives its caches (this reference), but in a garbage
        # cycle the collector may already have cleared the arena's chunk list,
        # i.e. released the memory the cached objects live in: then there is
        # nothing left to give back.
        if self.arena is not None and self.arena._chunks is not None:
            kvm_mmu_free_memory_cache(&self.mc, pt_pool_free, &self.arena.a.pools[self.kind])

    cdef int _ready(self, str what) except -1:
        # The pools are the page allocator (pool_lock, the arena's growth lock):
        # a vCPU tops its caches up while other vCPUs fault under the read
        # lock, as in the kernel.  The cache itself is one vCPU's.
        if self.arena is None:
            raise ObjectInitError(f"MmuMemoryCache.{what}: __init__ has not run")
        if self.arena._chunks is None:
            raise ObjectInitError(f"MmuMemoryCache.{what}: the arena has been torn down")
        self.arena._no_exclusive(f"MmuMemoryCache.{what}")
        if self._user is not None:
            raise ConcurrentUseError(f"MmuMemoryCache.{what}: the cache is in use by another "
                                     f"thread ({self._user}); a vCPU's caches are its own")
        return 0

    cdef int _claim(self, str what) except -1:
        """Mark the cache as used by `what` until :meth:`_release` (a nogil
        map consumes it); a second user raises ConcurrentUseError.  Check and
        claim with no Python code in between."""
        if self._user is not None:
            raise ConcurrentUseError(f"{what}: {self.kind_name} cache in use by another thread "
                                     f"({self._user}); each thread needs its own vCPU's caches")
        self._user = what
        return 0

    cdef void _release(self):
        self._user = None

    @property
    def kind_name(self):
        return {v: k for k, v in CACHE_KINDS.items()}[self.kind]

    @property
    def nobjs(self):
        return self.mc.nobjs

    @property
    def capacity(self):
        return self.mc.capacity

    @property
    def objects(self):
        """Handles held (pfns for page caches, sp handles for header caches)."""
        return [self.mc.objects[i] for i in range(self.mc.nobjs)]

    def topup(self, min_objs):
        """kvm_mmu_topup_memory_cache(cache, min_objs).

        Nothing happens if the cache holds at least `min_objs`.  Otherwise it
        is filled to capacity, or as far as the arena allows if that is still
        at least `min_objs` (growing the arena by whole chunks).  If the arena
        cannot provide `min_objs` objects, KvmNoMemoryError is raised and
        nothing changes (the kernel would keep the objects it did get in the
        cache; a failed topup aborts the fault either way).
        """
        cdef PtArena arena = self.arena
        cdef uint64_t need, take, avail
        cdef int rc
        self._ready("topup")
        min_objs = _int_arg("min_objs", min_objs, 0, self.mc.capacity)
        if self.mc.nobjs >= min_objs:
            return
        need = min_objs - self.mc.nobjs
        avail = arena._available(self.kind)
        if avail < need:
            raise KvmNoMemoryError(
                f"{self.kind_name} cache: need {need} more, the arena has {avail} left "
                f"(max_tables={arena.max_tables})")
        take = min(<uint64_t>(self.mc.capacity - self.mc.nobjs), avail)
        if self.kind == PT_CACHE_PAGE_HEADER:
            arena._grow_for(0, take)
        else:
            arena._grow_for(take, 0)
        rc = kvm_mmu_topup_memory_cache(&self.mc, min_objs, pt_pool_alloc, &arena.a.pools[self.kind])
        if rc:
            # Another thread's topup took what the check counted (the pools
            # are shared by every vCPU): the arena is at max_tables.
            raise KvmNoMemoryError(f"{self.kind_name} cache: the arena ran out while topping up "
                                   f"(max_tables={arena.max_tables})")

    def free(self):
        """kvm_mmu_free_memory_cache: give every cached object back (poisoned)."""
        self._ready("free")
        kvm_mmu_free_memory_cache(&self.mc, pt_pool_free, &self.arena.a.pools[self.kind])

    def __repr__(self):
        return f"MmuMemoryCache({self.kind_name!r}, nobjs={self.mc.nobjs}, capacity={self.mc.capacity})"

