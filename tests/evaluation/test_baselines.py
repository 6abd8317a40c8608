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
