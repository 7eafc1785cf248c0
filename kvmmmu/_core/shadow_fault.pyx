"""The shadow MMU's fault hot path in C (issue 12, Speed).

:class:`ShadowFastCore` serves :class:`kvmmmu.shadow_mmu.ShadowMmu` (one per
VM, over its :class:`~kvmmmu._core.pt_arena.PtArena`).  It does the part of a
fault that runs over shadow pages that already exist:

* ``FNAME(fetch)`` for a guest 4K leaf: down the linked indirect pages of
  the guest walk, re-reading each gPTE the walk used (``FNAME(gpte_changed)``,
  the 8-entry group at 4K), ``kvm_mmu_spte_requested``, the leaf;
* ``direct_map`` at a 4K goal over existing direct pages;
* the leaf: ``mmu_set_spte`` / ``make_spte`` with the kernel's rules (a
  present leaf of the same pfn keeps its rmap entry, the unsync question
  through write tracking and the page hash, dirty-log marking, the flush
  decision), ``rmap_add`` into the memslot's rmap, ``pages_4k``, the
  ``kvm_mmu_set_spte`` event;
* the 8-entry prefetch: ``FNAME(pte_prefetch)`` up to the first gPTE that
  would be mapped (invalid gPTEs drop their SPTE and end it, as in the
  kernel), ``direct_pte_prefetch`` whole (host pfns read from the model's
  host page tables, GUP-fast style).

Contract: a fetch either completes, with exactly the events, statistics and
state the Python path (``ShadowMmu.c_fast_path = False``) produces, or
returns ``SF_DECLINE`` having changed nothing, and the Python path does the
whole step.  It declines for anything the Python model must do: a missing
child page (``kvm_mmu_get_child_sp`` allocates), a page with a non-zero
``write_flooding_count`` on the walk, a changed gPTE, a present leaf with
another pfn, a gfn some shadow page may shadow (the unsync decision), a
write that would be write-protected (batch only), a full rmap list
(recycling), an empty descriptor cache, a dirty-logged slot without a
bitmap.  A prefetch that reaches a gPTE to map returns where Python resumes
(``prefetch_resume``).  The trace records go into the core's own buffer and
are handed to :mod:`kvmmmu.mmutrace` before the method returns (or dropped
on a decline), so Python and C events stay in order.

Every index C reads is checked by C: sp handles (in range, in use), table
and shadowed-translation pfns (in the arena), guest gpas (inside a slot of
the core's guest-memory copy), gfns (inside the memslot), rmap, dirty
bitmap, write-track and host page-table indices (the lengths the builder
recorded).

Thread-safety: one core per ShadowMmu; its methods run with the GIL held
from start to end (nothing is released), under the VM's ``mmu_lock`` held
for write by the caller, as the whole shadow MMU.  Not for concurrent use:
a second thread calling into the same core while one is inside is
impossible (GIL held throughout), and a reentrant call from a trace sink
raises :class:`~kvmmmu.errors.ConcurrentUseError`.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
cimport numpy as cnp

import numpy as np

from kvmmmu._core.types cimport sptep_t, make_sptep, spte_index, sptep_table_pfn
from kvmmmu._core.mmu_defs cimport (
    ACC_ALL, ACC_WRITE_MASK, RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED,
)
from kvmmmu._core.pt_arena cimport (
    PtArena, pt_arena_t, kvm_mmu_page, pt_sp_ptr, pt_table_ptr, pt_slot, pt_page_sp,
    PT_SP_IN_USE, PT_ERA_V6_18, PT_NR_WARN, pt_ad_out, mmu_spte_update,
    mmu_spte_clear_track_bits, kvm_update_page_stats,
)
from kvmmmu._core.spte cimport (
    spte_fmt_t, make_spte, make_spte_wants_unsync, MKSPTE_PREFETCH, MKSPTE_HOST_WRITABLE,
    MKSPTE_AD_DISABLED, MKSPTE_NX_HUGE_PAGES, MKSPTE_UNSYNC_REFUSED, is_shadow_present_pte,
    is_large_pte, spte_to_pfn, is_executable_pte, RsvdBitsValidate, rsvd_bits_validate,
    is_rsvd_spte, PT_PRESENT_MASK, PT_ACCESSED_MASK, PT_WRITABLE_MASK,
)
from kvmmmu._core.rmap cimport (
    RmapSlot, PteListDescCache, kvm_rmap_slot, kvm_rmap_head, gfn_to_rmap, __pte_list_add,
    __kvm_rmap_trylock, kvm_rmap_unlock, kvm_rmap_get, pte_list_count_val, KVM_RMAP_LOCKED,
    RMAP_RECYCLE_THRESHOLD, pte_list_desc_pool,
)
from kvmmmu._core.memcache cimport kvm_mmu_memory_cache
from kvmmmu._core.role cimport role_level, role_access, role_direct, role_passthrough, role_ad_disabled
from kvmmmu._core.trace_buf cimport (
    trace_buf_t, trace_buf_init, trace_push, trace_drain, trace_on, TP_KVM_MMU_SET_SPTE,
    TP_KVM_MMU_SPTE_REQUESTED, TRACE_BUF_CAP,
)
from kvmmmu._core.guest_walk cimport (
    gw_mem_t, gw_slot_t, gw_mmu_t, guest_walker_t, walk_addr_generic, GW_OK, GW_ENOMEM,
    PTTYPE_32, PTTYPE_64,
)

from kvmmmu.errors import ConcurrentUseError

cnp.import_array()

cdef extern from *:
    void __builtin_prefetch(const void *p) nogil

# the PFERR bits from their one home (the walker's header); _GUEST_ACCESS:
# what FNAME(page_fault) passes to the walk (the error code without RSVD)
cdef extern from "guest_walk_defs.h" nogil:
    const uint64_t _PFERR_PRESENT "PFERR_PRESENT_MASK"
    const uint64_t _PFERR_WRITE "PFERR_WRITE_MASK"
    const uint64_t _PFERR_USER "PFERR_USER_MASK"
    const uint64_t _PFERR_RSVD "PFERR_RSVD_MASK"
    const uint64_t _GUEST_ACCESS "GW_ACCESS_ALLOWED"

# memslot flags (kvmmmu.memslots) and host PTE bits (kvmmmu.host)
cdef enum:
    _LOG_DIRTY = 1 << 0
    _READONLY = 1 << 1
    _MEMSLOT_INVALID = 1 << 16
    _HPTE_PRESENT = 0x01
    _HPTE_WRITE = 0x02
    _HPTE_YOUNG = 0x04
    _HPTE_DIRTY = 0x08
    _PREFETCH_N = 8

cdef uint64_t _GOLDEN_RATIO_64 = 0x61C8864680B583EB

#: returned by the fetch methods when nothing changed and Python must do the step
DECLINE = SF_DECLINE


# ---------------------------------------------------------------------------
# Checked access to the arena
# ---------------------------------------------------------------------------

cdef inline bint _table_ok(const pt_arena_t *a, uint64_t pfn) noexcept nogil:
    """`pfn` is a page the arena handed out (its chunk exists)."""
    cdef uint64_t t = pfn - a.base_pfn
    return pfn >= a.base_pfn and t < a.tables_hw and (t >> a.chunk_shift) < a.n_chunks


cdef inline kvm_mmu_page *_sp(const pt_arena_t *a, uint64_t sp) noexcept nogil:
    """The header of a live sp handle whose table is in the arena, or NULL."""
    cdef uint64_t idx = sp - 1
    cdef kvm_mmu_page *h
    if sp == 0 or idx >= a.headers_hw or (idx >> a.chunk_shift) >= a.n_chunks:
        return NULL
    if pt_slot(a, idx).sp_state != PT_SP_IN_USE:
        return NULL
    h = pt_sp_ptr(a, sp)
    if not _table_ok(a, h.spt):
        return NULL
    return h


cdef inline uint64_t *_spt(const pt_arena_t *a, const kvm_mmu_page *h) noexcept nogil:
    return pt_table_ptr(a, h.spt - a.base_pfn)


cdef inline uint64_t _child_sp(const pt_arena_t *a, uint64_t spte) noexcept nogil:
    """sp handle of the table a non-leaf SPTE links (0: none in the arena)."""
    cdef uint64_t pfn = spte_to_pfn(spte)
    if not _table_ok(a, pfn):
        return 0
    return pt_page_sp(a, pfn)


# ---------------------------------------------------------------------------
# Guest memory (the same slots vm.guest_memory() exposes)
# ---------------------------------------------------------------------------

cdef inline bint _gread(const gw_slot_t *slots, int n, uint64_t gpa, int size,
                        uint64_t *out) noexcept nogil:
    """Little-endian `size`-byte read at `gpa`; False for a hole (the
    kernel's failed copy_from_user, which gpte_changed counts as a change)."""
    cdef int i
    cdef uint64_t gfn = gpa >> 12, off
    cdef uint32_t v32 = 0
    cdef const gw_slot_t *s
    for i in range(n):
        s = &slots[i]
        if gfn - s.base_gfn < s.npages:
            off = gpa - (s.base_gfn << 12)
            if off + <uint64_t>size > (s.npages << 12):
                return False
            if size == 8:
                memcpy(out, s.hva + off, 8)
            else:
                memcpy(&v32, s.hva + off, 4)
                out[0] = v32
            return True
    return False


cdef inline const uint8_t *_ghva(const gw_slot_t *slots, int n, uint64_t gpa) noexcept nogil:
    """Host address of guest byte `gpa` (8 readable bytes), or NULL."""
    cdef int i
    cdef uint64_t gfn = gpa >> 12, off
    for i in range(n):
        if gfn - slots[i].base_gfn < slots[i].npages:
            off = gpa - (slots[i].base_gfn << 12)
            if off + 8 > (slots[i].npages << 12):
                return NULL
            return slots[i].hva + off
    return NULL


# ---------------------------------------------------------------------------
# Trace records (the field order of kvmmmu/_core/tdp_trace.pyx)
# ---------------------------------------------------------------------------

cdef inline void _tr_spte_requested(trace_buf_t *tb, uint64_t gfn, uint64_t pfn,
                                    int level) noexcept nogil:
    cdef uint64_t v[3]
    if trace_on(TP_KVM_MMU_SPTE_REQUESTED):
        v[0] = gfn
        v[1] = pfn | (gfn & (((<uint64_t>1) << ((level - 1) * 9)) - 1))
        v[2] = <uint8_t>level
        trace_push(tb, TP_KVM_MMU_SPTE_REQUESTED, 3, v)


cdef inline void _tr_set_spte(trace_buf_t *tb, const spte_fmt_t *f, uint64_t gfn, uint64_t spte,
                              sptep_t sptep, int level) noexcept nogil:
    cdef uint64_t v[7]
    if trace_on(TP_KVM_MMU_SET_SPTE):
        v[0] = gfn
        v[1] = spte
        v[2] = sptep
        v[3] = <uint8_t>level
        v[4] = f.present_mask != 0 or (spte & PT_PRESENT_MASK) != 0
        v[5] = is_executable_pte(f, spte)
        v[6] = <uint64_t><int64_t>((1 if spte & f.user_mask else 0) if f.user_mask else -1)
        trace_push(tb, TP_KVM_MMU_SET_SPTE, 7, v)


# ---------------------------------------------------------------------------
# Building the C views of Python objects
# ---------------------------------------------------------------------------

cdef void *_arr(object a, int typenum, uint64_t minlen, bint writable):
    """The data of a 1-d C-contiguous ndarray of `typenum` with at least
    `minlen` elements (writable if asked), else NULL (no C view)."""
    cdef cnp.ndarray arr
    if type(a) is not cnp.ndarray:
        return NULL
    arr = <cnp.ndarray>a
    if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_TYPE(arr) != typenum or \
            not cnp.PyArray_IS_C_CONTIGUOUS(arr) or <uint64_t>cnp.PyArray_DIM(arr, 0) < minlen:
        return NULL
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        return NULL
    return cnp.PyArray_DATA(arr)


cdef int _slot_view(object vm, object slot, sf_slot_t *sv, list refs) except -1:
    """Fill `sv` from a memslot (parts C cannot use are left NULL)."""
    cdef RmapSlot rs
    memset(sv, 0, sizeof(sf_slot_t))
    sv.base_gfn = slot.base_gfn
    sv.npages = slot.npages
    sv.flags = slot.flags
    sv.userspace_addr = slot.userspace_addr
    arch = slot.arch
    r = arch.rmap
    if type(r) is RmapSlot:
        rs = <RmapSlot>r
        if rs.c.base_gfn == sv.base_gfn and rs.c.npages == sv.npages:
            sv.rmap = &rs.c
            sv.pool = &rs.pool.c
            sv.pool_gen = &rs.pool.c.gen
            refs.append(rs)
    bm = slot.dirty_bitmap
    if bm is not None:
        sv.dirty_bitmap = <uint64_t *>_arr(bm, cnp.NPY_UINT64, (sv.npages + 63) >> 6, True)
        if sv.dirty_bitmap != NULL:
            refs.append(bm)
    wt = arch.gfn_write_track
    if wt is not None:
        sv.wtrack = <uint16_t *>_arr(wt, cnp.NPY_UINT16, sv.npages, False)
        if sv.wtrack != NULL:
            refs.append(wt)
        else:
            sv.wtrack_opaque = True
    host = vm.host
    vma = host.find_vma(sv.userspace_addr)
    if vma is not None and not vma.thp and not vma.hugetlb and \
            sv.userspace_addr + (sv.npages << 12) <= <uint64_t>vma.end:
        start = vma.start
        n = (vma.end - start) >> 12
        pte, pfn = vma.pte, vma.pfn
        sv.hpte = <uint8_t *>_arr(pte, cnp.NPY_UINT8, n, True)
        sv.hpfn = <uint64_t *>_arr(pfn, cnp.NPY_UINT64, n, False)
        if sv.hpte == NULL or sv.hpfn == NULL:
            sv.hpte = NULL
            sv.hpfn = NULL
        else:
            sv.vma_start = start
            sv.vma_npages = n
            refs.append(pte)
            refs.append(pfn)
    return 0


cdef bint _same(object a, tuple b):
    """`a` is a tuple holding the very objects of `b` (identity, no ==)."""
    cdef Py_ssize_t i
    if type(a) is not tuple or len(<tuple>a) != len(b):
        return False
    for i in range(len(b)):
        if (<tuple>a)[i] is not b[i]:
            return False
    return True


cdef inline void _mark_tables_dirty(const guest_walker_t *w, const sf_slot_t *svs,
                                    int nsv) noexcept nogil:
    # FNAME(update_accessed_dirty_bits): each table whose entry got A/D is
    # marked dirty in its memslot (kvm_vcpu_mark_page_dirty), as
    # Vcpu.walk_addr does for a walk from Python
    cdef int level, j
    cdef uint64_t gfn, rel
    for level in range(1, 6):
        if not (w.ad_written >> (level - 1)) & 1:
            continue
        gfn = w.pte_gpa[level - 1] >> 12
        for j in range(nsv):
            rel = gfn - svs[j].base_gfn
            if rel < svs[j].npages:
                if svs[j].flags & _LOG_DIRTY and svs[j].dirty_bitmap != NULL:
                    svs[j].dirty_bitmap[rel >> 6] |= (<uint64_t>1) << (rel & 63)
                break


cdef class ShadowFastCore:
    """The C fault path of one :class:`~kvmmmu.shadow_mmu.ShadowMmu` (see the
    module docstring).  Built by the ShadowMmu over its arena; the methods
    take the model's objects and read what they need."""
    cdef readonly PtArena arena
    cdef pt_arena_t *a
    cdef trace_buf_t tb
    cdef sf_fault_t last             # the last fetch's fault (outputs for Python)
    cdef gw_slot_t *mem_slots        # guest memory of one address space (malloc'd)
    cdef int mem_n
    cdef object mem_key
    cdef list mem_refs
    cdef object _hash                # the ShadowMmu's mmu_page_hash (during a call)
    cdef bint _busy
    cdef sf_slot_t _sv               # the last memslot's view, valid while _sv_key matches
    cdef object _sv_key
    cdef list _sv_refs

    def __cinit__(self):
        trace_buf_init(&self.tb)
        self.mem_slots = NULL
        self.mem_n = 0
        self.mem_key = None
        self.mem_refs = []
        self._busy = False
        self._sv_key = None
        self._sv_refs = []

    def __init__(self, PtArena arena not None):
        self.arena = arena
        self.a = &arena.a

    def __dealloc__(self):
        if self.mem_slots != NULL:
            free(self.mem_slots)
            self.mem_slots = NULL

    # ------------------------------------------------------------ header mirror
    def set_write_flooding_count(self, sp, int value):
        """``sp->write_flooding_count = value`` in the arena header of live
        sp handle `sp` (the Python mirror writes through; C reads it)."""
        cdef uint64_t h = sp
        cdef kvm_mmu_page *hdr = _sp(self.a, h)
        if hdr == NULL:
            raise ValueError(f"sp={sp!r} is not a live shadow page of this arena")
        hdr.write_flooding_count = value

    def write_flooding_count(self, sp):
        """The header's ``write_flooding_count`` of live sp handle `sp`."""
        cdef uint64_t h = sp
        cdef kvm_mmu_page *hdr = _sp(self.a, h)
        if hdr == NULL:
            raise ValueError(f"sp={sp!r} is not a live shadow page of this arena")
        return hdr.write_flooding_count

    # ------------------------------------------------------------ guest memory
    cdef int _mem(self, object vm, int as_id) except -1:
        """The guest memory of `as_id` as ``vm.guest_memory`` builds it (one
        slot per valid memslot inside one VMA), cached on the same key."""
        cdef gw_slot_t *slots
        cdef int i = 0, n
        cdef uint8_t[::1] view
        slots_obj = vm.memslots[as_id]
        vmas = vm.host.vmas
        key = (as_id, slots_obj.generation, id(vmas), len(vmas))
        if self.mem_key == key and self.mem_slots != NULL:
            return 0
        lst = []
        for s in slots_obj:
            if s.flags & _MEMSLOT_INVALID:
                continue
            size = s.npages << 12
            v = vm.host.find_vma(s.userspace_addr)
            if v is None or s.userspace_addr + size > v.end:
                continue
            off = s.userspace_addr - v.start
            lst.append((s.base_gfn, s.npages, v.data, off, not (s.flags & _READONLY)))
        n = len(lst)
        slots = <gw_slot_t *>malloc(sizeof(gw_slot_t) * (n if n else 1))
        if slots == NULL:
            raise MemoryError()
        refs = []
        try:
            for base_gfn, npages, data, off, writable in lst:
                view = data
                if off < 0 or off + (npages << 12) > view.shape[0]:
                    raise ValueError("a memslot reaches past its VMA's bytes")
                slots[i].base_gfn = base_gfn
                slots[i].npages = npages
                slots[i].hva = &view[0] + <size_t>off
                slots[i].writable = writable
                refs.append(view)
                i += 1
        except BaseException:
            free(slots)
            raise
        if self.mem_slots != NULL:
            free(self.mem_slots)
        self.mem_slots = slots
        self.mem_n = i
        self.mem_refs = refs
        self.mem_key = key
        return 0

    def drop_guest_memory(self):
        """Forget the cached guest-memory view (the next fetch rebuilds it)."""
        self.mem_key = None

    # ------------------------------------------------------------ pieces of the fetch
    cdef inline bint _gpte_changed(self, sf_fault_t *fl, int level) noexcept:
        cdef uint64_t gpa = fl.pte_gpa[level - 1], base, cur = 0
        cdef int size = fl.gpte_size, k
        if level == 1:
            base = gpa & ~(<uint64_t>(_PREFETCH_N * size - 1))
            for k in range(_PREFETCH_N):
                if not _gread(self.mem_slots, self.mem_n, base + <uint64_t>(k * size), size,
                              &fl.gptes[k]):
                    return True
            cur = fl.gptes[(gpa - base) // <uint64_t>size]
        elif not _gread(self.mem_slots, self.mem_n, gpa, size, &cur):
            return True
        return cur != fl.ptes[level - 1]

    cdef int _try_unsync(self, sf_fault_t *fl, sf_slot_t *sv, uint64_t gfn) except -2:
        """``mmu_try_to_unsync_pages`` as far as C can answer without changing
        anything: 1 = refused (write-tracked), 0 = no valid page with gPTEs
        shadows `gfn`, -1 = some page in its hash bucket has this gfn (the
        Python path decides, maybe unsyncing)."""
        cdef uint64_t bucket
        cdef PyObject *lst
        if fl.wtrack_enabled:
            if sv.wtrack_opaque:
                return -1
            if sv.wtrack != NULL and sv.wtrack[gfn - sv.base_gfn] != 0:
                return 1
        if fl.indirect_shadow_pages == 0:
            return 0
        bucket = (gfn * _GOLDEN_RATIO_64) >> 52
        lst = PyDict_GetItem(self._hash, bucket)
        if lst == NULL:
            return 0
        for sp in <object>lst:
            if sp.gfn == gfn:
                return -1
        return 0

    cdef int _set_spte(self, sf_fault_t *fl, sf_slot_t *sv, kvm_mmu_page *h, uint64_t *table,
                       unsigned int idx, unsigned int access, uint64_t gfn, uint64_t pfn,
                       bint prefetch, bint write_fault, kvm_mmu_memory_cache *cache,
                       bint dry, int *descs) except -2000:
        """``mmu_set_spte`` of a 4K leaf (fault: `prefetch` False; prefetch:
        True, host-writable).  RET_PF_* or SF_DECLINE (nothing changed).
        `dry`: only the checks (and the answer); `descs` counts the
        descriptors the rmap adds may take."""
        cdef const spte_fmt_t *f = &self.a.fmt
        cdef uint64_t old = table[idx], spte, val
        cdef bint was_rmapped = False, wrprot = False, has_gptes, flush, dirty
        cdef unsigned int mk = 0
        cdef uint32_t role = h.role
        cdef int r, ret = RET_PF_FIXED
        cdef uint64_t *st = NULL
        cdef uint64_t rel = gfn - sv.base_gfn
        cdef kvm_rmap_head *head = NULL
        cdef sptep_t sptep = make_sptep(h.spt, idx)
        cdef pt_ad_out ad
        if rel >= sv.npages:
            return SF_DECLINE
        if is_shadow_present_pte(old):
            if spte_to_pfn(old) != pfn:
                return SF_DECLINE                   # drop_spte + flush: Python
            if prefetch:
                return RET_PF_SPURIOUS
            was_rmapped = True
        if prefetch:
            mk |= MKSPTE_PREFETCH
        if not prefetch and not fl.map_writable:
            pass
        else:
            mk |= MKSPTE_HOST_WRITABLE
        if role_ad_disabled(role):
            mk |= MKSPTE_AD_DISABLED
        if fl.nx_huge_pages:
            mk |= MKSPTE_NX_HUGE_PAGES
        if access & ACC_WRITE_MASK and make_spte_wants_unsync(1, access, old, mk):
            r = self._try_unsync(fl, sv, gfn)
            if r < 0:
                return SF_DECLINE
            if r:
                mk |= MKSPTE_UNSYNC_REFUSED
        spte = make_spte(f, 1, access, pfn, old, mk, &wrprot)
        dirty = (spte & PT_WRITABLE_MASK) != 0 and (sv.flags & _LOG_DIRTY) != 0
        if dirty and sv.dirty_bitmap == NULL:
            return SF_DECLINE
        if old == spte:
            if not was_rmapped:
                return SF_DECLINE                   # the kernel WARNs: Python
            ret = RET_PF_SPURIOUS
        if wrprot and write_fault:
            if fl.strict:
                return SF_DECLINE
            ret = RET_PF_WRITE_PROTECTED
        has_gptes = not role_direct(role) and not role_passthrough(role)
        if has_gptes:
            if not _table_ok(self.a, h.shadowed_translation):
                return SF_DECLINE
            st = pt_table_ptr(self.a, h.shadowed_translation - self.a.base_pfn)
        elif role_passthrough(role) or role_access(role) != access or gfn != h.gfn + idx:
            return SF_DECLINE                       # kvm_mmu_page_set_translation WARNs: Python
        if not was_rmapped:
            if sv.rmap == NULL or rel >= sv.rmap.npages:
                return SF_DECLINE
            head = gfn_to_rmap(gfn, 1, sv.rmap)
            val = kvm_rmap_get(head)
            if pte_list_count_val(val) > RMAP_RECYCLE_THRESHOLD or \
                    (head.val & KVM_RMAP_LOCKED) != 0:
                return SF_DECLINE
            if val != 0:                            # may take a descriptor
                descs[0] += 1
                if cache.nobjs < descs[0]:
                    return SF_DECLINE
        if dry:
            return ret
        # ---- commit: mmu_set_spte's order (mark dirty, update, trace, rmap)
        if dirty:
            sv.dirty_bitmap[rel >> 6] |= (<uint64_t>1) << (rel & 63)
        if old != spte:
            flush = mmu_spte_update(self.a, sptep, spte, &ad)
            if flush:
                fl.flush = True
            _tr_set_spte(&self.tb, f, gfn, table[idx], sptep, 1)
        if not was_rmapped:
            if has_gptes:
                st[idx] = (gfn << 12) | access
            kvm_update_page_stats(self.a, 1, 1)
            if not __kvm_rmap_trylock(head, &val):
                raise ConcurrentUseError("rmap head locked during the C fault path")
            sv.pool_gen[0] += 1
            r = __pte_list_add(cache, sptep, &val)
            kvm_rmap_unlock(head, val)
            if r < 0:
                raise MemoryError("pte_list_desc cache ran dry inside the C fault path")
            if <uint64_t>r > sv.pool.max_mmu_rmap_size:
                sv.pool.max_mmu_rmap_size = r
        elif has_gptes:
            st[idx] = (st[idx] & ~(<uint64_t>0xFFF)) | access
        return ret

    cdef int _fname_prefetch(self, sf_fault_t *fl, sf_slot_t *sv, kvm_mmu_page *h,
                             uint64_t *table, unsigned int idx, rsvd_bits_validate *rsvd,
                             kvm_mmu_memory_cache *cache) except -2000:
        """``FNAME(pte_prefetch)`` of an indirect 4K page: SF_NO_RESUME when
        it ended here, else the entry the Python path resumes at (a gPTE
        whose gfn is in another memslot, a host mapping C cannot read, a
        mapping ``mmu_set_spte`` would decline).  Invalid gPTEs drop their
        (non-present) SPTE and end the prefetch, as do a gfn without a
        usable memslot and a host page GUP-fast would not give writable
        (``FNAME(prefetch_gpte)`` returns false), as in the kernel."""
        cdef unsigned int i0 = idx & ~(<unsigned int>(_PREFETCH_N - 1)), k, i, access
        cdef uint64_t gpte, gfn, rel, hi, pfn
        cdef int r, descs
        cdef pt_ad_out ad
        for k in range(_PREFETCH_N):
            i = i0 + k
            if i == idx or is_shadow_present_pte(table[i]):
                continue
            gpte = fl.gptes[k]
            if not (gpte & PT_PRESENT_MASK) or not (gpte & PT_ACCESSED_MASK) or \
                    is_rsvd_spte(rsvd, gpte, 1):
                mmu_spte_clear_track_bits(self.a, make_sptep(h.spt, i), &ad)
                return SF_NO_RESUME
            # FNAME(gpte_to_gfn), FNAME(gpte_access), FNAME(protect_clean_gpte)
            if fl.gpte_size == 4:
                gfn = (gpte & 0xFFFFF000) >> 12
                access = <unsigned int>(gpte & 7)
            else:
                gfn = (gpte & 0x000FFFFFFFFFF000) >> 12
                access = <unsigned int>((gpte & 7) ^ ((gpte >> 63) & 1))
            access &= role_access(h.role)
            if not (gpte & (1 << 6)):
                access &= ~ACC_WRITE_MASK
            rel = gfn - sv.base_gfn
            if rel >= sv.npages:
                return k                            # gfn_to_memslot: Python
            if sv.flags & _MEMSLOT_INVALID or (access & ACC_WRITE_MASK and sv.flags & _LOG_DIRTY):
                return SF_NO_RESUME                 # gfn_to_memslot_dirty_bitmap: none
            if sv.hpte == NULL:
                return k
            hi = ((sv.userspace_addr - sv.vma_start) >> 12) + rel
            if hi >= sv.vma_npages:
                return k
            if (sv.hpte[hi] & (_HPTE_PRESENT | _HPTE_WRITE)) != (_HPTE_PRESENT | _HPTE_WRITE):
                return SF_NO_RESUME                 # kvm_prefetch_pages: no page
            pfn = sv.hpfn[hi]
            if pfn >> 40:
                return k
            descs = 0
            r = self._set_spte(fl, sv, h, table, i, access, gfn, pfn, True, False, cache, True,
                               &descs)
            if r == SF_DECLINE:
                return k
            sv.hpte[hi] |= _HPTE_YOUNG | _HPTE_DIRTY
            self._set_spte(fl, sv, h, table, i, access, gfn, pfn, True, False, cache, False,
                           &descs)
        return SF_NO_RESUME

    cdef int _direct_prefetch(self, sf_fault_t *fl, sf_slot_t *sv, kvm_mmu_page *h,
                              uint64_t *table, unsigned int idx,
                              kvm_mmu_memory_cache *cache) except -2000:
        """``__direct_pte_prefetch`` of a direct 4K page: the runs of
        non-present entries around `idx`, each mapped from its first gfn
        while the host pages are present and writable.  All checks run
        first; 1 = done, 0 = left whole to Python (nothing changed)."""
        cdef unsigned int i0 = idx & ~(<unsigned int>(_PREFETCH_N - 1)), i, k
        cdef unsigned int access = role_access(h.role)
        cdef int starts[_PREFETCH_N]
        cdef int ends[_PREFETCH_N]
        cdef uint64_t pfns[_PREFETCH_N]
        cdef int count[_PREFETCH_N]
        cdef int nruns = 0, start = -1, run, descs = 0, r, ndo
        cdef uint64_t gfn, hi
        cdef bint stop = False
        for i in range(i0, i0 + _PREFETCH_N):
            if is_shadow_present_pte(table[i]) or i == idx:
                if start < 0:
                    continue
                starts[nruns] = start
                ends[nruns] = i
                nruns += 1
                start = -1
            elif start < 0:
                start = i
        if start >= 0:
            starts[nruns] = start
            ends[nruns] = i0 + _PREFETCH_N
            nruns += 1
        # pass 1: what each run maps, and whether C may do it all
        ndo = 0
        for run in range(nruns):
            gfn = h.gfn + <uint64_t>starts[run]
            count[run] = 0
            if gfn - sv.base_gfn >= sv.npages:
                return 0                            # another memslot: Python
            if sv.flags & _MEMSLOT_INVALID or (access & ACC_WRITE_MASK and sv.flags & _LOG_DIRTY):
                break                               # _prefetch_slot: None, the prefetch ends
            if gfn + <uint64_t>(ends[run] - starts[run]) > sv.base_gfn + sv.npages:
                break
            if sv.hpte == NULL:
                return 0
            for k in range(<unsigned int>(ends[run] - starts[run])):
                hi = ((sv.userspace_addr - sv.vma_start) >> 12) + (gfn + k - sv.base_gfn)
                if hi >= sv.vma_npages:
                    return 0
                if (sv.hpte[hi] & (_HPTE_PRESENT | _HPTE_WRITE)) != (_HPTE_PRESENT | _HPTE_WRITE):
                    break
                if sv.hpfn[hi] >> 40:
                    return 0
                pfns[starts[run] - <int>i0 + <int>k] = sv.hpfn[hi]
                r = self._set_spte(fl, sv, h, table, starts[run] + k, access, gfn + k,
                                   sv.hpfn[hi], True, False, cache, True, &descs)
                if r == SF_DECLINE:
                    return 0
                count[run] += 1
            ndo = run + 1
            if count[run] == 0:
                break
        # pass 2: the same steps, for real
        for run in range(ndo):
            gfn = h.gfn + <uint64_t>starts[run]
            for k in range(<unsigned int>count[run]):
                hi = ((sv.userspace_addr - sv.vma_start) >> 12) + (gfn + k - sv.base_gfn)
                sv.hpte[hi] |= _HPTE_YOUNG | _HPTE_DIRTY
            for k in range(<unsigned int>count[run]):
                self._set_spte(fl, sv, h, table, starts[run] + k, access, gfn + k,
                               pfns[starts[run] - <int>i0 + <int>k], True, False, cache, False,
                               &descs)
        return 1

    cdef void _lookahead(self, const gw_mmu_t *gm, uint64_t root_sp, int root_level,
                         uint64_t gva) noexcept:
        """Start the cache misses of the next fault of a batch: its guest
        leaf gPTE (a read-only walk of the 4-level tables above it, no A/D)
        and its leaf SPTE (down the shadow pages that exist)."""
        cdef const uint8_t *p
        cdef uint64_t table = gm.pgd & 0x000FFFFFFFFFF000, e, spte, child
        cdef int level = 4
        cdef unsigned int idx
        cdef kvm_mmu_page *h
        if gm.pttype != PTTYPE_64 or gm.root_level != 4:
            return
        while level > 1:
            p = _ghva(self.mem_slots, self.mem_n, table + (((gva >> (12 + 9 * (level - 1))) & 511) << 3))
            if p == NULL:
                return
            memcpy(&e, p, 8)
            if not (e & 1) or (e & 0x80):
                return
            table = e & 0x000FFFFFFFFFF000
            level -= 1
        p = _ghva(self.mem_slots, self.mem_n, table + (((gva >> 12) & 511) << 3))
        if p != NULL:
            __builtin_prefetch(p)
        h = _sp(self.a, root_sp)
        level = root_level
        while h != NULL and level > 1:
            spte = _spt(self.a, h)[(gva >> (12 + 9 * (level - 1))) & 511]
            if not is_shadow_present_pte(spte) or is_large_pte(spte):
                return
            h = _sp(self.a, _child_sp(self.a, spte))
            level -= 1
        if h != NULL:
            idx = (gva >> 12) & 511
            __builtin_prefetch(_spt(self.a, h) + idx)
            if _table_ok(self.a, h.shadowed_translation):
                __builtin_prefetch(pt_table_ptr(self.a, h.shadowed_translation - self.a.base_pfn) + idx)

    cdef int _fetch(self, sf_fault_t *fl, sf_slot_t *sv, rsvd_bits_validate *rsvd,
                    kvm_mmu_memory_cache *cache) except -2000:
        """FNAME(fetch) of a 4K guest leaf (``fl.indirect``) or direct_map at
        a 4K goal, then the prefetch.  RET_PF_* or SF_DECLINE."""
        cdef pt_arena_t *a = self.a
        cdef uint64_t sp = fl.root_sp, spte, child
        cdef int level = fl.root_level, r, descs = 0
        cdef unsigned int idx
        cdef kvm_mmu_page *h = _sp(a, sp)
        cdef kvm_mmu_page *hc
        cdef uint64_t *table
        cdef uint32_t saved = self.tb.n
        fl.wf_to_spt = False
        fl.flush = False
        fl.prefetch_resume = SF_NO_RESUME
        fl.direct_prefetch_py = False
        if h == NULL or level < 1 or level > 5 or <int>role_level(h.role) != level:
            return SF_DECLINE
        if fl.indirect and self._gpte_changed(fl, fl.top_level):
            return SF_DECLINE
        while level > 1:
            idx = (fl.addr >> (12 + 9 * (level - 1))) & 511
            if fl.indirect and h.write_flooding_count != 0:
                return SF_DECLINE
            table = _spt(a, h)
            spte = table[idx]
            if not is_shadow_present_pte(spte) or is_large_pte(spte):
                return SF_DECLINE                   # kvm_mmu_get_child_sp makes a page: Python
            child = _child_sp(a, spte)
            hc = _sp(a, child)
            if hc == NULL or <int>role_level(hc.role) != level - 1:
                return SF_DECLINE
            if fl.indirect:
                if self._gpte_changed(fl, level - 1):
                    return SF_DECLINE
                if fl.write and fl.table_gfn[level - 2] == fl.gfn:
                    fl.wf_to_spt = True
            h = hc
            level -= 1
        if fl.indirect == role_direct(h.role):
            return SF_DECLINE
        table = _spt(a, h)
        idx = (fl.addr >> 12) & 511
        __builtin_prefetch(&table[idx])
        if _table_ok(a, h.shadowed_translation):
            __builtin_prefetch(pt_table_ptr(a, h.shadowed_translation - a.base_pfn) + idx)
        _tr_spte_requested(&self.tb, fl.gfn, fl.pfn, 1)
        fl.sptep = make_sptep(h.spt, idx)
        r = self._set_spte(fl, sv, h, table, idx, fl.access, fl.gfn, fl.pfn, fl.prefetch,
                           fl.write, cache, False, &descs)
        if r == SF_DECLINE:
            self.tb.n = saved                       # the spte_requested record goes too
            return r
        if r == RET_PF_SPURIOUS or fl.invalidate_in_progress:
            return r
        if fl.indirect:
            fl.prefetch_resume = self._fname_prefetch(fl, sv, h, table, idx, rsvd, cache)
        elif not role_ad_disabled(h.role):
            fl.direct_prefetch_py = self._direct_prefetch(fl, sv, h, table, idx, cache) == 0
        return r

    cdef int _enter(self) except -1:
        if self._busy:
            raise ConcurrentUseError("ShadowFastCore: re-entered (from a trace sink?)")
        if self.a.era != PT_ERA_V6_18:
            return 0
        self._busy = True
        return 1

    cdef int _leave(self, uint32_t *before) except -1:
        self._busy = False
        try:
            if self.tb.n or self.tb.dropped:
                trace_drain(&self.tb)
        finally:
            self.arena._warn_since(before)
        return 0

    # ------------------------------------------------------------ entry points
    def fetch(self, mmu, vcpu, fault, access, root_sp, int root_level, gw=None,
              int top_level=0, int gpte_size=8, RsvdBitsValidate rsvd=None):
        """One fault's fetch: ``FNAME(fetch)`` when `gw` (the guest walker
        of a 4K leaf) is given, else ``direct_map`` at a 4K goal.  `mmu` is
        the ShadowMmu, `fault` its KvmPageFault after faultin (slot set, pfn
        a real host pfn), `root_sp`/`root_level` where the shadow walk
        starts.  Returns RET_PF_* or :data:`DECLINE` (nothing changed).
        After a result: :attr:`wf_to_spt`, :attr:`flush` (owed),
        :attr:`prefetch_resume` (-1, or the entry ``FNAME(pte_prefetch)``
        resumes at in Python, with :attr:`gptes`), :attr:`direct_prefetch_py`."""
        cdef sf_fault_t *fl = &self.last
        cdef uint32_t before[PT_NR_WARN]
        cdef PteListDescCache cache
        cdef int i, r
        cdef list refs = []
        vm = mmu.vm
        slot = fault.slot
        if slot is None or not self._enter():
            return SF_DECLINE
        try:
            memcpy(before, self.a.warn, sizeof(before))
            c = vcpu.mmu_pte_list_desc_cache
            if type(c) is not PteListDescCache:
                return SF_DECLINE
            cache = <PteListDescCache>c
            if cache._busy:
                return SF_DECLINE
            fl.addr = fault.addr
            fl.gfn = fault.gfn
            fl.pfn = fault.pfn
            fl.write = fault.write
            fl.prefetch = fault.prefetch
            fl.map_writable = fault.map_writable
            fl.strict = False
            fl.nx_huge_pages = vm.is_nx_huge_page_enabled
            fl.wtrack_enabled = vm.kvm_page_track_write_tracking_enabled
            fl.invalidate_in_progress = vm.notifier.mmu_invalidate_in_progress != 0
            fl.indirect_shadow_pages = mmu.indirect_shadow_pages
            fl.access = access
            fl.root_sp = root_sp
            fl.root_level = root_level
            if fl.pfn >> 40 or fl.prefetch:
                return SF_DECLINE
            self._hash = mmu.mmu_page_hash
            if gw is not None:
                if rsvd is None or gpte_size not in (4, 8) or not 1 <= top_level <= 5:
                    return SF_DECLINE
                fl.indirect = True
                fl.top_level = top_level
                fl.gpte_size = gpte_size
                ptes, gpas = gw.ptes, gw.pte_gpa
                tgfns = gw.table_gfn if fl.write else None   # read only for a write
                for i in range(5):
                    fl.ptes[i] = ptes[i]
                    fl.pte_gpa[i] = gpas[i]
                    fl.table_gfn[i] = tgfns[i] if tgfns is not None else 0
                self._mem(vm, vcpu.as_id)
            else:
                fl.indirect = False
            # the slot view, rebuilt when the memslot, its arrays or the
            # host's VMA list changed (vm.guest_memory's key for the VMAs)
            arch = slot.arch
            vmas = vm.host.vmas
            key = (slot, arch.rmap, arch.gfn_write_track, slot.dirty_bitmap, slot.flags,
                   vmas, len(vmas))
            if not _same(self._sv_key, key):
                self._sv_key = None
                _slot_view(vm, slot, &self._sv, refs)
                self._sv_refs = refs
                self._sv_key = key
            r = self._fetch(fl, &self._sv, &rsvd.chk if rsvd is not None else NULL, &cache.mc)
            return r
        finally:
            self._leave(before)

    @property
    def wf_to_spt(self):
        return bool(self.last.wf_to_spt)

    @property
    def flush(self):
        return bool(self.last.flush)

    @property
    def prefetch_resume(self):
        return self.last.prefetch_resume

    @property
    def direct_prefetch_py(self):
        return bool(self.last.direct_prefetch_py)

    @property
    def sptep(self):
        return self.last.sptep

    @property
    def gptes(self):
        return [self.last.gptes[i] for i in range(_PREFETCH_N)]

    # ------------------------------------------------------------ the batch path
    def page_fault_batch(self, mmu, vcpu, const uint64_t[::1] gvas, const uint64_t[::1] ecs,
                         int32_t[::1] out, walker_cls, fault_cls):
        """``kvm_mmu_page_fault`` for each ``(gvas[i], ecs[i])`` in order
        (ShadowMmu.page_fault_batch checked them): walk, faultin and fetch
        in C; a fault C declines goes to the scalar Python entry - before
        the walk when the walk would fault (a failed walk changes nothing),
        else with the C walk handed over (``mmu._prewalked``, a
        `walker_cls`).  Fills ``out`` with RET_PF_*; returns the number of
        faults C completed."""
        cdef Py_ssize_t n = gvas.shape[0], i, ndone = 0
        cdef int64_t taken = 0, fixed = 0, spurious = 0
        cdef bint refresh = True, ok = False, write, user
        cdef gw_mmu_t gm
        cdef gw_mem_t gmem
        cdef guest_walker_t w
        cdef sf_slot_t *svs = NULL
        cdef sf_slot_t *sv
        cdef int nsv = 0, j, r, k
        cdef uint64_t gva, ec, acc, gfn, hi, f, pfn
        cdef uint32_t pos, pte_access
        cdef uint32_t before[PT_NR_WARN]
        cdef PteListDescCache cache = None
        cdef RsvdBitsValidate rsvd = None
        cdef RsvdBitsValidate grsvd
        cdef sf_fault_t *fl = &self.last
        cdef bint cr0_wp = False, cr4_smep = False
        cdef Py_ssize_t last_c = -1
        cdef list refs = None
        cdef const uint8_t[::1] perms
        if out.shape[0] != n or ecs.shape[0] != n:
            raise ValueError("gvas, ecs and out differ in length")
        if self._busy:
            raise ConcurrentUseError("ShadowFastCore: re-entered (from a trace sink?)")
        vm = mmu.vm
        pf = vcpu.stat.pf
        try:
            for i in range(n):
                gva = gvas[i]
                ec = ecs[i]
                if refresh:
                    if self.tb.n or self.tb.dropped:
                        trace_drain(&self.tb)
                    memcpy(before, self.a.warn, sizeof(before))
                    refresh = False
                    ok = False
                    if vm.warn_sink.bugged:
                        vm.warn_sink.check()
                    m = mmu._ctx(vcpu)
                    start = mmu._c_start(m, gva) if vcpu.mmu_root is not None else None
                    if start is not None and not m.ept and not m.direct and \
                            self.a.era == PT_ERA_V6_18 and \
                            not vm.kvm_sw_protected_vm and not vm.has_private_mem and \
                            not vm.notifier.mmu_invalidate_in_progress and \
                            vm.n_max_mmu_pages - mmu.n_used_mmu_pages >= 5 and \
                            vcpu.mmu_shadow_page_cache.nobjs >= 5 and \
                            vcpu.mmu_page_header_cache.nobjs >= 5 and \
                            vcpu.mmu_shadowed_info_cache.nobjs >= 5 and \
                            not mmu._c_root_stale(vcpu, m):
                        c = vcpu.mmu_pte_list_desc_cache
                        wm = vcpu.walk_mmu
                        grsvd = wm.guest_rsvd_check
                        if type(c) is PteListDescCache and wm.nested is None and \
                                wm.root_level == m.cpu_role.base.level and wm.pttype in (PTTYPE_32, PTTYPE_64):
                            cache = <PteListDescCache>c
                            ok = not cache._busy
                    if ok:
                        rsvd = mmu._rsvd(vcpu, m)
                        base = m.cpu_role.base
                        fl.top_level = 2 if base.level == 3 else base.level
                        fl.gpte_size = 4 if base.has_4_byte_gpte else 8
                        fl.indirect = True
                        fl.strict = True
                        fl.prefetch = False
                        fl.nx_huge_pages = vm.is_nx_huge_page_enabled
                        fl.wtrack_enabled = vm.kvm_page_track_write_tracking_enabled
                        fl.invalidate_in_progress = False
                        fl.indirect_shadow_pages = mmu.indirect_shadow_pages
                        cr0_wp, cr4_smep = m.cr0_wp, m.cr4_smep
                        self._hash = mmu.mmu_page_hash
                        self._mem(vm, vcpu.as_id)
                        gmem.slots = self.mem_slots
                        gmem.nslots = self.mem_n
                        gmem.last = 0
                        memset(&gm, 0, sizeof(gm))
                        cpu = wm.cpu
                        role = wm.cpu_role
                        gm.pttype = wm.pttype
                        gm.root_level = wm.root_level
                        gm.pgd = cpu.cr3
                        pd = wm.pdptrs
                        for j in range(4):
                            gm.pdptrs[j] = pd[j]
                        gm.have_ad = True
                        gm.efer_nx = role.base.efer_nx
                        gm.cr4_smep = role.ext.cr4_smep
                        gm.cr4_pse = role.ext.cr4_pse
                        gm.rflags_ac = (cpu.rflags >> 18) & 1
                        gm.is_walk_mmu = True
                        gm.pkru = cpu.pkru
                        gm.pkru_mask = wm.pkru_mask
                        perms = np.ascontiguousarray(wm.permissions, dtype=np.uint8)
                        if perms.shape[0] != 16:
                            raise ValueError("the walk MMU's permissions need 16 entries")
                        for j in range(16):
                            gm.permissions[j] = perms[j]
                        gm.rsvd = grsvd.chk
                        gm.mem = &gmem
                        gm.nested = NULL
                        gm.trace = &self.tb
                        slots = [s for s in vm.memslots[vcpu.as_id]]
                        if svs != NULL:
                            free(svs)
                        svs = <sf_slot_t *>malloc(sizeof(sf_slot_t) * (len(slots) + 1))
                        if svs == NULL:
                            raise MemoryError()
                        refs = []
                        nsv = 0
                        for s in slots:
                            _slot_view(vm, s, &svs[nsv], refs)
                            nsv += 1
                        fl.root_sp, fl.root_level = start
                if not ok or ec & _PFERR_RSVD:
                    self.arena._warn_since(before)
                    out[i] = self._py_fault(vcpu, gva, ec)
                    refresh = True
                    continue
                if self.tb.n > TRACE_BUF_CAP - 1024:
                    trace_drain(&self.tb)
                pos = self.tb.n
                acc = ec & _GUEST_ACCESS
                r = walk_addr_generic(&gm, &w, gva, acc)
                if r == GW_ENOMEM:
                    raise MemoryError("no memory for a trace record")
                if r != GW_OK:
                    self.tb.n = pos                 # nothing changed: Python walks again
                    self.arena._warn_since(before)
                    out[i] = self._py_fault(vcpu, gva, ec)
                    refresh = True
                    continue
                # from here the walk (A/D) happened: a decline hands it over
                if w.ad_written:
                    _mark_tables_dirty(&w, svs, nsv)
                sv = NULL
                gfn = w.gfn
                for j in range(nsv):
                    if gfn - svs[j].base_gfn < svs[j].npages:
                        sv = &svs[j]
                        break
                write = (ec & _PFERR_WRITE) != 0
                user = (ec & _PFERR_USER) != 0
                r = SF_DECLINE
                if sv != NULL:                      # start the cache misses of faultin / rmap_add
                    if sv.hpte != NULL:
                        hi = ((sv.userspace_addr - sv.vma_start) >> 12) + (gfn - sv.base_gfn)
                        if hi < sv.vma_npages:
                            __builtin_prefetch(&sv.hpte[hi])
                            __builtin_prefetch(&sv.hpfn[hi])
                    if sv.rmap != NULL and gfn - sv.base_gfn < sv.rmap.npages:
                        __builtin_prefetch(gfn_to_rmap(gfn, 1, sv.rmap))
                if i + 1 < n:
                    self._lookahead(&gm, fl.root_sp, fl.root_level, gvas[i + 1])
                if w.level == 1 and sv != NULL and cache.mc.nobjs >= 14 and \
                        not (sv.flags & (_MEMSLOT_INVALID | _READONLY)) and sv.hpte != NULL and \
                        not (ec & _PFERR_PRESENT and write and fl.wtrack_enabled and
                             (sv.wtrack_opaque or
                              sv.wtrack != NULL and sv.wtrack[gfn - sv.base_gfn] != 0)):
                    hi = ((sv.userspace_addr - sv.vma_start) >> 12) + (gfn - sv.base_gfn)
                    if hi < sv.vma_npages:
                        f = sv.hpte[hi]
                        if f & _HPTE_PRESENT and (not write or f & _HPTE_WRITE) and \
                                not (sv.hpfn[hi] >> 40):
                            sv.hpte[hi] = f | (_HPTE_YOUNG | _HPTE_DIRTY if write else _HPTE_YOUNG)
                            pfn = sv.hpfn[hi]
                            pte_access = w.pte_access
                            if write and not (pte_access & ACC_WRITE_MASK) and not cr0_wp and not user:
                                pte_access = (pte_access | ACC_WRITE_MASK) & ~(<uint32_t>4)
                                if cr4_smep:
                                    pte_access &= ~(<uint32_t>1)
                            fl.addr = gva
                            fl.gfn = gfn
                            fl.pfn = pfn
                            fl.write = write
                            fl.map_writable = (f & _HPTE_WRITE) != 0
                            fl.access = pte_access
                            for j in range(5):
                                fl.ptes[j] = w.ptes[j]
                                fl.pte_gpa[j] = w.pte_gpa[j]
                                fl.table_gfn[j] = w.table_gfn[j]
                            self._busy = True
                            try:
                                r = self._fetch(fl, sv, &rsvd.chk, &cache.mc)
                            finally:
                                self._busy = False
                if r == SF_DECLINE:
                    self.arena._warn_since(before)
                    out[i] = self._py_walked(mmu, vcpu, gva, ec, acc, &w, walker_cls)
                    refresh = True
                    continue
                taken += 1
                if r == RET_PF_FIXED:
                    fixed += 1
                elif r == RET_PF_SPURIOUS:
                    spurious += 1
                out[i] = r
                ndone += 1
                last_c = i
                if fl.flush:
                    self.arena._warn_since(before)
                    vm.kvm_flush_remote_tlbs()
                    refresh = True
                if fl.prefetch_resume >= 0:
                    self.arena._warn_since(before)
                    if self.tb.n or self.tb.dropped:
                        trace_drain(&self.tb)
                    mmu.fname_pte_prefetch(vcpu, m, fl.sptep, self.gptes, fl.prefetch_resume)
                    refresh = True
            if last_c == n - 1 and n:
                lf = fault_cls(gvas[last_c], ecs[last_c], False, mmu.is_tdp,
                               vm.params.nx_huge_pages and not vm.disable_nx_huge_pages)
                lf.gfn = fl.gfn
                lf.slot = vcpu.gfn_to_memslot(fl.gfn)
                lf.pfn = fl.pfn
                lf.map_writable = fl.map_writable
                lf.mmu_seq = vm.notifier.mmu_invalidate_seq
                lf.max_level = 1
                if fl.wf_to_spt:
                    lf.write_fault_to_shadow_pgtable = True
                lf.huge_page_disallowed = lf.exec and lf.nx_huge_page_workaround_enabled
                vcpu.last_fault = lf
        finally:
            pf[0] += taken
            pf[1] += fixed
            pf[3] += spurious
            if not refresh:
                self.arena._warn_since(before)
            if svs != NULL:
                free(svs)
            if self.tb.n or self.tb.dropped:
                trace_drain(&self.tb)
        return ndone

    def _py_fault(self, vcpu, gva, ec):
        """The scalar entry for one fault (after the C events so far)."""
        if self.tb.n or self.tb.dropped:
            trace_drain(&self.tb)
        return vcpu.kvm_mmu_page_fault(gva, ec)

    cdef int _py_walked(self, mmu, vcpu, uint64_t gva, uint64_t ec, uint64_t acc,
                        guest_walker_t *w, walker_cls) except? -2000:
        """The scalar entry for one fault whose walk C did: the walker goes
        to FNAME(page_fault) through ``mmu._prewalked``."""
        if self.tb.n or self.tb.dropped:
            trace_drain(&self.tb)
        gw = walker_cls(None, w.gfn, w.level, w.max_level, w.pte_access,
                        tuple([w.ptes[i] for i in range(5)]),
                        tuple([w.pte_gpa[i] for i in range(5)]),
                        tuple([w.table_gfn[i] for i in range(5)]),
                        tuple([w.pt_access[i] for i in range(5)]),
                        tuple([bool(w.pte_writable[i]) for i in range(5)]), gva, acc)
        mmu._prewalked = (gva, acc, gw)
        try:
            return vcpu.kvm_mmu_page_fault(gva, ec)
        finally:
            mmu._prewalked = None


