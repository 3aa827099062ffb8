"""Project-wide test setup: one embedded-corpus cache per checkout, one thread per CPU worker."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Built once (~20 s) and reused by every test that trains on the embedded corpus.
os.environ.setdefault("NEOX_CACHE", str(REPO / ".cache" / "neox-test"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def embedded_ready() -> None:
    """Build the embedded corpus once before tests that train on it."""
    from neox.data.embedded import ensure_embedded

    ensure_embedded(8192, quiet=True)


# `make test` runs the suite on 2 pytest-xdist workers (`-n 2 --no-loadscope-reorder`): the Slurm tests
# mostly wait on the scheduler and a one-process test leaves the second core idle. Each group below
# runs whole on one worker: tests that share a session or module fixture (a trained run, a spawn of
# ranks, the local Slurm) must, or each worker would build it again. The files or folders below that
# share such runs are one group each (a new file using tests/checkpoint's reference_run or layout_run
# belongs with "checkpoint-runs"); any other file is its own. The slowest groups go out first
# (measured), so that no worker is left alone with a long one at the end.
SHARED_GROUPS = {"checkpoint/test_resume.py": "checkpoint-runs", "checkpoint/test_async_resume.py": "checkpoint-runs",
                 "convert": "hf", "evaluate": "hf", "parallel": "parallel", "slurm": "slurm"}
SLOWEST_FIRST = ["checkpoint-runs", "slurm", "hf", "train/test_runs.py", "parallel",
                 "checkpoint/test_half_precision.py", "train/test_compile.py", "launch/test_rundir.py", "train/test_worker_errors.py",
                 "generate/test_generate_tp.py", "data/test_shards.py"]


def xdist_group(nodeid: str) -> str:
    """The group of a test: its file's or folder's (SHARED_GROUPS), else its file, relative to tests/."""
    rel = nodeid.split("::", 1)[0].removeprefix("tests/")
    return SHARED_GROUPS.get(rel) or SHARED_GROUPS.get(rel.split("/", 1)[0], rel)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist (the test extra); unused without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's own scheduling by scope, with the groups above as the scopes. (Its `xdist_group` mark
    does not work with pytest 9.2: it renames nodeids through an attribute pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """In an xdist worker, the slowest groups first (xdist hands the groups out in collection order)."""
    if not hasattr(config, "workerinput"):
        return
    rank = {group: i for i, group in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(xdist_group(item.nodeid), len(rank)))  # stable: the rest keep their order
