"""Session fixtures for the checkpoint tests: the runs their resumes are compared with, each launched
once and shared (the helpers live in ckpt_helpers.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import pytest

from ckpt_helpers import launch
from support.runs import train_losses

# a layout preset -> the processes its runs take (dp=1)
LAYOUT_PROCS = {"tp2": 2, "pp2": 2, "pp2_tp2": 4}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run every resume is compared with: 12 steps, dp=2, saves at 4, 8, 12."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "reference"
    out = launch(run_dir, "train.steps=12", "train.save_every=4", "train.keep_checkpoints=3")
    assert out.returncode == 0, out.stdout[-4000:]
    assert sorted(train_losses(run_dir)) == list(range(1, 13))
    return run_dir


@pytest.fixture(scope="session")
def layout_run(tmp_path_factory) -> Callable[[str], Path]:
    """`layout_run(preset)`: an 8-step run under that tensor x pipeline layout (dp=1), checkpoints at
    steps 2, 4, 6 and 8 kept; launched on first use, then shared."""
    made: Dict[str, Path] = {}

    def run(preset: str) -> Path:
        if preset not in made:
            run_dir = tmp_path_factory.mktemp("layout") / preset
            out = launch(run_dir, "train.steps=8", "train.save_every=2", "train.keep_checkpoints=4",
                         f"parallelism={preset}", f"cluster.cpu_procs={LAYOUT_PROCS[preset]}")
            assert out.returncode == 0, out.stdout[-4000:]
            made[preset] = run_dir
        return made[preset]

    return run
