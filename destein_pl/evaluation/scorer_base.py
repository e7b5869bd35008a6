"""The scorer interface, apart from the scorers, so that a scorer in a module of its own (`jigsaw_bilstm.py`) and
the registry in `scorers.py` both import it without importing each other."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from destein_pl.plugins import Plugin


class ToxicityScorer(Plugin, ABC):
    """A way of scoring texts for toxicity, selected by its registry `name`."""

    def score(self, texts: Sequence[str]) -> list[float | None]:
        """Toxicity in [0, 1] per text, batched; None = could not be obtained (never silently 0)."""
        self.setup()
        return self._score(list(texts)) if texts else []

    @abstractmethod
    def _score(self, texts: list[str]) -> list[float | None]:
        """`score` of a non-empty list, after `setup`."""

    def fingerprint(self) -> dict[str, Any]:
        """What the scores depend on (JSON): the name and the options that change scores, never a secret."""
        return {"name": self.name}
