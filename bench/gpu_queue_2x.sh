#!/usr/bin/env bash
# Everything one session measures on the 2-GPU machine, in priority order, as one queue that outlives a
# single device call (a call lasts 10 minutes at most). On the device machine:
#   call 1:  bash bench/gpu_queue_2x.sh --start <res>        copies the tree to a new /tmp/neox-queue.* (each call
#            re-sends the repo, which would delete a running queue's directory), starts the queue there
#            in its own session, returns at once
#   later:   bash bench/gpu_queue_2x.sh --collect <res> <s>  waits up to <s> seconds (or until it is done),
#            then packs <res> into $OUT/res.tgz (a call brings back only a few files: one archive)
# PYTHONPATH/PATH must already point at the carried wheels. Order (what session 14 did not reach first):
# kernels built for sm_90 and the GPU tests of the newest paths; parallelism=auto at 6.7B against hand
# layouts (issue 18); the async checkpoint stall (issue 17) beside a profile of a 1.4B step; the 300-step
# bf16/fp8 loss comparison beside the one-GPU table with fp8 (issue 16); the planner's other 2-GPU points;
# tp2 with CUDA_DEVICE_MAX_CONNECTIONS=1 (the overlapped all-reduce not queued behind the dW matmul); the
# whole GPU kernel suite last (3 minutes). Session 14 ran issue 17's layouts (`--set refs`, `--set layouts`).
if [ "${1:-}" = "--start" ]; then
  # a results dir of its own: it deletes nothing, so it refuses one that already holds files
  if [ -n "$(ls -A "$2" 2>/dev/null)" ]; then echo "gpu_queue_2x: $2 is not empty; give a new results dir" >&2; exit 2; fi
  q=$(mktemp -d /tmp/neox-queue.XXXXXX) && mkdir -p "$2" && cp -r . "$q" && cd "$q" || exit 1
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$q"
  setsid nohup bash bench/gpu_queue_2x.sh "$2" > "$2/queue.out" 2>&1 < /dev/null &
  echo "queue started in $q, results in $2"; exit 0
fi
if [ "${1:-}" = "--collect" ]; then
  end=$((SECONDS + $3)); while [ $SECONDS -lt $end ] && [ ! -e "$2/DONE" ]; do sleep 5; done
  tar czf "${OUT:-/tmp}/res.tgz" -C "$2" . && tail -30 "$2/queue.log"; exit 0
fi
set -uo pipefail
RES=${1:-/tmp/res}; mkdir -p "$RES"
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 NEOX_CACHE=${NEOX_CACHE:-/tmp/neox-cache} NCCL_NVLS_ENABLE=0 \
       TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
say() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$RES/queue.log"; }
step() { local name=$1; shift; say "start $name"; "$@" > "$RES/$name.out" 2>&1; say "end $name rc=$?"; }
CAL="python3 bench/planner_calibrate.py --gpus 2 --out $RES --timeout 200"
say "commit $(cat COMMIT 2>/dev/null) on $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1) x $(nvidia-smi -L | wc -l)"
step build python3 setup.py -q build_ext --inplace
step new_path_tests python3 -m pytest -q -m gpu tests/kernels/test_rotary_inplace.py tests/parallel tests/model -p no:cacheprovider
step comm python3 bench/comm_bandwidth.py --gpus 2 --out "$RES/comm_bandwidth.json"  # the link tp2 runs over
# what session 14 left unmeasured first: parallelism=auto at 6.7B against its hand layouts, 1.4B pp2
step planner_auto $CAL --set auto --only "6.7B auto,6.7B tp2 m4,6.7B dp2 z3 m2 ckpt,6.7B pp2 z1 m2,1.4B pp2 z1 m4"
CUDA_VISIBLE_DEVICES=0 step checkpoint timeout 420 python3 bench/checkpoint_save.py --out "$RES/checkpoint_save.json" &
CUDA_VISIBLE_DEVICES=1 step profile python3 bench/profile_step.py --model 1.4B --micro 4 --accum 8 --out "$RES/profile" &
wait
rm -f "$RES/profile/trace.json"  # hundreds of MB
CUDA_VISIBLE_DEVICES=0 step fp8_loss python3 bench/train_throughput.py --model 1.4B --compare-loss 300 --out "$RES/fp8_loss" &
CUDA_VISIBLE_DEVICES=1 step throughput python3 bench/train_throughput.py --model 1.4B --micro 4 --accum 8 --fp8 \
    --peers hf,mini_compile --out "$RES/throughput" &
wait
step planner_calibration $CAL --set calibration
CUDA_DEVICE_MAX_CONNECTIONS=1 step tp2_one_connection $CAL --set layouts --only "1.3B tp2 m4x8" --tag _one_connection
step gpu_tests python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider
python3 bench/planner_calibrate.py --table "$RES"/planner_calibration_*.json > "$RES/tables.md" 2>&1
say "queue done"; touch "$RES/DONE"
