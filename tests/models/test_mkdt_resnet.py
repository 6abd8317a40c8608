"""The MKDT authors' Barlow Twins ResNet-18: their checkpoint layout loads and reproduces their forward."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from distilled_ssl.models.adapters import TeacherInput
from distilled_ssl.models.mkdt_resnet import CIFAR10_MEAN, CIFAR10_STD
from distilled_ssl.models.teachers import open_teacher


class _AuthorsModel(nn.Module):
    """Their layout, written here from its description: torchvision resnet18's children in one
    Sequential ``f`` (3x3 stride-1 conv1, no max-pool, no fc), a projector ``g``."""

    def __init__(self) -> None:
        super().__init__()
        layers = []
        for name, module in torchvision.models.resnet18().named_children():
            if name == "conv1":
                module = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            if not isinstance(module, (nn.Linear, nn.MaxPool2d)):
                layers.append(module)
        self.f = nn.Sequential(*layers)
        self.g = nn.Sequential(nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
                               nn.Linear(512, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.f(x), start_dim=1)


def test_their_random_teacher_loads_and_gives_their_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    theirs = _AuthorsModel()
    for m in theirs.modules():  # non-trivial BN statistics, so a wrong mapping would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    theirs.eval()
    path = tmp_path / "mixbt_resnet18.pth"
    torch.save({f"module.{k}": v for k, v in theirs.state_dict().items()}, path)  # saved under DDP
    cifar = TeacherInput(3, 32, CIFAR10_MEAN, CIFAR10_STD)
    opened = open_teacher(str(path), source=cifar, arch="mkdt_resnet18", kwargs={})
    assert opened.input == cifar and opened.encoder.feature_dim == 512
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(opened.encoder.features(x), theirs(x))
    assert opened.provenance["weights_sha256"] and not opened.legacy
