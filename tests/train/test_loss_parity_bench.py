"""bench/loss_parity.py compares the steps asked for, though a stopped run logs a few more before it exits."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class _OvershootingRun:
    """A launch.py that logged two steps past the last one asked for by the time the bench stopped it,
    the losses differing by layout from step 4 on (the gap the table must not include)."""

    def __init__(self, cmd, **kwargs):
        run_dir = Path(next(a for a in cmd if a.startswith("run_dir=")).split("=", 1)[1])
        shift = 0.0 if "cluster.gpus=1" in cmd else 1.0
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "train/loss": 10.0 - s + (shift if s > 3 else 0.0), "train/tokens_per_s": 1000.0 * s})
            + "\n" for s in range(1, 6)))
        self.args, self.returncode = cmd, 0

    def poll(self):
        return 0


def test_the_table_compares_the_asked_steps_only(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import loss_parity as lp

    monkeypatch.setattr(lp.runs.subprocess, "Popen", _OvershootingRun)
    monkeypatch.setattr(lp, "wait_idle", lambda: 0.0)
    monkeypatch.setattr(sys, "argv", ["loss_parity.py", "--out", str(tmp_path), "--steps", "3"])
    assert lp.main() == 0  # every layout reached the 3 steps asked for
    result = json.loads((tmp_path / "parity.json").read_text())
    assert result["losses"]["1gpu"] == [9.0, 8.0, 7.0]
    for layout in ("tp2", "pp2"):
        assert result["gaps"][layout]["steps"] == 3 and result["gaps"][layout]["max_gap"] == 0.0, result
        assert result["gaps"][layout]["final"] == 7.0
    table = (tmp_path / "parity.md").read_text()
    assert "1gpu 2,500, tp2 2,500, pp2 2,500" in table  # the median of steps 2-3, not step 1's warm-up
    assert "started with" not in table


def test_a_run_started_beside_another_runs_leftovers_is_flagged(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import loss_parity as lp

    monkeypatch.setattr(lp.runs.subprocess, "Popen", _OvershootingRun)
    monkeypatch.setattr(lp, "wait_idle", lambda: 12.5)  # the GPUs never emptied within the wait
    monkeypatch.setattr(sys, "argv", ["loss_parity.py", "--out", str(tmp_path), "--steps", "3"])
    assert lp.main() == 0
    table = (tmp_path / "parity.md").read_text()
    assert "pp2 started with 12.5 GiB of another run still on a GPU: its tokens/s is low" in table


def test_an_out_dir_holding_earlier_runs_or_an_unknown_layout_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import loss_parity as lp

    monkeypatch.setattr(lp.runs.subprocess, "Popen", _OvershootingRun)
    monkeypatch.setattr(lp, "wait_idle", lambda: 0.0)
    (tmp_path / "tp2").mkdir()
    (tmp_path / "tp2" / "metrics.jsonl").write_text("earlier\n")
    monkeypatch.setattr(sys, "argv", ["loss_parity.py", "--out", str(tmp_path), "--steps", "3"])
    assert lp.main() == 2
    assert "already holds tp2; give a new --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp2"]  # nothing started, nothing written
    assert (tmp_path / "tp2" / "metrics.jsonl").read_text() == "earlier\n"
    monkeypatch.setattr(sys, "argv", ["loss_parity.py", "--out", str(tmp_path / "new"), "--layouts", "tp4"])
    assert lp.main() == 2
    assert "unknown layout tp4; choose from 1gpu, tp2, pp2" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_every_layout_composes_into_a_valid_config(monkeypatch):
    """The layouts' overrides are real keys and values (a typo would only show on the GPU machine)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import loss_parity as lp
    from omegaconf import OmegaConf

    from neox.launch.compose import compose_config

    for layouts in (lp.LAYOUTS, lp.CPU_LAYOUTS):
        assert "reference" in layouts
        for name, overrides in layouts.items():
            cfg = compose_config(["model=1.4B", "train.micro_batch=4", "train.grad_accum=8", *overrides])
            for key, value in (o.split("=", 1) for o in overrides if not o.startswith("parallelism=")):
                assert str(OmegaConf.select(cfg, key)).lower() == value, (name, key)
    ref = compose_config(["model=1.4B", *lp.LAYOUTS["reference"]])
    assert ref.train.fused_step is False and ref.model.kernels == "reference"
