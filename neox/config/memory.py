"""A rough memory estimate per device, so that a run which clearly cannot fit is refused up front.

Model states (Rajbhandari et al. 2020, ZeRO, section 3.1): per parameter, the weights and their
gradients take w bytes each (4 in fp32, 2 in bf16/fp16), AdamW 8 bytes of moments in fp32 or 12 in
mixed precision (fp32 master weights + moments). ZeRO-1 shards the optimizer states over dp, ZeRO-2
also the gradients, ZeRO-3 also the weights. A device holds about total / (tp * pp) parameters.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4): one layer keeps s*b*h*(34 + 5*a*s/h) bytes for a micro-batch of b sequences of
s tokens, hidden size h, a heads, with 2-byte elements; with tp = t that is s*b*h*(10 + 24/t + 5*a*s/(h*t)),
and with sequence parallelism s*b*h*(34 + 5*a*s/h)/t. The 5*a*s/h term is the attention scores,
counted only where they are materialized (ALiBi, attention dropout): causal SDPA never stores them.
Full activation checkpointing keeps 2*s*b*h per layer plus one layer's activations while it is
recomputed. fp32 doubles every term. A pipeline's first stage holds min(pp, grad_accum) micro-batches
of its n_layers/pp layers (1F1B). The logits and their gradient add 2 * 4*s*b*V/t bytes (fp32).
The formula assumes d_ff = 4h and ignores the framework's own buffers: it is meant to catch runs
off by multiples, not to tune one to the last GiB.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from neox.model.gpt import GPTConfig

GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    states: float  # bytes per device: weights + gradients + optimizer states
    activations: float  # bytes per device for the micro-batches in flight

    @property
    def total(self) -> float:
        return self.states + self.activations


def estimate(m: GPTConfig, total_params: int, *, micro_batch: int, grad_accum: int, tp: int, pp: int, dp: int,
             zero_stage: int, precision: str, sequence_parallel: bool) -> MemoryEstimate:
    """Bytes one device needs for this model, layout and micro-batch (see the module docstring)."""
    w = 4 if precision == "fp32" else 2
    optim = 8 if precision == "fp32" else 12
    grads = w
    weights = w
    if zero_stage >= 1:
        optim /= dp
    if zero_stage >= 2:
        grads /= dp
    if zero_stage >= 3:
        weights /= dp
    states = total_params / (tp * pp) * (weights + grads + optim)

    s, b, h, a = m.seq_len, micro_batch, m.d_model, m.n_heads
    scores = 5 * a * s / h if (m.position == "alibi" or m.attn_dropout > 0) else 0.0
    if sequence_parallel:
        per_layer = s * b * h * (34 + scores) / tp
    else:
        per_layer = s * b * h * (10 + 24 / tp + scores / tp)
    in_flight = min(pp, grad_accum) if pp > 1 else 1
    layers = math.ceil(m.n_layers / pp) * in_flight
    if m.activation_checkpointing == "full":
        layer_bytes = layers * 2 * s * b * h + per_layer
    else:
        layer_bytes = layers * per_layer
    logits = 2 * 4 * s * b * m.vocab_size / tp
    return MemoryEstimate(states=states, activations=layer_bytes * w / 2 + logits)


def gib(n: float) -> str:
    return f"{n / GiB:.3g} GiB"
