"""Stage 5 — distillation by matching knowledge-distillation trajectories (MKDT).

Learnable: images X [k, C, H, W] (normalised pixel space), target reps Y [k, D] and a scalar lr.
Each iteration takes the next expert (a fresh seeded order per cycle through all experts), a start
checkpoint s uniform in [min_start_epoch, max_start_epoch) (a window that can move later as
distillation proceeds, as in DATM: ``max_start_epoch_end``), trains ``syn_steps`` SGD steps from
theta_s on the synthetic set and matches theta_{s+expert_epochs} (see
:mod:`distilled_ssl.stages.distill.matching`). X, Y and lr are updated with SGD (momentum 0.5), and
by the priors of :mod:`.updates`. With ``distill.eval_every`` the set is scored on held-out images
as it goes (:mod:`.monitor`), ``distill.keep: best`` keeps the best snapshot, and
``distill.lr_grid`` chooses the lr the set is stored with on the same held-out images. The state is
checkpointed every ``checkpoint_every`` iterations; a rerun continues where it stopped, and raising
``distill.iterations`` continues a finished run. Output: ``distilled.safetensors`` and
``distilled.png``.

With ``experts.extra_students`` the iterations take the architectures in turn (iteration i
matches an expert of architecture i mod A, each cycling through its own experts).

``distill.method: fidelity`` runs this loop with another objective (:mod:`.objectives`): a fresh
student per sample instead of an expert's checkpoint, scored by its fidelity on real images instead
of the distance to the expert's later checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ...data.sources import normalize
from ...distributed import all_gather_objects, all_gather_rows, is_main, rank, world_size
from ...errors import ConfigError, DivergenceError
from ...io import read_metadata, save_tensors
from ...layout import CURVE_FILE, DISTILLED_FILE, STATE_FILE
from ...models.encoders import FlatParams, seeded
from ...registry import MATCHERS
from ..context import RunContext, student_for
from ..experts import ExpertFile, student_views  # noqa: F401 (ExpertFile: the tests patch it here)
from ..init import load_init
from ..targets import load_targets
from .common import (
    IterationLog,
    distill_fingerprint,
    initial_state,
    lr_grid_done,
    rounded_mean,
    select_lr,
    write_distilled,
)
from .compiled import CompiledSteps
from .matching import MatchResult, match_batched, minibatches
from .monitor import SnapshotScorer, build_scorer, save_curve
from .objectives import ExpertSpans, FreshStudents, Sample, StartWindows, draw_tags  # noqa: F401 (StartWindows: API)
from .updates import TeacherOnSet, adam_step, laplacian, pixel_range


def run_mkdt(ctx: RunContext, *, force: bool = False) -> Path:
    """Stage 5 by MKDT (or ``method: fidelity``): write ``distilled.safetensors`` and
    ``distilled.png`` (resumable)."""
    out = ctx.path(DISTILLED_FILE)
    fp = distill_fingerprint(ctx)
    d = ctx.cfg.distill
    if not force and out.exists():
        meta = read_metadata(out)
        stopped_early = meta.get("stopped_at") is not None and 0 < d.patience <= meta.get("patience", 0)
        finished = meta.get("iterations", -1) >= d.iterations or stopped_early
        if meta.get("fingerprint") == fp and finished and lr_grid_done(meta, ctx):
            ctx.log.info("distill: %s exists (%d iterations%s), skipping", out, meta["iterations"],
                         ", stopped early" if stopped_early else "")
            return out
    dev = ctx.device
    index = load_init(ctx)
    reps = load_targets(ctx)
    k = len(index)
    fidelity = d.method == "fidelity"
    # the student, then (experts.extra_students, mkdt only) each other architecture: iteration it
    # matches the experts of architecture it mod A
    views = student_views(ctx)
    flats: list[FlatParams] = []
    for view in views:
        with seeded(ctx.seed_for("distill", "structure")):  # its weights are never used
            flats.append(FlatParams(student_for(view, reps.shape[1]).to(dev).train()))
    objectives: list[ExpertSpans | FreshStudents] = (
        [FreshStudents(ctx, flats[0], reps)] if fidelity else
        [ExpertSpans(view, flat, reps.shape[1], turns=len(views))
         for view, flat in zip(views, flats, strict=True)])
    objective = objectives[0]
    state = initial_state(ctx, index, reps, fp, dev, force)
    images, targets, lr = state["images"], state["targets"], state["lr"]
    moms = {n: state.get(f"momentum.{n}", torch.zeros_like(state[n])) for n in ("images", "targets", "lr")}
    history: list[float] = state["meta"].get("history", [])
    norms: dict[str, float] = state["meta"].get("norm_ema", {})
    start = int(state["meta"].get("iteration", 0))
    if start == 0:
        ctx.log.info("distill (%s): %d images, %s, %s mode, syn_steps %d%s, batch %d", d.method, k,
                     _describe(objectives), d.mode, d.syn_steps,
                     f" (heavy-ball, momentum {d.inner_momentum:g})" if d.inner_momentum else "",
                     min(d.batch_syn, k))
    if d.samples_per_iteration % world_size() and is_main():
        ctx.log.warning("distill: %d trajectory sample(s) per iteration on %d ranks: %d rank(s) idle "
                        "for part of every iteration; set distill.samples_per_iteration to a multiple "
                        "of the number of ranks", d.samples_per_iteration, world_size(),
                        world_size() - d.samples_per_iteration % world_size())
    matcher = MATCHERS[d.mode]
    steps = [CompiledSteps(flat, precision=d.precision, image_grads=d.lr_img > 0,
                           cuda_graphs=d.cuda_graphs, batched=d.batch_samples) if d.compile else None
             for flat in flats]
    lrs = {"images": d.lr_img, "targets": d.lr_targets, "lr": d.lr_lr}
    adam = {"images"} if d.image_optimizer == "adam" else set()
    sq = {n: state.get(f"sq.{n}", torch.zeros_like(state[n])) for n in adam}
    data = ctx.train_set
    bounds = pixel_range(data.mean, data.std, dev) if d.clamp else None
    start_images = normalize(data.images[index].to(dev), data.mean, data.std) if d.smooth else None
    teacher = TeacherOnSet(ctx) if d.targets_anchor > 0 else None
    scorer = build_scorer(ctx) if d.eval_every and is_main() else None
    curve: list[dict[str, Any]] = state["meta"].get("curve", [])
    best = {n: state[f"best.{n}"] for n in ("images", "targets", "lr") if f"best.{n}" in state}
    if scorer is not None and not curve:
        _score(ctx, scorer, curve, best, 0, images, targets, lr, None)
    stopped = _stalled(curve, d.patience, d.keep_metric)  # a run that stopped early stays stopped
    if stopped and start < d.iterations:
        ctx.log.info("distill: stopped early at iteration %d (distill.patience=%d); raise it to carry on",
                     start, d.patience)
    bar = ctx.bar(total=d.iterations, initial=start, desc="distill")
    progress = IterationLog(d.iterations, d.log_every, bar)
    for it in range(start, start if stopped else d.iterations):
        turn = it % len(objectives)
        if d.batch_samples:  # this rank's samples walked together (vmap)
            samples = partial(_batched_gradients, ctx, objectives[turn], it, images=images,
                              targets=targets, lr=lr, steps=steps[turn])
        else:
            one = partial(_sample_gradient, ctx, objectives[turn], it, flat=flats[turn], matcher=matcher,
                          images=images, targets=targets, lr=lr, steps=steps[turn])
            samples = partial(_one_by_one, one)
        loss, grads, s = _meta_gradient(ctx, {"images": images, "targets": targets, "lr": lr}, samples)
        if not math.isfinite(loss) or not all(torch.isfinite(v).all() for v in grads.values()):
            raise DivergenceError(f"distill iteration {it}: non-finite {objective.loss_name} or gradient; "
                                  "lower distill.lr_img / lr_targets / lr_lr or set clip_grad")
        with torch.no_grad():
            params = {"images": images, "targets": targets, "lr": lr}
            for name, grad in grads.items():
                grad = _clip(grad, name, norms, d.clip_grad)
                if name in adam:
                    adam_step(params[name], grad, moms[name], sq[name], lrs[name], it + 1)
                    continue
                moms[name].mul_(d.momentum).add_(grad)
                params[name].sub_(lrs[name] * moms[name])
            lr.clamp_(min=1e-8)
            if d.smooth:  # smooth what distillation changed, not the real images it started from
                images.add_(laplacian(images - start_images), alpha=d.smooth)
            if bounds is not None:
                images.clamp_(*bounds)
            if teacher is not None:
                targets.lerp_(teacher.reps(images), d.targets_anchor)
        history.append(loss)
        done = it + 1
        report = progress.record(done, loss)
        if report is not None:
            mean, sec, eta = report
            ctx.log.info("distill %d/%d: %s %.4f%s, lr %.4g, %.2f s/it, ETA %s", done, d.iterations,
                         objective.loss_name, mean, "" if fidelity else f" (start {s})", float(lr),
                         sec, eta)
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{float(lr):.3g}")
        scored = bool(d.eval_every) and (done % d.eval_every == 0 or done == d.iterations)
        if scorer is not None and scored:
            _score(ctx, scorer, curve, best, done, images, targets, lr, history, objective.loss_key)
        if d.patience and scored:  # rank 0 scores; every rank stops with it
            stopped = all_gather_objects(_stalled(curve, d.patience, d.keep_metric))[0]
        if is_main() and (done % d.checkpoint_every == 0 or done == d.iterations or stopped):
            extra = {f"sq.{n}": v for n, v in sq.items()}
            extra.update({f"best.{n}": v for n, v in best.items()})
            _save_state(ctx.path(STATE_FILE), images, targets, lr, moms,
                        {"iteration": done, "history": history, "norm_ema": norms, "fingerprint": fp,
                         "curve": curve}, extra)
        if stopped:
            ctx.log.info("distill: stopping at iteration %d: the last %d held-out scores were below "
                         "the best (distill.patience)", done, d.patience)
            break
    bar.close()
    if not is_main():  # rank 0 writes the set (every rank holds the same one)
        return out
    kept = None
    if d.keep == "best" and best:
        kept = max(curve, key=lambda p: p[d.keep_metric])
        images, targets, lr = best["images"], best["targets"], best["lr"]
        ctx.log.info("distill: keeping the snapshot of iteration %d (held-out %s %.4f)",
                     kept["iteration"], d.keep_metric, kept[d.keep_metric])
    if curve:
        save_curve(ctx.path(CURVE_FILE), curve, history, None if kept is None else kept["iteration"],
                   d.eval_lr, loss_name=objective.loss_name)
    lr, chosen = select_lr(ctx, images, targets, lr, scorer)
    write_distilled(ctx, out, fp, index, images, targets, lr, history, method=d.method,
                     extra={**objective.meta(), **_cross_meta(objectives),
                            objective.loss_key: {"first": rounded_mean(history[:10]),
                                              "last": rounded_mean(history[-10:])},
                            **({"validation_curve": curve} if curve else {}),
                            **({"kept_iteration": kept["iteration"]} if kept else {}),
                            **({"validation_lr": d.eval_lr} if curve and d.eval_lr else {}),
                            **({"stopped_at": len(history), "patience": d.patience} if stopped else {}),
                            **chosen})
    return out


def _describe(objectives: list[ExpertSpans | FreshStudents]) -> str:
    """The start log's account of the samples (every architecture's, when they take turns)."""
    if len(objectives) == 1:
        return objectives[0].describe()
    return "architectures in turn: " + "; ".join(f"{o.arch}: {o.describe()}" for o in objectives
                                                 if isinstance(o, ExpertSpans))


def _cross_meta(objectives: list[ExpertSpans | FreshStudents]) -> dict[str, Any]:
    """The set's metadata on cross-architecture matching (nothing for one architecture)."""
    if len(objectives) == 1:
        return {}
    return {"cross_architecture": [{"arch": o.ctx.cfg.student.arch, "kwargs": o.ctx.cfg.student.kwargs,
                                    "num_experts": len(o.experts)}
                                   for o in objectives if isinstance(o, ExpertSpans)]}


def _stalled(curve: list[dict[str, Any]], patience: int, metric: str) -> bool:
    """Whether the last ``patience`` scores all came after the best one (never with patience 0)."""
    if not patience or not curve:
        return False
    values = [p[metric] for p in curve]
    return len(values) - 1 - values.index(max(values)) >= patience


def _score(ctx: RunContext, scorer: SnapshotScorer, curve: list[dict[str, Any]],
           best: dict[str, torch.Tensor], done: int, images: torch.Tensor, targets: torch.Tensor,
           lr: torch.Tensor, history: list[float] | None,
           loss_key: str = "matching_loss") -> None:
    """Score the current set on the held-out images; remember it when it is the best so far."""
    t0 = time.perf_counter()
    at = ctx.cfg.distill.eval_lr
    point: dict[str, Any] = {"iteration": done, **scorer(images, targets, torch.tensor(at) if at else lr)}
    if history:
        point[loss_key] = rounded_mean(history[-ctx.cfg.distill.eval_every:])
    metric = ctx.cfg.distill.keep_metric
    if metric not in point:
        raise ConfigError(f"distill.keep_metric={metric}: the held-out scores have no {metric} (the "
                          "source has no labels); use distill.keep_metric=fidelity_r2")
    if not curve or point[metric] > max(p[metric] for p in curve):
        best.update(images=images.clone(), targets=targets.clone(), lr=lr.clone())
    curve.append(point)
    ctx.log.info("distill %d: held-out %s (%.1f s)", done,
                 ", ".join(f"{k} {v:.4f}" for k, v in point.items() if k != "iteration"),
                 time.perf_counter() - t0)


def _draw(ctx: RunContext, objective: ExpertSpans | FreshStudents, it: int, j: int, images: torch.Tensor
          ) -> tuple[Sample, list[torch.Tensor]]:
    """Sample ``j`` of iteration ``it``: its start and end point, then its minibatches, from one
    generator seeded by both (sample 0 is the one sample of ``samples_per_iteration: 1``)."""
    d, dev = ctx.cfg.distill, images.device
    g = ctx.generator(*draw_tags(ctx, it) if j == 0 else draw_tags(ctx, it, "sample", j))
    sample = objective(it, j, g, dev)
    return sample, [b.to(dev) for b in minibatches(len(images), d.batch_syn, d.syn_steps, g)]


def _sample_gradient(ctx: RunContext, objective: ExpertSpans | FreshStudents, it: int, j: int,
                     flat: FlatParams, matcher: Callable[..., MatchResult], images: torch.Tensor,
                     targets: torch.Tensor, lr: torch.Tensor, steps: CompiledSteps | None = None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Inner-loop sample ``j`` of iteration ``it`` (:func:`_draw`): loss, gradients, start."""
    d = ctx.cfg.distill
    sample, batches = _draw(ctx, objective, it, j, images)
    res = matcher(flat, sample.theta0, sample.outer, images, targets, lr, batches, precision=d.precision,
                  keep_graphs=d.keep_graphs, image_grads=d.lr_img > 0, steps=steps,
                  momentum=d.inner_momentum)
    return res.loss, {"images": res.grad_images, "targets": res.grad_targets, "lr": res.grad_lr}, sample.start


SampleResult = tuple[torch.Tensor, dict[str, torch.Tensor], int]  # loss, gradients, start


def _one_by_one(sample: Callable[[int], SampleResult], js: list[int]) -> list[SampleResult]:
    return [sample(j) for j in js]


def _batched_gradients(ctx: RunContext, objective: ExpertSpans | FreshStudents, it: int, js: list[int],
                       images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                       steps: CompiledSteps | None = None) -> list[SampleResult]:
    """The samples ``js`` of iteration ``it`` walked together (``distill.batch_samples``): each
    drawn as :func:`_draw` draws it for the one-by-one loop, one batched call per inner step."""
    assert steps is not None and steps.batched  # config: batch_samples needs compile
    drawn = [_draw(ctx, objective, it, j, images) for j in js]
    results = match_batched(steps, torch.stack([x.theta0 for x, _ in drawn]), [x.outer for x, _ in drawn],
                            images, targets, lr, [b for _, b in drawn])
    return [(r.loss, {"images": r.grad_images, "targets": r.grad_targets, "lr": r.grad_lr}, x.start)
            for r, (x, _) in zip(results, drawn, strict=True)]


def _meta_gradient(ctx: RunContext, params: dict[str, torch.Tensor],
                   samples: Callable[[list[int]], list[SampleResult]],
                   ) -> tuple[float, dict[str, torch.Tensor], int]:
    """The iteration's loss and gradients (w.r.t. ``params``) averaged over its
    ``samples_per_iteration`` samples, and sample 0's start. Under torchrun rank r computes the
    samples j = r mod world size; every rank gathers them all (copies) and sums them in sample
    order, so any number of ranks gives the same bits."""
    n, ranks = ctx.cfg.distill.samples_per_iteration, world_size()
    ref = params["images"]
    rows = torch.zeros(len(range(rank(), n, ranks)), 2 + sum(p.numel() for p in params.values()),
                       dtype=ref.dtype, device=ref.device)
    for row, (loss, grads, start) in zip(rows, samples(list(range(rank(), n, ranks))), strict=True):
        # row = [loss, start, gradients in params' order]
        row[:2] = torch.tensor([float(loss), start])
        torch.cat([grads[name].reshape(-1) for name in params], out=row[2:])
    counts = [len(range(r, n, ranks)) for r in range(ranks)]
    gathered = all_gather_rows(rows, counts)
    offsets = [sum(counts[:r]) for r in range(ranks)]
    total = gathered[0]
    for j in range(1, n):
        total = total + gathered[offsets[j % ranks] + j // ranks]
    total = total / n
    sizes = [p.numel() for p in params.values()]
    grads = {name: g.view_as(p) for (name, p), g in
             zip(params.items(), total[2:].split(sizes), strict=True)}
    return float(total[0]), grads, int(gathered[0, 1])


def _clip(grad: torch.Tensor, name: str, norms: dict[str, float], factor: float | None) -> torch.Tensor:
    """Clip to ``factor`` x the running mean of this tensor's gradient norms (scale-free)."""
    if factor is None:
        return grad
    norm = float(grad.norm())
    ref = norms.get(name)
    if ref is not None and norm > factor * ref:
        grad = grad * (factor * ref / norm)
        norm = factor * ref
    norms[name] = norm if ref is None else 0.9 * ref + 0.1 * norm
    return grad


def _save_state(path: Path, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                moms: dict[str, torch.Tensor], meta: dict[str, Any],
                extra: dict[str, torch.Tensor] | None = None) -> None:
    tensors = {"images": images, "targets": targets, "lr": lr}
    tensors.update({f"momentum.{n}": m for n, m in moms.items()})
    tensors.update(extra or {})
    save_tensors(path, tensors, meta)
