"""launch.py's command line in-process (`neox.launch.cli.main`): bad input is one line naming the
fix and a non-zero exit, before any worker starts; the dry run's layout summary; hostfiles."""
from __future__ import annotations

import subprocess
import sys

import pytest

from neox.errors import LaunchError
from neox.launch.cli import main
from neox.launch.compose import compose_config
from support.runs import REPO, TINY


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


@pytest.mark.parametrize("other,message", [("parallelism.sequence_parallel=true", "without sequence parallelism"),
                                           ("parallelism.zero_stage=3", "does not work with ZeRO-3")])
def test_tp_overlap_with_what_it_cannot_overlap(capsys, other, message):
    _fails(capsys, ["parallelism=tp2", "parallelism.tp_overlap=true", other], message)


@pytest.mark.parametrize("key", ["parallelism.tp_overlap", "train.fused_step"])
def test_a_switch_that_is_not_a_bool(capsys, key):
    _fails(capsys, ["parallelism=tp2", f"{key}=maybe"], f"{key}=maybe")


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


@pytest.mark.usefixtures("embedded_ready")
def test_data_vocab_above_the_model_vocab_is_refused_before_any_worker(capsys, tmp_path):
    """Before: found by the workers after their start-up (it was an end-to-end run in test_train.py)."""
    _fails(capsys, [*TINY, "data.embedded_vocab=70000", f"run_dir={tmp_path}/run"],
           "has 70000 tokens but the model's vocab is 8192")
    assert not (tmp_path / "run").exists()


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
    """The one test through the real entry point script: its exit status and stderr."""
    proc = subprocess.run([sys.executable, "launch.py", "model.nope=1"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "neox: error: unknown config key 'model.nope': check its spelling "
        "(`python launch.py --cfg job` prints every key with its default)"]


def test_init_from_that_does_not_exist_fails_before_any_worker(capsys, tmp_path):
    _fails(capsys, [*TINY, "train.init_from=/no/such/model", f"run_dir={tmp_path / 'r'}", "dry_run=true"],
           "train.init_from=/no/such/model does not exist; give a run dir, a checkpoint")
