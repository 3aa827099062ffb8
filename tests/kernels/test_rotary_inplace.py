"""The in-place rotary on the attention's qkv buffer (neox.kernels.rotary_qkv_), and the attention built on it.

Kernel: the fused op (in place, CPU in CI, CUDA with -m gpu) against `rotary_qkv_reference` on an fp32 copy of
the same values, forward and backward through the split the attention does; v and the pass-through channels
must come out bit-identical (the kernel never touches them), and the reference itself must equal the
per-tensor `rotary_reference` of q and k (the formulation the model used before). Model: the attention as it was
(q copied out, k and v selected, q and k rotated out of place) is written below as the reference; the model's
logits, loss and every gradient must match it bitwise in fp32 (the arithmetic is unchanged), for MHA and GQA,
NeoX and GPT-J layouts, partial and full rotary, and a tensor-parallel shard.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from neox import kernels as K
from neox.errors import KernelError
from neox.kernels import _backend
from neox.model import gpt
from neox.model.gpt import GPT, GPTConfig, cross_entropy_loss
from support.kernel_checks import TOL, graph_names, rel_error, rotary_angles





class _LinearLike(torch.autograd.Function):
    """A custom autograd node whose output is a view of a tensor made inside it, as tensor parallelism's linear
    (F.linear with a bias on [b, s, d] is a view of its [b * s, n] matmul)."""

    @staticmethod
    def forward(ctx, x):
        return (x.reshape(-1, x.shape[-1]) * 1).view(x.shape)

    @staticmethod
    def backward(ctx, g):
        return g


def _producer(leaf: torch.Tensor, how: str) -> torch.Tensor:
    """A non-leaf qkv holding the leaf's values, made the way `how` says (the attention's linear output kinds)."""
    b, s, g, n, hd = leaf.shape
    if how == "view":  # a 5-D view of a 2-D buffer, as nn.Linear's output viewed by the attention
        return (leaf.reshape(b * s, -1) * 1).view(b, s, g, n, hd)
    if how == "custom":
        return _LinearLike.apply(leaf.reshape(b, s, -1)).view(b, s, g, n, hd)
    return leaf * 1


def _run_split(qkv_leaf: torch.Tensor, fn, grads: list[torch.Tensor], how: str):
    """fn on a non-leaf qkv made from the leaf, then the attention's split; returns (out, graph names of q)."""
    out = fn(_producer(qkv_leaf, how))
    q, k, v = out.split((qkv_leaf.shape[3] - 2, 1, 1), dim=3)
    torch.autograd.backward((q, k, v), grads)
    return out, graph_names(q)


# (b, s, groups, q_per_kv, hd, rotary_dims): odd head sizes (CUDA: scalar form), whole 16-byte packs (v3):
# Pythia's quarter, full, 64-wide heads, GQA with 4 q heads per group; a rotary part that is not whole packs
# for 16-bit types; a long sequence.
SHAPES = [(2, 3, 3, 1, 10, 10), (3, 7, 2, 2, 18, 8), (2, 5, 4, 1, 128, 32), (1, 9, 2, 1, 128, 128),
          (2, 6, 3, 4, 64, 64), (2, 5, 2, 3, 128, 120), (1, 4100, 1, 2, 24, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("how", ["view", "custom", "plain"])
@pytest.mark.parametrize("b,s,g,per,hd,rd", SHAPES)
def test_rotary_qkv_fused_matches_reference(device, seed, dtype, interleaved, how, b, s, g, per, hd, rd):
    c, sn = rotary_angles(s, rd)
    c, sn = c.to(device), sn.to(device)
    x = torch.randn(b, s, g, per + 2, hd).to(device, dtype)
    grads = [torch.randn(b, s, g, m, hd, device=device).to(dtype) for m in (per, 1, 1)]
    leaf = x.clone().requires_grad_()
    ref_leaf = x.float().requires_grad_()
    out, names = _run_split(leaf, lambda t: K.rotary_qkv_(t, c, sn, rd, interleaved, per, impl="fused"), grads, how)
    ref, _ = _run_split(ref_leaf, lambda t: K.rotary_qkv_reference(t, c, sn, rd, interleaved, per),
                        [gr.float() for gr in grads], how)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_error(out, ref) <= TOL[dtype], f"forward (seed {seed})"
    assert rel_error(leaf.grad, ref_leaf.grad) <= TOL[dtype], f"backward (seed {seed})"
    # untouched: v, and every channel past rotary_dims of q and k, forward and backward (bitwise)
    assert torch.equal(out[:, :, :, per + 1], x[:, :, :, per + 1])
    assert torch.equal(out[..., rd:], x[..., rd:])
    full_grad = torch.cat(grads, dim=3)
    assert torch.equal(leaf.grad[:, :, :, per + 1], full_grad[:, :, :, per + 1])
    assert torch.equal(leaf.grad[..., rd:], full_grad[..., rd:])
    # one node of its own, no CopySlices (which would copy the whole gradient twice)
    assert "CopySlices" not in names and "_RotaryQKVFnBackward" in names


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("b,s,g,per,hd,rd", SHAPES[:3])
def test_rotary_qkv_reference_is_the_per_tensor_rotary(seed, interleaved, b, s, g, per, hd, rd):
    """The qkv reference equals rotating a copy of the q heads and of k with `rotary_reference`, v as is."""
    x = torch.randn(b, s, g, per + 2, hd)
    c, sn = rotary_angles(s, rd)
    got = K.rotary_qkv_reference(x, c, sn, rd, interleaved, per)
    q = K.rotary_reference(x[:, :, :, :per].reshape(b, s, g * per, hd), c, sn, rd, interleaved)
    k = K.rotary_reference(x[:, :, :, per], c, sn, rd, interleaved)
    assert torch.equal(got[:, :, :, :per].reshape(b, s, g * per, hd), q)
    assert torch.equal(got[:, :, :, per], k) and torch.equal(got[:, :, :, -1], x[:, :, :, -1])


def test_rotary_qkv_sum_gradient_and_plain_tensor(device, seed):
    """A non-contiguous incoming gradient (sum's expanded ones) and a qkv that is not a view of anything."""
    b, s, g, per, hd, rd = 2, 5, 2, 2, 16, 8
    c, sn = (t.to(device) for t in rotary_angles(s, rd))
    x = torch.randn(b, s, g, per + 2, hd, device=device)
    leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = K.rotary_qkv_(leaf * 1, c, sn, rd, False, per, impl="fused")
    (out * torch.arange(hd, device=device)).sum().backward()
    ref = K.rotary_qkv_reference(ref_leaf, c, sn, rd, False, per)
    (ref * torch.arange(hd, device=device)).sum().backward()
    assert rel_error(out, ref) <= 1e-6 and rel_error(leaf.grad, ref_leaf.grad) <= 1e-6


def test_rotary_qkv_is_in_place_and_falls_back(monkeypatch):
    x = torch.randn(1, 3, 2, 3, 8)
    c, sn = rotary_angles(3, 4)
    buf = x.clone()
    assert K.rotary_qkv_(buf, c, sn, 4, impl="fused").data_ptr() == buf.data_ptr()
    assert torch.equal(buf, K.rotary_qkv_reference(x, c, sn, 4))  # fp32 on CPU: the same arithmetic
    y = torch.randn(3, 2, 2, 3, 8)
    strided = y.transpose(0, 1)  # [2, 3, 2, 3, 8], not contiguous: the reference, with a one-time warning
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="not contiguous"):
        got = K.rotary_qkv_(strided, c, sn, 4, impl="fused")
    assert torch.equal(got, K.rotary_qkv_reference(strided, c, sn, 4)) and torch.equal(strided, y.transpose(0, 1))
    with pytest.raises(KernelError, match="q_per_kv"):
        K.rotary_qkv_(x, c, sn, 4, q_per_kv=2)
    with pytest.raises(KernelError, match="rotary_dims"):
        K.rotary_qkv_(x, c, sn, 10)


def test_rotary_qkv_saved_input_fails_loudly():
    """An op that saved qkv for its backward must not silently see the rotated values: autograd raises."""
    x = torch.randn(1, 3, 2, 3, 8, requires_grad=True)
    c, sn = rotary_angles(3, 4)
    qkv = x * 1
    saved = qkv * x  # saves qkv (and x) for its backward
    out = K.rotary_qkv_(qkv, c, sn, 4, impl="fused")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (saved.sum() + out.sum()).backward()


# ------------------------------------------------------------------------------ CUDA kernel versions (v3, v6)
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pytest -m gpu)")]


def _cuda_kernel_for(dtype: torch.dtype, hd: int, rd: int, interleaved: bool) -> int:
    """The kernel csrc/rotary/rotary.cu picks (its rule, restated): v3's 16-byte packs (head, rotated part and
    angle rows whole packs) and a rotated part of L = 1..32 lanes (L: packs of the first half for NeoX, of all of
    it interleaved) -> 6; v3's packs alone -> 3; else v3's scalar form -> 1."""
    v = 16 // torch.tensor([], dtype=dtype).element_size()
    rot = rd if interleaved else rd // 2
    packs = hd % v == 0 and rot % v == 0 and (rd // 2) % 4 == 0
    return 6 if packs and 1 <= rot // v <= 32 else 3 if packs else 1


# (b, s, groups, q_per_kv, hd, rotary_dims): Pythia's 25% and full rotary (16 heads: at 25% one task is a token),
# GQA (2 and 4 q heads per group, 3 with partial rotary), odd head counts (5, 7, 25 heads: idle rows in a token's
# last task), lanes that do not divide a warp (R = 48: 3 or 6 lanes), one lane per row (R = 16, bf16 NeoX), a warp of
# lanes (hd 256: fp32 NeoX, bf16 interleaved) and more (fp32 interleaved: v3), heads that are not whole packs (v3's
# scalar form), and batch 2 of a long sequence (the token's position from the task).
VERSION_SHAPES = [(2, 33, 16, 1, 128, 32), (1, 17, 4, 1, 128, 128), (2, 9, 2, 4, 64, 64), (2, 5, 3, 3, 128, 32),
                  (2, 7, 5, 1, 128, 32), (1, 6, 25, 1, 128, 32), (1, 11, 7, 1, 64, 48), (2, 5, 3, 2, 64, 16),
                  (1, 3, 2, 1, 256, 256), (2, 3, 3, 1, 10, 10), (2, 2100, 2, 1, 64, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("b,s,g,per,hd,rd", VERSION_SHAPES)
@pytest.mark.parametrize("_", [pytest.param(None, marks=GPU, id="cuda")])
def test_rotary_qkv_versions_match_reference_and_each_other(_, seed, dtype, interleaved, b, s, g, per, hd, rd):
    """v3, v6 and v7 forced side by side: each within rounding of the fp32 reference, forward and backward, with v
    and the pass-through channels untouched, and bitwise equal to each other (the same rotate arithmetic); version
    0 runs the kernel the rule names; a forced 6 or 7 that does not apply (v7 applies where v6 does) raises
    KernelError and leaves qkv as it was."""
    c, sn = (t.cuda() for t in rotary_angles(s, rd))
    x = torch.randn(b, s, g, per + 2, hd, device="cuda").to(dtype)
    grads = [torch.randn(b, s, g, m, hd, device="cuda").to(dtype) for m in (per, 1, 1)]
    ref_leaf = x.detach().float().clone().requires_grad_()  # a copy: in fp32, x.float() is x itself
    ref, _ = _run_split(ref_leaf, lambda t: K.rotary_qkv_reference(t, c, sn, rd, interleaved, per),
                        [gr.float() for gr in grads], "view")
    kernel = _cuda_kernel_for(dtype, hd, rd, interleaved)
    full_grad = torch.cat(grads, dim=3)
    results = {}
    for version in (3, 6, 7, 0):
        if version in (6, 7) and kernel != 6:
            buf = x.clone()
            with pytest.raises(KernelError, match=f"version {version} does not take"):
                K.rotary_qkv_(buf, c, sn, rd, interleaved, per, impl="fused", version=version)
            assert torch.equal(buf, x)
            continue
        leaf = x.clone().requires_grad_()
        out, _ = _run_split(leaf, lambda t: K.rotary_qkv_(t, c, sn, rd, interleaved, per, impl="fused",
                                                          version=version), grads, "view")
        where = f"version {version} (seed {seed})"
        assert rel_error(out, ref) <= TOL[dtype], f"forward, {where}"
        assert rel_error(leaf.grad, ref_leaf.grad) <= TOL[dtype], f"backward, {where}"
        assert torch.equal(out[:, :, :, per + 1], x[:, :, :, per + 1]) and torch.equal(out[..., rd:], x[..., rd:])
        assert torch.equal(leaf.grad[:, :, :, per + 1], full_grad[:, :, :, per + 1])
        assert torch.equal(leaf.grad[..., rd:], full_grad[..., rd:])
        results[version] = (out.detach(), leaf.grad)
    for version, (out, grad) in results.items():
        assert torch.equal(out, results[3][0]) and torch.equal(grad, results[3][1]), f"version {version} vs 3"
    ext = _backend.extension("cuda")[0]
    # version 0: v3 (or its scalar form) where v6 applies too: v6 and v7 measured slower on the H200 (session 20)
    assert ext.rotary_qkv(x.clone(), c, sn, rd, interleaved, False) == (3 if kernel == 6 else kernel)
    assert ext.rotary_qkv(x.clone(), c, sn, rd, interleaved, True, 3) == (3 if kernel == 6 else kernel)
    assert ext.rotary_qkv(x.clone(), c, sn, rd, interleaved, True, 7) == (7 if kernel == 6 else -1)


@pytest.mark.parametrize("_", [pytest.param(None, marks=GPU, id="cuda")])
def test_rotary_qkv_forced_v6_backward_takes_an_unaligned_gradient(_, seed):
    """Forced v6 in the forward; the gradient arrives 2 bytes past a 16-byte boundary, which v6 refuses (-1,
    nothing written): the backward runs the kernel's pick instead, and the gradient is still right."""
    b, s, g, per, hd, rd = 2, 9, 4, 1, 128, 32
    c, sn = (t.cuda() for t in rotary_angles(s, rd))
    x = torch.randn(b, s, g, per + 2, hd, device="cuda").to(torch.bfloat16)
    ext = _backend.extension("cuda")[0]
    store = torch.randn(x.numel() + 1, device="cuda").to(torch.bfloat16)
    grad = store[1:].view(x.shape)  # contiguous, unaligned
    before = grad.clone()
    assert ext.rotary_qkv(grad, c, sn, rd, False, True, 6) == -1 and torch.equal(grad, before)
    leaf, ref_leaf = x.clone().requires_grad_(), x.float().requires_grad_()
    out = K.rotary_qkv_(leaf * 1, c, sn, rd, False, per, impl="fused", version=6)
    out.backward(grad)
    ref = K.rotary_qkv_reference(ref_leaf * 1, c, sn, rd, False, per)
    ref.backward(before.float())
    assert rel_error(out, ref) <= TOL[torch.bfloat16] and rel_error(leaf.grad, ref_leaf.grad) <= TOL[torch.bfloat16]


def test_rotary_qkv_version_is_checked():
    """version picks a CUDA kernel: on the CPU, or a number that is no kernel, KernelError (nothing rotated)."""
    x = torch.randn(1, 3, 2, 3, 8)
    c, sn = rotary_angles(3, 4)
    buf = x.clone()
    for version in (6, 3, 7, 4):
        with pytest.raises(KernelError, match=f"version={version} must be 0"):
            K.rotary_qkv_(buf, c, sn, 4, impl="fused", version=version)
    assert torch.equal(buf, x)
    ext = _backend.extension("cpu")[0]
    assert ext.rotary_qkv(buf, c, sn, 4, False, False) == 0  # the CPU's one kernel
    assert torch.equal(buf, K.rotary_qkv_reference(x, c, sn, 4))


# ---------------------------------------------------------------------------------------------- the model
def _old_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """The model's rotation before the in-place op: one tensor of heads [b, s, h, hd], out of place."""
    s, impl = x.shape[1], cfg.impl("rotary")
    if impl != "reference":
        return K.rotary(x, cos[:s], sin[:s], cfg.rotary_dims, interleaved=cfg.rotary_interleaved, impl=impl)
    return gpt.rotate(x, cos[:s, None, :], sin[:s, None, :], cfg.rotary_dims, cfg.rotary_interleaved)


class _OldAttention(gpt.CausalSelfAttention):
    """The attention as it was: q copied out of the qkv buffer, k and v selected from it (three slices, whose
    backward each fill a zero buffer of the qkv's size), q and k rotated out of place."""

    def heads(self, x: torch.Tensor):
        b, s, _ = x.shape
        hd = self.cfg.head_dim
        qkv = self.qkv(x).view(b, s, -1, self.q_per_kv + 2, hd)
        groups = qkv.shape[2]
        q = qkv[:, :, :, : self.q_per_kv].reshape(b, s, groups * self.q_per_kv, hd)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        if self.cfg.position == "rotary":
            q, k = _old_rotary(q, self.cos, self.sin, self.cfg), _old_rotary(k, self.cos, self.sin, self.cfg)
        return q, k, v


BASE = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_ff=96, seq_len=16, vocab_size=96)
MODELS = {
    "mha-neox-quarter": GPTConfig(**BASE, rotary_dims=4, parallel_residual=True),  # Pythia's layout
    "mha-gptj-full": GPTConfig(**BASE, rotary_dims=16, rotary_interleaved=True),
    "gqa-neox-full": GPTConfig(**{**BASE, "n_kv_heads": 2}, rotary_dims=16, mlp="swiglu", norm="rmsnorm"),
    "gqa4-gptj-half": GPTConfig(**{**BASE, "n_heads": 8, "n_kv_heads": 2, "d_model": 128}, rotary_dims=8,
                                rotary_interleaved=True),
    "mqa-neox-half": GPTConfig(**{**BASE, "n_kv_heads": 1}, rotary_dims=8),
    "learned-mha": GPTConfig(**BASE, position="learned"),
    "alibi-gqa": GPTConfig(**{**BASE, "n_kv_heads": 2}, position="alibi"),
}


def _tp_shard(model: GPT, rank: int, size: int) -> None:
    """What tensor parallelism leaves a rank: the rows of qkv (whole kv groups) and the columns of proj of its
    heads, as plain linears (no communication: old and new attention get the same shard)."""
    for blk in model.blocks:
        a = blk.attn
        qkv = nn.Linear(a.qkv.in_features, a.qkv.out_features // size, bias=a.qkv.bias is not None)
        proj = nn.Linear(a.proj.in_features // size, a.proj.out_features, bias=a.proj.bias is not None)
        with torch.no_grad():
            qkv.weight.copy_(a.qkv.weight.chunk(size, 0)[rank])
            proj.weight.copy_(a.proj.weight.chunk(size, 1)[rank])
            if a.qkv.bias is not None:
                qkv.bias.copy_(a.qkv.bias.chunk(size, 0)[rank])
                proj.bias.copy_(a.proj.bias)
        a.qkv, a.proj = qkv, proj
        a.head_offset = rank * a.cfg.n_heads // size


def _step(cfg: GPTConfig, state: dict, tokens: torch.Tensor, device: str, old: bool, tp_rank: int):
    model = GPT(cfg)
    model.load_state_dict(state)
    if tp_rank >= 0:
        _tp_shard(model, tp_rank, 2)
    if old:
        for blk in model.blocks:
            blk.attn.__class__ = _OldAttention
    model.to(device)
    logits = model(tokens.to(device))
    loss = cross_entropy_loss(logits, tokens.to(device))
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}, graph_names(loss)


@pytest.mark.parametrize("tp_rank", [-1, 1])
@pytest.mark.parametrize("kernels", ["reference", "fused"])
@pytest.mark.parametrize("name", list(MODELS))
def test_attention_matches_the_old_formulation(device, name, kernels, tp_rank):
    """fp32, same weights and tokens: logits, loss and every gradient bitwise equal to the old attention's
    (on CUDA within 1e-5, as test_model_kernels: SDPA may take another kernel for a strided q)."""
    cfg = dataclasses.replace(MODELS[name], kernels=kernels)
    if tp_rank >= 0 and cfg.n_kv_heads % 2:
        pytest.skip("one kv group cannot be split over 2 ranks")
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    new = _step(cfg, state, tokens, device, False, tp_rank)
    old = _step(cfg, state, tokens, device, True, tp_rank)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a, b) if device == "cpu" else rel_error(a, b) <= 1e-5

    assert same(new[0], old[0]) and same(new[1], old[1]), f"{name}: logits/loss differ"
    for n, g in old[2].items():
        assert same(new[2][n], g), f"{name}: grad {n} differs by {rel_error(new[2][n], g):.2e}"
    # the backward of q, k, v: one concatenation per layer, no zero-filled select/slice buffers, no CopySlices
    names = new[3]
    split = "_SplitQKVFnBackward" if kernels == "fused" else "SplitWithSizesBackward0"  # fused: one kernel
    assert names.count(split) == cfg.n_layers, names
    assert not {"SelectBackward0", "CopySlices"} & set(names), names
    assert "SelectBackward0" in old[3]  # the old formulation had them: this test tells the two apart


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_mha_q_is_a_view_of_the_rotated_buffer(kernels):
    """MHA: q, k, v are views of one buffer (fused: the linear's own output, rotated in place); GQA: q a copy."""
    for name, per in (("mha-neox-quarter", 1), ("gqa-neox-full", 2)):
        cfg = dataclasses.replace(MODELS[name], kernels=kernels)
        attn = gpt.CausalSelfAttention(cfg)
        written = []
        attn.qkv.register_forward_hook(lambda m, i, out: written.append(out.untyped_storage().data_ptr()))
        q, k, v = attn.heads(torch.randn(2, 5, cfg.d_model, requires_grad=True))
        ptr = v.untyped_storage().data_ptr()
        assert k.untyped_storage().data_ptr() == ptr
        assert (q.untyped_storage().data_ptr() == ptr) == (per == 1)
        assert (ptr == written[0]) == (kernels == "fused")  # the reference returns a new buffer


def test_no_grad_and_inference_mode_give_the_training_forward():
    """Evaluation (no_grad) and generation-style inference_mode run the same in-place op: same logits."""
    cfg = dataclasses.replace(MODELS["mha-neox-quarter"], kernels="fused")
    torch.manual_seed(0)
    model, tokens = GPT(cfg), torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    logits = model(tokens)
    with torch.no_grad():
        assert torch.equal(model(tokens), logits)
    with torch.inference_mode():
        assert torch.equal(model(tokens), logits)
