"""Build hook for neox's kernels in csrc/ (see csrc/README.md).

Compiled once, at install time (`pip install --no-build-isolation -e .`), never at train start:
- `neox._C_cpu`  : csrc/bindings_cpu.cpp + csrc/<op>/*_cpu.cpp            (always tried)
- `neox._C_cuda` : csrc/bindings_cuda.cpp + csrc/<op>/*.cu  when torch has CUDA and nvcc is found.
Arch list: $TORCH_CUDA_ARCH_LIST if set (named arches and "9.0a" are fine), else the visible GPU's,
else "8.0;9.0". NEOX_BUILD_CUDA=0 skips the CUDA extension.

A failed extension prints one clear message and the install still succeeds; the outcome of each
extension is written to neox/kernels/_build_status.json, which `neox.kernels.describe()` reads to say
at train start why a fused path is not in use.
"""
import glob
import json
import os
import shutil
import sys
import time

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
STATUS_REL = os.path.join("neox", "kernels", "_build_status.json")


def _log(msg: str) -> None:
    print(f"[neox build] {msg}", file=sys.stderr, flush=True)


def _cuda_arch_list(torch) -> str:
    """TORCH_CUDA_ARCH_LIST wins; else the visible GPU's capability; else Ampere + Hopper."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return f"{major}.{minor}"
    return "8.0;9.0"


def _fix_cuda_home(cpp_extension) -> None:
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script there (/usr/local/bin/nvcc) makes it
    guess /usr/local, which has no CUDA runtime, and the link fails with -lcudart. Prefer a real toolkit."""
    home = cpp_extension.CUDA_HOME
    if home and glob.glob(os.path.join(home, "lib*", "libcudart.so*")):
        return
    for cand in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")) and glob.glob(os.path.join(cand, "lib*", "libcudart.so*")):
            _log(f"CUDA_HOME={home!r} has no CUDA runtime; using {cand} (export CUDA_HOME to choose)")
            cpp_extension.CUDA_HOME = cand
            os.environ["CUDA_HOME"] = cand
            return


def _cuda_skip_reason(torch, cpp_extension) -> str:
    """Why the CUDA extension cannot be built here, or '' if it can."""
    if os.environ.get("NEOX_BUILD_CUDA", "1") == "0":
        return "NEOX_BUILD_CUDA=0"
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA"
    home = cpp_extension.CUDA_HOME
    if not home or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return f"nvcc not found (CUDA_HOME={home!r}; export CUDA_HOME=/usr/local/cuda)"
    return ""


# Run in a fresh process on a just-built extension: a C++ check (libc10's c10::Error) and a std::runtime_error thrown
# by the extension must both arrive as RuntimeError (csrc/common/bindings.inc: _raise_check).
_EXCEPTION_CHECK = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location(sys.argv[1], sys.argv[2])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
for how in (0, 1):
    try:
        ext._raise_check(how)
    except RuntimeError:
        continue
    sys.exit(3)
"""


def _exception_check(name: str, path: str) -> str:
    """'' if a C++ exception in the built extension `path` raises a Python RuntimeError, else what happened instead.
    A toolchain can build an extension whose exceptions end the process (seen on the H200 image): found here, at
    build time, not by a user's first bad call."""
    import signal
    import subprocess
    if not os.path.exists(path):  # not where this setuptools builds it: unchecked rather than misreported
        _log(f"{name}: not checked (no file at {path})")
        return ""
    try:
        proc = subprocess.run([sys.executable, "-c", _EXCEPTION_CHECK, name, path], capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        return "a C++ exception hangs the process"
    if proc.returncode == 0:
        return ""
    if proc.returncode < 0:
        return f"a C++ exception ends the process ({signal.Signals(-proc.returncode).name})"
    last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
    return f"the exception check failed (exit {proc.returncode}: {last[0][:200]})"


_LINK_AND_COMPILE = (("compiler_cxx", "c++"), ("linker_so", "cc"), ("compiler_so", "cc"), ("compiler", "cc"))


def _default_compilers(compiler) -> dict:
    """Forget $CC/$CXX (torch's cpp_extension reads them for each compile and nvcc's -ccbin; the link uses
    compiler_cxx), so that torch's defaults build: c++, and nvcc's own host compiler (gcc on the PATH). Returns
    what to hand to _restore_compilers; empty (nothing changed) where neither is set or a default is missing."""
    env = {k: os.environ[k] for k in ("CC", "CXX") if os.environ.get(k)}
    if not env or not all(shutil.which(c) for c in ("c++", "cc", "gcc", "g++")):
        return {}
    argv = {a: list(getattr(compiler, a)) for a, _ in _LINK_AND_COMPILE if getattr(compiler, a, None)}
    saved = {"env": env, "argv": argv}
    for k in env:
        del os.environ[k]
    for attr, default in _LINK_AND_COMPILE:
        if attr in argv and argv[attr][0] in env.values():
            compiler.set_executable(attr, [default] + argv[attr][1:])
    return saved


def _restore_compilers(compiler, saved: dict) -> None:
    os.environ.update(saved["env"])
    for attr, argv in saved["argv"].items():
        compiler.set_executable(attr, argv)


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not installed yet; skipping kernels (install torch, then reinstall neox)")
        return [], {}, {}

    status = {"torch": torch.__version__}
    exts = []
    cpu_sources = ["csrc/bindings_cpu.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp"))
    exts.append(cpp_extension.CppExtension(
        "neox._C_cpu", cpu_sources,
        extra_compile_args=["-O3", "-g0", "-fopenmp"], extra_link_args=["-fopenmp"]))

    _fix_cuda_home(cpp_extension)
    reason = _cuda_skip_reason(torch, cpp_extension)
    if reason:
        _log(f"CUDA kernels not built: {reason}")
        status["neox._C_cuda"] = {"built": False, "reason": reason}
    else:
        arch = _cuda_arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # read by cpp_extension when it forms -gencode flags
        status["cuda_arch_list"] = arch
        _log(f"building CUDA kernels for TORCH_CUDA_ARCH_LIST={arch}")
        exts.append(cpp_extension.CUDAExtension(
            "neox._C_cuda", ["csrc/bindings_cuda.cpp"] + sorted(glob.glob("csrc/*/*.cu")),
            extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "-lineinfo"]}))

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        """Build each extension on its own; a failure is reported once and does not fail the install."""

        def build_extension(self, ext):
            t0 = time.time()
            try:
                super().build_extension(ext)
                broken = _exception_check(ext.name, self.get_ext_fullpath(ext.name))
                saved = _default_compilers(self.compiler) if broken else {}
                if saved:
                    env = " ".join(f"{k}={v}" for k, v in saved["env"].items())
                    _log(f"{ext.name}: {broken} when built with {env}; rebuilding it with torch's default "
                         f"compilers (c++, nvcc's host compiler)")
                    self.force = True
                    try:
                        super().build_extension(ext)
                        broken = _exception_check(ext.name, self.get_ext_fullpath(ext.name))
                    except Exception as e:  # keep an extension whose exceptions crash over none
                        _log(f"{ext.name}: the rebuild failed ({type(e).__name__}); building it with {env} again")
                        _restore_compilers(self.compiler, saved)
                        super().build_extension(ext)
            except Exception as e:  # compiler errors arrive as several exception types
                first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
                _log(f"FAILED to build {ext.name}: {first}. neox will use the pure-PyTorch reference ops "
                     f"for it; the compiler output is above.")
                status[ext.name] = {"built": False, "reason": f"build failed: {first}"}
                return
            status[ext.name] = {"built": True, "seconds": round(time.time() - t0, 1)}
            if broken:  # still usable (neox validates inputs in Python first), but an internal bug would crash
                status[ext.name]["exceptions"] = broken
                _log(f"{ext.name}: {broken}; a failing C++ check in it will end the process instead of raising")
            _log(f"built {ext.name} in {time.time() - t0:.0f} s")

        def _built_only(self, method, *args):
            """Call a base method with the failed extensions hidden (they have no file to copy or list)."""
            every = self.extensions
            self.extensions = [e for e in every if status.get(e.name, {}).get("built", True)]
            try:
                return method(*args)
            finally:
                self.extensions = every

        def copy_extensions_to_source(self):
            return self._built_only(super().copy_extensions_to_source)

        def get_outputs(self):
            return self._built_only(super().get_outputs)

        def get_output_mapping(self):
            return self._built_only(super().get_output_mapping)

        def run(self):
            super().run()
            text = json.dumps(status, indent=1) + "\n"
            # build_lib serves wheels; the source tree serves in-place/editable builds (only those, so a
            # wheel build does not overwrite the status of the editable install beside it).
            dirs = {os.path.abspath(self.build_lib)}
            if self.inplace or getattr(self, "editable_mode", False):
                dirs.add(ROOT)
            for base_dir in dirs:
                path = os.path.join(base_dir, STATUS_REL)
                if os.path.isdir(os.path.dirname(path)):
                    with open(path, "w") as f:
                        f.write(text)

    return exts, {"build_ext": BuildExtension}, status


ext_modules, cmdclass, _ = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
