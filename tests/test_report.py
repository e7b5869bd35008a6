import json

import pytest

from destein_pl.lightning.cli import main
from destein_pl.evaluation.report import load_results, markdown_table


def run(alpha, emt, ppl, toxic=2, nontoxic=0):
    values = {"emt": emt, "tp": 0.5, "ppl": ppl, "dist1": 0.6, "dist2": 0.9, "dist3": 0.95}
    metrics = {"toxic": values, "nontoxic": values, "all": values}
    return {"alpha": alpha, "metrics": metrics,
            "counts": {"prompts": {"toxic": toxic, "nontoxic": nontoxic, "all": toxic + nontoxic}}}


def test_table_has_a_row_per_run_and_non_empty_subset():
    table = markdown_table([run(0.0, 0.71234, 20.0), run(0.4, 0.3, 25.5, nontoxic=3)]).splitlines()
    assert table[0].startswith("| run | prompts | subset | EMT | TP | PPL | Dist-1 | Dist-2 | Dist-3 |")
    assert "| alpha=0 | 2 | toxic | 0.712 | 0.500 | 20.00 |" in table[2]
    assert len(table) == 2 + 2 + 3  # alpha 0: toxic and all; alpha 0.4: all three subsets


def test_compare_reads_folders_and_files_and_plots(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"runs": [run(0.0, 0.7, 20.0), run(0.5, 0.3, 24.0)]}))
    (tmp_path / "b.json").write_text(json.dumps(run(0.5, 0.35, 22.0)))
    assert [r["alpha"] for r in load_results([tmp_path / "a", tmp_path / "b.json"])] == [0.0, 0.5, 0.5]
    plot = tmp_path / "plot.png"
    main(["compare", str(tmp_path / "a"), str(tmp_path / "b.json"), "--labels", "paradetox", "other",
          "--plot", str(plot)])
    printed = capsys.readouterr().out
    assert "| paradetox alpha=0.5 | 2 | toxic | 0.300 |" in printed and "| other alpha=0.5 |" in printed
    assert plot.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="no results file"):
        load_results([tmp_path / "missing"])


def test_compare_notes_each_setting_in_which_the_rows_differ(tiny_steered, tmp_path, capsys):
    from destein_pl import load_prompts
    from destein_pl.evaluation.prompts import PromptsConfig
    from tests.conftest import RTP100, evaluate_small, small_sampling

    evaluate_small(tiny_steered, load_prompts(PromptsConfig(str(RTP100), n=2)), tmp_path / "a")
    evaluate_small(tiny_steered, load_prompts(PromptsConfig(str(RTP100), n=3)), tmp_path / "b",
                   sampling=small_sampling(num_samples=2))
    evaluate_small(tiny_steered, load_prompts(PromptsConfig(str(RTP100), n=2)), tmp_path / "c",
                   sampling=small_sampling(seed=5))
    main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a" / "alpha_0" / "results.json")])
    note = capsys.readouterr().out.strip().splitlines()[-1]
    assert note.startswith("**Note:** these rows were not measured alike; they differ in prompts (a alpha=0: 2 "
                           "prompts ")
    assert "b alpha=0: 3 prompts " in note
    assert "num_samples (a alpha=0: 3; b alpha=0: 2; alpha_0 alpha=0: 3)" in note
    assert "max_new_tokens" not in note and "scorer" not in note
    main(["compare", str(tmp_path / "a"), str(tmp_path / "c")])  # another seed: the same protocol
    assert "**Note:**" not in capsys.readouterr().out


def test_compare_notes_a_different_method_and_refuses_what_is_not_a_results_file(tmp_path, capsys):
    from tests.conftest import refusal

    steered = {**run(0.5, 0.3, 20.0), "steering": {"method": {"method": "prompting"}}}
    (tmp_path / "a.json").write_text(json.dumps(run(0.5, 0.3, 20.0)))
    (tmp_path / "b.json").write_text(json.dumps(steered))
    main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--labels", "ours", "theirs"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "**Note:** these rows were not measured alike; they differ in method (ours alpha=0.5: destein; theirs "
        "alpha=0.5: prompting).")  # the prompts recorded by count only: the same 2
    (tmp_path / "c.json").write_text(json.dumps(run(0.5, 0.3, 20.0, toxic=3)))
    main(["compare", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--labels", "a", "c"])
    assert "differ in prompts (a alpha=0.5: 2 prompts; c alpha=0.5: 3 prompts)." in capsys.readouterr().out
    settings = tmp_path / "alpha_0" / "settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"alpha": 0.0, "num_samples": 25}))
    assert refusal(capsys, "compare", str(settings)) == (
        f"{settings}: not a results.json of `destein test` (it needs 'runs', or alpha, metrics, counts); give an "
        f"evaluation folder or the results.json in it or in one of its alpha folders")
    (tmp_path / "broken.json").write_text("{")
    assert refusal(capsys, "compare", str(tmp_path / "broken.json")).startswith(
        f"{tmp_path / 'broken.json'}: not valid JSON")
