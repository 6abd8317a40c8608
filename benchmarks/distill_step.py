"""Seconds per distillation iteration and peak memory, side by side against a reference-equivalent row.

The **reference** row is the plain algorithm the MKDT reference code runs: every inner step unrolled
with ``create_graph``, one backward at the end, PyTorch's own ``nn.GroupNorm`` (composite double
backward) and ``nn.AvgPool2d``, fp32, contiguous tensors, the process's default allocator ("reference,
malloc" gives it the allocator setting a CPU run of this library uses). Every other row is this
library's matcher with some of its options; "speed-up" is the reference's time at the same
``syn_steps`` divided by the row's, measured in the same run on the same shapes (same model, same
parameter count, same minibatches).

On CPU each (variant, syn_steps) cell runs in its own process, so that its peak RSS is its own. bf16 and
compiled cells also report the cosine of their image / target-rep gradients against the fp32 eager
adjoint gradients of the same trajectory. "malloc" rows keep freed memory for reuse
(:func:`distilled_ssl.allocator.reuse_freed_memory`, what ``prepare_run`` does for a CPU run).

    python benchmarks/distill_step.py                  # the paper's shapes: 3x32x32, 1,000 images, 512-d
    python benchmarks/distill_step.py --size 28 --channels 1 --target-dim 128 --images 1100  # the CPU demo
    python benchmarks/distill_step.py --device cuda --width 128 --batch 256 --steps 20 40 80

On CUDA the cells run in one process (``--in-process``, the default there): peak memory is the CUDA
allocator's peak of each cell (reset between cells), and the process start-up and CUDA context are
paid once. The header prints the TF32 settings the cells ran with (PyTorch's defaults unless changed:
cuDNN convolutions may use TF32, matrix products not), the same for every row, the reference included;
``--cudnn-benchmark`` lets cuDNN time its convolution algorithms (the shapes are static), for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

# name -> (mode, precision, keep_graphs ("all" = syn_steps), the reference's layers (PyTorch's
#          GroupNorm and AvgPool2d), freed memory kept for reuse (glibc; what a CPU run does),
#          image gradients, compiled steps, inner momentum, CUDA graphs). Rows without image
#          gradients do less work than the reference (they are what targets-only distillation,
#          ``distill.lr_img: 0``, runs), and say so. Compiled rows (``distill.compile: true``) pay the
#          compile in their warm-up call, reported apart; "graphs" rows replay them as CUDA graphs
#          (``distill.cuda_graphs``, CUDA only). Heavy-ball rows (``distill.inner_momentum``) run
#          another inner loop than the reference's plain SGD: compare them with their plain twins.
VARIANTS: dict[str, tuple[str, str, str, bool, bool, bool, bool, float, bool]] = {
    "reference": ("unrolled", "fp32", "0", True, False, True, False, 0.0, False),
    "reference, malloc": ("unrolled", "fp32", "0", True, True, True, False, 0.0, False),
    "unrolled": ("unrolled", "fp32", "0", False, False, True, False, 0.0, False),
    "adjoint": ("adjoint", "fp32", "0", False, False, True, False, 0.0, False),
    "adjoint keep all": ("adjoint", "fp32", "all", False, False, True, False, 0.0, False),
    "adjoint keep half": ("adjoint", "fp32", "half", False, False, True, False, 0.0, False),
    "adjoint bf16": ("adjoint", "bf16", "0", False, False, True, False, 0.0, False),
    "adjoint bf16 keep all": ("adjoint", "bf16", "all", False, False, True, False, 0.0, False),
    "adjoint, malloc": ("adjoint", "fp32", "0", False, True, True, False, 0.0, False),
    "adjoint keep all, malloc": ("adjoint", "fp32", "all", False, True, True, False, 0.0, False),
    "adjoint bf16 keep all, malloc": ("adjoint", "bf16", "all", False, True, True, False, 0.0, False),
    "adjoint, targets only": ("adjoint", "fp32", "0", False, False, False, False, 0.0, False),
    "adjoint keep all, targets only": ("adjoint", "fp32", "all", False, False, False, False, 0.0, False),
    "adjoint compiled": ("adjoint", "fp32", "0", False, False, True, True, 0.0, False),
    "adjoint bf16 compiled": ("adjoint", "bf16", "0", False, False, True, True, 0.0, False),
    "adjoint compiled, malloc": ("adjoint", "fp32", "0", False, True, True, True, 0.0, False),
    "adjoint bf16 compiled, malloc": ("adjoint", "bf16", "0", False, True, True, True, 0.0, False),
    "adjoint compiled, targets only": ("adjoint", "fp32", "0", False, False, False, True, 0.0, False),
    "adjoint bf16 compiled, targets only": ("adjoint", "bf16", "0", False, False, False, True, 0.0, False),
    "adjoint heavy-ball": ("adjoint", "fp32", "0", False, False, True, False, 0.9, False),
    "adjoint bf16 compiled, targets only, heavy-ball":
        ("adjoint", "bf16", "0", False, False, False, True, 0.9, False),
    "adjoint compiled, graphs": ("adjoint", "fp32", "0", False, False, True, True, 0.0, True),
    "adjoint bf16 compiled, graphs": ("adjoint", "bf16", "0", False, False, True, True, 0.0, True),
    "adjoint compiled, targets only, graphs":
        ("adjoint", "fp32", "0", False, False, False, True, 0.0, True),
}
DEFAULT = ["reference", "unrolled", "adjoint", "adjoint keep all", "adjoint bf16", "adjoint compiled",
           "adjoint bf16 compiled"]
# on CPU the library's rows as a run has them (freed memory kept), the reference both ways
DEFAULT_CPU = ["reference", "reference, malloc", "adjoint, malloc", "adjoint keep all, malloc",
               "adjoint compiled, malloc", "adjoint bf16 compiled, malloc"]


def _setup(args: argparse.Namespace, native_layers: bool):
    from torch import nn

    from distilled_ssl.models.encoders import FlatParams, build_model
    from distilled_ssl.models.instance_norm import InstanceNorm2d
    from distilled_ssl.models.pooling import AvgPool2x2

    torch.manual_seed(0)
    model = build_model("convnet", in_channels=args.channels, image_size=args.size,
                        output_dim=args.target_dim, depth=args.depth, width=args.width,
                        norm=args.norm).to(args.device)
    if native_layers:  # the reference's layers: PyTorch's GroupNorm (same parameters) and AvgPool2d
        for mod in list(model.modules()):
            for name, child in list(mod.named_children()):
                if isinstance(child, InstanceNorm2d):
                    ref = nn.GroupNorm(child.num_groups, child.num_channels).to(args.device)
                    ref.load_state_dict(child.state_dict())
                    setattr(mod, name, ref)
                elif isinstance(child, AvgPool2x2):
                    setattr(mod, name, nn.AvgPool2d(2))
    flat = FlatParams(model)
    theta0 = flat.flatten().to(args.device)
    target = theta0 + 0.01 * torch.randn_like(theta0)
    images = torch.randn(args.images, args.channels, args.size, args.size, device=args.device)
    reps = torch.randn(args.images, args.target_dim, device=args.device)
    return model, flat, theta0, target, images, reps


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _keep(spec: str, steps: int) -> int:
    return {"all": steps, "half": steps // 2}[spec] if spec in ("all", "half") else int(spec)


def cell(args: argparse.Namespace) -> dict:
    """One (variant, syn_steps) measurement, in this process."""
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    from distilled_ssl.registry import MATCHERS
    from distilled_ssl.stages.distill.compiled import CompiledSteps
    from distilled_ssl.stages.distill.matching import minibatches

    mode, precision, keep, native, reuse, image_grads, compiled, momentum, graphs = VARIANTS[args.variant]
    if reuse:  # glibc keeps freed blocks for reuse (no page faults per step), as a CPU run does
        from distilled_ssl.allocator import reuse_freed_memory

        reuse_freed_memory()
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    _model, flat, theta0, target, images, reps = _setup(args, native)
    lr = torch.tensor(0.1, device=args.device)
    fn = MATCHERS[mode]
    kw = {"precision": precision, "keep_graphs": _keep(keep, args.syn_steps), "image_grads": image_grads}
    if momentum:
        kw["momentum"] = momentum
    if compiled:
        kw["steps"] = CompiledSteps(flat, precision=precision, image_grads=image_grads, cuda_graphs=graphs)
    times, first, warmup = [], None, 0.0
    for rep in range(args.repeats + 1):
        batches = [b.to(args.device) for b in
                   minibatches(args.images, args.batch, args.syn_steps, torch.Generator().manual_seed(rep))]
        _sync(args.device)
        t0 = time.perf_counter()
        res = fn(flat, theta0, target, images, reps, lr, batches, **kw)
        float(res.loss)
        _sync(args.device)
        if rep:  # the first is warm-up
            times.append(time.perf_counter() - t0)
        else:
            first, warmup = (res, batches), time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    out = {"seconds": statistics.median(times), "peak_rss_mib": peak, "cuda_peak_mib": cuda_peak,
           "parameters": flat.size, "warmup_seconds": warmup}
    if precision != "fp32" or compiled:
        res, batches = first
        exact = MATCHERS["adjoint"](flat, theta0, target, images, reps, lr, batches, momentum=momentum)
        out["cosine"] = {n: float(torch.nn.functional.cosine_similarity(
            getattr(res, n).flatten().double(), getattr(exact, n).flatten().double(), dim=0))
            for n in ("grad_images", "grad_targets") if image_grads or n == "grad_targets"}
    return out


def _measure(args: argparse.Namespace, variant: str, steps: int, in_process: bool, base: list[str]) -> dict:
    """One cell: in this process (a failing cell, e.g. a kernel the device refuses, is reported in
    the table instead of stopping the others), or in a process of its own."""
    if in_process:
        args.variant, args.syn_steps = variant, steps
        try:
            return cell(args)
        except Exception as exc:
            return {"failed": (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]}
    cmd = [sys.executable, __file__, *base, "--cell", variant, str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _combine(runs: list[dict]) -> dict:
    """A cell's rounds as one row: the median time (and the rounds' range), the highest peak, the
    first round's compile time and gradient cosines."""
    failed = [r for r in runs if "failed" in r]
    if failed:
        return failed[0]
    secs = [r["seconds"] for r in runs]
    peaks = [r["cuda_peak_mib"] for r in runs if r["cuda_peak_mib"] is not None]
    return runs[0] | {"seconds": statistics.median(secs), "range": (min(secs), max(secs)),
                      "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                      "cuda_peak_mib": max(peaks) if peaks else None}


def _memory(r: dict, in_process: bool) -> str:
    """The row's peak memory: the CUDA allocator's in one process; else the RSS (and CUDA's)."""
    if in_process:
        return f"{r['cuda_peak_mib']:.0f}" if r["cuda_peak_mib"] is not None else "-"
    mem = f"{r['peak_rss_mib']:.0f}"
    return mem + (f" (CUDA {r['cuda_peak_mib']:.0f})" if r["cuda_peak_mib"] is not None else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                   help=f"rows, from: {', '.join(VARIANTS)} (default: {', '.join(DEFAULT_CPU)} on CPU, "
                        f"{', '.join(DEFAULT)} on CUDA)")
    p.add_argument("--images", type=int, default=1000, help="synthetic set size (2%% of CIFAR-10)")
    p.add_argument("--batch", type=int, default=128, help="batch_syn")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--norm", default="instance")
    p.add_argument("--target-dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per cell (median)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every cell this many times in rotation and report the median (a "
                        "shared machine's speed drifts between cells; rounds spread it over all rows)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the table (Markdown) to this file")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms for these static shapes "
                        "(torch.backends.cudnn.benchmark; every row, the reference included)")
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run every cell in this process (default: on CUDA only; CPU cells need their own "
                        "process for their own peak RSS)")
    p.add_argument("--cell", nargs=2, metavar=("VARIANT", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        args.variant, args.syn_steps = args.cell[0], int(args.cell[1])
        print(json.dumps(cell(args)))
        return
    base = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("images", "batch", "size", "channels", "depth", "width", "norm", "target_dim",
                     "repeats", "threads", "device")]
    base += ["--cudnn-benchmark"] if args.cudnn_benchmark else []
    in_process = args.device.startswith("cuda") if args.in_process is None else args.in_process
    if args.variants is None:
        args.variants = DEFAULT if in_process else DEFAULT_CPU
    if in_process and any(VARIANTS[v][4] for v in args.variants):
        p.error("the malloc rows need their own process (--no-in-process)")
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):  # every cell once per round: the machine's drift hits all rows alike
        for steps in args.steps:
            for variant in args.variants:
                r = _measure(args, variant, steps, in_process, base)
                runs.setdefault((variant, steps), []).append(r)
                said = (f"failed: {r['failed']}" if "failed" in r else
                        f"{r['seconds']:.3f} s/it, " + _memory(r, in_process) + " MiB")
                print(f"  {variant:30s} syn_steps={steps:3d}: {said}", file=sys.stderr, flush=True)
    rows = [_combine(runs[(variant, steps)]) | {"variant": variant, "syn_steps": steps}
            for steps in args.steps for variant in args.variants]
    ref = {r["syn_steps"]: r["seconds"] for r in rows if r["variant"] == "reference" and "failed" not in r}
    params = next((r["parameters"] for r in rows if "parameters" in r), 0)
    head = (f"ConvNet depth {args.depth} width {args.width} ({args.norm} norm), {params:,} "
            f"parameters; {args.images} synthetic {args.channels}x{args.size}x{args.size} images, batch_syn "
            f"{args.batch}, {args.target_dim}-d targets; {args.threads} threads, {args.device}; torch "
            f"{torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
            + (f", {torch.cuda.get_device_name()}; TF32: cuDNN {torch.backends.cudnn.allow_tf32}, "
               f"matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN benchmark {args.cudnn_benchmark}"
               if args.device.startswith("cuda") else "")
            + ("; cells in one process (peak = CUDA allocator)" if in_process else ""))
    peak = "peak CUDA" if in_process else "peak RSS"
    lines = [head, "", "| variant | mode | precision | keep_graphs | syn_steps | s / iteration | speed-up vs "
             f"reference | {peak} (MiB) | grad cosine vs fp32 eager (images / targets) | first call (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode, precision, keep, *_ = VARIANTS[r["variant"]]
        if "failed" in r:
            lines.append(f"| {r['variant']} | {mode} | {precision} | - | {r['syn_steps']} | failed: "
                         f"{r['failed'].replace('|', '/')} | - | - | - | - |")
            continue
        mem = _memory(r, in_process)
        speed = f"{ref[r['syn_steps']] / r['seconds']:.2f}x" if r["syn_steps"] in ref else "-"
        cos = (" / ".join(f"{r['cosine'][n]:.4f}" if n in r["cosine"] else "-"
                          for n in ("grad_images", "grad_targets")) if "cosine" in r else "-")
        kept = "all" if mode == "unrolled" else _keep(keep, r["syn_steps"])
        spread = f" ({r['range'][0]:.2f}-{r['range'][1]:.2f})" if args.rounds > 1 else ""
        lines.append(f"| {r['variant']} | {mode} | {precision} | {kept} | "
                     f"{r['syn_steps']} | {r['seconds']:.3f}{spread} | {speed} | {mem} | {cos} | "
                     f"{r['warmup_seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
