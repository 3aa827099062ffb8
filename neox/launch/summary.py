"""The one-screen summary printed before a run starts."""
from __future__ import annotations

from neox.config.memory import gib
from neox.config.plan import RunPlan


def human(n: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def stage_plan(plan: RunPlan) -> str:
    """Layers and parameters per pipeline stage, computed on the meta device (nothing is built);
    raises ConfigError when the partition method leaves a stage empty."""
    from neox.parallel.pipeline import deepspeed_layer_specs, describe_partition, partition_layers

    specs = deepspeed_layer_specs(plan.model)
    partition = plan.config.parallelism.pipe_partition
    parts = partition_layers(specs, plan.pp, partition)
    return describe_partition(specs, parts, partition, plan.tp)


def render(plan: RunPlan) -> str:
    cfg = plan.config
    m, p = plan.model, cfg.parallelism
    pos = m.position + (f" ({m.rotary_dims}/{m.head_dim} dims{', interleaved' if m.rotary_interleaved else ''})"
                        if m.position == "rotary" else "")
    shape = (f"{m.n_layers} layers, d {m.d_model}, {m.n_heads} heads (kv {m.n_kv_heads}), ff {m.d_ff}, "
             f"seq {m.seq_len}, vocab {cfg.model.vocab_size} -> {m.vocab_size}")
    style = (f"{pos}, {m.norm}, {m.mlp}, {'parallel' if m.parallel_residual else 'sequential'} residual, "
             f"{'tied' if m.tied_embeddings else 'untied'} embeddings")
    # A dry run of a layout bigger than this machine describes the GPU job it plans for.
    gpu_job = plan.device == "cuda" or plan.world_size > plan.resources.slots
    unit = "GPUs" if gpu_job else "CPU processes (gloo)"
    tokens = plan.tokens_per_step
    lines = [
        f"neox run {plan.run_dir.name}",
        f"  model     {cfg.model.name}: {shape}",
        f"            {style}",
        f"  params    {human(plan.params['total'])} total, {human(plan.params['non_embedding'])} non-embedding; "
        f"{human(plan.flops_per_token, 'FLOP')}/token ({human(plan.flops_per_token_causal, 'FLOP')} with causal "
        "attention halved)",
        f"  layout    {plan.world_size} {unit} = tp {plan.tp} x pp {plan.pp} x dp {plan.dp}; "
        f"ZeRO-{p.zero_stage}; {plan.precision}; {cfg.cluster.kind}",
        f"  batch     global {plan.global_batch} = micro {plan.micro_batch} x accum {plan.grad_accum} x dp {plan.dp}; "
        f"{tokens:,} tokens/step; {cfg.train.steps} steps = {human(tokens * cfg.train.steps)} tokens",
    ]
    mem, res = plan.memory, plan.resources
    budget = (f"; {gib(res.memory_per_slot)} available per {'GPU' if plan.device == 'cuda' else 'process'}"
              if res.memory_per_slot is not None and plan.world_size <= res.slots else "")
    if not cfg.plan.show:  # plan=true: the planner's report below says it term by term, for the GPU planned
        lines.append(f"  memory    ~{gib(mem.total)} per {'GPU' if gpu_job else 'process'} = {gib(mem.states)} "
                     f"weights, gradients, optimizer + {gib(mem.activations)} activations (estimate){budget}")
    if plan.pp > 1:
        lines.append(f"  pipeline  {plan.pp} stages, {plan.grad_accum} micro-batches: expected bubble "
                     f"(p-1)/(m+p-1) = {plan.bubble_fraction:.1%}")
        lines += ["            " + line for line in stage_plan(plan).splitlines()]
    data = cfg.data
    source = "this machine's Python stdlib source" if data.kind == "embedded" else ", ".join(data.prefixes)
    lines.append(f"  data      {data.name}: {source}; split {data.split}")
    lines.append(f"  outputs   {plan.run_dir}  (config.yaml, metrics.jsonl, checkpoints/, tb/, loss.png)")
    for w in plan.warnings:
        lines.append(f"  warning   {w}")
    return "\n".join(lines)
