"""Stage 1 — the SSL teacher: train one (Barlow Twins or SimCLR), or load one; write ``teacher.safetensors``.

The teacher's representation is its encoder's pooled/flattened feature in eval mode (no
projector, no augmentation). The artifact holds the encoder's state dict and, as metadata, the
architecture, the input normalisation it was trained with, its training config and its
linear-probe accuracy on the source test split. A loaded teacher (any spec of
:mod:`distilled_ssl.models.teachers`) that expects other images than the source's records its
declared ``input``; its encoder adapts the source images to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.augment import SSLAugment
from ..data.sources import normalize
from ..distributed import is_main, shard, world_size
from ..errors import ArtifactError, ConfigError
from ..io import check_fingerprint, file_sha256, load_tensors, read_metadata, save_tensors
from ..layout import TEACHER_FILE
from ..layout import TEACHER_PARTIAL_FILE as _PARTIAL
from ..models.adapters import TeacherEncoder, TeacherInput
from ..models.encoders import Encoder, build_model, seeded
from ..models.losses import barlow_twins_loss, nt_xent_loss
from ..models.probe import extract, linear_probe
from ..models.teachers import (
    OpenedTeacher,
    load_teacher,
    open_teacher,
    resolve_weights,
    save_teacher,
    weights_file,
)
from .context import RunContext, combine

__all__ = ["load_teacher", "probe_teacher", "resolve_weights", "run_teacher", "save_teacher",
           "ssl_loss", "teacher_fingerprint", "train_teacher"]

_LOAD_OPTIONS = ("checkpoint", "key_map", "input")  # fingerprinted only when set (older runs keep theirs)
# Fields a trained teacher's record leaves out (Barlow Twins records read as before SimCLR existed).
_NOT_TRAINING = {"barlow_twins": {"method", "temperature", *_LOAD_OPTIONS},
                 "simclr": {"lambda_offdiag", *_LOAD_OPTIONS}}


def teacher_fingerprint(ctx: RunContext) -> str:
    cfg = ctx.cfg
    parts = [cfg.section_hash("source", "teacher"), str(cfg.seed)]
    if cfg.teacher.mode == "load":
        tc = cfg.teacher
        parts = [cfg.section_hash("source", "teacher.model", "teacher.weights")]
        path = weights_file(tc.weights or "", tc.checkpoint)
        parts.append(file_sha256(path) if path is not None else _open(ctx).provenance["weights_sha256"])
        options = {k: v for k, v in asdict(tc).items() if k in _LOAD_OPTIONS and v not in (None, {})}
        if options:
            parts.append(hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16])
    return combine(*parts)


def _open(ctx: RunContext) -> OpenedTeacher:
    """The teacher that ``teacher.weights`` names, opened once per run context."""
    cached = getattr(ctx, "_opened_teacher", None)
    if cached is not None:
        return cached
    tc, data = ctx.cfg.teacher, ctx.train_set
    c, h, _ = data.shape
    override = asdict(tc.input) if tc.input is not None else {}
    opened = open_teacher(tc.weights or "", source=TeacherInput(c, h, data.mean, data.std),
                          arch=tc.model.arch, kwargs=tc.model.kwargs, checkpoint=tc.checkpoint,
                          key_map=tc.key_map, input_override=override)
    ctx._opened_teacher = opened  # type: ignore[attr-defined]
    return opened


def _for_source(ctx: RunContext, opened: OpenedTeacher) -> tuple[Encoder, tuple[float, ...],
                                                                  tuple[float, ...]]:
    """The opened teacher as an encoder of the source images, and the normalisation it takes."""
    data = ctx.train_set
    c, h, _ = data.shape
    inp = opened.input
    size_free = opened.legacy and opened.arch.startswith(("resnet", "torchvision:"))
    if opened.legacy and inp.channels == c and (inp.size == h or size_free):
        return opened.encoder, inp.mean, inp.std  # as before teacher specs: artifacts unchanged
    adapt = inp.channels != c or inp.size != h
    if adapt:
        ctx.log.info("teacher: expects %dx%dx%d images; the %dx%dx%d source images are adapted for "
                     "it (the students keep training on the source's own)", inp.channels, inp.size,
                     inp.size, c, h, h)
    encoder = TeacherEncoder(opened.encoder, inp, source_channels=c, source_size=h,
                             source_mean=data.mean if adapt else None,
                             source_std=data.std if adapt else None)
    return encoder.eval(), (data.mean if adapt else inp.mean), (data.std if adapt else inp.std)


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
        opened = _open(ctx)
        encoder, mean, std = _for_source(ctx, opened)
        arch, kwargs, meta = opened.arch, opened.kwargs, opened.meta
        info: dict[str, Any] = {"loaded_from": tc.weights, "trained": meta.get("trained")}
        if not opened.legacy:
            info["provenance"] = opened.provenance
        ctx.log.info("teacher: loaded %s (%s, %d-d features)", tc.weights, arch, encoder.feature_dim)
    else:
        encoder, losses = train_teacher(ctx)
        if not is_main():  # DDP: rank 0 probes and writes the teacher
            return out
        meta = {}
        arch, kwargs = tc.model.arch, tc.model.kwargs
        mean, std = data.mean, data.std
        trained = {k: v for k, v in asdict(tc).items() if k not in _NOT_TRAINING[tc.method]}
        info = {"trained": {"source": ctx.cfg.source.name, "num_images": len(data),
                            **trained, "seed": ctx.cfg.seed, "epoch_losses": losses}}
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


class _SSLModel(nn.Module):
    """The encoder plus the projector MLP that the SSL loss sees (dropped after training)."""

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


def ssl_loss(method: str, *, lambda_offdiag: float = 5e-3, temperature: float = 0.5,
             gather_distributed: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``teacher.method``'s loss of two views' projections (of the whole batch over the torchrun
    ranks with ``gather_distributed``)."""
    if method == "barlow_twins":
        return partial(barlow_twins_loss, lambda_offdiag=lambda_offdiag,
                       gather_distributed=gather_distributed)
    if method == "simclr":
        return partial(nt_xent_loss, temperature=temperature, gather_distributed=gather_distributed)
    raise ConfigError(f"unknown teacher.method {method!r}")


def train_teacher(ctx: RunContext) -> tuple[Encoder, list[float]]:
    """``teacher.method`` (Barlow Twins or SimCLR, the same augmentations) on the source training
    split (AdamW, warmup + cosine), resumable per epoch.

    Under torchrun it is DDP: every rank draws the same seeded permutation and augmentations and
    trains on its contiguous slice of each global batch (no sampler padding), with SyncBN on CUDA;
    the loss is the whole batch's. Batch norm on CPU sees the rank's slice, and the gradients are
    summed in another order, so the teacher is close to, not the same as, one process's.

    Returns the encoder and the mean loss of each epoch."""
    _cfg, tc = ctx.cfg, ctx.cfg.teacher
    data = ctx.train_set
    c, h, _ = data.shape
    dev = ctx.device
    with seeded(ctx.seed_for("teacher", "init")):
        encoder = build_model(tc.model.arch, in_channels=c, image_size=h, **tc.model.kwargs)
        model = _SSLModel(encoder, tc.projector)
    channels_last = dev.type == "cpu"
    model = model.to(dev, memory_format=torch.channels_last) if channels_last else model.to(dev)
    ranks = world_size()
    forward: nn.Module = model
    if ranks > 1:
        if dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        forward = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
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
    loss_fn = ssl_loss(tc.method, lambda_offdiag=tc.lambda_offdiag, temperature=tc.temperature,
                       gather_distributed=ranks > 1)
    mine = shard(tc.batch_size)  # this rank's rows of each global batch
    loss_name = {"barlow_twins": "Barlow Twins", "simclr": "SimCLR"}[tc.method]
    start_epoch, losses = _resume_teacher(ctx, model, opt)
    partial_file = ctx.path(_PARTIAL)
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
            v1, v2 = aug(x, g), aug(x, g)  # of the global batch: the one process's random draws
            if ranks > 1:
                v1, v2 = v1[mine.start:mine.stop], v2[mine.start:mine.stop]
            if channels_last:
                v1 = v1.contiguous(memory_format=torch.channels_last)
                v2 = v2.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(forward(v1), forward(v2))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            if i % 10 == 0:
                bar.set_postfix(loss=f"{running / (i + 1):.{1 if tc.method == 'barlow_twins' else 3}f}")
        dt = time.perf_counter() - t0
        losses.append(running / steps_per_epoch)
        ctx.log.info("teacher epoch %d/%d: %s loss %.3g, %.0f images/s", epoch + 1, tc.epochs,
                     loss_name, losses[-1], 2 * steps_per_epoch * tc.batch_size / dt)
        if is_main():
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            tensors.update(_optimizer_tensors(opt))
            save_tensors(partial_file, tensors, {"epoch": epoch + 1, "fingerprint": fp, "losses": losses})
    encoder = model.encoder.to(memory_format=torch.contiguous_format).eval()
    if is_main():
        partial_file.unlink(missing_ok=True)
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
