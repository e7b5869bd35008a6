"""Where benchmark results go: each script writes one markdown file under `docs/results/`, headed by the command
that produced it and the machine it ran on; `python benchmarks/results_page.py` assembles `docs/BENCHMARKS.md`
from them."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DATA = ROOT.parent / "shared" / "data"


def machine() -> str:
    """The machine in words: architecture, CPUs, torch and its threads, the GPU if one is used."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}")


def command() -> str:
    """The command line that ran this script, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def spread(values: list[float], digits: int = 3) -> str:
    """`median (min - max)` of repeated measurements."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f} - {max(values):.{digits}f})"


def write_result(name: str, title: str, body: str, shown_command: str | None = None) -> Path:
    """Print `body` and write it to `docs/results/<name>.md` under a heading, the command (this script's command
    line, or `shown_command` where another command reproduces the whole table) and the machine."""
    text = f"## {title}\n\n`{shown_command or command()}` on {machine()}.\n\n{body.strip()}\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    temporary = path.with_suffix(".md.tmp")
    temporary.write_text(text)
    temporary.replace(path)
    return path
