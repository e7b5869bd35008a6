"""Assemble `docs/BENCHMARKS.md` from the results files the benchmark scripts write (`docs/results/*.md`, and the
frontier tables `docs/frontier-*.md`), in a fixed order, each under the note that says what it answers.

    python benchmarks/results_page.py

A results file that does not exist yet is listed as missing with the command that makes it, never left out
silently. The page holds no number of its own: every number in it is in a results file, next to its command.
"""

from __future__ import annotations

from pathlib import Path

from results import RESULTS, ROOT

PAGE = ROOT / "docs" / "BENCHMARKS.md"

Entry = tuple[Path, str, str | None]
"""A results file, the command that writes it, and a heading for it when the file has none of its own."""

FRONTIER = ROOT / "docs"
SECTIONS: list[tuple[str, str, list[Entry]]] = [
    ("The paper's claims",
     ("Each ablation of the paper, rerun on SmolLM2-135M with the development protocol of `benchmarks/frontier.py` "
     "(reduced to the first 50 + 50 prompts of its tune sample and 10 continuations, so that every setting fits "
     "in minutes here). The verdicts come from a paired bootstrap over prompts; \"not detectable at this size\" "
     "means the 95% interval of the difference includes 0. Read against the paper: the top half of the heads beats "
     "the bottom half, as in the paper's Table 11, and more pairs than 20 do not help, as in its Table 9; but "
     "here 5 pairs already do as well as 20, where the paper's m = 5 is clearly worse. The paper's other gaps do "
     "not show at this size: probe weights against uniform ones, parallel against "
     "non-parallel pairs, and, plainly against the paper, self-induced against universal ParaDetox pairs (its EMT "
     "0.203 against 0.327 becomes no detectable difference here, with the self-induced pairs costing more "
     "perplexity). One alpha for every setting mixes strength with direction: uniform weights steer harder than "
     "probe weights, and pay for it in perplexity."),
     [(RESULTS / "claims-n50-s10.md", "python benchmarks/claims.py run --samples 10 --per-subset 50", None)]),
    ("Fusion variants, the gate and the pairs: the quality frontier",
     ("The published-code fusion against the paper's, the probe gate, and self-induced pairs against universal "
     "ones, from `benchmarks/frontier.py` (the README's \"Gating and fusion variants\" section discusses them)."),
     [(FRONTIER / "frontier-tune-n100-s10.md", "python benchmarks/frontier.py sweep --samples 10 --only ...",
       "Tune sample, 100 + 100 prompts"),
      (FRONTIER / "frontier-report-n100-s10.md", "python benchmarks/frontier.py report --samples 10 --only ...",
       "Report sample, 100 + 100 prompts: the shipped gated checkpoint"),
      (FRONTIER / "frontier-tune-n25-s10.md",
       "python benchmarks/frontier.py sweep --samples 10 --per-subset 25 --only ...",
       "Reduced look, 25 + 25 tune prompts: every fusion variant and the pairs")]),
    ("Scorer fidelity",
     ("How well each offline scorer agrees with Perspective on the 2,000 RealToxicityPrompts prompts, and whether "
     "the EMT drop survives rescoring by a second scorer."),
     [(RESULTS / "scorer_fidelity.md", "python benchmarks/scorer_fidelity.py fidelity", None),
      (RESULTS / "scorer_rescore.md", "python benchmarks/scorer_fidelity.py rescore BASE_RUN STEERED_RUN...", None)]),
    ("Speed and how cost grows",
     ("Generation with steering live and folded into a bias (on both cores, nothing else running), the evaluation "
     "sampler against Hugging Face `generate`, where evaluation time goes, calibration throughput, and the time of "
     "calibration and evaluation as they grow. The evaluation and calibration tables, and the memory table's wall "
     "times, ran on one thread while another one-thread benchmark used the second core; each ratio is measured "
     "within one run, its parts in turn."),
     [(RESULTS / "generation_speed.md", "python benchmarks/fold_speed.py", None),
      (RESULTS / "evaluation_cost.md", "python benchmarks/evaluation_cost.py", None),
      (RESULTS / "calibration_cost.md", "python benchmarks/calibration_cost.py", None)]),
    ("Memory",
     "The steering state and checkpoint against the paper's Table 8, and the peak memory of `fit` and `test`.",
     [(RESULTS / "memory.md", "python benchmarks/memory.py", None)]),
]


def demoted(text: str) -> str:
    """A results file's headings one level down, so that they nest under the page's sections."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def main() -> None:
    parts = ["# Benchmarks",
             "",
             ("Every number on this page comes from a script under `benchmarks/`; each table says the command that "
             "produced it and the machine it ran on. Rerun a script and then `python benchmarks/results_page.py` to "
             "refresh the page."),
             ""]
    for title, note, files in SECTIONS:
        parts += [f"## {title}", "", note, ""]
        for path, command, heading in files:
            if path.is_file():
                parts += [f"### {heading}", ""] if heading else []
                parts += [demoted(path.read_text()).strip(), ""]
                plot = path.with_suffix(".png")
                parts += [f"![{path.stem}]({plot.relative_to(PAGE.parent)})", ""] if plot.is_file() else []
            else:
                parts += [f"*Not measured yet: `{command}` writes `{path.relative_to(ROOT)}`.*", ""]
    PAGE.write_text("\n".join(parts))
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
