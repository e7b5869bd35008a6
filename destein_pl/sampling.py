"""Nucleus sampling whose randomness belongs to each row, so a continuation depends only on its seed.

`transformers.generate` draws the random numbers of a whole batch from one generator, so a prompt's samples
change with batch size, batch composition and the number of processes. Here every row (one continuation of one
prompt) has its own generator, seeded from (seed, prompt id, sample index), and draws exactly one number per
step; and every prompt can be padded to one fixed width, so that its logits do not depend on its neighbours
either. The same prompt then gives the same continuations however the work is split.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from destein_pl.architectures import Architecture

MIN_ROWS = 8
"""Batches are filled up to this many rows: CPU matrix kernels take another code path for fewer than 4 rows,
which changes results in the last bits (measured), while from 4 rows on a row's result does not depend on the
batch."""


def row_seed(seed: int, prompt_id: str, sample: int) -> int:
    """A 63-bit seed from (seed, prompt id, sample index), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def nucleus_choice(logits: Tensor, uniforms: Tensor, top_p: float, temperature: float) -> Tensor:
    """One token per row from the smallest set of most likely tokens whose probability reaches `top_p`,
    picked by inverse CDF with the row's uniform number. `temperature == 0` is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass ahead of each token
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first token is always kept
    cdf = sorted_probs.cumsum(dim=-1)
    threshold = uniforms.to(cdf) * cdf[:, -1]
    position = (cdf <= threshold[:, None]).sum(dim=-1).clamp(max=cdf.shape[-1] - 1)
    return order.gather(-1, position[:, None]).squeeze(-1)


@torch.no_grad()
def sample(
    model: nn.Module,
    architecture: Architecture,
    prompts: list[list[int]],
    seeds: list[list[int]],
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_ids: list[int],
    top_p: float = 0.9,
    temperature: float = 1.0,
    width: int | None = None,
    log_probs: list | None = None,
) -> list[list[list[int]]]:
    """Continue token-id prompts, `len(seeds[p])` samples of prompt p, all in one batch with the KV cache.

    Each prompt is run once (left-padded to `width`, or to the longest prompt) and its cache repeated for its
    samples. With a fixed `width`, a row's logits do not depend on the other rows of the batch (given
    batch-invariant kernels, as on CPU), so nor do its samples. Returns, per prompt and sample, the new tokens up
    to and excluding the first EOS. A list passed as `log_probs` receives, in the same layout, each new token's
    log-probability under the model's own distribution (temperature 1, before the nucleus cut).
    """
    if len(prompts) != len(seeds) or len({len(s) for s in seeds}) != 1:
        raise ValueError("seeds must hold one list of the same length per prompt")
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    if width is not None and width < longest:
        raise ValueError(f"width {width} is shorter than the longest prompt ({longest} tokens)")
    width = width or longest
    samples = len(seeds[0])
    repeats = max(samples, -(-MIN_ROWS // len(prompts)))  # rows beyond `samples` are filler, dropped at the end
    rows = prompts + [prompts[0]] * max(0, MIN_ROWS - len(prompts))  # filler rows, dropped after the prefill
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    out = model(**architecture.padded_inputs(input_ids, attention_mask), use_cache=True, logits_to_keep=1)
    cache, real_prompts = out.cache, torch.arange(len(prompts), device=device)
    cache.batch_select_indices(real_prompts)
    cache.batch_repeat_interleave(repeats)
    logits = out.logits[real_prompts, -1].repeat_interleave(repeats, dim=0)
    attention_mask = attention_mask[real_prompts].repeat_interleave(repeats, dim=0)
    generators = [torch.Generator().manual_seed(s) for row in seeds for s in row + [0] * (repeats - samples)]
    real = (torch.arange(repeats, device=device) < samples).repeat(len(prompts))
    eos = torch.tensor(eos_token_ids, device=device)
    finished = torch.zeros(len(generators), dtype=torch.bool, device=device)
    steps: list[Tensor] = []
    step_log_probs: list[Tensor] = []
    for step in range(max_new_tokens):
        uniforms = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)
        token = nucleus_choice(logits, uniforms, top_p, temperature).masked_fill(finished, pad_token_id)
        steps.append(token)
        if log_probs is not None:
            step_log_probs.append(torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None])[:, 0])
        finished |= torch.isin(token, eos)
        if finished[real].all() or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        inputs = {"input_ids": token[:, None], "attention_mask": attention_mask}
        if architecture.takes_position_ids:
            inputs["position_ids"] = attention_mask.sum(dim=1, keepdim=True) - 1
        out = model(**inputs, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    tokens = torch.stack(steps, dim=1).view(len(prompts), repeats, -1)[:, :samples].tolist()
    eos_set = set(eos_token_ids)
    lengths = [[next((i for i, t in enumerate(row) if t in eos_set), len(row)) for row in rows] for rows in tokens]
    if log_probs is not None:
        values = torch.stack(step_log_probs, dim=1).view(len(prompts), repeats, -1)[:, :samples].tolist()
        log_probs[:] = [[row[:n] for row, n in zip(rows, ns)] for rows, ns in zip(values, lengths)]
    return [[row[:n] for row, n in zip(rows, ns)] for rows, ns in zip(tokens, lengths)]
