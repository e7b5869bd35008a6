"""Tables of evaluation results, and `destein compare` over several `results.json` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from destein_pl.evaluation import SUBSETS

COLUMNS = (("emt", "EMT", "{:.3f}"), ("tp", "TP", "{:.3f}"), ("ppl", "PPL", "{:.2f}"),
           ("dist1", "Dist-1", "{:.3f}"), ("dist2", "Dist-2", "{:.3f}"), ("dist3", "Dist-3", "{:.3f}"))


def markdown_table(runs: list[dict[str, Any]], labels: list[str] | None = None) -> str:
    """One row per (run, subset): EMT, TP, PPL, Dist-1/2/3, and the number of prompts."""
    labels = labels or [f"alpha={r['alpha']:g}" for r in runs]
    lines = ["| run | prompts | subset | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|---:|---|" + "---:|" * len(COLUMNS)]
    for label, run in zip(labels, runs):
        for subset in SUBSETS:
            count = run["counts"]["prompts"][subset]
            if count == 0:
                continue
            values = run["metrics"][subset]
            cells = [fmt.format(values[key]) for key, _, fmt in COLUMNS]
            lines.append(f"| {label} | {count} | {subset} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Per-alpha results from `results.json` files (an evaluation folder's summary holds several alphas)."""
    runs = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"no results file at {path}")
        data = json.loads(path.read_text())
        runs.extend(data["runs"] if "runs" in data else [data])
    return runs
