"""Hyperparameter sweep on a validation split of the source's training images (never a test set).

``source.holdout`` training images are held out of every stage (teacher targets, experts, init,
distillation); each variant of the preset distils in its own run directory sharing the teacher,
target reps and experts (hard links), then one evaluation measures every variant beside the
random subset and full-data KD on the held-out images (fidelity, Fashion-MNIST probe) and on a
stratified 20% of MNIST-5k's train split (``eval.split=validation``).

    python benchmarks/tune.py --out runs/tune --jobs 2 --results benchmarks/results/tune_cpu
    python benchmarks/tune.py --out runs/t --preset smoke --holdout 100 --variant a=distill.lr_img=10
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from quality import PRIMARY, link_shared, window_closed

from distilled_ssl.config import RunConfig, load_preset
from distilled_ssl.evaluation.run import evaluate_run
from distilled_ssl.pipeline import prepare_run, run_log, run_pipeline
from distilled_ssl.sets.results import format_table

RANDOM_INIT = "init.method=random,init.class_balanced=false"
DEFAULT_VARIANTS = {
    "preset": "",
    "random-init": RANDOM_INIT,
    "random-lr_img-3e4": f"{RANDOM_INIT},distill.lr_img=3e4",
    "random-lr_targets-10": f"{RANDOM_INIT},distill.lr_targets=10",
    "random-syn_steps-10": f"{RANDOM_INIT},distill.syn_steps=10,distill.iterations=280",
    "random-iterations-200": f"{RANDOM_INIT},distill.iterations=200",
}


def _distil(cfg_dict: dict, out: str, name: str, threads: int,
            stages: tuple[str, ...] = ("teacher", "targets", "experts", "init", "distill")
            ) -> tuple[str, dict[str, float]]:
    torch.set_num_threads(threads)
    ctx = prepare_run(RunConfig.from_dict(cfg_dict), out, progress=False)
    return name, run_pipeline(ctx, stages=list(stages))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="cpu-fmnist-2pct")
    ap.add_argument("--holdout", type=int, default=5000, help="Validation images held out of the source.")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1,
                    help="Variants distilled at once (each with threads/jobs torch threads).")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=K=V[,K=V]",
                    help="A variant of the preset (repeatable; default: the built-in grid).")
    ap.add_argument("--downstream", default="fashion-mnist,mnist-5k")
    ap.add_argument("--label-fractions", default="0.01,0.1")
    ap.add_argument("--cross-arch", default="student")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--results", type=Path, default=None, help="Write NAME.md / NAME.json here too.")
    ap.add_argument("--report-only", action="store_true",
                    help="Re-render the table from OUT/<first variant>/results.json (no evaluation).")
    args = ap.parse_args()

    from distilled_ssl.cli.evaluate import parse_arch

    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else DEFAULT_VARIANTS
    base = load_preset(args.preset).override([*args.overrides, f"source.holdout={args.holdout}"])
    t_all = time.perf_counter()
    shared = args.out / "base"
    threads = torch.get_num_threads()
    cfgs = {name: base.override([o for o in spec.split(",") if o]) for name, spec in variants.items()}
    # The shared experts train as far as the most demanding variant reads (longer ones serve all).
    longest = max(cfgs.values(), key=lambda c: max(c.distill.max_start_epoch + c.distill.expert_epochs,
                                                   c.init.loss_epoch))
    if not args.report_only:
        _distil(longest.to_dict(), str(shared), "base", threads, ("teacher", "targets", "experts"))
    for name in cfgs:
        link_shared(shared, args.out / name)
    times: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    per_job = max(1, threads // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {name: pool.submit(_distil, cfg.to_dict(), str(args.out / name), name, per_job)
                   for name, cfg in cfgs.items() if not args.report_only}
        for name, f in futures.items():
            try:
                times[name] = f.result()[1]
            except Exception as exc:  # report the variant as failed, evaluate the others
                failed[name] = f"{type(exc).__name__}: {exc}"
                print(f"[{name}] FAILED: {failed[name]}", flush=True)
                continue
            print(f"[{name}] " + ", ".join(f"{k} {v:.0f} s" for k, v in times[name].items()), flush=True)
    cfgs = {n: c for n, c in cfgs.items() if n not in failed}
    if not cfgs:
        raise SystemExit("every variant failed")

    first, *others = cfgs
    cfg = cfgs[first].override([f"eval.seeds={args.seeds}", "eval.split=validation"])
    ec = cfg.eval
    ec.baselines = ["random", "full"]
    ec.downstream = [d for d in args.downstream.split(",") if d]
    ec.label_fractions = [float(f) for f in args.label_fractions.split(",")]
    ec.extra_models = [parse_arch(args.cross_arch, cfg.student)] if args.cross_arch else []
    results_file = args.out / first / "results.json"
    if args.report_only:
        result = json.loads(results_file.read_text())
    else:
        ctx = prepare_run(cfg, args.out / first, progress=False)
        with run_log(ctx):
            result = evaluate_run(ctx, compare=[args.out / n for n in others])

    # Rows are titled by method and init; name them by variant instead. Per encoder the sets come
    # in evaluation order: the baselines, the evaluated run's own set, then the compared ones.
    order = list(dict.fromkeys(s["set"] for s in result["summary"]))
    titles = order[len(ec.baselines):]
    if len(titles) != len(cfgs):
        raise SystemExit(f"{results_file}: {len(titles)} distilled sets for {len(cfgs)} variants")
    rename = dict(zip(titles, cfgs, strict=True))
    for row in (*result["summary"], *result["rows"]):
        row["set"] = rename.get(row["set"], row["set"])
    titles = set(order)
    table = format_table(result)
    encoders = list(dict.fromkeys(s["encoder"] for s in result["summary"]))
    low = next(t for t in titles if t.startswith("random subset"))
    high = next(t for t in titles if t.startswith("full-data KD"))
    lines = []
    for enc in encoders:
        closed = {m: window_closed(result["summary"], enc, m, low, high) for m in PRIMARY}
        lines += ["", f"Window closed = (variant - random) / (full KD - random), encoder {enc}:", "",
                  "| variant | overrides | " + " | ".join(PRIMARY) + " |", "|---" * (len(PRIMARY) + 2) + "|"]
        lines += [f"| {n} | {variants[n] or '(preset)'} | "
                  + " | ".join(f"{closed[m][n]:+.2f}" if n in closed[m] else "-" for m in PRIMARY) + " |"
                  for n in cfgs]
    wall = [f"- {n}: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) for n, t in times.items()]
    wall += [f"- {n}: FAILED ({err})" for n, err in failed.items()]
    if args.report_only:
        wall = ["- (table re-rendered with --report-only; each variant's run.log has its stage times)"]
    text = "\n".join([
        f"# Validation sweep: preset {args.preset}, {args.holdout} held-out training images, "
        f"{args.seeds} seeds\n",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} "
        f"threads, {args.jobs} variant(s) at a time; total {(time.perf_counter() - t_all) / 60:.1f} min.\n",
        f"Protocol: {json.dumps(result['protocol'])}\n", table, *lines, "", "Wall times (variants "
        "sharing the cores):", *wall, ""])
    print(text)
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.with_suffix(".md").write_text(text)
        args.results.with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
