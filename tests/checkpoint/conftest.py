"""Fixtures for the checkpoint tests; the helpers live in ckpt_helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_helpers import launch, train_losses


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run every resume is compared with: 12 steps, dp=2, saves at 4, 8, 12."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "reference"
    out = launch(run_dir, "train.steps=12", "train.save_every=4", "train.keep_checkpoints=3")
    assert out.returncode == 0, out.stdout[-4000:]
    assert sorted(train_losses(run_dir)) == list(range(1, 13))
    return run_dir
