"""The typed run config: the single source of truth for every field a run can set.

The YAML files under conf/ only select and override these dataclasses. Every dataclass is
registered in Hydra's ConfigStore, so an unknown key anywhere fails at composition.
Derived values (dp size, the batch triad, padded vocab, FLOPs) are computed in
`neox.config.plan`, never stored back into these.

Each field declares, through `setting(...)`, what a change of it on resume means (error | warn |
ignore: `neox.checkpoint.config_check`) and the values it accepts (`neox.config.domains`, checked
by `make_plan` before anything runs). A new field without them fails tests/config/test_schema_meta.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from neox.config.domains import (ERROR, IGNORE, NON_NEGATIVE, PORT, POSITIVE, PROBABILITY, SEED, WARN, Choices,
                                 Domain, Each, Range, SplitSpec, at_least)
from neox.kernels import IMPLS, OPS


def setting(default: Any = MISSING, resume: str = WARN, domain: Optional[Domain] = None, *,
            factory: Optional[Callable[[], Any]] = None, **extra: Any) -> Any:
    """A schema field with its resume class and domain as dataclass metadata (OmegaConf ignores it)."""
    metadata = {"resume": resume, "domain": domain, **extra}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _op() -> Any:
    return setting(None, IGNORE, Choices(IMPLS))


# The per-op switches are the kernels' own list (neox.kernels.OPS), so a new op is configurable at once.
KernelOps = make_dataclass("KernelOps", [(op, Optional[str], _op()) for op in OPS], namespace={
    "__module__": __name__,
    "__doc__": "Per-op choice of kernel, auto | fused | reference; unset ops follow model.kernels. "
               "masked_softmax is the attention path for ALiBi (fused: materialized scores).",
})


@dataclass
class ModelConfig:
    name: str = setting(MISSING, IGNORE)
    n_layers: int = setting(MISSING, ERROR, Range(lo=1, eg="12"))
    d_model: int = setting(MISSING, ERROR, Range(lo=1, eg="768"))
    n_heads: int = setting(MISSING, ERROR, Range(lo=1, eg="12"))
    n_kv_heads: Optional[int] = setting(None, ERROR, at_least(1))  # None: as many as n_heads (MHA); fewer: GQA
    d_ff: Optional[int] = setting(None, ERROR, at_least(1))  # None: 4*d for gelu, 8/3*d rounded up to 64 for swiglu
    # Positions are weights only when learned: then a change is an error, else a warning.
    seq_len: int = setting(2048, WARN, at_least(1), resume_error_if={"model.position": "learned"})
    vocab_size: int = setting(50257, ERROR, at_least(1))  # the tokenizer's; the embedding is padded (vocab_multiple)
    vocab_multiple: int = setting(128, ERROR, at_least(1))  # pad the vocab to a multiple of this; never depends on tp
    position: str = setting("rotary", ERROR, Choices(("learned", "rotary", "alibi")))
    rotary_pct: float = setting(1.0, ERROR, Range(lo=0, hi=1, lo_open=True))  # fraction of each head's dims that rotate
    rotary_base: float = setting(10000.0, ERROR, POSITIVE)  # the rotation frequencies the weights learned
    rotary_interleaved: bool = setting(False, ERROR)  # GPT-J layout (pairs 2i,2i+1) instead of NeoX halves
    parallel_residual: bool = setting(False, ERROR)  # GPT-J/NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    norm: str = setting("layernorm", ERROR, Choices(("layernorm", "rmsnorm")))
    norm_eps: float = setting(1e-5, ERROR, POSITIVE)  # part of what the norm weights were trained against
    mlp: str = setting("gelu", ERROR, Choices(("gelu", "swiglu")))
    tied_embeddings: bool = setting(False, ERROR)
    bias: bool = setting(True, ERROR)
    dropout: float = setting(0.0, WARN, PROBABILITY)
    attn_dropout: float = setting(0.0, WARN, PROBABILITY)
    # normal (GPT-2) | small_init | wang_init (small_init + wang_init outputs); only a fresh run initializes
    init: str = setting("wang_init", WARN, Choices(("normal", "small_init", "wang_init")))
    init_std: float = setting(0.02, WARN, POSITIVE)  # used by init=normal
    activation_checkpointing: str = setting("none", IGNORE, Choices(("none", "full")))
    kernels: str = setting("auto", IGNORE, Choices(IMPLS))  # for every op (neox.kernels)
    kernel_ops: KernelOps = field(default_factory=KernelOps)  # per op, e.g. kernel_ops.cross_entropy=reference


@dataclass
class ParallelConfig:
    name: str = setting(MISSING, IGNORE)
    tp: int = setting(1, WARN, at_least(1))
    pp: int = setting(1, WARN, at_least(1))
    dp: Optional[int] = setting(None, WARN, at_least(1))  # None: world // (tp * pp)
    zero_stage: int = setting(0, WARN, Choices((0, 1, 2, 3)))
    zero_bucket_size: int = setting(50_000_000, IGNORE, at_least(1))  # elements; small keeps ZeRO-1/2 lean at dp=1
    sequence_parallel: bool = setting(False, WARN)
    # tp > 1 without SP: each block's forward runs two halves of the micro-batch in turn, one half's all-reduce
    # hidden behind the other's compute (neox.parallel.overlap); needs an even micro-batch to take effect
    tp_overlap: bool = setting(False, IGNORE)
    # compute: stages of equal work (the head weighs, the embedding lookup does not); parameters: of equal
    # weights; uniform: equal layer counts; type:Block: equal block counts
    pipe_partition: str = setting("compute", WARN)  # = neox.planner.layout.DEFAULT_PARTITION
    tp_across_nodes_is_slow: bool = setting(False, IGNORE)  # force a tp group wider than one node


@dataclass(frozen=True)
class GpuName(Domain):
    """A card the planner knows by name (`neox.planner.gpus.by_name`), checked at launch even when not planning."""

    def problem(self, value: Any) -> Optional[str]:
        from neox.errors import ConfigError
        from neox.planner.gpus import by_name, known_names

        try:
            by_name(str(value))
        except ConfigError:
            return f"is not a GPU the planner knows ({known_names()}; another card: cluster.gpu_memory_gb)"
        return None

    def example(self) -> Optional[str]:
        return "H100"


def _gpu() -> Any:
    # the card the run gets, by name (neox/planner/gpus.py: H100, H200, A100-40GB, A100-80GB); None: the
    # one detected here (local runs), else unknown (set it, or gpu_memory_gb, for plan=true / parallelism=auto)
    return setting(None, IGNORE, GpuName())


def _gbs() -> Any:
    return setting(None, IGNORE, Range(lo=0, lo_open=True, eg="450"))


@dataclass
class LocalCluster:
    kind: str = setting("local", IGNORE)
    gpus: Optional[int] = setting(None, IGNORE, at_least(1))  # None: every visible GPU
    include: Optional[str] = setting(None, IGNORE)  # GPU ids, e.g. "0,1" (like CUDA_VISIBLE_DEVICES)
    exclude: Optional[str] = setting(None, IGNORE)
    cpu_procs: int = setting(2, IGNORE, at_least(1))  # processes over gloo when there is no GPU
    master_port: Optional[int] = setting(None, IGNORE, PORT)  # None: a free port
    gpu: Optional[str] = _gpu()  # the planner's card when planning here for a GPU machine
    gpu_memory_gb: Optional[float] = setting(None, IGNORE, Range(lo=0, lo_open=True, eg="80"))  # GiB; overrides gpu's
    intra_node_gbs: Optional[float] = _gbs()  # GPU to GPU in a node, GB/s one way; None: the card's NVLink


@dataclass
class HostfileCluster:
    kind: str = setting("hostfile", IGNORE)
    hostfile: str = setting("~/jobs/hostfile", IGNORE)  # one `host slots=N` per line
    master_addr: Optional[str] = setting(None, IGNORE)  # None: the first host
    master_port: Optional[int] = setting(None, IGNORE, PORT)
    # deepspeed's multi-node launcher
    launcher: str = setting("pdsh", IGNORE, Choices(("pdsh", "openmpi", "mvapich", "slurm")))
    gpu: Optional[str] = _gpu()
    gpu_memory_gb: Optional[float] = setting(None, IGNORE, Range(lo=0, lo_open=True, eg="80"))  # GiB; overrides gpu's
    intra_node_gbs: Optional[float] = _gbs()  # GPU to GPU in a node, GB/s one way; None: the card's NVLink
    inter_node_gbs: Optional[float] = _gbs()  # one GPU's share of the network between nodes, GB/s; None: the card's


@dataclass
class SlurmCluster:
    kind: str = setting("slurm", IGNORE)
    partition: Optional[str] = setting(None, IGNORE)  # None: the cluster's default partition
    account: Optional[str] = setting(None, IGNORE)
    qos: Optional[str] = setting(None, IGNORE)
    nodes: int = setting(1, IGNORE, at_least(1))
    gpus_per_node: int = setting(8, IGNORE, NON_NEGATIVE)  # 0: CPU tasks over gloo (tests, CPU clusters)
    tasks_per_node: Optional[int] = setting(None, IGNORE, at_least(1))  # None: gpus_per_node (or 1 when it is 0)
    cpus_per_task: int = setting(8, IGNORE, at_least(1))
    mem_gb: Optional[int] = setting(None, IGNORE, at_least(1))
    time_min: int = setting(240, IGNORE, at_least(1))
    constraint: Optional[str] = setting(None, IGNORE)
    exclude: Optional[str] = setting(None, IGNORE)
    setup: List[str] = setting(resume=IGNORE, factory=list)  # shell lines run before the task
    # Any other sbatch flag (true: a bare flag, false: left out). An open node, not struct, so both
    # cluster.sbatch_extra.hold=true and cluster.sbatch_extra={mail-type:END} add keys.
    sbatch_extra: dict = setting(resume=IGNORE, factory=lambda: OmegaConf.create({}, flags={"struct": False}))
    max_requeue: int = setting(3, IGNORE, NON_NEGATIVE)
    wait: bool = setting(True, IGNORE)  # block until the job ends; false returns after submission
    signal_delay_s: int = setting(120, IGNORE, NON_NEGATIVE)  # USR2 this long before the time limit
    # A job pending this long for a reason it cannot get past (a partition limit, a drained node, a
    # hold) is cancelled, saying why; None: keep waiting.
    hopeless_pending_s: Optional[int] = setting(60, IGNORE, NON_NEGATIVE)
    gpu: Optional[str] = _gpu()
    gpu_memory_gb: Optional[float] = setting(None, IGNORE, Range(lo=0, lo_open=True, eg="80"))  # GiB; overrides gpu's
    intra_node_gbs: Optional[float] = _gbs()  # GPU to GPU in a node, GB/s one way; None: the card's NVLink
    inter_node_gbs: Optional[float] = _gbs()  # one GPU's share of the network between nodes, GB/s; None: the card's


@dataclass
class DataConfig:
    name: str = setting(MISSING, IGNORE)
    # embedded (this machine's Python stdlib source) | prepared
    kind: str = setting("embedded", WARN, Choices(("embedded", "prepared")))
    prefixes: List[str] = setting(resume=WARN, factory=list)  # prepared .bin/.idx paths, no extension
    weights: Optional[List[float]] = setting(None, WARN, Each(Range(lo=0, lo_open=True, eg="[0.3,0.7]")))  # per prefix
    # train,valid,test proportions, by documents (by sequences for files holding several per document)
    split: str = setting("969,30,1", WARN, SplitSpec())
    tokenizer: Optional[str] = setting(None, ERROR)  # tokenizer.json used to prepare the data
    cache_dir: Optional[str] = setting(None, IGNORE)  # index cache; None: beside the data
    allow_repeats: bool = setting(True, WARN)  # cover the requested samples with extra epochs
    embedded_vocab: int = setting(8192, ERROR, at_least(257))  # the embedded corpus's BPE vocab (>= 256 bytes + EOD)


@dataclass
class OptimConfig:
    lr: float = setting(6e-4, WARN, POSITIVE)
    min_lr: float = setting(6e-5, WARN, NON_NEGATIVE)  # and <= lr (plan.py)
    warmup_steps: int = setting(100, WARN, NON_NEGATIVE)
    decay: str = setting("cosine", WARN, Choices(("cosine", "linear", "constant")))
    decay_steps: Optional[int] = setting(None, WARN, at_least(1))  # None: train.steps
    weight_decay: float = setting(0.1, WARN, NON_NEGATIVE)
    beta1: float = setting(0.9, WARN, Range(lo=0, hi=1, hi_open=True))
    beta2: float = setting(0.95, WARN, Range(lo=0, hi=1, hi_open=True))
    eps: float = setting(1e-8, WARN, POSITIVE)
    grad_clip: float = setting(1.0, WARN, NON_NEGATIVE)  # 0: no clipping


@dataclass
class TrainConfig:
    steps: int = setting(1000, WARN, at_least(1))
    # any two of micro, accumulation, global determine the third: global = micro * accum * dp. micro_batch unset:
    # on GPUs the largest the planner fits (neox.launch.planning.size_micro_batch), else 8 per rank; accum unset: 1
    micro_batch: Optional[int] = setting(None, WARN, at_least(1))
    grad_accum: Optional[int] = setting(None, WARN, at_least(1))
    global_batch: Optional[int] = setting(None, WARN, at_least(1))
    # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 | fp8 (bf16 with the linear layers' matmuls in fp8;
    # Hopper or newer)
    # bf16 <-> fp8 on resume: the same bf16 weights and optimizer state, only the matmuls change (a warning)
    precision: str = setting("auto", ERROR, Choices(("auto", "fp32", "bf16", "fp16", "fp8")),
                             resume_same_state={"fp8": "bf16"})
    seed: int = setting(1234, WARN, SEED)
    eval_every: int = setting(100, IGNORE, at_least(1))
    eval_batches: int = setting(10, IGNORE, at_least(1))
    save_every: int = setting(100, IGNORE, at_least(1))
    keep_checkpoints: int = setting(3, IGNORE, at_least(1))
    # copy the state to pinned host memory and write it in the background; None: on GPU yes, on CPU no
    async_save: Optional[bool] = setting(None, IGNORE)
    log_every: int = setting(10, IGNORE, at_least(1))
    collective_timeout_s: int = setting(600, IGNORE, at_least(1))  # a dead or hung rank ends the job after this
    max_nonfinite_steps: int = setting(5, IGNORE, at_least(1))  # skipped non-finite steps in a row before it stops
    compile: bool = setting(False, IGNORE)  # torch.compile each block in place (neox/train/compile.py)
    # bf16/fp8 at ZeRO-0: neox's fused optimizer step (neox/train/fused_step.py); false: DeepSpeed's own, e.g.
    # to compare against it (same state either way)
    fused_step: bool = setting(True, IGNORE)
    peak_tflops: Optional[float] = setting(None, IGNORE, POSITIVE)  # the device's dense bf16 peak for MFU; None: known cards
    # start from these weights (a from-hf model dir, a run/checkpoint, an HF dir) when the run has no checkpoint
    init_from: Optional[str] = setting(None, IGNORE)


@dataclass
class LoggingConfig:
    tensorboard: bool = setting(True, IGNORE)
    wandb: bool = setting(True, IGNORE)  # offline without credentials; a missing wandb never breaks a run
    wandb_project: str = setting("neox", IGNORE)
    wandb_entity: Optional[str] = setting(None, IGNORE)
    progress: bool = setting(True, IGNORE)  # progress bars on long work before training (the embedded corpus)


@dataclass
class PlanConfig:
    """The planner (neox/planner): `plan=true` is shorthand for plan.show=true (the launcher rewrites it:
    Hydra cannot set a section to a bool). It prints memory per GPU term by term, the step time and
    whether the layout fits, and launches nothing. A launch whose layout is predicted not to fit is
    refused with that verdict unless plan.force=true."""
    show: bool = setting(False, IGNORE)
    force: bool = setting(False, IGNORE)


CLUSTER_SCHEMAS = {"local": LocalCluster, "hostfile": HostfileCluster, "slurm": SlurmCluster}


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    parallelism: ParallelConfig = MISSING
    # LocalCluster | HostfileCluster | SlurmCluster, picked by its kind (CLUSTER_SCHEMAS)
    cluster: Any = setting(MISSING, IGNORE, schemas=CLUSTER_SCHEMAS)
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_name: Optional[str] = setting(None, IGNORE)  # None: <model>-<parallelism>-<data>
    run_dir: Optional[str] = setting(None, IGNORE)  # None: runs/<run_name> (same command, same dir: it resumes)
    dry_run: bool = setting(False, IGNORE)  # validate and print the summary, launch nothing
    plan: PlanConfig = field(default_factory=PlanConfig)  # plan=true: the planner's report, launch nothing


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="parallelism", name="parallelism_schema", node=ParallelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    for kind, schema in CLUSTER_SCHEMAS.items():
        cs.store(group="cluster", name=f"{kind}_schema", node=schema)
