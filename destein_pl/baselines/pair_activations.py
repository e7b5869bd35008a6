"""What the pair-calibrated baselines (ActAdd, ITI) record: the texts of the same steering pairs DeStein reads, and
activations of the unsteered model over each text's last tokens, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from destein_pl.calibration.pairs import PairsConfig, load_pairs


def pair_texts(config: PairsConfig) -> tuple[list[str], list[str]]:
    """The (toxic, non-toxic) texts of the pairs a config selects, with its cues when `config.cues`."""
    pairs = load_pairs(config)
    toxic_cue, nontoxic_cue = (config.toxic_cue, config.nontoxic_cue) if config.cues else ("", "")
    return [toxic_cue + p.toxic for p in pairs], [nontoxic_cue + p.nontoxic for p in pairs]


@torch.no_grad()
def record_texts(steered, texts: Sequence[str], record: Callable[[Tensor, Tensor], Tensor],
                 batch_size: int = 8) -> Tensor:
    """`record(input_ids, attention_mask)` over `texts` in batches, concatenated, with the model unsteered."""
    if steered.alpha != 0:
        raise ValueError("activations of the base model are recorded at alpha 0")
    steered.eval()
    parts = []
    for start in range(0, len(texts), batch_size):
        encoded = steered.tokenizer(list(texts[start : start + batch_size]), return_tensors="pt",
                                    padding=True).to(steered.device)
        parts.append(record(encoded["input_ids"], encoded["attention_mask"]).cpu())
    return torch.cat(parts)
