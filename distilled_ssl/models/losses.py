"""Losses: Barlow Twins and SimCLR's NT-Xent (teacher training), and the knowledge-distillation MSE
(everything after)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 5e-3) -> torch.Tensor:
    """Barlow Twins (Zbontar et al., ICML 2021): push the cross-correlation of the two views'
    batch-standardised embeddings to the identity. ``lambda_offdiag`` = 5e-3 as in the paper.
    """
    n = z1.shape[0]
    if n < 2:
        raise ValueError("Barlow Twins needs a batch of at least 2")
    z1 = (z1 - z1.mean(0)) / (z1.std(0) + 1e-6)
    z2 = (z2 - z2.mean(0)) / (z2.std(0) + 1e-6)
    c = z1.T @ z2 / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al., ICML 2020): each view must pick its partner out of the 2n - 1
    other embeddings of the batch by cosine similarity / ``temperature`` (0.5, SimCLR's CIFAR value).
    """
    n = z1.shape[0]
    if n < 2:
        raise ValueError("NT-Xent needs a batch of at least 2")
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def kd_loss(student_out: torch.Tensor, target_reps: torch.Tensor) -> torch.Tensor:
    """MKDT's knowledge-distillation objective: mean squared error to the target representations."""
    return F.mse_loss(student_out, target_reps)
