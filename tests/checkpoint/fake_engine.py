"""A stand-in for a DeepSpeed engine with the same checkpoint calls, for fast in-process tests, and the
manager those tests drive it with."""
from __future__ import annotations

from pathlib import Path

import torch

from neox.checkpoint import CheckpointManager
from neox.model.gpt import GPTConfig
from neox.parallel.model_layout import ModelLayout, Parallelism

TINY_MODEL = GPTConfig(n_layers=2, d_model=16, n_heads=2, n_kv_heads=2, d_ff=64, seq_len=8, vocab_size=64)


def tiny_layout(**parallel) -> ModelLayout:
    return ModelLayout(TINY_MODEL, Parallelism(**parallel))


def manager(tmp_path, keep=3, log=None, layout=None, async_save=False):
    """(a manager as the trainer makes it: with the run's layout, default tp=pp=dp=1 ZeRO-0; its messages)"""
    msgs = []
    m = CheckpointManager(tmp_path / "checkpoints", keep, True, log=log or msgs.append,
                          layout=layout or tiny_layout(), async_save=async_save)
    return m, msgs


def client(step):
    """neox's client state of a save at `step`."""
    return {"run_state": {"step": step, "consumed_samples": 8 * step, "tokens": 512 * step, "skipped_steps": 0},
            "config": {"model": {"n_layers": 2}, "optim": {"lr": 1e-3}}}


class UnsafeTorchEngine:
    """Like DeepSpeed 0.19.8's TorchCheckpointEngine: saves with torch.save, loads with weights_only=False."""

    def save(self, state_dict, path):
        torch.save(state_dict, path)

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
        # as DeepSpeed: through the checkpoint engine, with the live tensors (an async save must copy them)
        self.checkpoint_engine.save({"module": {"w": self.w}, **(client_state or {})},
                                    str(d / "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"optimizer": {"m": self.w * 2}}, str(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        return True

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True):
        d = Path(load_dir) / tag
        sd = self.checkpoint_engine.load(str(d / "mp_rank_00_model_states.pt"), map_location="cpu")
        self.checkpoint_engine.load(str(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), map_location="cpu")
        self.w = sd.pop("module")["w"]
        return str(d), sd
