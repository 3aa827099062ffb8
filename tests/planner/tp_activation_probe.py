"""Worker of test_memory_terms.py's tensor-parallel check: what autograd keeps per token for one block
sharded over 2 ranks (with and without sequence parallelism), written to a JSON file by rank 0."""
from __future__ import annotations

import dataclasses
import json

import torch

from neox.model.gpt import Block, GPTConfig
from neox.parallel import Topology, apply_tensor_parallel


def saved_bytes(block: torch.nn.Module, shape: tuple) -> int:
    """Bytes of the distinct storages autograd keeps for one forward of `block` on a random bf16 input of
    `shape` (its weights left out)."""
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(seen.values())


def probe(rank: int, world: int, configs: list, out: str) -> None:
    """Per config (GPTConfig fields) and sequence parallelism off/on: bytes kept per token of the batch."""
    topo = Topology.build(tp=world)
    result = []
    for cfg_fields in configs:
        cfg = GPTConfig(**cfg_fields)
        row = {}
        for sp in (False, True):
            torch.manual_seed(0)
            block = apply_tensor_parallel(Block(cfg), topo, sequence_parallel=sp, cfg=cfg).to(torch.bfloat16)
            s = cfg.seq_len // world if sp else cfg.seq_len  # a sequence-parallel block gets its share of tokens
            two, four = saved_bytes(block, (2, s, cfg.d_model)), saved_bytes(block, (4, s, cfg.d_model))
            row[str(sp)] = (four - two) / (2 * cfg.seq_len)
        result.append(row)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def fields(cfg: GPTConfig) -> dict:
    return dataclasses.asdict(cfg)
