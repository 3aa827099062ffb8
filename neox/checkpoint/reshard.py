"""Resume under another layout: data-parallel size, ZeRO stage, tensor-parallel size or pipeline depth.

DeepSpeed loads a ZeRO-0 checkpoint at any dp by itself. It refuses ZeRO-1/2 partitions at another dp,
across a ZeRO stage change it either fails or silently restarts Adam's moments, and it has no notion of
our tensor-parallel shards or of a different pipeline depth. neox instead goes through one
layout-free form, the *full training state*:

    {GPT parameter name: {"param": fp32, "exp_avg": fp32, "exp_avg_sq": fp32}}, the optimizer step

with names and shapes of `neox.model.gpt.GPT` (tp=1, pp=1, unpartitioned).

Reading (`full_state`): every model-parallel file set of the checkpoint is one (pipeline stage,
tensor rank) shard. Its tensors come from DeepSpeed's ZeRO-1/2 partitions (merged over dp with
DeepSpeed's own zero_to_fp32 layout code) or from a ZeRO-0 file (torch AdamW state, in the order
`neox.train.engine.optimizer` groups the parameters); pipeline names (`3.attn.qkv.weight`,
`tied_modules.embed.tok.weight`) are mapped to GPT names through the layer list; tensor-parallel
shards are concatenated along each parameter's split dimension (`neox.parallel.tensor.shard_dims`).

Writing (`restore`): each rank takes its own slice of the full state (its stage's parameters, its
tensor shard) and writes it into the live optimizer: torch AdamW's state for ZeRO-0, DeepSpeed's
`safe_set_full_fp32_param` / `safe_set_full_optimizer_state` for ZeRO-1/2.

Each rank builds the whole full state (from memory-mapped files) before taking its slice, so host memory
bounds the model size this handles. ZeRO-3 on either side, and DeepSpeed's fp16/bf16 optimizer without
ZeRO, are refused in one line.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from neox.checkpoint.safe_load import safe_load
from neox.errors import CheckpointError

KEYS = ("exp_avg", "exp_avg_sq")
FullState = Dict[str, Dict[str, torch.Tensor]]
_ZERO_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_TIED_PREFIX = "tied_modules."


def optimizer_order(names_and_dims: List[Tuple[str, int]]) -> List[str]:
    """Parameter names in the order `neox.train.engine.optimizer` hands them to AdamW: matrices
    (weight decay) first, then vectors, each in module order."""
    return [n for n, d in names_and_dims if d >= 2] + [n for n, d in names_and_dims if d < 2]


def _named_dims(module: torch.nn.Module) -> List[Tuple[str, int]]:
    return [(n, p.dim()) for n, p in module.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------ the model's names
class ModelNames:
    """Names of one model shape: GPT's parameters, their tensor-parallel split dims, and, for a
    pipeline, how each stage's local parameter names map to GPT's."""

    def __init__(self, model_cfg):
        from neox.model.gpt import GPT
        from neox.parallel.pipeline import gpt_layer_names
        from neox.parallel.tensor import shard_dims

        self.cfg = model_cfg
        with torch.device("meta"):
            gpt = GPT(model_cfg)
        self.gpt = _named_dims(gpt)
        self.dims = shard_dims(gpt)
        self.layer_names = gpt_layer_names(model_cfg)

    @classmethod
    def from_config(cls, config: dict) -> "ModelNames":
        from omegaconf import OmegaConf

        from neox.config.plan import gpt_config

        return cls(gpt_config(OmegaConf.create(config["model"])))

    def gpt_name(self, local: str, specs: Optional[list] = None) -> str:
        """A parameter's GPT name from its name in a pipeline stage (identity without a pipeline)."""
        if specs is None:
            return local
        if local.startswith(_TIED_PREFIX):
            key, _, rest = local[len(_TIED_PREFIX):].partition(".")
            first = next(i for i, s in enumerate(specs) if getattr(s, "key", None) == key)
            return f"{self.layer_names[first]}.{rest}"
        idx, _, rest = local.partition(".")
        return f"{self.layer_names[int(idx)]}.{rest}"

    def stage_params(self, specs: list, lo: int, hi: int) -> List[Tuple[str, int]]:
        """(local name, dim) of a pipeline stage running layers lo..hi-1, in PipelineModule's order:
        tied modules first (registered before the numbered layers), then each layer's own."""
        tied, own, seen = [], [], set()
        for i in range(lo, hi):
            key = getattr(specs[i], "key", None)
            if key is not None and key in seen:
                continue
            with torch.device("meta"):
                layer = specs[i].build()
            prefix = f"{_TIED_PREFIX}{key}" if key is not None else str(i)
            (tied if key is not None else own).extend((f"{prefix}.{n}", d) for n, d in _named_dims(layer))
            if key is not None:
                seen.add(key)
        return tied + own


# ------------------------------------------------------------------------------------ reading
def layout_sizes(layout: Dict[str, Any]) -> Tuple[int, int]:
    """(tp, pp) of a manifest's layout; older manifests only have DeepSpeed's mp (= tp x pp under a pipeline)."""
    pp = int(layout.get("pp") or 1)
    return int(layout.get("tp") or (layout.get("mp") or 1) // pp), pp


def full_state(root: Path, config: dict, layout: Dict[str, Any],
               names: Optional[ModelNames] = None) -> Tuple[FullState, float]:
    """The full training state of a checkpoint written by `config` under `layout` (the manifest's)."""
    names = names or ModelNames.from_config(config)
    tp, pp = layout_sizes(layout)
    specs, parts = None, [0, None]
    locals_of_stage = [names.gpt]  # (local name, dim) of each stage's parameters
    if pp > 1:
        from neox.parallel.pipeline import deepspeed_layer_specs, partition_layers

        specs = deepspeed_layer_specs(names.cfg)
        parts = partition_layers(specs, pp, config["parallelism"]["pipe_partition"])
        locals_of_stage = [names.stage_params(specs, parts[s], parts[s + 1]) for s in range(pp)]
    zero_files: Dict[int, List[Tuple[int, Path]]] = {}
    for p in root.iterdir():
        if m := _ZERO_OPTIM.match(p.name):
            zero_files.setdefault(int(m.group(2)), []).append((int(m.group(1)), p))
    per_rank: List[FullState] = []  # per tensor rank: GPT name -> that rank's shard
    step = None
    for t in range(tp):
        shard: FullState = {}
        for stage in range(pp):
            mp = stage * tp + t  # DeepSpeed numbers model-parallel files pipe-major
            local = locals_of_stage[stage]
            files = [f for _, f in sorted(zero_files.get(mp, []))]
            if files:
                got, s = _from_zero12(root, files, root / f"mp_rank_{mp:02d}_model_states.pt", local)
            else:
                got, s = _from_zero0(root, mp, t, local, specs)
            step = s if step is None else step
            for name, state in got.items():
                shard.setdefault(names.gpt_name(name, specs), state)  # the tied copy of stage 0 wins
        per_rank.append(shard)
    missing = sorted({n for n, _ in names.gpt} - set(per_rank[0]))
    if missing:
        raise CheckpointError(f"{root}: no state for {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))
    full: FullState = {}
    for name, _ in names.gpt:
        d = names.dims.get(name)
        full[name] = {k: (per_rank[0][name][k] if d is None else torch.cat([r[name][k] for r in per_rank], d))
                      for k in ("param", *KEYS)}
    return full, float(step)


def _from_zero0(root: Path, mp: int, tp_rank: int, local: List[Tuple[str, int]],
                specs: Optional[list]) -> Tuple[FullState, float]:
    """One model-parallel rank of a ZeRO-0 checkpoint: torch AdamW's state by index, the weights from
    `module` (no pipeline) or from the stage's `layer_XX-model_YY` files."""
    path = root / f"mp_rank_{mp:02d}_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{root}: {path.name} is missing")
    sd = safe_load(path, mmap=True)
    opt = sd.get("optimizer")
    if opt and "fp32_groups" in opt:
        raise CheckpointError(f"{path}: saved by DeepSpeed's fp16/bf16 optimizer without ZeRO, whose state neox "
                              "cannot reshard yet; resume at the checkpoint's layout (and train with "
                              "parallelism.zero_stage=1 where you mean to reshard later)")
    if not opt or "state" not in opt:
        raise CheckpointError(f"{path}: holds no optimizer state")
    if specs is None:
        weights = sd.get("module") or {}
    else:
        weights = _layer_weights(root, tp_rank, local, specs)
    order = optimizer_order(local)
    index = [i for g in opt["param_groups"] for i in g["params"]]
    if len(index) != len(order):
        raise CheckpointError(f"{path}: the optimizer holds {len(index)} parameters, the model shard {len(order)}")
    out, step = {}, 0.0
    for name, i in zip(order, index):
        st, w = opt["state"].get(i), weights.get(name)
        if st is None and name.startswith(_TIED_PREFIX) and w is not None:
            continue  # a tied module's part that only another stage uses (no gradient here, no state)
        if st is None or w is None:
            raise CheckpointError(f"{path}: no {'optimizer state' if st is None else 'weight'} for {name} "
                                  "(saved before the first step?)")
        if st["exp_avg"].shape != w.shape:
            raise CheckpointError(f"{path}: optimizer state {i} has shape {tuple(st['exp_avg'].shape)}, "
                                  f"{name} has {tuple(w.shape)}")
        out[name] = {"param": w.float(), **{k: st[k].float() for k in KEYS}}
        step = float(st["step"])
    return out, step


def _layer_weights(root: Path, tp_rank: int, local: List[Tuple[str, int]], specs: list) -> Dict[str, torch.Tensor]:
    """A pipeline stage's weights under its local names, from DeepSpeed's per-layer files."""
    out: Dict[str, torch.Tensor] = {}
    for name, _ in local:
        if name.startswith(_TIED_PREFIX):
            key, _, rest = name[len(_TIED_PREFIX):].partition(".")
            idx = next(i for i, s in enumerate(specs) if getattr(s, "key", None) == key)
        else:
            idx_s, _, rest = name.partition(".")
            idx = int(idx_s)
        path = root / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt"
        if not path.is_file():
            raise CheckpointError(f"{root}: {path.name} is missing")
        w = safe_load(path, mmap=True).get(rest)
        if w is None:
            raise CheckpointError(f"{path}: has no {rest}")
        out[name] = w
    return out


def _from_zero12(root: Path, optim_files: List[Path], model_file: Path,
                 local: List[Tuple[str, int]]) -> Tuple[FullState, float]:
    """One model-parallel rank of a ZeRO-1/2 checkpoint: its dp partitions merged."""
    from deepspeed.utils import zero_to_fp32 as z

    sds = [safe_load(f)["optimizer_state_dict"] for f in optim_files]
    stage = int(sds[0].get("zero_stage", 1))  # DeepSpeed's bf16 optimizer writes ZeRO-1's layout, unlabelled
    if stage > 2:
        raise CheckpointError(f"{root}: resharding a ZeRO-3 checkpoint is not supported yet; resume at the "
                              "same layout and ZeRO stage")
    world = sds[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if world != len(sds):
        raise CheckpointError(f"{root}: {len(sds)} optimizer partition files of {model_file.name} for a dp of {world}")
    if not model_file.is_file():
        raise CheckpointError(f"{root}: {model_file.name} is missing")
    ms = safe_load(model_file, mmap=True)
    # what DeepSpeed's zero_to_fp32.parse_model_states reads, without its weights_only=False load (and a
    # pipeline stage's file has no `module`: its weights are in the layer files, its buffers nowhere)
    model_states = [z.zero_model_state(buffers={}, param_shapes=ms["param_shapes"],
                                       shared_params=[list(kv) for kv in (ms.get("shared_params") or {}).items()],
                                       ds_version=ms.get("ds_version"), frozen_param_shapes=None,
                                       frozen_param_fragments=None)]
    saved = [n for shapes in model_states[0].param_shapes for n in shapes]
    if sorted(saved) != sorted(n for n, _ in local):
        extra = sorted(set(saved) ^ {n for n, _ in local})
        raise CheckpointError(f"{model_file}: its parameters do not match the model of the saved config "
                              f"({extra[0]}{' ...' if len(extra) > 1 else ''})")
    paddings = sds[0].get("param_alignment_paddings")

    def merge(flat_groups):
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per call
            return z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, model_states, False, paddings)

    params = merge([sd["single_partition_of_fp32_groups"] for sd in sds])
    n_groups = len(sds[0]["single_partition_of_fp32_groups"])
    moments = {k: merge([[sd["base_optimizer_state"]["state"][g][k] for g in range(n_groups)] for sd in sds])
               for k in KEYS}
    step = float(sds[0]["base_optimizer_state"]["state"][0]["step"])
    out = {n: {"param": params[n].float(), **{k: moments[k][n].float() for k in KEYS}} for n in saved}
    return out, step


# ------------------------------------------------------------------------------------ writing
def tp_coords(engine) -> Tuple[int, int]:
    """(tensor rank, tensor size) of this rank in a live engine."""
    grid = getattr(engine, "grid", None)  # a PipelineEngine
    if grid is not None:
        return grid.get_slice_parallel_rank(), grid.get_slice_parallel_world_size()
    mpu = getattr(engine, "mpu", None)
    if mpu is not None:
        return mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()
    return 0, 1


def local_view(engine, full: FullState, names: ModelNames) -> FullState:
    """This rank's slice of a full state, under the live module's parameter names."""
    tp_rank, tp_size = tp_coords(engine)
    specs = getattr(engine.module, "_layer_specs", None)
    out: FullState = {}
    for local, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        name = names.gpt_name(local, specs)
        if name not in full:
            raise CheckpointError(f"the checkpoint has no state for {name} (this rank's {local})")
        d = names.dims.get(name)
        state = full[name]
        if d is not None:
            if state["param"].shape[d] % tp_size:
                raise CheckpointError(f"{name}: dim {d} of size {state['param'].shape[d]} does not split into "
                                      f"tp={tp_size}")
            state = {k: v.chunk(tp_size, dim=d)[tp_rank] for k, v in state.items()}
        if state["param"].shape != p.shape:
            raise CheckpointError(f"{name}: the checkpoint's shard has shape {tuple(state['param'].shape)}, this "
                                  f"rank's parameter {tuple(p.shape)}")
        out[local] = state
    return out


def restore(engine, state: FullState, step: float) -> None:
    """Write this rank's slice of a training state (keyed by the live module's names) into a live
    engine: weights, fp32 master weights and Adam's moments, at any dp, ZeRO-0/1/2."""
    stage = int(engine.zero_optimization_stage() or 0)
    lr_from_schedule(engine)
    named = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    missing = sorted(set(named) - set(state))
    if missing:
        raise CheckpointError(f"the checkpoint has no state for {missing[0]} (and {len(missing) - 1} more)")
    if stage == 0 and isinstance(engine.optimizer, torch.optim.Optimizer):  # torch's AdamW itself
        opt = engine.optimizer
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state[n]["param"].to(p.dtype))
                opt.state[p] = {"step": torch.tensor(step), **{k: state[n][k].to(p.device).clone() for k in KEYS}}
        return
    if stage > 2:
        raise CheckpointError("resharding into ZeRO-3 is not supported yet; resume with the checkpoint's ZeRO stage")
    if stage == 0 and not hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        raise CheckpointError(f"resharding into DeepSpeed's {type(engine.optimizer).__name__} (fp16/bf16 without "
                              "ZeRO) is not supported yet; resume with parallelism.zero_stage=1")
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = engine.optimizer.optimizer
    # torch AdamW creates its state at the first step; create it now (zeros, then overwritten below),
    # so that DeepSpeed can link each parameter to its fragment of the flat partition's state
    for group in base.param_groups:
        for flat in group["params"]:
            st = base.state[flat]
            st["step"] = torch.tensor(step, dtype=torch.float32)
            for k in KEYS:
                st.setdefault(k, torch.zeros_like(flat, memory_format=torch.preserve_format))
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    with torch.no_grad():
        for n, p in named.items():
            safe_set_full_fp32_param(p, state[n]["param"].to(p.device).contiguous())
            for k in KEYS:
                safe_set_full_optimizer_state(p, state[n][k].to(p.device).contiguous(), k)
            p.copy_(state[n]["param"].to(p.dtype))


def lr_from_schedule(engine) -> None:
    """Without the optimizer's state_dict, its groups still hold the lr of step 0: the loaded
    schedule's current lr is what the next step must use."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None or not hasattr(sched, "get_last_lr"):
        return
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr


# the engine-level counters DeepSpeed keeps in every mp_rank_XX_model_states.pt
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def load_across_layouts(engine, root: Path, config: dict, layout: Dict[str, Any],
                        say: Callable[[str], None] = lambda msg: None) -> None:
    """Resume `engine` from a checkpoint of another tensor/pipeline layout, without DeepSpeed's
    `load_checkpoint` (which only knows its own file layout): the full state, this rank's slice of
    it, then the lr schedule and the engine's step counters."""
    names = ModelNames.from_config(config)
    full, step = full_state(root, config, layout, names)
    first = safe_load(root / "mp_rank_00_model_states.pt", mmap=True)
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and first.get("lr_scheduler") is not None:
        sched.load_state_dict(first["lr_scheduler"])
    for key in ENGINE_COUNTERS:
        if key in first:
            setattr(engine, key, first[key])
    restore(engine, local_view(engine, full, names), step)
    say(f"loaded the full state of {len(full)} tensors at optimizer step {int(step)} into this layout")
