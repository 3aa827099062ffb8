"""What the planner estimates: one model under one concrete layout, and where its parameters sit.

`Parallelism` is how a run splits the model and its optimizer (tp, pp, dp, the ZeRO stage, the
pipeline's partition), which checkpoints record too (`neox.parallel.model_layout`). `Candidate` adds
what else a run decides that changes memory or time: the micro-batch and accumulation, activation
checkpointing and sequence parallelism. `stage_params` counts the parameters of each pipeline stage from the model's
shape as `neox.model.gpt` builds it and `neox.parallel.pipeline.partition_layers` splits it (the same
DeepSpeed partition arithmetic, on counts computed here instead of modules built on the meta device).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, List, Mapping, Tuple

from neox.model.gpt import GPTConfig

DEFAULT_PARTITION = "compute"  # parallelism.pipe_partition's default in neox.config.schema


@dataclass(frozen=True)
class Parallelism:
    """How a run splits the model and its optimizer over tp x pp x dp ranks."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    partition: str = DEFAULT_PARTITION  # parallelism.pipe_partition

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} zero={self.zero_stage}"

    @staticmethod
    def from_record(rec: Mapping[str, Any], partition: str = DEFAULT_PARTITION) -> "Parallelism":
        """From a manifest's `layout`. Manifests before this one lack `partition` (pass the saved
        config's) and sometimes `tp`: they hold DeepSpeed's mp, which is tp x pp under a pipeline."""
        pp = int(rec.get("pp") or 1)
        tp = int(rec.get("tp") or (rec.get("mp") or 1) // pp)
        return Parallelism(tp=tp, pp=pp, dp=int(rec.get("dp") or 1), zero_stage=int(rec.get("zero_stage") or 0),
                           partition=str(rec.get("partition") or partition))


@dataclass(frozen=True)
class Candidate(Parallelism):
    """A layout (`Parallelism`) with the batch and memory choices a run makes on top of it."""

    micro_batch: int = 1
    grad_accum: int = 1
    checkpointing: bool = False
    sequence_parallel: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    def describe(self) -> str:
        ckpt = "ckpt" if self.checkpointing else "no ckpt"
        sp = " sp" if self.sequence_parallel else ""
        return (f"tp {self.tp} pp {self.pp} dp {self.dp} ZeRO-{self.zero_stage} micro {self.micro_batch} "
                f"x accum {self.grad_accum} {ckpt}{sp}")

    def overrides(self) -> List[str]:
        """The launch.py overrides that ask for this layout."""
        return [f"parallelism.tp={self.tp}", f"parallelism.pp={self.pp}", f"parallelism.dp={self.dp}",
                f"parallelism.zero_stage={self.zero_stage}", f"train.micro_batch={self.micro_batch}",
                f"train.grad_accum={self.grad_accum}",
                f"model.activation_checkpointing={'full' if self.checkpointing else 'none'}"]


@dataclass(frozen=True)
class LayerParams:
    """One pipeline layer's parameters: split over tp, and replicated on every tp rank."""
    kind: str  # embed | block | norm | head
    sharded: int
    replicated: int

    @property
    def full(self) -> int:
        return self.sharded + self.replicated

    def local(self, tp: int) -> float:
        return self.sharded / tp + self.replicated


def layer_params(m: GPTConfig) -> List[LayerParams]:
    """The model's layers in pipeline order (embedding, blocks, final norm, head) with their parameters,
    as `neox.model.gpt.count_params` counts them and `neox.parallel.tensor.TP_PLAN` shards them."""
    d, f, hd = m.d_model, m.d_ff, m.head_dim
    b = 1 if m.bias else 0
    qkv_out = (m.n_heads + 2 * m.n_kv_heads) * hd
    f_in = f * (2 if m.mlp == "swiglu" else 1)
    norm = d * (2 if m.norm == "layernorm" else 1)
    # colwise (qkv, fc_in: weight and bias split) and rowwise (proj, fc_out: weight split, bias replicated)
    block_sharded = d * qkv_out + b * qkv_out + m.n_heads * hd * d + d * f_in + b * f_in + f * d
    block_replicated = 2 * b * d + 2 * norm
    pos = m.seq_len * d if m.position == "learned" else 0
    embed = LayerParams("embed", m.vocab_size * d, pos)
    # a tied head is the embedding again on the last stage (DeepSpeed's TiedLayerSpec builds it there)
    head = embed if m.tied_embeddings else LayerParams("head", m.vocab_size * d, 0)
    blocks = [LayerParams("block", block_sharded, block_replicated)] * m.n_layers
    return [embed, *blocks, LayerParams("norm", 0, norm), LayerParams("head", head.sharded, head.replicated)]


def layer_compute(m: GPTConfig) -> List[int]:
    """Each pipeline layer's multiply-adds per token, forward (what the `compute` partition balances):
    a block's matmul weights plus its causal attention (q k^T and the weighted sum of v: s * d over the
    mask's lower half), the head's vocab x d; the embedding lookup and the final norm count 0."""
    d, f, hd = m.d_model, m.d_ff, m.head_dim
    matmuls = d * (m.n_heads + 2 * m.n_kv_heads) * hd + m.n_heads * hd * d + d * f * (2 if m.mlp == "swiglu" else 1) + f * d
    block = matmuls + m.seq_len * d
    return [0] + [block] * m.n_layers + [0, m.vocab_size * d]


@lru_cache(maxsize=256)
def _parts(weights: Tuple[int, ...], pp: int, method: str) -> Tuple[int, ...]:
    from deepspeed.runtime import utils as ds_utils

    if method == "uniform":
        return tuple(ds_utils.partition_uniform(num_items=len(weights), num_parts=pp))
    return tuple(ds_utils.partition_balanced(weights=list(weights), num_parts=pp))


def stage_bounds(m: GPTConfig, pp: int, partition: str = DEFAULT_PARTITION) -> Tuple[int, ...]:
    """parts[s]:parts[s+1] are stage s's layers, as neox.parallel.pipeline.partition_layers splits them."""
    layers = layer_params(m)
    if pp == 1:
        return (0, len(layers))
    key = partition.lower()
    if key.startswith("type:"):
        wanted = key[len("type:"):]
        classes = {"embed": "embedding", "block": "block", "norm": "finalnorm", "head": "head"}
        weights = tuple(1 if classes[lp.kind] == wanted else 0 for lp in layers)
        return _parts(weights, pp, "parameters")
    if key == "uniform":
        return _parts(tuple([1] * len(layers)), pp, "uniform")
    if key == "compute":
        return compute_bounds(m, pp)
    return _parts(tuple(lp.full for lp in layers), pp, "parameters")


def compute_bounds(m: GPTConfig, pp: int) -> Tuple[int, ...]:
    """Stages of equal work (`layer_compute`). Where that leaves a stage without a block (a small model
    whose head outweighs its blocks), stages of equal block counts instead: each stage runs blocks."""
    parts = _parts(tuple(layer_compute(m)), pp, "parameters")
    if every_stage_has_a_block(parts):
        return parts
    return _parts(tuple([0] + [1] * m.n_layers + [0, 0]), pp, "parameters")


def every_stage_has_a_block(parts: Tuple[int, ...]) -> bool:
    # layers: 0 embedding, 1..L blocks, L+1 final norm, L+2 head
    n = parts[-1]
    return all(any(1 <= i <= n - 3 for i in range(parts[s], parts[s + 1])) for s in range(len(parts) - 1))


@dataclass(frozen=True)
class Stage:
    index: int
    layers: Tuple[LayerParams, ...]
    params: float  # on one tp rank

    @property
    def blocks(self) -> int:
        return sum(1 for lp in self.layers if lp.kind == "block")

    @property
    def has_head(self) -> bool:
        return bool(self.layers) and self.layers[-1].kind == "head"


def stages(m: GPTConfig, tp: int, pp: int, partition: str = DEFAULT_PARTITION) -> List[Stage]:
    layers = layer_params(m)
    parts = stage_bounds(m, pp, partition)
    out = []
    for s in range(pp):
        own = tuple(layers[parts[s]:parts[s + 1]])
        # a tied head is a second copy of the embedding only on another stage; on the same one it is the same
        params = own if not m.tied_embeddings or own[0].kind != "embed" or own[-1].kind != "head" else own[:-1]
        out.append(Stage(s, own, sum(lp.local(tp) for lp in params)))
    return out
