"""End-to-end, train.async_save=true: 2 CPU processes over gloo, fp32, compared with the synchronous
reference run of conftest (12 steps, dp=2, saves at 4, 8, 12)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch

from ckpt_helpers import launch
from support.runs import train_losses
from neox.checkpoint.files import read_manifest
from neox.checkpoint.manager import CheckpointManager
from neox.checkpoint.safe_load import safe_load

pytestmark = pytest.mark.slow
STEPS = ["train.steps=12", "train.save_every=4", "train.keep_checkpoints=3", "train.async_save=true"]


def tensors(root: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's .pt files, by file and path inside it."""
    out: Dict[str, torch.Tensor] = {}

    def walk(prefix: str, x) -> None:
        if isinstance(x, torch.Tensor):
            out[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}/{i}", v)

    for rel in sorted(read_manifest(root)["files"]):
        if rel.endswith(".pt"):
            walk(rel, safe_load(root / rel))
    return out


def assert_same_tensors(got: Path, want: Path) -> None:
    a, b = tensors(got), tensors(want)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]


def test_async_checkpoints_resume_bitwise_like_synchronous_ones(reference_run, tmp_path):
    """Rank 0 is SIGKILLed inside its background writer of the step-8 save (every rank's files written,
    no manifest yet): `latest` still names step 4, whose every tensor (weights, Adam moments, counters,
    random states) equals the synchronous run's step 4. The restart resumes from it, saves 8 and 12 in
    the background, and ends only after the writer committed step 12: losses and step-12 tensors equal
    the synchronous run's bitwise."""
    run = tmp_path / "async"
    out = launch(run, *STEPS, env={"NEOX_CHECKPOINT_FAULT": "after_shards@8"})
    assert out.returncode != 0 and "test fault NEOX_CHECKPOINT_FAULT=after_shards@8" in out.stdout, out.stdout[-4000:]
    ckpts, ref = run / "checkpoints", reference_run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert (ckpts / "step_00000008.partial").is_dir() and not (ckpts / "step_00000008").exists()
    assert CheckpointManager(ckpts, 3, True).verify("step_00000004") is None
    assert_same_tensors(ckpts / "step_00000004", ref / "step_00000004")

    out = launch(run, *STEPS)
    assert out.returncode == 0, out.stdout[-4000:]
    assert "resumed from step_00000004" in out.stdout
    assert "checkpoint: step_00000012 written (" in out.stdout, out.stdout[-4000:]
    assert train_losses(run) == train_losses(reference_run)  # bitwise: floats round-trip through JSON
    manager = CheckpointManager(ckpts, 3, True)
    assert manager.latest_tag() == "step_00000012" and manager.verify("step_00000012") is None
    assert_same_tensors(ckpts / "step_00000012", ref / "step_00000012")
    assert not list(ckpts.glob("*.partial"))
