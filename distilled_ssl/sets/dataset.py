"""``DistilledDataset``: a distilled set as a drop-in torchvision dataset.

Example (pre-training with the KD objective, your own loop)::

    from torch.utils.data import DataLoader
    from torchvision.transforms import v2
    from distilled_ssl import DistilledDataset, kd_loss

    ds = DistilledDataset.from_hub("fmnist-mkdt-2pct")
    ds.transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                               v2.Normalize(ds.mean, ds.std)])
    opt = torch.optim.SGD(model.parameters(), lr=ds.lr, momentum=0.9, weight_decay=1e-4)
    for images, target_reps in DataLoader(ds, batch_size=256, shuffle=True):
        loss = kd_loss(model(images), target_reps)
        ...

Items are ``(PIL image, target)`` like torchvision's CIFAR10. PIL images are the distilled pixels
clamped to [0, 1] and rounded to uint8; ``image_format="tensor"`` (or ``tensors()``) gives the exact,
unclamped float pixels normalised with the source statistics, which is what the set was distilled as.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchvision.datasets import VisionDataset

from ..io import atomic_path
from ..layout import DISTILLED_FILE
from .artifact import (
    DistilledSet,
    is_set_dir,
    load_distilled_file,
    pil_image,
    read_set,
    render_card,
    to_uint8,
)

TargetType = Literal["representation", "label", "index", "none"]
TARGET_TYPES = ("representation", "label", "index", "none")


class DistilledDataset(VisionDataset):
    """A distilled set (``root`` = a set folder) as a torchvision dataset.

    Args:
        root: a set folder (as written by ``distilled_ssl.sets.artifact.write_set`` or pulled from the Hub).
        target_type: "representation" (float tensor [D], default), "label" (int; the source label of the
            image the synthetic image started from), "index" (int) or "none" (``None``).
        transform, target_transform, transforms: as in torchvision.
        image_format: "pil" (default) or "tensor": normalised float32 [C, H, W] without a PIL round trip.
        verify: check the folder's sha256 manifest on load.
    """

    def __init__(self, root: str | os.PathLike, *, target_type: TargetType = "representation",
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 transforms: Callable | None = None, image_format: Literal["pil", "tensor"] = "pil",
                 verify: bool = True, _set: DistilledSet | None = None) -> None:
        super().__init__(root, transforms=transforms, transform=transform, target_transform=target_transform)
        dset = _set if _set is not None else read_set(root, verify=verify)
        if target_type not in TARGET_TYPES:
            raise ValueError(f"target_type must be one of {TARGET_TYPES}, got {target_type!r}")
        if target_type == "label" and dset.labels is None:
            raise ValueError("this set has no labels (its source was unlabeled); use target_type="
                             "'representation', 'index' or 'none'")
        if image_format not in ("pil", "tensor"):
            raise ValueError(f"image_format must be 'pil' or 'tensor', got {image_format!r}")
        self._joint_transforms = transforms
        self.target_type: TargetType = target_type
        self.image_format = image_format
        self.images = dset.images
        self.targets = dset.targets
        self.labels = dset.labels
        self.source_index = dset.source_index
        self.lr = dset.lr
        self.metadata = dset.metadata
        self.card = dset.card
        self.info = dset.info
        self.mean, self.std = dset.mean, dset.std
        self._pixels = to_uint8(dset.images) if image_format == "pil" else None
        self._normalised = self._normalise(dset.images) if image_format == "tensor" else None

    # ---------------------------------------------------------------------------------- constructors
    @classmethod
    def from_local(cls, path: str | os.PathLike, **kwargs: Any) -> DistilledDataset:
        """A set folder on disk."""
        return cls(path, **kwargs)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, **kwargs: Any) -> DistilledDataset:
        """The distilled set of a pipeline run directory (its ``distilled.safetensors``)."""
        kwargs.pop("verify", None)
        dset = load_distilled_file(Path(run_dir) / DISTILLED_FILE)
        dset.card = render_card(dset)
        return cls(run_dir, _set=dset, **kwargs)

    @classmethod
    def open(cls, source: str | os.PathLike, **kwargs: Any) -> DistilledDataset:
        """A set folder, a pipeline run directory, or else a Hub name / ``org/name`` id."""
        path = Path(source)
        if is_set_dir(path):
            return cls.from_local(path, **kwargs)
        if (path / DISTILLED_FILE).is_file():
            return cls.from_run(path, **kwargs)
        return cls.from_hub(str(source), **kwargs)

    @classmethod
    def from_hub(cls, name_or_repo_id: str, *, revision: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                 **kwargs: Any) -> DistilledDataset:
        """A set on the Hugging Face Hub by short name (see ``distilled-ssl list``) or ``org/name`` id.

        ``revision`` pins a tag, branch or commit sha. Files go through huggingface_hub's cache, so a
        set once downloaded loads offline (``HF_HUB_OFFLINE=1``).
        """
        from .hub import download_set

        path = download_set(name_or_repo_id, revision=revision, endpoint=endpoint, token=token,
                            cache_dir=cache_dir)
        return cls(path, **kwargs)

    # ------------------------------------------------------------------------------------- dataset
    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """``(image, target)``: image PIL (or a normalised tensor), target per ``target_type``."""
        if self._pixels is not None:
            image: Any = pil_image(self._pixels[index])
        else:
            assert self._normalised is not None
            image = self._normalised[index]
        target = self._target(index)
        if self._joint_transforms is not None:
            return self._joint_transforms(image, target)
        if self.transform is not None:  # read at call time, so `ds.transform = ...` works as in CIFAR10
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def _target(self, index: int) -> Any:
        if self.target_type == "representation":
            return self.targets[index]
        if self.target_type == "label":
            assert self.labels is not None
            return int(self.labels[index])
        if self.target_type == "index":
            return int(index)
        return None

    def extra_repr(self) -> str:
        src = self.metadata.get("source", {}).get("name", "?")
        return "\n".join([
            f"Images: {len(self)} x {list(self.images.shape[1:])} (distilled from {src}, "
            f"{self.metadata.get('method', '?')})",
            f"Targets: {self.target_type} (representations {list(self.targets.shape)})",
            f"Learned lr: {self.lr:.6g}",
            f"Image format: {self.image_format}",
        ])

    # ---------------------------------------------------------------------------------- fast paths
    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images.float() - m) / s

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, target reps): the exact set as normalised float32 [k, C, H, W] and float32 [k, D]."""
        images = self._normalised if self._normalised is not None else self._normalise(self.images)
        return images, self.targets

    def export_image_folder(self, path: str | os.PathLike) -> Path:
        """Write PNGs in torchvision ``ImageFolder`` layout for path-driven codebases.

        ``path/<class>/<index>.png`` with one class folder per label (``class_<label>``), or a single
        ``unlabeled`` folder; ``path/targets.npy`` holds the target reps row-aligned with the sorted file
        list in ``path/files.json`` (the order ``ImageFolder`` enumerates).
        """
        root = Path(path)
        pixels = self._pixels if self._pixels is not None else to_uint8(self.images)
        folders = ([f"class_{int(c):03d}" for c in self.labels] if self.labels is not None
                   else ["unlabeled"] * len(self))
        files = []
        for i, folder in enumerate(folders):
            rel = f"{folder}/{i:06d}.png"
            (root / folder).mkdir(parents=True, exist_ok=True)
            with atomic_path(root / rel) as tmp:
                pil_image(pixels[i]).save(tmp, format="PNG")
            files.append((rel, i))
        files.sort()
        order = [i for _, i in files]
        with atomic_path(root / "targets.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, self.targets[order].numpy(), allow_pickle=False)
        with atomic_path(root / "files.json") as tmp:
            tmp.write_text(json.dumps({"files": [f for f, _ in files], "index": order,
                                       "lr": self.lr, "mean": list(self.mean), "std": list(self.std)},
                                      indent=1), encoding="utf-8")
        return root

