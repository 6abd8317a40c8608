"""Teacher weights files: safetensors and .pth/.ckpt through torch.load(weights_only=True) only."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from distilled_ssl.errors import ArtifactError, CheckpointRefusedError
from distilled_ssl.models.checkpoints import map_keys, read_state_dict, state_dict_sha256


def test_a_lightning_style_checkpoint_is_unwrapped(tmp_path: Path) -> None:
    state = {"backbone.conv.weight": torch.randn(2, 1, 3, 3), "projector.0.weight": torch.randn(4, 2)}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": {"lr": 0.1}}, path)
    loaded = read_state_dict(path)
    assert loaded.keys() == state.keys() and torch.equal(loaded["backbone.conv.weight"],
                                                         state["backbone.conv.weight"])
    assert map_keys(loaded, {"backbone.": ""}).keys() == {"conv.weight"}  # the projector is dropped


def test_pickled_objects_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "solo.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointRefusedError, match=r"weights_only=True.*runs code") as info:
        read_state_dict(path)
    assert "argparse.Namespace" in str(info.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="not a readable PyTorch checkpoint"):
        read_state_dict(junk)
    other = tmp_path / "w.npz"
    other.write_bytes(b"")
    with pytest.raises(ArtifactError, match=r"must be a \.safetensors, \.pth"):
        read_state_dict(other)


def test_key_map_errors_name_the_prefixes_and_fingerprints_see_every_byte() -> None:
    state = {"encoder.a": torch.zeros(2), "encoder.b": torch.ones(1)}
    with pytest.raises(ArtifactError, match=r"\['encoder\.'\]"):
        map_keys(state, {"backbone.": ""})
    changed = {**state, "encoder.b": torch.full((1,), 2.0)}
    assert state_dict_sha256(state) == state_dict_sha256(dict(reversed(state.items())))
    assert state_dict_sha256(state) != state_dict_sha256(changed)
