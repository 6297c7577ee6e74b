"""Builds datarater._C: the C++ CPU kernels always, the CUDA kernels where torch has CUDA.

The extension is optional: if torch is missing at build time (a build-isolated install) or
the compiler fails, the package installs without it and every kernel runs on its plain-torch
path. Install with ``pip install --no-build-isolation -e .`` so that the build sees the torch
you run with. ``DATARATER_NO_EXT=1`` skips the extension; ``DATARATER_NO_CUDA=1`` skips CUDA.
"""

import glob
import os
import warnings

from setuptools import setup


def _extensions():
    if os.environ.get("DATARATER_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn(
            "datarater: torch is not importable at build time, so the C++/CUDA extension is "
            "skipped and the pure-torch kernels are used. Install torch first and build with "
            "`pip install --no-build-isolation -e .`.",
            stacklevel=1,
        )
        return [], {}

    class OptionalBuild(BuildExtension):
        """A failed extension build warns and leaves the pure-torch fallback in place."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compiler failure means: fall back
                warnings.warn(
                    f"datarater: building {ext.name} failed ({e}); using torch fallback",
                    stacklevel=1,
                )

    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-std=c++17"]
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    use_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("DATARATER_NO_CUDA") != "1"
    )
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_launch.cpp"))
        ext = CUDAExtension(
            "datarater._C",
            sources,
            define_macros=[("DATARATER_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "datarater._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
