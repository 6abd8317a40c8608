"""Push and pull through the real huggingface_hub client against the loopback Hub server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from hub_fixtures import LoopbackHub, make_distilled_file
from huggingface_hub import HfFileSystem, constants

from distilled_ssl.config import list_presets
from distilled_ssl.io import load_tensors
from distilled_ssl.sets.artifact import ChecksumError, split_front_matter
from distilled_ssl.sets.dataset import DistilledDataset
from distilled_ssl.sets.hub import (
    KNOWN_SETS,
    HubUnreachableError,
    MissingTokenError,
    SetNotFoundError,
    SetRevisionNotFoundError,
    UnknownSetNameError,
    download_set,
    push_to_hub,
    resolve_name,
)

REPO = "alice/tiny-set"


def _push(hub: LoopbackHub, source: Path, **kwargs: object):
    return push_to_hub(source, REPO, endpoint=hub.endpoint, token=hub.token, **kwargs)


def _load(hub: LoopbackHub, name: str = REPO, **kwargs: object) -> DistilledDataset:
    return DistilledDataset.from_hub(name, endpoint=hub.endpoint, **kwargs)


def test_short_names_map_to_project_repos_and_real_presets() -> None:
    presets = set(list_presets())
    assert resolve_name("fmnist-mkdt-2pct")[0] == "distilled-ssl/fmnist-mkdt-2pct"
    assert KNOWN_SETS["fmnist-mkdt-2pct"].preset == "cpu-fmnist-2pct"
    assert KNOWN_SETS["cifar10-mkdt-2pct"].preset == "cifar10-2pct"
    for known in KNOWN_SETS.values():
        assert known.preset in presets and known.repo_id.startswith("distilled-ssl/")
    assert resolve_name("someone/else") == ("someone/else", None)
    with pytest.raises(UnknownSetNameError, match="cifar10-mkdt-2pct"):
        resolve_name("imagenet-mkdt-1pct")


def test_push_then_from_hub_is_bit_exact(loopback_hub: LoopbackHub, tiny_run: Path) -> None:
    result = _push(loopback_hub, tiny_run, tag="v1")
    repo = loopback_hub.server.state.repos[("dataset", REPO)]
    assert len(repo.commits) == 2  # the repo's initial commit + one upload commit with every file
    assert repo.tags == {"v1": result.commit_sha}
    files = repo.commits[result.commit_sha].files
    assert {"README.md", "distilled.safetensors", "_info.json", "checksums.sha256",
            "data/train-00000.tar"} <= set(files)
    front, body = split_front_matter(files["README.md"].decode())
    assert front["distilled_ssl"]["learned_lr"] == pytest.approx(0.05)
    assert f'from_hub("{REPO}")' in body
    ref, _ = load_tensors(tiny_run / "distilled.safetensors")
    ds = _load(loopback_hub)
    assert torch.equal(ds.images, ref["images"]) and torch.equal(ds.targets, ref["targets"])
    assert files["distilled.safetensors"] == (tiny_run / "distilled.safetensors").read_bytes()
    methods = {m for m, _, _ in loopback_hub.server.state.requests}
    assert methods == {"GET", "HEAD", "POST"}


def test_revision_pinning_by_tag_and_sha(loopback_hub: LoopbackHub, tmp_path: Path) -> None:
    first = _push(loopback_hub, make_distilled_file(tmp_path / "a", seed=1), tag="v1")
    second = _push(loopback_hub, make_distilled_file(tmp_path / "b", seed=2), tag="v2")
    assert first.commit_sha != second.commit_sha
    seed = {1: load_tensors(tmp_path / "a" / "distilled.safetensors")[0]["targets"],
            2: load_tensors(tmp_path / "b" / "distilled.safetensors")[0]["targets"]}
    assert torch.equal(_load(loopback_hub).targets, seed[2])
    assert torch.equal(_load(loopback_hub, revision="v1").targets, seed[1])
    assert torch.equal(_load(loopback_hub, revision=first.commit_sha).targets, seed[1])
    with pytest.raises(SetRevisionNotFoundError, match="v3"):
        _load(loopback_hub, revision="v3")


def test_unknown_repo_and_known_name_without_repo(loopback_hub: LoopbackHub) -> None:
    with pytest.raises(SetNotFoundError, match="alice/nothing"):
        _load(loopback_hub, "alice/nothing")
    with pytest.raises(SetNotFoundError, match="preset 'cifar10-2pct'"):
        _load(loopback_hub, "cifar10-mkdt-2pct")


def test_push_needs_a_valid_token_and_never_shows_it(loopback_hub: LoopbackHub, tiny_run: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MissingTokenError, match="HF_TOKEN"):
        push_to_hub(tiny_run, REPO, endpoint=loopback_hub.endpoint)
    assert loopback_hub.server.state.requests == []
    bad = "hf_secretButWrongToken42"
    with pytest.raises(MissingTokenError, match="rejected") as info:
        push_to_hub(tiny_run, REPO, endpoint=loopback_hub.endpoint, token=bad)
    out, err = capfd.readouterr()
    assert bad not in str(info.value) and bad not in out + err


def test_token_from_environment(loopback_hub: LoopbackHub, tiny_run: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", loopback_hub.token)
    assert push_to_hub(tiny_run, REPO, endpoint=loopback_hub.endpoint).repo_id == REPO


def test_private_repo_needs_token_to_read(loopback_hub: LoopbackHub, tiny_run: Path) -> None:
    _push(loopback_hub, tiny_run, private=True)
    assert loopback_hub.server.state.repos[("dataset", REPO)].private
    with pytest.raises(SetNotFoundError):
        _load(loopback_hub)
    assert len(_load(loopback_hub, token=loopback_hub.token)) == 12


def test_offline_after_caching(loopback_hub: LoopbackHub, tiny_run: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    sha = _push(loopback_hub, tiny_run, tag="v1").commit_sha
    online = _load(loopback_hub, revision="v1")
    loopback_hub.server.stop()  # no network: cached revisions still load
    assert torch.equal(_load(loopback_hub, revision="v1").images, online.images)
    assert torch.equal(_load(loopback_hub, revision=sha).images, online.images)
    with pytest.raises(HubUnreachableError, match="cannot be reached"):
        _load(loopback_hub, revision="v2")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert torch.equal(_load(loopback_hub, revision="v1").targets, online.targets)
    with pytest.raises(HubUnreachableError, match="offline mode"):
        _load(loopback_hub, "alice/never-downloaded")


def test_tampered_cache_file_is_detected(loopback_hub: LoopbackHub, tiny_run: Path) -> None:
    _push(loopback_hub, tiny_run)
    path = download_set(REPO, endpoint=loopback_hub.endpoint)
    blob = (path / "distilled.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="distilled.safetensors"):
        _load(loopback_hub)


def test_range_reads(loopback_hub: LoopbackHub, tiny_run: Path) -> None:
    _push(loopback_hub, tiny_run)
    fs = HfFileSystem(endpoint=loopback_hub.endpoint, token=False)
    whole = (tiny_run / "distilled.safetensors").read_bytes()
    with fs.open(f"datasets/{REPO}/distilled.safetensors", "rb", block_size=16) as fh:
        fh.seek(100)
        assert fh.read(40) == whole[100:140]
    gets = [h for m, _, h in loopback_hub.server.state.requests if m == "GET"]
    assert any("bytes=" in h.get("Range", h.get("range", "")) for h in gets)


def test_fresh_process_pull_is_bit_exact_and_offline(loopback_hub: LoopbackHub, tiny_run: Path,
                                                     isolated_hf_home: Path) -> None:
    """The issue's acceptance check: push, then from_hub in a new process; then offline from its cache."""
    _push(loopback_hub, tiny_run, tag="v1")
    code = """
import hashlib, os, sys
from distilled_ssl.sets.dataset import DistilledDataset
def digest(ds):
    return hashlib.sha256(ds.images.numpy().tobytes() + ds.targets.numpy().tobytes()).hexdigest()
print(digest(DistilledDataset.from_hub(sys.argv[1], revision="v1", endpoint=sys.argv[2])))
os.environ["HF_HUB_OFFLINE"] = "1"  # from here on, only the cache; the endpoint is a dead port
print(digest(DistilledDataset.from_hub(sys.argv[1], revision="v1", endpoint="http://127.0.0.1:9")))
"""
    env = {**os.environ, "HF_HOME": str(isolated_hf_home), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    ref, _ = load_tensors(tiny_run / "distilled.safetensors")
    expected = hashlib.sha256(ref["images"].numpy().tobytes() + ref["targets"].numpy().tobytes()).hexdigest()
    done = subprocess.run([sys.executable, "-c", code, REPO, loopback_hub.endpoint], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [expected, expected]


def test_socket_guard_blocks_external_hosts(no_external_network: list[str]) -> None:
    import socket

    with pytest.raises(OSError, match="only 127.0.0.1"):
        socket.create_connection(("192.0.2.1", 443), timeout=0.1)
    assert no_external_network == ["'192.0.2.1'"]
    no_external_network.clear()  # the guard worked; do not fail this test at teardown


# --------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def cli() -> click.Group:
    """The real ``distilled-ssl`` group (the Hub commands are registered on it)."""
    from distilled_ssl.cli import main

    return main


def test_cli_push_pull_info_list(cli: click.Group, loopback_hub: LoopbackHub, tiny_run: Path,
                                 tmp_path: Path) -> None:
    runner = CliRunner()
    ep = ["--endpoint", loopback_hub.endpoint]
    res = runner.invoke(cli, ["push", str(tiny_run), REPO, "--tag", "v1", "--json", "--token",
                              loopback_hub.token, *ep])
    assert res.exit_code == 0, res.output
    assert loopback_hub.token not in res.output
    pushed = json.loads(res.stdout)
    assert pushed["tag"] == "v1" and len(pushed["commit"]) == 40
    res = runner.invoke(cli, ["pull", REPO, "--revision", "v1", "--out", str(tmp_path / "copy"), "--json",
                              *ep])
    assert res.exit_code == 0, res.output
    pulled = json.loads(res.stdout)
    assert pulled["commit"] == pushed["commit"] and pulled["num_images"] == 12
    assert (tmp_path / "copy" / "distilled.safetensors").read_bytes() == \
        (tiny_run / "distilled.safetensors").read_bytes()
    res = runner.invoke(cli, ["info", str(tmp_path / "copy"), "--json"])
    summary = json.loads(res.stdout)
    assert summary["checksums"] == "OK" and summary["num_images"] == 12 and summary["license"] == "mit"
    res = runner.invoke(cli, ["info", REPO, *ep])
    assert res.exit_code == 0 and "checksums:   OK" in res.output and "learned lr:  0.05" in res.output
    res = runner.invoke(cli, ["list", "--json"])
    listing = json.loads(res.stdout)
    assert REPO in [c["repo_id"] for c in listing["cached"]]
    assert {k["name"]: k["preset"] for k in listing["known"]}["fmnist-mkdt-2pct"] == "cpu-fmnist-2pct"
    res = runner.invoke(cli, ["list"])
    assert "fmnist-mkdt-2pct" in res.output and REPO in res.output


def test_cli_errors_are_one_line(cli: click.Group, loopback_hub: LoopbackHub, tiny_set: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["pull", "cifar10-mkdt-2pct", "--endpoint", loopback_hub.endpoint])
    assert res.exit_code == 1 and "preset 'cifar10-2pct'" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["push", str(tiny_set), REPO, "--endpoint", loopback_hub.endpoint])
    assert res.exit_code == 1 and "HF_TOKEN" in res.output
    (tiny_set / "README.md").write_text("tampered")
    res = runner.invoke(cli, ["info", str(tiny_set)])
    assert res.exit_code == 1 and "README.md" in res.output and "truncated or replaced" in res.output


# ---------------------------------------------------------------------------------------- live Hub

# read before the isolated_hf_home fixture removes HF_TOKEN from the environment
LIVE_TOKEN, LIVE_REPO = os.environ.get("HF_TOKEN"), os.environ.get("DISTILLED_SSL_LIVE_REPO")


@pytest.mark.live_hub
@pytest.mark.skipif(not (LIVE_TOKEN and LIVE_REPO),
                    reason="live Hub test: set HF_TOKEN and DISTILLED_SSL_LIVE_REPO=namespace/name")
def test_live_hub_round_trip(tiny_run: Path) -> None:
    token, repo = LIVE_TOKEN, LIVE_REPO
    assert token and repo
    result = push_to_hub(tiny_run, repo, private=True, token=token, endpoint="https://huggingface.co")
    ds = DistilledDataset.from_hub(repo, revision=result.commit_sha, token=token,
                                   endpoint="https://huggingface.co")
    assert torch.equal(ds.targets, load_tensors(tiny_run / "distilled.safetensors")[0]["targets"])
