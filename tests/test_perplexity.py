import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from destein_pl import architecture_for
from destein_pl.evaluation.perplexity import continuation_nll, perplexity, tokenize_pair
from tests.conftest import FAMILIES, tiny_model


def reference_perplexity(model, prompt, continuation):
    """transformers' own loss on the whole unpadded sequence, with the prompt masked out of the labels."""
    ids = torch.tensor([prompt + continuation])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=labels).loss.item())


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_cache_equals_whole_sequence_loss(family):
    model = tiny_model(family)
    prompt = [5, 9, 14, 3, 22, 7]
    continuations = [[11, 12, 13, 14], [40], [], [7, 8, 9, 10, 11, 12, 50]]
    result = [perplexity(v) for v in continuation_nll(model, architecture_for(model.config), prompt, continuations,
                                                      pad_token_id=0, batch_size=2)]
    assert result[2] is None  # an empty continuation has no perplexity
    for value, continuation in zip(result, continuations):
        if continuation:
            assert value == pytest.approx(reference_perplexity(model, prompt, continuation), rel=1e-5)


def test_texts_are_tokenized_apart_and_long_prompts_cut(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt, (continuation,) = tokenize_pair(tokenizer, "You are such a", [" stupid person"])
    assert continuation == tokenizer(" stupid person", add_special_tokens=False)["input_ids"]
    long_prompt = prompt * model.config.max_position_embeddings
    (value,) = map(perplexity, continuation_nll(model, architecture_for(model.config), long_prompt, [continuation], 2))
    assert value == pytest.approx(
        reference_perplexity(model, long_prompt[-(model.config.max_position_embeddings - len(continuation)):],
                             continuation), rel=1e-5)
