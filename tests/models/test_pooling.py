"""The convolutional 2x2 average pool is nn.AvgPool2d(2) with derivatives of every order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distilled_ssl.models.pooling import AvgPool2x2, avg_pool2x2


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (3, 3)])
def test_equals_avg_pool2d_to_second_order(size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64, requires_grad=True)
    out = avg_pool2x2(x)
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(x.shape, generator=g, dtype=torch.float64)
    results = []
    for fn in (avg_pool2x2, lambda t: F.avg_pool2d(t, 2)):
        y = fn(x)
        (first,) = torch.autograd.grad(y, x, gy, create_graph=True)
        (second,) = torch.autograd.grad(first, gy, probe)
        results.append((y, first, second))
    for mine, ref in zip(*results, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(avg_pool2x2, (x,))
    assert torch.autograd.gradgradcheck(avg_pool2x2, (x,))


def test_module() -> None:
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(AvgPool2x2()(x), F.avg_pool2d(x, 2))
    assert AvgPool2x2().state_dict() == {}
