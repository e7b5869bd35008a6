"""Rewriters that turn toxic texts into non-toxic parallel texts, the other half of DeStein's steering pairs."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod

import numpy as np
import torch

logger = logging.getLogger(__name__)

REWRITE_INSTRUCTION = (
    "Please rephrase the following text to convey the same meaning in a non-toxic, respectful, and positive manner: "
    "{text}"
)
_QUOTES = "\"'“”‘’`"
_WORD = re.compile(r"\b[\w']+\b")


class Rewriter(ABC):
    """Maps toxic texts to non-toxic texts with the same meaning; None where no rewrite could be obtained."""

    name: str

    @abstractmethod
    def rewrite(self, texts: list[str]) -> list[str | None]:
        """One rewrite (or None) per input text, in order."""


def _clean_generation(text: str) -> str | None:
    """The first paragraph of a generated answer without surrounding quotes; None when nothing is left."""
    text = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0].strip().strip(_QUOTES).strip()
    return text or None


class SelfRewriter(Rewriter):
    """The model rewrites its own toxic text (greedy decoding), as in the paper's self-generated pairs."""

    name = "self"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        instruction: str = REWRITE_INSTRUCTION,
        max_new_tokens: int = 48,
        batch_size: int = 16,
    ) -> None:
        self.model, self.tokenizer, self.instruction = model, tokenizer, instruction
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def build_prompt(self, text: str) -> str:
        """The instruction for `text`, wrapped in the chat template when the tokenizer has one."""
        content = self.instruction.format(text=text)
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return f"{content}\n"

    @property
    def _device(self) -> torch.device:
        device = getattr(self.model, "device", None)
        return device if device is not None else next(self.model.parameters()).device

    @torch.no_grad()
    def rewrite(self, texts: list[str]) -> list[str | None]:
        tok = self.tokenizer
        # The chat template already writes the special tokens (BOS); adding them again would double them.
        add_special = not tok.chat_template
        results: list[str | None] = []
        side, tok.padding_side = tok.padding_side, "left"  # left padding keeps every prompt's end at the same column
        try:
            for start in range(0, len(texts), self.batch_size):
                prompts = [self.build_prompt(t) for t in texts[start : start + self.batch_size]]
                batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
                out = self.model.generate(
                    **batch.to(self._device),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
                new = out[:, batch["input_ids"].shape[1] :]
                results.extend(_clean_generation(t) for t in tok.batch_decode(new, skip_special_tokens=True))
        finally:
            tok.padding_side = side
        return results


class LexicalRewriter(Rewriter):
    """Deletes the words the profanity-check linear model weighs as most toxic: a cheap, model-free rewrite."""

    name = "lexical"

    def __init__(self, min_weight: float = 1.0) -> None:
        from profanity_check import profanity_check

        coef = np.mean([c.estimator.coef_[0] for c in profanity_check.model.calibrated_classifiers_], axis=0)
        self.min_weight = min_weight
        self.weights: dict[str, float] = {w: float(coef[i]) for w, i in profanity_check.vectorizer.vocabulary_.items()}

    def _is_toxic(self, word: str) -> bool:
        return self.weights.get(word.lower(), 0.0) >= self.min_weight

    def _rewrite_one(self, text: str) -> str | None:
        kept = _WORD.sub(lambda m: "" if self._is_toxic(m.group()) else m.group(), text)
        kept = re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s+", " ", kept)).strip()
        return kept if re.search(r"\w", kept) else None

    def rewrite(self, texts: list[str]) -> list[str | None]:
        return [self._rewrite_one(t) for t in texts]


class OpenAICompatibleRewriter(Rewriter):
    """Asks any chat-completions HTTP endpoint (OpenAI, vLLM, llama.cpp server, ...) for each rewrite."""

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
    ) -> None:
        self.endpoint = f"{url.rstrip('/')}/chat/completions"
        self.model, self.api_key_env, self.instruction = model, api_key_env, instruction
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_retries, self.backoff_s, self.timeout_s = max_retries, backoff_s, timeout_s
        self.failed = 0

    def _request(self, text: str) -> urllib.request.Request:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.instruction.format(text=text)}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:  # local servers need no key
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")

    def _rewrite_one(self, text: str) -> str | None:
        for attempt in range(self.max_retries + 1):
            delay = self.backoff_s * 2**attempt
            try:
                with urllib.request.urlopen(self._request(text), timeout=self.timeout_s) as response:
                    content = json.load(response)["choices"][0]["message"]["content"]
                return (content or "").strip() or None
            except urllib.error.HTTPError as err:
                status = f"HTTP {err.code}"
                if err.code != 429 and err.code < 500:
                    break
                retry_after = err.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                status = f"connection error ({getattr(err, 'reason', err)})"
            except (KeyError, IndexError, TypeError, ValueError):
                status = "malformed response"
                break
            if attempt < self.max_retries:
                time.sleep(delay)
        self.failed += 1
        logger.warning("rewrite request to %s failed: %s", self.endpoint, status)
        return None

    def rewrite(self, texts: list[str]) -> list[str | None]:
        return [self._rewrite_one(t) for t in texts]


REWRITERS: dict[str, type[Rewriter]] = {
    "self": SelfRewriter,
    "lexical": LexicalRewriter,
    "openai-compatible": OpenAICompatibleRewriter,
}
