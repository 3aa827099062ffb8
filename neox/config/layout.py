"""The layout rule: whether tp x pp x dp fits the model and the resources, decided in one place.

`resolve_layout(parallel, model, resources, dry_run)` is the one check of a layout; the planner
(`neox.config.plan.make_plan`) runs it before a launch and again in every worker. Its two halves
serve the callers that hold only one side of it:

- `check_split(model, tp, pp, sequence_parallel)`, what the model's shape allows (ConfigError):
  `neox.parallel.tensor.apply_tensor_parallel` runs it as its guard for a model built outside a plan;
- `fit(tp, pp, dp, resources, ...)`, what the resources allow (LaunchError): the ranks against the
  slots, and tensor-parallel groups inside one node; `neox.launch.slurm.check` runs it against the
  job it is about to ask for.

Every message names the config key that fixes it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Tuple

from neox.config.resources import Resources
from neox.errors import ConfigError, LaunchError

if TYPE_CHECKING:  # the rule reads a few fields; importing the model would import torch
    from neox.model.gpt import GPTConfig

PIPE_PARTITIONS = ("compute", "uniform", "parameters")  # or type:<LayerClass>
# A dry run of a layout bigger than this machine plans for another one: nodes of this many GPUs.
DRY_RUN_NODE = 8


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    dp: int
    warnings: Tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"tp={self.tp} x pp={self.pp} x dp={self.dp}"


def resolve_layout(parallel: Any, model: GPTConfig, res: Resources, dry_run: bool = False) -> Layout:
    """Check `parallel` (the schema's ParallelConfig) for `model` on `res` and return the layout.

    Raises on the first problem; on a dry run what only a launch would refuse (too few slots) is a
    warning instead, since a dry run may plan for another machine."""
    if parallel.zero_stage >= 2 and parallel.pp > 1:
        raise ConfigError(f"parallelism.zero_stage={parallel.zero_stage} with pp={parallel.pp}: DeepSpeed does not "
                          "support ZeRO-2/3 with pipeline parallelism; use zero_stage=1 or pp=1")
    partition = parallel.pipe_partition
    if partition not in PIPE_PARTITIONS and not partition.startswith("type:"):
        raise ConfigError(f"parallelism.pipe_partition={partition!r} must be compute, uniform, parameters or type:<Layer>")
    check_split(model, parallel.tp, parallel.pp, parallel.sequence_parallel)
    if parallel.tp_overlap and parallel.sequence_parallel:
        raise ConfigError("parallelism.tp_overlap hides the all-reduces of tensor parallelism without sequence "
                          "parallelism; set parallelism.sequence_parallel=false or parallelism.tp_overlap=false")
    if parallel.tp_overlap and parallel.zero_stage == 3:
        raise ConfigError("parallelism.tp_overlap does not work with ZeRO-3 (it releases a layer's bias before the "
                          "overlapped all-reduce is finished); use parallelism.zero_stage<=2 or tp_overlap=false")
    return fit(parallel.tp, parallel.pp, parallel.dp, res, dry_run=dry_run,
               tp_across_nodes=parallel.tp_across_nodes_is_slow)


def check_split(model: GPTConfig, tp: int, pp: int = 1, sequence_parallel: bool = False) -> None:
    """Every dimension tensor parallelism shards splits evenly (nothing is padded or replicated behind
    the user's back), every pipeline stage gets a layer, and sequence parallelism splits seq_len."""
    for key, value in (("model.n_heads", model.n_heads), ("model.n_kv_heads", model.n_kv_heads),
                       ("model.d_model", model.d_model)):
        if value % tp:
            raise ConfigError(f"{key}={value} is not divisible by parallelism.tp={tp}; choose a tp that divides it")
    if model.d_ff % tp:
        raise ConfigError(f"the FFN size {model.d_ff} is not divisible by parallelism.tp={tp}; set model.d_ff")
    if model.vocab_size % tp:
        raise ConfigError(f"the padded vocab {model.vocab_size} is not divisible by parallelism.tp={tp}; "
                          "use a model.vocab_multiple that tp divides")
    if model.n_layers < pp:
        raise ConfigError(f"model.n_layers={model.n_layers} is fewer than parallelism.pp={pp} stages; lower pp")
    if sequence_parallel and model.seq_len % tp:
        raise ConfigError(f"parallelism.sequence_parallel needs model.seq_len={model.seq_len} divisible by "
                          f"parallelism.tp={tp}; change one of them")


def fit(tp: int, pp: int, dp: Optional[int], res: Resources, *, dry_run: bool = False,
        tp_across_nodes: bool = False) -> Layout:
    """The layout tp x pp x dp on `res` (dp None: as many replicas as the slots hold), checked against
    the slots and the nodes they sit on."""
    group = tp * pp
    if dp is None:
        if res.slots % group:
            raise LaunchError(f"{res.slots} {_unit(res)} cannot be split into tp={tp} x pp={pp} groups; "
                              f"set parallelism.dp or use a multiple of {group}")
        dp = res.slots // group
    layout = Layout(group * dp, tp, pp, dp)
    warnings = []
    problem = _slots_problem(layout, res, dry_run)
    if problem is not None:
        if not dry_run:
            raise LaunchError(problem)
        warnings.append(problem + " (dry run: launching would fail)")
    elsewhere = layout.world > res.slots  # a dry run planning for a bigger machine
    width = max(res.slots_per_node, DRY_RUN_NODE) if elsewhere else res.slots_per_node
    # Ranks fill nodes in order and tp peers are adjacent ranks: a group straddles two nodes unless
    # the node width is a multiple of tp (or the world is one node).
    if layout.world > width and width % tp and not tp_across_nodes:
        raise LaunchError(f"parallelism.tp={tp} does not fit inside one node of {width} {_unit(res, elsewhere)}, "
                          f"so every layer would all-reduce across nodes; use a tp that divides {width}, or set "
                          "parallelism.tp_across_nodes_is_slow=true to force it")
    return dataclasses.replace(layout, warnings=tuple(warnings))


def _unit(res: Resources, elsewhere: bool = False) -> str:
    return "GPUs" if res.device == "cuda" or elsewhere else "processes"


def _slots_problem(layout: Layout, res: Resources, dry_run: bool) -> Optional[str]:
    """What keeps the launcher from starting `layout.world` ranks on `res`, or None. A Slurm job's
    tasks and a started world are ranks already: there the layout must use every slot."""
    world, slots = layout.world, res.slots
    unit = _unit(res, elsewhere=dry_run)
    if res.kind == "slurm" and world > slots:
        per_node = res.slots_per_node
        return (f"the layout {layout} = {world} ranks needs {world} {unit} but cluster.nodes={res.nodes} x "
                f"{per_node} tasks per node gives {slots}: set cluster.nodes={-(-world // per_node)} or shrink "
                "the layout")
    if res.kind == "slurm" and world < slots:
        return (f"the layout {layout} = {world} ranks does not match the job's cluster.nodes={res.nodes} x "
                f"{res.slots_per_node} tasks per node = {slots} ranks: set cluster.nodes (or "
                "cluster.tasks_per_node) so they are equal")
    if res.kind == "worker" and world != slots:
        return (f"the launcher started {slots} workers but the layout {layout} needs {world}; start the run "
                "with launch.py, which starts as many as the layout needs")
    if world > slots:
        return (f"the layout {layout} needs {world} {unit}, but {slots} are available here; use a smaller "
                "layout or a cluster with more GPUs")
    if res.nodes > 1 and (world % res.nodes or world // res.nodes > res.slots_per_node):
        # the multi-node launcher starts world / nodes ranks on every node
        return (f"the layout {layout} = {world} ranks cannot be spread evenly over {res.nodes} nodes of "
                f"{res.slots_per_node} {unit}; set parallelism.dp so that tp x pp x dp is a multiple of "
                f"{res.nodes} and at most {res.nodes * res.slots_per_node}")
    return None
