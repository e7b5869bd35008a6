"""The `none` rewriter: no rewrite, the paper's non-parallel ablation."""

from __future__ import annotations

from destein_pl.induce.rewriters.base import RewriteContext, Rewriter


class NonParallelRewriter(Rewriter):
    """No rewrite: each toxic text is paired with one of the least toxic samples instead (the paper's non-parallel
    ablation). The most toxic text gets the least toxic sample, and so on; None once the samples run out."""

    name = "none"

    def __init__(self) -> None:
        pass

    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        chosen = set(context.selected_ids)
        calm = sorted((s for s in context.pool if s["text"] and s["toxicity"] is not None and s["id"] not in chosen),
                      key=lambda s: (s["toxicity"], s["id"]))
        return [calm[i]["text"] if i < len(calm) else None for i in range(len(texts))]
