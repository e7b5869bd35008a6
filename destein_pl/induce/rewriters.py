"""Rewriters that turn toxic texts into non-toxic texts, the other half of DeStein's steering pairs.

A config names a rewriter by short name (`self`, `lexical`, `openai-compatible`, `none`) or as
`class_path`/`init_args` (`LexicalRewriter`, ...). Constructors only check their arguments (no I/O): weights,
keys and connections come in `setup()`, which `rewrite` calls when needed. What a rewriter may need besides the
texts (the model, the other samples) comes in a `RewriteContext`.
"""

from __future__ import annotations

import bisect
import difflib
import logging
import math
import os
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from destein_pl.calibration.pairs import SteeringPair, read_pairs, usable_pairs
from destein_pl.http_client import HTTPRequestError, RateLimiter, endpoint_policy, post_json, redacted
from destein_pl.plugins import Plugin, build_plugin

if TYPE_CHECKING:
    from destein_pl.steering.model import SteeredCausalLM

logger = logging.getLogger(__name__)

REWRITE_INSTRUCTION = (
    "Please rephrase the following text to convey the same meaning in a non-toxic, respectful, and positive manner: "
    "{text}"
)
_QUOTES = "\"'“”‘’`"
_WORD = re.compile(r"\b[\w']+\b")


@dataclass
class RewriteContext:
    """What a rewrite may draw on besides the texts: the model being induced from, and the scored samples.

    Attributes:
        steered: the model (with its tokenizer) the samples came from.
        pool: every scored sample, as dicts with `id`, `text` and `toxicity` (None: unscored).
        selected_ids: the ids of the samples being rewritten, in the order of the texts.
    """

    steered: SteeredCausalLM | None = None
    pool: list[dict[str, Any]] = field(default_factory=list)
    selected_ids: list[str] = field(default_factory=list)


class Rewriter(Plugin, ABC):
    """Maps toxic texts to non-toxic texts with the same meaning; None where no rewrite could be obtained."""

    def rewrite(self, texts: Sequence[str], context: RewriteContext | None = None) -> list[str | None]:
        """One rewrite (or None) per input text, in order."""
        self.setup()
        return self._rewrite(list(texts), context or RewriteContext()) if texts else []

    @abstractmethod
    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        """`rewrite` of a non-empty list, after `setup`."""


def _instruction_with_text(instruction: str, kind: str) -> str:
    if "{text}" not in instruction:
        raise ValueError(f"{kind}: `instruction` must contain `{{text}}` where the text to rewrite goes")
    return instruction


def _clean_generation(text: str) -> str | None:
    """The first paragraph of a generated answer without surrounding quotes; None when nothing is left."""
    text = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0].strip().strip(_QUOTES).strip()
    return text or None


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
DEMONSTRATION_MIN_KEEP = 0.7
"""A few-shot demonstration's non-toxic side keeps at least this share of its toxic side's content words."""


def text_words(text: str) -> list[str]:
    """The lowercased words of `text`."""
    return [w.lower() for w in _WORD.findall(text)]


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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_line(text: str) -> str:
    """The first line of a completion, stripped of spaces and surrounding quotes."""
    return text.split("\n", 1)[0].strip().strip(_QUOTES).strip()


@torch.no_grad()
def generate_candidates(
    steered: SteeredCausalLM, prompts: list[list[int]], seeds: list[list[int]], limits: list[int],
    stops: set[int], bans: dict[tuple[int, ...], set[int]], temperature: float, pad_token_id: int,
) -> list[list[tuple[list[int], bool]]]:
    """Continue token-id prompts, `len(seeds[p])` rows of prompt p: its first row greedy, the others sampled (nucleus
    0.9 at `temperature`), each drawing from its own seed. Each prompt runs once and its cache is repeated for its
    rows. A row ends after a token of `stops` (kept) or after `limits[p]` tokens; a token in `bans[last tokens of
    the row]` is never chosen (`bans[()]` never at all). Returns per prompt, per row, (tokens, whether it ended on
    a stop token)."""
    from destein_pl.evaluation.sampling import left_padded, nucleus_choice

    architecture, device, n = steered.architecture, steered.device, len(seeds[0])
    input_ids, mask = left_padded(prompts, max(len(p) for p in prompts), pad_token_id, device)
    out = steered(**architecture.padded_inputs(input_ids, mask), use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(n)
    logits, mask = out.logits[:, -1].repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
    greedy = (torch.arange(len(prompts) * n, device=device) % n) == 0
    generators = [torch.Generator().manual_seed(s) for row in seeds for s in row]
    row_limits = [limit for limit in limits for _ in range(n)]
    tokens: list[list[int]] = [[] for _ in generators]
    ended, done = [False] * len(generators), [False] * len(generators)
    prefix_lengths = sorted({len(key) for key in bans})
    for _ in range(max(limits)):
        logits = logits.float()
        for row, history in enumerate(tokens):
            if done[row]:
                continue
            banned = set().union(*(bans.get(tuple(history[len(history) - k :]) if k else (), ())
                                   for k in prefix_lengths if k <= len(history)))
            if banned:
                logits[row, sorted(banned)] = -math.inf
        uniforms = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)
        token = torch.where(greedy, logits.argmax(dim=-1), nucleus_choice(logits, uniforms, 0.9, temperature))
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                tokens[row].append(t)
                ended[row] = t in stops
                done[row] = ended[row] or len(tokens[row]) >= row_limits[row]
        if all(done):
            break
        token = token.masked_fill(torch.tensor(done, device=device), pad_token_id)
        inputs, mask = architecture.step_inputs(token, mask)
        out = steered(**inputs, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    rows = list(zip(tokens, ended))
    return [rows[p * n : (p + 1) * n] for p in range(len(prompts))]


class SelfRewriter(Rewriter):
    """The model rewrites its own toxic text, as in the paper's self-generated pairs.

    Two modes. Without `demonstrations`: the paper's instruction through the chat template, one greedy answer whose
    first paragraph is the rewrite. With `demonstrations` (few-shot, what works for small models): a plain
    completion prompt of ParaDetox pairs (`Toxic: ...` / `Neutral: ...`) ending with the text; `num_candidates`
    completions cut at the first newline (the greedy one, then sampled ones), in which the words the
    profanity-check model weighs as most toxic, and masks such as `f***`, are never generated; and of those, the
    one with the fewest toxic words, then the most of the text's content words (neither stopwords nor toxic
    words; see `choose_candidate`). None (no rewrite) when no completion is usable (empty, the text again, of
    another length, or respelling a toxic word) or the chosen one keeps fewer than `min_overlap` of them.

    Args:
        instruction: the request, with `{text}` where the text goes; wrapped in the chat template when the
            tokenizer has one (instruction mode only).
        max_new_tokens: tokens per rewrite, at least 1.
        batch_size: texts per generation batch, at least 1.
        demonstrations: a ParaDetox TSV or pairs JSONL whose pairs serve as few-shot demonstrations; None: the
            instruction mode. Read when first used.
        num_demonstrations: demonstrations in each prompt, at least 1. They are drawn among the pairs whose sides
            have at most `max_demonstration_words` words, whose toxic side holds a toxic word, and whose non-toxic
            side keeps at least 70% of its content words (minimal edits); one equal to the text is skipped.
        demonstration_seed: seed of the demonstrations' draw (and order).
        max_demonstration_words: longest demonstration side, in words, at least 1.
        num_candidates: completions per text (the greedy one, then sampled ones), at least 1.
        temperature: sampling temperature of the sampled candidates (nucleus 0.9), > 0.
        seed: seed of the sampled candidates; each draws from its own generator, seeded from (seed, text,
            candidate index).
        min_overlap: a rewrite keeps at least this share of the text's content words, in [0, 1].
        min_length_ratio: a candidate has at least this many times the text's words, at least 0.
        max_length_ratio: a candidate has at most this many times the text's words, at least `min_length_ratio`.
        banned_word_weight: words whose weight in the profanity-check model is at least this (> 0) are never
            generated (after a space, in lower, capitalized or upper case); None: no word is forbidden.
    """

    name = "self"

    def __init__(
        self,
        instruction: str = REWRITE_INSTRUCTION,
        max_new_tokens: int = 48,
        batch_size: int = 16,
        demonstrations: str | None = None,
        num_demonstrations: int = 8,
        demonstration_seed: int = 0,
        max_demonstration_words: int = 25,
        num_candidates: int = 8,
        temperature: float = 0.7,
        seed: int = 0,
        min_overlap: float = 0.4,
        min_length_ratio: float = 0.5,
        max_length_ratio: float = 1.5,
        banned_word_weight: float | None = 2.0,
    ) -> None:
        kind = "self rewriter"
        at_least_one = {"max_new_tokens": max_new_tokens, "batch_size": batch_size,
                        "num_demonstrations": num_demonstrations, "max_demonstration_words": max_demonstration_words,
                        "num_candidates": num_candidates}
        for option, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"{kind}: `{option}` must be at least 1, got {value}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"{kind}: `temperature` must be a finite number > 0, got {temperature}")
        if not 0 <= min_overlap <= 1:
            raise ValueError(f"{kind}: `min_overlap` must be in [0, 1], got {min_overlap}")
        if not (min_length_ratio >= 0 and math.isfinite(min_length_ratio)):
            raise ValueError(f"{kind}: `min_length_ratio` must be a finite number >= 0, got {min_length_ratio}")
        if not max_length_ratio >= min_length_ratio:
            raise ValueError(f"{kind}: `max_length_ratio` must be at least `min_length_ratio` ({min_length_ratio}), "
                             f"got {max_length_ratio}")
        if banned_word_weight is not None and not (banned_word_weight > 0 and math.isfinite(banned_word_weight)):
            raise ValueError(f"{kind}: `banned_word_weight` must be a finite number > 0 (or null: none), got "
                             f"{banned_word_weight}")
        if demonstrations is not None and not str(demonstrations).strip():
            raise ValueError(f"{kind}: `demonstrations` must name a pairs file (or be null: the instruction mode)")
        self.instruction = _instruction_with_text(instruction, kind)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.demonstrations, self.num_demonstrations = demonstrations, num_demonstrations
        self.demonstration_seed, self.max_demonstration_words = demonstration_seed, max_demonstration_words
        self.num_candidates, self.temperature, self.seed = num_candidates, temperature, seed
        self.min_overlap, self.min_length_ratio, self.max_length_ratio = min_overlap, min_length_ratio, max_length_ratio
        self.banned_word_weight = banned_word_weight
        self.lexical = LexicalRewriter()
        self.pool: list[SteeringPair] = []  # the drawn demonstrations, in order, with spares
        self._token_ids: dict[int, tuple[set[int], dict[tuple[int, ...], set[int]]]] = {}  # per tokenizer

    def _setup(self) -> None:
        if self.demonstrations is None:
            return
        path = Path(self.demonstrations).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"self rewriter: `demonstrations` file not found: {path}")
        self.lexical.setup()
        pairs, _ = usable_pairs(read_pairs(path))
        eligible = [p for p in pairs if self._good_demonstration(p)]
        if len(eligible) <= self.num_demonstrations:
            raise ValueError(f"self rewriter: {path} has {len(eligible)} usable demonstrations (at most "
                             f"{self.max_demonstration_words} words a side, a toxic word, a minimal edit); "
                             f"`num_demonstrations` is {self.num_demonstrations}")
        # enough spares that texts equal to demonstrations still get num_demonstrations others
        self.pool = random.Random(self.demonstration_seed).sample(eligible, min(len(eligible),
                                                                                2 * self.num_demonstrations + 8))

    def is_toxic(self, word: str) -> bool:
        """Whether the `lexical` rewriter would delete `word` (its profanity-check weight is at least 1)."""
        self.lexical.setup()
        return self.lexical.is_toxic(word)

    def _good_demonstration(self, pair: SteeringPair) -> bool:
        toxic, neutral = text_words(pair.toxic), text_words(pair.nontoxic)
        return (0 < len(toxic) <= self.max_demonstration_words and 0 < len(neutral) <= self.max_demonstration_words
                and toxic != neutral and any(map(self.is_toxic, toxic))
                and content_overlap(pair.toxic, pair.nontoxic, self.is_toxic) >= DEMONSTRATION_MIN_KEEP)

    def demonstrations_for(self, text: str) -> list[SteeringPair]:
        """The first `num_demonstrations` drawn demonstrations whose sides are not `text` (same words)."""
        self.setup()
        words = text_words(text)
        chosen = [p for p in self.pool if text_words(p.toxic) != words and text_words(p.nontoxic) != words]
        return chosen[: self.num_demonstrations]

    def build_prompt(self, tokenizer, text: str) -> str:
        """The prompt for `text`: its demonstrations then `Toxic: <text>\\nNeutral:` (few-shot mode), or the
        instruction wrapped in the chat template when the tokenizer has one."""
        if self.demonstrations is not None:
            shots = "".join(f"Toxic: {_one_line(p.toxic)}\nNeutral: {_one_line(p.nontoxic)}\n\n"
                            for p in self.demonstrations_for(text))
            return f"{shots}Toxic: {_one_line(text)}\nNeutral:"
        content = self.instruction.format(text=text)
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return f"{content}\n"

    def select(self, text: str, candidates: Sequence[str]) -> str | None:
        """The rewrite of `text` among `candidates` (see `choose_candidate`); None when none is usable or the best
        keeps fewer than `min_overlap` of the text's content words."""
        best = choose_candidate(text, candidates, self.is_toxic, self.min_length_ratio, self.max_length_ratio)
        return best.text if best is not None and best.overlap >= self.min_overlap else None

    def _special_ids(self, tokenizer) -> tuple[set[int], dict[tuple[int, ...], set[int]]]:
        """This tokenizer's tokens that hold a newline, and what it may not generate as {tokens so far: forbidden
        next tokens}: tokens holding `*`, and for each spelling (lower, capitalized, upper case, after a space) of
        each word weighing at least `banned_word_weight`, its last token after the ones before it, and when it has
        several tokens, every token that starts like its last one (` sh` + `it` forbids ` sh` + `its` too)."""
        key = id(tokenizer)
        if key not in self._token_ids:
            self.lexical.setup()
            text_of = {i: tokenizer.convert_tokens_to_string([t]) for t, i in tokenizer.get_vocab().items()}
            stops = {i for i, text in text_of.items() if "\n" in text}
            by_text = sorted((text, i) for i, text in text_of.items())
            # `*` masks a word (`f***`) that the toxicity scorer no longer sees but a reader still does
            bans: dict[tuple[int, ...], set[int]] = {(): {i for i, text in text_of.items() if "*" in text}}
            if self.banned_word_weight is not None:
                for word, weight in self.lexical.weights.items():
                    if weight < self.banned_word_weight or len(word) < 3:
                        continue
                    for variant in {word, word.capitalize(), word.upper()}:
                        *before, last = tokenizer(" " + variant, add_special_tokens=False)["input_ids"]
                        banned = bans.setdefault(tuple(before), set())
                        banned.add(last)
                        if before:  # the tokens whose text starts with the last token's
                            start = bisect.bisect_left(by_text, (text_of[last], -1))
                            end = bisect.bisect_left(by_text, (text_of[last] + "\U0010ffff", -1))
                            banned.update(i for _, i in by_text[start:end])
            self._token_ids[key] = (stops, bans)
        return self._token_ids[key]

    @torch.no_grad()
    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        steered = context.steered
        if steered is None or steered.tokenizer is None:
            raise ValueError("the `self` rewriter needs the model and its tokenizer in its RewriteContext")
        tok = steered.tokenizer
        results: list[str | None] = []
        side, tok.padding_side = tok.padding_side, "left"  # left padding keeps every prompt's end at the same column
        try:
            with tqdm(total=len(texts), desc="rewriting", unit="text", disable=len(texts) <= self.batch_size) as bar:
                for start in range(0, len(texts), self.batch_size):
                    chunk = texts[start : start + self.batch_size]
                    if self.demonstrations is None:
                        results.extend(self._instructed(steered, chunk))
                    else:
                        results.extend(self.select(t, c) for t, c in zip(chunk, self._candidates(steered, chunk)))
                    bar.update(len(chunk))
        finally:
            tok.padding_side = side
        return results

    def _instructed(self, steered: SteeredCausalLM, texts: list[str]) -> list[str | None]:
        """The instruction mode: one greedy answer per text, its first paragraph."""
        from destein_pl.evaluation.sampling import end_token_ids

        tok = steered.tokenizer
        # The chat template already writes the special tokens (BOS); adding them again would double them.
        batch = tok([self.build_prompt(tok, t) for t in texts], return_tensors="pt", padding=True,
                    add_special_tokens=not tok.chat_template)
        out = steered.generate(**batch.to(steered.device), max_new_tokens=self.max_new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=end_token_ids(steered.generation_config, tok))
        new = out[:, batch["input_ids"].shape[1] :]
        return [_clean_generation(t) for t in tok.batch_decode(new, skip_special_tokens=True)]

    def _candidates(self, steered: SteeredCausalLM, texts: list[str]) -> list[list[str]]:
        """The few-shot mode: `num_candidates` completions per text, each cut at its first newline; "" for one that
        did not end in time (`max_new_tokens`, or 8 tokens beyond `max_length_ratio` times the text's)."""
        from destein_pl.evaluation.sampling import end_token_ids, row_seed

        tok = steered.tokenizer
        stops, bans = self._special_ids(tok)
        stops = stops | set(end_token_ids(steered.generation_config, tok))
        prompts = [tok(self.build_prompt(tok, t))["input_ids"] for t in texts]
        limits = [min(self.max_new_tokens, math.ceil(self.max_length_ratio * len(tok(t)["input_ids"])) + 8)
                  for t in texts]
        seeds = [[row_seed(self.seed, t, k) for k in range(self.num_candidates)] for t in texts]
        rows = generate_candidates(steered, prompts, seeds, limits, stops, bans, self.temperature, tok.pad_token_id)
        return [[_first_line(tok.decode(ids, skip_special_tokens=True)) if ended else "" for ids, ended in text_rows]
                for text_rows in rows]


class LexicalRewriter(Rewriter):
    """Deletes the words the profanity-check linear model weighs as most toxic: a cheap, model-free rewrite.

    Args:
        min_weight: delete the words whose weight in the linear model is at least this (> 0; the larger, the
            fewer words go).
    """

    name = "lexical"

    def __init__(self, min_weight: float = 1.0) -> None:
        if not (min_weight > 0 and math.isfinite(min_weight)):
            raise ValueError(f"lexical rewriter: `min_weight` must be a finite number > 0, got {min_weight}")
        self.min_weight = min_weight
        self.weights: dict[str, float] = {}

    def _setup(self) -> None:
        from profanity_check import profanity_check

        coef = np.mean([c.estimator.coef_[0] for c in profanity_check.model.calibrated_classifiers_], axis=0)
        self.weights = {w: float(coef[i]) for w, i in profanity_check.vectorizer.vocabulary_.items()}

    def is_toxic(self, word: str) -> bool:
        """Whether `word` weighs at least `min_weight` in the profanity-check model (call `setup` first)."""
        return self.weights.get(word.lower(), 0.0) >= self.min_weight

    def _rewrite_one(self, text: str) -> str | None:
        kept = _WORD.sub(lambda m: "" if self.is_toxic(m.group()) else m.group(), text)
        kept = re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s+", " ", kept)).strip()
        return kept if re.search(r"\w", kept) else None

    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        return [self._rewrite_one(t) for t in texts]


class OpenAICompatibleRewriter(Rewriter):
    """Asks any chat-completions HTTP endpoint (OpenAI, vLLM, llama.cpp server, ...) for each rewrite.

    Requests are retried on 429, 5xx, connection errors and timeouts with exponential backoff; a text whose rewrite
    could not be obtained gets None (counted in `failed`).

    Args:
        url: the API base, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`
            (`/chat/completions` is appended).
        model: the model name the endpoint serves.
        api_key_env: the environment variable holding the API key, sent as a bearer token when set (local
            servers need none).
        instruction: the request, with `{text}` where the text goes.
        temperature: sampling temperature, at least 0.
        max_tokens: tokens per rewrite, at least 1.
        max_retries: retries of a failed request, at least 0.
        backoff_s: wait before retry k is `backoff_s * 2**k` seconds (longer if the server asks), at least 0.
        timeout_s: seconds to wait for an answer, > 0.
        requests_per_second: at most this many request starts per second (> 0); None: no limit.
    """

    name = "openai-compatible"

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        instruction: str = REWRITE_INSTRUCTION,
        temperature: float = 0.0,
        max_tokens: int = 128,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        requests_per_second: float | None = None,
    ) -> None:
        kind = "openai-compatible rewriter"
        self.policy = endpoint_policy(kind, url, requests_per_second, max_retries, backoff_s, timeout_s,
                                      allow_no_limit=True)
        if not model:
            raise ValueError(f"{kind}: `model` must name the model the endpoint serves")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"{kind}: `temperature` must be a finite number >= 0, got {temperature}")
        if max_tokens < 1:
            raise ValueError(f"{kind}: `max_tokens` must be at least 1, got {max_tokens}")
        self.endpoint = f"{url.rstrip('/')}/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.instruction = _instruction_with_text(instruction, kind)
        self.temperature, self.max_tokens, self.requests_per_second = temperature, max_tokens, requests_per_second
        self.failed = 0
        self._headers: dict[str, str] = {}
        self._limiter: RateLimiter | None = None

    def _setup(self) -> None:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}  # local servers need no key
        self._limiter = RateLimiter(self.requests_per_second) if self.requests_per_second else None

    def _rewrite_one(self, text: str) -> str | None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.instruction.format(text=text)}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        try:
            answer = post_json(self.endpoint, body, self._headers, self.policy, self._limiter)
            content = answer["choices"][0]["message"]["content"]
            return (content or "").strip() or None
        except HTTPRequestError as err:
            reason = str(err)
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            reason = f"malformed response from {redacted(self.endpoint)} ({type(err).__name__}: {err})"
        self.failed += 1
        logger.warning("no rewrite for a text: %s", reason)
        return None

    def _rewrite(self, texts: list[str], context: RewriteContext) -> list[str | None]:
        return [self._rewrite_one(t) for t in texts]


REWRITERS: dict[str, type[Rewriter]] = {
    cls.name: cls for cls in (SelfRewriter, LexicalRewriter, OpenAICompatibleRewriter, NonParallelRewriter)
}


def build_rewriter(spec: Rewriter | str, **legacy_options: Any) -> Rewriter:
    """The rewriter `spec` names: an instance (returned as is), a short name of `REWRITERS`, a class name or an import
    path, constructed with `legacy_options` (the deprecated `rewriter_args`)."""
    return build_plugin(spec, Rewriter, REWRITERS, "rewriter", legacy_options)
