"""The planner's one-screen output: memory term by term, time per step, the verdict; and `auto`'s table."""
from __future__ import annotations

from typing import List, Sequence, Tuple

from neox.planner import calibration as cal
from neox.planner.gpus import GiB
from neox.planner.setup import Estimate, Setup


def _gib(n: float) -> str:
    return f"{n / GiB:7.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(setup: Setup, est: Estimate) -> str:
    c, mem, t, gpu = est.candidate, est.memory, est.time, est.gpu
    m = setup.model
    from neox.model.gpt import count_params

    params = count_params(m)["total"]
    nodes = -(-c.world // setup.gpus_per_node)
    intra = setup.intra_gbs or gpu.intra_node_gbs
    inter = setup.inter_gbs or gpu.inter_node_gbs
    tokens = t.tokens_per_step
    lines = [
        f"plan      model={setup.model_name} ({params / 1e9:.2f}B params, seq {m.seq_len}, {setup.precision}) on "
        f"{c.world} x {gpu.name}",
        f"          {nodes} node{'s' if nodes > 1 else ''} of {setup.gpus_per_node}; links {intra:g} GB/s in a node, "
        f"{inter:g} GB/s per GPU between nodes",
        f"layout    {c.describe()}; global batch {c.global_batch} = {tokens:,} tokens/step",
        f"memory    per GPU, pipeline stage {mem.stage} of {c.pp} (the most loaded); peak in the {mem.peak_phase}",
    ]
    flying = ""
    if c.pp > 1:
        from neox.planner.memory import in_flight

        flying = f" ({in_flight(mem.stage, c)} micro-batches in flight)"
    for name, value in mem.terms.items():
        label = name + (flying if name == "activations" else "")
        if name == "activations" and c.checkpointing:
            label += ", checkpointed"
        lines.append(f"  {label:<58}{_gib(value)}")
    if mem.apart:
        lines.append(f"  {'(the recomputed block and the logits are never together)':<58}{_gib(-mem.apart)}")
    if mem.step_extra > mem.activations:
        lines.append(f"  {'optimizer step (fp32 gradients; replaces activations)':<58}{_gib(mem.step_extra)}")
    overhead = mem.total - mem.states - max(mem.activations, mem.step_extra)
    lines.append(f"  {'allocator, CUDA context, NCCL (calibrated)':<58}{_gib(overhead)}")
    lines.append(f"  {'total':<58}{_gib(mem.total)} of {gpu.memory / GiB:.1f} GiB, margin {est.margin / GiB:.1f} GiB")
    bubble = f", pipeline bubble {t.bubble:.2f} s ({t.bubble / t.compute:.0%})" if c.pp > 1 else ""
    tp = f", tp collectives {t.tp_comm:.2f} s" if c.tp > 1 else ""
    lines.append(f"time      per step {t.step:.2f} s: compute {t.compute:.2f} s{tp}{bubble}")
    lines.append(f"          pp sends {t.pp_comm:.3f} s, dp reduction {t.dp_comm:.3f} s, "
                 f"optimizer {t.optimizer:.3f} s, overhead {t.overhead:.3f} s")
    lines.append(f"          {t.tokens_per_s:,.0f} tokens/s, {t.tokens_per_s / c.world:,.0f} per GPU, MFU {t.mfu:.1%}; "
                 f"train.steps={setup.steps}: {_duration(setup.steps * t.step)}")
    lines.append(f"verdict   {est.verdict()}")
    lines.append(f"          (calibrated {cal.CALIBRATED_ON}; memory aims at 5%, time at 15%)")
    return "\n".join(lines)


def table(ranked: Sequence[Estimate], count: int = 5) -> str:
    """The chosen layout and the next best ones, one line each."""
    rows = [f"{'':3}{'layout':<52}{'GiB/GPU':>9}{'tokens/s':>12}{'MFU':>7}"]
    for i, e in enumerate(ranked[:count]):
        mark = "->" if i == 0 else "  "
        rows.append(f"{mark:3}{e.candidate.describe():<52}{e.memory.total / GiB:>9.1f}"
                    f"{e.time.tokens_per_s:>12,.0f}{e.time.mfu:>7.1%}")
    return "\n".join(rows)


def fixes_text(fixes: List[Tuple[str, Estimate]]) -> str:
    if not fixes:
        return "no single change (checkpointing, micro-batch, ZeRO stage, up to 64x the nodes) makes it fit"
    lines = ["changes that make it fit (fastest first):"]
    for change, e in fixes[:5]:
        lines.append(f"  {change:<52}{e.memory.total / GiB:7.1f} GiB/GPU {e.time.tokens_per_s:>12,.0f} tokens/s")
    return "\n".join(lines)
