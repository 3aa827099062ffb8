"""neox.kernels.adamw_bf16_step_ (csrc/optim/) against torch.optim.AdamW(fused=True) stepping fp32 copies.

On CUDA the fp32 state must equal torch's bit for bit; on CPU the kernel follows torch's CPU fused AdamW
within a few ulps (its vectorised loop exactly; torch's scalar tail for the last elements of a tensor and
its compiler's contractions may differ in the last bit). The reference (torch's own path) is bitwise on both.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from neox import kernels as K
from neox.errors import KernelError
from neox.kernels import _backend
from neox.kernels.adamw import adamw_bf16_step_, torch_adamw_state

# Many small tensors (biases, norm weights) and a few large ones: odd sizes, sizes of whole and partial
# 8192-element tiles, more than the 40 tensors of one CUDA launch.
SHAPES = ([(1,), (7,), (33, 65), (3, 1000), (8192,), (8193,), (2, 8192), (300, 257)]
          + [(n,) for n in range(1, 41)] + [(64, 24)] * 5)
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)


class Problem:
    """bf16 weights and gradients; our masters/state and torch's fp32 copies with a fused AdamW."""

    def __init__(self, device: str, weight_decay: float, misaligned: bool = False, none_grad: int = -1):
        self.device, self.wd, self.none_grad = device, weight_decay, none_grad
        self.w16 = [torch.randn(s, device=device).bfloat16() for s in SHAPES]
        if misaligned:  # contiguous views at an odd offset: the CUDA kernel's one-element path
            self.masters = [_offset_copy(w.float()) for w in self.w16]
        else:
            self.masters = [w.float() for w in self.w16]
        self.ref = [w.float().requires_grad_() for w in self.w16]
        self.torch_opt = torch.optim.AdamW(self.ref, **_torch_hyper(), weight_decay=weight_decay, fused=True)
        self.our_opt = torch.optim.AdamW([torch.zeros(1)], **_torch_hyper())  # only its state dict is used
        self.ours = torch_adamw_state(self.our_opt, self.masters)

    def step(self, grad_scale: float | None = None, found_inf: float | None = None, impl: str = "fused") -> None:
        g16 = [(torch.randn(w.shape, device=self.device) * 3).bfloat16() for w in self.w16]
        if self.none_grad >= 0:
            g16[self.none_grad] = None
        for p, g in zip(self.ref, g16):
            p.grad = torch.zeros_like(p) if g is None else g.float()
        scale = None if grad_scale is None else torch.tensor(grad_scale, device=self.device)
        inf = None if found_inf is None else torch.tensor(found_inf, device=self.device)
        self.torch_opt.grad_scale, self.torch_opt.found_inf = scale, inf  # as torch's GradScaler hands them over
        self.torch_opt.step()
        adamw_bf16_step_(self.w16, g16, self.masters, *self.ours, **HYPER, weight_decay=self.wd, grad_scale=scale,
                         found_inf=inf, impl=impl)

    def check(self, exact: bool) -> None:
        for i, (master, ref) in enumerate(zip(self.masters, self.ref)):
            theirs = self.torch_opt.state[ref]
            mine = self.our_opt.state[master]
            pairs = [(master, ref.detach()), (mine["exp_avg"], theirs["exp_avg"]),
                     (mine["exp_avg_sq"], theirs["exp_avg_sq"])]
            for name, (a, b) in zip(("master", "exp_avg", "exp_avg_sq"), pairs):
                if exact:
                    bad = (a.view(torch.int32) != b.view(torch.int32)).sum().item()
                    assert bad == 0, f"tensor {i} {SHAPES[i]}: {name} differs from torch's in {bad} elements"
                else:
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=lambda m: f"tensor {i} {name}: {m}")
            assert mine["step"].dtype == torch.float32 and mine["step"].device == master.device
            assert torch.equal(mine["step"], theirs["step"]), f"tensor {i}: step {mine['step']} != {theirs['step']}"
            assert torch.equal(self.w16[i], master.bfloat16()), f"tensor {i}: bf16 weight is not the master rounded"


def _torch_hyper() -> dict:
    return dict(lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"])


def _offset_copy(t: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def _exact(device: str, impl: str) -> bool:
    return device == "cuda" or impl == "reference"


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, None), (0.1, None), (0.1, 2.5), (0.0, 0.37)])
def test_matches_torch_fused_adamw(device, seed, impl, weight_decay, grad_scale):
    prob = Problem(device, weight_decay, none_grad=3)
    for _ in range(4):
        prob.step(grad_scale, impl=impl)
        prob.check(_exact(device, impl))


def test_misaligned_tensors(device, seed):
    prob = Problem(device, 0.1, misaligned=True)
    assert prob.masters[4].data_ptr() % 16  # the offset view really is misaligned
    for _ in range(3):
        prob.step(1.5)
        prob.check(_exact(device, "fused"))


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_found_inf_changes_nothing(device, seed, impl):
    prob = Problem(device, 0.1)
    prob.step(impl=impl)
    before = [t.clone() for t in prob.w16 + prob.masters + [x for lst in prob.ours for x in lst]]
    prob.step(2.0, found_inf=1.0, impl=impl)
    after = prob.w16 + prob.masters + [x for lst in prob.ours for x in lst]
    for i, (a, b) in enumerate(zip(before, after)):
        assert torch.equal(a, b), f"tensor {i} of params16 + masters + state changed in a skipped step"
    assert all(s.item() == 1.0 for s in prob.ours[2]), "the step counts were not restored"
    prob.check(_exact(device, impl))  # torch skipped too: the same state, steps included
    prob.step(found_inf=0.0, impl=impl)  # found_inf = 0 is a normal step
    prob.check(_exact(device, impl))
    assert all(s.item() == 2.0 for s in prob.ours[2])


def test_bf16_weight_rounds_to_nearest_even(device):
    """lr = 0 leaves the masters as they are; the weights are then their rounding alone, ties included."""
    ulp = 2.0 ** -7  # bf16 spacing in [1, 2)
    ties = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + ulp / 4, 1 + 3 * ulp / 4, 3.0e38],
                        device=device)
    masters = [ties.clone(), torch.randn(4099, device=device)]
    w16 = [torch.zeros_like(m, dtype=torch.bfloat16) for m in masters]
    zeros = [torch.zeros_like(m) for m in masters]
    steps = [torch.zeros((), device=device) for _ in masters]
    adamw_bf16_step_(w16, [None, None], masters, zeros, [z.clone() for z in zeros], steps, lr=0.0, beta1=0.9,
                     beta2=0.999, eps=1e-8, weight_decay=0.0, impl="fused")
    assert torch.equal(masters[0], ties)
    assert w16[0].float().tolist() == [1.0, 1 + 2 * ulp, -1.0, 1.0, 1 + ulp, ties[5].bfloat16().item()]
    assert torch.equal(w16[1], masters[1].bfloat16())


def test_strided_gradient_is_read_as_it_is(device, seed):
    """A non-contiguous gradient (only read) is taken through a contiguous copy, not refused."""
    master = torch.randn(3, 5, device=device)
    g = torch.randn(5, 3, device=device).bfloat16().t()
    assert not g.is_contiguous()
    ref = master.clone().requires_grad_()
    ref.grad = g.float().contiguous()  # torch's CPU fused AdamW reads a strided grad as if it were contiguous
    opt = torch.optim.AdamW([ref], **_torch_hyper(), weight_decay=0.1, fused=True)
    opt.step()
    w16, state = master.bfloat16(), [torch.zeros_like(master), torch.zeros_like(master), torch.zeros((), device=device)]
    adamw_bf16_step_([w16], [g], [master], [state[0]], [state[1]], [state[2]], **HYPER, weight_decay=0.1, impl="fused")
    tol = dict(rtol=0, atol=0) if device == "cuda" else dict(rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(master, ref.detach(), **tol)
    torch.testing.assert_close(state[0], opt.state[ref]["exp_avg"], **tol)


def test_state_dict_matches_torch(seed):
    """The state torch_adamw_state creates and the kernel steps is laid out as torch's fused AdamW's."""
    prob = Problem("cpu", 0.1)
    prob.step()
    mine, theirs = prob.our_opt.state[prob.masters[0]], prob.torch_opt.state[prob.ref[0]]
    assert sorted(mine) == sorted(theirs) == ["exp_avg", "exp_avg_sq", "step"]
    assert mine["step"].shape == theirs["step"].shape == () and mine["step"].dtype == theirs["step"].dtype


def test_empty_list_and_empty_tensor(device):
    adamw_bf16_step_([], [], [], [], [], [], **HYPER, weight_decay=0.1, impl="fused")
    w, m = torch.zeros(0, dtype=torch.bfloat16, device=device), torch.zeros(0, device=device)
    step = torch.zeros((), device=device)
    adamw_bf16_step_([w], [None], [m], [m.clone()], [m.clone()], [step], **HYPER, weight_decay=0.1, impl="fused")
    assert step.item() == 1.0  # torch counts a step of an empty tensor too


def _args(n: int = 2, device: str = "cpu") -> dict:
    w16 = [torch.randn(5, device=device).bfloat16() for _ in range(n)]
    return dict(params16=w16, grads16=[w.clone() for w in w16], masters=[w.float() for w in w16],
                exp_avgs=[torch.zeros(5, device=device) for _ in range(n)],
                exp_avg_sqs=[torch.zeros(5, device=device) for _ in range(n)],
                steps=[torch.zeros((), device=device) for _ in range(n)])


@pytest.mark.parametrize("change,match", [
    (lambda a: a["grads16"].pop(), r"differ in length .*'grads16': 1"),
    (lambda a: a["masters"].__setitem__(1, a["masters"][1].bfloat16()), "tensor 1 has dtypes .*masters torch.bfloat16"),
    (lambda a: a["params16"].__setitem__(0, a["params16"][0].float()), "tensor 0 has dtypes params16 torch.float32"),
    (lambda a: a["grads16"].__setitem__(0, a["grads16"][0].half()), "grads16 torch.float16"),
    (lambda a: a["steps"].__setitem__(0, torch.zeros((), dtype=torch.float64)), "steps torch.float64"),
    (lambda a: a["steps"].__setitem__(1, torch.zeros((), device="meta")), "tensor 1 is not all on cpu"),
    (lambda a: a["exp_avgs"].__setitem__(0, torch.zeros(6)), r"exp_avgs \(6,\)"),
    (lambda a: a["steps"].__setitem__(0, torch.zeros(2)), r"steps \(2,\)"),
    (lambda a: a["exp_avg_sqs"].__setitem__(0, torch.zeros(10)[::2]), "tensor 0 is not contiguous"),
    (lambda a: a["params16"].__setitem__(1, torch.zeros(10, dtype=torch.bfloat16)[::2]), "tensor 1 is not contiguous"),
    (lambda a: a.update(grad_scale=torch.tensor(2.0, dtype=torch.float64)), "grad_scale must be one float32"),
    (lambda a: a.update(found_inf=torch.zeros(2)), "found_inf must be one float32"),
    (lambda a: a.update(lr=torch.tensor(1e-3)), "plain numbers"),
    (lambda a: a.update(impl="fast"), "impl must be one of"),
])
def test_bad_input_raises_one_line(change, match):
    args = dict(_args(), **HYPER, weight_decay=0.0)
    change(args)
    before = [t.clone() for t in args["masters"]]
    with pytest.raises(KernelError, match=match) as e:
        adamw_bf16_step_(**args)
    assert "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, args["masters"]))  # nothing was stepped


def test_extension_checks_its_inputs_too():
    """The binding's own checks (the last line of defence) refuse what the Python side would."""
    ext, why = _backend.extension("cpu")
    if ext is None:
        pytest.skip(why)
    a = _args()
    with pytest.raises(RuntimeError, match="differ in length"):
        ext.adamw_bf16_step(a["params16"], a["grads16"][:1], a["masters"], a["exp_avgs"], a["exp_avg_sqs"], a["steps"],
                            1e-3, 0.9, 0.95, 0.0, 1e-8, None, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ext.adamw_bf16_step([w.float() for w in a["params16"]], a["grads16"], a["masters"], a["exp_avgs"],
                            a["exp_avg_sqs"], a["steps"], 1e-3, 0.9, 0.95, 0.0, 1e-8, None, None)


def test_fused_without_the_extension_raises_and_auto_uses_torch(monkeypatch, seed):
    monkeypatch.setitem(_backend._loaded, "cpu", (None, "neox._C_cpu not built: test reason"))
    with pytest.raises(KernelError, match="test reason"):
        adamw_bf16_step_(**_args(), **HYPER, weight_decay=0.0, impl="fused")
    prob = Problem("cpu", 0.1)
    prob.step(impl="auto")
    prob.check(exact=True)  # auto fell back to torch's own path


def test_registered_as_an_op():
    assert "adamw" in K.OPS and "adamw" in _backend.AUTO_FUSED["cuda"] and "adamw" not in _backend.AUTO_FUSED["cpu"]
    assert K.status("fused", "cpu")["adamw"] == "fused" and K.status("auto", "cpu")["adamw"] == "reference"


def test_bench_runs_on_cpu():
    """bench/adamw.py end to end at a tiny size, so the GPU benchmark cannot rot."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(repo, "bench", "adamw.py"), "--device", "cpu", "--layers", "1",
                          "--d-model", "32", "--vocab", "64", "--iters", "1"],
                         capture_output=True, text=True, timeout=300, cwd=repo)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "wall ms" not in line]
    assert len(rows) == 3 and rows[2].startswith("| neox") and rows[2].endswith("| yes |"), out.stdout
