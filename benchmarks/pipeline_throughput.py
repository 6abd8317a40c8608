"""Images/s of expert training (stage 3) and target extraction (stage 2) against a bare PyTorch loop.

The bare loop is the least a pipeline could do for the same work: pre-normalised tensors in
memory, ``for x, y in batches: loss.backward(); opt.step()`` (or a no-grad forward for targets),
on the same model, batch size and thread count.

    python benchmarks/pipeline_throughput.py [--images 20000] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from distilled_ssl.config import load_preset
from distilled_ssl.data.sources import normalize
from distilled_ssl.models.losses import kd_loss
from distilled_ssl.models.probe import extract
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.experts import student_for, train_expert
from distilled_ssl.stages.teacher import load_teacher, resolve_weights


def bare_training(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    order = torch.randperm(len(x))
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        idx = order[i:i + batch]
        loss = kd_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return len(x) / (time.perf_counter() - t0)


@torch.no_grad()
def bare_inference(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        model(x[i:i + batch])
    return len(x) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000, help="Fashion-MNIST images to use")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", help="also write the table (Markdown) to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_preset("cpu-fmnist-2pct").override([f"source.subset={args.images}",
                                                   "experts.num_experts=1"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(cfg, Path(tmp), progress=False)
        data = ctx.train_set
        teacher, meta = load_teacher(resolve_weights(cfg.teacher.weights or ""))
        # stage 2: the library's extraction (channels-last, inference mode) vs a bare loop
        cl = teacher.to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        with torch.inference_mode():
            reps = extract(cl.features, data.images, tuple(meta["mean"]), tuple(meta["std"]),
                           batch_size=cfg.targets.batch_size, channels_last=True)
        ours = len(data) / (time.perf_counter() - t0)
        x = normalize(data.images, tuple(meta["mean"]), tuple(meta["std"]))
        bare = bare_inference(teacher.to(memory_format=torch.contiguous_format).features, x,
                              cfg.targets.batch_size)
        rows.append(("targets (teacher inference)", ours, bare))
        # stage 3: one expert epoch through the library vs a bare loop
        ec = cfg.experts
        cfg.experts.epochs = 1
        cfg.distill.max_start_epoch, cfg.distill.expert_epochs, cfg.init.loss_epoch = 0.5, 0.5, 1.0
        x = normalize(data.images, data.mean, data.std)
        bare = bare_training(student_for(ctx, reps.shape[1]), x, reps, ec.batch_size)  # also warms up
        t0 = time.perf_counter()
        train_expert(ctx, 0, reps, "benchmark", resume=False)
        ours = len(data) / (time.perf_counter() - t0)
        rows.append(("expert training (1 epoch)", ours, bare))
    lines = [f"{args.images} Fashion-MNIST images, {args.threads} threads, torch {torch.__version__}", "",
             "| work | distilled_ssl (images/s) | bare PyTorch loop (images/s) | ratio |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {ours:.0f} | {bare:.0f} | {ours / bare:.2f} |" for name, ours, bare in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
