"""Pipeline parallelism: the model's own `layer_specs` run as a DeepSpeed `PipelineModule`.

The model is written once (`neox.model.gpt`): a flat list of layers, embedding -> blocks -> final
norm -> head. With pp == 1 the trainer runs it as `GPT`; with pp > 1 `build_pipeline_module`
hands the same list to DeepSpeed, each stage building only its slice:

    spec (neox.model.gpt)           DeepSpeed spec
    LayerSpec(Embedding)            LayerSpec(Embedding, cfg)
    LayerSpec(Embedding, "embed")   TiedLayerSpec("embed", Embedding, cfg, tied_weight_attr="tok.weight")
    LayerSpec(Block) ...            LayerSpec(Block, cfg) ...
    LayerSpec(Head)                 LayerSpec(Head, cfg)
    LayerSpec(Embedding, "embed")   TiedLayerSpec(..., forward_fn=tied_head_forward)  (the tied head)

A tied model keeps one copy of the embedding on the first and one on the last stage; DeepSpeed
broadcasts it at start and all-reduces the tied gradient between those stages every step
(`tied_weight_attr` is a dotted attribute path: `tok.weight` is what `tied_head_forward` reads).

Weights: every stage replays the random stream of `GPT(cfg)` under the same seed (constructors,
then `init_weights`, in model order), keeping only its own layers; the others are built, moved to
the meta device and re-materialized one at a time just to consume their draws. So a pipeline
starts from exactly the weights of `GPT(cfg)`, stage by stage, without holding the whole model.
Tensor parallelism is then applied to the stage from outside, as to a plain `GPT`.

Topology: always DeepSpeed's 3-axis `PipeModelDataParallelTopology` (through `Topology.ds_topology`),
even with tp == 1, so checkpoint file names (`layer_XX-model_YY-model_states.pt`) never depend on
whether tensor parallelism is on (DeepSpeed's 2-axis topology names them differently).

DeepSpeed traps avoided here:
* activation checkpointing is the model's own (`neox.model.activation_checkpointing`: non-reentrant,
  `Block` chunks only): reentrant checkpointing of a chunk of integer tokens loses its gradients;
* bf16 with ZeRO-0 cannot `load_checkpoint` a pipeline (KeyError in BF16_Optimizer), and ZeRO-2/3
  do not support pipelines: `check_deepspeed_config` refuses both (use ZeRO-1);
* DeepSpeed's fp32 (ZeRO-0) gradient clipping computes a wrong norm for a pipeline (first stage's
  unsharded parameters only, the tied copy twice): the trainer replaces it (`neox.train.grad_clip`);
* with tp > 1 DeepSpeed slices stage-boundary activations over the TP group, which is wrong under
  sequence parallelism: `pipeline_deepspeed_config` turns that off there.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn

from neox.errors import ConfigError
from neox.model.activation_checkpointing import CHECKPOINTED_LAYERS, checkpointed
from neox.model.gpt import GPTConfig, init_weights, layer_specs, tied_head_forward
from neox.planner.layout import compute_bounds

TIED_WEIGHT_ATTR = "tok.weight"  # the tensor `tied_head_forward` reads off the Embedding
PARTITION_METHODS = "compute, uniform, parameters or type:<LayerClass> (e.g. type:Block)"


# ------------------------------------------------------------------------------------ specs
def deepspeed_layer_specs(cfg: GPTConfig) -> list:
    """`neox.model.gpt.layer_specs(cfg)` as DeepSpeed LayerSpec / TiedLayerSpec objects."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs = layer_specs(cfg)
    out = []
    for i, spec in enumerate(specs):
        if spec.tied_key is None:
            out.append(LayerSpec(spec.cls, cfg))
        elif i == 0:
            out.append(TiedLayerSpec(spec.tied_key, spec.cls, cfg, tied_weight_attr=TIED_WEIGHT_ATTR))
        else:
            out.append(TiedLayerSpec(spec.tied_key, spec.cls, cfg, forward_fn=tied_head_forward,
                                     tied_weight_attr=TIED_WEIGHT_ATTR))
    return out


def gpt_layer_names(cfg: GPTConfig) -> List[str]:
    """The `GPT` module name of each pipeline layer: parameter `x` of pipeline layer i is
    `f"{names[i]}.{x}"` in `GPT(cfg).state_dict()` (the tied head is the embedding again)."""
    names = ["embed"] + [f"blocks.{i}" for i in range(cfg.n_layers)] + ["norm_f"]
    return names + ["embed" if cfg.tied_embeddings else "head"]


def _spec_name(spec: Any) -> str:
    return spec.typename.__name__


def _is_tied_head(spec: Any) -> bool:
    return getattr(spec, "forward_fn", None) is not None


def _spec_params(spec: Any) -> int:
    """Trainable parameters of a layer, counted on the meta device (no memory, no random draws)."""
    with torch.device("meta"):
        layer = spec.build()
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ partition
def partition_layers(specs: Sequence[Any], num_stages: int, method: str) -> List[int]:
    """Stage boundaries `parts` (stage s runs layers parts[s]:parts[s+1]), as DeepSpeed computes
    them, but checked: an unknown method, or a partition that leaves a stage without layers (or,
    for `type:X`, without any X) raises ConfigError instead of building a broken pipeline."""
    from deepspeed.runtime import utils as ds_utils

    if num_stages < 1:
        raise ConfigError(f"the pipeline needs at least 1 stage, got {num_stages}")
    n = len(specs)
    key = method.lower()
    if key == "uniform":
        parts = ds_utils.partition_uniform(num_items=n, num_parts=num_stages)
    elif key == "parameters":
        parts = ds_utils.partition_balanced(weights=[_spec_params(s) for s in specs], num_parts=num_stages)
    elif key == "compute":  # the planner's rule; the specs carry the model's GPTConfig
        parts = list(compute_bounds(specs[0].module_args[0], num_stages))
    elif key.startswith("type:") and len(key) > len("type:"):
        wanted = key[len("type:"):]
        weights = [1 if _spec_name(s).lower() == wanted else 0 for s in specs]
        if not any(weights):
            kinds = ", ".join(sorted({_spec_name(s) for s in specs}))
            raise ConfigError(f"partition method {method!r} matches no layer; the layers are {kinds}")
        parts = ds_utils.partition_balanced(weights=weights, num_parts=num_stages)
        for s in range(num_stages):
            if not any(weights[parts[s]:parts[s + 1]]):
                raise ConfigError(f"partition method {method!r} leaves pipeline stage {s} of {num_stages} "
                                  f"without a {wanted!r} layer ({sum(weights)} for {num_stages} stages); "
                                  f"lower pp or use partition 'uniform'")
    else:
        raise ConfigError(f"unknown pipeline partition method {method!r}; use {PARTITION_METHODS}")
    if len(parts) != num_stages + 1 or parts[0] != 0 or parts[-1] != n:
        raise ConfigError(f"partition method {method!r} gave stage bounds {parts} for {n} layers "
                          f"and {num_stages} stages; lower pp or change the method")
    for s in range(num_stages):
        if parts[s + 1] <= parts[s]:
            raise ConfigError(f"partition method {method!r} leaves pipeline stage {s} of {num_stages} "
                              f"empty ({n} layers, bounds {parts}); lower pp or change the method")
    return list(parts)


def describe_partition(specs: Sequence[Any], parts: Sequence[int], method: str, tp: int = 1) -> str:
    """The stage plan, one line per stage: its layers and parameters."""
    num_stages = len(parts) - 1
    counts = [_spec_params(s) for s in specs]
    shard = f"; parameters before tensor parallelism (each of tp={tp} ranks holds ~1/{tp})" if tp > 1 else ""
    lines = [f"pipeline: {num_stages} stages, partition {method!r}{shard}"]
    for s in range(num_stages):
        lo, hi = parts[s], parts[s + 1]
        kinds = Counter()
        order: List[str] = []
        for spec in specs[lo:hi]:
            name = _spec_name(spec) + (" (tied head)" if _is_tied_head(spec) else "")
            if name not in kinds:
                order.append(name)
            kinds[name] += 1
        layers = ", ".join(f"{k} x{kinds[k]}" if kinds[k] > 1 else k for k in order)
        lines.append(f"  stage {s}: layers {lo}-{hi - 1} ({hi - lo}): {layers}; "
                     f"{sum(counts[lo:hi]):,} parameters")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ module
def _module_class():
    """`GPTPipeline` is defined lazily: importing deepspeed costs seconds, and pp == 1 never needs it."""
    global _GPTPipeline
    if _GPTPipeline is None:
        from deepspeed.pipe import PipelineModule

        class GPTPipeline(PipelineModule):
            """DeepSpeed's PipelineModule with our checked partition: stage bounds come from
            `partition_layers` (same arithmetic as DeepSpeed, but an empty stage is a ConfigError
            and parameters are counted on the meta device instead of building every layer)."""

            def _partition_layers(self, method: str = "parameters") -> None:
                self.parts = partition_layers(self._layer_specs, self.num_stages, method)
                stage = self._topo.get_coord(self.global_rank).pipe
                self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        _GPTPipeline = GPTPipeline
    return _GPTPipeline


_GPTPipeline = None


def _ds_topology(topology: Any) -> Any:
    """Accept our `neox.parallel.Topology` or a DeepSpeed topology with pipe/data/model axes."""
    ds_topo = getattr(topology, "ds_topology", topology)
    axes = ds_topo.get_axis_names() if hasattr(ds_topo, "get_axis_names") else []
    if sorted(axes) != ["data", "model", "pipe"]:
        raise ConfigError("build_pipeline_module needs neox.parallel.Topology (or DeepSpeed's "
                          f"PipeModelDataParallelTopology), got axes {axes}")
    return ds_topo


def _checkpoint_settings(activation_checkpointing: str) -> Dict[str, Any]:
    if activation_checkpointing == "none":
        return {"activation_checkpoint_interval": 0}
    if activation_checkpointing == "full":
        # One Block per checkpointed chunk, embedding/norm/head never, with the model's own function.
        return {"activation_checkpoint_interval": 1, "checkpointable_layers": list(CHECKPOINTED_LAYERS),
                "activation_checkpoint_func": checkpointed}
    raise ConfigError(f"activation_checkpointing={activation_checkpointing!r}: use none or full")


def _owns(module: nn.Module, idx: int) -> bool:
    return module._local_start <= idx < module._local_stop


def _local_layer(module: nn.Module, idx: int) -> nn.Module:
    spec = module._layer_specs[idx]
    key = getattr(spec, "key", None)
    return module.tied_modules[key] if key is not None else getattr(module, str(idx))


@torch.no_grad()
def init_like_gpt(module: nn.Module, cfg: GPTConfig, seed: int) -> None:
    """Give this stage's layers exactly the weights `torch.manual_seed(seed); GPT(cfg)` has.

    GPT draws random numbers in model order, first in the layer constructors, then in
    `init_weights`; we replay both passes. Layers of other stages are built (their constructors
    draw), sent to the meta device (freeing them), and re-materialized one at a time for the
    second pass, on the device they were built on: each device has its own generator, so a layer
    re-materialized elsewhere (the CPU, for a model built on the GPU) would draw from the wrong one
    and leave the later stages' weights off GPT(cfg)'s, and take a CPU's time to initialize.
    Leaves the generators where GPT(cfg) leaves them."""
    specs = module._layer_specs
    n = len(specs)
    built_order = range(n - 1) if cfg.tied_embeddings else range(n)  # a tied GPT has no head module
    needs_embed = _owns(module, 0) or (cfg.tied_embeddings and _owns(module, n - 1))
    torch.manual_seed(seed)
    device = torch.get_default_device()  # where GPT(cfg) would be built: `with torch.device(...)`
    layers = []
    for i in built_order:
        layer = specs[i].build()
        keep = _owns(module, i) or (i == 0 and needs_embed)
        layers.append((i, layer if keep else layer.to("meta"), keep))
    for i, layer, keep in layers:
        if not keep:
            layer = layer.to_empty(device=device)
        init_weights(layer, cfg)
        if keep:
            targets = [i] if _owns(module, i) else []
            if i == 0 and cfg.tied_embeddings and _owns(module, n - 1):
                targets.append(n - 1)
            for t in targets:
                _local_layer(module, t).load_state_dict(layer.state_dict())


def _mark_pipe_replicated(module: nn.Module) -> None:
    """DeepSpeed counts a tied weight once in the gradient norm through `ds_pipe_replicated`,
    set at build time; parameters created later (tensor-parallel shards) need it again."""
    for p in module.parameters():
        p.ds_pipe_replicated = False
    for key, comm in module.tied_comms.items():
        if module.global_rank != comm["ranks"][0]:
            for p in module.tied_modules[key].parameters():
                p.ds_pipe_replicated = True


def build_pipeline_module(model_cfg: GPTConfig, topology: Any, partition_method: str,
                          activation_checkpointing: str, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          seed: int, sequence_parallel: bool = False, tp_overlap: bool = False) -> nn.Module:
    """The model as a DeepSpeed `PipelineModule` over `topology` (a `neox.parallel.Topology`).

    Collective: every rank calls it with the same arguments, after `torch.distributed` is up.
    Weights equal `GPT(model_cfg)` built after `torch.manual_seed(seed)`; with tp > 1 the stage
    is then sharded by `apply_tensor_parallel` (loss_fn must then be the vocab-parallel loss).
    `loss_fn(logits, targets)` runs on the last stage. Pass the result to `deepspeed.initialize`
    with `mpu=None` (the engine takes its groups from the module's grid)."""
    ds_topo = _ds_topology(topology)
    tp = ds_topo.get_dim("model")
    module = _module_class()(
        layers=deepspeed_layer_specs(model_cfg), topology=ds_topo, loss_fn=loss_fn,
        partition_method=partition_method, **_checkpoint_settings(activation_checkpointing))
    module.cfg = model_cfg  # read by apply_tensor_parallel and stage_state_dict
    init_like_gpt(module, model_cfg, seed)
    if tp > 1:
        if not hasattr(topology, "tp_group"):
            raise ConfigError("tensor parallelism inside the pipeline needs neox.parallel.Topology "
                              "(its tp groups), not a bare DeepSpeed topology")
        from neox.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(module, topology, sequence_parallel=sequence_parallel, overlap=tp_overlap)
        module.to(next(iter(module.parameters())).device)
    _mark_pipe_replicated(module)
    with torch.no_grad():
        module._synchronize_tied_weights()
    return module


def stage_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """This stage's weights under their `GPT` names (the tied head's copy is left out when the
    embedding is also local). With tp > 1 these are this rank's shards."""
    cfg = module.cfg
    names = gpt_layer_names(cfg)
    out: Dict[str, torch.Tensor] = {}
    for i in range(module._local_start, module._local_stop):
        for k, v in _local_layer(module, i).state_dict().items():
            out.setdefault(f"{names[i]}.{k}", v)
    return out


# ------------------------------------------------------------------------------------ data
def pipeline_batches(token_batches: Iterable[torch.Tensor]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Our [micro, seq+1] token batches as the (inputs, labels) pairs PipelineEngine pulls:
    the first stage reads inputs = tokens[:, :-1], the last stage labels = tokens[:, 1:].
    Each stage of a pipeline must iterate the same batches (same dp rank, same start)."""
    for tokens in token_batches:
        yield tokens[:, :-1], tokens[:, 1:]


def pipeline_deepspeed_config(ds_config: Dict[str, Any], sequence_parallel: bool) -> Dict[str, Any]:
    """The engine config for pp > 1: checked, plus the `pipeline` section.

    With tp > 1 DeepSpeed by default sends each stage boundary's activation (and gradient) split
    into tp slices that the receiver all-gathers, which assumes the activation is replicated over
    the TP group. Under sequence parallelism each TP rank holds different tokens, so the slices
    would mix ranks' data: both partitionings are turned off there."""
    check_deepspeed_config(ds_config)
    pipeline = dict(ds_config.get("pipeline", {}))
    pipeline.update(pipe_partitioned=not sequence_parallel, grad_partitioned=not sequence_parallel)
    return {**ds_config, "pipeline": pipeline}


def check_deepspeed_config(ds_config: Dict[str, Any]) -> None:
    """Refuse DeepSpeed settings that break a pipeline engine (raise ConfigError)."""
    zero = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if zero >= 2:
        raise ConfigError(f"ZeRO-{zero} does not work with pipeline parallelism in DeepSpeed; use zero_stage=1")
    if ds_config.get("bf16", {}).get("enabled") and zero == 0:
        raise ConfigError("bf16 with ZeRO-0 under pipeline parallelism cannot resume from a checkpoint "
                          "(DeepSpeed's BF16_Optimizer fails with KeyError: 0); use zero_stage=1")
    if ds_config.get("activation_checkpointing", {}).get("cpu_checkpointing"):
        raise ConfigError("activation_checkpointing.cpu_checkpointing is broken in DeepSpeed on CPU; turn it off")
