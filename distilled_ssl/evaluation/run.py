"""Stage 6 for a run: pre-train fresh encoders on the distilled set, on the baselines and on
other distilled sets, measure them on every downstream set, and write ``results.json``,
``results.md`` (mean ± std over seeds) and ``results.png`` (one panel per metric; :mod:`.report`).

A seed fixes the pre-training init, the random subset and the label subsets; each encoder is
pre-trained once per seed and then measured on every downstream set. Under torchrun the
(seed, encoder, set) jobs are spread over the ranks and rank 0 writes the rows, in job order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.downstream import Downstream, display_name, load_downstream, parse_names, validation_split
from ..distributed import all_gather_objects, is_main, rank, world_size
from ..errors import ConfigError, DataNotFoundError, NotASetError
from ..layout import DISTILLED_FILE, TEACHER_FILE
from ..models.pretrain import PretrainSet, pretrain_kd
from ..models.probe import extract
from ..sets.artifact import DistilledSet, is_set_dir, load_distilled_file, method_title, read_set
from ..sets.results import paired, summarize
from ..stages.context import RunContext
from ..stages.distill.monitor import build_scorer, choose_lr
from ..stages.teacher import load_teacher
from .baselines import TUNED_BASELINES, Baselines, init_label
from .protocol import downstream_metrics, recompute_bn_stats, teacher_fidelity
from .report import write_results

__all__ = ["downstream_sets", "evaluate_run", "load_compare", "set_title",
           "tune_baseline_lrs"]

FORMAT = 2


def set_title(dset: DistilledSet) -> str:
    """'MKDT (high-loss init, class-balanced)' from a set's metadata."""
    meta = dset.metadata
    method = method_title(meta.get("method"))
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
    raise NotASetError(f"{p} is neither a set folder nor a run directory with {DISTILLED_FILE}")


def _as_pretrain(dset: DistilledSet, title: str, shape: tuple[int, int, int]) -> PretrainSet:
    if tuple(dset.images.shape[1:]) != shape:
        raise ConfigError(f"{title}: images of shape {tuple(dset.images.shape[1:])} do not fit the "
                         f"source's {shape}")
    m = torch.tensor(dset.mean).view(1, -1, 1, 1)
    sd = torch.tensor(dset.std).view(1, -1, 1, 1)
    return PretrainSet(title, (dset.images.float() - m) / sd, dset.targets.float(), dset.lr)


def downstream_sets(ctx: RunContext) -> list[Downstream]:
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
                raise ConfigError(f"downstream set {name}: the source has no labels")
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


NEEDS_TEACHER = ("random", "init", "high_loss", "high_loss_balanced", "full", "full_steps", "teacher")


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
            raise ConfigError(f"baseline(s) {needing} need the run directory that made the set (its "
                             "teacher and target reps); evaluate the run, or use --baselines none")
    k = len(own)
    shape = data.shape
    candidates: list[tuple[str, Any]] = []  # (title, "none" | "teacher" | baseline name | PretrainSet)
    base = Baselines(ctx, k, lr=float(own.lr) if ec.baseline_lr == "set" else None)
    lr_search: dict[str, list[dict[str, float]]] = {}
    if ec.baseline_lr == "tuned":
        base.lrs, lr_search = tune_baseline_lrs(ctx, base, [b for b in ec.baselines if b in TUNED_BASELINES])
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
    downstream = downstream_sets(ctx)
    encoders = [ec.model or cfg.student, *ec.extra_models]
    jobs = [(seed, model_cfg, title, what) for seed in range(ec.seeds) for model_cfg in encoders
            for title, what in candidates]
    mine = range(rank(), len(jobs), world_size())  # under torchrun: job i on rank i mod W
    rows: list[dict[str, Any]] = []
    bar = ctx.bar(total=len(mine), desc="evaluate")
    teacher_rows: dict[int, dict[str, Any]] = {}  # per seed
    for seed, model_cfg, title, what in (jobs[i] for i in mine):
        label_seed = ctx.seed_for("eval", "labels", seed)
        teacher_row = teacher_rows.get(seed)
        enc = model_cfg.label
        t0 = time.perf_counter()
        row: dict[str, Any] = {"set": title, "encoder": enc, "seed": seed}
        if what == "teacher":
            assert teacher is not None
            if teacher_row is None:
                teacher_row = teacher_rows[seed] = {}
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
                                batch_size=ec.batch_size, precise_bn=ec.precise_bn,
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
    rows = _in_job_order(rows, len(jobs))
    result = {
        "format": FORMAT, "source": cfg.source.name, "num_images": k,
        "protocol": {"encoders": [{"arch": m.arch, "kwargs": m.kwargs} for m in encoders],
                     "epochs": ec.epochs, "full_epochs": ec.full_epochs, "seeds": ec.seeds,
                     "precise_bn": ec.precise_bn, "baseline_lr": ec.baseline_lr,
                     **({"baseline_lrs": base.lrs, "lr_search": lr_search} if lr_search else {}),
                     "label_fractions": ec.label_fractions, "knn_k": ec.knn_k,
                     "finetune_epochs": ec.finetune_epochs, "split": ec.split,
                     "holdout": cfg.source.holdout,
                     "downstream": [d.name for d in downstream],
                     "teacher_probe_accuracy": tmeta.get("probe_accuracy")},
        "distilled": {"method": own.metadata.get("method", "mkdt"), "lr": own.lr,
                      "iterations": own.metadata.get("iterations"),
                      "loss": next((own.metadata[k] for k in ("matching_loss", "krr_loss", "fidelity_loss")
                                    if k in own.metadata), None)},
        "rows": rows, "summary": summarize(rows),
    }
    reference = base.title("random") if "random" in ec.baselines else None
    if reference is not None and ec.seeds > 1:  # the bar a distilled set has to clear, seed by seed
        result["paired"] = {"reference": reference, "summary": paired(rows, reference)}
    if is_main():
        out_dir = ctx.run_dir if out is None else Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_results(out_dir, result)
    return result


def tune_baseline_lrs(ctx: RunContext, base: Baselines, names: Sequence[str]
                      ) -> tuple[dict[str, float], dict[str, list[dict[str, float]]]]:
    """``eval.baseline_lr: tuned``: each subset baseline's lr, chosen among ``eval.lr_grid`` by its
    score on the held-out images (``source.holdout``; the protocol and encoder seeds that
    ``distill.lr_grid`` chooses the set's lr with), on seed 0's subset; and every candidate's
    scores. Under torchrun the baselines are shared out over the ranks."""
    if not names:
        return {}, {}
    if ctx.validation_set is None:
        raise ConfigError("eval.baseline_lr=tuned chooses the baselines' lrs on held-out training images: "
                          "set source.holdout (e.g. 5000), or eval.baseline_lr=init")
    scorer = build_scorer(ctx)
    metric = ctx.cfg.distill.keep_metric
    found: dict[str, tuple[float, list[dict[str, float]]]] = {}
    for name in list(names)[rank()::world_size()]:
        pset = base.pretrain_set(name, 0)
        found[name] = choose_lr(scorer, pset.images, pset.targets, ctx.cfg.eval.lr_grid, metric,
                                log=lambda msg, n=name: ctx.log.info("eval: tuning %s: %s", n, msg),
                                steps=pset.steps)
        ctx.log.info("eval: %s trains at lr %.4g (chosen on the held-out images)", name, found[name][0])
    if world_size() > 1:
        found = {n: v for part in all_gather_objects(found) for n, v in part.items()}
    lrs = {n: found[n][0] for n in names}
    return lrs, {n: found[n][1] for n in names}


def _in_job_order(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Every rank's rows (rank r ran jobs r, r + W, ...), in job order, on every rank."""
    w = world_size()
    if w == 1:
        return rows
    per_rank = all_gather_objects(rows)
    return [per_rank[i % w][i // w] for i in range(n)]
