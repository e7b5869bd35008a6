"""Perplexity of continuations given their prompt, under an evaluator language model."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from destein_pl.architectures import Architecture


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, continuations: list[str]
                  ) -> tuple[list[int], list[list[int]]]:
    """Token ids of a prompt and of its continuations, tokenized apart so each continuation keeps its own tokens."""
    return (tokenizer(prompt)["input_ids"],
            [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations])


@torch.no_grad()
def continuation_perplexities(
    model: nn.Module,
    architecture: Architecture,
    prompt: list[int],
    continuations: list[list[int]],
    pad_token_id: int,
    batch_size: int = 32,
) -> list[float | None]:
    """exp(mean negative log-likelihood of each continuation's tokens given the prompt's).

    The prompt is run once per batch of continuations and its KV cache shared by them. An empty continuation has
    no perplexity (None). A prompt too long for the context is cut from the left.
    """
    device = next(model.parameters()).device
    context = architecture.context_length(model.config)
    longest = max((len(c) for c in continuations), default=0)
    results: list[float | None] = [None] * len(continuations)
    if longest == 0 or not prompt:
        return results
    prompt = prompt[-(context - longest) :]
    measured = [i for i, c in enumerate(continuations) if c]
    for start in range(0, len(measured), batch_size):
        rows = measured[start : start + batch_size]
        width = max(len(continuations[i]) for i in rows)
        targets = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        target_mask = torch.zeros_like(targets, dtype=torch.bool)
        for row, i in enumerate(rows):
            targets[row, : len(continuations[i])] = torch.tensor(continuations[i])
            target_mask[row, : len(continuations[i])] = True
        targets, target_mask = targets.to(device), target_mask.to(device)

        prompt_ids = torch.tensor([prompt], device=device)
        prompt_mask = torch.ones_like(prompt_ids)
        out = model(**architecture.padded_inputs(prompt_ids, prompt_mask), use_cache=True, logits_to_keep=1)
        out.cache.batch_repeat_interleave(len(rows))
        # right padding after the continuation cannot reach back into it: attention is causal
        mask = torch.cat([prompt_mask.expand(len(rows), -1), torch.ones_like(targets)], dim=1)
        inputs = {"input_ids": targets, "attention_mask": mask}
        if architecture.takes_position_ids:
            inputs["position_ids"] = torch.arange(len(prompt), len(prompt) + width, device=device).expand(len(rows), -1)
        logits = model(**inputs, cache=out.cache, use_cache=False).logits
        # the prompt's last position predicts the first continuation token; position t predicts token t + 1
        predictions = torch.cat([out.logits[:, -1:].expand(len(rows), -1, -1), logits[:, :-1]], dim=1).float()
        nll = nn.functional.cross_entropy(predictions.transpose(1, 2), targets, reduction="none")
        mean_nll = (nll * target_mask).sum(dim=1) / target_mask.sum(dim=1)
        for i, value in zip(rows, mean_nll.tolist()):
            results[i] = math.exp(value)
    return results
