"""The documentation names only what exists.

`README.md` and `docs/*.md` are read as Markdown. In their code spans and code blocks:
- every `destein VERB` (or `python -m destein_pl.lightning.cli VERB`) names a verb of the `destein` command;
- every `--option` named with a verb is accepted by that verb (`--X.help NAME` must show a help), and every dotted
  `--option.path` named without a verb is accepted by some verb;
- every YAML config shown (top-level `model`, `data` or `trainer`) uses option paths that `fit` or `test` accept;
- every `python -m benchmarks NAME` names a registered benchmark, and every `make TARGET` a Makefile target.
Every relative link points at an existing file (and heading); every generated block holds the current content of
its results file; the pages the project writes by hand hold no hand-copied results table; the README is a front
page of at most 200 lines whose test command is `make test` and whose families table matches the registry.

The parser is asked in this process, once per verb (`destein VERB --help`) and once per nested option group
(`destein VERB --data.prompts.help`), every answer cached.

    python -m tests.test_docs   # rewrite the README's families table from destein_pl/steering/architectures.py
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 200

GENERATED_BLOCK = re.compile(r"^<!-- generated: (results/[\w.-]+\.md) -->\n(.*?)^<!-- end generated -->$",
                             re.MULTILINE | re.DOTALL)
GENERATED_OPENING = re.compile(r"^<!-- generated: .*-->$", re.MULTILINE)
FAMILIES_BLOCK = re.compile(r"^(<!-- families: .*? -->\n)(.*?)^(<!-- end families -->)$", re.MULTILINE | re.DOTALL)

INVOCATION = re.compile(r"(?:(?<![\w/.-])destein|-m\s+(destein_pl(?:\.\w+)*))\s+([a-z][\w-]*)")
OPTION = re.compile(r"(?<![\w-])--[A-Za-z_][\w.*+-]*")
BENCHMARK = re.compile(r"python -m benchmarks(?:\s+([a-z][\w-]*))?")
MAKE = re.compile(r"(?<![\w-])make\s+([a-z][\w-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HELP_OPTION = re.compile(r"^\s*(--[\w.]+)\.help(?:\s+(\[?CLASS_PATH_OR_NAME\]?))?", re.MULTILINE)
INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
NUMBER_CELL = re.compile(r"^\**[-+]?\d[\d,]*(\.\d+)?%?\**(\s*\(.*\))?$")
WRITTEN_BY_BENCHMARKS = ("BENCHMARKS.md", "frontier-*.md")
"""Pages under docs/ that the benchmarks write whole; every other page is written by hand."""


# ---- reading the pages ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Code:
    """A code span or a fenced code block of a page."""

    page: Path
    line: int
    text: str
    lang: str | None  # None: an inline code span

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@functools.cache
def page_text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


@functools.cache
def prose_and_code(page: Path) -> tuple[str, tuple[Code, ...]]:
    """The page with its fenced blocks blanked (line numbers kept), and its code: fenced blocks, then spans."""
    lines = page_text(page).splitlines()
    prose, code, block, start, lang = [], [], None, 0, None
    for number, line in enumerate(lines, 1):
        fence = line.lstrip().startswith("```")
        if block is None and fence:
            block, start, lang = [], number, line.lstrip()[3:].strip().lower()
            prose.append("")
        elif block is not None and fence:
            code.append(Code(page, start + 1, "\n".join(block), lang))
            block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    text = "\n".join(prose)
    for match in INLINE_CODE.finditer(text):
        if not re.search(r"\n\s*\n", match.group(2)):  # a code span never crosses a paragraph
            code.append(Code(page, text.count("\n", 0, match.start()) + 1, match.group(2), None))
    return INLINE_CODE.sub("", text), tuple(code)


def all_code() -> Iterator[Code]:
    for page in PAGES:
        yield from prose_and_code(page)[1]


def hand_written(page: Path) -> bool:
    return not any(page.parent == DOCS and page.match(pattern) for pattern in WRITTEN_BY_BENCHMARKS)


@dataclass(frozen=True)
class Invocation:
    """One `destein VERB ...` in a piece of code: the verb, the module of `-m MODULE VERB`, and its options with
    the word after each (None where the next word is an option or missing)."""

    code: Code
    verb: str
    module: str | None
    options: tuple[tuple[str, str | None], ...]


def shell_lines(code: Code) -> Iterator[str]:
    """The commands of a piece of code: continuation lines joined, prompts, comment marks and trailing comments
    dropped, split at `;`, `|`, `&&`."""
    for line in code.text.replace("\\\n", " ").splitlines():
        line = re.sub(r"^\s*(?:\$|#+)\s*", "", line)
        line = re.sub(r"\s#\s.*$", "", line)
        yield from re.split(r"\s(?:;|\|\||\||&&)\s", line)


def words(text: str) -> list[str]:
    return [w.strip("[],.)") if not w.startswith(("'", '"')) else w
            for w in re.findall(r"\"[^\"]*\"|'[^']*'|\S+", text)]


def invocations(code: Code) -> Iterator[Invocation]:
    for line in shell_lines(code):
        matches = list(INVOCATION.finditer(line))
        for match, following in zip(matches, [*matches[1:], None]):
            tail = words(line[match.end():following.start() if following else len(line)])
            options = []
            for i, word in enumerate(tail):
                if OPTION.fullmatch(word.split("=", 1)[0]):
                    value = word.split("=", 1)[1] if "=" in word else (
                        tail[i + 1] if i + 1 < len(tail) and not tail[i + 1].startswith("-") else None)
                    options.append((word.split("=", 1)[0], value))
            yield Invocation(code, match.group(2), match.group(1), tuple(options))


def loose_options(code: Code) -> list[str]:
    """Dotted options of a piece of code that names no verb (`--model.gate.mode smooth` in prose)."""
    if any(True for _ in invocations(code)) or code.lang in ("python", "yaml", "yml"):
        return []
    return [o for o in OPTION.findall(code.text) if "." in o.strip(".")]


# ---- asking the parser ---------------------------------------------------------------------------------------------
@functools.cache
def destein_main():
    """The `destein` console script's function (as `pip install` wires it), else the module's."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="console_scripts", name="destein"):
        return entry.load()
    from destein_pl.lightning.cli import main

    return main


@functools.cache
def run_destein(*args: str) -> tuple[int, str]:
    """`destein ARGS` in this process, as the console script runs it: its exit status and output. The process is
    left as it was (arguments, terminal width, logging)."""
    out = io.StringIO()
    argv, columns = sys.argv, os.environ.get("COLUMNS")
    handlers, level = logging.root.handlers[:], logging.getLogger("destein_pl").level
    sys.argv, os.environ["COLUMNS"] = ["destein", *args], "200"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                destein_main()()
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(bool(exit.code))
    finally:
        sys.argv = argv
        logging.root.handlers[:] = handlers
        logging.getLogger("destein_pl").setLevel(level)
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return code, out.getvalue()


def verb_exists(verb: str) -> bool:
    return run_destein(verb, "--help")[0] == 0


@dataclass(frozen=True)
class Options:
    """What a verb's parser accepts: option names, and prefixes under which any option is accepted (a class-typed
    option such as a scorer, whose options depend on the class given)."""

    names: frozenset[str]
    open_prefixes: frozenset[str]


@functools.cache
def verb_options(verb: str) -> Options:
    names, open_prefixes, asked = set(), set(), set()
    pending = [(verb, "--help")]
    while pending:
        args = pending.pop()
        asked.add(args)
        code, text = run_destein(*args)
        assert code == 0, f"`destein {' '.join(args)}` failed ({code}):\n{text[-2000:]}"
        names.update(o.rstrip("+") for o in OPTION.findall(text))
        for match in HELP_OPTION.finditer(text):
            if match.group(2):  # `--X.help CLASS_PATH_OR_NAME`: a class-typed option
                open_prefixes.add(match.group(1))
            elif (verb, f"{match.group(1)}.help") not in asked:  # a dataclass: its options are in its own help
                pending.append((verb, f"{match.group(1)}.help"))
    return Options(frozenset(names), frozenset(open_prefixes))


def accepted(verb: str, option: str) -> bool:
    options = verb_options(verb)
    option = option.rstrip(".")
    if option.endswith(".*"):
        return any(name.startswith(option[:-1]) for name in options.names | options.open_prefixes)
    if option in options.names:
        return True
    parts = option.split(".")
    return any(".".join(parts[:i]) in options.open_prefixes for i in range(1, len(parts)))


def problem(invocation: Invocation, option: str, value: str | None) -> str | None:
    """Why `option` (with the word after it) does not work with its verb, or None."""
    verb = invocation.verb
    if not accepted(verb, option):
        return f"`destein {verb}` has no option {option}"
    if option.endswith(".help") and value and not value.isupper():  # `--X.help NAME`, NAME not a placeholder
        code, text = run_destein(verb, option, value)
        if code != 0:
            return f"`destein {verb} {option} {value}` fails: {text.strip().splitlines()[-1]}"
    return None


# ---- the tests -----------------------------------------------------------------------------------------------------
def test_readme_is_a_front_page_of_at_most_200_lines():
    lines = len(page_text(README).splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the detail to a page under docs/"


def test_readme_test_command_is_make_test():
    blocks = [c for c in prose_and_code(README)[1] if c.lang is not None]
    assert any(line.strip() == "make test" for c in blocks for line in c.text.splitlines()), \
        "README.md must show the test command `make test` in a code block (CI runs it)"


def test_every_destein_verb_named_exists():
    missing = {}
    for code in all_code():
        for invocation in invocations(code):
            if invocation.module and importlib.util.find_spec(invocation.module) is None:
                missing.setdefault(f"module {invocation.module}", []).append(code.where())
            if not verb_exists(invocation.verb):
                missing.setdefault(f"destein {invocation.verb}", []).append(code.where())
    assert not missing, "named in the docs but not in the command:\n" + "\n".join(
        f"  {name}: {', '.join(places)}" for name, places in sorted(missing.items()))


def test_every_option_named_with_a_verb_is_accepted_by_it():
    problems = []
    for code in all_code():
        for invocation in invocations(code):
            if not verb_exists(invocation.verb):
                continue  # reported by test_every_destein_verb_named_exists
            for option, value in invocation.options:
                if reason := problem(invocation, option, value):
                    problems.append(f"  {code.where()}: {reason}")
    assert not problems, "options the parser refuses:\n" + "\n".join(sorted(set(problems)))


def named_verbs() -> list[str]:
    verbs = {invocation.verb for code in all_code() for invocation in invocations(code)}
    return sorted(v for v in verbs if verb_exists(v))


def test_every_dotted_option_named_alone_is_accepted_by_some_verb():
    verbs = named_verbs()
    problems = [f"  {code.where()}: {option}" for code in all_code() for option in loose_options(code)
                if not any(accepted(verb, option) for verb in verbs)]
    assert not problems, f"no verb ({', '.join(verbs)}) accepts:\n" + "\n".join(sorted(set(problems)))


def config_paths(mapping: dict, prefix: str = "") -> Iterator[str]:
    for key, value in mapping.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and "class_path" not in value:
            yield from config_paths(value, path)
        else:
            yield path


def test_yaml_configs_shown_use_real_option_paths():
    problems = []
    for code in all_code():
        if code.lang not in ("yaml", "yml"):
            continue
        try:
            config = yaml.safe_load(code.text)
        except yaml.YAMLError as err:
            problems.append(f"  {code.where()}: not YAML ({err})")
            continue
        if not isinstance(config, dict) or not {"model", "data", "trainer"} & set(config):
            continue
        problems += [f"  {code.where()}: {path}" for path in config_paths(config)
                     if not (accepted("fit", f"--{path}") or accepted("test", f"--{path}"))]
    assert not problems, "config keys that neither `fit` nor `test` accepts:\n" + "\n".join(problems)


@functools.cache
def benchmark_names() -> frozenset[str] | None:
    """What `python -m benchmarks NAME` accepts: the registered benchmarks and the runner's own commands (`page`,
    ...), from its listing; None while the benchmarks package has no registry."""
    try:
        registry = importlib.import_module("benchmarks.registry")
        runner = importlib.import_module("benchmarks.runner")
    except ImportError:
        return None
    commands = set(re.findall(r"python -m benchmarks ([a-z]\w*)", runner.listing()))
    return frozenset(registry.BENCHMARKS) | commands


def test_every_benchmark_named_is_registered():
    named = {}
    for code in all_code():
        for line in shell_lines(code):
            for match in BENCHMARK.finditer(line):
                if match.group(1):
                    named.setdefault(match.group(1), []).append(code.where())
    known = benchmark_names()
    if known is None:
        pytest.skip("the benchmarks package has no registry yet (benchmarks.registry, benchmarks.runner), so "
                    f"`python -m benchmarks NAME` is not checked; named: {', '.join(sorted(named))}")
    unknown = {name: places for name, places in named.items() if name not in known}
    assert not unknown, "not a benchmark nor a command of `python -m benchmarks`:\n" + "\n".join(
        f"  {name}: {', '.join(places)}" for name, places in sorted(unknown.items())) + (
        f"\nit knows: {', '.join(sorted(known))}")


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([\w-]+)\s*:", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE))
    unknown = sorted({f"  {code.where()}: make {m}" for code in all_code() for line in shell_lines(code)
                      for m in MAKE.findall(line) if m not in targets})
    assert not unknown, "no such Makefile target:\n" + "\n".join(unknown)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


@functools.cache
def anchors(page: Path) -> frozenset[str]:
    """The anchors of a page's headings (a repeated heading gets `-1`, `-2`, ...)."""
    found, counts = set(), {}
    for line, _ in _lines_outside_fences(page):
        if heading := re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line):
            base = slug(heading.group(1))
            found.add(f"{base}-{counts[base]}" if base in counts else base)
            counts[base] = counts.get(base, 0) + 1
    return frozenset(found)


def _lines_outside_fences(page: Path) -> Iterator[tuple[str, int]]:
    inside = False
    for number, line in enumerate(page_text(page).splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside:
            yield line, number


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        prose = prose_and_code(page)[0]
        for match in LINK.finditer(prose):
            target = match.group(1)
            if re.match(r"[a-z][\w+.-]*:", target):  # https:, mailto:
                continue
            where = f"{page.relative_to(ROOT)}:{prose.count(chr(10), 0, match.start()) + 1}"
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"  {where}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"  {where}: {target} (no such heading in {resolved.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_generated_blocks_hold_their_results_file():
    problems = []
    for page in PAGES:
        text = page_text(page)
        blocks = list(GENERATED_BLOCK.finditer(text))
        if len(blocks) != len(GENERATED_OPENING.findall(text)):
            problems.append(f"  {page.relative_to(ROOT)}: a `generated:` line without its `end generated` line")
        for block in blocks:
            source = DOCS / block.group(1)
            if not source.is_file():
                problems.append(f"  {page.relative_to(ROOT)}: {block.group(1)} does not exist")
            elif block.group(2).strip() != source.read_text(encoding="utf-8").strip():
                problems.append(f"  {page.relative_to(ROOT)}: the block of {block.group(1)} is out of date")
    assert not problems, "generated blocks (`python -m benchmarks page` refills them):\n" + "\n".join(problems)


def table_rows(page: Path) -> Iterator[tuple[int, list[str]]]:
    """The table rows of a page outside code and generated blocks, as cells."""
    text = GENERATED_BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), page_text(page))
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside and line.lstrip().startswith("|"):
            yield number, [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def test_hand_written_pages_copy_no_results_table():
    problems = []
    for page in filter(hand_written, PAGES):
        for number, cells in table_rows(page):
            where = f"{page.relative_to(ROOT)}:{number}"
            if any(cell.lower() == "goal" for cell in cells):
                problems.append(f"  {where}: a `goal` column")
            elif sum(bool(NUMBER_CELL.match(cell)) for cell in cells) >= 3:
                problems.append(f"  {where}: a results row copied by hand: {' | '.join(cells)}")
    assert not problems, ("results tables belong in docs/results/ (shown through a generated block):\n"
                          + "\n".join(problems))


# ---- the families table --------------------------------------------------------------------------------------------
def _export(architecture, model_type: str) -> str:
    slot = architecture.bias_slot(model_type)
    if getattr(slot, "stock", True):
        return "HF folder" + (", GGUF" if getattr(slot, "gguf_arch", None) else "")
    if getattr(slot, "export_as", None):
        return f"HF folder as `{slot.export_as}`"
    return "none"


def families_table() -> str:
    """The README's table of supported families, from the registry."""
    from destein_pl.steering.architectures import ARCHITECTURES

    rows = ["| family | model types | steered: the input of | export of the folded model |",
            "| --- | --- | --- | --- |"]
    for arch in ARCHITECTURES:
        types = ", ".join(f"`{t}`" for t in arch.model_types)
        site = f"`{arch.layers}.N.{arch.attention}.{arch.projection}`"
        exports = "; ".join(f"`{t}`: {_export(arch, t)}" for t in arch.model_types)
        rows.append(f"| `{arch.family}` | {types} | {site} | {exports} |")
    return "\n".join(rows) + "\n"


def test_readme_families_table_is_the_registry():
    block = FAMILIES_BLOCK.search(page_text(README))
    assert block, "README.md has no `<!-- families: ... -->` ... `<!-- end families -->` block"
    assert block.group(2) == families_table(), (
        "the README's families table differs from destein_pl/steering/architectures.py; rewrite it with "
        f"`python -m tests.test_docs`. It should read:\n{families_table()}")


def write_families_table() -> None:
    text = page_text(README)
    assert FAMILIES_BLOCK.search(text), "README.md has no families block to rewrite"
    README.write_text(FAMILIES_BLOCK.sub(lambda m: m.group(1) + families_table() + m.group(3), text),
                      encoding="utf-8")


if __name__ == "__main__":
    write_families_table()
    print(f"rewrote the families table of {README}")
