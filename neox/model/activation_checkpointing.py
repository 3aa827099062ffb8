"""Activation checkpointing: one policy for the plain model and its pipeline stages.

With model.activation_checkpointing=full each Block's activations are recomputed in backward instead
of kept: `neox.model.gpt.GPT` wraps every block call in `checkpointed`, and `neox.parallel.pipeline`
hands DeepSpeed the same function for chunks of one Block (never the embedding, norm or head).
torch's non-reentrant checkpoint keeps the gradients of a chunk whose inputs need none (integer
tokens), and saves and restores the random generators around the recompute, so dropout replays the
same masks.
"""
from __future__ import annotations

from typing import Any, Callable

from torch.utils.checkpoint import checkpoint

CHECKPOINTED_LAYERS = ("Block",)  # by class name, as DeepSpeed's `checkpointable_layers` takes them


def checkpointed(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)`, with its activations recomputed in backward."""
    return checkpoint(function, *args, use_reentrant=False)
