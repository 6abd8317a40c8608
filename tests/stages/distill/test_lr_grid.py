"""``distill.lr_grid``: the lr a set is stored with, chosen on the held-out images after matching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distilled_ssl.stages.distill.common as common_mod
import distilled_ssl.stages.distill.mkdt as distill_mod
from distilled_ssl.config import RunConfig, load_preset
from distilled_ssl.errors import ConfigError
from distilled_ssl.io import load_tensors, read_metadata
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.context import RunContext
from distilled_ssl.stages.distill.common import distill_fingerprint
from distilled_ssl.stages.distill.monitor import build_scorer, choose_lr


class _PeakAt:
    """Held-out scores that depend only on the lr: highest at ``peak`` (counts its calls)."""

    def __init__(self, peak: float) -> None:
        self.peak, self.calls = peak, []

    def unseen_seeds(self) -> _PeakAt:
        return self

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                 steps: int | None = None) -> dict[str, float]:
        self.calls.append(round(float(lr), 6))
        return {"fidelity_r2": 1 - (float(lr) - self.peak) ** 2, "probe": 0.5}


def _cfg(cfg: RunConfig, grid: list[float], **distill: object) -> RunConfig:
    cfg.source.holdout = 40
    cfg.distill.iterations = 4
    cfg.distill.lr_grid = grid
    for k, v in distill.items():
        setattr(cfg.distill, k, v)
    return cfg.validate()


def _run(cfg: RunConfig, out: Path) -> RunContext:
    ctx = prepare_run(cfg, out, progress=False)
    run_pipeline(ctx)
    return ctx


def _stored_lr(ctx: RunContext) -> float:
    return float(load_tensors(ctx.path("distilled.safetensors"))[0]["lr"])


def test_the_set_is_stored_with_the_best_scoring_lr_and_a_new_grid_rechooses_without_matching(
        tiny_cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = _PeakAt(0.5)
    monkeypatch.setattr(distill_mod, "build_scorer", lambda ctx: scorer)
    ctx = _run(_cfg(tiny_cfg, [0.2, 0.5, 0.9], eval_every=2, keep="best"), tmp_path / "run")
    meta = read_metadata(ctx.path("distilled.safetensors"))
    state, _ = load_tensors(ctx.path("distill_state.safetensors"))
    learned = float(state["best.lr"])
    assert _stored_lr(ctx) == pytest.approx(0.5)
    assert meta["lr_learned"] == pytest.approx(learned) and meta["lr_grid"] == [0.2, 0.5, 0.9]
    assert [p["lr"] for p in meta["lr_scores"]] == pytest.approx([learned, 0.2, 0.5, 0.9], abs=1e-6)
    assert meta["iterations"] == 4 and len(meta["validation_curve"]) == 3
    written = ctx.path("distilled.safetensors").stat().st_mtime_ns

    # the same grid again: the stage is done (nothing scored)
    scorer.calls.clear()
    _run(RunConfig.from_dict(ctx.cfg.to_dict()), tmp_path / "run")
    assert ctx.path("distilled.safetensors").stat().st_mtime_ns == written and scorer.calls == []

    # a new grid: the same matched set (no matching step), its lr chosen again
    def no_matching(*args: object, **kwargs: object) -> None:
        raise AssertionError("a new lr grid must not re-run the matching")

    monkeypatch.setattr(distill_mod, "_sample_gradient", no_matching)
    again = RunConfig.from_dict(ctx.cfg.to_dict())
    again.distill.lr_grid = [0.9, 0.35]
    assert distill_fingerprint(prepare_run(again, tmp_path / "run", progress=False)) == meta["fingerprint"]
    ctx = _run(again, tmp_path / "run")
    meta2 = read_metadata(ctx.path("distilled.safetensors"))
    assert _stored_lr(ctx) == pytest.approx(0.35) and meta2["lr_grid"] == [0.9, 0.35]
    assert scorer.calls == pytest.approx([learned, 0.9, 0.35], abs=1e-6)
    tensors, _ = load_tensors(ctx.path("distilled.safetensors"))
    assert torch.equal(tensors["targets"], state["best.targets"])  # the same kept snapshot

    # back to no grid: the learned lr, and no record of a choice
    plain = RunConfig.from_dict(ctx.cfg.to_dict())
    plain.distill.lr_grid = []
    ctx = _run(plain, tmp_path / "run")
    meta3 = read_metadata(ctx.path("distilled.safetensors"))
    assert _stored_lr(ctx) == pytest.approx(learned) and "lr_scores" not in meta3


def test_lrs_are_compared_on_encoder_seeds_the_curve_did_not_use(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    """The kept snapshot won the curve on encoder seed 0, luck included; the lr grid scores it from
    seed 1 (the next ``eval_seeds``), so that luck does not favour the lr the curve was scored at."""
    ctx = _run(_cfg(tiny_cfg, [0.3], eval_every=2, keep="best"), tmp_path / "run")
    meta = read_metadata(ctx.path("distilled.safetensors"))
    kept = next(p for p in meta["validation_curve"] if p["iteration"] == meta["kept_iteration"])
    at_learned = meta["lr_scores"][0]
    state, _ = load_tensors(ctx.path("distill_state.safetensors"))
    scorer = build_scorer(ctx)
    snapshot = state["best.images"], state["best.targets"], state["best.lr"]
    assert kept["fidelity_r2"] == pytest.approx(scorer(*snapshot)["fidelity_r2"], abs=1e-6)
    fresh = scorer.score_seed(*snapshot, 1)
    assert at_learned["fidelity_r2"] == pytest.approx(fresh["fidelity_r2"], abs=1e-5)
    assert at_learned["fidelity_r2"] != pytest.approx(kept["fidelity_r2"], abs=1e-5)
    ctx.cfg.distill.eval_seeds = 2
    assert build_scorer(ctx).unseen_seeds().first_seed == 2


def test_the_learned_lr_stays_when_it_scores_best(tiny_cfg: RunConfig, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common_mod, "build_scorer", lambda ctx: _PeakAt(0.0))  # lower is better
    ctx = _run(_cfg(tiny_cfg, [0.3, 1.0]), tmp_path / "run")
    meta = read_metadata(ctx.path("distilled.safetensors"))
    assert _stored_lr(ctx) == pytest.approx(meta["lr_learned"]) and len(meta["lr_scores"]) == 3


def test_the_real_scorer_chooses_among_the_grid(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    """No monitor (eval_every 0): the stage builds the held-out scorer itself; the stored lr is the
    argmax of the recorded KD-run scores."""
    ctx = _run(_cfg(tiny_cfg, [0.02, 0.3]), tmp_path / "run")
    meta = read_metadata(ctx.path("distilled.safetensors"))
    scores = meta["lr_scores"]
    assert all(isinstance(p["fidelity_r2"], float) and 0 <= p["probe"] <= 1 for p in scores), scores
    best = max(scores, key=lambda p: p["fidelity_r2"])
    assert _stored_lr(ctx) == pytest.approx(best["lr"]), scores


def test_krr_st_sets_get_their_lr_chosen_too(tiny_cfg: RunConfig, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common_mod, "build_scorer", lambda ctx: _PeakAt(0.7))
    cfg = _cfg(tiny_cfg, [0.7], method="krr_st")
    cfg.distill.krr_st.pool_size, cfg.distill.krr_st.model_steps = 2, 3
    ctx = _run(cfg, tmp_path / "run")
    meta = read_metadata(ctx.path("distilled.safetensors"))
    assert meta["method"] == "krr_st" and _stored_lr(ctx) == pytest.approx(0.7)
    assert meta["lr_learned"] == pytest.approx(cfg.distill.lr_init)


def test_choose_lr_takes_the_first_of_equal_scores_and_each_candidate_once() -> None:
    scorer = _PeakAt(0.5)
    lr, scores = choose_lr(scorer, torch.zeros(1), torch.zeros(1), [0.3, 0.7, 0.3, 0.5])
    assert lr == 0.5 and [p["lr"] for p in scores] == [0.3, 0.7, 0.5]
    lr, _ = choose_lr(_PeakAt(0.5), torch.zeros(1), torch.zeros(1), [0.3, 0.7])
    assert lr == 0.3  # 0.3 and 0.7 score the same
    with pytest.raises(ConfigError, match="no nope"):
        choose_lr(_PeakAt(0.5), torch.zeros(1), torch.zeros(1), [0.3], metric="nope")


@pytest.mark.parametrize(("override", "message"), [
    ("distill.lr_grid=[0.5, -1]", "distill.lr_grid must be a list of learning rates > 0"),
    ("distill.lr_grid=0.5", "distill.lr_grid must be a list"),
    ("eval.lr_grid=[fast]", "eval.lr_grid"),
    ("eval.lr_grid=[]", "eval.baseline_lr=tuned chooses"),
])
def test_bad_grids_are_refused(tiny_cfg: RunConfig, override: str, message: str) -> None:
    cfg = tiny_cfg.override(["source.holdout=40", "eval.baseline_lr=tuned"])
    cfg.validate()
    with pytest.raises(ConfigError, match=message):
        cfg.override([override]).validate()


def test_a_grid_needs_held_out_images_and_the_message_says_how_to_turn_it_off(tiny_cfg: RunConfig) -> None:
    for change in (["distill.lr_grid=[0.5]"], ["eval.baseline_lr=tuned"]):
        with pytest.raises(ConfigError, match="set source.holdout") as info:
            tiny_cfg.override(change).validate()
        off = str(info.value).rsplit(" off with ", 1)[1].split()
        tiny_cfg.override([*change, *off]).validate()
    cfg = load_preset("cpu-fmnist-2pct")
    with pytest.raises(ConfigError, match="turn that off with") as info:
        cfg.override(["source.holdout=0"]).validate()
    off = str(info.value).rsplit(" off with ", 1)[1].split()
    assert ("distill.lr_grid=[]" in off) == bool(cfg.distill.lr_grid)
    cfg.override(["source.holdout=0", *off]).validate()
