"""``distill.inner_momentum``: heavy-ball inner steps (as the evaluation trains), with exact gradients
in the unrolled reference, the adjoint walk (eager, kept graphs, compiled) and for both objectives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distilled_ssl.config import ConfigError, RunConfig
from distilled_ssl.io import read_metadata
from distilled_ssl.models.encoders import FlatParams, build_model
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.distill.common import distill_fingerprint
from distilled_ssl.stages.distill.compiled import CompiledSteps
from distilled_ssl.stages.distill.matching import match_adjoint, match_unrolled, minibatches
from distilled_ssl.stages.distill.objectives import fidelity_loss

NAMES = ("grad_images", "grad_targets", "grad_lr")


def _problem(arch: str = "convnet", **kwargs: object) -> tuple:
    torch.manual_seed(0)
    kwargs = kwargs or {"depth": 2, "width": 4}
    model = build_model(arch, in_channels=1, image_size=12, output_dim=5, **kwargs).double().train()
    flat = FlatParams(model)
    theta0 = flat.flatten()
    target = theta0 + 0.05 * torch.randn_like(theta0)
    images = torch.randn(10, 1, 12, 12, dtype=torch.float64)
    reps = torch.randn(10, 5, dtype=torch.float64)
    batches = minibatches(10, 4, 6, torch.Generator().manual_seed(1))
    return flat, theta0, target, images, reps, torch.tensor(0.05, dtype=torch.float64), batches


def _assert_same_gradients(a, u) -> None:
    torch.testing.assert_close(a.loss, u.loss, rtol=1e-12, atol=0)
    for name in NAMES:
        ref = getattr(u, name)
        assert ref.abs().sum() > 0
        torch.testing.assert_close(getattr(a, name), ref, rtol=1e-9, atol=1e-12)


def test_the_reference_steps_are_torch_heavy_ball_sgd() -> None:
    """The unrolled loop's end point is where ``torch.optim.SGD(momentum=mu)`` takes the student."""
    flat, theta0, target, images, reps, lr, batches = _problem()
    model = flat.model
    opt = torch.optim.SGD(model.parameters(), lr=float(lr), momentum=0.9)
    for idx in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(images[idx]), reps[idx]).backward()
        opt.step()
    theta_n = flat.flatten().detach()
    expected = (theta_n - target).pow(2).sum() / (theta0 - target).pow(2).sum()
    got = match_unrolled(flat, theta0, target, images, reps, lr, batches, momentum=0.9).loss
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    plain = match_unrolled(flat, theta0, target, images, reps, lr, batches).loss
    assert abs(float(plain - got)) > 1e-3  # momentum changes the end point


def test_the_reference_lr_gradient_is_the_finite_difference() -> None:
    flat, theta0, target, images, reps, lr, batches = _problem()
    res = match_unrolled(flat, theta0, target, images, reps, lr, batches, momentum=0.9)
    eps = 1e-6
    up, down = (match_unrolled(flat, theta0, target, images, reps, lr + s, batches, momentum=0.9).loss
                for s in (eps, -eps))
    torch.testing.assert_close(res.grad_lr, (up - down) / (2 * eps), rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch, kwargs", [
    ("convnet", {"depth": 2, "width": 4, "norm": "instance"}),
    ("resnet10", {"width": 0.0625}),  # batch norm (batch statistics)
])
@pytest.mark.parametrize("keep", [0, 3])
def test_adjoint_walk_equals_unrolled(arch: str, kwargs: dict, keep: int) -> None:
    args = _problem(arch, **kwargs)
    a = match_adjoint(*args, momentum=0.9, keep_graphs=keep)
    _assert_same_gradients(a, match_unrolled(*args, momentum=0.9))


def test_adjoint_walk_equals_unrolled_for_a_loss_of_theta_n() -> None:
    """``distill.method: fidelity`` with heavy-ball inner steps."""
    flat, theta0, _, images, reps, lr, batches = _problem()
    x_real, y_real = torch.randn(16, 1, 12, 12, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64)
    outer = fidelity_loss(flat, x_real, y_real)
    a = match_adjoint(flat, theta0, outer, images, reps, lr, batches, momentum=0.5)
    _assert_same_gradients(a, match_unrolled(flat, theta0, outer, images, reps, lr, batches, momentum=0.5))


def test_without_image_grads_targets_and_lr_are_unchanged() -> None:
    args = _problem()
    full = match_adjoint(*args, momentum=0.9)
    lean = match_adjoint(*args, momentum=0.9, image_grads=False)
    assert torch.equal(lean.grad_images, torch.zeros_like(full.grad_images))
    for name in ("grad_targets", "grad_lr"):
        torch.testing.assert_close(getattr(lean, name), getattr(full, name), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("image_grads", [True, False])
def test_compiled_walk_equals_the_eager_one(image_grads: bool) -> None:
    args = _problem()
    eager = match_adjoint(*args, momentum=0.9, image_grads=image_grads)
    fast = match_adjoint(*args, momentum=0.9, image_grads=image_grads,
                         steps=CompiledSteps(args[0], image_grads=image_grads))
    torch.testing.assert_close(fast.loss, eager.loss, rtol=1e-12, atol=0)
    for name in NAMES if image_grads else NAMES[1:]:
        torch.testing.assert_close(getattr(fast, name), getattr(eager, name), rtol=1e-9, atol=1e-12)


def test_a_step_against_the_gradient_lowers_the_matching_loss() -> None:
    flat, theta0, target, images, reps, lr, batches = _problem()
    res = match_adjoint(flat, theta0, target, images, reps, lr, batches, momentum=0.9)
    step = 1e-3 / float(res.grad_targets.norm())
    moved = match_adjoint(flat, theta0, target, images, reps - step * res.grad_targets, lr, batches,
                          momentum=0.9)
    assert moved.loss < res.loss


def test_config_is_checked_and_fingerprinted(tiny_cfg: RunConfig) -> None:
    for bad in ("distill.inner_momentum=1.0", "distill.inner_momentum=-0.1"):
        with pytest.raises(ConfigError, match=r"distill.inner_momentum must be in \[0, 1\)"):
            tiny_cfg.override([bad]).validate()
    with pytest.raises(ConfigError, match="KRR-ST has none"):
        tiny_cfg.override(["distill.method=krr_st", "distill.inner_momentum=0.9"]).validate()
    # unset, the fingerprints of earlier runs stay as they were; set, it is a different run
    assert "inner_momentum" not in tiny_cfg.hashed_dict()["distill"]
    assert tiny_cfg.override(["distill.inner_momentum=0.9"]).hashed_dict()["distill"]["inner_momentum"] == 0.9


def test_a_run_with_heavy_ball_inner_steps(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    plain = prepare_run(tiny_cfg, tmp_path / "plain", progress=False)
    heavy = prepare_run(tiny_cfg.override(["distill.inner_momentum=0.9", "distill.lr_init=0.01"]),
                        tmp_path / "heavy", progress=False)
    run_pipeline(plain)
    run_pipeline(heavy)
    assert distill_fingerprint(plain) != distill_fingerprint(heavy)
    a, b = (read_metadata(c.path("distilled.safetensors")) for c in (plain, heavy))
    assert a["matching_loss"] != b["matching_loss"]
    assert b["iterations"] == a["iterations"]
    assert "syn_steps 3 (heavy-ball, momentum 0.9)" in heavy.path("run.log").read_text()
    assert "heavy-ball" not in plain.path("run.log").read_text()
