"""`parallelism=auto`: the layout that fits and runs fastest, and what to change when none fits.

The search walks every tp (a power of two inside one node that divides the heads, widths and vocab),
pp (dividing the rest, at most MAX_PP stages with a block each), the ZeRO stages DeepSpeed allows
there (ZeRO-2/3 only without a pipeline; a bf16 pipeline needs ZeRO-1; with dp = 1 ZeRO shards
nothing), micro-batches 1-32 that split the global batch, and activation checkpointing off/on. Each
is estimated (neox/planner/setup.py); the fastest that fits wins, less memory breaking ties.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator, List, Optional, Tuple

from neox.errors import ConfigError
from neox.planner.gpus import GiB
from neox.planner.layout import DEFAULT_PARTITION, Candidate, every_stage_has_a_block, stage_bounds
from neox.planner.setup import Estimate, Setup, evaluate

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
MAX_PP = 16  # deeper pipelines need more micro-batches than global batches usually give
GROWTH = (2, 4, 8, 16, 32, 64)  # GPU counts tried (x the current one) when nothing fits


def tp_options(setup: Setup, world: int) -> List[int]:
    m = setup.model
    out = []
    t = 1
    while t <= min(setup.gpus_per_node, world):
        shape_ok = all(v % t == 0 for v in (m.n_heads, m.n_kv_heads, m.d_model, m.d_ff, m.vocab_size))
        node_ok = world <= setup.gpus_per_node or setup.gpus_per_node % t == 0
        if shape_ok and node_ok and world % t == 0:
            out.append(t)
        t *= 2
    return out


def pp_options(setup: Setup, rest: int, partition: str = DEFAULT_PARTITION) -> List[int]:
    out = []
    for p in range(1, min(rest, MAX_PP, setup.model.n_layers) + 1):
        if rest % p:
            continue
        if p > 1:
            parts = stage_bounds(setup.model, p, partition)
            if any(parts[s + 1] - parts[s] < 1 for s in range(p)) or not every_stage_has_a_block(parts):
                continue
        out.append(p)
    return out


def zero_options(setup: Setup, pp: int, dp: int) -> Tuple[int, ...]:
    if pp > 1:
        return (0, 1) if setup.precision == "fp32" else (1,)
    return (0,) if dp == 1 else (0, 1, 2, 3)


def candidates(setup: Setup, world: int, global_batch: int, sequence_parallel: bool = False,
               partition: str = DEFAULT_PARTITION) -> Iterator[Candidate]:
    for tp in tp_options(setup, world):
        for pp in pp_options(setup, world // tp, partition):
            dp = world // (tp * pp)
            for zero in zero_options(setup, pp, dp):
                for micro in MICRO_BATCHES:
                    if global_batch % (micro * dp):
                        continue
                    accum = global_batch // (micro * dp)
                    for ckpt in (False, True):
                        yield Candidate(tp=tp, pp=pp, dp=dp, zero_stage=zero, micro_batch=micro, grad_accum=accum,
                                        checkpointing=ckpt, sequence_parallel=sequence_parallel and tp > 1,
                                        partition=partition)


NEAR = 0.01  # layouts within 1% of the fastest are as fast, given the model's error: the leanest of them wins


def rank(estimates: List[Estimate]) -> List[Estimate]:
    """The leanest of the layouts within NEAR of the fastest first (memory headroom for free), then the
    rest fastest first."""
    by_speed = sorted(estimates, key=lambda e: (-e.time.tokens_per_s, e.memory.total))
    if not by_speed:
        return []
    fastest = by_speed[0].time.tokens_per_s
    best = min((e for e in by_speed if e.time.tokens_per_s >= (1 - NEAR) * fastest), key=lambda e: e.memory.total)
    return [best] + [e for e in by_speed if e is not best]


def search(setup: Setup, global_batch: int, world: Optional[int] = None, sequence_parallel: bool = False,
           partition: str = DEFAULT_PARTITION) -> Tuple[List[Estimate], List[Estimate]]:
    """(layouts that fit, best first; every layout estimated) on `world` GPUs (default: all of them)."""
    world = world or setup.gpus
    every = [evaluate(setup, c) for c in candidates(setup, world, global_batch, sequence_parallel, partition)]
    return rank([e for e in every if e.fits]), every


def choose(setup: Setup, global_batch: int, sequence_parallel: bool = False,
           partition: str = DEFAULT_PARTITION) -> List[Estimate]:
    """The fitting layouts, best first; raises one line with the smallest change when none fits."""
    fitting, every = search(setup, global_batch, sequence_parallel=sequence_parallel, partition=partition)
    if fitting:
        return fitting
    what = f"model={setup.model_name} ({setup.gpus} x {setup.gpu.name}, global batch {global_batch})"
    if not every:
        raise ConfigError(f"no layout splits {what}: the global batch must be a multiple of dp x micro-batch; "
                          f"set train.global_batch to a multiple of {setup.gpus}")
    leanest = min(every, key=lambda e: e.memory.total)
    raise ConfigError(f"no layout of {what} fits: the leanest, {leanest.candidate.describe()}, needs "
                      f"{leanest.memory.total / GiB:.1f} GiB per GPU of {leanest.gpu.memory / GiB:.1f}; "
                      + more_gpus(setup, global_batch, sequence_parallel, partition))


def more_gpus(setup: Setup, global_batch: int, sequence_parallel: bool = False,
              partition: str = DEFAULT_PARTITION) -> str:
    """The fewest GPUs (a multiple of the current count) on which a layout fits, as advice."""
    for k in GROWTH:
        world = setup.gpus * k
        bigger = replace(setup, gpus=world)
        for batch in (global_batch, global_batch * k):  # the same global batch, else the same per GPU
            fitting, _ = search(bigger, batch, world=world, sequence_parallel=sequence_parallel, partition=partition)
            if fitting:
                best = fitting[0]
                batch_note = "" if batch == global_batch else f", train.global_batch={batch}"
                return (f"with {world} GPUs ({more_gpus_key(setup, world)}{batch_note}) "
                        f"{best.candidate.describe()} fits at {best.memory.total / GiB:.1f} GiB per GPU, "
                        f"~{best.time.tokens_per_s:,.0f} tokens/s")
    return f"none fits on up to {setup.gpus * GROWTH[-1]} GPUs either: use a smaller model or GPUs with more memory"


def more_gpus_key(setup: Setup, world: int) -> str:
    """How to ask for `world` GPUs on the setup's kind of cluster."""
    nodes = -(-world // setup.gpus_per_node)
    if setup.cluster_kind == "local":
        return f"a machine with cluster.gpus={world}"
    if setup.cluster_kind == "hostfile":
        return f"{nodes} hosts of {setup.gpus_per_node} in the hostfile"
    return f"cluster.nodes={nodes}"


def fixes(setup: Setup, est: Estimate) -> List[Tuple[str, Estimate]]:
    """Single changes to a hand-written layout that does not fit, each with its estimate, fastest first:
    checkpointing on, a smaller micro-batch (more accumulation), a higher ZeRO stage, more GPUs."""
    c = est.candidate
    tries: List[Tuple[str, Candidate, Setup]] = []
    if not c.checkpointing:
        tries.append(("model.activation_checkpointing=full", replace(c, checkpointing=True), setup))
    micro = c.micro_batch
    while micro > 1:
        micro //= 2
        accum = c.grad_accum * (c.micro_batch // micro)
        tries.append((f"train.micro_batch={micro} train.grad_accum={accum}",
                      replace(c, micro_batch=micro, grad_accum=accum), setup))
    for zero in ((1,) if c.pp > 1 else (1, 2, 3)):
        if zero > c.zero_stage and c.dp > 1:
            tries.append((f"parallelism.zero_stage={zero}", replace(c, zero_stage=zero), setup))
    out = [(change, e) for change, e in ((ch, evaluate(s, cand)) for ch, cand, s in tries) if e.fits]
    for k in GROWTH:  # more GPUs: the fewest that fit, sharding what dp can shard
        dp = c.dp * k
        world = c.tp * c.pp * dp
        grown = [replace(c, dp=dp, zero_stage=z, grad_accum=max(1, c.grad_accum // k))
                 for z in sorted({max(c.zero_stage, 1), 1 if c.pp > 1 else 3})]
        fit = [e for e in (evaluate(replace(setup, gpus=world), g) for g in grown) if e.fits]
        if fit:
            g = fit[0].candidate
            batch = "" if g.global_batch == c.global_batch else f", train.global_batch={g.global_batch}"
            out.append((f"{more_gpus_key(setup, world)} (dp={dp}, parallelism.zero_stage={g.zero_stage}{batch})",
                        fit[0]))
            break
    return sorted(out, key=lambda ce: -ce[1].time.tokens_per_s)
