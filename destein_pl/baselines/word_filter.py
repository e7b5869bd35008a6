"""Word filtering (the RealToxicityPrompts paper's baseline): the sampler may not complete a banned word.

Each word is banned in four spellings (as given, lower case, capitalised, upper case), each with and without a
leading space, as the tokenizer splits them: the sampler never takes a spelling's last token after its other tokens
(one token: never at all). A word split differently than the tokenizer splits it can still appear; so can one
whose first tokens stand at the end of the prompt.

The word list is a file a user gives (one word a line, `#` starts a comment), or is built from steering pairs:
the words (lower-cased runs of letters and apostrophes, at least 3 letters) that occur in the toxic side of at least
`min_count` pairs and in the non-toxic side of none: what the rewrites removed.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from destein_pl.baselines.method import Method, input_digest, register
from destein_pl.files import read_text

WORD = re.compile(r"[a-z][a-z']{2,}")


def read_word_list(path: str | Path) -> list[str]:
    """The words of a word-list file, in order, without repeats; an error naming the file when it has none."""
    words = [line.split("#", 1)[0].strip() for line in read_text(path, "word list").splitlines()]
    words = list(dict.fromkeys(w for w in words if w))
    if not words:
        raise ValueError(f"word_filter: word list {path} holds no word")
    return words


def words_from_pairs(pairs: Iterable[tuple[str, str]], min_count: int = 3) -> list[str]:
    """The words in the toxic side of at least `min_count` pairs and in no non-toxic side, most frequent first."""
    toxic, nontoxic = Counter(), set()
    for bad, good in pairs:
        toxic.update(set(WORD.findall(bad.lower())))
        nontoxic.update(WORD.findall(good.lower()))
    return [w for w, n in sorted(toxic.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count and w not in nontoxic]


def spellings(word: str) -> list[str]:
    forms = dict.fromkeys([word, word.lower(), word.capitalize(), word.upper()])
    return [s for form in forms for s in (form, " " + form)]


def ban_table(words: Iterable[str], tokenizer) -> dict[tuple[int, ...], set[int]]:
    """{the tokens before a spelling's last token: its last tokens}, for every spelling of every word."""
    bans: dict[tuple[int, ...], set[int]] = {}
    for word in words:
        for spelling in spellings(word):
            ids = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if ids:
                bans.setdefault(tuple(ids[:-1]), set()).add(ids[-1])
    return bans


@register
class WordFilter(Method):
    """Banned words: the sampler never completes one.

    Args:
        words: a word-list file (one word a line).
        pairs: instead, a steering-pairs source (ParaDetox TSV or JSONL) to build the list from.
        min_count: with `pairs`, a word must be in the toxic side of at least this many pairs.
    """

    name = "word_filter"

    def __init__(self, words: str | None = None, pairs: str | None = None, min_count: int = 3) -> None:
        if (words is None) == (pairs is None):
            raise ValueError("word_filter: give exactly one of words (a word-list file) or pairs (a pairs source "
                             "to build the list from)")
        if min_count < 1:
            raise ValueError(f"word_filter: min_count must be at least 1, got {min_count}")
        self.words_file, self.pairs, self.min_count = words, pairs, min_count
        self.words: list[str] = []
        self._bans: dict[tuple[int, ...], set[int]] | None = None

    def _setup(self) -> None:
        if self.words_file is not None:
            self.words = read_word_list(self.words_file)
            return
        from destein_pl.calibration.pairs import read_pairs

        rows = read_pairs(self.pairs, "auto", "toxic", "nontoxic", "train")
        self.words = words_from_pairs(((p.toxic, p.nontoxic) for p in rows), self.min_count)
        if not self.words:
            raise ValueError(f"word_filter: no word of {self.pairs} is in at least {self.min_count} toxic sides and "
                             f"no non-toxic side; lower min_count or give a word list")

    def attach(self, steered) -> None:
        self.setup()
        self._bans = ban_table(self.words, steered.tokenizer)

    def bans(self, steered) -> Mapping[tuple[int, ...], Collection[int]]:
        if self._bans is None:
            self.attach(steered)
        return self._bans

    def settings(self) -> dict[str, Any]:
        self.setup()
        source = ({"words": Path(self.words_file).name, "words_sha256": input_digest(self.words_file)}
                  if self.words_file is not None else
                  {"pairs": Path(self.pairs).name, "pairs_sha256": input_digest(self.pairs), "min_count": self.min_count})
        return {"method": self.name, **source, "num_words": len(self.words),
                "sha256": hashlib.sha256("\n".join(self.words).encode()).hexdigest()}
