"""The planner against measurement: peak memory and step time of real training runs, predicted vs measured.

    python bench/planner_calibrate.py --gpus 1 --out $OUT          # 8 layouts on one GPU   (~6-8 min)
    python bench/planner_calibrate.py --gpus 2 --out $OUT          # 7 layouts needing two GPUs (tp, pp, dp)
    python bench/planner_calibrate.py --gpus 2 --set auto --out $OUT   # parallelism=auto vs hand layouts, 1.4B/6.7B
    python bench/planner_calibrate.py --gpus 2 --set layouts --out $OUT   # issue 17: tp2/pp2/dp2 against one GPU
    python bench/planner_calibrate.py --table a.json [b.json ...]  # (CPU) the tables of measured JSONs together
    python bench/planner_calibrate.py --fit a.json [b.json ...]    # (CPU) refit calibration.py from measured JSONs

Each layout runs through neox's real path, `python launch.py ...` (DeepSpeed engine, bf16, fused kernels, the
embedded corpus), for --steps steps with a log record per step; the run is stopped (SIGINT: the ranks exit at
once) as soon as its last step is logged, so no checkpoint is written. Measured, from the run's metrics.jsonl
(rank 0: tensor rank 0 of the first pipeline stage): the peak of torch.cuda.max_memory_allocated (`memory_gb`)
and max_memory_reserved (`memory_reserved_gb`), the median step time over the steps after the first two; and
the peak of nvidia-smi's memory.used of GPU 0 while it ran (the CUDA context and NCCL on top of the reserve).
Predicted, in this process, by neox/planner for the same config on this machine's GPU (stage 0, as measured).

Writes planner_calibration_<gpus>gpu_<set>.json (every field), .md (the table) and .log (the runs' output)
to --out, and prints the table. Goals (issue 18): memory within 5%, step time within 15%.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from neox.train.metrics import read_metrics  # noqa: E402  (the repo's own reader of metrics.jsonl)
sys.path.insert(0, str(REPO / "bench"))
import runs  # noqa: E402  (bench/runs.py: start and stop a launch.py run)

GiB = 1024**3


@dataclass
class Case:
    name: str
    overrides: List[str]
    gpus: int
    group: str = "calibration"  # calibration | auto:<model> (auto's pick and the hand layouts it is held to)
    extra: Dict[str, str] = field(default_factory=dict)


def _case(name: str, model: str, gpus: int, micro: int, accum: int, *, par: str = "single", zero: int = 0,
          ckpt: bool = False, group: str = "calibration", more: tuple = ()) -> Case:
    over = [f"model={model}", f"parallelism={par}", f"parallelism.zero_stage={zero}", f"train.micro_batch={micro}",
            f"train.grad_accum={accum}", f"model.activation_checkpointing={'full' if ckpt else 'none'}",
            f"cluster.gpus={gpus}", *more]
    return Case(name, over, gpus, group)


# One GPU: 125M-6.7B, ZeRO 0-3, checkpointing off/on, micro-batch 1-16 (~40-60 s each with start-up).
ONE_GPU = [
    _case("125M z0 m16", "125M", 1, 16, 1),
    _case("350M z1 m8 ckpt", "350M", 1, 8, 2, zero=1, ckpt=True),
    _case("1.4B z0 m4", "1.4B", 1, 4, 4),
    _case("1.4B z2 m8 ckpt", "1.4B", 1, 8, 2, zero=2, ckpt=True),
    _case("1.4B z3 m2", "1.4B", 1, 2, 4, zero=3),
    _case("2.7B z1 m2", "2.7B", 1, 2, 4, zero=1),
    _case("2.7B z0 m1 ckpt", "2.7B", 1, 1, 8, ckpt=True),
    _case("6.7B z0 m1 ckpt", "6.7B", 1, 1, 2, ckpt=True),
]
# Two GPUs: tp 2, pp 2, dp 2 under ZeRO 1-3 with checkpointing, beside what the `layouts` and `auto` sets
# measure (tp2 at 1.3B and 6.7B, pp2 at 1.3B and 1.4B, dp2 under ZeRO-1 and ZeRO-3): together they span the grid.
TWO_GPUS = [
    _case("2.7B pp2 z1 m8 ckpt", "2.7B", 2, 8, 4, par="pp2", zero=1, ckpt=True),
    _case("1.4B dp2 z2 m8", "1.4B", 2, 8, 2, zero=2),
    _case("6.7B tp2 m16 ckpt", "6.7B", 2, 16, 1, par="tp2", ckpt=True),
]
# Issue 17's layouts, each held to the one-GPU run at the same micro-batch and accumulation (`extra["ref"]`):
# per-GPU tokens/s over one GPU's; for pp2 the measured bubble (1 - that) against 1F1B's (p-1)/(m+p-1).
# 1.4B dp2 and 6.7B tp2 at global batch 64 are in the `auto` set (same overrides), found there by name.
ONE_GPU_REFS = [_case("1.3B 1gpu z1 m4x8", "1.3B", 1, 4, 8, zero=1, group="layouts"),
                _case("1.4B 1gpu z1 m4x8", "1.4B", 1, 4, 8, zero=1, group="layouts")]
LAYOUTS = [_case("1.3B tp2 m4x8", "1.3B", 2, 4, 8, par="tp2", group="layouts")] + [
    _case(f"1.3B pp2 z1 m4x{m}", "1.3B", 2, 4, m, par="pp2", zero=1, group="layouts") for m in (8, 4, 16)] + [
    _case("1.3B tp2 sp m4x8", "1.3B", 2, 4, 8, par="tp2", group="layouts", more=("parallelism.sequence_parallel=true",)),
    _case("1.3B tp2 overlap m4x8", "1.3B", 2, 4, 8, par="tp2", group="layouts", more=("parallelism.tp_overlap=true",)),
    # issue 16's fp8 at 6.7B where a micro-batch of 4 fits: tp=2, bf16 against fp8 in the same call
    _case("6.7B tp2 m4x8", "6.7B", 2, 4, 8, par="tp2", group="layouts"),
    _case("6.7B tp2 fp8 m4x8", "6.7B", 2, 4, 8, par="tp2", group="layouts", more=("train.precision=fp8",)),
    # issue 17's 52% MFU at 6.7B tp2: a micro-batch of 8 fits since the fused step's fp32 gradients are chunked
    _case("6.7B tp2 m8x4", "6.7B", 2, 8, 4, par="tp2", group="layouts")]
LAYOUT_REFS = {"1.3B tp2 m4x8": "1.3B 1gpu z1 m4x8", "1.3B tp2 sp m4x8": "1.3B 1gpu z1 m4x8",
               "1.3B tp2 overlap m4x8": "1.3B 1gpu z1 m4x8", "1.3B pp2 z1 m4x4": "1.3B 1gpu z1 m4x8",
               "1.3B pp2 z1 m4x8": "1.3B 1gpu z1 m4x8", "1.3B pp2 z1 m4x16": "1.3B 1gpu z1 m4x8",
               "1.4B dp2 z1 m4": "1.4B 1gpu z1 m4x8", "6.7B tp2 m4": None, "6.7B tp2 m4x8": None,
               "6.7B tp2 fp8 m4x8": None, "6.7B tp2 m8x4": None}
# parallelism=auto on 2 GPUs against layouts chosen by hand, same global batch (64 sequences).
AUTO_BATCH = 64


def auto_cases() -> List[Case]:
    out = []
    for model in ("1.4B", "6.7B"):
        group = f"auto:{model}"
        out.append(Case(f"{model} auto", [f"model={model}", "parallelism=auto", f"train.global_batch={AUTO_BATCH}",
                                          "train.micro_batch=null", "train.grad_accum=null", "cluster.gpus=2"],
                        2, group))
        hand = {"1.4B": [("dp2 z1 m4", "single", 1, 4, False), ("tp2 m8", "tp2", 0, 8, False),
                         ("pp2 z1 m4", "pp2", 1, 4, False)],
                "6.7B": [("tp2 m4", "tp2", 0, 4, False), ("dp2 z3 m2 ckpt", "single", 3, 2, True),
                         ("pp2 z1 m2", "pp2", 1, 2, False)]}[model]
        for name, par, zero, micro, ckpt in hand:
            dp = 2 if par == "single" else 1
            out.append(_case(f"{model} {name}", model, 2, micro, AUTO_BATCH // (micro * dp), par=par, zero=zero,
                             ckpt=ckpt, group=group))
    return out


# ------------------------------------------------------------------------------------------ predict
def resolve(case: Case) -> List[str]:
    """parallelism=auto resolved here, by the planner, into the overrides of the layout it picks."""
    if "parallelism=auto" not in case.overrides:
        return case.overrides
    from neox.launch.compose import compose_config
    from neox.launch.resources import detect
    from neox.launch import planning

    cfg = compose_config(case.overrides)
    chosen = planning.resolve_auto(cfg, detect(cfg.cluster))
    p, t = chosen.parallelism, chosen.train
    layout = [f"parallelism.tp={p.tp}", f"parallelism.pp={p.pp}", f"parallelism.dp={p.dp}",
              f"parallelism.zero_stage={p.zero_stage}", f"train.micro_batch={t.micro_batch}",
              f"train.grad_accum={t.grad_accum}", f"train.global_batch={t.global_batch}",
              f"model.activation_checkpointing={chosen.model.activation_checkpointing}"]
    case.extra["auto_choice"] = " ".join(layout)
    return [o for o in case.overrides if not o.startswith(("parallelism=", "train.micro_batch", "train.grad_accum",
                                                           "train.global_batch"))] + layout


def inputs(overrides: List[str], gpu_name: Optional[str] = None, gpu_memory: Optional[int] = None) -> tuple:
    """(model, layout, gpu, ZeRO bucket, FLOPs per token) of a config, on the GPU detected here unless named."""
    from neox.config.plan import flops_per_token, gpt_config
    from neox.launch.compose import compose_config
    from neox.model.gpt import count_params
    from neox.planner.gpus import by_name, resolve as resolve_gpu
    from neox.planner.layout import Candidate

    cfg = compose_config(overrides)
    m = gpt_config(cfg.model)
    p, t = cfg.parallelism, cfg.train
    gpus = cfg.cluster.gpus or p.tp * p.pp * (p.dp or 1)
    dp = p.dp or gpus // (p.tp * p.pp)
    micro = t.micro_batch or t.global_batch // (dp * (t.grad_accum or 1))
    accum = t.grad_accum or t.global_batch // (dp * micro)
    cand = Candidate(tp=p.tp, pp=p.pp, dp=dp, zero_stage=p.zero_stage, micro_batch=micro, grad_accum=accum,
                     checkpointing=cfg.model.activation_checkpointing == "full",
                     sequence_parallel=bool(p.sequence_parallel), partition=str(p.pipe_partition))
    if gpu_name is None:
        import torch

        gpu_name = torch.cuda.get_device_name(0)
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    gpu = resolve_gpu(None, None, gpu_name, gpu_memory) if gpu_memory else by_name(gpu_name)
    return m, cand, gpu, int(p.zero_bucket_size), flops_per_token(m, count_params(m))


def numbers(m, cand, gpu, zero_bucket: int, flops: float) -> dict:
    """The planner's numbers for rank 0 (tensor rank 0 of stage 0, as measured)."""
    from neox.planner import memory, step_time
    from neox.planner.layout import stages

    mem = memory.stage_memory(m, cand, stages(m, cand.tp, cand.pp, cand.partition)[0], "bf16",
                              fused_loss=m.impl("cross_entropy") != "reference", zero_bucket=zero_bucket)
    st = step_time.estimate(m, cand, gpu, gpus_per_node=max(cand.world, 1), flops_per_token=flops)
    return {"layout": asdict(cand), "gpu": gpu.name, "gpu_memory": gpu.memory,
            "allocated_gib": mem.allocated / GiB, "reserved_gib": mem.reserved / GiB, "total_gib": mem.total / GiB,
            "terms_gib": {k: v / GiB for k, v in mem.terms.items()}, "step_extra_gib": mem.step_extra / GiB,
            "step_reuse": mem.step_reuse,
            "step_s": st.step, "tokens_per_s": st.tokens_per_s}


def predict(overrides: List[str], gpu_name: Optional[str] = None, gpu_memory: Optional[int] = None) -> dict:
    return numbers(*inputs(overrides, gpu_name, gpu_memory))


# ------------------------------------------------------------------------------------------ measure
def _smi_peak(stop: threading.Event, out: list) -> None:
    """Peak memory.used (MiB) of the run's first GPU while it goes (the CUDA context and NCCL on top of torch's)."""
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    while not stop.is_set():
        try:
            text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", first],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
            out.append(float(text.splitlines()[0]))
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            pass
        stop.wait(0.5)


def _gpu_used_gib() -> float:
    """The most memory in use on any GPU visible to this process (nvidia-smi), GiB; 0 without nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                               *(["-i", visible] if visible else [])], capture_output=True, text=True, timeout=10).stdout
        return max((float(x) for x in text.split()), default=0.0) / 1024
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0.0


def wait_idle(limit_s: float = 120.0) -> float:
    """Wait until the GPUs are free of the previous run (its ranks may still be exiting); the GiB still in use."""
    end = time.time() + limit_s
    while (used := _gpu_used_gib()) > 1.0 and time.time() < end:
        time.sleep(2)
    return used


def measure(overrides: List[str], steps: int, timeout: float, log: Path) -> dict:
    """Run launch.py on idle GPUs; stop it once step `steps` is logged; the measured peaks and step time.
    nvidia-smi's peak counts only when the GPUs were idle at the start (smi_before_gib under 1)."""
    smi_before = wait_idle()
    with tempfile.TemporaryDirectory(prefix="planner_cal_", dir=os.environ.get("TMPDIR"), ignore_cleanup_errors=True) as tmp:
        run_dir = Path(tmp) / "run"
        # train.steps beyond the last measured step: the run never reaches its end, so it never starts the
        # final checkpoint (a 6.7B one is ~94 GB) that the stop would otherwise interrupt
        cmd = [sys.executable, str(REPO / "launch.py"), *overrides, f"run_dir={run_dir}", f"train.steps={steps + 1000}",
               "train.log_every=1", "train.eval_every=1000000", "train.save_every=1000000", "train.eval_batches=1",
               "logging.wandb=false", "logging.tensorboard=false", "logging.progress=false", "plan.force=true"]
        stop, smi = threading.Event(), []
        watcher = threading.Thread(target=_smi_peak, args=(stop, smi), daemon=True)
        watcher.start()
        start = time.time()
        with open(log, "a") as out:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            with runs.running(cmd, out) as proc:  # stopped at once (no checkpoint), however this ends
                runs.wait_for(proc, lambda: any(r.get("step") == steps and "train/tokens_per_s" in r
                                                for r in read_metrics(run_dir / "metrics.jsonl")), timeout)
        stop.set()
        watcher.join()
        every = read_metrics(run_dir / "metrics.jsonl")
        records = [r for r in every if "train/tokens_per_s" in r]
        startup = next(({k: v for k, v in r.items() if k.startswith("startup/")} for r in every
                        if "startup/total_s" in r), {})
    if not records:
        return {"error": f"no training step logged in {time.time() - start:.0f} s (see {log.name})"}
    steady = [r for r in records if r["step"] > 2] or records
    tokens = statistics.median(r["train/tokens_per_s"] for r in steady)
    mfu = [r["train/mfu"] for r in steady if "train/mfu" in r]
    return {"steps_logged": len(records), "wall_s": time.time() - start, "tokens_per_s": tokens,
            "mfu": statistics.median(mfu) if mfu else None,
            "allocated_gib": max(r.get("train/memory_gb", math.nan) for r in records),
            "reserved_gib": max(r.get("train/memory_reserved_gb", math.nan) for r in records),
            "smi_used_gib": max(smi) / 1024 if smi and smi_before <= 1.0 else math.nan, "smi_before_gib": smi_before,
            "startup": startup}


# ------------------------------------------------------------------------------------------ table
def _ratio(pred: float, meas: float) -> str:
    return f"{pred / meas:.3f}" if meas and not math.isnan(meas) else "-"


def table(rows: List[dict]) -> str:
    head = ("| case | layout | alloc GiB meas / pred (x) | reserved GiB meas / pred (x) | nvidia-smi GiB / pred total "
            "| tokens/s meas / pred (x) |\n|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        m, p = r.get("measured", {}), r["predicted"]
        lay = p["layout"]
        desc = (f"tp{lay['tp']} pp{lay['pp']} dp{lay['dp']} z{lay['zero_stage']} m{lay['micro_batch']}x"
                f"{lay['grad_accum']}{' ckpt' if lay['checkpointing'] else ''}")
        if "error" in m or not m:
            lines.append(f"| {r['name']} | {desc} | {m.get('error', 'not run')} | | | |")
            continue
        lines.append(f"| {r['name']} | {desc} | {m['allocated_gib']:.2f} / {p['allocated_gib']:.2f} "
                     f"({_ratio(p['allocated_gib'], m['allocated_gib'])}) | {m['reserved_gib']:.2f} / "
                     f"{p['reserved_gib']:.2f} ({_ratio(p['reserved_gib'], m['reserved_gib'])}) | "
                     f"{m['smi_used_gib']:.2f} / {p['total_gib']:.2f} | {m['tokens_per_s']:,.0f} / "
                     f"{p['tokens_per_s']:,.0f} ({_ratio(p['tokens_per_s'], m['tokens_per_s'])}) |")
    return "\n".join(lines)


def summary(rows: List[dict], skip: frozenset = frozenset()) -> str:
    done = [r for r in rows if r.get("measured") and "error" not in r["measured"] and r["name"] not in skip]
    if not done:
        return "no run measured"
    def err(key: str) -> List[float]:
        return [abs(r["predicted"][key] / r["measured"][key] - 1) for r in done if not math.isnan(r["measured"][key])]

    mem, res, tok = err("allocated_gib"), err("reserved_gib"), err("tokens_per_s")
    lines = [f"allocated: max error {max(mem, default=math.nan):.1%} (goal 5%); reserved: max error "
             f"{max(res, default=math.nan):.1%}; tokens/s: max error {max(tok, default=math.nan):.1%} (goal 15%)"
             + (f"; over {len(done)} runs, leaving out {', '.join(sorted(skip))}" if skip else "")]
    for group in sorted({r["group"] for r in done if r["group"].startswith("auto:")}):
        members = [r for r in done if r["group"] == group]
        auto = [r for r in members if r.get("extra", {}).get("auto_choice")]
        best = max(members, key=lambda r: r["measured"]["tokens_per_s"])
        if auto:
            a = auto[0]["measured"]["tokens_per_s"]
            lines.append(f"{group}: auto picked {auto[0]['extra']['auto_choice']} -> {a:,.0f} tok/s; best measured "
                         f"{best['name']} {best['measured']['tokens_per_s']:,.0f}: auto at "
                         f"{a / best['measured']['tokens_per_s']:.1%} of it (goal >= 90%)")
    return "\n".join(lines)


def layouts_table(rows: List[dict]) -> str:
    """Issue 17's table: per-GPU tokens/s of each 2-GPU layout over its one-GPU reference, the pipeline's
    measured bubble against 1F1B's, MFU (attention counted in full) and peak memory."""
    by_name = {r["name"]: r for r in rows if r.get("measured") and "error" not in r["measured"]}
    lines = ["| run | GPUs | tokens/s | per GPU | per GPU / one GPU | measured bubble | 1F1B theory | MFU | peak alloc GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in [c.name for c in ONE_GPU_REFS] + list(LAYOUT_REFS):
        r = by_name.get(name)
        if r is None:
            lines.append(f"| {name} | not measured | | | | | | | |")
            continue
        m, lay = r["measured"], r["predicted"]["layout"]
        world = lay["tp"] * lay["pp"] * lay["dp"]
        per = m["tokens_per_s"] / world
        ref = by_name.get(LAYOUT_REFS.get(name) or "")
        eff = per / ref["measured"]["tokens_per_s"] if ref else None
        p, micro = lay["pp"], lay["grad_accum"]
        bubble = f"{1 - eff:.1%}" if p > 1 and eff else "-"
        theory = f"{(p - 1) / (micro + p - 1):.1%}" if p > 1 else "-"
        mfu = m.get("mfu")
        lines.append(f"| {name} | {world} | {m['tokens_per_s']:,.0f} | {per:,.0f} | {f'{eff:.1%}' if eff else '-'} | "
                     f"{bubble} | {theory} | {f'{mfu:.1%}' if mfu else '-'} | {m['allocated_gib']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ fit
def latest(paths: List[str]) -> List[dict]:
    """The runs of measured JSONs in the order given; a case measured again (same name, a later file)
    replaces its earlier measurement, in the earlier one's place."""
    rows: Dict[str, dict] = {}
    for p in paths:
        for r in json.loads(Path(p).read_text()):
            if r.get("measured") and "error" not in r["measured"] or r["name"] not in rows:
                rows[r["name"]] = r
    return list(rows.values())


def fit(paths: List[str], skip: frozenset = frozenset()) -> str:
    """Refit calibration.py's constants to measured JSONs; returns the new lines and the refit table."""
    import numpy as np
    from scipy.optimize import least_squares

    from neox.planner import calibration as cal

    rows = [r for r in latest(paths) if r.get("measured") and "error" not in r["measured"] and r["name"] not in skip]
    mem_names = ["ACTIVATION_SCALE", "ALLOCATED_EXTRA_BYTES"]
    time_names = ["MATMUL_EFFICIENCY", "MATMUL_HALF_WORK", "ELEMENTWISE_TRAFFIC", "HOST_SECONDS_PER_LAYER",
                  "STEP_OVERHEAD_S", "OPTIMIZER_BYTES_PER_PARAM", "COMM_LATENCY_S", "ZERO_SECONDS_PER_LAYER[2]",
                  "ZERO_SECONDS_PER_LAYER[3]"]

    cases = [inputs(r["overrides_run"], r["predicted"]["gpu"], r["predicted"]["gpu_memory"]) for r in rows]

    def repredict() -> List[dict]:
        return [numbers(*c) for c in cases]

    def get(name: str) -> float:
        if name.endswith("]"):  # an entry of a dict constant, e.g. ZERO_SECONDS_PER_LAYER[2]
            base, key = name[:-1].split("[")
            return getattr(cal, base)[int(key)]
        return getattr(cal, name)

    def put(name: str, value: float) -> None:
        if name.endswith("]"):
            base, key = name[:-1].split("[")
            setattr(cal, base, {**getattr(cal, base), int(key): value})
        else:
            setattr(cal, name, value)

    def residuals(names, x, key):
        for n, v in zip(names, x):
            put(n, float(v))
        return [math.log(p[key] / r["measured"][key]) for p, r in zip(repredict(), rows)]

    x0 = [getattr(cal, n) for n in mem_names]
    mem_fit = least_squares(lambda x: residuals(mem_names, x, "allocated_gib"), x0, x_scale=[1.0, GiB],
                            bounds=([0.5, 0.0], [1.5, 4 * GiB]))
    predicted = repredict()  # with the fitted memory constants; the slack does not change step_reuse
    for stage in range(4):  # ZeRO-1..3's slack is scaled by how much of it the step reuses
        slack = [(r["measured"]["reserved_gib"] / r["measured"]["allocated_gib"] - 1) / (p["step_reuse"] if stage else 1)
                 for r, p in zip(rows, predicted) if r["predicted"]["layout"]["zero_stage"] == stage
                 and not math.isnan(r["measured"]["reserved_gib"])]
        if slack:
            cal.RESERVED_FRACTION = {**cal.RESERVED_FRACTION, stage: float(np.median(slack))}
    def outside(r: dict) -> float:  # GiB nvidia-smi sees beyond torch's reserve: context and NCCL
        return r["measured"].get("smi_used_gib", math.nan) - r["measured"]["reserved_gib"]

    def groups(r: dict) -> int:
        lay = r["predicted"]["layout"]
        return sum(1 for n in (lay["tp"], lay["pp"], lay["dp"]) if n > 1)

    alone = [outside(r) for r in rows if groups(r) == 0 and not math.isnan(outside(r))]
    if alone:
        cal.CONTEXT_BYTES = float(np.median(alone)) * GiB
    nccl = [(outside(r) - cal.CONTEXT_BYTES / GiB) / groups(r) for r in rows
            if groups(r) and not math.isnan(outside(r))]
    if nccl:
        cal.NCCL_BYTES_PER_GROUP = max(0.0, float(np.median(nccl))) * GiB
    x0 = [get(n) for n in time_names]
    # MATMUL_EFFICIENCY at most 0.80: a bf16 8192^3 matmul's 794 TFLOP/s on an H200 (FACTS.md)
    time_fit = least_squares(lambda x: residuals(time_names, x, "tokens_per_s"), x0,
                             x_scale=[max(abs(v), 1e-6) for v in x0],
                             bounds=([0.2, 0, 0, 0, 0, 0, 0, 0, 0], [0.80, 1e9, 50, 0.05, 1.0, 2000, 0.01, 0.1, 0.1]))
    lines = ["# refit by bench/planner_calibrate.py --fit " + " ".join(paths),
             f"# {len(rows)} runs for {len(time_names)} time constants: one the runs cannot constrain (tp latency "
             "without tp runs, ZeRO-3 without ZeRO-3 runs) moves freely; keep calibration.py's value for it"]
    for n in mem_names + ["RESERVED_FRACTION", "CONTEXT_BYTES", "NCCL_BYTES_PER_GROUP"] + time_names:
        value = get(n)
        lines.append(f"{n} = " + (repr({k: round(v, 4) for k, v in value.items()}) if isinstance(value, dict)
                                  else f"{value:.6g}"))
    fitted = repredict()
    for r, p in zip(rows, fitted):
        r["predicted"] = p
    return "\n".join(lines) + f"\n(memory fit cost {mem_fit.cost:.3g}, time fit cost {time_fit.cost:.3g})\n\n" \
        + table(rows) + "\n\n" + summary(rows)


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, choices=(1, 2), default=1, help="the layouts for 1 GPU, or for 2")
    ap.add_argument("--set", choices=("calibration", "auto", "layouts", "refs", "all"), default="calibration",
                    help="refs: the layouts' one-GPU references alone (run them on one GPU each, side by side)")
    ap.add_argument("--tag", default="", help="added to the output files' names (runs side by side)")
    ap.add_argument("--steps", type=int, default=6, help="training steps per layout (the first 2 are skipped)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per layout before it is stopped")
    ap.add_argument("--only", default="", help="comma-separated case names (default: every case of the set)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(REPO / "bench" / "out")))
    ap.add_argument("--fit", nargs="*", help="measured JSONs to refit calibration.py from (no GPU needed)")
    ap.add_argument("--table", nargs="*", help="measured JSONs to print the tables of, together (no GPU needed)")
    ap.add_argument("--skip", default="", help="with --fit or --table: comma-separated case names to leave out "
                    "(of the fit; of --table's error summary)")
    ap.add_argument("--repredict", action="store_true", help="with --table: predict with calibration.py as it is now")
    args = ap.parse_args()
    if args.fit:
        print(fit(args.fit, frozenset(n.strip() for n in args.skip.split(",") if n.strip())))
        return 0
    if args.table:
        rows = latest(args.table)
        if args.repredict:  # with calibration.py as it is now, not as it was when the runs were made
            for r in rows:
                r["predicted"] = numbers(*inputs(r["overrides_run"], r["predicted"]["gpu"], r["predicted"]["gpu_memory"]))
        skip = frozenset(n.strip() for n in args.skip.split(",") if n.strip())
        print(table(rows) + "\n\n" + summary(rows, skip) + "\n\n" + layouts_table(rows))
        return 0
    cases: List[Case] = []
    if args.set in ("calibration", "all"):
        cases += ONE_GPU if args.gpus == 1 else TWO_GPUS
    if args.set in ("auto", "layouts", "all") and args.gpus != 2:
        print(f"--set {args.set} measures layouts of 2 GPUs: add --gpus 2", file=sys.stderr)
        return 2
    if args.set in ("auto", "all"):
        cases += auto_cases()
    if args.set in ("refs", "all"):
        cases += ONE_GPU_REFS
    if args.set in ("layouts", "all"):
        cases += LAYOUTS
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        cases = [c for c in cases if c.name in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"planner_calibration_{args.gpus}gpu_{args.set}{args.tag}"
    log = out / f"{stem}.log"
    rows = []
    for case in cases:
        overrides = resolve(case)
        row = {"name": case.name, "group": case.group, "gpus": case.gpus, "overrides_run": overrides,
               "extra": case.extra, "predicted": predict(overrides)}
        print(f"[{case.name}] {' '.join(overrides)}", flush=True)
        row["measured"] = measure(overrides, args.steps, args.timeout, log)
        print(f"  measured {row['measured']}", flush=True)
        rows.append(row)
        (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    text = table(rows) + "\n\n" + summary(rows) + ("\n\n" + layouts_table(rows) if args.set in ("layouts", "all") else "")
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
