"""The planner (neox/planner) at launch: the run config read into its Setup, and the launcher's two calls
(neox/launch/job.py), before the plan and after it.

`prepare(cfg, res)` resolves `parallelism=auto` into a concrete layout (printing the choice and the
next best four), sizes an unset train.micro_batch for the GPU (`size_micro_batch`) and turns `plan=true`
into a dry run; it returns the config the run is planned, saved
and resumed with. `review(plan)` prints the report for `plan=true` (True: stop there) and refuses a
layout predicted above the card unless `plan.force=true`.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple, Union

from omegaconf import DictConfig, OmegaConf

from neox.config.plan import DEFAULT_MICRO_BATCH, RunPlan, batch_triad, default_run_dir, flops_per_token, gpt_config
from neox.config.resources import Resources
from neox.config.schema import RunConfig
from neox.errors import ConfigError
from neox.model.gpt import count_params
from neox.planner import report, search
from neox.planner.gpus import GiB, GpuSpec, resolve
from neox.planner.layout import Candidate
from neox.planner.setup import Estimate, Setup, evaluate


def _detected_gpu(res: Resources) -> tuple:
    """(name, bytes) of this machine's GPU when the launch runs here on one."""
    if res.kind != "local" or res.device != "cuda":
        return None, None
    import torch

    return torch.cuda.get_device_name(0), res.memory_per_slot


def gpu_for(cluster, res: Resources) -> GpuSpec:
    """The card to plan for: cluster.gpu / gpu_memory_gb, else the one detected here; one line asking for
    cluster.gpu_memory_gb when nothing says its memory."""
    name, detected = _detected_gpu(res)
    gpu = resolve(cluster.gpu, cluster.gpu_memory_gb, name, detected)
    if gpu is None:
        where = {"local": "no GPU is visible here", "hostfile": "a hostfile does not say which GPUs its hosts have",
                 "slurm": "a Slurm request does not say which GPUs it gets"}.get(cluster.kind, "it is not known")
        raise ConfigError(f"the planner needs the GPU's memory and {where}: set cluster.gpu_memory_gb=<GiB per "
                          "GPU> (or cluster.gpu=H100|H200|A100-40GB|A100-80GB)")
    return gpu


def setup_from(cfg: Union[DictConfig, RunConfig], res: Resources, gpus: Optional[int] = None) -> Setup:
    """The planner's view of a run config (composed, or a plan's typed one) on `res` (the launcher's
    resources). Raises one line asking for cluster.gpu_memory_gb when nothing says the GPU's memory."""
    cluster = cfg.cluster
    gpu = gpu_for(cluster, res)
    model = gpt_config(cfg.model)
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16"
    per_node = res.slots_per_node if res.device == "cuda" else 8
    if cluster.kind == "slurm":
        per_node = cluster.gpus_per_node or per_node
    total = gpus if gpus is not None else (res.slots if res.device == "cuda" else _planned_world(cfg))
    fused = model.impl("cross_entropy") != "reference"
    return Setup(model=model, model_name=str(cfg.model.name), precision=precision, gpu=gpu, gpus=total,
                 gpus_per_node=per_node, intra_gbs=float(cluster.intra_node_gbs or 0.0),
                 inter_gbs=float(getattr(cluster, "inter_node_gbs", None) or 0.0), steps=int(cfg.train.steps),
                 flops_per_token=flops_per_token(model, count_params(model)), fused_loss=fused,
                 zero_bucket=int(cfg.parallelism.zero_bucket_size), fused_step=bool(cfg.train.fused_step),
                 cluster_kind=str(cluster.kind))


def _planned_world(cfg: DictConfig) -> int:
    """GPUs of a run planned on a machine without them: cluster.gpus, else what the layout asks for."""
    if cfg.cluster.kind == "local" and cfg.cluster.gpus:
        return int(cfg.cluster.gpus)
    p = cfg.parallelism
    return p.tp * p.pp * (p.dp or 1)


def candidate_from(cfg: RunConfig, dp: int, micro: int, accum: int) -> Candidate:
    """The layout a config asks for by hand (dp and the batch as make_plan resolved them)."""
    p = cfg.parallelism
    return Candidate(tp=p.tp, pp=p.pp, dp=dp, zero_stage=p.zero_stage, micro_batch=micro, grad_accum=accum,
                     checkpointing=cfg.model.activation_checkpointing == "full",
                     sequence_parallel=bool(p.sequence_parallel), partition=str(p.pipe_partition))


AUTO = "auto"
LAYOUT_KEYS = ("parallelism.tp", "parallelism.pp", "parallelism.dp", "parallelism.zero_stage", "train.micro_batch",
               "train.grad_accum", "train.global_batch", "model.activation_checkpointing")


def is_auto(cfg: DictConfig) -> bool:
    return cfg.parallelism.name == AUTO


def target_global_batch(cfg: DictConfig, gpus: int) -> int:
    """auto keeps train.global_batch; unset, it reads micro_batch x grad_accum as per GPU."""
    t = cfg.train
    for key in ("micro_batch", "grad_accum", "global_batch"):
        if t[key] is not None and t[key] < 1:
            raise ConfigError(f"train.{key}={t[key]} must be at least 1")
    if t.global_batch:
        return int(t.global_batch)
    micro = DEFAULT_MICRO_BATCH if t.micro_batch is None else t.micro_batch
    return int(micro * (1 if t.grad_accum is None else t.grad_accum) * gpus)


def _saved_config(cfg: DictConfig) -> Optional[DictConfig]:
    """The config.yaml an earlier launch of this run wrote; None where there is none or it cannot be read (the
    launch's own checks say so later)."""
    saved = default_run_dir(cfg) / "config.yaml"
    if not saved.is_file():
        return None
    try:
        return OmegaConf.load(saved)
    except Exception:
        return None


def _saved_layout(cfg: DictConfig) -> Optional[DictConfig]:
    """The layout an earlier launch of this run resolved (its config.yaml), so a rerun resumes with it."""
    old = _saved_config(cfg)
    if old is None or OmegaConf.select(old, "parallelism.name") != AUTO or \
            OmegaConf.select(old, "model.name") != cfg.model.name:
        return None
    return old


def _replaced(cfg: DictConfig, values: dict) -> list:
    """`key=value` for each layout key this command sets (away from its default) to something else."""
    from neox.launch.compose import compose_config

    defaults = compose_config([f"model={cfg.model.name}", f"parallelism={AUTO}"])
    return [f"{k}={OmegaConf.select(cfg, k)}" for k, v in values.items()
            if OmegaConf.select(cfg, k) not in (v, OmegaConf.select(defaults, k))]


def _apply(cfg: DictConfig, values: dict) -> DictConfig:
    out = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def resolve_auto(cfg: DictConfig, res: Resources, setup: Optional[Setup] = None) -> DictConfig:
    """parallelism=auto -> the concrete layout (printed with the next best four)."""
    old = _saved_layout(cfg)
    if old is not None and OmegaConf.select(old, "model.seq_len") != cfg.model.seq_len:
        print(f"parallelism=auto: this run chose a layout for model.seq_len={old.model.seq_len} before; choosing "
              f"again for {cfg.model.seq_len}", flush=True)
        old = None
    if old is not None:
        p = old.parallelism
        world = p.tp * p.pp * (p.dp or 1)
        if res.device == "cuda" and world != res.slots:  # other GPUs now: choose again (resharded on resume)
            print(f"parallelism=auto: this run chose a layout for {world} GPUs before; choosing again for "
                  f"{res.slots}", flush=True)
            old = None
    if old is not None:
        values = {k: OmegaConf.select(old, k) for k in LAYOUT_KEYS}
        replaced = _replaced(cfg, values)
        kept = f"; it replaces this command's {', '.join(replaced)} (a new run_dir chooses afresh)" if replaced else ""
        print(f"parallelism=auto: resuming with the layout this run chose before ({old.parallelism.tp} tp, "
              f"{old.parallelism.pp} pp, {old.parallelism.dp} dp, ZeRO-{old.parallelism.zero_stage}, micro "
              f"{old.train.micro_batch} x accum {old.train.grad_accum}){kept}", flush=True)
        return _apply(cfg, values)
    setup = setup or setup_from(cfg, res)
    batch = target_global_batch(cfg, setup.gpus)
    ranked = search.choose(setup, batch, sequence_parallel=bool(cfg.parallelism.sequence_parallel),
                           partition=str(cfg.parallelism.pipe_partition))
    best = ranked[0].candidate
    print(f"parallelism=auto: {len(ranked)} layouts of model={setup.model_name} fit on {setup.gpus} x "
          f"{setup.gpu.name} at global batch {batch}; the best five:", flush=True)
    print(report.table(ranked), flush=True)
    return _apply(cfg, {"parallelism.tp": best.tp, "parallelism.pp": best.pp, "parallelism.dp": best.dp,
                        "parallelism.zero_stage": best.zero_stage, "train.micro_batch": best.micro_batch,
                        "train.grad_accum": best.grad_accum, "train.global_batch": best.global_batch,
                        "model.activation_checkpointing": "full" if best.checkpointing else "none"})


MICRO_BATCH_CHOICES = (64, 32, 16, 8, 4, 2, 1)


SIZED_FOR = ("model.name", "model.seq_len", "model.activation_checkpointing", "parallelism.tp", "parallelism.pp",
             "parallelism.zero_stage", "train.global_batch")


def _saved_micro_batch(cfg: DictConfig) -> Optional[int]:
    """The micro-batch an earlier launch of this run used (its config.yaml), so that a rerun resumes with it;
    None where there is none or the model, layout or batch settings it was sized for changed."""
    old = _saved_config(cfg)
    if old is None or any(OmegaConf.select(old, k) != OmegaConf.select(cfg, k) for k in SIZED_FOR):
        return None
    micro = OmegaConf.select(old, "train.micro_batch")
    return int(micro) if micro else None


def size_micro_batch(cfg: DictConfig, res: Resources, for_gpus: bool = False) -> DictConfig:
    """train.micro_batch and train.grad_accum unset on GPUs: the largest of MICRO_BATCH_CHOICES that the planner
    fits on the card in this layout (dividing train.global_batch where that is set; accum 1 where not). A small
    micro-batch leaves a GPU idle between small kernels: 125M on an H200 ran 29.8% MFU at micro 16 and 50.9% at 64. A rerun of a run dir keeps
    the micro-batch sized before; where the card is not known (a Slurm or hostfile run without cluster.gpu)
    or nothing fits, the config stays as it is (DEFAULT_MICRO_BATCH, and the plan's own checks).
    for_gpus: size for the card the config names even where `res` is this machine's CPU (plan=true planning a
    GPU run here: its report shows the batch the launch on those GPUs would run)."""
    t, p = cfg.train, cfg.parallelism
    if t.micro_batch is not None or t.grad_accum is not None or (res.device != "cuda" and not for_gpus):
        return cfg  # grad_accum given: the user steers the batch (the micro-batch stays DEFAULT_MICRO_BATCH)
    if p.pp > 1:  # the largest micro-batch is the fewest in flight: the bubble; parallelism=auto weighs both
        return cfg
    old = _saved_micro_batch(cfg)
    if old is not None:
        print(f"train.micro_batch={old}: as this run sized it before (set train.micro_batch to change it)",
              flush=True)
        return _apply(cfg, {"train.micro_batch": old})
    try:
        setup = setup_from(cfg, res)
    except ConfigError:
        return cfg
    dp = int(p.dp or max(1, setup.gpus // (p.tp * p.pp)))
    for micro in MICRO_BATCH_CHOICES:
        try:
            micro, accum, _ = batch_triad(micro, t.grad_accum, t.global_batch, dp)
        except ConfigError:  # does not divide train.global_batch
            continue
        est = evaluate(setup, candidate_from(cfg, dp, micro, accum))
        if est.fits:
            print(f"train.micro_batch={micro}: the largest the planner fits on {setup.gpus} x {setup.gpu.name} "
                  f"in this layout ({est.memory.total / GiB:.1f} of {setup.gpu.memory / GiB:.0f} GiB per GPU), global "
                  f"batch {micro * accum * dp} = {micro * accum * dp * cfg.model.seq_len:,} tokens/step; set "
                  "train.micro_batch (or train.global_batch) to choose", flush=True)
            return _apply(cfg, {"train.micro_batch": micro})
    return cfg


def prepare(cfg: DictConfig, res: Optional[Resources] = None) -> DictConfig:
    """The config to plan and run: auto resolved (on `res`, default: what this launch can use), and
    plan=true planned like a dry run."""
    if cfg.plan.show and cfg.cluster.kind == "local" and cfg.cluster.gpus and res is None:
        from neox.launch.resources import local_gpu_count

        if local_gpu_count() == 0:  # planning here for a GPU machine: cluster.gpus is how many it has
            cfg = _apply(cfg, {"cluster.cpu_procs": int(cfg.cluster.gpus), "cluster.gpus": None})
    if is_auto(cfg) or cfg.plan.show:
        if res is None:
            from neox.launch.resources import detect

            res = detect(cfg.cluster)
        gpu_for(cfg.cluster, res)  # first: without the GPU's memory there is nothing to plan
    if is_auto(cfg):
        cfg = resolve_auto(cfg, res)
    elif cfg.train.micro_batch is None:
        if res is None:
            from neox.launch.resources import detect

            res = detect(cfg.cluster)
        cfg = size_micro_batch(cfg, res, for_gpus=bool(cfg.plan.show))  # plan=true: the batch the launch runs
    t = cfg.train
    if t.global_batch is None and (t.micro_batch is None or t.grad_accum is None):
        # the defaults written out: config.yaml and checkpoints record the batch the run trains with (a value
        # given, 0 included, stays for the plan's domain check)
        cfg = _apply(cfg, {"train.micro_batch": DEFAULT_MICRO_BATCH if t.micro_batch is None else t.micro_batch,
                           "train.grad_accum": 1 if t.grad_accum is None else t.grad_accum})
    if cfg.plan.show and not cfg.dry_run:
        cfg = _apply(cfg, {"dry_run": True})  # plans for the cluster named, not for this machine
    return cfg


def estimate_run(plan: RunPlan) -> Tuple[Estimate, Setup]:
    """The planner's estimate of the layout `plan` resolved."""
    setup = setup_from(plan.config, plan.resources, gpus=plan.world_size)
    return evaluate(setup, candidate_from(plan.config, plan.dp, plan.micro_batch, plan.grad_accum)), setup


def review(plan: RunPlan) -> bool:
    """plan=true: print the report, True (launch nothing). Otherwise refuse a layout predicted above the
    card (ConfigError, after the report on stderr) unless plan.force, warn about one above the share the
    planner promises; False: go on."""
    cfg = plan.config
    gpu_run = plan.device == "cuda" or cfg.cluster.gpu or cfg.cluster.gpu_memory_gb
    if not cfg.plan.show and not gpu_run:
        return False  # a CPU run: make_plan's RAM check is the one that applies
    try:
        est, setup = estimate_run(plan)
    except ConfigError:
        if cfg.plan.show:
            raise
        return False  # the GPU is unknown (Slurm, hostfile without cluster.gpu): nothing to check against
    text = report.render(setup, est)
    fixes = search.fixes(setup, est) if est.over else []
    if est.over:
        text += "\n" + report.fixes_text(fixes)
        if not fixes:
            text += "\n" + "parallelism=auto: " + search.more_gpus(setup, est.candidate.global_batch)
    if cfg.plan.show:
        print(text, flush=True)
        print("plan: nothing launched", flush=True)
        return True
    if not est.fits and not est.over:
        print(f"warning: the layout {est.verdict()}", file=sys.stderr, flush=True)
    if est.over and not cfg.plan.force:
        print(text, file=sys.stderr, flush=True)
        hint = (f"; e.g. {fixes[0][0]} ({fixes[0][1].memory.total / GiB:.1f} GiB/GPU)" if fixes
                else f"; {search.more_gpus(setup, est.candidate.global_batch)}")
        raise ConfigError(f"the layout {est.verdict()}{hint}; set plan.force=true to launch anyway")
    return False
