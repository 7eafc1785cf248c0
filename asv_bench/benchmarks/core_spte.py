"""Bulk SPTE operations of the Cython core.

These benchmarks depend only on kvmmmu._core.spte.

Every class times one ``SpteFormat.*_array`` operation over a realistic SPTE
array (see :func:`make_sptes`) for each SPTE format and array size.  16M SPTEs
(``1 << 24``, 128 MiB, the leaf SPTEs mapping 64 GiB of guest memory with
4 KiB pages) is the size the core is tuned for; 64K SPTEs keeps the arrays in
cache and shows the per-call overhead.

Conventions (see /work/shared/STYLE.md, "asv benchmarks"):

* ``setup`` builds the SPTEs from ``np.random.default_rng(1234)`` and calls the
  operation once to warm it, so the timed body is only the operation.  The
  built arrays are memoized per process and read-only: asv runs each benchmark
  in its own process, and newer asv_runner versions re-run ``setup`` before
  every sample.
* Operations that modify the SPTEs in place (write_protect_array,
  clear_dirty_array, access_track_array) set ``number = 1``: asv then re-runs
  ``setup`` before every sample, and ``setup`` copies the pristine SPTEs into
  a preallocated work buffer.  Each sample therefore sees the same input, and
  the copy is not timed.
* ``time_<op>`` and ``peakmem_<op>`` twins share one setup; scalar-vs-batch
  twins show what the batch API gains; ``*Threads`` classes show how the nogil
  loops scale (the bulk forms release the GIL for the whole loop).
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvmmmu._core import spte

#: Array sizes: 64K SPTEs (512 KiB, cache-resident) and 16M SPTEs (the target size).
N_SPTES = [1 << 16, 1 << 24]

#: SPTE formats: legacy/NPT, EPT with A/D bits, EPT without A/D bits.
FORMATS = ["legacy", "ept", "ept-noad"]

#: The SPTE mix of :func:`make_sptes`: (kind, percent of the array).
MIX = (
    ("nonpresent", 13),        # SHADOW_NONPRESENT_VALUE (zapped / never faulted in)
    ("mmio", 2),               # cached MMIO SPTEs (emulated devices)
    ("leaf_4k_rw", 55),        # faulted-in RAM: writable, accessed, dirty
    ("leaf_4k_ro", 15),        # read-only / executable RAM
    ("leaf_4k_prefetch", 10),  # prefetched: not accessed (A/D off: access-tracked)
    ("leaf_2m_rw", 5),         # 2 MiB pages (PS set)
)
assert sum(pct for _, pct in MIX) == 100

#: Host pfns are drawn below this: 1 TiB of host memory.
PFN_RANGE = 1 << 28

#: The memslot generation cached in the MMIO SPTEs.  Below 256 it fits in
#: the low generation bits (10:3), so bits 62:52 of the MMIO SPTEs are clear.
MMIO_GENERATION = 0x5A


def make_format(name):
    """The SpteFormat called `name` (one of FORMATS)."""
    if name == "legacy":
        return spte.SpteFormat.legacy()
    if name == "ept":
        return spte.SpteFormat.ept()
    if name == "ept-noad":
        return spte.SpteFormat.ept(ad_bits=False)
    raise ValueError(f"unknown SPTE format {name!r}")


def make_sptes(fmt, n, rng):
    """A realistic array of `n` leaf-table SPTEs of format `fmt`.

    Mostly present leaf SPTEs built by ``make_spte_array`` (random host
    pfns below PFN_RANGE), some SHADOW_NONPRESENT_VALUE and a few MMIO
    SPTEs, in the proportions of MIX and randomly interleaved.  Leaves are
    A/D-disabled exactly when the format has no A/D bits
    (``sp->role.ad_disabled = !kvm_ad_enabled``).

    Returns
    -------
    ndarray of uint64, shape (n,)
    """
    # kinds[i] is the MIX index of SPTE i: a percent drawn per SPTE, mapped
    # through a 100-entry table (cheaper than rng.choice(p=...) at 16M).
    table = np.repeat(np.arange(len(MIX), dtype=np.uint8), [pct for _, pct in MIX])
    kinds = table[rng.integers(0, 100, size=n, dtype=np.uint8)]
    sptes = np.full(n, fmt.SHADOW_NONPRESENT_VALUE, dtype=np.uint64)
    ad_disabled = not fmt.kvm_ad_enabled
    for k, (kind, _) in enumerate(MIX):
        sel = kinds == k
        m = int(np.count_nonzero(sel))
        if kind == "nonpresent" or m == 0:
            continue
        if kind == "mmio":
            gfns = rng.integers(0, fmt.max_gfn, size=1024)
            templates = np.array([fmt.make_mmio_spte(int(g), spte.ACC_ALL, MMIO_GENERATION)
                                  for g in gfns], dtype=np.uint64)
            sptes[sel] = templates[rng.integers(0, templates.shape[0], size=m)]
            continue
        pfns = rng.integers(0, PFN_RANGE, size=m, dtype=np.uint64)
        level, access, prefetch = spte.PG_LEVEL_4K, spte.ACC_ALL, False
        if kind == "leaf_4k_ro":
            access = spte.ACC_EXEC_MASK | spte.ACC_USER_MASK
        elif kind == "leaf_4k_prefetch":
            prefetch = True
        elif kind == "leaf_2m_rw":
            level = spte.PG_LEVEL_2M
            pfns &= ~np.uint64(spte.SPTE_ENT_PER_PAGE - 1)
        sptes[sel] = fmt.make_spte_array(pfns, level=level, pte_access=access,
                                         prefetch=prefetch, ad_disabled=ad_disabled)
    return sptes


# Per-process memo: (format, n) -> (SpteFormat, read-only pristine SPTEs, work buffer).
_DATA = {}
_WARMED = set()


def sptes_for(fmt_name, n):
    """(SpteFormat, read-only SPTE array) for `fmt_name` and `n`, built once per process."""
    return _data(fmt_name, n)[:2]


def work_buffer(fmt_name, n):
    """A writable uint64 buffer of `n` SPTEs, reused by the mutating benchmarks."""
    return _data(fmt_name, n)[2]


def _data(fmt_name, n):
    key = (fmt_name, n)
    if key not in _DATA:
        fmt = make_format(fmt_name)
        sptes = make_sptes(fmt, n, np.random.default_rng(1234))
        sptes.flags.writeable = False
        _DATA[key] = (fmt, sptes, np.empty_like(sptes))
    return _DATA[key]


class _Bulk:
    """Shared parameters and data for the bulk benchmarks."""

    params = [N_SPTES, FORMATS]
    param_names = ["n_sptes", "format"]
    timeout = 300

    def setup(self, n, fmt_name):
        self.fmt, self.sptes = sptes_for(fmt_name, n)


class _MutatingBulk(_Bulk):
    """In-place operations: every sample starts from the pristine SPTEs.

    ``number = 1`` makes asv run ``setup`` before every sample, and ``setup``
    restores the work buffer with ``np.copyto`` (not timed).  The operation
    is warmed once per process (``_WARMED``) on the work buffer.
    """

    number = 1

    def setup(self, n, fmt_name):
        self.fmt, self.pristine = sptes_for(fmt_name, n)
        self.sptes = work_buffer(fmt_name, n)
        np.copyto(self.sptes, self.pristine)
        key = (type(self).__name__, n, fmt_name)
        if key not in _WARMED:
            _WARMED.add(key)
            self.operate()
            np.copyto(self.sptes, self.pristine)

    def operate(self):
        raise NotImplementedError


# --- predicates ---------------------------------------------------------------

class IsShadowPresentPte(_Bulk):
    def setup(self, n, fmt_name):
        super().setup(n, fmt_name)
        self.fmt.is_shadow_present_pte_array(self.sptes)

    def time_is_shadow_present_pte(self, n, fmt_name):
        self.fmt.is_shadow_present_pte_array(self.sptes)

    def peakmem_is_shadow_present_pte(self, n, fmt_name):
        self.fmt.is_shadow_present_pte_array(self.sptes)


class IsLastSpte(_Bulk):
    """is_last_spte at level 2 (PS bit), where the answer depends on the SPTE."""

    def setup(self, n, fmt_name):
        super().setup(n, fmt_name)
        self.fmt.is_last_spte_array(self.sptes, spte.PG_LEVEL_2M)

    def time_is_last_spte(self, n, fmt_name):
        self.fmt.is_last_spte_array(self.sptes, spte.PG_LEVEL_2M)


class IsWritablePte(_Bulk):
    def setup(self, n, fmt_name):
        super().setup(n, fmt_name)
        self.fmt.is_writable_pte_array(self.sptes)

    def time_is_writable_pte(self, n, fmt_name):
        self.fmt.is_writable_pte_array(self.sptes)


class IsAccessedSpte(_Bulk):
    def setup(self, n, fmt_name):
        super().setup(n, fmt_name)
        self.fmt.is_accessed_spte_array(self.sptes)

    def time_is_accessed_spte(self, n, fmt_name):
        self.fmt.is_accessed_spte_array(self.sptes)


class IsDirtySpte(_Bulk):
    def setup(self, n, fmt_name):
        super().setup(n, fmt_name)
        self.fmt.is_dirty_spte_array(self.sptes)

    def time_is_dirty_spte(self, n, fmt_name):
        self.fmt.is_dirty_spte_array(self.sptes)


class IsMmioSpte(_Bulk):
    def setup(self, n, fmt_name):
        super().setup(n, fmt_name)
        self.fmt.is_mmio_spte_array(self.sptes)

    def time_is_mmio_spte(self, n, fmt_name):
        self.fmt.is_mmio_spte_array(self.sptes)


# --- conversions ----------------------------------------------------------------

class SpteToPfn(_Bulk):
    def setup(self, n, fmt_name):
        super().setup(n, fmt_name)
        self.fmt.spte_to_pfn_array(self.sptes)

    def time_spte_to_pfn(self, n, fmt_name):
        self.fmt.spte_to_pfn_array(self.sptes)

    def peakmem_spte_to_pfn(self, n, fmt_name):
        self.fmt.spte_to_pfn_array(self.sptes)


class MakeSpte(_Bulk):
    """make_spte_array over random pfns: a writable, accessed 4K leaf per pfn."""

    def setup(self, n, fmt_name):
        super().setup(n, fmt_name)
        self.pfns = np.random.default_rng(1234).integers(0, PFN_RANGE, size=n, dtype=np.uint64)
        self.ad_disabled = not self.fmt.kvm_ad_enabled
        self.time_make_spte(n, fmt_name)

    def time_make_spte(self, n, fmt_name):
        self.fmt.make_spte_array(self.pfns, level=spte.PG_LEVEL_4K, pte_access=spte.ACC_ALL,
                                 ad_disabled=self.ad_disabled)

    def peakmem_make_spte(self, n, fmt_name):
        self.fmt.make_spte_array(self.pfns, level=spte.PG_LEVEL_4K, pte_access=spte.ACC_ALL,
                                 ad_disabled=self.ad_disabled)


# --- in-place operations ------------------------------------------------------

class WriteProtect(_MutatingBulk):
    def operate(self):
        self.fmt.write_protect_array(self.sptes)

    def time_write_protect(self, n, fmt_name):
        self.fmt.write_protect_array(self.sptes)

    def peakmem_write_protect(self, n, fmt_name):
        self.fmt.write_protect_array(self.sptes)


class ClearDirty(_MutatingBulk):
    def operate(self):
        self.fmt.clear_dirty_array(self.sptes)

    def time_clear_dirty(self, n, fmt_name):
        self.fmt.clear_dirty_array(self.sptes)


class AccessTrack(_MutatingBulk):
    def operate(self):
        self.fmt.access_track_array(self.sptes)

    def time_access_track(self, n, fmt_name):
        self.fmt.access_track_array(self.sptes)


# --- scalar vs batch ------------------------------------------------------------

class MakeSpteScalarVsBatch:
    """10k make_spte() calls from Python vs one make_spte_array() of 10k pfns."""

    params = [[10_000], FORMATS]
    param_names = ["n_calls", "format"]

    def setup(self, n, fmt_name):
        self.fmt = make_format(fmt_name)
        self.pfns = np.random.default_rng(1234).integers(0, PFN_RANGE, size=n, dtype=np.uint64)
        self.pfn_list = self.pfns.tolist()
        self.ad_disabled = not self.fmt.kvm_ad_enabled
        self.time_make_spte_scalar(n, fmt_name)
        self.time_make_spte_batch(n, fmt_name)

    def time_make_spte_scalar(self, n, fmt_name):
        make_spte, ad_disabled = self.fmt.make_spte, self.ad_disabled
        for pfn in self.pfn_list:
            make_spte(level=spte.PG_LEVEL_4K, pte_access=spte.ACC_ALL, pfn=pfn,
                      ad_disabled=ad_disabled)

    def time_make_spte_batch(self, n, fmt_name):
        self.fmt.make_spte_array(self.pfns, level=spte.PG_LEVEL_4K, pte_access=spte.ACC_ALL,
                                 ad_disabled=self.ad_disabled)


class SpteToPfnScalarVsBatch:
    """10k spte_to_pfn() calls from Python vs one spte_to_pfn_array() of 10k SPTEs."""

    params = [[10_000], FORMATS]
    param_names = ["n_calls", "format"]

    def setup(self, n, fmt_name):
        self.fmt, self.sptes = sptes_for(fmt_name, n)
        self.spte_list = self.sptes.tolist()
        self.time_spte_to_pfn_scalar(n, fmt_name)
        self.time_spte_to_pfn_batch(n, fmt_name)

    def time_spte_to_pfn_scalar(self, n, fmt_name):
        spte_to_pfn = spte.spte_to_pfn
        for s in self.spte_list:
            spte_to_pfn(s)

    def time_spte_to_pfn_batch(self, n, fmt_name):
        self.fmt.spte_to_pfn_array(self.sptes)


# --- nogil scaling ----------------------------------------------------------------

class IsShadowPresentPteThreads:
    """is_shadow_present_pte_array on `threads` equal chunks, one thread each."""

    params = [[1 << 24], ["ept"], [1, 2, 4]]
    param_names = ["n_sptes", "format", "threads"]
    timeout = 300

    def setup(self, n, fmt_name, threads):
        self.fmt, sptes = sptes_for(fmt_name, n)
        self.chunks = np.array_split(sptes, threads)
        self.outs = [np.empty(c.shape[0], dtype=np.bool_) for c in self.chunks]
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.time_is_shadow_present_pte(n, fmt_name, threads)

    def teardown(self, n, fmt_name, threads):
        self.pool.shutdown()

    def time_is_shadow_present_pte(self, n, fmt_name, threads):
        list(self.pool.map(self.fmt.is_shadow_present_pte_array, self.chunks, self.outs))


class WriteProtectThreads:
    """write_protect_array on `threads` equal chunks, one thread each (in place)."""

    params = [[1 << 24], ["ept"], [1, 2, 4]]
    param_names = ["n_sptes", "format", "threads"]
    number = 1
    timeout = 300

    def setup(self, n, fmt_name, threads):
        self.fmt, self.pristine = sptes_for(fmt_name, n)
        self.sptes = work_buffer(fmt_name, n)
        self.chunks = np.array_split(self.sptes, threads)
        self.pool = ThreadPoolExecutor(max_workers=threads)
        key = (type(self).__name__, n, fmt_name, threads)
        if key not in _WARMED:
            _WARMED.add(key)
            np.copyto(self.sptes, self.pristine)
            self.time_write_protect(n, fmt_name, threads)
        np.copyto(self.sptes, self.pristine)

    def teardown(self, n, fmt_name, threads):
        self.pool.shutdown()

    def time_write_protect(self, n, fmt_name, threads):
        list(self.pool.map(self.fmt.write_protect_array, self.chunks))
