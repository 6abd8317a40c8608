"""Freed memory kept for reuse (glibc): a freed large block stays in the process; a run's entry
points (prepare_run, the evaluate command) ask for it on CPU runs unless ``reuse_freed_memory: false``."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import distilled_ssl.pipeline as pipeline_mod
from distilled_ssl.cli import main
from distilled_ssl.config import RunConfig
from distilled_ssl.pipeline import prepare_run, set_allocator

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# resident memory (MiB) with a 256 MiB block allocated and touched, then after freeing it
_PROBE = """
import os, sys
from distilled_ssl.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
block = bytearray(256 << 20)
held = rss()
del block
print(held, rss())
"""


def _held_and_freed(mode: str) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(Path(pipeline_mod.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True,
                         text=True, env=env).stdout
    held, freed = map(float, out.split())
    return held, freed


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt (Linux)")
def test_a_freed_block_stays_for_reuse() -> None:
    held, freed = _held_and_freed("default")
    assert held - freed > 200  # glibc's default: the block is given back to the OS
    held, freed = _held_and_freed("reuse")
    assert held - freed < 50  # kept: the next allocation of that size reuses it, no page faults


def test_prepare_run_asks_for_it_on_cpu_runs(tiny_cfg: RunConfig, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[None] = []
    monkeypatch.setattr(pipeline_mod, "reuse_freed_memory", lambda: calls.append(None) or True)
    prepare_run(tiny_cfg, tmp_path / "on", progress=False)
    assert len(calls) == 1
    prepare_run(tiny_cfg.override(["reuse_freed_memory=false"]), tmp_path / "off", progress=False)
    assert len(calls) == 1


def test_only_cpu_runs_that_want_it_ask(tiny_cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[None] = []
    monkeypatch.setattr(pipeline_mod, "reuse_freed_memory", lambda: calls.append(None) or True)
    set_allocator(tiny_cfg.override(["device=cuda"]))  # GPU runs: the host allocator is left alone
    assert calls == []
    set_allocator(tiny_cfg)
    assert len(calls) == 1


def test_the_evaluate_command_asks_for_it(eval_run: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[None] = []
    monkeypatch.setattr(pipeline_mod, "reuse_freed_memory", lambda: calls.append(None) or True)
    res = CliRunner().invoke(main, ["evaluate", str(eval_run), "--baselines", "none", "--label-fractions",
                                    "0.25", "--knn-k", "0", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
