"""The Slurm path without Slurm (neox/launch/slurm): layout and time checks against the job's
allocation with real plans, sbatch parameters, the YAML, partitions, sweeps. The preemption flag
the trainer watches is tests/train/test_preempt.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from neox.errors import LaunchError
from neox.launch import slurm
from neox.launch.slurm.task import TaskExecutor
from neox.train.preempt import EXIT_REQUEUE
from slurm_helpers import make_cfg, plan_for

REPO = Path(__file__).resolve().parents[2]


def checked(cfg) -> int:
    """What the launcher does with cluster=slurm: the plan (make_plan on the job's resources), then
    slurm.check against the allocation; returns the tasks per node."""
    return slurm.check(plan_for(cfg))


# ---- neox.launch.slurm checks ----------------------------------------------------------------


def test_world_size_must_match_nodes_times_tasks(tmp_path):
    # dry_run: the plan of a layout this allocation cannot hold is a warning, so slurm.check is reached
    cfg = make_cfg(tmp_path, nodes=1, tasks_per_node=2, overrides=["parallelism.dp=4", "dry_run=true"])
    with pytest.raises(LaunchError, match=r"needs 4 processes but .* gives 2: set cluster.nodes=2"):
        checked(cfg)
    cfg = make_cfg(tmp_path, nodes=2, tasks_per_node=2, overrides=["parallelism.dp=2"])
    with pytest.raises(LaunchError, match=r"= 2 ranks does not match .* = 4 ranks"):
        checked(cfg)


def test_layout_needing_more_gpus_than_allocated(tmp_path):
    cfg = make_cfg(tmp_path, nodes=2, gpus_per_node=8, tasks_per_node=None,
                   overrides=["model=6B", "parallelism=pp4_tp8", "parallelism.dp=4", "dry_run=true"])
    with pytest.raises(LaunchError, match=r"needs 128 GPUs .* gives 16: set cluster.nodes=16"):
        checked(cfg)


def test_model_6b_pp4_tp8_on_4_nodes_is_accepted(tmp_path):
    cfg = make_cfg(tmp_path, nodes=4, gpus_per_node=8, tasks_per_node=None, time_min=240, signal_delay_s=120,
                   overrides=["model=6B", "parallelism=pp4_tp8"])
    assert checked(cfg) == 8


def test_tp_across_nodes_is_refused_unless_forced(tmp_path):
    over = ["model=6B", "parallelism.tp=8"]
    with pytest.raises(LaunchError, match="parallelism.tp_across_nodes_is_slow=true"):
        checked(make_cfg(tmp_path, nodes=2, gpus_per_node=4, tasks_per_node=None, overrides=over))
    forced = make_cfg(tmp_path, nodes=2, gpus_per_node=4, tasks_per_node=None,
                      overrides=[*over, "parallelism.tp_across_nodes_is_slow=true"])
    assert checked(forced) == 4


def test_short_time_limit_warns(tmp_path, capsys):
    checked(make_cfg(tmp_path, time_min=3, signal_delay_s=60))
    assert "warning: cluster.time_min=3 leaves 120 s" in capsys.readouterr().err
    checked(make_cfg(tmp_path, time_min=60, signal_delay_s=60))
    assert "warning" not in capsys.readouterr().err


def test_signal_delay_beyond_time_limit_is_an_error(tmp_path):
    with pytest.raises(LaunchError, match="signal_delay_s=120 is not below"):
        checked(make_cfg(tmp_path, time_min=2, signal_delay_s=120))


def test_sbatch_not_found_says_cluster_local(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = make_cfg(tmp_path)
    with pytest.raises(LaunchError, match="cluster=local"):
        slurm.submit(plan_for(cfg), tmp_path / "c.yaml", tmp_path)


def test_sbatch_script_has_the_cluster_fields(tmp_path):
    cfg = make_cfg(
        tmp_path, nodes=4, gpus_per_node=8, tasks_per_node=None, cpus_per_task=12, mem_gb=400,
        partition="gpu", account="proj", qos="high", constraint="h100", exclude="node7",
        setup=["module load cuda"], sbatch_extra={"mail-type": "END", "hold": True, "exclusive": False},
        time_min=600, signal_delay_s=120,
    )
    executor = TaskExecutor(folder=tmp_path)
    executor.update_parameters(**slurm.executor_parameters(plan_for(cfg).config.cluster, 8, "6B"))
    text = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    for flag in (
        "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--mem=400GB",
        "--partition=gpu", "--account=proj", "--qos=high", "--constraint=h100", "--exclude=node7",
        "--time=600", "--signal=USR2@120", "--requeue", "--mail-type=END", "--hold", "--job-name=6B",
    ):
        assert f"#SBATCH {flag}\n" in text, flag
    assert "exclusive" not in text  # false leaves a flag out
    assert "module load cuda" in text and "--kill-on-bad-exit=1" in text
    # Each task runs neox's runner, which exits with the trainer's status (Slurm records it).
    assert f"-u -m neox.launch.slurm {tmp_path}" in text and "submitit.core._submit" not in text
    assert "OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" in text
    cpu = slurm.executor_parameters(plan_for(make_cfg(tmp_path)).config.cluster, 2, "t")
    assert "gpus_per_node" not in cpu and cpu["setup"][0] == "export OMP_NUM_THREADS=1"


def test_master_port_is_shared_and_moves_with_restarts():
    assert slurm.master_port("123", 0) == slurm.master_port("123", 0)
    assert slurm.master_port("123", 0) != slurm.master_port("123", 1)
    assert all(20000 <= slurm.master_port(str(j), r) < 32000 for j in range(50) for r in range(4))


def test_cluster_yaml_composes_onto_the_schema():
    from hydra import compose, initialize_config_dir

    from neox.config.schema import register_configs

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["cluster=slurm", "cluster.partition=gpu", "cluster.nodes=4"])
        assert cfg.cluster.kind == "slurm" and cfg.cluster.nodes == 4 and cfg.cluster.max_requeue >= 1
        with pytest.raises(Exception, match="no_such_field"):
            compose("config", overrides=["cluster=slurm", "cluster.no_such_field=1"])


# ---- what a lab user sets: sbatch_extra, a real plan, the task's exit status ------------------


@pytest.mark.parametrize("override, expected", [
    ("cluster.sbatch_extra={mail-type:END}", {"mail-type": "END"}),
    ("cluster.sbatch_extra={mail-type:END,mail-user:me@x.org}", {"mail-type": "END", "mail-user": "me@x.org"}),
    ("cluster.sbatch_extra.hold=true", {"hold": True}),
    ("+cluster.sbatch_extra.hold=true", {"hold": True}),
])
def test_sbatch_extra_takes_the_documented_forms(override, expected):
    from neox.launch.compose import compose_config

    cfg = compose_config(["cluster=slurm", override])
    assert dict(cfg.cluster.sbatch_extra) == expected
    cluster = plan_for(cfg).config.cluster  # the typed section the submission reads
    assert cluster.sbatch_extra == expected
    assert slurm.executor_parameters(cluster, 8, "x")["additional_parameters"] == {"requeue": True, **expected}


def test_unknown_cluster_keys_are_still_refused():
    from neox.errors import ConfigError
    from neox.launch.compose import compose_config

    with pytest.raises(ConfigError, match="unknown config key 'cluster.sbatch_extr.hold'"):
        compose_config(["cluster=slurm", "cluster.sbatch_extr.hold=true"])


def test_check_takes_the_real_plan():
    """slurm.check reads only what RunPlan has (it once read a `step_time_s` no plan carries)."""
    from neox.launch.compose import compose_config

    cfg = compose_config(["cluster=slurm", "model=6B", "parallelism=pp4_tp8", "cluster.nodes=4"])
    assert checked(cfg) == 8


def test_requeue_status_is_the_trainers():
    from neox.launch.slurm import task

    assert task.EXIT_REQUEUE == EXIT_REQUEUE  # launch does not import train; the two must agree
    assert task.exit_status(0, 0) == 0 and task.exit_status(2, 1) == 2
    # Stopped early and not requeued: the job must end non-zero, through rank 0 only (another rank's
    # non-zero exit would make srun kill rank 0 while it decides about the requeue).
    assert task.exit_status(EXIT_REQUEUE, 0) == EXIT_REQUEUE and task.exit_status(EXIT_REQUEUE, 1) == 0
    assert task.exit_status(None, 0) == 0 and task.exit_status(300, 0) == 1


# ---- the request against the partition ------------------------------------------------------


def test_slurm_time_and_gres_parsing():
    from neox.launch.slurm.limits import gpus, minutes

    assert minutes("00:05:00") == 5 and minutes("1-00:00:00") == 1440 and minutes("2:30:00") == 150
    assert minutes("UNLIMITED") is None and minutes("60") == 60
    assert gpus("gpu:8") == 8 and gpus("gpu:h100:4(S:0-1),nvme:1") == 4 and gpus("(null)") == 0


@pytest.mark.parametrize("cluster, message", [
    (dict(time_min=240), r"cluster.time_min=240 is above the MaxTime of partition debug \(60 min\): "
                         r"set cluster.time_min=60 or less"),
    (dict(nodes=3, tasks_per_node=1), r"cluster.nodes=3 is more than partition debug allows \(MaxNodes=2\): "
                                      r"set cluster.nodes=2"),
    (dict(cpus_per_task=4), r"cluster.cpus_per_task=4 × 2 tasks per node = 8 CPUs per node, but the nodes of "
                            r"partition debug have at most 6: set cluster.cpus_per_task=3"),
    (dict(gpus_per_node=8, tasks_per_node=None), r"cluster.gpus_per_node=8 but partition debug has no GPUs .*"
                                                 r"set cluster.gpus_per_node=0"),
])
def test_request_beyond_the_partition_is_refused_naming_the_field(tmp_path, cluster, message):
    from neox.launch.slurm.limits import Partition, check_partition

    part = Partition("debug", max_time_min=60, max_nodes=2, nodes=4, cpus_per_node=6, gpus_per_node=0)
    cl = make_cfg(tmp_path, **{"time_min": 30, "cpus_per_task": 1, **cluster}).cluster
    with pytest.raises(LaunchError, match=message):
        check_partition(cl, slurm.tasks_per_node(cl), part)
    check_partition(make_cfg(tmp_path, time_min=60, nodes=2, cpus_per_task=3).cluster, 2, part)  # at the limits


def test_reasons_a_job_can_never_get_past_name_the_field():
    from neox.launch.slurm.monitor import JobInfo, hopeless

    def why(reason):
        return hopeless(JobInfo("PENDING", reason, partition="short"))

    assert "cluster.time_min" in why("PartitionTimeLimit") and "cluster.nodes" in why("PartitionNodeLimit")
    assert "cluster.cpus_per_task" in why("PartitionConfig") and "scontrol release" in why("JobHeldUser")
    assert "cluster.time_min" in why("QOSMaxWallDurationPerJobLimit") and "cluster.qos" in why("InvalidQOS")
    assert "cluster.gpus_per_node" in why("AssocGrpGRES")  # no account: nothing runs to free the limit
    for reason in ("Resources", "Priority", "None", "BeginTime", "Dependency"):  # waiting, not stuck
        assert why(reason) is None


# ---- sweeps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", ["cluster=local", "cluster=slurm"])
def test_sweep_into_one_run_dir_is_refused_before_anything_runs(tmp_path, capsys, cluster):
    from neox.launch import cli

    shared = tmp_path / "X"
    assert cli.main(["-m", cluster, "optim.lr=1e-3,3e-3", f"run_dir={shared}"]) == 2
    err = capsys.readouterr().err
    assert f"neox: error: sweep jobs 0 and 1 would both run in run_dir={shared}" in err
    assert "hydra.sweep.dir=" in err and "run_dir=runs/lr_${optim.lr}" in err
    assert not shared.exists()


def test_sweep_run_dir_interpolation_gives_each_job_its_own_dir(tmp_path):
    from neox.launch.cli import _job_name, check_distinct_run_dirs
    from neox.launch.compose import compose_config, sweep_combinations

    combos = sweep_combinations(["optim.lr=1e-3,3e-3", f"run_dir={tmp_path}/lr_${{optim.lr}}"])
    configs = [compose_config(c) for c in combos]
    check_distinct_run_dirs(configs)
    assert [c.run_dir for c in configs] == [f"{tmp_path}/lr_0.001", f"{tmp_path}/lr_0.003"]
    # hydra/launcher=submitit_slurm names its job array after the runs, not after this module ("cli")
    assert _job_name(configs) == ["hydra.job.name=neox-sweep"]  # the runs' names differ
    named = [compose_config(c + ["run_name=exp"]) for c in sweep_combinations(["optim.lr=1e-3,3e-3"])]
    assert _job_name(named) == ["hydra.job.name=exp"]
