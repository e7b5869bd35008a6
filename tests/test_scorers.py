import importlib.util
import io
import json
import logging
import pickle
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h5py
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from destein_pl.evaluation.jigsaw_bilstm import (
    LABELS,
    JigsawBiLSTMScorer,
    RestrictedUnpickler,
    package_files,
    pad_pre,
    read_keras_tokenizer,
)
from destein_pl.evaluation.scorers import (
    SCORERS,
    HFClassifierScorer,
    PerspectiveScorer,
    ProfanityCheckScorer,
    ScorerUnavailableError,
    build_scorer,
)
from destein_pl.http_client import RetryPolicy

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
    # The labels are only known once the model is loaded: by `setup`, which a run calls before it starts.
    with pytest.raises(ValueError, match=r"unknown label 'insult'.*0='ok', 1='toxic'"):
        HFClassifierScorer(binary_classifier, label="insult").setup()
    with pytest.raises(ValueError, match=r"label index 2 is out of range.*'toxic'"):
        HFClassifierScorer(binary_classifier, label=2).setup()
    three = _save_classifier(tmp_path, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    with pytest.raises(ValueError, match=r"3 labels; choose one with `label` \(0='a', 1='b', 2='c'\)"):
        HFClassifierScorer(three).score(["go away"])  # `score` sets up when nobody did


def test_hf_classifier_multi_label_uses_sigmoid(tmp_path):
    labels = {0: "toxic", 1: "obscene", 2: "insult"}
    path = _save_classifier(
        tmp_path, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()},
        problem_type="multi_label_classification",
    )
    expected = _direct_logits(path, SENTENCES).sigmoid()[:, 2].tolist()
    assert HFClassifierScorer(path, label="insult", device="cpu").score(SENTENCES) == pytest.approx(expected, abs=1e-5)


def test_hf_classifier_constructor_loads_nothing_and_checks_its_arguments(tmp_path):
    scorer = HFClassifierScorer(str(tmp_path / "no-such-model"), label="toxic", max_length=128)
    assert scorer.fingerprint() == {"name": "hf-classifier", "model": str(tmp_path / "no-such-model"),
                                    "label": "toxic", "max_length": 128}
    with pytest.raises(OSError):
        scorer.setup()
    for kwargs, message in [({"batch_size": 0}, "`batch_size` must be at least 1"),
                            ({"max_length": 0}, "`max_length` must be at least 1"),
                            ({"label": -1}, "`label` as an index must be at least 0"),
                            ({"device": "gpu7"}, "`device` 'gpu7' is not a torch device")]:
        with pytest.raises(ValueError, match=message):
            HFClassifierScorer("some/model", **kwargs)
    with pytest.raises(ValueError, match="`model` must name a classifier"):
        HFClassifierScorer("")


def test_hf_classifier_setup_is_idempotent(binary_classifier):
    scorer = HFClassifierScorer(binary_classifier, device="cpu")
    scorer.setup()
    model = scorer.model
    scorer.setup()
    scorer.score(["go away"])
    assert scorer.model is model


# ---------------------------------------------------------------- perspective

KEY = "test-key-123"
ALWAYS = 10**6


class FakePerspective:
    """Speaks Perspective's JSON; score = fraction of words equal to "idiot". `script[text]` lists
    (status, headers) failures served, in order, before the text succeeds."""

    def __init__(self) -> None:
        self.script: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.counts: Counter[str] = Counter()
        self.served: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["comment"]["text"]
                with fake.lock:
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
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Shut the server down for good: from now on nothing answers at its address."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)


@pytest.fixture
def fake_perspective():
    fake = FakePerspective()
    yield fake
    fake.stop()


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
    assert scorer.policy == RetryPolicy(max_retries=3, backoff_s=0.01, timeout_s=5.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="destein_pl.evaluation.scorers"):
        scores = scorer.score(texts)
    elapsed = time.monotonic() - started

    assert scores == [0.0, 0.5, 0.0, 0.75, None, 0.0, None, 1.0]
    assert scorer.missing == 2
    assert fake.counts == {"hello there": 1, a: 2, b: 3, c: 4, d: 1, "idiot": 1}  # 1 + max_retries for c
    assert scorer.requests == sum(fake.counts.values()) and scorer.cache_hits == 0
    assert "HTTP 500" in caplog.text and "HTTP 400" in caplog.text and KEY not in caplog.text
    # Request starts are at least 1/20 s apart (the exact spacing is tested on a fake clock in test_http_client;
    # measured here on the client, as a lower bound that a loaded machine cannot break).
    assert elapsed >= (scorer.requests - 1) / 20

    # A rerun (e.g. after an interruption) pays nothing for what succeeded; failures are tried again.
    fake.counts.clear()
    rerun = _scorer(fake, cache)
    assert rerun.score(texts) == scores
    assert rerun.cache_hits == 4 and rerun.missing == 2
    assert fake.counts == {c: 4, d: 1}


def test_perspective_backoff_is_exponential_and_honours_retry_after(fake_perspective, api_key, tmp_path):
    # The exact waits are tested in test_http_client; here, that the scorer waits at least that long.
    fake = fake_perspective
    fake.script = {"idiot": [(500, {}), (502, {}), (503, {})], "slow down": [(429, {"Retry-After": "0.3"})]}
    scorer = _scorer(fake, tmp_path / "p.sqlite", requests_per_second=1000.0, backoff_s=0.05)
    started = time.monotonic()
    assert scorer.score(["idiot"]) == [1.0]
    assert time.monotonic() - started >= 0.05 + 0.1 + 0.2
    started = time.monotonic()
    assert scorer.score(["slow down"]) == [0.0]
    assert time.monotonic() - started >= 0.3  # Retry-After beats backoff_s=0.05
    assert fake.counts == {"idiot": 4, "slow down": 2}


def test_perspective_connection_errors_are_retried_then_missing(fake_perspective, api_key, tmp_path, caplog):
    fake = fake_perspective
    scorer = _scorer(fake, tmp_path / "p.sqlite", requests_per_second=100.0, max_retries=2, timeout_s=2.0)
    assert scorer.score(["idiot"]) == [1.0]  # the server was up
    fake.stop()
    with caplog.at_level(logging.WARNING, logger="destein_pl.evaluation.scorers"):
        assert scorer.score(["some text"]) == [None]
    assert scorer.requests == 1 + 3 and scorer.missing == 1
    assert "after 2 retries" in caplog.text and "connection error" in caplog.text


def test_perspective_stops_after_consecutive_failures(fake_perspective, api_key, tmp_path):
    fake = fake_perspective
    texts = [f"text {i}" for i in range(8)]
    fake.script = {t: [(503, {})] * ALWAYS for t in texts}
    scorer = _scorer(fake, tmp_path / "p.sqlite", requests_per_second=1000.0, max_retries=0, backoff_s=0.0,
                     max_consecutive_failures=3)
    started = time.monotonic()
    with pytest.raises(ScorerUnavailableError, match=r"3 texts in a row.*HTTP 503.*looks unavailable") as info:
        scorer.score(texts)
    assert time.monotonic() - started < 5.0  # well under a second unless the machine stalls
    assert "kept" in str(info.value) and "rerun" in str(info.value) and KEY not in str(info.value)
    assert scorer.requests == 3 and scorer.missing == 3 and sum(fake.counts.values()) == 3


def test_perspective_failures_in_a_row_are_reset_by_a_score(fake_perspective, api_key, tmp_path):
    fake = fake_perspective
    bad = [f"broken {i}" for i in range(4)]
    fake.script = {t: [(503, {})] * ALWAYS for t in bad}
    scorer = _scorer(fake, tmp_path / "p.sqlite", requests_per_second=1000.0, max_retries=0, backoff_s=0.0,
                     max_consecutive_failures=3)
    assert scorer.score([bad[0], bad[1], "idiot", bad[2], "", bad[3]]) == [None, None, 1.0, None, 0.0, None]
    assert scorer.missing == 4 and scorer.requests == 5
    # The count goes on across calls (a run scores batch by batch): one more failure is the third in a row.
    with pytest.raises(ScorerUnavailableError):
        scorer.score(["broken 0"])
    never = _scorer(fake, tmp_path / "p.sqlite", requests_per_second=1000.0, max_retries=0, backoff_s=0.0,
                    max_consecutive_failures=None)
    assert never.score(bad * 2) == [None] * 8 and never.missing == 8  # unscored is None, never 0


def test_perspective_constructor_reads_nothing_and_checks_its_arguments(monkeypatch, tmp_path):
    monkeypatch.delenv("MY_PERSPECTIVE_KEY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    scorer = PerspectiveScorer(api_key_env="MY_PERSPECTIVE_KEY")  # no key yet: building is fine, as for `fit`
    assert scorer.cache_file is None and not (tmp_path / "xdg").exists()
    with pytest.raises(ValueError, match="MY_PERSPECTIVE_KEY"):
        scorer.setup()
    for kwargs, message in [
        ({"requests_per_second": 0}, "requests_per_second` must be a finite number > 0"),
        ({"max_retries": -1}, "max_retries must be at least 0"),
        ({"backoff_s": -1.0}, "backoff_s must be"),
        ({"timeout_s": 0.0}, "timeout_s must be"),
        ({"max_consecutive_failures": 0}, "max_consecutive_failures` must be at least 1"),
        ({"languages": []}, "`languages` must be a non-empty list"),
        ({"url": "ftp://example.com/x?key=SECRET"}, r"`url` must be an http\(s\) URL, got 'ftp://example.com/x'"),
        ({"attribute": ""}, "`attribute` must name"),
        ({"api_key_env": ""}, "`api_key_env` must name"),
    ]:
        with pytest.raises(ValueError, match=message):
            PerspectiveScorer(**kwargs)


def test_perspective_missing_key_and_default_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MY_PERSPECTIVE_KEY", raising=False)
    scorer = PerspectiveScorer(api_key_env="MY_PERSPECTIVE_KEY", cache_path=str(tmp_path / "p.sqlite"))
    with pytest.raises(ValueError, match="MY_PERSPECTIVE_KEY"):
        scorer.score(["some text"])
    monkeypatch.setenv("MY_PERSPECTIVE_KEY", KEY)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    scorer = PerspectiveScorer(api_key_env="MY_PERSPECTIVE_KEY")
    scorer.setup()
    assert str(scorer.cache_file) == str(tmp_path / "xdg" / "destein-pl" / "perspective.sqlite")
    assert (tmp_path / "xdg" / "destein-pl" / "perspective.sqlite").is_file()
    assert scorer.score(["", " \n"]) == [0.0, 0.0] and scorer.requests == 0


def test_fingerprints_name_what_scores_depend_on_and_no_key(api_key, tmp_path):
    assert ProfanityCheckScorer().fingerprint() == {"name": "profanity-check"}
    scorer = PerspectiveScorer(url="https://example.com/v1/analyze", attribute="INSULT", languages=["de"],
                               requests_per_second=5.0, max_retries=1, cache_path=str(tmp_path / "p.sqlite"))
    fingerprint = scorer.fingerprint()  # no setup needed: it goes into a run's settings before anything loads
    assert scorer.cache_file is None
    assert fingerprint == {"name": "perspective", "attribute": "INSULT", "languages": ["de"],
                           "url": "https://example.com/v1/analyze"}
    scorer.setup()
    assert scorer.fingerprint() == fingerprint and KEY not in json.dumps(fingerprint)
    assert PerspectiveScorer().fingerprint()["attribute"] == "TOXICITY"


# ---------------------------------------------------------------- jigsaw-bilstm
# The real package's weights and tokenizer (`pip install --no-deps toxic-comment-classifier`, as `make install` does).


@pytest.fixture(scope="module")
def jigsaw():
    scorer = JigsawBiLSTMScorer()
    scorer.setup()
    return scorer


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _keras_weights() -> dict[str, np.ndarray]:
    """The h5 file's arrays, read here with h5py on their own (float64), in Keras' layout."""
    weights, _ = package_files()
    with h5py.File(weights, "r") as file:
        return {name: np.asarray(obj[()], dtype=np.float64)
                for name, obj in _datasets(file["layers"]).items()}


def _datasets(group, prefix=""):
    found = {}
    for key, obj in group.items():
        if isinstance(obj, h5py.Dataset):
            found[prefix + key] = obj
        else:
            found.update(_datasets(obj, f"{prefix}{key}/"))
    return found


def _keras_lstm(xs, kernel, recurrent, bias):
    """Keras' LSTM cell, one step at a time: z = x K + h R + b, gates i, f, c, o in that order."""
    units = recurrent.shape[0]
    h, c, out = np.zeros(units), np.zeros(units), []
    for x in xs:
        z = x @ kernel + h @ recurrent + bias
        i, f, g, o = (z[k * units : (k + 1) * units] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out.append(h)
    return np.stack(out)


def _keras_bilstm(w, ids):
    """Keras' Bidirectional(LSTM) states on the ids' embeddings: forward, then backward, per step."""
    x = w["embedding/vars/0"][ids]
    cell = "bidirectional/{}_layer/cell/vars/{}"
    forward = _keras_lstm(x, *(w[cell.format("forward", i)] for i in range(3)))
    backward = _keras_lstm(x[::-1], *(w[cell.format("backward", i)] for i in range(3)))[::-1]
    return np.concatenate([forward, backward], axis=1)


def test_jigsaw_bilstm_scores_insults_high_and_polite_text_low(jigsaw):
    insults = ["you are a stupid idiot", "Shut up, you worthless piece of shit.", "fuck you, moron"]
    polite = ["Thank you very much for your help, I really appreciate it.", "The meeting is moved to Tuesday.",
              "What a lovely day it is, let us go for a walk in the park."]
    scores = jigsaw.score(insults + polite)
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert min(scores[:3]) > 0.5 and max(scores[3:]) < 0.1, scores
    assert jigsaw.score([]) == []


def test_jigsaw_bilstm_scores_do_not_depend_on_the_batch_size(jigsaw):
    texts = [f"text {i}: you are an idiot" if i % 3 == 0 else f"a calm sentence number {i}" for i in range(17)]
    texts += ["", "word " * 150 + "idiot"]  # empty (all padding), and longer than the 100 words kept
    one = JigsawBiLSTMScorer(label="insult", batch_size=1)
    seven = JigsawBiLSTMScorer(label="insult", batch_size=7)
    np.testing.assert_allclose(one.score(texts), seven.score(texts), rtol=0, atol=1e-6)
    assert len(one.score(texts)) == len(texts)


def test_jigsaw_bilstm_tokenizer_matches_a_hand_computation(jigsaw):
    # Lower-cased, every Keras filter character (punctuation, tab, newline) a separator, the apostrophe kept;
    # `zebra` (index 28128, beyond the 20,000 kept) and the unknown `defenestrated` are dropped.
    sentence = "Hello, World!\tYou're NOT (really) a zebra... fool;\ndefenestrated?"
    index = jigsaw.tokenizer.word_index
    assert [index[w] for w in ("hello", "world", "you're", "not", "really", "a", "fool")] == [
        302, 257, 173, 14, 134, 5, 1819]
    assert index["zebra"] == 28128 and "defenestrated" not in index
    assert jigsaw.tokenizer.texts_to_sequences([sentence, ""]) == [[302, 257, 173, 14, 134, 5, 1819], []]
    settings = jigsaw.tokenizer
    assert (settings.lower, settings.split, settings.char_level, settings.num_words, settings.oov_token) == (
        True, " ", False, 20000, None)
    assert settings.filters == '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'
    # Keras' pad_sequences defaults: zeros in front, and the last 100 indexes of a longer text.
    padded = pad_pre([[1, 2, 3], list(range(1, 151)), []])
    assert padded.shape == (3, 100) and padded.dtype == torch.int64
    assert padded[0, :97].eq(0).all() and padded[0, 97:].tolist() == [1, 2, 3]
    assert padded[1].tolist() == list(range(51, 151)) and padded[2].eq(0).all()


def test_jigsaw_bilstm_lstm_is_the_keras_cell_recurrence(jigsaw):
    w = _keras_weights()
    ids = [0, 0, 302, 257, 6]  # leading padding, then "hello world you"
    with torch.inference_mode():
        states, _ = jigsaw.model.lstm(jigsaw.model.embedding(torch.tensor([ids])))
    np.testing.assert_allclose(states[0].double().numpy(), _keras_bilstm(w, ids), rtol=0, atol=1e-5)


def test_jigsaw_bilstm_network_matches_keras_over_the_padding(jigsaw):
    """The whole network, in numpy from the h5 arrays, on a text padded to 100 steps: Keras' model has no mask,
    so the LSTM runs over the 95 leading zeros too, and that changes the output."""
    w = _keras_weights()
    text = "you are a stupid idiot"
    ids = [0] * 95 + [6, 19, 5, 604, 1005]
    assert pad_pre(jigsaw.tokenizer.texts_to_sequences([text]))[0].tolist() == ids

    def keras_model(ids):
        pooled = _keras_bilstm(w, ids).max(axis=0)
        hidden = np.maximum(pooled @ w["dense/vars/0"] + w["dense/vars/1"], 0.0)
        return _sigmoid(hidden @ w["dense_1/vars/0"] + w["dense_1/vars/1"])

    expected = keras_model(ids)
    probs = jigsaw.probabilities([text])[0].double().numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
    assert jigsaw.score([text]) == pytest.approx([expected[LABELS.index("toxic")]], abs=1e-5)
    assert np.abs(keras_model(ids[95:]) - expected).max() > 1e-3  # without the padding, other scores
    mean = JigsawBiLSTMScorer(label="mean").score([text])[0]
    assert mean == pytest.approx(float(expected.mean()), abs=1e-5)


class _Runs:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("data, refused", [
    (b"cos\nsystem\n(S'echo pwned'\ntR.", "os.system"),  # protocol 0, by hand
    (pickle.dumps(_Runs()), "builtins.print"),
    (pickle.dumps(torch.nn.Linear), "torch.nn.modules.linear.Linear"),
])
def test_jigsaw_bilstm_unpickler_refuses_other_classes(data, refused, capsys):
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to unpickle {refused}: .*Tokenizer"):
        RestrictedUnpickler(io.BytesIO(data)).load()
    assert "this ran" not in capsys.readouterr().out


def test_jigsaw_bilstm_tokenizer_file_must_be_a_keras_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.pickle"
    path.write_bytes(pickle.dumps({"word_index": {"a": 1}}))  # allowed types, but no Tokenizer
    with pytest.raises(TypeError, match="expected a pickled keras.src.legacy.preprocessing.text.Tokenizer"):
        read_keras_tokenizer(path)
    _, real = package_files()
    assert read_keras_tokenizer(real).num_words == 20000


def test_jigsaw_bilstm_options_registry_and_fingerprint(monkeypatch):
    with pytest.raises(ValueError, match="unknown `label` 'toxicity'; accepted: toxic, severe_toxic, obscene, "
                                         "threat, insult, identity_hate, mean"):
        JigsawBiLSTMScorer(label="toxicity")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="`batch_size` must be an integer of at least 1"):
            JigsawBiLSTMScorer(batch_size=bad)
    assert SCORERS["jigsaw-bilstm"] is JigsawBiLSTMScorer
    scorer = build_scorer("{class_path: JigsawBiLSTMScorer, init_args: {label: insult, batch_size: 3}}")
    assert (type(scorer), scorer.label, scorer.batch_size, scorer.model) == (JigsawBiLSTMScorer, "insult", 3, None)
    assert build_scorer("jigsaw-bilstm").label == "toxic"
    fingerprint = scorer.fingerprint()  # before setup: nothing loaded
    assert fingerprint == {"name": "jigsaw-bilstm", "label": "insult", "package": "toxic-comment-classifier 0.3.0"}
    assert scorer.model is None
    # Without the package (or h5py), setup says how to install it: without its TensorFlow requirements.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "toxic_classifier" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps toxic-comment-classifier"):
        JigsawBiLSTMScorer().setup()
