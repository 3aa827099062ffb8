"""train.precision=fp8 (neox.model.fp8): which layers get fp8 matmuls, what those matmuls compute,
and the refusals. On CPU torchao's emulation (fp8 casts, fp32 matmul) stands in for the fp8 GEMM;
the `gpu` tests run the real one against bf16 and against the emulation."""
from __future__ import annotations

import copy
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from neox.errors import ConfigError
from neox.model.fp8 import FP8Linear, apply_fp8, caches_weights, check_device, convert_to_fp8, fp8_matmul
from neox.model.gpt import GPT, GPTConfig, cross_entropy_loss
from neox.parallel.tensor import ColumnParallelLinear, RowParallelLinear, apply_tensor_parallel

from support.runs import REPO

BASE = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_ff=256, seq_len=32, vocab_size=128,
            position="rotary", rotary_dims=8)
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _linears(model: nn.Module) -> dict:
    """Every module with a 2-d `weight` that a linear layer could be: name -> class."""
    return {n: type(m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, ColumnParallelLinear, RowParallelLinear))}


def _fake_tp(rank: int = 0, size: int = 2):
    """A topology for building a rank's shards without process groups (nothing here communicates)."""
    return types.SimpleNamespace(tp_rank=rank, tp_size=size, tp_group=None)


# ---------------------------------------------------------------------------------------- which layers
def test_the_block_linears_get_fp8_and_the_head_stays_bf16():
    model = GPT(GPTConfig(**BASE))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = convert_to_fp8(model, emulate=True)
    blocks = [f"blocks.{i}.{leaf}" for i in range(2) for leaf in ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")]
    assert done == {"fp8": blocks, "bf16": ["head.proj (output head)"]}
    assert _linears(model) == {**{n: FP8Linear for n in blocks}, "head.proj": nn.Linear}
    after = model.state_dict()  # same keys, same tensors: checkpoints move between bf16 and fp8 runs
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_tied_model_has_no_head_layer_to_keep():
    model = GPT(GPTConfig(**BASE, tied_embeddings=True))
    done = convert_to_fp8(model, emulate=True)
    assert len(done["fp8"]) == 8 and done["bf16"] == []


def test_the_tp_shards_get_fp8_and_the_rule_of_16_reads_the_local_shard():
    # d_ff=48: fc_in is 48x64 whole (multiples of 16) but 24x64 on each of 2 ranks
    cfg = GPTConfig(**{**BASE, "d_ff": 48})
    model = apply_tensor_parallel(GPT(cfg), _fake_tp())
    done = convert_to_fp8(model, emulate=True)
    kinds = _linears(model)
    for i in range(2):
        qkv, proj = kinds[f"blocks.{i}.attn.qkv"], kinds[f"blocks.{i}.attn.proj"]
        assert qkv.__name__ == "FP8ColumnParallelLinear" and qkv.__bases__ == (ColumnParallelLinear,)
        assert proj.__name__ == "FP8RowParallelLinear" and proj.__bases__ == (RowParallelLinear,)
        assert kinds[f"blocks.{i}.mlp.fc_in"] is ColumnParallelLinear  # 24x64 here
        assert kinds[f"blocks.{i}.mlp.fc_out"] is RowParallelLinear  # 64x24 here
    assert kinds["head.proj"] is ColumnParallelLinear
    assert "blocks.0.mlp.fc_in (weight 24x64: fp8 matmuls need multiples of 16)" in done["bf16"]
    assert "head.proj (output head)" in done["bf16"] and len(done["fp8"]) == 4


# ---------------------------------------------------------------------------------------- what they compute
def _q(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tensorwise dynamic scaling, written out: scale = fp8 max / amax, cast, back to fp32."""
    t = t.float()
    scale = (torch.finfo(dtype).max / t.abs().max().double().clamp(min=1e-12)).float()
    return (t * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype).float() / scale


def test_an_fp8_linear_computes_the_three_matmuls_on_fp8_rounded_operands():
    """Forward x·Wᵀ from e4m3 x and W; backward from e5m2 output gradients (independent reference)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).bfloat16()
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    convert_to_fp8(nn.Sequential(lin), emulate=True)
    x = torch.randn(3, 16, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 16, 32, dtype=torch.bfloat16)
    y = lin(x)
    y.backward(g)
    x2, g2 = x.detach().reshape(-1, 64), g.reshape(-1, 32)
    want_y = (_q(x2, E4M3) @ _q(ref_w, E4M3).T).bfloat16() + ref_b
    want_dx = (_q(g2, E5M2) @ _q(ref_w, E4M3)).bfloat16()
    want_dw = (_q(g2, E5M2).T @ _q(x2, E4M3)).bfloat16()
    torch.testing.assert_close(y.detach().reshape(-1, 32), want_y, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad.reshape(-1, 64), want_dx, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lin.weight.grad, want_dw, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lin.matmul(x.detach()).reshape(-1, 32), want_y - ref_b, rtol=1e-2, atol=1e-2)
    # and it is not the bf16 matmul: fp8 rounding moves the output by far more than bf16's
    plain = (x2.float() @ ref_w.float().T).bfloat16() + ref_b
    assert (y.detach().reshape(-1, 32) - plain).abs().max() > 0.02


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _compare_with_bf16(device: str, emulate: bool, compiled: bool = False) -> None:
    """fp8 model against the same bf16 model: loss, logits and every gradient within fp8's error. Measured on
    CPU (emulated, 4 seeds): logits 8-9% off in norm, the worst gradient 14-17% (e5m2 gradients through two
    blocks), the loss under 0.1%; bf16 against fp32 is 0.7% on the logits. A wrong swap is off by ~100%."""
    torch.manual_seed(0)
    cfg = GPTConfig(**{**BASE, "d_model": 128, "d_ff": 512, "seq_len": 64})
    ref = GPT(cfg).to(device, torch.bfloat16)
    model = copy.deepcopy(ref)
    convert_to_fp8(model, emulate=emulate, compiled=compiled)
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len + 1), device=device)
    out = {}
    for name, m in (("ref", ref), ("fp8", model)):
        logits = m(tokens[:, :-1])
        loss = cross_entropy_loss(logits, tokens[:, 1:])
        loss.backward()
        out[name] = (logits.detach(), loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    (l_ref, loss_ref, g_ref), (l8, loss8, g8) = out["ref"], out["fp8"]
    assert abs(loss8.item() - loss_ref.item()) < 0.01 * loss_ref.item(), (loss8.item(), loss_ref.item())
    assert 0.03 < _rel(l8, l_ref) < 0.12, _rel(l8, l_ref)  # above bf16's noise: fp8 was used, not silently bf16
    for n in g_ref:
        assert _rel(g8[n], g_ref[n]) < 0.25, f"grad {n}: relative error {_rel(g8[n], g_ref[n]):.3f}"


def test_the_emulated_fp8_model_matches_bf16_within_fp8_error():
    _compare_with_bf16("cpu", emulate=True)


# ---------------------------------------------------------------------------------------- tp=2
def _tp_worker(rank: int, world: int, on_gpu: bool = False) -> None:
    """tp=2 fp8 (sequence parallelism off and on) against the full bf16 model: on CPU torchao's emulation, on a GPU
    the fp8 GEMMs with compiled casts (what training runs)."""
    from neox.parallel import Topology, gather_full_state_dict, vocab_parallel_cross_entropy
    from neox.parallel.comm import all_gather_no_grad

    topo = Topology.build(tp=2)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.manual_seed(0)
    cfg = GPTConfig(**{**BASE, "d_model": 128, "d_ff": 512, "seq_len": 64, "mlp": "swiglu"})
    ref = GPT(cfg).to(device, torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1)).to(device)
    ref_logits = ref(tokens[:, :-1])
    cross_entropy_loss(ref_logits, tokens[:, 1:]).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for sp in (False, True):
        model = apply_tensor_parallel(copy.deepcopy(ref), topo, sequence_parallel=sp)
        model.zero_grad(set_to_none=True)
        assert len(convert_to_fp8(model, emulate=not on_gpu, compiled=on_gpu)["fp8"]) == 8
        logits = model(tokens[:, :-1])
        vocab_parallel_cross_entropy(logits, tokens[:, 1:], topo.tp_group).backward()
        full = all_gather_no_grad(logits.detach(), -1, topo.tp_group)
        assert 0.03 < _rel(full, ref_logits.detach()) < 0.12, (sp, _rel(full, ref_logits.detach()))
        grads = gather_full_state_dict(model, topo, grads=True)
        for n, g in ref_grads.items():
            assert _rel(grads[n], g) < 0.25, f"sp={sp} grad {n}: relative error {_rel(grads[n], g):.3f}"


def test_tp2_with_fp8_shards_matches_the_bf16_model():
    from support.workers import run_workers

    run_workers(_tp_worker, 2, timeout=300)


# ---------------------------------------------------------------------------------------- refusals
def test_fp8_on_cpu_is_refused_by_the_dry_run_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "train.precision=fp8", "dry_run=true",
                           f"run_dir={tmp_path}/run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "neox: error: train.precision=fp8 needs an NVIDIA GPU with fp8 matmuls (compute capability 8.9 "
        "or newer: Ada, Hopper); use bf16 or fp32 on CPU"], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_gpu_without_fp8_is_refused_at_model_build(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError) as err:
        apply_fp8(GPT(GPTConfig(**BASE)), torch.device("cuda", 0))
    assert str(err.value) == ("train.precision=fp8 needs an NVIDIA GPU with fp8 matmuls (compute capability 8.9 or "
                              "newer: Ada, Hopper); NVIDIA A100-SXM4-80GB is 8.0: use train.precision=bf16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device(torch.device("cuda", 0))  # Hopper passes


def test_fp8_without_torchao_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import torchao.float8 -> ImportError
    with pytest.raises(ConfigError, match=r"^train\.precision=fp8 needs torchao's float8 training \(.*\); "
                                          r"pip install torchao==0\.18\.\*, or use train\.precision=bf16$"):
        convert_to_fp8(GPT(GPTConfig(**BASE)), emulate=True)


def test_fp8_on_a_cpu_worker_is_refused():
    with pytest.raises(ConfigError, match=r"^train\.precision=fp8 needs .*; this worker runs on cpu: use "
                                          r"train\.precision=bf16 or fp32$"):
        apply_fp8(GPT(GPTConfig(**BASE)), torch.device("cpu"))


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("emulate, compiled", [(False, True), (False, False), (True, False)],
                         ids=["fp8-gemm-compiled", "fp8-gemm", "emulated"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_gpu_fp8_model_matches_bf16_within_fp8_error(emulate, compiled):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("this GPU has no fp8 matmuls")
    _compare_with_bf16("cuda", emulate=emulate, compiled=compiled)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_gpu_tp2_fp8_matches_the_bf16_model():
    """Real fp8 GEMMs (compiled casts, as training runs them) on 2 GPUs over nccl, sequence parallelism off and on."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("this GPU has no fp8 matmuls")
    from support.workers import run_workers

    run_workers(_tp_worker, 2, True, timeout=300, init="neox")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_gpu_fp8_gemm_matches_the_emulation():
    """The real fp8 GEMM against torchao's emulation on the same fp8 operands (only accumulation differs)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("this GPU has no fp8 matmuls")
    torch.manual_seed(0)
    lins = {}
    for emulate in (False, True):
        torch.manual_seed(0)
        lins[emulate] = nn.Linear(1024, 2048, device="cuda", dtype=torch.bfloat16)
        convert_to_fp8(nn.Sequential(lins[emulate]), emulate=emulate)
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for emulate, lin in lins.items():
        xi = x.clone().requires_grad_()
        y = lin(xi)
        y.backward(g)
        outs[emulate] = (y.detach(), xi.grad, lin.weight.grad)
    for real, emu, what in zip(outs[False], outs[True], ("output", "input grad", "weight grad")):
        assert _rel(real, emu) < 1e-2, f"{what}: {_rel(real, emu):.2e}"


# ---------------------------------------------------------------------------------------- the bench's loss comparison
def test_the_loss_comparison_writes_both_curves_and_the_gap(tmp_path, monkeypatch):
    """bench/train_throughput.py --compare-loss: one bf16 and one fp8 run with the same overrides; the gap is the mean
    of the last 20 logged losses, fp8 minus bf16 (runs faked: the real ones need a GPU)."""
    import argparse
    import json

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import train_throughput as tt

    calls = []

    def fake_neox(preset, extra, micro, accum, steps, out, tag, until_valid=False):
        assert until_valid  # each run is stopped after its validation at the last step
        calls.append(extra)
        offset = 0.05 if "train.precision=fp8" in extra else 0.0
        return {"name": tag, "tokens_per_s": 1000.0, "peak_gb": 1.0, "loss_steps": list(range(1, steps + 1)),
                "losses": [5.0 - i / steps + offset for i in range(steps)], "valid_loss": 4.0 + offset}

    monkeypatch.setattr(tt, "neox", fake_neox)
    args = argparse.Namespace(model="1.4B", neox=["train.compile=true"], micro=4, accum=2, out=tmp_path)
    tt.compare_loss(args, 100)
    assert [c[-1] for c in calls] == ["train.precision=bf16", "train.precision=fp8"]
    assert all(c[0] == "train.compile=true" and "train.eval_every=100" in c for c in calls)
    summary = json.loads((tmp_path / "loss_compare.json").read_text())
    bf16_final = sum(5.0 - i / 100 for i in range(80, 100)) / 20
    assert summary["final_train_loss"]["bf16"] == pytest.approx(bf16_final)
    assert summary["gap"] == pytest.approx(0.05) and summary["gap_pct"] == pytest.approx(5.0 / bf16_final)
    assert summary["valid_gap_pct"] == pytest.approx(1.25)
    assert (tmp_path / "loss_compare.png").stat().st_size > 10_000
    assert "fp8 - bf16: train +0.0500" in (tmp_path / "loss_compare.md").read_text()


# ---------------------------------------------------------------------------------------- one weight cast per step
def _train_micro_batches(model: nn.Module, batches: list) -> tuple:
    """Each micro-batch's loss and the summed weight gradients after all of them (as grad accumulation)."""
    losses = []
    for tokens in batches:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_the_weight_cache_is_bitwise_the_per_call_casts_with_one_cast_per_weight_and_step(checkpointing):
    """Three micro-batches per step, two steps, the second after an update written the way DeepSpeed writes
    its bf16 weights (through .data: no version bump): with the cache cleared before each update, every loss
    and gradient is bitwise the run that casts each weight at every call; each weight is cast once per step,
    where the per-call run casts it at every forward, recompute and backward."""
    torch.manual_seed(0)
    per_call = GPT(GPTConfig(**BASE, activation_checkpointing=checkpointing))
    cached = copy.deepcopy(per_call)
    layers = len(convert_to_fp8(per_call, emulate=True)["fp8"])
    convert_to_fp8(cached, emulate=True, cache_weights=True)
    matmul = fp8_matmul(cached)
    assert matmul.cache_weights and fp8_matmul(per_call).cache_weights is False
    batches = [torch.randint(0, BASE["vocab_size"], (2, BASE["seq_len"] + 1)) for _ in range(3)]
    for step in range(2):
        ref_losses, ref_grads = _train_micro_batches(per_call, batches)
        losses, grads = _train_micro_batches(cached, batches)
        assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses)), step
        assert ref_grads.keys() == grads.keys() and all(torch.equal(ref_grads[n], grads[n]) for n in grads), step
        assert matmul.casts == layers * (step + 1)
        matmul.clear()  # what the trainer does after the step's last backward
        with torch.no_grad():  # an update through .data, as DeepSpeed's optimizers write the weights
            for model in (per_call, cached):
                for p in model.parameters():
                    p.data.copy_(p.data - 0.05 * p.grad.sign())
                    p.grad = None


def test_a_stale_weight_cache_shows_without_the_clear():
    """The test above can fail: without the clear before an update through .data the cached copies are the old
    weights and the losses after the update differ from the per-call casts."""
    torch.manual_seed(0)
    per_call = GPT(GPTConfig(**BASE))
    cached = copy.deepcopy(per_call)
    convert_to_fp8(per_call, emulate=True)
    convert_to_fp8(cached, emulate=True, cache_weights=True)
    batch = [torch.randint(0, BASE["vocab_size"], (2, BASE["seq_len"] + 1))]
    for model in (per_call, cached):
        _train_micro_batches(model, batch)
        with torch.no_grad():
            for p in model.parameters():
                p.data.copy_(p.data - 0.05 * p.grad.sign())
    ref, _ = _train_micro_batches(per_call, batch)
    stale, _ = _train_micro_batches(cached, batch)
    assert not torch.equal(ref[0], stale[0])
    fp8_matmul(cached).clear()
    for model in (per_call, cached):
        model.zero_grad()
    ref, _ = _train_micro_batches(per_call, batch)
    fresh, _ = _train_micro_batches(cached, batch)
    assert torch.equal(ref[0], fresh[0])


def _scale_in_place(weight: nn.Parameter) -> None:
    with torch.no_grad():
        weight.mul_(2.0)  # torch's optimizers, the fused step's foreach copy: the version moves


def _replace_storage(weight: nn.Parameter) -> None:
    weight.data = weight.data.clone() * 2  # a load that swaps the storage: the version stays


@pytest.mark.parametrize("update", [_scale_in_place, _replace_storage])
def test_a_weight_changed_without_the_clear_is_cast_again(update):
    """The cache key is the weight's storage and version: either change means a new cast, even before clear()."""
    lin = nn.Linear(32, 32, bias=False)
    convert_to_fp8(nn.Sequential(lin), emulate=True, cache_weights=True)
    x = torch.randn(4, 32)
    lin(x)
    update(lin.weight)
    y = lin(x)
    assert lin.fp8_matmul.casts == 2
    reference = nn.Linear(32, 32, bias=False)
    convert_to_fp8(nn.Sequential(reference), emulate=True)
    with torch.no_grad():
        reference.weight.copy_(lin.weight)
    assert torch.equal(y, reference(x))


def test_the_trainer_clears_the_fp8_weights_between_the_last_backward_and_the_update():
    """Trainer.train_step (no pipeline): clear() after the step's last backward and before the engine.step that
    updates the weights; never between micro-batches (the copies serve all of them)."""
    from neox.train.worker import Trainer

    calls = []
    engine = types.SimpleNamespace(backward=lambda loss: calls.append("backward"), step=lambda: calls.append("step"))
    fake = types.SimpleNamespace(
        faults=types.SimpleNamespace(maybe_oom=lambda step, device: None, nan_at=lambda step: False),
        pipelined=False, plan=types.SimpleNamespace(grad_accum=3), info=types.SimpleNamespace(device=torch.device("cpu")),
        state=types.SimpleNamespace(step=0), engine=engine, forward_loss=lambda tokens: torch.tensor(1.0),
        fp8=types.SimpleNamespace(clear=lambda: calls.append("clear")))
    from neox.train.prefetch import DeviceBatches

    Trainer.train_step(fake, DeviceBatches(iter([torch.zeros(1)] * 3), torch.device("cpu")))
    assert calls == ["backward", "step", "backward", "step", "backward", "clear", "step"]


def test_the_pipeline_step_clears_the_fp8_weights_after_train_batch():
    """Under a pipeline the optimizer step runs inside train_batch: the copies are cleared right after it, before
    anything (eval, the next step) runs a forward on the updated weights."""
    from neox.train.worker import Trainer

    calls = []
    fake = types.SimpleNamespace(
        plan=types.SimpleNamespace(grad_accum=2),
        engine=types.SimpleNamespace(train_batch=lambda batches: calls.append("train_batch") or torch.tensor(1.0)),
        fp8=types.SimpleNamespace(clear=lambda: calls.append("clear")))
    Trainer.pipeline_train_step(fake, iter([torch.zeros(1)] * 2))
    assert calls == ["train_batch", "clear"]


@pytest.mark.parametrize("zero,compiled,cached", [(0, False, True), (2, False, True), (3, False, False),
                                                   (0, True, False)])
def test_the_weight_cache_is_off_under_zero3_and_compiled_blocks(zero, compiled, cached):
    """What the trainer passes to apply_fp8 (worker.py): ZeRO-3's gathered weights are not the parameters' storage,
    and Dynamo would guard on the cache inside every compiled block (a recompile per step)."""
    assert caches_weights(zero, compiled) is cached
