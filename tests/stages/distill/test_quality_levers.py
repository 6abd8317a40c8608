"""Distillation quality levers: validation curve, keep best, clamp, smoothing, anchored targets,
Adam on images, k-means init — each on the tiny synthetic set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import same_artifact

import distilled_ssl.stages.distill.mkdt as distill_mod
from distilled_ssl.config import RunConfig
from distilled_ssl.errors import ConfigError
from distilled_ssl.io import load_tensors, read_metadata
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.distill import run_distill
from distilled_ssl.stages.distill.common import distill_fingerprint
from distilled_ssl.stages.distill.monitor import build_scorer
from distilled_ssl.stages.init import kmeans_nearest
from distilled_ssl.stages.teacher import load_teacher


def _monitored(cfg: RunConfig, **distill: object) -> RunConfig:
    cfg.source.holdout = 40
    cfg.distill.iterations = 6
    cfg.distill.eval_every = 2
    for k, v in distill.items():
        setattr(cfg.distill, k, v)
    return cfg


def _run(cfg: RunConfig, out: Path) -> RunContext:
    ctx = prepare_run(cfg, out, progress=False)
    run_pipeline(ctx)
    return ctx


def test_eval_every_draws_the_curve_and_keep_best_keeps_the_best(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    cfg = _monitored(tiny_cfg, keep="best", lr_img=3e4)  # a large lr: later snapshots get worse
    ctx = _run(cfg, tmp_path / "best")
    meta = read_metadata(ctx.path("distilled.safetensors"))
    curve = meta["validation_curve"]
    assert [p["iteration"] for p in curve] == [0, 2, 4, 6]
    assert all("fidelity_r2" in p and 0 <= p["probe"] <= 1 for p in curve)
    best = max(curve, key=lambda p: p["fidelity_r2"])
    assert meta["kept_iteration"] == best["iteration"]
    assert ctx.path("curve.png").stat().st_size > 0
    # The written set is the best snapshot the loop kept (its state holds it in float32).
    tensors, _ = load_tensors(ctx.path("distilled.safetensors"))
    state, _ = load_tensors(ctx.path("distill_state.safetensors"))
    data = ctx.train_set
    m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
    assert torch.equal(tensors["images"], (state["best.images"] * s + m).half())
    assert torch.equal(tensors["targets"], state["best.targets"])
    if best["iteration"] != 6:  # the last state is another set
        assert not torch.equal(state["images"], state["best.images"])

    last = _run(_monitored(tiny_config_like(cfg), keep="last", lr_img=3e4), tmp_path / "last")
    last_meta = read_metadata(last.path("distilled.safetensors"))
    assert "kept_iteration" not in last_meta
    assert [p["fidelity_r2"] for p in last_meta["validation_curve"]] == [p["fidelity_r2"] for p in curve]
    if best["iteration"] != 6:
        assert not same_artifact(ctx.path("distilled.safetensors"), last.path("distilled.safetensors"))


def test_keep_metric_probe_keeps_the_best_probe(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    ctx = _run(_monitored(tiny_cfg, keep="best", keep_metric="probe", lr_img=3e4), tmp_path / "probe")
    meta = read_metadata(ctx.path("distilled.safetensors"))
    curve = meta["validation_curve"]
    first_best = max(curve, key=lambda p: p["probe"])  # max() keeps the earliest of ties
    assert meta["kept_iteration"] == first_best["iteration"]
    ctx.cfg.distill.keep_metric = "fidelity_r2"
    assert distill_fingerprint(ctx) != meta["fingerprint"]


def tiny_config_like(cfg: RunConfig) -> RunConfig:
    return RunConfig.from_dict(cfg.to_dict())


def test_monitored_run_resumes_to_the_same_set(tiny_cfg: RunConfig, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _monitored(tiny_cfg, keep="best", clamp=True, smooth=0.1, targets_anchor=0.2,
                     image_optimizer="adam", lr_img=0.05)
    straight = _run(cfg, tmp_path / "straight")

    ctx = prepare_run(tiny_config_like(cfg), tmp_path / "resumed", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init"])
    calls = {"n": 0}
    real = distill_mod.minibatches

    def crash_at_five(*args: object, **kwargs: object) -> list[torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(distill_mod, "minibatches", crash_at_five)
    with pytest.raises(KeyboardInterrupt):
        run_distill(ctx)
    monkeypatch.setattr(distill_mod, "minibatches", real)
    run_distill(ctx)
    assert same_artifact(straight.path("distilled.safetensors"), ctx.path("distilled.safetensors"))


def test_clamp_keeps_pixels_in_range(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    tiny_cfg.distill.lr_img = 3e4
    free = _run(tiny_cfg, tmp_path / "free")
    free_px = load_tensors(free.path("distilled.safetensors"))[0]["images"].float()
    assert free_px.min() < -0.01 or free_px.max() > 1.01  # the lever has something to do
    tiny_cfg.distill.clamp = True
    clamped = _run(tiny_cfg, tmp_path / "clamped")
    px = load_tensors(clamped.path("distilled.safetensors"))[0]["images"].float()
    assert px.min() >= -1e-3 and px.max() <= 1 + 1e-3


def test_smoothing_changes_the_images_less_sharply(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    tiny_cfg.distill.lr_img = 3e4
    rough = _run(tiny_cfg, tmp_path / "rough")
    tiny_cfg.distill.smooth = 0.25
    smooth = _run(tiny_cfg, tmp_path / "smooth")
    init = rough.train_set.images[load_tensors(rough.path("init.safetensors"))[0]["indices"]].float() / 255

    def roughness(ctx: RunContext) -> float:
        delta = load_tensors(ctx.path("distilled.safetensors"))[0]["images"].float() - init
        return float((delta[..., 1:, :] - delta[..., :-1, :]).abs().mean() / delta.abs().mean())

    assert roughness(smooth) < 0.8 * roughness(rough)


def test_full_anchor_makes_targets_the_teachers_reps(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    tiny_cfg.distill.targets_anchor = 1.0
    ctx = _run(tiny_cfg, tmp_path / "anchored")
    tensors, _ = load_tensors(ctx.path("distilled.safetensors"))
    teacher, tmeta = load_teacher(ctx.path("teacher.safetensors"))
    # The last update re-labelled the final images (float16 storage of the pixels aside).
    pixels = tensors["images"].float()
    m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (tmeta["mean"], tmeta["std"]))
    with torch.no_grad():
        reps = teacher.features((pixels - m) / s)
    assert torch.allclose(tensors["targets"], reps, atol=1e-2, rtol=1e-2)


def test_adam_on_images_moves_them(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    tiny_cfg.distill.image_optimizer = "adam"
    tiny_cfg.distill.lr_img = 0.05
    ctx = _run(tiny_cfg, tmp_path / "adam")
    init = ctx.train_set.images[load_tensors(ctx.path("init.safetensors"))[0]["indices"]].float() / 255
    px = load_tensors(ctx.path("distilled.safetensors"))[0]["images"].float()
    step = (px - init).abs().mean() / ctx.train_set.std[0]  # in normalised units
    assert 0.01 < step < 4 * 0.05 * tiny_cfg.distill.iterations


def test_kmeans_picks_one_image_per_cluster() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    index = kmeans_nearest(points, 4, torch.Generator().manual_seed(1))
    assert len(index) == 4 and torch.equal(index, index.sort().values)
    assert sorted((index // 50).tolist()) == [0, 1, 2, 3]  # one per cluster
    assert len(kmeans_nearest(points, 200, torch.Generator().manual_seed(1)).unique()) == 200


def test_kmeans_init_runs_in_the_pipeline(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    tiny_cfg.init.method = "kmeans"
    tiny_cfg.init.class_balanced = False
    ctx = _run(tiny_cfg, tmp_path / "kmeans")
    meta = read_metadata(ctx.path("init.safetensors"))
    assert meta["method"] == "kmeans" and sum(meta["class_counts"]) == 12


@pytest.mark.parametrize(("override", "message"), [
    ("distill.keep=best", "eval_every"),
    ("distill.eval_every=5", "source.holdout"),
    ("distill.smooth=0.5", "distill.smooth"),
    ("distill.targets_anchor=2", "distill.targets_anchor"),
    ("distill.image_optimizer=lbfgs", "distill.image_optimizer"),
    ("init.method=kcentre", "init.method"),
    ("distill.eval_seeds=0", "distill.eval_seeds"),
    ("distill.precision=fp16", "distill.precision"),
    ("distill.keep_graphs=-1", "distill.keep_graphs"),
    ("distill.keep_metric=loss", "distill.keep_metric"),
])
def test_bad_lever_values_are_refused(tiny_cfg: RunConfig, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_cfg.override([override]).validate()


def test_new_fields_at_their_defaults_keep_old_fingerprints(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    ctx = prepare_run(tiny_cfg, tmp_path / "fp", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init"])
    before = distill_fingerprint(ctx)
    ctx.cfg.distill.eval_every = 0  # unchanged default
    assert distill_fingerprint(ctx) == before
    ctx.cfg.distill.keep_graphs = 5  # same result, so the same set
    assert distill_fingerprint(ctx) == before
    ctx.cfg.distill.keep_graphs = 0
    ctx.cfg.distill.compile = ctx.cfg.distill.cuda_graphs = True  # same result up to float rounding
    assert distill_fingerprint(ctx) == before
    ctx.cfg.distill.precision = "bf16"
    assert distill_fingerprint(ctx) != before
    ctx.cfg.distill.precision = "fp32"
    ctx.cfg.distill.clamp = True
    assert distill_fingerprint(ctx) != before


def test_eval_seeds_average_scores_over_encoder_inits(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    ctx = prepare_run(_monitored(tiny_cfg), tmp_path / "seeds", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init"])
    data = ctx.train_set
    index = load_tensors(ctx.path("init.safetensors"))[0]["indices"]
    m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
    images = (data.images[index].float() / 255 - m) / s
    targets = load_tensors(ctx.path("targets.safetensors"))[0]["target_reps"][index]
    one = build_scorer(ctx)(images, targets, torch.tensor(0.1))
    ctx.cfg.distill.eval_seeds = 3
    scorer = build_scorer(ctx)
    three = scorer(images, targets, torch.tensor(0.1))
    assert three == scorer(images, targets, torch.tensor(0.1))  # the same inits every time
    runs = [scorer.score_seed(images, targets, torch.tensor(0.1), seed) for seed in range(3)]
    assert runs[0] == one  # seed 0 is the one-seed score
    assert three["fidelity_r2"] == pytest.approx(sum(r["fidelity_r2"] for r in runs) / 3)
    assert len({r["fidelity_r2"] for r in runs}) == 3
    # a score after a longer pre-training (benchmarks/screen.py --epochs): the default is eval.epochs
    assert scorer.score_seed(images, targets, 0.1, 1, epochs=ctx.cfg.eval.epochs) == runs[1]
    assert scorer.score_seed(images, targets, 0.1, 1, epochs=3 * ctx.cfg.eval.epochs) != runs[1]


class _ScriptedScorer:
    """Held-out scores from a list, one per call (in place of the KD-run scorer)."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = iter(scores)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                 steps: int | None = None) -> dict[str, float]:
        return {"fidelity_r2": next(self.scores), "probe": 0.5}


def test_patience_stops_at_the_best_and_a_larger_one_carries_on(
        tiny_cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # scores at iterations 0, 2, 4, 6, 8, 10, 12: the best is at 2, then two lower ones
    scores = [0.1, 0.5, 0.4, 0.3, 0.6, 0.2, 0.1]
    monkeypatch.setattr(distill_mod, "build_scorer", lambda ctx: _ScriptedScorer(scores))
    cfg = _monitored(tiny_cfg, keep="best", patience=2)
    cfg.distill.iterations = 12
    ctx = _run(cfg, tmp_path / "run")
    meta = read_metadata(ctx.path("distilled.safetensors"))
    assert [p["iteration"] for p in meta["validation_curve"]] == [0, 2, 4, 6]
    assert meta["stopped_at"] == meta["iterations"] == 6 and meta["kept_iteration"] == 2
    _, state_meta = load_tensors(ctx.path("distill_state.safetensors"))
    assert state_meta["iteration"] == 6
    written = ctx.path("distilled.safetensors").stat().st_mtime_ns

    # the same config again: the stopped run is done (the scorer is not even asked)
    monkeypatch.setattr(distill_mod, "build_scorer", lambda ctx: _ScriptedScorer([]))
    again = _run(tiny_config_like(cfg), tmp_path / "run")
    assert again.path("distilled.safetensors").stat().st_mtime_ns == written

    # a larger patience carries on from iteration 6 (same fingerprint), finds the better score at 8
    # and stops two scores later
    monkeypatch.setattr(distill_mod, "build_scorer", lambda ctx: _ScriptedScorer(scores[4:]))
    more = tiny_config_like(cfg)
    more.distill.patience = 3
    ctx = _run(more, tmp_path / "run")
    meta = read_metadata(ctx.path("distilled.safetensors"))
    assert [p["iteration"] for p in meta["validation_curve"]] == [0, 2, 4, 6, 8, 10, 12]
    assert meta["kept_iteration"] == 8 and meta["iterations"] == 12 and "stopped_at" not in meta


def test_patience_needs_keep_best(tiny_cfg: RunConfig) -> None:
    monitored = _monitored(tiny_cfg)  # scores every 2 iterations, keeps the last
    with pytest.raises(ConfigError, match="set distill.keep=best, or distill.patience=0"):
        monitored.override(["distill.patience=3"]).validate()
    with pytest.raises(ConfigError, match="distill.patience needs validation scores"):
        monitored.override(["distill.patience=3", "distill.eval_every=0"]).validate()
    with pytest.raises(ConfigError, match="distill.patience"):
        tiny_cfg.override(["distill.patience=-1"]).validate()


@pytest.mark.parametrize("preset", ["gpu-fmnist-2pct", "cpu-fmnist-2pct"])
@pytest.mark.parametrize("change", ["source.holdout=0", "distill.eval_every=0"])
def test_turning_the_scores_off_takes_one_message(preset: str, change: str) -> None:
    """The refusal names every setting that turning validation off needs (keep, patience), so its
    suggestion validates at once."""
    from distilled_ssl.config import load_preset

    cfg = load_preset(preset)
    with pytest.raises(ConfigError, match="turn .* off with ") as info:
        cfg.override([change]).validate()
    suggestion = str(info.value).rsplit(" off with ", 1)[1].split()
    assert "distill.keep=last" in suggestion
    assert ("distill.patience=0" in suggestion) == bool(cfg.distill.patience)
    cfg.override([change, *suggestion]).validate()


class _RecordingScorer(_ScriptedScorer):
    """Scripted scores that also record the lr each snapshot was scored at."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__(scores)
        self.lrs: list[float] = []

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                 steps: int | None = None) -> dict[str, float]:
        self.lrs.append(float(lr))
        return super().__call__(images, targets, lr, steps)


@pytest.mark.parametrize("eval_lr", [0.0, 0.7])
def test_eval_lr_scores_snapshots_at_that_lr(tiny_cfg: RunConfig, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, eval_lr: float) -> None:
    """``distill.eval_lr`` pre-trains every snapshot at one lr (0: at the snapshot's learned lr);
    the set keeps its learned lr, and says which lr its curve was scored at."""
    scorer = _RecordingScorer([0.1, 0.3, 0.2, 0.0])
    monkeypatch.setattr(distill_mod, "build_scorer", lambda ctx: scorer)
    cfg = _monitored(tiny_cfg, keep="best", eval_lr=eval_lr, lr_lr=1e-4)
    ctx = _run(cfg, tmp_path / "run")
    meta = read_metadata(ctx.path("distilled.safetensors"))
    assert meta["kept_iteration"] == 2
    state, _ = load_tensors(ctx.path("distill_state.safetensors"))
    stored = load_tensors(ctx.path("distilled.safetensors"))[0]["lr"]
    assert float(stored) == float(state["best.lr"])  # the set keeps its learned lr
    assert float(state["lr"]) != pytest.approx(0.1, abs=1e-6)
    if eval_lr:
        assert scorer.lrs == pytest.approx([eval_lr] * 4) and meta["validation_lr"] == eval_lr
    else:
        assert scorer.lrs[0] == pytest.approx(0.1) and scorer.lrs[-1] == float(state["lr"])
        assert "validation_lr" not in meta
    before = distill_fingerprint(ctx)
    ctx.cfg.distill.eval_lr = 0.5 if eval_lr else 0.0
    assert (distill_fingerprint(ctx) == before) == (not eval_lr)  # 0 keeps old fingerprints


def test_eval_lr_needs_scores(tiny_cfg: RunConfig) -> None:
    with pytest.raises(ConfigError, match="distill.eval_lr must be >= 0"):
        _monitored(tiny_cfg).override(["distill.eval_lr=-1"]).validate()
    with pytest.raises(ConfigError, match=r"distill.eval_lr needs validation scores.* distill.eval_lr=0"):
        _monitored(tiny_cfg).override(["distill.eval_lr=0.5", "distill.eval_every=0"]).validate()
