import json

import pytest

from destein_pl.calibration.pairs import (
    PairsFileError,
    SteeringPair,
    read_pairs,
    sample_pairs,
    usable_pairs,
)
from tests.conftest import SHARED_DATA

PARADETOX = SHARED_DATA / "paradetox" / "paradetox.tsv"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_pairs_are_read_in_order(tmp_path):
    rows = [{"toxic": "you idiot", "nontoxic": "you there"}, "", {"toxic": "a", "nontoxic": "b"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert read_pairs(path) == [SteeringPair("you idiot", "you there"), SteeringPair("a", "b")]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ('{"toxic": "x"}', "string fields 'toxic' and 'nontoxic'"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"toxic": "a", "nontoxic": "b"}, "", bad])
    with pytest.raises(PairsFileError, match=rf"p\.jsonl:3: .*{message}"):
        read_pairs(path)


def test_paradetox_tsv_reads_quoted_multiline_fields():
    pairs = read_pairs(PARADETOX)
    assert pairs[0] == SteeringPair("he had steel balls too !", "he was brave too!")
    assert len(pairs) > 11_000
    assert all("\t" not in p.toxic for p in pairs)


def test_tsv_with_a_short_row_names_its_line(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("toxic\tneutral1\tneutral2\tneutral3\na\tb\t\t\nc\td\n")
    with pytest.raises(PairsFileError, match=r"p\.tsv:3: expected 4 tab-separated fields, got 2"):
        read_pairs(path)
    path.write_text("text\tlabel\n")
    with pytest.raises(PairsFileError, match=r"p\.tsv:1: expected a header"):
        read_pairs(path)


def test_empty_and_identical_pairs_are_skipped_and_counted():
    kept, skipped = usable_pairs(
        [SteeringPair("bad", "good"), SteeringPair(" ", "x"), SteeringPair("same ", "same"), SteeringPair("y", "")]
    )
    assert kept == [SteeringPair("bad", "good")]
    assert skipped == {"empty": 2, "identical": 1}


def test_sampling_is_seeded_and_too_few_pairs_is_an_error():
    pairs = [SteeringPair(f"t{i}", f"n{i}") for i in range(50)]
    assert sample_pairs(pairs, 10, seed=3) == sample_pairs(pairs, 10, seed=3)
    assert sample_pairs(pairs, 10, seed=3) != sample_pairs(pairs, 10, seed=4)
    assert len(set(sample_pairs(pairs, 50, seed=0))) == 50
    with pytest.raises(ValueError, match="asked for m=51 pairs but only 50 usable"):
        sample_pairs(pairs, 51, seed=0)


def test_missing_file_and_unknown_format_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pairs file not found"):
        read_pairs(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_pairs(tmp_path / "pairs.csv")


@pytest.mark.parametrize("name, header, good", [
    ("p.jsonl", None, '{"toxic": "you idiot", "nontoxic": "you there"}'),
    ("p.tsv", "toxic\tneutral1\tneutral2\tneutral3", "you idiot\tyou there\t\t"),
])
def test_a_pairs_file_that_is_not_utf8_names_the_file_and_line(tmp_path, name, header, good):
    bad = good.replace("idiot", "idi\xf6t")
    lines = ([header] if header else []) + [good, bad]
    (tmp_path / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    line = len(lines)
    with pytest.raises(PairsFileError, match=rf"{name.replace('.', '[.]')}:{line}: not UTF-8 text"):
        read_pairs(tmp_path / name)


@pytest.mark.parametrize("name, format", [("pairs.jsonl", "auto"), ("pairs.tsv", "auto"), ("pairs", "auto"),
                                          ("pairs.jsonl", "jsonl")])
def test_a_folder_given_as_pairs_file_says_it_is_a_folder(tmp_path, name, format):
    (tmp_path / name).mkdir()
    with pytest.raises(IsADirectoryError, match=rf"{name} is a folder"):
        read_pairs(tmp_path / name, format)


def test_load_pairs_logs_how_many_pairs_it_skipped(tmp_path, caplog):
    from destein_pl import PairsConfig, load_pairs

    rows = [{"toxic": f"bad {i}", "nontoxic": f"good {i}"} for i in range(3)]
    rows += [{"toxic": "", "nontoxic": "x"}, {"toxic": "same", "nontoxic": "same "}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level("INFO", logger="destein_pl.calibration.pairs"):
        assert len(load_pairs(PairsConfig(str(path), m=2))) == 2
    assert "5 pairs read, 3 usable (skipped 1 with an empty side, 1 with identical sides)" in caplog.text


@pytest.mark.parametrize("options, message", [
    ({"m": 1}, r"pairs\.m must be at least 2"), ({"m": 0}, r"pairs\.m must be at least 2"),
    ({"batch_size": 0}, r"pairs\.batch_size must be at least 1"),
])
def test_pairs_options_out_of_range_name_themselves(options, message):
    from destein_pl import PairsConfig

    with pytest.raises(ValueError, match=message):
        PairsConfig("p.jsonl", **options)
