"""Pytest fixtures for the Hub tests: an isolated HF_HOME, a loopback Hub server and a socket guard.

Registered from tests/conftest.py with ``pytest_plugins = ["hub_fixtures"]``.
``no_external_network`` and ``isolated_hf_home`` are autouse: no test may connect beyond 127.0.0.1,
and no test reads or writes the user's Hugging Face cache or token.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hub_server import HubServer

from distilled_ssl.io import save_tensors

WRITE_TOKEN = "hf_loopbackWriteToken0123456789"
USER = "alice"
LIVE_MARKER = "live_hub"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{LIVE_MARKER}: talks to the real Hugging Face Hub (needs HF_TOKEN "
                            "and DISTILLED_SSL_LIVE_REPO; skipped otherwise)")


class ExternalNetworkError(OSError):
    """Raised (and recorded, so the test fails even if the error is swallowed) on a non-loopback connect."""


_INET = (socket.AF_INET, socket.AF_INET6)


def _is_loopback(host: object) -> bool:
    if not isinstance(host, str) or host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_external_network(request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail the test if anything connects (or resolves a name) beyond loopback; yields the attempts."""
    if request.node.get_closest_marker(LIVE_MARKER):
        yield []
        return
    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def guard(host: object) -> None:
        if not _is_loopback(host):
            attempts.append(repr(host))
            raise ExternalNetworkError(f"test tried to reach {host!r}: only 127.0.0.1 is allowed")

    def connect(self: socket.socket, address: object) -> None:
        if self.family in _INET:  # AF_UNIX (DataLoader workers, multiprocessing) is local by nature
            guard(address[0] if isinstance(address, tuple) else address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if self.family in _INET:
            guard(address[0] if isinstance(address, tuple) else address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        guard(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    if attempts:
        pytest.fail(f"the test tried to use the network beyond loopback: {attempts}")


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME (cache, token, xet cache) in a fresh temp dir; no token, not offline, no endpoint override."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf_home")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE",
                "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_ASSETS_CACHE": home / "assets",
                        "HF_TOKEN_PATH": home / "token", "HF_STORED_TOKENS_PATH": home / "stored_tokens",
                        "HF_XET_CACHE": home / "xet", "AGENT_HARNESSES_PATH": home / "agents.json"}.items():
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub 2.x fetches an "agent harness" registry from huggingface.co (whatever the
    # endpoint) to build its user agent, unless telemetry is off: keep it off.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return home


@dataclass
class LoopbackHub:
    """A running loopback Hub: pass ``endpoint`` and ``token`` to the library."""

    server: HubServer
    endpoint: str
    token: str
    user: str


@pytest.fixture
def loopback_hub() -> Iterator[LoopbackHub]:
    """A fresh Hub-protocol server on 127.0.0.1 with one write token (user ``alice``)."""
    server = HubServer({WRITE_TOKEN: USER}).start()
    try:
        yield LoopbackHub(server, server.base_url, WRITE_TOKEN, USER)
    finally:
        server.stop()


def make_distilled_file(path: Path, *, k: int = 12, channels: int = 1, size: int = 8, dim: int = 5,
                        labels: bool = True, seed: int = 0) -> Path:
    """A tiny distilled.safetensors in the pipeline's format (pixels partly outside [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(k, channels, size, size, generator=g) * 1.4 - 0.2).half()
    tensors = {"images": images, "targets": torch.randn(k, dim, generator=g),
               "lr": torch.tensor(0.05), "source_index": torch.arange(k, dtype=torch.int64) * 3}
    if labels:
        tensors["labels"] = torch.arange(k, dtype=torch.int64) % 3
    meta = {
        "kind": "distilled_set", "method": "mkdt", "fingerprint": f"test{seed:012d}",
        "library_version": "0.1.0", "iterations": 3, "num_images": k,
        "image_shape": [channels, size, size], "target_dim": dim,
        "image_encoding": "float16 pixels in [0, 1] scale (un-normalised, not clamped)",
        "normalization": {"mean": [0.5] * channels, "std": [0.25] * channels},
        "source": {"name": "fashion-mnist", "num_images": 600, "subset": None},
        "teacher": {"arch": "convnet", "kwargs": {"depth": 1}},
        "student": {"arch": "convnet", "kwargs": {}},
        "init": {"method": "random", "class_balanced": True}, "num_experts": 2,
        "matching_loss": {"first": 1.0, "last": 0.5},
        "config": {"seed": seed, "distill": {"lr_img": 100.0}},
    }
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / "distilled.safetensors", tensors, meta)
    return path


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """A run directory holding only a tiny distilled.safetensors (12 images, 1x8x8, 5-d targets)."""
    return make_distilled_file(tmp_path / "run")


@pytest.fixture
def tiny_set(tiny_run: Path, tmp_path: Path) -> Path:
    """The set folder written from ``tiny_run`` (shards of 5 samples)."""
    from distilled_ssl.sets.artifact import write_set

    return write_set(tiny_run, tmp_path / "set", shard_size=5)
