"""Build hook for neox's kernels in csrc/.

Compiled once, at install time (`pip install --no-build-isolation -e .`), never at train start:
- `neox._C_cpu`  : every csrc/<op>/*.cpp  (always built)
- `neox._C_cuda` : every csrc/<op>/*.cu plus its bindings, when torch has CUDA and nvcc is found.
A build failure prints one clear message and the install still succeeds; neox then announces at
train start that it is using the pure-PyTorch reference ops.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[neox build] {msg}", file=sys.stderr, flush=True)


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not installed yet; skipping kernels (install torch, then reinstall neox)")
        return [], {}
    exts = []
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*", "*_cpu.cpp")))
    if cpu_sources:
        exts.append(cpp_extension.CppExtension(
            "neox._C_cpu", cpu_sources,
            extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"]))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*", "*.cu")))
    cuda_bind = sorted(glob.glob(os.path.join("csrc", "*", "*_cuda.cpp")))
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if cuda_sources and torch.version.cuda and nvcc and os.environ.get("NEOX_BUILD_CUDA", "1") != "0":
        exts.append(cpp_extension.CUDAExtension(
            "neox._C_cuda", cuda_bind + cuda_sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}))
    elif cuda_sources:
        _log("CUDA kernels not built (no CUDA torch or no nvcc; set CUDA_HOME=/usr/local/cuda)")
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
