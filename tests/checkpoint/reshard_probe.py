"""Load a checkpoint into a one-process (dp=1) engine through CheckpointManager and compare with the
consolidated file: logits on a fixed batch, and the optimizer state. Prints one JSON line.

    python tests/checkpoint/reshard_probe.py <run_dir> <tag> <consolidated.safetensors> [zero_stage]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch


def main(run_dir: str, tag: str, consolidated: str, zero_stage: str = "") -> None:
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from neox.checkpoint import CheckpointManager
    from neox.checkpoint.files import atomic_write_text
    from neox.config.plan import gpt_config
    from neox.model.gpt import GPT
    from neox.train import distributed, engine as engine_lib
    from neox.train.worker import load_config

    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    if zero_stage:
        cfg.parallelism.zero_stage = int(zero_stage)
    info = distributed.init(60)
    assert info.world_size == 1
    model_cfg = gpt_config(cfg.model)
    torch.manual_seed(0)
    plan = SimpleNamespace(global_batch=8, micro_batch=4, grad_accum=2, precision="fp32", pp=1, tp=1, dp=1)
    engine = engine_lib.initialize(GPT(model_cfg), cfg, plan, info.device)[0]
    ckpts = Path(run_dir) / "checkpoints"
    atomic_write_text(ckpts / "latest", tag)
    client = CheckpointManager(ckpts, 3, True).load(engine, OmegaConf.to_container(cfg, resolve=True))
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    engine.eval()
    with torch.no_grad():
        logits_engine = engine(tokens)
        ref = GPT(model_cfg)
        ref.load_state_dict(load_file(consolidated), strict=True)
        ref.eval()
        logits_file = ref(tokens)
    # the saved full state (per name, from whatever layout wrote it) against the live engine's
    from neox.checkpoint.files import read_manifest
    from neox.checkpoint.reshard import full_state
    saved, saved_step = full_state(ckpts / tag, OmegaConf.to_container(cfg, resolve=True),
                                   read_manifest(ckpts / tag)["layout"])
    stage = cfg.parallelism.zero_stage
    opt_equal = True
    for name, p in engine.module.named_parameters():
        if stage == 0:
            opt = engine.optimizer if hasattr(engine.optimizer, "state") else engine.optimizer.optimizer
            live = {k: opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")}
            live["param"] = p.detach()
        else:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
            live = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            live["param"] = safe_get_full_fp32_param(p)
        opt_equal &= all(torch.equal(live[k], saved[name][k]) for k in ("param", "exp_avg", "exp_avg_sq"))
    print(json.dumps({"max_abs_logit_diff": (logits_engine - logits_file).abs().max().item(),
                      "optimizer_equal": bool(opt_equal), "saved_step": saved_step, "step": client["run_state"]["step"],
                      "lr": engine.lr_scheduler.get_last_lr()[0], "global_steps": engine.global_steps}))


if __name__ == "__main__":
    main(*sys.argv[1:])
