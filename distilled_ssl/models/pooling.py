"""2x2 average pooling as a fixed depthwise convolution: the same numbers as ``nn.AvgPool2d(2)``
(up to rounding), infinitely differentiable, and faster on CPU for contiguous fp32 NCHW tensors, where
PyTorch's pooling kernels and their backward are slow (4-6x on a 128x32x32x32 batch alone;
``benchmarks/distill_step.py`` measures what it gives a matching iteration). Trajectory matching runs
pooling and its adjoint (the backward, and the backward's backward) at every inner step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _kernel(x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[1], 1, 2, 2), 0.25, dtype=x.dtype, device=x.device)


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.size = x.shape[-2:]
        return F.conv2d(x, _kernel(x), stride=2, groups=x.shape[1])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return _Unpool.apply(g, ctx.size)


class _Unpool(torch.autograd.Function):
    """The adjoint of the pool: each value spread over its 2x2 window, times 1/4 (odd sizes get a
    zero last row / column, which the pool ignored)."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, size: torch.Size) -> torch.Tensor:
        pad = (size[0] % 2, size[1] % 2)
        return F.conv_transpose2d(g, _kernel(g), stride=2, groups=g.shape[1], output_padding=pad)

    @staticmethod
    def backward(ctx: Any, h: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Pool.apply(h), None


def avg_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2)`` of [N, C, H, W] (odd H or W: the last row or column is dropped)."""
    return _Pool.apply(x)


class AvgPool2x2(nn.Module):
    """``nn.AvgPool2d(2)`` with fast derivatives of every order (no parameters, no state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
            return F.avg_pool2d(x, 2)  # bf16 / fp16: PyTorch's pooling (depthwise convs are slow there)
        return avg_pool2x2(x)
