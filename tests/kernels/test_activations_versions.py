"""The CUDA bias-GeLU and SwiGLU kernels per version against the PyTorch reference (GPU), and the version knob.

NEOX_ACT_VERSION (read by csrc/activations/activations.cu at each call) picks 1 (the kernels before v3: SwiGLU v1,
bias_gelu v2), 3, 4 (unset: 4) or 5 (4 with other loads-in-flight settings). Each version runs forward and backward on odd shapes: whole 16-byte packs and
not, a SwiGLU pair count that is not a multiple of a pack (v3's in-kernel tail), rows of 1 to 33,793 packs (v3's
column tiles of 1-32 packs, full and partial), enough rows for several block rows and several grid-stride turns,
and tensors one element off 16-byte alignment (the scalar fallbacks). The fused op runs in dtype, the reference
in fp32 on the same rounded values; error = max |fused - ref| / max |ref| per tensor (tests/support TOL).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import pytest
import torch

from neox import kernels as K
from neox.errors import KernelError
from neox.kernels import _backend
from neox.kernels import activations as A
from support.kernel_checks import TOL, rel_error

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
VERSIONS = ["1", "3", "4", "5"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _offset(t: torch.Tensor, misaligned: bool) -> torch.Tensor:
    """t's values in a contiguous tensor that starts one element past a 16-byte boundary when misaligned."""
    if not misaligned:
        return t.clone()
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _run(fn, inputs: dict[str, Optional[torch.Tensor]], grad_out: torch.Tensor, **kw):
    leaves = {k: v.detach().requires_grad_() if v is not None else None for k, v in inputs.items()}
    out = fn(**leaves, **kw)
    out.backward(grad_out)
    return out, {k: v.grad for k, v in leaves.items() if v is not None}


def _check_against_reference(fn, inputs: dict[str, Optional[torch.Tensor]], dtype: torch.dtype, grad_misaligned: bool,
                             seed: int, **kw):
    """fn in dtype on CUDA (inputs as given) against fn's reference in fp32 on the same rounded values."""
    probe = fn(**{k: v for k, v in inputs.items()}, impl="reference", **kw)
    g = torch.randn(probe.shape, device="cuda").to(dtype)
    f_out, f_grads = _run(fn, inputs, _offset(g, grad_misaligned), impl="fused", **kw)
    r_in = {k: (v.detach().float().clone() if v is not None else None) for k, v in inputs.items()}
    r_out, r_grads = _run(fn, r_in, g.float(), impl="reference", **kw)
    assert f_out.dtype == dtype and f_out.shape == r_out.shape
    assert torch.isfinite(f_out).all(), f"output not finite (unwritten?) (seed {seed})"
    err = rel_error(f_out.float(), r_out)
    assert err <= TOL[dtype], f"out: relative max error {err:.3g} > {TOL[dtype]} (seed {seed})"
    floor = 0.1 * g.float().abs().max().item()
    for k, rg in r_grads.items():
        fg = f_grads[k].float()
        assert torch.isfinite(fg).all(), f"grad {k} not finite (seed {seed})"
        e = ((fg - rg).abs().max() / max(rg.abs().max().item(), floor)).item()
        assert e <= TOL[dtype], f"grad {k}: relative max error {e:.3g} > {TOL[dtype]} (seed {seed})"


# (shape, misaligned x, misaligned dy). bf16/fp16 packs: 8 pairs out; fp32: 4.
SWIGLU_CASES = [
    ((1, 2), False, False),  # one pair: v3's tail alone
    ((3, 14), False, False),  # 21 pairs: whole packs + a tail
    ((1, 6), False, False),
    ((3, 5, 74), False, False),
    ((7, 4098), False, False),
    ((5, 2, 48), False, False),
    ((4, 3, 1024), False, False),
    ((2053, 4100), False, False),  # 4.2M pairs: two grid-stride turns of a one-wave grid, tail of 2
    ((64, 1024), True, False),  # x one element off: the scalar v1 path
    ((64, 1024), False, True),  # dy one element off: the backward's fallback
    ((33, 262), True, True),
]


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,mis_x,mis_dy", SWIGLU_CASES)
def test_swiglu_versions(monkeypatch, seed, version, dtype, shape, mis_x, mis_dy):
    monkeypatch.setenv("NEOX_ACT_VERSION", version)
    x = _offset((torch.randn(shape, device="cuda") * 2).to(dtype), mis_x)
    _check_against_reference(K.swiglu, {"x": x}, dtype, mis_dy, seed)


# (shape, misaligned x and dy). Rows of C / 8 packs (bf16): 1 (a tile of one thread column), 3 (a tile of 4, one
# idle), 128 (4 full tiles), 129 (a fifth tile of one), 1024, 33,793 (more tiles than a wave: one block row);
# 4099 is not a multiple of a pack (V = 1); 4100 rows spread over many block rows, unevenly.
GELU_CASES = [
    ((1, 8), False), ((3, 24), False), ((5, 4099), False), ((1001, 1024), False), ((3, 333, 1032), False),
    ((97, 8192), False), ((4100, 264), False), ((2, 270344), False), ((3, 5, 37), False), ((65, 1024), True),
]


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape,misaligned", GELU_CASES)
def test_bias_gelu_versions(monkeypatch, seed, version, dtype, approximate, shape, misaligned):
    monkeypatch.setenv("NEOX_ACT_VERSION", version)
    x = _offset((torch.randn(shape, device="cuda") * 2).to(dtype), misaligned)
    b = torch.randn(shape[-1], device="cuda").to(dtype)
    _check_against_reference(K.bias_gelu, {"x": x, "bias": b}, dtype, misaligned, seed, approximate=approximate)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("version", VERSIONS)
def test_bias_gelu_versions_without_bias(monkeypatch, seed, version):
    monkeypatch.setenv("NEOX_ACT_VERSION", version)
    x = (torch.randn(33, 264, device="cuda") * 2).to(torch.bfloat16)
    _check_against_reference(K.bias_gelu, {"x": x, "bias": None}, torch.bfloat16, False, seed)


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_fast_math_over_the_line(monkeypatch, approximate):
    """v3's approximate exp2/reciprocal erf and tanh forms, fp32, on [-12, 12] against float64: within the fp32
    tolerance of the output's and the gradient's largest magnitude, and 5e-5 relative pointwise where
    |gelu| > 1e-2 (the erf form's own error, Abramowitz & Stegun 7.1.26 as in v2, is 1.2e-5 there in float64;
    it grows to 2e-4 where |gelu| > 1e-3, out in the left tail)."""
    monkeypatch.setenv("NEOX_ACT_VERSION", "3")
    v = torch.linspace(-12, 12, 200_003, device="cuda", dtype=torch.float64)
    ref_x = v.clone().requires_grad_()
    ref = torch.nn.functional.gelu(ref_x, approximate=approximate)
    ref.backward(torch.ones_like(ref))
    x = v.float().requires_grad_()
    y = K.bias_gelu(x, None, impl="fused", approximate=approximate)
    y.backward(torch.ones_like(y))
    assert rel_error(y, ref) <= 1e-5 and rel_error(x.grad, ref_x.grad) <= 1e-5
    big = ref.abs() > 1e-2
    assert ((y.double() - ref).abs() / ref.abs())[big].max().item() <= 5e-5


@CUDA
@pytest.mark.gpu
def test_swiglu_fast_sigmoid_over_the_line(monkeypatch):
    """v3's sigmoid (ex2.approx + rcp.approx) in fp32 against float64 over gate in [-100, 100]: no NaN or inf
    at the ends, and the tolerance of fp32 elsewhere."""
    monkeypatch.setenv("NEOX_ACT_VERSION", "3")
    gate = torch.linspace(-100, 100, 100_000, device="cuda", dtype=torch.float64)
    x64 = torch.stack([gate, torch.full_like(gate, 1.5)], dim=-1).reshape(-1)
    ref_x = x64.clone().requires_grad_()
    ref = K.swiglu(ref_x, impl="reference")
    ref.backward(torch.ones_like(ref))
    x = x64.float().requires_grad_()
    y = K.swiglu(x, impl="fused")
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert rel_error(y, ref) <= 1e-5 and rel_error(x.grad, ref_x.grad) <= 1e-5


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("version", ["3", "4", "5"])
def test_bias_gelu_dbias_deterministic(monkeypatch, version):
    """The partial dbias rows are added in fixed orders: two runs give the same bits; and v4 (rows walked from
    the end) and v5 (other rows in flight) give v3's y and dx bit for bit (the same arithmetic per element)."""
    x = (torch.randn(4100, 1032, device="cuda") * 2).to(torch.bfloat16)
    b = torch.randn(1032, device="cuda").to(torch.bfloat16)
    g = torch.randn(4100, 1032, device="cuda").to(torch.bfloat16)

    def run(v):
        monkeypatch.setenv("NEOX_ACT_VERSION", v)
        xx, bb = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = K.bias_gelu(xx, bb, impl="fused")
        y.backward(g)
        return y, xx.grad, bb.grad

    first, second, v3 = run(version), run(version), run("3")
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    assert torch.equal(first[0], v3[0]) and torch.equal(first[1], v3[1])
    assert rel_error(first[2].float(), v3[2].float()) <= 1e-2


@CUDA
@pytest.mark.gpu
def test_swiglu_v4_v5_match_v3_bitwise(monkeypatch):
    """v4 only walks the backward from the end, v5 also changes the packs in flight: v3's bits, fwd and bwd."""
    x = (torch.randn(257, 2 * 1000, device="cuda") * 2).to(torch.bfloat16)
    g = torch.randn(257, 1000, device="cuda").to(torch.bfloat16)
    outs = []
    for v in ("3", "4", "5"):
        monkeypatch.setenv("NEOX_ACT_VERSION", v)
        xx = x.clone().requires_grad_()
        y = K.swiglu(xx, impl="fused")
        y.backward(g)
        outs.append((y, xx.grad))
    for y, dx in outs[1:]:
        assert torch.equal(outs[0][0], y) and torch.equal(outs[0][1], dx)


@pytest.mark.parametrize("value", ["", "0", "1", "2", "3", "4", "5"])
def test_act_version_known_values_pass(monkeypatch, value):
    monkeypatch.setenv("NEOX_ACT_VERSION", value)
    A.check_act_version()


@pytest.mark.parametrize("value", ["6", "v3", "-1", " 3"])
def test_act_version_unknown_value_refused(monkeypatch, value):
    """The C++ launchers would read an unknown value as the newest: the wrapper refuses it in one line."""
    monkeypatch.setenv("NEOX_ACT_VERSION", value)
    with pytest.raises(KernelError, match=r"NEOX_ACT_VERSION=.* is not a version of the activation kernels; set 1"):
        A.check_act_version()


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("op", ["swiglu", "bias_gelu"])
def test_act_version_unknown_value_refused_on_cuda(monkeypatch, op):
    monkeypatch.setenv("NEOX_ACT_VERSION", "9")
    x = torch.randn(4, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(KernelError, match="NEOX_ACT_VERSION='9'"):
        K.swiglu(x, impl="fused") if op == "swiglu" else K.bias_gelu(x, None, impl="fused")


def test_cpu_kernels_ignore_the_cuda_version(monkeypatch):
    """The knob is the CUDA kernels': the CPU path neither reads nor checks it."""
    monkeypatch.setenv("NEOX_ACT_VERSION", "9")
    x = torch.randn(3, 8)
    torch.testing.assert_close(K.swiglu(x, impl="fused"), K.swiglu(x, impl="reference"), rtol=1e-5, atol=1e-6)


@CUDA
@pytest.mark.gpu
def test_bench_activations_runs():
    """bench/activations.py end to end on a small shape: one row per version and Liger's where installed."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(repo, "bench", "activations.py"), "--tokens", "256", "--hidden",
                          "256", "--iters", "3"], capture_output=True, text=True, timeout=600, cwd=repo)
    assert out.returncode == 0, out.stderr[-2000:]
    for op in ("bias_gelu", "swiglu"):
        for v in ("v1", "v3", "v4", "v5"):
            assert f"| {op} | " in out.stdout and f"| {v} |" in out.stdout, out.stdout


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("version", VERSIONS)
def test_bias_gelu_16bit_bias_launches_no_casts(monkeypatch, version):
    """A bias in x's dtype goes to the kernels as it is and dbias comes back in it: forward + backward launch only
    the bias_gelu kernels and the dbias column sum (before: a cast of the bias to fp32 and one of dbias back)."""
    monkeypatch.setenv("NEOX_ACT_VERSION", version)
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", False)  # the conftest's NaN fills would be kernels too
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    K.bias_gelu(x, b, impl="fused").backward(g)  # warm
    x.grad = b.grad = None  # no accumulation kernels below
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        K.bias_gelu(x, b, impl="fused").backward(g)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any("bias_gelu" in n for n in names), names
    casts = [n for n in names if "copy" in n.lower() or "elementwise" in n.lower()]  # torch's .to() kernels
    assert not casts, casts
    assert b.grad.dtype == torch.bfloat16
