"""Run metrics (neox/train/metrics.py): the JSONL records, W&B that never breaks a run, no secrets.

In-process with a real MetricsLogger; W&B runs for real in offline mode (no network, no account).
"""
from __future__ import annotations

import json
import math

from support.plans import cpu, plan_of

from neox.config.plan import config_dict
from neox.train import metrics as metrics_lib
from neox.train.metrics import MetricsLogger, scrub

SECRET = "wandb-secret-do-not-log-1234"


def _logger(run_dir, *overrides: str, enabled: bool = True, resume_step: int = 0) -> MetricsLogger:
    """The logger a worker makes: the plan's logging section, and its whole config for W&B."""
    _, plan = plan_of(["logging.wandb=false", "logging.tensorboard=false", *overrides, f"run_dir={run_dir}"],
                      cpu(1))
    return MetricsLogger(run_dir, plan.config.logging, enabled=enabled, resume_step=resume_step,
                         config=config_dict(plan.config))


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_log_call_is_one_flushed_jsonl_record(tmp_path):
    m = _logger(tmp_path)
    m.log(1, {"loss": 2.5, "lr": 1e-3})
    assert _lines(tmp_path)[0]["train/loss"] == 2.5  # readable before close: a killed run keeps it
    m.log(1, {"loss": 2.25}, prefix="valid")
    m.log(2, {"loss": float("nan"), "grad_norm": math.inf})
    m.close()
    records = _lines(tmp_path)
    assert [(r["step"], sorted(k for k in r if k not in ("step", "time"))) for r in records] == [
        (1, ["train/loss", "train/lr"]), (1, ["valid/loss"]), (2, ["train/grad_norm", "train/loss"])]
    assert all(isinstance(r["time"], float) for r in records)
    assert math.isnan(records[2]["train/loss"]) and records[2]["train/grad_norm"] == math.inf


def test_other_ranks_write_nothing(tmp_path):
    m = _logger(tmp_path, "logging.tensorboard=true", enabled=False)
    m.log(1, {"loss": 1.0})
    m.close()
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_drops_the_records_after_its_checkpoint(tmp_path):
    m = _logger(tmp_path)
    for step in range(1, 7):
        m.log(step, {"loss": 10.0 - step})
    m.close()
    m = _logger(tmp_path, resume_step=4)
    m.log(5, {"loss": 0.5})
    m.close()
    assert [(r["step"], r["train/loss"]) for r in _lines(tmp_path)] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0),
                                                                       (5, 0.5)]


def test_a_resumed_run_drops_a_last_line_cut_short(tmp_path):
    """A kill or a full disk in the middle of a write leaves a last line cut short: the resumed run drops
    it (before: a JSONDecodeError traceback), and its own lines never join the cut one."""
    m = _logger(tmp_path)
    m.log(1, {"loss": 9.0})
    m.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "train/lo')
    m = _logger(tmp_path, resume_step=1)
    m.log(2, {"loss": 8.0})
    m.close()
    assert [(r["step"], r["train/loss"]) for r in _lines(tmp_path)] == [(1, 9.0), (2, 8.0)]


def test_wandb_mode_follows_the_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert metrics_lib._wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert metrics_lib._wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert metrics_lib._wandb_mode() == "disabled"  # the user's choice wins
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password x\n")
    assert metrics_lib._wandb_mode() == "online"


def test_wandb_offline_without_credentials_writes_its_run_and_no_secret(tmp_path, monkeypatch, capsys):
    """No account, no network: W&B writes an offline run beside metrics.jsonl. A key in the
    environment (here with WANDB_MODE=offline, as in CI) reaches no file the run writes."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    m = _logger(run_dir, "logging.wandb=true", "logging.tensorboard=true")
    assert m.wandb is not None, capsys.readouterr().err
    for step in (1, 2):
        m.log(step, {"loss": 3.0 / step})
    m.close()
    out, err = capsys.readouterr()
    assert "W&B: offline run in" in out and "warning" not in err, err
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run was written"
    assert list((run_dir / "tb").iterdir()), "no TensorBoard events were written"
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in out + err


def test_scrub_redacts_every_credential_like_field():
    tree = {"logging": {"wandb_api_key": "k1", "Token": "k2", "db_password": "k3", "client_secret": "k4",
                        "steps": 3, "keys": ["a"]},
            "runs": [{"hf_token": "k5", "name": "ok"}]}
    assert scrub(tree) == {"logging": {"wandb_api_key": "<redacted>", "Token": "<redacted>",
                                       "db_password": "<redacted>", "client_secret": "<redacted>",
                                       "steps": 3, "keys": ["a"]},
                           "runs": [{"hf_token": "<redacted>", "name": "ok"}]}


def test_wandb_that_fails_to_start_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import wandb  # a dependency of neox: its absence fails here rather than skipping

    def refuse(**kwargs):
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop.\nmore detail")

    monkeypatch.setattr(wandb, "init", refuse)
    m = _logger(tmp_path, "logging.wandb=true")
    m.log(1, {"loss": 1.0})
    m.close()
    err = capsys.readouterr().err
    assert err == "warning: W&B logging off: Network error (ConnectionError), entering retry loop.\n"
    assert _lines(tmp_path)[0]["train/loss"] == 1.0


def test_wandb_that_fails_while_logging_is_turned_off_once(tmp_path, monkeypatch, capsys):
    class BrokenRun:
        calls = 0

        def log(self, *args, **kwargs):
            BrokenRun.calls += 1
            raise ConnectionResetError("Connection lost")

        def finish(self):
            raise AssertionError("a run turned off is not finished")

    monkeypatch.setattr(MetricsLogger, "_start_wandb", lambda self, run_dir, logging, config: BrokenRun())
    monkeypatch.setattr(metrics_lib, "_teardown_wandb_quietly", lambda: None)
    m = _logger(tmp_path, "logging.wandb=true")
    for step in (1, 2, 3):
        m.log(step, {"loss": 1.0})
    m.close()
    assert capsys.readouterr().err == "warning: W&B logging off: Connection lost\n"
    assert BrokenRun.calls == 1 and [r["step"] for r in _lines(tmp_path)] == [1, 2, 3]


def test_wandb_records_the_config_launch_py_composed(tmp_path, monkeypatch):
    """The W&B run's config is the composed config (every section, cluster included) as it was before
    the plan was typed: the typed plan's `config_dict` holds the same data."""
    import wandb
    from omegaconf import OmegaConf

    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs) or None)
    cfg, plan = plan_of(["cluster=slurm", "logging.wandb=true", "logging.tensorboard=false", f"run_dir={tmp_path}",
                         "+cluster.sbatch_extra.mail-type=END"], cpu(1))
    MetricsLogger(tmp_path, plan.config.logging, enabled=True, config=config_dict(plan.config)).close()
    assert seen["config"] == scrub(OmegaConf.to_container(cfg, resolve=True))
    assert seen["config"]["cluster"]["sbatch_extra"] == {"mail-type": "END"}
    assert seen["project"] == "neox" and seen["entity"] is None
