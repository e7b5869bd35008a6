"""The options of a benchmark, declared once: its module's own (`add_options`) and the runner's (`--quick`,
`--output-dir`, `--threads`); `--quick` expanded into the registry's quick options; the results file that parsed
options name; and the command line as the results show it."""

from __future__ import annotations

import argparse
import importlib
import shlex
from pathlib import Path
from types import ModuleType

from benchmarks.registry import Benchmark

OUTPUT_DIR = "--output-dir"
TABLE_ONLY = "--table-only"


def module(benchmark: Benchmark) -> ModuleType:
    """The module of a benchmark: `benchmarks.<name>`, with `add_options(parser)` and `run(args, results)`."""
    return importlib.import_module(f"benchmarks.{benchmark.name}")


def parser(benchmark: Benchmark) -> argparse.ArgumentParser:
    """Every option of a benchmark: its module's, then the runner's."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {benchmark.name}",
                                     description=module(benchmark).__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    module(benchmark).add_options(parser)
    runner = parser.add_argument_group("runner options")
    runner.add_argument("--quick", action="store_true",
                        help=f"the quick run, in seconds (its options first: {benchmark.quick or 'none'})")
    runner.add_argument(OUTPUT_DIR, type=Path, default=None,
                        help="write the results files here, and keep stored runs in its runs/ folder, instead of "
                             "docs/results/ and runs/ (a trial run then replaces no committed result)")
    runner.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def runner_options(argv: list[str]) -> argparse.Namespace:
    """`--quick` and `--output-dir` of a command line, before the benchmark's own options are known."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--quick", action="store_true")
    pre.add_argument(OUTPUT_DIR, type=Path, default=None)
    return pre.parse_known_args(argv)[0]


def expanded(benchmark: Benchmark, argv: list[str], runs: Path) -> list[str]:
    """The command line with `--quick` replaced by the quick options in front (options given after it win), their
    `{runs}`, `{tiny}` and `{tiny_ckpt}` filled in (the tiny model and its checkpoint made only when named)."""
    if not runner_options(argv).quick:
        return argv
    fields = {"runs": str(runs)}
    if "{tiny" in benchmark.quick:
        from benchmarks.tiny import tiny_checkpoint, tiny_model

        fields["tiny"] = str(tiny_model(runs / "tiny-llama"))
        if "{tiny_ckpt}" in benchmark.quick:
            fields["tiny_ckpt"] = str(tiny_checkpoint(Path(fields["tiny"]), runs / "tiny-llama.safetensors"))
    return [*(token.format(**fields) for token in shlex.split(benchmark.quick)), *argv]


def output_name(benchmark: Benchmark, args: argparse.Namespace) -> str:
    """The results file (without `.md`) that a run with these options writes: the registry's pattern filled from the
    options, and from the fields a module derives from them (its `output_fields(args)`, where it has one)."""
    derived = getattr(module(benchmark), "output_fields", None)
    return benchmark.output.format(**vars(args), **(derived(args) if derived else {}))


def standard_runs(benchmark: Benchmark) -> list[tuple[list[str], str]]:
    """Each standard run of a benchmark: its options, and the results file it writes."""
    runs = []
    for options in benchmark.standard:
        argv = shlex.split(options)
        runs.append((argv, output_name(benchmark, parser(benchmark).parse_args(argv))))
    return runs


def command(benchmark: Benchmark, argv: list[str]) -> str:
    """The command line as the results show it: `--output-dir` left out (it says where, not what), and
    `--table-only` (a table rebuilt from stored runs is the one the command without it writes)."""
    shown, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == OUTPUT_DIR:
            skip = True
        elif not token.startswith(f"{OUTPUT_DIR}=") and token != TABLE_ONLY:
            shown.append(token)
    return shlex.join(["python", "-m", "benchmarks", benchmark.name, *shown])
