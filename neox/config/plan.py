"""Validate a composed run config and derive everything that follows from it, in one place.

`make_plan(cfg, resources)` either raises one `ConfigError`/`LaunchError` whose message names the
fix, or returns a frozen `RunPlan`: the validated config typed once (`plan.config`, the schema's
dataclasses), the layout (world, tp, pp, dp), the batch triad, the padded vocab, the resolved model
shape, the FLOP count and the memory estimate. Everything after the entry points (workers, engine,
metrics, summary, launchers) reads the plan, never the raw `DictConfig`; neither is mutated. Each
field's own domain is declared on the schema (`neox.config.domains`); this module checks what
relates several fields.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from neox.config.domains import check_domains
from neox.config.layout import resolve_layout
from neox.config.memory import MemoryEstimate, estimate, gib
from neox.config.resources import Resources
from neox.config.schema import CLUSTER_SCHEMAS, ModelConfig, RunConfig
from neox.errors import ConfigError
from neox.model.gpt import GPTConfig, count_params

REFUSE_MEMORY = 2.0  # refuse a run estimated at this multiple of a device's memory: clearly impossible
WARN_MEMORY = 0.8  # warn above this fraction: the estimate leaves out the framework's own buffers


@dataclass(frozen=True)
class RunPlan:
    config: RunConfig  # the validated config as the schema's dataclasses; read, never written
    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    seq_len: int
    precision: str
    device: str
    model: GPTConfig
    params: dict
    flops_per_token: float
    run_dir: Path
    resources: Resources
    memory: MemoryEstimate
    warnings: tuple = ()

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def flops_per_token_causal(self) -> float:
        """flops_per_token with attention halved for the causal mask (the second MFU convention)."""
        return flops_per_token(self.model, self.params, causal=True)

    @property
    def bubble_fraction(self) -> float:
        """Expected idle fraction of a 1F1B pipeline: (p-1)/(m+p-1)."""
        return (self.pp - 1) / (self.grad_accum + self.pp - 1)


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """Pad to a multiple that does not depend on tp, so checkpoint shapes never change with layout."""
    if not isinstance(multiple, int) or multiple < 1:
        raise ConfigError(f"model.vocab_multiple={multiple!r} must be a positive integer (e.g. 128)")
    return int(math.ceil(vocab_size / multiple) * multiple)


def typed_config(cfg: DictConfig) -> RunConfig:
    """The composed (or loaded) config as the schema's dataclasses: `RunConfig` holding `ModelConfig`,
    `TrainConfig`, ... and the cluster section as the dataclass its kind names (`CLUSTER_SCHEMAS`)."""
    kind = cfg.cluster.kind
    if kind not in CLUSTER_SCHEMAS:
        raise ConfigError(f"cluster.kind={kind!r} is not {', '.join(CLUSTER_SCHEMAS)}; pick cluster=<one of them>")
    try:
        if OmegaConf.get_type(cfg) is not RunConfig:
            cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        config = OmegaConf.to_object(cfg)
        # The cluster field is `Any`: composed from its group it comes back typed, read back from a
        # config.yaml it is a plain dict.
        if not isinstance(config.cluster, CLUSTER_SCHEMAS[kind]):
            config.cluster = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CLUSTER_SCHEMAS[kind]),
                                                                 cfg.cluster))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {str(exc).strip().splitlines()[0]}") from None
    return config


def config_dict(config: RunConfig) -> dict:
    """The typed config as plain data: what checkpoints record (the resume check compares it) and W&B shows."""
    return dataclasses.asdict(config)


def gpt_config(model: ModelConfig) -> GPTConfig:
    """Resolve the model section into the frozen shape the model is built from."""
    d, heads = model.d_model, model.n_heads
    kv = model.n_kv_heads or heads
    if model.d_ff:
        d_ff = model.d_ff
    elif model.mlp == "swiglu":
        d_ff = int(math.ceil(8 * d / 3 / 64) * 64)
    else:
        d_ff = 4 * d
    head_dim = d // heads
    rotary_dims = int(head_dim * model.rotary_pct) // 2 * 2 if model.position == "rotary" else 0
    return GPTConfig(
        n_layers=model.n_layers, d_model=d, n_heads=heads, n_kv_heads=kv, d_ff=d_ff, seq_len=model.seq_len,
        vocab_size=padded_vocab(model.vocab_size, model.vocab_multiple), position=model.position,
        rotary_dims=rotary_dims, rotary_base=model.rotary_base, rotary_interleaved=model.rotary_interleaved,
        parallel_residual=model.parallel_residual, norm=model.norm, norm_eps=model.norm_eps, mlp=model.mlp,
        tied_embeddings=model.tied_embeddings, bias=model.bias, dropout=model.dropout,
        attn_dropout=model.attn_dropout, init=model.init, init_std=model.init_std,
        activation_checkpointing=model.activation_checkpointing, kernels=model.kernels,
        kernel_ops=tuple(sorted(kernel_overrides(model).items())),
    )


def flops_per_token(m: GPTConfig, params: dict, causal: bool = False) -> float:
    """Training FLOPs per token: 6 * (non-embedding params + vocab * d) + 12 * L * d * seq for attention
    over the whole score square, or 6 * L * d * seq with `causal` (the mask leaves half of it to compute)."""
    attention = (6 if causal else 12) * m.n_layers * m.d_model * m.seq_len
    return 6 * (params["non_embedding"] + m.vocab_size * m.d_model) + attention


def kernel_overrides(model: ModelConfig) -> dict[str, str]:
    """The ops whose kernel choice differs from model.kernels's: op -> auto | fused | reference.
    (`model` may also be a DictConfig of the section, as a saved config is read back.)"""
    ops = getattr(model, "kernel_ops", None) or {}
    items = vars(ops).items() if dataclasses.is_dataclass(ops) else ops.items()
    return {str(op): str(v) for op, v in items if v is not None}


def _check_model(m: ModelConfig) -> None:
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={kv}")
    if m.position == "rotary" and int(m.d_model // m.n_heads * m.rotary_pct) < 2:
        raise ConfigError("model.rotary_pct leaves fewer than 2 rotary dims per head; raise it")


def _check_optim(cfg: RunConfig) -> list:
    """Raise on a schedule that contradicts itself; return warnings for one that is merely odd."""
    o, steps = cfg.optim, cfg.train.steps
    if o.decay != "constant" and o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}: the {o.decay} decay would raise "
                          "the lr; set optim.min_lr <= optim.lr (e.g. lr/10)")
    warnings = []
    # A warning, not an error: short test runs of a preset (train.steps=10) keep its warmup on purpose.
    if o.warmup_steps > steps:
        warnings.append(f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={steps}: the lr never reaches "
                        f"optim.lr (it ends at {steps / o.warmup_steps:.0%} of it); lower optim.warmup_steps")
    decay_steps = o.decay_steps or steps
    if o.decay != "constant" and o.decay_steps is not None and o.warmup_steps >= decay_steps:
        warnings.append(f"optim.decay_steps={decay_steps} is not above optim.warmup_steps={o.warmup_steps}: "
                        "the lr drops to optim.min_lr right after warmup; raise optim.decay_steps")
    return warnings


DEFAULT_MICRO_BATCH = 8  # per rank, where train.micro_batch is unset and not sized for a GPU (neox.launch.planning)


def batch_triad(micro: Optional[int], accum: Optional[int], global_: Optional[int], dp: int) -> tuple[int, int, int]:
    """global = micro * accum * dp: any two determine the third; all three must agree. With fewer than two,
    grad_accum defaults to 1 and micro_batch to DEFAULT_MICRO_BATCH."""
    given = {k: v for k, v in (("micro_batch", micro), ("grad_accum", accum), ("global_batch", global_)) if v is not None}
    for k, v in given.items():
        if v < 1:
            raise ConfigError(f"train.{k}={v} must be at least 1")
    if micro is not None and accum is not None:
        if global_ is not None and global_ != micro * accum * dp:
            raise ConfigError(f"inconsistent batch: global_batch={global_} != micro_batch={micro} x grad_accum={accum} "
                              f"x dp={dp} = {micro * accum * dp}; drop one of the three")
        return micro, accum, micro * accum * dp
    if global_ is None:  # at most one of micro/accum given: the other defaults
        micro, accum = micro or DEFAULT_MICRO_BATCH, accum or 1
        return micro, accum, micro * accum * dp
    if micro is None and accum is None:
        accum = 1
    known = micro if micro is not None else accum
    if global_ % (known * dp):
        what = "micro_batch" if micro is not None else "grad_accum"
        raise ConfigError(f"inconsistent batch: global_batch={global_} is not divisible by train.{what}={known} x dp={dp}")
    other = global_ // (known * dp)
    return (micro, other, global_) if micro is not None else (other, accum, global_)


def _check_output(run_dir: Path) -> None:
    probe = run_dir
    while not os.path.exists(probe):  # os.path: False (not OSError) for a name too long
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"the output directory {run_dir} is not writable (at {probe}); set run_dir=<a writable path>")


def _check_init_from(source: Optional[str]) -> None:
    """train.init_from must name something there, before any worker starts (the workers read its weights)."""
    if source and not os.path.exists(os.path.expanduser(source)):
        raise ConfigError(f"train.init_from={source} does not exist; give a run dir, a checkpoint, a model dir "
                          "written by `python -m neox.convert from-hf`, or a Hugging Face model dir")


def _check_data(cfg: RunConfig) -> None:
    data = cfg.data
    if data.kind != "prepared":
        return
    if not data.prefixes:
        raise ConfigError("data.kind=prepared needs data.prefixes=[<path without .bin/.idx>, ...]")
    for prefix in data.prefixes:
        for ext in (".bin", ".idx"):
            if not Path(os.path.expanduser(prefix) + ext).is_file():
                raise ConfigError(f"data file {prefix}{ext} does not exist; prepare it with "
                                  "`python -m neox.data.prepare` or fix data.prefixes")
    if data.weights is not None and len(data.weights) != len(data.prefixes):
        raise ConfigError(f"data.weights has {len(data.weights)} entries for {len(data.prefixes)} prefixes")


def default_run_dir(cfg: RunConfig) -> Path:
    """(a DictConfig of the run config too: the launcher names sweep jobs before planning them)"""
    name = cfg.run_name or f"{cfg.model.name}-{cfg.parallelism.name}-{cfg.data.name}"
    return Path(cfg.run_dir if cfg.run_dir else os.path.join("runs", name)).expanduser().absolute()


def _check_memory(res: Resources, world: int, mem: MemoryEstimate) -> list:
    """Refuse a run estimated at over REFUSE_MEMORY x a device's memory; warn above WARN_MEMORY."""
    # A dry run of a layout bigger than this machine plans for another one, whose memory is unknown.
    if res.memory_per_slot is None or world > res.slots:
        return []
    unit = "GPU" if res.device == "cuda" else "CPU process"
    need = (f"needs about {gib(mem.total)} per {unit} ({gib(mem.states)} weights, gradients and optimizer "
            f"states + {gib(mem.activations)} activations of train.micro_batch x model.seq_len)")
    have = f"{gib(res.memory_per_slot)} per {unit} here"
    fix = ("lower train.micro_batch or model.seq_len, set model.activation_checkpointing=full, "
           "raise parallelism.tp/pp or parallelism.zero_stage")
    if mem.total > REFUSE_MEMORY * res.memory_per_slot:
        raise ConfigError(f"the run {need}, over {REFUSE_MEMORY:g}x the {have}; {fix}")
    if mem.total > WARN_MEMORY * res.memory_per_slot:
        return [f"the run {need}, close to or above the {have}; if it runs out of memory, {fix}"]
    return []


def make_plan(cfg: DictConfig, res: Resources) -> RunPlan:
    """Validate `cfg` against what is available and derive the run plan. Raises on the first problem."""
    check_domains(cfg, RunConfig)  # first: the checks below divide by and index with these values
    config = typed_config(cfg)
    _check_model(config.model)
    model = gpt_config(config.model)
    layout = resolve_layout(config.parallelism, model, res, config.dry_run)
    world, dp, warnings = layout.world, layout.dp, list(layout.warnings)
    t, p = config.train, config.parallelism
    micro, accum, global_ = batch_triad(t.micro_batch, t.grad_accum, t.global_batch, dp)
    if p.pp > 1 and accum < p.pp:
        warnings.append(f"grad_accum={accum} micro-batches is below pp={p.pp} stages: "
                        f"the pipeline bubble is {(p.pp - 1) / (accum + p.pp - 1):.0%}")
    warnings += _check_optim(config)
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if res.device == "cuda" else "fp32"
    if precision == "fp16" and res.device == "cpu":
        raise ConfigError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    if precision == "fp8" and res.device == "cpu":
        raise ConfigError("train.precision=fp8 needs an NVIDIA GPU with fp8 matmuls (compute capability 8.9 "
                          "or newer: Ada, Hopper); use bf16 or fp32 on CPU")
    run_dir = default_run_dir(config)
    _check_output(run_dir)
    _check_data(config)
    _check_init_from(t.init_from)
    from neox.data.preflight import preflight  # opens every dataset and tokenizer the workers will

    evals = t.eval_batches * micro * dp  # the samples the workers ask for (neox/train/worker.py)
    warnings += preflight(config.data, seq_len=model.seq_len, model_vocab=model.vocab_size, seed=t.seed,
                          num_samples={"train": t.steps * global_, "valid": evals, "test": evals})
    params = count_params(model)
    memory = estimate(model, micro_batch=micro, grad_accum=accum, tp=p.tp, pp=p.pp, dp=dp, zero_stage=p.zero_stage,
                      precision=precision, sequence_parallel=p.sequence_parallel, partition=p.pipe_partition,
                      zero_bucket=p.zero_bucket_size, fused_step=t.fused_step)
    if not config.plan.show:  # plan=true: the planner's report gives the verdict (and may plan for a GPU here)
        warnings += _check_memory(res, world, memory)
    return RunPlan(config=config, world_size=world, tp=p.tp, pp=p.pp, dp=dp, micro_batch=micro,
                   grad_accum=accum, global_batch=global_, seq_len=model.seq_len, precision=precision,
                   device=res.device, model=model, params=params, flops_per_token=flops_per_token(model, params),
                   run_dir=run_dir, resources=res, memory=memory, warnings=tuple(warnings))
