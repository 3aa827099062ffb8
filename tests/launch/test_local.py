"""The local launcher (neox/launch/local.py) reads the plan's typed cluster section: the deepspeed
command for this machine and for a hostfile, and the master port check. The expected commands are
written from the deepspeed launcher's own flags (`deepspeed --help`), not read back from the code."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
from support.plans import cpu, plan_of

from neox.config.resources import Resources
from neox.errors import LaunchError
from neox.launch import local


def test_cpu_processes_are_started_with_num_gpus(tmp_path):
    _, plan = plan_of(["cluster=local", "cluster.cpu_procs=2", f"run_dir={tmp_path}"], cpu(2))
    cmd = local.deepspeed_command(plan, Path("/r/config.pending.yaml"), 29511)
    assert cmd[1:] == ["--master_port", "29511", "--no_local_rank", "--num_gpus", "2",
                       "--module", "neox.train", "/r/config.pending.yaml"]


def test_a_hostfile_run_names_its_hosts_launcher_and_master(tmp_path):
    two_nodes = Resources("hostfile", "cuda", 8, 4, nodes=2)
    _, plan = plan_of(["cluster=hostfile", "cluster.hostfile='~/hosts'", "cluster.launcher=openmpi",
                       "cluster.master_addr=node0", f"run_dir={tmp_path}"], two_nodes)
    cmd = local.deepspeed_command(plan, Path("/r/c.yaml"), 29512)
    assert cmd[1:] == ["--master_port", "29512", "--no_local_rank", "--hostfile", str(Path("~/hosts").expanduser()),
                       "--launcher", "openmpi", "--master_addr", "node0", "--num_nodes", "2", "--num_gpus", "4",
                       "--module", "neox.train", "/r/c.yaml"]


@pytest.mark.parametrize("visible, chosen, expected", [
    (None, [0, 1], ["0", "1"]),
    ("2,3", [0], ["2"]),  # the first visible GPU is the machine's GPU 2
    ("3, 1", [0, 1], ["3", "1"]),
    ("", [1], ["1"]),
])
def test_gpus_counted_among_the_visible_ones_are_passed_as_the_machines_own(visible, chosen, expected):
    # deepspeed --include sets the workers' CUDA_VISIBLE_DEVICES itself, replacing the user's
    assert local.physical_gpu_ids(chosen, visible) == expected


def test_gpus_named_by_uuid_are_refused_with_the_fix():
    with pytest.raises(LaunchError, match="CUDA_VISIBLE_DEVICES=GPU-1a2b names GPUs by UUID"):
        local.physical_gpu_ids([0], "GPU-1a2b")


def test_a_master_port_in_use_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _, plan = plan_of(["cluster=local", f"cluster.master_port={port}", f"run_dir={tmp_path}"], cpu(2))
        with pytest.raises(LaunchError, match=rf"cluster.master_port={port} is already in use"):
            local.check_master_port(plan.config.cluster)
    local.check_master_port(plan.config.cluster)  # free again
