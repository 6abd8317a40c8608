"""Instance norm (GroupNorm with one group per channel) with closed-form first and second derivatives.

Trajectory matching differentiates the inner training step, so it needs the *derivative of the
backward* of every layer. PyTorch's group norm gets that second derivative from a composite of
generic ops. :class:`InstanceNorm2d` is a drop-in :class:`torch.nn.GroupNorm` (same parameters,
same state-dict keys, same outputs up to rounding): its forward and backward are PyTorch's fused
kernels, and the backward's own backward is a closed form (channels-last inputs are run contiguous,
where PyTorch's group-norm kernels are fast, and handed back channels-last).

Per (image, channel) group of M = H·W values: ``xhat = (x - mean) * r`` with
``r = (var + eps)^-1/2`` and ``y = w * xhat + b``. With ``P(v) = v - mean(v) - xhat * mean(xhat * v)``
(symmetric in the group's inner product):

* backward: ``gx = r * w * P(gy)``, ``gw = sum(gy * xhat)``, ``gb = sum(gy)``;
* double backward, given ``a = dL/dgx``, ``aw = dL/dgw``, ``ab = dL/dgb``:
  ``dL/dgy = r * w * P(a) + aw * xhat + ab``, ``dL/dw = sum(r * a * P(gy))`` and
  ``dL/dx = aw * r * P(gy) - r^2 * w * <a, P(gy)> / M * xhat - r^2 * P(s * gy + c * a)``
  with ``s = w * <a, xhat> / M`` and ``c = w * <xhat, gy> / M``.

Every output of the double backward is a per-group linear combination of a few tensors, so each
is a couple of fused passes after a handful of per-group reductions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _groups(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] → [N, C, H·W]: one row per (image, channel) group."""
    n, c, h, w = t.shape
    return t.reshape(n, c, h * w)


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(2, keepdim=True)


class _InstanceNormBackward(torch.autograd.Function):
    """The backward of instance norm as a function of (gy, x, w), with its own closed-form backward."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, c, h, w = x.shape
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(  # PyTorch's fused kernel
            gy.contiguous(), x, mean, rstd, weight, n, c, h * w, c, [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, rstd)
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, a: torch.Tensor | None, aw: torch.Tensor | None, ab: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, ...]:
        # Every output is a per-group linear combination of gy, a, xhat and 1: five per-group
        # reductions, then a few fused passes (module docstring for the formulas).
        gy, x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w_ = x.shape
        m = h * w_
        r, w = rstd.view(n, c, 1), weight.view(1, c, 1)
        gyv = _groups(gy)
        xhat = (_groups(x) - mean.view(n, c, 1)) * r
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        aw3 = zero if aw is None else aw.view(1, c, 1)
        ab3 = zero if ab is None else ab.view(1, c, 1)
        s_gy, d_xg = _sum(gyv), _sum(xhat * gyv)
        if a is not None:
            av = _groups(a)
            s_a, d_xa = _sum(av), _sum(xhat * av)
            q = _sum(av * gyv) - (s_a * s_gy + d_xa * d_xg) / m  # <a, P(gy)>
        else:
            av, s_a, d_xa, q = None, zero, zero, zero
        rw, r2 = r * w, r.square()
        s, cc = w * d_xa / m, w * d_xg / m  # P's argument for dL/dx: s * gy + cc * a
        ggy = torch.addcmul(ab3 - rw * s_a / m, xhat, aw3 - rw * d_xa / m)
        gx = torch.addcmul((r2 * (s * s_gy + cc * s_a) - aw3 * r * s_gy) / m, gyv, aw3 * r - r2 * s)
        gx.addcmul_(xhat, (r2 * (s * d_xg + cc * d_xa - w * q) - aw3 * r * d_xg) / m)
        if av is not None:
            ggy.addcmul_(av, rw)
            gx.addcmul_(av, -r2 * cc)
            gw = (r * q).sum(0).view(c)
        else:
            gw = torch.zeros_like(weight)
        return ggy.view_as(gy), gx.view_as(x), gw, None, None


class _InstanceNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                ) -> torch.Tensor:
        n, c, h, w = x.shape
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, c, eps)  # fused
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        gx, gw, gb = _InstanceNormBackward.apply(gy, x, weight, mean, rstd)
        return gx, gw, gb, None


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
                  ) -> torch.Tensor:
    """Affine instance norm of [N, C, H, W] (= ``F.group_norm(x, C, weight, bias, eps)``), twice
    differentiable in closed form, on contiguous or channels-last tensors.

    Under autocast it follows ``F.group_norm``: on CPU a bfloat16 ``x`` with float32 parameters runs
    PyTorch's mixed-type kernel (bfloat16 out); elsewhere (CUDA) autocast runs group norm in float32,
    so ``x`` is cast up to the parameters' dtype (the CUDA kernel refuses mixed types).
    """
    if x.dtype != weight.dtype and x.device.type != "cpu":
        x = x.to(weight.dtype)
    if x.is_contiguous():
        return _InstanceNorm.apply(x, weight, bias, eps)
    # PyTorch's group-norm kernels are slow on channels-last: run it contiguous, hand back the layout
    y = _InstanceNorm.apply(x.contiguous(), weight, bias, eps)
    return y.contiguous(memory_format=torch.channels_last)


class InstanceNorm2d(nn.GroupNorm):
    """``nn.GroupNorm(C, C, affine=True)`` with closed-form first and second derivatives."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or self.weight is None:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return instance_norm(x, self.weight, self.bias, self.eps)
