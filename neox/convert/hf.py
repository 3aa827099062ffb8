"""The mapping between neox's `GPT` and the two Hugging Face families, both ways, on plain state dicts.

    neox                                      GPTNeoXForCausalLM                   LlamaForCausalLM
    LayerNorm + GeLU, rotary (any fraction)   yes (parallel or sequential)         -
    RMSNorm + SwiGLU, rotary on every dim     -                                    yes (sequential, GQA)

Layouts that differ:
* qkv: neox lays the fused projection out per kv group as [q heads of the group..., k, v]. With one q
  head per group (no GQA) that is GPT-NeoX's own per-head [q, k, v]; Llama gets q/k/v split apart.
* rotary: both HF families rotate "halves" (channel i with i + d/2). A neox model trained with the
  GPT-J "interleaved" layout (pairs 2i, 2i+1) is exported with its q and k rows permuted into halves
  order, which rotates the same pairs at the same frequencies and keeps every q.k product.
* SwiGLU: neox's fc_in rows alternate (gate, up); Llama has gate_proj and up_proj.
* vocab: neox pads the embedding to `vocab_multiple`; the export keeps only the tokenizer's rows, so
  the padding can never be produced. The import keeps the HF rows as they are (vocab_multiple is the
  largest power of two up to 128 dividing them); `train.init_from` pads with zero rows where the run's
  vocab_multiple asks for more.
* biases: neox has one switch for every linear layer. GPT-NeoX's MLP always has biases (zeros for a
  bias-free neox model); Llama has attention_bias and mlp_bias.

Anything with no counterpart raises ConfigError naming the feature, never a silently different model.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from neox.errors import CheckpointError, ConfigError
from neox.model.gpt import GPTConfig

NEOX_ARCH = "GPTNeoXForCausalLM"
LLAMA_ARCH = "LlamaForCausalLM"
ARCHITECTURES = (NEOX_ARCH, LLAMA_ARCH)
State = Dict[str, torch.Tensor]
# buffers older transformers versions saved with GPT-NeoX weights; they hold no learned values
_IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


# ------------------------------------------------------------------------------------ which family
def family(cfg: GPTConfig) -> str:
    """The HF architecture a neox model exports to; ConfigError naming the first feature it lacks."""
    def refuse(feature: str, target: str) -> None:
        raise ConfigError(f"cannot export to {target}: it has no {feature}; "
                          "only models that family represents exactly are exported")

    if cfg.norm == "layernorm" and cfg.mlp == "gelu":
        arch = NEOX_ARCH
    elif cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        arch = LLAMA_ARCH
    else:
        raise ConfigError(f"cannot export norm={cfg.norm} with mlp={cfg.mlp}: Hugging Face's {NEOX_ARCH} is "
                          f"layernorm + gelu and {LLAMA_ARCH} is rmsnorm + swiglu")
    if cfg.position == "alibi":
        refuse("ALiBi position bias (model.position=alibi)", arch)
    if cfg.position == "learned":
        refuse("learned position embeddings (model.position=learned)", arch)
    if arch == NEOX_ARCH and cfg.n_kv_heads != cfg.n_heads:
        refuse(f"grouped-query attention (model.n_kv_heads={cfg.n_kv_heads} < n_heads={cfg.n_heads})", arch)
    if arch == LLAMA_ARCH and cfg.parallel_residual:
        refuse("parallel residual (model.parallel_residual=true)", arch)
    if arch == LLAMA_ARCH and cfg.rotary_dims != cfg.head_dim:
        refuse(f"partial rotary ({cfg.rotary_dims} of {cfg.head_dim} head dims rotate; model.rotary_pct < 1)", arch)
    return arch


# ------------------------------------------------------------------------------------ layouts
def _halves_order(dims: int, head_dim: int) -> torch.Tensor:
    """Row order, within one head, that turns GPT-J interleaved rotary pairs into NeoX halves."""
    rot = torch.arange(dims)
    return torch.cat([rot[0::2], rot[1::2], torch.arange(dims, head_dim)])


def _per_head(t: torch.Tensor, heads: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder the rows of each of `heads` heads of a [heads * hd, ...] weight or bias."""
    return t.view(heads, -1, *t.shape[1:])[:, order].reshape(t.shape)


def _split_qkv(w: torch.Tensor, cfg: GPTConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """neox's fused qkv rows (or bias) -> q [n_heads*hd], k, v [n_kv*hd]."""
    hd, groups, per = cfg.head_dim, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
    g = w.view(groups, per + 2, hd, *w.shape[1:])
    q = g[:, :per].reshape(cfg.n_heads * hd, *w.shape[1:])
    return q, g[:, per].reshape(groups * hd, *w.shape[1:]), g[:, per + 1].reshape(groups * hd, *w.shape[1:])


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    hd, groups, per = cfg.head_dim, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
    rest = q.shape[1:]
    parts = [q.view(groups, per, hd, *rest), k.view(groups, 1, hd, *rest), v.view(groups, 1, hd, *rest)]
    return torch.cat(parts, dim=1).reshape(groups * (per + 2) * hd, *rest)


def _rotary_rows(t: torch.Tensor, heads: int, cfg: GPTConfig, to_hf: bool) -> torch.Tensor:
    """q or k rows in HF's (halves) rotary order: a no-op unless neox used the interleaved layout."""
    if not cfg.rotary_interleaved:
        return t
    order = _halves_order(cfg.rotary_dims, cfg.head_dim)
    if not to_hf:
        order = torch.argsort(order)
    return _per_head(t, heads, order)


# ------------------------------------------------------------------------------------ neox -> HF
def hf_config_dict(cfg: GPTConfig, vocab: int, arch: str, eod_id: Optional[int]) -> dict:
    """Keyword arguments of the transformers config class for `arch`."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    common = dict(vocab_size=vocab, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
                  max_position_embeddings=cfg.seq_len, tie_word_embeddings=cfg.tied_embeddings,
                  bos_token_id=eod_id, eos_token_id=eod_id, attention_dropout=0.0, use_cache=True)
    if arch == NEOX_ARCH:
        return dict(common, hidden_act="gelu", layer_norm_eps=cfg.norm_eps, hidden_dropout=0.0,
                    use_parallel_residual=cfg.parallel_residual, attention_bias=cfg.bias,
                    rope_parameters=dict(rope, partial_rotary_factor=rotary_factor(cfg.rotary_dims, cfg.head_dim)))
    return dict(common, hidden_act="silu", rms_norm_eps=cfg.norm_eps, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, attention_bias=cfg.bias, mlp_bias=cfg.bias, rope_parameters=rope)


def rotary_factor(dims: int, head_dim: int) -> float:
    """A partial_rotary_factor for which transformers' int(head_dim * factor) gives exactly `dims`."""
    factor = dims / head_dim
    return factor if int(head_dim * factor) == dims else (dims + 0.5) / head_dim


def to_hf(cfg: GPTConfig, sd: State, vocab: int, arch: str) -> State:
    """neox GPT state dict (full, tp=1) -> the HF model's state dict; rows past `vocab` are dropped."""
    out: State = {}
    neox = arch == NEOX_ARCH
    base = "gpt_neox" if neox else "model"
    out[f"{base}.{'embed_in' if neox else 'embed_tokens'}.weight"] = sd["embed.tok.weight"][:vocab]
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}", f"{base}.layers.{i}"
        out[f"{h}.input_layernorm.weight"] = sd[f"{b}.ln_attn.weight"]
        out[f"{h}.post_attention_layernorm.weight"] = sd[f"{b}.ln_mlp.weight"]
        q, k, v = _split_qkv(sd[f"{b}.attn.qkv.weight"], cfg)
        qb, kb, vb = _split_qkv(sd[f"{b}.attn.qkv.bias"], cfg) if cfg.bias else (None, None, None)
        q, k = _rotary_rows(q, cfg.n_heads, cfg, True), _rotary_rows(k, cfg.n_kv_heads, cfg, True)
        if cfg.bias:
            qb, kb = _rotary_rows(qb, cfg.n_heads, cfg, True), _rotary_rows(kb, cfg.n_kv_heads, cfg, True)
        if neox:
            out[f"{h}.input_layernorm.bias"] = sd[f"{b}.ln_attn.bias"]
            out[f"{h}.post_attention_layernorm.bias"] = sd[f"{b}.ln_mlp.bias"]
            out[f"{h}.attention.query_key_value.weight"] = _fuse_qkv(q, k, v, cfg)
            out[f"{h}.attention.dense.weight"] = sd[f"{b}.attn.proj.weight"]
            out[f"{h}.mlp.dense_h_to_4h.weight"] = sd[f"{b}.mlp.fc_in.weight"]
            out[f"{h}.mlp.dense_4h_to_h.weight"] = sd[f"{b}.mlp.fc_out.weight"]
            # GPT-NeoX's MLP always has biases: a bias-free model exports exact zeros
            out[f"{h}.mlp.dense_h_to_4h.bias"] = (sd[f"{b}.mlp.fc_in.bias"] if cfg.bias
                                                   else torch.zeros(cfg.d_ff))
            out[f"{h}.mlp.dense_4h_to_h.bias"] = (sd[f"{b}.mlp.fc_out.bias"] if cfg.bias
                                                   else torch.zeros(cfg.d_model))
            if cfg.bias:
                out[f"{h}.attention.query_key_value.bias"] = _fuse_qkv(qb, kb, vb, cfg)
                out[f"{h}.attention.dense.bias"] = sd[f"{b}.attn.proj.bias"]
        else:
            a, m = f"{h}.self_attn", f"{h}.mlp"
            out.update({f"{a}.q_proj.weight": q, f"{a}.k_proj.weight": k, f"{a}.v_proj.weight": v,
                        f"{a}.o_proj.weight": sd[f"{b}.attn.proj.weight"]})
            fc_in = sd[f"{b}.mlp.fc_in.weight"]
            out.update({f"{m}.gate_proj.weight": fc_in[0::2], f"{m}.up_proj.weight": fc_in[1::2],
                        f"{m}.down_proj.weight": sd[f"{b}.mlp.fc_out.weight"]})
            if cfg.bias:
                fb = sd[f"{b}.mlp.fc_in.bias"]
                out.update({f"{a}.q_proj.bias": qb, f"{a}.k_proj.bias": kb, f"{a}.v_proj.bias": vb,
                            f"{a}.o_proj.bias": sd[f"{b}.attn.proj.bias"], f"{m}.gate_proj.bias": fb[0::2],
                            f"{m}.up_proj.bias": fb[1::2], f"{m}.down_proj.bias": sd[f"{b}.mlp.fc_out.bias"]})
    out[f"{base}.{'final_layer_norm' if neox else 'norm'}.weight"] = sd["norm_f.norm.weight"]
    if neox:
        out[f"{base}.final_layer_norm.bias"] = sd["norm_f.norm.bias"]
    if not cfg.tied_embeddings:
        out["lm_head.weight"] = sd["head.proj.weight"][:vocab]
    return {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------ HF -> neox
def model_section(hf: dict, name: str) -> Tuple[str, dict]:
    """(architecture, the neox `model:` config in conf/model style) of an HF config.json; ConfigError on
    what neox lacks. `bias` is read off the config; `import_bias` refines it from the weights."""
    archs = hf.get("architectures") or []
    arch = archs[0] if len(archs) == 1 else None
    if arch not in ARCHITECTURES:
        raise ConfigError(f"architectures={archs} is not supported; neox imports {' or '.join(ARCHITECTURES)}")
    neox = arch == NEOX_ARCH
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    hd = d // heads
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{arch} with rope scaling (rope_type={rope_type}) is not supported; neox's rotary has no "
                          "scaling")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))))
    act = hf.get("hidden_act", "gelu" if neox else "silu")
    want_act = "gelu" if neox else "silu"
    if act != want_act:
        raise ConfigError(f"{arch} with hidden_act={act} is not supported; neox's {'gelu' if neox else 'swiglu'} "
                          f"MLP computes {want_act}")
    if neox:
        pct = float(rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
        dims = int(hd * pct)
        if dims % 2 or dims < 2:
            raise ConfigError(f"{arch} rotates {dims} dims per head (partial_rotary_factor={pct}); neox needs an even "
                              "number, at least 2")
        kv = heads
    else:
        if hf.get("head_dim") not in (None, hd):
            raise ConfigError(f"{arch} with head_dim={hf['head_dim']} != hidden_size/num_attention_heads={hd} is not "
                              "supported")
        if int(hf.get("pretraining_tp") or 1) != 1:
            raise ConfigError(f"{arch} with pretraining_tp={hf['pretraining_tp']} is not supported")
        pct, kv = 1.0, int(hf.get("num_key_value_heads") or heads)
    attention_bias, mlp_bias = hf_biases(hf, arch)
    return arch, {
        "name": name, "n_layers": int(hf["num_hidden_layers"]), "d_model": d, "n_heads": heads, "n_kv_heads": kv,
        "d_ff": int(hf["intermediate_size"]), "seq_len": int(hf.get("max_position_embeddings", 2048)),
        # the largest power-of-two multiple (up to 128) that adds no padding: the HF rows are kept as they are
        "vocab_size": int(hf["vocab_size"]), "vocab_multiple": math.gcd(int(hf["vocab_size"]), 128),
        "position": "rotary", "rotary_pct": pct,
        "rotary_base": theta, "rotary_interleaved": False,
        "parallel_residual": bool(hf.get("use_parallel_residual", True)) if neox else False,
        "norm": "layernorm" if neox else "rmsnorm",
        "norm_eps": float(hf.get("layer_norm_eps", 1e-5) if neox else hf.get("rms_norm_eps", 1e-6)),
        "mlp": "gelu" if neox else "swiglu", "tied_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "bias": attention_bias or (mlp_bias and not neox), "dropout": 0.0, "attn_dropout": 0.0,
    }


def hf_biases(hf: dict, arch: str) -> Tuple[bool, bool]:
    """(attention biases, MLP biases) of an HF config: GPT-NeoX's MLP always has them."""
    if arch == NEOX_ARCH:
        return bool(hf.get("attention_bias", True)), True
    return bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))


def import_bias(section: dict, arch: str, hf_sd: State) -> bool:
    """neox's single bias switch for an HF model: on where any bias is learned. GPT-NeoX's MLP biases count
    only when non-zero (a bias-free neox model exports them as zeros), so such a model comes back bias-free."""
    if section["bias"] or arch != NEOX_ARCH:
        return section["bias"]
    return any(v.any() for k, v in hf_sd.items() if k.endswith(("dense_h_to_4h.bias", "dense_4h_to_h.bias")))


def expected_hf_shapes(cfg: GPTConfig, vocab: int, arch: str, attention_bias: bool, mlp_bias: bool) -> Dict[str, tuple]:
    """Every weight an HF directory of this shape must hold, with its shape (lm_head only when untied)."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    neox = arch == NEOX_ARCH
    base = "gpt_neox" if neox else "model"
    out = {f"{base}.{'embed_in' if neox else 'embed_tokens'}.weight": (vocab, d)}
    for i in range(cfg.n_layers):
        h = f"{base}.layers.{i}"
        out.update({f"{h}.input_layernorm.weight": (d,), f"{h}.post_attention_layernorm.weight": (d,)})
        if neox:
            out.update({f"{h}.input_layernorm.bias": (d,), f"{h}.post_attention_layernorm.bias": (d,),
                        f"{h}.attention.query_key_value.weight": (3 * d, d), f"{h}.attention.dense.weight": (d, d),
                        f"{h}.mlp.dense_h_to_4h.weight": (f, d), f"{h}.mlp.dense_h_to_4h.bias": (f,),
                        f"{h}.mlp.dense_4h_to_h.weight": (d, f), f"{h}.mlp.dense_4h_to_h.bias": (d,)})
            if attention_bias:
                out.update({f"{h}.attention.query_key_value.bias": (3 * d,), f"{h}.attention.dense.bias": (d,)})
        else:
            a, m = f"{h}.self_attn", f"{h}.mlp"
            out.update({f"{a}.q_proj.weight": (q, d), f"{a}.k_proj.weight": (kv, d), f"{a}.v_proj.weight": (kv, d),
                        f"{a}.o_proj.weight": (d, q), f"{m}.gate_proj.weight": (f, d), f"{m}.up_proj.weight": (f, d),
                        f"{m}.down_proj.weight": (d, f)})
            if attention_bias:
                out.update({f"{a}.q_proj.bias": (q,), f"{a}.k_proj.bias": (kv,), f"{a}.v_proj.bias": (kv,),
                            f"{a}.o_proj.bias": (d,)})
            if mlp_bias:
                out.update({f"{m}.gate_proj.bias": (f,), f"{m}.up_proj.bias": (f,), f"{m}.down_proj.bias": (d,)})
    out[f"{base}.{'final_layer_norm' if neox else 'norm'}.weight"] = (d,)
    if neox:
        out[f"{base}.final_layer_norm.bias"] = (d,)
    if not cfg.tied_embeddings:
        out["lm_head.weight"] = (vocab, d)
    return out


def check_hf_state(hf_sd: State, expected: Dict[str, tuple], where: str) -> State:
    """The HF weights under current names (a legacy `embed_out` is GPT-NeoX's lm_head), checked against
    `expected`: CheckpointError naming a missing, misshapen or unknown weight."""
    sd = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in hf_sd.items()
          if not k.endswith(_IGNORED_SUFFIXES)}
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: weight {missing[0]} is missing{more}; the directory does not hold the "
                              "model its config.json describes")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"{where}: weight {k} has shape {tuple(sd[k].shape)}, config.json implies "
                                  f"{tuple(shape)}")
    unknown = sorted(set(sd) - set(expected) - {"lm_head.weight"})
    if unknown:
        raise CheckpointError(f"{where}: unexpected weight {unknown[0]} (a feature neox does not import)")
    return sd


def from_hf(cfg: GPTConfig, hf_sd: State, arch: str) -> State:
    """HF state dict (checked, fp32) -> neox GPT state dict; the vocab padded to cfg.vocab_size with zero rows."""
    neox = arch == NEOX_ARCH
    base = "gpt_neox" if neox else "model"

    def padded(w: torch.Tensor) -> torch.Tensor:
        extra = cfg.vocab_size - w.shape[0]
        return w if extra == 0 else torch.cat([w, w.new_zeros(extra, w.shape[1])])

    def bias(key: str, n: int) -> torch.Tensor:
        return hf_sd[key] if key in hf_sd else torch.zeros(n)

    sd: State = {"embed.tok.weight": padded(hf_sd[f"{base}.{'embed_in' if neox else 'embed_tokens'}.weight"])}
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}", f"{base}.layers.{i}"
        sd[f"{b}.ln_attn.weight"] = hf_sd[f"{h}.input_layernorm.weight"]
        if neox:
            sd[f"{b}.ln_attn.bias"] = hf_sd[f"{h}.input_layernorm.bias"]
            sd[f"{b}.attn.qkv.weight"] = hf_sd[f"{h}.attention.query_key_value.weight"]
            sd[f"{b}.attn.proj.weight"] = hf_sd[f"{h}.attention.dense.weight"]
            sd[f"{b}.ln_mlp.weight"] = hf_sd[f"{h}.post_attention_layernorm.weight"]
            sd[f"{b}.ln_mlp.bias"] = hf_sd[f"{h}.post_attention_layernorm.bias"]
            sd[f"{b}.mlp.fc_in.weight"] = hf_sd[f"{h}.mlp.dense_h_to_4h.weight"]
            sd[f"{b}.mlp.fc_out.weight"] = hf_sd[f"{h}.mlp.dense_4h_to_h.weight"]
            if cfg.bias:
                sd[f"{b}.attn.qkv.bias"] = bias(f"{h}.attention.query_key_value.bias", 3 * cfg.d_model)
                sd[f"{b}.attn.proj.bias"] = bias(f"{h}.attention.dense.bias", cfg.d_model)
                sd[f"{b}.mlp.fc_in.bias"] = hf_sd[f"{h}.mlp.dense_h_to_4h.bias"]
                sd[f"{b}.mlp.fc_out.bias"] = hf_sd[f"{h}.mlp.dense_4h_to_h.bias"]
        else:
            a, m = f"{h}.self_attn", f"{h}.mlp"
            sd[f"{b}.attn.qkv.weight"] = _fuse_qkv(hf_sd[f"{a}.q_proj.weight"], hf_sd[f"{a}.k_proj.weight"],
                                                   hf_sd[f"{a}.v_proj.weight"], cfg)
            sd[f"{b}.attn.proj.weight"] = hf_sd[f"{a}.o_proj.weight"]
            sd[f"{b}.ln_mlp.weight"] = hf_sd[f"{h}.post_attention_layernorm.weight"]
            sd[f"{b}.mlp.fc_in.weight"] = _interleave(hf_sd[f"{m}.gate_proj.weight"], hf_sd[f"{m}.up_proj.weight"])
            sd[f"{b}.mlp.fc_out.weight"] = hf_sd[f"{m}.down_proj.weight"]
            if cfg.bias:
                q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_model, cfg.d_ff
                sd[f"{b}.attn.qkv.bias"] = _fuse_qkv(bias(f"{a}.q_proj.bias", q), bias(f"{a}.k_proj.bias", kv),
                                                     bias(f"{a}.v_proj.bias", kv), cfg)
                sd[f"{b}.attn.proj.bias"] = bias(f"{a}.o_proj.bias", d)
                sd[f"{b}.mlp.fc_in.bias"] = _interleave(bias(f"{m}.gate_proj.bias", f), bias(f"{m}.up_proj.bias", f))
                sd[f"{b}.mlp.fc_out.bias"] = bias(f"{m}.down_proj.bias", d)
    sd["norm_f.norm.weight"] = hf_sd[f"{base}.{'final_layer_norm' if neox else 'norm'}.weight"]
    if neox:
        sd["norm_f.norm.bias"] = hf_sd[f"{base}.final_layer_norm.bias"]
    if not cfg.tied_embeddings:
        sd["head.proj.weight"] = padded(hf_sd["lm_head.weight"])
    return {k: v.float().contiguous() for k, v in sd.items()}


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(gate, up) row pairs, neox's SwiGLU fc_in layout."""
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])
