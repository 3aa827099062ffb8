"""The per-device memory estimate: the formula against hand arithmetic, and the launcher's use of it
(refuse above 2x the device's memory, warn above 80%, say nothing of a machine it cannot see)."""
from __future__ import annotations

import dataclasses

import pytest

from neox.config.memory import estimate
from neox.config.plan import Resources, make_plan
from neox.errors import ConfigError
from neox.launch.cli import main
from neox.launch.compose import compose_config
from neox.model.gpt import GPTConfig

# 2 layers, h=64, a=4, s=32, V=256: one layer of one micro-batch of b=2 holds s*b*h = 4096 elements.
M = GPTConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_ff=256, seq_len=32, vocab_size=256)
P = 100_000


def est(m=M, **kw):
    args = dict(micro_batch=2, grad_accum=1, tp=1, pp=1, dp=1, zero_stage=0, precision="bf16",
                sequence_parallel=False)
    args.update(kw)
    return estimate(m, P, **args)


@pytest.mark.parametrize("kw,states", [
    (dict(precision="fp32"), P * (4 + 4 + 8)),  # fp32 weights, grads, Adam m and v
    (dict(), P * (2 + 2 + 12)),  # bf16 weights, grads; fp32 master + m + v
    (dict(zero_stage=1, dp=4), P * (2 + 2 + 12 / 4)),
    (dict(zero_stage=2, dp=4), P * (2 + (2 + 12) / 4)),
    (dict(zero_stage=3, dp=4), P * 16 / 4),
    (dict(tp=2), P / 2 * 16),
    (dict(pp=2, grad_accum=4), P / 2 * 16),
])
def test_model_states(kw, states):
    assert est(**kw).states == pytest.approx(states)


LOGITS = 2 * 4 * 32 * 2 * 256  # fp32 logits and their gradient


@pytest.mark.parametrize("m,kw,activations", [
    (M, dict(), 2 * 4096 * 34 + LOGITS),  # Korthikanti: s*b*h*34 per layer, 2-byte elements
    (M, dict(precision="fp32"), 2 * 4096 * 34 * 2 + LOGITS),
    (M, dict(tp=2), 2 * 4096 * (10 + 24 / 2) + LOGITS / 2),
    (M, dict(tp=2, sequence_parallel=True), 2 * 4096 * 34 / 2 + LOGITS / 2),
    (dataclasses.replace(M, position="alibi"), dict(), 2 * 4096 * (34 + 5 * 4 * 32 / 64) + LOGITS),
    (dataclasses.replace(M, activation_checkpointing="full"), dict(), 2 * 2 * 4096 + 4096 * 34 + LOGITS),
    (M, dict(pp=2, grad_accum=4), 1 * 2 * 4096 * 34 + LOGITS),  # 1 layer/stage x 2 micro-batches in flight
    (M, dict(pp=2, grad_accum=1), 1 * 1 * 4096 * 34 + LOGITS),
])
def test_activations(m, kw, activations):
    assert est(m, **kw).activations == pytest.approx(activations)


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

    from neox.launch.resources import ram_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < ram_bytes() <= physical
