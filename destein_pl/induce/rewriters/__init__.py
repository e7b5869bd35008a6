"""Rewriters that turn toxic texts into non-toxic texts, the other half of DeStein's steering pairs.

A config names a rewriter by short name (`self`, `lexical`, `openai-compatible`, `none`) or as
`class_path`/`init_args` (`LexicalRewriter`, ...). Constructors only check their arguments (no I/O): weights,
keys and connections come in `setup()`, which `rewrite` calls when needed. What a rewriter may need besides the
texts (the model, the other samples) comes in a `RewriteContext`. One module per rewriter; `text` holds the word
heuristics the `self` rewriter judges its candidates by.
"""

from __future__ import annotations

from destein_pl.induce.rewriters.base import RewriteContext, Rewriter
from destein_pl.induce.rewriters.lexical import LexicalRewriter
from destein_pl.induce.rewriters.non_parallel import NonParallelRewriter
from destein_pl.induce.rewriters.openai_compatible import OpenAICompatibleRewriter
from destein_pl.induce.rewriters.self_rewriter import SelfRewriter
from destein_pl.plugins import build_plugin

REWRITERS: dict[str, type[Rewriter]] = {
    cls.name: cls for cls in (SelfRewriter, LexicalRewriter, OpenAICompatibleRewriter, NonParallelRewriter)
}


def build_rewriter(spec: Rewriter | str) -> Rewriter:
    """The rewriter `spec` names: an instance (returned as is), a short name of `REWRITERS`, a class name, an import
    path, or a class_path/init_args mapping."""
    return build_plugin(spec, Rewriter, REWRITERS, "rewriter")


__all__ = [
    "REWRITERS", "LexicalRewriter", "NonParallelRewriter", "OpenAICompatibleRewriter", "RewriteContext", "Rewriter",
    "SelfRewriter", "build_rewriter",
]
