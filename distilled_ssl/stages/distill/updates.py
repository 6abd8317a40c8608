"""How stage 5 moves the learnable set each iteration, beyond the meta-gradient step: priors that
keep the set a good stand-in for real data (README, "Distillation quality").

* ``distill.image_optimizer: adam`` — Adam on the images (``lr_img`` is then a step in normalised
  units), instead of SGD with momentum;
* ``distill.clamp`` — pixels stay in [0, 1];
* ``distill.smooth`` — a diffusion step on what distillation changed in the images (a smoothness
  prior on the change, not on the real images it started from);
* ``distill.targets_anchor`` — target reps move that fraction of the way to the teacher's reps of
  the current images (0 = free, 1 = relabel by the teacher every iteration).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...layout import TEACHER_FILE
from ..context import RunContext
from ..teacher import load_teacher


def adam_step(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float,
              step: int, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam update of ``p`` in place (``m``, ``v``: its moment estimates; ``step`` from 1)."""
    m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    m_hat = m / (1 - betas[0] ** step)
    v_hat = v / (1 - betas[1] ** step)
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def pixel_range(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised values of pixels 0 and 1, per channel, shaped to broadcast over images."""
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    sd = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return (0 - m) / sd, (1 - m) / sd


def laplacian(x: torch.Tensor) -> torch.Tensor:
    """The 4-neighbour Laplacian of images [k, C, H, W], borders replicated (a diffusion step's
    direction)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:] - 4 * x


class TeacherOnSet:
    """The teacher's representation of normalised synthetic images (for ``targets_anchor``)."""

    def __init__(self, ctx: RunContext) -> None:
        data = ctx.train_set
        c, h, _ = data.shape
        dev = ctx.device
        self.encoder, meta = load_teacher(ctx.path(TEACHER_FILE), in_channels=c, image_size=h, device=dev)
        m, sd = (torch.tensor(v, device=dev).view(1, -1, 1, 1) for v in (data.mean, data.std))
        tm, tsd = (torch.tensor(v, device=dev).view(1, -1, 1, 1) for v in (meta["mean"], meta["std"]))
        self.scale, self.shift = sd / tsd, (m - tm) / tsd  # the teacher's normalisation of x

    @torch.no_grad()
    def reps(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self.encoder.features(x * self.scale + self.shift)
                          for x in images.split(batch_size)])
