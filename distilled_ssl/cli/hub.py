"""``distilled-ssl push | pull | info | list``: distilled sets on the Hugging Face Hub."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import OutputExistsError
from ..layout import DISTILLED_FILE
from ..sets.artifact import (
    DistilledSet,
    is_set_dir,
    load_distilled_file,
    read_set,
    split_front_matter,
)
from ..sets.hub import KNOWN_SETS, cached_sets, download_set, push_to_hub, resolve_name
from ._errors import user_errors


def _hub_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--token", envvar=None, default=None, metavar="TOKEN",
                      help="Hugging Face token (default: HF_TOKEN or the `hf auth login` token).")(fn)
    fn = click.option("--endpoint", default=None, metavar="URL",
                      help="Hub endpoint for a self-hosted or mirror Hub (default: HF_ENDPOINT or "
                           "huggingface.co).")(fn)
    return fn


_json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")


def _emit(data: dict[str, Any] | list[Any], as_json: bool, text: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        text()


@click.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path),
                metavar="RUN_OR_SET_DIR")
@click.argument("repo_id")
@click.option("--private", is_flag=True, default=None, help="Create the repo private.")
@click.option("--tag", default=None, help="Tag the upload commit (pin it, e.g. v1.0).")
@click.option("--message", "commit_message", default=None, help="Commit message.")
@_hub_options
@_json_option
@user_errors
def push(source: Path, repo_id: str, private: bool | None, tag: str | None, commit_message: str | None,
         endpoint: str | None, token: str | None, as_json: bool) -> None:
    """Publish a run's distilled set (or a set folder) as a Hub dataset repo, in one commit."""
    result = push_to_hub(source, repo_id, private=private, tag=tag, commit_message=commit_message,
                         endpoint=endpoint, token=token)
    data = {"repo_id": result.repo_id, "commit": result.commit_sha, "tag": result.tag, "url": result.url}
    _emit(data, as_json, lambda: click.echo(
        f"pushed to {result.url} (commit {result.commit_sha[:12]}"
        + (f", tag {result.tag}" if result.tag else "") + ")"))

@click.command()
@click.argument("name")
@click.option("--revision", default=None, help="Tag, branch or commit sha (default: main).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy the set into this folder (default: stay in the Hub cache).")
@_hub_options
@_json_option
@user_errors
def pull(name: str, revision: str | None, out: Path | None, endpoint: str | None, token: str | None,
         as_json: bool) -> None:
    """Download a set (short name or org/name) into the Hub cache, checking its checksums."""
    path = download_set(name, revision=revision, endpoint=endpoint, token=token)
    commit = path.name  # the cache's snapshot folder is named by the commit sha
    dset = read_set(path)
    if out is not None:
        if out.exists() and any(out.iterdir()):
            raise OutputExistsError(f"{out} exists and is not empty")
        shutil.copytree(path, out, dirs_exist_ok=True)
        read_set(out)
        path = out
    data = {"name": name, "repo_id": resolve_name(name)[0], "path": str(path), "commit": commit,
            "num_images": len(dset)}
    _emit(data, as_json, lambda: click.echo(f"{len(dset)} images, checksums OK: {path}"))

@click.command()
@click.argument("name_or_dir")
@click.option("--revision", default=None, help="Tag, branch or commit sha (Hub sets).")
@_hub_options
@_json_option
@user_errors
def info(name_or_dir: str, revision: str | None, endpoint: str | None, token: str | None,
         as_json: bool) -> None:
    """Card summary, size, provenance and checksum status of a set (folder, run dir or Hub name)."""
    local = Path(name_or_dir)
    if local.is_dir():
        path = local
    else:
        path = download_set(name_or_dir, revision=revision, endpoint=endpoint, token=token)
    if is_set_dir(path):
        dset, checks = read_set(path), "OK"
    else:
        dset, checks = load_distilled_file(path / DISTILLED_FILE), "n/a (run directory)"
    summary = _summary(dset, path, checks)
    _emit(summary, as_json, lambda: _print_summary(summary))

@click.command(name="list")
@_json_option
@user_errors
def list_sets(as_json: bool) -> None:
    """Known short names (repo id, producing preset) and the sets in the local Hub cache."""
    cached = cached_sets()
    cached_ids = {c["repo_id"] for c in cached}
    known = [{"name": s.name, "repo_id": s.repo_id, "preset": s.preset, "description": s.description,
              "cached": s.repo_id in cached_ids} for s in KNOWN_SETS.values()]
    data = {"known": known, "cached": cached}

    def text() -> None:
        click.echo("known sets (name -> repo id, made by preset):")
        for k in known:
            mark = " [cached]" if k["cached"] else ""
            click.echo(f"  {k['name']:<24} {k['repo_id']:<40} preset {k['preset']}{mark}")
        click.echo("cached sets:" if cached else "cached sets: none")
        for c in cached:
            click.echo(f"  {c['repo_id']:<40} {_size(int(c['size_bytes']))}  refs {', '.join(c['refs'])}")

    _emit(data, as_json, text)


HUB_COMMANDS = (push, pull, info, list_sets)


def _summary(dset: DistilledSet, path: Path, checks: str) -> dict[str, Any]:
    meta = dset.metadata
    front = split_front_matter(dset.card)[0] if dset.card else {}
    root = Path(path)  # the set's own size: a set folder's files, or a run's distilled.safetensors
    size = (sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if is_set_dir(root)
            else (root / DISTILLED_FILE).stat().st_size)
    evaluation = front.get("distilled_ssl", {}).get("evaluation")
    return {
        "path": str(path), "title": front.get("pretty_name"), "license": front.get("license"),
        "tags": front.get("tags", []), "num_images": len(dset), "image_shape": list(dset.images.shape[1:]),
        "target_dim": int(dset.targets.shape[1]), "lr": dset.lr, "has_labels": dset.labels is not None,
        "size_bytes": size, "checksums": checks, "method": meta.get("method"),
        "library_version": meta.get("library_version"), "source": meta.get("source"),
        "teacher": meta.get("teacher"), "student": meta.get("student"),
        "normalization": meta.get("normalization"),
        "fingerprint": meta.get("fingerprint"), "evaluation": evaluation,
    }


def _print_summary(s: dict[str, Any]) -> None:
    click.echo(s["title"] or f"distilled set at {s['path']}")
    click.echo(f"  path:        {s['path']} (set: {_size(s['size_bytes'])})")
    click.echo(f"  images:      {s['num_images']} x {s['image_shape']}, targets {s['target_dim']}-d, "
               f"labels {'yes' if s['has_labels'] else 'no'}")
    click.echo(f"  learned lr:  {s['lr']:.6g}")
    click.echo(f"  source:      {json.dumps(s['source'])}")
    click.echo(f"  teacher:     {json.dumps(s['teacher'])}")
    click.echo(f"  student:     {json.dumps(s['student'])}")
    click.echo(f"  made by:     distilled_ssl {s['library_version']} ({s['method']}), "
               f"fingerprint {s['fingerprint']}")
    if s["license"]:
        click.echo(f"  license:     {s['license']}; tags {', '.join(s['tags'])}")
    if s["evaluation"]:
        for row in s["evaluation"].get("rows", []):
            click.echo("  eval:        " + ", ".join(f"{k} {v}" for k, v in row.items()))
    click.echo(f"  checksums:   {s['checksums']}")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.1f} MB"
