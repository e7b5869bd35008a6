"""Evaluation as a Lightning test: split invariance, resume, and a metric that moves with steering."""

import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from destein_pl.evaluation.config import EvaluationConfig
from destein_pl.evaluation.prompts import PromptsConfig
from destein_pl.evaluation.scorers import ToxicityScorer
from destein_pl.files import read_jsonl as read_records
from tests.conftest import (
    RTP100,
    SHARED_DATA,
    evaluate_small,
    generations,
    metrics,
    reference_perplexity,
    run_test,
    save_tiny_model_dir,
    small_sampling,
)


def test_results_do_not_depend_on_batch_size(calibrated, tiny_llama_dir, tmp_path):
    _, ckpt_dir = calibrated
    ckpt = ckpt_dir / "tiny.ckpt"
    one = run_test(tiny_llama_dir, tmp_path / "b1", batch_size=1, ckpt=ckpt)
    four = run_test(tiny_llama_dir, tmp_path / "b4", batch_size=4, ckpt=ckpt)
    for alpha in (0.0, 1.0):
        assert generations(tmp_path / "b1", alpha) == generations(tmp_path / "b4", alpha)
    assert metrics(one) == metrics(four)
    records = read_records(tmp_path / "b4" / "alpha_1" / "generations.jsonl")
    assert [r["index"] for r in records] == list(range(6))
    assert all(len(r["continuations"]) == len(r["toxicity"]) == len(r["perplexity"]) == 3 for r in records)
    assert one["runs"][0]["counts"]["prompts"]["all"] == 6
    # the steered continuations differ from the base ones: the checkpoint's steering is applied
    assert generations(tmp_path / "b1", 0.0) != generations(tmp_path / "b1", 1.0)


class Interrupt(L.Callback):
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 1:
            raise RuntimeError("interrupted")


def test_resume_after_an_interruption_gives_the_same_results(calibrated, tiny_llama_dir, tmp_path):
    _, ckpt_dir = calibrated
    ckpt = ckpt_dir / "tiny.ckpt"
    whole = run_test(tiny_llama_dir, tmp_path / "whole", batch_size=2, ckpt=ckpt)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_test(tiny_llama_dir, tmp_path / "cut", batch_size=2, ckpt=ckpt, callbacks=[Interrupt()])
    assert len(read_records(tmp_path / "cut" / "alpha_0" / "generations.jsonl")) == 4
    resumed = run_test(tiny_llama_dir, tmp_path / "cut", batch_size=2, ckpt=ckpt)
    assert [(r["resumed_prompts"], r["generated_prompts"]) for r in resumed["runs"]] == [(4, 2), (4, 2)]
    assert metrics(resumed) == metrics(whole)
    for alpha in (0.0, 1.0):
        assert generations(tmp_path / "cut", alpha) == generations(tmp_path / "whole", alpha)
    with pytest.raises(ValueError, match="other settings"):
        run_test(tiny_llama_dir, tmp_path / "cut", batch_size=2, ckpt=ckpt,
                 sampling=small_sampling(max_new_tokens=7))


class FlagToken(ToxicityScorer):
    """Toxicity 1 for a text containing the chosen token, else 0."""

    name = "flag-token"

    def __init__(self, tokenizer, token_id):
        self.tokenizer, self.token_id = tokenizer, token_id

    def _score(self, texts):
        return [float(self.token_id in self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def test_steering_away_from_a_flagged_token_lowers_emt(tiny_llama_dir, tmp_path):
    """A tiny model made to like token X, and a vector that lowers X's logit: the whole pipeline
    (sampling, scoring, metrics) must show lower EMT when steered."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    x = tokenizer(" hello", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        batch = tokenizer(["a b c", "the cat", "you are", "one two three four"], return_tensors="pt", padding=True)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1][:, -1]  # after the final norm
        direction = hidden.mean(0)
        model.lm_head.weight[x] = 12 * direction / direction.norm() ** 2  # logit of X near 12: sampled often
    liking = tmp_path / "likes-x"
    model.save_pretrained(liking)
    tokenizer.save_pretrained(liking)

    w_o = model.model.layers[-1].self_attn.o_proj.weight  # [hidden, heads * head_dim]
    push = -(w_o.T @ model.lm_head.weight[x]).detach()  # lowers X's logit through the last layer's projection
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    vectors = torch.zeros(layers, heads, push.numel() // heads)
    vectors[-1] = (push / push.norm()).view(heads, -1)
    steering = (vectors, torch.ones(layers, heads))

    results = run_test(liking, tmp_path / "eval", alphas=(0.0, 30.0), steering=steering, n=8,
                       sampling=small_sampling(num_samples=5), scorer=FlagToken(tokenizer, x))
    emt = {r["alpha"]: r["metrics"]["all"]["emt"] for r in results["runs"]}
    assert emt[0.0] >= 0.5
    assert emt[30.0] < emt[0.0] - 0.3


def test_a_separate_perplexity_model_measures_the_continuations(tiny_llama_dir, tmp_path):
    """The paper configs' branch: perplexity under another model (here a GPT-2 judging a LLaMA's text)."""
    from destein_pl import load_base_model

    judge_dir = save_tiny_model_dir("gpt2", tmp_path / "judge")
    results = run_test(tiny_llama_dir, tmp_path / "eval", n=2, alphas=(0.0,), perplexity_model=str(judge_dir))
    judge, tokenizer = load_base_model(judge_dir)
    records = read_records(tmp_path / "eval" / "alpha_0" / "generations.jsonl")
    measured = 0
    for record in records:
        prompt = tokenizer(record["prompt"])["input_ids"]
        for text, value in zip(record["continuations"], record["perplexity"]):
            continuation = tokenizer(text, add_special_tokens=False)["input_ids"]
            if continuation:
                assert value == pytest.approx(reference_perplexity(judge, prompt, continuation), rel=1e-4)
                measured += 1
    assert measured > 0
    settings = json.loads((tmp_path / "eval" / "alpha_0" / "settings.json").read_text())
    assert settings["perplexity_model"] == str(judge_dir)
    assert results["runs"][0]["metrics"]["all"]["ppl"] > 0


# ---- plain-Python runs (`evaluate`) ----------------------------------------------------------------------------


def write_prompts(path, rows):
    """A plain JSONL prompts file of `{"id", "text", "toxicity"}` rows."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def strict_json(path):
    """A JSON file parsed without the NaN/Infinity extension, so that a bare NaN is an error."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.mark.parametrize("option, value, accepted", [
    ("perplexity_batch_size", 0, "at least 1"), ("max_batch_tokens", -3, "at least 1"),
    ("alphas", [0.0, float("nan")], "finite"), ("alphas", [float("inf")], "finite"),
    ("on_changed_prompts", "ignore", "'refuse' or 'regenerate'"),
])
def test_an_evaluation_option_out_of_range_names_itself_and_its_range(option, value, accepted):
    with pytest.raises(ValueError, match=rf"evaluation\.{option} must .*{accepted}"):
        EvaluationConfig(**{option: value})


def test_a_subset_without_prompts_is_null_in_strict_json(tiny_steered, tmp_path):
    """Only non-toxic prompts: the toxic subset's metrics have no value, which results.json holds as null."""
    from destein_pl import load_prompts

    prompts = load_prompts(PromptsConfig(str(SHARED_DATA / "rtp" / "rtp_nontoxic_1k.jsonl"), n=2))
    evaluate_small(tiny_steered, prompts, tmp_path)
    for path in (tmp_path / "results.json", tmp_path / "alpha_0" / "results.json"):
        data = strict_json(path)
        run = data["runs"][0] if "runs" in data else data
        assert run["counts"]["prompts"] == {"toxic": 0, "nontoxic": 2, "all": 2}
        assert set(run["metrics"]["toxic"].values()) == {None}
        assert None not in run["metrics"]["all"].values()
    assert "| toxic |" not in (tmp_path / "results.md").read_text()


@pytest.fixture(scope="module")
def long_context_llama(tiny_llama_dir, tmp_path_factory):
    """The tiny LLaMA with an 8,192-token context, so that a 5,000-token prompt fits the model: only
    `max_prompt_tokens` then keeps it from sizing every batch."""
    from transformers import AutoConfig, AutoTokenizer

    from destein_pl import SteeredCausalLM, load_base_model

    folder = tmp_path_factory.mktemp("long-llama")
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.max_position_embeddings = 8192
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, config=config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return SteeredCausalLM(*load_base_model(folder))


def record_batches(steered):
    """Record (rows, tokens) of every forward pass of the wrapped model; returns the list and the hook handle."""
    shapes = []

    def hook(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    return shapes, steered.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_a_5000_token_prompt_is_cut_before_it_sizes_the_batch(long_context_llama, tmp_path, caplog):
    from destein_pl import Evaluator, load_prompts

    tokenizer = long_context_llama.tokenizer
    long_text = "The weather was nice and everyone went outside to play. " * 500
    assert len(tokenizer(long_text)["input_ids"]) > 5000
    source = write_prompts(tmp_path / "prompts.jsonl", [{"id": "long", "text": long_text, "toxicity": 0.1},
                                                         {"id": "short", "text": "You are such a", "toxicity": 0.9}])
    prompts = load_prompts(PromptsConfig(str(source)))
    evaluator = Evaluator(long_context_llama, EvaluationConfig(output_dir=str(tmp_path / "eval"), alphas=[0.0],
                                                               sampling=small_sampling()), verbose=False)
    evaluator.start(prompts)
    assert evaluator.sampler.width == 512  # checked before generating: uncut, the run would pad to 5,000+ tokens
    shapes, hook = record_batches(long_context_llama)
    try:
        with caplog.at_level("WARNING", logger="destein_pl.evaluation.sampling"):
            evaluator.add(prompts, [0, 1])
            results = evaluator.finish()
    finally:
        hook.remove()
    assert max(tokens for _, tokens in shapes) == 512  # the widest forward pass: the cut prompt's prefill
    assert "prompt long has" in caplog.text and "cut from the left to 512 (max_prompt_tokens)" in caplog.text
    assert "prompt short" not in caplog.text
    assert results["cut_prompts"] == 1 and strict_json(tmp_path / "eval" / "results.json")["cut_prompts"] == 1
    assert results["runs"][0]["counts"]["prompts"]["all"] == 2


@pytest.mark.parametrize("budget", [1, 700, 65536])
def test_a_generation_batch_stays_within_max_batch_tokens(tiny_steered, tmp_path, budget):
    """Checked on the batches the model is given: rows x (width + new tokens) of every decoding step."""
    from destein_pl import Evaluator, load_prompts
    from destein_pl.evaluation.sampling import MIN_ROWS

    prompts = load_prompts(PromptsConfig(str(RTP100), n=6))
    config = EvaluationConfig(output_dir=str(tmp_path), alphas=[0.0], max_batch_tokens=budget,
                              sampling=small_sampling())
    evaluator = Evaluator(tiny_steered, config, verbose=False)
    evaluator.start(prompts)
    width, new = evaluator.sampler.width, config.sampling.max_new_tokens
    chunks = evaluator._chunks(prompts)
    assert [p for chunk in chunks for p in chunk] == prompts and all(chunks)
    per_prompt = max(config.sampling.num_samples, MIN_ROWS) * (width + new)
    assert all(len(c) == 1 or len(c) * per_prompt <= budget for c in chunks)
    shapes, hook = record_batches(tiny_steered)
    try:
        evaluator.add(prompts, list(range(len(prompts))))
    finally:
        hook.remove()
    steps = [rows for rows, tokens in shapes if tokens == 1]
    assert steps and max(steps) * (width + new) <= max(budget, per_prompt)
    assert len([s for s in shapes if s[1] > 1]) == len(chunks)  # one prefill per chunk


def test_an_evaluation_of_mostly_empty_continuations_is_flagged(tiny_llama_dir, tmp_path):
    """A model that ends every text at once scores as non-toxic: results.json and results.md say it is empty."""
    from destein_pl import SteeredCausalLM, load_base_model, load_prompts

    model, tokenizer = load_base_model(tiny_llama_dir)
    head = model.lm_head
    ends_at_once = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        ends_at_once.weight.copy_(head.weight)
        ends_at_once.bias.zero_()
        ends_at_once.bias[model.config.eos_token_id] = 1e4
    model.lm_head = ends_at_once
    prompts = load_prompts(PromptsConfig(str(RTP100), n=2))
    results = evaluate_small(SteeredCausalLM(model, tokenizer), prompts, tmp_path)
    run = results["runs"][0]
    assert run["counts"]["empty_continuations"] == run["counts"]["continuations"] == 6
    assert results["warnings"] == run["warnings"] and "alpha=0: 6 of 6 continuations are empty" in run["warnings"][0]
    assert "**Warning:** alpha=0: 6 of 6 continuations are empty" in (tmp_path / "results.md").read_text()


def test_results_record_the_steering_they_ran_with(tiny_llama_dir, tmp_path):
    from destein_pl import SteeredCausalLM, load_base_model, load_prompts
    from destein_pl.steering.gating import GateSettings
    from destein_pl.steering.probes import Probes

    steered = SteeredCausalLM(*load_base_model(tiny_llama_dir))
    g = torch.Generator().manual_seed(0)
    shape = (steered.num_layers, steered.num_heads)
    steered.set_steering(torch.randn(*shape, steered.head_dim, generator=g), torch.rand(*shape, generator=g), 0.5)
    steered.set_gate(GateSettings("smooth", threshold=0.4),
                     Probes(torch.randn(*shape, steered.head_dim, generator=g), torch.zeros(shape), torch.rand(shape)))
    prompts = load_prompts(PromptsConfig(str(RTP100), n=2))
    results = evaluate_small(steered, prompts, tmp_path)
    assert results["runs"][0]["counts"]["empty_continuations"] == 0 and results["warnings"] == []
    recorded = results["steering"]
    assert (recorded["fusion"], recorded["alpha"], recorded["gate"]["mode"], recorded["gate"]["threshold"]) == \
        ("paper", 0.5, "smooth", 0.4)
    assert recorded["digest"] == steered.steering_digest()
    assert json.loads((tmp_path / "alpha_0" / "results.json").read_text())["steering"] == recorded
    # the digest covers the gate's probes: other probes are other steering
    steered.set_gate(GateSettings("smooth", threshold=0.4), Probes(torch.randn(*shape, steered.head_dim,
                                                                               generator=g), torch.zeros(shape),
                                                                   torch.rand(shape)))
    assert steered.steering_digest() != recorded["digest"]


def test_a_steered_alpha_over_zero_steering_is_flagged(tiny_steered, tmp_path):
    """`evaluate` at alpha 1 with no steering set: the continuations are the base model's, and the results say so."""
    from destein_pl import load_prompts

    assert not tiny_steered.vectors.any()
    results = evaluate_small(tiny_steered, load_prompts(PromptsConfig(str(RTP100), n=2)), tmp_path,
                             alphas=[0.0, 1.0])
    flag = ("alpha=1: the steering vectors are all zero (none set or loaded, and no method), so these are the base "
            "model's continuations, not a steered run")
    assert results["steering"]["zero_steering"] is True and results["warnings"] == [flag]
    assert [r["warnings"] for r in results["runs"]] == [[], [flag]]
    assert f"**Warning:** {flag}" in (tmp_path / "results.md").read_text()
    base, steered = (read_records(tmp_path / f"alpha_{a}" / "generations.jsonl") for a in (0, 1))
    assert [r["continuations"] for r in base] == [r["continuations"] for r in steered]
