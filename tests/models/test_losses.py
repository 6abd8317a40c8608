"""The Barlow Twins, NT-Xent and KD losses."""

import torch

from distilled_ssl.models.losses import barlow_twins_loss, kd_loss, nt_xent_loss


def test_barlow_twins_is_low_for_identical_decorrelated_views() -> None:
    z = torch.randn(512, 8)
    z = (z - z.mean(0)) / z.std(0)
    assert barlow_twins_loss(z, z) < 0.2
    assert barlow_twins_loss(z, torch.randn(512, 8)) > 6.0  # unrelated views: diagonal near 0


def test_kd_loss_is_mse() -> None:
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert float(kd_loss(a, b)) == 1.0


def test_nt_xent_prefers_matching_views() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    matched = nt_xent_loss(z, z + 0.01 * torch.randn(8, 16, generator=g))
    shuffled = nt_xent_loss(z, torch.randn(8, 16, generator=g))
    assert matched < shuffled
    # two images, identical views: each view's partner has cosine 1, the other image's two views c
    c = torch.nn.functional.cosine_similarity(z[0], z[1], dim=0)
    expected = -torch.log(torch.e / (torch.e + 2 * torch.exp(c)))
    assert torch.isclose(nt_xent_loss(z[:2], z[:2], temperature=1.0), expected, atol=1e-6)
