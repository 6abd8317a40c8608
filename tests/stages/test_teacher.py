"""Stage 1: a trained teacher's loss and probe; load mode with our teacher files, bare state dicts and
torchvision models."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distilled_ssl.config import ModelConfig, RunConfig
from distilled_ssl.io import ArtifactError, read_metadata
from distilled_ssl.models.encoders import build_model
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.teacher import load_teacher


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
    from distilled_ssl.io import load_tensors

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
    pickle.write_bytes(b"not read")
    ctx = prepare_run(_load_cfg(tiny_cfg, pickle, model), tmp_path / "b", progress=False)
    with pytest.raises(ArtifactError, match="must be a .safetensors file"):
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
