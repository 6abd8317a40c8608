"""The evaluation protocol's blocks: fidelity, linear probe, kNN, stratified label subsets."""

from __future__ import annotations

import pytest
import torch

from distilled_ssl.data.downstream import stratified_fraction
from distilled_ssl.evaluation.protocol import knn_accuracy, linear_probe, teacher_fidelity
from distilled_ssl.models.encoders import build_model


def test_fidelity_is_one_for_the_teacher_itself_and_zero_for_the_mean() -> None:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, image_size=8, output_dim=5, depth=1, width=4).eval()
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    from distilled_ssl.models.probe import extract

    reps = extract(model, images, (0.5,), (0.25,))
    assert teacher_fidelity(model, images, reps, (0.5,), (0.25,))["r2"] == pytest.approx(1.0, abs=1e-6)
    noisy = reps + reps.std() * torch.randn_like(reps)
    assert teacher_fidelity(model, images, noisy, (0.5,), (0.25,))["r2"] < 0.7

    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return reps.mean(0, keepdim=True).expand(len(x), -1)

    assert teacher_fidelity(Mean(), images, reps, (0.5,), (0.25,))["r2"] == pytest.approx(0.0, abs=1e-5)


def test_probe_and_knn_separate_blobs_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(3, 16, generator=g)
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    assert linear_probe(x[:150] * 1e4, y[:150], x[150:] * 1e4, y[150:]) > 0.95  # scale-free
    assert knn_accuracy(x[:150], y[:150], x[150:], y[150:], k=5) > 0.95
    shuffled = y[torch.randperm(300, generator=g)]
    assert linear_probe(x[:150], shuffled[:150], x[150:], shuffled[150:]) < 0.6


def test_stratified_fraction_is_per_class_and_seeded() -> None:
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 10)
    idx = stratified_fraction(labels, 0.1, seed=1)
    assert torch.bincount(labels[idx]).tolist() == [10, 5, 1]
    assert torch.equal(idx, stratified_fraction(labels, 0.1, seed=1))
    assert not torch.equal(idx, stratified_fraction(labels, 0.1, seed=2))
