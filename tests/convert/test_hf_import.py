"""from-hf, the round trip, and train.init_from.

Random models built and saved by transformers itself are imported; neox's logits must equal transformers'.
The round trip neox -> HF -> neox must give back every weight bitwise. An imported model must train under
tp=2 (loss falls over 20 steps) and start exactly from the imported weights under pp=2.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_helpers import neox_model, random_hf, random_prompts, save_hf, trained, write_model_dir
from neox.convert.__main__ import main as convert_main

TOL = 1e-5


@pytest.mark.parametrize("arch,over", [
    ("GPTNeoXForCausalLM", {"use_parallel_residual": True}),
    ("GPTNeoXForCausalLM", {"use_parallel_residual": False, "tie_word_embeddings": True, "attention_bias": False}),
    ("LlamaForCausalLM", {}),  # GQA: 4 heads, 2 kv heads
    ("LlamaForCausalLM", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
], ids=["neox-parallel", "neox-sequential-tied", "llama-gqa", "llama-tied-biases"])
def test_import_matches_transformers_logits(tmp_path: Path, arch: str, over: dict):
    from hf_helpers import bytes_tokenizer_file

    hf = random_hf(arch, **over)
    src = save_hf(hf, tmp_path / "hf", bytes_tokenizer_file(tmp_path / "tok"))
    assert convert_main(["from-hf", str(src), str(tmp_path / "neox")]) == 0
    assert (tmp_path / "neox" / "model" / "neox.yaml").is_file() and (tmp_path / "neox" / "tokenizer.json").is_file()
    model, loaded = neox_model(tmp_path / "neox")
    assert loaded.cfg.vocab_size == 300 and loaded.cfg.n_kv_heads == (4 if arch.startswith("GPTNeoX") else 2)
    tokens = torch.tensor(random_prompts(300, [40, 40], seed=4))
    with torch.no_grad():
        ours, theirs = model(tokens)[..., :300], hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    assert ours.abs().max() > 1e-2 and diff < TOL, f"max |logit diff| {diff:.2e}"


def test_imported_yaml_composes_to_the_same_model(tmp_path: Path):
    """The written conf/model YAML is what Hydra composes for `model=<name>` from the searchpath."""
    from hf_helpers import bytes_tokenizer_file
    from neox.convert.source import load
    from neox.launch.compose import compose_config
    from neox.config.plan import gpt_config

    src = save_hf(random_hf("LlamaForCausalLM"), tmp_path / "hf", bytes_tokenizer_file(tmp_path / "tok"))
    out = tmp_path / "my-llama"
    assert convert_main(["from-hf", str(src), str(out)]) == 0
    cfg = compose_config([f"hydra.searchpath=[file://{out}]", "model=my-llama"])
    assert gpt_config(cfg.model) == load(out).cfg


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("section", [
    {"rotary_pct": 0.25, "parallel_residual": True},
    {"rotary_pct": 0.5, "tied_embeddings": True, "bias": False},
    {"norm": "rmsnorm", "mlp": "swiglu", "n_kv_heads": 2, "bias": True},
    {"norm": "rmsnorm", "mlp": "swiglu", "n_kv_heads": 1, "tied_embeddings": True, "bias": False},
], ids=["neox-parallel", "neox-tied-nobias", "llama-gqa-bias", "llama-mqa-tied"])
def test_round_trip_is_bitwise(tmp_path: Path, section: dict):
    from neox.convert.source import load

    # 257 rows, the bytes tokenizer's vocab: no padding to drop on the way
    src = write_model_dir(tmp_path / "a", {**section, "vocab_size": 257, "vocab_multiple": 1})
    assert convert_main(["to-hf", str(src), str(tmp_path / "hf")]) == 0
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "b")]) == 0
    a, b = load(src), load(tmp_path / "b")
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert b.cfg.vocab_size == 257  # the HF rows, unpadded
    assert all(getattr(a.cfg, f) == getattr(b.cfg, f) for f in ("n_layers", "d_model", "n_heads", "n_kv_heads",
               "d_ff", "rotary_dims", "rotary_base", "parallel_residual", "norm", "mlp", "tied_embeddings", "bias"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_pp2", "neox_pp2"])
def test_round_trip_of_a_real_checkpoint_is_bitwise(tmp_path: Path, shared_root, embedded_ready, name: str):
    """A checkpoint saved under pp=2 (vocab 8192, no padding) -> HF -> neox: every weight as saved."""
    from neox.convert.init import SHAPE_FIELDS
    from neox.convert.source import load
    from hf_helpers import exported

    run = trained(name, shared_root)
    hf_dir = exported(run, shared_root)
    assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "back")]) == 0
    a, b = load(run), load(tmp_path / "back")
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert all(getattr(a.cfg, f) == getattr(b.cfg, f) for f in SHAPE_FIELDS)


# ------------------------------------------------------------------------------------ init_from
@pytest.fixture(scope="session")
def imported_llama(tmp_path_factory, embedded_ready) -> Path:
    """A random GQA Llama over the embedded corpus's tokenizer, imported. Its head is scaled up so that its
    first loss is far from a freshly initialized neox model's (~ln 8192 = 9.0)."""
    from neox.data.embedded import corpus_dir

    root = tmp_path_factory.mktemp("init-from")
    hf = random_hf("LlamaForCausalLM", vocab=8192, seed=5)
    with torch.no_grad():
        hf.lm_head.weight.mul_(25.0)
    src = save_hf(hf, root / "hf", corpus_dir(8192) / "tokenizer.json")
    assert convert_main(["from-hf", str(src), str(root / "llama-import")]) == 0
    return root / "llama-import"


def _init_run(root: Path, model_dir: Path, name: str, *overrides: str) -> Path:
    from hf_helpers import _COMMON
    from support.runs import workers

    run = root / name
    args = [*_COMMON, f"hydra.searchpath=[file://{model_dir}]", f"model={model_dir.name}",
            f"train.init_from={model_dir}", f"run_dir={run}", *overrides]
    proc = workers(args, timeout=600)  # init_from is the workers' (the launcher's check: tests/launch)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "initialized the weights from" in proc.stdout + proc.stderr
    return run


@pytest.mark.slow
def test_imported_model_trains_under_tp2_and_starts_from_its_weights_under_pp2(imported_llama, tmp_path):
    from launch_helpers import train_losses
    from neox.convert.source import load

    tp2 = _init_run(tmp_path, imported_llama, "tp2", "parallelism=tp2", "train.steps=20", "optim.lr=0.003",
                    "optim.warmup_steps=2")
    losses = dict(train_losses(tp2))
    assert losses[1] > 12.0, "the first loss is a fresh model's, not the imported one's"
    assert losses[20] < losses[1] - 1.0, losses

    # lr ~ 0: one step leaves every weight as imported, and the checkpoint shows what the ranks started from
    pp2 = _init_run(tmp_path, imported_llama, "pp2", "parallelism=pp2", "train.steps=1", "optim.lr=1e-30",
                    "optim.min_lr=0")
    saved, imported = load(pp2).weights, load(imported_llama).weights
    assert saved.keys() == imported.keys() and all(torch.equal(saved[k], imported[k]) for k in saved)
    assert abs(dict(train_losses(pp2))[1] - losses[1]) < 1e-4  # same weights, same first batch under tp=2


def test_init_from_refuses_another_model_shape(tmp_path: Path):
    from neox.convert.init import load_initial_weights
    from neox.convert.source import gpt_config_of
    from neox.errors import ConfigError
    from neox.model.gpt import GPT

    src = write_model_dir(tmp_path / "src", {"n_kv_heads": 2, "norm": "rmsnorm", "mlp": "swiglu"})
    cfg = gpt_config_of({"n_layers": 2, "d_model": 64, "n_heads": 4, "seq_len": 64, "vocab_size": 257,
                         "norm": "rmsnorm", "mlp": "swiglu"})
    with pytest.raises(ConfigError, match=r"model.n_kv_heads is 4, the weights' is 2"):
        load_initial_weights(GPT(cfg), cfg, str(src), say=lambda m: None)


def test_init_from_is_skipped_when_the_run_has_a_checkpoint(tmp_path: Path):
    from neox.convert.init import load_initial_weights
    from neox.convert.source import load
    from neox.model.gpt import GPT

    src = write_model_dir(tmp_path / "src", {})
    cfg = load(src).cfg
    model = GPT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("step_00000010")
    assert not load_initial_weights(model, cfg, str(src), checkpoints=tmp_path / "ckpt", say=lambda m: None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert load_initial_weights(model, cfg, str(src), say=lambda m: None)
    assert all(torch.equal(load(src).weights[k], v) for k, v in model.state_dict().items())


def test_import_reads_sharded_safetensors(tmp_path: Path):
    """A model saved in several safetensors files with an index (as large Hub models are) imports the same."""
    import shutil

    from hf_helpers import bytes_tokenizer_file
    from neox.convert.source import load

    hf = random_hf("LlamaForCausalLM")
    tok = bytes_tokenizer_file(tmp_path / "tok")
    save_hf(hf, tmp_path / "one", tok)
    hf.save_pretrained(str(tmp_path / "many"), max_shard_size="100KB")
    shutil.copy(tmp_path / "one" / "tokenizer.json", tmp_path / "many")
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) > 1
    a, b = load(tmp_path / "one"), load(tmp_path / "many")
    assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
