"""Every fitted constant of the planner, with the date and the measurement it came from.

Nothing else in neox/planner holds a number fitted to a measurement: the memory terms are counted
from the model's code (neox/planner/memory.py) and the times from FLOPs, bytes and bandwidths
(neox/planner/step_time.py); these constants are what counting cannot know (allocator slack, how
close matmuls get to the peak, host time per layer). `bench/planner_calibrate.py --fit` refits them
from a measured JSON and prints this file's new values.

Sources (bench/RESULTS.md and the issue texts, NVIDIA H200, torch 2.11, DeepSpeed 0.19.8, bf16, seq 2048):
  [R1] 2026-11-30 issue 16: `model=1.4B` ZeRO-0 micro 4 x accum 8: 56,017 tok/s, peak allocated 35.0 GiB;
       micro 8 x accum 4: 58,063 tok/s, 48.6 GiB; `model=125M` micro 16 x 1: 304,629 tok/s, 14.5 GiB;
       micro 32 x 4: 451,193 tok/s, 27.1 GiB.
  [R2] 2026-11-30 issue 17 (2x H200): `model=6.7B parallelism=tp2` micro 4 x accum 4: 21,920 tok/s, 72 GB
       per GPU; `model=1.4B parallelism=zero1` dp=2: 114,351 tok/s.
  [R3] 2026-11-26 bench/RESULTS.md: `model=1.3B` 1 GPU micro 4 x 1: 36,812 tok/s; tp2 micro 4 x 1:
       46,998 tok/s (2 GPUs), 19.6 GiB; pp2 ZeRO-1 4 x 8: 95,127 tok/s, 23.2 GiB.
Status: first calibration, by hand against [R1]-[R3] (2026-11-30, planner helper); refit with the
measured table of bench/planner_calibrate.py when it comes back.
"""
from __future__ import annotations

CALIBRATED_ON = "2026-11-30 on H200 runs of bench/RESULTS.md and issues 16-17"

# ---------------------------------------------------------------------------------------------- memory
# Multiplies the activations as counted (memory.layer_activation_bytes). 1.0: [R1] 1.4B from micro 4 to 8
# grows the measured peak by 13.6 GiB, as counted (13.6 GiB).
ACTIVATION_SCALE = 1.0
# Allocated bytes no term names (cuBLAS workspaces, rotary tables, the loss's row statistics), set by
# hand: with it the five current-code peaks of [R1]-[R2] are predicted at 0.998-1.026 of the measured.
ALLOCATED_EXTRA_BYTES = 0.25 * 1024**3
# torch's caching allocator reserves more than the peak it allocated (block rounding, fragmentation).
# Not yet measured here (RESULTS.md logs allocated only): PyTorch's usual 5-10%, to be fitted.
RESERVED_FRACTION = 0.08
# Outside the allocator: the CUDA context, cuDNN/cuBLAS handles, NCCL's buffers per communicator.
# Not yet measured here: a typical 0.6 GiB context plus 0.2 GiB per process group (tp, dp, pp).
CONTEXT_BYTES = 0.6 * 1024**3
NCCL_BYTES_PER_GROUP = 0.2 * 1024**3
# A layout "fits" when the predicted total is at most this fraction of the card: the predictions
# aim at 5% (issue 18), so a layout predicted at 96% is not promised.
FIT_FRACTION = 0.95

# ---------------------------------------------------------------------------------------------- time
# The time constants below were fitted together (least squares on log tokens/s, 2026-11-30) to the 11
# runs of [R1]-[R3]; the 2026-11-26 runs of [R3] predate the fused kernels and were taken 5% faster.
# Residuals: 0.95 (the 2026-11-26 pp2 run) and 0.99-1.03 (the rest) of the measured tokens/s; the goal is 15%.
# Share of the dense bf16 peak the model's matmuls reach.
MATMUL_EFFICIENCY = 0.75
# Matmul efficiency falls for small local matmuls: eff = MATMUL_EFFICIENCY * n / (n + MATMUL_HALF_WORK)
# with n = tokens of one micro-batch x d / tp ([R1] 1.4B: micro 8 runs 3.7% faster than micro 4).
MATMUL_HALF_WORK = 1.1e6
# Memory-bound work (norms, activations, residual adds, rotary, the loss, the optimizer's elementwise
# math) as bytes moved per byte of activations the layer saves.
ELEMENTWISE_TRAFFIC = 10.9
# Host time per layer per micro-batch (forward + backward) that the GPU waits on when its own work is
# shorter. No run of [R1]-[R3] is host-bound with these constants (the closest: 1.3B tp2 at micro 4, 91 of
# 110 ms), so they only bound it from above; small micro-batches in the calibration runs will pin it.
HOST_SECONDS_PER_LAYER = 3.5e-3
# Per optimizer step: a fixed part (the engine's step, clipping, logging) and a part per parameter the
# GPU updates, as bytes at HBM speed (DeepSpeed's unfused optimizer casts and copies each gradient and
# weight besides AdamW's own reads and writes): [R1] 125M and [R3] 1.3B at accum 1 against accum 4-8.
STEP_OVERHEAD_S = 0.032
OPTIMIZER_BYTES_PER_PARAM = 166.0
# Share of a link's bandwidth NCCL's collectives reach (not fitted: NCCL's usual bus efficiency), and
# each collective's latency (fitted: [R2] 6.7B tp2, [R3] 1.3B tp2).
COMM_EFFICIENCY = 0.7
COMM_LATENCY_S = 90e-6
# Share of the data-parallel communication hidden behind compute. DeepSpeed overlaps it only with
# overlap_comm, which neox leaves at DeepSpeed's default: off for ZeRO-1/2, on for ZeRO-3. Not measured
# yet (0.5 for ZeRO-3 is a guess); [R2]'s dp=2 ZeRO-1 run at 1.4B is fitted with none hidden.
DP_OVERLAP = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.5}
