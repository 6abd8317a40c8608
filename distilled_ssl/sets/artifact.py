"""The distilled-set folder: what is published to the Hub, and a reader that validates it.

A set folder holds::

    README.md               dataset card (YAML front matter + body), from hub_cards/dataset_card.md
    distilled.safetensors   the exact set: float16 pixels [k, C, H, W] in [0, 1] scale (un-normalised,
                            NOT clamped: distillation may push pixels outside [0, 1]), float32 target
                            reps [k, D], the learned lr, source_index and optional labels
    samples.png             distilled images beside the real images they started from
    data/train-NNNNN.tar    the same samples as WebDataset shards: KEY.png (uint8, clamped), KEY.npy
                            (float32 target [D]), KEY.pixels.npy (the exact float16 pixels [C, H, W]),
                            KEY.json (index, source_index, label)
    _info.json              format, counts, shapes and shard list (timm ``wds`` reader compatible)
    checksums.sha256        sha256 of every other file (``sha256sum -c checksums.sha256`` works)

``read_set`` refuses a folder that is truncated, tampered with or not a set, with a named error.
Nothing here reads or writes a pickle.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import string
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from .._version import __version__
from ..errors import (
    ArtifactError,
    ChecksumError,
    ConfigError,
    NotASetError,
    OutputExistsError,
    SetFormatError,
)
from ..io import FORMAT_VERSION, file_sha256, load_tensors
from ..layout import (
    CARD_FILE,
    DISTILLED_FILE,
    GRID_FILE,
    INFO_FILE,
    MANIFEST_FILE,
    PICTURE_FILE,
    RESULTS_FILE,
    SHARD_DIR,
    SHARD_PATTERN,
)
from .results import format_table

__all__ = ["ChecksumError", "DistilledSet", "NotASetError", "SetFormatError", "is_set_dir",
           "load_distilled_file", "looks_like_path", "read_set", "render_card", "split_front_matter",
           "verify_checksums", "write_set"]

SET_FORMAT = "distilled_ssl.set"
SET_FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 1000
TEMPLATE = Path(__file__).resolve().parent.parent / "hub_cards" / "dataset_card.md"

# Licence of each known source set, as a Hub licence id (the distilled set inherits it).
SOURCE_LICENSES = {"fashion-mnist": "mit", "mnist": "cc-by-sa-3.0", "cifar10": "unknown",
                   "cifar100": "unknown", "stl10": "unknown", "tiny-imagenet": "unknown"}
MKDT_CITATION = """@inproceedings{joshi2025mkdt,
  title     = {Dataset Distillation via Knowledge Distillation: Towards Efficient Self-Supervised
               Pre-training of Deep Networks},
  author    = {Joshi, Siddharth and Ni, Jiayi and Mirzasoleiman, Baharan},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025}
}"""


@dataclass
class DistilledSet:
    """A validated distilled set in memory (what ``read_set`` returns)."""

    images: torch.Tensor          # float16 [k, C, H, W], [0, 1] pixel scale, not clamped
    targets: torch.Tensor         # float32 [k, D] target representations
    lr: float                     # learned pre-training learning rate
    source_index: torch.Tensor    # int64 [k]: row of the source set each image started from
    labels: torch.Tensor | None   # int64 [k] source labels of the initial images, when known
    metadata: dict[str, Any]      # provenance, from distilled.safetensors
    card: str | None = None       # README.md text (None for a bare run directory)
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the source set (normalise with it, as the set was distilled)."""
        return tuple(self.metadata["normalization"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel std of the source set."""
        return tuple(self.metadata["normalization"]["std"])

    def __len__(self) -> int:
        return len(self.images)


# ----------------------------------------------------------------------------------------- reading

def load_distilled_file(path: str | os.PathLike, *, verify: bool = True) -> DistilledSet:
    """Read and validate a ``distilled.safetensors`` file (format version, keys, dtypes, shapes;
    with ``verify``, the tensor checksum in its metadata when it has one)."""
    path = Path(path)
    try:
        tensors, meta = load_tensors(path, verify=verify)
    except ArtifactError as exc:
        raise SetFormatError(str(exc)) from exc
    if meta.get("kind") != "distilled_set":
        raise NotASetError(f"{path} is not a distilled set (kind={meta.get('kind')!r})")
    if str(meta.get("format_version")) != FORMAT_VERSION:
        raise SetFormatError(f"{path} has format version {meta.get('format_version')!r}; this "
                             f"distilled_ssl {__version__} reads version {FORMAT_VERSION}: upgrade it")
    _expect(path, tensors, "images", torch.float16, 4)
    _expect(path, tensors, "targets", torch.float32, 2)
    _expect(path, tensors, "lr", torch.float32, 0)
    _expect(path, tensors, "source_index", torch.int64, 1)
    if "labels" in tensors:
        _expect(path, tensors, "labels", torch.int64, 1)
    images, targets = tensors["images"], tensors["targets"]
    k = len(images)
    for name in ("targets", "source_index", "labels"):
        if name in tensors and len(tensors[name]) != k:
            raise SetFormatError(f"{path}: {name!r} has {len(tensors[name])} rows but there are {k} images")
    shape = list(images.shape[1:])
    if meta.get("image_shape") != shape or meta.get("num_images") != k:
        raise SetFormatError(f"{path}: metadata says {meta.get('num_images')} images of shape "
                             f"{meta.get('image_shape')}, the tensors hold {k} of {shape}")
    if meta.get("target_dim") != targets.shape[1]:
        raise SetFormatError(f"{path}: metadata target_dim {meta.get('target_dim')} != {targets.shape[1]}")
    norm = meta.get("normalization") or {}
    if len(norm.get("mean", [])) != shape[0] or len(norm.get("std", [])) != shape[0]:
        raise SetFormatError(f"{path}: normalisation {norm} does not fit {shape[0]} channel(s)")
    lr = float(tensors["lr"])
    if not (math.isfinite(lr) and lr > 0):
        raise SetFormatError(f"{path}: learned lr {lr} is not a positive number")
    if not (torch.isfinite(images).all() and torch.isfinite(targets).all()):
        raise SetFormatError(f"{path}: images or targets hold NaN/inf values")
    return DistilledSet(images=images, targets=targets, lr=lr, source_index=tensors["source_index"],
                        labels=tensors.get("labels"), metadata=meta, path=path)


def read_set(path: str | os.PathLike, *, verify: bool = True) -> DistilledSet:
    """Load a set folder, checking format, manifest checksums (``verify``) and tensor shapes/dtypes."""
    root = Path(path)
    if not root.is_dir():
        raise NotASetError(f"{root} is not a directory holding a distilled set")
    info = read_info(root)
    manifest = read_manifest(root)
    required = {CARD_FILE, DISTILLED_FILE, INFO_FILE, *info["splits"]["train"]["filenames"]}
    unlisted = sorted(required - set(manifest))
    if unlisted:
        raise SetFormatError(f"{root}/{MANIFEST_FILE} does not cover {unlisted}; the folder is incomplete")
    if verify:
        verify_checksums(root, manifest)
    dset = load_distilled_file(root / DISTILLED_FILE, verify=verify)
    _cross_check_info(root, info, dset)
    if verify:
        _cross_check_shards(root, info, dset)
    dset.card = (root / CARD_FILE).read_text(encoding="utf-8")
    dset.info = info
    dset.path = root
    return dset


def _cross_check_info(root: Path, info: dict[str, Any], dset: DistilledSet) -> None:
    """``_info.json`` must describe ``distilled.safetensors`` (the manifest alone can be rewritten)."""
    expected = {"num_samples": len(dset), "fingerprint": dset.metadata.get("fingerprint"),
                "image_shape": list(dset.images.shape[1:]), "target_dim": int(dset.targets.shape[1]),
                "lr": dset.lr, "has_labels": dset.labels is not None,
                "normalization": dset.metadata.get("normalization")}
    wrong = [k for k, v in expected.items() if info.get(k) != v]
    split = info["splits"]["train"]
    lengths = split.get("shard_lengths")
    if (not isinstance(lengths, list) or len(lengths) != len(split["filenames"])
            or sum(lengths) != len(dset) or split.get("num_samples") != len(dset)):
        wrong.append("splits.train")
    if wrong:
        raise SetFormatError(f"{root}/{INFO_FILE} disagrees with {DISTILLED_FILE} on {', '.join(wrong)}: "
                             "the folder was edited or mixes two sets; download or write it again")


def _cross_check_shards(root: Path, info: dict[str, Any], dset: DistilledSet) -> None:
    """Every shard holds exactly its samples, with the tensors' target reps and exact pixels."""
    split = info["splits"]["train"]
    start = 0
    for name, n in zip(split["filenames"], split["shard_lengths"], strict=True):
        members = _read_members(root / name)
        expected = {f"{sample_key(i)}.{suffix}" for i in range(start, start + n)
                    for suffix in ("png", "npy", "pixels.npy", "json")}
        if set(members) != expected:
            raise SetFormatError(f"{root}/{name} does not hold samples {start}..{start + n - 1} of "
                                 f"{DISTILLED_FILE}; download or write the set again")
        for i in range(start, start + n):
            key = sample_key(i)
            target = np.load(io.BytesIO(members[f"{key}.npy"]), allow_pickle=False)
            pixels = np.load(io.BytesIO(members[f"{key}.pixels.npy"]), allow_pickle=False)
            extra = json.loads(members[f"{key}.json"])
            if (not np.array_equal(target, dset.targets[i].numpy())
                    or not np.array_equal(pixels, dset.images[i].numpy())
                    or extra.get("source_index") != int(dset.source_index[i])
                    or extra.get("label") != (None if dset.labels is None else int(dset.labels[i]))):
                raise SetFormatError(f"{root}/{name}: sample {key} differs from {DISTILLED_FILE}; "
                                     "download or write the set again")
        start += n


def _read_members(path: Path) -> dict[str, bytes]:
    """A shard's regular files by name, read in memory (nothing is extracted to disk)."""
    try:
        with tarfile.open(path, "r:") as tar:
            out = {}
            for m in tar.getmembers():
                fh = tar.extractfile(m) if m.isfile() else None
                if fh is None:
                    raise SetFormatError(f"{path}: member {m.name!r} is not a regular file")
                out[m.name] = fh.read()
            return out
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SetFormatError(f"{path} is not a readable tar shard ({exc}); it may be truncated") from exc


def read_info(root: Path) -> dict[str, Any]:
    """The folder's ``_info.json``, checked to be ours and of a version this library reads."""
    p = root / INFO_FILE
    if not p.is_file() and (root / DISTILLED_FILE).is_file():
        raise NotASetError(f"{root} is a run directory, not a set folder: open it with "
                           "DistilledDataset.from_run (or DistilledDataset.open), or write a set "
                           f"folder from it with `distilled-ssl export {root} --out DIR`")
    if not p.is_file():
        raise NotASetError(f"{root} has no {INFO_FILE}: it is not a distilled_ssl set folder (make one "
                           "with `distilled-ssl export RUN_DIR --out DIR` or "
                           "`distilled_ssl.write_set`)")
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SetFormatError(f"{p} is not valid JSON ({exc}); it may be truncated") from exc
    if not isinstance(info, dict) or info.get("format") != SET_FORMAT:
        raise NotASetError(f"{p} does not describe a distilled_ssl set")
    if info.get("format_version") != SET_FORMAT_VERSION:
        raise SetFormatError(f"{root} is set format version {info.get('format_version')}; this "
                             f"distilled_ssl {__version__} reads version {SET_FORMAT_VERSION}")
    try:
        names = info["splits"]["train"]["filenames"]
        if not isinstance(info["num_samples"], int) or not all(isinstance(f, str) for f in names):
            raise TypeError("bad field types")
    except (KeyError, TypeError) as exc:
        raise SetFormatError(f"{p} lacks required fields ({exc})") from exc
    return info


def read_manifest(root: Path) -> dict[str, tuple[str, int | None]]:
    """``checksums.sha256`` as {relative path: (sha256 hex, size or None)}."""
    p = root / MANIFEST_FILE
    if not p.is_file():
        raise SetFormatError(f"{root} has no {MANIFEST_FILE}; the folder is incomplete")
    entries: dict[str, tuple[str, int | None]] = {}
    sizes = _manifest_sizes(root)
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise SetFormatError(f"{p}:{n}: not a `sha256  path` line: {line!r}")
        entries[name] = (digest.lower(), sizes.get(name))
    return entries


def verify_checksums(root: Path, manifest: dict[str, tuple[str, int | None]] | None = None) -> None:
    """Recompute every file's sha256 (and size) against the manifest; ``ChecksumError`` on mismatch."""
    manifest = read_manifest(root) if manifest is None else manifest
    for name, (digest, size) in sorted(manifest.items()):
        p = root / name
        if not p.is_file():
            raise ChecksumError(f"{root}: {name} is listed in {MANIFEST_FILE} but missing")
        if size is not None and p.stat().st_size != size:
            raise ChecksumError(f"{root}: {name} is {p.stat().st_size} bytes, expected {size} "
                                "(truncated or replaced)")
        if file_sha256(p) != digest:
            raise ChecksumError(f"{root}: {name} does not match its sha256 in {MANIFEST_FILE} "
                                "(corrupt or tampered with); download or write the set again")


def _manifest_sizes(root: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads((root / INFO_FILE).read_text("utf-8"))["sizes"].items()}
    except (OSError, KeyError, ValueError, TypeError, AttributeError):
        return {}


def _expect(path: Path, tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, ndim: int) -> None:
    t = tensors.get(name)
    if t is None:
        raise SetFormatError(f"{path} lacks the {name!r} tensor")
    if t.dtype != dtype or t.dim() != ndim:
        raise SetFormatError(f"{path}: {name!r} is {t.dtype} with {t.dim()} dims, expected {dtype} "
                             f"with {ndim}")


# ----------------------------------------------------------------------------------------- writing

def looks_like_path(source: str | os.PathLike) -> bool:
    """True when ``source`` can only be a local path, never a short name or an ``org/name`` repo id
    (a ``Path``; ``./x``, ``/x``, ``~/x``, ``x/``, ``a/b/c``, a backslash)."""
    if not isinstance(source, str):
        return True
    return (source.startswith((".", "/", "~")) or source.endswith("/") or "\\" in source
            or source.count("/") > 1)


def is_set_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like a set folder (has ``_info.json``), not a run directory."""
    return (Path(path) / INFO_FILE).is_file()


def write_set(source: str | os.PathLike, out_dir: str | os.PathLike, *, repo_id: str | None = None,
              shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
              template: str | os.PathLike | None = None) -> Path:
    """Write a set folder into ``out_dir`` from a finished run directory or another set folder.

    ``repo_id`` is the Hub id the card's loading snippet names. The folder is assembled beside
    ``out_dir`` and renamed into place, so a crash never leaves a half-written set; ``overwrite``
    replaces an existing ``out_dir``.
    """
    source, out_dir = Path(source), Path(out_dir)
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--force) to "
                              "replace it")
    if is_set_dir(source):
        dset = read_set(source)
        src = source / DISTILLED_FILE
        results = split_front_matter(dset.card or "")[0].get("distilled_ssl", {}).get("evaluation")
        picture = source / PICTURE_FILE
    else:
        src = source / DISTILLED_FILE
        if not src.is_file():
            raise NotASetError(f"{source} is neither a set folder nor a run directory with {DISTILLED_FILE} "
                               f"(run the pipeline first: `distilled-ssl run --out {source} ...`)")
        dset = load_distilled_file(src)
        results = _read_results(source / RESULTS_FILE)
        picture = source / GRID_FILE
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        shutil.copyfile(src, tmp / DISTILLED_FILE)
        has_picture = picture.is_file()
        if has_picture:
            shutil.copyfile(picture, tmp / PICTURE_FILE)
        shards = write_shards(dset, tmp / SHARD_DIR, shard_size)
        info = _info(dset, shards, shard_size)
        card = render_card(dset, results, picture=has_picture, template=template,
                           repo_id=repo_id or "<namespace>/<name>", shard_size=shard_size)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        info["sizes"] = {f: (tmp / f).stat().st_size for f in files}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files.append(INFO_FILE)
        lines = [f"{file_sha256(tmp / f)}  {f}" for f in sorted(files)]
        (tmp / MANIFEST_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        for p in tmp.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished folder into place; an old ``out_dir`` is removed only after the swap."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        if out_dir.is_dir():
            out_dir.rmdir()
        os.replace(tmp, out_dir)


def write_shards(dset: DistilledSet, shard_dir: Path, shard_size: int) -> list[tuple[str, int]]:
    """WebDataset tar shards (deterministic bytes); returns (relative name, samples) per shard."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(dset.images)
    out = []
    for s, start in enumerate(range(0, len(dset), shard_size)):
        name = SHARD_PATTERN.format(s)
        stop = min(start + shard_size, len(dset))
        with tarfile.open(shard_dir / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, stop):
                for suffix, payload in _sample_files(dset, pixels, i):
                    _add_member(tar, f"{sample_key(i)}.{suffix}", payload)
        out.append((f"{SHARD_DIR}/{name}", stop - start))
    return out


def sample_key(i: int) -> str:
    """WebDataset ``__key__`` of sample ``i`` (no dots: WebDataset splits names at the first dot)."""
    return f"{i:06d}"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [k, C, H, W] pixels in [0, 1] scale → clamped, rounded uint8 [k, H, W, C] (for PIL/PNG)."""
    return images.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pil_image(pixels_hwc: np.ndarray) -> Image.Image:
    """One uint8 [H, W, C] image as PIL: mode L for one channel, RGB for three."""
    return Image.fromarray(pixels_hwc[:, :, 0] if pixels_hwc.shape[2] == 1 else pixels_hwc)


def _sample_files(dset: DistilledSet, pixels: np.ndarray, i: int) -> Iterator[tuple[str, bytes]]:
    png = io.BytesIO()
    pil_image(pixels[i]).save(png, format="PNG", optimize=False)
    yield "png", png.getvalue()
    yield "npy", _npy(dset.targets[i].numpy())
    yield "pixels.npy", _npy(dset.images[i].numpy())
    extra: dict[str, Any] = {"index": i, "source_index": int(dset.source_index[i])}
    if dset.labels is not None:
        extra["label"] = int(dset.labels[i])
    yield "json", json.dumps(extra, sort_keys=True).encode()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(payload), 0, 0o644
    ti.uname = ti.gname = ""
    tar.addfile(ti, io.BytesIO(payload))


def _info(dset: DistilledSet, shards: list[tuple[str, int]], shard_size: int) -> dict[str, Any]:
    meta = dset.metadata
    return {
        "format": SET_FORMAT, "format_version": SET_FORMAT_VERSION, "library_version": __version__,
        "name": meta.get("config", {}).get("source", {}).get("name", "distilled"),
        "fingerprint": meta.get("fingerprint"), "num_samples": len(dset),
        "image_shape": list(dset.images.shape[1:]), "target_dim": int(dset.targets.shape[1]),
        "lr": dset.lr, "has_labels": dset.labels is not None, "normalization": meta["normalization"],
        "shard_size": shard_size,
        "webdataset_fields": {"png": "uint8 image, clamped to [0, 1] then x255 (for viewing and PIL)",
                              "npy": "float32 [D] target representation",
                              "pixels.npy": "float16 [C, H, W] exact pixels, [0, 1] scale, not clamped",
                              "json": "index, source_index and label (if known)"},
        "splits": {"train": {"name": "train", "num_samples": len(dset),
                             "filenames": [name for name, _ in shards],
                             "shard_lengths": [n for _, n in shards]}},
    }


def _read_results(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-run the evaluation or delete it") from exc


# -------------------------------------------------------------------------------------------- card
METHOD_TITLES = {"mkdt": "MKDT", "krr_st": "KRR-ST", "fidelity": "KD-fidelity"}


def method_title(method: str | None) -> str:
    """How a set's ``method`` is named in cards and tables (sets before the field: MKDT)."""
    return METHOD_TITLES.get(method or "mkdt", str(method))


def render_card(dset: DistilledSet, results: dict[str, Any] | None = None, *, picture: bool = True,
                template: str | os.PathLike | None = None, repo_id: str = "<namespace>/<name>",
                shard_size: int = DEFAULT_SHARD_SIZE) -> str:
    """The dataset card: Hub YAML front matter (licence, tags, provenance) + a readable body."""
    tpl_path = Path(template) if template is not None else TEMPLATE
    if not tpl_path.is_file():
        raise ArtifactError(f"dataset card template {tpl_path} not found")
    meta = dset.metadata
    source = meta.get("source", {}).get("name", "unknown")
    k = len(dset)
    front = {
        "license": SOURCE_LICENSES.get(source, "unknown"),
        "pretty_name": f"{method_title(meta.get('method'))} distilled {source} ({k} images)",
        "tags": ["dataset-distillation", "self-supervised", (meta.get("method") or "mkdt").replace("_", "-"),
                 "knowledge-distillation", "distilled_ssl", "image"],
        "task_categories": ["image-feature-extraction"],
        "size_categories": [_size_category(k)],
        "source_datasets": [f"extended|{source}"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": f"{SHARD_DIR}/train-*.tar"}]}],
        "distilled_ssl": _provenance(dset, results),
    }
    teacher = meta.get("teacher") or {}
    student = meta.get("student") or {}
    num_shards = max(1, math.ceil(k / shard_size))
    values = {
        "front_matter": yaml.safe_dump(front, sort_keys=False, width=100).rstrip("\n"),
        "title": front["pretty_name"], "num_images": k, "source": source,
        "fraction": _fraction(k, meta.get("source", {}).get("num_images")),
        "image_shape": "x".join(str(s) for s in dset.images.shape[1:]),
        "target_dim": dset.targets.shape[1], "lr": f"{dset.lr:.6g}",
        "lr_phrase": _lr_phrase(dset.lr, meta),
        "teacher": f"{teacher.get('arch')} {json.dumps(teacher.get('kwargs') or {})}",
        "student": f"{student.get('arch')} {json.dumps(student.get('kwargs') or {})}",
        "mean": list(dset.mean), "std": list(dset.std), "repo_id": repo_id,
        "num_shards": num_shards, "shard_range": f"{0:05d}..{num_shards - 1:05d}",
        "channels": dset.images.shape[1], "decode": "torchl" if dset.images.shape[1] == 1 else "torchrgb",
        "channel_axis": ".map_tuple(lambda png: png[None], None)" if dset.images.shape[1] == 1 else "",
        "library_version": meta.get("library_version", __version__),
        "picture": f"![distilled samples]({PICTURE_FILE})" if picture else "(no picture was saved)",
        "results": _results_table(results), "citation": MKDT_CITATION,
    }
    return string.Template(tpl_path.read_text(encoding="utf-8")).substitute(values)


def _lr_phrase(lr: float, meta: dict[str, Any]) -> str:
    """How a set's lr was found: 'the learned learning rate **0.2**', or 'the learning rate **0.5**
    (chosen on held-out images; matching learned 0.197)' for a set made with ``distill.lr_grid``."""
    if "lr_learned" not in meta:
        return f"the learned learning rate **{lr:.6g}**"
    return (f"the learning rate **{lr:.6g}** (chosen on held-out images among the learned "
            f"{float(meta['lr_learned']):.4g} and {', '.join(f'{v:g}' for v in meta.get('lr_grid', []))})")


def split_front_matter(card: str) -> tuple[dict[str, Any], str]:
    """(YAML front matter as a dict, body) of a dataset card; ({}, card) without front matter."""
    if not card.startswith("---\n"):
        return {}, card
    end = card.find("\n---", 4)
    if end < 0:
        raise SetFormatError("dataset card front matter is not closed by '---'")
    data = yaml.safe_load(card[4:end]) or {}
    if not isinstance(data, dict):
        raise SetFormatError("dataset card front matter is not a YAML mapping")
    return data, card[end + 4:].lstrip("\n")


def _provenance(dset: DistilledSet, results: dict[str, Any] | None) -> dict[str, Any]:
    meta = dset.metadata
    keep = ("method", "library_version", "format_version", "fingerprint", "num_images", "image_shape",
            "target_dim", "image_encoding", "normalization", "source", "teacher", "student", "init",
            "num_experts", "iterations", "matching_loss", "krr_loss", "fidelity_loss",
            "real_batch", "config")
    prov = {k: meta[k] for k in keep if k in meta}
    prov["learned_lr"] = float(meta.get("lr_learned", dset.lr))
    prov["lr"] = dset.lr
    prov.update({k: meta[k] for k in ("lr_grid", "lr_scores") if k in meta})
    if results is not None:
        prov["evaluation"] = results
    return json.loads(json.dumps(prov))  # plain JSON types only (tuples → lists) for YAML


def _size_category(k: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if k < limit:
            return name
    return "100K<n<1M"


def _fraction(k: int, n: int | None) -> str:
    return f"{100 * k / n:.3g}% of {n:,}" if n else "a subset"


def _results_table(results: dict[str, Any] | None) -> str:
    if not results or not results.get("summary"):
        return "No evaluation was run for this set."
    p = results.get("protocol", {})
    return (format_table(results) + f"\nKD pre-training of a fresh encoder for {p.get('epochs')} epochs "
            "on each set, then teacher fidelity on unseen test images and linear probe / kNN "
            f"accuracy (%) on {', '.join(p.get('downstream', []))}; mean ± std over seeds "
            "(distilled_ssl's evaluation).")
