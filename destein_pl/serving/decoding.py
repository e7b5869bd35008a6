"""Decoding one batch of server requests: every row with its own steering strength, sampling settings, seed, token
limit and stop strings, one step at a time, so that the server can stream each row's text as it grows.

A row is one continuation (a request with `n` choices has `n` rows). The batch is left-padded and run with the KV
cache like the evaluation sampler (`destein_pl.evaluation.sampling`): each row draws one uniform number per step
from its own generator, picked by the same nucleus rule, so a row depends only on its prompt, settings and seed (up
to the float rounding of its batch neighbours' padding). Rows that finish leave the batch (their cache rows are
dropped), so a long request does not make short ones wait for their tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from destein_pl.evaluation.sampling import left_padded, nucleus_choice

FINISH_STOP, FINISH_LENGTH = "stop", "length"
"""OpenAI's finish reasons: an end token or a stop string (`stop`), the token limit (`length`)."""


@dataclass
class Row:
    """One continuation being decoded, and its state.

    Args:
        prompt_ids: the prompt's token ids.
        alpha: the row's steering strength.
        max_tokens: at most this many new tokens.
        temperature: 0 is greedy.
        top_p: nucleus mass in (0, 1].
        seed: seeds the row's own generator (one uniform number per step).
        stop: strings that end the row; the text is cut before the first one.
    """

    prompt_ids: list[int]
    alpha: float
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    """The decoded continuation so far, cut before a stop string once one appears."""
    finish_reason: str | None = None
    cancelled: bool = False
    """Set from outside (a client gone, a deadline passed): the row leaves the batch at the next step."""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def settled_text(self) -> str:
        """The part of `text` that no later token can change: all of it once finished; before that, without a
        trailing partial character or a tail that could begin a stop string."""
        if self.finish_reason is not None:
            return self.text
        text = self.text.rstrip("\ufffd")
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[: len(text) - hold]


class Decoder:
    """Decodes batches of `Row`s with a steered model and its tokenizer.

    Args:
        steered: the `SteeredCausalLM` (per-row alphas through `row_alphas`).
        end_tokens: tokens that end a row (not part of its text).
    """

    def __init__(self, steered, end_tokens: list[int]) -> None:
        self.steered, self.tokenizer = steered, steered.tokenizer
        self.architecture = steered.architecture
        self.end_tokens = frozenset(end_tokens)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = min(self.end_tokens, default=0)

    def _forward(self, inputs: dict[str, Tensor], alphas: list[float], **kwargs):
        return self.steered(**inputs, alpha=alphas, **kwargs)

    def _choose(self, logits: Tensor, rows: list[Row], generators: list[torch.Generator]) -> Tensor:
        """One token per row: greedy or its nucleus, with its own uniform number."""
        uniforms = torch.cat([torch.rand(1, generator=g) for g in generators])
        token = torch.empty(len(rows), dtype=torch.long)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((row.temperature, row.top_p), []).append(i)
        for (temperature, top_p), members in groups.items():
            index = torch.tensor(members)
            token[index] = nucleus_choice(logits[index], uniforms[index], top_p, temperature).cpu()
        return token

    def _advance(self, row: Row, token: int) -> None:
        """Add one token to a row: its text grows, and an end token, a stop string or the limit finish it."""
        if token in self.end_tokens:
            row.finish_reason = FINISH_STOP
            return
        row.tokens.append(token)
        row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cuts = [i for i in (row.text.find(s) for s in row.stop) if i >= 0]
        if cuts:
            row.text, row.finish_reason = row.text[: min(cuts)], FINISH_STOP
        elif len(row.tokens) >= row.max_tokens:
            row.finish_reason = FINISH_LENGTH

    @torch.no_grad()
    def steps(self, rows: list[Row]) -> Iterator[list[Row]]:
        """Decode `rows` together; after each step, yield the rows still in the batch before it (their `text` and
        `finish_reason` updated). Ends when every row is done."""
        device = self.steered.device
        generators = [torch.Generator().manual_seed(row.seed) for row in rows]
        live = [i for i, row in enumerate(rows) if not row.done]
        if not live:
            return
        width = max(len(rows[i].prompt_ids) for i in live)
        ids, mask = left_padded([rows[i].prompt_ids for i in live], width, self.pad_token_id, device)
        out = self._forward(self.architecture.padded_inputs(ids, mask), [rows[i].alpha for i in live],
                            use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]
        while live:
            token = self._choose(logits, [rows[i] for i in live], [generators[i] for i in live])
            stepped = [rows[i] for i in live]
            for i, t in zip(live, token.tolist()):
                if not rows[i].done:
                    self._advance(rows[i], t)
            yield stepped
            keep = [k for k, i in enumerate(live) if not rows[i].done]
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                token, mask = token[keep], mask[index]
                live = [live[k] for k in keep]
            inputs, mask = self.architecture.step_inputs(token.to(device), mask)
            out = self._forward(inputs, [rows[i].alpha for i in live], cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
