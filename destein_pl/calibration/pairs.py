"""Steering pairs (toxic text, non-toxic text): reading, validating, sampling, batching."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from destein_pl.files import read_text, require_file

log = logging.getLogger(__name__)

TOXIC_CUE = "The following text is abusive, harmful, negative, obscene, racist, rude and toxic: "
NONTOXIC_CUE = "The following text is kind, polite, positive, respectful and supportive: "

PairsFormat = Literal["auto", "jsonl", "paradetox", "hf"]


@dataclass(frozen=True)
class SteeringPair:
    toxic: str
    nontoxic: str


class PairsFileError(ValueError):
    """A pairs file that cannot be read; the message names the file and line."""


def read_jsonl_pairs(path: Path, toxic_field: str = "toxic", nontoxic_field: str = "nontoxic") -> list[SteeringPair]:
    """One JSON object a line with string fields `toxic` and `nontoxic`; blank lines are ignored."""
    pairs = []
    for lineno, line in enumerate(_read(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PairsFileError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in (toxic_field, nontoxic_field)):
            raise PairsFileError(
                f"{path}:{lineno}: expected an object with string fields {toxic_field!r} and {nontoxic_field!r}"
            )
        pairs.append(SteeringPair(row[toxic_field], row[nontoxic_field]))
    return pairs


def _read(path: Path, newline: str | None = None) -> str:
    """A pairs file's text; a file that cannot be read (missing, a folder, not UTF-8) is an error naming it (and
    the line)."""
    try:
        return read_text(path, "pairs file", newline)
    except ValueError as err:  # not UTF-8
        raise PairsFileError(str(err)) from None


def read_paradetox_tsv(path: Path) -> list[SteeringPair]:
    """The ParaDetox layout: tab-separated with a header `toxic, neutral1, neutral2, neutral3`; uses `neutral1`."""
    pairs = []
    reader = csv.reader(io.StringIO(_read(path, newline=""), newline=""), delimiter="\t")
    header = next(reader, None)
    if header is None or header[:2] != ["toxic", "neutral1"]:
        raise PairsFileError(f"{path}:1: expected a header starting with 'toxic<TAB>neutral1', got {header}")
    start = reader.line_num + 1
    for row in reader:
        if len(row) != len(header):
            raise PairsFileError(f"{path}:{start}: expected {len(header)} tab-separated fields, got {len(row)}")
        pairs.append(SteeringPair(row[0], row[1]))
        start = reader.line_num + 1
    return pairs


def read_hf_pairs(dataset_id: str, split: str, toxic_field: str, nontoxic_field: str) -> list[SteeringPair]:
    """A Hugging Face dataset (needs network access and the `datasets` package)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"reading the hub dataset {dataset_id!r} needs `pip install datasets`") from err
    rows = datasets.load_dataset(dataset_id, split=split)
    missing = {toxic_field, nontoxic_field} - set(rows.column_names)
    if missing:
        raise ValueError(f"dataset {dataset_id!r} has no column(s) {sorted(missing)}; it has {rows.column_names}")
    return [SteeringPair(r[toxic_field], r[nontoxic_field]) for r in rows]


def read_pairs(
    source: str | Path,
    format: PairsFormat = "auto",
    toxic_field: str = "toxic",
    nontoxic_field: str = "nontoxic",
    split: str = "train",
) -> list[SteeringPair]:
    """Read every pair of a JSONL file, a ParaDetox TSV file or a hub dataset (`auto` decides by extension)."""
    path = Path(source).expanduser()
    if format == "auto":
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; expected a pairs file (or set format: hf for a dataset)")
        if path.suffix in (".jsonl", ".json"):
            format = "jsonl"
        elif path.suffix in (".tsv", ".txt"):
            format = "paradetox"
        elif not path.exists() and str(source).count("/") == 1:
            format = "hf"
        else:
            raise ValueError(
                f"cannot tell the format of {source}: use a .jsonl or .tsv file, a hub dataset id, or set format"
            )
    if format == "hf":
        return read_hf_pairs(str(source), split, toxic_field, nontoxic_field)
    require_file(path, "pairs file")
    if format == "jsonl":
        return read_jsonl_pairs(path, toxic_field, nontoxic_field)
    return read_paradetox_tsv(path)


def usable_pairs(pairs: list[SteeringPair]) -> tuple[list[SteeringPair], dict[str, int]]:
    """Drop pairs with an empty side or two identical sides; return the rest and what was skipped."""
    kept, skipped = [], {"empty": 0, "identical": 0}
    for pair in pairs:
        toxic, nontoxic = pair.toxic.strip(), pair.nontoxic.strip()
        if not toxic or not nontoxic:
            skipped["empty"] += 1
        elif toxic == nontoxic:
            skipped["identical"] += 1
        else:
            kept.append(SteeringPair(toxic, nontoxic))
    return kept, skipped


def sample_pairs(pairs: list[SteeringPair], m: int, seed: int) -> list[SteeringPair]:
    """m pairs drawn without replacement, the same for the same (pairs, m, seed)."""
    if m < 2:
        raise ValueError(f"m must be at least 2 (probes need pairs to train and validate on), got {m}")
    if len(pairs) < m:
        raise ValueError(f"asked for m={m} pairs but only {len(pairs)} usable pairs are available")
    return random.Random(seed).sample(pairs, m)


def source_digest(source: str | Path) -> str | None:
    """sha256 of a pairs file's bytes (None for a hub dataset), recorded as provenance."""
    path = Path(source).expanduser()
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


class PairsDataset(Dataset):
    """Cued pairs with their index in the sample (the index lets a multi-process run drop padded repeats). With cues,
    an item also holds the plain texts (`toxic_plain`, `nontoxic_plain`), on which the gate's probes are fit."""

    def __init__(self, pairs: list[SteeringPair], toxic_cue: str, nontoxic_cue: str) -> None:
        self.pairs, self.toxic_cue, self.nontoxic_cue = pairs, toxic_cue, nontoxic_cue

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        item = {"index": index, "toxic": self.toxic_cue + pair.toxic, "nontoxic": self.nontoxic_cue + pair.nontoxic}
        if self.toxic_cue or self.nontoxic_cue:
            item.update(toxic_plain=pair.toxic, nontoxic_plain=pair.nontoxic)
        return item


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"index": torch.tensor([i["index"] for i in items])}
    batch.update({key: [i[key] for i in items] for key in ("toxic", "nontoxic", "toxic_plain", "nontoxic_plain")
                  if key in items[0]})
    return batch


@dataclass
class PairsConfig:
    """Steering pairs for calibration.

    Args:
        source: a JSONL file (`{"toxic": ..., "nontoxic": ...}` a line), a ParaDetox TSV file, or a hub dataset id.
        m: how many pairs to sample (paper: 20 for GPT-2, 40 for LLMs).
        seed: seed of the sample.
        cues: prepend the paper's cues (`toxic_cue`, `nontoxic_cue`) to the two sides.
        toxic_cue: the cue of the toxic side.
        nontoxic_cue: the cue of the non-toxic side.
        batch_size: pairs per step (each step runs both sides).
        format: `auto` (by extension; `org/name` is a hub id), `jsonl`, `paradetox` or `hf`.
        toxic_field: JSONL key or hub column of the toxic side.
        nontoxic_field: JSONL key or hub column of the non-toxic side.
        split: hub dataset split.
    """

    source: str
    m: int = 40
    seed: int = 0
    cues: bool = True
    toxic_cue: str = TOXIC_CUE
    nontoxic_cue: str = NONTOXIC_CUE
    batch_size: int = 8
    format: PairsFormat = "auto"
    toxic_field: str = "toxic"
    nontoxic_field: str = "nontoxic"
    split: str = "train"

    def __post_init__(self) -> None:
        if self.m < 2:
            raise ValueError(f"pairs.m must be at least 2 (probes need pairs to train and validate on), got {self.m}")
        if self.batch_size < 1:
            raise ValueError(f"pairs.batch_size must be at least 1, got {self.batch_size}")

    @property
    def cue_pair(self) -> tuple[str, str] | None:
        return (self.toxic_cue, self.nontoxic_cue) if self.cues else None


def load_pairs(config: PairsConfig) -> list[SteeringPair]:
    """The `m` pairs a config selects: read, drop unusable ones (counted in the log), sample."""
    everything = read_pairs(config.source, config.format, config.toxic_field, config.nontoxic_field, config.split)
    kept, skipped = usable_pairs(everything)
    log.info("%s: %d pairs read, %d usable (skipped %d with an empty side, %d with identical sides)",
             config.source, len(everything), len(kept), skipped["empty"], skipped["identical"])
    return sample_pairs(kept, config.m, config.seed)


def pairs_provenance(config: PairsConfig) -> dict[str, Any]:
    """Where the pairs came from, without machine paths: file name and content hash, or the hub id."""
    is_file = Path(config.source).expanduser().is_file()
    return {
        "source": Path(config.source).name if is_file else config.source,
        "sha256": source_digest(config.source),
        "m": config.m,
        "seed": config.seed,
        "cues": {"toxic": config.toxic_cue, "nontoxic": config.nontoxic_cue} if config.cues else None,
    }
