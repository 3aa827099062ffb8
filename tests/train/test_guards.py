"""The non-finite step policy (neox/train/guards.py::SkipNonFiniteAdamW) in one process, against
torch's own AdamW; the agreement of ranks is tested on 2 processes in test_agreement.py, and the
trainer's counting (in a row, in all, train.max_nonfinite_steps) end to end in test_runs.py."""
from __future__ import annotations

import copy

import pytest
import torch

from neox.train.guards import Heartbeats, SkipNonFiniteAdamW

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _backward(model: torch.nn.Module, seed: int) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def test_finite_steps_are_torch_adamw_steps_exactly():
    model, ref = _model(), _model()
    opt, ref_opt = SkipNonFiniteAdamW(model.parameters(), **HYPER), torch.optim.AdamW(ref.parameters(), **HYPER)
    for seed in range(3):
        _backward(model, seed), _backward(ref, seed)
        opt.step(), ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert opt.skip_events == 0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_step_with_one_non_finite_gradient_element_is_skipped_and_counted(bad):
    model = _model()
    opt = SkipNonFiniteAdamW(model.parameters(), **HYPER)
    _backward(model, 0)
    opt.step()  # a good step first: the skip must keep the optimizer state too
    before, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _backward(model, 1)
    model[1].bias.grad[1] = bad  # one element of one parameter
    assert opt.step() is None
    assert opt.skip_events == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # not carried into the next step
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i]["exp_avg"], s["exp_avg"]) and after[i]["step"] == s["step"]
               for i, s in state["state"].items())

    # The next good step continues as if the bad one never happened.
    ref = _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), **HYPER)
    _backward(ref, 0)
    ref_opt.step()
    _backward(model, 2), _backward(ref, 2)
    opt.step(), ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert opt.skip_events == 1


def test_parameters_without_gradients_do_not_block_a_step():
    model = _model()
    opt = SkipNonFiniteAdamW(model.parameters(), **HYPER)
    assert opt.grads_finite()  # nothing to check: no gradient at all
    _backward(model, 0)
    model[0].weight.grad = None  # e.g. a frozen or unused parameter
    before = model[1].weight.detach().clone()
    opt.step()
    assert opt.skip_events == 0 and not torch.equal(model[1].weight, before)


def test_heartbeats_name_the_ranks_behind(tmp_path):
    beats = [Heartbeats(tmp_path, rank) for rank in range(3)]
    assert beats[0].stalled() == []
    for b in beats:
        b.beat(4)
    beats[0].beat(5), beats[2].beat(5)
    assert beats[1].stalled() == [1]
