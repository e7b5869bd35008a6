"""`docs/BENCHMARKS.md`, assembled from the results files under `docs/results/` in the registry's order, each
section under the note that says what it answers; and the generated blocks of the other docs.

    python -m benchmarks page

A results file that does not exist yet is listed with the command that makes it, never left out silently. The page
holds no number of its own: every number in it is in a results file, next to its command.

Generated blocks: in `README.md` and any `docs/*.md`, the lines between a line `<!-- generated: results/NAME.md -->`
and a line `<!-- end generated -->` are replaced by the content of `docs/results/NAME.md` (its heading, command
line and machine line included), so that a table quoted in the docs is the measured one. `stale_blocks()` names
the files whose generated parts differ from what `page` would write.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from benchmarks import options
from benchmarks.registry import SECTIONS
from benchmarks.results import ROOT
from destein_pl.files import read_text, write_atomic

PAGE = Path("docs") / "BENCHMARKS.md"
"""The page, relative to the repository root."""
BEGIN = re.compile(r"<!-- generated: results/(?P<name>\S+\.md) -->")
END = "<!-- end generated -->"
INTRO = ("Every number on this page comes from a benchmark under `benchmarks/`; each table says the command that "
         "produced it and the machine it ran on. `python -m benchmarks` lists the benchmarks; rerun one with the "
         "command above its table, then `python -m benchmarks page` to refresh the page (`make bench` reruns them "
         "all).")


def demoted(text: str) -> str:
    """A results file's headings one level down, so that they nest under the page's sections."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def page(root: Path = ROOT) -> str:
    """The page's text from the results files under `root/docs/results/`."""
    results = root / "docs" / "results"
    parts = ["# Benchmarks", "", INTRO, ""]
    for section in SECTIONS:
        parts += [f"## {section.title}", "", section.note, ""]
        for bench in section.benchmarks:
            for argv, name in options.standard_runs(bench):
                path = results / f"{name}.md"
                if path.is_file():
                    parts += [demoted(read_text(path, "results file")).strip(), ""]
                    plot = path.with_suffix(".png")
                    parts += [f"![{name}](results/{plot.name})", ""] if plot.is_file() else []
                else:
                    command = shlex.join(["python", "-m", "benchmarks", bench.name, *argv])
                    needs = " (its standard run needs a CUDA GPU)" if bench.gpu else ""
                    needs += f" (it needs {', '.join(bench.requires)})" if bench.requires else ""
                    parts += [f"*Not measured yet{needs}: `{command}` writes `docs/results/{name}.md`.*", ""]
    return "\n".join(parts)


def filled(text: str, results: Path, where: Path) -> str:
    """`text` (the file `where`) with every generated block's lines replaced by its results file under
    `results`."""
    lines, out, number = text.split("\n"), [], 0
    while number < len(lines):
        line = lines[number]
        out.append(line)
        number += 1
        match = BEGIN.fullmatch(line.strip())
        if not match:
            continue
        start = number
        while number < len(lines) and lines[number].strip() != END:
            if BEGIN.fullmatch(lines[number].strip()):
                raise ValueError(f"{where}:{number + 1}: a generated block begins inside the one of line {start}")
            number += 1
        if number == len(lines):
            raise ValueError(f"{where}:{start}: a generated block without its `{END}` line")
        source = results / match["name"]
        if not source.is_file():
            raise FileNotFoundError(f"{where}:{start}: the generated block names {source.relative_to(results.parent)},"
                                    f" which does not exist (`python -m benchmarks` lists what writes each file)")
        out += [read_text(source, "results file").strip(), END]
        number += 1
    return "\n".join(out)


def documents(root: Path = ROOT) -> list[Path]:
    """The docs that may hold generated blocks: `README.md` and `docs/*.md`, the page aside."""
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [path for path in docs if path.is_file() and path != root / PAGE]


def generated(root: Path = ROOT) -> dict[Path, str]:
    """What `page` writes: the page, and every document with its generated blocks filled."""
    results = root / "docs" / "results"
    texts = {root / PAGE: page(root)}
    for path in documents(root):
        texts[path] = filled(read_text(path, "document"), results, path)
    return texts


def stale(root: Path = ROOT) -> dict[Path, str]:
    """The files whose text differs from what `page` writes, with that text."""
    return {path: text for path, text in generated(root).items()
            if not path.is_file() or read_text(path, "document") != text}


def stale_blocks(root: Path = ROOT) -> list[Path]:
    """The files whose generated parts differ from what `page` would write (the page itself included): none when
    the docs show the results files as they are."""
    return list(stale(root))


def write_page(root: Path = ROOT) -> list[Path]:
    """Write the page and fill the documents' generated blocks; the files that changed."""
    changed = stale(root)
    for path, text in changed.items():
        write_atomic(path, text)
    return list(changed)
