"""The baselines a distilled set is measured against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import eval_context

from distilled_ssl.config import ConfigError, RunConfig
from distilled_ssl.evaluation.baselines import Baselines, check_baselines


def _rows_of(ctx, normalised: torch.Tensor) -> torch.Tensor:
    """Which source rows a normalised image batch came from."""
    from distilled_ssl.data.sources import normalize

    src = normalize(ctx.train_set.images, ctx.train_set.mean, ctx.train_set.std).flatten(1)
    return torch.cdist(normalised.flatten(1), src).argmin(1)


def test_baselines(eval_run: Path) -> None:
    ctx = eval_context(eval_run)
    b = Baselines(ctx, 12)
    r0, r0_again, r1 = (b.pretrain_set("random", s) for s in (0, 0, 1))
    assert len(r0.images) == 12 and torch.equal(r0.images, r0_again.images)
    assert not torch.equal(r0.images, r1.images)
    bal = b.pretrain_set("high_loss_balanced", 0)
    labels = ctx.train_set.labels
    counts = torch.bincount(labels[_rows_of(ctx, bal.images)], minlength=4).tolist()
    assert counts == [3, 3, 3, 3]
    full = b.pretrain_set("full", 0)
    assert len(full.images) == len(ctx.train_set) and full.epochs == ctx.cfg.eval.full_epochs
    assert b.title("full") == "full-data KD (240)"
    ec = ctx.cfg.eval
    same = b.pretrain_set("full_steps", 0)
    assert torch.equal(same.images, full.images) and torch.equal(same.targets, full.targets)
    assert same.steps == b.steps == ec.epochs * -(-12 // ec.batch_size) and same.epochs is None
    assert same.lr == ctx.cfg.distill.lr_init  # trained like the subsets, not at the experts' lr
    assert b.title("full_steps") == f"equal-steps full-data KD (240; {b.steps} steps)"
    with pytest.raises(ValueError, match="unknown baseline 'best'"):
        check_baselines(["none", "best"])
    with pytest.raises(ConfigError, match="eval.baselines"):
        RunConfig.from_dict({"eval": {"baselines": ["nope"]}}).validate()


def test_subset_baselines_can_train_at_the_sets_lr(eval_run: Path) -> None:
    ctx = eval_context(eval_run)
    paper, at_set = Baselines(ctx, 12), Baselines(ctx, 12, lr=0.25)
    for name in ("random", "init"):
        a, b = paper.pretrain_set(name, 0), at_set.pretrain_set(name, 0)
        assert a.lr == ctx.cfg.distill.lr_init and b.lr == 0.25
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert at_set.pretrain_set("full", 0).lr == paper.pretrain_set("full", 0).lr == ctx.cfg.experts.lr
    assert at_set.title("random") == "random subset (12, lr 0.25)"
    assert paper.title("random") == "random subset (12)"
    with pytest.raises(ConfigError, match="eval.baseline_lr"):
        RunConfig.from_dict({"eval": {"baseline_lr": "best"}}).validate()


def test_pretraining_stops_after_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """``PretrainSet.steps``: exactly that many SGD steps, across epochs, each a fresh shuffle."""
    import distilled_ssl.models.pretrain as pretrain_mod

    seen: list[torch.Tensor] = []
    real_loss = pretrain_mod.kd_loss

    def counting(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(y[:, 0].clone())
        return real_loss(out, y)

    monkeypatch.setattr(pretrain_mod, "kd_loss", counting)
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40.0)[:, None].repeat(1, 3)
    kw = {"in_channels": 1, "image_size": 8, "target_dim": 3, "batch_size": 16, "precise_bn": False}
    pretrain_mod.pretrain_kd("convnet", {"depth": 1, "width": 4}, pretrain_mod.PretrainSet(
        "s", x, y, 0.01, steps=7), **kw)
    assert len(seen) == 7  # 3 batches an epoch: two whole epochs and one batch of a third
    first, second = torch.cat(seen[:3]), torch.cat(seen[3:6])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(40))  # every image per epoch
    assert not torch.equal(first, second)  # reshuffled
    seen.clear()
    pretrain_mod.pretrain_kd("convnet", {"depth": 1, "width": 4}, pretrain_mod.PretrainSet(
        "s", x, y, 0.01), epochs=2, **kw)
    assert len(seen) == 6  # without steps: every batch of every epoch
