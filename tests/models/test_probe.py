"""The linear probe."""

import torch

from distilled_ssl.models.probe import linear_probe


def test_linear_probe_separable_and_stable_on_unscaled_features() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 20, generator=g) + 5 * torch.nn.functional.one_hot(y, 20).float()
    x = x * 1e4  # badly scaled features: standardisation keeps the solver stable
    acc = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert acc > 0.9
