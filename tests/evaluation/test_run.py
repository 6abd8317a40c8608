"""Stage 6 on a run: seeds, encoders, baselines, compared sets and the written results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import eval_context, tiny_config
from PIL import Image

from distilled_ssl.config import ModelConfig
from distilled_ssl.evaluation.run import evaluate_run
from distilled_ssl.pipeline import prepare_run, run_pipeline
from distilled_ssl.sets.results import format_table


def test_evaluate_run_seeds_encoders_baselines_and_compare(eval_run: Path, synthetic_npz: Path,
                                                           tmp_path: Path) -> None:
    other_cfg = tiny_config(synthetic_npz).override(["init.method=random"])
    other = prepare_run(other_cfg, tmp_path / "other", progress=False)
    run_pipeline(other)
    ctx = eval_context(eval_run, seeds=2, baselines=["none", "random", "full", "teacher"],
               extra_models=[ModelConfig("convnet", {"depth": 1, "width": 4, "pooling": "gap"})],
               label_fractions=[0.25, 0.5])
    result = evaluate_run(ctx, compare=[other.run_dir])
    sets = ["none (random init)", "random subset (12)", "full-data KD (240)", "teacher (ceiling)",
            "MKDT (high-loss init, class-balanced)", "MKDT (random init, class-balanced)"]
    assert len(result["rows"]) == 2 * 2 * len(sets)
    assert [s["set"] for s in result["summary"][:len(sets)]] == sets
    first = result["summary"][0]
    vals = [r["toy/probe@25%"] for r in result["rows"] if r["set"] == sets[0]
            and r["encoder"] == first["encoder"]]
    assert first["toy/probe@25%"]["mean"] == pytest.approx(float(np.mean(vals)))
    assert first["toy/probe@25%"]["std"] == pytest.approx(float(np.std(vals, ddof=1)))
    teacher = next(s for s in result["summary"] if s["set"] == "teacher (ceiling)")
    assert "fidelity_r2" not in teacher and "toy/knn@50%" in teacher
    by = {s["set"]: s for s in result["summary"] if s["encoder"] == first["encoder"]}
    assert by["full-data KD (240)"]["fidelity_r2"]["mean"] > by["none (random init)"]["fidelity_r2"]["mean"]
    table = (eval_run / "results.md").read_text()
    assert table == format_table(result) and "Encoder convnet(depth=1,pooling=gap,width=4), 2 seeds" in table
    # every set minus the random subset, seed by seed
    assert result["paired"]["reference"] == "random subset (12)" and "Minus random subset (12)" in table
    own = next(p for p in result["paired"]["summary"]
               if p["set"] == sets[4] and p["encoder"] == first["encoder"])
    diffs = [r["fidelity_r2"] - b["fidelity_r2"] for r in result["rows"] for b in result["rows"]
             if r["set"] == sets[4] and b["set"] == sets[1] and r["seed"] == b["seed"]
             and r["encoder"] == b["encoder"] == first["encoder"]]
    assert own["fidelity_r2"]["mean"] == pytest.approx(float(np.mean(diffs))) and own["fidelity_r2"]["n"] == 2
    assert json.loads((eval_run / "results.json").read_text())["summary"] == result["summary"]
    with Image.open(eval_run / "results.png") as img:
        assert img.size[1] > 100
