"""Per-head linear probes (toxic vs non-toxic) whose validation accuracy weighs each head's steering."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from destein_pl.steering.probes import Probes


def split_pairs(num_pairs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and validation pairs; both sides of a pair fall in the same split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    num_val = max(1, round(num_pairs * val_fraction))
    if num_val >= num_pairs:
        raise ValueError(f"{num_pairs} pairs are too few to split with val_fraction={val_fraction}")
    order = np.random.default_rng(seed).permutation(num_pairs)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def fit_head_probes(toxic: Tensor, nontoxic: Tensor, val_fraction: float = 0.2, seed: int = 0) -> Probes:
    """Fit a probe for every head on paired activations `[N, L, H, D]` (paper: 4:1 train/validation split)."""
    if toxic.shape != nontoxic.shape or toxic.dim() != 4:
        raise ValueError(
            f"expected two [N, L, H, D] tensors of one shape, got {list(toxic.shape)}, {list(nontoxic.shape)}"
        )
    num_pairs, num_layers, num_heads, head_dim = toxic.shape
    train, val = split_pairs(num_pairs, val_fraction, seed)
    labels = lambda idx: np.concatenate([np.ones(len(idx)), np.zeros(len(idx))])  # noqa: E731
    y_train, y_val = labels(train), labels(val)
    tox, non = toxic.double().numpy(), nontoxic.double().numpy()
    accuracy = np.zeros((num_layers, num_heads))
    coef = np.zeros((num_layers, num_heads, head_dim))
    intercept = np.zeros((num_layers, num_heads))
    for layer in range(num_layers):
        for head in range(num_heads):
            x = lambda idx: np.concatenate([tox[idx, layer, head], non[idx, layer, head]])  # noqa: E731
            probe = LogisticRegression(max_iter=1000).fit(x(train), y_train)
            accuracy[layer, head] = probe.score(x(val), y_val)
            coef[layer, head], intercept[layer, head] = probe.coef_[0], probe.intercept_[0]
    as_tensor = lambda a: torch.from_numpy(a).float()  # noqa: E731
    return Probes(as_tensor(coef), as_tensor(intercept), as_tensor(accuracy))
