"""Stage 5's bookkeeping, shared by every method (MKDT, KRR-ST): the fingerprint, the initial or
resumed state, the iteration log and writing the distilled set."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..._version import __version__
from ...data.sources import denormalize, normalize
from ...data.viz import pick_for_grid, save_comparison
from ...errors import ArtifactError
from ...io import load_tensors, read_metadata, save_tensors
from ...layout import GRID_FILE, INIT_FILE, STATE_FILE, TARGETS_FILE, TEACHER_FILE
from ..context import RunContext, combine
from ..experts import experts_fingerprint, student_views
from ..init import init_fingerprint
from .monitor import SnapshotScorer, build_scorer, choose_lr

IMAGE_ENCODING = "float16 pixels in [0, 1] scale (un-normalised, not clamped)"


def distill_fingerprint(ctx: RunContext) -> str:
    """Everything that changes the result except the iteration count (so runs can be extended)."""
    if not ctx.path(INIT_FILE).exists():
        raise ArtifactError(f"{ctx.path(INIT_FILE)} is missing: run the init stage first")
    d = ctx.cfg.distill
    # keep_graphs: same bits; compile, cuda_graphs, batch_samples: the same computation up to float
    # rounding; patience: when to stop, as iterations (a stopped run carries on with a larger one)
    # lr_grid: chosen after matching from the stored state (a new grid re-chooses, no re-matching)
    skip = {"iterations", "patience", "log_every", "checkpoint_every", "keep_graphs", "compile",
            "cuda_graphs", "batch_samples", "lr_grid"}
    if d.method != "krr_st":
        skip.add("krr_st")
    if d.method != "fidelity" and d.match_space == "params":
        skip.add("real_batch")
    keys = {k: v for k, v in ctx.cfg.hashed_dict()["distill"].items() if k not in skip}
    # cross-architecture matching: the extra students' experts too (nothing added without them)
    extra = [experts_fingerprint(view) for view in student_views(ctx)[1:]]
    return combine(init_fingerprint(ctx), "distill", repr(sorted(keys.items())), str(ctx.cfg.seed), *extra)


class IterationLog:
    """Loss and seconds per iteration over each ``every`` iterations, for the stage-5 loops."""

    def __init__(self, total: int, every: int, bar: Any) -> None:
        self.total, self.every, self.bar = total, every, bar
        self.t0, self.window = time.perf_counter(), []

    def record(self, done: int, loss: float) -> tuple[float, float, str] | None:
        """Count iteration ``done`` (1-based); on a log step return (mean loss, s/it, ETA)."""
        self.window.append(loss)
        self.bar.update(1)
        if done % self.every and done != self.total:
            return None
        sec = (time.perf_counter() - self.t0) / len(self.window)
        report = statistics.fmean(self.window), sec, _eta(sec * (self.total - done))
        self.t0, self.window = time.perf_counter(), []
        return report


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def initial_state(ctx: RunContext, index: torch.Tensor, reps: torch.Tensor, fp: str,
                   dev: torch.device, force: bool) -> dict[str, Any]:
    """The loop's state: resumed from ``distill_state.safetensors`` when it fits, else the init
    subset's images and teacher reps and ``distill.lr_init``."""
    path = ctx.path(STATE_FILE)
    if path.exists() and not force:
        try:
            tensors, meta = load_tensors(path)
        except ArtifactError as exc:
            raise ArtifactError(f"{exc}. Delete {path} to restart distillation from scratch") from exc
        if meta.get("fingerprint") == fp:
            ctx.log.info("distill: resuming after iteration %d", meta["iteration"])
            state: dict[str, Any] = {n: t.to(dev) for n, t in tensors.items()}
            state["meta"] = meta
            return state
        raise ArtifactError(f"{path} belongs to a run with a different configuration; re-run with "
                            "--force or use a new --out directory")
    data = ctx.train_set
    images = normalize(data.images[index].to(dev), data.mean, data.std)
    return {"images": images, "targets": reps[index].clone().to(dev),
            "lr": torch.tensor(ctx.cfg.distill.lr_init, device=dev), "meta": {}}


def write_distilled(ctx: RunContext, out: Path, fp: str, index: torch.Tensor, images: torch.Tensor,
                     targets: torch.Tensor, lr: torch.Tensor, history: list[float], *, method: str,
                     extra: dict[str, Any]) -> None:
    """Write the distilled set of either method; ``extra`` is the method's own metadata."""
    data = ctx.train_set
    pixels = denormalize(images.detach().cpu(), data.mean, data.std)
    tensors = {"images": pixels.half(), "targets": targets.detach().cpu().float(),
               "lr": lr.detach().cpu().float().reshape(()),
               "source_index": data.original_index(index).long()}
    if data.labels is not None:
        tensors["labels"] = data.labels[index]
    teacher = read_metadata(ctx.path(TEACHER_FILE))
    c, h, w = data.shape
    cfg = ctx.cfg
    meta = {
        "kind": "distilled_set", "method": method, "fingerprint": fp,
        "library_version": __version__, "iterations": len(history),
        "num_images": len(index), "image_shape": [c, h, w], "target_dim": targets.shape[1],
        "image_encoding": IMAGE_ENCODING,
        "normalization": {"mean": list(data.mean), "std": list(data.std)},
        "source": {"name": cfg.source.name, "num_images": len(data), "subset": cfg.source.subset},
        "teacher": {k: teacher.get(k) for k in ("arch", "kwargs", "feature_dim", "mean", "std",
                                                "loaded_from", "probe_accuracy")},
        "student": {"arch": cfg.student.arch, "kwargs": cfg.student.kwargs},
        "init": {"method": cfg.init.method, "class_balanced": cfg.init.class_balanced},
        **extra,
        "config": cfg.to_dict(),
        "targets_file": read_metadata(ctx.path(TARGETS_FILE)).get("fingerprint"),
    }
    save_tensors(out, tensors, meta)
    shown = pick_for_grid(tensors.get("labels"), len(index))
    initial = data.images[index][shown].float() / 255.0
    save_comparison(ctx.path(GRID_FILE), initial, pixels[shown])
    ctx.log.info("distill: wrote %s (%s, %d images, lr %.4g) and %s", out, method, len(index),
                 float(lr), ctx.path(GRID_FILE))


def lr_grid_done(meta: dict[str, Any], ctx: RunContext) -> bool:
    """Whether a written set's lr was chosen with the configured ``distill.lr_grid``."""
    return [float(v) for v in meta.get("lr_grid", [])] == [float(v) for v in ctx.cfg.distill.lr_grid]


def select_lr(ctx: RunContext, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
              scorer: SnapshotScorer | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """``distill.lr_grid``: the lr the set is stored with, chosen among its learned ``lr`` and the
    grid by the held-out score (``distill.keep_metric``); and the metadata that records the choice.
    With an empty grid: the learned lr, no metadata."""
    d = ctx.cfg.distill
    if not d.lr_grid:
        return lr, {}
    scorer = scorer or build_scorer(ctx)
    learned = float(lr)
    ctx.log.info("distill: choosing the set's lr on the held-out images among the learned %.4g and "
                 "distill.lr_grid %s", learned, d.lr_grid)
    chosen, scores = choose_lr(scorer, images, targets, [learned, *d.lr_grid], d.keep_metric,
                               log=lambda msg: ctx.log.info("distill: %s", msg))
    ctx.log.info("distill: the set's lr is %.4g (learned %.4g)", chosen, learned)
    meta = {"lr_learned": learned, "lr_grid": [float(v) for v in d.lr_grid],
            "lr_scores": scores}
    return torch.tensor(chosen, dtype=lr.dtype, device=lr.device), meta


def rounded_mean(xs: list[float]) -> float | None:
    """The mean to 6 decimals (None for no values), as stored in the set's metadata."""
    return round(statistics.fmean(xs), 6) if xs else None
