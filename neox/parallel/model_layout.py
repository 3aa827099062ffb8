"""Where every parameter of the model lives under a layout: the one map for resharding, consolidation
and conversion.

A `Parallelism` is how a run splits the model and its optimizer over ranks: tp, pp, dp, the ZeRO
stage and the pipeline's partition method. A `ModelLayout` adds the model (`GPTConfig`) and knows,
for every parameter of `neox.model.gpt.GPT`:

    name        its GPT name                          blocks.0.attn.qkv.weight
    pipe_name   its name in a pipeline stage          1.attn.qkv.weight (layer 1 = blocks.0),
                                                      tied_modules.embed.tok.weight (a tied embedding)
    layer       the pipeline layer holding it         1 (DeepSpeed's layer_01-model_XX file)
    stage       the pipeline stage of that layer      parts[s] <= layer < parts[s + 1]
    split_dim   the dimension tensor parallelism      0 (colwise), 1 (rowwise), None (replicated)
                splits (`neox.parallel.tensor.TP_PLAN`)

and the shard a tensor rank holds. Stage bounds come from `neox.parallel.pipeline.partition_layers`,
the computation the pipeline module itself runs, or from a checkpoint's record of them.

Every checkpoint's manifest records its `ModelLayout` (`record()`), so a checkpoint is read back by
what it says it is (`from_record`), never by guessing from the engine that wrote it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from neox.errors import ConfigError
from neox.model.gpt import GPT, GPTConfig, layer_specs
from neox.parallel.pipeline import gpt_layer_names
from neox.parallel.tensor import shard_dims
from neox.planner.layout import Parallelism  # the layout itself; planner and checkpoints share it

TIED_PREFIX = "tied_modules."


@dataclass(frozen=True)
class Param:
    """One parameter of GPT and where it lives (see the module docstring)."""

    name: str
    shape: Tuple[int, ...]  # full, before tensor parallelism
    split_dim: Optional[int]
    layer: int
    leaf: str  # its name inside the layer's module: name == f"{layer_names[layer]}.{leaf}"
    stage: int
    pipe_name: str


class ModelLayout:
    """Every parameter of a model under a layout; built on the meta device (no memory, no random draws)."""

    def __init__(self, cfg: GPTConfig, parallel: Parallelism = Parallelism(), parts: Optional[Sequence[int]] = None):
        self.cfg, self.parallel = cfg, parallel
        self.layer_names = gpt_layer_names(cfg)
        self._tied_keys = [spec.tied_key for spec in layer_specs(cfg)]
        n = len(self.layer_names)
        self.parts: Tuple[int, ...] = tuple(int(b) for b in (parts if parts is not None else self._partition()))
        if len(self.parts) != parallel.pp + 1 or self.parts[0] != 0 or self.parts[-1] != n:
            raise ConfigError(f"pipeline stage bounds {list(self.parts)} do not cover {n} layers in pp={parallel.pp} "
                              "stages")
        with torch.device("meta"):
            gpt = GPT(cfg)
        dims = shard_dims(gpt)
        # each layer's own parameters, in its module's order (the tied head's are the embedding's)
        self._leaves: List[List[str]] = [[leaf for leaf, _ in gpt.get_submodule(name).named_parameters()]
                                         for name in self.layer_names]
        shapes = {name: tuple(p.shape) for name, p in gpt.named_parameters()}
        found: Dict[str, Param] = {}
        self._by_local: Dict[str, str] = {}
        for i, leaves in enumerate(self._leaves):
            for leaf in leaves:
                name = f"{self.layer_names[i]}.{leaf}"
                pipe = f"{self._prefix(i)}.{leaf}"
                self._by_local[pipe] = name
                found.setdefault(name, Param(name, shapes[name], dims[name], i, leaf, self.stage_of_layer(i), pipe))
        self.params: Dict[str, Param] = {name: found[name] for name in shapes}  # in GPT's order
        self._by_local.update((name, name) for name in shapes)

    def _partition(self) -> Sequence[int]:
        if self.parallel.pp == 1:
            return 0, len(self.layer_names)
        # the pipeline module's own computation (GPTPipeline._partition_layers), on the meta device
        from neox.parallel.pipeline import deepspeed_layer_specs, partition_layers

        return partition_layers(deepspeed_layer_specs(self.cfg), self.parallel.pp, self.parallel.partition)

    def _prefix(self, layer: int) -> str:
        key = self._tied_keys[layer]
        return f"{TIED_PREFIX}{key}" if key is not None else str(layer)

    # ------------------------------------------------------------------------------------ queries
    def stage_of_layer(self, layer: int) -> int:
        return next(s for s in range(self.parallel.pp) if layer < self.parts[s + 1])

    def gpt_name(self, local: str) -> str:
        """The GPT name of a parameter named as in GPT or in a pipeline stage; ConfigError if unknown."""
        name = self._by_local.get(local)
        if name is None:
            raise ConfigError(f"{local} is no parameter of this model ({self.cfg.n_layers} layers)")
        return name

    def stage_params(self, stage: int) -> List[Tuple[str, Param]]:
        """(local name, parameter) of one stage's module, in that module's order: GPT's own without a
        pipeline; in a PipelineModule tied modules come first (registered before the numbered
        layers), then each layer's parameters. A tied module is listed once per stage holding it."""
        if self.parallel.pp == 1:
            return [(p.name, p) for p in self.params.values()]
        tied: List[Tuple[str, Param]] = []
        own: List[Tuple[str, Param]] = []
        seen = set()
        for i in range(self.parts[stage], self.parts[stage + 1]):
            key = self._tied_keys[i]
            if key in seen:
                continue
            rows = [(f"{self._prefix(i)}.{leaf}", self.params[f"{self.layer_names[i]}.{leaf}"])
                    for leaf in self._leaves[i]]
            (tied if key is not None else own).extend(rows)
            if key is not None:
                seen.add(key)
        return tied + own

    def local_shape(self, name: str) -> Tuple[int, ...]:
        """The shape one tensor rank holds."""
        p = self.params[name]
        if p.split_dim is None:
            return p.shape
        return tuple(s // self.parallel.tp if d == p.split_dim else s for d, s in enumerate(p.shape))

    # ------------------------------------------------------------------------------------ tensors
    def shard(self, name: str, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
        """Tensor rank `tp_rank`'s part of the full tensor of parameter `name` (a view)."""
        d, tp = self.params[name].split_dim, self.parallel.tp
        if d is None or tp == 1:
            return full
        if full.shape[d] % tp:
            raise ConfigError(f"{name}: dim {d} of size {full.shape[d]} does not split into tp={tp}")
        return full.chunk(tp, dim=d)[tp_rank]

    def merge(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor of parameter `name` from every tensor rank's shard, in rank order."""
        d = self.params[name].split_dim
        return shards[0] if d is None or len(shards) == 1 else torch.cat(list(shards), dim=d)

    # ------------------------------------------------------------------------------------ record
    def record(self) -> Dict[str, Any]:
        """What a checkpoint's manifest keeps: the resolved model and the layout with its stage bounds."""
        return {"model": dataclasses.asdict(self.cfg),
                "layout": {**dataclasses.asdict(self.parallel), "parts": list(self.parts)}}

    @staticmethod
    def from_record(model: Mapping[str, Any], layout: Mapping[str, Any]) -> "ModelLayout":
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        fields = {k: v for k, v in model.items() if k in known}
        fields["kernel_ops"] = tuple(tuple(pair) for pair in fields.get("kernel_ops", ()))  # JSON made lists
        return ModelLayout(GPTConfig(**fields), Parallelism.from_record(layout), layout.get("parts"))

    def describe_stages(self) -> str:
        """The stage plan, one line per stage: its layers and parameters."""
        from neox.parallel.pipeline import deepspeed_layer_specs, describe_partition

        return describe_partition(deepspeed_layer_specs(self.cfg), self.parts, self.parallel.partition, self.parallel.tp)
