"""Shared fixtures: a tiny synthetic image set and a config that runs the pipeline in seconds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distilled_ssl.config import ModelConfig, RunConfig
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.context import RunContext

pytest_plugins = ["hub_fixtures"]  # loopback Hub server, socket guard, isolated HF_HOME


def ctrl_c_at_call(n: int, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, except that its n-th call raises KeyboardInterrupt (a Ctrl-C mid-run)."""
    calls = [0]

    def wrapped(*args: object, **kwargs: object) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped


def same_artifact(a: Path, b: Path) -> bool:
    """Same tensors (bit for bit) and same metadata (safetensors may order its header freely)."""
    from distilled_ssl.io import load_tensors

    ta, ma = load_tensors(a)
    tb, mb = load_tensors(b)
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def make_images(n: int, size: int = 16, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, size, size] images: one bright square per class position, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 60, (n, size, size)).astype(np.float64)
    half = size // 2
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 2)
        images[i, r * half:(r + 1) * half, col * half:(col + 1) * half] += 150 + rng.normal(0, 20)
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="session")
def synthetic_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An .npz source with 240 train and 80 test images (16x16, one channel, 4 classes)."""
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    x, y = make_images(240, seed=0)
    xt, yt = make_images(80, seed=1)
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return path


def tiny_config(npz: Path) -> RunConfig:
    """Every stage in a second or two on the synthetic set."""
    cfg = RunConfig()
    cfg.device = "cpu"
    cfg.source.name = f"npz:{npz}"
    cfg.teacher.model = ModelConfig("convnet", {"depth": 2, "width": 4, "pooling": "gap", "norm": "batch"})
    cfg.teacher.epochs = 3
    cfg.teacher.batch_size = 60
    cfg.teacher.warmup_epochs = 0
    cfg.teacher.lr = 3e-2
    cfg.teacher.projector = [16, 16]
    cfg.student = ModelConfig("convnet", {"depth": 2, "width": 4})
    cfg.experts.num_experts = 2
    cfg.experts.epochs = 2
    cfg.experts.batch_size = 40
    cfg.experts.checkpoint_every_steps = 2
    cfg.init.num_images = 12
    cfg.init.class_balanced = True
    d = cfg.distill
    d.iterations, d.syn_steps, d.batch_syn = 4, 3, 6
    d.expert_epochs, d.max_start_epoch = 0.5, 1.0
    d.lr_img, d.lr_targets, d.lr_lr = 100.0, 10.0, 1e-4
    d.checkpoint_every, d.log_every = 2, 2
    cfg.eval.epochs, cfg.eval.batch_size, cfg.eval.label_fractions = 2, 6, [0.25]
    return cfg


@pytest.fixture
def tiny_cfg(synthetic_npz: Path) -> RunConfig:
    return tiny_config(synthetic_npz)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, synthetic_npz: Path) -> RunContext:
    """One complete tiny run (stages 1-5) shared by the read-only stage and pipeline tests."""
    ctx = prepare_run(tiny_config(synthetic_npz), tmp_path_factory.mktemp("run"), progress=False)
    run_pipeline(ctx)
    return ctx


@pytest.fixture(scope="session")
def eval_run(synthetic_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another complete tiny run, for the evaluation tests (which rewrite its config.yaml)."""
    ctx = prepare_run(tiny_config(synthetic_npz), tmp_path_factory.mktemp("eval") / "run", progress=False)
    run_pipeline(ctx)
    return ctx.run_dir


def eval_context(run: Path, **eval_fields: object) -> RunContext:
    """The run's context with some ``eval.*`` fields changed (written to its config.yaml)."""
    cfg = RunConfig.from_yaml(run / "config.yaml")
    for k, v in eval_fields.items():
        setattr(cfg.eval, k, v)
    return prepare_run(cfg.validate(), run, progress=False)
