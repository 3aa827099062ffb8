"""The kernels' contract beyond the numbers: bad input, fallbacks that are said out loud, describe(),
the vocab-parallel cross-entropy over a real process group, and that the extensions were built."""
from __future__ import annotations

import importlib.util
import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist

from neox import kernels as K
from neox.errors import KernelError
from neox.kernels import _backend
from support.workers import run_workers


def test_bad_impl_raises():
    with pytest.raises(KernelError, match="impl must be one of"):
        K.swiglu(torch.randn(2, 4), impl="fast")


def test_float64_fused_raises_and_auto_falls_back_once():
    x, w = torch.randn(3, 5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    with pytest.raises(KernelError, match="float64"):
        K.rms_norm(x, w, 1e-5, impl="fused")
    assert "rms_norm" in _backend.AUTO_FUSED["cpu"]  # so that auto tries the kernel and must fall back
    _backend._warned.discard("rms_norm:torch.float64")
    with pytest.warns(UserWarning, match="float64"):
        y = K.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (5,), w, 1e-5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        K.rms_norm(x, w, 1e-5)


def test_mismatched_dtypes_raise():
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(KernelError, match="dtype mismatch"):
        K.rms_norm(x, w, 1e-5, residual=x.bfloat16(), impl="fused")


def test_non_contiguous_input_is_handled():
    x = torch.randn(16, 6).t()  # [6, 16], not contiguous
    w, b = torch.randn(16), torch.randn(16)
    torch.testing.assert_close(K.layer_norm(x, w, b, 1e-5, impl="fused"), K.layer_norm(x, w, b, 1e-5, impl="reference"))
    s = torch.randn(2, 9, 9).transpose(-1, -2)
    torch.testing.assert_close(K.masked_softmax(s, 0.5, impl="fused"), K.masked_softmax(s, 0.5, impl="reference"))


@pytest.mark.parametrize("call,match", [
    (lambda: K.swiglu(torch.randn(2, 5)), "even"),
    (lambda: K.masked_softmax(torch.randn(1, 4, 3), 1.0), "sq=4 > sk=3"),
    (lambda: K.rotary(torch.randn(1, 4, 2, 8), torch.ones(3, 2), torch.ones(3, 2), 4), "positions"),
    (lambda: K.rotary(torch.randn(1, 4, 2, 8), torch.ones(4, 3), torch.ones(4, 3), 4), "last dim"),
    (lambda: K.cross_entropy(torch.randn(3, 7), torch.zeros(4, dtype=torch.long)), "targets"),
])
def test_bad_shapes_raise(call, match):
    with pytest.raises(KernelError, match=match):
        call()


def test_empty_input_falls_back_with_one_warning():
    _backend._warned.clear()
    x = torch.randn(0, 6)
    with pytest.warns(UserWarning, match=r"shape \(0, 6\)"):
        K.swiglu(x, impl="fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert K.swiglu(x, impl="fused").shape == (0, 3)


def test_missing_extension(monkeypatch):
    monkeypatch.setitem(_backend._loaded, "cpu", (None, "neox._C_cpu not built: test reason"))
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(KernelError, match="test reason"):
        K.rms_norm(x, w, 1e-5, impl="fused")
    torch.testing.assert_close(K.rms_norm(x, w, 1e-5), K.rms_norm(x, w, 1e-5, impl="reference"))
    line = K.describe("auto", "cpu")
    assert "reference (all ops)" in line and "test reason" in line


def test_describe_is_one_line_and_names_every_op():
    for mode in K.IMPLS:
        line = K.describe(mode, "cpu")
        assert "\n" not in line and line.startswith(f"kernels[{mode}]")
    line = K.describe("fused", "cpu")
    assert all(op in line for op in K.OPS)
    assert K.status("reference", "cpu") == {op: "reference" for op in K.OPS}
    with pytest.raises(KernelError):
        K.describe("turbo")


def test_cross_entropy_grad_is_written_into_the_logits():
    logits = torch.randn(5, 11, dtype=torch.bfloat16, requires_grad=True)
    ref = logits.detach().float().requires_grad_()
    targets = torch.randint(0, 11, (5,))
    K.cross_entropy(logits, targets, impl="fused").backward()
    K.cross_entropy(ref, targets, impl="reference").backward()
    assert logits.grad.data_ptr() == logits.data_ptr()  # no extra copy of the logits' size
    torch.testing.assert_close(logits.grad.float(), ref.grad, atol=1e-2, rtol=1e-2)


def test_cross_entropy_second_backward_raises():
    logits = torch.randn(4, 9, requires_grad=True)
    loss = K.cross_entropy(logits * 1.0, torch.randint(0, 9, (4,)), impl="fused")
    loss.backward(retain_graph=True)
    with pytest.raises(KernelError, match="twice"):
        loss.backward()


def _vocab_parallel_worker(rank: int, world: int, seed: int) -> None:
    """Both dtypes and both impls in one spawn (a spawn of 2 processes costs seconds)."""
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(seed)
        N, V = 13, 1001
        full = (torch.randn(N, V) * 3).to(dtype).float()
        targets = torch.randint(0, V, (N,))
        targets[2] = -100
        bounds = [0, 389, V]  # uneven shards
        lo, hi = bounds[rank], bounds[rank + 1]
        ref = full.clone().requires_grad_()
        ref_loss = torch.nn.functional.cross_entropy(ref, targets)
        ref_loss.backward()
        for impl in ("reference", "fused"):
            shard = full[:, lo:hi].to(dtype).contiguous().requires_grad_()
            loss = K.cross_entropy(shard, targets, group=dist.group.WORLD, vocab_start=lo, impl=impl)
            loss.backward()
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item()), \
                (impl, dtype, loss.item(), ref_loss.item())
            err = (shard.grad.float() - ref.grad[:, lo:hi]).abs().max() / ref.grad.abs().max()
            assert err <= tol, (impl, dtype, rank, err.item(), seed)


def test_cross_entropy_vocab_parallel(seed):
    run_workers(_vocab_parallel_worker, 2, seed, timeout=120)


def test_cpu_extension_is_built():
    assert importlib.util.find_spec("neox._C_cpu") is not None, "neox._C_cpu missing: pip install --no-build-isolation -e ."
    ext, reason = _backend.extension("cpu")
    assert ext is not None, reason


def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc"))


@pytest.mark.skipif(not (torch.version.cuda and _nvcc_present()), reason="torch without CUDA or no nvcc: nothing to build")
def test_cuda_extension_is_built():
    """Where nvcc and a CUDA torch exist, the install must have compiled neox._C_cuda (CI proves it builds)."""
    status_file = os.path.join(os.path.dirname(_backend.__file__), "_build_status.json")
    status = json.load(open(status_file)) if os.path.exists(status_file) else {}
    entry = status.get("neox._C_cuda", {})
    if entry.get("reason") == "NEOX_BUILD_CUDA=0":
        pytest.skip("the CUDA build was switched off with NEOX_BUILD_CUDA=0")
    assert importlib.util.find_spec("neox._C_cuda") is not None, f"neox._C_cuda not built: {entry}"
    import neox._C_cuda as cuda_ext  # a CUDA torch loads it without a GPU or driver
    assert hasattr(cuda_ext, "norm_forward") and hasattr(cuda_ext, "cross_entropy_backward")
