"""What every rewriter is: a `Rewriter` plugin mapping toxic texts to non-toxic ones, given a `RewriteContext`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from destein_pl.plugins import Plugin

if TYPE_CHECKING:
    from destein_pl.steering.model import SteeredCausalLM

REWRITE_INSTRUCTION = (
    "Please rephrase the following text to convey the same meaning in a non-toxic, respectful, and positive manner: "
    "{text}"
)
"""The paper's request for a rewrite; `{text}` is where the text goes."""


@dataclass
class RewriteContext:
    """What a rewrite may draw on besides the texts: the model being induced from, and the scored samples.

    Attributes:
        steered: the model (with its tokenizer) the samples came from.
        pool: every scored sample, as dicts with `id`, `text` and `toxicity` (None: unscored).
        selected_ids: the ids of the samples being rewritten, in the order of the texts.
    """

    steered: SteeredCausalLM | None = None
    pool: list[dict[str, Any]] = field(default_factory=list)
    selected_ids: list[str] = field(default_factory=list)


class Rewriter(Plugin, ABC):
    """Maps toxic texts to non-toxic texts with the same meaning; None where no rewrite could be obtained."""

    def rewrite(self, texts: Sequence[str], context: RewriteContext | None = None) -> list[str | None]:
        """One rewrite (or None) per input text, in order."""
        self.setup()
        return self._rewrite(list(texts), context or RewriteContext()) if texts else []

    def inputs(self) -> list[str]:
        """The files the rewriter reads (an output of the run must be none of them); none by default."""
        return []

    @abstractmethod
    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        """`rewrite` of a non-empty list, after `setup`."""


def instruction_with_text(instruction: str, kind: str) -> str:
    """`instruction`, refused unless it has `{text}` where the text to rewrite goes."""
    if "{text}" not in instruction:
        raise ValueError(f"{kind}: `instruction` must contain `{{text}}` where the text to rewrite goes")
    return instruction
