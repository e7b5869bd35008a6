"""The OpenAI-compatible request bodies the server accepts, checked field by field, and the bodies it answers with.

Each request model forbids fields it does not know, so a misspelt or unsupported option is a 400 naming it rather
than silently ignored. Steering is the one extension: `"destein": {"alpha": A}` (absent: the checkpoint's alpha).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16


class Steering(BaseModel):
    """The request's steering: `alpha`, the strength for this request only (0: the base model)."""

    model_config = ConfigDict(extra="forbid")
    alpha: float | None = Field(default=None, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    destein: Steering = Field(default_factory=Steering)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty stop strings")
        return stops

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(_Request):
    """`POST /v1/completions`: continue `prompt` (one text, or a list of texts, each with `n` choices)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts or any(not text for text in texts):
            raise ValueError("the prompt is empty; give text to continue")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Request):
    """`POST /v1/chat/completions`: answer `messages` through the tokenizer's chat template."""

    messages: list[Message] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[Message]) -> list[Message]:
        if not any(m.content.strip() for m in value):
            raise ValueError("every message is empty; give text to answer")
        return value


_NESTED: dict[str, type[BaseModel]] = {"destein": Steering, "messages": Message, "stream_options": StreamOptions}


class RequestError(ValueError):
    """A request the server refuses: the HTTP status, the message and the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def parse(model: type[BaseModel], data: Any) -> BaseModel:
    """`data` as a request of `model`, or a 400 `RequestError` naming the first bad field and what it accepts."""
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            known = ", ".join(_fields(model, first["loc"][:-1]))
            raise RequestError(400, f"unknown field '{where}'; accepted: {known}", where) from None
        message = first["msg"].removeprefix("Value error, ")
        raise RequestError(400, f"{where}: {message}" if where else message, where or None) from None


def _fields(model: type[BaseModel], path: tuple) -> list[str]:
    """The field names at `path` inside `model` (for the message about an unknown one)."""
    named = [part for part in path if isinstance(part, str)]
    return list((_NESTED[named[0]] if named else model).model_fields)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(chat: bool, request_id: str, model: str, alpha: float, choices: list[dict[str, Any]],
                    chunk: bool = False, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """A response body (or, with `chunk`, a stream chunk) of either endpoint, the request's alpha echoed under
    `destein`."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    body: dict[str, Any] = {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
                            "choices": choices, "destein": {"alpha": alpha}}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def choice(chat: bool, index: int, text: str, finish_reason: str | None, chunk: bool = False,
           first: bool = False) -> dict[str, Any]:
    """One choice of a response, or of a stream chunk (`text` then being the new text only)."""
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if chunk:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}
