"""Measure what an encoder pre-trained on a set (:func:`distilled_ssl.models.pretrain.pretrain_kd`)
learned. Measures: ``teacher_fidelity``
(R² and mean cosine of the encoder's output against the teacher's reps on unseen images) and, per
downstream set and label fraction (``downstream_metrics``), a linear probe, kNN and optionally
fine-tuning, each on the same stratified, seeded label subset.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.downstream import Downstream, stratified_fraction
from ..data.sources import ImageSet, normalize
from ..errors import DivergenceError
from ..models.bn_stats import reestimate_bn_stats
from ..models.encoders import Encoder, seeded
from ..models.probe import extract, linear_probe


def recompute_bn_stats(model: Encoder, images: torch.Tensor, mean: tuple[float, ...],
                       std: tuple[float, ...], batch_size: int = 512) -> None:
    """Re-estimate batch-norm running statistics on real images (for a random-init encoder)."""
    dev = next(model.parameters()).device
    reestimate_bn_stats(model, (normalize(images[i:i + batch_size].to(dev), mean, std)
                                for i in range(0, len(images), batch_size)))


def teacher_fidelity(model: Encoder, images: torch.Tensor, teacher_reps: torch.Tensor,
                     mean: tuple[float, ...], std: tuple[float, ...], *, device: str = "cpu"
                     ) -> dict[str, float]:
    """R² (1 - SSE/SST over all dims) and mean cosine of ``model(x)`` vs the teacher's reps."""
    out = extract(model.eval(), images, mean, std, device=device)
    sse = (out - teacher_reps).pow(2).sum()
    sst = (teacher_reps - teacher_reps.mean(0)).pow(2).sum()
    cos = F.cosine_similarity(out, teacher_reps, dim=1).mean()
    return {"r2": float(1 - sse / sst), "cosine": float(cos)}


def probe_accuracy(model: Encoder, train: ImageSet, test: ImageSet, fraction: float, seed: int, *,
                   device: str = "cpu") -> float:
    """Linear-probe test accuracy of the encoder's features with ``fraction`` of train labels."""
    assert train.labels is not None and test.labels is not None
    idx = stratified_fraction(train.labels, fraction, seed)
    ftr = extract(model.eval().features, train.images[idx], train.mean, train.std, device=device)
    fte = extract(model.features, test.images, train.mean, train.std, device=device)
    return linear_probe(ftr, train.labels[idx], fte, test.labels)


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, *, k: int = 20, temperature: float = 0.07) -> float:
    """Weighted kNN on cosine similarity (votes exp(sim / T), as in SSL papers); test accuracy."""
    tr = F.normalize(train_x.float(), dim=1)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(tr))
    correct = 0
    for i in range(0, len(test_x), 2048):
        sim = F.normalize(test_x[i:i + 2048].float(), dim=1) @ tr.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == test_y[i:i + 2048]).sum())
    return correct / len(test_x)


def finetune_accuracy(model: Encoder, train_x: torch.Tensor, train_y: torch.Tensor,
                      test: ImageSet, *, epochs: int, seed: int, lr: float = 0.01,
                      batch_size: int = 128, device: str = "cpu") -> float:
    """Fine-tune a copy of the whole encoder plus a linear head on the labelled images."""
    net = copy.deepcopy(model).to(device).train()
    with seeded(seed):
        head = torch.nn.Linear(net.feature_dim, int(train_y.max()) + 1).to(device)
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    x_all = normalize(train_x.to(device), test.mean, test.std)
    y_all = train_y.to(device)
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=g).to(device)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(head(net.features(x_all[idx])), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if not all(torch.isfinite(p).all() for p in params):
        raise DivergenceError("fine-tuning diverged")
    net.eval()
    logits = extract(lambda x: head(net.features(x)), test.images, test.mean, test.std, device=device)
    assert test.labels is not None
    return float((logits.argmax(1) == test.labels).double().mean())


def fraction_label(fraction: float) -> str:
    """0.01 → '1%'."""
    return f"{100 * fraction:g}%"


def downstream_metrics(features: Callable[[torch.Tensor], torch.Tensor], mean: tuple[float, ...],
                       std: tuple[float, ...], ds: Downstream, fractions: Sequence[float], seed: int,
                       *, knn_k: int = 20, finetune: tuple[Encoder, int] | None = None,
                       device: str = "cpu") -> dict[str, float]:
    """Probe / kNN / fine-tune accuracy on ``ds`` for each label fraction (keys ``name/probe@1%``).

    ``features`` maps normalised images (``mean``/``std``: the encoder's own normalisation) to
    feature vectors; the label subset of each fraction is stratified and seeded by ``seed``."""
    assert ds.train.labels is not None and ds.test.labels is not None
    out: dict[str, float] = {}
    test_f = extract(features, ds.test.images, mean, std, device=device)
    for frac in fractions:
        idx = stratified_fraction(ds.train.labels, frac, seed)
        train_f = extract(features, ds.train.images[idx], mean, std, device=device)
        y = ds.train.labels[idx]
        tag = fraction_label(frac)
        out[f"{ds.name}/probe@{tag}"] = linear_probe(train_f, y, test_f, ds.test.labels)
        if knn_k > 0:
            out[f"{ds.name}/knn@{tag}"] = knn_accuracy(train_f, y, test_f, ds.test.labels, k=knn_k)
        if finetune is not None and finetune[1] > 0:
            out[f"{ds.name}/finetune@{tag}"] = finetune_accuracy(
                finetune[0], ds.train.images[idx], y, ds.test, epochs=finetune[1], seed=seed,
                device=device)
    return out
