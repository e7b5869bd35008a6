"""One alpha's evaluation folder: its stored generations (what resume reuses) and its metrics.

`<output_dir>/alpha_<a>/` holds `generations.jsonl` (one line per prompt: its text, continuations, their toxicity
and perplexity, appended as they are produced), `settings.json` (what the lines were produced with) and, at the
end, `results.json`. A stored line is reused only for the same settings (else the folder is refused) and the same
prompt id with the same prompt text, padded to the same width (the longest prompt of the run: another width
changes the last bits of the logits, so a prompt shared by two different samples of prompts is made again); its
missing toxicity scores are scored again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from destein_pl.evaluation.metrics import METRIC_NAMES, METRICS
from destein_pl.evaluation.prompts import Prompt
from destein_pl.files import append_jsonl, atomic_path, ensure_settings, read_jsonl

SUBSETS = ("toxic", "nontoxic", "all")


class ChangedPromptsError(ValueError):
    """The output folder holds prompts under the ids given now, but with other text."""


def new_metrics() -> nn.ModuleDict:
    """One set of metrics per subset of prompts (toxic, non-toxic, all)."""
    return nn.ModuleDict({subset: nn.ModuleDict({m.name: m.build() for m in METRICS}) for subset in SUBSETS})


def _nan_if_none(values: Iterable[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


def read_generations(folder: Path) -> dict[str, dict[str, Any]]:
    """Every stored record of a folder by prompt id; a later line for an id (a rescored one) replaces an earlier."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("generations*.jsonl")):
        for record in read_jsonl(path, "generations file"):
            records[record["id"]] = record
    return records


class AlphaRun:
    """The evaluation of one alpha: its folder, its stored generations, and its metrics.

    Args:
        alpha: the steering strength.
        folder: its folder.
        settings: what its generations depend on (`EvaluationConfig.fingerprint`).
        prompts: the prompts of this run (all processes'), to check stored lines against.
        width: the padded prompt width of this run; stored lines made at another width are made again.
        regenerate_changed: make prompts whose stored text differs anew instead of refusing.
        rank, world_size: this process and how many there are; each process appends to its own file.
        device: where the metric states live.
    """

    def __init__(self, alpha: float, folder: Path, settings: dict[str, Any], prompts: Sequence[Prompt],
                 width: int | None = None, regenerate_changed: bool = False, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        self.alpha, self.folder = alpha, folder
        ensure_settings(folder, settings)
        stored = read_generations(folder)
        changed = [p.id for p in prompts if p.id in stored and stored[p.id]["prompt"] != p.text]
        if changed and not regenerate_changed:
            raise ChangedPromptsError(
                f"{folder} holds {len(changed)} prompt(s) under the same id with other text (e.g. "
                f"{', '.join(map(repr, changed[:3]))}): the prompts file changed since they were generated. Use "
                f"another output_dir, or set evaluation.on_changed_prompts=regenerate to make them anew")
        wanted = {p.id: p.text for p in prompts}
        self.records = {i: r for i, r in stored.items() if wanted.get(i) == r["prompt"] and r.get("width") == width}
        self.resumed = len(self.records)
        name = "generations.jsonl" if world_size == 1 else f"generations.rank{rank}.jsonl"
        self.part = folder / name
        self.metrics = new_metrics().to(device)
        self.generated = 0
        self.rescored = 0

    def missing_scores(self, prompt_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Stored records among `prompt_ids` with a toxicity score that could not be obtained."""
        return [self.records[i] for i in prompt_ids if i in self.records and None in self.records[i]["toxicity"]]

    def add(self, records: list[dict[str, Any]], rescored: bool = False) -> None:
        """Append new (or rescored) prompts' records to this process's generations file, flushed at once."""
        append_jsonl(self.part, records)
        for record in records:
            self.records[record["id"]] = record
        if rescored:
            self.rescored += len(records)
        else:
            self.generated += len(records)

    def update(self, keys: Tensor, prompts: list[Prompt]) -> None:
        """Feed the stored records of a batch of prompts to the metrics of their subsets.

        Every subset is updated, with no rows where the batch has none of its prompts: each process then holds
        typed state for every metric, which the cross-process sync needs.
        """
        k = next(len(self.records[p.id]["toxicity"]) for p in prompts)
        for subset in SUBSETS:
            rows = [i for i, p in enumerate(prompts) if subset in ("all", p.subset)]
            records = [self.records[prompts[i].id] for i in rows]
            subset_keys = keys[rows]
            inputs = {field: torch.tensor([_nan_if_none(r[field]) for r in records]).view(-1, k)
                      for field in ("toxicity", "perplexity")}
            inputs["continuations"] = [r["continuations"] for r in records]
            for spec in METRICS:
                self.metrics[subset][spec.name].update(subset_keys, inputs[spec.reads])

    def compute(self) -> dict[str, dict[str, float]]:
        """Metric values per subset, synchronised across processes (NaN where a subset has no prompt)."""
        return {subset: {name: float(self.metrics[subset][name].compute()) for name in METRIC_NAMES}
                for subset in SUBSETS}

    def merge(self, prompts: Sequence[Prompt]) -> list[dict[str, Any]]:
        """Rewrite `generations.jsonl` as every process's records, each prompt once: this run's prompts in prompt
        order, then lines of other prompts the folder held (kept, not lost). Returns this run's records."""
        records = read_generations(self.folder)
        order = {p.id: i for i, p in enumerate(prompts)}
        current = sorted((r for r in records.values() if r["id"] in order), key=lambda r: order[r["id"]])
        others = [r for r in records.values() if r["id"] not in order]
        with atomic_path(self.folder / "generations.jsonl") as tmp:
            append_jsonl(tmp, current + others)
        for path in self.folder.glob("generations.rank*.jsonl"):
            path.unlink()
        return current


def summary_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompts per subset and scores that could not be obtained, from the merged records."""
    subsets = [Prompt(r["id"], r["prompt"], r["prompt_toxicity"]).subset for r in records]
    return {
        "prompts": {"toxic": subsets.count("toxic"), "nontoxic": subsets.count("nontoxic"), "all": len(records)},
        "continuations": sum(len(r["continuations"]) for r in records),
        "missing_scores": sum(v is None for r in records for v in r["toxicity"]),
        "missing_perplexities": sum(v is None for r in records for v in r["perplexity"]),
        "empty_continuations": sum(not text.strip() for r in records for text in r["continuations"]),
    }


EMPTY_SHARE_WARNING = 0.5
"""Above this share of empty continuations an alpha's metrics are flagged: toxicity and Dist-n of nothing say
nothing about the model (steering so strong that it ends every text at once reads as a perfect detox)."""


def count_warnings(alpha: float, counts: dict[str, Any]) -> list[str]:
    """What `results.json` and `results.md` flag about one alpha's counts: mostly empty continuations."""
    total, empty = counts["continuations"], counts.get("empty_continuations", 0)
    if total and empty / total > EMPTY_SHARE_WARNING:
        return [(f"alpha={alpha:g}: {empty} of {total} continuations are empty; its toxicity and diversity describe "
                 f"no text (steering too strong, or a model that ends its text at once), not a detoxification")]
    return []
