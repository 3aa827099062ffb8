"""Read a neox model from wherever it lives, as full (tp=1, pp=1) fp32 `GPT` weights plus its config.

    a run directory or a checkpoint   the layout-free full state of `neox.checkpoint.reshard`
                                      (any tp, pp, dp, ZeRO 0-2; ZeRO-3 through `consolidate`)
    a neox model directory            what `python -m neox.convert from-hf` writes: model.safetensors
                                      (GPT's names, the model config in its metadata), tokenizer.json
    a consolidated .safetensors file  what `python -m neox.checkpoint.consolidate` writes
    a Hugging Face directory          GPTNeoXForCausalLM / LlamaForCausalLM, converted in memory

Generation, evaluation, export and `train.init_from` all start here, so they accept the same paths.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from neox.errors import CheckpointError, DataError
from neox.model.gpt import GPTConfig

WEIGHTS = "model.safetensors"  # a neox model directory's weights
CONFIG_KEY = "neox.config"  # safetensors metadata: JSON with at least {"model": {...}}
EOD_KEY = "neox.eod_token"  # safetensors metadata: the tokenizer's end-of-document token


@dataclass
class NeoxModel:
    section: dict  # the `model:` config (conf/model style)
    cfg: GPTConfig
    weights: Dict[str, torch.Tensor]  # GPT state dict, full, fp32
    tokenizer: Optional[str]  # tokenizer.json path or "bytes"; None when the source does not say
    origin: str  # for messages: what was read
    eod_token: Optional[str] = None  # the tokenizer's end-of-document token, where the source names it


def gpt_config_of(section: dict) -> GPTConfig:
    """The resolved shape of a `model:` section (missing fields take the schema's defaults)."""
    from omegaconf import OmegaConf

    from neox.config.plan import gpt_config
    from neox.config.schema import ModelConfig

    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), {k: v for k, v in section.items() if k != "name"})
    return gpt_config(merged)


def run_tokenizer(config: dict) -> Optional[str]:
    """The tokenizer a run's data was prepared with, from its resolved config (None if not on this machine)."""
    data = config.get("data")
    if not data:  # a model directory's config: no data section
        return None
    if data.get("tokenizer"):
        spec = str(data["tokenizer"])
        return spec if spec == "bytes" or Path(spec).expanduser().exists() else None
    if data.get("kind", "embedded") == "embedded":
        from neox.data.embedded import corpus_dir

        path = corpus_dir(int(data.get("embedded_vocab", 8192))) / "tokenizer.json"
    else:
        prefixes = data.get("prefixes") or []
        if not prefixes:
            return None
        path = Path(str(prefixes[0]) + ".tokenizer.json")
    return str(path) if path.is_file() else None


def load(path: Path) -> NeoxModel:
    """Any of the sources in the module docstring; CheckpointError when `path` is none of them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file() and path.suffix == ".safetensors":
        return _from_safetensors(path)
    if path.is_dir() and (path / "config.json").is_file():
        from neox.convert.importer import read_hf

        return read_hf(path)
    if path.is_dir() and (path / WEIGHTS).is_file():
        return _from_safetensors(path / WEIGHTS)
    return _from_checkpoint(path)


def _from_safetensors(file: Path) -> NeoxModel:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"{file}: unreadable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{file} has no {CONFIG_KEY} metadata: not written by neox (consolidate or from-hf)")
    config = json.loads(meta[CONFIG_KEY])
    section = config["model"]
    tok = file.parent / "tokenizer.json"
    tokenizer = str(tok) if tok.is_file() else run_tokenizer(config)
    weights = {k: v.float() for k, v in weights.items()}
    return NeoxModel(section, gpt_config_of(section), weights, tokenizer, str(file), meta.get(EOD_KEY))


def _from_checkpoint(path: Path) -> NeoxModel:
    from neox.checkpoint.consolidate import consolidate, resolve, verify_local
    from neox.checkpoint.reshard import full_state

    root = resolve(path)
    state_file = root / "neox_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a neox run, checkpoint or model directory (no {state_file.name}, "
                              "config.json or model.safetensors)")
    manifest = verify_local(root) or {}
    config = json.loads(state_file.read_text()).get("config")
    if not config:
        raise CheckpointError(f"{state_file} holds no config")
    layout = manifest.get("layout") or {}
    if int(layout.get("zero_stage") or 0) > 2:  # the full state reads ZeRO 0-2; ZeRO-3 (tp=1) consolidates
        weights, _ = consolidate(root)
    else:
        full, _ = full_state(root)  # under the layout the checkpoint's manifest records
        weights = {name: state["param"] for name, state in full.items()}
    section = config["model"]
    return NeoxModel(section, gpt_config_of(section), weights, run_tokenizer(config),
                     f"{root} (step {manifest.get('step', '?')})")


def check_vocab(vocab: int, cfg: GPTConfig, where: str) -> None:
    """A tokenizer must fit the model's embedding."""
    if vocab > cfg.vocab_size:
        raise DataError(f"the tokenizer ({where}) has {vocab} tokens but the model's embedding has "
                        f"{cfg.vocab_size} rows; use the tokenizer the model was trained with")
