"""`from-hf`: a local GPTNeoXForCausalLM or LlamaForCausalLM directory -> a neox model directory.

    <out>/model.safetensors     full GPT weights (fp32), the model config in the metadata
    <out>/model/<name>.yaml     the same config in conf/model style
    <out>/tokenizer.json        the HF directory's tokenizer

Train from it with `python launch.py hydra.searchpath=[file://<out>] model=<name> train.init_from=<out>`;
generate or evaluate with the directory as the checkpoint. The weights are read with safetensors (or
torch.load(weights_only=True) for .bin files), never through code from the directory.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch

from neox.convert import hf as H
from neox.convert.source import CONFIG_KEY, EOD_KEY, WEIGHTS, NeoxModel, check_vocab, gpt_config_of
from neox.errors import CheckpointError, DataError


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc})") from None


def _weight_files(hf_dir: Path) -> List[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (hf_dir / index).is_file():
            names = sorted(set(_read_json(hf_dir / index).get("weight_map", {}).values()))
            missing = [n for n in names if not (hf_dir / n).is_file()]
            if missing:
                raise CheckpointError(f"{hf_dir}: weight file {missing[0]} named in {index} is missing")
            return [hf_dir / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / single).is_file():
            return [hf_dir / single]
    raise CheckpointError(f"{hf_dir} holds no weights (model.safetensors or pytorch_model.bin)")


def read_hf_weights(hf_dir: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of an HF directory, without running code from it."""
    out: Dict[str, torch.Tensor] = {}
    for f in _weight_files(hf_dir):
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                out.update(load_file(str(f)))
            else:
                out.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 - a corrupt file is one line naming it
            raise CheckpointError(f"{f}: unreadable weights ({str(exc).splitlines()[0][:200]})") from None
    return out


def _eod_token(hf_dir: Path) -> Optional[str]:
    """The end-of-text token the HF tokenizer names (tokenizer_config.json), if it says."""
    tc = hf_dir / "tokenizer_config.json"
    if tc.is_file():
        eos = _read_json(tc).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    return None


def read_hf(hf_dir: Path, name: Optional[str] = None, tokenizer: Optional[str] = None) -> NeoxModel:
    """An HF directory as a neox model in memory (config checked, every weight checked by name and shape)."""
    hf_dir = Path(hf_dir)
    config = _read_json(hf_dir / "config.json")
    arch, section = H.model_section(config, name or _model_name(hf_dir))
    cfg = gpt_config_of(section)
    attention_bias, mlp_bias = H.hf_biases(config, arch)
    expected = H.expected_hf_shapes(cfg, section["vocab_size"], arch, attention_bias, mlp_bias)
    hf_sd = H.check_hf_state(read_hf_weights(hf_dir), expected, str(hf_dir))
    if section["tied_embeddings"]:
        hf_sd.pop("lm_head.weight", None)  # the tied copy, when saved
    elif "lm_head.weight" not in hf_sd:
        raise CheckpointError(f"{hf_dir}: weight lm_head.weight is missing (tie_word_embeddings is false)")
    section["bias"] = H.import_bias(section, arch, hf_sd)
    cfg = gpt_config_of(section)
    weights = H.from_hf(cfg, {k: v.float() for k, v in hf_sd.items()}, arch)
    tok = tokenizer or (str(hf_dir / "tokenizer.json") if (hf_dir / "tokenizer.json").is_file() else None)
    return NeoxModel(section, cfg, weights, tok, str(hf_dir), _eod_token(hf_dir))


def _model_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).resolve().name) or "imported"


def model_yaml(section: dict, source: str) -> str:
    """conf/model style YAML for a model section."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_yaml(OmegaConf.create({"model": section}))
    return f"# @package _global_\n# imported from {source} by python -m neox.convert from-hf\n{body}"


def import_hf(hf_dir: Path, out: Path, force: bool = False, tokenizer: Optional[str] = None) -> NeoxModel:
    """Write the neox model directory for `hf_dir` (see the module docstring); nothing is written on error."""
    from safetensors.torch import save_file

    from neox.convert.outdir import check_out, staged
    from neox.convert.tokenizer import load_model_tokenizer

    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    check_out(out, force)
    model = read_hf(hf_dir, _model_name(out), tokenizer)
    if model.tokenizer is None:
        raise DataError(f"{hf_dir} has no tokenizer.json; pass --tokenizer <tokenizer.json>")
    tok = load_model_tokenizer(model.tokenizer, str(hf_dir), model.eod_token)
    check_vocab(tok.vocab_size, model.cfg, model.tokenizer)
    name = model.section["name"]
    with staged(out, force) as tmp:
        meta = {CONFIG_KEY: json.dumps({"model": model.section}, sort_keys=True), "neox.source": str(hf_dir),
                EOD_KEY: tok.eod_token}
        save_file(model.weights, str(tmp / WEIGHTS), metadata=meta)
        (tmp / "model").mkdir()
        (tmp / "model" / f"{name}.yaml").write_text(model_yaml(model.section, str(hf_dir)))
        tok.tok.save(str(tmp / "tokenizer.json"))
    model.tokenizer = str(out / "tokenizer.json")
    return model

