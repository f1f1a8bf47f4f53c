"""Build fastgen._C.

* C++ CPU sources (csrc/**/*_cpu.cpp + csrc/bindings.cpp) are always built.
* CUDA sources (csrc/**/*_cuda.cu) are built only when the installed torch was built with CUDA
  (torch.version.cuda) or FASTGEN_FORCE_CUDA=1. No GPU is ever queried here, so CPU-only build
  machines work.
* FASTGEN_SKIP_EXT=1 builds no extension at all; fastgen then serves every op from Triton / torch.

Build with `pip install --no-build-isolation -e .` so the extension compiles against the torch that is
already installed (an isolated build would download a different torch).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("FASTGEN_SKIP_EXT"):
        print("fastgen: FASTGEN_SKIP_EXT=1, building no C++/CUDA extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*_cpu.cpp"), recursive=True))
    cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*_cuda.cu"), recursive=True))
    sources = ["csrc/bindings.cpp", *cpu_sources]
    with_cuda = bool(torch.version.cuda) or _flag("FASTGEN_FORCE_CUDA")
    # -fno-math-errno / -fno-trapping-math change no result (no reassociation, no contraction); they let
    # GCC vectorize sqrtf and branch-free selects, e.g. the CPU kernel's Box-Muller loop (clang's default).
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    define_macros = []
    if with_cuda:
        define_macros.append(("FASTGEN_WITH_CUDA", "1"))
        # No --use_fast_math: the counter-based RNG and the learned-range variance need the accurate
        # logf / sinf / cosf / expf to agree with the CPU, Triton and torch backends to ~1e-6.
        nvcc = [
            "-O3",
            "-std=c++17",
            "--expt-relaxed-constexpr",
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        ]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Ampere and Hopper; PTX for newer parts. Keeps the build to two cubins.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        ext = CUDAExtension(
            "fastgen._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastgen._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    print(f"fastgen: building fastgen._C ({'C++ + CUDA' if with_cuda else 'C++ CPU only'})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
