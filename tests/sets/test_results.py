"""The torch-free results summary and table."""

from __future__ import annotations

from distilled_ssl.sets.results import summarize


def test_summarize_handles_one_seed() -> None:
    rows = [{"set": "a", "encoder": "e", "seed": 0, "m": 0.5, "seconds": 1.0}]
    assert summarize(rows) == [{"encoder": "e", "set": "a", "m": {"mean": 0.5, "std": 0.0, "n": 1}}]
