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
`neox.train.engine.optimizer` groups the parameters). Which parameters each file set holds, under
which names (`3.attn.qkv.weight`, `tied_modules.embed.tok.weight`), and along which dimension
tensor-parallel shards are concatenated, is the checkpoint's recorded `ModelLayout`
(`neox.parallel.model_layout`, read back by `neox.checkpoint.saved.saved_layout`).

Writing (`restore`): each rank takes its own slice of the full state (its stage's parameters, its
tensor shard, both from this run's `ModelLayout`) and writes it into the live optimizer: torch AdamW's state for ZeRO-0, DeepSpeed's
`safe_set_full_fp32_param` / `safe_set_full_optimizer_state` for ZeRO-1/2.

Each rank builds the whole full state (from memory-mapped files) before taking its slice, so host memory
bounds the model size this handles. ZeRO-3 on either side, and writing into DeepSpeed's fp16/bf16 optimizer
without ZeRO, are refused in one line (reading its checkpoints works: its fp32 masters and Adam moments).
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from neox.checkpoint import files as F
from neox.checkpoint.safe_load import safe_load
from neox.checkpoint.saved import saved_layout
from neox.errors import CheckpointError
from neox.parallel.model_layout import TIED_PREFIX, ModelLayout, Param

KEYS = ("exp_avg", "exp_avg_sq")
FullState = Dict[str, Dict[str, torch.Tensor]]
Local = List[Tuple[str, Param]]  # (name in the stage's module, the parameter), in the module's order
_ZERO_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def optimizer_order(local: Local) -> List[str]:
    """Local names in the order `neox.train.engine.optimizer` hands them to AdamW: matrices (weight
    decay) first, then vectors, each in module order."""
    return [n for n, p in local if len(p.shape) >= 2] + [n for n, p in local if len(p.shape) < 2]


# ------------------------------------------------------------------------------------ reading
def full_state(root: Path, saved: ModelLayout | None = None) -> Tuple[FullState, float]:
    """The full training state of a checkpoint written under `saved` (its ModelLayout; by default the
    one its manifest records)."""
    if saved is None:
        saved = saved_layout(root, F.read_manifest(root) or {})
    tp, pp = saved.parallel.tp, saved.parallel.pp
    stages = [saved.stage_params(s) for s in range(pp)]
    zero_files: Dict[int, List[Tuple[int, Path]]] = {}
    for p in root.iterdir():
        if m := _ZERO_OPTIM.match(p.name):
            zero_files.setdefault(int(m.group(2)), []).append((int(m.group(1)), p))
    per_rank: List[FullState] = []  # per tensor rank: GPT name -> that rank's shard
    step = None
    for t in range(tp):
        shard: FullState = {}
        for stage, local in enumerate(stages):
            mp = stage * tp + t  # DeepSpeed numbers model-parallel files pipe-major
            files = [f for _, f in sorted(zero_files.get(mp, []))]
            if files:
                got, s = _from_zero12(root, files, root / f"mp_rank_{mp:02d}_model_states.pt", local)
            else:
                got, s = _from_zero0(root, mp, t, local, pipelined=pp > 1)
            step = s if step is None else step
            for name, state in got.items():
                shard.setdefault(saved.gpt_name(name), state)  # the tied copy of stage 0 wins
        per_rank.append(shard)
    missing = [n for n in saved.params if n not in per_rank[0]]
    if missing:
        raise CheckpointError(f"{root}: no state for {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))
    full = {name: {k: saved.merge(name, [r[name][k] for r in per_rank]) for k in ("param", *KEYS)}
            for name in saved.params}
    return full, float(step)


def _from_zero0(root: Path, mp: int, tp_rank: int, local: Local, pipelined: bool) -> Tuple[FullState, float]:
    """One model-parallel rank of a ZeRO-0 checkpoint: torch AdamW's state by index, the weights from
    `module` (no pipeline) or from the stage's `layer_XX-model_YY` files."""
    path = root / f"mp_rank_{mp:02d}_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{root}: {path.name} is missing")
    sd = safe_load(path, mmap=True)
    opt = sd.get("optimizer")
    order = optimizer_order(local)
    masters = None
    if opt and "fp32_groups" in opt:
        # DeepSpeed's fp16/bf16 optimizer without ZeRO: fp32 master copies per parameter group, in our
        # optimizer's order, and torch AdamW's state over them (the module holds the 16-bit weights).
        masters = dict(zip(order, (w for group in opt["fp32_groups"] for w in group)))
        opt = opt.get("optimizer_state_dict")
    if not opt or "state" not in opt:
        raise CheckpointError(f"{path}: holds no optimizer state")
    weights = masters or (_layer_weights(root, tp_rank, local) if pipelined else (sd.get("module") or {}))
    index = [i for g in opt["param_groups"] for i in g["params"]]
    if len(index) != len(order):
        raise CheckpointError(f"{path}: the optimizer holds {len(index)} parameters, the model shard {len(order)}")
    out, step = {}, 0.0
    for name, i in zip(order, index):
        st, w = opt["state"].get(i), weights.get(name)
        if st is None and name.startswith(TIED_PREFIX) and w is not None:
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


def _layer_weights(root: Path, tp_rank: int, local: Local) -> Dict[str, torch.Tensor]:
    """A pipeline stage's weights under its local names, from DeepSpeed's per-layer files (a tied
    module is saved once, by the layer that holds it first)."""
    out: Dict[str, torch.Tensor] = {}
    for name, p in local:
        path = root / f"layer_{p.layer:02d}-model_{tp_rank:02d}-model_states.pt"
        if not path.is_file():
            raise CheckpointError(f"{root}: {path.name} is missing")
        w = safe_load(path, mmap=True).get(p.leaf)
        if w is None:
            raise CheckpointError(f"{path}: has no {p.leaf}")
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
def local_view(engine, full: FullState, layout: ModelLayout, tp_rank: int) -> FullState:
    """This rank's slice of a full state (its tensor shard of every parameter its module holds),
    under the live module's parameter names."""
    out: FullState = {}
    for local, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        name = layout.gpt_name(local)
        if name not in full:
            raise CheckpointError(f"the checkpoint has no state for {name} (this rank's {local})")
        state = {k: layout.shard(name, v, tp_rank) for k, v in full[name].items()}
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


def load_across_layouts(engine, root: Path, saved: ModelLayout, now: ModelLayout, tp_rank: int,
                        say: Callable[[str], None] = lambda msg: None) -> None:
    """Resume `engine` (this run's layout `now`, this rank at tensor rank `tp_rank`) from a checkpoint
    written under another layout (`saved`), without DeepSpeed's `load_checkpoint` (which only knows
    its own file layout): the full state, this rank's slice of it, then the lr schedule and the
    engine's step counters."""
    full, step = full_state(root, saved)
    first = safe_load(root / "mp_rank_00_model_states.pt", mmap=True)
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and first.get("lr_scheduler") is not None:
        sched.load_state_dict(first["lr_scheduler"])
    for key in ENGINE_COUNTERS:
        if key in first:
            setattr(engine, key, first[key])
    restore(engine, local_view(engine, full, now, tp_rank), step)
    say(f"loaded the full state of {len(full)} tensors at optimizer step {int(step)} into this layout")
