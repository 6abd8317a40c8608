"""``distilled-ssl export``: write a set folder (or an ImageFolder) from a run, without the Hub."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError
from ._errors import user_errors
from ._options import non_empty_path


@click.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path),
                metavar="RUN_OR_SET_DIR")
@click.option("--out", required=True, callback=non_empty_path,
              help="The folder to write (must not exist or be empty, unless --force).")
@click.option("--image-folder", is_flag=True,
              help="Write PNGs in torchvision ImageFolder layout (plus targets.npy and files.json) "
                   "instead of a set folder.")
@click.option("--repo-id", default=None, help="The Hub id the dataset card's snippets name.")
@click.option("--shard-size", type=int, default=None, help="Samples per WebDataset shard (default 1000).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@user_errors
def export(source: Path, out: Path | str, image_folder: bool, repo_id: str | None, shard_size: int | None,
           force: bool) -> None:
    """Write a run's distilled set as a set folder (what `push` uploads: card, safetensors,
    WebDataset shards, checksums), or with --image-folder as an ImageFolder tree."""
    if not str(out).strip():
        raise ConfigError("--out is an empty path; name the folder to write")
    out = Path(out)
    if image_folder:
        if repo_id is not None or shard_size is not None:
            raise ConfigError("--repo-id and --shard-size are for set folders, not --image-folder")
        from ..sets.dataset import DistilledDataset

        ds = DistilledDataset.open(source, image_format="pil")
        ds.export_image_folder(out, overwrite=force)
        folders = {Path(p).parent.name for p in _files(out)}
        click.echo(f"{len(ds)} images in {len(folders)} class folder(s): {out}")
        return
    from ..sets.artifact import DEFAULT_SHARD_SIZE, write_set

    write_set(source, out, repo_id=repo_id, shard_size=shard_size or DEFAULT_SHARD_SIZE, overwrite=force)
    click.echo(f"set folder: {out} (check with `distilled-ssl info {out}`)")


def _files(root: Path) -> list[str]:
    import json

    return json.loads((root / "files.json").read_text(encoding="utf-8"))["files"]
