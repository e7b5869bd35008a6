"""`DeSteinDataModule`: steering pairs for `fit` (calibration) and evaluation prompts for `test`."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from destein_pl.calibration.pairs import (
    PairsConfig,
    PairsDataset,
    SteeringPair,
    collate_pairs,
    load_pairs,
    pairs_provenance,
)
from destein_pl.evaluation.prompts import Prompt, PromptsConfig, PromptsDataset, collate_prompts, load_prompts


class DeSteinDataModule(L.LightningDataModule):
    """Pairs (`train_dataloader`, for `fit`) and prompts (`test_dataloader`, for `test`); each is read only by
    the stage that needs it.

    Args:
        pairs: steering pairs for calibration (`fit`).
        prompts: evaluation prompts (`test`).
        num_workers: data loader worker processes.
    """

    def __init__(self, pairs: PairsConfig | None = None, prompts: PromptsConfig | None = None,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.pairs_config, self.prompts_config, self.num_workers = pairs, prompts, num_workers
        self.pairs: list[SteeringPair] | None = None
        self.prompts: list[Prompt] | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.pairs is None:
            self.pairs = load_pairs(self._required(self.pairs_config, "pairs"))
        if stage == "test" and self.prompts is None:
            self.prompts = load_prompts(self._required(self.prompts_config, "prompts"))

    @staticmethod
    def _required(config, name: str):
        if config is None:
            raise ValueError(f"this stage needs data.{name} (at least data.{name}.source) in the config")
        return config

    def pairs_provenance(self) -> dict[str, Any] | None:
        """Where the pairs came from, without machine paths (see `pairs_provenance`)."""
        return None if self.pairs_config is None else pairs_provenance(self.pairs_config)

    def train_dataloader(self) -> DataLoader:
        cfg = self.pairs_config
        toxic_cue, nontoxic_cue = cfg.cue_pair or ("", "")
        return DataLoader(PairsDataset(self.pairs, toxic_cue, nontoxic_cue), batch_size=cfg.batch_size,
                          shuffle=False, collate_fn=collate_pairs, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(PromptsDataset(self.prompts), batch_size=self.prompts_config.batch_size, shuffle=False,
                          collate_fn=collate_prompts, num_workers=self.num_workers)
