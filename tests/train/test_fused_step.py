"""neox.train.fused_step against DeepSpeed's own `FP16_UnfusedOptimizer.step` (the reference: same
model, same gradients, its step unpatched), under tensor parallelism against the full model's norm,
and installed by `neox.train.engine.initialize` on bf16 ZeRO-0 engines only.

Everything runs in one spawn of 2 gloo processes (DeepSpeed's optimizer wants its comm initialized):
the reference checks run on each rank by themselves, the tp=2 check and the engines use both.
"""
from __future__ import annotations

import copy
import math
import types

import pytest
import torch

from support.workers import Checks



CLIP = 1.0
EPS32 = torch.finfo(torch.float32).eps
# Where the two steps round differently (a clip factor from a norm summed in another order, or x / c
# against x * fl(1/c)), each gradient element differs by about one fp32 ulp; Adam's second moment
# squares it and the steps accumulate. Seen here: at most 2.7 eps * max|x| per tensor; allowed: 8.
ULPS = 8
INF = float("inf")


def _model(device: str = "cpu") -> torch.nn.Module:
    """A few Linear/LayerNorm layers in bf16; every tensor's size is a perfect square (see _exact_grads)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                               torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
                               ).bfloat16().to(device)


def _optimizer(model: torch.nn.Module, fused: bool, mpu=None, fused_step: bool = False, chunk: int = 0,
               adamw_impl=None):
    """DeepSpeed's bf16 optimizer over our AdamW, grouped as neox.train.engine.optimizer groups it; `chunk`:
    the fused step's fp32 gradients that many elements at a time (0: its default); `adamw_impl`: the
    "adamw" op's impl the fused step gets (install_fused_step's argument)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from neox.train import fused_step as fs
    from neox.train.guards import SkipNonFiniteAdamW

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    inner = SkipNonFiniteAdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                               lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    opt = FP16_UnfusedOptimizer(inner, low_precision_dtype=torch.bfloat16, clip_grad=CLIP, mpu=mpu, verbose=False)
    if fused_step:
        opt.step = types.MethodType(fs.fused_step, opt)
    if chunk:
        opt.fused_step_chunk = chunk
    if fused_step:
        opt.adamw_impl = adamw_impl
    return opt


def _exact_grads(model: torch.nn.Module, g: torch.Generator, size: float) -> list:
    """Gradients whose norm every summation order computes exactly: per tensor, a power of two (`size`
    is one) on k*k random elements (random signs), zero elsewhere, so each tensor's norm is k * 2^e and
    its square and the sum of squares (21 bits at most here) are exact in fp32. The reference's norm
    and ours are then the same number, and any difference in the state comes from the step itself."""
    grads = []
    for p in model.parameters():
        n = p.numel()
        k = int(torch.randint(1, math.isqrt(n) + 1, (), generator=g))
        e = int(torch.randint(-3, 1, (), generator=g))
        flat = torch.zeros(n)
        idx = torch.randperm(n, generator=g)[:k * k]
        flat[idx] = torch.where(torch.rand(k * k, generator=g) < 0.5, -1.0, 1.0) * size * 2.0 ** e
        grads.append(flat.view_as(p).bfloat16())
    return grads


def _random_grads(model: torch.nn.Module, g: torch.Generator, size: float) -> list:
    return [(torch.randn(p.shape, generator=g) * size).bfloat16() for p in model.parameters()]


def _state(opt) -> list:
    """(master, exp_avg, exp_avg_sq) per parameter, in order."""
    masters = [m for group in opt.fp32_groups for m in group]
    return [(m, opt.optimizer.state[m]["exp_avg"], opt.optimizer.state[m]["exp_avg_sq"]) for m in masters]


def _clip_active(norm: float) -> bool:
    return (norm + 1e-6) / CLIP > 1


# Step sizes: clipping off, an inf gradient (skipped), clipping on, off again. The multiplier scales the
# gradients so that norms land on the intended side of CLIP (asserted in the check).
STEPS = [("no clip", 2.0 ** -7), ("inf", 1.0), ("clip", 8.0), ("no clip", 2.0 ** -6), ("nan", 1.0), ("clip", 16.0)]


def _against_deepspeed(rank: int, world: int, fused: bool, make_grads, device: str = "cpu", chunk: int = 0,
                       adamw_impl=None) -> None:
    """Same model, same gradients, 5 steps: DeepSpeed's step vs ours. Bitwise where the arithmetic is
    the same. The one place it is not: torch's fused AdamW divides each gradient by `grad_scale` (x / c),
    DeepSpeed multiplies by 1/c (x * fl(1/c)), which differ by at most ~1 fp32 ulp per gradient element;
    through Adam's update that stays within a few ulps of each tensor's scale (bound: ULPS eps * max|x|).
    `adamw_impl="fused"`: the update by neox.kernels.adamw_bf16_step_, torch's CUDA fused AdamW's arithmetic
    (bitwise there); on CPU it follows torch's CPU fused AdamW within a few ulps (compared within ULPS)."""
    ref_model, new_model = _model(device), _model(device)
    ref = _optimizer(ref_model, fused)
    new = _optimizer(new_model, fused, fused_step=True, chunk=chunk, adamw_impl=adamw_impl)
    if adamw_impl is not None:
        import neox.train.fused_step as fs
        assert fs._bf16_kernel(new, new.optimizer, torch.device(device)) == fused, "the kernel path is not taken"
    if chunk:
        sizes = [m.numel() for group in new.fp32_groups for m in group]
        from neox.train.fused_step import chunks
        assert len(chunks(sizes, chunk)) >= 4 and max(sizes) > chunk, sizes  # several chunks, one oversized
    g = torch.Generator().manual_seed(1 + rank)
    diverged = adamw_impl is not None and fused and device == "cpu"  # after a clipped fused step: those ulps
    for i, (kind, size) in enumerate(STEPS):
        grads = [t.to(device) for t in make_grads(ref_model, g, size)]
        if kind in ("inf", "nan"):
            grads[2].view(-1)[3] = INF if kind == "inf" else float("nan")
        before = [tuple(t.clone() for t in s) for s in _state(new)]
        weights_before = [p.detach().clone() for p in new_model.parameters()]
        for pr, pn, gr in zip(ref_model.parameters(), new_model.parameters(), grads):
            pr.grad, pn.grad = gr.clone(), gr.clone()
        skips = new.optimizer.skip_events
        out_ref, out_new = ref.step(), new.step()
        where = f"step {i} ({kind}, fused AdamW={fused}, {make_grads.__name__}, {device}, chunk {chunk}, {adamw_impl})"
        assert out_new is out_ref, f"{where}: returned {out_new}, DeepSpeed {out_ref}"
        if kind in ("inf", "nan"):
            assert out_new is True and new._global_grad_norm == INF == ref._global_grad_norm, where
            assert new.optimizer.skip_events == skips + 1, f"{where}: SkipNonFiniteAdamW did not count the skip"
            assert all(p.grad is None for p in new_model.parameters()), f"{where}: bf16 grads not freed"
            for (m, a, s), (m0, a0, s0) in zip(_state(new), before):
                assert torch.equal(m, m0) and torch.equal(a, a0) and torch.equal(s, s0), f"{where}: state moved"
            assert all(torch.equal(p, w) for p, w in zip(new_model.parameters(), weights_before)), where
        else:
            assert out_new is False and new.optimizer.skip_events == skips
            assert _clip_active(ref._global_grad_norm) == (kind == "clip"), f"{where}: {ref._global_grad_norm}"
            exact = make_grads is _exact_grads
            rel = 1e-12 if exact else 1e-6  # exact sums: only DeepSpeed's float64 sqrt-of-squares differs
            assert math.isclose(new._global_grad_norm, ref._global_grad_norm, rel_tol=rel), \
                f"{where}: norm {new._global_grad_norm!r} vs DeepSpeed {ref._global_grad_norm!r}"
        assert all(m.grad is None for group in new.fp32_groups for m in group), f"{where}: fp32 grads kept"
        steps = [(ref.optimizer.state[mr]["step"], new.optimizer.state[mn]["step"])
                 for gr, gn in zip(ref.fp32_groups, new.fp32_groups) for mr, mn in zip(gr, gn)]
        assert all(float(a) == float(b) for a, b in steps), f"{where}: step counts {steps[:2]}"
        diverged |= kind == "clip" and (fused or make_grads is not _exact_grads)
        for j, ((mr, ar, sr), (mn, an, sn)) in enumerate(zip(_state(ref), _state(new))):
            for name, r, n in (("master", mr, mn), ("exp_avg", ar, an), ("exp_avg_sq", sr, sn)):
                if diverged:
                    err = (r - n).abs().max().item()
                    assert err <= ULPS * EPS32 * r.abs().max().item(), f"{where}: tensor {j} {name} off by {err:.3g}"
                else:
                    assert torch.equal(r, n), f"{where}: tensor {j} {name} differs from DeepSpeed's"
        for j, (pr, pn) in enumerate(zip(ref_model.parameters(), new_model.parameters())):
            if diverged:  # the bf16 weight is the master rounded: at most one bf16 ulp apart
                assert ((pr.float() - pn.float()).abs() <= pr.float().abs() * 2 ** -7 + 1e-30).all(), where
            else:
                assert torch.equal(pr, pn), f"{where}: bf16 weight {j} differs from DeepSpeed's"
        for params, masters in zip(new.fp16_groups, new.fp32_groups):
            for pn, mn in zip(params, masters):
                assert torch.equal(mn.bfloat16(), pn), f"{where}: the bf16 weight is not the master rounded"
        for p in list(ref_model.parameters()) + list(new_model.parameters()):
            p.grad = None  # what the engine's zero_grad does after the step


def _check_against_deepspeed(rank: int, world: int, device: str = "cpu") -> None:
    for fused in (False, True):
        for make_grads in (_exact_grads, _random_grads):
            for chunk in (0, 100):  # 100 elements: the step in 4 chunks, the two 16x16 weights above it alone
                _against_deepspeed(rank, world, fused, make_grads, device, chunk)
            if fused:  # the AdamW kernel from bf16 gradients (no chunks)
                _against_deepspeed(rank, world, fused, make_grads, device, adamw_impl="fused")


def _check_tp2_norm(rank: int, world: int) -> None:
    """tp=2: the norm of the sharded gradients is the full model's, and the step updates each shard as the
    full model's fused step updates the whole (replicated parameters counted once, sharded ones fully)."""
    from neox.model.gpt import GPT, GPTConfig
    from neox.parallel import Topology, apply_tensor_parallel
    from neox.parallel.tensor import shard_dims, shard_state_dict

    topo = Topology.build(tp=2)
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16, vocab_size=128,
                    position="rotary", rotary_dims=8, mlp="swiglu", tied_embeddings=True)
    torch.manual_seed(0)
    full = GPT(cfg).bfloat16()
    tp = apply_tensor_parallel(copy.deepcopy(full), topo)
    ds_tp = apply_tensor_parallel(copy.deepcopy(full), topo)  # for DeepSpeed's own step
    assert any(getattr(p, "tensor_model_parallel", False) for p in tp.parameters())
    g = torch.Generator().manual_seed(3)  # the same full gradients on both ranks
    full_grads = {n: (torch.randn(p.shape, generator=g) * 0.5).bfloat16() for n, p in full.named_parameters()}
    shards = shard_state_dict(full_grads, shard_dims(full), topo.tp_rank, topo.tp_size)
    full_opt = _optimizer(full, fused=False, fused_step=True)  # (building it sets the grads to None)
    tp_opt = _optimizer(tp, fused=False, mpu=topo.mpu(), fused_step=True)
    for n, p in full.named_parameters():
        p.grad = full_grads[n].clone()
    ds_opt = _optimizer(ds_tp, fused=False, mpu=topo.mpu())
    for model in (tp, ds_tp):
        for n, p in model.named_parameters():
            p.grad = shards[n].clone()
    want = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in full_grads.values()])).item()
    assert want > 2 * CLIP, "clipping must be active for the update check to mean anything"
    assert tp_opt.step() is False and full_opt.step() is False
    assert math.isclose(tp_opt._global_grad_norm, want, rel_tol=1e-6), f"tp=2 norm {tp_opt._global_grad_norm} vs {want}"
    assert math.isclose(full_opt._global_grad_norm, want, rel_tol=1e-6), f"tp=1 norm {full_opt._global_grad_norm}"
    # DeepSpeed 0.19.8's unfused step takes the norm over gradient tensors, which carry no tensor-parallel
    # mark: it counts tensor rank 0's gradients only (here 54.6 for 76.7), and clips by that.
    ds_opt.step()
    assert ds_opt._global_grad_norm < 0.9 * want, f"DeepSpeed's tp=2 norm is now right: {ds_opt._global_grad_norm}"
    masters = {id(p): m for params, group in zip(tp_opt.fp16_groups, tp_opt.fp32_groups) for p, m in zip(params, group)}
    full_masters = {id(p): m for params, group in zip(full_opt.fp16_groups, full_opt.fp32_groups)
                    for p, m in zip(params, group)}
    want_masters = shard_state_dict({n: full_masters[id(p)] for n, p in full.named_parameters()}, shard_dims(full),
                                    topo.tp_rank, topo.tp_size)
    for n, p in tp.named_parameters():  # the clip factors may differ in the last bits (sums in another order)
        err = (masters[id(p)] - want_masters[n]).abs().max().item()
        assert err <= ULPS * EPS32 * want_masters[n].abs().max().item(), f"tp rank {topo.tp_rank}: {n} off by {err:.3g}"


def _check_engines(rank: int, world: int, out_dir: str) -> None:
    """engine.initialize installs the fused step on a bf16 ZeRO-0 engine only, and not with train.fused_step=false."""
    from neox.model.gpt import GPT, cross_entropy_loss
    from neox.train import engine as engine_lib, fused_step as fs
    from support.plans import cpu, plan_of

    tiny = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.seq_len=16", "train.micro_batch=2",
            "train.grad_accum=1", "data.embedded_vocab=257", f"run_dir={out_dir}"]
    for precision, zero, fused, installed in (("bf16", 0, True, True), ("fp32", 0, True, False), ("bf16", 1, True, False),
                                              ("bf16", 0, False, False)):
        _, plan = plan_of([*tiny, f"train.precision={precision}", f"parallelism.zero_stage={zero}",
                           f"train.fused_step={str(fused).lower()}"], cpu(world))
        engine, opt, _ = engine_lib.initialize(GPT(plan.model), plan, torch.device("cpu"))
        step = getattr(engine.optimizer.step, "__func__", None)
        assert (step is fs.fused_step) == installed, f"{precision} ZeRO-{zero}: fused step installed: {not installed}"
        if installed:  # and it trains: one step through the engine, weights moved, norm reported
            before = [p.detach().clone() for p in engine.module.parameters()]
            tokens = torch.randint(0, plan.model.vocab_size, (2, plan.model.seq_len + 1))
            loss = cross_entropy_loss(engine(tokens[:, :-1]), tokens[:, 1:])
            engine.backward(loss)
            engine.step()
            assert math.isfinite(engine.get_global_grad_norm()) and engine.get_global_grad_norm() > 0
            assert any(not torch.equal(p, b) for p, b in zip(engine.module.parameters(), before))
            assert opt.skip_events == 0


def _check_update_queued_before_the_norm_is_read(rank: int, world: int, device: str = "cpu") -> None:
    """With torch's fused AdamW the host reads the norm (its one sync) only after every AdamW kernel and
    weight copy is queued, so a GPU has the update to run while the host goes on; with a clip and with a
    skip the result is what DeepSpeed's step gives (the comparison above covers the values)."""
    model = _model(device)
    opt = _optimizer(model, fused=True, fused_step=True, chunk=100)  # several chunks: several AdamW calls
    events = []
    real_adamw, real_item, real_copy = torch._fused_adamw_, torch.Tensor.item, torch._foreach_copy_

    def adamw(*args, **kwargs):
        events.append("adamw")
        return real_adamw(*args, **kwargs)

    def item(t):
        events.append("read")
        return real_item(t)

    def copy(dst, src, *args, **kwargs):
        events.append("copy_weights" if dst and dst[0].dtype == torch.bfloat16 else "copy_grads")
        return real_copy(dst, src, *args, **kwargs)

    g = torch.Generator().manual_seed(5)
    for kind, size in (("clip", 8.0), ("inf", 1.0), ("nan", 1.0)):
        grads = _random_grads(model, g, size)
        if kind != "clip":
            grads[1].view(-1)[0] = INF if kind == "inf" else float("nan")
        for p, gr in zip(model.parameters(), grads):
            p.grad = gr.to(device)
        events.clear()
        torch._fused_adamw_, torch.Tensor.item, torch._foreach_copy_ = adamw, item, copy
        try:
            overflow = opt.step()
        finally:
            torch._fused_adamw_, torch.Tensor.item, torch._foreach_copy_ = real_adamw, real_item, real_copy
        assert overflow is (kind != "clip"), kind
        assert events.count("adamw") >= 4 and events.count("copy_weights") >= 4, events  # (one per chunk)
        assert events.count("read") == 1 and events[-1] == "read", f"{kind}: the host waited before the update: {events}"
        for p in model.parameters():
            p.grad = None


def _check_engine_steps_never_synchronize(rank: int, world: int, out_dir: str) -> None:
    """Training steps through neox's engine ask the accelerator for no device synchronization: DeepSpeed's
    throughput timer, on by default, synchronized in every forward and step() call after the second step."""
    from deepspeed.accelerator import get_accelerator

    from neox.model.gpt import GPT, cross_entropy_loss
    from neox.train import engine as engine_lib
    from support.plans import cpu, plan_of

    _, plan = plan_of(["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.seq_len=16",
                       "train.micro_batch=2", "train.grad_accum=2", "data.embedded_vocab=257", f"run_dir={out_dir}",
                       "train.precision=bf16"], cpu(world))
    engine, _, _ = engine_lib.initialize(GPT(plan.model), plan, torch.device("cpu"))
    accelerator = get_accelerator()
    calls = []
    real = accelerator.synchronize
    accelerator.synchronize = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        for _ in range(4 * plan.grad_accum):  # 4 optimizer steps: the timer synchronized from the 3rd on
            tokens = torch.randint(0, plan.model.vocab_size, (2, plan.model.seq_len + 1))
            engine.backward(cross_entropy_loss(engine(tokens[:, :-1]), tokens[:, 1:]))
            engine.step()
    finally:
        accelerator.synchronize = real
    assert engine.global_steps == 4 and not calls, f"{len(calls)} device synchronizations in 4 steps"


def _check_one_rank_data_parallel_skips_the_gradient_all_reduce(rank: int, world: int, out_dir: str) -> None:
    """dp = 1 (here tp = 2 over the two ranks) at ZeRO-0: no gradient all-reduce over the data-parallel group of
    one (DeepSpeed flattened, all-reduced and copied back every gradient); dp = 2 keeps it."""
    from neox.model.gpt import GPT, cross_entropy_loss
    from neox.train import engine as engine_lib
    from support.plans import cpu, plan_of

    tiny = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.seq_len=16", "train.micro_batch=2",
            "train.grad_accum=1", "data.embedded_vocab=257", "train.precision=bf16"]
    from neox.parallel import Topology

    for tp, reduces in ((2, False), (1, True)):
        _, plan = plan_of([*tiny, f"parallelism.tp={tp}", f"run_dir={out_dir}/tp{tp}"], cpu(world))
        mpu = Topology.build(tp=tp).mpu()  # (the model unsharded: only the groups matter)
        engine, _, _ = engine_lib.initialize(GPT(plan.model), plan, torch.device("cpu"), mpu=mpu)
        calls = []
        real = engine.allreduce_gradients
        engine.allreduce_gradients = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        tokens = torch.randint(0, plan.model.vocab_size, (2, plan.model.seq_len + 1))
        engine.backward(cross_entropy_loss(engine(tokens[:, :-1]), tokens[:, 1:]))
        engine.step()
        assert bool(calls) == reduces, f"tp {tp} (dp {plan.dp}): {len(calls)} gradient all-reduces"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Checks:
    checks = Checks(2, tmp_path_factory.mktemp("fused_step"))
    checks.add("against_deepspeed", _check_against_deepspeed)
    checks.add("tp2_norm", _check_tp2_norm)
    checks.add("engines", _check_engines, str(checks.dir("engines")))
    checks.add("queued", _check_update_queued_before_the_norm_is_read)
    checks.add("no_syncs", _check_engine_steps_never_synchronize, str(checks.dir("no_syncs")))
    checks.add("dp1", _check_one_rank_data_parallel_skips_the_gradient_all_reduce, str(checks.dir("dp1")))
    return checks.run(timeout=600, init="neox")


def test_matches_deepspeeds_step_bitwise_where_the_arithmetic_is_the_same(ranks) -> None:
    ranks.outcome("against_deepspeed")


def test_tp2_norm_is_the_full_models(ranks) -> None:
    ranks.outcome("tp2_norm")


def test_update_is_queued_before_the_host_reads_the_norm(ranks) -> None:
    ranks.outcome("queued")


def test_engine_steps_never_synchronize_the_device(ranks) -> None:
    ranks.outcome("no_syncs")


def test_one_rank_data_parallel_skips_the_gradient_all_reduce(ranks) -> None:
    ranks.outcome("dp1")


def test_engine_installs_it_for_bf16_zero0_only(ranks) -> None:
    ranks.outcome("engines")


@pytest.mark.slow  # two real 1-process bf16 runs (~25 s)
def test_resume_from_a_checkpoint_saved_under_it_is_bitwise(tmp_path) -> None:
    """A bf16 ZeRO-0 run (the fused step on CPU: unfused AdamW, clipping) saved at step 2 and resumed
    goes on exactly as the uninterrupted run: losses 3 and 4 and the final fp32 masters and moments."""
    import shutil

    from neox.checkpoint.files import atomic_write_text
    from neox.checkpoint.safe_load import safe_load
    from support.runs import launch, read_metrics, tiny, train_losses

    args = ["train.precision=bf16", "cluster.cpu_procs=1", "train.save_every=2", "train.keep_checkpoints=3",
            "train.log_every=1", "train.steps=4", "optim.grad_clip=0.05"]  # clipping active on every step
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch(tiny(*args, f"run_dir={whole}"))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    atomic_write_text(resumed / "checkpoints" / "latest", "step_00000002")
    shutil.copy(whole / "config.yaml", resumed / "config.yaml")
    out = launch(tiny(*args, f"run_dir={resumed}"))
    assert "step_00000002" in out.stdout + out.stderr
    a, b = train_losses(whole), train_losses(resumed)
    assert a[3] == b[3] and a[4] == b[4], f"whole {a}, resumed {b}"
    norms = [r["train/grad_norm"] for r in read_metrics(whole) if "train/grad_norm" in r]
    assert len(norms) == 4 and all(n > 0.05 for n in norms), f"clipping not active: {norms}"
    sa, sb = (safe_load(run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt")["optimizer"]
              for run in (whole, resumed))
    for x, y in zip(sum(sa["fp32_groups"], []), sum(sb["fp32_groups"], [])):
        assert torch.equal(x, y)
    inner_a, inner_b = sa["optimizer_state_dict"]["state"], sb["optimizer_state_dict"]["state"]
    assert inner_a.keys() == inner_b.keys() and inner_a
    for k in inner_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(inner_a[k][name], inner_b[k][name]), f"state {k} {name}"


def test_non_finite_steps_under_it_are_skipped_counted_and_stop_the_run(tmp_path) -> None:
    """The trainer's guard (train.max_nonfinite_steps) sees the fused step's skips: step 3 alone, then
    5 and 6 in a row stop the run. (DeepSpeed's own step counted them in engine.skipped_steps only.)"""
    from support.runs import TINY, workers

    run = tmp_path / "nan"
    proc = workers([*TINY, "train.precision=bf16", "cluster.cpu_procs=1", "train.steps=8",
                    "train.save_every=100", "train.max_nonfinite_steps=2", f"run_dir={run}"],
                   env={"NEOX_FAULT_NAN_STEPS": "3,5,6"})
    assert proc.returncode != 0
    assert "step 3: non-finite loss or gradients, step skipped (1 in a row, 1 in all)" in proc.stdout, \
        proc.stdout[-2000:]
    assert "step 6: non-finite loss or gradients, step skipped (2 in a row, 3 in all)" in proc.stdout
    assert "2 non-finite steps in a row" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_matches_deepspeeds_step_on_cuda() -> None:
    """The same comparison on the GPU: torch's CUDA fused AdamW with grad_scale, CUDA foreach norm and copies."""
    from support.workers import run_workers

    run_workers(_check_against_deepspeed, 1, "cuda", timeout=300, init="neox")  # nccl: not Checks' CPU flag


def test_chunks_cover_every_tensor_in_order_within_the_limit() -> None:
    from neox.train.fused_step import chunks

    assert chunks([3, 4, 2, 9, 1, 1], 6) == [range(0, 1), range(1, 3), range(3, 4), range(4, 6)]
    assert chunks([], 6) == [] and chunks([7], 6) == [range(0, 1)]
    sizes = [5, 1, 1, 1, 8, 2, 2, 2]
    parts = chunks(sizes, 4)
    assert [i for r in parts for i in r] == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in r) <= 4 or len(r) == 1 for r in parts)
