"""Tensor-parallel generation: `python -m neox.generate <model> prompt=... tp=2`.

The command starts `tp` processes (CPU processes over gloo, or one GPU each over NCCL), each running this
module. Every rank reads the full weights, builds `GPT`, and shards it with the trainer's own
`apply_tensor_parallel` (each rank keeps its heads, its MLP columns and its vocab rows); `GPT.decode`
then runs unchanged on the shard, its KV cache holding this rank's kv heads. Each step's vocab-sharded
logits are gathered, and rank 0's choice of next tokens is broadcast so that every rank feeds the same
ones (sampling draws agree anyway; this makes it certain). Rank 0 prints; interactive mode is tp=1 only.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import List

import torch

from neox.errors import ConfigError, NeoxError


def launch(args: List[str], tp: int) -> int:
    """Run this module in `tp` processes (rank 0's output passes through); the first failure's exit code."""
    from neox.generate.__main__ import parse

    _, _, opts = parse(args)
    if opts.interactive:
        raise ConfigError("interactive=true runs with tp=1 (one process reads the terminal)")
    gpus = torch.cuda.device_count()
    if gpus and tp > gpus:
        raise ConfigError(f"tp={tp} needs {tp} GPUs; {gpus} are visible")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(tp):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        env.setdefault("OMP_NUM_THREADS", "1")
        if not gpus:
            env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's topology import would print its guess to stdout
        quiet = subprocess.DEVNULL if rank else None  # rank 0 speaks for all; the others' errors are kept
        procs.append(subprocess.Popen([sys.executable, "-m", "neox.generate.tensor_parallel", *args], env=env,
                                      stdout=quiet, stderr=subprocess.PIPE if rank else None, text=True))
    codes = [p.wait() for p in procs]
    if codes[0] == 0 and any(codes):
        rank = next(r for r, c in enumerate(codes) if c)
        err = (procs[rank].stderr.read() or "").strip().splitlines()
        print(f"neox: error: tensor-parallel rank {rank} failed: {err[-1] if err else 'no message'}", file=sys.stderr)
    return next((c for c in codes if c), 0)


def worker(args: List[str]) -> int:
    import torch.distributed as dist

    from neox.generate.__main__ import parse, read_prompts, serve
    from neox.generate.engine import Generator, load_for_inference
    from neox.parallel import Topology, apply_tensor_parallel
    from neox.parallel.comm import all_gather_no_grad

    path, sampling, opts = parse(args)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        topo = Topology.build(tp=world, pp=1, dp=1)
        device = opts.device or (f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
        model, tok, dev = load_for_inference(path, opts.tokenizer, device, opts.dtype)
        model = apply_tensor_parallel(model, topo)

        def decode(tokens: torch.Tensor, cache) -> torch.Tensor:
            return all_gather_no_grad(model.decode(tokens, cache), -1, topo.tp_group)

        def agree(tokens: torch.Tensor) -> torch.Tensor:
            dist.broadcast(tokens, src=dist.get_global_rank(topo.tp_group, 0), group=topo.tp_group)
            return tokens

        gen = Generator(model, tok, dev, decode=decode, agree=agree)
        prompts = list(opts.prompt) + (read_prompts(opts.prompts_file) if opts.prompts_file else [])
        return serve(gen, prompts, sampling, opts, main=rank == 0)
    finally:
        dist.destroy_process_group()


def main() -> int:
    try:
        return worker(sys.argv[1:])
    except NeoxError as exc:  # rank 0's line reaches the terminal; the launcher keeps the others' for itself
        print(f"neox: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
