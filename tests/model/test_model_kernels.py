"""The model with every op on the compiled kernels (model.kernels=fused) against the model on the PyTorch
references, same weights: logits, loss and every parameter gradient, on CPU (CI) and CUDA (-m gpu).

This is what wires the kernels into the model: the MLP's bias + GeLU (`linear_before_bias`), the loss
(fused cross-entropy, gradient in the logits' storage), ALiBi attention through the masked softmax,
besides the norms, rotary and SwiGLU. Per-op switches (GPTConfig.kernel_ops) pick one op at a time."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from neox import kernels
from neox.model.gpt import GPT, GPTConfig, cross_entropy_loss

BASE = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_ff=96, seq_len=24, vocab_size=200)
CASES = {
    # ALiBi through the masked softmax, GQA (2 q heads per kv head), GeLU with bias, LayerNorm
    "alibi-gqa-gelu": GPTConfig(**{**BASE, "n_kv_heads": 2}, position="alibi"),
    # learned positions, GeLU without bias (bias_gelu with no bias), parallel residual, tied head
    "learned-gelu-nobias-tied": GPTConfig(**BASE, position="learned", bias=False, parallel_residual=True,
                                          tied_embeddings=True),
    # rotary, SwiGLU, RMSNorm
    "rotary-swiglu-rms": GPTConfig(**BASE, position="rotary", rotary_dims=8, mlp="swiglu", norm="rmsnorm"),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _run(cfg: GPTConfig, state: dict, tokens: torch.Tensor, targets: torch.Tensor, device: str):
    model = GPT(cfg).to(device)
    model.load_state_dict(state)
    logits = model(tokens.to(device))
    kept = logits.detach().clone()  # the fused loss writes its gradient into the logits' storage
    loss = cross_entropy_loss(logits, targets.to(device), impl=cfg.impl("cross_entropy"))
    loss.backward()
    return kept, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_fused_model_matches_reference_model(name: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    ref_cfg = dataclasses.replace(CASES[name], kernels="reference")
    torch.manual_seed(0)
    state = GPT(ref_cfg).state_dict()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, BASE["vocab_size"], (3, BASE["seq_len"]), generator=g)
    targets = torch.randint(0, BASE["vocab_size"], (3, BASE["seq_len"]), generator=g)
    targets[0, :5] = -100  # ignored positions, as the data pipeline's padding
    ref = _run(ref_cfg, state, tokens, targets, device)
    fused = _run(dataclasses.replace(ref_cfg, kernels="fused"), state, tokens, targets, device)
    assert _rel(fused[0], ref[0]) <= 1e-5, f"{name} logits"
    assert abs(fused[1].item() - ref[1].item()) <= 1e-5 * abs(ref[1].item()), f"{name} loss"
    for n, grad in ref[2].items():
        assert _rel(fused[2][n], grad) <= 1e-5, f"{name} grad {n}: {_rel(fused[2][n], grad):.2e}"


def test_per_op_switch_reaches_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_ops overrides one op: with kernels=reference and cross_entropy=fused, only the loss calls
    its kernel; the MLP keeps F.gelu on the linear's own output."""
    calls: list[str] = []
    for op in ("cross_entropy", "bias_gelu", "masked_softmax"):
        real = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, _op=op, _real=real, **k: calls.append(_op) or _real(*a, **k))
    cfg = dataclasses.replace(CASES["alibi-gqa-gelu"], kernels="reference", kernel_ops=(("cross_entropy", "fused"),))
    assert cfg.impl("cross_entropy") == "fused" and cfg.impl("bias_gelu") == "reference"
    tokens = torch.randint(0, BASE["vocab_size"], (2, BASE["seq_len"]))
    model = GPT(cfg)
    cross_entropy_loss(model(tokens), tokens, impl=cfg.impl("cross_entropy")).backward()
    assert calls == ["cross_entropy"]
    calls.clear()
    cfg = dataclasses.replace(cfg, kernels="fused", kernel_ops=(("cross_entropy", "reference"),))
    model = GPT(cfg)
    cross_entropy_loss(model(tokens), tokens, impl=cfg.impl("cross_entropy")).backward()
    assert sorted(set(calls)) == ["bias_gelu", "masked_softmax"]


def test_describe_names_the_per_op_choices() -> None:
    line = kernels.describe("auto", "cpu", {"cross_entropy": "fused", "rms_norm": "reference"})
    assert "\n" not in line and line.startswith("kernels[auto, cross_entropy=fused, rms_norm=reference]:")
    assert "cross_entropy" in line.split(";")[0]  # fused
    assert "rms_norm) — chosen by config" in line
