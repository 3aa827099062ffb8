"""The run plan (neox/config/plan.py): every preset pair plans or fails with its reason, published
shapes, and the derived values (world and dp, the batch triad, the padded vocab, the model config).
Bad input through the command line is tests/launch/test_cli.py."""
from __future__ import annotations

import itertools

import pytest

from neox.config.plan import Resources, batch_triad, make_plan, padded_vocab
from neox.errors import ConfigError
from neox.launch.compose import CONF_DIR, compose_config

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
PARALLEL = sorted(p.stem for p in (CONF_DIR / "parallelism").glob("*.yaml"))
GPU_CLUSTER = Resources(kind="hostfile", device="cuda", slots=32, slots_per_node=8, nodes=4)


def test_presets_exist():
    for name in ("tiny", "19M", "125M", "350M", "760M", "1.3B", "2.7B", "6.7B", "13B", "20B", "175B", "6B", "1.4B"):
        assert name in MODELS
    assert set(PARALLEL) >= {"single", "zero1", "zero2", "zero3", "tp2", "pp2", "pp2_tp2", "pp4_tp8"}


def _expected_failure(model, par) -> str | None:
    """What the validator must say for this pair, worked out independently of it."""
    kv = model.n_kv_heads or model.n_heads
    d_ff = model.d_ff or 4 * model.d_model
    if any(v % par.tp for v in (model.n_heads, kv, model.d_model, d_ff)):
        return "not divisible by parallelism.tp"
    if model.n_layers < par.pp:
        return "fewer than parallelism.pp"
    return None


@pytest.mark.parametrize("model,par", list(itertools.product(MODELS, PARALLEL)))
def test_every_preset_pair_composes_or_fails_with_its_reason(model, par, tmp_path):
    cfg = compose_config([f"model={model}", f"parallelism={par}", f"run_dir={tmp_path}/run"])
    expected = _expected_failure(cfg.model, cfg.parallelism)
    if expected is None:
        plan = make_plan(cfg, GPU_CLUSTER)
        assert plan.world_size == plan.tp * plan.pp * plan.dp
        assert plan.global_batch == plan.micro_batch * plan.grad_accum * plan.dp
    else:
        with pytest.raises(ConfigError, match=expected):
            make_plan(cfg, GPU_CLUSTER)


def test_published_shapes():
    """Spot-check dimensions against the published models."""
    def shape(name):
        m = compose_config([f"model={name}"]).model
        return m.n_layers, m.d_model, m.n_heads
    assert shape("125M") == (12, 768, 12)
    assert shape("1.3B") == (24, 2048, 16)
    assert shape("175B") == (96, 12288, 96)
    assert shape("20B") == (44, 6144, 64)
    gptj = compose_config(["model=6B"]).model
    assert (gptj.n_layers, gptj.d_model, gptj.n_heads, gptj.d_ff) == (28, 4096, 16, 16384)
    assert gptj.parallel_residual and gptj.d_model // gptj.n_heads * gptj.rotary_pct == 64
    pythia = compose_config(["model=1.4B"]).model
    assert (pythia.n_layers, pythia.d_model, pythia.rotary_pct, pythia.parallel_residual) == (24, 2048, 0.25, True)


def test_parameter_count_matches_a_built_model():
    from neox.config.plan import gpt_config
    from neox.model.gpt import GPT, count_params

    for overrides in ([], ["model.tied_embeddings=false", "model.mlp=swiglu", "model.n_kv_heads=2",
                           "model.norm=rmsnorm", "model.position=learned"]):
        cfg = gpt_config(compose_config(overrides).model)
        built = sum(p.numel() for p in GPT(cfg).parameters())
        assert count_params(cfg)["total"] == built


def test_dp_is_world_over_tp_pp(tmp_path):
    cfg = compose_config([f"run_dir={tmp_path}/r", "train.micro_batch=2", "train.grad_accum=3"])
    plan = make_plan(cfg, Resources("local", "cpu", 6, 6))
    assert (plan.world_size, plan.dp, plan.global_batch) == (6, 6, 36)


@pytest.mark.parametrize("micro,accum,global_,dp,expected", [
    (4, 2, None, 2, (4, 2, 16)),
    (4, None, 32, 2, (4, 4, 32)),
    (None, 4, 32, 2, (4, 4, 32)),
    (4, 2, 16, 2, (4, 2, 16)),
    (None, None, 8, 2, (4, 1, 8)),
    (None, None, None, 2, (8, 1, 16)),  # nothing set: DEFAULT_MICRO_BATCH (a GPU launch sizes it instead)
    (None, 3, None, 2, (8, 3, 48)),
    (2, None, None, 3, (2, 1, 6)),
])
def test_batch_triad(micro, accum, global_, dp, expected):
    assert batch_triad(micro, accum, global_, dp) == expected


def test_padded_vocab_does_not_depend_on_tp():
    assert padded_vocab(50257, 128) == 50304
    assert padded_vocab(50304, 128) == 50304
    with pytest.raises(ConfigError, match="positive integer"):
        padded_vocab(50257, 0)


def test_kernel_ops_reach_the_model_config():
    from neox.config.plan import gpt_config

    cfg = compose_config(["model.kernels=fused", "model.kernel_ops.cross_entropy=reference"])
    m = gpt_config(cfg.model)
    assert (m.impl("cross_entropy"), m.impl("layer_norm"), m.impl("bias_gelu")) == ("reference", "fused", "fused")
