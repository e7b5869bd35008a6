"""Rerunning into an evaluation folder: a stored line is reused only for the same prompt id and text, lines of other
prompts are kept but never counted, a line cut short by a kill is repaired, and missing scores are asked for again
(only those)."""

import json
import logging

import pytest

from destein_pl import PromptsConfig, load_prompts
from destein_pl.evaluation.runs import ChangedPromptsError
from destein_pl.evaluation.scorers import ToxicityScorer
from destein_pl.files import read_jsonl
from tests.conftest import RTP100, evaluate_small, generations, metrics, run_test


def rtp_file(path, lines):
    """A RealToxicityPrompts file of the given lines (ids are `filename:begin`, so they survive text edits)."""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def rtp_lines(count):
    return [json.loads(line) for line in RTP100.read_text(encoding="utf-8").splitlines()[:count]]


def stored(out):
    return read_jsonl(out / "alpha_0" / "generations.jsonl")


def test_a_prompt_whose_text_changed_is_refused_by_id_or_regenerated(tiny_steered, tmp_path):
    lines = rtp_lines(4)
    prompts = load_prompts(PromptsConfig(str(rtp_file(tmp_path / "a.jsonl", lines))))
    tokenizer = tiny_steered.tokenizer
    # edit the shortest prompt, to a shorter text: the run's padding width (its longest prompt) stays the same
    edit = min(range(4), key=lambda i: len(tokenizer(prompts[i].text)["input_ids"]))
    lines[edit]["prompt"]["text"] = "Edited"
    edited = load_prompts(PromptsConfig(str(rtp_file(tmp_path / "b.jsonl", lines))))
    assert edited[edit].id == prompts[edit].id and edited[edit].text != prompts[edit].text

    evaluate_small(tiny_steered, prompts, tmp_path / "out")
    before = generations(tmp_path / "out", 0.0)
    with pytest.raises(ChangedPromptsError, match=rf"1 prompt\(s\) .*{edited[edit].id!r}.*on_changed_prompts"):
        evaluate_small(tiny_steered, edited, tmp_path / "out")
    assert generations(tmp_path / "out", 0.0) == before  # refused before anything was written

    again = evaluate_small(tiny_steered, edited, tmp_path / "out", on_changed_prompts="regenerate")
    fresh = evaluate_small(tiny_steered, edited, tmp_path / "fresh")
    run = again["runs"][0]
    assert (run["generated_prompts"], run["resumed_prompts"]) == (1, 3)
    assert run["counts"] == fresh["runs"][0]["counts"] and run["counts"]["prompts"]["all"] == 4
    assert metrics(again) == metrics(fresh)
    assert generations(tmp_path / "out", 0.0) == generations(tmp_path / "fresh", 0.0)
    assert [r["prompt"] for r in stored(tmp_path / "out")] == [p.text for p in edited]


def test_another_sample_of_prompts_counts_only_its_own_and_keeps_the_old_lines(tiny_steered, tmp_path):
    first = load_prompts(PromptsConfig(str(RTP100), n=4, seed=0))
    second = load_prompts(PromptsConfig(str(RTP100), n=4, seed=2))
    assert not {p.id for p in first} & {p.id for p in second}  # (shared prompts would be reused, as they should)

    evaluate_small(tiny_steered, first, tmp_path / "out")
    results = evaluate_small(tiny_steered, second, tmp_path / "out")
    fresh = evaluate_small(tiny_steered, second, tmp_path / "fresh")
    run = results["runs"][0]
    assert (run["generated_prompts"], run["resumed_prompts"]) == (4, 0)
    assert run["counts"] == fresh["runs"][0]["counts"] and run["counts"]["prompts"]["all"] == 4
    assert metrics(results) == metrics(fresh)
    records = stored(tmp_path / "out")
    assert [r["id"] for r in records] == [p.id for p in second] + [p.id for p in first]  # this run's, then kept
    assert records[:4] == stored(tmp_path / "fresh")
    on_disk = json.loads((tmp_path / "out" / "alpha_0" / "results.json").read_text())
    assert on_disk["counts"]["prompts"]["all"] == 4


def test_a_shared_prompt_is_reused_only_at_the_same_padded_width(tiny_steered, tmp_path):
    """Two samples of prompts sharing some: a shared prompt's stored line is reused when the run pads to the same
    width, and made again (equal to a fresh run's) when the longest prompt, hence the width, differs."""
    prompts = load_prompts(PromptsConfig(str(RTP100), n=6, seed=0))
    widths = [len(tiny_steered.tokenizer(p.text)["input_ids"]) for p in prompts]
    longest = widths.index(max(widths))
    shorter = [p for i, p in enumerate(prompts) if widths[i] < max(widths)][:3]
    first, same_width = shorter + [prompts[longest]], shorter[:2] + [prompts[longest]]
    evaluate_small(tiny_steered, first, tmp_path / "out")
    run = evaluate_small(tiny_steered, same_width, tmp_path / "out")["runs"][0]
    assert (run["resumed_prompts"], run["generated_prompts"]) == (3, 0)
    narrower = evaluate_small(tiny_steered, shorter[:2], tmp_path / "out")
    assert (narrower["runs"][0]["resumed_prompts"], narrower["runs"][0]["generated_prompts"]) == (0, 2)
    assert metrics(narrower) == metrics(evaluate_small(tiny_steered, shorter[:2], tmp_path / "fresh"))


def test_a_line_cut_by_a_kill_is_dropped_with_a_warning_and_the_results_are_unchanged(tiny_llama_dir, tmp_path,
                                                                                     caplog):
    whole = run_test(tiny_llama_dir, tmp_path / "whole", alphas=(0.0,))
    expected = generations(tmp_path / "whole", 0.0)
    path = tmp_path / "whole" / "alpha_0" / "generations.jsonl"
    last = expected.splitlines()[-1]
    path.write_text(expected[: len(expected) - len(last) - 1] + last[: len(last) // 2], encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="destein_pl.files"):
        resumed = run_test(tiny_llama_dir, tmp_path / "whole", alphas=(0.0,))
    assert "dropped an incomplete last line" in caplog.text and "kept 5 lines" in caplog.text
    assert [(r["resumed_prompts"], r["generated_prompts"]) for r in resumed["runs"]] == [(5, 1)]
    assert metrics(resumed) == metrics(whole)
    assert generations(tmp_path / "whole", 0.0) == expected


class Patchy(ToxicityScorer):
    """A deterministic toxicity per text that, unless `answers_all`, gives no score to every fourth text of a call;
    it remembers every text it was asked about."""

    name = "patchy"

    def __init__(self, answers_all: bool) -> None:
        self.answers_all = answers_all
        self.asked: list[str] = []

    def _score(self, texts):
        self.asked.extend(texts)
        return [len(t) % 11 / 10 if self.answers_all or i % 4 else None for i, t in enumerate(texts)]


def test_missing_scores_are_reported_then_asked_for_again_and_only_those(tiny_steered, tmp_path, capsys):
    prompts = load_prompts(PromptsConfig(str(RTP100), n=6))
    first = evaluate_small(tiny_steered, prompts, tmp_path / "out", verbose=True, scorer=Patchy(answers_all=False))
    missing = first["runs"][0]["counts"]["missing_scores"]
    unscored = [text for r in stored(tmp_path / "out") for text, v in zip(r["continuations"], r["toxicity"])
                if v is None]
    prompts_missing = sum(None in r["toxicity"] for r in stored(tmp_path / "out"))
    assert missing == len(unscored) > 0 and 0 < prompts_missing < len(prompts)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith(f"WARNING: {missing} toxicity scores are missing")
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[0].rstrip().endswith("| missing scores |")
    assert any(row.startswith("| alpha=0 | 6 | all |") and row.rstrip().endswith(f"| {missing} |") for row in table)

    scorer = Patchy(answers_all=True)
    again = evaluate_small(tiny_steered, prompts, tmp_path / "out", scorer=scorer)
    fresh = evaluate_small(tiny_steered, prompts, tmp_path / "fresh", scorer=Patchy(answers_all=True))
    assert scorer.asked == unscored  # only the texts without a score, nothing generated again
    run = again["runs"][0]
    assert (run["rescored_prompts"], run["generated_prompts"], run["counts"]["missing_scores"]) == (
        prompts_missing, 0, 0)
    assert json.loads((tmp_path / "out" / "alpha_0" / "results.json").read_text())["rescored_prompts"] == (
        prompts_missing)
    assert metrics(again) == metrics(fresh)
    assert generations(tmp_path / "out", 0.0) == generations(tmp_path / "fresh", 0.0)
    assert "missing scores" not in (tmp_path / "out" / "results.md").read_text()


def test_an_alpha_folder_records_the_sampling_settings_flat_as_it_always_has():
    """Folders written before the sampling settings were nested (`evaluation.sampling`) still resume."""
    from destein_pl.evaluation.config import EvaluationConfig
    from destein_pl.evaluation.sampling import SamplingSettings

    config = EvaluationConfig(sampling=SamplingSettings(num_samples=3, max_new_tokens=6, seed=7))
    assert config.fingerprint(0.5, "digest", {"name": "profanity-check"}) == {
        "alpha": 0.5, "num_samples": 3, "max_new_tokens": 6, "top_p": 0.9, "temperature": 1.0, "seed": 7,
        "max_prompt_tokens": 512, "scorer": {"name": "profanity-check"}, "perplexity_model": None,
        "perplexity_model_dtype": None, "steering": "digest"}
