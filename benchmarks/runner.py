"""The runner of the benchmarks:

    python -m benchmarks                   # list them: what each answers and the results file it writes
    python -m benchmarks NAME [options]    # run one (NAME --help: its options)
    python -m benchmarks NAME --quick --output-dir DIR   # its quick run (seconds), its files written into DIR
                                                         # (default runs/quick/: never docs/results/)
    python -m benchmarks standard          # every benchmark's standard runs, then the page (`make bench`; hours)
    python -m benchmarks page              # assemble docs/BENCHMARKS.md and fill the docs' generated blocks
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import torch

from benchmarks import options, results_page
from benchmarks.registry import BENCHMARKS, Benchmark, benchmark
from benchmarks.results import RESULTS, ROOT, Results

log = logging.getLogger("benchmarks")


def listing() -> str:
    """Every benchmark with its one-line description and its results file, and how to run them."""
    lines = [__doc__.strip(), "", "Benchmarks (in the order of docs/BENCHMARKS.md):", ""]
    width = max(len(name) for name in BENCHMARKS)
    for b in BENCHMARKS.values():
        lines.append(f"  {b.name:<{width}}  {b.description}")
        lines.append(f"  {'':<{width}}  -> {(RESULTS / b.output).relative_to(ROOT)}.md"
                     + ("  (standard run: CUDA GPU)" if b.gpu else "")
                     + (f"  (needs {', '.join(b.requires)})" if b.requires else ""))
    return "\n".join(lines)


def run(bench: Benchmark, argv: list[str]) -> Path:
    """Run a benchmark with a command line of its options; the results file it wrote (its declared output)."""
    given = options.runner_options(argv)
    results = Results.at(options.output_dir(bench, given), options.command(bench, argv))
    args = options.parser(bench).parse_args(options.expanded(bench, argv, results.runs))
    missing = bench.missing()
    if missing:
        raise SystemExit(f"{bench.name} needs the Python module(s) {', '.join(missing)}, which this Python "
                         f"cannot import (`python -m benchmarks {bench.name} --help` says how to get them)")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        options.module(bench).run(args, results)
    finally:
        torch.set_num_threads(threads)  # as found: a caller in this process (a test) goes on with its own
    path = results.path(options.output_name(bench, args))
    if path not in results.written:
        raise RuntimeError(f"{bench.name} did not write its declared results file {path} (it wrote "
                           f"{', '.join(map(str, results.written)) or 'nothing'})")
    return path


def standard() -> int:
    """Every benchmark's standard runs in the registry's order (a failed one is reported and the rest go on; one
    that needs a GPU is skipped without one), then the page. 1 when any failed."""
    failed = []
    for bench in BENCHMARKS.values():
        if bench.gpu and not torch.cuda.is_available():
            log.info("skipping %s: its standard run needs a CUDA GPU", bench.name)
            continue
        missing = bench.missing()
        if missing:
            log.info("skipping %s: it needs the Python module(s) %s", bench.name, ", ".join(missing))
            continue
        for argv, _ in options.standard_runs(bench):
            shown = options.command(bench, argv)
            log.info("%s", shown)
            try:
                run(bench, argv)
            except (Exception, SystemExit):  # a benchmark stops with SystemExit when an input is missing
                traceback.print_exc()
                failed.append(shown)
    results_page.write_page()
    for shown in failed:
        log.error("failed: %s", shown)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks ...`; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if not argv or argv[0] in ("list", "-h", "--help"):
        print(listing())
        return 0
    if argv[0] == "standard":
        return standard()
    if argv[0] == "page":
        for path in results_page.write_page():
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    run(benchmark(argv[0]), argv[1:])
    return 0
