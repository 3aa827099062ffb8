"""Rotary position embedding: the PyTorch reference and the fused kernel (csrc/rotary/).

x is [b, s, h, hd]; the first `rotary_dims` of hd are rotated (partial rotary, e.g. Pythia's 25%), the
rest pass through. cos/sin hold one angle per frequency: [s, rotary_dims // 2]. The duplicated form
[s, rotary_dims] that NeoX/HF caches hold (cat(f, f), or repeat_interleave(f, 2) for interleaved) is
accepted too, as are leading size-1 dims ([1, s, 1, r]). cos/sin are constants: they get no gradient.

`rotary_qkv_` rotates the q and k heads of the attention's whole qkv buffer [b, s, groups, q_per_kv + 2, hd]
(per group: q_per_kv q heads, k, v) in place: only the rotated channels of q and k are read and written, with
no copy of q/k, of v or of the pass-through channels, forward or backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from neox.errors import KernelError

from . import _backend as B


def _angles(cos: torch.Tensor, sin: torch.Tensor, seq: int, rotary_dims: int, interleaved: bool):
    """cos/sin as [seq, rotary_dims // 2], whichever accepted form they came in."""
    if rotary_dims <= 0 or rotary_dims % 2:
        raise KernelError(f"rotary: rotary_dims must be a positive even number, got {rotary_dims}")
    if cos.shape != sin.shape:
        raise KernelError(f"rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    c, s = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
    if c.shape[0] != seq:
        raise KernelError(f"rotary: cos/sin have {c.shape[0]} positions, x has {seq}; slice the cache to "
                          "the positions of x")
    half = rotary_dims // 2
    if c.shape[1] == rotary_dims:  # duplicated form
        pick = slice(0, rotary_dims, 2) if interleaved else slice(0, half)
        c, s = c[:, pick], s[:, pick]
    elif c.shape[1] != half:
        raise KernelError(f"rotary: cos/sin last dim must be rotary_dims//2={half} or rotary_dims={rotary_dims}, "
                          f"got {c.shape[1]}")
    return c, s


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dims: int,
                     interleaved: bool = False) -> torch.Tensor:
    c, s = _angles(cos, sin, x.shape[1], rotary_dims, interleaved)
    c, s = c[None, :, None, :].to(x.dtype), s[None, :, None, :].to(x.dtype)
    rot, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = rot.chunk(2, dim=-1)
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((out, rest), dim=-1)


class _RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, x, c, s, rotary_dims: int, interleaved: bool):
        out = B.empty(x.shape, x.dtype, x.device)
        ext.rotary(x, c, s, out, rotary_dims, interleaved, False)
        ctx.save_for_backward(c, s)
        ctx.ext, ctx.rotary_dims, ctx.interleaved = ext, rotary_dims, interleaved
        return out

    @staticmethod
    def backward(ctx, dout):
        c, s = ctx.saved_tensors
        dout = dout.contiguous()
        dx = B.empty(dout.shape, dout.dtype, dout.device)
        ctx.ext.rotary(dout, c, s, dx, ctx.rotary_dims, ctx.interleaved, True)  # rotate back: sin -> -sin
        return None, dx, None, None, None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dims: int, interleaved: bool = False,
           impl: str = "auto") -> torch.Tensor:
    """Rotate the first rotary_dims of each head of x [b, s, h, hd] by the angles in cos/sin."""
    ext = B.choose("rotary", impl, x.device)
    if ext is not None and B.check_inputs("rotary", impl, x, cos, sin):
        if x.dim() != 4:
            raise KernelError(f"rotary: x must be [b, s, h, hd], got shape {tuple(x.shape)}")
        if rotary_dims > x.shape[-1]:
            raise KernelError(f"rotary: rotary_dims={rotary_dims} > head dim {x.shape[-1]}")
        c, s = _angles(cos, sin, x.shape[1], rotary_dims, interleaved)
        if x.numel() == 0:
            B.unsupported_shape("rotary", tuple(x.shape), "empty input", impl)
        else:
            return _RotaryFn.apply(ext, x.contiguous(), B.as_float32(c.detach()), B.as_float32(s.detach()),
                                   rotary_dims, interleaved)
    return rotary_reference(x, cos, sin, rotary_dims, interleaved)


def rotary_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dims: int,
                         interleaved: bool = False, q_per_kv: int = 1) -> torch.Tensor:
    """A new qkv [b, s, groups, q_per_kv + 2, hd] whose q and k heads are `rotary_reference` of qkv's, v as is."""
    b, s, g, n, hd = _qkv_shape(qkv, q_per_kv)
    qk = qkv[:, :, :, : q_per_kv + 1].reshape(b, s, g * (q_per_kv + 1), hd)
    qk = rotary_reference(qk, cos, sin, rotary_dims, interleaved).view(b, s, g, q_per_kv + 1, hd)
    return torch.cat((qk, qkv[:, :, :, q_per_kv + 1:]), dim=3)


def _qkv_shape(qkv: torch.Tensor, q_per_kv: int) -> tuple[int, ...]:
    if qkv.dim() != 5 or q_per_kv < 1 or qkv.shape[3] != q_per_kv + 2:
        raise KernelError(f"rotary_qkv: qkv must be [b, s, groups, q_per_kv + 2, hd] with q_per_kv={q_per_kv}, "
                          f"got shape {tuple(qkv.shape)}")
    return tuple(qkv.shape)


class _RotaryQKVFn(torch.autograd.Function):
    """Rotates qkv's storage in place and returns it: to autograd, an op whose output aliases its input.

    Not `ctx.mark_dirty`: qkv is a view (of the linear's [b * s, n] matmul output), and autograd wraps an
    in-place op on a view in a CopySlices node whose backward copies the whole gradient twice, and refuses
    it outright on a view returned by a custom autograd Function (tensor parallelism's linear). Instead qkv's
    version is bumped, so that an op which saved qkv for its backward fails loudly rather than see rotated
    values. The backward rotates the incoming gradient back in place: it is the fresh tensor that the
    split/unbind of the rotated qkv produced; a non-contiguous one (an expanded sum gradient) is copied first.
    `version` is the CUDA kernel's (0: the one for the shapes; see `rotary_qkv_`)."""

    @staticmethod
    def forward(ctx, ext, qkv, c, s, rotary_dims: int, interleaved: bool, version: int):
        if ext.rotary_qkv(qkv, c, s, rotary_dims, interleaved, False, version) < 0:  # nothing was launched
            raise KernelError(f"rotary_qkv: kernel version {version} does not take qkv {tuple(qkv.shape)} with "
                              f"rotary_dims={rotary_dims} (its 16-byte packs or lanes); use version=0")
        torch.autograd.graph.increment_version(qkv)
        ctx.save_for_backward(c, s)
        ctx.ext, ctx.rotary_dims, ctx.interleaved, ctx.version = ext, rotary_dims, interleaved, version
        return qkv

    @staticmethod
    def backward(ctx, dout):
        c, s = ctx.saved_tensors
        dout = dout if dout.is_contiguous() else dout.contiguous()
        # rotate back: sin -> -sin; a forced version that the gradient's alignment does not allow: the kernel's pick
        if ctx.ext.rotary_qkv(dout, c, s, ctx.rotary_dims, ctx.interleaved, True, ctx.version) < 0:
            ctx.ext.rotary_qkv(dout, c, s, ctx.rotary_dims, ctx.interleaved, True, 0)
        return None, dout, None, None, None, None, None


# The CUDA kernels of rotary_qkv_ that `version` can force (csrc/rotary/rotary.cu's header says what each does).
ROTARY_QKV_VERSIONS = (3, 6, 7)


def rotary_qkv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dims: int, interleaved: bool = False,
                q_per_kv: int = 1, impl: str = "auto", version: int = 0) -> torch.Tensor:
    """Rotate the first rotary_dims channels of the q and k heads of qkv [b, s, groups, q_per_kv + 2, hd].

    Returns the rotated qkv: on the fused path qkv's own storage, rotated in place, on the reference path a
    new tensor (`rotary_qkv_reference`). Use the return value and not qkv after the call (the model rebinds
    it). The backward rotates its incoming gradient in place, so give the result to views/splits (as the
    attention does), not to an op that hands one gradient tensor to several inputs.

    version: 0 runs the CUDA kernel made for the shapes (v3; v6 and v7 measured slower on the H200, session 20); 3, 6 or 7 forces that kernel
    (CUDA only: side-by-side tests and bench/kernels.py --rotary-versions), and a forced 6 or 7 that does not apply
    raises KernelError. The values are bitwise the same whichever kernel runs.
    """
    b, s, g, n, hd = _qkv_shape(qkv, q_per_kv)
    if rotary_dims > hd:
        raise KernelError(f"rotary_qkv: rotary_dims={rotary_dims} > head dim {hd}")
    if version and (version not in ROTARY_QKV_VERSIONS or qkv.device.type != "cuda"):
        raise KernelError(f"rotary_qkv: version={version} must be 0, or one of {ROTARY_QKV_VERSIONS} for a CUDA "
                          f"qkv (got one on {qkv.device.type})")
    unsupported = None if qkv.is_contiguous() else "qkv is not contiguous (the kernel rotates it in place)"
    ext = B.fused_extension("rotary", impl, qkv, cos, sin, unsupported=unsupported)
    if ext is None:
        return rotary_qkv_reference(qkv, cos, sin, rotary_dims, interleaved, q_per_kv)
    c, sn = _angles(cos, sin, s, rotary_dims, interleaved)
    return _RotaryQKVFn.apply(ext, qkv, B.as_float32(c.detach()), B.as_float32(sn.detach()), rotary_dims,
                              interleaved, version)


def split_qkv_reference(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                        rotary_dims: int, interleaved: bool = False,
                        q_per_kv: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [b, s, groups, q_per_kv, hd], k and v [b, s, groups, hd] of qkv [b, s, groups, q_per_kv + 2, hd], q and k
    rotated by `rotary_qkv_reference` (rotary_dims = 0, cos/sin None: no rotation); views of one buffer."""
    _qkv_shape(qkv, q_per_kv)
    if rotary_dims:
        qkv = rotary_qkv_reference(qkv, cos, sin, rotary_dims, interleaved, q_per_kv)
    q, k, v = qkv.split((q_per_kv, 1, 1), dim=3)
    return q, k.squeeze(3), v.squeeze(3)


class _SplitQKVFn(torch.autograd.Function):
    """`rotary_qkv_` and the split into q, k, v as one node: the forward rotates qkv in place (as `_RotaryQKVFn`,
    whose docstring says why the version bump and not mark_dirty) and returns views of it; the backward is one
    kernel that gathers dq, dk, dv through their strides into a new contiguous dqkv and rotates its q and k
    channels back. Autograd's own backward of the split is a concatenation (torch's generic strided copy) and
    then a second pass to rotate; the values are the same. A gradient that is None (an output unused) is read
    as zeros from one zero row, broadcast by stride 0."""

    @staticmethod
    def forward(ctx, ext, qkv, c, s, rotary_dims: int, interleaved: bool, q_per_kv: int):
        ctx.set_materialize_grads(False)
        if rotary_dims:  # v3 as before this session's rotary_qkv_ v6 (the same values); v6 here once measured
            ext.rotary_qkv(qkv, c, s, rotary_dims, interleaved, False, 3 if qkv.is_cuda else 0)
            torch.autograd.graph.increment_version(qkv)
            ctx.save_for_backward(c, s)
        ctx.ext, ctx.rotary_dims, ctx.interleaved = ext, rotary_dims, interleaved
        ctx.shape, ctx.dtype, ctx.device = qkv.shape, qkv.dtype, qkv.device
        return qkv[:, :, :, :q_per_kv], qkv[:, :, :, q_per_kv], qkv[:, :, :, q_per_kv + 1]

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        c, s = ctx.saved_tensors if ctx.rotary_dims else (None, None)
        b, sq, g, n, hd = ctx.shape
        zero = None
        grads = []
        for grad, shape in ((dq, (b, sq, g, n - 2, hd)), (dk, (b, sq, g, hd)), (dv, (b, sq, g, hd))):
            if grad is None:
                zero = zero if zero is not None else torch.zeros(hd, dtype=ctx.dtype, device=ctx.device)
                grad = zero.expand(shape)
            elif grad.stride(-1) != 1 and hd > 1:
                grad = grad.contiguous()
            grads.append(grad)
        dqkv = B.empty(ctx.shape, ctx.dtype, ctx.device)
        ctx.ext.split_qkv_backward(*grads, dqkv, c, s, ctx.rotary_dims, ctx.interleaved, 0)  # 0: the kernel picks
        return None, dqkv, None, None, None, None, None


def split_qkv(qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], rotary_dims: int,
              interleaved: bool = False, q_per_kv: int = 1,
              impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [b, s, groups, q_per_kv, hd], k and v [b, s, groups, hd] of the attention's qkv [b, s, groups, q_per_kv + 2,
    hd], the first rotary_dims channels of q and k rotated (rotary_dims = 0 with cos/sin None: learned or ALiBi
    positions, no rotation).

    Fused: `rotary_qkv_` in place, then q, k, v as views of qkv; the backward is one kernel (gather + inverse
    rotation into a contiguous dqkv), bitwise what autograd's split backward followed by `rotary_qkv_`'s gives.
    As with `rotary_qkv_`, use the returned tensors, not qkv, after the call. The reference (also the fallback for
    what the kernel does not take) is `split_qkv_reference`. The kernel is the "rotary" op's (impl as for it)."""
    b, s, g, n, hd = _qkv_shape(qkv, q_per_kv)
    if rotary_dims < 0 or rotary_dims > hd:
        raise KernelError(f"split_qkv: rotary_dims={rotary_dims} must be in [0, head dim {hd}]")
    if (cos is None or sin is None) != (rotary_dims == 0):
        raise KernelError(f"split_qkv: cos/sin must be given exactly when rotary_dims > 0 (got {rotary_dims})")
    unsupported = None if qkv.is_contiguous() or not rotary_dims else "qkv is not contiguous (rotated in place)"
    ext = B.fused_extension("rotary", impl, qkv, cos, sin, unsupported=unsupported)
    if ext is None:
        return split_qkv_reference(qkv, cos, sin, rotary_dims, interleaved, q_per_kv)
    c = sn = None
    if rotary_dims:
        c, sn = _angles(cos, sin, s, rotary_dims, interleaved)
        c, sn = B.as_float32(c.detach()), B.as_float32(sn.detach())
    return _SplitQKVFn.apply(ext, qkv, c, sn, rotary_dims, interleaved, q_per_kv)
