"""neox.kernels.linear against autograd's F.linear: the bias-gradient kernel (CPU here, CUDA with -m gpu) and
the weight gradient added into .grad inside the GEMM over micro-batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neox.kernels.linear import bias_grad, bias_grad_reference, linear
from support.kernel_checks import TOL, rel_error

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="no CUDA device")])


# (8, 2048) and (3, 7, 64): whole 16-byte packs (the CUDA kernel's vector path); (5, 37), (1, 1): scalar
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (3, 7, 64), (4099, 8), (8, 2048)])
def test_bias_grad_is_the_column_sum(device, dtype, shape):
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    got = bias_grad(dy, impl="fused")
    ref = dy.double().reshape(-1, shape[-1]).sum(0)  # exact sums of the rounded inputs
    assert got.dtype == torch.float32 and got.shape == (shape[-1],)
    assert rel_error(got, ref) < 1e-5  # fp32 accumulation of whatever dtype came in
    assert torch.equal(bias_grad(dy, impl="reference"), bias_grad_reference(dy))


def _layer(device, dtype, bias=True, n=48, k=32):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(device, dtype).requires_grad_() if bias else None
    return w, b


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_autograd(device, dtype, bias):
    w, b = _layer(device, dtype, bias)
    x = torch.randn(2, 9, 32, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 9, 48, device=device, dtype=dtype)
    y = linear(x, w, b, impl="fused")
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), dy)
    w_ref, b_ref = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_() if bias else None
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref, b_ref)
    ref = torch.autograd.grad(y_ref, [x_ref, w_ref] + ([b_ref] if bias else []), dy)
    assert torch.equal(y, y_ref)  # the forward is F.linear itself
    for name, g, r in zip(("x", "weight", "bias"), grads, ref):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert rel_error(g, r) <= TOL[dtype], name


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_weight_gradients_accumulate_in_the_gemm(device):
    """Three micro-batches with accumulate=True: the first gradient is autograd's own tensor, the later ones
    are added into that same tensor (no new one), and the sums equal F.linear's accumulated by autograd."""
    w, b = _layer(device, torch.float32)
    w_ref, b_ref = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    first_grad = None
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        x = torch.randn(4, 32, generator=g).to(device)
        dy = torch.randn(4, 48, generator=g).to(device)
        linear(x, w, b, impl="fused", accumulate=True).backward(dy)
        F.linear(x, w_ref, b_ref).backward(dy)
        if i == 0:
            first_grad, first_bias_grad = w.grad, b.grad
        assert w.grad is first_grad and b.grad is first_bias_grad  # later micro-batches write into the first's
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_bf16_bias_gradient_is_rounded_once_per_micro_batch(device):
    """The bias's fp32 column sums go into its bf16 .grad with one rounding: held + fp32 sum, rounded (autograd
    rounds the sum to bf16 first, then the addition: twice)."""
    w, b = _layer(device, torch.bfloat16)
    held = None
    for i in range(3):
        g = torch.Generator().manual_seed(20 + i)
        x = torch.randn(64, 32, generator=g).to(device, torch.bfloat16)
        dy = torch.randn(64, 48, generator=g).to(device, torch.bfloat16)
        linear(x, w, b, impl="fused", accumulate=True).backward(dy)
        sums = bias_grad(dy, impl="fused")  # fp32 column sums (tested against exact sums above)
        want = sums.to(torch.bfloat16) if held is None else (held.float() + sums).to(torch.bfloat16)
        assert torch.equal(b.grad, want), i
        if held is not None:
            twice = held + sums.to(torch.bfloat16)  # autograd's way: the sum rounded, then the addition
            assert not torch.equal(twice, want)  # (these inputs tell the two apart)
        held = b.grad.clone()


def test_without_accumulate_autograd_adds_the_gradients():
    w, b = _layer("cpu", torch.float32)
    x, dy = torch.randn(4, 32), torch.randn(4, 48)
    linear(x, w, b, impl="fused").backward(dy)
    held = w.grad.clone()
    linear(x, w, b, impl="fused").backward(dy)
    torch.testing.assert_close(w.grad, 2 * held)  # the same sum, through AccumulateGrad


def test_auto_keeps_autograds_linear_on_cpu():
    w, b = _layer("cpu", torch.float32)
    y = linear(torch.randn(3, 32, requires_grad=True), w, b)
    assert type(y.grad_fn).__name__ == "AddmmBackward0"  # CPU runs stay bitwise the TP layers' linear
    with torch.no_grad():
        assert linear(torch.randn(3, 32), w, b, impl="fused").grad_fn is None


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_a_model_with_accumulating_linears_gets_the_same_gradients(mlp):
    """A small GPT (fused kernels on CPU: the bias-GeLU path calls `matmul`) made AccumulatingLinear: over three
    micro-batches its gradients equal an untouched copy's, and its parameters and names are the same."""
    import copy

    from neox.kernels.linear import AccumulatingLinear, accumulate_in_gemm
    from neox.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64, seq_len=16, vocab_size=64,
                    rotary_dims=8, parallel_residual=True, mlp=mlp, kernels="fused")
    model = GPT(cfg)
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    swapped = accumulate_in_gemm(model, impl="fused")
    assert swapped == 2 * 4 + 1  # qkv, proj, fc_in, fc_out per block, and the head
    assert [n for n, _ in model.named_parameters()] == names
    assert sum(isinstance(m, AccumulatingLinear) for m in model.modules()) == swapped
    for i in range(3):
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i))
        for m in (model, ref):
            m(tokens).float().square().mean().backward()
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=name)
