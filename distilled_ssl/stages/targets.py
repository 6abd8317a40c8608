"""Stage 2 — target representations: the teacher's features of every source image.

A teacher that expects other images (say 3x224x224 RGB for 1x28x28 Fashion-MNIST) gets each
batch adapted to its declared input (grey → RGB, resize, its normalisation) inside its encoder
(:class:`~distilled_ssl.models.adapters.TeacherEncoder`); the source images themselves, which the
students train on, stay as they are.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..distributed import all_gather_rows, is_main, shard, world_size
from ..errors import ArtifactError, DivergenceError
from ..io import check_fingerprint, load_tensors, read_metadata, save_tensors
from ..layout import TARGETS_FILE, TEACHER_FILE
from ..models.probe import extract
from .context import RunContext, combine
from .teacher import load_teacher


def targets_fingerprint(ctx: RunContext) -> str:
    teacher = ctx.path(TEACHER_FILE)
    if not teacher.exists():
        raise ArtifactError(f"{teacher} is missing: run the teacher stage first "
                            "(`distilled-ssl teacher --out RUN_DIR`)")
    return combine(read_metadata(teacher)["fingerprint"], "targets",
                   ctx.cfg.section_hash("source"))


def run_targets(ctx: RunContext, *, force: bool = False) -> Path:
    """Stage 2: write ``targets.safetensors`` = teacher features [N, D] of the training images.

    Under torchrun each rank extracts a contiguous shard (whole batches); rank 0 writes the
    gathered rows, the same file one process writes."""
    out = ctx.path(TARGETS_FILE)
    fp = targets_fingerprint(ctx)
    if not force and check_fingerprint(out, fp, "targets"):
        ctx.log.info("targets: %s exists, skipping", out)
        return out
    data = ctx.train_set
    c, h, _ = data.shape
    dev = ctx.device
    encoder, meta = load_teacher(ctx.path(TEACHER_FILE), in_channels=c, image_size=h, device=dev)
    channels_last = dev.type == "cpu"
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    if meta.get("adapt_input"):
        inp = meta["input"]
        ctx.log.info("targets: adapting %dx%dx%d source images to the teacher's %dx%dx%d input", c, h, h,
                     inp["channels"], inp["size"], inp["size"])
    t0 = time.perf_counter()
    batch = ctx.cfg.targets.batch_size
    mine = shard(len(data), batch)
    with torch.inference_mode():
        reps = (extract(encoder.features, data.images[mine.start:mine.stop], tuple(meta["mean"]),
                        tuple(meta["std"]), batch_size=batch, device=str(dev),
                        channels_last=channels_last)
                if len(mine) else torch.empty(0, encoder.feature_dim))
    reps = all_gather_rows(reps, [len(shard(len(data), batch, of=r)) for r in range(world_size())])
    dt = time.perf_counter() - t0
    if not torch.isfinite(reps).all():
        raise DivergenceError("the teacher produced non-finite representations")
    ctx.log.info("targets: %d x %d representations in %.1f s (%.0f images/s)", *reps.shape, dt,
                 len(reps) / dt)
    tensors = {"target_reps": reps}
    if data.labels is not None:
        tensors["labels"] = data.labels
    info = {"kind": "targets", "fingerprint": fp, "teacher_arch": meta["arch"],
            "teacher_mean": meta["mean"], "teacher_std": meta["std"]}
    if "input" in meta:  # a loaded teacher's own input (the mean/std above: what it is given)
        info["teacher_input"] = {**meta["input"], "adapted": bool(meta.get("adapt_input"))}
    if is_main():
        save_tensors(out, tensors, info)
    return out


def load_targets(ctx: RunContext) -> torch.Tensor:
    """The target representations of the run, checked against the source set's size."""
    tensors, _ = load_tensors(ctx.path(TARGETS_FILE), ["target_reps"])
    reps = tensors["target_reps"]
    if reps.ndim != 2 or len(reps) != len(ctx.train_set):
        raise ArtifactError(f"{ctx.path(TARGETS_FILE)} holds {tuple(reps.shape)} representations "
                            f"for {len(ctx.train_set)} source images; re-run with --force")
    return reps
