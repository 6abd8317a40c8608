"""KD pre-training of a fresh encoder on a (distilled or real) set: MKDT.md stage 6.

A fresh encoder trained with MSE to the set's target reps (SGD momentum 0.9, weight decay 1e-4,
lr = the set's learned lr, no augmentation); the encoder's final linear layer maps its pooled
features to the reps' size. The evaluation and stage 5's validation curve both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DivergenceError
from .encoders import Encoder, build_model, seeded
from .losses import kd_loss


@dataclass
class PretrainSet:
    """Images (normalised float [k, C, H, W]), their target reps [k, D] and the lr to train with."""

    name: str
    images: torch.Tensor
    targets: torch.Tensor
    lr: float
    epochs: int | None = None  # None = the evaluation's default


def pretrain_kd(arch: str, kwargs: dict, pset: PretrainSet | None, *, in_channels: int,
                image_size: int, target_dim: int, epochs: int = 20, batch_size: int = 256,
                seed: int = 0, device: str = "cpu") -> Encoder:
    """A fresh encoder (seeded init) pre-trained with KD on ``pset`` (None: left at random init)."""
    with seeded(seed):
        model = build_model(arch, in_channels=in_channels, image_size=image_size,
                            output_dim=target_dim, **kwargs).to(device)
    if pset is None:
        return model
    opt = torch.optim.SGD(model.parameters(), lr=pset.lr, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = pset.images.to(device), pset.targets.to(device)
    model.train()
    for _ in range(pset.epochs or epochs):
        order = torch.randperm(len(x_all), generator=g).to(device)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2 and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
                continue
            loss = kd_loss(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise DivergenceError(f"pre-training on {pset.name} diverged (lr {pset.lr:.3g})")
    return model.eval()
