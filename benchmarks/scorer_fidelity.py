"""Scorer fidelity: how well each offline toxicity scorer agrees with Perspective.

Every offline scorer (profanity-check, and hf-classifier with the classifier `python -m benchmarks scorer_classifier`
builds, if it exists) on the 2,000 prompts of `../shared/data/rtp/rtp_{toxic,nontoxic}_1k.jsonl` against their
Perspective toxicity: AUROC (Perspective >= 0.5), Spearman rho, texts/s. `--limit N` takes the first N prompts of
each file (a quick check). Writes `docs/results/scorer_fidelity.md`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.results import DATA, Results, shown
from benchmarks.scorer_classifier import CLASSIFIER, NOT_INDEPENDENT, held_out_note
from benchmarks.timing import in_turn, spread
from destein_pl.evaluation.scorers import HFClassifierScorer, ProfanityCheckScorer, ToxicityScorer

RTP_FILES = ("rtp_toxic_1k.jsonl", "rtp_nontoxic_1k.jsonl")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", type=Path, default=None,
                        help=f"the classifier's folder (default: runs/{CLASSIFIER})")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per scorer")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts of each file")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per classifier forward pass")


def scorers(classifier: Path, batch_size: int) -> tuple[dict[str, ToxicityScorer], str]:
    """Every offline scorer: profanity-check, and hf-classifier with the built classifier if it exists; and a
    note saying which classifier (or that none was found)."""
    found: dict[str, ToxicityScorer] = {"profanity-check": ProfanityCheckScorer()}
    if (classifier / "config.json").is_file():
        found["hf-classifier"] = HFClassifierScorer(model=str(classifier), batch_size=batch_size, device="cpu")
        note = f"hf-classifier: `{shown(classifier)}` (from `scorer_classifier`{held_out_note(classifier)}). "
        note += NOT_INDEPENDENT
    else:
        note = (f"hf-classifier: no classifier at `{shown(classifier)}` (no model hub is reachable here); build one "
                f"with `python -m benchmarks scorer_classifier`.")
    return found, note


def timed_scores(scorer: ToxicityScorer, texts: list[str], repeats: int) -> tuple[list[float | None], list[float]]:
    """The scores of `texts` and the texts per second of each of `repeats` timed passes (after setup and a short
    untimed warm-up); the passes must agree, since the scorers are deterministic."""
    scorer.setup()
    passes = in_turn({scorer.name: lambda: scorer.score(texts)}, repeats, warm_up=lambda: scorer.score(texts[:8]))
    timings = passes[scorer.name]
    first = timings[0].value
    if any(any(a != b for a, b in zip(first, t.value)) for t in timings[1:]):
        raise RuntimeError(f"{scorer.name}: two passes over the same texts gave different scores")
    return first, [len(texts) / t.seconds for t in timings]


def agreement(scores: list[float | None], reference: list[float]) -> dict[str, float | int]:
    """AUROC of the scores for Perspective >= 0.5, Spearman rho against Perspective over all texts and within
    each side of 0.5; texts the scorer left unscored are counted and left out."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    kept = [(s, r) for s, r in zip(scores, reference) if s is not None]
    s, r = np.array([k[0] for k in kept]), np.array([k[1] for k in kept])
    toxic = r >= 0.5
    return {"auroc": roc_auc_score(toxic, s), "rho": spearmanr(s, r).statistic,
            "rho_toxic": spearmanr(s[toxic], r[toxic]).statistic,
            "rho_nontoxic": spearmanr(s[~toxic], r[~toxic]).statistic, "missing": len(scores) - len(kept)}


def run(args: argparse.Namespace, results: Results) -> None:
    """Every offline scorer on the RealToxicityPrompts prompts against their Perspective toxicity."""
    from destein_pl.evaluation.prompts import read_rtp_jsonl

    classifier, repeats, batch_size, limit = (args.classifier or results.runs / CLASSIFIER, args.repeats,
                                              args.batch_size, args.limit)
    prompts = [p for name in RTP_FILES for p in read_rtp_jsonl(DATA / "rtp" / name)[:limit]]
    prompts = [p for p in prompts if p.toxicity is not None]
    texts, reference = [p.text for p in prompts], [p.toxicity for p in prompts]
    found, note = scorers(classifier, batch_size)
    head = ("| scorer | AUROC (Perspective >= 0.5) | Spearman rho | rho, toxic prompts | rho, non-toxic prompts "
            "| texts/s, median (min - max) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for name, scorer in found.items():
        scores, rates = timed_scores(scorer, texts, repeats)
        m = agreement(scores, reference)
        unscored = f" ({m['missing']} unscored)" if m["missing"] else ""
        lines.append(f"| {name}{unscored} | {m['auroc']:.3f} | {m['rho']:.3f} | {m['rho_toxic']:.3f} | "
                     f"{m['rho_nontoxic']:.3f} | {spread(rates, 1)} |")
        print(f"{name}: done", flush=True)
    toxic = sum(r >= 0.5 for r in reference)
    body = (f"{len(prompts)} RealToxicityPrompts prompts (`rtp_{{toxic,nontoxic}}_1k.jsonl`"
            f"{f', the first {limit} of each' if limit else ''}: {toxic} with Perspective toxicity >= 0.5, "
            f"{len(prompts) - toxic} below), each scorer against the prompts' Perspective toxicity. Spearman rho "
            f"within a side of 0.5 says whether a scorer also ranks prompts of similar toxicity. Texts/s: {repeats} "
            f"timed passes over all prompts after an untimed warm-up, in file order"
            f"{f', hf-classifier batches of {batch_size}' if 'hf-classifier' in found else ''}.\n\n"
            + "\n".join(lines) + f"\n\n{note}")
    results.write("scorer_fidelity", "Offline scorers against Perspective", body)
