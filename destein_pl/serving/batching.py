"""Dynamic batching: requests that arrive close together are decoded in one batch, whatever alphas they ask for.

A worker thread owns the model. It takes the oldest waiting job, then waits at most `batch_wait_s` for more, up to
`max_batch_rows` rows (a job brings one row per choice), and decodes them together (`Decoder.steps`). After every
step it sends each job of the batch a snapshot of its rows' settled text; the server turns those into stream chunks
or, at the end, one response. A job whose client has gone or whose deadline has passed is cancelled: its rows leave
the batch at the next step, and the other jobs go on. A failure while decoding fails that batch's jobs only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from destein_pl.serving.decoding import Decoder, Row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """A job's state after a decoding step: each row's settled text and finish reason; `done` once every row is,
    `error` (HTTP status, message) if the job failed."""

    texts: list[str]
    finish_reasons: list[str | None]
    tokens: list[int]
    done: bool = False
    error: tuple[int, str] | None = None


@dataclass
class Job:
    """One request's rows, and where its updates go (`send` is called from the worker thread)."""

    rows: list[Row]
    send: Callable[[Update], None]
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Stop decoding this job's rows (the client is gone or its deadline passed); nothing once they finished."""
        if all(row.finish_reason is not None for row in self.rows):
            return
        self.cancelled = True
        for row in self.rows:
            row.cancelled = True

    def update(self, error: tuple[int, str] | None = None) -> Update:
        rows = self.rows
        return Update([r.settled_text() for r in rows], [r.finish_reason for r in rows], [len(r.tokens) for r in rows],
                      done=error is not None or all(r.finish_reason is not None for r in rows), error=error)


class QueueFullError(RuntimeError):
    """The server holds as many waiting requests as it accepts."""


class BatchingEngine:
    """Runs `Job`s through a `Decoder` in batches, on a thread of its own.

    Args:
        decoder: decodes a batch of rows step by step.
        max_batch_rows: most rows (choices) decoded together.
        batch_wait_s: how long the oldest waiting job waits for others to join its batch.
        max_queued: most jobs waiting; beyond it `submit` refuses (the server answers 503).
    """

    def __init__(self, decoder: Decoder, max_batch_rows: int = 16, batch_wait_s: float = 0.02,
                 max_queued: int = 256) -> None:
        self.decoder, self.max_batch_rows = decoder, max_batch_rows
        self.batch_wait_s, self.max_queued = batch_wait_s, max_queued
        self._waiting: deque[Job] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="destein-serve-batches", daemon=True)
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "served": 0, "cancelled": 0, "failed": 0}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch being decoded, then end the worker; waiting jobs are failed."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=60)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue a job for the next batch it fits in."""
        with self._condition:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.max_queued:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting, the most this server queues "
                                     f"(--max_queued); retry later")
            self._waiting.append(job)
            self._condition.notify_all()

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting jobs that fit in one batch, after waiting up to `batch_wait_s` for more to arrive."""
        with self._condition:
            while not self._waiting and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return None
            closes = self._waiting[0].submitted + self.batch_wait_s
            while (sum(len(j.rows) for j in self._waiting) < self.max_batch_rows and not self._stopping
                   and (left := closes - time.monotonic()) > 0):
                self._condition.wait(timeout=left)
            batch, rows = [], 0
            while self._waiting and (not batch or rows + len(self._waiting[0].rows) <= self.max_batch_rows):
                job = self._waiting.popleft()
                batch.append(job)
                rows += len(job.rows)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            jobs = [job for job in batch if not job.cancelled]
            self.stats["cancelled"] += len(batch) - len(jobs)
            if jobs:
                self._decode(jobs)
        with self._condition:
            for job in self._waiting:
                if job.cancelled:
                    self.stats["cancelled"] += 1
                else:
                    job.send(job.update(error=(503, "the server is shutting down")))
            self._waiting.clear()

    def _decode(self, jobs: list[Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        owner = {id(row): job for job in jobs for row in job.rows}
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        try:
            for stepped in self.decoder.steps(rows):
                for job in {id(owner[id(r)]): owner[id(r)] for r in stepped}.values():
                    if not job.cancelled:
                        job.send(job.update())
        except Exception as error:  # a failed batch fails its own jobs; the server keeps serving the others
            log.exception("decoding a batch of %d rows failed", len(rows))
            self.stats["failed"] += len(jobs)
            for job in jobs:
                job.send(job.update(error=(500, f"decoding failed: {type(error).__name__}: {error}")))
            return
        for job in jobs:
            if job.cancelled:
                self.stats["cancelled"] += 1
            else:
                self.stats["served"] += 1
                update = job.update()
                if not update.done:  # rows that never reached the decoder (none should): end them cleanly
                    update = job.update(error=(500, "decoding ended before every choice finished"))
                job.send(update)
