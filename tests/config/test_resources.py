"""Host memory as a container sees it (neox.config.resources): the cgroup's limit and usage bound what the
node's MemAvailable promises, and a node's ranks share it (the async checkpoint copy sizes itself by it)."""
from __future__ import annotations

import torch

from neox.checkpoint.snapshot import HostMemory, mem_available
from neox.config import resources


def _cgroup(tmp_path, monkeypatch, limit: str, usage: str) -> None:
    (tmp_path / "max").write_text(limit + "\n")
    (tmp_path / "current").write_text(usage + "\n")
    monkeypatch.setattr(resources, "_CGROUP_FILES", ((str(tmp_path / "max"), str(tmp_path / "current")),))


def test_a_slurm_jobs_memory_limit_caps_what_is_available(tmp_path, monkeypatch):
    node = resources.available_ram_bytes()
    assert node is not None and node > 0  # MemAvailable of this machine
    _cgroup(tmp_path, monkeypatch, str(10 << 30), str((10 << 30) - (1 << 30)))  # --mem=10G, 9 GiB used
    assert resources.available_ram_bytes() == min(node, 1 << 30)
    assert resources.ram_bytes() <= 10 << 30
    _cgroup(tmp_path, monkeypatch, "max", "123")  # no limit: the node's figure
    assert abs(resources.available_ram_bytes() - node) < (512 << 20)  # MemAvailable moves a little between reads


def test_each_local_rank_gets_its_share_of_the_host_memory(tmp_path, monkeypatch):
    _cgroup(tmp_path, monkeypatch, str(64 << 30), str(32 << 30))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    expected = min(resources.available_ram_bytes(), 32 << 30) // 4
    assert abs(mem_available() - expected) < (128 << 20)


def test_an_empty_tensor_takes_no_host_memory():
    memory = HostMemory(pinned=False, available=lambda: 1 << 40)
    assert memory.take(0).numel() == 0 and memory.allocated == 0
    assert memory.take(10).numel() == 10 and memory.allocated > 0
    assert torch.equal(memory.take(0), torch.empty(0, dtype=torch.uint8))
