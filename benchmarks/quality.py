"""The quality benchmark: MKDT end to end on a preset, then every baseline, over several seeds.

Runs (or reuses, when finished) three distillations in sibling run directories that share the
teacher, target reps and experts (hard links, so no stage runs twice):

* ``OUT/mkdt``         — the preset as shipped (MKDT, its own init);
* ``OUT/mkdt-random``  — MKDT from a plain random init (``OUT/mkdt-high-loss``, from the
  class-balanced high-loss init, when the preset's init is random): the paper reports both;
* ``OUT/krr-st``       — KRR-ST from a plain random init (``distill.method=krr_st``);
* ``OUT/mkdt-long``    — with ``--long PRESET``: a copy of ``OUT/mkdt`` continued to that preset's
  iterations (``cpu-fmnist-2pct-long`` continues ``cpu-fmnist-2pct``: same settings, 4x the budget);

then ``evaluate_run`` on ``OUT/mkdt`` with every baseline and the two other sets, and prints /
writes the table, the "window closed" figures and the plot.

    python benchmarks/quality.py --out runs/quality --long cpu-fmnist-2pct-long
    python benchmarks/quality.py --out runs/q --no-siblings --baselines none,random,init,full,teacher
    python benchmarks/quality.py --out runs/q --preset smoke --seeds 1 --set eval.full_epochs=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from distilled_ssl.config import load_preset
from distilled_ssl.evaluation.run import evaluate_run
from distilled_ssl.layout import PLOT_FILE
from distilled_ssl.pipeline import prepare_run, run_log, run_pipeline
from distilled_ssl.sets.results import format_table

SHARED = ("teacher.safetensors", "targets.safetensors", "experts")
BASELINES = ["none", "random", "high_loss", "high_loss_balanced", "full", "full_steps", "teacher"]
PRIMARY = ("fidelity_r2", "fashion-mnist/probe@1%", "mnist-5k/probe@10%")


def window_closed(summary: list[dict[str, Any]], encoder: str, metric: str, low: str, high: str
                  ) -> dict[str, float]:
    """Per set: (set - low) / (high - low) on ``metric``, means over seeds (e.g. low = the random
    subset, high = full-data KD); {} when either reference is missing or they tie."""
    by = {s["set"]: s[metric]["mean"] for s in summary if s["encoder"] == encoder and metric in s}
    if low not in by or high not in by or by[high] == by[low]:
        return {}
    return {name: (v - by[low]) / (by[high] - by[low]) for name, v in by.items()}


def margin_in_sd(summary: list[dict[str, Any]], encoder: str, metric: str, low: str) -> dict[str, float]:
    """Per set: (set - low) on ``metric`` in units of the larger of the two standard deviations."""
    by = {s["set"]: s[metric] for s in summary if s["encoder"] == encoder and metric in s}
    if low not in by:
        return {}
    ref = by[low]
    return {name: (v["mean"] - ref["mean"]) / max(v["std"], ref["std"], 1e-12) for name, v in by.items()}


def link_shared(src: Path, dst: Path) -> None:
    """Hard-link the shared artifacts of ``src`` into ``dst`` (copy when links are impossible)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        s, d = src / name, dst / name
        if not s.exists() or d.exists():
            continue
        if s.is_dir():
            shutil.copytree(s, d, copy_function=_link_or_copy)
        else:
            _link_or_copy(s, d)


def _link_or_copy(s: str | os.PathLike, d: str | os.PathLike) -> None:
    try:
        os.link(s, d)
    except OSError:
        shutil.copy2(s, d)


def _run(cfg: Any, out: Path, name: str, stages: list[str] | None = None) -> dict[str, float]:
    ctx = prepare_run(cfg, out, progress=False)
    t0 = time.perf_counter()
    times = run_pipeline(ctx, stages=stages)
    print(f"[{name}] stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f" (total {time.perf_counter() - t0:.0f} s)", flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="cpu-fmnist-2pct")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--weak-teacher", default="builtin:fmnist-bt-resnet10-8ep",
                    help="Full-data KD with this teacher too (empty: skip).")
    ap.add_argument("--downstream", default="fashion-mnist,mnist-5k")
    ap.add_argument("--label-fractions", default="0.01,0.1")
    ap.add_argument("--cross-arch", default="student",
                    help="A second evaluation encoder ('student' = the distillation ConvNet; empty: none).")
    ap.add_argument("--long", default=None, metavar="PRESET",
                    help="Also continue a copy of the preset's run to this preset's iterations (same "
                         "settings otherwise) and compare it.")
    ap.add_argument("--siblings", action=argparse.BooleanOptionalAction, default=True,
                    help="Distil and compare MKDT from the other init and KRR-ST.")
    ap.add_argument("--baselines", default=",".join(BASELINES), help="Baselines to evaluate.")
    ap.add_argument("--krr-iterations", type=int, default=None, help="KRR-ST outer steps (default: preset).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="Config override for every run.")
    ap.add_argument("--results", type=Path, default=None,
                    help="Also write table/plot/json here (e.g. benchmarks/results/quality_cpu)")
    args = ap.parse_args()

    from distilled_ssl.cli.evaluate import parse_arch

    base = load_preset(args.preset).override(args.overrides)
    out = args.out
    t_all = time.perf_counter()
    times = {"mkdt": _run(base, out / "mkdt", "mkdt")}
    compare: list[Path] = []
    if args.long:
        long_cfg = load_preset(args.long).override(args.overrides)
        if not (out / "mkdt-long").exists():  # continue the preset's run (its state and curve)
            shutil.copytree(out / "mkdt", out / "mkdt-long", copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns("results.*", "distilled.*", "curve.png",
                                                          "run.log", "config.yaml"))
        times["mkdt-long"] = _run(long_cfg, out / "mkdt-long", "mkdt-long")
        compare.append(out / "mkdt-long")
    if args.siblings:
        random_init = ["init.method=random", "init.class_balanced=false"]
        # MKDT from the other init (the paper reports random and high-loss init)
        other_init = (["init.method=high_loss", "init.class_balanced=true"]
                      if base.init.method == "random" else random_init)
        sibling = "mkdt-high-loss" if base.init.method == "random" else "mkdt-random"
        link_shared(out / "mkdt", out / sibling)
        times[sibling] = _run(base.override(other_init), out / sibling, sibling)
        link_shared(out / "mkdt", out / "krr-st")
        krr = base.override([*random_init, "distill.method=krr_st"])
        if args.krr_iterations is not None:
            krr = krr.override([f"distill.iterations={args.krr_iterations}"])
        times["krr-st"] = _run(krr, out / "krr-st", "krr-st",
                               stages=["teacher", "targets", "init", "distill"])
        compare += [out / sibling, out / "krr-st"]

    cfg = base.override([f"eval.seeds={args.seeds}"])
    ec = cfg.eval
    ec.baselines = [b for b in args.baselines.split(",") if b] + (
        [f"full:{args.weak_teacher}"] if args.weak_teacher else [])
    ec.downstream = [d for d in args.downstream.split(",") if d]
    ec.label_fractions = [float(f) for f in args.label_fractions.split(",")]
    ec.extra_models = [parse_arch(args.cross_arch, cfg.student)] if args.cross_arch else []
    ctx = prepare_run(cfg, out / "mkdt", progress=False)
    t0 = time.perf_counter()
    with run_log(ctx):
        result = evaluate_run(ctx, compare=compare)
    times["evaluate"] = {"total": time.perf_counter() - t0}

    table = format_table(result)
    enc = result["summary"][0]["encoder"]
    sets = {s["set"] for s in result["summary"]}
    low = next(s for s in sets if s.startswith("random subset"))
    high = next(s for s in sets if s.startswith("full-data KD") and "teacher" not in s)
    lines = [f"Window closed = (set - random) / (full KD - random), encoder {enc}:", "",
             "| set | " + " | ".join(PRIMARY) + " |", "|---" * (len(PRIMARY) + 1) + "|"]
    closed = {m: window_closed(result["summary"], enc, m, low, high) for m in PRIMARY}
    margins = {m: margin_in_sd(result["summary"], enc, m, low) for m in PRIMARY}
    for s in dict.fromkeys(x["set"] for x in result["summary"]):
        if s.startswith(("MKDT", "KRR-ST", "high-loss", "init", "equal-steps")):
            lines.append(f"| {s} | " + " | ".join(
                f"{closed[m][s]:+.2f} ({margins[m][s]:+.1f} sd)" if s in closed[m] else "-"
                for m in PRIMARY) + " |")
    lines += ["", "(sd) = (set - random) / the larger of the two sets' standard deviations over seeds; "
              "the issue's bar is > 2 sd and a window closed >= 0.50 on every column."]
    stage_lines = [f"- {name}: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
                   for name, t in times.items()]
    header = (f"# Quality benchmark: preset {args.preset}, {args.seeds} seeds\n\n"
              f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; total {(time.perf_counter() - t_all) / 60:.1f} min.\n\n"
              f"Protocol: {json.dumps(result['protocol'])}\n")
    text = "\n".join([header, table, "\n".join(lines), "", "Wall times:", *stage_lines, ""])
    print(text)
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.with_suffix(".md").write_text(text)
        shutil.copyfile(out / "mkdt" / PLOT_FILE, args.results.with_suffix(".png"))
        shutil.copyfile(out / "mkdt" / "results.json", args.results.with_suffix(".json"))


if __name__ == "__main__":
    main()
