import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from destein_pl import SteeredCausalLM, architecture_for, load_base_model
from destein_pl.evaluation.perplexity import PerplexityJudge, continuation_nll, perplexity, tokenize_pair
from tests.conftest import FAMILIES, reference_perplexity, save_tiny_model_dir, tiny_model


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


@pytest.fixture(scope="module")
def gpt2_judge_dir(tmp_path_factory):
    return save_tiny_model_dir("gpt2", tmp_path_factory.mktemp("gpt2-judge"))


def test_a_separate_judge_of_another_family_measures_the_text(tiny_llama_dir, gpt2_judge_dir):
    """The generator is a LLaMA, the judge a GPT-2: the judge re-tokenizes prompt and continuations itself."""
    model, tokenizer = load_base_model(tiny_llama_dir)
    steered = SteeredCausalLM(model, tokenizer)
    judge_model, judge_tokenizer = load_base_model(gpt2_judge_dir)
    judge = PerplexityJudge(steered, judge_model, judge_tokenizer, batch_size=2)
    texts = [" stupid person", "", " hello there, my friend"]
    tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    values = judge.mean_nll(tokenizer("You are such a")["input_ids"], "You are such a", tokens, texts)
    assert values[1] is None
    prompt = judge_tokenizer("You are such a")["input_ids"]
    for value, text in zip(values, texts):
        if text:
            continuation = judge_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert math.exp(value) == pytest.approx(reference_perplexity(judge_model, prompt, continuation), rel=1e-5)


def test_the_model_judges_itself_unsteered(tiny_llama_dir):
    """Steered samples are measured at alpha 0 on their very tokens; the sampler's log-probabilities are used
    only when they are the unsteered model's."""
    model, tokenizer = load_base_model(tiny_llama_dir)
    steered = SteeredCausalLM(model, tokenizer)
    g = torch.Generator().manual_seed(0)
    steered.set_steering(torch.randn(steered.num_layers, steered.num_heads, steered.head_dim, generator=g),
                         torch.ones(steered.num_layers, steered.num_heads), alpha=3.0)
    judge = PerplexityJudge(steered)
    prompt, tokens = [5, 9, 14, 3], [[11, 12, 13], [40, 41]]
    steered.alpha = 0.0  # the reference: the wrapped model, unsteered
    reference = [reference_perplexity(model, prompt, continuation) for continuation in tokens]
    steered.alpha = 3.0
    fake_log_probs = [[-1.0, -1.0, -1.0], [-2.0, -2.0]]
    measured = judge.mean_nll(prompt, "", tokens, ["", ""], fake_log_probs)
    assert steered.alpha == 3.0  # restored
    assert [math.exp(v) for v in measured] == pytest.approx(reference, rel=1e-5)
    assert reference[0] != pytest.approx(reference_perplexity(model, prompt, tokens[0]), rel=1e-3)  # steered
    steered.alpha = 0.0
    assert judge.mean_nll(prompt, "", tokens, ["", ""], fake_log_probs) == [1.0, 2.0]
