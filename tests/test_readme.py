"""The README's Python snippets for using a set ("Use it in your SSL code", the Hub section) run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hub_fixtures import make_distilled_file

from distilled_ssl.sets.artifact import write_set

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(heading: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _local(code: str, set_dir: Path) -> str:
    """The snippet on a local set folder instead of the Hub."""
    local = f"DistilledDataset.open({str(set_dir)!r}"
    code = re.sub(r'DistilledDataset\.from_hub\("fmnist-mkdt-2pct"', local, code)
    return re.sub(r"snapshot_download\([^)]*\)", repr(str(set_dir)), code)


@pytest.fixture
def set_dir(tmp_path: Path) -> Path:
    return write_set(make_distilled_file(tmp_path / "run", size=16), tmp_path / "set", shard_size=5)


SNIPPETS = {"lightly": "lightly", "timm": "timm", "webdataset": "webdataset", "ImageFolder": None}


def test_the_section_covers_every_codebase() -> None:
    blocks = _blocks("Use it in your SSL code")
    assert len(blocks) == len(SNIPPETS)
    for block, needle in zip(blocks, SNIPPETS, strict=True):
        assert needle in block


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=list(SNIPPETS))
def test_use_it_in_your_ssl_code_snippets_run(index: int, set_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    module = list(SNIPPETS.values())[index]
    if module:
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    code = _local(_blocks("Use it in your SSL code")[index], set_dir)
    assert "from_hub" not in code and "snapshot_download(" not in code.split("import", 3)[-1]
    ns: dict = {}
    exec(compile(code, f"README snippet {index}", "exec"), ns)
    if "folder" in ns:
        image = ns["folder"][0][0]
        assert image.shape == (1, 16, 16) and len(ns["folder"]) == 12


def test_hub_section_snippet_runs(set_dir: Path) -> None:
    (code,) = _blocks("Distilled sets on the Hub")
    ns: dict = {}
    exec(compile(_local(code, set_dir), "README Hub snippet", "exec"), ns)
    assert ns["loss"].isfinite()
