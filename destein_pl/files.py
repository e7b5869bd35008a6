"""Files the library writes: atomic replacement, append-only JSONL logs that survive a kill, settings records, and
the cache folder.

Every file a user keeps is either written whole into a temporary file beside it and renamed into place (never
half-written), or is an append-only JSONL log flushed line by line, whose cut-short last line (what a kill during
a write leaves) is dropped on read and repaired before the next append.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The library's cache folder: `$XDG_CACHE_HOME/destein-pl` (default `~/.cache/destein-pl`)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "destein-pl"


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds, removed when it
    fails. `suffix` keeps an extension that a writer needs (e.g. `.png` for matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates owner-only files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
    """Replace `path` with `content` (text as UTF-8) so that readers see the old or the new file, never a part."""
    with atomic_path(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON, atomically. Non-finite floats are refused (they are not JSON)."""
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` as a Path when it is an existing file; else an error that says what is there instead: a folder, or
    nothing."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a {what}")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_text(path: str | os.PathLike, what: str = "file", newline: str | None = None) -> str:
    """A UTF-8 text file, with errors that name it: missing, a folder, or not UTF-8 (with the line). `newline` as
    in `open`: None turns every line ending into `\\n`; `""` keeps them (what `csv` needs)."""
    path = require_file(path, what)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {err.start}); save the {what} as UTF-8") from None
    return io.StringIO(text, newline=newline).read()


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> list[Any]:
    """The rows of a JSONL log. A last line cut short by an interrupted write (no newline after it) is dropped;
    any other malformed line is an error naming the file and line."""
    text = read_text(path, what)
    rows = []
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if lineno == len(lines):  # no newline after it: the write was interrupted
                break
            raise ValueError(f"{path}:{lineno}: not a valid JSON line ({err.msg})") from err
    return rows


def repair_jsonl_tail(path: str | os.PathLike) -> int:
    """Cut an incomplete last line (no newline after it) off a JSONL log, so that the next append starts on a line
    of its own. Returns the number of complete lines kept; warns when something was cut."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    kept = data[:end].count(b"\n")
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        log.warning("%s: dropped an incomplete last line (%d bytes) left by an interrupted write; kept %d lines",
                    path, len(data) - end, kept)
    return kept


def append_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Append rows to a JSONL log and flush them to disk at once, after repairing an interrupted last line."""
    repair_jsonl_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def ensure_settings(folder: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Record what a folder's outputs are made with (`settings.json`), or refuse to add to it with other settings,
    naming each setting that differs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "settings.json"
    if path.is_file():
        stored = json.loads(read_text(path, "settings file"))
        changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if changed:
            raise ValueError(f"{folder} holds outputs made with other settings (stored, now): {changed}; "
                             f"use another output folder or the same settings")
    else:
        write_atomic(path, json.dumps(settings, indent=2, sort_keys=True, allow_nan=False) + "\n")


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of metric values: NaN and infinities become None."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value

