#!/usr/bin/env bash
# On the GPU machine (2 GPUs): model=1.3B on one GPU vs parallelism=tp2, same seed and data, 50 steps
# at the preset's lr, to compare throughput per GPU and the loss curves step by step.
set -uo pipefail
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 NEOX_CACHE=/tmp/neox-cache
R=runs/gpu_tp
common="model=1.3B logging.wandb=false train.log_every=1 train.eval_every=1000 train.save_every=1000 train.eval_batches=2 train.steps=50 train.micro_batch=4 train.grad_accum=1"
python3 launch.py $common cluster.gpus=1 run_dir=$R/1gpu 2>&1 | grep -E "^step" | tail -2
python3 launch.py $common parallelism=tp2 run_dir=$R/tp2 2>&1 | grep -E "^step" | tail -2
python3 bench/summarize_runs.py $R/1gpu $R/tp2 --reference $R/1gpu | tee "$OUT/summary.md"
python3 - "$R" <<'PY' | tee "$OUT/loss_gap.txt"
import json, sys
def losses(run): return [json.loads(l)["train/loss"] for l in open(f"{sys.argv[1]}/{run}/metrics.jsonl") if "train/loss" in l]
a, b = losses("1gpu"), losses("tp2")
gaps = [abs(x - y) for x, y in zip(a, b)]
print("step 1:", a[0], b[0], "| max |gap| steps 1-10:", max(gaps[:10]), "| steps 1-50:", max(gaps), "| mean:", sum(gaps) / len(gaps))
print("1gpu:", [round(x, 3) for x in a]); print("tp2: ", [round(x, 3) for x in b])
PY
