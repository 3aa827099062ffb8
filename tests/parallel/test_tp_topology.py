"""Topology groups on 4 real processes, apply_tensor_parallel's guard, and sharded state dicts."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from neox.config.layout import check_split
from neox.errors import ConfigError
from neox.model.gpt import GPT, GPTConfig
from neox.parallel import Topology, apply_tensor_parallel, merge_state_dicts, shard_dims, shard_state_dict



def _members(group, rank: int) -> list[int]:
    """Ranks of `group`, learned by communicating over it (not by trusting our own bookkeeping)."""
    onehot = torch.zeros(dist.get_world_size())
    onehot[rank] = 1
    dist.all_reduce(onehot, group=group)
    return onehot.nonzero().flatten().tolist()


def _worker(rank: int, world: int) -> None:
    # tp=2 x dp=2: tp peers adjacent (model axis fastest), dp peers strided.
    t = Topology.build(tp=2, pp=1)
    assert (t.tp_rank, t.dp_rank, t.pp_rank, t.dp_size) == (rank % 2, rank // 2, 0, 2)
    assert _members(t.tp_group, rank) == [rank - rank % 2, rank - rank % 2 + 1]
    assert _members(t.dp_group, rank) == [rank % 2, rank % 2 + 2]
    mpu = t.mpu()
    assert _members(mpu.get_model_parallel_group(), rank) == _members(t.tp_group, rank)  # pp == 1
    assert mpu.get_model_parallel_rank() == mpu.get_tensor_model_parallel_rank() == rank % 2
    assert mpu.get_data_parallel_group_ranks() == [rank % 2, rank % 2 + 2]
    assert mpu.get_tensor_model_parallel_src_rank() == rank - rank % 2
    assert not hasattr(mpu, "initialize_sequence_parallel")  # would make ZeRO ignore the mpu

    # pp=2 x tp=2: DeepSpeed's model-parallel group is pipe x tensor (all ranks of one replica).
    t = Topology.build(tp=2, pp=2)
    assert (t.pp_rank, t.tp_rank, t.dp_size) == (rank // 2, rank % 2, 1)
    assert _members(t.pp_group, rank) == [rank % 2, rank % 2 + 2]
    assert _members(t.mp_group, rank) == [0, 1, 2, 3] and t.mp_rank == rank
    assert t.ds_topology.get_rank(pipe=t.pp_rank, data=0, model=t.tp_rank) == rank

    with pytest.raises(ConfigError, match="world size"):
        Topology.build(tp=3)
    with pytest.raises(ConfigError, match="world size"):
        Topology.build(tp=2, pp=1, dp=1)


def test_topology_groups_on_4_processes(four_ranks) -> None:
    four_ranks.outcome("topology")  # _worker, run by the folder's shared 4-process spawn (conftest.py)


# ------------------------------------------------------------------------------- bad layouts
GOOD = GPTConfig(n_layers=1, d_model=64, n_heads=8, n_kv_heads=4, d_ff=128, seq_len=32, vocab_size=256)


@pytest.mark.parametrize("field,value,needle", [
    ("n_heads", 6, "n_heads=6"), ("n_kv_heads", 2, "n_kv_heads=2"), ("d_model", 66, "d_model=66"),
    ("d_ff", 130, "FFN size 130"), ("vocab_size", 258, "padded vocab 258"),
])
def test_tp_must_divide_sharded_dims(field: str, value: int, needle: str) -> None:
    cfg = dataclasses.replace(GOOD, **{field: value})
    with pytest.raises(ConfigError, match=needle):
        check_split(cfg, 4)  # the layout rule (tests/config/test_layout.py has the rest of it)
    # apply_tensor_parallel refuses too, before touching any process group
    fake = Topology(tp_size=4, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0,
                    tp_group=None, pp_group=None, dp_group=None, mp_group=None)
    if field != "n_heads":  # GPT itself cannot be built with d_model % n_heads != 0 shapes
        with pytest.raises(ConfigError, match=needle):
            apply_tensor_parallel(GPT(cfg), fake)


def test_shard_and_merge_state_dict_round_trip() -> None:
    cfg = dataclasses.replace(GOOD, mlp="swiglu", tied_embeddings=False)
    model = GPT(cfg)
    full, dims = model.state_dict(), shard_dims(model)
    assert dims["blocks.0.attn.qkv.weight"] == 0 and dims["blocks.0.attn.proj.weight"] == 1
    assert dims["blocks.0.attn.proj.bias"] is None and dims["embed.tok.weight"] == 0
    assert dims["head.proj.weight"] == 0 and dims["blocks.0.ln_attn.weight"] is None
    shards = [shard_state_dict(full, dims, r, 4) for r in range(4)]
    assert shards[1]["blocks.0.mlp.fc_in.weight"].shape == (2 * cfg.d_ff // 4, cfg.d_model)
    merged = merge_state_dicts(shards, dims)
    assert all(torch.equal(merged[k], full[k]) for k in full)
