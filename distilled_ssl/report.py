"""The run's quick check: pre-train a fresh encoder on the distilled set and on baselines of the
same size, then compare teacher fidelity and a few-label probe. Writes ``results.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .context import RunContext
from .data import normalize
from .distill import DISTILLED_FILE
from .evaluate import PretrainSet, pretrain_kd, probe_accuracy, recompute_bn_stats, teacher_fidelity
from .initial_set import load_init
from .io import atomic_path, load_tensors
from .probe import extract
from .targets import load_targets
from .teacher import TEACHER_FILE, load_teacher

RESULTS_FILE = "results.json"


def evaluate_run(ctx: RunContext) -> dict[str, Any]:
    """Pre-train ``eval.model`` (default: the student) on: nothing, a random real subset, the
    init subset, and the distilled set; report fidelity R²/cosine and probe accuracy."""
    ec, cfg = ctx.cfg.eval, ctx.cfg
    model_cfg = ec.model or cfg.student
    data, test = ctx.train_set, ctx.test_set
    dev = str(ctx.device)
    tensors, meta = load_tensors(ctx.path(DISTILLED_FILE))
    reps = load_targets(ctx)
    k = len(tensors["images"])
    c, h, _ = data.shape
    mean, std = data.mean, data.std
    index = load_init(ctx)
    rand_idx = torch.randperm(len(data), generator=ctx.generator("eval", "random"))[:k]
    distilled = (tensors["images"].float() - torch.tensor(mean).view(1, -1, 1, 1)) / \
        torch.tensor(std).view(1, -1, 1, 1)
    sets: list[PretrainSet | None] = [
        None,
        PretrainSet(f"random {k}", normalize(data.images[rand_idx], mean, std), reps[rand_idx],
                    cfg.distill.lr_init),
        PretrainSet(f"init ({cfg.init.method}) {k}", normalize(data.images[index], mean, std),
                    reps[index], cfg.distill.lr_init),
        PretrainSet(f"MKDT {k}", distilled, tensors["targets"], float(tensors["lr"])),
    ]
    teacher_test = None
    if test is not None:
        teacher, tmeta = load_teacher(ctx.path(TEACHER_FILE), device=dev)
        teacher_test = extract(teacher.features, test.images, tuple(tmeta["mean"]),
                               tuple(tmeta["std"]), device=dev)
    rows = []
    for pset in sets:
        t0 = time.perf_counter()
        model = pretrain_kd(model_cfg.arch, model_cfg.kwargs, pset, in_channels=c, image_size=h,
                            target_dim=reps.shape[1], epochs=ec.epochs, batch_size=ec.batch_size,
                            seed=ctx.seed_for("eval", "init"), device=dev)
        if pset is None:
            recompute_bn_stats(model, data.images[rand_idx], mean, std)
        row: dict[str, Any] = {"set": "none (random init)" if pset is None else pset.name}
        if teacher_test is not None and test is not None:
            fid = teacher_fidelity(model, test.images, teacher_test, mean, std, device=dev)
            row["fidelity_r2"], row["fidelity_cosine"] = fid["r2"], fid["cosine"]
            if data.labels is not None and test.labels is not None:
                row[f"probe@{ec.label_fraction:g}"] = probe_accuracy(
                    model, data, test, ec.label_fraction, ctx.seed_for("eval", "labels"), device=dev)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        ctx.log.info("eval: %s", row)
    result = {"eval_model": {"arch": model_cfg.arch, "kwargs": model_cfg.kwargs},
              "epochs": ec.epochs, "rows": rows, "distilled_lr": float(tensors["lr"]),
              "matching_loss": meta.get("matching_loss")}
    with atomic_path(ctx.path(RESULTS_FILE)) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    rows = result["rows"]
    cols = [c for c in rows[0] if c != "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for col in cols:
            v = r.get(col, "")
            if col.startswith("probe"):
                cells.append(f"{100 * v:.1f}%")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
