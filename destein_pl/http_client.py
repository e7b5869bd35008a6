"""JSON over HTTP POST with rate limiting and retries, for the remote scorers and rewriters (urllib only).

A request is retried on HTTP 429, 5xx, connection errors and timeouts, waiting `backoff_s * 2**attempt` or the
server's `Retry-After` (seconds or an HTTP date), whichever is longer; any other 4xx is final. Whatever way a
request fails, `post_json` raises `HTTPRequestError`, whose message names the URL without its query string (where
API keys travel).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import http.client
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class HTTPRequestError(Exception):
    """A request that gave no usable answer. `status` is the HTTP status (None: no answer at all, e.g. a
    connection error or a timeout); `attempts` how many requests were made."""

    def __init__(self, url: str, reason: str, status: int | None = None, attempts: int = 1) -> None:
        self.url, self.reason, self.status, self.attempts = url, reason, status, attempts
        retries = f" after {attempts - 1} retries" if attempts > 1 else ""
        super().__init__(f"POST {url} failed{retries}: {reason}")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for an answer and how often to try again.

    Args:
        max_retries: retries after the first request (0: try once).
        backoff_s: wait before retry k (0-based) is `backoff_s * 2**k` seconds, or longer if the server asks.
        timeout_s: a deadline for each request, from its start to the last byte of the answer: a slow trickle of
            data does not keep a request alive past it.
        max_response_bytes: a longer answer is refused (it is not read further) and not retried.
    """

    max_retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 30.0
    max_response_bytes: int = 2**20

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, got {self.max_retries}")
        if not (self.backoff_s >= 0 and math.isfinite(self.backoff_s)):
            raise ValueError(f"backoff_s must be a finite number >= 0, got {self.backoff_s}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a finite number > 0, got {self.timeout_s}")
        if self.max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be at least 1, got {self.max_response_bytes}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based): the backoff, or the server's wish if longer."""
        return max(self.backoff_s * 2**attempt, retry_after or 0.0)


class RateLimiter:
    """Spaces the starts of requests at least `1 / requests_per_second` apart (thread-safe).

    `clock` and `sleep` are replaceable so that tests need not wait.
    """

    def __init__(self, requests_per_second: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not (requests_per_second > 0 and math.isfinite(requests_per_second)):
            raise ValueError(f"requests_per_second must be a finite number > 0, got {requests_per_second}")
        self.interval = 1.0 / requests_per_second
        self.clock, self.sleep = clock, sleep
        self._next_start: float | None = None
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until the next request may start, and claim that start."""
        with self._lock:
            now = self.clock()
            if self._next_start is not None and now < self._next_start:
                self.sleep(self._next_start - now)
                now = self._next_start
            self._next_start = now + self.interval

    def __getstate__(self) -> dict[str, Any]:  # a lock cannot be copied or pickled: each copy gets its own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


def endpoint_policy(kind: str, url: str, requests_per_second: float | None, max_retries: int, backoff_s: float,
                    timeout_s: float, allow_no_limit: bool = False) -> RetryPolicy:
    """Check what every HTTP client of the package is given (an http(s) `url`, a finite rate > 0, or None when
    `allow_no_limit`, and the retry options), with errors that start with `kind`; return the retry policy."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{kind}: `url` must be an http(s) URL, got {redacted(url)!r}")
    unlimited = requests_per_second is None and allow_no_limit
    if not unlimited and not (requests_per_second is not None and requests_per_second > 0
                              and math.isfinite(requests_per_second)):
        hint = " (or null)" if allow_no_limit else ""
        raise ValueError(f"{kind}: `requests_per_second` must be a finite number > 0{hint}, got {requests_per_second}")
    try:
        return RetryPolicy(max_retries=max_retries, backoff_s=backoff_s, timeout_s=timeout_s)
    except ValueError as err:
        raise ValueError(f"{kind}: {err}") from None


def redacted(url: str) -> str:
    """`url` without credentials, query string and fragment, safe to log."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def retry_after_seconds(value: str | None, now: dt.datetime | None = None) -> float | None:
    """The wait a `Retry-After` header asks for, given in seconds or as an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # HTTP dates are GMT
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = (when - (now or dt.datetime.now(dt.timezone.utc))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


class ResponseTooLarge(Exception):
    """An answer longer than the policy's `max_response_bytes`."""


def _attempt(request: urllib.request.Request, policy: RetryPolicy) -> tuple[int, bytes]:
    """One request within its deadline: the answer's status and body (urllib raises HTTPError for statuses of 400
    and more, TimeoutError past the deadline)."""
    deadline = time.monotonic() + policy.timeout_s
    with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
        sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
        chunks, size = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the answer did not arrive within timeout_s")
            if sock is not None:  # each wait for data ends at the deadline, not a timeout_s later
                sock.settimeout(remaining)
            chunk = response.read1(65536)
            if not chunk:
                return response.status, b"".join(chunks)
            size += len(chunk)
            if size > policy.max_response_bytes:
                raise ResponseTooLarge(f"the answer is longer than {policy.max_response_bytes} bytes "
                                       f"(max_response_bytes); not read further")
            chunks.append(chunk)


def post_json(
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    policy: RetryPolicy | None = None,
    limiter: RateLimiter | None = None,
    on_attempt: Callable[[], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """POST `body` as JSON to `url` and return the decoded JSON answer, retrying as `policy` says.

    Every attempt waits for `limiter` (if any) and calls `on_attempt` (e.g. to count requests). Raises
    `HTTPRequestError` when no attempt succeeds, at once for a 4xx other than 429, and for a 2xx whose body is
    not JSON.
    """
    policy = policy or RetryPolicy()
    data = json.dumps(body).encode()
    safe_url = redacted(url)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    for attempt in range(policy.max_retries + 1):
        if limiter is not None:
            limiter.wait()
        if on_attempt is not None:
            on_attempt()
        request = urllib.request.Request(url, data=data, headers=all_headers, method="POST")
        retry_after = None
        try:
            status, payload = _attempt(request, policy)
        except ResponseTooLarge as err:
            raise HTTPRequestError(safe_url, str(err), None, attempt + 1) from None
        except urllib.error.HTTPError as err:
            status, reason = err.code, f"HTTP {err.code}"
            err.close()
            if not _retryable(status):
                raise HTTPRequestError(safe_url, reason, status, attempt + 1) from None
            retry_after = retry_after_seconds(err.headers.get("Retry-After"))
        except (OSError, http.client.HTTPException) as err:  # refused, reset, DNS, timeouts, cut-short answers
            status, reason = None, _connection_reason(err)
        else:
            try:
                return json.loads(payload)
            except ValueError as err:  # not UTF-8 or not JSON
                raise HTTPRequestError(safe_url, f"malformed JSON in the answer ({err})", status, attempt + 1) from None
        if attempt < policy.max_retries:
            wait = policy.delay(attempt, retry_after)
            log.info("POST %s: %s; retry %d of %d in %.2f s", safe_url, reason, attempt + 1, policy.max_retries, wait)
            sleep(wait)
    raise HTTPRequestError(safe_url, reason, status, policy.max_retries + 1)


def _connection_reason(err: BaseException) -> str:
    """A short description of a failure without an HTTP answer (URLError wraps the socket error)."""
    inner = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(inner, TimeoutError):
        return "timed out"
    return f"connection error ({type(inner).__name__}: {inner})"
