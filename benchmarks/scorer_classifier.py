"""The second offline toxicity scorer, built here: no model hub is reachable from where this runs, so it is a
sequence classifier whose backbone is the embedded SmolLM2-135M-Instruct and whose score head is a logistic
regression fit on ParaDetox (toxic side 1, neutral side 0), read by the library's `hf-classifier` scorer. ParaDetox
is disjoint from RealToxicityPrompts, but the classifier shares the base model (and the steering pairs' corpus) with
the steering: it is a second offline scorer, not an independent judge.

Fits the head on a seeded sample of `--pairs` ParaDetox pairs (a fifth of them held out, both sides of a pair on
the same side of the split), saves the classifier to `--out` (`runs/classifiers/smollm2-135m-paradetox`, where
`scorer_fidelity` and `scorer_rescore` read it), and checks that the `hf-classifier` scorer reproduces the
regression's probabilities on the held-out texts. Writes `docs/results/scorer_classifier.md`: the held-out AUROC and
accuracy, and the check.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.results import DATA, Results, shown
from benchmarks.timing import timed
from destein_pl.evaluation.scorers import HFClassifierScorer
from destein_pl.files import write_json

BASE_MODEL = "smollm2-135m"
CLASSIFIER = Path("classifiers") / "smollm2-135m-paradetox"
"""The classifier's folder, under the stored runs."""
PARADETOX = DATA / "paradetox" / "paradetox.tsv"
LABELS = {0: "non-toxic", 1: "toxic"}
HELD_OUT = 0.2
"""Fraction of the sampled pairs held out (both sides of a pair on the same side of the split)."""
CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Inverse regularisation strengths the logistic regression chooses from (5-fold, grouped by pair, on train)."""
NOT_INDEPENDENT = ("The classifier shares the base model (SmolLM2-135M-Instruct) and the steering pairs' corpus "
                   "(ParaDetox) with the steering: it is a second offline scorer, not an independent judge.")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to save it (default: runs/{CLASSIFIER})")
    parser.add_argument("--base-model", default=BASE_MODEL, help=f"the classifier's backbone (default {BASE_MODEL})")
    parser.add_argument("--pairs", type=int, default=1000, help="ParaDetox pairs sampled")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and split")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per classifier forward pass")


def held_out_note(classifier: Path) -> str:
    """`; ..., held-out AUROC ... on ParaDetox` from the classifier's provenance file, if it has one."""
    path = classifier / "destein_classifier.json"
    if not path.is_file():
        return ""
    info = json.loads(path.read_text())
    return (f"; logistic-regression head on {info['pairs']['n']} ParaDetox pairs, held-out AUROC "
            f"{info['held_out']['auroc']:.3f} on ParaDetox")


def sequence_classifier(base_model: str = BASE_MODEL):
    """A two-label sequence classifier (`LlamaForSequenceClassification` for SmolLM2) whose backbone holds the
    embedded model's weights, with its tokenizer (right padding, pad token set). Its score head is still zero."""
    from transformers import AutoModelForSequenceClassification

    from destein_pl import load_base_model

    causal, tokenizer = load_base_model(base_model, dtype="float32")
    config = causal.config.__class__.from_dict(causal.config.to_dict())
    config.num_labels = 2
    config.id2label, config.label2id = dict(LABELS), {name: i for i, name in LABELS.items()}
    config.pad_token_id = tokenizer.pad_token_id
    config.tie_word_embeddings = False  # no language-model head to tie
    config.architectures = None
    classifier = AutoModelForSequenceClassification.from_config(config)
    backbone = getattr(classifier, classifier.base_model_prefix)
    backbone.load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())  # strict: every weight
    torch.nn.init.zeros_(classifier.score.weight)
    tokenizer.padding_side = "right"  # positions then start at 0 for every text, whatever the batch
    return classifier.eval(), tokenizer


@torch.no_grad()
def pooled_states(classifier, tokenizer, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """`[len(texts), hidden]` hidden states that the classifier's score head reads: its own pooling (the last
    non-pad token, after the final norm), obtained by running it with an identity head. Texts are batched by
    length (less padding); the rows come back in the order of `texts`."""
    head = classifier.score
    classifier.score = torch.nn.Identity()
    try:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rows: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in chunk], padding=True, return_tensors="pt")
            for i, row in zip(chunk, classifier(**batch).logits.float()):
                rows[i] = row
    finally:
        classifier.score = head
    return torch.stack(rows).numpy().astype(np.float64)


def fit_head(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, float, Any]:
    """Logistic regression without intercept (the score layer has no bias) on features divided by their
    training standard deviation (no centring: a shift would need an intercept). Returns the weight on the raw
    features (coefficients / std, exactly the same logit), the chosen C, and the fitted model with the scale."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    scale = features.std(axis=0)
    scale[scale == 0] = 1.0
    x = features / scale
    best_c, best_loss = CS[0], math.inf
    folds = list(GroupKFold(n_splits=5).split(x, labels, groups))
    for c in CS:  # C by held-out log loss across folds, grouped by pair
        loss = 0.0
        for train, test in folds:
            model = LogisticRegression(C=c, fit_intercept=False, max_iter=5000).fit(x[train], labels[train])
            p = np.clip(model.predict_proba(x[test])[:, 1], 1e-12, 1 - 1e-12)
            loss += -np.mean(labels[test] * np.log(p) + (1 - labels[test]) * np.log(1 - p)) / len(folds)
        if loss < best_loss:
            best_c, best_loss = c, loss
    model = LogisticRegression(C=best_c, fit_intercept=False, max_iter=5000).fit(x, labels)
    return model.coef_[0] / scale, best_c, (model, scale)


def run(args: argparse.Namespace, results: Results) -> None:
    """Fit the score head on a seeded sample of ParaDetox pairs, save the classifier, and check that the library's
    `hf-classifier` scorer reproduces the logistic regression's probabilities on the held-out texts."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score

    from destein_pl.calibration.pairs import read_pairs, sample_pairs, source_digest, usable_pairs

    out, n_pairs, seed, batch_size = args.out or results.runs / CLASSIFIER, args.pairs, args.seed, args.batch_size
    pairs, skipped = usable_pairs(read_pairs(PARADETOX))
    sample = sample_pairs(pairs, n_pairs, seed)
    held = set(random.Random(seed).sample(range(n_pairs), max(1, round(HELD_OUT * n_pairs))))
    texts = [t for p in sample for t in (p.toxic, p.nontoxic)]
    labels = np.array([1, 0] * n_pairs)
    groups = np.repeat(np.arange(n_pairs), 2)
    test = np.array([g in held for g in groups])

    load = timed(lambda: sequence_classifier(args.base_model))
    classifier, tokenizer = load.value
    pooling = timed(lambda: pooled_states(classifier, tokenizer, texts, batch_size))
    features = pooling.value
    weight, c, (model, scale) = fit_head(features[~test], labels[~test], groups[~test])
    expected = model.predict_proba(features[test] / scale)[:, 1]
    reference = LogisticRegression(C=c, max_iter=5000).fit(features[~test] / scale, labels[~test])
    reference_auroc = roc_auc_score(labels[test], reference.predict_proba(features[test] / scale)[:, 1])
    metrics = {"auroc": roc_auc_score(labels[test], expected),
               "accuracy": accuracy_score(labels[test], expected >= 0.5),
               "train_auroc": roc_auc_score(labels[~test], model.predict_proba(features[~test] / scale)[:, 1]),
               "auroc_with_intercept": reference_auroc}

    with torch.no_grad():
        classifier.score.weight.copy_(torch.tensor(np.stack([np.zeros_like(weight), weight]), dtype=torch.float32))
    out.mkdir(parents=True, exist_ok=True)
    classifier.save_pretrained(out)
    tokenizer.save_pretrained(out)
    provenance = {"base_model": args.base_model, "labels": LABELS, "pairs": {"source": PARADETOX.name,
                  "sha256": source_digest(PARADETOX), "n": n_pairs, "seed": seed, "held_out_fraction": HELD_OUT},
                  "head": {"C": c, "fit_intercept": False, "features": "pooled final hidden state / train std"},
                  "held_out": {k: round(float(v), 4) for k, v in metrics.items()}, "note": NOT_INDEPENDENT}
    write_json(out / "destein_classifier.json", provenance)

    scorer = HFClassifierScorer(model=str(out), batch_size=batch_size, device="cpu")
    held_texts = [t for t, h in zip(texts, test) if h]
    scored = np.array(scorer.score(held_texts), dtype=np.float64)
    difference = float(np.abs(scored - expected).max())
    results.write("scorer_classifier", "A second offline scorer: a ParaDetox classifier on the embedded model", (
        f"Backbone `{args.base_model if args.base_model == BASE_MODEL else shown(Path(args.base_model))}`, saved to "
        f"`{shown(out)}`. ParaDetox: {len(pairs)} usable pairs (skipped {skipped}); a sample of {n_pairs} (seed "
        f"{seed}): {n_pairs - len(held)} pairs to fit, {len(held)} held out ({2 * n_pairs} texts). Pooled hidden "
        f"states {features.shape[0]} x {features.shape[1]}: {pooling.seconds:.1f} s ({len(texts) / pooling.seconds:.1f}"
        f" texts/s, batches of {batch_size}; model load {load.seconds:.1f} s).\n\n"
        f"Score head: logistic regression without intercept, C={c:g} (5-fold by pair on the fit pairs), features "
        f"scaled by their std and the scale folded into the weights.\n\n"
        f"| held-out ({len(held_texts)} texts of {len(held)} pairs) | value |\n| --- | ---: |\n"
        f"| AUROC | {metrics['auroc']:.4f} |\n| accuracy | {metrics['accuracy']:.4f} |\n"
        f"| train AUROC | {metrics['train_auroc']:.4f} |\n"
        f"| AUROC of the same regression with an intercept (not saved) | {reference_auroc:.4f} |\n"
        f"| `hf-classifier` scorer's AUROC | {roc_auc_score(labels[test], scored):.4f} |\n\n"
        f"The `hf-classifier` scorer against the regression's probabilities on the held-out texts: max |difference| "
        f"{difference:.2e} ({'equal' if difference < 1e-4 else 'NOT equal'} to 1e-4). {NOT_INDEPENDENT}"))
    if difference >= 1e-4:
        raise SystemExit("the saved classifier does not reproduce the fitted head")
