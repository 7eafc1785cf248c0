/*
 * kvmmmu: C-level layout and memory-ordering primitives of the page-table
 * arena (see pt_arena.pyx for the model, pt_arena.pxd for the contract).
 *
 * What lives here and why it is C rather than Cython:
 *   - struct kvm_mmu_page, because it has anonymous unions (the kernel's
 *     mmu_valid_gen / tdp_mmu_scheduled_root_to_zap, root_count /
 *     tdp_mmu_root_count, the unsync_children + write_flooding_count pair
 *     against external_spt, parent_ptes / ptep) and its byte layout is
 *     checked with _Static_assert;
 *   - READ_ONCE / WRITE_ONCE / xchg / cmpxchg and smp_*mb() expressed with
 *     the GCC __atomic builtins, including 32-bit accesses to either half of
 *     a 64-bit SPTE (the 32-bit host's union split_spte).
 *
 * All SPTE accesses go through may_alias types: the same 8 bytes are read as
 * one u64 by 64-bit code, as two u32 halves by the split-SPTE code, and as a
 * numpy uint64 array by Python, so the compiler must not assume that a u32
 * store leaves a u64 load's value alone.
 */
#ifndef KVMMMU_PT_ARENA_DEFS_H
#define KVMMMU_PT_ARENA_DEFS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sched.h>

#include "mmu_defs.h"

/* Debug-only invariant checks (the kernel's MMU_WARN_ON under
 * CONFIG_KVM_PROVE_MMU): setup.py defines KVMMMU_DEBUG=1 for
 * KVMMMU_DEBUG_CYTHON=1 builds; release builds see 0 and the compiler drops
 * every `if KVMMMU_DEBUG and ...` branch. */
#ifndef KVMMMU_DEBUG
#define KVMMMU_DEBUG 0
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvmmmu models x86: union split_spte puts spte_low at the lower address"
#endif

/* Freed tables and headers are filled with this (the slab allocator's
 * POISON_FREE byte, 0x6b).  As an SPTE it would map pfn 0x6b6b6b6b6, which is
 * above every MAXPHYADDR <= 46 host, so KVM never builds it. */
#define PT_POISON_BYTE      0x6b
#define PT_POISON           0x6b6b6b6b6b6b6b6bULL

/* vcpu->mode (include/linux/kvm_host.h, anonymous enum, in this order). */
#define OUTSIDE_GUEST_MODE          0
#define IN_GUEST_MODE               1
#define EXITING_GUEST_MODE          2
#define READING_SHADOW_PAGE_TABLES  3

/* The two union kvm_mmu_page_role bits the arena itself reads. */
#define PT_ROLE_LEVEL_MASK  0xfu          /* role.level, bits 3:0 */
#define PT_ROLE_INVALID     (1u << 11)    /* role.invalid, bit 11 */

/* kvm->stat.pages[] has one counter per leaf level 4K..1G: KVM_NR_PAGE_SIZES,
 * from mmu_defs.h like every MMU-wide constant. */

/*
 * struct kvm_mmu_page (arch/x86/kvm/mmu/mmu_internal.h, v6.18), one per
 * page-table page, at the x86-64 kernel's own byte layout (184 bytes; the
 * live test tests/test_btf_live.py compares every offset and size with the
 * running kernel's BTF).  Kernel pointers become model handles of the same
 * 64-bit width:
 *   - a header ("sp") is named by sp = header index + 1 (0 = NULL);
 *   - a page (spt, shadowed_translation) by its pfn in the model's host
 *     physical space (0 = NULL; pfn 0 is never handed out);
 *   - an SPTE by its sptep (types.pxd): (table_pfn << 12) | (index << 3).
 * Every other field keeps the kernel's width and signedness (bool = 1 byte,
 * int / atomic_t / refcount_t = 32-bit signed, unsigned int = 32-bit).
 * list_head / hlist_node become pairs of 64-bit sp handles (next first, as in
 * the kernel).  The kernel has clear_spte_count only with CONFIG_X86_32 and
 * rcu_head only with CONFIG_X86_64; the model builds both kinds of host from
 * one struct, so they share the rcu_head bytes: a 32-bit-host arena never
 * queues RCU callbacks (the TDP MMU is 64-bit only).
 */
typedef struct kvm_mmu_page {
    /* struct list_head link: active_mmu_pages (shadow) / tdp_mmu_roots. */
    uint64_t link_next;
    uint64_t link_prev;
    /* struct hlist_node hash_link: mmu_page_hash bucket (shadow MMU only). */
    uint64_t hash_next;
    uint64_t hash_pprev;
    uint8_t  tdp_mmu_page;                 /* bool */
    uint8_t  unsync;                       /* bool */
    union {
        uint8_t mmu_valid_gen;             /* u8: shadow MMU generation 0/1 */
        uint8_t tdp_mmu_scheduled_root_to_zap;   /* bool, TDP MMU roots */
    };
    uint8_t  nx_huge_page_disallowed;      /* bool */
    uint32_t role;                         /* union kvm_mmu_page_role .word */
    uint64_t gfn;                          /* gfn_t */
    uint64_t spt;                          /* pfn of the 512-SPTE page */
    uint64_t shadowed_translation;         /* pfn of the 512-u64 page, or 0 */
    union {
        int32_t root_count;                /* int, shadow MMU */
        int32_t tdp_mmu_root_count;        /* refcount_t, TDP MMU */
    };
    uint8_t  has_mapped_host_mmio;         /* bool (v6.18) */
    uint8_t  _pad0[3];
    union {
        struct {
            uint32_t unsync_children;      /* unsigned int */
            int32_t  write_flooding_count; /* atomic_t */
        };
        uint64_t external_spt;             /* void *, TDX mirror pages */
    };
    union {
        uint64_t parent_ptes;              /* struct kvm_rmap_head .val */
        uint64_t ptep;                     /* tdp_ptep_t: a sptep, TDP MMU */
    };
    uint64_t unsync_child_bitmap[8];       /* DECLARE_BITMAP(, 512) */
    /* struct list_head possible_nx_huge_page_link. */
    uint64_t nx_link_next;
    uint64_t nx_link_prev;
    union {
        /* struct rcu_head (CONFIG_X86_64): next pending sp, and in place of
         * the callback pointer the grace period it waits for. */
        struct {
            uint64_t rcu_next;
            uint64_t rcu_gp;
        };
        int32_t clear_spte_count;          /* int, CONFIG_X86_32 only */
    };
} kvm_mmu_page;

/* The x86-64 v6.18 layout (pahole / BTF of struct kvm_mmu_page). */
_Static_assert(sizeof(kvm_mmu_page) == 184, "kvm_mmu_page layout changed");
_Static_assert(offsetof(kvm_mmu_page, link_next) == 0, "link offset");
_Static_assert(offsetof(kvm_mmu_page, hash_next) == 16, "hash_link offset");
_Static_assert(offsetof(kvm_mmu_page, tdp_mmu_page) == 32, "tdp_mmu_page offset");
_Static_assert(offsetof(kvm_mmu_page, unsync) == 33, "unsync offset");
_Static_assert(offsetof(kvm_mmu_page, mmu_valid_gen) == 34, "union offset");
_Static_assert(offsetof(kvm_mmu_page, tdp_mmu_scheduled_root_to_zap) == 34, "union offset");
_Static_assert(offsetof(kvm_mmu_page, nx_huge_page_disallowed) == 35, "nx offset");
_Static_assert(offsetof(kvm_mmu_page, role) == 36, "role offset");
_Static_assert(offsetof(kvm_mmu_page, gfn) == 40, "gfn offset");
_Static_assert(offsetof(kvm_mmu_page, spt) == 48, "spt offset");
_Static_assert(offsetof(kvm_mmu_page, shadowed_translation) == 56, "info offset");
_Static_assert(offsetof(kvm_mmu_page, root_count) == 64, "root_count offset");
_Static_assert(offsetof(kvm_mmu_page, tdp_mmu_root_count) == 64, "union offset");
_Static_assert(offsetof(kvm_mmu_page, has_mapped_host_mmio) == 68, "mmio offset");
_Static_assert(offsetof(kvm_mmu_page, unsync_children) == 72, "union offset");
_Static_assert(offsetof(kvm_mmu_page, write_flooding_count) == 76, "union offset");
_Static_assert(offsetof(kvm_mmu_page, external_spt) == 72, "union offset");
_Static_assert(offsetof(kvm_mmu_page, parent_ptes) == 80, "union offset");
_Static_assert(offsetof(kvm_mmu_page, ptep) == 80, "union offset");
_Static_assert(offsetof(kvm_mmu_page, unsync_child_bitmap) == 88, "bitmap offset");
_Static_assert(offsetof(kvm_mmu_page, nx_link_next) == 152, "nx link offset");
_Static_assert(offsetof(kvm_mmu_page, rcu_next) == 168, "rcu_head offset");
_Static_assert(offsetof(kvm_mmu_page, rcu_gp) == 176, "rcu_head.func offset");
_Static_assert(offsetof(kvm_mmu_page, clear_spte_count) == 168, "count offset");

/*
 * Per-vCPU state of the lockless walk protocols, one cache line each so that
 * a zapper polling vCPU i does not slow vCPU j's walks.
 *   mode:   (walk_seq << 2) | vcpu->mode.  The sequence number changes each
 *           time a shadow-MMU walk ends, which is the moment the vCPU would
 *           take a pending flush IPI (local_irq_enable); a zapper waits for
 *           the word to change, not merely for the mode to read OUTSIDE.
 *   rcu_gp: the grace-period sequence this vCPU saw at rcu_read_lock(), 0
 *           outside a read-side critical section.
 */
typedef struct kvm_vcpu_lockless {
    uint64_t mode;
    uint64_t rcu_gp;
    uint32_t rcu_nesting;
    uint32_t tdp_mmu_active;       /* is_tdp_mmu_active(vcpu) */
    uint32_t irqs_disabled;
    uint32_t _pad0;
    uint64_t nr_walks;
    uint64_t _pad1[3];
} __attribute__((aligned(64))) kvm_vcpu_lockless;

_Static_assert(sizeof(kvm_vcpu_lockless) == 64, "one cache line per vCPU");

/* ---- typed aliases ------------------------------------------------------ */

typedef uint64_t __attribute__((may_alias)) pt_u64_alias;
typedef uint32_t __attribute__((may_alias)) pt_u32_alias;
typedef int32_t  __attribute__((may_alias)) pt_s32_alias;

/* ---- barriers ----------------------------------------------------------- */

/* smp_wmb(): earlier stores are visible before later stores (x86: compiler
 * barrier only).  A release fence gives exactly that in C11. */
static inline void pt_smp_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
/* smp_rmb(): earlier loads complete before later loads. */
static inline void pt_smp_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
/* smp_mb(): full barrier (x86: mfence / locked op). */
static inline void pt_smp_mb(void)  { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline void pt_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline void pt_yield(void) { sched_yield(); }

/* ---- 64-bit accesses ---------------------------------------------------- */

static inline uint64_t pt_read_once64(const uint64_t *p)
{ return __atomic_load_n((const pt_u64_alias *)p, __ATOMIC_RELAXED); }

static inline uint64_t pt_load_acquire64(const uint64_t *p)
{ return __atomic_load_n((const pt_u64_alias *)p, __ATOMIC_ACQUIRE); }

static inline void pt_write_once64(uint64_t *p, uint64_t v)
{ __atomic_store_n((pt_u64_alias *)p, v, __ATOMIC_RELAXED); }

static inline void pt_store_release64(uint64_t *p, uint64_t v)
{ __atomic_store_n((pt_u64_alias *)p, v, __ATOMIC_RELEASE); }

/* smp_store_mb(): the store, then a full barrier. */
static inline void pt_store_mb64(uint64_t *p, uint64_t v)
{ __atomic_store_n((pt_u64_alias *)p, v, __ATOMIC_SEQ_CST); pt_smp_mb(); }

/* xchg(): atomic exchange, a full barrier on x86. */
static inline uint64_t pt_xchg64(uint64_t *p, uint64_t v)
{ return __atomic_exchange_n((pt_u64_alias *)p, v, __ATOMIC_SEQ_CST); }

/* try_cmpxchg64(): on failure *old is refreshed with the current value.
 * cmpxchg8b makes this atomic on 32-bit hosts too. */
static inline int pt_try_cmpxchg64(uint64_t *p, uint64_t *old, uint64_t v)
{
    return __atomic_compare_exchange_n((pt_u64_alias *)p, old, v, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

static inline uint64_t pt_fetch_add64(uint64_t *p, uint64_t v)
{ return __atomic_fetch_add((pt_u64_alias *)p, v, __ATOMIC_SEQ_CST); }

/* ---- the two halves of a split SPTE (32-bit hosts) ---------------------- */

static inline uint32_t pt_read_low(const uint64_t *p)
{ return __atomic_load_n((const pt_u32_alias *)p, __ATOMIC_RELAXED); }

static inline uint32_t pt_read_high(const uint64_t *p)
{ return __atomic_load_n((const pt_u32_alias *)p + 1, __ATOMIC_RELAXED); }

static inline void pt_write_low(uint64_t *p, uint32_t v)
{ __atomic_store_n((pt_u32_alias *)p, v, __ATOMIC_RELAXED); }

static inline void pt_write_high(uint64_t *p, uint32_t v)
{ __atomic_store_n((pt_u32_alias *)p + 1, v, __ATOMIC_RELAXED); }

static inline uint32_t pt_xchg_low(uint64_t *p, uint32_t v)
{ return __atomic_exchange_n((pt_u32_alias *)p, v, __ATOMIC_SEQ_CST); }

/* ---- 32-bit counters and links ----------------------------------------- */

static inline uint32_t pt_read_once_u32(const uint32_t *p)
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }

static inline void pt_write_once_u32(uint32_t *p, uint32_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static inline int32_t pt_read_once_s32(const int32_t *p)
{ return __atomic_load_n((const pt_s32_alias *)p, __ATOMIC_RELAXED); }

static inline void pt_write_once_s32(int32_t *p, int32_t v)
{ __atomic_store_n((pt_s32_alias *)p, v, __ATOMIC_RELAXED); }

/* ---- the shared (mmu_lock held for read) side ------------------------- */

/* A small spinlock (the kernel's spinlock_t / tdp_mmu_pages_lock): test and
 * test-and-set, acquire on entry, release on exit.  The machine may run more
 * threads than CPUs, so a waiter yields the CPU every 256 spins instead of
 * burning a time slice against a preempted holder. */
static inline void pt_spin_lock(uint32_t *l)
{
    unsigned spins = 0;
    while (__atomic_exchange_n(l, 1u, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(l, __ATOMIC_RELAXED)) {
            if ((++spins & 255) == 0)
                sched_yield();
            else
                pt_cpu_relax();
        }
    }
}

static inline void pt_spin_unlock(uint32_t *l)
{ __atomic_store_n(l, 0u, __ATOMIC_RELEASE); }

/* atomic64_add() of a counter or statistic (relaxed: a count, no ordering). */
static inline void pt_atomic_add_s64(int64_t *p, int64_t v)
{ __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

static inline void pt_atomic_add_u64(uint64_t *p, uint64_t v)
{ __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

static inline void pt_atomic_inc_u32(uint32_t *p)
{ __atomic_fetch_add(p, 1u, __ATOMIC_RELAXED); }

/* Monotonic clock in nanoseconds, for the torture harnesses. */
#include <time.h>
static inline uint64_t pt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

#endif /* KVMMMU_PT_ARENA_DEFS_H */
