"""The HTTP application: OpenAI's `/v1/completions` and `/v1/chat/completions` over one steered model, with the
steering strength chosen per request, plus `/v1/models` and `/health`.

Every request is checked before it reaches the model (body size, JSON, fields, model name, alpha range, the
context), then its rows join the next batch (`BatchingEngine`). The handler waits for the batch's updates on an
`asyncio.Queue` fed from the worker thread, streaming them as server-sent events or answering once at the end. A
request that passes its deadline, or whose client disconnects, is cancelled: its rows leave the batch, and the
other requests go on.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from destein_pl.evaluation.sampling import end_token_ids, row_seed
from destein_pl.serving.batching import BatchingEngine, Job, QueueFullError, Update
from destein_pl.serving.decoding import Decoder, Row
from destein_pl.serving.protocol import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    choice,
    completion_body,
    new_id,
    parse,
    usage,
)


@dataclass(frozen=True)
class ServeSettings:
    """What the server accepts and how it batches (the `destein serve` options of the same names).

    Args:
        model_name: the model id clients name in `model` (and `/v1/models` lists).
        max_alpha: the largest alpha a request may ask for (the smallest is 0, the base model).
        max_batch_rows: most rows (choices) decoded in one batch.
        batch_wait_ms: how long a request waits for others to join its batch.
        timeout_s: a request's deadline, from its arrival to its last token.
        max_body_bytes: largest request body accepted (413 beyond it).
        max_queued: most requests waiting for a batch (503 beyond it).
    """

    model_name: str
    max_alpha: float
    max_batch_rows: int = 16
    batch_wait_ms: float = 20.0
    timeout_s: float = 120.0
    max_body_bytes: int = 1_000_000
    max_queued: int = 256

    def __post_init__(self) -> None:
        checks = {"max_alpha": self.max_alpha >= 0, "max_batch_rows": self.max_batch_rows >= 1,
                  "batch_wait_ms": self.batch_wait_ms >= 0, "timeout_s": self.timeout_s > 0,
                  "max_body_bytes": self.max_body_bytes >= 1, "max_queued": self.max_queued >= 1}
        for name, ok in checks.items():
            if not ok or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; it must be a finite number "
                                 f"{'>= 0' if name in ('max_alpha', 'batch_wait_ms') else '> 0'}")
        if not self.model_name.strip():
            raise ValueError("model_name is empty; give the id clients will send as `model`")


def create_app(steered, settings: ServeSettings) -> FastAPI:
    """The FastAPI application serving `steered` (a `SteeredCausalLM` with a tokenizer) under `settings`. Its
    batching worker starts and stops with the application."""
    if steered.tokenizer is None:
        raise ValueError("the SteeredCausalLM has no tokenizer; the server needs one to read prompts")
    if steered.method is not None:
        raise ValueError(f"the server steers with DeStein's vectors; the baseline method {steered.method.name!r} "
                         f"takes one alpha for a whole batch")
    steered.model.set_attn_implementation("eager")  # a row's tokens do not depend on its batch neighbours
    steered.eval()
    served = _Served(steered, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()

    app = FastAPI(title="destein-pl", summary="An OpenAI-compatible server for a steered model", lifespan=lifespan)
    app.state.served = served

    @app.exception_handler(RequestError)
    async def refused(_: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "queued": served.engine.queued, **served.engine.stats}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [served.model_card()]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await served.answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await served.answer(request, chat=True)

    return app


class _Served:
    """The model behind the routes: the steered model, its batching engine, and the checks a request passes."""

    def __init__(self, steered, settings: ServeSettings) -> None:
        self.steered, self.settings, self.tokenizer = steered, settings, steered.tokenizer
        self.alpha = float(f"{steered.alpha:.6g}")  # as given, not its float32 rounding
        self.context = steered.architecture.context_length(steered.config)
        decoder = Decoder(steered, end_token_ids(steered.generation_config, self.tokenizer))
        self.engine = BatchingEngine(decoder, settings.max_batch_rows, settings.batch_wait_ms / 1000,
                                     settings.max_queued)
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "destein-pl",
                "destein": {"alpha": self.alpha, "max_alpha": self.settings.max_alpha,
                            "gate": self.steered.gate.mode, "fusion": self.steered.fusion,
                            "context_length": self.context}}

    async def answer(self, request: Request, chat: bool):
        arrived = time.monotonic()
        body = await self.read_body(request)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the body is not JSON: {error}") from None
        parsed = parse(ChatRequest if chat else CompletionRequest, data)
        if parsed.model != self.settings.model_name:
            raise RequestError(404, f"model '{parsed.model}' is not served here; this server serves "
                                    f"'{self.settings.model_name}'", "model", "model_not_found")
        alpha = self.request_alpha(parsed)
        prompts = [self.chat_ids(parsed)] if chat else [self.prompt_ids(text) for text in parsed.prompts]
        max_tokens = self.max_tokens(parsed, prompts)
        keys = [self.tokenizer.decode(prompts[0])] if chat else parsed.prompts  # what a seed is mixed with
        rows = [Row(ids, alpha, max_tokens, parsed.temperature, parsed.top_p, self.row_seed(parsed.seed, key, i),
                    parsed.stop_strings)
                for ids, key in zip(prompts, keys) for i in range(parsed.n)]
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()

        def send(update: Update) -> None:
            try:
                loop.call_soon_threadsafe(updates.put_nowait, update)
            except RuntimeError:  # the event loop is closed: the server is stopping
                pass

        job = Job(rows, send)
        try:
            self.engine.submit(job)
        except QueueFullError as error:
            raise RequestError(503, str(error), kind="server_overloaded") from None
        reply = _Reply(chat, new_id("chatcmpl" if chat else "cmpl"), self.settings.model_name, alpha,
                       sum(len(ids) for ids in prompts), parsed.n)
        deadline = arrived + self.settings.timeout_s
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(self.stream(job, updates, reply, deadline, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            update = await self.last_update(request, job, updates, deadline)
        finally:
            job.cancel()  # a no-op once finished; otherwise the client is gone or the deadline passed
        return reply.whole(update)

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it is larger than `max_body_bytes`."""
        limit = self.settings.max_body_bytes
        too_large = RequestError(413, f"the request body is larger than {limit} bytes, the most this server "
                                      f"accepts (--max_body_bytes)", kind="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def row_seed(seed: int | None, key: str, index: int) -> int:
        """Choice `index` of the prompt `key`: seeded as the evaluation sampler seeds a prompt's samples, so the same
        seed gives the same continuation; without a seed, a fresh random one."""
        return random.getrandbits(63) if seed is None else row_seed(seed, key, index)

    def request_alpha(self, parsed) -> float:
        alpha = self.alpha if parsed.destein.alpha is None else parsed.destein.alpha
        if not 0 <= alpha <= self.settings.max_alpha:
            raise RequestError(400, f"destein.alpha {alpha:g} is outside the range this server allows, 0 (the base "
                                    f"model) to {self.settings.max_alpha:g} (--max_alpha)", "destein.alpha")
        return float(alpha)

    def prompt_ids(self, text: str) -> list[int]:
        """A completion prompt's tokens, as the evaluation sampler tokenizes prompts."""
        ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise RequestError(400, "the prompt has no tokens; give text to continue", "prompt")
        return ids

    def chat_ids(self, parsed: ChatRequest) -> list[int]:
        """The conversation rendered by the tokenizer's chat template, ready for the assistant's answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(400, f"model '{self.settings.model_name}' has no chat template; use /v1/completions",
                               "messages")
        messages = [{"role": m.role, "content": m.content} for m in parsed.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # the template's own refusal (e.g. roles out of order): the client's to fix
            raise RequestError(400, f"the chat template refused these messages: {error}", "messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def max_tokens(self, parsed, prompts: list[list[int]]) -> int:
        """The request's token limit, checked against the room the context leaves after its longest prompt; a chat
        request without one gets all that room."""
        longest = max(len(ids) for ids in prompts)
        room = self.context - longest
        given = parsed.max_tokens
        if room < 1:
            raise RequestError(400, f"the prompt has {longest} tokens, which fill the model's context of "
                                    f"{self.context} tokens; shorten it", "messages" if given is None else "prompt")
        if given is None:
            return room
        if given > room:
            raise RequestError(400, f"max_tokens {given} and the prompt's {longest} token(s) are more than the model's "
                                    f"context of {self.context} tokens; ask for at most {room}", "max_tokens")
        return given

    async def next_update(self, request: Request | None, job: Job, updates: asyncio.Queue,
                          deadline: float) -> Update:
        """The job's next update; a `RequestError` once the deadline passes (504) or, when `request` is given,
        the client disconnects (checked every second)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestError(504, f"the request passed its deadline of {self.settings.timeout_s:g} s "
                                        f"(--timeout_s)", kind="timeout")
            try:
                return await asyncio.wait_for(updates.get(), timeout=min(left, 1.0))
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise RequestError(499, "the client disconnected", kind="client_closed") from None

    async def last_update(self, request: Request, job: Job, updates: asyncio.Queue, deadline: float) -> Update:
        while not (update := await self.next_update(request, job, updates, deadline)).done:
            pass
        if update.error is not None:
            raise RequestError(update.error[0], update.error[1], kind="server_error")
        return update

    async def stream(self, job: Job, updates: asyncio.Queue, reply: _Reply, deadline: float,
                     include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per step with each choice's new text, its finish reason when it ends, the
        usage if asked for, then `[DONE]`. A deadline or failure ends the stream with an error event."""
        try:
            if reply.chat:
                yield reply.event([choice(True, i, "", None, chunk=True, first=True) for i in range(reply.n)])
            while True:
                try:
                    update = await self.next_update(None, job, updates, deadline)
                except RequestError as error:
                    yield _event(error.body())
                    return
                if update.error is not None:
                    yield _event(RequestError(update.error[0], update.error[1], kind="server_error").body())
                    return
                chunk = reply.deltas(update)
                if chunk:
                    yield reply.event(chunk)
                if update.done:
                    break
            if include_usage:
                yield reply.event([], usage(reply.prompt_tokens, sum(update.tokens)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client is gone (the generator is closed) or the stream has ended


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class _Reply:
    """One request's response: whole, or as stream chunks that each carry only the text new since the last."""

    def __init__(self, chat: bool, request_id: str, model: str, alpha: float, prompt_tokens: int, n: int) -> None:
        self.chat, self.id, self.model, self.alpha = chat, request_id, model, alpha
        self.prompt_tokens = prompt_tokens
        self.n = n
        self.sent: list[str] | None = None
        self.finished: list[bool] | None = None

    def whole(self, update: Update) -> dict:
        choices = [choice(self.chat, i, text, reason)
                   for i, (text, reason) in enumerate(zip(update.texts, update.finish_reasons))]
        return completion_body(self.chat, self.id, self.model, self.alpha, choices,
                               usage_=usage(self.prompt_tokens, sum(update.tokens)))

    def deltas(self, update: Update) -> list[dict]:
        """Each choice's text new since the last chunk, and its finish reason once it has one."""
        if self.sent is None:
            self.sent, self.finished = [""] * len(update.texts), [False] * len(update.texts)
        out = []
        for i, (text, reason) in enumerate(zip(update.texts, update.finish_reasons)):
            if self.finished[i]:
                continue
            new = text[len(self.sent[i]):] if text.startswith(self.sent[i]) else ""
            if new or reason:
                self.sent[i] += new
                self.finished[i] = reason is not None
                out.append(choice(self.chat, i, new, reason, chunk=True))
        return out

    def event(self, choices: list[dict], usage_: dict | None = None) -> str:
        return _event(completion_body(self.chat, self.id, self.model, self.alpha, choices, chunk=True,
                                      usage_=usage_))

