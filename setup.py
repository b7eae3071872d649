"""Build script.

The pure-Python package always installs. The CUDA extension ``recon_kernels._cuda``
(sources in ``csrc/``) is built when ``RECON_BUILD_CUDA`` says so:

* ``RECON_BUILD_CUDA=auto`` (default): build when ``nvcc`` is found and ``csrc/`` has sources.
* ``RECON_BUILD_CUDA=1``: build, fail loudly if that is impossible.
* ``RECON_BUILD_CUDA=0``: never build.

``RECON_CUDA_ARCHS`` (default ``80;90a``) picks the SASS targets. The extension links
only against the CUDA runtime and pybind11, never libtorch, so one build works with any
installed torch version.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_cuda import cuda_build_config  # noqa: E402

ext_modules, cmdclass = cuda_build_config()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
