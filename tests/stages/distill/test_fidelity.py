"""``distill.method: fidelity``: the set optimised for the outcome of a short KD training on it
(a fresh student trained on the set, scored by 1 - R^2 against the teacher's reps of real images)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ctrl_c_at_call, same_artifact

import distilled_ssl.stages.distill.mkdt as distill_mod
from distilled_ssl.config import ConfigError, RunConfig
from distilled_ssl.io import load_tensors, read_metadata
from distilled_ssl.models.encoders import FlatParams, build_model
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.sets.dataset import DistilledDataset
from distilled_ssl.stages.distill import run_distill
from distilled_ssl.stages.distill.common import distill_fingerprint
from distilled_ssl.stages.distill.matching import match_adjoint, match_unrolled, minibatches
from distilled_ssl.stages.distill.objectives import fidelity_loss

# the tiny teacher's reps vary by ~0.02: 1 - R^2 and its gradients are large, so are the steps
FID = ["distill.method=fidelity", "init.method=random", "teacher.epochs=1", "distill.real_batch=64",
       "distill.lr_init=0.3", "distill.lr_targets=1e-4", "distill.lr_img=0.1", "distill.lr_lr=1e-6"]


def _problem(dtype: torch.dtype = torch.float64) -> tuple:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, image_size=12, output_dim=5, depth=2, width=6
                        ).to(dtype).train()
    flat = FlatParams(model)
    images, reps = torch.randn(10, 1, 12, 12, dtype=dtype), torch.randn(10, 5, dtype=dtype)
    x_real, y_real = torch.randn(16, 1, 12, 12, dtype=dtype), torch.randn(16, 5, dtype=dtype)
    batches = minibatches(10, 4, 6, torch.Generator().manual_seed(1))
    return flat, images, reps, fidelity_loss(flat, x_real, y_real), batches, (x_real, y_real)


def test_fidelity_loss_is_one_minus_r2() -> None:
    flat, _, _, outer, _, (x, y) = _problem()
    theta = flat.flatten()
    with torch.no_grad():
        pred = flat.call(theta, x)
    r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    torch.testing.assert_close(outer(theta), 1 - r2)
    with pytest.raises(ConfigError, match="real_batch"):
        fidelity_loss(flat, x, torch.ones_like(y))


def test_adjoint_gradients_of_the_fidelity_equal_unrolled() -> None:
    """The constant-memory walk gives the exact gradients for a loss of theta_N too."""
    flat, images, reps, outer, batches, _ = _problem()
    theta0, lr = flat.flatten(), torch.tensor(0.05, dtype=torch.float64)
    a = match_adjoint(flat, theta0, outer, images, reps, lr, batches)
    u = match_unrolled(flat, theta0, outer, images, reps, lr, batches)
    torch.testing.assert_close(a.loss, u.loss, rtol=1e-12, atol=0)
    for name in ("grad_images", "grad_targets", "grad_lr"):
        ga, gu = getattr(a, name), getattr(u, name)
        assert gu.abs().sum() > 0
        torch.testing.assert_close(ga, gu, rtol=1e-9, atol=1e-12)
    # and a small step against the targets' gradient lowers the loss
    step = 1e-3 / float(a.grad_targets.norm())
    moved = match_adjoint(flat, theta0, outer, images, reps - step * a.grad_targets, lr, batches)
    assert moved.loss < a.loss


def test_fidelity_end_to_end_without_experts(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    ctx = prepare_run(tiny_cfg.override([*FID, "distill.iterations=6"]), tmp_path, progress=False)
    rng_before = torch.get_rng_state()
    run_pipeline(ctx)
    assert torch.equal(torch.get_rng_state(), rng_before)  # fresh students leave the global RNG alone
    log = ctx.path("run.log").read_text()
    assert "experts: skipped: distill.method=fidelity" in log and "fresh convnet students" in log
    assert "distill 6/6: fidelity loss (1 - R^2 on real images) " in log
    assert not ctx.path("experts").exists()
    tensors, meta = load_tensors(ctx.path("distilled.safetensors"))
    assert meta["method"] == "fidelity" and meta["iterations"] == 6 and meta["real_batch"] == 64
    assert "num_experts" not in meta and "matching_loss" not in meta and meta["fidelity_loss"]["first"] > 0
    reps = load_tensors(ctx.path("targets.safetensors"))[0]["target_reps"]
    assert (tensors["targets"] - reps[tensors["source_index"]]).abs().max() > 1e-4  # targets learned
    ds = DistilledDataset.from_run(ctx.run_dir, image_format="tensor")
    assert len(ds) == 12 and ds.metadata["method"] == "fidelity"


def test_fidelity_loss_goes_down(tiny_cfg: RunConfig, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One fresh student and one real batch for every iteration: the same bilevel problem, so the
    outer loss must fall."""
    cfg = tiny_cfg.override([*FID, "distill.iterations=12", "distill.lr_targets=1e-3",
                             "distill.lr_img=1", "distill.real_batch=240", "distill.syn_steps=6"])
    ctx = prepare_run(cfg, tmp_path, progress=False)
    fresh = distill_mod.FreshStudents.__call__
    monkeypatch.setattr(distill_mod.FreshStudents, "__call__",
                        lambda self, it, j, g, dev: fresh(self, 0, 0, g, dev))
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init", "distill"])
    history = read_metadata(ctx.path("distill_state.safetensors"))["history"]
    assert len(history) == 12
    assert sum(history[-3:]) / 3 < 0.9 * sum(history[:3]) / 3


def test_fidelity_resumes_bit_for_bit(tiny_cfg: RunConfig, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg.override([*FID, "distill.iterations=6"])
    ref = prepare_run(cfg, tmp_path / "ref", progress=False)
    run_pipeline(ref)
    ctx = prepare_run(cfg, tmp_path / "cut", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init"])
    real = distill_mod.MATCHERS["adjoint"]
    monkeypatch.setattr(distill_mod, "MATCHERS", {"adjoint": ctrl_c_at_call(5, real)})
    with pytest.raises(KeyboardInterrupt):
        run_distill(ctx)
    assert read_metadata(ctx.path("distill_state.safetensors"))["iteration"] == 4
    monkeypatch.setattr(distill_mod, "MATCHERS", {"adjoint": real})
    run_distill(ctx)
    for name in ("distilled.safetensors", "distill_state.safetensors"):
        assert same_artifact(ctx.path(name), ref.path(name)), name


def test_real_batch_is_in_the_fingerprint_of_fidelity_only(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    def fp(overrides: list[str]) -> str:
        ctx = prepare_run(tiny_cfg.override(overrides), tmp_path / "x", progress=False)
        run_pipeline(ctx, stages=["teacher", "targets", "experts", "init"])
        return distill_fingerprint(ctx)

    plain = ["init.method=random", "teacher.epochs=1"]
    assert fp(plain) == fp([*plain, "distill.real_batch=32"])
    assert fp(FID) != fp([*FID, "distill.real_batch=32"])
    with pytest.raises(ConfigError, match="distill.real_batch"):
        tiny_cfg.override([*FID, "distill.real_batch=0"]).validate()


def test_experts_are_needed_by_mkdt_and_the_high_loss_init_only(tiny_cfg: RunConfig) -> None:
    needs = {(m, i): tiny_cfg.override([f"distill.method={m}", f"init.method={i}"]).needs_experts
             for m in ("mkdt", "krr_st", "fidelity") for i in ("random", "kmeans", "high_loss")}
    assert needs == {(m, i): m == "mkdt" or i == "high_loss" for m, i in needs}
