"""`to-hf`: a neox model (any checkpoint layout, see `neox.convert.source`) -> a transformers directory:
model.safetensors, config.json, generation_config.json and the tokenizer as a PreTrainedTokenizerFast.

The model is built by transformers itself (on the meta device, then given our tensors) and saved with its
own `save_pretrained`, so the files are exactly what this transformers version writes and reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from neox.convert import hf as H
from neox.convert.outdir import check_out, staged
from neox.convert.source import NeoxModel, check_vocab, load
from neox.convert.tokenizer import ModelTokenizer, load_model_tokenizer
from neox.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Exported:
    arch: str
    vocab: int  # rows kept: the tokenizer's vocab
    padded_vocab: int  # rows the neox model had
    params: int
    origin: str


def hf_model(model: NeoxModel, tok: ModelTokenizer, dtype: torch.dtype = torch.float32):
    """The transformers model equal to `model` (its first `tok.vocab_size` vocab rows)."""
    import transformers

    arch = H.family(model.cfg)
    kwargs = H.hf_config_dict(model.cfg, tok.vocab_size, arch, tok.eod_id)
    config_cls = transformers.GPTNeoXConfig if arch == H.NEOX_ARCH else transformers.LlamaConfig
    config = config_cls(**kwargs, dtype=dtype, architectures=[arch])
    with torch.device("meta"):
        hf = getattr(transformers, arch)(config)
    state = H.to_hf(model.cfg, model.weights, tok.vocab_size, arch)
    result = hf.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not (model.cfg.tied_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a mapping bug, never a user error: say which tensor
        raise ConfigError(f"internal: the {arch} mapping left {(missing or unexpected)[0]} "
                          f"{'unset' if missing else 'unused'}")
    if model.cfg.tied_embeddings:
        hf.tie_weights()
    for name, module in list(hf.named_modules()):  # buffers (rotary inv_freq) are rebuilt off the meta device
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, attr = name.rpartition(".")
            setattr(hf.get_submodule(parent), attr, type(module)(config=config))
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = tok.eod_id
    hf.generation_config.pad_token_id = tok.eod_id
    return hf.eval()


def export(src: Path, out: Path, force: bool = False, tokenizer: Optional[str] = None,
           dtype: str = "float32") -> Exported:
    """Write the transformers directory `out` for the neox model at `src`; nothing is written on error."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    check_out(out, force)
    model = load(src)
    H.family(model.cfg)  # refuse an unrepresentable model before touching the tokenizer
    tok = load_model_tokenizer(tokenizer or model.tokenizer, model.origin, model.eod_token)
    check_vocab(tok.vocab_size, model.cfg, tok.source)
    hf = hf_model(model, tok, DTYPES[dtype])
    with staged(out, force) as tmp:
        hf.save_pretrained(str(tmp))
        tok.save_hf(tmp, model.cfg.seq_len)
    params = sum(p.numel() for p in hf.parameters())
    return Exported(type(hf).__name__, tok.vocab_size, model.cfg.vocab_size, params, model.origin)
