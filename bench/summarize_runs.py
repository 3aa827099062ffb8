"""Summarize neox run directories (metrics.jsonl) as a markdown table: steady-state throughput,
MFU, data wait and memory, plus how closely each run's losses follow a reference run.

    python bench/summarize_runs.py runs/a runs/b --reference runs/a --skip 3
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def records(run: Path) -> list:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_records(run: Path) -> list:
    return [r for r in records(run) if "train/loss" in r]


def summarize(run: Path, skip: int) -> dict:
    rs = train_records(run)
    steady = rs[skip:] or rs
    med = lambda k: statistics.median(r[f"train/{k}"] for r in steady) if steady else float("nan")  # noqa: E731
    world = json.loads((run / "plan.json").read_text())["world_size"] if (run / "plan.json").exists() else None
    return {"run": run.name, "steps": rs[-1]["step"] if rs else 0, "tokens_per_s": med("tokens_per_s"),
            "tflops_per_device": med("tflops_per_device"), "mfu": med("mfu"), "data_wait": med("data_wait_frac"),
            "memory_gb": max((r["train/memory_gb"] for r in rs), default=float("nan")),
            "final_loss": rs[-1]["train/loss"] if rs else float("nan"), "world": world}


def loss_gap(run: Path, reference: Path) -> float:
    a = {r["step"]: r["train/loss"] for r in train_records(run)}
    b = {r["step"]: r["train/loss"] for r in train_records(reference)}
    common = sorted(set(a) & set(b))
    return max((abs(a[s] - b[s]) for s in common), default=float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--reference", type=Path)
    ap.add_argument("--skip", type=int, default=3, help="log records to skip as warm-up")
    args = ap.parse_args()
    print("| run | steps | tokens/s | TFLOP/s per device | MFU | data wait | peak mem GB | final loss | max loss gap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        s = summarize(run, args.skip)
        gap = f"{loss_gap(run, args.reference):.4f}" if args.reference and run != args.reference else "-"
        print(f"| {s['run']} | {s['steps']} | {s['tokens_per_s']:,.0f} | {s['tflops_per_device']:.1f} | "
              f"{s['mfu']:.1%} | {s['data_wait']:.2%} | {s['memory_gb']:.1f} | {s['final_loss']:.4f} | {gap} |")


if __name__ == "__main__":
    main()
