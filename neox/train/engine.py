"""The DeepSpeed engine: its config from the run plan, torch's AdamW, and the lr schedule."""
from __future__ import annotations

from typing import Any, Optional

import torch

from neox.config.plan import RunPlan
from neox.config.schema import OptimConfig
from neox.kernels.linear import accumulate_in_gemm
from neox.train.fused_step import install_fused_step
from neox.train.grad_clip import install_grad_clipping
from neox.train.guards import SkipNonFiniteAdamW
from neox.train.schedule import lr_multiplier


def deepspeed_config(plan: RunPlan) -> dict:
    parallel = plan.config.parallelism
    zero = parallel.zero_stage
    bucket = int(parallel.zero_bucket_size)
    config = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": plan.config.optim.grad_clip,
        "zero_optimization": {"stage": zero, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,  # neox logs its own metrics
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device in every forward and every step() call, i.e.
        # twice per micro-batch: the host then never runs ahead of the GPU, which idles while the next
        # forward is launched (17 ms of a 1.06 s 1.4B step on an H200). neox times its own log windows.
        "timers": {"throughput": {"enabled": False}},
    }
    if zero == 3:
        config["zero_optimization"].update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=0)
    if plan.precision in ("bf16", "fp8"):  # fp8: bf16 everywhere but the linear matmuls (neox.model.fp8)
        config["bf16"] = {"enabled": True}
    elif plan.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    if plan.pp > 1:  # refuses ZeRO-2/3 and bf16+ZeRO-0; adds the `pipeline` section
        from neox.parallel.pipeline import pipeline_deepspeed_config

        config = pipeline_deepspeed_config(config, parallel.sequence_parallel)
    return config


def optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW (fused on GPU; no JIT-built DeepSpeed optimizer) that skips non-finite steps.
    Biases and norms get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return SkipNonFiniteAdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                              fused=device.type == "cuda")


def lr_scheduler(opt: torch.optim.Optimizer, o: OptimConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule over a run of `steps` (train.steps), decaying over optim.decay_steps when set."""
    decay_steps = o.decay_steps or steps
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lr_multiplier(o.warmup_steps, decay_steps, o.decay, o.min_lr / o.lr))


def undo_state_init_step(engine: Any) -> bool:
    """Make a fresh bf16/fp16 ZeRO-0 engine's first step AdamW's first step.

    DeepSpeed's `FP16_UnfusedOptimizer` creates the optimizer state by stepping once on zero gradients:
    every state's step counter is then 1 before training starts, so each later step uses the next step's
    bias correction (the first update is 0.73x AdamW's at betas 0.9/0.95: early training lags ZeRO-1,
    the pipeline and fp32, which start at 0), and AdamW's decoupled decay has shrunk the fp32 masters once.
    Counters back to 0 (any wrapper's: a fresh engine has taken no step), masters back to the weights they
    were copied from (exact: bf16/fp16 in fp32); the moments are zero already (zero gradients). Returns
    whether the engine had that wrapper."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    unfused = isinstance(opt, FP16_UnfusedOptimizer)
    with torch.no_grad():
        for state in getattr(getattr(opt, "optimizer", opt), "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0
        for params, masters in zip(opt.fp16_groups, opt.fp32_groups) if unfused else ():
            for p, m in zip(params, masters):
                m.copy_(p)
    return unfused


def initialize(model: torch.nn.Module, plan: RunPlan, device: torch.device, mpu: Optional[Any] = None):
    """Wrap the model in a DeepSpeed engine; returns (engine, optimizer, scheduler).
    A bf16/fp8 ZeRO-0 engine gets `neox.train.fused_step`'s optimizer step (same state, fewer passes)."""
    import deepspeed

    opt = optimizer(model, plan.config.optim, device)
    sched = lr_scheduler(opt, plan.config.optim, plan.config.train.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(plan), mpu=mpu)
    undo_state_init_step(engine)
    install_grad_clipping(engine)  # ZeRO-0 fp32: a norm right under pp and tp, and kept for the metrics
    # bf16/fp8 ZeRO-0: one pass for the norm, one sync, AdamW unscales; that optimizer reads .grad after the
    # accumulation and nothing hooks it, so the linear layers may add each micro-batch's weight gradient there
    m = plan.config.model
    if plan.config.train.fused_step and install_fused_step(engine, m.kernel_ops.adamw or m.kernels):
        accumulate_in_gemm(model, m.kernel_ops.linear or m.kernels)
        if plan.dp == 1:
            # a data-parallel group of one rank: DeepSpeed would still flatten every gradient into buckets,
            # all-reduce them over that one rank and copy them back (3.5 ms of a 1.0 s 1.4B step on an H200);
            # its zero-fill of a missing gradient on the way is the fused step's own (a None grad steps as zeros)
            engine.enable_backward_allreduce = False
    return engine, opt, sched
