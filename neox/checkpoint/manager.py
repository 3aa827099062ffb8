"""Save and resume through the DeepSpeed engine, keeping the last N checkpoints."""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from neox.errors import CheckpointError

TAG_PREFIX = "step_"


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


class CheckpointManager:
    def __init__(self, directory: Path, keep: int, is_main: bool):
        self.directory = directory
        self.keep = max(1, keep)
        self.is_main = is_main

    def latest_tag(self) -> Optional[str]:
        latest = self.directory / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (self.directory / tag).is_dir():
            raise CheckpointError(f"{latest} points to {tag}, which does not exist; "
                                  "remove the `latest` file to start over, or restore the checkpoint")
        return tag

    def save(self, engine, step: int, client_state: Dict[str, Any]) -> Path:
        tag = tag_for(step)
        client_state = {**client_state, "rng": rng_state(), "step": step}
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state)
        if dist.is_initialized():
            dist.barrier()
        if self.is_main:
            self._prune()
        return self.directory / tag

    def load(self, engine) -> Optional[Dict[str, Any]]:
        """Resume from the latest checkpoint, if any; returns neox's client state."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path, client = engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None:
            raise CheckpointError(f"could not load checkpoint {self.directory / tag}")
        set_rng_state(client["rng"])
        return client

    def _prune(self) -> None:
        tags = sorted(p for p in self.directory.glob(f"{TAG_PREFIX}*") if p.is_dir())
        for old in tags[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
