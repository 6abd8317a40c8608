"""``DistilledDataset``: a distilled set as a drop-in torchvision dataset.

Example (pre-training with the KD objective, your own loop)::

    from torch.utils.data import DataLoader
    from distilled_ssl import DistilledDataset, kd_loss

    ds = DistilledDataset.from_hub("fmnist-mkdt-2pct")
    ds.transform = ds.normalize                      # exact float pixels, the set's normalisation
    opt = torch.optim.SGD(model.parameters(), lr=ds.lr, momentum=0.9, weight_decay=1e-4)
    for images, target_reps in DataLoader(ds, batch_size=256, shuffle=True):
        loss = kd_loss(model(images), target_reps)
        ...

Items are ``(image, target)`` like torchvision's CIFAR10. ``image_format`` picks the image, and what
it costs:

- ``"float"`` (default): the exact pixels the set was distilled and evaluated with, float32
  [C, H, W] in [0, 1] scale, **not** normalised and not clamped (distillation may push pixels out
  of [0, 1]). What ``v2.ToImage()`` + ``v2.ToDtype(torch.float32, scale=True)`` make of a
  torchvision dataset's PIL images, so a ``torchvision.transforms.v2`` pipeline written for one
  runs unchanged, your ``Normalize`` included (``ds.normalize`` is the set's). Nothing is lost.
- ``"pil"``: a PIL image (mode L or RGB), for PIL-only transforms (v1 ``ToTensor``, lightly's
  solarisation). Pixels are clamped to [0, 1] and rounded to 8 bits: a set distilled with
  ``distill.clamp: true`` loses only the rounding (at most 1/510); an older set also loses its
  out-of-range pixels (``ds.clipped_fraction`` says how many). Also what the ``.png`` files of the
  WebDataset shards and ``export_image_folder`` hold.
- ``"tensor"``: the exact pixels already normalised with the set's mean and std (float32), for a
  KD loop without augmentation and no transform at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchvision.datasets import VisionDataset
from torchvision.datasets.vision import StandardTransform

from ..errors import NotASetError, OutputExistsError
from ..io import atomic_path
from ..layout import DISTILLED_FILE
from .artifact import (
    DistilledSet,
    is_set_dir,
    load_distilled_file,
    looks_like_path,
    pil_image,
    read_set,
    render_card,
    to_uint8,
)

TargetType = Literal["representation", "label", "index", "none"]
TARGET_TYPES = ("representation", "label", "index", "none")
ImageFormat = Literal["float", "pil", "tensor"]
IMAGE_FORMATS = ("float", "pil", "tensor")
NO_TARGET = -1  # target_type="none": what torchvision's unlabeled splits (STL10) return

# Class names of the known sources, as torchvision names them (label i → CLASS_NAMES[source][i]).
CLASS_NAMES: dict[str, list[str]] = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
    "mnist": ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six",
              "7 - seven", "8 - eight", "9 - nine"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "stl10": ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"],
}


class DistilledDataset(VisionDataset):
    """A distilled set (``root`` = a set folder) as a torchvision dataset of ``(image, target)``.

    Args:
        root: a set folder (as written by :func:`distilled_ssl.write_set`, ``distilled-ssl export``
            or pulled from the Hub). A run directory opens with :meth:`from_run`.
        target_type: "representation" (float32 tensor [D], the learned target representation; the
            default), "label" (int: the source label of the real image the synthetic one started
            from), "index" (int) or "none" (``-1`` for every item, as torchvision's unlabeled STL10
            split, so the default ``collate`` works).
        transform, target_transform, transforms: as in torchvision; each is read when an item is
            fetched, so setting ``ds.transform`` or ``ds.transforms`` later works.
        image_format: "float" (default: the exact, unnormalised pixels the set was evaluated with),
            "pil" (clamped to [0, 1], 8-bit) or "tensor" (exact, normalised); see the module
            docstring for what each costs.
        verify: check the folder's sha256 manifest on load.

    Attributes: ``target_reps`` [k, D], ``labels`` [k] (or None), ``classes`` / ``class_to_idx``
    (when labels exist), ``targets`` (what items carry as target, per ``target_type``), ``lr``,
    ``mean``, ``std``, ``normalize``, ``num_channels``, ``image_size``, ``target_dim``,
    ``metadata``, ``card``.
    """

    def __init__(self, root: str | os.PathLike, *, target_type: TargetType = "representation",
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 transforms: Callable | None = None, image_format: ImageFormat = "float",
                 verify: bool = True) -> None:
        super().__init__(root, transforms=transforms, transform=transform, target_transform=target_transform)
        self._setup(read_set(root, verify=verify), target_type, image_format)

    def _setup(self, dset: DistilledSet, target_type: str, image_format: str) -> None:
        if target_type not in TARGET_TYPES:
            raise ValueError(f"target_type must be one of {TARGET_TYPES}, got {target_type!r}")
        if target_type == "label" and dset.labels is None:
            raise ValueError("this set has no labels (its source was unlabeled); use target_type="
                             "'representation', 'index' or 'none'")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.target_type: TargetType = target_type  # type: ignore[assignment]
        self.image_format: ImageFormat = image_format  # type: ignore[assignment]
        self.images = dset.images  # float16 [k, C, H, W], [0, 1] scale, as stored
        self.target_reps = dset.targets
        self.labels = dset.labels
        self.source_index = dset.source_index
        self.lr = dset.lr
        self.metadata = dset.metadata
        self.card = dset.card
        self.info = dset.info
        self.mean, self.std = dset.mean, dset.std
        self.classes: list[str] | None = None
        self.class_to_idx: dict[str, int] | None = None
        self._named_classes = False
        if dset.labels is not None:
            source = self.metadata.get("source", {}).get("name", "")
            n = int(dset.labels.max()) + 1 if len(dset.labels) else 0
            names = CLASS_NAMES.get(source)
            self._named_classes = names is not None and len(names) >= n
            self.classes = list(names) if names is not None and self._named_classes else [
                str(i) for i in range(n)]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        pixels = dset.images.float()
        self.clipped_fraction = float(((pixels < 0) | (pixels > 1)).float().mean()) if len(pixels) else 0.0
        self._pixels = to_uint8(dset.images) if image_format == "pil" else None
        self._float = pixels if image_format == "float" else None
        self._normalised = self._normalise(dset.images) if image_format == "tensor" else None

    # ---------------------------------------------------------------------------------- constructors
    @classmethod
    def from_local(cls, path: str | os.PathLike, **kwargs: Any) -> DistilledDataset:
        """A set folder on disk (a run directory: :meth:`from_run`; either: :meth:`open`)."""
        return cls(path, **kwargs)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, target_type: TargetType = "representation",
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 transforms: Callable | None = None, image_format: ImageFormat = "float",
                 verify: bool = True) -> DistilledDataset:
        """The distilled set of a pipeline run directory (its ``distilled.safetensors``).

        A run directory has no manifest: ``verify`` checks the file's own tensor checksum instead.
        """
        path = Path(run_dir) / DISTILLED_FILE
        if not path.is_file():
            raise NotASetError(f"{run_dir} holds no {DISTILLED_FILE}: not a finished run directory "
                               "(run the pipeline first, or use DistilledDataset.open for any source)")
        dset = load_distilled_file(path, verify=verify)
        dset.card = render_card(dset)
        ds = cls.__new__(cls)
        VisionDataset.__init__(ds, run_dir, transforms=transforms, transform=transform,
                               target_transform=target_transform)
        ds._setup(dset, target_type, image_format)
        return ds

    @classmethod
    def open(cls, source: str | os.PathLike, **kwargs: Any) -> DistilledDataset:
        """A set folder, a pipeline run directory, or else a Hub name / ``org/name`` id.

        A ``Path``, or a string that can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``), that
        does not exist is an error saying so, not a Hub lookup.
        """
        path = Path(source).expanduser()
        if is_set_dir(path):
            return cls.from_local(path, **kwargs)
        if (path / DISTILLED_FILE).is_file():
            return cls.from_run(path, **kwargs)
        if path.exists():
            raise NotASetError(f"{path} is neither a set folder (no _info.json) nor a run directory "
                               f"(no {DISTILLED_FILE})")
        if looks_like_path(source):
            raise NotASetError(f"{source} does not exist (a local path; Hub sets are a short name or "
                               "'org/name')")
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

    # ------------------------------------------------------------------------------------- shape
    @property
    def num_channels(self) -> int:
        """Image channels (1 = greyscale, 3 = RGB): timm's ``in_chans``."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def target_dim(self) -> int:
        """Size D of a target representation: the output size a KD model needs (timm's ``num_classes``)."""
        return int(self.target_reps.shape[1])

    @property
    def lr_batch_size(self) -> int | None:
        """The batch size the learned ``lr`` was learned at (MKDT's ``distill.batch_syn``, at most
        the set's size); None when the set does not record it."""
        batch = self.metadata.get("config", {}).get("distill", {}).get("batch_syn")
        return min(int(batch), len(self)) if isinstance(batch, int) else None

    @property
    def targets(self) -> torch.Tensor | list[int]:
        """Every item's target, per ``target_type`` (torchvision's ``targets``): the target reps
        [k, D], the labels, the indices, or ``-1`` each for "none"."""
        if self.target_type == "representation":
            return self.target_reps
        if self.target_type == "label":
            assert self.labels is not None
            return self.labels.tolist()
        if self.target_type == "index":
            return list(range(len(self)))
        return [NO_TARGET] * len(self)

    @property
    def normalize(self) -> Callable[[Any], Any]:
        """``v2.Normalize`` with the set's mean and std: the normalisation it was distilled with."""
        from torchvision.transforms import v2

        return v2.Normalize(list(self.mean), list(self.std))

    # ------------------------------------------------------------------------------------- dataset
    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """``(image, target)``: image per ``image_format``, target per ``target_type`` (copies: an
        in-place transform cannot change the set)."""
        image: Any
        if self._pixels is not None:
            image = pil_image(self._pixels[index])
        elif self._float is not None:
            image = self._float[index].clone()
        else:
            assert self._normalised is not None
            image = self._normalised[index].clone()
        target = self._target(index)
        if self.transforms is not None and not isinstance(self.transforms, StandardTransform):
            return self.transforms(image, target)  # a joint transform, given or set later
        if self.transform is not None:  # read at call time, so `ds.transform = ...` works as in CIFAR10
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def _target(self, index: int) -> Any:
        if self.target_type == "representation":
            return self.target_reps[index].clone()
        if self.target_type == "label":
            assert self.labels is not None
            return int(self.labels[index])
        if self.target_type == "index":
            return int(index)
        return NO_TARGET

    def extra_repr(self) -> str:
        src = self.metadata.get("source", {}).get("name", "?")
        c, (h, w) = self.num_channels, self.image_size
        target = {"representation": f"representation (float32 [{self.target_dim}])",
                  "label": f"label ({len(self.classes or [])} classes)", "index": "index (int)",
                  "none": f"none ({NO_TARGET})"}[self.target_type]
        fmt = {"float": "float (exact pixels, [0, 1] scale, not normalised)",
               "pil": f"pil (clamped, 8-bit; {100 * self.clipped_fraction:.1f}% of pixels clipped)",
               "tensor": "tensor (exact pixels, normalised)"}[self.image_format]
        return "\n".join([
            f"Images: {len(self)} x [{c}, {h}, {w}] (distilled from {src}, "
            f"{self.metadata.get('method', '?')})",
            f"Target: {target}",
            (f"Learned lr: {self.lr:.6g}" if "lr_learned" not in self.metadata else
             f"lr: {self.lr:.6g} (chosen on held-out images; learned "
             f"{float(self.metadata['lr_learned']):.4g})"),
            f"Image format: {fmt}",
            f"Normalization: mean {list(self.mean)}, std {list(self.std)}",
        ])

    # ---------------------------------------------------------------------------------- fast paths
    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images.float() - m) / s

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, target reps): the exact set as normalised float32 [k, C, H, W] and float32 [k, D]
        (copies)."""
        images = self._normalised.clone() if self._normalised is not None else self._normalise(self.images)
        return images, self.target_reps.clone()

    def export_image_folder(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write PNGs in torchvision ``ImageFolder`` layout for path-driven codebases.

        ``path/<class>/<index>.png`` with one folder per class, named by the class name when the
        source's names are known (else ``class_<label>``), or a single ``unlabeled`` folder;
        ``path/targets.npy`` holds the target reps row-aligned with the sorted file list in
        ``path/files.json`` (the order ``ImageFolder`` enumerates). The PNGs are the "pil" pixels
        (clamped, 8-bit), and greyscale sets stay mode L: note that ``ImageFolder`` loads every
        image as **RGB** (3 channels); add ``transforms.Grayscale()`` to get one back. A non-empty
        ``path`` is refused unless ``overwrite`` (then it is emptied first).
        """
        root = Path(path)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            if not overwrite:
                raise OutputExistsError(f"{root} exists and is not empty; choose a new folder or pass "
                                        "overwrite=True (--force) to replace it")
            if root.is_dir():
                shutil.rmtree(root)
            else:
                root.unlink()
        pixels = self._pixels if self._pixels is not None else to_uint8(self.images)
        if self.labels is None:
            folders = ["unlabeled"] * len(self)
        else:
            assert self.classes is not None
            safe = ([_folder_name(n) for n in self.classes] if self._named_classes
                    else [f"class_{i:03d}" for i in range(len(self.classes))])
            folders = [safe[int(c)] for c in self.labels]
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
            np.save(fh, self.target_reps[order].numpy(), allow_pickle=False)
        with atomic_path(root / "files.json") as tmp:
            tmp.write_text(json.dumps({"files": [f for f, _ in files], "index": order,
                                       "labels": None if self.labels is None else
                                       [int(self.labels[i]) for i in order],
                                       "classes": self.classes, "lr": self.lr, "mean": list(self.mean),
                                       "std": list(self.std)}, indent=1), encoding="utf-8")
        return root


def _folder_name(name: str) -> str:
    """A class name as a folder name (no path separators or odd characters)."""
    return re.sub(r"[^\w.+-]+", "_", name).strip("._") or "class"

