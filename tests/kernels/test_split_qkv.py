"""neox.kernels.split_qkv: the attention's qkv buffer rotated in place and split into q, k, v, with a backward of
one kernel (gather dq, dk, dv through their strides into a contiguous dqkv, rotate q and k back).

Against the reference (`split_qkv_reference`: rotary_qkv_reference + split, fp32) within rounding, and bitwise
against the fused path it replaces: `rotary_qkv_` + split, whose backward is autograd's concatenation followed by
the inverse rotation in place (written out below as `_todays_dqkv`). Incoming gradients come in the layouts the
attention gives (contiguous, SDPA's transposed [b, h, s, hd], rows padded or off by one element, which CUDA
takes in its scalar form) or not at all (an output unused: None, read as zeros). CPU in CI, CUDA with -m gpu.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from neox import kernels as K
from neox.errors import KernelError
from neox.kernels import _backend
from neox.model import gpt
from neox.model.activation_checkpointing import checkpointed
from neox.model.gpt import GPT, GPTConfig, cross_entropy_loss
from support.kernel_checks import TOL, graph_names, rel_error, rotary_angles


# (b, s, groups, q_per_kv, hd, rotary_dims, interleaved)
CASES = [
    (2, 5, 3, 1, 32, 8, False),  # MHA, Pythia's quarter
    (2, 5, 2, 2, 32, 32, False),  # GQA, full
    (2, 4, 2, 1, 32, 16, True),  # GPT-J layout, half
    (2, 5, 2, 2, 32, 0, False),  # no rotation (learned or ALiBi positions): the pack alone
    (1, 3, 2, 1, 10, 6, False),  # odd head (CUDA: scalar form)
    (2, 3, 16, 2, 128, 32, False),  # Pythia's head; CUDA: 896 slots per token, two passes of its block
]
CASE_IDS = [f"b{c[0]}s{c[1]}g{c[2]}p{c[3]}hd{c[4]}r{c[5]}{'i' if c[6] else ''}" for c in CASES]
LAYOUTS = ["contiguous", "sdpa", "padded", "mixed", "no-k", "no-q-v"]


def _angles(s: int, rd: int):
    return rotary_angles(s, rd) if rd else (None, None)


def _grads(layout: str, b: int, s: int, g: int, per: int, hd: int, dtype, device) -> list:
    """dq [b, s, g, per, hd], dk, dv [b, s, g, hd] in `layout` (None: that output is unused)."""
    shapes = [(b, s, g, per, hd), (b, s, g, hd), (b, s, g, hd)]
    if layout == "sdpa":  # SDPA's grads are [b, heads, s, hd]: transposed back to [b, s, heads, hd]
        return [torch.randn(b, g * per, s, hd, device=device).to(dtype).transpose(1, 2).view(shapes[0]),
                *(torch.randn(b, g, s, hd, device=device).to(dtype).transpose(1, 2) for _ in range(2))]
    if layout == "padded":  # rows one element longer, starting one element in: no 16-byte packs
        return [torch.randn(*sh[:-1], hd + 1, device=device).to(dtype)[..., 1:] for sh in shapes]
    if layout == "mixed":  # each its own: q padded, k transposed, v contiguous
        return [_grads("padded", b, s, g, per, hd, dtype, device)[0],
                _grads("sdpa", b, s, g, per, hd, dtype, device)[1], torch.randn(shapes[2], device=device).to(dtype)]
    grads = [torch.randn(sh, device=device).to(dtype) for sh in shapes]
    if layout == "no-k":
        grads[1] = None
    if layout == "no-q-v":
        grads[0] = grads[2] = None
    return grads


def _backward(outs, grads) -> None:
    used = [(o, g) for o, g in zip(outs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])


def _todays_dqkv(grads, x: torch.Tensor, c, sn, rd: int, interleaved: bool) -> torch.Tensor:
    """The gradient today's fused path gives qkv: autograd's split backward (zeros for a None grad, then one
    concatenation), then `rotary_qkv_`'s backward (the inverse rotation, in place, by the same device's kernel)."""
    b, s, g, n, hd = x.shape
    full = [gr if gr is not None else torch.zeros(sh, dtype=x.dtype, device=x.device)
            for gr, sh in zip(grads, [(b, s, g, n - 2, hd), (b, s, g, hd), (b, s, g, hd)])]
    dqkv = torch.cat((full[0], full[1].unsqueeze(3), full[2].unsqueeze(3)), dim=3)
    if rd:
        ext = _backend.extension(x.device.type)[0]
        ext.rotary_qkv(dqkv, c.to(x.device), sn.to(x.device), rd, interleaved, True)
    return dqkv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("b,s,g,per,hd,rd,interleaved", CASES, ids=CASE_IDS)
def test_split_qkv_fused_matches_reference_and_todays_path(device, seed, dtype, layout, b, s, g, per, hd, rd,
                                                           interleaved):
    c, sn = _angles(s, rd)
    cd, snd = (None, None) if not rd else (c.to(device), sn.to(device))
    x = torch.randn(b, s, g, per + 2, hd).to(device, dtype)
    grads = _grads(layout, b, s, g, per, hd, dtype, device)
    leaf, ref_leaf = x.clone().requires_grad_(), x.float().clone().requires_grad_()
    outs = K.split_qkv(leaf * 1, cd, snd, rd, interleaved, per, impl="fused")
    ref = K.split_qkv_reference(ref_leaf * 1, cd, snd, rd, interleaved, per)
    assert [o.shape for o in outs] == [(b, s, g, per, hd), (b, s, g, hd), (b, s, g, hd)]
    for got, want in zip(outs, ref):
        assert got.dtype == dtype and rel_error(got, want) <= TOL[dtype], f"forward (seed {seed})"
    # q, k, v are views of one buffer (the forward copies nothing)
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 1
    _backward(outs, grads)
    _backward(ref, [None if gr is None else gr.float() for gr in grads])
    assert leaf.grad.is_contiguous() and leaf.grad.shape == x.shape
    assert rel_error(leaf.grad, ref_leaf.grad) <= TOL[dtype], f"backward (seed {seed})"
    # bitwise: today's fused path (concatenation, then the inverse rotation in place), v and pass-through included
    assert torch.equal(leaf.grad, _todays_dqkv(grads, x, c, sn, rd, interleaved)), f"not bitwise (seed {seed})"
    # the forward, bitwise: rotary_qkv_ in place, then the split
    today = K.rotary_qkv_(x.clone(), cd, snd, rd, interleaved, per, impl="fused") if rd else x
    assert torch.equal(outs[0], today[:, :, :, :per]) and torch.equal(outs[1], today[:, :, :, per])
    assert torch.equal(outs[2], x[:, :, :, per + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,s,g,per,hd,rd,interleaved", [CASES[0], CASES[1], CASES[3], CASES[5]],
                         ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[3], CASE_IDS[5]])
def test_split_qkv_under_sdpa_is_bitwise_todays_path(device, seed, dtype, b, s, g, per, hd, rd, interleaved):
    """q, k, v through the attention's reshape, transpose and a real SDPA (on CUDA in bf16: its kernels' own
    gradient layouts): the gradient qkv gets is bitwise today's formula applied to the grads SDPA delivered,
    and the forward (the tensors SDPA reads) is bitwise today's."""
    c, sn = _angles(s, rd)
    cd, snd = (None, None) if not rd else (c.to(device), sn.to(device))
    x = torch.randn(b, s, g, per + 2, hd).to(device, dtype)
    w = torch.randn(b, g * per, s, hd, device=device)
    leaf = x.clone().requires_grad_()
    q, k, v = K.split_qkv(leaf * 1, cd, snd, rd, interleaved, per, impl="fused")
    seen: list = [None, None, None]
    for i, t in enumerate((q, k, v)):
        t.register_hook(lambda gr, i=i: seen.__setitem__(i, gr))
    qh = q.reshape(b, s, g * per, hd).transpose(1, 2)
    y = F.scaled_dot_product_attention(qh, k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=per > 1)
    (y.float() * w).sum().backward()
    assert torch.equal(leaf.grad, _todays_dqkv(seen, x, c, sn, rd, interleaved)), f"seed {seed}, layouts " + str(
        [(tuple(t.stride()), t.data_ptr() % 16) for t in seen])
    today = K.rotary_qkv_(x.clone(), cd, snd, rd, interleaved, per, impl="fused") if rd else x
    assert torch.equal(qh, today[:, :, :, :per].reshape(b, s, g * per, hd).transpose(1, 2))


class _LinearLike(torch.autograd.Function):
    """A custom node whose output is a view of a tensor made inside it, as tensor parallelism's linear."""

    @staticmethod
    def forward(ctx, x):
        return (x.reshape(-1, x.shape[-1]) * 1).view(x.shape)

    @staticmethod
    def backward(ctx, gr):
        return gr


@pytest.mark.parametrize("rd", [8, 0])
@pytest.mark.parametrize("how", ["linear-view", "custom-function", "checkpointed"])
def test_split_qkv_under_autograd_producers_and_checkpointing(device, seed, how, rd):
    """qkv as the attention gets it: a view of the linear's 2-D output, a view of a custom Function's output
    (tensor parallelism), or recomputed by activation checkpointing: same values and gradients as a plain qkv,
    one node of our own in the graph and no CopySlices."""
    b, s, g, per, hd = 2, 5, 2, 2, 16
    c, sn = (t.to(device) if t is not None else None for t in _angles(s, rd))
    x = torch.randn(b, s, g * (per + 2) * hd, device=device)
    w = torch.randn(b, s, g * per * hd + 2 * g * hd, device=device)

    def attention_inputs(inp: torch.Tensor) -> torch.Tensor:
        if how == "custom-function":
            qkv = _LinearLike.apply(inp).view(b, s, g, per + 2, hd)
        else:
            qkv = (inp.reshape(b * s, -1) * 1).view(b, s, g, per + 2, hd)
        q, k, v = K.split_qkv(qkv, c, sn, rd, False, per, impl="fused")
        return torch.cat((q.reshape(b, s, -1), k.reshape(b, s, -1), v.reshape(b, s, -1)), dim=-1) * w

    leaf, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = checkpointed(attention_inputs, leaf) if how == "checkpointed" else attention_inputs(leaf)
    out.sum().backward()
    ref = K.split_qkv_reference(plain.view(b, s, g, per + 2, hd), c, sn, rd, False, per)
    ref_out = torch.cat([t.reshape(b, s, -1) for t in ref], dim=-1) * w
    ref_out.sum().backward()
    assert rel_error(out, ref_out) <= 1e-6 and rel_error(leaf.grad, plain.grad) <= 1e-6, f"seed {seed}"
    if how != "checkpointed":  # (the checkpointed graph holds the recompute, not the op)
        names = graph_names(out)
        assert "_SplitQKVFnBackward" in names and "CopySlices" not in names, names


def test_split_qkv_saved_input_fails_loudly():
    """As rotary_qkv_: an op that saved qkv for its backward must not silently see the rotated values."""
    x = torch.randn(1, 3, 2, 3, 8, requires_grad=True)
    c, sn = _angles(3, 4)
    qkv = x * 1
    saved = qkv * x
    q, k, v = K.split_qkv(qkv, c, sn, 4, impl="fused")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (saved.sum() + q.sum() + k.sum()).backward()


def test_split_qkv_falls_back_and_refuses(monkeypatch):
    x = torch.randn(3, 2, 2, 3, 8).transpose(0, 1)  # not contiguous: the rotation in place cannot take it
    c, sn = _angles(3, 4)
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="not contiguous"):
        got = K.split_qkv(x, c, sn, 4, impl="fused")
    for a, r in zip(got, K.split_qkv_reference(x, c, sn, 4)):
        assert torch.equal(a, r)
    q, k, v = K.split_qkv(x, None, None, 0, impl="fused")  # no rotation: views of any layout
    assert torch.equal(v, x[:, :, :, 2]) and v.data_ptr() == x[:, :, :, 2].data_ptr()
    y = torch.randn(1, 3, 2, 3, 8)
    with pytest.raises(KernelError, match="q_per_kv"):
        K.split_qkv(y, c, sn, 4, q_per_kv=2)
    with pytest.raises(KernelError, match="cos/sin must be given"):
        K.split_qkv(y, None, None, 4)
    with pytest.raises(KernelError, match="cos/sin must be given"):
        K.split_qkv(y, c, sn, 0)
    with pytest.raises(KernelError, match="rotary_dims"):
        K.split_qkv(y, c, sn, 10)


# ---------------------------------------------------------------------------------------------- the model
BASE = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, seq_len=16, vocab_size=96)


@pytest.mark.parametrize("position", ["rotary", "learned"])
def test_model_attention_runs_split_qkv_with_and_without_checkpointing(device, position):
    """The fused model calls split_qkv for rotary and learned positions alike, and activation checkpointing
    recomputes it to the same loss and gradients, bitwise."""
    cfg = GPTConfig(**BASE, position=position, rotary_dims=8 if position == "rotary" else 0, kernels="fused")
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    results = []
    for ckpt in ("none", "full"):
        model = GPT(dataclasses.replace(cfg, activation_checkpointing=ckpt)).to(device)
        model.load_state_dict(state)
        model.train()
        loss = cross_entropy_loss(model(tokens.to(device)), tokens.to(device))
        if ckpt == "none":
            assert graph_names(loss).count("_SplitQKVFnBackward") == cfg.n_layers
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for n, gr in results[0][1].items():
        assert torch.equal(results[1][1][n], gr), n
    attn = gpt.CausalSelfAttention(dataclasses.replace(cfg, kernels="reference"))
    assert "_SplitQKVFnBackward" not in graph_names(attn.heads(torch.randn(1, 3, 64, requires_grad=True))[0])


# ------------------------------------------------------------------------------ CUDA kernel versions: v4, v5
# The binding's `version` forces a kernel (0: the launcher picks) and returns the one that ran (5, 4, or 1 for v4's
# scalar form). v5 must give v4's values bit for bit, in every layout the attention hands over.
# (b, s, groups, q_per_kv, hd, rotary_dims, interleaved)
VERSION_CASES = [
    (4, 64, 4, 1, 128, 32, False),  # Pythia's 25%, batch 4
    (1, 37, 4, 1, 128, 128, False),  # full rotary, batch 1, odd length
    (4, 33, 3, 1, 128, 0, False),  # no rotation: the copy alone
    (2, 19, 2, 1, 128, 32, True),  # GPT-J layout, 25%
    (1, 31, 2, 1, 64, 64, True),  # GPT-J layout, full, head 64
    (4, 17, 2, 4, 128, 32, False),  # GQA, 4 q heads per kv head
    (1, 9, 3, 2, 64, 16, False),  # GQA, head 64, rotary of one pack (bf16)
    (2, 5, 2, 1, 256, 64, False),  # head 256: a warp per row in bf16; fp32's 64 packs are v4's
    (2, 7, 5, 3, 32, 16, False),  # head 32 (bf16: 8 rows a warp), 25 rows a token: its one task part empty
]
VERSION_IDS = [f"b{c[0]}s{c[1]}g{c[2]}p{c[3]}hd{c[4]}r{c[5]}{'i' if c[6] else ''}" for c in VERSION_CASES]
VERSION_LAYOUTS = ["contiguous", "bhsd", "sdpa", "expanded-k"]


def _sdpa_grads(x: torch.Tensor, per: int) -> list:
    """dq, dk, dv as a real SDPA backward on x's device delivers them, through the model's reshape and transpose."""
    b, s, g, _, hd = x.shape
    leaf = x.clone().requires_grad_()
    q, k, v = leaf[:, :, :, :per], leaf[:, :, :, per], leaf[:, :, :, per + 1]
    seen: list = [None, None, None]
    for i, t in enumerate((q, k, v)):
        t.register_hook(lambda gr, i=i: seen.__setitem__(i, gr))
    qh = q.reshape(b, s, g * per, hd).transpose(1, 2)
    y = F.scaled_dot_product_attention(qh, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=per > 1)
    (y.float() * torch.randn(y.shape, device=x.device)).sum().backward()
    return [gr if gr.stride(-1) == 1 else gr.contiguous() for gr in seen]  # (as _SplitQKVFn.backward)


def _version_grads(layout: str, x: torch.Tensor, per: int) -> list:
    b, s, g, _, hd = x.shape
    if layout == "sdpa":
        return _sdpa_grads(x, per)
    if layout == "bhsd":  # [b, heads, s, hd] contiguous, seen as [b, s, heads, hd]
        return _grads("sdpa", b, s, g, per, hd, x.dtype, x.device)
    grads = _grads("contiguous", b, s, g, per, hd, x.dtype, x.device)
    if layout == "expanded-k":  # an unused output: one zero row broadcast by stride 0
        grads[1] = torch.zeros(hd, dtype=x.dtype, device=x.device).expand(b, s, g, hd)
    return grads


def _v5_applies(grads: list, hd: int, rd: int, interleaved: bool, dtype) -> bool:
    """The launcher's test for v5: 16-byte packs everywhere (size-1 dims' strides do not count, as in the binding),
    the rotary part in whole packs, D / V lanes a power of two up to a warp."""
    v = 16 // torch.tensor([], dtype=dtype).element_size()
    lanes = hd // v
    packs = hd % v == 0 and all(gr.data_ptr() % 16 == 0 and all(st % v == 0 for st, n in zip(gr.stride()[:-1], gr.shape)
                                                                if n != 1) for gr in grads)
    rot = rd == 0 or ((rd if interleaved else rd // 2) % v == 0 and (rd // 2) % 4 == 0)
    return packs and rot and lanes <= 32 and lanes & (lanes - 1) == 0


def _run_version(ext, grads, x, c, sn, rd, interleaved, version):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)  # poisoned: every element must be written
    ran = ext.split_qkv_backward(*grads, out, c, sn, rd, interleaved, version)
    return out, ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", VERSION_LAYOUTS)
@pytest.mark.parametrize("b,s,g,per,hd,rd,interleaved", VERSION_CASES, ids=VERSION_IDS)
def test_split_qkv_backward_v5_is_bitwise_v4(seed, dtype, layout, b, s, g, per, hd, rd, interleaved):
    ext = _backend.extension("cuda")[0]
    x = torch.randn(b, s, g, per + 2, hd, device="cuda").to(dtype)
    c, sn = _angles(s, rd)
    c, sn = (None, None) if not rd else (c.cuda(), sn.cuda())
    grads = _version_grads(layout, x, per)
    where = f"seed {seed}, strides {[tuple(gr.stride()) for gr in grads]}"
    out4, ran4 = _run_version(ext, grads, x, c, sn, rd, interleaved, 4)
    auto, ran = _run_version(ext, grads, x, c, sn, rd, interleaved, 0)
    assert ran4 in (4, 1), where
    # v4 against the path it replaced (bitwise: the concatenation, then v3's inverse rotation in place) and against
    # the fp32 reference
    assert torch.equal(out4, _todays_dqkv(grads, x, c, sn, rd, interleaved)), f"v4 not today's path ({where})"
    ref_leaf = x.float().requires_grad_()
    _backward(K.split_qkv_reference(ref_leaf * 1, c, sn, rd, interleaved, per), [gr.float() for gr in grads])
    assert rel_error(out4, ref_leaf.grad) <= TOL[dtype], where
    if _v5_applies(grads, hd, rd, interleaved, dtype):
        out5, ran5 = _run_version(ext, grads, x, c, sn, rd, interleaved, 5)
        assert ran5 == 5 and ran == 5, where  # auto takes v5 wherever it applies
        assert torch.equal(out5, out4), f"v5 not bitwise v4 ({where})"
        assert rel_error(out5, ref_leaf.grad) <= TOL[dtype], where
    else:
        assert ran == ran4, where
        refused = torch.full_like(x, float("nan"))
        assert ext.split_qkv_backward(*grads, refused, c, sn, rd, interleaved, 5) == -1, where  # nothing launched
        assert refused.isnan().all(), where
    assert torch.equal(auto, out4), where


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_split_qkv_backward_v5_declines_what_it_cannot_take(seed):
    """Rows off 16-byte alignment (v4's scalar form), a head of 12 packs (v4), fp32 head 256 (64 packs: v4): forced
    v5 refuses, auto runs the v4 kernel that takes them, with today's values."""
    ext = _backend.extension("cuda")[0]
    for (hd, rd, layout, dtype, want) in [(32, 8, "padded", torch.bfloat16, 1), (96, 32, "contiguous", torch.bfloat16, 4),
                                         (256, 64, "contiguous", torch.float32, 4)]:
        b, s, g, per = 2, 5, 2, 1
        x = torch.randn(b, s, g, per + 2, hd, device="cuda").to(dtype)
        c, sn = (t.cuda() for t in _angles(s, rd))
        grads = _grads(layout, b, s, g, per, hd, dtype, "cuda")
        out, ran = _run_version(ext, grads, x, c, sn, rd, False, 0)
        assert ran == want and torch.equal(out, _todays_dqkv(grads, x, c, sn, rd, False)), f"hd {hd} (seed {seed})"
        refused = torch.full_like(x, float("nan"))
        assert ext.split_qkv_backward(*grads, refused, c, sn, rd, False, 5) == -1 and refused.isnan().all()


def test_split_qkv_backward_version_is_cuda_only():
    """The CPU has one kernel: a forced version there is refused (CI runs this on the CPU extension)."""
    ext = _backend.extension("cpu")[0]
    x = torch.randn(1, 3, 2, 3, 8)
    grads = _grads("contiguous", 1, 3, 2, 1, 8, x.dtype, "cpu")
    c, sn = _angles(3, 4)
    out = torch.empty_like(x)
    assert ext.split_qkv_backward(*grads, out, c, sn, 4, False, 0) == 0
    assert torch.equal(out, _todays_dqkv(grads, x, c, sn, 4, False))
    for version in (4, 5, 3):
        with pytest.raises(RuntimeError, match="version must be 0"):
            ext.split_qkv_backward(*grads, out, c, sn, 4, False, version)
