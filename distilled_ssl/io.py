"""Atomic, pickle-free artifact files (safetensors) with JSON metadata.

Every file written by :func:`save_tensors` carries ``tensor_sha256`` in its metadata: a sha256 of
its tensors' names, dtypes, shapes and bytes (deterministic, so the same tensors give the same
file). Reading all of a file's tensors, or reusing it (:func:`check_fingerprint`,
:func:`verify_tensors`), recomputes it, so a flipped bit is an error that names the file to delete
instead of silently wrong data. Files written before the checksum existed are read as before.
"""

from __future__ import annotations

import errno
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

from .errors import ArtifactError, StorageError

__all__ = ["CHECKSUM_KEY", "FORMAT_VERSION", "ArtifactError", "StorageError", "atomic_path",
           "check_fingerprint", "file_sha256", "load_rows", "load_tensors", "read_metadata",
           "save_tensors", "storage_error", "tensors_sha256", "verify_tensors"]

FORMAT_VERSION = "1"
CHECKSUM_KEY = "tensor_sha256"

# OSErrors that say the disk or file system refuses (not a bug): they become a StorageError.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EFBIG})


def storage_error(exc: OSError, path: str | os.PathLike | None = None) -> StorageError | None:
    """A one-line :class:`StorageError` for an OSError the user must fix, else None."""
    if exc.errno not in STORAGE_ERRNOS:
        return None
    where = exc.filename if exc.filename is not None else path
    hint = {errno.ENOSPC: "free some space or choose another --out",
            errno.EDQUOT: "free some space or choose another --out",
            errno.ENAMETOOLONG: "use a shorter path",
            errno.ENOTDIR: "a file is in the way of a folder on this path",
            errno.EEXIST: "a file is in the way of a folder on this path",
            }.get(exc.errno, "choose a folder you can write to")
    return StorageError(f"cannot write {where}: {exc.strerror or exc}; {hint}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    A crash or Ctrl-C leaves the old file (or no file) and at most a stray ``.tmp`` file,
    never a half-written artifact.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise (storage_error(exc, path) or exc) from exc
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as exc:  # a full disk while writing: say so in one line, leave no half file
        raise (storage_error(exc, path) or exc) from exc
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


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hex sha256 of tensors' names, dtypes, shapes and bytes (in name order; device independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """Write tensors + JSON-encoded metadata (and the tensors' sha256) to a safetensors file, atomically."""
    cpu = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    meta = {"format_version": json.dumps(FORMAT_VERSION)}
    for k, v in (metadata or {}).items():
        meta[k] = json.dumps(v)
    meta[CHECKSUM_KEY] = json.dumps(tensors_sha256(cpu))
    blob = st_save(cpu, metadata=meta)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a safetensors artifact, JSON values decoded."""
    with _open(path) as f:
        return _decode(f.metadata() or {})


def load_tensors(path: str | os.PathLike, keys: list[str] | None = None, *, verify: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors (all, or ``keys``) and decoded metadata from a safetensors artifact; reading
    all of them checks the tensor checksum (unless ``verify=False``)."""
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
        meta = _decode(f.metadata() or {})
    if verify and set(wanted) == available:
        _check_sum(path, tensors, meta)
    return tensors, meta


def verify_tensors(path: str | os.PathLike) -> bool:
    """Recompute the file's tensor checksum; True when it matched, False when the file has none
    (written before checksums existed: accepted as before). ``ArtifactError`` on a mismatch."""
    _, meta = load_tensors(path)
    return CHECKSUM_KEY in meta


def _check_sum(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    expected = meta.get(CHECKSUM_KEY)
    if expected is not None and tensors_sha256(tensors) != expected:
        raise ArtifactError(f"{path} is corrupt: its tensor data does not match the sha256 in its "
                            "metadata (a flipped bit or an edit); delete it and re-run the stage "
                            "that writes it")


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


def check_fingerprint(path: Path, fingerprint: str, stage: str, *, verify: bool = True) -> bool:
    """True when ``path`` exists and was made with ``fingerprint`` (and, with ``verify``, its tensor
    checksum holds: it is about to be reused); error when made with another or corrupt."""
    if not path.exists():
        return False
    meta = read_metadata(path)
    if meta.get("fingerprint") != fingerprint:
        raise ArtifactError(
            f"{path} was made by a {stage} stage with a different configuration. Re-run with "
            "--force to replace it (and what depends on it), or use a new --out directory.")
    if verify:
        verify_tensors(path)
    return True
