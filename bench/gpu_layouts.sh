#!/usr/bin/env bash
# On the GPU machine (2 GPUs): 125M on one GPU; 1.3B on one GPU, tp2 and pp2 (8 micro-batches).
# Usage: bash bench/gpu_layouts.sh <out dir>.  Each run's metrics land in runs/gpu/<name>.
set -uo pipefail
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 NEOX_CACHE=/tmp/neox-cache TORCH_CUDA_ARCH_LIST=9.0
R=runs/gpu
common="logging.wandb=false train.log_every=1 train.eval_every=1000 train.save_every=1000 train.eval_batches=2"
run() { local name=$1; shift; echo "== $name: $*"; python launch.py $common run_dir=$R/$name "$@" 2>&1 \
        | grep -vE "^\[20|SEED_LAYERS|Using topology" | tail -25 | tee "$OUT/$name.log"; }
run 125M_1gpu model=125M train.steps=40 train.micro_batch=16 train.grad_accum=1 cluster.gpus=1
run 1.3B_1gpu model=1.3B train.steps=50 train.micro_batch=4 train.grad_accum=1 cluster.gpus=1
run 1.3B_tp2 model=1.3B parallelism=tp2 train.steps=50 train.micro_batch=4 train.grad_accum=1
run 1.3B_1gpu_gas8 model=1.3B train.steps=12 train.micro_batch=4 train.grad_accum=8 cluster.gpus=1 parallelism=zero1
run 1.3B_pp2 model=1.3B parallelism=pp2 train.steps=12 train.micro_batch=4 train.grad_accum=8
python bench/summarize_runs.py $R/125M_1gpu $R/1.3B_1gpu $R/1.3B_tp2 --reference $R/1.3B_1gpu | tee "$OUT/summary.md"
python bench/summarize_runs.py $R/1.3B_1gpu_gas8 $R/1.3B_pp2 --reference $R/1.3B_1gpu_gas8 --skip 2 | tee -a "$OUT/summary.md"
tar czf "$OUT/runs.tgz" $R/*/metrics.jsonl $R/*/config.yaml 2>/dev/null
