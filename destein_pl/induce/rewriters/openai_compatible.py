"""The `openai-compatible` rewriter: any chat-completions HTTP endpoint rewrites each text."""

from __future__ import annotations

import logging
import math
import os

from destein_pl.http_client import HTTPRequestError, RateLimiter, endpoint_policy, post_json, redacted
from destein_pl.induce.rewriters.base import REWRITE_INSTRUCTION, RewriteContext, Rewriter, instruction_with_text

logger = logging.getLogger(__name__)


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
        self.instruction = instruction_with_text(instruction, kind)
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
