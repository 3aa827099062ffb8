"""Pipeline runs on real CPU processes over gloo, and the single-process reference they must follow.

`run_workers` starts N spawned processes with a free port, OMP_NUM_THREADS=1 and a deadline; each
joins through the trainer's own `neox.train.distributed.init` (collective timeout, DeepSpeed's
/dev/shm all-reduce op never built, so no /dev/shm/deepspeed* files are left behind).

`train` is what a trainer rank does with pp > 1: Topology -> build_pipeline_module -> the lead's
engine.initialize -> train_batch / eval_batch / CheckpointManager. `reference` trains `GPT` with
plain torch on the same global batches, with the same optimizer, schedule and clipping.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

SEED = 1234
# The model every run starts from (a run's "model" entry overrides fields): GQA, SwiGLU, rotary on the
# whole head, a 257-token vocab (padded to 384) so the embedded corpus's smallest vocab fits the plan.
MODEL = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16, vocab_size=257,
             position="rotary", rotary_pct=1.0, mlp="swiglu", init="wang_init", tied_embeddings=False)


def run_workers(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 150.0) -> None:
    """Run fn(rank, world, *args) on `world` processes started with the trainer's own init."""
    from support.workers import run_workers as spawn

    spawn(fn, world, *args, timeout=timeout, init="neox")


# ------------------------------------------------------------------------------------ run setup
def _model_overrides(**fields) -> List[str]:
    return [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in {**MODEL, **fields}.items()]


def model_config(**fields):
    """The GPTConfig the planner resolves for MODEL with `fields` changed (neox.config.plan.gpt_config)."""
    from neox.config.plan import gpt_config
    from neox.launch.compose import compose_config

    return gpt_config(compose_config(_model_overrides(**fields)).model)


def train_config(run: Dict[str, Any], dp: int):
    """(config, plan) of the run as launch.py would make them: composed, then planned by make_plan
    for pp x tp x dp CPU processes. The plan's model is the one the run builds."""
    from support.plans import cpu, plan_of

    world = run["pp"] * run["tp"] * dp
    overrides = [
        *_model_overrides(**run["model"]), f"model.activation_checkpointing={run['checkpointing']}",
        f"parallelism.pp={run['pp']}", f"parallelism.tp={run['tp']}", f"parallelism.dp={dp}",
        f"parallelism.zero_stage={run['zero']}", f"parallelism.pipe_partition={run['partition']}",
        f"parallelism.sequence_parallel={str(run.get('sequence_parallel', False)).lower()}",
        "optim.lr=3e-3", "optim.beta1=0.9", "optim.beta2=0.95", "optim.eps=1e-8", "optim.weight_decay=0.1",
        f"optim.grad_clip={run.get('clip', 1.0)}", "optim.warmup_steps=2", "optim.decay=cosine", "optim.min_lr=3e-4",
        f"train.steps={run['steps']}", f"train.micro_batch={run['micro']}", f"train.grad_accum={run['accum']}",
        f"train.precision={run.get('precision', 'fp32')}", "data.embedded_vocab=257",
        f"run_dir={Path(tempfile.gettempdir()) / 'neox-pipeline-harness'}",  # planned, never written
    ]
    return plan_of(overrides, cpu(world))


def token_batches(run: Dict[str, Any], dp: int, split: str = "train") -> torch.Tensor:
    """[steps, dp * accum, micro, seq+1]: step s of data-parallel rank d reads micro-batches
    d*accum .. (d+1)*accum-1; the reference reads all of them as one global batch."""
    g = torch.Generator().manual_seed(7 if split == "train" else 8)
    steps = run["steps"] if split == "train" else 1
    n = dp * (run["accum"] if split == "train" else run["eval_micro"])
    m = model_config(**run["model"])
    return torch.randint(0, m.vocab_size, (steps, n, run["micro"], m.seq_len + 1), generator=g)


# ------------------------------------------------------------------------------------ the worker
def _check_init(module, model_cfg, topo) -> None:
    """This stage's weights are GPT(cfg)'s under the same seed (its TP shard when tp > 1)."""
    from neox.model.gpt import GPT
    from neox.parallel.pipeline import stage_state_dict
    from neox.parallel.tensor import shard_dims, shard_state_dict

    torch.manual_seed(SEED)
    ref = GPT(model_cfg)
    want = shard_state_dict(ref.state_dict(), shard_dims(ref), topo.tp_rank, topo.tp_size)
    got = stage_state_dict(module)
    assert got, "this stage holds no weights"
    for name, t in got.items():
        assert torch.equal(t.cpu(), want[name]), f"stage {topo.pp_rank}: {name} differs from GPT(cfg)"


def _engine(run: Dict[str, Any], topo, announce: bool):
    """What a trainer rank builds with pp > 1: the pipeline module, then the lead's engine."""
    from neox.model.gpt import cross_entropy_loss
    from neox.parallel import make_loss_fn
    from neox.parallel.model_layout import ModelLayout, Parallelism
    from neox.parallel.pipeline import build_pipeline_module
    from neox.train import engine as engine_lib

    cfg, plan = train_config(run, topo.dp_size)
    model_cfg = plan.model
    loss_fn = make_loss_fn(topo.tp_group) if topo.tp_size > 1 else cross_entropy_loss
    module = build_pipeline_module(model_cfg, topo, run["partition"], run["checkpointing"], loss_fn, seed=SEED,
                                   sequence_parallel=run.get("sequence_parallel", False))
    if announce:
        print(ModelLayout(model_cfg, Parallelism(tp=topo.tp_size, pp=topo.pp_size, partition=run["partition"]))
              .describe_stages(), flush=True)
    _check_init(module, model_cfg, topo)
    # engine.py adds the pipeline section of the DeepSpeed config and the pipe-aware fp32 clipping.
    engine = engine_lib.initialize(module, plan, torch.device("cpu"), mpu=None)[0]
    if run["checkpointing"] == "full":  # Blocks are checkpointed, the embedding chunk never
        flags = dict(zip(range(module._local_start, module._local_stop), module.is_checkpointable_results))
        for i, flag in flags.items():
            assert flag == (type(module._layer_specs[i]).__name__ != "TiedLayerSpec"
                            and module._layer_specs[i].typename.__name__ == "Block"), f"layer {i}: {flag}"
    return engine


def _train_steps(engine, run, topo, start: int, checkpoints=None) -> Dict[int, Any]:
    from neox.parallel.pipeline import pipeline_batches

    a = run["accum"]
    mine = token_batches(run, topo.dp_size)[:, topo.dp_rank * a:(topo.dp_rank + 1) * a]
    losses, norms = {}, {}
    for step in range(start, run["steps"]):
        loss = engine.train_batch(pipeline_batches(iter(mine[step])))
        losses[step + 1] = loss.item()
        norm = engine.get_global_grad_norm()
        norms[step + 1] = None if norm is None else float(norm)
        if checkpoints is not None and run.get("save_at") == step + 1:
            checkpoints.save(engine, step + 1, {})
    return {"losses": losses, "norms": norms}


def train(rank: int, world: int, run: Dict[str, Any], out_dir: str) -> None:
    from neox.checkpoint import CheckpointManager
    from neox.parallel import Topology
    from neox.parallel.pipeline import pipeline_batches

    topo = Topology.build(tp=run["tp"], pp=run["pp"])
    engine = _engine(run, topo, announce=rank == 0)
    checkpoints = CheckpointManager(Path(run.get("checkpoints") or Path(out_dir) / "checkpoints"), keep=2,
                                    is_main=rank == 0)
    start = checkpoints.load(engine)["step"] if run.get("resume") else 0
    result = _train_steps(engine, run, topo, start, checkpoints)
    e = run["eval_micro"]
    evals = token_batches(run, topo.dp_size, "valid")[0, topo.dp_rank * e:(topo.dp_rank + 1) * e]
    result["eval"] = engine.eval_batch(pipeline_batches(iter(evals)), num_micro_batches=e).item()
    if run.get("reload"):  # a fresh module and engine in the same processes resume the saved step
        engine = _engine(run, topo, announce=False)
        start = CheckpointManager(checkpoints.directory, keep=2, is_main=rank == 0).load(engine)["step"]
        result["reloaded"] = _train_steps(engine, run, topo, start)["losses"]
    # every rank reports; the test checks they agree
    with open(Path(out_dir) / f"rank{rank}.json", "w") as f:
        json.dump(result, f)


def world_of(run: Dict[str, Any]) -> int:
    return run["pp"] * run["tp"] * run.get("dp", 1)


def run_pipeline(run: Dict[str, Any], out_dir: Path, timeout: float = 150.0) -> Dict[str, Any]:
    """Train `run` on pp*tp*dp processes; returns rank 0's losses (after checking all ranks agree)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_workers(train, world_of(run), run, str(out_dir), timeout=timeout)
    return collect(run, out_dir)


def collect(run: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """What `train` wrote for `run` (its ranks must agree): rank 0's losses, norms and eval loss."""
    world = world_of(run)
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results[1:], 1):
        assert res["losses"] == results[0]["losses"], f"rank {r} reports other losses than rank 0"
        assert res["eval"] == results[0]["eval"], f"rank {r} reports another eval loss than rank 0"
    out = results[0]
    return {"losses": {int(k): v for k, v in out["losses"].items()},
            "norms": {int(k): v for k, v in out["norms"].items()}, "eval": out["eval"],
            "reloaded": {int(k): v for k, v in out.get("reloaded", {}).items()}}


# ------------------------------------------------------------------------------------ the reference
def reference(run: Dict[str, Any]) -> Dict[str, Any]:
    """One process, plain torch: GPT(cfg) on the global batch (all dp ranks' micro-batches),
    with the trainer's AdamW groups, lr schedule and gradient clipping."""
    from neox.model.gpt import GPT, cross_entropy_loss
    from neox.train import engine as engine_lib

    dp = run.get("dp", 1)
    cfg, plan = train_config(run, dp)
    model_cfg = plan.model
    torch.manual_seed(SEED)
    model = GPT(model_cfg)
    opt = engine_lib.optimizer(model, plan.config.optim, torch.device("cpu"))
    sched = engine_lib.lr_scheduler(opt, plan.config.optim, plan.config.train.steps)
    losses, norms = {}, {}
    for step, batch in enumerate(token_batches(run, dp)):
        total = 0.0
        for tokens in batch:
            loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:]) / len(batch)
            loss.backward()
            total += loss.item()
        norms[step + 1] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[step + 1] = total
    model.eval()
    with torch.no_grad():
        evals = token_batches(run, dp, "valid")[0]
        eval_loss = sum(cross_entropy_loss(model(t[:, :-1]), t[:, 1:]).item() for t in evals) / len(evals)
    return {"losses": losses, "norms": norms, "eval": eval_loss}
