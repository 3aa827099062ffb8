"""The collectives tensor and data parallelism use, timed between the GPUs of this machine.

    python bench/comm_bandwidth.py [--gpus 2] [--sizes-mib 1,4,16,32,64,256] [--out $OUT/comm.json]
    python bench/comm_bandwidth.py --cpu     # gloo on CPU processes: checks the script, measures nothing useful

One process per GPU (torch.multiprocessing, NCCL), bf16 tensors; for each size: all-reduce, all-gather and
reduce-scatter, 5 warm-up then 20 timed calls between CUDA events, the median. Prints one table per size with
the time, the algorithm bandwidth (bytes / time) and the bus bandwidth as nccl-tests defines it (all-reduce:
algbw * 2(n-1)/n; all-gather and reduce-scatter: algbw * (n-1)/n), which is what the planner's
`cluster.intra_node_gbs` means. Why: a 1.3B tp2 micro-batch of 4 makes 32 MiB all-reduces, 96 of them per
micro-batch; whether they can hide behind compute depends on this number.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
from pathlib import Path
from typing import Dict, List

OPS = ("all_reduce", "all_gather", "reduce_scatter")
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_op(op: str, numel: int, world: int, device, warmup: int, iters: int) -> float:
    """Median seconds of one call of `op` on `numel` bf16 elements (the full tensor's size)."""
    import time

    import torch
    import torch.distributed as dist

    full = torch.ones(numel, dtype=torch.bfloat16, device=device)
    shard = torch.ones(numel // world, dtype=torch.bfloat16, device=device)
    call = {"all_reduce": lambda: dist.all_reduce(full),
            "all_gather": lambda: dist.all_gather_into_tensor(full, shard),
            "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, full)}[op]
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            call()
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, sizes_mib: List[float], cpu: bool, iters: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cpu") if cpu else torch.device("cuda", rank)
    if not cpu:
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if cpu else "nccl", rank=rank, world_size=world)
    rows: List[Dict] = []
    try:
        for mib in sizes_mib:
            numel = int(mib * 2**20 / 2) // world * world  # bf16; divisible into the ranks' shards
            for op in OPS:
                t = _time_op(op, numel, world, device, warmup=5 if not cpu else 1, iters=iters)
                # every rank's median, the slowest counts (a collective ends when the last rank does)
                worst = torch.tensor([t], dtype=torch.float64, device=device)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                t = worst.item()
                algbw = numel * 2 / t / 1e9
                rows.append({"op": op, "mib": mib, "seconds": t, "algbw_gbs": algbw,
                             "busbw_gbs": algbw * BUS_FACTOR[op](world)})
        if rank == 0:
            Path(out).write_text(json.dumps({"world": world, "backend": "gloo" if cpu else "nccl",
                                             "device": "cpu" if cpu else torch.cuda.get_device_name(0),
                                             "rows": rows}, indent=1))
    finally:
        dist.destroy_process_group()


def table(result: Dict) -> str:
    lines = [f"{result['backend']} between {result['world']} x {result['device']}, bf16, median of the timed calls",
             "", "| MiB | op | time ms | algbw GB/s | busbw GB/s |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mib']:g} | {r['op']} | {r['seconds'] * 1e3:.3f} | {r['algbw_gbs']:.1f} | "
                     f"{r['busbw_gbs']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--sizes-mib", default="1,4,16,32,64,256")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cpu", action="store_true", help="gloo between CPU processes (checks the script)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/bench")) / "comm_bandwidth.json")
    args = ap.parse_args(argv)
    import torch
    import torch.multiprocessing as mp

    if not args.cpu and torch.cuda.device_count() < args.gpus:
        print(f"comm_bandwidth: {args.gpus} GPUs asked, {torch.cuda.device_count()} visible; use --gpus or --cpu",
              file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in args.sizes_mib.split(",")]
    mp.spawn(_worker, args=(args.gpus, _free_port(), sizes, args.cpu, args.iters, str(args.out)), nprocs=args.gpus)
    text = table(json.loads(args.out.read_text()))
    print(text)
    args.out.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
