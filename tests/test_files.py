"""`destein_pl.files`: atomic writes leave nothing behind when they fail, JSONL logs survive a kill mid-line, and
readers name the file (and line) they cannot read."""

import json
import logging

import pytest
import torch

from destein_pl.files import (
    append_jsonl,
    atomic_path,
    jsonable,
    read_jsonl,
    read_text,
    repair_jsonl_tail,
    write_atomic,
    write_json,
)
from destein_pl.plots import probe_heatmap


def write_cut_log(path, rows, cut="{\"id\": \"c\", \"tox"):
    """A JSONL log whose last write was interrupted: complete rows, then part of a line without its newline."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + cut, encoding="utf-8")
    return path


def leftovers(folder, keep):
    """Files in `folder` other than `keep` (temporary files a failed write may leave)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_repair_cuts_an_interrupted_last_line_and_says_how_many_lines_it_kept(tmp_path, caplog):
    path = write_cut_log(tmp_path / "log.jsonl", [{"id": "a"}, {"id": "b"}])
    with caplog.at_level(logging.WARNING, logger="destein_pl.files"):
        assert repair_jsonl_tail(path) == 2
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    assert "kept 2 lines" in caplog.text and "incomplete last line" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="destein_pl.files"):
        assert repair_jsonl_tail(path) == 2  # nothing to cut: unchanged, silent
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n' and not caplog.text
    assert repair_jsonl_tail(tmp_path / "none.jsonl") == 0


def test_append_after_a_kill_mid_line_starts_on_a_line_of_its_own(tmp_path, caplog):
    path = write_cut_log(tmp_path / "log.jsonl", [{"id": "a"}])
    assert read_jsonl(path) == [{"id": "a"}]  # the cut line is dropped on read
    with caplog.at_level(logging.WARNING, logger="destein_pl.files"):
        append_jsonl(path, [{"id": "c", "toxicity": [0.5, None]}])
    assert "kept 1 lines" in caplog.text
    assert read_jsonl(path) == [{"id": "a"}, {"id": "c", "toxicity": [0.5, None]}]
    assert path.read_text().endswith("\n")


def test_a_malformed_line_that_is_not_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2: not a valid JSON line"):
        read_jsonl(path)


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "not encodable: \ud800")
    assert path.read_text() == "old"
    assert leftovers(tmp_path, {"results.json"}) == []
    write_atomic(path, "new")
    assert path.read_text() == "new" and leftovers(tmp_path, {"results.json"}) == []


def test_a_failed_figure_write_leaves_no_temporary_file(tmp_path):
    """The target is a folder, so the final rename fails after the PNG was written."""
    target = tmp_path / "probes.png"
    target.mkdir()
    (target / "keep").touch()
    with pytest.raises(OSError):
        probe_heatmap(torch.rand(3, 4), target)
    assert leftovers(tmp_path, {"probes.png"}) == []
    probe_heatmap(torch.rand(3, 4), tmp_path / "ok.png")
    assert (tmp_path / "ok.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(tmp_path, {"probes.png", "ok.png"}) == []


def test_results_json_holds_null_never_a_bare_nan(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, jsonable({"emt": float("nan"), "ppl": [float("inf"), 2.0], "n": 3}))
    assert json.loads(path.read_text(), parse_constant=reject_constant) == {"emt": None, "ppl": [None, 2.0], "n": 3}
    with pytest.raises(ValueError):
        write_json(path, {"emt": float("nan")})  # refused, not written as NaN


def reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def test_read_text_names_a_folder_a_missing_file_and_the_line_that_is_not_utf8(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder; expected a prompts file"):
        read_text(tmp_path, "prompts file")
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        read_text(tmp_path / "none.txt", "prompts file")
    (tmp_path / "latin1.txt").write_bytes("one\ntwo\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:3: not UTF-8 text"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\n")
    assert read_text(tmp_path / "crlf.txt") == "a\nb\n"
    assert read_text(tmp_path / "crlf.txt", newline="") == "a\r\nb\n"
