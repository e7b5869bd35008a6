import json

import pytest

from destein_pl.cli import main
from destein_pl.induce import inducing_prompts, select_most_toxic, similar_likelihood
from destein_pl.pairs import read_pairs
from tests.conftest import SHARED_DATA

PARADETOX = SHARED_DATA / "paradetox" / "paradetox.tsv"


def test_selection_keeps_exactly_the_top_n_above_the_threshold():
    samples = [{"id": f"s{i}", "text": f"t{i}", "toxicity": t}
               for i, t in enumerate([0.2, 0.9, 0.55, None, 0.7, 0.9, 0.51, 0.49])]
    samples.append({"id": "empty", "text": "", "toxicity": 1.0})
    chosen = select_most_toxic(samples, top_n=4, min_toxicity=0.5)
    assert [s["id"] for s in chosen] == ["s1", "s5", "s4", "s2"]  # by score, ties by id; empty text left out
    assert [s["id"] for s in select_most_toxic(samples, top_n=10, min_toxicity=0.5)] == ["s1", "s5", "s4", "s2", "s6"]


def test_likelihood_filter_drops_a_pair_with_a_large_gap():
    assert similar_likelihood(-3.0, -3.8, max_gap=1.0)
    assert not similar_likelihood(-3.0, -6.5, max_gap=1.0)  # the rewrite is far less natural to the model
    assert not similar_likelihood(-3.0, None, max_gap=1.0)
    assert similar_likelihood(-3.0, -6.5, max_gap=None)


def test_inducing_prompts_from_paradetox_are_its_toxic_side():
    prompts = inducing_prompts(str(PARADETOX), 5, seed=0)
    toxic = {p.toxic.strip() for p in read_pairs(PARADETOX)}
    assert len(prompts) == 5 and set(prompts) <= toxic
    assert prompts == inducing_prompts(str(PARADETOX), 5, seed=0)
    with pytest.raises(ValueError, match="asked for 100000 inducing prompts"):
        inducing_prompts(str(PARADETOX), 100_000, seed=0)


def run_induce(model_dir, out, *extra):
    main(["induce", "--base_model", str(model_dir), "--output_dir", str(out), "--prompts", str(PARADETOX),
          "--num_prompts", "6", "--samples_per_prompt", "3", "--unprompted_samples", "3", "--max_new_tokens", "6",
          "--batch_size", "4", "--top_n", "4", "--min_toxicity", "0", "--max_loglik_gap", "null", *extra])
    return json.loads((out / "summary.json").read_text())


def test_pipeline_writes_pairs_that_fit_reads_and_a_rerun_reuses_the_samples(tiny_llama_dir, tmp_path):
    out = tmp_path / "induce"
    first = run_induce(tiny_llama_dir, out, "--rewriter", "none")
    assert first["generated_prompts"] == 7 and first["samples"] == 21  # 6 prompts + 1 unprompted, 3 samples each
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == first["pairs"] > 0 and all(p["rewriter"] == "none" for p in pairs)
    # non-parallel: each toxic side is one of the most toxic samples, each non-toxic one of the least
    assert min(p["toxic_score"] for p in pairs) >= max(p["nontoxic_score"] for p in pairs)
    assert read_pairs(out / "pairs.jsonl")[0].toxic == pairs[0]["toxic"]
    samples = (out / "samples.jsonl").read_text()

    again = run_induce(tiny_llama_dir, out, "--rewriter", "lexical")
    assert again["generated_prompts"] == 0 and again["samples"] == 21
    assert (out / "samples.jsonl").read_text() == samples
    with pytest.raises(ValueError, match="other settings"):
        run_induce(tiny_llama_dir, out, "--seed", "1")


def test_unknown_rewriter_and_nothing_to_sample_are_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown rewriter 'gpt'"):
        main(["induce", "--base_model", str(tiny_llama_dir), "--output_dir", str(tmp_path), "--rewriter", "gpt",
              "--prompts", str(PARADETOX)])
    with pytest.raises(ValueError, match="nothing to sample"):
        main(["induce", "--base_model", str(tiny_llama_dir), "--output_dir", str(tmp_path)])
