"""``eval.baseline_lr: tuned``: each subset baseline trains at its own lr, chosen on held-out images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distilled_ssl.evaluation.run as run_mod
from distilled_ssl.config import RunConfig
from distilled_ssl.evaluation.baselines import Baselines
from distilled_ssl.evaluation.run import evaluate_run
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.stages.context import RunContext


class _Scripted:
    """Scores by lr: random subsets peak at ``peaks['random']``, the init subset elsewhere (it is
    told apart by its images, which are the same every call)."""

    def __init__(self, ctx: RunContext, peaks: dict[str, float]) -> None:
        self.peaks, self.calls = peaks, []
        self.init = Baselines(ctx, 12).pretrain_set("init", 0).images

    def unseen_seeds(self) -> _Scripted:
        return self

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor,
                 steps: int | None = None) -> dict[str, float]:
        name = "init" if torch.equal(images, self.init) else "full_steps" if steps else "random"
        self.calls.append((name, round(float(lr), 6)))
        self.steps = getattr(self, "steps", {}) | {name: steps}
        return {"fidelity_r2": 1 - (float(lr) - self.peaks[name]) ** 2, "probe": 0.5}


@pytest.fixture
def held_out_run(tiny_cfg: RunConfig, tmp_path: Path) -> RunContext:
    cfg = tiny_cfg.override(["source.holdout=40", "eval.baseline_lr=tuned", "eval.lr_grid=[0.05, 0.3, 0.6]",
                             "eval.baselines=[none, random, init]", "eval.knn_k=0"])
    ctx = prepare_run(cfg.validate(), tmp_path / "run", progress=False)
    run_pipeline(ctx, stages=["teacher", "targets", "experts", "init", "distill"])
    return ctx


def test_each_subset_baseline_trains_at_its_best_lr(held_out_run: RunContext,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = held_out_run
    scorer = _Scripted(ctx, {"random": 0.3, "init": 0.6})
    monkeypatch.setattr(run_mod, "build_scorer", lambda c: scorer)
    used: dict[str, float] = {}
    real_pretrain = run_mod.pretrain_kd

    def spy(arch: str, kwargs: dict, pset: object, **kw: object) -> object:  # records each lr
        if pset is not None:
            used[pset.name] = pset.lr
        return real_pretrain(arch, kwargs, pset, **kw)

    monkeypatch.setattr(run_mod, "pretrain_kd", spy)
    result = evaluate_run(ctx)
    assert sorted(set(scorer.calls)) == sorted((n, lr) for n in ("random", "init") for lr in (0.05, 0.3, 0.6))
    assert result["protocol"]["baseline_lrs"] == {"random": 0.3, "init": 0.6}
    assert [p["lr"] for p in result["protocol"]["lr_search"]["init"]] == [0.05, 0.3, 0.6]
    titles = [s["set"] for s in result["summary"]]
    assert "random subset (12, lr 0.3 tuned)" in titles
    assert "init subset (high-loss init, class-balanced, lr 0.6 tuned)" in titles
    assert used["random subset (12, lr 0.3 tuned)"] == 0.3
    assert used["init subset (high-loss init, class-balanced, lr 0.6 tuned)"] == 0.6
    own = next(t for t in titles if t.startswith("MKDT"))
    assert used[own] == pytest.approx(_stored_lr(ctx))  # the set keeps its own lr
    assert "lr 0.3 tuned" in (ctx.run_dir / "results.md").read_text()


def _stored_lr(ctx: RunContext) -> float:
    from distilled_ssl.io import load_tensors

    return float(load_tensors(ctx.path("distilled.safetensors"))[0]["lr"])


def test_tuning_with_the_real_scorer_picks_the_argmax(held_out_run: RunContext) -> None:
    ctx = held_out_run
    ctx.cfg.eval.baselines = ["random"]
    result = evaluate_run(ctx, out=ctx.run_dir / "tuned")
    search = result["protocol"]["lr_search"]["random"]
    assert [p["lr"] for p in search] == [0.05, 0.3, 0.6]
    best = max(search, key=lambda p: p["fidelity_r2"])["lr"]
    assert result["protocol"]["baseline_lrs"] == {"random": best}


def test_without_subset_baselines_nothing_is_tuned(held_out_run: RunContext,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scorer(ctx: RunContext) -> None:
        raise AssertionError("nothing to tune")

    monkeypatch.setattr(run_mod, "build_scorer", no_scorer)
    ctx = held_out_run
    ctx.cfg.eval.baselines = ["none"]
    result = evaluate_run(ctx, out=ctx.run_dir / "plain")
    assert "baseline_lrs" not in result["protocol"]


def test_equal_steps_full_data_is_tuned_and_trained_for_the_sets_steps(
        held_out_run: RunContext, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = held_out_run
    ctx.cfg.eval.baselines = ["random", "full_steps"]
    scorer = _Scripted(ctx, {"random": 0.3, "init": 0.6, "full_steps": 0.05})
    monkeypatch.setattr(run_mod, "build_scorer", lambda c: scorer)
    trained: dict[str, tuple[int, float, int | None]] = {}
    real_pretrain = run_mod.pretrain_kd

    def spy(arch: str, kwargs: dict, pset: object, **kw: object) -> object:
        if pset is not None:
            trained[pset.name] = (len(pset.images), pset.lr, pset.steps)
        return real_pretrain(arch, kwargs, pset, **kw)

    monkeypatch.setattr(run_mod, "pretrain_kd", spy)
    result = evaluate_run(ctx, out=ctx.run_dir / "steps")
    ec = ctx.cfg.eval
    steps = ec.epochs * -(-12 // ec.batch_size)  # a 12-image set's pre-training
    assert scorer.steps == {"random": None, "full_steps": steps}  # tuned with the steps it trains for
    assert result["protocol"]["baseline_lrs"] == {"random": 0.3, "full_steps": 0.05}
    title = f"equal-steps full-data KD ({len(ctx.train_set)}; {steps} steps, lr 0.05 tuned)"
    assert trained[title] == (len(ctx.train_set), 0.05, steps)
    assert trained["random subset (12, lr 0.3 tuned)"] == (12, 0.3, None)
