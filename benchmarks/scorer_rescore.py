"""Headline EMT drop under a second scorer: evaluation runs (folders `evaluate()` wrote: results.json,
alpha_<a>/generations.jsonl) rescored by a second scorer: EMT per subset under the stored scorer and under the second
one, each steered run's change against the base run (the first folder's first alpha) under both with its paired 95%
bootstrap interval over prompts, and how the two scorers agree on the continuations.

    python -m benchmarks scorer_rescore RUN... --scorer jigsaw-bilstm    # the Jigsaw BiLSTM: shares nothing with
                                                                         # the steered model
    python -m benchmarks scorer_rescore RUN... [--classifier FOLDER]     # the classifier of `scorer_classifier`

Writes `docs/results/scorer_rescore.md` (hf-classifier) or `scorer_rescore-<scorer>[-<name>].md`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.results import Results, shown
from benchmarks.scorer_classifier import CLASSIFIER, NOT_INDEPENDENT, held_out_note
from destein_pl.evaluation.scorers import HFClassifierScorer, ToxicityScorer, build_scorer


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="evaluation folders, the base model's first")
    parser.add_argument("--scorer", default="hf-classifier",
                        help="the second scorer: hf-classifier (the classifier of `scorer_classifier`, default) or a "
                             "scorer's short name, e.g. jigsaw-bilstm")
    parser.add_argument("--classifier", type=Path, default=None,
                        help=f"with --scorer hf-classifier: the classifier's folder (default: runs/{CLASSIFIER})")
    parser.add_argument("--batch-size", type=int, default=32, help="with --scorer hf-classifier: texts per batch")
    parser.add_argument("--name", default=None, help="a name for this set of runs, added to the results file's")


def output_fields(args: argparse.Namespace) -> dict[str, str]:
    """`{scorer_tag}`: empty for hf-classifier (whose file predates the option), else `-<scorer>[-<name>]`."""
    tag = "" if args.scorer == "hf-classifier" else f"-{args.scorer}"
    return {"scorer_tag": tag + (f"-{args.name}" if args.name else "")}


def read_run(folder: Path) -> list[dict[str, Any]]:
    """Every alpha of an evaluation folder: its stored metrics, scorer and records (in prompt order)."""
    from destein_pl.evaluation.runs import read_generations

    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"{folder}: no results.json; expected a folder written by evaluate()")
    data = json.loads(path.read_text())
    runs = []
    for run in data["runs"]:
        records = read_generations(folder / f"alpha_{run['alpha']:g}")
        if not records:
            raise SystemExit(f"{folder}: no generations for alpha {run['alpha']:g}")
        runs.append({"label": f"{folder.name}, alpha {run['alpha']:g}", "alpha": run["alpha"],
                     "metrics": run["metrics"], "scorer": data.get("scorer", {}).get("name", "unknown"),
                     "records": sorted(records.values(), key=lambda r: r["index"])})
    return runs


def subset_emt(records: list[dict[str, Any]], scores: list[list[float | None]], subset: str) -> tuple[float, int]:
    """EMT of the records of a subset (`toxic`, `nontoxic`, `all`) by the library's metric, and its prompts."""
    from destein_pl.evaluation.metrics import ExpectedMaxToxicity
    from destein_pl.evaluation.prompts import Prompt

    rows = [i for i, r in enumerate(records)
            if subset == "all" or Prompt(r["id"], r["prompt"], r["prompt_toxicity"]).subset == subset]
    if not rows:
        return math.nan, 0
    metric = ExpectedMaxToxicity()
    values = torch.tensor([[math.nan if v is None else v for v in scores[i]] for i in rows], dtype=torch.float64)
    metric.update(torch.tensor(rows), values)
    return float(metric.compute()), len(rows)


def classifier_scores(scorer: ToxicityScorer, records: list[dict[str, Any]]) -> tuple[list[list[float]], int]:
    """The second scorer's toxicity of every continuation, per record. An empty (or whitespace) continuation has no
    token for it to read: it scores 0, as Perspective scores it; returns how many there were. Texts go to the scorer
    sorted by length (less padding; with right padding a text's score does not depend on its batch)."""
    texts = [t for r in records for t in r["continuations"]]
    filled = sorted((i for i, t in enumerate(texts) if t.strip()), key=lambda i: len(texts[i]))
    flat = [0.0] * len(texts)
    for i, value in zip(filled, scorer.score([texts[i] for i in filled])):
        flat[i] = value
    out, start = [], 0
    for r in records:
        out.append(flat[start : start + len(r["continuations"])])
        start += len(r["continuations"])
    return out, len(texts) - len(filled)


def change(value: float, base: float) -> str:
    return "" if base == 0 or math.isnan(base) else f"{100 * (value / base - 1):+.1f}%"


def second_scorer(args: argparse.Namespace, results: Results) -> tuple[ToxicityScorer, str]:
    """The second scorer the options name, and how the results describe it."""
    if args.scorer != "hf-classifier":
        return build_scorer(args.scorer), f"{args.scorer} (shares neither the steered model nor its pairs' corpus)"
    classifier = args.classifier or results.runs / CLASSIFIER
    if not (classifier / "config.json").is_file():
        raise SystemExit(f"no classifier at {shown(classifier)}: build it with `python -m benchmarks "
                         f"scorer_classifier` (no model hub is reachable here, so no published classifier can be used)")
    return (HFClassifierScorer(model=str(classifier), batch_size=args.batch_size, device="cpu"),
            f"hf-classifier (`{shown(classifier)}`{held_out_note(classifier)}). {NOT_INDEPENDENT}")


def prompt_maxima(records: list[dict[str, Any]], scores: list[list[float | None]], subset: str) -> dict[str, float]:
    """Each prompt's most toxic continuation under `scores`, for one subset's prompts (by its Perspective toxicity)."""
    from destein_pl.evaluation.prompts import Prompt

    return {r["id"]: max(v for v in values if v is not None) for r, values in zip(records, scores)
            if Prompt(r["id"], r["prompt"], r["prompt_toxicity"]).subset == subset and any(v is not None for v in values)}


def drop(evaluation: dict[str, Any], base: dict[str, Any], scores: str, subset: str) -> str:
    """A run's EMT minus the base run's on a subset under one scorer (`stored` or `second`), paired over prompts,
    with its 95% bootstrap interval."""
    from benchmarks.claims import paired_bootstrap

    diff, low, high = paired_bootstrap(prompt_maxima(evaluation["records"], evaluation[scores], subset),
                                       prompt_maxima(base["records"], base[scores], subset))
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"


def run(args: argparse.Namespace, results: Results) -> None:
    """EMT of each run and subset under the stored scorer and under the second one, each steered run's change
    against the base run (the first run of the first folder) under both, and the scorers' agreement."""
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    folders, batch_size = args.runs, args.batch_size
    runs = [one for folder in folders for one in read_run(folder)]
    ids = [r["id"] for r in runs[0]["records"]]
    for evaluation in runs[1:]:
        if [r["id"] for r in evaluation["records"]] != ids:
            raise SystemExit(f"{evaluation['label']}: other prompts than {runs[0]['label']}; EMT changes need "
                             f"the same prompts")
    scorer, described = second_scorer(args, results)
    scorer.setup()  # the model load is not part of the rescoring rate
    pairs_stored, pairs_second, empty, started = [], [], 0, time.perf_counter()
    for evaluation in runs:
        evaluation["stored"] = [r["toxicity"] for r in evaluation["records"]]
        evaluation["second"], blank = classifier_scores(scorer, evaluation["records"])
        empty += blank
        for stored, ours in zip(evaluation["stored"], evaluation["second"]):
            pairs_stored += [s for s, _ in zip(stored, ours) if s is not None]
            pairs_second += [c for s, c in zip(stored, ours) if s is not None]
        for subset in ("toxic", "nontoxic"):  # the stored EMT must come out of the stored scores again
            recomputed, _ = subset_emt(evaluation["records"], evaluation["stored"], subset)
            stored_emt = evaluation["metrics"][subset]["emt"]
            if not (math.isnan(recomputed) and stored_emt is None) and abs(recomputed - stored_emt) > 1e-6:
                raise SystemExit(f"{evaluation['label']}: stored {subset} EMT {stored_emt} but its scores give "
                                 f"{recomputed}")
        print(f"{evaluation['label']}: rescored", flush=True)
    seconds = time.perf_counter() - started
    continuations = sum(len(t) for evaluation in runs for t in evaluation["second"])

    base = runs[0]
    if base["alpha"] != 0:
        print(f"note: the base run {base['label']} is steered (alpha {base['alpha']:g}); changes are against it")
    stored_name = " / ".join(sorted({evaluation["scorer"] for evaluation in runs}))
    lines = [f"| run | subset | prompts | EMT, {stored_name} | change vs base | EMT change [95%] | EMT, {args.scorer} "
             f"| change vs base | EMT change [95%] |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for subset in ("toxic", "nontoxic"):
        base_stored, _ = subset_emt(base["records"], base["stored"], subset)
        base_ours, _ = subset_emt(base["records"], base["second"], subset)
        for evaluation in runs:
            stored, count = subset_emt(evaluation["records"], evaluation["stored"], subset)
            ours, _ = subset_emt(evaluation["records"], evaluation["second"], subset)
            if not count:
                continue
            if evaluation is base:
                cells = ["base", "-", "base", "-"]
            else:
                cells = [change(stored, base_stored), drop(evaluation, base, "stored", subset),
                         change(ours, base_ours), drop(evaluation, base, "second", subset)]
            lines.append(f"| {evaluation['label']} | {subset} | {count} | {stored:.3f} | {cells[0]} | {cells[1]} | "
                         f"{ours:.3f} | {cells[2]} | {cells[3]} |")
    rho = spearmanr(pairs_stored, pairs_second).statistic
    toxic_stored = [s >= 0.5 for s in pairs_stored]
    toxic_second = [s >= 0.5 for s in pairs_second]
    agree = sum(a == b for a, b in zip(toxic_stored, toxic_second)) / len(toxic_stored)
    kappa = cohen_kappa_score(toxic_stored, toxic_second) if len(set(toxic_stored + toxic_second)) > 1 else math.nan
    kappa = "n/a" if math.isnan(kappa) else f"{kappa:.3f}"
    auroc = (f"; the second scorer's AUROC for the stored scorer's toxic (>= 0.5) continuations "
             f"{roc_auc_score(toxic_stored, pairs_second):.3f}" if 0 < sum(toxic_stored) < len(toxic_stored) else "")
    body = (f"Continuations of {len(runs)} runs on the same {len(ids)} prompts "
            f"({', '.join(f'`{shown(f)}`' for f in folders)}), EMT (mean over prompts of the most toxic of their "
            f"continuations) under the scorer the runs stored ({stored_name}) and rescored by {described}; changes "
            f"are against the base run ({base['label']}), with the paired 95% bootstrap interval of the EMT "
            f"difference over prompts (2,000 resamples). Subsets by prompt toxicity (Perspective) >= 0.5.\n\n"
            + "\n".join(lines)
            + f"\n\nAgreement of the two scorers on the {len(pairs_stored)} scored continuations: Spearman rho "
            f"{rho:.3f}; both on the same side of 0.5 for {100 * agree:.1f}% of them (Cohen's kappa {kappa}){auroc}. {empty or 'No'} empty continuations (they "
            f"count as 0 under the second scorer, as Perspective scores them). "
            f"Rescoring: {continuations} continuations in {seconds:.0f} s "
            f"({continuations / seconds:.0f} texts/s, batches of {batch_size}).")
    results.write(f"scorer_rescore{output_fields(args)['scorer_tag']}", "Headline EMT drop under a second scorer", body)
