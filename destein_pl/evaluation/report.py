"""Tables of evaluation results, and `destein compare` over several `results.json` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from destein_pl.evaluation.metrics import METRICS
from destein_pl.evaluation.runs import SUBSETS
from destein_pl.files import read_text


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
    """Per-alpha results from `results.json` files (an evaluation folder's summary holds several alphas), each with
    the `settings` it was measured with (read from its alpha folder's `settings.json` where the results predate
    them)."""
    runs = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"no results file at {path}")
        data = read_results(path)
        for run in data["runs"] if "runs" in data else [data]:
            folder = path.parent / f"alpha_{run['alpha']:g}" if "runs" in data else path.parent
            stored = folder / "settings.json"
            settings = run.get("settings") or (read_json_object(stored, "the settings.json `destein test` writes")
                                               if stored.is_file() else {})
            base_model = data.get("base_model", settings.get("base_model"))
            runs.append({**run, "settings": {**settings, "base_model": base_model},
                         "steering": run.get("steering") or data.get("steering") or {}})
    return runs


def read_json_object(path: Path, expected: str = "a results.json of `destein test`") -> dict[str, Any]:
    """A JSON object from a file, with an error naming the file and what was `expected` when it is not one."""
    try:
        data = json.loads(read_text(path, "results file"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); expected {expected}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON {type(data).__name__}, not an object; expected {expected}")
    return data


def read_results(path: Path) -> dict[str, Any]:
    """A `results.json` of `destein test`: an evaluation's summary (`runs`) or one alpha's (`alpha`, `metrics`,
    `counts`); anything else is an error naming the file and what is accepted."""
    data = read_json_object(path)
    runs = data.get("runs") if "runs" in data else [data]
    needed = ("alpha", "metrics", "counts")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and all(k in r for k in needed)
                                             and isinstance(r["alpha"], (int, float)) for r in runs):
        raise ValueError(f"{path}: not a results.json of `destein test` (it needs 'runs', or {', '.join(needed)}); "
                         f"give an evaluation folder or the results.json in it or in one of its alpha folders")
    return data


COMPARED = ("base_model", "prompts", "num_samples", "max_new_tokens", "top_p", "temperature", "scorer",
            "perplexity_model", "method")
"""The settings `destein compare` checks its rows against each other for: what makes their numbers comparable."""


def protocol(run: dict[str, Any]) -> dict[str, Any]:
    """What a run's numbers were measured with (`COMPARED`), as far as its results record it: its prompts as their
    count and digest (None where the results predate it), its method (`destein` for DeStein's own steering)."""
    settings = run.get("settings") or {}
    prompts = settings.get("prompts") or {}
    method = (run.get("steering") or {}).get("method") or {}
    found = {k: settings.get(k) for k in COMPARED if k not in ("prompts", "method")}
    found["prompts"] = {"count": prompts.get("count", run["counts"]["prompts"]["all"]), "sha256": prompts.get("sha256")}
    found["method"] = method.get("method", "destein")
    return found


def differences(runs: list[dict[str, Any]], labels: list[str]) -> str | None:
    """A note naming each setting of `COMPARED` in which the rows differ, with each row's value; None when they
    agree. Prompts are compared by their digest where every row records one, else by their count. A row at alpha 0
    (the base model) differs from the others in method by nature and is left out of that comparison."""
    protocols = [protocol(r) for r in runs]
    if not all(p["prompts"]["sha256"] for p in protocols):
        for p in protocols:
            p["prompts"] = {"count": p["prompts"]["count"]}
    parts = []
    for key in COMPARED:
        rows = [(label, p[key]) for label, p, r in zip(labels, protocols, runs) if key != "method" or r["alpha"]]
        if len({json.dumps(v, sort_keys=True, default=str) for _, v in rows}) > 1:
            shown = "; ".join(f"{label}: {_shown(key, value)}" for label, value in rows)
            parts.append(f"{key} ({shown})")
    if not parts:
        return None
    return f"**Note:** these rows were not measured alike; they differ in {', '.join(parts)}."


def _shown(key: str, value: Any) -> str:
    """A setting as the note shows it: prompts as their count and the start of their digest, a mapping as compact
    JSON."""
    if key == "prompts":
        return f"{value['count']} prompts" + (f" {value['sha256'][:12]}" if value.get("sha256") else "")
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
