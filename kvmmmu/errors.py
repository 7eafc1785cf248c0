"""Exceptions shared by several kvmmmu modules."""


class KvmNoMemoryError(MemoryError):
    """-ENOMEM from a memory cache or pool.

    Raised when a pool's configured capacity is exhausted (or a failure was
    injected for a test), and when a per-vCPU cache is empty inside a fault
    (the kernel WARNs there; the model refuses).  The structure that raised
    it is unchanged, unless ``done`` says otherwise.

    Attributes
    ----------
    done : int or None
        Set by batch calls: how many leading elements were applied before
        the failure (each element is one fault; earlier ones stay done).
    """

    def __init__(self, msg, done=None):
        super().__init__(msg)
        self.done = done


class ObjectInitError(RuntimeError):
    """A method of an object whose ``__init__`` never ran or did not
    complete (made with ``Cls.__new__(Cls)``, or ``__init__`` raised), or an
    ``__init__`` called a second time on an object that owns C memory."""


class LockNotHeldError(RuntimeError):
    """A call that needs a lock (``mmu_lock``, ``slots_lock``) the caller
    does not hold: the kernel's lockdep assertion, refused before anything
    changes."""


class ConcurrentUseError(RuntimeError):
    """An object that one thread at a time may use (a ``HostMm``, the
    model's ``mmu_lock``) used by a second thread at the same time, or a lock
    taken again by its holder (a deadlock in the kernel): refused before
    anything changes."""
