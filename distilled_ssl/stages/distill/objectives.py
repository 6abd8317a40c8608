"""What one inner-loop sample of stage 5 starts from and what its end point is scored by.

Both methods that unroll a student's training on the synthetic set share the loop of
:mod:`.mkdt` and the exact gradients of :mod:`.matching`; they differ only here:

* ``distill.method: mkdt`` (:class:`ExpertSpans`): start from an expert's checkpoint
  theta_s (s drawn from the start window) and match theta_{s+span} of the same expert,
  ``||theta_N - theta_{s+span}||^2 / ||theta_s - theta_{s+span}||^2``; with ``distill.match_space:
  outputs`` the same match in function space, on ``distill.real_batch`` real training images:
  ``||f(theta_N) - f(theta_{s+span})||^2 / ||f(theta_s) - f(theta_{s+span})||^2`` (what the span
  taught the student, not where its weights went; :func:`outputs_loss`).
* ``distill.method: fidelity`` (:class:`FreshStudents`): start from a freshly initialised
  student, as the set's users do, and score the end point by what the set is for: how well the
  trained student predicts the teacher's reps of ``distill.real_batch`` real training images,
  ``1 - R^2`` on that batch (sum of squared errors over the batch's total sum of squares). A
  bilevel objective: the set is optimised for the outcome of a short KD training on it, not for
  resembling the experts' early trajectories. It needs no experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...config import DistillConfig
from ...data.sources import normalize
from ...errors import ArtifactError, ConfigError
from ...models.encoders import FlatParams, seeded
from ..context import RunContext, student_for
from ..experts import ExpertFile, list_experts
from .matching import Target, autocast

Outer = Callable[[torch.Tensor], torch.Tensor]  # theta_N -> the sample's loss (differentiable)


def draw_tags(ctx: RunContext, *tags: object) -> tuple[object, ...]:
    """The seed tags of one of the loop's random draws: ``("distill", *tags)``, salted with
    ``distill.seed`` where set (a replicate run: the same teacher, experts, init and held-out
    scoring, other trajectory samples, expert order, fresh students and real batches)."""
    seed = ctx.cfg.distill.seed
    return ("distill", *tags) if seed is None else ("distill", "seed", seed, *tags)


@dataclass
class Sample:
    """One inner-loop sample: where the student starts, the loss of where it ends, and the
    start checkpoint (MKDT; 0 for a fresh student) for the log."""

    theta0: torch.Tensor
    outer: Target  # a target parameter vector (matching) or a loss of theta_N
    start: int


class ExpertSpans:
    """MKDT's samples: an expert (a fresh seeded order per cycle through them), a start in the
    window of the iteration, the expert's parameters ``span`` checkpoints later as the target."""

    loss_name, loss_key = "matching loss", "matching_loss"  # in logs; in the set's metadata

    def __init__(self, ctx: RunContext, flat: FlatParams, output_dim: int, turns: int = 1) -> None:
        """``turns``: how many architectures take iterations in turn (this one every ``turns``-th);
        its experts are cycled through over its own iterations."""
        d = ctx.cfg.distill
        self.ctx, self.turns, self.flat = ctx, turns, flat
        self.real_batch = min(d.real_batch, len(ctx.train_set)) if d.match_space == "outputs" else 0
        self.experts = list_experts(ctx)
        first = self.experts[0]
        if first.meta["output_dim"] != output_dim or first.params(0).shape[1] != flat.size:
            raise ArtifactError("the experts do not fit the student architecture; re-run the experts "
                                "stage with --force")
        sched = self.experts[0].schedule
        self.span = round(d.expert_epochs * sched.steps_per_epoch / sched.every)
        if self.span < 1:
            raise ConfigError(f"distill.expert_epochs={d.expert_epochs:g} is shorter than one expert "
                              f"checkpoint interval ({sched.every / sched.steps_per_epoch:.3g} epochs); "
                              "raise it or lower experts.checkpoint_every_steps")
        self.windows = StartWindows(d, sched.steps_per_epoch / sched.every)
        last = self.windows(d.start_window_iterations)[1]  # the window's final upper bound
        if last - 1 + self.span >= sched.count:
            raise ArtifactError(f"experts hold {sched.count} checkpoints; start < {last} plus span "
                                f"{self.span} needs more; re-run experts with the current config (--force)")
        self.every, self.last = sched.every, last

    def describe(self) -> str:
        lo, hi = self.windows(0)
        moving = (f" -> [{lo}, {self.last}) by iteration {self.ctx.cfg.distill.start_window_iterations}"
                  if self.last != hi else "")
        space = f", matched on the outputs of {self.real_batch} real images" if self.real_batch else ""
        return (f"{len(self.experts)} experts, span {self.span} checkpoints ({self.span * self.every} "
                f"steps), start in [{lo}, {hi}){moving}{space}")

    def meta(self) -> dict[str, Any]:
        space = {"real_batch": self.real_batch} if self.real_batch else {}
        return {"num_experts": len(self.experts), **space}

    @property
    def arch(self) -> str:
        """The architecture the experts are of (:attr:`~distilled_ssl.config.ModelConfig.label`)."""
        return self.ctx.cfg.student.label

    def __call__(self, it: int, j: int, g: torch.Generator, dev: torch.device) -> Sample:
        """Sample ``j`` of iteration ``it``; draws its start from ``g`` (before the minibatches)."""
        ef = self._expert_for(it // self.turns * self.ctx.cfg.distill.samples_per_iteration + j)
        s = int(torch.randint(*self.windows(it), (1,), generator=g))
        theta0, theta_target = (t.to(dev) for t in ef.params(s, s + self.span))
        if not self.real_batch:
            return Sample(theta0, theta_target, s)
        _, x = real_batch(self.ctx, it, j, self.real_batch, dev)
        outer = outputs_loss(self.flat, x, theta0, theta_target, self.ctx.cfg.distill.precision)
        return Sample(theta0, outer, s)

    def _expert_for(self, n: int) -> ExpertFile:
        cycle, pos = divmod(n, len(self.experts))
        g = self.ctx.generator(*draw_tags(self.ctx, "cycle", cycle))
        order = torch.randperm(len(self.experts), generator=g)
        return self.experts[int(order[pos])]


class StartWindows:
    """``windows(it) -> (low, high)``: the expert checkpoints a start is drawn from at iteration
    ``it``: :meth:`DistillConfig.start_window` in checkpoint units, at least one checkpoint wide."""

    def __init__(self, d: DistillConfig, checkpoints_per_epoch: float) -> None:
        self.d, self.per_epoch = d, checkpoints_per_epoch

    def __call__(self, it: int) -> tuple[int, int]:
        low, high = self.d.start_window(it)
        lo = round(low * self.per_epoch)
        return lo, max(lo + 1, round(high * self.per_epoch))


class FreshStudents:
    """``distill.method: fidelity``'s samples: a fresh student init and a real batch per sample
    (both seeded by the iteration and the sample), scored by ``1 - R^2`` of the trained student's
    output against the teacher's reps of the batch."""

    loss_name, loss_key = "fidelity loss (1 - R^2 on real images)", "fidelity_loss"

    def __init__(self, ctx: RunContext, flat: FlatParams, reps: torch.Tensor) -> None:
        self.ctx, self.flat, self.reps = ctx, flat, reps
        self.batch = min(ctx.cfg.distill.real_batch, len(reps))

    def describe(self) -> str:
        return (f"fresh {self.ctx.cfg.student.arch} students, scored on {self.batch} real images of "
                f"{len(self.reps)}")

    def meta(self) -> dict[str, Any]:
        return {"real_batch": self.batch}

    def __call__(self, it: int, j: int, g: torch.Generator, dev: torch.device) -> Sample:
        """Sample ``j`` of iteration ``it`` (its own seeds: ``g`` is left to the minibatches)."""
        ctx = self.ctx
        with seeded(ctx.seed_for(*draw_tags(ctx, "student", it, j))):
            theta0 = FlatParams(student_for(ctx, self.reps.shape[1])).flatten().to(dev)
        idx, x = real_batch(ctx, it, j, self.batch, dev)
        return Sample(theta0, fidelity_loss(self.flat, x, self.reps[idx].to(dev),
                                            ctx.cfg.distill.precision), 0)


def real_batch(ctx: RunContext, it: int, j: int, size: int, dev: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``j`` of iteration ``it``'s real training images (seeded by both): their indices and
    the images, normalised, on ``dev``."""
    data = ctx.train_set
    idx = torch.randperm(len(data), generator=ctx.generator(*draw_tags(ctx, "real", it, j)))[:size]
    return idx, normalize(data.images[idx].to(dev), data.mean, data.std)


def outputs_loss(flat: FlatParams, x: torch.Tensor, theta_start: torch.Tensor, theta_target: torch.Tensor,
                 precision: str = "fp32") -> Outer:
    """``theta -> ||f(theta) - f(target)||^2 / ||f(start) - f(target)||^2`` on images ``x``: the
    expert span's end point matched in function space (1 at the start, 0 at the target)."""
    with torch.no_grad(), autocast(precision, x.device):
        end = flat.call(theta_target, x).to(x.dtype)
        total = (flat.call(theta_start, x).to(x.dtype) - end).pow(2).sum()
    if not total > 0:
        raise ConfigError("distill.match_space=outputs: the expert's outputs do not change over the span; "
                          "raise distill.expert_epochs or distill.real_batch")
    return _squared_error(flat, x, end, total, precision)


def fidelity_loss(flat: FlatParams, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32") -> Outer:
    """``theta -> 1 - R^2`` of the student's output on images ``x`` against target reps ``y``."""
    total = (y - y.mean(0)).pow(2).sum()
    if not total > 0:
        raise ConfigError("distill.method=fidelity: the teacher's reps of the real batch do not vary; "
                          "raise distill.real_batch")
    return _squared_error(flat, x, y, total, precision)


def _squared_error(flat: FlatParams, x: torch.Tensor, ref: torch.Tensor, total: torch.Tensor,
                   precision: str) -> Outer:
    """``theta -> ||f(theta, x) - ref||^2 / total`` (under bf16 autocast: compared in ``ref``'s dtype)."""

    def outer(theta: torch.Tensor) -> torch.Tensor:
        with autocast(precision, x.device):
            pred = flat.call(theta, x)
        return (pred.to(ref.dtype) - ref).pow(2).sum() / total

    return outer
