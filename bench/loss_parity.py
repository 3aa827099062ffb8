"""Loss parity of the multi-GPU layouts against one GPU: same model, seed, data and global batch.

    python bench/loss_parity.py --out $OUT/parity                   # model=1.3B, 50 steps: 1 GPU, tp2, pp2
    python bench/loss_parity.py --out $OUT/parity --steps 20 --layouts tp2
    python bench/loss_parity.py --out $OUT/newold --model 1.4B --accum 8 --layouts reference   # new vs old path

Each run goes through `launch.py` (DeepSpeed engine, bf16, fused kernels, the embedded corpus), micro 4 x
accum 4 by default, a log record per step; it is stopped (SIGINT: the ranks exit at once, no checkpoint is
written) once its last step is logged. The table gives each layout's per-step train-loss gap to the one-GPU
run: the largest, the mean, and step 1's (the same weights and batch: only the arithmetic's order differs).
bf16 noise grows with the steps, so the step-1 gap is the exactness check and the 50-step gap the drift.
Writes parity.json and parity.md to --out, with each run's log.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from neox.train.metrics import read_metrics  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import runs  # noqa: E402  (start and stop a launch.py run)
from planner_calibrate import wait_idle  # noqa: E402

# "reference": one GPU on the path before the speed work (every op its PyTorch reference, DeepSpeed's own
# bf16 optimizer step): issue 16's check that the speed work left the losses as they were
LAYOUTS = {"1gpu": ["cluster.gpus=1"], "tp2": ["parallelism=tp2"], "pp2": ["parallelism=pp2"],
           "reference": ["cluster.gpus=1", "model.kernels=reference", "train.fused_step=false"]}
# --cpu-smoke: the same comparison on CPU processes over gloo (checks this script, measures nothing)
CPU_LAYOUTS = {"1gpu": ["cluster.cpu_procs=1"], "tp2": ["parallelism=tp2", "cluster.cpu_procs=2"],
               "pp2": ["parallelism=pp2", "cluster.cpu_procs=2"],
               "reference": ["cluster.cpu_procs=1", "model.kernels=reference", "train.fused_step=false"]}


def run(name: str, overrides: List[str], out: Path, steps: int, timeout: float) -> Dict[str, object]:
    """Train until `steps` is logged, on GPUs the previous run has left (a run beside another's leftover
    ranks is slowed, and reported so); its train losses by step and median tokens/s."""
    busy_gib = wait_idle()
    run_dir = out / name
    # train.steps beyond the last compared step: the run never reaches its end, so no final checkpoint is written
    cmd = [sys.executable, str(REPO / "launch.py"), *overrides, f"run_dir={run_dir}", f"train.steps={steps + 1000}",
           "train.log_every=1", "train.eval_every=1000000", "train.save_every=1000000",
           "logging.wandb=false", "logging.tensorboard=false", "logging.progress=false", "plan.force=true"]
    with open(out / f"{name}.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        with runs.running(cmd, log) as proc:  # stopped at once (no checkpoint), however this ends
            runs.wait_for(proc, lambda: any(r.get("step") == steps and "train/loss" in r
                                            for r in read_metrics(run_dir / "metrics.jsonl")), timeout)
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r and r["step"] <= steps}
    rates = [r["train/tokens_per_s"] for s, r in records.items() if s > 1 and "train/tokens_per_s" in r]  # not warm-up
    # not the steps logged before the stop landed
    return {"losses": [records[s]["train/loss"] for s in sorted(records)], "busy_gib_at_start": busy_gib,
            "tokens_per_s": statistics.median(rates) if rates else None}


def compare(reference: List[float], other: List[float]) -> Dict[str, float]:
    gaps = [abs(a - b) for a, b in zip(reference, other)]
    if not gaps:
        return {"steps": 0}
    return {"steps": len(gaps), "step1_gap": gaps[0], "max_gap": max(gaps),
            "max_gap_step": gaps.index(max(gaps)) + 1, "mean_gap": sum(gaps) / len(gaps),
            "final_ref": reference[len(gaps) - 1], "final": other[len(gaps) - 1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="1.3B")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--layouts", default="tp2,pp2", help="compared against one GPU: " + ",".join(LAYOUTS))
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = ["1gpu", *[n for n in args.layouts.split(",") if n]]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        print(f"loss_parity: unknown layout {unknown[0]}; choose from {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    taken = [n for n in names if (args.out / n).exists()]
    if taken:  # a run dir of an earlier comparison would be resumed into and its metrics mixed with these
        print(f"loss_parity: {args.out} already holds {', '.join(taken)}; give a new --out", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    common = [f"model={args.model}", f"train.micro_batch={args.micro}", f"train.grad_accum={args.accum}"]
    layouts = CPU_LAYOUTS if args.cpu_smoke else LAYOUTS
    results = {n: run(n, common + layouts[n], args.out, args.steps, args.timeout) for n in names}
    losses = {n: r["losses"] for n, r in results.items()}
    rows = {n: compare(losses["1gpu"], losses[n]) for n in names[1:]}
    lines = [f"model={args.model}, micro {args.micro} x accum {args.accum}, {args.steps} steps, against one GPU",
             "", "| layout | steps compared | step-1 gap | max gap (step) | mean gap | final loss 1 GPU / layout |",
             "|---|---|---|---|---|---|"]
    for n, r in rows.items():
        if not r["steps"]:
            lines.append(f"| {n} | 0 (no step logged: see {n}.log) | | | | |")
            continue
        lines.append(f"| {n} | {r['steps']} | {r['step1_gap']:.4f} | {r['max_gap']:.4f} ({r['max_gap_step']}) | "
                     f"{r['mean_gap']:.4f} | {r['final_ref']:.4f} / {r['final']:.4f} |")
    lines += ["", "tokens/s (median of the steps after the first): " + ", ".join(
        f"{n} {r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else f"{n} -" for n, r in results.items())]
    lines += [f"{n} started with {r['busy_gib_at_start']:.1f} GiB of another run still on a GPU: its tokens/s is low"
              for n, r in results.items() if r["busy_gib_at_start"] > 1.0]
    text = "\n".join(lines)
    (args.out / "parity.md").write_text(text + "\n")
    (args.out / "parity.json").write_text(json.dumps({"losses": losses, "gaps": rows, "runs": results}) + "\n")
    print(text)
    return 0 if all(r["steps"] == args.steps for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
