"""Perplexity of a continuation given its prompt, under an evaluator language model."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from destein_pl.architectures import Architecture


@torch.no_grad()
def continuation_perplexities(
    model: nn.Module,
    architecture: Architecture,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    continuations: list[str],
    batch_size: int = 32,
) -> list[float | None]:
    """exp(mean negative log-likelihood of the continuation's tokens given the prompt's), one per pair.

    The two texts are tokenized apart and joined, so the continuation's tokens are exactly its own. An empty
    continuation (or prompt) has no perplexity (None). A prompt too long for the context is cut from the left.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    device = next(model.parameters()).device
    context = architecture.context_length(model.config)
    pad = tokenizer.pad_token_id
    results: list[float | None] = [None] * len(prompts)
    pairs = []
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        target = tokenizer(continuation, add_special_tokens=False)["input_ids"][: context // 2]
        source = tokenizer(prompt)["input_ids"][-(context - len(target)) :]
        if target and source:
            pairs.append((i, source, target))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(s) + len(t) for _, s, t in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target_mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, (_, source, target) in enumerate(chunk):
            seq = source + target
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
            target_mask[row, width - len(target) :] = True
        ids, mask, target_mask = ids.to(device), mask.to(device), target_mask.to(device)
        longest = max(len(t) for _, _, t in chunk)
        # Logits only where they predict continuation tokens: position t predicts token t + 1.
        logits = model(**architecture.padded_inputs(ids, mask), use_cache=False, logits_to_keep=longest + 1).logits
        nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, -longest:], reduction="none")
        counted = target_mask[:, -longest:]
        mean_nll = (nll * counted).sum(dim=1) / counted.sum(dim=1)
        for (i, _, _), value in zip(chunk, mean_nll.tolist()):
            results[i] = math.exp(value)
    return results
