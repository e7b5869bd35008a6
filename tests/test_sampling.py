
import pytest
import torch

from destein_pl import SteeredCausalLM
from destein_pl.evaluation.perplexity import continuation_nll
from destein_pl.evaluation.sampling import SamplingSettings, nucleus_choice, row_seed, sample
from tests.conftest import FAMILIES, tiny_model


def test_the_defaults_are_the_papers_protocol():
    assert SamplingSettings() == SamplingSettings(top_p=0.9, temperature=1.0, num_samples=25, max_new_tokens=20,
                                                  seed=0, max_prompt_tokens=512)
    edges = SamplingSettings(top_p=1.0, temperature=0.0, max_prompt_tokens=None)  # whole nucleus; greedy; no cut
    assert (edges.top_p, edges.temperature, edges.max_prompt_tokens) == (1.0, 0.0, None)


@pytest.mark.parametrize("option, value, message", [
    ("top_p", 0.0, r"top_p must be in \(0, 1\] \(the nucleus mass\), got 0.0"),
    ("top_p", 1.01, r"top_p must be in \(0, 1\]"), ("top_p", float("nan"), r"top_p must be in \(0, 1\]"),
    ("temperature", -1.0, r"temperature must be a finite number >= 0 \(0 is greedy\), got -1.0"),
    ("temperature", float("nan"), "temperature must be a finite number >= 0"),
    ("temperature", float("inf"), "temperature must be a finite number >= 0"),
    ("num_samples", 0, "num_samples must be at least 1, got 0"),
    ("max_new_tokens", 0, "max_new_tokens must be at least 1, got 0"),
    ("max_prompt_tokens", 0, r"max_prompt_tokens must be at least 1 \(or None"),
])
def test_settings_that_would_give_meaningless_text_are_refused(option, value, message):
    """`top_p=0` would empty the nucleus and pick the least likely token; every command checks here."""
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**{option: value})


def test_more_samples_per_prompt_than_one_batch_can_hold_are_refused_in_one_line(capsys):
    from tests.conftest import refusal

    assert SamplingSettings(num_samples=1000).num_samples == 1000
    with pytest.raises(ValueError, match=r"num_samples must be from 1 to 1000 \(one prompt's continuations"):
        SamplingSettings(num_samples=1001)
    assert refusal(capsys, "generate", "--prompt", "hi", "--sampling.num_samples", "1000000000") == (
        "num_samples must be from 1 to 1000 (one prompt's continuations are generated in one batch), got 1000000000")


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
    greedy = SamplingSettings(num_samples=2, max_new_tokens=6, temperature=0)
    ours = sample(steered, steered.architecture, prompts, ["a", "b"], greedy, pad_token_id=0, eos_token_ids=[]).tokens
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
    two, three = (SamplingSettings(num_samples=n, max_new_tokens=10) for n in (2, 3))
    alone = sample(steered, arch, [prompt], ["p"], two, 0, [2], width=8).tokens
    mixed = sample(steered, arch, [other, prompt, other], ["o", "p", "q"], three, 0, [2], width=8).tokens
    assert mixed[1][:2] == alone[0]
    assert alone[0][0] != alone[0][1]  # different seeds, different samples
    seeded = sample(steered, arch, [prompt], ["p"], SamplingSettings(num_samples=2, max_new_tokens=10, seed=1), 0,
                    [2], width=8).tokens
    assert seeded != alone  # the seed is part of every row's seed


GREEDY = SamplingSettings(num_samples=1, max_new_tokens=12, temperature=0)


def greedy_row(steered, prompt=(5, 6, 7), settings=GREEDY, eos=(), **options):
    return sample(steered, steered.architecture, [list(prompt)], ["p"], settings, 0, eos, **options).tokens[0][0]


def test_eos_ends_a_row():
    steered = SteeredCausalLM(tiny_model("gpt2"))
    full = greedy_row(steered)
    stop = full[4]
    assert greedy_row(steered, eos=[stop]) == full[: full.index(stop)]


def test_a_stop_token_ends_a_row_and_is_kept():
    steered = SteeredCausalLM(tiny_model("gpt2"))
    full = greedy_row(steered)
    stop = full[4]
    assert greedy_row(steered, stop_token_ids={stop}) == full[: full.index(stop) + 1]


def test_limits_cut_each_prompts_rows():
    steered = SteeredCausalLM(tiny_model("llama"))
    prompts, keys, settings = [[5, 6, 7], [9, 10]], ["a", "b"], SamplingSettings(num_samples=2, max_new_tokens=8)
    full = sample(steered, steered.architecture, prompts, keys, settings, 0, []).tokens
    limited = sample(steered, steered.architecture, prompts, keys, settings, 0, [], limits=[3, 20]).tokens
    assert limited == [[row[:3] for row in full[0]], full[1]]  # a limit beyond max_new_tokens is max_new_tokens
    with pytest.raises(ValueError, match="limits must hold one number >= 1 per prompt"):
        sample(steered, steered.architecture, prompts, keys, settings, 0, [], limits=[3])


def test_banned_tokens_are_never_chosen():
    steered = SteeredCausalLM(tiny_model("llama"))
    full = greedy_row(steered)
    first, second = full[0], full[1]
    assert greedy_row(steered, bans={(): {first}})[0] != first  # never
    after = greedy_row(steered, bans={(first,): {second}})
    assert after[0] == first and after[1] != second  # only right after `first`
    assert greedy_row(steered, bans={(second,): {first}})[:2] == full[:2]  # `second` does not come before `first`
    sampled = SamplingSettings(num_samples=6, max_new_tokens=12, temperature=2.0)
    rows = sample(steered, steered.architecture, [[5, 6, 7]], ["p"], sampled, 0, [], bans={(): set(full)}).tokens
    assert not set(full) & {t for row in rows[0] for t in row}


def test_greedy_first_makes_each_prompts_first_sample_greedy():
    steered = SteeredCausalLM(tiny_model("llama"))
    prompts, keys = [[5, 6, 7], [9, 10]], ["a", "b"]
    sampled = SamplingSettings(num_samples=3, max_new_tokens=8, temperature=1.5)
    plain = sample(steered, steered.architecture, prompts, keys, sampled, 0, []).tokens
    mixed = sample(steered, steered.architecture, prompts, keys, sampled, 0, [], greedy_first=True).tokens
    for p, prompt in enumerate(prompts):
        assert mixed[p][0] == greedy_row(steered, prompt, SamplingSettings(num_samples=1, max_new_tokens=8,
                                                                            temperature=0))
        assert mixed[p][1:] == plain[p][1:]  # the others draw as they would anyway
    assert mixed[0][0] != plain[0][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_of_the_samples_give_the_models_perplexity(family):
    model = tiny_model(family)
    arch = SteeredCausalLM(model).architecture
    prompt = [5, 9, 14, 3]
    result = sample(model, arch, [prompt], ["p"], SamplingSettings(num_samples=5, max_new_tokens=7), 0, [2], width=6)
    (rows,), (log_probs,) = result.tokens, result.log_probs
    assert [len(r) for r in log_probs] == [len(r) for r in rows]
    reference = continuation_nll(model, arch, prompt, rows, 0)
    for lp, expected in zip(log_probs, reference):
        assert (expected is None) if not lp else -sum(lp) / len(lp) == pytest.approx(expected, rel=1e-5)
    assert any(reference)


def test_a_prompt_without_tokens_is_refused_by_its_id(tiny_steered):
    from destein_pl.evaluation.prompts import Prompt
    from destein_pl.evaluation.sampling import PromptSampler

    sampler = PromptSampler(tiny_steered, SamplingSettings(num_samples=1, max_new_tokens=2))
    with pytest.raises(ValueError, match=r"prompt 'rtp:7' has no tokens \(text ''\)"):
        sampler([Prompt("rtp:1", "hello"), Prompt("rtp:7", "")])


def test_the_candidate_nucleus_picks_what_sorting_the_whole_vocabulary_picks(monkeypatch):
    """Peaked rows are decided on the candidates, flat rows and ties across the candidates' edge by a full sort;
    every row gets the token of the definition."""
    from destein_pl.evaluation import sampling

    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", 8)
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(40, 64, generator=g) * 6
    flat = torch.randn(40, 64, generator=g) * 0.3
    ties = torch.randn(40, 64, generator=g).round() * 3  # many equal logits, also at the 8th place
    logits = torch.cat([peaked, flat, ties])
    u = torch.rand(len(logits), generator=g)
    for top_p in (0.3, 0.9, 1.0):
        for temperature in (0.7, 1.0):
            assert torch.equal(nucleus_choice(logits, u, top_p, temperature),
                               sampling.full_nucleus_choice(logits, u, top_p, temperature))
    probs = torch.softmax(peaked, dim=-1).sort(dim=-1, descending=True).values
    assert ((probs.cumsum(-1) - probs < 0.9).sum(-1) <= 8).any()  # some rows were decided on the candidates


@pytest.mark.slow
def test_the_embedded_model_samples_the_same_with_the_candidate_nucleus(monkeypatch):
    from destein_pl import load_base_model
    from destein_pl.evaluation import sampling

    model, tokenizer = load_base_model("smollm2-135m")  # its own copy: the session's may be wrapped already
    steered = SteeredCausalLM(model, tokenizer)
    prompts = [tokenizer(t)["input_ids"] for t in ("You are such a stupid", "The weather today is")]
    settings = SamplingSettings(num_samples=4, max_new_tokens=8)

    def draw():
        return sample(steered, steered.architecture, prompts, ["a", "b"], settings, tokenizer.pad_token_id,
                      [tokenizer.eos_token_id])

    fast = draw()
    monkeypatch.setattr(sampling, "nucleus_choice", sampling.full_nucleus_choice)
    assert draw() == fast


def test_tokens_do_not_depend_on_whether_log_probs_are_asked_for():
    steered = SteeredCausalLM(tiny_model("llama"))
    prompts, settings = [[5, 6, 7], [8, 9]], SamplingSettings(num_samples=3, max_new_tokens=5)
    with_them = sample(steered, steered.architecture, prompts, ["a", "b"], settings, 0, [])
    without = sample(steered, steered.architecture, prompts, ["a", "b"], settings, 0, [], log_probs=False)
    assert without.tokens == with_them.tokens and without.log_probs is None and with_them.log_probs is not None
