"""The HTTP helper against a loopback server: retries, Retry-After, final 4xx, timeouts, malformed answers, and the
rate limiter on a fake clock."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from destein_pl.http_client import (
    HTTPRequestError,
    RateLimiter,
    RetryPolicy,
    post_json,
    redacted,
    retry_after_seconds,
)


class Server:
    """A loopback server whose answer depends on the path: `/ok` echoes the body; `/fail/<status>/<n>` fails n
    times with that status (n = `always`: forever) then echoes; `/slow` answers after 1 s; `/malformed` sends a
    200 that is not JSON; `/trickle` sends its answer a byte every 0.1 s; `/huge` sends 3 MB. `retry_after[path]` is sent as the Retry-After header of failures."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.headers: list[dict[str, str]] = []
        self.retry_after: dict[str, str] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                path = self.path.split("?")[0]
                with server.lock:
                    server.counts[path] += 1
                    seen = server.counts[path]
                    server.headers.append(dict(self.headers))
                if path.startswith("/fail/"):
                    _, _, status, times = path.split("/")
                    if times == "always" or seen <= int(times):
                        extra = {"Retry-After": server.retry_after[path]} if path in server.retry_after else {}
                        return self._reply(int(status), b'{"error": "scripted"}', extra)
                elif path == "/slow":
                    time.sleep(1.0)
                elif path == "/malformed":
                    return self._reply(200, b"<html>not json</html>")
                elif path == "/trickle":  # a valid answer, one byte every 0.1 s
                    data = json.dumps({"echo": "x" * 40}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    try:
                        for i in range(len(data)):
                            self.wfile.write(data[i : i + 1])
                            self.wfile.flush()
                            time.sleep(0.1)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return None
                elif path == "/huge":
                    return self._reply(200, json.dumps({"echo": "x" * 3_000_000}).encode())
                self._reply(200, json.dumps({"echo": json.loads(body), "attempt": seen}).encode())

            def _reply(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                    **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # `/slow`: the client gave up waiting
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


class Sleeps(list):
    """Records the waits asked for instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_success_sends_json_headers_and_counts_attempts(server):
    attempts = []
    answer = post_json(f"{server.base}/ok", {"a": [1, "é"]}, {"Authorization": "Bearer k"},
                       on_attempt=lambda: attempts.append(1))
    assert answer == {"echo": {"a": [1, "é"]}, "attempt": 1}
    assert attempts == [1]
    assert server.headers[0]["Content-Type"] == "application/json" and server.headers[0]["Authorization"] == "Bearer k"


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_retryable_statuses_are_retried_with_exponential_backoff(server, status):
    sleeps, attempts = Sleeps(), []
    path = f"/fail/{status}/3"
    answer = post_json(server.base + path, {}, policy=RetryPolicy(max_retries=3, backoff_s=0.05),
                       on_attempt=lambda: attempts.append(1), sleep=sleeps)
    assert answer["attempt"] == 4 and server.counts[path] == 4 and len(attempts) == 4
    assert sleeps == pytest.approx([0.05, 0.1, 0.2])  # backoff_s * 2**attempt


def test_gives_up_after_max_retries_with_one_error_type(server):
    sleeps = Sleeps()
    with pytest.raises(HTTPRequestError) as info:
        post_json(f"{server.base}/fail/503/always", {}, policy=RetryPolicy(max_retries=2, backoff_s=0.01), sleep=sleeps)
    err = info.value
    assert err.status == 503 and err.attempts == 3 and server.counts["/fail/503/always"] == 3
    assert "HTTP 503" in str(err) and "after 2 retries" in str(err) and f"{server.base}/fail/503/always" in str(err)
    assert sleeps == pytest.approx([0.01, 0.02])  # no wait after the last attempt


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_are_not_retried(server, status):
    sleeps = Sleeps()
    with pytest.raises(HTTPRequestError) as info:
        post_json(f"{server.base}/fail/{status}/always", {}, policy=RetryPolicy(max_retries=5, backoff_s=0.01),
                  sleep=sleeps)
    assert info.value.status == status and info.value.attempts == 1 and f"HTTP {status}" in str(info.value)
    assert server.counts[f"/fail/{status}/always"] == 1 and sleeps == []


def test_retry_after_in_seconds_beats_a_shorter_backoff(server):
    server.retry_after["/fail/429/1"] = "0.3"
    sleeps = Sleeps()
    assert post_json(f"{server.base}/fail/429/1", {}, policy=RetryPolicy(backoff_s=0.05), sleep=sleeps)["attempt"] == 2
    assert sleeps == pytest.approx([0.3])
    server.retry_after["/fail/503/1"] = "0"  # a shorter wish does not shorten the backoff
    post_json(f"{server.base}/fail/503/1", {}, policy=RetryPolicy(backoff_s=0.05), sleep=sleeps)
    assert sleeps[1:] == pytest.approx([0.05])


def test_retry_after_as_an_http_date(server):
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    server.retry_after["/fail/503/1"] = email.utils.format_datetime(when, usegmt=True)
    sleeps = Sleeps()
    post_json(f"{server.base}/fail/503/1", {}, policy=RetryPolicy(backoff_s=0.05), sleep=sleeps)
    assert len(sleeps) == 1 and 27 <= sleeps[0] <= 30  # the date has whole seconds; the clock moved on a little


def test_retry_after_parsing():
    now = dt.datetime(2024, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert retry_after_seconds("7", now) == 7.0 and retry_after_seconds(" 1.5 ", now) == 1.5
    assert retry_after_seconds("Mon, 01 Jan 2024 12:00:10 GMT", now) == 10.0
    assert retry_after_seconds("Mon, 01 Jan 2024 11:00:00 GMT", now) == 0.0  # in the past: no wait
    assert retry_after_seconds("-3", now) == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("") is None
    assert retry_after_seconds("soon", now) is None and retry_after_seconds("inf", now) is None


def test_timeout_s_is_a_deadline_for_the_whole_answer(server):
    start = time.monotonic()
    with pytest.raises(HTTPRequestError, match="timed out"):
        post_json(f"{server.base}/trickle", {}, policy=RetryPolicy(max_retries=0, timeout_s=0.5))
    assert time.monotonic() - start < 2.0  # the whole answer would take over 5 s


def test_an_answer_over_the_size_cap_is_refused_and_not_retried(server):
    with pytest.raises(HTTPRequestError, match="longer than 1048576 bytes"):
        post_json(f"{server.base}/huge", {}, policy=RetryPolicy(max_retries=2, backoff_s=0.0))
    assert server.counts["/huge"] == 1
    assert post_json(f"{server.base}/huge", {}, policy=RetryPolicy(max_response_bytes=4_000_000))["echo"][:3] == "xxx"


def test_timeouts_are_retried_then_raised(server):
    sleeps = Sleeps()
    with pytest.raises(HTTPRequestError) as info:
        post_json(f"{server.base}/slow", {}, policy=RetryPolicy(max_retries=1, backoff_s=0.0, timeout_s=0.2),
                  sleep=sleeps)
    assert info.value.status is None and info.value.attempts == 2 and "timed out" in str(info.value)
    assert server.counts["/slow"] == 2 and sleeps == [0.0]


def test_connection_errors_are_retried_then_raised(server):
    url = f"{server.base}/ok"
    assert post_json(url, {})["attempt"] == 1  # the server was up
    server.stop()  # now nothing answers there
    sleeps = Sleeps()
    with pytest.raises(HTTPRequestError) as info:
        post_json(url, {}, policy=RetryPolicy(max_retries=2, backoff_s=0.01, timeout_s=2.0), sleep=sleeps)
    assert info.value.status is None and info.value.attempts == 3 and "connection error" in str(info.value)
    assert sleeps == pytest.approx([0.01, 0.02]) and server.counts["/ok"] == 1


def test_malformed_json_in_a_200_is_the_same_error_and_not_retried(server):
    with pytest.raises(HTTPRequestError, match="malformed JSON") as info:
        post_json(f"{server.base}/malformed", {}, policy=RetryPolicy(max_retries=3, backoff_s=0.01))
    assert info.value.status == 200 and server.counts["/malformed"] == 1


def test_errors_never_show_the_api_key(server):
    with pytest.raises(HTTPRequestError) as info:
        post_json(f"{server.base}/fail/403/always?key=SECRET-123", {})
    assert "SECRET" not in str(info.value) and "SECRET" not in info.value.url
    assert info.value.url == f"{server.base}/fail/403/always"
    assert redacted("https://user:pw@example.com:8443/v1/x?key=abc#frag") == "https://example.com:8443/v1/x"


def test_policy_validates_its_arguments():
    with pytest.raises(ValueError, match="max_retries must be at least 0"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="backoff_s must be"):
        RetryPolicy(backoff_s=-0.5)
    with pytest.raises(ValueError, match="timeout_s must be"):
        RetryPolicy(timeout_s=0)
    with pytest.raises(ValueError, match="requests_per_second must be"):
        RateLimiter(0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_rate_limiter_spaces_request_starts():
    clock = FakeClock()
    limiter = RateLimiter(4.0, clock=clock, sleep=clock.sleep)
    limiter.wait()
    limiter.wait()
    limiter.wait()
    assert clock.sleeps == pytest.approx([0.25, 0.25])
    clock.now += 0.1  # part of the interval passed doing other work: only the rest is waited
    limiter.wait()
    assert clock.sleeps[-1] == pytest.approx(0.15)
    clock.now += 5.0  # idle for long: no wait, and no burst of catch-up starts afterwards
    limiter.wait()
    limiter.wait()
    assert clock.sleeps[3:] == pytest.approx([0.25])


def test_rate_limiter_applies_to_every_attempt(server):
    clock = FakeClock()
    limiter = RateLimiter(2.0, clock=clock, sleep=clock.sleep)
    post_json(f"{server.base}/fail/500/2", {}, policy=RetryPolicy(backoff_s=0.0), limiter=limiter, sleep=Sleeps())
    assert server.counts["/fail/500/2"] == 3 and clock.sleeps == pytest.approx([0.5, 0.5])


def test_rate_limiter_survives_deepcopy():
    import copy

    limiter = RateLimiter(10.0)
    limiter.wait()
    twin = copy.deepcopy(limiter)
    twin.wait()
    assert twin.interval == 0.1 and twin._lock is not limiter._lock
