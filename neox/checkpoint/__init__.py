"""Checkpoints: the DeepSpeed engine's model/optimizer/scheduler state plus neox's own run state
(step, data position, every random state, the resolved config)."""
from neox.checkpoint.manager import CheckpointManager, rng_state, set_rng_state

__all__ = ["CheckpointManager", "rng_state", "set_rng_state"]
