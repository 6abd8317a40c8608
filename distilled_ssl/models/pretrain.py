"""KD pre-training of a fresh encoder on a (distilled or real) set: MKDT.md stage 6.

A fresh encoder trained with MSE to the set's target reps (SGD momentum 0.9, weight decay 1e-4,
lr = the set's learned lr, no augmentation); the encoder's final linear layer maps its pooled
features to the reps' size. With ``precise_bn`` (the default; ``eval.precise_bn``) a batch-norm
encoder's running statistics are then re-estimated on the set's own images with the final weights
(:mod:`.bn_stats`; at most ``PRECISE_BN_IMAGES`` of them, a seeded share). The evaluation and
stage 5's validation curve both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DivergenceError
from .bn_stats import has_batchnorm, reestimate_bn_stats
from .encoders import Encoder, build_model, seeded
from .losses import kd_loss

PRECISE_BN_IMAGES = 10_000  # images the statistics are re-estimated on (the full-data set: a share)


@dataclass
class PretrainSet:
    """Images (normalised float [k, C, H, W]), their target reps [k, D] and the lr to train with."""

    name: str
    images: torch.Tensor
    targets: torch.Tensor
    lr: float
    epochs: int | None = None  # None = the evaluation's default
    steps: int | None = None  # stop after this many SGD steps (None = every batch of every epoch)


def pretrain_kd(arch: str, kwargs: dict, pset: PretrainSet | None, *, in_channels: int,
                image_size: int, target_dim: int, epochs: int = 20, batch_size: int = 256,
                seed: int = 0, device: str = "cpu", precise_bn: bool = True) -> Encoder:
    """A fresh encoder (seeded init) pre-trained with KD on ``pset`` and put in eval mode (None:
    returned at random init, untouched)."""
    with seeded(seed):
        model = build_model(arch, in_channels=in_channels, image_size=image_size,
                            output_dim=target_dim, **kwargs).to(device)
    if pset is None:
        return model
    opt = torch.optim.SGD(model.parameters(), lr=pset.lr, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = pset.images.to(device), pset.targets.to(device)
    model.train()
    n_epochs, taken = pset.epochs or epochs, 0
    if pset.steps is not None:  # enough epochs for the steps (each a fresh shuffle), cut at the last
        n_epochs = -(-pset.steps // -(-len(x_all) // batch_size))
    for _ in range(n_epochs):
        order = torch.randperm(len(x_all), generator=g).to(device)
        for i in range(0, len(order), batch_size):
            if pset.steps is not None and taken == pset.steps:
                break
            idx = order[i:i + batch_size]
            if len(idx) < 2 and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
                continue
            taken += 1
            loss = kd_loss(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise DivergenceError(f"pre-training on {pset.name} diverged (lr {pset.lr:.3g})")
    if precise_bn and has_batchnorm(model):
        x = x_all
        if len(x) > PRECISE_BN_IMAGES:
            x = x[torch.randperm(len(x), generator=g)[:PRECISE_BN_IMAGES].to(device)]
        reestimate_bn_stats(model, x.split(batch_size))
    return model.eval()
