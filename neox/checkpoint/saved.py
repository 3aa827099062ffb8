"""What a checkpoint says it is: the model and layout it was written with, read back from its manifest.

Every manifest records the writer's `ModelLayout` (`neox.parallel.model_layout`): the resolved model
(`GPTConfig`) and tp, pp, dp, ZeRO stage, partition method and stage bounds. `saved_layout` is the one
function resharding, consolidation and conversion read it through. Checkpoints written before the
manifest held the model are read through the config saved beside them (neox_state.json).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from neox.errors import CheckpointError
from neox.parallel.model_layout import ModelLayout, Parallelism

STATE_JSON = "neox_state.json"


def saved_config(root: Path) -> Optional[Dict[str, Any]]:
    """The resolved run config saved with a checkpoint (None without one)."""
    path = Path(root) / STATE_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("config")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc})") from None


def saved_layout(root: Path, manifest: Dict[str, Any], purpose: str = "reading it") -> ModelLayout:
    """The `ModelLayout` a checkpoint was written with. `manifest`: its manifest.json, as read (and
    verified) by the caller. CheckpointError names `purpose` when the checkpoint does not say."""
    layout = manifest.get("layout") or {}
    if "model" in manifest:
        return ModelLayout.from_record(manifest["model"], layout)
    config = saved_config(root)
    if not config or "model" not in config:
        raise CheckpointError(f"{root}: {purpose} needs the saved config in {STATE_JSON}")
    # a checkpoint of an older neox: its model is resolved from the saved config, as the run did
    from omegaconf import OmegaConf

    from neox.config.plan import gpt_config

    partition = (config.get("parallelism") or {}).get("pipe_partition") or "parameters"
    return ModelLayout(gpt_config(OmegaConf.create(config["model"])), Parallelism.from_record(layout, partition))


def describe(saved: Dict[str, Any], now: ModelLayout) -> str:
    """'saved with <layout>, loading into <layout>', naming stage bounds only where they alone differ."""
    old, new = Parallelism.from_record(saved), now.parallel
    if old.pp == new.pp > 1 and "parts" in saved and tuple(saved["parts"]) != now.parts:
        return (f"saved with {old.describe()} stages {list(saved['parts'])}, loading into {new.describe()} "
                f"stages {list(now.parts)}")
    return f"saved with {old.describe()}, loading into {new.describe()}"


def layout_changed(saved: Dict[str, Any], now: ModelLayout) -> bool:
    """Whether a checkpoint's recorded layout differs from this run's in a way DeepSpeed's own loader
    cannot follow: tp, pp, dp, ZeRO stage, or (recorded since the manifest holds them) stage bounds."""
    if not saved:
        return False  # a checkpoint that records no layout is loaded as it is
    old, new = Parallelism.from_record(saved), now.parallel
    sizes = lambda p: (p.tp, p.pp, p.dp, p.zero_stage)  # noqa: E731
    return sizes(old) != sizes(new) or ("parts" in saved and tuple(saved["parts"]) != now.parts)


def jsonable(tree: Any) -> Any:
    """The client state as neox_state.json holds it (tensors of one element as numbers, anything else by repr)."""
    if isinstance(tree, dict):
        return {str(k): jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [jsonable(v) for v in tree]
    if isinstance(tree, (str, int, float, bool)) or tree is None:
        return tree
    if isinstance(tree, torch.Tensor) and tree.numel() == 1:
        return tree.item()
    return repr(tree)
