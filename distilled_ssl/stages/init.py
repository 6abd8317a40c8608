"""Stage 4 — which real images start the synthetic set: high-loss (MKDT's default), random, or
k-means (representative).

High-loss: every training example's KD loss under the experts' checkpoint at ``init.loss_epoch``
(epoch 1 by default), averaged over experts; the top-k examples win. ``class_balanced`` takes the
top k/C of each class instead (plain high-loss can pick one class almost only).

K-means: k clusters of the teacher's representations (label-free, seeded), and for each the
training image nearest to its centre: a subset that covers what the teacher knows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.sources import normalize
from ..errors import ArtifactError, ConfigError
from ..io import check_fingerprint, load_tensors, save_tensors
from ..layout import INIT_FILE
from ..models.encoders import FlatParams
from .context import RunContext, combine, student_for
from .experts import experts_fingerprint, list_experts
from .targets import load_targets


def init_size(ctx: RunContext) -> int:
    ic = ctx.cfg.init
    n = len(ctx.train_set)
    k = ic.num_images if ic.num_images is not None else max(1, round(ic.fraction * n))
    if k > n:
        raise ConfigError(f"init asks for {k} images but the source has {n}")
    return k


def init_fingerprint(ctx: RunContext) -> str:
    return combine(experts_fingerprint(ctx), "init", ctx.cfg.section_hash("init"), str(ctx.cfg.seed))


def run_init(ctx: RunContext, *, force: bool = False) -> Path:
    """Stage 4: write ``init.safetensors`` (chosen ``indices`` and, for high-loss, every ``score``)."""
    out = ctx.path(INIT_FILE)
    fp = init_fingerprint(ctx)
    if not force and check_fingerprint(out, fp, "init"):
        ctx.log.info("init: %s exists, skipping", out)
        return out
    ic = ctx.cfg.init
    k = init_size(ctx)
    labels = ctx.train_set.labels
    if ic.class_balanced and labels is None:
        raise ConfigError("init.class_balanced needs a labelled source; set init.class_balanced=false")
    tensors: dict[str, torch.Tensor] = {}
    if ic.method == "kmeans":
        if ic.class_balanced:
            raise ValueError("init.method=kmeans picks by the teacher's representations, not by "
                             "class; set init.class_balanced=false")
        index = kmeans_nearest(load_targets(ctx), k, ctx.generator("init", "kmeans"))
    else:
        if ic.method == "random":
            scores = torch.rand(len(ctx.train_set), generator=ctx.generator("init", "random"))
        else:
            scores = high_loss_scores(ctx)
            tensors["scores"] = scores
        index = top_k(scores, k, labels if ic.class_balanced else None)
    tensors["indices"] = index
    counts = torch.bincount(labels[index]).tolist() if labels is not None else None
    ctx.log.info("init: %s%s, %d images; per class: %s", ic.method,
                 " (class-balanced)" if ic.class_balanced else "", k, counts)
    save_tensors(out, tensors, {"kind": "init", "fingerprint": fp, "method": ic.method,
                                "class_balanced": ic.class_balanced, "class_counts": counts})
    return out


@torch.no_grad()
def high_loss_scores(ctx: RunContext, batch_size: int = 1024) -> torch.Tensor:
    """Per-example KD loss under each expert's ``loss_epoch`` checkpoint, averaged over experts."""
    experts = list_experts(ctx)
    reps = load_targets(ctx)
    data = ctx.train_set
    dev = ctx.device
    model = student_for(ctx, reps.shape[1]).to(dev).eval()
    flat = FlatParams(model)
    total = torch.zeros(len(data))
    for ef in ctx.bar(experts, desc="init: scoring"):
        row = ef.schedule.index_near(ctx.cfg.init.loss_epoch)
        flat.load(ef.params(row)[0], ef.buffers(row))  # copy_ moves them to the model's device
        for i in range(0, len(data), batch_size):
            x = normalize(data.images[i:i + batch_size].to(dev), data.mean, data.std)
            out = model(x)
            total[i:i + batch_size] += (out - reps[i:i + batch_size].to(dev)).pow(2).mean(1).cpu()
    return total / len(experts)


@torch.no_grad()
def kmeans_nearest(reps: torch.Tensor, k: int, generator: torch.Generator, *, iterations: int = 20,
                   chunk: int = 4096) -> torch.Tensor:
    """Seeded k-means (Lloyd) on the rows of ``reps``; the index of the row nearest to each of the
    k centres (distinct, sorted). Distances are Euclidean: the KD loss is an MSE."""
    x = reps.float()
    n = len(x)
    centres = x[torch.randperm(n, generator=generator)[:k]].clone()
    sq = x.pow(2).sum(1)

    def nearest_centre() -> torch.Tensor:
        c_sq = centres.pow(2).sum(1)
        return torch.cat([(c_sq - 2 * xb @ centres.T).argmin(1) for xb in x.split(chunk)])

    for _ in range(iterations):
        assign = nearest_centre()
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0  # an empty cluster keeps its centre
        centres[filled] = sums[filled] / counts[filled].unsqueeze(1)
    best_d = torch.full((k,), float("inf"))
    best_i = torch.zeros(k, dtype=torch.long)
    c_sq = centres.pow(2).sum(1)
    for start in range(0, n, chunk):
        d = sq[start:start + chunk, None] - 2 * x[start:start + chunk] @ centres.T + c_sq
        dmin, imin = d.min(0)
        better = dmin < best_d
        best_d[better], best_i[better] = dmin[better], imin[better] + start
    index = best_i.unique()
    if len(index) < k:  # two centres share a nearest row: fill with random others
        rest = torch.ones(n, dtype=torch.bool)
        rest[index] = False
        fill = rest.nonzero().squeeze(1)
        index = torch.cat([index, fill[torch.randperm(len(fill), generator=generator)[:k - len(index)]]])
    return index.sort().values


def top_k(scores: torch.Tensor, k: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k highest scores (sorted ascending by index); per class when labels given."""
    if labels is None:
        return scores.topk(k).indices.sort().values
    classes = labels.unique()
    base, extra = divmod(k, len(classes))
    picked = []
    for i, c in enumerate(classes.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        want = min(len(members), base + (1 if i < extra else 0))
        picked.append(members[scores[members].topk(want).indices])
    index = torch.cat(picked)
    if len(index) < k:  # a class too small: fill from the rest by score
        rest = torch.ones(len(scores), dtype=torch.bool)
        rest[index] = False
        fill = rest.nonzero().squeeze(1)
        index = torch.cat([index, fill[scores[fill].topk(k - len(index)).indices]])
    return index.sort().values


def load_init(ctx: RunContext) -> torch.Tensor:
    """The chosen source indices."""
    tensors, _ = load_tensors(ctx.path(INIT_FILE), ["indices"])
    index = tensors["indices"]
    if index.ndim != 1 or len(index) == 0 or int(index.max()) >= len(ctx.train_set):
        raise ArtifactError(f"{ctx.path(INIT_FILE)} does not fit the source set; re-run with --force")
    return index
