"""Every fitted constant of the planner, with the date and the measurement it came from.

Nothing else in neox/planner holds a number fitted to a measurement: the memory terms are counted
from the model's code (neox/planner/memory.py) and the times from FLOPs, bytes and bandwidths
(neox/planner/step_time.py); these constants are what counting cannot know (allocator slack, how
close matmuls get to the peak, host time per layer). `bench/planner_calibrate.py --fit` refits them
from measured JSONs and prints this file's new values.

Sources (NVIDIA H200, torch 2.11, DeepSpeed 0.19.8, bf16, seq 2048, neox's fused kernels):
  [M1] 2026-11-30, `python bench/planner_calibrate.py --gpus 1`: 8 real launch.py runs, 125M-6.7B, ZeRO 0-3,
       checkpointing off/on, micro 1-16; peak allocated / reserved / nvidia-smi and tokens/s.
  [R1] 2026-11-30 issue 16: `model=1.4B` ZeRO-0 micro 4 x accum 8: 56,017 tok/s, peak allocated 35.0 GiB;
       micro 8 x accum 4: 58,063 tok/s, 48.6 GiB; `model=125M` micro 16 x 1: 304,629 tok/s, 14.5 GiB;
       micro 32 x 4: 451,193 tok/s, 27.1 GiB.
  [R2] 2026-11-30 issue 17 (2x H200): `model=6.7B parallelism=tp2` micro 4 x accum 4: 21,920 tok/s, 72 GB
       per GPU; `model=1.4B parallelism=zero1` dp=2: 114,351 tok/s; one GPU 55,667.
  [R3] 2026-11-26 bench/RESULTS.md (older kernels, taken 5% faster): `model=1.3B` 1 GPU micro 4 x 1:
       36,812 tok/s; tp2 micro 4 x 1: 46,998 tok/s (2 GPUs); pp2 ZeRO-1 4 x 8: 95,127; ZeRO-1 4 x 8: 55,221.
  [M2] 2026-11-30 (third session), 2x H200, `bench/gpu_queue_2x.sh` (bench/RESULTS.md, "Session 14"):
       10 real launch.py runs: 1.4B parallelism=auto (dp2 ZeRO-1 micro 32) and two hand layouts (dp2 ZeRO-1
       m4 x 8, tp2 m8 x 8), 1.3B tp2 m4 x 8 with and without sequence parallelism, 1.3B pp2 at m = 4, 8, 16,
       and 1.3B and 1.4B on one GPU (ZeRO-1 m4 x 8).
  [M3] 2026-11-30 (fourth session), 2x H200, commit 18398d1 (bench/RESULTS.md, "Session 15"): 6.7B
       parallelism=auto (dp2 ZeRO-1 m4 x 8) and two hand layouts (tp2 m4 x 16, pp2 ZeRO-1 m2 x 32), and
       [M1]'s three 1.4B one-GPU rows again (ZeRO-0 m4, ZeRO-2 m8 ckpt, ZeRO-3 m2), which predated the
       in-place rotary attention and the fused bf16 optimizer step.
Every set's JSON is in bench/measured/. The constants below are `python bench/planner_calibrate.py --fit
$(ls bench/measured/*.json | sort) --skip "1.3B tp2 sp m4x8"` (20 runs; a case measured again replaces its
older run), but for ACTIVATION_SCALE, which the fit put at 0.990 and which stays 1.0: the activations are
counted exactly. The 6.7B runs of [M3] were first predicted with the constants fitted before them (out of
sample): allocated within 0.3%, reserved within 3.9%, tokens/s within 5.8%. [R1]-[R3] no longer describe
the code (older kernels and attention).
"""
from __future__ import annotations

CALIBRATED_ON = "2026-11-30 on 20 H200 runs, 1 and 2 GPUs (calibration.py)"

# ---------------------------------------------------------------------------------------------- memory
# With these, the 21 runs' (the sequence-parallel one too) peaks allocated are predicted at 0.990-1.026 of
# the measured; reserved at 0.955-1.045 (1.4B dp2 ZeRO-1 micro 32 x accum 1 was at 1.212 before
# RESERVED_REUSE_RATIO).
# Multiplies the activations as counted (memory.layer_activation_bytes): 1.0, none needed.
ACTIVATION_SCALE = 1.0
# Allocated bytes no term names (cuBLAS workspaces, rotary tables, the loss's row statistics), by hand.
ALLOCATED_EXTRA_BYTES = 0.279 * 1024**3
# torch's caching allocator reserves more than the peak it allocated (block rounding, fragmentation):
# the median reserved / allocated - 1 of the runs of each ZeRO stage (ZeRO's flat partitions and buckets
# fragment it more; ZeRO-2 and ZeRO-3 from one run each, [M3]).
RESERVED_FRACTION = {0: 0.0456, 1: 0.1901, 2: 0.1063, 3: 0.171}
# ZeRO-1..3's slack comes with the optimizer step's fp32 buffers, allocated once the activations are freed:
# when the freed activations are more than this many times those buffers, the step reuses their blocks and
# the slack shrinks in proportion (memory.Memory.step_reuse). [M2]'s 1.4B dp2 ZeRO-1 micro 32 x accum 1
# (activations 24x the step's buffers) reserved only 0.3 GiB over its peak; fitted by hand to that run, the
# only one whose activations exceed 3.1x (the rest, 1.0-3.1x, keep the whole fraction).
RESERVED_REUSE_RATIO = 3.0
# Outside the allocator (CUDA context, cuBLAS/cuDNN handles): nvidia-smi's peak minus the peak reserved,
# the median over the one-GPU runs; NCCL's buffers per process group (tp, pp, dp): the median of what the
# 2-GPU runs [M2] add beyond that.
CONTEXT_BYTES = 2.058 * 1024**3
NCCL_BYTES_PER_GROUP = 1.629 * 1024**3
# A layout "fits" when the predicted total is at most this fraction of the card: the predictions
# aim at 5% (issue 18), so a layout predicted at 96% is not promised.
FIT_FRACTION = 0.95

# ---------------------------------------------------------------------------------------------- time
# Fitted together (least squares on log tokens/s, 2026-11-30) to the 20 runs above: residuals 0.912-1.088
# of the measured tokens/s (goal: 15%); the sequence-parallel run by its own factor below.
# Share of the dense bf16 peak the model's matmuls reach, at most: bounded by the 794 TFLOP/s (80% of 989)
# a bf16 8192^3 matmul reached on this card (shared FACTS.md).
MATMUL_EFFICIENCY = 0.784
# Matmul efficiency falls for small local matmuls: eff = MATMUL_EFFICIENCY * n / (n + MATMUL_HALF_WORK)
# with n = tokens of one micro-batch x d / tp.
MATMUL_HALF_WORK = 1.667e6
# Memory-bound work (norms, activations, residual adds, rotary, the loss, the optimizer's elementwise
# math) as bytes moved per byte of activations the layer saves.
ELEMENTWISE_TRAFFIC = 10.77
# Host time per layer per micro-batch (forward + backward) that the GPU waits on when its own work is
# shorter ([M1]'s micro-1 runs bound it).
HOST_SECONDS_PER_LAYER = 2.973e-3
# Per optimizer step: a fixed part (the engine's step, clipping, logging) and a part per parameter the
# GPU updates, as bytes at HBM speed (casts and copies of each gradient and weight besides AdamW's own
# reads and writes; the runs before the fused bf16 step, neox/train/fused_step.py, made more of them).
STEP_OVERHEAD_S = 0.0395
OPTIMIZER_BYTES_PER_PARAM = 126.3
# Per layer per micro-batch, forward + backward: the time ZeRO-2's gradient hooks (bucketing, reducing
# into the partition) and ZeRO-3's (gathering and releasing every layer's weights) add. One run each in
# [M3] (1.4B ZeRO-2 micro 8 ckpt: 47,101 tok/s, no cost left to fit; 1.4B ZeRO-3 micro 2: 12,330 tok/s, on
# one GPU).
ZERO_SECONDS_PER_LAYER = {2: 0.0, 3: 9.067e-3}
# Share of a link's bandwidth NCCL's collectives reach (not fitted: NCCL's usual bus efficiency), and
# each collective's latency (fitted: [M2]'s tp2 runs).
COMM_EFFICIENCY = 0.7
COMM_LATENCY_S = 1.045e-4
# Sequence parallelism's tp collectives (all-gather and reduce-scatter along the sequence) as a multiple
# of the all-reduces they replace: [M2] 1.3B tp2 micro 4 x 8 ran 50,654 tok/s with it, 77,169 without
# (the same volume in theory; neox's SP path is slower: issue 17). One run; fitted by hand to it.
SEQUENCE_PARALLEL_TP_FACTOR = 3.63
# Share of the data-parallel communication hidden behind compute. DeepSpeed overlaps it only with
# overlap_comm, which neox leaves at DeepSpeed's default: off for ZeRO-1/2, on for ZeRO-3. Not measured
# yet (0.5 for ZeRO-3 is a guess); [R2]'s dp=2 ZeRO-1 run at 1.4B is fitted with none hidden.
DP_OVERLAP = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.5}
