"""to-hf: the exported transformers model computes what neox computes.

The real-run tests read checkpoints saved under tp=2 and pp=2 through neox's own layout-free reader and
compare with the exported directory loaded by transformers itself (logits within 1e-5 in fp32, greedy
generation token for token). The in-process tests cover the feature matrix of the mapping on random models.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_helpers import hf_causal_lm, hf_greedy, neox_model, random_prompts, write_model_dir
from neox.convert.__main__ import main as convert_main

TOL = 1e-5


@pytest.mark.slow
def test_export_matches_neox_logits_and_greedy_generation(run_and_export):
    run, out = run_and_export
    model, src = neox_model(run)
    hf = hf_causal_lm(out)
    vocab = hf.config.vocab_size
    assert vocab == 8192 < src.cfg.vocab_size or src.cfg.vocab_size == vocab == 8192
    tokens = torch.tensor(random_prompts(vocab, [48, 48], seed=1))
    with torch.no_grad():
        ours, theirs = model(tokens)[..., :vocab], hf(tokens).logits
    assert ours.abs().max() > 1e-2  # not a degenerate comparison
    diff = (ours - theirs).abs().max().item()
    assert diff < TOL, f"{run.name}: max |logit diff| {diff:.2e}"

    from neox.convert.tokenizer import load_model_tokenizer
    from neox.generate import Generator, SamplingConfig

    gen = Generator(model, load_model_tokenizer(src.tokenizer, src.origin), torch.device("cpu"))
    prompts = random_prompts(vocab, [16, 9], seed=2)  # different lengths: one batch, left-padded
    greedy = SamplingConfig(max_new_tokens=32, stop_at_eod=False)
    ours_cached = [t for t, _ in gen.generate_ids(prompts, greedy, use_cache=True)]
    ours_plain = [t for t, _ in gen.generate_ids(prompts, greedy, use_cache=False)]
    theirs = [hf_greedy(hf, p, 32) for p in prompts]
    assert ours_cached == theirs and ours_plain == theirs and all(len(t) == 32 for t in theirs)


@pytest.mark.slow
def test_exported_tokenizer_loads_with_autotokenizer(run_and_export):
    from transformers import AutoTokenizer

    from neox.convert.source import load
    from neox.convert.tokenizer import load_model_tokenizer

    run, out = run_and_export
    src = load(run)
    ours = load_model_tokenizer(src.tokenizer, src.origin)
    theirs = AutoTokenizer.from_pretrained(str(out))
    text = "def parse(line):\n    return line.split(':', 1)  # ünïcode"
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == ours.eod_id
    assert len(theirs) == ours.vocab_size == json.loads((out / "config.json").read_text())["vocab_size"]
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert theirs.decode(theirs(text)["input_ids"]) == text


CASES = {
    "neox-parallel-untied-quarter": {"rotary_pct": 0.25, "parallel_residual": True},
    "neox-sequential-tied-full": {"rotary_pct": 1.0, "parallel_residual": False, "tied_embeddings": True},
    "neox-interleaved-nobias": {"rotary_pct": 0.5, "rotary_interleaved": True, "bias": False},
    "neox-odd-fraction": {"rotary_pct": 0.3, "n_heads": 2},  # 9 of 32 dims -> 8 rotate
    "neox-base-eps": {"rotary_base": 500.0, "norm_eps": 1e-3},
    "llama-gqa": {"norm": "rmsnorm", "mlp": "swiglu", "n_kv_heads": 2, "bias": False},
    "llama-mqa-tied-interleaved": {"norm": "rmsnorm", "mlp": "swiglu", "n_kv_heads": 1, "tied_embeddings": True,
                                   "bias": False, "rotary_interleaved": True},
    "llama-biases": {"norm": "rmsnorm", "mlp": "swiglu", "bias": True, "rotary_base": 500000.0},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_feature_matrix_matches_logits(tmp_path: Path, name: str):
    """Random models of every supported feature, exported through the CLI and loaded by transformers."""
    src = write_model_dir(tmp_path / "neox", CASES[name])
    assert convert_main(["to-hf", str(src), str(tmp_path / "hf")]) == 0
    model, _ = neox_model(src)
    hf = hf_causal_lm(tmp_path / "hf")
    assert type(hf).__name__ == ("LlamaForCausalLM" if name.startswith("llama") else "GPTNeoXForCausalLM")
    assert hf.config.vocab_size == 257 and model.cfg.vocab_size == 384  # the bytes tokenizer; padding dropped
    tokens = torch.tensor(random_prompts(257, [40, 40, 40]))
    with torch.no_grad():
        diff = (model(tokens)[..., :257] - hf(tokens).logits).abs().max().item()
    assert diff < TOL, f"{name}: max |logit diff| {diff:.2e}"


def test_padding_rows_are_never_generated(tmp_path: Path):
    """The embedding's padding rows can have the largest logits (they are never trained towards a token):
    neither neox's generator nor the exported model can emit them."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    src = write_model_dir(tmp_path / "neox", {"tied_embeddings": False})
    weights = load_file(str(src / "model.safetensors"))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    weights["norm_f.norm.bias"][:] = 5.0  # a constant direction in every final hidden state...
    weights["head.proj.weight"][257:] = 1.0  # ...that only the padding rows read: their logits dominate
    save_file(weights, str(src / "model.safetensors"), metadata=meta)
    assert convert_main(["to-hf", str(src), str(tmp_path / "hf")]) == 0
    hf = hf_causal_lm(tmp_path / "hf")
    assert hf.lm_head.weight.shape[0] == 257
    prompt = random_prompts(257, [8])[0]
    assert max(hf_greedy(hf, prompt, 8)) < 257

    from neox.generate import Generator, SamplingConfig

    gen = Generator.load(src)
    assert gen.model(torch.tensor([prompt]))[0, -1].argmax() >= 257  # the raw model would pick padding
    for cfg in (SamplingConfig(max_new_tokens=8, stop_at_eod=False),
                SamplingConfig(max_new_tokens=8, stop_at_eod=False, temperature=1.0, seed=3)):
        (tokens, _), = gen.generate_ids([prompt], cfg)
        assert max(tokens) < 257
