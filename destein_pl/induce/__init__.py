"""Self-induced steering pairs: sample from the model, select its most toxic texts, rewrite and filter them."""

from destein_pl.induce.pipeline import induce
from destein_pl.induce.rewriters import REWRITERS, RewriteContext, Rewriter, build_rewriter

__all__ = ["REWRITERS", "RewriteContext", "Rewriter", "build_rewriter", "induce"]
