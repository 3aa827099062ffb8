"""check_resume_config: shape changes are errors naming the field; the rest are warnings or ignored."""
from __future__ import annotations

import copy

import pytest

from neox.checkpoint import check_resume_config
from neox.errors import CheckpointError

SAVED = {
    "model": {"name": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 2, "n_kv_heads": None, "d_ff": None,
              "seq_len": 64, "vocab_size": 8192, "vocab_multiple": 128, "position": "rotary", "mlp": "gelu",
              "norm": "layernorm", "tied_embeddings": False, "dropout": 0.0, "kernels": "auto"},
    "parallelism": {"name": "single", "tp": 1, "pp": 1, "dp": None, "zero_stage": 0},
    "optim": {"lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 100, "decay_steps": None},
    "train": {"steps": 100, "micro_batch": 4, "grad_accum": None, "global_batch": None, "precision": "fp32",
              "seed": 1234, "save_every": 10, "log_every": 1},
    "data": {"name": "embedded", "kind": "embedded", "prefixes": [], "tokenizer": None, "embedded_vocab": 8192},
    "logging": {"wandb": False}, "run_dir": "/tmp/a", "cluster": {"kind": "local"},
}


def changed(**fields):
    cfg = copy.deepcopy(SAVED)
    for dotted, value in fields.items():
        node = cfg
        *path, leaf = dotted.split("__")
        for p in path:
            node = node[p]
        node[leaf] = value
    return cfg


def test_identical_config_is_silent():
    assert check_resume_config(SAVED, copy.deepcopy(SAVED)) == []


@pytest.mark.parametrize("field,value", [
    ("model__n_layers", 3), ("model__d_model", 128), ("model__n_heads", 4), ("model__n_kv_heads", 1),
    ("model__d_ff", 512), ("model__vocab_size", 50257), ("model__vocab_multiple", 64), ("model__position", "alibi"),
    ("model__mlp", "swiglu"), ("model__norm", "rmsnorm"), ("model__tied_embeddings", True),
    ("train__precision", "bf16"), ("data__embedded_vocab", 4096),
    # Not shapes, but what the weights mean: the rotation frequencies and the norm's epsilon they were trained with.
    ("model__rotary_base", 500000.0), ("model__norm_eps", 1e-6), ("model__rotary_pct", 0.25),
    ("model__rotary_interleaved", True), ("model__parallel_residual", True), ("model__bias", False),
])
def test_shape_change_is_an_error_naming_the_field(field, value):
    name = field.replace("__", ".")
    with pytest.raises(CheckpointError, match=rf"{name} .* -> {value!r}"):
        check_resume_config(SAVED, changed(**{field: value}))


def test_several_shape_changes_are_named_in_one_line():
    with pytest.raises(CheckpointError) as err:
        check_resume_config(SAVED, changed(model__n_layers=3, model__d_model=128, optim__lr=1.0))
    msg = str(err.value)
    assert "model.n_layers 2 -> 3" in msg and "model.d_model 64 -> 128" in msg and "\n" not in msg
    assert "optim.lr" not in msg


def test_seq_len_matters_only_for_learned_positions():
    assert any("model.seq_len" in w for w in check_resume_config(SAVED, changed(model__seq_len=128)))
    learned = changed(model__position="learned")
    with pytest.raises(CheckpointError, match="model.seq_len 64 -> 128"):
        check_resume_config(learned, changed(model__position="learned", model__seq_len=128))


@pytest.mark.parametrize("field,value,why", [
    ("optim__lr", 3e-4, "the optimizer continues with the new value"),
    ("optim__warmup_steps", 10, "the optimizer continues"),
    ("train__steps", 200, "the schedule length changes"),
    ("optim__decay_steps", 500, "the schedule length changes"),
    ("train__micro_batch", 8, "the batch changes"),
    ("train__grad_accum", 2, "the batch changes"),
    ("parallelism__tp", 2, "resharded"),
    ("parallelism__zero_stage", 1, "resharded"),
    ("data__prefixes", ["/x"], "different sample order"),
    ("model__dropout", 0.1, "resuming with the new value"),
    ("model__init", "normal", "the init only applies to a fresh run"),
])
def test_allowed_change_is_one_warning(field, value, why):
    warnings = check_resume_config(SAVED, changed(**{field: value}))
    assert len(warnings) == 1 and field.replace("__", ".") in warnings[0] and why in warnings[0]


@pytest.mark.parametrize("field,value", [
    ("logging__wandb", True), ("run_dir", "/tmp/b"), ("train__save_every", 5), ("train__log_every", 10),
    ("model__kernels", "reference"), ("cluster__kind", "slurm"), ("model__name", "other"),
    ("parallelism__tp_across_nodes_is_slow", True), ("model__activation_checkpointing", "full"),
])
def test_bookkeeping_changes_are_ignored(field, value):
    assert check_resume_config(SAVED, changed(**{field: value})) == []


def test_new_field_in_a_newer_schema_is_a_warning_not_an_error():
    cfg = changed()
    cfg["train"]["new_knob"] = 1
    assert any("train.new_knob" in w for w in check_resume_config(SAVED, cfg))


def test_every_schema_field_is_checked_by_its_declared_class():
    """Change each field of a real composed config in turn: the check does what the field's metadata says."""
    from omegaconf import OmegaConf

    from neox.config.domains import leaf_fields
    from neox.config.schema import RunConfig
    from neox.launch.compose import compose_config

    base = OmegaConf.to_container(compose_config([]), resolve=True)
    for key, f in leaf_fields(RunConfig):
        cfg = copy.deepcopy(base)
        *path, leaf = key.split(".")
        node = cfg
        for p in path:
            node = node[p]
        node[leaf] = "a different value"
        cls = f.metadata["resume"]
        if cls == "error":
            with pytest.raises(CheckpointError, match=f"{key} "):
                check_resume_config(base, cfg)
        else:
            warnings = check_resume_config(base, cfg)
            assert len(warnings) == (1 if cls == "warn" else 0), (key, warnings)


def test_bf16_and_fp8_resume_each_other_with_a_warning_but_fp32_does_not():
    # fp8 trains the same bf16 weights with the same DeepSpeed bf16 optimizer state (neox.train.engine)
    saved = {"train": {"precision": "bf16"}}
    warnings = check_resume_config(saved, {"train": {"precision": "fp8"}})
    assert len(warnings) == 1 and "train.precision changed from 'bf16' to 'fp8'" in warnings[0]
    assert check_resume_config({"train": {"precision": "fp8"}}, {"train": {"precision": "bf16"}})
    with pytest.raises(CheckpointError, match=r"train.precision 'fp8' -> 'fp32'"):
        check_resume_config({"train": {"precision": "fp8"}}, {"train": {"precision": "fp32"}})
