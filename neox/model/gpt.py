"""The GPT-NeoX family of models, in one file that reads top to bottom as the architecture.

Positions: learned, rotary (full or partial, NeoX or GPT-J layout) or ALiBi. Residual: parallel
(GPT-J/NeoX) or sequential. Norm: LayerNorm or RMSNorm. MLP: GeLU or SwiGLU. Attention: torch SDPA
with grouped-query heads. Embeddings tied or untied. Inference: `GPT.decode` runs the same layers
incrementally over a `KVCache` (batched prompts of different lengths, left-padded).

The model is a flat list of layers (embedding, blocks, final norm, head) so the same definition runs
as a plain module (`GPT`) or as a DeepSpeed pipeline (`neox.parallel.pipeline`). Parallelism is
applied from outside: tensor parallelism swaps the linear layers for sharded ones, and every module
here reads its local head/width counts off its weights, so it runs unchanged on a shard.

At about 480 lines it is over the project's 400-line module size on purpose: the architecture is read
in one place, top to bottom (nanoGPT's model.py is the model for that), and every variant above is a
few lines inside the layer it changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from neox import kernels
from neox.errors import ConfigError
from neox.model.activation_checkpointing import checkpointed


@dataclass(frozen=True)
class GPTConfig:
    """Fully resolved model shape; built by `neox.config.plan.gpt_config` from the run config."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    seq_len: int
    vocab_size: int  # padded
    position: str = "rotary"
    rotary_dims: int = 0
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    parallel_residual: bool = False
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    tied_embeddings: bool = False
    bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    init: str = "small_init"
    init_std: float = 0.02
    activation_checkpointing: str = "none"
    kernels: str = "auto"  # auto | fused | reference: see neox.kernels
    kernel_ops: tuple = ()  # (op, impl) pairs where an op's choice differs from `kernels`

    def impl(self, op: str) -> str:
        """auto | fused | reference for one op of neox.kernels."""
        return dict(self.kernel_ops).get(op, self.kernels)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed by neox.kernels (fused where built and faster; fp32 statistics)."""

    def __init__(self, dim: int, eps: float, impl: str):
        super().__init__(dim, eps=eps)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, impl=self.impl)


class RMSNorm(nn.RMSNorm):
    def __init__(self, dim: int, eps: float, impl: str):
        super().__init__(dim, eps=eps)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, impl=self.impl)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps, cfg.impl("rms_norm"))
    return LayerNorm(cfg.d_model, cfg.norm_eps, cfg.impl("layer_norm"))


# ---------------------------------------------------------------------------------------- positions
def rotary_tables(dims: int, seq_len: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [seq, dims/2], computed in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, device=device, dtype=torch.float32) / dims))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: int, interleaved: bool, q_per_kv: int,
               impl: str = "reference") -> torch.Tensor:
    """Rotate the first `dims` channels of the q and k heads of qkv [b, s, groups, q_per_kv + 2, hd]; v and the
    other channels pass through. The code below is the definition (it returns a new tensor); impl=auto|fused
    runs neox.kernels.rotary_qkv_ instead, which rotates qkv's q/k channels in place and returns qkv."""
    s = qkv.shape[1]
    if impl != "reference":
        return kernels.rotary_qkv_(qkv, cos[:s], sin[:s], dims, interleaved, q_per_kv, impl=impl)
    qk = rotate(qkv[:, :, :, : q_per_kv + 1], cos[:s, None, None, :], sin[:s, None, None, :], dims, interleaved)
    return torch.cat((qk, qkv[:, :, :, q_per_kv + 1:]), dim=3)  # [s, 1, 1, dims/2] broadcast over groups, heads


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: int, interleaved: bool) -> torch.Tensor:
    """The rotation of `rotary_qkv` (in fp32), with cos/sin already at the tokens' positions: [s, 1, dims/2],
    or [b, s, 1, ..., dims/2] when each row has its own positions (decoding left-padded prompts)."""
    rot, rest = x[..., :dims], x[..., dims:]
    rot = rot if rot.dtype == torch.float32 else rot.float()  # (skipping no-op casts saves decoding steps time)
    if interleaved:  # GPT-J: pairs (2i, 2i+1)
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:  # NeoX: halves (i, i + dims/2)
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = out if out.dtype == x.dtype else out.to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al.), including the non-power-of-two rule."""
    def pow2_slopes(n: int) -> List[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(pow2_slopes(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = pow2_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(pow2_slopes(closest) + extra)


# ---------------------------------------------------------------------------------------- kv cache
class KVCache:
    """Keys and values of every layer for incremental decoding of b rows, left-padded to one length.

    Slot t of row r holds the token at position t - pad[r]. A real token attends to the slots from its
    row's first real token up to its own; a padding slot only to itself (any finite output, never read).
    Each decoding step appends s slots: `begin(s)` sets the step's positions and mask, every layer
    calls `update`, and `advance` commits the step. Buffers are allocated at a layer's first update, in
    that layer's dtype and local (tensor-parallel) head count. Without padding, SDPA gets no mask where
    none is needed (one new token sees every slot; a first step is plain causal), so it can run its
    fused kernels."""

    def __init__(self, n_layers: int, max_len: int, pad: torch.Tensor):
        self.max_len, self.pad = max_len, pad  # pad: [b] padding slots before each row's first token
        self.padded = bool(pad.any())
        self.k: List[Optional[torch.Tensor]] = [None] * n_layers
        self.v: List[Optional[torch.Tensor]] = [None] * n_layers
        self.length = 0  # slots filled by committed steps
        self.step = 0  # slots the current step appends
        self.pos = self.mask = None
        self.sdpa_mask, self.causal = None, False  # what SDPA is given: the mask, or None (+ is_causal)
        self.rope = None  # cos, sin at this step's positions: computed by the first layer, reused by the others

    def begin(self, s: int) -> None:
        if self.length + s > self.max_len:
            raise ConfigError(f"the KV cache holds {self.max_len} positions; {self.length} + {s} do not fit")
        self.step, self.rope = s, None
        query = torch.arange(self.length, self.length + s, device=self.pad.device)
        key = torch.arange(self.length + s, device=self.pad.device)
        self.pos = (query[None] - self.pad[:, None]).clamp(min=0)  # [b, s]
        real = key[None, None, :] >= self.pad[:, None, None]  # [b, 1, L]
        self.mask = ((key[None, :] <= query[:, None])[None] & real) | (key[None, :] == query[:, None])[None]
        self.mask = self.mask[:, None]  # [b, 1, s, L]: broadcast over heads
        plain = not self.padded and (s == 1 or self.length == 0)
        self.sdpa_mask, self.causal = (None, s > 1) if plain else (self.mask, False)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v [b, kv heads, s, hd] of `layer`; return all of the layer's so far."""
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        end = self.length + self.step
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self) -> None:
        self.length += self.step
        self.step = 0


# ---------------------------------------------------------------------------------------- attention
class CausalSelfAttention(nn.Module):
    """Grouped-query attention. The qkv projection is laid out per kv group as
    [q heads of the group..., k, v], so sharding its rows into contiguous blocks (tensor
    parallelism) keeps whole groups together."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        hd, groups = cfg.head_dim, cfg.n_kv_heads
        self.q_per_kv = cfg.n_heads // cfg.n_kv_heads
        self.qkv = nn.Linear(cfg.d_model, groups * (self.q_per_kv + 2) * hd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=cfg.bias)
        self.head_offset = 0  # first global head of this shard (ALiBi slopes under tp)
        if cfg.position == "rotary":
            cos, sin = rotary_tables(cfg.rotary_dims, cfg.seq_len, cfg.rotary_base)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
        if cfg.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, s, local heads, hd] and k, v [b, s, local kv heads, hd] of x, rotated for rotary positions.
        The rotation works on the whole qkv buffer (in place when fused) and q, k, v come from one split of it,
        so the backward is one concatenation (fused: neox.kernels.split_qkv, whose backward gathers and rotates
        back in one kernel, for every position kind); q is a view of the buffer for MHA, a copy for GQA."""
        b, s, _ = x.shape
        hd, per = self.cfg.head_dim, self.q_per_kv
        qkv = self.qkv(x).view(b, s, -1, per + 2, hd)  # [b, s, local groups, q+2, hd]
        impl, rotary = self.cfg.impl("rotary"), self.cfg.position == "rotary"
        # (without rotation under torch.compile the plain split compiles; the fused one would be a graph break)
        if kernels.fuses("rotary", impl, x.device) and (rotary or not torch.compiler.is_compiling()):
            dims = self.cfg.rotary_dims if rotary else 0
            cos, sin = (self.cos[:s], self.sin[:s]) if rotary else (None, None)
            q, k, v = kernels.split_qkv(qkv, cos, sin, dims, self.cfg.rotary_interleaved, per, impl=impl)
            return q.reshape(b, s, -1, hd), k, v
        if rotary:
            qkv = rotary_qkv(qkv, self.cos, self.sin, self.cfg.rotary_dims, self.cfg.rotary_interleaved, per, impl)
        q, k, v = qkv.split((per, 1, 1), dim=3)
        return q.reshape(b, s, -1, hd), k.squeeze(3), v.squeeze(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.heads(x)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, hd]
        p = self.cfg.attn_dropout if self.training else 0.0
        if self.cfg.position == "alibi" and kernels.fuses("masked_softmax", self.cfg.impl("masked_softmax"), x.device):
            y = self._alibi_attention_unfused(q, k, v, p)
        elif self.cfg.position == "alibi":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._alibi_bias(q.shape[1], s, q),
                                               dropout_p=p, enable_gqa=self.q_per_kv > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=self.q_per_kv > 1)
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))

    def decode(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """`forward` for tokens that continue the cached sequence: rotated at each row's own positions,
        appended to the cache, attending to the cached slots the cache's mask allows."""
        b, s, _ = x.shape
        hd, per = self.cfg.head_dim, self.q_per_kv
        qkv = self.qkv(x).view(b, s, -1, per + 2, hd)  # [b, s, local groups, q+2, hd]
        qk, v = qkv[:, :, :, : per + 1], qkv[:, :, :, -1]
        if self.cfg.position == "rotary":  # the q and k heads of every group in one rotation
            if cache.rope is None:
                cache.rope = (self.cos[cache.pos][:, :, None, None], self.sin[cache.pos][:, :, None, None])
            qk = rotate(qk, *cache.rope, self.cfg.rotary_dims, self.cfg.rotary_interleaved)  # [b, s, 1, 1, dims/2]
        q, k = qk[:, :, :, :per].reshape(b, s, -1, hd), qk[:, :, :, per]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = cache.update(layer, k, v)
        mask, causal = cache.sdpa_mask, cache.causal
        if self.cfg.position == "alibi":  # slope * (key slot - query slot): the distance padding does not change
            slopes = self.slopes[self.head_offset: self.head_offset + q.shape[1]].to(torch.float32)
            query = torch.arange(cache.length, cache.length + s, device=x.device)
            dist = (torch.arange(k.shape[2], device=x.device)[None, :] - query[:, None]).to(torch.float32)
            mask, causal = (slopes[:, None, None] * dist[None]).masked_fill(~cache.mask, float("-inf")).to(q.dtype), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.q_per_kv > 1)
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))

    def _alibi_attention_unfused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + alibi) v with the scores materialized and the scaled, causally masked
        softmax by neox.kernels.masked_softmax (the same math as the SDPA call with the bias as its mask)."""
        if self.q_per_kv > 1:  # each kv head serves q_per_kv consecutive q heads, as SDPA's enable_gqa
            k, v = (t.repeat_interleave(self.q_per_kv, dim=1) for t in (k, v))
        scale = 1.0 / math.sqrt(q.shape[-1])
        slopes, dist = self._alibi_terms(q.shape[1], q.shape[2], q.device)  # the kernel masks dist > 0
        bias = (slopes[:, None, None] * dist[None] / scale).to(q.dtype)  # added before the kernel's scale
        probs = kernels.masked_softmax(torch.matmul(q, k.transpose(-1, -2)) + bias, scale,
                                       impl=self.cfg.impl("masked_softmax"))
        if p:
            probs = F.dropout(probs, p)
        return torch.matmul(probs, v)

    def _alibi_terms(self, local_heads: int, s: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This shard's head slopes [local_heads] and the key - query distances [s, s] (<= 0 in the past)."""
        slopes = self.slopes[self.head_offset: self.head_offset + local_heads].to(torch.float32)
        pos = torch.arange(s, device=device)
        return slopes, (pos[None, :] - pos[:, None]).to(torch.float32)

    def _alibi_bias(self, local_heads: int, s: int, like: torch.Tensor) -> torch.Tensor:
        slopes, dist = self._alibi_terms(local_heads, s, like.device)
        bias = slopes[:, None, None] * dist[None]
        bias = bias.masked_fill(dist[None] > 0, float("-inf"))
        return bias.to(like.dtype)


# ---------------------------------------------------------------------------------------- mlp
class MLP(nn.Module):
    """GeLU MLP, or SwiGLU with fc_in's outputs laid out as (gate, up) pairs so that a
    contiguous row shard under tensor parallelism holds whole pairs."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.impl = cfg.impl("swiglu" if self.swiglu else "bias_gelu")
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff * (2 if self.swiglu else 1), bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:  # silu(gate) * up over (gate, up) pairs
            h = kernels.swiglu(self.fc_in(x), impl=self.impl)
        elif kernels.fuses("bias_gelu", self.impl, x.device):  # gelu(x @ W.T + b), the add in the kernel
            h = kernels.bias_gelu(linear_before_bias(self.fc_in, x), self.fc_in.bias, impl=self.impl)
        else:
            h = F.gelu(self.fc_in(x))
        return self.fc_out(h)


def linear_before_bias(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's output without its bias: `linear.matmul(x)` where the module defines it (a tensor-
    parallel linear, whose input edge is part of it), else x @ weight.T."""
    matmul = getattr(linear, "matmul", None)
    return matmul(x) if matmul is not None else F.linear(x, linear.weight)


# ---------------------------------------------------------------------------------------- layers
class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.ln_attn = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.add3_impl = cfg.impl("add3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel_residual:  # GPT-J / NeoX: both branches read the same input
            if self._fuses_norm_pair(x):  # both norms in one node, whose backward also sums x's three grads
                ln1, ln2, rms = self.ln_attn, self.ln_mlp, isinstance(self.ln_attn, RMSNorm)
                x, h_attn, h_mlp = kernels.dual_norm(x, ln1.weight, None if rms else ln1.bias, ln2.weight,
                                                     None if rms else ln2.bias, ln1.eps, rms=rms, impl=ln1.impl)
                # (compiled, Inductor fuses the two adds itself; the kernel would be one more graph break)
                impl = "reference" if torch.compiler.is_compiling() else self.add3_impl
                return kernels.add3(x, self.drop(self.attn(h_attn)), self.drop(self.mlp(h_mlp)), impl=impl)
            return x + self.drop(self.attn(self.ln_attn(x))) + self.drop(self.mlp(self.ln_mlp(x)))
        x = x + self.drop(self.attn(self.ln_attn(x)))
        return x + self.drop(self.mlp(self.ln_mlp(x)))

    def _fuses_norm_pair(self, x: torch.Tensor) -> bool:
        """Whether the two norms run as one `kernels.dual_norm`: both still the model's own norm class (not
        swapped, e.g. for sequence parallelism's), on the compiled kernel, and not under ZeRO-3 (which gathers
        a module's parameters only around that module's own forward)."""
        ln1, ln2 = self.ln_attn, self.ln_mlp
        if type(ln1) not in (LayerNorm, RMSNorm) or type(ln2) is not type(ln1) or hasattr(ln1.weight, "ds_id"):
            return False
        return (ln1.eps, ln1.impl) == (ln2.eps, ln2.impl) and kernels.fuses(
            "rms_norm" if isinstance(ln1, RMSNorm) else "layer_norm", ln1.impl, x.device)

    def decode(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """`forward` with the attention reading and extending the KV cache."""
        if self.parallel_residual:
            return x + self.drop(self.attn.decode(self.ln_attn(x), cache, layer)) + self.drop(self.mlp(self.ln_mlp(x)))
        x = x + self.drop(self.attn.decode(self.ln_attn(x), cache, layer))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class Embedding(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """positions: [b, s] of each token (decoding); None: 0..s-1 for every row."""
        x = self.tok(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions)
        return self.drop(x)


class FinalNorm(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm = make_norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class Head(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass(frozen=True)
class LayerSpec:
    """A layer to build: `cls(cfg)`. `tied_key` marks the embedding/head pair that share weights."""

    cls: type
    tied_key: Optional[str] = None


def layer_specs(cfg: GPTConfig) -> List[LayerSpec]:
    """The model as a flat list: embedding, blocks, final norm, head."""
    tied = "embed" if cfg.tied_embeddings else None
    return ([LayerSpec(Embedding, tied)] + [LayerSpec(Block)] * cfg.n_layers
            + [LayerSpec(FinalNorm), LayerSpec(Embedding if tied else Head, tied)])


def tied_head_forward(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    """The output projection of a tied model: logits = x @ E^T."""
    return F.linear(x, embedding.tok.weight)


# ---------------------------------------------------------------------------------------- init
def init_weights(module: nn.Module, cfg: GPTConfig) -> None:
    """`normal`: init_std everywhere, residual-branch outputs scaled by 1/sqrt(2L) (GPT-2).
    `small_init` (Nguyen & Salazar): std = sqrt(2 / 5d) everywhere.
    `wang_init`: small_init, with residual-branch outputs at std = 2 / (L * sqrt(d)) (GPT-NeoX's pairing)."""
    d, n_layers = cfg.d_model, cfg.n_layers
    if cfg.init == "normal":
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * n_layers)
    else:
        std = math.sqrt(2 / (5 * d))
        out_std = 2 / (n_layers * math.sqrt(d)) if cfg.init == "wang_init" else std
    for name, p in module.named_parameters():
        if p.dim() < 2:
            nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
        elif name.endswith(("attn.proj.weight", "mlp.fc_out.weight")):
            nn.init.normal_(p, std=out_std)
        else:
            nn.init.normal_(p, std=std)


# ---------------------------------------------------------------------------------------- model
class GPT(nn.Module):
    """The layers of `layer_specs` run as one module (no pipeline)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        specs = layer_specs(cfg)
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(spec.cls(cfg) for spec in specs[1:-2])
        self.norm_f = FinalNorm(cfg)
        self.head = None if cfg.tied_embeddings else Head(cfg)
        init_weights(self, cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            if self.cfg.activation_checkpointing == "full" and self.training:
                x = checkpointed(block, x)
            else:
                x = block(x)
        x = self.norm_f(x)
        return tied_head_forward(self.embed, x) if self.head is None else self.head(x)

    def new_cache(self, max_len: int, pad: torch.Tensor) -> KVCache:
        """An empty KV cache for len(pad) rows of up to max_len slots (pad: each row's left padding)."""
        if max_len > self.cfg.seq_len:
            raise ConfigError(f"{max_len} positions exceed the model's context of {self.cfg.seq_len}")
        return KVCache(len(self.blocks), max_len, pad)

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits for tokens [b, s] that continue the sequences held in `cache` (incremental decoding):
        the prompt first (with its left padding), then one token per step."""
        cache.begin(tokens.shape[1])
        x = self.embed(tokens, cache.pos)
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cache, i)
        cache.advance()
        x = self.norm_f(x)
        return tied_head_forward(self.embed, x) if self.head is None else self.head(x)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, impl: str = "reference") -> torch.Tensor:
    """Mean next-token loss in fp32. Fused (neox.kernels.cross_entropy): read from the (b)f16 logits with no
    fp32 copy, and the gradient written into the logits' storage."""
    if kernels.fuses("cross_entropy", impl, logits.device):
        return kernels.cross_entropy(logits.flatten(0, 1), targets.flatten(), impl=impl)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def count_params(cfg: GPTConfig) -> dict:
    """Parameter counts computed from the shape, without building the model."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    b = 1 if cfg.bias else 0
    qkv = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + b * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    proj = cfg.n_heads * hd * d + b * d
    mlp_in = d * f * (2 if cfg.mlp == "swiglu" else 1) + b * f * (2 if cfg.mlp == "swiglu" else 1)
    mlp_out = f * d + b * d
    norm = d * (2 if cfg.norm == "layernorm" else 1)
    block = qkv + proj + mlp_in + mlp_out + 2 * norm
    embed = cfg.vocab_size * d + (cfg.seq_len * d if cfg.position == "learned" else 0)
    head = 0 if cfg.tied_embeddings else cfg.vocab_size * d
    total = embed + cfg.n_layers * block + norm + head
    return {"total": total, "non_embedding": cfg.n_layers * block + norm, "embedding": embed + head}
