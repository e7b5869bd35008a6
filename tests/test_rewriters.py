"""Rewriters: lexical deletion, self-rewriting by a tiny model, the non-parallel pairing, and a chat-completions
endpoint with retries (how configs name them: tests/test_plugins.py)."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from destein_pl.induce.rewriters import (
    LexicalRewriter,
    NonParallelRewriter,
    OpenAICompatibleRewriter,
    RewriteContext,
    SelfRewriter,
)
from destein_pl.induce.rewriters.base import REWRITE_INSTRUCTION
from destein_pl.induce.rewriters.text import Candidate, choose_candidate, content_overlap, disguises


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


# ---------------------------------------------------------------- the self rewriter's few-shot mode

TOXIC_WORDS = {"fucking", "idiot", "damn"}


def _toxic(word: str) -> bool:
    return word in TOXIC_WORDS


def test_content_overlap_counts_kept_content_words():
    # content words of the source: cat, sat, mat ("the", "on" are stopwords, "damn" is toxic)
    assert content_overlap("The cat sat on the damn mat", "a cat sat", _toxic) == pytest.approx(2 / 3)
    assert content_overlap("The CAT sat on the mat.", "cat, sat, mat!", _toxic) == 1.0
    assert content_overlap("you damn idiot", "anything", _toxic) == 1.0  # nothing to keep


def test_choose_candidate_prefers_the_one_that_keeps_content_words():
    source = "you are a fucking idiot who ruined the party"  # 9 words; content words: ruined, party
    candidates = [
        "",  # empty
        "You are a FUCKING idiot who ruined the party!",  # the source again (same words)
        "you ruined the party",  # 4/9 of the length: too short
        "you are a person who ruined the evening",  # keeps ruined: 1/2
        "you are an idiot who ruined the party",  # keeps both, but a toxic word
        "you are a fcking person who ruined the party",  # respells a toxic word
        "you are a silly person who ruined the party",  # keeps both: 2/2
        "you are a person who ruined the party and the evening and the night and the day",  # 18/9: too long
    ]
    assert choose_candidate(source, candidates, _toxic) == Candidate(candidates[6], 1.0, 0)
    assert choose_candidate(source, candidates[:6], _toxic) == Candidate(candidates[3], 0.5, 0)
    assert choose_candidate(source, [candidates[4]], _toxic) == Candidate(candidates[4], 1.0, 1)
    assert choose_candidate(source, candidates[:3], _toxic) is None
    assert choose_candidate(source, [candidates[2]], _toxic, min_length_ratio=0.4) == Candidate(candidates[2], 1.0, 0)
    assert choose_candidate(source, [candidates[7]], _toxic, max_length_ratio=2.0).overlap == 1.0
    # ties go to the first
    assert choose_candidate(source, ["you are a nice person who ruined the party", candidates[6]], _toxic).text == (
        "you are a nice person who ruined the party")


def test_disguises_spots_respelled_toxic_words():
    assert disguises("fcking", ["fucking"]) and disguises("fucke", ["fucking"]) and disguises("darn", ["damn"])
    assert disguises("fcked", ["fuck"]) and not disguises("fast", ["fuck"])
    assert not disguises("brilliant", ["fucking"]) and not disguises("fucking", ["fucking"])
    assert not disguises("pass", ["ass"])  # too short a toxic word to judge


def _demonstrations(path, rows: int = 30):
    """A ParaDetox-like TSV of `rows` minimal-edit pairs, plus lines no demonstration may come from."""
    lines = ["toxic\tneutral1\tneutral2\tneutral3"]
    lines += [f"the fucking {w} number {i} is here\tthe {w} number {i} is here\t\t"
              for i, w in enumerate(["cat", "tree", "bird"] * (rows // 3))]
    lines.append("the weather is nice today\tthe weather is fine today\t\t")  # no toxic word
    lines.append("the fucking idiot ate my lunch\tsomething else entirely\t\t")  # not a minimal edit
    lines.append("fucking " + "long " * 30 + "text\t" + "long " * 30 + "text\t\t")  # too long
    path.write_text("\n".join(lines) + "\n")
    return path


def test_few_shot_prompt_holds_k_demonstrations_and_never_the_text(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    source = _demonstrations(tmp_path / "demos.tsv")
    rewriter = SelfRewriter(demonstrations=str(source), num_demonstrations=3)
    assert rewriter.pool == []  # nothing is read until first use
    prompt = rewriter.build_prompt(tok, "you damn\nidiot")
    assert prompt.endswith("Toxic: you damn idiot\nNeutral:")
    assert prompt.count("Toxic: ") == 4 and prompt.count("Neutral: ") == 3 and "<|im_start|>" not in prompt
    shots = rewriter.demonstrations_for("you damn idiot")
    assert len(shots) == 3 and all(p.toxic.startswith("the fucking ") for p in shots)
    for pair in shots:
        assert f"Toxic: {pair.toxic}\nNeutral: {pair.nontoxic}\n\n" in prompt
    # a text that is one of the demonstrations gets another in its place
    for text, replaced in ((shots[0].toxic, shots[0]), (shots[1].nontoxic.upper(), shots[1])):
        others = rewriter.demonstrations_for(text)
        assert len(others) == 3 and replaced not in others
        assert others[:2] == [p for p in shots if p is not replaced]  # the next one drawn comes last
        assert f"Toxic: {replaced.toxic}\n" not in rewriter.build_prompt(tok, text).rsplit("\n\n", 1)[0]
    # the same seed draws the same demonstrations, another seed others
    assert SelfRewriter(demonstrations=str(source), num_demonstrations=3).build_prompt(tok, "x") == (
        rewriter.build_prompt(tok, "x"))
    other = SelfRewriter(demonstrations=str(source), num_demonstrations=3, demonstration_seed=1)
    assert other.build_prompt(tok, "x") != rewriter.build_prompt(tok, "x")
    # a pairs JSONL serves too
    jsonl = tmp_path / "demos.jsonl"
    jsonl.write_text("".join(json.dumps({"toxic": p.toxic, "nontoxic": p.nontoxic}) + "\n" for p in shots * 2))
    assert len(SelfRewriter(demonstrations=str(jsonl), num_demonstrations=2).demonstrations_for("x")) == 2


def test_few_shot_forbids_toxic_words_and_masks(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    def ids(text):
        return tuple(tok(text, add_special_tokens=False)["input_ids"])

    def banned(before, token):
        (token_id,) = ids(token)
        return token_id in bans.get(ids(before) if before else (), set())

    stops, bans = SelfRewriter(demonstrations="unused.tsv")._special_ids(tok)
    assert ids("\n")[0] in stops and ids(" the")[0] not in stops
    assert len(ids(" stupid")) == 1 and banned("", " stupid")  # one token: never generated
    assert ids(" shit")[:1] == ids(" sh") and banned(" sh", "it") and banned(" sh", "its")  # `shits` too
    assert banned("", "***") and banned("", "*")
    assert not banned("", " the") and not banned("", " sh") and not banned(" sh", "ine")
    assert SelfRewriter(demonstrations="unused.tsv", banned_word_weight=None)._special_ids(tok)[1].keys() == {()}


def test_few_shot_demonstrations_file_errors(tmp_path):
    missing = SelfRewriter(demonstrations=str(tmp_path / "nowhere.tsv"))  # no I/O when built
    with pytest.raises(FileNotFoundError, match="`demonstrations` file not found: .*nowhere.tsv"):
        missing.setup()
    few = SelfRewriter(demonstrations=str(_demonstrations(tmp_path / "few.tsv", rows=6)), num_demonstrations=8)
    with pytest.raises(ValueError, match="few.tsv has 6 usable demonstrations.*`num_demonstrations` is 8"):
        few.setup()


def test_select_drops_rewrites_that_keep_too_few_content_words(tmp_path):
    demos = str(_demonstrations(tmp_path / "demos.tsv"))
    source = "you are a fucking idiot who ruined the party"  # content words: ruined, party
    half = "you are a person who ruined the evening"  # keeps 1 of 2
    assert SelfRewriter(demonstrations=demos, min_overlap=0.6).select(source, [half]) is None
    assert SelfRewriter(demonstrations=demos, min_overlap=0.5).select(source, [half]) == half
    assert SelfRewriter(demonstrations=demos).select(source, [source, ""]) is None  # identical or empty


def test_few_shot_rewriter_on_tiny_llama_is_deterministic(tmp_path, tiny_llama_dir):
    from destein_pl import SteeredCausalLM, load_base_model

    model, tok = load_base_model(str(tiny_llama_dir))
    demos = str(_demonstrations(tmp_path / "demos.tsv"))
    rewriter = SelfRewriter(demonstrations=demos, num_demonstrations=2, num_candidates=3, max_new_tokens=6,
                            batch_size=2, min_overlap=0.0, min_length_ratio=0.0, max_length_ratio=100.0)
    texts = ["you idiot", "shut up, moron", "this is damn garbage"]
    steered = SteeredCausalLM(model, tok)
    candidates = rewriter._candidates(steered, texts)
    assert len(candidates) == 3 and all(len(c) == 3 and all(isinstance(x, str) for x in c) for c in candidates)
    # a text's candidates depend on the seed and the text, not on the batch
    assert rewriter._candidates(steered, texts[1:2]) == candidates[1:2]
    side = tok.padding_side
    context = RewriteContext(steered)
    out = rewriter.rewrite(texts, context)
    assert out == rewriter.rewrite(texts, context) and len(out) == 3
    assert tok.padding_side == side


@pytest.mark.slow
def test_few_shot_rewriter_rewrites_on_the_embedded_model():
    from destein_pl import SteeredCausalLM, load_base_model
    from tests.conftest import SHARED_DATA

    model, tok = load_base_model("smollm2-135m")  # a copy of its own: the session's may be wrapped already
    rewriter = SelfRewriter(demonstrations=str(SHARED_DATA / "paradetox" / "paradetox.tsv"), num_demonstrations=4,
                            num_candidates=2)
    source = "that is a fucking brilliant plan , actually ."
    (out,) = rewriter.rewrite([source], RewriteContext(SteeredCausalLM(model, tok)))
    assert out is not None and "fuck" not in out.lower()
    assert content_overlap(source, out, rewriter.is_toxic) >= 0.4


def test_self_rewriter_checks_the_few_shot_options():
    for kwargs, message in [
        ({"num_demonstrations": 0}, "`num_demonstrations` must be at least 1, got 0"),
        ({"max_demonstration_words": 0}, "`max_demonstration_words` must be at least 1"),
        ({"num_candidates": 0}, "`num_candidates` must be at least 1"),
        ({"temperature": 0.0}, r"`temperature` must be a finite number > 0, got 0.0"),
        ({"min_overlap": 1.5}, r"`min_overlap` must be in \[0, 1\], got 1.5"),
        ({"min_length_ratio": -0.1}, "`min_length_ratio` must be a finite number >= 0"),
        ({"min_length_ratio": 1.0, "max_length_ratio": 0.5}, "`max_length_ratio` must be at least `min_length_ratio`"),
        ({"banned_word_weight": 0.0}, "`banned_word_weight` must be a finite number > 0"),
        ({"demonstrations": " "}, "`demonstrations` must name a pairs file"),
    ]:
        with pytest.raises(ValueError, match=message):
            SelfRewriter(**kwargs)


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
