"""source.holdout and eval.split=validation: tuning never touches a test set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_images, tiny_config

from distilled_ssl.cli import main
from distilled_ssl.config import ConfigError, RunConfig
from distilled_ssl.data.downstream import Downstream, validation_split
from distilled_ssl.data.sources import ImageSet
from distilled_ssl.evaluation.run import downstream_sets, evaluate_run
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.sets.artifact import load_distilled_file
from distilled_ssl.stages.targets import load_targets

HOLDOUT = 40


@pytest.fixture(scope="module")
def held_run(synthetic_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(synthetic_npz).override([f"source.holdout={HOLDOUT}"])
    ctx = prepare_run(cfg, tmp_path_factory.mktemp("holdout") / "run", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init", "distill"])
    return ctx.run_dir


def _ctx(run: Path, *overrides: str):
    cfg = RunConfig.from_yaml(run / "config.yaml").override(list(overrides))
    return prepare_run(cfg, run, progress=False)


def test_holdout_is_disjoint_seeded_by_the_source_and_never_seen(held_run: Path) -> None:
    ctx = _ctx(held_run)
    train, val = ctx.train_set, ctx.validation_set
    assert val is not None and len(val) == HOLDOUT and len(train) == 240 - HOLDOUT
    ti, vi = set(train.source_index.tolist()), set(val.source_index.tolist())
    assert not ti & vi and ti | vi == set(range(240))
    # the run seed does not move the validation images: a sweep over seeds validates on one set
    other = prepare_run(RunConfig.from_yaml(held_run / "config.yaml").override(["seed=7"]),
                        held_run.parent / "seed7", progress=False)
    assert torch.equal(other.validation_set.source_index, val.source_index)
    # no stage saw the held-out images
    assert len(load_targets(ctx)) == len(train)
    dset = load_distilled_file(held_run / "distilled.safetensors")
    assert not set(dset.source_index.tolist()) & vi


def test_holdout_zero_keeps_old_fingerprints_and_bad_values_fail(synthetic_npz: Path) -> None:
    cfg = tiny_config(synthetic_npz)
    legacy = cfg.to_dict()["source"]
    del legacy["holdout"]  # a config written before the field existed
    blob = json.dumps({"source": legacy}, sort_keys=True)
    assert cfg.section_hash("source") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert cfg.override(["source.holdout=5"]).section_hash("source") != cfg.section_hash("source")
    with pytest.raises(ConfigError, match="source.holdout"):
        cfg.override(["eval.split=validation"]).validate()
    with pytest.raises(ConfigError, match="holdout must be >= 0"):
        cfg.override(["source.holdout=-1"]).validate()
    with pytest.raises(ConfigError, match="validation_fraction"):
        cfg.override(["eval.validation_fraction=1.5"]).validate()
    with pytest.raises(ConfigError, match="eval.split"):
        cfg.override(["eval.split=train"]).validate()
    ctx = prepare_run(cfg.override(["source.holdout=240"]), synthetic_npz.parent / "all-held",
                      progress=False)
    with pytest.raises(ValueError, match="leaves no training images"):
        _ = ctx.train_set


def test_validation_split_is_stratified_and_disjoint() -> None:
    x, y = make_images(200, classes=4, seed=3)
    train = ImageSet("d", torch.from_numpy(x)[:, None], torch.from_numpy(y), (0.0,), (1.0,), 4)
    test = ImageSet("d", torch.zeros(5, 1, 16, 16, dtype=torch.uint8), torch.zeros(5).long(), (0.0,),
                    (1.0,), 4)
    ds = validation_split(Downstream("d", train, test), 0.25, seed=1)
    assert len(ds.train) + len(ds.test) == 200
    assert not set(ds.train.source_index.tolist()) & set(ds.test.source_index.tolist())
    for c in range(4):
        n_c = int((train.labels == c).sum())
        assert int((ds.test.labels == c).sum()) == round(0.25 * n_c)
    assert torch.equal(validation_split(Downstream("d", train, test), 0.25, seed=1).test.images,
                       ds.test.images)
    tiny = ImageSet("t", train.images[:3], torch.tensor([0, 1, 1]), (0.0,), (1.0,), 2)
    with pytest.raises(ValueError, match="too few"):
        validation_split(Downstream("t", tiny, tiny), 0.25, seed=0)


def test_evaluation_on_the_validation_split_never_reads_a_test_set(held_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.npz"
    x, y = make_images(100, seed=5)
    np.savez(other, x_train=x, y_train=y, x_test=x[:10] * 0, y_test=y[:10])  # test split: all black
    ctx = _ctx(held_run, "eval.split=validation", f"eval.downstream=[{ctx_source(held_run)}, npz:{other}]",
               "eval.baselines=[random]")
    own, second = downstream_sets(ctx)
    assert torch.equal(own.test.images, ctx.validation_set.images)
    assert torch.equal(own.train.images, ctx.train_set.images)
    assert len(second.train) + len(second.test) == 100 and second.test.images.amax() > 0
    result = evaluate_run(ctx)
    assert result["protocol"]["split"] == "validation" and result["protocol"]["holdout"] == HOLDOUT
    assert all("fidelity_r2" in r for r in result["rows"])
    assert "(validation split)" in (held_run / "results.md").read_text()


def ctx_source(run: Path) -> str:
    return RunConfig.from_yaml(run / "config.yaml").source.name


def test_evaluate_cli_split(held_run: Path, synthetic_npz: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", str(held_run), "--split", "validation", "--baselines",
                               "none", "--out", str(tmp_path / "v"), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "v" / "results.json").read_text())["protocol"]["split"] == "validation"
    no_holdout = tmp_path / "no-holdout"
    no_holdout.mkdir()
    (no_holdout / "config.yaml").write_text(tiny_config(synthetic_npz).to_yaml())
    res = runner.invoke(main, ["evaluate", str(no_holdout), "--split", "validation", "-q"])
    assert res.exit_code != 0 and "source.holdout" in res.output
