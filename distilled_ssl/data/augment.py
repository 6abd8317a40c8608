"""Batched SSL augmentations on normalised image tensors (no PIL, any device).

Each view is a random resized crop + horizontal flip (one affine ``grid_sample`` per batch),
then photometric jitter: brightness/contrast for every image, saturation and random grayscale for
colour images, and solarisation. The recipe follows the Barlow Twins / solo-learn CIFAR settings,
scaled by image size (crop scale) and channel count (no colour ops on grayscale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SSLAugment:
    """Two-view augmentation for Barlow Twins; call ``aug(x, generator)`` on a normalised batch."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    grayscale_p: float = 0.2
    solarize_p: float = 0.1

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c = x.shape[:2]
        dev = x.device

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device="cpu").to(dev)

        # random resized crop + flip as one affine sampling grid per image
        area = rand(n) * (self.crop_scale[1] - self.crop_scale[0]) + self.crop_scale[0]
        log_r = rand(n) * (math.log(self.crop_ratio[1]) - math.log(self.crop_ratio[0])) + \
            math.log(self.crop_ratio[0])
        ratio = torch.exp(log_r)
        sw = torch.sqrt(area * ratio).clamp(max=1.0)
        sh = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (rand(n) * 2 - 1) * (1 - sw)
        ty = (rand(n) * 2 - 1) * (1 - sh)
        flip = torch.where(rand(n) < self.flip_p, -1.0, 1.0).to(dev)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0] = sw * flip
        theta[:, 0, 2] = tx
        theta[:, 1, 1] = sh
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        m = torch.tensor(self.mean, device=dev).view(1, -1, 1, 1)
        s = torch.tensor(self.std, device=dev).view(1, -1, 1, 1)
        px = F.grid_sample(x * s + m, grid, mode="bilinear", padding_mode="reflection",
                           align_corners=False)

        # photometric jitter on [0, 1] pixels
        jit = (rand(n) < self.jitter_p).view(n, 1, 1, 1)
        b = 1 + (rand(n) * 2 - 1).view(n, 1, 1, 1) * self.brightness
        px = torch.where(jit, px * b, px)
        gray_mean = px.mean(dim=(1, 2, 3), keepdim=True)
        ct = 1 + (rand(n) * 2 - 1).view(n, 1, 1, 1) * self.contrast
        px = torch.where(jit, (px - gray_mean) * ct + gray_mean, px)
        if c == 3:
            gray = (0.299 * px[:, 0:1] + 0.587 * px[:, 1:2] + 0.114 * px[:, 2:3])
            st = 1 + (rand(n) * 2 - 1).view(n, 1, 1, 1) * self.saturation
            px = torch.where(jit, (px - gray) * st + gray, px)
            to_gray = (rand(n) < self.grayscale_p).view(n, 1, 1, 1)
            gray = (0.299 * px[:, 0:1] + 0.587 * px[:, 1:2] + 0.114 * px[:, 2:3])
            px = torch.where(to_gray, gray.expand_as(px), px)
        px = px.clamp(0, 1)
        sol = (rand(n) < self.solarize_p).view(n, 1, 1, 1)
        px = torch.where(sol & (px >= 0.5), 1 - px, px)
        return (px - m) / s
