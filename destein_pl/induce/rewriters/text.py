"""Word-level heuristics for judging a candidate rewrite: content words, their overlap, respelled toxic words, and
the choice among candidates."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

WORD = re.compile(r"\b[\w']+\b")
"""A word: letters, digits, underscores and apostrophes."""

_STOPWORD_TEXT = (
    "a about above after again against all am an and any are aren't as at be because been before being below "
    "between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each "
    "few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself "
    "him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself just let's me more most "
    "mustn't my myself no nor not now of off on once only or other ought our ours ourselves out over own same "
    "shan't she she'd she'll she's should shouldn't so some such than that that's the their theirs them themselves "
    "then there there's these they they'd they'll they're they've this those through to too under until up very "
    "was wasn't we we'd we'll we're we've were weren't what what's when when's where where's which while who who's "
    "whom why why's will with won't would wouldn't you you'd you'll you're you've your yours yourself yourselves "
    "im dont cant isnt wont u ur"
)
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
"""Words that carry no content of their own (English function words, with some apostrophe-less spellings)."""


def text_words(text: str) -> list[str]:
    """The lowercased words of `text`."""
    return [w.lower() for w in WORD.findall(text)]


def content_words(text: str, is_toxic: Callable[[str], bool]) -> set[str]:
    """The lowercased words of `text` that carry its content: neither stopwords nor toxic words."""
    return {w for w in text_words(text) if w not in STOPWORDS and not is_toxic(w)}


def content_overlap(source: str, candidate: str, is_toxic: Callable[[str], bool]) -> float:
    """The share of `source`'s content words that `candidate` keeps; 1.0 when the source has none."""
    wanted = content_words(source, is_toxic)
    return len(wanted & content_words(candidate, is_toxic)) / len(wanted) if wanted else 1.0


class Candidate(NamedTuple):
    """A candidate rewrite with what `choose_candidate` weighed: its content-word overlap with the source and its
    number of toxic words."""

    text: str
    overlap: float
    toxic_words: int


def disguises(word: str, toxic_words: Sequence[str]) -> bool:
    """Whether `word` looks like a respelling of one of `toxic_words` (of 4 letters or more): it starts with the
    same 3 letters, or is at least 75% similar (difflib's ratio), or 60% with the same first letter, as `fucke`,
    `darn` or `fcked` are."""
    def similar(toxic: str) -> bool:
        ratio = difflib.SequenceMatcher(None, word, toxic).ratio()
        return word[:3] == toxic[:3] or ratio >= 0.75 or (word[0] == toxic[0] and ratio >= 0.6)

    return any(word != toxic and len(toxic) >= 4 and similar(toxic) for toxic in toxic_words)


def choose_candidate(source: str, candidates: Sequence[str], is_toxic: Callable[[str], bool],
                     min_length_ratio: float = 0.5, max_length_ratio: float = 1.5) -> Candidate | None:
    """The candidate rewrite of `source` to keep: among those that have words, are not the source again (the same
    words), have between `min_length_ratio` and `max_length_ratio` times its number of words, and respell none of
    its toxic words (a new word that `disguises` one: the toxicity scorer would not see it), the one with the
    fewest toxic words, then the largest content-word overlap, then the first. None when none qualifies."""
    source_words = text_words(source)
    toxic_source = sorted({w for w in source_words if is_toxic(w)})
    best: Candidate | None = None
    for text in candidates:
        words = text_words(text)
        if not words or words == source_words:
            continue
        if not min_length_ratio <= len(words) / max(len(source_words), 1) <= max_length_ratio:
            continue
        if any(disguises(w, toxic_source) for w in set(words) - set(source_words) if not is_toxic(w)):
            continue
        candidate = Candidate(text, content_overlap(source, text, is_toxic), sum(map(is_toxic, words)))
        if best is None or (candidate.toxic_words, -candidate.overlap) < (best.toxic_words, -best.overlap):
            best = candidate
    return best
