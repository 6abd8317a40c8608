"""Stage 6 for a run: pre-train fresh encoders on the distilled set, on the baselines and on
other distilled sets, measure them on every downstream set, and write ``results.json``,
``results.md`` (mean ± std over seeds) and ``results.png`` (one panel per metric).

A seed fixes the pre-training init, the random subset and the label subsets; each encoder is
pre-trained once per seed and then measured on every downstream set.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .artifact import RESULTS_FILE, DistilledSet, is_set_dir, load_distilled_file, read_set
from .baselines import Baselines, init_label
from .config import ModelConfig
from .context import RunContext
from .data import DataNotFoundError
from .distill import DISTILLED_FILE
from .downstream import Downstream, display_name, load_downstream, parse_names, validation_split
from .evaluate import PretrainSet, downstream_metrics, pretrain_kd, recompute_bn_stats, teacher_fidelity
from .io import atomic_path
from .probe import extract
from .teacher import TEACHER_FILE, load_teacher
from .viz import save_bar_panels

TABLE_FILE = "results.md"
PLOT_FILE = "results.png"
FORMAT = 2


def set_title(dset: DistilledSet) -> str:
    """'MKDT (high-loss init, class-balanced)' from a set's metadata."""
    meta = dset.metadata
    method = {"mkdt": "MKDT", "krr_st": "KRR-ST"}.get(meta.get("method", "mkdt"), meta.get("method"))
    init = meta.get("init") or {}
    label = init_label(init.get("method", "?"), bool(init.get("class_balanced")))
    return f"{method} ({label})"


def load_compare(path: str | os.PathLike) -> DistilledSet:
    """A distilled set to compare: a set folder or a run directory."""
    p = Path(path)
    if is_set_dir(p):
        return read_set(p)
    if (p / DISTILLED_FILE).is_file():
        return load_distilled_file(p / DISTILLED_FILE)
    raise FileNotFoundError(f"{p} is neither a set folder nor a run directory with {DISTILLED_FILE}")


def encoder_label(model: ModelConfig) -> str:
    """'resnet10(width=0.125)'."""
    args = ",".join(f"{k}={v}" for k, v in sorted(model.kwargs.items()))
    return f"{model.arch}({args})"


def _as_pretrain(dset: DistilledSet, title: str, shape: tuple[int, int, int]) -> PretrainSet:
    if tuple(dset.images.shape[1:]) != shape:
        raise ValueError(f"{title}: images of shape {tuple(dset.images.shape[1:])} do not fit the "
                         f"source's {shape}")
    m = torch.tensor(dset.mean).view(1, -1, 1, 1)
    sd = torch.tensor(dset.std).view(1, -1, 1, 1)
    return PretrainSet(title, (dset.images.float() - m) / sd, dset.targets.float(), dset.lr)


def _downstream_sets(ctx: RunContext) -> list[Downstream]:
    """The labelled sets to probe. ``eval.split=validation``: the source's own set becomes (its
    training images, the held-out ones); any other set is probed on a share of its train split."""
    ec = ctx.cfg.eval
    validation = ec.split == "validation"
    names = ec.downstream
    if not names:  # default: the source itself, when it has labels and a test split
        test = ctx.eval_set
        labelled = ctx.train_set.labels is not None and test is not None and test.labels is not None
        names = [ctx.cfg.source.name] if labelled else []
    out = []
    for name, optional in parse_names(names):
        is_source = name == ctx.cfg.source.name
        if validation and is_source:
            held = ctx.eval_set
            assert held is not None
            if ctx.train_set.labels is None or held.labels is None:
                raise ValueError(f"downstream set {name}: the source has no labels")
            out.append(Downstream(display_name(name), ctx.train_set, held))
            continue
        try:
            ds = load_downstream(name, ctx.train_set, root=ctx.cfg.source.root if is_source else None)
        except (DataNotFoundError, FileNotFoundError) as exc:
            if not optional:
                raise
            ctx.log.info("eval: downstream set %s skipped: %s", name, exc)
            continue
        out.append(validation_split(ds, ec.validation_fraction, ctx.seed_for("eval", "split", name))
                   if validation else ds)
    return out


NEEDS_TEACHER = ("random", "init", "high_loss", "high_loss_balanced", "full", "teacher")


def evaluate_run(ctx: RunContext, *, compare: Sequence[str | os.PathLike] = (),
                 own: DistilledSet | None = None, out: str | os.PathLike | None = None
                 ) -> dict[str, Any]:
    """Evaluate the run's distilled set against ``eval.baselines`` and the ``compare`` sets; write
    the results into ``out`` (default: the run directory).

    ``own`` evaluates a set without its run (e.g. one pulled from the Hub): there is no teacher
    then, so no fidelity and only the ``none`` baseline."""
    ec, cfg = ctx.cfg.eval, ctx.cfg
    data, test = ctx.train_set, ctx.eval_set
    dev = str(ctx.device)
    has_run = own is None
    if own is None:
        own = load_distilled_file(ctx.path(DISTILLED_FILE))
    else:
        needing = [b for b in ec.baselines if b in NEEDS_TEACHER or b.startswith("full")]
        if needing:
            raise ValueError(f"baseline(s) {needing} need the run directory that made the set (its "
                             "teacher and target reps); evaluate the run, or use --baselines none")
    k = len(own)
    shape = data.shape
    candidates: list[tuple[str, Any]] = []  # (title, "none" | "teacher" | baseline name | PretrainSet)
    base = Baselines(ctx, k)
    for name in ec.baselines:
        candidates.append((base.title(name), name))
    candidates.append((set_title(own), _as_pretrain(own, set_title(own), shape)))
    for path in compare:
        other = load_compare(path)
        title = set_title(other)
        if any(t == title for t, _ in candidates):
            title = f"{title} [{Path(path).name}]"
        candidates.append((title, _as_pretrain(other, title, shape)))
    teacher, tmeta, teacher_test = None, {}, None
    target_dim = own.targets.shape[1]
    if has_run:
        teacher, tmeta = load_teacher(ctx.path(TEACHER_FILE), device=dev)
        target_dim = int(tmeta["feature_dim"])
        if test is not None:
            teacher_test = extract(teacher.features, test.images, tuple(tmeta["mean"]),
                                   tuple(tmeta["std"]), device=dev)
    downstream = _downstream_sets(ctx)
    encoders = [ec.model or cfg.student, *ec.extra_models]
    rows: list[dict[str, Any]] = []
    bar = ctx.bar(total=ec.seeds * len(encoders) * len(candidates), desc="evaluate")
    for seed in range(ec.seeds):
        label_seed = ctx.seed_for("eval", "labels", seed)
        teacher_row: dict[str, Any] | None = None
        for model_cfg in encoders:
            enc = encoder_label(model_cfg)
            for title, what in candidates:
                t0 = time.perf_counter()
                row: dict[str, Any] = {"set": title, "encoder": enc, "seed": seed}
                if what == "teacher":
                    assert teacher is not None
                    if teacher_row is None:
                        teacher_row = {}
                        for ds in downstream:
                            teacher_row.update(downstream_metrics(
                                teacher.features, tuple(tmeta["mean"]), tuple(tmeta["std"]), ds,
                                ec.label_fractions, label_seed, knn_k=ec.knn_k, device=dev))
                    row.update(teacher_row)
                else:
                    pset = what if isinstance(what, PretrainSet) else (
                        None if what == "none" else base.pretrain_set(what, seed))
                    dim = target_dim if pset is None else pset.targets.shape[1]
                    model = pretrain_kd(model_cfg.arch, model_cfg.kwargs, pset, in_channels=shape[0],
                                        image_size=shape[1], target_dim=dim, epochs=ec.epochs,
                                        batch_size=ec.batch_size,
                                        seed=ctx.seed_for("eval", "init", enc, seed), device=dev)
                    if pset is None:
                        bn_idx = torch.randperm(len(data), generator=ctx.generator("eval", "bn", seed))[:k]
                        recompute_bn_stats(model, data.images[bn_idx], data.mean, data.std)
                    if teacher_test is not None and test is not None and dim == target_dim:
                        fid = teacher_fidelity(model, test.images, teacher_test, data.mean, data.std,
                                               device=dev)
                        row["fidelity_r2"], row["fidelity_cosine"] = fid["r2"], fid["cosine"]
                    for ds in downstream:
                        row.update(downstream_metrics(
                            model.features, data.mean, data.std, ds, ec.label_fractions, label_seed,
                            knn_k=ec.knn_k, finetune=(model, ec.finetune_epochs), device=dev))
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                ctx.log.info("eval: %s", {k_: (round(v, 4) if isinstance(v, float) else v)
                                          for k_, v in row.items()})
                bar.update(1)
    bar.close()
    result = {
        "format": FORMAT, "source": cfg.source.name, "num_images": k,
        "protocol": {"encoders": [{"arch": m.arch, "kwargs": m.kwargs} for m in encoders],
                     "epochs": ec.epochs, "full_epochs": ec.full_epochs, "seeds": ec.seeds,
                     "label_fractions": ec.label_fractions, "knn_k": ec.knn_k,
                     "finetune_epochs": ec.finetune_epochs, "split": ec.split,
                     "holdout": cfg.source.holdout,
                     "downstream": [d.name for d in downstream],
                     "teacher_probe_accuracy": tmeta.get("probe_accuracy")},
        "distilled": {"method": own.metadata.get("method", "mkdt"), "lr": own.lr,
                      "iterations": own.metadata.get("iterations"),
                      "loss": own.metadata.get("matching_loss") or own.metadata.get("krr_loss")},
        "rows": rows, "summary": summarize(rows),
    }
    out_dir = ctx.run_dir if out is None else Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(out_dir, result)
    return result


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, std and count of every metric per (encoder, set), in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["encoder"], r["set"]), []).append(r)
    out = []
    for (enc, name), rs in groups.items():
        entry: dict[str, Any] = {"encoder": enc, "set": name}
        for key in rs[0]:
            if key in ("set", "encoder", "seed", "seconds"):
                continue
            vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
            if vals:
                entry[key] = {"mean": statistics.fmean(vals),
                              "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
        out.append(entry)
    return out


def window_closed(summary: list[dict[str, Any]], encoder: str, metric: str, low: str, high: str
                  ) -> dict[str, float]:
    """Per set: (set - low) / (high - low) on ``metric``, means over seeds (e.g. low = the random
    subset, high = full-data KD); {} when either reference is missing or they tie."""
    by = {s["set"]: s[metric]["mean"] for s in summary if s["encoder"] == encoder and metric in s}
    if low not in by or high not in by or by[high] == by[low]:
        return {}
    return {name: (v - by[low]) / (by[high] - by[low]) for name, v in by.items()}


def metric_columns(summary: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for s in summary:
        cols += [c for c in s if c not in ("encoder", "set") and c not in cols]
    return cols


def _cell(metric: str, stat: dict[str, Any] | None) -> str:
    if not stat:
        return "-"
    pct = "@" in metric
    m, sd = (100 * stat["mean"], 100 * stat["std"]) if pct else (stat["mean"], stat["std"])
    fmt = "{:.1f}" if pct else "{:.3f}"
    text = fmt.format(m)
    return text + (" ± " + fmt.format(sd) if stat["n"] > 1 else "")


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one table per evaluation encoder; accuracies in %, mean ± std over seeds."""
    summary = result["summary"]
    cols = metric_columns(summary)
    names = {"fidelity_r2": "fidelity R²", "fidelity_cosine": "fidelity cos"}
    out = []
    for enc in dict.fromkeys(s["encoder"] for s in summary):
        seeds = result["protocol"]["seeds"]
        split = result["protocol"].get("split", "test")
        where = " (validation split)" if split == "validation" else ""
        out.append(f"Encoder {enc}, {seeds} seed{'s' if seeds > 1 else ''}{where}:\n")
        out.append("| pre-training set | " + " | ".join(names.get(c, c) for c in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for s in summary:
            if s["encoder"] == enc:
                out.append(f"| {s['set']} | " + " | ".join(_cell(c, s.get(c)) for c in cols) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_results(run_dir: Path, result: dict[str, Any]) -> None:
    """``results.json``, ``results.md`` and ``results.png`` (atomic writes)."""
    with atomic_path(run_dir / RESULTS_FILE) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2))
    with atomic_path(run_dir / TABLE_FILE) as tmp:
        Path(tmp).write_text(format_table(result))
    plot_results(result, run_dir / PLOT_FILE)


def plot_results(result: dict[str, Any], path: Path) -> None:
    """One panel per metric (and encoder): a bar per pre-training set, whiskers = std."""
    summary = result["summary"]
    split = result["protocol"].get("split", "test")
    panels = []
    encoders = list(dict.fromkeys(s["encoder"] for s in summary))
    for enc in encoders:
        for col in metric_columns(summary):
            if col == "fidelity_cosine" or "/knn@" in col or "/finetune@" in col:
                continue
            scale = 100.0 if "@" in col else 1.0
            bars = [(s["set"], scale * s[col]["mean"], scale * s[col]["std"]) for s in summary
                    if s["encoder"] == enc and col in s and math.isfinite(s[col]["mean"])]
            if bars:
                title = col.replace("fidelity_r2", f"teacher fidelity R^2 (source {split})")
                title += " (accuracy %)" if scale != 1.0 else ''
                panels.append((title + (f", encoder {enc}" if len(encoders) > 1 else ""), bars))
    save_bar_panels(path, panels)
