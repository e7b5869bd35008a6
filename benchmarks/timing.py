"""Timing compared variants alike: an untimed warm-up, then every variant once per repetition, in an order that
rotates between repetitions ("in turn"), so that load from elsewhere on the machine falls on all of them; and the
spread of repeated times as `median (min - max)`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True)
class Timed(Generic[T]):
    """One timed call: its wall seconds and what it returned."""

    seconds: float
    value: T


def rotated(items: Sequence[T], repeat: int) -> list[T]:
    """`items` starting at position `repeat` (modulo their number), so that none always runs first."""
    shift = repeat % len(items)
    return [*items[shift:], *items[:shift]]


def _synchronize() -> None:
    """Wait for queued GPU work, so that a timed call ends when its kernels do (nothing to wait for on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(call: Callable[[], T]) -> Timed[T]:
    """Run `call` once and time it."""
    _synchronize()
    started = time.perf_counter()
    value = call()
    _synchronize()
    return Timed(time.perf_counter() - started, value)


def in_turn(variants: Mapping[K, Callable[[], T]], repeats: int,
            warm_up: bool | Callable[[], object] = True) -> dict[K, list[Timed[T]]]:
    """Each variant timed `repeats` times, all of them once in every repetition, the order rotating. `warm_up`:
    True calls every variant once untimed first; a callable is called instead (a cheaper warm-up); False: none
    (what ran before warmed up already)."""
    names = list(variants)
    if warm_up is True:
        for name in names:
            variants[name]()
    elif callable(warm_up):
        warm_up()
    runs: dict[K, list[Timed[T]]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in rotated(names, repeat):
            runs[name].append(timed(variants[name]))
    return runs


def seconds(runs: Mapping[K, list[Timed[T]]]) -> dict[K, list[float]]:
    """The wall seconds of every timed call, per variant."""
    return {name: [run.seconds for run in timings] for name, timings in runs.items()}


def spread(values: Sequence[float], digits: int = 3) -> str:
    """`median (min - max)` of repeated measurements."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f} - {max(values):.{digits}f})"
