"""The Barlow Twins and KD losses."""

import torch

from distilled_ssl.models.losses import barlow_twins_loss, kd_loss


def test_barlow_twins_is_low_for_identical_decorrelated_views() -> None:
    z = torch.randn(512, 8)
    z = (z - z.mean(0)) / z.std(0)
    assert barlow_twins_loss(z, z) < 0.2
    assert barlow_twins_loss(z, torch.randn(512, 8)) > 6.0  # unrelated views: diagonal near 0


def test_kd_loss_is_mse() -> None:
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert float(kd_loss(a, b)) == 1.0
