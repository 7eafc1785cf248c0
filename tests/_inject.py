"""Allocation failures the shadow-MMU state machines inject (shared by
test_shadow_model.py and test_shadow_nested_ept.py)."""
from kvmmmu._core.pt_arena import MmuMemoryCache
from kvmmmu.errors import KvmNoMemoryError


def hog_arena(arena) -> list:
    """Take every free page-table page of `arena` into caches of our own, so
    that the MMU's next page allocation fails; returns the caches."""
    hog = []
    while True:
        c = MmuMemoryCache(arena, "shadow_page")
        try:
            c.topup(1)
        except KvmNoMemoryError:
            return hog
        hog.append(c)


def release(vm, hog: list) -> None:
    """Lift both injections: the descriptor pool's failure countdown and the
    arena pages `hog` holds (emptied)."""
    vm.rmap_pool.fail_after(None)
    for c in hog:
        c.free()
    hog.clear()
