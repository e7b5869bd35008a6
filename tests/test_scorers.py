import json
import logging
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from destein_pl.scorers import (
    SCORERS,
    HFClassifierScorer,
    PerspectiveScorer,
    ProfanityCheckScorer,
    build_scorer,
)

# ---------------------------------------------------------------- profanity-check


def test_profanity_check_ranks_profanity_above_neutral_text():
    texts = ["fuck you, you stupid piece of shit", "the weather is nice today", "I like reading books", "shit"]
    scores = ProfanityCheckScorer().score(texts)
    assert len(scores) == len(texts)
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert scores[0] > scores[1] + 0.5 and scores[3] > scores[2] + 0.5
    assert ProfanityCheckScorer().score([]) == []


# ---------------------------------------------------------------- hf-classifier

SENTENCES = [
    "you are a complete idiot",
    "what a lovely day it is",
    "the cat sat on the mat and looked at the dog",
    "go away",
]


def _tokenizer() -> PreTrainedTokenizerFast:
    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _save_classifier(path, **config_kwargs) -> str:
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.5, pad_token_id=0, **config_kwargs,
    )
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _direct_logits(path: str, texts: list[str]) -> torch.Tensor:
    """Each text's logits on its own (no padding), straight from the model."""
    tokenizer = _tokenizer()
    model = BertForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts])


@pytest.fixture(scope="module")
def binary_classifier(tmp_path_factory) -> str:
    labels = {"id2label": {0: "ok", 1: "toxic"}, "label2id": {"ok": 0, "toxic": 1}}
    return _save_classifier(tmp_path_factory.mktemp("clf"), **labels)


def test_hf_classifier_is_softmax_of_the_label(binary_classifier):
    expected = _direct_logits(binary_classifier, SENTENCES).softmax(-1)[:, 1].tolist()
    for label in ("toxic", None, 1):
        scores = HFClassifierScorer(binary_classifier, label=label, batch_size=3, device="cpu").score(SENTENCES)
        assert scores == pytest.approx(expected, abs=1e-5)  # padded batches of 3 + 1 match unpadded texts
    ok = HFClassifierScorer(binary_classifier, label=0, device="cpu").score(SENTENCES)
    assert [a + b for a, b in zip(ok, expected)] == pytest.approx([1.0] * len(SENTENCES), abs=1e-5)
    assert len(set(round(s, 4) for s in expected)) > 1  # the random model does tell texts apart


def test_hf_classifier_truncates_long_texts(binary_classifier):
    long_text = " ".join(SENTENCES * 20)  # far beyond max_position_embeddings=64
    scores = HFClassifierScorer(binary_classifier, max_length=16, device="cpu").score([long_text, "go away"])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)


def test_hf_classifier_label_errors(binary_classifier, tmp_path):
    with pytest.raises(ValueError, match=r"unknown label 'insult'.*0='ok', 1='toxic'"):
        HFClassifierScorer(binary_classifier, label="insult")
    with pytest.raises(ValueError, match=r"label index 2 is out of range.*'toxic'"):
        HFClassifierScorer(binary_classifier, label=2)
    three = _save_classifier(tmp_path, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    with pytest.raises(ValueError, match=r"3 labels; choose one with `label` \(0='a', 1='b', 2='c'\)"):
        HFClassifierScorer(three)


def test_hf_classifier_multi_label_uses_sigmoid(tmp_path):
    labels = {0: "toxic", 1: "obscene", 2: "insult"}
    path = _save_classifier(
        tmp_path, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
        problem_type="multi_label_classification",
    )
    expected = _direct_logits(path, SENTENCES).sigmoid()[:, 2].tolist()
    assert HFClassifierScorer(path, label="insult", device="cpu").score(SENTENCES) == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- perspective

KEY = "test-key-123"
ALWAYS = 10**6


class FakePerspective:
    """Speaks Perspective's JSON; score = fraction of words equal to "idiot". `script[text]` lists
    (status, headers) failures served, in order, before the text succeeds."""

    def __init__(self) -> None:
        self.script: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.arrivals: list[tuple[float, str]] = []
        self.counts: Counter[str] = Counter()
        self.served: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["comment"]["text"]
                with fake.lock:
                    fake.arrivals.append((arrived, text))
                    fake.counts[text] += 1
                    failures = fake.script.get(text, [])
                    n = fake.served[text]
                    fake.served[text] += 1
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                if query.get("key") != [KEY]:
                    return self._reply(403, {"error": "bad key"})
                if n < len(failures):
                    status, headers = failures[n]
                    return self._reply(status, {"error": "scripted"}, headers)
                assert body["doNotStore"] is True and body["languages"] == ["en"]
                [attribute] = body["requestedAttributes"]
                words = text.split()
                value = sum(w == "idiot" for w in words) / len(words)
                summary = {"value": value, "type": "PROBABILITY"}
                self._reply(200, {"attributeScores": {attribute: {"summaryScore": summary}}})

            def _reply(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1alpha1/comments:analyze"


@pytest.fixture
def fake_perspective():
    fake = FakePerspective()
    thread = threading.Thread(target=fake.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def api_key(monkeypatch) -> None:
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)


def _scorer(fake: FakePerspective, cache_path, **kwargs) -> PerspectiveScorer:
    kwargs = {"requests_per_second": 20.0, "max_retries": 3, "backoff_s": 0.01, "timeout_s": 5.0, **kwargs}
    return PerspectiveScorer(url=fake.url, cache_path=str(cache_path), **kwargs)


def test_perspective_scores_retries_failures_rate_limit_and_cache(fake_perspective, api_key, tmp_path, caplog):
    fake, cache = fake_perspective, tmp_path / "cache" / "perspective.sqlite"
    a, b, c, d = "you idiot", "idiot idiot idiot fool", "always broken", "bad request"
    fake.script = {
        a: [(429, {"Retry-After": "0"})],
        b: [(500, {}), (503, {})],
        c: [(500, {})] * ALWAYS,
        d: [(400, {})] * ALWAYS,
    }
    texts = ["hello there", a, "", b, c, "   ", d, "idiot"]
    scorer = _scorer(fake, cache)
    with caplog.at_level(logging.WARNING, logger="destein_pl.scorers"):
        scores = scorer.score(texts)

    assert scores == [0.0, 0.5, 0.0, 0.75, None, 0.0, None, 1.0]
    assert scorer.missing == 2
    assert fake.counts == {"hello there": 1, a: 2, b: 3, c: 4, d: 1, "idiot": 1}  # 1 + max_retries for c
    assert scorer.requests == sum(fake.counts.values()) and scorer.cache_hits == 0
    assert "HTTP 500" in caplog.text and "HTTP 400" in caplog.text

    starts = [t for t, _ in fake.arrivals]
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    assert min(gaps) >= 1 / 20 - 0.01, gaps

    # A rerun (e.g. after an interruption) pays nothing for what succeeded; failures are tried again.
    fake.counts.clear()
    rerun = _scorer(fake, cache)
    assert rerun.score(texts) == scores
    assert rerun.cache_hits == 4 and rerun.missing == 2
    assert fake.counts == {c: 4, d: 1}


def test_perspective_backoff_is_exponential_and_honours_retry_after(fake_perspective, api_key, tmp_path):
    fake = fake_perspective
    fake.script = {"idiot": [(500, {}), (502, {}), (503, {})], "slow down": [(429, {"Retry-After": "0.3"})]}
    scorer = _scorer(fake, tmp_path / "p.sqlite", requests_per_second=1000.0, backoff_s=0.05)
    assert scorer.score(["idiot", "slow down"]) == [1.0, 0.0]
    starts = defaultdict(list)
    for t, text in fake.arrivals:
        starts[text].append(t)
    waits = [later - earlier for earlier, later in zip(starts["idiot"], starts["idiot"][1:])]
    assert len(waits) == 3 and all(w >= expected - 0.01 for w, expected in zip(waits, [0.05, 0.1, 0.2])), waits
    assert starts["slow down"][1] - starts["slow down"][0] >= 0.3 - 0.01  # Retry-After beats backoff_s=0.05


def test_perspective_connection_errors_are_retried_then_missing(api_key, tmp_path, caplog):
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # closed again on exit: nothing listens there any more
    scorer = PerspectiveScorer(
        url=f"http://127.0.0.1:{port}/x", cache_path=str(tmp_path / "p.sqlite"), requests_per_second=100.0,
        max_retries=2, backoff_s=0.01, timeout_s=2.0,
    )
    with caplog.at_level(logging.WARNING, logger="destein_pl.scorers"):
        assert scorer.score(["some text"]) == [None]
    assert scorer.requests == 3 and scorer.missing == 1
    assert "after 2 retries" in caplog.text


def test_perspective_missing_key_and_default_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MY_PERSPECTIVE_KEY", raising=False)
    with pytest.raises(ValueError, match="MY_PERSPECTIVE_KEY"):
        PerspectiveScorer(api_key_env="MY_PERSPECTIVE_KEY", cache_path=str(tmp_path / "p.sqlite"))
    monkeypatch.setenv("MY_PERSPECTIVE_KEY", KEY)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    scorer = PerspectiveScorer(api_key_env="MY_PERSPECTIVE_KEY")
    assert scorer.cache_path == str(tmp_path / "xdg" / "destein-pl" / "perspective.sqlite")
    assert (tmp_path / "xdg" / "destein-pl" / "perspective.sqlite").is_file()
    assert scorer.score(["", " \n"]) == [0.0, 0.0] and scorer.requests == 0


# ---------------------------------------------------------------- registry


def test_build_scorer(api_key, tmp_path):
    assert set(SCORERS) == {"profanity-check", "hf-classifier", "perspective"}
    assert isinstance(build_scorer("profanity-check"), ProfanityCheckScorer)
    scorer = build_scorer("perspective", cache_path=str(tmp_path / "p.sqlite"), attribute="INSULT")
    assert isinstance(scorer, PerspectiveScorer) and scorer.attribute == "INSULT"
    accepted = "accepted: profanity-check, hf-classifier, perspective"
    with pytest.raises(ValueError, match=f"unknown scorer 'detoxify'; {accepted}"):
        build_scorer("detoxify")
