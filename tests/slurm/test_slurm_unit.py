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
    with pytest.raises(LaunchError, match=r"does not match .* 2 ranks"):
        slurm.check(cfg, plan(4))


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
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = make_cfg(
        tmp_path, nodes=4, gpus_per_node=8, tasks_per_node=None, cpus_per_task=12, mem_gb=400,
        partition="gpu", account="proj", qos="high", constraint="h100", exclude="node7",
        setup=["module load cuda"], sbatch_extra={"mail-type": "END"}, time_min=600, signal_delay_s=120,
    )
    text = _make_sbatch_string(command="python -u x", folder=tmp_path, **slurm.executor_parameters(cfg, 8, "6B"))
    for flag in (
        "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--mem=400GB",
        "--partition=gpu", "--account=proj", "--qos=high", "--constraint=h100", "--exclude=node7",
        "--time=600", "--signal=USR2@120", "--requeue", "--mail-type=END", "--job-name=6B",
    ):
        assert f"#SBATCH {flag}" in text, flag
    assert "module load cuda" in text and "--kill-on-bad-exit=1" in text
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
