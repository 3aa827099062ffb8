"""Rotary position embedding: the PyTorch reference and the fused kernel (csrc/rotary/).

x is [b, s, h, hd]; the first `rotary_dims` of hd are rotated (partial rotary, e.g. Pythia's 25%), the
rest pass through. cos/sin hold one angle per frequency: [s, rotary_dims // 2]. The duplicated form
[s, rotary_dims] that NeoX/HF caches hold (cat(f, f), or repeat_interleave(f, 2) for interleaved) is
accepted too, as are leading size-1 dims ([1, s, 1, r]). cos/sin are constants: they get no gradient.
"""
from __future__ import annotations

import torch

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
