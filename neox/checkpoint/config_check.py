"""Compare the config a checkpoint was trained with against the config resuming from it.

A change of the model's shape or of what its weights mean is an error naming every changed field;
a change of the optimizer, schedule, batch, data or layout is allowed, with one warning per field;
fields that do not affect training (logging, paths, cadence of evals and saves) are ignored.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from neox.errors import CheckpointError

# The checkpoint's tensors would not fit, or would mean something else.
SHAPE_FIELDS = {
    "model.n_layers", "model.d_model", "model.n_heads", "model.n_kv_heads", "model.d_ff", "model.vocab_size",
    "model.vocab_multiple", "model.position", "model.rotary_pct", "model.rotary_interleaved", "model.mlp",
    "model.norm", "model.tied_embeddings", "model.bias", "model.parallel_residual",
    "data.tokenizer", "data.embedded_vocab", "train.precision",
}
# Never worth a word: where output goes and how often evals, logs and saves happen.
IGNORED_PREFIXES = ("logging.", "cluster.", "run_name", "run_dir", "dry_run", "model.name", "parallelism.name",
                    "data.name", "data.cache_dir", "model.kernels", "model.kernel_ops.", "train.eval_every",
                    "train.eval_batches", "train.save_every", "train.keep_checkpoints", "train.log_every",
                    "train.collective_timeout_s", "train.max_nonfinite_steps", "train.compile",
                    "model.activation_checkpointing")
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
}


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


def diff_configs(saved: dict, current: dict) -> List[Tuple[str, Any, Any]]:
    a, b = _flatten(saved), _flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resume_config(saved: dict, current: dict) -> List[str]:
    """Warnings for allowed changes; raises CheckpointError naming every field that changes the shape."""
    errors, warnings = [], []
    learned = (current.get("model") or {}).get("position") == "learned"
    for key, old, new in diff_configs(saved or {}, current or {}):
        if key.startswith(IGNORED_PREFIXES):
            continue
        if key in SHAPE_FIELDS or (key == "model.seq_len" and learned):
            errors.append(f"{key} {old!r} -> {new!r}")
        else:
            warnings.append(f"{key} changed from {old!r} to {new!r} since the checkpoint: {_why(key)}")
    if errors:
        raise CheckpointError("the checkpoint was trained with a different model shape: " + "; ".join(errors)
                              + ". Resume with the checkpoint's values or start a new run_dir")
    return warnings
