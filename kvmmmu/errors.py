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
