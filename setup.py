"""Build of the optional C kernels (``cellvae/_kernels.c``); everything else is in pyproject.toml.

The extension is optional: where it does not compile (no C compiler, or no glibc vector maths
library ``libmvec``, as on macOS and Windows), the install goes on without it and cellvae runs
its torch code (:mod:`cellvae._kernels`).
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "cellvae._ckernels",
            sources=["cellvae/_kernels.c"],
            # no -ffast-math: infinities and NaNs keep their meaning; these let the compiler
            # vectorise the loops, their reductions and the calls into libmvec
            extra_compile_args=[
                "-O3",
                "-fno-math-errno",
                "-funsafe-math-optimizations",
                "-ffp-contract=off",  # the same roundings with and without gradients
                "-fopenmp",
            ],
            extra_link_args=["-fopenmp"],
            libraries=["mvec", "m"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
