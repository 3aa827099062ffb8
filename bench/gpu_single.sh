#!/usr/bin/env bash
# On the GPU machine (1 GPU): build the kernels, run their GPU tests and benchmark, then our 125M and
# Pythia-shaped 1.4B (micro 4 x accum 8) runs and, last, the peers at the same shape (from .peer/).
# Usage: bash bench/gpu_single.sh <out dir>
set -uo pipefail
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 NEOX_CACHE=/tmp/neox-cache TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; tail -3 "$OUT/build.log"
python3 -m pytest -q -m gpu tests/kernels 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
timeout 150 python3 bench/kernels.py 2>&1 | tail -30 | tee "$OUT/kernels.md"
R=runs/gpu1
common="logging.wandb=false train.log_every=1 train.eval_every=1000 train.save_every=1000 train.eval_batches=2 cluster.gpus=1"
run() { local name=$1; shift; echo "== $name: $*"; python3 launch.py $common run_dir=$R/$name "$@" 2>&1 \
        | grep -vE "^\[20|SEED_LAYERS|Using topology" | grep -E "kernels|step|error|Error" | tail -6 | tee "$OUT/$name.log"; }
run 125M model=125M train.steps=40 train.micro_batch=16 train.grad_accum=1
run 1.4B_gas8 model=1.4B train.steps=10 train.micro_batch=4 train.grad_accum=8
python3 bench/summarize_runs.py $R/125M $R/1.4B_gas8 --skip 2 | tee "$OUT/summary.md"
GAS=8 timeout 260 python3 .peer/peer_gas.py 2>&1 | grep '^{' | tee "$OUT/peers.jsonl"
