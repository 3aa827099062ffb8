"""Where one training step's time goes: neox's real Trainer (DeepSpeed engine, model, data) in one
process on one GPU, profiled with torch.profiler over a few optimizer steps.

    python bench/profile_step.py --model 1.4B --micro 4 --accum 8 [--set train.compile=true ...] [--out DIR]
    python bench/profile_step.py --model 1.3B --gpus 2 --set parallelism=tp2     # rank 0 of a 2-GPU layout

Prints one table: GPU time per step by category (matmul, attention, norms/activations/rotary, loss,
optimizer, communication, copies/casts, other), the GPU-idle time inside the step (host gaps: Python,
launches, the engine's own bookkeeping, synchronizations), and the step's wall time. Categories come from
kernel names; `other` lists its largest kernels so nothing hides there. Then where the host gaps are: each
GPU-idle interval is put in the phase the host was in at its middle (data, forward, loss, backward, the
engine's step; the bench wraps those calls in profiler ranges) and named by the CPU op whose kernel ended
it. Every category names its largest kernels; the copies/casts and `other` kernels are also given by the CPU op
that launched them (its innermost ops and the autograd node or phase above), and every call that made the host
wait for the GPU (a synchronization, a blocking copy) is counted by where it came from. Communication kernels
run on their own streams: the table also gives the part of their time no compute kernel overlaps (what tp/dp
collectives add to the step).
With --gpus N the script starts itself on N GPUs (N CPU processes without one) through the deepspeed
launcher, every rank profiles the same steps, and rank 0 (tensor rank 0 of the first stage) writes.
Writes profile.md and a Chrome trace (trace.json) under --out.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# First match wins; matched against the kernel's name, lower-cased.
CATEGORIES = [
    ("communication", r"nccl|all_?reduce|allgather|reduce_?scatter"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)|_efficient_"),
    ("optimizer", r"multi_tensor|adam|_foreach_|fused_.*optim"),
    ("loss", r"cross_entropy|log_softmax|nll_loss|logsumexp|vocab"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|matmul|sm90_|wgmma|splitk|ampere_.*(gemm|h\d)"),
    ("norms/activations/rotary", r"layer_?norm|rms|gelu|silu|swiglu|geglu|rotary|softmax|dropout|bias"),
    ("copies/casts", r"memcpy|memset|copy|cast|to_copy|fill|cat|convert|elementwise_kernel.*(float|bfloat)"),
]


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, pat in CATEGORIES if re.search(pat, low)), "other")


def exposed_time(comm: list, compute: list) -> float:
    """Time inside the `comm` intervals that no `compute` interval covers."""
    return busy_time(comm + compute) - busy_time(compute)


def busy_time(intervals: list) -> float:
    """Union length of [start, end) intervals (kernels on several streams overlap)."""
    total, end = 0.0, -1.0
    for s, e in sorted(intervals):
        if s >= end:
            total, end = total + (e - s), e
        elif e > end:
            total, end = total + (e - end), e
    return total


PHASES = ("data", "forward", "loss", "backward", "engine step")


def phases(trainer) -> None:
    """Wrap the step's host phases in profiler ranges (this process only; the trainer is unchanged)."""
    from torch.profiler import record_function

    def wrap(owner, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def ranged(*a, **k):
            with record_function(f"phase: {label}"):
                return inner(*a, **k)
        setattr(owner, attr, ranged)

    engine = trainer.engine
    wrap(engine, "forward", "forward")
    wrap(trainer, "loss_fn", "loss")
    wrap(engine, "backward", "backward")
    wrap(engine, "step", "engine step")
    loader = trainer.loader

    def ranged_loader(*a, **k):
        it = loader(*a, **k)

        def gen():
            while True:
                with record_function("phase: data"):
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item
        return gen()
    trainer.loader = ranged_loader


def idle_gaps(cpu_events: list, gpu_intervals: list, min_gap: float = 20e-6) -> tuple:
    """(seconds per phase, seconds per (phase, CPU op that ended the gap)) of GPU-idle time."""
    ranges = sorted((e[1], e[2], e[0][len("phase: "):]) for e in cpu_events if e[0].startswith("phase: "))
    ops = sorted((e[1], e[2], e[0]) for e in cpu_events if not e[0].startswith(("phase: ", "ProfilerStep")))
    per_phase, per_op = defaultdict(float), defaultdict(float)
    merged, end = [], None
    for s, e in sorted(gpu_intervals):
        if end is not None and s - end >= min_gap:
            merged.append((end, s))
        end = e if end is None else max(end, e)
    import bisect
    op_starts = [o[0] for o in ops]
    for g0, g1 in merged:
        mid = (g0 + g1) / 2
        phase = next((name for s, e, name in reversed(ranges) if s <= mid <= e), "between phases")
        # the op being launched when the GPU started again: the latest op to start before g1
        i = bisect.bisect_right(op_starts, g1) - 1
        op = ops[i][2] if i >= 0 and ops[i][1] >= g0 else "(host code, no op)"
        per_phase[phase] += g1 - g0
        per_op[(phase, op)] += g1 - g0
    return per_phase, per_op


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
CONTEXTS = ("autograd::engine::evaluate_function: ", "phase: ")


def caller(ev, depth: int = 2) -> str:
    """Where a CPU op or runtime call came from: its `depth` innermost enclosing ops and the nearest autograd node
    (in backward) or phase range above them, e.g. 'backward: CatBackward0 / aten::cat'."""
    names, node = [], ev
    while node is not None and not node.name.startswith(CONTEXTS):
        if len(names) < depth and not node.name.startswith("cu"):  # the runtime call (cudaLaunchKernel,
            names.append(node.name)  # cuLaunchKernelEx) that the profiler may hang the kernel on: its op says more
        node = node.cpu_parent
    where = ""
    if node is not None:
        where = node.name.replace("autograd::engine::evaluate_function: ", "backward: ").replace("phase: ", "") + " / "
    return where + " < ".join(names)


def kernels_by_caller(cpu_ops: list, wanted) -> dict:
    """GPU seconds of the kernels whose name `wanted` accepts, by the CPU op that launched them (`caller`)."""
    out: dict = defaultdict(float)
    for ev in cpu_ops:
        for k in ev.kernels:
            if wanted(k.name):
                out[caller(ev)] += k.duration / 1e6
    return out


def host_syncs(cpu_ops: list) -> dict:
    """The CUDA calls that made the host wait for the GPU (synchronizations, blocking copies), by `caller` of
    the call: (count, host seconds waiting)."""
    out: dict = defaultdict(lambda: [0, 0.0])
    for ev in cpu_ops:
        if ev.name in SYNC_CALLS:
            entry = out[caller(ev.cpu_parent) if ev.cpu_parent is not None else "(no op)"]
            entry[0] += 1
            entry[1] += ev.time_range.elapsed_us() / 1e6
    return {k: tuple(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1.4B")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps before profiling")
    ap.add_argument("--steps", type=int, default=2, help="profiled optimizer steps")
    ap.add_argument("--set", action="append", default=[], help="an extra override (repeatable)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")))
    ap.add_argument("--gpus", type=int, default=1, help="ranks (GPUs; CPU processes without one) of the layout")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:  # start the ranks; each runs this script
        import subprocess

        import torch

        from neox.launch.local import free_port, physical_gpu_ids

        launcher = Path(sys.executable).with_name("deepspeed")
        # as launch.py does: the GPUs counted among the visible ones (deepspeed replaces CUDA_VISIBLE_DEVICES),
        # and the host's threads shared by the ranks
        where = (["--include", "localhost:" + ",".join(physical_gpu_ids(list(range(args.gpus)),
                                                                        os.environ.get("CUDA_VISIBLE_DEVICES")))]
                 if torch.cuda.is_available() else ["--num_gpus", str(args.gpus)])
        cmd = [str(launcher) if launcher.exists() else "deepspeed", "--no_local_rank", *where,
               "--master_port", str(free_port()), __file__, *sys.argv[1:]]
        env = {**os.environ, "NEOX_PROFILE_RUN_DIR": tempfile.mkdtemp(prefix="neox-profile-")}  # one run dir for all
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.gpus)))
        sys.exit(subprocess.run(cmd, cwd=REPO, env=env).returncode)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from neox.config.plan import make_plan
    from neox.config.resources import from_worker_env
    from neox.launch.compose import compose_config
    from neox.train import distributed
    from neox.train.worker import Trainer

    run_dir = os.environ.get("NEOX_PROFILE_RUN_DIR") or tempfile.mkdtemp(prefix="neox-profile-")
    devices = f"cluster.gpus={args.gpus}" if torch.cuda.is_available() else f"cluster.cpu_procs={args.gpus}"
    overrides = [f"model={args.model}", f"train.micro_batch={args.micro}", f"train.grad_accum={args.accum}",
                 devices, "logging.wandb=false", "logging.tensorboard=false", f"run_dir={run_dir}",
                 f"train.steps={args.warmup + args.steps + 1}", *args.set]
    cfg = compose_config(overrides)
    info = distributed.init(cfg.train.collective_timeout_s)
    plan = make_plan(cfg, from_worker_env(info.device.type))
    trainer = Trainer(plan, info)
    phases(trainer)
    batches = trainer.loader(trainer.data.train, 0)
    if not trainer.pipelined:  # as the training loop: one micro-batch fetched ahead, on the device
        from neox.train.prefetch import DeviceBatches

        batches = DeviceBatches(batches, info.device)
    for _ in range(args.warmup):
        trainer.train_step(batches)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(batches)
        sync()
        wall = (time.perf_counter() - t0) / args.steps
    if info.rank != 0:  # global rank 0: tensor rank 0 of the first stage
        distributed.shutdown()
        return
    prof.export_chrome_trace(str(args.out / "trace.json"))

    per_cat, per_kernel, intervals, cpu_events, cpu_ops = defaultdict(float), defaultdict(float), [], [], []
    comm, compute = [], []
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            cpu_events.append((ev.name, ev.time_range.start / 1e6, ev.time_range.end / 1e6))
            cpu_ops.append(ev)
            continue
        if ev.name.startswith("phase: "):  # our ranges' GPU-side copies: spans, not kernels
            continue
        dur = ev.time_range.elapsed_us() / 1e6
        per_cat[category(ev.name)] += dur
        per_kernel[ev.name] += dur
        span = (ev.time_range.start / 1e6, ev.time_range.end / 1e6)
        intervals.append(span)
        (comm if category(ev.name) == "communication" else compute).append(span)
    busy = busy_time(intervals) / args.steps
    tokens = plan.tokens_per_step
    lines = [f"{args.model}, micro {args.micro} x accum {args.accum}, {args.gpus} x {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'} (rank 0), "
             f"overrides: {' '.join(args.set) or 'none'}; per optimizer step ({tokens:,} tokens), "
             f"mean of {args.steps} profiled steps", "",
             "| part | ms per step | share of wall |", "|---|---|---|"]
    for cat, _ in CATEGORIES + [("other", "")]:
        ms = per_cat.get(cat, 0.0) / args.steps * 1e3
        lines.append(f"| {cat} | {ms:,.1f} | {ms / (wall * 1e3):.1%} |")
    idle = max(wall - busy, 0.0) * 1e3
    lines += [f"| GPU idle inside the step (host gaps) | {idle:,.1f} | {idle / (wall * 1e3):.1%} |",
              f"| **wall** | **{wall * 1e3:,.1f}** | {tokens / wall:,.0f} tok/s |", "",
              f"Communication not overlapped by any compute kernel: "
              f"{exposed_time(comm, compute) / args.steps * 1e3:,.1f} ms per step", "",
              "Largest kernels of each part, ms per step:"]
    for cat, _ in CATEGORIES + [("other", "")]:
        top = sorted(((n, t) for n, t in per_kernel.items() if category(n) == cat), key=lambda x: -x[1])[:5]
        if top:
            lines.append(f"- {cat}: " + "; ".join(f"{name[:60]} {t / args.steps * 1e3:.1f}" for name, t in top))
    per_phase, per_op = idle_gaps(cpu_events, intervals)
    lines += ["", "GPU idle (gaps of 20 us and more) by the host's phase at the gap, ms per step: " + "; ".join(
        f"{name} {t / args.steps * 1e3:.1f}" for name, t in sorted(per_phase.items(), key=lambda x: -x[1])),
              "Largest, by the CPU op whose kernel ended the gap: " + "; ".join(
        f"{ph} / {op[:50]} {t / args.steps * 1e3:.1f} ms" for (ph, op), t in
        sorted(per_op.items(), key=lambda x: -x[1])[:8])]
    for cat in ("copies/casts", "other"):  # the parts no kernel of ours names: which call made them
        top = sorted(kernels_by_caller(cpu_ops, lambda n, c=cat: category(n) == c).items(), key=lambda x: -x[1])[:8]
        if top:
            lines.append(f"{cat} by the op that launched them, ms per step: " + "; ".join(
                f"{where[:90]} {t / args.steps * 1e3:.1f}" for where, t in top))
    syncs = sorted(host_syncs(cpu_ops).items(), key=lambda x: -x[1][0])
    lines.append("Host waits for the GPU per step: " + ("; ".join(
        f"{where[:90]} {n / args.steps:g}x {t / args.steps * 1e3:.1f} ms" for where, (n, t) in syncs[:8]) or "none"))
    table = "\n".join(lines)
    print(table)
    (args.out / "profile.md").write_text(table + "\n")
    distributed.shutdown()


if __name__ == "__main__":
    main()
