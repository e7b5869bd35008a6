"""The `lexical` rewriter: deletes the words a linear toxicity model weighs as most toxic."""

from __future__ import annotations

import math
import re

import numpy as np

from destein_pl.induce.rewriters.base import RewriteContext, Rewriter
from destein_pl.induce.rewriters.text import WORD


class LexicalRewriter(Rewriter):
    """Deletes the words the profanity-check linear model weighs as most toxic: a cheap, model-free rewrite.

    Args:
        min_weight: delete the words whose weight in the linear model is at least this (> 0; the larger, the
            fewer words go).
    """

    name = "lexical"

    def __init__(self, min_weight: float = 1.0) -> None:
        if not (min_weight > 0 and math.isfinite(min_weight)):
            raise ValueError(f"lexical rewriter: `min_weight` must be a finite number > 0, got {min_weight}")
        self.min_weight = min_weight
        self.weights: dict[str, float] = {}

    def _setup(self) -> None:
        from profanity_check import profanity_check

        coef = np.mean([c.estimator.coef_[0] for c in profanity_check.model.calibrated_classifiers_], axis=0)
        self.weights = {w: float(coef[i]) for w, i in profanity_check.vectorizer.vocabulary_.items()}

    def is_toxic(self, word: str) -> bool:
        """Whether `word` weighs at least `min_weight` in the profanity-check model (call `setup` first)."""
        return self.weights.get(word.lower(), 0.0) >= self.min_weight

    def _rewrite_one(self, text: str) -> str | None:
        kept = WORD.sub(lambda m: "" if self.is_toxic(m.group()) else m.group(), text)
        kept = re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s+", " ", kept)).strip()
        return kept if re.search(r"\w", kept) else None

    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        return [self._rewrite_one(t) for t in texts]
