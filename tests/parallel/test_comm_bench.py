"""bench/comm_bandwidth.py on 2 CPU processes over gloo: it runs, and its bandwidths follow from its times
(bytes / time, and nccl-tests' bus factors: all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "comm_bandwidth.py"


def test_comm_bench_on_gloo(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(BENCH.parent))  # the spawned ranks import the worker by its module's name
    bench = importlib.import_module("comm_bandwidth")
    out = tmp_path / "comm.json"
    assert bench.main(["--cpu", "--gpus", "2", "--sizes-mib", "1", "--iters", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["world"] == 2 and [r["op"] for r in result["rows"]] == ["all_reduce", "all_gather", "reduce_scatter"]
    numel = 2**20 // 2  # 1 MiB of bf16
    for r in result["rows"]:
        assert r["algbw_gbs"] == pytest.approx(numel * 2 / r["seconds"] / 1e9)
        assert r["busbw_gbs"] == pytest.approx(r["algbw_gbs"] * (1.0 if r["op"] == "all_reduce" else 0.5))
    assert "| 1 | all_reduce |" in out.with_suffix(".md").read_text()
