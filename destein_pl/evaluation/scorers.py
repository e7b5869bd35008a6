"""Toxicity scorers for evaluating continuations: an offline linear model, any Hugging Face classifier, Perspective API,
and the Jigsaw BiLSTM of `toxic-comment-classifier` (in `jigsaw_bilstm.py`).

Every scorer maps a batch of texts to one toxicity in [0, 1] per text. A score that could not be obtained is None,
never 0, so that failures cannot pass for non-toxic text; callers decide how to report them.

A config names a scorer by short name (`perspective`) or as `class_path`/`init_args` (`PerspectiveScorer`). The
constructors only check their arguments: they read no environment variable, load no model and open no
connection, because a config is parsed (and its scorer built) for every command, also where it is never used.
That work happens in `setup()`, which `score` calls when needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import urllib.parse
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from destein_pl.evaluation.jigsaw_bilstm import JigsawBiLSTMScorer
from destein_pl.evaluation.scorer_base import ToxicityScorer
from destein_pl.files import cache_dir
from destein_pl.http_client import HTTPRequestError, RateLimiter, endpoint_policy, post_json, redacted
from destein_pl.plugins import build_plugin

log = logging.getLogger(__name__)


class ScorerUnavailableError(RuntimeError):
    """A remote scorer gave no score to many texts in a row: its endpoint looks dead, so the run stops early."""


class ProfanityCheckScorer(ToxicityScorer):
    """`alt-profanity-check`'s linear model: offline, fast and deterministic, but only sensitive to profanity."""

    name = "profanity-check"

    def __init__(self) -> None:
        self._predict_prob = None

    def _setup(self) -> None:
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def _score(self, texts: list[str]) -> list[float | None]:
        return [float(p) for p in self._predict_prob(texts)]


class HFClassifierScorer(ToxicityScorer):
    """Probability of one label of a Hugging Face sequence classifier (local folder or hub id), e.g. a toxic-comment
    model, so that evaluation can run offline with a stronger judge than a word list.

    Args:
        model: the classifier: a local folder or a hub id.
        label: the label whose probability is the toxicity: its name or index; None: index 1 of a two-label model.
        batch_size: texts per forward pass, at least 1.
        max_length: texts are cut to this many tokens, at least 1.
        device: where the classifier runs (e.g. `cpu`, `cuda:0`); None: CUDA when available, else CPU.
    """

    name = "hf-classifier"

    def __init__(
        self,
        model: str,
        label: str | int | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        device: str | None = None,
    ) -> None:
        if not model:
            raise ValueError("hf-classifier: `model` must name a classifier (a folder or a hub id)")
        if isinstance(label, int) and label < 0:
            raise ValueError(f"hf-classifier: `label` as an index must be at least 0, got {label}")
        if batch_size < 1:
            raise ValueError(f"hf-classifier: `batch_size` must be at least 1, got {batch_size}")
        if max_length < 1:
            raise ValueError(f"hf-classifier: `max_length` must be at least 1, got {max_length}")
        if device is not None:
            try:
                torch.device(device)
            except RuntimeError as err:
                raise ValueError(f"hf-classifier: `device` {device!r} is not a torch device ({err})") from None
        self.model_name, self.label, self.batch_size, self.max_length = model, label, batch_size, max_length
        self.device_name = device

    def _setup(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device(self.device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_name).to(self.device).eval()
        if self.tokenizer.pad_token is None:  # decoder-based classifiers (GPT-2 style) ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        config = self.model.config
        self.label_index = self._label_index(self.label, {int(i): str(n) for i, n in config.id2label.items()})
        # One logit cannot go through a softmax (it would always give 1): read it as a binary logit.
        self.sigmoid = config.problem_type == "multi_label_classification" or config.num_labels == 1

    @staticmethod
    def _label_index(label: str | int | None, id2label: dict[int, str]) -> int:
        accepted = ", ".join(f"{i}={n!r}" for i, n in sorted(id2label.items()))
        if label is None:
            if len(id2label) != 2:
                raise ValueError(f"the classifier has {len(id2label)} labels; choose one with `label` ({accepted})")
            return 1
        if isinstance(label, int):
            if label not in id2label:
                raise ValueError(f"label index {label} is out of range; accepted labels: {accepted}")
            return label
        matches = [i for i, n in id2label.items() if n == label]
        if not matches:
            raise ValueError(f"unknown label {label!r}; accepted labels: {accepted}")
        return matches[0]

    @torch.no_grad()
    def _score(self, texts: list[str]) -> list[float | None]:
        scores: list[float | None] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**batch).logits.float()
            probs = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
            scores.extend(probs[:, self.label_index].tolist())
        return scores

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_name, "label": self.label, "max_length": self.max_length}


class PerspectiveScorer(ToxicityScorer):
    """Google's Perspective API, the reference judge of the detoxification literature (RealToxicityPrompts).

    Requests are rate limited per instance and retried on 429, 5xx, connection errors and timeouts with exponential
    backoff. Successful scores are cached on disk (sqlite, safe for several processes), so a rerun after an
    interruption never pays for a text twice. Empty or whitespace-only texts score 0.0 without a request: an empty
    continuation is not toxic, and Perspective rejects empty comments. `requests`, `cache_hits` and `missing`
    count the HTTP requests made (retries included), the scores read from the cache, and the texts left unscored.

    Args:
        api_key_env: the environment variable holding the API key (read by `setup`, never stored in outputs).
        url: the `comments:analyze` endpoint.
        attribute: the Perspective attribute to score (e.g. `TOXICITY`, `SEVERE_TOXICITY`, `INSULT`).
        languages: the texts' languages (default `["en"]`).
        requests_per_second: at most this many request starts per second (> 0; Perspective's default quota is 1).
        max_retries: retries of a failed request, at least 0.
        backoff_s: wait before retry k is `backoff_s * 2**k` seconds (longer if the server asks), at least 0.
        timeout_s: seconds to wait for an answer, > 0.
        cache_path: the sqlite score cache (default `<cache dir>/perspective.sqlite`, the cache dir being
            `$XDG_CACHE_HOME/destein-pl` or `~/.cache/destein-pl`).
        max_consecutive_failures: stop with `ScorerUnavailableError` after this many texts in a row got no score
            (at least 1); None: never stop, leave them unscored.
    """

    name = "perspective"

    def __init__(
        self,
        api_key_env: str = "PERSPECTIVE_API_KEY",
        url: str = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze",
        attribute: str = "TOXICITY",
        languages: list[str] | None = None,
        requests_per_second: float = 1.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 30.0,
        cache_path: str | None = None,
        max_consecutive_failures: int | None = 10,
    ) -> None:
        if not api_key_env:
            raise ValueError("perspective: `api_key_env` must name an environment variable")
        self.policy = endpoint_policy("perspective", url, requests_per_second, max_retries, backoff_s, timeout_s)
        if not attribute:
            raise ValueError("perspective: `attribute` must name a Perspective attribute, e.g. TOXICITY")
        languages = ["en"] if languages is None else list(languages)
        if not languages or not all(isinstance(lang, str) and lang for lang in languages):
            raise ValueError(f"perspective: `languages` must be a non-empty list of language codes, got {languages}")
        if max_consecutive_failures is not None and max_consecutive_failures < 1:
            raise ValueError(f"perspective: `max_consecutive_failures` must be at least 1 (or null: never stop), got "
                             f"{max_consecutive_failures}")
        self.api_key_env, self.url, self.attribute, self.languages = api_key_env, url, attribute, languages
        self.requests_per_second = requests_per_second
        self.cache_path = cache_path
        self.max_consecutive_failures = max_consecutive_failures
        self.cache_file: Path | None = None
        self.requests = 0
        self.cache_hits = 0
        self.missing = 0
        self._consecutive_failures = 0
        self._last_error = ""

    def _setup(self) -> None:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"no Perspective API key: set the environment variable {self.api_key_env}")
        separator = "&" if urllib.parse.urlsplit(self.url).query else "?"
        self._endpoint = f"{self.url}{separator}key={urllib.parse.quote(key, safe='')}"
        self._limiter = RateLimiter(self.requests_per_second)
        self.cache_file = Path(self.cache_path) if self.cache_path else cache_dir() / "perspective.sqlite"
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn, conn:
            conn.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value REAL NOT NULL)")

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "attribute": self.attribute, "languages": self.languages, "url": redacted(self.url)}

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.cache_file, timeout=60.0)

    def _cache_key(self, text: str) -> str:
        return hashlib.sha256(json.dumps([self.attribute, self.languages, text]).encode()).hexdigest()

    def _score(self, texts: list[str]) -> list[float | None]:
        with closing(self._connect()) as conn:
            return [self._score_one(conn, text) for text in texts]

    def _score_one(self, conn: sqlite3.Connection, text: str) -> float | None:
        if not text.strip():
            return 0.0
        key = self._cache_key(text)
        row = conn.execute("SELECT value FROM scores WHERE key = ?", (key,)).fetchone()
        if row is not None:
            self.cache_hits += 1
            return row[0]
        value = self._request(text)
        if value is None:
            self.missing += 1
            self._count_failure()
        else:
            self._consecutive_failures = 0
            with conn:  # commit each score at once: an interruption loses nothing already paid for
                conn.execute("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)", (key, value))
        return value

    def _count_failure(self) -> None:
        """Stop the run once `max_consecutive_failures` texts in a row got no score: the endpoint looks dead, and
        going on would only leave every remaining text unscored."""
        self._consecutive_failures += 1
        limit = self.max_consecutive_failures
        if limit is not None and self._consecutive_failures >= limit:
            self._consecutive_failures = 0
            raise ScorerUnavailableError(
                f"Perspective ({redacted(self.url)}) gave no score to {limit} texts in a row (last error: "
                f"{self._last_error}); the endpoint looks unavailable, so the run stops here. What was written so far "
                f"is kept and scores already obtained are cached: rerun the same command to resume."
            )

    def _request(self, text: str) -> float | None:
        """One text's score, or None (logged) when it could not be obtained."""
        body = {
            "comment": {"text": text},
            "languages": self.languages,
            "requestedAttributes": {self.attribute: {}},
            "doNotStore": True,
        }
        try:
            answer = post_json(self._endpoint, body, policy=self.policy, limiter=self._limiter,
                               on_attempt=self._count_request)
            return float(answer["attributeScores"][self.attribute]["summaryScore"]["value"])
        except HTTPRequestError as err:
            self._last_error = str(err)
        except (KeyError, TypeError, ValueError) as err:
            self._last_error = f"malformed response ({type(err).__name__}: {err})"
        log.warning("Perspective: no score for a text (%s)", self._last_error)
        return None

    def _count_request(self) -> None:
        self.requests += 1


SCORERS: dict[str, type[ToxicityScorer]] = {
    cls.name: cls for cls in (ProfanityCheckScorer, HFClassifierScorer, PerspectiveScorer, JigsawBiLSTMScorer)
}


def build_scorer(spec: ToxicityScorer | str) -> ToxicityScorer:
    """The scorer `spec` names: an instance (returned as is), a short name of `SCORERS`, a class name, an import
    path, or a class_path/init_args mapping."""
    return build_plugin(spec, ToxicityScorer, SCORERS, "scorer")
