"""Losses: Barlow Twins and SimCLR's NT-Xent (teacher training), and the knowledge-distillation MSE
(everything after)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..distributed import world_size


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 5e-3, *,
                      gather_distributed: bool = False) -> torch.Tensor:
    """Barlow Twins (Zbontar et al., ICML 2021): push the cross-correlation of the two views'
    batch-standardised embeddings to the identity. ``lambda_offdiag`` = 5e-3 as in the paper.

    ``gather_distributed``: under torchrun each rank holds a slice of the batch; the batch
    statistics and the cross-correlation are summed over ranks with the autograd-aware
    ``all_reduce``, so the loss is the whole batch's and, after DDP averages them, the gradients
    are the single-process ones (not 1/world size of them).
    """
    if gather_distributed and world_size() > 1:
        return _barlow_twins_over_ranks(z1, z2, lambda_offdiag)
    n = z1.shape[0]
    if n < 2:
        raise ValueError("Barlow Twins needs a batch of at least 2")
    z1 = (z1 - z1.mean(0)) / (z1.std(0) + 1e-6)
    z2 = (z2 - z2.mean(0)) / (z2.std(0) + 1e-6)
    c = z1.T @ z2 / n
    return _barlow_twins_terms(c, lambda_offdiag)


def _barlow_twins_terms(c: torch.Tensor, lambda_offdiag: float) -> torch.Tensor:
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


def _barlow_twins_over_ranks(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce as reduce

    def all_reduce(t: torch.Tensor) -> torch.Tensor:  # a sum whose backward sums the gradients too
        with warnings.catch_warnings():  # newer torch suggests a private module instead
            warnings.simplefilter("ignore", FutureWarning)
            return reduce(t)

    n = float(all_reduce(torch.tensor(float(z1.shape[0]), device=z1.device)))
    if n < 2:
        raise ValueError("Barlow Twins needs a batch of at least 2")

    def standardise(z: torch.Tensor) -> torch.Tensor:
        mean = all_reduce(z.sum(0)) / n
        std = (all_reduce((z - mean).pow(2).sum(0)) / (n - 1)).sqrt()
        return (z - mean) / (std + 1e-6)

    c = all_reduce(standardise(z1).T @ standardise(z2)) / n
    return _barlow_twins_terms(c, lambda_offdiag)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *,
                 gather_distributed: bool = False) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al., ICML 2020): each view must pick its partner out of the 2n - 1
    other embeddings of the batch by cosine similarity / ``temperature`` (0.5, SimCLR's CIFAR value).

    ``gather_distributed``: under torchrun the ranks' slices are gathered (autograd-aware) into
    the whole batch first.
    """
    if gather_distributed and world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            z1, z2 = torch.cat(all_gather(z1)), torch.cat(all_gather(z2))
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
