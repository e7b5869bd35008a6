"""Tables of evaluation results, and `destein compare` over several `results.json` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from destein_pl.evaluation.metrics import METRICS
from destein_pl.evaluation.runs import SUBSETS


def markdown_table(runs: list[dict[str, Any]], labels: list[str] | None = None) -> str:
    """One row per (run, subset): every metric, and the number of prompts; a column of missing toxicity scores
    when a run has any."""
    labels = labels or [f"alpha={r['alpha']:g}" for r in runs]
    missing = any(r["counts"].get("missing_scores") for r in runs)
    titles = [m.title for m in METRICS] + (["missing scores"] if missing else [])
    lines = ["| run | prompts | subset | " + " | ".join(titles) + " |", "|---|---:|---|" + "---:|" * len(titles)]
    for label, run in zip(labels, runs):
        for subset in SUBSETS:
            count = run["counts"]["prompts"][subset]
            if count == 0:
                continue
            values = run["metrics"][subset]
            cells = ["n/a" if values[m.name] is None else m.fmt.format(values[m.name]) for m in METRICS]
            if missing:
                cells.append(str(run["counts"]["missing_scores"]) if subset == "all" else "")
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
