"""One style for every name table: :class:`Registry`, and the tables the config is checked against.

A registry maps names to things (a model class, a stage function, a Hub set) like timm's
``register_model``. Tables that :meth:`RunConfig.validate` checks live here, below every
implementation, and name their entries as ``"module:attribute"`` strings that are imported on
first use; so validating a config imports no torch and no trainer. Tables that nothing below
needs live beside their entries (``pipeline.STAGES``, ``sets.hub.KNOWN_SETS``).

To add a model, a distillation method, a matcher or a baseline: implement it, then add a line to
its table below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from .errors import UnknownArchError, UnknownNameError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Names → entries; ``lazy`` entries are ``"module:attribute"`` strings imported on first use.

    ``patterns`` are open families such as ``"torchvision:NAME"``: any name with that prefix
    (``torchvision:resnet50``) passes :meth:`check`, though it has no entry of its own.
    """

    def __init__(self, kind: str, entries: Mapping[str, Any] | None = None, *,
                 patterns: Sequence[str] = (), lazy: bool = False,
                 error: type[UnknownNameError] = UnknownNameError) -> None:
        self.kind = kind
        self.error = error
        self.patterns = tuple(patterns)
        self.lazy = lazy
        self._entries: dict[str, Any] = dict(entries or {})

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@STAGES.register("teacher")`` adds the decorated object under ``name``."""
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def __getitem__(self, name: str) -> T:
        entry = self._entries[name]
        if self.lazy and isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attr)
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Every registered name, then the open families (``torchvision:NAME``)."""
        return [*self._entries, *self.patterns]

    def accepts(self, name: str) -> bool:
        """True for a registered name or a name of an open family."""
        prefixes = [p.split(":", 1)[0] + ":" for p in self.patterns]
        return name in self._entries or any(name.startswith(p) and len(name) > len(p) for p in prefixes)

    def check(self, name: str, where: str | None = None) -> None:
        """Raise ``error`` (an :class:`UnknownNameError`, listing the known names) unless
        :meth:`accepts` ``name``."""
        if not self.accepts(name):
            raise self.error(f"{where + ': ' if where else ''}unknown {self.kind} {name!r}; "
                                   f"known: {', '.join(self.names())}")


MODELS: Registry[Callable[..., Any]] = Registry("architecture", {
    "convnet": "distilled_ssl.models.encoders:ConvNet",
    "resnet10": "distilled_ssl.models.encoders:resnet10",
    "resnet18": "distilled_ssl.models.encoders:resnet18",
    "mkdt_resnet18": "distilled_ssl.models.mkdt_resnet:MkdtResNet18",
}, patterns=["torchvision:NAME"], lazy=True, error=UnknownArchError)

# ``teacher.method``: the SSL objective of a trained teacher (``models.losses``).
TEACHER_METHODS: Registry[str] = Registry("teacher method", {
    "barlow_twins": "Barlow Twins (Zbontar et al., 2021): cross-correlation to the identity",
    "simclr": "SimCLR (Chen et al., 2020): NT-Xent contrastive loss",
})

# ``teacher.weights`` with ``teacher.mode: load``: where a teacher comes from (``models.teachers``).
TEACHER_SOURCES: Registry[str] = Registry("teacher source", {
    "builtin": "builtin:NAME, a teacher shipped in the package",
    "timm": "timm:MODEL, weights from teacher.checkpoint or timm's Hub integration",
    "torchvision": "torchvision:MODEL, weights from teacher.checkpoint",
    "hf": "hf:ORG/REPO[/FILE][@REVISION], a safetensors teacher on the Hugging Face Hub",
}, patterns=["PATH.safetensors|.pth|.ckpt", "package.module:function"])

# Source name → its torchvision dataset class (None: the library's own loader).
SOURCES: Registry[str | None] = Registry("source", {
    "fashion-mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100",
    "stl10": "STL10", "tiny-imagenet": None,
}, patterns=["imagefolder:PATH", "npz:PATH"])

# ``distill.method``: stage 5's algorithms, each ``run(ctx, *, force) -> Path``.
DISTILL_METHODS: Registry[Callable[..., Any]] = Registry("distillation method", {
    "mkdt": "distilled_ssl.stages.distill.mkdt:run_mkdt",
    "krr_st": "distilled_ssl.stages.distill.krr_st:run_krr_st",
    "fidelity": "distilled_ssl.stages.distill.mkdt:run_mkdt",  # MKDT's loop, another objective
}, lazy=True)

# ``distill.mode``: how MKDT differentiates through the inner loop (same gradients).
MATCHERS: Registry[Callable[..., Any]] = Registry("matching mode", {
    "adjoint": "distilled_ssl.stages.distill.matching:match_adjoint",
    "unrolled": "distilled_ssl.stages.distill.matching:match_unrolled",
}, lazy=True)

# ``eval.baselines``: what a distilled set is measured against (built by evaluation.baselines).
BASELINES: Registry[str] = Registry("baseline", {
    "none": "no pre-training: a random-init encoder",
    "random": "a random real subset of the distilled set's size",
    "init": "the run's own initial subset",
    "high_loss": "the top-k highest-loss images",
    "high_loss_balanced": "the top k/C highest-loss images of each class",
    "full": "every source image with teacher reps",
    "full_steps": "every source image with teacher reps, for the steps a set of its size takes",
    "teacher": "the teacher's own representation (the ceiling)",
}, patterns=["full:TEACHER"])
