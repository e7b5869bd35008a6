import json
import re

import jsonargparse
import pytest

from destein_pl.calibration.pairs import read_pairs
from destein_pl.evaluation.sampling import SamplingSettings
from destein_pl.evaluation.scorers import PerspectiveScorer, ProfanityCheckScorer
from destein_pl.induce import induce
from destein_pl.induce.pipeline import (
    inducing_prompts,
    log_likelihoods,
    select_most_toxic,
    similar_likelihood,
    start_token_id,
)
from destein_pl.induce.rewriters import LexicalRewriter, NonParallelRewriter
from destein_pl.lightning.cli import main
from tests.conftest import SHARED_DATA, refusal

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


def induce_args(model_dir, out):
    return ["--base_model", str(model_dir), "--output_dir", str(out), "--prompts", str(PARADETOX), "--num_prompts",
            "6", "--sampling.num_samples", "3", "--unprompted_samples", "3", "--sampling.max_new_tokens", "6",
            "--batch_size", "4", "--top_n", "4", "--min_toxicity", "0", "--max_loglik_gap", "null"]


def run_induce(model_dir, out, *extra):
    main(["induce", *induce_args(model_dir, out), *extra])
    return json.loads((out / "summary.json").read_text())


def test_pipeline_writes_pairs_that_fit_reads_and_a_rerun_reuses_the_samples(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "induce"
    first = run_induce(tiny_llama_dir, out, "--rewriter", "none")
    assert first["generated_prompts"] == 7 and first["samples"] == 21  # 6 prompts + 1 unprompted, 3 samples each
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == first["pairs"] > 0 and all(p["rewriter"] == "none" for p in pairs)
    # non-parallel: each toxic side is one of the most toxic samples, each non-toxic one of the least
    assert min(p["toxic_score"] for p in pairs) >= max(p["nontoxic_score"] for p in pairs)
    assert read_pairs(out / "pairs.jsonl")[0].toxic == pairs[0]["toxic"]
    samples = (out / "samples.jsonl").read_text()

    settings = json.loads((out / "settings.json").read_text())
    assert {k: settings[k] for k in ("samples_per_prompt", "max_new_tokens", "top_p", "temperature", "seed",
                                     "max_prompt_tokens")} == {"samples_per_prompt": 3, "max_new_tokens": 6,
                                                               "top_p": 0.9, "temperature": 1.0, "seed": 0,
                                                               "max_prompt_tokens": None}
    del settings["max_prompt_tokens"]  # as a folder made before prompts could be cut records it
    (out / "settings.json").write_text(json.dumps(settings))
    again = run_induce(tiny_llama_dir, out, "--rewriter", "lexical")
    assert again["generated_prompts"] == 0 and again["samples"] == 21
    assert (out / "samples.jsonl").read_text() == samples
    capsys.readouterr()
    for changed in (("--sampling.seed", "1"), ("--sampling.max_prompt_tokens", "8")):
        message = refusal(capsys, "induce", *induce_args(tiny_llama_dir, out), *changed)
        assert "other settings" in message and changed[0].rsplit(".", 1)[1] in message


def test_unknown_rewriter_and_nothing_to_sample_are_errors(tiny_llama_dir, tmp_path, capsys):
    common = ["induce", "--base_model", str(tiny_llama_dir), "--output_dir", str(tmp_path)]
    assert "unknown rewriter 'gpt'" in refusal(capsys, *common, "--rewriter", "gpt", "--prompts", str(PARADETOX))
    assert "nothing to sample" in refusal(capsys, *common)
    assert "top_p must be in (0, 1]" in refusal(capsys, *common, "--prompts", str(PARADETOX), "--sampling.top_p", "0")
    assert not tmp_path.joinpath("settings.json").exists()


def test_long_inducing_prompts_are_cut_from_the_left(tiny_llama_dir, caplog):
    from destein_pl import SteeredCausalLM, load_base_model
    from destein_pl.induce.pipeline import sampling_jobs

    steered = SteeredCausalLM(*load_base_model(str(tiny_llama_dir)))
    whole = sampling_jobs(steered, str(PARADETOX), 6, 2, SamplingSettings(num_samples=2, max_prompt_tokens=None))
    with caplog.at_level("WARNING", logger="destein_pl.induce.pipeline"):
        cut = sampling_jobs(steered, str(PARADETOX), 6, 2, SamplingSettings(num_samples=2, max_prompt_tokens=5))
    assert [job.id for job in cut] == [job.id for job in whole] == ["u0", "p0", "p1", "p2", "p3", "p4", "p5"]
    assert [job.token_ids[-5:] for job in whole] == [job.token_ids for job in cut]
    longer = sum(len(job.token_ids) > 5 for job in whole)
    assert longer and f"{longer} inducing prompts cut from the left to 5 tokens" in caplog.text


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_filters_drop_toxic_rewrites_and_unlike_pairs(tiny_llama_dir, tmp_path):
    out = tmp_path / "induce"
    # Filters off: every selected sample gets a pair, with the scores and likelihoods the filters look at.
    everything = run_induce(tiny_llama_dir, out, "--rewriter", "none", "--top_n", "10", "--max_rewrite_toxicity", "2")
    assert (everything["selected"], everything["no_rewrite"], everything["pairs"]) == (10, 0, 10)
    assert everything["rewrite_still_toxic"] == everything["loglik_gap"] == 0
    assert json.loads((out / "settings.json").read_text())["scorer"] == {"name": "profanity-check"}
    rows = read_rows(out / "pairs.jsonl")

    # Filters on, at thresholds that must drop the least calm rewrite(s), then the least alike pair(s).
    max_toxicity = max(r["nontoxic_score"] for r in rows)
    calm = [r for r in rows if r["nontoxic_score"] < max_toxicity]
    gap = {r["sample_id"]: abs(r["toxic_loglik"] - r["nontoxic_loglik"]) for r in calm}
    gaps = sorted(gap.values())
    split = max(range(1, len(gaps)), key=lambda k: gaps[k] - gaps[k - 1])  # the threshold farthest from any gap
    max_gap = (gaps[split - 1] + gaps[split]) / 2
    expected = [r for r in calm if gap[r["sample_id"]] <= max_gap]
    assert 0 < len(expected) < len(calm) < len(rows)
    assert min(abs(g - max_gap) for g in gaps) > 1e-4  # batches differ between the runs: likelihoods may move a bit

    target = induce(output_dir=str(out), base_model=str(tiny_llama_dir), prompts=str(PARADETOX), num_prompts=6,
                    sampling=SamplingSettings(num_samples=3, max_new_tokens=6, max_prompt_tokens=None),
                    unprompted_samples=3, batch_size=4,
                    scorer=ProfanityCheckScorer(), top_n=10, min_toxicity=0.0, rewriter=NonParallelRewriter(),
                    max_rewrite_toxicity=max_toxicity, max_loglik_gap=max_gap)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {**summary, "generated_prompts": 0, "samples": 21, "selected": 10, "no_rewrite": 0,
                       "rewrite_still_toxic": len(rows) - len(calm), "loglik_gap": len(calm) - len(expected),
                       "pairs": len(expected)}
    kept = read_rows(target)
    assert [r["sample_id"] for r in kept] == [r["sample_id"] for r in expected]
    for row, before in zip(kept, expected):  # the same pairs, scores and likelihoods as with the filters off
        assert row == {**before, "toxic_loglik": row["toxic_loglik"], "nontoxic_loglik": row["nontoxic_loglik"]}
        assert (row["toxic_loglik"], row["nontoxic_loglik"]) == pytest.approx(
            (before["toxic_loglik"], before["nontoxic_loglik"]), abs=1e-5)
    assert all(r["nontoxic_score"] < max_toxicity for r in kept)
    assert all(abs(r["toxic_loglik"] - r["nontoxic_loglik"]) <= max_gap for r in kept)


def test_log_likelihoods_are_minus_the_mean_nll(tiny_llama_dir):
    from destein_pl import SteeredCausalLM, load_base_model
    from destein_pl.evaluation.perplexity import continuation_nll

    model, tokenizer = load_base_model(str(tiny_llama_dir))
    steered = SteeredCausalLM(model, tokenizer)
    texts = ["you are an idiot", "", "have a nice day"]
    values = log_likelihoods(steered, texts, batch_size=2)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    nll = continuation_nll(steered, steered.architecture, [start_token_id(tokenizer)], ids, tokenizer.pad_token_id)
    assert values[1] is None and values[0] == pytest.approx(-nll[0]) and values[2] == pytest.approx(-nll[2])
    assert all(v < 0 for v in (values[0], values[2]))


def test_a_cut_short_samples_file_is_repaired_and_its_last_job_sampled_again(tiny_llama_dir, tmp_path):
    out = tmp_path / "induce"
    run_induce(tiny_llama_dir, out, "--rewriter", "none")
    samples = out / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a kill during the last write
    again = run_induce(tiny_llama_dir, out, "--rewriter", "none")
    assert again["generated_prompts"] == 1 and again["samples"] == 21
    rows = read_rows(samples)
    assert [r["id"] for r in rows] == [json.loads(line)["id"] for line in lines]


@pytest.mark.parametrize("option, value, message", [
    ("batch_size", 0, "batch_size must be at least 1"),
    ("top_n", 0, "top_n must be at least 1"),
    ("num_prompts", 0, "num_prompts must be at least 1"),
    ("unprompted_samples", -1, "unprompted_samples must be at least 0"),
    ("min_toxicity", 1.5, r"min_toxicity must be in \[0, 1\]"),
    ("max_rewrite_toxicity", 0.0, "max_rewrite_toxicity must be > 0"),
    ("max_loglik_gap", -0.1, "max_loglik_gap must be at least 0"),
])
def test_out_of_range_options_are_refused_before_anything_loads(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        induce(output_dir=str(tmp_path / "out"), base_model=str(tmp_path / "no-such-model"), prompts=str(PARADETOX),
               **{option: value})
    assert not (tmp_path / "out").exists()


def test_a_scorer_that_cannot_start_fails_before_sampling(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="PERSPECTIVE_API_KEY"):
        induce(output_dir=str(tmp_path / "out"), base_model=str(tiny_llama_dir), prompts=str(PARADETOX),
               scorer="perspective", rewriter="none")
    assert not (tmp_path / "out").exists()  # no settings recorded for a run that never started


def induce_parser() -> jsonargparse.ArgumentParser:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(induce)
    return parser


def test_induce_options_parse_short_names_and_class_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    parser = induce_parser()
    parsed = parser.parse_args(["--rewriter", "none", "--scorer", "perspective"])
    assert (parsed.rewriter, parsed.scorer) == ("none", "perspective")
    config = tmp_path / "induce.yaml"
    config.write_text("rewriter:\n  class_path: LexicalRewriter\n  init_args: {min_weight: 2.0}\n"
                      "scorer:\n  class_path: destein_pl.evaluation.scorers.PerspectiveScorer\n"
                      "  init_args: {attribute: INSULT}\n")
    built = parser.instantiate(parser.parse_args(["--config", str(config)]))
    assert isinstance(built.rewriter, LexicalRewriter) and built.rewriter.min_weight == 2.0
    assert isinstance(built.scorer, PerspectiveScorer) and built.scorer.attribute == "INSULT"
    config.write_text("rewriter:\n  class_path: LexicalRewriter\n  init_args: {weight: 2.0}\n")
    with pytest.raises(jsonargparse.ArgumentError, match="Option 'weight' is not accepted"):
        parser.parse_args(["--config", str(config)])


def test_induce_help_shows_a_rewriters_options(capsys):
    with pytest.raises(SystemExit):
        induce_parser().parse_args(["--rewriter.help", "SelfRewriter"])
    shown = capsys.readouterr().out
    assert all(f"--rewriter.{o}" in shown for o in ("instruction", "max_new_tokens", "batch_size"))


def small_induce(model_dir, out, rewriter):
    return induce(output_dir=str(out), base_model=str(model_dir), prompts=str(PARADETOX), num_prompts=6,
                  sampling=SamplingSettings(num_samples=3, max_new_tokens=6, max_prompt_tokens=None),
                  unprompted_samples=3, batch_size=4, top_n=4, min_toxicity=0.0, rewriter=rewriter,
                  max_loglik_gap=None)


def test_a_run_whose_rewrites_all_fail_is_an_error_and_keeps_the_earlier_pairs(tiny_llama_dir, tmp_path):
    import socket

    from destein_pl.induce.rewriters import OpenAICompatibleRewriter
    from destein_pl.induce.pipeline import InduceError

    out = tmp_path / "induce"
    target = small_induce(tiny_llama_dir, out, NonParallelRewriter())
    before, summary = target.read_bytes(), (out / "summary.json").read_bytes()
    assert before
    with socket.socket() as probe:  # a loopback port nothing listens on: the endpoint is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = OpenAICompatibleRewriter(url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0, timeout_s=2)
    with pytest.raises(InduceError, match="every rewrite failed: the 'openai-compatible' rewriter gave none"):
        small_induce(tiny_llama_dir, out, down)
    assert target.read_bytes() == before and (out / "summary.json").read_bytes() == summary


def test_rewrites_longer_than_the_context_are_dropped_by_name(tiny_llama_dir, tmp_path, caplog):
    from destein_pl.induce.rewriters import Rewriter
    from destein_pl.induce.pipeline import InduceError

    class Endless(Rewriter):
        name = "endless"

        def _rewrite(self, texts, context):
            return ["calm " * 5000 for _ in texts]

    with pytest.raises(InduceError, match="no pairs: .*'no_rewrite': 0, 'rewrite_too_long': 4"):
        small_induce(tiny_llama_dir, tmp_path / "induce", Endless())
    assert re.search(r"dropped a rewrite by the 'endless' rewriter of \d{4} tokens, longer than the model's context",
                     caplog.text)
    assert not (tmp_path / "induce" / "pairs.jsonl").exists()


@pytest.mark.parametrize("case", ["prompts", "prompts by a link", "samples", "settings", "summary", "output_dir",
                                  "in the base model", "demonstrations"])
def test_an_output_that_is_one_of_the_runs_inputs_is_refused_before_anything_loads(tiny_llama_dir, tmp_path,
                                                                                    capsys, case):
    """`--output` never replaces the prompts it reads, a rewriter's file, a file of the base model, or a file of
    the run's own folder; the files stay byte for byte as they were."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("you are such an idiot\nshut up, moron\n")
    out = tmp_path / "induce"
    out.mkdir()
    for name in ("samples.jsonl", "settings.json", "summary.json"):
        (out / name).write_text("{}\n")
    (tmp_path / "link.txt").symlink_to(prompts)
    output = {"prompts": prompts, "prompts by a link": tmp_path / "link.txt", "samples": out / "samples.jsonl",
              "settings": out / "settings.json", "summary": out / "summary.json", "output_dir": out,
              "in the base model": tiny_llama_dir / "config.json", "demonstrations": tmp_path / "demos.jsonl"}[case]
    (tmp_path / "demos.jsonl").write_text('{"toxic": "you idiot", "nontoxic": "you are wrong"}\n')
    watched = [prompts, tmp_path / "demos.jsonl", tiny_llama_dir / "config.json", *out.iterdir()]
    before = {p: p.read_bytes() for p in watched}
    extra = (["--rewriter", "SelfRewriter", "--rewriter.demonstrations", str(tmp_path / "demos.jsonl")]
             if case == "demonstrations" else ["--rewriter", "none"])
    message = refusal(capsys, "induce", "--base_model", str(tiny_llama_dir), "--output_dir", str(out),
                      "--prompts", str(prompts), "--num_prompts", "2", "--output", str(output), *extra)
    assert message.startswith(f"output: {output} ") and ("input of this run" in message or "base model" in message
                                                         or "in output_dir" in message or "is a folder" in message)
    assert {p: p.read_bytes() for p in watched} == before
    assert sorted(p.name for p in out.iterdir()) == ["samples.jsonl", "settings.json", "summary.json"]
