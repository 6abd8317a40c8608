"""Stage 1 — the SSL teacher: train one with Barlow Twins, or load one; write ``teacher.safetensors``.

The teacher's representation is its encoder's pooled/flattened feature in eval mode (no
projector, no augmentation). The artifact holds the encoder's state dict and, as metadata, the
architecture, the input normalisation it was trained with, its training config and its
linear-probe accuracy on the source test split.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.augment import SSLAugment
from ..data.sources import normalize
from ..errors import ArtifactError, ConfigError
from ..io import check_fingerprint, file_sha256, load_tensors, read_metadata, save_tensors
from ..layout import TEACHER_FILE
from ..layout import TEACHER_PARTIAL_FILE as _PARTIAL
from ..models.encoders import Encoder, build_model, seeded
from ..models.losses import barlow_twins_loss
from ..models.probe import extract, linear_probe
from .context import RunContext, combine


def teacher_fingerprint(ctx: RunContext) -> str:
    cfg = ctx.cfg
    parts = [cfg.section_hash("source", "teacher"), str(cfg.seed)]
    if cfg.teacher.mode == "load":
        parts = [cfg.section_hash("source", "teacher.model", "teacher.weights")]
        parts.append(file_sha256(resolve_weights(cfg.teacher.weights or "")))
    return combine(*parts)


def resolve_weights(spec: str) -> Path:
    """``builtin:NAME`` → the teacher shipped in the package; anything else is a file path."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = Path(str(resources.files("distilled_ssl").joinpath("weights", f"{name}.safetensors")))
        if not path.is_file():
            shipped = sorted(p.name.removesuffix(".safetensors") for p in
                             Path(str(resources.files("distilled_ssl").joinpath("weights"))).glob(
                                 "*.safetensors"))
            raise ArtifactError(f"no built-in teacher {name!r}; shipped: {shipped}")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ArtifactError(f"teacher weights {path} do not exist")
    if path.suffix != ".safetensors":
        raise ArtifactError(f"{path}: teacher weights must be a .safetensors file (pickled "
                            "checkpoints are not read; convert with safetensors.torch.save_file)")
    return path


def run_teacher(ctx: RunContext, *, force: bool = False) -> Path:
    """Stage 1: make ``teacher.safetensors`` in the run directory (skipped when it exists)."""
    out = ctx.path(TEACHER_FILE)
    fp = teacher_fingerprint(ctx)
    if not force and check_fingerprint(out, fp, "teacher"):
        ctx.log.info("teacher: %s exists, skipping", out)
        return out
    t0 = time.perf_counter()
    tc = ctx.cfg.teacher
    data = ctx.train_set
    c, h, _ = data.shape
    if tc.mode == "load":
        path = resolve_weights(tc.weights or "")
        if read_metadata(path).get("kind") == "teacher":
            encoder, meta = load_teacher(path, in_channels=c, image_size=h)
            arch, kwargs = meta["arch"], meta["kwargs"]
            mean, std = tuple(meta["mean"]), tuple(meta["std"])
        else:  # a bare state dict for teacher.model, trained on this source's normalisation
            arch, kwargs = tc.model.arch, tc.model.kwargs
            encoder = build_model(arch, in_channels=c, image_size=h, **kwargs)
            _load_state_dict(encoder, path)
            meta, (mean, std) = {}, (data.mean, data.std)
        info: dict[str, Any] = {"loaded_from": tc.weights, "trained": meta.get("trained")}
        ctx.log.info("teacher: loaded %s (%s, %d-d features)", tc.weights, arch, encoder.feature_dim)
    else:
        encoder, losses = train_teacher(ctx)
        meta = {}
        arch, kwargs = tc.model.arch, tc.model.kwargs
        mean, std = data.mean, data.std
        info = {"trained": {"source": ctx.cfg.source.name, "num_images": len(data),
                            **asdict(tc), "seed": ctx.cfg.seed, "epoch_losses": losses}}
    trained_on = (info.get("trained") or {})
    same_data = (trained_on.get("source") == ctx.cfg.source.name and ctx.cfg.source.subset is None
                 and trained_on.get("num_images") == len(data))
    if tc.mode == "load" and same_data and "probe_accuracy" in meta:
        info["probe_accuracy"] = meta["probe_accuracy"]  # measured on this very source when trained
        ctx.log.info("teacher: linear-probe accuracy on the %s test split: %.2f%% (recorded in %s)",
                     ctx.cfg.source.name, 100 * meta["probe_accuracy"], tc.weights)
    elif tc.probe and data.labels is not None and ctx.test_set is not None and \
            ctx.test_set.labels is not None:
        acc = probe_teacher(ctx, encoder, mean, std)
        info["probe_accuracy"] = acc
        ctx.log.info("teacher: linear-probe accuracy on the %s test split: %.2f%%",
                     ctx.cfg.source.name, 100 * acc)
    save_teacher(out, encoder, arch=arch, kwargs=kwargs, in_channels=c,
                 image_size=h, mean=mean, std=std, fingerprint=fp, **info)
    ctx.log.info("teacher: wrote %s in %.1f s", out, time.perf_counter() - t0)
    return out


def save_teacher(path: Path, encoder: Encoder, *, arch: str, kwargs: dict[str, Any],
                 in_channels: int, image_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 **extra: Any) -> None:
    """Write a teacher encoder (state dict, no head) with the metadata needed to rebuild it."""
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    meta = {"kind": "teacher", "arch": arch, "kwargs": kwargs, "in_channels": in_channels,
            "image_size": image_size, "feature_dim": encoder.feature_dim, "mean": list(mean),
            "std": list(std), **extra}
    save_tensors(path, state, meta)


def load_teacher(path: Path, *, in_channels: int | None = None, image_size: int | None = None,
                 device: str | torch.device = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """Rebuild a teacher encoder from a ``save_teacher`` file; check it fits the source images."""
    state, meta = load_tensors(path)
    if meta.get("kind") != "teacher" or "arch" not in meta:
        raise ArtifactError(f"{path} is not a distilled_ssl teacher file (no teacher metadata)")
    if in_channels is not None and meta["in_channels"] != in_channels:
        raise ArtifactError(f"teacher {path} takes {meta['in_channels']}-channel images, the source "
                            f"has {in_channels}")
    if image_size is not None and meta["image_size"] != image_size and \
            not meta["arch"].startswith(("resnet", "torchvision:")):
        raise ArtifactError(f"teacher {path} takes {meta['image_size']}px images, the source has "
                            f"{image_size}px")
    encoder = build_model(meta["arch"], in_channels=meta["in_channels"],
                          image_size=meta["image_size"], **meta["kwargs"])
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: weights do not fit {meta['arch']} {meta['kwargs']}: {exc}") from exc
    return encoder.to(device).eval(), meta


def _load_state_dict(encoder: Encoder, path: Path) -> None:
    """Load a plain safetensors state dict; a torchvision model's removed classifier is ignored."""
    state, _ = load_tensors(path)
    target = encoder.net if hasattr(encoder, "net") else encoder
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ArtifactError(f"{path} does not fit the teacher architecture: {exc}") from exc
    unexpected = [k for k in unexpected if not k.startswith(("fc.", "classifier.", "head.", "heads."))]
    if missing or unexpected:
        raise ArtifactError(f"{path} does not fit the teacher architecture: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")


def probe_teacher(ctx: RunContext, encoder: Encoder, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> float:
    """Linear-probe accuracy of the teacher's features (full train labels → test split)."""
    dev = ctx.device
    encoder = encoder.to(dev).eval()
    test = ctx.test_set
    assert test is not None and test.labels is not None and ctx.train_set.labels is not None
    ftr = extract(encoder.features, ctx.train_set.images, mean, std, device=str(dev))
    fte = extract(encoder.features, test.images, mean, std, device=str(dev))
    return linear_probe(ftr, ctx.train_set.labels, fte, test.labels)


class _BarlowTwins(nn.Module):
    def __init__(self, encoder: Encoder, dims: list[int]) -> None:
        super().__init__()
        self.encoder = encoder
        layers: list[nn.Module] = []
        d = encoder.feature_dim
        for i, out in enumerate(dims):
            layers.append(nn.Linear(d, out, bias=i == len(dims) - 1))
            if i < len(dims) - 1:
                layers += [nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
            d = out
        self.projector = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder.features(x))


def train_teacher(ctx: RunContext) -> tuple[Encoder, list[float]]:
    """Barlow Twins on the source training split (AdamW, warmup + cosine), resumable per epoch.

    Returns the encoder and the mean loss of each epoch."""
    _cfg, tc = ctx.cfg, ctx.cfg.teacher
    data = ctx.train_set
    c, h, _ = data.shape
    dev = ctx.device
    with seeded(ctx.seed_for("teacher", "init")):
        encoder = build_model(tc.model.arch, in_channels=c, image_size=h, **tc.model.kwargs)
        model = _BarlowTwins(encoder, tc.projector)
    channels_last = dev.type == "cpu"
    model = model.to(dev, memory_format=torch.channels_last) if channels_last else model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    n = len(data)
    if n < tc.batch_size:
        raise ConfigError(f"teacher.batch_size={tc.batch_size} exceeds the {n} source images")
    steps_per_epoch = n // tc.batch_size
    total = steps_per_epoch * tc.epochs
    warm = steps_per_epoch * tc.warmup_epochs

    def lr_at(step: int) -> float:
        if step < warm:
            return tc.lr * (step + 1) / warm
        return tc.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    aug = SSLAugment(data.mean, data.std)
    start_epoch, losses = _resume_teacher(ctx, model, opt)
    partial = ctx.path(_PARTIAL)
    fp = teacher_fingerprint(ctx)
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        g = ctx.generator("teacher", "epoch", epoch)
        order = torch.randperm(n, generator=g)
        bar = ctx.bar(range(steps_per_epoch), desc=f"teacher epoch {epoch + 1}/{tc.epochs}")
        t0, running = time.perf_counter(), 0.0
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            idx = order[i * tc.batch_size:(i + 1) * tc.batch_size]
            x = normalize(data.images[idx].to(dev), data.mean, data.std)
            v1, v2 = aug(x, g), aug(x, g)
            if channels_last:
                v1 = v1.contiguous(memory_format=torch.channels_last)
                v2 = v2.contiguous(memory_format=torch.channels_last)
            loss = barlow_twins_loss(model(v1), model(v2), tc.lambda_offdiag)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            if i % 10 == 0:
                bar.set_postfix(loss=f"{running / (i + 1):.1f}")
        dt = time.perf_counter() - t0
        losses.append(running / steps_per_epoch)
        ctx.log.info("teacher epoch %d/%d: Barlow Twins loss %.2f, %.0f images/s", epoch + 1, tc.epochs,
                     losses[-1], 2 * steps_per_epoch * tc.batch_size / dt)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(_optimizer_tensors(opt))
        save_tensors(partial, tensors, {"epoch": epoch + 1, "fingerprint": fp, "losses": losses})
    encoder = model.encoder.to(memory_format=torch.contiguous_format).eval()
    partial.unlink(missing_ok=True)
    return encoder, losses


def _resume_teacher(ctx: RunContext, model: nn.Module, opt: torch.optim.Optimizer
                    ) -> tuple[int, list[float]]:
    partial = ctx.path(_PARTIAL)
    if not partial.exists():
        return 0, []
    try:
        meta = read_metadata(partial)
        if meta.get("fingerprint") != teacher_fingerprint(ctx):
            ctx.log.info("teacher: ignoring %s (made with another config)", partial)
            return 0, []
        tensors, _ = load_tensors(partial)
    except ArtifactError as exc:
        ctx.log.warning("teacher: cannot resume from %s (%s); starting over", partial, exc)
        return 0, []
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optimizer_tensors(opt, tensors)
    ctx.log.info("teacher: resuming after epoch %d", meta["epoch"])
    return int(meta["epoch"]), list(meta["losses"])


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimiser's per-parameter state as named tensors (safetensors holds no pickles)."""
    out = {}
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"opt.{pid}.{key}"] = torch.as_tensor(value).clone()
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    sd["state"] = state
    opt.load_state_dict(sd)
