"""Wall time per pipeline stage on W processes (torchrun, gloo on CPU, one thread per rank), and the
parallel efficiency T1 / (W x TW) of each stage; or, with ``--samples``, matching iterations per second
on one device for several ``distill.samples_per_iteration`` K.

Every run is a fresh run directory of the same config (the ``--preset`` with the ``--set`` overrides
below, evaluation off), so each stage does the same work at every W. Stage times come from the run's
``run.log`` ("stage X done in Y s": from the stage's start to the barrier that ends it).

    python benchmarks/scaling.py                          # W = 1, 2 on this machine (about 10 min)
    python benchmarks/scaling.py --world 1 2 4 --out results.md
    python benchmarks/scaling.py --device cuda --samples 1 4 8   # one GPU: K = 1, 4, 8
    python benchmarks/scaling.py --samples 1 4 --batched          # and K = 4 walked together (vmap)

With ``--samples`` the table has two rates: over the whole distill stage (the first iteration's
compile included, where ``distill.compile`` is on) and over the log's last window of
``distill.log_every`` iterations (steady state). ``--batched`` adds, for each K > 1, a run with
``distill.batch_samples=true`` (the K samples as one vmapped walk; needs ``distill.compile``).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The demo's recipe, cut to a few minutes: 4 experts and 12 matching iterations of K = 2 samples
# (so that two ranks split every iteration), no validation scores and no lr choice after matching.
DEFAULT_SETS = ["experts.num_experts=4", "distill.iterations=12", "distill.samples_per_iteration=2",
                "distill.eval_every=0", "distill.eval_lr=0", "distill.keep=last", "distill.patience=0",
                "distill.lr_grid=[]", "distill.log_every=4"]
STAGE_LINE = re.compile(r"stage (\w+) done in ([0-9.]+) s")
WINDOW_LINE = re.compile(r"distill \d+/\d+: .* ([0-9.]+) s/it")


def _run(out: Path, world: int, args: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    cli = ["-m", "distilled_ssl.cli", "run", "--preset", args.preset, "--out", str(out), "--no-eval",
           "-q", "--device", args.device, "--set", f"threads={args.threads}"]
    for item in [*args.set, *extra]:
        cli += ["--set", item]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(world), *cli]
    else:
        cmd = [sys.executable, *cli]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log = (out / "run.log").read_text()
    times = {m.group(1): float(m.group(2)) for m in STAGE_LINE.finditer(log)}
    windows = WINDOW_LINE.findall(log)
    if windows:
        times["last window s/it"] = float(windows[-1])
    times["total (wall, with start-up)"] = total
    return times


def scaling(args: argparse.Namespace) -> str:
    by_world: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.world:
            by_world[world] = _run(Path(tmp) / f"w{world}", world, args, [])
            print(f"  W={world}: " + ", ".join(f"{k} {v:.1f} s" for k, v in by_world[world].items()),
                  file=sys.stderr)
    stages = list(by_world[args.world[0]])
    one = by_world.get(1)
    head = ["stage", *[f"W={w} (s)" for w in args.world]]
    if one:
        head += [f"efficiency W={w}" for w in args.world if w > 1]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in stages:
        row = [stage, *[f"{by_world[w].get(stage, float('nan')):.1f}" for w in args.world]]
        if one:
            row += [f"{one[stage] / (w * by_world[w][stage]):.2f}" if by_world[w].get(stage) else "-"
                    for w in args.world if w > 1]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def samples(args: argparse.Namespace) -> str:
    """Matching iterations (and trajectory samples) per second on one process for each K (and,
    with ``--batched``, each K > 1 walked together)."""
    rows = []
    runs = [(k, False) for k in args.samples]
    if args.batched:
        runs += [(k, True) for k in args.samples if k > 1]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        _run(base, 1, args, ["distill.iterations=0"])  # teacher, targets, experts, init once
        for k, batched in runs:
            out = Path(tmp) / f"k{k}{'b' if batched else ''}"
            out.mkdir()
            for f in base.iterdir():  # reuse the shared stages' artifacts (hard links)
                if f.is_file() and f.name.endswith(".safetensors") and not f.name.startswith("distill"):
                    os.link(f, out / f.name)
            (out / "experts").mkdir()
            for f in (base / "experts").glob("*.safetensors"):
                os.link(f, out / "experts" / f.name)
            extra = [f"distill.samples_per_iteration={k}"]
            if batched:
                extra.append("distill.batch_samples=true")
            t = _run(out, 1, args, extra)
            its = _iterations(args)
            steady = 1 / t["last window s/it"] if "last window s/it" in t else float("nan")
            rows.append((f"{k}, walked together" if batched else str(k), its / t["distill"],
                         k * its / t["distill"], steady, k * steady))
            print(f"  K={rows[-1][0]}: {its / t['distill']:.3f} it/s, last window {steady:.3f} it/s",
                  file=sys.stderr)
    lines = ["| K (samples per iteration) | iterations / s (stage) | trajectory samples / s (stage) | "
             "iterations / s (last window) | trajectory samples / s (last window) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {a:.3f} | {b:.3f} | {c:.3f} | {d:.3f} |" for k, a, b, c, d in rows]
    return "\n".join(lines)


def _iterations(args: argparse.Namespace) -> int:
    value = [s.split("=", 1)[1] for s in [*DEFAULT_SETS, *args.set] if s.startswith("distill.iterations=")]
    return int(value[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-fmnist-2pct")
    p.add_argument("--set", action="append", default=list(DEFAULT_SETS), metavar="KEY=VALUE",
                   help="config overrides (added to the defaults: " + " ".join(DEFAULT_SETS) + ")")
    p.add_argument("--world", type=int, nargs="+", default=[1, 2], help="numbers of processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, nargs="+", help="instead: one process, these K")
    p.add_argument("--batched", action="store_true",
                   help="with --samples: also each K > 1 with distill.batch_samples=true")
    p.add_argument("--out", help="also write the table (Markdown) to this file")
    args = p.parse_args()
    t0 = time.perf_counter()
    table = samples(args) if args.samples else scaling(args)
    what = (f"one process on {args.device}, K samples per iteration" if args.samples else
            f"W processes (torchrun --standalone, gloo), {args.threads} thread(s) each, {args.device}")
    text = (f"Preset {args.preset} with {' '.join(args.set)}; {what}; {platform.machine()}, "
            f"{os.cpu_count()} CPUs; {time.perf_counter() - t0:.0f} s in all.\n\n{table}")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
