"""Rewriters: lexical deletion, self-rewriting by a tiny model, the non-parallel pairing, a chat-completions endpoint
with retries, and how configs name them."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonargparse
import pytest

from destein_pl.induce import REWRITERS, Rewriter, build_rewriter
from destein_pl.induce.rewriters import (
    REWRITE_INSTRUCTION,
    LexicalRewriter,
    NonParallelRewriter,
    OpenAICompatibleRewriter,
    RewriteContext,
    SelfRewriter,
)


def test_registry_names_match():
    assert {name: cls.name for name, cls in REWRITERS.items()} == {n: n for n in REWRITERS}
    assert set(REWRITERS) == {"self", "lexical", "openai-compatible", "none"}


def test_lexical_deletes_toxic_words_and_keeps_the_rest():
    rewriter = LexicalRewriter()
    assert rewriter.weights == {}  # the weights load on first use, not when a config is parsed
    out, only_toxic, clean = rewriter.rewrite(
        ["you are a fucking idiot, go away", "Fucking idiot!", "The weather is nice today."]
    )
    assert "fucking" not in out.lower() and "idiot" not in out.lower()
    assert out.index("you are a") < out.index("go away")
    assert "  " not in out and " ," not in out
    assert only_toxic is None
    assert clean == "The weather is nice today."
    assert rewriter.rewrite([]) == []


def test_lexical_min_weight_sets_how_much_goes():
    text = ["you are a fucking idiot, go away"]
    assert LexicalRewriter(min_weight=1.0).rewrite(text) == ["you are a, go away"]
    assert LexicalRewriter(min_weight=8.0).rewrite(text) == ["you are a idiot, go away"]  # only the strongest goes
    with pytest.raises(ValueError, match="`min_weight` must be a finite number > 0, got 0"):
        LexicalRewriter(min_weight=0)


def test_self_rewriter_on_tiny_llama(tiny_llama_dir):
    from destein_pl import SteeredCausalLM, load_base_model

    model, tok = load_base_model(str(tiny_llama_dir))
    side = tok.padding_side
    rewriter = SelfRewriter(max_new_tokens=8, batch_size=2)
    prompt = rewriter.build_prompt(tok, "you idiot")
    assert REWRITE_INSTRUCTION.format(text="you idiot") in prompt
    assert prompt != REWRITE_INSTRUCTION.format(text="you idiot") + "\n"  # the chat template wrapped it
    context = RewriteContext(SteeredCausalLM(model, tok))
    out = rewriter.rewrite(["you idiot", "shut up, moron", "this is garbage"], context)
    assert len(out) == 3
    assert all(isinstance(t, str) and t for t in out)
    assert tok.padding_side == side
    with pytest.raises(ValueError, match="needs the model"):
        rewriter.rewrite(["you idiot"])


def test_self_rewriter_checks_its_arguments():
    with pytest.raises(ValueError, match="`max_new_tokens` must be at least 1, got 0"):
        SelfRewriter(max_new_tokens=0)
    with pytest.raises(ValueError, match="`batch_size` must be at least 1"):
        SelfRewriter(batch_size=0)
    with pytest.raises(ValueError, match="`instruction` must contain `{text}`"):
        SelfRewriter(instruction="Be nice.")


def test_none_pairs_the_most_toxic_with_the_least_toxic_unselected_samples():
    pool = [{"id": "a", "text": "worst", "toxicity": 0.9}, {"id": "b", "text": "bad", "toxicity": 0.8},
            {"id": "c", "text": "mild", "toxicity": 0.3}, {"id": "d", "text": "calm", "toxicity": 0.1},
            {"id": "e", "text": "", "toxicity": 0.0}, {"id": "f", "text": "unscored", "toxicity": None},
            {"id": "g", "text": "also calm", "toxicity": 0.1}]
    rewriter = NonParallelRewriter()
    context = RewriteContext(pool=pool, selected_ids=["a", "b"])
    assert rewriter.rewrite(["worst", "bad"], context) == ["calm", "also calm"]
    # selected samples are never their own partners, and the pool can run out
    context = RewriteContext(pool=pool, selected_ids=["a", "b", "c", "d", "g"])
    assert rewriter.rewrite(["worst", "bad", "mild", "calm", "also calm"], context) == [None] * 5
    context = RewriteContext(pool=pool, selected_ids=["a", "b", "d"])
    assert rewriter.rewrite(["worst", "bad", "calm"], context) == ["also calm", "mild", None]


PREFIX = REWRITE_INSTRUCTION.split("{text}")[0]


@pytest.fixture
def chat_server(request):
    """A local chat-completions server that answers "polite: <text>" and fails on scripted texts."""
    state = {"counts": Counter(), "auth": [], "bodies": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][0]["content"][len(PREFIX) :]
            state["counts"][text] += 1
            state["auth"].append(self.headers.get("Authorization"))
            state["bodies"].append(body)
            status = 200
            if text == "always 500" or (text == "flaky" and state["counts"][text] == 1):
                status = 500
            elif text == "bad request":
                status = 400
            payload = {"choices": [{"message": {"content": f" polite: {text} "}}]} if status == 200 else {}
            if text == "malformed":
                payload = {"choices": []}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join()

    request.addfinalizer(stop)
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1/"
    return state


def test_openai_compatible_success_retries_and_failures(chat_server, monkeypatch, caplog):
    rewriter = OpenAICompatibleRewriter(
        chat_server["url"], "some-model", api_key_env="TEST_REWRITER_KEY", max_retries=3, backoff_s=0.01
    )
    monkeypatch.setenv("TEST_REWRITER_KEY", "secret-key")  # read when first used, not when built
    with caplog.at_level(logging.WARNING, logger="destein_pl.induce.rewriters"):
        out = rewriter.rewrite(["you idiot", "flaky", "always 500", "bad request"])
    assert out == ["polite: you idiot", "polite: flaky", None, None]
    assert chat_server["counts"] == {"you idiot": 1, "flaky": 2, "always 500": 4, "bad request": 1}
    assert rewriter.failed == 2
    assert set(chat_server["auth"]) == {"Bearer secret-key"}
    body = chat_server["bodies"][0]
    assert body["model"] == "some-model" and body["temperature"] == 0.0 and body["max_tokens"] == 128
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "HTTP 500" in warnings[0] and "HTTP 400" in warnings[1]
    assert "after 3 retries" in warnings[0] and "/v1/chat/completions" in warnings[0]
    assert not any("secret-key" in w for w in warnings)


def test_openai_compatible_without_key_sends_no_auth(chat_server, monkeypatch, caplog):
    monkeypatch.delenv("TEST_REWRITER_KEY", raising=False)
    rewriter = OpenAICompatibleRewriter(chat_server["url"], "m", api_key_env="TEST_REWRITER_KEY", backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="destein_pl.induce.rewriters"):
        assert rewriter.rewrite(["always 500"]) == [None]
    assert chat_server["counts"]["always 500"] == 4
    assert rewriter.failed == 1
    assert chat_server["auth"] == [None] * 4
    assert any("HTTP 500" in r.getMessage() for r in caplog.records)


def test_openai_compatible_malformed_answer_is_no_rewrite(chat_server, caplog):
    rewriter = OpenAICompatibleRewriter(chat_server["url"], "m", backoff_s=0.01, requests_per_second=100.0)
    with caplog.at_level(logging.WARNING, logger="destein_pl.induce.rewriters"):
        assert rewriter.rewrite(["malformed", "fine"]) == [None, "polite: fine"]
    assert chat_server["counts"]["malformed"] == 1 and rewriter.failed == 1
    assert "malformed response" in caplog.text


def test_openai_compatible_checks_its_arguments():
    for kwargs, message in [
        ({"url": "localhost:8000"}, r"`url` must be an http\(s\) URL"),
        ({"model": ""}, "`model` must name"),
        ({"temperature": -0.1}, "`temperature` must be a finite number >= 0"),
        ({"max_tokens": 0}, "`max_tokens` must be at least 1"),
        ({"max_retries": -1}, "max_retries must be at least 0"),
        ({"timeout_s": 0}, "timeout_s must be"),
        ({"requests_per_second": 0}, "`requests_per_second` must be a finite number > 0"),
        ({"instruction": "no placeholder"}, "`instruction` must contain"),
    ]:
        with pytest.raises(ValueError, match=message):
            OpenAICompatibleRewriter(**{"url": "http://localhost:8000/v1", "model": "m", **kwargs})


# ---------------------------------------------------------------- registry and config parsing


def test_build_rewriter():
    assert isinstance(build_rewriter("none"), NonParallelRewriter)
    assert isinstance(build_rewriter("self", max_new_tokens=4), SelfRewriter)
    assert build_rewriter("lexical", min_weight=2.0).min_weight == 2.0
    assert isinstance(build_rewriter("LexicalRewriter"), LexicalRewriter)
    assert isinstance(build_rewriter("destein_pl.induce.rewriters.NonParallelRewriter"), NonParallelRewriter)
    built = LexicalRewriter()
    assert build_rewriter(built) is built
    with pytest.raises(ValueError, match="unknown rewriter 'gpt'; accepted: self, lexical, openai-compatible, none"):
        build_rewriter("gpt")
    with pytest.raises(ValueError, match="missing a required argument: 'url'.*accepted options: url, model"):
        build_rewriter("openai-compatible", model="m")
    # what a command line gives when the parser refused the mapping: built here, so the error names the problem
    assert build_rewriter('{"class_path": "LexicalRewriter", "init_args": {"min_weight": 3}}').min_weight == 3
    with pytest.raises(ValueError, match="unexpected keyword argument 'weight'; accepted options: min_weight"):
        build_rewriter('{"class_path": "LexicalRewriter", "init_args": {"weight": 3}}')


def _induce_like(rewriter: Rewriter | str = "self") -> None:
    """Stands for `induce`'s rewriter option.

    Args:
        rewriter: the rewriter.
    """


def _parser() -> jsonargparse.ArgumentParser:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(_induce_like)
    return parser


def test_rewriter_parses_as_short_name_or_class_path(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    parser = _parser()
    assert parser.parse_args([]).rewriter == "self"
    for name in REWRITERS:
        assert parser.parse_args(["--rewriter", name]).rewriter == name
    config = tmp_path / "config.yaml"
    config.write_text("rewriter:\n  class_path: OpenAICompatibleRewriter\n  init_args:\n"
                      "    url: http://localhost:8000/v1\n    model: qwen\n    max_retries: 1\n")
    rewriter = parser.instantiate(parser.parse_args(["--config", str(config)])).rewriter
    assert isinstance(rewriter, OpenAICompatibleRewriter)
    assert (rewriter.endpoint, rewriter.model, rewriter.policy.max_retries) == (
        "http://localhost:8000/v1/chat/completions", "qwen", 1)
    args = ["--rewriter", "LexicalRewriter", "--rewriter.min_weight", "2.5"]
    rewriter = parser.instantiate(parser.parse_args(args)).rewriter
    assert isinstance(rewriter, LexicalRewriter) and rewriter.min_weight == 2.5


def test_rewriter_config_errors_name_the_option(tmp_path):
    parser = _parser()
    config = tmp_path / "config.yaml"
    config.write_text("rewriter:\n  class_path: LexicalRewriter\n  init_args:\n    weight: 2\n")
    with pytest.raises(jsonargparse.ArgumentError, match="Option 'weight' is not accepted"):
        parser.parse_args(["--config", str(config)])
    config.write_text("rewriter:\n  class_path: SelfRewriter\n  init_args:\n    max_new_tokens: 0\n")
    with pytest.raises((jsonargparse.ArgumentError, ValueError), match="`max_new_tokens` must be at least 1"):
        parser.instantiate(parser.parse_args(["--config", str(config)]))


def test_rewriter_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--rewriter.help", "OpenAICompatibleRewriter"])
    shown = capsys.readouterr().out
    for option in ("url", "model", "api_key_env", "instruction", "temperature", "max_tokens", "max_retries",
                   "backoff_s", "timeout_s", "requests_per_second"):
        assert f"--rewriter.{option}" in shown
