"""`kernels.dual_norm` (the parallel residual's two norms of one input, one C++ autograd node) against its
reference, two separate norms in fp32 on the same rounded values: outputs, and the grads of x, w1, b1, w2,
b2 when any of the three outputs' grads is missing. CPU (CI) and CUDA (-m gpu); outputs poisoned (conftest).

The fused backward sums x's three grads inside the norm backwards (dx = nb(dy2, dh = nb(dy1, dh = d_xout))):
a lost residual grad, a skipped norm or a norm's grad added twice all show in grad x."""
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
# bf16 (packs of 8): 2048 and 4096 take the v3 dual forward and the v4 backward, 8192 v3 both ways, 8200 (1025
# packs) v1 both ways; fp32 (packs of 4): 2048 v3 / v4, 4096 v3, 8192 and 8200 v1
@pytest.mark.parametrize("C", [2048, 4096, 8192, 8200])
def test_dual_norm_size_classes(device, seed, dtype, norm, C):
    rms = norm == "rms_norm"
    _run(_inputs((1031, C), rms, not rms, device, dtype), USES["all"], dtype, seed, rms)
