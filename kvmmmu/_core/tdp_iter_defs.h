/*
 * kvmmmu: struct tdp_iter, the TDP MMU's pre-order walker over one root
 * (arch/x86/kvm/mmu/tdp_iter.h), at the x86-64 layout of Linux v6.18: 112
 * bytes, the offsets below are what /sys/kernel/btf/vmlinux says
 * (tests/_core/test_tdp_iter.py compares them with the running kernel).
 *
 * The kernel's tdp_ptep_t is a pointer; the model's is an SPTE handle of the
 * same width, (table_pfn << 12) | (index << 3) (types.pxd), so "sptep++" is
 * "+= 8" and pt_path[level - 1] is the handle of entry 0 of that table.
 */
#ifndef KVMMMU_TDP_ITER_DEFS_H
#define KVMMMU_TDP_ITER_DEFS_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "mmu_defs.h"

typedef struct tdp_iter {
    uint64_t next_last_level_gfn;   /* where the walk is heading; restart point after a yield */
    uint64_t yielded_gfn;           /* next_last_level_gfn at the last (re)start */
    uint64_t pt_path[PT64_ROOT_MAX_LEVEL];  /* table in use per level (index level - 1) */
    uint64_t sptep;                 /* the current SPTE */
    uint64_t gfn;                   /* first gfn the current SPTE maps, without gfn_bits */
    uint64_t gfn_bits;              /* OR-ed into gfn for the table indexes (TDX shared bit) */
    int root_level;
    int min_level;
    int level;
    int as_id;
    uint64_t old_spte;              /* *sptep as last read */
    bool valid;
    bool yielded;
} tdp_iter;

_Static_assert(sizeof(bool) == 1, "bool is one byte");
_Static_assert(offsetof(tdp_iter, yielded_gfn) == 8, "tdp_iter.yielded_gfn");
_Static_assert(offsetof(tdp_iter, pt_path) == 16, "tdp_iter.pt_path");
_Static_assert(offsetof(tdp_iter, sptep) == 56, "tdp_iter.sptep");
_Static_assert(offsetof(tdp_iter, gfn) == 64, "tdp_iter.gfn");
_Static_assert(offsetof(tdp_iter, gfn_bits) == 72, "tdp_iter.gfn_bits");
_Static_assert(offsetof(tdp_iter, root_level) == 80, "tdp_iter.root_level");
_Static_assert(offsetof(tdp_iter, min_level) == 84, "tdp_iter.min_level");
_Static_assert(offsetof(tdp_iter, level) == 88, "tdp_iter.level");
_Static_assert(offsetof(tdp_iter, as_id) == 92, "tdp_iter.as_id");
_Static_assert(offsetof(tdp_iter, old_spte) == 96, "tdp_iter.old_spte");
_Static_assert(offsetof(tdp_iter, valid) == 104, "tdp_iter.valid");
_Static_assert(offsetof(tdp_iter, yielded) == 105, "tdp_iter.yielded");
_Static_assert(sizeof(tdp_iter) == 112, "struct tdp_iter is 112 bytes in v6.18");

/* The fields as (name, offset, size), for the layout test. */
#define TDP_ITER_FIELD(f) {#f, offsetof(tdp_iter, f), sizeof(((tdp_iter *)0)->f)}
static const struct { const char *name; size_t offset, size; } tdp_iter_fields[] = {
    TDP_ITER_FIELD(next_last_level_gfn), TDP_ITER_FIELD(yielded_gfn), TDP_ITER_FIELD(pt_path),
    TDP_ITER_FIELD(sptep), TDP_ITER_FIELD(gfn), TDP_ITER_FIELD(gfn_bits),
    TDP_ITER_FIELD(root_level), TDP_ITER_FIELD(min_level), TDP_ITER_FIELD(level),
    TDP_ITER_FIELD(as_id), TDP_ITER_FIELD(old_spte), TDP_ITER_FIELD(valid),
    TDP_ITER_FIELD(yielded),
};
#define TDP_ITER_NR_FIELDS (sizeof(tdp_iter_fields) / sizeof(tdp_iter_fields[0]))
#define TDP_ITER_SIZE sizeof(tdp_iter)
static inline const char *tdp_iter_field_name(size_t i) { return tdp_iter_fields[i].name; }
static inline size_t tdp_iter_field_offset(size_t i) { return tdp_iter_fields[i].offset; }
static inline size_t tdp_iter_field_size(size_t i) { return tdp_iter_fields[i].size; }

#endif
