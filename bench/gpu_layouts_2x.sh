#!/usr/bin/env bash
# Issue 17's layout measurements, on the GPU machine with 2 GPUs, in one call:
#   1.3B on one GPU (micro 4 x accum 8) against tp2 (same global batch), pp2 at m = 4, 8, 16, dp2 at 1.4B,
#   and 6.7B at tp2 (micro 4 x accum 4). Per-GPU efficiency = per-GPU tokens/s / one GPU's; the pipeline's
#   measured bubble = 1 - that efficiency (everything that is not the schedule's work: bubble, p2p, imbalance),
#   against the 1F1B theory (p-1)/(m+p-1).
# Usage: bash bench/gpu_layouts_2x.sh <out dir> [steps]
set -uo pipefail
OUT=${1:-/tmp/out}; STEPS=${2:-10}; mkdir -p "$OUT"
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 NEOX_CACHE=${NEOX_CACHE:-/tmp/neox-cache} NCCL_NVLS_ENABLE=0
R=runs/layouts
common="logging.wandb=false logging.tensorboard=false train.log_every=1 train.eval_every=100000 train.save_every=100000 train.eval_batches=1 train.steps=$STEPS"
run() { local name=$1; shift; local t0=$SECONDS; echo "== $name: $*"
        python3 launch.py $common run_dir=$R/$name "$@" > "$OUT/$name.log" 2>&1; local rc=$?
        echo "   rc=$rc in $((SECONDS - t0)) s"; grep -E "error|Error" "$OUT/$name.log" | tail -2; }
run 1.3B_1gpu model=1.3B cluster.gpus=1 parallelism=zero1 train.micro_batch=4 train.grad_accum=8
run 1.3B_tp2 model=1.3B parallelism=tp2 train.micro_batch=4 train.grad_accum=8
for m in 4 8 16; do run 1.3B_pp2_m$m model=1.3B parallelism=pp2 train.micro_batch=4 train.grad_accum=$m; done
run 1.4B_1gpu model=1.4B cluster.gpus=1 parallelism=zero1 train.micro_batch=4 train.grad_accum=8
run 1.4B_dp2 model=1.4B parallelism=zero1 train.micro_batch=4 train.grad_accum=4
run 6.7B_tp2 model=6.7B parallelism=tp2 train.micro_batch=4 train.grad_accum=4 train.steps=6
python3 - "$R" <<'PY' | tee "$OUT/layouts.md"
import json, statistics, sys
from pathlib import Path
R = Path(sys.argv[1])
def stats(name):
    p = R / name / "metrics.jsonl"
    rs = [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []
    tr = [r for r in rs if "train/tokens_per_s" in r][2:]
    if not tr: return None
    med = lambda k: statistics.median(r[k] for r in tr)
    world = 1 if name.endswith("1gpu") else 2
    return {"tok": med("train/tokens_per_s"), "world": world, "mfu": med("train/mfu"), "mem": max(r["train/memory_gb"] for r in tr)}
print("| run | GPUs | tokens/s | per GPU | per GPU / one GPU | measured bubble | 1F1B theory | MFU | peak GB |")
print("|---|---|---|---|---|---|---|---|---|")
for name, ref in [("1.3B_1gpu", None), ("1.3B_tp2", "1.3B_1gpu"), ("1.3B_pp2_m4", "1.3B_1gpu"), ("1.3B_pp2_m8", "1.3B_1gpu"),
                  ("1.3B_pp2_m16", "1.3B_1gpu"), ("1.4B_1gpu", None), ("1.4B_dp2", "1.4B_1gpu"), ("6.7B_tp2", None)]:
    s = stats(name)
    if s is None:
        print(f"| {name} | failed | | | | | | | |"); continue
    per = s["tok"] / s["world"]
    base = stats(ref) if ref else None
    eff = per / base["tok"] if base else None
    m = int(name.split("_m")[1]) if "_pp2_m" in name else None
    bubble = f"{1 - eff:.1%}" if m and eff else "-"
    theory = f"{1 / (m + 1):.1%}" if m else "-"
    print(f"| {name} | {s['world']} | {s['tok']:,.0f} | {per:,.0f} | {f'{eff:.1%}' if eff else '-'} | {bubble} | {theory} | {s['mfu']:.1%} | {s['mem']:.1f} |")
PY
