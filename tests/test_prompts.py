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
