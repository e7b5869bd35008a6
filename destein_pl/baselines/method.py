"""`Method`: a detoxification method other than DeStein's calibrated steering, measured by the same protocol.

A method is attached to a `SteeredCausalLM` whose own steering is zero, and its strength is the model's `alpha`:
alpha 0 is the base model exactly (so the evaluator's base run, the perplexity judge's unsteered pass and the
resume rules hold unchanged), and an evaluation's `alphas` sweep the method's strength. A method acts through one
or more of four seams, each the default no-op here:

- `prompt_prefix`: token ids put before every prompt the sampler continues (not scored, not judged);
- `bans`: token sequences the sampler may not complete (`destein_pl.evaluation.sampling.sample`'s `bans`);
- `attach`: hooks on the model (e.g. a residual-stream shift), or steering vectors set on it;
- `sampling_model`: the module the sampler calls in place of the model (e.g. an ensemble with experts).

Adding one is one file in this package with a `@register`ed subclass, and its tests in `tests/test_baselines.py`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from destein_pl.plugins import Plugin


class Method(Plugin):
    """A detoxification method whose strength is the steered model's alpha (0: the base model exactly)."""

    name: ClassVar[str]

    def attach(self, steered) -> None:
        """Prepare the method on `steered` (calibrate, load, install hooks), once, before any generation."""

    def detach(self, steered) -> None:
        """Undo `attach`: remove hooks, zero what it set."""

    def prompt_prefix(self, steered) -> list[int]:
        """Token ids put before each prompt while the method is on."""
        return []

    def bans(self, steered) -> Mapping[tuple[int, ...], Collection[int]] | None:
        """{the last tokens of a continuation: the tokens it may not take next} while the method is on."""
        return None

    def sampling_model(self, steered) -> nn.Module:
        """What the sampler calls for logits (the model by default); it must take the model's arguments and cache."""
        return steered

    def settings(self) -> dict[str, Any]:
        """What results record and stored generations are matched on: the method's name and options, with the sha256
        (`input_digest`) of every file or folder it reads, so that a changed input is not resumed."""
        return {"method": self.name}


def float_option(method: str, option: str, value: Any, low: float, high: float,
                 open_interval: bool = False) -> float:
    """`value` as a float, or an error naming the method and option when it is not a finite number in
    `[low, high]` (`(low, high)` with `open_interval`)."""
    interval = f"({low:g}, {high:g})" if open_interval else f"[{low:g}, {high:g}]"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = number and math.isfinite(value) and (low < value < high if open_interval else low <= value <= high)
    if not inside:
        raise ValueError(f"{method}: {option} must be a finite number in {interval}, got {value!r}")
    return float(value)


def input_digest(source: str | Path) -> str | None:
    """sha256 of what a method reads from `source`: a file's bytes, or a folder's files (each one's path inside it
    and bytes, in path order); None when `source` is no local path (a hub id, a built-in name)."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        if file != path:  # a folder's file: its place in the folder counts too
            digest.update(f"{file.relative_to(path).as_posix()}\x00{file.stat().st_size}\x00".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


METHODS: dict[str, type[Method]] = {}
"""Every method by name (the value of `model.method`)."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable by its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls
