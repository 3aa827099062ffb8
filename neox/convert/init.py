"""`train.init_from=<path>`: start a run from a model's weights (weights only: fresh optimizer, step 0).

The path is anything `neox.convert.source.load` reads: a neox model directory (`from-hf`'s output),
a run or checkpoint of any layout, an HF directory. Every rank reads the full weights and copies its
own slice into the model it has just built (a `GPT`, its tensor-parallel form, or a pipeline stage),
before the DeepSpeed engine makes its fp32 master copy. A run that already has a checkpoint resumes
from it instead: init_from only seeds the first start.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from neox.errors import ConfigError
from neox.model.gpt import GPTConfig

# what must agree between the run's model and the weights (kernels, dropout, init may differ)
SHAPE_FIELDS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "position", "rotary_dims",
                "rotary_base", "rotary_interleaved", "parallel_residual", "norm", "norm_eps", "mlp",
                "tied_embeddings", "bias")


VOCAB_WEIGHTS = ("embed.tok.weight", "head.proj.weight")


def check_same_model(run: GPTConfig, src: GPTConfig, where: str) -> None:
    """ConfigError naming the first field where the run's model differs from the weights' model."""
    for f in SHAPE_FIELDS:
        a, b = getattr(run, f), getattr(src, f)
        if f == "vocab_size" and a > b:
            continue  # the run pads the vocab further (another model.vocab_multiple): zero rows are appended
        if a != b:
            key = "model.vocab_size (padded)" if f == "vocab_size" else f"model.{f}"
            raise ConfigError(f"train.init_from={where}: the run's {key} is {a!r}, the weights' is {b!r}; "
                              "train with the model config saved with them (from-hf writes it as model/<name>.yaml)")
    if run.seq_len > src.seq_len and src.position == "learned":
        raise ConfigError(f"train.init_from={where}: learned positions cover {src.seq_len} tokens, the run's "
                          f"model.seq_len is {run.seq_len}")


@torch.no_grad()
def load_initial_weights(model: torch.nn.Module, cfg: GPTConfig, source: str, tp_rank: int = 0, tp_size: int = 1,
                         checkpoints: Optional[Path] = None, say: Callable[[str], None] = print) -> bool:
    """Copy `source`'s weights into this rank's `model`; False (and nothing done) when `checkpoints`
    already holds a checkpoint to resume from."""
    from neox.convert.source import load
    from neox.parallel.model_layout import ModelLayout, Parallelism

    if checkpoints is not None and (Path(checkpoints) / "latest").is_file():
        say(f"train.init_from={source} ignored: the run resumes from its own checkpoint")
        return False
    src = load(Path(source).expanduser())
    check_same_model(cfg, src.cfg, source)
    layout = ModelLayout(cfg, Parallelism(tp=tp_size))  # names (plain or pipeline stage) and tp shards
    for local, p in model.named_parameters():
        name = layout.gpt_name(local)
        if name not in src.weights:
            raise ConfigError(f"train.init_from={source}: it has no weight {name}")
        w = src.weights[name]
        rows = cfg.vocab_size
        if name in VOCAB_WEIGHTS and w.shape[0] < rows:
            w = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
        w = layout.shard(name, w, tp_rank)
        if w.shape != p.shape:
            raise ConfigError(f"train.init_from={source}: {name} has shape {tuple(w.shape)} for this rank, the "
                              f"model {tuple(p.shape)}")
        p.copy_(w.to(p.dtype))
    padded = f"; vocab padded from {src.cfg.vocab_size} to {cfg.vocab_size} rows with zeros" \
        if cfg.vocab_size > src.cfg.vocab_size else ""
    say(f"initialized the weights from {src.origin} (train.init_from; fresh optimizer, step 0{padded})")
    return True
