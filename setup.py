"""Build the Cython core of kvmmmu.

This is the one place where the extension list, the Cython compiler directives
and the C macros are set.  Every ``kvmmmu/_core/*.pyx`` becomes one extension
module; modules share declarations through their ``.pxd`` files.

Environment switches:

``KVMMMU_DEBUG_CYTHON=1``
    Build with bounds/initialisation checks on, ``-O0 -g``, and the C macro
    ``KVMMMU_DEBUG=1`` (debug-only invariant checks, like the kernel's
    MMU_WARN_ON).  Release builds compile those branches away.
``KVMMMU_SANITIZE=address``
    Build the extension modules with AddressSanitizer (``-fsanitize=address``);
    run Python with the runtime preloaded (``scripts/asan.sh`` does it all).

The flavour (directives, macros, flags) is recorded next to the generated C
(``kvmmmu/_core/.build-flavour``); when it changes, every module is generated
and compiled again, so one tree can switch between release, debug and ASan.
"""
import glob
import json
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("KVMMMU_DEBUG_CYTHON") == "1"
SANITIZE = os.environ.get("KVMMMU_SANITIZE", "")
if SANITIZE not in ("", "address"):
    raise SystemExit(f"KVMMMU_SANITIZE={SANITIZE!r}: only 'address' is supported")

COMPILER_DIRECTIVES = dict(
    language_level=3,
    boundscheck=DEBUG,        # def entry points range-check their inputs
    initializedcheck=DEBUG,
    wraparound=False,         # a negative gfn or index is always a bug
    nonecheck=False,
    cdivision=True,           # we divide by page sizes and powers of two
    embedsignature=True,
)

DEFINE_MACROS = [
    ("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
    ("KVMMMU_DEBUG", "1" if DEBUG else "0"),
]

EXTRA_COMPILE_ARGS = ["-O0", "-g"] if DEBUG else ["-O3"]
EXTRA_COMPILE_ARGS += ["-std=gnu11", "-Wno-unused-function"]
EXTRA_COMPILE_ARGS += ["--param=inline-unit-growth=100"]  # tdp_mmu.c sat at GCC's 40% cliff
EXTRA_LINK_ARGS = []
if SANITIZE:
    EXTRA_COMPILE_ARGS += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"]
    EXTRA_LINK_ARGS += [f"-fsanitize={SANITIZE}"]

FLAVOUR = json.dumps([COMPILER_DIRECTIVES, DEFINE_MACROS, EXTRA_COMPILE_ARGS], sort_keys=True)
FLAVOUR_FILE = os.path.join("kvmmmu", "_core", ".build-flavour")


def flavour_changed():
    """True if the generated C and objects were built with other settings."""
    try:
        with open(FLAVOUR_FILE) as f:
            changed = f.read() != FLAVOUR
    except OSError:
        changed = True
    if changed:
        with open(FLAVOUR_FILE, "w") as f:
            f.write(FLAVOUR)
    return changed


def extensions():
    exts = []
    for pyx in sorted(glob.glob(os.path.join("kvmmmu", "_core", "*.pyx"))):
        name = pyx[:-4].replace(os.sep, ".")
        exts.append(
            Extension(
                name,
                [pyx],
                include_dirs=[np.get_include(), os.path.join("kvmmmu", "_core")],
                define_macros=DEFINE_MACROS,
                extra_compile_args=EXTRA_COMPILE_ARGS,
                extra_link_args=EXTRA_LINK_ARGS,
            )
        )
    return exts


# Regenerating the C (newer than every .so) also makes build_ext recompile.
FORCE = flavour_changed()

setup(
    ext_modules=cythonize(
        extensions(),
        compiler_directives=COMPILER_DIRECTIVES,
        nthreads=int(os.environ.get("KVMMMU_BUILD_JOBS", "0")) or None,
        force=FORCE,
    ),
)
