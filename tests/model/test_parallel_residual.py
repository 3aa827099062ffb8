"""The parallel-residual block on its fused path (`kernels.dual_norm` for both norms, `kernels.add3` for the
residual sum) against the same model on the PyTorch references: logits and every parameter gradient, fp32
and bf16, LayerNorm and RMSNorm, with dropout, activation checkpointing and torch.compile; and the cases
that must keep the two separate norm modules (a swapped norm as sequence parallelism's, ZeRO-3 parameters).
CPU in CI; the same on CUDA with -m gpu."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from neox import kernels
from neox.model.gpt import GPT, Block, GPTConfig, cross_entropy_loss

BASE = GPTConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_ff=96, seq_len=24, vocab_size=200,
                 position="rotary", rotary_dims=4, parallel_residual=True)
NORMS = {"layernorm": {}, "rmsnorm-swiglu": {"norm": "rmsnorm", "mlp": "swiglu"}}
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device visible")])]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _run(cfg: GPTConfig, state: dict, dtype: torch.dtype, device: str, seed: int = 3, compiled: bool = False):
    model = GPT(cfg)
    model.load_state_dict(state)
    model.to(device, dtype)
    if compiled:
        from neox.train.compile import compile_blocks
        assert compile_blocks(model, Block, lambda _: None, backend="aot_eager") == cfg.n_layers
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len), generator=g).to(device)
    torch.manual_seed(seed)  # dropout masks: drawn in the same order on both paths
    logits = model(tokens)
    loss = cross_entropy_loss(logits, tokens)
    loss.backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def _compare(fused, ref, tol: float, what: str) -> None:
    assert _rel(fused[0], ref[0]) <= tol, f"{what}: logits {_rel(fused[0], ref[0]):.2e}"
    for n, grad in ref[1].items():
        assert _rel(fused[1][n], grad) <= tol, f"{what}: grad {n} {_rel(fused[1][n], grad):.2e}"


def _spy(monkeypatch) -> list:
    """Record the calls of the two fused ops the block makes (their impl= argument included)."""
    calls: list = []
    for op in ("dual_norm", "add3"):
        real = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, _op=op, _real=real, **k: calls.append((_op, k.get("impl")))
                            or _real(*a, **k))
    return calls


def _state(cfg: GPTConfig) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # norms away from their ones/zeros init, so that wrong parameter wiring shows
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.state_dict()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", list(NORMS))
def test_fused_parallel_residual_matches_reference(monkeypatch, device, dtype, norm):
    """fp32: within the tolerance of tests/model/test_model_kernels.py. bf16: the fused ops round differently
    (add3 once where PyTorch rounds twice; x's grads summed inside the norm backwards), so both bf16 models
    are measured against the fp32 reference model: the fused one may be off by no more than 1.5x the
    reference's own bf16 error + 0.005 (on CPU: 0.4-1.4x of it, all within 0.0125)."""
    ref_cfg = dataclasses.replace(BASE, kernels="reference", **NORMS[norm])
    state = _state(ref_cfg)
    ref = _run(ref_cfg, state, torch.float32, device)
    calls = _spy(monkeypatch)
    fused = _run(dataclasses.replace(ref_cfg, kernels="fused"), state, dtype, device)
    # both blocks, both ops, forward only (the backward is the C++ nodes')
    assert calls == [("dual_norm", "fused"), ("add3", "fused")] * 2
    if dtype == torch.float32:
        _compare(fused, ref, 1e-5, f"{norm} fp32")
        return
    ref_bf16 = _run(ref_cfg, state, dtype, device)
    for name, got, base, exact in [("logits", fused[0], ref_bf16[0], ref[0])] + [
            (f"grad {n}", fused[1][n], ref_bf16[1][n], g) for n, g in ref[1].items()]:
        err, base_err = _rel(got, exact), _rel(base, exact)
        assert err <= 1.5 * base_err + 5e-3, f"{norm} bf16 {name}: {err:.2e} against the reference's {base_err:.2e}"


def test_each_op_follows_its_own_switch(monkeypatch):
    """dual_norm goes with the norm's switch, add3 with its own: the norms fused and add3 on the reference
    still take the fused path for the norms; the norms on the reference never call either op."""
    ref_cfg = dataclasses.replace(BASE, kernels="reference")
    state = _state(ref_cfg)
    ref = _run(ref_cfg, state, torch.float32, "cpu")
    calls = _spy(monkeypatch)
    cfg = dataclasses.replace(ref_cfg, kernels="fused", kernel_ops=(("add3", "reference"),))
    _compare(_run(cfg, state, torch.float32, "cpu"), ref, 1e-5, "add3=reference")
    assert calls == [("dual_norm", "fused"), ("add3", "reference")] * 2
    calls.clear()
    cfg = dataclasses.replace(ref_cfg, kernels="fused", kernel_ops=(("layer_norm", "reference"),))
    _compare(_run(cfg, state, torch.float32, "cpu"), ref, 1e-5, "layer_norm=reference")
    assert calls == []


def test_reference_path_is_unchanged():
    """model.kernels=reference computes exactly x + drop(attn(ln_attn(x))) + drop(mlp(ln_mlp(x))), bit for bit."""
    cfg = dataclasses.replace(BASE, kernels="reference")
    torch.manual_seed(0)
    block = Block(cfg)
    x = torch.randn(2, cfg.seq_len, cfg.d_model)
    expected = x + block.drop(block.attn(block.ln_attn(x))) + block.drop(block.mlp(block.ln_mlp(x)))
    assert torch.equal(block(x), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout(device):
    """With dropout the fused path draws the same masks in the same order as the reference."""
    ref_cfg = dataclasses.replace(BASE, kernels="reference", dropout=0.2, attn_dropout=0.1)
    state = _state(ref_cfg)
    ref = _run(ref_cfg, state, torch.float32, device)
    fused = _run(dataclasses.replace(ref_cfg, kernels="fused"), state, torch.float32, device)
    _compare(fused, ref, 1e-5, "dropout")
    no_drop = _run(dataclasses.replace(ref_cfg, dropout=0.0, attn_dropout=0.0), state, torch.float32, device)
    assert _rel(no_drop[0], ref[0]) > 1e-3  # the dropout did act


@pytest.mark.parametrize("device", DEVICES)
def test_activation_checkpointing(device):
    """Full checkpointing recomputes the fused block in backward: same grads as without."""
    cfg = dataclasses.replace(BASE, kernels="fused", dropout=0.1)
    state = _state(cfg)
    plain = _run(cfg, state, torch.float32, device)
    ckpt = _run(dataclasses.replace(cfg, activation_checkpointing="full"), state, torch.float32, device)
    _compare(ckpt, plain, 1e-6, "checkpointed")


def test_compiled_blocks(monkeypatch):
    """train.compile's regional compile (AOT eager here, no C++ compiler needed): dual_norm runs between
    compiled regions as the norms did, and the adds are left to the compiler."""
    cfg = dataclasses.replace(BASE, kernels="fused")
    state = _state(cfg)
    eager = _run(cfg, state, torch.float32, "cpu")
    torch._dynamo.reset()
    try:
        compiled = _run(cfg, state, torch.float32, "cpu", compiled=True)
    finally:
        torch._dynamo.reset()
    _compare(compiled, eager, 1e-5, "compiled")


class _OtherNorm(nn.Module):
    """A norm swapped in from outside, as sequence parallelism's SequenceParallelNorm is."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def test_swapped_norms_and_zero3_keep_the_separate_norms(monkeypatch):
    cfg = dataclasses.replace(BASE, kernels="fused")
    torch.manual_seed(0)
    block = Block(cfg)
    x = torch.randn(2, cfg.seq_len, cfg.d_model)
    calls = _spy(monkeypatch)
    expected = block(x)
    assert [c[0] for c in calls] == ["dual_norm", "add3"]
    calls.clear()
    block.ln_mlp = _OtherNorm(block.ln_mlp)
    torch.testing.assert_close(block(x), expected)
    block.ln_mlp = block.ln_mlp.norm
    block.ln_attn.weight.ds_id = 7  # what DeepSpeed's ZeRO-3 puts on the parameters it partitions
    torch.testing.assert_close(block(x), expected)
    assert calls == []
