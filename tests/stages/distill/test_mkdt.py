"""Stage 5 by MKDT: the distilled set, resume and extension, the matching loss going down."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ctrl_c_at_call

import distilled_ssl.stages.distill.mkdt as distill_mod
from distilled_ssl.config import RunConfig
from distilled_ssl.io import load_tensors, read_metadata
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.distill import run_distill


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


def test_distill_resumes_after_interrupt_and_extends(tiny_cfg: RunConfig, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg.override(["distill.iterations=6"])
    ref = prepare_run(cfg, tmp_path / "ref", progress=False)
    run_pipeline(ref)
    ref_images = load_tensors(ref.path("distilled.safetensors"))[0]["images"]

    ctx = prepare_run(cfg, tmp_path / "cut", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init"])
    real = distill_mod.MATCHERS["adjoint"]
    monkeypatch.setattr(distill_mod, "MATCHERS", {"adjoint": ctrl_c_at_call(5, real)})
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


def test_start_window_moves_later_as_configured(tiny_cfg: RunConfig, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``min_start_epoch`` / ``max_start_epoch_end`` (DATM): every start drawn lies in the window of
    its iteration, and the later checkpoints come into play once the window has grown."""
    # 240 images, batch 40, a checkpoint every 2 steps: 3 checkpoints per epoch; span 0.5 -> 2
    cfg = tiny_cfg.override(["distill.min_start_epoch=0.5", "distill.max_start_epoch_end=1.5",
                             "distill.start_window_iterations=6", "distill.iterations=14"])
    windows = distill_mod.StartWindows(cfg.distill, 3.0)
    assert [windows(i) for i in (0, 1, 2, 6, 14)] == [(2, 3), (2, 3), (2, 4), (2, 4), (2, 4)]
    ctx = prepare_run(cfg, tmp_path, progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init"])
    starts: list[int] = []
    params = distill_mod.ExpertFile.params

    def record(self: distill_mod.ExpertFile, *rows: int) -> torch.Tensor:
        if len(rows) == 2:  # a trajectory sample: (start, start + span)
            starts.append(rows[0])
            assert rows[1] == rows[0] + 2
        return params(self, *rows)

    monkeypatch.setattr(distill_mod.ExpertFile, "params", record)
    run_distill(ctx)
    assert len(starts) == 14
    assert starts[:2] == [2, 2]  # the window holds one checkpoint at first ...
    assert set(starts) == {2, 3}  # ... and the next one later


def test_distill_seed_makes_a_replicate_of_the_matching_alone(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    """``distill.seed`` re-seeds the loop's draws only: the same experts and init, another set; the
    same seed twice gives the same bits; unset, the fingerprint is that of a config without it."""
    runs = {}
    for name, over in (("ref", []), ("a", ["distill.seed=1"]), ("b", ["distill.seed=1"])):
        ctx = prepare_run(tiny_cfg.override(over), tmp_path / name, progress=False)
        run_pipeline(ctx)
        runs[name] = ctx
    ref, a, b = (load_tensors(runs[n].path("distilled.safetensors"))[0] for n in ("ref", "a", "b"))
    assert torch.equal(ref["source_index"], a["source_index"])  # the same init
    for k in range(2):
        name = f"experts/expert_{k:05d}.safetensors"
        assert torch.equal(load_tensors(runs["ref"].path(name))[0]["params"],
                           load_tensors(runs["a"].path(name))[0]["params"])
    assert not torch.equal(ref["targets"], a["targets"])
    assert torch.equal(a["targets"], b["targets"]) and torch.equal(a["images"], b["images"])
    fps = {n: read_metadata(runs[n].path("distilled.safetensors"))["fingerprint"] for n in runs}
    assert fps["a"] == fps["b"] != fps["ref"]
    assert "seed" not in runs["ref"].cfg.hashed_dict()["distill"]
