"""The launcher's use of the per-device memory estimate (refuse above 2x the device's memory, warn above
80%, say nothing of a machine it cannot see). The estimate's terms against hand arithmetic are in
tests/planner/test_memory_terms.py (neox/config/memory.py is the planner's model)."""
from __future__ import annotations

import pytest

from neox.config.plan import Resources, make_plan
from neox.errors import ConfigError
from neox.launch.cli import main
from neox.launch.compose import compose_config


def _plan(tmp_path, memory, overrides=(), slots=2):
    cfg = compose_config([f"run_dir={tmp_path}/run", *overrides])
    return make_plan(cfg, Resources("local", "cpu", slots, slots, memory_per_slot=memory))


def test_refuse_warn_or_pass_by_the_device_memory(tmp_path):
    need = _plan(tmp_path, None).memory.total
    assert not [w for w in _plan(tmp_path, int(need * 2)).warnings if "memory" in w or "needs about" in w]
    warned = _plan(tmp_path, int(need * 1.1)).warnings
    assert any("needs about" in w and "if it runs out of memory" in w for w in warned), warned
    with pytest.raises(ConfigError, match=r"needs about .* GiB per CPU process .* over 2x the .* per CPU process "
                                          r"here; lower train\.micro_batch or model\.seq_len"):
        _plan(tmp_path, int(need / 2.5))


def test_a_dry_run_for_a_bigger_machine_is_not_held_to_this_ones_memory(tmp_path):
    plan = _plan(tmp_path, 1, ["parallelism.dp=4", "dry_run=true"])
    assert plan.world_size == 4 and not any("needs about" in w for w in plan.warnings)


def test_a_huge_sequence_is_refused_at_once_with_the_number(capsys, tmp_path):
    """model.seq_len=400000 once ran for minutes without a word; now the dry run refuses it."""
    code = main(["model.seq_len=400000", "train.micro_batch=64", f"run_dir={tmp_path}/run", "dry_run=true"])
    err = capsys.readouterr().err
    assert code == 2 and "neox: error: the run needs about" in err and "GiB" in err, err


def test_the_summary_shows_the_estimate(capsys, tmp_path):
    assert main([f"run_dir={tmp_path}/run", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "  memory    ~" in out and "activations (estimate)" in out and "available per" in out, out


def test_this_machines_memory_is_found():
    import os

    from neox.config.resources import ram_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < ram_bytes() <= physical
