"""``distill.match_space: outputs``: MKDT's expert span matched in function space (the student's
outputs on real images against the expert's end point's) instead of parameter space."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distilled_ssl.stages.distill.objectives as objectives_mod
from distilled_ssl.config import ConfigError, RunConfig
from distilled_ssl.io import load_tensors
from distilled_ssl.models.encoders import FlatParams, build_model
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.distill.common import distill_fingerprint
from distilled_ssl.stages.distill.matching import match_adjoint, match_unrolled, minibatches
from distilled_ssl.stages.distill.objectives import outputs_loss

OUT = ["distill.match_space=outputs", "distill.real_batch=48"]


def _problem(dtype: torch.dtype = torch.float64) -> tuple:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, image_size=12, output_dim=5, depth=2, width=6
                        ).to(dtype).train()
    flat = FlatParams(model)
    start = flat.flatten()
    target = start + 0.05 * torch.randn_like(start)
    images, reps = torch.randn(10, 1, 12, 12, dtype=dtype), torch.randn(10, 5, dtype=dtype)
    x_real = torch.randn(16, 1, 12, 12, dtype=dtype)
    batches = minibatches(10, 4, 6, torch.Generator().manual_seed(1))
    return flat, start, target, images, reps, x_real, batches


def test_outputs_loss_is_one_at_the_start_and_zero_at_the_target() -> None:
    flat, start, target, _, _, x, _ = _problem()
    outer = outputs_loss(flat, x, start, target)
    torch.testing.assert_close(outer(start), torch.tensor(1.0, dtype=torch.float64))
    assert float(outer(target)) == 0.0
    mid = 0.5 * (start + target)
    with torch.no_grad():
        end = flat.call(target, x)
        want = (flat.call(mid, x) - end).pow(2).sum() / (flat.call(start, x) - end).pow(2).sum()
    torch.testing.assert_close(outer(mid), want)
    assert 0 < float(want) < 1  # halfway in weights is part of the way in function space
    with pytest.raises(ConfigError, match="expert_epochs"):
        outputs_loss(flat, x, start, start.clone())


def test_adjoint_gradients_of_the_outputs_match_equal_unrolled() -> None:
    flat, start, target, images, reps, x, batches = _problem()
    outer, lr = outputs_loss(flat, x, start, target), torch.tensor(0.05, dtype=torch.float64)
    a = match_adjoint(flat, start, outer, images, reps, lr, batches)
    u = match_unrolled(flat, start, outer, images, reps, lr, batches)
    torch.testing.assert_close(a.loss, u.loss, rtol=1e-12, atol=0)
    for name in ("grad_images", "grad_targets", "grad_lr"):
        ga, gu = getattr(a, name), getattr(u, name)
        assert gu.abs().sum() > 0
        torch.testing.assert_close(ga, gu, rtol=1e-9, atol=1e-12)


def test_config_refuses_what_cannot_work(tiny_cfg: RunConfig) -> None:
    with pytest.raises(ConfigError, match="distill.match_space must be one of"):
        tiny_cfg.override(["distill.match_space=logits"]).validate()
    for method in ("fidelity", "krr_st"):
        with pytest.raises(ConfigError, match="matches no experts"):
            tiny_cfg.override([*OUT, f"distill.method={method}", "init.method=random"]).validate()


def test_a_run_matches_outputs_on_seeded_real_batches(tiny_cfg: RunConfig, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real_loss = objectives_mod.outputs_loss

    def spy(flat, x, start, target, precision="fp32"):  # type: ignore[no-untyped-def]
        calls.append((len(x), x.shape[1]))
        return real_loss(flat, x, start, target, precision)

    monkeypatch.setattr(objectives_mod, "outputs_loss", spy)
    cfg = tiny_cfg.override([*OUT, "distill.iterations=4"])
    ctx = prepare_run(cfg, tmp_path / "out", progress=False)
    run_pipeline(ctx)
    assert calls == [(48, 1)] * 4
    log = ctx.path("run.log").read_text()
    assert "matched on the outputs of 48 real images" in log
    tensors, meta = load_tensors(ctx.path("distilled.safetensors"))
    assert meta["real_batch"] == 48 and meta["num_experts"] >= 1
    history = meta["matching_loss"]
    assert 0 < history["first"] < 2  # normalised by the span's own change of outputs
    # the same run in parameter space is another set
    plain = prepare_run(tiny_cfg.override(["distill.iterations=4"]), tmp_path / "plain", progress=False)
    run_pipeline(plain)
    other = load_tensors(plain.path("distilled.safetensors"))[0]
    assert not torch.equal(other["targets"], tensors["targets"])


def test_real_batch_is_in_the_fingerprint_when_outputs_are_matched(tiny_cfg: RunConfig,
                                                                    tmp_path: Path) -> None:
    def fp(overrides: list[str]) -> str:
        ctx = prepare_run(tiny_cfg.override(overrides), tmp_path / "x", progress=False)
        run_pipeline(ctx, stages=["teacher", "targets", "experts", "init"])
        return distill_fingerprint(ctx)

    assert fp([]) == fp(["distill.real_batch=32"]) == fp(["distill.match_space=params"])
    assert fp(OUT) != fp([]) and fp(OUT) != fp([*OUT[:1], "distill.real_batch=32"])
