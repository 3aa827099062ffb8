"""End-to-end: real CPU processes over gloo, fp32. Every resume is compared with an uninterrupted run
launched once per session (conftest): the dp=2 reference (12 steps, saves at 4, 8, 12) or an 8-step run
under a tensor x pipeline layout."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch

from ckpt_helpers import at_tag, copy_checkpoints, launch, start
from support.procs import kill_tree
from support.runs import train_losses, wait_for_step
from neox.checkpoint.manager import CheckpointManager
from neox.checkpoint.safe_load import safe_load

pytestmark = pytest.mark.slow
STEPS = ["train.steps=12", "train.save_every=4", "train.keep_checkpoints=3"]
REPO = Path(__file__).resolve().parents[2]


def test_crash_during_save_then_kill9_at_a_random_step_resumes_bitwise(reference_run, tmp_path):
    """One run through both faults: rank 0 is killed inside the step-8 save (after the shards, before
    the manifest): `latest` still names step 4, which verifies and loads. The resumed run is then
    SIGKILLed, every process of it, after a random step; the next start resumes from whatever `latest`
    names and ends on the reference's losses bitwise, with the interrupted save cleaned up."""
    run = tmp_path / "crashes"
    out = launch(run, *STEPS, env={"NEOX_CHECKPOINT_FAULT": "after_shards@8"})
    assert out.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert (ckpts / "step_00000008.partial").is_dir() and not (ckpts / "step_00000008").exists()
    assert CheckpointManager(ckpts, 3, True).verify("step_00000004") is None
    for f in (ckpts / "step_00000004").rglob("*.pt"):
        safe_load(f)  # loadable, weights_only

    kill_at = random.Random(time.time_ns()).randint(5, 11)
    print(f"killing every process of the resumed run with SIGKILL after step {kill_at}")
    proc = start(run, *STEPS)
    try:
        wait_for_step(run, kill_at, proc)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    latest = CheckpointManager(ckpts, 3, True).latest_tag()
    assert latest in {"step_00000004", "step_00000008"}, latest

    out = launch(run, *STEPS)
    assert out.returncode == 0, out.stdout[-4000:]
    assert f"resumed from {latest}" in out.stdout
    assert train_losses(run) == train_losses(reference_run)  # bitwise: floats round-trip through JSON
    assert not list(ckpts.glob("*.partial")), "the interrupted save was not cleaned up"


def test_truncated_shard_falls_back_to_previous_checkpoint(reference_run, tmp_path):
    run = tmp_path / "truncated"
    ckpts = copy_checkpoints(reference_run, run)
    shard = ckpts / "step_00000012" / "mp_rank_00_model_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    out = launch(run, *STEPS)  # the same length: the sample order depends on train.steps
    assert out.returncode == 0, out.stdout[-4000:]
    line = (f"step_00000012 is unusable: mp_rank_00_model_states.pt is truncated: {size // 2} bytes, "
            f"manifest says {size}; falling back to step_00000008")
    assert line in out.stdout, out.stdout[-4000:]
    assert "at step 8" in out.stdout and "training steps 9..12" in out.stdout
    ref = train_losses(reference_run)
    got = train_losses(run)
    assert [got[s] for s in range(9, 13)] == [ref[s] for s in range(9, 13)]
    manager = CheckpointManager(ckpts, 3, True)
    assert manager.latest_tag() == "step_00000012" and manager.verify("step_00000012") is None


def test_shape_change_on_resume_is_an_error_naming_the_field(reference_run, tmp_path):
    run = tmp_path / "reshaped"
    copy_checkpoints(reference_run, run)
    out = launch(run, "train.steps=14", "train.save_every=4", "model.n_layers=3")
    assert out.returncode != 0
    assert "model.n_layers 2 -> 3" in out.stdout, out.stdout[-4000:]


@pytest.fixture(scope="module")
def zero_probe(reference_run, tmp_path_factory) -> Tuple[Dict[str, Any], Path]:
    """zero_probe.py's results (one process, ZeRO-0 and ZeRO-1 sources) and its scratch directory."""
    scratch = tmp_path_factory.mktemp("zero_probe")
    probe = subprocess.run([sys.executable, str(Path(__file__).with_name("zero_probe.py")), str(reference_run),
                            "0,1", str(scratch)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    return json.loads(probe.stdout.strip().splitlines()[-1]), scratch


def test_zero_stage_changes_continue_the_loss_curve(zero_probe):
    """One process: a checkpoint written at ZeRO-0 or ZeRO-1 resumes at ZeRO-0, 1 and 2 with the losses
    the uninterrupted engine goes on to produce, to float32 rounding (weights, Adam moments, step, lr)."""
    results = zero_probe[0]
    assert sorted(results) == ["0", "1"]
    # Not bitwise by construction: ZeRO-0 steps AdamW per parameter and clips with a norm reduced per
    # tensor, ZeRO-1/2 step one flat buffer and reduce the norm over it. Same formulas, but the reduction
    # order and the vector/scalar split of the elementwise kernels depend on the CPU's vector width
    # (AVX2 vs AVX-512), so the weights can differ in their last bit (seen: 1 ulp of the loss on an
    # AVX2-only AMD EPYC). A loss of ~9 computed from weights a few ulps apart moves by a few of its own
    # float32 ulps: allow 8 of them. A real resume bug is far larger: the probe also resumes with Adam's
    # moments dropped, and that run must miss by over 100x the tolerance.
    eps32 = 2.0 ** -23
    for source, result in results.items():
        for stage in ("0", "1", "2"):
            for got, want in zip(result[stage], result["source"]):
                assert abs(got - want) <= 8 * eps32 * abs(want), (source, stage, result)
        moments_lost = max(abs(g - w) for g, w in zip(result["moments_dropped"], result["source"]))
        assert moments_lost > 100 * 8 * eps32 * abs(result["source"][0]), (source, result)


def test_tp2_and_pp2_checkpoints_consolidate_to_the_same_model(layout_run, tmp_path):
    """The same 2 steps trained at tp=2 and at pp=2 (ZeRO-1) save through CheckpointManager; each
    consolidates to one file, and the two files hold the same model, up to what float summation order
    can change through two Adam steps (bound derived below)."""
    from safetensors.torch import load_file

    from neox.checkpoint.consolidate import main as consolidate_main

    files = {}
    for preset in ("tp2", "pp2"):
        run = layout_run(preset)
        assert CheckpointManager(run / "checkpoints", 4, True).verify("step_00000002") is None
        files[preset] = tmp_path / f"{preset}.safetensors"
        assert consolidate_main([str(run / "checkpoints" / "step_00000002"), str(files[preset])]) == 0
    a, b = load_file(str(files["tp2"])), load_file(str(files["pp2"]))
    assert sorted(a) == sorted(b)
    # Both runs start from the same weights and see the same data; tp only reorders float sums, so the
    # gradients differ by rounding. What reaches the weights is bounded by Adam itself: one step moves a
    # weight by lr_t * |m_hat / (sqrt(v_hat) + eps)|, and for t <= 2 that ratio is at most 1.0003 whatever
    # the gradients (Cauchy-Schwarz over the bias-corrected averages). Two runs can therefore drift apart
    # by at most 2 * 1.0003 * sum(lr_t); the lr rises during warmup, so the largest logged lr bounds each
    # lr_t. A layout bug (a shard misplaced, a stage's tensors swapped) differs by the weights' own size
    # (init std 0.02), which is far above this bound. Measured: 1.3e-6 on AVX-512, 2.0e-6 on AVX2.
    records = [json.loads(line) for line in (layout_run("tp2") / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in records if "train/lr" in r and r["step"] <= 2]
    assert len(lrs) == 2, records
    bound = 2 * 1.0003 * len(lrs) * max(lrs)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"tp2 vs pp2 consolidated weights: max |difference| {diff:.3g}, bound {bound:.3g}")
    assert diff <= bound, (diff, bound)
    assert bound < 0.02 / 10, bound  # the bound stays well below what a layout bug would produce


# A checkpoint resumed under another layout: (source run, its tag, the new layout's overrides, processes).
# From the dp=2 ZeRO-0 reference at step 8, dp=1 takes 2 micro-batches per step (the same global batch).
DP1 = {"train.grad_accum": 2}
SINGLE = {"parallelism.tp": 1, "parallelism.pp": 1, "parallelism.zero_stage": 0}
LAYOUT_CHANGES = {
    "dp2->dp1": ("reference", "step_00000008", {**DP1}, 1),
    "dp2zero0->dp1zero1": ("reference", "step_00000008", {**DP1, "parallelism.zero_stage": 1}, 1),
    "dp2->tp2": ("reference", "step_00000008", {**DP1, "parallelism.tp": 2}, 2),
    "dp2->pp2": ("reference", "step_00000008", {**DP1, "parallelism.pp": 2, "parallelism.zero_stage": 1}, 2),
    "tp2->tp1": ("tp2", "step_00000004", SINGLE, 1),
    "pp2->pp1": ("pp2", "step_00000004", SINGLE, 1),
    "tp2pp2->tp1pp2": ("pp2_tp2", "step_00000004", {"parallelism.tp": 1, "parallelism.pp": 2,
                                                    "parallelism.zero_stage": 1}, 2),
    # the same pp, other stage bounds: layers 0-1 | 2-4 by the default (compute: a block on each stage), 0-2 | 3-4 uniform
    "pp2-compute->pp2-uniform": ("pp2", "step_00000004", {"parallelism.pipe_partition": "uniform"}, 2),
}
SAVED_WITH = {"reference": "tp=1 pp=1 dp=2 zero=0", "tp2": "tp=2 pp=1 dp=1 zero=0", "pp2": "tp=1 pp=2 dp=1 zero=1",
              "pp2_tp2": "tp=2 pp=2 dp=1 zero=1"}


def _consolidated_logits(root: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The independent reference: the checkpoint's weights as consolidated to one file, run as a GPT."""
    from neox.checkpoint.consolidate import consolidate
    from neox.checkpoint.files import read_manifest
    from neox.checkpoint.saved import saved_layout
    from neox.model.gpt import GPT

    weights, _ = consolidate(root)
    model = GPT(saved_layout(root, read_manifest(root)).cfg)
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.parametrize("change", list(LAYOUT_CHANGES))
def test_a_checkpoint_resumes_under_another_layout(reference_run, layout_run, tmp_path, change):
    """A checkpoint resumed under another data, ZeRO, tensor or pipeline layout (or other pipeline stage
    bounds, which were taken for the same layout before the manifest recorded them), from inside the
    ranks (layout_probe): (1) every parameter each rank holds has exactly the checkpoint's fp32 weight and
    Adam moments (its shard of the full state), (2) the logits of a fixed batch match the consolidated
    checkpoint run as a plain GPT within 1e-5 (tensor parallelism reorders fp32 sums by ~1e-6), (3) the
    step, DeepSpeed's step counters and the resharding line are right, and (4) training continues on the
    uninterrupted run's loss curve within 1e-5 (weights, moments, lr schedule and data position all
    carried over)."""
    from layout_probe import fixed_tokens, resume_and_train
    from support.workers import run_workers

    source, tag, overrides, procs = LAYOUT_CHANGES[change]
    src = reference_run if source == "reference" else layout_run(source)
    run = at_tag(src, tmp_path / "resumed", tag)
    out = tmp_path / "probe.pt"
    run_workers(resume_and_train, procs, str(run), overrides, str(out), True, timeout=280, init="neox")
    log = Path(f"{out}.log").read_text()
    assert f"resharding {tag}: saved with {SAVED_WITH[source]}" in log, log[-3000:]
    if "partition" in str(overrides):
        assert "stages [0, 2, 5], loading into tp=1 pp=2 dp=1 zero=1 stages [0, 3, 5]" in log, log[-3000:]
    step = int(tag[len("step_"):])
    got = safe_load(out)
    assert got["tag"] == tag and got["step"] == step and got["global_steps"] == step, got
    want = _consolidated_logits(src / "checkpoints" / tag, fixed_tokens(got["logits"].shape[-1]))
    diff = (got["logits"] - want).abs().max().item()
    ref_losses, losses = train_losses(src), train_losses(run)
    gaps = {s: abs(losses[s] - ref_losses[s]) for s in sorted(ref_losses) if s > step}
    print(f"{change}: max |logit difference| {diff:.3g}; loss gaps after the resume {gaps}")
    assert diff <= 1e-5, diff
    assert len(gaps) == 4 and max(gaps.values()) <= 1e-5, gaps
