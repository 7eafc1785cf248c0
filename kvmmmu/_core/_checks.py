"""Argument checks shared by the Cython modules' Python entry points.

Batch entry points take one-dimensional, C-contiguous numpy arrays and check
them here, before any state is touched, so that bad input raises a specific
TypeError/ValueError naming the argument and leaves everything unchanged.
"""
import numpy as np


def check_array(name, arr, dtype=np.uint64, writable=False):
    """Return `arr` if it is a 1-d, C-contiguous ndarray of `dtype`
    (and writable, if asked); raise TypeError/ValueError naming `name` if not."""
    dtype = np.dtype(dtype)
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of {dtype}, not {type(arr).__name__}")
    if arr.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, not {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, not {arr.ndim}-d")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return arr


def out_array(name, out, n, dtype):
    """A fresh array of `n` elements, or the caller's `out` once checked."""
    dtype = np.dtype(dtype)
    if out is None:
        return np.empty(n, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, not {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, not {out.dtype}")
    if out.ndim != 1 or out.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), not {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{name} must be C-contiguous and writable")
    return out


def export(namespace, name):
    """Decorator: publish a Python wrapper in `namespace` under `name`.

    The C helpers in the .pxd files carry the kernel's names, so a module's
    Python wrappers are defined under private names and published under the
    kernel's names with this.
    """
    def publish(func):
        func.__name__ = func.__qualname__ = name
        namespace[name] = func
        return func
    return publish
