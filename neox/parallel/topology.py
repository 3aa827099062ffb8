"""One topology, every process group: pipe x data x model (tensor), model fastest.

Rank layout follows DeepSpeed's `PipeModelDataParallelTopology(num_pp, num_mp, num_dp)`:
rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank. Tensor-parallel peers are adjacent ranks,
so with a node-contiguous launcher a TP group stays inside one node (its all-reduces are on the
critical path of every layer), while data-parallel gradient reductions and pipeline sends cross
nodes.

`Topology.build` creates all groups once, after `torch.distributed` is initialized; the object
is passed explicitly to whoever needs a group. No module-level state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch.distributed as dist

from neox.errors import ConfigError


@dataclass(frozen=True, eq=False)
class Topology:
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any = field(repr=False)
    pp_group: Any = field(repr=False)
    dp_group: Any = field(repr=False)
    # DeepSpeed's "model parallel" group: every rank holding a different part of one model
    # replica (pipe x tensor, i.e. all ranks with this dp_rank). Gradient norms sum over it.
    mp_group: Any = field(repr=False)
    mp_rank: int = 0
    dp_ranks: List[int] = field(default_factory=list, repr=False)
    ds_topology: Any = field(default=None, repr=False)  # PipeModelDataParallelTopology

    @staticmethod
    def build(tp: int, pp: int = 1, dp: Optional[int] = None) -> "Topology":
        """Create every group; a collective call: all ranks must call it with the same sizes."""
        if not dist.is_initialized():
            raise ConfigError("Topology.build needs torch.distributed initialized first "
                              "(deepspeed.init_distributed or torch.distributed.init_process_group)")
        world = dist.get_world_size()
        if tp < 1 or pp < 1:
            raise ConfigError(f"parallel sizes must be >= 1, got tp={tp} pp={pp}")
        if dp is None:
            dp = world // (tp * pp)
        if tp * pp * dp != world:
            raise ConfigError(f"tp={tp} x pp={pp} x dp={dp} = {tp * pp * dp} does not match the "
                              f"world size {world}; fix parallelism.tp/pp/dp or the number of processes")
        # Imported here: deepspeed's import costs ~2 s, and only building a topology needs it.
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        rank = dist.get_rank()
        coord = topo.get_coord(rank)

        def mine(lists: List[List[int]]) -> Any:
            # new_group is collective over the world: every rank creates every group, in order.
            found = None
            for ranks in lists:
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    found = group
            return found

        mp_lists = [sorted(topo.get_axis_list(axis="data", idx=d)) for d in range(dp)]
        mp_ranks = next(r for r in mp_lists if rank in r)
        return Topology(
            tp_size=tp, pp_size=pp, dp_size=dp,
            tp_rank=coord.model, pp_rank=coord.pipe, dp_rank=coord.data,
            tp_group=mine(topo.get_axis_comm_lists("model")),
            pp_group=mine(topo.get_axis_comm_lists("pipe")),
            dp_group=mine(topo.get_axis_comm_lists("data")),
            mp_group=mine(mp_lists), mp_rank=mp_ranks.index(rank),
            dp_ranks=next(r for r in topo.get_axis_comm_lists("data") if rank in r),
            ds_topology=topo,
        )

    # Process groups cannot be pickled; a model holding the topology must still deepcopy (EMA,
    # evaluation copies), and the topology is immutable, so copies share it.
    def __copy__(self) -> "Topology":
        return self

    def __deepcopy__(self, memo: dict) -> "Topology":
        return self

    def mpu(self) -> "DeepSpeedMPU":
        """The object to pass as `deepspeed.initialize(mpu=...)` (pp == 1 only: with a
        `PipelineModule`, DeepSpeed requires mpu=None and builds its own grid from
        `ds_topology`, with the same rank layout and the same group semantics)."""
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """DeepSpeed's model-parallel-unit interface over a `Topology`.

    Semantics match DeepSpeed's own `PipelineParallelGrid`, which is what deepspeed 0.19.8
    assumes: `get_model_parallel_*` is the pipe x tensor group (norms and overflow flags are
    summed/maxed over it), `get_tensor_model_parallel_*` is the tensor group, used to count
    replicated parameters once (only tp_rank 0 contributes a parameter that is not marked
    `tensor_model_parallel`). With pp == 1 both groups coincide, so `clip_grad_norm_`
    (ZeRO-0, which filters on get_model_parallel_rank() == 0) is exact.
    Deliberately absent: `initialize_sequence_parallel` and `get_sequence_parallel_*`, which
    DeepSpeed reads as Ulysses sequence parallelism (and which make ZeRO ignore the mpu).
    """

    def __init__(self, topo: Topology):
        self._t = topo

    def get_global_rank(self) -> int:
        return dist.get_rank()

    # model parallel = pipe x tensor
    def get_model_parallel_rank(self) -> int:
        return self._t.mp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._t.tp_size * self._t.pp_size

    def get_model_parallel_group(self):
        return self._t.mp_group

    # tensor (slice) parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self._t.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._t.tp_size

    def get_tensor_model_parallel_group(self):
        return self._t.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank() - self._t.tp_rank  # tp peers are adjacent ranks

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self._t.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._t.dp_size

    def get_data_parallel_group(self):
        return self._t.dp_group

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self._t.dp_ranks)

    # pipeline parallel
    def get_pipe_parallel_rank(self) -> int:
        return self._t.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self._t.pp_size

    def get_pipe_parallel_group(self):
        return self._t.pp_group

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group
