"""Continuation probes: per-head probes that predict whether the model's own continuation of a context will be toxic,
which the forward-looking gate reads (`GateSettings.probes: continuation`).

The context gate's probes were fit on the steering pairs: they tell a toxic text from a non-toxic one. What the gate
should predict is whether what the model writes *next* will be toxic, and the model itself can teach that (the
self-induced idea the paper uses for its pairs):

1. **Labels.** Sample `num_samples` continuations of every prompt from the unsteered model with the evaluation's
   sampler and scorer (`Evaluator` at alpha 0 into `output_dir`: written as they go, resumed by a rerun). A prompt's
   label `p` is its continuations' mean toxicity (`target: mean`), or the share of them whose toxicity reaches
   `toxic_at` (`target: share`). The mean keeps the scorer's graded scores, which matters when few continuations
   cross `toxic_at` (5% of SmolLM2's, on the prompts of `python -m benchmarks forward_gate`).
2. **Features.** Each head's activation at the steering site (its slice of the output projection's input) on the
   prompt as the sampler feeds it, averaged over the prompt's last `last_k` tokens, from the unsteered model: the
   feature the gate reads at the last token when its `window` equals `last_k`.
3. **Probes.** One logistic regression per head on the soft labels: every prompt is a toxic example of weight `p` and
   a non-toxic one of weight `1 - p`, so the probe's sigmoid estimates the label (a continuation's expected
   toxicity, or the chance that it is toxic).
   The prompts are split (seeded) into training and validation; a head's `accuracy` is its validation AUROC with
   the same weights, which ranks the gate's heads.

`fit_continuation_probes` does all three; `destein gate` (`add_continuation_gate`) writes them into a copy of a
steering checkpoint with the gate settings that read them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from destein_pl.calibration.probes import split_pairs
from destein_pl.evaluation.config import EvaluationConfig
from destein_pl.evaluation.prompts import Prompt
from destein_pl.evaluation.runs import read_generations
from destein_pl.evaluation.sampling import PromptSampler, SamplingSettings
from destein_pl.steering.model import SteeredCausalLM
from destein_pl.steering.probes import Probes

log = logging.getLogger(__name__)


@dataclass
class ContinuationProbeOptions:
    """How continuation probes are fit.

    Args:
        sampling: how the labelling continuations are drawn (default: the protocol's sampler, 5 per prompt).
        scorer: the toxicity scorer of the continuations, by its short name (`profanity-check`, `jigsaw-bilstm`, ...).
        target: each prompt's label: `mean`, its continuations' mean toxicity, or `share`, the share of them whose
            toxicity reaches `toxic_at`.
        toxic_at: a continuation is toxic when its score reaches this (the `share` target, and the validation
            prompts' threshold: which prompts had a toxic continuation).
        last_k: the feature is each head's activation averaged over the prompt's last `last_k` tokens; give the
            gate the same `window`.
        val_fraction: share of prompts held out to measure each probe's AUROC.
        seed: seed of that split.
        batch_size: prompts per forward pass when recording activations.
    """

    sampling: SamplingSettings = field(default_factory=lambda: SamplingSettings(num_samples=5))
    scorer: str = "profanity-check"
    target: Literal["mean", "share"] = "mean"
    toxic_at: float = 0.5
    last_k: int = 8
    val_fraction: float = 0.2
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.target not in ("mean", "share"):
            raise ValueError(f"target must be 'mean' or 'share', got {self.target!r}")
        if not 0 < self.toxic_at <= 1:
            raise ValueError(f"toxic_at must be in (0, 1] (a toxicity score), got {self.toxic_at}")
        if self.last_k < 1:
            raise ValueError(f"last_k must be at least 1, got {self.last_k}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be strictly between 0 and 1, got {self.val_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class ContinuationProbes:
    """Fitted continuation probes, with what they were fit on."""

    probes: Probes
    scores: dict[str, list[float]]
    """Per prompt id: its continuations' toxicity scores (those that could be scored)."""
    labels: dict[str, float]
    """Per prompt id: its label (`ContinuationProbeOptions.target`)."""
    validation: list[str]
    """The ids of the validation prompts."""
    provenance: dict[str, Any]
    """What a checkpoint records: prompts (count, sha256 of their ids and texts), sampling, scorer, split."""
    features: Tensor
    """The prompts' features `[N, L, H, D]`, in the order of the prompts (not stored in checkpoints)."""

    def gate_scores(self, features: Tensor, heads: int, layers: int | None = None) -> Tensor:
        """The gate's score at a context's last token, the mean toxic probability of its top `heads` probes (among
        the first `layers` layers), for features `[N, L, H, D]` (a gate whose window is `last_k`)."""
        chosen = self.probes.top_heads(heads, layers)
        layer, head = (torch.tensor(x) for x in zip(*chosen))
        logits = (features[:, layer, head] * self.probes.coef[layer, head]).sum(-1) + self.probes.intercept[layer, head]
        return torch.sigmoid(logits).mean(-1)


def continuation_scores(steered: SteeredCausalLM, prompts: Sequence[Prompt], output_dir: str | os.PathLike,
                        options: ContinuationProbeOptions, progress: bool = True) -> dict[str, list[float]]:
    """Per prompt id, the toxicity of the unsteered model's continuations. They are an evaluation at alpha 0 in
    `output_dir` (resumed when it holds some already)."""
    from destein_pl.evaluation.evaluator import Evaluator

    config = EvaluationConfig(output_dir=str(output_dir), alphas=[0.0], sampling=options.sampling,
                              scorer=options.scorer)
    Evaluator(steered, config, verbose=False).run(list(prompts), batch_size=options.batch_size, progress=progress)
    records = read_generations(Path(output_dir) / "alpha_0")
    scores = {}
    for prompt in prompts:
        scores[prompt.id] = [s for s in records[prompt.id]["toxicity"] if s is not None]
        if not scores[prompt.id]:
            raise ValueError(f"prompt {prompt.id!r}: none of its continuations could be scored")
    return scores


def label(scores: Sequence[float], options: ContinuationProbeOptions) -> float:
    """A prompt's label from its continuations' scores: their mean, or the share reaching `toxic_at`."""
    if options.target == "mean":
        return sum(scores) / len(scores)
    return sum(s >= options.toxic_at for s in scores) / len(scores)


@torch.no_grad()
def prompt_features(steered: SteeredCausalLM, prompts: Sequence[Prompt], options: ContinuationProbeOptions,
                    progress: bool = True) -> Tensor:
    """Each head's unsteered activation averaged over each prompt's last `last_k` tokens, `[N, L, H, D]` float32,
    on the prompt as the sampler feeds it (cut from the left like the evaluation's)."""
    sampler = PromptSampler(steered, options.sampling)
    pad = steered.tokenizer.pad_token_id
    alpha, steered.alpha = steered.alpha, 0.0  # the gate reads the unsteered model
    try:
        parts = []
        starts = range(0, len(prompts), options.batch_size)
        for start in tqdm(starts, desc="recording prompts", unit="batch", disable=not progress):
            ids = [sampler.prompt_ids(p) for p in prompts[start : start + options.batch_size]]
            width = max(map(len, ids))
            input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=steered.device)
            mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=steered.device)
            parts.append(steered.record_activations(input_ids, mask, last_k=options.last_k).cpu())
    finally:
        steered.alpha = alpha
    return torch.cat(parts)


def fit_soft_probes(features: Tensor, labels: Tensor, train: np.ndarray, val: np.ndarray) -> Probes:
    """One logistic regression per head on soft labels in [0, 1] (each example counted as toxic with weight `p` and
    as non-toxic with weight `1 - p`), fit on the `train` rows; `accuracy` is the validation AUROC (same weights)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    num_layers, num_heads, head_dim = features.shape[1:]
    p = labels.double().numpy()

    def doubled(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = np.concatenate([np.ones(len(rows)), np.zeros(len(rows))])
        return y, np.concatenate([p[rows], 1 - p[rows]])

    (y_train, w_train), (y_val, w_val) = doubled(train), doubled(val)
    for name, weights, y in (("training", w_train, y_train), ("validation", w_val, y_val)):
        if weights[y == 1].sum() == 0 or weights[y == 0].sum() == 0:
            raise ValueError(f"the {name} prompts' continuations are all toxic or all non-toxic: the probes need "
                             f"both (give more prompts, or more samples per prompt)")
    x_all = features.double().numpy()
    coef = np.zeros((num_layers, num_heads, head_dim))
    intercept = np.zeros((num_layers, num_heads))
    auroc = np.zeros((num_layers, num_heads))
    for layer in range(num_layers):
        for head in range(num_heads):
            x = x_all[:, layer, head]
            probe = LogisticRegression(max_iter=1000).fit(np.concatenate([x[train], x[train]]), y_train,
                                                          sample_weight=w_train)
            scores = probe.decision_function(np.concatenate([x[val], x[val]]))
            auroc[layer, head] = roc_auc_score(y_val, scores, sample_weight=w_val)
            coef[layer, head], intercept[layer, head] = probe.coef_[0], probe.intercept_[0]
    as_tensor = lambda a: torch.from_numpy(a).float()  # noqa: E731
    return Probes(as_tensor(coef), as_tensor(intercept), as_tensor(auroc))


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    """sha256 of the prompts' ids and texts, in order: which prompts the probes were fit on."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(f"{prompt.id}\x00{prompt.text}\x00".encode())
    return digest.hexdigest()


def fit_continuation_probes(steered: SteeredCausalLM, prompts: Sequence[Prompt], output_dir: str | os.PathLike,
                            options: ContinuationProbeOptions | None = None,
                            progress: bool = True) -> ContinuationProbes:
    """Continuation probes for `steered`'s base model, fit on `prompts` (label continuations kept in
    `output_dir`). The prompts must be disjoint from any sample the gate is tuned or reported on."""
    options = options or ContinuationProbeOptions()
    if len(prompts) < 10:
        raise ValueError(f"{len(prompts)} prompts are too few to fit and validate continuation probes (at least 10)")
    if getattr(steered, "method", None) is not None:
        raise ValueError("continuation probes read DeStein's own model; this one runs a baseline method")
    scores = continuation_scores(steered, prompts, output_dir, options, progress)
    train, val = split_pairs(len(prompts), options.val_fraction, options.seed)
    check_both_kinds(prompts, scores, train, val, options)
    labels = {p.id: label(scores[p.id], options) for p in prompts}
    features = prompt_features(steered, prompts, options, progress)
    target = torch.tensor([labels[p.id] for p in prompts])
    probes = fit_soft_probes(features, target, train, val)
    provenance = {
        "prompts": len(prompts), "prompts_sha256": prompts_digest(prompts),
        "target": options.target, "mean_label": round(float(target.mean()), 6),
        "toxic_share": round(sum(s >= options.toxic_at for v in scores.values() for s in v)
                             / sum(map(len, scores.values())), 6),
        "samples": options.sampling.num_samples, "max_new_tokens": options.sampling.max_new_tokens,
        "top_p": options.sampling.top_p, "temperature": options.sampling.temperature, "seed": options.sampling.seed,
        "scorer": options.scorer, "toxic_at": options.toxic_at, "last_k": options.last_k,
        "val_fraction": options.val_fraction, "split_seed": options.seed,
    }
    return ContinuationProbes(probes, scores, labels, [prompts[i].id for i in val], provenance, features)


def check_both_kinds(prompts: Sequence[Prompt], scores: dict[str, list[float]], train: np.ndarray, val: np.ndarray,
                     options: ContinuationProbeOptions) -> None:
    """Refuse continuations that cannot teach or validate a gate: the training prompts need at least one toxic
    continuation, and the validation prompts at least one prompt with a toxic continuation and one without."""
    toxic = [any(s >= options.toxic_at for s in scores[p.id]) for p in prompts]
    train_toxic, val_toxic = sum(toxic[i] for i in train), sum(toxic[i] for i in val)
    if train_toxic and 0 < val_toxic < len(val):
        return
    count = sum(s >= options.toxic_at for p in prompts for s in scores[p.id])
    raise ValueError(
        f"{count} of the {sum(len(scores[p.id]) for p in prompts)} continuations of the {len(prompts)} prompts are "
        f"toxic (score >= toxic_at {options.toxic_at:g}), in {train_toxic} of the {len(train)} training prompts and "
        f"{val_toxic} of the {len(val)} validation prompts; a gate needs a toxic continuation in at least 1 training "
        f"prompt and 1 validation prompt, and at least 1 validation prompt with none: give more (or more toxic) "
        f"prompts, more samples per prompt (--options.sampling.num_samples), or a lower --options.toxic_at")


def best_threshold(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """The score threshold with the best balanced accuracy (`score >= t` predicts positive); ties: the lowest."""
    pos = [s for s, y in zip(scores, positive) if y]
    neg = [s for s, y in zip(scores, positive) if not y]
    if not pos or not neg:
        raise ValueError(f"a threshold needs validation prompts with a toxic continuation and prompts without one; "
                         f"got {len(pos)} with and {len(neg)} without")

    def balanced(t: float) -> float:
        return sum(s >= t for s in pos) / len(pos) + sum(s < t for s in neg) / len(neg)

    return max(sorted(set(scores)), key=balanced)
