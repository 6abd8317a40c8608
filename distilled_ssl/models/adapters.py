"""Any encoder as a teacher of the source images: its declared input, and the adaptation to it.

A teacher declares what it expects (:class:`TeacherInput`: channels, resolution, mean/std, and
which layer gives the representation). :class:`TeacherEncoder` takes source images normalised
with the source's statistics, maps them to that input (grey → RGB by repetition, RGB → grey by
the channel mean, bilinear anti-aliased resize, the teacher's normalisation) and returns the
pooled feature of the declared layer. Only the teacher sees adapted images: the students keep
training on the source's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArtifactError, ConfigError
from .encoders import Encoder

__all__ = ["ModuleEncoder", "TeacherEncoder", "TeacherInput", "pool_features"]


@dataclass(frozen=True)
class TeacherInput:
    """What a teacher expects: ``channels`` x ``size`` x ``size`` images normalised with ``mean`` /
    ``std`` (per channel, on pixels in [0, 1]); ``layer`` names the module whose (pooled) output is
    the representation, None = the encoder's own feature."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layer: str | None = None

    def __post_init__(self) -> None:
        if self.channels < 1 or self.size < 1:
            raise ConfigError(f"teacher input needs channels >= 1 and size >= 1, got {self.channels}, "
                              f"{self.size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"teacher input: mean and std need {self.channels} values each, got "
                              f"{list(self.mean)} and {list(self.std)}")
        if min(self.std) <= 0:
            raise ConfigError(f"teacher input: std must be > 0, got {list(self.std)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherInput:
        return cls(int(d["channels"]), int(d["size"]), tuple(float(v) for v in d["mean"]),
                   tuple(float(v) for v in d["std"]), d.get("layer"))

    def replace(self, **changes: Any) -> TeacherInput:
        """A copy with the non-None ``changes`` applied (``mean``/``std`` may be lists)."""
        d = self.to_dict()
        d.update({k: v for k, v in changes.items() if v is not None})
        return TeacherInput.from_dict(d)


def pool_features(h: torch.Tensor) -> torch.Tensor:
    """A layer's output as a [B, D] representation: feature maps are averaged over space, token
    sequences over tokens."""
    if h.ndim == 4:
        return h.mean(dim=(2, 3))
    if h.ndim == 3:
        return h.mean(dim=1)
    return h.flatten(1)


def _probe_dim(fn: Any, inp: TeacherInput, module: nn.Module) -> int:
    """The feature size, from one forward pass of two blank images in eval mode."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            p = next(module.parameters(), None)
            x = torch.zeros(2, inp.channels, inp.size, inp.size,
                            device=p.device if p is not None else "cpu")
            return int(fn(x).shape[1])
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ArtifactError(f"the teacher cannot encode {inp.channels}x{inp.size}x{inp.size} images "
                            f"({exc}); set teacher.input to what it expects") from exc
    finally:
        module.train(was_training)


class ModuleEncoder(Encoder):
    """Any ``nn.Module`` mapping images to features (a timm model without classifier, a user's
    module) as an :class:`Encoder`; its output is pooled by :func:`pool_features`."""

    def __init__(self, net: nn.Module, inp: TeacherInput) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = _probe_dim(self.features, inp, self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if not isinstance(out, torch.Tensor):
            raise ArtifactError(f"the teacher module returned {type(out).__name__}, not a tensor of "
                                "features")
        return pool_features(out)


class TeacherEncoder(Encoder):
    """A teacher (``inner``, taking ``inp`` images) that encodes source images.

    ``features(x)`` takes images normalised with ``source_mean`` / ``source_std`` in the source's
    shape. When the shapes differ they are un-normalised, adapted and normalised as ``inp`` says;
    when they agree, ``x`` must already use ``inp``'s statistics (``source_mean is None``).
    """

    def __init__(self, inner: Encoder, inp: TeacherInput, *, source_channels: int, source_size: int,
                 source_mean: tuple[float, ...] | None = None,
                 source_std: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.input = inp
        self.adapt = source_mean is not None
        if self.adapt:
            assert source_std is not None
            for name, v in (("source_mean", source_mean), ("source_std", source_std),
                            ("input_mean", inp.mean), ("input_std", inp.std)):
                self.register_buffer(name, torch.tensor(v).view(1, -1, 1, 1), persistent=False)
        self.layer = inp.layer
        if self.layer is not None:
            try:
                inner.get_submodule(self.layer)
            except AttributeError as exc:
                raise ConfigError(f"teacher.input.layer: the teacher has no layer {self.layer!r}; "
                                  f"it has {[n for n, _ in inner.named_children()]}") from exc
        probe = TeacherInput(source_channels, source_size, (0.0,) * source_channels,
                             (1.0,) * source_channels)
        self.feature_dim = (_probe_dim(self.features, probe, self) if self.layer is not None
                            else inner.feature_dim)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Source-normalised images → the teacher's input."""
        if not self.adapt:
            return x
        x = x * self.source_std + self.source_mean  # pixels in [0, 1]
        c = self.input.channels
        if x.shape[1] != c:
            if x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            elif c == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ArtifactError(f"cannot map {x.shape[1]}-channel images to the teacher's {c}")
        if x.shape[-1] != self.input.size or x.shape[-2] != self.input.size:
            x = F.interpolate(x, size=(self.input.size, self.input.size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - self.input_mean) / self.input_std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_input(x)
        if self.layer is None:
            return self.inner.features(x)
        captured: list[torch.Tensor] = []
        hook = self.inner.get_submodule(self.layer).register_forward_hook(
            lambda _m, _i, out: captured.append(out))
        try:
            self.inner.features(x)
        finally:
            hook.remove()
        return pool_features(captured[-1])
