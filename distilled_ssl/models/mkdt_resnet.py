"""The MKDT authors' teacher: a torchvision ResNet-18 for 32x32 images, and their checkpoint layout.

Their Barlow Twins model (``BTModel`` of the MKDT / Mix-BT code) keeps torchvision's resnet18
modules in one ``nn.Sequential`` named ``f``, with a 3x3 stride-1 first conv, without the max-pool
(kept for Tiny-ImageNet / STL-10) and without ``fc``; its projector is ``g``. So their keys read
``f.0.weight`` (conv1), ``f.1.*`` (bn1), ``f.3.*`` … ``f.6.*`` (layer1 … layer4). This encoder has
torchvision's own names and loads either layout (:meth:`MkdtResNet18.remap_state_dict`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .encoders import Encoder

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "MkdtResNet18"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_SEQUENTIAL = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class MkdtResNet18(Encoder):
    """torchvision's resnet18 with a 3x3 stride-1 stem (``stem_padding``, default 1 as in the
    authors' code), no max-pool unless ``maxpool``, no ``fc``: the 512-d pooled feature."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, output_dim: int | None = None,
                 stem_padding: int = 1, maxpool: bool = False, **kwargs: Any) -> None:
        super().__init__()
        import torchvision.models as tvm

        if kwargs:
            raise ConfigError(f"mkdt_resnet18 has no options {sorted(kwargs)}")
        net = tvm.resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=stem_padding, bias=False)
        if not maxpool:
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.maxpool = maxpool
        self.feature_dim = 512
        self.set_output_dim(output_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def remap_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' ``f.N.*`` keys (``module.``-prefixed or not; projector ``g.*`` dropped) →
        this model's ``net.*``; torchvision's own names (``conv1.weight`` …) are accepted too."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if any(k.startswith("f.") for k in state):
            order = [m for m in _SEQUENTIAL if m != "maxpool" or self.maxpool]
            out = {}
            for key, value in state.items():
                m = re.fullmatch(r"f\.(\d+)\.(.+)", key)
                if m and int(m.group(1)) < len(order):
                    out[f"net.{order[int(m.group(1))]}.{m.group(2)}"] = value
            return out
        return {(k if k.startswith("net.") else f"net.{k}"): v for k, v in state.items()
                if not k.startswith(("fc.", "g."))}
