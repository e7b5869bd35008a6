"""Figures: the per-head probe-accuracy heatmap (paper Figure 3a)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def probe_heatmap(accuracy: Tensor, path: str | Path, title: str = "Probe accuracy per head") -> None:
    """Save a layers x heads heatmap of probe accuracies as PNG."""
    num_layers, num_heads = accuracy.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * num_heads + 2), max(3, 0.22 * num_layers + 1.5)))
    image = ax.imshow(accuracy.numpy(), origin="lower", aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="validation accuracy")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
