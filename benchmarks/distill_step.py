"""Seconds per distillation iteration and peak memory, per matching mode and syn_steps.

Each (mode, syn_steps) cell runs in its own process so that its peak RSS is its own. The
"overhead" column is an iteration's time divided by the time of ``syn_steps`` plain SGD steps
(forward, backward, update; no second-order graph) on the same model and minibatch size.

    python benchmarks/distill_step.py                      # the cpu-fmnist-2pct shapes
    python benchmarks/distill_step.py --steps 10 20 40 80 --target-dim 512 --out results.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def _setup(args: argparse.Namespace):
    from distilled_ssl.models.encoders import FlatParams, build_model

    torch.manual_seed(0)
    model = build_model("convnet", in_channels=args.channels, image_size=args.size,
                        output_dim=args.target_dim, depth=args.depth, width=args.width,
                        norm=args.norm).to(args.device)
    flat = FlatParams(model)
    theta0 = flat.flatten().to(args.device)
    target = theta0 + 0.01 * torch.randn_like(theta0)
    images = torch.randn(args.images, args.channels, args.size, args.size, device=args.device)
    reps = torch.randn(args.images, args.target_dim, device=args.device)
    return model, flat, theta0, target, images, reps


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cell(args: argparse.Namespace) -> dict:
    """One (mode, syn_steps) measurement, in this process."""
    from distilled_ssl.registry import MATCHERS
    from distilled_ssl.stages.distill.matching import minibatches

    torch.set_num_threads(args.threads)
    _model, flat, theta0, target, images, reps = _setup(args)
    lr = torch.tensor(0.1, device=args.device)
    fn = MATCHERS[args.mode]
    times = []
    for rep in range(args.repeats + 1):
        batches = [b.to(args.device) for b in
                   minibatches(args.images, args.batch, args.syn_steps, torch.Generator().manual_seed(rep))]
        _sync(args.device)
        t0 = time.perf_counter()
        res = fn(flat, theta0, target, images, reps, lr, batches)
        float(res.loss)
        _sync(args.device)
        if rep:  # the first is warm-up
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    return {"seconds": statistics.median(times), "peak_rss_mib": peak, "cuda_peak_mib": cuda_peak}


def plain_sgd_step_seconds(args: argparse.Namespace) -> float:
    """Median time of one plain SGD training step on a minibatch of ``batch`` images."""
    from distilled_ssl.models.losses import kd_loss

    torch.set_num_threads(args.threads)
    model, _, _, _, images, reps = _setup(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = images[:args.batch], reps[:args.batch]
    times = []
    for rep in range(25):
        _sync(args.device)
        t0 = time.perf_counter()
        loss = kd_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(args.device)
        if rep >= 5:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--modes", nargs="+", default=["adjoint", "unrolled"])
    p.add_argument("--images", type=int, default=1200, help="synthetic set size")
    p.add_argument("--batch", type=int, default=128, help="batch_syn")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--norm", default="instance")
    p.add_argument("--target-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the table (Markdown) to this file")
    p.add_argument("--cell", nargs=2, metavar=("MODE", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        args.mode, args.syn_steps = args.cell[0], int(args.cell[1])
        print(json.dumps(cell(args)))
        return
    base = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("images", "batch", "size", "channels", "depth", "width", "norm", "target_dim",
                     "repeats", "threads", "device")]
    plain = plain_sgd_step_seconds(args)
    rows = []
    for steps in args.steps:
        for mode in args.modes:
            cmd = [sys.executable, __file__, *base, "--cell", mode, str(steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r.update(mode=mode, syn_steps=steps, overhead=r["seconds"] / (steps * plain))
            rows.append(r)
            print(f"  {mode:9s} syn_steps={steps:3d}: {r['seconds']:.2f} s/it, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    head = (f"ConvNet depth {args.depth} width {args.width} ({args.norm} norm), "
            f"{args.channels}x{args.size}x{args.size} images, batch_syn {args.batch}, "
            f"{args.target_dim}-d targets, {args.threads} threads, {args.device}; "
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}; "
            f"plain SGD step {plain * 1000:.1f} ms")
    lines = [head, "", "| mode | syn_steps | s / iteration | peak RSS (MiB) | overhead factor |",
             "|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['peak_rss_mib']:.0f}"
        if r["cuda_peak_mib"] is not None:
            mem += f" (CUDA {r['cuda_peak_mib']:.0f})"
        lines.append(f"| {r['mode']} | {r['syn_steps']} | {r['seconds']:.2f} | {mem} | {r['overhead']:.2f} |")
    by = {(r["mode"], r["syn_steps"]): r for r in rows}
    ratios = [(n, by[("adjoint", n)]["seconds"] / by[("unrolled", n)]["seconds"],
               1 + 1 / by[("unrolled", n)]["overhead"]) for n in args.steps
              if ("adjoint", n) in by and ("unrolled", n) in by]
    if ratios:
        # adjoint = the unrolled mode's work (forward with graph + one double backward per step)
        # plus one plain forward sweep that finds theta_1..theta_N: its floor is 1 + 1/overhead.
        lines += ["", "| syn_steps | adjoint ÷ unrolled | floor (1 + 1 / unrolled overhead) |",
                  "|---|---|---|"]
        lines += [f"| {n} | {ratio:.2f} | {floor:.2f} |" for n, ratio, floor in ratios]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
