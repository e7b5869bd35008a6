import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from destein_pl import architecture_for
from destein_pl.perplexity import continuation_perplexities


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def reference_perplexity(model, tokenizer, prompt, continuation):
    """transformers' own loss on the unpadded sequence, with the prompt's tokens masked out of the labels."""
    source = tokenizer(prompt)["input_ids"]
    target = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([source + target])
    labels = ids.clone()
    labels[0, : len(source)] = -100
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=labels).loss.item())


def test_batched_left_padded_perplexity_equals_unpadded_loss(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = ["You are such a", "The weather in the mountains today is", "Hi", "Once"]
    continuations = [" stupid person who never listens", " sunny", " there, friend!", ""]
    result = continuation_perplexities(model, architecture_for(model.config), tokenizer, prompts, continuations,
                                       batch_size=2)
    assert result[3] is None  # an empty continuation has no perplexity
    for i in range(3):
        assert result[i] == pytest.approx(reference_perplexity(model, tokenizer, prompts[i], continuations[i]), rel=1e-5)


def test_long_prompt_is_cut_from_the_left(tiny_llama):
    model, tokenizer = tiny_llama
    context = model.config.max_position_embeddings
    long_prompt = "word " * (2 * context)
    (value,) = continuation_perplexities(model, architecture_for(model.config), tokenizer, [long_prompt], [" end"])
    assert value is not None and math.isfinite(value)
