"""A stand-in for a DeepSpeed engine with the same checkpoint calls, for fast in-process tests."""
from __future__ import annotations

from pathlib import Path

import torch


class UnsafeTorchEngine:
    """Like DeepSpeed 0.19.8's TorchCheckpointEngine: loads with weights_only=False."""

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)


class FakeEngine:
    def __init__(self, value: float = 0.0):
        self.w = torch.full((4,), value)
        self.checkpoint_engine = UnsafeTorchEngine()

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        assert save_latest is False, "neox must write `latest` itself"
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": self.w.clone()}, **(client_state or {})}, d / "mp_rank_00_model_states.pt")
        torch.save({"optimizer": {"m": self.w * 2}}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        return True

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True):
        d = Path(load_dir) / tag
        sd = self.checkpoint_engine.load(str(d / "mp_rank_00_model_states.pt"), map_location="cpu")
        self.checkpoint_engine.load(str(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), map_location="cpu")
        self.w = sd.pop("module")["w"]
        return str(d), sd
