"""Pictures: a grid of distilled images beside the real images they started from."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from .io import atomic_path


def _grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    return make_grid(images.float().clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)


def pick_for_grid(labels: torch.Tensor | None, n: int, per_class: int = 8) -> torch.Tensor:
    """Up to ``per_class`` images of each class (or the first ``per_class * 10``) to show."""
    if labels is None:
        return torch.arange(min(n, per_class * 10))
    picked = [(labels == c).nonzero().squeeze(1)[:per_class] for c in labels.unique()]
    return torch.cat(picked)


def save_comparison(path: Path, initial: torch.Tensor, distilled: torch.Tensor, *,
                    nrow: int = 8, scale: int = 3) -> None:
    """PNG: initial images (left) and distilled images (right), [0, 1] pixels [n, C, H, W]."""
    left, right = _grid(initial, nrow), _grid(distilled, nrow)
    gap = torch.ones(left.shape[0], left.shape[1], 8)
    canvas = torch.cat([left, gap, right], dim=2)
    arr = (canvas.mul(255).round().byte().permute(1, 2, 0).numpy())
    img = Image.fromarray(arr if arr.shape[2] == 3 else arr[:, :, 0])
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST).convert("RGB")
    header = Image.new("RGB", (img.width, 18), "white")
    draw = ImageDraw.Draw(header)
    draw.text((4, 3), "initial (real)", fill="black")
    draw.text((img.width // 2 + 8, 3), "distilled", fill="black")
    out = Image.new("RGB", (img.width, img.height + 18), "white")
    out.paste(header, (0, 0))
    out.paste(img, (0, 18))
    with atomic_path(path) as tmp:
        out.save(tmp, format="PNG")
