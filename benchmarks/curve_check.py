"""How far does the validation curve's score agree with the full protocol? For a finished run with
``distill.eval_every``: the init subset, the kept set and the last state, each scored by the monitor
(``distill.eval_seeds`` seeds, up to 2,000 held-out images) and by the validation protocol (3 encoder
seeds, all held-out images): fidelity R² of the evaluation encoder.

    python benchmarks/curve_check.py runs/demo
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from distilled_ssl.config import RunConfig
from distilled_ssl.data.sources import normalize
from distilled_ssl.evaluation.protocol import teacher_fidelity
from distilled_ssl.io import load_tensors
from distilled_ssl.layout import (
    CONFIG_FILE,
    DISTILLED_FILE,
    INIT_FILE,
    STATE_FILE,
    TARGETS_FILE,
    TEACHER_FILE,
)
from distilled_ssl.models.pretrain import PretrainSet, pretrain_kd
from distilled_ssl.models.probe import extract
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.distill.monitor import build_scorer
from distilled_ssl.stages.teacher import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    ctx = RunContext(RunConfig.from_yaml(args.run / CONFIG_FILE), args.run, progress=False)
    data, held = ctx.train_set, ctx.validation_set
    if held is None:
        raise SystemExit("the run holds no images out (source.holdout = 0)")
    teacher, tmeta = load_teacher(ctx.path(TEACHER_FILE))
    reps = extract(teacher.features, held.images, tuple(tmeta["mean"]), tuple(tmeta["std"]))
    index = load_tensors(ctx.path(INIT_FILE))[0]["indices"]
    state = load_tensors(ctx.path(STATE_FILE))[0]
    kept = load_tensors(ctx.path(DISTILLED_FILE))[0]
    m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
    sets = {
        "init": (normalize(data.images[index], data.mean, data.std),
                 load_tensors(ctx.path(TARGETS_FILE))[0]["target_reps"][index], ctx.cfg.distill.lr_init),
        "kept (distilled.safetensors)": ((kept["images"].float() - m) / s, kept["targets"],
                                         float(kept["lr"])),
        "last state": (state["images"], state["targets"], float(state["lr"])),
    }
    enc = ctx.cfg.eval.model or ctx.cfg.student
    label = enc.label  # as the evaluation names (and seeds) the encoder
    scorer = build_scorer(ctx)
    print(f"| set | monitor ({ctx.cfg.distill.eval_seeds} seed(s)) | protocol ({args.seeds} seeds, "
          f"{len(held):,} images) |\n|---|---|---|")
    for name, (x, y, lr) in sets.items():
        monitor = scorer(x, y, torch.tensor(lr))["fidelity_r2"]
        full = []
        for seed in range(args.seeds):
            model = pretrain_kd(enc.arch, enc.kwargs, PretrainSet(name, x, y, lr), in_channels=data.shape[0],
                                image_size=data.shape[1], target_dim=y.shape[1], epochs=ctx.cfg.eval.epochs,
                                batch_size=ctx.cfg.eval.batch_size, precise_bn=ctx.cfg.eval.precise_bn,
                                seed=ctx.seed_for("eval", "init", label, seed))
            full.append(teacher_fidelity(model, held.images, reps, data.mean, data.std)["r2"])
        sd = statistics.stdev(full) if len(full) > 1 else 0.0
        print(f"| {name} | {monitor:.3f} | {statistics.fmean(full):.3f} ± {sd:.3f} |", flush=True)


if __name__ == "__main__":
    main()
