"""Stage 1: a trained teacher's loss and probe (Barlow Twins, SimCLR); load mode with our teacher files,
bare state dicts, torchvision and timm models, and a teacher whose input differs from the source's."""

import argparse
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images
from safetensors.torch import save_file

from distilled_ssl.config import ModelConfig, RunConfig
from distilled_ssl.errors import CheckpointRefusedError
from distilled_ssl.io import ArtifactError, load_tensors, read_metadata
from distilled_ssl.models.encoders import build_model
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.teacher import load_teacher, teacher_fingerprint


def _load_cfg(cfg: RunConfig, weights: Path, model: ModelConfig) -> RunConfig:
    cfg.teacher.mode = "load"
    cfg.teacher.weights = str(weights)
    cfg.teacher.model = model
    return cfg


def test_bare_state_dict_is_loaded_with_the_source_normalisation(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    model = ModelConfig("convnet", {"depth": 2, "width": 4, "pooling": "gap"})
    net = build_model("convnet", in_channels=1, image_size=16, **model.kwargs)
    path = tmp_path / "w.safetensors"
    save_file(net.state_dict(), str(path))
    ctx = prepare_run(_load_cfg(tiny_cfg, path, model), tmp_path / "run", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets"])
    loaded, meta = load_teacher(ctx.path("teacher.safetensors"))
    assert meta["mean"] == list(ctx.train_set.mean) and meta["loaded_from"] == str(path)
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_torchvision_model_with_a_weights_file(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "r18.safetensors"
    save_file(net.state_dict(), str(path))  # fc.* is ignored: the classifier is removed
    cfg = _load_cfg(tiny_cfg, path, ModelConfig("torchvision:resnet18", {}))
    cfg.teacher.probe = False
    ctx = prepare_run(cfg, tmp_path / "run", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets"])
    assert read_metadata(ctx.path("targets.safetensors"))["teacher_arch"] == "torchvision:resnet18"
    assert load_tensors(ctx.path("targets.safetensors"))[0]["target_reps"].shape == (240, 512)


def test_weights_that_do_not_fit_or_are_pickles_are_refused(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    model = ModelConfig("convnet", {"depth": 2, "width": 4, "pooling": "gap"})
    wrong = build_model("convnet", in_channels=1, image_size=16, depth=2, width=6, pooling="gap")
    path = tmp_path / "w.safetensors"
    save_file(wrong.state_dict(), str(path))
    ctx = prepare_run(_load_cfg(tiny_cfg, path, model), tmp_path / "a", progress=False)
    with pytest.raises(ArtifactError, match="does not fit"):
        run_pipeline(ctx, stages=["teacher"])
    pickle = tmp_path / "w.pt"
    torch.save({"state_dict": wrong.state_dict(), "args": argparse.Namespace(lr=0.1)}, pickle)
    ctx = prepare_run(_load_cfg(tiny_cfg, pickle, model), tmp_path / "b", progress=False)
    with pytest.raises(CheckpointRefusedError, match=r"argparse\.Namespace.*weights_only=True"):
        run_pipeline(ctx, stages=["teacher"])
    ctx = prepare_run(_load_cfg(tiny_cfg, tmp_path / "missing.safetensors", model), tmp_path / "c",
                      progress=False)
    with pytest.raises(ArtifactError, match="do not exist"):
        run_pipeline(ctx, stages=["teacher"])


def test_teacher_loss_goes_down_and_probe_is_reported(finished_run: RunContext) -> None:
    meta = read_metadata(finished_run.path("teacher.safetensors"))
    losses = meta["trained"]["epoch_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert 0.25 < meta["probe_accuracy"] <= 1.0  # 4 balanced classes: above chance
    assert meta["arch"] == "convnet" and meta["feature_dim"] == 4


def test_trained_barlow_twins_records_and_fingerprints_read_as_before(finished_run: RunContext) -> None:
    cfg = finished_run.cfg
    trained = read_metadata(finished_run.path("teacher.safetensors"))["trained"]
    assert not {"method", "temperature", "checkpoint", "key_map", "input"} & set(trained)
    new_fields = ("method", "temperature", "checkpoint", "key_map", "input")
    old_teacher = {k: v for k, v in asdict(cfg.teacher).items() if k not in new_fields}
    old_source = {k: v for k, v in asdict(cfg.source).items() if k != "holdout"}
    blob = json.dumps({"source": old_source, "teacher": old_teacher}, sort_keys=True)
    assert cfg.section_hash("source", "teacher") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    other = RunConfig.from_dict(cfg.to_dict())
    other.teacher.method = "simclr"
    assert other.section_hash("source", "teacher") != cfg.section_hash("source", "teacher")


def test_simclr_teacher_trains(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    tiny_cfg.teacher.method = "simclr"
    tiny_cfg.teacher.probe = False
    ctx = prepare_run(tiny_cfg, tmp_path / "run", progress=False)
    run_pipeline(ctx, stages=["teacher"])
    trained = read_metadata(ctx.path("teacher.safetensors"))["trained"]
    assert trained["method"] == "simclr" and trained["temperature"] == 0.5
    assert "lambda_offdiag" not in trained
    losses = trained["epoch_losses"]
    assert losses[-1] < losses[0] < np.log(2 * 60 - 1) + 0.5  # NT-Xent starts near log(2n - 1)


@pytest.fixture(scope="module")
def grey28_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grey28") / "grey28.npz"
    x, y = make_images(120, size=28, seed=0)
    xt, yt = make_images(40, size=28, seed=1)
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return path


def test_an_rgb_224_teacher_distils_a_grey_28px_source(grey28_npz: Path, tmp_path: Path) -> None:
    import torchvision

    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    weights = tmp_path / "mnv3.pth"
    torch.save(net.state_dict(), weights)
    cfg = RunConfig.from_dict({**_tiny(grey28_npz), "teacher": {
        "mode": "load", "weights": "torchvision:mobilenet_v3_small", "checkpoint": str(weights),
        "probe": False}})
    ctx = prepare_run(cfg, tmp_path / "run", progress=False)
    run_pipeline(ctx)  # stages 1-5, no user code
    meta = read_metadata(ctx.path("teacher.safetensors"))
    assert meta["input"]["size"] == 224 and meta["adapt_input"] and meta["in_channels"] == 1
    assert meta["provenance"]["weights_sha256"] and meta["provenance"]["spec"] == cfg.teacher.weights
    reps = load_tensors(ctx.path("targets.safetensors"))[0]["target_reps"]
    assert reps.shape == (120, 576)
    pixels = ctx.train_set.images[:3].float() / 255  # what the teacher sees: RGB, 224px, ImageNet stats
    rgb = torch.nn.functional.interpolate(pixels.expand(-1, 3, -1, -1), size=(224, 224), mode="bilinear",
                                          antialias=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    net.classifier = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(reps[:3], net.eval()((rgb - mean) / std), atol=2e-4, rtol=1e-3)
    distilled = load_tensors(ctx.path("distilled.safetensors"))[0]
    assert distilled["images"].shape[1:] == (1, 28, 28)  # the student trains on the source's images
    assert distilled["targets"].shape[1] == 576


def test_the_pipeline_runs_with_a_timm_teacher_end_to_end(grey28_npz: Path, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    weights = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(weights))
    cfg = RunConfig.from_dict({**_tiny(grey28_npz), "teacher": {
        "mode": "load", "weights": "timm:test_resnet", "checkpoint": str(weights)}})
    ctx = prepare_run(cfg, tmp_path / "run", progress=False)
    run_pipeline(ctx, evaluate=True)
    meta = read_metadata(ctx.path("teacher.safetensors"))
    assert meta["arch"] == "timm:test_resnet" and meta["input"]["size"] == 160
    assert 0 <= meta["probe_accuracy"] <= 1
    assert ctx.path("results.json").exists()
    again = prepare_run(cfg, tmp_path / "run", progress=False)  # resumes: every artifact is reused
    assert teacher_fingerprint(again) == meta["fingerprint"]
    run_pipeline(again, stages=["teacher", "targets"])


def _tiny(npz: Path) -> dict:
    from conftest import tiny_config

    d = tiny_config(npz).to_dict()
    d["experts"]["batch_size"] = 30
    d["targets"]["batch_size"] = 40
    return d
