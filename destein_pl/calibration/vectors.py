"""From recorded activations of steering pairs to detoxification vectors and head weights (DeStein, section 1)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

HeadWeights = Literal["probe", "uniform"]


def steering_vectors(toxic: Tensor, nontoxic: Tensor) -> Tensor:
    """v[l, h] = mean over pairs of (non-toxic - toxic); inputs `[N, L, H, D]`, output `[L, H, D]`."""
    return (nontoxic.double() - toxic.double()).mean(dim=0).float()


def head_weights(probe_accuracy: Tensor, mode: HeadWeights = "probe", top_k: int | None = None) -> Tensor:
    """Each head's weight p[l, h]: its probe accuracy (or 1 for `uniform`), zero outside the top-k heads if set."""
    if mode == "probe":
        weights = probe_accuracy.clone().float()
    elif mode == "uniform":
        weights = torch.ones_like(probe_accuracy, dtype=torch.float32)
    else:
        raise ValueError(f"head weights must be 'probe' or 'uniform', got {mode!r}")
    if top_k is not None:
        total = probe_accuracy.numel()
        if not 1 <= top_k <= total:
            raise ValueError(f"top_k_heads must be between 1 and {total} (all heads), got {top_k}")
        # stable sort: ties keep the lower (layer, head) index, so the choice is reproducible
        order = torch.sort(probe_accuracy.flatten(), descending=True, stable=True).indices
        keep = torch.zeros(total, dtype=torch.bool)
        keep[order[:top_k]] = True
        weights = weights * keep.view_as(weights)
    return weights
