"""Each MMU-wide constant and geometry helper has one home.

C: ``kvmmmu/_core/mmu_defs.h`` (Cython declares it in ``mmu_defs.pxd``);
Python: ``kvmmmu/_core/defs.pyx``.  This test greps the source tree for a
second definition -- a ``#define``, an enum member, a Cython ``DEF``/``cdef``
constant, a module-level Python assignment, or a function of the same name --
and fails if one reappears.  Imports and re-exports (``from ... import X``,
``X = defs.X`` is not allowed either: import the name) are fine.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "kvmmmu"

C_HOME = PKG / "_core" / "mmu_defs.h"
PXD_HOME = PKG / "_core" / "mmu_defs.pxd"
PY_HOME = PKG / "_core" / "defs.pyx"

CONSTANTS = [
    "PAGE_SHIFT", "PAGE_SIZE", "SPTE_LEVEL_BITS", "SPTE_ENT_PER_PAGE",
    "PG_LEVEL_NONE", "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G", "PG_LEVEL_512G",
    "PG_LEVEL_256T", "PT64_ROOT_MAX_LEVEL", "KVM_NR_PAGE_SIZES", "KVM_MAX_HUGEPAGE_LEVEL",
    "KVM_HPAGE_GFN_SHIFT_PER_LEVEL",
    "ACC_EXEC_MASK", "ACC_WRITE_MASK", "ACC_USER_MASK", "ACC_ALL",
    "RET_PF_CONTINUE", "RET_PF_RETRY", "RET_PF_EMULATE", "RET_PF_WRITE_PROTECTED",
    "RET_PF_INVALID", "RET_PF_FIXED", "RET_PF_SPURIOUS", "PTE_PREFETCH_NUM",
]
HELPERS = ["gfn_to_index", "kvm_mmu_slot_lpages", "KVM_PAGES_PER_HPAGE"]

SOURCES = sorted(p for ext in ("*.py", "*.pyx", "*.pxd", "*.pxi", "*.h")
                 for p in PKG.rglob(ext))


def _definitions(path: pathlib.Path, name: str):
    """Lines of `path` that define `name` (not use, import or declare it)."""
    n = re.escape(name)
    if path.suffix == ".h":
        pats = [rf"^\s*#\s*define\s+{n}\b",                           # macro
                rf"^\s*{n}\s*(=\s*[^=]|,|$)",                          # enum member
                rf"^\s*(static\s+)?(inline\s+)?\w[\w\s\*]*\b{n}\s*\([^;]*$"]  # function
    else:
        pats = [rf"^\s*{n}\s*(:\s*[\w\[\], .]+)?=\s*[^=]",               # NAME = ...
                rf"^\s*DEF\s+{n}\b",                                   # Cython DEF
                rf"^\s*c?p?def\s+(const\s+)?\w[\w\s\*]*\b{n}\s*=",     # cdef constant
                rf"^\s*(c?p?def)\s+(inline\s+)?(\w[\w\s\*]*\s)?\**{n}\s*\("]  # function
    enum_member = rf"^\s+{n}\s*(=|,|#|$)"
    hits, in_enum = [], False
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if path.suffix != ".h":
            # members of a Cython `cdef enum` block (not of an extern declaration)
            if re.match(r"c?p?def\s+enum\b", line):
                in_enum = True
            elif line.strip() and not line[0].isspace():
                in_enum = False
        if path.suffix != ".h" and re.search(rf"\b{n}=\w+,", line):
            continue        # a keyword argument (NAME=NAME, ...), not a definition
        if any(re.search(p, line) for p in pats) or (in_enum and re.search(enum_member, line)):
            hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    return hits


@pytest.mark.parametrize("name", CONSTANTS + HELPERS)
def test_defined_once(name):
    stray = []
    for path in SOURCES:
        if path in (C_HOME, PXD_HOME, PY_HOME):
            continue
        stray += _definitions(path, name)
    assert not stray, (f"{name} is defined outside its home (mmu_defs.h / defs.pyx); "
                       "import it instead:\n" + "\n".join(stray))


@pytest.mark.parametrize("name", CONSTANTS)
def test_home_defines_it(name):
    # The guard above is only meaningful if the homes are where the value lives.
    assert _definitions(C_HOME, name), f"{name} missing from mmu_defs.h"
    assert re.search(rf"^{name} = _{name}\b|^{name} = int\(_{name}\)", PY_HOME.read_text(), re.M)


def test_the_grep_finds_a_planted_second_definition(tmp_path):
    # A check that cannot fail proves nothing: each pattern must catch its kind.
    samples = {
        "x.h": "#define PAGE_SHIFT 12\nenum {\n\tRET_PF_RETRY = 1,\n};\n"
               "static inline uint64_t gfn_to_index(uint64_t g, uint64_t b, int l)\n{",
        "x.py": "PAGE_SIZE = 4096\nKVM_NR_PAGE_SIZES: int = 3\ndef kvm_mmu_slot_lpages(a, b, c):\n",
        "x.pyx": "DEF PT64_ROOT_MAX_LEVEL = 5\ncdef int ACC_ALL = 7\n"
                 "cdef inline uint64_t gfn_to_index(uint64_t g):\n"
                 "cdef enum:\n    PTE_PREFETCH_NUM = 8\n    RET_PF_FIXED\n",
    }
    want = {"x.h": ["PAGE_SHIFT", "RET_PF_RETRY", "gfn_to_index"],
            "x.py": ["PAGE_SIZE", "KVM_NR_PAGE_SIZES", "kvm_mmu_slot_lpages"],
            "x.pyx": ["PT64_ROOT_MAX_LEVEL", "ACC_ALL", "gfn_to_index", "PTE_PREFETCH_NUM",
                      "RET_PF_FIXED"]}
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        for fname, body in samples.items():
            p = tmp_path / fname
            p.write_text(body + "\n")
            for name in want[fname]:
                assert _definitions(p, name), (fname, name)
            # ... and uses, imports and declarations are not definitions
            p.write_text(f"from kvmmmu._core.defs import {want[fname][0]}\n"
                         f"f({want[fname][0]}={want[fname][0]},\n"
                         f"y = {want[fname][0]} + 1\nif {want[fname][0]} == 3: pass\n"
                         f"    const int {want[fname][0]}\n")
            assert not _definitions(p, want[fname][0]), fname
    finally:
        ROOT = old
