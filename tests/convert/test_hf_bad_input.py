"""Bad input to `python -m neox.convert`: one line naming the problem, exit 2, and nothing written or
overwritten (no output directory, no hidden partial one beside it, an existing one untouched)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_helpers import bytes_tokenizer_file, random_hf, save_hf, write_model_dir
from neox.convert.__main__ import main as convert_main


def fails(args: list, capsys, message: str) -> str:
    assert convert_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neox: error: ") and "\n" not in err, err
    assert message in err, err
    return err


def nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("section,message", [
    ({"position": "alibi"}, "cannot export to GPTNeoXForCausalLM: it has no ALiBi position bias"),
    ({"position": "learned"}, "cannot export to GPTNeoXForCausalLM: it has no learned position embeddings"),
    ({"n_kv_heads": 2}, "cannot export to GPTNeoXForCausalLM: it has no grouped-query attention"),
    ({"norm": "rmsnorm", "mlp": "swiglu", "parallel_residual": True},
     "cannot export to LlamaForCausalLM: it has no parallel residual"),
    ({"norm": "rmsnorm", "mlp": "swiglu", "rotary_pct": 0.5}, "cannot export to LlamaForCausalLM: it has no partial rotary"),
    ({"norm": "rmsnorm", "mlp": "gelu"}, "cannot export norm=rmsnorm with mlp=gelu"),
    ({"norm": "rmsnorm", "mlp": "swiglu", "position": "alibi"}, "LlamaForCausalLM: it has no ALiBi"),
], ids=["alibi", "learned", "gqa-in-neox", "parallel-llama", "partial-rotary-llama", "rmsnorm-gelu", "alibi-llama"])
def test_export_refuses_a_feature_the_family_lacks(tmp_path, capsys, section, message):
    src = write_model_dir(tmp_path / "m", section)
    fails(["to-hf", str(src), str(tmp_path / "out")], capsys, message)
    nothing_written(tmp_path / "out")


def test_export_without_a_tokenizer_or_with_one_too_large(tmp_path, capsys):
    src = write_model_dir(tmp_path / "m", {})
    (src / "tokenizer.json").unlink()
    fails(["to-hf", str(src), str(tmp_path / "out")], capsys, "no tokenizer found for")
    nothing_written(tmp_path / "out")
    fails(["to-hf", str(src), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "nope.json")], capsys,
          "tokenizer " + str(tmp_path / "nope.json") + " not found")
    nothing_written(tmp_path / "out")
    small = write_model_dir(tmp_path / "small", {"vocab_size": 200, "vocab_multiple": 8})  # 200 rows < 257 tokens
    fails(["to-hf", str(small), str(tmp_path / "out")], capsys,
          "has 257 tokens but the model's embedding has 200 rows")
    nothing_written(tmp_path / "out")


def test_export_of_a_path_that_is_no_model(tmp_path, capsys):
    fails(["to-hf", str(tmp_path / "missing"), str(tmp_path / "out")], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    fails(["to-hf", str(tmp_path / "empty"), str(tmp_path / "out")], capsys, "is not a neox run, checkpoint or model")
    nothing_written(tmp_path / "out")


@pytest.mark.parametrize("command", ["to-hf", "from-hf"])
def test_a_non_empty_output_is_kept_unless_forced(tmp_path, capsys, command):
    if command == "to-hf":
        src = write_model_dir(tmp_path / "m", {})
    else:
        src = save_hf(random_hf("LlamaForCausalLM"), tmp_path / "hf", bytes_tokenizer_file(tmp_path / "tok"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails([command, str(src), str(out)], capsys, f"{out} exists and is not empty; choose another output directory "
                                                 "or pass --force to replace it")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert convert_main([command, str(src), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / ("config.json" if command == "to-hf" else "model.safetensors")).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    (tmp_path / "afile").write_text("x")
    fails([command, str(src), str(tmp_path / "afile"), "--force"], capsys, "exists and is not a directory")


def test_import_refuses_an_unsupported_architecture(tmp_path, capsys):
    src = save_hf(random_hf("LlamaForCausalLM"), tmp_path / "hf", bytes_tokenizer_file(tmp_path / "tok"))
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    fails(["from-hf", str(src), str(tmp_path / "out")], capsys,
          "architectures=['MistralForCausalLM'] is not supported; neox imports GPTNeoXForCausalLM or LlamaForCausalLM")
    nothing_written(tmp_path / "out")


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},
     "rope scaling (rope_type=llama3) is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act=gelu is not supported"),
    ({"head_dim": 32}, "head_dim=32 != hidden_size/num_attention_heads=16 is not supported"),
], ids=["rope-scaling", "activation", "head-dim"])
def test_import_refuses_what_neox_cannot_compute(tmp_path, capsys, change, message):
    src = save_hf(random_hf("LlamaForCausalLM"), tmp_path / "hf", bytes_tokenizer_file(tmp_path / "tok"))
    config = json.loads((src / "config.json").read_text())
    config.update(change)
    (src / "config.json").write_text(json.dumps(config))
    fails(["from-hf", str(src), str(tmp_path / "out")], capsys, message)
    nothing_written(tmp_path / "out")


@pytest.mark.parametrize("arch", ["GPTNeoXForCausalLM", "LlamaForCausalLM"])
def test_import_refuses_missing_or_misshapen_weights(tmp_path, capsys, arch):
    from safetensors.torch import load_file, save_file

    src = save_hf(random_hf(arch), tmp_path / "hf", bytes_tokenizer_file(tmp_path / "tok"))
    weights = load_file(str(src / "model.safetensors"))
    key = next(k for k in weights if k.endswith("layers.1.mlp.dense_4h_to_h.weight") or k.endswith("layers.1.mlp.down_proj.weight"))
    original = weights[key]
    save_file({k: v for k, v in weights.items() if k != key}, str(src / "model.safetensors"))
    fails(["from-hf", str(src), str(tmp_path / "out")], capsys, f"weight {key} is missing")
    nothing_written(tmp_path / "out")
    save_file({**weights, key: original[:, :-1].contiguous()}, str(src / "model.safetensors"))
    fails(["from-hf", str(src), str(tmp_path / "out")], capsys,
          f"weight {key} has shape {tuple(original[:, :-1].shape)}, config.json implies {tuple(original.shape)}")
    nothing_written(tmp_path / "out")
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, str(src / "model.safetensors"))
    fails(["from-hf", str(src), str(tmp_path / "out")], capsys, "unexpected weight model.extra.weight")
    (src / "model.safetensors").unlink()
    fails(["from-hf", str(src), str(tmp_path / "out")], capsys, "holds no weights (model.safetensors or pytorch_model.bin)")
    nothing_written(tmp_path / "out")


def test_import_without_a_tokenizer_or_with_one_too_large(tmp_path, capsys):
    src = save_hf(random_hf("GPTNeoXForCausalLM", vocab=300), tmp_path / "hf", bytes_tokenizer_file(tmp_path / "tok"))
    (src / "tokenizer.json").unlink()
    fails(["from-hf", str(src), str(tmp_path / "out")], capsys, "has no tokenizer.json; pass --tokenizer")
    nothing_written(tmp_path / "out")
    small = save_hf(random_hf("GPTNeoXForCausalLM", vocab=200), tmp_path / "hf-small", bytes_tokenizer_file(tmp_path / "t2"))
    fails(["from-hf", str(small), str(tmp_path / "out")], capsys, "has 257 tokens but the model's embedding has 200 rows")
    nothing_written(tmp_path / "out")


def test_import_of_a_directory_without_config(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    fails(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")], capsys,
          "is not a Hugging Face model directory (no config.json)")
    nothing_written(tmp_path / "out")


@pytest.mark.slow
def test_export_of_a_damaged_checkpoint(tmp_path, capsys, shared_root, embedded_ready):
    """A checkpoint whose files do not match its manifest is refused before anything is converted."""
    import shutil

    from hf_helpers import trained

    run = tmp_path / "run"
    shutil.copytree(trained("llama_tp2", shared_root), run)
    shard = next((run / "checkpoints").glob("step_*/mp_rank_01_model_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-100])
    fails(["to-hf", str(run), str(tmp_path / "out")], capsys, "does not match its manifest")
    nothing_written(tmp_path / "out")
