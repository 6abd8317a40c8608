"""The batched SSL augmentation."""

import torch

from distilled_ssl.data.augment import SSLAugment


def test_augment_shapes_range_and_seeded_determinism() -> None:
    aug = SSLAugment(mean=(0.5,), std=(0.25,))
    x = (torch.rand(16, 1, 12, 12) - 0.5) / 0.25
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    c = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    pixels = a * 0.25 + 0.5
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_augment_colour_ops_on_rgb() -> None:
    aug = SSLAugment(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), grayscale_p=1.0)
    out = aug(torch.randn(4, 3, 8, 8), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, 0], out[:, 1])  # grayscale_p=1: all channels equal
