"""`distilled-ssl evaluate` and its --arch parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from distilled_ssl.cli import main
from distilled_ssl.cli.evaluate import parse_arch
from distilled_ssl.config import ConfigError, ModelConfig


def test_parse_arch() -> None:
    student = ModelConfig("convnet", {"width": 32})
    assert parse_arch("student", student) is student
    assert parse_arch("resnet10:width=0.125", student) == ModelConfig("resnet10", {"width": 0.125})
    assert parse_arch("torchvision:resnet18", student) == ModelConfig("torchvision:resnet18", {})
    with pytest.raises(ConfigError, match="key=value"):
        parse_arch("convnet:depth=2,oops", student)


def test_evaluate_cli(eval_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", str(eval_run), "--baselines", "none,random", "--seeds", "2",
                               "--arch", "student", "--label-fractions", "0.25", "--knn-k", "0"])
    assert res.exit_code == 0, res.output
    assert "| random subset (12) |" in res.output and "±" in res.output and "knn" not in res.output
    assert json.loads((eval_run / "results.json").read_text())["protocol"]["precise_bn"] is True
    res = runner.invoke(main, ["evaluate", str(eval_run), "--baselines", "none", "--no-precise-bn",
                               "--out", str(tmp_path / "paper")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "paper" / "results.json").read_text())["protocol"]["precise_bn"] is False
    res = runner.invoke(main, ["evaluate", str(eval_run), "--baselines", "none,bogus"])
    assert res.exit_code == 1 and "unknown baseline 'bogus'" in res.output
    res = runner.invoke(main, ["evaluate", str(eval_run), "--label-fractions", "0.5,2"])
    assert res.exit_code == 1 and "label_fractions" in res.output
    from distilled_ssl.sets.artifact import write_set

    set_dir = write_set(eval_run, tmp_path / "set")
    res = runner.invoke(main, ["evaluate", str(set_dir)])
    assert res.exit_code == 1 and "--out" in res.output
    res = runner.invoke(main, ["evaluate", str(set_dir), "--out", str(tmp_path / "ev"),
                               "--baselines", "random"])
    assert res.exit_code == 1 and "need the run directory" in res.output
    res = runner.invoke(main, ["evaluate", str(set_dir), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "| none (random init) |" in res.output and (tmp_path / "ev" / "results.png").is_file()
    assert sorted(p.name for p in set_dir.iterdir()) == sorted(p.name for p in
                                                               (tmp_path / "set").iterdir())
