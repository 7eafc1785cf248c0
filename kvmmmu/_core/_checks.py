"""Argument checks shared by every public entry point (Cython and Python).

Batch entry points take one-dimensional, C-contiguous numpy arrays and check
them here, before any state is touched, so that bad input raises a specific
TypeError/ValueError naming the argument and leaves everything unchanged.
Nothing is converted silently: a float, a signed array or a list is refused,
not cast.  Scalar integers go through :func:`int_arg` (``operator.index``, so
``8.9`` is a TypeError, never entry 8).
"""
from operator import index as _index

import numpy as np

from kvmmmu.errors import ObjectInitError  # noqa: F401  (the core raises it from here)

U64_MAX = (1 << 64) - 1


class ArgumentRangeError(ValueError, OverflowError):
    """An integer argument outside its range.  Both a ValueError (a bad
    value) and an OverflowError (what a C-typed argument raises for a value
    that does not fit), so callers may catch either."""


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


def check_uint_array(name, arr):
    """`arr` (a 1-d ndarray of any integer dtype) as uint64.  A signed array
    is accepted only if no element is negative (checked, never wrapped);
    floats, bools and non-arrays are refused with a TypeError naming `name`."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of integers, not {type(arr).__name__}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, not {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, not {arr.ndim}-d")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ArgumentRangeError(f"{name} holds a negative value ({int(arr.min())})")
    return arr if arr.dtype == np.uint64 else arr.astype(np.uint64)


def out_array(name, out, n, dtype, inputs=()):
    """A fresh array of `n` elements, or the caller's `out` once checked.

    `inputs` are the arrays the call reads: an `out` that shares memory with
    any of them is refused (a nogil loop would read what it just wrote)."""
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
    check_no_overlap(name, out, inputs)
    return out


def check_no_overlap(name, out, inputs):
    """Refuse an output array that shares memory with one of `inputs`."""
    for arr in inputs:
        if arr is not None and np.shares_memory(out, arr):
            raise ValueError(f"{name} overlaps an input array; pass a separate array")


def int_arg(name, value, lo=0, hi=U64_MAX):
    """`value` as a Python int in [lo, hi], or TypeError/ValueError naming `name`.

    Accepts exactly what ``operator.index`` accepts (int, numpy integers,
    bool): a float or a string is a TypeError, not truncated."""
    try:
        v = _index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if not lo <= v <= hi:
        raise ArgumentRangeError(f"{name}={v:#x} is outside {lo:#x}..{hi:#x}")
    return v


def readonly(arr):
    """A zero-copy read-only view of the C-contiguous `arr` that cannot be
    flipped back to writable: its memory comes from a read-only memoryview
    (of the raw bytes, so structured dtypes work too), so
    ``setflags(write=True)`` raises."""
    raw = arr.reshape(-1).view(np.uint8)
    return np.frombuffer(memoryview(raw).toreadonly(), dtype=arr.dtype).reshape(arr.shape)


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
