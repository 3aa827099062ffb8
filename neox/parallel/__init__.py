"""Model parallelism: one `Topology` of process groups, tensor/sequence parallelism applied to the
model from outside (`apply_tensor_parallel`), the vocab-parallel loss, and per-rank random streams.
Pipeline parallelism lives in `neox.parallel.pipeline` and builds on `Topology.ds_topology`."""
from neox.parallel.cross_entropy import make_loss_fn, vocab_parallel_cross_entropy
from neox.parallel.random import TPRandom, seed_all
from neox.parallel.tensor import (TP_PLAN, apply_tensor_parallel, gather_full_state_dict, load_full_state_dict,
                                  merge_state_dicts, shard_dims, shard_state_dict)
from neox.parallel.topology import DeepSpeedMPU, Topology

__all__ = [
    "Topology", "DeepSpeedMPU",
    "TP_PLAN", "apply_tensor_parallel", "shard_dims", "shard_state_dict", "merge_state_dicts",
    "load_full_state_dict", "gather_full_state_dict",
    "vocab_parallel_cross_entropy", "make_loss_fn",
    "TPRandom", "seed_all",
]
