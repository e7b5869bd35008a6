"""The `self` rewriter: the model being induced from rewrites its own toxic text, by instruction or few-shot."""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from destein_pl.calibration.pairs import SteeringPair, read_pairs, usable_pairs
from destein_pl.evaluation.sampling import SamplingSettings, end_token_ids, sample
from destein_pl.induce.rewriters.base import REWRITE_INSTRUCTION, RewriteContext, Rewriter, instruction_with_text
from destein_pl.induce.rewriters.lexical import LexicalRewriter
from destein_pl.induce.rewriters.text import choose_candidate, content_overlap, text_words

if TYPE_CHECKING:
    from destein_pl.steering.model import SteeredCausalLM

_QUOTES = "\"'“”‘’`"
DEMONSTRATION_MIN_KEEP = 0.7
"""A few-shot demonstration's non-toxic side keeps at least this share of its toxic side's content words."""


def _clean_generation(text: str) -> str | None:
    """The first paragraph of a generated answer without surrounding quotes; None when nothing is left."""
    text = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0].strip().strip(_QUOTES).strip()
    return text or None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_line(text: str) -> str:
    """The first line of a completion, stripped of spaces and surrounding quotes."""
    return text.split("\n", 1)[0].strip().strip(_QUOTES).strip()


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
        self.instruction = instruction_with_text(instruction, kind)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.demonstrations, self.num_demonstrations = demonstrations, num_demonstrations
        self.demonstration_seed, self.max_demonstration_words = demonstration_seed, max_demonstration_words
        self.min_overlap, self.min_length_ratio, self.max_length_ratio = min_overlap, min_length_ratio, max_length_ratio
        self.banned_word_weight = banned_word_weight
        self.sampling = SamplingSettings(top_p=0.9, temperature=temperature, num_samples=num_candidates,
                                         max_new_tokens=max_new_tokens, seed=seed)
        """How the few-shot candidates are drawn (the first one greedy)."""
        self.lexical = LexicalRewriter()
        self.pool: list[SteeringPair] = []  # the drawn demonstrations, in order, with spares
        self._token_ids: dict[int, tuple[set[int], dict[tuple[int, ...], set[int]]]] = {}  # per tokenizer

    def inputs(self) -> list[str]:
        """The demonstrations file, where there is one."""
        return [] if self.demonstrations is None else [str(self.demonstrations)]

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
        tok = steered.tokenizer
        # The chat template already writes the special tokens (BOS); adding them again would double them.
        batch = tok([self.build_prompt(tok, t) for t in texts], return_tensors="pt", padding=True,
                    add_special_tokens=not tok.chat_template)
        out = steered.generate(**batch.to(steered.device), max_new_tokens=self.max_new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id,
                               eos_token_id=end_token_ids(steered.generation_config, tok))
        new = out[:, batch["input_ids"].shape[1] :]
        return [_clean_generation(t) for t in tok.batch_decode(new, skip_special_tokens=True)]

    def _candidates(self, steered: SteeredCausalLM, texts: list[str]) -> list[list[str]]:
        """The few-shot mode: `num_candidates` completions per text (the greedy one, then sampled ones, each with
        its own seed from (seed, text, candidate index)), each cut at its first newline; "" for one that did not
        end in time (`max_new_tokens`, or 8 tokens beyond `max_length_ratio` times the text's)."""
        tok = steered.tokenizer
        newlines, bans = self._special_ids(tok)
        stops = newlines | set(end_token_ids(steered.generation_config, tok))
        prompts = [tok(self.build_prompt(tok, t))["input_ids"] for t in texts]
        limits = [math.ceil(self.max_length_ratio * len(tok(t)["input_ids"])) + 8 for t in texts]
        result = sample(steered, steered.architecture, prompts, texts, self.sampling, tok.pad_token_id, (),
                        stop_token_ids=stops, bans=bans, limits=limits, greedy_first=True)
        return [[_first_line(tok.decode(ids, skip_special_tokens=True)) if ids[-1] in stops else "" for ids in rows]
                for rows in result.tokens]
