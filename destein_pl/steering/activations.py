"""Recording per-head activations at the steering site, averaged over each text's last real tokens."""

from __future__ import annotations

import torch
from torch import Tensor


def last_tokens_weights(attention_mask: Tensor, last_k: int) -> Tensor:
    """Averaging weights `[batch, seq]` over each row's last `last_k` real tokens (all of them if fewer).

    Works for left and right padding: a position counts if it is real and fewer than `last_k` real tokens
    follow it.
    """
    if last_k < 1:
        raise ValueError(f"last_k must be at least 1, got {last_k}")
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("every row of attention_mask needs at least one real token")
    real_from_end = mask.flip(1).long().cumsum(1).flip(1)  # real tokens at or after each position
    selected = mask & (real_from_end <= last_k)
    weights = selected.float()
    return weights / weights.sum(dim=1, keepdim=True)


class LastTokensRecorder:
    """Collects `[batch, num_heads, head_dim]` means per layer during one forward pass, on the mask's device."""

    def __init__(self, attention_mask: Tensor, last_k: int, num_layers: int, num_heads: int, head_dim: int) -> None:
        self.weights = last_tokens_weights(attention_mask, last_k)
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.layers: dict[int, Tensor] = {}

    def __call__(self, layer_idx: int, hidden: Tensor) -> None:
        batch, seq, _ = hidden.shape
        heads = hidden.detach().float().view(batch, seq, self.num_heads, self.head_dim)
        weights = self.weights.to(heads.device)[:, :, None, None]
        self.layers[layer_idx] = (heads * weights).sum(dim=1).to(self.weights.device)

    def result(self) -> Tensor:
        missing = [i for i in range(self.num_layers) if i not in self.layers]
        if missing:
            raise RuntimeError(f"no activations were recorded for layers {missing}")
        return torch.stack([self.layers[i] for i in range(self.num_layers)], dim=1)
