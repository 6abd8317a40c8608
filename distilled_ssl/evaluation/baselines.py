"""The pre-training sets a distilled set is measured against (MKDT.md stage 6).

Names (``eval.baselines``, the table :data:`distilled_ssl.registry.BASELINES`):

* ``none`` — no pre-training: a random-init encoder (batch-norm statistics re-estimated on real images);
* ``random`` — a random real subset of the distilled set's size, with teacher reps (fresh per seed);
* ``init`` — the run's own initial subset (what stage 5 started from);
* ``high_loss`` / ``high_loss_balanced`` — the top-k highest-loss images, plain / k/C per class;
* ``full`` — every source image with teacher reps (the upper reference; ``eval.full_epochs``);
* ``full_steps`` — every source image with teacher reps, pre-trained for as many SGD steps as a set
  of ``k`` images takes (``eval.epochs`` x ceil(k / ``eval.batch_size``)), each step a batch of
  ``eval.batch_size`` fresh images: the equal-compute reference (what distillation adds over
  training on all the data for the same steps, not over training for longer);
* ``full:TEACHER`` — the same with another teacher's reps (``builtin:NAME`` or a teacher file);
* ``teacher`` — the teacher's own representation, probed directly (the ceiling).

Other distilled sets (a KRR-ST run, MKDT from a random init, a downloaded set) are compared by
path (``compare``), not by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..data.sources import normalize
from ..errors import ArtifactError, ConfigError
from ..io import load_tensors
from ..layout import INIT_FILE
from ..models.pretrain import PretrainSet
from ..models.probe import extract
from ..registry import BASELINES
from ..stages.context import RunContext
from ..stages.init import high_loss_scores, load_init, top_k
from ..stages.targets import load_targets
from ..stages.teacher import load_teacher, resolve_weights

__all__ = ["SUBSET_BASELINES", "TUNED_BASELINES", "Baselines", "check_baselines", "init_label"]

SUBSET_BASELINES = ("random", "init", "high_loss", "high_loss_balanced")  # k real images, teacher reps
# trained like the set (its steps, an lr of their own): eval.baseline_lr applies to these
TUNED_BASELINES = (*SUBSET_BASELINES, "full_steps")


def check_baselines(names: Iterable[str]) -> None:
    """Raise :class:`~distilled_ssl.errors.UnknownNameError` (a ValueError) on an unknown baseline
    name (the names: :data:`distilled_ssl.registry.BASELINES`)."""
    for name in names:
        BASELINES.check(name)


def init_label(method: str, class_balanced: bool) -> str:
    """'high_loss', True → 'high-loss init, class-balanced'."""
    text = f"{method.replace('_', '-')} init"
    return text + (", class-balanced" if class_balanced else "")


@dataclass
class Baselines:
    """Builds baseline pre-training sets of ``k`` images for a run (caches what seeds share).
    The subset baselines and ``full_steps`` train at ``lrs[name]``, else at ``lr`` (None:
    ``distill.lr_init``); full-data KD at the experts'."""

    ctx: RunContext
    k: int
    lr: float | None = None
    lrs: dict[str, float] = field(default_factory=dict)  # per baseline (eval.baseline_lr: tuned)

    def __post_init__(self) -> None:
        self._scores: torch.Tensor | None = None
        self._reps: dict[str, torch.Tensor] = {}  # teacher spec ("" = the run's) → reps of every image

    def title(self, name: str) -> str:
        """The row label of a baseline."""
        ic = self.ctx.cfg.init
        n = len(self.ctx.train_set)
        lr = self.lrs.get(name, self.lr)
        at = "" if lr is None else f", lr {lr:.3g}" + (" tuned" if name in self.lrs else "")
        return {
            "none": "none (random init)",
            "random": f"random subset ({self.k:,}{at})",
            "init": f"init subset ({init_label(ic.method, ic.class_balanced)}{at})",
            "high_loss": f"high-loss subset ({self.k:,}{at})",
            "high_loss_balanced": f"high-loss subset, class-balanced ({self.k:,}{at})",
            "full": f"full-data KD ({n:,})",
            "full_steps": f"equal-steps full-data KD ({n:,}; {self.steps} steps{at})",
            "teacher": "teacher (ceiling)",
        }.get(name) or f"full-data KD ({n:,}), teacher {name.split(':', 1)[1]}"

    def pretrain_set(self, name: str, seed: int) -> PretrainSet:
        """The images, reps and lr of a KD baseline (not ``none``/``teacher``) for one seed."""
        ctx, data = self.ctx, self.ctx.train_set
        lr = self.lrs.get(name, ctx.cfg.distill.lr_init if self.lr is None else self.lr)
        if name == "random":
            index = torch.randperm(len(data), generator=ctx.generator("eval", "random", seed))[:self.k]
        elif name == "init":
            index = load_init(ctx)
        elif name in ("high_loss", "high_loss_balanced"):
            labels = data.labels if name == "high_loss_balanced" else None
            if name == "high_loss_balanced" and labels is None:
                raise ConfigError("baseline high_loss_balanced needs a labelled source")
            index = top_k(self._high_loss_scores(), self.k, labels)
        elif name == "full_steps":
            return PretrainSet(self.title(name), normalize(data.images, data.mean, data.std),
                               self._teacher_reps(""), lr, steps=self.steps)
        elif name == "full" or name.startswith("full:"):
            reps = self._teacher_reps(name.split(":", 1)[1]) if ":" in name else self._teacher_reps("")
            return PretrainSet(self.title(name), normalize(data.images, data.mean, data.std), reps,
                               ctx.cfg.experts.lr, epochs=ctx.cfg.eval.full_epochs)
        else:
            raise ConfigError(f"{name!r} is not a KD baseline")
        return PretrainSet(self.title(name), normalize(data.images[index], data.mean, data.std),
                           self._teacher_reps("")[index], lr)

    @property
    def steps(self) -> int:
        """The SGD steps a set of ``k`` images pre-trains for (``full_steps`` takes as many)."""
        ec = self.ctx.cfg.eval
        return ec.epochs * -(-self.k // ec.batch_size)

    def _high_loss_scores(self) -> torch.Tensor:
        if self._scores is None:
            ic = self.ctx.cfg.init
            path = self.ctx.path(INIT_FILE)
            scores = None
            if ic.method == "high_loss" and path.exists():
                try:  # the init stage stored every example's score
                    scores = load_tensors(path, ["scores"])[0]["scores"]
                except ArtifactError:
                    scores = None
            if scores is None or len(scores) != len(self.ctx.train_set):
                scores = high_loss_scores(self.ctx)
            self._scores = scores
        return self._scores

    def _teacher_reps(self, spec: str) -> torch.Tensor:
        """Representations of every source image: the run's target reps ("") or another teacher's."""
        if spec == "" and spec not in self._reps:
            self._reps[spec] = load_targets(self.ctx)
        if spec not in self._reps:
            data = self.ctx.train_set
            c, h, _ = data.shape
            teacher, meta = load_teacher(resolve_weights(spec), in_channels=c, image_size=h,
                                         device=self.ctx.device)
            with torch.inference_mode():
                self._reps[spec] = extract(teacher.features, data.images, tuple(meta["mean"]),
                                           tuple(meta["std"]), device=str(self.ctx.device))
        return self._reps[spec]
