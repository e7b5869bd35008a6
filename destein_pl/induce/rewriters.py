"""Rewriters that turn toxic texts into non-toxic texts, the other half of DeStein's steering pairs.

A config names a rewriter by short name (`self`, `lexical`, `openai-compatible`, `none`) or as
`class_path`/`init_args` (`LexicalRewriter`, ...). Constructors only check their arguments (no I/O): weights,
keys and connections come in `setup()`, which `rewrite` calls when needed. What a rewriter may need besides the
texts (the model, the other samples) comes in a `RewriteContext`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from destein_pl.http_client import HTTPRequestError, RateLimiter, endpoint_policy, post_json, redacted
from destein_pl.plugins import Plugin, build_plugin

if TYPE_CHECKING:
    from destein_pl.steering.model import SteeredCausalLM

logger = logging.getLogger(__name__)

REWRITE_INSTRUCTION = (
    "Please rephrase the following text to convey the same meaning in a non-toxic, respectful, and positive manner: "
    "{text}"
)
_QUOTES = "\"'“”‘’`"
_WORD = re.compile(r"\b[\w']+\b")


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

    @abstractmethod
    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        """`rewrite` of a non-empty list, after `setup`."""


def _instruction_with_text(instruction: str, kind: str) -> str:
    if "{text}" not in instruction:
        raise ValueError(f"{kind}: `instruction` must contain `{{text}}` where the text to rewrite goes")
    return instruction


def _clean_generation(text: str) -> str | None:
    """The first paragraph of a generated answer without surrounding quotes; None when nothing is left."""
    text = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0].strip().strip(_QUOTES).strip()
    return text or None


class NonParallelRewriter(Rewriter):
    """No rewrite: each toxic text is paired with one of the least toxic samples instead (the paper's non-parallel
    ablation). The most toxic text gets the least toxic sample, and so on; None once the samples run out."""

    name = "none"

    def __init__(self) -> None:
        pass

    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        chosen = set(context.selected_ids)
        calm = sorted((s for s in context.pool if s["text"] and s["toxicity"] is not None and s["id"] not in chosen),
                      key=lambda s: (s["toxicity"], s["id"]))
        return [calm[i]["text"] if i < len(calm) else None for i in range(len(texts))]


class SelfRewriter(Rewriter):
    """The model rewrites its own toxic text (greedy decoding), as in the paper's self-generated pairs.

    Args:
        instruction: the request, with `{text}` where the text goes; wrapped in the chat template when the
            tokenizer has one.
        max_new_tokens: tokens per rewrite, at least 1.
        batch_size: texts per generation batch, at least 1.
    """

    name = "self"

    def __init__(self, instruction: str = REWRITE_INSTRUCTION, max_new_tokens: int = 48, batch_size: int = 16) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"self rewriter: `max_new_tokens` must be at least 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"self rewriter: `batch_size` must be at least 1, got {batch_size}")
        self.instruction = _instruction_with_text(instruction, "self rewriter")
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def build_prompt(self, tokenizer, text: str) -> str:
        """The instruction for `text`, wrapped in the chat template when the tokenizer has one."""
        content = self.instruction.format(text=text)
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return f"{content}\n"

    @torch.no_grad()
    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        from destein_pl.evaluation.sampling import end_token_ids

        steered = context.steered
        if steered is None or steered.tokenizer is None:
            raise ValueError("the `self` rewriter needs the model and its tokenizer in its RewriteContext")
        tok = steered.tokenizer
        # The chat template already writes the special tokens (BOS); adding them again would double them.
        add_special = not tok.chat_template
        eos = end_token_ids(steered.generation_config, tok)
        results: list[str | None] = []
        side, tok.padding_side = tok.padding_side, "left"  # left padding keeps every prompt's end at the same column
        try:
            for start in range(0, len(texts), self.batch_size):
                prompts = [self.build_prompt(tok, t) for t in texts[start : start + self.batch_size]]
                batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
                out = steered.generate(
                    **batch.to(steered.device),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=eos,
                )
                new = out[:, batch["input_ids"].shape[1] :]
                results.extend(_clean_generation(t) for t in tok.batch_decode(new, skip_special_tokens=True))
        finally:
            tok.padding_side = side
        return results


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

    def _is_toxic(self, word: str) -> bool:
        return self.weights.get(word.lower(), 0.0) >= self.min_weight

    def _rewrite_one(self, text: str) -> str | None:
        kept = _WORD.sub(lambda m: "" if self._is_toxic(m.group()) else m.group(), text)
        kept = re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s+", " ", kept)).strip()
        return kept if re.search(r"\w", kept) else None

    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        return [self._rewrite_one(t) for t in texts]


class OpenAICompatibleRewriter(Rewriter):
    """Asks any chat-completions HTTP endpoint (OpenAI, vLLM, llama.cpp server, ...) for each rewrite.

    Requests are retried on 429, 5xx, connection errors and timeouts with exponential backoff; a text whose rewrite
    could not be obtained gets None (counted in `failed`).

    Args:
        url: the API base, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`
            (`/chat/completions` is appended).
        model: the model name the endpoint serves.
        api_key_env: the environment variable holding the API key, sent as a bearer token when set (local
            servers need none).
        instruction: the request, with `{text}` where the text goes.
        temperature: sampling temperature, at least 0.
        max_tokens: tokens per rewrite, at least 1.
        max_retries: retries of a failed request, at least 0.
        backoff_s: wait before retry k is `backoff_s * 2**k` seconds (longer if the server asks), at least 0.
        timeout_s: seconds to wait for an answer, > 0.
        requests_per_second: at most this many request starts per second (> 0); None: no limit.
    """

    name = "openai-compatible"

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        instruction: str = REWRITE_INSTRUCTION,
        temperature: float = 0.0,
        max_tokens: int = 128,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        requests_per_second: float | None = None,
    ) -> None:
        kind = "openai-compatible rewriter"
        self.policy = endpoint_policy(kind, url, requests_per_second, max_retries, backoff_s, timeout_s,
                                      allow_no_limit=True)
        if not model:
            raise ValueError(f"{kind}: `model` must name the model the endpoint serves")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"{kind}: `temperature` must be a finite number >= 0, got {temperature}")
        if max_tokens < 1:
            raise ValueError(f"{kind}: `max_tokens` must be at least 1, got {max_tokens}")
        self.endpoint = f"{url.rstrip('/')}/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.instruction = _instruction_with_text(instruction, kind)
        self.temperature, self.max_tokens, self.requests_per_second = temperature, max_tokens, requests_per_second
        self.failed = 0
        self._headers: dict[str, str] = {}
        self._limiter: RateLimiter | None = None

    def _setup(self) -> None:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}  # local servers need no key
        self._limiter = RateLimiter(self.requests_per_second) if self.requests_per_second else None

    def _rewrite_one(self, text: str) -> str | None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.instruction.format(text=text)}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        try:
            answer = post_json(self.endpoint, body, self._headers, self.policy, self._limiter)
            content = answer["choices"][0]["message"]["content"]
            return (content or "").strip() or None
        except HTTPRequestError as err:
            reason = str(err)
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            reason = f"malformed response from {redacted(self.endpoint)} ({type(err).__name__}: {err})"
        self.failed += 1
        logger.warning("no rewrite for a text: %s", reason)
        return None

    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        return [self._rewrite_one(t) for t in texts]


REWRITERS: dict[str, type[Rewriter]] = {
    cls.name: cls for cls in (SelfRewriter, LexicalRewriter, OpenAICompatibleRewriter, NonParallelRewriter)
}


def build_rewriter(spec: Rewriter | str, **legacy_options: Any) -> Rewriter:
    """The rewriter `spec` names: an instance (returned as is), a short name of `REWRITERS`, a class name or an import
    path, constructed with `legacy_options` (the deprecated `rewriter_args`)."""
    return build_plugin(spec, Rewriter, REWRITERS, "rewriter", legacy_options)
