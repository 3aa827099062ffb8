#!/usr/bin/env bash
# Everything this session measures on the 2-GPU machine, in priority order, as one queue that outlives a
# single device call (start it with setsid; each call copies what is done from <res>). Usage:
#   bash bench/gpu_queue_2x.sh <res dir>      (PYTHONPATH/PATH set for the carried wheels beforehand)
# Order: kernels built for sm_90 and their GPU tests; the planner's parallelism=auto against hand layouts
# (issue 18); issue 17's layouts with their one-GPU references side by side; issue 16's one-GPU table beside
# the checkpoint stall (issue 17), one GPU each; a profile of a 1.4B step; the planner's other 2-GPU points;
# tp2 again with CUDA_DEVICE_MAX_CONNECTIONS=1 (the overlapped all-reduce not queued behind the dW matmul).
set -uo pipefail
RES=${1:-/tmp/res}; mkdir -p "$RES"
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 NEOX_CACHE=${NEOX_CACHE:-/tmp/neox-cache} NCCL_NVLS_ENABLE=0 \
       TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
say() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$RES/queue.log"; }
step() { local name=$1; shift; say "start $name"; "$@" > "$RES/$name.out" 2>&1; say "end $name rc=$?"; }
CAL="python3 bench/planner_calibrate.py --gpus 2 --out $RES --timeout 200"
say "commit $(cat COMMIT 2>/dev/null) on $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1) x $(nvidia-smi -L | wc -l)"
step build python3 setup.py -q build_ext --inplace
step gpu_tests python3 -m pytest -q -m gpu tests/kernels tests/model tests/parallel -p no:cacheprovider
step planner_auto $CAL --set auto
CUDA_VISIBLE_DEVICES=0 step refs_13 $CAL --set refs --only "1.3B 1gpu z1 m4x8" --tag _13 &
CUDA_VISIBLE_DEVICES=1 step refs_14 $CAL --set refs --only "1.4B 1gpu z1 m4x8" --tag _14 &
wait
step layouts $CAL --set layouts
CUDA_VISIBLE_DEVICES=0 step throughput python3 bench/train_throughput.py --model 1.4B --micro 4 --accum 8 \
    --peers hf,mini_compile --out "$RES/throughput" &
CUDA_VISIBLE_DEVICES=1 step checkpoint timeout 330 python3 bench/checkpoint_save.py --out "$RES/checkpoint_save.json" &
wait
CUDA_VISIBLE_DEVICES=0 step profile python3 bench/profile_step.py --model 1.4B --micro 4 --accum 8 --out /tmp/profile
cp /tmp/profile/profile.md "$RES/" 2>/dev/null
step planner_calibration $CAL --set calibration
CUDA_DEVICE_MAX_CONNECTIONS=1 step tp2_one_connection $CAL --set layouts --only "1.3B tp2 m4x8" --tag _one_connection
python3 bench/planner_calibrate.py --table "$RES"/planner_calibration_*.json > "$RES/tables.md" 2>&1
say "queue done"; touch "$RES/DONE"
