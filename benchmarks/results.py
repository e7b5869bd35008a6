"""Where benchmark results go: each run writes markdown files under `docs/results/` (or the folder `--output-dir`
names), each headed by the command that produced it and the machine it ran on, written atomically; what a run
stores to resume or to hand to another benchmark goes under `runs/` (or inside that folder)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from destein_pl.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
RUNS = ROOT / "runs"
DATA = ROOT.parent / "shared" / "data"


def machine() -> str:
    """The machine in words: architecture, CPUs, torch and its threads, the GPU if one is used."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}")


def shown(path: Path) -> str:
    """A path as the results show it: relative to the repository root where it lies inside it, else its name (a
    temporary folder's place says nothing to a reader)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


@dataclass(frozen=True)
class Results:
    """Where one benchmark run writes its results files (`folder`), where it keeps stored runs (`runs`), the
    command line shown above its tables, and the results files it has written."""

    folder: Path
    runs: Path
    command: str
    written: list[Path] = field(default_factory=list, compare=False)

    @classmethod
    def at(cls, output_dir: Path | None, command: str) -> Results:
        """`docs/results/` and `runs/`; or both inside `output_dir`, so that a trial run (`--quick`) never
        replaces a committed result nor mixes into stored runs."""
        if output_dir is None:
            return cls(RESULTS, RUNS, command)
        return cls(Path(output_dir), Path(output_dir) / "runs", command)

    def path(self, name: str, suffix: str = ".md") -> Path:
        """The file `name` with `suffix` in the results folder (a plot beside its table, for instance)."""
        return self.folder / f"{name}{suffix}"

    def write(self, name: str, title: str, body: str, command: str | None = None) -> Path:
        """Print `body` and write it to `<folder>/<name>.md` under a heading, the command (this run's, or
        `command` where another one reproduces the whole table) and the machine."""
        text = f"## {title}\n\n`{command or self.command}` on {machine()}.\n\n{body.strip()}\n"
        print(text)
        path = self.path(name)
        write_atomic(path, text)
        self.written.append(path)
        return path
