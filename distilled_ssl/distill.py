"""Stage 5 — distillation by matching knowledge-distillation trajectories (MKDT).

Learnable: images X [k, C, H, W] (normalised pixel space), target reps Y [k, D] and a scalar lr.
Each iteration takes the next expert (a fresh seeded order per cycle through all experts), a start
checkpoint s uniform in [0, max_start_epoch), trains ``syn_steps`` SGD steps from theta_s on the
synthetic set and matches theta_{s+expert_epochs} (see :mod:`distilled_ssl.matching`). X, Y and lr
are updated with SGD (momentum 0.5). The state is checkpointed every ``checkpoint_every``
iterations; a rerun continues where it stopped, and raising ``distill.iterations`` continues a
finished run. Output: ``distilled.safetensors`` and ``distilled.png``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .context import RunContext, combine
from .data import denormalize, normalize
from .experts import ExpertFile, list_experts, student_for
from .initial_set import INIT_FILE, init_fingerprint, load_init
from .io import ArtifactError, load_tensors, read_metadata, save_tensors
from .matching import MATCHERS, minibatches
from .models import FlatParams
from .monitor import CURVE_FILE, KEEP_METRIC, SnapshotScorer, build_scorer, save_curve
from .targets import TARGETS_FILE, load_targets
from .teacher import TEACHER_FILE, load_teacher
from .viz import pick_for_grid, save_comparison

DISTILLED_FILE = "distilled.safetensors"
STATE_FILE = "distill_state.safetensors"
GRID_FILE = "distilled.png"
IMAGE_ENCODING = "float16 pixels in [0, 1] scale (un-normalised, not clamped)"
# Fields added after runs were made: left out of the fingerprint while at their default.
_ADDED_DEFAULTS: dict[str, Any] = {"clamp": False, "smooth": 0.0, "image_optimizer": "sgd",
                                   "targets_anchor": 0.0, "eval_every": 0, "keep": "last"}


def distill_fingerprint(ctx: RunContext) -> str:
    """Everything that changes the result except the iteration count (so runs can be extended)."""
    if not ctx.path(INIT_FILE).exists():
        raise ArtifactError(f"{ctx.path(INIT_FILE)} is missing: run the init stage first")
    d = ctx.cfg.distill
    skip = {"iterations", "log_every", "checkpoint_every"} | ({"krr_st"} if d.method == "mkdt" else set())
    keys = {k: v for k, v in asdict(d).items()
            if k not in skip and not (k in _ADDED_DEFAULTS and v == _ADDED_DEFAULTS[k])}
    return combine(init_fingerprint(ctx), "distill", repr(sorted(keys.items())), str(ctx.cfg.seed))


def run_distill(ctx: RunContext, *, force: bool = False) -> Path:
    """Stage 5: write ``distilled.safetensors`` and ``distilled.png`` (resumable).

    ``distill.method: krr_st`` runs the KRR-ST baseline instead (:mod:`distilled_ssl.krr_st`).
    """
    if ctx.cfg.distill.method == "krr_st":
        from .krr_st import run_krr_st  # krr_st imports this module

        return run_krr_st(ctx, force=force)
    out = ctx.path(DISTILLED_FILE)
    fp = distill_fingerprint(ctx)
    d = ctx.cfg.distill
    if not force and out.exists():
        meta = read_metadata(out)
        if meta.get("fingerprint") == fp and meta.get("iterations", -1) >= d.iterations:
            ctx.log.info("distill: %s exists (%d iterations), skipping", out, meta["iterations"])
            return out
    experts = list_experts(ctx)
    dev = ctx.device
    index = load_init(ctx)
    reps = load_targets(ctx)
    k = len(index)
    model = student_for(ctx, reps.shape[1]).to(dev).train()
    flat = FlatParams(model)
    if experts[0].meta["output_dim"] != reps.shape[1] or experts[0].params(0).shape[1] != flat.size:
        raise ArtifactError("the experts do not fit the student architecture; re-run the experts "
                            "stage with --force")
    state = _initial_state(ctx, index, reps, fp, dev, force)
    images, targets, lr = state["images"], state["targets"], state["lr"]
    moms = {n: state.get(f"momentum.{n}", torch.zeros_like(state[n])) for n in ("images", "targets", "lr")}
    history: list[float] = state["meta"].get("history", [])
    norms: dict[str, float] = state["meta"].get("norm_ema", {})
    start = int(state["meta"].get("iteration", 0))
    sched = experts[0].schedule
    span = round(d.expert_epochs * sched.steps_per_epoch / sched.every)
    if span < 1:
        raise ValueError(f"distill.expert_epochs={d.expert_epochs:g} is shorter than one expert checkpoint "
                         f"interval ({sched.every / sched.steps_per_epoch:.3g} epochs); raise it or lower "
                         "experts.checkpoint_every_steps")
    max_start = max(1, round(d.max_start_epoch * sched.steps_per_epoch / sched.every))
    if max_start - 1 + span >= sched.count:
        raise ArtifactError(f"experts hold {sched.count} checkpoints; start < {max_start} plus span "
                            f"{span} needs more; re-run experts with the current config (--force)")
    if start == 0:
        ctx.log.info("distill: %d images, %d experts, %s mode, span %d checkpoints (%d steps), "
                     "start in [0, %d), syn_steps %d, batch %d", k, len(experts), d.mode, span,
                     span * sched.every, max_start, d.syn_steps, min(d.batch_syn, k))
    matcher = MATCHERS[d.mode]
    lrs = {"images": d.lr_img, "targets": d.lr_targets, "lr": d.lr_lr}
    adam = {"images"} if d.image_optimizer == "adam" else set()
    sq = {n: state.get(f"sq.{n}", torch.zeros_like(state[n])) for n in adam}
    data = ctx.train_set
    pixel_range = _pixel_range(data.mean, data.std, dev) if d.clamp else None
    start_images = normalize(data.images[index].to(dev), data.mean, data.std) if d.smooth else None
    teacher = _TeacherOnSet(ctx) if d.targets_anchor > 0 else None
    scorer = build_scorer(ctx) if d.eval_every else None
    curve: list[dict[str, Any]] = state["meta"].get("curve", [])
    best = {n: state[f"best.{n}"] for n in ("images", "targets", "lr") if f"best.{n}" in state}
    if scorer is not None and not curve:
        _score(ctx, scorer, curve, best, 0, images, targets, lr, None)
    bar = ctx.bar(total=d.iterations, initial=start, desc="distill")
    progress = IterationLog(d.iterations, d.log_every, bar)
    for it in range(start, d.iterations):
        ef = _expert_for(ctx, experts, it)
        g = ctx.generator("distill", it)
        s = int(torch.randint(max_start, (1,), generator=g))
        theta0, theta_target = (t.to(dev) for t in ef.params(s, s + span))
        batches = [b.to(dev) for b in minibatches(k, d.batch_syn, d.syn_steps, g)]
        res = matcher(flat, theta0, theta_target, images, targets, lr, batches)
        grads = {"images": res.grad_images, "targets": res.grad_targets, "lr": res.grad_lr}
        loss = float(res.loss)
        if not math.isfinite(loss) or not all(torch.isfinite(v).all() for v in grads.values()):
            raise FloatingPointError(f"distill iteration {it}: non-finite matching loss or gradient; "
                                     "lower distill.lr_img / lr_targets / lr_lr or set clip_grad")
        with torch.no_grad():
            params = {"images": images, "targets": targets, "lr": lr}
            for name, grad in grads.items():
                grad = _clip(grad, name, norms, d.clip_grad)
                if name in adam:
                    _adam_step(params[name], grad, moms[name], sq[name], lrs[name], it + 1)
                    continue
                moms[name].mul_(d.momentum).add_(grad)
                params[name].sub_(lrs[name] * moms[name])
            lr.clamp_(min=1e-8)
            if d.smooth:  # smooth what distillation changed, not the real images it started from
                images.add_(_laplacian(images - start_images), alpha=d.smooth)
            if pixel_range is not None:
                images.clamp_(*pixel_range)
            if teacher is not None:
                targets.lerp_(teacher.reps(images), d.targets_anchor)
        history.append(loss)
        done = it + 1
        report = progress.record(done, loss)
        if report is not None:
            mean, sec, eta = report
            ctx.log.info("distill %d/%d: matching loss %.4f (start %d), lr %.4g, %.2f s/it, ETA %s",
                         done, d.iterations, mean, s, float(lr), sec, eta)
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{float(lr):.3g}")
        if scorer is not None and (done % d.eval_every == 0 or done == d.iterations):
            _score(ctx, scorer, curve, best, done, images, targets, lr, history)
        if done % d.checkpoint_every == 0 or done == d.iterations:
            extra = {f"sq.{n}": v for n, v in sq.items()}
            extra.update({f"best.{n}": v for n, v in best.items()})
            _save_state(ctx.path(STATE_FILE), images, targets, lr, moms,
                        {"iteration": done, "history": history, "norm_ema": norms, "fingerprint": fp,
                         "curve": curve}, extra)
    bar.close()
    kept = None
    if d.keep == "best" and best:
        kept = max(curve, key=lambda p: p[KEEP_METRIC])
        images, targets, lr = best["images"], best["targets"], best["lr"]
        ctx.log.info("distill: keeping the snapshot of iteration %d (held-out fidelity R² %.4f)",
                     kept["iteration"], kept[KEEP_METRIC])
    if curve:
        save_curve(ctx.path(CURVE_FILE), curve, history, None if kept is None else kept["iteration"])
    _write_distilled(ctx, out, fp, index, images, targets, lr, history, method="mkdt",
                     extra={"num_experts": len(experts),
                            "matching_loss": {"first": _mean(history[:10]),
                                              "last": _mean(history[-10:])},
                            **({"validation_curve": curve} if curve else {}),
                            **({"kept_iteration": kept["iteration"]} if kept else {})})
    return out


def _score(ctx: RunContext, scorer: SnapshotScorer, curve: list[dict[str, Any]],
           best: dict[str, torch.Tensor], done: int, images: torch.Tensor, targets: torch.Tensor,
           lr: torch.Tensor, history: list[float] | None) -> None:
    """Score the current set on the held-out images; remember it when it is the best so far."""
    t0 = time.perf_counter()
    point: dict[str, Any] = {"iteration": done, **scorer(images, targets, lr)}
    if history:
        point["matching_loss"] = _mean(history[-ctx.cfg.distill.eval_every:])
    if not curve or point[KEEP_METRIC] > max(p[KEEP_METRIC] for p in curve):
        best.update(images=images.clone(), targets=targets.clone(), lr=lr.clone())
    curve.append(point)
    ctx.log.info("distill %d: held-out %s (%.1f s)", done,
                 ", ".join(f"{k} {v:.4f}" for k, v in point.items() if k != "iteration"),
                 time.perf_counter() - t0)


def _pixel_range(mean: tuple[float, ...], std: tuple[float, ...], dev: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised values of pixels 0 and 1, per channel, shaped to broadcast over images."""
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    sd = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    return (0 - m) / sd, (1 - m) / sd


def _laplacian(x: torch.Tensor) -> torch.Tensor:
    """The 4-neighbour Laplacian with replicated borders (a diffusion step's direction)."""
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:] - 4 * x


def _adam_step(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float,
               step: int, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    m_hat = m / (1 - betas[0] ** step)
    v_hat = v / (1 - betas[1] ** step)
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


class _TeacherOnSet:
    """The teacher's representation of (normalised) synthetic images, for ``targets_anchor``."""

    def __init__(self, ctx: RunContext) -> None:
        c, h, _ = ctx.train_set.shape
        self.encoder, meta = load_teacher(ctx.path(TEACHER_FILE), in_channels=c, image_size=h,
                                          device=ctx.device)
        data = ctx.train_set
        dev = ctx.device
        m, sd = (torch.tensor(v, device=dev).view(1, -1, 1, 1) for v in (data.mean, data.std))
        tm, tsd = (torch.tensor(v, device=dev).view(1, -1, 1, 1) for v in (meta["mean"], meta["std"]))
        self.scale, self.shift = sd / tsd, (m - tm) / tsd  # x_teacher = x * scale + shift

    @torch.no_grad()
    def reps(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self.encoder.features(x * self.scale + self.shift)
                          for x in images.split(batch_size)])


def _expert_for(ctx: RunContext, experts: list[ExpertFile], it: int) -> ExpertFile:
    cycle, pos = divmod(it, len(experts))
    order = torch.randperm(len(experts), generator=ctx.generator("distill", "cycle", cycle))
    return experts[int(order[pos])]


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


def _initial_state(ctx: RunContext, index: torch.Tensor, reps: torch.Tensor, fp: str,
                   dev: torch.device, force: bool) -> dict[str, Any]:
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


def _save_state(path: Path, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                moms: dict[str, torch.Tensor], meta: dict[str, Any],
                extra: dict[str, torch.Tensor] | None = None) -> None:
    tensors = {"images": images, "targets": targets, "lr": lr}
    tensors.update({f"momentum.{n}": m for n, m in moms.items()})
    tensors.update(extra or {})
    save_tensors(path, tensors, meta)


def _write_distilled(ctx: RunContext, out: Path, fp: str, index: torch.Tensor, images: torch.Tensor,
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


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 6) if xs else None
