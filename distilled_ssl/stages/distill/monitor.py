"""Validation of a distilled set while it is being made (``distill.eval_every``).

Every ``eval_every`` iterations stage 5 scores a snapshot of the set with a fast version of the
evaluation protocol on the ``source.holdout`` images, which no stage trains on: a fresh
evaluation encoder (``eval.model``, same seed every time, so snapshots are compared on equal
terms) is pre-trained with KD on the snapshot for ``eval.epochs`` epochs, then measured by

* ``fidelity_r2`` — R² of its output against the teacher's reps of (up to 2,000 of) the held-out
  images, and
* ``probe`` — a linear probe trained on a stratified ``eval.label_fractions[0]`` share of the
  training labels (when the source has labels), tested on the held-out images.

Snapshots are pre-trained at their learned lr, or at ``distill.eval_lr`` where set (the lr the set
will be used with, when ``distill.lr_grid`` replaces the learned one).
``distill.keep: best`` keeps the snapshot with the highest ``fidelity_r2``, and
``distill.lr_grid`` chooses the lr the set is stored with by the same protocol from other encoder
seeds (:func:`choose_lr`; the evaluation's ``baseline_lr: tuned`` chooses the baselines' lrs the
same way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ...data.downstream import stratified_fraction
from ...data.viz import save_line_panels
from ...errors import ConfigError, DivergenceError
from ...layout import TEACHER_FILE
from ...models.pretrain import PretrainSet, pretrain_kd
from ...models.probe import extract, linear_probe
from ..context import RunContext
from ..teacher import load_teacher

KEEP_METRIC = "fidelity_r2"
EVAL_IMAGES = 2000  # held-out images a snapshot is scored on (at most)


@dataclass
class SnapshotScorer:
    """Scores (normalised images, target reps, lr) snapshots on the held-out images."""

    ctx: RunContext
    val_images: torch.Tensor  # uint8 [n, C, H, W]
    val_reps: torch.Tensor  # the teacher's reps of val_images
    val_labels: torch.Tensor | None
    probe_images: torch.Tensor | None  # labelled training images for the probe
    probe_labels: torch.Tensor | None
    first_seed: int = 0  # encoder seeds first_seed .. first_seed + distill.eval_seeds - 1

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                 steps: int | None = None) -> dict[str, float]:
        """The mean of each metric over ``distill.eval_seeds`` encoder inits (the same every time);
        ``steps``: pre-train for that many SGD steps instead of ``eval.epochs`` epochs."""
        seeds = range(self.first_seed, self.first_seed + self.ctx.cfg.distill.eval_seeds)
        runs = [self.score_seed(images, targets, lr, seed, steps=steps) for seed in seeds]
        return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}

    def unseen_seeds(self) -> SnapshotScorer:
        """The same protocol from the next ``distill.eval_seeds`` encoder seeds: a kept snapshot's
        score is the best of the curve, luck included, so comparing lrs on the seeds that chose it
        would favour the lr the curve was scored at."""
        return replace(self, first_seed=self.first_seed + self.ctx.cfg.distill.eval_seeds)

    def score_seed(self, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor | float,
                   seed: int, epochs: int | None = None, steps: int | None = None) -> dict[str, float]:
        """One encoder seed's scores: the encoder pre-trained for ``epochs`` (default
        ``eval.epochs``; or ``steps`` SGD steps) at ``lr`` from the init of ``seed``; -inf where the
        pre-training diverges."""
        cfg, data = self.ctx.cfg, self.ctx.train_set
        model_cfg = cfg.eval.model or cfg.student
        c, h, _ = data.shape
        dev = str(self.ctx.device)
        pset = PretrainSet("snapshot", images.detach(), targets.detach(), float(lr), steps=steps)
        # seed 0 keeps the seed that one-seed curves were scored with
        tags = ("distill", "monitor") if seed == 0 else ("distill", "monitor", seed)
        try:
            model = pretrain_kd(model_cfg.arch, model_cfg.kwargs, pset, in_channels=c, image_size=h,
                                target_dim=targets.shape[1], epochs=epochs or cfg.eval.epochs,
                                batch_size=cfg.eval.batch_size, seed=self.ctx.seed_for(*tags), device=dev,
                                precise_bn=cfg.eval.precise_bn)
        except DivergenceError:
            lost = {KEEP_METRIC: float("-inf")}
            return lost if self.probe_images is None else {**lost, "probe": float("-inf")}
        val_f = extract(model.eval().features, self.val_images, data.mean, data.std, device=dev)
        with torch.no_grad():
            pred = model.head(val_f.to(dev)).cpu()
        sse = (pred - self.val_reps).pow(2).sum()
        out = {KEEP_METRIC: float(1 - sse / (self.val_reps - self.val_reps.mean(0)).pow(2).sum())}
        if self.probe_images is not None and self.val_labels is not None:
            assert self.probe_labels is not None
            train_f = extract(model.features, self.probe_images, data.mean, data.std, device=dev)
            out["probe"] = linear_probe(train_f, self.probe_labels, val_f, self.val_labels)
        return out


def choose_lr(scorer: SnapshotScorer, images: torch.Tensor, targets: torch.Tensor,
              candidates: Sequence[float], metric: str = KEEP_METRIC,
              log: Callable[[str], None] | None = None, steps: int | None = None
              ) -> tuple[float, list[dict[str, float]]]:
    """The candidate lr whose pre-training (``eval.epochs`` epochs, or ``steps`` SGD steps) scores
    highest on ``metric`` (the first on a tie), and
    every candidate's scores (``[{"lr": .., metric: .., ...}]``, in the candidates' order, the
    scores rounded to 6 decimals as stored in metadata and results). The runs use the scorer's
    :meth:`~SnapshotScorer.unseen_seeds`, never the encoder seeds of the validation curve."""
    scorer = scorer.unseen_seeds()
    scores: list[dict[str, float]] = []
    for lr in dict.fromkeys(float(v) for v in candidates):  # each once, in order
        point = {"lr": lr, **scorer(images, targets, torch.tensor(lr), steps=steps)}
        if metric not in point:
            raise ConfigError(f"distill.keep_metric={metric}: the held-out scores have no {metric} (the "
                              "source has no labels); use distill.keep_metric=fidelity_r2")
        scores.append(point)
        if log is not None:
            log(f"lr {lr:.4g}: " + ", ".join(f"{k} {v:.4f}" for k, v in point.items() if k != "lr"))
    if not scores:
        raise ConfigError("choosing an lr needs at least one candidate")
    best = max(scores, key=lambda p: p[metric])  # max keeps the first of equal scores
    # scores to 6 decimals; each lr as it is (a learned lr at its 1e-8 floor would round to 0)
    return best["lr"], [{k: v if k == "lr" else round(v, 6) for k, v in p.items()} for p in scores]


def build_scorer(ctx: RunContext) -> SnapshotScorer:
    """The scorer for a run: the teacher's reps of the held-out images, the probe's label subset."""
    held = ctx.validation_set
    if held is None:
        raise ConfigError("distill.eval_every needs held-out images to score on: set source.holdout "
                         "(e.g. 5000), or distill.eval_every=0")
    if len(held) > EVAL_IMAGES:  # a fixed seeded share keeps each score to a few seconds
        held = held.subset(torch.randperm(len(held), generator=ctx.generator("distill", "monitor",
                                                                              "images"))[:EVAL_IMAGES])
    c, h, _ = ctx.train_set.shape
    dev = ctx.device
    teacher, meta = load_teacher(ctx.path(TEACHER_FILE), in_channels=c, image_size=h, device=dev)
    with torch.inference_mode():
        reps = extract(teacher.features, held.images, tuple(meta["mean"]), tuple(meta["std"]),
                       device=str(dev))
    data = ctx.train_set
    probe_images = probe_labels = None
    if data.labels is not None and held.labels is not None:
        idx = stratified_fraction(data.labels, ctx.cfg.eval.label_fractions[0],
                                  ctx.seed_for("distill", "monitor", "labels"))
        probe_images, probe_labels = data.images[idx], data.labels[idx]
    return SnapshotScorer(ctx, held.images, reps, held.labels, probe_images, probe_labels)


def save_curve(path: Path, curve: list[dict[str, Any]], losses: list[float], kept: int | None,
               lr: float = 0.0, loss_name: str = "matching loss") -> None:
    """PNG: validation fidelity (and probe) per iteration above the stage's loss; a dashed line
    marks the snapshot that was kept. ``lr``: the lr snapshots were pre-trained at (0: learned)."""
    at = f", pre-trained at lr {lr:g}" if lr else ""
    titles = {KEEP_METRIC: f"teacher fidelity R^2 (held-out images{at})", "probe": "linear probe (held-out)"}
    panels = [(titles[m], [(float(p["iteration"]), float(p[m])) for p in curve if m in p])
              for m in (KEEP_METRIC, "probe") if any(m in p for p in curve)]
    window = 10
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    panels.append((f"{loss_name} (mean of the last {window} iterations)",
                   [(float(i + 1), v) for i, v in enumerate(smooth)]))
    save_line_panels(path, panels, marker=kept)
