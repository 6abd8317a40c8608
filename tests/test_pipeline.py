"""Each pipeline stage on the tiny synthetic set: behaviour, resume, determinism, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import same_artifact

import distilled_ssl.distill as distill_mod
import distilled_ssl.experts as experts_mod
from distilled_ssl.config import RunConfig
from distilled_ssl.context import RunContext
from distilled_ssl.distill import run_distill
from distilled_ssl.experts import ExpertFile, expert_path, list_experts, run_experts
from distilled_ssl.initial_set import top_k
from distilled_ssl.io import ArtifactError, load_tensors, read_metadata
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.targets import run_targets
from distilled_ssl.teacher import run_teacher


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, synthetic_npz: Path) -> RunContext:
    """One complete tiny run shared by the read-only tests of this module."""
    from conftest import tiny_config

    ctx = prepare_run(tiny_config(synthetic_npz), tmp_path_factory.mktemp("run"), progress=False)
    run_pipeline(ctx)
    return ctx


def test_pipeline_writes_every_artifact(finished_run: RunContext) -> None:
    d = finished_run.run_dir
    for name in ("config.yaml", "run.log", "teacher.safetensors", "targets.safetensors",
                 "init.safetensors", "distilled.safetensors", "distilled.png"):
        assert (d / name).is_file(), name
    assert "distill 4/4: matching loss" in (d / "run.log").read_text()
    assert RunConfig.from_yaml(d / "config.yaml") == finished_run.cfg


def test_teacher_loss_goes_down_and_probe_is_reported(finished_run: RunContext) -> None:
    meta = read_metadata(finished_run.path("teacher.safetensors"))
    losses = meta["trained"]["epoch_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert 0.25 < meta["probe_accuracy"] <= 1.0  # 4 balanced classes: above chance
    assert meta["arch"] == "convnet" and meta["feature_dim"] == 4


def test_targets_are_teacher_features_of_every_image(finished_run: RunContext) -> None:
    from distilled_ssl.probe import extract
    from distilled_ssl.teacher import load_teacher

    tensors, _meta = load_tensors(finished_run.path("targets.safetensors"))
    reps = tensors["target_reps"]
    assert reps.shape == (240, 4) and reps.dtype == torch.float32
    teacher, tmeta = load_teacher(finished_run.path("teacher.safetensors"))
    again = extract(teacher.features, finished_run.train_set.images[:7], tuple(tmeta["mean"]),
                    tuple(tmeta["std"]))
    torch.testing.assert_close(reps[:7], again)


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


def test_init_is_class_balanced_high_loss(finished_run: RunContext) -> None:
    tensors, meta = load_tensors(finished_run.path("init.safetensors"))
    idx, scores = tensors["indices"], tensors["scores"]
    assert len(idx) == 12 and len(set(idx.tolist())) == 12
    assert meta["class_counts"] == [3, 3, 3, 3]
    labels = finished_run.train_set.labels
    for c in range(4):  # within each class the picks are that class's highest-loss examples
        members = (labels == c).nonzero().squeeze(1)
        best = set(members[scores[members].topk(3).indices].tolist())
        assert best == set(idx[labels[idx] == c].tolist())


def test_top_k_plain_and_balanced() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert top_k(scores, 2).tolist() == [0, 1]
    assert top_k(scores, 2, labels).tolist() == [0, 5]
    small = torch.tensor([0, 0, 0, 0, 0, 1])  # class 1 has one member: fill from the rest
    assert len(top_k(scores, 4, small)) == 4


def test_distilled_artifact_contents(finished_run: RunContext) -> None:
    tensors, meta = load_tensors(finished_run.path("distilled.safetensors"))
    assert tensors["images"].shape == (12, 1, 16, 16) and tensors["images"].dtype == torch.float16
    assert tensors["targets"].shape == (12, 4) and tensors["targets"].dtype == torch.float32
    assert tensors["lr"].shape == () and float(tensors["lr"]) > 0
    assert tensors["source_index"].tolist() == load_tensors(
        finished_run.path("init.safetensors"))[0]["indices"].tolist()
    assert meta["format_version"] == "1" and meta["kind"] == "distilled_set"
    assert meta["normalization"]["mean"] == list(finished_run.train_set.mean)
    assert meta["iterations"] == 4 and meta["num_experts"] == 2
    assert meta["config"]["distill"]["syn_steps"] == 3
    # the images moved away from the real images they started from
    real = finished_run.train_set.images[tensors["source_index"]].float() / 255
    assert (tensors["images"].float() - real).abs().max() > 1e-3


def test_rerun_skips_finished_stages(finished_run: RunContext, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.run_dir.rglob("*.safetensors")}

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(experts_mod, "train_expert", boom)
    monkeypatch.setattr(distill_mod, "MATCHERS", {"adjoint": boom, "unrolled": boom})
    run_pipeline(finished_run)
    after = {p.name: p.stat().st_mtime_ns for p in finished_run.run_dir.rglob("*.safetensors")}
    assert before == after


def test_same_seed_same_artifacts(tiny_cfg: RunConfig, tmp_path: Path,
                                  finished_run: RunContext) -> None:
    ctx = prepare_run(tiny_cfg, tmp_path / "again", progress=False)
    run_pipeline(ctx)
    for name in ("teacher.safetensors", "targets.safetensors", "experts/expert_00001.safetensors",
                 "init.safetensors", "distilled.safetensors"):
        assert same_artifact(ctx.path(name), finished_run.path(name)), name
    other = prepare_run(tiny_cfg.override(["seed=1"]), tmp_path / "seed1", progress=False)
    run_pipeline(other, stages=["teacher"])
    assert not same_artifact(other.path("teacher.safetensors"), finished_run.path("teacher.safetensors"))


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


def test_distill_resumes_after_interrupt_and_extends(tiny_cfg: RunConfig, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg.override(["distill.iterations=6"])
    ref = prepare_run(cfg, tmp_path / "ref", progress=False)
    run_pipeline(ref)
    ref_images = load_tensors(ref.path("distilled.safetensors"))[0]["images"]

    ctx = prepare_run(cfg, tmp_path / "cut", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init"])
    real = distill_mod.MATCHERS["adjoint"]
    calls = {"n": 0}

    def die_at_fifth(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "MATCHERS", {"adjoint": die_at_fifth})
    with pytest.raises(KeyboardInterrupt):
        run_distill(ctx)
    assert read_metadata(ctx.path("distill_state.safetensors"))["iteration"] == 4
    monkeypatch.setattr(distill_mod, "MATCHERS", {"adjoint": real})
    run_distill(ctx)
    assert torch.equal(load_tensors(ctx.path("distilled.safetensors"))[0]["images"], ref_images)

    # raising the iteration count continues from the saved state
    longer = prepare_run(cfg.override(["distill.iterations=8"]), tmp_path / "cut", progress=False)
    run_distill(longer)
    meta = read_metadata(longer.path("distilled.safetensors"))
    assert meta["iterations"] == 8


def test_distill_matching_loss_goes_down(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    """One expert and one start: the same matching problem every iteration, so the loss must drop."""
    cfg = tiny_cfg.override(["experts.num_experts=1", "distill.max_start_epoch=0.2",
                             "distill.iterations=12", "distill.lr_img=3000", "distill.lr_targets=300",
                             "distill.log_every=1", "init.method=random"])
    ctx = prepare_run(cfg, tmp_path, progress=False)
    run_pipeline(ctx)
    history = read_metadata(ctx.path("distill_state.safetensors"))["history"]
    assert len(history) == 12
    assert sum(history[-3:]) / 3 < 0.9 * sum(history[:3]) / 3


def test_changed_config_is_not_silently_reused(finished_run: RunContext, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    ctx = prepare_run(finished_run.cfg.override(["teacher.epochs=4"]), copy, progress=False)
    with pytest.raises(ArtifactError, match="different configuration"):
        run_pipeline(ctx, stages=["teacher"])


def test_missing_upstream_artifact_names_the_stage(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    ctx = prepare_run(tiny_cfg, tmp_path, progress=False)
    with pytest.raises(ArtifactError, match="run the teacher stage first"):
        run_pipeline(ctx, stages=["targets"])


def test_truncated_artifact_gets_a_clear_error(finished_run: RunContext, tmp_path: Path) -> None:
    bad = tmp_path / "targets.safetensors"
    data = finished_run.path("targets.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated|corrupt"):
        load_tensors(bad)


def test_checkpoint_spacing_that_cannot_work_is_refused(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    ctx = prepare_run(tiny_cfg.override(["experts.checkpoint_every_steps=50"]), tmp_path / "a",
                      progress=False)
    with pytest.raises(ValueError, match="checkpoint_every_steps=50 is more than"):
        run_pipeline(ctx)
    ctx = prepare_run(tiny_cfg.override(["distill.expert_epochs=0.1"]), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="shorter than one expert checkpoint interval"):
        run_pipeline(ctx)


def test_unlabeled_source_runs_end_to_end(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    import numpy as np
    from conftest import make_images

    from distilled_ssl.report import evaluate_run, format_table

    x, _ = make_images(200, seed=3)
    npz = tmp_path / "unlabeled.npz"
    np.savez(npz, x_train=x)  # no labels, no test split
    cfg = tiny_cfg.override([f"source.name=npz:{npz}", "init.class_balanced=false"])
    ctx = prepare_run(cfg, tmp_path / "run", progress=False)
    run_pipeline(ctx)
    tensors, meta = load_tensors(ctx.path("distilled.safetensors"))
    assert "labels" not in tensors and meta["teacher"]["probe_accuracy"] is None
    result = evaluate_run(ctx)
    assert result["rows"][0]["set"] == "none (random init)"
    assert "MKDT (high-loss init)" in format_table(result)
    assert result["protocol"]["downstream"] == []  # no labels: fidelity only
    bad = prepare_run(cfg.override(["init.class_balanced=true"]), tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="needs a labelled source"):
        run_pipeline(bad)


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
