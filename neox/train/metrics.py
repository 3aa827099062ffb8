"""Run metrics to the console, a JSONL file, TensorBoard and Weights & Biases (rank 0 only).

W&B runs offline when no credentials are found, and any W&B failure turns it off with one warning:
a missing or broken W&B never breaks a run. No secret (API key) is ever logged or put in its config.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from neox.config.schema import LoggingConfig

SECRET_HINTS = ("key", "token", "secret", "password")


def scrub(tree: Any) -> Any:
    """Drop any field whose name looks like a credential before it leaves the process."""
    if isinstance(tree, dict):
        return {k: ("<redacted>" if any(h in str(k).lower() for h in SECRET_HINTS) and isinstance(v, str)
                    else scrub(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [scrub(v) for v in tree]
    return tree


def _wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().is_file()
    return "online" if has_key else "offline"


class MetricsLogger:
    """`logging`: the run's logging section; `config`: the run's whole config as plain data
    (neox.config.plan.config_dict), shown with the W&B run after `scrub`."""

    def __init__(self, run_dir: Path, logging: LoggingConfig, enabled: bool, resume_step: int = 0,
                 config: Optional[Dict[str, Any]] = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self._drop_after(resume_step)
        self.file = open(self.path, "a")
        if logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception as exc:  # a logging sink never breaks a run
                self.warn(f"TensorBoard logging off: {exc}")
        if logging.wandb:
            self.wandb = self._start_wandb(run_dir, logging, config or {})

    def _start_wandb(self, run_dir: Path, logging: LoggingConfig, config: Dict[str, Any]):
        try:
            import wandb
        except ImportError:
            self.warn("W&B logging off: wandb is not installed")
            return None
        mode = _wandb_mode()
        try:
            run = wandb.init(project=logging.wandb_project, entity=logging.wandb_entity, dir=str(run_dir),
                             name=run_dir.name, id=_stable_id(run_dir), resume="allow", mode=mode,
                             config=scrub(config),
                             settings=wandb.Settings(silent=True, console="off"))
            print(f"W&B: {mode} run in {run_dir / 'wandb'}", flush=True)
            return run
        except Exception as exc:
            self.warn(f"W&B logging off: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            return None

    def _drop_after(self, step: int) -> None:
        """A run killed after its last checkpoint logged steps that the resumed run redoes: drop them,
        so metrics.jsonl holds one record per step and kind."""
        records, cut_short = _read_records(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records) or cut_short:  # rewritten whole: the next line must not join a cut one
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)

    @staticmethod
    def warn(msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr, flush=True)

    def log(self, step: int, metrics: Dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            try:
                self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
            except Exception as exc:
                self.warn(f"W&B logging off: {exc}")
                self.wandb = None
                _teardown_wandb_quietly()

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as exc:
                self.warn(f"W&B finish failed: {exc}")
                _teardown_wandb_quietly()


def _teardown_wandb_quietly() -> None:
    """After a W&B failure (its service killed, e.g. with a Slurm job's tasks on a requeue or scancel),
    close the connection now: W&B's own exit hook would try again and print a traceback."""
    try:
        import wandb

        wandb.teardown()
    except (Exception, SystemExit):  # the service is gone; teardown says so by raising
        pass


def _stable_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]


def read_metrics(path: Path) -> list:
    """The records of a metrics.jsonl; a line that is not JSON (the last one cut short by a kill or a full
    disk in the middle of a write) is left out."""
    return _read_records(path)[0]


def _read_records(path: Path) -> tuple:
    """(records, how many non-empty lines were not JSON)."""
    if not path.exists():
        return [], 0
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            bad += 1
    return records, bad
