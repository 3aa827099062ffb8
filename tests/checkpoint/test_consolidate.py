"""Consolidation to one safetensors file from synthetic DeepSpeed layouts: tp=2 model files,
pipeline layer files (tp=1 and tp=2), and a refusal on a damaged checkpoint. No processes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from neox.checkpoint.consolidate import consolidate, main
from neox.checkpoint.files import digest_files, list_files, write_manifest
from neox.config.plan import gpt_config
from neox.errors import CheckpointError
from neox.model.gpt import GPT
from neox.parallel.model_layout import ModelLayout, Parallelism
from neox.parallel.pipeline import gpt_layer_names
from neox.parallel.tensor import shard_dims, shard_state_dict

MODEL = {"name": "t", "n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": None, "d_ff": None,
         "seq_len": 16, "vocab_size": 100, "vocab_multiple": 8, "position": "rotary", "rotary_pct": 1.0,
         "rotary_base": 10000.0, "rotary_interleaved": False, "parallel_residual": False, "norm": "layernorm",
         "norm_eps": 1e-5, "mlp": "gelu", "tied_embeddings": False, "bias": True, "dropout": 0.0,
         "attn_dropout": 0.0, "init": "wang_init", "init_std": 0.02, "activation_checkpointing": "none",
         "kernels": "auto"}


def _model(tied=False):
    torch.manual_seed(0)
    return GPT(gpt_config(OmegaConf.create({**MODEL, "tied_embeddings": tied})))


def _finish(root: Path, tied=False, legacy=False, config=True, **parallel):
    """The files neox writes beside DeepSpeed's: the saved config, the manifest recording the model and
    layout (`legacy`: an earlier neox's manifest, without them)."""
    section = {**MODEL, "tied_embeddings": tied}
    if config:
        (root / "neox_state.json").write_text(json.dumps({"config": {"model": section}}))
    record = {} if legacy else ModelLayout(gpt_config(OmegaConf.create(section)), Parallelism(**parallel)).record()
    write_manifest(root, digest_files(root, list_files(root)), {"tag": root.name, "step": 5, **record})


def _assert_same(got, model):
    want = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("legacy", [False, True], ids=["recorded", "saved-config"])
def test_tp2_model_files_merge_to_the_full_model(tmp_path, legacy):
    """The split dimensions come from the recorded model, or for an earlier checkpoint its saved config;
    the shards are cut by the independent `neox.parallel.tensor.shard_state_dict`."""
    model = _model()
    root = tmp_path / "step_00000005"
    root.mkdir()
    dims = shard_dims(model)
    for r in range(2):
        torch.save({"module": shard_state_dict(model.state_dict(), dims, r, 2)}, root / f"mp_rank_{r:02d}_model_states.pt")
    _finish(root, legacy=legacy, config=legacy, tp=2)
    got, meta = consolidate(root)
    _assert_same(got, model)
    assert meta["neox.tp_shards"] == "2" and meta["neox.step"] == "5"


def test_tp2_shards_without_a_recorded_model_or_config_are_refused_in_one_line(tmp_path):
    model = _model()
    root = tmp_path / "step_00000005"
    root.mkdir()
    for r in range(2):
        torch.save({"module": shard_state_dict(model.state_dict(), shard_dims(model), r, 2)},
                   root / f"mp_rank_{r:02d}_model_states.pt")
    _finish(root, legacy=True, config=False)
    with pytest.raises(CheckpointError, match=r"step_00000005: merging tensor-parallel shards needs the saved config "
                                              r"in neox_state.json$"):
        consolidate(root)


@pytest.mark.parametrize("tp,tied", [(1, False), (2, False), (1, True)])
def test_pipeline_layer_files_merge_to_the_full_model(tmp_path, tp, tied):
    model = _model(tied)
    root = tmp_path / "step_00000005"
    root.mkdir()
    names = gpt_layer_names(model.cfg)
    dims = shard_dims(model)
    full = model.state_dict()
    for r in range(tp):
        sd = shard_state_dict(full, dims, r, tp)
        for i, name in enumerate(names):
            layer = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            torch.save(layer, root / f"layer_{i:02d}-model_{r:02d}-model_states.pt")
    _finish(root, tied, tp=tp, pp=2)
    got, _ = consolidate(root)
    _assert_same(got, model)


def test_cli_writes_safetensors_that_load_strictly(tmp_path, capsys):
    model = _model()
    ckpts = tmp_path / "checkpoints"
    root = ckpts / "step_00000005"
    root.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, root / "mp_rank_00_model_states.pt")
    _finish(root)
    (ckpts / "latest").write_text("step_00000005")
    out = tmp_path / "model.safetensors"
    assert main([str(tmp_path), str(out)]) == 0  # a run dir: follows checkpoints/latest
    assert "from step_00000005" in capsys.readouterr().out
    fresh = GPT(gpt_config(OmegaConf.create(MODEL)))
    fresh.load_state_dict(load_file(str(out)), strict=True)
    _assert_same(fresh.state_dict(), model)


def test_damaged_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    model = _model()
    root = tmp_path / "step_00000005"
    root.mkdir()
    torch.save({"module": model.state_dict()}, root / "mp_rank_00_model_states.pt")
    _finish(root)
    with open(root / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="does not match its manifest: mp_rank_00_model_states.pt is truncated"):
        consolidate(root)
    assert main([str(root), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neox: error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        consolidate(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no DeepSpeed model states file"):
        consolidate(tmp_path / "empty")


def _run_dir(tmp_path, steps=(5,)):
    """A run dir whose checkpoints/ holds a tp=1 checkpoint per step, `latest` naming the last."""
    model = _model()
    ckpts = tmp_path / "run" / "checkpoints"
    for step in steps:
        root = ckpts / f"step_{step:08d}"
        root.mkdir(parents=True)
        torch.save({"module": model.state_dict()}, root / "mp_rank_00_model_states.pt")
        _finish(root)
    (ckpts / "latest").write_text(f"step_{steps[-1]:08d}")
    return tmp_path / "run"


def _leftovers(d: Path):
    return sorted(p.name for p in d.iterdir() if "tmp" in p.name)


def test_output_that_is_a_directory_is_refused_before_any_work(tmp_path, capsys):
    """Before: the whole model was written to `<out>.tmp`, then IsADirectoryError (a traceback), and
    the temporary file (21 MB for the default model) stayed behind."""
    run = _run_dir(tmp_path)
    out = tmp_path / "outdir"
    out.mkdir()
    assert main([str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"neox: error: {out} is a directory; give the file to write, e.g. {out}/model.safetensors\n"
    assert _leftovers(tmp_path) == [] and list(out.iterdir()) == []


def test_existing_output_is_kept_unless_force(tmp_path, capsys):
    run = _run_dir(tmp_path)
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the user's other model")
    assert main([str(run), str(out)]) == 2
    assert capsys.readouterr().err == f"neox: error: {out} exists; pass --force to replace it, or choose another name\n"
    assert out.read_bytes() == b"the user's other model"
    assert main([str(run), str(out), "--force"]) == 0
    _assert_same(load_file(str(out)), _model())
    assert _leftovers(tmp_path) == []


def test_output_under_a_file_is_one_line(tmp_path, capsys):
    run = _run_dir(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert main([str(run), str(tmp_path / "afile" / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neox: error: cannot write ") and "afile is not a writable directory" in err
    assert err.count("\n") == 1


def test_a_failed_write_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"x" * 1000)  # part of the file made it to disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    run = _run_dir(tmp_path)
    out = tmp_path / "model.safetensors"
    assert main([str(run), str(out)]) == 2
    assert capsys.readouterr().err == f"neox: error: writing {out} failed: No space left on device\n"
    assert _leftovers(tmp_path) == [] and not out.exists()


def test_run_dir_without_latest_uses_the_newest_checkpoint_and_says_so(tmp_path, capsys):
    """Before: `latest` missing -> "holds no DeepSpeed model states file" about the run dir itself;
    binary bytes in `latest` -> UnicodeDecodeError."""
    run = _run_dir(tmp_path, steps=(5, 7))
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe")
    out = tmp_path / "m.safetensors"
    assert main([str(run), str(out)]) == 0
    captured = capsys.readouterr()
    assert "latest is not text (2 bytes of binary data): using the newest checkpoint, step_00000007" in captured.err
    assert "from step_00000007" in captured.out
