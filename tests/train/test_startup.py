"""The start-up breakdown: phases partition the time from the launcher's start to the first step."""
import time

import pytest

from neox.config.run_files import LAUNCHED_AT, SPAWNED_AT, process_started
from neox.train.startup import StartupClock, launched_at, spawned_at


def test_phases_add_up_to_the_time_since_the_launcher_started():
    launched = time.time() - 2.0
    clock = StartupClock(started=launched + 0.5, launched=launched)
    time.sleep(0.05)
    clock.mark("model")
    assert [name for name, _ in clock.phases] == ["launcher", "model"]
    assert clock.phases[0][1] == pytest.approx(0.5)
    assert clock.total == pytest.approx(time.time() - launched, abs=0.02)
    record = clock.record()
    assert record["launcher_s"] == pytest.approx(0.5) and record["total_s"] == pytest.approx(clock.total, abs=1e-3)
    assert "from launch.py" in clock.line() and "model" in clock.line()


def test_the_launcher_phase_splits_into_launch_py_and_the_deepspeed_launcher(monkeypatch):
    launched = time.time() - 10.0
    monkeypatch.setenv(LAUNCHED_AT, f"{launched:.3f}")
    monkeypatch.setenv(SPAWNED_AT, f"{launched + 3.0:.3f}")
    clock = StartupClock(started=launched + 7.5, launched=launched_at(), spawned=spawned_at())
    clock.mark("imports")
    record = clock.record()
    assert record["launcher_s"] == pytest.approx(7.5, abs=1e-3)
    assert record["launcher_launch_py_s"] == pytest.approx(3.0, abs=1e-3)
    assert record["launcher_deepspeed_launcher_s"] == pytest.approx(4.5, abs=1e-3)
    assert record["total_s"] == pytest.approx(clock.total, abs=1e-3)  # the parts are inside the launcher phase
    assert "launcher 7.5 (launch.py 3.0, deepspeed launcher 4.5)" in clock.line()
    # a handover time outside [launched, started] (clocks of other hosts) is not split
    assert StartupClock(started=launched + 7.5, launched=launched, spawned=launched + 9.0).launcher_parts == {}


def test_a_worker_without_a_launcher_counts_from_its_own_start(monkeypatch):
    monkeypatch.delenv(LAUNCHED_AT, raising=False)
    assert launched_at() is None
    clock = StartupClock(started=time.time(), launched=launched_at())
    clock.mark("imports")
    assert [name for name, _ in clock.phases] == ["imports"] and "from worker start" in clock.line()
    monkeypatch.setenv(LAUNCHED_AT, "not a time")
    assert launched_at() is None


def test_this_process_started_before_now_and_not_long_ago():
    # pytest itself started this process: seconds to minutes ago, never in the future (boot time is in whole s)
    assert time.time() - 3600 < process_started() <= time.time() + 1.0


def test_the_model_is_built_on_the_gpu_only_when_its_full_weights_take_at_most_half_the_free_memory(monkeypatch,
                                                                                                  tmp_path):
    import torch
    from support.plans import plan_of

    from neox.train.devices import build_device

    _, plan = plan_of(["model=tiny", f"run_dir={tmp_path}"])
    full = 4 * plan.params["total"]  # fp32 bytes of the whole model
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * full, 8 * full))
    assert build_device(plan, gpu) == gpu
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * full - 1, 8 * full))
    assert build_device(plan, gpu) == torch.device("cpu")  # sharded (TP) or cast (ZeRO) before the GPU sees it
    assert build_device(plan, torch.device("cpu")) == torch.device("cpu")
