"""Screen distilled sets on the validation split, paired by encoder seed (the protocol of
``benchmarks/results/levers_cpu.md`` from stop 17 on).

Every row is pre-trained with the evaluation's KD protocol (``eval.model``, SGD momentum 0.9, batch
``eval.batch_size``) at one lr from each of the encoder seeds, and scored on the run's held-out
images (``source.holdout``) by teacher fidelity R² and the source's probe, as the validation curve
scores snapshots (:class:`~distilled_ssl.stages.distill.monitor.SnapshotScorer`; seeds 11-18 are
not among the curve's or the lr choice's). Each row is also given as a difference to the reference
row, the run's init subset with the teacher's reps, **at the same encoder seed**: the seed moves
every set's score together, so the paired difference is the sharper test. Run it alone, one thread
(the thread count changes the float summation order, and at lr 0.8 that changes single scores).

    python benchmarks/screen.py runs/a runs/b                      # each run's kept set vs its init
    python benchmarks/screen.py runs/a --epochs 20,40,60           # the same sets trained longer
    python benchmarks/screen.py runs/a --no-sets --fresh 2560,5120,12800,25600
        # random real subsets of more images, each trained for the same number of steps as the
        # init subset (what the step budget allows with more distinct images)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distilled_ssl.config import RunConfig
from distilled_ssl.data.sources import normalize
from distilled_ssl.io import load_tensors
from distilled_ssl.layout import CONFIG_FILE, DISTILLED_FILE, INIT_FILE
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.distill.monitor import KEEP_METRIC, build_scorer
from distilled_ssl.stages.targets import load_targets


@dataclass
class Row:
    name: str
    images: torch.Tensor  # normalised
    targets: torch.Tensor
    epochs: int
    paired_with: int | None  # the epochs of the init row it is paired with (None: it is that row)


def seeds_arg(text: str) -> list[int]:
    """'11-18' or '11,12,15'."""
    if "-" in text:
        lo, hi = (int(v) for v in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(v) for v in text.split(",")]


def steps(n: int, batch: int, epochs: int) -> int:
    return epochs * math.ceil(n / batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run directories; the first one's init, teacher "
                    "reps and held-out images are the reference for all")
    ap.add_argument("--seeds", type=seeds_arg, default=seeds_arg("11-18"))
    ap.add_argument("--lr", type=float, default=0.8, help="pre-training lr of every row")
    ap.add_argument("--epochs", default="20", help="comma-separated; every row at each")
    ap.add_argument("--fresh", default="", help="comma-separated sizes of random real subsets with the "
                    "teacher's reps, trained for the init subset's number of steps")
    ap.add_argument("--no-sets", action="store_true", help="leave out the runs' distilled sets")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    epochs_list = [int(v) for v in args.epochs.split(",")]

    ctx = RunContext(RunConfig.from_yaml(args.runs[0] / CONFIG_FILE), args.runs[0], progress=False)
    data, batch = ctx.train_set, ctx.cfg.eval.batch_size
    reps = load_targets(ctx)
    index = load_tensors(ctx.path(INIT_FILE), ["indices"])[0]["indices"]
    k = len(index)
    m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
    rows: list[Row] = []
    for ep in epochs_list:
        rows.append(Row("init subset, teacher's reps", normalize(data.images[index], data.mean, data.std),
                        reps[index], ep, None))
        if not args.no_sets:
            for run in args.runs:
                kept = load_tensors(run / DISTILLED_FILE, ["images", "targets"])[0]
                rows.append(Row(f"{run.name} (kept set)", (kept["images"].float() - m) / s,
                                kept["targets"], ep, ep))
        budget = steps(k, batch, ep)
        for n in (int(v) for v in args.fresh.split(",") if v):
            if n > len(data):
                raise SystemExit(f"--fresh {n}: the run's source holds {len(data)} training images")
            pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(n))[:n]
            n_ep = max(1, round(budget / math.ceil(n / batch)))
            rows.append(Row(f"random {n:,}, teacher's reps",
                            normalize(data.images[pick], data.mean, data.std), reps[pick], n_ep, ep))

    scorer = build_scorer(ctx)
    results: list[list[dict[str, float]]] = []
    start = time.perf_counter()
    for row in rows:
        results.append([scorer.score_seed(row.images, row.targets, args.lr, seed, row.epochs)
                        for seed in args.seeds])
        print(f"  {row.name}, {row.epochs} epochs: "
              + " ".join(f"{r[KEEP_METRIC]:.3f}" for r in results[-1]), flush=True)

    ref_by_epochs = {row.epochs: res for row, res in zip(rows, results, strict=True)
                     if row.paired_with is None}
    lines = [f"Validation split of {args.runs[0]}: {len(scorer.val_images):,} held-out images; encoder "
             f"{(ctx.cfg.eval.model or ctx.cfg.student).arch}, lr {args.lr:g}, batch {batch}, encoder seeds "
             f"{args.seeds[0]}-{args.seeds[-1]}, {args.threads} thread(s), "
             f"{time.perf_counter() - start:.0f} s.", "",
             "| set | epochs | steps | fidelity R² per seed | mean (sd) | paired vs init (sd) | seeds ahead "
             "| probe mean |", "|---|---|---|---|---|---|---|---|"]
    for row, res in zip(rows, results, strict=True):
        fid = [r[KEEP_METRIC] for r in res]
        paired = ahead = "-"
        if row.paired_with is not None:
            diff = [a - b[KEEP_METRIC] for a, b in zip(fid, ref_by_epochs[row.paired_with], strict=True)]
            if len(diff) > 1:
                paired = f"{statistics.fmean(diff):+.3f} ({statistics.stdev(diff):.3f})"
            ahead = f"{sum(d > 0 for d in diff)}/{len(diff)}"
        probe = [r["probe"] for r in res if "probe" in r]
        sd = statistics.stdev(fid) if len(fid) > 1 else 0.0
        lines.append(f"| {row.name} | {row.epochs} | {steps(len(row.targets), batch, row.epochs)} | "
                     + " ".join(f"{v:.3f}" for v in fid)
                     + f" | {statistics.fmean(fid):.3f} ({sd:.3f}) | {paired} | {ahead} | "
                     + (f"{100 * statistics.fmean(probe):.1f}%" if probe else "-") + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
