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
