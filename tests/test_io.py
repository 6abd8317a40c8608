"""Artifact files: clear errors for truncated files."""

from __future__ import annotations

from pathlib import Path

import pytest

from distilled_ssl.io import ArtifactError, load_tensors
from distilled_ssl.stages.context import RunContext


def test_truncated_artifact_gets_a_clear_error(finished_run: RunContext, tmp_path: Path) -> None:
    bad = tmp_path / "targets.safetensors"
    data = finished_run.path("targets.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated|corrupt"):
        load_tensors(bad)
