"""ITI, inference-time intervention (Li et al. 2023, `honest_llama`): the K heads whose probes tell the two sides
apart best, each shifted along its mass-mean direction scaled by the activations' standard deviation along it.

Per head, from the steering pairs' activations at DeStein's site (each head's output before the output projection,
averaged over a text's last `last_k` tokens): the direction `theta = mean(non-toxic) - mean(toxic)`, its unit
vector `u`, and `sigma`, the standard deviation of every text's activation (both sides) projected on `u`. The top
`heads` heads by probe validation accuracy get `x' = x + alpha * sigma * u` at every position; the others nothing.
That is DeStein's `paper` operator with vectors `sigma * u` and head weights 1 on the top heads and 0 elsewhere, so
ITI runs (and folds into a bias) as DeStein's steering does. By default the probes read the texts without the
paper's cues: ITI's probes separate labelled examples, and with cues every head separates the cue.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from destein_pl.baselines.method import Method, float_option, input_digest, register
from destein_pl.baselines.pair_activations import pair_texts, record_texts
from destein_pl.calibration.pairs import PairsConfig
from destein_pl.calibration.probes import fit_head_probes


def iti_steering(toxic: Tensor, nontoxic: Tensor, accuracy: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """`(vectors [L, H, D], head_weights [L, H])` of ITI from activations `[N, L, H, D]` of the two sides: `sigma * u`
    per head, weight 1 on the `heads` most accurate heads (ties: the lower index first), 0 elsewhere."""
    direction = nontoxic.float().mean(dim=0) - toxic.float().mean(dim=0)
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    projected = (torch.cat([toxic, nontoxic]).float() * unit).sum(dim=-1)  # [2N, L, H]
    sigma = projected.std(dim=0)
    weights = torch.zeros(accuracy.numel())
    order = torch.argsort(accuracy.flatten(), descending=True, stable=True)
    weights[order[:heads]] = 1.0
    return sigma[..., None] * unit, weights.view_as(accuracy)


@register
class ITI(Method):
    """The top-K heads by probe accuracy, shifted by `alpha * sigma * u`.

    Args:
        pairs: steering-pairs source (ParaDetox TSV, JSONL or hub id), as for `destein fit`.
        m: pairs sampled from it.
        seed: seed of that sample.
        cues: prefix the paper's cues to the two sides (default: no).
        heads: K, how many heads are shifted.
        last_k: each text's activations are averaged over its last k tokens.
        val_fraction: share of pairs held out to measure probe accuracy.
        probe_seed: seed of that split.
    """

    name = "iti"

    def __init__(self, pairs: str, m: int = 40, seed: int = 0, cues: bool = False, heads: int = 16,
                 last_k: int = 8, val_fraction: float = 0.2, probe_seed: int = 0) -> None:
        self.pairs = PairsConfig(source=pairs, m=m, seed=seed, cues=cues)
        if heads < 1 or last_k < 1:
            raise ValueError(f"iti: heads and last_k must be at least 1, got {heads} and {last_k}")
        val_fraction = float_option(self.name, "val_fraction", val_fraction, 0, 1, open_interval=True)
        self.heads, self.last_k, self.val_fraction, self.probe_seed = heads, last_k, val_fraction, probe_seed

    def attach(self, steered) -> None:
        total = steered.num_layers * steered.num_heads
        if self.heads > total:
            raise ValueError(f"iti: heads={self.heads} but the model has {total} heads")
        toxic_texts, nontoxic_texts = pair_texts(self.pairs)

        def record(ids: Tensor, mask: Tensor) -> Tensor:
            return steered.record_activations(ids, mask, last_k=self.last_k)

        toxic, nontoxic = record_texts(steered, toxic_texts, record), record_texts(steered, nontoxic_texts, record)
        probes = fit_head_probes(toxic, nontoxic, self.val_fraction, self.probe_seed)
        steered.set_steering(*iti_steering(toxic, nontoxic, probes.accuracy, self.heads))

    def detach(self, steered) -> None:
        steered.set_steering(torch.zeros_like(steered.vectors), torch.zeros_like(steered.head_weights))

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "pairs": self.pairs.source.rsplit("/", 1)[-1],
                "pairs_sha256": input_digest(self.pairs.source), "m": self.pairs.m,
                "seed": self.pairs.seed, "cues": self.pairs.cues, "heads": self.heads, "last_k": self.last_k,
                "val_fraction": self.val_fraction, "probe_seed": self.probe_seed}
