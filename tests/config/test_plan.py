"""Config composition and validation: presets, derived values, and bad input (no worker starts)."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from neox.config.plan import Resources, batch_triad, make_plan, padded_vocab
from neox.errors import ConfigError, LaunchError
from neox.launch.cli import main
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
])
def test_batch_triad(micro, accum, global_, dp, expected):
    assert batch_triad(micro, accum, global_, dp) == expected


def test_padded_vocab_does_not_depend_on_tp():
    assert padded_vocab(50257, 128) == 50304
    assert padded_vocab(50304, 128) == 50304
    with pytest.raises(ConfigError, match="positive integer"):
        padded_vocab(50257, 0)


# ----------------------------------------------------------------------------------------- bad input
def _fails(capsys, args, match):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0, f"{args} should fail"
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    assert match in err, err
    return err


def test_unknown_key(capsys):
    _fails(capsys, ["model.n_layer=4", "dry_run=true"], "unknown config key 'model.n_layer'")
    _fails(capsys, ["learning_rate=1e-3", "dry_run=true"], "unknown config key 'learning_rate'")


def test_unknown_preset(capsys):
    _fails(capsys, ["model=7B", "dry_run=true"], "model=7B is not a preset")


def test_kernel_choices(capsys):
    _fails(capsys, ["model.kernels=turbo", "dry_run=true"],
           "model.kernels='turbo' is not one of auto, fused, reference")
    _fails(capsys, ["model.kernel_ops.cross_entropy=turbo", "dry_run=true"],
           "model.kernel_ops.cross_entropy='turbo' is not one of auto, fused, reference")
    _fails(capsys, ["model.kernel_ops.softmax=fused", "dry_run=true"], "unknown config key 'model.kernel_ops.softmax'")


def test_kernel_ops_reach_the_model_config():
    from neox.config.plan import gpt_config

    cfg = compose_config(["model.kernels=fused", "model.kernel_ops.cross_entropy=reference"])
    m = gpt_config(cfg.model)
    assert (m.impl("cross_entropy"), m.impl("layer_norm"), m.impl("bias_gelu")) == ("reference", "fused", "fused")


def test_bad_value_type(capsys):
    _fails(capsys, ["model.n_layers=four", "dry_run=true"], "model.n_layers='four' is not a valid integer")


@pytest.mark.parametrize("override,match", [
    ("model.n_heads=6", "model.n_heads=6 is not divisible by parallelism.tp=4"),
    ("model.n_kv_heads=2", "model.n_kv_heads=2 is not divisible by parallelism.tp=4"),
    ("model.d_ff=1030", "the FFN size 1030 is not divisible by parallelism.tp=4"),
])
def test_shapes_not_divisible_by_tp(capsys, override, match):
    # d_model = heads * head_dim, so heads divisible by tp already makes d_model divisible.
    args = ["parallelism.tp=4", "model.n_heads=4", "model.d_model=384", override, "dry_run=true"]
    _fails(capsys, args, match)


def test_layers_fewer_than_stages(capsys):
    _fails(capsys, ["parallelism=pp2", "model.n_layers=1", "dry_run=true"], "fewer than parallelism.pp=2 stages")


def test_inconsistent_batch(capsys):
    _fails(capsys, ["train.micro_batch=4", "train.grad_accum=2", "train.global_batch=10"], "inconsistent batch")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero23_with_pipeline(capsys, stage):
    _fails(capsys, ["parallelism=pp2", f"parallelism.zero_stage={stage}"], "DeepSpeed does not support ZeRO-2/3")


def test_more_workers_than_present(capsys):
    _fails(capsys, ["parallelism.dp=4", "cluster.cpu_procs=2"], "needs 4 processes, but 2 are available")


def test_more_gpus_than_present():
    from omegaconf import OmegaConf

    from neox.launch.resources import local_gpu_selection

    cluster = OmegaConf.create({"gpus": 4, "include": None, "exclude": None})
    with pytest.raises(LaunchError, match="asks for more GPUs than the 2 present"):
        local_gpu_selection(cluster, present=2)
    assert local_gpu_selection(OmegaConf.create({"gpus": None, "include": "0,1,2", "exclude": "1"}), 4) == [0, 2]


def test_missing_data_path(capsys, tmp_path):
    _fails(capsys, ["data=files", f"data.prefixes=[{tmp_path}/nothing]"], "nothing.bin does not exist")


def test_missing_mandatory_value(capsys):
    _fails(capsys, ["data=files"], "data.prefixes")


@pytest.mark.parametrize("content,match", [
    ("node1 gpus=4\n", "is not `host slots=N`"),
    ("localhost slots=four\n", "must be a positive integer"),
    ("localhost slots=0\n", "must be a positive integer"),
    ("localhost slots=2\nlocalhost slots=2\n", "listed twice"),
    ("no-such-host.invalid slots=8\n", "unknown host"),
    ("# nothing here\n", "lists no hosts"),
])
def test_malformed_hostfile(capsys, tmp_path, content, match):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(content)
    _fails(capsys, ["cluster=hostfile", f"cluster.hostfile={hostfile}", "dry_run=true"], match)


def test_missing_hostfile(capsys, tmp_path):
    _fails(capsys, ["cluster=hostfile", f"cluster.hostfile={tmp_path}/absent", "dry_run=true"], "does not exist")


def test_valid_hostfile_sets_world(tmp_path):
    from neox.launch.resources import detect, parse_hostfile

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nlocalhost slots=8\n127.0.0.1 slots=8  # same box\n")
    assert [h.slots for h in parse_hostfile(str(hostfile))] == [8, 8]
    cfg = compose_config(["cluster=hostfile", f"cluster.hostfile={hostfile}"])
    res = detect(cfg.cluster)
    assert (res.slots, res.slots_per_node, res.nodes) == (16, 8, 2)


def test_non_writable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    _fails(capsys, [f"run_dir={blocker}/run", "dry_run=true"], "is not writable")


def test_sweep_without_multirun_flag(capsys):
    _fails(capsys, ["optim.lr=1e-4,3e-4"], "add -m")


def test_bad_value_in_a_sweep_fails_before_any_job(capsys, tmp_path):
    _fails(capsys, ["-m", "model.n_heads=4,3", f"run_dir={tmp_path}/r_${{model.n_heads}}"],
           "not divisible by model.n_heads=3")


def test_dry_run_prints_the_6B_layout_for_32_gpus(capsys):
    code = main(["model=6B", "parallelism=pp4_tp8", "dry_run=true"])
    out = capsys.readouterr()
    assert "32 GPUs = tp 8 x pp 4 x dp 1" in out.out
    assert "6.05B total" in out.out
    assert "expected bubble" in out.out
    assert code == 0, out.err


def test_cli_exit_status_and_one_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "launch.py", "model.nope=1"], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "neox: error: unknown config key 'model.nope': check its spelling "
        "(`python launch.py --cfg job` prints every key with its default)"]
