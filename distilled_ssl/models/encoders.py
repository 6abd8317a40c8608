"""Encoders: the MKDT ConvNet student, small-image ResNets, and torchvision models; one registry.

Every model built by :func:`build_model` has ``features(x)`` (the representation: flattened or
pooled conv features) and ``forward(x)`` (``head(features(x))`` when ``output_dim`` is given, else
the features), plus ``feature_dim``. :class:`FlatParams` views a model's parameters as one flat
vector so that the inner loop of trajectory matching can run on ``torch.func.functional_call``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError, UnknownArchError
from ..registry import MODELS
from .instance_norm import InstanceNorm2d
from .pooling import AvgPool2x2

__all__ = ["Encoder", "FlatParams", "UnknownArchError", "build_model", "check_arch", "list_models",
           "seeded"]


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "instance":  # the MKDT/MTT "instancenorm": GroupNorm with one group per channel
        return InstanceNorm2d(channels)  # = nn.GroupNorm(channels, channels), closed-form derivatives
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm must be 'instance', 'batch' or 'none', got {kind!r}")


class Encoder(nn.Module):
    """Base class: ``forward = head(features(x))``; ``head`` is Identity without ``output_dim``."""

    feature_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.head: nn.Module = nn.Identity()

    def set_output_dim(self, output_dim: int | None) -> None:
        self.head = nn.Identity() if output_dim is None else nn.Linear(self.feature_dim, output_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConvNet(Encoder):
    """MKDT/MTT ConvNet: ``depth`` x [Conv3x3(width) → norm → ReLU → AvgPool2x2].

    ``pooling="flatten"`` (the paper) flattens the last feature map; ``"gap"`` averages it.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, output_dim: int | None = None,
                 depth: int = 3, width: int = 128, norm: str = "instance",
                 pooling: str = "flatten") -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ConfigError("convnet depth and width must be >= 1")
        if image_size >> depth < 1:
            raise ConfigError(f"convnet depth {depth} pools a {image_size}px image to nothing")
        if pooling not in ("flatten", "gap"):
            raise ConfigError(f"pooling must be 'flatten' or 'gap', got {pooling!r}")
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), _norm2d(norm, width), nn.ReLU(inplace=True),
                       AvgPool2x2()]  # = nn.AvgPool2d(2), fast derivatives
            c = width
        self.body = nn.Sequential(*layers)
        self.pooling = pooling
        side = image_size >> depth
        self.feature_dim = width * side * side if pooling == "flatten" else width
        self.set_output_dim(output_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return h.flatten(1) if self.pooling == "flatten" else h.mean(dim=(2, 3))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm2d(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          _norm2d(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(Encoder):
    """ResNet for small images: 3x3 stride-1 stem, no max-pool, four stages, global-average pool.

    ``width`` multiplies the stage widths 64-128-256-512 (``width=0.125`` → 8-16-32-64).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, output_dim: int | None = None,
                 blocks: tuple[int, ...] = (2, 2, 2, 2), width: float = 1.0,
                 norm: str = "batch") -> None:
        super().__init__()
        widths = [max(1, round(64 * width * 2**i)) for i in range(4)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  _norm2d(norm, widths[0]), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                stages.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1, norm))
                c = w
        self.stages = nn.Sequential(*stages)
        self.feature_dim = c
        self.set_output_dim(output_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class TorchvisionEncoder(Encoder):
    """A torchvision classification model with its classifier removed (its pooled features)."""

    def __init__(self, name: str, in_channels: int = 3, image_size: int = 224,
                 output_dim: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        import torchvision.models as tvm

        try:
            net = tvm.get_model(name, weights=None, **kwargs)
        except ValueError as exc:
            raise UnknownArchError(f"torchvision has no model {name!r}") from exc
        classifier_attr = next((a for a in ("fc", "classifier", "head", "heads") if hasattr(net, a)),
                               None)
        if classifier_attr is None:
            raise UnknownArchError(f"torchvision:{name}: cannot find its classifier to remove")
        with torch.no_grad():
            setattr(net, classifier_attr, nn.Identity())
            probe = torch.zeros(2, 3, max(image_size, 32), max(image_size, 32))
            net.eval()
            self.feature_dim = int(net(probe).shape[1])
            net.train()
        self.net = net
        self.in_channels = in_channels
        self.set_output_dim(output_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)


def resnet10(**kwargs: Any) -> SmallResNet:
    """ResNet-10 for small images (one basic block per stage)."""
    return SmallResNet(blocks=(1, 1, 1, 1), **kwargs)


def resnet18(**kwargs: Any) -> SmallResNet:
    """ResNet-18 for small images (two basic blocks per stage)."""
    return SmallResNet(blocks=(2, 2, 2, 2), **kwargs)


def list_models() -> list[str]:
    """Registered architecture names (plus any ``torchvision:NAME``)."""
    return MODELS.names()


def check_arch(name: str, where: str = "arch") -> None:
    """Raise :class:`UnknownArchError` unless ``name`` is buildable."""
    MODELS.check(name, where)


def build_model(name: str, *, in_channels: int, image_size: int, output_dim: int | None = None,
                **kwargs: Any) -> Encoder:
    """Build a registered encoder; ``output_dim`` adds a linear head of that size."""
    check_arch(name)
    if name.startswith("torchvision:"):
        return TorchvisionEncoder(name.split(":", 1)[1], in_channels, image_size, output_dim, **kwargs)
    try:
        return MODELS[name](in_channels=in_channels, image_size=image_size,
                            output_dim=output_dim, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for {name}: {exc}") from exc


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the previous state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FlatParams:
    """A model's trainable parameters as one flat float vector, and back.

    ``unflatten(theta)`` returns views into ``theta`` keyed by parameter name, ready for
    :func:`torch.func.functional_call`; gradients flow from the views back to ``theta``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = [(n, p) for n, p in model.named_parameters()]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.size = sum(self.numels)
        self.buffer_names = [n for n, _ in model.named_buffers()]

    def flatten(self) -> torch.Tensor:
        """The model's current parameters as a new flat tensor."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def flatten_buffers(self) -> torch.Tensor:
        """Floating-point buffers (e.g. BN running stats) as one flat tensor (may be empty)."""
        bufs = [b.detach().reshape(-1).float() for b in self.model.buffers() if b.is_floating_point()]
        if not bufs:
            return torch.zeros(0)
        return torch.cat(bufs)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(theta, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    @torch.no_grad()
    def load(self, theta: torch.Tensor, buffers: torch.Tensor | None = None) -> None:
        """Copy a flat vector (and optionally flat float buffers) into the model."""
        for p, c in zip(self.model.parameters(), torch.split(theta, self.numels), strict=True):
            p.copy_(c.view_as(p))
        if buffers is not None and buffers.numel():
            float_bufs = [b for b in self.model.buffers() if b.is_floating_point()]
            sizes = [b.numel() for b in float_bufs]
            for b, c in zip(float_bufs, torch.split(buffers, sizes), strict=True):
                b.copy_(c.view_as(b))

    def call(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` with parameters taken from ``theta`` (buffers from the model)."""
        params = self.unflatten(theta)
        buffers = {n: b for n, b in self.model.named_buffers()}
        return functional_call(self.model, (params, buffers), (x,))
