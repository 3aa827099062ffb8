"""`kernels.dual_norm` (the parallel residual's two norms of one input, one C++ autograd node) against its
reference, two separate norms in fp32 on the same rounded values: outputs, and the grads of x, w1, b1, w2,
b2 when any of the three outputs' grads is missing. CPU (CI) and CUDA (-m gpu); outputs poisoned (conftest).

The fused backward sums x's three grads: on CUDA, with both norms' grads, in one kernel (norm.cu's DUAL
backward, dx = d_xout + rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy1 * w1 + dy2 * w2, dx rounded
once); elsewhere inside two norm backwards (dx = nb(dy2, dh = nb(dy1, dh = d_xout))). A lost residual grad, a
skipped norm or a norm's grad added twice all show in grad x.

Tolerances (TOL, support/kernel_checks.py): max |fused - reference| / max |reference| with the reference in fp32
on the same rounded inputs. Both fused paths compute in fp32 and round each output to its dtype: one rounding
is at most 2^-8 relative in bf16, 2^-11 in fp16 (the two-call path rounds dx twice, so up to twice that), and
fp32 sums over a row or a column differ from PyTorch's by ~1e-6 relative; TOL (1e-2, 2e-3, 1e-5) is above
both. test_dual_backward_rounds_dx_once checks the CUDA kernel's single rounding element by element."""
from __future__ import annotations

import pytest
import torch

from neox import kernels as K
from neox.kernels import _backend
from neox.errors import KernelError
from support.kernel_checks import TOL, graph_names

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA_ONLY = [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="no CUDA device visible")])]
USES = {"all": (0, 1, 2), "no residual grad": (1, 2), "no attn norm": (0, 2), "no mlp norm": (0, 1),
        "residual only": (0,)}


def _inputs(shape: tuple, rms: bool, bias: bool, device: str, dtype: torch.dtype, param_dtype=None) -> dict:
    C = shape[-1]
    pd = param_dtype or dtype
    t = {"x": (torch.randn(shape) * 2 + (0.0 if rms else 0.5)).to(device, dtype),
         "w1": (1 + 0.3 * torch.randn(C)).to(device, pd), "w2": (1 + 0.3 * torch.randn(C)).to(device, pd),
         "b1": (0.3 * torch.randn(C)).to(device, pd) if bias else None,
         "b2": (0.3 * torch.randn(C)).to(device, pd) if bias else None}
    return {k: None if v is None else v.requires_grad_() for k, v in t.items()}


def _check(name: str, got, ref, dtype: torch.dtype, seed: int, floor: float = 1e-6) -> None:
    if ref is None:
        assert got is None, f"{name}: a grad where the reference has none (seed {seed})"
        return
    assert got is not None and got.shape == ref.shape, f"{name}: missing or misshapen (seed {seed})"
    assert torch.isfinite(got.float()).all(), f"{name}: non-finite values (unwritten/poisoned?) (seed {seed})"
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(floor)).item()  # relative to the larger of the two
    assert err <= TOL[dtype], f"{name}: relative max error {err:.3g} > {TOL[dtype]} for {dtype} (seed {seed})"


def _run(t: dict, uses: tuple, dtype: torch.dtype, seed: int, rms: bool, eps: float = 1e-5) -> None:
    """dual_norm fused on t (in dtype) and the reference in fp32 on the same values; the outputs in `uses`
    get random upstream grads (rounded to dtype), the others none."""
    r = {k: None if v is None else v.detach().float().requires_grad_() for k, v in t.items()}
    f_out = K.dual_norm(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], eps, rms=rms, impl="fused")
    r_out = K.dual_norm(r["x"], r["w1"], r["b1"], r["w2"], r["b2"], eps, rms=rms, impl="reference")
    assert f_out[0].data_ptr() == t["x"].data_ptr(), "the returned x is not x's storage"
    for i in (1, 2):
        assert f_out[i].dtype == dtype
        _check(f"y{i}", f_out[i], r_out[i], dtype, seed)
    g = [torch.randn(f_out[i].shape, device=t["x"].device).to(dtype) for i in uses]
    torch.autograd.backward([f_out[i] for i in uses], g)
    torch.autograd.backward([r_out[i] for i in uses], [x.float() for x in g])
    floor = 0.1 * max(x.float().abs().max().item() for x in g)
    for k in t:
        if t[k] is not None:
            assert t[k].grad is None or t[k].grad.dtype == t[k].dtype, f"grad {k} is not in its tensor's dtype"
            _check(f"grad {k} ({sorted(uses)} used)", t[k].grad, r[k].grad, dtype, seed, floor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer_norm", "layer_norm without bias", "rms_norm"])
@pytest.mark.parametrize("shape", [(1, 3), (5, 7), (3, 7, 37), (61, 1003)])
def test_dual_norm(device, seed, dtype, norm, shape):
    rms = norm == "rms_norm"
    _run(_inputs(shape, rms, norm == "layer_norm", device, dtype), USES["all"], dtype, seed, rms)


@pytest.mark.parametrize("uses", list(USES))
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dual_norm_with_missing_grads(device, seed, dtype, norm, uses):
    """An output outside the loss sends no grad: its norm's parameters get none, x gets the others'."""
    rms = norm == "rms_norm"
    _run(_inputs((13, 129), rms, not rms, device, dtype), USES[uses], dtype, seed, rms)


def test_dual_norm_without_any_grad(device):
    t = _inputs((4, 16), False, True, device, torch.float32)
    x_out, y1, y2 = K.dual_norm(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], impl="fused")
    (y1.detach().sum() + t["x"].sum()).backward()  # the node's outputs take no part
    assert torch.equal(t["x"].grad, torch.ones_like(t["x"])) and t["w1"].grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", ["fp32", "weight 16-bit, bias fp32", "norm 1 16-bit, norm 2 fp32"])
def test_dual_norm_parameters_in_another_dtype(device, seed, dtype, params):
    """16-bit activations with fp32 (or mixed) weight and bias, as NormFunction takes them: each parameter's
    grad comes back in its own dtype. (On CUDA a 16-bit norm 1 and an fp32 norm 2 reach the kernels as they
    are, one 16-bit and one fp32: the node's two-forward path.)"""
    t = _inputs((61, 1003), False, True, device, dtype, param_dtype=torch.float32)
    for k in {"fp32": (), "weight 16-bit, bias fp32": ("w1", "w2"), "norm 1 16-bit, norm 2 fp32": ("w1", "b1")}[params]:
        t[k] = t[k].detach().to(dtype).requires_grad_()
    _run(t, USES["all"], dtype, seed, rms=False)


def test_dual_norm_is_one_node_returning_x(device):
    t = _inputs((3, 8), False, True, device, torch.float32)
    x_out, y1, y2 = K.dual_norm(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], impl="fused")
    assert x_out.grad_fn is y1.grad_fn is y2.grad_fn and x_out._base is t["x"]
    assert torch.equal(x_out, t["x"])
    assert graph_names(x_out + y1 + y2).count("CppFunction") == 1
    # the reference: the input itself and two native norm nodes
    x_ref, y1, y2 = K.dual_norm(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], impl="reference")
    assert x_ref is t["x"] and y1.grad_fn is not y2.grad_fn


def test_dual_norm_bad_input(device):
    t = _inputs((3, 8), True, True, device, torch.float32)
    with pytest.raises(KernelError, match="RMSNorm takes no bias"):
        K.dual_norm(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], rms=True, impl="fused")
    with pytest.raises(KernelError, match="dtype mismatch|different devices|float32"):
        K.dual_norm(t["x"].double(), t["w1"], None, t["w2"], None, rms=True, impl="fused")
    _backend._warned.discard("rms_norm:(0, 8)")
    with pytest.warns(UserWarning, match="not supported by the fused kernel"):
        out = K.dual_norm(t["x"][:0], t["w1"], None, t["w2"], None, rms=True, impl="fused")
    assert [tuple(o.shape) for o in out] == [(0, 8)] * 3


def test_dual_norm_non_contiguous_input(device, seed):
    x = torch.randn(9, 40, device=device)[:, 3:36].requires_grad_()
    w1, w2 = torch.randn(33, device=device), torch.randn(33, device=device)
    f = K.dual_norm(x, w1, None, w2, None, rms=True, impl="fused")
    r = K.dual_norm(x, w1, None, w2, None, rms=True, impl="reference")
    for a, b in zip(f, r):
        torch.testing.assert_close(a, b)


# ---- GPU: the norm backward's size classes with a residual grad (dh), each class once ----
@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
# bf16 (packs of 8): 2048 and 4096 take the v3 dual forward and the v4 dual backward, 8192 the v3 forward and two
# v3 backwards, 8200 (1025 packs) v1 both ways; fp32 (packs of 4): 2048 v3 / v4 dual, 4096 v3 / v3 dual, 8192 and
# 8200 v1
@pytest.mark.parametrize("C", [2048, 4096, 8192, 8200])
def test_dual_norm_size_classes(device, seed, dtype, norm, C):
    rms = norm == "rms_norm"
    _run(_inputs((1031, C), rms, not rms, device, dtype), USES["all"], dtype, seed, rms)


# ---- GPU: dual_norm's backward kernel (norm.cu, DUAL v4 / v3), against the fp32 reference ----
# Hidden sizes and what they take in bf16/fp16 (16-byte packs of 8; fp32 packs of 4, V = 1 where C is not a
# multiple of the pack): 300 and 1003 (V = 1: v3 DUAL with P = 2 and 4), 1000 and 1024 (v3 DUAL, <= 128 packs;
# fp32 1024: v4), 2048 (v4 DUAL, 256-thread blocks; fp32 512 packs: v4, 512 threads), 2056 (257 packs: v4 DUAL,
# 512-thread blocks), 4096 (v4 DUAL, 512 threads; fp32 1024 packs: v3 DUAL P = 4), 8192 (16-bit: 1024 packs, the
# two-call path: the dual kernel would spill there; fp32 v1 two calls), 8200 (v1: two calls).
DUAL_SIZES = [300, 1000, 1003, 1024, 2048, 2056, 4096, 8192, 8200]


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer_norm", "layer_norm without bias", "rms_norm"])
@pytest.mark.parametrize("C", DUAL_SIZES)
def test_dual_backward_sizes(device, seed, dtype, norm, C):
    """1031 rows: not a multiple of a v3 block's 2 rows, uneven bands over the persistent grid."""
    rms = norm == "rms_norm"
    _run(_inputs((1031, C), rms, norm == "layer_norm", device, dtype), USES["all"], dtype, seed, rms)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("rows", [1, 2, 3, 133])
@pytest.mark.parametrize("C", [1000, 2048, 4096])
def test_dual_backward_few_rows(device, seed, rows, C):
    """Fewer rows than the grid's blocks (each block gets at least one) and odd bands."""
    _run(_inputs((rows, C), False, True, device, torch.bfloat16), USES["all"], torch.bfloat16, seed, False)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("uses", list(USES))
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("C", [1003, 2048])
def test_dual_backward_with_missing_grads(device, seed, norm, uses, C):
    """Both norms' grads without the residual's: the dual kernel without dh; one norm's: the single backward."""
    rms = norm == "rms_norm"
    _run(_inputs((257, C), rms, not rms, device, torch.bfloat16), USES[uses], torch.bfloat16, seed, rms)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("params", ["fp32", "weight 16-bit, bias fp32", "norm 1 16-bit, norm 2 fp32",
                                    "bias on norm 1 only"])
def test_dual_backward_parameter_dtypes(device, seed, params):
    """fp32 weights (the dual kernel with fp32 parameters), a 16-bit weight with an fp32 bias (cast to fp32 for
    the kernel, grads cast back), the two norms' parameters in different dtypes (two calls), one bias only."""
    dtype = torch.bfloat16
    one_bias = params == "bias on norm 1 only"
    t = _inputs((301, 2048), False, True, device, dtype, param_dtype=dtype if one_bias else torch.float32)
    if one_bias:
        t["b2"] = None
    for k in {"weight 16-bit, bias fp32": ("w1", "w2"), "norm 1 16-bit, norm 2 fp32": ("w1", "b1")}.get(params, ()):
        t[k] = t[k].detach().to(dtype).requires_grad_()
    _run(t, USES["all"], dtype, seed, rms=False)


def _dx_and_reference(t: dict, rms: bool, eps: float = 1e-5) -> tuple:
    """grad x of dual_norm fused and of the fp32 reference, for random grads of all three outputs."""
    r = {k: None if v is None else v.detach().float().requires_grad_() for k, v in t.items()}
    f_out = K.dual_norm(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], eps, rms=rms, impl="fused")
    r_out = K.dual_norm(r["x"], r["w1"], r["b1"], r["w2"], r["b2"], eps, rms=rms, impl="reference")
    g = [torch.randn(f_out[i].shape, device=t["x"].device).to(t["x"].dtype) for i in range(3)]
    torch.autograd.backward(list(f_out), g)
    torch.autograd.backward(list(r_out), [x.float() for x in g])
    return t["x"].grad.double().cpu(), r["x"].grad.double().cpu()


def _excess_over_one_rounding(got: torch.Tensor, ref: torch.Tensor) -> int:
    """Elements of bf16 grad x further from the fp32 reference than one rounding (half an ulp, <= 2^-8 of the
    value) plus 2e-4 of the largest for the fp32 arithmetic's own differences (~1e-6 relative)."""
    bound = ref.abs() * 2.0**-8 + 2e-4 * ref.abs().max()
    return int(((got - ref).abs() > bound).sum())


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("C", [1003, 1024, 2048, 4096])
def test_dual_backward_rounds_dx_once(device, seed, norm, C):
    """The dual kernel forms g = dy1 * w1 + dy2 * w2 in fp32 and rounds dx once, so every element of grad x is
    within one bf16 rounding of the fp32 reference. The two-call path rounds dx1 to bf16 before adding the second
    norm's part and fails this (test_two_calls_round_dx_twice shows it on the CPU): a silent fallback fails here."""
    rms = norm == "rms_norm"
    got, ref = _dx_and_reference(_inputs((1031, C), rms, not rms, device, torch.bfloat16), rms)
    assert _excess_over_one_rounding(got, ref) == 0, f"grad x rounded more than once (seed {seed})"


def test_two_calls_round_dx_twice(seed):
    """The CPU runs dual_norm's backward as two norm backwards (dx1 rounded to bf16, then dx): some elements of
    grad x are then further from the reference than one rounding, which is what the GPU test above detects."""
    got, ref = _dx_and_reference(_inputs((1031, 1024), False, True, "cpu", torch.bfloat16), False)
    assert _excess_over_one_rounding(got, ref) > 0, f"no element shows the second rounding (seed {seed})"


def _norm_backward_kernels(C: int, dtype: torch.dtype) -> list:
    """Names of the norm backward kernels one dual_norm backward launches at [8192, C] (torch.profiler)."""
    t = _inputs((8192, C), False, True, "cuda", dtype)
    outs = K.dual_norm(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], impl="fused")
    grads = [torch.randn_like(o) for o in outs]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.autograd.backward(list(outs), grads)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "norm_backward_kernel" in e.name]


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("C, dtype, launches", [(2048, torch.bfloat16, 1), (4096, torch.bfloat16, 1),
                                               (1024, torch.bfloat16, 1), (2048, torch.float32, 1),
                                               (8192, torch.bfloat16, 2)])
def test_dual_backward_kernel_is_launched(device, C, dtype, launches):
    """Pythia-1.4B's [8192, 2048] bf16 (and the other dual sizes) run one norm backward kernel, the dual one;
    hidden 8192 in bf16 is left to the two-call path (two kernels), which shows the count can tell them apart."""
    names = _norm_backward_kernels(C, dtype)
    assert len(names) == launches, names
    if launches == 1 and C != 1024:
        assert "norm_backward_kernel_v4" in names[0], names
