"""Builds the C++/CUDA CEP ops in csrc/ into models/_C (DESIGN.md §4).

A CUDAExtension is built only when the installed torch is a CUDA build and CUDA_HOME is set (or FORCE_CUDA=1); it is
never decided on torch.cuda.is_available(), so GPU-less build machines produce GPU wheels. TORCH_CUDA_ARCH_LIST and
MAX_JOBS are honoured by torch.utils.cpp_extension itself.
"""
import glob
import os

from setuptools import setup


def extension_modules():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources:
        print("cepdiff: csrc/ has no C++ sources; building no extension (the pure-PyTorch twins will run)")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    use_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    )
    # Unset, CUDA_HOME is guessed by torch as dirname(dirname(which nvcc)): /usr/local for a /usr/local/bin/nvcc wrapper
    # script, and the link then fails on -lcudart after minutes of nvcc. Fail before compiling instead.
    cuda_home = cpp_extension.CUDA_HOME or ""
    if use_cuda and not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        raise SystemExit(f"cepdiff: CUDA_HOME={cuda_home!r} holds no CUDA toolkit (no include/cuda_runtime_api.h); "
                         "set CUDA_HOME to the toolkit root, the directory with bin/nvcc")
    # -fno-trapping-math lets GCC if-convert (and so vectorize) float selects, as in the torch build itself.
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if use_cuda:
        extension = cpp_extension.CUDAExtension(
            "models._C",
            cpp_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={
                "cxx": cxx_flags + ["-DCEP_WITH_CUDA"],
                "nvcc": ["-O3", "-Xcompiler=-g0", "--expt-relaxed-constexpr", "-std=c++20", "-DCEP_WITH_CUDA"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = cpp_extension.CppExtension(
            "models._C",
            cpp_sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    print(f"cepdiff: building models._C as a {'CUDA' if use_cuda else 'CPU'} extension")
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
