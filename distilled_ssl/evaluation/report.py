"""Stage 6's report: ``results.json``, ``results.md`` (the table) and ``results.png`` (the plot)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..data.viz import save_bar_panels
from ..io import atomic_path
from ..layout import PLOT_FILE, RESULTS_FILE, TABLE_FILE
from ..sets.results import format_table, metric_columns

__all__ = ["plot_results", "write_results"]


def write_results(run_dir: Path, result: dict[str, Any]) -> None:
    """``results.json``, ``results.md`` and ``results.png`` (atomic writes)."""
    with atomic_path(run_dir / RESULTS_FILE) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2))
    with atomic_path(run_dir / TABLE_FILE) as tmp:
        Path(tmp).write_text(format_table(result))
    plot_results(result, run_dir / PLOT_FILE)


def plot_results(result: dict[str, Any], path: Path) -> None:
    """One panel per metric (and encoder): a bar per pre-training set, whiskers = std."""
    summary = result["summary"]
    split = result["protocol"].get("split", "test")
    panels = []
    encoders = list(dict.fromkeys(s["encoder"] for s in summary))
    for enc in encoders:
        for col in metric_columns(summary):
            if col == "fidelity_cosine" or "/knn@" in col or "/finetune@" in col:
                continue
            scale = 100.0 if "@" in col else 1.0
            bars = [(s["set"], scale * s[col]["mean"], scale * s[col]["std"]) for s in summary
                    if s["encoder"] == enc and col in s and math.isfinite(s[col]["mean"])]
            if bars:
                title = col.replace("fidelity_r2", f"teacher fidelity R^2 (source {split})")
                title += " (accuracy %)" if scale != 1.0 else ''
                panels.append((title + (f", encoder {enc}" if len(encoders) > 1 else ""), bars))
    save_bar_panels(path, panels)
