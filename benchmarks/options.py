"""The options of a benchmark, declared once: its module's own (`add_options`) and the runner's (`--quick`,
`--output-dir`, `--threads`); `--quick` expanded into the registry's quick options; the results file that parsed
options name; and the command line as the results show it."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import typing
from pathlib import Path
from types import ModuleType

from benchmarks.registry import Benchmark
from benchmarks.results import RUNS

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
                             "docs/results/ and runs/ (a trial run then replaces no committed result); a quick run "
                             "without it writes into runs/quick/, never docs/results/")
    runner.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


QUICK = RUNS / "quick"
"""Where a quick run without `--output-dir` writes, never `docs/results/`: one folder for every benchmark, so that a
quick run finds the stored runs of the quick runs it needs."""


def output_dir(benchmark: Benchmark, given: argparse.Namespace) -> Path | None:
    """The folder a run writes into (None: `docs/results/` and `runs/`): `--output-dir`, which must be a folder or
    not exist yet; for a quick run without it, `QUICK`."""
    if given.output_dir is None:
        return QUICK if given.quick else None
    blocked = next((p for p in (given.output_dir, *given.output_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        refuse(benchmark, f"{OUTPUT_DIR} {given.output_dir}: {blocked} is a file, not a folder; give a folder (or a "
                          f"path that does not exist yet) to write the results files into")
    return given.output_dir


def refuse(benchmark: Benchmark, message: str) -> typing.NoReturn:
    """End the run as argparse does on a usage error: one line on stderr, exit code 2."""
    print(f"python -m benchmarks {benchmark.name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


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
