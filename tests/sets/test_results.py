"""The torch-free results summary and table."""

from __future__ import annotations

import statistics

import pytest

from distilled_ssl.sets.results import format_table, paired, summarize


def test_summarize_handles_one_seed() -> None:
    rows = [{"set": "a", "encoder": "e", "seed": 0, "m": 0.5, "seconds": 1.0}]
    assert summarize(rows) == [{"encoder": "e", "set": "a", "m": {"mean": 0.5, "std": 0.0, "n": 1}}]


def test_paired_differences_are_taken_seed_by_seed_and_shown() -> None:
    rows = [{"set": s, "encoder": e, "seed": seed, "fidelity_r2": v, "toy/probe@1%": a, "seconds": 1.0}
            for s, e, seed, v, a in [
                ("random", "e", 0, 0.50, 0.70), ("random", "e", 1, 0.60, 0.72),
                ("random", "e", 2, 0.40, 0.71),
                ("ours", "e", 0, 0.52, 0.69), ("ours", "e", 1, 0.63, 0.73), ("ours", "e", 2, 0.41, 0.72),
                ("ours", "f", 0, 0.90, 0.90),  # no reference row for encoder f: left out
            ]]
    [entry] = paired(rows, "random")
    assert entry["encoder"] == "e" and entry["set"] == "ours"
    fid = entry["fidelity_r2"]
    assert fid["mean"] == pytest.approx(0.02) and fid["n"] == 3 and fid["ahead"] == 3
    assert fid["std"] == pytest.approx(statistics.stdev([0.02, 0.03, 0.01]))
    assert entry["toy/probe@1%"]["ahead"] == 2
    table = format_table({"summary": summarize(rows), "protocol": {"seeds": 3},
                          "paired": {"reference": "random", "summary": [entry]}})
    assert "Minus random, paired by seed" in table
    assert "| ours | +0.020 ± 0.010 (3/3) | +0.3 ± 1.2 (2/3) |" in table
