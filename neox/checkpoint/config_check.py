"""Compare the config a checkpoint was trained with against the config resuming from it.

What a change means is declared on each schema field (`neox.config.schema`, metadata "resume"):
- error: the model's shape or what its weights mean (rotary_base, norm_eps, ...) changes; every such
  field is named in one CheckpointError;
- warn: the optimizer, schedule, batch, data or layout changes; one warning per field;
- ignore: logging, paths, kernels, the cadence of evals and saves.
A key the current schema does not know (a newer or older schema's) is a warning.
"""
from __future__ import annotations

from dataclasses import Field
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

from neox.config.domains import ERROR, IGNORE, WARN, leaf_fields
from neox.config.schema import RunConfig
from neox.errors import CheckpointError

WHY = {
    "optim.": "the optimizer continues with the new value",
    "train.steps": "the schedule length changes, and so does the sample order (the training index is built "
                   "for train.steps x global batch samples)",
    "optim.decay_steps": "the schedule length changes",
    "train.micro_batch": "the batch changes", "train.grad_accum": "the batch changes",
    "train.global_batch": "the batch changes",
    "data.": "the data position (consumed samples) now indexes a different sample order",
    "parallelism.": "the checkpoint is resharded to the new layout",
    "train.seed": "only new random streams are affected; restored ones continue",
    "model.init": "the weights come from the checkpoint; the init only applies to a fresh run",
}


@lru_cache(maxsize=1)
def resume_fields() -> Dict[str, Field]:
    """Dotted key -> schema field, for every leaf of the run config."""
    return dict(leaf_fields(RunConfig))


def _field(key: str) -> Optional[Field]:
    """The schema field that governs `key`: itself, or the leaf above it (cluster.* -> cluster)."""
    fields = resume_fields()
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        f = fields.get(".".join(parts[:n]))
        if f is not None:
            return f
    return None


def resume_class(key: str, current: dict) -> str:
    """error | warn | ignore for a change of `key`, read from the schema's metadata."""
    f = _field(key)
    if f is None:
        return WARN  # a key this schema does not know: say it, never refuse on it
    cls = f.metadata["resume"]
    for other, value in f.metadata.get("resume_error_if", {}).items():
        if _flatten(current).get(other) == value:
            cls = ERROR
    return cls


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _why(key: str) -> str:
    if key in WHY:
        return WHY[key]
    for prefix, why in WHY.items():
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return why
    return "resuming with the new value"


def _same_state(key: str, old: Any, new: Any) -> bool:
    """Values the schema declares to save the same state (train.precision: fp8 trains bf16 weights)."""
    f = _field(key)
    same = f.metadata.get("resume_same_state", {}) if f is not None else {}
    return same.get(old, old) == same.get(new, new)


def diff_configs(saved: dict, current: dict) -> List[Tuple[str, Any, Any]]:
    a, b = _flatten(saved), _flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(saved: dict, current: dict) -> List[str]:
    """Warnings for allowed changes; raises CheckpointError naming every field that changes the model."""
    errors, warnings = [], []
    for key, old, new in diff_configs(saved or {}, current or {}):
        cls = resume_class(key, current or {})
        if cls == IGNORE:
            continue
        if cls == ERROR and _same_state(key, old, new):
            warnings.append(f"{key} changed from {old!r} to {new!r} since the checkpoint: the weights and optimizer "
                            "state are the same, only how the matmuls run changes")
            continue
        if cls == ERROR:
            errors.append(f"{key} {old!r} -> {new!r}")
        else:
            warnings.append(f"{key} changed from {old!r} to {new!r} since the checkpoint: {_why(key)}")
    if errors:
        raise CheckpointError("the checkpoint was trained with a different model shape or meaning of its weights: "
                              + "; ".join(errors) + ". Resume with the checkpoint's values or start a new run_dir")
    return warnings
