"""Artifact files: clear errors for truncated or bit-rotten files, a full disk; the tensor checksum."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from distilled_ssl.errors import StorageError
from distilled_ssl.io import (
    CHECKSUM_KEY,
    ArtifactError,
    check_fingerprint,
    load_tensors,
    read_metadata,
    save_tensors,
    tensors_sha256,
    verify_tensors,
)
from distilled_ssl.stages.context import RunContext


def test_truncated_artifact_gets_a_clear_error(finished_run: RunContext, tmp_path: Path) -> None:
    bad = tmp_path / "targets.safetensors"
    data = finished_run.path("targets.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated|corrupt"):
        load_tensors(bad)


def _flip_a_data_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_tensor_checksum_is_deterministic_and_catches_bit_rot(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(1000, dtype=torch.float32).view(10, 100), "lr": torch.tensor(0.5)}
    save_tensors(tmp_path / "x.safetensors", tensors, {"fingerprint": "f"})
    save_tensors(tmp_path / "y.safetensors", tensors, {"fingerprint": "f"})
    assert read_metadata(tmp_path / "x.safetensors") == read_metadata(tmp_path / "y.safetensors")
    assert read_metadata(tmp_path / "x.safetensors")[CHECKSUM_KEY] == tensors_sha256(tensors)
    assert verify_tensors(tmp_path / "x.safetensors")
    _flip_a_data_bit(tmp_path / "x.safetensors")
    assert read_metadata(tmp_path / "x.safetensors")["fingerprint"] == "f"  # still looks reusable
    with pytest.raises(ArtifactError, match=r"x\.safetensors is corrupt.*delete it"):
        load_tensors(tmp_path / "x.safetensors")
    with pytest.raises(ArtifactError, match="is corrupt"):
        check_fingerprint(tmp_path / "x.safetensors", "f", "teacher")
    assert load_tensors(tmp_path / "x.safetensors", ["lr"])[0]["lr"] == 0.5  # a partial read skips it


def test_files_without_a_checksum_are_read_as_before(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3)}, str(tmp_path / "old.safetensors"),
              metadata={"format_version": '"1"', "fingerprint": '"f"'})
    assert not verify_tensors(tmp_path / "old.safetensors")
    assert check_fingerprint(tmp_path / "old.safetensors", "f", "teacher")


def test_a_flipped_bit_in_a_reused_artifact_stops_the_stage(finished_run: RunContext, tmp_path: Path) -> None:
    import shutil

    from distilled_ssl.pipeline import prepare_run, run_pipeline

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    _flip_a_data_bit(copy / "targets.safetensors")
    ctx = prepare_run(finished_run.cfg, copy, progress=False)
    with pytest.raises(ArtifactError, match=r"targets\.safetensors is corrupt.*delete it"):
        run_pipeline(ctx, stages=["targets"])


def test_a_full_disk_is_a_storage_error_and_leaves_no_file(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError, match=r"cannot write .*x\.safetensors: No space left on device"):
        save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(2)})
    assert list(tmp_path.iterdir()) == []
