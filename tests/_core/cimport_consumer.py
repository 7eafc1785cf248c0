"""Build a small Cython module that cimports kvmmmu's .pxd contracts.

The cimport tests (as numpy's test_extending does) compile a consumer in a
temporary directory against the installed/in-place kvmmmu/_core headers and
import it, proving that other Cython modules can build on the .pxd files.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest

import kvmmmu

SETUP = textwrap.dedent("""
    import os, sys
    import numpy as np
    from setuptools import Extension, setup
    from Cython.Build import cythonize
    name, core = sys.argv.pop(1), sys.argv.pop(1)
    setup(name=name, script_args=["build_ext", "--inplace", "-q"],
          ext_modules=cythonize([Extension(name, [name + ".pyx"],
                                           include_dirs=[core, np.get_include()],
                                           extra_compile_args=["-std=gnu11"])],
                                include_path=[os.path.dirname(os.path.dirname(core))],
                                compiler_directives=dict(language_level=3), quiet=True))
""")


def build_consumer(tmp_path, name, source):
    """Compile `source` as extension `name` in `tmp_path` and import it.

    Skips when Cython is not installed; fails with the compiler's output
    when the build fails.  The caller removes `tmp_path` from sys.path.
    """
    pytest.importorskip("Cython")
    (tmp_path / f"{name}.pyx").write_text(textwrap.dedent(source))
    (tmp_path / "setup.py").write_text(SETUP)
    core = os.path.join(os.path.dirname(kvmmmu.__file__), "_core")
    proc = subprocess.run([sys.executable, "setup.py", name, core], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sys.path.insert(0, str(tmp_path))
    return importlib.import_module(name)
