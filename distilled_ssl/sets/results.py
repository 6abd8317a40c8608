"""Evaluation results as numbers and text, without torch: the summary over seeds and the Markdown
table. Written by :mod:`distilled_ssl.evaluation`, read by the dataset card (:mod:`.artifact`)."""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["format_table", "metric_columns", "paired", "summarize"]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, std and count of every metric per (encoder, set), in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["encoder"], r["set"]), []).append(r)
    out = []
    for (enc, name), rs in groups.items():
        entry: dict[str, Any] = {"encoder": enc, "set": name}
        for key in rs[0]:
            if key in ("set", "encoder", "seed", "seconds"):
                continue
            vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
            if vals:
                entry[key] = {"mean": statistics.fmean(vals),
                              "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
        out.append(entry)
    return out


def paired(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Every other set's per-seed difference to the ``reference`` set (same encoder, same seed:
    the same encoder init and label subsets, so the spread both share drops out): mean, std, count
    and the number of seeds it is ahead, per metric, in first-seen order."""
    ref = {(r["encoder"], r["seed"]): r for r in rows if r["set"] == reference}
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for r in rows:
        base = ref.get((r["encoder"], r["seed"]))
        if r["set"] != reference and base is not None:
            groups.setdefault((r["encoder"], r["set"]), []).append((r, base))
    out = []
    for (enc, name), pairs in groups.items():
        entry: dict[str, Any] = {"encoder": enc, "set": name}
        for key in pairs[0][0]:
            if key in ("set", "encoder", "seed", "seconds"):
                continue
            diffs = [r[key] - b[key] for r, b in pairs
                     if isinstance(r.get(key), (int, float)) and isinstance(b.get(key), (int, float))]
            if diffs:
                entry[key] = {"mean": statistics.fmean(diffs),
                              "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                              "n": len(diffs), "ahead": sum(d > 0 for d in diffs)}
        if len(entry) > 2:
            out.append(entry)
    return out


def metric_columns(summary: list[dict[str, Any]]) -> list[str]:
    """Every metric name of a summary, in first-seen order."""
    cols: list[str] = []
    for s in summary:
        cols += [c for c in s if c not in ("encoder", "set") and c not in cols]
    return cols


def _cell(metric: str, stat: dict[str, Any] | None, diff: bool = False) -> str:
    """``mean ± std`` (accuracies in %); a paired ``diff``: signed, with ``(seeds ahead/seeds)``."""
    if not stat:
        return "-"
    pct = "@" in metric
    m, sd = (100 * stat["mean"], 100 * stat["std"]) if pct else (stat["mean"], stat["std"])
    digits = 1 if pct else 3
    spread = f" ± {sd:.{digits}f}"
    if diff:
        return f"{m:+.{digits}f}{spread} ({stat['ahead']}/{stat['n']})"
    return f"{m:.{digits}f}" + (spread if stat["n"] > 1 else "")


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one table per evaluation encoder; accuracies in %, mean ± std over seeds; with
    ``result["paired"]``, a second table per encoder: each set's per-seed difference to the
    reference set (points for accuracies), mean ± std (seeds ahead / seeds)."""
    summary = result["summary"]
    cols = metric_columns(summary)
    names = {"fidelity_r2": "fidelity R²", "fidelity_cosine": "fidelity cos"}
    out = []
    for enc in dict.fromkeys(s["encoder"] for s in summary):
        seeds = result["protocol"]["seeds"]
        split = result["protocol"].get("split", "test")
        where = " (validation split)" if split == "validation" else ""
        out.append(f"Encoder {enc}, {seeds} seed{'s' if seeds > 1 else ''}{where}:\n")
        out.append("| pre-training set | " + " | ".join(names.get(c, c) for c in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for s in summary:
            if s["encoder"] == enc:
                out.append(f"| {s['set']} | " + " | ".join(_cell(c, s.get(c)) for c in cols) + " |")
        out.append("")
        pairs = [p for p in result.get("paired", {}).get("summary", []) if p["encoder"] == enc]
        if pairs:
            ref = result["paired"]["reference"]
            out.append(f"Minus {ref}, paired by seed (the same encoder init and label subsets): "
                       "mean ± std of the differences (seeds ahead):\n")
            out.append("| pre-training set | " + " | ".join(names.get(c, c) for c in cols) + " |")
            out.append("|---" * (len(cols) + 1) + "|")
            for p in pairs:
                cells = " | ".join(_cell(c, p.get(c), diff=True) for c in cols)
                out.append(f"| {p['set']} | {cells} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"
