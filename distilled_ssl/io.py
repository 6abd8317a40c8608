"""Atomic, pickle-free artifact files (safetensors) with JSON metadata."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .errors import ArtifactError

__all__ = ["FORMAT_VERSION", "ArtifactError", "atomic_path", "check_fingerprint", "file_sha256",
           "load_rows", "load_tensors", "read_metadata", "save_tensors"]

FORMAT_VERSION = "1"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    A crash or Ctrl-C leaves the old file (or no file) and at most a stray ``.tmp`` file,
    never a half-written artifact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """Write tensors + JSON-encoded metadata to a safetensors file, atomically."""
    meta = {"format_version": json.dumps(FORMAT_VERSION)}
    for k, v in (metadata or {}).items():
        meta[k] = json.dumps(v)
    blob = st_save({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, metadata=meta)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a safetensors artifact, JSON values decoded."""
    with _open(path) as f:
        return _decode(f.metadata() or {})


def load_tensors(path: str | os.PathLike, keys: list[str] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors (all, or ``keys``) and decoded metadata from a safetensors artifact."""
    with _open(path) as f:
        available = set(f.keys())
        wanted = keys if keys is not None else sorted(available)
        missing = [k for k in wanted if k not in available]
        if missing:
            raise ArtifactError(f"{path} lacks tensor(s) {missing}; it is not the expected artifact")
        try:
            tensors = {k: f.get_tensor(k) for k in wanted}
        except SafetensorError as exc:
            raise ArtifactError(f"{path} is corrupt ({exc}); delete it and re-run the stage") from exc
        return tensors, _decode(f.metadata() or {})


def load_rows(path: str | os.PathLike, key: str, rows: list[int]) -> torch.Tensor:
    """Read only some rows of a 2-D tensor (lazy: the rest of the file is not loaded)."""
    with _open(path) as f:
        sl = f.get_slice(key)
        n = sl.get_shape()[0]
        for r in rows:
            if not 0 <= r < n:
                raise ArtifactError(f"{path}: row {r} of {key!r} does not exist (it has {n})")
        return torch.stack([sl[r:r + 1][0] for r in rows])


@contextmanager
def _open(path: str | os.PathLike) -> Iterator[Any]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc}); it may be truncated: "
                            "delete it and re-run the stage that writes it") from exc


def _decode(meta: dict[str, str]) -> dict[str, Any]:
    """Every metadata value is JSON; a value that is not came from elsewhere and stays a string."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def check_fingerprint(path: Path, fingerprint: str, stage: str) -> bool:
    """True when ``path`` exists and was made with ``fingerprint``; error when made with another."""
    if not path.exists():
        return False
    meta = read_metadata(path)
    if meta.get("fingerprint") != fingerprint:
        raise ArtifactError(
            f"{path} was made by a {stage} stage with a different configuration. Re-run with "
            "--force to replace it (and what depends on it), or use a new --out directory.")
    return True
