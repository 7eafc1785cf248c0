# Scalar integer arguments of ``def`` methods, checked as ``_checks.int_arg``
# does (``operator.index``: a float or a string is a TypeError, never
# truncated; out of range is an ArgumentRangeError naming the argument), at
# the cost of a type test when the argument is a plain in-range int.
# A C-typed ``def`` parameter (``uint64_t sp``) would instead truncate 1.5 to 1.
from libc.stdint cimport uint64_t, int64_t


cdef inline object _slow(object v, str name, object lo, object hi):
    from kvmmmu._core._checks import int_arg
    return int_arg(name, v, lo, hi)


cdef inline uint64_t u64_arg(object v, str name) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t r
    if type(v) is int:
        try:
            r = v
            return r
        except OverflowError:
            pass
    r = _slow(v, name, 0, 0xFFFFFFFFFFFFFFFF)
    return r


cdef inline int64_t s64_arg(object v, str name) except? -1:
    cdef int64_t r
    if type(v) is int:
        try:
            r = v
            return r
        except OverflowError:
            pass
    r = _slow(v, name, -0x8000000000000000, 0x7FFFFFFFFFFFFFFF)
    return r


cdef inline unsigned int u32_arg(object v, str name) except? 0xFFFFFFFF:
    cdef unsigned int r
    if type(v) is int:
        try:
            r = v
            return r
        except OverflowError:
            pass
    r = _slow(v, name, 0, 0xFFFFFFFF)
    return r


cdef inline int s32_arg(object v, str name) except? -1:
    cdef int r
    if type(v) is int:
        try:
            r = v
            return r
        except OverflowError:
            pass
    r = _slow(v, name, -0x80000000, 0x7FFFFFFF)
    return r
