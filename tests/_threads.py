"""Run a function on several threads at once, with a tiny switch interval so
that the threads interleave finely (the GIL handed over every microsecond)."""
import sys
import threading


def run_in_threads(fn, n: int, switch_interval: float = 1e-6) -> None:
    """``fn(i)`` on threads ``i = 0 .. n-1``, started together, all joined."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval)
    try:
        threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
