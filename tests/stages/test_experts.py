"""Stage 3: expert trajectories: checkpoints, resume after Ctrl-C, locks, reuse of longer ones."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import same_artifact

import distilled_ssl.stages.experts as experts_mod
from distilled_ssl.config import RunConfig
from distilled_ssl.io import ArtifactError, load_tensors, read_metadata
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.experts import ExpertFile, expert_path, list_experts, run_experts
from distilled_ssl.stages.targets import run_targets
from distilled_ssl.stages.teacher import run_teacher


def test_experts_store_only_needed_checkpoints_and_loss_goes_down(finished_run: RunContext) -> None:
    experts = list_experts(finished_run)
    assert len(experts) == 2
    ef = experts[0]
    # 240 images / batch 40 = 6 steps per epoch; checkpoint every 2 steps; needed: 1 + 0.5 epochs
    assert ef.meta["steps_per_epoch"] == 6 and ef.meta["checkpoint_every"] == 2
    params, _ = load_tensors(ef.path, ["params"])
    assert params["params"].shape[0] == ef.num_checkpoints == 1 + 9 // 2 + 1
    losses = ef.meta["epoch_losses"]
    assert losses[-1] < losses[0]
    assert not torch.equal(experts[0].params(0), experts[1].params(0))  # independent inits
    assert not list(finished_run.path("experts").glob("*.lock"))
    assert not list(finished_run.path("experts").glob("*.partial.*"))


def _upto_experts(cfg: RunConfig, out: Path) -> RunContext:
    ctx = prepare_run(cfg, out, progress=False)
    run_teacher(ctx)
    run_targets(ctx)
    return ctx


def test_interrupted_expert_resumes_to_the_same_result(tiny_cfg: RunConfig, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _upto_experts(tiny_cfg, tmp_path / "ref")
    run_experts(ref)
    ctx = _upto_experts(tiny_cfg, tmp_path / "cut")
    real_write = experts_mod._write_partial
    calls = {"n": 0}

    def write_then_die(*args: object, **kwargs: object) -> None:
        real_write(*args, **kwargs)
        calls["n"] += 1
        raise KeyboardInterrupt  # Ctrl-C right after the first epoch's partial file

    monkeypatch.setattr(experts_mod, "_write_partial", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_experts(ctx)
    assert calls["n"] == 1
    assert expert_path(ctx, 0).with_suffix(".partial.safetensors").exists()
    assert not expert_path(ctx, 0).exists()
    assert not expert_path(ctx, 0).with_suffix(".lock").exists()
    monkeypatch.setattr(experts_mod, "_write_partial", real_write)
    run_experts(ctx)
    for k in range(2):
        assert torch.equal(ExpertFile.open(expert_path(ctx, k)).params(0, 4),
                           ExpertFile.open(expert_path(ref, k)).params(0, 4))


def _write_lock(lock: Path, host: str, pid: int, started: int | None = None, age: float = 0.0) -> None:
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"host": host, "pid": pid, "started": started}))
    t = time.time() - age
    os.utime(lock, (t, t))


def test_waits_for_an_expert_a_live_process_trains(tiny_cfg: RunConfig, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs sharing --out: the second waits for the first's expert instead of failing."""
    ctx = _upto_experts(tiny_cfg, tmp_path / "r")
    lock = expert_path(ctx, 0).with_suffix(".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(lock, socket.gethostname(), holder.pid, experts_mod._started(holder.pid))
        monkeypatch.setattr(experts_mod, "WAIT_POLL_S", 0.05)
        trained: list[tuple[int, bool]] = []
        real_train = experts_mod.train_expert
        released = threading.Event()

        def train(ctx_: RunContext, k: int, *args: object, **kwargs: object) -> Path:
            trained.append((k, released.is_set()))
            return real_train(ctx_, k, *args, **kwargs)

        def other_process_lets_go() -> None:
            released.set()
            lock.unlink()

        monkeypatch.setattr(experts_mod, "train_expert", train)
        release = threading.Timer(1.0, other_process_lets_go)
        release.start()
        done = run_experts(ctx)
        release.join()
    finally:
        holder.kill()
        holder.wait()
    assert done == [expert_path(ctx, 0), expert_path(ctx, 1)]
    assert trained == [(1, False), (0, True)]  # expert 0 only once its lock was gone
    assert len(list_experts(ctx)) == 2


def test_stale_locks_are_taken_over_and_live_ones_named(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    ctx = _upto_experts(tiny_cfg, tmp_path / "r")
    lock = expert_path(ctx, 0).with_suffix(".lock")
    host = socket.gethostname()
    live = os.getppid()  # a live process that is not us
    _write_lock(lock, "elsewhere", 1234)  # another host, renewed just now: held
    with experts_mod._ExpertLock(lock) as held:
        assert not held.acquired
    with pytest.raises(ArtifactError, match=r"not finished.*process 1234 on elsewhere, lock file .*"
                                            r"expert_00000\.lock"):
        list_experts(ctx)
    for stale in ({"host": "elsewhere", "pid": 1234, "age": 10 * experts_mod.LOCK_LEASE_S},  # lease over
                  {"host": host, "pid": live, "age": 10 * experts_mod.LOCK_LEASE_S},  # never renewed
                  {"host": host, "pid": live, "started": -1},  # the pid now names another process
                  {"host": host, "pid": 999999999}):  # a dead process
        _write_lock(lock, **stale)
        with experts_mod._ExpertLock(lock) as taken:
            assert taken.acquired, stale
        assert not lock.exists()
    lock.write_text(f"{host} 999999999")  # the older "host pid" form
    assert len(run_experts(ctx)) == 2


def test_lock_is_renewed_while_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(experts_mod, "LOCK_HEARTBEAT_S", 0.05)
    lock = tmp_path / "e.lock"
    with experts_mod._ExpertLock(lock) as held:
        assert held.acquired
        t = time.time() - 1000
        os.utime(lock, (t, t))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 10
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def _flip_a_data_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_an_expert_is_an_error_naming_the_file(finished_run: RunContext,
                                                                tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    ctx = prepare_run(finished_run.cfg, copy, progress=False)
    bad = expert_path(ctx, 1)
    _flip_a_data_bit(bad)
    assert read_metadata(bad)["fingerprint"] == read_metadata(expert_path(finished_run, 1))["fingerprint"]
    with pytest.raises(ArtifactError, match=r"expert_00001\.safetensors is corrupt.*delete it"):
        run_experts(ctx)
    with pytest.raises(ArtifactError, match=r"expert_00001\.safetensors is corrupt"):
        list_experts(ctx)
    bad.unlink()
    run_experts(ctx)  # re-made, bit for bit
    assert same_artifact(bad, expert_path(finished_run, 1))


def test_two_processes_sharing_out_both_finish(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    ctx = _upto_experts(tiny_cfg.override(["experts.num_experts=3"]), tmp_path / "r")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "distilled_ssl.cli", "experts", "--out", str(ctx.run_dir), "-q"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len(list_experts(ctx)) == 3
    assert not list(ctx.path("experts").glob("*.lock"))


def test_checkpoint_spacing_that_cannot_work_is_refused(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    ctx = prepare_run(tiny_cfg.override(["experts.checkpoint_every_steps=50"]), tmp_path / "a",
                      progress=False)
    with pytest.raises(ValueError, match="checkpoint_every_steps=50 is more than"):
        run_pipeline(ctx)
    ctx = prepare_run(tiny_cfg.override(["distill.expert_epochs=0.1"]), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="shorter than one expert checkpoint interval"):
        run_pipeline(ctx)


def test_longer_experts_are_reused_and_shorter_ones_named(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    """Experts only train as far as distillation reads; a longer trajectory serves a shorter need."""
    long_cfg = tiny_cfg.override(["distill.max_start_epoch=1.5", "experts.num_experts=1"])
    ctx = prepare_run(long_cfg, tmp_path, progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts"])
    short = prepare_run(long_cfg.override(["distill.max_start_epoch=0.5"]), tmp_path, progress=False)
    assert len(list_experts(short)) == 1  # reused as is
    run_pipeline(short, stages=["init", "distill"])
    other = tmp_path / "short"
    short_only = prepare_run(long_cfg.override(["distill.max_start_epoch=0.5"]), other, progress=False)
    run_pipeline(short_only, stages=["teacher", "targets", "experts"])
    with pytest.raises(ArtifactError, match=r"stops at epoch 1; .* up to epoch 2 "):
        prepare_run(long_cfg, other, progress=False)  # refused before config.yaml changes
    longer = RunContext(long_cfg, other, progress=False)
    with pytest.raises(ArtifactError, match=r"stops at epoch 1; .* up to epoch 2 "):
        list_experts(longer)
