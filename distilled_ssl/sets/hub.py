"""Publishing distilled sets to, and fetching them from, the Hugging Face Hub.

The table of known short names lives here (``KNOWN_SETS``, a :class:`~distilled_ssl.registry.Registry`):
each name maps to a dataset repo of the project's namespace and names the preset that produces it.
Everything goes through huggingface_hub (its token handling, cache and offline mode); tokens are
never printed.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import (
    ConfigError,
    HubError,
    HubUnreachableError,
    MissingTokenError,
    SetNotFoundError,
    SetRevisionNotFoundError,
    UnknownSetNameError,
)
from ..layout import CARD_FILE, MANIFEST_FILE
from ..registry import Registry
from .artifact import looks_like_path, read_set, write_set

try:  # the HTTP client huggingface_hub 2.x uses; 1.x used httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http

HUB_NAMESPACE = "distilled-ssl"
REPO_TYPE = "dataset"


@dataclass(frozen=True)
class KnownSet:
    """A published (or publishable) set: short name, Hub repo id and the preset that makes it."""

    name: str
    repo_id: str
    preset: str
    description: str


KNOWN_SETS: Registry[KnownSet] = Registry("set name", {s.name: s for s in (
    KnownSet("fmnist-mkdt-2pct", f"{HUB_NAMESPACE}/fmnist-mkdt-2pct", "cpu-fmnist-2pct",
             "Fashion-MNIST 60k -> 1,200 images (2%), ResNet-10 Barlow Twins teacher; CPU demo"),
    KnownSet("cifar10-mkdt-2pct", f"{HUB_NAMESPACE}/cifar10-mkdt-2pct", "cifar10-2pct",
             "CIFAR-10 -> 1,000 images (2%), paper recipe, ResNet-18 Barlow Twins teacher"),
    KnownSet("cifar10-mkdt-5pct", f"{HUB_NAMESPACE}/cifar10-mkdt-5pct", "cifar10-5pct",
             "CIFAR-10 -> 2,500 images (5%), paper recipe"),
    KnownSet("cifar100-mkdt-2pct", f"{HUB_NAMESPACE}/cifar100-mkdt-2pct", "cifar100-2pct",
             "CIFAR-100 -> 1,000 images (2%), paper recipe"),
    KnownSet("tinyimagenet-mkdt-2pct", f"{HUB_NAMESPACE}/tinyimagenet-mkdt-2pct", "tinyimagenet-2pct",
             "Tiny ImageNet -> 2,000 images (2%), paper recipe"),
)})


@dataclass(frozen=True)
class PushResult:
    """Where a push went: repo id, commit sha, optional tag and the repo URL."""

    repo_id: str
    commit_sha: str
    tag: str | None
    url: str


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``HF_ENDPOINT`` read now (not at import), else huggingface.co."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def resolve_name(name_or_repo_id: str) -> tuple[str, KnownSet | None]:
    """Map a short name to its repo id; an ``org/name`` id passes through."""
    if looks_like_path(name_or_repo_id):
        raise UnknownSetNameError(f"{name_or_repo_id} does not exist (a local path), and it is not a Hub "
                                  "set name or 'org/name' repo id")
    if "/" in name_or_repo_id:
        if not _REPO_ID.fullmatch(name_or_repo_id):
            raise UnknownSetNameError(f"{name_or_repo_id!r} is not a valid 'org/name' repo id")
        known = next((s for s in KNOWN_SETS.values() if s.repo_id == name_or_repo_id), None)
        return name_or_repo_id, known
    if name_or_repo_id in KNOWN_SETS:
        known = KNOWN_SETS[name_or_repo_id]
        return known.repo_id, known
    raise UnknownSetNameError(f"unknown set name {name_or_repo_id!r}; known names: "
                              f"{', '.join(sorted(KNOWN_SETS))} (or give a full 'org/name' repo id)")


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def download_set(name_or_repo_id: str, *, revision: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch (or find in the cache) a set's files; returns the local snapshot folder.

    ``revision`` pins a tag, branch or commit sha (default: main). Offline (``HF_HUB_OFFLINE=1``, or no
    network) a cached snapshot of that revision is used.
    """
    repo_id, known = resolve_name(name_or_repo_id)
    rev = revision or "main"
    try:
        path = snapshot_download(repo_id, repo_type=REPO_TYPE, revision=rev,
                                 endpoint=resolve_endpoint(endpoint), token=token, cache_dir=cache_dir,
                                 local_files_only=_offline())
    except RevisionNotFoundError as exc:
        raise SetRevisionNotFoundError(f"{repo_id} has no revision {rev!r} (a tag, branch or commit "
                                       "sha); see its tags on the Hub") from exc
    except RepositoryNotFoundError as exc:
        hint = (f" It is produced by the preset {known.preset!r}: `distilled-ssl run --preset "
                f"{known.preset} --out RUN_DIR`, then `distilled-ssl push RUN_DIR {repo_id}`."
                if known else "")
        raise SetNotFoundError(f"dataset repo {repo_id} not found at {resolve_endpoint(endpoint)} (or it "
                               f"is private and your token cannot read it).{hint}") from exc
    except LocalEntryNotFoundError as exc:
        why = "offline mode is on (HF_HUB_OFFLINE)" if _offline() else \
            f"{resolve_endpoint(endpoint)} cannot be reached"
        raise HubUnreachableError(f"{why} and revision {rev!r} of {repo_id} is not in the local cache; "
                                  "download it once with a network connection") from exc
    except HfHubHTTPError as exc:
        raise HubError(f"the Hub refused to serve {repo_id}@{rev}: {_status(exc)}") from exc
    return Path(path)


def push_to_hub(set_dir: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                tag: str | None = None, commit_message: str | None = None, endpoint: str | None = None,
                token: str | None = None) -> PushResult:
    """Publish a set folder (or a run directory's set) as a dataset repo, in one commit.

    Creates ``repo_id`` when missing, validates the set (checksums, shapes), re-renders its card for
    ``repo_id``, uploads every file in one commit and optionally tags that commit (``tag``).
    """
    if "/" not in repo_id:
        raise ConfigError(f"repo_id must be 'namespace/name', got {repo_id!r}")
    token = token or get_token()
    if not token:
        raise MissingTokenError("pushing needs a Hugging Face token with write access: set HF_TOKEN or "
                                "run `hf auth login`")
    url = resolve_endpoint(endpoint)
    api = HfApi(endpoint=url, token=token)
    with tempfile.TemporaryDirectory(prefix="distilled-ssl-push-") as scratch:
        staged = write_set(set_dir, Path(scratch) / "set", repo_id=repo_id)
        source = read_set(staged).metadata.get("source", {}).get("name", "?")
        message = commit_message or f"Upload distilled set ({source}, distilled_ssl)"
        try:
            repo = api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
            commit = api.upload_folder(folder_path=staged, repo_id=repo_id, repo_type=REPO_TYPE,
                                       commit_message=message)
            if tag:
                api.create_tag(repo_id, tag=tag, revision=commit.oid, repo_type=REPO_TYPE)
        except (_http.ConnectError, _http.TimeoutException, OfflineModeIsEnabled) as exc:
            raise HubUnreachableError(f"cannot reach {url} to push ({type(exc).__name__})") from exc
        except HfHubHTTPError as exc:
            code = exc.response.status_code if exc.response is not None else None
            if code in (401, 403):
                raise MissingTokenError(f"{url} rejected the token for {repo_id} ({code}); check it has "
                                        "write access to that namespace") from exc
            if code == 409 and tag:
                raise HubError(f"tag {tag!r} already exists on {repo_id}; choose a new tag") from exc
            raise HubError(f"pushing to {repo_id} failed: {_status(exc)}") from exc
    return PushResult(repo_id=repo_id, commit_sha=commit.oid, tag=tag, url=str(repo))


def cached_sets(cache_dir: str | os.PathLike | None = None) -> list[dict[str, object]]:
    """Dataset repos in the huggingface_hub cache that hold a distilled_ssl set."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != REPO_TYPE:
            continue
        revs = [r for r in repo.revisions if {f.file_name for f in r.files} >= {CARD_FILE, MANIFEST_FILE}]
        if revs:
            out.append({"repo_id": repo.repo_id, "size_bytes": repo.size_on_disk,
                        "revisions": sorted(r.commit_hash for r in revs),
                        "refs": sorted(ref for r in revs for ref in r.refs),
                        "path": str(repo.repo_path)})
    return out


def _status(exc: HfHubHTTPError) -> str:
    code = exc.response.status_code if exc.response is not None else "?"
    return f"HTTP {code}: {str(exc).splitlines()[0]}"
