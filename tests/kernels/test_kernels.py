"""Each fused kernel against its PyTorch reference, forward and backward, on CPU (CI) and CUDA (-m gpu).

The fused op runs on inputs in `dtype`; the reference runs in fp32 on the very same (rounded) values, so
the difference measures the kernel, not the input rounding. Error is max|fused - ref| / max|ref| per
tensor: fp32 within 1e-5, bf16 within 1e-2, fp16 within 2e-3. Shapes are odd on purpose.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from neox import kernels as K

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, seed: int,
           floor: float = 1e-6) -> None:
    """Max error relative to the reference's largest magnitude, or to `floor` when that is smaller."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)} (seed {seed})"
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten/poisoned output?) (seed {seed})"
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(floor)).item() if ref.numel() else 0.0
    assert err <= TOL[dtype], f"{name}: relative max error {err:.3g} > {TOL[dtype]} for {dtype} (seed {seed})"


def _compare(fused: Callable, ref: Callable, tensors: dict[str, torch.Tensor], grads: set[str],
             dtype: torch.dtype, device: str, seed: int, **consts) -> None:
    """Run fused(dtype) and ref(fp32 copy of the same values); compare outputs and input grads."""
    f_in = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in tensors.items()}
    f_in = {k: v.requires_grad_(k in grads) for k, v in f_in.items()}
    r_in = {k: (v.detach().double().float().clone() if v.is_floating_point() else v.clone()).requires_grad_(k in grads)
            for k, v in f_in.items()}
    r_out = ref(**r_in, **consts)
    f_out = fused(**f_in, **consts)
    r_out = r_out if isinstance(r_out, tuple) else (r_out,)
    f_out = f_out if isinstance(f_out, tuple) else (f_out,)
    for i, (fo, ro) in enumerate(zip(f_out, r_out)):
        assert fo.dtype == (ro.dtype if not ro.dtype.is_floating_point or ro.dim() == 0 else dtype)
        _check(f"out{i}", fo.float(), ro, dtype, seed)
    # The same upstream gradients for both, rounded to dtype first.
    g = [torch.randn(o.shape, device=device).to(o.dtype) for o in f_out]
    torch.autograd.backward(r_out, [x.detach().float().to(ro.dtype) for x, ro in zip(g, r_out)])
    torch.autograd.backward(f_out, g)
    # A gradient that is zero in exact arithmetic (softmax over one key: y = 1, dx = y * (g - g * y)) comes
    # out as the upstream gradient times the rounding of y (~1e-7 * |g| in fp32), and the reference's may be
    # exactly 0; so grads are measured against at least a tenth of the upstream gradient's size.
    floor = max([1e-6] + [0.1 * x.float().abs().max().item() for x in g if x.numel()])
    for k in sorted(grads):
        _check(f"grad {k}", f_in[k].grad.float(), r_in[k].grad, dtype, seed, floor)


def _ref_rounded_residual(fn: Callable, dtype: torch.dtype) -> Callable:
    """The reference for norm(x + residual) with the sum rounded to dtype, as the kernel stores it.

    Without this, rows with a small spread (C = 7) amplify bf16's rounding of x + residual by
    1/std and the comparison measures the input rounding rather than the kernel."""
    def ref(x, residual, **kw):
        h = (x + residual).to(dtype).float()
        return fn(h, **kw, impl="reference"), h
    return ref


def _fused(fn: Callable) -> Callable:
    return lambda **kw: fn(**kw, impl="fused")


def _ref(fn: Callable) -> Callable:
    return lambda **kw: fn(**kw, impl="reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 3), (5, 7), (3, 7, 37), (61, 1003)])
def test_layer_norm(device, seed, dtype, residual, shape):
    C = shape[-1]
    t = {"x": torch.randn(shape) * 2 + 0.5, "weight": 1 + 0.3 * torch.randn(C), "bias": 0.3 * torch.randn(C)}
    ref = _ref(K.layer_norm)
    if residual:
        t["residual"] = torch.randn(shape)
        ref = _ref_rounded_residual(K.layer_norm, dtype)
    _compare(_fused(K.layer_norm), ref, t, set(t), dtype, device, seed, eps=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 3), (3, 7, 37), (61, 1003)])
def test_rms_norm(device, seed, dtype, residual, shape):
    C = shape[-1]
    t = {"x": torch.randn(shape) * 2, "weight": 1 + 0.3 * torch.randn(C)}
    ref = _ref(K.rms_norm)
    if residual:
        t["residual"] = torch.randn(shape)
        ref = _ref_rounded_residual(K.rms_norm, dtype)
    _compare(_fused(K.rms_norm), ref, t, set(t), dtype, device, seed, eps=1e-6)


def _angles(s: int, rotary_dims: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims))
    f = torch.outer(torch.arange(s).float(), inv)  # [s, r/2]
    if layout == "dup":
        f = torch.cat((f, f), dim=-1)
    return f.cos(), f.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
# The first four: odd head sizes (CUDA v1). Then whole 16-byte packs (CUDA v2): full, partial (a quarter,
# as Pythia) and 64-wide heads; the last has a rotary part that is not whole packs for 16-bit types (v1).
@pytest.mark.parametrize("b,s,h,hd,rd,layout", [(2, 1, 3, 10, 10, "half"), (3, 77, 5, 18, 8, "half"),
                                                (1, 8192, 2, 24, 6, "half"), (2, 33, 3, 16, 4, "dup"),
                                                (2, 33, 3, 128, 128, "half"), (3, 17, 5, 128, 32, "half"),
                                                (1, 9, 2, 64, 64, "dup"), (2, 5, 3, 128, 120, "half")])
def test_rotary(device, seed, dtype, interleaved, b, s, h, hd, rd, layout):
    if layout == "dup" and interleaved:  # the duplicated interleaved form is repeat_interleave(f, 2)
        c, sn = _angles(s, rd, "half")
        c, sn = c.repeat_interleave(2, -1), sn.repeat_interleave(2, -1)
    else:
        c, sn = _angles(s, rd, layout)
    _compare(_fused(K.rotary), _ref(K.rotary), {"x": torch.randn(b, s, h, hd)}, {"x"}, dtype, device, seed,
             cos=c.to(device), sin=sn.to(device), rotary_dims=rd, interleaved=interleaved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 37, 37), (1, 1, 3, 8192), (2, 1, 257, 300)])
def test_masked_softmax(device, seed, dtype, shape):
    _compare(_fused(K.masked_softmax), _ref(K.masked_softmax), {"scores": torch.randn(shape) * 3}, {"scores"},
             dtype, device, seed, scale=0.37)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1, 5), (3, 5, 37), (7, 4099)])
def test_bias_gelu(device, seed, dtype, approximate, shape):
    t = {"x": torch.randn(shape) * 2, "bias": torch.randn(shape[-1])}
    _compare(_fused(K.bias_gelu), _ref(K.bias_gelu), t, set(t), dtype, device, seed, approximate=approximate)


@pytest.mark.parametrize("dtype", DTYPES)
# (5, 2, 48) and (4, 3, 1024): whole 16-byte packs, the CUDA kernel's vector path; the others its scalar path
@pytest.mark.parametrize("shape", [(1, 6), (3, 5, 74), (7, 4098), (5, 2, 48), (4, 3, 1024)])
def test_swiglu(device, seed, dtype, shape):
    _compare(_fused(K.swiglu), _ref(K.swiglu), {"x": torch.randn(shape) * 2}, {"x"}, dtype, device, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab_start", [((4, 5), 0), ((2, 9, 1001), 0), ((37, 50304), 0), ((13, 777), 500)])
def test_cross_entropy(device, seed, dtype, shape, vocab_start):
    # Several rows even in the smallest case: a single confidently-right row gives a loss near zero,
    # whose relative error is rounding noise (seen once in ~30 CUDA runs with one row).
    V = shape[-1]
    targets = torch.randint(0, V + vocab_start, shape[:-1])
    if targets.numel() > 1:
        targets.view(-1)[0] = -100  # an ignored position
    t = {"logits": torch.randn(shape) * 3, "targets": targets}
    _compare(_fused(K.cross_entropy), _ref(K.cross_entropy), t, {"logits"}, dtype, device, seed,
             vocab_start=vocab_start)


# ---- The CUDA kernels' size classes, at each boundary (GPU only: the CPU kernels have no size classes) ----
# Each class is chosen from the row length in 16-byte packs (8 bf16/fp16 or 4 fp32 elements; 1 when the row
# is not a multiple of that). Lengths below sit on both sides of every switch in csrc/*/*.cu.
CUDA_ONLY = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="no CUDA device visible")])]


def _elems(packs: int, dtype: torch.dtype) -> int:
    return packs * (4 if dtype == torch.float32 else 8)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("residual", [False, True])
# norm v3 up to 128 packs (and for unpacked rows), v4 (rows staged through shared memory) for 129-512 with
# 1 pack per thread up to 256 and 2 above, v3 again up to 1024 packs, v1 above. Rows: not a multiple of
# the 4 rows a v3 forward block takes, and enough that every persistent block walks a band of several rows.
@pytest.mark.parametrize("packs", [1, 128, 129, 256, 257, 512, 513, 1024, 1025])
def test_norm_size_classes(device, seed, dtype, op, residual, packs):
    C = _elems(packs, dtype)
    N = 4099 if C <= 2048 else 1031
    fn = getattr(K, op)
    t = {"x": torch.randn(N, C) * 2 + (0.5 if op == "layer_norm" else 0.0), "weight": 1 + 0.3 * torch.randn(C)}
    if op == "layer_norm":
        t["bias"] = 0.3 * torch.randn(C)
    ref = _ref(fn)
    if residual:
        t["residual"] = torch.randn(N, C)
        ref = _ref_rounded_residual(fn, dtype)
    _compare(_fused(fn), ref, t, set(t), dtype, device, seed, eps=1e-5)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1023, 1025, 1031, 6143])  # unaligned rows: v3 with 1-element packs, then v1
# (6143: v1 with 48 KB of dynamic shared memory, over the limit with its static part unless opted in)
def test_norm_unaligned_rows(device, seed, dtype, C):
    t = {"x": torch.randn(77, C), "weight": 1 + 0.3 * torch.randn(C), "bias": 0.3 * torch.randn(C)}
    _compare(_fused(K.layer_norm), _ref(K.layer_norm), t, set(t), dtype, device, seed, eps=1e-5)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", DTYPES)
# softmax v2: a warp with 1, 2, 4 packs per thread up to 32, 64, 128 packs; then teams of 64 ... 512 threads
# with 4 packs each up to 256, 512, 1024, 2048 packs; v1 above (and for rows that are not whole packs).
@pytest.mark.parametrize("packs", [1, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513, 1024, 1025, 2048, 2049])
def test_masked_softmax_size_classes(device, seed, dtype, packs):
    sk = _elems(packs, dtype)
    # Every prefix length of a causal row up to ~1000 keys; longer rows: the last queries of a cached-key
    # block (sq < sk), whose rows are nearly full and end inside a pack.
    sq = sk if sk <= 1100 else 37
    _compare(_fused(K.masked_softmax), _ref(K.masked_softmax), {"scores": torch.randn(1, 3, sq, sk) * 3},
             {"scores"}, dtype, device, seed, scale=0.37)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk", [(1, 8), (5, 8), (9, 1032), (1031, 1031), (2, 2056), (130, 4104)])
def test_masked_softmax_rows(device, seed, dtype, sq, sk):
    """Row counts that do not fill the last block, single-row queries, and rows seeing a few keys only."""
    _compare(_fused(K.masked_softmax), _ref(K.masked_softmax), {"scores": torch.randn(3, sq, sk) * 3}, {"scores"},
             dtype, device, seed, scale=0.37)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
# bias_gelu v2: column tiles of up to 256 packs x bands of rows (bands of uneven length), one partial dbias
# row per band; the last tile partly filled.
@pytest.mark.parametrize("shape", [(1, 8), (1001, 1024), (3, 333, 1032), (97, 8192), (5, 4099)])
def test_bias_gelu_size_classes(device, seed, dtype, approximate, shape):
    t = {"x": torch.randn(shape) * 2, "bias": torch.randn(shape[-1])}
    _compare(_fused(K.bias_gelu), _ref(K.bias_gelu), t, set(t), dtype, device, seed, approximate=approximate)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_bias_gelu_without_bias(device, seed):
    _compare(_fused(K.bias_gelu), _ref(K.bias_gelu), {"x": torch.randn(33, 264)}, {"x"}, torch.bfloat16, device, seed,
             bias=None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", ["fp32", "weight 16-bit, bias fp32"])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_parameters_in_another_dtype(device, seed, dtype, params, residual):
    """16-bit activations with fp32 (or mixed) weight and bias: the kernels take fp32 parameters, and each
    parameter's grad comes back in its own dtype. (With parameters in the activations' dtype, as in the
    tests above, CUDA reads them as they are.)"""
    C = 1003
    x = (torch.randn(61, C) * 2 + 0.5).to(device, dtype).requires_grad_()
    res = torch.randn(61, C).to(device, dtype).requires_grad_() if residual else None
    w = (1 + 0.3 * torch.randn(C)).to(device, torch.float32 if params == "fp32" else dtype).requires_grad_()
    b = (0.3 * torch.randn(C)).to(device, torch.float32).requires_grad_()
    out = K.layer_norm(x, w, b, 1e-5, residual=res, impl="fused")
    out = out if isinstance(out, tuple) else (out,)
    g = [torch.randn_like(o) for o in out]
    torch.autograd.backward(out, g)
    leaves = [x, w, b] + ([res] if residual else [])
    r_leaves = [t.detach().float().requires_grad_() for t in leaves]
    rx, rw, rb = r_leaves[:3]
    rres = r_leaves[3] if residual else None
    if residual:
        h = (rx + rres).to(dtype).float()
        r_out = (K.layer_norm(h, rw, rb, 1e-5, impl="reference"), h)
    else:
        r_out = (K.layer_norm(rx, rw, rb, 1e-5, impl="reference"),)
    torch.autograd.backward(r_out, [t.float() for t in g])
    _check("out", out[0].float(), r_out[0], dtype, seed)
    for name, t, r in zip(["x", "weight", "bias", "residual"], leaves, r_leaves):
        assert t.grad.dtype == t.dtype, f"grad {name} is {t.grad.dtype}, the parameter {t.dtype}"
        _check(f"grad {name}", t.grad.float(), r.grad, dtype, seed)
