"""What a checkpoint says it is (neox.checkpoint.saved): the model and layout its manifest records, read
back without the raw config; checkpoints of an earlier neox through their saved config; what counts as
a layout change, and the changes refused in one line."""
from __future__ import annotations

import json

import pytest

from fake_engine import TINY_MODEL, FakeEngine, client, manager, tiny_layout
from neox.errors import CheckpointError
from neox.parallel.model_layout import ModelLayout, Parallelism


def test_the_manifest_records_the_model_and_layout_read_back_as_they_were(tmp_path):
    """Before: the layout was guessed from DeepSpeed attributes (mp, num_stages, grid) at save and at
    load; now the run's ModelLayout is written and read back: sizes, ZeRO stage, partition method,
    stage bounds and the resolved model, without the saved raw config."""
    import dataclasses

    from neox.checkpoint.files import read_manifest
    from neox.checkpoint.saved import saved_layout

    cfg = dataclasses.replace(TINY_MODEL, n_layers=5, tied_embeddings=True, kernel_ops=(("rmsnorm", "reference"),))
    layout = ModelLayout(cfg, Parallelism(tp=2, pp=2, dp=3, zero_stage=1, partition="type:block"))
    m, _ = manager(tmp_path, layout=layout)
    root = m.save(FakeEngine(), 1, {"run_state": client(1)["run_state"]})  # no config in the client state
    back = saved_layout(root, read_manifest(root))
    assert back.cfg == layout.cfg and back.parallel == layout.parallel and back.parts == layout.parts == (0, 4, 8)
    assert list(back.params) == list(layout.params)


def test_a_checkpoint_without_a_recorded_model_reshards_through_its_saved_config(tmp_path):
    """A manifest of an earlier neox: DeepSpeed's mp (= tp x pp) and no model; the saved config says it."""
    from neox.checkpoint.files import read_manifest, write_manifest, digest_files, list_files
    from neox.checkpoint.saved import saved_layout

    m, _ = manager(tmp_path)
    root = m.save(FakeEngine(), 1, client(1))
    write_manifest(root, digest_files(root, list_files(root)),
                   {"tag": root.name, "step": 1, "layout": {"dp": 1, "mp": 4, "pp": 2, "zero_stage": 1}})
    config = {"model": {"name": "t", "n_layers": 2, "d_model": 16, "n_heads": 2, "n_kv_heads": None, "d_ff": 64,
                        "seq_len": 8, "vocab_size": 64, "vocab_multiple": 8, "position": "rotary", "rotary_pct": 1.0,
                        "rotary_base": 10000.0, "rotary_interleaved": False, "parallel_residual": False,
                        "norm": "layernorm", "norm_eps": 1e-5, "mlp": "gelu", "tied_embeddings": False, "bias": True,
                        "dropout": 0.0, "attn_dropout": 0.0, "init": "wang_init", "init_std": 0.02,
                        "activation_checkpointing": "none", "kernels": "auto"},
              "parallelism": {"pipe_partition": "uniform"}}
    (root / "neox_state.json").write_text(json.dumps({"config": config}))
    back = saved_layout(root, read_manifest(root))
    assert back.parallel == Parallelism(tp=2, pp=2, dp=1, zero_stage=1, partition="uniform")
    assert back.cfg.n_layers == 2 and back.cfg.d_ff == 64 and back.parts == (0, 3, 5)  # DeepSpeed's uniform split


def test_layout_change_without_a_saved_model_or_config_is_refused_in_one_line(tmp_path):
    from neox.checkpoint.files import digest_files, list_files, write_manifest

    m, _ = manager(tmp_path)
    root = m.save(FakeEngine(), 1, {"run_state": client(1)["run_state"]})
    write_manifest(root, digest_files(root, list_files(root)),  # an earlier neox's manifest: mp=2, no model
                   {"tag": root.name, "step": 1, "layout": {"dp": 1, "mp": 2, "pp": 1, "zero_stage": 0}})
    with pytest.raises(CheckpointError, match=r"step_00000001: resharding needs the saved config in neox_state.json"):
        m.load(FakeEngine())


def test_zero3_layout_change_is_refused_in_one_line(tmp_path):
    m, _ = manager(tmp_path)
    m.save(FakeEngine(), 1, client(1))
    zero3, _ = manager(tmp_path, layout=tiny_layout(zero_stage=3))
    with pytest.raises(CheckpointError, match=r"saved with tp=1 pp=1 dp=1 zero=0, this run has tp=1 pp=1 dp=1 "
                                              r"zero=3: resharding to or from ZeRO-3 is not supported yet"):
        zero3.load(FakeEngine())


def test_what_counts_as_a_layout_change():
    """DeepSpeed's own loader follows none of these: tp, pp, dp, ZeRO stage, and (same pp) other stage
    bounds, e.g. another partition method; a checkpoint that records no layout is loaded as it is."""
    from neox.checkpoint.saved import describe, layout_changed

    now = tiny_layout(pp=2, partition="uniform")
    same = now.record()["layout"]
    assert not layout_changed(same, now) and not layout_changed({}, now)
    for key, value in (("tp", 2), ("pp", 1), ("dp", 2), ("zero_stage", 1), ("parts", [0, 1, 5])):
        assert layout_changed({**same, key: value, **({"parts": [0, 5]} if key == "pp" else {})}, now), key
    assert not layout_changed({"dp": 1, "mp": 2, "pp": 2, "zero_stage": 0}, now)  # an earlier manifest: no bounds
    assert describe({**same, "parts": [0, 1, 5]}, now) == ("saved with tp=1 pp=2 dp=1 zero=0 stages [0, 1, 5], "
                                                           "loading into tp=1 pp=2 dp=1 zero=0 stages [0, 3, 5]")
    assert describe({**same, "dp": 2}, now) == "saved with tp=1 pp=2 dp=2 zero=0, loading into tp=1 pp=2 dp=1 zero=0"
