"""Helpers for the Hugging Face interop, generation and evaluation tests (tests/convert, tests/generate,
tests/evaluate): a few tiny real runs (2 CPU processes, the workers alone), trained once per session and
shared by every directory's tests (`trained` reuses a finished run), random in-process models written as
neox model directories, and transformers loading without the network."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Two families x two layouts, each 2 steps of a 2-layer model on the embedded corpus (BPE vocab 8192).
# vocab_size 8200 pads the embedding to 8320 rows: the export must drop the padding.
_COMMON = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.seq_len=64", "train.micro_batch=2",
           "train.grad_accum=1", "train.steps=2", "train.log_every=1", "train.eval_every=1000",
           "train.eval_batches=1", "train.precision=fp32", "logging.wandb=false", "logging.tensorboard=false",
           "optim.warmup_steps=1", "train.collective_timeout_s=120"]
RUNS: Dict[str, List[str]] = {
    # GPT-NeoX family: LayerNorm + GeLU, a quarter of each head rotating, parallel residual, untied, padded vocab
    "neox_tp2": ["parallelism=tp2", "model.vocab_size=8200", "model.rotary_pct=0.25", "model.parallel_residual=true",
                 "model.tied_embeddings=false"],
    # sequential residual, tied, half rotating, no biases
    "neox_pp2": ["parallelism=pp2", "model.vocab_size=8192", "model.rotary_pct=0.5", "model.parallel_residual=false",
                 "model.tied_embeddings=true", "model.bias=false"],
    # Llama family: RMSNorm + SwiGLU, GQA (4 heads, 2 kv), GPT-J interleaved rotary, untied, padded vocab
    "llama_tp2": ["parallelism=tp2", "model.vocab_size=8200", "model.norm=rmsnorm", "model.mlp=swiglu",
                  "model.n_kv_heads=2", "model.rotary_interleaved=true", "model.tied_embeddings=false",
                  "model.bias=false"],
    # tied, with biases, GQA, no padding (the round trip compares it bitwise)
    "llama_pp2": ["parallelism=pp2", "model.vocab_size=8192", "model.norm=rmsnorm", "model.mlp=swiglu",
                  "model.n_kv_heads=2", "model.tied_embeddings=true", "model.bias=true"],
}


def runs_root(tmp_path_factory) -> Path:
    """One folder per session, the same for every test directory's fixtures."""
    root = tmp_path_factory.getbasetemp() / "hf-shared"
    root.mkdir(exist_ok=True)
    return root


def trained(name: str, root: Path, extra: Optional[List[str]] = None) -> Path:
    """The run `name` of RUNS (or `extra` overrides), trained once per session by its workers alone
    (support.runs.workers: what is tested here is what they save, not the launcher)."""
    from support.runs import workers

    run_dir = root / name
    if (run_dir / "checkpoints" / "latest").is_file():
        return run_dir
    args = [*_COMMON, *(RUNS[name] if extra is None else extra), f"run_dir={run_dir}"]
    proc = workers(args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def exported(run_dir: Path, root: Path) -> Path:
    """The run's to-hf export, written once per session."""
    from neox.convert.__main__ import main

    out = root / f"{run_dir.name}-hf"
    if not (out / "config.json").is_file():
        assert main(["to-hf", str(run_dir), str(out)]) == 0
    return out


def hf_causal_lm(path: Path):
    """A transformers model from a local directory, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def neox_model(path: Path, kernels: str = "reference"):
    """(GPT with the weights at `path`, NeoxModel) through neox's own reader, fp32, eval mode."""
    from neox.convert.source import gpt_config_of, load
    from neox.model.gpt import GPT

    src = load(path)
    model = GPT(gpt_config_of({**src.section, "kernels": kernels}))
    model.load_state_dict(src.weights)
    return model.eval(), src


def bytes_tokenizer_file(folder: Path) -> Path:
    """The bytes tokenizer (ids 0..255, EOD 256) as a tokenizer.json in `folder`."""
    from neox.data.tokenizer import BytesTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    BytesTokenizer().save(folder / "tokenizer.json")
    return folder / "tokenizer.json"


def write_model_dir(folder: Path, section: dict, seed: int = 0, perturb: bool = True) -> Path:
    """A neox model directory (as from-hf writes it) holding a random GPT of `section`, with the bytes
    tokenizer. Norm weights and biases are perturbed so that a mapping that mixes them up shows."""
    from safetensors.torch import save_file

    from neox.convert.source import CONFIG_KEY, WEIGHTS, gpt_config_of
    from neox.model.gpt import GPT

    section = {"name": folder.name, "n_layers": 2, "d_model": 64, "n_heads": 4, "seq_len": 64, "vocab_size": 257,
               "vocab_multiple": 128, **section}
    torch.manual_seed(seed)
    model = GPT(gpt_config_of(section))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if perturb:
        for k, v in sd.items():
            if v.dim() == 1:
                v.add_(torch.randn_like(v) * 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / WEIGHTS), metadata={CONFIG_KEY: json.dumps({"model": section})})
    bytes_tokenizer_file(folder)
    return folder


def random_prompts(vocab: int, lengths: List[int], seed: int = 0) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt: List[int], new: int) -> List[int]:
    """transformers' own greedy generate for one prompt, never stopping early."""
    import copy

    cfg = copy.deepcopy(hf.generation_config)
    cfg.eos_token_id = None
    cfg.do_sample = False
    out = hf.generate(torch.tensor([prompt]), generation_config=cfg, max_new_tokens=new,
                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def save_hf(model, folder: Path, tokenizer_json: Path) -> Path:
    """A transformers model and a fast tokenizer saved the way the Hub holds them."""
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(str(folder))
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def random_hf(arch: str, vocab: int = 300, seed: int = 0, **over):
    """A random transformers model with non-trivial norms and biases."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64)
    if arch == "GPTNeoXForCausalLM":
        config = transformers.GPTNeoXConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                       "partial_rotary_factor": 0.25}, **over)
    else:
        config = transformers.LlamaConfig(**common, num_key_value_heads=2, **over)
    model = getattr(transformers, arch)(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()
