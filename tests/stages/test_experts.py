"""Stage 3: expert trajectories: checkpoints, resume after Ctrl-C, locks, reuse of longer ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distilled_ssl.stages.experts as experts_mod
from distilled_ssl.config import RunConfig
from distilled_ssl.io import ArtifactError, load_tensors
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


def test_expert_held_by_a_live_process_is_left_alone(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    import os
    import socket

    ctx = _upto_experts(tiny_cfg, tmp_path / "r")
    lock = expert_path(ctx, 0).with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process that is not us
    done = run_experts(ctx)
    assert done == [expert_path(ctx, 1)]
    with pytest.raises(ArtifactError, match="not finished"):
        list_experts(ctx)
    lock.write_text(f"{socket.gethostname()} 999999999")  # a dead process: lock is taken over
    assert len(run_experts(ctx)) == 2


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
    longer = prepare_run(long_cfg, other, progress=False)
    with pytest.raises(ArtifactError, match=r"stops at epoch 1; .* up to epoch 2 "):
        list_experts(longer)
