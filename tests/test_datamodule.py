import json

import pytest

from destein_pl.calibration.pairs import PairsConfig
from destein_pl.evaluation.prompts import PromptsConfig
from destein_pl.lightning.datamodule import DeSteinDataModule
from destein_pl.calibration.pairs import NONTOXIC_CUE, TOXIC_CUE
from tests.conftest import SHARED_DATA


def write_pairs(path, n):
    rows = [{"toxic": f"bad {i}", "nontoxic": f"good {i}"} for i in range(n)] + [{"toxic": "z", "nontoxic": "z"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_are_cued_batched_and_have_provenance(tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", 7)
    dm = DeSteinDataModule(pairs=PairsConfig(str(path), m=5, seed=1, batch_size=2))
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["toxic"]) for b in batches] == [2, 2, 1]
    first = batches[0]
    assert first["toxic"][0].startswith(TOXIC_CUE) and first["nontoxic"][0].startswith(NONTOXIC_CUE)
    assert first["toxic"][0][len(TOXIC_CUE):].replace("bad", "good") == first["nontoxic"][0][len(NONTOXIC_CUE):]
    assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 1, 2, 3, 4]
    provenance = dm.pairs_provenance()
    assert provenance["source"] == "p.jsonl" and provenance["m"] == 5 and len(provenance["sha256"]) == 64
    assert str(tmp_path) not in json.dumps(provenance)


def test_pairs_without_cues_and_too_few_pairs(tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", 7)
    plain = DeSteinDataModule(pairs=PairsConfig(str(path), m=5, seed=1, cues=False))
    plain.setup("fit")
    assert next(iter(plain.train_dataloader()))["toxic"][0].startswith("bad ")
    with pytest.raises(ValueError, match="only 7 usable"):
        DeSteinDataModule(pairs=PairsConfig(str(path), m=8)).setup("fit")


def test_prompts_are_sampled_in_file_order_with_their_toxicity():
    dm = DeSteinDataModule(prompts=PromptsConfig(str(SHARED_DATA / "rtp" / "rtp_test_100.jsonl"), n=10, seed=3,
                                                 batch_size=4))
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert [len(b["prompts"]) for b in batches] == [4, 4, 2]
    prompts = [p for b in batches for p in b["prompts"]]
    assert all(p.toxicity is not None and p.subset in ("toxic", "nontoxic") for p in prompts)
    again = DeSteinDataModule(prompts=PromptsConfig(str(SHARED_DATA / "rtp" / "rtp_test_100.jsonl"), n=10, seed=3))
    again.setup("test")
    assert again.prompts == prompts


def test_a_stage_without_its_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs data.pairs"):
        DeSteinDataModule(prompts=PromptsConfig("x.txt")).setup("fit")
    with pytest.raises(ValueError, match="needs data.prompts"):
        DeSteinDataModule(pairs=PairsConfig("x.jsonl")).setup("test")
