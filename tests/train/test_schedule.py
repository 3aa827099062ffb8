"""The learning-rate schedule (neox/train/schedule.py) against values worked out by hand.

Worked example: warmup 4, decay_steps 12, min_lr = 0.1 x lr. The multiplier at optimizer step s
(0-based: the lr of the (s+1)-th update) is (s+1)/4 during warmup; then, with p = (s-4)/8 clamped
to [0, 1]: cosine 0.1 + 0.45 (1 + cos(pi p)), linear 1 - 0.9 p, constant 1. The cosines used:
cos(pi/8) = 0.9238795325, cos(pi/4) = 0.7071067812, cos(3 pi/4) = -0.7071067812.
"""
from __future__ import annotations

import pytest
import torch
from support.plans import cpu, plan_of

from neox.train.schedule import lr_multiplier

WARMUP = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0}
EXPECTED = {
    "cosine": {**WARMUP, 4: 1.0, 5: 0.9657457896, 6: 0.8681980515, 8: 0.55, 10: 0.2318019485, 12: 0.1, 13: 0.1,
               100: 0.1},
    "linear": {**WARMUP, 4: 1.0, 5: 0.8875, 6: 0.775, 8: 0.55, 10: 0.325, 12: 0.1, 13: 0.1, 100: 0.1},
    "constant": {**WARMUP, 4: 1.0, 6: 1.0, 12: 1.0, 100: 1.0},
}


@pytest.mark.parametrize("decay", sorted(EXPECTED))
def test_warmup_then_decay_to_min_lr_at_decay_steps(decay):
    at = lr_multiplier(warmup=4, decay_steps=12, decay=decay, min_ratio=0.1)
    got = {s: at(s) for s in EXPECTED[decay]}
    assert got == pytest.approx(EXPECTED[decay], abs=1e-9)


def test_without_warmup_the_first_step_has_the_peak_lr():
    at = lr_multiplier(warmup=0, decay_steps=10, decay="cosine", min_ratio=0.0)
    assert [at(0), at(5), at(10), at(11)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)


def test_one_warmup_step_is_the_peak_lr():
    assert lr_multiplier(warmup=1, decay_steps=5, decay="linear", min_ratio=0.0)(0) == 1.0


def _lrs(overrides, steps):
    """The lr of each of `steps` updates, from the trainer's own scheduler on a real optimizer."""
    from neox.train import engine

    _, plan = plan_of(["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=4", *overrides], cpu(1))
    opt = engine.optimizer(torch.nn.Linear(2, 2), plan.config.optim, torch.device("cpu"))
    sched = engine.lr_scheduler(opt, plan.config.optim, plan.config.train.steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_trainer_scheduler_applies_the_multiplier_to_optim_lr():
    lrs = _lrs(["optim.decay=cosine", "optim.decay_steps=12", "train.steps=20"], 14)
    want = [1e-3 * EXPECTED["cosine"].get(s, lr_multiplier(4, 12, "cosine", 0.1)(s)) for s in range(14)]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert lrs[8] == pytest.approx(5.5e-4) and lrs[12] == pytest.approx(1e-4)  # halfway, and min_lr


def test_decay_steps_default_to_train_steps():
    assert _lrs(["train.steps=12"], 14) == pytest.approx(_lrs(["train.steps=12", "optim.decay_steps=12"], 14))
    assert _lrs(["train.steps=12"], 14) != pytest.approx(_lrs(["train.steps=12", "optim.decay_steps=20"], 14))
