"""``distill.batch_samples``: an iteration's K trajectory samples walked together (one vmapped
call per inner step) give each sample's own adjoint-walk gradients."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

import distilled_ssl.stages.distill.mkdt as distill_mod
from distilled_ssl.config import ConfigError, RunConfig
from distilled_ssl.io import load_tensors
from distilled_ssl.models.encoders import FlatParams, build_model
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.distill.common import distill_fingerprint
from distilled_ssl.stages.distill.compiled import CompiledSteps
from distilled_ssl.stages.distill.matching import match_adjoint, match_batched, minibatches
from distilled_ssl.stages.distill.objectives import outputs_loss


def _problem(k: int, dtype: torch.dtype = torch.float64) -> tuple:
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=3, image_size=8, output_dim=5, depth=2, width=4
                        ).to(dtype).train()
    flat = FlatParams(model)
    base = flat.flatten()
    starts = torch.stack([base + 0.05 * torch.randn_like(base) for _ in range(k)])
    ends = [s + 0.05 * torch.randn_like(s) for s in starts]
    images, reps = torch.randn(12, 3, 8, 8, dtype=dtype), torch.randn(12, 5, dtype=dtype)
    batches = [minibatches(12, 4, 5, torch.Generator().manual_seed(j)) for j in range(k)]
    return flat, starts, ends, images, reps, torch.tensor(0.1, dtype=dtype), batches


def _check(batched: list, flat: FlatParams, starts: torch.Tensor, ends: list, images: torch.Tensor,
           reps: torch.Tensor, lr: torch.Tensor, batches: list, image_grads: bool) -> None:
    assert len(batched) == len(starts)
    for j, got in enumerate(batched):
        want = match_adjoint(flat, starts[j], ends[j], images, reps, lr, batches[j], image_grads=image_grads)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)
        names = ("grad_images", "grad_targets", "grad_lr") if image_grads else ("grad_targets", "grad_lr")
        for name in names:
            ref = getattr(want, name)
            assert ref.abs().sum() > 0
            torch.testing.assert_close(getattr(got, name), ref, rtol=1e-9, atol=1e-12)
        if not image_grads:
            assert torch.equal(got.grad_images, torch.zeros_like(images))


def test_batched_walk_gives_each_sample_its_own_gradients() -> None:
    flat, starts, ends, images, reps, lr, batches = _problem(3)
    steps = CompiledSteps(flat, batched=True, compile=False)
    got = match_batched(steps, starts, ends, images, reps, lr, batches)
    _check(got, flat, starts, ends, images, reps, lr, batches, image_grads=True)


def test_batched_walk_scores_end_points_by_a_function_too() -> None:
    """Each sample its own outer loss (function-space matching), without image gradients."""
    flat, starts, ends, images, reps, lr, batches = _problem(2)
    x_real = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    outers = [outputs_loss(flat, x_real, starts[j], ends[j]) for j in range(2)]
    steps = CompiledSteps(flat, batched=True, compile=False, image_grads=False)
    got = match_batched(steps, starts, outers, images, reps, lr, batches)
    _check(got, flat, starts, outers, images, reps, lr, batches, image_grads=False)


def test_compiled_batched_walk_gives_the_eager_gradients() -> None:
    flat, starts, ends, images, reps, lr, batches = _problem(2)
    got = match_batched(CompiledSteps(flat, batched=True), starts, ends, images, reps, lr, batches)
    _check(got, flat, starts, ends, images, reps, lr, batches, image_grads=True)


def test_mismatched_samples_are_refused() -> None:
    flat, starts, ends, images, reps, lr, batches = _problem(2)
    steps = CompiledSteps(flat, batched=True, compile=False)
    with pytest.raises(ValueError, match="one start, end point and minibatch list per sample"):
        match_batched(steps, starts, ends[:1], images, reps, lr, batches)
    with pytest.raises(ValueError, match="the same number of minibatches"):
        match_batched(steps, starts, ends, images, reps, lr, [batches[0], batches[1][:3]])


def test_config_refuses_what_cannot_work(tiny_cfg: RunConfig) -> None:
    ok = ["distill.batch_samples=true", "distill.compile=true", "distill.samples_per_iteration=2"]
    tiny_cfg.override(ok).validate()
    for drop, match in [(1, "needs distill.compile=true"), (2, "samples_per_iteration to 2 or more")]:
        with pytest.raises(ConfigError, match=match):
            tiny_cfg.override([o for i, o in enumerate(ok) if i != drop]).validate()
    with pytest.raises(ConfigError, match="plain SGD inner steps only"):
        tiny_cfg.override([*ok, "distill.inner_momentum=0.5"]).validate()


def test_a_batched_run_makes_the_sequential_runs_set(tiny_cfg: RunConfig, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The same draws (starts, minibatches) per sample: the set equals the one-by-one run's up to
    float rounding, and the two runs share a fingerprint (one can resume the other)."""
    monkeypatch.setattr(distill_mod, "CompiledSteps", partial(CompiledSteps, compile=False))
    walks: list[int] = []
    real = distill_mod.match_batched
    monkeypatch.setattr(distill_mod, "match_batched",
                        lambda steps, theta0, *a: walks.append(len(theta0)) or real(steps, theta0, *a))
    common = ["distill.iterations=3", "distill.compile=true", "distill.samples_per_iteration=3"]
    out = {}
    for name, extra in (("seq", []), ("vmap", ["distill.batch_samples=true"])):
        ctx = prepare_run(tiny_cfg.override([*common, *extra]), tmp_path / name, progress=False)
        run_pipeline(ctx, stages=["teacher", "targets", "experts", "init", "distill"])
        out[name] = (load_tensors(ctx.path("distill_state.safetensors"))[0], distill_fingerprint(ctx))
    assert walks == [3, 3, 3]  # the batched run: one walk of all three samples per iteration
    (seq, fp_seq), (vm, fp_vm) = out["seq"], out["vmap"]
    assert fp_seq == fp_vm
    reps = load_tensors(tmp_path / "seq" / "targets.safetensors")[0]["target_reps"]
    start = reps[load_tensors(tmp_path / "seq" / "init.safetensors")[0]["indices"]]
    assert (seq["targets"] - start).abs().max() > 1e-4  # matching moved them: the check below bites
    for name in ("images", "targets", "lr"):
        torch.testing.assert_close(vm[name], seq[name], rtol=1e-4, atol=1e-5)


def test_batched_bf16_agrees_with_fp32() -> None:
    flat, starts, ends, images, reps, lr, batches = _problem(2, torch.float32)
    steps = CompiledSteps(flat, batched=True, compile=False, precision="bf16")
    for j, got in enumerate(match_batched(steps, starts, ends, images, reps, lr, batches)):
        exact = match_adjoint(flat, starts[j], ends[j], images, reps, lr, batches[j])
        assert got.grad_targets.dtype == torch.float32
        a, b = got.grad_targets.flatten(), exact.grad_targets.flatten()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
        assert cos > 0.99 and not torch.equal(got.grad_targets, exact.grad_targets)  # it ran in bf16
