"""A C++ check of the kernel extensions raises a Python RuntimeError; it does not end the process.

On the H200 machine (session 19) a `TORCH_CHECK` thrown by neox._C_cuda killed the process (SIGSEGV) where the
CPU extension raised cleanly. Every case runs in its own unbuffered subprocess, so that a crash fails that case
only and says where it died: in the call (no Python exception arrived) or after it (the exception arrived, the
process died later). `_raise_check(how)` is the bindings' self-test (csrc/common/bindings.inc): 0 a failing
TORCH_CHECK (a c10::Error thrown by libc10), 1 a std::runtime_error thrown by the extension, 2 and 3 the same
caught inside the extension (nothing crosses the binding). The CUDA extension's cases that need no device run
wherever it is built, this CPU machine included."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
import torch

CALLS = """
import torch
from neox import _C_{ext} as ext
{setup}
for call in {calls!r}:
    print("calling", call, flush=True)
    try:
        print("returned:", eval(call), flush=True)
    except RuntimeError as e:
        print("raised:", str(e).splitlines()[0], flush=True)
"""
QKV = ("x = torch.zeros(1, 3, 2, 3, 8, device={device!r})\n"
       "g = [x[:, :, :, :1].clone(), x[:, :, :, 1].clone(), x[:, :, :, 2].clone()]")
SPLIT_V7 = "ext.split_qkv_backward(*g, torch.empty_like(x), None, None, 0, False, 7)"
SPLIT_V7_SAYS = "raised: split_qkv: version must be 0, or 4 or 5 on CUDA; got 7"
CUDA_INIT = "torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
CHECK = "neox: a failing check (test)"
THROWN = "neox: a thrown std::runtime_error (test)"
RAISE_CHECK = {"ext._raise_check(0)": f"raised: {CHECK}", "ext._raise_check(1)": f"raised: {THROWN}",
               "ext._raise_check(2)": f"returned: caught c10::Error: {CHECK}",
               "ext._raise_check(3)": f"returned: caught std::exception: {THROWN}"}


def _built(ext: str) -> bool:
    return importlib.util.find_spec(f"neox._C_{ext}") is not None


def _assert_says(ext: str, expected: dict[str, str], setup: str = "") -> None:
    """Run each call of `expected` on neox._C_<ext>, in order, in one fresh process: each must print its
    expected line (a RuntimeError's first line, or the value returned), and the process must exit 0."""
    code = CALLS.format(ext=ext, setup=setup, calls=list(expected))
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-u", "-c", code], capture_output=True, text=True,
                          timeout=120)
    said = [line for line in proc.stdout.splitlines() if line.startswith(("calling ", "raised: ", "returned: "))]
    died = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
    for call, want in expected.items():
        if f"calling {call}" not in said:
            pytest.fail(f"{died} before calling {call}\n{proc.stderr[-3000:]}")
        got = said[said.index(f"calling {call}") + 1:][:1]
        if not got or got[0].startswith("calling "):
            pytest.fail(f"{died} in the call {call}: no Python exception arrived\n{proc.stderr[-3000:]}")
        assert got[0] == want, f"{call}: {got[0]!r}"
    assert proc.returncode == 0, f"{died} after the calls, which all said what they should\n{proc.stderr[-3000:]}"


def test_a_cpu_extension_check_raises():
    _assert_says("cpu", {SPLIT_V7: SPLIT_V7_SAYS}, setup=QKV.format(device="cpu"))


@pytest.mark.parametrize("ext", ["cpu", "cuda"])
def test_each_exception_path_of_an_extension(ext):
    """No device is touched: the CUDA extension's exception paths are tested on the CPU machine too, with the
    shipped split_qkv check on CPU tensors (it fails before any CUDA call)."""
    if not _built(ext):
        pytest.skip(f"neox._C_{ext} is not built")
    _assert_says(ext, {**RAISE_CHECK, SPLIT_V7: SPLIT_V7_SAYS}, setup=QKV.format(device="cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_a_cuda_extension_check_raises():
    _assert_says("cuda", {SPLIT_V7: SPLIT_V7_SAYS}, setup=QKV.format(device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("ext", ["cpu", "cuda"])
@pytest.mark.parametrize("call", list(RAISE_CHECK)[:2])
def test_each_exception_path_with_cuda_initialised(ext, call):
    """The two paths that cross the binding, each in its own process so that one crash hides no other."""
    _assert_says(ext, {call: RAISE_CHECK[call]}, setup=CUDA_INIT)


@pytest.mark.slow
def test_a_build_whose_exceptions_end_the_process_is_redone_with_the_default_compilers(tmp_path):
    """setup.py checks each built extension's exception path in a fresh process. $CC/$CXX wrappers that link the C++
    runtime statically (as a toolchain image may: the extension then catches libc10's exceptions with its own copy
    of the runtime, and aborts) make it rebuild with torch's defaults, whose extension raises."""
    root = pathlib.Path(__file__).resolve().parents[2]
    for part in ("setup.py", "pyproject.toml", "csrc", "neox"):
        (shutil.copytree if (root / part).is_dir() else shutil.copy)(
            root / part, tmp_path / part, **({"ignore": shutil.ignore_patterns("*.so", "__pycache__")}
                                             if (root / part).is_dir() else {}))
    wrappers = tmp_path / "toolchain"
    wrappers.mkdir()
    for name, real in (("gcc", shutil.which("gcc")), ("g++", shutil.which("g++"))):
        (wrappers / name).write_text(f'#!/bin/sh\nexec {real} "$@" -static-libstdc++ -static-libgcc\n')
        (wrappers / name).chmod(0o755)
    env = {**os.environ, "CC": str(wrappers / "gcc"), "CXX": str(wrappers / "g++"), "NEOX_BUILD_CUDA": "0"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "neox._C_cpu: a C++ exception ends the process (SIGABRT) when built with CC=" in build.stderr, \
        build.stderr[-3000:]
    assert "rebuilding it with torch's default compilers" in build.stderr
    status = json.loads((tmp_path / "neox" / "kernels" / "_build_status.json").read_text())
    assert status["neox._C_cpu"]["built"] and "exceptions" not in status["neox._C_cpu"], status
    code = CALLS.format(ext="cpu", setup="", calls=list(RAISE_CHECK))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in env.items() if k not in ("PYTHONPATH",)})
    said = [line for line in proc.stdout.splitlines() if not line.startswith("calling ")]
    assert proc.returncode == 0 and said == list(RAISE_CHECK.values()), (proc.returncode, said, proc.stderr[-2000:])
