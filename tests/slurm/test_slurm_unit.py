"""The Slurm path without Slurm: preemption flag, layout checks, sbatch parameters, the YAML."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.multiprocessing as mp

from neox.errors import LaunchError
from neox.launch import slurm
from neox.launch.slurm.task import TaskExecutor
from neox.train.preempt import EXIT_REQUEUE, PreemptionWatcher, default_signals
from slurm_helpers import make_cfg

REPO = Path(__file__).resolve().parents[2]


def plan(world, tp=1, pp=1):
    return SimpleNamespace(world_size=world, tp=tp, pp=pp, dp=world // (tp * pp))


# ---- neox.train.preempt ----------------------------------------------------------------------


def test_exit_requeue_is_distinct():
    assert EXIT_REQUEUE not in (0, 1, 2, 130, 137, 143)


def test_signal_sets_flag_only_and_close_restores():
    before = signal.getsignal(signal.SIGUSR2)
    with PreemptionWatcher() as w:
        assert not w.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert w.requested and w.signal_name == "SIGUSR2"
        assert w.should_stop() and w.should_stop()  # latched
    assert signal.getsignal(signal.SIGUSR2) == before


def test_chains_to_a_previous_python_handler_not_to_default():
    seen = []
    old = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with PreemptionWatcher(signals=(signal.SIGUSR2, signal.SIGTERM)) as w:
            os.kill(os.getpid(), signal.SIGTERM)  # SIG_DFL would have killed us; a flag instead
            assert w.requested and seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_is_watched_only_inside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert default_signals() == (signal.SIGUSR2,)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert default_signals() == (signal.SIGUSR2, signal.SIGTERM)


def test_every_k_only_reduces_on_kth_call():
    with PreemptionWatcher(every=3) as w:
        w.request()
        assert [w.should_stop() for _ in range(4)] == [False, False, True, True]


def _agree_worker(rank, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for every in (1, 3):
        w = PreemptionWatcher(every=every)
        stopped_at = None
        for call in range(1, 20):
            if rank == 1 and call == 4:
                os.kill(os.getpid(), signal.SIGUSR2)  # only rank 1 is signalled
            if w.should_stop():
                stopped_at = call
                break
        out[(rank, every)] = stopped_at
        w.close()
    dist.destroy_process_group()


def test_all_ranks_stop_at_the_same_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_agree_worker, args=(port, out), nprocs=2, join=True)
    assert out[(0, 1)] == out[(1, 1)] == 4  # every step: the step after the signal
    assert out[(0, 3)] == out[(1, 3)] == 6  # every 3rd call: the next multiple of 3


# ---- neox.launch.slurm checks ----------------------------------------------------------------


def test_world_size_must_match_nodes_times_tasks(tmp_path):
    cfg = make_cfg(tmp_path, nodes=1, tasks_per_node=2)
    with pytest.raises(LaunchError, match=r"needs 4 processes but .* gives 2: set cluster.nodes=2"):
        slurm.check(cfg, plan(4))
    with pytest.raises(LaunchError, match=r"= 2 ranks does not match .* = 4 ranks"):
        slurm.check(make_cfg(tmp_path, nodes=2, tasks_per_node=2), plan(2))


def test_layout_needing_more_gpus_than_allocated(tmp_path):
    cfg = make_cfg(tmp_path, nodes=2, gpus_per_node=8, tasks_per_node=None)
    with pytest.raises(LaunchError, match=r"needs 128 GPUs .* gives 16: set cluster.nodes=16"):
        slurm.check(cfg, plan(128, tp=8, pp=4))


def test_model_6b_pp4_tp8_on_4_nodes_is_accepted(tmp_path):
    cfg = make_cfg(tmp_path, nodes=4, gpus_per_node=8, tasks_per_node=None, time_min=240, signal_delay_s=120)
    assert slurm.check(cfg, plan(32, tp=8, pp=4)) == 8


def test_tp_across_nodes_is_refused_unless_forced(tmp_path):
    cfg = make_cfg(tmp_path, nodes=2, gpus_per_node=4, tasks_per_node=None)
    with pytest.raises(LaunchError, match="tp_across_nodes_is_slow"):
        slurm.check(cfg, plan(8, tp=8))
    cfg.parallelism.tp_across_nodes_is_slow = True
    assert slurm.check(cfg, plan(8, tp=8)) == 4


def test_short_time_limit_warns(tmp_path, capsys):
    slurm.check(make_cfg(tmp_path, time_min=3, signal_delay_s=60), plan(2))
    assert "warning: cluster.time_min=3 leaves 120 s" in capsys.readouterr().err
    slurm.check(make_cfg(tmp_path, time_min=60, signal_delay_s=60), plan(2))
    assert "warning" not in capsys.readouterr().err


def test_signal_delay_beyond_time_limit_is_an_error(tmp_path):
    with pytest.raises(LaunchError, match="signal_delay_s=120 is not below"):
        slurm.check(make_cfg(tmp_path, time_min=2, signal_delay_s=120), plan(2))


def test_sbatch_not_found_says_cluster_local(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = make_cfg(tmp_path)
    with pytest.raises(LaunchError, match="cluster=local"):
        slurm.submit(cfg, plan(2), tmp_path / "c.yaml", tmp_path)


def test_sbatch_script_has_the_cluster_fields(tmp_path):
    cfg = make_cfg(
        tmp_path, nodes=4, gpus_per_node=8, tasks_per_node=None, cpus_per_task=12, mem_gb=400,
        partition="gpu", account="proj", qos="high", constraint="h100", exclude="node7",
        setup=["module load cuda"], sbatch_extra={"mail-type": "END", "hold": True, "exclusive": False},
        time_min=600, signal_delay_s=120,
    )
    executor = TaskExecutor(folder=tmp_path)
    executor.update_parameters(**slurm.executor_parameters(cfg, 8, "6B"))
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
    cpu = slurm.executor_parameters(make_cfg(tmp_path), 2, "t")
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
    assert slurm.executor_parameters(cfg, 8, "x")["additional_parameters"] == {"requeue": True, **expected}


def test_unknown_cluster_keys_are_still_refused():
    from neox.errors import ConfigError
    from neox.launch.compose import compose_config

    with pytest.raises(ConfigError, match="unknown config key 'cluster.sbatch_extr.hold'"):
        compose_config(["cluster=slurm", "cluster.sbatch_extr.hold=true"])


def test_check_takes_the_real_plan():
    """slurm.check reads only what RunPlan has (it once read a `step_time_s` no plan carries)."""
    from neox.launch.compose import compose_config
    from neox.launch.job import plan_for

    cfg = compose_config(["cluster=slurm", "model=6B", "parallelism=pp4_tp8", "cluster.nodes=4"])
    assert slurm.check(cfg, plan_for(cfg)) == 8


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
