#!/usr/bin/env bash
# Everything one session measures on the 2-GPU machine, in priority order, as one queue that outlives a
# single device call (a call lasts 10 minutes at most). On the device machine:
#   call 1:  bash bench/gpu_queue_2x.sh --start <res>        copies the tree to a new /tmp/neox-queue.* (each call
#            re-sends the repo, which would delete a running queue's directory), starts the queue there
#            in its own session, returns at once
#   later:   bash bench/gpu_queue_2x.sh --collect <res> <s>  waits up to <s> seconds (or until it is done),
#            then packs <res>'s small files into $OUT/res.tgz (a call brings back only a few files: one
#            archive); keep <s> + the install well under the call's 600 s
# PYTHONPATH/PATH must already point at the carried wheels. After the results dir come the items to run, in
# order (default: what session 18 left to measure: build newtests tp2 fp8_tp2 profile_tp2 profile14 gputests):
#   build          the kernels for sm_90                        planner67  parallelism=auto at 6.7B vs hand layouts
#   ckpt_profile   async vs sync save (GPU 0) | a 1.4B step's profile, then 125M's micro-batches (GPU 1)
#   throughput     1.4B against HF and the compiled minimal GPT (GPU 0) | one-GPU planner points (GPU 1)
#   parity         tp2 and pp2 against one GPU, 50 steps         fp8        300-step bf16/fp8 losses | fp8 table
#   ckpt           async vs sync save (GPU 0) | 1.4B profile at micro 8 (GPU 1)
#   profile_tp2    rank 0's profile of 1.3B tp2, without and with sequence parallelism
#   tp2            1.3B tp2, tp2+SP and tp2 with tp_overlap beside their one-GPU references
#   tp2conn        tp2 with CUDA_DEVICE_MAX_CONNECTIONS=1        calibration  the planner's other 2-GPU points
#   gputests       the whole GPU kernel suite (3 minutes)    kernels  bench/kernels.py (against eager, compile, Liger)
#   fp8_67         6.7B bf16 vs fp8 on one GPU                fp8_1gpu fp8_67, then the 300-step loss curves
#   fp8_cache      fp8 per layer (cached weights) + 1.4B      fp8_tp2  6.7B tp2 m4 x 8 bf16 vs fp8, and m8 x 4
#   newold         1.4B, 50 steps: the default path against the reference ops and DeepSpeed's bf16 step
#   profile125     where a 125M step goes (micro 32 x 4)     profile14  the same for 1.4B (micro 4 x 8)
#   peers14        1.4B against HF eager/compiled and the compiled minimal GPT (one GPU)
#   neox14         1.4B neox alone (the real training loop), micro 4 x 8
#   m125           125M at micro 32 x 4 and 64 x 2            newtests  the GPU tests of this session's changes
#   m125default    125M with no batch set (sized at launch)
#   fp8_compiled   1.4B bf16 vs fp8 with train.compile=true (reference kernels)
#   fp8_recompiles 1.4B fp8 for 6 steps with Dynamo's recompile and graph-break logs
# On a one-GPU machine (e.g. `build ckpt fp8_1gpu kernels`) `ckpt` and `fp8` run their two streams in turn;
# build, kernels, gputests, fp8_67, fp8_1gpu, fp8_cache, newold and profile125 need one GPU; throughput and
# ckpt_profile need two, as do the 2-GPU layouts (parity, tp2, fp8_tp2, profile_tp2, planner67, calibration, tp2conn).
# Only this queue's leftovers: neox.train ranks whose working directory is this queue's tree;
# another run on the machine is never touched.
end_leftovers() {
  for pid in $(pgrep -f "neox.train"); do
    [ "$(readlink "/proc/$pid/cwd")" = "$PWD" ] && kill -9 "$pid"
  done
}
if [ "${1:-}" = "--end-leftovers" ]; then end_leftovers; exit 0; fi
if [ "${1:-}" = "--start" ]; then
  # a results dir of its own: it deletes nothing, so it refuses one that already holds files
  if [ -n "$(ls -A "$2" 2>/dev/null)" ]; then echo "gpu_queue_2x: $2 is not empty; give a new results dir" >&2; exit 2; fi
  q=$(mktemp -d /tmp/neox-queue.XXXXXX) && mkdir -p "$2" && cp -r . "$q" && cd "$q" || exit 1
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$q"
  setsid nohup bash bench/gpu_queue_2x.sh "${@:2}" > "$2/queue.out" 2>&1 < /dev/null &
  echo "queue started in $q, results in $2"; exit 0
fi
if [ "${1:-}" = "--collect" ]; then
  end=$((SECONDS + $3)); while [ $SECONDS -lt $end ] && [ ! -e "$2/DONE" ]; do sleep 5; done
  # only what comes back: files under 5 MB (a call returns little; traces and checkpoints stay there)
  (cd "$2" && find . -type f -size -5M ! -path "*/tb/*" -print0 | tar czf "${OUT:-/tmp}/res.tgz" --null -T -)
  tail -30 "$2/queue.log"; exit 0
fi
set -uo pipefail
RES=${1:-/tmp/res}; mkdir -p "$RES"
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 NEOX_CACHE=${NEOX_CACHE:-/tmp/neox-cache} NCCL_NVLS_ENABLE=0 \
       TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
say() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$RES/queue.log"; }
step() { local name=$1; shift; say "start $name"; "$@" > "$RES/$name.out" 2>&1; say "end $name rc=$?"; }
CAL="python3 bench/planner_calibrate.py --gpus 2 --out $RES --timeout 200"
# On a one-GPU machine the items that run two streams (GPU 0 | GPU 1) run them one after the other on GPU 0.
NGPU=$(nvidia-smi -L | wc -l); G1=$((NGPU > 1 ? 1 : 0))
beside() { if [ "$NGPU" -gt 1 ]; then "$@" & else "$@"; fi; }
say "commit $(cat COMMIT 2>/dev/null) on $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1) x $(nvidia-smi -L | wc -l)"
# each item starts on idle GPUs: a run its bench stopped may still be exiting (or writing); wait for its
# memory to come back, then end what is left of it
idle() {
  for _ in $(seq 60); do
    [ "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | sort -n | tail -1)" -lt 2000 ] && return
    sleep 2
  done
  say "GPUs still busy after 120 s: ending this queue's leftover ranks"; end_leftovers; sleep 5
}
item() {
  idle
  case $1 in
  build) step build python3 setup.py -q build_ext --inplace ;;
  planner67) step planner_auto $CAL --set auto --only "6.7B auto,6.7B tp2 m4,6.7B pp2 z1 m2" ;;
  ckpt_profile)
    CUDA_VISIBLE_DEVICES=0 step checkpoint timeout 480 python3 bench/checkpoint_save.py --out "$RES/checkpoint_save.json" &
    ( CUDA_VISIBLE_DEVICES=1 step profile python3 bench/profile_step.py --model 1.4B --micro 4 --accum 8 --out "$RES/profile"
      rm -f "$RES/profile/trace.json"  # hundreds of MB
      CUDA_VISIBLE_DEVICES=1 step throughput_125M python3 bench/train_throughput.py --model 125M --micro 32 --accum 4 \
        --peers '' --neox '' --neox 'train.micro_batch=16 train.grad_accum=8' --neox 'train.micro_batch=64 train.grad_accum=2' \
        --out "$RES/throughput_125M" ) &
    wait ;;
  throughput)  # the 1.4B table (GPU 0) beside the one-GPU calibration points that predate the in-place rotary
    ( CUDA_VISIBLE_DEVICES=0 step fused_step_gpu_test python3 -m pytest -q -m gpu tests/train/test_fused_step.py -p no:cacheprovider
      CUDA_VISIBLE_DEVICES=0 step throughput python3 bench/train_throughput.py --model 1.4B --micro 4 --accum 8 \
        --peers hf,mini_compile --out "$RES/throughput"
      # the same neox run with DeepSpeed's own bf16 step
      CUDA_VISIBLE_DEVICES=0 step throughput_deepspeed_step python3 bench/train_throughput.py --model 1.4B --micro 4 \
        --accum 8 --peers '' --neox 'train.fused_step=false' --out "$RES/throughput_deepspeed_step" ) &
    CUDA_VISIBLE_DEVICES=1 step calibration_1gpu python3 bench/planner_calibrate.py --gpus 1 --out "$RES" --timeout 200 \
        --only "1.4B z0 m4,1.4B z2 m8 ckpt,1.4B z3 m2" --tag _fresh &
    wait ;;
  parity) step parity python3 bench/loss_parity.py --out "$RES/parity" ;;
  ckpt)  # the async stall alone, on GPU 0 (GPU 1 profiles 1.4B at micro 8: the next speed question)
    CUDA_VISIBLE_DEVICES=0 beside step checkpoint timeout 480 python3 bench/checkpoint_save.py --out "$RES/checkpoint_save.json"
    CUDA_VISIBLE_DEVICES=$G1 beside step profile_m8 python3 bench/profile_step.py --model 1.4B --micro 8 --accum 4 --out "$RES/profile_m8"
    wait; rm -f "$RES"/profile*/trace.json ;;
  profile_tp2)  # where tp2's time goes: exposed collectives, without and with sequence parallelism
    step profile_tp2 python3 bench/profile_step.py --model 1.3B --gpus 2 --set parallelism=tp2 --out "$RES/profile_tp2"
    step profile_tp2_sp python3 bench/profile_step.py --model 1.3B --gpus 2 --set parallelism=tp2 \
        --set parallelism.sequence_parallel=true --out "$RES/profile_tp2_sp"
    rm -f "$RES"/profile_tp2*/trace.json ;;
  fp8)
    CUDA_VISIBLE_DEVICES=0 beside step fp8_loss python3 bench/train_throughput.py --model 1.4B --compare-loss 300 --out "$RES/fp8_loss"
    CUDA_VISIBLE_DEVICES=$G1 beside step fp8_throughput python3 bench/train_throughput.py --model 1.4B --micro 4 --accum 8 --fp8 \
        --peers '' --out "$RES/fp8_throughput"
    wait ;;
  fp8_67)  # 6.7B on one GPU, bf16 and fp8: micro 4 (activation checkpointing) fits since the fused step's chunks
    step fp8_67 python3 bench/train_throughput.py --model 6.7B --micro 4 --accum 2 --fp8 --peers '' \
        --neox 'model.activation_checkpointing=full' --out "$RES/fp8_67" ;;
  fp8_1gpu)  # what a one-GPU hold measures of fp8: 6.7B bf16 vs fp8, then the 300-step 1.4B loss curves
    item fp8_67; idle; step fp8_loss python3 bench/train_throughput.py --model 1.4B --compare-loss 300 --out "$RES/fp8_loss" ;;
  kernels) step kernels timeout 200 python3 bench/kernels.py ;;
  profile125)  # issue 16's 125M at 50% MFU: where its step goes at the best micro-batch so far
    step profile_125M python3 bench/profile_step.py --model 125M --micro 32 --accum 4 --out "$RES/profile_125M"
    rm -f "$RES"/profile_125M/trace.json ;;
  profile14)  # issue 16's 1.4B at 60% MFU: its copies by launching op, the host's waits for the GPU
    step profile_14 python3 bench/profile_step.py --model 1.4B --micro 4 --accum 8 --out "$RES/profile_14"
    rm -f "$RES"/profile_14/trace.json ;;
  fp8_cache)  # the fp8 weight cache: per layer (1.4B and 6.7B shapes), then 1.4B bf16 vs fp8 end to end
    step fp8_linear_14 python3 bench/fp8_linear.py --out "$RES/fp8_linear_14.json"
    step fp8_linear_67 python3 bench/fp8_linear.py --d 4096 --ff 16384 --out "$RES/fp8_linear_67.json"
    idle; step fp8_throughput python3 bench/train_throughput.py --model 1.4B --micro 4 --accum 8 --fp8 --peers '' \
        --out "$RES/fp8_throughput" ;;
  newold)  # issue 16: 50 steps of 1.4B on the default path against the path before the speed work
    step newold python3 bench/loss_parity.py --out "$RES/newold" --model 1.4B --accum 8 --layouts reference ;;
  fp8_tp2) step fp8_tp2 $CAL --set layouts --only "6.7B tp2 m4x8,6.7B tp2 fp8 m4x8,6.7B tp2 m8x4" --tag _fp8_tp2 ;;
  tp2)  # 1.3B tp2 without and with sequence parallelism, and the one-GPU references, in one call (per GPU ratio)
    step tp2_refs $CAL --set refs --tag _tp2_refs
    step tp2_layouts $CAL --set layouts --only "1.3B tp2 m4x8,1.3B tp2 sp m4x8,1.3B tp2 overlap m4x8" --tag _tp2 ;;
  tp2conn) CUDA_DEVICE_MAX_CONNECTIONS=1 step tp2_one_connection $CAL --set layouts --only "1.3B tp2 m4x8" --tag _one_connection ;;
  calibration) step planner_calibration $CAL --set calibration ;;
  newtests)  # the GPU tests of this session's changes only (the whole suite: gputests)
    step new_tests python3 -m pytest -q -m gpu tests/train/test_log_window.py tests/train/test_fused_step.py \
        $(ls tests/kernels/test_dual_norm.py tests/kernels/test_add3.py tests/kernels/test_adamw.py 2>/dev/null) \
        -p no:cacheprovider ;;
  neox14)  # 1.4B neox alone through launch.py (the real loop: log window, watcher), median of steps 3-8
    step neox14 python3 bench/train_throughput.py --model 1.4B --micro 4 --accum 8 --peers '' --out "$RES/neox14" ;;
  peers14)  # issue 16's table on one GPU: 1.4B neox against HF eager, HF compiled and the compiled minimal GPT
    step peers14 python3 bench/train_throughput.py --model 1.4B --micro 4 --accum 8 --peers hf,mini_compile \
        --out "$RES/peers14" ;;
  m125default)  # issue 16: `model=125M` as a user runs it (no batch set: the launcher sizes the micro-batch)
    step m125default python3 bench/train_throughput.py --model 125M --micro 0 --peers '' --out "$RES/m125default" ;;
  m125)  # issue 16's 125M at its two best micro-batches
    step m125 python3 bench/train_throughput.py --model 125M --micro 32 --accum 4 --peers '' --neox '' \
        --neox 'train.micro_batch=64 train.grad_accum=2' --out "$RES/m125" ;;
  fp8_compiled)  # fp8 with the blocks compiled (one graph per block: the per-call host cost of torchao's casts)
    step fp8_compiled python3 bench/train_throughput.py --model 1.4B --micro 4 --accum 8 --fp8 --peers '' \
        --neox 'train.compile=true model.kernels=reference' --out "$RES/fp8_compiled" ;;
  fp8_recompiles)  # session 18: 1.4B fp8 fell from 59.8k tok/s at step 2 to ~52k by step 4: Dynamo's recompiles?
    TORCH_LOGS=recompiles,graph_breaks step fp8_recompiles python3 bench/train_throughput.py --model 1.4B --micro 4 \
        --accum 8 --steps 6 --peers '' --neox 'train.precision=fp8' --out "$RES/fp8_recompiles" ;;
  gputests) step gpu_tests python3 -m pytest -q -m gpu tests/kernels tests/parallel tests/model tests/train -p no:cacheprovider ;;
  *) say "unknown item $1" ;;
  esac
}
shift
for it in "${@:-build newtests tp2 fp8_tp2 profile_tp2 profile14 gputests}"; do
  for one in $it; do item "$one"; done
done
python3 bench/planner_calibrate.py --table "$RES"/planner_calibration_*.json > "$RES/tables.md" 2>&1
say "queue done"; touch "$RES/DONE"
