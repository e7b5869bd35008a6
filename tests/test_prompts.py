import json

import pytest

from destein_pl.evaluation.prompts import Prompt, PromptsFileError, read_prompts, sample_prompts, usable_prompts
from tests.conftest import SHARED_DATA

RTP = SHARED_DATA / "rtp"


def test_rtp_prompts_keep_id_text_and_toxicity():
    prompts = read_prompts(RTP / "rtp_test_100.jsonl")
    assert len(prompts) == 100
    first = json.loads((RTP / "rtp_test_100.jsonl").read_text().splitlines()[0])
    assert prompts[0] == Prompt(f"{first['filename']}:{first['begin']}", first["prompt"]["text"],
                                first["prompt"]["toxicity"])
    assert {p.subset for p in prompts} == {"toxic", "nontoxic"}
    assert sum(p.subset == "toxic" for p in prompts) == 50
    assert all(p.subset == "toxic" for p in read_prompts(RTP / "rtp_toxic_1k.jsonl"))


def test_plain_jsonl_and_text_files(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"text": "hello", "id": 7, "toxicity": 0.9}\n\n{"text": "bye"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == [Prompt("7", "hello", 0.9), Prompt("p.jsonl:3", "bye", None)]
    (tmp_path / "p.txt").write_text("first prompt\n\nthird\n")
    prompts = read_prompts(tmp_path / "p.txt")
    assert [p.text for p in prompts] == ["first prompt", "", "third"] and prompts[2].id == "p.txt:3"
    kept, empty = usable_prompts(prompts)
    assert [p.text for p in kept] == ["first prompt", "third"] and empty == 1
    assert kept[0].subset is None


@pytest.mark.parametrize("line, message", [
    ("{oops", "not valid JSON"),
    ('{"prompt": {"toxicity": 0.2}}', "prompt.text"),
    ('{"prompt": {"text": "x", "toxicity": "high"}}', "toxicity must be a number"),
])
def test_malformed_rtp_line_names_file_and_line(tmp_path, line, message):
    good = (RTP / "rtp_test_100.jsonl").read_text().splitlines()[0]
    (tmp_path / "rtp.jsonl").write_text(f"{good}\n{line}\n")
    with pytest.raises(PromptsFileError, match=rf"rtp\.jsonl:2: .*{message}"):
        read_prompts(tmp_path / "rtp.jsonl")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("name, row", [
    ("rtp.jsonl", '{{"filename": "f", "begin": 2, "prompt": {{"text": "x", "toxicity": {value}}}}}'),
    ("plain.jsonl", '{{"text": "x", "toxicity": {value}}}'),
])
def test_a_toxicity_that_is_not_finite_is_refused_naming_file_and_line(tmp_path, value, name, row):
    good = row.format(value="0.25").replace('"begin": 2', '"begin": 1')
    (tmp_path / name).write_text(f"{good}\n{row.format(value=value)}\n")
    with pytest.raises(PromptsFileError, match=rf"{name.replace('.', '[.]')}:2: toxicity must be a finite number"):
        read_prompts(tmp_path / name)


def test_sampling_and_errors(tmp_path):
    prompts = [Prompt(str(i), f"p{i}") for i in range(20)]
    chosen = sample_prompts(prompts, 5, seed=1)
    assert chosen == sample_prompts(prompts, 5, seed=1)
    assert [int(p.id) for p in chosen] == sorted(int(p.id) for p in chosen)
    assert sample_prompts(prompts, None, seed=0) == prompts
    with pytest.raises(ValueError, match="n=21 prompts but 20"):
        sample_prompts(prompts, 21, seed=0)
    with pytest.raises(ValueError, match="occurs twice"):
        usable_prompts([Prompt("a", "x"), Prompt("a", "y")])
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        read_prompts(tmp_path / "missing.jsonl")


def test_an_all_empty_prompts_file_is_an_error_naming_it(tmp_path):
    from destein_pl import PromptsConfig, load_prompts

    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"blank\.txt: no usable prompt \(all 3 are empty\)"):
        load_prompts(PromptsConfig(str(tmp_path / "blank.txt")))
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": " "}\n')
    with pytest.raises(ValueError, match=r"blank\.jsonl: no usable prompt \(all 2 are empty\)"):
        load_prompts(PromptsConfig(str(tmp_path / "blank.jsonl")))


@pytest.mark.parametrize("name, good", [
    ("rtp.jsonl", '{"filename": "f", "begin": 1, "prompt": {"text": "hello", "toxicity": 0.1}}'),
    ("plain.jsonl", '{"text": "hello"}'),
    ("lines.txt", "hello"),
])
def test_a_prompts_file_that_is_not_utf8_names_the_file_and_line(tmp_path, name, good):
    bad = good.replace("hello", "caf\xe9")
    (tmp_path / name).write_bytes(f"{good}\n{good}\n{bad}\n".encode("latin-1"))
    with pytest.raises(PromptsFileError, match=rf"{name.replace('.', '[.]')}:3: not UTF-8 text"):
        read_prompts(tmp_path / name)


@pytest.mark.parametrize("name, format", [("prompts.jsonl", "auto"), ("prompts", "auto"), ("prompts.txt", "text")])
def test_a_folder_given_as_prompts_file_says_it_is_a_folder(tmp_path, name, format):
    (tmp_path / name).mkdir()
    with pytest.raises(IsADirectoryError, match=rf"{name} is a folder"):
        read_prompts(tmp_path / name, format)


def test_crlf_line_ends_are_read_as_before(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"first\r\nsecond\rthird\n")
    assert [p.text for p in read_prompts(tmp_path / "p.txt")] == ["first", "second", "third"]
    (tmp_path / "p.jsonl").write_bytes(b'{"text": "a"}\r\n\r\n{"text": "b"}')
    assert [(p.id, p.text) for p in read_prompts(tmp_path / "p.jsonl")] == [("p.jsonl:1", "a"), ("p.jsonl:3", "b")]


def test_load_prompts_logs_how_many_empty_prompts_it_skipped(tmp_path, caplog):
    from destein_pl import PromptsConfig, load_prompts

    (tmp_path / "p.txt").write_text("one\n\ntwo\n \nthree\n")
    with caplog.at_level("INFO", logger="destein_pl.evaluation.prompts"):
        assert len(load_prompts(PromptsConfig(str(tmp_path / "p.txt")))) == 3
    assert "5 prompts read, 3 used, 2 empty skipped" in caplog.text


@pytest.mark.parametrize("options, message", [
    ({"n": 0}, r"prompts\.n must be at least 1"), ({"n": -2}, r"prompts\.n must be at least 1"),
    ({"batch_size": 0}, r"prompts\.batch_size must be at least 1"),
])
def test_prompts_options_out_of_range_name_themselves(options, message):
    from destein_pl import PromptsConfig

    with pytest.raises(ValueError, match=message):
        PromptsConfig("p.jsonl", **options)
