"""The training loop's fault injection (neox.train.faults): parsed once at the worker's entry, in process.
The runs that use it end to end are in tests/train/test_runs.py and test_worker_errors.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neox.train.faults import Faults

NEOX = Path(__file__).resolve().parents[2] / "neox"


def test_parsed_from_the_environment():
    faults = Faults.from_env({"NEOX_FAULT_NAN_STEPS": "3, 5,", "NEOX_FAULT_HANG": "1:4", "NEOX_FAULT_OOM": "2"})
    assert faults == Faults(nan_steps=frozenset({3, 5}), hang=(1, 4), oom_step=2)
    assert [s for s in range(1, 7) if faults.nan_at(s)] == [3, 5]
    assert Faults.from_env({}) == Faults()


@pytest.mark.parametrize("env", [{"NEOX_FAULT_NAN_STEPS": "3;4"}, {"NEOX_FAULT_HANG": "1"},
                                 {"NEOX_FAULT_HANG": "a:2"}, {"NEOX_FAULT_OOM": "two"}])
def test_a_malformed_spec_fails_at_the_entry_not_in_the_loop(env):
    with pytest.raises(ValueError, match="malformed fault injection"):
        Faults.from_env(env)


def test_out_of_memory_only_at_its_step():
    faults = Faults(oom_step=2)
    faults.maybe_oom(1, torch.device("cpu"))  # nothing at another step
    with pytest.raises(RuntimeError, match="(?i)alloc"):
        faults.maybe_oom(2, torch.device("cpu"))


def test_hang_only_on_its_rank_and_step():
    faults = Faults(hang=(1, 3))
    faults.maybe_hang(0, 3)  # returns: another rank
    faults.maybe_hang(1, 2)  # returns: another step


def test_nothing_else_reads_the_loop_faults_from_the_environment():
    readers = sorted(str(p.relative_to(NEOX.parent)) for p in NEOX.rglob("*.py")
                     if any(f'"NEOX_FAULT_{name}"' in p.read_text() for name in ("NAN_STEPS", "HANG", "OOM")))
    assert readers == ["neox/train/faults.py"]
