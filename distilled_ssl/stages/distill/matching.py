"""The trajectory-matching objective and its exact gradients (the inner loop of stage 5).

``theta_{i+1} = theta_i - eta * grad MSE(f(theta_i, X[b_i]), Y[b_i])`` for ``i < N``;
``loss = ||theta_N - theta_target||^2 / ||theta_0 - theta_target||^2``, or, where a function of
theta_N is passed in place of ``theta_target``, ``loss = outer(theta_N)`` (``distill.method:
fidelity``, :mod:`.objectives`). Two modes give the same gradients of ``loss`` with respect to the
synthetic images X, target reps Y and lr eta:

* ``unrolled`` keeps the second-order graph of every step (memory grows with N): the reference.
* ``adjoint`` stores only theta_0..theta_N, then walks back carrying dL/dtheta, recomputing one
  step at a time and taking one Hessian-vector product per step; peak activation memory is that
  of a single step, whatever N is. The backward walk replays the forward minibatches exactly,
  so batch-norm students (batch statistics) work too. ``keep_graphs=M`` keeps the graphs of the
  last M steps from the forward sweep, so the walk does not recompute them (memory for time; the
  result is the same).

``momentum=mu`` (``distill.inner_momentum``; 0, plain SGD, is the paper's inner loop) makes each
inner step heavy-ball SGD as the evaluation trains: ``v_{i+1} = mu v_i + g_i`` (``v_0 = 0``),
``theta_{i+1} = theta_i - eta v_{i+1}``. The adjoint walk then carries the velocity's adjoint too
(same one Hessian-vector product per step, the velocities stored beside the parameters).

``precision="bf16"`` runs each step's forward and backward under bfloat16 autocast (fp32
accumulation; images, targets, lr and the student's parameters stay fp32 master copies);
``"fp32"`` is exact.

``steps`` (a :class:`~.compiled.CompiledSteps`, ``distill.compile: true``) runs the adjoint walk's
two per-step computations as compiled graphs: the same numbers up to float rounding, faster.

``image_grads=False`` skips the gradient with respect to the images (``grad_images`` is then
zeros): targets-only distillation (``distill.lr_img: 0``) does not pay for the first layer's
input-gradient terms of every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import torch

from ...errors import ConfigError
from ...models.encoders import FlatParams
from ...models.losses import kd_loss


class StepFunctions(Protocol):
    """One inner step's two computations (:class:`~.compiled.CompiledSteps` implements them)."""

    def forward(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eta: torch.Tensor
                ) -> torch.Tensor:
        """``theta - eta * g``."""
        ...

    def gradient(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``g``, the step's gradient of the KD loss at ``theta`` (heavy-ball steps)."""
        ...

    def reverse(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, adj: torch.Tensor,
                eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(g . adj, H adj, J_x^T adj or None, J_y^T adj)``."""
        ...


@dataclass
class MatchResult:
    """The matching loss and its gradients w.r.t. images, target reps and lr."""

    loss: torch.Tensor
    grad_images: torch.Tensor
    grad_targets: torch.Tensor
    grad_lr: torch.Tensor


PRECISIONS = ("fp32", "bf16")

# what the end point theta_N is scored by: a target parameter vector (the matching loss) or a
# differentiable function of theta_N
Target: TypeAlias = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def _step_loss(flat: FlatParams, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return kd_loss(flat.call(theta, x).to(y.dtype), y)  # bf16 autocast: the loss in fp32


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ConfigError(f"distill.precision must be one of {PRECISIONS}, got {precision!r}")


def match_unrolled(flat: FlatParams, theta0: torch.Tensor, theta_target: Target,
                   images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                   batches: list[torch.Tensor], *, precision: str = "fp32", keep_graphs: int = 0,
                   image_grads: bool = True, steps: StepFunctions | None = None,
                   momentum: float = 0.0) -> MatchResult:
    """Reference mode: unroll all steps with ``create_graph`` and take one backward (every graph
    is kept: ``keep_graphs`` has nothing to change; compiled ``steps`` are the adjoint's only)."""
    if steps is not None:
        raise ConfigError("distill.compile needs distill.mode=adjoint")
    x_leaf = images.detach().requires_grad_(image_grads)
    y_leaf = targets.detach().requires_grad_(True)
    lr_leaf = lr.detach().requires_grad_(True)
    theta = theta0.detach().requires_grad_(True)
    start = theta
    v = torch.zeros_like(theta0) if momentum else None
    for idx in batches:
        with autocast(precision, images.device):
            loss = _step_loss(flat, theta, x_leaf[idx], y_leaf[idx])
            (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        if v is not None:
            v = momentum * v + g
            g = v
        theta = theta - lr_leaf * g
    match = _end_loss(start, theta, theta_target)
    if image_grads:
        gx, gy, glr = torch.autograd.grad(match, [x_leaf, y_leaf, lr_leaf])
    else:
        gy, glr = torch.autograd.grad(match, [y_leaf, lr_leaf])
        gx = torch.zeros_like(images)
    return MatchResult(match.detach(), gx, gy, glr)


def match_adjoint(flat: FlatParams, theta0: torch.Tensor, theta_target: Target,
                  images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                  batches: list[torch.Tensor], *, precision: str = "fp32", keep_graphs: int = 0,
                  image_grads: bool = True, steps: StepFunctions | None = None,
                  momentum: float = 0.0) -> MatchResult:
    """Exact gradients with memory constant in the number of steps (reverse-mode adjoint walk);
    the last ``keep_graphs`` steps keep their graphs from the forward sweep (memory grows by that
    many steps' graphs; the walk skips recomputing them). With compiled ``steps`` every step is
    recomputed by the compiled graphs (``keep_graphs`` must be 0)."""
    if steps is not None and keep_graphs:
        raise ConfigError("distill.keep_graphs has no effect with distill.compile (the compiled "
                          "walk recomputes every step); set one of them")
    if momentum:
        return _match_momentum(flat, steps, theta0, theta_target, images, targets, lr, batches,
                               momentum, precision, keep_graphs, image_grads)
    if steps is not None:
        return _match_compiled(steps, theta0, theta_target, images, targets, lr, batches)
    x_all, y_all, eta = images.detach(), targets.detach(), lr.detach()
    n = len(batches)
    thetas = [theta0.detach()]
    kept: dict[int, tuple[torch.Tensor, ...]] = {}
    for i, idx in enumerate(batches):  # forward: parameters only, no second-order graph ...
        th = thetas[i].detach().requires_grad_(True)
        if i >= n - keep_graphs:  # ... except the kept steps
            th, g, xb, yb = _step_graph(flat, th, x_all, y_all, idx, precision, image_grads)
            kept[i] = (th, g, xb, yb)
            g = g.detach()
        else:
            with autocast(precision, x_all.device):
                loss = _step_loss(flat, th, x_all[idx], y_all[idx])
                (g,) = torch.autograd.grad(loss, th)
        thetas.append(th.detach() - eta * g)
    match, adj = _match_loss(thetas[0], thetas[-1], theta_target)
    gx = torch.zeros_like(x_all)
    gy = torch.zeros_like(y_all)
    glr = torch.zeros((), dtype=eta.dtype, device=eta.device)
    for i in range(n - 1, -1, -1):  # backward: one step's graph at a time
        idx = batches[i]
        if i in kept:
            th, g, xb, yb = kept.pop(i)
        else:
            th, g, xb, yb = _step_graph(flat, thetas[i].detach().requires_grad_(True), x_all, y_all,
                                        idx, precision, image_grads)
        if image_grads:
            hv, jx, jy = torch.autograd.grad(g, [th, xb, yb], grad_outputs=adj)
            gx.index_add_(0, idx, -eta * jx)
        else:
            hv, jy = torch.autograd.grad(g, [th, yb], grad_outputs=adj)
        glr -= torch.dot(g.detach(), adj)
        gy.index_add_(0, idx, -eta * jy)
        adj = adj - eta * hv
        del g, th, xb, yb
        thetas[i + 1] = thetas[i + 1][:0]  # free what the walk no longer needs
    return MatchResult(match.detach(), gx, gy, glr)


def _end_loss(theta0: torch.Tensor, theta_n: torch.Tensor, theta_target: Target) -> torch.Tensor:
    """The loss of the end point, differentiable in ``theta_n``: ``theta_target(theta_n)``, or the
    matching loss to a target parameter vector."""
    if callable(theta_target):
        return theta_target(theta_n)
    return (theta_n - theta_target).pow(2).sum() / (theta0.detach() - theta_target).pow(2).sum()


def _match_loss(theta0: torch.Tensor, theta_n: torch.Tensor, theta_target: Target
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and its gradient with respect to ``theta_n`` (where the walk back starts); the
    matching loss's gradient in closed form."""
    if callable(theta_target):
        th = theta_n.detach().requires_grad_(True)
        loss = _end_loss(theta0, th, theta_target)
        (grad,) = torch.autograd.grad(loss, th)
        return loss.detach(), grad
    diff = theta_n - theta_target
    denom = (theta0 - theta_target).pow(2).sum()
    return diff.pow(2).sum() / denom, 2 * diff / denom


def _match_compiled(steps: StepFunctions, theta0: torch.Tensor, theta_target: Target,
                    images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                    batches: list[torch.Tensor]) -> MatchResult:
    """The adjoint walk of :func:`match_adjoint` with each step's computations compiled."""
    x_all, y_all, eta = images.detach(), targets.detach(), lr.detach()
    thetas = [theta0.detach()]
    for idx in batches:
        thetas.append(steps.forward(thetas[-1], x_all[idx], y_all[idx], eta))
    match, adj = _match_loss(thetas[0], thetas[-1], theta_target)
    gx = torch.zeros_like(x_all)
    gy = torch.zeros_like(y_all)
    glr = torch.zeros((), dtype=eta.dtype, device=eta.device)
    for i in range(len(batches) - 1, -1, -1):
        idx = batches[i]
        gdot, hv, jx, jy = steps.reverse(thetas[i], x_all[idx], y_all[idx], adj, eta)
        glr -= gdot
        gy.index_add_(0, idx, -eta * jy)
        if jx is not None:
            gx.index_add_(0, idx, -eta * jx)
        adj = adj - eta * hv
        thetas[i + 1] = thetas[i + 1][:0]
    return MatchResult(match.detach(), gx, gy, glr)


def match_batched(steps: StepFunctions, theta0: torch.Tensor, theta_targets: list[Target],
                  images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                  batches: list[list[torch.Tensor]]) -> list[MatchResult]:
    """K trajectory samples walked together (``distill.batch_samples``): sample k starts from
    ``theta0[k]``, takes the minibatches ``batches[k]`` and is scored by ``theta_targets[k]``; every
    inner step is one call of batched ``steps`` (:class:`~.compiled.CompiledSteps` with
    ``batched=True``) for all K. Returns each sample's :func:`match_adjoint` result (the same numbers
    up to float rounding; plain SGD inner steps)."""
    x_all, y_all, eta = images.detach(), targets.detach(), lr.detach()
    k, n = len(theta0), len(batches[0])
    if len(theta_targets) != k or len(batches) != k or any(len(b) != n for b in batches):
        raise ValueError("match_batched: one start, end point and minibatch list per sample, "
                         "the same number of minibatches each")
    idx = [torch.stack([b[i] for b in batches]) for i in range(n)]  # step i: [K, batch]
    thetas = [theta0.detach()]
    for i in range(n):
        thetas.append(steps.forward(thetas[-1], x_all[idx[i]], y_all[idx[i]], eta))
    ends = [_match_loss(thetas[0][j], thetas[-1][j], theta_targets[j]) for j in range(k)]
    adj = torch.stack([a for _, a in ends])
    gx = torch.zeros((k, *x_all.shape), dtype=x_all.dtype, device=x_all.device)
    gy = torch.zeros((k, *y_all.shape), dtype=y_all.dtype, device=y_all.device)
    glr = torch.zeros(k, dtype=eta.dtype, device=eta.device)
    for i in range(n - 1, -1, -1):
        gdot, hv, jx, jy = steps.reverse(thetas[i], x_all[idx[i]], y_all[idx[i]], adj, eta)
        glr -= gdot
        for j in range(k):
            gy[j].index_add_(0, idx[i][j], -eta * jy[j])
            if jx is not None:
                gx[j].index_add_(0, idx[i][j], -eta * jx[j])
        adj = adj - eta * hv
        thetas[i + 1] = thetas[i + 1][:0]
    return [MatchResult(ends[j][0].detach(), gx[j], gy[j], glr[j]) for j in range(k)]


def _match_momentum(flat: FlatParams, steps: StepFunctions | None, theta0: torch.Tensor,
                    theta_target: Target, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                    batches: list[torch.Tensor], momentum: float, precision: str, keep_graphs: int,
                    image_grads: bool) -> MatchResult:
    """The adjoint walk of heavy-ball inner steps (eager, or with compiled ``steps``).

    The state is ``(theta, v)``; with adjoints ``a`` of theta_{i+1} and ``b`` of v_{i+1}, and
    ``c = b - eta a`` the adjoint of the step's gradient g_i: ``a <- a + H_i c``, ``b <- mu c``,
    ``dL/deta -= v_{i+1} . a`` and the batch's images and target reps get ``J^T c``."""
    x_all, y_all, eta = images.detach(), targets.detach(), lr.detach()
    n = len(batches)
    thetas, vels = [theta0.detach()], [torch.zeros_like(theta0)]
    kept: dict[int, tuple[torch.Tensor, ...]] = {}
    for i, idx in enumerate(batches):
        if steps is not None:
            g = steps.gradient(thetas[i], x_all[idx], y_all[idx])
        elif i >= n - keep_graphs:
            kept[i] = _step_graph(flat, thetas[i].detach().requires_grad_(True), x_all, y_all, idx,
                                  precision, image_grads)
            g = kept[i][1].detach()
        else:
            th = thetas[i].detach().requires_grad_(True)
            with autocast(precision, x_all.device):
                (g,) = torch.autograd.grad(_step_loss(flat, th, x_all[idx], y_all[idx]), th)
        vels.append(momentum * vels[i] + g)
        thetas.append(thetas[i] - eta * vels[-1])
    match, a = _match_loss(thetas[0], thetas[-1], theta_target)
    b = torch.zeros_like(a)
    gx = torch.zeros_like(x_all)
    gy = torch.zeros_like(y_all)
    glr = torch.zeros((), dtype=eta.dtype, device=eta.device)
    for i in range(n - 1, -1, -1):
        idx = batches[i]
        glr -= torch.dot(vels[i + 1], a)
        c = b - eta * a
        if steps is not None:
            _, hv, jx, jy = steps.reverse(thetas[i], x_all[idx], y_all[idx], c, eta)
        else:
            th, g, xb, yb = kept.pop(i) if i in kept else _step_graph(
                flat, thetas[i].detach().requires_grad_(True), x_all, y_all, idx, precision, image_grads)
            if image_grads:
                hv, jx, jy = torch.autograd.grad(g, [th, xb, yb], grad_outputs=c)
            else:
                (hv, jy), jx = torch.autograd.grad(g, [th, yb], grad_outputs=c), None
            del g, th, xb, yb
        if jx is not None:
            gx.index_add_(0, idx, jx)
        gy.index_add_(0, idx, jy)
        a = a + hv
        b = momentum * c
        thetas[i + 1], vels[i + 1] = thetas[i + 1][:0], vels[i + 1][:0]
    return MatchResult(match.detach(), gx, gy, glr)


def _step_graph(flat: FlatParams, th: torch.Tensor, x_all: torch.Tensor, y_all: torch.Tensor,
                idx: torch.Tensor, precision: str, image_grads: bool = True) -> tuple[torch.Tensor, ...]:
    """One inner step's gradient g(theta, X_b, Y_b) with its graph kept (for one Hessian-vector
    product): (theta leaf, g, X_b leaf, Y_b leaf); X_b needs no gradient without ``image_grads``."""
    xb = x_all[idx].requires_grad_(image_grads)
    yb = y_all[idx].requires_grad_(True)
    with autocast(precision, x_all.device):
        loss = _step_loss(flat, th, xb, yb)
        (g,) = torch.autograd.grad(loss, th, create_graph=True)
    return th, g, xb, yb


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
