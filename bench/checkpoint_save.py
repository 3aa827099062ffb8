"""Checkpoint cost on one GPU: the synchronous save time against the training stall of an async save.

    python bench/checkpoint_save.py --out $OUT/checkpoint_save.json              # model=1.4B
    python bench/checkpoint_save.py --out $OUT/checkpoint_save.json --with-6.7B  # and model=6.7B

Each model trains twice through `launch.py` (neox's real path: DeepSpeed engine, bf16 weights, fused
AdamW, the default layout and data), every step logged (train.log_every=1, so metrics.jsonl has each step's end
time), keep_checkpoints=1, checkpoints under --dir:
  sync   train.async_save=false, saves at steps E and 2E (the last): the step after the first save
         takes the save's whole time on top of a normal step (--sync-every E);
  async  train.async_save=true, saves every --every steps, 3 saves (the last at the end):
         the first save allocates and pins the host copy, the second reuses it.
A save runs after its step's log line, so its cost lands in the steps that follow it. The stall of an
async save is the extra time of all the steps up to the next save (the save() call, the device->host
copy, and whatever the background writer takes from training) over the median step before any save.
The writer's own time comes from its log line. Prints one table; writes JSON to --out.
A 6.7B checkpoint with Adam states is ~94 GB: it needs twice that free at --dir (the old checkpoint is
removed after the new one is complete) and as much host memory for the async copy; without the room it
is reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
BYTES_PER_PARAM = 2 + 4 + 8  # bf16 weights, fp32 master weights, Adam's two fp32 moments
SHAPES = {"1.4B": ["train.micro_batch=4", "train.grad_accum=4"],
          "6.7B": ["train.micro_batch=1", "train.grad_accum=8", "model.activation_checkpointing=full"]}
CLUSTER = ["cluster.gpus=1"]  # --cpu-smoke: one CPU process instead (checks this script, measures nothing)
WRITTEN = re.compile(r"checkpoint: (step_\d+) written \(([\d.]+) GiB in ([\d.]+) s, (in the background|synchronously)\)")


def n_params(preset: str) -> int:
    sys.path.insert(0, str(REPO))
    from neox.config.plan import gpt_config
    from neox.launch.compose import compose_config
    from neox.model.gpt import count_params

    return int(count_params(gpt_config(compose_config([f"model={preset}"]).model))["total"])


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def train(preset: str, mode: str, steps: int, every: int, root: Path, log_dir: Path) -> dict:
    """One launch; returns its step end times, the writer's lines and the log's tail on failure."""
    root.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix=f"{preset}-{mode}-", dir=root)) / "run"  # its own: never a run it did not make
    cmd = [sys.executable, str(REPO / "launch.py"), f"model={preset}", *SHAPES.get(preset, []), f"train.steps={steps}",
           f"train.save_every={every}", "train.keep_checkpoints=1", f"train.async_save={mode == 'async'}".lower(),
           "train.log_every=1", "train.eval_every=1000000", "train.eval_batches=1", "logging.wandb=false",
           "logging.tensorboard=false", *CLUSTER, f"run_dir={run}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    (log_dir / f"{preset}-{mode}.log").write_text(log)
    records = []
    if (run / "metrics.jsonl").exists():
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shutil.rmtree(run.parent, ignore_errors=True)  # the disk back for the next run
    ends = {r["step"]: r["time"] for r in records if "train/loss" in r}
    out = {"wall_s": wall, "ends": ends, "written": [m.groups() for m in WRITTEN.finditer(log)],
           "fallback": "not enough host memory for an asynchronous save" in log}
    if proc.returncode != 0 or len(ends) < steps:
        out["failed"] = [ln for ln in log.splitlines() if ln.strip()][-3:]
    return out


def step_times(ends: Dict[int, float]) -> Dict[int, float]:
    return {s: ends[s] - ends[s - 1] for s in sorted(ends) if s - 1 in ends}


def extra(times: Dict[int, float], base: float, first: int, last: int) -> float:
    """Time the steps first..last took over `base` each."""
    return sum(times[s] - base for s in range(first, last + 1) if s in times)


def measure(preset: str, args, root: Path, log_dir: Path) -> dict:
    params = n_params(preset)
    size = params * BYTES_PER_PARAM
    row = {"model": preset, "params": params, "checkpoint_gib_estimate": size / 2**30}
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < 2.1 * size:
        row["skipped"] = (f"needs ~{2.1 * size / 1e9:.0f} GB free at {root} (two checkpoints during a save), "
                          f"{free / 1e9:.0f} GB free; pass --dir on a larger disk")
        return row
    if mem_available() < 1.1 * size:
        row["note"] = (f"~{size / 1e9:.0f} GB of host memory for the async copy, {mem_available() / 1e9:.0f} GB "
                       "available: the async run may fall back to synchronous saves")
    e = args.every
    sync = train(preset, "sync", 2 * args.sync_every, args.sync_every, root, log_dir)
    asyn = train(preset, "async", 3 * e, e, root, log_dir)
    row["runs"] = {"sync": sync, "async": asyn}
    for name, run in (("sync", sync), ("async", asyn)):
        if "failed" in run:
            row["failed"] = f"{name} run: {' | '.join(run['failed'])}"
            return row
    # sync: the steps before the first save set the normal step; the one after it carries the save
    st = step_times(sync["ends"])
    base = statistics.median(st[s] for s in range(3, args.sync_every + 1))
    row["sync_step_s"] = base
    row["sync_save_s"] = st[args.sync_every + 1] - base  # the whole save runs before this step's work
    at = step_times(asyn["ends"])
    abase = statistics.median(at[s] for s in range(3, e + 1))
    row["async_step_s"] = abase
    row["async_first_save"] = {"stall_s": extra(at, abase, e + 1, 2 * e),
                               "first_step_extra_s": at[e + 1] - abase}
    row["async_second_save"] = {"stall_s": extra(at, abase, 2 * e + 1, 3 * e),
                                "first_step_extra_s": at[2 * e + 1] - abase}
    row["writer"] = [{"tag": t, "gib": float(g), "seconds": float(s), "how": how} for t, g, s, how in asyn["written"]]
    row["async_fell_back_to_sync"] = asyn["fallback"]
    row["stall_over_sync"] = row["async_second_save"]["stall_s"] / row["sync_save_s"] if row["sync_save_s"] > 0 else None
    interval = e * abase
    if any(w["seconds"] > interval for w in row["writer"][:2]):
        row["note"] = (f"a writer took longer than the {interval:.0f} s between saves: the next save waited for it "
                       "(in the stall); rerun with a larger --every")
    return row


def table(rows: List[dict], card: str) -> str:
    lines = [f"Checkpoint saves on one {card}: sync save time vs the training stall of an async save "
             "(extra time of the steps that follow a save, over the median step)", "",
             "| model | checkpoint GiB | step s | sync save s | async stall, 1st save s | async stall, 2nd save s "
             "| 2nd stall / sync | writer s (1st, 2nd) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r or "failed" in r:
            lines.append(f"| {r['model']} | ~{r['checkpoint_gib_estimate']:.0f} (estimate) | "
                         f"{'skipped: ' + r['skipped'] if 'skipped' in r else 'failed: ' + r['failed']} | | | | | |")
            continue
        gib = r["writer"][0]["gib"] if r["writer"] else float("nan")
        writers = ", ".join(f"{w['seconds']:.1f}" for w in r["writer"][:2])
        ratio = f"{r['stall_over_sync']:.1%}" if r["stall_over_sync"] is not None else "-"
        fallback = " (fell back to sync)" if r["async_fell_back_to_sync"] else ""
        lines.append(f"| {r['model']} | {gib:.1f} | {r['sync_step_s']:.2f} | {r['sync_save_s']:.1f} | "
                     f"{r['async_first_save']['stall_s']:.2f} | {r['async_second_save']['stall_s']:.2f}{fallback} | "
                     f"{ratio} | {writers} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write (the table goes beside it, .md)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/neox-ckpt-bench"), help="where the runs write checkpoints")
    ap.add_argument("--with-6.7B", dest="big", action="store_true", help="also model=6.7B (micro 1 x accum 8)")
    ap.add_argument("--every", type=int, default=70,
                    help="async run: steps between saves; they must take longer than the writer, or the next save waits")
    ap.add_argument("--sync-every", type=int, default=6, help="sync run: steps before its first save")
    ap.add_argument("--cpu-smoke", metavar="PRESET", help=argparse.SUPPRESS)  # e.g. tiny, on one CPU process
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        CLUSTER[:] = ["cluster.cpu_procs=1", "train.precision=fp32"]
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = args.out.parent / "checkpoint_save_logs"
    log_dir.mkdir(exist_ok=True)
    rows = []
    for preset in [args.cpu_smoke] if args.cpu_smoke else ["1.4B"] + (["6.7B"] if args.big else []):
        rows.append(measure(preset, args, args.dir, log_dir))
        summary = {k: v for k, v in rows[-1].items() if k != "runs"}
        print(json.dumps(summary), flush=True)
    text = table(rows, card) + "".join(f"\n{r['model']}: {r['note']}" for r in rows if r.get("note"))
    print(text)
    args.out.write_text(json.dumps({"card": card, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
