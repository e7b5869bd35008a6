
import pytest
import torch

from destein_pl import SteeredCausalLM
from destein_pl.evaluation.perplexity import continuation_nll
from destein_pl.evaluation.sampling import nucleus_choice, row_seed, sample
from tests.conftest import FAMILIES, tiny_model


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].repeat(5, 1)
    # kept: 0.5 + 0.3 < 0.9, so the third token joins; the fourth is outside. CDF of the kept mass (0.95):
    # [0.5, 0.8, 0.95]; u * 0.95 picks token 0 for u < 0.5/0.95, token 1 below 0.8/0.95, else token 2.
    u = torch.tensor([0.0, 0.52, 0.80, 0.85, 0.9999])
    assert nucleus_choice(logits, u, top_p=0.9, temperature=1.0).tolist() == [0, 0, 1, 2, 2]
    assert nucleus_choice(logits, u, top_p=0.9, temperature=0).tolist() == [0] * 5
    assert nucleus_choice(logits, u, top_p=1.0, temperature=1.0)[-1] == 3


def test_frequencies_follow_the_renormalised_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits, 0)
    u = (torch.arange(10_000) + 0.5) / 10_000
    picks = nucleus_choice(logits[None].repeat(10_000, 1), u, top_p=0.8, temperature=1.0)
    kept = probs[: int((probs.cumsum(0) - probs < 0.8).sum())]
    expected = kept / kept.sum()
    observed = torch.bincount(picks, minlength=5)[: len(kept)].float() / 10_000
    torch.testing.assert_close(observed, expected, atol=2e-4, rtol=0)


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, "a", 1) == row_seed(0, "a", 1)
    assert len({row_seed(s, p, i) for s in (0, 1) for p in ("a", "b") for i in range(3)}) == 12


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(family):
    steered = SteeredCausalLM(tiny_model(family))
    g = torch.Generator().manual_seed(0)
    steered.set_steering(torch.randn(steered.num_layers, steered.num_heads, steered.head_dim, generator=g),
                         torch.rand(steered.num_layers, steered.num_heads, generator=g), alpha=0.5)
    prompts = [[5, 9, 14, 3, 22], [7, 8]]
    ours = sample(steered, steered.architecture, prompts, [[1, 3], [2, 4]], max_new_tokens=6, pad_token_id=0,
                  eos_token_ids=[], temperature=0).tokens
    for (row, again), ids in zip(ours, prompts):
        assert row == again  # greedy: both samples alike
        x = torch.tensor([ids])
        reference = steered.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6,
                                     min_new_tokens=6, do_sample=False)
        assert row == reference[0, len(ids):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_samples_continuation_depends_only_on_its_seed(family):
    steered = SteeredCausalLM(tiny_model(family))
    arch = steered.architecture
    prompt, other = [5, 9, 14, 3], [40, 41, 42, 43, 44, 45, 46, 47]
    alone = sample(steered, arch, [prompt], [[11, 12]], 10, 0, [2], width=8).tokens
    mixed = sample(steered, arch, [other, prompt, other], [[99, 98, 97], [11, 12, 13], [96, 95, 94]], 10, 0, [2],
                   width=8).tokens
    assert mixed[1][:2] == alone[0]
    assert alone[0][0] != alone[0][1]  # different seeds, different samples


def test_eos_ends_a_row():
    steered = SteeredCausalLM(tiny_model("gpt2"))
    full = sample(steered, steered.architecture, [[5, 6, 7]], [[3]], 12, 0, [], temperature=0).tokens[0][0]
    stop = full[4]
    cut = sample(steered, steered.architecture, [[5, 6, 7]], [[3]], 12, 0, [stop], temperature=0).tokens[0][0]
    assert cut == full[: full.index(stop)]


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_of_the_samples_give_the_models_perplexity(family):
    model = tiny_model(family)
    arch = SteeredCausalLM(model).architecture
    prompt = [5, 9, 14, 3]
    result = sample(model, arch, [prompt], [[1, 2, 3, 4, 5]], 7, 0, [2], width=6)
    (rows,), (log_probs,) = result.tokens, result.log_probs
    assert [len(r) for r in log_probs] == [len(r) for r in rows]
    reference = continuation_nll(model, arch, prompt, rows, 0)
    for lp, expected in zip(log_probs, reference):
        assert (expected is None) if not lp else -sum(lp) / len(lp) == pytest.approx(expected, rel=1e-5)
    assert any(reference)
