"""``kvm->mmu_lock`` (an rwlock on x86) as checked state, like lockdep.

Compiled because every fault takes it twice (read_lock, read_unlock): each
method here runs from start to end holding the GIL, with no Python code of
anyone else in between, so a check and the state change it guards are one
step for every other thread - no internal lock is needed, and an acquire
or release costs about one Python call.
"""
from cpython.pythread cimport PyThread_get_thread_ident

from kvmmmu.errors import ConcurrentUseError, LockNotHeldError


cdef class MmuLock:
    """``kvm->mmu_lock`` as checked state.

    * **Read side, shared**: any number of threads may hold it for read at
      once (the TDP MMU's faults: :class:`~kvmmmu._core.tdp_mmu.TdpMmuCore`'s
      shared side runs their maps in parallel, without the GIL).  A thread
      may take it for read again while it holds it for read (counted per
      thread; the kernel's recursive read_lock).
    * **Write side, exclusive**: held by one thread, and only while no thread
      holds the read side.
    * **Checked, not waiting**: an acquire that would have to wait raises
      instead of blocking - :class:`ConcurrentUseError` when another thread
      holds the lock in a conflicting mode (the model's callers serialize
      writers themselves: the VM's ioctls and notifier callbacks take it
      under ``VM.api_lock``), and also when this thread already holds it in a
      mode that makes the acquire a deadlock (write after read or write,
      read after write).  ``lockdep_assert_*`` raise
      :class:`LockNotHeldError` when the calling thread does not hold it; a
      release by a thread that does not hold the lock raises the same.
    * Each check and its state change run as one step under the GIL (a
      compiled method calls no Python code in between), so the counts are
      exact across threads: no lost counts, no two writers.

    ``readers`` (total read holds over all threads) and ``writers`` (0 or 1)
    are read-only views for tests and asserts.  Shareable between threads.
    """
    cdef bint _has_writer
    cdef unsigned long _writer          # thread ident of the write holder
    cdef dict _readers                  # thread ident -> read depth
    cdef Py_ssize_t _nreaders           # sum of the depths

    def __cinit__(self):
        self._readers = {}

    @property
    def readers(self) -> int:
        return self._nreaders

    @property
    def writers(self) -> int:
        return 1 if self._has_writer else 0

    def acquire_write(self):
        cdef unsigned long me = PyThread_get_thread_ident()
        if (self._has_writer and self._writer == me) or me in self._readers:
            raise ConcurrentUseError("mmu_lock: write_lock while this thread holds it (deadlock)")
        if self._has_writer:
            raise ConcurrentUseError("mmu_lock: taken for write by another thread at the same time")
        if self._nreaders:
            raise ConcurrentUseError(f"mmu_lock: write_lock while {len(self._readers)} other "
                                     "thread(s) hold it for read")
        self._writer = me
        self._has_writer = True

    def release_write(self):
        if not self._has_writer or self._writer != PyThread_get_thread_ident():
            raise LockNotHeldError("mmu_lock: write_unlock without the lock")
        self._has_writer = False

    def acquire_read(self):
        cdef unsigned long me = PyThread_get_thread_ident()
        if self._has_writer:
            if self._writer == me:
                raise ConcurrentUseError("mmu_lock: read_lock while held for write (deadlock)")
            raise ConcurrentUseError("mmu_lock: read_lock while another thread holds it for write")
        self._readers[me] = self._readers.get(me, 0) + 1
        self._nreaders += 1

    def release_read(self):
        cdef unsigned long me = PyThread_get_thread_ident()
        cdef object depth = self._readers.get(me)
        if depth is None:
            raise LockNotHeldError("mmu_lock: read_unlock without the lock")
        if depth == 1:
            del self._readers[me]
        else:
            self._readers[me] = depth - 1
        self._nreaders -= 1

    def write(self):
        """``with lock.write():`` - write_lock / write_unlock."""
        return _MmuLockCtx(self, True)

    def read(self):
        """``with lock.read():`` - read_lock / read_unlock."""
        return _MmuLockCtx(self, False)

    @property
    def held(self) -> bool:
        """Held by any thread, in either mode."""
        return self._has_writer or self._nreaders != 0

    def lockdep_assert_held_write(self):
        if not self._has_writer or self._writer != PyThread_get_thread_ident():
            raise LockNotHeldError("mmu_lock must be held for write")

    def lockdep_assert_held(self):
        cdef unsigned long me = PyThread_get_thread_ident()
        if not (self._has_writer and self._writer == me) and me not in self._readers:
            raise LockNotHeldError("mmu_lock must be held")

    def __repr__(self):
        return f"MmuLock(readers={self._nreaders}, writers={self.writers})"


cdef class _MmuLockCtx:
    cdef MmuLock lock
    cdef bint w

    def __cinit__(self, MmuLock lock not None, bint write):
        self.lock, self.w = lock, write

    def __enter__(self):
        if self.w:
            self.lock.acquire_write()
        else:
            self.lock.acquire_read()
        return self.lock

    def __exit__(self, *exc):
        if self.w:
            self.lock.release_write()
        else:
            self.lock.release_read()
        return False
