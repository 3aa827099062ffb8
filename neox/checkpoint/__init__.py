"""Checkpoints: the DeepSpeed engine's model/optimizer/scheduler state plus neox's own run state
(step, data position, every random state, the resolved config), saved atomically with a manifest,
verified on load, with a fallback to the previous good checkpoint."""
from neox.checkpoint.config_check import check_resume_config
from neox.checkpoint.manager import CheckpointManager
from neox.checkpoint.rng import rng_state, set_rng_state
from neox.checkpoint.tags import tag_for

__all__ = ["CheckpointManager", "check_resume_config", "rng_state", "set_rng_state", "tag_for"]
