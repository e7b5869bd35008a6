"""Baselines (`destein_pl.baselines`), each against an independent computation on a tiny model, and each keeping the
sampler's guarantees: alpha 0 is the base model exactly, batch 1 equals batch 4, a resumed run equals a whole one,
and 2 processes equal 1."""

import json
import subprocess
import sys

import pytest
import torch

from destein_pl import SteeredCausalLM, load_base_model
from destein_pl.baselines import ITI, ActAdd, DExperts, Prompting, SelfDetoxify, WordFilter, build_method
from destein_pl.baselines.word_filter import words_from_pairs
from destein_pl.evaluation.prompts import PromptsConfig, load_prompts
from destein_pl.evaluation.sampling import PromptSampler, end_token_ids, sample
from tests.conftest import (
    RTP100,
    SHARED_DATA,
    assert_same_generations,
    assert_same_metrics,
    evaluate_small,
    generations,
    metrics,
    reference_perplexity,
    small_sampling,
)

PAIRS = str(SHARED_DATA / "paradetox" / "paradetox.tsv")
LAST_K = 8


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(PromptsConfig(str(RTP100), n=6, seed=0))


def fresh(model_dir, method=None) -> SteeredCausalLM:
    steered = SteeredCausalLM(*load_base_model(model_dir))
    if method is not None:
        steered.set_method(method)
    return steered


def encoded(steered, texts):
    batch = steered.tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def last_k_mean(hidden, mask, k=LAST_K):
    """Each row's mean over its last k real positions, one row at a time (the independent computation)."""
    rows = []
    for h, m in zip(hidden, mask):
        real = m.nonzero()[:, 0][-k:]
        rows.append(h[real].double().mean(dim=0))
    return torch.stack(rows)


def pair_sides(m, cues):
    from destein_pl.baselines.pair_activations import pair_texts
    from destein_pl.calibration.pairs import PairsConfig

    return pair_texts(PairsConfig(source=PAIRS, m=m, cues=cues))


def test_actadd_adds_the_mean_residual_difference_at_its_layer_as_a_hand_hook_does(tiny_llama_dir):
    steered = fresh(tiny_llama_dir, ActAdd(pairs=PAIRS, m=6, layer=1))
    toxic, nontoxic = pair_sides(6, cues=True)
    base = fresh(tiny_llama_dir).model

    def residual(texts):  # hidden_states[l + 1] is decoder layer l's output (for every layer but the last)
        ids, mask = encoded(steered, texts)
        return last_k_mean(base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2], mask)

    with torch.no_grad():
        vector = (residual(nontoxic) - residual(toxic)).mean(dim=0)
    torch.testing.assert_close(steered.method.vectors[1].double(), vector, rtol=1e-4, atol=1e-5)

    ids, mask = encoded(steered, ["You are such a", "well, hello there my friend"])
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(steered(input_ids=ids, attention_mask=mask).logits, plain)  # alpha 0: the base model
        steered.alpha = 0.7
        handle = base.model.layers[1].register_forward_hook(lambda mod, args, out: out + 0.7 * vector.float())
        try:
            expected = base(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
        got = steered(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(expected, plain, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_iti_shifts_the_top_heads_by_alpha_sigma_along_the_mass_mean_direction(tiny_llama_dir):
    heads = 5
    steered = fresh(tiny_llama_dir, ITI(pairs=PAIRS, m=10, heads=heads))
    toxic, nontoxic = pair_sides(10, cues=False)
    base = fresh(tiny_llama_dir)
    num_heads, head_dim = base.num_heads, base.head_dim

    def per_head(texts):  # the o_proj input, by a hook of its own
        ids, mask = encoded(steered, texts)
        seen = {}
        handles = [layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(i, args[0])) for i, layer in enumerate(base.model.model.layers)]
        with torch.no_grad():
            base.model(input_ids=ids, attention_mask=mask)
        for handle in handles:
            handle.remove()
        return torch.stack([last_k_mean(seen[i], mask) for i in range(len(seen))], dim=1).view(
            len(texts), len(seen), num_heads, head_dim)

    tox, non = per_head(toxic), per_head(nontoxic)
    theta = non.mean(dim=0) - tox.mean(dim=0)
    unit = theta / theta.norm(dim=-1, keepdim=True)
    both = torch.cat([tox, non])
    sigma = torch.tensor([[(both[:, layer, head] @ unit[layer, head]).std().item() for head in range(num_heads)]
                          for layer in range(both.shape[1])], dtype=torch.float64)
    chosen = steered.head_weights.bool()
    assert int(chosen.sum()) == heads and set(steered.head_weights.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(steered.vectors.double(), sigma[..., None] * unit, rtol=1e-4, atol=1e-5)

    ids, mask = encoded(steered, ["You are such a", "well, hello there my friend"])
    offsets = [(2.0 * sigma[layer, :, None] * unit[layer] * chosen[layer, :, None]).reshape(-1).float()
               for layer in range(both.shape[1])]
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args, i=i: (args[0] + offsets[i],))
               for i, layer in enumerate(base.model.model.layers)]
    with torch.no_grad():
        expected = base.model(input_ids=ids, attention_mask=mask).logits
        steered.alpha = 2.0
        got = steered(input_ids=ids, attention_mask=mask).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_word_filter_never_completes_a_banned_word(tiny_llama_dir, prompts, tmp_path):
    settings = small_sampling(num_samples=4, max_new_tokens=8)
    base = fresh(tiny_llama_dir)
    seen = [t for p in PromptSampler(base, settings)(prompts).tokens for rows in p for t in rows]
    tokenizer = base.tokenizer
    # the base model's own most frequent whole-word tokens ("Ġword"), so that the filter has something to remove
    counts = {}
    for t in seen:
        piece = tokenizer.convert_ids_to_tokens(t)
        if piece.startswith("Ġ") and piece[1:].isalpha() and len(piece) > 3:
            counts[piece[1:]] = counts.get(piece[1:], 0) + 1
    banned = sorted(counts, key=lambda w: -counts[w])[:6]
    assert banned
    (tmp_path / "words.txt").write_text("# banned\n" + "\n".join(banned) + "\n")
    filtered = fresh(tiny_llama_dir, WordFilter(words=str(tmp_path / "words.txt")))
    filtered.alpha = 1.0
    for temperature in (0.0, 1.0):
        out = PromptSampler(filtered, small_sampling(num_samples=4, max_new_tokens=8, temperature=temperature))(
            prompts)
        for rows in out.tokens:
            for row in rows:
                for word in banned:
                    for spelling in (word, " " + word, " " + word.capitalize(), word.upper()):
                        ids = tokenizer(spelling, add_special_tokens=False)["input_ids"]
                        assert not any(row[i : i + len(ids)] == ids for i in range(len(row))), (word, row)
        for texts in out.texts:
            for text in texts:
                assert not set(text.split()) & set(banned), text


def test_the_default_word_list_is_what_the_rewrites_removed():
    pairs = [("you stupid idiot", "you are wrong"), ("stupid plan", "a bad plan"), ("what stupid luck", "bad luck"),
             ("an idiot", "someone"), ("bad idiot", "bad person")]
    assert words_from_pairs(pairs, min_count=2) == ["idiot", "stupid"]  # "bad" is on the non-toxic side too
    assert words_from_pairs(pairs, min_count=3) == ["idiot", "stupid"]
    assert words_from_pairs(pairs, min_count=4) == []


@pytest.mark.parametrize("chat", ["never", "auto"])
def test_the_prompt_prefix_is_applied_once_and_neither_scored_nor_judged(tiny_llama_dir, prompts, tmp_path, chat):
    method = Prompting(chat=chat)
    steered = fresh(tiny_llama_dir, method)
    prefix = method.prompt_prefix(steered)
    text = steered.tokenizer.decode(prefix)
    if chat == "auto":  # the real SmolLM2 tokenizer has a chat template: a system turn, then the assistant's
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    else:
        assert text == method.prefix
    results = evaluate_small(steered, prompts, tmp_path, alphas=[0.0, 1.0])
    records = [json.loads(line) for line in generations(tmp_path, 1.0).splitlines()]
    base_records = [json.loads(line) for line in generations(tmp_path, 0.0).splitlines()]
    settings = small_sampling()
    for record, prompt in zip(records, prompts):
        ids = steered.tokenizer(prompt.text)["input_ids"]
        expected = sample(steered.model, steered.architecture, [prefix + ids], [prompt.id], settings,
                          steered.tokenizer.pad_token_id, end_token_ids(steered.generation_config, steered.tokenizer),
                          width=PromptSampler(steered, settings).fix_width(prompts), log_probs=False)
        texts = steered.tokenizer.batch_decode(expected.tokens[0], skip_special_tokens=True)
        assert record["prompt"] == prompt.text and record["continuations"] == texts
        for continuation, tokens, ppl in zip(texts, expected.tokens[0], record["perplexity"]):
            assert text.strip() not in continuation
            if tokens:  # judged by the base model given the prompt alone
                assert ppl == pytest.approx(reference_perplexity(steered.model, ids, tokens), rel=1e-4)
    assert records != base_records
    assert results["steering"]["method"]["method"] == "prompting"


@pytest.fixture(scope="module")
def experts(tiny_llama_dir, tmp_path_factory):
    """Two tiny experts: the tiny LLaMA with its layers perturbed, one seed each, saved with its tokenizer."""
    folders = []
    for seed in (1, 2):
        model, tokenizer = load_base_model(tiny_llama_dir)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        folder = tmp_path_factory.mktemp(f"expert{seed}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def test_dexperts_combines_three_separate_forwards(tiny_llama_dir, experts, prompts):
    steered = fresh(tiny_llama_dir, DExperts(*experts))
    steered.alpha = 2.0
    settings = small_sampling(temperature=0.0, num_samples=1, max_new_tokens=5)
    got = PromptSampler(steered, settings)(prompts[:2]).tokens
    models = [fresh(tiny_llama_dir).model, *(load_base_model(e)[0] for e in experts)]
    for prompt, tokens in zip(prompts[:2], got):
        ids = steered.tokenizer(prompt.text)["input_ids"]
        expected = []
        with torch.no_grad():
            for _ in range(5):  # whole sequences, no cache, no padding
                inputs = torch.tensor([ids + expected])
                base, expert, anti = (m(input_ids=inputs).logits[0, -1].float() for m in models)
                expected.append(int((base + 2.0 * (expert - anti)).argmax()))
        assert tokens[0] == expected
    plain = PromptSampler(fresh(tiny_llama_dir), settings)(prompts[:2]).tokens
    assert plain != got


def test_self_detoxify_reverses_each_last_position_by_its_own_step_direction(tiny_llama_dir, prompts):
    """Greedy tokens against whole-sequence forwards without a cache: at step t the prefixed contexts give each
    layer's direction d_t, and every position from the prompt's last on is edited with the direction of its own step,
    by the formula written out here."""
    method = SelfDetoxify()
    steered = fresh(tiny_llama_dir, method)
    alpha, steps = 1.5, 4
    steered.alpha = alpha
    got = PromptSampler(steered, small_sampling(temperature=0.0, num_samples=1, max_new_tokens=steps))(prompts[:2])
    model = fresh(tiny_llama_dir).model
    projections = [layer.self_attn.o_proj for layer in model.model.layers]
    tokenizer, heads = steered.tokenizer, steered.num_heads

    def head_outputs(ids):
        seen = {}
        handles = [p.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0][0].double()))
                   for i, p in enumerate(projections)]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for handle in handles:
            handle.remove()
        return [seen[i] for i in range(len(projections))]  # per layer [T, H * D]

    negative = tokenizer(method.negative_prefix)["input_ids"]
    positive = tokenizer(method.positive_prefix)["input_ids"]
    ends = [o[-1].view(heads, -1) for o in head_outputs(negative)]

    def edit(v, d, n):
        v, d = v.view(heads, -1), d.view(heads, -1)
        cos = (v * n).sum(-1) / (v.norm(dim=-1) * n.norm(dim=-1))
        e = v - alpha * ((1 + d.norm(dim=-1)) ** 0.4 * (1 + cos.clamp(min=0)) ** 0.6)[:, None] * d
        return (e.reshape(-1) * v.norm() / e.norm()).float()

    for prompt, rows in zip(prompts[:2], got.tokens):
        ids = tokenizer(prompt.text)["input_ids"]
        directions, generated = [], []
        for _ in range(steps):
            neg = head_outputs(negative + ids + generated)
            pos = head_outputs(positive + ids + generated)
            directions.append([n[-1] - p[-1] for n, p in zip(neg, pos)])
            first = len(ids) - 1  # positions first.. are edited, each with its own step's direction

            def hook(mod, args, layer, directions=directions, first=first):
                x = args[0].clone()
                for k, d in enumerate(directions):
                    x[0, first + k] = edit(x[0, first + k].double(), d[layer], ends[layer].double())
                return (x,)

            handles = [p.register_forward_pre_hook(lambda mod, args, i=i: hook(mod, args, i))
                       for i, p in enumerate(projections)]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1]
            for handle in handles:
                handle.remove()
            generated.append(int(logits.argmax()))
        assert rows[0] == generated
    plain = PromptSampler(fresh(tiny_llama_dir), small_sampling(temperature=0.0, num_samples=1,
                                                               max_new_tokens=steps))(prompts[:2]).tokens
    assert plain != got.tokens


METHODS = {  # each made from the test's request (DExperts needs the experts fixture)
    "prompting": lambda request: Prompting(),
    "word_filter": lambda request: WordFilter(pairs=PAIRS),
    "actadd": lambda request: ActAdd(pairs=PAIRS, m=6, layer=1),
    "iti": lambda request: ITI(pairs=PAIRS, m=6, heads=4),
    "dexperts": lambda request: DExperts(*request.getfixturevalue("experts")),
    "self_detoxify": lambda request: SelfDetoxify(),
}


@pytest.mark.parametrize("name", METHODS)
def test_a_method_at_alpha_0_is_the_base_model_and_resumes_at_another_batch_size(tiny_llama_dir, prompts, tmp_path,
                                                                               name, request):
    def method():
        return METHODS[name](request)

    base = evaluate_small(fresh(tiny_llama_dir), prompts, tmp_path / "base")
    whole = evaluate_small(fresh(tiny_llama_dir, method()), prompts, tmp_path / "whole", alphas=[0.0, 3.0])
    assert metrics(whole)[0.0] == metrics(base)[0.0] or name == "prompting"  # its prefix widens the padding
    assert whole["steering"]["method"]["method"] == name
    assert generations(tmp_path / "whole", 3.0) != generations(tmp_path / "whole", 0.0)
    path = tmp_path / "whole" / "alpha_3" / "generations.jsonl"
    expected = path.read_text()
    path.write_text("".join(expected.splitlines(keepends=True)[:2]))
    from destein_pl import evaluate
    from destein_pl.evaluation.config import EvaluationConfig

    resumed = evaluate(fresh(tiny_llama_dir, method()), prompts, EvaluationConfig(
        output_dir=str(tmp_path / "whole"), sampling=small_sampling(), alphas=[0.0, 3.0]), batch_size=1,
        progress=False, verbose=False)
    assert [(r["resumed_prompts"], r["generated_prompts"]) for r in resumed["runs"]] == [(6, 0), (2, 4)]
    assert metrics(resumed) == metrics(whole)
    assert path.read_text() == expected


def test_methods_are_named_by_short_name_or_mapping_and_bad_options_are_named():
    assert isinstance(build_method("prompting"), Prompting)
    method = build_method("{class_path: actadd, init_args: {pairs: x.tsv, layer: 3}}")
    assert isinstance(method, ActAdd) and method.layer == 3
    with pytest.raises(ValueError, match="unknown method .dexpert.; accepted: actadd, dexperts, iti, prompting"):
        build_method("dexpert")
    with pytest.raises(ValueError, match="exactly one of words"):
        WordFilter()
    with pytest.raises(ValueError, match="chat must be"):
        Prompting(chat="sometimes")


def test_a_method_needs_a_model_without_calibrated_steering(tiny_llama_dir):
    steered = fresh(tiny_llama_dir)
    steered.set_steering(torch.ones(steered.num_layers, steered.num_heads, steered.head_dim),
                         torch.ones(steered.num_layers, steered.num_heads))
    with pytest.raises(ValueError, match="runs on the base model"):
        steered.set_method(Prompting())
    iti = fresh(tiny_llama_dir, ITI(pairs=PAIRS, m=6, heads=4))
    assert iti.head_weights.any()
    iti.set_method(None)
    assert not iti.vectors.any() and iti.method is None
    with pytest.raises(ValueError, match="layer must be in 0..2"):
        fresh(tiny_llama_dir, ActAdd(pairs=PAIRS, m=6, layer=5))


CLI = [sys.executable, "-m", "destein_pl.lightning.cli"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["word_filter", "actadd", "self_detoxify"])
def test_destein_test_runs_a_method_in_two_processes_as_in_one(tiny_llama_dir, tmp_path, name):
    method = {"word_filter": ["--model.method", "WordFilter", "--model.method.pairs", PAIRS],
              "self_detoxify": ["--model.method", "self_detoxify"],
              "actadd": ["--model.method", "ActAdd", "--model.method.pairs", PAIRS, "--model.method.m", "6",
                         "--model.method.layer", "1"]}[name]
    runs = {}
    for devices in (1, 2):
        runs[devices] = tmp_path / f"test-{devices}"
        cmd = [*CLI, "test", "--model.base_model", str(tiny_llama_dir), *method,
               "--model.evaluation.output_dir", str(runs[devices]), "--model.evaluation.alphas", "[0, 2]",
               "--model.evaluation.sampling.num_samples", "3", "--model.evaluation.sampling.max_new_tokens", "6",
               "--data.prompts.source", str(RTP100), "--data.prompts.n", "5", "--data.prompts.batch_size", "2",
               "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.logger", "false",
               "--trainer.strategy", "ddp" if devices > 1 else "auto"]
        subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, timeout=600)
    one, two = (json.loads((runs[d] / "results.json").read_text()) for d in (1, 2))
    assert one["steering"]["method"]["method"] == name
    assert_same_metrics(metrics(two), metrics(one))
    for alpha in (0.0, 2.0):
        assert_same_generations(generations(runs[2], alpha), generations(runs[1], alpha))
    assert generations(runs[1], 2.0) != generations(runs[1], 0.0)


def _write_pairs(path, rows):
    path.write_text("".join(json.dumps({"toxic": t, "nontoxic": n}) + "\n" for t, n in rows))
    return str(path)


def test_a_changed_pairs_file_is_not_resumed(tiny_llama_dir, prompts, tmp_path):
    import hashlib

    pairs = tmp_path / "pairs.jsonl"
    _write_pairs(pairs, [("you are a stupid idiot", "you are mistaken"), ("shut up, moron", "please be quiet"),
                         ("this is crap", "this is not good"), ("what a dumb idea", "what a questionable idea")])
    first = evaluate_small(fresh(tiny_llama_dir, ActAdd(pairs=str(pairs), m=4, layer=1)), prompts[:2],
                           tmp_path / "run", alphas=[2.0])
    assert first["steering"]["method"]["pairs_sha256"] == hashlib.sha256(pairs.read_bytes()).hexdigest()
    _write_pairs(pairs, [("i hate you all", "i disagree with you"), ("get lost, loser", "please leave"),
                         ("what garbage", "not my taste"), ("you absolute clown", "you surprised me")])
    with pytest.raises(ValueError, match="holds outputs made with other settings"):
        evaluate_small(fresh(tiny_llama_dir, ActAdd(pairs=str(pairs), m=4, layer=1)), prompts[:2],
                       tmp_path / "run", alphas=[2.0])


def test_every_file_or_folder_a_method_reads_is_hashed_into_its_settings(tmp_path):
    words, pairs, expert = tmp_path / "words.txt", tmp_path / "pairs.jsonl", tmp_path / "expert"
    expert.mkdir()
    rows = [("you stupid idiot", "you are wrong")] * 3
    methods = {
        "actadd": lambda: ActAdd(pairs=str(pairs), m=2),
        "iti": lambda: ITI(pairs=str(pairs), m=2),
        "word_filter words": lambda: WordFilter(words=str(words)),
        "word_filter pairs": lambda: WordFilter(pairs=str(pairs), min_count=1),
        "dexperts": lambda: DExperts(str(expert), str(expert)),
    }

    def write(version):
        words.write_text(f"idiot\nstupid{version}\n")
        _write_pairs(pairs, rows + [(f"what a dumb{version} idea", "what an idea")])
        (expert / "config.json").write_text(f'{{"v": {version!r}}}')

    write("")
    before = {name: make().settings() for name, make in methods.items()}
    write("er")
    for name, make in methods.items():
        assert make().settings() != before[name], name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 11.0])
@pytest.mark.parametrize("option", ["norm_exp", "sim_exp"])
def test_self_detoxify_refuses_an_exponent_that_is_not_finite_or_out_of_range(option, value):
    with pytest.raises(ValueError, match=rf"self_detoxify: {option} must be a finite number in \[0, 10\], got"):
        SelfDetoxify(**{option: value})


def test_every_float_option_of_every_method_is_checked_finite():
    """Each registered method's float options, given NaN or infinity, are refused by the shared check, naming the
    option; the other options take values that construct."""
    import inspect

    from destein_pl.baselines.method import METHODS as REGISTERED

    required = {"pairs": PAIRS, "words": None, "expert": "e", "antiexpert": "a"}
    checked = []
    for name, cls in REGISTERED.items():
        parameters = inspect.signature(cls).parameters
        for option, parameter in parameters.items():
            if parameter.annotation not in (float, "float", "float | None"):
                continue
            given = {k: v for k, v in required.items() if k in parameters and k != "words"}
            for bad in (float("nan"), float("inf")):
                with pytest.raises(ValueError, match=rf"^{name}: {option} must be a finite number"):
                    cls(**given, **{option: bad})
            checked.append(f"{name}.{option}")
    assert {"self_detoxify.norm_exp", "self_detoxify.sim_exp", "iti.val_fraction"} <= set(checked)
