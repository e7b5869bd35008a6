"""The one owner of perplexity: mean negative log-likelihood of continuations given their prompt.

Two judges exist. The model itself, unsteered (alpha 0), measures the very tokens it was given; when those tokens
were sampled unsteered, the sampler's own log-probabilities are already the answer and no forward pass is needed.
A separate language model (e.g. a larger one of the same family, as in the paper) measures the decoded text,
re-tokenized with its own tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from destein_pl.steering.architectures import Architecture, architecture_for
from destein_pl.steering.loading import device_map_for, load_base_model
from destein_pl.steering.model import SteeredCausalLM
from destein_pl.steering.sharding import drain, load_sharded


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, continuations: Sequence[str]
                  ) -> tuple[list[int], list[list[int]]]:
    """Token ids of a prompt and of its continuations, tokenized apart so each continuation keeps its own tokens."""
    return (tokenizer(prompt)["input_ids"],
            [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations])


def perplexity(mean_nll: float | None) -> float | None:
    """exp(mean negative log-likelihood); None stays None (nothing to measure)."""
    return None if mean_nll is None else math.exp(mean_nll)


@torch.no_grad()
def continuation_nll(
    model: nn.Module,
    architecture: Architecture,
    prompt: list[int],
    continuations: Sequence[list[int]],
    pad_token_id: int,
    batch_size: int = 32,
) -> list[float | None]:
    """Mean negative log-likelihood per token of each continuation given the prompt's tokens.

    The prompt is run once per batch of continuations and its KV cache shared by them. An empty continuation has
    none (None). A prompt too long for the context is cut from the left.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
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
            results[i] = value
    return results


class PerplexityJudge:
    """Measures continuations of one prompt: with the steered model itself at alpha 0 (`model=None`), or with a
    separate language model and its tokenizer.

    Args:
        steered: the model being evaluated (judges itself, unsteered, when no separate model is given).
        model: a separate judge, or None.
        tokenizer: the separate judge's tokenizer.
        batch_size: continuations per forward pass.
    """

    def __init__(self, steered: SteeredCausalLM, model: PreTrainedModel | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 64) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("a separate perplexity model needs its tokenizer (give both or neither)")
        if batch_size < 1:
            raise ValueError(f"perplexity batch_size must be at least 1, got {batch_size}")
        self.steered, self.model, self.tokenizer, self.batch_size = steered, model, tokenizer, batch_size
        self.architecture = None if model is None else architecture_for(model.config)

    @classmethod
    def load(cls, steered: SteeredCausalLM, name_or_path: str | None, dtype: str | None = None,
             batch_size: int = 64, mesh: DeviceMesh | None = None) -> PerplexityJudge:
        """The judge named by a config: None for the model itself, else a model loaded straight onto the steered
        model's device, or sharded over `mesh`'s processes (its forward passes are then collective: call
        `finish_calls()` after each batch of work)."""
        if name_or_path is None:
            return cls(steered, batch_size=batch_size)
        if mesh is not None:
            model, tokenizer = load_sharded(name_or_path, mesh, steered.device, dtype)
        else:
            model, tokenizer = load_base_model(name_or_path, dtype=dtype, device_map=device_map_for(steered.device))
        return cls(steered, model, tokenizer, batch_size)

    def finish_calls(self) -> None:
        """Wait, making empty calls, until every process has made its forward calls (a sharded model's are
        collective; see `destein_pl.steering.sharding`)."""
        drain(self.steered.model if self.model is None else self.model)

    def reads_log_probs(self) -> bool:
        """Whether `mean_nll` reads the sampler's log-probabilities at the model's current alpha (the model judges
        itself, unsteered), so that the sampler computes them only then."""
        return self.model is None and self.steered.alpha == 0

    def mean_nll(self, prompt_ids: list[int], prompt_text: str, tokens: Sequence[list[int]], texts: Sequence[str],
                 log_probs: Sequence[list[float]] | None = None) -> list[float | None]:
        """Mean negative log-likelihood of each continuation of one prompt.

        `tokens` and `log_probs` are what the sampler returned for `prompt_ids` with the steered model's current
        alpha, `texts` their decoded text. The sampler's log-probabilities are used when they are the judge's
        (the model itself, sampling unsteered); otherwise the judge runs a forward pass.
        """
        if self.model is not None:  # its own tokenizer: measure the texts
            prompt, continuations = tokenize_pair(self.tokenizer, prompt_text, texts)
            return continuation_nll(self.model, self.architecture, prompt, continuations,
                                    self.tokenizer.pad_token_id, self.batch_size)
        steered = self.steered
        if log_probs is not None and self.reads_log_probs():
            return [-sum(row) / len(row) if row else None for row in log_probs]
        alpha = steered.alpha
        steered.alpha = 0.0
        try:
            return continuation_nll(steered, steered.architecture, prompt_ids, tokens, steered.tokenizer.pad_token_id,
                                    self.batch_size)
        finally:
            steered.alpha = alpha
