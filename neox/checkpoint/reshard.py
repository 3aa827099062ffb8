"""Resume under another data-parallel size or ZeRO stage, exactly.

DeepSpeed loads a ZeRO-0 checkpoint at any dp by itself (every rank holds the whole optimizer). It
refuses ZeRO-1/2 partitions at another dp, and across a ZeRO stage change it either fails or
silently restarts Adam's moments. neox instead:

1. reads the *full* training state from the checkpoint files, per parameter name: the fp32 weight,
   Adam's `exp_avg` and `exp_avg_sq`, and the step, from a ZeRO-0 file (torch AdamW state, in the
   order neox's optimizer groups its parameters) or from ZeRO-1/2 partitions (merged with
   DeepSpeed's own zero_to_fp32 layout code);
2. lets DeepSpeed load the module weights, lr schedule and counters (`load_optimizer_states=False`);
3. writes the full state into the live optimizer: torch AdamW's state for ZeRO-0, DeepSpeed's
   `safe_set_full_fp32_param` / `safe_set_full_optimizer_state` for ZeRO-1/2, each rank taking its
   own partition.

ZeRO-3 (either side) is not handled yet and is refused in one line.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from neox.checkpoint.safe_load import safe_load
from neox.errors import CheckpointError

_ZERO_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
KEYS = ("exp_avg", "exp_avg_sq")


def optimizer_order(module: torch.nn.Module) -> List[str]:
    """Parameter names in the order `neox.train.engine.optimizer` hands them to AdamW."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


def full_state(root: Path, module: torch.nn.Module) -> Tuple[Dict[str, Dict[str, torch.Tensor]], float]:
    """name -> {"param", "exp_avg", "exp_avg_sq"} (full fp32 tensors), and the optimizer step."""
    files = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _ZERO_OPTIM.match(p.name))))
    model_file = root / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise CheckpointError(f"{root}: resharding needs mp_rank_00_model_states.pt (tp=1, no pipeline)")
    if not files:
        return _from_zero0(safe_load(model_file), module, root)
    return _from_zero12(root, [p for _, p in files], model_file)


def _from_zero0(sd: dict, module: torch.nn.Module, root: Path):
    opt = sd.get("optimizer")
    if not opt or "state" not in opt:
        raise CheckpointError(f"{root}: the model states file holds no optimizer state")
    names = optimizer_order(module)
    index = [i for g in opt["param_groups"] for i in g["params"]]
    if len(index) != len(names):
        raise CheckpointError(f"{root}: the checkpoint's optimizer has {len(index)} parameters, this model "
                              f"{len(names)}")
    out, step = {}, 0.0
    for name, i in zip(names, index):
        st = opt["state"].get(i)
        weight = sd["module"][name]
        if st is None:
            raise CheckpointError(f"{root}: no optimizer state for {name} (saved before the first step?)")
        if st["exp_avg"].shape != weight.shape:
            raise CheckpointError(f"{root}: optimizer state {i} has shape {tuple(st['exp_avg'].shape)}, "
                                  f"{name} has {tuple(weight.shape)}")
        out[name] = {"param": weight.float(), **{k: st[k].float() for k in KEYS}}
        step = float(st["step"])
    return out, step


def _from_zero12(root: Path, optim_files: List[Path], model_file: Path):
    from deepspeed.utils import zero_to_fp32 as z

    sds = [safe_load(f)["optimizer_state_dict"] for f in optim_files]
    stage = int(sds[0]["zero_stage"])
    if stage > 2:
        raise CheckpointError(f"{root}: resharding a ZeRO-3 checkpoint is not supported yet; resume at the "
                              "same dp and ZeRO stage")
    world = sds[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if world != len(sds):
        raise CheckpointError(f"{root}: {len(sds)} optimizer partition files for a dp of {world}")
    safe_load(model_file)  # refuse anything unsafe before DeepSpeed's own (weights_only=False) reader
    model_states = z.parse_model_states([str(model_file)])
    paddings = sds[0].get("param_alignment_paddings")

    def merge(flat_groups):
        return z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, model_states, False, paddings)

    params = merge([sd["single_partition_of_fp32_groups"] for sd in sds])
    n_groups = len(sds[0]["single_partition_of_fp32_groups"])
    moments = {k: merge([[sd["base_optimizer_state"]["state"][g][k] for g in range(n_groups)] for sd in sds])
               for k in KEYS}
    step = float(sds[0]["base_optimizer_state"]["state"][0]["step"])
    trainable = [n for shapes in model_states[0].param_shapes for n in shapes]
    out = {n: {"param": params[n].float(), **{k: moments[k][n].float() for k in KEYS}} for n in trainable}
    return out, step


def restore(engine, state: Dict[str, Dict[str, torch.Tensor]], step: float) -> None:
    """Write a full training state into a live engine (any dp, ZeRO-0/1/2)."""
    stage = int(engine.zero_optimization_stage() or 0)
    _lr_from_schedule(engine)
    named = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    missing = sorted(set(named) - set(state))
    if missing:
        raise CheckpointError(f"the checkpoint has no state for {missing[0]} (and {len(missing) - 1} more)")
    if stage == 0:
        opt = engine.optimizer if hasattr(engine.optimizer, "state") else engine.optimizer.optimizer
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state[n]["param"].to(p.dtype))
                opt.state[p] = {"step": torch.tensor(step), **{k: state[n][k].to(p.device).clone() for k in KEYS}}
        return
    if stage > 2:
        raise CheckpointError("resharding into ZeRO-3 is not supported yet; resume with the checkpoint's ZeRO stage")
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
            safe_set_full_fp32_param(p, state[n]["param"].to(p.device))
            for k in KEYS:
                safe_set_full_optimizer_state(p, state[n][k].to(p.device), k)
            p.copy_(state[n]["param"].to(p.dtype))


def _lr_from_schedule(engine) -> None:
    """Without the optimizer's state_dict, its groups still hold the lr of step 0: the loaded
    schedule's current lr is what the next step must use."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None or not hasattr(sched, "get_last_lr"):
        return
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr
