"""`DeSteinDataModule`: steering pairs for `fit` (calibration) and evaluation prompts for `test`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from destein_pl.pairs import (
    NONTOXIC_CUE,
    TOXIC_CUE,
    PairsDataset,
    PairsFormat,
    SteeringPair,
    collate_pairs,
    read_pairs,
    sample_pairs,
    source_digest,
    usable_pairs,
)
from destein_pl.prompts import (
    Prompt,
    PromptsDataset,
    PromptsFormat,
    collate_prompts,
    read_prompts,
    sample_prompts,
    usable_prompts,
)

log = logging.getLogger(__name__)


@dataclass
class PairsConfig:
    """Steering pairs for calibration.

    Args:
        source: a JSONL file (`{"toxic": ..., "nontoxic": ...}` a line), a ParaDetox TSV file, or a hub dataset id.
        m: how many pairs to sample (paper: 20 for GPT-2, 40 for LLMs).
        seed: seed of the sample.
        cues: prepend the paper's cues (`toxic_cue`, `nontoxic_cue`) to the two sides.
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


class DeSteinDataModule(L.LightningDataModule):
    """Pairs (`train_dataloader`, for `fit`) and prompts (`test_dataloader`, for `test`); each is read only by
    the stage that needs it."""

    def __init__(self, pairs: PairsConfig | None = None, prompts: PromptsConfig | None = None,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.pairs_config, self.prompts_config, self.num_workers = pairs, prompts, num_workers
        self.pairs: list[SteeringPair] | None = None
        self.prompts: list[Prompt] | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.pairs is None:
            self.pairs = self._load_pairs(self._required(self.pairs_config, "pairs"))
        if stage == "test" and self.prompts is None:
            self.prompts = self._load_prompts(self._required(self.prompts_config, "prompts"))

    @staticmethod
    def _required(config, name: str):
        if config is None:
            raise ValueError(f"this stage needs data.{name} (at least data.{name}.source) in the config")
        return config

    @staticmethod
    def _load_pairs(cfg: PairsConfig) -> list[SteeringPair]:
        everything = read_pairs(cfg.source, cfg.format, cfg.toxic_field, cfg.nontoxic_field, cfg.split)
        kept, skipped = usable_pairs(everything)
        log.info("%s: %d pairs read, %d usable (skipped %d with an empty side, %d with identical sides)",
                 cfg.source, len(everything), len(kept), skipped["empty"], skipped["identical"])
        return sample_pairs(kept, cfg.m, cfg.seed)

    @staticmethod
    def _load_prompts(cfg: PromptsConfig) -> list[Prompt]:
        everything = read_prompts(cfg.source, cfg.format, cfg.text_field, cfg.split)
        kept, empty = usable_prompts(everything)
        log.info("%s: %d prompts read, %d empty skipped", cfg.source, len(everything), empty)
        return sample_prompts(kept, cfg.n, cfg.seed)

    def pairs_provenance(self) -> dict[str, Any] | None:
        """Where the pairs came from, without machine paths: file name and content hash, or the hub id."""
        cfg = self.pairs_config
        if cfg is None:
            return None
        is_file = Path(cfg.source).expanduser().is_file()
        return {
            "source": Path(cfg.source).name if is_file else cfg.source,
            "sha256": source_digest(cfg.source),
            "m": cfg.m,
            "seed": cfg.seed,
            "cues": {"toxic": cfg.toxic_cue, "nontoxic": cfg.nontoxic_cue} if cfg.cues else None,
        }

    def train_dataloader(self) -> DataLoader:
        cfg = self.pairs_config
        dataset = PairsDataset(self.pairs, cfg.toxic_cue if cfg.cues else "", cfg.nontoxic_cue if cfg.cues else "")
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_pairs,
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(PromptsDataset(self.prompts), batch_size=self.prompts_config.batch_size, shuffle=False,
                          collate_fn=collate_prompts, num_workers=self.num_workers)
