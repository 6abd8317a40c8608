"""Source image sets, loaded once into memory as uint8 tensors.

Every loader returns an :class:`ImageSet`: ``images`` uint8 [N, C, H, W], optional ``labels``
int64 [N], and the per-channel normalisation statistics of the training split. Names:
``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``stl10``, ``imagefolder:PATH`` and
``npz:PATH``. Fashion-MNIST is also found where Debian's ``dataset-fashion-mnist`` package puts it.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, DataFormatError, DataNotFoundError
from ..registry import SOURCES

__all__ = ["DataNotFoundError", "ImageSet", "channel_stats", "check_source_name", "denormalize",
           "load_source", "normalize", "read_idx", "seeded_subset"]


@dataclass
class ImageSet:
    """Images as uint8 [N, C, H, W] with optional labels and the normalisation to train with."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None = None
    source_index: torch.Tensor | None = None  # rows of the full split these images are (None: all)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataFormatError(f"{self.name}: images must be uint8 [N, C, H, W], got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataFormatError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, index: torch.Tensor) -> ImageSet:
        """The images at ``index``; ``source_index`` keeps pointing into the full split."""
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.name, self.images[index], labels, self.mean, self.std, self.num_classes,
                        self.original_index(index))

    def original_index(self, index: torch.Tensor) -> torch.Tensor:
        """Map indices into this set to indices into the full source split."""
        return index.clone() if self.source_index is None else self.source_index[index]


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION = {name: cls for name, cls in SOURCES.items() if cls is not None}


def check_source_name(name: str) -> None:
    """Raise ConfigError unless ``name`` is a known source name or ``imagefolder:``/``npz:`` path."""
    SOURCES.check(name)


def load_source(name: str, *, train: bool = True, root: str | os.PathLike | None = None,
                download: bool = False) -> ImageSet:
    """Load a source set by name into memory.

    ``train=False`` gives the test split (used for probes and fidelity checks). The normalisation
    statistics are always those of the training split, so both splits share one normalisation.
    """
    images, labels, num_classes = _load_raw(name, train, root, download)
    stats_from = images if train else _load_raw(name, True, root, download)[0]
    mean, std = channel_stats(stats_from)
    return ImageSet(name, images, labels, mean, std, num_classes)


_Raw = tuple[torch.Tensor, "torch.Tensor | None", "int | None"]


def _load_raw(name: str, train: bool, root: str | os.PathLike | None, download: bool) -> _Raw:
    if name.startswith("imagefolder:"):
        return _load_image_folder(Path(name.split(":", 1)[1]), train=train)
    if name.startswith("npz:"):
        return _load_npz(Path(name.split(":", 1)[1]), train=train)
    check_source_name(name)
    if name == "tiny-imagenet":
        return _load_tiny_imagenet(root, train=train)
    if name in ("fashion-mnist", "mnist"):
        idx_dir = _find_idx_dir(name, root)
        if idx_dir is not None:
            images, labels = _read_idx_pair(idx_dir, train)
            return images, labels, 10
    return _load_torchvision(name, train=train, root=root, download=download)


# ---------------------------------------------------------------------- IDX (MNIST-style) files
def _find_idx_dir(name: str, root: str | os.PathLike | None) -> Path | None:
    candidates: list[Path] = []
    if root is not None:
        r = Path(root)
        tv = _TORCHVISION[name]
        candidates += [r, r / tv / "raw", r / name, r / name / "raw"]
    elif name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    for c in candidates:
        if _idx_path(c, _IDX_FILES[True][0]) is not None:
            return c
    return None


def _idx_path(directory: Path, stem: str) -> Path | None:
    for suffix in (".gz", ""):
        p = directory / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into a numpy array, checking its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is unreadable or truncated ({exc}); reinstall the data") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX uint8 file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {body.size} bytes, its header promises {dims}: corrupt file")
    return body.reshape(dims)


def _read_idx_pair(directory: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    img_stem, lbl_stem = _IDX_FILES[train]
    img_path, lbl_path = _idx_path(directory, img_stem), _idx_path(directory, lbl_stem)
    if img_path is None or lbl_path is None:
        raise DataNotFoundError(f"{directory} lacks {img_stem}/{lbl_stem} (.gz)")
    images = torch.from_numpy(read_idx(img_path).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(lbl_path).astype(np.int64))
    return images, labels


# ---------------------------------------------------------------------- torchvision
def _load_torchvision(name: str, *, train: bool, root: str | os.PathLike | None,
                      download: bool) -> _Raw:
    import torchvision.datasets as tvd

    hint = _how_to_get(name)
    if root is None and not download:
        raise DataNotFoundError(f"{name}: no data root given. {hint}")
    root = Path(root) if root is not None else Path.home() / ".cache" / "distilled_ssl" / "data"
    cls = getattr(tvd, _TORCHVISION[name])
    try:
        if name == "stl10":
            ds = cls(str(root), split="unlabeled" if train else "test", download=download)
        else:
            ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise DataNotFoundError(f"{name} not found under {root}: {exc}. {hint}") from exc
    if name == "stl10":
        images = torch.from_numpy(np.asarray(ds.data))
        labels = torch.as_tensor(ds.labels, dtype=torch.int64)
        labels = None if bool((labels < 0).all()) else labels
    else:
        data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    num_classes = len(getattr(ds, "classes", [])) or None
    return images.contiguous(), labels, num_classes


def _how_to_get(name: str) -> str:
    if name == "fashion-mnist":
        return ("Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
                "source.root to a folder with the IDX files, or set source.download=true.")
    return (f"Set source.root to a folder holding torchvision's {_TORCHVISION[name]} files, or set "
            "source.download=true to let torchvision fetch them.")


# ---------------------------------------------------------------------- folders and npz files
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _load_image_folder(path: Path, *, train: bool) -> _Raw:
    """An ImageFolder tree (class sub-folders) or a flat folder of images; ``train/``/``test/``
    sub-folders pick the split when present. All images must share one size."""
    from PIL import Image

    if not path.is_dir():
        raise DataNotFoundError(f"image folder {path} does not exist")
    split = path / ("train" if train else "test")
    if split.is_dir():
        path = split
    elif not train:
        raise DataNotFoundError(f"{path} has no test/ sub-folder for the test split")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((path / c).rglob("*"))
                 if f.suffix.lower() in _IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(path.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise DataNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {path}")
    arrays = []
    mode = None
    for f, _ in files:
        with Image.open(f) as im:
            if mode is None:
                mode = "L" if im.mode in ("L", "1", "I", "I;16") else "RGB"
            arr = np.asarray(im.convert(mode))
        if arrays and arr.shape != arrays[0].shape:
            raise DataFormatError(f"{f} is {arr.shape}, {files[0][0]} is {arrays[0].shape}: "
                             "all images of a source must share one size; resize them first")
        arrays.append(arr)
    stack = np.stack(arrays)
    images = torch.from_numpy(stack).unsqueeze(1) if stack.ndim == 3 else \
        torch.from_numpy(stack).permute(0, 3, 1, 2)
    labels = torch.tensor([lab for _, lab in files]) if classes else None
    return images.contiguous(), labels, len(classes) or None


def _load_npz(path: Path, *, train: bool) -> _Raw:
    """An .npz with ``x_train`` (uint8 [N,H,W], [N,H,W,C] or [N,C,H,W]), optional ``y_train``,
    ``x_test``/``y_test``; or ``images``/``labels`` for a single split."""
    if not path.is_file():
        raise DataNotFoundError(f"npz file {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        xk, yk = ("x_train", "y_train") if train else ("x_test", "y_test")
        if xk not in keys:
            if "images" in keys and train:
                xk, yk = "images", "labels"
            else:
                raise DataFormatError(f"{path} has no {xk!r} array (found {sorted(keys)})")
        x = z[xk]
        y = z[yk] if yk in keys else None
    if x.dtype != np.uint8:
        raise DataFormatError(f"{path}:{xk} must be uint8 pixels, got {x.dtype}")
    if x.ndim == 3:
        images = torch.from_numpy(x).unsqueeze(1)
    elif x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        images = torch.from_numpy(x)
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        images = torch.from_numpy(x).permute(0, 3, 1, 2)
    else:
        raise DataFormatError(f"{path}:{xk} has shape {x.shape}; expected [N,H,W], [N,H,W,C] or [N,C,H,W]")
    labels = torch.from_numpy(y.astype(np.int64)) if y is not None else None
    num_classes = int(labels.max()) + 1 if labels is not None else None
    return images.contiguous(), labels, num_classes


def _load_tiny_imagenet(root: str | os.PathLike | None, *, train: bool) -> _Raw:
    """Tiny-ImageNet-200 as unpacked from its zip: ``train/<wnid>/images/*.JPEG`` and
    ``val/images`` + ``val/val_annotations.txt`` (the labelled split used as test)."""
    from PIL import Image

    if root is None:
        raise DataNotFoundError("tiny-imagenet: set source.root to the unpacked tiny-imagenet-200 "
                                "folder (it holds train/, val/ and wnids.txt)")
    base = Path(root)
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        raise DataNotFoundError(f"{base} is not an unpacked tiny-imagenet-200 folder (no wnids.txt)")
    wnids = wnids_file.read_text().split()
    cls = {w: i for i, w in enumerate(wnids)}
    if train:
        files = [(f, cls[w]) for w in wnids for f in sorted((base / "train" / w / "images").glob("*"))]
    else:
        ann = (base / "val" / "val_annotations.txt").read_text().splitlines()
        files = [(base / "val" / "images" / line.split("\t")[0], cls[line.split("\t")[1]])
                 for line in ann if line.strip()]
    if not files:
        raise DataNotFoundError(f"no tiny-imagenet images under {base}")
    arrays = []
    for f, _ in files:
        with Image.open(f) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([c for _, c in files]), len(wnids)


# ---------------------------------------------------------------------- statistics
def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(torch.float64) / 255.0
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
    n = len(images) * images.shape[2] * images.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, C, H, W] → float32 normalised, on the images' device."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Normalised float → [0, 1] pixel scale (not clamped)."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x * s + m


def seeded_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct indices of range(n), sorted, fixed by seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values
