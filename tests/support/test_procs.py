"""The /dev/shm check of support.procs: with the runs' master ports given, only their DeepSpeed
buffers count, so a test running beside it (pytest-xdist's other worker) is neither blamed for its
live buffers nor robbed of them."""
from __future__ import annotations

import pytest

from support import procs

LAUNCHER_OUT = ("launching 2 workers: /venv/bin/deepspeed --master_port 52561 --no_local_rank --num_gpus 2 ...\n"
                "[INFO] [runner.py:618:main] cmd = /venv/bin/python -u -m deepspeed.launcher.launch "
                "--master_addr=127.0.0.1 --master_port=52561 --module neox.train\n")


def test_master_ports_are_read_from_the_launchers_output():
    assert procs.master_ports(LAUNCHER_OUT) == {52561}
    assert procs.master_ports("neox: error: bad config\n") == set()


def test_only_the_buffers_of_the_runs_ports_are_a_leak(tmp_path, monkeypatch):
    monkeypatch.setattr(procs, "SHM_GLOB", str(tmp_path / "deepspeed*"))

    def buffer(port: int, rank: int):
        path = tmp_path / f"deepspeed_allreduce_buffer_0_127.0.0.1_{port}_{rank}"
        path.write_bytes(b"")
        return path

    with pytest.raises(AssertionError, match="the run left DeepSpeed buffers in /dev/shm: .*_52561_1"):
        with procs.no_shm_leak("the run", ports=lambda: procs.master_ports(LAUNCHER_OUT)):
            ours, theirs = buffer(52561, 1), buffer(40000, 0)
    assert not ours.exists() and theirs.exists()  # ours removed, the other test's left alone
    with procs.no_shm_leak("the run", ports=lambda: {52561}):
        buffer(40001, 0)  # another run's: not this one's leak
    with pytest.raises(AssertionError, match="left DeepSpeed buffers"):
        with procs.no_shm_leak("the run"):  # without ports, every new buffer counts
            buffer(40002, 0)
