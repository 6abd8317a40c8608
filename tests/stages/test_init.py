"""Stage 4: the high-loss (class-balanced) init subset."""

from __future__ import annotations

import torch

from distilled_ssl.io import load_tensors
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.init import top_k


def test_init_is_class_balanced_high_loss(finished_run: RunContext) -> None:
    tensors, meta = load_tensors(finished_run.path("init.safetensors"))
    idx, scores = tensors["indices"], tensors["scores"]
    assert len(idx) == 12 and len(set(idx.tolist())) == 12
    assert meta["class_counts"] == [3, 3, 3, 3]
    labels = finished_run.train_set.labels
    for c in range(4):  # within each class the picks are that class's highest-loss examples
        members = (labels == c).nonzero().squeeze(1)
        best = set(members[scores[members].topk(3).indices].tolist())
        assert best == set(idx[labels[idx] == c].tolist())


def test_top_k_plain_and_balanced() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert top_k(scores, 2).tolist() == [0, 1]
    assert top_k(scores, 2, labels).tolist() == [0, 5]
    small = torch.tensor([0, 0, 0, 0, 0, 1])  # class 1 has one member: fill from the rest
    assert len(top_k(scores, 4, small)) == 4
