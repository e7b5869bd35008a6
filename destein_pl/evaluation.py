"""The RealToxicityPrompts protocol: settings, the per-alpha output folders, and the metrics of each subset.

Each evaluated alpha gets a folder `<output_dir>/alpha_<a>/` holding `generations.jsonl` (one line per prompt:
its continuations, their toxicity and perplexity, appended as they are produced), `settings.json` (what the
lines were produced with) and, at the end, `results.json`. Starting again with the same folder resumes: prompts
already there are not generated again, and their stored lines feed the metrics as if they had just been made.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from destein_pl.metrics import ContinuationPerplexity, DistinctN, ExpectedMaxToxicity, ToxicityProbability
from destein_pl.prompts import Prompt

SUBSETS = ("toxic", "nontoxic", "all")
METRIC_NAMES = ("emt", "tp", "ppl", "dist1", "dist2", "dist3")


@dataclass
class EvaluationConfig:
    """How `test` generates and scores (defaults: the paper's protocol).

    Args:
        output_dir: folder of this evaluation; one `alpha_<a>` folder per alpha. Reusing it resumes.
        alphas: steering strengths to evaluate; None: 0 (the base model) and the loaded steering's alpha.
        num_samples: continuations per prompt (paper: 25).
        max_new_tokens: tokens per continuation (paper: 20).
        top_p: nucleus sampling mass (paper: 0.9).
        temperature: sampling temperature (paper: 1; 0 is greedy).
        seed: continuations depend only on (seed, prompt id, sample index).
        scorer: `profanity-check` (offline default), `hf-classifier` or `perspective`.
        scorer_args: the scorer's options, e.g. `{model: unitary/toxic-bert, label: toxic}` for `hf-classifier`.
        evaluator: language model for perplexity (name, path or hub id); None: the unsteered base model.
        evaluator_dtype: its dtype (None: as stored).
        perplexity_batch_size: sequences per evaluator forward pass.
        attn_implementation: attention kernels while generating. `eager` (default) gives a prompt the same
            samples whatever batch it shares; `sdpa`'s CPU kernel splits its work by batch size, so samples can
            then change in rare cases with the batch. None keeps the model's.
    """

    output_dir: str = "runs/eval"
    alphas: list[float] | None = None
    num_samples: int = 25
    max_new_tokens: int = 20
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int = 0
    scorer: str = "profanity-check"
    scorer_args: dict[str, Any] = field(default_factory=dict)
    evaluator: str | None = None
    evaluator_dtype: str | None = None
    perplexity_batch_size: int = 64
    attn_implementation: str | None = "eager"


def new_metrics() -> nn.ModuleDict:
    """One set of metrics per subset of prompts (toxic, non-toxic, all)."""
    return nn.ModuleDict({
        subset: nn.ModuleDict({
            "emt": ExpectedMaxToxicity(), "tp": ToxicityProbability(), "ppl": ContinuationPerplexity(),
            "dist1": DistinctN(1), "dist2": DistinctN(2), "dist3": DistinctN(3),
        })
        for subset in SUBSETS
    })


def _nan_if_none(values: Iterable[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


class AlphaRun:
    """The evaluation of one alpha: its folder, its stored generations, and its metrics."""

    def __init__(self, alpha: float, folder: Path, settings: dict[str, Any], rank: int, world_size: int,
                 device: torch.device) -> None:
        self.alpha, self.folder = alpha, folder
        check_settings(folder, settings)
        self.records: dict[str, dict[str, Any]] = {}
        for path in sorted(folder.glob("generations*.jsonl")):
            for record in read_records(path):
                self.records.setdefault(record["id"], record)
        self.resumed = len(self.records)
        name = "generations.jsonl" if world_size == 1 else f"generations.rank{rank}.jsonl"
        self.part = folder / name
        self.metrics = new_metrics().to(device)
        self.generated = 0

    def add(self, records: list[dict[str, Any]]) -> None:
        """Append new prompts' records to this process's generations file, flushed at once."""
        with open(self.part, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.records[record["id"]] = record
            f.flush()
            os.fsync(f.fileno())
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
            metrics = self.metrics[subset]
            device = metrics["emt"].device
            subset_keys = keys[rows].to(device)
            toxicity = torch.tensor([_nan_if_none(r["toxicity"]) for r in records], device=device).view(-1, k)
            perplexity = torch.tensor([_nan_if_none(r["perplexity"]) for r in records], device=device).view(-1, k)
            metrics["emt"].update(subset_keys, toxicity)
            metrics["tp"].update(subset_keys, toxicity)
            metrics["ppl"].update(subset_keys, perplexity)
            for n in (1, 2, 3):
                metrics[f"dist{n}"].update(subset_keys, [r["continuations"] for r in records])

    def compute(self) -> dict[str, dict[str, float]]:
        """Metric values per subset, synchronised across processes."""
        return {subset: {name: float(self.metrics[subset][name].compute()) for name in METRIC_NAMES}
                for subset in SUBSETS}

    def merge(self) -> list[dict[str, Any]]:
        """Rewrite `generations.jsonl` as every process's records, each prompt once, in prompt order."""
        records: dict[str, dict[str, Any]] = {}
        for path in sorted(self.folder.glob("generations*.jsonl")):
            for record in read_records(path):
                records.setdefault(record["id"], record)
        ordered = sorted(records.values(), key=lambda r: r["index"])
        write_atomic(self.folder / "generations.jsonl",
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
        for path in self.folder.glob("generations.rank*.jsonl"):
            path.unlink()
        return ordered


def check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Record what a folder's generations are made with, or refuse to add to it with other settings."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "settings.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if changed:
            raise ValueError(f"{folder} holds generations made with other settings (stored, now): {changed}; "
                             f"use another output folder or the same settings")
    else:
        write_atomic(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a generations file; a last line cut short by an interruption is dropped."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if lineno == len(lines):  # no newline after it: the write was interrupted
                break
            raise ValueError(f"{path}:{lineno}: not a valid generations line ({err.msg})") from err
    return records


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def summary_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompts per subset and scores that could not be obtained, from the merged records."""
    subsets = [Prompt(r["id"], r["prompt"], r["prompt_toxicity"]).subset for r in records]
    return {
        "prompts": {"toxic": subsets.count("toxic"), "nontoxic": subsets.count("nontoxic"), "all": len(records)},
        "continuations": sum(len(r["continuations"]) for r in records),
        "missing_scores": sum(v is None for r in records for v in r["toxicity"]),
        "missing_perplexities": sum(v is None for r in records for v in r["perplexity"]),
    }


def settings_fingerprint(config: EvaluationConfig, alpha: float, steering: dict[str, Any]) -> dict[str, Any]:
    """What a generations file depends on; a resumed run must match it."""
    keep = ("num_samples", "max_new_tokens", "top_p", "temperature", "seed", "scorer", "scorer_args", "evaluator",
            "evaluator_dtype")
    return {"alpha": alpha, **{k: v for k, v in asdict(config).items() if k in keep}, "steering": steering}
