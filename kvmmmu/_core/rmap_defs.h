/*
 * kvmmmu: the C layout of KVM's PTE lists (Linux v6.18, arch/x86/kvm/mmu/mmu.c
 * facts; see rmap.pyx for the algorithms and ../shared/reference/rmap.md).
 *
 * Only layout, constants and the few atomic primitives the rmap lock needs live
 * here, so that the static asserts below check the exact struct that the Cython
 * code (rmap.pxd declares it `cdef extern`) and any C consumer use.
 */
#ifndef KVMMMU_RMAP_DEFS_H
#define KVMMMU_RMAP_DEFS_H

#include <stddef.h>
#include <stdint.h>

/* Entries per descriptor: as many 8-byte slots as fit in 128 bytes after the
 * 16-byte header.  Kernel value since the 2021 rework (v6.4 split the count). */
#define PTE_LIST_EXT 14

/*
 * Flag bits in an rmap head word.  Every value stored in a head is at least
 * 8-byte aligned (an sptep, or a descriptor address), so bits 0..2 are free.
 *   bit 0, KVM_RMAP_MANY:   the rest of the word addresses the head descriptor;
 *                           clear (and word != 0): the word *is* the one sptep.
 *   bit 1, KVM_RMAP_LOCKED: the per-head bit spinlock (kernel v6.15+).
 */
#define KVM_RMAP_MANY   ((uint64_t)1 << 0)
#define KVM_RMAP_LOCKED ((uint64_t)1 << 1)
#define KVM_RMAP_FLAGS  (KVM_RMAP_MANY | KVM_RMAP_LOCKED)

/*
 * One block of a PTE list.  Field order is the kernel's: the metadata first so
 * that a reader of the counts (pte_list_count, the add path) touches one
 * 64-byte line, together with sptes[0..5].
 *
 *   more        next (older) descriptor, NULL at the end of the chain.  A real
 *               C pointer into the descriptor pool, whose chunks never move.
 *   spte_count  entries used in *this* descriptor: 1..14 in the head, 14 in
 *               every tail.
 *   tail_count  entries in all descriptors after this one (14 * their number);
 *               fixed when the descriptor becomes a head, never updated after,
 *               because tails never change their count.
 *   sptes       the entries: sptep_t values (an SPTE's host physical byte
 *               address, see types.pxd), sptes[0..spte_count-1] non-zero and
 *               the rest zero.
 */
struct pte_list_desc {
	struct pte_list_desc *more;
	uint32_t spte_count;
	uint32_t tail_count;
	uint64_t sptes[PTE_LIST_EXT];
};

/* The kernel's struct kvm_rmap_head: one atomic long.  kvmmmu keeps heads in
 * numpy uint64 arrays and accesses them through this type. */
struct kvm_rmap_head {
	uint64_t val;
};

/* The kernel's BUILD_BUG_ONs and the layout the documentation promises. */
_Static_assert(sizeof(void *) == 8, "kvmmmu models a 64-bit host");
_Static_assert(sizeof(struct pte_list_desc) == 128, "pte_list_desc must be 128 bytes");
_Static_assert(sizeof(struct pte_list_desc) % 64 == 0, "pte_list_desc must fill whole cache lines");
_Static_assert(offsetof(struct pte_list_desc, more) == 0, "more first");
_Static_assert(offsetof(struct pte_list_desc, spte_count) == 8, "spte_count at 8");
_Static_assert(offsetof(struct pte_list_desc, tail_count) == 12, "tail_count at 12");
_Static_assert(offsetof(struct pte_list_desc, sptes) == 16, "sptes at 16");
_Static_assert(sizeof(struct kvm_rmap_head) == 8, "an rmap head is one 64-bit word");

/*
 * Atomic primitives on a head word (GCC/Clang __atomic builtins; C11 memory
 * model).  Names say which kernel primitive each one stands for.
 */
static inline uint64_t kvm_rmap_atomic_read(const uint64_t *p)
{
	/* atomic_long_read: relaxed */
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline int kvm_rmap_try_cmpxchg_acquire(uint64_t *p, uint64_t *old, uint64_t new_val)
{
	/* atomic_long_try_cmpxchg_acquire: on failure *old is refreshed */
	return __atomic_compare_exchange_n(p, old, new_val, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

static inline void kvm_rmap_set_release(uint64_t *p, uint64_t v)
{
	/* atomic_long_set_release */
	__atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline void kvm_rmap_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

/* Prefetch a head word for writing (the batch loops run a few elements
 * ahead, so the cache misses of independent heads overlap).  A hint only: it
 * never faults, whatever the address. */
static inline void kvmmmu_prefetchw(const void *p)
{
	__builtin_prefetch(p, 1, 3);
}

/* Relaxed loads/stores for racy-by-design statistics and test probes (and
 * for reading caller-owned input arrays in nogil loops: one load per element,
 * never re-read by the compiler, so a value checked is the value used). */
static inline uint64_t kvmmmu_load_relaxed_u64(const uint64_t *p)
{
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void kvmmmu_store_relaxed_u64(uint64_t *p, uint64_t v)
{
	__atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline uint32_t kvmmmu_load_relaxed_u32(const uint32_t *p)
{
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void kvmmmu_fetch_add_u64(uint64_t *p, uint64_t v)
{
	__atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

/* A tiny test-and-set spinlock for the descriptor pool (the kernel's kmem
 * cache is safe to use from any CPU; so is the pool). */
static inline int kvmmmu_spin_trylock(unsigned char *l)
{
	return !__atomic_test_and_set(l, __ATOMIC_ACQUIRE);
}

static inline void kvmmmu_spin_unlock(unsigned char *l)
{
	__atomic_clear(l, __ATOMIC_RELEASE);
}

#endif /* KVMMMU_RMAP_DEFS_H */
