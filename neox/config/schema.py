"""The typed run config: the single source of truth for every field a run can set.

The YAML files under conf/ only select and override these dataclasses. Every dataclass is
registered in Hydra's ConfigStore, so an unknown key anywhere fails at composition.
Derived values (dp size, the batch triad, padded vocab, FLOPs) are computed in
`neox.config.plan`, never stored back into these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class KernelOps:
    """Per-op choice of kernel, auto | fused | reference; unset ops follow model.kernels."""
    layer_norm: Optional[str] = None
    rms_norm: Optional[str] = None
    rotary: Optional[str] = None
    masked_softmax: Optional[str] = None  # the attention path for ALiBi (fused: materialized scores)
    bias_gelu: Optional[str] = None
    swiglu: Optional[str] = None
    cross_entropy: Optional[str] = None


@dataclass
class ModelConfig:
    name: str = MISSING
    n_layers: int = MISSING
    d_model: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (MHA); fewer: grouped-query
    d_ff: Optional[int] = None  # None: 4*d for gelu, 8/3*d rounded up to 64 for swiglu
    seq_len: int = 2048
    vocab_size: int = 50257  # the tokenizer's vocab; the embedding is padded (see vocab_multiple)
    vocab_multiple: int = 128  # pad the vocab to a multiple of this; never depends on tp
    position: str = "rotary"  # learned | rotary | alibi
    rotary_pct: float = 1.0  # fraction of each head's dims that rotate
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False  # GPT-J layout (pairs 2i,2i+1) instead of NeoX halves
    parallel_residual: bool = False  # GPT-J/NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu
    tied_embeddings: bool = False
    bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    init: str = "wang_init"  # normal (GPT-2) | small_init | wang_init (small_init + wang_init outputs)
    init_std: float = 0.02  # used by init=normal
    activation_checkpointing: str = "none"  # none | full
    kernels: str = "auto"  # auto | fused | reference, for every op (neox.kernels)
    kernel_ops: KernelOps = field(default_factory=KernelOps)  # per op, e.g. kernel_ops.cross_entropy=reference


@dataclass
class ParallelConfig:
    name: str = MISSING
    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None  # None: world // (tp * pp)
    zero_stage: int = 0
    zero_bucket_size: int = 50_000_000  # elements; small buckets keep ZeRO-1/2 lean at dp=1
    sequence_parallel: bool = False
    pipe_partition: str = "parameters"  # uniform | parameters | type:Block
    tp_across_nodes_is_slow: bool = False  # force a tp group wider than one node


@dataclass
class LocalCluster:
    kind: str = "local"
    gpus: Optional[int] = None  # None: every visible GPU
    include: Optional[str] = None  # GPU ids, e.g. "0,1" (like CUDA_VISIBLE_DEVICES)
    exclude: Optional[str] = None
    cpu_procs: int = 2  # processes over gloo when there is no GPU
    master_port: Optional[int] = None  # None: a free port


@dataclass
class HostfileCluster:
    kind: str = "hostfile"
    hostfile: str = "~/jobs/hostfile"  # one `host slots=N` per line
    master_addr: Optional[str] = None  # None: the first host
    master_port: Optional[int] = None
    launcher: str = "pdsh"  # deepspeed's multi-node launcher: pdsh | openmpi | mvapich | slurm


@dataclass
class SlurmCluster:
    kind: str = "slurm"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 8  # 0: CPU tasks over gloo (tests, CPU clusters)
    tasks_per_node: Optional[int] = None  # None: gpus_per_node (or 1 when it is 0)
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    time_min: int = 240
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    setup: List[str] = field(default_factory=list)  # shell lines run before the task
    sbatch_extra: dict = field(default_factory=dict)  # passed as additional sbatch parameters
    max_requeue: int = 3
    wait: bool = True  # block until the job ends; false returns after submission
    signal_delay_s: int = 120  # USR2 this long before the time limit


@dataclass
class DataConfig:
    name: str = MISSING
    kind: str = "embedded"  # embedded (this machine's Python stdlib source) | prepared
    prefixes: List[str] = field(default_factory=list)  # prepared .bin/.idx paths, no extension
    weights: Optional[List[float]] = None  # blend weights, one per prefix
    split: str = "969,30,1"  # train,valid,test proportions, by documents
    tokenizer: Optional[str] = None  # tokenizer.json used to prepare the data
    cache_dir: Optional[str] = None  # index cache; None: beside the data
    allow_repeats: bool = True  # cover the requested samples with extra epochs
    embedded_vocab: int = 8192  # BPE vocab trained on the embedded corpus


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant
    decay_steps: Optional[int] = None  # None: train.steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch: Optional[int] = None  # any two of micro, accumulation, global
    grad_accum: Optional[int] = None  #   determine the third: global = micro * accum * dp
    global_batch: Optional[int] = None
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 1234
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    collective_timeout_s: int = 600  # a dead or hung rank ends the job after this
    max_nonfinite_steps: int = 5  # skipped non-finite steps in a row before the run stops
    compile: bool = False  # torch.compile each block in place (neox/train/compile.py)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = True  # offline without credentials; a missing wandb never breaks a run
    wandb_project: str = "neox"
    wandb_entity: Optional[str] = None
    progress: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    parallelism: ParallelConfig = MISSING
    cluster: Any = MISSING  # LocalCluster | HostfileCluster | SlurmCluster
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_name: Optional[str] = None  # None: <model>-<parallelism>-<data>
    run_dir: Optional[str] = None  # None: runs/<run_name> (same command, same dir: it resumes)
    dry_run: bool = False  # validate and print the summary, launch nothing


CLUSTER_SCHEMAS = {"local": LocalCluster, "hostfile": HostfileCluster, "slurm": SlurmCluster}


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="parallelism", name="parallelism_schema", node=ParallelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    for kind, schema in CLUSTER_SCHEMAS.items():
        cs.store(group="cluster", name=f"{kind}_schema", node=schema)
