"""Evaluation prompts: RealToxicityPrompts JSONL, plain JSONL or text files, or a hub dataset."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from destein_pl.files import read_text, require_file

log = logging.getLogger(__name__)

PromptsFormat = Literal["auto", "rtp", "jsonl", "text", "hf"]
TOXIC_THRESHOLD = 0.5


@dataclass  # not frozen: Lightning's batch transfer rebuilds dataclasses
class Prompt:
    id: str
    text: str
    toxicity: float | None = None
    """The prompt's given toxicity (Perspective's, for RealToxicityPrompts), or None when unknown."""

    @property
    def subset(self) -> str | None:
        """`toxic` (>= 0.5), `nontoxic` (< 0.5), or None when the prompt's toxicity is not given."""
        if self.toxicity is None:
            return None
        return "toxic" if self.toxicity >= TOXIC_THRESHOLD else "nontoxic"


class PromptsFileError(ValueError):
    """A prompts file that cannot be read; the message names the file and line."""


def _toxicity(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PromptsFileError(f"{where}: toxicity must be a number or null, got {value!r}")
    if not math.isfinite(value):
        raise PromptsFileError(f"{where}: toxicity must be a finite number or null, got {value!r}")
    return float(value)


def read_rtp_jsonl(path: Path) -> list[Prompt]:
    """RealToxicityPrompts: `{"filename", "begin", "end", "prompt": {"text", "toxicity", ...}}` a line."""
    prompts = []
    for lineno, row in _json_lines(path):
        where = f"{path}:{lineno}"
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, dict) or not isinstance(prompt.get("text"), str):
            raise PromptsFileError(f"{where}: expected a RealToxicityPrompts object with prompt.text")
        pid = f"{row['filename']}:{row.get('begin')}" if "filename" in row else f"{path.name}:{lineno}"
        prompts.append(Prompt(pid, prompt["text"], _toxicity(prompt.get("toxicity"), where)))
    return prompts


def read_plain_jsonl(path: Path, text_field: str = "text") -> list[Prompt]:
    """`{"text": ..., "id": optional, "toxicity": optional}` a line."""
    prompts = []
    for lineno, row in _json_lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise PromptsFileError(f"{where}: expected an object with a string field {text_field!r}")
        pid = str(row["id"]) if "id" in row else f"{path.name}:{lineno}"
        prompts.append(Prompt(pid, row[text_field], _toxicity(row.get("toxicity"), where)))
    return prompts


def read_text_lines(path: Path) -> list[Prompt]:
    """One prompt a line; ids are `file:line`."""
    return [Prompt(f"{path.name}:{n}", line) for n, line in enumerate(_lines(path), start=1)]


def _lines(path: Path) -> list[str]:
    """The lines of a UTF-8 prompts file, without their line ends; a file that cannot be read (missing, a folder,
    not UTF-8) is an error naming it (and the line)."""
    try:
        text = read_text(path, "prompts file")
    except ValueError as err:  # not UTF-8
        raise PromptsFileError(str(err)) from None
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) of each non-blank line of a JSONL prompts file."""
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptsFileError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err


def read_hf_prompts(dataset_id: str, split: str) -> list[Prompt]:
    """A hub dataset in the RealToxicityPrompts layout (e.g. `allenai/real-toxicity-prompts`)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"reading the hub dataset {dataset_id!r} needs `pip install datasets`") from err
    rows = datasets.load_dataset(dataset_id, split=split)
    return [
        Prompt(f"{r.get('filename', dataset_id)}:{r.get('begin', i)}", r["prompt"]["text"],
               _toxicity(r["prompt"].get("toxicity"), f"{dataset_id} ({split}) row {i}"))
        for i, r in enumerate(rows)
    ]


def read_prompts(source: str | Path, format: PromptsFormat = "auto", text_field: str = "text",
                 split: str = "train") -> list[Prompt]:
    """Every prompt of a file or hub dataset. `auto`: `.jsonl` lines with a `prompt` object are
    RealToxicityPrompts, other `.jsonl` is plain, `.txt` is one prompt a line, `org/name` is a hub id."""
    path = Path(source).expanduser()
    if format == "auto":
        format = _guess_format(path, str(source))
    if format == "hf":
        return read_hf_prompts(str(source), split)
    require_file(path, "prompts file")
    readers = {"rtp": read_rtp_jsonl, "jsonl": lambda p: read_plain_jsonl(p, text_field), "text": read_text_lines}
    return readers[format](path)


def _guess_format(path: Path, source: str) -> PromptsFormat:
    """The format `auto` stands for: by extension (and a JSONL file's first row), or `hf` for an `org/name` that
    is no local path. A folder or a missing file is an error that says so."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a prompts file (or set format: hf for a dataset)")
    if path.suffix in (".jsonl", ".json") and path.is_file():
        return "rtp" if _first_row_is_rtp(path) else "jsonl"
    if path.suffix == ".txt":
        return "text"
    if not path.exists() and source.count("/") == 1 and not path.suffix:
        return "hf"
    if not path.exists():
        raise FileNotFoundError(f"prompts file not found: {path}")
    raise ValueError(f"cannot tell the format of {source}: use .jsonl, .txt, a hub id, or set format")


def _first_row_is_rtp(path: Path) -> bool:
    """Whether the first non-blank line is a RealToxicityPrompts object. Reads only that line; a line that does not
    parse (or is not UTF-8) says no here, and the reader then reports it with its line number."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return False
                return isinstance(row, dict) and isinstance(row.get("prompt"), dict)
    return False


def usable_prompts(prompts: list[Prompt]) -> tuple[list[Prompt], int]:
    """Drop empty prompts; return the rest and how many were dropped. Duplicate ids are an error."""
    kept = [p for p in prompts if p.text.strip()]
    seen: set[str] = set()
    for p in kept:
        if p.id in seen:
            raise ValueError(f"prompt id {p.id!r} occurs twice; ids must be unique")
        seen.add(p.id)
    return kept, len(prompts) - len(kept)


def sample_prompts(prompts: list[Prompt], n: int | None, seed: int) -> list[Prompt]:
    """n prompts drawn with a seed, in their file order (all of them when n is None)."""
    if n is None:
        return prompts
    if not 1 <= n <= len(prompts):
        raise ValueError(f"asked for n={n} prompts but {len(prompts)} usable prompts are available")
    chosen = sorted(random.Random(seed).sample(range(len(prompts)), n))
    return [prompts[i] for i in chosen]


class PromptsDataset(Dataset):
    """Prompts with their position, which keys every per-prompt result (and drops a distributed sampler's
    repeats)."""

    def __init__(self, prompts: list[Prompt]) -> None:
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "prompt": self.prompts[index]}


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"index": torch.tensor([i["index"] for i in items]), "prompts": [i["prompt"] for i in items]}


@dataclass
class PromptsConfig:
    """Evaluation prompts.

    Args:
        source: RealToxicityPrompts JSONL, a plain JSONL (`{"text", "id"?, "toxicity"?}`), a text file (one prompt
            a line), or a hub dataset id (e.g. `allenai/real-toxicity-prompts`).
        n: how many prompts to sample with `seed` (None: all).
        seed: seed of the sample.
        batch_size: prompts per step; each prompt brings `num_samples` rows to one generation batch.
        format: `auto`, `rtp`, `jsonl`, `text` or `hf`.
        text_field: the prompt's key in a plain JSONL file.
        split: hub dataset split.
    """

    source: str
    n: int | None = None
    seed: int = 0
    batch_size: int = 4
    format: PromptsFormat = "auto"
    text_field: str = "text"
    split: str = "train"

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ValueError(f"prompts.n must be at least 1 (or None for all prompts), got {self.n}")
        if self.batch_size < 1:
            raise ValueError(f"prompts.batch_size must be at least 1, got {self.batch_size}")


def load_prompts(config: PromptsConfig) -> list[Prompt]:
    """The prompts a config selects: read, drop empty ones (counted in the log), sample."""
    everything = read_prompts(config.source, config.format, config.text_field, config.split)
    kept, empty = usable_prompts(everything)
    log.info("%s: %d prompts read, %d used, %d empty skipped", config.source, len(everything), len(kept), empty)
    if not kept:
        raise ValueError(f"{config.source}: no usable prompt (all {len(everything)} are empty)")
    return sample_prompts(kept, config.n, config.seed)
