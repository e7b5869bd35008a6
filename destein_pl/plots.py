"""Figures: the per-head probe-accuracy heatmap (paper Figure 3a) and toxicity against perplexity (Figure 2)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from destein_pl.files import atomic_path  # noqa: E402


def probe_heatmap(accuracy: Tensor, path: str | Path, title: str = "Probe accuracy per head") -> None:
    """Save a layers x heads heatmap of probe accuracies as PNG."""
    num_layers, num_heads = accuracy.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * num_heads + 2), max(3, 0.22 * num_layers + 1.5)))
    image = ax.imshow(accuracy.numpy(), origin="lower", aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="validation accuracy")
    _save(fig, path)


def toxicity_perplexity(points: list[tuple[str, float, float, float]], path: str | Path,
                        title: str = "Detoxification against fluency") -> None:
    """Plot EMT against perplexity for labelled runs `(series, alpha, emt, ppl)`, one line per series."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for series in dict.fromkeys(p[0] for p in points):
        rows = sorted((p for p in points if p[0] == series), key=lambda p: p[1])
        ax.plot([r[3] for r in rows], [r[2] for r in rows], marker="o", label=series)
        for _, alpha, emt, ppl in rows:
            ax.annotate(f"{alpha:g}", (ppl, emt), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("perplexity of continuations")
    ax.set_ylabel("expected maximum toxicity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len({p[0] for p in points}) > 1:
        ax.legend()
    _save(fig, path)


def frontier_plot(rows: list[dict], path: str | Path, title: str = "Quality frontier") -> None:
    """Two panels (toxic and non-toxic prompts) per setting: EMT against perplexity, one line
    per series (rows: `{"series", "alpha", "toxic": {"emt", "ppl"}, "nontoxic": {...}}`, and optionally
    `"intervals": {subset: (low, high)}`, drawn as EMT error bars); the base model is a star."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, subset in zip(axes, ("toxic", "nontoxic")):
        for series in dict.fromkeys(r["series"] for r in rows):
            points = sorted((r for r in rows if r["series"] == series), key=lambda r: r["alpha"])
            x, y = [r[subset]["ppl"] for r in points], [r[subset]["emt"] for r in points]
            if series == "base":
                ax.scatter(x, y, marker="*", s=160, color="black", zorder=3, label="base")
                continue
            if all("intervals" in r for r in points):
                # the interval is of the per-prompt mean, the point the metric's float32 value: clamp rounding
                errors = [[max(0.0, r[subset]["emt"] - r["intervals"][subset][0]) for r in points],
                          [max(0.0, r["intervals"][subset][1] - r[subset]["emt"]) for r in points]]
                ax.errorbar(x, y, yerr=errors, marker="o", capsize=2, label=series)
            else:
                ax.plot(x, y, marker="o", label=series)
            for r, xi, yi in zip(points, x, y):
                ax.annotate(f"{r['alpha']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("mean perplexity of continuations (log scale)")
        ax.set_ylabel("expected maximum toxicity")
        ax.set_title(f"{subset.replace('nontoxic', 'non-toxic')} prompts")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def comparison_plot(points: list[dict], path: str | Path, base: tuple[float, float],
                    title: str = "Methods compared") -> None:
    """Toxic-prompt EMT against toxic-prompt perplexity, one line per method through its sweep (points:
    `{"series", "ppl", "emt", "low", "high", "order"}`, joined in `order`), each point with its EMT interval as an
    error bar; the base model (`(ppl, emt)`) is a star."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for series in dict.fromkeys(p["series"] for p in points if p["series"] != "base"):
        line = sorted((p for p in points if p["series"] == series), key=lambda p: p["order"])
        x, y = [p["ppl"] for p in line], [p["emt"] for p in line]
        # the interval is of the per-prompt mean, the point the metric's float32 value: clamp rounding below 0
        errors = [[max(0.0, p["emt"] - p["low"]) for p in line], [max(0.0, p["high"] - p["emt"]) for p in line]]
        ax.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=series)
    ax.scatter([base[0]], [base[1]], marker="*", s=180, color="black", zorder=3, label="base")
    for budget in (1.1, 1.2):
        ax.axvline(base[0] * budget, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("mean perplexity of continuations, toxic prompts, log scale (dotted: +10% and +20% over base)")
    ax.set_ylabel("expected maximum toxicity, toxic prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    """Write the figure as PNG atomically (a failed write leaves neither a half file nor a temporary one), and
    free it either way."""
    try:
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
