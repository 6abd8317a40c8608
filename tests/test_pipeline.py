"""The pipeline on the tiny synthetic set: every artifact, resume, determinism, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import same_artifact

import distilled_ssl.stages.distill.mkdt as distill_mod
import distilled_ssl.stages.experts as experts_mod
from distilled_ssl.config import RunConfig
from distilled_ssl.io import ArtifactError, load_tensors
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.context import RunContext


def test_pipeline_writes_every_artifact(finished_run: RunContext) -> None:
    d = finished_run.run_dir
    for name in ("config.yaml", "run.log", "teacher.safetensors", "targets.safetensors",
                 "init.safetensors", "distilled.safetensors", "distilled.png"):
        assert (d / name).is_file(), name
    assert "distill 4/4: matching loss" in (d / "run.log").read_text()
    assert RunConfig.from_yaml(d / "config.yaml") == finished_run.cfg


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


def test_changed_config_is_not_silently_reused(finished_run: RunContext, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    before = (copy / "config.yaml").read_text()
    with pytest.raises(ArtifactError, match="teacher stage with a different configuration"):
        prepare_run(finished_run.cfg.override(["teacher.epochs=4"]), copy, progress=False)
    assert (copy / "config.yaml").read_text() == before  # a refused run writes nothing
    with pytest.raises(ArtifactError, match="experts.*different configuration"):
        prepare_run(finished_run.cfg.override(["experts.lr=0.2"]), copy, progress=False)
    assert (copy / "config.yaml").read_text() == before
    # --force accepts the change (the stages rebuild) and records it
    prepare_run(finished_run.cfg.override(["teacher.epochs=4"]), copy, progress=False, force=True)
    assert "epochs: 4" in (copy / "config.yaml").read_text()


def test_a_changed_config_that_fits_the_artifacts_is_recorded(finished_run: RunContext,
                                                               tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    ctx = prepare_run(finished_run.cfg.override(["eval.epochs=3"]), copy, progress=False)
    assert RunConfig.from_yaml(copy / "config.yaml").eval.epochs == 3 == ctx.cfg.eval.epochs


def test_empty_or_file_run_directory_is_refused(tiny_cfg: RunConfig, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from distilled_ssl.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="empty path"):
        prepare_run(tiny_cfg, "", progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_run(tiny_cfg, tmp_path / "f", progress=False)


def test_missing_upstream_artifact_names_the_stage(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    ctx = prepare_run(tiny_cfg, tmp_path, progress=False)
    with pytest.raises(ArtifactError, match="run the teacher stage first"):
        run_pipeline(ctx, stages=["targets"])


def test_unlabeled_source_runs_end_to_end(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    import numpy as np
    from conftest import make_images

    from distilled_ssl.evaluation.run import evaluate_run
    from distilled_ssl.sets.results import format_table

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
