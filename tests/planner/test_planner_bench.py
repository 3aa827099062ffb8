"""bench/planner_calibrate.py without a GPU: every case it would run composes, validates its layout shape
and gets the planner's prediction; the table and the summary render from rows as the GPU run writes them."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "planner_calibrate.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("planner_calibrate", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["planner_calibrate"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_cases_span_what_the_issue_asks(bench):
    cases = bench.ONE_GPU + bench.TWO_GPUS
    assert len(bench.ONE_GPU) >= 8
    layouts = [bench.inputs(c.overrides, "NVIDIA H200", 143_771 * 2**20)[1] for c in cases]
    assert {lay.tp for lay in layouts} == {1, 2} and {lay.pp for lay in layouts} == {1, 2}
    assert {lay.zero_stage for lay in layouts} == {0, 1, 2, 3}
    assert {lay.checkpointing for lay in layouts} == {False, True}
    assert min(lay.micro_batch for lay in layouts) == 1 and max(lay.micro_batch for lay in layouts) == 16
    models = {o.split("=")[1] for c in cases for o in c.overrides if o.startswith("model=")}
    assert {"125M", "6.7B"} <= models
    assert all(c.gpus == 1 for c in bench.ONE_GPU) and all(c.gpus == 2 for c in bench.TWO_GPUS)


def test_predictions_and_the_table(bench):
    rows = []
    for case in bench.ONE_GPU[:2]:
        pred = bench.predict(case.overrides, "NVIDIA H200", 143_771 * 2**20)
        assert pred["allocated_gib"] < pred["reserved_gib"] < pred["total_gib"] and pred["tokens_per_s"] > 0
        measured = {"allocated_gib": pred["allocated_gib"] * 1.02, "reserved_gib": pred["reserved_gib"],
                    "tokens_per_s": pred["tokens_per_s"] * 0.9, "smi_used_gib": math.nan}
        rows.append({"name": case.name, "group": case.group, "predicted": pred, "measured": measured})
    rows.append({"name": "lost", "group": "calibration", "predicted": pred, "measured": {"error": "no step"}})
    text = bench.table(rows)
    assert text.count("\n") == 4 and "(0.980)" in text and "(1.111)" in text and "no step" in text
    assert "allocated: max error 2.0%" in bench.summary(rows)


def test_every_two_gpu_case_composes_and_layouts_have_references(bench):
    two = bench.TWO_GPUS + bench.LAYOUTS + [c for c in bench.auto_cases() if "parallelism=auto" not in c.overrides]
    for case in two + bench.ONE_GPU_REFS:
        lay = bench.inputs(case.overrides, "NVIDIA H200", 143_771 * 2**20)[1]
        assert lay.world == case.gpus, case.name
    names = {c.name for c in two + bench.ONE_GPU_REFS}
    for name, ref in bench.LAYOUT_REFS.items():  # each row of issue 17's table is a case, and so is its reference
        assert name in names and (ref is None or ref in names), name


def test_layouts_table_per_gpu_efficiency_and_bubble(bench):
    def row(name, overrides, tokens):
        pred = bench.predict(overrides, "NVIDIA H200", 143_771 * 2**20)
        return {"name": name, "group": "layouts", "predicted": pred,
                "measured": {"tokens_per_s": tokens, "allocated_gib": 10.0, "mfu": 0.5}}
    cases = {c.name: c for c in bench.ONE_GPU_REFS + bench.LAYOUTS}
    rows = [row("1.3B 1gpu z1 m4x8", cases["1.3B 1gpu z1 m4x8"].overrides, 50_000),
            row("1.3B pp2 z1 m4x8", cases["1.3B pp2 z1 m4x8"].overrides, 88_000)]  # 44,000 per GPU: 88%
    text = bench.layouts_table(rows)
    line = next(ln for ln in text.splitlines() if ln.startswith("| 1.3B pp2 z1 m4x8 "))
    assert "| 44,000 | 88.0% | 12.0% | 11.1% |" in line  # bubble 1 - 88%; 1F1B (p-1)/(m+p-1) = 1/9
    assert "| 1.3B tp2 m4x8 | not measured" in text


def test_a_case_measured_again_replaces_the_older_run_and_skip_leaves_runs_out_of_the_summary(bench, tmp_path):
    import json

    def row(name: str, alloc: float, measured: bool = True) -> dict:
        pred = {"allocated_gib": 10.0, "reserved_gib": 11.0, "tokens_per_s": 100.0}
        meas = ({"allocated_gib": alloc, "reserved_gib": 11.0, "tokens_per_s": 100.0, "smi_used_gib": math.nan}
                if measured else {"error": "no step logged"})
        return {"name": name, "group": "calibration", "predicted": pred, "measured": meas}

    old, new = tmp_path / "a.json", tmp_path / "b.json"
    old.write_text(json.dumps([row("x", 20.0), row("y", 10.0), row("z", 10.0)]))
    new.write_text(json.dumps([row("x", 10.0), row("z", 50.0, measured=False)]))  # z's rerun failed: keep the old
    rows = bench.latest([str(old), str(new)])
    assert [(r["name"], r["measured"]["allocated_gib"]) for r in rows] == [("x", 10.0), ("y", 10.0), ("z", 10.0)]
    rows.append(row("stale", 40.0))
    assert "allocated: max error 75.0%" in bench.summary(rows)
    kept = bench.summary(rows, frozenset({"stale"}))
    assert "allocated: max error 0.0%" in kept and "over 3 runs, leaving out stale" in kept
