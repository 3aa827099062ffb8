"""What each rank runs: topology, then model, then engine, then data, then the loop.

Started by the deepspeed launcher (`python -m neox.train <run_dir>/config.pending.yaml`) or by a
Slurm task; ranks come from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
Once the run has started (checkpoint loaded, data opened), rank 0 makes the launcher's
`config.pending.yaml` the run dir's `config.yaml`: a launch refused at start leaves the old one.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from neox.checkpoint import CheckpointManager
from neox.checkpoint.background import resolve_async_save
from neox.config.plan import RunPlan, config_dict, make_plan
from neox.config.resources import from_worker_env
from neox.config.run_files import process_started
from neox.model.gpt import GPT, cross_entropy_loss
from neox.parallel import Topology, apply_tensor_parallel, make_loss_fn, seed_all
from neox.parallel.model_layout import ModelLayout, Parallelism
from neox.parallel.pipeline import build_pipeline_module, pipeline_batches
from neox.errors import TrainingError
from neox.train import distributed, engine as engine_lib, mfu
from neox.train.config_files import config_to_read, load_config, publish_config
from neox.train.failures import exit_quietly_on_interrupt, is_out_of_memory, out_of_memory_message
from neox.train.faults import Faults
from neox.train.guards import Heartbeats
from neox.train.log_window import Closed, LogWindow
from neox.train.metrics import MetricsLogger
from neox.train.plot import plot_losses
from neox.train.preempt import EXIT_REQUEUE, PreemptionWatcher
from neox.train.prefetch import DeviceBatches, to_device
from neox.train.devices import build_device, memory_gb
from neox.train.startup import StartupClock, launched_at, spawned_at



@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global samples consumed by training
    tokens: int = 0
    skipped_steps: int = 0


def run(config_path: str) -> int:
    watcher = PreemptionWatcher()  # first thing: a stop signal during startup is kept as a flag
    clock = StartupClock(process_started(), launched_at(), spawned_at())
    clock.mark("imports")
    faults = Faults.from_env()  # the training loop's test faults, read once
    path = config_to_read(config_path)
    cfg = load_config(str(path))  # the raw config ends here: everything below reads the plan
    info = distributed.init(cfg.train.collective_timeout_s)
    clock.mark("distributed")
    plan = make_plan(cfg, from_worker_env(info.device.type))  # validation and the data preflight
    clock.mark("plan")
    if plan.world_size != info.world_size:
        raise RuntimeError(f"the launcher started {info.world_size} workers for a plan of {plan.world_size}")
    trainer: Optional[Trainer] = None
    failed = True  # until fit returns: on an error, the checkpoint writer stops waiting on its peers
    try:
        trainer = Trainer(plan, info, faults=faults, clock=clock)
        if info.is_main:
            publish_config(path, plan.run_dir)
        status = trainer.fit(watcher)
        failed = False
        distributed.shutdown()  # only on success: after a failure a peer may never arrive
        return status
    except (RuntimeError, MemoryError) as exc:
        if is_out_of_memory(exc):
            step = trainer.state.step + 1 if trainer is not None else None
            raise TrainingError(out_of_memory_message(
                exc, rank=info.rank, step=step, device="GPU" if info.device.type == "cuda" else "CPU",
                micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                activation_checkpointing=plan.config.model.activation_checkpointing, tp=plan.tp, pp=plan.pp)) from exc
        if trainer is None:
            raise  # a startup failure that is not a collective's: shown as it is
        # gloo/nccl raise RuntimeError subclasses when a peer is gone
        stalled = trainer.heartbeats.stalled()
        who = (f"rank(s) {', '.join(map(str, stalled))} did not reach it" if stalled
               else "a peer rank died or hung")
        raise TrainingError(f"a collective failed at step {trainer.state.step + 1}: {who} "
                            f"(collective timeout {plan.config.train.collective_timeout_s} s); "
                            f"cause: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        if trainer is not None:  # every way out (the end, a requeue, an error) waits for the checkpoint writer
            trainer.checkpoints.close(abort=failed)


def model_layout(plan: RunPlan) -> ModelLayout:
    """Where every parameter of the run lives (stage, tensor shard): what checkpoints record and reshard by."""
    p = plan.config.parallelism
    return ModelLayout(plan.model, Parallelism(tp=plan.tp, pp=plan.pp, dp=plan.dp, zero_stage=p.zero_stage,
                                               partition=p.pipe_partition))


class Trainer:
    def __init__(self, plan: RunPlan, info: distributed.WorkerInfo, faults: Faults = Faults(),
                 clock: Optional[StartupClock] = None):
        self.plan, self.info = plan, info
        self.clock = clock or StartupClock(time.time())
        cfg = plan.config  # typed (neox.config.schema); what is derived from it is on the plan
        self.run_dir = plan.run_dir
        self.say(f"rank 0 of {info.world_size}: {info.device.type}, {plan.precision}, run dir {self.run_dir}")
        from neox import kernels

        self.say(kernels.describe(cfg.model.kernels, info.device, dict(plan.model.kernel_ops)))
        # topology: pipe x data x model groups; the data shard follows the dp rank
        self.topo = Topology.build(tp=plan.tp, pp=plan.pp, dp=plan.dp)
        self.dp_rank, self.dp_size = self.topo.dp_rank, self.topo.dp_size
        self.layout = model_layout(plan)
        seed_all(cfg.train.seed, self.topo.pp_rank)  # identical on every tp rank: same full weights
        np.random.seed(cfg.train.seed)

        # model (one layer list: a plain module, or pipeline stages), tensor parallelism applied from
        # outside, then the engine
        self.pipelined = plan.pp > 1
        ce_impl = plan.model.impl("cross_entropy")
        self.loss_fn: Callable = (make_loss_fn(self.topo.tp_group, ce_impl) if plan.tp > 1
                                  else functools.partial(cross_entropy_loss, impl=ce_impl))
        mpu = None  # a PipelineEngine takes its groups from the module's grid (same layout as topo)
        with torch.device(build_device(plan, info.device)):
            if self.pipelined:
                self.model = build_pipeline_module(plan.model, self.topo, cfg.parallelism.pipe_partition,
                                                   plan.model.activation_checkpointing, self.loss_fn, seed=cfg.train.seed,
                                                   sequence_parallel=cfg.parallelism.sequence_parallel,
                                                   tp_overlap=cfg.parallelism.tp_overlap)
                self.say(self.layout.describe_stages())
            else:
                self.model = GPT(plan.model)
                if plan.tp > 1:
                    self.model = apply_tensor_parallel(self.model, self.topo,
                                                       sequence_parallel=cfg.parallelism.sequence_parallel,
                                                       overlap=cfg.parallelism.tp_overlap)
                    mpu = self.topo.mpu()
        if cfg.train.init_from:  # weights only, before the engine copies them; a resumed run ignores it
            from neox.convert.init import load_initial_weights

            load_initial_weights(self.model, plan.model, cfg.train.init_from, self.topo.tp_rank, self.topo.tp_size,
                                 self.run_dir / "checkpoints", self.say)
        self.fp8 = None  # fp8: the layers' shared matmul, whose per-step weight copies go before each update
        if plan.precision == "fp8":  # after TP (it swaps the sharded layers), before compile and the engine
            from neox.model.fp8 import apply_fp8, caches_weights, fp8_matmul

            cache = caches_weights(cfg.parallelism.zero_stage, cfg.train.compile)
            self.say(apply_fp8(self.model, info.device, cache_weights=cache))
            self.fp8 = fp8_matmul(self.model)
        if cfg.train.compile:
            from neox.model.gpt import Block
            from neox.train.compile import compile_blocks

            compile_blocks(self.model, Block, self.say)
        self.clock.mark("model")
        self.engine, self.optimizer, self.scheduler = engine_lib.initialize(self.model, plan, info.device, mpu=mpu)
        self.clock.mark("engine")

        # data
        from neox.data import build_datasets

        evals = cfg.train.eval_batches * plan.micro_batch * self.dp_size
        self.data = build_datasets(cfg.data, seq_len=plan.seq_len,
                                   num_samples={"train": cfg.train.steps * plan.global_batch,
                                                "valid": evals, "test": evals},
                                   seed=cfg.train.seed, model_vocab_size=plan.model.vocab_size,
                                   is_builder=info.is_main, barrier=dist.barrier,
                                   progress=cfg.logging.progress and info.is_main)
        self.say(self.data.describe())
        self.clock.mark("data")

        # resume
        self.state = RunState()
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.keep_checkpoints, info.is_main,
                                             layout=self.layout, tp_rank=self.topo.tp_rank,
                                             fault=faults.checkpoint if info.rank == 0 else None,
                                             async_save=resolve_async_save(cfg.train.async_save, info.device.type),
                                             commit_timeout_s=cfg.train.collective_timeout_s)
        client = self.checkpoints.load(self.engine, current_config=config_dict(cfg))
        if client is not None:
            self.state = RunState(**client["run_state"])
            self.say(f"resumed from {self.checkpoints.loaded_tag} at step {self.state.step}")
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, enabled=info.is_main, resume_step=self.state.step,
                                     config=config_dict(cfg))
        self.heartbeats = Heartbeats(self.run_dir, info.rank)
        self.faults = faults
        self.clock.mark("resume")

    # ------------------------------------------------------------------------------------ helpers
    def say(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, flush=True)

    def mean_over_dp(self, value: torch.Tensor) -> float:
        value = value.detach().float().clone()
        dist.all_reduce(value, group=self.topo.dp_group)  # tp ranks already agree on the loss
        return value.item() / self.dp_size

    def loader(self, split, consumed: int):
        from neox.data import make_loader

        return make_loader(split, micro_batch=self.plan.micro_batch, dp_rank=self.dp_rank,
                           dp_size=self.dp_size, consumed_samples=consumed)

    def forward_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = to_device(tokens, self.info.device)
        logits = self.engine(tokens[:, :-1])
        return self.loss_fn(logits, tokens[:, 1:])

    # ------------------------------------------------------------------------------------ steps
    def train_step(self, batches) -> tuple[torch.Tensor, float]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, data wait s)."""
        self.faults.maybe_oom(self.state.step + 1, self.info.device)
        if self.pipelined:
            return self.pipeline_train_step(batches)
        total, waited = torch.zeros((), device=self.info.device), batches.wait_s
        for micro in range(self.plan.grad_accum):
            loss = self.forward_loss(batches.take())
            if self.faults.nan_at(self.state.step + 1):
                loss = loss * float("nan")
            self.engine.backward(loss)
            batches.ahead()  # the next micro-batch's data work, while the GPU runs this one
            if self.fp8 is not None and micro == self.plan.grad_accum - 1:
                self.fp8.clear()  # the weights change now: their fp8 copies are stale (and out of the step's peak)
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            total += loss.detach().float()
        return total / self.plan.grad_accum, batches.wait_s - waited

    def pipeline_train_step(self, batches) -> tuple[torch.Tensor, float]:
        """The grad_accum micro-batches flow through the stages (1F1B) in one `train_batch`; its loss
        is already the mean over micro-batches and data-parallel ranks, on every stage."""
        t0 = time.perf_counter()
        # Every stage reads the step's batches (only the first and last use them), so the loader's
        # consumed_samples is the same on all ranks.
        micro = [next(batches) for _ in range(self.plan.grad_accum)]
        wait = time.perf_counter() - t0
        loss = self.engine.train_batch(pipeline_batches(iter(micro)))
        if self.fp8 is not None:
            self.fp8.clear()  # train_batch ended with the optimizer step: the fp8 weight copies are stale
        return loss.detach().float(), wait

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.data.valid is None:
            return None
        if self.pipelined:  # mean over micro-batches and dp ranks, broadcast to every stage
            batches = self.loader(self.data.valid, 0)
            micro = [next(batches) for _ in range(self.plan.config.train.eval_batches)]
            return self.engine.eval_batch(pipeline_batches(iter(micro)), num_micro_batches=len(micro)).item()
        self.engine.eval()
        batches = self.loader(self.data.valid, 0)
        losses = [self.forward_loss(next(batches)).float() for _ in range(self.plan.config.train.eval_batches)]
        self.engine.train()
        return self.mean_over_dp(torch.stack(losses).mean())

    def save(self) -> None:
        path = self.checkpoints.save(self.engine, self.state.step, {
            "run_state": vars(self.state).copy(),
            "config": config_dict(self.plan.config),
        })
        self.say(f"{'saving' if self.checkpoints.async_save else 'saved'} checkpoint {path}")

    def report_startup(self) -> None:
        """Once, after the first step of this start: how long it took to get here, phase by phase."""
        if self.info.device.type == "cuda":
            torch.cuda.synchronize()
        self.clock.mark("first_step")
        self.say(self.clock.line())
        self.metrics.log(self.state.step, self.clock.record(), prefix="startup")

    def skip_counts(self) -> tuple:
        """(steps our optimizer skipped, steps DeepSpeed's engine skipped): one of them grows per skip."""
        return self.optimizer.skip_events, int(getattr(self.engine, "skipped_steps", 0) or 0)

    # ------------------------------------------------------------------------------------ loop
    def fit(self, watcher: Optional[PreemptionWatcher] = None) -> int:
        plan, state = self.plan, self.state
        t = plan.config.train
        batches = self.loader(self.data.train, state.consumed_samples)
        if not self.pipelined:  # (the pipeline engine takes a step's batches at once)
            batches = DeviceBatches(batches, self.info.device)
        device_name = torch.cuda.get_device_name(self.info.device) if self.info.device.type == "cuda" else None
        peak = mfu.peak_tflops(device_name, t.peak_tflops)
        if peak is None and device_name:
            self.say(mfu.unknown_peak_note(device_name))
        if state.step >= t.steps:
            self.say(f"already at step {state.step} of {t.steps}: nothing to train (raise train.steps to go on)")
        else:
            self.say(f"training steps {state.step + 1}..{t.steps}; metrics -> {self.metrics.path}")
        first_step = state.step + 1
        window = LogWindow(self.info.device, self.topo.dp_group, self.dp_size)
        pending = None  # the last log line's window, read once the next step's work is queued
        # Non-finite steps are skipped by our optimizer (ZeRO-0) or, under ZeRO-1/2 and DeepSpeed's fp16/bf16
        # optimizers, by DeepSpeed's own overflow check before ours is called (engine.skipped_steps).
        skip_counts, in_a_row = self.skip_counts(), 0
        while state.step < t.steps:
            self.faults.maybe_hang(self.info.rank, state.step + 1)
            self.heartbeats.beat(state.step + 1)  # "entered step N": a rank that never got here is named
            try:
                loss, wait = self.train_step(batches)
            except BaseException:
                if pending is not None:  # the last log line still reaches the log (best effort: the step failed)
                    with contextlib.suppress(Exception):
                        self.log_train(pending, peak)
                raise
            if pending is not None:  # the last log line's numbers: done on the GPU, this step queued behind them
                self.log_train(pending, peak)
                pending = None
            state.step += 1
            if state.step == first_step:
                self.report_startup()
                self.checkpoints.prepare(self.engine)  # async saves: their host memory, off the first save's stall
            # ZeRO calls the optimizer once per parameter group: count steps, not calls.
            counts = self.skip_counts()
            if any(now > before for now, before in zip(counts, skip_counts)):
                skip_counts = counts
                state.skipped_steps += 1
                in_a_row += 1
                self.say(f"step {state.step}: non-finite loss or gradients, step skipped "
                         f"({in_a_row} in a row, {state.skipped_steps} in all)")
                if in_a_row >= t.max_nonfinite_steps:
                    last = self.checkpoints.latest_tag()
                    raise TrainingError(
                        f"{in_a_row} non-finite steps in a row (train.max_nonfinite_steps="
                        f"{t.max_nonfinite_steps}) at step {state.step}; stopping without saving. The last good "
                        f"checkpoint is {last or 'none'}; lower optim.lr or check the data, then rerun to resume")
            else:
                in_a_row = 0
            state.consumed_samples = batches.consumed_samples
            state.tokens += plan.tokens_per_step
            window.add(loss, wait)
            evaluates = state.step % t.eval_every == 0 or state.step == t.steps
            saves = state.step % t.save_every == 0 or state.step == t.steps
            # the first step of every start is reported: it says early that training runs, and how fast
            if state.step % t.log_every == 0 or state.step == t.steps or state.step == first_step:
                pending, window = window.close(self.engine.get_global_grad_norm(), step=state.step,
                                               lr=self.scheduler.get_last_lr()[0], tokens=state.tokens,
                                               skipped_steps=state.skipped_steps)
                if evaluates or saves or state.step == first_step or self.info.device.type != "cuda":
                    self.log_train(pending, peak)  # what follows waits for the GPU anyway
                    pending = None
            if evaluates:
                val = self.evaluate()
                if val is not None:
                    self.metrics.log(state.step, {"loss": val, "ppl": math.exp(min(val, 50))}, prefix="valid")
                    self.say(f"step {state.step:>6}/{t.steps}  validation loss {val:.4f}")
            if saves:
                self.save()
            if watcher is not None and state.step < t.steps and watcher.should_stop():
                if pending is not None:
                    self.log_train(pending, peak)
                    pending = None
                if not saves:
                    self.save()  # collective: every rank agreed to stop at this step
                self.checkpoints.wait_saved()  # committed before the job ends; a failed write is an error
                # What follows (a requeue, or not) is for the launcher to say: it knows, this does not.
                self.say(f"stopping at step {state.step} ({watcher.signal_name}): checkpoint saved")
                self.metrics.close()
                return EXIT_REQUEUE
        self.finish()
        return 0

    def log_train(self, closed: Closed, peak: Optional[float]) -> None:
        """One training log line (console, metrics file, TensorBoard, W&B) for a closed window."""
        plan, steps = self.plan, self.plan.config.train.steps
        mean_loss, elapsed, grad_norm = closed.read()
        tok_s = plan.tokens_per_step * closed.steps / elapsed
        tflops = plan.flops_per_token * tok_s / plan.world_size / 1e12
        x = closed.extras
        record = {"loss": mean_loss, "lr": x["lr"], "grad_norm": grad_norm,
                  "tokens_per_s": tok_s, "tflops_per_device": tflops,
                  "mfu": tflops / peak if peak else math.nan,  # attention in full; and halved:
                  "mfu_causal": plan.flops_per_token_causal * tok_s / plan.world_size / 1e12 / peak
                  if peak else math.nan,
                  "data_wait_frac": closed.data_wait_s / elapsed, "memory_gb": memory_gb(self.info.device),
                  "memory_reserved_gb": torch.cuda.max_memory_reserved(self.info.device) / 2**30
                  if self.info.device.type == "cuda" else math.nan,  # the planner's calibration
                  "tokens": x["tokens"], "skipped_steps": x["skipped_steps"]}
        self.metrics.log(x["step"], record)
        mfu_text = f" mfu {record['mfu']:.1%} (causal {record['mfu_causal']:.1%})" if peak else ""
        self.say(f"step {x['step']:>6}/{steps}  loss {mean_loss:.4f}  lr {record['lr']:.2e}  "
                 f"grad {grad_norm:.3f}  {tok_s:,.0f} tok/s  {tflops:.2f} TFLOP/s{mfu_text}  "
                 f"data wait {record['data_wait_frac']:.1%}  mem {record['memory_gb']:.2f} GB")

    def finish(self) -> None:
        if self.info.is_main:
            from neox.data.build import unigram_entropy

            entropy = unigram_entropy([src.prefix for src in self.data.sources])
            self.metrics.log(self.state.step, {"unigram_entropy": entropy}, prefix="data")
            print(f"unigram entropy of the data: {entropy:.3f} nats/token (a context-free model's loss)", flush=True)
        self.metrics.close()
        self.checkpoints.wait_saved()  # the last save is committed before the run says it is done
        if self.info.is_main:
            png = plot_losses(self.run_dir, reference=entropy)
            print(f"done: {self.state.step} steps; loss curve {png}; checkpoints {self.checkpoints.directory}",
                  flush=True)


def main(argv: list) -> int:
    from neox.errors import NeoxError

    exit_quietly_on_interrupt()
    if len(argv) != 1:
        print("usage: python -m neox.train <run_dir>/config.yaml", file=sys.stderr)
        return 2
    try:
        return run(argv[0])
    except NeoxError as exc:
        print(f"neox: error (rank {os.environ.get('RANK', '0')}): {exc}", file=sys.stderr, flush=True)
        return 2
