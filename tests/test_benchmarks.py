"""The benchmarks: every registry entry runs at its quick size (into a temporary folder, never `docs/results/`), so
that a broken benchmark fails here; the runner, the shared timer and the results writer; the committed results
name the runner command that writes them; and the results page and the docs' generated blocks are up to date."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shlex
import types
from pathlib import Path

import pytest

from benchmarks import options, results_page
from benchmarks.registry import BENCHMARKS, Benchmark
from benchmarks.results import RESULTS, Results
from benchmarks.runner import listing, main, run
from benchmarks.timing import in_turn, rotated, spread

EMBEDDED = {"comparison", "forward_gate", "frontier", "gate_scores", "llama_cpp", "memory", "throughput"}
"""The benchmarks whose quick run loads the real embedded model (the others use a tiny one, or none)."""
HEADER = re.compile(r"## .+\n\n`(?P<command>[^`]+)` on (?P<machine>.+)\.\n\n")


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def quick_folder(tmp_path_factory) -> Path:
    """One folder for every quick run of this module, so that a run reads what the runs it needs stored there."""
    return tmp_path_factory.mktemp("benchmarks-quick")


_written: dict[str, Path] = {}


def quick(name: str, folder: Path) -> Path:
    """The results file of a benchmark's quick run into `folder`, after those of the benchmarks it needs (once
    each)."""
    for needed in BENCHMARKS[name].needs:
        quick(needed, folder)
    if name not in _written:
        _written[name] = run(BENCHMARKS[name], ["--quick", "--output-dir", str(folder)])
    return _written[name]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] * (n in EMBEDDED)) for n in BENCHMARKS])
def test_quick_run_writes_its_results_file_into_the_output_folder(name, quick_folder):
    if BENCHMARKS[name].missing():
        pytest.skip(f"{name} needs {', '.join(BENCHMARKS[name].missing())}, which this Python cannot import")
    committed = digest(RESULTS)
    path = quick(name, quick_folder)
    assert digest(RESULTS) == committed, "a quick run changed docs/results/"
    assert path.parent == quick_folder and path.suffix == ".md"
    header = HEADER.match(path.read_text())
    assert header, f"{path.name} lacks the heading, command line and machine line"
    assert header["command"].startswith(f"python -m benchmarks {name}")
    assert "--output-dir" not in header["command"]


def test_the_embedded_model_marks_name_benchmarks():
    assert EMBEDDED <= set(BENCHMARKS)


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.md")), ids=lambda p: p.name)
def test_committed_results_name_the_runner_command_that_writes_them(path):
    header = HEADER.match(path.read_text())
    assert header, f"{path.name} lacks the heading, command line and machine line"
    argv = shlex.split(header["command"])
    assert argv[:3] == ["python", "-m", "benchmarks"] and argv[3] in BENCHMARKS, header["command"]
    bench = BENCHMARKS[argv[3]]
    assert options.output_name(bench, options.parser(bench).parse_args(argv[4:])) == path.stem


def test_every_committed_result_is_a_standard_run_on_the_page():
    standard = {name for bench in BENCHMARKS.values() for _, name in options.standard_runs(bench)}
    assert {p.stem for p in RESULTS.glob("*.md")} <= standard


def test_docs_show_the_results_files_as_they_are():
    assert results_page.stale_blocks() == [], "run `python -m benchmarks page`"


# ---- the runner ------------------------------------------------------------------------------------------------

def test_listing_names_every_benchmark_and_its_results_file(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out == listing() + "\n"
    for bench in BENCHMARKS.values():
        assert re.search(rf"^  {bench.name} +{re.escape(bench.description)}$", out, re.M)
        assert f"-> docs/results/{bench.output}.md" in out


def test_no_benchmark_takes_a_name_of_the_runner():
    assert not {"list", "standard", "page", "-h", "--help"} & set(BENCHMARKS)


def test_standard_runs_every_standard_run_goes_on_after_a_failure_then_writes_the_page(monkeypatch):
    import benchmarks.runner as runner

    ran, pages = [], []

    def fake_run(bench, argv):
        ran.append((bench.name, argv))
        if bench.name == "claims":
            raise SystemExit("an input is missing")

    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.setattr(runner.results_page, "write_page", lambda: pages.append(1) or [])
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: False)
    assert runner.standard() == 1
    assert pages == [1]
    expected = [(b.name, argv) for b in BENCHMARKS.values() if not b.gpu and not b.missing()
                for argv, _ in options.standard_runs(b)]
    assert ran == expected and ran[0][0] == "claims"
    assert ("frontier", ["--split", "report", "--only", "base", "shipped", "smooth-paper-a1.3"]) in ran
    assert "gpu_check" not in {name for name, _ in ran}


def test_a_benchmark_whose_module_is_missing_is_refused_naming_it_and_skipped_by_the_standard_runs(monkeypatch):
    import benchmarks.runner as runner

    absent = dataclasses.replace(BENCHMARKS["fold_speed"], requires=("no_such_module_here",))
    assert absent.missing() == ["no_such_module_here"]
    with pytest.raises(SystemExit, match=r"fold_speed needs the Python module\(s\) no_such_module_here"):
        run(absent, ["--quick"])
    ran = []
    monkeypatch.setattr(runner, "BENCHMARKS", {"fold_speed": absent})
    monkeypatch.setattr(runner, "run", lambda bench, argv: ran.append(bench.name))
    monkeypatch.setattr(runner.results_page, "write_page", lambda: [])
    assert runner.standard() == 0 and ran == []
    assert "(needs no_such_module_here)" in runner.listing()


def test_an_unknown_benchmark_is_refused_with_the_known_ones():
    with pytest.raises(SystemExit, match="no benchmark named 'nope'.*claims"):
        main(["nope"])


def test_the_shown_command_leaves_the_output_folder_and_table_only_out():
    bench = BENCHMARKS["fold_speed"]
    assert options.command(bench, ["--quick", "--output-dir", "/x", "--repeats", "2", "--output-dir=/y"]) == \
        "python -m benchmarks fold_speed --quick --repeats 2"
    assert options.command(BENCHMARKS["comparison"], ["--table-only", "--samples", "5"]) == \
        "python -m benchmarks comparison --samples 5"


def test_quick_options_come_first_and_fill_the_runs_folder(tmp_path):
    bench = BENCHMARKS["scorer_rescore"]
    argv = options.expanded(bench, ["--quick", "--batch-size", "3"], tmp_path)
    args = options.parser(bench).parse_args(argv)
    assert args.runs[0] == tmp_path / "claims" / "tiny-llama" / "tune-n1-s1-t2" / "base"
    assert args.batch_size == 3 and args.quick
    assert options.expanded(bench, ["--batch-size", "3"], tmp_path) == ["--batch-size", "3"]


def test_a_run_that_misses_its_declared_file_fails(monkeypatch, tmp_path):
    fake = types.SimpleNamespace(__doc__="A fake.", add_options=lambda parser: None,
                                 run=lambda args, results: results.write("other", "Other", "body"))
    monkeypatch.setattr(options, "module", lambda bench: fake)
    with pytest.raises(RuntimeError, match="did not write its declared results file .*declared.md"):
        run(Benchmark("fake", "a fake", "declared"), ["--output-dir", str(tmp_path)])
    assert (tmp_path / "other.md").is_file()


# ---- the timer and the writer ------------------------------------------------------------------------------------

def test_in_turn_warms_up_then_rotates_the_order():
    calls = []
    variants = {name: (lambda n=name: calls.append(n) or n.upper()) for name in "abc"}
    runs = in_turn(variants, 4)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab" + "abc"
    assert {name: [t.value for t in timings] for name, timings in runs.items()} == \
        {"a": ["A"] * 4, "b": ["B"] * 4, "c": ["C"] * 4}
    assert all(t.seconds >= 0 for timings in runs.values() for t in timings)
    calls.clear()
    in_turn(variants, 1, warm_up=lambda: calls.append("w"))
    assert "".join(calls) == "wabc"
    calls.clear()
    in_turn(variants, 2, warm_up=False)
    assert "".join(calls) == "abcbca"


def test_rotated_and_spread():
    assert rotated([1, 2, 3], 4) == [2, 3, 1]
    assert spread([3.0, 1.0, 2.0], 1) == "2.0 (1.0 - 3.0)"


def test_results_are_written_whole_under_their_command_and_machine(tmp_path, capsys):
    results = Results.at(tmp_path, "python -m benchmarks x")
    path = results.write("x", "Title", "\nbody\n")
    text = path.read_text()
    assert HEADER.match(text)["command"] == "python -m benchmarks x"
    assert text.endswith("\n\nbody\n") and text in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["x.md"]  # no temporary file left beside it
    assert results.written == [path] and results.runs == tmp_path / "runs"
    assert Results.at(None, "c").folder == RESULTS


# ---- the page and the generated blocks ---------------------------------------------------------------------------

def make_root(tmp_path: Path, readme: str, results: dict[str, str]) -> Path:
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "README.md").write_text(readme)
    for name, text in results.items():
        (tmp_path / "docs" / "results" / name).write_text(text)
    return tmp_path


def test_page_lists_each_standard_run_or_the_command_that_makes_it(tmp_path):
    root = make_root(tmp_path, "", {"memory.md": "## Memory\n\n`c` on m.\n\n| a |\n"})
    text = results_page.page(root)
    assert "### Memory\n\n`c` on m.\n\n| a |" in text
    assert ("*Not measured yet: `python -m benchmarks claims --samples 10 --per-subset 50` writes "
            "`docs/results/claims-n50-s10.md`.*") in text
    assert "Not measured yet: `python -m benchmarks gate_scores --split report` writes " \
           "`docs/results/gate_scores-report.md`" in text
    titles = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert titles[0] == "The paper's claims" and "Memory" in titles


def test_generated_blocks_are_filled_with_their_results_file(tmp_path):
    readme = ("# Title\n\nbefore\n<!-- generated: results/memory.md -->\nold table\n<!-- end generated -->\n"
              "after\n")
    root = make_root(tmp_path, readme, {"memory.md": "## Memory\n\n`c` on m.\n\n| new |\n"})
    assert results_page.stale_blocks(root) == [root / "docs" / "BENCHMARKS.md", root / "README.md"]
    assert results_page.write_page(root) == [root / "docs" / "BENCHMARKS.md", root / "README.md"]
    assert (root / "README.md").read_text() == ("# Title\n\nbefore\n<!-- generated: results/memory.md -->\n"
                                                "## Memory\n\n`c` on m.\n\n| new |\n<!-- end generated -->\nafter\n")
    assert results_page.stale_blocks(root) == []
    assert results_page.write_page(root) == []


@pytest.mark.parametrize(("readme", "error"), [
    ("<!-- generated: results/memory.md -->\nno end\n", "README.md:1: a generated block without"),
    ("<!-- generated: results/absent.md -->\n<!-- end generated -->\n", "README.md:1: the generated block names "
                                                                       "results/absent.md, which does not exist"),
    ("<!-- generated: results/memory.md -->\n<!-- generated: results/memory.md -->\n<!-- end generated -->\n",
     "README.md:2: a generated block begins inside"),
])
def test_broken_generated_blocks_are_named_by_file_and_line(tmp_path, readme, error):
    root = make_root(tmp_path, readme, {"memory.md": "## Memory\n"})
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(error)):
        results_page.stale_blocks(root)


def test_claims_say_which_settings_a_model_refuses_and_why(tmp_path):
    from benchmarks import claims
    from tests.conftest import save_tiny_model_dir

    model = str(save_tiny_model_dir("gemma3", tmp_path / "tiny-gemma"))  # heads of 16 x 4 against a hidden size of 32
    out = tmp_path / "runs"
    claims.evaluate_settings(model, 1.3, out, ["base", "published-a0.2"], per_subset=1, samples=1, tokens=2)
    assert (out / "base" / "setting.json").is_file() and not (out / "published-a0.2" / "setting.json").exists()
    claims.table(out, model, 1.3, 1, 1, 2, Results.at(tmp_path, "the command"), "the command")
    text = (tmp_path / "claims-tiny-gemma-n1-s1.md").read_text()
    assert re.search(r"Not measured: tiny-gemma refuses published-a0\.2: .*hidden_size", text)
    assert "Not measured: no stored run for destein, uniform-weights." in text


def test_the_comparison_matches_each_method_at_the_costliest_point_within_each_budget():
    from benchmarks.comparison import matched

    def row(series, ppl):
        return {"series": series, "toxic": {"ppl": ppl}}

    rows = {"base": row("base", 10.0), "x-a1": row("x", 10.5), "x-a2": row("x", 11.5), "x-a3": row("x", 13.0),
            "y-a1": row("y", 12.5), "actadd-l6-a1.5": row("actadd-layer", 10.9), "actadd-l6-a1": row("actadd", 10.2),
            "actadd-l10-a1.5": row("actadd-layer", 11.9)}
    rows["actadd-l6-a1.5"]["value"], rows["actadd-l10-a1.5"]["value"] = 6, 10
    assert matched(rows, actadd_layer=6) == {("x", 0.1): "x-a1", ("x", 0.2): "x-a2", ("actadd", 0.1): "actadd-l6-a1.5",
                                             ("actadd", 0.2): "actadd-l6-a1.5"}
    assert matched(rows, actadd_layer=10)[("actadd", 0.2)] == "actadd-l10-a1.5"  # another layer's stage is not used


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_each_comparison_sweeps_what_its_model_has(model):
    from benchmarks.comparison import COMPARISONS, SHIPPED
    from destein_pl.steering.checkpoint import read_checkpoint

    comparison = COMPARISONS[model]
    _, metadata = read_checkpoint(comparison.destein.with_suffix(".safetensors"))
    shape = metadata["architecture"]
    assert all(0 <= layer < shape["num_layers"] for layer in comparison.sweeps["actadd-layer"])
    iti = [int(s.removeprefix("iti-k")) for s in comparison.sweeps if s.startswith("iti-k")]
    assert iti and all(0 < k <= shape["num_layers"] * shape["num_heads"] for k in iti)
    assert ("destein-gated" in comparison.sweeps) == (comparison.gated is not None)
    for series, alpha in SHIPPED[model]:  # a shipped checkpoint's own alpha is on its line
        assert alpha in comparison.sweeps[series]
    assert all(len(v) >= 5 for s, v in comparison.sweeps.items() if s not in ("prompting", "actadd-layer"))


def test_the_forward_gate_is_fit_on_prompts_of_neither_sample():
    from benchmarks.forward_gate import fitting_prompts
    from benchmarks.frontier import split_prompts

    fitting = fitting_prompts(1600, 200)
    held = split_prompts("tune") + split_prompts("report")
    rtp = [p for p in fitting if not p.id.startswith("pairs:")]
    assert len(rtp) == 1600 and sum(p.subset == "toxic" for p in rtp) == 800
    assert 390 <= len(fitting) - len(rtp) <= 400  # both sides of 200 pairs (a sentence shared by two pairs once)
    assert not {p.id for p in fitting} & {p.id for p in held}
    assert not {p.text for p in fitting} & {p.text for p in held}


def test_the_frontier_runs_a_checkpoints_own_gate_with_a_floor(continuation_gated, tmp_path):
    import json

    from benchmarks.frontier import Frontier, Runner, stored_settings
    from destein_pl import GateSettings, SteeredCausalLM

    folder, gated, _ = continuation_gated
    own = SteeredCausalLM.from_checkpoint(gated).gate
    frontier = Frontier("tiny", "tiny", {"context": folder / "tiny.ckpt", "forward": gated}, [], "context",
                        {"series": "shipped"}, "base")
    runner = Runner(frontier, "tune", samples=1, tokens=2, per_subset=1, out=tmp_path)
    settings = [{"series": "base", "alpha": 0.0}, {"series": "forward", "alpha": 0.9, "checkpoint": "forward",
                                                    "gate": "own", "floor": 0.2},
                {"series": "smooth-floor", "alpha": 0.9, "gate": {"mode": "smooth", "threshold": 0.3}, "floor": 0.2}]
    for setting in settings:
        runner.run(setting)
    forward = json.loads((tmp_path / "forward-a0.9" / "results.json").read_text())["runs"][0]["steering"]["gate"]
    assert GateSettings.from_metadata(forward) == GateSettings(**{**vars(own), "floor": 0.2})
    context = json.loads((tmp_path / "smooth-floor-a0.9" / "results.json").read_text())["runs"][0]["steering"]["gate"]
    assert GateSettings.from_metadata(context) == GateSettings("smooth", threshold=0.3, floor=0.2)
    assert set(stored_settings(tmp_path)) == {"base", "forward-a0.9", "smooth-floor-a0.9"}


def test_a_quick_run_without_an_output_folder_never_writes_into_docs_results(monkeypatch, tmp_path):
    committed = digest(RESULTS)
    monkeypatch.setattr(options, "QUICK", tmp_path / "quick")
    path = run(BENCHMARKS["fold_speed"], ["--quick"])
    assert digest(RESULTS) == committed, "a quick run changed docs/results/"
    assert path == tmp_path / "quick" / "generation_speed.md"
    assert options.output_dir(BENCHMARKS["fold_speed"], options.runner_options([])) is None


def test_an_output_folder_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for given in (afile, afile / "below"):
        with pytest.raises(SystemExit) as exit_info:
            run(BENCHMARKS["fold_speed"], ["--quick", "--output-dir", str(given)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == (
            f"python -m benchmarks fold_speed: error: --output-dir {given}: {afile} is a file, not a folder; give a "
            f"folder (or a path that does not exist yet) to write the results files into\n")
    assert afile.read_text() == "mine"
