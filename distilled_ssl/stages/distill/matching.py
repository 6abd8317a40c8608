"""The trajectory-matching objective and its exact gradients (the inner loop of stage 5).

``theta_{i+1} = theta_i - eta * grad MSE(f(theta_i, X[b_i]), Y[b_i])`` for ``i < N``;
``loss = ||theta_N - theta_target||^2 / ||theta_0 - theta_target||^2``. Two modes give the same
gradients of ``loss`` with respect to the synthetic images X, target reps Y and lr eta:

* ``unrolled`` keeps the second-order graph of every step (memory grows with N): the reference.
* ``adjoint`` stores only theta_0..theta_N, then walks back carrying dL/dtheta, recomputing one
  step at a time and taking one Hessian-vector product per step; peak activation memory is that
  of a single step, whatever N is. The backward walk replays the forward minibatches exactly,
  so batch-norm students (batch statistics) work too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models.encoders import FlatParams
from ...models.losses import kd_loss


@dataclass
class MatchResult:
    """The matching loss and its gradients w.r.t. images, target reps and lr."""

    loss: torch.Tensor
    grad_images: torch.Tensor
    grad_targets: torch.Tensor
    grad_lr: torch.Tensor


def _step_loss(flat: FlatParams, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return kd_loss(flat.call(theta, x), y)


def match_unrolled(flat: FlatParams, theta0: torch.Tensor, theta_target: torch.Tensor,
                   images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                   batches: list[torch.Tensor]) -> MatchResult:
    """Reference mode: unroll all steps with ``create_graph`` and take one backward."""
    x_leaf = images.detach().requires_grad_(True)
    y_leaf = targets.detach().requires_grad_(True)
    lr_leaf = lr.detach().requires_grad_(True)
    theta = theta0.detach().requires_grad_(True)
    start = theta
    for idx in batches:
        loss = _step_loss(flat, theta, x_leaf[idx], y_leaf[idx])
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - lr_leaf * g
    denom = (start.detach() - theta_target).pow(2).sum()
    match = (theta - theta_target).pow(2).sum() / denom
    gx, gy, glr = torch.autograd.grad(match, [x_leaf, y_leaf, lr_leaf])
    return MatchResult(match.detach(), gx, gy, glr)


def match_adjoint(flat: FlatParams, theta0: torch.Tensor, theta_target: torch.Tensor,
                  images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                  batches: list[torch.Tensor]) -> MatchResult:
    """Exact gradients with memory constant in the number of steps (reverse-mode adjoint walk)."""
    x_all, y_all, eta = images.detach(), targets.detach(), lr.detach()
    thetas = [theta0.detach()]
    theta = thetas[0]
    for idx in batches:  # forward: parameters only, no second-order graph
        th = theta.detach().requires_grad_(True)
        loss = _step_loss(flat, th, x_all[idx], y_all[idx])
        (g,) = torch.autograd.grad(loss, th)
        theta = (th.detach() - eta * g)
        thetas.append(theta)
    diff = thetas[-1] - theta_target
    denom = (thetas[0] - theta_target).pow(2).sum()
    match = diff.pow(2).sum() / denom
    adj = 2 * diff / denom  # dL/dtheta_N
    gx = torch.zeros_like(x_all)
    gy = torch.zeros_like(y_all)
    glr = torch.zeros((), dtype=eta.dtype, device=eta.device)
    for i in range(len(batches) - 1, -1, -1):  # backward: one step's graph at a time
        idx = batches[i]
        th = thetas[i].detach().requires_grad_(True)
        xb = x_all[idx].requires_grad_(True)
        yb = y_all[idx].requires_grad_(True)
        loss = _step_loss(flat, th, xb, yb)
        (g,) = torch.autograd.grad(loss, th, create_graph=True)
        hv, jx, jy = torch.autograd.grad(g, [th, xb, yb], grad_outputs=adj)
        glr -= torch.dot(g.detach(), adj)
        gx.index_add_(0, idx, -eta * jx)
        gy.index_add_(0, idx, -eta * jy)
        adj = adj - eta * hv
        thetas[i + 1] = thetas[i + 1][:0]  # free what the walk no longer needs
    return MatchResult(match.detach(), gx, gy, glr)


def minibatches(k: int, batch: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` minibatches of a k-image set: consecutive chunks of fresh random permutations."""
    batch = min(batch, k)
    out: list[torch.Tensor] = []
    perm = torch.randperm(k, generator=generator)
    pos = 0
    while len(out) < steps:
        if pos + batch > k:
            perm, pos = torch.randperm(k, generator=generator), 0
        out.append(perm[pos:pos + batch])
        pos += batch
    return out
