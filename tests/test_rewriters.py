"""Rewriters: lexical deletion, self-rewriting by a tiny model, and a chat-completions endpoint with retries."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from destein_pl.rewriters import (
    REWRITE_INSTRUCTION,
    REWRITERS,
    LexicalRewriter,
    OpenAICompatibleRewriter,
    SelfRewriter,
)


def test_registry_names_match():
    assert {name: cls.name for name, cls in REWRITERS.items()} == {n: n for n in REWRITERS}


def test_lexical_deletes_toxic_words_and_keeps_the_rest():
    rewriter = LexicalRewriter()
    out, only_toxic, clean = rewriter.rewrite(
        ["you are a fucking idiot, go away", "Fucking idiot!", "The weather is nice today."]
    )
    assert "fucking" not in out.lower() and "idiot" not in out.lower()
    assert out.index("you are a") < out.index("go away")
    assert "  " not in out and " ," not in out
    assert only_toxic is None
    assert clean == "The weather is nice today."


def test_self_rewriter_on_tiny_llama(tiny_llama_dir):
    from destein_pl import load_base_model

    model, tok = load_base_model(str(tiny_llama_dir))
    side = tok.padding_side
    rewriter = SelfRewriter(model, tok, max_new_tokens=8, batch_size=2)
    prompt = rewriter.build_prompt("you idiot")
    assert REWRITE_INSTRUCTION.format(text="you idiot") in prompt
    assert prompt != REWRITE_INSTRUCTION.format(text="you idiot") + "\n"  # the chat template wrapped it
    out = rewriter.rewrite(["you idiot", "shut up, moron", "this is garbage"])
    assert len(out) == 3
    assert all(isinstance(t, str) and t for t in out)
    assert tok.padding_side == side


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
    monkeypatch.setenv("TEST_REWRITER_KEY", "secret-key")
    rewriter = OpenAICompatibleRewriter(
        chat_server["url"], "some-model", api_key_env="TEST_REWRITER_KEY", max_retries=3, backoff_s=0.01
    )
    with caplog.at_level(logging.WARNING, logger="destein_pl.rewriters"):
        out = rewriter.rewrite(["you idiot", "flaky", "always 500", "bad request"])
    assert out == ["polite: you idiot", "polite: flaky", None, None]
    assert chat_server["counts"] == {"you idiot": 1, "flaky": 2, "always 500": 4, "bad request": 1}
    assert rewriter.failed == 2
    assert set(chat_server["auth"]) == {"Bearer secret-key"}
    body = chat_server["bodies"][0]
    assert body["model"] == "some-model" and body["temperature"] == 0.0 and body["max_tokens"] == 128
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "HTTP 500" in warnings[0] and "HTTP 400" in warnings[1]
    assert not any("secret-key" in w for w in warnings)


def test_openai_compatible_without_key_sends_no_auth(chat_server, monkeypatch, caplog):
    monkeypatch.delenv("TEST_REWRITER_KEY", raising=False)
    rewriter = OpenAICompatibleRewriter(chat_server["url"], "m", api_key_env="TEST_REWRITER_KEY", backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="destein_pl.rewriters"):
        assert rewriter.rewrite(["always 500"]) == [None]
    assert chat_server["counts"]["always 500"] == 4
    assert rewriter.failed == 1
    assert chat_server["auth"] == [None] * 4
    assert any("HTTP 500" in r.getMessage() for r in caplog.records)
