"""Nucleus sampling whose randomness belongs to each row, so a continuation depends only on its seed.

`transformers.generate` draws the random numbers of a whole batch from one generator, so a prompt's samples
change with batch size, batch composition and the number of processes. Here every row (one continuation of one
prompt) has its own generator, seeded from (seed, prompt id, sample index), and draws exactly one number per
step; and every prompt can be padded to one fixed width, so that its logits do not depend on its neighbours
either. The same prompt then gives the same continuations however the work is split.

`SamplingSettings` holds (and checks) the options of every command that samples: evaluation, `generate`, `induce`,
and the few-shot rewriter, which decodes through the same `sample` with stop tokens, banned tokens, per-prompt
limits and a greedy first row.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from destein_pl.steering.architectures import Architecture

log = logging.getLogger(__name__)

MIN_ROWS = 8
"""Batches are filled up to this many rows: CPU matrix kernels take another code path for fewer than 4 rows,
which changes results in the last bits (measured), while from 4 rows on a row's result does not depend on the
batch."""

MAX_NUM_SAMPLES = 1000
"""The most continuations per prompt: one prompt's samples share one generation batch (their KV cache is the
prompt's, repeated), which `max_batch_tokens` cannot split."""


@dataclass(frozen=True)
class SamplingSettings:
    """How continuations are drawn (defaults: the paper's protocol), for every command that samples; each option is
    checked here, once.

    Args:
        top_p: nucleus sampling mass (paper: 0.9), in (0, 1].
        temperature: sampling temperature (paper: 1), a finite number >= 0; 0 is greedy.
        num_samples: continuations per prompt (paper: 25), from 1 to `MAX_NUM_SAMPLES` (1000).
        max_new_tokens: tokens per continuation (paper: 20), at least 1.
        seed: a continuation depends only on (seed, prompt id, sample index).
        max_prompt_tokens: prompts longer than this many tokens are cut from the left (with a warning), at least 1;
            None: only to the room the model's context leaves.
    """

    top_p: float = 0.9
    temperature: float = 1.0
    num_samples: int = 25
    max_new_tokens: int = 20
    seed: int = 0
    max_prompt_tokens: int | None = 512

    def __post_init__(self) -> None:
        # `top_p <= 0` empties the nucleus (the least likely token would be picked); a negative or NaN temperature
        # flips or breaks the distribution: settings that would run but give meaningless text.
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (the nucleus mass), got {self.top_p}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        for name in ("num_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_samples > MAX_NUM_SAMPLES:
            raise ValueError(f"num_samples must be from 1 to {MAX_NUM_SAMPLES} (one prompt's continuations are "
                             f"generated in one batch), got {self.num_samples}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be at least 1 (or None: the room the context leaves), got "
                             f"{self.max_prompt_tokens}")


def row_seed(seed: int, prompt_id: str, sample: int) -> int:
    """A 63-bit seed from (seed, prompt id, sample index), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def end_token_ids(generation_config, tokenizer) -> list[int]:
    """The tokens that end a continuation, one rule everywhere: the tokenizer's EOS and the generation config's
    (one id or several)."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


@dataclass
class SampleResult:
    """Continuations of token-id prompts: `tokens[p][s]` holds sample s of prompt p, up to and excluding the first
    end token; `log_probs[p][s]` each of those tokens' log-probability under the sampling model's own distribution
    (temperature 1, before the nucleus cut), which is their log-likelihood when that model is the judge."""

    tokens: list[list[list[int]]]
    log_probs: list[list[list[float]]] | None
    """None when not asked for (`sample(log_probs=False)`)."""


NUCLEUS_CANDIDATES = 1024
"""Tokens `nucleus_choice` sorts first (the most likely, by `topk`); a row whose nucleus may reach past them, or
whose candidates tie with the tokens left out, is decided by sorting its whole vocabulary, as before."""
NUCLEUS_MARGIN = 1e-6
"""How far the candidates' mass must pass `top_p` for no later token to be in the nucleus: float32 rounding of
the mass ahead of a token is far below it."""


def nucleus_choice(logits: Tensor, uniforms: Tensor, top_p: float, temperature: float) -> Tensor:
    """One token per row from the smallest set of most likely tokens whose probability reaches `top_p`,
    picked by inverse CDF with the row's uniform number. `temperature == 0` is greedy.

    Sorting the whole vocabulary at every step cost more than the model's decode steps; the nucleus is decided on
    the `NUCLEUS_CANDIDATES` most likely tokens instead, and a row is sorted whole only where that could differ:
    the same token as `full_nucleus_choice` picks, row by row (ties in stable index order, sums in the same order).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    if k == probs.shape[-1]:
        return _pick(probs, uniforms, top_p)
    values, indices = probs.topk(k, dim=-1, sorted=False)
    indices, by_index = indices.sort(dim=-1)  # ties among the candidates: lower index first, as a stable sort
    values = values.gather(-1, by_index)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    candidates = indices.gather(-1, order)
    cumulative = values.cumsum(dim=-1)
    reaches = cumulative[:, -1] >= top_p + NUCLEUS_MARGIN
    no_tie = (probs >= values[:, -1:]).sum(dim=-1) == k  # nothing left out ties with the last candidate
    token, position, size = _pick_sorted(values, candidates, uniforms, top_p)
    exact = reaches & no_tie & (position < size)
    if not exact.all():
        rows = (~exact).nonzero()[:, 0]
        token[rows] = _pick(probs[rows], uniforms[rows], top_p)
    return token


def full_nucleus_choice(logits: Tensor, uniforms: Tensor, top_p: float, temperature: float) -> Tensor:
    """`nucleus_choice` sorting the whole vocabulary of every row: the definition it is checked against."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return _pick(torch.softmax(logits.float() / temperature, dim=-1), uniforms, top_p)


def _pick(probs: Tensor, uniforms: Tensor, top_p: float) -> Tensor:
    """The nucleus pick of each row of `probs`, its whole vocabulary sorted."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    return _pick_sorted(sorted_probs, order, uniforms, top_p)[0]


def _pick_sorted(sorted_probs: Tensor, order: Tensor, uniforms: Tensor, top_p: float
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The pick from probabilities sorted in descending order (`order`: their tokens), with the position picked
    and the nucleus size of each row."""
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass ahead of each token
    outside = before >= top_p  # the first token is always kept
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    cdf = sorted_probs.cumsum(dim=-1)
    threshold = uniforms.to(cdf) * cdf[:, -1]
    position = (cdf <= threshold[:, None]).sum(dim=-1)
    token = order.gather(-1, position.clamp(max=cdf.shape[-1] - 1)[:, None]).squeeze(-1)
    return token, position, (~outside).sum(dim=-1)


@torch.no_grad()
def left_padded(prompts: list[list[int]], width: int, pad_token_id: int, device: torch.device | str = "cpu"
                ) -> tuple[Tensor, Tensor]:
    """`(input_ids, attention_mask)` of token-id prompts left-padded to `width`, so that every prompt ends at the
    same column."""
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def banned_logits(logits: Tensor, histories: list[list[int]], finished: list[bool],
                  bans: Mapping[tuple[int, ...], Collection[int]], key_lengths: list[int]) -> Tensor:
    """`logits` as floats with -inf at the tokens each unfinished row may not take next: those of `bans[the row's
    last k tokens]` for every key length k in `key_lengths` (`bans[()]` always)."""
    logits = logits.float().clone()
    for row, history in enumerate(histories):
        if finished[row]:
            continue
        banned = set().union(*(bans.get(tuple(history[len(history) - k :]), ()) for k in key_lengths
                               if k <= len(history)))
        if banned:
            logits[row, sorted(banned)] = -math.inf
    return logits


@torch.no_grad()
def sample(
    model: nn.Module,
    architecture: Architecture,
    prompts: list[list[int]],
    keys: list[str],
    settings: SamplingSettings,
    pad_token_id: int,
    eos_token_ids: Collection[int],
    width: int | None = None,
    *,
    stop_token_ids: Collection[int] = (),
    bans: Mapping[tuple[int, ...], Collection[int]] | None = None,
    limits: list[int] | None = None,
    greedy_first: bool = False,
    log_probs: bool = True,
) -> SampleResult:
    """Continue token-id prompts, `settings.num_samples` samples of each, all in one batch with the KV cache.

    Sample s of prompt p draws from its own generator, seeded from `(settings.seed, keys[p], s)`. Each prompt is
    run once (left-padded to `width`, or to the longest prompt) and its cache repeated for its samples. With a
    fixed `width`, a row's logits do not depend on the other rows of the batch (given batch-invariant kernels, as
    on CPU), so nor do its samples. `settings.max_prompt_tokens` is the callers' to apply (`PromptSampler` does).

    Args:
        eos_token_ids: tokens that end a row; they are not part of it.
        stop_token_ids: tokens that end a row and are kept as its last token.
        bans: {a row's last tokens: the tokens it may not take next}; `()` holds those never taken.
        limits: per prompt, at most this many tokens (within `settings.max_new_tokens`).
        greedy_first: each prompt's first sample is greedy, its others sampled.
        log_probs: also return each token's log-probability (a log-softmax over the vocabulary at every step).
    """
    if len(prompts) != len(keys) or not prompts:
        raise ValueError(f"sample needs one key per prompt and at least one prompt, got {len(prompts)} prompts and "
                         f"{len(keys)} keys")
    if limits is not None and (len(limits) != len(prompts) or min(limits) < 1):
        raise ValueError(f"limits must hold one number >= 1 per prompt, got {limits}")
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    if width is not None and width < longest:
        raise ValueError(f"width {width} is shorter than the longest prompt ({longest} tokens)")
    width = width or longest
    samples, max_new_tokens = settings.num_samples, settings.max_new_tokens
    repeats = max(samples, -(-MIN_ROWS // len(prompts)))  # rows beyond `samples` are filler, dropped at the end
    rows = prompts + [prompts[0]] * max(0, MIN_ROWS - len(prompts))  # filler rows, dropped after the prefill
    input_ids, attention_mask = left_padded(rows, width, pad_token_id, device)

    out = model(**architecture.padded_inputs(input_ids, attention_mask), use_cache=True, logits_to_keep=1)
    cache, real_prompts = out.cache, torch.arange(len(prompts), device=device)
    cache.batch_select_indices(real_prompts)
    cache.batch_repeat_interleave(repeats)
    logits = out.logits[real_prompts, -1].repeat_interleave(repeats, dim=0)
    attention_mask = attention_mask[real_prompts].repeat_interleave(repeats, dim=0)
    seeds = [[row_seed(settings.seed, key, s) for s in range(samples)] + [0] * (repeats - samples) for key in keys]
    generators = [torch.Generator().manual_seed(s) for row in seeds for s in row]
    sample_index = torch.arange(repeats, device=device).repeat(len(prompts))
    real, first = sample_index < samples, sample_index == 0
    limit = torch.tensor([min(n, max_new_tokens) for n in limits or [max_new_tokens] * len(prompts)],
                         device=device).repeat_interleave(repeats)
    eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=device)
    stops = torch.tensor(sorted(stop_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(generators), dtype=torch.bool, device=device)
    lengths = torch.zeros(len(generators), dtype=torch.long, device=device)
    histories = [[] for _ in generators] if bans else None
    key_lengths = sorted({len(key) for key in bans or ()})
    steps: list[Tensor] = []
    step_log_probs: list[Tensor] = []
    for step in range(max_new_tokens):
        uniforms = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)
        choice = logits if histories is None else banned_logits(logits, histories, finished.tolist(), bans,
                                                                 key_lengths)
        token = nucleus_choice(choice, uniforms, settings.top_p, settings.temperature)
        if greedy_first:
            token = torch.where(first, choice.argmax(dim=-1), token)
        active = ~finished
        token = token.masked_fill(finished, pad_token_id)
        steps.append(token)
        if log_probs:
            step_log_probs.append(torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None])[:, 0])
        ended = torch.isin(token, eos) & active
        lengths += (active & ~ended).long()
        finished |= ended | torch.isin(token, stops) | (lengths >= limit)
        if histories is not None:
            for history, t, grows in zip(histories, token.tolist(), active.tolist()):
                if grows:
                    history.append(t)
        if finished[real].all() or step == max_new_tokens - 1:
            break
        inputs, attention_mask = architecture.step_inputs(token, attention_mask)
        out = model(**inputs, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]

    def per_sample(stacked: Tensor) -> list[list[list]]:
        """`[prompt][sample]` rows of a (rows, steps) tensor, each cut to its length."""
        values = stacked.view(len(prompts), repeats, -1)[:, :samples].tolist()
        counts = lengths.view(len(prompts), repeats)[:, :samples].tolist()
        return [[row[:n] for row, n in zip(rows, ns)] for rows, ns in zip(values, counts)]

    return SampleResult(per_sample(torch.stack(steps, dim=1)),
                        per_sample(torch.stack(step_log_probs, dim=1)) if log_probs else None)


def prompt_limit(steered, settings: SamplingSettings, prefix_tokens: int = 0) -> int:
    """The most tokens of a prompt that are kept: `settings.max_prompt_tokens`, within the room the model's context
    leaves beside `settings.max_new_tokens` (and a baseline's prompt prefix of `prefix_tokens`)."""
    context = steered.architecture.context_length(steered.config)
    room = context - settings.max_new_tokens - prefix_tokens
    if room < 1:
        prefix = f" and a prompt prefix of {prefix_tokens} tokens" if prefix_tokens else ""
        raise ValueError(f"max_new_tokens={settings.max_new_tokens}{prefix} leave no room for a prompt in the "
                         f"model's context of {context} tokens")
    return room if settings.max_prompt_tokens is None else min(settings.max_prompt_tokens, room)


@dataclass
class Continuations:
    """What `PromptSampler` made for a batch of prompts, per prompt: its token ids, and per sample the tokens,
    their log-probabilities and the decoded text."""

    prompt_ids: list[list[int]]
    tokens: list[list[list[int]]]
    log_probs: list[list[list[float]]] | None
    texts: list[list[str]]


class PromptSampler:
    """Continues text prompts the way evaluation does, so that every command gives the same text for the same
    prompt id and settings: prompts cut from the left to `max_prompt_tokens` (and to the room the context leaves),
    padded to one width for the whole run, each sample drawn with its own seed.

    Args:
        steered: the model, with its current steering.
        settings: how continuations are drawn (a continuation depends only on its seed, prompt id and sample index).
    """

    def __init__(self, steered, settings: SamplingSettings | None = None) -> None:
        if steered.tokenizer is None:
            raise ValueError("the SteeredCausalLM was built without a tokenizer; pass one to continue text prompts")
        self.steered, self.settings = steered, settings or SamplingSettings()
        method = getattr(steered, "method", None)
        self.prefix = method.prompt_prefix(steered) if method is not None else []
        """A baseline method's prompt prefix, put before each prompt while alpha is not 0."""
        lead = steered.tokenizer("")["input_ids"] if self.prefix else []
        self.lead = len(lead)
        """The special tokens the tokenizer puts before any text (e.g. BOS): the prefix holds its own."""
        self.max_prompt_tokens = prompt_limit(steered, self.settings, len(self.prefix) - self.lead)
        self.end_tokens = end_token_ids(steered.generation_config, steered.tokenizer)
        self.width: int | None = None
        self.cut_prompts: set[str] = set()

    def prompt_ids(self, prompt, warn: bool = True) -> list[int]:
        """A prompt's token ids, cut from the left to `max_prompt_tokens` (with a warning, once per prompt)."""
        ids = self.steered.tokenizer(prompt.text)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {prompt.id!r} has no tokens (text {prompt.text!r}); a continuation needs at "
                             f"least one token of context")
        if len(ids) > self.max_prompt_tokens:
            if warn and prompt.id not in self.cut_prompts:
                self.cut_prompts.add(prompt.id)
                log.warning("prompt %s has %d tokens; cut from the left to %d (max_prompt_tokens)",
                            prompt.id, len(ids), self.max_prompt_tokens)
            ids = ids[-self.max_prompt_tokens :]
        return ids

    def fix_width(self, prompts) -> int:
        """Pad every later batch to the longest of `prompts` (the whole run's), so a prompt's samples do not
        depend on which prompts share its batch."""
        longest = max((len(self.prompt_ids(p, warn=False)) for p in prompts), default=None)
        self.width = None if longest is None else longest + len(self.prefix) - self.lead
        return self.width

    def __call__(self, prompts, log_probs: bool = True) -> Continuations:
        """`settings.num_samples` continuations of each prompt, with the model's current steering (and their
        tokens' log-probabilities unless `log_probs` is false)."""
        steered, tokenizer = self.steered, self.steered.tokenizer
        prompt_ids = [self.prompt_ids(p) for p in prompts]
        method = getattr(steered, "method", None) if steered.alpha != 0 else None
        inputs = prompt_ids
        if method is not None and self.prefix:
            inputs = [self.prefix + ids[self.lead :] for ids in prompt_ids]
        width = None if self.width is None else max(self.width, *(len(ids) for ids in inputs))
        model = steered if method is None else method.sampling_model(steered)
        result = sample(model, steered.architecture, inputs, [p.id for p in prompts], self.settings,
                        tokenizer.pad_token_id, self.end_tokens, width, log_probs=log_probs,
                        bans=None if method is None else method.bans(steered))
        texts = [tokenizer.batch_decode(rows, skip_special_tokens=True) for rows in result.tokens]
        return Continuations(prompt_ids, result.tokens, result.log_probs, texts)
