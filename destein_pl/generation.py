"""Batched continuation of prompts with a steered model."""

from __future__ import annotations

import torch

from destein_pl.steering import SteeredCausalLM


def continue_prompts(
    steered: SteeredCausalLM,
    prompts: list[str],
    max_new_tokens: int = 20,
    do_sample: bool = False,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Continuations (new text only) of a left-padded batch of prompts, with the model's current steering."""
    tokenizer = steered.tokenizer
    if tokenizer is None:
        raise ValueError("the SteeredCausalLM was built without a tokenizer; pass one to continue text prompts")
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(steered.device)
    sampling = {"do_sample": True, "top_p": top_p, "temperature": temperature, "top_k": 0} if do_sample else {
        "do_sample": False, "top_p": None, "top_k": None, "temperature": None}
    torch.manual_seed(seed)
    with torch.no_grad():
        output = steered.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
