"""`destein serve`: a real uvicorn server on a free 127.0.0.1 port, driven by the official `openai` client, against
the same checkpoint decoded offline by transformers' own `generate`."""

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from destein_pl.evaluation.sampling import end_token_ids
from destein_pl.serving.app import ServeSettings, create_app
from destein_pl.serving.server import running
from destein_pl.steering.model import SteeredCausalLM
from tests.conftest import RTP100, refusal

MODEL = "tiny"
PROMPT = "You are such a stupid"
ALPHAS = [0.0, 0.25, 0.5, 1.0]  # 0: the base model; 0.5: the tiny checkpoint's own


@contextmanager
def running_server(ckpt, **settings):
    """The app for `ckpt` served on a free port of 127.0.0.1; yields its URL, a client and the batching engine."""
    steered = SteeredCausalLM.from_checkpoint(ckpt)
    app = create_app(steered, ServeSettings(model_name=MODEL, **{"max_alpha": 1.0, **settings}))
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield SimpleNamespace(url=url, client=client, engine=app.state.served.engine, steered=steered)


@pytest.fixture(scope="module")
def tiny_ckpt(calibrated):
    return calibrated[1] / "tiny.ckpt"


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    with running_server(tiny_ckpt, batch_wait_ms=50) as running:
        yield running


def offline_model(ckpt) -> SimpleNamespace:
    """The same checkpoint, loaded apart from the server's: greedy continuations by transformers' `generate`, one
    prompt at a time, at a given alpha."""
    steered = SteeredCausalLM.from_checkpoint(ckpt)
    steered.model.set_attn_implementation("eager")
    tokenizer = steered.tokenizer
    ends = end_token_ids(steered.generation_config, tokenizer)

    def greedy(alpha: float, max_tokens: int, text: str | None = None, ids: list[int] | None = None) -> str:
        ids = tokenizer(text)["input_ids"] if ids is None else ids
        steered.alpha = alpha
        with torch.no_grad():
            out = steered.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                   eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(ids):].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in ends), len(new))]
        return tokenizer.decode(new, skip_special_tokens=True)

    return SimpleNamespace(greedy=greedy, steered=steered)


@pytest.fixture(scope="module")
def offline(tiny_ckpt):
    return offline_model(tiny_ckpt)


def concurrently(url: str, prompts: list[str], alphas: list[float], max_tokens: int) -> tuple[list, float]:
    """Greedy completions of `prompts`, each at its alpha, all sent at once; and the seconds until the last came."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def everyone():
        return await asyncio.gather(*(client.completions.create(
            model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0, extra_body={"destein": {"alpha": a}})
            for p, a in zip(prompts, alphas)))

    started = time.perf_counter()
    responses = asyncio.run(everyone())
    return responses, time.perf_counter() - started


def rtp_prompts(n: int) -> list[str]:
    return [json.loads(line)["prompt"]["text"] for line in RTP100.read_text().splitlines()[:n]]


# ---- what the server answers ------------------------------------------------------------------------------------
def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].destein["alpha"] == 0.5 and models.data[0].destein["max_alpha"] == 1.0
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_per_request_alpha_changes_the_text_as_the_same_alpha_does_offline(server, offline):
    texts = {}
    for alpha in ALPHAS:
        response = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                                    extra_body={"destein": {"alpha": alpha}})
        texts[alpha] = response.choices[0].text
        assert texts[alpha] == offline.greedy(alpha, 8, PROMPT)
        assert response.destein == {"alpha": alpha}  # echoed
        assert response.usage.prompt_tokens == len(offline.steered.tokenizer(PROMPT)["input_ids"])
    assert len(set(texts.values())) > 1  # steering changes the text
    default = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert default.destein == {"alpha": 0.5} and default.choices[0].text == texts[0.5]  # absent: the checkpoint's


def test_chat_answers_through_the_chat_template(server, offline):
    messages = [{"role": "user", "content": "Tell me about your neighbour."}]
    response = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                     extra_body={"destein": {"alpha": 1.0}})
    tokenizer = offline.steered.tokenizer
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == offline.greedy(1.0, 6, ids=ids)
    assert response.usage.prompt_tokens == len(ids) and response.destein == {"alpha": 1.0}


def test_a_stream_carries_the_same_text_as_the_whole_answer(server):
    whole = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    pieces, reasons, usage = [], [], None
    for chunk in server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}):
        assert chunk.destein == {"alpha": 0.5}
        for c in chunk.choices:
            pieces.append(c.text)
            reasons.append(c.finish_reason)
        usage = chunk.usage or usage
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 1
    assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}
    assert usage.completion_tokens == whole.usage.completion_tokens
    chat = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, stream=True)
    chunks = list(chat)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_stop_seed_and_choices(server):
    text = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [server.client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], max_tokens=8, n=3, seed=7,
                                                temperature=1.0, top_p=0.9) for _ in range(2)]
    first, second = ([c.text for c in s.choices] for s in sampled)
    assert first == second and len(first) == 6  # a seed reproduces; 2 prompts x 3 choices
    assert len(set(first[:3])) > 1  # the choices of one prompt are drawn apart
    assert [c.index for c in sampled[0].choices] == list(range(6))


# ---- bad input: a clear 4xx, and the server goes on ---------------------------------------------------------------
@pytest.mark.parametrize("arguments, error, message", [
    ({"extra_body": {"frobnicate": 1}}, openai.BadRequestError, r"unknown field 'frobnicate'; accepted: model, "),
    ({"extra_body": {"destein": {"alpha": 1.5}}}, openai.BadRequestError, r"destein.alpha 1.5 is outside .* 0 .* 1"),
    ({"extra_body": {"destein": {"alpha": -0.1}}}, openai.BadRequestError, r"destein.alpha -0.1 is outside"),
    ({"extra_body": {"destein": {"strength": 1}}}, openai.BadRequestError, r"unknown field 'destein.strength'; "
                                                                            r"accepted: alpha"),
    ({"max_tokens": 500}, openai.BadRequestError, r"max_tokens 500 .* context of 128 tokens; ask for at most 1"),
    ({"prompt": ""}, openai.BadRequestError, r"the prompt is empty"),
    ({"temperature": 3}, openai.BadRequestError, r"temperature"),
    ({"model": "gpt-4"}, openai.NotFoundError, r"model 'gpt-4' is not served here; this server serves 'tiny'"),
])
def test_bad_requests_get_a_clear_4xx(server, arguments, error, message):
    request = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **arguments}
    with pytest.raises(error, match=message):
        server.client.completions.create(**request)


def test_bodies_that_are_not_requests_are_refused_and_the_server_goes_on(server):
    big = httpx.post(f"{server.url}/v1/completions", content=b"x" * 10_000_000,
                     headers={"content-type": "application/json"}, timeout=60)
    assert big.status_code == 413 and "larger than 1000000 bytes" in big.json()["error"]["message"]
    broken = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "tiny", "prompt": ', timeout=60)
    assert broken.status_code == 400 and broken.json()["error"]["message"].startswith("the body is not JSON")
    nan = httpx.post(f"{server.url}/v1/completions", timeout=60,
                     content=b'{"model": "tiny", "prompt": "hi", "destein": {"alpha": NaN}}')
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "destein.alpha"
    messages = server.client.chat.completions.create
    with pytest.raises(openai.BadRequestError, match="unknown field 'messages.0.mood'"):
        messages(model=MODEL, messages=[{"role": "user", "content": "hi", "mood": "x"}])
    assert server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_a_client_that_disconnects_mid_stream_is_cancelled_and_the_others_are_served(server):
    cancelled = server.engine.stats["cancelled"]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "n": 16, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    for _ in range(200):  # the closed connection reaches the worker within a few decoding steps
        if server.engine.stats["cancelled"] > cancelled:
            break
        time.sleep(0.05)
    assert server.engine.stats["cancelled"] == cancelled + 1
    assert server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).choices[0].finish_reason


def test_a_request_past_its_deadline_gets_504_and_the_server_goes_on(tiny_ckpt):
    with running_server(tiny_ckpt, timeout_s=0.3) as strict:
        long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "n": 16, "temperature": 1.0}
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError, match="passed its deadline of 0.3 s") as raised:
            strict.client.completions.create(**long)
        assert raised.value.status_code == 504 and time.monotonic() - started < 5
        with pytest.raises(openai.APIError, match="passed its deadline"):
            list(strict.client.completions.create(**long, stream=True))
        assert strict.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_a_full_queue_is_refused_and_a_cancelled_job_never_reaches_the_model(server):
    from destein_pl.serving.batching import BatchingEngine, Job, QueueFullError
    from destein_pl.serving.decoding import Row

    engine = BatchingEngine(server.engine.decoder, max_queued=1)  # not started: jobs wait
    row = Row([1, 2, 3], 0.5, 2, temperature=0.0)
    sent = []
    waiting = Job([row], sent.append)
    engine.submit(waiting)
    with pytest.raises(QueueFullError, match="1 requests are waiting, the most this server queues"):
        engine.submit(Job([Row([1], 0.5, 2)], sent.append))
    waiting.cancel()
    engine.start()
    engine.stop()
    assert engine.stats["cancelled"] == 1 and engine.stats["batches"] == 0 and row.tokens == []


# ---- load: concurrent requests at mixed alphas, batched, each answered as offline --------------------------------
def test_concurrent_requests_at_mixed_alphas_are_batched_and_each_answered_as_offline(server, offline):
    prompts = rtp_prompts(64)
    alphas = [ALPHAS[i % len(ALPHAS)] for i in range(len(prompts))]
    batches = server.engine.stats["batches"]
    responses, served_s = concurrently(server.url, prompts, alphas, 8)
    assert [r.destein["alpha"] for r in responses] == alphas
    assert [r.choices[0].text for r in responses] == [offline.greedy(a, 8, p) for p, a in zip(prompts, alphas)]
    assert server.engine.stats["batches"] - batches < len(prompts)  # requests shared batches
    assert server.engine.stats["largest_batch"] > 1

    tokenizer, steered = offline.steered.tokenizer, offline.steered
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    started = time.perf_counter()
    with torch.no_grad():
        steered.generate(**batch, alpha=alphas, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    offline_s = time.perf_counter() - started
    tokens = sum(r.usage.completion_tokens for r in responses)
    print(f"\n64 requests at alphas {ALPHAS}: served {len(prompts) / served_s:.1f} requests/s, {tokens / served_s:.0f} "
          f"tokens/s; offline in one batch {len(prompts) / offline_s:.1f} prompts/s")


def test_a_gated_checkpoint_serves_each_alpha_with_its_own_gate_in_one_batch(continuation_gated):
    _, gated, _ = continuation_gated
    prompts = rtp_prompts(6)
    alphas = [0.0, 0.5, 1.0] * 2
    reference = offline_model(gated)
    with running_server(gated, batch_wait_ms=500) as running:
        assert running.client.models.list().data[0].destein["gate"] != "none"
        responses, _ = concurrently(running.url, prompts, alphas, 8)
        assert running.engine.stats["largest_batch"] > 1
    assert [r.choices[0].text for r in responses] == [reference.greedy(a, 8, p) for p, a in zip(prompts, alphas)]


def test_rows_leaving_a_gated_batch_early_leave_the_others_as_they_were(continuation_gated):
    from destein_pl.serving.decoding import Decoder, Row

    _, gated, _ = continuation_gated
    reference = offline_model(gated)
    steered = SteeredCausalLM.from_checkpoint(gated)
    steered.model.set_attn_implementation("eager")
    prompts = rtp_prompts(4)
    plan = [(1.0, 2), (0.0, 9), (0.5, 4), (0.0, 3)]  # (alpha, max_tokens): the steered rows leave first, then base
    rows = [Row(steered.tokenizer(p)["input_ids"], a, n, temperature=0.0) for p, (a, n) in zip(prompts, plan)]
    sizes = [len(stepped) for stepped in Decoder(steered, end_token_ids(steered.generation_config,
                                                                        steered.tokenizer)).steps(rows)]
    assert sizes[0] == 4 and sizes[-1] == 1  # the batch shrank as rows finished
    assert [r.text for r in rows] == [reference.greedy(a, n, p) for p, (a, n) in zip(prompts, plan)]


# ---- the command ------------------------------------------------------------------------------------------------
def test_destein_serve_binds_127_0_0_1_on_a_free_port_and_answers(tiny_ckpt):
    process = subprocess.Popen([sys.executable, "-m", "destein_pl.lightning.cli", "serve", "--ckpt_path",
                                str(tiny_ckpt), "--port", "0", "--batch_wait_ms", "5"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"tiny \(alpha 0.5, requests may ask 0 to 1, gate none\) on http://([\d.]+):(\d+)/v1", line)
        assert match, line
        assert match[1] == "127.0.0.1"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{match[2]}/v1", api_key="unused", max_retries=0)
        response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
        assert response.choices[0].text and response.destein == {"alpha": 0.5}
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_refuses_a_busy_port_and_bad_options_in_one_line(capsys, tiny_ckpt):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert "cannot listen there" in refusal(capsys, "serve", "--ckpt_path", str(tiny_ckpt), "--port", str(port))
    assert "--port 70000 is not a TCP port" in refusal(capsys, "serve", "--ckpt_path", str(tiny_ckpt),
                                                       "--port", "70000")
    assert "--max_alpha 0.2 is below the default alpha 0.5" in refusal(
        capsys, "serve", "--ckpt_path", str(tiny_ckpt), "--port", "0", "--max_alpha", "0.2")
    assert "timeout_s=0.0 is out of range" in refusal(capsys, "serve", "--ckpt_path", str(tiny_ckpt), "--port", "0",
                                                      "--timeout_s", "0")
