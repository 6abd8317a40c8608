"""Stage 4 — which real images start the synthetic set: high-loss (MKDT's default) or random.

High-loss: every training example's KD loss under the experts' checkpoint at ``init.loss_epoch``
(epoch 1 by default), averaged over experts; the top-k examples win. ``class_balanced`` takes the
top k/C of each class instead (plain high-loss can pick one class almost only).
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
